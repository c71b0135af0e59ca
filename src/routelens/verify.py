"""`routelens verify`: check, on any checkpoint, everything routelens's numbers rest on.

In the spirit of TransformerLens's `verify_models`: one random sequence (seeded), and per
MoE layer

- `router_hook`: the layer's router is found and its hook fires in a natural forward;
- `gating_rule`: the adapter's `weights_for` on the router's own experts reproduces the
  router's own weights;
- `force_standard`: forcing the standard route on every token reproduces the natural logits;
- `force_other`: forcing another route at one position changes the MoE block output at
  exactly that position, and no logit before it;
- `fast_vs_reference` and `cache_vs_reference` (first, a middle and the last MoE layer;
  `joint_...` once, routes forced at those layers at once):
  the fast engine (which hands layers it cannot patch to the cache engine, as in a run)
  and the cache engine equal the reference engine on a few positions and routes, without
  falling back;
- `isolation_scorer`: the isolation scorer's forced single expert equals a plain forward
  under the same override.

`verify_model` returns the table as a DataFrame (status "pass", "fail", or "skipped" for an
engine the adapter declares unusable on its family with the reason, the measured
difference and the tolerance); the command prints it, writes it with `--json`, and exits
0 when every check passes, 1 when one fails.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import numpy as np
import pandas as pd
import torch

from routelens.config import seed_value
from routelens.engine.checks import calibrated_tolerance, gating_rule_error, model_dtype, tolerance_for
from routelens.engine.items import ScoreItem
from routelens.engine.precision import ShadowUnavailable, measure_noise
from routelens.errors import RouteLensError, SettingError
from routelens.models.adapter import SOFTMAX_ATTENTION
from routelens.models.routing import RouteOverride, capture_routes, override_routes

COLUMNS = ["layer", "check", "status", "difference", "tolerance", "detail"]


def _row(layer, check, passed, difference=None, tolerance=None, detail=""):
    return {"layer": layer, "check": check, "status": "pass" if passed else "fail",
            "difference": None if difference is None else float(difference),
            "tolerance": None if tolerance is None else float(tolerance), "detail": detail}


@torch.no_grad()
def _forward(adapter, input_ids, overrides=None, record_blocks=()):
    """Logits [T, V] of one sequence (with route overrides) and the MoE block outputs [T, d]
    of the layers in `record_blocks`."""
    recorded = {}

    def keep(module, args, output, layer):
        block = adapter.block_output(output).detach()
        recorded[layer] = block.reshape(-1, block.shape[-1])

    hooks = [adapter.moe_block(layer).register_forward_hook(lambda m, a, o, layer=layer: keep(m, a, o, layer))
             for layer in record_blocks]
    try:
        with override_routes(adapter, overrides) if overrides else nullcontext():
            logits = adapter.model(input_ids[None].to(adapter.device), use_cache=False).logits[0]
    finally:
        for hook in hooks:
            hook.remove()
    return logits.float(), recorded


def _dtype_noise(adapter, input_ids: torch.Tensor) -> tuple[dict, float]:
    """How far the model's dtype moves its log-probs (the natural forward against a
    higher-precision shadow; `table.attrs["dtype_noise"]`), and the tolerance the engine
    checks use: the run-time checks' calibrated one (`routelens.engine.checks`), or the
    fixed one without a shadow."""
    dtype = model_dtype(adapter)
    positions = np.arange(len(input_ids) - 1)
    item = ScoreItem(input_ids, positions, torch.zeros(len(positions), 1, 1, dtype=torch.long), torch.zeros(len(positions), 1, 1))
    try:
        noise = measure_noise(adapter, [item])
    except ShadowUnavailable as reason:
        limit = tolerance_for(dtype).logprob_max
        return {"dtype": str(dtype).removeprefix("torch."), "method": "none", "reason": str(reason),
                "tolerance": limit, "text": f"no shadow ({reason}): the fixed tolerance {limit:g} nats"}, limit
    hybrid = any(adapter.layer_kind(i) not in SOFTMAX_ATTENTION for i in range(adapter.num_layers))
    limit = calibrated_tolerance(dtype, noise["noise_max"], noise["noise_mean"], hybrid).logprob_max
    text = (f"{str(dtype).removeprefix('torch.')} vs a {noise['method']} over this sequence's {noise['tokens']} tokens: "
            f"{noise['noise_max']:.3g} nats max, {noise['noise_mean']:.3g} mean; the engine rows below allow "
            f"{limit:.3g} (an estimate from one sequence: a run measures its own on its first batch)")
    return {"dtype": str(dtype).removeprefix("torch."), **noise, "tolerance": limit, "text": text}, limit


def _other_route(adapter, logits_row: torch.Tensor, standard: torch.Tensor) -> torch.Tensor:
    """k experts that are not the standard set: the router's lowest-scored ones, or, where
    those are the standard set (a selection bias can choose the lowest logits, fuzzing found
    it on LFM2-MoE with 4 experts and k = 3), that set with one expert swapped for an expert
    outside it."""
    order = torch.argsort(logits_row.float())
    other = order[: standard.numel()]
    chosen = set(standard.tolist())
    if set(other.tolist()) == chosen:
        outside = [e for e in order.tolist() if e not in chosen]
        if not outside:
            raise RouteLensError("this model has only k experts: no route other than the standard one exists")
        other = other.clone()
        other[-1] = outside[0]
    return other.sort().values


@torch.no_grad()
def verify_model(loaded, length: int = 32, seed: int = 0, routes: int = 4, scored_positions: int = 4) -> pd.DataFrame:
    """Run every check on `loaded` (a `LoadedModel`) and return the table (see module doc)."""
    adapter = loaded.adapter
    if adapter.context_length and length > adapter.context_length:
        raise SettingError(f"`length` {length} is more than the model's context of {adapter.context_length} tokens "
                           f"(max_position_embeddings); give `length` {adapter.context_length} or less", "length")
    seed_value("seed", seed)
    if length < scored_positions + 2:
        raise SettingError(f"`length` {length} is too short: it needs at least {scored_positions + 2} tokens", "length")
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, adapter.config.vocab_size, (length,), generator=generator)
    rows = []

    with torch.no_grad(), capture_routes(adapter) as captured:
        natural_logits, natural_blocks = _forward(adapter, input_ids, record_blocks=adapter.moe_layers)
    noise, exact = _dtype_noise(adapter, input_ids)   # two computations of the same numbers
    moe = adapter.moe_layers
    engine_layers = sorted({moe[0], moe[len(moe) // 2], moe[-1]})
    position = length // 2
    # k == E (HF's own glm4_moe, dots1, jamba tester configs): the checks of another route are
    # skipped with the reason, every other check runs
    alternatives = all(adapter.top_k_at(layer) < adapter.num_experts for layer in engine_layers)
    one_k = len({adapter.top_k_at(layer) for layer in engine_layers}) == 1
    for layer in moe:
        route = captured.get(layer)
        rows.append(_row(layer, "router_hook", route is not None, detail=type(adapter.routers[layer]).__name__))
        if route is None:
            continue
        limit = tolerance_for(route.weights.dtype).weight
        error = gating_rule_error(adapter, route.logits, route.experts, route.weights)
        rows.append(_row(layer, "gating_rule", error <= limit, error, limit, "weights_for on the router's experts vs its weights"))

        everything = RouteOverride(torch.arange(length), route.experts, route.weights)
        forced, _ = _forward(adapter, input_ids, {layer: everything})
        difference = float((forced - natural_logits).abs().max())
        rows.append(_row(layer, "force_standard", difference <= exact, difference, exact,
                         "standard route forced on every token vs natural logits"))

        if adapter.top_k_at(layer) == adapter.num_experts:
            rows.append(_skipped(layer, "force_other", NO_ALTERNATIVE))
            rows.extend(_skipped(layer, check, NO_ALTERNATIVE) for check in ("fast_vs_reference", "cache_vs_reference")
                        if layer in engine_layers)
            rows.extend(_guarded(layer, "isolation_scorer", lambda layer=layer, route=route: _isolation_scorer(
                adapter, input_ids, layer, int(route.experts[position, 0]), scored_positions, exact)))
            continue
        other = _other_route(adapter, route.logits[position], route.experts[position])
        weights = adapter.weights_for(route.logits[position][None].float(), other[None].to(route.logits.device))
        one = RouteOverride(torch.tensor([position]), other[None], weights)
        changed_logits, changed_blocks = _forward(adapter, input_ids, {layer: one}, record_blocks=[layer])
        changed_block, natural_block = changed_blocks[layer], natural_blocks[layer]
        block_delta = (changed_block - natural_block).abs().amax(dim=-1).float()          # [T]
        elsewhere = float(torch.cat([block_delta[:position], block_delta[position + 1:]]).max())
        before = float((changed_logits[:position] - natural_logits[:position]).abs().max())
        moved = float(block_delta[position])
        # block outputs are compared relative to their own scale (tiny random experts move little)
        relative = tolerance_for(model_dtype(adapter)).weight * float(natural_block.abs().max())
        passed = elsewhere <= relative and before <= exact and moved > relative
        rows.append(_row(layer, "force_other", passed, max(elsewhere, before), max(relative, exact),
                         f"position {position}: block output moved {moved:.3g}; elsewhere {elsewhere:.3g}, "
                         f"logits before it {before:.3g}"))

        if layer in engine_layers:
            rows.extend(_guarded(layer, "fast_vs_reference", lambda layer=layer: _engines_vs_reference(
                adapter, input_ids, layer, routes, seed, scored_positions, exact)))
        rows.extend(_guarded(layer, "isolation_scorer", lambda layer=layer, route=route: _isolation_scorer(
            adapter, input_ids, layer, int(route.experts[position, 0]), scored_positions, exact)))
    if len(engine_layers) > 1 and (not alternatives or not one_k):
        rows.extend(_skipped(engine_layers[0], check, NO_ALTERNATIVE if not alternatives else MIXED_K)
                    for check in ("joint_fast_vs_reference", "joint_cache_vs_reference"))
    elif len(engine_layers) > 1:   # --joint-layers: routes forced at several layers at once
        rows.extend(_guarded(engine_layers[0], "joint_fast_vs_reference", lambda: _engines_vs_reference(
            adapter, input_ids, engine_layers, routes, seed, scored_positions, exact)))
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.attrs["dtype_noise"] = noise
    return table


NO_ALTERNATIVE = "the model has only k experts: no route other than the standard one exists (nothing to compare)"
MIXED_K = "the layers choose different numbers of experts (top-k per layer): joint routes need one k"


def _skipped(layer, check, detail) -> dict:
    return {**_row(layer, check, True, detail=detail), "status": "skipped"}


def _guarded(layer, check, run) -> list[dict]:
    """One check's rows; a run-time check that refuses inside it is that check failing."""
    try:
        result = run()
    except RouteLensError as error:
        return [_row(layer, check, False, detail=f"{type(error).__name__}: {error}")]
    return result if isinstance(result, list) else [result]


def _engines_vs_reference(adapter, input_ids, layer, routes, seed, scored_positions, exact) -> list[dict]:
    """`fast_vs_reference` and `cache_vs_reference` rows: each engine on the same routes; for
    a list of layers, `joint_...` rows on routes forced at all of them at once."""
    from routelens.analyses.counterfactual.analysis import CounterfactualConfig, build_routes, joint_routes
    from routelens.data.trajectories import Trajectory
    from routelens.engine import CacheEngine, FastEngine, ReferenceEngine, ScoreItem
    from routelens.engine.fast import FastEngineUnsupported

    layers = [layer] if isinstance(layer, int) else list(layer)
    prefix, first = ("", layer) if isinstance(layer, int) else ("joint_", layers[0])
    length = input_ids.shape[0]
    trajectory = Trajectory("verify", input_ids.tolist(), completion_start=length - scored_positions)
    built = build_routes(adapter, trajectory, layers, CounterfactualConfig(routes=routes, null_routes=0, seed=seed))
    layer_routes = built[layer] if isinstance(layer, int) else joint_routes(built, layers, routes)
    item = ScoreItem(input_ids, layer_routes.positions, torch.as_tensor(layer_routes.experts), layer_routes.weights)
    reference = ReferenceEngine(adapter).score_batch(layer, [item])[0]
    size = f"{len(item.positions)} positions x {reference.shape[1]} routes" + (
        "" if isinstance(layer, int) else f" at layers {'+'.join(map(str, layers))} at once")
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fast_engine = FastEngine(adapter)
            fast = fast_engine.score_batch(layer, [item])[0]
            declared = adapter.cache_engine_defect
            record = fast_engine.check_record()
            reason = record["engine_fallback"] or (None if declared else record["cache_engine_fallback"])
            handed = record["cache_engine_layers"].get(str(first))
            served = f"; served by the {'reference' if declared else 'cache'} engine ({handed})" if handed else ""
        except FastEngineUnsupported as unsupported:
            fast, reason, served = reference, str(unsupported), ""
        difference = float(np.abs(fast - reference).max())
        rows.append(_row(first, prefix + "fast_vs_reference", reason is None and difference <= exact, difference, exact,
                         size + served if reason is None else f"fast engine fell back: {reason}"))
        cache_engine = CacheEngine(adapter)
        cached = cache_engine.score_batch(layer, [item])[0]
    difference = float(np.abs(cached - reference).max())
    reason = cache_engine.fallback_reason
    if adapter.cache_engine_defect:   # declared: runs never use it, and say so
        rows.append({**_row(first, prefix + "cache_vs_reference", True, detail=f"not used: {reason}"), "status": "skipped"})
    else:
        rows.append(_row(first, prefix + "cache_vs_reference", reason is None and difference <= exact, difference, exact,
                         size if reason is None else f"cache engine fell back to reference: {reason}"))
    return rows


def _isolation_scorer(adapter, input_ids, layer, expert, scored_positions, exact) -> dict:
    from routelens.analyses.isolation.analysis import forced_conditions
    from routelens.engine.whole_sequence import WholeSequenceScorer

    length = input_ids.shape[0]
    scorer = WholeSequenceScorer(adapter, check=False)
    positions = np.arange(length - scored_positions - 1, length - 1)
    natural = scorer.natural(input_ids, [layer], positions)
    experts, weights = forced_conditions(adapter.num_experts, length, adapter.top_k_at(layer))
    scored = scorer.score(natural, layer, experts[expert: expert + 1], weights[expert: expert + 1])[0]
    override = RouteOverride(torch.arange(length), experts[expert], weights[expert])
    plain_logits, _ = _forward(adapter, input_ids, {layer: override})
    plain = torch.log_softmax(plain_logits[positions], -1).gather(
        -1, input_ids[positions + 1, None].to(plain_logits.device))[:, 0].double().cpu().numpy()
    difference = float(np.abs(scored - plain).max())
    return _row(layer, "isolation_scorer", difference <= exact, difference, exact,
                f"expert {expert} forced on every token vs a plain forward")


def format_table(table: pd.DataFrame) -> str:
    """The table as aligned text, failures marked."""
    def number(value):
        return "" if value is None or pd.isna(value) else f"{value:.2e}"

    header = ["layer", "check", "status", "difference", "tolerance", "detail"]
    body = [[str(r.layer), r.check, r.status.upper() if r.status == "fail" else r.status, number(r.difference),
             number(r.tolerance), r.detail] for r in table.itertuples()]
    widths = [max(len(header[i]), *(len(row[i]) for row in body)) for i in range(5)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header[:5], widths)) + "  detail"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5] for row in body]
    return "\n".join(lines)
