"""How the commands end: exit code 0 done, 1 a gate or check failed, 2 bad input or any other error, and never a
Python traceback for a user's mistake.

`run_cli(prog, fn)` runs a command body: the project's errors (bad data, checkpoints, settings, exports, backends,
unwritable outputs) become one line `prog: error: ...` and exit code 2; anything unexpected is an internal error,
also exit 2 (never 1, which is the gate's), with its type named and its traceback shown with `FA_DEBUG=1`. An
exception with an `exit_code` attribute (a training run stopped by a signal: 128 + signal) exits with that code.
The output checks below run before any work, so a command never finds out at its end that it cannot write.
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
    """Call `fn(*args, **kw)` and exit with the exit code it returns (an int; anything else counts as 0); every
    exception becomes one line."""
    try:
        code = fn(*args, **kw)
        code = code if isinstance(code, int) and not isinstance(code, bool) else EXIT_OK
    except SystemExit:
        raise
    except KeyboardInterrupt:
        _echo(f"{prog}: interrupted")
        code = 130
    except Exception as e:  # noqa: BLE001  (the point: nothing reaches the user as a traceback)
        if getattr(e, "exit_code", None) is not None:
            _echo(f"{prog}: {e}")
            code = int(e.exit_code)
        else:
            if os.environ.get("FA_DEBUG"):
                traceback.print_exc()
            _echo(f"{prog}: {describe(e)}")
            code = EXIT_ERROR
    finally:
        if on_exit is not None:
            on_exit()
    if code:
        sys.exit(code)
    return code


def describe(e: BaseException) -> str:
    """'error: <message>' for the project's errors and unusable inputs or outputs; 'internal error: <type>: ...'
    for anything else (a bug)."""
    msg = str(e).strip() or type(e).__name__
    if _is_project_error(e):
        return f"error: {msg}"
    return (f"internal error: {type(e).__name__}: {msg.splitlines()[0]} (a bug: run with FA_DEBUG=1 for the "
            f"traceback and report it)")


def _is_project_error(e: BaseException) -> bool:
    mod = type(e).__module__ or ""
    if mod.split(".")[0] in ("fa_train", "fa_deploy", "cuda_kernels"):
        return True
    return isinstance(e, (OSError, SettingsError))


def probe_writable(path: str, keep: bool = True) -> None:
    """Create the folder `path` if needed and write and remove a test file in it (as root, os.access says yes to
    everything). With keep=False the folders this created are removed again. Raises OSError."""
    made, p = [], os.path.abspath(path)
    try:
        if os.path.exists(p) and not os.path.isdir(p):
            raise NotADirectoryError(20, "exists and is not a folder")
        while not os.path.exists(p):
            made.append(p)
            p = os.path.dirname(p)
        for d in reversed(made):
            os.mkdir(d)
        fd, probe = tempfile.mkstemp(prefix=".fa-write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    finally:
        if not keep:
            for d in made:
                try:
                    os.rmdir(d)
                except OSError:
                    pass


def check_output_dir(path: str, flag: str) -> str:
    """The folder `path` exists (created if needed) and is writable; else a SettingsError naming the flag."""
    try:
        probe_writable(path)
    except OSError as e:
        raise SettingsError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return path


def check_output_file(path: str, flag: str) -> str:
    """The folder of `path` exists (created if needed) and is writable, and `path` is not a folder."""
    if os.path.isdir(path):
        raise SettingsError(f"{flag} {path}: is a folder, a file name is expected")
    try:
        probe_writable(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        raise SettingsError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise SettingsError(f"{flag} {path}: the file exists and is not writable")
    return path
