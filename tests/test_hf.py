"""collapsekit.hf: transformers' Mamba / Mamba-2 on collapsekit. Tiny random configs, nothing downloaded."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import collapsekit.hf as ckhf  # noqa: E402
from collapsekit.hf import patching  # noqa: E402

try:
    patching._transformers()
except RuntimeError as e:  # pragma: no cover - an unsupported version installed
    pytest.skip(str(e), allow_module_level=True)


def mamba2_config(**kw):
    c = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, state_size=8, n_groups=2,
             expand=2, chunk_size=8, conv_kernel=4, tie_word_embeddings=False)
    c.update(kw)
    return transformers.Mamba2Config(**c)


def mamba_config(**kw):
    c = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
             time_step_rank=4)
    c.update(kw)
    return transformers.MambaConfig(**c)


def build(kind, causal=True, seed=0, **kw):
    torch.manual_seed(seed)
    if kind == "mamba2":
        cls = transformers.Mamba2ForCausalLM if causal else transformers.Mamba2Model
        m = cls(mamba2_config(**kw))
    else:
        cls = transformers.MambaForCausalLM if causal else transformers.MambaModel
        m = cls(mamba_config(**kw))
    return m.eval()


def ids(L=21, b=2, seed=1):
    return torch.randint(0, 61, (b, L), generator=torch.Generator().manual_seed(seed))


def out_of(model, x, **kw):
    o = model(x, **kw)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


KINDS = ["mamba", "mamba2"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [True, False])
def test_forward_matches_hf(kind, causal):
    hf = build(kind, causal)
    ours = ckhf.patch(copy.deepcopy(hf))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(out_of(ours, x), out_of(hf, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_equal(kind):
    hf = build(kind)
    ours = ckhf.patch(copy.deepcopy(hf))
    x = ids(L=7, b=1)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(x, **kw), hf.generate(x, **kw))


@pytest.mark.parametrize("kind", KINDS)
def test_training_step_gradients(kind):
    hf = build(kind).train()
    ours = ckhf.patch(copy.deepcopy(hf))
    x = ids(L=19)
    for m in (hf, ours):
        m.zero_grad()
        m(x, labels=x).loss.backward()
    for (name, p), (_, q) in zip(hf.named_parameters(), ours.named_parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


def _cache_of(out):
    for name in ("cache_params", "past_key_values"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    raise AssertionError("no cache returned")


def _run_pieces(model, x, cuts):
    """Feed x in pieces [0, c1), [c1, c2), ... through the cache; return all logits."""
    logits, cache = [], None
    bounds = [0, *cuts, x.shape[1]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        kw = dict(use_cache=True)
        if cache is not None:
            kw["cache"] = cache
        out = model(x[:, a:b], **kw)
        cache = _cache_of(out)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_steps_equal_full_forward(kind):
    ours = ckhf.patch(build(kind))
    x = ids(L=15)
    with torch.no_grad():
        full = ours(x).logits
        steps = _run_pieces(ours, x, list(range(5, 15)))
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_multi_token_continuation_exact(kind):
    ours = ckhf.patch(build(kind))
    x = ids(L=24)
    with torch.no_grad():
        full = ours(x).logits
        pieces = _run_pieces(ours, x, [6, 15, 16])  # prefill, a 9-token continuation, one step, a continuation
    torch.testing.assert_close(pieces, full, rtol=1e-4, atol=1e-4)


def test_hf_mamba1_itself_drops_state_on_continuation():
    """What the patch fixes: transformers' own Mamba-1 restarts from a zero state mid-sequence."""
    hf = build("mamba")
    x = ids(L=20)
    with torch.no_grad():
        full = hf(x).logits
        pieces = _run_pieces(hf, x, [8])
    assert not torch.allclose(pieces[:, 8:], full[:, 8:], rtol=1e-3, atol=1e-3)


def test_unpatch_restores_and_other_models_unaffected():
    a, b = build("mamba2"), build("mamba2")
    x = ids()
    with torch.no_grad():
        want = a(x).logits
        ckhf.patch(a, decay_scale=0.5)
        changed = a(x).logits
        assert not torch.allclose(changed, want)
        torch.testing.assert_close(b(x).logits, want)  # same weights, not patched
        assert "forward" not in b.backbone.layers[0].mixer.__dict__
        ckhf.patch(a, decay_scale=0.5)  # idempotent
        torch.testing.assert_close(a(x).logits, changed)
        ckhf.unpatch(a)
        assert "forward" not in a.backbone.layers[0].mixer.__dict__
        torch.testing.assert_close(a(x).logits, want)


def test_state_norms_and_mitigations():
    m = ckhf.patch(build("mamba2"), record_state_norms=True)
    x = ids(L=20)
    with torch.no_grad():
        out = m(x[:, :12], use_cache=True)
        norms = ckhf.state_norms(m)
        assert set(norms) == {0, 1} and norms[0].shape == (2, 12, 4)
        m(x[:, 12:13], cache=_cache_of(out), use_cache=True)
        step = ckhf.state_norms(m)[0]
        assert step.shape == (2, 13, 4)
        full = ckhf.patch(build("mamba2"), record_state_norms=True)
        full(x[:, :13])
        torch.testing.assert_close(step, ckhf.state_norms(full)[0], rtol=1e-4, atol=1e-5)
        # state normalisation bounds the state entering every chunk; the decode steps apply it too
        tau = 0.01
        full(x)
        ref_n = ckhf.state_norms(full)[0]
        clipped = ckhf.patch(build("mamba2"), state_norm_max=tau, record_state_norms=True)
        one = clipped(x).logits
        n1 = ckhf.state_norms(clipped)[0]
        assert float(ref_n[:, 8:].max()) > 2 * tau and float(n1.max()) < float(ref_n.max())
        pieces = _run_pieces(clipped, x, list(range(8, 20)))  # prefill of one chunk, then steps across a boundary
        torch.testing.assert_close(pieces, one, rtol=1e-4, atol=1e-4)
        if patching._ssd_supports("seq_offset"):  # multi-token continuations across chunk boundaries too
            pieces = _run_pieces(clipped, x, [5, 13, 14, 18])
            torch.testing.assert_close(pieces, one, rtol=1e-4, atol=1e-4)
        # forgetting more shrinks the states
        forget = ckhf.patch(build("mamba2"), decay_scale=0.7, record_state_norms=True)
        forget(x[:, :13])
        assert float(ckhf.state_norms(forget)[0][:, -1].mean()) < float(step[:, -1].mean())
    m1 = ckhf.patch(build("mamba"), record_state_norms=True)
    with torch.no_grad():
        m1(x)
    assert ckhf.state_norms(m1)[1].shape == (2, 64, 20)


def test_errors():
    with pytest.raises(TypeError, match="Linear has no Mamba or Mamba-2 mixer"):
        ckhf.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        ckhf.patch("model")
    with pytest.raises(ValueError, match="decay_scale must be a float in"):
        ckhf.patch(build("mamba2"), decay_scale=1.5)
    with pytest.raises(ValueError, match="state_norm_max must be None or a positive"):
        ckhf.patch(build("mamba2"), state_norm_max=0)
    with pytest.raises(ValueError, match="Mamba-2 .* mitigations"):
        ckhf.patch(build("mamba"), decay_scale=0.9)
    with pytest.raises(ValueError, match="not patched"):
        ckhf.state_norms(build("mamba2"))
    with pytest.raises(ValueError, match="without record_state_norms"):
        ckhf.state_norms(ckhf.patch(build("mamba2")))


def test_version_check(monkeypatch):
    import sys

    model = build("mamba2")
    # building a model can re-import the lazy `transformers` module: patch the one in sys.modules
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.0")
    with pytest.raises(RuntimeError, match=r"supports transformers >= 5.24, < 6; found transformers 4.57.0"):
        ckhf.patch(model)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_step_with_grad_is_differentiable(kind):
    """A one-token cached call under grad mode takes the (differentiable) scan, same values."""
    m = ckhf.patch(build(kind))
    x = ids(L=9)
    with torch.no_grad():
        want = _run_pieces(m, x, [8])
    got = _run_pieces(m, x, [8])
    got[:, -1].sum().backward()
    assert m.lm_head.weight.grad is not None
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
