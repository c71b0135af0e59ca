"""Issue 29, group f: Qwen3-Omni-MoE served through its thinker's text model (the talker there,
not scored) and Step 3.7 through its text model, beyond the per-family battery (which runs on
both text towers): the tower's logits are the full model's on text, the placeholders are
refused, and each gate recomputed here from its definition is what the model's own router
returns (and what the adapter's `Gate` computes)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import DynamicCache

import routelens as rl
from routelens.engine.readout import attention_heads
from routelens.errors import RouteLensError
from routelens.models import adapter_for
from routelens.models.families.refusals import REFUSED
from routelens.models.families.vision_language import tower_from_config
from routelens.models.registry import adapter_class
from routelens.models.tiny import build_tiny_model, tiny_config
from routelens.verify import verify_model

IDS = torch.randint(3, 60, (2, 13), generator=torch.Generator().manual_seed(0))


def _router_calls(adapter, ids=IDS):
    """layer -> (the router's input [N, d], its output) in one forward of the tower."""
    calls, handles = {}, []
    for layer, router in adapter.routers.items():
        handles.append(router.register_forward_hook(
            lambda module, args, output, layer=layer: calls.__setitem__(layer, (args[0].reshape(-1, args[0].shape[-1]),
                                                                                output))))
    try:
        with torch.no_grad():
            adapter.model(ids)
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(calls) == adapter.moe_layers
    return calls


def _same_route(experts, weights, expected_experts, expected_weights):
    """Equal routes whatever order the k experts come in (Step 3.7's top-k is unsorted)."""
    order, expected_order = experts.argsort(-1), expected_experts.argsort(-1)
    assert torch.equal(experts.gather(-1, order), expected_experts.gather(-1, expected_order))
    torch.testing.assert_close(weights.float().gather(-1, order), expected_weights.float().gather(-1, expected_order),
                               rtol=0, atol=1e-6)


def _verified(model):
    table = verify_model(rl.wrap(model).loaded, length=16, routes=2, scored_positions=2)
    assert (table["status"] == "pass").all(), table[table["status"] != "pass"].to_string()


def _refused_placeholder(model_type, placeholder):
    """The tiny tower with `placeholder` (a dotted config path) set to a token of the tiny vocabulary."""
    config, tower = tiny_config(model_type), adapter_class(model_type).tower
    holder, _, name = placeholder.rpartition(".")
    target = config
    for part in filter(None, holder.split(".")):
        target = getattr(target, part)
    setattr(target, name, 5)
    adapter = adapter_for(tower_from_config(config, model_type, tower))
    with pytest.raises(RouteLensError) as error:
        adapter.model(torch.tensor([[3, 4, 5, 6]]))
    message = str(error.value)
    assert message.splitlines() == [message] and f"token 5 ({placeholder})" in message
    with pytest.raises(RouteLensError, match="placeholder"):   # the text model itself (the engines' entry)
        adapter.base_model(torch.tensor([[6, 5]]), use_cache=False)
    adapter.model(torch.tensor([[3, 4, 6]]))   # text alone runs


# ----------------------------------------------------------------------------- Qwen3-Omni-MoE


def test_qwen3_omni_tower_is_the_thinkers_text_model_and_head_and_the_talker_is_not_scored():
    tower = build_tiny_model("qwen3_omni_moe")
    full = tower.full_model
    assert type(full).__name__ == "Qwen3OmniMoeForConditionalGeneration"
    assert full.config.enable_audio_output and hasattr(full, "talker")   # a talker there, as in the Instruct checkpoints
    adapter = adapter_for(tower)
    assert adapter.base_model is full.thinker.model.language_model and adapter.lm_head is full.thinker.lm_head
    thinker_routers = [m for m in full.thinker.model.language_model.modules() if type(m).__name__.endswith("TopKRouter")]
    talker_routers = [m for m in full.talker.modules() if type(m).__name__.endswith("TopKRouter")]
    assert talker_routers   # the talker has MoE layers of its own ...
    routers = list(adapter.routers.values())
    assert len(routers) == len(thinker_routers) and all(any(r is t for t in thinker_routers) for r in routers)
    assert not any(r is t for r in routers for t in talker_routers)   # ... which routelens does not score
    assert not any(p is q for p in tower.parameters() for q in full.talker.parameters())
    assert "thinker.model.language_model" in adapter.describe()["text_tower"]


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_omni_tower_logits_equal_the_thinkers_on_text(norm_topk_prob):
    tower = build_tiny_model("qwen3_omni_moe", norm_topk_prob=norm_topk_prob)
    thinker = tower.full_model.thinker
    with torch.no_grad():
        expected = thinker(input_ids=IDS).logits
        torch.testing.assert_close(tower(IDS).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(tower(IDS, logits_to_keep=1).logits, expected[:, -1:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_omni_gate_recomputed_from_its_definition_is_the_routers(norm_topk_prob):
    """Qwen3-MoE's rule: fp32 softmax over all experts, top-k, / their sum if norm_topk_prob."""
    adapter = adapter_for(build_tiny_model("qwen3_omni_moe", norm_topk_prob=norm_topk_prob))
    for layer, (hidden, (logits, weights, experts)) in _router_calls(adapter).items():
        router = adapter.routers[layer]
        torch.testing.assert_close(logits, F.linear(hidden, router.weight), rtol=0, atol=0)
        probabilities = torch.softmax(logits.float(), dim=-1)
        chosen, expected_experts = probabilities.topk(adapter.top_k, dim=-1)
        expected = chosen / chosen.sum(-1, keepdim=True) if norm_topk_prob else chosen
        _same_route(experts, weights, expected_experts, expected)
        torch.testing.assert_close(adapter.weights_for(logits, experts), weights.float(), rtol=0, atol=1e-6)
        if not norm_topk_prob:
            assert (weights.sum(-1) < 0.9).any()   # a variant whose weights are not renormalised


@pytest.mark.parametrize("placeholder", ["thinker_config.audio_token_id", "thinker_config.image_token_id",
                                         "thinker_config.video_token_id"])
def test_qwen3_omni_audio_image_and_video_placeholders_are_refused(placeholder):
    assert placeholder in adapter_class("qwen3_omni_moe").tower.placeholders
    _refused_placeholder("qwen3_omni_moe", placeholder)


def test_qwen3_omni_cache_is_full_where_the_config_names_a_window_its_attention_never_applies():
    tower = build_tiny_model("qwen3_omni_moe", sliding_window=3)
    adapter = adapter_for(tower)
    assert adapter.config.sliding_window == 3 and adapter.attention_window(0) is None

    def decoded(cache):
        with torch.no_grad():
            tower(IDS[:1, :4], past_key_values=cache, use_cache=True)
            return torch.cat([tower(IDS[:1, t: t + 1], past_key_values=cache, use_cache=True).logits
                              for t in range(4, IDS.shape[1])], dim=1)

    with torch.no_grad():
        full = tower(IDS[:1]).logits[:, 4:]
    torch.testing.assert_close(decoded(adapter.new_cache()), full, rtol=0, atol=1e-5)
    assert adapter.config.sliding_window == 3   # the model's config untouched
    # the config's own cache keeps 3 keys per layer: the decode would differ from the full forward
    assert (decoded(DynamicCache(config=adapter.config)) - full).abs().max() > 1e-3


def test_qwen3_omni_saved_checkpoint_keeps_the_talker_and_loads_as_the_thinkers_tower(tmp_path):
    build_tiny_model("qwen3_omni_moe").save_pretrained(tmp_path)
    config = json.load(open(tmp_path / "config.json"))
    assert config["model_type"] == "qwen3_omni_moe" and config["enable_audio_output"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert any(n.startswith("talker.") for n in names) and any(n.startswith("code2wav.") for n in names)
    lens = rl.load(str(tmp_path), device="cpu")
    assert lens.loaded.adapter.model_type == "qwen3_omni_moe"
    assert lens.loaded.adapter.base_model is lens.loaded.adapter.model.full_model.thinker.model.language_model


# ----------------------------------------------------------------------------- Step 3.7


def test_step3p7_is_a_vision_language_checkpoint_served_through_its_text_model():
    tower = build_tiny_model("step3p7")
    full = tower.full_model
    assert type(full).__name__ == "Step3p7ForConditionalGeneration"
    adapter = adapter_for(tower)
    assert adapter.base_model is full.model.language_model and adapter.lm_head is full.lm_head
    assert adapter.moe_layers == [1, 2, 3]   # mlp_layer_types: the first layer dense
    with torch.no_grad():
        expected = full(input_ids=IDS).logits
        torch.testing.assert_close(tower(IDS).logits, expected, rtol=0, atol=0)


def test_step3p7_gate_recomputed_from_its_definition_is_the_routers():
    """sigmoid affinities; top-k of affinity + the router's e_score_correction_bias (choosing
    only); weights = the chosen affinities / their sum."""
    adapter = adapter_for(build_tiny_model("step3p7"))
    with torch.no_grad():   # a bias of the affinities' scale: choosing by affinity alone would differ
        for layer in adapter.moe_layers:
            adapter.routers[layer].e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, adapter.num_experts))
    differ = 0
    for layer, (hidden, (logits, weights, experts)) in _router_calls(adapter).items():
        router = adapter.routers[layer]
        torch.testing.assert_close(logits, F.linear(hidden, router.weight), rtol=0, atol=0)
        affinity = logits.float().sigmoid()
        expected_experts = (affinity + router.e_score_correction_bias).topk(adapter.top_k, dim=-1).indices
        chosen = affinity.gather(-1, expected_experts)
        _same_route(experts, weights, expected_experts, chosen / chosen.sum(-1, keepdim=True))
        torch.testing.assert_close(adapter.weights_for(logits, experts), weights.float(), rtol=0, atol=1e-6)
        scores = adapter.selection_scores(logits, layer)   # the standard route maximises the selection score
        torch.testing.assert_close(scores.gather(-1, experts).sum(-1), scores.topk(adapter.top_k).values.sum(-1))
        unbiased = affinity.topk(adapter.top_k, dim=-1).indices.sort(-1).values
        differ += int((unbiased != experts.sort(-1).values).any())
    assert differ   # the bias changed some choices


def test_step3p7_block_scales_the_experts_sum_by_moe_router_scaling_factor_and_adds_the_shared_expert():
    adapter = adapter_for(build_tiny_model("step3p7"))
    layer = adapter.moe_layers[0]
    assert adapter.routed_scale(layer) == 2.5 == adapter.config.moe_router_scaling_factor
    block, x = adapter.moe_block(layer), torch.randn(1, 5, adapter.config.hidden_size)
    with torch.no_grad():
        flat = x.view(-1, x.shape[-1])
        _, weights, experts = adapter.routers[layer](flat)
        expected = adapter.routed_scale(layer) * adapter.experts(layer)(flat, experts, weights) + block.shared_experts(flat)
        torch.testing.assert_close(block(x).view(-1, x.shape[-1]), expected, rtol=0, atol=1e-6)


def test_step3p7_sliding_layers_have_their_own_head_count_and_window():
    adapter = adapter_for(build_tiny_model("step3p7"))
    heads = [layer.self_attn.num_heads for layer in adapter.decoder_layers]
    assert heads == [2, 4, 2, 2] and attention_heads(adapter.config) == 4   # per_layer_config: no global count
    assert [adapter.attention_window(i) for i in range(4)] == [4, None, 4, 4]


def test_step3p7_clamped_swiglu_is_served_exactly():
    model = build_tiny_model("step3p7", swiglu_limits=[0, 0.05, 0.05, 0.05], swiglu_limits_shared=[0.05] * 4)
    assert model.model.layers[1].mlp.experts.limit == 0.05
    _verified(model)


def test_step3p7_image_placeholder_is_refused():
    _refused_placeholder("step3p7", "image_token_id")


def test_step3p7_bidirectional_attention_is_refused_in_one_line():
    with pytest.raises(RouteLensError) as error:
        rl.wrap(build_tiny_model("step3p7", use_bidirectional_attention=True))
    message = str(error.value)
    assert message.splitlines() == [message] and "use_bidirectional_attention" in message


# ----------------------------------------------------------------------------- both


@pytest.mark.parametrize("model_type", ["qwen3_omni_moe", "step3p7"])
def test_served_and_no_longer_refused(model_type):
    assert model_type not in REFUSED and adapter_class(model_type).tower is not None
