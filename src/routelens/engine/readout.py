"""What the engines share: the read-out of log-probabilities, the memory estimate of one
perturbed sequence, and the record of what the model passes its decoder layers."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from routelens.models.adapter import MoEAdapter

DEFAULT_MEMORY_BUDGET = 2 * 2**30   # bytes for one chunk of perturbed sequences, every engine


def target_log_probs(adapter: MoEAdapter, final: torch.Tensor, targets: torch.Tensor, memory_budget: int) -> np.ndarray:
    """log p(target) from final-norm hidden states [N, d] and target ids [N], through the LM
    head in slices so one slice's [slice, vocab] fp32 logits fit the budget -> float64 [N]."""
    size = max(1, memory_budget // (8 * adapter.config.vocab_size))
    out = []
    for start in range(0, final.shape[0], size):
        logits = adapter.logits(final[start: start + size]).float()
        chunk_targets = targets[start: start + size, None].to(logits.device)
        # the target's logit minus the log-normaliser: no second [slice, vocab] tensor
        out.append((logits.gather(-1, chunk_targets)[:, 0] - torch.logsumexp(logits, -1)).cpu())
    return torch.cat(out).double().cpu().numpy() if out else np.zeros(0)


@contextmanager
def final_norm_states(adapter: MoEAdapter):
    """The final norm's output [B, T, d] of the model forward run inside (read under
    "states"): what `target_log_probs` reads log-probs off, without [B, T, V] logits."""
    store: dict[str, torch.Tensor] = {}
    handle = adapter.final_norm.register_forward_hook(
        lambda module, args, out: store.__setitem__("states", adapter.block_output(out).detach()))
    try:
        yield store
    finally:
        handle.remove()


def reset_peak_memory(device: str) -> None:
    """Start measuring the CUDA memory peak of a run (nothing to do elsewhere)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str, budget: int) -> dict | None:
    """What run.json records beside the timings: the CUDA memory peak since
    `reset_peak_memory` against `--memory-budget` (the chunking's estimate); None off CUDA."""
    if not (str(device).startswith("cuda") and torch.cuda.is_available()):
        return None
    peak = torch.cuda.max_memory_allocated()
    return {"cuda_peak_bytes": int(peak), "memory_budget_bytes": int(budget),
            "cuda_model_bytes": int(torch.cuda.memory_allocated()), "peak_over_budget": round(peak / budget, 3)}


def attention_score_bytes(adapter: MoEAdapter, queries: int, length: int) -> int:
    """Bytes of fp32 attention scores (with softmax and mask temporaries, x3) of one sequence
    for `queries` query positions against `length` keys, over all heads."""
    return 3 * 4 * attention_heads(adapter.config) * queries * length


def attention_heads(config) -> int:
    """The most query heads any decoder layer has. A heterogeneous config (transformers'
    per_layer_config: Step 3.7's sliding layers have their own head count) gives the count per
    layer and refuses to give one global value."""
    if getattr(config, "is_heterogeneous", False):
        return max(layer.num_attention_heads for layer in config.per_layer_config)
    return config.num_attention_heads


def activation_bytes(adapter: MoEAdapter, length: int) -> int:
    """Bytes of one decoder layer's activations for one sequence of `length` tokens (fp32
    residual, attention projections and the top-k expert intermediates): an estimate."""
    intermediate = adapter.expert_intermediate_size
    return 4 * length * (12 * adapter.config.hidden_size + 3 * max(adapter.top_ks.values()) * intermediate)


def record_layer_arguments(adapter: MoEAdapter, layers) -> tuple[dict, list]:
    """Forward pre-hooks that record, for each decoder layer in `layers`, what the model
    passes it in the next forward: (hidden states, other positional arguments, keyword
    arguments), so the layer can be re-run on other states. Returns the dict (filled in
    place) and the hook handles, to remove when done."""
    recorded: dict = {}

    def keep(index, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        recorded[index] = (hidden.detach(), args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})

    hooks = [adapter.decoder_layers[index].register_forward_pre_hook(
        lambda module, args, kwargs, index=index: keep(index, args, kwargs), with_kwargs=True) for index in layers]
    return recorded, hooks
