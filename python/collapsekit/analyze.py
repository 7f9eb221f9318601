"""``collapsekit analyze FILE``: neural collapse of features a user saved.

FILE is a ``.pt`` / ``.pth`` (``torch.save`` of a dict of tensors), ``.npz`` (``np.savez`` or
``np.savez_compressed``) or ``.safetensors`` file holding ``features [N, D]`` and ``labels [N]``
(optionally the classifier ``weight [C, D]`` and ``bias [C]``). The rows are streamed in batches
through :class:`collapsekit.CollapseAccumulator` (pass 1: means; pass 2: within-class scatter and
NC4 decisions), so the features never have to fit in memory:

- ``.pt``: ``torch.load(mmap=True, weights_only=True)`` -- the tensors stay in the file's page cache
  (files written by the legacy, pre-zipfile ``torch.save`` cannot be mmapped and are read whole);
- ``.npz``: members stored uncompressed (``np.savez``) are memory-mapped at their offset inside the
  zip; compressed members (``np.savez_compressed``) are decompressed as a stream, batch by batch,
  once per pass (Fortran-ordered or version-3 ``.npy`` members are read whole);
- ``.safetensors``: ``safe_open`` slices, rows ``[i:j]`` at a time.

:func:`analyze` returns the metric dict; :func:`main` is the command.
"""
import json
import math
import os
import struct
import sys
import time
import zipfile
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch

from .accumulator import CollapseAccumulator


class AnalyzeError(ValueError):
    """A problem with the input file or the arguments: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------
# arrays that can be read in row batches
# ------------------------------------------------------------------------------------------------

class _Array:
    """One named array of the file: ``shape``, ``dtype`` (a torch dtype, or None when torch has no
    equivalent), ``rows(i, j)`` / ``batches(batch_size)`` as torch tensors, ``mode`` (how it is read)."""

    def __init__(self, name, shape, dtype, mode):
        self.name, self.shape, self.dtype, self.mode = name, tuple(int(s) for s in shape), dtype, mode

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        n = self.shape[0] if self.shape else 0
        for i in range(0, n, batch_size):
            yield self.rows(i, min(n, i + batch_size))

    def whole(self) -> torch.Tensor:
        return self.rows(0, self.shape[0]) if self.shape else self.rows(0, 0)

    def rows(self, i, j):
        raise NotImplementedError


class _TorchArray(_Array):
    def __init__(self, name, t: torch.Tensor, mode):
        super().__init__(name, t.shape, t.dtype, mode)
        self.t = t

    def rows(self, i, j):
        return self.t if self.t.dim() == 0 else self.t[i:j]


def _np_to_torch_dtype(dt: np.dtype):
    try:
        return torch.from_numpy(np.empty(0, dtype=dt)).dtype
    except TypeError:
        return None


class _NumpyArray(_Array):
    """A numpy array or np.memmap (random access)."""

    def __init__(self, name, a: np.ndarray, mode):
        super().__init__(name, a.shape, _np_to_torch_dtype(a.dtype), mode)
        self.a = a

    def rows(self, i, j):
        a = self.a if self.a.ndim == 0 else self.a[i:j]
        return torch.from_numpy(np.array(a, order="C"))  # a batch-sized copy (memmaps are read-only)


class _NpzStream(_Array):
    """A compressed, C-ordered ``.npy`` member of a zip: decompressed sequentially, batch by batch."""

    def __init__(self, name, zpath, member, shape, dtype: np.dtype, header_len):
        super().__init__(name, shape, _np_to_torch_dtype(dtype), "npz (compressed member, streamed)")
        self.zpath, self.member, self.np_dtype, self.header_len = zpath, member, dtype, header_len

    def batches(self, batch_size):
        n = self.shape[0]
        row_items = int(np.prod(self.shape[1:], dtype=np.int64))
        row_bytes = row_items * self.np_dtype.itemsize
        with zipfile.ZipFile(self.zpath) as zf, zf.open(self.member) as f:
            f.read(self.header_len)
            for i in range(0, n, batch_size):
                m = min(batch_size, n - i)
                buf = f.read(m * row_bytes)
                if len(buf) != m * row_bytes:
                    raise AnalyzeError(f"{self.zpath}: member {self.member} is truncated (rows {i}..{i + m} missing)")
                yield torch.from_numpy(np.frombuffer(buf, dtype=self.np_dtype).reshape((m,) + self.shape[1:]).copy())

    def rows(self, i, j):  # small arrays only (weight, bias): read through
        out = [b for b in self.batches(max(1, self.shape[0] if self.shape else 1))]
        return torch.cat(out)[i:j] if out else torch.empty(self.shape)


def _read_npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        return None
    return shape, fortran, dtype


def _open_npz(path):
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise AnalyzeError(f"{path}: cannot read it as .npz ({e})") from None
    arrays = {}
    with zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            try:
                with zf.open(info) as f:
                    head = _read_npy_header(f)
                    header_len = f.tell()
            except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
                raise AnalyzeError(f"{path}: member {info.filename} is not a readable .npy array ({e})") from None
            if head is not None and head[2].hasobject:
                raise AnalyzeError(f"{path}: array {key!r} holds Python objects (dtype {head[2]}); "
                                   "save numeric arrays")
            if head is None or (head[1] and len(head[0]) > 1):
                arrays[key] = ("npz-whole",)  # read with np.load when asked for
            elif info.compress_type == zipfile.ZIP_STORED:
                # memory-map the member in place: data start = local header + name + extra + npy header
                with open(path, "rb") as raw:
                    raw.seek(info.header_offset)
                    local = raw.read(30)
                    if len(local) != 30 or local[:4] != b"PK\x03\x04":
                        raise AnalyzeError(f"{path}: corrupt zip local header for {info.filename}")
                    name_len, extra_len = struct.unpack("<HH", local[26:30])
                offset = info.header_offset + 30 + name_len + extra_len + header_len
                shape, _, dtype = head
                if offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > os.path.getsize(path):
                    raise AnalyzeError(f"{path}: array {key!r} is truncated")
                if int(np.prod(shape, dtype=np.int64)) == 0:
                    a = np.empty(shape, dtype=dtype)
                else:
                    a = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
                arrays[key] = _NumpyArray(key, a, "npz (stored member, memory-mapped)")
            else:
                shape, _, dtype = head
                arrays[key] = _NpzStream(key, path, info.filename, shape, dtype, header_len)
    return arrays


def _load_whole_npz(path, key):
    try:
        with np.load(path, allow_pickle=False) as z:
            return _NumpyArray(key, z[key], "npz (read whole)")
    except Exception as e:  # noqa: BLE001 -- any failure here is a bad file
        raise AnalyzeError(f"{path}: cannot read array {key!r} ({type(e).__name__}: {e})") from None


def _open_pt(path):
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            mode = "pt (memory-mapped)"
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format: read whole
            mode = "pt (legacy format, read whole)"
    except Exception as e:  # noqa: BLE001 -- unpickling errors come in many types
        raise AnalyzeError(f"{path}: cannot read it as a .pt file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(obj, dict):
        raise AnalyzeError(f"{path}: a .pt file must hold a dict of tensors (torch.save({{'features': ..., "
                           f"'labels': ...}})), got {type(obj).__name__}")
    arrays = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            arrays[str(k)] = _TorchArray(str(k), v, mode)
    return arrays


def _open_safetensors(path, stack):
    try:
        from safetensors import safe_open
    except ImportError:
        raise AnalyzeError("reading .safetensors needs the safetensors package (pip install safetensors)") from None
    try:
        f = safe_open(path, framework="pt")
        stack.append(f)
        keys = list(f.keys())
    except Exception as e:  # noqa: BLE001
        raise AnalyzeError(f"{path}: cannot read it as .safetensors ({type(e).__name__}: {e})") from None

    class _SafeArray(_Array):
        def __init__(self, key):
            sl = f.get_slice(key)
            dt = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                  "BOOL": torch.bool}.get(sl.get_dtype())
            super().__init__(key, sl.get_shape(), dt, "safetensors (slices of the mapped file)")
            self.sl = sl

        def rows(self, i, j):
            return self.sl[i:j] if self.shape else self.sl[:]

    return {k: _SafeArray(k) for k in keys}


def open_arrays(path, stack=None):
    """``{name: _Array}`` of a .pt / .npz / .safetensors file."""
    if not os.path.exists(path):
        raise AnalyzeError(f"{path}: no such file")
    if os.path.isdir(path):
        raise AnalyzeError(f"{path}: is a directory, not a file")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pt", ".pth"):
        return _open_pt(path)
    if ext == ".npz":
        return _open_npz(path)
    if ext == ".safetensors":
        return _open_safetensors(path, stack if stack is not None else [])
    raise AnalyzeError(f"{path}: unknown file type {ext or '(no extension)'!r}; expected .pt, .pth, .npz or .safetensors")


# ------------------------------------------------------------------------------------------------
# the analysis
# ------------------------------------------------------------------------------------------------

def _get(arrays, path, key, required):
    a = arrays.get(key)
    if isinstance(a, tuple):  # npz member that cannot be streamed
        a = arrays[key] = _load_whole_npz(path, key)
    if a is None and required:
        have = ", ".join(repr(k) for k in arrays) or "none"
        raise AnalyzeError(f"{path}: has no {key!r} array (arrays in the file: {have})")
    return a


_INT = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@torch.no_grad()  # saved tensors may carry requires_grad: never build a graph over a whole file
def analyze(path: str, *, num_classes: Optional[int] = None, batch_size: int = 65536, device: str = "cpu",
            features_key: str = "features", labels_key: str = "labels", weight_key: str = "weight",
            bias_key: str = "bias") -> Dict[str, Any]:
    """Stream ``features``/``labels`` (and ``weight``/``bias`` if present) of ``path`` through a
    CollapseAccumulator. Returns ``CollapseAccumulator.metrics`` plus ``file``, ``num_samples``,
    ``num_classes``, ``dim``, ``read_mode`` and ``seconds``. Raises :class:`AnalyzeError` with one
    clear line for every problem with the file or the arguments."""
    t0 = time.perf_counter()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AnalyzeError(f"--batch-size must be an int >= 1, got {batch_size!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise AnalyzeError(f"--num-classes must be an int >= 1, got {num_classes!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise AnalyzeError(f"--device {device!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AnalyzeError("--device cuda was asked for but torch.cuda.is_available() is False")
    stack = []
    arrays = open_arrays(path, stack)
    feats = _get(arrays, path, features_key, True)
    labels = _get(arrays, path, labels_key, True)
    weight = _get(arrays, path, weight_key, False)
    bias = _get(arrays, path, bias_key, False)

    # -- shapes and dtypes -------------------------------------------------------------------
    if len(feats.shape) != 2:
        raise AnalyzeError(f"{path}: {features_key!r} must be 2-D [N, D], got shape {list(feats.shape)}")
    n, d = feats.shape
    if feats.dtype not in _FLOAT:
        raise AnalyzeError(f"{path}: {features_key!r} must be floating point (fp16/bf16/fp32/fp64), got "
                           f"{feats.dtype if feats.dtype is not None else 'an unsupported dtype'}")
    if len(labels.shape) != 1:
        raise AnalyzeError(f"{path}: {labels_key!r} must be 1-D [N], got shape {list(labels.shape)}")
    if labels.shape[0] != n:
        raise AnalyzeError(f"{path}: {labels_key!r} has {labels.shape[0]} entries but {features_key!r} has {n} rows")
    if labels.dtype not in _INT:
        raise AnalyzeError(f"{path}: {labels_key!r} must hold integer class ids, got "
                           f"{labels.dtype if labels.dtype is not None else 'an unsupported dtype'}")
    if n == 0:
        raise AnalyzeError(f"{path}: {features_key!r} has no rows (N = 0)")
    w = b = None
    if weight is not None:
        if len(weight.shape) != 2 or weight.shape[1] != d or weight.dtype not in _FLOAT:
            raise AnalyzeError(f"{path}: {weight_key!r} must be a floating [C, D={d}] classifier weight, got shape "
                               f"{list(weight.shape)} {weight.dtype}")
        w = weight.whole().to(torch.float64)
    if bias is not None:
        if w is None:
            raise AnalyzeError(f"{path}: has {bias_key!r} but no {weight_key!r}; a bias needs its classifier weight")
        if len(bias.shape) != 1 or bias.shape[0] != w.shape[0] or bias.dtype not in _FLOAT:
            raise AnalyzeError(f"{path}: {bias_key!r} must be a floating [C={w.shape[0]}] vector, got shape "
                               f"{list(bias.shape)} {bias.dtype}")
        b = bias.whole().to(torch.float64)

    # -- labels: range (and C) in one cheap pass -------------------------------------------------
    lo, hi, lo_row, hi_row = None, None, 0, 0
    for i, yb in zip(range(0, n, batch_size), labels.batches(batch_size)):
        yb = yb.long()
        bmin, bmax = int(yb.min()), int(yb.max())
        if lo is None or bmin < lo:
            lo, lo_row = bmin, i + int(yb.argmin())
        if hi is None or bmax > hi:
            hi, hi_row = bmax, i + int(yb.argmax())
    if lo < 0:
        raise AnalyzeError(f"{path}: {labels_key!r} has a negative label {lo} (row {lo_row}); labels must be in [0, C)")
    if num_classes is None:
        c = w.shape[0] if w is not None else hi + 1
        source = f"{weight_key!r} has {c} rows" if w is not None else None
    else:
        c, source = num_classes, f"--num-classes is {num_classes}"
    if hi >= c:
        raise AnalyzeError(f"{path}: {labels_key!r} has label {hi} (row {hi_row}) out of range [0, {c}): {source}")
    if w is not None and w.shape[0] != c:
        raise AnalyzeError(f"{path}: {weight_key!r} has {w.shape[0]} rows but there are C = {c} classes "
                           f"(--num-classes {num_classes})")

    # -- the passes ----------------------------------------------------------------------------
    from .metrics import classifier_argmax

    acc = CollapseAccumulator(c, d, device="cpu")
    w_dev = None if w is None else w.to(dev)
    b_dev = None if b is None else b.to(dev)

    def pairs():
        for i, hb, yb in zip(range(0, n, batch_size), feats.batches(batch_size), labels.batches(batch_size)):
            yield i, hb.to(dev), yb.to(dev).long()

    for i, hb, yb in pairs():
        finite = torch.isfinite(hb).all(1)
        if not bool(finite.all()):
            bad = (~finite).nonzero()[:, 0]
            raise AnalyzeError(f"{path}: {features_key!r} row {i + int(bad[0])} has NaN or Inf "
                               f"({bad.numel()} such row(s) among rows {i}..{i + hb.shape[0] - 1}); "
                               "drop or fix those rows")
        acc.update_means(hb, yb)
    for _, hb, yb in pairs():
        acc.update_variance(hb, yb)
        if w_dev is not None:
            acc.update_decisions(hb, classifier_argmax(hb, w_dev.to(hb.dtype) if hb.dtype != torch.float64 else w_dev,
                                                       None if b_dev is None else b_dev.to(hb.dtype)))
    m = acc.metrics(w, b)
    m.update(file=path, num_samples=n, num_classes=c, dim=d, read_mode=feats.mode,
             seconds=time.perf_counter() - t0)
    del stack
    return m


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------

_DESCRIPTIONS = [
    ("nc1", "Tr(Σ_W Σ_B⁺)/K: within- vs between-class variability", "→ 0"),
    ("nc1_quotient", "Tr Σ_W / Tr Σ_B", "→ 0"),
    ("cdnv", "class-distance normalised variance (mean over pairs)", "→ 0"),
    ("nc2_equinorm", "std/mean of the centred class-mean norms", "→ 0"),
    ("nc2_equiangle", "std of the pairwise cosines of the centred means", "→ 0"),
    ("nc2_coherence", "mean |cos + 1/(K−1)| over pairs", "→ 0"),
    ("gnc2", "mean log(1/‖u_c − u_c'‖) over pairs (hyperspherical energy)", "→ min"),
    ("etf_error", "distance of the means' Gram from a simplex ETF", "→ 0"),
    ("nc3", "‖W/‖W‖ − M̃/‖M̃‖‖²: classifier vs means", "→ 0"),
    ("nc3_cos", "mean cos(w_c, μ̃_c)", "→ 1"),
    ("unc3", "variance of cos(w_c, μ̃_c)", "→ 0"),
    ("nc4", "fraction where nearest class centre ≠ classifier", "→ 0"),
]


def format_table(m: Dict[str, Any]) -> str:
    lines = [f"{m['file']}: N={m['num_samples']}, D={m['dim']}, C={m['num_classes']} "
             f"({m['num_present']} present), read as {m['read_mode']}, {m['seconds']:.2f} s",
             f"{'metric':<14}{'value':>12}  {'collapsed':<10} meaning"]
    for key, meaning, target in _DESCRIPTIONS:
        if key in m:
            lines.append(f"{key:<14}{m[key]:>12.4e}  {target:<10} {meaning}")
    pc = m["per_class"]
    counts = pc["counts"]
    present = counts > 0
    if bool(present.any()):
        cn, mn, va = counts[present], pc["mean_norms"][present], pc["variances"][present]
        lines.append(f"per class (present): count {float(cn.min()):.0f}..{float(cn.max()):.0f}, "
                     f"mean norm {float(mn.min()):.4g}..{float(mn.max()):.4g}, "
                     f"variance σ² {float(va.min()):.4g}..{float(va.max()):.4g}")
    missing = [k for k, _, _ in _DESCRIPTIONS if k not in m]
    if missing:
        why = []
        if "weight_norms" not in pc:
            why.append("nc3/nc3_cos/unc3/nc4 need the classifier 'weight' in the file")
        if m["num_present"] < 2:
            why.append("the class-geometry metrics need at least 2 present classes")
        lines.append("not computed: " + ", ".join(missing) + (f" ({'; '.join(why)})" if why else ""))
    return "\n".join(lines)


def to_json(m: Dict[str, Any]) -> Dict[str, Any]:
    def conv(v):
        if isinstance(v, torch.Tensor):
            return v.tolist()
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v
    return conv(m)


def plot(m: Dict[str, Any], path: str) -> None:
    """Per-class figure: centred class-mean norm and within-class variance against the class count
    (and classifier row norms when a weight was given) -- minority collapse shows as small classes
    with small mean norms and weight norms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pc = m["per_class"]
    present = pc["counts"] > 0
    counts = pc["counts"][present].numpy()
    panels = [("mean_norms", "‖μ_c − m_G‖ (centred class-mean norm)"), ("variances", "σ_c² (within-class variance)")]
    if "weight_norms" in pc:
        panels.append(("weight_norms", "‖w_c‖ (classifier row norm)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, label) in zip(np.atleast_1d(axes), panels):
        ax.scatter(counts, pc[key][present].numpy(), s=12)
        if counts.max() > 2 * counts.min():
            ax.set_xscale("log")
        if key == "variances" and bool((pc[key][present] > 0).all()):
            ax.set_yscale("log")
        ax.set_xlabel("samples in the class (n_c)")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{os.path.basename(m['file'])}: per-class geometry (K={m['num_present']}, "
                 f"nc1={m.get('nc1', float('nan')):.3g})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args) -> int:
    """The ``collapsekit analyze`` subcommand: errors are one line on stderr and exit status 2."""
    if args.plot:  # fail before a long pass over a big file, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("collapsekit analyze: error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
    try:
        m = analyze(args.file, num_classes=args.num_classes, batch_size=args.batch_size, device=args.device,
                    features_key=args.features_key, labels_key=args.labels_key, weight_key=args.weight_key,
                    bias_key=args.bias_key)
    except AnalyzeError as e:
        print(f"collapsekit analyze: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as e:  # from the accumulator or the reader mid-stream
        print(f"collapsekit analyze: error: {args.file}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(format_table(m))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(to_json(m), f, indent=1)
        except OSError as e:
            print(f"collapsekit analyze: error: --json {args.json}: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.json}")
    if args.plot:
        try:
            plot(m, args.plot)
        except OSError as e:
            print(f"collapsekit analyze: error: --plot {args.plot}: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.plot}")
    return 0
