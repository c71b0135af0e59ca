"""Issue 29, group D: multimodal checkpoints whose language model is a routed MoE, served
through their text model with image tokens absent; the wrapper and encoder-decoder types
that are refused, each in one line naming what stands in the way.

Every served tower type is also in the registry and TINY_CONFIGS, so the per-family battery
(verify, fast == cache == reference, fuzzing, run-time checks) runs on its text tower."""

import json
from operator import attrgetter

import pytest
import torch

from routelens.errors import RouteLensError
from routelens.models import adapter_for
from routelens.models.families.refusals import REFUSED
from routelens.models.loading import LOAD_CAVEATS, load_model
from routelens.models.registry import FAMILIES, adapter_class
from routelens.models.tiny import TINY_TOWERS, build_tiny_model, tiny_config
from routelens.verify import verify_model

TOWERS = sorted(TINY_TOWERS)


def test_every_served_tower_is_registered_with_a_tiny_config():
    for model_type in TOWERS:
        assert model_type in FAMILIES and adapter_class(model_type).tower is not None


@pytest.fixture(scope="module", params=TOWERS)
def saved_tower(request, tmp_path_factory):
    """A tiny multimodal checkpoint saved as its conditional-generation class saves it."""
    model_type = request.param
    folder = tmp_path_factory.mktemp(model_type)
    build_tiny_model(model_type, seed=0).save_pretrained(folder)
    return model_type, str(folder)


def test_a_saved_multimodal_checkpoint_loads_as_its_text_tower_and_says_so(saved_tower, capsys):
    model_type, folder = saved_tower
    assert json.load(open(f"{folder}/config.json"))["model_type"] == model_type   # the composite config
    loaded = load_model(folder, device="cpu")
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("routelens:")]
    notice = [line for line in said if "serving the text model" in line]
    assert len(notice) == 1 and "serving the text model of a " + model_type in notice[0]
    assert "image tokens absent" in notice[0]
    described = loaded.adapter.describe()
    caveats = [described[key] for key in LOAD_CAVEATS if described.get(key)]   # a family's own caveat, said once
    assert len(said) == 1 + len(caveats) and all(any(c in line for line in said) for c in caveats)
    assert described["model_type"] == model_type and "image tokens absent" in described["text_tower"]
    assert loaded.identity()["text_tower"] == model_type
    model, tower = loaded.adapter.model, adapter_class(model_type).tower
    assert loaded.adapter.base_model is attrgetter(tower.text_model)(model.full_model)   # the text model itself, not a copy
    assert loaded.adapter.lm_head is attrgetter(tower.lm_head)(model.full_model)
    table = verify_model(loaded, length=12)
    assert (table["status"] == "pass").all(), table[table["status"] != "pass"].to_string()


def test_the_text_towers_logits_equal_the_full_models_on_text(saved_tower):
    model_type, folder = saved_tower
    tower = load_model(folder, device="cpu").adapter.model
    owner = adapter_class(model_type).tower.lm_head.rpartition(".")[0]   # the model that holds the LM head
    full = attrgetter(owner)(tower.full_model) if owner else tower.full_model   # (Qwen3-Omni: its thinker)
    ids = torch.randint(3, 60, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = full(input_ids=ids).logits
        torch.testing.assert_close(tower(ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(tower(ids, logits_to_keep=1).logits, expected[:, -1:], rtol=0, atol=1e-6)


def test_a_multimodal_checkpoint_without_weights_gives_the_towers_structure(saved_tower):
    model_type, folder = saved_tower
    loaded = load_model(folder, device="cpu", weights=False)
    assert loaded.adapter.describe()["model_type"] == model_type
    assert next(loaded.adapter.model.parameters()).device.type == "meta"


@pytest.mark.parametrize("model_type", TOWERS)
def test_an_image_placeholder_in_the_input_is_refused_in_one_line(model_type):
    from routelens.models.families.vision_language import tower_from_config

    config, tower = tiny_config(model_type), adapter_class(model_type).tower
    placeholder = tower.placeholders[0]
    holder, _, name = placeholder.rpartition(".")
    setattr(attrgetter(holder)(config) if holder else config, name, 5)   # inside the tiny vocabulary
    adapter = adapter_for(tower_from_config(config, model_type, tower))
    with pytest.raises(RouteLensError) as error:
        adapter.model(torch.tensor([[3, 4, 5, 6]]))
    message = str(error.value)
    assert message.splitlines() == [message] and f"token 5 ({placeholder})" in message
    with pytest.raises(RouteLensError, match="image/video placeholder"):   # the engines' own entry, too
        adapter.base_model(torch.tensor([[5]]), use_cache=False)
    adapter.model(torch.tensor([[3, 4, 6]]))   # text alone runs


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_a_refused_type_is_one_line_naming_what_stands_in_the_way(model_type, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(RouteLensError) as error:
        load_model(str(tmp_path), device="cpu")
    message = str(error.value)
    assert message.splitlines() == [message] and REFUSED[model_type] in message and model_type in message
