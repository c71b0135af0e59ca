"""Result objects: what the Python API returns, in memory or read back from a run folder.

A result wraps one completed run (in memory, a run folder it wrote, or a folder read with
`read_run`) and exposes its tables as pandas DataFrames (the Parquet schemas), the summary
as a DataFrame (`summary`) and as summary.json's dict (`summary_dict`), and run.json's
record (`info`). `save(path)` writes the run folder that `routelens report`, `export` and
`read_run` read.
"""

from __future__ import annotations

import os
import shutil

import pandas as pd

from routelens.errors import RouteLensError, SettingError
from routelens.results.run_folder import RUN_JSON, prepare_out, read_json, read_run_json
from routelens.results.summary_frames import summary_frame


class StoredRun:
    """A complete run folder on disk, read-only: the `RunFolder` interface for reading."""

    def __init__(self, path: str):
        if not os.path.isfile(os.path.join(path, RUN_JSON)):
            raise SettingError(f"{path} is not a run folder (no run.json); give the `out` folder of a routelens run", "out")
        self.path = path
        self.state = read_run_json(path)
        self.kind, self.config = self.state["kind"], self.state["config"]
        if self.state.get("status") != "complete":
            raise RouteLensError(f"{path} holds a {self.state.get('status')} {self.kind} run (units done: "
                                 f"{self.state.get('units_done')}); re-run the same command to finish it first")
        self.summary = read_json(os.path.join(path, "summary.json"))

    def read(self, table: str) -> pd.DataFrame:
        file = os.path.join(self.path, f"{table}.parquet")
        if not os.path.isfile(file):
            raise RouteLensError(f"{self.path} has no {table}.parquet; this {self.kind} run does not make that table")
        return pd.read_parquet(file)


class Result:
    """A completed run of one analysis (base class of the analysis' result types)."""

    kind = ""
    tables: tuple[str, ...] = ()

    def __init__(self, run):
        self._run = run
        self._cache: dict[str, pd.DataFrame] = {}

    def __repr__(self) -> str:
        where = f"saved in {self.path}" if self.path else "in memory"
        return f"<{type(self).__name__} ({where}); tables: {', '.join(self.tables)}; .summary for the summary table>"

    @property
    def path(self) -> str | None:
        """The run folder, or None while the result lives in memory only."""
        return self._run.path

    @property
    def summary_dict(self) -> dict:
        """summary.json's content."""
        return self._run.summary

    @property
    def summary(self) -> pd.DataFrame:
        """The summary table (see `routelens.results.summary_frames`)."""
        return summary_frame(self.kind, self._run.summary)

    @property
    def config(self) -> dict:
        """The settings that identify the run (run.json's `config`)."""
        return self._run.state["config"]

    @property
    def info(self) -> dict:
        """run.json's record: config, model, device, checks, timings, provenance."""
        return self._run.state

    def table(self, name: str) -> pd.DataFrame:
        """One of the run's tables as a DataFrame."""
        if name not in self._cache:
            self._cache[name] = self._run.read(name)
        return self._cache[name]

    def save(self, path: str, overwrite: bool = False):
        """Write the run folder at `path` and return the result read back from it.
        A result already in a folder is copied (its folder stays)."""
        if self.path is not None:
            if os.path.realpath(self.path) == os.path.realpath(path):
                return self
            if prepare_out(path, self.kind, self.config, overwrite) is not None:
                raise RouteLensError(f"{path} already holds this run; nothing to save")
            shutil.copytree(self.path, path, dirs_exist_ok=True)
        else:
            self._run.save(path, overwrite=overwrite)
        return read_run(path)

    def report(self, out: str | None = None) -> str:
        """Build the HTML report of this (saved) run; returns its path."""
        from routelens.report.build import build_report

        if self.path is None:
            raise RouteLensError("the report reads a run folder: save the result first, e.g. result.save('runs/x')")
        return build_report([self.path], out)


class CounterfactualResult(Result):
    """A counterfactual run: `tokens` (one row per scored token and layer), `routes` (one
    row per token, layer and route; route 0 is the standard route), `summary` (layer x bin).

    Examples:
        >>> import routelens as rl
        >>> res = rl.read_run(demo_run)
        >>> standard = res.routes[res.routes["route"] == 0]
        >>> len(standard) == len(res.tokens)
        True
        >>> int(res.summary.set_index(["layer", "bin"]).loc[(3, "All"), "tokens"]) == len(res.tokens)
        True
    """

    kind = "counterfactual"
    tables = ("tokens", "routes")

    @property
    def tokens(self) -> pd.DataFrame:
        return self.table("tokens")

    @property
    def routes(self) -> pd.DataFrame:
        return self.table("routes")

    @property
    def joint_summary(self) -> pd.DataFrame | None:
        """A `joint_layers` run's comparison of joint and single-layer gains per bin (None otherwise)."""
        from routelens.results.summary_frames import joint_frame

        return joint_frame(self._run.summary)

    @property
    def joint_tokens(self) -> pd.DataFrame | None:
        """A `joint_layers` run's joint routes per token (None otherwise): the token metrics of
        routes forced at all listed layers at once, with the single-layer gains beside them."""
        return self.table("joint_tokens") if self._run.summary.get("joint") else None

    @property
    def joint_routes(self) -> pd.DataFrame | None:
        """A `joint_layers` run's joint routes (None otherwise): `layers`, `experts` and
        `weights` one list per layer, `logprob`."""
        return self.table("joint_routes") if self._run.summary.get("joint") else None


class IsolationResult(Result):
    """An isolation run: `isolation` (one row per item, layer and condition), `routing`
    (natural routing counts), `cells` (per domain, layer and expert, with tests),
    `calibration`, and `summary` (the best expert per domain and layer).

    Examples:
        >>> import routelens as rl
        >>> res = rl.isolate(rl.load("demo"), "arithmetic", per_domain=3, layers=[0], floor_seeds=1)
        >>> len(res.cells) == 4 * 16          # domains x experts at one layer
        True
        >>> res.summary["layer"].unique().tolist()
        [0]
    """

    kind = "isolation"
    tables = ("isolation", "routing", "cells", "calibration")

    @property
    def isolation(self) -> pd.DataFrame:
        return self.table("isolation")

    @property
    def routing(self) -> pd.DataFrame:
        return self.table("routing")

    @property
    def cells(self) -> pd.DataFrame:
        return self.table("cells")

    @property
    def calibration(self) -> pd.DataFrame:
        return self.table("calibration")


class PassKResult(Result):
    """A pass@k run: `samples` (one row per sample), `problems` (pass@k per problem and
    arm), `summary` (per arm and k with intervals; the paired difference with two arms).

    Examples:
        >>> import routelens as rl
        >>> res = rl.passk(rl.load("demo"), "arithmetic", n=3, samples=2, k=[1, 2])
        >>> len(res.samples), len(res.problems)
        (6, 3)
    """

    kind = "passk"
    tables = ("samples", "problems")

    @property
    def samples(self) -> pd.DataFrame:
        return self.table("samples")

    @property
    def problems(self) -> pd.DataFrame:
        return self.table("problems")


class RouterUpdateResult(Result):
    """A router update: `pairs` (the preference pairs), `training_log` (one row per step),
    `delta_path` (apply it with `routelens.load(..., router_delta=...)`), `summary`.

    Examples:
        >>> import routelens as rl
        >>> upd = rl.router_update(rl.load("demo"), demo_run, out=str(tmp / "upd"), steps=2, margin=0.0)
        >>> len(upd.training_log), upd.delta_path.endswith("router_delta.safetensors")
        (2, True)
        >>> rl.load("demo", router_delta=upd.delta_path).family
        'olmoe'
    """

    kind = "router-update"
    tables = ("pairs", "training_log")

    @property
    def pairs(self) -> pd.DataFrame:
        return self.table("pairs")

    @property
    def training_log(self) -> pd.DataFrame:
        return pd.read_json(os.path.join(self.path, "training_log.jsonl"), lines=True)

    @property
    def delta_path(self) -> str:
        return self.summary_dict["router_delta"]


class RolloutResult(Result):
    """Rollouts of chosen tokens: `rollouts` (one row per token, arm and sample: `correct`,
    `answer`, `tokens_generated`, `continuation`), `per_token` (each arm's accuracy per
    token) and `summary` (per bin: accuracy per arm, paired differences, proxy agreement).

    Examples:
        >>> import routelens as rl
        >>> lens = rl.load("demo")
        >>> trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:5*3=A:", "5*3=15#15")], answers=["15"])
        >>> cf = rl.counterfactual(lens, trajs, layers=[-1], routes=4).save(str(tmp / "cf-rollout-result"))
        >>> res = rl.rollout(lens, cf, tokens="all", limit=2, temperature=0, max_new_tokens=8)
        >>> res.per_token.columns.tolist()[-3:]
        ['accuracy_best_alt', 'accuracy_random_alt', 'accuracy_standard']
    """

    kind = "rollout"
    tables = ("rollouts",)

    @property
    def rollouts(self) -> pd.DataFrame:
        return self.table("rollouts")

    @property
    def per_token(self) -> pd.DataFrame:
        from routelens.analyses.rollout import per_token

        return per_token(self.rollouts)


class GraftEvaluationResult(Result):
    """What a graft changed on the task's items: `items` (one row per item and grafted
    slot: natural score recipient and grafted, the slot's selection share, the original and
    the grafted expert forced alone), `summary` (per domain: paired differences with
    intervals, p and q).

    Examples:
        >>> import routelens as rl
        >>> res = rl.graft("demo", "demo", "3:5=3:9", str(tmp / "grafted-eval"), evaluate=True, per_domain=3)
        >>> sorted(res.evaluation.items["domain"].unique())
        ['addsub', 'long', 'mixed', 'mul']
    """

    kind = "graft-evaluation"
    tables = ("items",)

    @property
    def items(self) -> pd.DataFrame:
        return self.table("items")


class SemanticRouteResult(Result):
    """Semantic routing: `scores` (one row per evaluation item, layer set and arm: mean and
    first target log-prob), `classification` (per item and layer: the domain its prompt
    fingerprint is nearest to, and the share of its tokens classified right), `accuracy`
    (with `accuracy=True`: one greedy answer per item, layer set and arm, checked) and
    `summary` (per layer set, domain and arm: the paired difference against natural routing).

    Examples:
        >>> import routelens as rl
        >>> res = rl.semantic_route(rl.load("demo"), "arithmetic", per_domain=2, layer_sets=[[3]], floor_seeds=1,
        ...                         accuracy=False)
        >>> list(res.summary.columns[:4])
        ['layer_set', 'domain', 'arm', 'score']
    """

    kind = "semantic-routing"
    tables = ("scores", "classification")

    @property
    def scores(self) -> pd.DataFrame:
        return self.table("scores")

    @property
    def classification(self) -> pd.DataFrame:
        return self.table("classification")

    @property
    def accuracy(self) -> pd.DataFrame | None:
        return self.table("accuracy") if self._run.summary.get("accuracy") else None


class GraftResult:
    """A grafted model: `path` (a Hugging Face folder: load it with `routelens.load(path)` or
    `AutoModelForCausalLM`), `record` (graft.json) and `evaluation` (a
    `GraftEvaluationResult`, or None without `evaluate`).

    Examples:
        >>> import routelens as rl
        >>> res = rl.graft("demo", "demo", [(0, 1, 0, 2)], str(tmp / "grafted-result"))
        >>> res.evaluation is None, sorted(res.record)[:3]
        (True, ['donor', 'dtype', 'family'])
    """

    def __init__(self, path: str, record: dict, evaluation: GraftEvaluationResult | None):
        self.path, self.record, self.evaluation = path, record, evaluation

    def __repr__(self) -> str:
        pairs = ", ".join(pair["pair"] for pair in self.record["pairs"])
        return f"<GraftResult {self.path}: {pairs}{'; evaluated' if self.evaluation else ''}>"


RESULTS = {cls.kind: cls for cls in (CounterfactualResult, IsolationResult, PassKResult, RouterUpdateResult,
                                     RolloutResult, GraftEvaluationResult, SemanticRouteResult)}


def read_run(path: str) -> Result:
    """The result of a complete run folder (any analysis), tables read lazily.

    Examples:
        >>> import routelens as rl
        >>> result = rl.read_run(demo_run)          # a folder written by `routelens demo`
        >>> result.kind, list(result.summary.columns[:3])
        ('counterfactual', ['layer', 'bin', 'tokens'])
    """
    run = StoredRun(path)
    if run.kind not in RESULTS:
        raise RouteLensError(f"{path} holds a {run.kind!r} run, which has no result type")
    return RESULTS[run.kind](run)
