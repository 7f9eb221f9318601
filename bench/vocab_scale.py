"""The whole-vocabulary analysis of issue 4: collapse_metrics with a classifier at C=32768, D=256,
N=100k on CPU, with its time and peak extra memory (resident-set growth).

    python bench/vocab_scale.py [--json OUT]
"""
import argparse
import json
import time

import torch

import collapsekit as ck
from collapsekit import benchmarks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--classes", type=int, default=32768)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--rows", type=int, default=100_000)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    c, d, n = a.classes, a.dim, a.rows
    centers = torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    h = centers[y] + 0.5 * torch.randn(n, d, generator=g)
    weight = centers + 0.1 * torch.randn(c, d, generator=g)
    bias = torch.zeros(c)
    result = {}

    def run():
        t = time.perf_counter()
        result["metrics"] = ck.collapse_metrics(h, y, c, weight, bias)
        result["seconds"] = time.perf_counter() - t

    peak = benchmarks.peak_extra_bytes(run, torch.device("cpu"))
    m = {k: v for k, v in result["metrics"].items() if k != "per_class"}
    row = dict(C=c, D=d, N=n, seconds=result["seconds"], peak_extra_MB=None if peak is None else peak / 2**20,
               threads=torch.get_num_threads(), metrics=m)
    print(json.dumps(row, indent=1))
    if a.json:
        json.dump(row, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
