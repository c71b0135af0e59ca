"""`routelens trajectories`: sample solutions, verify their final answers, write trajectories."""

from __future__ import annotations

import sys

from routelens.cli.parsing import (
    load_lens,
    model_options,
    positive_int,
    ray_from_args,
    ray_options,
    run_options,
    seed,
    temperature,
)
from routelens.errors import RouteLensError

NAME = "trajectories"
HELP = "sample solutions, verify them, write trajectories"
RESUMABLE = True
EPILOG = """examples:
  routelens trajectories --model demo --task arithmetic --n 200 --samples-per-problem 8 \\
      --temperature 0.8 --seed 0 --out traj.jsonl
  routelens trajectories --model ./my-qwen3-moe --problems aime.jsonl --samples-per-problem 4 \\
      --max-new-tokens 4096 --device cuda --out aime-traj.jsonl

Each record: id, problem_id, input_ids, completion_start, prompt, completion, verified
(final answer checked), finished (reached <eos>), and for arithmetic difficulty/domain/answer,
step_ok (per completion token: its step `a op b=c` right, wrong, or null) and steps_ok.

Problems are written as they are sampled into the run folder OUT.run beside the output
(run.json: the model, the seed and every setting); re-running the same command after an
interruption resumes there, and the output file is written once every problem is done.
"""


def parents():
    return [model_options(), run_options(), ray_options()]


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--task", choices=["arithmetic"], default=None, help="the embedded arithmetic task")
    source.add_argument("--problems", default=None, help='JSONL of {"id","prompt","answer"} (answers checked with math-verify)')
    parser.add_argument("--heldout", action="store_true",
                        help="arithmetic: take the problems from the held-out evaluation set instead of the analysis stream")
    parser.add_argument("--n", type=positive_int, default=200, help="problems (default 200; for --problems: the first N)")
    parser.add_argument("--samples-per-problem", type=positive_int, default=8, help="samples per problem (default 8)")
    parser.add_argument("--temperature", type=temperature, default=0.8, help="sampling temperature (default 0.8)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the problems and the sampling (default 0)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="generation limit (default 96 for arithmetic, 1024 for --problems)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="sequences per generate call")
    parser.add_argument("--out", required=True, help="output JSONL (its run folder, for resuming: OUT.run)")


def run(args) -> int:
    from routelens.api import sample_trajectories
    from routelens.results.run_folder import check_out_file_beside_run

    run_folder = check_out_file_beside_run(args.out, [args.problems, args.model], args.overwrite)
    if args.heldout:
        from routelens.data.arithmetic import heldout_problems

        heldout_problems(args.n)   # --n beyond the held-out set fails before any sampling
    if args.problems:
        from routelens.data.sampling import read_problem_file

        read_problem_file(args.problems)   # a bad problem file fails before the model loads
    ray = ray_from_args(args)
    lens = load_lens(args)
    if lens.tokenizer is None:
        raise RouteLensError(f"model {args.model!r} has no tokenizer; trajectories are generated from text")
    print(f"routelens: sampling {args.samples_per_problem} solution(s) per problem into {args.out} (problems are kept "
          f"as they are done in {run_folder}: re-run the same command to resume)", file=sys.stderr, flush=True)
    trajectories = sample_trajectories(
        lens, args.problems, n=args.n, samples_per_problem=args.samples_per_problem, temperature=args.temperature,
        seed=args.seed, heldout=args.heldout, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        out=args.out, overwrite=args.overwrite, show_progress=not args.no_progress, ray=ray)
    verified = sum(t.verified is True for t in trajectories)
    print(f"{len(trajectories)} trajectories, {verified} verified ({verified / max(len(trajectories), 1):.1%}); "
          f"written to {args.out}")
    return 0
