"""Key paths -> line numbers: a small scanner over the raw TOML text.

``tomllib`` reports no positions for keys, so this scanner walks the text
once and maps key paths to the line each key, table or array element starts
on. It only has to understand TOML that ``tomllib`` already accepted, and if
it ever gets lost the cost is a missing line number, never a failed load.
Hand-written on purpose: no library packaged for Debian gives key positions.
"""
from __future__ import annotations

import bisect
import tomllib

from .issues import BARE_KEY_RE, Path, find_line


class _ScanStop(Exception):
    pass


class LineScanner:
    """Map key paths to the 1-based line where each key, table or element starts.

    Paths use the same tuples as the checker: ("listener", 1, "listen") for the key
    in the second [[listener]], ("upstream", "app", "servers", 0) for the first array
    element. Prefixes get the line where they first appear, so a missing key can be
    reported on its table's line.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lines: dict[Path, int] = {}
        self._newlines = [i for i, ch in enumerate(text) if ch == "\n"]
        self._aot_count: dict[Path, int] = {}  # array-of-tables path -> elements seen

    def scan(self) -> dict[Path, int]:
        try:
            self._document()
        except (_ScanStop, IndexError, ValueError, RecursionError):
            pass  # keep what was found; the rest simply has no line numbers
        return self.lines

    def find(self, path: Path) -> int | None:
        return find_line(self.lines, path)

    # -- low level

    def _line(self) -> int:
        return bisect.bisect_left(self._newlines, self.pos) + 1

    def _peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def _skip_space(self, newlines: bool) -> None:
        text, n = self.text, len(self.text)
        while self.pos < n:
            ch = text[self.pos]
            if ch in " \t" or (newlines and ch in "\r\n"):
                self.pos += 1
            elif ch == "#":
                end = text.find("\n", self.pos)
                self.pos = n if end < 0 else end
            else:
                break

    def _expect(self, s: str) -> None:
        if not self._peek(s):
            raise _ScanStop
        self.pos += len(s)

    def _record(self, path: Path, line: int) -> None:
        for n in range(1, len(path)):
            self.lines.setdefault(path[:n], line)
        self.lines.setdefault(path, line)

    # -- keys

    def _key(self) -> tuple[str, ...]:
        parts: list[str] = []
        while True:
            self._skip_space(newlines=False)
            start = self.pos
            if self._peek('"'):
                self._basic_string()
                raw = self.text[start : self.pos]
                try:
                    parts.append(tomllib.loads(f"k = {raw}")["k"])
                except tomllib.TOMLDecodeError:
                    parts.append(raw[1:-1])
            elif self._peek("'"):
                self._literal_string()
                parts.append(self.text[start + 1 : self.pos - 1])
            else:
                match = BARE_KEY_RE.match(self.text, self.pos)
                if not match:
                    raise _ScanStop
                parts.append(match.group())
                self.pos = match.end()
            self._skip_space(newlines=False)
            if not self._peek("."):
                return tuple(parts)
            self.pos += 1

    def _resolve(self, keys: tuple[str, ...]) -> Path:
        """Header keys -> path, inserting the current index of enclosing [[arrays]]."""
        path: Path = ()
        for key in keys:
            path = path + (key,)
            count = self._aot_count.get(path)
            if count:
                path = path + (count - 1,)
        return path

    # -- statements

    def _document(self) -> None:
        table: Path = ()
        while True:
            self._skip_space(newlines=True)
            if self.pos >= len(self.text):
                return
            line = self._line()
            if self._peek("[["):
                self.pos += 2
                keys = self._key()
                self._expect("]]")
                array = self._resolve(keys[:-1]) + (keys[-1],)
                index = self._aot_count.get(array, 0)
                self._aot_count[array] = index + 1
                table = array + (index,)
                self._record(table, line)
            elif self._peek("["):
                self.pos += 1
                keys = self._key()
                self._expect("]")
                table = self._resolve(keys)
                self.lines[table] = line  # an explicit header beats an earlier implicit mention
                self._record(table, line)
            else:
                keys = self._key()
                self._expect("=")
                path = table + keys
                self._record(path, line)
                self._skip_space(newlines=False)
                self._value(path)
            self._skip_space(newlines=False)

    def _value(self, path: Path) -> None:
        if self._peek('"""'):
            self._multiline('"""', escapes=True)
        elif self._peek("'''"):
            self._multiline("'''", escapes=False)
        elif self._peek('"'):
            self._basic_string()
        elif self._peek("'"):
            self._literal_string()
        elif self._peek("["):
            self._array(path)
        elif self._peek("{"):
            self._inline_table(path)
        else:
            start = self.pos
            text, n = self.text, len(self.text)
            while self.pos < n and text[self.pos] not in ",]}#\r\n":
                self.pos += 1
            if self.pos == start:
                raise _ScanStop

    def _array(self, path: Path) -> None:
        self.pos += 1
        index = 0
        while True:
            self._skip_space(newlines=True)
            if self._peek("]"):
                self.pos += 1
                return
            self._record(path + (index,), self._line())
            self._value(path + (index,))
            index += 1
            self._skip_space(newlines=True)
            if self._peek(","):
                self.pos += 1
            elif not self._peek("]"):
                raise _ScanStop

    def _inline_table(self, path: Path) -> None:
        self.pos += 1
        while True:
            self._skip_space(newlines=True)
            if self._peek("}"):
                self.pos += 1
                return
            line = self._line()
            keys = self._key()
            self._expect("=")
            self._record(path + keys, line)
            self._skip_space(newlines=False)
            self._value(path + keys)
            self._skip_space(newlines=True)
            if self._peek(","):
                self.pos += 1
            elif not self._peek("}"):
                raise _ScanStop

    # -- strings

    def _basic_string(self) -> None:
        text, n = self.text, len(self.text)
        self.pos += 1
        while self.pos < n:
            ch = text[self.pos]
            if ch == "\\":
                self.pos += 2
            elif ch == '"':
                self.pos += 1
                return
            elif ch == "\n":
                raise _ScanStop
            else:
                self.pos += 1
        raise _ScanStop

    def _literal_string(self) -> None:
        end = self.text.find("'", self.pos + 1)
        if end < 0:
            raise _ScanStop
        self.pos = end + 1

    def _multiline(self, quote: str, *, escapes: bool) -> None:
        text, n = self.text, len(self.text)
        self.pos += 3
        while self.pos < n:
            if escapes and text[self.pos] == "\\":
                self.pos += 2
            elif text.startswith(quote, self.pos):
                self.pos += 3
                # Up to two more quote characters belong to the string's content.
                for _ in range(2):
                    if self._peek(quote[0]):
                        self.pos += 1
                return
            else:
                self.pos += 1
        raise _ScanStop
