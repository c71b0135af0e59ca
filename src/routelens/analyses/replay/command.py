"""`routelens replay`: an inference engine's routes against the model's own, and what each flip costs."""

from __future__ import annotations

from routelens.cli.parsing import (
    check_records_early,
    config_from_args,
    config_options,
    load_lens,
    model_options,
    positive_int,
    run_options,
)

NAME = "replay"
HELP = "audit an inference engine's routes against the model's own: flips per layer, margin, cost when forced"
RESUMABLE = True
EPILOG = """examples:
  routelens replay --model demo --trajectories traj.jsonl --routes-from sglang.jsonl --routes-format sglang \\
      --out runs/replay
  routelens replay --model demo --trajectories traj.jsonl --engine llama.cpp --gguf-type q4_0 --out runs/replay-q4
  routelens replay --model demo --trajectories traj.jsonl --compare-to dtype=bfloat16 --out runs/replay-bf16
  routelens replay --model ./my-olmoe --trajectories traj.jsonl --compare-to batch=8 --out runs/replay-batch

Per MoE layer: the flip rate (share of scored tokens whose engine expert set is not the
model's own) and the mean Jaccard; per token the layers that flip; the flip risk by the
router's margin (k-th minus (k+1)-th selection score) and by the Confident / Ambiguous /
Fragile bin of the natural p; and the cost: the model run with the engine's routes forced
at every layer at once (weights by the model's own gating rule) against its natural
routes, per scored token: next-token log-prob difference and KL(natural || replayed).
--compare-to audits a second Hugging Face run of the same model instead of an engine:
dtype=bfloat16|float16|float32 (a copy in that dtype), experts-implementation=eager|
grouped_mm|batched_mm, batch=N (the same tokens as row 0 of a right-padded batch of N).
Intervals: cluster bootstrap over problems (trajectories with a problem_id) or trajectories.
Re-running the same command on the same --out resumes.
Python: routelens.replay(lens, "traj.jsonl", routes, out="runs/replay").
"""


def parents():
    from routelens.analyses.replay.config import ReplayConfig

    return [model_options(), config_options(ReplayConfig, "replay audit"), run_options()]


def add_arguments(parser) -> None:
    parser.add_argument("--trajectories", required=True, help="JSONL or Parquet file of trajectories")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--routes-from", default=None, metavar="FILE",
                        help="the engine's routes (SGLang, vLLM, .npy, Parquet: see --routes-format)")
    source.add_argument("--engine", default=None, choices=("llama.cpp",),
                        help="run this engine on the trajectories and audit its routes (llama.cpp: the model written "
                             "as a GGUF of --gguf-type; needs the llama extra)")
    source.add_argument("--compare-to", default=None, metavar="SPEC",
                        help="a second Hugging Face run instead: dtype=bfloat16, experts-implementation=grouped_mm "
                             "or batch=N")
    from routelens.data.engine_routes_io import ROUTE_FORMAT_HELP, ROUTE_FORMATS

    parser.add_argument("--gguf-type", default="q8_0", choices=("f32", "f16", "q8_0", "q4_0"),
                        help="--engine llama.cpp: the GGUF type routelens writes of the model (default q8_0)")
    parser.add_argument("--gguf", default=None, metavar="FILE",
                        help="--engine llama.cpp: run this GGUF file instead (checked against the model)")
    parser.add_argument("--routes-format", default=None, choices=ROUTE_FORMATS + ("auto",),
                        help="the format of --routes-from (default auto: from the file); "
                             + "; ".join(f"{name}: {text}" for name, text in ROUTE_FORMAT_HELP.items()))
    parser.add_argument("--export", default=None, metavar="FILE.npz",
                        help="also write the engine's routes for training: [tokens, MoE layers, k] int16 per "
                             "trajectory and a JSON header, in one .npz (R3 trainers' shape), once the audit is done; "
                             "an existing file is replaced only with --overwrite and only if routelens wrote it")
    parser.add_argument("--out", required=True, help="run folder (created; resumed if it holds the same run)")
    parser.add_argument("--max-trajectories", type=positive_int, default=None, help="use the first N trajectories")


def run(args) -> int:
    from routelens.analyses.replay.config import ReplayConfig, parse_compare_to
    from routelens.analyses.replay.table import print_replay_summary
    from routelens.api import replay
    from routelens.data.engine_routes_io import check_export, check_routes_file
    from routelens.errors import RouteLensError

    # everything that can be told without the model is refused before it loads (a big one takes minutes)
    config = config_from_args(ReplayConfig, args)
    if args.compare_to is not None:
        parse_compare_to(args.compare_to)
    if args.routes_format is not None and args.routes_from is None:
        raise RouteLensError("--routes-format describes --routes-from; give --routes-from FILE")
    if args.export is not None and args.routes_from is None and args.engine is None:
        raise RouteLensError("--export writes an engine's routes for training; give them with --routes-from FILE or "
                             "--engine")
    if args.gguf is not None and args.engine is None:
        raise RouteLensError("--gguf is the file llama.cpp runs; give it with --engine llama.cpp")
    check_records_early(args.trajectories, "trajectory")
    if args.routes_from is not None:   # its form and format; read against the model and the trajectories below
        check_routes_file(args.routes_from, args.routes_format or "auto", option="routes_format")
    if args.export is not None:
        check_export(args.export, args.out, [args.trajectories, args.routes_from, args.gguf, args.model], args.overwrite)
    lens = load_lens(args)
    result = replay(lens, args.trajectories, args.routes_from, args.out, config=config, compare_to=args.compare_to,
                    routes_format=args.routes_format, max_trajectories=args.max_trajectories, export=args.export,
                    engine=args.engine, gguf_type=args.gguf_type, gguf=args.gguf,
                    overwrite=args.overwrite, show_progress=not args.no_progress)
    print_replay_summary(result.summary_dict)
    print(f"run folder: {args.out} (routes.parquet, tokens.parquet, summary.json, run.json)")
    if args.export is not None:
        print(f"export: {args.export} (the engine's routes, [tokens, MoE layers, k] int16 per trajectory)")
    return 0
