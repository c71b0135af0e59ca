"""The grafted model's folder `out`: checked before any model loads, written whole or not at all.

`graft.json` marks a complete graft. It records the graft's settings (recipient, donor,
dtype, family, the map and the sha256 of every tensor copied and replaced) and `files`,
the names the graft wrote. The grafted model is saved into a sibling folder,
`<out>.partial-<pid>`, and moved into place only once config, weights, tokenizer and
graft.json are all written there: an interrupted graft never leaves at `out` a folder
that looks complete. A Ctrl-C or an error removes the partial folder; one a kill left
behind is removed by the next graft into `out` (once its process is gone).

A new `out` is the partial folder renamed. Into an existing `out` (an empty folder, or a
graft being replaced) the files move one by one, graft.json last, under a journal
(`.graft-placing.json`, listing what is removed and placed) from which the next graft
undoes a placement a kill cut off; a Ctrl-C waits for those few renames to finish.

The same graft again (equal settings) finds its folder and keeps it, so its evaluation
resumes. Another graft into `out` is refused unless `overwrite`, which removes only the
files graft.json lists and the evaluation's routelens outputs; a file of the user's is
never removed or replaced. A non-empty folder without graft.json is not a graft's and is
refused, `overwrite` or not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager

from routelens.errors import SettingError
from routelens.results.paths import check_replaceable, existing_parent

GRAFT_JSON = "graft.json"
FORMAT = "routelens-graft-1"
EVALUATION = "evaluation"
JOURNAL = ".graft-placing.json"
PARTIAL = ".partial-"                      # <out>.partial-<pid>
PARTIAL_MARK = ".routelens-graft-partial"  # inside a partial folder: it is ours to remove


def settings(record: dict) -> dict:
    """What makes two grafts the same graft: the record without the files it wrote."""
    return {key: value for key, value in record.items() if key != "files"}


def read_graft_record(folder: str) -> dict:
    """A grafted folder's graft.json, refused in one line when it is not a routelens graft record."""
    path = os.path.join(folder, GRAFT_JSON)
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else f"not valid JSON: {error.msg}"
        raise SettingError(f"{path} is {reason}; it is not a routelens graft record, so `out` {folder} is neither "
                           "reused nor replaced: choose another `out`", "out") from None
    except OSError as error:
        raise SettingError(f"cannot read {path}: {error.strerror}; choose another `out`", "out") from None
    if not (isinstance(record, dict) and record.get("format") == FORMAT and isinstance(record.get("pairs"), list)):
        raise SettingError(f"{path} is not a routelens graft record (no format {FORMAT!r} and pairs); `out` {folder} "
                           "is neither reused nor replaced: choose another `out`", "out")
    return record


def check_graft_out(out: str, overwrite: bool = False) -> dict | None:
    """Check, before any model loads and without changing anything, that a graft may be
    written at `out`; return the graft record it holds (None when it holds none)."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise SettingError(f"`out` {out} is an existing file, not a folder; the grafted model is a folder: "
                           "choose a folder path", "out")
    if not os.path.isdir(out):
        parent = existing_parent(out)
        if not os.path.isdir(parent):
            raise SettingError(f"cannot create `out` {out}: {parent} is a file, not a folder", "out")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise SettingError(f"cannot create `out` {out}: {parent} is not writable; choose another `out`", "out")
        return None
    if not os.access(out, os.W_OK | os.X_OK):
        raise SettingError(f"`out` {out} is not writable; choose another `out`", "out")
    if os.path.isfile(os.path.join(out, GRAFT_JSON)):
        return read_graft_record(out)   # (the folder around it is checked once the graft is known to change)
    _check_beside(out)
    if os.path.isfile(os.path.join(out, JOURNAL)):
        return None   # a graft's placement cut off by a kill: undone before this one is placed
    if os.listdir(out):
        raise SettingError(f"`out` {out} exists and is not empty, and holds no graft.json: it is not a graft's folder, "
                           "so nothing is written into it (not even with `overwrite`); choose a new or empty `out`",
                           "out", "overwrite")
    return None


def _check_beside(out: str) -> None:
    """The folder around an existing `out` takes the partial folder written beside it."""
    parent = os.path.dirname(os.path.abspath(out))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SettingError(f"`out` {out}: its folder {parent} is not writable, and the grafted model is written "
                           "beside `out` before it is moved in; choose another `out`", "out")


def _plain_names(names) -> list[str]:
    """The names of a record or journal that are plain file names inside the folder (nothing else is touched)."""
    return [name for name in names if isinstance(name, str) and name not in ("", ".", "..")
            and os.path.basename(name) == name and (os.altsep is None or os.altsep not in name)]


def _remove_listed(folder: str, names) -> None:
    for name in _plain_names(names):
        path = os.path.join(folder, name)
        if os.path.islink(path) or os.path.isfile(path):   # files only: a graft writes no folder of its own
            os.remove(path)


def _remove_evaluation(out: str) -> None:
    """The evaluation of the graft being replaced: its routelens outputs (a file of the
    user's stays, and with it the folder)."""
    from routelens.results.run_folder import RUN_JSON, read_run_json, remove_outputs

    folder = os.path.join(out, EVALUATION)
    if os.path.isdir(folder) and not os.path.islink(folder) and os.path.isfile(os.path.join(folder, RUN_JSON)):
        stored = read_run_json(folder)
        if not isinstance(stored.get("files"), list):   # made before runs listed their files: not ours to sort
            raise SettingError(f"{folder} holds an evaluation written before routelens listed the files of a run, "
                               "so `overwrite` cannot tell its files from yours; delete it yourself", "overwrite")
        remove_outputs(folder, stored)
        if not os.listdir(folder):
            os.rmdir(folder)


def _recover(out: str) -> None:
    """Finish what a killed graft left at `out`: a placement's journal (undone unless its
    graft.json, moved last, landed) and a stray partial mark."""
    from routelens.results.run_folder import read_json

    journal = os.path.join(out, JOURNAL)
    if os.path.isfile(journal):
        if not os.path.isfile(os.path.join(out, GRAFT_JSON)):
            try:
                entry = read_json(journal)
            except (OSError, ValueError):   # written atomically: a whole journal or none
                entry = {}
            entry = entry if isinstance(entry, dict) else {}
            _remove_evaluation(out)
            _remove_listed(out, [*entry.get("remove", []), *entry.get("place", [])])
        os.remove(journal)
    if os.path.isfile(os.path.join(out, PARTIAL_MARK)) and os.path.isfile(os.path.join(out, GRAFT_JSON)):
        os.remove(os.path.join(out, PARTIAL_MARK))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # another user's process: alive
        return True
    return True


def partial_path(out: str) -> str:
    """Where this process writes the grafted model before moving it to `out`."""
    return f"{os.path.abspath(out)}{PARTIAL}{os.getpid()}"


def _stale_partials(out: str) -> list[str]:
    """Partial folders of `out` left by a graft whose process is gone (or by this one)."""
    base = os.path.abspath(out)
    parent, name = os.path.split(base)
    if not os.path.isdir(parent):
        return []
    stale = []
    for entry in os.listdir(parent):
        pid = entry[len(name) + len(PARTIAL):]
        path = os.path.join(parent, entry)
        if (entry.startswith(name + PARTIAL) and pid.isdigit() and os.path.isdir(path) and not os.path.islink(path)
                and os.path.isfile(os.path.join(path, PARTIAL_MARK))
                and (int(pid) == os.getpid() or not _alive(int(pid)))):
            stale.append(path)
    return stale


@contextmanager
def _interrupt_deferred():
    """A Ctrl-C during the block takes effect when it ends (the block: a few renames)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and callable(previous):
        previous(signal.SIGINT, received[0])


def _place(partial: str, out: str, names: list[str], old: dict | None) -> None:
    """Move the complete grafted model from `partial` to `out` (graft.json last)."""
    if not os.path.lexists(out):
        os.replace(partial, out)
        os.remove(os.path.join(out, PARTIAL_MARK))
        return
    from routelens.results.run_folder import write_json_atomic

    removed = [GRAFT_JSON, *(old["files"] if old else [])]
    journal = os.path.join(out, JOURNAL)
    write_json_atomic(journal, {"remove": removed, "place": names})
    if old:
        _remove_evaluation(out)
    _remove_listed(out, removed)   # graft.json first: from here `out` does not look complete
    for name in sorted(names, key=lambda name: name == GRAFT_JSON):
        os.replace(os.path.join(partial, name), os.path.join(out, name))
    os.remove(journal)
    shutil.rmtree(partial)


def save_graft(out: str, record: dict, write: Callable[[str], None], overwrite: bool = False) -> tuple[dict, bool]:
    """The graft `record` at `out`: kept when `out` holds this very graft, else written by
    `write(folder)` (the model and tokenizer files) into a partial folder and moved into
    place whole. Returns graft.json's record (with `files`) and whether it was kept."""
    from routelens.results.run_folder import write_json_atomic

    saved = check_graft_out(out, overwrite)
    for stale in _stale_partials(out):
        shutil.rmtree(stale, ignore_errors=True)
    if os.path.isdir(out):
        _recover(out)
    if saved is not None and settings(saved) == settings(record):
        return saved, True   # this very graft: kept as it is (its evaluation resumes)
    if saved is not None:
        changed = sorted(key for key in set(settings(saved)) | set(settings(record)) if saved.get(key) != record.get(key))
        check_replaceable(f"`out` {out}", "another graft", "its graft.json differs from this one's in", changed,
                          saved.get("files"), overwrite, os.path.join(out, GRAFT_JSON), "the graft", again="reuse it")
    if os.path.isdir(out):
        _check_beside(out)
    partial = partial_path(out)
    os.makedirs(partial)
    try:
        open(os.path.join(partial, PARTIAL_MARK), "w").close()
        write(partial)
        names = sorted(name for name in os.listdir(partial) if name not in (PARTIAL_MARK, GRAFT_JSON))
        record = {**record, "files": sorted([*names, GRAFT_JSON])}
        write_json_atomic(os.path.join(partial, GRAFT_JSON), record)
        if os.path.isdir(out):
            ours = set(saved["files"]) if saved else set()
            clash = sorted(name for name in record["files"] if os.path.lexists(os.path.join(out, name)) and name not in ours)
            if clash:
                raise SettingError(f"`out` {out} holds {', '.join(clash)}, which the grafted model would replace and "
                                   "which no graft.json lists as a graft's; move them away or choose another `out`", "out")
        with _interrupt_deferred():
            _place(partial, out, record["files"], saved)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return record, False


def holds(out: str, record: dict) -> bool:
    """`out` holds the graft `record`, complete."""
    try:
        return os.path.isfile(os.path.join(out, GRAFT_JSON)) and settings(read_graft_record(out)) == settings(record)
    except SettingError:
        return False
