"""How many routing decisions llama.cpp flips on the demo model, per GGUF type, side by side in one run.

For each GGUF type (f32, f16, q8_0, q4_0), as llama.cpp runs it by default (f16 KV cache,
flash attention auto) and in f32 arithmetic throughout (f32 cache, no flash attention), llama.cpp
(llama-cpp-python, `routelens.inference.llama_cpp`) runs the demo's arithmetic items
(question + worked solution, teacher-forced) and its routes are compared with Hugging
Face's own (fp32, `lens.capture`):

- flip rate: the share of routing decisions (one per token and MoE layer) whose expert set
  differs from HF's; per layer too; and the share of tokens with a flip in at least one layer;
- Jaccard: the mean |engine ∩ HF| / |engine ∪ HF| over decisions;
- margin: HF's router margin (the k-th minus the (k+1)-th softmax probability) at flipped
  decisions against all decisions (median; flips sit where the router nearly ties);
- cost: |llama.cpp log p(next token) - HF log p(next token)| (mean, max) and the mean
  KL(HF || llama.cpp) of the full next-token distributions, per token (nats);
- replay: forcing llama.cpp's routes in HF at every MoE layer at once (weights by the gating
  rule on the forced run's own router logits) reproduces its expert sets at every decision.

Units: decisions and tokens are pooled over all trajectories (no interval: a census of this
fixed set, not an estimate). Not a test: CI does not run it.

    .venv/bin/python benchmarks/llama_cpp_flips.py            # CPU, ~5 min on 2 cores

writes docs/measurements/llama-cpp-flips-cpu.json and prints the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from measurement_file import write_measurement  # noqa: E402

import routelens as rl  # noqa: E402
from routelens.inference.llama_cpp import llama_cpp_routes  # noqa: E402
from routelens.models.routing import route_by_rule  # noqa: E402

# (GGUF type, KV-cache type, flash attention): f16 and "auto" are llama.cpp's defaults (flash attention is
# on for a CPU and rounds q, k and v to f16 whatever the cache type); an f32 cache without flash attention
# is llama.cpp's arithmetic in f32 throughout (routelens' default for f32 files)
ROWS = [("f32", "f32", False), ("f32", "f16", "auto"), ("f16", "f16", "auto"), ("q8_0", "f16", "auto"), ("q4_0", "f16", "auto"),
        ("q8_0", "f32", False), ("q4_0", "f32", False)]


def hugging_face(lens, sequences):
    """HF's routes [T, L, k], router margins [T, L] and log-softmax [T, V] per trajectory."""
    routes, margins, logprobs = {}, {}, {}
    for key, ids in sequences.items():
        with torch.no_grad(), lens.capture() as captured:
            logits = lens.model(torch.tensor([ids])).logits[0]
        routes[key] = np.stack([captured[layer].experts[0].numpy() for layer in lens.moe_layers], axis=1)
        probs = [torch.softmax(captured[layer].logits[0].float(), -1).sort(-1, descending=True).values
                 for layer in lens.moe_layers]
        margins[key] = np.stack([(p[:, lens.top_k - 1] - p[:, lens.top_k]).numpy() for p in probs], axis=1)
        logprobs[key] = torch.log_softmax(logits.double(), -1).numpy()
    return routes, margins, logprobs


def replay_reproduces(lens, sequences, engine_routes) -> bool:
    """Forcing the engine's routes at every MoE layer at once gives exactly its expert sets."""
    for key, ids in sequences.items():
        engine = torch.as_tensor(engine_routes[key], dtype=torch.long)
        rules = {layer: (lambda logits, hidden, i=i: engine[:, i]) for i, layer in enumerate(lens.moe_layers)}
        with torch.no_grad(), route_by_rule(lens.adapter, rules), lens.capture() as captured:
            lens.model(torch.tensor([ids]))
        for i, layer in enumerate(lens.moe_layers):
            if not torch.equal(captured[layer].experts[0].sort(-1).values, engine[:, i].sort(-1).values):
                return False
    return True


def measure(lens, sequences, hf, gguf_type, kv, flash) -> dict:
    hf_routes, hf_margins, hf_logprobs = hf
    started = time.perf_counter()
    routes, logprobs = llama_cpp_routes(lens, sequences, gguf_type, kv_cache_type=kv, flash_attn=flash, full_logprobs=True)
    seconds = time.perf_counter() - started
    flipped, jaccard, margins, flipped_margins, any_layer, target_diffs, kls = [], [], [], [], [], [], []
    for key, ids in sequences.items():
        ours, theirs = np.sort(routes.experts[key], -1), np.sort(hf_routes[key], -1)
        flip = ~(ours == theirs).all(-1)                                          # [T, L]
        inter = np.array([[len(set(a) & set(b)) for a, b in zip(row_a, row_b)] for row_a, row_b in zip(ours, theirs)])
        k = ours.shape[-1]
        flipped.append(flip)
        jaccard.append(inter / (2 * k - inter))
        margins.append(hf_margins[key])
        flipped_margins.append(hf_margins[key][flip])
        any_layer.append(flip.any(-1))
        positions = np.arange(len(ids) - 1)
        target_diffs.append(np.abs(logprobs[key][positions, ids[1:]] - hf_logprobs[key][positions, ids[1:]]))
        p = np.exp(hf_logprobs[key])
        kls.append((p * (hf_logprobs[key] - logprobs[key])).sum(-1))
    flipped = np.concatenate([f.reshape(-1, f.shape[-1]) for f in flipped])   # [decisions/L, L]
    margins_all = np.concatenate([m.reshape(-1) for m in margins])
    margins_flipped = np.concatenate(flipped_margins)
    target_diffs, kls = np.concatenate(target_diffs), np.concatenate(kls)
    return {"gguf_type": gguf_type, "kv_cache_type": kv, "flash_attn": routes.meta["flash_attn"], "source": routes.source,
            "decisions": int(flipped.size),
            "flipped_decisions": int(flipped.sum()), "flip_rate": float(flipped.mean()),
            "flip_rate_by_layer": {str(layer): float(flipped[:, i].mean()) for i, layer in enumerate(lens.moe_layers)},
            "tokens": int(flipped.shape[0]), "tokens_with_a_flip": float(np.concatenate(any_layer).mean()),
            "mean_jaccard": float(np.concatenate([j.reshape(-1) for j in jaccard]).mean()),
            "median_margin_all": float(np.median(margins_all)),
            "median_margin_flipped": float(np.median(margins_flipped)) if margins_flipped.size else None,
            "target_logprob_abs_diff_mean": float(target_diffs.mean()), "target_logprob_abs_diff_max": float(target_diffs.max()),
            "kl_hf_to_engine_mean": float(kls.mean()), "kl_hf_to_engine_max": float(kls.max()),
            "replay_reproduces_engine_routes": replay_reproduces(lens, sequences, routes.experts),
            "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="the measurement file (default: docs/measurements/...)")
    parser.add_argument("--per-domain", type=int, default=25, help="arithmetic items per domain (4 domains)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    lens = rl.load("demo")
    items = rl.arithmetic_items(lens, per_domain=args.per_domain)
    sequences = {item.id: list(item.input_ids) for item in items}
    hf = hugging_face(lens, sequences)
    rows = []
    for gguf_type, kv, flash in ROWS:
        rows.append(measure(lens, sequences, hf, gguf_type, kv, flash))
        row = rows[-1]
        margin = f"{row['median_margin_flipped']:.1e}" if row["median_margin_flipped"] is not None else "   -   "
        print(f"{gguf_type:5} kv {row['kv_cache_type']:3} flash-attn {row['flash_attn'].split()[0]:4} "
              f"| flips {row['flipped_decisions']:5}/{row['decisions']} = {row['flip_rate']:.4%} "
              f"| tokens with a flip {row['tokens_with_a_flip']:.2%} | Jaccard {row['mean_jaccard']:.4f} "
              f"| margin flipped {margin} vs all {row['median_margin_all']:.1e} "
              f"| |dlogp| {row['target_logprob_abs_diff_mean']:.2e} mean {row['target_logprob_abs_diff_max']:.2e} max "
              f"| KL {row['kl_hf_to_engine_mean']:.2e} | replay exact {row['replay_reproduces_engine_routes']} "
              f"| {row['seconds']} s", flush=True)
    import llama_cpp

    record = {"command": "python benchmarks/llama_cpp_flips.py" + (f" --per-domain {args.per_domain}" if args.per_domain != 25 else ""),
              "machine": platform.platform(), "torch": torch.__version__, "llama_cpp_python": llama_cpp.__version__,
              "date": time.strftime("%Y-%m-%d"), "model": "demo (OLMoE, 4 MoE layers, 16 experts, top-4)",
              "trajectories": len(sequences), "tokens": sum(len(ids) for ids in sequences.values()),
              "reference": "Hugging Face forward in fp32 (lens.capture), the same token ids",
              "estimand": "share of (token, MoE layer) routing decisions whose expert set differs from HF's, pooled over "
                          "all trajectories (a census of this set: no interval)",
              "rows": rows}
    write_measurement(record, args.out or "docs/measurements/llama-cpp-flips-cpu.json")


if __name__ == "__main__":
    main()
