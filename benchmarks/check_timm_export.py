"""The timm export against timm itself (run once, in an environment where timm imports).

timm needs torchvision, which does not import beside this project's CPU torch build, so this is not a CI test. In a
separate environment (torch 2.14.1, torchvision 0.29.1, timm, and this package installed with --no-deps):

    python benchmarks/check_timm_export.py

For several architectures with random weights it:
  1. writes the timm state dict with ``dinov3.export.export_timm`` (.safetensors and .pth),
  2. loads each file the way a timm user does: ``timm.create_model(NAME, pretrained=True,
     pretrained_cfg_overlay=dict(file=PATH), **KWARGS)`` (timm's own checkpoint filter runs on it),
  3. compares timm's ``forward_features`` tokens with ours (non-square input, batch 2),
  4. compares our mapping with timm's own conversion of the official layout (``eva.checkpoint_filter_fn``).
It writes the log to benchmarks/results/export/timm_check.txt and the state-dict keys and shapes of timm's
vit_small / vit_small_plus DINOv3 models to tests/data/timm_dinov3_keys.json (the CI test of the layout reads it).
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT / "benchmarks" / "results" / "export" / "timm_check.txt"
KEYS = ROOT / "tests" / "data" / "timm_dinov3_keys.json"
KEY_MODELS = ("vit_small_patch16_dinov3_qkvb", "vit_small_plus_patch16_dinov3_qkvb")
TINY = dict(embed_dim=64, depth=2, num_heads=2, patch_size=8)
CASES = {
    "vit_small": ("vit_small", {}),
    "vit_small_plus": ("vit_small_plus", {}),
    "vit_large_plus (no timm name: vit_large + SwiGLU), 4 blocks": ("vit_large_plus", dict(depth=4)),
    "vit_7b shape (no qkv bias), 256 wide, 2 blocks": ("vit_7b", dict(embed_dim=256, depth=2, num_heads=2)),
    "tiny patch 8, MLP": ("vit_small", TINY),
    "tiny patch 8, SwiGLU, no layer scale, no registers": (
        "vit_small_plus", dict(TINY, layerscale_init=None, n_storage_tokens=0)),
}


def randomized(arch: str, kwargs: dict, std: float):
    from dinov3.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, attn_backend="reference", **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial biases, norms and layer scales: a mix-up cannot hide
            p.add_(torch.randn_like(p) * std)
    return model


def tokens(out: dict) -> torch.Tensor:
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_storage_tokens"], out["x_norm_patchtokens"]], 1)


def main() -> int:
    import timm
    from timm.models import eva

    from dinov3.export import export_timm
    from dinov3.models.convert_timm import to_timm_state_dict

    lines = [f"# timm export check, {datetime.date.today()}, commit {_commit()}",
             f"# torch {torch.__version__}, timm {timm.__version__}, CPU, fp32",
             "# timm model built by timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...), "
             "**kwargs); input (2, 3, 14p, 10p)", ""]
    worst = 0.0
    for label, (arch, kwargs) in CASES.items():
        model = randomized(arch, kwargs, std=0.2 if kwargs.get("embed_dim", 384) <= 64 else 0.02)
        p = model.patch_size
        x = torch.randn(2, 3, 14 * p, 10 * p, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ours = tokens(model.forward_features(x))
        for suffix in (".safetensors", ".pth"):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"timm{suffix}"
                name, create_kwargs = export_timm(model, path)
                theirs_model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                                 **create_kwargs).eval()
                with torch.no_grad():
                    theirs = theirs_model.forward_features(x)
            err = (theirs - ours).abs().max().item()
            cos = torch.nn.functional.cosine_similarity(theirs.double(), ours.double(), dim=-1).min().item()
            worst = max(worst, err)
            lines.append(f"{label} [{suffix}]: timm {name} {create_kwargs}")
            lines.append(f"    tokens {tuple(ours.shape)}: max abs err {err:.3e}, min per-token cosine {cos:.7f}")
        # timm's own conversion of the official layout gives the same tensors as ours (timm recognises the official
        # layout by its storage tokens, so only models that have them).
        official = model.state_dict()
        if "storage_tokens" not in official:
            lines.append("    timm's checkpoint_filter_fn: not applicable (no storage tokens)")
            continue
        filtered = eva.checkpoint_filter_fn(dict(official), theirs_model)
        mine = to_timm_state_dict(official)
        same = set(filtered) == set(mine) and all(torch.equal(filtered[k], mine[k]) for k in mine)
        lines.append(f"    timm's checkpoint_filter_fn on the official layout == our mapping: {same}")
        if not same:
            lines.append(f"      keys only in timm's: {sorted(set(filtered) - set(mine))[:8]}, "
                         f"only in ours: {sorted(set(mine) - set(filtered))[:8]}")
    lines += ["", f"largest max abs err over all cases: {worst:.3e}"]
    LOG.parent.mkdir(parents=True, exist_ok=True)
    LOG.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    layouts = {name: {k: list(v.shape) for k, v in timm.create_model(name).state_dict().items()}
               for name in KEY_MODELS}
    KEYS.parent.mkdir(parents=True, exist_ok=True)
    KEYS.write_text(json.dumps({"timm": timm.__version__, "models": layouts}, indent=1) + "\n")
    print(f"wrote {LOG} and {KEYS}")
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
