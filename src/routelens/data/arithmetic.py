"""Chain-of-thought arithmetic: the embedded demo task, with automatic verification.

A problem and its worked solution:

    Q:98-16+62*2*2=A:62*2=124;124*2=248;98-16=82;82+248=330#330

Multiplications are done first, left to right, then additions and subtractions left to
right; each step is written `a op b = c` and steps are separated by ';'. The final answer
follows '#'. Difficulty is the number of operations. Operands are drawn so that every
intermediate lies in 0..999 (no negatives, at most three digits).

Domains (for the expert-isolation study):
- ``addsub``: additions and subtractions only, 1-4 operations;
- ``mul``: multiplications only, 1-3 operations;
- ``mixed``: both kinds, 2-4 operations;
- ``long``: both kinds, 4-5 operations.

Problems come from seeded generators. The held-out set (`heldout_problems`) is drawn from
its own seed, and the training stream (`training_problems`) skips every question that is
in it, so held-out problems never appear in training.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from routelens.errors import RouteLensError

ALPHABET = "0123456789+-*=:;#QA"
DOMAINS = ("addsub", "mul", "mixed", "long")
HELDOUT_SEED = 20260511
MAX_VALUE = 999


@dataclass(frozen=True)
class Problem:
    id: str
    operands: tuple[int, ...]
    operators: tuple[str, ...]
    domain: str

    @property
    def difficulty(self) -> int:
        return len(self.operators)

    @property
    def question(self) -> str:
        """The prompt, e.g. 'Q:98-16+62*2*2=A:'."""
        expression = str(self.operands[0]) + "".join(f"{o}{v}" for o, v in zip(self.operators, self.operands[1:]))
        return f"Q:{expression}=A:"

    @property
    def steps(self) -> list[tuple[int, str, int, int]]:
        """(a, op, b, result) in solving order: multiplications first, then left to right."""
        values, operators, steps = list(self.operands), list(self.operators), []
        while "*" in operators:
            i = operators.index("*")
            result = values[i] * values[i + 1]
            steps.append((values[i], "*", values[i + 1], result))
            values[i: i + 2] = [result]
            del operators[i]
        while operators:
            a, op, b = values[0], operators.pop(0), values[1]
            result = a + b if op == "+" else a - b
            steps.append((a, op, b, result))
            values[0:2] = [result]
        return steps

    @property
    def answer(self) -> int:
        steps = self.steps
        return steps[-1][3] if steps else self.operands[0]

    @property
    def solution(self) -> str:
        """The worked completion, e.g. '62*2=124;...;82+248=330#330'."""
        return ";".join(f"{a}{op}{b}={c}" for a, op, b, c in self.steps) + f"#{self.answer}"

    def in_range(self) -> bool:
        return all(0 <= c <= MAX_VALUE for *_, c in self.steps)


def _draw(rng: random.Random, domain: str, num_ops: int, problem_id: str) -> Problem:
    kinds = {"addsub": "+-", "mul": "*", "mixed": "+-*", "long": "+-*"}[domain]
    while True:
        operators = [rng.choice(kinds) for _ in range(num_ops)]
        if domain in ("mixed", "long") and not ("*" in operators and set(operators) - {"*"}):
            continue  # mixed problems need both kinds of operation
        operands = []
        for i in range(num_ops + 1):
            next_to_mul = (i > 0 and operators[i - 1] == "*") or (i < num_ops and operators[i] == "*")
            operands.append(rng.randint(2, 9) if next_to_mul and rng.random() < 0.7 else rng.randint(1, 99))
        problem = Problem(problem_id, tuple(operands), tuple(operators), domain)
        if problem.in_range():
            return problem


OPS_RANGE = {"addsub": (1, 4), "mul": (1, 3), "mixed": (2, 4), "long": (4, 5)}


def generate(seed: int, n: int, domains=DOMAINS, prefix: str = "p",
             exclude: set[str] | frozenset[str] = frozenset()) -> list[Problem]:
    """n problems cycling through `domains`, number of operations uniform in the domain's
    range; questions in `exclude` are skipped, as are repeats."""
    rng, problems, seen = random.Random(seed), [], set(exclude)
    while len(problems) < n:
        domain = domains[len(problems) % len(domains)]
        low, high = OPS_RANGE[domain]
        problem = _draw(rng, domain, rng.randint(low, high), f"{prefix}{len(problems):05d}")
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def generate_by_difficulty(seed: int, n: int, difficulties=(1, 2, 3, 4), prefix: str = "h",
                           exclude: set[str] | frozenset[str] = frozenset()) -> list[Problem]:
    """n problems with the number of operations cycling through `difficulties` (mixed
    operators for 1 operation means + - or *), for accuracy-by-difficulty tables."""
    rng, problems, seen = random.Random(seed), [], set(exclude)
    while len(problems) < n:
        num_ops = difficulties[len(problems) % len(difficulties)]
        domain = "long" if num_ops >= 4 else ("mixed" if num_ops >= 2 and rng.random() < 0.5 else rng.choice(["addsub", "mul"]))
        if domain == "mul" and num_ops > 3:
            domain = "mixed"
        problem = _draw(rng, domain, num_ops, f"{prefix}{len(problems):05d}")
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


HELDOUT_SIZE = 500  # training excludes exactly these questions: more would overlap training


def heldout_problems(n: int = HELDOUT_SIZE) -> list[Problem]:
    """The fixed held-out evaluation set: the first n of its 500 problems, 1-4 operations in equal shares."""
    if not 1 <= n <= HELDOUT_SIZE:
        raise RouteLensError(f"the arithmetic held-out set has {HELDOUT_SIZE} problems (the only ones kept out of "
                             f"training); ask for 1..{HELDOUT_SIZE}, not {n}")
    return generate_by_difficulty(HELDOUT_SEED, n, prefix="heldout-")


ISOLATION_PER_DOMAIN = 100  # reserved items per domain for the expert-isolation study


def isolation_problems(per_domain: int = ISOLATION_PER_DOMAIN) -> list[Problem]:
    """The reserved per-domain items (never in training): `per_domain` of each domain."""
    if not 1 <= per_domain <= ISOLATION_PER_DOMAIN:
        raise RouteLensError(f"the arithmetic task reserves {ISOLATION_PER_DOMAIN} items per domain; "
                             f"ask for 1..{ISOLATION_PER_DOMAIN}, not {per_domain}")
    return generate(HELDOUT_SEED + 1, per_domain * len(DOMAINS), prefix="domain-")


def heldout_questions() -> frozenset[str]:
    """Questions reserved for evaluation: the held-out set and the per-domain isolation items."""
    questions = {p.question for p in heldout_problems()}
    questions |= {p.question for p in isolation_problems()}
    return frozenset(questions)


def training_problems(seed: int, n: int, domains=DOMAINS) -> list[Problem]:
    """Training problems of `domains` (default all), never a held-out question."""
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        raise RouteLensError(f"unknown domain(s) {', '.join(unknown) or '(none given)'}; domains are {', '.join(DOMAINS)}")
    return generate(seed, n, tuple(domains), prefix="train-", exclude=heldout_questions())


# ---------------------------------------------------------------------------- verifier
_ANSWER = re.compile(r"#(-?\d+)$")


@dataclass(frozen=True)
class Verdict:
    correct: bool
    reason: str  # "correct", "wrong answer", "no final answer", "malformed"
    predicted: int | None = None


def verify(completion: str, expected: int) -> Verdict:
    """Check a completion's final answer ('#<int>' at the end) against `expected`.

    A truncated solution (no '#', e.g. cut by the length limit) has no final answer; text
    after the answer, or characters outside the task's alphabet, is malformed.
    """
    text = completion.strip()
    if any(c not in ALPHABET for c in text):
        return Verdict(False, "malformed")
    if "#" not in text:
        return Verdict(False, "no final answer")
    match = _ANSWER.search(text)
    if match is None or text.count("#") != 1:
        return Verdict(False, "malformed")
    predicted = int(match.group(1))
    return Verdict(predicted == expected, "correct" if predicted == expected else "wrong answer", predicted)


# ---------------------------------------------------------------------------- step checks
_STEP = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)$")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def step_checks(completion: str) -> list[bool | None]:
    """Per character of `completion`: is the step `a op b=c` it belongs to right (True),
    wrong (False), or not checkable (None: a step cut off before its result)? A step's
    separator ';' belongs to it. The final answer ('#' and its digits) is right when it
    repeats the last step's result and that step is right; None when no step precedes it.

    >>> flags = step_checks("2+3=5;5*2=11#11")
    >>> flags[:6], flags[6:12], flags[12:]
    ([True, True, True, True, True, True], [False, False, False, False, False, False], [False, False, False])
    """
    flags: list[bool | None] = []
    body, hash_, tail = completion.partition("#")
    segments = body.split(";")
    last_result: tuple[bool, int] | None = None   # (last step right?, its result)
    for index, segment in enumerate(segments):
        match = _STEP.match(segment)
        last = index == len(segments) - 1
        if match:
            a, op, b, c = match.groups()
            ok: bool | None = _OPS[op](int(a), int(b)) == int(c)
            last_result = (ok, int(c))
        elif last and not hash_:
            ok = None        # cut off mid-step (length limit): nothing to check yet
        else:
            ok, last_result = False, None   # a finished step that is not `a op b=c`
        flags += [ok] * (len(segment) + (0 if last else 1))
    if not hash_:
        return flags
    answer: bool | None = None
    if last_result is not None:
        answer = last_result[0] and tail.isdigit() and int(tail) == last_result[1]
    return flags + [answer] * (len(hash_) + len(tail))
