"""A family as data: its `Gate` (how a router turns logits into a route's weights) and its
`Layout` (where a decoder layer keeps the parts the engines read).

Plain frozen dataclasses, imported without torch: the registry generates each family's
gating rule text from its `Gate` (`Gate.describe`), so the text cannot drift from the
rule the adapter computes (`routelens.models.gating` computes it from the same `Gate`).
A family whose gate cannot be stated this way (PhiMoE's sparsemixer) has no `Gate` and
overrides `weights_for` in code instead.
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIVATIONS = ("softmax", "sigmoid", "topk_then_softmax")


@dataclass(frozen=True)
class Groups:
    """Group-limited choice (DeepSeek): the experts form `config.<count>` equal groups, and the
    router chooses only inside the `config.<keep>` groups of highest score; a group's score is
    the sum of its top-2 choice scores ("top2") or its largest one ("max"). `when`: a config
    setting (attribute, value) that turns groups on; None: always on."""

    score: str = "top2"
    count: str = "n_group"
    keep: str = "topk_group"
    when: tuple[str, str] | None = None

    def __post_init__(self):
        if self.score not in ("top2", "max"):
            raise ValueError(f"group score must be 'top2' or 'max', got {self.score!r}")

    def describe(self) -> str:
        score = "sum of its top-2 scores" if self.score == "top2" else "its largest score"
        when = f" if {self.when[0]} = {self.when[1]}" if self.when else ""
        return f"within the top {self.keep} of {self.count} groups (a group's score: {score}){when}"


@dataclass(frozen=True)
class Gate:
    """How a router weights the experts it chose, as data.

    - `activation`: "softmax" (fp32 softmax over all experts), "sigmoid" (per-expert
      sigmoid affinities), or "topk_then_softmax" (top-k on the raw logits, softmax over the k).
    - `choice_bias`: a bias added to the scores for *choosing* only (never to the weights):
      "router.<attribute path>" or "block.<attribute path>" (the block passes it into its
      router); None: no bias.
    - `groups`: group-limited choice, or None.
    - `normalise`: divide the chosen weights by their sum: True, False, or the name of a
      config flag (e.g. "norm_topk_prob") that says whether.
    - `epsilon`: added to that sum (1e-20, 1e-6; 0: none); `norm_floor`: a config attribute
      the sum is clamped up to (ERNIE's moe_norm_min), or None.
    - `norm_p`: divide by the weights' p-norm instead of their sum, p read from this config
      attribute (a dotted path into a sub-config: DBRX's "ffn_config.moe_normalize_expert_weights";
      a p of None there: no division), or None.
    - `scale`: a config attribute the weights are multiplied by (e.g. "routed_scaling_factor"), or None.

    Examples:
        >>> Gate("softmax", normalise="norm_topk_prob").describe()
        'fp32 softmax over all experts; top-k; weights = the chosen probabilities / their sum if norm_topk_prob'
        >>> gate = Gate("sigmoid", choice_bias="block.expert_bias", normalise=True, epsilon=1e-6, scale="route_scale")
        >>> for part in gate.describe().split("; "):
        ...     print(part)
        sigmoid affinities
        top-k of affinity + the block's expert_bias
        weights = the chosen affinities / (their sum + 1e-6), x route_scale
    """

    activation: str = "softmax"
    choice_bias: str | None = None
    groups: Groups | None = None
    normalise: bool | str = False
    epsilon: float = 0.0
    norm_floor: str | None = None
    scale: str | None = None
    norm_p: str | None = None

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.choice_bias is not None and self.choice_bias.partition(".")[0] not in ("router", "block"):
            raise ValueError(f"choice_bias must be 'router.<attribute>' or 'block.<attribute>', got {self.choice_bias!r}")

    @property
    def bias_owner(self) -> str | None:
        """"router" or "block": which module holds the choice bias (None: no bias)."""
        return self.choice_bias.partition(".")[0] if self.choice_bias else None

    @property
    def bias_path(self) -> list[str]:
        """The attribute path of the choice bias inside its owner."""
        return self.choice_bias.partition(".")[2].split(".") if self.choice_bias else []

    def describe(self) -> str:
        """The gating rule in one line (what `routelens models` shows)."""
        if self.activation == "topk_then_softmax":
            return "top-k on raw logits, then softmax over the k chosen logits" + self._scaled()
        scores, one, many = (("fp32 softmax over all experts", "probability", "probabilities")
                             if self.activation == "softmax" else ("sigmoid affinities", "affinity", "affinities"))
        choice = "top-k"
        if self.choice_bias:
            choice += f" of {one} + the {self.bias_owner}'s {'.'.join(self.bias_path)}"
        if self.groups:
            choice += " " + self.groups.describe()
        weights = f"weights = the chosen {many}"
        if self.normalise is False:
            weights += " (not renormalised)"
        else:
            total = f"their p-norm (p = {self.norm_p}; none if p is None)" if self.norm_p else "their sum"
            if self.norm_floor:
                total = f"max({total}, {self.norm_floor})"
            if self.epsilon:
                total = f"({total} + {str(self.epsilon).replace('e-0', 'e-')})"
            weights += f" / {total}" + (f" if {self.normalise}" if isinstance(self.normalise, str) else "")
        return f"{scores}; {choice}; {weights}" + self._scaled()

    def _scaled(self) -> str:
        return f", x {self.scale}" if self.scale else ""


@dataclass(frozen=True)
class Layout:
    """Where a family keeps what the engines read, by attribute name.

    - `moe_block`: the decoder layer's routed MoE block; `mlp_input`: the module whose input
      is the residual entering the MLP sub-block (its norm), or None where the MoE block
      reads the residual itself (post-norm: FlexOlmo; MiniMax); `mlp_output_norm`: a norm of
      the MLP output before the residual add (sandwich norms, post-norm), or None;
      `parallel_mlp`: a dense MLP beside the block whose output joins it (Granite's
      shared_mlp; absent layers have none), or None; `final_norm`: the base model's final norm.
    - `block_output_norm`: a per-token norm the MoE block applies to its own combined output
      (routed experts plus shared ones) before returning it (A.X-K1's post_mlp_layernorm), by
      its name inside the block, or None. The engines take the block's output before it, do
      the route algebra there, and apply the norm after.
    - `windows`: where attention windows come from: "config" (`config.layer_types` marks
      sliding layers, else `config.sliding_window` applies to every layer, as the families'
      mask builders do) or "none" (the family always builds a plain causal mask).
    - `norm_order`: "pre": the MLP sub-block adds its output to the residual it read, which
      the fast engine needs; any other order is refused by the fast engine.

    Examples:
        >>> Layout(moe_block="feed_forward", final_norm="final_layernorm").mlp_input
        'post_attention_layernorm'
    """

    moe_block: str = "mlp"
    mlp_input: str | None = "post_attention_layernorm"
    mlp_output_norm: str | None = None
    parallel_mlp: str | None = None
    final_norm: str = "norm"
    block_output_norm: str | None = None
    windows: str = "config"
    norm_order: str = "pre"

    def __post_init__(self):
        if self.windows not in ("config", "none"):
            raise ValueError(f"windows must be 'config' or 'none', got {self.windows!r}")


@dataclass(frozen=True)
class Tower:
    """Where a multimodal checkpoint (a conditional-generation class around a vision encoder
    and a decoder LM) keeps its text model: the checkpoint is served as that decoder LM alone,
    with image tokens absent (routelens scores text-only trajectories).

    - `auto_class`: the transformers auto class that builds the checkpoint's full model.
    - `text_model`: the attribute path of the text model (decoder layers, final norm,
      embeddings) in the full model; `lm_head`: the path of the LM head.
    - `placeholders`: attributes of the checkpoint's config that hold the token ids standing
      for an image or a video (an audio clip, ...); an input that carries one is refused (no
      image is given). A dotted path reaches into a sub-config ("thinker_config.image_token_id").
    - `logit_softcapping`: an attribute of the text config by which the full model's forward
      soft-caps its logits (tanh(logits / cap) x cap; Mistral Large 4), or None: no cap.

    Examples:
        >>> Tower().text_model, Tower().lm_head
        ('model.language_model', 'lm_head')
    """

    auto_class: str = "AutoModelForImageTextToText"
    text_model: str = "model.language_model"
    lm_head: str = "lm_head"
    placeholders: tuple[str, ...] = ("image_token_id", "video_token_id")
    logit_softcapping: str | None = None
