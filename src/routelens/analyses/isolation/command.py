"""`routelens isolate`: every expert forced alone, layer by layer, with statistics and a floor."""

from __future__ import annotations

import argparse

from routelens.cli.parsing import (
    check_records_early,
    config_from_args,
    config_options,
    load_lens,
    model_options,
    names,
    positive_int,
    ray_from_args,
    ray_options,
    run_options,
)
from routelens.errors import RouteLensError

NAME = "isolate"
HELP = "force single experts layer by layer, with statistics against natural routing and random floors"
RESUMABLE = True
EPILOG = """examples:
  routelens isolate --model demo --task arithmetic --per-domain 100 --layers all --out runs/isolation
  routelens isolate --model ./my-qwen3-moe --items items.jsonl --layers 0,12,-1 --domains math,code \\
      --floor-seeds 5 --alpha 0.05 --device cuda --dtype bfloat16 --out runs/qwen-iso

Item records: {"id","domain","prompt","target"} (text; prompt and target tokenised separately)
or {"id","domain","prompt_ids","target_ids"}, in JSONL or Parquet.
Harmful / helpful is judged against the single-expert floor (one random expert per token
at weight 1.0: the forced expert's compute and scale); --no-equal-compute drops it and the
matched-mass arm (half the passes, no verdict; a run folder made before them resumes so).
Re-running the same command on the same --out resumes; --alpha, --score and
--bootstrap-resamples only change the summary and may differ on a re-run.
Python: routelens.isolate(lens, "items.jsonl", out="runs/iso", layers=[0, -1]).
"""


def parents():
    return [model_options(), isolation_options(), run_options(), ray_options()]


def add_arguments(parser) -> None:
    items = parser.add_mutually_exclusive_group()
    items.add_argument("--items", default=None, help="JSONL or Parquet of items {id, domain, prompt, target}")
    items.add_argument("--task", choices=["arithmetic"], default=None,
                       help="the embedded arithmetic task's four domains (the default for --model demo)")
    parser.add_argument("--out", required=True, help="run folder (created; resumed if it holds the same run)")


def run(args) -> int:
    from routelens.analyses.isolation.config import IsolationConfig
    from routelens.analyses.isolation.table import print_isolation_summary
    from routelens.api import isolate

    config = config_from_args(IsolationConfig, args)
    if args.items is None and args.task is None and args.model != "demo":
        raise RouteLensError("give --items FILE ({id, domain, prompt, target} records), or --task arithmetic")
    ray = ray_from_args(args)
    check_records_early(args.items, "item")
    result = isolate(load_lens(args), args.items or "arithmetic", args.out, config=config, domains=args.domains,
                         per_domain=args.per_domain, overwrite=args.overwrite, show_progress=not args.no_progress, ray=ray)
    print_isolation_summary(result.summary_dict)
    print(f"run folder: {args.out} (isolation.parquet, cells.parquet, calibration.parquet, summary.json, run.json)")
    return 0


def isolation_options() -> argparse.ArgumentParser:
    """The isolation study's settings (the fields of IsolationConfig) and the item choice."""
    from routelens.analyses.isolation.config import IsolationConfig as C

    parser = config_options(C, "isolation study")
    group = parser._action_groups[-1]
    group.add_argument("--domains", type=names, default=None,
                       help="keep these domains, comma-separated (default: all in the items)")
    group.add_argument("--per-domain", type=positive_int, default=None,
                       help="first N items of each domain (default: all; the arithmetic task has 100 per domain)")
    return parser
