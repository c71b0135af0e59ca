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

Training is resumable: its steps run through the one run loop in units of
`STEPS_PER_UNIT`, each writing its rows of the training log and a checkpoint (the fp32
masters, Adam's state, the minibatch generator's state) that the next unit starts from, so
a run cut off by a kill continues from its last checkpoint to the result of an
uninterrupted run, bit for bit. The units follow one another: there is no Ray execution.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.func import functional_call

from routelens.analyses.counterfactual.input import check_same_model, counterfactual_run, run_trajectories
from routelens.analyses.router_update.config import RouterUpdateConfig
from routelens.distributed import UnitJob
from routelens.errors import SettingError
from routelens.models.adapter import MoEAdapter
from routelens.results.stored import read_table_file


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
    routes = read_table_file(os.path.join(run_dir, "routes.parquet"))
    tokens = read_table_file(os.path.join(run_dir, "tokens.parquet"))
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
    output = functional_call(router, parameters, inputs) if parameters is not None else router(*inputs)
    return adapter.route_of(output)   # a router with an output layout of its own (Llama 4, JetMoE), mapped


def router_logits(adapter: MoEAdapter, layer: int, x: torch.Tensor, rank: int, parameters=None) -> torch.Tensor:
    """The raw logits [N, E] of the router at `layer` for inputs x [N, d] (with `parameters` in place of its own)."""
    return _router_output(adapter, layer, x, rank, parameters)[0].reshape(x.shape[0], -1)


# ---------------------------------------------------------------------------- training
def parameter_hashes(model: torch.nn.Module) -> dict[str, str]:
    """sha256 of every parameter and buffer's bytes."""
    return {name: hashlib.sha256(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())}


@dataclass
class Preferences:
    """What DPO trains on: the router inputs of the pairs' tokens x [N, d] (`rank`: how the
    router takes them, 2 or 3), and the preferred and rejected routes [N, k]."""

    x: torch.Tensor
    rank: int
    preferred: torch.Tensor
    rejected: torch.Tensor


def encode_state(state: dict) -> bytes:
    """A training state (fp32 masters, Adam's state, the minibatch generator's state) as bytes,
    every tensor on the CPU: what a unit's checkpoint stores."""
    buffer = io.BytesIO()
    torch.save(_to_cpu(state), buffer)
    return buffer.getvalue()


def decode_state(data: bytes) -> dict:
    """The training state `encode_state` wrote (tensors on the CPU, bit for bit)."""
    return torch.load(io.BytesIO(data), weights_only=True)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class RouterTrainer:
    """DPO on routes for the router at `layer`, run any number of steps from a training state
    and returning the next one, so training cut into pieces (resumable units) takes exactly
    the steps of one uninterrupted run. The model itself is never modified: the router runs
    on fp32 master copies of its parameters (`functional_call`)."""

    def __init__(self, adapter: MoEAdapter, layer: int, data: Preferences, config: RouterUpdateConfig):
        self.adapter, self.layer, self.data, self.config = adapter, layer, data, config
        self.router = adapter.routers[layer]
        self.x = data.x.float()
        frozen = {name: p.detach().float().clone() for name, p in self.router.named_parameters()}
        with torch.no_grad():   # the frozen original router is DPO's reference, computed once
            self.reference_w, self.reference_l = self._log_probs(self.x, frozen, data.preferred, data.rejected)

    def _log_probs(self, x: torch.Tensor, parameters: dict, preferred: torch.Tensor, rejected: torch.Tensor) -> tuple:
        log_weights = route_log_weights(self.adapter, router_logits(self.adapter, self.layer, x, self.data.rank,
                                                                    parameters), self.layer)
        return plackett_luce_set_log_prob(log_weights, preferred), plackett_luce_set_log_prob(log_weights, rejected)

    def initial_state(self) -> dict:
        """The state before step 1: the router's own parameters, a fresh Adam, the seeded generator."""
        return {"master": {name: p.detach().float().clone() for name, p in self.router.named_parameters()},
                "optimizer": None, "generator": torch.Generator().manual_seed(self.config.seed).get_state()}

    def train(self, state: dict, first_step: int, steps: int, advance=lambda n: None) -> tuple[list[dict], dict]:
        """Steps first_step + 1 .. first_step + steps from `state`: (one log row per step, the state after)."""
        device = next(self.router.parameters()).device
        master = {name: t.to(device).clone().requires_grad_(True) for name, t in state["master"].items()}
        optimizer = torch.optim.Adam(master.values(), lr=self.config.lr)
        if state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        generator = torch.Generator()
        generator.set_state(state["generator"])
        rows = []
        with torch.enable_grad():   # the run's jobs make no graph (distributed.UnitJob); training needs one
            for i in range(steps):
                rows.append(self._step(master, optimizer, generator, first_step + i + 1))
                advance(1)
        return rows, {"master": {name: t.detach() for name, t in master.items()}, "optimizer": optimizer.state_dict(),
                      "generator": generator.get_state()}

    def _step(self, master: dict, optimizer, generator: torch.Generator, step: int) -> dict:
        """One optimizer step on a minibatch of pairs; its log row."""
        config, x = self.config, self.x
        batch = torch.randperm(len(x), generator=generator)[: config.batch_size].to(x.device)
        preferred, rejected = self._log_probs(x[batch], master, self.data.preferred[batch], self.data.rejected[batch])
        margin = (preferred - self.reference_w[batch]) - (rejected - self.reference_l[batch])
        loss = -torch.nn.functional.logsigmoid(config.beta * margin).mean()
        optimizer.zero_grad()
        loss.backward()   # (the step runs under torch.enable_grad: jobs run without grad)
        optimizer.step()
        return {"step": step, "loss": float(loss.detach()), "reward_margin": float(margin.detach().mean()),
                "preference_accuracy": float((margin > 0).float().mean())}


def train_router(adapter: MoEAdapter, layer: int, inputs: torch.Tensor, rank: int, preferred: torch.Tensor,
                 rejected: torch.Tensor, config: RouterUpdateConfig, log_path: str | None = None,
                 show_progress: bool = True) -> dict[str, torch.Tensor]:
    """DPO on routes for the router at `layer`, all steps at once: returns its new parameters
    (fp32 masters). inputs [N, d]; preferred/rejected [N, k]. One JSON line per step goes to `log_path`."""
    from routelens.progress import progress_bar

    trainer = RouterTrainer(adapter, layer, Preferences(inputs, rank, preferred, rejected), config)
    with progress_bar("router update", config.steps, 0, show_progress, unit="steps") as advance:
        rows, state = trainer.train(trainer.initial_state(), 0, config.steps, advance)
    if log_path:
        write_training_log(log_path, rows)
    return state["master"]


def write_training_log(path: str, rows: list[dict]) -> None:
    """training_log.jsonl: one JSON line per step (step, loss, reward_margin, preference_accuracy)."""
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)


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


def route_changes(loaded, run_dir: str, base: dict[str, torch.Tensor], new: dict[str, torch.Tensor],
                  seed: int = 0, resamples: int = 2000) -> tuple[dict, pd.DataFrame]:
    """The update checked on its own claim, on another counterfactual run's tokens at the
    last MoE layer: which standard routes change from the `base` to the `new` router
    parameters (short names), per bin, and whether the changed routes are better. Each
    changed token is scored under its old route (route 0 of that run, as applied) and its
    new route (the updated router's experts, weighted by the gating rule on its logits),
    forced at that token and layer only, in one pass of the fast engine (which checks the
    old route against the natural forward). Returns the summary block and one row per
    changed token (`heldout_changes.parquet`)."""
    from routelens.analyses.counterfactual.analysis import win_loss_sign_test, with_clusters
    from routelens.engine import make_engine
    from routelens.engine.items import ScoreItem
    from routelens.stats import cluster_interval

    run = counterfactual_run(run_dir, "router-update")
    layer = _check_same_model(run, run_dir, loaded)
    adapter = loaded.adapter
    tokens = read_table_file(os.path.join(run_dir, "tokens.parquet"))
    tokens = tokens[tokens["layer"] == layer].reset_index(drop=True)
    sequences = _sequences_of(run, run_dir, loaded)
    wanted = tokens.groupby("trajectory_id")["position"].apply(list).to_dict()
    inputs, rank = router_inputs(adapter, layer, sequences, wanted)
    x = torch.stack([inputs[(t, p)] for t, p in zip(tokens["trajectory_id"], tokens["position"])])

    def routes(parameters) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
        parameters = {k: v.to(x.device, x.dtype) for k, v in parameters.items()}
        logits, weights, experts = _router_output(adapter, layer, x, rank, parameters)
        return logits.reshape(len(x), -1), experts.reshape(len(x), -1).sort(-1).values, weights.dtype

    with torch.no_grad():
        (_, before, applied), (after_logits, after, _) = routes(base), routes(new)   # applied: the weights' dtype
        changed = (before != after).any(-1).cpu().numpy()
        new_weights = adapter.weights_for(after_logits[changed], after[changed])
    frame = tokens.loc[changed, ["trajectory_id", "position", "bin"]
                       + (["problem_id"] if "problem_id" in tokens.columns else [])].reset_index(drop=True)
    frame["new_experts"] = after[changed].cpu().numpy().tolist()
    frame["new_weights"] = new_weights.double().cpu().numpy().tolist()
    frame = _score_old_and_new(adapter, run_dir, layer, sequences, frame, applied, make_engine, ScoreItem)
    tolerance = run["config"].get("win_tolerance", 1e-3)
    result = {"run": os.path.abspath(run_dir), "layer": layer, "win_tolerance": tolerance,
              "definitions": {
                  "route_changed": "tokens whose standard route (expert set) at the layer differs under the updated "
                                   "router",
                  "changed_gain": "mean over changed tokens of p(next token | new route) - p(next token | old route), "
                                  "each forced at that token and layer only (the updated router's experts, weights "
                                  "by the gating rule on its logits); interval: bootstrap over the clusters",
                  "improved / worsened": f"changed tokens whose p rises / falls by more than {tolerance}",
                  "sign_test": "exact sign test over clusters of their changed tokens' mean (improved - worsened)",
              }}
    clustered, unit = with_clusters(frame.assign(layer=layer)) if len(frame) else (frame.assign(cluster=[]), "-")
    result["cluster_unit"] = unit
    difference = clustered["p_new"] - clustered["p_old"] if len(frame) else pd.Series(dtype=float)
    for name in ("Fragile", "Ambiguous", "Confident", "All"):
        mask = (tokens["bin"] == name).to_numpy() if name != "All" else np.ones(len(tokens), dtype=bool)
        at = clustered["bin"] == name if name != "All" else pd.Series(True, index=clustered.index)
        gain = difference[at]
        direction = np.sign(gain.where(gain.abs() > tolerance, 0.0))
        result[name] = {
            "tokens": int(mask.sum()), "route_changed": int(changed[mask].sum()),
            "share": float(changed[mask].mean()) if mask.any() else None,
            "changed_gain": float(gain.mean()) if len(gain) else None,
            "changed_gain_ci": cluster_interval(clustered["cluster"][at], gain, seed, resamples) if len(gain) else
            [None, None],
            "improved": int((direction > 0).sum()), "worsened": int((direction < 0).sum()),
            "tied": int((direction == 0).sum()),
            "sign_test": win_loss_sign_test(clustered["cluster"][at], direction) if len(gain) else None,
        }
    return result, frame


def _score_old_and_new(adapter: MoEAdapter, run_dir: str, layer: int, sequences: dict[str, list[int]],
                       frame: pd.DataFrame, dtype: torch.dtype, make_engine, score_item) -> pd.DataFrame:
    """`frame` (changed tokens with their new route) with the old route as the run applied it
    and p of the next token under each route (weights in the router's output `dtype`, as the
    counterfactual run applies them), forced at that token and layer only."""
    if frame.empty:
        return frame.assign(old_experts=[], old_weights=[], p_old=[], p_new=[])
    routes = read_table_file(os.path.join(run_dir, "routes.parquet"), filters=[("layer", "==", layer), ("route", "==", 0)])
    old = routes.set_index(["trajectory_id", "position"])[["experts", "weights"]]
    keys = list(zip(frame["trajectory_id"], frame["position"]))
    frame["old_experts"] = [list(map(int, old.loc[key, "experts"])) for key in keys]
    frame["old_weights"] = [list(map(float, old.loc[key, "weights"])) for key in keys]
    items, rows = [], []
    for trajectory_id, group in frame.groupby("trajectory_id", sort=False):
        experts = torch.tensor([[o, n] for o, n in zip(group["old_experts"], group["new_experts"])])
        weights = torch.tensor([[o, n] for o, n in zip(group["old_weights"], group["new_weights"])], dtype=torch.float64)
        items.append(score_item(torch.tensor(sequences[trajectory_id]), group["position"].to_numpy(copy=True), experts,
                                weights.to(dtype)))
        rows.append(group.index.to_numpy())
    scored = make_engine("fast", adapter).score_batch(layer, items)
    p = np.zeros((len(frame), 2))
    for index, logprobs in zip(rows, scored):
        p[index] = np.exp(logprobs)
    return frame.assign(p_old=p[:, 0], p_new=p[:, 1])


def _set_router(adapter: MoEAdapter, layer: int, parameters: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, parameter in adapter.routers[layer].named_parameters():
            parameter.copy_(parameters[name].to(parameter.dtype))


# One unit of the run is this many optimizer steps, checkpointed after: a kill loses at most
# one unit's steps, and the resumed run continues from the last checkpoint bit for bit.
STEPS_PER_UNIT = 10
TRAINING_LOG_SCHEMA = pa.schema([("step", pa.int64()), ("loss", pa.float64()), ("reward_margin", pa.float64()),
                                 ("preference_accuracy", pa.float64())])
CHECKPOINT_SCHEMA = pa.schema([("step", pa.int64()), ("state", pa.binary())])


def unit_steps(config: RouterUpdateConfig, unit: int) -> tuple[int, int]:
    """(steps before the unit, steps in it): unit u trains steps u*S + 1 .. min((u+1)*S, steps)."""
    first = unit * STEPS_PER_UNIT
    return first, min(STEPS_PER_UNIT, config.steps - first)


def preference_data(adapter: MoEAdapter, layer: int, pairs: pd.DataFrame, sequences: dict[str, list[int]]) -> Preferences:
    """The router inputs of the pairs' tokens (one natural forward per trajectory) and their routes."""
    wanted = pairs.groupby("trajectory_id")["position"].apply(lambda p: sorted(set(p))).to_dict()
    inputs, rank = router_inputs(adapter, layer, sequences, wanted)
    x = torch.stack([inputs[(t, p)] for t, p in zip(pairs["trajectory_id"], pairs["position"])])
    return Preferences(x, rank, torch.tensor(pairs["preferred"].tolist(), device=x.device),
                       torch.tensor(pairs["rejected"].tolist(), device=x.device))


class RouterUpdateJob(UnitJob):
    """Unit u: the optimizer steps of `unit_steps`, from the state unit u - 1 left (its
    checkpoint part in `out` when this session did not compute it: a resumed run); tables:
    the steps' log rows and the state after them. Training is sequential, so this job runs
    in this process only, one unit after the other."""

    def __init__(self, layer: int, pairs: pd.DataFrame, sequences: dict[str, list[int]], config: RouterUpdateConfig,
                 out: str):
        self.layer, self.pairs, self.sequences, self.config, self.out = layer, pairs, sequences, config, out

    def setup(self, loaded=None) -> None:
        adapter = self.load(loaded).adapter
        self._data = preference_data(adapter, self.layer, self.pairs, self.sequences)
        self._trainer = RouterTrainer(adapter, self.layer, self._data, self.config)
        self._last: tuple[int, bytes] | None = None   # the checkpoint this session wrote last

    @property
    def preferences(self) -> Preferences:
        """The training data `setup` built (the summary scores the trained router on it too)."""
        return self._data

    def run(self, units: list[int]) -> list[dict[str, pa.Table]]:
        return [self._train_unit(unit) for unit in units]

    def _train_unit(self, unit: int) -> dict[str, pa.Table]:
        # every unit after the first starts from decoded bytes, read back or just written: an
        # uninterrupted run and a resumed one take the same path
        before = self._trainer.initial_state() if unit == 0 else decode_state(self._checkpoint(unit - 1))
        first, count = unit_steps(self.config, unit)
        rows, after = self._trainer.train(before, first, count)
        encoded = encode_state(after)
        self._last = (unit, encoded)
        return {"training_log": pa.Table.from_pylist(rows, schema=TRAINING_LOG_SCHEMA),
                "checkpoint": pa.Table.from_pylist([{"step": first + count, "state": encoded}], schema=CHECKPOINT_SCHEMA)}

    def _checkpoint(self, unit: int) -> bytes:
        """The training state after `unit`, from this session or from the run folder."""
        if self._last is not None and self._last[0] == unit:
            return self._last[1]
        from routelens.results.run_folder import part_path

        return pq.read_table(part_path(self.out, "checkpoint", unit)).column("state")[0].as_py()


def _changed_parameters(adapter: MoEAdapter, names, hashes_before: dict[str, str]) -> list[str]:
    """The parameters and buffers whose hash differs from `hashes_before`; an error if any is
    not one of the router's `names`."""
    hashes_after = parameter_hashes(adapter.model)
    changed = sorted(n for n in hashes_before if hashes_before[n] != hashes_after[n])
    outside = [n for n in changed if n not in names]
    if outside:
        raise RuntimeError(f"the router update changed parameters outside the router: {outside[:5]}")
    return changed


def _log_rows(frame: pd.DataFrame) -> list[dict]:
    return [{"step": int(r.step), "loss": float(r.loss), "reward_margin": float(r.reward_margin),
             "preference_accuracy": float(r.preference_accuracy)} for r in frame.itertuples(index=False)]


def run_router_update(loaded, counterfactual_dir: str, config: RouterUpdateConfig, out: str,
                      heldout_dir: str | None = None, overwrite: bool = False, show_progress: bool = True):
    """Preferences -> DPO on the final router -> `router_delta.safetensors`, `pairs.parquet`,
    `training_log.jsonl` (and .parquet), `summary.json` and `run.json` in `out`; returns the
    completed `RunFolder`. Resumable: the steps run in units of `STEPS_PER_UNIT`, each
    checkpointed (fp32 masters, Adam's state, the minibatch generator), so a re-run after a
    kill trains only the steps not done and ends where an uninterrupted run ends. The loaded
    model's router is left unchanged."""
    from routelens.models.router_delta import router_parameter_names, save_router_delta
    from routelens.runs.loop import AnalysisRun, run_analysis

    config.check()
    adapter = loaded.adapter
    run = counterfactual_run(counterfactual_dir, "router-update")
    layer = _check_same_model(run, counterfactual_dir, loaded)
    if heldout_dir:   # read after training: checked now
        _check_same_model(counterfactual_run(heldout_dir, "router-update"), heldout_dir, loaded)
    pairs = preference_pairs(counterfactual_dir, layer, config.margin, config.bins)
    if pairs.empty:
        raise SettingError(f"no preference pair in {counterfactual_dir}: no alternative beats the standard route by "
                           f"{config.margin} in bins {', '.join(config.bins)}; lower `margin` or score more trajectories",
                           "margin")
    run_config = {**loaded.identity(), "dtype": loaded.dtype, "counterfactual": os.path.abspath(counterfactual_dir),
                  "layer": layer, **asdict(config), "heldout_counterfactual": heldout_dir and os.path.abspath(heldout_dir),
                  "steps_per_unit": STEPS_PER_UNIT}
    job = RouterUpdateJob(layer, pairs, _sequences_of(run, counterfactual_dir, loaded), config, out)
    names = router_parameter_names(adapter, layer)
    hashes_before = parameter_hashes(adapter.model)

    def summarise(folder) -> dict:
        data = job.preferences   # built by the job's setup, in this process
        final = decode_state(folder.read("checkpoint")["state"].iloc[-1])["master"]
        base = {name: p.detach().clone() for name, p in adapter.routers[layer].named_parameters()}
        accuracy_before = preference_accuracy(adapter, layer, data.x, data.rank, data.preferred, data.rejected)
        _set_router(adapter, layer, final)
        try:
            changed = _changed_parameters(adapter, names, hashes_before)
            accuracy_after = preference_accuracy(adapter, layer, data.x, data.rank, data.preferred, data.rejected)
            delta_path = folder.claim("router_delta.safetensors")   # the router's current (updated) parameters
            save_router_delta(delta_path, adapter, layer, dict(zip(names, base.values())), loaded.spec,
                              extra={"counterfactual": os.path.abspath(counterfactual_dir), "config": asdict(config)})
        finally:   # the model is left as it came: the update lives in the delta file (apply it with --router-delta)
            _set_router(adapter, layer, base)
        folder.write_table("pairs", pairs)
        steps = _log_rows(folder.read("training_log"))
        write_training_log(folder.claim("training_log.jsonl"), steps)
        summary = {
            "analysis": "router-update", "layer": layer, "pairs": int(len(pairs)),
            "pair_tokens": int(pairs.groupby(["trajectory_id", "position"]).ngroups),
            "pairs_by_bin": {b: int((pairs["bin"] == b).sum()) for b in config.bins},
            "preference_accuracy_before": accuracy_before, "preference_accuracy_after": accuracy_after,
            "loss_first_step": steps[0]["loss"], "loss_last_step": steps[-1]["loss"],
            "parameters_checked": len(hashes_before), "parameters_changed": changed,
            "only_router_changed": True, "router_changed": bool(changed),
            "router_delta": delta_path,
        }
        if heldout_dir:
            changes, frame = route_changes(loaded, heldout_dir, base, final, seed=config.seed)
            changes["same_run_as_training"] = os.path.realpath(heldout_dir) == os.path.realpath(counterfactual_dir)
            summary["heldout_route_changes"] = changes
            folder.write_table("heldout_changes", frame)
        return summary

    units = -(-config.steps // STEPS_PER_UNIT)
    analysis = AnalysisRun(
        kind="router-update", run_config=run_config, tables=("training_log", "checkpoint"), units=units, job=job,
        summarise=summarise, extra={"model": adapter.describe(), "device": loaded.device},
        label="router update", progress_unit="steps", unit_weight=lambda unit: unit_steps(config, unit)[1],
        done_weight=lambda tables: tables["training_log"].num_rows,
        timings=lambda todo, seconds: {"units_this_session": len(todo)})
    return run_analysis(analysis, loaded, out, overwrite=overwrite, show_progress=show_progress)
