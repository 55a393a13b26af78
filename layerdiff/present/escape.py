"""Text for a terminal from names a file chose: control characters escaped.

A tensor name, a path or a hostile JSON value may hold a newline (a forged
line of output), an ESC (a terminal control sequence) or a bidirectional
override; printed, each becomes its Python escape (`\\n`, `\\x1b`, `\\u202e`).
"""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` with every non-printable character (but the space) as its escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def lines(out: list[str]) -> str:
    """Lines of text output joined, each escaped: a line stays one line."""
    return "\n".join(printable(line) for line in out)
