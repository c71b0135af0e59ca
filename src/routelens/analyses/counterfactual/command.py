"""`routelens counterfactual`: the standard route against sampled equal-compute routes."""

from __future__ import annotations

import argparse
import dataclasses

from routelens.cli.parsing import (
    check_records_early,
    config_options,
    int_list,
    load_lens,
    model_options,
    positive_int,
    ray_from_args,
    ray_options,
    run_options,
)

NAME = "counterfactual"
HELP = "score the standard route against sampled equal-compute routes"
RESUMABLE = True
EPILOG = """examples:
  routelens counterfactual --model ./my-olmoe --trajectories traj.jsonl --layers 0,-1 --out runs/cf
  routelens counterfactual --model allenai/OLMoE-1B-7B-0924 --trajectories traj.parquet \\
      --layers -1 --routes 32 --candidates 32 --seed 0 --device cuda --dtype bfloat16 --out runs/olmoe
  routelens counterfactual --model tiny:qwen3_moe --trajectories ids.jsonl --layers 0 --routes 8 --out runs/t

Re-running the same command on the same --out resumes where it stopped, with or without --ray:
  routelens counterfactual --model ./my-olmoe --trajectories traj.jsonl --layers -1 --out runs/cf \
      --device cuda --ray auto --workers 8          # 8 actors with one GPU each on this machine's Ray cluster
Trajectory records: {"id","prompt","completion"} (text) or {"id","input_ids","completion_start"};
an optional "verified" boolean is carried through (--only-verified keeps the true ones).
Python: routelens.counterfactual(lens, "traj.jsonl", out="runs/cf", layers=[0, -1]).
"""


def parents():
    return [model_options(), counterfactual_options(), run_options(), ray_options()]


def add_arguments(parser) -> None:
    parser.add_argument("--trajectories", required=True, help="JSONL or Parquet file of trajectories")
    parser.add_argument("--out", required=True, help="run folder (created; resumed if it holds the same run)")
    parser.add_argument("--max-trajectories", type=positive_int, default=None, help="use the first N trajectories")
    parser.add_argument("--only-verified", action="store_true", help='keep trajectories with "verified": true')


def run(args) -> int:
    from routelens.analyses.counterfactual.config import CounterfactualConfig
    from routelens.analyses.counterfactual.table import print_summary
    from routelens.api import counterfactual

    config = CounterfactualConfig(**counterfactual_settings(args))   # bad settings fail before the model loads
    ray = ray_from_args(args)
    check_records_early(args.trajectories, "trajectory")
    result = counterfactual(load_lens(args), args.trajectories, args.out, config=config, ray=ray,
                                only_verified=args.only_verified, max_trajectories=args.max_trajectories,
                                overwrite=args.overwrite, show_progress=not args.no_progress)
    print_summary(result.summary_dict)
    print(f"run folder: {args.out}")
    return 0


def counterfactual_options(layers_required: bool = True) -> argparse.ArgumentParser:
    """The counterfactual analysis' settings (the fields of CounterfactualConfig); --layers
    and --joint-layers exclude each other."""
    from routelens.analyses.counterfactual.config import CounterfactualConfig as C

    parser = config_options(C, "counterfactual analysis", skip=("layers", "joint_layers"))
    group = parser._action_groups[-1]
    which = group.add_mutually_exclusive_group(required=layers_required)
    for name in ("layers", "joint_layers"):
        spec = next(f for f in dataclasses.fields(C) if f.name == name)
        which.add_argument("--" + name.replace("_", "-"), type=int_list, default=None, help=spec.metadata["help"])
    return parser


def counterfactual_settings(args) -> dict:
    """The CounterfactualConfig fields of parsed options (layers: --joint-layers or --layers;
    None where neither was given)."""
    from routelens.analyses.counterfactual.config import CounterfactualConfig

    settings = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(CounterfactualConfig)}
    return {**settings, "layers": args.joint_layers or args.layers}
