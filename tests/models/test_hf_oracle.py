"""Hugging Face transformers' DINOv3ViTModel as an outside oracle, via dinov3.models.convert."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DINOv3ViTConfig, DINOv3ViTModel  # noqa: E402

from dinov3.models import DinoVisionTransformer, load_pretrained, vit_small  # noqa: E402
from dinov3.models.convert import (  # noqa: E402
    dinov3_kwargs_from_hf_config,
    from_hf_state_dict,
    hf_config_kwargs,
    to_hf_state_dict,
)

FP32_ATOL = 1e-5


def _randomize(model, std=0.2):
    # Non-trivial values everywhere (default init has zero biases and unit norms that would hide mix-ups).
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _tokens(out):
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_storage_tokens"], out["x_norm_patchtokens"]], 1)


@pytest.mark.parametrize("gated", [False, True])
def test_hf_to_official_matches_hf_outputs(gated):
    cfg = DINOv3ViTConfig(
        hidden_size=32, intermediate_size=64 if gated else 96, num_hidden_layers=2, num_attention_heads=2,
        num_register_tokens=3, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu", image_size=32,
        patch_size=8,
    )
    hf = _randomize(DINOv3ViTModel(cfg)).eval()
    ours = DinoVisionTransformer(**dinov3_kwargs_from_hf_config(cfg), attn_backend="reference").eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), num_heads=2, rope_base=cfg.rope_theta), strict=True)
    x = torch.randn(2, 3, 24, 40)  # non-square, not the config's image size
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state
        got = _tokens(ours.forward_features(x))
    torch.testing.assert_close(got, expected, rtol=0, atol=FP32_ATOL)
    # the RoPE periods were rebuilt, the k bias restored as zeros under a mask
    assert torch.equal(ours.blocks[0].attn.qkv.bias_mask[32:64], torch.zeros(32))


@pytest.mark.parametrize("arch_kwargs", [dict(ffn_layer="mlp"), dict(ffn_layer="swiglu", ffn_ratio=3.0)])
def test_official_to_hf_matches_our_outputs(arch_kwargs):
    ours = _randomize(vit_small(embed_dim=32, depth=2, num_heads=2, patch_size=8, **arch_kwargs))
    ours.attn_backend = "reference"
    ours.eval()
    # the released k-bias mask must be honoured: the checkpoint's k bias is non-zero but unused
    assert ours.blocks[0].attn.qkv.bias[32:64].abs().sum() > 0
    cfg = DINOv3ViTConfig(**hf_config_kwargs(ours))
    hf = DINOv3ViTModel(cfg).eval()
    # transformers >= 5 nests the layers under "model."; the hub files (and 4.x) use "layer." directly
    prefix = "model.layer." if any(k.startswith("model.layer.") for k in hf.state_dict()) else "layer."
    hf_sd = to_hf_state_dict(ours.state_dict(), layer_prefix=prefix)
    assert set(hf_sd) == set(hf.state_dict())
    hf.load_state_dict(hf_sd, strict=True)
    x = torch.randn(1, 3, 40, 16)
    with torch.no_grad():
        expected = _tokens(ours.forward_features(x))
        got = hf(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=FP32_ATOL)


def test_round_trip_and_hub_layer_prefix():
    ours = _randomize(vit_small(embed_dim=32, depth=2, num_heads=2))
    sd = ours.state_dict()
    # the hub files use "layer.N." (transformers 5 renames to "model.layer.N."): both convert back
    for prefix in ("model.layer.", "layer."):
        hf_sd = to_hf_state_dict(sd, layer_prefix=prefix)
        back = from_hf_state_dict(hf_sd, num_heads=2)
        assert set(back) == set(sd)
        for k in sd:
            if k.endswith("qkv.bias"):
                # the masked k bias is dropped by design: compare effective biases
                mask = sd[k.replace("bias", "bias_mask")]
                torch.testing.assert_close(back[k] * mask, sd[k] * mask, rtol=0, atol=0)
            else:
                torch.testing.assert_close(back[k], sd[k], rtol=0, atol=0)


def test_load_pretrained_accepts_hf_safetensors(tmp_path):
    from safetensors.torch import save_file

    src = _randomize(vit_small(embed_dim=32, depth=1, num_heads=2)).eval()
    path = tmp_path / "hf.safetensors"
    save_file({k: v.contiguous() for k, v in to_hf_state_dict(src.state_dict(), layer_prefix="layer.").items()},
              str(path))
    dst = load_pretrained(vit_small(embed_dim=32, depth=1, num_heads=2).eval(), path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_inexpressible_models_raise():
    m = vit_small(embed_dim=32, depth=1, num_heads=2, untie_cls_and_patch_norms=True)
    with pytest.raises(ValueError, match="untie"):
        to_hf_state_dict(m.state_dict())
    with pytest.raises(ValueError, match="untie"):
        hf_config_kwargs(m)
    m = vit_small(embed_dim=32, depth=1, num_heads=2, norm_layer="rmsnorm")
    with pytest.raises(ValueError, match="RMSNorm"):
        to_hf_state_dict(m.state_dict())
