"""What bf16 does to the run-time checks and to routing, measured side by side in one run.

For each real-shaped model (`routelens.models.tiny.REAL_SHAPED`: the experts, top-k and
groups of OLMoE-1B-7B, Qwen3-30B-A3B and DeepSeek-V3 in 3 narrow layers), in fp32 and in
bf16 with and without --upcast-router (and bf16 under the old fixed tolerance): the dtype's noise (natural forward vs the
higher-precision shadow), the calibrated standard-route tolerance, the fast engine's
largest deviation, whether it fell back, the precision audit's share of scores resting on
an upper-layer route flip, and the seconds of the counterfactual run.

    .venv/bin/python benchmarks/low_precision.py                      # CPU, ~2 min
    .venv/bin/python benchmarks/low_precision.py --device cuda        # a GPU, when one is lent

writes docs/measurements/low-precision-<device>.json (cited by docs/trust.md) and prints
the table. The bf16 rows are measured twice, with the tolerance calibrated and with the
fixed one and the fallback-on-any-miss the checks had before (`tolerance`: calibrated /
fixed (before)), side by side. Not a
test: CI does not run it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from measurement_file import write_measurement  # noqa: E402

import routelens as rl  # noqa: E402
from routelens.engine import checks as checks_module  # noqa: E402
from routelens.engine import precision  # noqa: E402
from routelens.models.tiny import REAL_SHAPED, build_real_shaped  # noqa: E402


def _fixed_tolerance(adapter, items, natural, memory_budget=None):
    raise precision.ShadowUnavailable("the fixed tolerance, as before the calibration")


def measure(folder: str, name: str, dtype: torch.dtype, upcast: bool, device: str, trajectories: int,
            length: int, calibrated: bool = True) -> dict:
    lens = rl.load(folder, device=device, dtype=str(dtype).removeprefix("torch."), upcast_router=upcast)
    measure_noise, low_precision = precision.measure_noise, checks_module.LOW_PRECISION
    if not calibrated:   # the run-time checks as they were: the dtype's fixed tolerance, every miss a fallback
        precision.measure_noise, checks_module.LOW_PRECISION = _fixed_tolerance, ()
    rng = np.random.default_rng(0)
    ids = [list(map(int, rng.integers(3, 1024, length))) for _ in range(trajectories)]
    config = rl.CounterfactualConfig(layers=[1, 2], routes=8, null_routes=0, precision_audit=trajectories,
                                     precision_audit_tokens=4)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = rl.counterfactual(lens, rl.trajectories_from_ids(ids, completion_start=16), config=config,
                                   show_progress=False)
    seconds = time.perf_counter() - started
    precision.measure_noise, checks_module.LOW_PRECISION = measure_noise, low_precision
    checks = result.info["checks"]
    tolerance = checks["standard_route_tolerance"]
    calibration = tolerance.get("calibration", {})
    layers = (checks.get("low_precision") or {}).get("layers", {})
    audited = sum(layer["audited_scores"] for layer in layers.values())
    flipped = sum(layer["scores_with_upper_route_flip"] for layer in layers.values())
    return {"model": name, "dtype": str(dtype).removeprefix("torch."), "upcast_router": upcast,
            "tolerance": "calibrated" if calibrated else "fixed (before)",
            "noise_max": calibration.get("noise_max"), "noise_mean": calibration.get("noise_mean"),
            "tolerance_max": tolerance["max_nats"], "tolerance_mean": tolerance["mean_nats"],
            "fast_max_diff": checks["standard_route_max_abs_logprob_diff"],
            "fast_mean_diff": checks["standard_route_mean_abs_logprob_diff"],
            "fell_back": checks["engine_fallback"] is not None, "flagged_tokens": checks["standard_route_flagged_tokens"],
            "audited_scores": audited, "flipped_scores": flipped,
            "flip_share": flipped / audited if audited else None, "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="the measurement file (default: docs/measurements/...)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trajectories", type=int, default=6)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    rows = []
    for name in REAL_SHAPED:
        folder = os.path.join(tempfile.mkdtemp(prefix="routelens-bench-"), name)
        build_real_shaped(name).save_pretrained(folder)   # loaded as a user's checkpoint is
        for dtype, upcast, calibrated in ((torch.float32, False, True), (torch.bfloat16, False, False),
                                          (torch.bfloat16, False, True), (torch.bfloat16, True, True)):
            rows.append(measure(folder, name, dtype, upcast, args.device, args.trajectories, args.length, calibrated))
            row = rows[-1]
            print(f"{row['model']:14} {row['dtype']:8} {row['tolerance']:14} upcast={str(upcast):5} noise {row['noise_max'] or 0:.2e} max "
                  f"{row['noise_mean'] or 0:.2e} mean | tolerance {row['tolerance_max']:.2e} / {row['tolerance_mean']:.2e} "
                  f"| fast {row['fast_max_diff']:.2e} / {row['fast_mean_diff']:.2e} fell back {row['fell_back']} | "
                  f"flips {row['flipped_scores']}/{row['audited_scores']} | {row['seconds']} s", flush=True)
    record = {"command": "python benchmarks/low_precision.py" + (f" --device {args.device}" if args.device != "cpu" else ""),
              "machine": platform.platform(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "trajectories": args.trajectories, "length": args.length,
              "layers": [1, 2], "routes": 8, "rows": rows}
    write_measurement(record, args.out or f"docs/measurements/low-precision-{args.device.split(':')[0]}.json")


if __name__ == "__main__":
    main()
