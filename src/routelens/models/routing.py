"""Reading and overriding routes through forward hooks on the router modules.

A forward hook on a router sees `(router_logits [T, E], topk_weights [T, k],
topk_experts [T, k])` and may return a replacement tuple; the experts module then runs
with that route. A router with an output layout of its own is read and rewritten through
its family's `MoEAdapter.route_of` / `router_output`. No block forward is patched. Rows are flat token indices
`row = b * seq_len + s` (the routers flatten batch x seq row-major).

Every override is verified: the hook must fire and replace exactly the requested rows,
otherwise `OverrideNotApplied` is raised - a silent no-op would report the natural
route's numbers as if they were the alternative's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from routelens.errors import OverrideNotApplied, RouteLensError, RouterBypassed
from routelens.models.adapter import MoEAdapter


@dataclass
class RouterOutput:
    """What one router returned for one forward: logits [T, E], weights [T, k], experts [T, k]."""

    logits: torch.Tensor
    weights: torch.Tensor
    experts: torch.Tensor


def _unpack(output, layer: int, adapter: MoEAdapter | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, weights, experts) of a router's output, through the family's `route_of`
    where the adapter is known (a router with an output layout of its own)."""
    if adapter is not None:
        output = adapter.route_of(output)
    if not (isinstance(output, tuple) and len(output) == 3 and output[2].dim() == 2):
        raise RouteLensError(
            f"router at layer {layer} returned an unknown layout ({type(output).__name__}); "
            "routelens is tested with the transformers version pinned in pyproject.toml"
        )
    return output


@contextmanager
def _router_hooks(adapter: MoEAdapter, hooks: dict[int, Callable]) -> Iterator[None]:
    """Register one forward hook per layer's router for the duration of the block."""
    handles = [adapter.routers[layer].register_forward_hook(hook) for layer, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_routes(adapter: MoEAdapter, layers: list[int] | None = None) -> Iterator[dict[int, RouterOutput]]:
    """Record each router's output during the forward(s) run inside the block.

    Yields a dict filled in place: layer -> RouterOutput of the last forward. If a forward
    ran (some hook fired) but a requested router's hook did not, that router was bypassed:
    `RouterBypassed`, naming the module, instead of a missing entry.
    """
    captured: dict[int, RouterOutput] = {}

    def record(module, args, output, layer):
        logits, weights, experts = _unpack(output, layer, adapter)
        captured[layer] = RouterOutput(logits.detach(), weights.detach(), experts.detach())

    layers = adapter.moe_layers if layers is None else layers
    blocks_ran: list[int] = []   # MoE blocks entered, whether or not their router then ran
    block_hooks = [adapter.moe_block(layer).register_forward_pre_hook(lambda m, a, layer=layer: blocks_ran.append(layer))
                   for layer in layers]
    try:
        with _router_hooks(adapter, {layer: (lambda m, a, o, layer=layer: record(m, a, o, layer)) for layer in layers}):
            yield captured
    finally:
        for hook in block_hooks:
            hook.remove()
    silent = sorted({layer for layer in blocks_ran if layer not in captured})
    if silent:
        raise router_bypassed(adapter, silent)


def router_bypassed(adapter: MoEAdapter, layers: list[int]) -> RouterBypassed:
    router = adapter.routers[layers[0]]
    return RouterBypassed(
        f"the router {adapter.module_name(router)} ({type(router).__name__}) never ran in the forward "
        f"(layers {layers}): this MoE block computes its routing inline (a quantized MLP such as MXFP4, or a hub "
        "kernel), so routes can be neither observed nor forced; load the model dequantized or without the kernel"
    )


@dataclass
class RouteOverride:
    """Force the route of some token rows at one layer.

    rows [N] flat token indices (b * seq_len + s); experts [N, k] expert ids; weights
    [N, k] the weights to apply (cast to the router's output dtype).
    """

    rows: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor
    fired: int = field(default=0, init=False)

    def apply(self, output, layer: int, adapter: MoEAdapter | None = None):
        """The router output with this override's rows replaced (in the router's own layout,
        through the family's `route_of` / `router_output`, when `adapter` is given)."""
        logits, weights, experts = _unpack(output, layer, adapter)
        if self.experts.shape[1] != experts.shape[1]:
            raise RouteLensError(
                f"route has {self.experts.shape[1]} experts but layer {layer} routes {experts.shape[1]} per token"
            )
        if self.rows.numel() and int(self.rows.max()) >= experts.shape[0]:
            raise ValueError(f"override row {int(self.rows.max())} >= {experts.shape[0]} tokens")
        rows = self.rows.to(experts.device)
        new_experts, new_weights = experts.clone(), weights.clone()
        new_experts[rows] = self.experts.to(experts.device, experts.dtype)
        new_weights[rows] = self.weights.to(weights.device, weights.dtype)
        self.fired += 1
        route = (logits, new_weights, new_experts)
        return route if adapter is None else adapter.router_output(output, route)


@contextmanager
def override_routes(adapter: MoEAdapter, overrides: dict[int, RouteOverride],
                    expected_calls: int = 1) -> Iterator[dict[int, RouteOverride]]:
    """Run the block's forward(s) with the given rows routed as requested at each layer;
    all other rows and layers route normally. On exit, each layer's hook must have fired
    exactly `expected_calls` times, else `OverrideNotApplied`."""
    for layer, override in overrides.items():
        if layer not in adapter.routers:
            raise RouteLensError(f"layer {layer} is not an MoE layer; MoE layers: {adapter.moe_layers}")
        if override.experts.shape != override.weights.shape or override.experts.shape[0] != override.rows.shape[0]:
            raise ValueError("override rows, experts and weights must have matching shapes")
    hooks = {layer: (lambda module, args, output, layer=layer, o=override: o.apply(output, layer, adapter))
             for layer, override in overrides.items()}
    with _router_hooks(adapter, hooks):
        yield overrides
    for layer, override in overrides.items():
        if override.fired != expected_calls:
            raise OverrideNotApplied(
                f"route override at layer {layer} fired {override.fired} times, expected {expected_calls}: "
                f"the router {adapter.module_name(adapter.routers[layer])} was bypassed (a quantized MLP, a hub kernel "
                "or a changed block forward); refusing to return natural-route numbers as overridden ones"
            )


@contextmanager
def route_by_rule(adapter: MoEAdapter, rules: dict[int, Callable]) -> Iterator[None]:
    """Route every token at each layer by a rule instead of the router's choice, for any
    number of forwards (generation): `rule(logits [N, E], hidden) -> experts [N, k]` on the
    flat rows (b * seq_len + s) the router saw (`hidden`: the router's input); the weights are the
    model's gating rule on the router's own logits for those experts. A rule's hook that
    never fires is `OverrideNotApplied`."""
    fired = dict.fromkeys(rules, 0)

    def apply(module, args, output, layer):
        logits, weights, experts = _unpack(output, layer, adapter)
        hidden = args[0] if args else None
        chosen = rules[layer](logits.detach(), hidden).to(experts.device, experts.dtype)
        fired[layer] += 1
        return adapter.router_output(output, (logits, adapter.weights_for(logits.float(), chosen).to(weights.dtype), chosen))

    with _router_hooks(adapter, {layer: (lambda m, a, o, layer=layer: apply(m, a, o, layer)) for layer in rules}):
        yield
    silent = [layer for layer, count in fired.items() if count == 0]
    if silent:
        raise OverrideNotApplied(f"routing rules at layers {silent} never fired: the router "
                                 f"{adapter.module_name(adapter.routers[silent[0]])} was bypassed; refusing to report "
                                 "natural-route numbers as rule-routed ones")
