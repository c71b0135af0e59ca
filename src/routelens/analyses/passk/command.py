"""`routelens passk`: pass@k with bootstrap intervals; --compare base vs router-updated model."""

from __future__ import annotations

from routelens.cli.parsing import config_options, load_lens, model_options, positive_int, ray_from_args, ray_options, run_options
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
Python: routelens.passk(lens, "arithmetic", out="runs/passk", samples=16, k=[1, 4, 16]).
"""


def parents():
    from routelens.analyses.passk.config import PassKConfig

    return [model_options(), run_options(), ray_options(),
            config_options(PassKConfig, "pass@k", defaults={"max_new_tokens": None, "batch_size": None, "checker": None},
                           helps={"max_new_tokens": "generation limit (default 96 for arithmetic, 1024 for --problems)",
                                  "batch_size": "sequences per generate call (default 256 for arithmetic, 16 for "
                                                "--problems)",
                                  "checker": "how answers are checked (default arithmetic for the task, math-verify "
                                             "for --problems)"})]


def add_arguments(parser) -> None:
    problems = parser.add_mutually_exclusive_group()
    problems.add_argument("--task", choices=["arithmetic"], default=None, help="the embedded task's held-out problems")
    problems.add_argument("--problems", default=None, help='JSONL of {"id","prompt","answer"} (checked with math-verify)')
    parser.add_argument("--n", type=positive_int, default=None, help="first N problems (arithmetic default 500)")
    parser.add_argument("--compare", action="store_true", help="evaluate the base model and the --router-delta model")
    parser.add_argument("--out", required=True, help="run folder (created; resumed if it holds the same run)")


def run(args) -> int:
    import dataclasses

    from routelens.analyses.passk.config import PassKConfig
    from routelens.analyses.passk.table import print_passk_summary
    from routelens.api import make_config, passk

    if args.compare and not args.router_delta:
        raise RouteLensError("--compare needs --router-delta FILE (the updated model to compare with the base)")
    if args.problems is None and args.task is None and args.model != "demo":
        raise RouteLensError("give --problems FILE ({id, prompt, answer} records), or --task arithmetic")
    # the options given (those left at None take the defaults of the problems: routelens.passk)
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(PassKConfig) if getattr(args, f.name) is not None}
    make_config(PassKConfig, **options)   # bad settings fail before the model loads
    ray = ray_from_args(args)
    if args.problems:
        from routelens.data.sampling import read_problem_file

        read_problem_file(args.problems)   # a bad problem file fails before the model loads
    delta = args.router_delta if args.compare else None
    if args.compare:   # the base first, then the delta applied in place: one load, same problems, same seeds
        args.router_delta = None
    result = passk(load_lens(args), args.problems or "arithmetic", args.out, compare_delta=delta, n=args.n,
                   overwrite=args.overwrite, show_progress=not args.no_progress, ray=ray, **options)
    print_passk_summary(result.summary_dict)
    print(f"run folder: {args.out} (samples.parquet, problems.parquet, summary.json, run.json)")
    return 0
