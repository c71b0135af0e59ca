"""`Lens`: a loaded MoE model with its adapter, for notebooks and scripts.

`routelens.load(...)` or `routelens.wrap(model, tokenizer)` gives a Lens. It tells the
model's MoE structure (`moe_layers`, `num_experts`, `top_k`, `family`), records routes
(`capture`) and forces them (`force`) around any forward of `lens.model`, and is what every
analysis function takes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from routelens import validate
from routelens.errors import OverrideNotApplied, RouteLensError, SettingError
from routelens.models.loading import DTYPES, LoadedModel, load_model


@dataclass
class Routes:
    """One router's output in the last forward: `experts` and `weights` [B, T, k] (weights
    as the model applied them), `logits` [B, T, E].

    Examples:
        >>> import routelens as rl
        >>> lens = rl.load("demo")
        >>> with lens.capture() as routes:
        ...     _ = lens.model(lens.encode("Q:1+2=A:"))
        >>> r = routes[0]
        >>> tuple(r.logits.shape[-1:]), bool((r.weights >= 0).all())
        ((16,), True)
    """

    experts: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor


class NotCaptured(RouteLensError, KeyError):
    """No routes were captured at the layer asked for (a KeyError too, as a dict's missing key)."""

    __str__ = RouteLensError.__str__   # the message as written, not KeyError's repr of it


class CapturedRoutes(dict):
    """layer -> `Routes`, filled when the forward runs; `routes[-1]` counts from the end."""

    def __init__(self, adapter):
        super().__init__()
        self._adapter = adapter

    def __getitem__(self, layer: int) -> Routes:
        resolved = validate.layer(layer, self._adapter)
        if not super().__contains__(resolved):
            raise NotCaptured(f"no routes captured at layer {layer}: run a forward inside the `capture` block "
                              f"(captured layers: {sorted(self.keys())})")
        return super().__getitem__(resolved)


class Lens:
    """A MoE causal LM with its routelens adapter.

    Examples:
        >>> import routelens as rl
        >>> lens = rl.load("demo")
        >>> lens.family, lens.num_experts, lens.top_k, lens.moe_layers
        ('olmoe', 16, 4, [0, 1, 2, 3])
    """

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded

    def __repr__(self) -> str:
        return (f"<Lens {self.loaded.spec!r}: {self.family}, {len(self.moe_layers)} MoE layers {self.moe_layers}, "
                f"{self.num_experts} experts, top-{self.top_k}, {self.loaded.device}, {self.loaded.dtype}>")

    # ------------------------------------------------------------------ what the model is
    @property
    def model(self) -> torch.nn.Module:
        """The Hugging Face model (call it as usual; `capture` and `force` act on its forwards)."""
        return self.adapter.model

    @property
    def tokenizer(self):
        """The model's tokenizer, or None (tiny random models have none)."""
        return self.loaded.tokenizer

    @property
    def adapter(self):
        """The family adapter: where the routers are, the gating rule, the block layout."""
        return self.loaded.adapter

    @property
    def moe_layers(self) -> list[int]:
        """Decoder-layer indices that have a router."""
        return list(self.adapter.moe_layers)

    @property
    def num_experts(self) -> int:
        return self.adapter.num_experts

    @property
    def top_k(self) -> int:
        """Experts chosen per token (the first MoE layer's; `top_ks` where layers differ)."""
        return self.adapter.top_k

    @property
    def top_ks(self) -> dict[int, int]:
        """Experts chosen per token at each MoE layer."""
        return dict(self.adapter.top_ks)

    @property
    def family(self) -> str:
        """The transformers model type (olmoe, qwen3_moe, deepseek_v3, ...)."""
        return self.adapter.config.model_type

    @property
    def gating_rule(self) -> str:
        return self.adapter.gating_rule

    def describe(self) -> dict:
        """What `routelens inspect` prints: layers, experts, gating rule, parameters, device."""
        return {**self.adapter.describe(), "device": self.loaded.device, "dtype": self.loaded.dtype,
                "upcast_router": self.loaded.upcast_router}

    def encode(self, text: str) -> torch.Tensor:
        """`text` as input ids [1, T] on the model's device (needs a tokenizer)."""
        if self.tokenizer is None:
            raise RouteLensError(f"model {self.loaded.spec!r} has no tokenizer; pass token ids")
        if not isinstance(text, str):
            raise SettingError(f"`text` must be a string, got {type(text).__name__} {validate.shown(text)}", "text")
        ids = self.tokenizer(text)["input_ids"]
        if not ids:
            raise SettingError(f"`text` {text!r} tokenises to nothing; give some text", "text")
        return torch.tensor([ids], device=self.adapter.device)

    # ------------------------------------------------------------------ routes
    @contextmanager
    def capture(self, layers: list[int] | None = None) -> Iterator[CapturedRoutes]:
        """Record the routes of the forward run inside the block (the last one, if several).

        `layers`: a list of layer indices (default: every MoE layer; one layer is [3]). The
        input ids of every forward inside the block are checked (an integer tensor [batch,
        length] of ids in the vocabulary): a bad one is a one-line error, not an IndexError
        from the embedding.

        Examples:
            >>> import routelens as rl
            >>> lens = rl.load("demo")
            >>> ids = lens.encode("Q:12+7=A:")
            >>> with lens.capture(layers=[-1]) as routes:
            ...     _ = lens.model(ids)
            >>> routes[-1].experts.shape == (1, ids.shape[1], lens.top_k)
            True
        """
        from routelens.models.routing import capture_routes

        resolved = validate.layers(layers, self.adapter) if layers is not None else self.moe_layers
        shapes = _BlockShapes(self.adapter, resolved)
        routes = CapturedRoutes(self.adapter)
        with _CheckedInputs(self.model), shapes, capture_routes(self.adapter, resolved) as captured:
            yield routes
        for layer, output in captured.items():
            batch, length = shapes.last[layer]
            routes[layer] = Routes(output.experts.reshape(batch, length, -1), output.weights.reshape(batch, length, -1),
                                   output.logits.reshape(batch, length, -1))

    @contextmanager
    def force(self, layer: int, positions: list[tuple[int, int]], experts: list[list[int]],
              weights: list[list[float]] | None = None) -> Iterator[None]:
        """Route the tokens at `positions` ((batch row, position) pairs) through `experts` (k
        distinct experts each) at `layer` in every forward inside the block; all other
        tokens and layers route normally. Weights follow the model's own gating rule for
        those experts unless given (finite, >= 0, one per expert). Every argument is checked
        on entering the block (positions: distinct pairs of integers >= 0; a position beyond
        a forward's batch x length fails in that forward), and so are the input ids of each
        forward (see `capture`). Raises `OverrideNotApplied` if no forward was routed.

        Examples:
            >>> import routelens as rl
            >>> lens = rl.load("demo")
            >>> ids = lens.encode("Q:12+7=A:")
            >>> with lens.force(layer=-1, positions=[(0, 3)], experts=[[0, 1, 2, 3]]), lens.capture([-1]) as routes:
            ...     _ = lens.model(ids)
            >>> sorted(routes[-1].experts[0, 3].tolist())
            [0, 1, 2, 3]
        """
        from routelens.models.routing import RouteOverride

        resolved = validate.layer(layer, self.adapter)
        positions = validate.positions(positions)
        k = self.adapter.top_k_at(resolved)
        experts_t = torch.tensor(validate.routes(experts, len(positions), k, self.num_experts), dtype=torch.long)
        weights_t = None if weights is None else torch.tensor(
            validate.weights(weights, len(positions), k), dtype=torch.float32)
        shapes = _BlockShapes(self.adapter, [resolved])
        fired = []

        def hook(module, args, output):
            # rows are known only now (routers flatten batch x length); the replacement itself is
            # the shared RouteOverride's
            logits = self.adapter.route_of(output)[0]   # a router with a layout of its own (Llama 4), mapped
            batch, length = shapes.last[resolved]
            outside = [(b, s) for b, s in positions if not (0 <= b < batch and 0 <= s < length)]
            if outside:
                raise RouteLensError(f"position {outside[0]} lies outside this forward's batch x length "
                                     f"{batch} x {length}")
            rows = torch.tensor([b * length + s for b, s in positions], device=logits.device)
            new_experts = experts_t.to(logits.device)
            new_weights = self.adapter.weights_for(logits[rows], new_experts) if weights_t is None else weights_t
            fired.append(len(rows))
            return RouteOverride(rows, new_experts, new_weights).apply(output, resolved, self.adapter)

        handle = self.adapter.routers[resolved].register_forward_hook(hook)
        try:
            with _CheckedInputs(self.model), shapes:
                yield
        finally:
            handle.remove()
        if shapes.last and not fired:
            raise OverrideNotApplied(f"the route override at layer {layer} never fired although the model ran: "
                                     "this MoE block computes its routing inline; refusing to pass off natural routes")


class _CheckedInputs:
    """While open: every forward of `model` has its input ids checked (`validate.input_ids`)
    before the embedding sees them (a forward given inputs_embeds is left alone)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.handle = model, None

    def __enter__(self):
        vocab_size = self.model.config.vocab_size

        def check(module, args, kwargs):
            ids = args[0] if args else kwargs.get("input_ids")
            if ids is not None:
                validate.input_ids(ids, vocab_size)

        self.handle = self.model.register_forward_pre_hook(check, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class _BlockShapes:
    """Batch and length of the hidden states entering each MoE block (routers flatten them)."""

    def __init__(self, adapter, layers: list[int]):
        self.adapter, self.layers = adapter, layers
        self.last: dict[int, tuple[int, int]] = {}
        self.handles = []

    def __enter__(self):
        for layer in self.layers:
            def record(module, args, kwargs, layer=layer):
                hidden = args[0] if args else next(iter(kwargs.values()))
                self.last[layer] = (hidden.shape[0], hidden.shape[1]) if hidden.dim() == 3 else (1, hidden.shape[0])
            self.handles.append(self.adapter.moe_block(layer).register_forward_pre_hook(record, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def load(model: str = "demo", device: str = "auto", dtype: str = "auto", *, device_map=None,
         trust_remote_code: bool = False, router_delta: str | None = None,
         experts_implementation: str | None = None, weights: bool = True, upcast_router: bool = False) -> Lens:
    """Load a MoE causal LM: "demo" (the embedded model), a folder written by
    `save_pretrained`, a Hugging Face hub id, or "tiny:<model_type>" (random tiny model).

    `device` auto, cpu, cuda, cuda:N; `dtype` auto (float32 on CPU, bfloat16 on CUDA),
    float32, bfloat16, float16; `device_map` auto, balanced or {module: device} (accelerate)
    for a model larger than one device; `router_delta` a `router_update` delta to apply.
    `upcast_router=True` makes every router compute its logits in float32 while the rest of
    a bf16/fp16 model keeps its dtype (bf16 logits flip top-k choices near ties); it is
    recorded in every run's config (`"upcast_router": true`), and is a no-op in float32.
    `weights=False` builds the model without reading a weight (on the meta device): enough
    to drive an analysis on Ray (`ray=`), whose actors load the weights themselves, and
    nothing else (an analysis in this process refuses it).

    Every argument is checked before anything is read: a bad one is a one-line
    `SettingError` naming it.

    Examples:
        >>> import routelens as rl
        >>> rl.load("tiny:qwen3_moe").family
        'qwen3_moe'
    """
    model = validate.model_spec(model, "model")
    if not isinstance(device, str):
        raise SettingError(f"`device` must be a string: auto, cpu, cuda or cuda:N, got {validate.shown(device)}", "device")
    if isinstance(dtype, torch.dtype):   # torch.bfloat16 for "bfloat16"
        dtype = next((name for name, value in DTYPES.items() if value == dtype), str(dtype))
    if device_map is not None and not isinstance(device_map, (str, dict)):
        raise SettingError("`device_map` must be auto, balanced, sequential or a dict {module: device}, got "
                           f"{type(device_map).__name__} {validate.shown(device_map)}", "device_map")
    if experts_implementation is not None and not isinstance(experts_implementation, str):
        raise SettingError(f"`experts_implementation` must be a string (eager, grouped_mm or batched_mm), got "
                           f"{validate.shown(experts_implementation)}", "experts_implementation")
    validate.flag(trust_remote_code, "trust_remote_code")
    validate.flag(weights, "weights")
    validate.flag(upcast_router, "upcast_router")
    router_delta = validate.path(router_delta, "router_delta", optional=True)
    return Lens(load_model(model, device, dtype, trust_remote_code, router_delta=router_delta, device_map=device_map,
                           experts_implementation=experts_implementation, weights=weights,
                           upcast_router=upcast_router))


def wrap(model: torch.nn.Module, tokenizer=None, name: str | None = None) -> Lens:
    """A Lens around a Hugging Face MoE model you already hold (put in eval mode).

    `name` identifies the model in run records (default: the config's `_name_or_path`).

    Examples:
        >>> import routelens as rl
        >>> from transformers import AutoModelForCausalLM
        >>> hf = AutoModelForCausalLM.from_pretrained(rl.load("demo").loaded.folder)
        >>> rl.wrap(hf).moe_layers
        [0, 1, 2, 3]
    """
    from routelens.models.registry import adapter_for

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise RouteLensError(f"wrap() takes a Hugging Face model (a torch.nn.Module with a config), "
                             f"got {type(model).__name__}")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise SettingError(f"`name` must be a non-empty string or None, got {validate.shown(name)}", "name")
    model.eval()
    adapter = adapter_for(model)
    parameter = next(model.parameters())
    dtype = next((name for name, value in DTYPES.items() if value == parameter.dtype), str(parameter.dtype))
    devices = {p.device for p in model.parameters()}
    device = "device_map" if len(devices) > 1 else str(parameter.device)
    spec = name or getattr(model.config, "_name_or_path", "") or f"in-memory:{type(model).__name__}"
    return Lens(LoadedModel(adapter, tokenizer, spec, device, dtype))
