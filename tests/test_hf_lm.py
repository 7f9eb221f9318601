"""collapsekit.hf.collect_lm on tiny random causal LMs built locally (nothing downloaded)."""
import pytest
import torch

import collapsekit as ck
from collapsekit import reference as ref

transformers = pytest.importorskip("transformers")
from collapsekit.hf import collect_lm  # noqa: E402
from collapsekit.hf.lm import output_classifier  # noqa: E402

V = 37


def tiny(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    elif kind == "mamba":
        cfg = transformers.MambaConfig(vocab_size=V, hidden_size=16, state_size=4, num_hidden_layers=2,
                                       expand=2, conv_kernel=3)
    else:
        cfg = transformers.Mamba2Config(vocab_size=V, hidden_size=16, state_size=8, num_hidden_layers=2, expand=2,
                                        head_dim=8, num_heads=4, n_groups=1, conv_kernel=3, chunk_size=8)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def token_batches(n=3, b=2, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (b, L), generator=g) for _ in range(n)]


def reference_stats(model, batches, index=-1):
    feats, labels, logits = [], [], []
    with torch.no_grad():
        for b in batches:
            ids, mask = (b, None) if isinstance(b, torch.Tensor) else (b["input_ids"], b.get("attention_mask"))
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            h = out.hidden_states[index][:, :-1]
            valid = torch.ones(ids[:, 1:].shape, dtype=torch.bool) if mask is None else (mask[:, :-1] & mask[:, 1:]).bool()
            feats.append(h[valid])
            labels.append(ids[:, 1:][valid])
            logits.append(out.logits[:, :-1][valid])
    return torch.cat(feats).double(), torch.cat(labels), torch.cat(logits)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mamba", "mamba2"])
def test_collect_lm_matches_hidden_states(kind):
    model = tiny(kind)
    batches = token_batches()
    acc = collect_lm(model, batches, decisions=True)
    h, y, logits = reference_stats(model, batches)
    w, b = output_classifier(model)
    # the last hidden state is the input of the output embedding
    torch.testing.assert_close((h @ w.double().t() + (0 if b is None else b.double())).float(), logits,
                               rtol=1e-4, atol=1e-4)
    means, counts = ref.class_means(h, y, V)
    torch.testing.assert_close(acc.counts, counts)
    torch.testing.assert_close(acc.means, means, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc.variance_sums, ref.within_class_variance(h, y, means), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(acc.covariance_sum, ref.within_class_covariance(h, y, means), rtol=1e-4, atol=1e-4)
    m = acc.metrics(w, b)
    want = ref.collapse_metrics(h, y, V, w.double(), None if b is None else b.double())
    for key in ("nc1", "cdnv", "nc3", "nc4"):
        assert m[key] == pytest.approx(want[key], rel=1e-3, abs=1e-6), key
    assert model.training is False and acc.batches["update"] == 3 and acc.batches["decisions"] == 3


def test_padding_layers_and_progress():
    model = tiny("gpt2")
    model.train()
    ids = token_batches(2, 3, 8, seed=1)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, 5:] = 0                                         # right padding
    mask[2, 2:] = 0
    batches = [{"input_ids": ids[0], "attention_mask": mask}, {"input_ids": ids[1]}]
    seen = []
    accs = collect_lm(model, batches, layers=[0, 1, -1], progress=seen.append)
    assert set(accs) == {0, 1, 2} and model.training       # the model's mode is restored
    assert float(accs[2].counts.sum()) == (4 + 7 + 1) + 3 * 7
    for index in (0, 1, 2):
        h, y, _ = reference_stats(model.eval(), batches, index)
        means, counts = ref.class_means(h, y, V)
        torch.testing.assert_close(accs[index].counts, counts)
        torch.testing.assert_close(accs[index].means, means, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(accs[index].variance_sums, ref.within_class_variance(h, y, means),
                                   rtol=1e-4, atol=1e-4)
    assert [s["tokens"] for s in seen] == [12, 33, 33] and seen[-1]["done"]
    # an accumulator passed in is added to
    acc = collect_lm(model, batches[:1])
    collect_lm(model, batches[1:], accumulator=acc)
    torch.testing.assert_close(acc.counts, accs[2].counts)


def test_errors():
    model = tiny("gpt2")
    with pytest.raises(TypeError, match="no output embedding"):
        collect_lm(transformers.GPT2Model(model.config), token_batches())
    with pytest.raises(ValueError, match=r"token 37, outside the vocabulary \[0, 37\)"):
        collect_lm(model, [torch.full((1, 4), V)])
    with pytest.raises(TypeError, match="one-shot iterator"):
        collect_lm(model, iter(token_batches()), decisions=True)
    with pytest.raises(ValueError, match="layer index 5 is out of range"):
        collect_lm(model, token_batches(), layers=[5])
    with pytest.raises(ValueError, match="accumulator is for C=3"):
        collect_lm(model, token_batches(), accumulator=ck.CollapseAccumulator(3, 16))
    with pytest.raises(TypeError, match="batches must yield"):
        collect_lm(model, [[1, 2, 3]])
