"""A family defined outside routelens: a new Hugging Face model type (here, in this test
file) served through `rl.register_family` or an installed package's entry point, with no
edit of routelens's files; `routelens verify` passes on it."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, OlmoeConfig, OlmoeForCausalLM

import routelens as rl
from routelens.cli import main
from routelens.models import registry
from routelens.models.families.softmax_topk import SoftmaxTopKAdapter


class ToyMoeConfig(OlmoeConfig):
    """OLMoE's architecture under a model type transformers does not know."""

    model_type = "toy_moe_outside"


class ToyMoeForCausalLM(OlmoeForCausalLM):
    config_class = ToyMoeConfig


class ToyMoeAdapter(SoftmaxTopKAdapter):
    """The adapter a user writes for it: OLMoE's gate, plain causal mask."""

    window_source = "none"


AutoConfig.register(ToyMoeConfig.model_type, ToyMoeConfig)
AutoModelForCausalLM.register(ToyMoeConfig, ToyMoeForCausalLM)


@pytest.fixture
def toy_folder(tmp_path):
    torch.manual_seed(0)
    config = ToyMoeConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                          max_position_embeddings=128)
    ToyMoeForCausalLM(config).eval().save_pretrained(tmp_path / "toy")
    return str(tmp_path / "toy")


def test_a_family_registered_from_outside_passes_verify(toy_folder, tmp_path, registry_restored, capsys):
    assert main(["verify", "--model", toy_folder]) == 2          # not served yet: one line, names the way out
    assert "unsupported architecture 'toy_moe_outside'" in capsys.readouterr().err
    rl.register_family(ToyMoeConfig.model_type, ToyMoeAdapter, "fp32 softmax over all experts, top-k (toy)")
    report = tmp_path / "verify.json"
    assert main(["verify", "--model", toy_folder, "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["checks"]
    assert rows and all(row["status"] in ("pass", "skipped") for row in rows)
    assert {row["check"] for row in rows} >= {"gating_rule", "force_standard", "fast_vs_reference"}
    lens = rl.load(toy_folder)
    assert lens.family == ToyMoeConfig.model_type and lens.gating_rule.endswith("(toy)")
    with pytest.raises(rl.RouteLensError, match="already served by ToyMoeAdapter; pass replace=True"):
        rl.register_family(ToyMoeConfig.model_type, ToyMoeAdapter, "another rule")


@pytest.mark.quick
@pytest.mark.parametrize("args,message", [
    (("", ToyMoeAdapter, "rule"), "model_type must be a non-empty string"),
    (("x_moe", object, "rule"), "adapter must be a subclass of routelens.models.adapter.MoEAdapter"),
    (("x_moe", "no_colon", "rule"), "must be a class or 'module:Class'"),
    (("x_moe", ToyMoeAdapter, "two\nlines"), "gating_rule must be the gating rule in one line"),
    (("olmoe", ToyMoeAdapter, "rule"), "model type 'olmoe' is already served by OlmoeAdapter"),
])
def test_bad_registrations_are_one_line_errors(args, message, registry_restored):
    with pytest.raises(rl.RouteLensError, match=message):
        rl.register_family(*args)


def test_a_family_declared_by_an_installed_package_is_found_through_its_entry_point(toy_folder, tmp_path,
                                                                                    registry_restored, monkeypatch):
    """A package declaring `[project.entry-points."routelens.families"] toy_moe_outside =
    "toy_family:FAMILY"` (here: its installed metadata and module written into a folder on
    sys.path) serves the model type without any call."""
    (tmp_path / "site" / "toy_family-0.1.dist-info").mkdir(parents=True)
    (tmp_path / "site" / "toy_family-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-family\n"
                                                                           "Version: 0.1\n")
    (tmp_path / "site" / "toy_family-0.1.dist-info" / "entry_points.txt").write_text(
        f"[routelens.families]\n{ToyMoeConfig.model_type} = toy_family:FAMILY\n")
    (tmp_path / "site" / "toy_family.py").write_text(
        "from routelens.models.registry import Family\n"
        "FAMILY = Family('test_register_family:ToyMoeAdapter', 'fp32 softmax over all experts, top-k (entry point)')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(sys.modules, "test_register_family", sys.modules[__name__])
    assert ToyMoeConfig.model_type not in registry.FAMILIES
    lens = rl.load(toy_folder)
    assert type(lens.adapter) is ToyMoeAdapter and lens.gating_rule.endswith("(entry point)")
