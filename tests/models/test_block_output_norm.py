"""Issue 29: a norm inside the MoE block over its own output (A.X-K1's post_mlp_layernorm),
declared once in the family contract (`Layout.block_output_norm`). The fast engine forms each
route's experts' sum before the norm and applies it per token after: equal to the reference
engine (plain forwards with the route forced); without the declaration its run-time checks
refuse the algebra and it falls back, saying why."""

import pytest
import torch

from routelens.models.families.axk1 import AXK1Adapter
from routelens.models.spec import Layout
from routelens.models.tiny import build_tiny_model
from routelens.verify import _engines_vs_reference


class Undeclared(AXK1Adapter):
    layout = Layout(windows="none")   # the block's own norm left out


@pytest.fixture(scope="module")
def model():
    model = build_tiny_model("axk1", seed=0)
    generator = torch.Generator().manual_seed(1)
    for layer in model.model.layers:   # a norm weight of ones would hide a norm applied in the wrong place
        norm = getattr(layer.mlp, "post_mlp_layernorm", None)
        if norm is not None:
            norm.weight.data = 0.5 + torch.rand(norm.weight.shape, generator=generator)
    return model


def test_the_block_returns_its_norm_over_the_experts_sum_plus_the_shared_experts(model):
    adapter = AXK1Adapter(model)
    layer = adapter.moe_layers[0]
    block, x = adapter.moe_block(layer), torch.randn(1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    seen = {}
    hook = adapter.block_output_norm(layer).register_forward_pre_hook(lambda module, args: seen.update(summed=args[0]))
    try:
        out = block(x)
    finally:
        hook.remove()
    _, weights, experts = block.gate(x)
    plain = block.experts(x.reshape(-1, x.shape[-1]), experts, weights).reshape(x.shape) + block.shared_experts(x)
    torch.testing.assert_close(seen["summed"], plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, block.post_mlp_layernorm(plain), rtol=1e-5, atol=1e-6)


def test_the_fast_engine_equals_the_reference_at_every_moe_layer_with_the_norm_declared(model):
    adapter = AXK1Adapter(model)
    input_ids = torch.randint(0, model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(3))
    for layer in adapter.moe_layers:
        fast = _engines_vs_reference(adapter, input_ids, layer, 4, 0, 4, 1e-5)[0]
        assert fast["status"] == "pass" and "fell back" not in fast["detail"], fast
        assert fast["difference"] <= 1e-5


def test_without_the_declaration_the_fast_engine_refuses_the_algebra_and_says_so(model):
    adapter = Undeclared(model)
    input_ids = torch.randint(0, model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(3))
    fast = _engines_vs_reference(adapter, input_ids, adapter.moe_layers[-1], 4, 0, 4, 1e-5)[0]
    assert "fast engine fell back" in fast["detail"] and "standard output plus the experts' weighted difference" \
        in fast["detail"], fast
