"""Logging: structlog, one event per line.

JSON lines when ``log_format = "json"`` (or "auto" and stderr is not a
terminal), structlog's console renderer otherwise. Output goes to stderr or to
``log_file``; USR1 reopens the file so logrotate can move it away.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
           "warning": logging.WARNING, "error": logging.ERROR}


class ReopenableStream:
    """A line sink that can be pointed at a new file without losing lines."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._path: str | None = None
        self._fh: TextIO = sys.stderr

    def open(self, path: str | None) -> None:
        with self._lock:
            old = self._fh
            if path:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                self._fh = open(path, "a", buffering=1, encoding="utf-8")
            else:
                self._fh = sys.stderr
            self._path = path
            if old is not sys.stderr and old is not self._fh:
                old.close()

    def reopen(self) -> None:
        self.open(self._path)

    @property
    def path(self) -> str | None:
        return self._path

    def isatty(self) -> bool:
        try:
            return self._fh.isatty()
        except ValueError:
            return False

    def write(self, line: str) -> None:
        with self._lock:
            try:
                self._fh.write(line)
                self._fh.flush()
            except (OSError, ValueError):
                pass  # a full disk must not take the proxy down

    def flush(self) -> None:
        with self._lock:
            try:
                self._fh.flush()
            except (OSError, ValueError):
                pass


STREAM = ReopenableStream()


class _Logger:
    """The minimal logger structlog needs: every method writes a line."""

    def __init__(self, stream: ReopenableStream) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        self._stream.write(message + "\n")

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


SETTINGS: tuple = ()    # (format, level, file) of the last configure()


def configure(fmt: str = "auto", level: str = "info", log_file: str | None = None) -> None:
    global SETTINGS
    STREAM.open(log_file)
    SETTINGS = (fmt, level, log_file)
    if fmt == "auto":
        fmt = "console" if STREAM.isatty() else "json"
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors += [structlog.processors.format_exc_info,
                       structlog.processors.JSONRenderer(sort_keys=False)]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=STREAM.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=lambda *args: _Logger(STREAM),
        cache_logger_on_first_use=False,
    )


def get(**context):
    """A logger that follows configure(): a reload may change the level and
    the format of every component's logger, not only of new ones."""
    return structlog.get_logger(**context)


def reopen() -> None:
    STREAM.reopen()
