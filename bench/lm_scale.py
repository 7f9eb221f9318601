"""Issue 15's measurements: one pass vs two passes, the vocabulary-scale run, collect_lm overhead.

    python bench/lm_scale.py onepass  [--rows 200000 --dim 512 --classes 8192 --batch 65536 --reps 3]
    python bench/lm_scale.py vocab    [--rows 1000000 --dim 768 --classes 50257 --batch 65536]
    python bench/lm_scale.py collect  [--reps 5]
    (--json OUT for every part)

onepass: in-memory fp32 features streamed in batches through (a) ``update`` (one pass) and (b)
``update_means`` over all batches then ``update_variance`` (two passes), side by side, medians;
then the same with the batches *produced* per pass by a stand-in feature extractor (one fp32
``[batch, D] @ [D, D]`` layer + tanh), which is what a second pass costs in a real pipeline.
vocab: 1M synthetic Zipf-distributed "tokens" generated batch by batch (never all in memory),
one pass + the full metrics with a classifier; time and peak extra resident memory (generation
time reported apart). collect: a small GPT-2 config (random weights, built locally): the model's
own forward over the token batches vs ``collect_lm`` over the same batches (vs a two-pass pipeline
that runs the forward twice).
"""
import argparse
import json
import statistics
import time

import torch

import collapsekit as ck
from collapsekit import benchmarks


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def onepass(a):
    g = torch.Generator().manual_seed(0)
    n, d, c, bs = a.rows, a.dim, a.classes, a.batch
    centers = torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    h = centers[y] + 0.5 * torch.randn(n, d, generator=g)
    chunks = [(h[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]
    proj = torch.randn(d, d, generator=g) / d ** 0.5

    def one(make=None):
        acc = ck.CollapseAccumulator(c, d)
        for hb, yb in chunks:
            acc.update(make(hb) if make else hb, yb)
        return acc

    def two(make=None):
        acc = ck.CollapseAccumulator(c, d)
        for hb, yb in chunks:
            acc.update_means(make(hb) if make else hb, yb)
        for hb, yb in chunks:
            acc.update_variance(make(hb) if make else hb, yb)
        return acc

    extractor = lambda x: torch.tanh(x @ proj)  # noqa: E731
    rows = []
    for label, make in (("in-memory features", None), ("features produced per pass (1 layer D x D)", extractor)):
        cpu = torch.device("cpu")
        provs = {"one_pass": lambda: one(make), "two_passes": lambda: two(make)}
        for f in provs.values():
            benchmarks.time_call(f, cpu)
        times = {k: [] for k in provs}
        for _ in range(a.reps):
            for k, f in provs.items():
                times[k].append(benchmarks.time_call(f, cpu))
        med = {k: statistics.median(v) for k, v in times.items()}
        r1, r2 = one(make), two(make)
        row = dict(case=label, N=n, D=d, C=c, batch=bs, dtype="float32", median_s=med,
                   ratio=med["one_pass"] / med["two_passes"],
                   peak_extra_MB={k: (benchmarks.peak_extra_bytes(f, cpu) or 0) / 2**20 for k, f in provs.items()},
                   rel_diff=dict(means=_rel(r1.means, r2.means), variance_sums=_rel(r1.variance_sums, r2.variance_sums),
                                 covariance_sum=_rel(r1.covariance_sum, r2.covariance_sum)),
                   threads=torch.get_num_threads())
        print(json.dumps(row, indent=1))
        rows.append(row)
    return rows


def vocab(a):
    g = torch.Generator().manual_seed(0)
    n, d, c, bs = a.rows, a.dim, a.classes, a.batch
    centers = torch.randn(c, d, generator=g)
    weight = centers + 0.1 * torch.randn(c, d, generator=g)
    ranks = torch.arange(1, c + 1, dtype=torch.float64)
    zipf = (1.0 / ranks) / (1.0 / ranks).sum()          # token frequencies ~ 1/rank
    seeds = list(range(0, n, bs))

    def batch(i):
        gg = torch.Generator().manual_seed(1000 + i)
        m = min(bs, n - i)
        yb = torch.multinomial(zipf, m, replacement=True, generator=gg)
        return centers[yb].add_(torch.randn(m, d, generator=gg), alpha=0.5), yb

    t = time.perf_counter()
    for i in seeds:
        batch(i)
    gen_s = time.perf_counter() - t
    out = {}
    cpu = torch.device("cpu")

    def accumulate():
        t0 = time.perf_counter()
        acc = ck.CollapseAccumulator(c, d)
        for i in seeds:
            hb, yb = batch(i)
            acc.update(hb, yb)
        out["accumulate"] = time.perf_counter() - t0
        out["acc"] = acc

    def metrics():
        t0 = time.perf_counter()
        m = out["acc"].metrics(weight)
        out["metrics"] = time.perf_counter() - t0
        out["m"] = {k: v for k, v in m.items() if k != "per_class"}

    peak_acc = benchmarks.peak_extra_bytes(accumulate, cpu)   # includes the generated batch (~2 x 200 MB)
    peak_met = benchmarks.peak_extra_bytes(metrics, cpu)      # above the accumulator's own totals
    totals = sum(v.numel() * 8 for v in out["acc"]._local.values())
    mb = lambda b: None if b is None else b / 2**20  # noqa: E731
    row = dict(N=n, D=d, C=c, batch=bs, seconds_generation=gen_s,
               seconds_one_pass_incl_generation=out["accumulate"],
               seconds_one_pass_excl_generation=out["accumulate"] - gen_s, seconds_metrics=out["metrics"],
               seconds_total_excl_generation=out["accumulate"] - gen_s + out["metrics"],
               peak_extra_MB_accumulate=mb(peak_acc), accumulator_totals_MB=mb(totals),
               peak_extra_MB_metrics_above_totals=mb(peak_met),
               peak_extra_MB_total=None if peak_acc is None or peak_met is None else
               mb(max(peak_acc, peak_met + totals)),
               threads=torch.get_num_threads(), metrics=out["m"])
    print(json.dumps(row, indent=1))
    return [row]


def collect(a):
    import transformers

    from collapsekit.hf import collect_lm

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=a.vocab, n_positions=a.seq, n_embd=a.embd, n_layer=a.layers,
                                  n_head=max(1, a.embd // 64))
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, a.vocab, (a.bsz, a.seq), generator=g) for _ in range(a.nbatches)]
    cpu = torch.device("cpu")

    @torch.no_grad()
    def forward():
        for b in batches:
            model(input_ids=b, use_cache=False)

    @torch.no_grad()
    def two_pass():
        acc = ck.CollapseAccumulator(a.vocab, a.embd)
        feats = {}
        hook = model.get_output_embeddings().register_forward_pre_hook(lambda m, x: feats.__setitem__("h", x[0]))
        try:
            for b in batches:
                model(input_ids=b, use_cache=False)
                acc.update_means(feats["h"][:, :-1].reshape(-1, a.embd), b[:, 1:].reshape(-1))
            for b in batches:
                model(input_ids=b, use_cache=False)
                acc.update_variance(feats["h"][:, :-1].reshape(-1, a.embd), b[:, 1:].reshape(-1))
        finally:
            hook.remove()
        return acc

    @torch.no_grad()
    def body_forward():  # the forward without the output embedding: what collect_lm runs of the model
        for b in batches:
            model.transformer(input_ids=b, use_cache=False)

    provs = {"model_forward": forward, "body_forward": body_forward, "collect_lm": lambda: collect_lm(model, batches),
             "two_pass": two_pass}
    for f in provs.values():
        benchmarks.time_call(f, cpu)
    times = {k: [] for k in provs}
    for _ in range(a.reps):
        for k, f in provs.items():
            times[k].append(benchmarks.time_call(f, cpu))
    med = {k: statistics.median(v) for k, v in times.items()}
    row = dict(model=f"GPT-2 vocab={a.vocab} n_embd={a.embd} n_layer={a.layers}", tokens=a.nbatches * a.bsz * a.seq,
               batch=f"{a.bsz}x{a.seq}", median_s=med, overhead=med["collect_lm"] / med["model_forward"] - 1,
               overhead_vs_body=med["collect_lm"] / med["body_forward"] - 1,
               two_pass_over_forward=med["two_pass"] / med["model_forward"], threads=torch.get_num_threads())
    print(json.dumps(row, indent=1))
    return [row]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["onepass", "vocab", "collect"])
    ap.add_argument("--json")
    ap.add_argument("--rows", type=int)
    ap.add_argument("--dim", type=int)
    ap.add_argument("--classes", type=int)
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--bsz", type=int, default=8)
    ap.add_argument("--nbatches", type=int, default=4)
    a = ap.parse_args()
    defaults = {"onepass": (200_000, 512, 8192), "vocab": (1_000_000, 768, 50257), "collect": (0, 0, 0)}[a.part]
    a.rows = a.rows or defaults[0]
    a.dim = a.dim or defaults[1]
    a.classes = a.classes or defaults[2]
    rows = {"onepass": onepass, "vocab": vocab, "collect": collect}[a.part](a)
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
