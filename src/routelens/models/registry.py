"""Registry of supported MoE families: `model_type` -> adapter class ("module:Class").

Lazy strings keep `routelens models` fast and let a new family be one file plus a line.
"""

from __future__ import annotations

import importlib

from routelens.errors import RouteLensError
from routelens.models.adapter import MoEAdapter

ADAPTERS: dict[str, str] = {
    "olmoe": "routelens.models.families.olmoe:OlmoeAdapter",
    "qwen3_moe": "routelens.models.families.qwen3_moe:Qwen3MoeAdapter",
    "qwen2_moe": "routelens.models.families.qwen2_moe:Qwen2MoeAdapter",
    "mixtral": "routelens.models.families.mixtral:MixtralAdapter",
    "deepseek_v2": "routelens.models.families.deepseek_v2:DeepseekV2Adapter",
    "deepseek_v3": "routelens.models.families.deepseek_v3:DeepseekV3Adapter",
    "gpt_oss": "routelens.models.families.gpt_oss:GptOssAdapter",
    "phimoe": "routelens.models.families.phimoe:PhimoeAdapter",
    "glm4_moe": "routelens.models.families.glm4_moe:Glm4MoeAdapter",
    "exaone_moe": "routelens.models.families.exaone_moe:ExaoneMoeAdapter",
    "granitemoe": "routelens.models.families.granitemoe:GraniteMoeAdapter",
    "granitemoeshared": "routelens.models.families.granitemoe:GraniteMoeAdapter",
    "granitemoe_swa": "routelens.models.families.granitemoe:GraniteMoeSwaAdapter",
    "minimax_m2": "routelens.models.families.minimax_m2:MiniMaxM2Adapter",
    "ernie4_5_moe": "routelens.models.families.ernie4_5_moe:Ernie45MoeAdapter",
    "dots1": "routelens.models.families.dots1:Dots1Adapter",
    "glm4_moe_lite": "routelens.models.families.glm4_moe_lite:Glm4MoeLiteAdapter",
    "afmoe": "routelens.models.families.afmoe:AfmoeAdapter",
    "flex_olmo": "routelens.models.families.flex_olmo:FlexOlmoAdapter",
    "mellum": "routelens.models.families.mellum:MellumAdapter",
    "mimo_v2_flash": "routelens.models.families.mimo_v2_flash:MimoV2FlashAdapter",
    "solar_open": "routelens.models.families.solar_open:SolarOpenAdapter",
    "hunyuan_v1_moe": "routelens.models.families.hunyuan_v1_moe:HunYuanMoEV1Adapter",
    "beam": "routelens.models.families.beam:BeamAdapter",
    # hybrids (recurrent layers: the cache engine serves what the fast engine cannot patch)
    "qwen3_next": "routelens.models.families.qwen3_next:Qwen3NextAdapter",
    "qwen3_5_moe": "routelens.models.families.qwen3_5_moe:Qwen35MoeAdapter",
    "qwen3_5_moe_text": "routelens.models.families.qwen3_5_moe:Qwen35MoeAdapter",
    "kimi_linear": "routelens.models.families.kimi_linear:KimiLinearAdapter",
    "minimax": "routelens.models.families.minimax:MiniMaxAdapter",
    "jamba": "routelens.models.families.jamba:JambaAdapter",
    "lfm2_moe": "routelens.models.families.lfm2_moe:Lfm2MoeAdapter",
    "granitemoehybrid": "routelens.models.families.granitemoehybrid:GraniteMoeHybridAdapter",
    "nemotron_h": "routelens.models.families.nemotron_h:NemotronHAdapter",
    "bailing_hybrid": "routelens.models.families.bailing_hybrid:BailingHybridAdapter",
}

SUPPORTED = tuple(ADAPTERS)


def adapter_class(model_type: str) -> type[MoEAdapter]:
    """The adapter class for a Hugging Face `config.model_type`."""
    if model_type not in ADAPTERS:
        raise RouteLensError(
            f"unsupported architecture {model_type!r}; supported model types: {', '.join(SUPPORTED)}"
        )
    module_name, class_name = ADAPTERS[model_type].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def adapter_for(model) -> MoEAdapter:
    """Wrap a loaded Hugging Face model in its family's adapter."""
    return adapter_class(model.config.model_type)(model)
