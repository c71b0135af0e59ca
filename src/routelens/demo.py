"""`routelens demo`: the counterfactual analysis end to end with nothing to download.

Until the project's trained demo model ships, the demo builds a tiny random-weight OLMoE,
saves it with `save_pretrained`, samples trajectories from it, and runs the same code path
as `routelens counterfactual --model <folder>` on its first, middle and last MoE layer.
The printed table is read back from the run folder's summary.json.
"""

from __future__ import annotations

import json
import os

import torch

from routelens.models.tiny import TINY_VOCAB, build_tiny_model
from routelens.results.run_folder import read_json

DEMO_SEED = 0
# A larger weight scale than the config default gives peaked next-token distributions,
# so that routes visibly matter even in a random model.
DEMO_OVERRIDES = {"initializer_range": 0.3}


def _sample_trajectories(model, num_trajectories: int, seed: int) -> list[dict]:
    """Ancestral sampling at temperature 0.7 from random prompts of the model's own vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    records = []
    for index in range(num_trajectories):
        prompt_len = int(torch.randint(4, 9, (1,), generator=generator))
        completion_len = int(torch.randint(12, 25, (1,), generator=generator))
        ids = torch.randint(3, TINY_VOCAB, (1, prompt_len), generator=generator)
        for _ in range(completion_len):
            with torch.no_grad():
                logits = model(ids, use_cache=False).logits[0, -1] / 0.7
            next_id = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            ids = torch.cat([ids, next_id[None]], dim=1)
        records.append({"id": f"demo-{index:03d}", "input_ids": ids[0].tolist(), "completion_start": prompt_len})
    return records


def _prepare_inputs(folder: str, num_trajectories: int, seed: int) -> tuple[str, str]:
    """The saved tiny model and its sampled trajectories (made once, reused after)."""
    model_dir = os.path.join(folder, "model")
    trajectories = os.path.join(folder, f"trajectories-{num_trajectories}.jsonl")
    if os.path.exists(os.path.join(model_dir, "config.json")) and os.path.exists(trajectories):
        return model_dir, trajectories
    model = build_tiny_model("olmoe", seed=seed, **DEMO_OVERRIDES)
    model.save_pretrained(model_dir)
    with open(trajectories + ".tmp", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in _sample_trajectories(model, num_trajectories, seed))
    os.replace(trajectories + ".tmp", trajectories)
    return model_dir, trajectories


def run_demo(args) -> int:
    from routelens.cli import run_counterfactual_command
    from routelens.models.loading import load_model
    from routelens.summary_table import print_summary

    os.makedirs(args.out, exist_ok=True)
    model_dir, trajectories = _prepare_inputs(args.out, args.trajectories_count, DEMO_SEED)
    layers = args.layers
    if layers is None:
        moe = load_model(model_dir, "cpu", "float32").adapter.moe_layers
        layers = sorted({moe[0], moe[len(moe) // 2], moe[-1]})
    run_dir = os.path.join(args.out, "counterfactual")
    print(f"demo: tiny random-weight OLMoE in {model_dir}, {args.trajectories_count} sampled trajectories, "
          f"layers {layers}, {args.routes} alternative routes per token")
    run_counterfactual_command(model_dir, trajectories, run_dir, args, layers)
    print_summary(read_json(os.path.join(run_dir, "summary.json")))
    print(f"run folder: {run_dir} (routes.parquet, tokens.parquet, summary.json, run.json)")
    return 0
