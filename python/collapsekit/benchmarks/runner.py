"""The runner behind ``collapsekit bench`` and ``bench/`` (pytest-benchmark).

Every row is measured side by side in one process: providers are called in turn inside each
repetition, so machine noise hits them alike; times are medians. The bandwidth floor is the
time of ``buf.sum()`` over a buffer as large as the workload's main input, measured in the same run.
Before timing, the collapsekit output is compared with the first baseline's (``Workload.check``), so
a row never times a wrong answer.
"""
import gc
import json
import math
import statistics
from typing import Any, Callable, Dict, List, Optional

import torch

from .measure import bandwidth_floor, copy_bandwidth, machine_info, matmul_rate, peak_extra_bytes, time_call
from .workload import WORKLOADS, Workload


def _flatten(x) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x.detach()]
    if isinstance(x, (int, float)):
        return [torch.tensor(float(x))]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _flatten(x[k])]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _flatten(v)]
    raise TypeError(f"cannot compare outputs of type {type(x).__name__}")


def check_outputs(w: Workload, got, want, inp) -> float:
    """Raise AssertionError unless collapsekit's output ``got`` matches the baseline's ``want``;
    returns the largest normalised error ``max|got − want| / max|want|`` over the outputs."""
    if w.check is not None:
        w.check(got, want, inp)
        return 0.0
    rtol = w.rtol if w.rtol is not None else (3e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-3)
    a, b = _flatten(got), _flatten(want)
    assert len(a) == len(b), f"{w.op}: {len(a)} outputs vs the baseline's {len(b)}"
    worst = 0.0
    for x, y in zip(a, b):
        x, y = x.double().cpu(), y.double().cpu()
        assert x.shape == y.shape, f"{w.op}: output shape {tuple(x.shape)} vs the baseline's {tuple(y.shape)}"
        if x.numel() == 0:
            continue
        err = float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))
        worst = max(worst, err)
    assert worst <= rtol, f"{w.op} {w.label}: collapsekit differs from the baseline (normalised error {worst:.2e})"
    return worst


def run_workload(w: Workload, device: torch.device, reps: int, compile_baselines: bool,
                 variants: bool = True) -> Dict[str, Any]:
    inp = w.make(device)
    providers: Dict[str, Callable[[], Any]] = {}
    compile_s: Dict[str, float] = {}
    for name, fn in w.baselines.items():
        providers[name] = (lambda fn: lambda: fn(**inp))(fn)
    if compile_baselines and w.compile:
        for name, fn in w.baselines.items():
            if name in w.no_compile:
                continue
            torch._dynamo.reset()
            cfn = torch.compile(fn)
            try:
                compile_s[name + "_compiled"] = time_call(lambda: cfn(**inp), device)
            except Exception as e:  # a baseline that does not compile is reported, not fatal
                compile_s[name + "_compiled"] = float("nan")
                print(f"  (torch.compile of {name} failed: {type(e).__name__}: {str(e)[:120]})")
                continue
            providers[name + "_compiled"] = (lambda cfn: lambda: cfn(**inp))(cfn)
    providers["collapsekit"] = lambda: w.collapsekit(**inp)
    if variants:
        for name, fn in w.variants.get(device.type, {}).items():
            providers["collapsekit:" + name] = (lambda fn: lambda: fn(**inp))(fn)

    # warm-up (and first-call costs) outside the timings; the first call of collapsekit and of the
    # first baseline also checks that both compute the same thing
    check_error = None
    ref_name = next(iter(w.baselines), None)
    if ref_name is not None:
        got, want = providers["collapsekit"](), providers[ref_name]()
        check_error = check_outputs(w, got, want, inp)
        del got, want
    for fn in providers.values():
        time_call(fn, device)
    times = {k: [] for k in providers}
    for _ in range(reps):  # side by side: every provider once per repetition
        for k, fn in providers.items():
            times[k].append(time_call(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {k: peak_extra_bytes(providers[k], device) for k in providers if ":" not in k}
    floor = bandwidth_floor(w.floor_bytes(inp), device, max(3, reps))
    nbytes = w.bytes_moved(inp)
    baseline_names = [k for k in med if k != "collapsekit" and not k.startswith("collapsekit:")]
    best = min(baseline_names, key=lambda k: med[k]) if baseline_names else None
    row = dict(
        op=w.op, shape=w.shape, dtype=str(w.dtype).replace("torch.", ""), device=device.type,
        median_s=med, compile_s=compile_s, best_baseline=best,
        speedup=med[best] / med["collapsekit"] if best else math.nan,
        speedup_vs_eager=med.get("eager", math.nan) / med["collapsekit"],
        bytes_moved=nbytes, achieved_GBps=nbytes / med["collapsekit"] / 1e9, floor_GBps=floor,
        peak_extra_bytes=peak, reps=reps, check_error=check_error,
    )
    if device.type == "cuda":
        row["copy_GBps"] = copy_bandwidth(w.floor_bytes(inp), device, max(3, reps))
    if w.flops is not None:  # GEMM-bound: the ceiling is the matmul rate, not the bandwidth
        row["TFLOPs"] = w.flops(inp) / med["collapsekit"] / 1e12
        row["matmul_TFLOPs"] = matmul_rate(w.dtype, device, max(3, reps)) / 1e12
    del inp
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _fmt_ms(s):
    return "-" if s is None or (isinstance(s, float) and math.isnan(s)) else f"{s * 1e3:.2f}"


def _fmt_mb(b):
    return "-" if b is None else f"{b / 2**20:.0f}"


def _fmt_speedup(r):
    if r["best_baseline"] is None:
        return "no baseline"
    if r["best_baseline"] == "eager":
        return f"{r['speedup']:.2f}x vs eager"
    return f"{r['speedup_vs_eager']:.1f}x vs eager, {r['speedup']:.2f}x vs {r['best_baseline']}"


def format_table(rows: List[Dict[str, Any]]) -> str:
    head = ["op", "shape", "dtype", "dev", "eager ms", "compiled ms (compile s)", "collapsekit ms",
            "speedup", "GB/s", "floor GB/s", "TFLOP/s (matmul)", "peak MB eager/ck", "kernel paths ms"]
    lines = []
    for r in rows:
        m = r["median_s"]
        comp = m.get("eager_compiled")
        comp_s = f"{_fmt_ms(comp)} ({r['compile_s'].get('eager_compiled', math.nan):.0f})" if comp is not None else "-"
        paths = " ".join(f"{k.split(':')[1]}={_fmt_ms(v)}" for k, v in m.items() if k.startswith("collapsekit:"))
        lines.append([r["op"], " ".join(f"{k}={v}" for k, v in r["shape"].items()), r["dtype"], r["device"],
                      _fmt_ms(m.get("eager")), comp_s, _fmt_ms(m["collapsekit"]),
                      _fmt_speedup(r), f"{r['achieved_GBps']:.1f}",
                      f"{r['floor_GBps']:.1f}",
                      f"{r['TFLOPs']:.2f} ({r['matmul_TFLOPs']:.2f})" if "TFLOPs" in r else "-",
                      f"{_fmt_mb(r['peak_extra_bytes'].get('eager'))}/{_fmt_mb(r['peak_extra_bytes'].get('collapsekit'))}",
                      paths])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda row: "| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(head), sep] + [fmt(r) for r in lines])


def select(device: str, quick: bool, op: Optional[str] = None) -> List[Workload]:
    return [w for w in WORKLOADS if device in w.devices and (w.quick if quick else w.full)
            and (op is None or w.op == op)]


def run(device: str = "cpu", quick: bool = False, json_path: Optional[str] = None, compile_baselines: bool = True,
        reps: Optional[int] = None, op: Optional[str] = None, echo=print) -> List[Dict[str, Any]]:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("collapsekit bench: --device cuda but torch sees no CUDA device")
    reps = reps or (5 if quick else (20 if dev.type == "cuda" else 11))
    rows = []
    info = machine_info(dev)
    echo(f"collapsekit bench on {info.get('gpu', info['cpu'])} ({dev.type}, {info['threads']} threads, "
         f"torch {info['torch']}, {info['date']}); medians of {reps} side-by-side repetitions")
    failed = []
    for w in select(dev.type, quick, op):
        echo(f"  {w.op} {w.label} {str(w.dtype).replace('torch.', '')} ...")
        try:
            rows.append(run_workload(w, dev, reps, compile_baselines))
        except Exception as e:  # one workload that cannot run (e.g. out of memory) must not lose the rest
            failed.append(dict(op=w.op, shape=w.shape, error=f"{type(e).__name__}: {str(e)[:300]}"))
            echo(f"    failed: {failed[-1]['error']}")
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if json_path:  # rewritten after every workload, so a run cut short keeps what it measured
            with open(json_path, "w") as f:
                json.dump(dict(machine=info, rows=rows, failed=failed), f, indent=1)
    echo(format_table(rows))
    if json_path:
        echo(f"wrote {json_path}")
    if failed and not rows:
        raise SystemExit("collapsekit bench: every workload failed")
    wrong = [f for f in failed if f["error"].startswith("AssertionError")]
    if wrong:  # a row whose output differs from its baseline's is a bug, never a timing
        raise SystemExit(f"collapsekit bench: {len(wrong)} workload(s) differ from their baseline: "
                         + "; ".join(f["error"] for f in wrong))
    return rows
