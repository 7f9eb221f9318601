"""State collapse in a Mamba-2 style recurrence, and the two mitigations of "Stuffed Mamba"
(Chen et al. 2024): "forget more" (decay_scale), state normalisation (state_norm_max) and the
sliding window (window=W: the state holds only the last W inputs, here W = the training length).

A randomly initialised SSD layer (Mamba-2's initialisation ranges, widened so that some heads
remember longer than the training length, as the long-memory heads of trained models do:
A_h = −exp(U(log 1e-4, log 16)), Δ = softplus(dt + dt_bias) with dt_bias set so that Δ starts
log-uniform in [1e-3, 1e-1]) is run on random inputs far past a "training length". Heads whose decay
is slow keep accumulating: their state norm ‖H_t‖_F keeps growing after the training length, which
is the state-collapse signature the paper measures. decay_scale < 1 bounds every head's memory; state_norm_max rescales the state at chunk
boundaries; window keeps every head's state at what it saw during training. The script plots the
per-head state norms of the four runs in one PNG.

    python examples/state_collapse.py [--length 16384] [--train-length 2048] [--out state_collapse.png]
"""
import argparse
import math

import torch

import collapsekit as ck


def layer(length, heads=8, headdim=32, dstate=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, length, heads, headdim, generator=g)
    B = torch.randn(1, length, 1, dstate, generator=g) / math.sqrt(dstate)
    C = torch.randn(1, length, 1, dstate, generator=g) / math.sqrt(dstate)
    dt = 0.5 * torch.randn(1, length, heads, generator=g)
    A = -torch.exp(torch.empty(heads).uniform_(math.log(1e-4), math.log(16.0), generator=g))
    # Mamba-2's dt initialisation (Δ0 log-uniform in [1e-3, 1e-1]); dt_bias = softplus⁻¹(Δ0)
    d0 = torch.exp(torch.empty(heads).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
    dt_bias = d0 + torch.log(-torch.expm1(-d0))
    return dict(x=x, dt=dt, A=A, B=B, C=C, dt_bias=dt_bias, dt_softplus=True)


def run(length, train_length, decay_scale=0.995, state_norm_max=2.0, chunk_size=256, seed=0, window=None):
    args = layer(length, seed=seed)
    window = train_length if window is None else window
    runs = {"plain": {}, f"decay_scale={decay_scale}": dict(decay_scale=decay_scale),
            f"state_norm_max={state_norm_max:g}": dict(state_norm_max=state_norm_max),
            f"window={window}": dict(window=window)}
    norms = {}
    for name, kw in runs.items():
        _, n = ck.ssd_scan(**args, chunk_size=chunk_size, return_state_norms=True, **kw)
        norms[name] = n[0]  # [length, heads]
    return norms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--train-length", type=int, default=2048)
    ap.add_argument("--decay-scale", type=float, default=0.995)
    ap.add_argument("--state-norm-max", type=float, default=2.0)
    ap.add_argument("--window", type=int, default=None, help="sliding window (default: the training length)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="state_collapse.png")
    a = ap.parse_args(argv)
    norms = run(a.length, a.train_length, a.decay_scale, a.state_norm_max, seed=a.seed, window=a.window)
    for name, n in norms.items():
        inside, beyond = n[: a.train_length].max(0).values, n[a.train_length:].max(0).values
        print(f"{name:>24}: max ‖H‖ per head within the training length {[round(v, 1) for v in inside.tolist()]}, "
              f"beyond it {[round(v, 1) for v in beyond.tolist()]}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(norms), figsize=(4.5 * len(norms), 4), sharey=True)
    t = torch.arange(1, a.length + 1)
    for ax, (name, n) in zip(axes, norms.items()):
        for h in range(n.shape[1]):
            ax.plot(t, n[:, h], lw=0.8, label=f"head {h}")
        ax.axvline(a.train_length, color="k", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step t (dashed: training length)")
    axes[0].set_ylabel("state norm ‖H_t‖_F")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Per-head SSD state norms past the training length (collapsekit.ssd_scan)")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return norms


if __name__ == "__main__":
    main()
