"""Router-only update of the final MoE layer from counterfactual preferences (paper 1's
last experiment), every expert and every other router frozen.

1. Preference pairs come from a counterfactual run at the last MoE layer: for a token in
   the chosen bins (default Fragile and Ambiguous), every alternative route (a distinct
   expert set) whose probability of the realised next token beats the standard route's by
   at least `margin` is preferred over the standard route.
2. The router's probability of a route is the Plackett-Luce probability of its expert set
   (k draws without replacement from the router's distribution: the softmax, or the
   normalised selection scores for sigmoid routers), summed over the k! orders.
3. The loss is DPO on routes, against the frozen original router as reference:
   -log sigmoid(beta * ((log pi(w) - log pi_ref(w)) - (log pi(l) - log pi_ref(l)))).

Only the final layer's router parameters are trained (an fp32 master copy, written back
in the model's dtype); its inputs are fixed, since every layer below is unchanged. After
training every parameter and buffer of the model is hashed and compared with the hashes
taken before: anything but the router changing is an error.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import time
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch
from torch.func import functional_call

from routelens.analyses.counterfactual_input import check_same_model, counterfactual_run, run_trajectories
from routelens.config import RouterUpdateConfig
from routelens.errors import SettingError
from routelens.models.adapter import MoEAdapter


# ---------------------------------------------------------------------------- Plackett-Luce
@functools.cache
def _subset_tables(k: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The 2^k subsets of k slots ordered by size: which slots each has drawn [2^k, k], and
    for each size j = 1..k the members of the subsets of that size [M, j] with, per member,
    the position of the subset without it [M, j]. Built once per k (training calls this
    every step)."""
    order = sorted(range(2 ** k), key=lambda m: (bin(m).count("1"), m))
    position = {mask: i for i, mask in enumerate(order)}
    drawn = torch.tensor([[m >> i & 1 for i in range(k)] for m in order], dtype=torch.bool)
    levels = []
    for size in range(1, k + 1):
        masks = [m for m in order if bin(m).count("1") == size]
        members = [[i for i in range(k) if m >> i & 1] for m in masks]
        parents = [[position[m ^ (1 << i)] for i in row] for m, row in zip(masks, members)]
        levels.append((torch.tensor(members), torch.tensor(parents)))
    return drawn, levels


def plackett_luce_set_log_prob(log_weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """log P(the first k draws without replacement are the set `experts`), any order.

    log_weights [N, E]: log of a normalised distribution over experts; experts [N, k]
    distinct ids -> [N]. Exact and stable: a dynamic programme over the 2^k subsets of the
    set, in log space, where f(U) = sum over i in U of f(U - i) * w_i / (mass not in U - i).
    """
    n, k = experts.shape
    chosen = log_weights.gather(-1, experts)                                            # [N, k]
    outside = log_weights.scatter(-1, experts, float("-inf")).logsumexp(-1)             # [N]
    drawn, levels = _subset_tables(k)
    drawn = drawn.to(experts.device)
    # log of the probability mass still undrawn after subset U: outside mass + members not in U
    remaining = torch.cat([outside[:, None, None].expand(n, len(drawn), 1),
                           chosen[:, None, :].expand(n, len(drawn), k).masked_fill(drawn[None], float("-inf"))],
                          dim=-1).logsumexp(-1)                                        # [N, 2^k]
    table = torch.zeros(n, 1, dtype=log_weights.dtype, device=log_weights.device)     # f(empty set) = 1
    for members, parents in levels:
        members, parents = members.to(experts.device), parents.to(experts.device)
        terms = table[:, parents] + chosen[:, members] - remaining[:, parents]          # [N, M, j]
        table = torch.cat([table, terms.logsumexp(-1)], dim=-1)
    return table[:, -1]


def route_log_weights(adapter: MoEAdapter, logits: torch.Tensor, layer: int) -> torch.Tensor:
    """log of the router's distribution over experts that routes are drawn from: the
    family's selection scores, normalised (the softmax for softmax routers), float64."""
    return torch.log(adapter.selection_distribution(logits, layer).clamp_min(1e-300))


# ---------------------------------------------------------------------------- preferences
def preference_pairs(run_dir: str, layer: int, margin: float, bins: list[str]) -> pd.DataFrame:
    """(trajectory_id, position, preferred, rejected, p_preferred, p_rejected, bin) from a
    counterfactual run folder: alternatives beating the standard route by >= margin."""
    routes = pd.read_parquet(os.path.join(run_dir, "routes.parquet"))
    tokens = pd.read_parquet(os.path.join(run_dir, "tokens.parquet"))
    routes, tokens = routes[routes["layer"] == layer], tokens[tokens["layer"] == layer]
    keys = ["trajectory_id", "position", "layer"]
    tokens = tokens[tokens["bin"].isin(bins)][keys + ["bin"]]
    routes = routes.merge(tokens, on=keys)
    routes["p"] = np.exp(routes["logprob"])
    routes["set"] = routes["experts"].map(lambda e: tuple(sorted(int(x) for x in e)))
    standard = routes[routes["route"] == 0][keys + ["set", "p"]].rename(columns={"set": "rejected", "p": "p_rejected"})
    alternatives = routes[(routes["route"] > 0) & ~routes["duplicate"]].merge(standard, on=keys)
    alternatives = alternatives[(alternatives["set"] != alternatives["rejected"])
                                & (alternatives["p"] - alternatives["p_rejected"] >= margin)]
    pairs = alternatives.rename(columns={"set": "preferred", "p": "p_preferred"})
    columns = ["trajectory_id", "position", "preferred", "rejected", "p_preferred", "p_rejected", "bin"]
    pairs = pairs[columns].sort_values(["trajectory_id", "position", "preferred"]).reset_index(drop=True)
    pairs["preferred"] = pairs["preferred"].map(list)
    pairs["rejected"] = pairs["rejected"].map(list)
    return pairs


@torch.no_grad()
def router_inputs(adapter: MoEAdapter, layer: int, sequences: dict[str, list[int]],
                  wanted: dict[str, list[int]]) -> tuple[dict[tuple[str, int], torch.Tensor], int]:
    """The input of the router at `layer` for the wanted positions of each sequence, from
    one natural forward each: {(id, position): [d]}, and the router input's rank (2 or 3)."""
    captured, rank = {}, {}
    router = adapter.routers[layer]

    def hook(module, args):
        captured["x"] = args[0].detach()
        rank["dims"] = args[0].dim()

    handle = router.register_forward_pre_hook(hook)
    out = {}
    try:
        for sequence_id, positions in wanted.items():
            ids = torch.tensor([sequences[sequence_id]], device=adapter.device)
            adapter.model(ids, use_cache=False, logits_to_keep=1)
            x = captured["x"].reshape(-1, captured["x"].shape[-1])
            for position in positions:
                out[(sequence_id, position)] = x[position]
    finally:
        handle.remove()
    return out, rank.get("dims", 2)


def _router_output(adapter: MoEAdapter, layer: int, x: torch.Tensor, rank: int, parameters=None) -> tuple:
    """(logits, weights, experts) of the router at `layer` for inputs x [N, d], given as the
    router takes them (rank 3: one batch row; plus what its block passes in, e.g. MiniMax-M2's
    bias), with `parameters` in place of its own if given."""
    router = adapter.routers[layer]
    inputs = (x[None] if rank == 3 else x, *adapter.router_extra_args(layer))
    return functional_call(router, parameters, inputs) if parameters is not None else router(*inputs)


def router_logits(adapter: MoEAdapter, layer: int, x: torch.Tensor, rank: int, parameters=None) -> torch.Tensor:
    """The raw logits [N, E] of the router at `layer` for inputs x [N, d] (with `parameters` in place of its own)."""
    return _router_output(adapter, layer, x, rank, parameters)[0].reshape(x.shape[0], -1)


# ---------------------------------------------------------------------------- training
def parameter_hashes(model: torch.nn.Module) -> dict[str, str]:
    """sha256 of every parameter and buffer's bytes."""
    return {name: hashlib.sha256(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())}


def train_router(adapter: MoEAdapter, layer: int, inputs: torch.Tensor, rank: int, preferred: torch.Tensor,
                 rejected: torch.Tensor, config: RouterUpdateConfig, log_path: str | None = None,
                 show_progress: bool = True) -> dict[str, torch.Tensor]:
    """DPO on routes for the router at `layer`: returns its new parameters (fp32 masters).
    inputs [N, d]; preferred/rejected [N, k]. One JSON line per step goes to `log_path`."""
    from routelens.progress import progress_bar

    router = adapter.routers[layer]
    master = {name: p.detach().float().clone().requires_grad_(True) for name, p in router.named_parameters()}
    frozen = {name: p.detach().float().clone() for name, p in router.named_parameters()}
    x = inputs.float()

    def log_probs(parameters) -> tuple[torch.Tensor, torch.Tensor]:
        log_weights = route_log_weights(adapter, router_logits(adapter, layer, x, rank, parameters), layer)
        return (plackett_luce_set_log_prob(log_weights, preferred), plackett_luce_set_log_prob(log_weights, rejected))

    with torch.no_grad():
        reference_w, reference_l = log_probs(frozen)
    optimizer = torch.optim.Adam(master.values(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    log = open(log_path, "w", encoding="utf-8") if log_path else None
    try:
        with progress_bar("router update", config.steps, 0, show_progress, unit="steps") as advance:
            for step in range(config.steps):
                batch = torch.randperm(len(x), generator=generator)[: config.batch_size].to(x.device)
                log_weights = route_log_weights(adapter, router_logits(adapter, layer, x[batch], rank, master), layer)
                margin = ((plackett_luce_set_log_prob(log_weights, preferred[batch]) - reference_w[batch])
                          - (plackett_luce_set_log_prob(log_weights, rejected[batch]) - reference_l[batch]))
                loss = -torch.nn.functional.logsigmoid(config.beta * margin).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if log:
                    log.write(json.dumps({"step": step + 1, "loss": float(loss.detach()), "reward_margin": float(margin.detach().mean()),
                                          "preference_accuracy": float((margin > 0).float().mean())}) + "\n")
                advance(1)
    finally:
        if log:
            log.close()
    return {name: tensor.detach() for name, tensor in master.items()}


def preference_accuracy(adapter: MoEAdapter, layer: int, inputs: torch.Tensor, rank: int, preferred: torch.Tensor,
                        rejected: torch.Tensor) -> float:
    """Share of pairs where the current router gives the preferred route the higher PL probability."""
    with torch.no_grad():
        log_weights = route_log_weights(adapter, router_logits(adapter, layer, inputs, rank), layer)
        return float((plackett_luce_set_log_prob(log_weights, preferred)
                      > plackett_luce_set_log_prob(log_weights, rejected)).double().mean())


# ---------------------------------------------------------------------------- the command
def _check_same_model(run: dict, run_dir: str, loaded) -> int:
    layer = loaded.adapter.moe_layers[-1]
    check_same_model(run, run_dir, loaded, "router-update")
    if layer not in run["config"]["resolved_layers"]:
        raise SettingError(f"{run_dir} scored `layers` {run['config']['resolved_layers']}, not the last MoE layer {layer}; "
                           "re-run the counterfactual analysis with `layers` -1", "layers")
    return layer


def _sequences_of(run: dict, run_dir: str, loaded) -> dict[str, list[int]]:
    return {tid: t.input_ids for tid, t in run_trajectories(run, run_dir, loaded, "router-update").items()}


def route_changes(loaded, run_dir: str, base: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict:
    """Share of tokens (per bin) of another counterfactual run whose standard route at the
    last MoE layer changes from the `base` to the `new` router parameters (short names)."""
    run = counterfactual_run(run_dir, "router-update")
    layer = _check_same_model(run, run_dir, loaded)
    tokens = pd.read_parquet(os.path.join(run_dir, "tokens.parquet"))
    tokens = tokens[tokens["layer"] == layer]
    sequences = _sequences_of(run, run_dir, loaded)
    wanted = tokens.groupby("trajectory_id")["position"].apply(list).to_dict()
    inputs, rank = router_inputs(loaded.adapter, layer, sequences, wanted)
    x = torch.stack([inputs[(t, p)] for t, p in zip(tokens["trajectory_id"], tokens["position"])])

    def routes(parameters) -> torch.Tensor:
        parameters = {k: v.to(x.device, x.dtype) for k, v in parameters.items()}
        return _router_output(loaded.adapter, layer, x, rank, parameters)[2].reshape(len(x), -1).sort(-1).values

    with torch.no_grad():
        before, after = routes(base), routes(new)
    changed = (before != after).any(-1).cpu().numpy()
    result = {"run": os.path.abspath(run_dir), "layer": layer}
    for name in ("Fragile", "Ambiguous", "Confident"):
        mask = (tokens["bin"] == name).to_numpy()
        result[name] = {"tokens": int(mask.sum()), "route_changed": int(changed[mask].sum()),
                        "share": float(changed[mask].mean()) if mask.any() else None}
    result["All"] = {"tokens": int(len(changed)), "route_changed": int(changed.sum()), "share": float(changed.mean())}
    return result


def _set_router(adapter: MoEAdapter, layer: int, parameters: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, parameter in adapter.routers[layer].named_parameters():
            parameter.copy_(parameters[name].to(parameter.dtype))


def run_router_update(loaded, counterfactual_dir: str, config: RouterUpdateConfig, out: str,
                      heldout_dir: str | None = None, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Preferences -> DPO on the final router -> `router_delta.safetensors`, `pairs.parquet`,
    `training_log.jsonl`, `summary.json` and `run.json` in `out`; returns the completed
    `RunFolder`. The loaded model's router is left unchanged."""
    from routelens.models.router_delta import router_parameter_names, save_router_delta
    from routelens.results.run_folder import RunFolder

    config.check()
    adapter = loaded.adapter
    run = counterfactual_run(counterfactual_dir, "router-update")
    layer = _check_same_model(run, counterfactual_dir, loaded)
    pairs = preference_pairs(counterfactual_dir, layer, config.margin, config.bins)
    if pairs.empty:
        raise SettingError(f"no preference pair in {counterfactual_dir}: no alternative beats the standard route by "
                           f"{config.margin} in bins {', '.join(config.bins)}; lower `margin` or score more trajectories", "margin")
    run_config = {**loaded.identity(), "dtype": loaded.dtype, "counterfactual": os.path.abspath(counterfactual_dir),
                  "layer": layer, **asdict(config), "heldout_counterfactual": heldout_dir and os.path.abspath(heldout_dir)}
    folder = RunFolder(out, "router-update", run_config, (), overwrite=overwrite,
                       extra={"model": adapter.describe(), "device": loaded.device})
    started = time.perf_counter()
    pairs.to_parquet(os.path.join(out, "pairs.parquet"), index=False)
    sequences = _sequences_of(run, counterfactual_dir, loaded)
    wanted = pairs.groupby("trajectory_id")["position"].apply(lambda p: sorted(set(p))).to_dict()
    inputs, rank = router_inputs(adapter, layer, sequences, wanted)
    x = torch.stack([inputs[(t, p)] for t, p in zip(pairs["trajectory_id"], pairs["position"])])
    preferred = torch.tensor(pairs["preferred"].tolist(), device=x.device)
    rejected = torch.tensor(pairs["rejected"].tolist(), device=x.device)

    names = router_parameter_names(adapter, layer)
    base = {name: p.detach().clone() for name, p in adapter.routers[layer].named_parameters()}
    hashes_before = parameter_hashes(adapter.model)
    accuracy_before = preference_accuracy(adapter, layer, x, rank, preferred, rejected)
    torch.manual_seed(config.seed)
    new = train_router(adapter, layer, x, rank, preferred, rejected, config,
                       os.path.join(out, "training_log.jsonl"), show_progress)
    _set_router(adapter, layer, new)
    try:
        hashes_after = parameter_hashes(adapter.model)
        changed = sorted(n for n in hashes_before if hashes_before[n] != hashes_after[n])
        outside = [n for n in changed if n not in names]
        if outside:
            raise RuntimeError(f"the router update changed parameters outside the router: {outside[:5]}")
        accuracy_after = preference_accuracy(adapter, layer, x, rank, preferred, rejected)
        delta_path = os.path.join(out, "router_delta.safetensors")   # the router's current (updated) parameters
        save_router_delta(delta_path, adapter, layer, dict(zip(names, base.values())), loaded.spec,
                          extra={"counterfactual": os.path.abspath(counterfactual_dir), "config": asdict(config)})
    finally:   # the model is left as it came: the update lives in the delta file (apply it with --router-delta)
        _set_router(adapter, layer, base)
    steps = [json.loads(line) for line in open(os.path.join(out, "training_log.jsonl"), encoding="utf-8")]
    summary = {
        "analysis": "router-update", "layer": layer, "pairs": int(len(pairs)),
        "pair_tokens": int(pairs.groupby(["trajectory_id", "position"]).ngroups),
        "pairs_by_bin": {b: int((pairs["bin"] == b).sum()) for b in config.bins},
        "preference_accuracy_before": accuracy_before, "preference_accuracy_after": accuracy_after,
        "loss_first_step": steps[0]["loss"], "loss_last_step": steps[-1]["loss"],
        "parameters_checked": len(hashes_before), "parameters_changed": changed,
        "only_router_changed": not outside, "router_changed": bool(changed),
        "router_delta": delta_path,
    }
    if heldout_dir:
        summary["heldout_route_changes"] = route_changes(loaded, heldout_dir, base, new)
    folder.complete(summary, extra={"timings": {"seconds": round(time.perf_counter() - started, 3)}})
    return folder
