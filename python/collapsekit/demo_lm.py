"""``collapsekit demo --lm``: linguistic collapse in miniature, on this machine, in about two minutes.

A tiny causal transformer (pure PyTorch: token + position embeddings, pre-LayerNorm blocks of
causal self-attention and an MLP, a final LayerNorm, an untied output embedding) is trained on the
characters of some of the Python standard library's own source files (they ship with Python:
nothing is downloaded). Every few epochs :func:`collapsekit.hf.collect_lm` measures the geometry of
its last hidden states against the next character (one pass, plus the NC4 pass) over the whole
training text -- the setting of "Linguistic Collapse" (Wu & Papyan, 2024), where the classes are
the vocabulary, heavily imbalanced, and ``C > D``.

:func:`run` returns the per-epoch rows; :func:`main` is the command.
"""
import math
import os
import sys
import time
import types
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

# the stdlib modules whose source is the corpus (plain, stable, English-heavy files)
SOURCES = ("textwrap.py", "heapq.py", "bisect.py", "string.py", "fnmatch.py", "shlex.py", "colorsys.py",
           "queue.py", "calendar.py", "fractions.py", "difflib.py", "argparse.py")

COLUMNS = [
    ("epoch", "epoch", "{:>5d}"),
    ("loss", "train_ce", "{:>8.4f}"),
    ("nc1", "nc1", "{:>9.3e}"),
    ("cdnv", "cdnv", "{:>9.3e}"),
    ("nc2_equinorm", "equinorm", "{:>8.4f}"),
    ("nc3", "nc3", "{:>7.4f}"),
    ("nc3_cos", "nc3_cos", "{:>7.4f}"),
    ("nc4", "nc4", "{:>7.4f}"),
]


def corpus(chars: int = 60_000) -> str:
    """The first ``chars`` characters of :data:`SOURCES` (files missing in this Python are skipped)."""
    root = os.path.dirname(os.__file__)
    parts, n = [], 0
    for name in SOURCES:
        path = os.path.join(root, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
        n += len(parts[-1])
        if n >= chars:
            break
    text = "".join(parts)[:chars]
    if len(text) < 1000:
        raise ValueError(f"demo --lm: found only {len(text)} characters of standard-library source under {root}")
    return text


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyCausalLM(nn.Module):
    """A minimal causal LM with the interface collect_lm uses (``get_output_embeddings``, a
    ``config.num_hidden_layers``, ``forward(input_ids, attention_mask=None, **kw)``)."""

    def __init__(self, vocab: int, dim: int = 64, layers: int = 2, heads: int = 4, max_len: int = 256):
        super().__init__()
        self.config = types.SimpleNamespace(num_hidden_layers=layers, vocab_size=vocab, hidden_size=dim)
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.layers = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, **kwargs):
        x = self.embed(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        for blk in self.layers:
            x = blk(x)
        return self.lm_head(self.norm(x))


def _fmt_header():
    return "  ".join(h.rjust(len(f.format(0 if k == "epoch" else 0.0))) for k, h, f in COLUMNS)


def _fmt_row(r):
    out = []
    for k, _, f in COLUMNS:
        v = r.get(k)
        w = len(f.format(0 if k == "epoch" else 0.0))
        out.append("-".rjust(w) if v is None or (isinstance(v, float) and math.isnan(v)) else f.format(v))
    return "  ".join(out)


def run(*, epochs: int = 40, every: Optional[int] = None, seed: int = 0, device: str = "cpu", chars: int = 60_000,
        seq_len: int = 64, dim: int = 64, layers: int = 2, heads: int = 4, batch_size: int = 32, lr: float = 3e-3,
        weight_decay: float = 0.01, threads: Optional[int] = None,
        echo: Optional[Callable[[str], None]] = print) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Train and measure. Returns ``(rows, info)``: one metric dict per measured epoch (epoch 0 =
    untrained; the last epoch always measured) and ``info`` (vocabulary, token counts, model)."""
    from .hf.lm import collect_lm

    for name, v, lo in (("epochs", epochs, 1), ("chars", chars, 1000), ("seq_len", seq_len, 2), ("dim", dim, 1),
                        ("layers", layers, 1), ("heads", heads, 1), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"demo --lm: {name} must be an int >= {lo}, got {v!r}")
    if dim % heads:
        raise ValueError(f"demo --lm: dim={dim} must be a multiple of heads={heads}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("demo --lm: device='cuda' was asked for but torch.cuda.is_available() is False")
    every = every or max(1, epochs // 10)
    text = corpus(chars)
    vocab = sorted(set(text))
    stoi = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    nseq = ids.numel() // seq_len
    seqs = ids[:nseq * seq_len].view(nseq, seq_len).to(dev)
    old = torch.get_num_threads()
    torch.set_num_threads(threads or 1)  # small matrices: one thread is as fast, and reproducible
    try:
        torch.manual_seed(seed)
        model = TinyCausalLM(len(vocab), dim, layers, heads, max_len=seq_len).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps = epochs * math.ceil(nseq / batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) *
                                                  (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
        g = torch.Generator().manual_seed(seed + 1)
        eval_batches = [seqs[i:i + 256] for i in range(0, nseq, 256)]
        info = {"vocab": vocab, "tokens": int(nseq * seq_len), "sequences": nseq, "seq_len": seq_len,
                "model": f"{layers} blocks, d={dim}, {heads} heads, {sum(p.numel() for p in model.parameters())} parameters"}
        if echo:
            echo(f"collapsekit demo --lm: {info['tokens']} characters of Python's own {', '.join(SOURCES[:3])}, ... "
                 f"({len(vocab)} distinct = the classes), {nseq} sequences of {seq_len}; causal transformer "
                 f"{info['model']} (D={dim} < C={len(vocab)}); AdamW(lr {lr}), {epochs} epochs; device {dev}")
            echo(_fmt_header())
        rows: List[Dict[str, Any]] = []
        t0 = time.perf_counter()

        def record(epoch):
            acc = collect_lm(model, eval_batches, decisions=True)
            m = acc.metrics(model.lm_head.weight.detach())
            with torch.no_grad():
                model.eval()
                loss = sum(float(torch.nn.functional.cross_entropy(
                    model(b)[:, :-1].reshape(-1, len(vocab)), b[:, 1:].reshape(-1), reduction="sum"))
                    for b in eval_batches) / (nseq * (seq_len - 1))
                model.train()
            m.update(epoch=epoch, loss=loss, seconds=time.perf_counter() - t0)
            rows.append(m)
            if echo:
                echo(_fmt_row(m))

        record(0)
        model.train()
        for epoch in range(1, epochs + 1):
            perm = torch.randperm(nseq, generator=g).to(dev)
            for i in range(0, nseq, batch_size):
                b = seqs[perm[i:i + batch_size]]
                logits = model(b)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, len(vocab)), b[:, 1:].reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if epoch % every == 0 or epoch == epochs:
                record(epoch)
        return rows, info
    finally:
        torch.set_num_threads(old)


def imbalance(rows: List[Dict[str, Any]], info: Dict[str, Any]) -> str:
    """Per-token summary of the last measurement: frequency against mean norm, variance and
    classifier norm (Spearman rank correlations), and the most and least frequent tokens."""
    pc = rows[-1]["per_class"]
    p = pc["present"]
    counts, mn, var, wn = (pc[k][p] for k in ("counts", "mean_norms", "variances", "weight_norms"))

    def spearman(a, b):
        ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
        ra, rb = ra - ra.mean(), rb - rb.mean()
        return float((ra * rb).sum() / (ra.norm() * rb.norm()))

    vocab = [c for c, keep in zip(info["vocab"], p.tolist()) if keep]
    order = counts.argsort(descending=True)
    show = lambda i: f"{vocab[i]!r}:{int(counts[i])}"  # noqa: E731
    return (f"imbalance across the {int(p.sum())} tokens (last epoch): token frequency vs ‖μ̃_c‖ rank correlation "
            f"{spearman(counts, mn):+.2f}, vs σ_c² {spearman(counts, var):+.2f}, vs ‖w_c‖ {spearman(counts, wn):+.2f}; "
            f"most frequent {', '.join(show(int(i)) for i in order[:5])}; rarest "
            f"{', '.join(show(int(i)) for i in order[-5:])}")


def plot(rows: List[Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(2, 4, figsize=(17, 7))
    for ax, (key, label) in zip(axes[0], [("loss", "train cross-entropy"), ("nc1", "NC1 Tr(Σ_W Σ_B⁺)/K"),
                                          ("cdnv", "CDNV"), ("nc3", "NC3 ‖W/‖W‖ − M̃/‖M̃‖‖²")]):
        ax.plot(ep, [r.get(key, float("nan")) for r in rows], marker="o", ms=3)
        if key != "loss":
            ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(True, which="both", alpha=0.3)
    pc = rows[-1]["per_class"]
    p = pc["present"]
    counts = pc["counts"][p].numpy()
    for ax, (key, label) in zip(axes[1], [("mean_norms", "‖μ_c − m_G‖"), ("variances", "σ_c²"),
                                          ("weight_norms", "‖w_c‖ (output embedding)")]):
        ax.scatter(counts, pc[key][p].numpy(), s=8)
        ax.set_xscale("log")
        ax.set_xlabel("token frequency")
        ax.set_title(f"{label}, last epoch", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[1][3]
    ax.plot(ep, [r.get("nc4", float("nan")) for r in rows], marker="o", ms=3)
    ax.set_title("NC4 nearest mean ≠ classifier", fontsize=10)
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)
    fig.suptitle("linguistic collapse in miniature: a tiny causal LM on Python's own source (collapsekit demo --lm)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args) -> int:
    t0 = time.perf_counter()
    try:
        rows, info = run(epochs=args.epochs if args.epochs is not None else 40, every=args.every, seed=args.seed,
                         device=args.device, threads=args.threads)
    except ValueError as e:
        print(f"collapsekit demo --lm: error: {e}", file=sys.stderr)
        return 2
    first, last = rows[0], rows[-1]
    print()
    print(f"{time.perf_counter() - t0:.1f} s. cross-entropy {first['loss']:.3f} -> {last['loss']:.3f}; "
          + "; ".join(f"{k} {first[k]:.3g} -> {last[k]:.3g}" for k in ("nc1", "cdnv", "nc3") if k in first and k in last))
    print(imbalance(rows, info))
    out = args.out if args.out is not None else "collapse_lm.png"
    if out:
        try:
            plot(rows, out)
        except ImportError:
            print(f"matplotlib is not installed, so {out} was not written (pip install matplotlib)")
        else:
            print(f"wrote {out}")
    return 0
