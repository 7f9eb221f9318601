"""Test configuration.

Without a CUDA device the Triton kernels run on CPU tensors under the Triton interpreter; it must
be switched on before triton is first imported, hence here, at the very top.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import collapsekit._dispatch as _dispatch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = _dispatch.triton_available()

# The one tolerance table (docs/design.md, "Decisions"): a kernel result against the fp64 reference
# computed from the same rounded inputs. Kernels accumulate half types in fp32, so the error is the
# rounding of the result to its dtype plus fp32 summation order.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def assert_close(actual, expected, dtype, scale=1.0):
    """The one comparison helper: ``|a − e| <= rtol·|e| + atol·max(1, max|e|)·scale`` with the
    ``TOL[dtype]`` pair. ``atol`` is relative to the result's magnitude (entries near zero of a
    large result carry the rounding of the large terms they were summed from); ``scale`` is the
    extra growth of rounding error in long reductions: about √m for a sum of m terms of mixed sign
    (fp32 accumulation), given by the caller where the reduction is long."""
    tol = TOL[dtype]
    close(actual, expected, tol["rtol"], tol["atol"] * scale)


def close(actual, expected, rtol, atol_rel):
    """The same rule with explicit tolerances (for results whose error is not one dtype's rounding,
    e.g. a long scan): ``|a − e| <= rtol·|e| + atol_rel·max(1, max|e|)``."""
    e = expected.detach().double().cpu()
    mag = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    torch.testing.assert_close(actual.detach().double().cpu(), e, rtol=rtol, atol=atol_rel * mag)


def backend_devices():
    """(backend, device) pairs this machine can run: the C++ kernels on CPU; Triton on CUDA when a
    GPU exists, else on CPU under the interpreter."""
    out = [("cpp", "cpu")]
    if HAS_TRITON:
        out.append(("triton", "cuda" if HAS_CUDA else "cpu"))
    return out


@pytest.fixture(params=["base", "avx2", "avx512"])
def cpu_isa(request):
    """Run a cpp test under each instruction-set build of the kernels this CPU supports."""
    C = _dispatch.cpp()
    try:
        C.set_isa(request.param)
    except ValueError:
        pytest.skip(f"no {request.param} kernels on this CPU/build")
    yield request.param
    C.set_isa("auto")


def opcheck(op, args):
    """torch.library.opcheck of a registered op. A Triton op on CPU tensors runs under the
    interpreter, which cannot run the compiled graph of test_aot_dispatch_dynamic: skip that one."""
    on_cpu = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args)
    kwargs = {}
    if on_cpu and "triton" in str(op):
        kwargs["test_utils"] = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op, args, **kwargs)


def gradcheck(fn, inputs, backend):
    """torch.autograd.gradcheck in fp64. Under the Triton interpreter each call of the op is slow, so
    the Triton backend on CPU uses gradcheck's fast mode (the Jacobian checked through random
    vector products: a few calls of the op instead of one per input element)."""
    fast = backend == "triton" and not HAS_CUDA
    return torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
