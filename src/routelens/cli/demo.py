"""`routelens demo`: counterfactual analysis and expert isolation end to end on the embedded model."""

from __future__ import annotations

from routelens.analyses.counterfactual.command import counterfactual_options, counterfactual_settings
from routelens.cli.parsing import count, default_of, model_options, positive_int, run_options, temperature

NAME = "demo"
HELP = "counterfactual analysis, rollouts and expert isolation end to end on the built-in model"
RESUMABLE = True
EPILOG = """examples:
  routelens demo                       # embedded model: counterfactual (120 problems x 2 samples),
                                       # rollouts of its Fragile tokens and isolation (50 items x 4
                                       # domains), into runs/demo
  routelens demo --out /tmp/demo --problems 32 --routes 16
"""


def parents():
    return [model_options(with_model=False), counterfactual_options(layers_required=False), run_options()]


def add_arguments(parser) -> None:
    from routelens.demo import run_demo

    parser.add_argument("--out", default=default_of(run_demo, "out"), help="demo folder (default %(default)s)")
    parser.add_argument("--problems", type=positive_int, default=default_of(run_demo, "problems"),
                        help="arithmetic problems to sample (default %(default)s)")
    parser.add_argument("--samples-per-problem", type=positive_int, default=default_of(run_demo, "samples_per_problem"),
                        help="solutions per problem (default %(default)s)")
    parser.add_argument("--temperature", type=temperature, default=default_of(run_demo, "temperature"),
                        help="sampling temperature of the solutions (default %(default)s)")
    parser.add_argument("--rollout-samples", type=count, default=default_of(run_demo, "rollout_samples"),
                        help="rollouts: continuations per arm of each Fragile token "
                             "(default %(default)s; 0: no rollouts)")
    parser.add_argument("--isolation-per-domain", type=positive_int, default=default_of(run_demo, "isolation_per_domain"),
                        help="isolation study: items per arithmetic domain (default %(default)s, at most 100)")


def run(args) -> int:
    from routelens.demo import run_demo

    settings = counterfactual_settings(args)
    layers, seed = settings.pop("layers"), settings.pop("seed")
    run_demo(args.out, device=args.device, dtype=args.dtype, device_map=args.device_map,
             experts_implementation=args.experts_implementation, problems=args.problems,
             samples_per_problem=args.samples_per_problem, temperature=args.temperature,
             isolation_per_domain=args.isolation_per_domain, layers=layers, rollout_samples=args.rollout_samples,
             seed=seed, overwrite=args.overwrite,
             show_progress=not args.no_progress, **settings)
    return 0
