"""Start-up: importing routelens and loading the demo model, against the imports it cannot skip.

    .venv/bin/python benchmarks/startup.py --repeat 5 --out docs/measurements/startup-cpu.json

Each command runs in a fresh interpreter (warm: after one untimed run of each), the
commands in turn for `--repeat` rounds; prints medians. `torch` and `transformers'
modeling code` are what loading any Hugging Face model costs before routelens does
anything; the difference to `routelens.load('demo')` is routelens's own share.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measurement_file import write_measurement  # noqa: E402

COMMANDS = {
    "python": "pass",
    "torch": "import torch",
    "transformers' modeling code": "import transformers.modeling_utils",
    "routelens.load('demo')": "import routelens as rl; rl.load('demo')",
}


def run(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    for code in COMMANDS.values():   # warm the file cache and the bytecode
        run(code)
    times = {name: [] for name in COMMANDS}
    load = os.getloadavg()[0]
    for _ in range(args.repeat):
        for name, code in COMMANDS.items():
            times[name].append(run(code))
    rows = [{"what": name, "code": code, "median_s": round(float(np.median(times[name])), 3),
             "runs_s": [round(t, 3) for t in times[name]]} for name, code in COMMANDS.items()]
    for row in rows:
        print(f"{row['what']:30} {row['median_s']:.2f} s  {row['runs_s']}")
    if args.out:
        write_measurement({"command": "python benchmarks/startup.py" + (f" --repeat {args.repeat}" if args.repeat != 5 else ""),
                           "date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "cores": os.cpu_count(),
                           "load_average_before": load, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
