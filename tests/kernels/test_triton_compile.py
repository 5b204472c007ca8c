"""Every Triton kernel compiles to a cubin for sm_90 at the GPU path's tile sizes, without a GPU
(see triton_compile.py).

The interpreter tests check what the kernels compute; this checks what only a real compile checks (tl.dot shape and
dtype rules, layouts, the PTX and ptxas stages) and what the machine code of each launch's default configuration must
have (compile_checks.py: wgmma for 16-bit/TF32 dots, no spills, fits an SM, no fenced atomics; the allow-list there
says which kernel lacks what, and why). It runs in a subprocess because the test session has set TRITON_INTERPRET=1,
under which triton.jit builds interpreted functions. One compile (CI's --quick subset: bf16, fp32 and TF32, head dim
64, the first autotune candidate) serves every test here.
"""

import ast
import glob
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.join(os.path.dirname(os.path.dirname(HERE)), "dinov3_kernels", "_triton")

# Every @triton.jit kernel the launchers start (the helpers they call inline are compiled inside them).
KERNELS = {
    "_gram_prologue_kernel", "_gram_fwd_kernel", "_gram_bwd_kernel", "_gram_loss_kernel",
    "_gram_sum_diff_kernel", "_gram_norm_bwd_kernel", "_gram_factored_dd_kernel",
    "_koleo_norm_kernel", "_koleo_search_kernel", "_koleo_search_resident_kernel", "_koleo_search_symmetric_kernel",
    "_koleo_merge_kernel",
    "_koleo_sum_kernel", "_koleo_bwd_kernel", "_koleo_norm_bwd_kernel", "_koleo_candidate_dots_kernel",
    "_rope_attention_rotate_kernel", "_rope_attention_fwd_kernel", "_rope_attention_bwd_kernel",
    "_rope_attention_bwd_dq_kernel", "_rope_attention_bwd_dkdv_kernel", "_rope_attention_bwd_dq_tile_kernel",
    "_apply_rope_kernel", "_rope_qkv_split_kernel", "_rope_qkv_merge_kernel",
    "_head_col_lse_kernel", "_head_row_lse_kernel", "_head_ce_fwd_kernel", "_head_ce_bwd_dz_kernel",
    "_head_ce_bwd_dw_kernel",
}


@pytest.fixture(scope="module")
def quick_compile(tmp_path_factory):
    """(the finished process, the JSON report) of one `triton_compile.py --quick --arch 90` run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = tmp_path_factory.mktemp("triton_compile") / "report.json"
    r = subprocess.run([sys.executable, os.path.join(HERE, "triton_compile.py"), "--quick", "--arch", "90", "--json",
                        str(path)], capture_output=True, text=True, env=env, timeout=1500)
    if r.returncode != 0 and "libcuda" in r.stderr and "ptxas" not in r.stderr:
        pytest.skip(f"this Triton build cannot compile for CUDA here: {r.stderr[-300:]}")
    return r, (json.loads(path.read_text()) if path.exists() else None)


def test_every_triton_kernel_compiles_for_sm90(quick_compile):
    r, _ = quick_compile
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    compiled = re.findall(r"^ok sm_90 +(\w+) +(\w+) +(\w+)", r.stdout, re.M)
    assert {name for _, _, name in compiled} == KERNELS, r.stdout
    for dtype in ("bf16", "fp32"):  # each dtype reached every op
        assert {op for op, dt, _ in compiled if dt == dtype} == {"gram", "koleo", "attention", "head"}, r.stdout
    # The gradient scatters are relaxed atomics (a later kernel reads them): bare REDs in the SASS, with none of the
    # MEMBAR.ALL.GPU fences an acq_rel atomic gets. The KoLeo forward has no atomics at all (a merge kernel and a
    # fixed-order sum instead of a completion counter).
    scatter = re.findall(r"^ok sm_90 .*?(_koleo_bwd_kernel|_rope_attention_bwd_kernel) .* atomics (\d+) fences (\d+)",
                         r.stdout, re.M)
    # The Gram kernels are deterministic: no atomics at all.
    gram = re.findall(r"^ok sm_90 +gram .*?(_gram_\w+_kernel) .* atomics (\d+) fences (\d+)", r.stdout, re.M)
    if "atomics" in r.stdout:  # cuobjdump found (Triton ships one)
        assert {name for name, _, _ in scatter} == {"_koleo_bwd_kernel", "_rope_attention_bwd_kernel"}, r.stdout
        assert all(int(a) > 0 and int(f) == 0 for _, a, f in scatter), scatter
        assert gram and all(int(a) == 0 and int(f) == 0 for _, a, f in gram), gram
        koleo_fwd = re.findall(r"^ok sm_90 .*?_koleo_(?:norm|search|search_resident|search_symmetric|merge|sum)_kernel "
                               r".* atomics (\d+) fences (\d+)", r.stdout, re.M)
        assert koleo_fwd and all(a == "0" and f == "0" for a, f in koleo_fwd), koleo_fwd
    # The resident KoLeo search (d = 384 here) prefetches whole search tiles: its query tile and two 64-row search
    # tiles in shared memory. A run-time loop in its top-k update (the symmetric and chunked kernels' early stop) had
    # the pipeliner give that up (114688 B: one K chunk of search tile); this catches it coming back.
    resident = re.findall(r"^ok sm_90 .*?_koleo_search_resident_kernel .*?'BLOCK_K': 128.* smem (\d+)", r.stdout, re.M)
    assert resident and all(int(b) >= (128 + 2 * 64) * 384 * 2 for b in resident), resident


def _source_kernels() -> set:
    """Every @triton.jit function named *_kernel in dinov3_kernels/_triton: the entry points the launchers start (the
    other jit functions are helpers compiled inside them). Read from the source, so a new kernel needs no list here."""
    found = set()
    for path in glob.glob(os.path.join(PACKAGE, "*.py")):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                found.add(node.name)
    return found


def test_default_configs_have_the_compile_properties(quick_compile):
    r, report = quick_compile
    assert report is not None, r.stdout[-2000:] + r.stderr[-4000:]
    kernels = report["kernels"]
    assert {k["name"] for k in kernels} == _source_kernels(), "a kernel in the source was not compiled (or vice versa)"
    if not report["meta"]["cuobjdump"]:
        pytest.skip("no cuobjdump (Triton ships one): the SASS could not be read")
    defaults = [k for k in kernels if k["default"]]
    assert {k["name"] for k in defaults} == _source_kernels()
    failures = [f"{k['name']} ({k['dtype']}, Dh {k['head_dim']}, {k['blocks']}, warps {k['warps']}): {p} {s}"
                for k in defaults for p, s in k["status"].items() if s.startswith("FAIL")]
    assert not failures, "\n".join(failures) + "\n(fix the kernel, or allow it in compile_checks.py with the reason)"
    # The checks looked at something: 16-bit and TF32 dots were found and held to wgmma.
    for dtype in ("bf16", "tf32"):
        assert any(k["dtype"] == dtype and k["status"]["tensor_cores"] == "ok" for k in defaults), dtype
    assert all(k["hgmma"] == 0 and k["hmma"] == 0 for k in kernels if k["needs_tensor_cores"] is None)
    assert all(k["ctas_per_sm"] >= 1 for k in defaults)


def _selection_instructions(kernel):
    """(fixed, [round loops]) warp instructions of a KoLeo search kernel's tile loop, from the report's loop sizes:
    the tile loop is the innermost loop around the K loop (the smallest loop with dot instructions), the rounds are
    its loops without dots (the top-k `while` loops: 100 instructions and more); fixed = tile - K loop - rounds."""
    loops = kernel["loops"]
    with_dots = sorted(n for n, dots in loops if dots)
    rounds = [n for n, dots in loops if not dots and n >= 100]
    return with_dots[1] - with_dots[0] - sum(rounds), rounds


def test_koleo_selection_counts_in_the_roofline_are_the_sass(quick_compile):
    # benchmarks/roofline.py charges the Triton KoLeo search's top-k selection by instruction counts read from the
    # SASS (KOLEO_TRITON_SELECT_INSTR, fp32 input, topk 1: lists of 9). They must stay what the compiler emits (within
    # 25 %), or the model's verdicts (and the launcher's resident / symmetric choices built on them) go stale.
    r, report = quick_compile
    assert report is not None, r.stdout[-2000:] + r.stderr[-4000:]
    if not report["meta"]["cuobjdump"]:
        pytest.skip("no cuobjdump (Triton ships one): the SASS could not be read")
    import triton

    if not triton.__version__.startswith("3.9"):  # Triton 3.6 emits other counts (benchmarks/NOTES.md, section 10)
        pytest.skip(f"the model's counts are Triton 3.9's; this is {triton.__version__}")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "benchmarks"))
    import roofline

    found = 0
    for k in report["kernels"]:
        if k["dtype"] not in ("fp32", "tf32") or k.get("shape") != "n=9000 d=1024 topk=1" or not k["default"]:
            continue
        kind = {"_koleo_search_kernel": "chunked", "_koleo_search_symmetric_kernel": "symmetric"}.get(k["name"])
        if kind is None:
            continue
        fixed, rounds = _selection_instructions(k)
        want_fixed, *want_rounds = roofline.KOLEO_TRITON_SELECT_INSTR[(kind, 128, 9)]
        want_rounds = [n for n in want_rounds if n]
        assert len(rounds) == len(want_rounds), (kind, k["loops"])
        for got, want in zip([fixed, *rounds], [want_fixed, *want_rounds]):
            assert abs(got - want) <= 0.25 * want, (kind, got, want, k["loops"])
        found += 1
    assert found == 4, found  # chunked and symmetric, fp32 and TF32 labels


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
