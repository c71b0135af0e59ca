"""The command line end to end on models saved with save_pretrained and loaded from a
folder: the run folder contract, resume after SIGKILL, and one-line errors with exit 2."""

import json
import os
import re
import subprocess

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PYTHON, kill_when_parts_land, scaled, write_jsonl

from routelens.cli import main
from routelens.models.tiny import build_tiny_model

TEXT_RECORDS = [
    {"id": f"t{i}", "prompt": f"Q:{i}+{i + 3}*2=", "completion": f"A:{i + 3}*2={2 * i + 6};{i}+{2 * i + 6}={3 * i + 6}#{3 * i + 6}",
     "verified": i % 3 != 0}
    for i in range(6)
]


def _run_args(model, trajectories, out, *extra):
    return ["counterfactual", "--model", model, "--trajectories", trajectories, "--layers", "0,-1",
            "--routes", "5", "--candidates", "6", "--seed", "3", "--out", out, "--no-progress", *extra]


def test_end_to_end_from_saved_folder(saved_model, tmp_path, capsys):
    trajectories = write_jsonl(tmp_path / "traj.jsonl", TEXT_RECORDS)
    out = str(tmp_path / "run")
    assert main(_run_args(saved_model, trajectories, out, "--max-trajectories", "4")) == 0
    printed = capsys.readouterr().out
    assert "Fragile" in printed and "run folder" in printed

    routes = pd.read_parquet(os.path.join(out, "routes.parquet"))
    tokens = pd.read_parquet(os.path.join(out, "tokens.parquet"))
    assert list(routes.columns) == ["trajectory_id", "position", "layer", "route", "experts", "weights",
                                    "router_score", "duplicate", "target_id", "logprob", "shadow_logprob",
                                    "upper_route_flip"]
    assert routes["upper_route_flip"].isna().all()   # an fp32 run has no lower precision to audit
    schema = pq.read_schema(os.path.join(out, "routes.parquet"))
    assert schema.field("experts").type.value_type == pa.int64()
    assert schema.field("weights").type.value_type == pa.float64()
    assert schema.field("trajectory_id").type == pa.string() and schema.field("logprob").type == pa.float64()
    assert sorted(routes["layer"].unique()) == [0, 2]
    assert sorted(routes["trajectory_id"].unique()) == ["t0", "t1", "t2", "t3"]
    assert set(routes["route"]) == set(range(6))
    assert len(routes) == len(tokens) * 6
    assert not routes.duplicated(["trajectory_id", "position", "layer", "route"]).any()
    assert tokens["verified"].tolist().count(False) == (tokens["trajectory_id"].isin(["t0", "t3"])).sum()

    summary = json.load(open(os.path.join(out, "summary.json")))
    for layer in ("0", "2"):
        counts = tokens[tokens["layer"] == int(layer)]["bin"].value_counts()
        for name in ("Confident", "Ambiguous", "Fragile"):
            assert summary["layers"][layer][name]["tokens"] == counts.get(name, 0)
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["status"] == "complete"
    assert run["config"]["seed"] == 3 and run["config"]["routes"] == 5 and run["config"]["resolved_layers"] == [0, 2]
    assert run["provenance"]["versions"]["transformers"].startswith("5.23")
    assert run["device"] == "cpu" and run["config"]["dtype"] == "float32"
    assert run["timings"]["tokens_scored_this_session"] == len(tokens)

    # the same command again: resumes a complete run, scores nothing, duplicates nothing
    assert main(_run_args(saved_model, trajectories, out, "--max-trajectories", "4")) == 0
    assert pd.read_parquet(os.path.join(out, "routes.parquet")).equals(routes)
    assert json.load(open(os.path.join(out, "run.json")))["timings"]["tokens_scored_this_session"] == 0

    # a different config on the same folder is refused, unless --overwrite
    assert main(_run_args(saved_model, trajectories, out, "--max-trajectories", "4", "--routes", "4")) == 2
    assert "different config (differs in: routes)" in capsys.readouterr().err
    assert main(_run_args(saved_model, trajectories, out, "--only-verified", "--overwrite")) == 0
    assert set(pd.read_parquet(os.path.join(out, "tokens.parquet"))["trajectory_id"]) == {"t1", "t2", "t4", "t5"}


def test_inspect_and_models(saved_model, capsys):
    assert main(["inspect", "--model", saved_model]) == 0
    printed = capsys.readouterr().out
    assert "OlmoeForCausalLM" in printed and re.search(r"^moe_layers +\[0, 1, 2\]$", printed, re.M)
    from routelens.models import SUPPORTED

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["model", "type"] and lines[-1].startswith(f"{len(SUPPORTED)} model types")
    assert [line.split()[0] for line in lines[1:-1]] == list(SUPPORTED)


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    """A dense-only architecture and an MoE family whose every layer is dense."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("odd")
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(root / "llama")
    build_tiny_model("qwen2_moe", mlp_only_layers=[0, 1, 2, 3]).save_pretrained(root / "dense-qwen2moe")
    return {"llama": str(root / "llama"), "dense": str(root / "dense-qwen2moe")}


@pytest.mark.parametrize("case, message", [
    ("malformed", "line 2: malformed JSON"),
    ("missing", "missing field(s) 'completion'"),
    ("empty", "empty completion"),
    ("dense_layer", "layer 1 is a dense layer; choose one of the MoE layers [0, 2, 3]"),
    ("out_of_range", "layer 9 is out of range"),
    ("k_gt_candidates", "--candidates 1 is smaller than the model's top-k 2"),
    ("unknown_arch", "unsupported architecture 'llama'; supported model types: olmoe"),
    ("no_moe", "has no MoE layers"),
    ("bad_layers", "expected comma-separated integers"),
])
def test_bad_input_one_line_exit_2(case, message, saved_model, odd_models, tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", TEXT_RECORDS[:1])
    ids = write_jsonl(tmp_path / "ids.jsonl", [{"id": "a", "input_ids": [1, 5, 6, 7, 8], "completion_start": 2}])
    def jsonl(name, records):
        return write_jsonl(tmp_path / name, records)

    args = {
        "malformed": _run_args(saved_model, jsonl("m1.jsonl", [json.dumps(TEXT_RECORDS[0]), "{oops"]), str(tmp_path / "r")),
        "missing": _run_args(saved_model, jsonl("m2.jsonl", [{"id": "a", "prompt": "Q"}]), str(tmp_path / "r")),
        "empty": _run_args(saved_model, jsonl("m3.jsonl", [{"id": "a", "prompt": "Q", "completion": ""}]), str(tmp_path / "r")),
        "dense_layer": ["counterfactual", "--model", "tiny:qwen2_moe", "--trajectories", ids, "--layers", "1",
                        "--out", str(tmp_path / "r")],
        "out_of_range": _run_args(saved_model, good, str(tmp_path / "r"))[:6] + ["9", "--out", str(tmp_path / "r")],
        "k_gt_candidates": _run_args(saved_model, good, str(tmp_path / "r")) + ["--candidates", "1"],
        "unknown_arch": _run_args(odd_models["llama"], good, str(tmp_path / "r")),
        "no_moe": ["inspect", "--model", odd_models["dense"]],
        "bad_layers": _run_args(saved_model, good, str(tmp_path / "r"))[:6] + ["first", "--out", str(tmp_path / "r")],
    }[case]
    with pytest.raises(SystemExit) if case == "bad_layers" else _no_exit() as raised:
        code = main(args)
    if case == "bad_layers":
        code = raised.value.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    if case != "bad_layers":  # argparse prints its usage line before the error
        assert len(err.splitlines()) == 1 and err.startswith("routelens: error: ")
    assert not os.path.exists(tmp_path / "r" / "routes.parquet")


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_process_level_error_has_no_traceback(odd_models, tmp_path, cli_env):
    good = write_jsonl(tmp_path / "good.jsonl", TEXT_RECORDS[:1])
    result = subprocess.run([PYTHON, "-m", "routelens", "counterfactual", "--model", odd_models["llama"],
                             "--trajectories", good, "--layers", "0", "--out", str(tmp_path / "r")],
                            capture_output=True, text=True, env=cli_env, timeout=scaled(120))
    assert result.returncode == 2
    from routelens.models import SUPPORTED

    assert result.stderr.strip().splitlines() == [
        f"routelens: error: unsupported architecture 'llama'; supported model types: {', '.join(SUPPORTED)} "
        "(routelens.register_family serves another)"
    ]


def test_sigkill_then_resume_equals_uninterrupted_run(saved_model, tmp_path, cli_env):
    records = [{"id": f"k{i}", "prompt": f"Q:{i}*{i}+{i}=", "completion": f"A:{i}*{i}={i * i};{i * i}+{i}={i * i + i}#{i * i + i}"}
               for i in range(10)]
    trajectories = write_jsonl(tmp_path / "traj.jsonl", records)
    # the reference engine writes one trajectory at a time: the kill lands between two of them
    command = [PYTHON, "-m", "routelens", *_run_args(saved_model, trajectories, "OUT"), "--engine", "reference"]
    command[command.index("--routes") + 1] = "16"

    def run(out, **kwargs):
        return subprocess.Popen([out if part == "OUT" else part for part in command], env=cli_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)

    killed = str(tmp_path / "killed")
    kill_when_parts_land(run(killed), killed, 2, prefix="routes-")
    assert not os.path.exists(os.path.join(killed, "routes.parquet"))
    assert json.load(open(os.path.join(killed, "run.json")))["status"] == "running"

    resumed = run(killed)
    assert resumed.wait(timeout=scaled(300)) == 0, resumed.stderr.read()
    uninterrupted = str(tmp_path / "whole")
    assert run(uninterrupted).wait(timeout=scaled(300)) == 0

    a = pd.read_parquet(os.path.join(killed, "routes.parquet"))
    b = pd.read_parquet(os.path.join(uninterrupted, "routes.parquet"))
    assert len(a) == len(b) > 0
    pd.testing.assert_frame_equal(a, b)
    run_json = json.load(open(os.path.join(killed, "run.json")))
    assert len(run_json["sessions"]) == 2 and run_json["status"] == "complete"


def test_hub_id_that_cannot_be_reached_is_a_one_line_error(tmp_path, cli_env):
    cli_env["HF_HUB_OFFLINE"] = "1"  # no network here either way; offline mode skips the retries
    result = subprocess.run([PYTHON, "-m", "routelens", "inspect", "--model", "nobody/no-such-moe"],
                            capture_output=True, text=True, env=cli_env, timeout=scaled(120))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("routelens: error: cannot read the model config of 'nobody/no-such-moe'")


@pytest.mark.skipif(not __import__("routelens.demo_model").demo_model.is_available(),
                    reason="embedded weights not built in this checkout")
def test_demo_runs_end_to_end_and_prints_its_run_folder(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out, "--problems", "6", "--routes", "4", "--isolation-per-domain", "6",
                 "--rollout-samples", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    tokens = pd.read_parquet(os.path.join(out, "counterfactual", "tokens.parquet"))
    assert tokens["verified"].all()
    layers = sorted(tokens["layer"].unique())
    assert layers == [0, 2, 3]  # first, middle, last MoE layer of the 4-layer demo model
    summary = json.load(open(os.path.join(out, "counterfactual", "summary.json")))
    for layer in layers:  # the printed table is the run folder's summary
        for name in ("Confident", "Ambiguous", "Fragile", "All"):
            count = summary["layers"][str(layer)][name]["tokens"]
            assert count == (int((tokens["layer"] == layer).sum()) if name == "All"
                             else int(((tokens["layer"] == layer) & (tokens["bin"] == name)).sum()))
            # a bin over fewer than 10 trajectories is starred: its interval is unreliable
            shown = name + ("*" if summary["layers"][str(layer)][name]["few_clusters"] else "")
            assert any([cell.strip() for cell in line.split("│")[1:4]] == [str(layer), shown, str(count)]
                       for line in printed.splitlines() if "│" in line)
    # then the isolation study: 4 domains x every MoE layer x every expert, 6 items each
    cells = pd.read_parquet(os.path.join(out, "isolation", "cells.parquet"))
    assert len(cells) == 4 * 4 * 16 and (cells["n"] == 6).all()
    isolation = json.load(open(os.path.join(out, "isolation", "summary.json")))
    assert isolation["comparisons"]["forced_vs_natural"]["significant"] == int(cells["significant"].sum())
    harmful = int((cells["verdict"] == "harmful").sum())
    assert isolation["verdict"]["harmful"] == harmful
    assert f"{harmful} of 256 cells (domain x layer x expert) harmful" in " ".join(printed.split())
    # rollouts of every Fragile token (the rollout's defaults), or why there are none
    fragile = tokens[tokens["bin"] == "Fragile"]
    if fragile.empty:
        assert "demo: rollouts skipped: no token of" in printed
    else:
        rollouts = pd.read_parquet(os.path.join(out, "rollout", "rollouts.parquet"))
        selection = json.load(open(os.path.join(out, "rollout", "summary.json")))["selection"]
        assert (selection["tokens"], selection["best_by"]) == ("fragile-all", "top-tokens")
        assert len(rollouts) == (len(fragile) - selection["skipped_without_alternative"]) * 3 * 2
        assert "by the first emitted token" in printed and "beyond first token" in printed
    # and the report of the runs, whose path it prints
    report = os.path.join(out, "report.html")
    assert f"report: {report}" in printed and os.path.getsize(report) > 10_000
    assert os.path.exists(os.path.join(out, "isolation", "figures", "iso_delta_heatmap.svg"))


def test_trajectories_from_a_problem_file_are_verified_with_math_verify(saved_model, tmp_path, capsys):
    from routelens.data.sampling import math_answer_correct

    problems = write_jsonl(tmp_path / "problems.jsonl", [{"id": f"q{i}", "prompt": f"Q:{i}+1=A:", "answer": str(i + 1)}
                                                         for i in range(3)])
    args = ["trajectories", "--model", saved_model, "--problems", problems, "--samples-per-problem", "2",
            "--temperature", "1.0", "--seed", "4", "--max-new-tokens", "12", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a.jsonl")]) == 0
    assert main(args + ["--out", str(tmp_path / "b.jsonl"), "--batch-size", "5"]) == 0
    a = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    assert a == [json.loads(line) for line in open(tmp_path / "b.jsonl")]  # seeded; a completion per job
    assert [r["id"] for r in a] == ["q0-s0", "q0-s1", "q1-s0", "q1-s1", "q2-s0", "q2-s1"]
    for record in a:
        assert record["input_ids"][: record["completion_start"]][0] == 1  # <bos>: no chat template, special tokens on
        assert record["verified"] == math_answer_correct(record["completion"], record["answer"] if "answer" in record
                                                         else str(int(record["problem_id"][1:]) + 1))
        assert 1 <= len(record["input_ids"]) - record["completion_start"] <= 12
    # the written file is a valid trajectory file for the analysis
    from routelens.data.trajectories import load_trajectories

    assert len(load_trajectories(str(tmp_path / "a.jsonl"))) == 6


COMMAND_NAMES = ["demo", "counterfactual", "rollout", "replay", "isolate", "semantic-route", "graft", "router-update", "passk",
                 "report", "export", "trajectories", "verify", "inspect", "models", "evaluate", "train-demo"]


@pytest.mark.quick
def test_command_names_are_the_parsers():
    from routelens.cli import commands

    assert sorted(commands()) == sorted(COMMAND_NAMES)


@pytest.mark.quick
@pytest.mark.parametrize("argv", [["--version"], ["models"], ["--help"]] + [[name, "--help"] for name in COMMAND_NAMES])
def test_commands_that_load_no_model_import_no_torch(argv):
    """`routelens --version`, `models`, `--help` and each command's `--help` answer at once:
    no torch, no transformers, no pandas."""
    script = ("import sys\nfrom routelens.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
              "except SystemExit as exit:\n    code = exit.code\n"
              "heavy = [m for m in ('torch', 'transformers', 'pandas') if m in sys.modules]\n"
              "assert not heavy, heavy\nsys.exit(code)\n")
    result = subprocess.run([PYTHON, "-c", script, *argv], capture_output=True, text=True, timeout=scaled(120))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
