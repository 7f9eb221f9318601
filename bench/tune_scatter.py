"""Tile sweep for the Triton class-sum kernels on a GPU (prints medians in ms, writes JSON).

    python bench/tune_scatter.py --json OUT.json
Used to pick the defaults in kernels/scatter.py; results are committed under bench/results/.
"""
import argparse
import itertools
import json
import statistics

import torch

from collapsekit.kernels import scatter


def median_ms(fn, reps=15):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--all", action="store_true", help="also sweep the scan and atomic kernels")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    shapes = [(1_000_000, 4096, 50257), (1_000_000, 1024, 16)] + ([(200_000, 512, 8192)] if args.all else [])
    for n, d, c in shapes:
        h = torch.randn(n, d, device="cuda", generator=g, dtype=torch.float32).to(torch.bfloat16)
        y = torch.randint(0, c, (n, 1), device="cuda", generator=g)
        ref = scatter.class_sums(h, y, None, c, "atomic")[0]
        configs = [("sorted", bm, bd, nw) for bm, bd, nw in itertools.product([32, 64, 128], [64, 128, 256], [4, 8])]
        if args.all:
            configs += [("scan", bm, bd, nw) for bm, bd, nw in itertools.product([32, 64, 128], [32, 64, 128], [4, 8])
                        if bm * bd <= 64 * 128]
            configs += [("atomic", bm, bd, nw) for bm, bd, nw in itertools.product([32, 64], [128, 256], [4, 8])]
        for path, bm, bd, nw in configs:
            fn = lambda: scatter.class_sums(h, y, None, c, path, block_m=bm, block_d=bd, num_warps=nw)
            try:
                out = fn()[0]
            except Exception as e:  # e.g. a tile that needs more shared memory than the card has
                print(f"N={n} D={d} C={c} {path:6s} m={bm:3d} d={bd:3d} w={nw} skipped: {type(e).__name__}", flush=True)
                continue
            err = (out - ref).abs().max().item()
            t = median_ms(fn)
            rows.append(dict(N=n, D=d, C=c, path=path, block_m=bm, block_d=bd, num_warps=nw, ms=t, max_err=err))
            print(f"N={n} D={d} C={c} {path:6s} m={bm:3d} d={bd:3d} w={nw} {t:7.3f} ms  "
                  f"{h.numel() * 2 / t / 1e6:6.0f} GB/s  err={err:.2e}", flush=True)
        del h, y, ref
        torch.cuda.empty_cache()
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
