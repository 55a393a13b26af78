"""Sizes and layer ranges as people type them: '256M', '1.5G', '4:12'."""

from __future__ import annotations

import re

from .errors import SelectionError

_SIZE = re.compile(r"^\s*(\d{1,15}(?:\.\d{1,9})?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_LAYERS = re.compile(r"\s*(\d{0,9})\s*:\s*(\d{0,9})\s*")


def parse_size(text: str) -> int:
    """'256M', '1.5G', '300MiB', '1000000' -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise SelectionError("max_memory", f"{text[:40]!r} is not a size like 256M or 2G")
    power = " KMGT".index((m.group(2) or " ").upper())
    return int(float(m.group(1)) * 1024**power)


def parse_layers(text: str) -> tuple[int, int]:
    """'4:12' -> (4, 12): layers 4..11; either end may be left out."""
    m = _LAYERS.fullmatch(text)
    if not m:
        raise SelectionError("layers", f"{text[:40]!r} is not a layer range like 4:12")
    a, b = int(m.group(1) or 0), int(m.group(2) or 1 << 30)
    if b <= a:
        raise SelectionError("layers", f"{text!r} selects no layers")
    return a, b
