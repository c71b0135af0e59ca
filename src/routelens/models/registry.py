"""Registry of supported MoE families: `model_type` -> its adapter class ("module:Class"),
the gating rule in one line and the token mixers of its layers.

Plain data, imported without torch: `routelens models` lists it in well under a second, and
a new family is one file plus a line here. The adapter reads its `gating_rule` and
`layer_mixers` from here (`MoEAdapter.gating_rule`).

A family defined outside routelens is added at run time with `register_family`, or by a
package that declares it in the entry-point group `routelens.families` (name: the model
type; value: a `Family`), loaded the first time that model type is asked for.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import TYPE_CHECKING

from routelens.errors import RouteLensError

if TYPE_CHECKING:
    from routelens.models.adapter import MoEAdapter


@dataclass(frozen=True)
class Family:
    """One MoE family as the registry knows it.

    Examples:
        >>> from routelens.models.registry import family
        >>> family("olmoe").adapter_name, family("olmoe").mixers
        ('OlmoeAdapter', 'attention')
    """

    adapter: str | type        # "module:Class" (imported on first use), or the adapter class itself
    gating_rule: str           # one line, shown by `routelens models` and `routelens inspect`
    mixers: str = "attention"  # token mixers of the decoder layers ("attention + Mamba": a hybrid)

    @property
    def adapter_name(self) -> str:
        return self.adapter.split(":")[1] if isinstance(self.adapter, str) else self.adapter.__name__


SOFTMAX_TOPK = "fp32 softmax over all experts, top-k; weights renormalised over the k if norm_topk_prob"
SOFTMAX_TOPK_RENORMALISED = "fp32 softmax over all experts, top-k, renormalised over the k"
GROUPED_SIGMOID = ("sigmoid affinities; chosen by affinity + correction bias within top groups; "
                   "weights = affinity / (sum + 1e-20) if norm_topk_prob, x routed_scaling_factor")
GRANITE = "top-k on logits, softmax over the k; residual x residual_multiplier, logits / logits_scaling"
_F = "routelens.models.families."

FAMILIES: dict[str, Family] = {
    "olmoe": Family(_F + "olmoe:OlmoeAdapter", SOFTMAX_TOPK),
    "qwen3_moe": Family(_F + "qwen3_moe:Qwen3MoeAdapter", SOFTMAX_TOPK),
    "qwen2_moe": Family(_F + "qwen2_moe:Qwen2MoeAdapter", SOFTMAX_TOPK + "; plus sigmoid-gated shared expert (not routed)"),
    "mixtral": Family(_F + "mixtral:MixtralAdapter", "fp32 softmax over all experts, top-k, always renormalised over the k"),
    "deepseek_v2": Family(_F + "deepseek_v2:DeepseekV2Adapter",
                          "fp32 softmax over all experts, greedy or group-limited top-k; weights = probabilities x "
                          "routed_scaling_factor (not renormalised); shared experts added"),
    "deepseek_v3": Family(_F + "deepseek_v3:DeepseekV3Adapter", GROUPED_SIGMOID),
    "gpt_oss": Family(_F + "gpt_oss:GptOssAdapter",
                      "top-k on raw logits (router has a bias), then softmax over the k chosen logits"),
    "phimoe": Family(_F + "phimoe:PhimoeAdapter",
                     "sparsemixer (eval): always top-2; masked softmax within 2*jitter_eps of each maximum"),
    "glm4_moe": Family(_F + "glm4_moe:Glm4MoeAdapter", GROUPED_SIGMOID),
    "exaone_moe": Family(_F + "exaone_moe:ExaoneMoeAdapter", GROUPED_SIGMOID),
    "granitemoe": Family(_F + "granitemoe:GraniteMoeAdapter", GRANITE),
    "granitemoeshared": Family(_F + "granitemoe:GraniteMoeAdapter", GRANITE),
    "granitemoe_swa": Family(_F + "granitemoe:GraniteMoeSwaAdapter", GRANITE),
    "minimax_m2": Family(_F + "minimax_m2:MiniMaxM2Adapter",
                         "sigmoid affinities; chosen with the block's correction bias; weights = affinities / their sum"),
    "ernie4_5_moe": Family(_F + "ernie4_5_moe:Ernie45MoeAdapter",
                           "fp32 softmax; chosen with the statistics bias; weights = probabilities / max(sum, moe_norm_min)"),
    "dots1": Family(_F + "dots1:Dots1Adapter", GROUPED_SIGMOID),
    "glm4_moe_lite": Family(_F + "glm4_moe_lite:Glm4MoeLiteAdapter", GROUPED_SIGMOID),
    "afmoe": Family(_F + "afmoe:AfmoeAdapter",
                    "sigmoid affinities; chosen with the block's expert_bias; weights = affinities / (sum + 1e-20) x route_scale"),
    "flex_olmo": Family(_F + "flex_olmo:FlexOlmoAdapter", SOFTMAX_TOPK + "; post-norm layout"),
    "mellum": Family(_F + "mellum:MellumAdapter", SOFTMAX_TOPK),
    "mimo_v2_flash": Family(_F + "mimo_v2_flash:MimoV2FlashAdapter", GROUPED_SIGMOID),
    "solar_open": Family(_F + "solar_open:SolarOpenAdapter", GROUPED_SIGMOID),
    "hunyuan_v1_moe": Family(_F + "hunyuan_v1_moe:HunYuanMoEV1Adapter", SOFTMAX_TOPK_RENORMALISED + "; plus a dense shared MLP"),
    "beam": Family(_F + "beam:BeamAdapter",
                   "sigmoid affinities; chosen by affinity + correction bias within top groups; weights = affinity / "
                   "(sum + 1e-20) if norm_topk_prob; the block scales the experts' sum by routed_scaling_factor"),
    # hybrids (recurrent layers: the cache engine serves what the fast engine cannot patch)
    "qwen3_next": Family(_F + "qwen3_next:Qwen3NextAdapter", SOFTMAX_TOPK + "; plus sigmoid-gated shared expert (not routed)",
                         mixers="attention + Gated DeltaNet"),
    "qwen3_5_moe": Family(_F + "qwen3_5_moe:Qwen35MoeAdapter", SOFTMAX_TOPK_RENORMALISED + "; plus sigmoid-gated shared expert",
                          mixers="attention + Gated DeltaNet"),
    "qwen3_5_moe_text": Family(_F + "qwen3_5_moe:Qwen35MoeAdapter",
                               SOFTMAX_TOPK_RENORMALISED + "; plus sigmoid-gated shared expert", mixers="attention + Gated DeltaNet"),
    "kimi_linear": Family(_F + "kimi_linear:KimiLinearAdapter", GROUPED_SIGMOID, mixers="MLA + Kimi Delta Attention"),
    "minimax": Family(_F + "minimax:MiniMaxAdapter", SOFTMAX_TOPK_RENORMALISED, mixers="attention + lightning"),
    "jamba": Family(_F + "jamba:JambaAdapter", "fp32 softmax over all experts, top-k (not renormalised)", mixers="attention + Mamba"),
    "lfm2_moe": Family(_F + "lfm2_moe:Lfm2MoeAdapter",
                       "sigmoid affinities; chosen with the block's expert_bias; weights = affinities / (sum + 1e-6) if "
                       "norm_topk_prob, x routed_scaling_factor", mixers="attention + short conv"),
    "granitemoehybrid": Family(_F + "granitemoehybrid:GraniteMoeHybridAdapter", GRANITE, mixers="attention + Mamba-2"),
    "nemotron_h": Family(_F + "nemotron_h:NemotronHAdapter", GROUPED_SIGMOID, mixers="attention + Mamba-2"),
    "bailing_hybrid": Family(_F + "bailing_hybrid:BailingHybridAdapter", GROUPED_SIGMOID, mixers="MLA + linear attention"),
}

ADAPTERS: dict[str, str] = {model_type: entry.adapter for model_type, entry in FAMILIES.items()}
SUPPORTED = tuple(FAMILIES)   # the families routelens ships (registered ones come on top)
ENTRY_POINT_GROUP = "routelens.families"


def register_family(model_type: str, adapter, gating_rule: str, mixers: str = "attention", *,
                    replace: bool = False) -> Family:
    """Serve the Hugging Face `model_type` with `adapter` (an `MoEAdapter` subclass, or
    "module:Class"), defined outside routelens. `gating_rule`: the rule in one line, as
    `routelens models` shows it; `mixers`: what mixes positions in its layers. A model type
    routelens already serves is refused unless `replace`.

    Examples:
        >>> import routelens as rl
        >>> from routelens.models.families.softmax_topk import SoftmaxTopKAdapter
        >>> class MyAdapter(SoftmaxTopKAdapter):
        ...     pass
        >>> rl.register_family("my_olmoe_variant", MyAdapter, "fp32 softmax over all experts, top-k").adapter_name
        'MyAdapter'
    """
    from routelens.models.adapter import MoEAdapter

    if not isinstance(model_type, str) or not model_type.strip():
        raise RouteLensError(f"model_type must be a non-empty string (a config's model_type), got {model_type!r}")
    if isinstance(adapter, str):
        if adapter.count(":") != 1:
            raise RouteLensError(f"adapter {adapter!r} must be a class or 'module:Class'")
    elif not (isinstance(adapter, type) and issubclass(adapter, MoEAdapter)):
        raise RouteLensError(f"adapter must be a subclass of routelens.models.adapter.MoEAdapter, got {adapter!r}")
    if not isinstance(gating_rule, str) or not gating_rule.strip() or "\n" in gating_rule:
        raise RouteLensError("gating_rule must be the gating rule in one line of text")
    if model_type in FAMILIES and not replace:
        raise RouteLensError(f"model type {model_type!r} is already served by {FAMILIES[model_type].adapter_name}; "
                             "pass replace=True to serve it with another adapter")
    entry = FAMILIES[model_type] = Family(adapter, gating_rule, mixers)
    return entry


def _from_entry_points(model_type: str) -> Family | None:
    """A family that an installed package declares for `model_type` (entry-point group
    `routelens.families`), registered on first use."""
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name == model_type:
            declared = entry_point.load()
            if not isinstance(declared, Family):
                raise RouteLensError(f"entry point {entry_point.value!r} ({ENTRY_POINT_GROUP}: {model_type}) must be a "
                                     f"routelens.models.registry.Family, got {type(declared).__name__}")
            return register_family(model_type, declared.adapter, declared.gating_rule, declared.mixers)
    return None


def family(model_type: str) -> Family:
    """The registry entry of a Hugging Face `config.model_type` (one-line error if unserved)."""
    if model_type not in FAMILIES and _from_entry_points(model_type) is None:
        raise RouteLensError(
            f"unsupported architecture {model_type!r}; supported model types: {', '.join(FAMILIES)} "
            "(routelens.register_family serves another)"
        )
    return FAMILIES[model_type]


def adapter_class(model_type: str) -> type[MoEAdapter]:
    """The adapter class for a Hugging Face `config.model_type`."""
    adapter = family(model_type).adapter
    if not isinstance(adapter, str):
        return adapter
    module_name, class_name = adapter.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def adapter_for(model) -> MoEAdapter:
    """Wrap a loaded Hugging Face model in its family's adapter."""
    return adapter_class(model.config.model_type)(model)
