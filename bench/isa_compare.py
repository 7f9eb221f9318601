"""AVX2 against AVX-512 builds of the CPU kernels, side by side with eager, in one process.

    python bench/isa_compare.py [--reps 11] [--ops class_means,within_class_variance]

For each shape the providers (eager, collapsekit with set_isa("avx2"), collapsekit with
set_isa("avx512")) run in alternation, one call each per round, so machine noise hits all of
them alike; prints the median ms of each and the ratios. Used to decide which kernel files go in
CK_AVX512_SOURCES (CMakeLists.txt); the numbers are in docs/class_sums.md and docs/within_class.md.
"""
import argparse
import statistics
import time

import torch

import collapsekit as ck
from collapsekit import _C
from collapsekit.benchmarks.neural_collapse import eager_class_means, eager_within_class_variance


def make_inputs(n, d, c):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, c, (n,), generator=g)
    feats = torch.randn(n, d, generator=g)
    return feats, labels


def with_isa(isa, fn):
    def run():
        _C.set_isa(isa)
        return fn()
    return run


def compare(name, providers, reps):
    for f in providers.values():  # warm-up (page faults, thread pools, huge pages)
        f()
    times = {k: [] for k in providers}
    for _ in range(reps):
        for k, f in providers.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    line = "  ".join(f"{k} {m:8.2f} ms" for k, m in med.items())
    ratios = "  ".join(f"eager/{k} {med['eager'] / med[k]:5.2f}x" for k in med if k != "eager")
    print(f"{name:44s} {line}   {ratios}   avx2/avx512 {med['avx2'] / med['avx512']:4.2f}x", flush=True)
    return med


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--ops", default="class_means,within_class_variance",
                    help="also: pairwise_geometry, nearest_class_center, etf_logits")
    args = ap.parse_args()
    ops = args.ops.split(",")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {args.reps}, fp32")
    if "class_means" in ops:
        for n, d, c in [(200_000, 512, 8192), (100_000, 768, 50257)]:
            h, y = make_inputs(n, d, c)
            run = lambda: ck.class_means(h, y, c)  # noqa: E731
            compare(f"class_means N={n} D={d} C={c}",
                    {"eager": lambda: eager_class_means(h, y, c),
                     "avx2": with_isa("avx2", run), "avx512": with_isa("avx512", run)}, args.reps)
            del h, y
    if "within_class_variance" in ops:
        n, d, c = 200_000, 512, 8192
        h, y = make_inputs(n, d, c)
        mu = ck.class_means(h, y, c)[0]
        run = lambda: ck.within_class_variance(h, y, mu)  # noqa: E731
        compare(f"within_class_variance N={n} D={d} C={c}",
                {"eager": lambda: eager_within_class_variance(h, y, mu),
                 "avx2": with_isa("avx2", run), "avx512": with_isa("avx512", run)}, args.reps)
    for op in ("pairwise_geometry", "nearest_class_center", "etf_logits"):
        if op not in ops:
            continue
        from collapsekit.benchmarks import WORKLOADS
        for w in WORKLOADS:  # the registered full-run CPU workload of that op (collapsekit bench)
            if w.op == op and w.full and "cpu" in w.devices and w.baselines:
                inp = w.make(torch.device("cpu"))
                eager = next(iter(w.baselines.values()))
                run = lambda: w.collapsekit(**inp)  # noqa: E731
                compare(f"{op} {w.label}", {"eager": lambda: eager(**inp), "avx2": with_isa("avx2", run),
                                             "avx512": with_isa("avx512", run)}, args.reps)
                break
    _C.set_isa("auto")


if __name__ == "__main__":
    main()
