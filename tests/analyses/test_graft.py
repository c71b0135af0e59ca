"""Expert grafting: exactly the mapped expert tensors change (hash check against the saved
folder read back by transformers), every refusal is a one-line error, and the evaluation
equals computations made another way (the donor expert forced in the recipient, the saved
folder's own forward, SciPy's test)."""

import json
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
import torch
from conftest import PYTHON, scaled, write_jsonl
from scipy import stats as sp
from transformers import AutoModelForCausalLM

import routelens as rl
from routelens.analyses.graft.grafting import parse_expert_map, tensor_sha256
from routelens.analyses.graft.pipeline import graft as graft_safely  # what `routelens graft` runs
from routelens.cli import main
from routelens.errors import RouteLensError
from routelens.models.tiny import build_tiny_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("graft")
    made = {}
    for name, family, seed, overrides in (("recipient", "olmoe", 0, {}), ("donor", "olmoe", 5, {}),
                                          ("narrow", "olmoe", 1, {"intermediate_size": 40}),
                                          ("thin", "olmoe", 2, {"hidden_size": 24}),
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
    ("thin", "0:1=0:1", "only experts of one shape can be grafted"),       # another hidden size
    ("qwen", "0:1=0:1", "the donor is a qwen3_moe model and the recipient a olmoe model"),
    ("donor", "0:9=0:1", "recipient expert 9 at layer 0 does not exist"),
    ("donor", "0:1=7:1", "the donor's layer 7 is out of range"),
    ("donor", "7:1=0:1", "the recipient's layer 7 is out of range"),
    ("recipient", "0:1=0:1", "the pair changes nothing"),
    ("donor", "0:1=0:1,-3:1=1:2", "recipient expert 0:1 is grafted twice"),   # -3 is layer 0
    ("donor", "0:1=0:1,0:1=1:2", "recipient expert 0:1 is grafted twice"),
    ("donor", "0:1-0:2", "is not LAYER:EXPERT=DONOR_LAYER:DONOR_EXPERT"),
])
def test_graft_refusals_are_one_line_errors(folders, donor, experts, message, tmp_path):
    with pytest.raises(RouteLensError, match=message):
        graft_safely(folders["recipient"], folders[donor], experts, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


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


def _cli_graft(folders, out, *extra, experts="0:1=1:3"):
    return ["graft", "--recipient", folders["recipient"], "--donor", folders["donor"], "--experts", experts,
            "--out", str(out), "--no-progress", *extra]


def test_evaluation_inputs_are_refused_before_the_graft_is_written(folders, tmp_path, capsys):
    """An unknown domain, an empty or malformed item file, items the model cannot read, no
    item at all: one line, exit 2, and no grafted folder (nor a partial one) left behind."""
    good = write_jsonl(tmp_path / "items.jsonl", [{"id": "a", "domain": "d", "prompt_ids": [1, 2, 3], "target_ids": [4]}])
    cases = {
        "domain(s) poetry not in": ["--items", good, "--domains", "poetry"],
        "no item records in the file": ["--items", write_jsonl(tmp_path / "empty.jsonl", [])],
        "line 2: malformed JSON": ["--items", write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"id": "a"}), "{oops"])],
        "the prompt tokenises to nothing": ["--items", write_jsonl(
            tmp_path / "text.jsonl", [{"id": "a", "domain": "d", "prompt": "Q", "target": "3"}])],
        "unknown to the arithmetic task": ["--domains", "poetry"],
    }
    for message, extra in cases.items():
        assert main(_cli_graft(folders, tmp_path / "g", "--evaluate", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "g").exists() and not [n for n in os.listdir(tmp_path) if ".partial-" in n]
    with pytest.raises(RouteLensError, match="`items` is empty|no items to evaluate the graft on"):
        graft_safely(folders["recipient"], folders["donor"], "0:1=1:3", str(tmp_path / "g"), evaluate=True, items=[])
    assert not (tmp_path / "g").exists()


def test_model_folders_that_cannot_be_read_are_one_line_errors(folders, tmp_path):
    """config.json not JSON, not UTF-8, missing; weights missing: one line naming the folder or file."""
    def broken(name, config=None, drop=None):
        folder = tmp_path / name
        shutil.copytree(folders["recipient"], folder)
        if config is not None:
            (folder / "config.json").write_bytes(config)
        if drop:
            os.remove(folder / drop)
        return str(folder)

    cases = [(broken("not-json", config=b"{oops"), "recipient", "not-json/config.json is not valid JSON"),
             (broken("latin", config='{"é": 1}'.encode("latin-1")), "recipient", "latin/config.json is not UTF-8 text"),
             (broken("not-json-donor", config=b"{oops"), "donor", "not-json-donor/config.json' is not a valid JSON file"),
             (broken("no-config", drop="config.json"), "recipient", "no-config has no config.json"),
             (broken("no-weights", drop="model.safetensors"), "donor", "no-weights has a config.json but no weights")]
    for folder, role, message in cases:
        models = {"recipient": folders["recipient"], "donor": folders["donor"], role: folder}
        with pytest.raises(RouteLensError, match=message) as caught:
            graft_safely(models["recipient"], models["donor"], "0:1=1:3", str(tmp_path / "g"))
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "g").exists()


def test_out_that_cannot_take_a_graft_is_refused_before_a_model_loads(tmp_path, capsys, monkeypatch):
    """A plain file, a path under a file, a read-only parent or folder (root ignores
    permissions: os.access is denied here), a non-empty folder that is not a graft's:
    one line, exit 2, nothing changed (the recipient does not exist: no model loads)."""
    (tmp_path / "file.txt").write_text("mine")
    (tmp_path / "read-only-empty").mkdir()
    (tmp_path / "read-only-parent" / "empty").mkdir(parents=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("keep me")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if os.path.basename(path).startswith("read-only")
                        and mode & os.W_OK else real_access(path, mode))
    before = sorted((path, os.path.getmtime(path)) for path in map(str, tmp_path.rglob("*")))
    models = {"recipient": str(tmp_path / "no-such-model"), "donor": "demo"}
    for out, message in [(tmp_path / "file.txt", "is an existing file, not a folder"),
                         (tmp_path / "file.txt" / "g", "file.txt is a file, not a folder"),
                         (tmp_path / "read-only-empty", "read-only-empty is not writable"),
                         (tmp_path / "read-only-parent" / "g", "read-only-parent is not writable"),
                         (tmp_path / "read-only-parent" / "empty", "its folder " + str(tmp_path / "read-only-parent")
                          + " is not writable, and the grafted model is written beside --out"),
                         (tmp_path / "notes", "exists and is not empty, and holds no graft.json")]:
        for extra in ([], ["--overwrite"]):
            assert main(_cli_graft(models, out, *extra)) == 2
            err = capsys.readouterr().err.strip()
            assert message in err and len(err.splitlines()) == 1, err
    assert sorted((path, os.path.getmtime(path)) for path in map(str, tmp_path.rglob("*"))) == before


def test_grafted_folder_is_kept_when_the_same_and_replaced_only_with_overwrite(folders, tmp_path):
    """The same graft again keeps the folder (not rewritten); another is refused, and with
    overwrite replaces only what graft.json lists (and the evaluation's outputs): the
    user's files stay."""
    out = tmp_path / "g"
    first = graft_safely(folders["recipient"], folders["donor"], "0:1=1:3", str(out))
    record = json.loads((out / "graft.json").read_text())
    assert not first.reused and record == first.record and sorted(os.listdir(out)) == record["files"]
    assert "model.safetensors" in record["files"] and "config.json" in record["files"]
    assert os.listdir(tmp_path) == ["g"]                       # no partial folder beside it
    stamps = {name: os.path.getmtime(out / name) for name in record["files"]}
    again = graft_safely(folders["recipient"], folders["donor"], "0:1=1:3", str(out))
    assert again.reused and again.record == record
    assert stamps == {name: os.path.getmtime(out / name) for name in record["files"]}
    with pytest.raises(RouteLensError, match=r"holds another graft \(its graft.json differs from this one's in: pairs\)"):
        graft_safely(folders["recipient"], folders["donor"], "0:1=1:4", str(out))
    assert stamps == {name: os.path.getmtime(out / name) for name in record["files"]}
    (out / "notes.txt").write_text("keep me")
    (out / "evaluation").mkdir()
    (out / "evaluation" / "run.json").write_text(json.dumps({"kind": "graft-evaluation", "config": {}, "sessions": [], "files": []}))
    (out / "evaluation" / "mine.txt").write_text("keep me too")
    replaced = graft_safely(folders["recipient"], folders["donor"], "0:1=1:4", str(out), overwrite=True)
    assert not replaced.reused and replaced.record["pairs"][0]["pair"] == "0:1=1:4"
    assert sorted(os.listdir(out)) == sorted([*replaced.record["files"], "evaluation", "notes.txt"])
    assert os.listdir(out / "evaluation") == ["mine.txt"] and (out / "notes.txt").read_text() == "keep me"
    grafted = AutoModelForCausalLM.from_pretrained(out).state_dict()
    donor = AutoModelForCausalLM.from_pretrained(folders["donor"]).state_dict()
    name = "model.layers.0.mlp.experts.down_proj"
    assert torch.equal(grafted[name][1], donor["model.layers.1.mlp.experts.down_proj"][4])


def test_an_interrupted_graft_leaves_nothing_and_a_killed_one_is_cleared(folders, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the model is saved: the partial folder is removed and the command says
    nothing was written (exit 130). What a kill leaves (a partial folder whose process is
    gone, a placement's journal) is cleared by the next graft into the same `out`."""
    import routelens.analyses.graft.grafting as grafting

    def interrupted(folder, *args):
        with open(os.path.join(folder, "config.json"), "w") as handle:
            handle.write("{}")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(grafting, "save_model", interrupted)
        assert main(_cli_graft(folders, tmp_path / "g")) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("routelens: interrupted; nothing was written") and f"there is no {tmp_path / 'g'}" in err
    assert os.listdir(tmp_path) == []
    # a kill mid-save (a partial folder of a process that is gone) and mid-placement (a journal, no graft.json)
    gone = subprocess.Popen(["true"])
    gone.wait()
    partial = tmp_path / f"g.partial-{gone.pid}"
    partial.mkdir()
    (partial / ".routelens-graft-partial").write_text("")
    (partial / "model.safetensors").write_bytes(b"half")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "notes.txt").write_text("keep me")
    (tmp_path / "g" / "model.safetensors").write_bytes(b"half")
    (tmp_path / "g" / ".graft-placing.json").write_text(json.dumps({"remove": ["graft.json"],
                                                                    "place": ["model.safetensors", "graft.json"]}))
    assert main(_cli_graft(folders, tmp_path / "g")) == 0
    assert os.listdir(tmp_path) == ["g"] and (tmp_path / "g" / "notes.txt").read_text() == "keep me"
    record = json.loads((tmp_path / "g" / "graft.json").read_text())
    assert sorted(os.listdir(tmp_path / "g")) == sorted([*record["files"], "notes.txt"])
    assert rl.load(str(tmp_path / "g")).family == "olmoe"


def test_a_ctrl_c_while_the_graft_is_moved_into_place_waits_for_the_moves():
    from routelens.analyses.graft.folder import _interrupt_deferred

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    moved = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with _interrupt_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                moved.append("after the signal")
        assert moved == ["after the signal"]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_expert_map_parsing():
    assert parse_expert_map("3:5=3:9, -1:0=2:4") == [(3, 5, 3, 9), (-1, 0, 2, 4)]
    assert parse_expert_map([[3, 5, 3, np.int64(9)]]) == [(3, 5, 3, 9)]
    for bad in ([], [(0, 1, 0)], [(0, 1, 0, 1.5)], ["0:1=0:2"], 5):
        with pytest.raises(RouteLensError, match="must be \"L:e=L2:e2,...\" or a non-empty list"):
            parse_expert_map(bad)


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


def test_graft_evaluation_interrupted_then_killed_resumes_to_the_uninterrupted_tables(tmp_path, cli_env):
    """Ctrl-C during `graft --evaluate` says, truly, that the grafted model and the units done
    are kept (exit 130); a SIGKILL later in the run; the same command a third time keeps the
    grafted folder and finishes the evaluation: nothing lost or done twice, and the tables
    equal an uninterrupted run's, byte for byte."""
    import pandas as pd
    from conftest import kill_when_parts_land, unit_parts, wait_until

    def command(out):
        return [PYTHON, "-m", "routelens", "graft", "--recipient", "demo", "--donor", "demo", "--experts", "3:5=3:9",
                "--out", out, "--evaluate", "--per-domain", "12", "--no-progress"]

    def interruptible():   # Ctrl-C as a terminal delivers it (a background shell passes SIGINT on as ignored)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    cut = str(tmp_path / "cut")
    evaluation = os.path.join(cut, "evaluation")
    process = subprocess.Popen(command(cut), env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=interruptible)
    wait_until(lambda: process.poll() is not None or len(unit_parts(evaluation, "items-")) >= 2, 120, "2 items evaluated")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=scaled(60))
    assert process.returncode == 130, err
    assert f"interrupted; the grafted model {cut} is complete and kept, and so are the evaluation's units done" in err
    assert "re-run the same command to resume" in err and "Traceback" not in err
    after_ctrl_c = len(unit_parts(evaluation, "items-"))
    process = subprocess.Popen(command(cut), env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when_parts_land(process, evaluation, after_ctrl_c + 3, "items-")
    # units whose parts landed (run.json's count may lag by the unit the kill cut off before it was saved)
    done_at_kill = len(unit_parts(evaluation, "items-"))
    assert os.path.isfile(os.path.join(cut, "graft.json")) and not os.path.exists(os.path.join(evaluation, "items.parquet"))
    resumed = subprocess.run(command(cut), capture_output=True, text=True, env=cli_env, timeout=scaled(300))
    assert resumed.returncode == 0, resumed.stderr
    assert f"kept {cut}: it already holds this graft" in resumed.stdout
    whole = str(tmp_path / "whole")
    assert subprocess.run(command(whole), capture_output=True, env=cli_env, timeout=scaled(300)).returncode == 0
    got = pd.read_parquet(os.path.join(evaluation, "items.parquet"))
    want = pd.read_parquet(os.path.join(whole, "evaluation", "items.parquet"))
    assert len(got) == len(want) == 48 and got["item_id"].is_unique
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert open(os.path.join(evaluation, "items.parquet"), "rb").read() == \
        open(os.path.join(whole, "evaluation", "items.parquet"), "rb").read()
    sessions = json.load(open(os.path.join(evaluation, "run.json")))["sessions"]
    assert len(sessions) == 3 and sessions[-1]["units_done"] == 48 - done_at_kill   # the last run did only the rest
    summary = json.load(open(os.path.join(evaluation, "summary.json")))
    assert summary == json.load(open(os.path.join(whole, "evaluation", "summary.json")))
    other = subprocess.run(command(cut)[:9] + ["3:5=3:10"] + command(cut)[10:], capture_output=True, text=True,
                           env=cli_env, timeout=scaled(300))
    assert other.returncode == 2 and "holds another graft" in other.stderr


def test_graft_evaluation_settings_are_checked_before_a_model_loads(tmp_path):
    with pytest.raises(RouteLensError, match=r"^`alpha` must lie strictly between 0 and 1, got 2"):
        rl.graft("no-such-folder-so-loading-would-fail", "demo", "0:1=0:2", str(tmp_path / "g"), evaluate=True, alpha=2)
    with pytest.raises(RouteLensError, match=r"unknown setting\(s\) `alphas`"):
        rl.graft("demo", "demo", "0:1=0:2", str(tmp_path / "g"), alphas=0.1)
    assert not (tmp_path / "g").exists()
