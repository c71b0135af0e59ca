"""The `routelens` command: one module per command, each a thin call of the Python API.

`main(argv)` returns the exit code, so tests can call it. User errors (`RouteLensError`)
and usage errors print one line and exit 2; a run-time check that fails on the checkpoint
(`RuntimeCheckFailed`) prints one line and exits 1.

A command module has NAME, HELP, EPILOG, RESUMABLE (and may say what an interrupted run
keeps in INTERRUPTED), `parents()` (shared option groups from
`routelens.cli.parsing`; an analysis' own options are generated from its config dataclass),
`add_arguments(parser)` and `run(args) -> int`. An installed package adds a command through
the entry-point group `routelens.commands` (`routelens.cli.analysis_command`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from routelens import __version__
from routelens.allocator import keep_freed_memory
from routelens.cli.parsing import OneLineParser
from routelens.errors import RouteLensError, RuntimeCheckFailed, SettingError

# In the order `routelens --help` lists them: an analysis' command lives in its folder.
_A, _C = "routelens.analyses.", "routelens.cli."
COMMAND_MODULES = (_C + "demo", _A + "counterfactual.command", _A + "rollout.command", _A + "replay.command",
                   _A + "isolation.command",
                   _A + "semantic_routing.command", _A + "graft.command", _A + "router_update.command",
                   _A + "passk.command", _C + "report", _C + "export", _C + "trajectories", _C + "verify",
                   _C + "inspect_model", _C + "models", _C + "evaluate", _C + "train_demo")


def commands() -> dict:
    """command name -> its module; then the commands installed packages declare
    (`routelens.cli.analysis_command`; a broken one is skipped with a warning)."""
    from routelens.cli.analysis_command import installed_commands

    modules = [importlib.import_module(name) for name in COMMAND_MODULES]
    built_in = {module.NAME: module for module in modules}
    return {**built_in, **installed_commands(built_in)}


def build_parser(available: dict | None = None) -> OneLineParser:
    parser = OneLineParser(prog="routelens", description="Audit the routers of Mixture-of-Experts language models.")
    parser.add_argument("--version", action="version", version=f"routelens {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in (available or commands()).items():
        command = subparsers.add_parser(name, help=module.HELP, description=module.HELP, epilog=module.EPILOG,
                                        parents=module.parents())
        module.add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    available = commands()
    parser = build_parser(available)
    args, unknown = parser.parse_known_args(argv)
    if unknown:   # reported by the command's own parser: its help, and the option meant
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subparsers.choices[args.command].unrecognized(unknown)
    module = available[args.command]
    # SIGTERM (a job scheduler's time limit, `kill`) ends the command as Ctrl-C does, so
    # what it must clean at exit (disk-offload folders, temporary files) is cleaned
    main_thread = threading.current_thread() is threading.main_thread()   # (signal handlers live there only)
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        return _run(module, args)
    except KeyboardInterrupt:   # also during the imports below, which take seconds
        if getattr(module, "INTERRUPTED", None):   # what this command keeps, in its own words
            print(f"routelens: interrupted; {module.INTERRUPTED}", file=sys.stderr)
        elif module.RESUMABLE:
            print("routelens: interrupted; the units done are kept (run.json shows how many): "
                  "re-run the same command to resume", file=sys.stderr)
        else:
            print(f"routelens: interrupted; `{args.command}` does not resume: nothing was written, "
                  "re-running starts again from the beginning", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _terminated(signum, frame):
    raise KeyboardInterrupt


def _run(module, args) -> int:
    # our own progress bars say what is going on: Hugging Face's are off (before transformers
    # is imported, through the environment, so that `routelens models` imports no torch)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    try:
        keep_freed_memory()   # large tensors reuse freed heap blocks instead of page-faulting fresh ones
        check_outputs_apart_from_inputs(args)   # every command, before any model loads or folder is made
        return module.run(args)
    except RuntimeCheckFailed as error:
        print(f"routelens: check failed: {error}", file=sys.stderr)
        return 1
    except SettingError as error:   # named as the command line spells it
        print(f"routelens: error: {error.as_options()}", file=sys.stderr)
        return 2
    except RouteLensError as error:
        print(f"routelens: error: {error}", file=sys.stderr)
        return 2
    except (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError) as error:
        # the file system refused (a folder made read-only meanwhile, a path removed): one line
        print(f"routelens: error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except RuntimeError as error:
        from routelens.models.loading import experts_kernel_error

        translated = experts_kernel_error(error)
        if translated is None:
            raise
        print(f"routelens: error: {translated}", file=sys.stderr)
        return 2


# the options through which a command reads files or folders, and those through which it writes
INPUT_OPTIONS = ("model", "trajectories", "counterfactual", "heldout_counterfactual", "items", "problems", "tokens",
                 "run", "runs", "recipient", "donor", "router_delta", "compare_delta",
                 "routes_from")
OUTPUT_OPTIONS = ("out", "json")


def check_outputs_apart_from_inputs(args) -> None:
    """An output never replaces an input, for every command: no `--out` / `--json` that is,
    holds or lies inside a file or folder the command reads (`check_apart_from_inputs`)."""
    from routelens.results.paths import check_apart_from_inputs

    inputs = []
    for name in INPUT_OPTIONS:
        value = getattr(args, name, None)
        inputs += value if isinstance(value, list) else [value]
    inputs = [value for value in inputs if isinstance(value, str) and os.path.exists(value)]
    for name in OUTPUT_OPTIONS:
        out = getattr(args, name, None)
        if isinstance(out, str) and out:
            check_apart_from_inputs(out, inputs, name)


if __name__ == "__main__":
    sys.exit(main())
