"""A `routelens` command generated from an analysis: its config dataclass gives the options.

An analysis that runs through the run loop (`routelens.runs.loop`) becomes a command by
declaring an `AnalysisCommand`: the fields of its config are the options (named as the
fields, with the help each declares through `routelens.config.setting`), and the command
adds what every analysis command shares: the model options, `--out` (a resumable run
folder), `--overwrite`, `--no-progress` and, unless `ray=False`, `--ray`/`--workers`.

A package (or a test) adds its command without editing routelens by declaring it in the
entry-point group `routelens.commands` (name: the command; value: the `AnalysisCommand`,
or any object with a command module's attributes, see `routelens.cli`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

ENTRY_POINT_GROUP = "routelens.commands"


@dataclass(frozen=True)
class AnalysisCommand:
    """`name` and `help` as `routelens --help` lists them; `config`: the analysis' config
    dataclass; `analysis(lens, out, *, config, overwrite, show_progress, ray)`: runs it
    into the run folder `out` and returns a result whose `summary_dict` (or `summary`) is
    printed, unless `report(result)` prints it another way."""

    name: str
    help: str
    config: type
    analysis: Callable
    epilog: str = ""
    ray: bool = True
    report: Callable | None = None

    # the command-module interface (`routelens.cli`)
    @property
    def NAME(self) -> str:   # noqa: N802 - the attribute names of a command module
        return self.name

    @property
    def HELP(self) -> str:   # noqa: N802
        return self.help

    @property
    def EPILOG(self) -> str:   # noqa: N802
        return self.epilog

    RESUMABLE = True   # every analysis of the run loop resumes

    def parents(self) -> list:
        from routelens.cli.parsing import config_options, model_options, ray_options, run_options

        return [model_options(), config_options(self.config, self.name), run_options()] + (
            [ray_options()] if self.ray else [])

    def add_arguments(self, parser) -> None:
        parser.add_argument("--out", required=True, help="run folder (created; resumed if it holds the same run)")

    def run(self, args) -> int:
        import json

        from routelens.cli.parsing import config_from_args, load_lens, ray_from_args

        config = config_from_args(self.config, args)   # bad settings fail before the model loads
        ray = ray_from_args(args) if self.ray else None
        result = self.analysis(load_lens(args), args.out, config=config, overwrite=args.overwrite,
                               show_progress=not args.no_progress, ray=ray)
        if self.report is not None:
            self.report(result)
        else:
            summary = getattr(result, "summary_dict", None) or getattr(result, "summary", None)
            print(json.dumps(summary, indent=1, default=str))
        print(f"run folder: {args.out}")
        return 0


def installed_commands(built_in: dict) -> dict:
    """command name -> command, of the entry-point group `routelens.commands`. A broken one
    (it fails to import, lacks a command's attributes, or takes a built-in command's name)
    is skipped with a warning: one bad package must not take every command down."""
    import importlib.metadata
    import warnings

    found = {}
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {entry_point.value!r} ({ENTRY_POINT_GROUP}: {entry_point.name})"
        try:
            command = entry_point.load()
        except Exception as error:   # a plugin's own bug: say which, and go on
            warnings.warn(f"{where} failed to import ({type(error).__name__}: {error}); skipped", stacklevel=2)
            continue
        missing = [name for name in ("NAME", "HELP", "EPILOG", "RESUMABLE", "parents", "add_arguments", "run")
                   if not hasattr(command, name)]
        if missing:
            warnings.warn(f"{where} is not a command: it lacks {', '.join(missing)} (declare a "
                          "routelens.cli.analysis_command.AnalysisCommand); skipped", stacklevel=2)
        elif command.NAME in built_in:
            warnings.warn(f"{where} takes the name of the routelens command {command.NAME!r}; skipped", stacklevel=2)
        else:
            found[command.NAME] = command
    return found
