"""A toy analysis written here, through the contract only (`AnalysisRun`, `UnitJob`,
`run_analysis`, a config of `setting`s and an `AnalysisCommand`), with no edit of
routelens's files: it runs in memory and into a run folder, resumes after SIGKILL to the
tables of an uninterrupted run, runs on Ray, and is a `routelens` command (declared in the
entry-point group `routelens.commands` of a package installed in a temporary folder) that
does all of that from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pytest
import torch
from conftest import PYTHON, TESTS, kill_when_parts_land, scaled, unit_parts

import routelens as rl
from routelens.cli import main
from routelens.cli.analysis_command import AnalysisCommand
from routelens.config import setting
from routelens.distributed import UnitJob, ray_settings
from routelens.errors import SettingError
from routelens.runs.loop import AnalysisRun, run_analysis

UNITS = 12


@dataclass
class ToyConfig:
    """The toy's settings: each field is an option of `routelens toy`."""

    units: int = setting(UNITS, help="sequences scored")
    pause: float = setting(0.0, help="seconds each unit waits (a test kills the run mid-way)")

    def __post_init__(self):
        if isinstance(self.units, bool) or not isinstance(self.units, int) or self.units < 1:
            raise SettingError(f"`units` must be a positive integer, got {self.units!r}", "units")


class NextTokenJob(UnitJob):
    """Unit i: the model's natural log-probs of the sequence [i + 1, ..., i + 6]."""

    def setup(self, loaded=None) -> None:
        self._model = self.load(loaded).adapter.model

    def __init__(self, pause: float = 0.0):
        self.pause = pause

    def run(self, units: list[int]) -> list[dict[str, pa.Table]]:
        tables = []
        for unit in units:
            time.sleep(self.pause)
            ids = torch.arange(unit + 1, unit + 7)[None]
            with torch.no_grad():
                logprobs = torch.log_softmax(self._model(ids).logits[0, :-1].double(), -1)
            picked = logprobs.gather(-1, ids[0, 1:, None])[:, 0]
            tables.append({"scores": pa.table({"unit": [unit] * 5, "position": list(range(5)),
                                               "logprob": picked.tolist()})})
        return tables

    def checks(self) -> dict:
        return {"toy_check": "every unit scored"}


def toy_analysis(lens, out, ray=None, show_progress=False, config=None, overwrite=False):
    """The toy analysis as a user would write it: a job, a summary, one AnalysisRun (the
    pause changes no number: it is not part of the run's identity)."""
    config = config or ToyConfig()
    run = AnalysisRun(kind="toy", run_config={"model": lens.loaded.spec, "units": config.units}, tables=("scores",),
                      units=config.units, job=NextTokenJob(config.pause),
                      summarise=lambda folder: {"mean_logprob": float(folder.read("scores")["logprob"].mean())},
                      groups=lambda todo: [todo[i:i + 3] for i in range(0, len(todo), 3)], label="toy")
    return run_analysis(run, lens.loaded, out, overwrite=overwrite, show_progress=show_progress, ray=ray)


TOY_COMMAND = AnalysisCommand(name="toy", help="natural log-probs of counting sequences (a test's analysis)",
                              config=ToyConfig, analysis=toy_analysis,
                              report=lambda folder: print(f"mean log-prob {folder.summary['mean_logprob']:.6f}"))


def test_a_toy_analysis_runs_in_memory_and_into_a_folder_with_the_same_tables(tmp_path):
    lens = rl.load("demo")
    memory = toy_analysis(lens, None)
    folder = toy_analysis(lens, str(tmp_path / "toy"))
    assert len(memory.read("scores")) == UNITS * 5
    pd.testing.assert_frame_equal(memory.read("scores"), pd.read_parquet(tmp_path / "toy" / "scores.parquet"))
    run_json = json.load(open(tmp_path / "toy" / "run.json"))
    assert run_json["status"] == "complete" and run_json["checks"] == {"toy_check": "every unit scored"}
    assert json.load(open(tmp_path / "toy" / "summary.json")) == memory.summary == folder.summary


def toy_package(folder) -> str:
    """A folder holding an installed package's metadata that declares `routelens toy`."""
    site = folder / "site"
    (site / "toy_analysis-0.1.dist-info").mkdir(parents=True)
    (site / "toy_analysis-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-analysis\nVersion: 0.1\n")
    (site / "toy_analysis-0.1.dist-info" / "entry_points.txt").write_text(
        "[routelens.commands]\ntoy = test_analysis_contract:TOY_COMMAND\n")
    return str(site)


def toy_command(args: list[str], site: str, **popen):
    """`routelens toy ...` in a fresh process that sees the toy package and this module."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([site, os.path.dirname(__file__), TESTS,
                                                          os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([PYTHON, "-m", "routelens", "toy", "--no-progress", *args], env=env, **popen)


def test_a_toy_analysis_is_a_command_with_its_config_as_options(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(toy_package(tmp_path))
    assert main(["toy", "--units", "6", "--out", str(tmp_path / "cli")]) == 0
    assert "mean log-prob" in capsys.readouterr().out
    api = toy_analysis(rl.load("demo"), None, config=ToyConfig(units=6))
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "cli" / "scores.parquet"), api.read("scores"))
    assert json.load(open(tmp_path / "cli" / "run.json"))["config"]["units"] == 6
    assert main(["toy", "--units", "0", "--out", str(tmp_path / "bad")]) == 2          # the config's check,
    assert capsys.readouterr().err.strip() == "routelens: error: --units must be a positive integer, got 0"   # as an option
    assert not os.path.exists(tmp_path / "bad")
    with pytest.raises(SystemExit):
        main(["toy", "--help"])
    shown = capsys.readouterr().out
    assert "--units UNITS" in shown and "sequences scored (default 12)" in shown and "--ray WHERE" in shown


def test_a_broken_installed_command_is_skipped_with_a_warning_and_the_rest_work(tmp_path, monkeypatch, capsys):
    """An entry point that fails to import, one that is no command and one that takes a
    built-in name are each skipped with a warning naming it; `routelens` and the toy work."""
    site = toy_package(tmp_path)
    (tmp_path / "site" / "toy_analysis-0.1.dist-info" / "entry_points.txt").write_text(
        "[routelens.commands]\ntoy = test_analysis_contract:TOY_COMMAND\nbroken = no_such_module:COMMAND\n"
        "notacommand = test_analysis_contract:UNITS\ncounterfactual = test_analysis_contract:CLASHING\n")
    monkeypatch.syspath_prepend(site)
    with pytest.warns(UserWarning) as caught:
        with pytest.raises(SystemExit):
            main(["--help"])
    shown = capsys.readouterr().out
    assert "toy" in shown and "counterfactual" in shown
    messages = " ".join(str(w.message) for w in caught)
    assert "no_such_module:COMMAND" in messages and "failed to import" in messages
    assert "is not a command" in messages and "takes the name of the routelens command 'counterfactual'" in messages


CLASHING = AnalysisCommand(name="counterfactual", help="clashes with a built-in", config=ToyConfig, analysis=toy_analysis)


def test_a_toy_command_killed_mid_run_resumes_to_the_uninterrupted_tables(tmp_path):
    site, killed = toy_package(tmp_path), str(tmp_path / "killed")
    kill_when_parts_land(toy_command(["--pause", "0.2", "--out", killed], site, stderr=subprocess.DEVNULL), killed, 3)
    done_at_kill = len(unit_parts(killed, "scores-"))   # run.json's count may lag by the unit being saved
    assert not os.path.exists(os.path.join(killed, "scores.parquet"))
    resumed = toy_command(["--out", killed], site, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = resumed.communicate(timeout=scaled(300))
    assert resumed.returncode == 0, stderr
    whole = toy_analysis(rl.load("demo"), str(tmp_path / "whole"))
    pd.testing.assert_frame_equal(pd.read_parquet(os.path.join(killed, "scores.parquet")), whole.read("scores"))
    sessions = json.load(open(os.path.join(killed, "run.json")))["sessions"]
    assert len(sessions) == 2 and sessions[1]["units_done"] == UNITS - done_at_kill   # nothing twice


def test_a_toy_analysis_runs_on_ray(tmp_path):
    pytest.importorskip("ray")
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the job's class travels with it
    lens = rl.load("demo")
    single = toy_analysis(lens, str(tmp_path / "single"))
    on_ray = toy_analysis(rl.load("demo", weights=False), str(tmp_path / "ray"), ray=ray_settings("local"))
    assert json.load(open(tmp_path / "ray" / "run.json"))["execution"]["ray"]["workers"] == 2
    pd.testing.assert_frame_equal(on_ray.read("scores"), single.read("scores"), check_exact=False, atol=1e-6)


def test_a_toy_command_runs_on_ray(tmp_path):
    pytest.importorskip("ray")
    site = toy_package(tmp_path)
    command = toy_command(["--out", str(tmp_path / "ray"), "--ray", "local", "--workers", "2"], site,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = command.communicate(timeout=scaled(600))
    assert command.returncode == 0, stderr
    assert json.load(open(tmp_path / "ray" / "run.json"))["execution"]["ray"]["workers"] == 2
    single = toy_analysis(rl.load("demo"), None)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "ray" / "scores.parquet"), single.read("scores"),
                                  check_exact=False, atol=1e-6)
