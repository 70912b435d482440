"""Logging set-up: one logger for the project, to stdout and ``OUTPUT_DIR/log.txt`` (rank 0 only)."""
import logging
import os
import sys

LOGGER_NAME = "mmreid"


def setup_logger(output_dir: str = "", rank: int = 0, name: str = LOGGER_NAME,
                 filename: str = "log.txt") -> logging.Logger:
    """Configure and return the project logger (file ``output_dir/filename``, appended to).

    Non-zero ranks log warnings and errors only, to stderr, so a multi-process run prints one copy
    of the progress. Calling it again replaces the previous handlers (safe in tests).
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", datefmt="%m/%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if output_dir and rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(output_dir, filename))
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


def get_logger() -> logging.Logger:
    """The project logger (configured by :func:`setup_logger`)."""
    return logging.getLogger(LOGGER_NAME)


def log_file_path(logger: logging.Logger = None) -> str:
    """The file the project logger writes to, or "" before :func:`setup_logger` named one."""
    for handler in (logger or get_logger()).handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return ""


def log_to_file(message: str, exc_info=None) -> str:
    """Write ``message`` (and a traceback) to the log file only, not the console; returns the
    file's path ("" when there is none)."""
    logger = get_logger()
    record = logger.makeRecord(logger.name, logging.ERROR, "", 0, message, (), exc_info)
    path = ""
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
            path = handler.baseFilename
    return path
