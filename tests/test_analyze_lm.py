"""`collapsekit analyze-lm` on a tiny random GPT-2 saved to a temporary directory, and `demo --lm`."""
import json

import numpy as np
import pytest
import torch

from collapsekit import cli

transformers = pytest.importorskip("transformers")
V = 41


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    return str(path)


def ids(shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def test_analyze_lm_formats_agree_and_match_collect_lm(model_dir, tmp_path, capsys):
    from collapsekit.hf import collect_lm
    from collapsekit.hf.lm import output_classifier

    toks = ids((6, 12))
    np.save(tmp_path / "t.npy", toks.numpy().astype(np.int32))
    torch.save(toks.reshape(-1), tmp_path / "t.pt")                      # a 1-D stream
    from safetensors.torch import save_file
    save_file({"input_ids": toks}, str(tmp_path / "t.safetensors"))
    out = tmp_path / "m.json"
    rc = cli.main(["analyze-lm", model_dir, str(tmp_path / "t.npy"), "--batch-size", "4", "--layers", "1",
                   "--decisions", "--json", str(out), "--plot", str(tmp_path / "p.png")])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "tokens/s" in text.err and "ETA" in text.err
    assert "cdnv" in text.out and "layer 2 (out)" in text.out and "layer 1" in text.out
    assert (tmp_path / "p.png").stat().st_size > 0
    got = json.load(open(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    acc = collect_lm(model, [toks[:4], toks[4:]], decisions=True)
    want = acc.metrics(*output_classifier(model))
    for key in ("nc1", "cdnv", "nc3", "nc4"):
        assert got["layers"]["2"][key] == pytest.approx(want[key], rel=1e-6), key
    assert got["num_samples"] == 6 * 11 and "per_class" in got["layers"]["2"]
    for name, extra in (("t.pt", ["--seq-len", "12"]), ("t.safetensors", [])):
        out2 = tmp_path / (name + ".json")
        assert cli.main(["analyze-lm", model_dir, str(tmp_path / name), "--quiet", "--json", str(out2)] + extra) == 0
        assert json.load(open(out2))["layers"]["2"]["cdnv"] == pytest.approx(want["cdnv"], rel=1e-6), name
    # --min-count: rare tokens drop out, per-class arrays keep every token
    out3 = tmp_path / "min.json"
    assert cli.main(["analyze-lm", model_dir, str(tmp_path / "t.npy"), "--quiet", "--min-count", "3",
                     "--json", str(out3)]) == 0
    m3 = json.load(open(out3))["layers"]["2"]
    counts = np.array(m3["per_class"]["counts"])
    assert m3["num_present"] == int((counts >= 3).sum()) and len(m3["per_class"]["present"]) == V


@pytest.mark.parametrize("case,match", [
    ("no_model", "no such model directory"),
    ("no_tokens", "no such file"),
    ("too_big", "has token id 41, outside the model's vocabulary"),
    ("3d", r"must be \[num_seqs, L\] or a 1-D stream"),
    ("1d_no_len", "needs --seq-len"),
    ("float", "must be integers"),
    ("not_lm", "cannot load it as a causal LM"),
    ("ext", "unknown file type"),
])
def test_analyze_lm_bad_inputs(model_dir, tmp_path, capsys, case, match):
    mdir, tok = model_dir, tmp_path / "t.npy"
    np.save(tok, ids((2, 8)).numpy())
    if case == "no_model":
        mdir = str(tmp_path / "nothing")
    elif case == "no_tokens":
        tok = tmp_path / "missing.npy"
    elif case == "too_big":
        a = ids((2, 8)).numpy()
        a[1, 3] = V
        np.save(tok, a)
    elif case == "3d":
        np.save(tok, ids((2, 2, 8)).numpy())
    elif case == "1d_no_len":
        np.save(tok, ids((16,)).numpy())
    elif case == "float":
        np.save(tok, np.zeros((2, 8), dtype=np.float32))
    elif case == "not_lm":
        mdir = tmp_path / "vit"
        transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=8).save_pretrained(mdir)
        mdir = str(mdir)
    elif case == "ext":
        tok = tmp_path / "t.txt"
        tok.write_text("1 2 3")
    rc = cli.main(["analyze-lm", mdir, str(tok), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("collapsekit analyze-lm: error:") and len(err.splitlines()) == 1, err
    assert pytest.importorskip("re").search(match, err), err


def test_demo_lm_short_run(tmp_path):
    from collapsekit import demo_lm

    rows, info = demo_lm.run(epochs=2, every=1, chars=3000, seq_len=16, dim=16, layers=1, heads=2,
                             batch_size=16, lr=1e-2, echo=None)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[-1]["loss"] < rows[0]["loss"]
    for key in ("nc1", "cdnv", "nc3", "nc4"):
        assert all(key in r for r in rows), key
    assert len(info["vocab"]) == rows[0]["per_class"]["counts"].numel()
    assert "rank correlation" in demo_lm.imbalance(rows, info)
    demo_lm.plot(rows, str(tmp_path / "lm.png"))
    assert (tmp_path / "lm.png").stat().st_size > 0
