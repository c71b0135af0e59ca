"""A toy analysis written here, through the contract only (`AnalysisRun`, `UnitJob`,
`run_analysis`), with no edit of routelens's files: it runs in memory and into a run
folder, resumes after SIGKILL to the tables of an uninterrupted run, and runs on Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pytest
import torch
from conftest import PYTHON, kill_when_parts_land, scaled, unit_parts

import routelens as rl
from routelens.distributed import UnitJob, ray_settings
from routelens.runs.loop import AnalysisRun, run_analysis

UNITS = 12


class NextTokenJob(UnitJob):
    """Unit i: the model's natural log-probs of the sequence [i + 1, ..., i + 6]."""

    def setup(self, loaded=None) -> None:
        self._model = self.load(loaded).adapter.model

    def run(self, units: list[int]) -> list[dict[str, pa.Table]]:
        tables = []
        for unit in units:
            ids = torch.arange(unit + 1, unit + 7)[None]
            with torch.no_grad():
                logprobs = torch.log_softmax(self._model(ids).logits[0, :-1].double(), -1)
            picked = logprobs.gather(-1, ids[0, 1:, None])[:, 0]
            tables.append({"scores": pa.table({"unit": [unit] * 5, "position": list(range(5)),
                                               "logprob": picked.tolist()})})
        return tables

    def checks(self) -> dict:
        return {"toy_check": "every unit scored"}


def toy_analysis(lens, out, ray=None, show_progress=False):
    """The toy analysis as a user would write it: a job, a summary, one AnalysisRun."""
    run = AnalysisRun(kind="toy", run_config={"model": lens.loaded.spec, "units": UNITS}, tables=("scores",),
                      units=UNITS, job=NextTokenJob(),
                      summarise=lambda folder: {"mean_logprob": float(folder.read("scores")["logprob"].mean())},
                      groups=lambda todo: [todo[i:i + 3] for i in range(0, len(todo), 3)], label="toy")
    return run_analysis(run, lens.loaded, out, show_progress=show_progress, ray=ray)


def test_a_toy_analysis_runs_in_memory_and_into_a_folder_with_the_same_tables(tmp_path):
    lens = rl.load("demo")
    memory = toy_analysis(lens, None)
    folder = toy_analysis(lens, str(tmp_path / "toy"))
    assert len(memory.read("scores")) == UNITS * 5
    pd.testing.assert_frame_equal(memory.read("scores"), pd.read_parquet(tmp_path / "toy" / "scores.parquet"))
    run_json = json.load(open(tmp_path / "toy" / "run.json"))
    assert run_json["status"] == "complete" and run_json["checks"] == {"toy_check": "every unit scored"}
    assert json.load(open(tmp_path / "toy" / "summary.json")) == memory.summary == folder.summary


SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import routelens as rl
import test_analysis_contract as toy
lens = rl.load("demo")
original = toy.NextTokenJob.run
def slow(self, units):
    time.sleep(0.2)          # a unit takes a while: the kill lands mid-run
    return original(self, units)
toy.NextTokenJob.run = slow
toy.toy_analysis(lens, sys.argv[1])
"""


def test_a_toy_analysis_killed_mid_run_resumes_to_the_uninterrupted_tables(tmp_path):
    script = SCRIPT.format(tests=os.path.dirname(__file__))
    killed = str(tmp_path / "killed")
    kill_when_parts_land(subprocess.Popen([PYTHON, "-c", script, killed], stderr=subprocess.DEVNULL), killed, 3)
    done_at_kill = len(unit_parts(killed, "scores-"))   # run.json's count may lag by the unit being saved
    assert not os.path.exists(os.path.join(killed, "scores.parquet"))
    resumed = subprocess.run([PYTHON, "-c", script, killed], capture_output=True, text=True, timeout=scaled(300))
    assert resumed.returncode == 0, resumed.stderr
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
