"""What the model's own dtype does to its numbers: a higher-precision shadow of the model.

A bf16 model's log-probabilities are off the exact ones by rounding that depends on the
order of every sum, so two correct computations of the same route (an engine's and the
natural forward) differ by up to about twice what either differs from the exact value.
The run-time checks take their yardstick from that, measured on the model at hand: the
natural forward of a few sequences in the model's dtype against the same forward run
through a shadow of the model in a higher precision (float32 for bf16/fp16, float64 for
float32), cast one decoder layer at a time so the shadow costs one layer's memory.
Casting up and back is exact (every bf16 value is a float32 value), so the model is left
bit for bit as it was.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import numpy as np
import torch

SHADOW_DTYPE = {torch.bfloat16: torch.float32, torch.float16: torch.float32, torch.float32: torch.float64}


def shadow_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The precision a model computing in `dtype` is checked against (None: none higher)."""
    return SHADOW_DTYPE.get(dtype)


def _cast_module(module: torch.nn.Module, dtype: torch.dtype) -> list:
    """Cast `module`'s floating parameters and buffers to `dtype` in place; what to undo."""
    saved = []
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                    saved.append((store, name, tensor.dtype))
                    if isinstance(tensor, torch.nn.Parameter):
                        tensor.data = tensor.data.to(dtype)
                    else:
                        store[name] = tensor.to(dtype)
    return saved


def _restore(saved: list) -> None:
    for store, name, dtype in reversed(saved):
        tensor = store[name]
        if isinstance(tensor, torch.nn.Parameter):
            tensor.data = tensor.data.to(dtype)
        else:
            store[name] = tensor.to(dtype)


def _upcast_value(value, dtype: torch.dtype):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_upcast_value(v, dtype) for v in value)
    return value


class ShadowUnavailable(Exception):
    """The model cannot run in a higher precision here (offloaded weights, a kernel that
    has no kernel for that dtype): the checks keep the dtype's fixed tolerances."""


@contextmanager
def higher_precision(adapter, dtype: torch.dtype):
    """Forwards run inside compute in `dtype`: the input embeddings' output is cast up, each
    decoder layer is cast up as it runs and back when it is done (its inputs cast up), and
    the final norm and LM head stay cast up for the block. The model is restored exactly."""
    if any(p.device.type == "meta" for p in adapter.model.parameters()):
        raise ShadowUnavailable("weights are offloaded (a device map with disk or meta offload)")
    pending: dict[int, list] = {}

    def cast_up(module, args, kwargs):
        pending[id(module)] = _cast_module(module, dtype)
        return _upcast_value(args, dtype), {k: _upcast_value(v, dtype) for k, v in kwargs.items()}

    def restore(module, args, kwargs, output):
        _restore(pending.pop(id(module), []))

    handles = [adapter.model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.to(dtype))]
    for layer in adapter.decoder_layers:
        handles.append(layer.register_forward_pre_hook(cast_up, with_kwargs=True))
        handles.append(layer.register_forward_hook(restore, with_kwargs=True))
    kept = _cast_module(adapter.final_norm, dtype) + _cast_module(adapter.lm_head, dtype)
    configs = list({id(config): config for config in (adapter.model.config, adapter.config)}.values())
    kernels = [config.__dict__.get("_experts_implementation_internal") for config in configs]
    for config, kernel in zip(configs, kernels):   # grouped_mm has no float64 kernel; eager is exact in any dtype
        if kernel is not None:
            config._experts_implementation_internal = "eager"
    try:
        yield
    finally:
        for config, kernel in zip(configs, kernels):
            if kernel is not None:
                config._experts_implementation_internal = kernel
        for handle in handles:
            handle.remove()
        for saved in pending.values():
            _restore(saved)
        _restore(kept)


CALIBRATION_TOKENS = 256   # scored positions the noise is measured on (the first batch's first sequences)


@torch.no_grad()
def shadow_log_probs(adapter, items, memory_budget: int, dtype: torch.dtype | None) -> np.ndarray:
    """log p(token t + 1) at each item's positions (in item order) under natural routing:
    one right-padded forward, in the model's dtype (`dtype` None) or through its shadow in
    `dtype`."""
    from routelens.engine.batching import pad_right
    from routelens.engine.readout import final_norm_states, target_log_probs

    batch = pad_right([item.input_ids for item in items])
    rows = torch.cat([torch.full((len(item.positions),), b) for b, item in enumerate(items)])
    positions = torch.cat([torch.as_tensor(np.asarray(item.positions), dtype=torch.long) for item in items])
    try:
        with higher_precision(adapter, dtype) if dtype is not None else nullcontext(), \
                final_norm_states(adapter) as final:
            adapter.model(batch.to(adapter.device), use_cache=False, logits_to_keep=1)
            states = final["states"]
            return target_log_probs(adapter, states[rows.to(states.device), positions.to(states.device)],
                                    batch[rows, positions + 1], memory_budget)
    except torch.OutOfMemoryError:
        raise ShadowUnavailable(f"out of memory running the {str(dtype).removeprefix('torch.')} shadow "
                                f"of {len(items)} sequences") from None
    except (RuntimeError, TypeError, NotImplementedError) as error:   # a kernel without this dtype
        raise ShadowUnavailable(f"the model does not run in {str(dtype).removeprefix('torch.')} here: "
                                f"{str(error).splitlines()[0][:160]}") from None


def measure_noise(adapter, items, memory_budget: int | None = None) -> dict:
    """|natural log-prob in the model's dtype - the shadow's| over the scored positions of
    the first items (up to CALIBRATION_TOKENS): two forwards of those sequences. Raises
    `ShadowUnavailable` where no higher precision runs."""
    from routelens.engine.readout import DEFAULT_MEMORY_BUDGET

    dtype = adapter.lm_head.weight.dtype
    higher = shadow_dtype(dtype)
    if higher is None:
        raise ShadowUnavailable(f"no precision above {str(dtype).removeprefix('torch.')} to compare with")
    chosen, count = [], 0
    for item in items:
        if count >= CALIBRATION_TOKENS:
            break
        if len(item.positions):
            chosen.append(item)
            count += len(item.positions)
    if not count:
        raise ShadowUnavailable("no scored position to measure on")
    budget = memory_budget or DEFAULT_MEMORY_BUDGET
    natural = shadow_log_probs(adapter, chosen, budget, None)
    difference = np.abs(natural - shadow_log_probs(adapter, chosen, budget, higher))
    if not np.isfinite(difference).all():
        raise ShadowUnavailable("the shadow's log-probs are not finite")
    return {"method": f"{str(higher).removeprefix('torch.')} shadow", "tokens": int(count),
            "sequences": len(chosen), "noise_max": float(difference.max()), "noise_mean": float(difference.mean())}


@torch.no_grad()
def audit_routes(adapter, input_ids: torch.Tensor, position: int, layer: int, experts: torch.Tensor,
                 weights: torch.Tensor, rows_per_forward: int = 33) -> dict[str, np.ndarray]:
    """Each route [R, k] of one token forced at `layer`, run twice as plain forwards of the
    prefix (the reference engine's computation): in the model's dtype and in its shadow.

    Returns per route: "logprob" (model dtype) and "shadow_logprob" of token position + 1,
    and "flip": whether any MoE layer above `layer` routes the token (its expert set) other
    than the shadow does; and "standard_flip": whether the router at `layer` itself, in a
    natural forward of the prefix, chooses another expert set for the token in the model's
    dtype than in the shadow (the standard route every gain is measured against)."""
    higher = shadow_dtype(adapter.lm_head.weight.dtype)
    if higher is None:
        raise ShadowUnavailable("no higher precision to compare with")
    from routelens.models.routing import RouteOverride, capture_routes, override_routes

    upper = [m for m in adapter.moe_layers if m > layer]
    prefix = input_ids[: position + 1].to(adapter.device)
    target = int(input_ids[position + 1])
    out = {"logprob": [], "shadow_logprob": [], "flip": []}
    for start in range(0, experts.shape[0], rows_per_forward):
        chunk = slice(start, start + rows_per_forward)
        count = experts[chunk].shape[0]
        rows = torch.arange(count, device=adapter.device) * (position + 1) + position
        runs = []
        for context in (nullcontext(), higher_precision(adapter, higher)):
            override = RouteOverride(rows, experts[chunk], weights[chunk].float())
            with context, override_routes(adapter, {layer: override}), capture_routes(adapter, upper) as captured:
                logits = adapter.model(prefix.expand(count, -1), use_cache=False, logits_to_keep=1).logits[:, -1]
            chosen = [captured[m].experts.reshape(count, position + 1, -1)[:, position].sort(-1).values.cpu()
                      for m in upper]
            runs.append((torch.log_softmax(logits.float(), -1)[:, target].double().cpu(), chosen))
        (low, low_sets), (high, high_sets) = runs
        flips = torch.zeros(count, dtype=torch.bool)
        for a, b in zip(low_sets, high_sets):
            flips |= (a != b).any(-1)
        out["logprob"].append(low)
        out["shadow_logprob"].append(high)
        out["flip"].append(flips)
    standard = []
    for context in (nullcontext(), higher_precision(adapter, higher)):
        with context, capture_routes(adapter, [layer]) as captured:
            adapter.model(prefix[None], use_cache=False, logits_to_keep=1)
        standard.append(captured[layer].experts[position].sort().values.cpu())
    return {**{name: torch.cat(values).numpy() for name, values in out.items()},
            "standard_flip": bool((standard[0] != standard[1]).any())}
