"""Where an output may go: never onto, into or around an input of the same command.
(Light on imports: the command line checks this before anything heavy loads.)"""

from __future__ import annotations

import os

from routelens.errors import SettingError


def inside(path: str, folder: str) -> bool:
    """`path` is `folder` or lies inside it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_apart_from_inputs(out: str, inputs, option: str = "out") -> None:
    """An output never replaces an input: `out` (a file or a folder) must not be one of the
    command's inputs, lie inside one (a run folder or a model folder read by the command),
    or contain one. `inputs`: the paths the command reads (missing ones are skipped)."""
    for given in inputs:
        if not given or not isinstance(given, (str, os.PathLike)) or not os.path.exists(given):
            continue
        given = os.fspath(given)
        if inside(out, given) or inside(given, out):
            relation = ("is" if os.path.realpath(out) == os.path.realpath(given) else
                        "lies inside" if inside(out, given) else "contains")
            raise SettingError(f"`{option}` {out} {relation} this command's input {given}: an output never replaces "
                               f"an input; choose another `{option}`", option)
