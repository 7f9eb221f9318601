"""Measurement: timing (CUDA synchronised), peak extra memory, and the machine's limits measured
in the same run (memory-read floor, copy bandwidth, matmul rate), plus a description of the machine."""
import gc
import os
import platform
import statistics
import time
from typing import Any, Dict, Optional

import torch

import collapsekit as ck


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    dt = time.perf_counter() - t0
    del out
    return dt


def _read_proc_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_extra_bytes(fn, device) -> Optional[int]:
    """Peak memory above what was in use before the call (outputs included). CUDA: the caching
    allocator's peak. CPU (Linux): peak resident set, after resetting the high-water mark
    through /proc/self/clear_refs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _read_proc_kb("VmRSS")
    out = fn()
    peak = _read_proc_kb("VmHWM")
    del out
    if base is None or peak is None:
        return None
    return max(0, peak - base) * 1024


def bandwidth_floor(nbytes: int, device, reps: int) -> float:
    """GB/s of a plain reduction over nbytes (the memory-read floor of this machine, now)."""
    buf = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    buf.sum()
    t = statistics.median(time_call(buf.sum, device) for _ in range(reps))
    del buf
    return nbytes / t / 1e9


def copy_bandwidth(nbytes: int, device, reps: int) -> float:
    """GB/s of a device copy, counting bytes read + written."""
    a = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    t = statistics.median(time_call(lambda: b.copy_(a), device) for _ in range(reps))
    del a, b
    return 2 * nbytes / t / 1e9


def matmul_rate(dtype, device, reps: int, n: int = 2048) -> float:
    """FLOP/s of a plain n x n x n matmul in `dtype` (the GEMM ceiling of this machine, now)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    t = statistics.median(time_call(lambda: a @ b, device) for _ in range(reps))
    del a, b
    return 2 * n ** 3 / t


def machine_info(device: torch.device) -> Dict[str, Any]:
    info = dict(date=time.strftime("%Y-%m-%d"), python=platform.python_version(), torch=torch.__version__,
                collapsekit=ck.__version__, platform=platform.platform(), cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    try:
        from .. import _dispatch
        info["cpu_isa"] = _dispatch.cpp().isa()
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info
