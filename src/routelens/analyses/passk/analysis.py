"""pass@k with intervals, and base against updated model on the same problems.

Each problem gets n samples at a temperature; the unbiased estimator (Chen et al. 2021)
1 - C(n - c, k) / C(n, k) gives pass@k per problem from its c correct samples, and the
mean over problems carries a 95% percentile bootstrap interval resampling problems. With
two arms (the base model and the model with a router delta), both sample the same problems
with the same per-sequence generators (common random numbers), and the difference
(updated - base) gets a paired bootstrap interval: problems are resampled together.

Samples are written per arm and chunk of problems to a resumable run folder, computed here or
on Ray actors: every sample draws from the generator of its (seed, problem, sample), so the
samples do not depend on the process that drew them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import torch

from routelens import stats
from routelens.analyses.passk.config import PassKConfig
from routelens.distributed import RaySettings, UnitJob
from routelens.errors import RouteLensError
from routelens.evaluation import ANSWER_CHECKERS
from routelens.runs.loop import AnalysisRun, run_analysis

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
                        for k in config.k}
            out[arm]["problems"] = int(len(at))
        if len(arms) == 2:
            base = frame[frame["arm"] == arms[0]].set_index("problem_id")
            updated = frame[frame["arm"] == arms[1]].set_index("problem_id").reindex(base.index)
            out["difference"] = {}
            for k in config.k:
                diff = (updated[f"pass@{k}"] - base[f"pass@{k}"]).to_numpy()
                out["difference"][f"pass@{k}"] = {"mean": float(diff.mean()),
                                                  "ci": stats.mean_interval(diff, seed=config.seed, n_resamples=config.bootstrap_resamples),
                                                  "problems_better": int((diff > 0).sum()),
                                                  "problems_worse": int((diff < 0).sum())}
        return out

    summary = {"analysis": "passk", "arms": arms, "samples_per_problem": config.samples, "ks": config.k,
               "temperature": config.temperature, "estimator": "unbiased pass@k, 1 - C(n-c,k)/C(n,k)",
               "interval": f"95% percentile bootstrap over problems ({config.bootstrap_resamples} resamples)"
                           + ("; the difference is paired (problems resampled together)" if len(arms) == 2 else ""),
               "all": block(problems)}
    groups = [g for g in dict.fromkeys(problems["group"]) if pd.notna(g)]
    if groups:
        summary["by_group"] = {g: block(problems[problems["group"] == g]) for g in sorted(groups)}
    return summary


def router_snapshot(adapter) -> dict[int, list[torch.Tensor]]:
    """A copy of every router's parameters (what `restore_routers` puts back)."""
    return {layer: [p.detach().clone() for p in router.parameters()] for layer, router in adapter.routers.items()}


def restore_routers(adapter, snapshot: dict[int, list[torch.Tensor]]) -> None:
    """Put the routers' parameters back as `router_snapshot` copied them (in place)."""
    with torch.no_grad():
        for layer, tensors in snapshot.items():
            for parameter, tensor in zip(adapter.routers[layer].parameters(), tensors, strict=True):
                parameter.copy_(tensor)


@contextmanager
def routers_restored(adapter, active: bool = True):
    """Every router's parameters as they were on entry, put back on exit (after arms that
    applied a router delta in place)."""
    saved = router_snapshot(adapter) if active else {}
    try:
        yield
    finally:
        restore_routers(adapter, saved)


def run_passk(loaded, problems: list[EvalProblem], config: PassKConfig, out: str | None, data_info: dict,
              arms: list[tuple[str, str | None]], overwrite: bool = False, show_progress: bool = True,
              ray: RaySettings | None = None):
    """Sample every problem in every arm (name, router delta to apply first or None) into the
    run folder `out` (resumably; in memory when `out` is None), summarise, and return the
    completed run. Arms run in order on the same loaded model; a delta applied for an arm is
    taken off again at the end, so the model is left as it came. `ray`: the (arm, chunk)
    units run on a pool of Ray actors instead; every sample draws from the generator of its
    (seed, problem, sample), so the samples do not depend on which actor drew them."""
    from routelens.models.router_delta import apply_router_delta

    config.check()
    if loaded.tokenizer is None:
        raise RouteLensError(f"model {loaded.spec!r} has no tokenizer; pass@k samples text")
    chunks = [problems[i: i + config.problems_per_unit] for i in range(0, len(problems), config.problems_per_unit)]
    run_config = {**loaded.identity(), "dtype": loaded.dtype, **data_info, **config.identity(),
                  "arms": [[name, delta and os.path.abspath(delta)] for name, delta in arms]}
    units = [(a, c) for a in range(len(arms)) for c in range(len(chunks))]
    applied = {}   # each delta checked against this model's base routers before any sampling
    weights = getattr(loaded, "weights", True)   # a Ray driver's model has none: each actor checks the base
    for name, delta in arms:
        if delta:
            with routers_restored(loaded.adapter, weights):
                applied[name] = apply_router_delta(loaded.adapter, delta, check_base=weights)

    def summarise_run(folder) -> dict:
        problem_table = per_problem(folder.read("samples"), config.k)
        folder.write_table("problems", problem_table)
        summary = summarise(problem_table, [name for name, _ in arms], config)
        summary["router_deltas"] = applied
        return summary

    run = AnalysisRun(
        kind="passk", run_config=run_config, tables=("samples",), units=len(units),
        job=PassKJob(units, chunks, arms, config), summarise=summarise_run,
        extra={"model": loaded.adapter.describe(), "device": loaded.device,
               "summary_settings": {k: getattr(config, k) for k in config.SUMMARY},
               "performance": {k: getattr(config, k) for k in config.PERFORMANCE}},
        label="pass@k samples", progress_unit="samples",
        unit_weight=lambda unit: len(chunks[units[unit][1]]) * config.samples,
        done_weight=lambda tables: tables["samples"].num_rows,
        timings=lambda todo, seconds: {"units_this_session": len(todo)})
    with routers_restored(loaded.adapter, bool(applied) and weights):   # the model is left as it came
        return run_analysis(run, loaded, out, overwrite=overwrite, show_progress=show_progress, ray=ray)


class PassKJob(UnitJob):
    """Samples of one chunk of problems in one arm (units: (arm, chunk) pairs, arm-major),
    on the model this process holds; an arm's router delta is applied to the base routers
    when the arm changes."""

    def __init__(self, units: list[tuple[int, int]], chunks: list[list[EvalProblem]],
                 arms: list[tuple[str, str | None]], config: PassKConfig):
        self.units, self.chunks, self.arms, self.config = units, chunks, arms, config

    def setup(self, loaded=None) -> None:
        self._loaded = self.load(loaded)
        self._base = router_snapshot(self._loaded.adapter)
        self._arm = None

    def _use_arm(self, arm: int) -> None:
        from routelens.models.router_delta import apply_router_delta

        if arm == self._arm:
            return
        restore_routers(self._loaded.adapter, self._base)
        delta = self.arms[arm][1]
        if delta:
            apply_router_delta(self._loaded.adapter, delta)
        self._arm = arm

    def run(self, units: list[int]) -> list[dict[str, pa.Table]]:
        from routelens.generation import sample_completions

        loaded, config, tables = self._loaded, self.config, []
        checker = ANSWER_CHECKERS[config.checker]
        for unit in units:
            arm, c = self.units[unit]
            self._use_arm(arm)
            chunk = self.chunks[c]
            samples = sample_completions(loaded.adapter.model, loaded.tokenizer, [p.prompt_ids for p in chunk],
                                         num_samples=config.samples, temperature=config.temperature,
                                         seed=config.seed, max_new_tokens=config.max_new_tokens,
                                         batch_size=config.batch_size, show_progress=False,
                                         index_offset=c * config.problems_per_unit)
            rows = [{"arm": self.arms[arm][0], "problem_id": chunk[s.prompt_index].id,
                     "group": chunk[s.prompt_index].group, "sample": s.sample_index,
                     "correct": bool(checker(s.completion, chunk[s.prompt_index].answer)),
                     "finished": s.finished, "completion": s.completion} for s in samples]
            tables.append({"samples": pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)})
        return tables
