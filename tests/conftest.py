import os
import sys

import pytest
import torch

from routelens.models import SUPPORTED, adapter_for
from routelens.models.tiny import build_tiny_model

FAMILIES = SUPPORTED   # every family the registry serves runs every per-family test


torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_adapters():
    """One tiny random-weight model per family (fp32, eval), built once per session."""
    return {family: adapter_for(build_tiny_model(family, seed=0)) for family in FAMILIES}


@pytest.fixture
def cli_env():
    """Environment for running the CLI in a subprocess with this interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"), env.get("PYTHONPATH", "")])
    return env


PYTHON = sys.executable


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


def pytest_collection_modifyitems(config, items):
    """The `gpu` tier runs only where CUDA is available, and says so when skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu tier: no CUDA device here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def kill_when_parts_land(process, run_folder, count: int, prefix: str = "", timeout: float = 120) -> None:
    """SIGKILL a running command once `count` unit parts (named `prefix`...) are in its run
    folder, and check that it was killed mid-run, not after it finished."""
    import signal
    import time

    parts = os.path.join(run_folder, "parts")
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        done = [p for p in os.listdir(parts) if p.startswith(prefix) and p.endswith(".parquet")] \
            if os.path.isdir(parts) else []
        if len(done) >= count:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
