"""Time the counterfactual engines side by side on the same inputs.

    .venv/bin/python benchmarks/engines.py                       # demo model + medium OLMoE, CPU
    .venv/bin/python benchmarks/engines.py --models medium-qwen3-next,medium-deepseek-v3 --reference-stride 8
    .venv/bin/python benchmarks/engines.py --models olmoe-1b-7b --device cuda --dtype bfloat16 --skip-reference

For each model and layer (first / middle / last MoE layer), one trajectory of T tokens,
every position scored with S alternatives + the standard route:

- reference: the reference engine (a forward of the prefix per token, routes batched);
- cache: the cache engine (per token, the model's own cache of the prefix, KV and recurrent
  states, and the routes decoded as one batched step from layer l up): exact on every
  layout, hybrids included, and the honest per-token baseline;
- kv-decode (OLMoE-shaped models only): the same idea hand-written for plain attention,
  with the MoE output of layer l computed from its recorded input (no layer-l re-run);
- fast: the fast engine as a run uses it (on a hybrid, layers with a recurrent layer above
  them are handed to the cache engine: `served_by` says which);
- floor: what any exact method must at least compute: one natural forward, the layer-l
  expert outputs the routes need that it did not compute (each (token, expert) pair once),
  S + 1 plain forward passes of the layers above l over the T tokens (batched), and the LM
  head with its log-normaliser. (Until issue 31 the floor left out the layer-l experts, which no exact method can skip:
  at the last layer they are most of the work, which made the fast engine look 2-3x off.)

Prints seconds, the ratios fast/reference, fast/cache, fast/kv-decode and fast/floor (as
speed-ups, >1 means fast is faster; for the floor, slowdown = fast / floor time), and peak
memory. The reference engine on large settings is timed on every `--reference-stride`-th
position and scaled to all positions (said in the output).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
import warnings

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from routelens.allocator import allocator_state, keep_freed_memory  # noqa: E402
from routelens.analyses.counterfactual.analysis import CounterfactualConfig, build_routes  # noqa: E402
from routelens.data.trajectories import Trajectory  # noqa: E402
from routelens.engine import CacheEngine, FastEngine, ReferenceEngine, ScoreItem  # noqa: E402
from routelens.engine.readout import record_layer_arguments, target_log_probs  # noqa: E402
from routelens.models import adapter_for, capture_routes  # noqa: E402
from routelens.models.loading import load_model  # noqa: E402

_VOCAB = dict(vocab_size=50304, max_position_embeddings=4096, pad_token_id=1, bos_token_id=0, eos_token_id=1,
              tie_word_embeddings=False)
MODELS = {   # name -> (model_type, config); random weights, initializer_range 0.1 so routes matter
    "medium-olmoe": ("olmoe", dict(hidden_size=512, intermediate_size=256, num_hidden_layers=8, num_attention_heads=8,
                                   num_key_value_heads=8, num_experts=32, num_experts_per_tok=4)),
    "olmoe-1b-7b": ("olmoe", dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
                                  num_key_value_heads=16, num_experts=64, num_experts_per_tok=8)),
    # a hybrid: Gated DeltaNet layers, full attention every 4th layer (Qwen3-Next's pattern)
    "medium-qwen3-next": ("qwen3_next", dict(
        hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, shared_expert_intermediate_size=256,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=32,
        num_experts_per_tok=4, norm_topk_prob=True, linear_num_key_heads=4, linear_num_value_heads=8,
        linear_key_head_dim=64, linear_value_head_dim=64,
        layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"])),
    # DeepSeek-V3-style: MLA, sigmoid router with correction bias, group-limited, shared expert
    "medium-deepseek-v3": ("deepseek_v3", dict(
        hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1,
        first_k_dense_replace=1, n_group=4, topk_group=2, kv_lora_rank=128, q_lora_rank=192, qk_rope_head_dim=32,
        qk_nope_head_dim=64, v_head_dim=64, norm_topk_prob=True, routed_scaling_factor=2.5)),
}


def build(name: str, device: str, dtype: str):
    if name == "demo":
        return load_model("demo", device, dtype).adapter
    model_type, dims = MODELS[name]
    config = AutoConfig.for_model(model_type, initializer_range=0.1, **_VOCAB, **dims)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():   # a non-zero correction bias, so that choosing and weighting differ
        for name_, tensor in model.named_buffers():
            if name_.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn(tensor.shape) * 0.05)
    return adapter_for(model)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_mib() -> float:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS")) / 2**10


class _RssPeak:
    """CPU: the process's resident memory polled every 5 ms while a method runs (ru_maxrss
    never goes down, so it cannot tell two methods of one process apart)."""

    def __enter__(self):
        self.start = self.peak = _rss_mib()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, _rss_mib())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _rss_mib())


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@torch.no_grad()
def kv_decode(adapter, item: ScoreItem, layer: int) -> np.ndarray:
    """Per token: standard cache of the prefix, S + 1 routes as one batched decode step from layer l up."""
    model, device = adapter.model, adapter.device
    ids = item.input_ids[None].to(device)
    states = {}
    decoder = adapter.decoder_layers[layer]
    hooks = [decoder.post_attention_layernorm.register_forward_pre_hook(lambda m, a: states.__setitem__("h_mid", a[0])),
             decoder.mlp.register_forward_pre_hook(lambda m, a: states.__setitem__("x", a[0]))]
    cache = DynamicCache(config=model.config)
    with capture_routes(adapter, [layer]):
        model(ids, past_key_values=cache, use_cache=True)
    for hook in hooks:
        hook.remove()
    block = decoder.mlp
    rotary = model.model.rotary_emb
    out = np.zeros((len(item.positions), item.experts.shape[1]))
    for p, t in enumerate(item.positions):
        routes = item.experts.shape[1]
        x = states["x"][0, t][None].expand(routes, -1)
        experts = item.experts[p].to(device)
        weights = item.weights[p].to(device, x.dtype)
        moe = block.experts(x, experts, weights)                       # the routes' MoE outputs [R, d]
        hidden = (states["h_mid"][0, t][None] + moe)[:, None]         # [R, 1, d]
        prefix = DynamicCache(config=model.config)
        for index in range(layer + 1, adapter.num_layers):
            keys, values = cache.layers[index].keys, cache.layers[index].values
            prefix.update(keys[:, :, :t].expand(routes, -1, -1, -1).contiguous(),
                          values[:, :, :t].expand(routes, -1, -1, -1).contiguous(), index)
        position = torch.tensor([[t]], device=device)
        embeddings = rotary(hidden, position)
        for index in range(layer + 1, adapter.num_layers):
            hidden = adapter.decoder_layers[index](hidden, attention_mask=None, position_embeddings=embeddings,
                                                   position_ids=position, past_key_values=prefix, use_cache=True,
                                                   cache_position=torch.tensor([t], device=device))
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        logits = model.lm_head(model.model.norm(hidden[:, 0])).float()
        out[p] = torch.log_softmax(logits, -1)[:, item.input_ids[t + 1]].double().cpu().numpy()
    return out


@torch.no_grad()
def floor(adapter, item: ScoreItem, layer: int, memory_budget: int = 2 * 2**30) -> None:
    """What any exact method must at least compute: one natural forward; at layer l, each
    expert output E_e(x_t) that some route needs and the natural forward did not compute
    (once per (token, expert) pair, in one call of the model's own experts); S + 1 plain
    forward passes of the layers above l over all T tokens (each layer called with the
    arguments the model passed it in a natural forward); and the LM head with its
    log-normaliser (log p needs it), in slices of `memory_budget` as the engines compute it."""
    routes = item.experts.shape[1]
    recorded, hooks = record_layer_arguments(adapter, range(layer + 1, adapter.num_layers))
    hooks.append(adapter.decoder_layers[layer].register_forward_hook(lambda m, a, o: recorded.__setitem__("h", o)))
    hooks.append(adapter.moe_block(layer).register_forward_pre_hook(lambda m, a: recorded.__setitem__("x", a[0])))
    with capture_routes(adapter, [layer]) as natural:
        adapter.model(item.input_ids[None].to(adapter.device), use_cache=False, logits_to_keep=1)
    for hook in hooks:
        hook.remove()
    positions = torch.as_tensor(np.asarray(item.positions))
    x = recorded["x"].reshape(-1, recorded["x"].shape[-1])
    needed = torch.zeros(x.shape[0], adapter.num_experts, dtype=torch.bool)
    needed[positions[:, None], item.experts.reshape(len(positions), -1)] = True
    needed[torch.arange(x.shape[0])[:, None], natural[layer].experts] = False   # the natural forward computed these
    tokens, experts = needed.nonzero(as_tuple=True)
    adapter.experts(layer)(x[tokens], experts[:, None], torch.ones(len(tokens), 1, dtype=x.dtype))
    states = adapter.block_output(recorded["h"]).expand(routes, -1, -1).contiguous()
    for index in range(layer + 1, adapter.num_layers):
        states = adapter.block_output(adapter.decoder_layers[index](states, **recorded[index][2]))
    final = adapter.final_norm(states[:, item.positions]).reshape(-1, states.shape[-1])
    targets = item.input_ids[torch.as_tensor(np.asarray(item.positions)) + 1].repeat(routes)
    # the log-normaliser in slices that fit the budget, as the engines take it: one [rows, vocab]
    # tensor of a 50k vocabulary is gigabytes, and its page faults are no part of the work
    target_log_probs(adapter, final, targets, memory_budget)


def timed_once(device, fn):
    """Seconds, peak memory in MiB (CUDA: allocated by torch; CPU: resident, above what the
    process held before the call) and the result of fn()."""
    reset_peak(device)
    sync(device)
    with _RssPeak() as rss:
        start = time.perf_counter()
        result = fn()
        sync(device)
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else rss.peak - rss.start
    return seconds, peak, result


def timed_side_by_side(device, methods: dict, repeat: int) -> dict:
    """name -> (median seconds, largest peak MiB, result, every time): the methods run in
    turn, `repeat` rounds, so that a drift of the machine's load falls on all of them alike."""
    runs = {name: [] for name in methods}
    for _ in range(repeat):
        for name, fn in methods.items():
            runs[name].append(timed_once(device, fn))
    return {name: (float(np.median([r[0] for r in rs])), max(r[1] for r in rs), rs[-1][2], [r[0] for r in rs])
            for name, rs in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,medium-olmoe")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--routes", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--reference-stride", type=int, default=1,
                        help="time the reference engine on every N-th position and scale up")
    parser.add_argument("--memory-budget", type=float, default=2.0, help="fast engine budget, GiB")
    parser.add_argument("--cache-stride", type=int, default=1,
                        help="time the cache engine on every N-th position and scale (long T: it decodes token by token)")
    parser.add_argument("--skip-kv-decode", action="store_true", help="leave out the hand-written kv-decode baseline")
    parser.add_argument("--layers", default=None, help="MoE layers to time, comma-separated (default: first, middle, last)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every method in turn; medians are reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave malloc as it is (default: rl.keep_freed_memory(), as every routelens command does)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = keep_freed_memory() if not args.system_malloc else allocator_state()   # as the commands run
    rows = []
    for name in args.models.split(","):
        adapter = build(name, args.device, args.dtype)
        vocab = adapter.config.vocab_size
        ids = torch.randint(4, min(vocab, 30), (args.tokens,), generator=torch.Generator().manual_seed(0))
        moe = adapter.moe_layers
        chosen = [int(x) for x in args.layers.split(",")] if args.layers else [moe[0], moe[len(moe) // 2], moe[-1]]
        for layer in sorted(set(adapter.resolve_layers(chosen))):
            trajectory = Trajectory("bench", ids.tolist(), 1)
            routes = build_routes(adapter, trajectory, [layer],
                                  CounterfactualConfig(routes=args.routes, null_routes=0, seed=0))[layer]
            item = ScoreItem(ids, routes.positions, torch.as_tensor(routes.experts), routes.weights)
            engine = FastEngine(adapter, memory_budget=int(args.memory_budget * 2**30))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # "scoring layer l with the cache engine": in served_by
                engine.score_batch(layer, [item])  # warm-up
            cache = CacheEngine(adapter, memory_budget=int(args.memory_budget * 2**30))
            stride = max(1, args.cache_stride)   # scored positions [::stride], scaled to all
            strided = ScoreItem(ids, routes.positions[::stride], item.experts[::stride], item.weights[::stride])
            ref_stride = max(1, args.reference_stride)
            ref_sub = ScoreItem(ids, routes.positions[::ref_stride], item.experts[::ref_stride], item.weights[::ref_stride])
            methods = {"fast": lambda: engine.score_batch(layer, [item])[0],
                       "floor": lambda: floor(adapter, item, layer, int(args.memory_budget * 2**30)),
                       "cache": lambda: cache.score_batch(layer, [strided])[0]}
            kv_ok = MODELS.get(name, ("olmoe",))[0] == "olmoe" and not args.skip_kv_decode   # it knows OLMoE's layout only
            if kv_ok:
                methods["kv_decode"] = lambda: kv_decode(adapter, item, layer)
            if not args.skip_reference:
                methods["reference"] = lambda: ReferenceEngine(adapter).score_batch(layer, [ref_sub])[0]
            timings = timed_side_by_side(args.device, methods, args.repeat)
            fast_s, fast_mem, fast_lp, fast_all = timings["fast"]
            floor_s, floor_mem, _, floor_all = timings["floor"]
            cache_s, cache_mem, cache_lp, _ = timings["cache"]
            cache_s *= len(routes.positions) / len(strided.positions)
            row = {"model": name, "layer": layer, "T": args.tokens, "S": args.routes, "device": args.device,
                   "dtype": args.dtype, "threads": torch.get_num_threads(), "repeat": args.repeat,
                   "allocator": allocator["malloc"],
                   "served_by": "cache" if layer in engine.cache_layers else "fast",
                   "fast_s": fast_s, "cache_s": cache_s, "cache_scaled_from_positions": len(strided.positions),
                   "floor_s": floor_s, "fast_runs_s": fast_all, "floor_runs_s": floor_all,
                   "fast_peak_mib": fast_mem, "cache_peak_mib": cache_mem, "floor_peak_mib": floor_mem,
                   "cache_vs_fast_max_abs_diff": float(np.abs(cache_lp - fast_lp[::stride]).max()),
                   "cache_vs_fast_over_1e-3": int((np.abs(cache_lp - fast_lp[::stride]) > 1e-3).sum()),
                   "fallbacks": [engine.fallback_reason, engine.cache.fallback_reason, cache.fallback_reason],
                   "token_routes_per_s": len(item.positions) * (args.routes + 1) / fast_s}
            worst = np.unravel_index(np.abs(cache_lp - fast_lp[::stride]).argmax(), cache_lp.shape)
            worst = (worst[0] * stride, worst[1])
            if abs(cache_lp[worst[0] // stride, worst[1]] - fast_lp[worst]) > 1e-3:   # which engine is off there: ask the reference
                sub = ScoreItem(ids, routes.positions[worst[0]: worst[0] + 1], item.experts[worst[0]: worst[0] + 1],
                                item.weights[worst[0]: worst[0] + 1])
                row["worst_cache_vs_fast"] = {
                    "position": int(routes.positions[worst[0]]), "route": int(worst[1]), "fast": fast_lp[worst],
                    "cache": cache_lp[worst[0] // stride, worst[1]],
                    "reference": ReferenceEngine(adapter).score_batch(layer, [sub])[0][0, worst[1]]}
            if kv_ok:
                kv_s, _, kv_lp, _ = timings["kv_decode"]
                row.update(kv_decode_s=kv_s, kv_vs_fast_max_abs_diff=float(np.abs(kv_lp - fast_lp).max()),
                           fast_vs_kv_decode_speedup=kv_s / fast_s)
            if not args.skip_reference:
                ref_s, _, ref_lp, _ = timings["reference"]
                row["reference_s"] = ref_s * len(routes.positions) / len(ref_sub.positions)
                row["reference_scaled_from_positions"] = len(ref_sub.positions)
                row["reference_vs_fast_max_abs_diff"] = float(np.abs(ref_lp - fast_lp[::ref_stride]).max())
                row["fast_vs_reference_speedup"] = row["reference_s"] / fast_s
            row["fast_vs_cache_speedup"] = cache_s / fast_s
            row["fast_over_floor"] = fast_s / floor_s
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:  # after every row, so a long run keeps what it measured
                with open(args.out, "w") as handle:
                    json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
