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


def seed(text: str) -> int:
    """A seed: an integer in 0..2**32 - 1 (`routelens.config.SEED_MAX`)."""
    from routelens.config import SEED_MAX

    return bounded_int(text, 0, SEED_MAX, f"a seed, an integer in 0..{SEED_MAX} (2**32 - 1)")


def bounded_int(text: str, low: int, high: int, what: str) -> int:
    value = positive_int(text, low, what)
    if value > high:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def number(text: str) -> float:
    """A finite float (float() also reads nan and inf)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def temperature(text: str) -> float:
    """A sampling temperature: finite and positive."""
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive sampling temperature, got {text!r}")
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
            except (ValueError, OverflowError):   # not a number, nan or inf
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
    if with_model:
        group.add_argument("--upcast-router", action="store_true",
                           help="every router computes its logits in float32 while the rest of a bf16/fp16 model "
                                "keeps its dtype (bf16 logits flip top-k choices near ties); recorded in run.json")
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
    group.add_argument("--gpus-per-worker", type=number, default=None,
                       help="GPUs per actor (default 1 on cuda, else 0; above 1 with --device-map auto)")
    group.add_argument("--cpus-per-worker", type=number, default=None, help="CPUs per actor (default 1)")
    return parser


def ray_from_args(args):
    """The Ray settings of --ray/--workers/..., checked (and Ray importable) before the model loads."""
    from routelens.distributed import RaySettings, check_device_map, ray_settings
    from routelens.errors import SettingError

    if args.ray is None:
        given = [f"--{name.replace('_', '-')}" for name in ("gpus_per_worker", "cpus_per_worker")
                 if getattr(args, name) is not None]
        if given and args.workers is None:   # (--workers alone: ray_settings says it)
            raise SettingError(f"{' and '.join(given)} size{'' if len(given) > 1 else 's'} the Ray actors: give --ray "
                               f"(local, auto or a cluster address), or drop {' and '.join(given)}")
        return ray_settings(None, args.workers)
    settings = RaySettings(address=args.ray, workers=args.workers or 2,
                           cpus_per_worker=1.0 if args.cpus_per_worker is None else args.cpus_per_worker,
                           gpus_per_worker=args.gpus_per_worker)
    check_device_map(getattr(args, "device_map", None), settings)
    return ray_settings(settings)


def layer_sets(text: str) -> list[list[int]]:
    """';'-separated sets of comma-separated layer indices: '3;0,1,2,3'."""
    try:
        sets = [[int(part) for part in chunk.split(",") if part.strip()] for chunk in text.split(";") if chunk.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer sets such as '3;0,1,2,3', got {text!r}") from None
    if not sets or not all(sets):
        raise argparse.ArgumentTypeError(f"expected layer sets such as '3;0,1,2,3', got {text!r}")
    return sets


# a config field's `parse` (or its annotation) -> the value type of its option
VALUE_TYPES = {"int": int, "float": number, "str": str, "positive_int": positive_int, "count": count, "int_list": int_list,
               "layers_or_all": layers_or_all, "names": names, "memory": memory, "layer_sets": layer_sets}


def config_options(config_class, title: str, *, skip: tuple[str, ...] = (), defaults: dict | None = None,
                   helps: dict | None = None, group=None) -> argparse.ArgumentParser:
    """The options of an analysis: one per field of its config dataclass, named as the field
    (`gumbel_temperature` is `--gumbel-temperature`), typed, with the help and the default
    the field declares (`routelens.config.setting`). `skip`: fields a command declares
    itself; `defaults`/`helps`: a command's own default or help for a field."""
    parser = argparse.ArgumentParser(add_help=False)
    group = group if group is not None else parser.add_argument_group(title)
    for spec in dataclasses.fields(config_class):
        if spec.name in skip:
            continue
        default = (defaults or {}).get(spec.name, default_of(config_class, spec.name))
        help_text = (helps or {}).get(spec.name) or spec.metadata.get("help", "")
        if default is not None and "default" not in help_text:
            if spec.metadata.get("parse") == "memory":
                shown = show_memory(default)
            elif isinstance(default, (list, tuple)):   # as it is typed: Fragile,Ambiguous
                shown = ",".join(map(str, default))
            elif isinstance(default, bool):
                shown = "on" if default else "off"
            else:
                shown = "%(default)s"
            help_text += f" (default {shown})"
        flag = "--" + spec.name.replace("_", "-")
        annotation = str(spec.type).split(" | ")[0]
        if annotation == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        value_type = VALUE_TYPES[spec.metadata.get("parse") or annotation]
        choices = spec.metadata.get("choices")
        group.add_argument(flag, type=value_type, default=default, help=help_text,
                           choices=list(choices) if choices else None)
    return parser


def config_from_args(config_class, args, **replaced):
    """The config of the parsed options (every field the command declared; `replaced`: fields
    the command sets itself), validated on construction: bad settings fail before a model
    loads."""
    values = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(config_class) if hasattr(args, spec.name)}
    return config_class(**{**values, **replaced})


def load_lens(args, model: str | None = None):
    """The model named by --model (or `model`), with --device, --dtype, --router-delta, ...;
    with --ray, its structure only: the actors load the weights, the driver needs none."""
    from routelens.lens import load

    return load(model or args.model, args.device, args.dtype, device_map=args.device_map,
                trust_remote_code=args.trust_remote_code, router_delta=getattr(args, "router_delta", None),
                experts_implementation=args.experts_implementation, weights=getattr(args, "ray", None) is None,
                upcast_router=getattr(args, "upcast_router", False))


def check_records_early(path: str | None, what: str) -> None:
    """The form of an input file (readable JSONL or Parquet, not empty), checked before the
    model loads (a big model takes minutes); its fields are checked against the tokenizer
    once the model is there."""
    if path is None or path == "arithmetic":
        return
    from routelens.data.trajectories import read_records
    from routelens.errors import RouteLensError

    if not read_records(path, f"{what} file"):
        raise RouteLensError(f"{path}: no {what} records in the file")
