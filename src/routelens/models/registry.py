"""Registry of supported MoE families: `model_type` -> its adapter class ("module:Class"),
its `Gate` (the gating rule as data) and the token mixers of its layers.

Plain data, imported without torch: `routelens models` lists it in well under a second, and
a new family is one file plus a line here. This table is the one place a family's model
types are named. The gating rule text is generated from the `Gate` (`Gate.describe`, plus
what the block does besides routing), so it cannot drift from what the adapter computes;
only a gate that is code (PhiMoE's sparsemixer) has a hand-written rule. The adapter reads
its `gating_rule` and `layer_mixers` from here (`MoEAdapter.gating_rule`).

A family defined outside routelens is added at run time with `register_family`, or by a
package that declares it in the entry-point group `routelens.families` (name: the model
type; value: a `Family`), loaded the first time that model type is asked for.

`python -m routelens.models.registry --markdown` prints the table of docs/families.md.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from routelens.errors import RouteLensError
from routelens.models import gates
from routelens.models.spec import Gate

if TYPE_CHECKING:
    from routelens.models.adapter import MoEAdapter


@dataclass(frozen=True)
class Family:
    """One MoE family as the registry knows it: its adapter, and its gating rule either as a
    `Gate` (the rule text is generated from it, with `notes` on what the block adds) or, for
    a gate that is code, as one hand-written line.

    Examples:
        >>> from routelens.models.registry import family
        >>> family("olmoe").adapter_name, family("olmoe").mixers
        ('OlmoeAdapter', 'attention')
        >>> family("jamba").gating_rule
        'fp32 softmax over all experts; top-k; weights = the chosen probabilities (not renormalised)'
    """

    adapter: str | type               # "module:Class" (imported on first use), or the adapter class itself
    gating_rule: str | None = None    # one line (`routelens models`, `routelens inspect`); generated from `gate` if None
    mixers: str = "attention"         # token mixers of the decoder layers ("attention + Mamba": a hybrid)
    gate: Gate | None = None          # the gate as data (None: the adapter's gate is code)
    notes: str = ""                   # what the block adds besides the routed experts, appended to the generated rule

    def __post_init__(self):
        if self.gate is not None and self.gating_rule is not None:
            raise RouteLensError("a Family takes a gate or a hand-written gating_rule, not both "
                                 "(the rule is generated from the gate)")
        if self.gate is None and self.gating_rule is None:
            raise RouteLensError("a Family needs its gate (routelens.models.spec.Gate) or, for a gate that is code, "
                                 "a gating_rule in one line")
        if self.gate is not None:   # frozen: the generated text is set once, here
            object.__setattr__(self, "gating_rule", "; ".join(filter(None, [self.gate.describe(), self.notes])))

    @property
    def adapter_name(self) -> str:
        return self.adapter.split(":")[1] if isinstance(self.adapter, str) else self.adapter.__name__


_F = "routelens.models.families."
_GRANITE = "residual x residual_multiplier, logits / logits_scaling"
_SHARED_EXPERT = "plus a sigmoid-gated shared expert (not routed)"


def _deepseek_v3_like(adapter: str, mixers: str = "attention") -> Family:
    return Family(_F + adapter, mixers=mixers, gate=gates.DEEPSEEK_V3)


FAMILIES: dict[str, Family] = {
    "olmoe": Family(_F + "olmoe:OlmoeAdapter", gate=gates.SOFTMAX_TOPK),
    "qwen3_moe": Family(_F + "qwen3_moe:Qwen3MoeAdapter", gate=gates.SOFTMAX_TOPK),
    "qwen2_moe": Family(_F + "qwen2_moe:Qwen2MoeAdapter", gate=gates.SOFTMAX_TOPK, notes=_SHARED_EXPERT),
    "mixtral": Family(_F + "mixtral:MixtralAdapter", gate=gates.SOFTMAX_TOPK_RENORMALISED),
    "deepseek_v2": Family(_F + "deepseek_v2:DeepseekV2Adapter", gate=gates.DEEPSEEK_V2, notes="shared experts added"),
    "deepseek_v3": _deepseek_v3_like("deepseek_v3:DeepseekV3Adapter"),
    "gpt_oss": Family(_F + "gpt_oss:GptOssAdapter", gate=gates.TOPK_THEN_SOFTMAX, notes="the router's logits carry a bias"),
    "phimoe": Family(_F + "phimoe:PhimoeAdapter",
                     "sparsemixer (eval): always top-2; masked softmax within 2*jitter_eps of each maximum"),
    "glm4_moe": _deepseek_v3_like("glm4_moe:Glm4MoeAdapter"),
    "exaone_moe": _deepseek_v3_like("exaone_moe:ExaoneMoeAdapter"),
    "granitemoe": Family(_F + "granitemoe:GraniteMoeAdapter", gate=gates.TOPK_THEN_SOFTMAX, notes=_GRANITE),
    "granitemoeshared": Family(_F + "granitemoe:GraniteMoeAdapter", gate=gates.TOPK_THEN_SOFTMAX, notes=_GRANITE),
    "granitemoe_swa": Family(_F + "granitemoe:GraniteMoeSwaAdapter", gate=gates.TOPK_THEN_SOFTMAX, notes=_GRANITE),
    "minimax_m2": Family(_F + "minimax_m2:MiniMaxM2Adapter", gate=gates.MINIMAX_M2),
    "ernie4_5_moe": Family(_F + "ernie4_5_moe:Ernie45MoeAdapter", gate=gates.ERNIE),
    "dots1": _deepseek_v3_like("dots1:Dots1Adapter"),
    "glm4_moe_lite": _deepseek_v3_like("glm4_moe_lite:Glm4MoeLiteAdapter"),
    "afmoe": Family(_F + "afmoe:AfmoeAdapter", gate=gates.AFMOE),
    "flex_olmo": Family(_F + "flex_olmo:FlexOlmoAdapter", gate=gates.SOFTMAX_TOPK, notes="post-norm layout"),
    "mellum": Family(_F + "mellum:MellumAdapter", gate=gates.SOFTMAX_TOPK),
    "mimo_v2_flash": _deepseek_v3_like("mimo_v2_flash:MimoV2FlashAdapter"),
    "solar_open": _deepseek_v3_like("solar_open:SolarOpenAdapter"),
    "hunyuan_v1_moe": Family(_F + "hunyuan_v1_moe:HunYuanMoEV1Adapter", gate=gates.SOFTMAX_TOPK_RENORMALISED,
                             notes="plus a dense shared MLP"),
    "beam": Family(_F + "beam:BeamAdapter", gate=gates.BEAM,
                   notes="the block scales the experts' sum by routed_scaling_factor"),
    # hybrids (recurrent layers: the cache engine serves what the fast engine cannot patch)
    "qwen3_next": Family(_F + "qwen3_next:Qwen3NextAdapter", mixers="attention + Gated DeltaNet",
                         gate=gates.SOFTMAX_TOPK, notes=_SHARED_EXPERT),
    "qwen3_5_moe": Family(_F + "qwen3_5_moe:Qwen35MoeAdapter", mixers="attention + Gated DeltaNet",
                          gate=gates.SOFTMAX_TOPK_RENORMALISED, notes=_SHARED_EXPERT),
    "qwen3_5_moe_text": Family(_F + "qwen3_5_moe:Qwen35MoeAdapter", mixers="attention + Gated DeltaNet",
                               gate=gates.SOFTMAX_TOPK_RENORMALISED, notes=_SHARED_EXPERT),
    "kimi_linear": _deepseek_v3_like("kimi_linear:KimiLinearAdapter", mixers="MLA + Kimi Delta Attention"),
    "minimax": Family(_F + "minimax:MiniMaxAdapter", mixers="attention + lightning", gate=gates.SOFTMAX_TOPK_RENORMALISED,
                      notes="residual x mlp_alpha_factor, block x mlp_beta_factor"),
    "jamba": Family(_F + "jamba:JambaAdapter", mixers="attention + Mamba", gate=gates.SOFTMAX_TOPK_PLAIN),
    "lfm2_moe": Family(_F + "lfm2_moe:Lfm2MoeAdapter", mixers="attention + short conv", gate=gates.LFM2_MOE),
    "granitemoehybrid": Family(_F + "granitemoehybrid:GraniteMoeHybridAdapter", mixers="attention + Mamba-2",
                               gate=gates.TOPK_THEN_SOFTMAX, notes=_GRANITE),
    "nemotron_h": _deepseek_v3_like("nemotron_h:NemotronHAdapter", mixers="attention + Mamba-2"),
    "bailing_hybrid": _deepseek_v3_like("bailing_hybrid:BailingHybridAdapter", mixers="MLA + linear attention"),
    # issue 29 (group A)
    "cohere2_moe": Family(_F + "cohere2_moe:Cohere2MoeAdapter", gate=gates.TOPK_THEN_SOFTMAX,
                          notes="sigmoid of the chosen logits / their sum if norm_topk_prob when expert_selection_fn = "
                                "sigmoid; shared experts averaged with the experts' sum (or added); attention and the "
                                "MoE block in parallel on one normed input; logits x logit_scale"),
    "flint": Family(_F + "flint:FlintAdapter", gate=gates.SIGMOID_TOPK, notes="plus an ungated shared expert"),
    "laguna": Family(_F + "laguna:LagunaAdapter", gate=gates.LAGUNA,
                     notes="the block scales the experts' sum by moe_routed_scaling_factor; plus a shared expert"),
    "kolibri1": Family(_F + "kolibri1:Kolibri1Adapter", gate=gates.SIGMOID_TOPK,
                       notes="experts chosen by top-k of logit + the router's e_score_correction_bias; plus a shared "
                             "expert; sandwich norms"),
    "hy_v3": Family(_F + "hy_v3:HYV3Adapter", gate=gates.HY_V3, notes="plus a shared expert"),
    # issue 29 (group D): multimodal checkpoints served through their text model, image tokens absent
    "qwen3_vl_moe": Family(_F + "qwen3_vl_moe:Qwen3VLMoeAdapter", gate=gates.SOFTMAX_TOPK_RENORMALISED,
                           notes="text model of the vision-language checkpoint"),
    "glm4v_moe": Family(_F + "glm4v_moe:Glm4vMoeAdapter", gate=gates.DEEPSEEK_V3,
                        notes="text model of the vision-language checkpoint"),
    "aria": Family(_F + "aria:AriaAdapter", gate=gates.TOPK_THEN_SOFTMAX,
                   notes="shared experts added; text model of the vision-language checkpoint"),
    # issue 29 (group B): sparse attention picked by an indexer (DSA) beside the router
    "deepseek_v32": _deepseek_v3_like("deepseek_v32:DeepseekV32Adapter", mixers="MLA + DSA indexer"),
    "glm_moe_dsa": _deepseek_v3_like("glm_moe_dsa:GlmMoeDsaAdapter", mixers="MLA + DSA indexer (shared top-k)"),
    "axk2": Family(_F + "axk2:AXK2Adapter", mixers="MLA + DSA indexer", gate=gates.DEEPSEEK_V3,
                   notes="groups only where n_group is set (A.X-K2-Light: none)"),
    # issue 29 (group C): routers with output layouts of their own (MoEAdapter.route_of / router_output)
    "llama4": Family(_F + "llama4:Llama4Adapter", gate=gates.LLAMA4,
                     notes="each chosen score scales its expert's input; plus a shared expert; text model"),
    "llama4_text": Family(_F + "llama4:Llama4Adapter", gate=gates.LLAMA4,
                          notes="each chosen score scales its expert's input; plus a shared expert"),
    "longcat_flash": Family(_F + "longcat_flash:LongcatFlashAdapter", gate=gates.LONGCAT_FLASH,
                            notes="zero_expert_num identity experts among the choices (each returns its weight x "
                                  "the input): the count of computing experts varies per token"),
    "jetmoe": Family(_F + "jetmoe:JetMoeAdapter", gate=gates.TOPK_THEN_SOFTMAX,
                     notes="a block bias; attention is a mixture of attention experts with a router of its own, "
                           "left to route as the model does"),
    # issue 29 (lead): a norm inside the MoE block over its output (Layout.block_output_norm)
    "axk1": Family(_F + "axk1:AXK1Adapter", gate=gates.DEEPSEEK_V3,
                   notes="the block normalises its output (post_mlp_layernorm over the experts' sum plus the shared "
                         "experts)"),
    # issue 29 (group e): OCR checkpoints whose language model is DeepSeek-V2's MoE, served through their text model
    "deepseek_ocr2": Family(_F + "deepseek_ocr2:DeepseekOcr2Adapter", gate=gates.DEEPSEEK_V2,
                            notes="shared experts added; text model of the OCR checkpoint"),
    "unlimited_ocr": Family(_F + "unlimited_ocr:UnlimitedOcrAdapter", gate=gates.DEEPSEEK_V2,
                            notes="shared experts added; text model of the OCR checkpoint; its reference "
                                  "sliding-window layers attend causally to a whole scored text"),
    # issue 29 (group f): served through a text tower (the thinker's of an omni model; a VL checkpoint's)
    "qwen3_omni_moe": Family(_F + "qwen3_omni_moe:Qwen3OmniMoeAdapter", gate=gates.SOFTMAX_TOPK,
                             notes="the thinker's text model of the thinker-talker checkpoint (the talker's routers "
                                   "not scored)"),
    "step3p7": Family(_F + "step3p7:Step3p7Adapter", gate=gates.LAGUNA,
                      notes="the block scales the experts' sum by moe_router_scaling_factor; plus a shared expert; "
                            "text model of the vision-language checkpoint"),
    # issue 29 (group H)
    "dbrx": Family(_F + "dbrx:DbrxAdapter", gate=gates.DBRX,
                   notes="the model's softmax runs in the logits' dtype; its block's top-k step moved into the router"),
    "minimax_m3_vl": Family(_F + "minimax_m3_vl:MiniMaxM3VLAdapter", mixers="attention + block-sparse indexer attention",
                            gate=gates.LAGUNA, notes="the block scales the experts' sum by routed_scaling_factor; plus a "
                                                     "shared expert; text model of the vision-language checkpoint"),
    "minimax_m3_vl_text": Family(_F + "minimax_m3_vl:MiniMaxM3VLTextAdapter",
                                 mixers="attention + block-sparse indexer attention", gate=gates.LAGUNA,
                                 notes="the block scales the experts' sum by routed_scaling_factor; plus a shared expert"),
    # issue 29 (group g)
    "mistral4": Family(_F + "mistral4:Mistral4Adapter", gate=gates.MISTRAL4,
                       notes="the softmax runs in the logits' dtype (bf16 in a bf16 model); shared experts added"),
    "mistral3": Family(_F + "mistral4:Mistral3Adapter", gate=gates.MISTRAL4,
                       notes="the softmax runs in the logits' dtype (bf16 in a bf16 model); shared experts added; the "
                             "Mistral 4 text model of the vision-language checkpoint"),
    "mistral_large4": Family(_F + "mistral_large4:MistralLarge4Adapter", mixers="MLA + DSA indexer (shared top-k)",
                             gate=gates.MISTRAL_LARGE4,
                             notes="shared experts added; logits soft-capped; text model of the vision-language "
                                   "checkpoint"),
}

ADAPTERS: dict[str, str] = {model_type: entry.adapter for model_type, entry in FAMILIES.items()}
SUPPORTED = tuple(FAMILIES)   # the families routelens ships (registered ones come on top)
ENTRY_POINT_GROUP = "routelens.families"


def register_family(model_type: str, adapter, gating_rule: str | None = None, mixers: str = "attention", *,
                    replace: bool = False) -> Family:
    """Serve the Hugging Face `model_type` with `adapter` (an `MoEAdapter` subclass, or
    "module:Class"), defined outside routelens. `gating_rule`: the rule in one line, as
    `routelens models` shows it; without one it is generated from the adapter's `gate`
    (a gate that is code needs the line). `mixers`: what mixes positions in its layers.
    A model type routelens already serves is refused unless `replace`.

    Examples:
        >>> import routelens as rl
        >>> from routelens.models.families.softmax_topk import SoftmaxTopKAdapter
        >>> class MyAdapter(SoftmaxTopKAdapter):
        ...     pass
        >>> rl.register_family("my_olmoe_variant", MyAdapter, "fp32 softmax over all experts, top-k").adapter_name
        'MyAdapter'
        >>> rl.register_family("my_other_variant", MyAdapter).gating_rule
        'fp32 softmax over all experts; top-k; weights = the chosen probabilities / their sum if norm_topk_prob'
    """
    if not isinstance(model_type, str) or not model_type.strip():
        raise RouteLensError(f"model_type must be a non-empty string (a config's model_type), got {model_type!r}")
    adapter_type = _adapter_type(adapter, load=gating_rule is None)
    if gating_rule is None:
        if adapter_type.gate is None:
            raise RouteLensError(f"{adapter_type.__name__}'s gate is code: pass its gating_rule in one line of text")
        return _register(model_type, Family(adapter, mixers=mixers, gate=adapter_type.gate), replace)
    if not isinstance(gating_rule, str) or not gating_rule.strip() or "\n" in gating_rule:
        raise RouteLensError("gating_rule must be the gating rule in one line of text")
    return _register(model_type, Family(adapter, gating_rule, mixers), replace)


def _adapter_type(adapter, load: bool) -> type[MoEAdapter] | None:
    """The adapter class a registration names, checked; a "module:Class" string is imported
    only if `load` (otherwise on first use), and None is returned for it."""
    from routelens.models.adapter import MoEAdapter

    if isinstance(adapter, str):
        if adapter.count(":") != 1:
            raise RouteLensError(f"adapter {adapter!r} must be a class or 'module:Class'")
        if not load:
            return None
        module_name, class_name = adapter.split(":")
        adapter = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(adapter, type) and issubclass(adapter, MoEAdapter)):
        raise RouteLensError(f"adapter must be a subclass of routelens.models.adapter.MoEAdapter, got {adapter!r}")
    return adapter


def _register(model_type: str, entry: Family, replace: bool) -> Family:
    if model_type in FAMILIES and not replace:
        raise RouteLensError(f"model type {model_type!r} is already served by {FAMILIES[model_type].adapter_name}; "
                             "pass replace=True to serve it with another adapter")
    FAMILIES[model_type] = entry
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
            _adapter_type(declared.adapter, load=False)
            return _register(model_type, declared, replace=False)
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
    """Wrap a loaded Hugging Face model in its family's adapter (a multimodal checkpoint's text
    tower by the checkpoint's model type, `tower_of`)."""
    return adapter_class(getattr(model, "tower_of", None) or model.config.model_type)(model)


def markdown_table() -> str:
    """The table of served families in docs/families.md (between its `families:begin` and
    `families:end` markers; `scripts/families_doc.py` writes it, a quick test checks it)."""
    rows = ["| model type | adapter | layers | gating rule |", "| --- | --- | --- | --- |"]
    rows += [f"| `{model_type}` | `{entry.adapter_name}` | {entry.mixers} | {entry.gating_rule} |"
             for model_type, entry in FAMILIES.items()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m routelens.models.registry --markdown")
    print(markdown_table(), end="")
