"""The readers and rules of compile_checks.py on hand-written SASS / ptxas text (no compiler needed)."""

import pytest

import compile_checks as cc

SASS = """
        Function : _k
        /*0100*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;  /* 0x0 */
        /*0110*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24 ;  /* 0x0 */
        /*0120*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;  /* 0x0 */
        /*0130*/              @P0  REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R5 ;  /* 0x0 */
        /*0140*/                   MEMBAR.ALL.GPU ;  /* 0x0 */
        /*0150*/                   ERRBAR;  /* 0x0 */
        /*0160*/                   CCTL.IVALL ;  /* 0x0 */
        /*0170*/                   ATOMG.E.ADD.STRONG.GPU PT, R2, desc[UR14][R2.64], R5 ;  /* 0x0 */
        /*0180*/                   STL.64 [R1], R4 ;  /* 0x0 */
        /*0190*/                   MEMBAR.ALL.CTA ;  /* 0x0 */
        /*01a0*/                   RED.E.ADD.STRONG.GPU [R2.64], R5 ;  /* 0x0 */
        /*01b0*/                   EXIT ;  /* 0x0 */
"""


def test_sass_facts_count_dots_atomics_fences_and_spills():
    f = cc.sass_facts(SASS)
    assert (f["hgmma"], f["hmma"]) == (2, 1)
    assert f["dot_forms"] == {"HGMMA.64x64x16.F32.BF16": 2, "HMMA.16816.F32.BF16": 1}
    # REDG (predicated) and RED are bare; the ATOMG has a GPU-scope MEMBAR before it; a CTA-scope one does not count.
    assert (f["atomics"], f["fenced_atomics"], f["fences"]) == (3, 1, 1)
    assert (f["local_stores"], f["local_loads"]) == (1, 0)


LOOPS = """
        /*0000*/                   STL [R1], R6 ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0020*/               @P0 BRA 0x10 ;
        /*0030*/                   LDL.LU R6, [R1] ;
        /*0040*/                   FADD R2, R2, R3 ;
        /*0050*/                   STL [R1+0x4], R2 ;
        /*0060*/                   ISETP.GE.AND P1, PT, R2, R3, PT ;
        /*0070*/              @!P1 BRA 0x40 ;
        /*0080*/                   BRA 0x90 ;
        /*0090*/                   EXIT ;
"""


def test_loop_spills_are_told_apart():
    # Two loops (0x10-0x20 and 0x40-0x70: branches back); the forward branch at 0x80 closes none. The STL at 0 and
    # the LDL at 0x30 are outside them; the STL at 0x50 is inside the second.
    assert cc.loop_ranges(LOOPS) == [(0x10, 0x20), (0x40, 0x70)]
    assert cc.loop_local_accesses(LOOPS) == 1
    assert cc.sass_facts(LOOPS)["loop_local"] == 1
    assert cc.loop_local_accesses(LOOPS.replace("/*0050*/                   STL [R1+0x4], R2 ;", "")) == 0


def test_outside_loops_allow_entry_needs_spill_free_loops_and_a_small_stack():
    entry = [{"kernel": "_x_kernel", "property": "no_spills", "outside_loops": True, "max_stack": 64, "reason": "r"}]
    fail = {"no_spills": "FAIL: stack 32"}
    for loop_local, stack, allowed in ((0, 32, True), (1, 32, False), (None, 32, False), (0, 96, False)):
        used = set()
        out = cc.apply_allow(_kernel(stack=stack, loop_local=loop_local), fail, entry, used)
        assert out["no_spills"].startswith("allowed") is allowed and (used == {0}) is allowed


def test_a_fence_far_before_an_atomic_does_not_wrap_it():
    far = "\n".join(f"        /*{0x100 + 16 * i:04x}*/                   IADD3 R1, R1, 1, RZ ;" for i in range(20))
    sass = ("        /*0000*/                   MEMBAR.SC.GPU ;\n" + far +
            "\n        /*0400*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R5 ;\n")
    f = cc.sass_facts(sass)
    assert (f["atomics"], f["fenced_atomics"], f["fences"]) == (1, 0, 1)


def test_split_functions():
    text = "Fatbin elf code:\n\tFunction : _a\n  /*0000*/  EXIT ;\n\tFunction : _b\n  /*0000*/  NOP ;\n"
    assert set(cc.split_functions(text)) == {"_a", "_b"}


@pytest.mark.parametrize("threads, regs, smem, expected", [
    (128, 255, 131072, (1, "smem")),        # 129 KB + 1 KB reserved: one CTA in 228 KB
    (128, 255, 0, (2, "regs")),             # 256 regs x 32 lanes x 4 warps = 32K of 64K registers
    (256, 32, 0, (8, "threads")),           # 2048 threads per SM
    (32, 16, 0, (32, "ctas")),              # at most 32 CTAs per SM
    (128, 168, 98304, (2, "smem")),         # 2 x (96 + 1) KB <= 228 KB < 3 x 97 KB; registers allow 3
    (128, 64, 228 * 1024, (0, "smem")),     # more than a CTA may have
    (2048, 32, 0, (0, "threads")),          # more than 1024 threads per CTA
])
def test_ctas_per_sm(threads, regs, smem, expected):
    assert cc.ctas_per_sm(threads, regs, smem) == expected


def _kernel(**kw):
    k = dict(name="_x_kernel", dtype="bf16", head_dim=None, stack=0, hgmma=4, hmma=0, local_stores=0, local_loads=0,
             ctas_per_sm=2, limiter="regs", atomics=0, fenced_atomics=0)
    k.update(kw)
    return k


def test_evaluate():
    assert set(cc.evaluate(_kernel(), True).values()) == {"ok"}
    assert cc.evaluate(_kernel(hgmma=0, hmma=8), True)["tensor_cores"].startswith("FAIL")
    assert cc.evaluate(_kernel(hgmma=4, hmma=8), True)["tensor_cores"].startswith("FAIL")  # any mma.sync fails
    assert cc.evaluate(_kernel(hgmma=0), False)["tensor_cores"].startswith("n/a")
    assert cc.evaluate(_kernel(stack=8), True)["no_spills"].startswith("FAIL")
    assert cc.evaluate(_kernel(local_loads=2), True)["no_spills"].startswith("FAIL")
    assert cc.evaluate(_kernel(spill_stores=4), True)["no_spills"].startswith("FAIL")
    assert cc.evaluate(_kernel(ctas_per_sm=0), True)["fits"].startswith("FAIL")
    assert cc.evaluate(_kernel(atomics=3, fenced_atomics=1), True)["no_fenced_atomics"] == "FAIL: 1 of 3"


def test_allow_list_matches_name_dtype_and_bound():
    allow = [{"kernel": "_x_.*", "property": "no_fenced_atomics", "max": 1, "reason": "counter"},
             {"kernel": "_x_kernel", "property": "no_spills", "dtypes": ("fp32",), "reason": "fp32 only"}]
    used = set()
    k = _kernel(atomics=3, fenced_atomics=1, stack=8)
    st = cc.apply_allow(k, cc.evaluate(k, True), allow, used)
    assert st["no_fenced_atomics"] == "allowed: counter" and st["no_spills"].startswith("FAIL") and used == {0}
    k = _kernel(atomics=3, fenced_atomics=2)  # over the bound
    assert cc.apply_allow(k, cc.evaluate(k, True), allow, set())["no_fenced_atomics"].startswith("FAIL")
    k = _kernel(dtype="fp32", stack=8)
    assert cc.apply_allow(k, cc.evaluate(k, True), allow, set())["no_spills"] == "allowed: fp32 only"
    k = _kernel(name="_y_kernel", dtype="fp32", stack=8)  # full match of the name
    assert cc.apply_allow(k, cc.evaluate(k, True), allow, set())["no_spills"].startswith("FAIL")


def test_every_allow_entry_names_a_property_and_a_reason():
    for e in cc.TRITON_ALLOW + cc.CUDA_ALLOW:
        assert e["property"] in cc.PROPERTIES and len(e["reason"]) > 20, e
