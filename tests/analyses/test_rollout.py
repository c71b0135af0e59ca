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


def _plain_next_token_probabilities(lens, prefix, position, layer, stored):
    """p(next token) [V] after `prefix` with the stored route forced at `position`, by one plain full forward."""
    override = RouteOverride(torch.tensor([position]), torch.tensor([list(stored["experts"])]),
                             torch.tensor([list(stored["weights"])]))
    with torch.no_grad(), override_routes(lens.adapter, {layer: override}):
        logits = lens.model(torch.tensor([prefix]), use_cache=False).logits[0, -1]
    return torch.softmax(logits.double(), -1).numpy()


@pytest.mark.parametrize("best_by", ["realized", "top-tokens"])
def test_arms_are_the_runs_routes_and_greedy_first_tokens_equal_plain_forwards(demo_cf, best_by):
    """The standard arm is route 0; best_alt is the run's alternative that the definition picks,
    recomputed here from plain forwards (top-tokens: the highest mean p over the standard
    route's 3 most probable next tokens; realized: the highest logged log p of the trajectory's
    next token); random_alt is an alternative; each arm's greedy first token is the plain forward's."""
    lens, path, trajs = demo_cf
    res = rl.rollout(lens, path, tokens="all", limit=5, temperature=0, max_new_tokens=1, best_by=best_by, top_tokens=3)
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
        prefix = by_id[tid].input_ids[: position + 1]
        realized = max(others, key=lambda r: (at.loc[r, "logprob"], -r))
        assert (rows["realized_best_route"] == realized).all()
        assert rows.loc["standard", "route"] == 0
        if best_by == "realized":
            assert rows.loc["best_alt", "route"] == realized
        else:
            p = {r: _plain_next_token_probabilities(lens, prefix, position, layer, at.loc[r]) for r in [0, *others]}
            top = sorted(range(len(p[0])), key=lambda v: (-p[0][v], v))[:3]
            score = {r: sum(p[r][v] for v in top) / 3 for r in others}
            assert score[rows.loc["best_alt", "route"]] == pytest.approx(max(score.values()), abs=1e-6)
        assert rows.loc["random_alt", "route"] in others
        for _, row in rows.iterrows():
            stored = routes.loc[(tid, position, layer, row["route"])]
            probabilities = _plain_next_token_probabilities(lens, prefix, position, layer, stored)
            assert row["tokens_generated"] == 1
            assert lens.tokenizer.decode([int(probabilities.argmax())]) == row["continuation"]
            assert row["first_token"] == int(probabilities.argmax())
            assert row["target_id"] == by_id[tid].input_ids[position + 1]
            assert row["logprob"] == stored["logprob"]


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
    for best_by in ("realized", "top-tokens"):
        res = rl.rollout(lens, with_nulls, tokens="all", limit=8, samples=2, max_new_tokens=2, best_by=best_by,
                         show_progress=False)
        assert res.rollouts["route"].between(0, sampled).all()


# ---------------------------------------------------------------------------- rollouts that can fail the proxy
# two trajectories per problem; a wrong one by its record (p3-b) and one wrong by the checker (p1-b, no verdict)
PROBLEM_RECORDS = [
    {"id": "p1-a", "problem_id": "p1", "prompt": "Q:12+7=A:", "completion": "12+7=19#19", "answer": "19"},
    {"id": "p1-b", "problem_id": "p1", "prompt": "Q:12+7=A:", "completion": "12+7=18#18", "answer": "19"},
    {"id": "p2-a", "problem_id": "p2", "prompt": "Q:3*4+5=A:", "completion": "3*4=12;12+5=17#17", "answer": "17",
     "verified": True},
    {"id": "p2-b", "problem_id": "p2", "prompt": "Q:3*4+5=A:", "completion": "3*4=12;12+5=17#17", "answer": "17"},
    {"id": "p3-a", "problem_id": "p3", "prompt": "Q:50-17=A:", "completion": "50-17=33#33", "answer": "33"},
    {"id": "p3-b", "problem_id": "p3", "prompt": "Q:50-17=A:", "completion": "50-17=23#23", "answer": "33",
     "verified": False},
    {"id": "p4-a", "problem_id": "p4", "prompt": "Q:8*9=A:", "completion": "8*9=72#72", "answer": "72"},
]
WRONG = {"p1-b", "p3-b"}


@pytest.fixture(scope="module")
def problem_cf(tmp_path_factory):
    lens = rl.load("demo")
    folder = tmp_path_factory.mktemp("rollout-problems")
    path = str(folder / "cf")
    rl.counterfactual(lens, write_jsonl(folder / "trajectories.jsonl", PROBLEM_RECORDS), path, layers=[0, -1],
                      routes=6, seed=3, show_progress=False)
    return lens, path


def _chosen(table, routes, tolerance=1e-3, **settings):
    from routelens.analyses.rollout.analysis import choose_tokens

    verdicts = {r["id"]: r["id"] not in WRONG for r in PROBLEM_RECORDS}
    chosen, counts = choose_tokens(table, routes, rl.RolloutConfig(**settings), tolerance, verdicts,
                                   {r["id"]: r["problem_id"] for r in PROBLEM_RECORDS})
    return [(t.trajectory_id, t.position, t.layer) for t in chosen], counts, chosen


def test_selections_that_do_not_use_the_gain_and_wrong_trajectories(problem_cf, tmp_path):
    """fragile-all takes every Fragile token, random a seeded sample, and neither (nor their
    `limit`) moves when the gains are shuffled; fragile takes the winners; tokens of wrong
    trajectories (by record or by the checker) only with include_wrong; realized fixes
    best_alt up front, top-tokens leaves it to the model."""
    from routelens.analyses.rollout.analysis import trajectory_verdicts
    from routelens.errors import SettingError

    lens, path = problem_cf
    cf = rl.read_run(path)
    tokens, routes = cf.tokens.copy(), cf.routes
    tokens["bin"] = np.where(np.arange(len(tokens)) % 3 == 0, "Fragile", tokens["bin"])   # enough Fragile tokens
    trajectories = {t.id: t for t in rl.read_trajectories(os.path.join(os.path.dirname(path), "trajectories.jsonl"),
                                                           lens)}
    assert trajectory_verdicts(trajectories, lens.tokenizer, "arithmetic") == {
        r["id"]: r["id"] not in WRONG for r in PROBLEM_RECORDS}
    has_alternative = {key for key, at in routes.groupby(["trajectory_id", "position", "layer"])
                       if any(list(e) != list(at.sort_values("route")["experts"].iloc[0]) for e in at["experts"])}
    keys = list(zip(tokens["trajectory_id"], tokens["position"], tokens["layer"]))
    fragile = [k for k, b in zip(keys, tokens["bin"]) if b == "Fragile" and k in has_alternative]
    chosen, counts, _ = _chosen(tokens, routes, tokens="fragile-all")
    assert chosen == [k for k in fragile if k[0] not in WRONG]
    assert counts["wrong_trajectory_tokens_left_out"] == sum(k[0] in WRONG for k, b in zip(keys, tokens["bin"])
                                                             if b == "Fragile")
    assert _chosen(tokens, routes, tokens="fragile-all", include_wrong=True)[0] == fragile
    winners = [k for k, b, g in zip(keys, tokens["bin"], tokens["gain"]) if b == "Fragile" and g > 1e-3
               and k[0] not in WRONG]
    assert _chosen(tokens, routes, tokens="fragile")[0] == winners
    shuffled = tokens.assign(gain=np.random.default_rng(0).permutation(tokens["gain"].to_numpy()))
    for settings in ({"tokens": "random", "limit": 6}, {"tokens": "fragile-all", "limit": 3}):
        sample = _chosen(tokens, routes, **settings)[0]
        assert len(sample) == settings["limit"] and sample == sorted(sample, key=keys.index)
        assert set(sample) <= {k for k in (fragile if settings["tokens"] == "fragile-all" else keys)
                               if k[0] not in WRONG}
        assert _chosen(shuffled, routes, **settings)[0] == sample                 # the gain plays no part
        assert _chosen(tokens, routes, **settings, seed=0)[0] == sample           # seeded
    assert _chosen(tokens, routes, tokens="random", limit=6, seed=1)[0] != _chosen(tokens, routes, tokens="random",
                                                                                   limit=6)[0]
    _, _, realized = _chosen(tokens, routes, tokens="all", best_by="realized")
    assert all(t.arms["best_alt"][0] == t.realized_best for t in realized)
    _, _, top = _chosen(tokens, routes, tokens="all")
    assert all("best_alt" not in t.arms and t.problem_id == t.trajectory_id[:2] for t in top)
    wrong_token = next(k for k in keys if k[0] == "p3-b")
    named = write_jsonl(tmp_path / "wrong.jsonl", [dict(zip(("trajectory_id", "position", "layer"), map(str, wrong_token)))])
    with pytest.raises(SettingError, match="whose final answer is wrong; pass `include_wrong`"):
        _chosen(tokens, routes, tokens=named)
    assert _chosen(tokens, routes, tokens=named, include_wrong=True)[0] == [wrong_token]


def _recomputed(rows, keys):
    """The group statistics of the tokens `keys`, from the definitions by plain loops over the
    rows of rollouts.parquet (a second implementation of `summarise_group`)."""
    at = {}
    for row in rows.itertuples():
        at.setdefault((row.trajectory_id, row.position, row.layer), {}).setdefault(row.arm, []).append(row)
    for arms in at.values():
        for arm in arms:
            arms[arm].sort(key=lambda r: r.sample)

    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else None

    out = {"tokens": len(keys), "positions": len({k[:2] for k in keys}), "trajectories": len({k[0] for k in keys}),
           "problems": len({at[k]["standard"][0].problem_id for k in keys})}
    for arm in ARMS:
        out[f"accuracy_{arm}"] = mean(mean(r.correct for r in at[k][arm]) for k in keys)
        out[f"first_token_match_{arm}"] = mean(mean(r.first_token == r.target_id for r in at[k][arm]) for k in keys)
        out[f"accuracy_{arm}_given_match"] = mean(r.correct for k in keys for r in at[k][arm] if r.first_token == r.target_id)
        out[f"accuracy_{arm}_given_other"] = mean(r.correct for k in keys for r in at[k][arm] if r.first_token != r.target_id)
    per_token = {}
    for alt in ("best_alt", "random_alt"):
        for k in keys:
            pairs = list(zip(at[k]["standard"], at[k][alt]))
            assert all(s.sample == a.sample for s, a in pairs)
            per_token[alt, "total", k] = mean(int(a.correct) - int(s.correct) for s, a in pairs)
            per_token[alt, "beyond", k] = sum(int(a.correct) - int(s.correct) for s, a in pairs
                                              if a.first_token == s.first_token) / len(pairs)
            per_token[alt, "via", k] = sum(int(a.correct) - int(s.correct) for s, a in pairs
                                           if a.first_token != s.first_token) / len(pairs)
            per_token[alt, "same", k] = mean(a.first_token == s.first_token for s, a in pairs)
            per_token[alt, "identical", k] = mean(a.continuation == s.continuation for s, a in pairs)
            per_token[alt, "gain", k] = np.exp(at[k][alt][0].logprob) - np.exp(at[k]["standard"][0].logprob)
        out[f"{alt}_minus_standard"] = mean(per_token[alt, "total", k] for k in keys)
        out[f"{alt}_minus_standard_beyond_first_token"] = mean(per_token[alt, "beyond", k] for k in keys)
        out[f"{alt}_minus_standard_via_first_token"] = mean(per_token[alt, "via", k] for k in keys)
        out[f"{alt}_same_first_token"] = mean(per_token[alt, "same", k] for k in keys)
        out[f"{alt}_identical_continuations"] = mean(per_token[alt, "identical", k] for k in keys)
        out[f"proxy_gain_{alt}"] = mean(per_token[alt, "gain", k] for k in keys)
    out["best_alt_is_realized_best"] = mean(at[k]["best_alt"][0].route == at[k]["best_alt"][0].realized_best_route
                                            for k in keys)
    units = {"positions": lambda k: k[:2], "trajectories": lambda k: k[0],
             "problems": lambda k: at[k]["standard"][0].problem_id}
    out["by_unit"] = {}
    for unit, of in units.items():
        members = {}
        for k in keys:
            members.setdefault(of(k), []).append(k)
        out["by_unit"][unit] = {f"{alt}_minus_standard{part}": mean(mean(per_token[alt, name, k] for k in ks)
                                                                   for ks in members.values())
                                for alt in ("best_alt", "random_alt")
                                for part, name in (("", "total"), ("_beyond_first_token", "beyond"))}
    return out, per_token


def _assert_equal(group, expected):
    for name, value in expected.items():
        if name == "by_unit":
            for unit, means in value.items():
                assert group["by_unit"][unit] == pytest.approx(means, abs=1e-12), unit
        elif value is None:
            assert group[name] is None, name
        else:
            assert group[name] == pytest.approx(value, abs=1e-12), name


def test_summary_statistics_equal_a_second_implementation_from_the_rows(problem_cf):
    """Every statistic of the first-token decomposition, the unit counts and the by-unit means,
    per bin and per trajectory verdict, recomputed by plain loops over rollouts.parquet; the
    intervals resample problems (a percentile bootstrap of per-problem sums, recomputed)."""
    from routelens.stats import cluster_bootstrap_ratio

    lens, path = problem_cf
    res = rl.rollout(lens, path, tokens="random", limit=12, samples=4, temperature=1.5, max_new_tokens=12, seed=5,
                     include_wrong=True, bootstrap_resamples=300, show_progress=False)
    rows, summary = res.rollouts, res.summary_dict
    assert summary["resampled"] == "problems" and summary["best_by"] == "top-tokens"
    assert summary["uses_trajectory_token"] == {"selection": False, "best_alt": False}
    keys = sorted(set(zip(rows["trajectory_id"], rows["position"], rows["layer"])))
    assert len(keys) == 12 and {k[0] for k in keys} & WRONG                     # wrong trajectories included
    groups = {"All": keys, **{name: [k for k in keys if rows[(rows["trajectory_id"] == k[0]) & (rows["position"] == k[1])
                                                             & (rows["layer"] == k[2])]["bin"].iloc[0] == name]
                              for name in summary["bins"] if name != "All"}}
    verdict_groups = {"right": [k for k in keys if k[0] not in WRONG], "wrong": [k for k in keys if k[0] in WRONG]}
    assert set(summary["by_verdict"]) == {"right", "wrong"}
    assert all(rows["verified"] == ~rows["trajectory_id"].isin(WRONG))
    for group, group_keys in [*((summary["bins"][n], ks) for n, ks in groups.items()),
                              *((summary["by_verdict"][n], ks) for n, ks in verdict_groups.items())]:
        _assert_equal(group, _recomputed(rows, group_keys)[0])
        for alt in ("best_alt", "random_alt"):   # via + beyond = the paired difference
            assert group[f"{alt}_minus_standard_via_first_token"] + group[f"{alt}_minus_standard_beyond_first_token"] \
                == pytest.approx(group[f"{alt}_minus_standard"], abs=1e-12)
    # this model's arms rarely part at these tokens: the same comparison on the rows with first
    # tokens, answers and continuations scrambled (seeded), so that every term is exercised
    from routelens.analyses.rollout.analysis import summarise

    rng = np.random.default_rng(0)
    rows = rows.assign(first_token=rng.choice(rows["target_id"].unique()[:3], len(rows)),
                       correct=rng.random(len(rows)) < 0.5)
    rows = rows.assign(continuation=[f"{f}{int(c)}" for f, c in zip(rows["first_token"], rows["correct"])])
    scrambled = summarise(rows, rl.RolloutConfig(tokens="random", limit=12, seed=5, bootstrap_resamples=300), {})
    assert 0 < scrambled["bins"]["All"]["best_alt_same_first_token"] < 1
    assert scrambled["bins"]["All"]["best_alt_minus_standard_beyond_first_token"] != 0
    _assert_equal(scrambled["bins"]["All"], _recomputed(rows, keys)[0])
    # the interval of the part beyond the first token: per-problem sums of the token values, resampled
    _, per_token = _recomputed(rows, keys)
    problem_of = {k: k[0].split("-")[0] for k in keys}
    sums, counts = {}, {}
    for k in keys:
        sums[problem_of[k]] = sums.get(problem_of[k], 0.0) + per_token["best_alt", "beyond", k]
        counts[problem_of[k]] = counts.get(problem_of[k], 0) + 1
    low, high = cluster_bootstrap_ratio(np.array([sums[p] for p in sorted(sums)]),
                                        np.array([counts[p] for p in sorted(sums)]), seed=5, n_resamples=300)
    assert scrambled["bins"]["All"]["clusters"] == len(sums) == 3
    assert scrambled["bins"]["All"]["best_alt_minus_standard_beyond_first_token_ci"] == pytest.approx([low, high],
                                                                                                      abs=1e-12)


def _constructed_rollouts(flip_beyond: bool) -> pd.DataFrame:
    """Four tokens (three positions, two problems), four paired samples per arm; the trajectory's next token is
    1. A continuation and its verdict are a function of (token, sample, first token) alone, so
    the arms differ only in which first token they emit: best_alt emits 1 where the standard
    route emits 2 (sample 1), random_alt 2 where it emits 1 (sample 0). `flip_beyond`: on the
    first token, best_alt's sample 3 (first token 3, as the standard route's) ends otherwise."""
    firsts = {"standard": [1, 2, 2, 3], "best_alt": [1, 1, 2, 3], "random_alt": [2, 2, 2, 3]}
    tokens = [("t1", 5, 0, "a"), ("t1", 5, 1, "a"), ("t2", 5, 0, "a"), ("t3", 3, 1, "b")]   # one position at two layers
    rows = []
    for n, (tid, position, layer, problem) in enumerate(tokens):
        for arm, route in zip(ARMS, (0, 2, 4)):
            for sample, first in enumerate(firsts[arm]):
                correct = first == 1 or (first == 3 and n % 2 == 0)
                if flip_beyond and n == 0 and arm == "best_alt" and sample == 3:
                    correct = not correct
                rows.append({"trajectory_id": tid, "position": position, "layer": layer, "bin": "Fragile", "gain": 0.1,
                             "arm": arm, "route": route, "sample": sample, "correct": correct,
                             "continuation": f"{first}:{sample}:{correct}", "problem_id": problem, "verified": True,
                             "target_id": 1, "logprob": np.log(0.2 + 0.1 * route / 2), "realized_best_route": 2,
                             "first_token": first})
    return pd.DataFrame(rows)


@pytest.mark.quick
def test_arms_that_differ_only_in_the_first_token_differ_by_nothing_beyond_it():
    from routelens.analyses.rollout.analysis import summarise

    config = rl.RolloutConfig(bootstrap_resamples=200)
    group = summarise(_constructed_rollouts(False), config, {})["bins"]["All"]
    assert (group["tokens"], group["positions"], group["trajectories"], group["problems"]) == (4, 3, 3, 2)
    assert group["best_alt_minus_standard"] == pytest.approx(0.25)                  # sample 1: 2 -> 1, wrong -> right
    assert group["best_alt_minus_standard_via_first_token"] == pytest.approx(0.25)
    assert group["best_alt_minus_standard_beyond_first_token"] == 0.0
    assert group["best_alt_minus_standard_beyond_first_token_ci"] == [0.0, 0.0]
    assert group["random_alt_minus_standard_via_first_token"] == pytest.approx(-0.25)
    assert group["random_alt_minus_standard_beyond_first_token"] == 0.0
    assert (group["best_alt_same_first_token"], group["random_alt_same_first_token"]) == (0.75, 0.75)
    assert group["best_alt_identical_continuations"] == 0.75
    # by the first token: the share that is the trajectory's differs, the accuracy given it does not
    assert [group[f"first_token_match_{arm}"] for arm in ARMS] == [0.25, 0.5, 0.0]
    assert group["accuracy_standard_given_match"] == group["accuracy_best_alt_given_match"] == 1.0
    assert group["accuracy_random_alt_given_match"] is None and group["accuracy_random_alt_given_match_ci"] == [None, None]
    assert group["by_unit"]["problems"]["best_alt_minus_standard_beyond_first_token"] == 0.0
    assert group["best_alt_is_realized_best"] == 1.0
    assert group["proxy_gain_best_alt"] == pytest.approx(0.1) and group["proxy_gain_random_alt"] == pytest.approx(0.2)
    # an effect beyond the first token: one pair of four, on one token of four
    flipped = summarise(_constructed_rollouts(True), config, {})["bins"]["All"]
    assert flipped["best_alt_minus_standard_beyond_first_token"] == pytest.approx(-1 / 16)   # right -> wrong
    assert flipped["best_alt_minus_standard_via_first_token"] == pytest.approx(0.25)
    assert flipped["best_alt_identical_continuations"] == pytest.approx(0.75 - 1 / 16)


OLD_GROUP_KEYS = {"tokens", "trajectories", "few_clusters", "outcome", *(f"accuracy_{arm}{ci}" for arm in ARMS
                                                                          for ci in ("", "_ci")),
                  *(f"{arm}_minus_standard{ci}" for arm in ("best_alt", "random_alt") for ci in ("", "_ci"))}


def test_the_decomposition_is_shown_and_a_folder_from_before_it_still_reads(demo_cf, tmp_path, capsys):
    """The printed tables and the report show the first-token decomposition; a rollout folder
    written before first tokens were kept (its rollouts.parquet without the new columns, its
    summary.json without the new fields) still reads, and they say that it is absent."""
    from routelens.analyses.rollout.analysis import ROLLOUTS_SCHEMA
    from routelens.analyses.rollout.table import ABSENT, print_rollout_summary
    from routelens.report.build import build_report

    lens, path, _ = demo_cf
    out = str(tmp_path / "old")
    print_rollout_summary(rl.rollout(lens, path, out, tokens="all", limit=3, samples=2, max_new_tokens=4,
                                     show_progress=False).summary_dict)
    printed = " ".join(capsys.readouterr().out.split())
    assert "by the first emitted token" in printed and "beyond first token" in printed and "units: 3 tokens" in printed
    report = open(build_report([out], str(tmp_path / "new.html"))).read()
    assert "rollout-first-token" in report and "beyond first token" in report
    table = os.path.join(out, "rollouts.parquet")
    new_columns = ROLLOUTS_SCHEMA.names[ROLLOUTS_SCHEMA.names.index("problem_id"):]
    pd.read_parquet(table).drop(columns=new_columns).to_parquet(table, index=False)
    summary_path = os.path.join(out, "summary.json")
    summary = json.load(open(summary_path))
    old = {key: summary[key] for key in ("analysis", "arms", "samples_per_arm", "temperature", "checker", "interval")}
    old["selection"] = {key: summary["selection"][key] for key in ("tokens", "chosen", "skipped_without_alternative",
                                                                   "limit", "win_tolerance")}
    old["bins"] = {name: {k: v for k, v in group.items() if k in OLD_GROUP_KEYS} for name, group in summary["bins"].items()}
    json.dump(old, open(summary_path, "w"))
    res = rl.read_run(out)
    assert res.per_token.columns.tolist() == ["trajectory_id", "position", "layer", "bin", "gain", "accuracy_best_alt",
                                              "accuracy_random_alt", "accuracy_standard"]
    assert "best_alt_minus_standard_beyond_first_token" not in res.summary.columns and len(res.summary) >= 1
    print_rollout_summary(res.summary_dict)
    printed = " ".join(capsys.readouterr().out.split())
    assert ABSENT in printed and "before --best-by" in printed and "by the first emitted token" not in printed
    report = open(build_report([out], str(tmp_path / "report.html"))).read()
    assert "rollout-bins" in report and "rollout-first-token" not in report
    assert "not in this run&#x27;s summary.json" in report or "not in this run's summary.json" in report
