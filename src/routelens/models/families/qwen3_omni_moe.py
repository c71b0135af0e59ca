"""Qwen3-Omni-MoE (thinker-talker), served through the thinker's text model (`vision_language`).

A checkpoint is a thinker-talker-code2wav model (Qwen3OmniMoeForConditionalGeneration, built
by AutoModelForMultimodalLM): the thinker (audio encoder, vision encoder, a Qwen3-MoE decoder
and its LM head) writes the text; the talker (a MoE decoder of its own, with a sigmoid-gated
shared expert) and code2wav turn the thinker's hidden states into speech. routelens scores
the text the thinker writes: the tower is `thinker.model.language_model` with `thinker.lm_head`,
whose router is Qwen3-MoE's (fp32 softmax over all experts, top-k, renormalised if
norm_topk_prob, which the released checkpoints set). MRoPE on text alone (the position
components equal) is the plain rotary embedding; DeepStack adds visual features only where
image tokens are, and there are none; no sliding windows: the thinker's attention sets none
and its mask is plainly causal whatever config.sliding_window says (so the cache is built
without it: DynamicCache(config) would keep only a window of keys and decode to other numbers
than the full forward).

Not scored: the talker's routers (speech generation, run by `generate` after the text, never
in the thinker's forward): a forced route of the thinker changes the text the talker would
speak, but no talker route is observed, forced or audited. With enable_audio_output the full
model still holds the talker and code2wav (they are the checkpoint's; `save_pretrained`
writes them back). Audio, image and video placeholders (the thinker config's audio_token_id,
image_token_id, video_token_id) are refused: trajectories are text only.
"""

import copy

from transformers import DynamicCache

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import SOFTMAX_TOPK
from routelens.models.spec import Layout, Tower


class Qwen3OmniMoeAdapter(MoEAdapter):
    gate = SOFTMAX_TOPK
    layout = Layout(windows="none")
    tower = Tower(auto_class="AutoModelForMultimodalLM", text_model="thinker.model.language_model",
                  lm_head="thinker.lm_head",
                  placeholders=("thinker_config.audio_token_id", "thinker_config.image_token_id",
                                "thinker_config.video_token_id"))

    def new_cache(self):
        """The model's cache with every layer full (see the module docstring: a sliding_window in
        the config is one the thinker's attention never applies)."""
        config = self.config
        if getattr(config, "sliding_window", None):
            config = copy.copy(config)
            config.sliding_window = None
        return DynamicCache(config=config)
