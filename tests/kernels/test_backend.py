"""The backend choice: the auto table (dinov3_kernels/auto_table.json) and how choose_backend reads it."""

import json
import os
import sys

import pytest
import torch

from dinov3_kernels import _backend
from dinov3_kernels import attention, gram, head_loss, koleo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPS = ("gram_loss", "koleo_loss", "rope_attention", "apply_rope", "dino_head_loss", "ibot_head_loss")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def test_every_op_and_dtype_has_a_row_for_every_size():
    table = _backend.auto_table()
    assert set(table["sizes"]) == set(OPS)
    for op in OPS:
        for name, dtype in DTYPES.items():
            rows = _backend._rows(op, name)
            assert rows and rows[-1]["max_size"] is None, (op, name)  # the last bucket is unbounded
            bounds = [r["max_size"] for r in rows[:-1]]
            assert bounds == sorted(set(bounds)), (op, name, bounds)
            for size in (1, 257, 1029, 10**7):
                assert _backend.auto_row(op, dtype, size) in rows
    for row in table["rows"]:
        assert row["order"] and set(row["order"]) <= set(_backend.BACKENDS), row
        assert row["order"][-1] != "reference", row  # the reference heads a row or is absent (it is the fallback)
        assert len(set(row["order"])) == len(row["order"]), row
        assert row["source"].startswith(("predicted", "measured")), row


def test_the_committed_table_is_what_the_roofline_writes():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import roofline
    finally:
        sys.path.pop(0)
    with open(_backend.AUTO_TABLE_PATH) as f:
        committed = json.load(f)
    assert roofline.auto_table(committed) == committed, (
        "dinov3_kernels/auto_table.json is stale: run `python benchmarks/roofline.py --auto-table`")


def test_size_selects_the_bucket():
    rows = _backend._rows("gram_loss", "float32")
    assert len(rows) >= 2
    first = rows[0]["max_size"]
    assert _backend.auto_row("gram_loss", torch.float32, first) is rows[0]
    assert _backend.auto_row("gram_loss", torch.float32, first + 1) is rows[1]
    assert _backend.auto_row("gram_loss", torch.float32, None) is rows[-1]
    assert _backend.auto_order("no_such_op", torch.float32, 5) == _backend.DEFAULT_ORDER


@pytest.fixture
def as_on_gpu(monkeypatch):
    """choose_backend as on a GPU machine where only the backends in `can_run` can run."""
    can_run = set(_backend.BACKENDS)

    def why_not(backend, tensors, op_check=None):
        return None if backend in can_run else f"{backend} not here"

    monkeypatch.setattr(_backend, "why_not", why_not)
    x = torch.empty(2, 3, device="meta")
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")))
    return can_run, x


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_auto_takes_the_first_available_backend_of_the_row_or_falls_back(as_on_gpu, op, dtype):
    can_run, x = as_on_gpu
    order = _backend.auto_order(op, dtype, 300)
    assert _backend.choose_backend("auto", (x,), None, op, size=300, dtype=dtype) == order[0]
    can_run.discard(order[0])
    expected = order[1] if len(order) > 1 else "reference"
    assert _backend.choose_backend("auto", (x,), None, op, size=300, dtype=dtype) == expected
    can_run.clear()
    can_run.add("reference")
    assert _backend.choose_backend("auto", (x,), None, op, size=300, dtype=dtype) == "reference"


def test_deterministic_mode_passes_over_atomic_backends(as_on_gpu):
    _, x = as_on_gpu
    order = _backend.auto_order("gram_loss", torch.float32, 300)
    torch.use_deterministic_algorithms(True)
    try:
        got = _backend.choose_backend("auto", (x,), None, "gram_loss", atomics=(order[0],), size=300)
    finally:
        torch.use_deterministic_algorithms(False)
    assert got == (order[1] if len(order) > 1 else "reference")


def test_the_public_functions_ask_the_table_with_their_op_name_and_size(monkeypatch):
    seen = []
    real = _backend.choose_backend

    def spy(requested, tensors, op_check=None, op_name="op", atomics=(), size=None, dtype=None, cpu_auto="reference"):
        seen.append((op_name, size))
        return real(requested, tensors, op_check, op_name, atomics, size, dtype, cpu_auto)

    monkeypatch.setattr(_backend, "choose_backend", spy)
    B, N, D, H = 2, 7, 32, 2
    gram.gram_loss(torch.randn(B, N, D), torch.randn(B, N, D))
    gram.gram_loss(torch.randn(B, N, D), torch.randn(B, N, D), img_level=False)
    koleo.koleo_loss(torch.randn(9, D))
    qkv, sin, cos = torch.randn(B, N, 3 * D), torch.randn(4, D // H), torch.randn(4, D // H)
    attention.rope_attention(qkv, sin, cos, num_heads=H)
    q = torch.randn(B, H, N, D // H)
    attention.apply_rope(q, q, sin, cos)
    zs, zt, W = torch.randn(6, 8), torch.randn(2, 8), torch.randn(10, 8)
    head_loss.dino_head_loss(zs, zt, W, W, n_student_crops=3, n_teacher_crops=1, student_temp=0.1, teacher_temp=0.04)
    assert seen[:5] == [("gram_loss", N), ("gram_loss", B * N), ("koleo_loss", 9), ("rope_attention", N),
                        ("apply_rope", N)], seen
    assert {op for op, _ in seen} <= set(OPS) and ("dino_head_loss", 6) in seen, seen


def test_environment_is_read_once_and_on_refresh(monkeypatch):
    # Dispatch reads DINOV3_KERNELS_BACKEND and TRITON_INTERPRET from a snapshot (os.environ costs ~1 us a lookup per
    # call): a change shows only after refresh_env(). The conftest re-reads after every test.
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _backend.refresh_env()
    assert _backend.env_backend() == "auto" and _backend.triton_interpret()
    monkeypatch.setenv(_backend.ENV_VAR, "Reference")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.env_backend() == "auto" and _backend.triton_interpret()  # the snapshot, not os.environ
    _backend.refresh_env()
    assert _backend.env_backend() == "reference" and not _backend.triton_interpret()
    x = torch.randn(2, 3)
    assert _backend.choose_backend("auto", (x,)) == "reference"
    with pytest.raises(_backend.BackendUnavailableError, match="TRITON_INTERPRET"):
        _backend.choose_backend("triton", (x,))
    monkeypatch.setenv(_backend.ENV_VAR, "bogus")
    _backend.refresh_env()
    with pytest.raises(ValueError, match="DINOV3_KERNELS_BACKEND='bogus'"):
        _backend.choose_backend("auto", (x,))
