"""Backend selection and the bridge to the compiled core.

Every public op takes ``backend="auto" | "reference" | "cpp" | "triton"``:

* ``auto``      -> ``cpp`` for CPU tensors, ``triton`` for CUDA tensors.
* ``reference`` -> the pure-PyTorch fp64 reference in :mod:`collapsekit.reference`.
* ``cpp``       -> the C++ kernels in ``collapsekit._C`` (CPU tensors only).
* ``triton``    -> the Triton kernels in :mod:`collapsekit.kernels`. On CPU tensors this needs
  ``TRITON_INTERPRET=1`` in the environment before Triton is first imported (that is how the
  test-suite covers the GPU kernels on machines without a GPU).

Triton is imported lazily, so ``import collapsekit`` and every CPU op work without it.
"""
import importlib

import torch

from . import _library

BACKENDS = ("auto", "reference", "cpp", "triton")

# dtype codes shared with csrc/common.h
FLOAT_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
INDEX_CODES = {torch.int32: 0, torch.int64: 1}


accumulation_dtype = _library.acc_dtype  # the rule lives in _library


_C = None


def cpp():
    """The compiled extension ``collapsekit._C`` (imported on first use)."""
    global _C
    if _C is None:
        try:
            _C = importlib.import_module("collapsekit._C")
        except ImportError as e:  # pragma: no cover - only on a broken install
            raise ImportError(
                "collapsekit._C (the compiled CPU kernels) could not be imported; reinstall "
                "collapsekit with `pip install .` so that the extension is built") from e
    return _C


triton_available = _library.triton_installed
interpreter_enabled = _library.interpreter_enabled


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Turn ``backend`` into one of reference/cpp/triton for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpp"
        if device.type == "cuda":
            backend = "triton"
        else:
            raise ValueError(f"{op}: tensors on device {device} are not supported "
                             "(collapsekit runs on CPU and CUDA; pass backend='reference' to use the "
                             "pure-PyTorch reference there)")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"{op}: backend='cpp' needs CPU tensors, got tensors on {device}")
    if backend == "triton":
        if not triton_available():
            raise ImportError(f"{op}: backend='triton' needs the triton package (pip install triton)")
        if device.type == "cpu" and not interpreter_enabled():
            raise ValueError(f"{op}: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                             "triton is imported (the Triton interpreter)")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{op}: backend='triton' supports CUDA tensors, got {device}")
    return backend


def num_threads() -> int:
    """The CPU kernels use as many OpenMP threads as torch does (torch.set_num_threads)."""
    return max(1, torch.get_num_threads())
