"""Trajectory files: both record forms, JSONL and Parquet, and every bad input named."""

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
])
def test_bad_records_are_named(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(RouteLensError, match=message):
        load_trajectories(path, TOKENIZER, vocab_size=64)


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
