"""Starting a run from pretrained weights (student.pretrained_weights / --init-from): every weights format, the model
taken from the weights, mismatches as errors, and the head warm-up."""

import json
import os

import pytest
import torch

from dinov3.models import DinoVisionTransformer
from dinov3.train.checkpoint import load_checkpoint
from dinov3.train.config import ConfigError, backbone_kwargs, dump_config, load_config
from dinov3.train.pretrained import load_into_arch
from dinov3.train.ssl_arch import SSLMetaArch
from dinov3.train.trainer import train


def _source(**changes):
    """A `tiny` backbone with non-trivial values everywhere (its tensors, not its init, are what must arrive)."""
    cfg = load_config("tiny")
    kwargs = {**backbone_kwargs(cfg), **changes}
    model = DinoVisionTransformer(**kwargs, attn_backend="reference")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval(), kwargs


def _features(model, x):
    model = model.eval()
    with torch.no_grad():
        out = model.forward_features(x)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], 1)


def _write(fmt, model, kwargs, root):
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "official.pth":
        path = root / "dinov3_vit_tiny.pth"
        torch.save(sd, path)
    elif fmt == "official.safetensors":
        from safetensors.torch import save_file

        path = root / "dinov3_vit_tiny.safetensors"
        save_file(sd, str(path))
    elif fmt == "backbone.pth":
        path = root / "backbone.pth"
        torch.save(sd, path)
        (root / "backbone.json").write_text(json.dumps(kwargs))
    elif fmt == "training checkpoint":
        path = root / "checkpoint_00000010.pth"
        cfg = load_config("tiny")
        torch.save({"format": 1, "iteration": 10, "config": dump_config(cfg),
                    "model": {**{f"teacher.backbone.{k}": v for k, v in sd.items()},
                              **{f"student.backbone.{k}": torch.zeros_like(v) for k, v in sd.items()}}}, path)
    elif fmt in ("hf folder", "hf safetensors"):
        transformers = pytest.importorskip("transformers")
        from dinov3.models.convert import hf_config_kwargs, to_hf_state_dict

        hf = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**hf_config_kwargs(model)))
        prefix = "model.layer." if any(k.startswith("model.layer.") for k in hf.state_dict()) else "layer."
        hf.load_state_dict(to_hf_state_dict(sd, layer_prefix=prefix), strict=True)
        folder = root / "hf"
        hf.save_pretrained(str(folder))
        path = folder
        if fmt == "hf safetensors":  # the file alone, without its config.json
            path = root / "hf_model.safetensors"
            os.replace(folder / "model.safetensors", path)
    return str(path)


FORMATS = ["official.pth", "official.safetensors", "backbone.pth", "training checkpoint", "hf folder",
           "hf safetensors"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_init_from_loads_student_teacher_and_gram_teacher(fmt, tmp_path, tiny_overrides):
    model, kwargs = _source()
    path = _write(fmt, model, kwargs, tmp_path)
    cfg = load_config("tiny", tiny_overrides + [f"student.pretrained_weights={json.dumps(path)}",
                                                "student.attn_backend=reference"])
    if fmt.startswith("hf"):
        # Hugging Face's DINOv3ViTModel has no separate local-crop CLS norm: the model follows the weights.
        assert cfg["student"]["model_kwargs"]["untie_global_and_local_cls_norm"] is False
    torch.manual_seed(0)
    arch = SSLMetaArch(cfg)
    load_into_arch(arch, cfg)  # what the Trainer does before iteration 0 of a run that is not resumed
    x = torch.randn(2, 3, 32, 48)
    expected = _features(model, x)
    for backbone in (arch.student.backbone, arch.teacher.backbone, arch.gram_teacher):
        torch.testing.assert_close(_features(backbone, x), expected, rtol=0, atol=1e-5)


def test_the_model_comes_from_the_weights_and_a_differing_setting_is_an_error(tmp_path):
    model, kwargs = _source(n_storage_tokens=2, layerscale_init=None)
    path = _write("official.pth", model, kwargs, tmp_path)
    init = f"student.pretrained_weights={json.dumps(path)}"
    # The recipe's n_storage_tokens=1 and LayerScale give way to what the tensors show.
    cfg = load_config("tiny", [init])
    assert backbone_kwargs(cfg)["n_storage_tokens"] == 2
    # Settings the user wrote that disagree: one error naming every differing key, the weights' and the config's.
    with pytest.raises(ConfigError) as exc:
        load_config("tiny", [init, "student.model_kwargs.n_storage_tokens=4", "student.arch=vit_small",
                             "student.patch_size=16"])
    text = str(exc.value)
    for line in ("n_storage_tokens: 2 in the weights, 4 in the config", "embed_dim: 64 in the weights, 384",
                 "depth: 2 in the weights, 12", "num_heads: 2 in the weights, 6", "patch_size: 8 in the weights, 16"):
        assert line in text, text
    # backbone.json describes every argument, LayerScale included.
    model, kwargs = _source(layerscale_init=None, ffn_ratio=3.0)
    path = _write("backbone.pth", model, kwargs, tmp_path)
    cfg = load_config("tiny", [f"student.pretrained_weights={json.dumps(path)}"])
    kw = backbone_kwargs(cfg)
    assert kw["layerscale_init"] is None and kw["ffn_ratio"] == 3.0
    with pytest.raises(ConfigError, match="ffn_ratio: 3.0 in the weights, 4.0 in the config"):
        load_config("tiny", [f"student.pretrained_weights={json.dumps(path)}", "student.model_kwargs.ffn_ratio=4.0"])


@pytest.mark.parametrize("released", ["vit_small", "vit_small_plus", "vit_base", "vit_large", "vit_huge_plus",
                                      "vit_7b"])
def test_released_official_layouts_fit_a_vit_recipe(released):
    """Bare official weights of every released size (keys and shapes of our official-layout model, checked against
    Hugging Face in tests/models) with the vits16 recipe: the model read off the tensors loads strictly."""
    from dinov3.models.checkpoint import check_state_dict
    from dinov3.models.vision_transformer import build_model
    from dinov3.train.pretrained import PretrainedBackbone, adopt_pretrained_model, kwargs_from_state_dict

    with torch.device("meta"):
        sd = build_model(released).state_dict()
    cfg = load_config("vits16")
    cfg["student"]["pretrained_weights"] = "official.pth"
    weights = PretrainedBackbone(sd, kwargs_from_state_dict(sd), "its tensors")
    adopted = adopt_pretrained_model(cfg, cfg, weights)
    check_state_dict(DinoVisionTransformer(device="meta", **backbone_kwargs(adopted)), sd)
    # The recipe's untied local-crop CLS norm gives way to the weights' (only the 7B has one).
    assert backbone_kwargs(adopted)["untie_global_and_local_cls_norm"] is (released == "vit_7b")


def test_missing_or_unreadable_weights_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="student.pretrained_weights=.*no such file"):
        load_config("tiny", [f"student.pretrained_weights={json.dumps(str(tmp_path / 'none.pth'))}"])
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not weights")
    with pytest.raises(ConfigError, match="student.pretrained_weights=.*cannot be read as weights"):
        load_config("tiny", [f"student.pretrained_weights={json.dumps(str(bad))}"])


def test_head_warmup_freezes_the_backbone_then_ramps_its_lr(tmp_path, image_dir, tiny_overrides):
    """Warm-up of 3 iterations, lr ramp of 2: the student backbone stays the weights while the heads train, the
    teacher heads follow the student heads by EMA, the teacher backbone stays the weights; then it all trains."""
    model, kwargs = _source()
    path = _write("backbone.pth", model, kwargs, tmp_path)
    src = model.state_dict()
    overrides = tiny_overrides + [f"student.pretrained_weights={json.dumps(path)}", "train.head_warmup_iters=3",
                                  "train.backbone_lr_ramp_iters=2", "checkpointing.period=1",
                                  "checkpointing.max_to_keep=0", "optim.freeze_last_layer_iters=0",
                                  "schedules.lr.warmup_iters=0", "gram.start_iter=4"]
    cfg = load_config("tiny", overrides)
    out = str(tmp_path / "run")
    train(cfg, data_dir=image_dir, output_dir=out, max_iters=5)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["backbone_lr_factor"] for r in rows] == [0.0, 0.0, 0.0, 0.5, 1.0]
    assert all(r["backbone_grad_norm"] == 0 for r in rows[:3]) and rows[3]["backbone_grad_norm"] > 0
    states = {i: load_checkpoint(os.path.join(out, "checkpoints", f"checkpoint_{i:08d}.pth"))["model"]
              for i in range(1, 6)}
    for i in (1, 2, 3):
        for k, v in src.items():
            assert torch.equal(states[i]["student.backbone." + k], v), (i, k)
            torch.testing.assert_close(states[i]["teacher.backbone." + k], v, rtol=1e-6, atol=1e-7)
    heads = [k for k in states[1] if k.startswith("student.") and "_head." in k]
    assert sum(not torch.equal(states[1][k], states[2][k]) for k in heads) >= len(heads) - 2  # the heads train
    m = rows[2]["momentum"]
    for k in heads:  # teacher head after iteration 2 = m * (after iteration 1) + (1 - m) * student after 2
        t = k.replace("student.", "teacher.", 1)
        torch.testing.assert_close(states[2][t], m * states[1][t] + (1 - m) * states[2][k], rtol=1e-5, atol=1e-7)
    moved = [k for k in src if not torch.equal(states[4]["student.backbone." + k], src[k])]
    assert len(moved) > len(src) // 2  # the backbone trains after the warm-up
    # The defaults when the weights are given and the keys left null.
    from dinov3.train.config import head_warmup_iters

    # The rule: the prototypes' freeze (80 in tiny) + one EMA time constant, 1 / (1 - 0.99) = 100; no lr ramp.
    assert head_warmup_iters(load_config("tiny", [f"student.pretrained_weights={json.dumps(path)}"])) == (180, 0)
    assert head_warmup_iters(load_config("tiny")) == (0, 0)


def test_resume_of_a_run_started_from_weights_is_exact(tmp_path, image_dir, tiny_overrides):
    model, kwargs = _source()
    path = _write("backbone.pth", model, kwargs, tmp_path)
    cfg = load_config("tiny", tiny_overrides + [f"student.pretrained_weights={json.dumps(path)}",
                                                "train.head_warmup_iters=2", "train.backbone_lr_ramp_iters=2"])
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train(cfg, data_dir=image_dir, output_dir=full, max_iters=4)
    train(cfg, data_dir=image_dir, output_dir=part, max_iters=2)
    os.unlink(path)  # a resume needs only the checkpoint
    train(cfg, data_dir=image_dir, output_dir=part, max_iters=4, resume=True)
    a = load_checkpoint(os.path.join(full, "checkpoints", "checkpoint_00000004.pth"))["model"]
    b = load_checkpoint(os.path.join(part, "checkpoints", "checkpoint_00000004.pth"))["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_cli_init_from_help_and_errors(capsys):
    from dinov3.train.cli import build_parser, main

    text = " ".join(build_parser().format_help().split())
    assert "start a NEW run from these backbone weights" in text and "Not --resume, which continues one run" in text
    assert "to start a new run from the weights of another, use --init-from" in text
    assert main(["--config", "tiny", "--data", ".", "--output", "/tmp/x", "--init-from", "/no/such.pth"]) == 2
    assert "--init-from /no/such.pth: no such file or folder" in capsys.readouterr().err


def test_pretrained_anchor_pulls_the_backbone_toward_its_starting_weights():
    """p <- p + lr * strength * (p0 - p) per parameter group (its lr), backbone parameters only."""
    from torch import nn

    from dinov3.train.anchor import PretrainedAnchor

    backbone, reference, head = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(2, 2)
    with torch.no_grad():
        for p in backbone.parameters():
            p.fill_(1.0)
        for p in reference.parameters():
            p.fill_(-1.0)
        for p in head.parameters():
            p.fill_(5.0)
    ref_before = [p.clone() for p in reference.parameters()]
    opt = torch.optim.SGD([{"params": [backbone.weight], "lr": 0.1}, {"params": [backbone.bias], "lr": 0.0},
                           {"params": list(head.parameters()), "lr": 0.1}], lr=0.1)
    anchor = PretrainedAnchor(backbone, reference, strength=2.0)
    anchor.step(opt)
    # weight: 1 + 0.1 * 2 * (-1 - 1) = 0.6; bias: lr 0, unchanged; the head and the reference untouched.
    torch.testing.assert_close(backbone.weight, torch.full((2, 3), 0.6))
    assert torch.equal(backbone.bias, torch.ones(2))
    assert all(torch.equal(p, torch.full_like(p, 5.0)) for p in head.parameters())
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), ref_before))
    opt.param_groups[0]["lr"] = 10.0  # lr * strength past 1: the parameter lands on the reference, no overshoot
    anchor.step(opt)
    assert torch.equal(backbone.weight, torch.full((2, 3), -1.0))
    with pytest.raises(ValueError, match="> 0"):
        PretrainedAnchor(backbone, reference, strength=0.0)


def _interrupted_run_from_weights(tmp_path, image_dir, tiny_overrides, extra):
    """Three iterations from `tiny` weights written here (head warm-up 1, a checkpoint every iteration), uninterrupted
    in full/ and stopped after 2 then resumed in part/ with the weights file gone. Returns the weights, their model
    kwargs, the config, full/, full/'s metric rows and both runs' last checkpoint models."""
    model, kwargs = _source()
    path = _write("backbone.pth", model, kwargs, tmp_path)
    cfg = load_config("tiny", tiny_overrides + [f"student.pretrained_weights={json.dumps(path)}",
                                                "train.head_warmup_iters=1", "checkpointing.period=1",
                                                "checkpointing.max_to_keep=0", *extra])
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train(cfg, data_dir=image_dir, output_dir=full, max_iters=3)
    train(cfg, data_dir=image_dir, output_dir=part, max_iters=2)
    os.unlink(path)
    train(cfg, data_dir=image_dir, output_dir=part, max_iters=3, resume=True)
    with open(os.path.join(full, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    a, b = (load_checkpoint(os.path.join(run, "checkpoints", "checkpoint_00000003.pth"))["model"] for run in (full, part))
    return model.state_dict(), kwargs, cfg, full, rows, a, b


def test_pretrained_anchor_in_a_run_keeps_the_reference_and_resumes_exactly(tmp_path, image_dir, tiny_overrides):
    """A run from weights with an anchor so strong that lr * strength passes 1: every step lands the student backbone
    back on the weights (the heads train, the backbone had gradients: test_head_warmup_... shows it moves without
    the anchor); the reference holds the weights in the checkpoints, and a resume continues exactly (the reference
    comes from the checkpoint: the weights file is gone)."""
    src, _, _, full, rows, a, b = _interrupted_run_from_weights(
        tmp_path, image_dir, tiny_overrides, ["schedules.lr.warmup_iters=0", "optim.freeze_last_layer_iters=0",
                                              "train.pretrained_anchor=1e6"])
    assert rows[-1]["backbone_lr_factor"] == 1.0 and rows[-1]["backbone_grad_norm"] > 0
    for k, v in src.items():
        assert torch.equal(a["pretrained_reference." + k], v), k
        assert torch.equal(a["student.backbone." + k], v), k
    heads = [k for k in a if k.startswith("student.") and "_head." in k]
    first = load_checkpoint(os.path.join(full, "checkpoints", "checkpoint_00000001.pth"))["model"]
    assert sum(not torch.equal(first[k], a[k]) for k in heads) >= len(heads) - 2
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert load_config("tiny", ["train.pretrained_anchor=0"])["train"]["pretrained_anchor"] == 0
    with pytest.raises(ConfigError, match="train.pretrained_anchor"):
        load_config("tiny", ["train.pretrained_anchor=-1"])


# ------------------------------------------------------------------------------------------ train.feature_anchor
def test_feature_anchor_term_is_the_predictor_cosine_distance_to_the_starting_backbone(tmp_path, image_dir,
                                                                                       tiny_overrides):
    """The term against the formula, computed here from the two backbones' public forward: with the student equal to
    the weights and the predictor the identity it is 0; after moving both it is 1 - cos(W s + b, r) over the global
    crops' CLS tokens plus the same over their patch tokens, and the predictor's gradient is the loss weight times
    that term's (the predictor is used nowhere else)."""
    model, kwargs = _source()
    path = _write("backbone.pth", model, kwargs, tmp_path)
    cfg = load_config("tiny", tiny_overrides + [f"student.pretrained_weights={json.dumps(path)}",
                                                "train.feature_anchor=2.5", "ibot.mask_sample_probability=0"])
    torch.manual_seed(0)
    arch = SSLMetaArch(cfg)
    load_into_arch(arch, cfg)
    arch.eval()  # no RoPE augmentation or drop-path: the student's forward is the reference's
    from dinov3.train.data import BatchAugment, build_loader

    _, loader = build_loader(cfg, root=image_dir, rank=0, world_size=1, start_iter=0, end_iter=1)
    batch = BatchAugment(cfg, torch.device("cpu"))(next(iter(loader)), iteration=0, rank=0)
    assert not batch["masks"].any()
    _, losses = arch.forward_backward(batch, teacher_temp=0.05, iteration=0)
    assert abs(float(losses["feature_anchor_loss"])) < 1e-6

    proj = arch.student.anchor_proj
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in arch.student.backbone.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        proj.weight.add_(0.2 * torch.randn(proj.weight.shape, generator=g))
        proj.bias.add_(0.2 * torch.randn(proj.bias.shape, generator=g))
    arch.student.zero_grad(set_to_none=True)
    _, losses = arch.forward_backward(batch, teacher_temp=0.05, iteration=0)

    gl = batch["global_crops"].double()
    student = DinoVisionTransformer(**kwargs, attn_backend="reference").double().eval()
    student.load_state_dict(arch.student.backbone.state_dict())
    with torch.no_grad():
        s, r = student.forward_features(gl), model.double().forward_features(gl)
    W = proj.weight.detach().double().requires_grad_(True)
    b = proj.bias.detach().double().requires_grad_(True)
    cos = torch.nn.functional.cosine_similarity
    want = ((1 - cos(s["x_norm_clstoken"] @ W.T + b, r["x_norm_clstoken"], dim=-1)).mean()
            + (1 - cos(s["x_norm_patchtokens"] @ W.T + b, r["x_norm_patchtokens"], dim=-1)).mean())
    assert float(want.detach()) > 1e-3
    torch.testing.assert_close(losses["feature_anchor_loss"].double(), want.detach(), rtol=1e-4, atol=1e-6)
    gW, gb = torch.autograd.grad(2.5 * want, (W, b))
    torch.testing.assert_close(proj.weight.grad.double(), gW, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(proj.bias.grad.double(), gb, rtol=1e-3, atol=1e-6)
    assert arch.student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert arch.pretrained_reference.blocks[0].attn.qkv.weight.grad is None


def test_feature_anchor_in_a_run_resumes_exactly_and_stays_out_of_the_backbone(tmp_path, image_dir, tiny_overrides):
    """A run from weights with the anchor: the term is logged, the predictor and the starting backbone are in the
    checkpoints (the predictor trained, the reference unchanged), an interrupted run resumes exactly without the
    weights file, and backbone.pth holds the backbone alone."""
    src, kwargs, cfg, full, rows, a, b = _interrupted_run_from_weights(tmp_path, image_dir, tiny_overrides,
                                                                       ["train.feature_anchor=1"])
    assert all(r["feature_anchor_loss"] >= 0 for r in rows) and rows[-1]["feature_anchor_loss"] > 0
    assert rows[-1]["anchor_proj_grad_norm"] > 0
    for k, v in src.items():
        assert torch.equal(a["pretrained_reference." + k], v), k
    assert not torch.equal(a["student.anchor_proj.weight"], torch.eye(kwargs["embed_dim"]))
    assert "teacher.anchor_proj.weight" in a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    train(cfg, data_dir=image_dir, output_dir=full, resume=True)  # to the end: backbone.pth
    exported = torch.load(os.path.join(full, "backbone.pth"), weights_only=True)
    assert set(exported) == set(src)


def test_feature_anchor_config_errors():
    assert load_config("tiny")["train"]["feature_anchor"] == 0
    with pytest.raises(ConfigError, match="train.feature_anchor.*student.pretrained_weights"):
        load_config("tiny", ["train.feature_anchor=1"])
    with pytest.raises(ConfigError, match="train.feature_anchor"):
        load_config("tiny", ["train.feature_anchor=-1"])
