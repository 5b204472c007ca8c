"""bench_koleo's Triton variants: triton_chunked and triton_symmetric run the search they name (the launcher's rule
set aside for the call, restored after it), give the loss of the float64 reference, and are timed only where the
launcher may choose between them (n >= SYMMETRIC_MIN_ROWS). Under the Triton interpreter, with the threshold lowered
so that a small set takes the GPU's path."""

import pytest
import torch

import bench_koleo
import common
from dinov3_kernels import koleo_loss_reference
from dinov3_kernels._backend import why_not
from dinov3_kernels._triton import koleo as triton_koleo


class _Spy:
    """A Triton kernel's launcher that counts its launches."""

    def __init__(self, kernel, name, calls):
        self.kernel, self.name, self.calls = kernel, name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(self.name)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.skipif(why_not("triton", (torch.empty(1),)) is not None, reason="needs the Triton interpreter")
def test_the_forced_searches_run_the_kernel_they_name(monkeypatch):
    calls = []
    monkeypatch.setattr(triton_koleo, "SYMMETRIC_MIN_ROWS", 48)
    monkeypatch.setattr(triton_koleo, "_koleo_search_symmetric_kernel",
                        _Spy(triton_koleo._koleo_search_symmetric_kernel, "symmetric", calls))
    monkeypatch.setattr(triton_koleo, "_koleo_search_kernel", _Spy(triton_koleo._koleo_search_kernel, "chunked", calls))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 400, generator=g)  # fp32, d past the resident search: the default is the chunked search
    settings = common.Settings(device="cpu", compile=False)
    providers = bench_koleo.providers(x, settings)
    expected = koleo_loss_reference(x.double()).item()
    ran = {}
    for name in ("triton", "triton_chunked", "triton_symmetric"):
        fn, _ = providers[name]
        calls.clear()
        loss = fn(x).item()
        ran[name] = list(calls)
        assert loss == pytest.approx(expected, rel=1e-5, abs=1e-6), name
    assert ran == {"triton": ["chunked"], "triton_chunked": ["chunked"], "triton_symmetric": ["symmetric"]}
    # the launcher's constants are back
    assert (triton_koleo.SYMMETRIC_MIN_ROWS, triton_koleo.SYMMETRIC_MAX_KC) == (48, 4)

    small = bench_koleo.providers(torch.randn(40, 400, generator=g), settings)  # below the threshold: no variants
    assert "triton" in small and "triton_chunked" not in small and "triton_symmetric" not in small
