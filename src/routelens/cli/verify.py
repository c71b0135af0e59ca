"""`routelens verify`: routing, overrides, engines and scorer checked on a checkpoint."""

from __future__ import annotations

import json
import sys

from routelens.cli.parsing import load_lens, model_options, positive_int, seed

NAME = "verify"
HELP = "check routing, overrides, engines and scorer on a checkpoint"
RESUMABLE = False
EPILOG = """examples:
  routelens verify --model demo
  routelens verify --model ./my-qwen3-moe --device cuda --dtype bfloat16 --json verify.json
  routelens verify --model tiny:deepseek_v3

Exit 0 when every check passes, 1 when one fails (the table names it), 2 on bad input.
"""


def parents():
    return [model_options()]


def add_arguments(parser) -> None:
    parser.add_argument("--length", type=positive_int, default=32, help="tokens of the random test sequence (default 32)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the test sequence and routes (default 0)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the table (and the model) to this JSON file")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --json if routelens wrote it (a file it did not write is never replaced)")


def run(args) -> int:
    from routelens.results.paths import check_out_file, write_output
    from routelens.verify import format_table, verify_model

    if args.json:
        check_out_file(args.json, "--json", inputs=[args.model], overwrite=args.overwrite)
    loaded = load_lens(args).loaded
    table = verify_model(loaded, length=args.length, seed=args.seed)
    print(f"dtype noise: {table.attrs['dtype_noise']['text']}")
    print(format_table(table))
    failed = table[table["status"] == "fail"]
    if args.json:
        record = {"model": loaded.adapter.describe(), "device": loaded.device, "dtype": loaded.dtype,
                  "length": args.length, "seed": args.seed, "passed": failed.empty,
                  "dtype_noise": table.attrs["dtype_noise"],
                  "checks": table.astype(object).where(table.notna(), None).to_dict("records")}
        write_output(args.json, json.dumps(record, indent=2, default=str) + "\n", "verify")
    if failed.empty:
        skipped = int((table["status"] == "skipped").sum())
        print(f"all {len(table) - skipped} checks passed on {len(loaded.adapter.moe_layers)} MoE layers"
              + (f" ({skipped} skipped, reason in the table)" if skipped else ""))
        return 0
    names = ", ".join(f"{r.check} (layer {r.layer})" for r in failed.itertuples())
    print(f"routelens: verify: {len(failed)} of {len(table)} checks failed: {names}", file=sys.stderr)
    return 1
