"""The analyses as Python functions: in memory, or into a resumable run folder.

One function per analysis: `counterfactual(lens, trajectories)` runs in memory (nothing
written; `.save(path)` writes the run folder afterwards), `counterfactual(lens,
trajectories, out)` into a run folder written as it goes and resumed on a re-run (what the
`routelens` command calls). Both return a result object (`routelens.results.objects`)
whose tables are pandas DataFrames. Settings are the fields of the analysis' config
dataclass (`CounterfactualConfig`, ...), named as the command line's options (`routes` is
`--routes`), given as keyword arguments and validated there: a misspelt one is an error,
never ignored. Every other argument is checked on entry (`routelens.validate`), before any
model loads, any input is read for work or anything is written: a bad one is a one-line
`SettingError` that names it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import fields

from routelens import validate
from routelens.analyses.counterfactual.config import CounterfactualConfig
from routelens.analyses.counterfactual.result import CounterfactualResult
from routelens.analyses.graft.config import GraftEvaluationConfig
from routelens.analyses.graft.result import GraftResult
from routelens.analyses.isolation.config import IsolationConfig
from routelens.analyses.isolation.result import IsolationResult
from routelens.analyses.passk.analysis import EvalProblem
from routelens.analyses.passk.config import PassKConfig
from routelens.analyses.passk.result import PassKResult
from routelens.analyses.replay.config import ReplayConfig
from routelens.analyses.replay.result import ReplayResult
from routelens.analyses.rollout.config import RolloutConfig
from routelens.analyses.rollout.result import RolloutResult
from routelens.analyses.router_update.config import RouterUpdateConfig
from routelens.analyses.router_update.result import RouterUpdateResult
from routelens.analyses.semantic_routing.config import SemanticRouteConfig
from routelens.analyses.semantic_routing.result import SemanticRouteResult
from routelens.config import seed_value
from routelens.data.target_items import TargetItem
from routelens.data.trajectories import Trajectory
from routelens.distributed import ray_settings
from routelens.errors import RouteLensError, SettingError
from routelens.lens import Lens
from routelens.results.objects import read_run

# settings renamed to their command-line names (0.2): named in the error, never accepted
RENAMED = {"num_routes": "routes", "num_candidates": "candidates", "ks": "k", "learning_rate": "lr",
           "max_tokens": "max_new_tokens"}


def make_config(config_class, config=None, **options):
    """`config_class(**options)` (or `config` with `options` replaced), an unknown option
    refused in one line with the available ones."""
    names = [f.name for f in fields(config_class)]
    if config is not None and not isinstance(config, config_class):
        raise SettingError(f"`config` must be a {config_class.__name__} (or None), got {type(config).__name__}", "config")
    resolved = dict(options)
    unknown = sorted(key for key in options if key not in names)
    if unknown:
        renamed = [f"{old} is now {RENAMED[old]}" for old in unknown if RENAMED.get(old) in names]
        raise SettingError(f"unknown setting(s) {', '.join(f'`{u}`' for u in unknown)}"
                           f"{' (' + '; '.join(renamed) + ')' if renamed else ''}; the settings are "
                           f"{', '.join(names)}", *unknown)
    if config is not None:
        resolved = {**{name: getattr(config, name) for name in names}, **resolved}
    settings = config_class(**resolved)
    if "seed" in names:   # every config's seed, whether or not its own checks cover it
        seed_value("seed", settings.seed)
    return settings


def _lens(lens, ray=None) -> Lens:
    """`lens`, checked: a Lens, and one with weights unless the analysis runs on Ray (`ray`)."""
    from routelens.distributed import check_ray_can_load

    _is_lens(lens)
    check_ray_can_load(lens.loaded, ray)
    return lens


def _is_lens(lens, name: str = "lens") -> Lens:
    if not isinstance(lens, Lens):
        raise SettingError(f"`{name}` must be a Lens (routelens.load(...) or routelens.wrap(...)), got "
                           f"{type(lens).__name__} {validate.shown(lens)}", name)
    return lens


def _run_options(out, overwrite, show_progress, *, out_required: bool = False) -> str | None:
    """The arguments every analysis shares: `out` (a path; None: in memory unless required) and two switches."""
    validate.flag(overwrite, "overwrite")
    validate.flag(show_progress, "show_progress")
    return validate.path(out, "out", optional=not out_required)


# ---------------------------------------------------------------------------- trajectories
def trajectories_from_ids(sequences: list[list[int]], completion_start: int | list[int], ids: list[str] | None = None,
                          verified: list[bool] | None = None, vocab_size: int | None = None,
                          answers: list[str] | None = None) -> list[Trajectory]:
    """Trajectories from token ids: `completion_start` (one for all, or one per sequence) is
    the index of the first completion token; the tokens scored are the completion's.
    `answers`: the reference final answers (what `rollout` checks continuations against).

    Examples:
        >>> import routelens as rl
        >>> trajs = rl.trajectories_from_ids([[1, 5, 6, 7, 2]], completion_start=2)
        >>> trajs[0].id, list(trajs[0].scored_positions)
        ('0', [1, 2, 3])
    """
    from routelens.data.trajectories import parse_trajectory

    sequences, completion_start, ids, verified, answers = (   # tensors and arrays as (lists of) Python values
        x.tolist() if hasattr(x, "tolist") else x for x in (sequences, completion_start, ids, verified, answers))
    if not isinstance(sequences, (list, tuple)) or not sequences:
        raise SettingError("`sequences` must be a non-empty list of token-id lists such as [[1, 5, 6, 7]], got "
                           f"{validate.shown(sequences)}", "sequences")
    vocab_size = validate.count(vocab_size, "vocab_size", optional=True)
    sequences = [validate.token_ids(seq, "sequences", vocab_size, where=f"sequence {n}") for n, seq in enumerate(sequences)]
    starts = [completion_start] * len(sequences) if validate.is_int(completion_start) else completion_start
    if not isinstance(starts, (list, tuple)) or not all(validate.is_int(s) for s in starts):
        raise SettingError("`completion_start` must be an integer (the index of the first completion token) or a list "
                           f"of one per sequence, got {validate.shown(completion_start)}", "completion_start")
    for name, extra in (("ids", ids), ("verified", verified), ("answers", answers)):
        if extra is not None and (not isinstance(extra, (list, tuple)) or len(extra) != len(sequences)):
            raise SettingError(f"`{name}` must be a list of one entry per sequence ({len(sequences)}), got "
                               f"{validate.shown(extra)}", name)
    if len(starts) != len(sequences):
        raise SettingError(f"`completion_start` must be one integer or one per sequence ({len(sequences)}), got "
                           f"{len(starts)}", "completion_start")
    ids = [str(i) for i in range(len(sequences))] if ids is None else [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise SettingError("trajectory `ids` must be unique", "ids")
    return [parse_trajectory({"id": i, "input_ids": seq, "completion_start": int(start),
                              "verified": None if verified is None else verified[n],
                              "answer": None if answers is None else answers[n]},
                             f"sequence {n}", None, vocab_size)
            for n, (i, seq, start) in enumerate(zip(ids, sequences, starts))]


def trajectories_from_text(tokenizer, pairs: list[tuple[str, str]], ids: list[str] | None = None,
                           answers: list[str] | None = None) -> list[Trajectory]:
    """Trajectories from (prompt, completion) texts, tokenised separately (the prompt with
    the tokenizer's special tokens, the completion without) and concatenated. `answers`:
    the reference final answers (what `rollout` checks continuations against).

    Examples:
        >>> import routelens as rl
        >>> lens = rl.load("demo")
        >>> trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:3+4=A:", "3+4=7#7")])
        >>> len(trajs[0].scored_positions) > 0
        True
    """
    from routelens.data.trajectories import parse_trajectory

    if tokenizer is None:
        raise SettingError("`tokenizer` is None: text trajectories need the model's tokenizer (lens.tokenizer); a model "
                           "without one takes token ids (routelens.trajectories_from_ids)", "tokenizer")
    if not callable(tokenizer):
        raise SettingError(f"`tokenizer` must be the model's tokenizer (lens.tokenizer), got {type(tokenizer).__name__}",
                           "tokenizer")
    if not isinstance(pairs, (list, tuple)) or not pairs or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in pairs):
        raise SettingError("`pairs` must be a non-empty list of (prompt, completion) text pairs such as "
                           f"[(\"Q:3+4=A:\", \"3+4=7#7\")], got {validate.shown(pairs)}", "pairs")
    for name, extra in (("ids", ids), ("answers", answers)):
        if extra is not None and (not isinstance(extra, (list, tuple)) or len(extra) != len(pairs)):
            raise SettingError(f"`{name}` must be a list of one entry per (prompt, completion) pair ({len(pairs)}), "
                               f"got {validate.shown(extra)}", name)
    ids = [str(i) for i in range(len(pairs))] if ids is None else [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise SettingError("trajectory `ids` must be unique", "ids")
    return [parse_trajectory({"id": i, "prompt": prompt, "completion": completion,
                              "answer": None if answers is None else answers[n]}, f"pair {n}", tokenizer, None)
            for n, (i, (prompt, completion)) in enumerate(zip(ids, pairs))]


def read_trajectories(path: str, lens: Lens | None = None, only_verified: bool = False,
                      limit: int | None = None) -> list[Trajectory]:
    """Trajectories from a JSONL or Parquet file (text records need `lens`'s tokenizer),
    validated as the command line validates them.

    Examples:
        >>> import routelens as rl
        >>> trajs = rl.read_trajectories(trajectory_file)   # {"id", "input_ids", "completion_start"} records
        >>> len(trajs) > 0
        True
    """
    from routelens.data.trajectories import load_trajectories

    path = validate.path(path, "path")
    validate.flag(only_verified, "only_verified")
    limit = validate.count(limit, "limit", optional=True)
    tokenizer, vocab_size, context = _reading_context(lens)
    return load_trajectories(path, tokenizer, vocab_size, only_verified=only_verified, limit=limit, max_length=context)


def sample_trajectories(lens: Lens, problems: str | None = None, *, n: int = 200, samples_per_problem: int = 8,
                        temperature: float = 0.8, seed: int = 0, heldout: bool = False,
                        max_new_tokens: int | None = None, batch_size: int | None = None, out: str | None = None,
                        overwrite: bool = False, show_progress: bool = False, ray=None,
                        workers: int | None = None) -> list[Trajectory]:
    """Sample `samples_per_problem` solutions to each of `n` problems and check each final
    answer: the embedded arithmetic task (`problems` None; `heldout` takes its held-out
    problems), or the first `n` of a JSONL problem file of {"id", "prompt", "answer"}
    (answers checked with math-verify). What `routelens trajectories` runs.

    With `out` (a JSONL path) the trajectories are written there once every problem is
    done, and the problems are kept as they complete in the run folder `out + ".run"`
    (run.json: the seed and every setting): a re-run with the same settings resumes where
    an interrupted one stopped. `ray`/`workers` sample on a pool of Ray actors.

    Examples:
        >>> import routelens as rl
        >>> lens = rl.load("demo")
        >>> trajs = rl.sample_trajectories(lens, n=3, samples_per_problem=2, max_new_tokens=24, seed=0)
        >>> len(trajs), all(t.verified in (True, False) for t in trajs)
        (6, True)
    """
    from routelens.data.sampling import arithmetic_trajectories, file_trajectories, write_trajectories
    from routelens.data.trajectories import parse_trajectory
    from routelens.results.run_folder import check_out_file_beside_run

    lens = _lens(lens, ray)
    validate.count(n, "n")
    validate.count(samples_per_problem, "samples_per_problem")
    validate.temperature(temperature)
    validate.seed(seed)
    validate.flag(heldout, "heldout")
    validate.count(max_new_tokens, "max_new_tokens", optional=True)
    validate.count(batch_size, "batch_size", optional=True)
    problems = validate.path(problems, "problems", optional=True)
    out = _run_options(out, overwrite, show_progress)
    run_folder = None if out is None else check_out_file_beside_run(out, [problems, lens.loaded.spec], overwrite)
    if lens.tokenizer is None:
        raise RouteLensError(f"model {lens.loaded.spec!r} has no tokenizer; trajectories are generated from text")
    options = dict(samples_per_problem=samples_per_problem, temperature=temperature, seed=seed,
                   show_progress=show_progress, ray=ray_settings(ray, workers),
                   run=run_folder, overwrite=overwrite,
                   **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}),
                   **({"batch_size": batch_size} if batch_size else {}))
    if problems is not None:
        records = file_trajectories(lens.loaded, os.fspath(problems), n, **options)
    else:
        records = arithmetic_trajectories(lens.loaded, n, heldout=heldout, **options)
    if out is not None:
        write_trajectories(records, out)
    tokenizer, vocab_size, _ = _reading_context(lens)
    return [parse_trajectory(record, f"sampled trajectory {record['id']}", tokenizer, vocab_size) for record in records]


def _reading_context(lens: Lens | None) -> tuple:
    """What validating an input file needs of the model: tokenizer, vocabulary size, context
    length (all None without a model)."""
    if lens is None:
        return None, None, None
    _is_lens(lens)
    return lens.tokenizer, lens.adapter.config.vocab_size, lens.adapter.context_length


def _trajectory_data(lens: Lens, trajectories, only_verified: bool, max_trajectories: int | None):
    """The trajectories and what the run's config records of them: a file (path, sha256) or
    trajectories given in memory (kept in the run folder as trajectories.jsonl)."""
    from routelens.data.trajectories import IN_MEMORY, file_sha256, trajectories_jsonl

    if isinstance(trajectories, (str, os.PathLike)):
        path = validate.path(trajectories, "trajectories")
        loaded = read_trajectories(path, lens, only_verified=only_verified, limit=max_trajectories)
        info = {"trajectories": os.path.abspath(path), "trajectories_sha256": file_sha256(path)}
        return loaded, info, None
    trajectories = validate.objects(trajectories, "trajectories", Trajectory, "a file path or a list of Trajectory "
                                    "(routelens.trajectories_from_ids / _from_text / read_trajectories)")
    if only_verified:
        trajectories = [t for t in trajectories if t.verified is True]
    trajectories = trajectories[:max_trajectories] if max_trajectories is not None else trajectories
    content = trajectories_jsonl(trajectories)
    info = {"trajectories": IN_MEMORY, "trajectories_sha256": hashlib.sha256(content).hexdigest()}
    return trajectories, info, content


# ---------------------------------------------------------------------------- engine routes
def read_routes(path: str, lens: Lens, trajectories, format: str = "auto", prompt_included: bool = True):
    """The routes an inference engine chose (SGLang, vLLM, .npy/.npz, Parquet, or a routelens
    export), checked against `lens`'s model and `trajectories` (a file path or a list of
    Trajectory), as `EngineRoutes` (routelens.data.engine_routes): per trajectory id an int
    array [tokens, MoE layers, k], -1 where the engine reported no route. `format`: one of
    `routelens.data.engine_routes_io.ROUTE_FORMATS`, or "auto" (from the file). See
    `routelens.data.engine_routes_io` for each format's fields and the alignment rules.

    Examples:
        >>> import numpy as np, routelens as rl
        >>> lens = rl.load("demo")
        >>> trajs = rl.read_trajectories(trajectory_file)
        >>> arrays = {t.id: np.tile(np.arange(4), (len(t.input_ids), 4, 1)) for t in trajs}   # [tokens, layers, k]
        >>> np.savez(tmp / "engine-routes.npz", **arrays)
        >>> routes = rl.read_routes(tmp / "engine-routes.npz", lens, trajs, format="npy")
        >>> routes.shape(trajs[0].id) == (len(trajs[0].input_ids), 4, 4), routes.layers
        (True, [0, 1, 2, 3])
    """
    from routelens.data.engine_routes_io import ROUTE_FORMATS
    from routelens.data.engine_routes_io import read_routes as read

    path = validate.path(path, "path")
    _is_lens(lens)
    if format not in (*ROUTE_FORMATS, "auto"):
        raise SettingError(f"`format` must be one of {', '.join(ROUTE_FORMATS)} or auto, got {validate.shown(format)}",
                           "format")
    validate.flag(prompt_included, "prompt_included")
    trajectories, _, _ = _trajectory_data(lens, trajectories, False, None)
    return read(path, lens, trajectories, format=format, prompt_included=prompt_included)


# ---------------------------------------------------------------------------- counterfactual
def counterfactual(lens: Lens, trajectories, out: str | None = None, *, config: CounterfactualConfig | None = None,
                   only_verified: bool = False, max_trajectories: int | None = None, overwrite: bool = False,
                   show_progress: bool = True, ray=None, workers: int | None = None,
                   **options) -> CounterfactualResult:
    """The counterfactual analysis: for every scored token and layer, the standard route
    against `routes` sampled equal-compute alternatives and `null_routes` uniformly drawn
    ones (the yardstick of "does the router beat chance"). In memory when `out` is None
    (`result.save(path)` writes the run folder); otherwise into the run folder `out`,
    written per trajectory and resumed by a re-run with the same settings.

    `ray`: "local", "auto" or a cluster address (or a `RaySettings`) scores the
    trajectories on a pool of `workers` Ray actors (default 2) into the same run folder;
    a run may be started one way and resumed the other.

    `trajectories`: a file path or a list of `Trajectory`. `options`: fields of
    `CounterfactualConfig` (`layers`, `routes`, `null_routes`, `candidates`,
    `gumbel_temperature`, `seed`, `alternative_weights`, `bins`, `confident`, `fragile`,
    `confidence`, `engine`, `memory_budget`, ...). With `joint_layers=[l1, l2, ...]`
    the run also scores routes forced at all those layers at once (`joint_tokens`,
    `joint_routes`, `joint_summary` against the single-layer gains of the same tokens).

    Examples:
        >>> import routelens as rl
        >>> lens = rl.load("demo")
        >>> trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:3+4=A:", "3+4=7#7"), ("Q:9*2=A:", "9*2=18#18")])
        >>> res = rl.counterfactual(lens, trajs, layers=[-1], routes=8, seed=0, show_progress=False)
        >>> sorted(res.tokens.columns)[:3], len(res.routes) == len(res.tokens) * 9
        (['alignment', 'alignment_mass_partial', 'best_minus_uniform_best'], True)
        >>> len(res.null_routes) == len(res.tokens) * 32    # the uniform null, 32 routes per token by default
        True
        >>> list(res.summary.columns[:4])
        ['layer', 'bin', 'tokens', 'trajectories']
        >>> res = rl.counterfactual(lens, trajs[:1], str(tmp / "cf"), layers=[-1], routes=4, show_progress=False)
        >>> res.path.endswith("cf"), len(res.tokens) == len(trajs[0].scored_positions)
        (True, True)
    """
    from routelens.analyses.counterfactual.analysis import run_counterfactual as run
    from routelens.data.trajectories import IN_MEMORY
    from routelens.results.run_folder import TRAJECTORIES_FILE

    lens = _lens(lens, ray)
    settings = make_config(CounterfactualConfig, config, **options)
    out = _run_options(out, overwrite, show_progress)
    validate.flag(only_verified, "only_verified")
    validate.count(max_trajectories, "max_trajectories", optional=True)
    if settings.joint_layers is None:   # joint layers are checked by the analysis, with what they need
        validate.distinct_layers(settings.layers, lens.adapter, "layers")
    kept, info, content = _trajectory_data(lens, trajectories, only_verified, max_trajectories)
    info.update(max_trajectories=max_trajectories, only_verified=only_verified, num_trajectories=len(kept))
    folder = run(lens.loaded, kept, settings, out, info, overwrite=overwrite, show_progress=show_progress,
                 ray=ray_settings(ray, workers))
    if info["trajectories"] == IN_MEMORY:   # router_update reads the trajectories back from the run
        folder.write_file(TRAJECTORIES_FILE, content)
    return CounterfactualResult(folder)


# ---------------------------------------------------------------------------- isolation
def arithmetic_items(lens: Lens, per_domain: int = 100, domains: list[str] | None = None) -> list[TargetItem]:
    """Items of the embedded arithmetic task (addsub, mul, long, mixed): question as prompt,
    worked solution as target.

    Examples:
        >>> import routelens as rl
        >>> items = rl.arithmetic_items(rl.load("demo"), per_domain=2)
        >>> sorted({item.domain for item in items})
        ['addsub', 'long', 'mixed', 'mul']
    """
    from routelens.data.target_items import arithmetic_items as build

    _is_lens(lens)
    validate.count(per_domain, "per_domain")
    domains = validate.names(domains, "domains")
    if lens.tokenizer is None:
        raise RouteLensError(f"model {lens.loaded.spec!r} has no tokenizer; the arithmetic task is text")
    return build(lens.tokenizer, per_domain, domains)


def read_items(path: str, lens: Lens | None = None, domains: list[str] | None = None,
               per_domain: int | None = None) -> list[TargetItem]:
    """Items {id, domain, prompt, target} (text) or {id, domain, prompt_ids, target_ids}
    from JSONL or Parquet, validated as the command line validates them.

    Examples:
        >>> import routelens as rl
        >>> items = rl.read_items(item_file, rl.load("demo"))     # text items need the model's tokenizer
        >>> items[0].domain
        'math'
    """
    from routelens.data.target_items import load_items

    path = validate.path(path, "path")
    domains = validate.names(domains, "domains")
    per_domain = validate.count(per_domain, "per_domain", optional=True)
    tokenizer, vocab_size, context = _reading_context(lens)
    return load_items(path, tokenizer, vocab_size, domains, per_domain, max_length=context)


def isolate(lens: Lens, items, out: str | None = None, *, config: IsolationConfig | None = None,
            domains: list[str] | None = None, per_domain: int | None = None, overwrite: bool = False,
            show_progress: bool = True, ray=None, workers: int | None = None, **options) -> IsolationResult:
    """Expert isolation: every expert forced alone at each layer (at weight 1.0, and at the
    natural route's gate mass), against the natural route, a random k-expert floor and a
    random single-expert floor (equal compute: the verdict's baseline), with Wilcoxon/BH
    statistics per cell; in memory when `out` is None, otherwise into the run folder `out`
    (resumable).

    `items`: a list of `TargetItem`, a file path, or "arithmetic" (the embedded task).
    `options`: fields of `IsolationConfig` (`layers`, `floor_seeds`, `equal_compute`, `seed`, `alpha`,
    `score`, `bootstrap_resamples`, `memory_budget`, `group_items`). `ray`/`workers`: score the items on
    a pool of Ray actors (see `counterfactual`).

    Examples:
        >>> import routelens as rl
        >>> lens = rl.load("demo")
        >>> res = rl.isolate(lens, "arithmetic", per_domain=3, layers=[-1], floor_seeds=1, show_progress=False)
        >>> sorted(set(res.isolation["condition"]))
        ['floor', 'forced', 'forced_matched_mass', 'natural', 'single_expert_floor']
        >>> res.summary_dict["verdict"]["comparison"]      # harmful / helpful: against the single-expert floor
        'forced_vs_single_expert_floor'
        >>> res = rl.isolate(lens, "arithmetic", str(tmp / "iso"), per_domain=3, layers=[0], floor_seeds=1,
        ...                  show_progress=False)
        >>> sorted(res.cells["domain"].unique())
        ['addsub', 'long', 'mixed', 'mul']
    """
    from routelens.analyses.isolation.analysis import run_isolation

    lens = _lens(lens, ray)
    settings = make_config(IsolationConfig, config, **options)
    out = _run_options(out, overwrite, show_progress)
    if settings.layers:   # a dense, out-of-range or repeated layer fails before any item is read
        validate.distinct_layers(settings.layers, lens.adapter, "layers")
    kept, info = _item_data(lens, items, domains, per_domain)
    return IsolationResult(run_isolation(lens.loaded, kept, settings, out, info, overwrite=overwrite,
                                         show_progress=show_progress, ray=ray_settings(ray, workers)))


def _item_data(lens: Lens, items, domains: list[str] | None, per_domain: int | None) -> tuple[list[TargetItem], dict]:
    """The items ("arithmetic", a file or a list of TargetItem) and what a run's config records of them."""
    from routelens.data.target_items import select
    from routelens.data.trajectories import file_sha256

    domains = validate.names(domains, "domains")
    per_domain = validate.count(per_domain, "per_domain", optional=True)
    if isinstance(items, str) and items == "arithmetic":
        kept = arithmetic_items(lens, per_domain or 100, domains)
        info = {"items": "task:arithmetic"}
    elif isinstance(items, (str, os.PathLike)):
        path = validate.path(items, "items")
        kept = read_items(path, lens, domains, per_domain)
        info = {"items": os.path.abspath(path), "items_sha256": file_sha256(path)}
    else:   # checked before select reads their domains
        items = validate.objects(items, "items", TargetItem, '"arithmetic", a file path or a list of TargetItem')
        kept = select(items, domains, per_domain, source="the items given")
        info = {"items": "in-memory", "items_ids": [i.id for i in kept]}
    info.update(domains=domains, per_domain=per_domain, num_items=len(kept))
    return kept, info


# ---------------------------------------------------------------------------- pass@k
def _problems(lens: Lens, problems, n: int | None) -> tuple[list[EvalProblem], dict, bool]:
    from routelens.analyses.passk.analysis import arithmetic_problems, file_problems
    from routelens.data.trajectories import file_sha256

    n = validate.count(n, "n", optional=True)
    if isinstance(problems, str) and problems == "arithmetic":
        return arithmetic_problems(lens.tokenizer, n or 500), {"problems": "task:arithmetic (held-out set)"}, False
    if isinstance(problems, (str, os.PathLike)):
        path = validate.path(problems, "problems")
        return (file_problems(lens.tokenizer, path, n),
                {"problems": os.path.abspath(path), "problems_sha256": file_sha256(path)}, True)
    kept = validate.objects(problems, "problems", EvalProblem, '"arithmetic", a JSONL path or a list of EvalProblem')
    kept = kept[:n] if n else kept
    return kept, {"problems": "in-memory", "problem_ids": [p.id for p in kept]}, False


def passk(lens: Lens, problems, out: str | None = None, *, compare_delta: str | None = None, n: int | None = None,
          config: PassKConfig | None = None, overwrite: bool = False, show_progress: bool = True,
          ray=None, workers: int | None = None, **options) -> PassKResult:
    """pass@k with bootstrap intervals; in memory when `out` is None, otherwise into the run
    folder `out` (resumable). With
    `compare_delta` (a router-update delta file), the base model and the model with the
    delta sample the same problems with the same seeds, and the paired difference is
    reported; the model is left as it came. `ray`/`workers`: sample on a pool of Ray actors
    (see `counterfactual`); the samples equal one process's.

    `problems`: "arithmetic" (the held-out set), a JSONL of {id, prompt, answer} (checked
    with math-verify), or a list of `EvalProblem`. `options`: fields of `PassKConfig`
    (`samples`, `k`, `temperature` (of sampling), `seed`, `max_new_tokens`, ...).

    Examples:
        >>> import routelens as rl
        >>> res = rl.passk(rl.load("demo"), "arithmetic", n=4, samples=2, k=[1, 2], show_progress=False)
        >>> set(res.samples["arm"])
        {'model'}
        >>> res = rl.passk(rl.load("demo"), "arithmetic", str(tmp / "pk"), n=4, samples=2, k=[1, 2],
        ...                show_progress=False)
        >>> res.summary[res.summary["group"] == "all"][["arm", "k"]].values.tolist()
        [['model', 1], ['model', 2]]
    """
    from routelens.analyses.passk.analysis import run_passk as run

    ray = ray_settings(ray, workers)
    lens = _lens(lens, ray)
    out = _run_options(out, overwrite, show_progress)
    compare_delta = validate.path(compare_delta, "compare_delta", optional=True)
    if lens.tokenizer is None:
        raise RouteLensError(f"model {lens.loaded.spec!r} has no tokenizer; pass@k samples text")
    kept, info, is_file = _problems(lens, problems, n)
    defaults = {"max_new_tokens": 1024, "checker": "math-verify", "batch_size": 16} if is_file else {}
    settings = make_config(PassKConfig, config, **{**defaults, **options})
    info["num_problems"] = len(kept)
    arms = [("base", None), ("updated", os.path.abspath(compare_delta))] if compare_delta else [("model", None)]
    return PassKResult(run(lens.loaded, kept, settings, out, info, arms, overwrite=overwrite,
                           show_progress=show_progress, ray=ray))


# ---------------------------------------------------------------------------- router update
def router_update(lens: Lens, counterfactual, out: str, *, heldout=None, config: RouterUpdateConfig | None = None,
                  overwrite: bool = False, show_progress: bool = False, **options) -> RouterUpdateResult:
    """Retrain the last MoE layer's router alone (DPO on routes) from the preferences of a
    counterfactual run that includes the last MoE layer; writes the router delta and the
    training log into `out` (its product is the delta file) and leaves the model unchanged.

    `counterfactual`, `heldout`: a run folder or a saved `CounterfactualResult`. `options`:
    fields of `RouterUpdateConfig` (`margin`, `bins`, `beta`, `lr`,
    `steps`, `batch_size`, `seed`).

    Examples:
        >>> import routelens as rl
        >>> lens = rl.load("demo")
        >>> trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:3+4=A:", "3+4=7#7"), ("Q:9*2=A:", "9*2=18#18")])
        >>> cf = rl.counterfactual(lens, trajs, layers=[-1], routes=8).save(str(tmp / "cf-update"))
        >>> upd = rl.router_update(lens, cf, out=str(tmp / "update"), margin=0.0, steps=3)
        >>> upd.summary_dict["only_router_changed"]
        True
    """
    from routelens.analyses.router_update.analysis import run_router_update

    lens = _lens(lens)
    if "ray" in options or "workers" in options:
        raise SettingError("`ray`: a router update trains its steps one after another in this process, so it has "
                           "no Ray execution; call it without ray (it resumes after a kill all the same)", "ray")
    settings = make_config(RouterUpdateConfig, config, **options)
    out = _run_options(out, overwrite, show_progress, out_required=True)
    run = run_router_update(lens.loaded, _counterfactual_folder(counterfactual, "counterfactual"), settings, out,
                            _counterfactual_folder(heldout, "heldout"), overwrite=overwrite, show_progress=show_progress)
    return RouterUpdateResult(run)


def _counterfactual_folder(run, what: str) -> str | None:
    """The folder of a counterfactual run given as a path or a saved `CounterfactualResult`."""
    if run is None and what == "heldout":
        return None
    if isinstance(run, (str, os.PathLike)):
        return validate.path(run, what)
    if isinstance(run, CounterfactualResult):
        if run.path is None:
            raise RouteLensError(f"the {what} result lives in memory; save it first (result.save(path))")
        return run.path
    raise SettingError(f"`{what}` must be the folder of a counterfactual run or a saved CounterfactualResult, got "
                       f"{type(run).__name__} {validate.shown(run)}", what)


# ---------------------------------------------------------------------------- semantic routing
def semantic_route(lens: Lens, items, out: str | None = None, *, config: SemanticRouteConfig | None = None,
                   domains: list[str] | None = None, per_domain: int | None = None, overwrite: bool = False,
                   show_progress: bool = True, ray=None, workers: int | None = None,
                   **options) -> SemanticRouteResult:
    """Semantic (fingerprint) routing against natural routing, an oracle and a random floor,
    into the run folder `out` (resumable; in memory when None). `ray`/`workers`: score on a
    pool of Ray actors (see `counterfactual`).

    `items`: "arithmetic", a file path or a list of `TargetItem` of two or more domains.
    `options`: fields of `SemanticRouteConfig` (`layer_sets`, `kind` "selection" or "input",
    `calibration_share`, `floor_seeds`, `seed`, `accuracy` (greedy answers checked, the
    arithmetic task), `max_new_tokens`, `score`, `alpha`, `bootstrap_resamples`).

    Examples:
        >>> import routelens as rl
        >>> res = rl.semantic_route(rl.load("demo"), "arithmetic", str(tmp / "semantic"), per_domain=3,
        ...                         layer_sets=[[3]], floor_seeds=1, max_new_tokens=24, show_progress=False)
        >>> sorted(res.scores["arm"].unique())
        ['floor', 'natural', 'oracle', 'semantic', 'semantic_token']
        >>> res = rl.semantic_route(rl.load("demo"), "arithmetic", per_domain=3, layer_sets=[[0]], floor_seeds=1,
        ...                         accuracy=False, show_progress=False)
        >>> res.classification["layer"].unique().tolist()
        [0]
    """
    from routelens.analyses.semantic_routing.analysis import run_semantic_routing
    from routelens.distributed import ray_settings

    ray = ray_settings(ray, workers)
    lens = _lens(lens, ray)
    settings = make_config(SemanticRouteConfig, config, **options)
    out = _run_options(out, overwrite, show_progress)
    for layer_set in settings.layer_sets or []:   # a dense, out-of-range or repeated layer fails before any item is read
        validate.distinct_layers(layer_set, lens.adapter, "layer_sets")
    kept, info = _item_data(lens, items, domains, per_domain)
    return SemanticRouteResult(run_semantic_routing(lens.loaded, kept, settings, out, info, overwrite=overwrite,
                                                    show_progress=show_progress, ray=ray))


# ---------------------------------------------------------------------------- grafting
def graft(recipient: Lens | str, donor: Lens | str, experts, out: str, *, dtype: str | None = None, device: str = "cpu",
          evaluate: bool = False, items="arithmetic", domains: list[str] | None = None, per_domain: int | None = 50,
          config: GraftEvaluationConfig | None = None, show_progress: bool = False, ray=None,
          workers: int | None = None, overwrite: bool = False, **options) -> GraftResult:
    """Copy donor experts into recipient slots and save the grafted model as a Hugging Face
    folder `out` (with graft.json); with `evaluate`, measure on `items` what the graft
    changed (natural score, the slot's selection share, the grafted vs the original expert
    forced alone) into `out`/evaluation.

    `recipient`, `donor`: `Lens` objects or model specs ("demo", a folder, a hub id) of one
    family; a Lens is used as loaded (the recipient is restored after the graft). `experts`:
    "L:e=L2:e2,..." or [(L, e, L2, e2), ...] (recipient layer and expert <- donor layer and
    expert). `dtype`: default the recipient checkpoint's own. `options`: fields of
    `GraftEvaluationConfig` (`seed`, `bootstrap_resamples`, `alpha`), checked before any model
    loads. `ray`/`workers`: evaluate on a pool of Ray actors (see `counterfactual`); the
    graft itself is written here.

    Everything is checked (the map, `out`, both models, with `evaluate` the items) before
    anything is written; the folder is written beside `out` and moved in only when whole.
    `out` holding this very graft is kept (`GraftResult.reused`) and its evaluation resumes;
    another graft there is refused unless `overwrite`, which removes only the files its
    graft.json lists and its evaluation's outputs.

    Examples:
        >>> import routelens as rl
        >>> res = rl.graft("demo", "demo", "3:5=3:9", str(tmp / "grafted"))
        >>> res.record["pairs"][0]["pair"], rl.load(res.path).family
        ('3:5=3:9', 'olmoe')
    """
    from routelens.analyses.graft.pipeline import graft as run_graft
    from routelens.models.loading import DTYPES

    validate.flag(evaluate, "evaluate")
    validate.flag(overwrite, "overwrite")
    if ray is not None and not evaluate:
        raise SettingError("`ray` runs the evaluation on Ray actors; give it with `evaluate`=True", "ray", "evaluate")
    for role, model in (("recipient", recipient), ("donor", donor)):
        if not isinstance(model, Lens):
            validate.model_spec(model, role)
    _expert_map(experts)   # its form, before any model loads (the pipeline checks it against the models)
    out = validate.path(out, "out")
    validate.flag(show_progress, "show_progress")
    if dtype is not None and dtype not in DTYPES:
        raise SettingError(f"`dtype` must be one of {', '.join(DTYPES)} (or None: the recipient's own), got "
                           f"{validate.shown(dtype)}", "dtype")
    if not isinstance(device, str):
        raise SettingError(f"`device` must be a string: cpu, cuda or cuda:N, got {validate.shown(device)}", "device")
    if evaluate:   # the items' form (their content is read with the recipient's tokenizer, before the graft is written)
        validate.names(domains, "domains")
        validate.count(per_domain, "per_domain", optional=True)
        if not (isinstance(items, (str, os.PathLike)) or isinstance(items, (list, tuple))):
            validate.objects(items, "items", TargetItem, '"arithmetic", a file path or a list of TargetItem')
    return run_graft(recipient, donor, experts, out, dtype=dtype, device=device, evaluate=evaluate, items=items,
                     domains=domains, per_domain=per_domain, config=config, show_progress=show_progress, ray=ray,
                     workers=workers, overwrite=overwrite, **options)


def _expert_map(experts) -> list[tuple[int, int, int, int]]:
    """`graft`'s `experts`, in form ("L:e=L2:e2,..." or [(L, e, L2, e2), ...]); whether the
    layers and experts exist is checked against the models (`plan_graft`), before any write."""
    from routelens.analyses.graft.grafting import parse_expert_map

    expected = ('"L:e=L2:e2,..." (recipient layer:expert = donor layer:expert, e.g. "3:5=3:9") or a non-empty list '
                'of (layer, expert, donor_layer, donor_expert) such as [(3, 5, 3, 9)]')
    if isinstance(experts, str):
        mapping = parse_expert_map(experts)
    elif isinstance(experts, (list, tuple)) and experts and all(
            isinstance(p, (list, tuple)) and len(p) == 4 and all(validate.is_int(v) for v in p) for p in experts):
        mapping = [tuple(int(v) for v in pair) for pair in experts]
    else:
        raise SettingError(f"`experts` must be {expected}, got {validate.shown(experts)}", "experts")
    for layer, expert, donor_layer, donor_expert in mapping:
        if expert < 0 or donor_expert < 0:
            raise SettingError(f"`experts` {layer}:{expert}={donor_layer}:{donor_expert}: expert ids count from 0",
                               "experts")
    targets = [(layer, expert) for layer, expert, _, _ in mapping]
    twice = next((t for t in targets if targets.count(t) > 1), None)
    if twice is not None:
        raise SettingError(f"`experts`: recipient expert {twice[0]}:{twice[1]} is grafted twice; give each slot one donor",
                           "experts")
    return mapping


# ---------------------------------------------------------------------------- rollouts
def rollout(lens: Lens, counterfactual, out: str | None = None, *, config: RolloutConfig | None = None,
            overwrite: bool = False, show_progress: bool = True, ray=None, workers: int | None = None,
            **options) -> RolloutResult:
    """Continue chosen tokens of a counterfactual run under three routes (standard, best
    alternative, random alternative) forced at that token and layer only, check each final
    answer, and compare the arms' accuracy; into the run folder `out` (resumable), in memory
    when `out` is None. `ray`/`workers`: roll out on a pool of Ray actors (see
    `counterfactual`).

    `counterfactual`: a run folder or a saved `CounterfactualResult` whose trajectories carry
    reference answers. `options`: fields of `RolloutConfig` (`tokens` "fragile-all",
    "random", "fragile", "all" or a file, `best_by` "top-tokens" or "realized", `top_tokens`,
    `include_wrong`, `samples`, `max_new_tokens`, `temperature` (0: greedy), `seed`,
    `checker`, `limit`).

    Examples:
        >>> import routelens as rl
        >>> lens = rl.load("demo")
        >>> trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:3+4=A:", "3+4=7#7")], answers=["7"])
        >>> cf = rl.counterfactual(lens, trajs, layers=[-1], routes=4).save(str(tmp / "cf-rollout"))
        >>> res = rl.rollout(lens, cf, str(tmp / "rollout"), tokens="all", limit=2, samples=2,
        ...                  max_new_tokens=8, show_progress=False)
        >>> len(res.rollouts) == 2 * 3 * 2         # tokens x arms x samples
        True
    """
    from routelens.analyses.rollout.analysis import run_rollout as run

    lens = _lens(lens, ray)
    settings = make_config(RolloutConfig, config, **options)
    out = _run_options(out, overwrite, show_progress)
    folder = run(lens.loaded, _counterfactual_folder(counterfactual, "counterfactual"), settings, out,
                 overwrite=overwrite, show_progress=show_progress, ray=ray_settings(ray, workers))
    return RolloutResult(folder)


# ---------------------------------------------------------------------------- routing replay
ENGINES = ("llama.cpp",)   # inference engines replay can run itself
def replay(lens: Lens, trajectories, routes=None, out: str | None = None, *, config: ReplayConfig | None = None,
           compare_to: str | None = None, routes_format: str | None = None, max_trajectories: int | None = None,
           export: str | None = None, engine: str | None = None, gguf_type: str = "q8_0", gguf: str | None = None,
           overwrite: bool = False, show_progress: bool = True, **options) -> ReplayResult:
    """The routing replay audit: an inference engine's routes (`routes`: an `EngineRoutes`, or
    a file read by `routelens.data.engine_routes_io.read_routes` in `routes_format`) against
    the model's own, per MoE layer and token, with the router's margin and the cost of
    forcing them at every layer at once (next-token log-prob, KL); or, with `compare_to`
    ("dtype=bfloat16", "experts-implementation=grouped_mm", "batch=N") instead of `routes`,
    a second Hugging Face run of the same model audited as an engine's. In memory when `out`
    is None; otherwise into the run folder `out`, written per trajectory and resumed.
    `options`: fields of `ReplayConfig` (`margin_bins`, `confident`, `fragile`, `seed`, ...).
    `export`: an .npz path: the engine's routes as read, [tokens, MoE layers, k] int16 per
    trajectory with a JSON header (`export_routes`), written once every trajectory is audited
    (atomically; recorded in run.json, and listed among the run's files where it lies inside
    `out`); its path is checked before any work (`routelens.data.engine_routes_io.check_export`).
    `engine`: "llama.cpp" instead of `routes`: routelens writes the model as a GGUF of
    `gguf_type` (f32, f16, q8_0, q4_0; or runs the file `gguf`, checked against the model),
    runs llama.cpp on the trajectories and audits the routes it chose
    (`routelens.inference.llama_cpp`; needs the `llama` extra).

    Examples:
        >>> import routelens as rl
        >>> lens = rl.load("demo")
        >>> trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:3+4=A:", "3+4=7#7")])
        >>> res = rl.replay(lens, trajs, compare_to="batch=2", show_progress=False)
        >>> res.summary_dict["route_source"]["source"], len(res.tokens) == len(trajs[0].scored_positions)
        ('hf:batch=2', True)
    """
    from routelens.analyses.replay.analysis import GivenRoutes, SecondRun, run_replay
    from routelens.analyses.replay.config import parse_compare_to
    from routelens.data.engine_routes import EngineRoutes
    from routelens.data.engine_routes_io import ROUTE_FORMATS, check_export, check_routes_file, read_routes

    lens = _lens(lens)
    settings = make_config(ReplayConfig, config, **options)
    out = _run_options(out, overwrite, show_progress)
    validate.count(max_trajectories, "max_trajectories", optional=True)
    if sum(given is not None for given in (routes, compare_to, engine)) != 1:
        raise SettingError("give the routes to audit (`routes`: an EngineRoutes or a file), `engine` (llama.cpp) or "
                           "`compare_to` (dtype=..., experts-implementation=... or batch=N), one of them",
                           "routes", "compare_to")
    if engine is not None and engine not in ENGINES:
        raise SettingError(f"`engine` must be one of {', '.join(ENGINES)}, got {validate.shown(engine)}", "engine")
    from routelens.inference.gguf_export import GGUF_TYPES

    if gguf_type not in GGUF_TYPES:
        raise SettingError(f"`gguf_type` must be one of {', '.join(GGUF_TYPES)}, got {validate.shown(gguf_type)}",
                           "gguf_type")
    if gguf is not None and engine is None:
        raise SettingError("`gguf` is the file llama.cpp runs: give it with engine='llama.cpp'", "gguf")
    gguf = validate.path(gguf, "gguf", optional=True)
    path = None
    if routes is not None and not isinstance(routes, EngineRoutes):
        if not isinstance(routes, (str, os.PathLike)):
            raise SettingError(f"`routes` must be an EngineRoutes or a file path, got {type(routes).__name__} "
                               f"{validate.shown(routes)}", "routes")
        path = validate.path(routes, "routes")
    if routes_format is not None:
        if routes_format not in (*ROUTE_FORMATS, "auto"):
            raise SettingError(f"`routes_format` must be one of {', '.join(ROUTE_FORMATS)} or auto, got "
                               f"{validate.shown(routes_format)}", "routes_format")
        if path is None:
            raise SettingError("`routes_format` describes the routes file; give `routes` as a file path (an "
                               "EngineRoutes or `compare_to` has no format)", "routes_format")
    if compare_to is not None:
        parse_compare_to(compare_to)
    if export is not None and compare_to is not None:
        raise SettingError("`export` writes an engine's routes for training; with `compare_to` there is no engine: "
                           "give `routes`", "export")
    if path is not None:   # the file's form and format, before the trajectories are read and tokenised
        check_routes_file(path, routes_format or "auto", option="routes_format")
    target = None
    if export is not None:   # before any work: an output never replaces an input, nor a file routelens did not write
        inputs = [p for p in (path, gguf, trajectories if isinstance(trajectories, (str, os.PathLike)) else None,
                              lens.loaded.folder) if p]
        target = check_export(export, out, inputs, overwrite)
    kept, info, _ = _trajectory_data(lens, trajectories, False, max_trajectories)
    info.update(max_trajectories=max_trajectories, num_trajectories=len(kept))
    if compare_to is not None:
        source = SecondRun(compare_to, lens.adapter)
    else:
        if engine is not None:   # llama.cpp run here on the trajectories: the routes it chose
            from routelens.inference.llama_cpp import llama_cpp_routes

            routes, logprobs = llama_cpp_routes(lens, kept, gguf_type, gguf=gguf)
            routes.logprobs = logprobs   # what llama.cpp sampled with: the audit compares the model's with it
            info["engine"] = {"engine": engine, "gguf_type": gguf_type, "gguf": gguf and os.path.abspath(gguf)}
        if path is not None:
            routes = read_routes(os.fspath(path), lens, kept, format=routes_format or "auto", option="routes_format")
            info["routes_file"] = os.path.abspath(path)
        source = GivenRoutes(routes)
    return ReplayResult(run_replay(lens.loaded, kept, source, settings, out, info, overwrite=overwrite,
                                   show_progress=show_progress, export=target))


__all__ = ["arithmetic_items", "counterfactual", "graft", "isolate", "make_config", "passk", "read_items", "read_run",
           "read_routes", "read_trajectories", "replay", "rollout", "router_update", "semantic_route",
           "trajectories_from_ids", "trajectories_from_text"]
