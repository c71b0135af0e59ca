"""`routelens evaluate`: the demo model's card figures (not a general evaluation: see `passk`)."""

from __future__ import annotations

import json

from routelens.cli.parsing import load_lens, model_options, positive_int, run_options, seed, temperature
from routelens.errors import RouteLensError

NAME = "evaluate"
HELP = "a demo-style model's card: greedy accuracy, quick pass@k and router statistics on held-out arithmetic"
RESUMABLE = False
EPILOG = """examples:
  routelens evaluate --model demo --n 500 --samples 8 --temperature 0.8 --seed 0 --out eval.json
  routelens evaluate --model runs/demo-model --record     # after train-demo: into its card.json

This is the model card of the arithmetic task (greedy accuracy by difficulty, router
entropy and load per layer, pass@k point estimates). For pass@k with intervals, a
resumable run folder and base-vs-updated comparisons, use `routelens passk`.
"""


def parents():
    return [model_options(), run_options(resumable=False)]


def add_arguments(parser) -> None:
    parser.add_argument("--n", type=positive_int, default=500, help="held-out problems (default 500, 1-4 operations)")
    parser.add_argument("--samples", type=positive_int, default=8, help="samples per problem for pass@k (default 8)")
    parser.add_argument("--temperature", type=temperature, default=0.8, help="sampling temperature (default 0.8)")
    parser.add_argument("--seed", type=seed, default=0, help="sampling seed (default 0)")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if routelens wrote it (a file it did not write is never replaced)")
    parser.add_argument("--record", action="store_true",
                        help="also record the figures in the model folder's card.json (after train-demo)")


def run(args) -> int:
    import os

    from routelens.evaluation import evaluate_arithmetic
    from routelens.results.paths import check_out_file, write_output

    if args.out:   # checked before the model loads and minutes of sampling
        check_out_file(args.out, inputs=[args.model], overwrite=args.overwrite)
    if args.record:
        from routelens.demo_model import CARD, WEIGHTS_DIR

        folder = WEIGHTS_DIR if args.model == "demo" else args.model
        if not os.path.isfile(os.path.join(folder, CARD)):
            raise RouteLensError(f"--record writes the figures into the card.json of a model folder written by "
                                 f"`routelens train-demo`; {args.model} has none: drop --record, or use --out FILE")
    lens = load_lens(args)
    if lens.tokenizer is None:
        raise RouteLensError(f"model {args.model!r} has no tokenizer; the arithmetic task is text")
    report = evaluate_arithmetic(lens.loaded, args.n, args.samples, args.temperature, args.seed,
                                 show_progress=not args.no_progress)
    print(json.dumps({k: v for k, v in report.items() if k != "greedy_correct"}, indent=2))
    if args.out:
        write_output(args.out, json.dumps(report, indent=2, default=str) + "\n", "evaluate")
    if args.record:
        from routelens.evaluation import record_in_card

        record_in_card(lens.loaded, report)
    return 0
