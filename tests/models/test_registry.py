"""The registry as data: each gating rule is generated from the family's `Gate` and states its
facts, the adapters compute with the very gate the registry describes, and docs/families.md
shows the registry's table."""

from __future__ import annotations

from pathlib import Path

import pytest

import routelens as rl
from routelens.models import registry
from routelens.models.registry import FAMILIES, SUPPORTED, Family, adapter_class, markdown_table
from routelens.models.spec import Gate, Groups, Layout

DATA_GATES = [model_type for model_type in SUPPORTED if FAMILIES[model_type].gate is not None]
PAGE = Path(__file__).resolve().parents[2] / "docs" / "families.md"


@pytest.mark.quick
def test_every_family_but_a_few_is_data():
    assert [t for t in SUPPORTED if t not in DATA_GATES] == ["phimoe"]   # the sparsemixer is code


@pytest.mark.quick
@pytest.mark.parametrize("model_type", DATA_GATES)
def test_the_generated_gating_rule_states_the_gate(model_type):
    gate, rule = FAMILIES[model_type].gate, FAMILIES[model_type].gating_rule
    scores, _, weights = rule.partition("; weights = ") if gate.activation != "topk_then_softmax" else (rule, "", "")
    if gate.activation == "topk_then_softmax":
        assert rule.startswith("top-k on raw logits, then softmax over the k")
    else:
        assert scores.startswith({"softmax": "fp32 softmax", "sigmoid": "sigmoid"}[gate.activation])
        assert ("/ " in weights) == (gate.normalise is not False)
        assert ("not renormalised" in weights) == (gate.normalise is False)
        assert (f" if {gate.normalise}" in weights) == isinstance(gate.normalise, str)
    assert (f"x {gate.scale}" in rule) == bool(gate.scale)
    assert ("1e-20" in rule, "1e-6" in rule) == (gate.epsilon == 1e-20, gate.epsilon == 1e-6)
    if gate.norm_floor:
        assert f"max(their sum, {gate.norm_floor})" in rule
    if gate.choice_bias:
        assert f"the {gate.bias_owner}'s {'.'.join(gate.bias_path)}" in rule
    assert ("groups" in rule) == (gate.groups is not None)
    assert "\n" not in rule and rule.endswith(FAMILIES[model_type].notes)


@pytest.mark.quick
@pytest.mark.parametrize("model_type", SUPPORTED)
def test_the_adapter_computes_with_the_gate_the_registry_describes(model_type):
    assert adapter_class(model_type).gate is FAMILIES[model_type].gate


@pytest.mark.quick
def test_docs_families_tables_are_the_registry_and_the_refusals():
    import importlib.util

    from routelens.models.families.refusals import REFUSED

    spec = importlib.util.spec_from_file_location("families_doc", PAGE.parent.parent / "scripts" / "families_doc.py")
    families_doc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(families_doc)
    page = PAGE.read_text()
    assert families_doc.with_table(page) == page, "docs/families.md is out of date: run .venv/bin/python scripts/families_doc.py"
    table = page.split("<!-- families:begin -->\n")[1].split("<!-- families:end -->")[0]
    assert table == markdown_table()
    refused = page.split("<!-- refusals:begin -->\n")[1].split("<!-- refusals:end -->")[0]
    assert all(f"| `{model_type}` | {reason} |" in refused for model_type, reason in REFUSED.items())


@pytest.mark.quick
def test_a_family_is_a_gate_or_a_rule_and_a_gate_is_checked():
    with pytest.raises(rl.RouteLensError, match="a gate or a hand-written gating_rule, not both"):
        Family("m:A", "rule", gate=Gate())
    with pytest.raises(rl.RouteLensError, match="needs its gate"):
        Family("m:A")
    with pytest.raises(ValueError, match="activation must be one of"):
        Gate("relu")
    with pytest.raises(ValueError, match="choice_bias must be"):
        Gate("sigmoid", choice_bias="expert_bias")
    with pytest.raises(ValueError, match="group score"):
        Groups("mean")
    with pytest.raises(ValueError, match="windows must be"):
        Layout(windows="sliding")


@pytest.mark.quick
def test_register_family_generates_the_rule_from_the_adapters_gate(registry_restored):
    from routelens.models.families.afmoe import AfmoeAdapter
    from routelens.models.families.phimoe import PhimoeAdapter

    entry = rl.register_family("my_afmoe_variant", AfmoeAdapter)
    assert entry.gate is AfmoeAdapter.gate and entry.gating_rule == FAMILIES["afmoe"].gating_rule
    assert registry.family("my_afmoe_variant") is entry
    with pytest.raises(rl.RouteLensError, match="PhimoeAdapter's gate is code: pass its gating_rule"):
        rl.register_family("my_phimoe_variant", PhimoeAdapter)
