"""DinoVisionTransformer: sizes, official layout, masks, crops, intermediate layers, backends, bad input."""

import math

import pytest
import torch

import dinov3_kernels
from dinov3.models import (
    ARCHS,
    DinoVisionTransformer,
    vit_7b,
    vit_base,
    vit_huge_plus,
    vit_large,
    vit_large_plus,
    vit_small,
    vit_small_plus,
)

FP32_ATOL = 1e-5
# Attention tolerance for fp32 kernels vs the eager path (different summation order, exp2 softmax).
ATTN_FP32_ATOL = 1e-4


def tiny(**kw):
    base = dict(embed_dim=32, depth=3, num_heads=2, patch_size=8, attn_backend="reference")
    base.update(kw)
    return vit_small(**base)


# ------------------------------------------------------------------------------------ sizes
def official_param_count(C, depth, ffn, ratio, *, qkv_bias=True, n_storage=4, patch=16, align=8, local_norm=False):
    """Parameter count of the official architecture, from its layer formulas."""
    if ffn == "mlp":
        h = int(C * ratio)
        ffn_params = C * h + h + h * C + C  # fc1, fc2 with biases
    else:
        d = int(int(C * ratio) * 2 / 3)
        h = math.ceil(d / align) * align
        ffn_params = 2 * (C * h + h) + h * C + C  # w1, w2, w3 with biases
    attn = 3 * C * C + (3 * C if qkv_bias else 0) + C * C + C
    block = 2 * 2 * C + attn + 2 * C + ffn_params  # 2 LayerNorms, attention, 2 LayerScales, FFN
    embed = 3 * patch * patch * C + C + C + n_storage * C + C  # conv, cls, storage, mask token
    final_norms = 2 * C * (2 if local_norm else 1)
    return embed + depth * block + final_norms


# name: (constructor, formula count, published count in millions (DINOv3 model card))
SIZES = {
    "vit_small": (vit_small, official_param_count(384, 12, "mlp", 4), 21),
    "vit_small_plus": (vit_small_plus, official_param_count(384, 12, "swiglu", 6), 29),
    "vit_base": (vit_base, official_param_count(768, 12, "mlp", 4), 86),
    "vit_large": (vit_large, official_param_count(1024, 24, "mlp", 4), 300),
    "vit_large_plus": (vit_large_plus, official_param_count(1024, 24, "swiglu", 6), None),
    "vit_huge_plus": (vit_huge_plus, official_param_count(1280, 32, "swiglu", 6), 840),
    "vit_7b": (vit_7b, official_param_count(4096, 40, "swiglu", 3, qkv_bias=False, align=64, local_norm=True), 6716),
}


@pytest.mark.parametrize("name", list(SIZES))
def test_parameter_count_matches_official(name):
    ctor, expected, published_m = SIZES[name]
    model = ctor(device="meta")
    assert all(p.is_meta for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert n == expected
    if published_m is not None:
        assert abs(n / 1e6 - published_m) / published_m < 0.035
    assert ARCHS[name] is ctor


def test_meta_context_manager_builds_7b_layout():
    with torch.device("meta"):
        model = vit_7b()
    sd = model.state_dict()
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * 4096, 4096)
    assert "blocks.0.attn.qkv.bias" not in sd and "blocks.0.attn.qkv.bias_mask" not in sd  # qkv_bias=False
    assert sd["blocks.39.mlp.w1.weight"].shape == (8192, 4096)  # int(2/3 * 12288) aligned to 64
    assert sd["local_cls_norm.weight"].shape == (4096,) and "cls_norm.weight" not in sd
    assert sd["rope_embed.periods"].shape == (32,)


def test_state_dict_layout_vit_small():
    sd = vit_small(device="meta").state_dict()
    expected_top = {
        "cls_token": (1, 1, 384), "storage_tokens": (1, 4, 384), "mask_token": (1, 384),
        "patch_embed.proj.weight": (384, 3, 16, 16), "patch_embed.proj.bias": (384,),
        "rope_embed.periods": (16,), "norm.weight": (384,), "norm.bias": (384,),
    }
    per_block = {
        "norm1.weight": (384,), "norm1.bias": (384,), "attn.qkv.weight": (1152, 384), "attn.qkv.bias": (1152,),
        "attn.qkv.bias_mask": (1152,), "attn.proj.weight": (384, 384), "attn.proj.bias": (384,),
        "ls1.gamma": (384,), "norm2.weight": (384,), "norm2.bias": (384,), "mlp.fc1.weight": (1536, 384),
        "mlp.fc1.bias": (1536,), "mlp.fc2.weight": (384, 1536), "mlp.fc2.bias": (384,), "ls2.gamma": (384,),
    }
    expected = dict(expected_top)
    for i in range(12):
        expected.update({f"blocks.{i}.{k}": v for k, v in per_block.items()})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_init_values_and_rope_settings_as_released():
    m = vit_small(embed_dim=32, depth=1, num_heads=2)
    blk = m.blocks[0]
    assert torch.all(blk.ls1.gamma == 1e-5)
    assert blk.norm1.eps == 1e-5  # "layernormbf16"
    mask = blk.attn.qkv.bias_mask
    assert torch.equal(mask, torch.cat([torch.ones(32), torch.zeros(32), torch.ones(32)]))
    assert m.rope_embed.rescale_coords == 2 and m.rope_embed.dtype == torch.float32
    assert torch.all(m.mask_token == 0)


# ----------------------------------------------------------------------------- forward paths
def test_reference_path_matches_manual_block_math():
    """One block written out by hand (eager formula) against the model."""
    torch.manual_seed(0)
    m = tiny(depth=1, n_storage_tokens=2).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 3, 16, 24)
    blk, C, h = m.blocks[0], 32, 2
    d = C // h
    with torch.no_grad():
        tok = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([m.cls_token.expand(2, -1, -1), m.storage_tokens.expand(2, -1, -1), tok], 1)
        y = torch.nn.functional.layer_norm(t, (C,), blk.norm1.weight, blk.norm1.bias, 1e-5)
        bias = blk.attn.qkv.bias.clone()
        bias[C:2 * C] = 0
        q, k, v = (y @ blk.attn.qkv.weight.T + bias).split(C, -1)
        sin, cos = m.rope_embed(H=2, W=3)
        outs = []
        for head in range(h):
            qh, kh, vh = (z[..., head * d:(head + 1) * d].clone() for z in (q, k, v))
            for z in (qh, kh):
                p = z[:, 3:]
                rot = torch.cat([-p[..., d // 2:], p[..., :d // 2]], -1)
                z[:, 3:] = p * cos + rot * sin
            a = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), -1)
            outs.append(a @ vh)
        t = t + blk.ls1.gamma * (torch.cat(outs, -1) @ blk.attn.proj.weight.T + blk.attn.proj.bias)
        y = torch.nn.functional.layer_norm(t, (C,), blk.norm2.weight, blk.norm2.bias, 1e-5)
        f = torch.nn.functional.gelu(y @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T
        t = t + blk.ls2.gamma * (f + blk.mlp.fc2.bias)
        out = m.forward_features(x)
    torch.testing.assert_close(out["x_prenorm"], t, rtol=0, atol=FP32_ATOL)
    normed = torch.nn.functional.layer_norm(t, (C,), m.norm.weight, m.norm.bias, 1e-5)
    torch.testing.assert_close(out["x_norm_clstoken"], normed[:, 0], rtol=0, atol=FP32_ATOL)
    torch.testing.assert_close(out["x_storage_tokens"], normed[:, 1:3], rtol=0, atol=FP32_ATOL)
    torch.testing.assert_close(out["x_norm_patchtokens"], normed[:, 3:], rtol=0, atol=FP32_ATOL)
    torch.testing.assert_close(m(x), normed[:, 0], rtol=0, atol=FP32_ATOL)


def test_masks_replace_patches_with_mask_token():
    torch.manual_seed(0)
    m = tiny().eval()
    with torch.no_grad():
        m.mask_token.normal_()
    x = torch.randn(2, 3, 16, 16)
    masks = torch.tensor([[True, False, False, True], [False, False, False, False]])
    tokens, hw = m.prepare_tokens_with_masks(x, masks)
    assert hw == (2, 2)
    plain, _ = m.prepare_tokens_with_masks(x)
    prefix = 1 + m.n_storage_tokens
    for b in range(2):
        for i in range(4):
            expected = m.mask_token[0] if masks[b, i] else plain[b, prefix + i]
            torch.testing.assert_close(tokens[b, prefix + i], expected)
    # all patches masked: the output no longer depends on the image
    full = torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        a = m.forward_features(x, masks=full)
        b = m.forward_features(torch.randn(2, 3, 16, 16), masks=full)
    torch.testing.assert_close(a["x_norm_clstoken"], b["x_norm_clstoken"])
    assert a["masks"] is full
    with pytest.raises(ValueError, match="masks"):
        m.forward_features(x, masks=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        m.forward_features(x, masks=torch.ones(2, 4))


def test_list_of_crops_equals_separate_calls():
    torch.manual_seed(0)
    m = tiny(untie_cls_and_patch_norms=True).eval()
    g, l = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 8)
    mg = torch.rand(2, 16) > 0.5
    with torch.no_grad():
        outs = m.forward_features([g, l], [mg, None])
        sep = [m.forward_features(g, mg), m.forward_features(l)]
        cls = m([g, l], [mg, None])
    assert len(outs) == 2
    for o, s in zip(outs, sep):
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(o[key], s[key], rtol=0, atol=FP32_ATOL)
    assert outs[1]["x_norm_patchtokens"].shape == (3, 2, 32)
    torch.testing.assert_close(cls[1], sep[1]["x_norm_clstoken"], rtol=0, atol=FP32_ATOL)


def test_untied_local_cls_norm_applies_to_second_crop_in_training_only():
    torch.manual_seed(0)
    m = tiny(depth=1, untie_global_and_local_cls_norm=True)
    with torch.no_grad():
        m.local_cls_norm.weight.fill_(3.0)
    g, l = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
    m.train()
    with torch.no_grad():
        torch.manual_seed(1)
        train = m.forward_features([g, l], None)
    x = train[1]["x_prenorm"][:, 0]
    expected = torch.nn.functional.layer_norm(x, (32,), m.local_cls_norm.weight, m.local_cls_norm.bias, 1e-5)
    torch.testing.assert_close(train[1]["x_norm_clstoken"], expected)
    m.eval()
    with torch.no_grad():
        ev = m.forward_features([g, l], None)
    x = ev[1]["x_prenorm"][:, 0]
    expected = torch.nn.functional.layer_norm(x, (32,), m.norm.weight, m.norm.bias, 1e-5)
    torch.testing.assert_close(ev[1]["x_norm_clstoken"], expected)


def test_get_intermediate_layers():
    torch.manual_seed(0)
    m = tiny(depth=4).eval()
    x = torch.randn(2, 3, 24, 16)
    with torch.no_grad():
        last = m.forward_features(x)
        (p,) = m.get_intermediate_layers(x)
        torch.testing.assert_close(p, last["x_norm_patchtokens"])
        (raw,) = m.get_intermediate_layers(x, norm=False)
        torch.testing.assert_close(raw, last["x_prenorm"][:, 5:])
        outs = m.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True, return_extra_tokens=True)
        assert len(outs) == 2
        for patches, cls, extra in outs:
            assert patches.shape == (2, 32, 3, 2) and cls.shape == (2, 32) and extra.shape == (2, 4, 32)
        torch.testing.assert_close(outs[1][0].permute(0, 2, 3, 1).reshape(2, 6, 32), last["x_norm_patchtokens"])
        torch.testing.assert_close(outs[1][1], last["x_norm_clstoken"])
        by_index = m.get_intermediate_layers(x, n=[0, 2], return_class_token=True)
        assert len(by_index) == 2 and by_index[0][0].shape == (2, 6, 32)
        torch.testing.assert_close(by_index[1][0], outs[0][0].permute(0, 2, 3, 1).reshape(2, 6, 32))
    with pytest.raises(ValueError):
        m.get_intermediate_layers(x, n=5)
    with pytest.raises(ValueError):
        m.get_intermediate_layers(x, n=[4])


def test_forward_is_training_returns_dict_and_head():
    m = tiny().eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        d = m(x, is_training=True)
        assert set(d) == {"x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm", "masks"}
        m.head = torch.nn.Linear(32, 5)
        assert m(x).shape == (1, 5)


def test_rope_augmentation_only_in_training():
    torch.manual_seed(0)
    m = tiny(pos_embed_rope_shift_coords=0.5, pos_embed_rope_jitter_coords=2.0, layerscale_init=1.0)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        m.eval()
        e1, e2 = m(x), m(x)
        m.train()
        t1, t2 = m(x), m(x)
    assert torch.equal(e1, e2)
    assert not torch.allclose(t1, t2) and not torch.allclose(t1, e1)


def test_rope_tables_computed_once_per_forward(monkeypatch):
    """One RoPE computation per crop and forward (not per block), tied (H·W, Dh/2) tables reaching the attention;
    in training with augmentation each block still gets its own draw."""
    m = tiny(depth=3, pos_embed_rope_shift_coords=0.5, layerscale_init=1.0)
    calls, seen = [], []
    tables = m.rope_embed.tables

    def counted(**kw):
        calls.append(kw)
        return tables(**kw)

    monkeypatch.setattr(m.rope_embed, "tables", counted)
    monkeypatch.setattr(m.rope_embed, "forward", lambda **kw: pytest.fail("per-block RoPE computation"))
    for blk in m.blocks:
        orig = blk.attn.compute_attention
        monkeypatch.setattr(blk.attn, "compute_attention",
                            lambda qkv, rope, orig=orig: seen.append(rope) or orig(qkv, rope))
    crops = [torch.randn(2, 3, 16, 24), torch.randn(2, 3, 8, 8)]
    with torch.no_grad():
        m.eval()(crops, is_training=True)
        assert [c.get("count") for c in calls] == [None, None] and len(seen) == 3 * 2
        assert seen[0][0].shape == (6, 8) and seen[1][0].shape == (1, 8)  # tied halves of Dh = 16
        assert all(seen[i][0] is seen[0][0] for i in range(0, 6, 2))  # shared by the blocks
        calls.clear(), seen.clear()
        m.train()(crops, is_training=True)
        assert [c.get("count") for c in calls] == [3, 3] and len(seen) == 6
        assert not torch.equal(seen[0][0], seen[2][0]) and not torch.equal(seen[2][0], seen[4][0])
        calls.clear()
        m.eval().get_intermediate_layers(crops[0], n=2)
        assert len(calls) == 1


def test_eval_outputs_identical_to_per_block_official_tables():
    """The tied tables computed once give bit-identical outputs to the official per-block full (H·W, Dh) tables."""
    torch.manual_seed(0)
    m = tiny(depth=2, n_storage_tokens=2, layerscale_init=1.0).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        x = torch.randn(2, 3, 16, 24)
        t, (H, W) = m.prepare_tokens_with_masks(x)
        for blk in m.blocks:
            t = blk(t, m.rope_embed(H=H, W=W))
        assert torch.equal(m.forward_features(x)["x_prenorm"], t)


def test_drop_path_matches_official_subset_rule():
    """Each branch is added to a random subset of max(int(B(1-p)), 1) samples, scaled by B / subset."""
    torch.manual_seed(0)
    m = tiny(depth=1, drop_path_rate=0.75)
    blk = m.blocks[0].train()
    x = torch.randn(4, 5, 32)
    torch.manual_seed(123)
    got = blk(x)
    torch.manual_seed(123)
    idx1 = torch.randperm(4)[:1]
    idx2 = torch.randperm(4)[:1]
    with torch.no_grad():
        blk.eval()  # eval-mode pieces to build the expectation
        exp = x.clone()
        exp[idx1] += 4 * blk.ls1(blk.attn(blk.norm1(x[idx1])))
        exp[idx2] += 4 * blk.ls2(blk.mlp(blk.norm2(exp[idx2])))
    torch.testing.assert_close(got, exp, rtol=0, atol=FP32_ATOL)
    untouched = [i for i in range(4) if i not in (idx1.item(), idx2.item())]
    assert torch.equal(got[untouched], x[untouched])
    # eval: no drop, deterministic
    torch.testing.assert_close(blk(x), blk(x))


def test_gradients_reach_every_parameter():
    m = tiny(depth=2).train()
    out = m([torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)], [torch.rand(2, 4) > 0.5, None], is_training=True)
    loss = sum(o["x_norm_clstoken"].sum() + o["x_norm_patchtokens"].pow(2).sum() for o in out)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert missing == []


def test_bf16_autocast():
    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m.forward_features(x)
            (inter,) = m.get_intermediate_layers(x)
    assert out["x_norm_clstoken"].dtype in (torch.bfloat16, torch.float32)
    assert torch.isfinite(out["x_norm_patchtokens"].float()).all() and torch.isfinite(inter.float()).all()
    torch.testing.assert_close(out["x_norm_clstoken"].float(), ref, rtol=0.05, atol=0.1)


@pytest.mark.parametrize("n_storage", [0, 4])
def test_math_attention_matches_reference(n_storage):
    # "math" writes softmax(q k^T / sqrt(d)) v as matmuls (what the ONNX export traces); same outputs as SDPA.
    ref = tiny(n_storage_tokens=n_storage).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    math_model = tiny(n_storage_tokens=n_storage, attn_backend="math").eval()
    math_model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        a, b = ref.forward_features(x), math_model.forward_features(x)
    for k in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens"):
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=FP32_ATOL)


def test_attn_backend_auto_uses_reference_on_cpu(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("fused path taken on CPU with attn_backend='auto'")

    monkeypatch.setattr(dinov3_kernels, "rope_attention", boom, raising=False)
    m = tiny(attn_backend="auto").eval()
    with torch.no_grad():
        m(torch.randn(1, 3, 16, 16))
    fused = tiny(attn_backend="fused").eval()
    with pytest.raises(AssertionError, match="fused path"):
        fused(torch.randn(1, 3, 16, 16))




@pytest.mark.parametrize("n_storage", [0, 4])
def test_fused_reference_backend_agree(n_storage):
    torch.manual_seed(0)
    ref = tiny(depth=2, n_storage_tokens=n_storage).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = tiny(depth=2, n_storage_tokens=n_storage, attn_backend="fused").eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 24, 16)
    with torch.no_grad():
        a = ref.forward_features(x)
        b = fused.forward_features(x)
    torch.testing.assert_close(b["x_prenorm"], a["x_prenorm"], rtol=0, atol=ATTN_FP32_ATOL)


def test_fused_triton_kernel_agrees_with_reference(triton_cpu, monkeypatch):
    """The model's fused path on the Triton kernels (interpreter on CPU), forward and backward, fp32."""
    calls = []
    orig = dinov3_kernels.rope_attention

    def triton_rope_attention(*args, **kwargs):
        calls.append(kwargs["num_prefix_tokens"])
        return orig(*args, **{**kwargs, "backend": "triton"})

    monkeypatch.setattr(dinov3_kernels, "rope_attention", triton_rope_attention)
    torch.manual_seed(0)
    ref = tiny(depth=1, layerscale_init=1.0).train()
    fused = tiny(depth=1, layerscale_init=1.0, attn_backend="fused").train()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 24, 16)
    outs = []
    for m in (ref, fused):
        torch.manual_seed(1)  # same RoPE augmentation draws
        out = m.forward_features(x, masks=torch.rand(2, 6) > 0.5)["x_prenorm"]
        out.pow(2).sum().backward()
        outs.append(out.detach())
    assert calls == [5]  # CLS + 4 storage tokens are not rotated
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=ATTN_FP32_ATOL)
    for (name, p_ref), p_fused in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p_fused.grad, p_ref.grad, rtol=1e-3, atol=ATTN_FP32_ATOL, msg=name)


# -------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    m = tiny().eval()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        m(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="floating"):
        m(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="crops"):
        m.forward_features([torch.randn(1, 3, 16, 16)], [None, None])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(norm_layer="batchnorm"),
        dict(ffn_layer="swiglu7"),
        dict(pos_embed_rope_dtype="fp64"),
        dict(attn_backend="flash"),
        dict(embed_dim=30, num_heads=2),  # not divisible by 4 * heads
        dict(drop_path_rate=1.0),
        dict(pos_embed_rope_min_period=1.0, pos_embed_rope_max_period=10.0),  # base also given (official rule)
    ],
)
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        DinoVisionTransformer(**{**dict(embed_dim=32, depth=1, num_heads=2), **kwargs})


def test_min_max_period_rope_and_rmsnorm_variants_run():
    m = DinoVisionTransformer(embed_dim=32, depth=1, num_heads=2, patch_size=8, pos_embed_rope_base=None,
                              pos_embed_rope_min_period=0.5, pos_embed_rope_max_period=50.0, norm_layer="rmsnorm",
                              ffn_layer="swiglu128", layerscale_init=None, n_storage_tokens=0).eval()
    assert "blocks.0.ls1.gamma" not in m.state_dict() and "norm.bias" not in m.state_dict()
    assert m.blocks[0].mlp.w1.out_features == 128
    with torch.no_grad():
        out = m.forward_features(torch.randn(1, 3, 16, 16))
    assert out["x_storage_tokens"].shape == (1, 0, 32)


# ------------------------------------------------------------------------------------------ GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_cuda_auto_picks_fused_and_matches_reference_bf16():
    torch.manual_seed(0)
    ref = vit_small(embed_dim=128, depth=2, num_heads=2, attn_backend="reference").cuda().eval()
    auto = vit_small(embed_dim=128, depth=2, num_heads=2, attn_backend="auto").cuda().eval()
    auto.load_state_dict(ref.state_dict())
    qkv = torch.zeros(1, 2, 384, device="cuda")
    assert auto.blocks[0].attn._use_fused(qkv, (torch.zeros(1, 64, device="cuda"),) * 2)
    x = torch.randn(2, 3, 224, 160, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a = ref.forward_features(x)["x_prenorm"].float()
        b = auto.forward_features(x)["x_prenorm"].float()
    with torch.no_grad():
        exact = ref.double().forward_features(x.double())["x_prenorm"]
    # fused error at most 2x that of the eager bf16 computation (+ a floor for near-zero errors)
    err_ref = (a - exact).abs().max().item()
    assert (b - exact).abs().max().item() <= 2 * err_ref + 1e-3


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_autocast_reference():
    torch.manual_seed(0)
    m = vit_small(embed_dim=128, depth=2, num_heads=2, attn_backend="reference").cuda().eval()
    x = torch.randn(2, 3, 64, 96, device="cuda")
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.1)
