"""The path policy of every command and API function: where an output may go and when a
file may be replaced. (Light on imports: the command line checks this before anything
heavy loads.)

- An output never replaces an input: no output that is, holds or lies inside a file or
  folder the command reads (`check_apart_from_inputs`; links and relative paths resolved).
- A file output that exists is replaced only with `overwrite`, and only when routelens
  wrote it and nobody changed it since: every file output is recorded, with its SHA-256, in
  the ledger `.routelens-outputs.json` of its folder (`record_output`); a file the ledger
  does not vouch for is never replaced (`check_out_file`). Run folders keep their own list,
  `files` in run.json (`results.run_folder`).
- Everything is written through a temporary file and a rename (`write_text_atomic`), with
  missing parent folders created: a kill leaves the old file or the new one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import tempfile

from routelens.errors import RouteLensError, SettingError

LEDGER = ".routelens-outputs.json"
# model names that are not paths (models.loading: the embedded model, random tiny models)
MODEL_NAMES, TINY_PREFIX = ("demo",), "tiny:"


def inside(path: str, folder: str) -> bool:
    """`path` is `folder` or lies inside it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def is_path_input(value) -> bool:
    """A value that names an existing file or folder (not the embedded model's or a tiny model's name)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return (isinstance(value, str) and bool(value) and value not in MODEL_NAMES
            and not value.startswith(TINY_PREFIX) and os.path.exists(value))


def check_apart_from_inputs(out: str, inputs, option: str = "out") -> None:
    """An output never replaces an input: `out` (a file or a folder) must not be one of the
    command's inputs, lie inside one (a run folder or a model folder read by the command),
    or contain one. `inputs`: the paths the command reads (missing ones are skipped)."""
    for given in inputs:
        if not is_path_input(given):
            continue
        given = os.fspath(given)
        if inside(out, given) or inside(given, out):
            relation = ("is" if os.path.realpath(out) == os.path.realpath(given) else
                        "lies inside" if inside(out, given) else "contains")
            raise SettingError(f"`{option}` {out} {relation} this command's input {given}: an output never replaces "
                               f"an input; choose another `{option}`", option)


def check_replaceable(path: str, holds: str, differs: str, changed, listed, overwrite: bool, record: str,
                      whose: str, again: str = "resume it") -> None:
    """`path` holds something routelens wrote (`holds`: a run, a graft) with other settings
    (`changed`): replaced only with `overwrite`, and only where its record (`record`) lists
    the files it wrote (`listed`): without that list its files cannot be told from the user's."""
    if not overwrite:
        raise SettingError(f"{path} holds {holds} ({differs}: {', '.join(changed)}); re-run with the same settings to "
                           f"{again}, or pass `overwrite` to replace it, or choose another `out`", "overwrite", "out")
    if not isinstance(listed, list):
        raise SettingError(f"{record} does not list the files {whose} wrote, so `overwrite` cannot tell them from yours "
                           "(it was made before routelens listed them) and removes nothing; delete the folder yourself "
                           "or choose another `out`", "overwrite", "out")


def existing_parent(path: str) -> str:
    """The nearest existing folder above `path` (where creating it starts)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    return parent


# ---------------------------------------------------------------------------- file outputs
def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _ledger_path(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), LEDGER)


def _read_ledger(ledger: str) -> dict:
    try:
        with open(ledger, encoding="utf-8") as handle:
            stored = json.load(handle)
    except (OSError, ValueError):   # missing or unreadable: it vouches for nothing
        return {}
    return stored if isinstance(stored, dict) else {}


def written_by_routelens(path: str) -> str | None:
    """The command that wrote the file `path`, when the ledger of its folder records it with
    the file's present content; None for a file routelens did not write or that changed since."""
    entry = _read_ledger(_ledger_path(path)).get(os.path.basename(path))
    if not isinstance(entry, dict) or not os.path.isfile(path):
        return None
    return entry.get("command") if entry.get("sha256") == file_sha256(path) else None


def record_output(path: str, command: str) -> None:
    """Record in the ledger of its folder that `command` wrote the file `path` (as it is now)."""
    ledger = _ledger_path(path)
    entries = _read_ledger(ledger)
    entries[os.path.basename(path)] = {"command": command, "sha256": file_sha256(path),
                                       "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    write_text_atomic(ledger, json.dumps(entries, indent=2, sort_keys=True) + "\n")


def check_out_file(path: str, option: str = "--out", inputs=(), overwrite: bool = False) -> None:
    """An output *file* path, checked before any work (so hours of sampling are not lost to a
    bad path): apart from the command's `inputs`; not a folder; its folder writable (missing
    folders are created when it is written); and, where it exists, replaced only with
    `overwrite` and only when routelens wrote it (`written_by_routelens`)."""
    check_apart_from_inputs(path, inputs, option.lstrip("-").replace("-", "_"))
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise RouteLensError(f"{option} {path} is a folder; give a file path such as {os.path.join(path, 'out.jsonl')}")
    parent = existing_parent(path)
    if not os.path.isdir(parent):
        raise RouteLensError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RouteLensError(f"{option} {path}: {parent} is not writable; choose another path")
    if os.path.basename(path) == LEDGER:
        raise RouteLensError(f"{option} {path}: {LEDGER} is where routelens records the files it writes; choose "
                             "another name")
    if not os.path.exists(path):
        return
    if not os.access(path, os.W_OK):
        raise RouteLensError(f"{option} {path} is read-only; choose another path")
    command = written_by_routelens(path)
    if command is None:
        raise RouteLensError(f"{option} {path} exists and was not written by routelens (or was changed since): "
                             "it is never replaced; choose another path or move the file away")
    if not overwrite:
        raise RouteLensError(f"{option} {path} exists (written by routelens {command}); pass --overwrite to replace "
                             "it, or choose another path")


def write_text_atomic(path: str, text: str) -> None:
    """Write through a temporary file beside `path` and a rename, creating missing folders:
    a kill leaves the old file or the new one (and at most a hidden temporary file)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise RouteLensError(f"cannot create the folder of {path}: {error.strerror}; choose another path") from None
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temporary, 0o666 & ~_umask())   # mkstemp's 0600 would make outputs private
        os.replace(temporary, path)
    except BaseException:   # Ctrl-C included: no temporary file is left behind
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def check_new_folder(path: str, option: str = "--out") -> None:
    """An output folder written whole (a model): it must not exist yet, or be empty, and
    its parent must be writable (checked before any work)."""
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        kind = "folder that is not empty" if os.path.isdir(path) else "file"
        raise RouteLensError(f"{option} {path} is an existing {kind}; it is never replaced: choose a new folder")
    parent = existing_parent(path)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise RouteLensError(f"{option} {path}: {parent} is not a writable folder; choose another path")


def write_folder_atomic(path: str, write) -> None:
    """Call `write(folder)` on a hidden temporary folder beside `path`, then rename it to
    `path`: an interrupted write (Ctrl-C, an error) leaves nothing at `path` and removes the
    temporary folder (a kill -9 may leave the hidden `.NAME.partial-*`, never `path`)."""
    import shutil

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(path))}.partial-")
    try:
        write(temporary)
        os.chmod(temporary, 0o777 & ~_umask())
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        os.rename(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_output(path: str, text: str, command: str) -> None:
    """A file output of `command` (checked by `check_out_file` beforehand): written
    atomically, then recorded in its folder's ledger, so a later `--overwrite` may replace it.
    A file that appeared at `path` since the check (hours of sampling ago) and that
    routelens did not write is refused, not replaced."""
    if os.path.lexists(path) and written_by_routelens(path) is None:
        raise RouteLensError(f"{path} appeared while routelens worked and was not written by it: it is never "
                             "replaced; move it away and re-run (a resumable command resumes)")
    write_text_atomic(path, text)
    record_output(path, command)
