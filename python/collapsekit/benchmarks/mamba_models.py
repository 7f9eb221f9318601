"""Mamba in real models (issue 14): the decode step against transformers' torch step, and whole
transformers models patched with collapsekit.hf against transformers' own CPU path.

The model rows need transformers (the ``hf`` extra); without it only the decode-step rows register.
Models are built locally from small random configs (nothing is downloaded).
"""
import copy

import torch

import collapsekit as ck
from collapsekit.ops import state_update as _su

from .workload import Workload, register

STEPS = 100  # decode-step rows time this many steps per call (one step is tens of microseconds)


# ------------------------------------------------------------------------------------------------
# selective_state_update: one decode step
# ------------------------------------------------------------------------------------------------

def eager_state_update(state, x, dt, A, B, C, D, dt_bias):
    """transformers' torch step for Mamba-2 (the same operations as its
    ``mamba2_selective_state_update``): discretise, update, read out with a bmm."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    d = torch.nn.functional.softplus(dt + dt_bias)[..., None]
    dA = torch.exp(d * A)
    Bh = B.reshape(b, g, 1, n).expand(b, g, h // g, n).reshape(b, h, 1, n)
    Ch = C.reshape(b, g, 1, n).expand(b, g, h // g, n).reshape(b * h, n, 1)
    new = state * dA + d * Bh * x[..., None]
    state.copy_(new)
    return torch.bmm(new.view(b * h, p, n), Ch).view(b, h, p) + x * D


def _step_inputs(b, h, p, g, n, device):
    gen = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)
    return dict(state=r(b, h, p, n), x=r(b, h, p), dt=r(b, h, 1).expand(b, h, p),
                A=(-torch.rand(h, generator=gen, device=device))[:, None, None].expand(h, p, n), B=r(b, g, n),
                C=r(b, g, n), D=r(h)[:, None].expand(h, p), dt_bias=r(h)[:, None].expand(h, p))


def _repeat(fn):
    def run(**inp):
        with torch.no_grad():
            for _ in range(STEPS):
                out = fn(**inp)
        return out
    run.__name__ = getattr(fn, "__name__", "fn")
    return run


def _ck_step(state, x, dt, A, B, C, D, dt_bias):
    return ck.selective_state_update(state, x, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=True)


def _kernel_only(state, x, dt, A, B, C, D, dt_bias):
    """The C++ call alone with prepared arguments: public-call time minus this = Python overhead."""
    sizes, strides = _su._canonical(state, x, dt, A, B, C, D, None, dt_bias, None)
    out = torch.empty(x.shape)
    a = _su._args(state, x, dt, A, B, C, D, None, dt_bias, None, -1, True, 1.0, out, sizes, strides)
    f = ck._dispatch.cpp().selective_state_update
    for _ in range(STEPS):
        f(a)
    return out


def _step_workload(b, h, p, g, n, quick=False, full=True):
    elt = 4
    return Workload(op=f"selective_state_update x{STEPS}", shape=dict(b=b, h=h, p=p, g=g, n=n), dtype=torch.float32,
                    make=lambda device: _step_inputs(b, h, p, g, n, device),
                    baselines={"eager": _repeat(eager_state_update)}, collapsekit=_repeat(_ck_step),
                    variants={"cpu": {"kernel_only": _kernel_only}},
                    bytes_moved=lambda inp: STEPS * 2 * b * h * p * n * elt,
                    floor_bytes=lambda inp: b * h * p * n * elt, devices=("cpu", "cuda"), quick=quick, full=full,
                    # in-place steps: outputs of two separate runs are compared on fresh states
                    check=_check_step)


def _check_step(got, want, inp):
    # both ran STEPS steps from different states (the baseline ran after collapsekit): recompute one
    # step of each from the same state
    s1, s2 = inp["state"].clone(), inp["state"].clone()
    o1 = _ck_step(s1, inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["dt_bias"])
    o2 = eager_state_update(s2, inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["dt_bias"])
    torch.testing.assert_close(o1, o2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-4)


register(_step_workload(1, 24, 64, 1, 128))  # one step of Mamba-2-130m-like layer (issue 14's goal shape)
register(_step_workload(2, 4, 16, 2, 16, quick=True, full=False))


# ------------------------------------------------------------------------------------------------
# whole transformers models: patched (collapsekit.hf) vs transformers' own CPU path
# ------------------------------------------------------------------------------------------------

def _hf_available():
    try:
        from collapsekit.hf import patching
        patching._transformers()
        return True
    except Exception:
        return False


def _mamba2_model(hidden=256, layers=4, vocab=1024):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, expand=2,
                                    head_dim=64, num_heads=2 * hidden // 64, state_size=128, n_groups=1,
                                    chunk_size=256, tie_word_embeddings=True)
    return transformers.Mamba2ForCausalLM(cfg)


def _mamba_model(hidden=256, layers=4, vocab=1024):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, expand=2,
                                   state_size=16, tie_word_embeddings=True)
    return transformers.MambaForCausalLM(cfg)


def _model_inputs(build, L, train):
    def make(device):
        import collapsekit.hf as ckhf
        hf = build().to(device)
        hf.train(train)
        patched = ckhf.patch(copy.deepcopy(hf))
        ids = torch.randint(0, hf.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(1)).to(device)
        return dict(hf=hf, patched=patched, ids=ids)
    return make


def _forward(which):
    def run(hf, patched, ids):
        with torch.no_grad():
            return (hf if which == "hf" else patched)(ids).logits
    run.__name__ = f"{which}_forward"
    return run


def _train_step(which):
    def run(hf, patched, ids):
        m = hf if which == "hf" else patched
        loss = m(ids, labels=ids).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
        m.zero_grad(set_to_none=True)
        return loss.detach(), grads
    run.__name__ = f"{which}_train_step"
    return run


def _decode(which, new_tokens=64):
    def run(hf, patched, ids):
        m = hf if which == "hf" else patched
        with torch.no_grad():
            return m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0)
    run.__name__ = f"{which}_decode"
    return run


def _check_tokens(got, want, inp):
    if not torch.equal(got, want):
        raise AssertionError("greedy generations differ between transformers and the patched model")


def _model_workload(name, build, L, kind, hidden, layers, quick=False, full=True):
    fn = {"forward": _forward, "train": _train_step, "decode": _decode}[kind]
    return Workload(op=f"hf_{name}_{kind}", shape=dict(hidden=hidden, layers=layers, L=L) if kind != "decode"
                    else dict(hidden=hidden, layers=layers, prompt=L, new=64),
                    dtype=torch.float32, make=_model_inputs(build, L, kind == "train"),
                    baselines={"hf": fn("hf")}, collapsekit=fn("patched"),
                    bytes_moved=lambda inp: sum(p.numel() * 4 for p in inp["hf"].parameters()),
                    floor_bytes=lambda inp: sum(p.numel() * 4 for p in inp["hf"].parameters()),
                    devices=("cpu",), compile=False, check=_check_tokens if kind == "decode" else None,
                    quick=quick, full=full,
                    rtol=1e-3)


if _hf_available():
    register(_model_workload("mamba2", _mamba2_model, 2048, "forward", 256, 4))
    register(_model_workload("mamba2", _mamba2_model, 2048, "train", 256, 4))
    register(_model_workload("mamba", _mamba_model, 512, "forward", 256, 4))
    # transformers' Mamba-1 training step at L=512 takes ~3 minutes per call on a 2-core VM (its
    # Python loop over L, differentiated): out of the full run, `collapsekit bench --op hf_mamba_train`
    register(_model_workload("mamba", _mamba_model, 512, "train", 256, 4, full=False))
    register(_model_workload("mamba2", _mamba2_model, 16, "decode", 256, 4))
    register(_model_workload("mamba", _mamba_model, 16, "decode", 256, 4))
    register(_model_workload("mamba2", lambda: _mamba2_model(64, 2, 128), 128, "forward", 64, 2, quick=True, full=False))
