"""Vision-language checkpoints whose language model is a routed MoE, served through their text
model ("the text tower"), with image tokens absent.

A multimodal checkpoint's config.json names the composite model type (`qwen3_vl_moe`, ...);
its conditional-generation class holds a vision encoder, the text model (decoder layers,
final norm, embeddings) and the LM head, in places its family's `Tower` names. `text_tower`
builds the full model as transformers does, then wraps the text model and the LM head in a
causal LM (`TextTower`) that the engines read like any other: `model.model` is the text
model, `model.lm_head` the head, `model.config` the text config. Nothing is copied: the
tower's modules are the full model's, so its logits on a text-only input are the full
model's (tests/models/test_vision_language_families.py checks it per served type), and
`save_pretrained` writes the whole checkpoint again (a graft included).

Trajectories are text only: an input holding a token id that stands for an image or a
video (the config's `image_token_id`, `video_token_id`, ...) is refused, since no image is
given and the placeholder's embedding would be scored as if it were text. A placeholder is
named by its attribute path in the checkpoint's config (nested in a sub-config where the
checkpoint keeps it there: Qwen3-Omni's `thinker_config.audio_token_id`).
"""

from __future__ import annotations

from operator import attrgetter

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from routelens.errors import RouteLensError
from routelens.models.spec import Tower


class TextTower(PreTrainedModel, GenerationMixin):
    """The text model and LM head of a multimodal checkpoint as a causal LM (`text_tower`
    makes one; a subclass per conditional-generation class carries its name)."""

    base_model_prefix = "model"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_set_attn_implementation_cached_value = True
    _can_set_experts_implementation_cached_value = True

    def __init__(self, full_model: PreTrainedModel, model_type: str, tower: Tower):
        text_model, lm_head = attrgetter(tower.text_model)(full_model), attrgetter(tower.lm_head)(full_model)
        super().__init__(text_model.config)
        self.model = text_model
        self.lm_head = lm_head
        self.all_tied_weights_keys = {}
        object.__setattr__(self, "full_model", full_model)   # not a submodule: its vision encoder is not the tower's
        self.tower_of = model_type
        # the cap the full model's forward puts on its logits (None: none)
        self.logit_softcapping = getattr(text_model.config, tower.logit_softcapping) if tower.logit_softcapping else None
        self.placeholders = {name: value for name in tower.placeholders
                             if isinstance(value := _config_value(full_model.config, name), int)}
        self.tower_notice = (f"the text model of a {model_type} checkpoint ({type(full_model).__name__}: "
                             f"{tower.text_model} and {tower.lm_head}); image tokens absent: trajectories are text only")
        text_model.register_forward_pre_hook(self._refuse_placeholders, with_kwargs=True)

    def _refuse_placeholders(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or not self.placeholders:
            return None
        ids = torch.tensor(list(self.placeholders.values()), device=input_ids.device)
        found = torch.isin(input_ids, ids)
        if bool(found.any()):
            value = int(input_ids[found][0])
            name = next(name for name, token in self.placeholders.items() if token == value)
            raise RouteLensError(f"the input holds token {value} ({name}), an image/video placeholder of this "
                                 f"{self.tower_of} checkpoint; routelens serves its text model with image tokens absent "
                                 "(text-only trajectories)")
        return None

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.lm_head

    def save_pretrained(self, *args, **kwargs):
        """Writes the whole multimodal checkpoint (the tower shares its modules with it)."""
        return self.full_model.save_pretrained(*args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             **kwargs)
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        if self.logit_softcapping:
            logits = torch.tanh(logits / self.logit_softcapping) * self.logit_softcapping
        return CausalLMOutputWithPast(logits=logits,
                                      past_key_values=getattr(outputs, "past_key_values", None),
                                      hidden_states=getattr(outputs, "hidden_states", None),
                                      attentions=getattr(outputs, "attentions", None))


def _config_value(config, path: str):
    """The value at a dotted attribute path of a config ("thinker_config.image_token_id"), or None."""
    for name in path.split("."):
        config = getattr(config, name, None)
    return config


def text_tower(full_model: PreTrainedModel, model_type: str, tower: Tower) -> TextTower:
    """The text tower of a loaded multimodal `full_model` whose registry type is `model_type`."""
    source = type(full_model)
    flags = {name: getattr(source, name) for name in ("_supports_sdpa", "_supports_flash_attn", "_supports_flex_attn",
                                                      "_supports_attention_backend") if hasattr(source, name)}
    cls = type(f"{source.__name__}TextTower", (TextTower,), {**flags, "__module__": __name__})
    return cls(full_model, model_type, tower).eval()


def auto_class(tower: Tower):
    """The transformers auto class that builds the full model of a tower's checkpoint."""
    import transformers

    return getattr(transformers, tower.auto_class)


def tower_from_config(config, model_type: str, tower: Tower, dtype: torch.dtype = torch.float32) -> TextTower:
    """A random-weight text tower of a composite `config` (tiny test models)."""
    return text_tower(auto_class(tower).from_config(config, dtype=dtype), model_type, tower)
