"""`routelens passk`: pass@k with bootstrap intervals; --compare base vs router-updated model."""

from __future__ import annotations

from routelens.cli.parsing import (
    default_of,
    int_list,
    load_lens,
    model_options,
    positive_int,
    ray_from_args,
    ray_options,
    run_options,
)
from routelens.errors import RouteLensError

NAME = "passk"
HELP = "pass@k with bootstrap intervals; --compare base vs router-updated model"
RESUMABLE = True
EPILOG = """examples:
  routelens passk --model demo --task arithmetic --n 500 --samples 16 --k 1,4,16 --out runs/passk
  routelens passk --model demo --router-delta runs/update/router_delta.safetensors --compare \\
      --task arithmetic --n 500 --samples 16 --k 1,2,4,8,16 --temperature 0.8 --seed 0 --out runs/passk-compare
  routelens passk --model ./my-qwen3-moe --problems aime.jsonl --samples 16 --max-new-tokens 8192 --out runs/aime
  routelens passk --model demo --task arithmetic --n 500 --samples 16 --out runs/passk --ray local --workers 2

--compare evaluates the base model and the model with --router-delta on the same problems
with the same sampling seeds, and reports the paired difference. With --ray, chunks of
problems are sampled on Ray actors; every sample draws from the generator of its (seed,
problem, sample), so the samples equal one process's, and a run resumes with or without --ray.
Python: routelens.run_passk(lens, "arithmetic", out="runs/passk", samples=16, k=[1, 4, 16]).
"""


def parents():
    return [model_options(), run_options(), ray_options()]


def add_arguments(parser) -> None:
    from routelens.config import PassKConfig as C

    problems = parser.add_mutually_exclusive_group()
    problems.add_argument("--task", choices=["arithmetic"], default=None, help="the embedded task's held-out problems")
    problems.add_argument("--problems", default=None, help='JSONL of {"id","prompt","answer"} (checked with math-verify)')
    parser.add_argument("--n", type=positive_int, default=None, help="first N problems (arithmetic default 500)")
    parser.add_argument("--samples", type=positive_int, default=default_of(C, "samples"),
                        help="samples per problem (default %(default)s)")
    parser.add_argument("--k", type=int_list, default=default_of(C, "ks"),
                        help="k values, comma-separated (default 1, 2, 4, ... up to --samples, and --samples)")
    parser.add_argument("--temperature", type=float, default=default_of(C, "temperature"),
                        help="sampling temperature (default %(default)s)")
    parser.add_argument("--seed", type=int, default=default_of(C, "seed"),
                        help="sampling and bootstrap seed (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="generation limit (default 96 for arithmetic, 1024 for --problems)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="sequences per generate call")
    parser.add_argument("--compare", action="store_true", help="evaluate the base model and the --router-delta model")
    parser.add_argument("--bootstrap-resamples", type=positive_int, default=default_of(C, "bootstrap_resamples"),
                        help="bootstrap resamples (default %(default)s)")
    parser.add_argument("--out", required=True, help="run folder (created; resumed if it holds the same run)")


def run(args) -> int:
    from routelens.api import make_config, run_passk
    from routelens.config import PassKConfig
    from routelens.summary_table import print_passk_summary

    if args.compare and not args.router_delta:
        raise RouteLensError("--compare needs --router-delta FILE (the updated model to compare with the base)")
    if args.problems is None and args.task is None and args.model != "demo":
        raise RouteLensError("give --problems FILE ({id, prompt, answer} records), or --task arithmetic")
    options = {"samples": args.samples, "ks": args.k, "temperature": args.temperature, "seed": args.seed,
               "bootstrap_resamples": args.bootstrap_resamples}
    options.update({k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("batch_size", args.batch_size)) if v})
    make_config(PassKConfig, **options)   # bad settings fail before the model loads
    ray = ray_from_args(args)
    delta = args.router_delta if args.compare else None
    if args.compare:   # the base first, then the delta applied in place: one load, same problems, same seeds
        args.router_delta = None
    result = run_passk(load_lens(args), args.problems or "arithmetic", args.out, compare_delta=delta, n=args.n,
                       overwrite=args.overwrite, show_progress=not args.no_progress, ray=ray, **options)
    print_passk_summary(result.summary_dict)
    print(f"run folder: {args.out} (samples.parquet, problems.parquet, summary.json, run.json)")
    return 0
