"""`routelens semantic-route`: route by per-domain fingerprints instead of the router; score it."""

from __future__ import annotations

from routelens.cli.parsing import (
    default_of,
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
Python: routelens.run_semantic_route(lens, "arithmetic", out="runs/semantic").
"""


def layer_sets(text: str) -> list[list[int]]:
    import argparse

    try:
        sets = [[int(part) for part in chunk.split(",") if part.strip()] for chunk in text.split(";") if chunk.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer sets such as '3;0,1,2,3', got {text!r}") from None
    if not sets or not all(sets):
        raise argparse.ArgumentTypeError(f"expected layer sets such as '3;0,1,2,3', got {text!r}")
    return sets


def parents():
    return [model_options(), run_options(), ray_options()]


def add_arguments(parser) -> None:
    import argparse

    from routelens.config import FINGERPRINT_KINDS, SCORES
    from routelens.config import SemanticRouteConfig as C

    parser.add_argument("--items", default="arithmetic", help="arithmetic (the embedded task) or a JSONL/Parquet item file")
    parser.add_argument("--out", required=True, help="run folder (created; resumed if it holds the same run)")
    parser.add_argument("--domains", type=names, default=None, help="keep these domains (two or more)")
    parser.add_argument("--per-domain", type=positive_int, default=None, help="items per domain (default: all; task: 100)")
    parser.add_argument("--layer-sets", type=layer_sets, default=None,
                        help="';'-separated sets of layers forced together, e.g. '3;0,1,2,3' (default: each MoE layer "
                             "alone and all of them at once)")
    parser.add_argument("--kind", choices=list(FINGERPRINT_KINDS), default=default_of(C, "kind"),
                        help="fingerprint: mean router selection distribution or mean MoE input (default %(default)s)")
    parser.add_argument("--calibration-share", type=float, default=default_of(C, "calibration_share"),
                        help="share of each domain's items that calibrate (default %(default)s)")
    parser.add_argument("--floor-seeds", type=int, default=default_of(C, "floor_seeds"),
                        help="random-floor seeds (default %(default)s)")
    parser.add_argument("--seed", type=int, default=default_of(C, "seed"),
                        help="seed of the split, the floor and the bootstrap (default %(default)s)")
    parser.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=default_of(C, "accuracy"),
                        help="also generate greedy answers under each arm and check them (the arithmetic task; "
                             "default on)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=default_of(C, "max_new_tokens"),
                        help="generated tokens per answer at most (default %(default)s)")
    parser.add_argument("--score", choices=list(SCORES), default=default_of(C, "score"),
                        help="summary statistic: mean or first target-token log-prob (default %(default)s)")
    parser.add_argument("--alpha", type=float, default=default_of(C, "alpha"), help="FDR level (default %(default)s)")
    parser.add_argument("--bootstrap-resamples", type=positive_int, default=default_of(C, "bootstrap_resamples"),
                        help="bootstrap resamples (default %(default)s)")


def run(args) -> int:
    from routelens.api import run_semantic_route
    from routelens.config import SemanticRouteConfig
    from routelens.summary_table import print_semantic_route_summary

    config = SemanticRouteConfig(layer_sets=args.layer_sets, kind=args.kind, calibration_share=args.calibration_share,
                                 floor_seeds=args.floor_seeds, seed=args.seed, accuracy=args.accuracy,
                                 max_new_tokens=args.max_new_tokens, score=args.score, alpha=args.alpha,
                                 bootstrap_resamples=args.bootstrap_resamples)   # bad settings fail before loading
    ray = ray_from_args(args)
    result = run_semantic_route(load_lens(args), args.items, args.out, config=config, domains=args.domains,
                                per_domain=args.per_domain, overwrite=args.overwrite, show_progress=not args.no_progress,
                                ray=ray)
    print_semantic_route_summary(result.summary_dict)
    print(f"run folder: {args.out}")
    return 0
