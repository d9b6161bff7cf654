"""Loading: the file's bytes, their decoding, the TOML parse, and the order
in which problems are reported.

``load`` reads a file (a regular file of at most MAX_CONFIG_BYTES: a
device, a pipe or a directory is refused unread), ``loads`` checks text.
A file with mistakes is rejected as a whole with a ``ConfigError`` that
lists *every* problem found, in line order, each naming the key path and
the line, so that one round of edit-and-check fixes them all.
"""
from __future__ import annotations

import ast
import dataclasses
import os
import re
import stat
import tomllib

from .checker import Checker
from .issues import ConfigError, ConfigIssue, format_path, quote
from .model import Config
from .scanner import LineScanner
from .values import fmt_size

_TOML_AT_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_END_RE = re.compile(r"\s*\(at end of document\)\s*$")
_TUPLE_RE = re.compile(r"\((?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")(?:, (?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"))*,?\)")


def _syntax_issue(exc: tomllib.TOMLDecodeError, text: str, file: str) -> ConfigIssue:
    message = str(exc)
    line: int | None = None
    column: int | None = None
    match = _TOML_AT_RE.search(message)
    if match:
        line, column = int(match.group(1)), int(match.group(2))
        message = message[: match.start()]
    else:
        match = _TOML_END_RE.search(message)
        if match:
            line = max(1, len(text.splitlines()))
            message = message[: match.start()]

    def dotted(m: re.Match[str]) -> str:
        # tomllib shows key paths as Python tuples: ('upstream', 'app') -> "upstream.app"
        try:
            parts = ast.literal_eval(m.group())
        except (ValueError, SyntaxError):
            return m.group()
        if not isinstance(parts, tuple) or not all(isinstance(p, str) for p in parts):
            return m.group()
        return quote(format_path(tuple(parts)))

    message = _TUPLE_RE.sub(dotted, message).strip()
    if message:
        message = message[0].lower() + message[1:]
    if column is not None:
        message += f" (column {column})"
    return ConfigIssue(path="", line=line, message=f"TOML syntax error: {message}", file=file)


def _issue_order(issue: ConfigIssue) -> tuple[bool, int]:
    return (issue.line is None, issue.line or 0)


def _check_text(text: str, file: str) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_issue(exc, text, file)]) from None
    except RecursionError:
        raise ConfigError(
            [ConfigIssue("", None, "TOML syntax error: values are nested too deeply", file)]
        ) from None
    scanner = LineScanner(text)
    scanner.scan()
    checker = Checker(data, file, scanner)
    config = checker.run()
    if config is None:
        raise ConfigError(sorted(checker.issues, key=_issue_order))
    return dataclasses.replace(config, source=text)


def loads(text: str, file: str = "<string>") -> Config:
    """Check config ``text`` (named ``file`` in messages); raise ConfigError on any problem."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError([_decode_issue(bytes(text), exc, file)]) from None
    try:
        return _check_text(text, file)
    except ConfigError:
        raise
    except Exception as exc:
        # A bug here must still end in one clear line, never in a traceback at the user.
        raise ConfigError(
            [ConfigIssue("", None, f"internal error while checking the file: {exc!r}", file)]
        ) from exc


def _decode_issue(data: bytes, exc: UnicodeDecodeError, file: str) -> ConfigIssue:
    line = data.count(b"\n", 0, exc.start) + 1
    return ConfigIssue("", line, f"not valid UTF-8 (byte 0x{data[exc.start]:02x})", file)


# A config file is a few KiB; the bound keeps `ringd check -c /dev/zero` (or a
# runaway generated file) from eating the host's memory.
MAX_CONFIG_BYTES = 4 << 20

_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of the config file at ``path``: a regular file of at most
    MAX_CONFIG_BYTES; anything else raises ConfigError with one clear line."""
    file = os.fsdecode(path)

    def fail(message: str) -> ConfigError:
        return ConfigError([ConfigIssue("", None, message, file)])

    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise fail(f"cannot read config file: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
            raise fail(f"cannot read config file: it is {kind}, not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CONFIG_BYTES:   # the size in stat may lie (/proc) or grow
            chunk = os.read(fd, min(1 << 20, MAX_CONFIG_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_CONFIG_BYTES:
            raise fail(f"cannot read config file: larger than {fmt_size(MAX_CONFIG_BYTES)} "
                       "(is this the right file?)")
        return b"".join(chunks)
    except OSError as exc:
        raise fail(f"cannot read config file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def load(path: str | os.PathLike) -> Config:
    """Read and check the config file at ``path``; raise ConfigError on any problem."""
    file = os.fsdecode(path)
    data = read_file(file)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([_decode_issue(data, exc, file)]) from None
    return loads(text, file)
