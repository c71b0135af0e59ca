"""Attention functions of the fast engine, registered with transformers' AttentionInterface.

Two modes, switched by the engine through its own `AttentionState` (made active for the
duration of a pass by `active_state`: a context variable, not module-global state, so two
engines never see each other's keys):

- **record** (the natural forward): call the model's own attention (sdpa, or the family's
  eager function, with the mask transformers built for it) and keep each layer's keys and
  values as the attention function sees them (after RoPE / q-k norm / MLA expansion,
  before GQA repetition).
- **patch** (the perturbed suffix): queries, keys and values come from perturbed states,
  one route per batch row, every position perturbed at once. Position t attends to the
  *standard* keys/values of positions s < t (recorded) and to its *own* perturbed key and
  value on the diagonal:

      scores = Q' K_std^T with the diagonal replaced by q'_t . k'_t, causal (and sliding
      window) mask, softmax (with attention sinks where the layer has them), then
      P_offdiag V_std + P_diag v'_t.

  This equals re-running the prefix with only position t perturbed, for every t at once,
  because no position < t depends on position t (causal attention).

Each layer's window comes from the adapter (`AttentionState.windows`), never from the kwargs the
attention function happens to receive: Qwen2-MoE and PhiMoE apply their window only
through the mask, OLMoE passes a `sliding_window` kwarg its mask ignores. In record mode
the mask the model built is compared with the adapter's window, so a family whose mask
says otherwise is caught before any route is scored (`AttentionState.mask_mismatch`).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

WRAPPED = {"sdpa": "routelens_sdpa", "eager": "routelens_eager"}


@dataclass
class AttentionState:
    mode: str = "off"                      # "record" or "patch"
    keys: dict[int, torch.Tensor] = field(default_factory=dict)     # layer -> [B, KV, T, Dk]
    values: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [B, KV, T, Dv]
    row_source: torch.Tensor | None = None  # patch mode: batch row -> recorded sequence
    query_block: int = 1 << 30              # patch mode: queries per block (bounds the [R, H, q, T] scores)
    query_positions: torch.Tensor | None = None  # patch mode: [R, P] positions of the queries; None: all T
    patched_calls: int = 0
    windows: dict[int, int | None] = field(default_factory=dict)  # layer -> window (adapter's), None = causal
    mask_mismatch: str | None = None         # record mode: first layer whose mask disagrees with its window
    _checked_masks: set = field(default_factory=set)


_ACTIVE: ContextVar[AttentionState | None] = ContextVar("routelens_attention_state", default=None)
_OFF = AttentionState()   # read-only default: the wrapped functions pass through to the model's own
#: (device type, dtype) -> the fused kernel agreed with the explicit path: a fact about this
#: process's kernels, checked once and shared by every engine
FUSED_CHECKED: dict = {}


@contextmanager
def active_state(state: AttentionState):
    """Make `state` the one the wrapped attention functions read, for the `with` block."""
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


def _state() -> AttentionState:
    return _ACTIVE.get() or _OFF


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def _original(module, name: str):
    if name == "eager":  # the family's own eager function (GPT-OSS's has attention sinks)
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _fused_off_diagonal(query, keys, values, source, groups, scaling):
    """Attention of each position t >= 1 over the standard keys s < t, with its
    log-normaliser, from one of PyTorch's fused kernels: queries 1..T-1 against keys
    0..T-2 under a causal mask is exactly "s < t". `keys`/`values` are the recorded ones
    [B, KV, T, D], gathered here for the rows (`source`) already cut to 0..T-2 (one copy).
    Returns (out [R, H, T-1, Dv], lse [R, H, T-1]) for positions 1..T-1. CPU: the flash
    kernel; CUDA: the memory-efficient kernel (its log-normaliser padded to a multiple of 32
    queries). None where neither serves (another device, torch without the op, head dims the
    kernel refuses)."""
    if query.shape[-2] < 2:
        return None
    if query.device.type == "cpu":
        kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        call = None if kernel is None else lambda q, k, v: kernel(q, k, v, 0.0, True, scale=scaling)[:2]
    elif query.device.type == "cuda":
        kernel = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)
        call = None if kernel is None else lambda q, k, v: kernel(q, k, v, None, True, 0.0, True, scale=scaling)[:2]
    else:
        call = None
    if call is None:
        return None
    k_off = _repeat_kv(keys[:, :, :-1][source], groups)
    v_off = _repeat_kv(values[:, :, :-1][source], groups)
    try:
        out, lse = call(query[..., 1:, :].contiguous(), k_off, v_off)
    except RuntimeError:  # e.g. key and value head dims differ (MLA), or a head dim the kernel does not take
        return None
    return out, lse[..., : query.shape[-2] - 1].float()


FUSED_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}   # others (bf16, fp16): 2e-2
TESTED_DEVICES = ("cpu",)   # where CI runs the fused kernel against the reference engine


def _fused_trusted(query, fused: torch.Tensor, explicit) -> bool:
    """The fused kernel's output, on a device and dtype where CI does not run it (CUDA),
    is compared once with the explicit path's (`explicit()`) before it is used: agreeing,
    it serves the rest of the process; disagreeing, the explicit path does, with a warning."""
    key = (query.device.type, query.dtype)
    if query.device.type in TESTED_DEVICES:
        return True
    if key not in FUSED_CHECKED:
        expected = explicit()
        difference = float((fused.float() - expected.float()).abs().max())
        tolerance = FUSED_TOLERANCE.get(query.dtype, 2e-2) * max(1.0, float(expected.float().abs().max()))
        FUSED_CHECKED[key] = difference <= tolerance
        if not FUSED_CHECKED[key]:
            import warnings

            warnings.warn(f"the fused attention kernel on {key[0]} {key[1]} differs from the explicit path by "
                          f"{difference:.3g}; the fast engine uses the explicit path", stacklevel=2)
    return FUSED_CHECKED[key]


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """A transformers attention mask -> bool "may attend" (sdpa: bool; eager: 0 where allowed)."""
    return mask if mask.dtype == torch.bool else mask == 0


def check_mask(layer: int, mask, length: int) -> None:
    """Record mode: the mask the model built for `layer` must be causal within the adapter's
    window for that layer; note the first disagreement in the state's `mask_mismatch`."""
    state = _state()
    window = state.windows.get(layer)
    if state.mask_mismatch is not None or (id(mask), window) in state._checked_masks:
        return
    if mask is None:   # sdpa skipped the mask: plain causal (or a window covering the sequence)
        agrees = window is None or window >= length
    elif not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        agrees = False
    else:
        t = torch.arange(mask.shape[-2], device=mask.device)[:, None]
        s = torch.arange(mask.shape[-1], device=mask.device)[None, :]
        expected = s <= t
        if window is not None:
            expected &= s > t - window
        agrees = bool((_allowed(mask) == expected).all())
        state._checked_masks.add((id(mask), window))
    if not agrees:
        said = "full causal" if window is None else f"a sliding window of {window}"
        state.mask_mismatch = (f"the attention mask the model builds for layer {layer} is not the {said} "
                               "attention the adapter declares for it")


def patched_attention(module, query, key, value, scaling, sliding_window=None, s_aux=None):
    """query [R, H, T, Dk], key [R, KV, T, Dk], value [R, KV, T, Dv] -> [R, T, H, Dv];
    `sliding_window`: keys a query may see (itself included), None for full causal."""
    layer, state = module.layer_idx, _state()
    keys, values = state.keys[layer], state.values[layer]
    source = state.row_source.to(keys.device)
    groups = query.shape[1] // keys.shape[1]
    k_own, v_own = _repeat_kv(key, groups), _repeat_kv(value, groups)

    def standard():   # the recorded keys/values of each row's sequence, every position
        return _repeat_kv(keys[source], groups), _repeat_kv(values[source], groups)

    if state.query_positions is not None:
        out = _gathered_attention(query, *standard(), k_own, v_own, scaling, state.query_positions.to(query.device),
                                  sliding_window, s_aux)
        return out.transpose(1, 2).contiguous(), None
    fused = _fused_off_diagonal(query, keys, values, source, groups, scaling) if sliding_window is None else None
    if fused is not None:
        # merge the off-diagonal part and the diagonal term q'_t . k'_t through their log-normalisers;
        # position 0 sees only itself. Written straight into the [R, T, H, Dv] layout returned.
        out_off, lse_off = fused
        diagonal = torch.linalg.vecdot(query[..., 1:, :], k_own[..., 1:, :]).float() * scaling   # [R, H, T-1]
        lse = torch.logaddexp(lse_off, diagonal)
        if s_aux is not None:  # attention sinks: one extra logit per head in the normaliser
            lse = torch.logaddexp(lse, s_aux.float().reshape(1, -1, 1))
            merged = (torch.exp(lse_off - lse)[..., None] * out_off.float()
                      + torch.exp(diagonal - lse)[..., None] * v_own[..., 1:, :].float())
        else:  # the two weights sum to 1: one interpolation
            merged = torch.lerp(out_off.float(), v_own[..., 1:, :].float(), torch.exp(diagonal - lse)[..., None])
        out = torch.empty(query.shape[0], query.shape[2], query.shape[1], value.shape[-1], dtype=value.dtype,
                          device=value.device)
        heads_first = out.transpose(1, 2)                                                   # [R, H, T, Dv] view
        if s_aux is None:
            heads_first[..., 0, :] = v_own[..., 0, :]
        else:   # the sink takes its share of position 0's attention too
            own = torch.exp(-torch.logaddexp(torch.zeros_like(s_aux.float()), s_aux.float() -
                                               (query[..., 0, :] * k_own[..., 0, :]).sum(-1).float() * scaling))
            heads_first[..., 0, :] = (own[..., None] * v_own[..., 0, :].float()).to(value.dtype)
        heads_first[..., 1:, :] = merged
        if _fused_trusted(query, heads_first, lambda: _explicit_attention(query, *standard(), k_own, v_own, scaling,
                                                                          sliding_window, s_aux)):
            return out, None
    out = _explicit_attention(query, *standard(), k_own, v_own, scaling, sliding_window, s_aux)
    return out.transpose(1, 2).contiguous(), None


def _explicit_attention(query, k_std, v_std, k_own, v_own, scaling, sliding_window, s_aux):
    """The patched attention written out, queries in blocks: [R, H, T, Dv] (every position
    is a query at its own position)."""
    positions = torch.arange(query.shape[-2], device=query.device).expand(query.shape[0], -1)
    return _gathered_attention(query, k_std, v_std, k_own, v_own, scaling, positions, sliding_window, s_aux)


def _gathered_attention(query, k_std, v_std, k_own, v_own, scaling, positions, sliding_window, s_aux):
    """Patched attention for queries at given positions only: query/k_own/v_own [R, H, P, D]
    at positions [R, P]; k_std/v_std [R, H, T, D] of every position. Position t sees the
    standard keys s < t (within the window) and its own perturbed key on the diagonal."""
    s = torch.arange(k_std.shape[-2], device=query.device)
    blocks, block = [], _state().query_block
    for start in range(0, query.shape[-2], block):   # query blocks bound the score memory
        stop = min(query.shape[-2], start + block)
        q, own_k, own_v, at = query[..., start:stop, :], k_own[..., start:stop, :], v_own[..., start:stop, :], positions[:, start:stop]
        scores = torch.matmul(q, k_std.transpose(-1, -2)).float() * scaling                # [R, H, q, T]
        hidden = s[None, None, :] >= at[..., None]                                         # s >= t: itself and the future
        if sliding_window is not None:
            hidden |= s[None, None, :] <= at[..., None] - sliding_window
        scores.masked_fill_(hidden[:, None], float("-inf"))
        diagonal = (q * own_k).sum(-1).float() * scaling                                   # [R, H, q]: q'_t . k'_t
        top = torch.maximum(scores.amax(dim=-1), diagonal)
        if s_aux is not None:  # attention sinks: one extra logit per head in the normaliser, no value
            sink = s_aux.float().reshape(1, -1, 1)
            top = torch.maximum(top, sink)
        off = torch.exp(scores - top[..., None])
        own = torch.exp(diagonal - top)
        total = off.sum(dim=-1) + own + (torch.exp(sink - top) if s_aux is not None else 0.0)
        probs = (off / total[..., None]).to(v_std.dtype)
        blocks.append(torch.matmul(probs, v_std) + (own / total)[..., None].to(v_std.dtype) * own_v)
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-2)


def _make(name: str):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        state = _state()
        if state.mode == "patch":
            state.patched_calls += 1
            return patched_attention(module, query, key, value, scaling, state.windows.get(module.layer_idx),
                                     kwargs.get("s_aux"))
        if state.mode == "record":
            state.keys[module.layer_idx] = key.detach()
            state.values[module.layer_idx] = value.detach()
            check_mask(module.layer_idx, attention_mask, query.shape[-2])
        return _original(module, name)(module, query, key, value, attention_mask, scaling=scaling,
                                       dropout=dropout, **kwargs)
    return attention


def register() -> None:
    """Register the wrapped implementations once (idempotent)."""
    AttentionInterface.register(WRAPPED["sdpa"], _make("sdpa"))
    AttentionInterface.register(WRAPPED["eager"], _make("eager"))
    AttentionMaskInterface.register(WRAPPED["sdpa"], sdpa_mask)
    AttentionMaskInterface.register(WRAPPED["eager"], eager_mask)
