"""Run transformers' Mamba / Mamba-2 mixers on collapsekit's scans and decode steps.

transformers' ``MambaMixer.forward`` / ``Mamba2Mixer.forward`` call module-level scan and
state-update functions of their modeling modules (looked up at call time). Replacing those
functions would change every model in the process, so ``patch`` instead gives each mixer of *this*
model an instance-level ``forward`` (a bound method stored in the module's ``__dict__``; the class
and the modeling module are untouched). That forward is collapsekit's own code for the mixer's
computation: the model's projections, convolution weights, gated norm and output projection, with
the selective scan / SSD scan / decode step from collapsekit. ``unpatch`` deletes the instance
attribute, so the class's forward is in effect again.

Differences from transformers' own path (deliberate, documented in docs/hf.md):
- Mamba-1 continues from the cached state on a multi-token call (transformers restarts from zero
  there, so a prompt fed in two pieces diverges from one full forward).
- The Mamba-2 decode step clamps dt to ``time_step_limit`` as the chunked path does (transformers'
  step does not; with the default limit ``(0, inf)`` this changes nothing, as softplus > 0).
"""
import types
from typing import Dict, Optional

import torch
import torch.nn.functional as F

import collapsekit as ck

SUPPORTED = ((5, 24), (6, 0))  # [lower, upper): the range that tests/test_hf.py has run against
SUPPORTED_TEXT = "transformers >= 5.24, < 6"


def _version_tuple(v: str):
    out = []
    for part in v.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out + [0] * (2 - len(out)))


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"collapsekit.hf needs transformers ({SUPPORTED_TEXT}): pip install 'collapsekit[hf]'") from e
    v = _version_tuple(transformers.__version__)
    if not SUPPORTED[0] <= v < SUPPORTED[1]:
        raise RuntimeError(f"collapsekit.hf supports {SUPPORTED_TEXT}; found transformers {transformers.__version__}")
    return transformers


def _mixer_classes():
    _transformers()
    from transformers.models.mamba.modeling_mamba import MambaMixer
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
    return MambaMixer, Mamba2Mixer


class _Config:
    __slots__ = ("decay_scale", "state_norm_max", "record", "norms")

    def __init__(self, decay_scale, state_norm_max, record):
        self.decay_scale = decay_scale
        self.state_norm_max = state_norm_max
        self.record = record
        self.norms = []  # state norms of the last forward, then one entry per decode step


def _mask(h, attention_mask):
    if attention_mask is not None:
        return (h * attention_mask[:, :, None]).to(h.dtype)
    return h


def _activation(name):
    from transformers.activations import ACT2FN
    return ACT2FN[name]


def _conv(self, xbc, cache, seq_len):
    """The mixer's depthwise causal convolution, (b, channels, L) -> activated (b, channels, L).
    Decode (one token, cached): roll the cached window in place and take its dot with the weights."""
    w = self.conv1d.weight[:, 0, :]  # (channels, K)
    bias = self.conv1d.bias
    act = _activation(self.activation)
    conv_state = cache.get_conv_state(self.layer_idx, state_idx=0) if cache is not None else None
    if conv_state is not None and seq_len == 1 and not cache.is_recording_past(self.layer_idx):
        window = torch.cat([conv_state[:, :, 1:], xbc.to(conv_state.dtype)], dim=-1)
        conv_state.copy_(window)
        out = torch.einsum("bck,ck->bc", window.to(w.dtype), w)
        if bias is not None:
            out = out + bias
        return act(out).unsqueeze(-1).to(xbc.dtype)
    full = xbc
    if cache is not None:
        full = cache.update_conv_state(xbc, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
    k = w.shape[1]
    out = F.conv1d(full.to(w.dtype), w.unsqueeze(1), bias, padding=k - 1, groups=w.shape[0])[..., :full.shape[-1]]
    out = act(out).to(xbc.dtype)
    return out[..., -seq_len:] if cache is not None else out


def _positions(cache, layer_idx, fresh, n):
    """Absolute position of this call's first token (per cache and layer), then advance by n."""
    table = getattr(cache, "_collapsekit_positions", None)
    if table is None:
        table = {}
        try:
            cache._collapsekit_positions = table
        except AttributeError:
            return 0
    start = 0 if fresh else table.get(layer_idx, 0)
    table[layer_idx] = start + n
    return start


def _record(cfg, norms, reset):
    if not cfg.record:
        return
    if reset:
        cfg.norms = []
    cfg.norms.append(norms.detach())


def _saved(state):
    """The cached state as a scan's initial state: a copy under grad mode (the cache is then
    overwritten in place, which would invalidate the tensor autograd saved)."""
    if state is not None and torch.is_grad_enabled():
        return state.clone()
    return state


_SSD_PARAMS = None


def _ssd_supports(name):
    global _SSD_PARAMS
    if _SSD_PARAMS is None:
        import inspect
        _SSD_PARAMS = set(inspect.signature(ck.ssd_scan).parameters)
    return name in _SSD_PARAMS


def _mamba2_forward(self, hidden_states, cache=None, attention_mask=None, cache_params=None, **kwargs):
    cfg = self._collapsekit
    cache = cache if cache is not None else cache_params
    b, L, _ = hidden_states.shape
    dtype = hidden_states.dtype
    H, P, N, G, I = self.num_heads, self.head_dim, self.ssm_state_size, self.n_groups, self.intermediate_size
    state = cache.get_recurrent_state(self.layer_idx, state_idx=0) if cache is not None else None
    proj = self.in_proj(_mask(hidden_states, attention_mask))
    A = -torch.exp(self.A_log.float())
    gate, xbc, dt = proj.split([I, self.conv_dim, H], dim=-1)
    xbc = _mask(_conv(self, xbc.transpose(1, 2), cache, L).transpose(1, 2), attention_mask)
    x, B, C = xbc.split([I, G * N, G * N], dim=-1)
    lo, hi = self.time_step_limit
    default_limit = lo == 0.0 and hi == float("inf")
    if state is not None and L == 1 and not (torch.is_grad_enabled() and proj.requires_grad):
        pos = _positions(cache, self.layer_idx, False, 1)
        tau = cfg.state_norm_max
        if tau is not None and pos > 0 and pos % self.chunk_size == 0:
            # the state entering a chunk is rescaled to norm tau where larger (as ssd_scan does)
            nrm = torch.linalg.vector_norm(state.float().flatten(2), dim=-1)
            scale = torch.where(nrm > tau, tau / nrm, torch.ones_like(nrm))
            state.mul_(scale[:, :, None, None].to(state.dtype))
        dt1 = dt[:, 0, :]
        bias = self.dt_bias
        softplus = True
        if not default_limit:  # clamp as the chunked path does (softplus first, then the limit)
            dt1 = F.softplus(dt1.float() + self.dt_bias.float()).clamp(lo, hi)
            bias, softplus = None, False
        y = ck.selective_state_update(
            state, x.view(b, H, P), dt1[:, :, None].expand(b, H, P), A[:, None, None].expand(H, P, N),
            B.view(b, G, N), C.view(b, G, N), self.D[:, None].expand(H, P),
            dt_bias=None if bias is None else bias[:, None].expand(H, P), dt_softplus=softplus,
            decay_scale=cfg.decay_scale)
        if cfg.record:
            _record(cfg, torch.linalg.vector_norm(state.float().flatten(2), dim=-1)[:, None, :], False)
        y = y.view(b, 1, I)
    else:
        # (also a one-token step that must be differentiable: the decode kernel is not)
        fresh = state is None
        kw = {}
        if cache is not None:
            start = _positions(cache, self.layer_idx, fresh, L)
            if start and _ssd_supports("seq_offset"):
                kw["seq_offset"] = start
            # (an ssd_scan without seq_offset would count chunk boundaries from this call's start)
        res = ck.ssd_scan(
            x.view(b, L, H, P), dt, A, B.view(b, L, G, N), C.view(b, L, G, N), chunk_size=self.chunk_size,
            D=self.D, dt_bias=self.dt_bias, initial_states=_saved(state), dt_softplus=True, dt_limit=(lo, hi),
            return_final_states=cache is not None, return_state_norms=cfg.record, decay_scale=cfg.decay_scale,
            state_norm_max=cfg.state_norm_max, **kw)
        res = res if isinstance(res, tuple) else (res,)
        y = res[0]
        if cache is not None:
            cache.update_recurrent_state(res[1] if state is None else res[1].to(state.dtype), self.layer_idx)
        if cfg.record:
            _record(cfg, res[-1], True)
        y = y.reshape(b, L, I)
    y = self.norm(y, gate)
    return self.out_proj(y.to(dtype))


def _mamba_forward(self, hidden_states, cache=None, attention_mask=None, cache_params=None, **kwargs):
    cfg = self._collapsekit
    cache = cache if cache is not None else cache_params
    b, L, _ = hidden_states.shape
    dtype = hidden_states.dtype
    N, R = self.ssm_state_size, self.time_step_rank
    state = cache.get_recurrent_state(self.layer_idx, state_idx=0) if cache is not None else None
    proj = self.in_proj(_mask(hidden_states, attention_mask)).transpose(1, 2)
    x, gate = proj.chunk(2, dim=1)
    x = _mask(_conv(self, x, cache, L).transpose(1, 2), attention_mask)  # (b, L, I)
    ts, B, C = self.x_proj(x).split([R, N, N], dim=-1)
    dt = self.dt_proj.weight @ ts.transpose(1, 2)  # (b, I, L); the bias goes in as delta_bias
    bias = self.dt_proj.bias.float() if self.dt_proj.bias is not None else None
    A = -torch.exp(self.A_log.float())
    if state is not None and L == 1 and not (torch.is_grad_enabled() and proj.requires_grad):
        y = ck.selective_state_update(state, x[:, 0, :], dt[..., 0], A, B[:, 0], C[:, 0], self.D, z=gate[..., 0],
                                      dt_bias=bias, dt_softplus=True).unsqueeze(-1)
        if cfg.record:
            _record(cfg, torch.linalg.vector_norm(state.float(), dim=-1)[..., None], False)
    else:
        res = ck.selective_scan(x.transpose(1, 2), dt, A, B.transpose(1, 2), C.transpose(1, 2), D=self.D.float(),
                                z=gate, delta_bias=bias, delta_softplus=True, return_last_state=cache is not None,
                                initial_state=_saved(state), return_state_norms=cfg.record)
        res = res if isinstance(res, tuple) else (res,)
        y = res[0]
        if cache is not None:
            cache.update_recurrent_state(res[1] if state is None else res[1].to(state.dtype), self.layer_idx)
        if cfg.record:
            _record(cfg, res[-1], True)
    return self.out_proj(y.transpose(1, 2).to(dtype))


def _mixers(model):
    MambaMixer, Mamba2Mixer = _mixer_classes()
    out = []
    for m in model.modules():
        if isinstance(m, Mamba2Mixer):
            out.append((m, "mamba2"))
        elif isinstance(m, MambaMixer):
            out.append((m, "mamba"))
    return out


def patch(model, *, decay_scale: float = 1.0, state_norm_max: Optional[float] = None,
          record_state_norms: bool = False):
    """Run every Mamba / Mamba-2 mixer of a transformers model on collapsekit, in place.

    Prefill, training (gradients through collapsekit's scans) and cached decode steps; the model's
    own projections, convolution, gated norm and output projection are kept. Calling it again
    replaces the options. Only this model changes (per-mixer instance attributes).

    Args:
        model: a transformers model containing ``MambaMixer`` or ``Mamba2Mixer`` modules
            (``MambaForCausalLM``, ``MambaModel``, ``Mamba2ForCausalLM``, ``Mamba2Model``, ...).
        decay_scale: "forget more" (Mamba-2 only): every decay ``a_t`` is multiplied by it.
        state_norm_max: state normalisation (Mamba-2 only): the state entering each chunk of
            ``config.chunk_size`` positions is rescaled to this Frobenius norm per head where larger.
        record_state_norms: keep the per-step state norms of the last forward (and of the decode
            steps since) for :func:`state_norms`.

    Returns the model. ``TypeError`` if it has no Mamba mixer; ``RuntimeError`` for an unsupported
    transformers version.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"collapsekit.hf.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(decay_scale, bool) or not isinstance(decay_scale, (int, float)) or not 0 < decay_scale <= 1:
        raise ValueError(f"collapsekit.hf.patch: decay_scale must be a float in (0, 1], got {decay_scale!r}")
    if state_norm_max is not None and (isinstance(state_norm_max, bool) or not isinstance(state_norm_max, (int, float))
                                       or not state_norm_max > 0):
        raise ValueError(f"collapsekit.hf.patch: state_norm_max must be None or a positive float, got {state_norm_max!r}")
    if not isinstance(record_state_norms, bool):
        raise TypeError("collapsekit.hf.patch: record_state_norms must be a bool")
    mixers = _mixers(model)
    if not mixers:
        raise TypeError(f"collapsekit.hf.patch: {type(model).__name__} has no Mamba or Mamba-2 mixer "
                        "(transformers' MambaMixer / Mamba2Mixer modules) to patch")
    if any(kind == "mamba" for _, kind in mixers) and (decay_scale != 1.0 or state_norm_max is not None):
        raise ValueError("collapsekit.hf.patch: decay_scale and state_norm_max are Mamba-2 (ssd_scan) mitigations; "
                         f"{type(model).__name__} has Mamba-1 mixers, whose selective_scan has no such option")
    for m, kind in mixers:
        m._collapsekit = _Config(float(decay_scale), None if state_norm_max is None else float(state_norm_max),
                                 record_state_norms)
        m.forward = types.MethodType(_mamba2_forward if kind == "mamba2" else _mamba_forward, m)
    return model


def unpatch(model):
    """Undo :func:`patch` (a no-op on a model that is not patched). Returns the model."""
    for m, _ in _mixers(model):
        if "_collapsekit" in m.__dict__:
            del m._collapsekit
            m.__dict__.pop("forward", None)
    return model


def is_patched(model) -> bool:
    return any("_collapsekit" in m.__dict__ for m, _ in _mixers(model))


def state_norms(model) -> Dict[int, torch.Tensor]:
    """Per layer index, the state norms recorded by a model patched with ``record_state_norms=True``:
    those of the last (non-decode) forward, then one step per decode call since, along time.

    Mamba-2: ``(batch, steps, nheads)`` = ``‖H_t‖_F`` per head. Mamba-1: ``(batch, dim, steps)`` =
    ``‖x_t[d, :]‖`` per channel (selective_scan's layout). fp32. Empty dict before any forward."""
    out = {}
    for m, kind in _mixers(model):
        cfg = m.__dict__.get("_collapsekit")
        if cfg is None:
            continue
        if not cfg.record:
            raise ValueError("collapsekit.hf.state_norms: the model was patched without record_state_norms=True")
        if cfg.norms:
            out[m.layer_idx] = torch.cat(cfg.norms, dim=1 if kind == "mamba2" else 2)
    if not any("_collapsekit" in m.__dict__ for m, _ in _mixers(model)):
        raise ValueError(f"collapsekit.hf.state_norms: {type(model).__name__} is not patched "
                         "(call collapsekit.hf.patch(model, record_state_norms=True) first)")
    return out
