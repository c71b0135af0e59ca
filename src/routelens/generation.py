"""Batched sampling of completions with the model's own `generate` (KV cache, left padding).

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
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64)
                               for g in self.generators]).to(scores.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-300, 1.0)))
        return (scores.double() / self.temperature + gumbel).to(scores.dtype)


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
                generators = [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index_offset + p, s]).generate_state(1)[0]))
                              for p, s in batch]
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
