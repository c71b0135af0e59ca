"""Every public name of `routelens` has a docstring with an `Examples:` section that runs (doctest)."""

from __future__ import annotations

import doctest
import inspect
import json
import warnings

import pytest

import routelens as rl

PUBLIC = [name for name in rl.__all__ if name != "__version__"]


def _objects() -> list[tuple[str, object]]:
    """The public functions and classes, and the public methods of the public classes."""
    found = []
    for name in PUBLIC:
        obj = getattr(rl, name)
        found.append((name, obj))
        if inspect.isclass(obj) and obj.__module__.startswith("routelens"):
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and inspect.isfunction(getattr(member, "__wrapped__", member)) \
                        and member.__doc__ and ">>>" in member.__doc__:
                    found.append((f"{name}.{attr}", member))
    return found


@pytest.mark.parametrize("name", PUBLIC)
@pytest.mark.quick
def test_public_name_has_an_example(name):
    doc = inspect.getdoc(getattr(rl, name)) or ""
    assert "Examples:" in doc and ">>>" in doc, f"routelens.{name} has no runnable Examples: in its docstring"


@pytest.fixture(scope="module")
def example_globals(tmp_path_factory):
    """What the examples refer to: a scratch folder, a saved counterfactual run, an item
    file and a trajectory file."""
    tmp = tmp_path_factory.mktemp("examples")
    lens = rl.load("demo")
    trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:3+4=A:", "3+4=7#7"), ("Q:9*2=A:", "9*2=18#18"),
                                                       ("Q:8-5=A:", "8-5=3#3")])
    demo_run = rl.counterfactual(lens, trajs, out=str(tmp / "demo-run"), layers=[-1], routes=8,
                                     show_progress=False).path
    trajectory_file = tmp / "trajectories.jsonl"
    trajectory_file.write_text("".join(json.dumps({"id": t.id, "input_ids": t.input_ids,
                                                   "completion_start": t.completion_start}) + "\n" for t in trajs))
    item_file = tmp / "items.jsonl"
    item_file.write_text(json.dumps({"id": "q1", "domain": "math", "prompt": "Q:1+1=A:", "target": "1+1=2#2"}) + "\n")
    return {"tmp": tmp, "demo_run": demo_run, "trajectory_file": str(trajectory_file), "item_file": str(item_file)}


@pytest.mark.parametrize("name,obj", _objects(), ids=[name for name, _ in _objects()])
def test_examples_run(name, obj, example_globals, registry_restored):
    finder = doctest.DocTestFinder(recurse=False)
    tests = finder.find(obj, name, globs=dict(example_globals))
    assert tests and tests[0].examples, f"{name}: no example found"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for test in tests:
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} example lines failed (output above)"
