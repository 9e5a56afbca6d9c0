"""Log lines a caller cannot forge: control characters in logged text are escaped, visibly.

A path, header or model name comes from the caller; written raw, a newline in it (`%0a` in a
URL is decoded to one) starts a new line that reads like one the server wrote, and a NUL or a
terminal escape can hide text. `escape_controls` writes every character Python does not call
printable (C0 and C1 controls, DEL, line and paragraph separators, format characters such as a
right-to-left override) as an escape: a newline as the two characters `\\n`, a NUL as `\\x00`.

Imports nothing but the standard library: gunicorn's master loads it through
`webapp.gunicorn_logger`, before the gevent workers monkey-patch (see webapp/gunicorn_conf.py).
"""

from __future__ import annotations

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char.isprintable():
        return char
    short = _SHORT.get(char)
    if short is not None:
        return short
    point = ord(char)
    if point < 0x100:
        return f"\\x{point:02x}"
    if point < 0x10000:
        return f"\\u{point:04x}"
    return f"\\U{point:08x}"


def escape_controls(text: str) -> str:
    """`text` with no character that could break or disguise a log line."""
    if text.isprintable():  # nearly every line: one pass in C, no copy
        return text
    return "".join(map(_escape, text))


def escape_lines(text: str, indent: str = "    ") -> str:
    """`text` kept on its lines (an exception's trace), each escaped and indented: a line that
    starts at the left margin of a log is always the start of a record."""
    return "\n".join(indent + escape_controls(line) for line in text.split("\n"))
