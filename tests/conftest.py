import os
import sys
import time

import pytest
import torch

from routelens.allocator import keep_freed_memory
from routelens.models import SUPPORTED, adapter_for
from routelens.models.tiny import build_tiny_model

FAMILIES = SUPPORTED   # every family the registry serves runs every per-family test


# under pytest-xdist, the workers share the cores: one torch thread each
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))
keep_freed_memory()   # as every `routelens` command does: large tensors reuse freed memory


def _measure_timeout_factor() -> float:
    """How much slower than an idle 2-core machine this one runs now: a fixed pure-Python
    workload (0.1 s there) timed at the start of the session. ROUTELENS_TEST_TIMEOUT_FACTOR
    overrides it. Timeouts and deadlines in the tests are multiplied by it (never below 1),
    so that a loaded machine gets slower tests, not failing ones."""
    if os.environ.get("ROUTELENS_TEST_TIMEOUT_FACTOR"):
        return max(1.0, float(os.environ["ROUTELENS_TEST_TIMEOUT_FACTOR"]))
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        sum(i * i for i in range(1_000_000))
        samples.append(time.perf_counter() - started)
    return min(20.0, max(1.0, sorted(samples)[len(samples) // 2] / 0.1))   # the median: load is not the fastest run


TIMEOUT_FACTOR = _measure_timeout_factor()
#: a test that runs longer than this fails alone (pytest-timeout), instead of hanging the run
TEST_TIMEOUT_S = 900


def scaled(seconds: float) -> float:
    """A timeout or deadline of `seconds` on an idle machine, scaled to this one's load."""
    return seconds * TIMEOUT_FACTOR


def wait_until(condition, timeout: float, what: str, poll: float = 0.01) -> None:
    """Wait for `condition()` (an event or a file, never a duration); fail saying `what` was
    awaited if it has not happened within `scaled(timeout)` seconds."""
    deadline = time.monotonic() + scaled(timeout)
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {scaled(timeout):.0f} s for {what} (timeout factor {TIMEOUT_FACTOR:.1f})")
        time.sleep(poll)


@pytest.fixture(scope="session")
def tiny_adapters():
    """One tiny random-weight model per family (fp32, eval), built once per session."""
    return {family: adapter_for(build_tiny_model(family, seed=0)) for family in FAMILIES}


@pytest.fixture
def registry_restored():
    """The family registry as it was before the test (a test or an example may register one)."""
    from routelens.models import registry

    saved = dict(registry.FAMILIES)
    yield
    registry.FAMILIES.clear()
    registry.FAMILIES.update(saved)


@pytest.fixture
def cli_env():
    """Environment for running the CLI in a subprocess with this interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"), env.get("PYTHONPATH", "")])
    return env


PYTHON = sys.executable
TESTS = os.path.dirname(os.path.abspath(__file__))   # test modules import conftest from here


ALPHABET = "0123456789+-*=:;#QA abcdefghijklmnopqrstuvwxyz<>/()'"


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory):
    """A tiny OLMoE saved with save_pretrained, with a character tokenizer beside it."""
    from routelens.data.char_tokenizer import build_char_tokenizer

    folder = tmp_path_factory.mktemp("tiny-olmoe")
    tokenizer = build_char_tokenizer(ALPHABET)
    build_tiny_model("olmoe", seed=0, vocab_size=len(tokenizer), initializer_range=0.2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_jsonl(path, records):
    import json

    with open(path, "w") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


def pytest_report_header(config):
    return f"routelens: timeout factor {TIMEOUT_FACTOR:.1f} (ROUTELENS_TEST_TIMEOUT_FACTOR overrides it)"


def pytest_collection_modifyitems(config, items):
    """Every test has a timeout scaled to the machine's load; the `gpu` tier runs only where
    CUDA is available, and says so when skipped."""
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(scaled(TEST_TIMEOUT_S)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu tier: no CUDA device here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def unit_parts(run_folder, prefix: str = "") -> list[str]:
    """The unit parts (named `prefix`...) a run has written so far."""
    parts = os.path.join(run_folder, "parts")
    return [p for p in os.listdir(parts) if p.startswith(prefix) and p.endswith(".parquet")] if os.path.isdir(parts) else []


def kill_when_parts_land(process, run_folder, count: int, prefix: str = "", timeout: float = 120) -> None:
    """SIGKILL a running command once `count` unit parts (named `prefix`...) are in its run
    folder, and check that it was killed mid-run, not after it finished."""
    import signal

    try:
        wait_until(lambda: process.poll() is not None or len(unit_parts(run_folder, prefix)) >= count, timeout,
                   f"{count} parts in {run_folder}")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
