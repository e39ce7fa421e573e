"""How the three commands end: exit code 0 done, 1 a gate or check failed, 2 bad input or any other error, and
never a Python traceback for a user's mistake.

`run_cli(prog, fn)` runs a command body: the project's errors (bad data, checkpoints, settings, exports, backends)
become one line `prog: error: ...` and exit code 2; anything unexpected also exits 2 (never 1, which is the
gate's), with its type named and the traceback kept for `FA_DEBUG=1`. The output checks below run before any
work, so a benchmark never finds out at its end that it cannot write its results.
"""
from __future__ import annotations

import os
import sys
import tempfile
import traceback
from typing import Callable

EXIT_OK, EXIT_GATE, EXIT_ERROR = 0, 1, 2


class SettingsError(ValueError):
    """A flag or config value that cannot work; the message names the flag."""


def _echo(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_cli(prog: str, fn: Callable, *args, on_exit: Callable = None, **kw):
    """Call `fn(*args, **kw)`; turn every exception into a one-line message and exit code 2."""
    try:
        return fn(*args, **kw)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        _echo(f"{prog}: interrupted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001  (the point: nothing reaches the user as a traceback)
        if os.environ.get("FA_DEBUG"):
            traceback.print_exc()
        _echo(f"{prog}: error: {describe(e)}")
        sys.exit(EXIT_ERROR)
    finally:
        if on_exit is not None:
            on_exit()


def describe(e: BaseException) -> str:
    """The message of a project error as it is; other exceptions with their type, and where the traceback is."""
    msg = str(e).strip() or type(e).__name__
    if _is_project_error(e):
        return msg
    first = msg.splitlines()[0]
    return f"{type(e).__name__}: {first} (unexpected; run with FA_DEBUG=1 for the traceback)"


def _is_project_error(e: BaseException) -> bool:
    mod = type(e).__module__ or ""
    if mod.split(".")[0] in ("fa_train", "fa_deploy", "cuda_kernels"):
        return True
    return isinstance(e, (OSError, SettingsError))


def _probe_dir(path: str) -> None:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".fa-write-test-", dir=path)
    os.close(fd)
    os.remove(probe)


def check_output_dir(path: str, flag: str) -> str:
    """Create `path` if needed and prove it is writable (a test file is created and removed)."""
    try:
        _probe_dir(path)
    except OSError as e:
        raise SettingsError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return path


def check_output_file(path: str, flag: str) -> str:
    """The folder of `path` is created if needed and writable, and `path` is not a folder."""
    if os.path.isdir(path):
        raise SettingsError(f"{flag} {path}: is a folder, a file name is expected")
    try:
        _probe_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        raise SettingsError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise SettingsError(f"{flag} {path}: the file exists and is not writable")
    return path
