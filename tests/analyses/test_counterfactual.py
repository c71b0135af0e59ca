"""The counterfactual analysis on tiny models: routes as the contract says, per-token
quantities and summaries consistent with the routes they come from."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAMILIES
from scipy import stats as sp

from routelens.analyses.counterfactual.analysis import (
    BINS,
    CounterfactualConfig,
    analyse_trajectories,
    bin_of,
    summarise,
    token_metrics_rows,
    trajectory_groups,
)
from routelens.data.trajectories import Trajectory
from routelens.engine.reference import ReferenceEngine
from routelens.models import capture_routes


def analyse_trajectory(adapter, engine, trajectory, layers, config):
    """One trajectory's routes and tokens tables."""
    tables = analyse_trajectories(adapter, engine, [trajectory], layers, config)[0]
    return tables["routes"], tables["tokens"]


def token_metrics(logprob, router_score, experts, config) -> dict:
    """`token_metrics_rows` for one token's routes (route 0 standard), as plain lists."""
    rows = token_metrics_rows(logprob[None], router_score[None], experts[None], config)
    return {name: value[0].tolist() for name, value in rows.items()}


def _trajectory(seed=0, length=12, start=5, tid="t0"):
    ids = torch.randint(3, 64, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return Trajectory(tid, ids, start, verified=True)


def _analyse(adapter, trajectory, layers, routes=6, seed=0):
    config = CounterfactualConfig(layers=layers, routes=routes, seed=seed, bootstrap_resamples=200)
    routes_t, tokens_t = analyse_trajectory(adapter, ReferenceEngine(adapter), trajectory, layers, config)
    return routes_t.to_pandas(), tokens_t.to_pandas(), config


@pytest.mark.parametrize("family", FAMILIES)
def test_routes_follow_the_contract(tiny_adapters, family):
    adapter = tiny_adapters[family]
    layers = [adapter.moe_layers[0], adapter.moe_layers[-1]]
    trajectory = _trajectory()
    routes, tokens, config = _analyse(adapter, trajectory, layers)
    positions = list(trajectory.scored_positions)
    assert len(routes) == len(positions) * len(layers) * (config.routes + 1)
    assert len(tokens) == len(positions) * len(layers)
    ids = torch.tensor([trajectory.input_ids])
    with torch.no_grad(), capture_routes(adapter) as captured:
        natural = torch.log_softmax(adapter.model(ids).logits[0].double(), -1)
    for (position, layer), group in routes.groupby(["position", "layer"]):
        assert group["route"].tolist() == list(range(config.routes + 1))
        assert (group["target_id"] == trajectory.input_ids[position + 1]).all()
        standard = group.iloc[0]
        out = captured[layer]
        order = out.experts[position].argsort()
        assert list(standard["experts"]) == out.experts[position][order].tolist()
        np.testing.assert_allclose(standard["weights"], out.weights[position][order].double().numpy(), atol=1e-7)
        # route 0 scored through the override equals the natural forward
        assert standard["logprob"] == pytest.approx(natural[position, trajectory.input_ids[position + 1]].item(), abs=1e-5)
        logits = out.logits[position][None].float()
        scores = adapter.selection_scores(logits, layer)[0].double()
        for _, row in group.iterrows():
            experts = list(row["experts"])
            assert experts == sorted(set(experts)) and len(experts) == adapter.top_k
            expected_w = adapter.weights_for(logits, torch.tensor([experts]))[0].double().numpy()
            np.testing.assert_allclose(row["weights"], expected_w, atol=1e-6)
            assert row["router_score"] == pytest.approx(scores[experts].sum().item(), abs=1e-6)  # fp32 sum
        seen = set()
        for _, row in group.iterrows():
            assert row["duplicate"] == (tuple(row["experts"]) in seen)
            seen.add(tuple(row["experts"]))


def test_token_quantities_recomputed_from_routes(tiny_adapters):
    adapter = tiny_adapters["qwen3_moe"]
    routes, tokens, config = _analyse(adapter, _trajectory(seed=2, length=16, start=4), adapter.moe_layers, routes=8)
    for _, token in tokens.iterrows():
        group = routes[(routes["position"] == token["position"]) & (routes["layer"] == token["layer"])]
        logprob = group["logprob"].to_numpy()
        p = np.exp(logprob)
        assert token["p_standard"] == pytest.approx(p[0])
        assert token["p_route_mean"] == pytest.approx(p.mean())
        assert token["p_best_alt"] == pytest.approx(p[1:].max())
        assert token["p_worst_alt"] == pytest.approx(p[1:].min())
        assert token["gain"] == pytest.approx(p[1:].max() - p[0])
        standard_set = [tuple(e) == tuple(group["experts"].iloc[0]) for e in group["experts"].iloc[1:]]
        assert token["win_rate"] == pytest.approx(np.mean((p[1:] - p[0] > config.win_tolerance) & ~np.array(standard_set)))
        # routes of one expert set are one route: they take its first score (float noise does not rank them)
        sets = [tuple(e) for e in group["experts"]]
        one_score = np.array([logprob[sets.index(s)] for s in sets])
        constant = np.ptp(one_score) == 0 or np.ptp(group["router_score"]) == 0
        expected_alignment = np.nan if constant else sp.spearmanr(group["router_score"], one_score).statistic
        assert token["alignment"] == pytest.approx(expected_alignment, nan_ok=True)
        assert token["n_duplicates"] == group["duplicate"].sum()
        assert token["bin"] == bin_of(p.mean(), config.confident, config.fragile)


def synthetic_tokens(seed: int, n: int, trajectories: int, layers: list[int], gain_mean: float = 0.0,
                     win_high: float = 1.0, tie_high: float = 1.0, problems: int | None = None) -> pd.DataFrame:
    """A tokens table of random values in the columns `summarise` reads (trajectory t
    solving problem t % problems when `problems` is given; no problem ids otherwise)."""
    rng = np.random.default_rng(seed)
    p_mean = rng.uniform(size=n)
    trajectory = rng.integers(0, trajectories, n)
    return pd.DataFrame({
        "trajectory_id": trajectory.astype(str), "layer": rng.choice(layers, n),
        "problem_id": (trajectory % problems).astype(str) if problems else None,
        "p_route_mean": p_mean, "p_standard": rng.uniform(size=n), "p_best_alt": rng.uniform(size=n),
        "gain": rng.normal(gain_mean, 1.0, n), "win_rate": rng.uniform(0, win_high, n),
        "alignment": rng.uniform(-1, 1, n), "alignment_mass_partial": rng.uniform(-1, 1, n),
        "tie_rate": rng.uniform(0, tie_high, n), "sampler_draw_gain": rng.normal(size=n),
        "p_uniform_mean": rng.uniform(size=n), "standard_minus_uniform": rng.normal(0.1, 1.0, n),
        "best_minus_uniform_best": rng.normal(size=n),
        "standard_percentile": rng.uniform(size=n), "gain_by_routes": list(rng.normal(size=(n, 6))),
        "bin": [bin_of(p, 0.9, 0.5) for p in p_mean],
    })


def test_bins_and_summary_counts():
    assert [bin_of(p, 0.9, 0.5) for p in (0.95, 0.9, 0.89, 0.5, 0.49)] == \
        ["Confident", "Confident", "Ambiguous", "Ambiguous", "Fragile"]
    tokens = synthetic_tokens(seed=0, n=300, trajectories=12, layers=[1, 3])
    config = CounterfactualConfig(bootstrap_resamples=300)
    summary = summarise(tokens, [1, 3], config)
    for layer in (1, 3):
        at = tokens[tokens["layer"] == layer]
        for name in BINS:
            group = summary["layers"][str(layer)][name]
            frame = at[at["bin"] == name]
            assert group["tokens"] == len(frame)
            assert group["gain"] == pytest.approx(frame["gain"].mean())
            assert group["win_rate"] == pytest.approx(frame["win_rate"].mean())
            assert group["alignment"] == pytest.approx(np.tanh(np.arctanh(frame["alignment"]).mean()))
            assert group["sampler_draw_gain"] == pytest.approx(frame["sampler_draw_gain"].mean())
            assert group["standard_minus_uniform"] == pytest.approx(frame["standard_minus_uniform"].mean())
            assert group["best_minus_uniform_best"] == pytest.approx(frame["best_minus_uniform_best"].mean())
            assert group["alignment_mass_partial"] == pytest.approx(
                np.tanh(np.arctanh(frame["alignment_mass_partial"]).mean()))
            assert group["standard_percentile"] == pytest.approx(frame["standard_percentile"].mean())
            assert group["gain_by_routes"]["32"] == pytest.approx(np.stack(frame["gain_by_routes"])[:, -1].mean())
            assert group["few_clusters"] == (frame["trajectory_id"].nunique() < 10)
            low, high = group["gain_ci"]
            assert low <= group["gain"] <= high
        assert summary["layers"][str(layer)]["All"]["tokens"] == len(at)


def _cluster_interval(frame: pd.DataFrame, values: pd.Series, confidence: float, seed: int, resamples: int,
                      by: str = "trajectory_id"):
    """The definition, written again: resample clusters (`by`) with replacement (SciPy's
    bootstrap over cluster indices), the statistic is the pooled token mean."""
    sums = values.groupby(frame[by]).sum().to_numpy()
    counts = values.groupby(frame[by]).count().to_numpy()
    result = sp.bootstrap((np.arange(len(sums)),), lambda i, axis=-1: sums[i].sum(axis) / counts[i].sum(axis),
                          n_resamples=resamples, confidence_level=confidence, method="percentile",
                          rng=np.random.default_rng(seed), vectorized=True)
    return result.confidence_interval.low, result.confidence_interval.high


def test_confidence_q_values_and_the_adjusted_gain_interval_follow_their_definitions():
    """`confidence` sets every interval's level; each cell's sign test carries its
    Benjamini-Hochberg q over the table's cells (statsmodels); the gain's adjusted interval
    is the interval at 1 - (1 - confidence) / cells, and survives when it excludes 0."""
    from statsmodels.stats.multitest import multipletests

    tokens = synthetic_tokens(seed=4, n=400, trajectories=30, layers=[0, 2], gain_mean=0.3, win_high=0.6, tie_high=0.4)
    config = CounterfactualConfig(bootstrap_resamples=500, confidence=0.8, seed=3)
    summary = summarise(tokens, [0, 2], config)
    cells = [(layer, name) for layer in ("0", "2") for name in (*BINS, "All")]
    assert summary["cells"] == len(cells) and summary["confidence"] == 0.8
    tests = [summary["layers"][layer][name]["win_loss_sign_test"] for layer, name in cells]
    expected_q = multipletests([t["p_value"] for t in tests], method="fdr_bh")[1]
    assert [t["q_value"] for t in tests] == pytest.approx(expected_q, rel=1e-12)
    for layer, name in cells:
        group = summary["layers"][layer][name]
        frame = tokens[(tokens["layer"] == int(layer)) & ((tokens["bin"] == name) | (name == "All"))]
        assert group["gain_ci"] == pytest.approx(_cluster_interval(frame, frame["gain"], 0.8, 3, 500), rel=1e-9)
        adjusted = _cluster_interval(frame, frame["gain"], 1 - 0.2 / len(cells), 3, 500)
        assert group["gain_ci_adjusted"] == pytest.approx(adjusted, rel=1e-9)
        assert group["gain_survives_adjustment"] == (adjusted[0] > 0 or adjusted[1] < 0)
        assert group["gain_ci_adjusted"][0] <= group["gain_ci"][0] <= group["gain_ci"][1] <= group["gain_ci_adjusted"][1]
        uniform = _cluster_interval(frame, frame["standard_minus_uniform"], 1 - 0.2 / len(cells), 3, 500)
        assert group["standard_minus_uniform_ci_adjusted"] == pytest.approx(uniform, rel=1e-9)
        assert group["standard_minus_uniform_survives_adjustment"] == (uniform[0] > 0 or uniform[1] < 0)
    assert CounterfactualConfig().to_dict().keys() == CounterfactualConfig(confidence=0.95).to_dict().keys()
    assert "confidence" not in CounterfactualConfig().to_dict()   # run folders made before it resume


def test_matched_mass_alternatives_carry_the_standard_routes_gate_mass_and_score_as_forced():
    """--alternative-weights matched-mass: every alternative's weights are the gating rule's,
    rescaled to the standard route's total gate mass; its score equals a plain forward with
    those experts and weights forced (`Lens.force`)."""
    import routelens as rl

    lens = rl.load("demo")
    trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:3+4=A:", "3+4=7#7"), ("Q:9*2=A:", "9*2=18#18")])
    model = rl.counterfactual(lens, trajs, layers=[0], routes=4, seed=1, show_progress=False)
    matched = rl.counterfactual(lens, trajs, layers=[0], routes=4, seed=1, alternative_weights="matched-mass",
                                show_progress=False)
    assert matched.summary_dict["alternative_weights"] == "matched-mass"
    routes, before = matched.routes, model.routes
    assert (np.stack(routes["experts"]) == np.stack(before["experts"])).all()   # same routes, other weights
    for _, group in routes.groupby(["trajectory_id", "position"]):
        masses = np.array([np.sum(w) for w in group.sort_values("route")["weights"]])
        assert masses[1:] == pytest.approx(np.full(len(masses) - 1, masses[0]), rel=1e-6)
    rows = routes[routes["route"] == 2].head(3)
    ids = {t.id: t.input_ids for t in trajs}
    for _, row in rows.iterrows():
        input_ids = torch.tensor([ids[row["trajectory_id"]]])
        with lens.force(0, [(0, int(row["position"]))], [list(row["experts"])], [list(row["weights"])]):
            with torch.no_grad():
                logits = lens.model(input_ids).logits[0, int(row["position"])].double()
        assert float(torch.log_softmax(logits, -1)[int(row["target_id"])]) == pytest.approx(row["logprob"], abs=1e-5)


def test_an_alternative_with_the_standard_experts_never_wins():
    config = CounterfactualConfig()
    experts = np.array([[0, 1], [0, 1], [2, 3], [4, 5]])
    logprob = np.array([-1.0, -1.0 + 1e-9, -0.5, -2.0])   # route 1: the standard set, rounding above route 0
    metrics = token_metrics(logprob, np.array([0.9, 0.9, 0.1, 0.05]), experts, config)
    assert metrics["win_rate"] == pytest.approx(1 / 3) and metrics["tie_rate"] == pytest.approx(1 / 3)
    assert metrics["p_best_alt"] == pytest.approx(np.exp(-0.5))


def test_trajectory_groups_respect_token_budget_and_size():
    trajectories = [Trajectory(str(i), [1] * n, 1) for i, n in enumerate([10, 10, 30, 5, 5, 5])]
    assert trajectory_groups([0, 1, 2, 3, 4, 5], trajectories, max_tokens=25, max_group=64) == [[0, 1], [2], [3, 4, 5]]
    assert trajectory_groups([1, 3, 4], trajectories, max_tokens=100, max_group=2) == [[1, 3], [4]]
    assert trajectory_groups([0, 1], trajectories, max_tokens=100, max_group=1) == [[0], [1]]


def test_tolerance_null_and_percentile_equal_a_second_implementation_from_routes():
    """win_rate/tie_rate with a tolerance, sampler_draw_gain, standard_percentile and the gain as a
    function of S, recomputed from routes.parquet's rows by plain loops."""
    import itertools

    import routelens as rl

    lens = rl.load("demo")
    pairs = [("Q:12+7=A:", "12+7=19#19"), ("Q:3*4+5=A:", "3*4=12;12+5=17#17"), ("Q:50-17=A:", "50-17=33#33")]
    trajs = rl.trajectories_from_text(lens.tokenizer, pairs)
    eps = 0.002
    res = rl.counterfactual(lens, trajs, layers=[0, -1], routes=6, seed=1, win_tolerance=eps)
    tokens = res.tokens.set_index(["trajectory_id", "position", "layer"])
    checked = 0
    for key, rows in res.routes.groupby(["trajectory_id", "position", "layer"]):
        rows = rows.sort_values("route")
        p = np.exp(rows["logprob"].to_numpy())
        sets = [tuple(e) for e in rows["experts"]]
        standard, alternatives = p[0], p[1:]
        diffs = [0.0 if s == sets[0] else a - standard for s, a in zip(sets[1:], alternatives)]
        row = tokens.loc[key]
        assert row["win_rate"] == pytest.approx(sum(d > eps for d in diffs) / len(diffs))
        assert row["tie_rate"] == pytest.approx(sum(abs(d) <= eps for d in diffs) / len(diffs))
        assert row["standard_percentile"] == pytest.approx(
            sum(1.0 if d < 0 else 0.5 if d == 0 else 0.0 for d in diffs) / len(diffs))
        loo = [max(alternatives[:i].tolist() + alternatives[i + 1:].tolist()) - a for i, a in enumerate(alternatives)]
        assert row["sampler_draw_gain"] == pytest.approx(np.mean(loo), abs=1e-12)
        for m, gain in zip((1, 2, 4, 6), row["gain_by_routes"]):
            best = np.mean([max(c) for c in itertools.combinations(alternatives, m)])
            assert gain == pytest.approx(best - standard, abs=1e-12)
        checked += 1
    assert checked == len(res.tokens) > 20
    summary = res.summary_dict["layers"][str(lens.moe_layers[-1])]["All"]
    at = res.tokens[res.tokens["layer"] == lens.moe_layers[-1]]
    assert summary["sampler_draw_gain"] == pytest.approx(at["sampler_draw_gain"].mean())
    # the identity that makes the leave-one-out quantity the S = 1 gain, not a null (the referee's point)
    s1 = np.array([g[0] for g in at["gain_by_routes"]])
    top2 = res.routes[(res.routes["layer"] == lens.moe_layers[-1]) & (res.routes["route"] > 0)].groupby(
        ["trajectory_id", "position"])["logprob"].apply(lambda v: np.diff(np.sort(np.exp(v.to_numpy()))[-2:])[0])
    assert (at["gain"] - at["sampler_draw_gain"]).to_numpy() == pytest.approx(s1 + top2.to_numpy() / 6, abs=1e-12)
    assert summary["few_clusters"] is True and summary["trajectories"] == 3
    assert res.summary_dict["win_tolerance"] == eps and res.config["win_tolerance"] == eps


def _group_and_alone(adapter, trajectories, layers, config):
    """Each trajectory's tables from one group under the fast engine, and alone under a fresh one."""
    from routelens.analyses.counterfactual.analysis import analyse_trajectories
    from routelens.engine import FastEngine

    engine = FastEngine(adapter)
    grouped = analyse_trajectories(adapter, engine, trajectories, layers, config)
    alone = [analyse_trajectories(adapter, FastEngine(adapter), [t], layers, config)[0] for t in trajectories]
    return engine, grouped, alone


def _largest_difference(grouped, alone) -> float:
    """The largest |logprob| difference between the routes tables of two runs, after checking
    they hold the same routes (expert sets exactly; weights and router scores, read off two
    natural forwards, within float rounding)."""
    largest = 0.0
    for got, expected in zip(grouped, alone, strict=True):
        got, expected = got["routes"].to_pandas(), expected["routes"].to_pandas()
        same = ["trajectory_id", "position", "layer", "route", "duplicate", "target_id"]
        assert got[same].equals(expected[same])
        assert [e.tolist() for e in got["experts"]] == [e.tolist() for e in expected["experts"]]
        for column in ("weights", "router_score"):
            np.testing.assert_allclose(np.stack([np.stack(w) for w in got[column]]) if column == "weights" else got[column],
                                       np.stack([np.stack(w) for w in expected[column]]) if column == "weights"
                                       else expected[column], atol=1e-5)
        largest = max(largest, float(np.abs(got["logprob"] - expected["logprob"]).max()))
    return largest


@pytest.mark.parametrize("family", FAMILIES)
def test_trajectories_of_unequal_length_in_one_group_equal_each_alone(tiny_adapters, family):
    """A group shares one right-padded natural forward (routes, keys/values) and its
    scoring chunks; every route of every trajectory equals the trajectory scored alone, and
    the engine checked the padding inert on this model and says so in the run's checks."""
    from routelens.analyses.counterfactual.analysis import engine_checks

    adapter = tiny_adapters[family]
    trajectories = [_trajectory(seed=40 + i, length=n, start=4, tid=f"t{i}") for i, n in enumerate((9, 15, 12))]
    config = CounterfactualConfig(routes=4, seed=3)
    engine, grouped, alone = _group_and_alone(adapter, trajectories, adapter.moe_layers, config)
    assert _largest_difference(grouped, alone) < 1e-5
    assert engine.padding.verdict and "inert" in engine.padding.verdict
    assert engine_checks(engine)["trajectory_batching"] == engine.padding.verdict


def test_padding_that_reaches_real_positions_makes_the_counterfactual_score_one_trajectory_at_a_time(tiny_adapters):
    """A model whose embedding output mixes in later positions: a padded row is not the
    trajectory alone, and the engine's own standard-route check cannot see it (it compares
    two computations of the same padded pass). Unchecked, the group's numbers are silently
    wrong; the padding check refuses the group, and the analysis scores each trajectory
    alone, exactly, with a warning and the reason in the run's checks."""
    from routelens.analyses.counterfactual.analysis import engine_checks

    adapter = tiny_adapters["qwen3_moe"]
    trajectories = [_trajectory(seed=50 + i, length=n, start=4, tid=f"t{i}") for i, n in enumerate((8, 13))]
    config = CounterfactualConfig(routes=3, seed=2)
    layers = [adapter.moe_layers[0]]
    leak = adapter.model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: out + out.mean(dim=1, keepdim=True))        # every position sees the whole row
    try:
        with pytest.warns(UserWarning, match="padding reaches real positions.*one trajectory at a time"):
            engine, grouped, alone = _group_and_alone(adapter, trajectories, layers, config)
        from routelens.analyses.counterfactual.analysis import analyse_trajectories
        from routelens.engine import FastEngine

        unchecked = FastEngine(adapter)
        unchecked.padding.due = lambda lengths: False                         # the check switched off
        silently_wrong = analyse_trajectories(adapter, unchecked, trajectories, layers, config)
    finally:
        leak.remove()
    assert _largest_difference(grouped, alone) < 1e-6
    standard = [(tables["routes"].to_pandas().query("route == 0")["logprob"].to_numpy()) for tables in silently_wrong]
    truth = [(tables["routes"].to_pandas().query("route == 0")["logprob"].to_numpy()) for tables in alone]
    assert max(np.abs(a - b).max() for a, b in zip(standard, truth)) > 1e-3 and unchecked.fallback_reason is None
    checks = engine_checks(engine)
    assert checks["trajectory_batching_fallback"].startswith("one trajectory at a time: ")
    assert "padding reaches real positions" in checks["trajectory_batching_fallback"]


def test_ties_losses_and_the_sign_test_equal_a_plain_recomputation_from_the_routes_table():
    """win, tie and loss shares and the sign test over problems, recomputed from
    routes.parquet by plain loops over tokens and routes (a route of the standard expert set
    ties, whatever float noise says)."""
    from scipy.stats import binomtest

    import routelens as rl

    lens = rl.load("demo")
    trajectories = [t for t in rl.sample_trajectories(lens, n=16, samples_per_problem=2, max_new_tokens=40, seed=3)
                    if t.verified]
    res = rl.counterfactual(lens, trajectories, layers=[-1], routes=16, seed=1, bootstrap_resamples=200)
    eps = res.summary_dict["win_tolerance"]
    shares = {}   # (trajectory, position) -> (win share, tie share, loss share)
    for (tid, position), rows in res.routes.groupby(["trajectory_id", "position"]):
        rows = rows.sort_values("route")
        standard_set, p_std = sorted(rows["experts"].iloc[0]), float(np.exp(rows["logprob"].iloc[0]))
        counts = {"win": 0, "tie": 0, "loss": 0}
        for experts, logprob in zip(rows["experts"].iloc[1:], rows["logprob"].iloc[1:]):
            difference = float(np.exp(logprob)) - p_std
            outcome = ("tie" if sorted(experts) == standard_set else "win" if difference > eps
                       else "loss" if -difference > eps else "tie")
            counts[outcome] += 1
        total = sum(counts.values())
        shares[(tid, position)] = tuple(counts[name] / total for name in ("win", "tie", "loss"))
    cell = res.summary_dict["layers"][str(lens.moe_layers[-1])]["All"]
    assert cell["win_rate"] == pytest.approx(np.mean([s[0] for s in shares.values()]), abs=1e-12)
    assert cell["tie_rate"] == pytest.approx(np.mean([s[1] for s in shares.values()]), abs=1e-12)
    assert cell["loss_rate"] == pytest.approx(np.mean([s[2] for s in shares.values()]), abs=1e-12)
    problem_of = dict(zip(res.tokens["trajectory_id"], res.tokens["problem_id"]))
    assert res.summary_dict["cluster_unit"] == "problems" and len(set(problem_of.values())) < len(problem_of)
    per_problem = {}
    for (tid, _), (win, _, loss) in shares.items():
        per_problem.setdefault(problem_of[tid], []).append(win - loss)
    means = [np.mean(values) for values in per_problem.values()]
    above, below = sum(m > 0 for m in means), sum(m < 0 for m in means)
    test = cell["win_loss_sign_test"]
    assert (test["clusters_alternatives_ahead"], test["clusters_standard_ahead"]) == (above, below)
    assert above + below > 0 and test["p_value"] == pytest.approx(binomtest(above, above + below, 0.5).pvalue, rel=1e-12)


def test_intervals_and_the_sign_test_resample_problems_when_trajectories_carry_them():
    """With problem ids, the unit is the problem: every interval is the bootstrap over
    problems and the sign test counts problems (a per-problem mean of win - loss share);
    without them, trajectories. The summary says which."""
    from scipy.stats import binomtest

    tokens = synthetic_tokens(seed=5, n=500, trajectories=40, layers=[1], gain_mean=0.2, win_high=0.5, tie_high=0.3,
                              problems=13)
    config = CounterfactualConfig(bootstrap_resamples=400, seed=2)
    summary = summarise(tokens, [1], config)
    assert summary["cluster_unit"] == "problems" and "problem" in summary["interval"]
    for name in (*BINS, "All"):
        group = summary["layers"]["1"][name]
        frame = tokens[(tokens["bin"] == name) | (name == "All")]
        assert group["clusters"] == frame["problem_id"].nunique() <= 13 < group["trajectories"]
        for key in ("gain", "standard_minus_uniform", "win_rate"):
            assert group[f"{key}_ci"] == pytest.approx(
                _cluster_interval(frame, frame[key], 0.95, 2, 400, by="problem_id"), rel=1e-9)
        loss = (1 - frame["win_rate"] - frame["tie_rate"]).clip(lower=0)
        per_problem = {}
        for problem, win, lost in zip(frame["problem_id"], frame["win_rate"], loss):
            per_problem.setdefault(problem, []).append(win - lost)
        means = [np.mean(v) for v in per_problem.values()]
        ahead, behind = sum(m > 0 for m in means), sum(m < 0 for m in means)
        test = group["win_loss_sign_test"]
        assert (test["clusters_alternatives_ahead"], test["clusters_standard_ahead"]) == (ahead, behind)
        assert test["p_value"] == pytest.approx(binomtest(ahead, ahead + behind).pvalue)
    plain = summarise(tokens.drop(columns="problem_id"), [1], config)
    assert plain["cluster_unit"] == "trajectories"
    assert plain["layers"]["1"]["All"]["clusters"] == tokens["trajectory_id"].nunique()


def test_bins_by_the_standard_route_and_the_count_of_tokens_that_change_bin():
    """`bins="standard"` bins by p_standard; the summary counts the tokens the other rule
    bins elsewhere (recounted here from the two columns)."""
    tokens = synthetic_tokens(seed=6, n=300, trajectories=12, layers=[0])
    by_standard = tokens.assign(bin=[bin_of(p, 0.9, 0.5) for p in tokens["p_standard"]])
    expected = int(sum(bin_of(a, 0.9, 0.5) != bin_of(b, 0.9, 0.5)
                       for a, b in zip(tokens["p_standard"], tokens["p_route_mean"])))
    assert expected > 0
    for frame, rule in ((tokens, "route-mean"), (by_standard, "standard")):
        summary = summarise(frame, [0], CounterfactualConfig(bootstrap_resamples=50, bins=rule))
        change = summary["bin_changes"]["0"]
        assert summary["bin_rule"] == rule and change["tokens"] == expected
        assert sum(change["by_bin"].values()) == expected
        assert summary["layers"]["0"]["Fragile"]["tokens"] == int((frame["bin"] == "Fragile").sum())


def test_the_uniform_null_is_drawn_from_the_candidates_scored_as_forced_and_summarised_by_its_definition():
    """The uniform null routes: k distinct experts among the token's top-M candidates,
    weighted by the gating rule like the alternatives, each score equal to a plain forward
    with that route forced (`Lens.force`); p_uniform_mean, standard_minus_uniform and
    best_minus_uniform_best recomputed per token from null_routes.parquet and routes.parquet
    by plain loops (a null route of the standard set takes the standard route's p)."""
    import itertools

    import routelens as rl

    lens = rl.load("demo")
    trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:12+7=A:", "12+7=19#19"), ("Q:3*4+5=A:", "3*4=12;12+5=17#17")])
    res = rl.counterfactual(lens, trajs, layers=[0, -1], routes=5, null_routes=4, candidates=6, seed=2,
                            show_progress=False)
    null, routes = res.null_routes, res.routes
    assert sorted(null["route"].unique()) == [1, 2, 3, 4] and len(null) == 4 * len(res.tokens)
    tokens = res.tokens.set_index(["trajectory_id", "position", "layer"])
    adapter = lens.adapter
    ids = {t.id: t.input_ids for t in trajs}
    captured = {}
    for tid, input_ids in ids.items():
        with torch.no_grad(), capture_routes(adapter, adapter.moe_layers) as out:
            adapter.model(torch.tensor([input_ids]), use_cache=False)
        captured[tid] = {layer: (out[layer].logits.float(), ) for layer in adapter.moe_layers}
    for key, rows in null.groupby(["trajectory_id", "position", "layer"]):
        tid, position, layer = key
        logits = captured[tid][layer][0][position]
        candidates = set(torch.topk(adapter.selection_scores(logits[None], layer)[0], 6).indices.tolist())
        sampled = routes[(routes["trajectory_id"] == tid) & (routes["position"] == position)
                         & (routes["layer"] == layer)].sort_values("route")
        p_std = float(np.exp(sampled["logprob"].iloc[0]))
        standard_set = sorted(sampled["experts"].iloc[0])
        p_null = []
        for experts, weights, logprob in zip(rows["experts"], rows["weights"], rows["logprob"]):
            assert len(set(experts)) == len(experts) == adapter.top_k and set(experts) <= candidates
            expected = adapter.weights_for(logits[None], torch.tensor([list(experts)]))[0].double().numpy()
            assert np.asarray(weights) == pytest.approx(expected, abs=1e-6)   # float32 weights
            p_null.append(p_std if sorted(experts) == standard_set else float(np.exp(logprob)))
        row = tokens.loc[key]
        alternatives = np.array([p_std if sorted(e) == standard_set else float(np.exp(lp))   # one route, one score
                                 for e, lp in zip(sampled["experts"].iloc[1:], sampled["logprob"].iloc[1:])])
        assert row["p_uniform_mean"] == pytest.approx(np.mean(p_null), abs=1e-12)
        assert row["standard_minus_uniform"] == pytest.approx(p_std - np.mean(p_null), abs=1e-12)
        m = 4
        best_sampled = np.mean([max(c) for c in itertools.combinations(alternatives, m)])
        best_null = np.mean([max(c) for c in itertools.combinations(p_null, m)])
        assert row["best_minus_uniform_best"] == pytest.approx(best_sampled - best_null, abs=1e-12)
    for _, row in null.sample(4, random_state=0).iterrows():   # re-scored by a plain forward with the route forced
        layer, position = int(row["layer"]), int(row["position"])
        with lens.force(layer, [(0, position)], [list(row["experts"])], [list(row["weights"])]), torch.no_grad():
            logits = lens.model(torch.tensor([ids[row["trajectory_id"]]])).logits[0, position].double()
        assert float(torch.log_softmax(logits, -1)[int(row["target_id"])]) == pytest.approx(row["logprob"], abs=1e-5)
    cell = res.summary_dict["layers"][str(lens.moe_layers[-1])]["All"]
    at = res.tokens[res.tokens["layer"] == lens.moe_layers[-1]]
    assert cell["standard_minus_uniform"] == pytest.approx(at["standard_minus_uniform"].mean())
    # the Gumbel alternatives do not depend on the null: the same routes with and without it
    without = rl.counterfactual(lens, trajs, layers=[0, -1], routes=5, null_routes=0, candidates=6, seed=2,
                                show_progress=False)
    assert without.null_routes is None and without.tokens["standard_minus_uniform"].isna().all()
    assert np.stack(without.routes["experts"]).tolist() == np.stack(routes["experts"]).tolist()
    # (to float rounding: more routes per token batch the fast engine's passes differently)
    assert without.tokens["gain"].to_numpy() == pytest.approx(res.tokens["gain"].to_numpy(), abs=1e-6)


def _partial_spearman_by_regression(score: np.ndarray, outcome: np.ndarray, mass: np.ndarray) -> float:
    """The definition, written again with statsmodels: ranks of score and outcome, each
    regressed (OLS, with intercept) on the ranks of the mass, the Pearson correlation of
    the residuals."""
    import statsmodels.api as sm

    ranks = [sp.rankdata(v) for v in (score, outcome, mass)]
    design = sm.add_constant(ranks[2])
    residuals = [sm.OLS(r, design).fit().resid for r in ranks[:2]]
    return float(np.corrcoef(*residuals)[0, 1])


def test_alignment_with_gate_mass_partialled_out_follows_its_definition():
    """Partial Spearman of router score and log p given the gate mass equals a statsmodels
    regression of the ranks; the plain Spearman where the mass is constant; undefined (NaN)
    where score and mass rank the routes alike, as OLMoE's unnormalised softmax does (the
    demo), where matched-mass alternatives give it a value."""
    import routelens as rl
    from routelens.analyses.counterfactual.analysis import partial_alignment

    rng = np.random.default_rng(0)
    score, outcome, mass = rng.normal(size=(3, 20, 9))
    mass = mass + 0.5 * score   # correlated, not collinear
    got = partial_alignment(score, outcome, mass)
    assert got == pytest.approx([_partial_spearman_by_regression(*row) for row in zip(score, outcome, mass)], abs=1e-12)
    constant = partial_alignment(score, outcome, np.ones_like(mass))
    assert constant == pytest.approx([sp.spearmanr(a, b).statistic for a, b in zip(score, outcome)], abs=1e-12)
    assert np.isnan(partial_alignment(score, outcome, 2.5 * score + 1e-9 * rng.normal(size=score.shape))).all()

    lens = rl.load("demo")
    trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:3+4=A:", "3+4=7#7")])
    model = rl.counterfactual(lens, trajs, layers=[0], routes=6, seed=1, show_progress=False)
    assert model.tokens["alignment_mass_partial"].isna().all() and model.tokens["alignment"].notna().any()
    matched = rl.counterfactual(lens, trajs, layers=[0], routes=6, seed=1, alternative_weights="matched-mass",
                                show_progress=False)
    both = matched.tokens.dropna(subset=["alignment"])
    assert len(both) and both["alignment_mass_partial"].to_numpy() == pytest.approx(both["alignment"].to_numpy())


def test_a_run_folder_made_before_the_uniform_null_still_reads_prints_and_reports(tmp_path):
    """A run made before the uniform null, the problem clusters and the partial alignment
    (its tables and summary as that version wrote them) reads, prints and reports; the
    missing columns show as "-" and the printed table says what is missing."""
    import io
    import json

    from rich.console import Console

    import routelens as rl
    from routelens.analyses.counterfactual.table import print_summary
    from routelens.report.build import build_report

    lens = rl.load("demo")
    trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:3+4=A:", "3+4=7#7"), ("Q:9*2=A:", "9*2=18#18")])
    run = tmp_path / "old"
    rl.counterfactual(lens, trajs, str(run), layers=[-1], routes=4, null_routes=3, show_progress=False)
    new_columns = ["problem_id", "alignment_mass_partial", "p_uniform_mean", "standard_minus_uniform",
                   "best_minus_uniform_best"]
    tokens = pd.read_parquet(run / "tokens.parquet").drop(columns=new_columns)
    tokens.rename(columns={"sampler_draw_gain": "null_gain"}).to_parquet(run / "tokens.parquet")
    (run / "null_routes.parquet").unlink()
    summary = json.loads((run / "summary.json").read_text())
    for key in ("cluster_unit", "null_routes", "bin_rule", "bin_changes"):
        summary.pop(key)
    for groups in summary["layers"].values():
        for group in groups.values():
            for key in [k for k in group if k.startswith(("standard_minus_uniform", "best_minus_uniform_best",
                                                          "alignment_mass_partial", "sampler_draw_gain", "p_uniform",
                                                          "clusters"))]:
                group.pop(key)
            group["null_gain"], group["null_gain_ci"] = 0.01, [0.0, 0.02]
    (run / "summary.json").write_text(json.dumps(summary))

    result = rl.read_run(str(run))
    assert result.null_routes is None and "std - unif" not in result.summary.columns
    printed = io.StringIO()
    print_summary(result.summary_dict, Console(file=printed, width=250))
    text = printed.getvalue()
    assert "made before the uniform null" in text and "over trajectories" in text
    html = open(build_report([str(run)], str(tmp_path / "report.html"))).read()
    assert "No uniform null was scored" in html and "made before the uniform null" in html


def test_bins_standard_bins_each_token_by_its_standard_routes_p_end_to_end():
    import routelens as rl

    lens = rl.load("demo")
    trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:12+7=A:", "12+7=19#19"), ("Q:3*4+5=A:", "3*4=12;12+5=17#17")])
    res = rl.counterfactual(lens, trajs, layers=[0, -1], routes=6, null_routes=0, bins="standard", fragile=0.99,
                            confident=0.999, show_progress=False)
    tokens = res.tokens
    assert list(tokens["bin"]) == [bin_of(p, 0.999, 0.99) for p in tokens["p_standard"]]
    moved = sum(bin_of(a, 0.999, 0.99) != bin_of(b, 0.999, 0.99)
                for a, b in zip(tokens["p_standard"], tokens["p_route_mean"]))
    assert sum(change["tokens"] for change in res.summary_dict["bin_changes"].values()) == moved
    assert res.summary_dict["bins"]["Fragile"] == "p_standard < 0.99" and res.config["bins"] == "standard"


def test_partial_alignment_is_not_fooled_by_bf16_rounding_of_the_weights():
    """bf16 weights: matched masses that differ only by rounding count as constant (the plain
    Spearman), and a mass that is the router score up to rounding leaves nothing to
    partial out (NaN), as in float32."""
    from routelens.analyses.counterfactual.analysis import partial_alignment

    rng = np.random.default_rng(1)
    bf16 = float(torch.finfo(torch.bfloat16).eps)

    def rounded(values: np.ndarray) -> np.ndarray:   # the sum of k = 8 unequal weights, each applied in bf16
        split = rng.dirichlet(np.ones(8), size=values.shape)
        return torch.tensor(values[..., None] * split).to(torch.bfloat16).double().sum(-1).numpy()

    score = rng.dirichlet(np.ones(64), size=(50, 33)).max(axis=-1) * 4   # router scores of 33 routes per token
    outcome = rng.normal(size=score.shape)
    plain = [sp.spearmanr(a, b).statistic for a, b in zip(score, outcome)]
    matched = rounded(np.full(score.shape, 0.61))   # every route at one gate mass, up to bf16 rounding
    assert np.ptp(matched, axis=1).min() > 0
    assert partial_alignment(score, outcome, matched, bf16) == pytest.approx(plain, abs=1e-12)
    assert partial_alignment(score, outcome, matched) != pytest.approx(plain, abs=1e-3)   # float32's tolerance: fooled
    assert np.isnan(partial_alignment(score, outcome, rounded(score), bf16)).all()
    assert np.isnan(partial_alignment(score, outcome, rounded(2.5 * score), bf16)).all()
