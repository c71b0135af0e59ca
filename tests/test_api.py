"""The Python API: load/wrap, capture, force, trajectories, the analyses in memory and into
run folders, equal to the command line's run folders for the same settings."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import scaled, write_jsonl

import routelens as rl
from routelens.cli import main

quick = pytest.mark.quick


@pytest.fixture(scope="module")
def demo():
    return rl.load("demo")


@pytest.fixture(scope="module")
def demo_trajectories(demo, tmp_path_factory):
    """Four arithmetic solutions of the demo model, as token ids and as a JSONL file."""
    pairs = [("Q:12+7=A:", "12+7=19#19"), ("Q:9*8=A:", "9*8=72#72"), ("Q:50-17=A:", "50-17=33#33"),
             ("Q:3*4+5=A:", "3*4=12;12+5=17#17")]
    trajs = rl.trajectories_from_text(demo.tokenizer, pairs, ids=[f"t{i}" for i in range(len(pairs))])
    path = write_jsonl(tmp_path_factory.mktemp("traj") / "traj.jsonl",
                       [{"id": t.id, "input_ids": t.input_ids, "completion_start": t.completion_start} for t in trajs])
    return trajs, path


# ---------------------------------------------------------------------------- models
def test_load_and_wrap_describe_the_same_model(demo):
    from transformers import AutoModelForCausalLM

    assert (demo.family, demo.num_experts, demo.top_k, demo.moe_layers) == ("olmoe", 16, 4, [0, 1, 2, 3])
    wrapped = rl.wrap(AutoModelForCausalLM.from_pretrained(demo.loaded.folder), demo.tokenizer, name="mine")
    assert (wrapped.family, wrapped.num_experts, wrapped.top_k, wrapped.moe_layers) == \
        (demo.family, demo.num_experts, demo.top_k, demo.moe_layers)
    assert wrapped.loaded.spec == "mine" and not wrapped.model.training
    tiny = rl.load("tiny:deepseek_v3")
    assert tiny.family == "deepseek_v3" and tiny.moe_layers == tiny.adapter.moe_layers and tiny.tokenizer is None


@quick
def test_wrap_refuses_what_is_not_a_model():
    with pytest.raises(rl.RouteLensError, match="Hugging Face model"):
        rl.wrap(object())


def test_capture_equals_the_models_own_router_logits(demo):
    """Against transformers' own `output_router_logits`: the captured logits are the router's,
    reshaped [B, T, E], and the experts are its top-k."""
    ids = torch.tensor([demo.tokenizer("Q:12+7=A:")["input_ids"], demo.tokenizer("Q:98-9=A:")["input_ids"]])
    with torch.no_grad(), demo.capture() as routes:
        out = demo.model(ids, output_router_logits=True)
    for layer, own in zip(demo.moe_layers, out.router_logits):
        captured = routes[layer]
        assert captured.logits.shape == (2, ids.shape[1], demo.num_experts)
        torch.testing.assert_close(captured.logits.reshape(-1, demo.num_experts), own, rtol=0, atol=0)
        top = own.float().softmax(-1).topk(demo.top_k).indices.sort(-1).values
        assert torch.equal(captured.experts.reshape(-1, demo.top_k).sort(-1).values, top)
    assert torch.equal(routes[-1].experts, routes[demo.moe_layers[-1]].experts)


def test_force_routes_the_given_tokens_only_with_gating_rule_weights(demo):
    ids = demo.encode("Q:3*4+5=A:")
    with torch.no_grad(), demo.capture([-1]) as natural_routes:
        natural = demo.model(ids).logits
    natural_experts = natural_routes[-1].experts[0].tolist()
    # forcing the router's own route (any order) changes nothing: the override is exact
    with torch.no_grad(), demo.force(-1, [(0, 4)], [sorted(natural_experts[4])[::-1]]):
        same = demo.model(ids).logits
    torch.testing.assert_close(same, natural, rtol=0, atol=1e-6)

    other = [e for e in range(demo.num_experts) if e not in natural_experts[4]][: demo.top_k]
    with torch.no_grad(), demo.force(-1, [(0, 4)], [other]), demo.capture([-1]) as forced_routes:
        forced = demo.model(ids).logits
    routes = forced_routes[-1]
    assert sorted(routes.experts[0, 4].tolist()) == sorted(other)
    assert routes.experts[0, :4].tolist() == natural_experts[:4]            # other tokens untouched
    expected = demo.adapter.weights_for(routes.logits[0, 4:5], torch.tensor([other]))[0]
    torch.testing.assert_close(routes.weights[0, 4], expected.to(routes.weights.dtype))
    # causal: earlier positions unchanged (up to the expert kernel's float grouping)
    torch.testing.assert_close(forced[0, :4], natural[0, :4], rtol=0, atol=1e-5)
    assert (forced[0, 4:] - natural[0, 4:]).abs().max() > 1e-2

    with torch.no_grad(), demo.force(-1, [(0, 4)], [other], weights=[[1.0, 0.0, 0.0, 0.0]]), \
            demo.capture([-1]) as given:
        demo.model(ids)
    assert given[-1].weights[0, 4].tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("experts,positions,match", [
    ([[0, 1]], [(0, 1)], "one list of 4 expert ids"),
    ([[0, 0, 1, 2]], [(0, 1)], "distinct"),
    ([[0, 1, 2, 99]], [(0, 1)], "expert ids must lie in 0..15"),
    ([[0, 1, 2, 3]], [(0, 99)], "outside this forward"),
])
def test_force_refuses_bad_routes(demo, experts, positions, match):
    with pytest.raises(rl.RouteLensError, match=match), torch.no_grad():
        with demo.force(-1, positions, experts):
            demo.model(demo.encode("Q:1+1=A:"))


def test_force_on_a_dense_layer_is_refused():
    with pytest.raises(rl.RouteLensError, match="dense layer|out of range"):
        with rl.load("tiny:deepseek_v3").force(0, [(0, 0)], [[0, 1]]):
            pass


# ---------------------------------------------------------------------------- inputs
@quick
def test_trajectories_from_ids_validate_like_the_file_reader():
    trajs = rl.trajectories_from_ids([[1, 2, 3, 4], [5, 6, 7]], completion_start=[2, 1], ids=["a", "b"],
                                     verified=[True, False])
    assert [list(t.scored_positions) for t in trajs] == [[1, 2], [0, 1]] and trajs[1].verified is False
    with pytest.raises(rl.RouteLensError, match="completion_start 5 must lie in 1..3"):
        rl.trajectories_from_ids([[1, 2, 3, 4]], completion_start=5)
    with pytest.raises(rl.RouteLensError, match="unique"):
        rl.trajectories_from_ids([[1, 2], [1, 2]], completion_start=1, ids=["x", "x"])
    with pytest.raises(rl.RouteLensError, match="0..9"):
        rl.trajectories_from_ids([[1, 20]], completion_start=1, vocab_size=10)


# ---------------------------------------------------------------------------- configs
@quick
@pytest.mark.parametrize("config,options,python,command_line", [
    ("CounterfactualConfig", {"fragile": 0.95, "confident": 0.9}, "need 0 <= `fragile` (0.95) <= `confident` (0.9) <= 1",
     "need 0 <= --fragile (0.95) <= --confident (0.9) <= 1"),
    ("CounterfactualConfig", {"routes": 0}, "`routes` must be an integer >= 1, got 0", "--routes must be an integer >= 1"),
    ("CounterfactualConfig", {"gumbel_temperature": 0.0}, "`gumbel_temperature` must be positive, got 0.0",
     "--gumbel-temperature must be positive"),
    ("CounterfactualConfig", {"engine": "fastest"}, "`engine` must be one of fast, cache, reference, got 'fastest'",
     "--engine must be one of"),
    ("CounterfactualConfig", {"layers": []}, "`layers` must be a non-empty list", "--layers must be a non-empty list"),
    ("CounterfactualConfig", {"joint_layers": [0, 1], "layers": [2]}, "`joint_layers` and `layers` together",
     "--joint-layers and --layers together"),
    ("IsolationConfig", {"alpha": 1.5}, "`alpha` must lie strictly between 0 and 1", "--alpha must lie strictly"),
    ("IsolationConfig", {"score": "median"}, "`score` must be one of mean, first", "--score must be one of mean, first"),
    ("PassKConfig", {"samples": 4, "k": [1, 8]}, "`k` 8 must lie in 1..`samples` (4)", "--k 8 must lie in 1..--samples"),
    ("PassKConfig", {"checker": "eyeball"}, "`checker` must be one of arithmetic, math-verify", "--checker must be"),
    ("RouterUpdateConfig", {"bins": ["Hard"]}, "`bins`: unknown bin(s) Hard", "--bins: unknown bin(s) Hard"),
    ("RouterUpdateConfig", {"lr": -1.0}, "`lr` must be positive, got -1.0", "--lr must be positive"),
    ("SemanticRouteConfig", {"calibration_share": 1.0}, "`calibration_share` must lie strictly between 0 and 1",
     "--calibration-share must lie"),
    ("RolloutConfig", {"max_new_tokens": 0}, "`max_new_tokens` must be an integer >= 1", "--max-new-tokens must be"),
    ("RolloutConfig", {"tokens": "random"}, "`tokens` random draws `limit` tokens: give `limit`",
     "--tokens random draws --limit tokens: give --limit"),
    ("RolloutConfig", {"best_by": "proxy"}, "`best_by` must be one of top-tokens, realized, got 'proxy'",
     "--best-by must be one of top-tokens, realized"),
    ("RolloutConfig", {"top_tokens": 0}, "`top_tokens` must be an integer >= 1", "--top-tokens must be an integer"),
    ("RolloutConfig", {"include_wrong": "yes"}, "`include_wrong` must be True or False", "--include-wrong must be"),
])
def test_configs_name_the_parameter_in_python_and_the_option_on_the_command_line(config, options, python, command_line):
    """A bad setting raised from Python names the parameter as Python spells it (in
    backticks); the command line prints the same message with its option."""
    with pytest.raises(rl.RouteLensError) as error:
        getattr(rl, config)(**options)
    assert str(error.value).startswith(python) and "--" not in str(error.value)
    assert error.value.as_options().startswith(command_line)


@quick
def test_config_fields_are_the_command_line_options():
    """Every field of every analysis config is an option of its command, spelt the same
    (`gumbel_temperature` is `--gumbel-temperature`): no alias, no second name."""
    import dataclasses

    from routelens.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    commands = {"CounterfactualConfig": "counterfactual", "IsolationConfig": "isolate", "RolloutConfig": "rollout",
                "SemanticRouteConfig": "semantic-route", "PassKConfig": "passk", "RouterUpdateConfig": "router-update"}
    for config, command in commands.items():
        options = {o for action in subparsers[command]._actions for o in action.option_strings}
        missing = [f.name for f in dataclasses.fields(getattr(rl, config)) if "--" + f.name.replace("_", "-") not in options]
        assert not missing, f"{command} lacks options for {config} fields {missing}"


@quick
def test_misspelt_options_are_errors_not_ignored():
    from routelens.api import make_config
    from routelens.engine import make_engine

    with pytest.raises(rl.RouteLensError, match=r"unknown setting\(s\) `rotues`; the settings are layers"):
        make_config(rl.CounterfactualConfig, rotues=8)
    assert make_config(rl.CounterfactualConfig, routes=8, candidates=12).candidates == 12
    base = rl.CounterfactualConfig(routes=5)
    assert make_config(rl.CounterfactualConfig, base, seed=3).routes == 5
    with pytest.raises(rl.RouteLensError, match=r"unknown setting\(s\) `num_routes` \(num_routes is now routes\)"):
        make_config(rl.CounterfactualConfig, num_routes=8)
    with pytest.raises(TypeError, match="memory_budgte"):
        make_engine("fast", None, memory_budgte=1)


def test_command_line_and_api_reject_bad_settings_with_the_same_line(tmp_path, capsys, demo_trajectories):
    _, path = demo_trajectories
    code = main(["counterfactual", "--trajectories", path, "--layers", "-1", "--fragile", "0.95", "--out",
                 str(tmp_path / "x")])
    line = capsys.readouterr().err.strip()
    with pytest.raises(rl.RouteLensError) as error:
        rl.CounterfactualConfig(fragile=0.95)
    assert code == 2 and line == f"routelens: error: {error.value.as_options()}"


def test_import_changes_no_global_state():
    """Importing routelens (and its API and report modules) loads no matplotlib backend and
    leaves torch's settings alone; `import routelens` alone does not even import torch."""
    script = ("import sys, routelens; assert 'torch' not in sys.modules, 'import routelens pulled torch'; "
              "import torch; threads = torch.get_num_threads(); grad = torch.is_grad_enabled(); "
              "import routelens.api, routelens.report.build; "
              "assert 'matplotlib.pyplot' not in sys.modules; "
              "assert torch.get_num_threads() == threads and torch.is_grad_enabled() == grad; print('ok')")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=scaled(300))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------------------- analyses
def _same_frames(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


@pytest.mark.parametrize("model", ["demo", "tiny:qwen3_moe"])
def test_counterfactual_in_memory_equals_the_command_lines_run_folder(model, demo, demo_trajectories, tmp_path):
    trajs, path = demo_trajectories
    lens = demo if model == "demo" else rl.load(model)
    if model != "demo":   # the tiny model's vocabulary is its own: draw ids inside it
        rng = np.random.default_rng(0)
        records = [{"id": f"r{i}", "input_ids": rng.integers(0, lens.adapter.config.vocab_size, 12).tolist(),
                    "completion_start": 5} for i in range(3)]
        path = write_jsonl(tmp_path / "ids.jsonl", records)
        trajs = rl.trajectories_from_ids([r["input_ids"] for r in records], 5, ids=[r["id"] for r in records])
    out = tmp_path / "cli"
    assert main(["counterfactual", "--model", model, "--trajectories", path, "--layers", "0,-1", "--routes", "6",
                 "--seed", "2", "--out", str(out), "--no-progress"]) == 0
    res = rl.counterfactual(lens, trajs, layers=[0, -1], routes=6, seed=2)
    cli = rl.read_run(str(out))
    _same_frames(res.tokens, cli.tokens)
    _same_frames(res.routes, cli.routes)
    assert res.summary_dict == cli.summary_dict
    _same_frames(res.summary, cli.summary)
    assert set(res.summary["bin"]) == {"Confident", "Ambiguous", "Fragile", "All"}
    assert res.path is None and cli.path == str(out)

    saved = res.save(str(tmp_path / "saved"))
    _same_frames(saved.routes, cli.routes)
    assert saved.info["status"] == "complete" and saved.config["trajectories"] == "in-memory"
    assert rl.read_trajectories(str(tmp_path / "saved" / "trajectories.jsonl"))[0].input_ids == trajs[0].input_ids
    # a saved in-memory run is a run folder like any other: resuming it recomputes nothing
    again = rl.counterfactual(lens, trajs, str(tmp_path / "saved"), layers=[0, -1], routes=6, seed=2,
                                  show_progress=False)
    assert again.info["timings"]["tokens_scored_this_session"] == 0


def test_isolation_in_memory_equals_the_command_lines_run_folder(demo, tmp_path):
    out = tmp_path / "iso"
    assert main(["isolate", "--task", "arithmetic", "--per-domain", "3", "--layers", "0,-1", "--floor-seeds", "2",
                 "--seed", "1", "--out", str(out), "--no-progress"]) == 0
    res = rl.isolate(demo, "arithmetic", per_domain=3, layers=[0, -1], floor_seeds=2, seed=1)
    cli = rl.read_run(str(out))
    for table in ("isolation", "routing", "cells", "calibration"):
        _same_frames(res.table(table), cli.table(table))
    assert res.summary_dict == cli.summary_dict
    _same_frames(res.summary, cli.summary)
    assert set(res.summary["domain"]) == {"addsub", "mul", "long", "mixed"}


def test_passk_in_memory_equals_the_command_lines_run_folder(demo, tmp_path):
    out = tmp_path / "pk"
    assert main(["passk", "--task", "arithmetic", "--n", "4", "--samples", "3", "--k", "1,3", "--seed", "5",
                 "--out", str(out), "--no-progress"]) == 0
    res = rl.passk(demo, "arithmetic", n=4, samples=3, k=[1, 3], seed=5)
    cli = rl.read_run(str(out))
    _same_frames(res.samples, cli.samples)
    _same_frames(res.problems, cli.problems)
    _same_frames(res.summary, cli.summary)
    assert list(res.summary[res.summary["group"] == "all"]["k"]) == [1, 3]


def test_router_update_from_a_saved_result_leaves_the_model_unchanged(demo, demo_trajectories, tmp_path):
    from routelens.analyses.router_update.analysis import parameter_hashes

    trajs, _ = demo_trajectories
    before = parameter_hashes(demo.model)
    cf = rl.counterfactual(demo, trajs, layers=[-1], routes=8)
    with pytest.raises(rl.RouteLensError, match="save it first"):
        rl.router_update(demo, cf, out=str(tmp_path / "no"))
    saved = cf.save(str(tmp_path / "cf"))
    update = rl.router_update(demo, saved, out=str(tmp_path / "upd"), margin=0.0, steps=4, lr=1e-2)
    assert update.summary_dict["router_changed"] and update.summary_dict["only_router_changed"]
    assert len(update.training_log) == 4 and len(update.pairs) == update.summary_dict["pairs"] > 0
    assert parameter_hashes(demo.model) == before          # the update lives in the delta file only
    updated = rl.load("demo", router_delta=update.delta_path)
    changed = [n for n, h in parameter_hashes(updated.model).items() if h != before[n]]
    assert changed == update.summary_dict["parameters_changed"]


def test_report_of_a_saved_result(demo, demo_trajectories, tmp_path):
    trajs, _ = demo_trajectories
    res = rl.counterfactual(demo, trajs, layers=[-1], routes=4)
    with pytest.raises(rl.RouteLensError, match="save the result first"):
        res.report()
    page = res.save(str(tmp_path / "cf")).report()
    html = open(page, encoding="utf-8").read()
    assert "<img" in html and str(len(res.tokens)) in html


# ---------------------------------------------------------------------------- export
@pytest.mark.parametrize("fmt", ["csv", "latex", "markdown"])
def test_export_writes_the_summary_table(fmt, demo, demo_trajectories, tmp_path, capsys):
    trajs, _ = demo_trajectories
    run = rl.counterfactual(demo, trajs, layers=[0, -1], routes=4).save(str(tmp_path / "cf"))
    target = tmp_path / f"table.{fmt}"
    assert main(["export", run.path, "--format", fmt, "--out", str(target)]) == 0
    text = target.read_text()
    frame = run.summary
    if fmt == "csv":
        back = pd.read_csv(target)
        assert list(back.columns) == list(frame.columns)
        np.testing.assert_allclose(back["gain"].to_numpy(float), frame["gain"].to_numpy(float), equal_nan=True)
    elif fmt == "latex":
        assert "\\begin{tabular}" in text and "\\toprule" in text and text.count("\\\\") >= len(frame) + 1
        assert "gain\\_ci\\_low" in text and "gain_ci_low" not in text      # escaped: the table compiles
        assert f"{frame['gain'].dropna().iloc[0]:.4f}" in text
    else:
        lines = text.strip().splitlines()
        assert lines[0].startswith("|") and len(lines) == len(frame) + 2
        assert f"{frame['gain'].dropna().iloc[0]:.4f}" in text
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_read_run_refuses_an_unfinished_run(demo, demo_trajectories, tmp_path):
    trajs, _ = demo_trajectories
    run = rl.counterfactual(demo, trajs[:1], layers=[-1], routes=4).save(str(tmp_path / "cf"))
    state = json.loads((tmp_path / "cf" / "run.json").read_text())
    state["status"] = "running"
    (tmp_path / "cf" / "run.json").write_text(json.dumps(state))
    with pytest.raises(rl.RouteLensError, match="running counterfactual run"):
        rl.read_run(run.path)


@quick
def test_a_misspelt_option_names_the_command_and_the_option_meant(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["counterfactual", "--trajectories", "x", "--layers", "0", "--out", "y", "--temperature", "0.5"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert "did you mean --gumbel-temperature?" in err and "see `routelens counterfactual --help`" in err


@quick
def test_settings_given_in_another_form_are_taken_or_refused_in_one_line():
    assert rl.PassKConfig(samples=4, k=4).k == [4]                      # one k, as an integer
    with pytest.raises(rl.SettingError, match=r"^`k` must be an integer or a list of integers"):
        rl.PassKConfig(samples=4, k="1,2")


def test_router_update_says_why_it_has_no_ray(tmp_path):
    with pytest.raises(rl.SettingError, match=r"^`ray`: a router update trains its steps one after another"):
        rl.router_update(rl.load("demo"), str(tmp_path / "cf"), str(tmp_path / "u"), ray="local")


@quick
def test_list_and_switch_defaults_read_as_they_are_typed(capsys):
    from routelens.cli import main as cli_main

    for command in ("router-update", "semantic-route"):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "(default Fragile,Ambiguous)" in shown and "(default on)" in shown and "['Fragile'" not in shown
