"""The embedded demo model: loads from package data with no network, and still scores
the greedy accuracy recorded with its weights."""

import os

import pytest
import torch

from routelens.data.arithmetic import heldout_problems
from routelens.demo_model import WEIGHTS_DIR, demo_config, is_available
from routelens.evaluation import greedy_accuracy, read_training_card
from routelens.models.loading import load_model

pytestmark = pytest.mark.skipif(not is_available(), reason="embedded weights not built in this checkout")


def test_embedded_model_loads_offline_and_keeps_its_recorded_accuracy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("demo", "cpu", "float32")
    assert loaded.folder == WEIGHTS_DIR and type(loaded.adapter.model).__name__ == "OlmoeForCausalLM"
    expected_config = demo_config()
    assert loaded.adapter.num_experts == expected_config.num_experts
    assert loaded.adapter.top_k == expected_config.num_experts_per_tok > 2
    assert os.path.getsize(os.path.join(WEIGHTS_DIR, "model.safetensors")) <= 20 * 2**20
    card = read_training_card(WEIGHTS_DIR)
    recorded = card["evaluation"]["greedy_accuracy_first20"]
    measured = greedy_accuracy(loaded.adapter.model, loaded.tokenizer, heldout_problems(20), show_progress=False)
    # greedy decoding is deterministic; allow one problem of difference for other CPUs' rounding
    assert abs(measured["accuracy"] - recorded) <= 1 / 20 + 1e-9
    assert 0.2 <= measured["accuracy"] <= 1.0


def test_embedded_tokenizer_round_trips_the_task():
    loaded = load_model("demo", "cpu", "float32")
    text = "Q:98-16+62*2*2=A:62*2=124;124*2=248;98-16=82;82+248=330#330"
    ids = loaded.tokenizer(text)["input_ids"]
    assert ids[0] == loaded.tokenizer.bos_token_id
    assert loaded.tokenizer.decode(ids, skip_special_tokens=True) == text
    assert max(ids) < loaded.adapter.config.vocab_size
    with torch.no_grad():
        assert torch.isfinite(loaded.adapter.model(torch.tensor([ids])).logits).all()
