"""`routelens demo` of two source trees, side by side: wall time and summaries.

    .venv/bin/python benchmarks/demo_speed.py --base /tmp/base/src --new src --repeat 3 --out demo_speed.json
    .venv/bin/python benchmarks/demo_speed.py --base b0e0b86 --new src --repeat 3      # a commit: its src/ extracted

Each source tree's demo (`python -m routelens demo --no-progress --out <fresh folder>`, the
tree first on PYTHONPATH, everything else as in this interpreter) runs `--repeat` times in
its own subprocess, alternating base, new, base, new, ... so that a change in the load of
the machine falls on both alike. Every run starts from an empty folder (trajectories are
sampled again, nothing is resumed). Prints each run's wall seconds, peak resident memory and the load
average before it, the median per tree and the ratio of medians base / new (above 1: new is
faster); then compares the summary.json of each run folder (counterfactual, rollout,
isolation) between the trees' first runs: equal, or the keys whose values differ with the
largest numeric difference. Exits 1 when a demo fails, or with `--strict` when a summary
differs (the timings are still printed and written). `--out`: all of it as JSON. `--phases`: also each run's phase
times, read from its run.json files ("timings") where recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = ("counterfactual", "rollout", "isolation")
# written per run, not results: wall times and where the run folder lay
VOLATILE = {"timings", "seconds", "elapsed", "elapsed_seconds", "wall_seconds"}


def run_demo(source: str, folder: str, extra: list[str]) -> dict:
    """One demo of the tree `source` into `folder`/run: its wall seconds, exit code, load
    before, and the child's peak resident memory (os.wait4's rusage: the child and any
    process it waited for, the largest of them)."""
    env = {**os.environ, "PYTHONPATH": os.path.abspath(source)}
    load = os.getloadavg()
    out_path, err_path = os.path.join(folder, "stdout.log"), os.path.join(folder, "stderr.log")
    started = time.perf_counter()
    with open(out_path, "w") as stdout, open(err_path, "w") as stderr:
        child = subprocess.Popen([sys.executable, "-m", "routelens", "demo", "--no-progress", "--out",
                                  os.path.join(folder, "run"), *extra], cwd=folder, env=env, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = returncode = os.waitstatus_to_exitcode(status)
    with open(err_path) as handle:
        stderr_text = handle.read()
    return {"source": source, "folder": folder, "seconds": seconds, "returncode": returncode,
            "load_before": list(load), "max_rss_mb": round(usage.ru_maxrss / 1024, 1),   # Linux: KiB
            "stderr_tail": stderr_text[-2000:] if returncode else ""}


def summaries(folder: str) -> dict:
    out = {}
    for name in RUNS:
        path = os.path.join(folder, "run", name, "summary.json")
        if os.path.isfile(path):
            with open(path) as handle:
                out[name] = json.load(handle)
    return out


def differences(a, b, path: str = "") -> list[tuple[str, float | None]]:
    """(key path, |a - b| where both are numbers, else None) for every value that differs."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b), key=str):
            if key in VOLATILE:
                continue
            if key not in a or key not in b:
                found.append((f"{path}/{key}", None))
            else:
                found += differences(a[key], b[key], f"{path}/{key}")
        return found
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [(path, None)]
        return [found for i, (x, y) in enumerate(zip(a, b)) for found in differences(x, y, f"{path}[{i}]")]
    if a == b or (a != a and b != b):   # equal, or both NaN
        return []
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return [(path, abs(a - b) if numbers else None)]


def phases(folder: str) -> dict:
    out = {}
    for name in RUNS:
        path = os.path.join(folder, "run", name, "run.json")
        if os.path.isfile(path):
            with open(path) as handle:
                out[name] = json.load(handle).get("timings")
    return out


def source_of_commit(commit: str) -> str | None:
    """The src/ folder of `commit` of this repository, extracted into a temporary folder
    (None where `commit` is not one)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"], cwd=root,
                           capture_output=True, text=True)
    if found.returncode:
        return None
    folder = tempfile.mkdtemp(prefix=f"demo-speed-{commit[:12]}-")
    archive = subprocess.run(["git", "archive", found.stdout.strip(), "src"], cwd=root, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    return os.path.join(folder, "src")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="source tree of the previous release (holding routelens/), or a git commit")
    parser.add_argument("--new", required=True, help="source tree to compare (the folder holding routelens/)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per tree, alternating (default 2; 3 for medians)")
    parser.add_argument("--out", default=None, help="write everything as JSON here")
    parser.add_argument("--keep", default=None, help="keep the run folders under this folder (default: a temporary one, removed)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a summary differs (default: report it; float rounding of a changed engine "
                             "moves rank statistics on tokens whose routes tie to rounding)")
    parser.add_argument("--phases", action="store_true", help="also print each run's timings from its run.json files")
    parser.add_argument("demo_args", nargs="*", help="after --: extra arguments for `routelens demo`")
    args = parser.parse_args()
    for name in ("base", "new"):   # a git commit stands for its src/ tree, extracted once
        value = getattr(args, name)
        if not os.path.isdir(value):
            setattr(args, name, source_of_commit(value) or value)
    for name in ("base", "new"):
        if not os.path.isdir(os.path.join(getattr(args, name), "routelens")):
            parser.error(f"--{name} {getattr(args, name)}: no routelens/ package there")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    root = args.keep or tempfile.mkdtemp(prefix="demo-speed-")
    os.makedirs(root, exist_ok=True)
    runs: dict[str, list[dict]] = {"base": [], "new": []}
    try:
        for repeat in range(args.repeat):
            for name in ("base", "new"):
                folder = os.path.join(root, f"{name}-{repeat}")
                shutil.rmtree(folder, ignore_errors=True)
                os.makedirs(folder)
                result = run_demo(getattr(args, name), folder, args.demo_args)
                if args.phases:
                    result["phases"] = phases(folder)
                runs[name].append(result)
                print(f"{name} run {repeat + 1}: {result['seconds']:.1f} s, peak {result['max_rss_mb']:.0f} MB "
                      f"(exit {result['returncode']}; load average "
                      f"before {result['load_before'][0]:.2f} {result['load_before'][1]:.2f} {result['load_before'][2]:.2f})",
                      flush=True)
                if result["returncode"]:
                    print(result["stderr_tail"], file=sys.stderr)
                if args.phases:
                    print(json.dumps(result["phases"]), flush=True)
        medians = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
        ratio = medians["base"] / medians["new"]
        memory = {name: statistics.median(r["max_rss_mb"] for r in rs) for name, rs in runs.items()}
        print(f"median base {medians['base']:.1f} s, new {medians['new']:.1f} s: base / new = {ratio:.2f}x "
              f"({args.repeat} runs each, alternating); median peak memory base {memory['base']:.0f} MB, "
              f"new {memory['new']:.0f} MB")
        compared, failed = {}, any(r["returncode"] for rs in runs.values() for r in rs)
        base_summaries, new_summaries = (summaries(runs[name][0]["folder"]) for name in ("base", "new"))
        for name in RUNS:
            if name not in base_summaries or name not in new_summaries:
                compared[name] = {"equal": False, "note": "missing in " + ", ".join(
                    tree for tree, found in (("base", base_summaries), ("new", new_summaries)) if name not in found)}
            else:
                found = differences(base_summaries[name], new_summaries[name])
                numeric = [d for _, d in found if d is not None]
                compared[name] = {"equal": not found, "differing_keys": len(found),
                                  "largest_numeric_difference": max(numeric) if numeric else None,
                                  "first_differences": [key for key, _ in found[:10]]}
            failed |= args.strict and not compared[name]["equal"]
            state = "equal" if compared[name]["equal"] else f"DIFFERS {compared[name]}"
            print(f"summary.json of {name}, base vs new: {state}")
        if args.out:
            with open(args.out, "w") as handle:
                json.dump({"command": sys.argv, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                            "python": platform.python_version()},
                           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": runs, "median_seconds": medians,
                           "median_max_rss_mb": memory,
                           "ratio_base_over_new": ratio, "summaries": compared}, handle, indent=2)
        return 1 if failed else 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
