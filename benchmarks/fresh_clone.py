"""Time the README's two commands on a fresh clone: setup, the demo, and the test suite.

    .venv/bin/python benchmarks/fresh_clone.py --out docs/measurements/fresh-clone-cpu.json
    .venv/bin/python benchmarks/fresh_clone.py --skip-tests     # setup and the demo only

Clones the repository's HEAD into a temporary folder and runs, there, `bash
scripts/setup.sh` (with an empty pip cache unless `--keep-pip-cache`), `.venv/bin/routelens
demo`, and `bash .ci/run` (the README's test command). Records each command's seconds and
exit code, the machine's load average before each, and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measurement_file import ROOT, write_measurement  # noqa: E402


def timed(command: list[str], cwd: str, env: dict) -> dict:
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    row = {"command": " ".join(command), "seconds": round(time.perf_counter() - start, 1),
           "exit_code": done.returncode, "load_average_before": load}
    if done.returncode:
        row["stderr_tail"] = done.stderr[-2000:]
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-tests", action="store_true", help="leave out `bash .ci/run`")
    parser.add_argument("--keep-pip-cache", action="store_true", help="let pip use its cache (default: an empty one)")
    parser.add_argument("--out", default="docs/measurements/fresh-clone-cpu.json")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="routelens-fresh-") as folder:
        clone = os.path.join(folder, "routelens")
        subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
        env = dict(os.environ)
        if not args.keep_pip_cache:
            env["PIP_CACHE_DIR"] = os.path.join(folder, "pip-cache")
        rows = [timed(["bash", "scripts/setup.sh"], clone, env)]
        demo_folder = os.path.join(folder, "demo")
        os.makedirs(demo_folder)
        rows.append(timed([os.path.join(clone, ".venv", "bin", "routelens"), "demo", "--no-progress"], demo_folder, env))
        if not args.skip_tests:
            rows.append(timed(["bash", ".ci/run"], clone, env))
    write_measurement({"command": "python benchmarks/fresh_clone.py" + (" --skip-tests" if args.skip_tests else ""),
                       "commit": commit, "date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
                       "cores": os.cpu_count(), "empty_pip_cache": not args.keep_pip_cache, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
