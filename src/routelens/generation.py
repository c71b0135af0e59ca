"""Batched sampling of completions with the model's own `generate` (KV cache, left padding),
and continuations of one prefix under several routes forced on its last token
(`continue_under_routes`, for rollouts: the prefix's cache is computed once and shared).

Sampling is plain temperature sampling (no top-k, no top-p), or greedy. Each sequence
draws from its own generator, seeded by (seed, prompt index, sample index): a sample is
argmax(logits / T + Gumbel noise), which is an exact draw from softmax(logits / T), so the
result does not depend on the batch size or on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from routelens.progress import progress_bar


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    completion_ids: list[int]   # generated tokens up to and including <eos>, if reached
    completion: str             # decoded without special tokens
    finished: bool              # <eos> reached within max_new_tokens


class _PerSequenceGumbel(LogitsProcessor):
    """Turns greedy decoding into temperature sampling with one generator per row."""

    def __init__(self, generators: list[torch.Generator], temperature: float):
        self.generators, self.temperature = generators, temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return gumbel_scores(scores, self.generators, self.temperature).to(scores.dtype)


def gumbel_scores(scores: torch.Tensor, generators: list[torch.Generator], temperature: float) -> torch.Tensor:
    """scores [rows, V] / T plus Gumbel noise from each row's own generator (float64): the
    argmax is an exact draw from softmax(scores / T)."""
    uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64)
                           for g in generators]).to(scores.device)
    return scores.double() / temperature - torch.log(-torch.log(uniform.clamp(1e-300, 1.0)))


def row_generator(*seeds: int) -> torch.Generator:
    """A generator seeded by a tuple of integers (through numpy's SeedSequence)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(seeds)).generate_state(1)[0]))


@torch.no_grad()
def continue_under_routes(adapter, prefix: list[int], layer: int, experts: torch.Tensor, weights: torch.Tensor,
                          generators: list[torch.Generator] | None, temperature: float, max_new_tokens: int,
                          eos_token_id: int | None) -> tuple[list[list[int]], torch.Tensor]:
    """Continue `prefix` once per route: row r forces route r (experts/weights [rows, k]) on
    the prefix's last token at `layer` only; every generated token routes naturally. The
    tokens before the last run once and their cache is shared by every row. Sampling at
    `temperature` with row r drawing from `generators[r]` (greedy when None). Returns each
    row's generated tokens, up to and including <eos>, and the first step's log-probabilities
    [rows, V] (fp32: what the forced route predicts after the prefix, for run-time checks)."""
    from routelens.models.routing import RouteOverride, override_routes

    rows, device, model = experts.shape[0], adapter.device, adapter.model
    cache = adapter.new_cache()
    if len(prefix) > 1:   # the shared part: once, batch 1, then one copy per row
        model(torch.tensor([prefix[:-1]], device=device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = adapter.copy_cache(cache, 0, rows)
    last = torch.full((rows, 1), prefix[-1], dtype=torch.long, device=device)
    with override_routes(adapter, {layer: RouteOverride(torch.arange(rows), experts, weights)}):
        logits = model(last, past_key_values=cache, use_cache=True).logits[:, -1]
    first_step = torch.log_softmax(logits.float(), dim=-1).cpu()
    generated: list[list[int]] = [[] for _ in range(rows)]
    finished = [False] * rows
    for step in range(max_new_tokens):
        scores = logits.float() if generators is None else gumbel_scores(logits.float(), generators, temperature)
        chosen = scores.argmax(-1).tolist()
        for row, token in enumerate(chosen):
            if not finished[row]:
                generated[row].append(token)
                finished[row] = token == eos_token_id
        if all(finished) or step == max_new_tokens - 1:
            break
        # a finished row keeps decoding (its tokens are dropped): the batch stays rectangular
        logits = model(torch.tensor(chosen, device=device)[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
    return generated, first_step


@torch.no_grad()
def sample_completions(model, tokenizer, prompt_ids: list[list[int]], num_samples: int = 1,
                       temperature: float = 1.0, greedy: bool = False, max_new_tokens: int = 96,
                       seed: int = 0, batch_size: int = 256, show_progress: bool = True,
                       description: str = "generate", index_offset: int = 0) -> list[Sample]:
    """`num_samples` completions of every prompt (token ids, special tokens included).
    Prompt p draws from the generator of (seed, index_offset + p, sample), so a long list
    sampled in pieces (with offsets) gives the same completions as in one call."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    jobs = [(p, s) for p in range(len(prompt_ids)) for s in range(1 if greedy else num_samples)]
    samples = []
    with progress_bar(description, len(jobs), 0, show_progress, unit="samples") as advance:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start: start + batch_size]
            prompts = [prompt_ids[p] for p, _ in batch]
            width = max(map(len, prompts))
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(prompts):  # left padding: the last prompt token is aligned
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention[row, width - len(ids):] = 1
            processors = LogitsProcessorList()
            if not greedy:
                generators = [row_generator(seed, index_offset + p, s) for p, s in batch]
                processors.append(_PerSequenceGumbel(generators, temperature))
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                    max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                                    do_sample=False, logits_processor=processors)
            for row, (p, s) in enumerate(batch):
                generated = output[row, width:].tolist()
                finished = eos in generated
                generated = generated[: generated.index(eos) + 1] if finished else generated
                text = tokenizer.decode(generated, skip_special_tokens=True)
                samples.append(Sample(p, s, prompts[row], generated, text, finished))
            advance(len(batch))
    return samples
