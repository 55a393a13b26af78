"""What the numbers in the data files mean: size expressions, config lookups, fused splits.

A size expression is a sum of products of integers and names, `*` and `/`
taken left to right (`/` must divide exactly): `num_attention_heads*head_dim`,
`dim0/3`, `num_attention_heads/num_key_value_heads*head_dim`. A name is a
config key by meaning (`hidden_size` also reads `n_embd`, `d_model`...: the
aliases in `common.json` and the architecture's `config_keys`, nested keys as
`attn_config.kv_n_heads`), else derived (`head_dim` = `hidden_size/
num_attention_heads`), or one of the tensor's own: `dimN` (its shape) and
`band` (rows per band of a split). Expressions are parsed when a file is
loaded, so a typo is an error naming the file, never a wrong split later.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..checkpoint.index import grid

_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)|([*/+]))")
_DIM = re.compile(r"dim(\d+)")


class ExprError(ValueError):
    """A size expression that does not parse."""


class Missing(Exception):
    """A size expression needs a config key that is not there."""


class NoSplit(Exception):
    """A fused tensor cannot be split as its table says (the reason is the message)."""


@dataclass(frozen=True)
class Expr:
    """A parsed size expression: terms added, each a chain of (`*` or `/`, atom)."""

    text: str
    terms: tuple[tuple[tuple[str, int | str], ...], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(a for t in self.terms for _, a in t if isinstance(a, str)))

    def evaluate(self, get: Callable[[str], int]) -> int:
        total = 0
        for term in self.terms:
            value = 1
            for op, atom in term:
                x = atom if isinstance(atom, int) else get(atom)
                if op == "*":
                    value *= x
                elif x == 0 or value % x:
                    raise ValueError(f"{self.text}: {value} is not divisible by {x}")
                else:
                    value //= x
            total += value
        return total


def parse_expr(text: Any) -> Expr:
    """'num_attention_heads*head_dim' -> Expr; anything else is an ExprError."""
    if not isinstance(text, str):
        raise ExprError(f"a size expression is a string, not {type(text).__name__} {text!r}")
    terms: list[tuple[tuple[str, int | str], ...]] = []
    term: list[tuple[str, int | str]] = []
    op: str | None = "*"  # the operator before the next atom; None = an atom was last
    pos, end = 0, len(text.rstrip())
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ExprError(f"size expression {text!r} is not valid")
        pos = m.end()
        if m.group(3):
            if op is not None:
                raise ExprError(f"size expression {text!r} is not valid")
            op = m.group(3)
            if op == "+":
                terms.append(tuple(term))
                term, op = [], "*"
            continue
        if op is None:
            raise ExprError(f"size expression {text!r} is not valid")
        term.append((op, int(m.group(1)) if m.group(1) else m.group(2)))
        op = None
    if op is not None or not term:
        raise ExprError(f"size expression {text!r} is not valid")
    return Expr(text, (*terms, tuple(term)))


ONE = parse_expr("1")


@dataclass(frozen=True)
class Split:
    """How one fused raw tensor splits into families, as views of its matrix `grid`.

    The grid's rows are cut into `groups` equal bands (heads, KV groups,
    experts; "1" = one band). With axis "rows" each band holds `parts` as
    consecutive row ranges, in order (nn.Linear [out, in] stores outputs as
    rows); with axis "cols" each part is a column range of every band (Conv1D
    [in, out] stores outputs as columns; a 1-D bias is a column, so its parts
    are row ranges). A canonical name containing `{E}` gives one family per
    band (per expert), numbered from 0; otherwise a family spans all bands.
    `when` holds config conditions: the first variant of an entry that
    matches the config (or the architecture's defaults) is used.
    """

    parts: tuple[tuple[str, Expr], ...]
    axis: str = "rows"
    groups: Expr = ONE
    when: tuple[tuple[str, Any], ...] = ()
    kind: str = ""

    def describe(self) -> str:
        if self.kind:
            return self.kind
        if self.groups.text == "1":
            return "concat rows" if self.axis == "rows" else "concat cols"
        return f"{self.groups.text} bands of {'rows' if self.axis == 'rows' else 'cols'}"

    def renamed(self, suffix: str) -> Split:
        """The same split with `suffix` after every part's name (a weight's split, for its bias)."""
        return Split(tuple((c + suffix, s) for c, s in self.parts), self.axis, self.groups, self.when, self.kind)


Parts = list[tuple[str, tuple[tuple[int, int], ...] | None, tuple[int, int] | None]]


def lookup(cfg: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    """(found, value) of a config key; `a.b` reads key `b` of the sub-config `a`."""
    if key in cfg:
        return True, cfg[key]
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _positive(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


@dataclass(frozen=True)
class ConfigView:
    """config.json read by meaning: aliases (first present wins), then derived expressions."""

    cfg: Mapping[str, Any]
    aliases: Mapping[str, tuple[str, ...]]
    derived: Mapping[str, Expr]
    defaults: Mapping[str, Any]

    def value(self, key: str) -> Any:
        """A raw config value (a `when` condition's key), else the architecture's default."""
        found, v = lookup(self.cfg, key)
        return v if found else self.defaults.get(key)

    def getter(self, shape: tuple[int, ...] = (), band: int | None = None) -> Callable[[str], int]:
        def get(name: str) -> int:
            if name == "band" and band is not None:
                return band
            m = _DIM.fullmatch(name)
            if m and int(m.group(1)) < len(shape):
                return shape[int(m.group(1))]
            for key in self.aliases.get(name, (name,)):
                found, v = lookup(self.cfg, key)
                if found and _positive(v):
                    return v
            if _positive(self.defaults.get(name)):
                return self.defaults[name]
            if name in self.derived:
                return self.derived[name].evaluate(get)
            raise Missing(name)

        return get

    def size(self, name: str) -> int | None:
        """A positive integer config value by meaning, or None."""
        try:
            return self.getter()(name)
        except (Missing, ValueError):
            return None


def choose(variants: tuple[Split, ...], view: ConfigView) -> Split:
    """The first variant whose `when` conditions the config (or defaults) meet."""
    for v in variants:
        if all(view.value(k) == want for k, want in v.when):
            return v
    raise NoSplit("no variant of the split matches the config")


def split(fused: Split, shape: tuple[int, ...], view: ConfigView) -> tuple[Parts, str]:
    """Resolve a split for a tensor shape: [(family, rows, cols)], and how it was sized."""
    rows, cols = grid(shape)
    axis = fused.axis if len(shape) >= 2 else "rows"
    try:
        groups = fused.groups.evaluate(view.getter(shape))
    except Missing as e:
        raise NoSplit(f"config.json lacks {e.args[0]} (needed for {fused.groups.text})") from None
    except ValueError as e:
        raise NoSplit(str(e)) from None
    if groups <= 0 or rows % groups:
        raise NoSplit(f"{rows} rows do not divide into {groups} bands ({fused.groups.text})")
    band = rows // groups
    along = band if axis == "rows" else cols
    how = "config"
    try:
        get = view.getter(shape, band)
        sizes = [s.evaluate(get) for _, s in fused.parts]
    except Missing as e:
        exprs = {s.text for _, s in fused.parts}
        if len(exprs) != 1 or along % len(fused.parts):
            raise NoSplit(f"config.json lacks {e.args[0]}") from None
        sizes = [along // len(fused.parts)] * len(fused.parts)
        how = f"equal parts (config.json lacks {e.args[0]})"
    except ValueError as e:
        raise NoSplit(str(e)) from None
    if sum(sizes) != along:
        got = " + ".join(f"{s}" for s in sizes)
        raise NoSplit(f"parts {got} = {sum(sizes)} from the config, but the tensor has {along} per band")
    out: Parts = []
    offset = 0
    for (canon, _), size in zip(fused.parts, sizes):
        if size:
            if axis == "rows":
                ranges = [(g * band + offset, g * band + offset + size) for g in range(groups)]
                col = None
            else:
                ranges = [(g * band, (g + 1) * band) for g in range(groups)]
                col = (offset, offset + size)
            if "{E}" in canon:
                out += [(canon.replace("{E}", str(g)), (r,), col) for g, r in enumerate(ranges)]
            elif axis == "cols" and groups == 1:
                out.append((canon, None, col))
            else:
                out.append((canon, tuple(ranges), col))
        offset += size
    return out, how


def describe_split(fused: Split, shape: tuple[int, ...], how: str) -> str:
    axis = fused.axis if len(shape) >= 2 else "rows"
    parts = " | ".join(f"{c} {s.text}" for c, s in fused.parts)
    bands = "" if fused.groups.text == "1" else f"{fused.groups.text} bands x "
    kind = fused.describe() if axis == fused.axis else "concat (1-D, as the weight's outputs)"
    text = f"{kind}: {bands}[{parts}] along {axis}"
    return text if how == "config" else f"{text}; sized as {how}"
