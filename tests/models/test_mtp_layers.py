"""Issue 29: multi-token-prediction layers are excluded from scoring, and a run says so.
transformers 5.23 never puts them in the model's forward (it builds them only as a draft model
for generate(use_mtp=True)), so the layers routelens reads, forces and scores are the main
decoder's; `describe()` (run.json, `routelens inspect`) records the exclusion."""

import pytest

from routelens.models import adapter_for
from routelens.models.tiny import build_tiny_model


@pytest.mark.parametrize("model_type", ["deepseek_v3", "glm4_moe"])
def test_mtp_layers_are_not_in_the_forward_and_the_description_says_they_are_excluded(model_type):
    model = build_tiny_model(model_type, seed=0, num_mtp_layers=2)
    adapter = adapter_for(model)
    assert adapter.mtp_layers == 2
    assert adapter.num_layers == model.config.num_hidden_layers   # no extra decoder layer built
    assert not any("mtp" in name for name, _ in model.named_modules())
    assert max(adapter.moe_layers) < model.config.num_hidden_layers
    assert adapter.describe()["mtp_layers"].startswith("2 multi-token-prediction layer(s) in the config: excluded")


def test_a_model_without_mtp_layers_says_nothing_of_them():
    adapter = adapter_for(build_tiny_model("deepseek_v3", seed=0, num_mtp_layers=0))
    assert adapter.mtp_layers == 0 and "mtp_layers" not in adapter.describe()


@pytest.mark.parametrize("model_type", ["qwen3_next", "mimo_v2_flash", "longcat_flash", "exaone_moe"])
def test_a_class_that_drops_mtp_weights_at_load_says_they_are_excluded(model_type):
    """These configs name no MTP count, but their model class ignores a checkpoint's mtp.* weights."""
    adapter = adapter_for(build_tiny_model(model_type, seed=0))
    assert adapter.mtp_layers == 0
    assert adapter.describe()["mtp_layers"].startswith("multi-token-prediction weights a checkpoint of this type")


def test_a_class_without_mtp_says_nothing_of_it():
    assert "mtp_layers" not in adapter_for(build_tiny_model("olmoe", seed=0)).describe()
