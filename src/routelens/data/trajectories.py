"""Trajectories in: JSONL or Parquet, one record per trajectory.

Two record forms:
- text:   {"id", "prompt", "completion"}: tokenised with the model's tokenizer, prompt
  (with the tokenizer's special tokens) and completion (without) separately, concatenated;
- tokens: {"id", "input_ids", "completion_start"}.

Scored tokens are the predictions of completion tokens: positions completion_start - 1
.. len - 2, the target of position t being token t + 1. An optional boolean "verified"
is carried through; other fields are ignored. Every problem is reported as a one-line
`RouteLensError` naming the file, the record and the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from routelens.errors import RouteLensError, SettingError
from routelens.results.paths import file_sha256  # noqa: F401  (re-exported: read by the analyses)


@dataclass
class Trajectory:
    """A token sequence whose completion is scored: the tokens from `completion_start` on
    are predicted (from position completion_start - 1); `verified` says whether its final
    answer was checked correct (None: unknown).

    Examples:
        >>> from routelens import Trajectory
        >>> list(Trajectory("a", [1, 5, 6, 2], completion_start=2).scored_positions)
        [1, 2]
    """

    id: str
    input_ids: list[int]
    completion_start: int
    verified: bool | None = None
    step_ok: list[bool | None] | None = None   # per completion token: its step right / wrong / not checkable
    only_positions: tuple[int, ...] | None = None   # score only these positions (e.g. tokens of right steps)
    answer: str | None = None                  # the reference final answer, where the record gives one (rollouts)
    problem_id: str | None = None              # the problem it solves: trajectories of one problem are not independent

    @property
    def scored_positions(self) -> range | tuple[int, ...]:
        if self.only_positions is not None:
            return self.only_positions
        return range(self.completion_start - 1, len(self.input_ids) - 1)

    def step_ok_positions(self) -> tuple[int, ...]:
        """The positions whose target token (position + 1) lies in a right step."""
        return tuple(self.completion_start - 1 + i for i, ok in enumerate(self.step_ok or []) if ok is True)


IN_MEMORY = "in-memory"   # what a run's config says of trajectories handed over in memory (the API)


def trajectories_jsonl(trajectories: list[Trajectory]) -> bytes:
    """Token-id records, one JSON line per trajectory, as `load_trajectories` reads them back."""
    lines = [json.dumps({"id": t.id, "input_ids": list(t.input_ids), "completion_start": t.completion_start,
                         **({"verified": t.verified} if t.verified is not None else {}),
                         **({"step_ok": t.step_ok} if t.step_ok is not None else {}),
                         **({"answer": t.answer} if t.answer is not None else {}),
                         **({"problem_id": t.problem_id} if t.problem_id is not None else {})}) for t in trajectories]
    return ("\n".join(lines) + "\n").encode("utf-8")


def read_utf8_text(path: str, kind: str, expected: str, encoding: str = "utf-8") -> str:
    """The text of a file the user gave; a binary file or bytes that are not UTF-8 are a
    one-line `RouteLensError` naming the line and what to give instead."""
    with open(path, "rb") as handle:
        raw = handle.read()
    if b"\x00" in raw[:1 << 16]:
        raise RouteLensError(f"{path}: a binary file, not {kind} text; give {expected}")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise RouteLensError(f"{path} line {line}: not UTF-8 text (byte {raw[error.start]:#04x}); "
                             "save the file as UTF-8") from None


def read_jsonl(path: str, what: str = "file") -> list[dict]:
    """Every non-empty line of a JSONL file as a dict, with "_where" = "<path> line <n>";
    a line that is not a JSON object is a one-line `RouteLensError`."""
    if os.path.isdir(path):
        raise RouteLensError(f"{what} {path!r} is a folder; give a JSONL file (one JSON object per line)")
    if not os.path.isfile(path):
        raise RouteLensError(f"{what} {path!r} does not exist")
    text = read_utf8_text(path, "JSONL", "a JSONL file (one JSON object per line) or a Parquet file ending in .parquet")
    records = []
    for number, line in enumerate(text.split("\n"), start=1):   # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise RouteLensError(
                f"{path} line {number}: malformed JSON ({error.msg} at column {error.colno}); "
                "each line must be one JSON object"
            ) from None
        if not isinstance(record, dict):
            raise RouteLensError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        record["_where"] = f"{path} line {number}"
        records.append(record)
    return records


def read_records(path: str, what: str = "trajectory file") -> list[dict]:
    """The records of a JSONL or Parquet file (see `read_jsonl` for the JSONL errors)."""
    if path.endswith(".parquet") and os.path.isfile(path):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as error:  # pyarrow raises several types for a bad file
            raise RouteLensError(f"{path}: not a readable Parquet file ({error})") from None
    return read_jsonl(path, what)


def parse_unique_records(path: str, what: str, parse) -> list:
    """Every record of a JSONL or Parquet file through `parse(record, where)`, in file order;
    an empty file or a repeated `id` is a one-line error naming the record."""
    records = read_records(path, f"{what} file")
    if not records:
        raise RouteLensError(f"{path}: no {what} records in the file")
    parsed, seen = [], set()
    for index, record in enumerate(records):
        where = record.pop("_where", f"{path} record {index + 1}")
        value = parse(record, where)
        if value.id in seen:
            raise RouteLensError(f"{where}: duplicate {what} id {value.id!r}; ids must be unique")
        seen.add(value.id)
        parsed.append(value)
    return parsed


def tokenize_text(tokenizer, text: str, special: bool, where: str, field: str) -> list[int]:
    """Token ids of `text`; characters the tokenizer can only map to its unknown token are a
    one-line error (the model would be scored on <unk>, not on the text)."""
    ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is not None and unknown in ids:
        bad = sorted({c for c in text if unknown in tokenizer(c, add_special_tokens=False)["input_ids"]})
        shown = ", ".join(repr(c) for c in bad[:8]) or "some characters"
        raise RouteLensError(f"{where}: the {field} has characters the model's tokenizer does not know ({shown}): "
                             "they would become <unk>; remove or replace them")
    return ids


def check_context(sequences, max_length: int | None, path: str, what: str) -> None:
    """Every (id, length) must fit the model's context (max_position_embeddings)."""
    if not max_length:
        return
    for sequence_id, length in sequences:
        if length > max_length:
            raise RouteLensError(f"{path}: {what} {sequence_id!r} has {length} tokens, more than the model's context "
                                 f"of {max_length} (max_position_embeddings); shorten or drop it")


def _step_ok(record: dict, where: str, completion_length: int) -> list[bool | None] | None:
    """The optional per-completion-token step checks of a token-id record, validated."""
    step_ok = record.get("step_ok")
    if step_ok is None:
        return None
    if not isinstance(step_ok, list) or len(step_ok) != completion_length or \
            not all(v is None or isinstance(v, bool) for v in step_ok):
        raise RouteLensError(f"{where}: 'step_ok' must be a list of true/false/null, one per completion token "
                             f"({completion_length}), or absent")
    return list(step_ok)


def _answer(record: dict, where: str) -> str | None:
    """The optional reference answer: a string or a number, kept as text."""
    answer = record.get("answer")
    if answer is None:
        return None
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise RouteLensError(f"{where}: 'answer' must be a string or a number, got {type(answer).__name__}")
    return str(answer)


def _problem_id(record: dict, where: str) -> str | None:
    """The optional id of the problem a trajectory solves (a string or an integer, kept as text)."""
    problem_id = record.get("problem_id")
    if problem_id is None:
        return None
    if isinstance(problem_id, bool) or not isinstance(problem_id, (str, int)):
        raise RouteLensError(f"{where}: 'problem_id' must be a string or an integer, got {type(problem_id).__name__}")
    return str(problem_id)


def parse_trajectory(record: dict, where: str, tokenizer, vocab_size: int | None) -> Trajectory:
    """One trajectory record, validated (`where` names it in errors)."""
    if "id" not in record or record["id"] is None:
        raise RouteLensError(f"{where}: missing field 'id'")
    trajectory_id = str(record["id"])
    verified = record.get("verified")
    if verified is not None and not isinstance(verified, bool):
        raise RouteLensError(f"{where}: 'verified' must be true, false or absent, got {verified!r}")
    if "input_ids" in record and record["input_ids"] is not None:
        input_ids, start = record["input_ids"], record.get("completion_start")
        if start is None:
            raise RouteLensError(f"{where}: token-id record has 'input_ids' but no 'completion_start'")
        if not isinstance(input_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in input_ids):
            raise RouteLensError(f"{where}: 'input_ids' must be a list of integers")
        if not isinstance(start, int) or isinstance(start, bool):
            raise RouteLensError(f"{where}: 'completion_start' must be an integer")
        if not 1 <= start < len(input_ids):
            raise RouteLensError(
                f"{where}: completion_start {start} must lie in 1..{len(input_ids) - 1} "
                f"(at least one prompt token and one completion token in {len(input_ids)} ids)"
            )
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in input_ids):
            raise RouteLensError(f"{where}: token ids must lie in 0..{vocab_size - 1} (the model's vocabulary)")
        return Trajectory(trajectory_id, list(input_ids), start, verified,
                          _step_ok(record, where, len(input_ids) - start), answer=_answer(record, where),
                          problem_id=_problem_id(record, where))
    missing = [f for f in ("prompt", "completion") if not isinstance(record.get(f), str)]
    if missing:
        raise RouteLensError(
            f"{where}: missing field(s) {', '.join(repr(m) for m in missing)}; a record needs "
            "{'id', 'prompt', 'completion'} (text) or {'id', 'input_ids', 'completion_start'} (token ids)"
        )
    if tokenizer is None:
        raise RouteLensError(
            f"{where}: text trajectories need the model's tokenizer, and this model has none; "
            "give token ids ({'id', 'input_ids', 'completion_start'})"
        )
    if not record["completion"]:
        raise RouteLensError(f"{where}: empty completion; there is no completion token to score")
    prompt = tokenize_text(tokenizer, record["prompt"], True, where, "prompt")
    completion = tokenize_text(tokenizer, record["completion"], False, where, "completion")
    if not prompt:
        raise RouteLensError(f"{where}: the prompt tokenises to nothing; the first completion token needs a prefix")
    if not completion:
        raise RouteLensError(f"{where}: the completion tokenises to nothing")
    return Trajectory(trajectory_id, prompt + completion, len(prompt), verified, answer=_answer(record, where),
                      problem_id=_problem_id(record, where))


def load_trajectories(path: str, tokenizer=None, vocab_size: int | None = None,
                      only_verified: bool = False, limit: int | None = None,
                      max_length: int | None = None) -> list[Trajectory]:
    """Read, validate and tokenise every record of `path` (file order is kept); each must
    fit `max_length` tokens (the model's context).

    Every record is validated, even past `limit`, so that a bad file fails before work starts.
    """
    trajectories = parse_unique_records(path, "trajectory", lambda record, where: parse_trajectory(record, where, tokenizer, vocab_size))
    check_context(((t.id, len(t.input_ids)) for t in trajectories), max_length, path, "trajectory")
    if only_verified:
        trajectories = [t for t in trajectories if t.verified is True]
        if not trajectories:
            raise SettingError(f"{path}: `only_verified` kept no trajectory (none has \"verified\": true)", "only_verified")
    return trajectories[:limit] if limit is not None else trajectories
