"""Problems found in a config file, and the key paths that say where they are.

A key path is a tuple such as ("upstream", "app", "servers", 1): strings for
keys, integers for array elements. Messages write it the TOML way
(``upstream.app.servers[1]``); the line scanner maps it to a line.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

Path = tuple[str | int, ...]

BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file."""

    path: str  # key path, e.g. "listener[1].listen"; "" for file-level problems
    line: int | None  # 1-based line of the key (or its table); None if unknown
    message: str
    file: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.path:
            return f"{where}: {self.path}: {self.message}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """A config file was rejected; ``errors`` holds every issue found (at least one)."""

    errors: list[ConfigIssue]

    def __init__(self, errors: list[ConfigIssue]) -> None:
        if not errors:
            raise ValueError("ConfigError needs at least one issue")
        self.errors = list(errors)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.errors)


def format_path(path: Path) -> str:
    """("upstream", "app", "servers", 1) -> 'upstream.app.servers[1]'."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        else:
            key = part if BARE_KEY_RE.fullmatch(part) else quote(part)
            out.append(f".{key}" if out else key)
    return "".join(out)


def quote(text: str, limit: int = 80) -> str:
    """A string as it would be written in TOML, shortened for messages."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return json.dumps(text, ensure_ascii=False)


def find_line(lines: Any, path: Path) -> int | None:
    """The line of ``path``, or of its nearest prefix that has one."""
    for n in range(len(path), 0, -1):
        line = lines.get(path[:n])
        if line is not None:
            return line
    return None
