"""`routelens router-update`: retrain the last MoE layer's router alone from counterfactual preferences."""

from __future__ import annotations

from routelens.cli.parsing import default_of, load_lens, model_options, names, positive_int, run_options

NAME = "router-update"
HELP = "retrain the last MoE layer's router alone from counterfactual preferences"
RESUMABLE = True
EPILOG = """examples:
  routelens router-update --model demo --counterfactual runs/cf-last --out runs/update
  routelens router-update --model ./my-olmoe --counterfactual runs/cf-last --heldout-counterfactual runs/cf-heldout \\
      --margin 0.05 --bins Fragile,Ambiguous --beta 0.1 --lr 1e-5 --steps 300 --seed 0 --out runs/update

The counterfactual run must include the last MoE layer and come from the same model. Writes
router_delta.safetensors (apply with --router-delta FILE to any command), pairs.parquet,
training_log.jsonl, summary.json and run.json. Re-running the same command on the same --out
resumes an interrupted run: the steps run in units of 10, each checkpointed (the router's fp32
master parameters, Adam's state, the minibatch generator), so only the steps after the last
checkpoint are trained again and the result equals an uninterrupted run's. Training is
sequential: there is no --ray.
"""


def parents():
    return [model_options(), run_options()]


def add_arguments(parser) -> None:
    from routelens.config import RouterUpdateConfig as C

    parser.add_argument("--counterfactual", required=True, help="counterfactual run folder with the last MoE layer")
    parser.add_argument("--heldout-counterfactual", default=None,
                        help="another counterfactual run: report the share of its tokens whose standard route changed")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--margin", type=float, default=default_of(C, "margin"),
                        help="preferred route beats the standard by >= this probability (default %(default)s)")
    parser.add_argument("--bins", type=names, default=default_of(C, "bins"),
                        help="token bins to learn from (default Fragile,Ambiguous)")
    parser.add_argument("--beta", type=float, default=default_of(C, "beta"), help="DPO beta (default %(default)s)")
    parser.add_argument("--lr", type=float, default=default_of(C, "learning_rate"),
                        help="Adam learning rate (default %(default)s: a minimal update; 1e-4 and up moved most routes "
                             "on the demo model)")
    parser.add_argument("--steps", type=positive_int, default=default_of(C, "steps"),
                        help="optimizer steps (default %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=default_of(C, "batch_size"),
                        help="pairs per step (default %(default)s)")
    parser.add_argument("--seed", type=int, default=default_of(C, "seed"),
                        help="seed of the minibatch order (default %(default)s)")


def run(args) -> int:
    from routelens.api import router_update
    from routelens.config import RouterUpdateConfig

    config = RouterUpdateConfig(margin=args.margin, bins=args.bins, beta=args.beta, learning_rate=args.lr,
                                steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    result = router_update(load_lens(args), args.counterfactual, args.out, heldout=args.heldout_counterfactual,
                           config=config, overwrite=args.overwrite, show_progress=not args.no_progress)
    summary = result.summary_dict
    print(f"{summary['pairs']} preference pairs on {summary['pair_tokens']} tokens at layer {summary['layer']}; "
          f"loss {summary['loss_first_step']:.4f} -> {summary['loss_last_step']:.4f}; preferred route ranked higher "
          f"{summary['preference_accuracy_before']:.1%} -> {summary['preference_accuracy_after']:.1%}")
    print(f"{summary['parameters_checked']} parameters and buffers hashed; "
          f"changed: {', '.join(summary['parameters_changed']) or 'none'}")
    changes = summary.get("heldout_route_changes")
    if changes:
        print("held-out tokens whose standard route changed: " + "; ".join(
            f"{b} {changes[b]['route_changed']}/{changes[b]['tokens']}" for b in ("Fragile", "Ambiguous", "Confident", "All")))
    print(f"router delta: {summary['router_delta']} (apply with --router-delta)")
    return 0
