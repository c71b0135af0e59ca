"""Issue 29, group A: what the families it adds bring beyond the per-family battery (which
every registered type runs): Cohere2-MoE's parallel block and its config-chosen gate,
Kolibri-1's bias on the logit, HY-V3's block-held bias, Laguna's block-applied scale and
soft-capped router logits; and the types refused, each in one line naming the blocker."""

import json

import pytest
import torch
from transformers import AutoConfig

import routelens as rl
from routelens.models import adapter_for, capture_routes
from routelens.models.families.refusals import REFUSED
from routelens.models.tiny import build_tiny_model
from routelens.verify import verify_model


def _routes(adapter, seed=0):
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), capture_routes(adapter) as captured:
        adapter.model(ids)
    return captured


def _verified(model):
    table = verify_model(rl.wrap(model).loaded, length=16, routes=2, scored_positions=2)
    assert (table["status"] == "pass").all(), table[table["status"] != "pass"].to_string()
    return table


def test_cohere2_moe_parallel_block_is_declared_as_the_residual_plus_attention_beside_the_block():
    adapter = adapter_for(build_tiny_model("cohere2_moe"))
    layer = adapter.moe_layers[0]
    assert adapter.mlp_residual_input(layer) is adapter.decoder_layers[layer].input_layernorm
    assert adapter.parallel_mlp(layer) is adapter.decoder_layers[layer].self_attn
    hidden = torch.randn(3, adapter.config.hidden_size)
    torch.testing.assert_close(adapter.logits(hidden), adapter.lm_head(hidden) * adapter.config.logit_scale)


@pytest.mark.parametrize("overrides", [dict(expert_selection_fn="sigmoid", norm_topk_prob=True),
                                       dict(expert_selection_fn="sigmoid", norm_topk_prob=False),
                                       dict(shared_expert_combination_strategy="sum"),
                                       dict(num_shared_experts=0)])
def test_cohere2_moe_config_variants_are_served_exactly(overrides):
    model = build_tiny_model("cohere2_moe", **overrides)
    adapter = adapter_for(model)
    for out in _routes(adapter).values():
        torch.testing.assert_close(adapter.weights_for(out.logits, out.experts), out.weights.float(), atol=1e-6, rtol=0)
    _verified(model)


def test_kolibri1_chooses_by_logit_plus_bias_not_affinity_plus_bias():
    model = build_tiny_model("kolibri1")
    adapter = adapter_for(model)
    with torch.no_grad():   # a bias of the logits' scale: affinity + bias would rank differently
        for layer in adapter.moe_layers:
            adapter.routers[layer].e_score_correction_bias.copy_(torch.linspace(-2.0, 2.0, adapter.num_experts))
    differ = 0
    for layer, out in _routes(adapter).items():
        bias = adapter.routers[layer].e_score_correction_bias
        chosen = out.experts.sort(-1).values
        assert torch.equal(chosen, (out.logits + bias).topk(adapter.top_k).indices.sort(-1).values)
        scores = adapter.selection_scores(out.logits, layer)
        torch.testing.assert_close(scores.gather(-1, out.experts).sum(-1), scores.topk(adapter.top_k).values.sum(-1))
        differ += int((chosen != (out.logits.sigmoid() + bias).topk(adapter.top_k).indices.sort(-1).values).any())
    assert differ
    _verified(model)


def test_hy_v3_passes_the_blocks_bias_to_its_router():
    adapter = adapter_for(build_tiny_model("hy_v3"))
    layer = adapter.moe_layers[0]
    (bias,) = adapter.router_extra_args(layer)
    assert torch.equal(bias, adapter.moe_block(layer).e_score_correction_bias) and bias.abs().sum() > 0


def test_laguna_scale_is_applied_by_the_block_and_the_router_returns_capped_logits():
    adapter = adapter_for(build_tiny_model("laguna"))
    assert adapter.routed_scale(adapter.moe_layers[0]) == 2.5
    for out in _routes(adapter).values():
        assert out.logits.abs().max() <= adapter.config.moe_router_logit_softcapping


def _tiny_folder(tmp_path, model_type, **overrides):
    config = AutoConfig.for_model(model_type, **overrides)
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return str(folder)


@pytest.mark.quick
@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_refused_types_say_in_one_line_what_stands_in_the_way(tmp_path, model_type):
    folder = _tiny_folder(tmp_path, model_type)
    for spec in (folder, f"tiny:{model_type}"):
        with pytest.raises(rl.RouteLensError) as error:
            rl.load(spec)
        message = str(error.value)
        assert len(message.splitlines()) == 1 and message.endswith(REFUSED[model_type])
        assert f"model type {model_type!r}" in message
