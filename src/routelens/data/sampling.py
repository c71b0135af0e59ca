"""Verified trajectories: sample solutions, check each final answer, write the trajectory
format of `routelens.data.trajectories` (token ids as generated, plus the text).

Two sources of problems:
- ``arithmetic``: the embedded task (seeded generator, never a held-out question),
  checked with `routelens.data.arithmetic.verify`;
- a JSONL file of ``{"id", "prompt", "answer"}``: any model; the prompt goes through the
  tokenizer's chat template when it has one, and the answer in ``\\boxed{}`` (or the last
  math expression) is checked against the reference with the math-verify package, so
  equivalent forms (``\\frac{1}{2}`` and ``0.5``) count as equal.

Sampling thousands of long solutions takes hours, so with a run folder (`routelens
trajectories` keeps one beside its output: ``<out>.run``) each group of problems is
written as it completes, and a re-run with the same settings resumes where a killed run
stopped, here or on Ray: each prompt samples from the generator of its own index, so the
records do not depend on how the problems were grouped or where.
"""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa

from routelens.data.arithmetic import HELDOUT_SEED, Problem, generate, heldout_questions, verify
from routelens.data.trajectories import read_jsonl
from routelens.distributed import UnitJob
from routelens.errors import RouteLensError, SettingError
from routelens.generation import sample_completions
from routelens.runs.loop import AnalysisRun, run_analysis

TRAJECTORY_SEED_OFFSET = 7919  # keeps the trajectory stream apart from the training stream of the same seed
RECORDS_SCHEMA = pa.schema([("record", pa.string())])   # a unit's part: its records as JSON, in sample order


def analysis_problems(seed: int, n: int) -> list[Problem]:
    """Arithmetic problems for analyses: all four domains, no held-out question."""
    if seed == HELDOUT_SEED:
        raise SettingError(f"`seed` {HELDOUT_SEED} is reserved for the held-out set; choose another `seed`", "seed")
    return generate(seed + TRAJECTORY_SEED_OFFSET, n, prefix="arith-", exclude=heldout_questions())


def math_answer_correct(completion: str, reference: str) -> bool:
    """math-verify: the completion's final answer equals the reference (equivalent forms accepted)."""
    from math_verify import parse
    from math_verify import verify as math_verify

    gold_text = reference if ("$" in reference or "\\boxed" in reference) else f"${reference}$"
    gold, predicted = parse(gold_text), parse(completion)
    return bool(gold) and bool(predicted) and bool(math_verify(gold, predicted))


def read_problem_file(path: str) -> list[dict]:
    problems, seen = [], set()
    for record in read_jsonl(path, "problem file"):
        missing = [f for f in ("id", "prompt", "answer") if f not in record]
        if missing:
            raise RouteLensError(f"{record['_where']}: missing field(s) {', '.join(missing)}; "
                                 "a problem needs {'id', 'prompt', 'answer'}")
        if str(record["id"]) in seen:   # the trajectories' ids are built from it
            raise RouteLensError(f"{record['_where']}: duplicate problem id {str(record['id'])!r}; ids must be unique")
        seen.add(str(record["id"]))
        problems.append({"id": str(record["id"]), "prompt": str(record["prompt"]), "answer": str(record["answer"]),
                         "where": record["_where"]})
    if not problems:
        raise RouteLensError(f"{path}: no problems in the file")
    return problems


def chat_prompt_ids(tokenizer, prompt: str, where: str = "problem") -> list[int]:
    """The prompt as the model's chat template frames it (plain text without one); characters
    the tokenizer maps to <unk> are a one-line error naming `where`."""
    from routelens.data.trajectories import tokenize_text

    tokenize_text(tokenizer, prompt, False, where, "prompt")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def token_step_checks(tokenizer, completion_ids: list[int]) -> list[bool | None]:
    """`step_checks` per completion token: a token is right when every character it adds to
    the decoded text lies in a right step, wrong when one lies in a wrong step, None when
    none is checkable (special tokens add no character)."""
    from routelens.data.arithmetic import step_checks

    texts = [tokenizer.decode(completion_ids[: i + 1], skip_special_tokens=True) for i in range(len(completion_ids))]
    flags = step_checks(texts[-1]) if texts else []
    result, start = [], 0
    for text in texts:
        span = [f for f in flags[start: len(text)] if f is not None]
        result.append(None if not span else all(span))
        start = len(text)
    return result


def _records(samples, problems: list[dict], checker, tokenizer, step_checked: bool = False) -> list[dict]:
    records = []
    for sample in samples:
        problem = problems[sample.prompt_index]
        completion_ids = sample.completion_ids
        if not completion_ids:  # nothing generated: no completion token to score
            continue
        records.append({
            "id": f"{problem['id']}-s{sample.sample_index}",
            "problem_id": problem["id"],
            "input_ids": sample.prompt_ids + completion_ids,
            "completion_start": len(sample.prompt_ids),
            "prompt": tokenizer.decode(sample.prompt_ids, skip_special_tokens=True),
            "completion": sample.completion,
            "verified": checker(sample.completion, problem),
            "finished": sample.finished,
            **{key: problem[key] for key in ("difficulty", "domain", "answer") if key in problem},
        })
        if step_checked:   # every intermediate `a op b=c` checked, per completion token
            step_ok = token_step_checks(tokenizer, completion_ids)
            checked = [ok for ok in step_ok if ok is not None]
            records[-1].update(step_ok=step_ok, steps_ok=all(checked) if checked else None)
    return records


class SamplingJob(UnitJob):
    """Sampling solutions of problems (units: problem indices, a group a contiguous range:
    prompt p draws from the generator of its index, so any grouping, here or on Ray actors,
    samples the same completions). `checker`: "arithmetic" (the task's verifier, with step
    checks) or "math" (math-verify against the reference answer)."""

    def __init__(self, problems: list[dict], prompts: list[list[int]], checker: str, sampling: dict):
        self.problems, self.prompts, self.checker, self.sampling = problems, prompts, checker, sampling

    def setup(self, loaded=None) -> None:
        loaded = self.load(loaded)
        self._model, self._tokenizer = loaded.adapter.model, loaded.tokenizer

    def run(self, units: list[int]) -> list[dict[str, pa.Table]]:
        first = units[0]
        if units != list(range(first, first + len(units))):
            raise ValueError(f"a sampling group is a contiguous range of problems, got {units}")
        samples = sample_completions(self._model, self._tokenizer, [self.prompts[u] for u in units],
                                     index_offset=first, show_progress=False, **self.sampling)
        problems = self.problems[first: first + len(units)]
        if self.checker == "arithmetic":
            check, steps = (lambda text, row: verify(text, int(row["answer"])).correct), True
        else:
            check, steps = (lambda text, row: math_answer_correct(text, row["answer"])), False
        records: list[list[dict]] = [[] for _ in units]
        for sample in samples:
            records[sample.prompt_index] += _records([sample], problems, check, self._tokenizer, step_checked=steps)
        return [{"records": pa.table({"record": [json.dumps(r) for r in unit_records]}, schema=RECORDS_SCHEMA)}
                for unit_records in records]


def problem_groups(todo: list[int], per_group: int) -> list[list[int]]:
    """Undone problems in groups of at most `per_group` contiguous indices (what a
    `SamplingJob` takes), so a resumed run's gaps are filled in the same shape."""
    groups: list[list[int]] = []
    for index in todo:
        if groups and groups[-1][-1] == index - 1 and len(groups[-1]) < per_group:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def problems_digest(problems: list[dict], prompts: list[list[int]]) -> str:
    """What a resumed run must find unchanged: each problem's id and answer and its prompt's
    token ids (a changed problem file or tokenizer is a different run)."""
    content = [[p.get("id"), p.get("answer"), prompt] for p, prompt in zip(problems, prompts)]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def sample_trajectories(loaded, problems: list[dict], prompts: list[list[int]], checker: str, samples_per_problem: int,
                        temperature: float, seed: int, max_new_tokens: int, batch_size: int,
                        show_progress: bool = True, ray=None, run: str | None = None, overwrite: bool = False,
                        source: dict | None = None) -> list[dict]:
    """Trajectory records of `samples_per_problem` solutions per problem, in problem order:
    here, in groups of `batch_size` sequences, or with `ray` (`RaySettings`) on a pool of
    Ray actors, a group each at a time. With `run` (a folder), each group is written as it
    completes and a cut-off run of the same settings resumes (`overwrite` replaces one of
    other settings); `source` (where the problems came from) is recorded in its run.json."""
    from routelens.config import positive, seed_value
    from routelens.distributed import check_ray_can_load

    positive("temperature", temperature)
    seed_value("seed", seed)
    check_ray_can_load(loaded, ray)
    sampling = dict(num_samples=samples_per_problem, temperature=temperature, seed=seed,
                    max_new_tokens=max_new_tokens, batch_size=batch_size)
    config = {**loaded.identity(), "dtype": loaded.dtype, **(source or {}), "checker": checker,
              "problems": len(problems), "problems_digest": problems_digest(problems, prompts),
              "samples_per_problem": samples_per_problem, "temperature": temperature, "seed": seed,
              "max_new_tokens": max_new_tokens}
    records: list[dict] = []   # read once, by the summary, and returned

    def summarise(folder) -> dict:
        records.extend(json.loads(text) for text in folder.read("records")["record"])
        verified = sum(bool(r["verified"]) for r in records)
        return {"problems": len(problems), "trajectories": len(records), "verified": verified,
                "verified_share": verified / max(len(records), 1)}

    sampling_run = AnalysisRun(
        kind="trajectories", run_config=config, tables=("records",), units=len(prompts),
        job=SamplingJob(problems, prompts, checker, sampling), summarise=summarise,
        groups=lambda todo: problem_groups(todo, max(1, batch_size // samples_per_problem)),
        extra={"model": loaded.adapter.describe(), "device": loaded.device,
               "performance": {"batch_size": batch_size}},   # no effect on the records
        label="generate", progress_unit="samples", unit_weight=lambda unit: samples_per_problem,
        done_weight=lambda tables: samples_per_problem,
        timings=lambda todo, seconds: {"samples_this_session": len(todo) * samples_per_problem})
    run_analysis(sampling_run, loaded, run, overwrite=overwrite, show_progress=show_progress, ray=ray)
    return records


def arithmetic_trajectories(lens, n: int, samples_per_problem: int, temperature: float,
                            seed: int, max_new_tokens: int = 96, batch_size: int = 256,
                            show_progress: bool = True, heldout: bool = False, ray=None, run: str | None = None,
                            overwrite: bool = False) -> list[dict]:
    """Trajectories on n analysis problems (the seed's stream), or on the first n held-out
    ones, sampled by `lens` (a `Lens` or its `LoadedModel`); `run`: a folder to write them
    to as they come and resume from (`sample_trajectories`)."""
    from routelens.config import seed_value
    from routelens.data.arithmetic import heldout_problems

    seed_value("seed", seed)
    loaded = getattr(lens, "loaded", lens)
    problems = heldout_problems(n) if heldout else analysis_problems(seed, n)
    rows = [{"id": p.id, "difficulty": p.difficulty, "domain": p.domain, "answer": str(p.answer)} for p in problems]
    prompts = [loaded.tokenizer(p.question)["input_ids"] for p in problems]
    return sample_trajectories(loaded, rows, prompts, "arithmetic", samples_per_problem, temperature, seed,
                               max_new_tokens, batch_size, show_progress, ray, run, overwrite,
                               source={"task": "arithmetic", "heldout": heldout})


def file_trajectories(lens, path: str, n: int | None, samples_per_problem: int, temperature: float,
                      seed: int, max_new_tokens: int = 1024, batch_size: int = 16,
                      show_progress: bool = True, ray=None, run: str | None = None,
                      overwrite: bool = False) -> list[dict]:
    """Trajectories on the first n problems of a problem file, sampled by `lens` (a `Lens`
    or its `LoadedModel`); `run`: a folder to write them to as they come and resume from."""
    loaded = getattr(lens, "loaded", lens)
    if loaded.tokenizer is None:
        raise RouteLensError("this model has no tokenizer; problems in text need one")
    problems = read_problem_file(path)[:n]
    prompts = [chat_prompt_ids(loaded.tokenizer, p["prompt"], p["where"]) for p in problems]
    return sample_trajectories(loaded, problems, prompts, "math", samples_per_problem, temperature, seed,
                               max_new_tokens, batch_size, show_progress, ray, run, overwrite,
                               source={"problem_file": os.path.abspath(path)})


def write_trajectories(records: list[dict], out: str) -> None:
    """The trajectories file (JSONL), written atomically and recorded as routelens's own."""
    from routelens.results.paths import write_output

    write_output(out, "".join(json.dumps(record) + "\n" for record in records), "trajectories")
