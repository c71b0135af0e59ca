"""Data safety (issue 33): no command replaces or deletes a file the user owns. A user keeps
notes and inputs next to their runs; every command, pointed at them, leaves every byte as
it was, and what it does replace (its own outputs) it replaces only when asked."""

import hashlib
import json
import os
import shutil
import subprocess

import pytest
from conftest import PYTHON, write_jsonl

from routelens.cli import main
from routelens.results.paths import LEDGER, written_by_routelens

GOOD = [{"id": "a", "prompt": "Q:1+2=", "completion": "A:1+2=3#3", "answer": "3"},
        {"id": "b", "prompt": "Q:2+2=", "completion": "A:2+2=4#4", "answer": "4"}]
USER_FILES = {"data.parquet": b"PAR1 mine", "draft.tmp": b"half a thought", "figures/fig1.png": b"\x89PNG mine",
              "report.html": b"<p>my report</p>", "trajectories.jsonl": b'{"mine": 1}\n', "notes.txt": b"keep me"}


def _main(argv) -> int:
    """The exit code, usage errors (SystemExit from argparse) included."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def _cf(model, trajectories, out, *extra):
    return ["counterfactual", "--model", model, "--trajectories", trajectories, "--layers", "0", "--routes", "2",
            "--null-routes", "2", "--out", str(out), "--no-progress", *extra]


def _put_user_files(folder):
    for name, content in USER_FILES.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def _assert_user_files(folder):
    for name, content in USER_FILES.items():
        assert (folder / name).read_bytes() == content, name


def _fingerprint(root) -> dict:
    """Every file under `root` (the user's world) with its SHA-256."""
    prints = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                prints[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
    return prints


@pytest.fixture(scope="module")
def world(tmp_path_factory, saved_model):
    """A user's folder: a model, trajectories, items, problems, a complete run, notes."""
    root = tmp_path_factory.mktemp("safety")
    model = root / "model"
    shutil.copytree(saved_model, model)
    trajectories = write_jsonl(root / "trajectories.jsonl", GOOD)
    items = write_jsonl(root / "items.jsonl", [{"id": f"i{i}", "domain": d, "prompt": "Q:1+2=", "target": "3"}
                                               for i, d in enumerate("xxyy")])
    problems = write_jsonl(root / "problems.jsonl", [{"id": "p", "prompt": "1+2=", "answer": "3"}])
    run = root / "run"
    assert main(_cf(str(model), trajectories, run)) == 0
    tokens = root / "chosen.csv"
    tokens.write_text("trajectory_id,position,layer\na,9,0\n")
    routes = _engine_routes(str(model), trajectories, root / "routes.npz")
    links = tmp_path_factory.mktemp("links")   # outside the user's folder: links resolve to the inputs
    inputs = dict(model=str(model), trajectories=trajectories, items=items, problems=problems, run=str(run),
                  tokens=str(tokens), routes=routes)
    for name, path in inputs.items():
        os.symlink(path, links / name)
    notes = root / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    return dict(root=root, **inputs, notes=str(notes), note=str(notes / "notes.txt"),
                links={path: str(links / name) for name, path in inputs.items()})


def _engine_routes(model, trajectories, path):
    """An engine's routes of the trajectories (an .npz keyed by trajectory id): the model's own
    routes with one expert swapped at one token, so that the audit has a flip to report."""
    import numpy as np
    import torch

    import routelens as rl

    lens = rl.load(model)
    arrays = {}
    with torch.no_grad():
        for t in rl.read_trajectories(trajectories, lens):
            with lens.capture() as routes:
                lens.model(torch.tensor([t.input_ids]))
            arrays[t.id] = np.stack([routes[layer].experts[0].numpy() for layer in lens.moe_layers], axis=1)
    route = arrays["a"][len(arrays["a"]) - 3, 0]
    route[0] = next(e for e in range(lens.num_experts) if e not in route)
    np.savez(path, **arrays)
    return str(path)


# every command, with the options through which it reads and the one through which it writes
COMMANDS = {
    "counterfactual": (lambda w: ["counterfactual", "--model", w["model"], "--trajectories", w["trajectories"],
                                  "--layers", "0", "--no-progress"], "--out"),
    "rollout": (lambda w: ["rollout", "--model", w["model"], "--counterfactual", w["run"], "--tokens", w["tokens"],
                           "--no-progress"], "--out"),
    "isolate": (lambda w: ["isolate", "--model", w["model"], "--items", w["items"], "--layers", "0",
                           "--no-progress"], "--out"),
    "semantic-route": (lambda w: ["semantic-route", "--model", w["model"], "--items", w["items"], "--no-progress"],
                       "--out"),
    "router-update": (lambda w: ["router-update", "--model", w["model"], "--counterfactual", w["run"],
                                 "--no-progress"], "--out"),
    "passk": (lambda w: ["passk", "--model", w["model"], "--problems", w["problems"], "--no-progress"], "--out"),
    "graft": (lambda w: ["graft", "--recipient", w["model"], "--donor", w["model"], "--experts", "0:1=0:2"], "--out"),
    "trajectories": (lambda w: ["trajectories", "--model", w["model"], "--problems", w["problems"], "--no-progress"],
                     "--out"),
    "report": (lambda w: ["report", w["run"]], "--out"),
    "export": (lambda w: ["export", w["run"]], "--out"),
    "verify": (lambda w: ["verify", "--model", w["model"]], "--json"),
    "evaluate": (lambda w: ["evaluate", "--model", w["model"], "--n", "1", "--samples", "1", "--no-progress"],
                 "--out"),
    "replay": (lambda w: ["replay", "--model", w["model"], "--trajectories", w["trajectories"], "--routes-from",
                          w["routes"], "--no-progress"], "--out"),
    # replay's second output, the export of the engine's routes (its --out a fresh folder that is never made)
    "replay --export": (lambda w: ["replay", "--model", w["model"], "--trajectories", w["trajectories"],
                                   "--routes-from", w["routes"], "--no-progress", "--out",
                                   str(w["root"].parent / "replay-never-made")], "--export"),
}
INPUTS = ("model", "trajectories", "items", "problems", "run", "tokens", "routes")


def _targets(w, argv):
    """Where a careless --out may point: at each input the command reads, inside it, around
    it (its folder, the user's whole folder), and at a folder or a file of the user's notes."""
    read = [w[name] for name in INPUTS if w[name] in argv]
    targets = {f"is {os.path.basename(p)}": p for p in read}
    targets.update({f"inside {os.path.basename(p)}": os.path.join(p, "out") for p in read if os.path.isdir(p)})
    targets.update({f"a link to {os.path.basename(p)}": w["links"][p] for p in read})
    targets.update({"around the inputs": str(w["root"]), "the notes folder": w["notes"], "a note": w["note"]})
    return targets


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_output_of_any_command_touches_a_users_file(command, world, capsys):
    """Property: every command, --out at each of its inputs, inside and around them, and at
    the user's notes, with and without --overwrite: refused in one line, every byte kept."""
    build, option = COMMANDS[command]
    argv = build(world)
    before = _fingerprint(world["root"])
    for label, target in _targets(world, argv).items():
        for extra in ([], ["--overwrite"]):
            code = _main([*argv, option, target, *extra])
            err = capsys.readouterr().err.strip()
            assert code == 2, f"{command} {option} {label} {extra}: {err}"
            assert len(err.splitlines()) == 1 and err.startswith("routelens: error: "), err
            assert _fingerprint(world["root"]) == before, f"{command} {option} {label} {extra} changed a file"
    assert not os.path.exists(world["root"].parent / "replay-never-made")


def test_overwrite_removes_exactly_the_files_the_run_listed(world, tmp_path, capsys):
    """The sweep's case: --overwrite of a run folder holding the user's files (names a run
    could write among them) removes the run's files only; run.json lists every file written."""
    folder = tmp_path / "run"
    assert main(_cf(world["model"], world["trajectories"], folder)) == 0
    listed = json.loads((folder / "run.json").read_text())["files"]
    written = {os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names}
    assert set(listed) | {"run.json"} | {n for n in written if n.startswith("parts/")} == written
    assert {"summary.json", "tokens.parquet", "routes.parquet", "null_routes.parquet"} <= set(listed)
    _put_user_files(folder)
    capsys.readouterr()
    assert main(["report", str(folder)]) == 2                  # the user's report.html is not replaced
    assert "report.html was not written by routelens" in capsys.readouterr().err
    assert main(["report", str(folder), "--out", str(tmp_path / "elsewhere.html")]) == 0
    listed = json.loads((folder / "run.json").read_text())["files"]
    figures = [name for name in listed if name.startswith("figures/")]   # written beside the user's figure
    assert figures and all((folder / name).exists() for name in figures) and "report.html" not in listed
    assert main(_cf(world["model"], world["trajectories"], folder, "--routes", "3", "--overwrite")) == 0
    _assert_user_files(folder)
    state = json.loads((folder / "run.json").read_text())
    assert state["config"]["routes"] == 3 and len(state["sessions"]) == 1
    assert not any(name.startswith("figures/") for name in state["files"])   # the old run's figures went
    assert sorted(os.listdir(folder / "figures")) == ["fig1.png"]


def test_a_run_never_writes_over_a_file_it_did_not_list(world, tmp_path, capsys):
    """A file of the user's named as a run's output (summary.json dropped into a fresh run
    folder while it runs) is refused, not replaced."""
    folder = tmp_path / "run"
    shutil.copytree(world["run"], folder)
    state = json.loads((folder / "run.json").read_text())
    state["files"].remove("summary.json")        # as if the user put their own summary.json there
    state["status"] = "running"
    (folder / "run.json").write_text(json.dumps(state))
    (folder / "summary.json").write_text("mine")
    assert main(_cf(world["model"], world["trajectories"], folder)) == 2
    assert "summary.json was not written by routelens" in capsys.readouterr().err
    assert (folder / "summary.json").read_text() == "mine"


def test_overwrite_of_a_run_without_a_list_of_files_removes_nothing(world, tmp_path, capsys):
    folder = tmp_path / "old"
    shutil.copytree(world["run"], folder)
    state = json.loads((folder / "run.json").read_text())
    del state["files"]
    (folder / "run.json").write_text(json.dumps(state))
    before = _fingerprint(folder)
    assert main(_cf(world["model"], world["trajectories"], folder, "--routes", "3", "--overwrite")) == 2
    assert "removes nothing; delete the folder yourself" in capsys.readouterr().err
    assert _fingerprint(folder) == before


def test_relative_input_inside_out_is_refused_in_python_too(world, tmp_path, monkeypatch):
    """`rollout --tokens ro/chosen.csv --out ro --overwrite` deleted its input when relative."""
    import routelens as rl

    monkeypatch.chdir(tmp_path)
    os.makedirs("ro")
    shutil.copy(world["tokens"], "ro/chosen.csv")
    with pytest.raises(rl.RouteLensError, match="contains this command's input"):
        rl.rollout(rl.load(world["model"]), world["run"], "ro", tokens="ro/chosen.csv", overwrite=True,
                   show_progress=False)
    assert main(["rollout", "--model", world["model"], "--counterfactual", world["run"], "--tokens", "ro/chosen.csv",
                 "--out", "ro", "--overwrite"]) == 2
    assert open("ro/chosen.csv").read() == open(world["tokens"]).read()


@pytest.mark.parametrize("command", ["export", "report", "verify", "trajectories"])
def test_a_file_output_replaces_only_its_own_earlier_output(command, world, tmp_path, capsys):
    """An existing file: never replaced when routelens did not write it (not even with
    --overwrite), replaced when it did only with --overwrite, and not once edited by the user.
    A missing parent folder is created."""
    argv, option = COMMANDS[command][0](world), COMMANDS[command][1]
    if command == "trajectories":
        argv += ["--n", "1", "--samples-per-problem", "1", "--max-new-tokens", "4"]
    out = tmp_path / "new" / "folder" / f"out.{'html' if command == 'report' else 'json'}"
    run = [*argv, option, str(out)]
    assert main(run) in (0, 1)                                     # created with its folders (verify may fail: 1)
    assert (out.parent / LEDGER).exists()
    first = out.read_bytes()
    if command == "trajectories":                                  # its run folder resumes: the same file again
        assert main(run) == 0 and out.read_bytes() == first
        shutil.rmtree(str(out) + ".run")
    capsys.readouterr()
    assert main(run) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert main([*run, "--overwrite"]) in (0, 1)
    out.write_bytes(out.read_bytes() + b"\n")                      # the user edits it: no longer ours
    edited = out.read_bytes()
    if command == "trajectories":
        shutil.rmtree(str(out) + ".run")
    capsys.readouterr()
    assert main([*run, "--overwrite"]) == 2
    assert "was not written by routelens (or was changed since)" in capsys.readouterr().err
    assert out.read_bytes() == edited
    mine = tmp_path / "mine.txt"
    mine.write_text("keep me")
    assert main([*argv, option, str(mine), "--overwrite"]) == 2
    assert mine.read_text() == "keep me"


def test_disk_offload_and_the_font_cache_leave_nothing_behind(world, tmp_path, cli_env):
    """--device-map with disk offload leaves no routelens-offload-* in $TMPDIR; report writes
    no matplotlib cache into $HOME."""
    home, temporary = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    temporary.mkdir()
    env = {**cli_env, "HOME": str(home), "TMPDIR": str(temporary)}
    env.pop("MPLCONFIGDIR", None)
    device_map = json.dumps({"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
                             "model.rotary_emb": "cpu", "lm_head": "cpu"})
    result = subprocess.run([PYTHON, "-m", "routelens", "inspect", "--model", world["model"], "--device-map",
                             device_map], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not list(temporary.glob("routelens-offload-*"))
    copy = tmp_path / "run"
    shutil.copytree(world["run"], copy)
    result = subprocess.run([PYTHON, "-m", "routelens", "report", str(copy)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert _fingerprint(home) == {}
    assert not list(temporary.glob("routelens-matplotlib-*"))


def test_overwrite_never_removes_outside_the_run_folder(world, tmp_path, capsys):
    """A hand-edited run.json that lists "../x", an absolute path or a file behind a folder
    link: --overwrite removes none of them."""
    folder = tmp_path / "run"
    shutil.copytree(world["run"], folder)
    outside, elsewhere = tmp_path / "x.txt", tmp_path / "elsewhere"
    outside.write_text("mine")
    elsewhere.mkdir()
    (elsewhere / "y.txt").write_text("mine too")
    os.symlink(elsewhere, folder / "link")
    state = json.loads((folder / "run.json").read_text())
    state["files"] += ["../x.txt", str(outside), "link/y.txt", "."]
    (folder / "run.json").write_text(json.dumps(state))
    assert main(_cf(world["model"], world["trajectories"], folder, "--routes", "3", "--overwrite")) == 0
    assert outside.read_text() == "mine" and (elsewhere / "y.txt").read_text() == "mine too"
    assert json.loads((folder / "run.json").read_text())["config"]["routes"] == 3


def test_saving_a_stored_result_copies_its_files_only_and_refuses_a_clash(world, tmp_path):
    """Result.save of a result already in a folder copies the files its run.json lists and
    its parts (run.json last), and refuses a file of the user's of the same name."""
    import routelens as rl

    result = rl.read_run(world["run"])
    copy = result.save(str(tmp_path / "copy"))
    source = {os.path.relpath(os.path.join(d, n), world["run"]) for d, _, names in os.walk(world["run"]) for n in names}
    assert _fingerprint(tmp_path / "copy") == {k: v for k, v in _fingerprint(world["run"]).items() if k in source}
    assert copy.summary.equals(result.summary)
    clash = tmp_path / "clash"                                    # another run there, with a summary.json of the user's
    shutil.copytree(world["run"], clash)
    state = json.loads((clash / "run.json").read_text())
    state["config"]["routes"], state["files"] = 7, [n for n in state["files"] if n != "summary.json"]
    (clash / "run.json").write_text(json.dumps(state))
    (clash / "summary.json").write_text("mine")
    with pytest.raises(rl.RouteLensError, match="summary.json was not written by routelens"):
        result.save(str(clash), overwrite=True)
    assert (clash / "summary.json").read_text() == "mine" and not (clash / "run.json").exists()


def test_sigterm_removes_the_disk_offload_folder(world, tmp_path, cli_env):
    """A scheduler's time limit (SIGTERM) ends a command as Ctrl-C does: the offloaded
    weights (as large as the model) do not stay in $TMPDIR."""
    import signal
    import time

    from conftest import scaled, wait_until

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    device_map = json.dumps({"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
                             "model.rotary_emb": "cpu", "lm_head": "cpu"})
    process = subprocess.Popen([PYTHON, "-m", "routelens", "trajectories", "--model", world["model"], "--device-map",
                                device_map, "--problems", world["problems"], "--samples-per-problem", "64",
                                "--max-new-tokens", "200", "--out", str(tmp_path / "t.jsonl"), "--no-progress"],
                               env={**cli_env, "TMPDIR": str(temporary)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    wait_until(lambda: list(temporary.glob("routelens-offload-*/*")), scaled(120), "weights offloaded to disk")
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=scaled(60))
    assert process.returncode == 130, err
    assert "re-run the same command to resume" in err and "Traceback" not in err
    assert not list(temporary.glob("routelens-offload-*"))


def test_file_outputs_refuse_a_folder_path_the_ledger_and_a_file_that_appeared(world, tmp_path, capsys):
    from routelens.errors import RouteLensError
    from routelens.results.paths import check_out_file, write_output

    for out in (str(tmp_path / "new") + "/", str(tmp_path / LEDGER)):
        assert main(["export", world["run"], "--out", out]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
        assert not os.path.exists(out)
    late = tmp_path / "late.md"
    check_out_file(str(late))                       # checked at the start; the user's file appears meanwhile
    late.write_text("mine")
    with pytest.raises(RouteLensError, match="appeared while routelens worked"):
        write_output(str(late), "table", "export")
    assert late.read_text() == "mine"


def test_overwrite_never_empties_a_linked_parts_folder(world, tmp_path):
    folder, outside = tmp_path / "run", tmp_path / "outside"
    shutil.copytree(world["run"], folder)
    shutil.move(str(folder / "parts"), str(outside))          # parts/ now a link to a folder elsewhere
    os.symlink(outside, folder / "parts")
    before = _fingerprint(outside)
    assert main(_cf(world["model"], world["trajectories"], folder, "--routes", "3", "--overwrite")) == 2
    assert _fingerprint(outside) == before


def _replay(w, out, *extra):
    return ["replay", "--model", w["model"], "--trajectories", w["trajectories"], "--routes-from", w["routes"],
            "--bootstrap-resamples", "50", "--no-progress", "--out", str(out), *extra]


def _written(folder) -> set:
    return {os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names}


def test_replay_export_inside_the_run_is_one_of_its_files(world, tmp_path, capsys):
    """--export inside --out: listed in run.json's files (written after it is listed), rewritten
    by the run resumed, removed by --overwrite with the run's other files, never a user's file."""
    import numpy as np

    folder = tmp_path / "run"
    export = folder / "exports" / "routes.npz"
    assert main(_replay(world, folder, "--export", str(export))) == 0
    state = json.loads((folder / "run.json").read_text())
    assert "exports/routes.npz" in state["files"] and state["status"] == "complete"
    assert set(state["files"]) | {"run.json"} | {n for n in _written(folder) if n.startswith("parts/")} == _written(folder)
    assert state["export"]["path"] == str(export) and state["export"]["in_run_folder"] == "exports/routes.npz"
    assert hashlib.sha256(export.read_bytes()).hexdigest() == state["export"]["sha256"]
    with np.load(export) as npz:
        assert sorted(npz.files) == ["__header__.json", "a", "b"] and npz["a"].dtype == np.int16
    flips = json.loads((folder / "summary.json").read_text())["overall"]["flips"]
    assert flips == 1                                      # the one flip the engine's routes hold
    first = export.read_bytes()
    _put_user_files(folder)
    assert main(_replay(world, folder, "--export", str(export))) == 0      # the same run again: resumed, rewritten
    assert export.read_bytes() == first
    _assert_user_files(folder)
    capsys.readouterr()
    assert main(_replay(world, folder, "--export", str(export), "--fragile", "0.4")) == 2   # another run: not without
    assert "--overwrite" in capsys.readouterr().err
    assert main(_replay(world, folder, "--fragile", "0.4", "--overwrite")) == 0   # replaced: its export goes with it
    assert not export.exists() and not (folder / "exports").exists()
    _assert_user_files(folder)
    state = json.loads((folder / "run.json").read_text())
    assert state["export"] is None and not any(name.startswith("exports/") for name in state["files"])
    (folder / "mine.npz").write_bytes(b"my own routes")   # a user's file at the export's path: never replaced
    capsys.readouterr()
    for extra in ([], ["--overwrite"]):
        assert main(_replay(world, folder, "--fragile", "0.4", "--export", str(folder / "mine.npz"), *extra)) == 2
        err = capsys.readouterr().err
        assert "its run.json does not list it" in err and err.count("\n") == 1
    assert (folder / "mine.npz").read_bytes() == b"my own routes"


def test_replay_export_elsewhere_is_replaced_only_when_routelens_wrote_it(world, tmp_path, capsys):
    """--export outside --out: recorded in run.json and in its folder's ledger; the run that
    wrote it rewrites it when resumed; any other run replaces it only with --overwrite, and
    never once the user changed it."""
    exports = tmp_path / "exports"
    export = exports / "routes.npz"
    assert main(_replay(world, tmp_path / "one", "--export", str(export))) == 0
    state = json.loads((tmp_path / "one" / "run.json").read_text())
    assert state["export"]["path"] == str(export) and state["export"]["in_run_folder"] is None
    assert written_by_routelens(str(export)) == "replay" and sorted(os.listdir(exports)) == [LEDGER, "routes.npz"]
    first = export.read_bytes()
    assert main(_replay(world, tmp_path / "one", "--export", str(export))) == 0   # resumed: its own export
    assert export.read_bytes() == first
    capsys.readouterr()
    assert main(_replay(world, tmp_path / "two", "--export", str(export))) == 2   # another run: only with --overwrite
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert not (tmp_path / "two").exists()
    assert main(_replay(world, tmp_path / "two", "--export", str(export), "--overwrite")) == 0
    assert export.read_bytes() == first                     # the same routes
    export.write_bytes(export.read_bytes() + b"\n")         # the user changes it: no longer routelens'
    capsys.readouterr()
    for out in ("one", "two", "three"):
        assert main(_replay(world, tmp_path / out, "--export", str(export), "--overwrite")) == 2
        assert "was not written by routelens (or was changed since)" in capsys.readouterr().err
    assert export.read_bytes() == first + b"\n" and not (tmp_path / "three").exists()


KILL_DRIVER = """
import os, signal, sys
mode = sys.argv[1]
if mode == "before-rename":   # the whole export in its temporary file, killed before the rename
    real = os.replace
    def replace(source, target, *args, **kwargs):
        if str(target).endswith(".npz"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(source, target, *args, **kwargs)
    os.replace = replace
else:                          # killed half-way through writing the export's bytes
    real = os.fdopen
    class Half:
        def __init__(self, stream):
            self.stream = stream
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.stream.__exit__(*exc)
        def write(self, data):
            self.stream.write(data[: len(data) // 2])
            self.stream.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    def fdopen(handle, mode="r", *args, **kwargs):
        stream = real(handle, mode, *args, **kwargs)
        return Half(stream) if "w" in mode and ".npz." in os.readlink(f"/proc/self/fd/{handle}") else stream
    os.fdopen = fdopen
from routelens.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("mode", ["mid-write", "before-rename"])
@pytest.mark.parametrize("where", ["inside", "elsewhere"])
def test_kill_9_while_replay_writes_its_export_leaves_no_half_export(world, tmp_path, cli_env, mode, where):
    """SIGKILL while the export is written (half its bytes out, or all of them before the
    rename): nothing at the export's path, the run not complete; the same command then
    resumes and writes the whole export, which reads back."""
    import numpy as np

    import routelens as rl

    out = tmp_path / "run"
    export = (out if where == "inside" else tmp_path / "exports") / "routes.npz"
    argv = _replay(world, out, "--export", str(export))
    killed = subprocess.run([PYTHON, "-c", KILL_DRIVER, mode, *argv], env=cli_env, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -9, killed.stderr
    assert not export.exists()                                     # nothing that looks like an export
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    assert not (out / "summary.json").exists()
    assert main(argv) == 0                                          # resumed: the whole export
    back = rl.read_routes(str(export), rl.load(world["model"]), world["trajectories"])
    with np.load(world["routes"]) as given:
        for key in ("a", "b"):
            np.testing.assert_array_equal(back.experts[key], given[key])
    state = json.loads((out / "run.json").read_text())
    assert state["status"] == "complete" and state["export"]["sha256"] == hashlib.sha256(export.read_bytes()).hexdigest()
