"""``collapsekit analyze-lm MODEL_DIR TOKENS``: neural collapse of a causal LM over a token corpus.

MODEL_DIR is a local transformers model directory (``save_pretrained``; nothing is downloaded);
TOKENS holds integer token ids -- ``.npy`` (memory-mapped), ``.pt`` (``torch.save`` of a tensor, or
of a dict with ``input_ids``; memory-mapped) or ``.safetensors`` (``input_ids`` or its only
tensor; sliced) -- shaped ``[num_seqs, L]``, or a 1-D stream cut into rows of ``--seq-len``
(the remainder is a last, shorter row). The sequences are fed in batches through
:func:`collapsekit.hf.collect_lm` (one pass; ``--decisions`` adds the NC4 pass) and the metrics of
the final features (and of ``--layers``) are printed, with per-class figures against token
frequency (``--plot``).
"""
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .analyze import _DESCRIPTIONS, AnalyzeError, to_json


class _Tokens:
    """Row access to a 2-D ``[num_seqs, L]`` id array (or a 1-D stream cut into rows)."""

    def __init__(self, get, shape, seq_len):
        self.get, self.shape = get, shape
        if len(shape) == 1:
            self.rows = math.ceil(shape[0] / seq_len)
            self.L = seq_len
        else:
            self.rows, self.L = shape
        self.seq_len = seq_len

    def batch(self, i, j) -> torch.Tensor:
        if len(self.shape) == 1:
            return self.get(i * self.L, min(self.shape[0], j * self.L))  # flat; cut by the caller
        return self.get(i, j)

    def batches(self, batch_size):
        for i in range(0, self.rows, batch_size):
            j = min(self.rows, i + batch_size)
            t = torch.as_tensor(self.batch(i, j)).long()
            if len(self.shape) == 1:
                full = t.numel() // self.L
                if full:
                    yield t[:full * self.L].view(full, self.L)
                if t.numel() > full * self.L:
                    yield t[full * self.L:].view(1, -1)
            else:
                yield t


_INT_NP = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32)


def open_tokens(path: str, seq_len: Optional[int]) -> _Tokens:
    if not os.path.exists(path):
        raise AnalyzeError(f"{path}: no such file")
    if os.path.isdir(path):
        raise AnalyzeError(f"{path}: is a directory, not a token file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise AnalyzeError(f"{path}: cannot read it as .npy ({type(e).__name__}: {e})") from None
        if a.dtype.type not in _INT_NP:
            raise AnalyzeError(f"{path}: token ids must be integers, got dtype {a.dtype}")
        shape, get = a.shape, (lambda i, j: np.array(a[i:j], dtype=np.int64))
    elif ext in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001
            raise AnalyzeError(f"{path}: cannot read it as a .pt file ({type(e).__name__})") from None
        if isinstance(obj, dict):
            if "input_ids" not in obj:
                raise AnalyzeError(f"{path}: a .pt dict must hold 'input_ids' (keys: {sorted(map(str, obj))})")
            obj = obj["input_ids"]
        if not isinstance(obj, torch.Tensor):
            raise AnalyzeError(f"{path}: expected a tensor of token ids, got {type(obj).__name__}")
        if obj.dtype.is_floating_point or obj.dtype.is_complex or obj.dtype == torch.bool:
            raise AnalyzeError(f"{path}: token ids must be integers, got dtype {obj.dtype}")
        shape, get = tuple(obj.shape), (lambda i, j: obj[i:j])
    elif ext == ".safetensors":
        try:
            from safetensors import safe_open
            f = safe_open(path, framework="pt")
            keys = list(f.keys())
        except ImportError:
            raise AnalyzeError("reading .safetensors needs the safetensors package (pip install safetensors)") from None
        except Exception as e:  # noqa: BLE001
            raise AnalyzeError(f"{path}: cannot read it as .safetensors ({type(e).__name__}: {e})") from None
        key = "input_ids" if "input_ids" in keys else (keys[0] if len(keys) == 1 else None)
        if key is None:
            raise AnalyzeError(f"{path}: holds {len(keys)} tensors and none is named 'input_ids'")
        sl = f.get_slice(key)
        if sl.get_dtype() not in ("I8", "I16", "I32", "I64", "U8", "U16", "U32"):
            raise AnalyzeError(f"{path}: token ids must be integers, got dtype {sl.get_dtype()}")
        shape, get = tuple(sl.get_shape()), (lambda i, j, sl=sl, f=f: sl[i:j])
    else:
        raise AnalyzeError(f"{path}: unknown file type {ext or '(no extension)'!r}; expected .npy, .pt or .safetensors")
    if len(shape) not in (1, 2):
        raise AnalyzeError(f"{path}: token ids must be [num_seqs, L] or a 1-D stream, got shape {list(shape)}")
    if len(shape) == 1 and not seq_len:
        raise AnalyzeError(f"{path}: a 1-D token stream needs --seq-len to cut it into sequences")
    if len(shape) == 2 and seq_len:
        raise AnalyzeError(f"{path}: --seq-len cuts a 1-D stream, but the ids are already [num_seqs, L] = {list(shape)}")
    t = _Tokens(get, shape, seq_len)
    if t.rows == 0 or t.L < 2:
        raise AnalyzeError(f"{path}: needs sequences of at least 2 tokens, got shape {list(shape)}")
    return t


def load_model(model_dir: str, device):
    try:
        import transformers
    except ImportError:
        raise AnalyzeError("analyze-lm needs transformers (pip install transformers)") from None
    if not os.path.isdir(model_dir):
        raise AnalyzeError(f"{model_dir}: no such model directory")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise AnalyzeError(f"{model_dir}: not a transformers model directory (no config.json)")
    tl = transformers.utils.logging
    bar = tl.is_progress_bar_enabled()
    tl.disable_progress_bar()  # its "Loading weights" bar would interleave with our own lines
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise AnalyzeError(f"{model_dir}: cannot load it as a causal LM ({type(e).__name__}: {msg[:200]})") from None
    finally:
        if bar:
            tl.enable_progress_bar()
    from .hf.lm import output_classifier

    try:
        output_classifier(model)
    except TypeError as e:
        raise AnalyzeError(f"{model_dir}: {e}") from None
    return model.to(device)


def analyze_lm(model_dir: str, tokens: str, *, seq_len: Optional[int] = None, batch_size: int = 8,
               device: str = "cpu", layers: Optional[List[int]] = None, min_count: float = 1,
               max_count: Optional[float] = None, decisions: bool = False, progress: bool = False) -> Dict[str, Any]:
    """Returns ``{"layers": {index: metrics}, "final": index, ...}`` (the metric dicts of
    :meth:`CollapseAccumulator.metrics`; the final layer's with the output embedding)."""
    from .hf.lm import collect_lm, output_classifier

    t0 = time.perf_counter()
    for name, v in (("--batch-size", batch_size), ("--seq-len", seq_len)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise AnalyzeError(f"{name} must be an int >= 1, got {v!r}")
    if seq_len == 1:
        raise AnalyzeError("--seq-len must be >= 2 (a sample is a token and its successor)")
    if max_count is not None and max_count < min_count:
        raise AnalyzeError(f"--max-count {max_count} is below --min-count {min_count}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise AnalyzeError(f"--device {device!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AnalyzeError("--device cuda was asked for but torch.cuda.is_available() is False")
    toks = open_tokens(tokens, seq_len)
    model = load_model(model_dir, dev)
    weight, bias = output_classifier(model)
    vocab = weight.shape[0]
    # ids in range before the long run (one cheap pass over the ids)
    lo, hi, n_tok = None, None, 0
    for b in toks.batches(max(batch_size, 1024)):
        bl, bh = int(b.min()), int(b.max())
        lo, hi = (bl if lo is None else min(lo, bl)), (bh if hi is None else max(hi, bh))
        n_tok += b.numel()
    if lo < 0 or hi >= vocab:
        raise AnalyzeError(f"{tokens}: has token id {lo if lo < 0 else hi}, outside the model's vocabulary "
                           f"[0, {vocab}) (output embedding of {model_dir})")

    class _Batches:  # re-iterable (decisions need a second pass), with a length for the ETA
        def __iter__(self):
            return toks.batches(batch_size)

        def __len__(self):
            if len(toks.shape) == 2:
                return math.ceil(toks.rows / batch_size)
            return sum(1 for _ in range(0, toks.rows, batch_size)) + (1 if toks.shape[0] % toks.L else 0)

    try:
        res = collect_lm(model, _Batches(), decisions=decisions, progress=progress, layers=layers)
    except ValueError as e:
        raise AnalyzeError(str(e)) from None
    if not isinstance(res, dict):
        from .hf.lm import _blocks

        try:
            final = len(_blocks(model))
        except TypeError:
            final = -1
        res = {final: res}
    final = max(res)
    out: Dict[str, Any] = {"model": model_dir, "tokens": tokens, "num_tokens": n_tok, "vocab": vocab,
                           "dim": weight.shape[1], "final": final, "layers": {}}
    for idx, acc in sorted(res.items()):
        w = weight if idx == final else None
        out["layers"][idx] = acc.metrics(w, bias if idx == final else None, min_count=min_count,
                                         max_count=max_count)
    out["num_samples"] = float(res[final].counts.sum())
    out["seconds"] = time.perf_counter() - t0
    return out


def format_table(r: Dict[str, Any]) -> str:
    idxs = sorted(r["layers"])
    head = [f"{r['model']} on {r['tokens']}: {r['num_tokens']} tokens -> {int(r['num_samples'])} (token, next) "
            f"samples, V={r['vocab']}, D={r['dim']}, {r['seconds']:.1f} s"]
    fin = r["layers"][r["final"]]
    head.append(f"classes present: {fin['num_present']} of {r['vocab']}")
    cols = "".join(f"{('layer ' + str(i)) + (' (out)' if i == r['final'] else ''):>16}" for i in idxs)
    head.append(f"{'metric':<14}{cols}  {'collapsed':<10} meaning")
    for key, meaning, target in _DESCRIPTIONS:
        vals = [r["layers"][i].get(key) for i in idxs]
        if all(v is None for v in vals):
            continue
        cells = "".join(f"{v:>16.4e}" if v is not None else f"{'-':>16}" for v in vals)
        head.append(f"{key:<14}{cells}  {target:<10} {meaning}")
    pc = fin["per_class"]
    p = pc["present"]
    if bool(p.any()):
        head.append(f"per token (present): count {float(pc['counts'][p].min()):.0f}..{float(pc['counts'][p].max()):.0f}, "
                    f"mean norm {float(pc['mean_norms'][p].min()):.4g}..{float(pc['mean_norms'][p].max()):.4g}, "
                    f"σ² {float(pc['variances'][p].min()):.4g}..{float(pc['variances'][p].max()):.4g}")
    if "nc1" not in fin and fin["num_present"] >= 2:
        head.append("nc1: not computed (the count range drops tokens that were seen, and Σ_W cannot be split "
                    "by token; nc1_quotient and cdnv apply)")
    if "nc4" not in fin:
        head.append("nc4: not computed (add --decisions for the second pass)")
    return "\n".join(head)


def plot(r: Dict[str, Any], path: str) -> None:
    """Per-token figure of the final layer against token frequency: centred mean norm, within-class
    variance, output-embedding row norm (the imbalance picture); present tokens dark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pc = r["layers"][r["final"]]["per_class"]
    seen = pc["counts"] > 0
    counts = pc["counts"][seen].numpy()
    present = pc["present"][seen].numpy()
    panels = [("mean_norms", "‖μ_c − m_G‖"), ("variances", "σ_c² (within-class variance)"),
              ("weight_norms", "‖w_c‖ (output-embedding row)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, label) in zip(axes, panels):
        v = pc[key][seen].numpy()
        ax.scatter(counts[present], v[present], s=6, label="present")
        if (~present).any():
            ax.scatter(counts[~present], v[~present], s=6, c="0.7", label="outside --min/max-count")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        if key == "variances" and (v > 0).all():
            ax.set_yscale("log")
        ax.set_xlabel("token frequency (samples with this next token)")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    fm = r["layers"][r["final"]]
    fig.suptitle(f"{os.path.basename(os.path.normpath(r['model']))}: per-token geometry "
                 f"(K={fm['num_present']}, cdnv={fm.get('cdnv', float('nan')):.3g})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args) -> int:
    """The ``collapsekit analyze-lm`` subcommand: errors are one line on stderr and exit status 2."""
    pre = "collapsekit analyze-lm: error:"
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"{pre} --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
    layers = None
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            print(f"{pre} --layers must be a comma-separated list of ints, got {args.layers!r}", file=sys.stderr)
            return 2
    try:
        r = analyze_lm(args.model_dir, args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                       device=args.device, layers=layers, min_count=args.min_count, max_count=args.max_count,
                       decisions=args.decisions, progress=not args.quiet)
    except AnalyzeError as e:
        print(f"{pre} {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"{pre} {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 2
    print(format_table(r))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(to_json({**r, "layers": {str(k): v for k, v in r["layers"].items()}}), f, indent=1)
        except OSError as e:
            print(f"{pre} --json {args.json}: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.json}")
    if args.plot:
        try:
            plot(r, args.plot)
        except OSError as e:
            print(f"{pre} --plot {args.plot}: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.plot}")
    return 0
