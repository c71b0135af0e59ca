"""`routelens graft`: put donor experts into recipient slots; save a Hugging Face folder."""

from __future__ import annotations

import sys

from routelens.cli.parsing import config_from_args, config_options, names, positive_int, ray_from_args, ray_options, run_options
from routelens.errors import RouteLensError

NAME = "graft"
PER_DOMAIN = 50
HELP = "copy donor experts into recipient expert slots (one family, same shapes); save and evaluate the result"
RESUMABLE = True   # the same command again keeps the grafted folder (its graft.json) and resumes the evaluation
# (a Ctrl-C inside `run` is reported by what is on disk: pipeline.GraftInterrupted)
EPILOG = """examples:
  routelens graft --recipient demo --donor runs/mul-specialist --experts 3:5=3:5 --out runs/grafted
  routelens graft --recipient ./my-olmoe --donor ./other-olmoe --experts "3:5=3:9,7:0=7:12" --out runs/grafted \\
      --evaluate --items items.jsonl
  routelens graft --recipient demo --donor demo --experts 3:5=3:9 --out runs/grafted --evaluate --ray local

--experts "L:e=L2:e2,...": the donor's expert e2 at layer L2 goes into the recipient's expert
e at layer L; every other tensor stays the recipient's. The folder loads as the recipient's
checkpoint does (transformers' class for its type) and with --model in every routelens
command; graft.json records the
donor, the map, the sha256 of every tensor copied and replaced, and the files written.
Everything is checked (models, map, --out, and with --evaluate the items) before anything
is written; the folder is written beside --out and moved in only when whole. The same
command again keeps a complete grafted folder; another graft in --out is refused unless
--overwrite (which removes only the files its graft.json lists). --evaluate measures, on
the task's items, the natural score of recipient vs grafted (paired), how often the router
selects each grafted slot, and the grafted vs the original expert forced alone, into
<out>/evaluation (resumable: re-run the same command; --ray evaluates on Ray actors).
"""


def parents():
    from routelens.analyses.graft.config import GraftEvaluationConfig

    return [run_options(resumable=False), config_options(GraftEvaluationConfig, "evaluation (--evaluate)"),
            ray_options()]


def add_arguments(parser) -> None:
    parser.add_argument("--recipient", required=True, help="the model that receives experts (demo, folder, hub id)")
    parser.add_argument("--donor", required=True, help="the model whose experts are copied (same family)")
    parser.add_argument("--experts", required=True, help='"L:e=L2:e2,...": recipient slot <- donor expert')
    parser.add_argument("--out", required=True, help="a new (or empty) folder for the grafted model")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace another graft in --out: only the files its graft.json lists and its evaluation's "
                             "outputs are removed (nothing else is deleted)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="dtype to load and save in (default: the recipient checkpoint's own)")
    parser.add_argument("--evaluate", action="store_true", help="measure what the graft changed on the task's items")
    parser.add_argument("--items", default=None,
                        help="with --evaluate: arithmetic (the embedded task; default) or a JSONL/Parquet item file")
    parser.add_argument("--domains", type=names, default=None, help="with --evaluate: keep these domains")
    parser.add_argument("--per-domain", type=positive_int, default=None,
                        help=f"with --evaluate: items per domain (default {PER_DOMAIN})")
    parser.add_argument("--device", default="cpu", help="where the models are loaded and evaluated (default cpu)")


def run(args) -> int:
    from routelens.analyses.graft.config import GraftEvaluationConfig
    from routelens.analyses.graft.pipeline import GraftInterrupted, graft
    from routelens.analyses.graft.table import print_graft_evaluation

    config = config_from_args(GraftEvaluationConfig, args)   # bad settings fail before a model loads
    ray = ray_from_args(args)
    if ray is not None and not args.evaluate:
        raise RouteLensError("--ray runs the evaluation on Ray actors; give it with --evaluate")
    unused = [option for option, value in (("--items", args.items), ("--domains", args.domains),
                                           ("--per-domain", args.per_domain)) if value is not None]
    if unused and not args.evaluate:
        one = len(unused) == 1
        raise RouteLensError(f"{', '.join(unused)} choose{'s' if one else ''} the items of the evaluation, which runs only "
                             f"with --evaluate: give --evaluate, or drop {'it' if one else 'them'}")
    try:
        result = graft(args.recipient, args.donor, args.experts, args.out, dtype=args.dtype, evaluate=args.evaluate,
                       items=args.items or "arithmetic", domains=args.domains, per_domain=args.per_domain or PER_DOMAIN,
                       config=config, device=args.device, show_progress=not args.no_progress, ray=ray,
                       overwrite=args.overwrite)
    except GraftInterrupted as interrupted:
        print(f"routelens: interrupted; {interrupted}", file=sys.stderr)
        return 130
    pairs = ", ".join(pair["pair"] for pair in result.record["pairs"])
    if result.reused:
        print(f"kept {args.out}: it already holds this graft ({pairs} from {result.record['donor']}; graft.json)")
    else:
        print(f"grafted {pairs} from {result.record['donor']} into {result.record['recipient']}: {args.out} "
              f"(graft.json records the sha256 of every tensor copied and replaced)")
    if result.evaluation is not None:
        print_graft_evaluation(result.evaluation.summary_dict)
        print(f"evaluation run folder: {result.evaluation.path}")
    return 0
