"""Joint multi-layer counterfactuals: routes forced at several layers at once. Every engine
against the reference engine on every family; the joint tables against a second
computation from the single-layer tables of the same run; settings and resume."""

import os
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAMILIES

from routelens.analyses.counterfactual.analysis import CounterfactualConfig, build_routes, joint_routes, joint_verdict
from routelens.data.trajectories import Trajectory
from routelens.engine import CacheEngine, FastEngine, ReferenceEngine, ScoreItem
from routelens.errors import RouteLensError

LENGTHS = (13, 8, 17)


def _joint_items(adapter, layers, num_routes=4):
    items = []
    for i, length in enumerate(LENGTHS):
        ids = torch.randint(3, 64, (length,), generator=torch.Generator().manual_seed(i)).tolist()
        trajectory = Trajectory(f"t{i}", ids, completion_start=3 + i)
        config = CounterfactualConfig(routes=num_routes, null_routes=2)
        joint = joint_routes(build_routes(adapter, trajectory, layers, config), layers, num_routes)
        items.append(ScoreItem(torch.tensor(ids), joint.positions, torch.as_tensor(joint.experts), joint.weights))
    return items


def _three_layers(adapter):
    moe = adapter.moe_layers
    return sorted({moe[0], moe[len(moe) // 2], moe[-1]})


@pytest.mark.parametrize("family", FAMILIES)
def test_joint_routes_fast_equals_reference(tiny_adapters, family):
    adapter = tiny_adapters[family]
    layers = _three_layers(adapter)
    items = _joint_items(adapter, layers)
    engine = FastEngine(adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # hybrids: "scoring layer l with the cache engine"
        fast = engine.score_batch(layers, items)
    assert engine.fallback_reason is None
    reference = ReferenceEngine(adapter).score_batch(layers, items)
    first_only = ReferenceEngine(adapter).score_batch(layers[0], [
        ScoreItem(item.input_ids, item.positions, item.experts[:, :, 0], item.weights[:, :, 0]) for item in items])
    for f, r, single in zip(fast, reference, first_only):
        np.testing.assert_allclose(f, r, atol=1e-5, rtol=0)
        np.testing.assert_allclose(r[:, 0], single[:, 0], atol=1e-5, rtol=0)   # route 0: natural either way
    # the upper layers' routes were applied: joint scores differ from the first layer's alone
    assert max(np.abs(r[:, 1:] - s[:, 1:]).max() for r, s in zip(reference, first_only)) > 1e-4


@pytest.mark.parametrize("family", ["olmoe", "qwen3_next", "gpt_oss"])
def test_joint_routes_cache_engine_equals_reference(tiny_adapters, family):
    adapter = tiny_adapters[family]
    layers = _three_layers(adapter)[1:]
    items = _joint_items(adapter, layers)
    engine = CacheEngine(adapter, route_chunk=3)   # chunks of routes: the overrides follow each chunk's rows
    cached = engine.score_batch(layers, items)
    assert engine.fallback_reason is None
    for c, r in zip(cached, ReferenceEngine(adapter).score_batch(layers, items)):
        np.testing.assert_allclose(c, r, atol=1e-5, rtol=0)


def test_fast_engine_joint_routes_do_not_depend_on_chunking(tiny_adapters):
    adapter = tiny_adapters["deepseek_v3"]
    layers = _three_layers(adapter)
    items = _joint_items(adapter, layers, num_routes=5)
    whole = FastEngine(adapter).score_batch(layers, items)
    for a, b in zip(whole, FastEngine(adapter, route_chunk=2).score_batch(layers, items)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def _demo_trajectories(lens):
    import routelens as rl

    pairs = [("Q:12+7=A:", "12+7=19#19"), ("Q:3*4+5=A:", "3*4=12;12+5=17#17"), ("Q:50-17=A:", "50-17=33#33"),
             ("Q:8*9=A:", "8*9=72#72")]
    return rl.trajectories_from_text(lens.tokenizer, pairs)


@pytest.fixture(scope="module")
def demo_joint():
    import routelens as rl

    lens = rl.load("demo")
    return lens, rl.counterfactual(lens, _demo_trajectories(lens), joint_layers=[0, -1, 1], routes=5, null_routes=4,
                                   seed=2, bootstrap_resamples=300)


def test_joint_tables_equal_a_second_computation_from_the_single_layer_tables(demo_joint):
    lens, res = demo_joint
    layers = sorted({0, 1, lens.moe_layers[-1]})   # joint_layers=[0, -1, 1], resolved and ascending
    assert res.config["resolved_joint_layers"] == layers and res.summary_dict["joint"]["layers"] == layers
    single = res.routes.set_index(["trajectory_id", "position", "layer", "route"]).sort_index()
    tokens = res.tokens.set_index(["trajectory_id", "position", "layer"])
    joint_tokens = res.joint_tokens.set_index(["trajectory_id", "position"])
    assert len(res.joint_routes) == len(joint_tokens) * 6 and len(joint_tokens) * len(layers) == len(res.tokens)
    for (tid, position), rows in res.joint_routes.groupby(["trajectory_id", "position"]):
        rows = rows.sort_values("route")
        p_joint = np.exp(rows["logprob"].to_numpy())
        p_single = []
        for j, layer in enumerate(layers):
            at = single.loc[(tid, position, layer)]
            # route r of the joint route is route r of every layer, experts and weights alike
            assert [list(e[j]) for e in rows["experts"]] == [list(e) for e in at["experts"]]
            np.testing.assert_array_equal(np.stack([w[j] for w in rows["weights"]]), np.stack(at["weights"]))
            p_single.append(np.exp(at["logprob"].to_numpy()))
        p_single = np.array(p_single)
        assert all(list(v) == layers for v in rows["layers"])
        assert p_joint[0] == pytest.approx(p_single[0, 0], abs=1e-5)     # route 0: the natural forward
        token = joint_tokens.loc[(tid, position)]
        single_gains = [tokens.loc[(tid, position, layer), "gain"] for layer in layers]
        assert token["gain"] == pytest.approx(p_joint[1:].max() - p_joint[0], abs=1e-12)
        assert token["sum_single_gain"] == pytest.approx(sum(single_gains), abs=1e-12)
        assert token["max_single_gain"] == pytest.approx(max(single_gains), abs=1e-12)
        interaction = np.mean([(p_joint[r] - p_joint[0]) - sum(p_single[j, r] - p_single[j, 0] for j in range(len(layers)))
                               for r in range(1, len(p_joint))])
        assert token["interaction"] == pytest.approx(interaction, abs=1e-12)
    summary = res.summary_dict["joint"]["bins"]["All"]
    frame = res.joint_tokens
    assert summary["tokens"] == len(frame)
    assert summary["joint_minus_sum"] == pytest.approx((frame["gain"] - frame["sum_single_gain"]).mean())
    assert summary["verdict"] == joint_verdict(summary["interaction_ci_adjusted"])
    low, high = summary["interaction_ci_adjusted"]
    assert low <= summary["interaction_ci"][0] <= summary["interaction_ci"][1] <= high   # wider: adjusted over the bins
    assert list(res.joint_summary["bin"]) == ["Confident", "Ambiguous", "Fragile", "All"]


def test_joint_route_scores_equal_plain_forwards_with_the_overrides(demo_joint):
    """One token's joint routes, forced through the model's own forward by hooks at every
    listed layer (no engine): the run's log-probabilities."""
    from routelens.models.routing import RouteOverride, override_routes

    lens, res = demo_joint
    row = res.joint_tokens.iloc[len(res.joint_tokens) // 2]
    rows = res.joint_routes[(res.joint_routes["trajectory_id"] == row["trajectory_id"])
                            & (res.joint_routes["position"] == row["position"])].sort_values("route")
    trajectory = next(t for t in _demo_trajectories(lens) if t.id == row["trajectory_id"])
    position = int(row["position"])
    prefix = torch.tensor([trajectory.input_ids[: position + 1]])
    for _, route in rows.iterrows():
        overrides = {layer: RouteOverride(torch.tensor([position]), torch.tensor(np.stack(route["experts"])[j:j + 1]),
                                          torch.tensor(np.stack(route["weights"])[j:j + 1]))
                     for j, layer in enumerate(route["layers"])}
        with torch.no_grad(), override_routes(lens.adapter, overrides):
            logits = lens.model(prefix, use_cache=False).logits[0, -1]
        expected = torch.log_softmax(logits.float(), -1)[trajectory.input_ids[position + 1]].item()
        assert route["logprob"] == pytest.approx(expected, abs=1e-5)


def _synthetic_joint_summary(excess: float, trajectories: int = 24, positions: int = 6, routes: int = 9) -> dict:
    """summarise_joint over joint tables built by `joint_tables` from known per-layer effects:
    p_l(r) = p_std + d_l(r) at each of two layers alone, and forced together
    p_joint(r) = p_std + d_0(r) + d_1(r) + excess (r > 0): additive when excess = 0."""
    import pandas as pd

    from routelens.analyses.counterfactual.analysis import LayerRoutes, joint_tables, summarise_joint
    from routelens.data.trajectories import Trajectory

    rng = np.random.default_rng(0)
    config = CounterfactualConfig(joint_layers=[0, 1], routes=routes - 1, null_routes=0, bootstrap_resamples=400)
    frames = []
    for t in range(trajectories):
        p_std = rng.uniform(0.2, 0.8, size=(positions, 1))
        effects = rng.uniform(-0.08, 0.08, size=(2, positions, routes))
        effects[:, :, 0] = 0.0                                             # route 0: the standard route
        single = {layer: np.log(p_std + effects[layer]) for layer in (0, 1)}
        joint = p_std + effects.sum(axis=0) + np.where(np.arange(routes) > 0, excess, 0.0)
        experts = np.stack([np.sort(rng.choice(16, size=(2, 4), replace=False), axis=-1)
                            for _ in range(positions * routes)]).reshape(positions, routes, 2, 4)
        layer_routes = LayerRoutes(np.arange(1, positions + 1), experts, torch.full((positions, routes, 2, 4), 0.25),
                                   rng.uniform(size=(positions, routes)), np.zeros((positions, routes), dtype=bool))
        trajectory = Trajectory(f"t{t}", list(range(3, positions + 5)), 1, verified=True)
        frames.append(joint_tables(trajectory, [0, 1], layer_routes, np.log(joint), single, config)["joint_tokens"]
                      .to_pandas())
    return summarise_joint(pd.concat(frames, ignore_index=True), [0, 1], config)["bins"]["All"]


@pytest.mark.parametrize("excess, verdict", [(0.0, "additive"), (0.03, "super-additive"), (-0.03, "cancelling")])
def test_joint_verdict_calls_a_known_combination_by_its_name(excess, verdict):
    summary = _synthetic_joint_summary(excess)
    assert summary["interaction"] == pytest.approx(excess, abs=1e-9)     # the per-route interaction, exactly
    assert summary["verdict"] == verdict
    if excess == 0.0:   # best-of-S against the sum of per-layer bests is below 0 for an additive model: biased
        assert summary["joint_minus_sum_ci"][1] < 0


def test_joint_null_routes_stack_each_layers_null_and_give_the_joint_router_against_chance(demo_joint):
    """Joint null route r is null route r of every listed layer (experts and weights), and
    the joint tokens' standard_minus_uniform is p_joint(standard) minus the mean p of the
    joint null routes (one that drew the standard sets takes the standard's p)."""
    lens, res = demo_joint
    layers = res.summary_dict["joint"]["layers"]
    joint_null = res.table("joint_null_routes")
    single_null = res.null_routes.set_index(["trajectory_id", "position", "layer"]).sort_index()
    joint = res.joint_routes.set_index(["trajectory_id", "position"]).sort_index()
    tokens = res.joint_tokens.set_index(["trajectory_id", "position"])
    assert len(joint_null) == 4 * len(tokens)
    for (tid, position), rows in joint_null.groupby(["trajectory_id", "position"]):
        rows = rows.sort_values("route")
        assert list(rows["route"]) == [1, 2, 3, 4]
        for j, layer in enumerate(layers):
            at = single_null.loc[(tid, position, layer)].sort_values("route")
            assert [list(e[j]) for e in rows["experts"]] == [list(e) for e in at["experts"]]
            np.testing.assert_array_equal(np.stack([w[j] for w in rows["weights"]]), np.stack(at["weights"]))
        standard = joint.loc[(tid, position)].sort_values("route").iloc[0]
        p_std = float(np.exp(standard["logprob"]))
        standard_sets = [list(e) for e in standard["experts"]]
        p_null = [p_std if [list(e) for e in experts] == standard_sets else float(np.exp(logprob))
                  for experts, logprob in zip(rows["experts"], rows["logprob"])]
        assert tokens.loc[(tid, position), "standard_minus_uniform"] == pytest.approx(p_std - np.mean(p_null), abs=1e-12)


def test_joint_verdicts():
    assert joint_verdict([-0.1, 0.2]) == "additive"
    assert joint_verdict([0.01, 0.2]) == "super-additive"
    assert joint_verdict([-0.3, -0.1]) == "cancelling"
    assert joint_verdict([None, None]) is None


@pytest.mark.parametrize("options, message", [
    ({"joint_layers": [1]}, "two or more distinct layers"),
    ({"joint_layers": [1, 1]}, "two or more distinct layers"),
    ({"joint_layers": [0, "1"]}, "two or more distinct layers"),
    ({"joint_layers": [1, 2], "layers": [0]}, "`joint_layers` and `layers` together"),
    ({"joint_layers": [1, 2], "layers": [-1]}, "`joint_layers` and `layers` together"),   # -1 given, not a default
])
def test_joint_settings_are_checked(options, message):
    with pytest.raises(RouteLensError, match=message):
        CounterfactualConfig(**options)
    assert CounterfactualConfig(joint_layers=[2, 0]).layers == [2, 0]


def test_joint_layers_resolving_to_one_layer_are_refused():
    import routelens as rl

    lens = rl.load("demo")
    last = lens.moe_layers[-1]
    with pytest.raises(RouteLensError, match="distinct layer of this model"):
        rl.counterfactual(lens, _demo_trajectories(lens)[:1], joint_layers=[last, -1], routes=2)


def test_joint_run_resumes_a_unit_cut_off_between_its_tables(tmp_path):
    import routelens as rl

    lens = rl.load("demo")
    trajs = _demo_trajectories(lens)
    out = str(tmp_path / "joint")
    options = dict(joint_layers=[0, 1], routes=3, seed=1, bootstrap_resamples=100, show_progress=False)
    first = rl.counterfactual(lens, trajs, out, **options)
    before = {name: first.table(name) for name in ("routes", "tokens", "joint_routes", "joint_tokens")}
    # a kill after unit 2's single-layer tables landed and before its joint tables did
    os.remove(os.path.join(out, "parts", "joint_routes-0000002.parquet"))
    os.remove(os.path.join(out, "parts", "joint_tokens-0000002.parquet"))
    for name in before:
        os.remove(os.path.join(out, f"{name}.parquet"))
    resumed = rl.counterfactual(lens, trajs, out, **options)
    assert resumed.info["sessions"][-1]["units_done"] == 1            # only the cut-off unit was scored again
    for name, frame in before.items():   # unit 2 scored alone now: batch composition moves fp32 sums by ~1e-6
        pd.testing.assert_frame_equal(resumed.table(name), frame, check_exact=False, atol=1e-5, rtol=0)


def test_joint_run_report_and_printed_table_show_the_comparison(demo_joint, tmp_path):
    import io

    from rich.console import Console

    from routelens.analyses.counterfactual.table import print_summary
    from routelens.report.page import interval

    _, res = demo_joint
    saved = res.save(str(tmp_path / "joint"))
    page = open(saved.report(), encoding="utf-8").read()
    section = page[page.index("Joint routes: layers 0+1+3"):]
    assert 'id="fig-cf_joint"' in section and (tmp_path / "joint" / "figures" / "cf_joint.png").stat().st_size > 1000
    joint = res.summary_dict["joint"]["bins"]
    for group in joint.values():
        if group["tokens"]:
            assert interval(group["gain"], group["gain_ci"], 4) in section
            assert interval(group["joint_minus_sum"], group["joint_minus_sum_ci"], 4) in section
    printed = io.StringIO()
    print_summary(res.summary_dict, Console(file=printed, width=220))
    text = printed.getvalue()
    assert "joint routes at layers 0+1+3" in text
    assert all((group["verdict"] or "-") in text for group in joint.values())


def test_export_of_the_joint_table(demo_joint, tmp_path, capsys):
    from routelens.cli import main

    _, res = demo_joint
    saved = res.save(str(tmp_path / "joint-export"))
    assert main(["export", saved.path, "--table", "joint", "--format", "csv"]) == 0
    import io

    import pandas as pd

    exported = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(exported["bin"]) == ["Confident", "Ambiguous", "Fragile", "All"]
    assert list(exported["verdict"].fillna("-")) == [g["verdict"] or "-" for g in res.summary_dict["joint"]["bins"].values()]
    single = _single_layer_run(tmp_path)
    assert main(["export", single, "--table", "joint"]) == 2
    assert "--table joint needs one" in capsys.readouterr().err


def _single_layer_run(tmp_path) -> str:
    import routelens as rl

    lens = rl.load("demo")
    return rl.counterfactual(lens, _demo_trajectories(lens)[:1], layers=[0], routes=2).save(str(tmp_path / "single")).path


@pytest.mark.quick
def test_layers_not_given_default_to_the_last_layer_or_the_joint_layers():
    assert CounterfactualConfig().layers == [-1]
    assert CounterfactualConfig(joint_layers=[0, 2]).layers == [0, 2]
    assert CounterfactualConfig(joint_layers=[0, 2], layers=[0, 2]).layers == [0, 2]
