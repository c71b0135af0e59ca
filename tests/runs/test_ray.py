"""Ray Data execution (`--ray`): a local Ray instance of 2 actors on this machine.

The float noise of a forward depends on torch's intra-op thread count; Ray gives each
actor one CPU (one thread), so the single-process runs compared with here use one thread
too: the tables are then equal row for row.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch
from conftest import PYTHON, kill_when_parts_land, scaled, unit_parts, wait_until, write_jsonl

import routelens as rl
from routelens.cli import main

RECORDS = [{"id": f"r{i}", "prompt": f"Q:{i}*{i}+{i}=", "completion": f"A:{i}*{i}={i * i};{i * i}+{i}={i * i + i}#{i * i + i}"}
           for i in range(10)]
SETTINGS = dict(layers=[0, -1], routes=4, group_tokens=1)   # one trajectory per group: many groups to share out


class one_thread:
    """torch on one intra-op thread, as in each Ray actor (cpus_per_worker=1)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def _tables(path):
    return {name: pd.read_parquet(os.path.join(path, f"{name}.parquet")) for name in ("routes", "tokens")}


def _assert_same_run(path, reference):
    got, want = _tables(path), _tables(reference)
    for name in want:
        assert len(got[name]) == len(want[name]) > 0
        pd.testing.assert_frame_equal(got[name], want[name], check_exact=True)
    keys = ["trajectory_id", "position", "layer", "route"]
    assert not got["routes"].duplicated(keys).any()
    assert json.load(open(os.path.join(path, "summary.json"))) == json.load(open(os.path.join(reference, "summary.json")))


@pytest.fixture(scope="module")
def single_process(saved_model, tmp_path_factory):
    """The single-process run every Ray run here must reproduce."""
    folder = tmp_path_factory.mktemp("ray") / "single"
    trajectories = write_jsonl(folder.parent / "traj.jsonl", RECORDS)
    with one_thread():
        rl.counterfactual(rl.load(saved_model), trajectories, str(folder), show_progress=False, **SETTINGS)
    return trajectories, str(folder)


@pytest.fixture(autouse=True)
def no_ray_left_running():
    """Every run here starts its own local Ray and must shut it down, whatever happens."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
        pytest.fail("the test left Ray running")


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def _actor_pids() -> list[int]:
    """Processes of Ray Data's map actors (their title names the map_batches class) that
    descend from this process (the local Ray it started), never another Ray's."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                title = handle.read().decode(errors="replace")
            if not (title.startswith("ray::") and "MapWorker" in title):
                continue
            ancestor = int(pid)
            while ancestor > 1 and ancestor != os.getpid():
                ancestor = _parent(ancestor)
        except (OSError, ValueError, IndexError):
            continue
        if ancestor == os.getpid():
            pids.append(int(pid))
    return pids


def test_ray_run_equals_single_process_run(saved_model, single_process, tmp_path):
    """The driver holds the model's structure only (weights=False: what `--ray` loads), the
    actors the weights: the run equals the single-process one exactly."""
    trajectories, reference = single_process
    out = str(tmp_path / "ray")
    driver = rl.load(saved_model, weights=False)
    assert all(parameter.is_meta for parameter in driver.adapter.model.parameters())
    with pytest.raises(rl.RouteLensError, match=r"loaded without weights \(weights=False\), which only a Ray run"):
        rl.counterfactual(driver, trajectories, str(tmp_path / "here"), show_progress=False, **SETTINGS)
    assert not os.path.exists(tmp_path / "here")                  # refused before a run folder is made
    result = rl.counterfactual(driver, trajectories, out, show_progress=False, ray="local", workers=2, **SETTINGS)
    _assert_same_run(out, reference)
    run_json = json.load(open(os.path.join(out, "run.json")))
    assert run_json["execution"]["ray"]["workers"] == 2 and run_json["status"] == "complete"
    assert run_json["units_done"] == len(RECORDS)
    assert run_json["checks"]["standard_route_max_abs_logprob_diff"] < 1e-4   # merged from the actors' checks
    assert result.summary_dict == json.load(open(os.path.join(reference, "summary.json")))


def test_run_started_in_one_process_is_finished_on_ray_despite_a_killed_actor(saved_model, single_process, tmp_path,
                                                                             cli_env):
    trajectories, reference = single_process
    out = str(tmp_path / "mixed")
    cli_env["OMP_NUM_THREADS"] = "1"
    command = [PYTHON, "-m", "routelens", "counterfactual", "--model", saved_model, "--trajectories", trajectories,
               "--layers", "0,-1", "--routes", "4", "--group-tokens", "1", "--out", out, "--no-progress"]
    # a unit is done once its last table's part lands (null_routes, after routes and tokens): a
    # kill between two parts of a unit leaves it undone, for the Ray session to score
    done = "null_routes-"
    kill_when_parts_land(subprocess.Popen(command, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                         out, 3, prefix=done)
    started_alone = len(unit_parts(out, done))
    assert 3 <= started_alone < len(RECORDS)

    killed = []

    def kill_an_actor_mid_run():
        # at the first group the actors finish, the others are still to score: one actor
        # dies mid-run (waiting on files, not on time)
        found = []

        def first_group_on_ray():
            found[:] = _actor_pids() if len(unit_parts(out, done)) > started_alone else []
            return bool(found)

        try:
            wait_until(first_group_on_ray, 240, "the first group scored on Ray")
            with open(f"/proc/{found[0]}/stat") as handle:
                niceness = int(handle.read().rsplit(")", 1)[1].split()[16])
            os.kill(found[0], signal.SIGKILL)
            killed.append((found[0], len(unit_parts(out, done)), niceness))
        except (AssertionError, OSError) as error:   # said by the test's own assertion below
            killed.append(error)

    watcher = threading.Thread(target=kill_an_actor_mid_run, daemon=True)
    watcher.start()
    rl.counterfactual(rl.load(saved_model), trajectories, out, show_progress=False, ray="local", workers=2, **SETTINGS)
    watcher.join(timeout=scaled(5))
    assert killed and isinstance(killed[0], tuple), f"no actor was killed: {killed}"
    assert killed[0][1] < len(RECORDS), "the actor was killed after the run had scored every group"
    assert killed[0][2] == os.nice(0), "a local Ray's actors run at the driver's priority (Ray's default is nice 15)"
    _assert_same_run(out, reference)
    run_json = json.load(open(os.path.join(out, "run.json")))
    assert [s["execution"]["ray"] is None for s in run_json["sessions"]] == [True, False]
    assert run_json["sessions"][1]["units_done"] == len(RECORDS) - started_alone   # nothing done twice


def test_ray_without_ray_installed_is_a_one_line_error(saved_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)   # import ray -> ImportError
    trajectories = write_jsonl(tmp_path / "traj.jsonl", RECORDS[:1])
    assert main(["counterfactual", "--model", saved_model, "--trajectories", trajectories, "--layers", "0",
                 "--out", str(tmp_path / "r"), "--ray", "local"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == ("routelens: error: --ray needs Ray Data, which is not installed here: "
                    "pip install 'routelens[ray]' (or: pip install 'ray[data]==2.60.*')")
    assert not os.path.exists(tmp_path / "r")   # refused before the model loaded or the folder was made


def test_workers_without_ray_is_refused(saved_model, tmp_path, capsys):
    trajectories = write_jsonl(tmp_path / "traj.jsonl", RECORDS[:1])
    assert main(["counterfactual", "--model", saved_model, "--trajectories", trajectories, "--layers", "0",
                 "--out", str(tmp_path / "r"), "--workers", "4"]) == 2
    assert capsys.readouterr().err.strip() == "routelens: error: --workers needs --ray (local, auto or a cluster address)"


@pytest.mark.parametrize("address", ["10.255.255.1:6379", "ray://nowhere:10001"])
def test_an_unreachable_cluster_is_refused_at_once_in_one_line(saved_model, tmp_path, capfd, address):
    """Joining a cluster that does not answer fails within seconds (not Ray's minute of
    retries), before the model loads or a folder is made, in one line: Ray's own connection
    log, which its core writes to file descriptor 2, is not shown."""
    trajectories = write_jsonl(tmp_path / "traj.jsonl", RECORDS[:1])
    started = time.perf_counter()
    assert main(["counterfactual", "--model", saved_model, "--trajectories", trajectories, "--layers", "0",
                 "--out", str(tmp_path / "r"), "--ray", address]) == 2
    assert time.perf_counter() - started < scaled(10)
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("routelens: error: ") and address in err, err
    assert not os.path.exists(tmp_path / "r")


def test_local_ray_settings_beyond_this_machine_are_refused_before_ray_starts(saved_model, tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    trajectories = write_jsonl(tmp_path / "traj.jsonl", RECORDS[:1])
    command = ["counterfactual", "--model", saved_model, "--trajectories", trajectories, "--layers", "0",
               "--out", str(tmp_path / "r"), "--ray", "local"]
    assert main([*command, "--gpus-per-worker", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "routelens: error: --gpus-per-worker 1 for 2 worker(s) needs 2 GPU(s), but this machine has none (torch sees 0 "
        "CUDA device(s)); drop --gpus-per-worker (CPU actors) or join a GPU cluster with --ray ADDRESS")
    assert main([*command, "--cpus-per-worker", str((os.cpu_count() or 1) + 1)]) == 2
    assert "is more CPUs than this machine has" in capsys.readouterr().err
    with pytest.raises(rl.RouteLensError, match="`device_map` and `ray` together"):   # the API says it too
        rl.counterfactual(rl.load(saved_model, device_map="auto"), trajectories, str(tmp_path / "r"), layers=[0],
                          show_progress=False, ray="local")
    assert not ray.is_initialized() and not os.path.exists(tmp_path / "r")


def test_a_model_given_as_an_object_is_refused_on_ray(saved_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lens = rl.wrap(AutoModelForCausalLM.from_pretrained(saved_model), AutoTokenizer.from_pretrained(saved_model))
    trajectories = write_jsonl(tmp_path / "traj.jsonl", RECORDS[:1])
    with pytest.raises(rl.RouteLensError, match=r"given as an object \(routelens.wrap\); Ray workers load the model"):
        rl.counterfactual(lens, trajectories, str(tmp_path / "r"), layers=[0], show_progress=False, ray="local")
    assert not os.path.exists(tmp_path / "r")


def test_isolation_and_rollouts_on_ray_equal_single_process_runs(tmp_path):
    lens = rl.load("demo")
    trajectories = rl.trajectories_from_text(lens.tokenizer, [("Q:3+4=A:", "3+4=7#7"), ("Q:9*2=A:", "9*2=18#18")],
                                             answers=["7", "18"])
    counterfactual = rl.counterfactual(lens, trajectories, layers=[-1], routes=4).save(str(tmp_path / "cf"))
    isolation = dict(per_domain=2, layers=[0], floor_seeds=1, group_items=2, show_progress=False)   # the same groups
    rollout = dict(tokens="all", limit=4, samples=2, max_new_tokens=8, show_progress=False)
    with one_thread():
        rl.isolate(lens, "arithmetic", str(tmp_path / "iso-single"), **isolation)
        rl.rollout(lens, counterfactual, str(tmp_path / "rollout-single"), **rollout)
    driver = rl.load("demo", weights=False)   # what the command line loads with --ray
    rl.isolate(driver, "arithmetic", str(tmp_path / "iso-ray"), ray="local", workers=2, **isolation)
    rl.rollout(driver, counterfactual, str(tmp_path / "rollout-ray"), ray="local", workers=2, **rollout)
    for kind, tables in (("iso", ("isolation", "routing", "cells")), ("rollout", ("rollouts",))):
        for table in tables:
            got = pd.read_parquet(tmp_path / f"{kind}-ray" / f"{table}.parquet")
            want = pd.read_parquet(tmp_path / f"{kind}-single" / f"{table}.parquet")
            assert len(got) == len(want) > 0
            pd.testing.assert_frame_equal(got, want, check_exact=True)
        run_json = json.load(open(tmp_path / f"{kind}-ray" / "run.json"))
        assert run_json["execution"]["ray"]["workers"] == 2 and run_json["status"] == "complete"
        assert run_json["checks"] and all(value is not None for value in run_json["checks"].values())


def test_trajectories_sampled_on_ray_equal_the_single_process_file(tmp_path, capsys):
    """`trajectories --ray local --workers 2`: groups of problems on two actors, the same
    records in the same order as one process (each prompt draws from its own generator)."""
    args = ["trajectories", "--model", "demo", "--task", "arithmetic", "--n", "6", "--samples-per-problem", "2",
            "--max-new-tokens", "24", "--batch-size", "4", "--no-progress"]
    with one_thread():
        assert main([*args, "--out", str(tmp_path / "single.jsonl")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray.jsonl"), "--ray", "local", "--workers", "2"]) == 0
    single = [json.loads(line) for line in open(tmp_path / "single.jsonl")]
    on_ray = [json.loads(line) for line in open(tmp_path / "ray.jsonl")]
    assert len(single) == 12 and on_ray == single
    assert [r["id"] for r in single] == [f"{p}-s{s}" for p in dict.fromkeys(r["problem_id"] for r in single) for s in (0, 1)]
    assert json.load(open(tmp_path / "ray.jsonl.run" / "run.json"))["execution"]["ray"]["workers"] == 2
    # a run begun in one process (here: its folder less three problems) is finished on Ray
    shutil.copytree(tmp_path / "single.jsonl.run", tmp_path / "mixed.jsonl.run")
    for unit in (1, 2, 5):
        os.remove(tmp_path / "mixed.jsonl.run" / "parts" / f"records-{unit:07d}.parquet")
    assert main([*args, "--out", str(tmp_path / "mixed.jsonl"), "--ray", "local", "--workers", "2"]) == 0
    assert [json.loads(line) for line in open(tmp_path / "mixed.jsonl")] == single
    state = json.load(open(tmp_path / "mixed.jsonl.run" / "run.json"))
    assert [session["units_done"] for session in state["sessions"]] == [6, 3]


def test_semantic_routing_on_ray_equals_the_single_process_run(tmp_path):
    """`semantic-route --ray local --workers 2`: chunks of items on two actors, each
    calibrating the fingerprints itself; the same tables as one process."""
    args = ["semantic-route", "--model", "demo", "--items", "arithmetic", "--per-domain", "36", "--floor-seeds", "1",
            "--max-new-tokens", "24", "--no-progress"]
    with one_thread():
        assert main([*args, "--out", str(tmp_path / "single")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray", "local", "--workers", "2"]) == 0
    for table in ("fingerprints", "scores", "classification", "accuracy"):
        got, want = pd.read_parquet(tmp_path / "ray" / f"{table}.parquet"), pd.read_parquet(tmp_path / "single" / f"{table}.parquet")
        assert len(got) == len(want) > 0
        pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert json.load(open(tmp_path / "ray" / "summary.json")) == json.load(open(tmp_path / "single" / "summary.json"))
    run_json = json.load(open(tmp_path / "ray" / "run.json"))
    assert run_json["execution"]["ray"]["workers"] == 2 and run_json["units_done"] == 2   # 72 items: two chunks


def test_graft_evaluation_on_ray_equals_the_single_process_run(tmp_path):
    """`graft --evaluate --ray local`: the actors load the recipient and apply the plan's donor
    tensors themselves; the evaluation equals one process's."""
    args = ["graft", "--recipient", "demo", "--donor", "demo", "--experts", "3:5=3:9", "--evaluate", "--per-domain", "8",
            "--no-progress"]
    with one_thread():
        assert main([*args, "--out", str(tmp_path / "single")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray", "local", "--workers", "2"]) == 0
    got = pd.read_parquet(tmp_path / "ray" / "evaluation" / "items.parquet")
    want = pd.read_parquet(tmp_path / "single" / "evaluation" / "items.parquet")
    assert len(got) == len(want) == 32
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    run_json = json.load(open(tmp_path / "ray" / "evaluation" / "run.json"))
    assert run_json["execution"]["ray"]["workers"] == 2 and run_json["status"] == "complete"
    assert main(["graft", "--recipient", "demo", "--donor", "demo", "--experts", "3:5=3:9", "--out",
                 str(tmp_path / "x"), "--ray", "local"]) == 2                   # --ray without --evaluate


@pytest.mark.quick
def test_a_ray_driver_names_a_device_its_actors_hold_and_it_lacks():
    """`--device cuda --ray ...` on a driver without a GPU: the driver loads no weight, so
    it resolves the device (and the dtype that goes with it) for its actors instead of
    refusing; a run here with weights still refuses a device this machine lacks."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has the device")
    for spec in ("demo", "tiny:olmoe"):
        driver = rl.load(spec, device="cuda", weights=False)
        assert driver.loaded.device == "cuda" and driver.loaded.dtype == "bfloat16"
    with pytest.raises(rl.RouteLensError, match="no cuda device is available here"):
        rl.load("demo", device="cuda")
def _demo_router_delta(path) -> str:
    """A router delta for the demo model (its last router, perturbed with seeded noise)."""
    from routelens.models.router_delta import router_parameter_names, save_router_delta

    adapter = rl.load("demo").adapter
    layer = adapter.moe_layers[-1]
    names = router_parameter_names(adapter, layer)
    base = {name: parameter.detach().clone() for name, parameter in names.items()}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in names.values():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
    save_router_delta(str(path), adapter, layer, base, "demo")
    return str(path)


def test_passk_on_ray_equals_the_single_process_run(tmp_path):
    """`passk --compare --ray local --workers 2`: (arm, chunk) units on two actors, each
    applying the arm's router delta itself; every sample draws from the generator of its
    (seed, problem, sample), so the samples are those of one process, whichever actor drew them."""
    delta = _demo_router_delta(tmp_path / "delta.safetensors")
    args = ["passk", "--model", "demo", "--router-delta", delta, "--compare", "--task", "arithmetic", "--n", "60",
            "--samples", "2", "--k", "1,2", "--temperature", "1.0", "--seed", "3", "--max-new-tokens", "24",
            "--bootstrap-resamples", "100", "--no-progress"]
    with one_thread():
        assert main([*args, "--out", str(tmp_path / "single")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray", "local", "--workers", "2"]) == 0
    for table in ("samples", "problems"):
        got, want = pd.read_parquet(tmp_path / "ray" / f"{table}.parquet"), pd.read_parquet(tmp_path / "single" / f"{table}.parquet")
        assert len(got) == len(want) > 0
        pd.testing.assert_frame_equal(got, want, check_exact=True)
    samples = pd.read_parquet(tmp_path / "single" / "samples.parquet")
    base, updated = (samples[samples["arm"] == arm]["completion"].tolist() for arm in ("base", "updated"))
    assert len(base) == 120 and base != updated, "the delta changed no sample: the arms test nothing"
    assert json.load(open(tmp_path / "ray" / "summary.json")) == json.load(open(tmp_path / "single" / "summary.json"))
    run_json = json.load(open(tmp_path / "ray" / "run.json"))
    assert run_json["execution"]["ray"]["workers"] == 2 and run_json["status"] == "complete"
    assert run_json["units_done"] == 4   # 2 arms x 2 chunks of problems (50 + 10)
