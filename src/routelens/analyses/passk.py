"""pass@k with intervals, and base against updated model on the same problems.

Each problem gets n samples at a temperature; the unbiased estimator (Chen et al. 2021)
1 - C(n - c, k) / C(n, k) gives pass@k per problem from its c correct samples, and the
mean over problems carries a 95% percentile bootstrap interval resampling problems. With
two arms (the base model and the model with a router delta), both sample the same problems
with the same per-sequence generators (common random numbers), and the difference
(updated - base) gets a paired bootstrap interval: problems are resampled together.

Samples are written per arm and chunk of problems to a resumable run folder.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import torch

from routelens import stats
from routelens.config import PassKConfig
from routelens.errors import RouteLensError

SAMPLES_SCHEMA = pa.schema([
    ("arm", pa.string()), ("problem_id", pa.string()), ("group", pa.string()), ("sample", pa.int64()),
    ("correct", pa.bool_()), ("finished", pa.bool_()), ("completion", pa.string()),
])


@dataclass
class EvalProblem:
    """A problem to sample: prompt token ids and the answer a sample is checked against.

    Examples:
        >>> import routelens as rl
        >>> lens = rl.load("demo")
        >>> problem = rl.EvalProblem("p1", lens.tokenizer("Q:2+2=A:")["input_ids"], answer="4")
        >>> res = rl.passk(lens, [problem], samples=2, k=[1], checker="arithmetic")
        >>> res.problems["n"].tolist()
        [2]
    """

    id: str
    prompt_ids: list[int]
    answer: str
    group: str | None = None   # e.g. the number of operations, for per-group tables


def _arithmetic_correct(text: str, answer: str) -> bool:
    from routelens.data.arithmetic import verify

    return verify(text, int(answer)).correct


def _math_correct(text: str, answer: str) -> bool:
    from routelens.data.sampling import math_answer_correct

    return math_answer_correct(text, answer)


CHECKERS = {"arithmetic": _arithmetic_correct, "math-verify": _math_correct}


def arithmetic_problems(tokenizer, n: int) -> list[EvalProblem]:
    """The held-out arithmetic set (never in training, nor in trajectory problems)."""
    from routelens.data.arithmetic import heldout_problems

    return [EvalProblem(p.id, list(tokenizer(p.question)["input_ids"]), str(p.answer), f"{p.difficulty} ops")
            for p in heldout_problems(n)]


def file_problems(tokenizer, path: str, n: int | None) -> list[EvalProblem]:
    from routelens.data.sampling import chat_prompt_ids, read_problem_file

    if tokenizer is None:
        raise RouteLensError("this model has no tokenizer; problems in text need one")
    return [EvalProblem(p["id"], chat_prompt_ids(tokenizer, p["prompt"], p["where"]), p["answer"]) for p in read_problem_file(path)[:n]]


def per_problem(samples: pd.DataFrame, ks: list[int]) -> pd.DataFrame:
    """One row per (arm, problem): n, c and pass@k for each k (unbiased estimator)."""
    counts = (samples.groupby(["arm", "problem_id"], sort=False)
              .agg(group=("group", "first"), n=("correct", "size"), c=("correct", "sum")).reset_index())
    for k in ks:
        counts[f"pass@{k}"] = [stats.pass_at_k(int(n), int(c), k) for n, c in zip(counts["n"], counts["c"])]
    return counts


def summarise(problems: pd.DataFrame, arms: list[str], config: PassKConfig) -> dict:
    def block(frame: pd.DataFrame) -> dict:
        out = {}
        for arm in arms:
            at = frame[frame["arm"] == arm]
            out[arm] = {f"pass@{k}": {"mean": float(at[f"pass@{k}"].mean()),
                                      "ci": stats.mean_interval(at[f"pass@{k}"].to_numpy(), seed=config.seed,
                                                                   n_resamples=config.bootstrap_resamples)}
                        for k in config.ks}
            out[arm]["problems"] = int(len(at))
        if len(arms) == 2:
            base = frame[frame["arm"] == arms[0]].set_index("problem_id")
            updated = frame[frame["arm"] == arms[1]].set_index("problem_id").reindex(base.index)
            out["difference"] = {}
            for k in config.ks:
                diff = (updated[f"pass@{k}"] - base[f"pass@{k}"]).to_numpy()
                out["difference"][f"pass@{k}"] = {"mean": float(diff.mean()),
                                                  "ci": stats.mean_interval(diff, seed=config.seed, n_resamples=config.bootstrap_resamples),
                                                  "problems_better": int((diff > 0).sum()),
                                                  "problems_worse": int((diff < 0).sum())}
        return out

    summary = {"analysis": "passk", "arms": arms, "samples_per_problem": config.samples, "ks": config.ks,
               "temperature": config.temperature, "estimator": "unbiased pass@k, 1 - C(n-c,k)/C(n,k)",
               "interval": f"95% percentile bootstrap over problems ({config.bootstrap_resamples} resamples)"
                           + ("; the difference is paired (problems resampled together)" if len(arms) == 2 else ""),
               "all": block(problems)}
    groups = [g for g in dict.fromkeys(problems["group"]) if pd.notna(g)]
    if groups:
        summary["by_group"] = {g: block(problems[problems["group"] == g]) for g in sorted(groups)}
    return summary


@contextmanager
def routers_restored(adapter, active: bool = True):
    """Every router's parameters as they were on entry, put back on exit (after arms that
    applied a router delta in place)."""
    saved = {layer: [p.detach().clone() for p in router.parameters()] for layer, router in adapter.routers.items()} \
        if active else {}
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, tensors in saved.items():
                for parameter, tensor in zip(adapter.routers[layer].parameters(), tensors, strict=True):
                    parameter.copy_(tensor)


def run_passk(loaded, problems: list[EvalProblem], config: PassKConfig, out: str | None, data_info: dict,
              arms: list[tuple[str, str | None]], overwrite: bool = False, show_progress: bool = True):
    """Sample every problem in every arm (name, router delta to apply first or None) into the
    run folder `out` (resumably; in memory when `out` is None), summarise, and return the
    completed run. Arms run in order on the same loaded model; a delta applied for an arm is
    taken off again at the end, so the model is left as it came."""
    from routelens.generation import sample_completions
    from routelens.models.router_delta import apply_router_delta
    from routelens.progress import progress_bar
    from routelens.results.run_folder import open_run

    config.check()
    if loaded.tokenizer is None:
        raise RouteLensError(f"model {loaded.spec!r} has no tokenizer; pass@k samples text")
    checker = CHECKERS[config.checker]
    chunks = [problems[i: i + config.problems_per_unit] for i in range(0, len(problems), config.problems_per_unit)]
    run_config = {**loaded.identity(), "dtype": loaded.dtype, **data_info, **config.identity(),
                  "arms": [[name, delta and os.path.abspath(delta)] for name, delta in arms]}
    folder = open_run(out, "passk", run_config, ("samples",), overwrite=overwrite,
                      extra={"model": loaded.adapter.describe(), "device": loaded.device,
                             "summary_settings": {k: getattr(config, k) for k in config.SUMMARY},
                             "performance": {k: getattr(config, k) for k in config.PERFORMANCE}})
    units = [(a, c) for a in range(len(arms)) for c in range(len(chunks))]
    unit_id = {pair: i for i, pair in enumerate(units)}
    todo = [pair for pair in units if not folder.is_done(unit_id[pair])]
    total = sum(len(chunks[c]) for _, c in units) * config.samples
    done = total - sum(len(chunks[c]) for _, c in todo) * config.samples
    started = time.perf_counter()
    applied = {}
    with progress_bar("pass@k samples", total, done, show_progress, unit="samples") as advance, \
            routers_restored(loaded.adapter, any(delta for _, delta in arms)):
        for arm_index, (name, delta) in enumerate(arms):
            if delta:
                applied[name] = apply_router_delta(loaded.adapter, delta)
            for a, c in todo:
                if a != arm_index:
                    continue
                offset = c * config.problems_per_unit
                samples = sample_completions(loaded.adapter.model, loaded.tokenizer, [p.prompt_ids for p in chunks[c]],
                                             num_samples=config.samples, temperature=config.temperature,
                                             seed=config.seed, max_new_tokens=config.max_new_tokens,
                                             batch_size=config.batch_size, show_progress=False,
                                             index_offset=offset)
                rows = [{"arm": name, "problem_id": chunks[c][s.prompt_index].id,
                         "group": chunks[c][s.prompt_index].group, "sample": s.sample_index,
                         "correct": bool(checker(s.completion, chunks[c][s.prompt_index].answer)),
                         "finished": s.finished, "completion": s.completion} for s in samples]
                folder.write_unit(unit_id[(a, c)], {"samples": pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)})
                advance(len(rows))
    folder.concatenate(list(range(len(units))))
    problem_table = per_problem(folder.read("samples"), config.ks)
    folder.write_table("problems", problem_table)
    summary = summarise(problem_table, [name for name, _ in arms], config)
    summary["router_deltas"] = applied
    folder.complete(summary, extra={"timings": {"seconds_this_session": round(time.perf_counter() - started, 3),
                                                "units_this_session": len(todo)}})
    return folder
