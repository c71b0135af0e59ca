"""`routelens train-demo`: train the embedded demo model from scratch."""

from __future__ import annotations

from routelens.cli.parsing import names, positive_int, run_options, seed

NAME = "train-demo"
HELP = "train the embedded demo model from scratch"
RESUMABLE = False
EPILOG = """examples:
  routelens train-demo --out runs/demo-model --seed 0
  routelens train-demo --out runs/mul-specialist --domains mul --steps 300   # a grafting donor
"""


def parents():
    return [run_options(resumable=False)]


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="folder for the trained model (save_pretrained layout)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of initialisation, data and order (default 0)")
    parser.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: the shipped model's)")
    parser.add_argument("--domains", type=names, default=None,
                        help="train on these arithmetic domains only (addsub, mul, mixed, long; default all): a "
                             "specialist with the demo model's shapes, e.g. a donor for `routelens graft`")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default 1, as the shipped weights: thread counts change float "
                             "summation order, so only the same count reproduces them bit for bit)")


def run(args) -> int:
    from routelens.demo_model.train import TrainConfig, train
    from routelens.results.paths import check_new_folder

    check_new_folder(args.out)   # before minutes of training
    config = TrainConfig(seed=args.seed)
    config.steps = args.steps or config.steps
    config.threads = args.threads or config.threads
    config.domains = tuple(args.domains) if args.domains else config.domains
    card = train(args.out, config, show_progress=not args.no_progress)
    print(f"trained in {card['train_seconds']} s, final loss {card['final_loss_mean_last_100']:.4f}; saved to {args.out}")
    return 0
