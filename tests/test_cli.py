"""`collapsekit demo` and `collapsekit analyze`: the per-epoch rows, the figure, the file formats
(metrics equal collapse_metrics), the JSON, and one clear line + exit status 2 for every bad input."""
import json
import math
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import collapsekit as ck
from collapsekit import analyze as an
from collapsekit import cli
from collapsekit import demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------

def test_demo_rows_show_collapse():
    rows = demo.run(epochs=30, classes=4, dim=16, per_class=60, width=64, every=5, seed=1, echo=None)
    assert [r["epoch"] for r in rows] == [0, 5, 10, 15, 20, 25, 30]
    for r in rows:
        for key, _, _ in demo.COLUMNS:
            assert key in r and math.isfinite(r[key]), (key, r.get(key))
        assert r["num_present"] == 4 and 0 <= r["train_error"] <= 1 and 0 <= r["nc4"] <= 1
    first, last = rows[0], rows[-1]
    assert first["train_error"] > 0.5 and last["train_error"] == 0  # seeds 1-4 all reach 0 by epoch 30
    assert last["nc1"] < first["nc1"] / 30, [r["nc1"] for r in rows]  # seeds 1-4: 125x-360x
    assert last["nc3_cos"] > first["nc3_cos"] + 0.3


def test_demo_rows_are_the_accumulator_metrics():
    """The row's metrics are CollapseAccumulator.metrics of the penultimate features (recomputed
    here in one pass with collapse_metrics on the same model)."""
    x, y = demo.make_dataset(3, 8, 20, seed=5)
    torch.manual_seed(0)
    model = demo.MLP(8, 32, 12, 3, batchnorm=True).eval()
    m = demo.measure(model, x, y, 3, batch_size=16)  # 4 batches
    with torch.no_grad():
        h = model.body(x)
        ref = ck.collapse_metrics(h, y, 3, model.classifier.weight, model.classifier.bias)
        err = float((model.classifier(h).argmax(1) != y).float().mean())
    for key in ("nc1", "cdnv", "etf_error", "nc2_equinorm", "nc3_cos", "nc4"):
        assert m[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-9), key
    assert m["train_error"] == pytest.approx(err)


def test_demo_is_reproducible_and_seeded():
    kw = dict(epochs=2, classes=3, dim=8, per_class=20, width=16, echo=None)
    a, b, c = demo.run(seed=3, **kw), demo.run(seed=3, **kw), demo.run(seed=4, **kw)
    assert [r["nc1"] for r in a] == [r["nc1"] for r in b]
    assert [r["nc1"] for r in a] != [r["nc1"] for r in c]


def test_demo_bad_arguments():
    with pytest.raises(ValueError, match="classes must be an int >= 2"):
        demo.run(classes=1, echo=None)
    with pytest.raises(ValueError, match="epochs"):
        demo.run(epochs=0, echo=None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            demo.run(device="cuda", echo=None)


def test_demo_command_prints_table_and_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "c.png"
    out = subprocess.run([sys.executable, "-m", "collapsekit", "demo", "--epochs", "4", "--classes", "3", "--dim", "8",
                          "--per-class", "30", "--every", "2", "--seed", "2", "--out", str(png)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.split()[:3] == ["epoch", "train_err", "train_ce"])
    epochs = [int(l.split()[0]) for l in lines[header + 1:header + 4]]
    assert epochs == [0, 2, 4]
    assert "nc1" in lines[header] and "etf_error" in lines[header] and "nc4" in lines[header]
    assert f"wrote {png}" in out.stdout
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_demo_command_bad_device_is_one_line():
    out = subprocess.run([sys.executable, "-m", "collapsekit", "demo", "--device", "nonsense", "--out", ""],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "device" in out.stderr


# ------------------------------------------------------------------------------------------------
# analyze: formats
# ------------------------------------------------------------------------------------------------

def _data(n=300, d=6, c=5, seed=0, classifier=True):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    y[:c] = torch.arange(c)
    h = 3 * torch.randn(c, d, generator=g)[y] + torch.randn(n, d, generator=g)
    out = {"features": h, "labels": y}
    if classifier:
        out["weight"] = torch.randn(c, d, generator=g)
        out["bias"] = torch.randn(c, generator=g)
    return out


def _save(tmp_path, data, fmt):
    if fmt == "pt":
        p = tmp_path / "f.pt"
        torch.save(data, p)
    elif fmt == "pt-legacy":
        p = tmp_path / "f.pth"
        torch.save(data, p, _use_new_zipfile_serialization=False)
    elif fmt == "npz":
        p = tmp_path / "f.npz"
        np.savez(p, **{k: v.numpy() for k, v in data.items()})
    elif fmt == "npz-compressed":
        p = tmp_path / "f.npz"
        np.savez_compressed(p, **{k: v.numpy() for k, v in data.items()})
    else:
        st = pytest.importorskip("safetensors.torch")
        p = tmp_path / "f.safetensors"
        st.save_file({k: v.contiguous() for k, v in data.items()}, str(p))
    return str(p)


FORMATS = ["pt", "pt-legacy", "npz", "npz-compressed", "safetensors"]
MODES = {"pt": "memory-mapped", "pt-legacy": "read whole", "npz": "memory-mapped", "npz-compressed": "streamed",
         "safetensors": "safetensors"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_analyze_matches_collapse_metrics(tmp_path, fmt):
    data = _data()
    path = _save(tmp_path, data, fmt)
    m = an.analyze(path, batch_size=64)  # 5 batches, the last partial
    ref = ck.collapse_metrics(data["features"], data["labels"], 5, data["weight"], data["bias"])
    for key in ("nc1", "nc1_quotient", "cdnv", "nc2_equinorm", "nc2_equiangle", "nc2_coherence", "gnc2", "etf_error",
                "nc3", "nc3_cos", "unc3", "nc4"):
        assert m[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-9), key
    for key in ("counts", "mean_norms", "variances", "weight_norms"):
        torch.testing.assert_close(m["per_class"][key], ref["per_class"][key], rtol=1e-5, atol=1e-9)
    assert (m["num_samples"], m["dim"], m["num_classes"]) == (300, 6, 5)
    assert MODES[fmt] in m["read_mode"]


def test_analyze_without_classifier_and_extra_classes(tmp_path):
    data = _data(classifier=False)
    data["features"] = data["features"].double()
    data["labels"] = data["labels"].int()
    path = _save(tmp_path, data, "npz")
    m = an.analyze(path, num_classes=8, batch_size=100)
    ref = ck.collapse_metrics(data["features"], data["labels"].long(), 8)
    assert m["num_classes"] == 8 and m["num_present"] == 5
    assert m["nc1"] == pytest.approx(ref["nc1"], rel=1e-9)
    assert "nc3" not in m and "nc4" not in m
    assert m["per_class"]["counts"][5:].tolist() == [0, 0, 0]
    table = an.format_table(m)
    assert "C=8 (5 present)" in table and "not computed: nc3, nc3_cos, unc3, nc4" in table
    assert "\nnc1 " in table and "\nnc3 " not in table


def test_analyze_npz_stored_member_is_memory_mapped(tmp_path):
    path = _save(tmp_path, _data(), "npz")
    arrays = an.open_arrays(path)
    assert isinstance(arrays["features"].a, np.memmap)
    torch.testing.assert_close(arrays["features"].rows(10, 20), torch.from_numpy(np.load(path)["features"][10:20]))


def test_analyze_command_table_json_plot(tmp_path, capsys):
    data = _data()
    path = _save(tmp_path, data, "pt")
    js, png = tmp_path / "m.json", tmp_path / "p.png"
    argv = ["analyze", path, "--batch-size", "50", "--json", str(js)]
    has_mpl = True
    try:
        import matplotlib  # noqa: F401
        argv += ["--plot", str(png)]
    except ImportError:
        has_mpl = False
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    ref = ck.collapse_metrics(data["features"], data["labels"], 5, data["weight"], data["bias"])
    row = next(l for l in out.splitlines() if l.startswith("nc1 "))
    assert float(row.split()[1]) == pytest.approx(ref["nc1"], rel=1e-3)
    j = json.loads(js.read_text())
    assert j["nc4"] == pytest.approx(ref["nc4"]) and j["num_samples"] == 300
    assert len(j["per_class"]["mean_norms"]) == 5 and j["per_class"]["counts"] == ref["per_class"]["counts"].tolist()
    if has_mpl:
        assert png.read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------------------------------------------
# analyze: bad inputs -> one line on stderr naming the problem, exit status 2
# ------------------------------------------------------------------------------------------------

def _bad(tmp_path, name):
    d = _data(n=40, classifier=True)
    if name == "missing features":
        del d["features"]
        return _save(tmp_path, d, "pt"), [], "no 'features' array"
    if name == "missing labels":
        del d["labels"]
        return _save(tmp_path, d, "npz"), [], "no 'labels' array"
    if name == "features 1-D":
        d["features"] = d["features"][:, 0].contiguous()
        return _save(tmp_path, d, "pt"), [], "'features' must be 2-D"
    if name == "length mismatch":
        d["labels"] = d["labels"][:-3].contiguous()
        return _save(tmp_path, d, "safetensors"), [], "'labels' has 37 entries but 'features' has 40 rows"
    if name == "float labels":
        d["labels"] = d["labels"].float()
        return _save(tmp_path, d, "npz"), [], "'labels' must hold integer class ids"
    if name == "label out of range":
        del d["weight"], d["bias"]
        return _save(tmp_path, d, "pt"), ["--num-classes", "3"], "label 4 (row 4) out of range [0, 3)"
    if name == "label beyond weight rows":
        d["labels"][7] = 9
        return _save(tmp_path, d, "pt"), [], "label 9 (row 7) out of range [0, 5): 'weight' has 5 rows"
    if name == "negative label":
        d["labels"][11] = -1
        return _save(tmp_path, d, "npz-compressed"), [], "negative label -1 (row 11)"
    if name == "nan row":
        d["features"][33, 2] = float("nan")
        return _save(tmp_path, d, "npz"), ["--batch-size", "16"], "'features' row 33 has NaN or Inf"
    if name == "weight shape":
        d["weight"] = d["weight"][:, :4].contiguous()
        return _save(tmp_path, d, "pt"), [], "'weight' must be a floating [C, D=6]"
    if name == "bias without weight":
        del d["weight"]
        return _save(tmp_path, d, "pt"), [], "has 'bias' but no 'weight'"
    if name == "not a dict":
        p = tmp_path / "t.pt"
        torch.save(d["features"], p)
        return str(p), [], "must hold a dict of tensors"
    if name == "garbage .pt":
        p = tmp_path / "g.pt"
        p.write_bytes(b"this is not a torch file" * 10)
        return str(p), [], "cannot read it as a .pt file"
    if name == "garbage .npz":
        p = tmp_path / "g.npz"
        p.write_bytes(b"PK nonsense")
        return str(p), [], "cannot read it as .npz"
    if name == "garbage .safetensors":
        pytest.importorskip("safetensors")
        p = tmp_path / "g.safetensors"
        p.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
        return str(p), [], "cannot read it as .safetensors"
    if name == "truncated npz member":
        p = _save(tmp_path, d, "npz")
        with zipfile.ZipFile(p) as zf:
            members = {i.filename: zf.read(i) for i in zf.infolist()}
        with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
            for k, v in members.items():
                zf.writestr(k, v[:-50] if k == "features.npy" else v)
        return p, [], "truncated"
    if name == "no such file":
        return str(tmp_path / "nope.pt"), [], "no such file"
    if name == "unknown extension":
        p = tmp_path / "f.csv"
        p.write_text("1,2\n")
        return str(p), [], "unknown file type '.csv'"
    if name == "bad batch size":
        return _save(tmp_path, d, "pt"), ["--batch-size", "0"], "--batch-size must be an int >= 1"
    raise AssertionError(name)


BAD = ["missing features", "missing labels", "features 1-D", "length mismatch", "float labels", "label out of range",
       "label beyond weight rows", "negative label", "nan row", "weight shape", "bias without weight", "not a dict",
       "garbage .pt", "garbage .npz", "garbage .safetensors", "truncated npz member", "no such file",
       "unknown extension", "bad batch size"]


@pytest.mark.parametrize("case", BAD)
def test_analyze_bad_input(tmp_path, capsys, case):
    path, extra, message = _bad(tmp_path, case)
    assert cli.main(["analyze", path, *extra]) == 2
    captured = capsys.readouterr()
    assert message in captured.err, captured.err
    assert captured.err.startswith("collapsekit analyze: error: ") and captured.err.count("\n") == 1
    assert captured.out == ""


@pytest.mark.parametrize("case", ["garbage .pt", "nan row"])
def test_analyze_bad_input_subprocess_has_no_traceback(tmp_path, case):
    path, extra, message = _bad(tmp_path, case)
    out = subprocess.run([sys.executable, "-m", "collapsekit", "analyze", path, *extra],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and message in out.stderr


def test_without_matplotlib(tmp_path, capsys, monkeypatch):
    """matplotlib is optional: the demo still prints its table and says the figure was skipped;
    analyze --plot fails with one line naming the missing package."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # any `import matplotlib` now fails
    png = tmp_path / "d.png"
    assert cli.main(["demo", "--epochs", "2", "--classes", "2", "--dim", "4", "--per-class", "10",
                     "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "epoch  train_err" in out and "matplotlib is not installed" in out and not png.exists()
    path = _save(tmp_path, _data(n=30), "pt")
    assert cli.main(["analyze", path, "--plot", str(tmp_path / "p.png")]) == 2
    captured = capsys.readouterr()
    assert "--plot needs matplotlib" in captured.err and captured.out == ""  # checked before the passes
