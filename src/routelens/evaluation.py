"""Accuracy of a model on the arithmetic task and statistics of its routers.

- greedy accuracy, and pass@1 / pass@k at a temperature with the unbiased estimator,
  overall and by number of operations;
- per MoE layer: mean max router probability (how peaked the router is) and the entropy
  of the expert load (how evenly top-k selections spread over experts; log E = uniform).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np
import torch
from scipy import stats as scipy_stats

from routelens import stats
from routelens.data.arithmetic import Problem, verify
from routelens.errors import SettingError
from routelens.generation import sample_completions
from routelens.models.adapter import MoEAdapter
from routelens.models.routing import capture_routes


def prompt_ids(tokenizer, problems: list[Problem]) -> list[list[int]]:
    return [tokenizer(p.question)["input_ids"] for p in problems]


def _by_difficulty(problems: list[Problem], values: list[float]) -> dict[str, float]:
    groups = defaultdict(list)
    for problem, value in zip(problems, values):
        groups[problem.difficulty].append(value)
    return {str(d): float(np.mean(v)) for d, v in sorted(groups.items())}


def greedy_accuracy(model, tokenizer, problems: list[Problem], show_progress: bool = True) -> dict:
    samples = sample_completions(model, tokenizer, prompt_ids(tokenizer, problems), greedy=True,
                                 show_progress=show_progress, description="greedy")
    correct = [float(verify(s.completion, problems[s.prompt_index].answer).correct) for s in samples]
    return {"accuracy": float(np.mean(correct)), "by_operations": _by_difficulty(problems, correct),
            "correct": [bool(c) for c in correct]}


def sampled_pass_at_k(model, tokenizer, problems: list[Problem], num_samples: int, ks: tuple[int, ...],
                      temperature: float, seed: int, show_progress: bool = True) -> dict:
    samples = sample_completions(model, tokenizer, prompt_ids(tokenizer, problems), num_samples=num_samples,
                                 temperature=temperature, seed=seed, show_progress=show_progress,
                                 description=f"sample T={temperature}")
    correct_counts = np.zeros(len(problems), dtype=int)
    for s in samples:
        correct_counts[s.prompt_index] += verify(s.completion, problems[s.prompt_index].answer).correct
    result = {"samples_per_problem": num_samples, "temperature": temperature, "seed": seed}
    for k in ks:
        values = [stats.pass_at_k(num_samples, int(c), k) for c in correct_counts]
        result[f"pass@{k}"] = float(np.mean(values))
        result[f"pass@{k}_by_operations"] = _by_difficulty(problems, values)
    return result


@torch.no_grad()
def router_statistics(adapter: MoEAdapter, tokenizer, problems: list[Problem]) -> dict[str, dict]:
    """Per MoE layer, over every token of the problems' worked solutions."""
    max_prob, load = defaultdict(list), defaultdict(lambda: np.zeros(adapter.num_experts))
    for problem in problems:
        ids = tokenizer(problem.question + problem.solution)["input_ids"]
        with capture_routes(adapter) as captured:
            adapter.model(torch.tensor([ids], device=adapter.device), use_cache=False, logits_to_keep=1)
        for layer, out in captured.items():
            max_prob[layer].append(torch.softmax(out.logits.float(), -1).max(-1).values.cpu().numpy())
            load[layer] += np.bincount(out.experts.cpu().numpy().ravel(), minlength=adapter.num_experts)
    result = {}
    for layer in adapter.moe_layers:
        share = load[layer] / load[layer].sum()
        result[str(layer)] = {
            "mean_max_router_prob": float(np.concatenate(max_prob[layer]).mean()),
            "expert_load_entropy_nats": float(scipy_stats.entropy(share)),
            "uniform_entropy_nats": float(np.log(adapter.num_experts)),
        }
    return result


def evaluate_arithmetic(loaded, n: int, samples: int, temperature: float, seed: int,
                        show_progress: bool = True) -> dict:
    """Held-out accuracy and router statistics; for the demo model also the router
    statistics of its initialisation (same seed, untrained)."""
    from routelens.config import positive, seed_value
    from routelens.data.arithmetic import heldout_problems

    positive("temperature", temperature)
    seed_value("seed", seed)
    problems = heldout_problems(n)
    model, tokenizer = loaded.adapter.model, loaded.tokenizer
    greedy = greedy_accuracy(model, tokenizer, problems, show_progress)
    ks = tuple(k for k in (1, samples) if k <= samples)
    report = {
        "model": loaded.spec, "router_delta": loaded.router_delta, "heldout_problems": n,
        "greedy_accuracy": greedy["accuracy"], "greedy_by_operations": greedy["by_operations"],
        **sampled_pass_at_k(model, tokenizer, problems, samples, ks, temperature, seed, show_progress),
        "routers": router_statistics(loaded.adapter, tokenizer, problems[:100]),
        "greedy_correct": greedy["correct"],
    }
    card = read_training_card(loaded.folder)
    if card.get("trained_by") == "routelens train-demo":
        from routelens.demo_model.train import initial_model
        from routelens.models.registry import adapter_for

        init = adapter_for(initial_model(card["train_config"]["seed"]).eval())
        report["routers_at_init"] = router_statistics(init, tokenizer, problems[:100])
    return report


def read_training_card(folder: str | None) -> dict:
    """card.json beside a model trained by `routelens train-demo`, else {}."""
    from routelens.demo_model import CARD

    path = os.path.join(folder, CARD) if folder else ""
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def record_in_card(loaded, report: dict) -> None:
    """Store the evaluation in card.json beside the weights, with the first-20 greedy
    accuracy that the embedded-model test checks."""
    from routelens.results.run_folder import write_json_atomic

    card = read_training_card(loaded.folder)
    if not card:
        raise SettingError("`record` needs a model folder written by `routelens train-demo` (with card.json)", "record")
    card["evaluation"] = {k: v for k, v in report.items() if k != "greedy_correct"}
    card["evaluation"]["greedy_accuracy_first20"] = float(np.mean(report["greedy_correct"][:20]))
    from routelens.demo_model import CARD

    write_json_atomic(os.path.join(loaded.folder, CARD), card)


def _arithmetic_correct(text: str, answer: str) -> bool:
    return verify(text, int(answer)).correct


def _math_correct(text: str, answer: str) -> bool:
    from routelens.data.sampling import math_answer_correct

    return math_answer_correct(text, answer)


# how a final answer is checked, by the name `checker` settings give (routelens.config.CHECKERS)
ANSWER_CHECKERS = {"arithmetic": _arithmetic_correct, "math-verify": _math_correct}
