"""Regenerate every published measurement, then docs/measurements.md, in one command.

    .venv/bin/python benchmarks/run_all.py                     # every CPU step (hours on 2 cores)
    .venv/bin/python benchmarks/run_all.py --only engines-demo-T256,demo-speed
    .venv/bin/python benchmarks/run_all.py --list               # the steps, their commands and files
    .venv/bin/python benchmarks/run_all.py --gpu                # the GPU steps, on a machine with CUDA

Each step is one benchmark script run as a subprocess with the command shown in the page;
it writes its file in docs/measurements/. Every timing in those files is a median of at
least 3 repetitions, the methods compared timed in turn in one process, so a ratio never
compares two runs of two different moments. After the steps, `run-all.json` records the
machine (CPU, cores, load average before each step), the versions (Python, torch,
transformers, routelens's git commit), the date and each step's command, file and seconds;
`measurements_doc.py` then writes docs/measurements.md from the files. The README links
to that page and copies no number by hand.

A step that fails stops the run (its error is printed) and leaves the files of the steps
before it; rerun with `--only` the ones left.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join("docs", "measurements")
MANIFEST = os.path.join(ROOT, FOLDER, "run-all.json")
PY = "python"   # shown in the page; run with this interpreter

#: name -> (what it measures, argv after `python`, the file it writes, GPU step)
STEPS = {
    "engines-demo-T256": (
        "fast engine against the floor, the cache and reference engines: demo model, every MoE layer, T = 256",
        ["benchmarks/engines.py", "--models", "demo", "--layers", "0,1,2,3", "--tokens", "256", "--repeat", "5",
         "--reference-stride", "4"], "bench-cpu-demo-T256.json", False),
    "engines-demo-T1024": (
        "the same at T = 1024 (reference on every 32nd position, cache on every 8th, scaled)",
        ["benchmarks/engines.py", "--models", "demo", "--layers", "0,1,2,3", "--tokens", "1024", "--repeat", "3",
         "--reference-stride", "32", "--cache-stride", "8"], "bench-cpu-demo-T1024.json", False),
    "engines-medium-T256": (
        "medium OLMoE (hidden 512, 8 layers, 32 experts, vocab 50k): first, middle and last MoE layer, T = 256",
        ["benchmarks/engines.py", "--models", "medium-olmoe", "--tokens", "256", "--repeat", "3",
         "--reference-stride", "16", "--cache-stride", "4", "--skip-kv-decode"], "bench-cpu-medium-T256.json", False),
    "engines-medium-T1024": (
        "medium OLMoE at T = 1024 (reference on every 128th position, cache on every 32nd, scaled)",
        ["benchmarks/engines.py", "--models", "medium-olmoe", "--tokens", "1024", "--repeat", "3",
         "--reference-stride", "128", "--cache-stride", "32", "--skip-kv-decode"], "bench-cpu-medium-T1024.json", False),
    "engines-medium-T4096": (
        "medium OLMoE at T = 4096, middle layer, S = 8: the fast engine against the floor only",
        ["benchmarks/engines.py", "--models", "medium-olmoe", "--layers", "4", "--tokens", "4096", "--routes", "8",
         "--repeat", "3", "--skip-reference", "--skip-kv-decode", "--cache-stride", "512"],
        "bench-cpu-medium-T4096.json", False),
    "engines-hybrid-mla": (
        "a hybrid (Qwen3-Next-shaped) and an MLA model (DeepSeek-V3-shaped), T = 128",
        ["benchmarks/engines.py", "--models", "medium-qwen3-next,medium-deepseek-v3", "--tokens", "128", "--repeat", "3",
         "--reference-stride", "8"], "bench-cpu-qwen3next-deepseekv3.json", False),
    "startup": (
        "importing routelens and loading the demo model, against importing torch and transformers' modeling code",
        ["benchmarks/startup.py"], "startup-cpu.json", False),
    "isolation-batching": (
        "expert isolation one item at a time against items grouped",
        ["benchmarks/isolation_batching.py", "--repeats", "3"], "isolation-batching-demo-cpu.json", False),
    "semantic-graft-batching": (
        "semantic routing and graft evaluation one item at a time against items grouped",
        ["benchmarks/semantic_graft_batching.py", "--threads", "1", "--repeats", "5", "--groups", "1,4,16"],
        "semantic-graft-batching-demo-cpu.json", False),
    "demo-speed": (
        "`routelens demo` of this tree against the state before issue 31 (commit b0e0b86), alternating, summaries compared",
        ["benchmarks/demo_speed.py", "--base", "b0e0b86", "--new", "src", "--repeat", "3"],
        "demo-speed-cpu.json", False),
    "low-precision": (
        "bf16 noise, calibrated tolerances and route flips on three model shapes",
        ["benchmarks/low_precision.py"], "low-precision-cpu.json", False),
    "llama-cpp-flips": (
        "llama.cpp's routes against Hugging Face's on the demo, per GGUF type",
        ["benchmarks/llama_cpp_flips.py"], "llama-cpp-flips-cpu.json", False),
    "fresh-clone": (
        "the README's two commands on a fresh clone with an empty pip cache: setup, the demo, the test suite",
        ["benchmarks/fresh_clone.py"], "fresh-clone-cpu.json", False),
    "engines-gpu-olmoe": (
        "an OLMoE-1B-7B-shaped model in bf16 on one GPU: first, middle and last layer",
        ["benchmarks/engines.py", "--models", "olmoe-1b-7b", "--device", "cuda", "--dtype", "bfloat16",
         "--skip-reference", "--repeat", "3"], "bench-gpu-olmoe-1b-7b-bf16.json", True),
    "low-precision-gpu": (
        "bf16 noise and tolerances on the GPU",
        ["benchmarks/low_precision.py", "--device", "cuda"], "low-precision-gpu.json", True),
}


def _with_out(argv: list[str], name: str, filename: str) -> list[str]:
    """The step's command with its output file (the scripts take `--out`)."""
    return [*argv, "--out", os.path.join(FOLDER, filename)]


def command_line(name: str) -> str:
    _, argv, filename, _ = STEPS[name]
    return " ".join([PY, *_with_out(argv, name, filename)])


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _commit() -> str | None:
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return found.stdout.strip() or None


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": _version("torch"), "transformers": _version("transformers"), "commit": _commit()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="steps to run, comma-separated (default: every CPU step)")
    parser.add_argument("--gpu", action="store_true", help="run the GPU steps (needs CUDA)")
    parser.add_argument("--list", action="store_true", help="print the steps and their commands, run nothing")
    args = parser.parse_args(argv)
    if args.list:
        for name, (what, _, _, gpu) in STEPS.items():
            print(f"{name}{' (GPU)' if gpu else ''}: {what}\n    {command_line(name)}")
        return 0
    names = args.only.split(",") if args.only else [n for n, step in STEPS.items() if step[3] == args.gpu]
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        print(f"run_all.py: unknown step(s) {', '.join(unknown)}; --list shows them", file=sys.stderr)
        return 2
    manifest = json.load(open(MANIFEST)) if os.path.exists(MANIFEST) else {"steps": {}}
    for name in names:
        what, step_argv, filename, gpu = STEPS[name]
        load = os.getloadavg()[0]
        print(f"[{name}] {command_line(name)}   (load average {load:.2f})", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *_with_out(step_argv, name, filename)], cwd=ROOT)
        if done.returncode:
            print(f"run_all.py: step {name} failed (exit {done.returncode}); the files of the steps before it are "
                  f"kept, rerun with --only", file=sys.stderr)
            return 1
        manifest["steps"][name] = {"what": what, "command": command_line(name), "file": filename, "gpu": gpu,
                                   "seconds": round(time.perf_counter() - start, 1), "load_average_before": load,
                                   "date": datetime.date.today().isoformat(), "machine": machine()}
        with open(MANIFEST, "w") as handle:   # after every step, so a stopped run keeps what it measured
            json.dump(manifest, handle, indent=2)
    return subprocess.run([sys.executable, os.path.join("benchmarks", "measurements_doc.py")], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
