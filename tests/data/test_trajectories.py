"""Trajectory files: both record forms, JSONL and Parquet, and every bad input named."""

import json

import pandas as pd
import pytest
from conftest import ALPHABET, write_jsonl

from routelens.data.char_tokenizer import build_char_tokenizer
from routelens.data.trajectories import load_trajectories
from routelens.errors import RouteLensError

TOKENIZER = build_char_tokenizer(ALPHABET)


def test_text_records_tokenise_prompt_and_completion_separately(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"id": 7, "prompt": "Q:1+2=", "completion": "A:3#3", "verified": True}])
    [trajectory] = load_trajectories(path, TOKENIZER)
    prompt = TOKENIZER("Q:1+2=")["input_ids"]
    completion = TOKENIZER("A:3#3", add_special_tokens=False)["input_ids"]
    assert prompt[0] == TOKENIZER.bos_token_id
    assert trajectory.id == "7" and trajectory.verified is True
    assert trajectory.input_ids == prompt + completion
    assert trajectory.completion_start == len(prompt)
    # predictions of completion tokens: from the last prompt position to the second-last token
    assert list(trajectory.scored_positions) == list(range(len(prompt) - 1, len(prompt) + len(completion) - 1))


def test_token_records_and_parquet_and_only_verified(tmp_path):
    frame = pd.DataFrame({"id": ["a", "b", "c"], "input_ids": [[1, 5, 6, 7], [1, 8, 9], [1, 4, 4, 4, 4]],
                          "completion_start": [2, 1, 3], "verified": [True, False, None]})
    frame.to_parquet(tmp_path / "t.parquet")
    trajectories = load_trajectories(str(tmp_path / "t.parquet"), vocab_size=16)
    assert [t.id for t in trajectories] == ["a", "b", "c"]
    assert list(trajectories[0].scored_positions) == [1, 2]
    assert [t.id for t in load_trajectories(str(tmp_path / "t.parquet"), only_verified=True)] == ["a"]
    assert len(load_trajectories(str(tmp_path / "t.parquet"), limit=2)) == 2


@pytest.mark.parametrize("lines, message", [
    (['{"id": "a", "prompt": "Q:1=", "completion": "A:1"}', '{"id": "b", "prompt": '], r"line 2: malformed JSON"),
    (['[1, 2]'], r"line 1: expected a JSON object"),
    (['{"prompt": "Q", "completion": "A"}'], r"line 1: missing field 'id'"),
    (['{"id": "a", "prompt": "Q:1="}'], r"line 1: missing field\(s\) 'completion'"),
    (['{"id": "a", "prompt": "Q:1=", "completion": ""}'], r"line 1: empty completion"),
    (['{"id": "a", "input_ids": [1, 2, 3]}'], r"no 'completion_start'"),
    (['{"id": "a", "input_ids": [1, 2, 3], "completion_start": 3}'], r"completion_start 3 must lie in 1..2"),
    (['{"id": "a", "input_ids": [1, 2, 99], "completion_start": 1}'], r"token ids must lie in 0..63"),
    (['{"id": "a", "input_ids": [1, "x"], "completion_start": 1}'], r"list of integers"),
    (['{"id": "a", "prompt": "Q", "completion": "A", "verified": "yes"}'], r"'verified' must be true, false"),
    (['{"id": "a", "prompt": "Q", "completion": "A"}', '{"id": "a", "prompt": "Q", "completion": "A:1"}'],
     r"line 2: duplicate trajectory id 'a'"),
    ([], r"no trajectory records"),
    (['{"id": "a", "prompt": "Q", "completion": "A", "problem_id": [1]}'], r"'problem_id' must be a string or an integer"),
])
def test_bad_records_are_named(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(RouteLensError, match=message):
        load_trajectories(path, TOKENIZER, vocab_size=64)


def test_problem_ids_are_read_and_written_back(tmp_path):
    """A record's problem id (what trajectories of one problem share) is kept, as text, and
    `trajectories_jsonl` writes it back; records without one have None."""
    from routelens.data.trajectories import trajectories_jsonl

    path = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a-s0", "problem_id": "a", "input_ids": [1, 2, 3], "completion_start": 1},
        {"id": "b-s0", "problem_id": 7, "prompt": "Q:1=", "completion": "A:1"},
        {"id": "c-s0", "input_ids": [1, 2], "completion_start": 1}])
    trajectories = load_trajectories(path, TOKENIZER, vocab_size=64)
    assert [t.problem_id for t in trajectories] == ["a", "7", None]
    again = write_jsonl(tmp_path / "again.jsonl", trajectories_jsonl(trajectories).decode().splitlines())
    assert [t.problem_id for t in load_trajectories(again, TOKENIZER, vocab_size=64)] == ["a", "7", None]


def test_text_records_need_a_tokenizer(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "prompt": "Q", "completion": "A"}])
    with pytest.raises(RouteLensError, match="need the model's tokenizer"):
        load_trajectories(path, tokenizer=None)


def test_only_verified_keeping_nothing_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "input_ids": [1, 2], "completion_start": 1, "verified": False}])
    with pytest.raises(RouteLensError, match="kept no trajectory"):
        load_trajectories(path, only_verified=True)


def test_missing_file(tmp_path):
    with pytest.raises(RouteLensError, match="does not exist"):
        load_trajectories(str(tmp_path / "nope.jsonl"))


# ---------------------------------------------------------------------------- step checks
@pytest.mark.quick
@pytest.mark.parametrize("completion,expected", [
    ("62*2=124;124*2=248;98-16=82;82+248=330#330", "T" * 42),                   # all right, answer repeats
    ("83+83=176;176*2=352#352", "F" * 10 + "T" * 13),                           # 83+83 is 166
    ("2+2=4#5", "T" * 5 + "F" * 2),                                             # the answer is not the result
    ("12+7=19;19*3=5", "T" * 8 + "F" * 6),                                      # a finished wrong last step
    ("12+7=19;19*3=", "T" * 8 + "." * 5),                                       # cut off before its result
    ("12+x=19#19", "F" * 7 + "." * 3),                                          # not `a op b=c`
])
def test_step_checks_on_hand_made_solutions(completion, expected):
    from routelens.data.arithmetic import step_checks

    assert "".join({True: "T", False: "F", None: "."}[f] for f in step_checks(completion)) == expected


def test_token_step_checks_follow_the_characters_of_each_token():
    from routelens.data.sampling import token_step_checks
    from routelens.models.loading import load_tokenizer

    tokenizer = load_tokenizer("demo")
    ids = tokenizer("83+83=176;2+2=4#4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    flags = token_step_checks(tokenizer, ids)
    assert flags == [False] * 10 + [True] * 7 + [None]   # <eos> adds no character   # the char tokenizer: one token per character


def test_counterfactual_scores_only_tokens_of_right_steps(tmp_path):
    """Auto on when every trajectory carries step checks: the wrong step's tokens are not
    scored, the summary says how many were excluded, and --no-only-step-ok scores them all."""
    import routelens as rl
    from routelens.cli import main
    from routelens.data.sampling import token_step_checks

    lens = rl.load("demo")
    records = []
    for i, (prompt, completion) in enumerate([("Q:83+83*2=A:", "83*2=166;83+166=259#259"),
                                              ("Q:83+83=A:", "83+83=176#176")]):
        prompt_ids = lens.tokenizer(prompt)["input_ids"]
        completion_ids = lens.tokenizer(completion, add_special_tokens=False)["input_ids"]
        records.append({"id": f"t{i}", "input_ids": prompt_ids + completion_ids, "completion_start": len(prompt_ids),
                        "step_ok": token_step_checks(lens.tokenizer, completion_ids)})
    path = tmp_path / "traj.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["counterfactual", "--trajectories", str(path), "--layers", "-1", "--routes", "4",
                 "--out", str(tmp_path / "on"), "--no-progress"]) == 0
    on = rl.read_run(str(tmp_path / "on"))
    right = {(r["id"], r["completion_start"] - 1 + i) for r in records for i, ok in enumerate(r["step_ok"]) if ok}
    assert set(zip(on.tokens["trajectory_id"], on.tokens["position"])) == right
    check = on.summary_dict["step_check"]
    total = sum(len(r["input_ids"]) - r["completion_start"] for r in records)
    assert check["only_step_ok"] and check["tokens_scored"] == len(right) == len(on.tokens)
    assert check["tokens_excluded"] == total - len(right) and check["trajectories_excluded"] == 1   # t1 has no right step
    assert main(["counterfactual", "--trajectories", str(path), "--layers", "-1", "--routes", "4", "--no-only-step-ok",
                 "--out", str(tmp_path / "off"), "--no-progress"]) == 0
    off = rl.read_run(str(tmp_path / "off"))
    assert len(off.tokens) == total and off.summary_dict["step_check"]["only_step_ok"] is False
    # a file without step checks: off by default, and asking for them is a one-line error
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "step_ok"}) + "\n" for r in records))
    with pytest.raises(rl.RouteLensError, match="needs step checks on every trajectory"):
        rl.counterfactual(lens, str(plain), layers=[-1], routes=4, only_step_ok=True)
    assert rl.counterfactual(lens, str(plain), layers=[-1], routes=4).summary_dict["step_check"]["steps_checked"] is False


def test_sampled_trajectories_do_not_depend_on_the_grouping():
    """Problems are sampled in groups (what one Ray actor takes at a time); each prompt draws
    from the generator of its own index, so groups of 1, 2 or all problems give the same records."""
    import routelens as rl
    from routelens.data.sampling import arithmetic_trajectories

    lens = rl.load("demo")
    runs = [arithmetic_trajectories(lens if size == 2 else lens.loaded, 5, 2, 0.8, seed=3, max_new_tokens=20, batch_size=size,
                                    show_progress=False) for size in (2, 4, 64)]
    assert len(runs[0]) == 10 and runs[1] == runs[0] and runs[2] == runs[0]
    assert len({r["completion"] for r in runs[0]}) > 1


def test_trajectories_killed_mid_run_resume_to_the_file_of_an_uninterrupted_run(cli_env, tmp_path):
    """`routelens trajectories` writes each group of problems to OUT.run as it is sampled: a
    run killed mid-way (SIGKILL) and re-run with the same command samples only the problems
    left and writes the same file as a run never interrupted; other settings on that run
    folder are refused without --overwrite."""
    import json
    import subprocess
    import sys

    from conftest import kill_when_parts_land, unit_parts

    from routelens.cli import main

    args = ["trajectories", "--model", "demo", "--task", "arithmetic", "--n", "12", "--samples-per-problem", "2",
            "--max-new-tokens", "24", "--batch-size", "2", "--seed", "4", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "whole.jsonl")]) == 0
    out = tmp_path / "cut.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "routelens", *args, "--out", str(out)], env=cli_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when_parts_land(process, str(out) + ".run", 3, prefix="records-")
    state = json.loads((tmp_path / "cut.jsonl.run" / "run.json").read_text())
    done = len(unit_parts(str(out) + ".run", "records-"))   # run.json's count may lag by the unit being saved
    assert not out.exists() and state["status"] == "running" and 3 <= done < 12
    assert main([*args, "--out", str(out)]) == 0
    whole = [json.loads(line) for line in open(tmp_path / "whole.jsonl")]
    resumed = [json.loads(line) for line in open(out)]
    assert len(whole) == 24 and resumed == whole
    state = json.loads((tmp_path / "cut.jsonl.run" / "run.json").read_text())
    assert state["status"] == "complete" and len(state["sessions"]) == 2
    assert state["sessions"][1]["units_done"] == 12 - done   # the re-run did exactly the rest
    assert state["config"]["seed"] == 4 and state["config"]["samples_per_problem"] == 2
    assert state["config"]["temperature"] == 0.8 and state["performance"] == {"batch_size": 2}
    summary = json.loads((tmp_path / "cut.jsonl.run" / "summary.json").read_text())
    assert summary["trajectories"] == 24 and summary["verified"] == sum(r["verified"] for r in whole)
    changed = [*args, "--temperature", "0.5", "--out", str(out)]
    assert main(changed) == 2
    assert main([*changed, "--overwrite"]) == 0
    assert [json.loads(line) for line in open(out)] != whole
