import pytest
import torch

from dinov3.models import DinoVisionTransformer
from dinov3.train.heads import DINOHead
from dinov3.train.param_groups import apply_optim_schedule, build_param_groups, param_group_specs
from dinov3.train.ssl_arch import StudentNet


def _student():
    bb = DinoVisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=3, num_heads=2, n_storage_tokens=2,
                               layerscale_init=1e-5, mask_k_bias=True)
    return StudentNet(bb, DINOHead(16, 10, hidden_dim=8, bottleneck_dim=4), DINOHead(16, 10, hidden_dim=8,
                                                                                   bottleneck_dim=4))


def test_layerwise_decay_patch_embed_and_no_decay_rules():
    specs = {s["name"]: s for s in param_group_specs(_student().backbone, layerwise_decay=0.5,
                                                     patch_embed_lr_mult=0.2)}
    # 3 blocks: tokens/embeddings are layer 0 -> 0.5**4; block i -> 0.5**(3 - i); final norm -> 1.
    assert specs["cls_token"]["lr_multiplier"] == pytest.approx(0.5 ** 4)
    assert specs["patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.5 ** 4 * 0.2)
    assert specs["blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.5 ** 3)
    assert specs["blocks.2.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(0.5 ** 1)
    assert specs["norm.weight"]["lr_multiplier"] == pytest.approx(1.0)
    for name, s in specs.items():
        no_decay = (name.endswith("bias") or "norm" in name or "token" in name or name.endswith("gamma"))
        assert (s["wd_multiplier"] == 0.0) == no_decay, name


def test_groups_cover_every_trainable_parameter_once_and_schedule_applies():
    student = _student()
    groups = build_param_groups(student, {"layerwise_decay": 0.9, "patch_embed_lr_mult": 0.2})
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in student.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(groups, lr=0.0)
    apply_optim_schedule(opt, lr=1.0, wd=0.1, last_layer_lr=0.0)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.0 if g["is_last_layer"] else g["lr_multiplier"])
        assert g["weight_decay"] == pytest.approx(0.1 * g["wd_multiplier"])
    assert any(g["is_last_layer"] for g in opt.param_groups)
