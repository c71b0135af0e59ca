"""`routelens rollout`: continue scored tokens under the standard, best and a random route."""

from __future__ import annotations

from routelens.cli.parsing import config_from_args, config_options, load_lens, model_options, ray_from_args, ray_options, run_options

NAME = "rollout"
HELP = "continue scored tokens under the standard, the best and a random alternative route; check the answers"
RESUMABLE = True
EPILOG = """examples:
  routelens rollout --model demo --counterfactual runs/demo/counterfactual --out runs/rollout
  routelens rollout --model demo --counterfactual runs/cf --tokens random --limit 100 --samples 8 \\
      --max-new-tokens 64 --temperature 0.8 --seed 0 --out runs/rollout-random
  routelens rollout --model demo --counterfactual runs/cf --tokens fragile --best-by realized \\
      --out runs/rollout-oracle       # the proxy's own choices: re-measures the proxy
  routelens rollout --model ./my-olmoe --counterfactual runs/cf --tokens chosen.jsonl --checker math-verify \\
      --include-wrong --temperature 0 --out runs/rollout-greedy

Does a better route also give a better final answer? For each chosen token (default:
every Fragile token, whatever its gain), the trajectory is continued from that token under
three arms: the standard route, the best alternative (default: the one that gives the
standard route's --top-tokens most probable next tokens the highest mean probability,
chosen without the trajectory's next token; --best-by realized: the highest log p of that
token, an oracle for the proxy) and a random alternative, each forced at that token and
layer only. Each arm's accuracy is split by whether its first emitted token is the
trajectory's, and each paired difference into the part via the first token and the part
beyond it. Trajectory records need an "answer" field; tokens of trajectories with a wrong
final answer only with --include-wrong. Re-running the same command on the same --out
resumes where it stopped.
Python: routelens.rollout(lens, "runs/cf", out="runs/rollout", samples=8).
"""


def parents():
    from routelens.analyses.rollout.config import RolloutConfig

    return [model_options(), config_options(RolloutConfig, "rollouts"), run_options(), ray_options()]


def add_arguments(parser) -> None:
    parser.add_argument("--counterfactual", required=True, help="a complete counterfactual run folder of this model")
    parser.add_argument("--out", required=True, help="run folder (created; resumed if it holds the same run)")


def run(args) -> int:
    from routelens.analyses.rollout.analysis import check_inputs
    from routelens.analyses.rollout.config import RolloutConfig
    from routelens.analyses.rollout.table import print_rollout_summary
    from routelens.api import rollout

    config = config_from_args(RolloutConfig, args)
    ray = ray_from_args(args)
    check_inputs(args.counterfactual, config)   # a damaged run or token file fails before the model loads
    result = rollout(load_lens(args), args.counterfactual, args.out, config=config, overwrite=args.overwrite,
                         show_progress=not args.no_progress, ray=ray)
    print_rollout_summary(result.summary_dict)
    print(f"run folder: {args.out}")
    return 0
