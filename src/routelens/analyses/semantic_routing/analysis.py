"""Semantic (fingerprint) routing, evaluated on held-out items against natural routing.

A zero-training alternative to the learned router (paper 2): route by similarity to
per-domain expert fingerprints.

1. Each domain's items are split, seeded, into calibration and evaluation items.
2. Fingerprints, per MoE layer l and domain, over every token of the domain's calibration
   items: the mean router selection distribution (`kind="selection"`, the adapter's
   `selection_distribution`) or the mean MoE input (`kind="input"`). A domain's experts
   at l are the top-k of its mean selection distribution.
3. For an evaluation item and a layer set S (layers forced together), every token at each
   l in S goes to the top-k experts of a domain, weighted by the model's own gating rule on
   the token's natural router logits (equal compute, k experts):
   - `semantic`: the domain whose fingerprint is nearest (cosine) to the item's, computed
     from its prompt tokens alone (what a router sees before the answer);
   - `semantic_token`: each token's nearest domain, from the token's own vector;
   - `oracle`: the item's true domain;
   - `floor`: k experts drawn uniformly per token (seeded, `floor_seeds` seeds).
   Scored as in the isolation study: mean and first target-token log-probability, against
   `natural` routing of the same item (paired).
4. Per layer set x domain x arm: mean score, the paired difference against natural with a
   bootstrap interval over items, Wilcoxon p and Benjamini-Hochberg q over every test; and
   how often the fingerprints classify an evaluation item's domain (per layer; item level
   from the prompt, token level per token).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from routelens import stats
from routelens.analyses.item_batching import batching_checks, groups_of, scored_in_groups
from routelens.analyses.route_sampling import route_rng, uniform_routes
from routelens.analyses.semantic_routing.config import SemanticRouteConfig, check_distinct_sets
from routelens.config import SCORES
from routelens.data.target_items import TargetItem
from routelens.distributed import RaySettings, UnitJob, check_ray_can_load
from routelens.engine.whole_sequence import WholeSequenceScorer
from routelens.errors import RouteLensError
from routelens.models.routing import capture_routes
from routelens.runs.loop import AnalysisRun, run_analysis

ARMS = ("semantic", "semantic_token", "oracle", "floor")
ALL_DOMAINS = "All"
SCORES_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("domain", pa.string()), ("layer_set", pa.string()), ("arm", pa.string()),
    ("floor_seed", pa.int64()), ("predicted", pa.string()), ("mean_logprob", pa.float64()),
    ("first_logprob", pa.float64()),
])
CLASSIFICATION_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("domain", pa.string()), ("layer", pa.int64()), ("predicted", pa.string()),
    ("token_accuracy", pa.float64()),
])
FINGERPRINTS_SCHEMA = pa.schema([
    ("layer", pa.int64()), ("domain", pa.string()), ("experts", pa.list_(pa.int64())), ("centroid", pa.list_(pa.float64())),
])
ACCURACY_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("domain", pa.string()), ("layer_set", pa.string()), ("arm", pa.string()),
    ("floor_seed", pa.int64()), ("completion", pa.string()), ("correct", pa.bool_()),
])


def layer_set_name(layers: list[int]) -> str:
    return "+".join(map(str, layers))


# ---------------------------------------------------------------------------- split and fingerprints
def split_items(items: list[TargetItem], share: float, seed: int) -> tuple[list[TargetItem], list[TargetItem]]:
    """Per domain, a seeded permutation: the first `share` of its items calibrate, the rest
    are evaluated (at least one of each; a domain with fewer than two items is refused)."""
    by_domain: dict[str, list[TargetItem]] = {}
    for item in items:
        by_domain.setdefault(item.domain, []).append(item)
    if len(by_domain) < 2:
        raise RouteLensError(f"semantic routing chooses between domains; the items hold {len(by_domain)} "
                             "(give items of two or more domains)")
    calibration, evaluation = [], []
    for index, (domain, members) in enumerate(sorted(by_domain.items())):
        if len(members) < 2:
            raise RouteLensError(f"domain {domain!r} has {len(members)} item; each domain needs two or more "
                                 "(one to calibrate its fingerprint, one to evaluate)")
        order = np.random.default_rng([seed, index]).permutation(len(members))
        cut = min(len(members) - 1, max(1, round(share * len(members))))
        calibration += [members[i] for i in order[:cut]]
        evaluation += [members[i] for i in order[cut:]]
    return calibration, evaluation


@contextmanager
def moe_inputs(adapter, layers: list[int]):
    """The MoE block's inputs at each of `layers` during the forwards run inside: layer -> the
    input of each call, in order."""
    inputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    hooks = [adapter.moe_block(layer).register_forward_pre_hook(
        lambda module, args, layer=layer: inputs[layer].append(args[0].detach())) for layer in layers]
    try:
        yield inputs
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def token_vectors(adapter, item: TargetItem, layers: list[int], kind: str) -> tuple[dict, dict]:
    """Per layer: each token's vector of the fingerprint kind [T, D] (float64) and its
    selection distribution [T, E] (which defines a domain's experts)."""
    with moe_inputs(adapter, layers) as inputs, capture_routes(adapter, layers) as captured:
        adapter.model(torch.tensor([item.input_ids], device=adapter.device), use_cache=False, logits_to_keep=1)
    selection = {layer: adapter.selection_distribution(captured[layer].logits.float(), layer).cpu() for layer in layers}
    if kind == "selection":
        return selection, selection
    length = len(item.input_ids)
    return {layer: inputs[layer][-1].reshape(length, -1).double().cpu() for layer in layers}, selection


def fingerprints(adapter, calibration: list[TargetItem], layers: list[int], kind: str) -> dict:
    """Per layer: domain names, centroids [D, dim] of the kind, and each domain's top-k experts."""
    sums: dict = {}
    for item in calibration:
        vectors, selection = token_vectors(adapter, item, layers, kind)
        for layer in layers:
            entry = sums.setdefault((layer, item.domain), [0.0, 0.0, 0])
            entry[0] = entry[0] + vectors[layer].sum(0)
            entry[1] = entry[1] + selection[layer].sum(0)
            entry[2] += len(item.input_ids)
    domains = sorted({domain for _, domain in sums})
    out = {}
    for layer in layers:
        centroids = torch.stack([sums[(layer, d)][0] / sums[(layer, d)][2] for d in domains])
        shares = torch.stack([sums[(layer, d)][1] / sums[(layer, d)][2] for d in domains])
        # ties to the lower expert id, as the route sampler's candidates
        order = torch.from_numpy(np.argsort(-shares.numpy(), axis=-1, kind="stable")[:, : adapter.top_k_at(layer)].copy())
        out[layer] = {"domains": domains, "centroids": centroids, "experts": order.sort(-1).values}
    return out


def nearest(vectors: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid by cosine similarity, per row: [N, dim], [D, dim] -> [N]."""
    similarity = torch.nn.functional.normalize(vectors.double(), dim=-1) @ \
        torch.nn.functional.normalize(centroids.double(), dim=-1).T
    return similarity.argmax(-1)


# ---------------------------------------------------------------------------- items
def analyse_item(adapter, scorer: WholeSequenceScorer, item: TargetItem, prints: dict, layer_sets: list[list[int]],
                 config: SemanticRouteConfig) -> dict[str, pa.Table]:
    """The scores (natural and every arm at every layer set) and the classification of one item."""
    return analyse_items(adapter, scorer, [item], prints, layer_sets, config)[0]


def _item_vectors(adapter, natural, inputs: dict, layers: list[int], kind: str, size: int) -> dict:
    """One item's token vectors [T, dim] per layer from its natural pass: the selection
    distribution of its router logits, or its rows of the batch's MoE inputs (`inputs`,
    recorded by `moe_inputs` during the natural forward of `size` padded rows)."""
    if kind == "selection":
        return {layer: adapter.selection_distribution(natural.routes[layer].logits.float(), layer).cpu()
                for layer in layers}
    length, padded = natural.input_ids.shape[0], natural.batch.input_ids.shape[1]
    out = {}
    for layer in layers:
        # the padded batch's own call (a check may run the block again on another shape)
        batch = next((seen for seen in inputs[layer] if seen.numel() == size * padded * seen.shape[-1]), None)
        if batch is None:
            raise RuntimeError(f"the MoE block of layer {layer} saw no input of the natural batch's shape "
                               f"[{size}, {padded}, d]; seen {[tuple(seen.shape) for seen in inputs[layer]]}")
        out[layer] = batch.reshape(size, padded, -1)[natural.row, :length].double().cpu()
    return out


def analyse_items(adapter, scorer: WholeSequenceScorer, items: list[TargetItem], prints: dict,
                  layer_sets: list[list[int]], config: SemanticRouteConfig) -> list[dict[str, pa.Table]]:
    """`analyse_item` for a group of items in one right-padded natural forward, every arm of
    a layer set of all the items sharing the scoring passes (the same numbers as one item at
    a time, to float rounding)."""
    layers = sorted({layer for layer_set in layer_sets for layer in layer_set})
    # selection fingerprints come from the natural pass's router logits; MoE inputs are recorded during it
    with moe_inputs(adapter, layers) if config.kind == "input" else nullcontext({}) as inputs:
        passes = scorer.natural_batch([item.input_ids for item in items], layers,
                                      [item.target_positions for item in items])
    routes, predicted, classification, rows = [], [], [], []
    for item, natural in zip(items, passes):
        vectors = _item_vectors(adapter, natural, inputs, layers, config.kind, len(items))
        item_routes, item_predicted, item_classification = _item_routes(item, vectors, prints, layers)
        routes.append(item_routes)
        predicted.append(item_predicted)
        classification.append(item_classification)
        rows.append([_row(item, "", "natural", None, "", natural.logprobs)])
    for layer_set in layer_sets:
        name = layer_set_name(layer_set)
        conditions = [_conditions(adapter, item, natural, item_routes, item_predicted, layer_set, config)
                      for item, natural, item_routes, item_predicted in zip(items, passes, routes, predicted)]
        scored = scorer.score_batch(passes, list(layer_set), [experts for _, experts, _ in conditions],
                                    [weights for _, _, weights in conditions])
        for item, item_rows, (arms, _, _), values in zip(items, rows, conditions, scored):
            item_rows += [_row(item, name, arm, seed, label, values[c]) for c, (arm, seed, label) in enumerate(arms)]
    return [{"scores": pa.Table.from_pylist(item_rows, schema=SCORES_SCHEMA),
             "classification": pa.Table.from_pylist(item_classification, schema=CLASSIFICATION_SCHEMA)}
            for item_rows, item_classification in zip(rows, classification)]


def _item_routes(item: TargetItem, vectors: dict, prints: dict, layers: list[int]) -> tuple[dict, dict, list[dict]]:
    """An item's expert choice per arm and layer ([T, k]; None: the oracle of a domain without
    a fingerprint), the domain its prompt is nearest per layer, and its classification rows."""
    length, prompt = len(item.input_ids), len(item.prompt_ids)
    routes: dict[str, dict[int, torch.Tensor]] = {arm: {} for arm in ("semantic", "semantic_token", "oracle")}
    predicted: dict[int, str] = {}
    classification = []
    for layer in layers:
        fp = prints[layer]
        item_domain = int(nearest(vectors[layer][:prompt].mean(0, keepdim=True), fp["centroids"])[0])
        token_domains = nearest(vectors[layer], fp["centroids"])
        predicted[layer] = fp["domains"][item_domain]
        routes["semantic"][layer] = fp["experts"][item_domain].expand(length, -1)
        routes["semantic_token"][layer] = fp["experts"][token_domains]
        true = fp["domains"].index(item.domain) if item.domain in fp["domains"] else None
        routes["oracle"][layer] = fp["experts"][true].expand(length, -1) if true is not None else None
        classification.append({"item_id": item.id, "domain": item.domain, "layer": layer, "predicted": predicted[layer],
                               "token_accuracy": float((token_domains[:prompt] == true).double().mean())
                               if true is not None else float("nan")})
    return routes, predicted, classification


def _conditions(adapter, item: TargetItem, natural, routes: dict, predicted: dict, layer_set: list[int],
                config: SemanticRouteConfig) -> tuple[list, torch.Tensor, torch.Tensor]:
    """Every arm of an item at a layer set: each row's (arm, floor seed, predicted label) and
    experts/weights [C, T, J, k], weighted by the gating rule on the natural router logits."""
    length = len(item.input_ids)
    logits = {layer: natural.routes[layer].logits.reshape(length, -1).float().cpu() for layer in layer_set}
    arms, experts = [], []
    for arm in ("semantic", "semantic_token", "oracle"):
        if any(routes[arm][layer] is None for layer in layer_set):
            continue
        arms.append((arm, None, "|".join(predicted[layer] for layer in layer_set) if arm == "semantic" else ""))
        experts.append(torch.stack([routes[arm][layer] for layer in layer_set], dim=1))          # [T, J, k]
    for seed in range(config.floor_seeds):
        arms.append(("floor", seed, ""))
        experts.append(torch.stack([torch.from_numpy(uniform_routes(length, adapter.num_experts, adapter.top_k_at(layer),
                                                                    route_rng(config.seed, layer, item.id, seed)))
                                    for layer in layer_set], dim=1))
    experts = torch.stack(experts).long()                                                         # [C, T, J, k]
    # the gating rule on each token's natural router logits, per layer for every condition at once (row by row)
    count, k = len(arms), experts.shape[-1]
    weights = torch.stack([adapter.weights_for(logits[layer].repeat(count, 1), experts[:, :, j].reshape(-1, k))
                           .float().reshape(count, length, k) for j, layer in enumerate(layer_set)], dim=2)
    return arms, experts, weights


def _row(item: TargetItem, layer_set: str, arm: str, floor_seed, predicted: str, logprobs: np.ndarray) -> dict:
    return {"item_id": item.id, "domain": item.domain, "layer_set": layer_set, "arm": arm, "floor_seed": floor_seed,
            "predicted": predicted, "mean_logprob": float(np.mean(logprobs)), "first_logprob": float(logprobs[0])}


# ---------------------------------------------------------------------------- accuracy (generation)
GENERATION_CHUNK = 64   # items generated together (one batch: a batch row is an item)


def _item_answer(tokenizer, item: TargetItem) -> int | None:
    """The arithmetic task's answer, read off the item's worked solution ('...#<int>')."""
    from routelens.data.arithmetic import verify

    text = tokenizer.decode(item.target_ids, skip_special_tokens=True)
    return verify(text, 0).predicted if "#" in text else None


def _rule(arm: str, layer: int, prints: dict, chunk: list[TargetItem], predicted: dict, kind: str, adapter,
          seed: int, floor_seed: int | None):
    """The expert choice of one arm at one layer for a batch of items (row b = chunk[b])."""
    fp = prints[layer]
    fixed = None
    if arm in ("semantic", "oracle"):
        domains = [predicted[(item.id, layer)] if arm == "semantic" else item.domain for item in chunk]
        fixed = torch.stack([fp["experts"][fp["domains"].index(d)] for d in domains])          # [B, k]
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, layer, floor_seed or 0]).generate_state(1)[0]))

    def rule(logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        rows = logits.shape[0]
        if fixed is not None:
            return fixed.repeat_interleave(rows // len(chunk), dim=0)
        if arm == "floor":   # k experts uniformly per token, from the run's seeded stream
            return torch.rand(rows, adapter.num_experts, generator=generator).argsort(-1)[:, : adapter.top_k_at(layer)].sort(-1).values
        vectors = adapter.selection_distribution(logits.float(), layer).cpu() if kind == "selection" else \
            hidden.reshape(rows, -1).double().cpu()
        return fp["experts"][nearest(vectors, fp["centroids"])]                                   # semantic_token

    return rule


def accuracy_rows(adapter, tokenizer, items: list[TargetItem], prints: dict, predicted: dict,
                  layer_sets: list[list[int]], config: SemanticRouteConfig) -> list[dict]:
    """Greedy completions of the evaluation items under natural routing and under every arm
    at every layer set (the rule applied to every prompt and generated token), checked
    against the item's answer: one row per (item, layer set, arm[, floor seed])."""
    from routelens.data.arithmetic import verify
    from routelens.generation import sample_completions
    from routelens.models.routing import route_by_rule

    answers = {item.id: _item_answer(tokenizer, item) for item in items}
    arms = [("natural", None, "")] + [(arm, None, name) for name in map(layer_set_name, layer_sets)
                                      for arm in ("semantic", "semantic_token", "oracle")] + \
        [("floor", s, name) for name in map(layer_set_name, layer_sets) for s in range(config.floor_seeds)]
    sets = {layer_set_name(layer_set): layer_set for layer_set in layer_sets}
    rows = []
    for arm, floor_seed, name in arms:
        for start in range(0, len(items), GENERATION_CHUNK):
            chunk = items[start: start + GENERATION_CHUNK]
            rules = {} if arm == "natural" else {
                layer: _rule(arm, layer, prints, chunk, predicted, config.kind, adapter, config.seed, floor_seed)
                for layer in sets[name]}
            with route_by_rule(adapter, rules) if rules else nullcontext():
                samples = sample_completions(adapter.model, tokenizer, [item.prompt_ids for item in chunk], greedy=True,
                                             max_new_tokens=config.max_new_tokens, batch_size=len(chunk),
                                             show_progress=False)
            for sample in samples:
                item = chunk[sample.prompt_index]
                rows.append({"item_id": item.id, "domain": item.domain, "layer_set": name, "arm": arm,
                             "floor_seed": floor_seed, "completion": sample.completion,
                             "correct": answers[item.id] is not None and verify(sample.completion, answers[item.id]).correct})
    return rows


def summarise_accuracy(accuracy: pd.DataFrame, layer_sets: list[list[int]], config: SemanticRouteConfig) -> dict:
    """Per layer set x domain (and All) x arm: accuracy, the paired difference against natural
    routing with a bootstrap interval over items, and the exact McNemar p (a binomial test of
    the discordant items; floor: its first seed)."""
    from scipy.stats import binomtest

    natural = accuracy[accuracy["arm"] == "natural"].set_index("item_id")
    out = {}
    for name in map(layer_set_name, layer_sets):
        block = {}
        for domain in (*sorted(natural["domain"].unique()), ALL_DOMAINS):
            ids = natural.index if domain == ALL_DOMAINS else natural.index[natural["domain"] == domain]
            base = natural["correct"][ids].astype(float)
            entry = {"items": int(len(ids)), "natural": float(base.mean())}
            for arm in ARMS:
                at = accuracy[(accuracy["layer_set"] == name) & (accuracy["arm"] == arm)
                              & ((accuracy["floor_seed"] == 0) | (arm != "floor"))].set_index("item_id")
                if at.empty:
                    continue
                values = at["correct"].reindex(ids).astype(float)
                difference = (values - base).to_numpy()
                better, worse = int((difference > 0).sum()), int((difference < 0).sum())
                entry[arm] = {"accuracy": float(values.mean()), "difference": float(difference.mean()),
                              "ci": stats.mean_interval(difference, seed=config.seed,
                                                        n_resamples=config.bootstrap_resamples),
                              "better": better, "worse": worse,
                              "p_value": 1.0 if better + worse == 0 else float(binomtest(better, better + worse).pvalue)}
            block[domain] = entry
        out[name] = block
    return out


# ---------------------------------------------------------------------------- summary
def summarise(scores: pd.DataFrame, classification: pd.DataFrame, layer_sets: list[list[int]],
              config: SemanticRouteConfig, score: str = "mean") -> dict:
    """Per layer set x domain (and All) x arm: mean score and the paired difference against
    natural (floor: the mean over its seeds), q-values over every test; classification."""
    column = SCORES[score]
    natural_rows = scores[scores["arm"] == "natural"].set_index("item_id")
    natural = natural_rows[column]
    domains = sorted(scores["domain"].unique())
    out, tests = {}, []
    for layer_set in layer_sets:
        name = layer_set_name(layer_set)
        at = scores[scores["layer_set"] == name]
        per_arm = at.groupby(["arm", "item_id"])[column].mean()     # floor: mean over seeds
        block = {}
        for domain in (*domains, ALL_DOMAINS):
            ids = natural.index if domain == ALL_DOMAINS else natural.index[natural_rows["domain"] == domain]
            entry = {"items": int(len(ids)), "natural": float(natural[ids].mean())}
            for arm in ARMS:
                if arm not in per_arm.index.get_level_values(0):
                    continue
                values = per_arm[arm].reindex(ids)
                kept = values.notna().to_numpy()
                if not kept.any():
                    continue
                test = stats.paired_test((values - natural[ids]).to_numpy()[kept], seed=config.seed,
                                         n_resamples=config.bootstrap_resamples)
                entry[arm] = {"score": float(values[kept].mean()), **test}
                tests.append(entry[arm])
            block[domain] = entry
        out[name] = block
    q_values = stats.bh_qvalues(np.array([t["p_value"] for t in tests])) if tests else []
    for test, q in zip(tests, q_values):
        test["q_value"] = float(q)
        test["significant"] = bool(q <= config.alpha)
    accuracy = {}
    for layer, at in classification.groupby("layer"):
        accuracy[str(layer)] = {"item": float((at["predicted"] == at["domain"]).mean()),
                                "token": float(at["token_accuracy"].mean()),
                                "by_domain": {d: float((g["predicted"] == g["domain"]).mean())
                                              for d, g in at.groupby("domain")}}
    return {"analysis": "semantic-routing", "kind": config.kind, "score": f"{column} (nats)",
            "arms": {"semantic": "every token to the top-k experts of the domain nearest the item's prompt fingerprint",
                     "semantic_token": "each token to the top-k experts of the domain nearest its own vector",
                     "oracle": "every token to the top-k experts of the item's true domain",
                     "floor": f"k experts uniformly at random per token, mean over {config.floor_seeds} seeds"},
            "interval": f"paired differences against natural routing: 95% percentile bootstrap over items "
                        f"({config.bootstrap_resamples} resamples), Wilcoxon signed-rank p, Benjamini-Hochberg q over "
                        "every test of this summary",
            "alpha": config.alpha, "layer_sets": out, "classification": accuracy}


# ---------------------------------------------------------------------------- the run
def run_semantic_routing(loaded, items: list[TargetItem], config: SemanticRouteConfig, out: str | None,
                         data_info: dict, overwrite: bool = False, show_progress: bool = True,
                         ray: RaySettings | None = None):
    """Calibrate the fingerprints, then score every evaluation item under every arm into the
    run folder `out` (resumable; in memory when None); return the completed run. Units are
    chunks of evaluation items (one generation batch each); with `ray` they are scored by a
    pool of Ray actors, each calibrating the (deterministic) fingerprints itself."""
    check_ray_can_load(loaded, ray)
    adapter = loaded.adapter
    if config.layer_sets:
        resolved = [[adapter.resolve_layers([layer])[0] for layer in s] for s in config.layer_sets]
        check_distinct_sets(config.layer_sets, resolved)   # 3 and -1 may be one layer
        layer_sets = [sorted(s) for s in resolved]
    else:
        one_k = len(set(adapter.top_ks.values())) == 1   # a joint set forces one route shape [T, J, k]
        layer_sets = [[layer] for layer in adapter.moe_layers] + (
            [list(adapter.moe_layers)] if len(adapter.moe_layers) > 1 and one_k else [])
    for layer_set in layer_sets:
        adapter.one_top_k(layer_set, f"the layer set {layer_set_name(layer_set)} (routes forced at its layers at once)")
    layers = sorted({layer for layer_set in layer_sets for layer in layer_set})
    calibration, evaluation = split_items(items, config.calibration_share, config.seed)
    if config.accuracy and (loaded.tokenizer is None or any(_item_answer(loaded.tokenizer, i) is None for i in evaluation)):
        raise RouteLensError("accuracy needs items whose target ends in the arithmetic task's '#<answer>' and a "
                             "tokenizer; pass --no-accuracy for other items")
    run_config = {**loaded.identity(), "dtype": loaded.dtype, **data_info, **config.identity(),
                  "resolved_layer_sets": layer_sets, "calibration_items": [i.id for i in calibration],
                  "unit": f"{GENERATION_CHUNK} evaluation items"}
    tables = ("fingerprints", "scores", "classification") + (("accuracy",) if config.accuracy else ())
    chunks = (len(evaluation) + GENERATION_CHUNK - 1) // GENERATION_CHUNK
    run = AnalysisRun(
        kind="semantic-routing", run_config=run_config, tables=tables, units=chunks,
        job=SemanticRoutingJob(calibration, evaluation, layers, layer_sets, config),
        summarise=lambda folder: _summary(folder, calibration, evaluation, layer_sets, config),
        extra={"model": adapter.describe(), "device": loaded.device,
               "summary_settings": {k: getattr(config, k) for k in config.SUMMARY},
               "performance": {k: getattr(config, k) for k in config.PERFORMANCE}},
        label="semantic routing", unit_weight=lambda unit: len(evaluation_chunk(evaluation, unit)),
        done_weight=lambda unit: unit["classification"].num_rows // len(layers),
        timings=lambda todo, seconds: {"chunks_scored_this_session": len(todo)})
    return run_analysis(run, loaded, out, overwrite=overwrite, show_progress=show_progress, ray=ray)


class SemanticRoutingJob(UnitJob):
    """Every arm of a chunk of evaluation items (units: chunk indices), and with `accuracy`
    their greedy answers under every arm. `setup` calibrates the fingerprints on the model
    this process holds (deterministic: every process and every resume gets the same);
    chunk 0 also returns them as the `fingerprints` table."""

    def __init__(self, calibration: list[TargetItem], evaluation: list[TargetItem], layers: list[int],
                 layer_sets: list[list[int]], config: SemanticRouteConfig):
        self.calibration, self.evaluation, self.layers, self.layer_sets, self.config = \
            calibration, evaluation, layers, layer_sets, config

    def setup(self, loaded=None) -> None:
        self._loaded = self.load(loaded)
        self._scorer = WholeSequenceScorer(self._loaded.adapter, memory_budget=self.config.memory_budget)
        self._prints = fingerprints(self._loaded.adapter, self.calibration, self.layers, self.config.kind)

    def run(self, units: list[int]) -> list[dict[str, pa.Table]]:
        adapter, config, results = self._loaded.adapter, self.config, []
        for unit in units:
            chunk = evaluation_chunk(self.evaluation, unit)
            groups = groups_of([len(item.input_ids) for item in chunk], rows_per_item(config),
                               self._scorer, config.group_items)
            items = scored_in_groups(self._scorer, chunk, groups, lambda members: analyse_items(
                adapter, self._scorer, members, self._prints, self.layer_sets, config))
            tables = {name: pa.concat_tables([item[name] for item in items]) for name in ("scores", "classification")}
            tables["fingerprints"] = pa.Table.from_pylist(fingerprint_rows(self._prints) if unit == 0 else [],
                                                          schema=FINGERPRINTS_SCHEMA)
            if config.accuracy:
                predicted = {(row["item_id"], row["layer"]): row["predicted"] for row in tables["classification"].to_pylist()}
                tables["accuracy"] = pa.Table.from_pylist(
                    accuracy_rows(adapter, self._loaded.tokenizer, chunk, self._prints, predicted, self.layer_sets, config),
                    schema=ACCURACY_SCHEMA)
            results.append(tables)
        return results

    def checks(self) -> dict:
        largest, mean = self._scorer.deviation.largest
        return {"natural_route_max_abs_logprob_diff": largest, "natural_route_mean_abs_logprob_diff": mean,
                **batching_checks(self._scorer, "item", self.config.group_items)}


def rows_per_item(config: SemanticRouteConfig) -> int:
    """Scored rows of an item at one layer set: the natural-route check, three arms, the floor seeds."""
    return 1 + 3 + config.floor_seeds


def evaluation_chunk(evaluation: list[TargetItem], unit: int) -> list[TargetItem]:
    """The evaluation items of unit `unit`: one generation batch."""
    return evaluation[unit * GENERATION_CHUNK:(unit + 1) * GENERATION_CHUNK]


def fingerprint_rows(prints: dict) -> list[dict]:
    return [{"layer": layer, "domain": domain, "experts": entry["experts"][i].tolist(),
             "centroid": entry["centroids"][i].double().tolist()}
            for layer, entry in prints.items() for i, domain in enumerate(entry["domains"])]


def _summary(folder, calibration, evaluation, layer_sets, config) -> dict:
    """The scores' summary, then (with `accuracy`) the generation arms'."""
    summary = summarise(folder.read("scores"), folder.read("classification"), layer_sets, config, config.score)
    if config.accuracy:
        # units are chunks of items: ordered arm by arm (as one pass over all items would give), chunks in order
        accuracy = folder.read("accuracy")
        arms = list(zip(accuracy["layer_set"], accuracy["arm"], accuracy["floor_seed"].fillna(-1)))
        first_seen = {arm: i for i, arm in enumerate(dict.fromkeys(arms))}
        accuracy = accuracy.iloc[np.argsort([first_seen[arm] for arm in arms], kind="stable")].reset_index(drop=True)
        folder.write_table("accuracy", accuracy)
        summary["accuracy"] = summarise_accuracy(accuracy, layer_sets, config)
        summary["accuracy_definition"] = (f"greedy completions (at most {config.max_new_tokens} tokens) with the arm's "
                                          "routing on every prompt and generated token at the layer set, final answer "
                                          "checked; the floor draws k experts per token (its seed 0 is tested); p: exact "
                                          "McNemar (binomial test of the discordant items)")
    summary["calibration_items"] = len(calibration)
    summary["evaluation_items"] = len(evaluation)
    prints = folder.read("fingerprints")
    summary["domain_experts"] = {str(layer): {row.domain: list(map(int, row.experts)) for row in rows.itertuples()}
                                 for layer, rows in prints.groupby("layer", sort=True)}
    return summary
