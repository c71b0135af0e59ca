"""What the router of a model type returns, found by running it (issue 34).

`probe_router(model_type)` builds a tiny random-weight model of the type from its own config
class (every size knob the class takes shrunk: a few layers chosen so that each kind of
layer its per-layer lists name is kept, hidden size 32, 4 heads, 16 experts, top-2 or the
type's own top-1, a 64-token vocabulary), instantiates its causal-LM class (else its base
model) in float32 on the CPU, hooks its router modules, runs one forward on a [3, 7] batch
of random token ids and describes what each router returned: its class, the number of
outputs, each output's shape and dtype, what it was called with besides the hidden states,
and a verdict. Shapes are written in symbols: N = 21 flattened tokens (b * S + s), B = 3,
S = 7, E the routed experts (E+1: one more), k the top-k, H the hidden size; any other size
as its number.

A router is standard when it returns `(logits [N, E], weights [N, k], indices [N, k])`
(float, float, integer), the layout `routelens.models.routing` hooks; the verdict says the
order if the same three come in another one. The routers are the classes the model records
as `router_logits` (`_can_record_outputs`, as `MoEAdapter` finds them) or the `gate` /
`router` child of a recorded MoE block, and modules whose class name ends in Router, Gate
or Gating (a hash router the recorder does not name); else the `gate` / `router` child of a
module that holds `experts`. A model that cannot be built or run is the finding too, in one
line. The whole probe of a type takes about a second on two cores.

`scripts/moe_families.py` writes the probe's finding into docs/moe-families.md, so the page
says what the code returns, not what someone remembered.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import time
from dataclasses import dataclass

import torch
from torch import nn

BATCH, SEQUENCE = 3, 7             # N = 21 flattened tokens; sizes that no other dimension takes
HIDDEN = 32
EXPERTS, TOP_K = 16, 2             # 16: a square (Doge's product keys) that 4 groups divide
LAYERS_MIN, LAYERS_MAX = 2, 6
VOCAB = 64
MAX_PARAMETERS = 5_000_000         # a knob left large (a vocabulary, a width) is refused, not built
STANDARD = "standard (logits [N, E], weights [N, k], indices [N, k])"
NO_ROUTER = "no router module ran in a tiny model's forward"

# the knobs that size a model, by name: (pattern, tiny value); the first pattern that matches
# a config's __init__ parameter wins, and a default only ever shrinks (never grows)
_SIZES: tuple[tuple[str, int], ...] = (
    (r"vocab_size", VOCAB),                               # also per-layer-input and n-gram vocabularies
    (r"^(hidden_size|d_model|n_embd)$", HIDDEN),
    (r"^(out_hidden_size|vision_output_dim|projector_input_dim|projector_output_dim|adapter_in_dim|adapter_out_dim"
     r"|adapter_input_size|conv_output_size|downsample_hidden_size|ple_embed_dim)$", HIDDEN),
    (r"hidden_size_per_layer_input|router_hidden_size|hc_lowrank|gated_norm_rank", 8),
    (r"intermediate_size|ffn_hidden_size|^expert_dim$", 32),
    (r"^(num_key_value_heads|kv_n_heads|num_kv_heads)$", 2),   # 4 where the default has as many as query heads
    (r"^index_n_heads$|^heads_per_ngram$", 2),
    (r"heads$", 4),                                       # query, linear-attention and Mamba heads
    (r"head_dim$|^kv_channels$", 8),
    (r"lora_rank$", 16),
    (r"^index_topk$", 4),
    (r"^(n_groups|mamba_n_groups)$", 1),                 # Mamba groups: they must divide the (shrunk) heads
    (r"^zero_expert_num$", 2),
    (r"^(depth|encoder_layers|decoder_layers)$", 1),      # vision / audio towers: one block
    (r"^split_ngram_parts$|^make_ngram_vocab_size_divisible_by$", 8),
)
_LAYER_COUNTS = ("num_hidden_layers", "n_layers", "num_layers")
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_KS = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "moe_top_k", "top_k_experts")
_GROUPS = ("n_group", "num_expert_group")
_DENSE_FIRST = ("first_k_dense_replace", "num_dense_layers")
_MOE_SWITCHES = ("is_moe", "enable_moe_block")           # a type whose default config has no MoE layer
_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_ROUTER_CHILDREN = ("gate", "router", "router_gate")
# what real checkpoints' config.json set and the type's default config lacks (it cannot build without them)
_CHECKPOINT_SETTINGS: dict[str, dict] = {
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    "qwen4_exp": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4, indexer_compress_ratio=2),
}
_ROUTER_NAME = re.compile(r"(Router|Gate|Gating)$")
_NOT_ROUTER = re.compile(r"(Forget|Residual)Gate$")       # recurrent and residual gates route nothing


@dataclass(frozen=True)
class RouterOutputs:
    """What the modules of one router class returned in the forward.

    `outputs`: (shape in symbols, dtype) per returned value (a non-tensor: its type name and
    ""); `order`: the roles (logits / weights / indices) of the standard three in the order
    returned, empty when the output is not those three; `extra_inputs`: what the router is
    called with besides the hidden states."""

    router: str                                   # class name (a Linear child: "Block.child (Linear)")
    modules: int                                  # how many modules of it ran
    outputs: tuple[tuple[str, str], ...]
    verdict: str
    order: tuple[str, ...] = ()
    extra_inputs: tuple[str, ...] = ()

    @property
    def standard(self) -> bool:
        """The standard (logits, weights, indices), in that order: what routelens hooks."""
        return self.order == ("logits", "weights", "indices")


@dataclass(frozen=True)
class RouterProbe:
    """The probe of one model type: the class it built, its routers' outputs, or why it could
    not build or run one (`error`, one line). `layer_kinds`: the tiny config's distinct
    `layer_types`; `switched_on`: MoE switches (`is_moe`, `enable_moe_block`) that are off in
    the type's default config and that the probe turned on."""

    model_type: str
    model_class: str = ""
    routers: tuple[RouterOutputs, ...] = ()
    error: str = ""
    seconds: float = 0.0
    layer_kinds: tuple[str, ...] = ()
    switched_on: tuple[str, ...] = ()

    @property
    def router(self) -> str:
        """The router class names, comma-separated."""
        return ", ".join(r.router for r in self.routers)

    @property
    def outputs(self) -> tuple[tuple[str, str], ...]:
        """(shape, dtype) of each output of the first router."""
        return self.routers[0].outputs if self.routers else ()

    @property
    def standard(self) -> bool:
        """Every router returns the standard (logits, weights, indices) in that order."""
        return bool(self.routers) and all(r.standard for r in self.routers)

    @property
    def verdict(self) -> str:
        """What the routers returned, in one line (or the error)."""
        if self.error:
            return self.error
        if not self.routers:
            return NO_ROUTER
        return "; ".join(r.verdict if len(self.routers) == 1 else f"`{r.router}`: {r.verdict}" for r in self.routers)


def probe_router(model_type: str, seed: int = 0) -> RouterProbe:
    """Build a tiny `model_type` model, run one forward and describe what its routers
    returned; a model that cannot be built or run gives the exception in one line as `error`.

    Examples:
        >>> from routelens.models.router_probe import probe_router
        >>> probe = probe_router("qwen3_moe")
        >>> probe.router, probe.standard, probe.outputs[2]
        ('Qwen3MoeTopKRouter', True, ('[N, k]', 'int64'))
        >>> probe.verdict
        'standard (logits [N, E], weights [N, k], indices [N, k])'
        >>> probe_router("llama4").verdict
        '2 outputs: float [N, E] per-expert scores (zero outside the top k), float [N, E] per-expert scores'
    """
    started = time.perf_counter()
    with _quiet():
        try:
            config, model_class = tiny_config(model_type)
            found = {"layer_kinds": _layer_kinds(config), "switched_on": _switched_on(model_type)}
            model = _build(model_class, config, seed)
        except Exception as error:   # noqa: BLE001 - any failure is the finding
            return RouterProbe(model_type, error=f"could not build a tiny model: {_one_line(error)}",
                               seconds=time.perf_counter() - started)
        try:
            routers = _run(model, config, seed)
        except Exception as error:   # noqa: BLE001
            return RouterProbe(model_type, model_class.__name__, error=f"could not run a tiny model: {_one_line(error)}",
                               seconds=time.perf_counter() - started, **found)
    return RouterProbe(model_type, model_class.__name__, routers, seconds=time.perf_counter() - started, **found)


def model_class_for(model_type: str) -> type[nn.Module]:
    """The causal-LM class of a model type, else its base model class."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) or MODEL_MAPPING_NAMES.get(model_type)
    if name is None:
        raise ValueError(f"transformers has no causal-LM or base model class for {model_type!r}")
    return getattr(transformers, name)


def tiny_config(model_type: str):
    """The tiny config of `model_type` and the class to build from it: the type's default
    config with every size knob its class takes shrunk; a composite config (text + vision)
    is shrunk in each part, or replaced by its text part where the model class takes that."""
    from transformers import AutoConfig

    model_class = model_class_for(model_type)
    default = AutoConfig.for_model(model_type)
    config_class = getattr(model_class, "config_class", None) or type(default)
    if not isinstance(default, config_class):   # a causal LM of the composite's text part (Llama 4)
        part = next((getattr(default, name) for name in (getattr(default, "sub_configs", None) or {})
                     if isinstance(getattr(default, name, None), config_class)), None)
        default = part if part is not None else config_class()
    return _shrunk(default, _CHECKPOINT_SETTINGS.get(model_type, {})), model_class


def _shrunk(config, settings: dict):
    """A new config of `config`'s class with its size knobs shrunk (sub-configs too), and
    `settings` on top (a dict for a sub-config's name)."""
    knobs = {name for name in inspect.signature(type(config).__init__).parameters if name not in ("self", "kwargs")}
    # read through to_dict: a heterogeneous config refuses to give a per-layer knob as one value
    values = {name: value for name, value in config.to_dict().items() if name in knobs or name == "per_layer_config"}
    overrides = _shrink(values)
    for name in knobs & set(_MOE_SWITCHES):   # and the expert width the switched-on block needs
        overrides[name] = True
        overrides.update({n: 32 for n in knobs if n.endswith("intermediate_size") and values.get(n) is None})
    overrides.update({name: EXPERTS for name in knobs & set(_EXPERT_COUNTS)})   # also where the default is None
    overrides.update({name: min(values.get(name) or TOP_K, TOP_K) for name in knobs & set(_TOP_KS)})
    if "head_dim" in knobs and values.get("head_dim", 0) is None:   # None: some models take hidden / heads, some fail
        overrides["head_dim"] = HIDDEN // overrides.get("num_attention_heads", values.get("num_attention_heads") or 4)
    for name in knobs & set(_GROUPS):   # group-limited routing: 4 groups of 4 experts, 2 of them admitted
        if (values.get(name) or 1) > 1:
            overrides.update({name: 4, **({"topk_group": 2} if "topk_group" in knobs else {})})
    for name in knobs & set(_DENSE_FIRST):
        if isinstance(values.get(name), int) and values[name] > 1:
            overrides[name] = 1
    for name, tiny in _TOKEN_IDS.items():
        if isinstance(values.get(name), int):
            overrides[name] = tiny
    overrides.update(_layers(values))
    for table in overrides.values():   # per-layer overrides, shrunk as the layer sees them (over the global values)
        if isinstance(table, dict) and table and all(isinstance(k, str) and k.isdigit() for k in table):
            for key, layer in table.items():
                shrunk = _shrink({**values, **layer})
                table[key] = {**layer, **{k: v for k, v in shrunk.items() if k in layer or v != overrides.get(k, values.get(k))}}
    for name in getattr(config, "sub_configs", None) or {}:
        part = getattr(config, name, None)
        if part is not None and hasattr(part, "to_dict") and name in knobs:
            overrides[name] = _shrunk(part, settings.get(name, {}))
    overrides.update({name: value for name, value in settings.items() if not isinstance(value, dict)})
    return type(config)(**overrides)


def _shrink(values: dict) -> dict:
    """The size knobs among `values` (name -> default), shrunk; heads stay as many as
    query heads where the default has them equal (MLA, multi-head attention)."""
    overrides = {}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        for pattern, tiny in _SIZES:
            if re.search(pattern, name):
                if value > tiny:
                    overrides[name] = tiny
                break
    heads = next((values[n] for n in ("num_attention_heads", "n_heads") if isinstance(values.get(n), int)), None)
    for name in ("num_key_value_heads", "kv_n_heads", "num_kv_heads"):
        if name in overrides and values[name] == heads:
            overrides[name] = overrides.get("num_attention_heads", overrides.get("n_heads", 4))
    parts = ("qk_nope_head_dim", "qk_rope_head_dim")
    if all(isinstance(values.get(n), int) for n in parts):
        for name in ("head_dim", "qk_head_dim"):   # MLA: a head that is the sum of its parts stays their sum
            if name in overrides and values[name] == sum(values[n] for n in parts):
                overrides[name] = sum(overrides.get(n, values[n]) for n in parts)
    return overrides


def _layers(values: dict) -> dict:
    """A few of the config's layers, chosen so that every kind of layer its per-layer lists
    name (attention kinds, dense / MoE, per-layer overrides) is kept, with those lists cut
    to them."""
    count_name = next((n for n in _LAYER_COUNTS if isinstance(values.get(n), int)), None)
    if count_name is None:
        return {}
    total = values[count_name]
    per_layer, indexed, overridden = {}, {}, {}
    for name, value in values.items():
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value) \
                and name.endswith("_layers") and list(value) == sorted(set(value)) and max(value) < total:
            indexed[name] = set(value)             # layer indices (mlp_only_layers, moe_layers)
        elif isinstance(value, (list, tuple)) and len(value) == total:
            per_layer[name] = list(value)          # one entry per layer (layer_types, mlp_layer_types)
        elif isinstance(value, dict) and value and all(isinstance(k, str) and k.isdigit() for k in value):
            overridden[name] = {int(k): v for k, v in value.items()}   # per_layer_config: "05" -> overrides
    kinds, chosen = set(), []
    for layer in range(total):
        kind = (tuple(repr(v[layer]) for v in per_layer.values()) + tuple(layer in v for v in indexed.values())
                + tuple(repr(table.get(layer)) for table in overridden.values()))
        if kind not in kinds:
            kinds.add(kind)
            chosen.append(layer)
    chosen = chosen[:LAYERS_MAX]
    chosen += [layer for layer in range(total) if layer not in chosen][:max(0, LAYERS_MIN - len(chosen))]
    chosen.sort()
    out = {count_name: len(chosen)}
    out.update({name: [values[layer] for layer in chosen] for name, values in per_layer.items()})
    out.update({name: [i for i, layer in enumerate(chosen) if layer in values] for name, values in indexed.items()})
    for name, table in overridden.items():
        width = len(next(iter(values[name])))
        out[name] = {str(i).zfill(width): table[layer] for i, layer in enumerate(chosen) if layer in table}
    return out


def _layer_kinds(config) -> tuple[str, ...]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return tuple(dict.fromkeys(str(kind) for kind in text.to_dict().get("layer_types") or ()))


def _switched_on(model_type: str) -> tuple[str, ...]:
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    parts = [default, *(getattr(default, name, None) for name in getattr(default, "sub_configs", None) or {})]
    return tuple(dict.fromkeys(name for part in parts if hasattr(part, "to_dict")
                               for name, value in part.to_dict().items() if name in _MOE_SWITCHES and value is False))


def _build(model_class, config, seed: int) -> nn.Module:
    with torch.device("meta"):
        skeleton = model_class._from_config(config, dtype=torch.float32)
    parameters = sum(p.numel() for p in skeleton.parameters())
    if parameters > MAX_PARAMETERS:
        raise ValueError(f"{parameters:,} parameters after shrinking (more than {MAX_PARAMETERS:,}): a size knob is not shrunk")
    with torch.random.fork_rng(devices=[]):   # the caller's random state stays as it was
        torch.manual_seed(seed)
        return model_class._from_config(config, dtype=torch.float32).eval()


def _run(model: nn.Module, config, seed: int) -> tuple[RouterOutputs, ...]:
    routers = find_routers(model)
    calls: dict[str, list] = {}
    handles = [module.register_forward_hook(
        lambda m, args, kwargs, output, label=label: calls.setdefault(label, []).append((m, args, kwargs, output)),
        with_kwargs=True) for label, module in routers]
    vocab = _vocab_size(model, config)
    ids = torch.randint(3, vocab, (BATCH, SEQUENCE), generator=torch.Generator().manual_seed(seed))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    labels = list(dict.fromkeys(label for label, _ in routers))
    return tuple(_describe(label, calls[label], config) for label in labels if label in calls)


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(label, module) of every router module in `model`, outermost only."""
    recorded: set[type] = set()
    for module in model.modules():
        recorders = getattr(module, "_can_record_outputs", None) or {}
        entries = recorders.get("router_logits")
        for entry in entries if isinstance(entries, (list, tuple)) else [entries]:
            target = getattr(entry, "target_class", entry)
            if isinstance(target, type):
                recorded.add(target)
    found = []
    for module in model.modules():
        if type(module) in recorded:
            if _ROUTER_NAME.search(type(module).__name__):
                found.append((type(module).__name__, module))
            else:   # a recorded block (Doge's CDMoE): its router child
                found += _router_children(module)
    named = [(type(m).__name__, m) for m in model.modules()   # routers the recorder does not name (DeepSeek-V4's hash router)
             if _ROUTER_NAME.search(type(m).__name__) and not _NOT_ROUTER.search(type(m).__name__)]
    found += [(label, m) for label, m in named if all(m is not f for _, f in found)]
    if not found:
        found = [pair for m in model.modules() if hasattr(m, "experts") for pair in _router_children(m)]
    inner = {id(sub) for _, module in found for sub in module.modules() if sub is not module}
    return [(label, module) for label, module in found if id(module) not in inner]


def _router_children(block: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"{type(block).__name__}.{name} ({type(child).__name__})" if isinstance(child, nn.Linear) else type(child).__name__,
             child) for name, child in block.named_children() if name in _ROUTER_CHILDREN]


def _vocab_size(model, config) -> int:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(getattr(embeddings, "num_embeddings", None) or VOCAB)


def _sizes(module: nn.Module, config) -> dict[int, str]:
    """Sizes -> symbols for the shapes of one router's outputs."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    experts = getattr(module, "num_experts", None) or next(
        (getattr(c, n) for c in (text, getattr(text, "ffn_config", None)) if c is not None
         for n in _EXPERT_COUNTS if isinstance(getattr(c, n, None), int)), None)
    top_k = getattr(module, "top_k", None) or next(
        (getattr(c, n) for c in (text, getattr(text, "ffn_config", None)) if c is not None
         for n in _TOP_KS if isinstance(getattr(c, n, None), int)), None)
    symbols = {BATCH * SEQUENCE: "N", BATCH: "B", SEQUENCE: "S"}
    hidden = getattr(text, "hidden_size", None) or getattr(text, "d_model", None)
    if isinstance(hidden, int):
        symbols.setdefault(hidden, "H")
    if isinstance(experts, int):
        symbols[experts] = "E"
        for extra in range(1, experts):            # experts beyond the routed ones (a skip / zero-compute expert)
            symbols.setdefault(experts + extra, f"E+{extra}")
    if isinstance(top_k, int):
        symbols[top_k] = "k"
        if top_k > 1:
            symbols.setdefault(BATCH * SEQUENCE * top_k, "N*k")   # one row per (token, chosen expert)
    return symbols


def _shape(tensor: torch.Tensor, symbols: dict[int, str]) -> str:
    return "[" + ", ".join(symbols.get(d, str(d)) for d in tensor.shape) + "]"


def _role(tensor: torch.Tensor, shape: str) -> str | None:
    """logits / weights / indices when the tensor has that part of the standard layout."""
    floating = tensor.is_floating_point()
    if shape == "[N, E]" and floating:
        return "logits"
    if shape == "[N, k]":
        return "weights" if floating else "indices"
    return None


def _describe(label: str, calls: list, config) -> RouterOutputs:
    module, _, _, output = calls[0]
    symbols = _sizes(module, config)
    values = list(output) if isinstance(output, (tuple, list)) else [output]
    outputs = tuple((_shape(v, symbols), str(v.dtype).removeprefix("torch.")) if isinstance(v, torch.Tensor)
                    else (type(v).__name__, "") for v in values)
    roles = tuple(_role(v, shape) if isinstance(v, torch.Tensor) else None for v, (shape, _) in zip(values, outputs))
    three = len(values) == 3 and sorted(r or "" for r in roles) == ["indices", "logits", "weights"]
    if three and roles == ("logits", "weights", "indices"):
        verdict = STANDARD
    elif three:
        verdict = "standard triple in another order: (" + ", ".join(f"{r} {s}" for r, (s, _) in zip(roles, outputs)) + ")"
    else:
        parts = [_part(v, shape, symbols) for v, (shape, _) in zip(values, outputs)]
        verdict = f"a single tensor: {parts[0]}" if not isinstance(output, (tuple, list)) else \
            f"{len(values)} outputs: " + ", ".join(parts)
    extra = tuple(dict.fromkeys(name for m, args, kwargs, _ in calls for name in _extra_inputs(m, args, kwargs)))
    shapes = {tuple(_shape(v, symbols) if isinstance(v, torch.Tensor) else type(v).__name__
                    for v in (o if isinstance(o, (tuple, list)) else [o])) for _, _, _, o in calls}
    if len(shapes) > 1:
        verdict += " (the shapes differ between layers)"
    return RouterOutputs(label, len({id(m) for m, *_ in calls}), outputs, verdict, roles if three else (), extra)


def _part(value, shape: str, symbols: dict[int, str]) -> str:
    if not isinstance(value, torch.Tensor):
        return shape
    kind = "float" if value.is_floating_point() else "bool" if value.dtype == torch.bool else "integer"
    text = f"{kind} {shape}"
    if re.search(r", E(\+\d+)?\]$", shape):
        text += " per-expert scores"
        top_k = next((size for size, symbol in symbols.items() if symbol == "k"), None)
        if value.is_floating_point() and top_k and value.numel() and bool((value != 0).sum(-1).eq(top_k).all()):
            text += " (zero outside the top k)"
    elif shape.endswith(", k]"):
        text += " weights" if value.is_floating_point() else " indices"
    return text


def _extra_inputs(module: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """Names of the arguments the router was called with, past the hidden states (None ones not counted)."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return [f"argument {i}" for i in range(1, len(args)) if args[i] is not None] + \
               [k for k, v in kwargs.items() if v is not None]
    names = list(bound.arguments)
    return [name for name in names[1:] if bound.arguments[name] is not None]


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")[:300]


@contextlib.contextmanager
def _quiet():
    """transformers' warnings off while probing (a tiny config trips many), restored after."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
