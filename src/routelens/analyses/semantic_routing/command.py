"""`routelens semantic-route`: route by per-domain fingerprints instead of the router; score it."""

from __future__ import annotations

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

NAME = "semantic-route"
HELP = "route by similarity to per-domain fingerprints; compare with natural routing, an oracle and a random floor"
RESUMABLE = True
EPILOG = """examples:
  routelens semantic-route --model demo --items arithmetic --per-domain 50 --out runs/semantic
  routelens semantic-route --model ./my-olmoe --items items.jsonl --layer-sets "15;0,5,10,15" --kind input \\
      --calibration-share 0.5 --floor-seeds 3 --seed 0 --out runs/semantic-input
  routelens semantic-route --model demo --items arithmetic --out runs/semantic --ray local --workers 2

Each domain's items are split (seeded) into calibration items, whose tokens make the
domain's fingerprint at every layer (--kind selection: the mean router selection
distribution; input: the mean MoE input), and evaluation items. An evaluation item is
routed, at every layer of a layer set at once, to the top-k experts of the domain whose
fingerprint is nearest its prompt's (semantic), of each token's nearest domain
(semantic_token), of its true domain (oracle), or to k random experts (floor), weighted by
the model's gating rule; each is compared with natural routing of the same item.
Python: routelens.semantic_route(lens, "arithmetic", out="runs/semantic").
"""


def parents():
    from routelens.analyses.semantic_routing.config import SemanticRouteConfig

    return [model_options(), config_options(SemanticRouteConfig, "semantic routing"), run_options(), ray_options()]


def add_arguments(parser) -> None:
    parser.add_argument("--items", default="arithmetic", help="arithmetic (the embedded task) or a JSONL/Parquet item file")
    parser.add_argument("--out", required=True, help="run folder (created; resumed if it holds the same run)")
    parser.add_argument("--domains", type=names, default=None, help="keep these domains (two or more)")
    parser.add_argument("--per-domain", type=positive_int, default=None, help="items per domain (default: all; task: 100)")


def run(args) -> int:
    from routelens.analyses.semantic_routing.config import SemanticRouteConfig
    from routelens.analyses.semantic_routing.table import print_semantic_route_summary
    from routelens.api import semantic_route

    config = config_from_args(SemanticRouteConfig, args)
    ray = ray_from_args(args)
    check_records_early(args.items, "item")
    result = semantic_route(load_lens(args), args.items, args.out, config=config, domains=args.domains,
                                per_domain=args.per_domain, overwrite=args.overwrite, show_progress=not args.no_progress,
                                ray=ray)
    print_semantic_route_summary(result.summary_dict)
    print(f"run folder: {args.out}")
    return 0
