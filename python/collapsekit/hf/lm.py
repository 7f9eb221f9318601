"""``collect_lm``: neural collapse of a causal language model, in one pass over token batches.

The Linguistic-Collapse setting (Wu & Papyan, 2024): every position t of a sequence is a sample
whose feature is the model's last hidden state -- the input of the output embedding -- and whose
label is the next token ``x_{t+1}``; the classes are the vocabulary and the classifier is the output
embedding (plus its bias, if any).

How the features are taken, for any ``AutoModelForCausalLM``-style model (GPT-2, Llama, Mamba,
Mamba-2, ...): a forward pre-hook on ``model.get_output_embeddings()`` receives exactly what the
model would multiply by the vocabulary matrix, and stops the forward there (a private exception),
so the ``[B, L, V]`` logits are never built. Intermediate layers (``layers=[...]``, indices in the
convention of transformers' ``output_hidden_states``: 0 = the embeddings, i = after block i, the
last index = the final features) come from hooks on the blocks of the same forward.

Everything runs under ``torch.no_grad`` with the model in eval mode (its mode is restored after),
on the model's device; batches are streamed (only one batch of features exists at a time).
"""
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from ..accumulator import CollapseAccumulator


class _Stop(Exception):
    """Raised by the output-embedding pre-hook: the features are captured, the rest is not needed."""


def output_classifier(model) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight [V, D], bias [V] or None)`` of the model's output embedding (detached)."""
    head = _output_embedding(model)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"collect_lm: the output embedding of {type(model).__name__} ({type(head).__name__}) "
                        "has no 2-D weight")
    bias = getattr(head, "bias", None)
    return weight.detach(), None if not isinstance(bias, torch.Tensor) else bias.detach()


def _output_embedding(model):
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise TypeError(f"collect_lm: {type(model).__name__} has no output embedding "
                        "(model.get_output_embeddings() is None); load it with AutoModelForCausalLM")
    return head


def _blocks(model) -> torch.nn.ModuleList:
    """The model's list of transformer / Mamba blocks: the longest ModuleList whose length is the
    configured number of layers (GPT-2 ``transformer.h``, Llama ``model.layers``, Mamba
    ``backbone.layers``, ...)."""
    cfg = getattr(model, "config", None)
    want = None
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            want = v
            break
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    cands = [m for m in lists if want is None or len(m) == want]
    if not cands:
        raise TypeError(f"collect_lm: cannot find the list of blocks of {type(model).__name__} "
                        f"(no ModuleList of {want} layers); layers=... needs it")
    return max(cands, key=len)


def _as_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    h = getattr(out, "hidden_states", None) if not isinstance(out, dict) else out.get("hidden_states")
    if isinstance(h, torch.Tensor):
        return h
    raise TypeError(f"collect_lm: a block returned {type(out).__name__}; expected a tensor or a tuple of tensors")


def _batch(b, device, op) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(b, torch.Tensor):
        ids, mask = b, None
    elif isinstance(b, dict) or hasattr(b, "keys"):
        if "input_ids" not in b:
            raise ValueError(f"{op}: a batch dict needs 'input_ids' (got keys {sorted(b.keys())})")
        ids, mask = b["input_ids"], b.get("attention_mask")
    else:
        raise TypeError(f"{op}: batches must yield input_ids tensors [B, L] or dicts with 'input_ids' / "
                        f"'attention_mask', got {type(b).__name__}")
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"{op}: input_ids must be an integer tensor, got "
                        f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"{op}: input_ids must be [B, L], got shape {tuple(ids.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"{op}: attention_mask must be a tensor of the shape of input_ids {tuple(ids.shape)}, "
                             f"got {tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        mask = mask.to(device)
    return ids.to(device).long(), mask


class _Capture:
    """Hooks that capture, in one forward, the final features and the requested intermediate
    hidden states (``{index: [B, L, D]}``), and stop the forward at the output embedding."""

    def __init__(self, model, layers: Sequence[int]):
        self.out: Dict[int, torch.Tensor] = {}
        self.handles = []
        self.final = None
        head = _output_embedding(model)
        self.handles.append(head.register_forward_pre_hook(self._head_hook, with_kwargs=True))
        if not layers:
            return
        blocks = _blocks(model)
        for idx in layers:
            if idx == 0:
                self.handles.append(blocks[0].register_forward_pre_hook(self._pre(0), with_kwargs=True))
            else:
                self.handles.append(blocks[idx - 1].register_forward_hook(self._post(idx)))

    def _head_hook(self, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        self.final = x
        raise _Stop

    def _pre(self, idx):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
            self.out[idx] = x
        return hook

    def _post(self, idx):
        def hook(module, args, output):
            self.out[idx] = _as_tensor(output)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _forward(model, cap: _Capture, ids, mask):
    cap.out, cap.final = {}, None
    kwargs = {"input_ids": ids, "use_cache": False}
    if mask is not None:
        kwargs["attention_mask"] = mask
    try:
        model(**kwargs)
    except _Stop:
        pass
    if cap.final is None:
        raise RuntimeError(f"collect_lm: the forward of {type(model).__name__} never called its output embedding")
    if cap.final.dim() != 3 or cap.final.shape[:2] != ids.shape:
        raise RuntimeError(f"collect_lm: the output embedding of {type(model).__name__} received shape "
                           f"{tuple(cap.final.shape)}, not the [B, L, D] hidden states of input_ids {tuple(ids.shape)} "
                           "(does the model slice positions before its head?)")


def _progress_printer(total_batches: Optional[int]):
    import sys

    state = {"t0": time.perf_counter(), "stage": None}

    def show(info):
        if info["stage"] != state["stage"]:  # rates and ETA per pass
            state.update(t0=time.perf_counter(), stage=info["stage"])
        if info.get("done"):
            sys.stderr.write("\n")
            sys.stderr.flush()
            return
        el = time.perf_counter() - state["t0"]
        rate = info["tokens"] / el if el > 0 else 0.0
        msg = f"\r{info['stage']}: batch {info['batch']}"
        if total_batches:
            msg += f"/{total_batches}"
            if info["batch"]:
                eta = el / info["batch"] * (total_batches - info["batch"])
                msg += f", ETA {eta:5.0f} s"
        msg += f", {info['tokens']} tokens, {rate:,.0f} tokens/s   "
        sys.stderr.write(msg)
        sys.stderr.flush()
    return show


@torch.no_grad()
def collect_lm(model, batches: Iterable, *, accumulator: Optional[CollapseAccumulator] = None,
               decisions: bool = False, progress: Union[bool, Callable[[Dict[str, Any]], None]] = False,
               layers: Optional[Sequence[int]] = None
               ) -> Union[CollapseAccumulator, Dict[int, CollapseAccumulator]]:
    """Accumulate the neural-collapse statistics of a causal LM over token batches in one pass.

    Args:
        model: a transformers causal LM (anything with ``get_output_embeddings()`` whose forward
            takes ``input_ids`` / ``attention_mask`` and ends in that embedding).
        batches: an iterable of ``input_ids [B, L]`` integer tensors or of dicts with
            ``input_ids`` and optionally ``attention_mask [B, L]``. Position t (< L−1) of a row is a
            sample with feature = the hidden state at t and label = the token at t+1; positions
            where either is padding (``attention_mask == 0``) are skipped. With ``decisions=True``
            it must be re-iterable (a list, a DataLoader), not a one-shot generator.
        accumulator: a :class:`~collapsekit.CollapseAccumulator` to add to (``C`` = the rows of
            the output embedding, ``D`` = the hidden size); default a new one on the model's device.
        decisions: also make a second pass for NC4: the nearest class centre of each feature
            against ``argmax(W h + b)`` of the output embedding (tiled; no ``[N, V]`` logits).
        progress: True prints batches, tokens/s and ETA to stderr; a callable receives a dict
            ``{stage, batch, tokens, done}`` after each batch.
        layers: hidden-state indices (transformers' ``output_hidden_states`` convention, negative
            allowed) to accumulate as well, each into its own accumulator, from the same forward.

    Returns:
        The accumulator of the final features, or with ``layers`` a dict ``{index: accumulator}``
        holding every requested index and the final index ``num_layers`` (the output features).
        Metrics: ``acc.metrics(*output_classifier(model), min_count=...)``.
    """
    op = "collect_lm"
    weight, bias = output_classifier(model)
    vocab, dim = weight.shape
    device = weight.device          # the totals live with the head (and its features)
    emb = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    ids_device = getattr(getattr(emb, "weight", None), "device", device)   # models split over devices
    blocks = None
    final_idx = None
    want: List[int] = []
    if layers is not None:
        if isinstance(layers, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise TypeError(f"{op}: layers must be a list of ints, got {layers!r}")
        blocks = _blocks(model)
        final_idx = len(blocks)
        for i in layers:
            j = i + final_idx + 1 if i < 0 else i
            if not 0 <= j <= final_idx:
                raise ValueError(f"{op}: layer index {i} is out of range for a model with {final_idx} blocks "
                                 f"(valid: -{final_idx + 1}..{final_idx})")
            if j != final_idx and j not in want:
                want.append(j)
    if accumulator is None:
        accumulator = CollapseAccumulator(vocab, dim, device=device)
    elif not isinstance(accumulator, CollapseAccumulator):
        raise TypeError(f"{op}: accumulator must be a CollapseAccumulator, got {type(accumulator).__name__}")
    elif (accumulator.num_classes, accumulator.dim) != (vocab, dim):
        raise ValueError(f"{op}: accumulator is for C={accumulator.num_classes}, D={accumulator.dim} but the "
                         f"model's output embedding is [V={vocab}, D={dim}]")
    accs: Dict[int, CollapseAccumulator] = {}
    if layers is not None:
        accs = {j: CollapseAccumulator(vocab, dim, device=device) for j in want}
        accs[final_idx] = accumulator
    if decisions and iter(batches) is batches:
        raise TypeError(f"{op}: decisions=True needs two passes over batches; pass a list or a re-iterable "
                        "loader, not a one-shot iterator")
    total = len(batches) if hasattr(batches, "__len__") else None
    show = progress if callable(progress) else (_progress_printer(total) if progress else None)

    was_training = model.training
    model.eval()
    cap = _Capture(model, want)
    try:
        stages = ["update"] + (["decisions"] if decisions else [])
        for stage in stages:
            tokens = 0
            nb = 0
            for b in batches:
                ids, mask = _batch(b, ids_device, op)
                if ids.shape[1] < 2:
                    nb += 1
                    continue
                hi = int(ids.max()) if ids.numel() else 0
                if int(ids.min()) < 0 or hi >= vocab:
                    bad = int(ids.min()) if int(ids.min()) < 0 else hi
                    raise ValueError(f"{op}: input_ids contains token {bad}, outside the vocabulary [0, {vocab})")
                _forward(model, cap, ids, mask)
                valid = None
                if mask is not None:
                    m = mask != 0
                    valid = m[:, :-1] & m[:, 1:]
                labels = ids[:, 1:].to(device)
                if valid is not None:
                    valid = valid.to(device)
                labels = labels.reshape(-1) if valid is None else labels[valid]
                feats = {final_idx: cap.final}
                feats.update(cap.out)
                pred = None
                for j, h in feats.items():
                    h = h[:, :-1].to(device)
                    h = h.reshape(-1, h.shape[-1]) if valid is None else h[valid]
                    acc = accumulator if (j == final_idx or not accs) else accs[j]
                    if stage == "update":
                        acc.update(h, labels)
                    else:
                        if pred is None:
                            from ..metrics import classifier_argmax

                            hf = cap.final[:, :-1]
                            hf = hf.reshape(-1, hf.shape[-1]) if valid is None else hf[valid]
                            w = weight if weight.dtype == hf.dtype else weight.to(hf.dtype)
                            pred = classifier_argmax(hf, w, None if bias is None else bias.to(hf.dtype))
                        acc.update_decisions(h, pred)
                cap.out, cap.final = {}, None
                tokens += int(labels.numel())
                nb += 1
                if show is not None:
                    show({"stage": stage, "batch": nb, "tokens": tokens, "done": False})
            if show is not None:
                show({"stage": stage, "batch": nb, "tokens": tokens, "done": True})
    finally:
        cap.remove()
        model.train(was_training)
    return accs if layers is not None else accumulator
