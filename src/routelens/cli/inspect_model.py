"""`routelens inspect`: a model's MoE layers, experts, top-k and gating rule."""

from __future__ import annotations

from routelens.cli.parsing import load_lens, model_options

NAME = "inspect"
HELP = "show a model's MoE layers, experts, top-k and gating rule"
RESUMABLE = False
EPILOG = """examples:
  routelens inspect --model ./my-olmoe
  routelens inspect --model tiny:deepseek_v3
"""


def parents():
    return [model_options()]


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    lens = load_lens(args)
    info = lens.describe()
    info["tokenizer"] = type(lens.tokenizer).__name__ if lens.tokenizer else None
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0
