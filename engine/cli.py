"""Running an entry point from the command line: a failure prints one clear line and exits
non-zero; the traceback goes to the log file (and to the console with ``--debug``).

    if __name__ == "__main__":
        run_cli(main)
"""
import multiprocessing
import os
import signal
import sys
import traceback
from typing import Callable, Optional, Sequence

from utils.logger import log_to_file

# Exit codes: 1 an error, 130 interrupted by Ctrl-C (the shell's convention).
EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def error_line(exc: BaseException) -> str:
    """The message of ``exc`` for a person: our errors as they are, others with their type."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    message = str(message).strip() or type(exc).__name__
    if "Original Traceback" in message:  # re-raised from a data-loader worker: its last line
        last = message.splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
    ours = type(exc).__module__.split(".")[0] in ("config", "data", "engine", "modeling", "solver",
                                                   "utils", "tools", "__main__")
    builtin_clear = isinstance(exc, (FileNotFoundError, PermissionError, ValueError, KeyError))
    return message if ours or builtin_clear else f"{type(exc).__name__}: {message}"


def stop_loader_workers() -> None:
    """Kill this process's data-loader workers. They ignore SIGTERM (utils/seed.py), so after an
    error Python's exit handler would wait for them forever."""
    children = multiprocessing.active_children()
    if not children:
        return
    if hasattr(signal, "SIGCHLD"):  # torch's loader handler would raise on the workers' deaths
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)


def run_cli(main: Callable, argv: Optional[Sequence[str]] = None) -> None:
    """Call ``main(argv)`` and exit: 0 on success, 1 with ``error: <message>`` on an error, 130 on
    Ctrl-C. SystemExit (argparse, a finished or pre-empted run) passes through."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    code = 0
    try:
        main(argv)
    except BrokenPipeError:  # the reader of stdout stopped (``| head``): nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except KeyboardInterrupt:
        path = log_to_file("interrupted by Ctrl-C", sys.exc_info())
        print("\ninterrupted (Ctrl-C)" + (f"; log: {path}" if path else "") +
              ". A training run continues from its last checkpoint with --resume.", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place every error is reported
        path = log_to_file(f"error: {error_line(exc)}", sys.exc_info())
        if debug:
            traceback.print_exc()
        print(f"error: {error_line(exc)}", file=sys.stderr)
        where = f"the traceback is in {path}" if path else "no log file was opened yet"
        print(f"({where}{'' if debug else '; --debug prints it here'})", file=sys.stderr)
        code = EXIT_ERROR
    finally:
        stop_loader_workers()
    sys.exit(code)
