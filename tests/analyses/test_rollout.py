"""Rollouts: continuations under the standard, best and random routes of a scored token.
The shared-cache decoding against plain full forwards with the same override; the arms'
routes against the counterfactual run; the summary against a recomputation; resume after
SIGKILL; bad input."""

import json
import os
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PYTHON, kill_when_parts_land, scaled, write_jsonl

import routelens as rl
from routelens.analyses.rollout.analysis import ARMS, per_token
from routelens.errors import RouteLensError
from routelens.generation import continue_under_routes, row_generator
from routelens.models.routing import RouteOverride, capture_routes, override_routes

PROBLEMS = [("Q:12+7=A:", "12+7=19#19", "19"), ("Q:3*4+5=A:", "3*4=12;12+5=17#17", "17"),
            ("Q:50-17=A:", "50-17=33#33", "33"), ("Q:8*9=A:", "8*9=72#72", "72")]


def _plain_greedy(adapter, prefix, layer, experts, weights, steps):
    """Greedy continuation by full forwards without a cache: the last prefix position carries
    the forced route in every forward (it is the same token), every other position routes
    naturally."""
    sequence, position, out = list(prefix), len(prefix) - 1, []
    for _ in range(steps):
        override = RouteOverride(torch.tensor([position]), experts[None], weights[None])
        with torch.no_grad(), override_routes(adapter, {layer: override}):
            logits = adapter.model(torch.tensor([sequence]), use_cache=False).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        sequence.append(token)
    return out


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "jamba", "qwen3_next"])
def test_shared_cache_continuations_equal_plain_forwards_with_the_override(tiny_adapters, family):
    adapter = tiny_adapters[family]
    layer = adapter.moe_layers[len(adapter.moe_layers) // 2]
    prefix = torch.randint(3, 60, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad(), capture_routes(adapter, [layer]) as captured:
        adapter.model(torch.tensor([prefix]), use_cache=False)
    logits = captured[layer].logits[-1].float()
    standard = captured[layer].experts[-1]
    other = torch.tensor([e for e in range(adapter.num_experts) if e not in standard.tolist()][: adapter.top_k])
    experts = torch.stack([standard, other])
    weights = torch.stack([captured[layer].weights[-1], adapter.weights_for(logits[None], other[None])[0]]).float()
    steps = 5
    shared, _ = continue_under_routes(adapter, prefix, layer, experts, weights, None, 0.0, steps, eos_token_id=None)
    for row in range(2):
        assert shared[row] == _plain_greedy(adapter, prefix, layer, experts[row], weights[row], steps)
    # the standard route's continuation is the model's own greedy one
    natural = adapter.model.generate(torch.tensor([prefix]), max_new_tokens=steps, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(prefix):].tolist()
    assert shared[0] == natural


def test_rows_with_the_same_route_and_stream_sample_the_same_continuation(tiny_adapters):
    adapter = tiny_adapters["olmoe"]
    layer = adapter.moe_layers[0]
    prefix = [5, 9, 11, 3, 7]
    with torch.no_grad(), capture_routes(adapter, [layer]) as captured:
        adapter.model(torch.tensor([prefix]), use_cache=False)
    route, weight = captured[layer].experts[-1], captured[layer].weights[-1].float()
    experts, weights = route.repeat(3, 1), weight.repeat(3, 1)
    generators = [row_generator(0, 42, 0), row_generator(0, 42, 1), row_generator(0, 42, 0)]
    rows, _ = continue_under_routes(adapter, prefix, layer, experts, weights, generators, 1.5, 12, eos_token_id=None)
    assert rows[0] == rows[2] and rows[0] != rows[1]


@pytest.fixture(scope="module")
def demo_cf(tmp_path_factory):
    lens = rl.load("demo")
    trajs = rl.trajectories_from_text(lens.tokenizer, [(p, c) for p, c, _ in PROBLEMS], answers=[a for *_, a in PROBLEMS])
    path = str(tmp_path_factory.mktemp("rollout") / "cf")
    rl.counterfactual(lens, trajs, path, layers=[0, -1], routes=6, seed=3, show_progress=False)
    return lens, path, trajs


def test_arms_are_the_runs_routes_and_greedy_first_tokens_equal_plain_forwards(demo_cf):
    lens, path, trajs = demo_cf
    res = rl.rollout(lens, path, tokens="all", limit=5, temperature=0, max_new_tokens=1)
    cf = rl.read_run(path)
    routes = cf.routes.set_index(["trajectory_id", "position", "layer", "route"])
    chosen = cf.tokens.sort_values("gain", ascending=False, kind="stable").head(5)
    assert sorted(zip(res.rollouts["trajectory_id"], res.rollouts["position"], res.rollouts["layer"])) == sorted(
        [key for key in zip(chosen["trajectory_id"], chosen["position"], chosen["layer"]) for _ in ARMS])
    by_id = {t.id: t for t in trajs}
    for (tid, position, layer), rows in res.rollouts.groupby(["trajectory_id", "position", "layer"]):
        rows = rows.set_index("arm")
        at = cf.routes[(cf.routes["trajectory_id"] == tid) & (cf.routes["position"] == position)
                       & (cf.routes["layer"] == layer)].set_index("route")
        others = [r for r in at.index if r > 0 and list(at.loc[r, "experts"]) != list(at.loc[0, "experts"])]
        assert rows.loc["standard", "route"] == 0
        assert rows.loc["best_alt", "route"] == max(others, key=lambda r: (at.loc[r, "logprob"], -r))
        assert rows.loc["random_alt", "route"] in others
        prefix = by_id[tid].input_ids[: position + 1]
        for _, row in rows.iterrows():
            stored = routes.loc[(tid, position, layer, row["route"])]
            override = RouteOverride(torch.tensor([position]), torch.tensor([list(stored["experts"])]),
                                     torch.tensor([list(stored["weights"])]))
            with torch.no_grad(), override_routes(lens.adapter, {layer: override}):
                logits = lens.model(torch.tensor([prefix]), use_cache=False).logits[0, -1]
            assert row["tokens_generated"] == 1
            assert lens.tokenizer.decode([int(logits.argmax())]) == row["continuation"]


def test_summary_equals_a_recomputation_from_the_rows(demo_cf):
    lens, path, _ = demo_cf
    res = rl.rollout(lens, path, tokens="all", limit=6, samples=3, temperature=1.0, max_new_tokens=12, seed=5,
                     bootstrap_resamples=200)
    rows = res.rollouts
    assert len(rows) == 6 * 3 * 3 and set(rows["arm"]) == set(ARMS)
    accuracy = rows.groupby(["trajectory_id", "position", "layer", "arm"])["correct"].mean().unstack("arm")
    summary = res.summary_dict["bins"]["All"]
    for arm in ARMS:
        assert summary[f"accuracy_{arm}"] == pytest.approx(accuracy[arm].mean())
    difference = accuracy["best_alt"] - accuracy["standard"]
    assert summary["best_alt_minus_standard"] == pytest.approx(difference.mean())
    assert summary["outcome"]["best_alt_better"] == int((difference > 0).sum())
    assert summary["outcome"]["tied"] == int((difference == 0).sum())
    assert len(per_token(rows)) == 6 and res.summary_dict["samples_per_arm"] == 3
    # the checker's verdict on every row, recomputed from the trajectory's written part and the continuation
    from routelens.data.arithmetic import verify

    trajectories = {t.id: t for t in demo_cf[2]}
    answers = {t.id: int(a) for t, (*_, a) in zip(demo_cf[2], PROBLEMS)}
    for row in rows.itertuples():
        t = trajectories[row.trajectory_id]
        written = lens.tokenizer.decode(t.input_ids[t.completion_start: row.position + 1], skip_special_tokens=True)
        verdict = verify(written + row.continuation, answers[row.trajectory_id])
        assert row.correct == verdict.correct
        assert row.answer == (None if verdict.predicted is None else str(verdict.predicted))
    assert rows["tokens_generated"].between(1, 12).all()


def test_no_answer_and_no_match_are_one_line_errors(demo_cf, tmp_path):
    lens, _, _ = demo_cf
    trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:2+2=A:", "2+2=4#4")])
    cf = rl.counterfactual(lens, trajs, layers=[0], routes=4).save(str(tmp_path / "cf-no-answer"))
    with pytest.raises(RouteLensError, match="has no reference 'answer'"):
        rl.rollout(lens, cf, tokens="all")
    chosen = write_jsonl(tmp_path / "chosen.jsonl", [{"trajectory_id": "0", "position": 99, "layer": 0}])
    with pytest.raises(RouteLensError, match=r"token \('0', 99, 0\) .* was not scored"):
        rl.rollout(lens, cf, tokens=chosen)
    with pytest.raises(RouteLensError, match="`temperature` must be 0"):
        rl.RolloutConfig(temperature=-1)


def test_sigkill_then_resume_equals_uninterrupted_run(demo_cf, tmp_path, cli_env):
    _, path, _ = demo_cf
    command = [PYTHON, "-m", "routelens", "rollout", "--model", "demo", "--counterfactual", path, "--tokens", "all",
               "--limit", "8", "--samples", "4", "--max-new-tokens", "24", "--seed", "1", "--out", "OUT", "--no-progress"]

    def run(out):
        return subprocess.Popen([out if part == "OUT" else part for part in command], env=cli_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    killed = str(tmp_path / "killed")
    kill_when_parts_land(run(killed), killed, 2)
    assert json.load(open(os.path.join(killed, "run.json")))["status"] == "running"
    resumed = run(killed)
    assert resumed.wait(timeout=scaled(300)) == 0, resumed.stderr.read()
    whole = str(tmp_path / "whole")
    assert run(whole).wait(timeout=scaled(300)) == 0
    a = pd.read_parquet(os.path.join(killed, "rollouts.parquet"))
    b = pd.read_parquet(os.path.join(whole, "rollouts.parquet"))
    assert len(a) == len(b) == 8 * 3 * 4
    pd.testing.assert_frame_equal(a, b)
    state = json.load(open(os.path.join(killed, "run.json")))
    assert len(state["sessions"]) == 2 and state["status"] == "complete"
    assert 0 < state["sessions"][1]["units_done"] < 8     # the resumed session scored only what was left
    assert np.isfinite(state["timings"]["generated_tokens_per_second"])


def test_first_steps_are_checked_against_the_runs_scores(demo_cf, tmp_path):
    """The run-time guard: each arm's first step must reproduce the counterfactual run's log-prob
    of that route; a run whose scores do not match the model is refused, not rolled out."""
    import shutil

    from routelens.engine.checks import RuntimeCheckFailed

    lens, path, _ = demo_cf
    res = rl.rollout(lens, path, str(tmp_path / "ok"), tokens="all", limit=3, temperature=0, max_new_tokens=2,
                         show_progress=False)
    assert res.info["checks"]["first_step_max_abs_logprob_diff"] < 1e-4
    tampered = str(tmp_path / "tampered")
    shutil.copytree(path, tampered)
    routes = pd.read_parquet(os.path.join(tampered, "routes.parquet"))
    routes["logprob"] = routes["logprob"] - 0.5          # scores of some other model
    routes.to_parquet(os.path.join(tampered, "routes.parquet"), index=False)
    with pytest.raises(RuntimeCheckFailed, match="rollout check failed at .* first steps do not give"):
        rl.rollout(lens, tampered, tokens="all", limit=3, temperature=0, max_new_tokens=2)


def test_null_routes_after_the_sampled_ones_are_never_an_arm(demo_cf, tmp_path):
    """A counterfactual run may hold, after route 0 and its S Gumbel alternatives, uniformly
    drawn null routes (routes S+1.., `sampler` "uniform"): they are no candidates of the
    router, so no arm takes one, even a null route that would win on every score."""
    import shutil

    lens, path, _ = demo_cf
    with_nulls = str(tmp_path / "with-nulls")
    shutil.copytree(path, with_nulls)
    routes = pd.read_parquet(os.path.join(with_nulls, "routes.parquet"))
    sampled = int(json.load(open(os.path.join(with_nulls, "run.json")))["config"]["routes"])
    routes["sampler"] = np.where(routes["route"] == 0, "standard", "gumbel")
    nulls = routes[routes["route"] == 1].copy()
    for extra in (1, 2):   # a route of other experts than the standard one that scores p = 1
        null = nulls.copy()
        null["route"], null["sampler"], null["logprob"] = sampled + extra, "uniform", 0.0
        null["experts"] = [[e for e in range(16) if e not in standard][:len(standard)]
                           for standard in routes[routes["route"] == 0]["experts"].map(list)]
        routes = pd.concat([routes, null])
    routes.sort_values(["trajectory_id", "position", "layer", "route"]).to_parquet(
        os.path.join(with_nulls, "routes.parquet"), index=False)
    res = rl.rollout(lens, with_nulls, tokens="all", limit=8, samples=2, max_new_tokens=2,
                     show_progress=False)
    assert res.rollouts["route"].between(0, sampled).all()
