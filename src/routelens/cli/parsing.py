"""What every command shares: the parser class, value types, option groups, model loading.

Option groups are parent parsers declared once; a default that belongs to an analysis is
read from its config dataclass (`default_of`), so it is written in one place only.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong and where to look), exit 2, and
    no option is taken for an abbreviation of another (`--layer` is not `--layers`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def unrecognized(self, words: list[str]) -> None:
        """Usage error for options this command does not take, naming the closest one it does."""
        import difflib

        message = f"unrecognized arguments: {' '.join(words)}"
        known = [option for action in self._actions for option in action.option_strings]
        for word in words:
            close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.75) if word.startswith("--") else []
            if close:
                message += f"; did you mean {close[0]}?"
                break
        self.error(message)

    def error(self, message):
        extra = message.split("unrecognized arguments: ")[-1].split() if "unrecognized arguments" in message else []
        if extra and all(word.lstrip("-").isdigit() for word in extra):   # `--layers 0 -1`
            message += "; lists are comma-separated, e.g. --layers 0,-1"
        self.exit(2, f"routelens: error: {message} (see `{self.prog} --help`)\n")


def default_of(owner, name: str):
    """The default of a dataclass field or a function parameter: the one place it is written."""
    if dataclasses.is_dataclass(owner):
        field = next(f for f in dataclasses.fields(owner) if f.name == name)
        return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    return inspect.signature(owner).parameters[name].default


# ---------------------------------------------------------------------------- value types
def layers_or_all(text: str) -> list[int] | None:
    """'all' (None: every MoE layer) or comma-separated layer indices."""
    return None if text.strip().lower() == "all" else int_list(text)


def names(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected comma-separated names such as addsub,mul")
    return values


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,-1, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one layer index")
    return values


def positive_int(text: str, low: int = 1, what: str = "a positive integer") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def count(text: str) -> int:
    """An integer >= 0 (0: none)."""
    return positive_int(text, 0, "an integer >= 0")


MEMORY_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}


def memory(text: str) -> int:
    lowered = text.strip().lower()
    for suffix, factor in MEMORY_UNITS.items():
        if lowered.endswith(suffix):
            try:
                size = int(float(lowered[: -len(suffix)]) * factor)
            except ValueError:
                break
            if size <= 0:
                raise argparse.ArgumentTypeError(f"a memory budget must be positive, got {text!r}")
            return size
    raise argparse.ArgumentTypeError(f"expected a size such as 512MiB or 8GiB, got {text!r}")


def show_memory(size: int) -> str:
    return f"{size / 2**30:g}GiB" if size % 2**30 == 0 else f"{size / 2**20:g}MiB"


# ---------------------------------------------------------------------------- option groups
def model_options(with_model: bool = True) -> argparse.ArgumentParser:
    """--model, --device, --dtype, --device-map, --router-delta, ... (every command that loads a model)."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("model")
    if with_model:
        group.add_argument("--model", default="demo",
                           help="demo (the embedded model, default), a local folder (save_pretrained), "
                                "a hub id, or tiny:<model_type> (random tiny model)")
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    group.add_argument("--dtype", default="auto",
                       help="auto (float32 on cpu, bfloat16 on cuda), float32, bfloat16, float16")
    group.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    if with_model:
        group.add_argument("--router-delta", default=None, metavar="FILE",
                           help="apply a router update (a `routelens router-update` delta file) to the model first")
    group.add_argument("--device-map", default=None, metavar="MAP",
                       help="spread a model too large for one device (accelerate): auto, balanced, or JSON "
                            "{module: device} with devices cpu, cuda:N, N or disk; replaces --device")
    group.add_argument("--experts-implementation", default=None, choices=["eager", "grouped_mm", "batched_mm"],
                       help="transformers' expert kernels (default: transformers' choice; results do not depend on it)")
    return parser


def run_options(resumable: bool = True) -> argparse.ArgumentParser:
    """--overwrite (resumable run folders) and --no-progress."""
    parser = argparse.ArgumentParser(add_help=False)
    if resumable:
        parser.add_argument("--overwrite", action="store_true",
                            help="replace a routelens run with a different config in --out (nothing else is deleted)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def ray_options() -> argparse.ArgumentParser:
    """--ray, --workers, --gpus-per-worker, --cpus-per-worker (commands whose units can run on Ray)."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("Ray Data (needs routelens[ray])")
    group.add_argument("--ray", default=None, metavar="WHERE",
                       help="score on a pool of Ray actors: local (start Ray here), auto (this machine's cluster) "
                            "or a cluster address; same run folder, resumable either way")
    group.add_argument("--workers", type=positive_int, default=None, help="Ray actors, each loading the model once (default 2)")
    group.add_argument("--gpus-per-worker", type=float, default=None,
                       help="GPUs per actor (default 1 on cuda, else 0; above 1 with --device-map auto)")
    group.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per actor (default 1)")
    return parser


def ray_from_args(args):
    """The Ray settings of --ray/--workers/..., checked (and Ray importable) before the model loads."""
    from routelens.distributed import RaySettings, ray_settings

    if args.ray is None:
        return ray_settings(None, args.workers)
    return ray_settings(RaySettings(address=args.ray, workers=args.workers or 2, cpus_per_worker=args.cpus_per_worker,
                                    gpus_per_worker=args.gpus_per_worker))


def counterfactual_options(layers_required: bool = True) -> argparse.ArgumentParser:
    """The counterfactual analysis' settings (the fields of CounterfactualConfig)."""
    from routelens.config import ENGINE_NAMES
    from routelens.config import CounterfactualConfig as C

    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("counterfactual analysis")
    which = group.add_mutually_exclusive_group(required=layers_required)
    which.add_argument("--layers", type=int_list, default=None,
                       help="decoder-layer indices, comma-separated; negative counts from the end")
    which.add_argument("--joint-layers", type=int_list, default=None,
                       help="score each of these layers alone and, in the same run, routes forced at all of them "
                            "at once (one independently sampled alternative per layer), e.g. 0,1,2")
    group.add_argument("--routes", type=positive_int, default=default_of(C, "num_routes"),
                       help="alternative routes S per token (default %(default)s)")
    group.add_argument("--candidates", type=positive_int, default=default_of(C, "num_candidates"),
                       help="sample alternatives from the router's top-M experts (default min(32, E))")
    group.add_argument("--gumbel-temperature", type=float, default=default_of(C, "gumbel_temperature"),
                       help="temperature of the Gumbel-top-k route sampler (default %(default)s; higher: flatter)")
    group.add_argument("--seed", type=int, default=default_of(C, "seed"),
                       help="seed of the route sampling and bootstrap (default %(default)s)")
    group.add_argument("--confident", type=float, default=default_of(C, "confident"),
                       help="Confident bin: route-averaged p >= this (default %(default)s)")
    group.add_argument("--fragile", type=float, default=default_of(C, "fragile"),
                       help="Fragile bin: route-averaged p < this (default %(default)s)")
    group.add_argument("--win-tolerance", type=float, default=default_of(C, "win_tolerance"),
                       help="an alternative wins only if its p beats the standard route's by more than this "
                            "(probability; within it: a tie; default %(default)s)")
    group.add_argument("--only-step-ok", action=argparse.BooleanOptionalAction, default=default_of(C, "only_step_ok"),
                       help="score only tokens of right intermediate steps (default: on when every trajectory "
                            "carries step checks, as the arithmetic task's do)")
    group.add_argument("--engine", default=default_of(C, "engine"), choices=list(ENGINE_NAMES),
                       help="scoring engine: fast (default; exact, batched; the cache engine for layers it cannot "
                            "patch), cache (the model's own cache, one decode step per token) or reference "
                            "(plain forwards)")
    group.add_argument("--memory-budget", type=memory, default=default_of(C, "memory_budget"),
                       help=f"memory for one chunk of perturbed sequences, e.g. 512MiB, 8GiB "
                            f"(default {show_memory(default_of(C, 'memory_budget'))})")
    group.add_argument("--route-batch-size", type=positive_int, default=default_of(C, "route_batch_size"),
                       help="routes per forward (reference engine; default %(default)s)")
    group.add_argument("--group-tokens", type=positive_int, default=default_of(C, "group_tokens"),
                       help="fast engine: trajectories scored together up to this many tokens (default %(default)s; "
                            "on --ray, a group is what one actor scores at a time)")
    return parser


def counterfactual_settings(args) -> dict:
    """The CounterfactualConfig fields from parsed options (validated by the config)."""
    return {"layers": args.joint_layers or args.layers, "joint_layers": args.joint_layers,
            "num_routes": args.routes, "num_candidates": args.candidates,
            "gumbel_temperature": args.gumbel_temperature, "seed": args.seed, "confident": args.confident,
            "fragile": args.fragile, "win_tolerance": args.win_tolerance, "only_step_ok": args.only_step_ok,
            "engine": args.engine, "route_batch_size": args.route_batch_size,
            "memory_budget": args.memory_budget, "group_tokens": args.group_tokens}


def isolation_options() -> argparse.ArgumentParser:
    """The isolation study's settings (the fields of IsolationConfig)."""
    from routelens.config import SCORES
    from routelens.config import IsolationConfig as C

    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("isolation study")
    group.add_argument("--layers", type=layers_or_all, default=None,
                       help="'all' (default: every MoE layer) or decoder-layer indices, comma-separated")
    group.add_argument("--domains", type=names, default=None,
                       help="keep these domains, comma-separated (default: all in the items)")
    group.add_argument("--per-domain", type=positive_int, default=None,
                       help="first N items of each domain (default: all; the arithmetic task has 100 per domain)")
    group.add_argument("--floor-seeds", type=int, default=default_of(C, "floor_seeds"),
                       help="random-routing floor: uniformly random k-expert routes per token, one per seed "
                            "(default %(default)s)")
    group.add_argument("--alpha", type=float, default=default_of(C, "alpha"),
                       help="FDR level of the BH step-up (default %(default)s)")
    group.add_argument("--score", choices=list(SCORES), default=default_of(C, "score"),
                       help="cell statistic: mean target-token log-prob (default) or the first target token's")
    group.add_argument("--seed", type=int, default=default_of(C, "seed"),
                       help="seed of the floor routes and the bootstrap (default %(default)s)")
    group.add_argument("--bootstrap-resamples", type=positive_int, default=default_of(C, "bootstrap_resamples"),
                       help="bootstrap resamples of the calibration interval (default %(default)s)")
    group.add_argument("--memory-budget", type=memory, default=default_of(C, "memory_budget"),
                       help=f"memory for one batch of conditions, e.g. 512MiB, 8GiB "
                            f"(default {show_memory(default_of(C, 'memory_budget'))})")
    group.add_argument("--group-items", type=positive_int, default=default_of(C, "group_items"),
                       help="items of similar length sharing one forward and its scoring passes, at most "
                            "(default %(default)s; 1: one item at a time; on --ray, a group is what one actor "
                            "scores at a time)")
    return parser


def isolation_settings(args) -> dict:
    return {"layers": args.layers, "floor_seeds": args.floor_seeds, "seed": args.seed, "alpha": args.alpha,
            "score": args.score, "bootstrap_resamples": args.bootstrap_resamples, "memory_budget": args.memory_budget,
            "group_items": args.group_items}


def load_lens(args, model: str | None = None):
    """The model named by --model (or `model`), with --device, --dtype, --router-delta, ...;
    with --ray, its structure only: the actors load the weights, the driver needs none."""
    from routelens.lens import load

    return load(model or args.model, args.device, args.dtype, device_map=args.device_map,
                trust_remote_code=args.trust_remote_code, router_delta=getattr(args, "router_delta", None),
                experts_implementation=args.experts_implementation, weights=getattr(args, "ray", None) is None)
