"""The arithmetic task: worked solutions, domains, held-out isolation, and the verifiers."""

import pytest

from routelens import stats
from routelens.data.arithmetic import (
    DOMAINS,
    OPS_RANGE,
    Problem,
    generate,
    heldout_problems,
    heldout_questions,
    training_problems,
    verify,
)
from routelens.data.sampling import math_answer_correct

pytestmark = pytest.mark.quick   # the quick tier: pure functions, run first


def test_worked_solution_multiplications_first_then_left_to_right():
    problem = Problem("x", (98, 16, 62, 2, 2), ("-", "+", "*", "*"), "long")
    assert problem.question == "Q:98-16+62*2*2=A:"
    assert problem.solution == "62*2=124;124*2=248;98-16=82;82+248=330#330"
    assert problem.answer == 98 - 16 + 62 * 2 * 2
    assert problem.difficulty == 4


@pytest.mark.parametrize("domain", DOMAINS)
def test_domains_and_ranges(domain):
    problems = generate(3, 200, domains=(domain,))
    low, high = OPS_RANGE[domain]
    for p in problems:
        assert low <= p.difficulty <= high
        assert p.answer == eval(p.question[2:-3])  # the expression's own value (Python precedence)
        assert all(0 <= c <= 999 for *_, c in p.steps)
        kinds = set(p.operators)
        if domain == "addsub":
            assert kinds <= {"+", "-"}
        elif domain == "mul":
            assert kinds == {"*"}
        else:
            assert "*" in kinds and kinds - {"*"}


def test_generators_are_seeded():
    assert generate(5, 50) == generate(5, 50)
    assert generate(5, 50) != generate(6, 50)


def test_heldout_is_fixed_balanced_and_never_in_training():
    heldout = heldout_problems()
    assert heldout == heldout_problems() and len(heldout) == 500
    assert [sum(p.difficulty == d for p in heldout) for d in (1, 2, 3, 4)] == [125] * 4
    reserved = heldout_questions()
    assert {p.question for p in heldout} <= reserved
    assert not {p.question for p in training_problems(0, 20000)} & reserved


@pytest.mark.parametrize("completion, expected, correct, reason", [
    ("62*2=124;124*2=248;98-16=82;82+248=330#330", 330, True, "correct"),
    ("62*2=124;124*2=248;98-16=82;82+248=331#331", 330, False, "wrong answer"),
    ("62*2=124;124*2=248;98-1", 330, False, "no final answer"),         # truncated
    ("62*2=124;124*2=248#", 330, False, "malformed"),
    ("62*2=124 the answer is #330", 330, False, "malformed"),
    ("#330#330", 330, False, "malformed"),
    ("", 330, False, "no final answer"),
])
def test_arithmetic_verifier(completion, expected, correct, reason):
    verdict = verify(completion, expected)
    assert (verdict.correct, verdict.reason) == (correct, reason)


@pytest.mark.parametrize("completion, reference, correct", [
    (r"so the answer is \boxed{0.5}", r"\frac{1}{2}", True),
    (r"the answer is \boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{1/2}", r"\frac{1}{2}", True),
    (r"\boxed{330}", "330", True),
    (r"\boxed{0.6}", r"\frac{1}{2}", False),
    (r"\boxed{331}", "330", False),
    ("I do not know", "330", False),
])
def test_math_verify_on_boxed_answers(completion, reference, correct):
    assert math_answer_correct(completion, reference) is correct


@pytest.mark.parametrize("n, c, k, expected", [
    (8, 0, 1, 0.0), (8, 8, 1, 1.0), (8, 2, 1, 2 / 8), (8, 1, 8, 1.0), (8, 0, 8, 0.0),
    (4, 1, 2, 1 - (3 * 2 / 2) / (4 * 3 / 2)),      # 1 - C(3,2)/C(4,2) = 1/2
    (5, 2, 3, 1 - 1 / 10),                          # 1 - C(3,3)/C(5,3)
])
def test_pass_at_k_closed_form(n, c, k, expected):
    assert stats.pass_at_k(n, c, k) == pytest.approx(expected)


def test_problem_file_errors_are_named(tmp_path):
    from conftest import write_jsonl

    from routelens.data.sampling import read_problem_file
    from routelens.errors import RouteLensError

    path = write_jsonl(tmp_path / "p.jsonl", [{"id": 1, "prompt": "What is 1+1?", "answer": "2"}, {"id": 2, "prompt": "x"}])
    with pytest.raises(RouteLensError, match=r"p.jsonl line 2: missing field\(s\) answer"):
        read_problem_file(path)
    q = write_jsonl(tmp_path / "q.jsonl", [{"id": 1, "prompt": "P", "answer": 3}])
    assert read_problem_file(q) == [{"id": "1", "prompt": "P", "answer": "3", "where": f"{q} line 1"}]
