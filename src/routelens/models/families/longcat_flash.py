"""LongCat-Flash: zero-computation (identity) experts beside the routed ones, so the number of
experts that compute varies per token (its adaptive expert count).

The router scores n_routed_experts + zero_expert_num classes (logits [N, E + Z]) with one fp32
softmax, chooses the top k by probability + e_score_correction_bias, and weights them by
their probability x routed_scaling_factor (not renormalised). Indices below E are routed FFN
experts; an index E..E+Z-1 is an identity expert: it returns its weight x the token's input.
The router's output is the standard (logits, weights, experts) with E + Z classes, so no
mapping is needed: routelens' expert ids are the model's, 0..E+Z-1 (`num_experts` = E + Z).

What is counterfactual, and what is not:

- A route is k of the E + Z classes, routed and identity experts alike: exactly the choices
  the router itself ranks, weighted by its own rule, forced through the model's own experts
  module (an identity expert forced runs as one chosen: weight x input). Every route is
  exact; the run-time checks that prove it are the ones of every family (the standard
  route's score equals the natural forward's, the gating rule reproduces the router's
  weights, every override fires) plus this adapter's own check, on every load, that an
  index >= E returns weight x input and an index < E does not.
- Equal compute is *not* held: alternatives have k slots like the standard route, but the
  number of them that are FFN experts (the compute) differs between routes, as it does
  between tokens. `compute_experts` counts it per route; the isolation study's forced
  single expert may be an identity expert (a layer that passes the input through).
- Each decoder layer holds two attention and two dense-MLP sublayers; the MoE block reads the
  first MLP's (normed) input and is added at the layer's end, beside the second MLP: the
  layer's output is (the residual entering the second MLP) + second MLP + MoE block, which
  the adapter declares as that residual (`mlp_residual_input`: the second MLP's norm) and a
  parallel MLP (`parallel_mlp`: the second MLP), as Granite's shared MLP. A route changes
  the layer's output at its own position only. The fast engine's attention patch counts one
  attention per decoder layer, so a layer here is of kind "dual_attention" (`layer_kind`):
  the MoE layers below the last are scored by the cache engine, the last by the fast one.
- Multi-token-prediction weights (`model.mtp.*`) are not loaded by transformers (not scored).
"""

from __future__ import annotations

import torch
from torch import nn

from routelens.errors import RouteLensError
from routelens.models.adapter import MoEAdapter
from routelens.models.gates import LONGCAT_FLASH
from routelens.models.spec import Layout


class LongcatExpertsView(nn.Module):
    """The experts module, called with one slot per token as the fast engine does: transformers'
    LongcatFlashExperts squeezes a single slot away (a k = 1 call fails), so a single slot is
    padded with a weight-0 copy of itself (exact: it adds 0)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if experts.shape[-1] == 1:
            experts, weights = experts.repeat(1, 2), torch.cat([weights, torch.zeros_like(weights)], dim=-1)
        return self.experts(x, experts, weights)


class LongcatFlashAdapter(MoEAdapter):
    gate = LONGCAT_FLASH
    layout = Layout(moe_block="mlp", windows="none")   # the norms and MLPs come in pairs: the accessors below

    def __init__(self, model):
        super().__init__(model)
        router = next(iter(self.routers.values()))
        #: FFN experts (ids 0..routed_experts-1); the ids above them are identity experts
        self.routed_experts = int(self.config.n_routed_experts)
        self.num_experts = int(router.n_routed_experts)   # routed + zero-computation: every class the router scores
        self._check_identity_experts()

    @property
    def identity_experts(self) -> list[int]:
        """The ids of the zero-computation experts (each returns its weight x the input)."""
        return list(range(self.routed_experts, self.num_experts))

    def compute_experts(self, experts: torch.Tensor) -> torch.Tensor:
        """[..., k] expert ids -> [...] how many of them are FFN experts (compute), the rest identity."""
        return (experts < self.routed_experts).sum(-1)

    def _check_identity_experts(self) -> None:
        """On the checkpoint at hand: an identity id returns weight x input exactly, an FFN id does not."""
        if not self.identity_experts:
            return
        module = self.moe_block(self.moe_layers[0]).experts
        if any(p.device.type == "meta" for p in module.parameters()):   # no weights loaded (a Ray driver's model)
            return
        device = self.device_of(module)
        dtype = next((p.dtype for p in module.parameters()), torch.float32)
        x = torch.randn(2, self.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        # two slots (the module squeezes a single one away), 0.5 + 0.25: exactly 0.75 x for an identity expert
        weights = torch.tensor([[0.5, 0.25]] * 2, device=device, dtype=dtype)
        with torch.no_grad():
            identity = module(x, torch.full((2, 2), self.identity_experts[-1], device=device), weights)
            routed = module(x, torch.zeros(2, 2, dtype=torch.long, device=device), weights)
        if not torch.equal(identity, 0.75 * x) or torch.equal(routed, 0.75 * x):
            raise RouteLensError(f"{self.module_name(module)}: ids >= {self.routed_experts} are not identity experts "
                                 "(weight x input) as LongCat-Flash's are; this experts module is not the one routelens "
                                 "was written for")

    def expert_tensors(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """An FFN expert's slices (gate_up_proj is allocated for every class, down_proj for the
        FFN experts only); an identity expert has none."""
        if expert >= self.routed_experts:
            raise RouteLensError(f"expert {expert} of layer {layer} is a zero-computation (identity) expert: "
                                 "it holds no tensors to graft")
        module = self.moe_block(layer).experts
        prefix = self.module_name(module)
        return {f"{prefix}.{name}": parameter.data[expert] for name, parameter in module.named_parameters()}

    def experts(self, layer: int) -> nn.Module:
        return LongcatExpertsView(self.moe_block(layer).experts)

    def selection_distribution(self, logits: torch.Tensor, layer: int) -> torch.Tensor:
        """The router's own probabilities over the E + Z classes (float64): the correction bias is
        a fixed buffer of the size of these probabilities (E + Z is hundreds in a checkpoint), so
        probability + bias, clamped at 0 as `selection_scores` ranks by it, is 0 for many experts
        and no distribution to train a router on (router-update) or read shares from."""
        return torch.softmax(logits.double(), dim=-1)

    def mlp_residual_input(self, layer: int) -> nn.Module:
        return self.decoder_layers[layer].post_attention_layernorm[1]   # its input: the residual the block joins

    def parallel_mlp(self, layer: int) -> nn.Module:
        return self.decoder_layers[layer].mlps[1]   # added with the block, after the second attention

    def layer_kind(self, layer: int) -> str:
        return "dual_attention"   # two attention sublayers (cache layers 2 l and 2 l + 1)

    def describe(self) -> dict:
        described = super().describe()
        described["identity_experts"] = self.identity_experts
        described["counterfactual"] = (
            f"routes are k={self.top_k} of the {self.routed_experts} FFN and {len(self.identity_experts)} identity "
            "experts the router chooses from, forced exactly; the number of FFN experts (compute) a route runs is not "
            "held equal")
        return described
