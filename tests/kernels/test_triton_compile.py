"""Every Triton kernel compiles to a cubin for sm_90 at the GPU path's tile sizes, without a GPU
(see triton_compile.py).

The interpreter tests check what the kernels compute; this checks what only a real compile checks (tl.dot shape and
dtype rules, layouts, the PTX and ptxas stages). It runs in a subprocess because the test session has set
TRITON_INTERPRET=1, under which triton.jit builds interpreted functions.
"""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))

# Every @triton.jit kernel the launchers start (the helpers they call inline are compiled inside them).
KERNELS = {
    "_gram_prologue_kernel", "_gram_fwd_kernel", "_gram_bwd_kernel",
    "_koleo_norm_kernel", "_koleo_search_kernel", "_koleo_bwd_kernel", "_koleo_norm_bwd_kernel",
    "_rope_attention_fwd_kernel", "_rope_attention_bwd_delta_kernel", "_rope_attention_bwd_dkdv_kernel",
    "_rope_attention_bwd_dq_kernel", "_apply_rope_kernel",
    "_head_col_lse_kernel", "_head_row_lse_kernel", "_head_ce_fwd_kernel", "_head_ce_bwd_dz_kernel",
    "_head_ce_bwd_dw_kernel",
}


def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(HERE, "triton_compile.py"), "--quick", "--arch", "90"],
                       capture_output=True, text=True, env=env, timeout=1500)
    if r.returncode != 0 and "libcuda" in r.stderr and "ptxas" not in r.stderr:
        pytest.skip(f"this Triton build cannot compile for CUDA here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    compiled = re.findall(r"^ok sm_90 +(\w+) +(\w+) +(\w+)", r.stdout, re.M)
    assert {name for _, _, name in compiled} == KERNELS, r.stdout
    for dtype in ("bf16", "fp32"):  # each dtype reached every op
        assert {op for op, dt, _ in compiled if dt == dtype} == {"gram", "koleo", "attention", "head"}, r.stdout
    # The gradient scatters are relaxed atomics (a later kernel reads them): bare REDs in the SASS, with none of the
    # MEMBAR.ALL.GPU fences an acq_rel atomic gets. (The KoLeo search's one completion counter keeps acq_rel.)
    scatter = re.findall(r"^ok sm_90 .*?(_koleo_bwd_kernel) .* atomics (\d+) fences (\d+)", r.stdout, re.M)
    # The Gram kernels are deterministic: no atomics at all.
    gram = re.findall(r"^ok sm_90 +gram .*?(_gram_\w+_kernel) .* atomics (\d+) fences (\d+)", r.stdout, re.M)
    if "atomics" in r.stdout:  # cuobjdump found (Triton ships one)
        assert {name for name, _, _ in scatter} == {"_koleo_bwd_kernel"}, r.stdout
        assert all(int(a) > 0 and int(f) == 0 for _, a, f in scatter), scatter
        assert gram and all(int(a) == 0 and int(f) == 0 for _, a, f in gram), gram


@pytest.mark.parametrize("args, interpret, message", [
    (["--head-dims", "72"], False, "multiples of 16"),
    (["--head-dims", "272"], False, "multiples of 16"),
    (["--quick"], True, "unset TRITON_INTERPRET"),
])
def test_compile_script_rejects_bad_arguments(args, interpret, message):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, os.path.join(HERE, "triton_compile.py"), *args], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
    assert "kernels compiled" not in r.stdout
