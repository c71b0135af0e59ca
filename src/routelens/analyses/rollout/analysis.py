"""Rollouts: does the next-token proxy's better route also give a better final answer?

The counterfactual analysis scores a route by log p(next token of the trajectory). A
route that changes the token changes the continuation, so the proxy's target may not
hold ("target invariance"). For chosen scored tokens of a complete counterfactual run,
this continues the trajectory from that token N times under three arms, each route
forced at that token and layer only (every generated token routes naturally):

- `standard`: route 0, the router's own route;
- `best_alt`: with `best_by` top-tokens (the default), the alternative whose next-token
  distribution gives the standard route's `top_tokens` most probable next tokens the
  highest mean probability, picked from the prefix alone, without the trajectory's own
  next token; with `best_by` realized, the alternative with the highest log p of that
  token in the run (an oracle for the proxy's target: its rollouts re-measure the proxy);
- `random_alt`: an alternative drawn uniformly (seeded) from the run's sampled ones.

Alternatives are the run's S Gumbel-sampled routes (1..S) whose expert set differs from
route 0's. The tokens (`tokens`): every Fragile token (fragile-all, the default), a
seeded sample of all scored tokens (random), the Fragile tokens whose realized gain wins
(fragile: chosen by the proxy itself), all, or a file; tokens of trajectories whose final
answer is wrong only with `include_wrong`.

Each continuation's final answer is checked against the trajectory's reference answer and
its first emitted token is kept: the summary splits each arm's accuracy by whether that
token is the trajectory's own next token, and each paired difference into the part that
comes from which first token an arm emits and the part beyond it (`paired_first_tokens`).
Sample s of every arm draws from the same random stream (common random numbers), so the
paired differences between arms carry less noise. All rows of a token share the
prefix's cache (`continue_under_routes`). One unit per chosen token: a killed run
resumes without losing or repeating a token. Every token's arms (with top-tokens: every
candidate alternative) are checked at run time against the counterfactual run's scores
of the same routes (`rollout_token`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from routelens.analyses.counterfactual.input import check_same_model, counterfactual_run, run_trajectories
from routelens.analyses.rollout.config import SAMPLED_SELECTIONS, TOKEN_CHOICES, RolloutConfig
from routelens.analyses.route_sampling import route_rng
from routelens.config import ALL_TOKENS, BINS
from routelens.distributed import RaySettings, UnitJob, check_ray_can_load
from routelens.engine.checks import DeviationRecord, RuntimeCheckFailed
from routelens.errors import RouteLensError, SettingError
from routelens.results.stored import read_table_file
from routelens.runs.loop import AnalysisRun, run_analysis
from routelens.stats import MIN_CLUSTERS, trajectory_interval

ARMS = ("standard", "best_alt", "random_alt")
ROLLOUTS_SCHEMA = pa.schema([
    ("trajectory_id", pa.string()), ("position", pa.int64()), ("layer", pa.int64()), ("bin", pa.string()),
    ("gain", pa.float64()), ("arm", pa.string()), ("route", pa.int64()), ("experts", pa.list_(pa.int64())),
    ("sample", pa.int64()), ("correct", pa.bool_()), ("answer", pa.string()), ("tokens_generated", pa.int64()),
    ("finished", pa.bool_()), ("continuation", pa.string()),
    # added with the first-token decomposition (absent from older run folders)
    ("problem_id", pa.string()), ("verified", pa.bool_()), ("target_id", pa.int64()), ("logprob", pa.float64()),
    ("realized_best_route", pa.int64()), ("first_token", pa.int64()),
])
ALTERNATIVE_ARMS = ARMS[1:]
NEEDED_BY = "rollout"
SELECTION_STREAM = 27   # the seeded token sample of fragile-all / random draws from (seed, this)


class NothingToRollOut(RouteLensError):
    """No scored token of the counterfactual run matches the selection."""


Arm = tuple[int, list[int], list[float], float]   # route index, experts [k], weights [k], the run's log p of the next token


@dataclass
class ChosenToken:
    """A scored token of the counterfactual run and its arms' routes, each exactly as the run
    applied it (`Arm`). `candidates`: the alternatives an alternative arm may take (routes
    1..S of another expert set than route 0), in route order; `realized_best`: the route
    the proxy prefers (highest log p of the trajectory's next token). `best_alt` is among
    `arms` from the start with `best_by` realized, else once `pick_best_by_top_tokens` ran."""

    trajectory_id: str
    position: int
    layer: int
    bin: str
    gain: float
    arms: dict[str, Arm]
    candidates: list[Arm] = field(default_factory=list)
    realized_best: int = -1
    problem_id: str | None = None
    verified: bool | None = None

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


def trajectory_verdicts(trajectories: dict, tokenizer, checker: str) -> dict[str, bool | None]:
    """Whether each trajectory's final answer is right: its record's `verified`, else (when
    it has a reference answer) `checker` on its completion; None when neither says."""
    verdicts = {}
    for tid, t in trajectories.items():
        if t.verified is None and t.answer is not None:
            completion = tokenizer.decode(t.input_ids[t.completion_start:], skip_special_tokens=True)
            verdicts[tid] = _correct(checker, completion, t.answer)
        else:
            verdicts[tid] = t.verified
    return verdicts


def _requested(tokens: pd.DataFrame, selection: str, tolerance: float) -> pd.DataFrame:
    """The run's tokens that `selection` names: Fragile ones (fragile-all), those whose best
    alternative wins (fragile), every one (all; random samples them later), or a file's rows."""
    if selection == "fragile-all":
        return tokens[tokens["bin"] == "Fragile"]
    if selection == "fragile":
        return tokens[(tokens["bin"] == "Fragile") & (tokens["gain"] > tolerance)]
    if selection in ("all", "random"):
        return tokens
    from routelens.analyses.rollout.token_file import scored_tokens

    return scored_tokens(tokens, selection)


def choose_tokens(tokens: pd.DataFrame, routes: pd.DataFrame, config: RolloutConfig, tolerance: float,
                  verdicts: dict[str, bool | None] | None = None,
                  problem_ids: dict[str, str | None] | None = None) -> tuple[list[ChosenToken], dict]:
    """The chosen tokens in the run's order, each with its arms (`routes`: route 0 and the
    sampled alternatives only, `sampled_routes`), and what the selection left out:
    `skipped_without_alternative` (no alternative with another expert set than route 0)
    and `wrong_trajectory_tokens_left_out` (`verdicts` False, without `include_wrong`).
    `limit` keeps a seeded sample under fragile-all and random, the largest gains otherwise."""
    verdicts, problem_ids = verdicts or {}, problem_ids or {}
    chosen = _requested(tokens, config.tokens, tolerance)
    wrong = chosen["trajectory_id"].map(lambda tid: verdicts.get(tid) is False).astype(bool)
    left_out = 0
    if wrong.any() and not config.include_wrong:
        if config.tokens not in TOKEN_CHOICES:
            row = chosen[wrong].iloc[0]
            raise SettingError(f"{config.tokens}: token {(row.trajectory_id, int(row.position), int(row.layer))} is of "
                               f"trajectory {row.trajectory_id!r}, whose final answer is wrong; pass `include_wrong` "
                               "to roll out tokens of wrong trajectories", "include_wrong")
        chosen, left_out = chosen[~wrong], int(wrong.sum())
    keys = ["trajectory_id", "position", "layer"]
    at_token = dict(list(routes.merge(chosen[keys], on=keys).sort_values([*keys, "route"]).groupby(keys, sort=False)))
    standard_experts = {key: list(map(int, at["experts"].iloc[0])) for key, at in at_token.items()}
    has_alternative = np.array([any(list(map(int, e)) != standard_experts[key] for e in at_token[key]["experts"].iloc[1:])
                                for key in zip(chosen["trajectory_id"], chosen["position"], chosen["layer"])], dtype=bool)
    skipped = len(chosen) - int(has_alternative.sum())
    chosen = chosen[has_alternative]
    if config.limit is not None and len(chosen) > config.limit:
        if config.tokens in SAMPLED_SELECTIONS:
            rng = np.random.default_rng([config.seed, SELECTION_STREAM])
            chosen = chosen.iloc[np.sort(rng.choice(len(chosen), config.limit, replace=False))]
        else:
            chosen = chosen.sort_values("gain", ascending=False, kind="stable").head(config.limit).sort_index()
    out = []
    for row in chosen.itertuples(index=False):
        at = at_token[(row.trajectory_id, row.position, row.layer)]
        arms = [(int(route), list(map(int, e)), [float(w) for w in weights], float(logprob))
                for route, e, weights, logprob in zip(at["route"], at["experts"], at["weights"], at["logprob"])]
        others = [arm for arm in arms[1:] if arm[1] != arms[0][1]]
        realized = max(others, key=lambda arm: (arm[3], -arm[0]))
        rng = route_rng(config.seed, int(row.layer), f"{row.trajectory_id}@{row.position}", 7)
        picked = {"standard": arms[0], "random_alt": others[int(rng.integers(len(others)))]}
        if config.best_by == "realized":
            picked["best_alt"] = realized
        tid = str(row.trajectory_id)
        out.append(ChosenToken(tid, int(row.position), int(row.layer), str(row.bin), float(row.gain), picked, others,
                               realized[0], problem_ids.get(tid), verdicts.get(tid)))
    return out, {"skipped_without_alternative": skipped, "wrong_trajectory_tokens_left_out": left_out}


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


def _check_first_steps(token: ChosenToken, routes: list[Arm], first_step: torch.Tensor, following: int,
                       deviation: DeviationRecord) -> None:
    """`first_step` [rows, V] of `routes` must give the trajectory's next token the log-probs
    the counterfactual run scored for those routes, else `RuntimeCheckFailed`."""
    mismatch = deviation.check(first_step[:, following].double().numpy(), np.array([arm[3] for arm in routes]))
    if mismatch:
        raise RuntimeCheckFailed(f"rollout check failed at {token.key}: the forced routes' first steps do not give the "
                                 f"counterfactual run's log-probs ({mismatch}); a run scored in another dtype or on "
                                 "another device differs too: load the model as the counterfactual run did")


def _route_tensors(routes: list[Arm]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([arm[1] for arm in routes]), torch.tensor([arm[2] for arm in routes], dtype=torch.float32)


def pick_best_by_top_tokens(adapter, trajectory, token: ChosenToken, config: RolloutConfig,
                            deviation: DeviationRecord) -> ChosenToken:
    """`best_by` top-tokens: the token with `best_alt` set to the candidate whose next-token
    distribution after the prefix gives the standard route's `top_tokens` most probable next
    tokens (ties: the lower token id) the highest mean probability (ties: the lower route).
    The trajectory's own next token is not used, so the choice can disagree with the proxy.
    Every candidate's first step is checked against the run's scores (`_check_first_steps`)."""
    from routelens.generation import continue_under_routes

    routes = [token.arms["standard"], *token.candidates]
    experts, weights = _route_tensors(routes)
    _, first_step = continue_under_routes(adapter, trajectory.input_ids[: token.position + 1], token.layer, experts,
                                          weights, None, 0.0, 1, None)
    _check_first_steps(token, routes, first_step, trajectory.input_ids[token.position + 1], deviation)
    p = first_step.double().exp().numpy()
    top = np.argsort(-p[0], kind="stable")[: config.top_tokens]
    score = p[1:, top].mean(axis=1)
    best = max(range(len(token.candidates)), key=lambda i: (score[i], -token.candidates[i][0]))
    return replace(token, arms={**token.arms, "best_alt": token.candidates[best]})


def rollout_token(adapter, tokenizer, trajectory, token: ChosenToken, config: RolloutConfig,
                  deviation: DeviationRecord) -> list[dict]:
    """Every arm's continuations of one chosen token, checked: one row per (arm, sample).

    Checked at run time: each arm's first step (the forced route on the shared-cache path)
    must give the trajectory's next token the log-prob the counterfactual run scored for
    that route, else `RuntimeCheckFailed`: continuations of a route other than the one
    scored are never reported."""
    from routelens.generation import continue_under_routes, row_generator

    if "best_alt" not in token.arms:
        token = pick_best_by_top_tokens(adapter, trajectory, token, config, deviation)
    samples = 1 if config.greedy else config.samples
    jobs = [(arm, s) for arm in ARMS for s in range(samples)]
    experts, weights = _route_tensors([token.arms[arm] for arm, _ in jobs])
    # sample s of every arm draws from one stream: paired arms differ by their route, not their luck
    generators = None if config.greedy else [row_generator(config.seed, _unit_digest(token.key), s) for _, s in jobs]
    prefix = trajectory.input_ids[: token.position + 1]
    continuations, first_step = continue_under_routes(adapter, prefix, token.layer, experts, weights, generators,
                                                      float(config.temperature), config.max_new_tokens,
                                                      tokenizer.eos_token_id)
    following = trajectory.input_ids[token.position + 1]
    _check_first_steps(token, [token.arms[arm] for arm in ARMS], first_step[[jobs.index((arm, 0)) for arm in ARMS]],
                       following, deviation)
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
                     "continuation": tokenizer.decode(generated, skip_special_tokens=True),
                     "problem_id": token.problem_id, "verified": token.verified, "target_id": following,
                     "logprob": token.arms[arm][3], "realized_best_route": token.realized_best,
                     "first_token": generated[0] if generated else None})
    return rows


# ---------------------------------------------------------------------------- summary
TOKEN_KEYS = ["trajectory_id", "position", "layer"]
DEFINITIONS = {
    "units": "tokens: (trajectory, position, layer) rolled out; positions: distinct (trajectory, position), a position "
             "scored at several layers counting once; trajectories; problems: distinct problem ids (None when the "
             "trajectories carry none). Accuracies and differences are means over tokens; by_unit repeats the paired "
             "differences with each position, trajectory or problem weighted equally (its tokens averaged first)",
    "first_token_match_<arm>": "share of the arm's continuations whose first emitted token is the trajectory's own next "
                               "token (the proxy's target), mean over tokens",
    "accuracy_<arm>_given_match / _given_other": "accuracy of the arm's continuations whose first token is / is not the "
                                                 "trajectory's next token, pooled over the group's continuations",
    "<alt>_minus_standard_beyond_first_token": "per token, the sum of correct_alt - correct_standard over the paired "
                                               "samples (sample s of both arms draws from one random stream) whose "
                                               "continuations begin with the same token, divided by the number of pairs; "
                                               "the mean over tokens. With the same first token and the same stream, the "
                                               "two continuations differ only through what the route leaves in the cache "
                                               "at its position: zero when the arms differ only in which first token "
                                               "they emit",
    "<alt>_minus_standard_via_first_token": "the same sum over the pairs whose first tokens differ; via + beyond is the "
                                            "paired difference <alt>_minus_standard",
    "<alt>_same_first_token": "share of the paired samples whose two continuations begin with the same token (the pairs "
                              "the beyond-first-token part rests on)",
    "<alt>_identical_continuations": "share of the paired samples whose two continuations are identical",
    "proxy_gain_<alt>": "mean over tokens of p(alt) - p(standard) of the trajectory's next token as the counterfactual "
                        "run scored it: what the proxy says of the arm's route",
    "best_alt_is_realized_best": "share of tokens whose best_alt is the alternative the proxy itself prefers (the highest "
                                 "log p of the trajectory's next token)",
}


def paired_first_tokens(rollouts: pd.DataFrame, alternative: str) -> pd.DataFrame:
    """Per token, over the paired samples of `alternative` and the standard arm (sample s of
    both draws from one random stream): `same_first` (share of pairs whose continuations
    begin with the same token), `identical` (share of identical continuations), `beyond`
    (the sum of correct_alt - correct_standard over the same-first pairs, divided by the
    number of pairs) and `via` (the same over the pairs whose first tokens differ); `beyond`
    + `via` is the token's paired difference (DEFINITIONS)."""
    rows = rollouts[rollouts["arm"].isin(["standard", alternative])]
    pairs = rows.pivot_table(index=[*TOKEN_KEYS, "sample"], columns="arm",
                             values=["first_token", "correct", "continuation"], aggfunc="first")
    same = pairs[("first_token", alternative)] == pairs[("first_token", "standard")]
    difference = pairs[("correct", alternative)].astype(float) - pairs[("correct", "standard")].astype(float)
    by_token = [pairs.index.get_level_values(k) for k in TOKEN_KEYS]
    return pd.DataFrame({
        "same_first": same.astype(float).groupby(by_token).mean(),
        "identical": (pairs[("continuation", alternative)] == pairs[("continuation", "standard")]).astype(float)
        .groupby(by_token).mean(),
        "beyond": difference.where(same, 0.0).groupby(by_token).mean(),
        "via": difference.where(~same, 0.0).groupby(by_token).mean()})


def has_first_tokens(rollouts: pd.DataFrame) -> bool:
    """Whether the rows keep each continuation's first token (runs before the decomposition do not)."""
    return "first_token" in rollouts.columns and bool(rollouts["first_token"].notna().any())


def per_token(rollouts: pd.DataFrame) -> pd.DataFrame:
    """One row per chosen token: each arm's accuracy over its samples (`accuracy_<arm>`); for
    runs that keep first tokens also `problem_id`, `verified`, each arm's share of first
    tokens that are the trajectory's next token (`first_token_match_<arm>`) and the run's p of
    that token under its route (`p_<arm>`), `best_is_realized_best`, and per alternative arm
    its paired difference's parts via and beyond the first token, its share of pairs with the
    same first token and of identical continuations (`paired_first_tokens`)."""
    keys = ["trajectory_id", "position", "layer", "bin", "gain"]
    table = rollouts.pivot_table(index=keys, columns="arm", values="correct", aggfunc="mean").reset_index()
    table = table.rename(columns={arm: f"accuracy_{arm}" for arm in ARMS})
    table.columns.name = None
    if not has_first_tokens(rollouts):
        return table
    first = rollouts.sort_values("sample", kind="stable").drop_duplicates([*TOKEN_KEYS, "arm"]).set_index([*TOKEN_KEYS, "arm"])
    extra = first.xs("standard", level="arm")[["problem_id", "verified"]].copy()
    match = (rollouts["first_token"] == rollouts["target_id"]).groupby([rollouts[k] for k in TOKEN_KEYS] + [rollouts["arm"]]).mean()
    for arm in ARMS:
        extra[f"first_token_match_{arm}"] = match.xs(arm, level="arm")
        extra[f"p_{arm}"] = np.exp(first["logprob"].xs(arm, level="arm"))
    best = first.xs("best_alt", level="arm")
    extra["best_is_realized_best"] = best["route"] == best["realized_best_route"]
    for alternative in ALTERNATIVE_ARMS:
        paired = paired_first_tokens(rollouts, alternative)
        for column in paired.columns:
            extra[f"{alternative}_{column}"] = paired[column]
    return table.merge(extra.reset_index(), on=TOKEN_KEYS, how="left")


def _clusters(frame: pd.DataFrame) -> pd.Series:
    """The unit an interval resamples, per row: the problem where the trajectory has an id, else the trajectory."""
    if "problem_id" not in frame.columns or frame["problem_id"].isna().all():
        return frame["trajectory_id"]
    return frame["problem_id"].where(frame["problem_id"].notna(), "trajectory " + frame["trajectory_id"])


def resampled_unit(rollouts: pd.DataFrame) -> str:
    """What the intervals resample: problems, trajectories, or problems with a trajectory standing in where it has none."""
    if "problem_id" not in rollouts.columns or rollouts["problem_id"].isna().all():
        return "trajectories"
    return "problems" if rollouts["problem_id"].notna().all() else "problems (a trajectory where it has no problem id)"


def summarise_group(rows: pd.DataFrame, seed: int, resamples: int) -> dict:
    """The rollouts of one group of tokens (`rows`): units, accuracy per arm and the paired
    differences against the standard route, how often the proxy's preferred route also wins
    on outcome, and (for runs that keep first tokens) the first-token decomposition of every
    arm's accuracy and of the paired differences (DEFINITIONS). Intervals resample problems
    (trajectories without problem ids)."""
    frame = per_token(rows)
    clusters = _clusters(frame)

    def mean(values: pd.Series) -> float | None:
        values = values.dropna()
        return None if values.empty else float(values.mean())

    def interval(values: pd.Series, units: pd.Series = clusters) -> list[float | None]:
        return trajectory_interval(pd.DataFrame({"trajectory_id": units}), values.astype(float), seed, resamples)

    has_problems = "problem_id" in frame.columns and frame["problem_id"].notna().all()
    out = {"tokens": int(len(frame)), "positions": int(len(frame[["trajectory_id", "position"]].drop_duplicates())),
           "trajectories": int(frame["trajectory_id"].nunique()),
           "problems": int(frame["problem_id"].nunique()) if has_problems else None,
           "clusters": int(clusters.nunique()), "few_clusters": int(clusters.nunique()) < MIN_CLUSTERS}
    for arm in ARMS:
        out[f"accuracy_{arm}"] = mean(frame[f"accuracy_{arm}"])
        out[f"accuracy_{arm}_ci"] = interval(frame[f"accuracy_{arm}"])
    for arm in ALTERNATIVE_ARMS:
        difference = frame[f"accuracy_{arm}"] - frame["accuracy_standard"]
        out[f"{arm}_minus_standard"] = mean(difference)
        out[f"{arm}_minus_standard_ci"] = interval(difference)
    difference = frame["accuracy_best_alt"] - frame["accuracy_standard"]
    decided = int((difference != 0).sum())
    out["outcome"] = {"best_alt_better": int((difference > 0).sum()), "best_alt_worse": int((difference < 0).sum()),
                      "tied": int((difference == 0).sum()),
                      # the proxy prefers best_alt on every chosen token; where the outcome differs, does it agree?
                      "proxy_agreement": None if not decided else float((difference > 0).sum() / decided)}
    if not has_first_tokens(rows):
        return out
    row_clusters = _clusters(rows)
    for arm in ARMS:
        out[f"first_token_match_{arm}"] = mean(frame[f"first_token_match_{arm}"])
        out[f"first_token_match_{arm}_ci"] = interval(frame[f"first_token_match_{arm}"])
        of_arm = rows["arm"] == arm
        match = rows["first_token"] == rows["target_id"]
        for label, where in (("match", of_arm & match), ("other", of_arm & ~match)):
            correct = rows["correct"].astype(float).where(where)
            out[f"accuracy_{arm}_given_{label}"] = mean(correct)
            out[f"accuracy_{arm}_given_{label}_ci"] = interval(correct, row_clusters)
    for arm in ALTERNATIVE_ARMS:
        for part in ("via", "beyond"):
            out[f"{arm}_minus_standard_{part}_first_token"] = mean(frame[f"{arm}_{part}"])
            out[f"{arm}_minus_standard_{part}_first_token_ci"] = interval(frame[f"{arm}_{part}"])
        out[f"{arm}_same_first_token"] = mean(frame[f"{arm}_same_first"])
        out[f"{arm}_identical_continuations"] = mean(frame[f"{arm}_identical"])
        out[f"proxy_gain_{arm}"] = mean(frame[f"p_{arm}"] - frame["p_standard"])
    out["best_alt_is_realized_best"] = mean(frame["best_is_realized_best"].astype(float))
    units = {"positions": ["trajectory_id", "position"], "trajectories": ["trajectory_id"]}
    if has_problems:
        units["problems"] = ["problem_id"]
    out["by_unit"] = {}
    for unit, keys in units.items():
        by = frame.groupby(keys)
        out["by_unit"][unit] = {}
        for arm in ALTERNATIVE_ARMS:
            difference = frame[f"accuracy_{arm}"] - frame["accuracy_standard"]
            out["by_unit"][unit][f"{arm}_minus_standard"] = float(difference.groupby([frame[k] for k in keys]).mean().mean())
            out["by_unit"][unit][f"{arm}_minus_standard_beyond_first_token"] = float(by[f"{arm}_beyond"].mean().mean())
    return out


def scope(config: RolloutConfig) -> str:
    """What the run's comparison can show, given how its tokens and best alternative were chosen."""
    if not config.selection_uses_gain and config.best_by == "top-tokens":
        return ("Neither the tokens nor the best alternative were chosen with the trajectory's next token, so the "
                "comparison can fail the proxy. The best alternative is the route that sharpens the standard route's "
                f"{config.top_tokens} most probable next tokens: this tests whether such routes end better, not "
                "whether the run's measured gain of a route does")
    reasons = [text for used, text in ((config.selection_uses_gain, "the tokens by their gain"),
                                       (config.best_by == "realized", "the best alternative by that token's log p"))
               if used]
    return (f"Chosen with the trajectory's next token ({' and '.join(reasons)}): a route that the proxy prefers emits "
            "that token more often by construction, so the first-token part of the difference re-measures the proxy; "
            "read the difference beyond the first token")


def summarise(rollouts: pd.DataFrame, config: RolloutConfig, selection: dict) -> dict:
    groups = {name: rollouts[rollouts["bin"] == name] for name in BINS}
    groups[ALL_TOKENS] = rollouts
    unit = resampled_unit(rollouts)
    best = ({"best_alt": "the alternative with the highest next-token log-prob in the counterfactual run (realized: "
                         "chosen with the trajectory's next token)"} if config.best_by == "realized" else
            {"best_alt": f"the alternative whose next-token distribution gives the standard route's {config.top_tokens} "
                         "most probable next tokens the highest mean probability (top-tokens: chosen without the "
                         "trajectory's next token)"})
    summary = {
        "analysis": "rollout",
        "arms": {"standard": "route 0, the router's own route", **best,
                 "random_alt": "an alternative drawn uniformly from the run's sampled alternatives (seeded)"},
        "best_by": config.best_by,
        "samples_per_arm": 1 if config.greedy else config.samples,
        "temperature": config.temperature,
        "checker": config.checker,
        "selection": selection,
        "uses_trajectory_token": {"selection": config.selection_uses_gain, "best_alt": config.best_by == "realized"},
        "scope": scope(config),
        "resampled": unit,
        "interval": f"95% percentile bootstrap over {unit}, {config.bootstrap_resamples} resamples, paired "
                    f"differences per token; few_clusters marks fewer than {MIN_CLUSTERS} of them",
        "definitions": DEFINITIONS,
        "bins": {name: summarise_group(frame, config.seed, config.bootstrap_resamples)
                 for name, frame in groups.items() if name == ALL_TOKENS or not frame.empty},
    }
    if "verified" in rollouts.columns and rollouts["verified"].eq(False).any():
        verdicts = {"right": rollouts["verified"].eq(True), "wrong": rollouts["verified"].eq(False),
                    "unknown": rollouts["verified"].isna()}
        summary["by_verdict"] = {name: summarise_group(rollouts[where], config.seed, config.bootstrap_resamples)
                                 for name, where in verdicts.items() if where.any()}
    return summary


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


def check_inputs(counterfactual_dir: str, config: RolloutConfig) -> None:
    """What a rollout reads, checked before the model loads (the command line calls this
    first): a complete, readable counterfactual run, and a `tokens` file of tokens it scored."""
    counterfactual_run(counterfactual_dir, NEEDED_BY)
    if config.tokens not in TOKEN_CHOICES:
        tokens = read_table_file(os.path.join(counterfactual_dir, "tokens.parquet"), columns=["trajectory_id", "position",
                                                                                              "layer"])
        _requested(tokens, config.tokens, 0.0)


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
    tokens = read_table_file(os.path.join(counterfactual_dir, "tokens.parquet"))
    routes = sampled_routes(read_table_file(os.path.join(counterfactual_dir, "routes.parquet")), run)
    tolerance = float(run["config"].get("win_tolerance", 0.0))
    trajectories = run_trajectories(run, counterfactual_dir, loaded, NEEDED_BY)
    verdicts = trajectory_verdicts(trajectories, loaded.tokenizer, config.checker)
    chosen, left_out = choose_tokens(tokens, routes, config, tolerance, verdicts,
                                     {tid: t.problem_id for tid, t in trajectories.items()})
    if not chosen:
        raise NothingToRollOut(f"no token of {counterfactual_dir} matches --tokens {config.tokens}"
                               + (" (Fragile tokens whose best alternative beats the standard route by more than "
                                  f"{tolerance})" if config.tokens == "fragile" else "")
                               + (f" ({left_out['wrong_trajectory_tokens_left_out']} tokens of wrong trajectories left "
                                  "out: --include-wrong)" if left_out["wrong_trajectory_tokens_left_out"] else "")
                               + "; try --tokens all or score more trajectories")
    unanswered = next((t.trajectory_id for t in chosen if trajectories[t.trajectory_id].answer is None), None)
    if unanswered is not None:
        raise RouteLensError(f"trajectory {unanswered!r} has no reference 'answer'; rollouts check final answers, "
                             "so give the trajectory records an \"answer\" field")
    of_chosen = [verdicts[t] for t in {token.trajectory_id for token in chosen}]
    selection = {"tokens": config.tokens, "chosen": len(chosen), **left_out, "limit": config.limit,
                 "limit_keeps": None if config.limit is None else
                 "a seeded sample" if config.tokens in SAMPLED_SELECTIONS else "the largest gains",
                 "win_tolerance": tolerance, "best_by": config.best_by, "include_wrong": config.include_wrong,
                 "trajectories": {"right": of_chosen.count(True), "wrong": of_chosen.count(False),
                                  "unknown": of_chosen.count(None)}}
    run_config = {**loaded.identity(), "dtype": loaded.dtype, "counterfactual": os.path.abspath(counterfactual_dir),
                  "counterfactual_tokens_sha256": file_sha256(os.path.join(counterfactual_dir, "tokens.parquet")),
                  **config.identity(),
                  **({"tokens_file_sha256": file_sha256(config.tokens)} if config.tokens not in TOKEN_CHOICES else {})}
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
