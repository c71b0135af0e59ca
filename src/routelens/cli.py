"""The `routelens` command. `main(argv)` returns the exit code, so tests can call it.

User errors (`RouteLensError`) print one line and exit 2; argparse usage errors also exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from routelens import __version__
from routelens.errors import RouteLensError

EXAMPLES_COUNTERFACTUAL = """examples:
  routelens counterfactual --model ./my-olmoe --trajectories traj.jsonl --layers 0,-1 --out runs/cf
  routelens counterfactual --model allenai/OLMoE-1B-7B-0924 --trajectories traj.parquet \\
      --layers -1 --routes 32 --candidates 32 --seed 0 --device cuda --dtype bfloat16 --out runs/olmoe
  routelens counterfactual --model tiny:qwen3_moe --trajectories ids.jsonl --layers 0 --routes 8 --out runs/t

Re-running the same command on the same --out resumes where it stopped.
Trajectory records: {"id","prompt","completion"} (text) or {"id","input_ids","completion_start"};
an optional "verified" boolean is carried through (--only-verified keeps the true ones).
"""

EXAMPLES_INSPECT = """examples:
  routelens inspect --model ./my-olmoe
  routelens inspect --model tiny:deepseek_v3
"""

EXAMPLES_DEMO = """examples:
  routelens demo                       # tiny model, synthetic trajectories, runs/demo
  routelens demo --out /tmp/demo --routes 16
"""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,-1, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one layer index")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_model_options(parser: argparse.ArgumentParser, with_model: bool = True) -> None:
    if with_model:
        parser.add_argument("--model", required=True,
                            help="local folder (save_pretrained), hub id, or tiny:<model_type> (random tiny model)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on cpu, bfloat16 on cuda), float32, bfloat16, float16")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")


def _add_counterfactual_options(parser: argparse.ArgumentParser, layers_default: str | None) -> None:
    parser.add_argument("--layers", type=_int_list, default=None if layers_default is None else _int_list(layers_default),
                        required=layers_default is None,
                        help="decoder-layer indices, comma-separated; negative counts from the end")
    parser.add_argument("--routes", type=_positive_int, default=32, help="alternative routes S per token (default 32)")
    parser.add_argument("--candidates", type=_positive_int, default=None,
                        help="sample alternatives from the router's top-M experts (default min(32, E))")
    parser.add_argument("--temperature", type=float, default=1.0, help="Gumbel-top-k temperature (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the route sampling and bootstrap (default 0)")
    parser.add_argument("--confident", type=float, default=0.9, help="Confident bin: route-averaged p >= this")
    parser.add_argument("--fragile", type=float, default=0.5, help="Fragile bin: route-averaged p < this")
    parser.add_argument("--engine", default="reference", help="scoring engine (default reference)")
    parser.add_argument("--route-batch-size", type=_positive_int, default=33, help="routes per forward (reference engine)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run with a different config in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="routelens", description="Audit the routers of Mixture-of-Experts language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"routelens {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cf = commands.add_parser("counterfactual", help="score the standard route against sampled equal-compute routes",
                             epilog=EXAMPLES_COUNTERFACTUAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(cf)
    cf.add_argument("--trajectories", required=True, help="JSONL or Parquet file of trajectories")
    cf.add_argument("--out", required=True, help="run folder (created; resumed if it holds the same run)")
    cf.add_argument("--max-trajectories", type=_positive_int, default=None, help="use the first N trajectories")
    cf.add_argument("--only-verified", action="store_true", help='keep trajectories with "verified": true')
    _add_counterfactual_options(cf, layers_default=None)

    commands.add_parser("models", help="list the supported MoE families")

    inspect = commands.add_parser("inspect", help="show a model's MoE layers, experts, top-k and gating rule",
                                  epilog=EXAMPLES_INSPECT, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(inspect)

    demo = commands.add_parser("demo", help="run the counterfactual analysis end to end on a built-in model",
                               epilog=EXAMPLES_DEMO, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--out", default=os.path.join("runs", "demo"), help="run folder (default runs/demo)")
    _add_model_options(demo, with_model=False)
    demo.add_argument("--trajectories-count", type=_positive_int, default=12, help="synthetic trajectories (default 12)")
    _add_counterfactual_options(demo, layers_default="0")
    demo.set_defaults(layers=None)  # None: first, middle and last MoE layer
    return parser


def cmd_models(args) -> int:
    from routelens.models.registry import ADAPTERS, adapter_class

    for model_type in ADAPTERS:
        cls = adapter_class(model_type)
        print(f"{model_type:<12} {cls.__name__:<20} {cls.gating_rule}")
    return 0


def cmd_inspect(args) -> int:
    from routelens.models.loading import load_model

    loaded = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    info = loaded.adapter.describe()
    info.update(device=loaded.device, dtype=loaded.dtype, tokenizer=type(loaded.tokenizer).__name__ if loaded.tokenizer else None)
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _config_from(args, layers: list[int]):
    from routelens.analyses.counterfactual import CounterfactualConfig

    if not 0 <= args.fragile <= args.confident <= 1:
        raise RouteLensError(f"need 0 <= --fragile ({args.fragile}) <= --confident ({args.confident}) <= 1")
    return CounterfactualConfig(
        layers=layers, num_routes=args.routes, num_candidates=args.candidates, temperature=args.temperature,
        seed=args.seed, confident=args.confident, fragile=args.fragile, engine=args.engine,
        route_batch_size=args.route_batch_size,
    )


def run_counterfactual_command(model: str, trajectories_path: str, out: str, args, layers: list[int],
                               max_trajectories=None, only_verified=False) -> dict:
    from routelens.analyses.counterfactual import run_counterfactual
    from routelens.data.trajectories import file_sha256, load_trajectories
    from routelens.models.loading import load_model

    config = _config_from(args, layers)
    loaded = load_model(model, args.device, args.dtype, args.trust_remote_code)
    trajectories = load_trajectories(trajectories_path, loaded.tokenizer, loaded.adapter.config.vocab_size,
                                     only_verified=only_verified, limit=max_trajectories)
    data_info = {"trajectories": os.path.abspath(trajectories_path), "trajectories_sha256": file_sha256(trajectories_path),
                 "max_trajectories": max_trajectories, "only_verified": only_verified,
                 "num_trajectories": len(trajectories)}
    return run_counterfactual(loaded, trajectories, config, out, data_info, overwrite=args.overwrite,
                              show_progress=not args.no_progress)


def cmd_counterfactual(args) -> int:
    from routelens.summary_table import print_summary

    summary = run_counterfactual_command(args.model, args.trajectories, args.out, args, args.layers,
                                         args.max_trajectories, args.only_verified)
    print_summary(summary)
    print(f"run folder: {args.out}")
    return 0


def cmd_demo(args) -> int:
    from routelens.demo import run_demo

    return run_demo(args)


COMMANDS = {"models": cmd_models, "inspect": cmd_inspect, "counterfactual": cmd_counterfactual, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars say what is going on
    try:
        return COMMANDS[args.command](args)
    except RouteLensError as error:
        print(f"routelens: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("routelens: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
