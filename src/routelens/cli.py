"""The `routelens` command. `main(argv)` returns the exit code, so tests can call it.

User errors (`RouteLensError`) and usage errors print one line and exit 2; a run-time
check that fails on the checkpoint (`RuntimeCheckFailed`) prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from routelens import __version__
from routelens.errors import RouteLensError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong and where to look), exit 2, and
    no option is taken for an abbreviation of another (`--layer` is not `--layers`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        extra = message.split("unrecognized arguments: ")[-1].split() if "unrecognized arguments" in message else []
        if extra and all(word.lstrip("-").isdigit() for word in extra):   # `--layers 0 -1`
            message += "; lists are comma-separated, e.g. --layers 0,-1"
        self.exit(2, f"routelens: error: {message} (see `{self.prog} --help`)\n")

EXAMPLES_COUNTERFACTUAL = """examples:
  routelens counterfactual --model ./my-olmoe --trajectories traj.jsonl --layers 0,-1 --out runs/cf
  routelens counterfactual --model allenai/OLMoE-1B-7B-0924 --trajectories traj.parquet \\
      --layers -1 --routes 32 --candidates 32 --seed 0 --device cuda --dtype bfloat16 --out runs/olmoe
  routelens counterfactual --model tiny:qwen3_moe --trajectories ids.jsonl --layers 0 --routes 8 --out runs/t

Re-running the same command on the same --out resumes where it stopped.
Trajectory records: {"id","prompt","completion"} (text) or {"id","input_ids","completion_start"};
an optional "verified" boolean is carried through (--only-verified keeps the true ones).
"""

EXAMPLES_INSPECT = """examples:
  routelens inspect --model ./my-olmoe
  routelens inspect --model tiny:deepseek_v3
"""

EXAMPLES_TRAJECTORIES = """examples:
  routelens trajectories --model demo --task arithmetic --n 200 --samples-per-problem 8 \\
      --temperature 0.8 --seed 0 --out traj.jsonl
  routelens trajectories --model ./my-qwen3-moe --problems aime.jsonl --samples-per-problem 4 \\
      --max-new-tokens 4096 --device cuda --out aime-traj.jsonl

Each record: id, problem_id, input_ids, completion_start, prompt, completion, verified
(final answer checked), finished (reached <eos>), and difficulty/domain/answer for arithmetic.
"""

EXAMPLES_EVALUATE = """examples:
  routelens evaluate --model demo --n 500 --samples 8 --temperature 0.8 --seed 0 --out eval.json
"""

EXAMPLES_ISOLATE = """examples:
  routelens isolate --model demo --task arithmetic --per-domain 100 --layers all --out runs/isolation
  routelens isolate --model ./my-qwen3-moe --items items.jsonl --layers 0,12,-1 --domains math,code \\
      --floor-seeds 5 --alpha 0.05 --device cuda --dtype bfloat16 --out runs/qwen-iso

Item records: {"id","domain","prompt","target"} (text; prompt and target tokenised separately)
or {"id","domain","prompt_ids","target_ids"}, in JSONL or Parquet.
Re-running the same command on the same --out resumes; --alpha, --score and
--bootstrap-resamples only change the summary and may differ on a re-run.
"""

EXAMPLES_ROUTER_UPDATE = """examples:
  routelens router-update --model demo --counterfactual runs/cf-last --out runs/update
  routelens router-update --model ./my-olmoe --counterfactual runs/cf-last --heldout-counterfactual runs/cf-heldout \\
      --margin 0.05 --bins Fragile,Ambiguous --beta 0.1 --lr 1e-5 --steps 300 --seed 0 --out runs/update

The counterfactual run must include the last MoE layer and come from the same model. Writes
router_delta.safetensors (apply with --router-delta FILE to any command), pairs.parquet,
training_log.jsonl, summary.json and run.json.
"""

EXAMPLES_PASSK = """examples:
  routelens passk --model demo --task arithmetic --n 500 --samples 16 --k 1,4,16 --out runs/passk
  routelens passk --model demo --router-delta runs/update/router_delta.safetensors --compare \\
      --task arithmetic --n 500 --samples 16 --k 1,2,4,8,16 --temperature 0.8 --seed 0 --out runs/passk-compare
  routelens passk --model ./my-qwen3-moe --problems aime.jsonl --samples 16 --max-new-tokens 8192 --out runs/aime

--compare evaluates the base model and the model with --router-delta on the same problems
with the same sampling seeds, and reports the paired difference.
"""

EXAMPLES_VERIFY = """examples:
  routelens verify --model demo
  routelens verify --model ./my-qwen3-moe --device cuda --dtype bfloat16 --json verify.json
  routelens verify --model tiny:deepseek_v3

Exit 0 when every check passes, 1 when one fails (the table names it), 2 on bad input.
"""

EXAMPLES_DEMO = """examples:
  routelens demo                       # embedded model: counterfactual (120 problems x 2 samples)
                                       # and isolation (50 items x 4 domains), into runs/demo
  routelens demo --out /tmp/demo --problems 32 --routes 16
"""


def _layers(text: str) -> list[int] | None:
    """'all' (None: every MoE layer) or comma-separated layer indices."""
    return None if text.strip().lower() == "all" else _int_list(text)


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names such as addsub,mul")
    return names


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,-1, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one layer index")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _memory(text: str) -> int:
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix):
            try:
                size = int(float(lowered[: -len(suffix)]) * factor)
            except ValueError:
                break
            if size <= 0:
                raise argparse.ArgumentTypeError(f"a memory budget must be positive, got {text!r}")
            return size
    raise argparse.ArgumentTypeError(f"expected a size such as 512MiB or 8GiB, got {text!r}")


def _add_model_options(parser: argparse.ArgumentParser, with_model: bool = True) -> None:
    if with_model:
        parser.add_argument("--model", default="demo",
                            help="demo (the embedded model, default), a local folder (save_pretrained), "
                                 "a hub id, or tiny:<model_type> (random tiny model)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on cpu, bfloat16 on cuda), float32, bfloat16, float16")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    parser.add_argument("--router-delta", default=None, metavar="FILE",
                        help="apply a router update (a `routelens router-update` delta file) to the model first")
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="spread a model too large for one device (accelerate): auto, balanced, or JSON "
                             "{module: device} with devices cpu, cuda:N, N or disk; replaces --device")
    parser.add_argument("--experts-implementation", default=None, choices=["eager", "grouped_mm", "batched_mm"],
                        help="transformers' expert kernels (default: transformers' choice; results do not depend on it)")


def _add_counterfactual_options(parser: argparse.ArgumentParser, layers_default: str | None) -> None:
    parser.add_argument("--layers", type=_int_list, default=None if layers_default is None else _int_list(layers_default),
                        required=layers_default is None,
                        help="decoder-layer indices, comma-separated; negative counts from the end")
    parser.add_argument("--routes", type=_positive_int, default=32, help="alternative routes S per token (default 32)")
    parser.add_argument("--candidates", type=_positive_int, default=None,
                        help="sample alternatives from the router's top-M experts (default min(32, E))")
    parser.add_argument("--temperature", type=float, default=1.0, help="Gumbel-top-k temperature (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the route sampling and bootstrap (default 0)")
    parser.add_argument("--confident", type=float, default=0.9, help="Confident bin: route-averaged p >= this")
    parser.add_argument("--fragile", type=float, default=0.5, help="Fragile bin: route-averaged p < this")
    parser.add_argument("--engine", default="fast", choices=["fast", "cache", "reference"],
                        help="scoring engine: fast (default; exact, batched; the cache engine for layers it cannot "
                             "patch), cache (the model's own cache, one decode step per token) or reference "
                             "(plain forwards)")
    parser.add_argument("--memory-budget", type=_memory, default="2GiB",
                        help="fast engine: memory for one chunk of perturbed sequences, e.g. 512MiB, 8GiB (default 2GiB)")
    parser.add_argument("--route-batch-size", type=_positive_int, default=33, help="routes per forward (reference engine)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run with a different config in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_isolation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=_layers, default=None,
                        help="'all' (default: every MoE layer) or decoder-layer indices, comma-separated")
    parser.add_argument("--domains", type=_names, default=None,
                        help="keep these domains, comma-separated (default: all in the items)")
    parser.add_argument("--per-domain", type=_positive_int, default=None,
                        help="first N items of each domain (default: all; the arithmetic task has 100 per domain)")
    parser.add_argument("--floor-seeds", type=int, default=5,
                        help="random-routing floor: uniformly random k-expert routes per token, one per seed (default 5)")
    parser.add_argument("--alpha", type=float, default=0.05, help="FDR level of the BH step-up (default 0.05)")
    parser.add_argument("--score", choices=["mean", "first"], default="mean",
                        help="cell statistic: mean target-token log-prob (default) or the first target token's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the floor routes and the bootstrap (default 0)")
    parser.add_argument("--bootstrap-resamples", type=_positive_int, default=2000,
                        help="bootstrap resamples of the calibration interval (default 2000)")
    parser.add_argument("--memory-budget", type=_memory, default="2GiB",
                        help="memory for one batch of conditions, e.g. 512MiB, 8GiB (default 2GiB)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="routelens", description="Audit the routers of Mixture-of-Experts language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"routelens {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cf = commands.add_parser("counterfactual", help="score the standard route against sampled equal-compute routes",
                             epilog=EXAMPLES_COUNTERFACTUAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(cf)
    cf.add_argument("--trajectories", required=True, help="JSONL or Parquet file of trajectories")
    cf.add_argument("--out", required=True, help="run folder (created; resumed if it holds the same run)")
    cf.add_argument("--max-trajectories", type=_positive_int, default=None, help="use the first N trajectories")
    cf.add_argument("--only-verified", action="store_true", help='keep trajectories with "verified": true')
    _add_counterfactual_options(cf, layers_default=None)

    isolate = commands.add_parser("isolate", help="force single experts layer by layer, with statistics and a random floor",
                                  epilog=EXAMPLES_ISOLATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(isolate)
    items = isolate.add_mutually_exclusive_group()
    items.add_argument("--items", default=None, help="JSONL or Parquet of items {id, domain, prompt, target}")
    items.add_argument("--task", choices=["arithmetic"], default=None,
                       help="the embedded arithmetic task's four domains (the default for --model demo)")
    isolate.add_argument("--out", required=True, help="run folder (created; resumed if it holds the same run)")
    _add_isolation_options(isolate)
    isolate.add_argument("--overwrite", action="store_true", help="replace a run with a different config in --out")
    isolate.add_argument("--no-progress", action="store_true", help="no progress bar")

    update = commands.add_parser("router-update", help="retrain the last MoE layer's router alone from counterfactual preferences",
                                 epilog=EXAMPLES_ROUTER_UPDATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(update)
    update.add_argument("--counterfactual", required=True, help="counterfactual run folder with the last MoE layer")
    update.add_argument("--heldout-counterfactual", default=None,
                        help="another counterfactual run: report the share of its tokens whose standard route changed")
    update.add_argument("--out", required=True, help="output folder")
    update.add_argument("--margin", type=float, default=0.05, help="preferred route beats the standard by >= this probability (default 0.05)")
    update.add_argument("--bins", type=_names, default=["Fragile", "Ambiguous"], help="token bins to learn from (default Fragile,Ambiguous)")
    update.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    update.add_argument("--lr", type=float, default=1e-5,
                        help="Adam learning rate (default 1e-5: a minimal update; 1e-4 and up moved most routes on the demo model)")
    update.add_argument("--steps", type=_positive_int, default=300, help="optimizer steps (default 300)")
    update.add_argument("--batch-size", type=_positive_int, default=256, help="pairs per step (default 256)")
    update.add_argument("--seed", type=int, default=0, help="seed of the minibatch order (default 0)")
    update.add_argument("--overwrite", action="store_true", help="replace an update with a different config in --out")
    update.add_argument("--no-progress", action="store_true", help="no progress bar")

    passk = commands.add_parser("passk", help="pass@k with bootstrap intervals; --compare base vs router-updated model",
                                epilog=EXAMPLES_PASSK, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(passk)
    problems = passk.add_mutually_exclusive_group()
    problems.add_argument("--task", choices=["arithmetic"], default=None, help="the embedded task's held-out problems")
    problems.add_argument("--problems", default=None, help='JSONL of {"id","prompt","answer"} (checked with math-verify)')
    passk.add_argument("--n", type=_positive_int, default=None, help="first N problems (arithmetic default 500)")
    passk.add_argument("--samples", type=_positive_int, default=16, help="samples per problem (default 16)")
    passk.add_argument("--k", type=_int_list, default=[1, 2, 4, 8, 16], help="k values, comma-separated (default 1,2,4,8,16)")
    passk.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    passk.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default 0)")
    passk.add_argument("--max-new-tokens", type=_positive_int, default=None,
                       help="generation limit (default 96 for arithmetic, 1024 for --problems)")
    passk.add_argument("--batch-size", type=_positive_int, default=None, help="sequences per generate call")
    passk.add_argument("--compare", action="store_true", help="evaluate the base model and the --router-delta model")
    passk.add_argument("--bootstrap-resamples", type=_positive_int, default=2000, help="bootstrap resamples (default 2000)")
    passk.add_argument("--out", required=True, help="run folder (created; resumed if it holds the same run)")
    passk.add_argument("--overwrite", action="store_true", help="replace a run with a different config in --out")
    passk.add_argument("--no-progress", action="store_true", help="no progress bar")

    report = commands.add_parser("report", help="figures and a self-contained HTML report of run folders",
                                 epilog="examples:\n  routelens report runs/demo/counterfactual\n"
                                        "  routelens report runs/cf runs/isolation runs/passk --out report.html",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="counterfactual, isolation, router-update or passk run folders")
    report.add_argument("--out", default=None,
                        help="HTML file (default RUN_DIR/report.html for one folder, routelens-report.html for several)")

    commands.add_parser("models", help="list the supported MoE families")

    verify = commands.add_parser("verify", help="check routing, overrides, engines and scorer on a checkpoint",
                                 epilog=EXAMPLES_VERIFY, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(verify)
    verify.add_argument("--length", type=_positive_int, default=32, help="tokens of the random test sequence (default 32)")
    verify.add_argument("--seed", type=int, default=0, help="seed of the test sequence and routes (default 0)")
    verify.add_argument("--json", default=None, metavar="FILE", help="also write the table (and the model) to this JSON file")

    inspect = commands.add_parser("inspect", help="show a model's MoE layers, experts, top-k and gating rule",
                                  epilog=EXAMPLES_INSPECT, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(inspect)

    demo = commands.add_parser("demo", help="counterfactual analysis and expert isolation end to end on the built-in model",
                               epilog=EXAMPLES_DEMO, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--out", default=os.path.join("runs", "demo"), help="demo folder (default runs/demo)")
    _add_model_options(demo, with_model=False)
    demo.add_argument("--problems", type=_positive_int, default=120, help="arithmetic problems to sample (default 120)")
    demo.add_argument("--samples-per-problem", type=_positive_int, default=2, help="solutions per problem (default 2)")
    demo.add_argument("--sample-temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    demo.add_argument("--isolation-per-domain", type=_positive_int, default=50,
                      help="isolation study: items per arithmetic domain (default 50, at most 100)")
    _add_counterfactual_options(demo, layers_default="0")
    demo.set_defaults(layers=None)  # None: first, middle and last MoE layer
    traj = commands.add_parser("trajectories", help="sample solutions, verify them, write trajectories",
                               epilog=EXAMPLES_TRAJECTORIES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(traj)
    source = traj.add_mutually_exclusive_group()
    source.add_argument("--task", choices=["arithmetic"], default=None, help="the embedded arithmetic task")
    source.add_argument("--problems", default=None, help='JSONL of {"id","prompt","answer"} (answers checked with math-verify)')
    traj.add_argument("--heldout", action="store_true",
                      help="arithmetic: take the problems from the held-out evaluation set instead of the analysis stream")
    traj.add_argument("--n", type=_positive_int, default=200, help="problems (default 200; for --problems: the first N)")
    traj.add_argument("--samples-per-problem", type=_positive_int, default=8, help="samples per problem (default 8)")
    traj.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    traj.add_argument("--seed", type=int, default=0, help="seed of the problems and the sampling (default 0)")
    traj.add_argument("--max-new-tokens", type=_positive_int, default=None,
                      help="generation limit (default 96 for arithmetic, 1024 for --problems)")
    traj.add_argument("--batch-size", type=_positive_int, default=None, help="sequences per generate call")
    traj.add_argument("--out", required=True, help="output JSONL")
    traj.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = commands.add_parser("evaluate", help="accuracy on held-out arithmetic and router statistics",
                                   epilog=EXAMPLES_EVALUATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_options(evaluate)
    evaluate.add_argument("--n", type=_positive_int, default=500, help="held-out problems (default 500, 1-4 operations)")
    evaluate.add_argument("--samples", type=_positive_int, default=8, help="samples per problem for pass@k (default 8)")
    evaluate.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    evaluate.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    evaluate.add_argument("--out", default=None, help="write the figures to this JSON file")
    evaluate.add_argument("--record", action="store_true",
                          help="also record the figures in the model folder's card.json (after train-demo)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")

    train = commands.add_parser("train-demo", help="train the embedded demo model from scratch",
                                epilog="examples:\n  routelens train-demo --out runs/demo-model --seed 0",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--out", required=True, help="folder for the trained model (save_pretrained layout)")
    train.add_argument("--seed", type=int, default=0, help="seed of initialisation, data and order (default 0)")
    train.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps (default: the shipped model's)")
    train.add_argument("--threads", type=_positive_int, default=None,
                       help="torch CPU threads (default 1, as the shipped weights: thread counts change float "
                            "summation order, so only the same count reproduces them bit for bit)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def load_from_args(args, model: str | None = None):
    """The model named by --model (or `model`), with --device, --dtype and --router-delta."""
    from routelens.models.loading import load_model


    return load_model(model or args.model, args.device, args.dtype, args.trust_remote_code,
                      router_delta=getattr(args, "router_delta", None), device_map=args.device_map,
                      experts_implementation=args.experts_implementation)


def cmd_trajectories(args) -> int:
    from routelens.data.sampling import arithmetic_trajectories, file_trajectories, write_trajectories

    from routelens.results.run_folder import check_out_file

    if args.problems is None and args.task is None:
        args.task = "arithmetic"
    check_out_file(args.out)
    if args.heldout:
        from routelens.data.arithmetic import heldout_problems

        heldout_problems(args.n)   # --n beyond the held-out set fails before any sampling
    loaded = load_from_args(args)
    if loaded.tokenizer is None:
        raise RouteLensError(f"model {args.model!r} has no tokenizer; trajectories are generated from text")
    options = dict(samples_per_problem=args.samples_per_problem, temperature=args.temperature, seed=args.seed,
                   show_progress=not args.no_progress)
    if args.max_new_tokens:
        options["max_new_tokens"] = args.max_new_tokens
    if args.problems:
        from routelens.data.sampling import read_problem_file

        read_problem_file(args.problems)   # a bad problem file fails before the announcement below
    print(f"routelens: sampling {args.samples_per_problem} solution(s) per problem into {args.out}; this command does "
          "not resume (the file is written at the end), so an interrupted run samples again", file=sys.stderr, flush=True)
    if args.problems:
        records = file_trajectories(loaded.adapter.model, loaded.tokenizer, args.problems, args.n,
                                    batch_size=args.batch_size or 16, **options)
    else:
        records = arithmetic_trajectories(loaded.adapter.model, loaded.tokenizer, args.n,
                                          batch_size=args.batch_size or 256, heldout=args.heldout, **options)
    write_trajectories(records, args.out)
    verified = sum(r["verified"] for r in records)
    print(f"{len(records)} trajectories, {verified} verified ({verified / max(len(records), 1):.1%}); written to {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from routelens.evaluation import evaluate_arithmetic

    loaded = load_from_args(args)
    if loaded.tokenizer is None:
        raise RouteLensError(f"model {args.model!r} has no tokenizer; the arithmetic task is text")
    report = evaluate_arithmetic(loaded, args.n, args.samples, args.temperature, args.seed,
                                 show_progress=not args.no_progress)
    print(json.dumps({k: v for k, v in report.items() if k != "greedy_correct"}, indent=2))
    if args.out:
        from routelens.results.run_folder import write_json_atomic

        write_json_atomic(args.out, report)
    if args.record:
        from routelens.evaluation import record_in_card

        record_in_card(loaded, report)
    return 0


def cmd_train_demo(args) -> int:
    from routelens.demo_model.train import TrainConfig, train

    config = TrainConfig(seed=args.seed)
    config.steps = args.steps or config.steps
    config.threads = args.threads or config.threads
    card = train(args.out, config, show_progress=not args.no_progress)
    print(f"trained in {card['train_seconds']} s, final loss {card['final_loss_mean_last_100']:.4f}; saved to {args.out}")
    return 0


def cmd_models(args) -> int:
    from routelens.models.registry import ADAPTERS, adapter_class

    rows = [(model_type, adapter_class(model_type)) for model_type in ADAPTERS]
    width = max(len(cls.__name__) for _, cls in rows)
    mixers = max(len(cls.layer_mixers) for _, cls in rows)
    print(f"{'model type':<18} {'adapter':<{width}} {'layers':<{mixers}} gating rule")
    for model_type, cls in rows:
        print(f"{model_type:<18} {cls.__name__:<{width}} {cls.layer_mixers:<{mixers}} {cls.gating_rule}")
    hybrids = sum(cls.layer_mixers != "attention" for _, cls in rows)
    print(f"{len(rows)} model types ({hybrids} hybrids: the cache engine scores the layers the fast engine cannot patch)")
    return 0


def cmd_verify(args) -> int:
    from routelens.results.run_folder import check_out_file, write_json_atomic
    from routelens.verify import format_table, verify_model

    if args.json:
        check_out_file(args.json, "--json")
    loaded = load_from_args(args)
    table = verify_model(loaded, length=args.length, seed=args.seed)
    print(format_table(table))
    failed = table[table["status"] == "fail"]
    if args.json:
        write_json_atomic(args.json, {"model": loaded.adapter.describe(), "device": loaded.device, "dtype": loaded.dtype,
                                      "length": args.length, "seed": args.seed, "passed": failed.empty,
                                      "checks": table.astype(object).where(table.notna(), None).to_dict("records")})
    if failed.empty:
        skipped = int((table["status"] == "skipped").sum())
        print(f"all {len(table) - skipped} checks passed on {len(loaded.adapter.moe_layers)} MoE layers"
              + (f" ({skipped} skipped, reason in the table)" if skipped else ""))
        return 0
    names = ", ".join(f"{r.check} (layer {r.layer})" for r in failed.itertuples())
    print(f"routelens: verify: {len(failed)} of {len(table)} checks failed: {names}", file=sys.stderr)
    return 1


def cmd_inspect(args) -> int:

    loaded = load_from_args(args)
    info = loaded.adapter.describe()
    info.update(device=loaded.device, dtype=loaded.dtype, tokenizer=type(loaded.tokenizer).__name__ if loaded.tokenizer else None)
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _config_from(args, layers: list[int]):
    from routelens.analyses.counterfactual import CounterfactualConfig

    if not 0 <= args.fragile <= args.confident <= 1:
        raise RouteLensError(f"need 0 <= --fragile ({args.fragile}) <= --confident ({args.confident}) <= 1")
    return CounterfactualConfig(
        layers=layers, num_routes=args.routes, num_candidates=args.candidates, temperature=args.temperature,
        seed=args.seed, confident=args.confident, fragile=args.fragile, engine=args.engine,
        route_batch_size=args.route_batch_size, memory_budget=args.memory_budget,
    )


def run_counterfactual_command(model: str, trajectories_path: str, out: str, args, layers: list[int],
                               max_trajectories=None, only_verified=False, preloaded=None) -> dict:
    from routelens.analyses.counterfactual import run_counterfactual
    from routelens.data.trajectories import file_sha256, load_trajectories

    config = _config_from(args, layers)
    loaded = preloaded or load_from_args(args, model)
    trajectories = load_trajectories(trajectories_path, loaded.tokenizer, loaded.adapter.config.vocab_size,
                                     only_verified=only_verified, limit=max_trajectories,
                                     max_length=loaded.adapter.context_length)
    data_info = {"trajectories": os.path.abspath(trajectories_path), "trajectories_sha256": file_sha256(trajectories_path),
                 "max_trajectories": max_trajectories, "only_verified": only_verified,
                 "num_trajectories": len(trajectories)}
    return run_counterfactual(loaded, trajectories, config, out, data_info, overwrite=args.overwrite,
                              show_progress=not args.no_progress)


def cmd_counterfactual(args) -> int:
    from routelens.summary_table import print_summary

    summary = run_counterfactual_command(args.model, args.trajectories, args.out, args, args.layers,
                                         args.max_trajectories, args.only_verified)
    print_summary(summary)
    print(f"run folder: {args.out}")
    return 0


def cmd_isolate(args) -> int:
    from routelens.analyses.isolation import IsolationConfig, run_isolation
    from routelens.data.target_items import arithmetic_items, load_items
    from routelens.summary_table import print_isolation_summary

    config = IsolationConfig(layers=args.layers, floor_seeds=args.floor_seeds, seed=args.seed, alpha=args.alpha,
                             score=args.score, bootstrap_resamples=args.bootstrap_resamples,
                             memory_budget=args.memory_budget)
    config.check()
    if args.items is None and args.task is None and args.model != "demo":
        raise RouteLensError("give --items FILE ({id, domain, prompt, target} records), or --task arithmetic")
    loaded = load_from_args(args)
    if args.layers:
        loaded.adapter.resolve_layers(args.layers)  # a dense or out-of-range layer fails before any item is read
    if args.items:
        from routelens.data.trajectories import file_sha256

        items = load_items(args.items, loaded.tokenizer, loaded.adapter.config.vocab_size, args.domains, args.per_domain,
                           max_length=loaded.adapter.context_length)
        data_info = {"items": os.path.abspath(args.items), "items_sha256": file_sha256(args.items)}
    else:
        if loaded.tokenizer is None:
            raise RouteLensError(f"model {args.model!r} has no tokenizer; the arithmetic task is text")
        items = arithmetic_items(loaded.tokenizer, args.per_domain or 100, args.domains)
        data_info = {"items": "task:arithmetic"}
    data_info.update(domains=args.domains, per_domain=args.per_domain, num_items=len(items))
    summary = run_isolation(loaded, items, config, args.out, data_info, overwrite=args.overwrite,
                            show_progress=not args.no_progress)
    print_isolation_summary(summary)
    print(f"run folder: {args.out} (isolation.parquet, cells.parquet, calibration.parquet, summary.json, run.json)")
    return 0


def cmd_router_update(args) -> int:
    from routelens.analyses.router_update import RouterUpdateConfig, run_router_update

    config = RouterUpdateConfig(margin=args.margin, bins=args.bins, beta=args.beta, learning_rate=args.lr,
                                steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    config.check()
    loaded = load_from_args(args)
    summary = run_router_update(loaded, args.counterfactual, config, args.out, args.heldout_counterfactual,
                                overwrite=args.overwrite, show_progress=not args.no_progress)
    print(f"{summary['pairs']} preference pairs on {summary['pair_tokens']} tokens at layer {summary['layer']}; "
          f"loss {summary['loss_first_step']:.4f} -> {summary['loss_last_step']:.4f}; preferred route ranked higher "
          f"{summary['preference_accuracy_before']:.1%} -> {summary['preference_accuracy_after']:.1%}")
    print(f"{summary['parameters_checked']} parameters and buffers hashed; changed: {', '.join(summary['parameters_changed']) or 'none'}")
    changes = summary.get("heldout_route_changes")
    if changes:
        print("held-out tokens whose standard route changed: " + "; ".join(
            f"{b} {changes[b]['route_changed']}/{changes[b]['tokens']}" for b in ("Fragile", "Ambiguous", "Confident", "All")))
    print(f"router delta: {summary['router_delta']} (apply with --router-delta)")
    return 0


def cmd_passk(args) -> int:
    from routelens.analyses.passk import PassKConfig, arithmetic_problems, file_problems, run_passk
    from routelens.models.loading import load_model

    if args.compare and not args.router_delta:
        raise RouteLensError("--compare needs --router-delta FILE (the updated model to compare with the base)")
    if args.problems is None and args.task is None and args.model != "demo":
        raise RouteLensError("give --problems FILE ({id, prompt, answer} records), or --task arithmetic")
    is_file = args.problems is not None
    config = PassKConfig(samples=args.samples, ks=args.k, temperature=args.temperature, seed=args.seed,
                         max_new_tokens=args.max_new_tokens or (1024 if is_file else 96),
                         checker="math-verify" if is_file else "arithmetic",
                         bootstrap_resamples=args.bootstrap_resamples, batch_size=args.batch_size or (16 if is_file else 256))
    config.check()
    if args.compare:  # the base first, then the delta applied in place: one load, same problems, same seeds
        loaded = load_model(args.model, args.device, args.dtype, args.trust_remote_code, device_map=args.device_map,
                            experts_implementation=args.experts_implementation)
        arms = [("base", None), ("updated", args.router_delta)]
    else:
        loaded = load_from_args(args)
        arms = [("model", None)]
    if loaded.tokenizer is None:
        raise RouteLensError(f"model {args.model!r} has no tokenizer; pass@k samples text")
    if is_file:
        from routelens.data.trajectories import file_sha256

        problems = file_problems(loaded.tokenizer, args.problems, args.n)
        data_info = {"problems": os.path.abspath(args.problems), "problems_sha256": file_sha256(args.problems)}
    else:
        problems = arithmetic_problems(loaded.tokenizer, args.n or 500)
        data_info = {"problems": "task:arithmetic (held-out set)"}
    data_info["num_problems"] = len(problems)
    summary = run_passk(loaded, problems, config, args.out, data_info, arms, overwrite=args.overwrite,
                        show_progress=not args.no_progress)
    from routelens.summary_table import print_passk_summary

    print_passk_summary(summary)
    print(f"run folder: {args.out} (samples.parquet, problems.parquet, summary.json, run.json)")
    return 0


def cmd_report(args) -> int:
    from routelens.report.build import build_report
    from routelens.results.run_folder import check_out_file

    if args.out:
        check_out_file(args.out)
    path = build_report(args.runs, args.out)
    print(f"report: {path} (figures as PNG and SVG in each run folder's figures/)")
    return 0


def cmd_demo(args) -> int:
    from routelens.demo import run_demo

    return run_demo(args)


COMMANDS = {"trajectories": cmd_trajectories, "evaluate": cmd_evaluate, "train-demo": cmd_train_demo, "models": cmd_models, "inspect": cmd_inspect, "counterfactual": cmd_counterfactual, "demo": cmd_demo,
            "isolate": cmd_isolate, "router-update": cmd_router_update, "passk": cmd_passk,
            "report": cmd_report, "verify": cmd_verify}


# commands whose output is written as they go and picked up again by the same command
RESUMABLE = {"counterfactual", "isolate", "passk", "demo"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:   # also during the imports below, which take seconds
        if args.command in RESUMABLE:
            print("routelens: interrupted; the units done are kept (run.json shows how many): "
                  "re-run the same command to resume", file=sys.stderr)
        else:
            print(f"routelens: interrupted; `{args.command}` does not resume: nothing was written, "
                  "re-running starts again from the beginning", file=sys.stderr)
        return 130


def _run(args) -> int:
    from transformers.utils import logging as hf_logging

    from routelens.engine.checks import RuntimeCheckFailed
    from routelens.models.loading import experts_kernel_error

    hf_logging.disable_progress_bar()  # our own progress bars say what is going on
    try:
        return COMMANDS[args.command](args)
    except RuntimeCheckFailed as error:
        print(f"routelens: check failed: {error}", file=sys.stderr)
        return 1
    except RouteLensError as error:
        print(f"routelens: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        translated = experts_kernel_error(error)
        if translated is None:
            raise
        print(f"routelens: error: {translated}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
