"""Train the embedded demo model from scratch: `routelens train-demo --out DIR [--seed 0]`.

Next-token cross-entropy on the worked solution (prompt tokens are not scored), plus the
OLMoE router load-balancing loss (coefficient 0.01). AdamW with linear warm-up and cosine
decay, gradient clipping at 1. Problems are streamed from the seeded training generator,
which never yields a held-out question. Everything random is seeded from `--seed`, and the
run is written with `save_pretrained` (weights, config, tokenizer) plus `card.json`.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from transformers import OlmoeForCausalLM

from routelens.data.arithmetic import ALPHABET, DOMAINS, Problem, training_problems
from routelens.data.char_tokenizer import build_char_tokenizer
from routelens.demo_model import CARD, demo_config
from routelens.progress import progress_bar
from routelens.results.paths import check_new_folder, write_folder_atomic


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 1200
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    threads: int = 1
    domains: tuple[str, ...] = DOMAINS   # a subset trains a specialist (a grafting donor of the same shapes)


def encode_batch(problems: list[Problem], tokenizer) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels that score only the solution
    and the final <eos> (prompt and padding are -100)."""
    rows = []
    for problem in problems:
        prompt = tokenizer(problem.question)["input_ids"]
        completion = tokenizer(problem.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt + completion, len(prompt)))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, prompt_len: len(ids)] = torch.tensor(ids[prompt_len:])
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def length_bucketed_batches(problems: list[Problem], batch_size: int, seed: int,
                            bucket: int = 16) -> list[list[Problem]]:
    """Batches of similar length (less padding): every `bucket` batches' worth of problems
    is sorted by length and cut into batches, whose order is then shuffled (seeded)."""
    rng, batches = random.Random(seed), []
    span = batch_size * bucket
    for start in range(0, len(problems), span):
        chunk = sorted(problems[start: start + span], key=lambda p: len(p.question) + len(p.solution))
        group = [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(group)
        batches.extend(group)
    return batches


def _lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def initial_model(seed: int) -> OlmoeForCausalLM:
    """The untrained model of this seed (the 'at initialisation' reference)."""
    seed_everything(seed)
    return OlmoeForCausalLM(demo_config())


def train(out: str, config: TrainConfig, show_progress: bool = True) -> dict:
    check_new_folder(out)   # before minutes of training: a new or empty folder, never one with files
    torch.set_num_threads(config.threads)
    tokenizer = build_char_tokenizer(ALPHABET)
    model = initial_model(config.seed)
    model.set_experts_implementation("eager")  # fastest at this size on CPU
    model.train()
    batches = length_bucketed_batches(training_problems(config.seed, config.steps * config.batch_size, config.domains),
                                      config.batch_size, config.seed)
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "norm" in n]
    decay = [p for n, p in model.named_parameters() if not (p.dim() < 2 or "norm" in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.learning_rate, betas=(0.9, 0.95))
    losses, started = [], time.perf_counter()
    with progress_bar("train-demo", config.steps, 0, show_progress, unit="steps") as advance:
        for step in range(config.steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, config)
            batch = encode_batch(batches[step], tokenizer)
            output = model(**batch, output_router_logits=True)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(output.loss.detach()))
            advance(1)
    model.eval()
    model.set_experts_implementation("grouped_mm")  # the transformers default for users
    card = {
        "trained_by": "routelens train-demo",
        "train_config": asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(time.perf_counter() - started, 1),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "loss_curve_every_100": [round(float(np.mean(losses[i: i + 100])), 4) for i in range(0, len(losses), 100)],
        "torch": torch.__version__,
    }

    def write(folder: str) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, CARD), "w") as handle:
            json.dump(card, handle, indent=2)

    write_folder_atomic(out, write)   # never a half-written model at `out`
    return card
