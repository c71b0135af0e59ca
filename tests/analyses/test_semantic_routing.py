"""Semantic (fingerprint) routing on the demo model: routes of k distinct experts weighted
by the model's own gating rule (one arm re-scored by plain forwards with hooks), arms paired
on the same items, a disjoint seeded split, statistics equal to SciPy's and statsmodels'."""

import numpy as np
import pytest
import torch
from conftest import FAMILIES
from scipy import stats as sp
from statsmodels.stats.multitest import multipletests

import routelens as rl
from routelens.analyses.semantic_routing.analysis import nearest, split_items, token_vectors
from routelens.errors import RouteLensError
from routelens.models.routing import RouteOverride, capture_routes, override_routes


@pytest.fixture(scope="module")
def demo_semantic():
    lens = rl.load("demo")
    res = rl.semantic_route(lens, "arithmetic", per_domain=4, layer_sets=[[3], [0, 3]], floor_seeds=2,
                            bootstrap_resamples=200, seed=1, max_new_tokens=40)
    return lens, res


def test_split_is_disjoint_seeded_and_covers_every_domain():
    items = rl.arithmetic_items(rl.load("demo"), per_domain=5)
    calibration, evaluation = split_items(items, 0.4, seed=3)
    assert not {i.id for i in calibration} & {i.id for i in evaluation}
    assert len(calibration) + len(evaluation) == len(items)
    assert {i.domain for i in calibration} == {i.domain for i in evaluation} == {"addsub", "mul", "mixed", "long"}
    assert [i.id for i in split_items(items, 0.4, seed=3)[0]] == [i.id for i in calibration]
    assert [i.id for i in split_items(items, 0.4, seed=4)[0]] != [i.id for i in calibration]


def test_arms_are_paired_and_the_semantic_route_rescored_by_hooks_matches(demo_semantic):
    lens, res = demo_semantic
    scores, summary = res.scores, res.summary_dict
    natural_ids = set(scores[scores["arm"] == "natural"]["item_id"])
    assert len(natural_ids) == summary["evaluation_items"] == 8
    for (layer_set, arm), rows in scores[scores["arm"] != "natural"].groupby(["layer_set", "arm"]):
        assert set(rows["item_id"]) == natural_ids, (layer_set, arm)
        assert len(rows) == len(natural_ids) * (2 if arm == "floor" else 1)
    experts = summary["domain_experts"]
    for layer in ("0", "3"):
        for route in experts[layer].values():
            assert len(route) == lens.top_k == len(set(route))          # k distinct experts
    # the semantic arm at layer set "0+3", re-scored by a plain forward with hooks at both layers
    items = {i.id: i for i in rl.arithmetic_items(lens, per_domain=4)}
    for row in scores[(scores["arm"] == "semantic") & (scores["layer_set"] == "0+3")].itertuples():
        item = items[row.item_id]
        predicted = row.predicted.split("|")
        ids = torch.tensor([item.input_ids])
        with torch.no_grad(), capture_routes(lens.adapter, [0, 3]) as captured:
            lens.model(ids, use_cache=False)
        length = ids.shape[1]
        overrides = {}
        for layer, domain in zip((0, 3), predicted):
            route = torch.tensor(experts[str(layer)][domain]).expand(length, -1)
            weights = lens.adapter.weights_for(captured[layer].logits.float(), route)   # the model's gating rule
            overrides[layer] = RouteOverride(torch.arange(length), route, weights)
        with torch.no_grad(), override_routes(lens.adapter, overrides):
            logits = lens.model(ids, use_cache=False).logits[0].float()
        positions = list(item.target_positions)
        logprob = torch.log_softmax(logits, -1)[positions, torch.tensor(item.input_ids)[[p + 1 for p in positions]]]
        assert row.mean_logprob == pytest.approx(float(logprob.mean()), abs=1e-5)


def test_prompt_classification_is_the_nearest_fingerprint(demo_semantic):
    lens, res = demo_semantic
    items = {i.id: i for i in rl.arithmetic_items(lens, per_domain=4)}
    calibration = [items[i] for i in res.config["calibration_items"]]
    vectors = [token_vectors(lens.adapter, item, [3], "selection")[0][3] for item in calibration]
    domains = sorted({i.domain for i in calibration})
    centroids = torch.stack([torch.cat([v for v, i in zip(vectors, calibration) if i.domain == d]).mean(0)
                             for d in domains])
    for row in res.classification[res.classification["layer"] == 3].itertuples():
        item = items[row.item_id]
        prompt = token_vectors(lens.adapter, item, [3], "selection")[0][3][: len(item.prompt_ids)].mean(0, keepdim=True)
        assert domains[int(nearest(prompt, centroids)[0])] == row.predicted


def test_statistics_equal_scipy_and_statsmodels(demo_semantic):
    _, res = demo_semantic
    scores, summary = res.scores, res.summary_dict
    natural = scores[scores["arm"] == "natural"].set_index("item_id")["mean_logprob"]
    tests = []
    for name, block in summary["layer_sets"].items():
        at = scores[scores["layer_set"] == name]
        for domain, entry in block.items():
            ids = natural.index if domain == "All" else \
                scores[(scores["arm"] == "natural") & (scores["domain"] == domain)]["item_id"]
            for arm in ("semantic", "semantic_token", "oracle", "floor"):
                values = at[at["arm"] == arm].groupby("item_id")["mean_logprob"].mean().reindex(ids)
                difference = (values - natural[ids]).to_numpy()
                assert entry[arm]["difference"] == pytest.approx(difference.mean())
                if np.any(difference != 0):
                    assert entry[arm]["p_value"] == pytest.approx(sp.wilcoxon(difference).pvalue)
                tests.append(entry[arm])
    expected = multipletests([t["p_value"] for t in tests], method="fdr_bh")[1]
    np.testing.assert_allclose([t["q_value"] for t in tests], expected, rtol=1e-12)


@pytest.mark.parametrize("options, message", [
    ({"domains": ["mul"]}, "chooses between domains; the items hold 1"),
    ({"per_domain": 1}, "has 1 item; each domain needs two or more"),
    ({"layer_sets": [[0, 0]]}, "`layer_sets` set 0,0 names layer 0 twice"),
    ({"layer_sets": [[0, 1], [1, 0]]}, r"`layer_sets` names the same set of layers twice \(0,1 and 1,0\)"),
    ({"layer_sets": [[-1], [3]]}, r"`layer_sets` names the same set of layers twice \(-1 and 3\)"),
    ({"kind": "vibes"}, "`kind` must be one of selection, input"),
    ({"layer_sets": [[9]]}, "layer 9 is out of range"),
])
def test_bad_settings_are_one_line_errors(options, message):
    with pytest.raises(RouteLensError, match=message):
        rl.semantic_route(rl.load("demo"), "arithmetic", **{"per_domain": 3, **options})


def test_input_fingerprints_run_and_report(tmp_path):
    res = rl.semantic_route(rl.load("demo"), "arithmetic", str(tmp_path / "sem"), per_domain=3, kind="input",
                                layer_sets=[[1]], floor_seeds=1, bootstrap_resamples=100, accuracy=False,
                                show_progress=False)
    assert res.summary_dict["kind"] == "input"
    page = open(res.report(), encoding="utf-8").read()
    assert "Semantic routing" in page and 'id="fig-semantic_routing"' in page
    assert "Accuracy of generated answers" not in page and "accuracy" not in res.summary_dict
    entry = res.summary_dict["layer_sets"]["1"]["All"]
    assert f"{entry['natural']:.3f}" in page


def _greedy_forced(lens, prompt, layer, experts, steps):
    """Greedy decoding by full forwards: every token at `layer` forced to `experts` with the
    gating rule's weights on its own router logits (read from a natural forward first: the
    router's input at `layer` does not depend on `layer`'s experts)."""
    sequence, out = list(prompt), []
    for _ in range(steps):
        ids = torch.tensor([sequence])
        with torch.no_grad(), capture_routes(lens.adapter, [layer]) as captured:
            lens.model(ids, use_cache=False)
        route = torch.tensor(experts).expand(len(sequence), -1)
        weights = lens.adapter.weights_for(captured[layer].logits.float(), route)
        with torch.no_grad(), override_routes(lens.adapter, {layer: RouteOverride(torch.arange(len(sequence)), route,
                                                                                  weights)}):
            token = int(lens.model(ids, use_cache=False).logits[0, -1].argmax())
        out.append(token)
        sequence.append(token)
        if token == lens.tokenizer.eos_token_id:
            break
    return out


def test_accuracy_arms_equal_forced_greedy_decoding_and_mcnemar(demo_semantic):
    from statsmodels.stats.contingency_tables import mcnemar

    lens, res = demo_semantic
    accuracy, summary = res.accuracy, res.summary_dict
    items = {i.id: i for i in rl.arithmetic_items(lens, per_domain=4)}
    oracle = accuracy[(accuracy["arm"] == "oracle") & (accuracy["layer_set"] == "3")]
    for row in oracle.head(3).itertuples():
        item = items[row.item_id]
        experts = summary["domain_experts"]["3"][item.domain]
        generated = _greedy_forced(lens, item.prompt_ids, 3, experts, res.config["max_new_tokens"])
        assert lens.tokenizer.decode(generated, skip_special_tokens=True) == row.completion
    natural = accuracy[accuracy["arm"] == "natural"].set_index("item_id")["correct"]
    for name, block in summary["accuracy"].items():
        for arm in ("semantic", "oracle"):
            arm_correct = accuracy[(accuracy["arm"] == arm) & (accuracy["layer_set"] == name)].set_index("item_id")["correct"]
            a, b = natural.to_numpy(), arm_correct.reindex(natural.index).to_numpy()
            entry = block["All"][arm]
            assert entry["accuracy"] == pytest.approx(b.mean()) and entry["difference"] == pytest.approx((b * 1.0 - a).mean())
            table = [[int(np.sum(a & b)), int(np.sum(a & ~b))], [int(np.sum(~a & b)), int(np.sum(~a & ~b))]]
            if table[0][1] + table[1][0]:
                assert entry["p_value"] == pytest.approx(mcnemar(table, exact=True).pvalue)


@pytest.mark.parametrize("family", FAMILIES)
def test_semantic_routing_runs_on_every_family(tiny_adapters, family):
    """Every served type (group-limited, biased, hybrid, sparsemixer, identity-expert routers,
    text towers): routes of k distinct experts, the natural-route check passes, every arm is
    scored."""
    from routelens.analyses.semantic_routing.analysis import run_semantic_routing
    from routelens.analyses.semantic_routing.config import SemanticRouteConfig
    from routelens.data.target_items import TargetItem
    from routelens.models.loading import LoadedModel

    adapter = tiny_adapters[family]
    generator = torch.Generator().manual_seed(0)
    items = [TargetItem(f"{d}{i}", d, torch.randint(3 + 20 * j, 20 + 20 * j, (6,), generator=generator).tolist(),
                        torch.randint(3, 60, (4,), generator=generator).tolist())
             for j, d in enumerate(("a", "b")) for i in range(4)]
    loaded = LoadedModel(adapter, None, f"tiny:{family}", "cpu", "float32")
    run = run_semantic_routing(loaded, items, SemanticRouteConfig(layer_sets=[[adapter.moe_layers[-1]]], floor_seeds=1,
                                                                  accuracy=False, bootstrap_resamples=50),
                               None, {"items": "in-memory"}, show_progress=False)
    scores = run.read("scores")
    assert set(scores["arm"]) == {"natural", "semantic", "semantic_token", "oracle", "floor"}
    for route in run.summary["domain_experts"][str(adapter.moe_layers[-1])].values():
        assert len(set(route)) == adapter.top_k_at(adapter.moe_layers[-1])
    assert scores["mean_logprob"].notna().all()


def test_semantic_routing_killed_mid_run_resumes_to_the_uninterrupted_tables(tmp_path, cli_env):
    """Units are chunks of 64 evaluation items, written as each completes: a SIGKILL after the
    first loses nothing, and the re-run computes only the rest."""
    import json
    import os
    import subprocess

    import pandas as pd
    from conftest import PYTHON, kill_when_parts_land, scaled, unit_parts

    def command(out):
        return [PYTHON, "-m", "routelens", "semantic-route", "--model", "demo", "--items", "arithmetic", "--per-domain",
                "60", "--layer-sets", "3", "--floor-seeds", "1", "--max-new-tokens", "24", "--out", out, "--no-progress"]

    killed = str(tmp_path / "killed")
    kill_when_parts_land(subprocess.Popen(command(killed), env=cli_env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL), killed, 1, prefix="accuracy-")
    done_at_kill = len(unit_parts(killed, "accuracy-"))   # a unit's last table: the unit is whole
    assert done_at_kill == 1
    resumed = subprocess.run(command(killed), capture_output=True, text=True, env=cli_env, timeout=scaled(600))
    assert resumed.returncode == 0, resumed.stderr
    whole = str(tmp_path / "whole")
    assert subprocess.run(command(whole), capture_output=True, env=cli_env, timeout=scaled(600)).returncode == 0
    for table in ("scores", "classification", "accuracy"):
        pd.testing.assert_frame_equal(pd.read_parquet(os.path.join(killed, f"{table}.parquet")),
                                      pd.read_parquet(os.path.join(whole, f"{table}.parquet")))
    sessions = json.load(open(os.path.join(killed, "run.json")))["sessions"]
    assert len(sessions) == 2 and sessions[1]["units_done"] == 2 - done_at_kill   # 120 items: two chunks, none twice
