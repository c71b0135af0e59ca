"""The adapter protocol: what routelens needs to know about one MoE family.

Every supported family routes the same way in transformers 5.23 (see shared notes):

    router_logits [T, E], topk_weights [T, k], topk_experts [T, k] = router(hidden)
    out = experts(hidden, topk_experts, topk_weights)

with T = batch x seq flattened row-major (row = b * S + s). An adapter therefore only has
to say which modules are the routers (found through the model's own recorder registry,
`_can_record_outputs["router_logits"]`), and state the family's gating rule, as data (a
`Gate`, computed by `routelens.models.gating`) or, where a gate cannot be data, as code;
either way as pure functions of the raw logits:

- `weights_for(logits [N, E], experts [N, k]) -> weights [N, k]`: the weights the model
  itself would apply if the router had chosen `experts`.
- `selection_scores(logits [N, E], layer) -> scores [N, E]`: the non-negative score the
  router of `layer` ranks experts by (probability-like; the standard route maximises its
  sum among the routes the router may choose).

The adapter is also the one structure map the engines read: where a layer's MoE block,
experts and MLP-input norm are, the final norm and LM head, the norm order, and the
attention window of each layer (`attention_window`), read from the family's `Layout`.
Engines never reach into a model by attribute name; a family with a computed answer
overrides these accessors.

The route override itself is family-independent and lives in `routelens.models.routing`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from routelens.errors import RouteLensError
from routelens.models import gating
from routelens.models.registry import family
from routelens.models.spec import Gate, Layout, Tower

#: `config.layer_types` values of softmax-attention layers (the fast engine's patch covers these).
SOFTMAX_ATTENTION = ("full_attention", "sliding_attention")


@dataclass
class CacheSnapshot:
    """A cache as it stood before a decode step: `source` is the live cache object the model
    passes to its layers, `cache` an independent batch-1 copy of it."""

    source: object
    cache: object


def copy_cache_layer(layer, index: torch.Tensor):
    """A copy of one cache layer with its batch rows picked by `index` (new tensors, so the
    copy's in-place updates never reach the original); through the layer's own
    `reorder_cache`, which every cache layer kind implements for beam search."""
    clone = copy.copy(layer)
    for name, value in vars(layer).items():
        if isinstance(value, (dict, list)):   # per-state tables (linear attention) are updated in place
            setattr(clone, name, copy.copy(value))
    clone.reorder_cache(index)
    return clone


class MoEAdapter:
    """Describes one loaded MoE causal LM. Subclasses set `gate` and `layout` (data), and
    override an accessor only where the answer is computed; everything else is shared."""

    #: How the router weights its experts, as data (`routelens.models.gating` computes it);
    #: None for a gate that is code (the subclass overrides `weights_for`).
    gate: ClassVar[Gate | None] = None
    #: Where a decoder layer keeps its MoE block, the norm before it, ...; the accessors below read it.
    layout: ClassVar[Layout] = Layout()
    #: Why decoding with the model's own cache does not reproduce its full forward (a defect of
    #: the family's cached path, measured), or None; the cache engine then hands its work to
    #: the reference engine from the start, saying why.
    cache_engine_defect: ClassVar[str | None] = None
    #: For a multimodal checkpoint served through its text model: where the conditional-generation
    #: class keeps it (`routelens.models.families.vision_language` builds the text tower), else None.
    tower: ClassVar[Tower | None] = None
    #: The transformers class that builds the causal LM where transformers' AutoModelForCausalLM
    #: does not map the model type (Mistral4ForCausalLM), else None (`causal_lm_class`).
    causal_lm: ClassVar[str | None] = None
    #: Whether every router computes in float32 in a bf16/fp16 model (set by
    #: `routelens.models.loading.upcast_routers`, `load(..., upcast_router=True)`).
    upcast_router: bool = False

    def __init__(self, model: PreTrainedModel):
        if getattr(model, "use_kernels", False):
            raise RouteLensError(
                f"{type(model).__name__} was loaded with use_kernels=True: hub kernels replace whole MoE blocks, so "
                "routes can be neither observed nor forced (and transformers cannot undo it); load it without use_kernels")
        self.model = model.eval()
        self.config = model.config
        self.routers: dict[int, nn.Module] = self._find_routers()
        if not self.routers:
            raise RouteLensError(
                f"model {type(model).__name__} has no MoE layers (no router in any of its "
                f"{self.num_layers} decoder layers); routelens needs a Mixture-of-Experts model"
            )
        counts = {layer: int(router.num_experts) for layer, router in self.routers.items()}
        if len(set(counts.values())) > 1:
            raise RouteLensError(
                f"{type(model).__name__}'s MoE layers hold different numbers of experts ({_per_layer(counts)}); "
                "routelens needs one expert count across MoE layers (expert ids index one table per layer)")
        self.num_experts: int = next(iter(counts.values()))
        #: k per MoE layer: a config may give one per layer (HunYuan's moe_topk list); analyses read
        #: `top_k_at(layer)`, and `top_k` (the first MoE layer's) only where every layer has the same
        self.top_ks: dict[int, int] = {layer: self._top_k(router) for layer, router in self.routers.items()}
        self.top_k: int = next(iter(self.top_ks.values()))

    @classmethod
    def causal_lm_class(cls):
        """The class that builds this family's model from its checkpoint's config: the tower's
        auto class (a multimodal checkpoint's full model), the declared `causal_lm`, or
        AutoModelForCausalLM."""
        import transformers

        if cls.tower is not None:
            return getattr(transformers, cls.tower.auto_class)
        return getattr(transformers, cls.causal_lm or "AutoModelForCausalLM")

    @property
    def expert_intermediate_size(self) -> int:
        """The widest MLP intermediate size (an expert's or a dense layer's): what the engines'
        memory estimates multiply by k (DBRX keeps it in ffn_config)."""
        config = self.config
        return max(getattr(config, "moe_intermediate_size", 0) or 0, getattr(config, "intermediate_size", 0) or 0)

    @classmethod
    def check_config(cls, config) -> None:
        """Refuse, in one line and before any weight is read, a checkpoint config of this model
        type that the family does not serve (a variant whose model it cannot read)."""

    # ----------------------------------------------------------------- structure
    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def moe_layers(self) -> list[int]:
        """Decoder-layer indices whose MLP is a routed MoE block (dense layers excluded)."""
        return sorted(self.routers)

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model is made for (max_position_embeddings), if it says."""
        return getattr(self.config, "max_position_embeddings", None)

    @property
    def base_model(self) -> nn.Module:
        """The decoder stack without the LM head (its output is the final-normed hidden state)."""
        return self.model.model

    # norm_order and window_source are read by name (the engines; an adapter written before
    # Layout may still set them as class attributes, which take precedence over these)
    @property
    def norm_order(self) -> str:
        """The layout's norm order ("pre": what the fast engine needs)."""
        return self.layout.norm_order

    @property
    def window_source(self) -> str:
        """Where attention windows come from ("config" or "none"; see `Layout.windows`)."""
        return self.layout.windows

    @property
    def final_norm(self) -> nn.Module:
        return getattr(self.base_model, self.layout.final_norm)

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def moe_block(self, layer: int) -> nn.Module:
        """The routed MoE block of decoder layer `layer` (router, experts, shared experts)."""
        return getattr(self.decoder_layers[layer], self.layout.moe_block)

    @staticmethod
    def block_output(output) -> torch.Tensor:
        """The hidden states an MoE block returned (GPT-OSS returns (out, router scores))."""
        return output[0] if isinstance(output, tuple) else output

    def experts(self, layer: int) -> nn.Module:
        """The fused experts module: experts(x [N, d], indices [N, k], weights [N, k]) -> [N, d]."""
        return self.moe_block(layer).experts

    def expert_tensors(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Expert `expert`'s own tensors at `layer`, as views into the model's parameters,
        by their full parameter name (what a graft copies). transformers 5.23 fuses a
        layer's experts into 3-D parameters with the expert first; a parameter of another
        shape (a shared scale, a quantized block) is not any one expert's, so it is refused."""
        module = self.experts(layer)
        prefix = self.module_name(module)
        tensors = {}
        for name, parameter in module.named_parameters():
            if parameter.dim() == 0 or parameter.shape[0] != self.num_experts:
                raise RouteLensError(f"{prefix}.{name} {tuple(parameter.shape)} is not one slice per expert "
                                     f"({self.num_experts} experts): this experts layout cannot be grafted")
            tensors[f"{prefix}.{name}"] = parameter.data[expert]
        if not tensors:
            raise RouteLensError(f"{prefix} holds no parameters (a quantized or offloaded experts module?): nothing to graft")
        return tensors

    def parallel_mlp(self, layer: int) -> nn.Module | None:
        """A dense MLP beside the MoE block whose output is added to the block's before the
        residual (GraniteMoeShared's shared_mlp); None when the block holds everything."""
        name = self.layout.parallel_mlp
        return getattr(self.decoder_layers[layer], name, None) if name else None

    def mlp_residual_scale(self, layer: int) -> float:
        """residual + scale * (MoE block + parallel MLP) is the layer's output (Granite scales by
        residual_multiplier); checked against the model on every fast-engine pass."""
        return 1.0

    def routed_scale(self, layer: int) -> float:
        """A factor the MoE block applies to its experts' weighted sum after the router (Beam:
        routed_scaling_factor); 1 where the router's weights carry every factor."""
        return 1.0

    def residual_weight(self, layer: int) -> float:
        """The weight of the residual itself in that sum (MiniMax: mlp_alpha_factor); 1 elsewhere."""
        return 1.0

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits of final-normed hidden states (Granite divides by logits_scaling)."""
        return self.lm_head(hidden)

    def mlp_residual_input(self, layer: int) -> nn.Module:
        """The module whose input is the residual stream entering the MLP sub-block: the
        MLP-input norm (pre-norm layout), or the MoE block itself where none precedes it."""
        name = self.layout.mlp_input
        return getattr(self.decoder_layers[layer], name) if name else self.moe_block(layer)

    def mlp_output_norm(self, layer: int) -> nn.Module | None:
        """A per-token norm applied to the MLP sub-block's output before the residual add
        (sandwich norms: AFMoE; post-norm: FlexOlmo), or None."""
        name = self.layout.mlp_output_norm
        return getattr(self.decoder_layers[layer], name) if name else None

    def block_output_norm(self, layer: int) -> nn.Module | None:
        """A per-token norm inside the MoE block over its combined output (A.X-K1), or None:
        the block returns norm(routed experts + shared experts)."""
        name = self.layout.block_output_norm
        return getattr(self.moe_block(layer), name) if name else None

    def attention_window(self, layer: int) -> int | None:
        """Keys a query of decoder layer `layer` may see (itself included), or None for full
        causal attention: what the family's mask builder applies, read from the config as the
        modeling code reads it. The fast engine checks this against the mask the model builds."""
        if self.window_source == "none":
            return None
        window = getattr(self.config, "sliding_window", None) or None
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None:
            return window if layer_types[layer] == "sliding_attention" else None
        return window

    # Keyword arguments a decoder layer receives per position: name -> (batch dim, position dim)
    # of the tensor (of each tensor of a tuple). The fast engine picks them per row and takes
    # them at the positions it carries; a 3-d position_ids is multimodal [3, B, T].
    positional_arguments: dict[str, tuple[int, int]] = {"position_embeddings": (0, 1), "position_ids": (0, 1)}

    def layer_kind(self, layer: int) -> str:
        """What mixes positions in decoder layer `layer`, as `config.layer_types` names it
        ("full_attention", "sliding_attention", "linear_attention", "conv", "moe", ...);
        "full_attention" where the config gives no layer types."""
        layer_types = getattr(self.config, "layer_types", None)
        return layer_types[layer] if layer_types else "full_attention"

    def fast_engine_unsupported(self) -> str | None:
        """Why the fast engine's expert-output algebra does not hold for this checkpoint (a
        structure the family allows but this checkpoint uses), or None."""
        return None

    # ----------------------------------------------------------------- cache (the cache engine)
    def new_cache(self):
        """An empty cache of the kind the model's forward builds for itself."""
        return DynamicCache(config=self.config)

    def copy_cache(self, cache, first_layer: int, rows: int):
        """A copy of a batch-1 cache whose layers from `first_layer` up hold `rows` copies of
        their state; the layers below are shared with `cache` (the engine never runs them)."""
        index = torch.zeros(rows, dtype=torch.long)
        clone = copy.copy(cache)
        clone.layers = list(cache.layers)
        for i in range(first_layer, len(cache.layers)):
            clone.layers[i] = copy_cache_layer(cache.layers[i], index)
        return clone

    def snapshot_cache(self, cache) -> CacheSnapshot:
        return CacheSnapshot(cache, self.copy_cache(cache, 0, 1))

    def expand_cache(self, snapshot: CacheSnapshot, first_layer: int, rows: int):
        return self.copy_cache(snapshot.cache, first_layer, rows)

    @property
    def device(self) -> torch.device:
        """The device of the input embeddings (where input ids go under a device map too)."""
        return self.device_of(self.model.get_input_embeddings())

    def module_name(self, module: nn.Module) -> str:
        """The module's full name in the model (as in `named_modules()`), or its class name."""
        return next((name for name, candidate in self.model.named_modules() if candidate is module),
                    type(module).__name__)

    def device_of(self, module: nn.Module) -> torch.device:
        """Where a module computes (its first parameter; under a device map layers differ)."""
        for tensor in module.parameters():
            if tensor.device.type != "meta":
                return tensor.device
        hook = getattr(module, "_hf_hook", None)   # accelerate offload: weights arrive at execution
        return torch.device(getattr(hook, "execution_device", None) or "cpu")

    def _router_class(self) -> type[nn.Module]:
        recorders = getattr(self.model.model, "_can_record_outputs", None) or {}
        recorder = recorders.get("router_logits")
        router_class = getattr(recorder, "target_class", None)
        if router_class is None:
            raise RouteLensError(
                f"{type(self.model).__name__} declares no router class for router_logits; "
                "this transformers version is not supported (pin the version in pyproject.toml)"
            )
        return router_class

    def _find_routers(self) -> dict[int, nn.Module]:
        router_class = self._router_class()
        routers = {}
        for index, layer in enumerate(self.decoder_layers):
            found = [m for m in layer.modules() if isinstance(m, router_class)]
            if len(found) > 1:
                raise RouteLensError(f"decoder layer {index} has {len(found)} routers; expected one")
            if found:
                routers[index] = found[0]
        return routers

    def _top_k(self, router: nn.Module) -> int:
        return int(router.top_k)

    def top_k_at(self, layer: int) -> int:
        """How many experts the router of MoE layer `layer` chooses per token."""
        return self.top_ks[layer]

    def one_top_k(self, layers: list[int], what: str) -> int:
        """The k that `layers` share, for a computation (`what`) that compares layers at one k;
        a one-line error naming the layers' k where they differ."""
        ks = {layer: self.top_ks[layer] for layer in layers}
        if len(set(ks.values())) > 1:
            raise RouteLensError(f"{what} needs one top-k across its layers, but this model's routers choose "
                                 f"different numbers of experts per layer ({_per_layer(ks)}); give layers of one k")
        return next(iter(ks.values()))

    # ----------------------------------------------------------------- the router's output layout
    def route_of(self, output):
        """What a router returned, as routelens reads it: (logits [N, E], weights [N, k],
        experts [N, k]). The routers of most families return exactly that; a router with an
        output layout of its own (Llama 4's dense scores, ZAYA's skip class and router state,
        JetMoE's sorted dispatch) is mapped here, once, for every hook that reads or forces a
        route (`routelens.models.routing`)."""
        return output

    def router_output(self, output, route: tuple):
        """The inverse of `route_of`: what the router must return, in its own layout, for its
        block to run `route` = (logits, weights, experts); `output` is what it did return
        (the parts a route does not change are kept). Identity for the standard layout."""
        return route

    def resolve_layers(self, layers: list[int]) -> list[int]:
        """Map user layer indices (negative counts from the end) to decoder-layer indices,
        refusing out-of-range and dense layers with a message that lists the MoE layers."""
        resolved = []
        for layer in layers:
            index = layer + self.num_layers if layer < 0 else layer
            if not 0 <= index < self.num_layers:
                raise RouteLensError(
                    f"layer {layer} is out of range: the model has {self.num_layers} decoder layers "
                    f"(MoE layers: {self.moe_layers})"
                )
            if index not in self.routers:
                raise RouteLensError(
                    f"layer {layer} is a dense layer; choose one of the MoE layers {self.moe_layers}"
                )
            if index not in resolved:
                resolved.append(index)
        return resolved

    def router_extra_args(self, layer: int) -> tuple:
        """What the MoE block passes to its router besides the hidden states (a choice bias the
        block holds: MiniMax-M2, AFMoE, LFM2-MoE), for calling the router directly."""
        if self.gate is not None and self.gate.bias_owner == "block":
            return (self.choice_bias(layer),)
        return ()

    def choice_bias(self, layer: int) -> torch.Tensor | None:
        """The bias the router of `layer` adds to its scores for choosing (never to the
        weights), where the gate says it lives; None without one (LFM2-MoE's exists only with
        use_expert_bias; the tiny test models randomise every such bias, so a wrong path fails
        the selection tests)."""
        if self.gate is None or self.gate.choice_bias is None:
            return None
        found = self.routers[layer] if self.gate.bias_owner == "router" else self.moe_block(layer)
        for name in self.gate.bias_path:
            found = getattr(found, name, None)
        # detached: a checkpoint loads it requiring grad, and nothing routelens computes trains it
        return found.detach() if isinstance(found, torch.Tensor) else found

    # ----------------------------------------------------------------- gating rule
    def selection_scores(self, logits: torch.Tensor, layer: int, admitted_only: bool = True) -> torch.Tensor:
        """[N, E] -> [N, E] score the router of `layer` ranks experts by. Default: fp32 softmax.
        `admitted_only`: zero outside the experts the router may choose for each token (the
        groups a group-limited router keeps), so sampled alternatives are routes it could produce."""
        if self.gate is None:   # a gate that is code ranks by the softmax unless it overrides this
            return torch.softmax(logits.float(), dim=-1)
        return gating.selection_scores(self.gate, logits, self.choice_bias(layer), self.config, admitted_only)

    def selection_distribution(self, logits: torch.Tensor, layer: int) -> torch.Tensor:
        """[N, E] -> [N, E] float64: the selection scores normalised per token (the softmax
        for softmax routers, sigmoid affinities over their sum for sigmoid routers), over all
        experts: smooth in the logits (router training, routing shares), unlike a group mask."""
        scores = self.selection_scores(logits, layer, admitted_only=False).double()
        return scores / scores.sum(-1, keepdim=True).clamp_min(1e-30)

    def weights_for(self, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """[N, E], [N, k] -> [N, k] fp32 weights the model would apply to `experts`."""
        if self.gate is None:
            raise NotImplementedError(f"{type(self).__name__} has no data gate: it must override weights_for")
        return gating.weights_for(self.gate, logits, experts, self.config)

    @property
    def model_type(self) -> str:
        """The registry's model type: the checkpoint's (multimodal) type for a text tower, whose
        config is its text model's; `config.model_type` otherwise."""
        return getattr(self.model, "tower_of", None) or self.config.model_type

    @property
    def gating_rule(self) -> str:
        """The gating rule in one line (the registry's entry for this model type)."""
        return family(self.model_type).gating_rule

    @property
    def layer_mixers(self) -> str:
        """What mixes positions across the decoder layers ("attention", or a hybrid's kinds);
        the engines read `layer_kind` per layer instead."""
        return family(self.model_type).mixers

    def describe(self) -> dict:
        """What `routelens inspect` prints and `run.json` records about the model."""
        return {
            "architecture": type(self.model).__name__,
            "model_type": self.model_type,
            "adapter": type(self).__name__,
            "decoder_layers": self.num_layers,
            "moe_layers": self.moe_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            **({"top_k_per_layer": self.top_ks} if len(set(self.top_ks.values())) > 1 else {}),
            "gating_rule": self.gating_rule,
            "experts_implementation": getattr(self.config, "_experts_implementation", None),
            "attention_windows": {i: w for i in range(self.num_layers) if (w := self.attention_window(i))},
            "other_layer_kinds": {i: kind for i in range(self.num_layers)
                                  if (kind := self.layer_kind(i)) not in SOFTMAX_ATTENTION},
            "parameters": sum(p.numel() for p in self.model.parameters()),
            **({"text_tower": self.model.tower_notice} if getattr(self.model, "tower_of", None) else {}),
            **({"mtp_layers": _MTP_NOT_SCORED.format(count=count)} if (count := self.mtp_layers) else
               {"mtp_layers": _MTP_WEIGHTS_NOT_LOADED} if self._skips_mtp_weights() else {}),
        }

    @property
    def mtp_layers(self) -> int:
        """Multi-token-prediction layers the checkpoint declares (`num_mtp_layers`, alias
        `num_nextn_predict_layers`): not part of the model's forward, so never scored."""
        count = getattr(self.config, "num_mtp_layers", None) or getattr(self.config, "num_nextn_predict_layers", None)
        return int(count) if isinstance(count, int) else 0

    def _skips_mtp_weights(self) -> bool:
        """Whether the model's class drops a checkpoint's multi-token-prediction weights at load
        (an `mtp` pattern among its `_keys_to_ignore_on_load_unexpected`: Qwen3-Next, MiMo,
        LongCat-Flash, ...), whatever the config calls their count."""
        classes = [type(self.model), type(getattr(self.model, "full_model", self.model))]
        return any("mtp" in pattern for cls in classes
                   for pattern in (getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []))


# transformers 5.23 builds MTP layers only for speculative drafts (generate(use_mtp=True): an
# MtpModel beside the main one, whose proposals the main model verifies), so the next-token
# distribution routelens scores never passes through them
_MTP_NOT_SCORED = ("{count} multi-token-prediction layer(s) in the config: excluded from scoring (not part of the "
                   "model's next-token forward; transformers builds them only as generate(use_mtp=True) drafts); "
                   "routes, scores and checks cover the main decoder's layers only")
_MTP_WEIGHTS_NOT_LOADED = ("multi-token-prediction weights a checkpoint of this type holds (mtp.*) are dropped by "
                           "transformers at load: excluded from scoring; routes, scores and checks cover the main "
                           "decoder's layers only")


def _per_layer(values: dict[int, int]) -> str:
    """'2 at layer 0, 1 at layer 1, ...' for a message."""
    return ", ".join(f"{value} at layer {layer}" for layer, value in values.items())
