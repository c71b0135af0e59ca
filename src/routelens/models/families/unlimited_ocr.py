"""Unlimited-OCR (unlimited_ocr), served through its text model (`vision_language`): a
DeepSeek-V2 MoE decoder (fp32 softmax router, greedy or group-limited greedy choice, the
chosen probabilities not renormalised, times routed_scaling_factor; shared experts added
outside the route; dense layers where config.mlp_layer_types says "dense") with plain
multi-head attention and reference sliding-window attention (R-SWA) on every layer its
config.layer_types marks "reference_sliding_attention".

R-SWA lets a token see every "reference" (prefill) token plus the last config.sliding_window
tokens decoded after them: the reference is what the model's own cache holds from its
first forward (or what `set_prefill_length` declares). A forward of a whole text, the
model's own and the reference and fast engines' alike, has every token in its reference, so
its mask is plain causal: the window never applies, and routelens declares these layers
full causal attention (`layer_kind`, `Layout(windows="none")`; the fast engine checks that
mask on every checkpoint). The cache engine, which fills a cache with a prefix and then
decodes token by token, declares the whole text as the reference on the model's own R-SWA
cache layers (`new_cache`), so its decoding is that same full forward, exactly; with the
cache as the model builds it, tokens decoded more than sliding_window past the prefix
would lose sight of the ones between (what Unlimited-OCR's generate does after an image
prompt), a different computation than the forward scored. The image placeholder
(config.image_token_id) is refused: trajectories are text only."""

from __future__ import annotations

import sys

from routelens.models.families.deepseek_v2 import DeepseekV2Adapter
from routelens.models.spec import Layout, Tower

#: config.layer_types' name of R-SWA layers (and the `_layer_type` of the model's cache layers for them)
REFERENCE_SLIDING = "reference_sliding_attention"


class UnlimitedOcrAdapter(DeepseekV2Adapter):
    layout = Layout(windows="none")   # R-SWA over a whole text (all of it reference) is plain causal
    # UnlimitedOcrForConditionalGeneration (AutoModelForImageTextToText): model.language_model, lm_head
    tower = Tower(placeholders=("image_token_id",))

    def layer_kind(self, layer: int) -> str:
        """"full_attention" for an R-SWA layer: in every forward routelens runs, every key is a
        reference key (see the module docstring), so the layer is full causal softmax attention."""
        kind = super().layer_kind(layer)
        return "full_attention" if kind == REFERENCE_SLIDING else kind

    def new_cache(self):
        """The model's own cache, its R-SWA layers told that the whole text is their reference
        (the prefill `set_prefill_length` declares, as Unlimited-OCR's generate does for a
        chunked prefill): a prefix forward and token-by-token decoding then compute the full
        forward's causal attention, not a window over the decoded tokens."""
        cache = super().new_cache()
        for layer in cache.layers:
            if getattr(layer, "_layer_type", None) == REFERENCE_SLIDING:
                layer.set_prefill_length(sys.maxsize)
        return cache

    def describe(self) -> dict:
        described = super().describe()
        window = getattr(self.config, "sliding_window", None)
        layers = [i for i, kind in enumerate(self.config.layer_types or []) if kind == REFERENCE_SLIDING]
        if layers:
            described["reference_sliding_window"] = (
                f"layers {layers}: reference sliding-window attention (window {window} over tokens decoded after a "
                "prefill); a scored text is all reference, so they attend causally to every earlier token, as the "
                f"model's forward of that text does; its generate lets a token more than {window} past the prompt see "
                f"only the last {window} decoded ones, so a completion longer than that was generated under other "
                "attention than the one scored")
        return described
