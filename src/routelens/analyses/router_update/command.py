"""`routelens router-update`: retrain the last MoE layer's router alone from counterfactual preferences."""

from __future__ import annotations

from routelens.cli.parsing import config_from_args, config_options, load_lens, model_options, run_options

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
    from routelens.analyses.router_update.config import RouterUpdateConfig

    return [model_options(), config_options(RouterUpdateConfig, "router update"), run_options()]


def add_arguments(parser) -> None:
    parser.add_argument("--counterfactual", required=True, help="counterfactual run folder with the last MoE layer")
    parser.add_argument("--heldout-counterfactual", default=None,
                        help="another counterfactual run: report the share of its tokens whose standard route changed")
    parser.add_argument("--out", required=True, help="output folder")


def run(args) -> int:
    from routelens.analyses.counterfactual.input import counterfactual_run
    from routelens.analyses.router_update.config import RouterUpdateConfig
    from routelens.analyses.router_update.table import changed_gain_line
    from routelens.api import router_update

    config = config_from_args(RouterUpdateConfig, args)
    for run_dir in filter(None, (args.counterfactual, args.heldout_counterfactual)):
        counterfactual_run(run_dir, NAME)   # a damaged run fails before the model loads
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
        print(changed_gain_line(changes))
    print(f"router delta: {summary['router_delta']} (apply with --router-delta)")
    return 0

