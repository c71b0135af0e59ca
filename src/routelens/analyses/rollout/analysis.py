"""Rollouts: does the next-token proxy's better route also give a better final answer?

The counterfactual analysis scores a route by log p(next token of the trajectory). A
route that changes the token changes the continuation, so the proxy's target may not
hold ("target invariance"). For chosen scored tokens of a complete counterfactual run,
this continues the trajectory from that token N times under three arms, each route
forced at that token and layer only (every generated token routes naturally):

- `standard`: route 0, the router's own route;
- `best_alt`: the alternative with the highest next-token log-prob in the run;
- `random_alt`: an alternative drawn uniformly (seeded) from the run's sampled ones.

Each continuation's final answer is checked against the trajectory's reference answer.
Sample s of every arm draws from the same random stream (common random numbers), so the
paired differences between arms carry less noise. All rows of a token share the
prefix's cache (`continue_under_routes`). One unit per chosen token: a killed run
resumes without losing or repeating a token. Every token's arms are checked at run time
against the counterfactual run's scores of the same routes (`rollout_token`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from routelens.analyses.counterfactual.input import check_same_model, counterfactual_run, run_trajectories
from routelens.analyses.rollout.config import RolloutConfig
from routelens.analyses.route_sampling import route_rng
from routelens.config import ALL_TOKENS, BINS
from routelens.distributed import RaySettings, UnitJob, check_ray_can_load
from routelens.engine.checks import DeviationRecord, RuntimeCheckFailed
from routelens.errors import RouteLensError, SettingError
from routelens.runs.loop import AnalysisRun, run_analysis
from routelens.stats import MIN_CLUSTERS, trajectory_interval

ARMS = ("standard", "best_alt", "random_alt")
ROLLOUTS_SCHEMA = pa.schema([
    ("trajectory_id", pa.string()), ("position", pa.int64()), ("layer", pa.int64()), ("bin", pa.string()),
    ("gain", pa.float64()), ("arm", pa.string()), ("route", pa.int64()), ("experts", pa.list_(pa.int64())),
    ("sample", pa.int64()), ("correct", pa.bool_()), ("answer", pa.string()), ("tokens_generated", pa.int64()),
    ("finished", pa.bool_()), ("continuation", pa.string()),
])
NEEDED_BY = "rollout"


class NothingToRollOut(RouteLensError):
    """No scored token of the counterfactual run matches the selection."""


@dataclass
class ChosenToken:
    """A scored token of the counterfactual run and its three arms' routes (route index,
    experts [k], weights [k] exactly as the run applied them, the run's log p of the next
    token under that route)."""

    trajectory_id: str
    position: int
    layer: int
    bin: str
    gain: float
    arms: dict[str, tuple[int, list[int], list[float], float]]

    @property
    def key(self) -> str:
        return f"{self.trajectory_id}@{self.position}:{self.layer}"


# ---------------------------------------------------------------------------- which tokens
def sampled_routes(routes: pd.DataFrame, run: dict) -> pd.DataFrame:
    """The standard route (0) and the run's S Gumbel-sampled alternatives (1..S, S its `routes`
    setting): the only routes an arm may take. Rows after them (uniformly drawn null routes,
    `sampler` "uniform") measure the sampler's null and are no candidates of the router; the
    filter reads the run's config, so it holds for runs written before the `sampler` column."""
    return routes[routes["route"] <= int(run["config"]["routes"])]


def _requested(tokens: pd.DataFrame, selection: str, tolerance: float) -> pd.DataFrame:
    """The run's tokens that `selection` names: fragile, all, or a file's rows."""
    if selection == "fragile":
        return tokens[(tokens["bin"] == "Fragile") & (tokens["gain"] > tolerance)]
    if selection == "all":
        return tokens
    from routelens.data.trajectories import read_records

    rows = pd.read_csv(selection) if selection.endswith(".csv") else pd.DataFrame(read_records(selection, "token file"))
    missing = [c for c in ("trajectory_id", "position", "layer") if c not in rows.columns]
    if missing or rows.empty:
        raise RouteLensError(f"{selection}: needs rows with trajectory_id, position and layer"
                             + (f" (missing {', '.join(missing)})" if missing else " (the file is empty)"))
    wanted = rows[["trajectory_id", "position", "layer"]].astype({"trajectory_id": str, "position": int, "layer": int})
    chosen = tokens.merge(wanted.drop_duplicates(), on=["trajectory_id", "position", "layer"])
    if len(chosen) < len(wanted.drop_duplicates()):
        known = set(zip(tokens["trajectory_id"], tokens["position"], tokens["layer"]))
        absent = next(r for r in wanted.itertuples(index=False) if tuple(r) not in known)
        raise RouteLensError(f"{selection}: token {tuple(absent)} (trajectory_id, position, layer) was not scored by "
                             "the counterfactual run; list tokens of its tokens.parquet")
    return chosen


def choose_tokens(tokens: pd.DataFrame, routes: pd.DataFrame, config: RolloutConfig,
                  tolerance: float) -> tuple[list[ChosenToken], int]:
    """The chosen tokens in the run's order (the `limit` largest gains when limited), each with
    its three arms; returns them and how many were skipped for having no alternative with
    another expert set than the standard route."""
    chosen = _requested(tokens, config.tokens, tolerance)
    if config.limit is not None and len(chosen) > config.limit:
        chosen = chosen.sort_values("gain", ascending=False, kind="stable").head(config.limit).sort_index()
    by_token = routes.set_index(["trajectory_id", "position", "layer"]).sort_index()
    out, skipped = [], 0
    for row in chosen.itertuples(index=False):
        at = by_token.loc[(row.trajectory_id, row.position, row.layer)].sort_values("route")
        experts = [list(map(int, e)) for e in at["experts"]]
        others = [i for i in range(1, len(at)) if experts[i] != experts[0]]
        if not others:
            skipped += 1
            continue
        logprob = at["logprob"].to_numpy()
        best = max(others, key=lambda i: (logprob[i], -i))
        rng = route_rng(config.seed, int(row.layer), f"{row.trajectory_id}@{row.position}", 7)
        pick = {"standard": 0, "best_alt": best, "random_alt": others[int(rng.integers(len(others)))]}
        arms = {arm: (int(at["route"].iloc[i]), experts[i], [float(w) for w in at["weights"].iloc[i]], float(logprob[i]))
                for arm, i in pick.items()}
        out.append(ChosenToken(str(row.trajectory_id), int(row.position), int(row.layer), str(row.bin),
                               float(row.gain), arms))
    return out, skipped


# ---------------------------------------------------------------------------- checking
def final_answer(checker: str, text: str) -> str | None:
    """The answer a continuation ends with, as the checker reads it (None: none found)."""
    if checker == "arithmetic":
        from routelens.data.arithmetic import verify

        predicted = verify(text, 0).predicted
        return None if predicted is None else str(predicted)
    from math_verify import parse

    parsed = parse(text)
    return str(parsed[-1]) if parsed else None


def _correct(checker: str, text: str, answer: str) -> bool:
    from routelens.evaluation import ANSWER_CHECKERS

    if checker == "arithmetic":
        try:
            int(answer)
        except ValueError:
            raise SettingError(f"the arithmetic `checker` needs integer answers, got {answer!r}; "
                               "use `checker` math-verify", "checker") from None
    return bool(ANSWER_CHECKERS[checker](text, answer))


# ---------------------------------------------------------------------------- rollouts of one token
def _unit_digest(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def rollout_token(adapter, tokenizer, trajectory, token: ChosenToken, config: RolloutConfig,
                  deviation: DeviationRecord) -> list[dict]:
    """Every arm's continuations of one chosen token, checked: one row per (arm, sample).

    Checked at run time: each arm's first step (the forced route on the shared-cache path)
    must give the trajectory's next token the log-prob the counterfactual run scored for
    that route, else `RuntimeCheckFailed`: continuations of a route other than the one
    scored are never reported."""
    from routelens.generation import continue_under_routes, row_generator

    samples = 1 if config.greedy else config.samples
    jobs = [(arm, s) for arm in ARMS for s in range(samples)]
    experts = torch.tensor([token.arms[arm][1] for arm, _ in jobs])
    weights = torch.tensor([token.arms[arm][2] for arm, _ in jobs], dtype=torch.float32)
    # sample s of every arm draws from one stream: paired arms differ by their route, not their luck
    generators = None if config.greedy else [row_generator(config.seed, _unit_digest(token.key), s) for _, s in jobs]
    prefix = trajectory.input_ids[: token.position + 1]
    continuations, first_step = continue_under_routes(adapter, prefix, token.layer, experts, weights, generators,
                                                      float(config.temperature), config.max_new_tokens,
                                                      tokenizer.eos_token_id)
    following = trajectory.input_ids[token.position + 1]
    firsts = [jobs.index((arm, 0)) for arm in ARMS]
    mismatch = deviation.check(first_step[firsts, following].double().numpy(),
                               np.array([token.arms[arm][3] for arm in ARMS]))
    if mismatch:
        raise RuntimeCheckFailed(f"rollout check failed at {token.key}: the forced routes' first steps do not give the "
                                 f"counterfactual run's log-probs ({mismatch}); a run scored in another dtype or on "
                                 "another device differs too: load the model as the counterfactual run did")
    written = trajectory.input_ids[trajectory.completion_start: token.position + 1]
    rows = []
    for (arm, sample), generated in zip(jobs, continuations):
        text = tokenizer.decode(written + generated, skip_special_tokens=True)
        rows.append({"trajectory_id": token.trajectory_id, "position": token.position, "layer": token.layer,
                     "bin": token.bin, "gain": token.gain, "arm": arm, "route": token.arms[arm][0],
                     "experts": token.arms[arm][1], "sample": sample,
                     "correct": _correct(config.checker, text, trajectory.answer),
                     "answer": final_answer(config.checker, text), "tokens_generated": len(generated),
                     "finished": bool(generated) and generated[-1] == tokenizer.eos_token_id,
                     "continuation": tokenizer.decode(generated, skip_special_tokens=True)})
    return rows


# ---------------------------------------------------------------------------- summary
def per_token(rollouts: pd.DataFrame) -> pd.DataFrame:
    """One row per chosen token: accuracy of each arm over its samples."""
    keys = ["trajectory_id", "position", "layer", "bin", "gain"]
    table = rollouts.pivot_table(index=keys, columns="arm", values="correct", aggfunc="mean").reset_index()
    return table.rename(columns={arm: f"accuracy_{arm}" for arm in ARMS})


def summarise_group(frame: pd.DataFrame, seed: int, resamples: int) -> dict:
    """Accuracy per arm and the paired differences against the standard route (intervals
    over trajectories), and how often the proxy's preferred route also wins on outcome."""
    def mean(values: pd.Series) -> float | None:
        return None if values.empty else float(values.mean())

    out = {"tokens": int(len(frame)), "trajectories": int(frame["trajectory_id"].nunique()),
           "few_clusters": int(frame["trajectory_id"].nunique()) < MIN_CLUSTERS}
    for arm in ARMS:
        out[f"accuracy_{arm}"] = mean(frame[f"accuracy_{arm}"])
        out[f"accuracy_{arm}_ci"] = trajectory_interval(frame, frame[f"accuracy_{arm}"], seed, resamples)
    for arm in ARMS[1:]:
        difference = frame[f"accuracy_{arm}"] - frame["accuracy_standard"]
        out[f"{arm}_minus_standard"] = mean(difference)
        out[f"{arm}_minus_standard_ci"] = trajectory_interval(frame, difference, seed, resamples)
    difference = frame["accuracy_best_alt"] - frame["accuracy_standard"]
    decided = int((difference != 0).sum())
    out["outcome"] = {"best_alt_better": int((difference > 0).sum()), "best_alt_worse": int((difference < 0).sum()),
                      "tied": int((difference == 0).sum()),
                      # the proxy prefers best_alt on every chosen token; where the outcome differs, does it agree?
                      "proxy_agreement": None if not decided else float((difference > 0).sum() / decided)}
    return out


def summarise(rollouts: pd.DataFrame, config: RolloutConfig, selection: dict) -> dict:
    tokens = per_token(rollouts)
    groups = {name: tokens[tokens["bin"] == name] for name in BINS}
    groups[ALL_TOKENS] = tokens
    return {
        "analysis": "rollout",
        "arms": {"standard": "route 0, the router's own route",
                 "best_alt": "the alternative with the highest next-token log-prob in the counterfactual run",
                 "random_alt": "an alternative drawn uniformly from the run's sampled alternatives (seeded)"},
        "samples_per_arm": 1 if config.greedy else config.samples,
        "temperature": config.temperature,
        "checker": config.checker,
        "selection": selection,
        "interval": f"95% percentile bootstrap over trajectories, {config.bootstrap_resamples} resamples, paired "
                    f"differences per token; few_clusters marks fewer than {MIN_CLUSTERS} trajectories",
        "bins": {name: summarise_group(frame, config.seed, config.bootstrap_resamples)
                 for name, frame in groups.items() if name == ALL_TOKENS or not frame.empty},
    }


# ---------------------------------------------------------------------------- the run
class RolloutJob(UnitJob):
    """Rollouts of chosen tokens (units: indices into `chosen`)."""

    def __init__(self, trajectories: dict, chosen: list, config: RolloutConfig):
        self.trajectories, self.chosen, self.config = trajectories, chosen, config

    def setup(self, loaded=None) -> None:
        self._loaded = self.load(loaded)
        self._deviation = DeviationRecord(self._loaded.adapter)   # |first step - the run's log-prob| so far, nats

    def run(self, units: list[int]) -> list[dict[str, pa.Table]]:
        loaded = self._loaded
        return [{"rollouts": pa.Table.from_pylist(
            rollout_token(loaded.adapter, loaded.tokenizer, self.trajectories[self.chosen[i].trajectory_id], self.chosen[i],
                          self.config, self._deviation), schema=ROLLOUTS_SCHEMA)} for i in units]

    def checks(self) -> dict:
        return {"first_step_max_abs_logprob_diff": self._deviation.largest[0],
                "first_step_mean_abs_logprob_diff": self._deviation.largest[1]}


def run_rollout(loaded, counterfactual_dir: str, config: RolloutConfig, out: str | None, overwrite: bool = False,
                show_progress: bool = True, ray: RaySettings | None = None):
    """Roll out the chosen tokens of the counterfactual run `counterfactual_dir` into the run
    folder `out` (resumable; in memory when None); return the completed run. With `ray`,
    tokens are rolled out by a pool of Ray actors (`routelens.distributed`)."""
    from routelens.data.trajectories import file_sha256

    check_ray_can_load(loaded, ray)

    if loaded.tokenizer is None:
        raise RouteLensError(f"model {loaded.spec!r} has no tokenizer; rollouts decode and check text")
    run = counterfactual_run(counterfactual_dir, NEEDED_BY)
    check_same_model(run, counterfactual_dir, loaded, NEEDED_BY)
    tokens = pd.read_parquet(os.path.join(counterfactual_dir, "tokens.parquet"))
    routes = sampled_routes(pd.read_parquet(os.path.join(counterfactual_dir, "routes.parquet")), run)
    tolerance = float(run["config"].get("win_tolerance", 0.0))
    chosen, skipped = choose_tokens(tokens, routes, config, tolerance)
    if not chosen:
        raise NothingToRollOut(f"no token of {counterfactual_dir} matches --tokens {config.tokens}"
                             + (" (Fragile tokens whose best alternative beats the standard route by more than "
                                f"{tolerance})" if config.tokens == "fragile" else "")
                             + "; try --tokens all or score more trajectories")
    trajectories = run_trajectories(run, counterfactual_dir, loaded, NEEDED_BY)
    unanswered = next((t.trajectory_id for t in chosen if trajectories[t.trajectory_id].answer is None), None)
    if unanswered is not None:
        raise RouteLensError(f"trajectory {unanswered!r} has no reference 'answer'; rollouts check final answers, "
                             "so give the trajectory records an \"answer\" field")
    selection = {"tokens": config.tokens, "chosen": len(chosen), "skipped_without_alternative": skipped,
                 "limit": config.limit, "win_tolerance": tolerance}
    run_config = {**loaded.identity(), "dtype": loaded.dtype, "counterfactual": os.path.abspath(counterfactual_dir),
                  "counterfactual_tokens_sha256": file_sha256(os.path.join(counterfactual_dir, "tokens.parquet")),
                  **config.identity(),
                  **({"tokens_file_sha256": file_sha256(config.tokens)} if config.tokens not in ("fragile", "all") else {})}
    per_token_rows = len(ARMS) * (1 if config.greedy else config.samples)
    generated = 0

    def landed(unit: dict) -> int:
        nonlocal generated
        generated += sum(unit["rollouts"].column("tokens_generated").to_pylist())
        return unit["rollouts"].num_rows

    def timings(todo: list[int], seconds: float) -> dict:
        return {"tokens_this_session": len(todo), "continuations_this_session": len(todo) * per_token_rows,
                "tokens_generated_this_session": generated,
                "generated_tokens_per_second": round(generated / seconds, 1) if todo and seconds > 0 else None}

    rollout = AnalysisRun(
        kind="rollout", run_config=run_config, tables=("rollouts",), units=len(chosen),
        job=RolloutJob(trajectories, chosen, config), summarise=lambda folder: summarise(folder.read("rollouts"), config,
                                                                                          selection),
        extra={"model": loaded.adapter.describe(), "device": loaded.device,
               "summary_settings": {k: getattr(config, k) for k in config.SUMMARY}},
        label="rollouts", progress_unit="continuations", unit_weight=lambda unit: per_token_rows, done_weight=landed,
        timings=timings)
    return run_analysis(rollout, loaded, out, overwrite=overwrite, show_progress=show_progress, ray=ray)
