"""The benchmark registry: a :class:`Workload` names an op, a shape, a dtype, how to build its
inputs, the baselines a user writes in eager PyTorch today (each also run under ``torch.compile``),
the collapsekit call, and the bytes the op must move at least (for GB/s). Families add workloads
with :func:`register` in their own module of this package (docs/adding-an-op.md)."""
import dataclasses
from typing import Any, Callable, Dict, List, Optional

import torch


@dataclasses.dataclass
class Workload:
    op: str
    shape: Dict[str, int]
    dtype: torch.dtype
    make: Callable[[torch.device], Dict[str, Any]]        # inputs on a device
    baselines: Dict[str, Callable[..., Any]]              # name -> fn(**inputs), eager PyTorch
    collapsekit: Callable[..., Any]                       # fn(**inputs)
    bytes_moved: Callable[[Dict[str, Any]], int]          # minimum bytes read + written
    floor_bytes: Callable[[Dict[str, Any]], int]          # size of the main input
    variants: Dict[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)  # kernel paths
    devices: tuple = ("cpu", "cuda")
    quick: bool = False                                   # part of `bench --quick`
    full: bool = True                                     # part of the full run
    compile: bool = True                                  # also time baselines under torch.compile
    no_compile: tuple = ()                                # baselines never compiled (e.g. Python loops over L)
    flops: Optional[Callable[[Dict[str, Any]], int]] = None  # GEMM-bound ops: FLOPs of the work
    # collapsekit's output against the first baseline's: check(got, want, inputs) raises on a
    # mismatch; by default every tensor / number is compared with a normalised max error <= rtol
    check: Optional[Callable[[Any, Any, Dict[str, Any]], None]] = None
    rtol: Optional[float] = None                          # default: 1e-3 (fp32/fp64), 3e-2 (fp16/bf16)

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())


WORKLOADS: List[Workload] = []


def register(w: Workload) -> Workload:
    WORKLOADS.append(w)
    return w


def fwd_bwd(fn):
    """Forward and backward (shared by the scan workloads): sum of the output, .backward() into
    every input's .grad (cleared after, so repetitions do not accumulate)."""
    def run(**inp):
        out = fn(**inp)
        out.float().sum().backward()
        for v in inp.values():
            v.grad = None
        return out.detach()
    run.__name__ = getattr(fn, "__name__", "fn") + "_fwd_bwd"
    return run
