"""Which backends exist here, the "auto" choice, and the errors that say why a backend cannot run.

The backends (an op implements some of them; its op_check says which it lacks):
  "reference"  plain PyTorch, any device and dtype (float64 included): the spec
  "composed"   the strongest thing written from PyTorch and vendor libraries (cuBLAS GEMMs, SDPA), plus at most a
               small Triton helper on CUDA: the yardstick the hand-written kernels must beat; any device
  "triton"     Triton kernels; on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 (fp32, how CI checks them)
  "cuda"       the compiled extension dinov3_kernels._C (built by `pip install .` when nvcc was found)

backend="auto" on CUDA tensors takes the first backend that can run from the op's row of the table in
auto_table.json (op, dtype, size bucket -> backends in order of preference; each row says where its order came
from: the roofline prediction or the GPU results file that measured it), and reference on CPU tensors. The
environment variable DINOV3_KERNELS_BACKEND replaces "auto" with an explicit choice. An explicit choice that cannot
run raises BackendUnavailableError with the reason; "auto" falls back silently.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
from typing import Callable, Optional, Sequence

import torch

BACKENDS = ("reference", "composed", "triton", "cuda")
ENV_VAR = "DINOV3_KERNELS_BACKEND"
# Must match csrc/common.cuh (enum DType).
CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs; the message says why."""


def _probe_triton() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        importlib.import_module("triton.language")
    except Exception as exc:  # a broken install should read as unavailable, not crash import
        return f"triton failed to import: {exc!r}"
    return None


def _probe_cuda_ext():
    try:
        return importlib.import_module("dinov3_kernels._C"), None
    except ImportError as exc:
        return None, (
            "the CUDA extension dinov3_kernels._C is not built (install with nvcc available, "
            f"without DINOV3_SKIP_CUDA_BUILD): {exc}"
        )


# Probed once at import: module constants keep dispatch traceable by torch.compile.
TRITON_UNAVAILABLE: Optional[str] = _probe_triton()
CUDA_EXT, CUDA_EXT_UNAVAILABLE = _probe_cuda_ext()


def _read_env() -> tuple[str, bool]:
    return os.environ.get(ENV_VAR, "auto"), os.environ.get("TRITON_INTERPRET", "0") == "1"


# DINOV3_KERNELS_BACKEND and TRITON_INTERPRET are read once, at import, not on every call: an os.environ lookup costs
# about a microsecond, several per op call. (Triton itself reads TRITON_INTERPRET once, when @triton.jit defines the
# kernels.) Code that changes either variable in a running process, tests included, calls refresh_env() afterwards.
_ENV_BACKEND, _TRITON_INTERPRET = _read_env()


def refresh_env() -> None:
    """Re-reads DINOV3_KERNELS_BACKEND and TRITON_INTERPRET from os.environ (they are read once, at import)."""
    global _ENV_BACKEND, _TRITON_INTERPRET
    _ENV_BACKEND, _TRITON_INTERPRET = _read_env()


def triton_interpret() -> bool:
    return _TRITON_INTERPRET


def cuda_ext():
    """The compiled module; raises BackendUnavailableError when it was not built."""
    if CUDA_EXT is None:
        raise BackendUnavailableError(CUDA_EXT_UNAVAILABLE)
    return CUDA_EXT


def env_backend() -> str:
    """The backend DINOV3_KERNELS_BACKEND asks for ("auto" if unset), as read at import or by refresh_env()."""
    value = _ENV_BACKEND.strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of auto, {', '.join(BACKENDS)}")
    return value


def why_not(backend: str, tensors: Sequence[torch.Tensor], op_check: Optional[Callable[[str], Optional[str]]] = None):
    """The reason `backend` cannot run on these tensors, or None if it can.

    op_check(backend) adds the op's own limits (dtypes, sizes) and returns a reason or None.
    """
    if backend == "reference":
        return None
    if backend == "composed":  # plain PyTorch: any device; the op says if it has one and for which inputs
        return op_check(backend) if op_check is not None else None
    devices = {t.device.type for t in tensors}
    if backend == "triton":
        if TRITON_UNAVAILABLE:
            return TRITON_UNAVAILABLE
        if devices == {"cpu"}:
            if not triton_interpret():
                return "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 to run its kernels on the CPU)"
            if any(t.dtype != torch.float32 for t in tensors if t.is_floating_point()):
                return "the Triton interpreter on CPU is used with float32 inputs only"
        elif devices != {"cuda"}:
            return f"the triton backend needs CUDA tensors, got devices {sorted(devices)}"
    elif backend == "cuda":
        if CUDA_EXT is None:
            return CUDA_EXT_UNAVAILABLE
        if devices != {"cuda"}:
            return f"the cuda backend needs CUDA tensors, got devices {sorted(devices)}"
    else:
        raise ValueError(f"unknown backend {backend!r}: expected auto or one of {', '.join(BACKENDS)}")
    return op_check(backend) if op_check is not None else None


AUTO_TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "auto_table.json")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}
DEFAULT_ORDER = ("cuda", "triton")  # an op, dtype or size the table does not name


@functools.lru_cache(maxsize=None)
def auto_table() -> dict:
    """The committed table "auto" reads: {"sizes": {op: what its size counts}, "rows": [{op, dtype, max_size
    (null: no upper bound), order, source}]}. Read once."""
    with open(AUTO_TABLE_PATH) as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def _rows(op: str, dtype: str) -> tuple:
    rows = [r for r in auto_table()["rows"] if r["op"] == op and r["dtype"] == dtype]
    return tuple(sorted(rows, key=lambda r: float("inf") if r["max_size"] is None else r["max_size"]))


def auto_row(op: str, dtype: torch.dtype, size: Optional[int]) -> Optional[dict]:
    """The table row for op, dtype and size (the first whose max_size >= size), or None if the table has none."""
    for row in _rows(op, _DTYPE_NAMES.get(dtype, str(dtype))):
        if row["max_size"] is None or (size is not None and size <= row["max_size"]):
            return row
    return None


def auto_order(op: str, dtype: torch.dtype, size: Optional[int]) -> tuple:
    """Backends "auto" tries on CUDA tensors, best first."""
    row = auto_row(op, dtype, size)
    return tuple(row["order"]) if row is not None else DEFAULT_ORDER


def choose_backend(
    requested: str,
    tensors: Sequence[torch.Tensor],
    op_check: Optional[Callable[[str], Optional[str]]] = None,
    op_name: str = "op",
    atomics: Sequence[str] = (),
    size: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    cpu_auto: str = "reference",
) -> str:
    """Resolves backend="auto" / the environment override / an explicit request to a backend that can run.

    ``atomics``: the op's backends that accumulate with floating-point atomics, whose rounding depends on scheduling.
    Under ``torch.use_deterministic_algorithms(True)`` "auto" passes over them and an explicit request is refused.
    ``size`` and ``dtype`` (default: the first tensor's) select the row of the auto table (see auto_table.json for
    what size counts per op); ``cpu_auto`` is what "auto" gives on CPU tensors."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    if not isinstance(requested, str):
        raise TypeError(f"{op_name}: backend must be a string, got {type(requested).__name__}")
    requested = requested.lower()
    if requested == "auto":
        requested = env_backend()
    if requested != "auto":
        reason = why_not(requested, tensors, op_check)
        if reason is None and deterministic and requested in atomics:
            reason = ("it accumulates with floating-point atomics, so its result can differ between runs, and "
                      "torch.use_deterministic_algorithms(True) is on (backend='reference' is deterministic)")
        if reason is not None:
            raise BackendUnavailableError(f"{op_name}: backend {requested!r} cannot run here: {reason}")
        return requested
    if tensors and all(t.device.type == "cuda" for t in tensors):
        dtype = dtype if dtype is not None else tensors[0].dtype
        for candidate in auto_order(op_name, dtype, size):
            if deterministic and candidate in atomics:
                continue
            if why_not(candidate, tensors, op_check) is None:
                return candidate
        return "reference"
    if cpu_auto != "reference" and why_not(cpu_auto, tensors, op_check) is None:
        return cpu_auto
    return "reference"


def available_backends() -> dict:
    """Human-readable summary: backend -> None if usable on this machine, else the reason."""
    gpu = torch.cuda.is_available()
    return {
        "reference": None,
        "composed": None,
        "triton": TRITON_UNAVAILABLE
        or (None if gpu or triton_interpret() else "no CUDA GPU (set TRITON_INTERPRET=1 to run on CPU)"),
        "cuda": CUDA_EXT_UNAVAILABLE or (None if gpu else "built, but no CUDA GPU is visible"),
    }
