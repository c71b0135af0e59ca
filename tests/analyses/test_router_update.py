"""Router-only update and pass@k: Plackett-Luce against brute force, only the router
changes (hashes), the delta round-trips and refuses another base model, sampling in pieces
equals one call, and the commands end to end on the embedded model."""

import itertools
import json
import os
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAMILIES, PYTHON, kill_when_parts_land, scaled, unit_parts, write_jsonl
from scipy import stats as sps

from routelens import stats
from routelens.analyses.router_update.analysis import (
    parameter_hashes,
    plackett_luce_set_log_prob,
    route_log_weights,
)
from routelens.cli import main
from routelens.demo_model import is_available
from routelens.errors import RouteLensError
from routelens.models.loading import load_model
from routelens.models.router_delta import apply_router_delta, router_parameter_names, save_router_delta
from routelens.models.routing import capture_routes


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_plackett_luce_set_probability_equals_the_sum_over_orderings(k):
    generator = torch.Generator().manual_seed(k)
    log_weights = torch.log_softmax(3 * torch.randn(6, 10, generator=generator, dtype=torch.float64), -1)
    experts = torch.stack([torch.randperm(10, generator=generator)[:k] for _ in range(6)])
    got = plackett_luce_set_log_prob(log_weights, experts).exp()
    expected = [plackett_luce_brute_force(log_weights[i].exp().numpy(), experts[i].tolist()) for i in range(6)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=0)
    # a probability over sets: the k-subsets of 10 experts sum to 1; the order inside a set is irrelevant
    subsets = torch.tensor(list(itertools.combinations(range(10), k)))
    total = plackett_luce_set_log_prob(log_weights[:1].expand(len(subsets), -1), subsets).exp().sum()
    assert float(total) == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(plackett_luce_set_log_prob(log_weights, experts.flip(-1)), got.log())



def plackett_luce_brute_force(weights: np.ndarray, experts: list[int]) -> float:
    """The probability of an expert set by summing the sequential probability of every order."""
    total = 0.0
    for order in itertools.permutations(experts):
        probability, left = 1.0, 1.0
        for expert in order:
            probability *= weights[expert] / left
            left -= weights[expert]
        total += probability
    return total

def test_plackett_luce_is_differentiable_and_stable_for_tiny_probabilities():
    logits = torch.tensor([[30.0, 0.0, -30.0, -30.0, 5.0]], dtype=torch.float64, requires_grad=True)
    value = plackett_luce_set_log_prob(torch.log_softmax(logits, -1), torch.tensor([[2, 3]]))
    assert torch.isfinite(value).all() and float(value.detach()) < -100      # exp underflows; the log does not
    value.sum().backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad[0, 2]) > 0


def test_sigmoid_router_draws_from_its_normalised_selection_scores(tiny_adapters):
    adapter = tiny_adapters["deepseek_v3"]
    layer = adapter.moe_layers[-1]
    logits = torch.randn(4, adapter.num_experts)
    log_weights = route_log_weights(adapter, logits, layer)
    # over all experts: the group mask constrains sampling, not the smooth distribution DPO trains
    scores = adapter.selection_scores(logits, layer, admitted_only=False).double()
    torch.testing.assert_close(log_weights.exp(), scores / scores.sum(-1, keepdim=True))
    assert (adapter.selection_scores(logits, layer) == 0).sum() > 0      # sampling sees the mask


def test_router_delta_round_trips_and_refuses_another_base(tmp_path):
    from routelens.models import adapter_for
    from routelens.models.tiny import build_tiny_model

    adapter = adapter_for(build_tiny_model("gpt_oss", seed=0))          # a router with a bias
    layer = adapter.moe_layers[-1]
    names = router_parameter_names(adapter, layer)
    assert sorted(n.rsplit(".", 1)[1] for n in names) == ["bias", "weight"]
    base = {n: p.detach().clone() for n, p in names.items()}
    before = parameter_hashes(adapter.model)
    with torch.no_grad():
        for p in names.values():
            p.add_(0.25)
    path = str(tmp_path / "delta.safetensors")
    save_router_delta(path, adapter, layer, base, "tiny:gpt_oss")
    updated = {n: p.detach().clone() for n, p in names.items()}

    fresh = adapter_for(build_tiny_model("gpt_oss", seed=0))
    record = apply_router_delta(fresh, path)
    assert record["layer"] == layer and len(record["sha256"]) == 64
    for name, parameter in router_parameter_names(fresh, layer).items():
        assert torch.equal(parameter, updated[name])
    after = parameter_hashes(fresh.model)
    assert sorted(n for n in before if before[n] != after[n]) == sorted(names)

    with pytest.raises(RouteLensError, match="made for another base model"):
        apply_router_delta(adapter_for(build_tiny_model("gpt_oss", seed=1)), path)   # same config, other weights
    with pytest.raises(RouteLensError, match="made for another model"):
        apply_router_delta(adapter_for(build_tiny_model("olmoe", seed=0)), path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(RouteLensError, match="not a safetensors router delta"):
        apply_router_delta(fresh, str(bad))


def test_sampling_in_pieces_with_offsets_equals_one_call():
    from routelens.generation import sample_completions

    loaded = load_model("tiny:olmoe", "cpu", "float32")
    from conftest import ALPHABET

    from routelens.data.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer(ALPHABET)
    prompts = [[1, 5 + i, 6] for i in range(5)]
    whole = sample_completions(loaded.adapter.model, tokenizer, prompts, 3, 1.0, max_new_tokens=6, seed=4,
                               show_progress=False)
    pieces = (sample_completions(loaded.adapter.model, tokenizer, prompts[:2], 3, 1.0, max_new_tokens=6, seed=4,
                                 show_progress=False)
              + sample_completions(loaded.adapter.model, tokenizer, prompts[2:], 3, 1.0, max_new_tokens=6, seed=4,
                                   show_progress=False, index_offset=2))
    assert [s.completion_ids for s in whole] == [s.completion_ids for s in pieces]


# ---------------------------------------------------------------------------- end to end
pytestmark_demo = pytest.mark.skipif(not is_available(), reason="embedded weights not built in this checkout")


@pytest.fixture(scope="module")
def demo_update(tmp_path_factory):
    """A counterfactual run at the last layer, and a router update from it, on the demo model."""
    root = tmp_path_factory.mktemp("update")
    trajectories = str(root / "traj.jsonl")
    assert main(["trajectories", "--model", "demo", "--n", "24", "--samples-per-problem", "2", "--seed", "1",
                 "--out", trajectories, "--no-progress"]) == 0
    assert main(["counterfactual", "--model", "demo", "--trajectories", trajectories, "--only-verified",
                 "--layers", "-1", "--routes", "8", "--out", str(root / "cf"), "--no-progress"]) == 0
    assert main(["router-update", "--model", "demo", "--counterfactual", str(root / "cf"),
                 "--heldout-counterfactual", str(root / "cf"), "--margin", "0.0",
                 "--bins", "Fragile,Ambiguous,Confident", "--steps", "30", "--lr", "0.01",
                 "--out", str(root / "update"), "--no-progress"]) == 0
    return root


@pytestmark_demo
def test_router_update_changes_only_the_last_router(demo_update):
    summary = json.load(open(demo_update / "update" / "summary.json"))
    assert summary["only_router_changed"] and summary["parameters_changed"] == ["model.layers.3.mlp.gate.weight"]
    assert summary["preference_accuracy_after"] > summary["preference_accuracy_before"]
    assert summary["loss_last_step"] < summary["loss_first_step"]
    pairs = pd.read_parquet(demo_update / "update" / "pairs.parquet")
    tokens = pd.read_parquet(demo_update / "cf" / "tokens.parquet")
    assert len(pairs) == summary["pairs"] > 0
    assert (pairs["p_preferred"] - pairs["p_rejected"] >= 0).all()
    assert set(zip(pairs["trajectory_id"], pairs["position"])) <= set(zip(tokens["trajectory_id"], tokens["position"]))
    changes = summary["heldout_route_changes"]
    assert changes["All"]["tokens"] == len(tokens)
    steps = [json.loads(line) for line in open(demo_update / "update" / "training_log.jsonl")]
    assert len(steps) == 30 and steps[-1]["loss"] == summary["loss_last_step"]

    # the delta on a fresh load: every tensor but that router equals the base model's, bit for bit
    base = load_model("demo", "cpu", "float32")
    updated = load_model("demo", "cpu", "float32", router_delta=str(demo_update / "update" / "router_delta.safetensors"))
    before, after = parameter_hashes(base.adapter.model), parameter_hashes(updated.adapter.model)
    assert [n for n in before if before[n] != after[n]] == ["model.layers.3.mlp.gate.weight"]
    assert updated.identity()["router_delta"]["sha256"] == updated.router_delta["sha256"]
    # a Ray driver's load (no weights) accepts the delta and names it as the full load does, so
    # a run begun on Ray resumes in one process and vice versa
    driver = load_model("demo", "cpu", "float32", router_delta=str(demo_update / "update" / "router_delta.safetensors"),
                        weights=False)
    assert not driver.weights and driver.identity() == updated.identity()


@pytestmark_demo
def test_passk_compare_base_and_updated(demo_update, tmp_path, capsys):
    delta = str(demo_update / "update" / "router_delta.safetensors")
    out = str(tmp_path / "passk")
    args = ["passk", "--model", "demo", "--router-delta", delta, "--compare", "--task", "arithmetic", "--n", "12",
            "--samples", "4", "--k", "1,2,4", "--bootstrap-resamples", "300", "--out", out, "--no-progress"]
    assert main(args) == 0
    assert "updated - base" in capsys.readouterr().out
    samples = pd.read_parquet(os.path.join(out, "samples.parquet"))
    problems = pd.read_parquet(os.path.join(out, "problems.parquet"))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert len(samples) == 2 * 12 * 4 and not samples.duplicated(["arm", "problem_id", "sample"]).any()
    for _, row in problems.iterrows():
        assert row["pass@2"] == pytest.approx(stats.pass_at_k(4, int(row["c"]), 2))
    for arm in ("base", "updated"):
        at = problems[problems["arm"] == arm]
        assert summary["all"][arm]["pass@1"]["mean"] == pytest.approx(at["pass@1"].mean())
        assert summary["all"][arm]["pass@1"]["mean"] == pytest.approx(samples[samples["arm"] == arm]["correct"].mean())
    base = problems[problems["arm"] == "base"].set_index("problem_id")
    updated = problems[problems["arm"] == "updated"].set_index("problem_id").reindex(base.index)
    for k in (1, 4):
        diff = (updated[f"pass@{k}"] - base[f"pass@{k}"]).to_numpy()
        assert summary["all"]["difference"][f"pass@{k}"]["mean"] == pytest.approx(diff.mean())
    # the paired interval against SciPy's, at pass@1, where a delta that changes the samples at all
    # (lr 0.01 over 30 steps does) makes the per-problem differences vary
    diff = (updated["pass@1"] - base["pass@1"]).to_numpy()
    assert np.ptp(diff) > 0, "the router delta changed no problem's pass@1: the paired interval tests nothing"
    ci = sps.bootstrap((diff,), np.mean, n_resamples=300, method="percentile", batch=100,
                       rng=np.random.default_rng(0)).confidence_interval
    assert summary["all"]["difference"]["pass@1"]["ci"] == pytest.approx([ci.low, ci.high])
    # the base arm is the plain model: the same samples as a run without any delta
    plain = str(tmp_path / "plain")
    assert main(["passk", "--model", "demo", "--task", "arithmetic", "--n", "12", "--samples", "4", "--k", "1,2,4",
                 "--bootstrap-resamples", "300", "--out", plain, "--no-progress"]) == 0
    plain_samples = pd.read_parquet(os.path.join(plain, "samples.parquet"))
    assert plain_samples["completion"].tolist() == samples[samples["arm"] == "base"]["completion"].tolist()


@pytest.mark.parametrize("case, message", [
    ("k_gt_samples", "--k 8 must lie in 1..--samples (4)"),
    ("compare_without_delta", "--compare needs --router-delta"),
    ("not_a_run", "is not a run folder"),
    ("bad_delta", "router delta"),
    ("no_problems", "give --problems FILE"),
])
def test_router_update_and_passk_bad_input_one_line_exit_2(case, message, tmp_path, capsys):
    delta = write_jsonl(tmp_path / "delta.safetensors", [{"x": 1}])
    (tmp_path / "d").mkdir()   # a folder, not a run
    args = {
        "k_gt_samples": ["passk", "--model", "tiny:olmoe", "--task", "arithmetic", "--n", "2", "--samples", "4", "--k", "1,8",
                         "--out", str(tmp_path / "p")],
        "no_problems": ["passk", "--model", "tiny:olmoe", "--out", str(tmp_path / "p")],
        "compare_without_delta": ["passk", "--model", "tiny:olmoe", "--compare", "--out", str(tmp_path / "p")],
        "not_a_run": ["router-update", "--model", "tiny:olmoe", "--counterfactual", str(tmp_path / "d"), "--out",
                      str(tmp_path / "u")],
        "bad_delta": ["inspect", "--model", "tiny:olmoe", "--router-delta", delta],
    }[case]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@pytestmark_demo
def test_passk_resumes_after_an_interruption_without_loss_or_duplicates(demo_update, tmp_path, monkeypatch):
    from routelens import generation

    delta = str(demo_update / "update" / "router_delta.safetensors")
    args = lambda out: ["passk", "--model", "demo", "--router-delta", delta, "--compare", "--task", "arithmetic",  # noqa: E731
                        "--n", "6", "--samples", "3", "--k", "1,3", "--bootstrap-resamples", "100",
                        "--out", out, "--no-progress"]
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    assert main(args(whole)) == 0
    real, calls = generation.sample_completions, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:          # the base arm is written; the updated arm is cut off
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(generation, "sample_completions", interrupted)
    assert main(args(cut)) == 130
    assert json.load(open(os.path.join(cut, "run.json")))["status"] == "running"
    monkeypatch.setattr(generation, "sample_completions", real)
    assert main(args(cut)) == 0
    assert json.load(open(os.path.join(cut, "run.json")))["timings"]["units_this_session"] == 1
    pd.testing.assert_frame_equal(pd.read_parquet(os.path.join(cut, "samples.parquet")),
                                  pd.read_parquet(os.path.join(whole, "samples.parquet")))
    assert json.load(open(os.path.join(cut, "summary.json")))["all"] == json.load(open(os.path.join(whole, "summary.json")))["all"]


def test_router_update_offers_no_ray(tmp_path, capsys):
    """Training is sequential: router-update has no --ray (refused in one line, exit 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(["router-update", "--model", "tiny:olmoe", "--counterfactual", str(tmp_path), "--out", str(tmp_path / "u"),
              "--ray", "local"])
    assert exit_.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "unrecognized arguments: --ray local" in line and not os.path.exists(tmp_path / "u")


UPDATE_SCRIPT = """
import sys, time
from routelens.analyses.router_update import analysis as router_update
from routelens.cli import main
original = router_update.RouterUpdateJob.run
def slow(self, units):
    time.sleep(0.3)          # a unit takes a while: the kill lands mid-training
    return original(self, units)
router_update.RouterUpdateJob.run = slow
sys.exit(main(sys.argv[1:]))
"""


def _delta_contents(path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


@pytestmark_demo
def test_router_update_killed_mid_training_resumes_to_the_uninterrupted_result(demo_update, tmp_path, cli_env):
    """SIGKILL mid-training, the same command again: the delta, the training log and the
    summary equal an uninterrupted run's, and the second session trained only the units left
    (each unit checkpoints the fp32 masters, Adam's state and the minibatch generator)."""
    from routelens.analyses.router_update.analysis import STEPS_PER_UNIT

    steps = 6 * STEPS_PER_UNIT
    cli_env["OMP_NUM_THREADS"] = "1"   # the same threads in every process: the same float noise

    def command(out):
        return [PYTHON, "-c", UPDATE_SCRIPT, "router-update", "--model", "demo", "--counterfactual",
                str(demo_update / "cf"), "--heldout-counterfactual", str(demo_update / "cf"), "--margin", "0.0",
                "--bins", "Fragile,Ambiguous,Confident", "--steps", str(steps), "--lr", "0.01", "--out", str(out),
                "--no-progress"]

    killed, whole = tmp_path / "killed", tmp_path / "whole"
    kill_when_parts_land(subprocess.Popen(command(killed), env=cli_env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL), str(killed), 2, prefix="checkpoint-")
    done_at_kill = len(unit_parts(str(killed), "checkpoint-"))   # the checkpoint is a unit's last part
    assert 2 <= done_at_kill < 6 and not (killed / "summary.json").exists()
    for out in (killed, whole):
        finished = subprocess.run(command(out), env=cli_env, capture_output=True, text=True, timeout=scaled(300))
        assert finished.returncode == 0, finished.stderr

    assert (killed / "training_log.jsonl").read_bytes() == (whole / "training_log.jsonl").read_bytes()
    log = pd.read_parquet(killed / "training_log.parquet")
    assert log["step"].tolist() == list(range(1, steps + 1))             # nothing lost, nothing twice
    pd.testing.assert_frame_equal(log, pd.read_parquet(whole / "training_log.parquet"), check_exact=True)
    # the same tensors and metadata; the file bytes differ, as between any two processes,
    # because safetensors writes its metadata map in hash order
    (got, got_meta), (want, want_meta) = _delta_contents(killed / "router_delta.safetensors"), \
        _delta_contents(whole / "router_delta.safetensors")
    assert got_meta == want_meta and set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    summaries = [json.load(open(out / "summary.json")) for out in (killed, whole)]
    assert summaries[0].pop("router_delta") == str(killed / "router_delta.safetensors")
    summaries[1].pop("router_delta")
    assert summaries[0] == summaries[1] and summaries[0]["loss_last_step"] < summaries[0]["loss_first_step"]
    state = json.load(open(killed / "run.json"))
    assert state["status"] == "complete" and len(state["sessions"]) == 2
    assert state["sessions"][1]["units_done"] == state["timings"]["units_this_session"] == 6 - done_at_kill


@pytestmark_demo
def test_report_of_a_router_update(demo_update, capsys):
    import re

    assert main(["report", str(demo_update / "update")]) == 0
    page = open(demo_update / "update" / "report.html", encoding="utf-8").read()
    summary = json.load(open(demo_update / "update" / "summary.json"))
    rows = dict((b, (int(t), int(c))) for b, t, c in
                re.findall(r"<tr><td>(\w+)</td><td>(\d+)</td><td>(\d+)</td>", page.split('id="update-changes"')[1]))
    for name in ("Fragile", "Ambiguous", "Confident", "All"):
        expected = summary["heldout_route_changes"][name]
        assert rows[name] == (expected["tokens"], expected["route_changed"])
    assert (demo_update / "update" / "figures" / "update_training.svg").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_on_routes_trains_every_family_router(family, tiny_adapters, tmp_path):
    from routelens.analyses.router_update.analysis import RouterUpdateConfig, preference_accuracy, router_inputs, train_router
    from routelens.models.routing import capture_routes

    adapter = tiny_adapters[family]
    layer = adapter.moe_layers[-1]
    ids = torch.randint(4, adapter.config.vocab_size, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    inputs, rank = router_inputs(adapter, layer, {"s": ids}, {"s": list(range(24))})
    x = torch.stack([inputs[("s", p)] for p in range(24)])
    with torch.no_grad(), capture_routes(adapter, [layer]) as captured:
        adapter.model(torch.tensor([ids]), use_cache=False)
    rejected = captured[layer].experts.reshape(24, -1).sort(-1).values               # the standard routes
    generator = torch.Generator().manual_seed(1)
    # preferred routes the router could produce (as sampled alternatives are): experts it admits for the token,
    # which excludes the groups a group-limited router masks out
    admitted = adapter.selection_scores(captured[layer].logits.reshape(24, -1), layer) > 0
    preferred = torch.stack([
        (lambda allowed: allowed[torch.randperm(len(allowed), generator=generator)[: adapter.top_k]].sort().values)(
            admitted[t].nonzero()[:, 0].cpu()) for t in range(24)])
    keep = (preferred != rejected).any(-1)
    before = {n: p.detach().clone() for n, p in adapter.routers[layer].named_parameters()}
    log = str(tmp_path / "log.jsonl")
    new = train_router(adapter, layer, x[keep], rank, preferred[keep], rejected[keep],
                       RouterUpdateConfig(lr=0.05, steps=20, beta=1.0), log, show_progress=False)
    steps = [json.loads(line) for line in open(log)]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert set(new) == set(before) and any(not torch.equal(new[n], before[n].float()) for n in new)
    for name, parameter in adapter.routers[layer].named_parameters():   # training leaves the model itself alone
        assert torch.equal(parameter, before[name])
    with torch.no_grad():
        for name, parameter in adapter.routers[layer].named_parameters():
            parameter.copy_(new[name])
    try:
        assert preference_accuracy(adapter, layer, x[keep], rank, preferred[keep], rejected[keep]) > 0
    finally:
        with torch.no_grad():
            for name, parameter in adapter.routers[layer].named_parameters():
                parameter.copy_(before[name])


@pytestmark_demo
def test_the_changed_held_out_routes_are_scored_as_forced_and_summarised_by_their_definition(demo_update):
    """The update checked on its own claim: heldout_changes.parquet holds exactly the
    tokens whose route differs under the updated router; each row's p under the old and the
    new route equals a plain forward with that route forced at that token and layer
    (`Lens.force`), the new route is the updated router's top-k with the gating rule's
    weights, and the summary's gain, counts and sign test are recomputed per bin by plain
    loops."""
    from scipy.stats import binomtest

    import routelens as rl

    summary = json.load(open(demo_update / "update" / "summary.json"))
    changes = summary["heldout_route_changes"]
    frame = pd.read_parquet(demo_update / "update" / "heldout_changes.parquet")
    assert len(frame) == changes["All"]["route_changed"] > 0 and changes["same_run_as_training"] is True
    base = rl.load("demo")
    trajectories = {t.id: t for t in rl.read_trajectories(str(demo_update / "traj.jsonl"), base)}
    updated = rl.load("demo", router_delta=str(demo_update / "update" / "router_delta.safetensors"))
    layer = summary["layer"]
    # which routes changed, recounted from the updated model's own forwards over every held-out token
    standard = pd.read_parquet(demo_update / "cf" / "routes.parquet")
    standard = standard[(standard["route"] == 0) & (standard["layer"] == layer)]
    recount = set()
    for tid, rows in standard.groupby("trajectory_id"):
        with torch.no_grad(), capture_routes(updated.adapter, [layer]) as captured:
            updated.model(torch.tensor([trajectories[tid].input_ids]))
        for position, experts in zip(rows["position"], rows["experts"]):
            if sorted(captured[layer].experts[int(position)].tolist()) != sorted(experts):
                recount.add((tid, int(position)))
    assert set(zip(frame["trajectory_id"], frame["position"].astype(int))) == recount
    assert all(list(a) != list(b) for a, b in zip(frame["old_experts"], frame["new_experts"]))
    for _, row in frame.sample(min(6, len(frame)), random_state=0).iterrows():
        ids = torch.tensor([trajectories[row["trajectory_id"]].input_ids])
        position, target = int(row["position"]), int(ids[0, int(row["position"]) + 1])
        with torch.no_grad(), capture_routes(updated.adapter, [layer]) as captured:
            updated.model(ids)
        assert sorted(captured[layer].experts[position].tolist()) == list(row["new_experts"])
        for experts, weights, p in ((row["old_experts"], row["old_weights"], row["p_old"]),
                                    (row["new_experts"], row["new_weights"], row["p_new"])):
            with base.force(layer, [(0, position)], [list(experts)], [list(weights)]), torch.no_grad():
                logits = base.model(ids).logits[0, position].double()
            assert float(torch.softmax(logits, -1)[target]) == pytest.approx(p, abs=1e-5)
    tolerance = changes["win_tolerance"]
    for name in ("Fragile", "Ambiguous", "Confident", "All"):
        at = frame if name == "All" else frame[frame["bin"] == name]
        block = changes[name]
        gains = [new - old for new, old in zip(at["p_new"], at["p_old"])]
        assert block["route_changed"] == len(at)
        if not gains:
            assert block["changed_gain"] is None
            continue
        assert block["changed_gain"] == pytest.approx(np.mean(gains), abs=1e-12)
        improved, worsened = sum(g > tolerance for g in gains), sum(g < -tolerance for g in gains)
        assert (block["improved"], block["worsened"], block["tied"]) == (improved, worsened, len(gains) - improved - worsened)
        per_cluster = {}
        clusters = at["problem_id"] if changes["cluster_unit"] == "problems" else at["trajectory_id"]
        for cluster, g in zip(clusters, gains):
            per_cluster.setdefault(cluster, []).append(1 if g > tolerance else -1 if g < -tolerance else 0)
        means = [np.mean(v) for v in per_cluster.values()]
        ahead, behind = sum(m > 0 for m in means), sum(m < 0 for m in means)
        if ahead + behind:
            assert block["sign_test"]["p_value"] == pytest.approx(binomtest(ahead, ahead + behind).pvalue)
