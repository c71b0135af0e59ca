"""Expert grafting: exactly the mapped expert tensors change (hash check against the saved
folder read back by transformers), every refusal is a one-line error, and the evaluation
equals computations made another way (the donor expert forced in the recipient, the saved
folder's own forward, SciPy's test)."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import PYTHON, scaled
from scipy import stats as sp
from transformers import AutoModelForCausalLM

import routelens as rl
from routelens.analyses.graft.grafting import parse_expert_map, tensor_sha256
from routelens.errors import RouteLensError
from routelens.models.tiny import build_tiny_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("graft")
    made = {}
    for name, family, seed, overrides in (("recipient", "olmoe", 0, {}), ("donor", "olmoe", 5, {}),
                                          ("narrow", "olmoe", 1, {"intermediate_size": 40}),
                                          ("qwen", "qwen3_moe", 0, {})):
        build_tiny_model(family, seed=seed, **overrides).save_pretrained(root / name)
        made[name] = str(root / name)
    made["root"] = root
    return made


def _expert_slices(model, layer, expert):
    experts = model.model.layers[layer].mlp.experts
    return {f"model.layers.{layer}.mlp.experts.{name}": p.detach()[expert] for name, p in experts.named_parameters()}


def test_graft_changes_exactly_the_mapped_expert_tensors(folders):
    out = str(folders["root"] / "grafted")
    result = rl.graft(folders["recipient"], folders["donor"], "0:1=1:3,2:0=2:5", out)
    recipient = AutoModelForCausalLM.from_pretrained(folders["recipient"])
    donor = AutoModelForCausalLM.from_pretrained(folders["donor"])
    grafted = AutoModelForCausalLM.from_pretrained(out)          # a normal Hugging Face folder
    before, after = recipient.state_dict(), grafted.state_dict()
    assert before.keys() == after.keys()
    mapped = {(0, 1): (1, 3), (2, 0): (2, 5)}
    changed_parameters = set()
    for name in before:
        if torch.equal(before[name], after[name]):
            continue
        changed_parameters.add(name)
        for index in range(before[name].shape[0]):
            layer = int(name.split(".")[2])
            if (layer, index) in mapped:
                donor_layer, donor_expert = mapped[(layer, index)]
                donor_name = name.replace(f"layers.{layer}.", f"layers.{donor_layer}.")
                assert torch.equal(after[name][index], donor.state_dict()[donor_name][donor_expert])
            else:
                assert torch.equal(after[name][index], before[name][index]), (name, index)
    assert changed_parameters == {f"model.layers.{layer}.mlp.experts.{p}" for layer in (0, 2)
                                  for p in ("gate_up_proj", "down_proj")}
    record = json.load(open(os.path.join(out, "graft.json")))
    assert record == result.record and record["family"] == "olmoe"
    for pair in record["pairs"]:
        donor_slices = _expert_slices(donor, pair["donor_layer"], pair["donor_expert"])
        replaced = _expert_slices(recipient, pair["layer"], pair["expert"])
        for name, hashes in pair["tensors"].items():
            donor_name = name.replace(f"layers.{pair['layer']}.", f"layers.{pair['donor_layer']}.")
            assert hashes["donor_sha256"] == tensor_sha256(donor_slices[donor_name])
            assert hashes["replaced_sha256"] == tensor_sha256(replaced[name])
    assert rl.load(out).family == "olmoe"


def test_graft_takes_lens_objects_as_it_takes_specs(folders, tmp_path):
    """Lens objects graft exactly as their specs do (same tensors, same record) and the
    recipient Lens is left as it came; a Lens in another dtype is refused."""
    recipient, donor = rl.load(folders["recipient"]), rl.load(folders["donor"])
    before = {name: tensor.clone() for name, tensor in recipient.model.state_dict().items()}
    from_lens = rl.graft(recipient, donor, "0:1=1:3", str(tmp_path / "lens"))
    from_specs = rl.graft(folders["recipient"], folders["donor"], "0:1=1:3", str(tmp_path / "specs"))
    assert from_lens.record == from_specs.record
    lens_model = AutoModelForCausalLM.from_pretrained(tmp_path / "lens").state_dict()
    spec_model = AutoModelForCausalLM.from_pretrained(tmp_path / "specs").state_dict()
    assert all(torch.equal(lens_model[name], spec_model[name]) for name in spec_model)
    assert all(torch.equal(before[name], tensor) for name, tensor in recipient.model.state_dict().items())
    with pytest.raises(RouteLensError, match=r"the recipient Lens \(.*\) is float32; grafting in `dtype` bfloat16"):
        rl.graft(recipient, donor, "0:1=1:3", str(tmp_path / "bf16"), dtype="bfloat16")


@pytest.mark.parametrize("donor, experts, message", [
    ("narrow", "0:1=0:1", "only experts of one shape can be grafted"),
    ("qwen", "0:1=0:1", "the donor is a qwen3_moe model and the recipient a olmoe model"),
    ("donor", "0:9=0:1", "recipient expert 9 at layer 0 does not exist"),
    ("donor", "0:1=7:1", "layer 7 is out of range"),
    ("donor", "0:1=0:1,0:1=1:2", "recipient expert 0:1 is grafted twice"),
    ("donor", "0:1-0:2", "is not LAYER:EXPERT=DONOR_LAYER:DONOR_EXPERT"),
])
def test_graft_refusals_are_one_line_errors(folders, donor, experts, message, tmp_path):
    with pytest.raises(RouteLensError, match=message):
        rl.graft(folders["recipient"], folders[donor], experts, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_graft_refuses_a_non_empty_out_and_a_dense_layer(folders, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(RouteLensError, match="exists and is not empty"):
        rl.graft(folders["recipient"], folders["donor"], "0:1=0:2", str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"
    dense = str(tmp_path / "dense")
    build_tiny_model("qwen2_moe", mlp_only_layers=[1]).save_pretrained(dense)
    with pytest.raises(RouteLensError, match="layer 1 is a dense layer"):
        rl.graft(dense, dense, "1:0=2:0", str(tmp_path / "o"))


def test_expert_map_parsing():
    assert parse_expert_map("3:5=3:9, -1:0=2:4") == [(3, 5, 3, 9), (-1, 0, 2, 4)]


def test_evaluation_equals_the_donor_expert_forced_and_the_saved_folders_forward(tmp_path):
    from routelens.engine.whole_sequence import WholeSequenceScorer

    out = str(tmp_path / "self-graft")
    result = rl.graft("demo", "demo", "3:5=3:9", out, evaluate=True, per_domain=3, bootstrap_resamples=200)
    rows = result.evaluation.items
    assert len(rows) == 12 and set(rows["pair"]) == {"3:5=3:9"}
    lens, grafted = rl.load("demo"), rl.load(out)
    scorer, grafted_scorer = WholeSequenceScorer(lens.adapter), WholeSequenceScorer(grafted.adapter)
    items = {item.id: item for item in rl.arithmetic_items(lens, per_domain=3)}
    for row in rows.itertuples():
        item = items[row.item_id]
        ids, positions = torch.tensor(item.input_ids), np.asarray(item.target_positions)
        natural = scorer.natural(ids, [3], positions)
        length, k = len(item.input_ids), lens.top_k
        experts = torch.full((1, length, k), 9)
        weights = torch.zeros(1, length, k)
        weights[..., 0] = 1.0
        # slot 5 of the grafted model holds the recipient's expert 9: forcing it is forcing 9
        assert row.forced_grafted == pytest.approx(float(np.mean(scorer.score(natural, 3, experts, weights)[0])), abs=1e-5)
        assert row.forced_original == pytest.approx(
            float(np.mean(scorer.score(natural, 3, experts * 0 + 5, weights)[0])), abs=1e-5)
        assert row.natural_recipient == pytest.approx(float(np.mean(natural.logprobs)), abs=1e-6)
        assert row.natural_grafted == pytest.approx(
            float(np.mean(grafted_scorer.natural(ids, [3], positions).logprobs)), abs=1e-5)
    summary = result.evaluation.summary_dict["domains"]["All"]
    difference = (rows["forced_grafted"] - rows["forced_original"]).to_numpy()
    assert summary["pairs"]["3:5=3:9"]["forced"]["difference"] == pytest.approx(difference.mean())
    assert summary["pairs"]["3:5=3:9"]["forced"]["p_value"] == pytest.approx(sp.wilcoxon(difference).pvalue)
    page = open(result.evaluation.report(str(tmp_path / "graft.html")), encoding="utf-8").read()
    assert "Graft evaluation" in page and "3:5=3:9" in page
    assert f"{summary['natural']['before']:.3f} -&gt; {summary['natural']['after']:.3f}" in page
    assert lens.adapter.expert_tensors(3, 5)["model.layers.3.mlp.experts.gate_up_proj"].ne(
        lens.adapter.expert_tensors(3, 9)["model.layers.3.mlp.experts.gate_up_proj"]).any()   # distinct experts


def test_graft_command_prints_and_writes(folders, tmp_path, cli_env):
    import subprocess

    out = str(tmp_path / "cli-graft")
    done = subprocess.run([PYTHON, "-m", "routelens", "graft", "--recipient", folders["recipient"], "--donor",
                           folders["donor"], "--experts", "1:2=1:2", "--out", out], capture_output=True, text=True,
                          env=cli_env, timeout=scaled(300))
    assert done.returncode == 0, done.stderr
    assert f"grafted 1:2=1:2 from {folders['donor']}" in done.stdout
    assert json.load(open(os.path.join(out, "graft.json")))["pairs"][0]["pair"] == "1:2=1:2"
    bad = subprocess.run([PYTHON, "-m", "routelens", "graft", "--recipient", folders["recipient"], "--donor",
                          folders["qwen"], "--experts", "1:2=1:2", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, env=cli_env, timeout=scaled(300))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "grafting copies an expert between models of one family" in bad.stderr


def test_graft_evaluation_killed_mid_run_resumes_to_the_uninterrupted_tables(tmp_path, cli_env):
    """The same `graft --evaluate` command re-run after a SIGKILL keeps the grafted folder
    (its graft.json equals this graft's) and finishes the evaluation: nothing lost or twice."""
    import subprocess

    import pandas as pd
    from conftest import kill_when_parts_land, unit_parts

    def command(out):
        return [PYTHON, "-m", "routelens", "graft", "--recipient", "demo", "--donor", "demo", "--experts", "3:5=3:9",
                "--out", out, "--evaluate", "--per-domain", "12", "--no-progress"]

    killed = str(tmp_path / "killed")
    process = subprocess.Popen(command(killed), env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when_parts_land(process, os.path.join(killed, "evaluation"), 3)
    # units whose parts landed (run.json's count may lag by the unit the kill cut off before it was saved)
    done_at_kill = len(unit_parts(os.path.join(killed, "evaluation"), "items-"))
    assert os.path.isfile(os.path.join(killed, "graft.json"))
    resumed = subprocess.run(command(killed), capture_output=True, text=True, env=cli_env, timeout=scaled(300))
    assert resumed.returncode == 0, resumed.stderr
    whole = str(tmp_path / "whole")
    assert subprocess.run(command(whole), capture_output=True, env=cli_env, timeout=scaled(300)).returncode == 0
    got = pd.read_parquet(os.path.join(killed, "evaluation", "items.parquet"))
    want = pd.read_parquet(os.path.join(whole, "evaluation", "items.parquet"))
    assert len(got) == len(want) == 48
    pd.testing.assert_frame_equal(got, want)
    sessions = json.load(open(os.path.join(killed, "evaluation", "run.json")))["sessions"]
    assert len(sessions) == 2 and sessions[1]["units_done"] == 48 - done_at_kill   # the re-run did only the rest
    other = subprocess.run(command(killed)[:9] + ["3:5=3:10"] + command(killed)[10:], capture_output=True, text=True,
                           env=cli_env, timeout=scaled(300))
    assert other.returncode == 2 and "holds another graft" in other.stderr


def test_graft_evaluation_settings_are_checked_before_a_model_loads(tmp_path):
    with pytest.raises(RouteLensError, match=r"^`alpha` must lie strictly between 0 and 1, got 2"):
        rl.graft("no-such-folder-so-loading-would-fail", "demo", "0:1=0:2", str(tmp_path / "g"), evaluate=True, alpha=2)
    with pytest.raises(RouteLensError, match=r"unknown setting\(s\) `alphas`"):
        rl.graft("demo", "demo", "0:1=0:2", str(tmp_path / "g"), alphas=0.1)
    assert not (tmp_path / "g").exists()
