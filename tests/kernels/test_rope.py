"""RopePositionEmbedding against a formula-level float64 reimplementation written here."""

import math

import pytest
import torch

from dinov3_kernels import RopePositionEmbedding

FP32_ATOL = 2e-6  # angles up to 2 pi * 2 / min_period; sin/cos rounding in fp32


def formula_sincos(H, W, head_dim, *, periods, mode, shift=(0.0, 0.0), jitter=(1.0, 1.0), rescale=1.0):
    """sin/cos (H*W, head_dim) in float64, written out per token and per frequency."""
    n_freq = head_dim // 4
    if mode == "separate":
        dh, dw = H, W
    elif mode == "max":
        dh = dw = max(H, W)
    else:
        dh = dw = min(H, W)
    sin = torch.empty(H * W, head_dim, dtype=torch.float64)
    cos = torch.empty_like(sin)
    for r in range(H):
        for c in range(W):
            y = (2 * (r + 0.5) / dh - 1 + shift[0]) * jitter[0] * rescale
            x = (2 * (c + 0.5) / dw - 1 + shift[1]) * jitter[1] * rescale
            # angles for y then x, each over the n_freq periods; the same block fills both halves
            half = [2 * math.pi * y / p for p in periods] + [2 * math.pi * x / p for p in periods]
            assert len(half) == 2 * n_freq
            row = torch.tensor(half + half, dtype=torch.float64)
            sin[r * W + c] = row.sin()
            cos[r * W + c] = row.cos()
    return sin, cos


def base_periods(head_dim, base):
    return [base ** (4 * i / head_dim) for i in range(head_dim // 4)]


def minmax_periods(head_dim, lo, hi):
    n = head_dim // 4
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)] if n > 1 else [hi]


@pytest.mark.parametrize("mode", ["separate", "max", "min"])
@pytest.mark.parametrize("H,W", [(1, 1), (3, 5), (7, 4)])
def test_eval_matches_formula_base(mode, H, W):
    rope = RopePositionEmbedding(48, num_heads=2, base=100.0, normalize_coords=mode, dtype=torch.float64).eval()
    sin, cos = rope(H=H, W=W)
    esin, ecos = formula_sincos(H, W, 24, periods=base_periods(24, 100.0), mode=mode)
    assert sin.shape == cos.shape == (H * W, 24)
    torch.testing.assert_close(sin, esin, rtol=0, atol=1e-12)
    torch.testing.assert_close(cos, ecos, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["separate", "max"])
def test_eval_matches_formula_min_max_period(mode):
    rope = RopePositionEmbedding(
        64, num_heads=2, base=None, min_period=0.5, max_period=40.0, normalize_coords=mode, dtype=torch.float64
    ).eval()
    periods = minmax_periods(32, 0.5, 40.0)
    torch.testing.assert_close(rope.periods, torch.tensor(periods, dtype=torch.float64), rtol=1e-13, atol=0)
    sin, cos = rope(H=4, W=6)
    esin, ecos = formula_sincos(4, 6, 32, periods=periods, mode=mode)
    torch.testing.assert_close(sin, esin, rtol=0, atol=1e-12)
    torch.testing.assert_close(cos, ecos, rtol=0, atol=1e-12)


def test_fp32_default_dtype_close_to_float64():
    rope = RopePositionEmbedding(384, num_heads=6, base=100.0).eval()  # ViT-S head_dim 64
    assert rope.periods.dtype == torch.float32 and rope.periods.shape == (16,)
    sin, cos = rope(H=14, W=14)
    esin, ecos = formula_sincos(14, 14, 64, periods=base_periods(64, 100.0), mode="separate")
    assert sin.dtype == torch.float32
    torch.testing.assert_close(sin.double(), esin, rtol=0, atol=FP32_ATOL)
    torch.testing.assert_close(cos.double(), ecos, rtol=0, atol=FP32_ATOL)


def test_periods_buffer_is_persistent_and_loads():
    a = RopePositionEmbedding(64, num_heads=4, base=100.0)
    assert list(a.state_dict()) == ["periods"]
    b = RopePositionEmbedding(64, num_heads=4, base=7.0)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.periods, a.periods)


def test_eval_is_deterministic_even_with_augmentation_options():
    rope = RopePositionEmbedding(32, num_heads=2, shift_coords=0.5, jitter_coords=2.0, rescale_coords=2.0).eval()
    s1, c1 = rope(H=3, W=4)
    s2, c2 = rope(H=3, W=4)
    assert torch.equal(s1, s2) and torch.equal(c1, c2)
    s0, c0 = RopePositionEmbedding(32, num_heads=2).eval()(H=3, W=4)
    assert torch.equal(s1, s0) and torch.equal(c1, c0)


LONG_PERIODS = dict(base=None, min_period=10.0, max_period=100.0)


def _recover_coords(rope, H, W):
    """Coordinates seen by the module, from the angle of the shortest period (>= 10: atan2 is unambiguous)."""
    sin, cos = rope(H=H, W=W)
    n = rope.D_head // 4
    angle = torch.atan2(sin, cos)
    return angle[:, 0] / (2 * math.pi) * rope.periods[0], angle[:, n] / (2 * math.pi) * rope.periods[0]


def test_training_shift_is_uniform_per_axis_within_range():
    torch.manual_seed(0)
    s = 0.3
    rope = RopePositionEmbedding(32, num_heads=2, shift_coords=s, dtype=torch.float64, **LONG_PERIODS).train()
    base_y, base_x = _recover_coords(rope.eval(), 2, 3)
    rope.train()
    shifts = []
    for _ in range(200):
        y, x = _recover_coords(rope, 2, 3)
        dy, dx = y - base_y, x - base_x
        # one shift per axis, the same for every token
        assert torch.allclose(dy, dy[0].expand_as(dy), atol=1e-9)
        assert torch.allclose(dx, dx[0].expand_as(dx), atol=1e-9)
        shifts += [dy[0].item(), dx[0].item()]
    shifts = torch.tensor(shifts)
    assert shifts.abs().max() <= s + 1e-9
    assert shifts.min() < -0.8 * s and shifts.max() > 0.8 * s  # spans the range
    assert not torch.allclose(shifts[0::2], shifts[1::2])  # independent axes


@pytest.mark.parametrize("kind", ["jitter", "rescale"])
def test_training_scale_factors_log_uniform_within_bounds(kind):
    torch.manual_seed(1)
    f = 3.0
    kwargs = {"jitter_coords": f} if kind == "jitter" else {"rescale_coords": f}
    rope = RopePositionEmbedding(32, num_heads=2, dtype=torch.float64, **LONG_PERIODS, **kwargs)
    base_y, base_x = _recover_coords(rope.eval(), 2, 2)  # coords +-0.5
    rope.train()
    logs_y, logs_x = [], []
    for _ in range(300):
        y, x = _recover_coords(rope, 2, 2)
        ry, rx = y / base_y, x / base_x
        assert torch.allclose(ry, ry[0].expand_as(ry)) and torch.allclose(rx, rx[0].expand_as(rx))
        logs_y.append(math.log(ry[0].item()))
        logs_x.append(math.log(rx[0].item()))
    ly, lx = torch.tensor(logs_y), torch.tensor(logs_x)
    bound = math.log(f)
    assert ly.abs().max() <= bound + 1e-9 and lx.abs().max() <= bound + 1e-9
    assert ly.min() < -0.8 * bound and ly.max() > 0.8 * bound
    assert abs(ly.mean().item()) < 0.2 * bound  # uniform in log space, centred on 0
    if kind == "rescale":
        torch.testing.assert_close(ly, lx)  # one factor for both axes
    else:
        assert not torch.allclose(ly, lx)


def test_training_shift_then_jitter_then_rescale():
    """All three together, in the official order: coords' = (coords + shift) · jitter (per axis) · rescale (common),
    with the three drawn in that order (redrawn here from the same seed)."""
    s, j, r = 0.2, 1.5, 1.4
    rope = RopePositionEmbedding(32, num_heads=2, shift_coords=s, jitter_coords=j, rescale_coords=r,
                                 dtype=torch.float64, **LONG_PERIODS)
    base_y, base_x = _recover_coords(rope.eval(), 3, 2)
    rope.train()
    for seed in range(5):
        torch.manual_seed(seed)
        y, x = _recover_coords(rope, 3, 2)
        torch.manual_seed(seed)
        shift = torch.empty(2, dtype=torch.float64).uniform_(-s, s)
        jitter = torch.empty(2, dtype=torch.float64).uniform_(-math.log(j), math.log(j)).exp()
        rescale = torch.empty(1, dtype=torch.float64).uniform_(-math.log(r), math.log(r)).exp()
        torch.testing.assert_close(y, (base_y + shift[0]) * jitter[0] * rescale[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(x, (base_x + shift[1]) * jitter[1] * rescale[0], rtol=1e-9, atol=1e-9)


def test_training_without_augmentation_equals_eval():
    rope = RopePositionEmbedding(32, num_heads=2)
    s_train, c_train = rope.train()(H=2, W=5)
    s_eval, c_eval = rope.eval()(H=2, W=5)
    assert torch.equal(s_train, s_eval) and torch.equal(c_train, c_eval)


def test_bf16_dtype_buffer_and_output():
    rope = RopePositionEmbedding(64, num_heads=2, dtype=torch.bfloat16).eval()
    sin, cos = rope(H=3, W=3)
    assert rope.periods.dtype == sin.dtype == cos.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs,exc",
    [
        (dict(embed_dim=30, num_heads=2), ValueError),  # 30 % 8
        (dict(embed_dim=32, num_heads=2, base=None), ValueError),  # neither parametrization
        (dict(embed_dim=32, num_heads=2, min_period=1.0, max_period=10.0), ValueError),  # both
        (dict(embed_dim=32, num_heads=2, base=None, min_period=1.0), ValueError),  # half of min/max
        (dict(embed_dim=32, num_heads=2, base=None, min_period=10.0, max_period=1.0), ValueError),
        (dict(embed_dim=32, num_heads=2, base=-1.0), ValueError),
        (dict(embed_dim=32, num_heads=2, normalize_coords="both"), ValueError),
        (dict(embed_dim=32, num_heads=2, jitter_coords=0.5), ValueError),
        (dict(embed_dim=32, num_heads=2, rescale_coords=0.5), ValueError),
        (dict(embed_dim=32, num_heads=2, shift_coords=-0.1), ValueError),
        (dict(embed_dim=32, num_heads=2, dtype=torch.int32), TypeError),
    ],
)
def test_bad_arguments_raise(kwargs, exc):
    with pytest.raises(exc):
        RopePositionEmbedding(**kwargs)


@pytest.mark.parametrize("hw", [(0, 3), (3, -1), (2.0, 2)])
def test_bad_grid_raises(hw):
    rope = RopePositionEmbedding(32, num_heads=2)
    with pytest.raises(ValueError):
        rope(H=hw[0], W=hw[1])


def test_meta_device():
    rope = RopePositionEmbedding(64, num_heads=4, device="meta")
    assert rope.periods.is_meta
    sin, cos = rope(H=2, W=3)
    assert sin.shape == (6, 16) and sin.is_meta


# ---- tied half tables (what the model computes once per forward) ---------------------------------------------
AUG = dict(shift_coords=0.2, jitter_coords=1.5, rescale_coords=1.4)


@pytest.mark.parametrize("train", [False, True])
def test_tables_are_one_half_of_forward(train):
    """tables() equals either half of forward()'s (H·W, Dh) tables exactly, with the same draws in training."""
    rope = RopePositionEmbedding(96, num_heads=2, **AUG).train(train)  # Dh 48: Dh/4 = 12 frequencies
    torch.manual_seed(3)
    sin, cos = rope(H=3, W=5)
    torch.manual_seed(3)
    hs, hc = rope.tables(H=3, W=5)
    assert hs.shape == hc.shape == (15, 24)
    for full, half in ((sin, hs), (cos, hc)):
        assert torch.equal(full[:, :24], half) and torch.equal(full[:, 24:], half)


def test_tables_count_draws_one_augmentation_per_table():
    """count=n: n tables, each the formula at its own (shift, jitter, rescale), drawn as all shifts, then all
    jitters, then all rescales (redrawn here from the same seed); eval: one table repeated."""
    s, j, r = AUG["shift_coords"], AUG["jitter_coords"], AUG["rescale_coords"]
    rope = RopePositionEmbedding(32, num_heads=2, dtype=torch.float64, **AUG).train()
    torch.manual_seed(7)
    sin, cos = rope.tables(H=3, W=2, count=4)
    assert sin.shape == cos.shape == (4, 6, 8)
    torch.manual_seed(7)
    shift = torch.empty(4, 2, dtype=torch.float64).uniform_(-s, s)
    jitter = torch.empty(4, 2, dtype=torch.float64).uniform_(-math.log(j), math.log(j)).exp()
    rescale = torch.empty(4, 1, dtype=torch.float64).uniform_(-math.log(r), math.log(r)).exp()
    for i in range(4):
        esin, ecos = formula_sincos(3, 2, 16, periods=base_periods(16, 100.0), mode="separate",
                                    shift=shift[i].tolist(), jitter=jitter[i].tolist(), rescale=rescale[i].item())
        torch.testing.assert_close(sin[i], esin[:, :8], rtol=0, atol=1e-12)
        torch.testing.assert_close(cos[i], ecos[:, :8], rtol=0, atol=1e-12)
    assert not torch.equal(sin[0], sin[1])
    esin, ecos = rope.eval().tables(H=3, W=2)
    es, ec = rope.tables(H=3, W=2, count=4)
    assert es.shape == (4, 6, 8) and all(torch.equal(es[i], esin) and torch.equal(ec[i], ecos) for i in range(4))
    with pytest.raises(ValueError, match="count"):
        rope.tables(H=3, W=2, count=0)
