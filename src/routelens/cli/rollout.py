"""`routelens rollout`: continue scored tokens under the standard, best and a random route."""

from __future__ import annotations

from routelens.cli.parsing import default_of, load_lens, model_options, positive_int, ray_from_args, ray_options, run_options

NAME = "rollout"
HELP = "continue scored tokens under the standard, the best and a random alternative route; check the answers"
RESUMABLE = True
EPILOG = """examples:
  routelens rollout --model demo --counterfactual runs/demo/counterfactual --out runs/rollout
  routelens rollout --model demo --counterfactual runs/cf --tokens all --limit 100 --samples 8 \\
      --max-tokens 64 --temperature 0.8 --seed 0 --out runs/rollout-all
  routelens rollout --model ./my-olmoe --counterfactual runs/cf --tokens chosen.jsonl --checker math-verify \\
      --temperature 0 --out runs/rollout-greedy

Does the next-token proxy's better route also give a better final answer? For each chosen
token (default: Fragile tokens whose best alternative beats the standard route by more than
the run's --win-tolerance), the trajectory is continued from that token under three arms:
the standard route, the best alternative and a random alternative, each forced at that
token and layer only. Trajectory records need an "answer" field. Re-running the same
command on the same --out resumes where it stopped.
Python: routelens.run_rollout(lens, "runs/cf", out="runs/rollout", samples=8).
"""


def parents():
    return [model_options(), run_options(), ray_options()]


def add_arguments(parser) -> None:
    from routelens.config import CHECKERS
    from routelens.config import RolloutConfig as C

    parser.add_argument("--counterfactual", required=True, help="a complete counterfactual run folder of this model")
    parser.add_argument("--out", required=True, help="run folder (created; resumed if it holds the same run)")
    parser.add_argument("--tokens", default=default_of(C, "tokens"),
                        help="fragile (default: Fragile tokens whose best alternative wins by more than the run's "
                             "tolerance), all, or a JSONL/Parquet/CSV file of trajectory_id, position, layer rows")
    parser.add_argument("--samples", type=positive_int, default=default_of(C, "samples"),
                        help="continuations per arm and token (default %(default)s; 1 when greedy)")
    parser.add_argument("--max-tokens", type=positive_int, default=default_of(C, "max_new_tokens"),
                        help="tokens generated per continuation at most (default %(default)s)")
    parser.add_argument("--temperature", type=float, default=default_of(C, "temperature"),
                        help="sampling temperature (default %(default)s; 0: greedy)")
    parser.add_argument("--seed", type=int, default=default_of(C, "seed"),
                        help="seed of the sampling and of the random alternative (default %(default)s)")
    parser.add_argument("--checker", default=default_of(C, "checker"), choices=list(CHECKERS),
                        help="how final answers are checked (default %(default)s)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="keep at most this many chosen tokens, those with the largest gains")
    parser.add_argument("--bootstrap-resamples", type=positive_int, default=default_of(C, "bootstrap_resamples"),
                        help="bootstrap resamples of the intervals (default %(default)s)")


def run(args) -> int:
    from routelens.api import run_rollout
    from routelens.config import RolloutConfig
    from routelens.summary_table import print_rollout_summary

    config = RolloutConfig(tokens=args.tokens, samples=args.samples, max_new_tokens=args.max_tokens,
                           temperature=args.temperature, seed=args.seed, checker=args.checker, limit=args.limit,
                           bootstrap_resamples=args.bootstrap_resamples)   # bad settings fail before the model loads
    ray = ray_from_args(args)
    result = run_rollout(load_lens(args), args.counterfactual, args.out, config=config, overwrite=args.overwrite,
                         show_progress=not args.no_progress, ray=ray)
    print_rollout_summary(result.summary_dict)
    print(f"run folder: {args.out}")
    return 0
