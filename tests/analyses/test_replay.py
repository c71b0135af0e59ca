"""The routing replay audit (issue 30): flips injected into the model's own routes are
reported exactly and forced exactly; the replayed log-probs equal plain forwards with
hand-written hooks forcing the same routes at every layer; a second Hugging Face run
(`compare_to`) is audited like an engine's; bad routes are one-line errors; the run folder
resumes after SIGKILL; the report has its two figures."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PYTHON, kill_when_parts_land, scaled

import routelens as rl
from routelens.analyses.replay.analysis import compare_routes, monotone_verdict
from routelens.data.engine_routes import EngineRoutes
from routelens.errors import RouteLensError, SettingError

PAIRS = [("Q:12+7=A:", "12+7=19#19"), ("Q:3*4+5=A:", "3*4=12;12+5=17#17"), ("Q:50-17=A:", "50-17=33#33"),
         ("Q:8*9=A:", "8*9=72#72"), ("Q:6+6=A:", "6+6=12#12"), ("Q:40-9=A:", "40-9=31#31")]


@pytest.fixture(scope="module")
def demo():
    lens = rl.load("demo")
    return lens, rl.trajectories_from_text(lens.tokenizer, PAIRS)


@pytest.fixture(scope="module")
def deepseek():
    lens = rl.load("tiny:deepseek_v3")
    rng = np.random.default_rng(0)
    sequences = [rng.integers(3, lens.adapter.config.vocab_size, size=n).tolist() for n in (14, 9, 17)]
    return lens, rl.trajectories_from_ids(sequences, completion_start=[4, 3, 5])


def natural_routes(lens, trajectories) -> EngineRoutes:
    """The model's own routes of every trajectory, captured by plain forwards (source "hf")."""
    experts = {}
    with torch.no_grad():
        for t in trajectories:
            with lens.capture() as routes:
                lens.model(torch.tensor([t.input_ids]), use_cache=False)
            experts[t.id] = np.stack([routes[layer].experts[0].numpy() for layer in lens.moe_layers], axis=1)
    return EngineRoutes(experts, lens.moe_layers, lens.top_k, "hf")


def inject(routes: EngineRoutes, trajectories, lens, count: int, seed: int = 0):
    """`count` known flips at scored positions: one expert of the route swapped for one outside it.
    Returns the new routes and the set of (trajectory_id, position, layer) changed."""
    rng = np.random.default_rng(seed)
    experts = {tid: array.copy() for tid, array in routes.experts.items()}
    injected = set()
    while len(injected) < count:
        t = trajectories[int(rng.integers(len(trajectories)))]
        position = int(rng.choice(list(t.scored_positions)))
        li = int(rng.integers(len(lens.moe_layers)))
        key = (t.id, position, lens.moe_layers[li])
        if key in injected:
            continue
        route = experts[t.id][position, li]
        outside = [e for e in range(lens.num_experts) if e not in route]
        route[int(rng.integers(len(route)))] = int(rng.choice(outside))
        injected.add(key)
    return EngineRoutes(experts, routes.layers, routes.top_k, "injected"), injected


def plain_replay(lens, ids, routes: np.ndarray) -> torch.Tensor:
    """log-softmax [T, V] of one plain forward with hand-written hooks on every router that put
    the given experts (int [T, L, k]; rows of -1 keep the router's own) at every token and
    weigh them by the gating rule on the logits the hook sees."""
    adapter = lens.adapter
    handles = []
    for li, layer in enumerate(lens.moe_layers):
        def hook(module, args, output, li=li):
            logits, weights, experts = adapter.route_of(output)
            wanted = torch.as_tensor(routes[:, li])
            keep = (wanted < 0).all(-1)
            experts = torch.where(keep[:, None], experts, wanted.to(experts.dtype))
            forced = adapter.weights_for(logits.float(), experts).to(weights.dtype)
            weights = torch.where(keep[:, None], weights, forced)
            return adapter.router_output(output, (logits, weights, experts))
        handles.append(adapter.routers[layer].register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = lens.model(torch.tensor([ids]), use_cache=False).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    return torch.log_softmax(logits.double(), -1)


def check_replay(lens, trajectories, count):
    routes, injected = inject(natural_routes(lens, trajectories), trajectories, lens, count)
    result = rl.replay(lens, trajectories, routes, show_progress=False)
    table = result.routes
    flipped = table[table["flipped"]]
    assert set(zip(flipped["trajectory_id"], flipped["position"], flipped["layer"])) == injected
    assert len(table) == sum(len(t.input_ids) for t in trajectories) * len(lens.moe_layers)   # every (token, layer)
    by_layer = result.summary_dict["per_layer"]
    for layer in lens.moe_layers:
        scored = table[(table["layer"] == layer) & table["scored"]]
        assert by_layer[str(layer)]["flips"] == sum(1 for _, _, at in injected if at == layer)
        assert by_layer[str(layer)]["flip_rate"] == pytest.approx(scored["flipped"].mean())
    # every engine route in the table is what was given; the natural one is the model's own
    for row in table.itertuples():
        li = lens.moe_layers.index(row.layer)
        assert row.engine_experts.tolist() == sorted(routes.experts[row.trajectory_id][row.position, li].tolist())
    tokens = result.tokens
    for t in trajectories:
        replayed = plain_replay(lens, t.input_ids, routes.experts[t.id])
        natural = plain_replay(lens, t.input_ids, np.full_like(routes.experts[t.id], -1))
        at = tokens[tokens["trajectory_id"] == t.id]
        targets = torch.tensor([t.input_ids[p + 1] for p in at["position"]])
        positions = torch.tensor(at["position"].to_numpy())
        np.testing.assert_allclose(at["logprob_replayed"], replayed[positions, targets].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(at["logprob_natural"], natural[positions, targets].numpy(), atol=1e-5, rtol=0)
        kl = (natural[positions].exp() * (natural[positions] - replayed[positions])).sum(-1).clamp_min(0)
        np.testing.assert_allclose(at["kl"], kl.numpy(), atol=1e-6, rtol=0)
    # what holds exactly: no flip at or before a token -> it scores as the natural run (causal attention), to
    # float rounding; a flip earlier moves later tokens, so tokens not flipped themselves may move
    clean = tokens[~tokens["flipped_at_or_before"]]
    assert len(clean) and clean["logprob_diff"].abs().max() < 1e-5 and clean["kl"].max() < 1e-6
    moved = tokens[tokens["flipped_at_or_before"] & (tokens["layers_flipped"] == 0)]
    assert (moved["logprob_diff"].abs() > 1e-6).any()      # the flips reach later tokens through attention
    assert tokens["layers_flipped"].sum() == len(injected)
    return result


def test_injected_flips_are_reported_exactly_and_replayed_as_plain_hooks_do(demo):
    lens, trajectories = demo
    result = check_replay(lens, trajectories, count=12)
    checks = result.info["checks"]
    assert checks["gating_rule_max_abs_weight_diff"] < 1e-6
    assert checks["forced_routes_this_session"] == sum(len(t.input_ids) for t in trajectories) * len(lens.moe_layers)


def test_injected_flips_on_deepseek_v3(deepseek):
    lens, trajectories = deepseek
    check_replay(lens, trajectories, count=6)


def test_the_models_own_routes_replay_to_exactly_zero(demo):
    lens, trajectories = demo
    result = rl.replay(lens, trajectories[:2], natural_routes(lens, trajectories[:2]), show_progress=False)
    assert result.summary_dict["overall"]["flips"] == 0
    assert (result.tokens["logprob_diff"] == 0).all() and (result.tokens["kl"] == 0).all()


def test_unreported_routes_are_left_to_the_router(demo):
    """-1 in every slot: the engine did not report that (token, layer); it is not audited and
    routes as the router chooses in the replayed run."""
    lens, trajectories = demo
    routes, injected = inject(natural_routes(lens, trajectories[:2]), trajectories[:2], lens, 4, seed=3)
    tid, position, layer = sorted(injected)[0]
    routes.experts[tid][position, lens.moe_layers.index(layer)] = -1
    result = rl.replay(lens, trajectories[:2], routes, show_progress=False)
    table = result.routes
    assert not ((table["trajectory_id"] == tid) & (table["position"] == position) & (table["layer"] == layer)).any()
    flipped = table[table["flipped"]]
    assert set(zip(flipped["trajectory_id"], flipped["position"], flipped["layer"])) == injected - {(tid, position, layer)}
    t = next(t for t in trajectories if t.id == tid)
    replayed = plain_replay(lens, t.input_ids, routes.experts[tid])
    at = result.tokens[result.tokens["trajectory_id"] == tid]
    targets = torch.tensor([t.input_ids[p + 1] for p in at["position"]])
    np.testing.assert_allclose(at["logprob_replayed"], replayed[torch.tensor(at["position"].to_numpy()), targets].numpy(),
                               atol=1e-5, rtol=0)


def test_compare_to_bfloat16_is_audited_as_an_engines_routes(demo):
    lens, trajectories = demo
    result = rl.replay(lens, trajectories, compare_to="dtype=bfloat16", show_progress=False, bootstrap_resamples=500)
    summary = result.summary_dict
    assert summary["route_source"]["source"] == "hf:dtype=bfloat16"
    # the routes it audited are a bf16 copy's own, as captured independently
    bf16 = rl.wrap(lens.model.__class__.from_pretrained(lens.loaded.folder, dtype=torch.bfloat16))
    independent = natural_routes(bf16, trajectories)
    again = compare_routes(lens.adapter, trajectories, "dtype=bfloat16")
    for t in trajectories:
        np.testing.assert_array_equal(again.experts[t.id], independent.experts[t.id])
    table = result.routes
    for row in table.sample(50, random_state=0).itertuples():
        li = lens.moe_layers.index(row.layer)
        assert row.engine_experts.tolist() == sorted(independent.experts[row.trajectory_id][row.position, li].tolist())
    overall = summary["overall"]
    assert overall["flips"] == int(table[table["scored"]]["flipped"].sum())
    assert 0 <= overall["flip_rate"] <= 1 and summary["margin_curve_verdict"] in (
        "decreasing", "decreasing within intervals", "not monotone")
    curve = summary["margin_curve"]
    assert sum(c["decisions"] for c in curve) == overall["decisions"]
    assert sum(c["flips"] for c in curve) == overall["flips"]
    # a flip needs the bf16 router to reorder the natural run's k-th and (k+1)-th experts: it sits at a small margin
    if overall["flips"]:
        assert summary["flipped_margin_median"] < summary["unflipped_margin_median"]
    # lens is float32 on CPU: the natural run is untouched by the comparison
    assert next(lens.model.parameters()).dtype == torch.float32


def test_compare_to_batch_and_experts_implementation_run(demo):
    lens, trajectories = demo
    for spec in ("batch=3", "experts-implementation=eager"):
        result = rl.replay(lens, trajectories[:3], compare_to=spec, show_progress=False, bootstrap_resamples=200)
        assert result.summary_dict["route_source"]["source"] == f"hf:{spec}"
        assert len(result.tokens) == sum(len(t.scored_positions) for t in trajectories[:3])


@pytest.mark.quick
def test_monotone_verdict():
    assert monotone_verdict([0.3, 0.1, 0.0], [[0.2, 0.4], [0.0, 0.2], [0.0, 0.0]]) == "decreasing"
    assert monotone_verdict([0.3, 0.1, 0.15], [[0.2, 0.4], [0.05, 0.2], [0.1, 0.2]]) == "decreasing within intervals"
    assert monotone_verdict([0.1, 0.5], [[0.05, 0.15], [0.4, 0.6]]) == "not monotone"


def test_bad_routes_are_one_line_errors(deepseek):
    lens, trajectories = deepseek
    good = natural_routes(lens, trajectories)
    layers, k = lens.moe_layers, lens.top_k

    def variant(**changes):
        fields = {"experts": {tid: a.copy() for tid, a in good.experts.items()}, "layers": list(layers), "top_k": k,
                  "source": "test"}
        fields.update(changes)
        return EngineRoutes(**fields)

    first = trajectories[0]
    cases = {
        "not among": variant(experts={**good.experts, "nope": good.experts[first.id]}),
        "must be distinct MoE layers": variant(experts={tid: a[:, :1] for tid, a in good.experts.items()},
                                               layers=[0] if 0 not in layers else [max(layers) + 1]),
        "cover": variant(experts={first.id: good.experts[first.id][:-1]}),
    }
    out_of_range = variant()
    out_of_range.experts[first.id][2, 0, 0] = lens.num_experts
    cases["expert id"] = out_of_range
    partial = variant()
    partial.experts[first.id][2, 0, 0] = -1
    cases["some -1"] = partial
    twice = variant()
    twice.experts[first.id][2, 0, 1] = twice.experts[first.id][2, 0, 0]
    cases["twice"] = twice
    for words, routes in cases.items():
        with pytest.raises(RouteLensError, match=words) as error:
            rl.replay(lens, trajectories, routes, show_progress=False)
        assert "\n" not in str(error.value)
    with pytest.raises(RouteLensError, match="k=1 experts per token"):
        rl.replay(lens, trajectories, variant(experts={tid: a[..., :1] for tid, a in good.experts.items()}, top_k=1),
                  show_progress=False)
    with pytest.raises(RouteLensError, match="expected"):   # the shape is checked where routes are made
        EngineRoutes({first.id: good.experts[first.id][..., :1]}, list(layers), k, "test")
    with pytest.raises(SettingError, match="one of them"):
        rl.replay(lens, trajectories, good, compare_to="batch=2", show_progress=False)
    with pytest.raises(SettingError, match="compare_to"):
        rl.replay(lens, trajectories, compare_to="dtype=int8", show_progress=False)


def test_run_folder_resumes_after_sigkill_and_reports(demo, tmp_path, cli_env):
    lens, trajectories = demo
    path = str(tmp_path / "traj.jsonl")
    many = rl.trajectories_from_text(lens.tokenizer, PAIRS * 4, ids=[f"t{i}" for i in range(len(PAIRS) * 4)])
    with open(path, "w") as handle:
        for t in many:
            handle.write(json.dumps({"id": t.id, "input_ids": t.input_ids, "completion_start": t.completion_start}) + "\n")
    command = [PYTHON, "-m", "routelens", "replay", "--model", "demo", "--trajectories", path, "--compare-to",
               "batch=6", "--bootstrap-resamples", "200", "--no-progress", "--out"]

    def run(out):
        return subprocess.Popen(command + [out], env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    killed = str(tmp_path / "killed")
    kill_when_parts_land(run(killed), killed, 3)
    assert json.load(open(os.path.join(killed, "run.json")))["status"] == "running"
    resumed = run(killed)
    stdout, stderr = resumed.communicate(timeout=scaled(300))
    assert resumed.returncode == 0, stderr.decode()
    assert b"flip risk" in stdout
    whole = str(tmp_path / "whole")
    assert run(whole).wait(timeout=scaled(300)) == 0
    for table in ("routes", "tokens"):
        a = pd.read_parquet(os.path.join(killed, f"{table}.parquet"))
        b = pd.read_parquet(os.path.join(whole, f"{table}.parquet"))
        pd.testing.assert_frame_equal(a, b)
    assert len(b) == sum(len(t.scored_positions) for t in many)
    state = json.load(open(os.path.join(killed, "run.json")))
    assert state["status"] == "complete" and len(state["sessions"]) == 2
    assert 0 < state["sessions"][1]["units_done"] < len(many)
    assert state["config"]["route_source"]["source"] == "hf:batch=6"
    result = rl.read_run(killed)
    assert result.kind == "replay" and result.summary["layer"].tolist() == [*map(str, lens.moe_layers), "all"]
    report = result.report()
    assert os.path.isfile(report)
    figures = sorted(os.listdir(os.path.join(killed, "figures")))
    assert figures == ["replay_flip_rate_by_layer.png", "replay_flip_rate_by_layer.svg",
                       "replay_flip_risk_vs_margin.png", "replay_flip_risk_vs_margin.svg"]
    bad = subprocess.run(command[:-1] + ["--compare-to", "dtype=int8", "--out", str(tmp_path / "bad")], env=cli_env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--compare-to" in bad.stderr


def test_routes_from_an_sglang_file_on_the_command_line_with_export(demo, tmp_path, cli_env):
    """`routelens replay --routes-from` reads SGLang records (base64 int32 over every token but
    the last, as SGLang returns them) with two injected flips, reports exactly those flips,
    and `--export` writes the routes read, which read back equal."""
    import base64

    from routelens.data.engine_routes_io import read_routes

    lens, trajectories = demo
    chosen = trajectories[:2]
    routes, injected = inject(natural_routes(lens, chosen), chosen, lens, 2, seed=5)
    path, records = str(tmp_path / "traj.jsonl"), str(tmp_path / "sglang.jsonl")
    with open(path, "w") as handle, open(records, "w") as sglang:
        for t in chosen:
            handle.write(json.dumps({"id": t.id, "input_ids": t.input_ids, "completion_start": t.completion_start}) + "\n")
            rows = routes.experts[t.id][:-1].astype("<i4")   # SGLang: every token but the last
            sglang.write(json.dumps({"id": t.id, "meta_info": {
                "routed_experts": base64.b64encode(rows.tobytes()).decode("ascii")}}) + "\n")
    out, export = str(tmp_path / "run"), str(tmp_path / "routes.npz")
    command = [PYTHON, "-m", "routelens", "replay", "--model", "demo", "--trajectories", path, "--routes-from", records,
               "--routes-format", "sglang", "--export", export, "--bootstrap-resamples", "100", "--no-progress",
               "--out", out]
    done = subprocess.run(command, env=cli_env, capture_output=True, text=True, timeout=scaled(300))
    assert done.returncode == 0, done.stderr
    table = pd.read_parquet(os.path.join(out, "routes.parquet"))
    flipped = table[table["flipped"]]
    assert set(zip(flipped["trajectory_id"], flipped["position"], flipped["layer"])) == injected
    exported = read_routes(export, lens, chosen, format="npz-export")
    for t in chosen:   # the last token's route is not in SGLang's output: -1 there, the rest as given
        np.testing.assert_array_equal(exported.experts[t.id][:-1], routes.experts[t.id][:-1])
        assert (exported.experts[t.id][-1] == -1).all()
    again = subprocess.run(command[:-1] + [str(tmp_path / "run2")], env=cli_env, capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--export" in again.stderr   # not overwritten
