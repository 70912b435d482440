"""Output paths of the command-line tools: checked before any work, written atomically.

    out = check_output(args.html, "--html", (".html", ".htm"), inputs={"--gallery": args.gallery})
    ...                                           # the work
    with replacing(out, "--html") as tmp:         # write tmp; renamed onto out when the block
        write_page(tmp)                           # (and ``validate(tmp)``) succeeds

:func:`check_output` refuses, in one line naming the option: an output that is one of the
command's inputs, a name without the expected extension (a file of another kind), a folder, a
place under a file, and a place that cannot be written. :func:`replacing` writes to a temporary
file beside the output and renames it into place only once it is complete (and valid), so a
failing run leaves an existing output as it was and no temporary file behind.
"""
import contextlib
import errno
import os
import tempfile
from typing import Callable, Dict, Iterator, Optional, Sequence


# Errors of the place written to (not of what is being written): reported naming the option.
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputPathError(ValueError):
    """An output path that would lose the user's files or cannot be written; names the option."""


def _check_writable_place(folder: str, path: str, option: str) -> None:
    """``folder`` (which will hold ``option``'s ``path``) exists or can be created, and can be
    written."""
    ancestor = os.path.abspath(folder)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise OutputPathError(f"{option} {path}: {ancestor} is a file, not a folder: choose "
                              f"another place for {option}")
    try:  # a probe: permissions, a read-only file system, a pseudo file system
        handle, probe = tempfile.mkstemp(prefix=".write_test.", dir=ancestor)
        os.close(handle)
        os.remove(probe)
    except OSError as exc:
        raise OutputPathError(f"{option} {path}: cannot write in {ancestor} "
                              f"({exc.strerror or exc}): choose another place for {option}") from None


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_output(path: str, option: str, extensions: Sequence[str],
                 inputs: Optional[Dict[str, str]] = None) -> str:
    """Check an output file before the work; returns ``path``.

    ``extensions``: the accepted endings (e.g. (".png",)); ``inputs``: {option: path} of the
    command's input files (an output naming one of them is refused).
    """
    if not path:
        raise OutputPathError(f"{option} is empty: name the {extensions[0]} file to write")
    for name, given in (inputs or {}).items():
        if given and os.path.isfile(given) and _same_file(path, given):
            raise OutputPathError(f"{option} {path} is also the {name} file: it would be "
                                  f"overwritten; choose another name for {option}")
    if os.path.isdir(path):
        raise OutputPathError(f"{option} {path} is a folder: name a {extensions[0]} file, e.g. "
                              f"{os.path.join(path, 'out' + extensions[0])}")
    if not path.lower().endswith(tuple(e.lower() for e in extensions)):
        raise OutputPathError(f"{option} {path}: name a {' or '.join(extensions)} file (a file of "
                              "another kind is not overwritten)")
    _check_writable_place(os.path.dirname(os.path.abspath(path)), path, option)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise OutputPathError(f"{option} {path} exists and cannot be replaced (permission "
                              f"denied): choose another name for {option}")
    return path


def check_output_folder(path: str, option: str) -> str:
    """Check an output folder before the work (it may exist; it must not be a file)."""
    if not path:
        raise OutputPathError(f"{option} is empty: name the folder to write")
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputPathError(f"{option} {path} is a file, not a folder: name a folder for {option}")
    _check_writable_place(path, path, option)
    return path


@contextlib.contextmanager
def replacing(path: str, option: str,
              validate: Optional[Callable[[str], None]] = None) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (same extension); when the block ends without an
    error, ``validate(tmp)`` (if given) runs and the file is renamed onto ``path``. On any error
    the temporary file is removed and ``path`` is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                                       suffix=f".tmp{os.path.splitext(path)[1]}", dir=folder)
        os.close(handle)
    except OSError as exc:
        raise OutputPathError(f"{option} {path}: cannot write in {folder} "
                              f"({exc.strerror or exc}): choose another place for {option}") from exc
    try:
        yield tmp
        if validate is not None:
            validate(tmp)
        os.chmod(tmp, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno not in _DISK_ERRORS:
            raise
        raise OutputPathError(f"{option} {path}: cannot write it ({exc.strerror}); an existing "
                              "file is unchanged: free space or choose another place") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
