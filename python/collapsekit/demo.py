"""``collapsekit demo``: neural collapse, watched as it happens, on an embedded synthetic task.

A small MLP is trained on a fixed-seed Gaussian-mixture classification task (every class is a
mixture of a few Gaussian blobs placed at random, so the classes are not linearly separable in the
input and the network has to learn its features) well past zero training error -- the "terminal
phase of training" of Papyan, Han & Donoho (2020). Every few epochs the penultimate-layer features
of the whole training set are measured with :class:`collapsekit.CollapseAccumulator` (pass 1: class
means; pass 2: within-class scatter and the NC4 decisions) and ``metrics(weight, bias)`` of the last
layer. Nothing is downloaded.

:func:`run` returns the per-epoch rows (a list of dicts) so tests and notebooks can use them.
"""
import math
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from .accumulator import CollapseAccumulator

# the columns of the printed table: (row key, header, format)
COLUMNS = [
    ("epoch", "epoch", "{:>5d}"),
    ("train_error", "train_err", "{:>9.4f}"),
    ("loss", "train_ce", "{:>8.4f}"),
    ("nc1", "nc1", "{:>9.3e}"),
    ("cdnv", "cdnv", "{:>9.3e}"),
    ("etf_error", "etf_error", "{:>9.4f}"),
    ("nc2_equinorm", "equinorm", "{:>8.4f}"),
    ("nc3_cos", "nc3_cos", "{:>7.4f}"),
    ("nc4", "nc4", "{:>7.4f}"),
]


def make_dataset(classes: int, input_dim: int, per_class: int, *, blobs: int = 4, noise: float = 2.0,
                 seed: int = 0):
    """A fixed-seed Gaussian mixture: class c is an equal mixture of ``blobs`` isotropic Gaussians
    of std ``noise`` whose centres have N(0, 1) coordinates. With the defaults (32 input dims) the
    blob centres are ~8 apart and a sample lies ~11 from its own centre, so the classes overlap in
    the input: a linear classifier cannot fit them and the network needs many epochs to reach zero
    training error. Returns ``(x [classes·per_class, input_dim] fp32, y [classes·per_class] int64)``,
    shuffled."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, blobs, input_dim, generator=g)
    y = torch.arange(classes).repeat_interleave(per_class)
    blob = torch.randint(0, blobs, (y.numel(),), generator=g)
    x = centres[y, blob] + noise * torch.randn(y.numel(), input_dim, generator=g)
    perm = torch.randperm(y.numel(), generator=g)
    return x[perm].contiguous(), y[perm].contiguous()


class MLP(torch.nn.Module):
    """input -> [Linear, ReLU] x depth (last width = ``dim``, the measured features) -> Linear(C)."""

    def __init__(self, input_dim: int, width: int, dim: int, classes: int, depth: int = 3, batchnorm: bool = False):
        super().__init__()
        layers: List[torch.nn.Module] = []
        d = input_dim
        for i in range(depth):
            out = dim if i == depth - 1 else width
            layers += [torch.nn.Linear(d, out)] + ([torch.nn.BatchNorm1d(out)] if batchnorm else []) + [torch.nn.ReLU()]
            d = out
        self.body = torch.nn.Sequential(*layers)
        self.classifier = torch.nn.Linear(dim, classes)

    def forward(self, x):
        return self.classifier(self.body(x))


@torch.no_grad()
def measure(model: MLP, x: torch.Tensor, y: torch.Tensor, classes: int, batch_size: int = 1024) -> Dict[str, Any]:
    """Neural-collapse metrics of the penultimate features of ``(x, y)``, streamed in batches
    through a CollapseAccumulator (two passes + decisions), plus the train error and loss."""
    was_training = model.training
    model.eval()
    dim = model.classifier.in_features
    acc = CollapseAccumulator(classes, dim, device="cpu")
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    wrong, loss = 0, 0.0
    for xb, yb in batches:  # pass 1: class means
        acc.update_means(model.body(xb), yb)
    for xb, yb in batches:  # pass 2: within-class scatter against the frozen means; NC4 decisions
        h = model.body(xb)
        logits = model.classifier(h)
        acc.update_variance(h, yb)
        acc.update_decisions(h, logits)
        wrong += int((logits.argmax(1) != yb).sum())
        loss += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
    m = acc.metrics(weight=model.classifier.weight.detach(), bias=model.classifier.bias.detach())
    model.train(was_training)
    m["train_error"] = wrong / x.shape[0]
    m["loss"] = loss / x.shape[0]  # cross-entropy of the logits (whatever loss trains the net)
    return m


def format_header() -> str:
    return "  ".join(h.rjust(len(fmt.format(0 if k == "epoch" else 0.0))) for k, h, fmt in COLUMNS)


def format_row(row: Dict[str, Any]) -> str:
    cells = []
    for key, _, fmt in COLUMNS:
        v = row.get(key)
        width = len(fmt.format(0 if key == "epoch" else 0.0))
        cells.append("-".rjust(width) if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v))
    return "  ".join(cells)


def run(*, epochs: int = 150, classes: int = 10, dim: int = 128, seed: int = 0, device: str = "cpu",
        per_class: int = 300, input_dim: int = 32, width: int = 256, every: Optional[int] = None,
        lr: float = 0.05, weight_decay: float = 5e-3, batch_size: int = 128, threads: Optional[int] = None,
        noise: float = 2.0, blobs: int = 4, batchnorm: bool = True, loss_fn: str = "ce",
        echo: Optional[Callable[[str], None]] = print) -> List[Dict[str, Any]]:
    """Train the demo MLP and measure collapse. Returns one dict per measured epoch with the keys
    of :data:`COLUMNS` (and every other metric of ``CollapseAccumulator.metrics``, including
    ``per_class``). Epoch 0 is the untrained network; the last epoch is always measured.

    ``dim`` is the width of the penultimate layer (the features measured, D); ``input_dim`` the
    dimension of the synthetic inputs; ``every`` the measuring interval (default: ~15 points).
    """
    for name, v, lo in (("epochs", epochs, 1), ("classes", classes, 2), ("dim", dim, 1), ("per_class", per_class, 1),
                        ("input_dim", input_dim, 1), ("width", width, 1), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"demo: {name} must be an int >= {lo}, got {v!r}")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"demo: every must be an int >= 1, got {every!r}")
    if loss_fn not in ("ce", "mse"):
        raise ValueError(f"demo: loss_fn must be 'ce' or 'mse', got {loss_fn!r}")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"demo: device {device!r} is not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("demo: device='cuda' was asked for but torch.cuda.is_available() is False")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"demo: threads must be an int >= 1, got {threads!r}")
    every = every or max(1, epochs // 15)
    # One CPU thread by default: the matrices are small, so a second thread gains little when the
    # machine is idle and costs up to 10x when it is shared (OpenMP threads spin waiting for a core).
    # It also makes the run bit-reproducible for a given seed.
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads or 1)
    try:
        return _train(epochs, classes, dim, seed, dev, per_class, input_dim, width, every, lr, weight_decay,
                      batch_size, noise, blobs, batchnorm, loss_fn, echo)
    finally:
        torch.set_num_threads(old_threads)


def _train(epochs, classes, dim, seed, dev, per_class, input_dim, width, every, lr, weight_decay, batch_size,
           noise, blobs, batchnorm, loss_fn, echo):
    x, y = make_dataset(classes, input_dim, per_class, seed=seed, noise=noise, blobs=blobs)
    x, y = x.to(dev), y.to(dev)
    torch.manual_seed(seed)
    model = MLP(input_dim, width, dim, classes, batchnorm=batchnorm).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    # linear warm-up over 5 epochs, then cosine decay to 1% -- past zero error the small late
    # learning rate lets weight decay pull the features onto the simplex ETF
    total = epochs * steps_per_epoch
    warm = min(5 * steps_per_epoch, total // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    g = torch.Generator(device="cpu").manual_seed(seed + 1)

    rows: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    if echo:
        echo(f"collapsekit demo: {classes} classes x {per_class} samples, inputs in R^{input_dim}, MLP "
             f"{input_dim}-{width}-{width}-{dim}-{classes}{' with BatchNorm' if batchnorm else ''}, {epochs} epochs, "
             f"{loss_fn.upper()} loss, SGD(lr {lr}, momentum 0.9, weight decay {weight_decay}), "
             f"seed {seed}, device {dev}")
        echo(format_header())

    def record(epoch):
        m = measure(model, x, y, classes)
        m["epoch"] = epoch
        m["seconds"] = time.perf_counter() - t0
        rows.append(m)
        if echo:
            echo(format_row(m))

    record(0)
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(x.shape[0], generator=g).to(dev)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            if batchnorm and idx.numel() < 2:  # BatchNorm cannot train on a batch of one
                continue
            out = model(x[idx])
            if loss_fn == "mse":
                loss = torch.nn.functional.mse_loss(out, torch.nn.functional.one_hot(y[idx], classes).to(out.dtype)) * classes
            else:
                loss = torch.nn.functional.cross_entropy(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if epoch % every == 0 or epoch == epochs:
            record(epoch)
    return rows


def plot(rows: List[Dict[str, Any]], path: str, title: str = "") -> None:
    """Write the metrics-vs-epoch figure (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    zero = next((r["epoch"] for r in rows if r["train_error"] == 0), None)
    panels = [
        ("train_error", "train error", "symlog"),
        ("nc1", "NC1  Tr(Σ_W Σ_B⁺)/K", True),
        ("cdnv", "CDNV", True),
        ("etf_error", "NC2  ETF error", True),
        ("nc2_equinorm", "NC2  equinorm (std/mean ‖μ̃_c‖)", True),
        ("nc3", "NC3  ‖W/‖W‖ − M̃/‖M̃‖‖²", True),
        ("nc4", "NC4  NCC ≠ classifier", "symlog"),
        ("nc3_cos", "NC3  mean cos(w_c, μ̃_c)", False),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (key, label, log) in zip(axes.flat, panels):
        vals = [r.get(key, float("nan")) for r in rows]
        if log == "symlog":  # fractions that reach exactly 0: linear below one sample in 1000
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_ylim(bottom=0)
        elif log:
            # zeros cannot go on a log axis: show them at the floor of the positive values
            pos = [v for v in vals if v > 0]
            floor = min(pos) / 2 if pos else 1e-6
            vals = [max(v, floor) for v in vals]
            ax.set_yscale("log")
        ax.plot(ep, vals, marker="o", ms=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(True, which="both", alpha=0.3)
        if zero is not None:
            ax.axvline(zero, color="grey", ls="--", lw=1)
    fig.suptitle(title or "neural collapse during training (dashed: first epoch with zero training error)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(rows: List[Dict[str, Any]], seconds: float) -> str:
    first, last = rows[0], rows[-1]
    nc1 = lambda r: r.get("nc1", float("nan"))
    text = (f"{seconds:.1f} s. nc1 {nc1(first):.3g} -> {nc1(last):.3g} ({nc1(first) / nc1(last):.0f}x lower); "
            f"train error {first['train_error']:.3f} -> {last['train_error']:.3f}")
    zero = next((r for r in rows if r["train_error"] == 0), None)
    if zero is not None and zero is not last:
        text += (f"; from the first zero-error epoch ({zero['epoch']}) on, nc1 fell {nc1(zero) / nc1(last):.1f}x more "
                 "(the terminal phase of training)")
    elif zero is None:
        text += "; the training error never reached zero (try more --epochs)"
    return text


def main(args) -> int:
    """The ``collapsekit demo`` subcommand (args from cli.py)."""
    if getattr(args, "lm", False):
        from . import demo_lm

        return demo_lm.main(args)
    if getattr(args, "epochs", None) is None:
        args.epochs = 150
    if getattr(args, "out", None) is None:
        args.out = "collapse.png"
    t0 = time.perf_counter()
    try:
        rows = run(epochs=args.epochs, classes=args.classes, dim=args.dim, seed=args.seed, device=args.device,
                   per_class=args.per_class, every=args.every, loss_fn=args.loss, threads=args.threads)
    except ValueError as e:
        print(f"collapsekit demo: error: {e}", file=sys.stderr)
        return 2
    print()
    print(summary(rows, time.perf_counter() - t0))
    if args.out:
        try:
            plot(rows, args.out)
        except ImportError:
            print(f"matplotlib is not installed, so {args.out} was not written (pip install matplotlib)")
        else:
            print(f"wrote {args.out}")
    return 0
