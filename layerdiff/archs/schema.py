"""The data files' format, checked field by field into frozen dataclasses.

A hand-written validator, not pydantic: importing pydantic and defining two
models takes ~0.2 s and ~17 MiB of resident memory here, counted against a
scan's budget, where these plain checks of every table take ~35 ms and 0.6 MiB
(layerdiff/archs/README.md). Every problem is an ArchitectureError naming the file
and the field: `gpt2.json: names."attn.c_attn.weight".split[1]: size
expression 'hidden_size*' is not valid`. Unknown fields are errors, so a typo
(`"bias": false`) never silently does nothing. The format is described in
layerdiff/archs/README.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from ..errors import ArchitectureError
from .sizes import ExprError, Expr, Split, parse_expr

Entry = Union[str, tuple[Split, ...]]  # a canonical family, or split variants (the first matching wins)
ROLES = ("reads", "writes")
KINDS = ("matrix", "norm", "bias", "router", "vector", "embedding")
SCALAR = (str, int, float, bool, type(None))
_IDENT = re.compile(r"[A-Za-z_]\w*")
_BRACES = re.compile(r"\{[^}]*\}")


def field_path(*parts: str | int) -> str:
    """('names', 'attn.c_attn.weight', 'split', 1) -> names."attn.c_attn.weight".split[1]"""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            text = p if _IDENT.fullmatch(p) else '"' + p.replace('"', '\\"') + '"'
            out += ("." if out else "") + text
    return out


class _Checker:
    """Typed reads of one parsed file, raising ArchitectureError(file, 'field: problem')."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: tuple[str | int, ...], problem: str) -> ArchitectureError:
        return ArchitectureError(self.where, f"{field_path(*path)}: {problem}" if path else problem)

    def obj(self, v: Any, path: tuple[str | int, ...], allowed: tuple[str, ...] = (),
            required: tuple[str, ...] = ()) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(path, f"expected an object, not {_kind(v)}")
        if allowed:
            for k in v:
                if k not in allowed:
                    raise self.fail(path + (k,), f"unknown field (known: {', '.join(allowed)})")
        for k in required:
            if k not in v:
                raise self.fail(path + (k,), "is required")
        return v

    def string(self, v: Any, path: tuple[str | int, ...], empty: bool = False) -> str:
        if not isinstance(v, str):
            raise self.fail(path, f"expected a string, not {_kind(v)}")
        if not v and not empty:
            raise self.fail(path, "must not be empty")
        return v

    def array(self, v: Any, path: tuple[str | int, ...], nonempty: bool = False, of: str = "") -> list[Any]:
        if not isinstance(v, list):
            raise self.fail(path, f"expected a list{' of ' + of if of else ''}, not {_kind(v)}")
        if nonempty and not v:
            raise self.fail(path, "must not be empty")
        return v

    def strings(self, v: Any, path: tuple[str | int, ...], nonempty: bool = False) -> tuple[str, ...]:
        return tuple(self.string(x, path + (i,)) for i, x in enumerate(self.array(v, path, nonempty, "strings")))

    def text(self, v: Any, path: tuple[str | int, ...]) -> str:
        """Prose: a string, or a list of strings (paragraphs)."""
        if isinstance(v, list):
            return "\n\n".join(self.strings(v, path))
        return self.string(v, path, empty=True)

    def boolean(self, v: Any, path: tuple[str | int, ...]) -> bool:
        if not isinstance(v, bool):
            raise self.fail(path, f"expected true or false, not {_kind(v)}")
        return v

    def integer(self, v: Any, path: tuple[str | int, ...]) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(path, f"expected an integer, not {_kind(v)}")
        return v

    def expr(self, v: Any, path: tuple[str | int, ...]) -> Expr:
        try:
            return parse_expr(v)
        except ExprError as e:
            raise self.fail(path, str(e)) from None

    def regex(self, v: Any, path: tuple[str | int, ...]) -> str:
        self.string(v, path)
        try:
            re.compile(v)
        except re.error as e:
            raise self.fail(path, f"regular expression {v!r} is not valid: {e}") from None
        return v

    def scalars(self, v: Any, path: tuple[str | int, ...]) -> dict[str, Any]:
        for k, x in self.obj(v, path).items():
            if not isinstance(x, SCALAR):
                raise self.fail(path + (k,), f"expected a string, number, true/false or null, not {_kind(x)}")
        return dict(v)

    def string_map(self, v: Any, path: tuple[str | int, ...]) -> dict[str, str]:
        return {k: self.string(x, path + (k,), empty=True) for k, x in self.obj(v, path).items()}

    def aliases(self, v: Any, path: tuple[str | int, ...]) -> dict[str, tuple[str, ...]]:
        return {k: self.strings(x, path + (k,), nonempty=True) for k, x in self.obj(v, path).items()}


def _kind(v: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
             float: "a number", type(None): "null"}
    return f"{names.get(type(v), type(v).__name__)} ({_short(v)})"


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


# --- architecture files ------------------------------------------------------------------

ARCH_FIELDS = ("name", "about", "model_types", "priority", "extends", "stack", "config", "defaults",
               "config_keys", "biases", "ignore", "transposed", "roles", "names")
SPLIT_FIELDS = ("split", "axis", "groups", "when", "kind", "about")
# What `extends` merges (in order, the file's own last); the rest belongs to one file.
INHERITED = ("names", "defaults", "config_keys", "ignore", "transposed", "roles")


@dataclass(frozen=True)
class ArchFile:
    """One file as written (before `extends`): names with their biases added."""

    name: str
    file: str  # where it was read, as errors name it
    fragment: bool  # `_name.json`: used only through `extends`, never matched
    about: str = ""
    model_types: tuple[str, ...] = ()
    priority: int = 0
    extends: tuple[str, ...] = ()
    stack: str | None = None  # a regex the stack name must match
    config: str | None = None  # the sub-config holding the stack's sizes ("vision_config")
    defaults: Mapping[str, Any] = field(default_factory=dict)
    config_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    ignore: Mapping[str, str] = field(default_factory=dict)
    transposed: tuple[str, ...] = ()
    roles: Mapping[str, str | None] = field(default_factory=dict)
    names: Mapping[str, Entry] = field(default_factory=dict)
    declared: Mapping[str, Entry] = field(default_factory=dict)  # names as written (no added biases)


@dataclass(frozen=True)
class Arch:
    """An architecture family's naming, `extends` resolved: name after `<stack>.<layer>.` -> family."""

    name: str
    file: str
    model_types: tuple[str, ...]
    priority: int
    names: Mapping[str, Entry]
    stack: str | None = None
    config: str | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    config_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    ignore: Mapping[str, str] = field(default_factory=dict)
    transposed: tuple[str, ...] = ()
    roles: Mapping[str, str | None] = field(default_factory=dict)
    about: str = ""
    extends: tuple[str, ...] = ()
    declared: Mapping[str, Entry] = field(default_factory=dict)
    _exact: Mapping[str, Entry] = field(init=False, repr=False, compare=False, default_factory=dict)
    _patterns: tuple[tuple[re.Pattern[str], Entry], ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_exact", {k: v for k, v in self.names.items() if "{E}" not in k})
        object.__setattr__(self, "_patterns", tuple(
            (re.compile("^" + re.escape(k).replace(r"\{E\}", r"(?P<E>\d+)") + "$"), v)
            for k, v in self.names.items() if "{E}" in k
        ))

    def lookup(self, rest: str) -> tuple[Entry, str | None] | None:
        """The entry for a name and the expert number it matched, if any: exact keys, then `{E}` keys."""
        entry = self._exact.get(rest)
        if entry is not None:
            return entry, None
        for pattern, entry in self._patterns:
            m = pattern.match(rest)
            if m:
                return entry, m.group("E")
        return None


def with_biases(names: Mapping[str, Entry]) -> dict[str, Entry]:
    """Add `X.bias` -> `<canonical>.bias` (a family of its own) for every `X.weight`."""
    out = dict(names)
    for key, entry in names.items():
        if not key.endswith(".weight"):
            continue
        bias = key[: -len("weight")] + "bias"
        if bias not in out:
            out[bias] = entry + ".bias" if isinstance(entry, str) else tuple(v.renamed(".bias") for v in entry)
    return out


def arch_file(doc: Any, where: str, stem: str) -> ArchFile:
    c = _Checker(where)
    c.obj(doc, (), ARCH_FIELDS)
    fragment = stem.startswith("_")
    name = c.string(doc.get("name", stem), ("name",))
    if name != stem:
        raise c.fail(("name",), f"{name!r} differs from the file name {stem!r}")
    if fragment:
        for key in ("model_types", "priority", "stack", "config"):
            if key in doc:
                raise c.fail((key,), "a fragment (a file named _*.json) is used only through extends: "
                                     "it has no model_types, priority, stack or config")
    else:
        c.obj(doc, (), required=("model_types", "priority"))
    declared = {k: _entry(c, k, v) for k, v in c.obj(doc.get("names", {}), ("names",)).items()}
    biases = c.boolean(doc.get("biases", True), ("biases",))
    roles = {}
    for fam, role in c.obj(doc.get("roles", {}), ("roles",)).items():
        if role is not None and role not in ROLES:
            raise c.fail(("roles", fam), f"a role is \"reads\", \"writes\" or null, not {_kind(role)}")
        roles[fam] = role
    return ArchFile(
        name=name, file=where, fragment=fragment,
        about=c.text(doc.get("about", ""), ("about",)),
        model_types=c.strings(doc.get("model_types", []), ("model_types",), nonempty=not fragment),
        priority=c.integer(doc.get("priority", 0), ("priority",)),
        extends=c.strings(doc.get("extends", []), ("extends",)),
        stack=c.regex(doc["stack"], ("stack",)) if "stack" in doc else None,
        config=c.string(doc["config"], ("config",)) if "config" in doc else None,
        defaults=c.scalars(doc.get("defaults", {}), ("defaults",)),
        config_keys=c.aliases(doc.get("config_keys", {}), ("config_keys",)),
        ignore=c.string_map(doc.get("ignore", {}), ("ignore",)),
        transposed=c.strings(doc.get("transposed", []), ("transposed",)),
        roles=roles,
        names=with_biases(declared) if biases else declared,
        declared=declared,
    )


def _entry(c: _Checker, key: str, v: Any) -> Entry:
    path: tuple[str | int, ...] = ("names", key)
    if not key:
        raise c.fail(path, "a name must not be empty")
    for brace in _BRACES.findall(key):
        if brace != "{E}":
            raise c.fail(path, f"{brace} is not a placeholder ({{E}}, an expert number, is the only one)")
    if key.count("{E}") > 1:
        raise c.fail(path, "{E} may appear once in a name")
    if isinstance(v, str):
        _canonical(c, v, path, "{E}" in key)
        return v
    if isinstance(v, dict):
        return (_split(c, v, path, "{E}" in key),)
    if isinstance(v, list):
        if not v:
            raise c.fail(path, "a list of split variants must not be empty")
        variants = tuple(_split(c, x, path + (i,), "{E}" in key) for i, x in enumerate(v))
        for i, x in enumerate(variants[:-1]):
            if not x.when:
                raise c.fail(path + (i + 1,), f"is never used: variant {i} before it has no \"when\"")
        return variants
    raise c.fail(path, f"a name maps to a family name (a string), a split (an object) or a list of "
                       f"split variants, not {_kind(v)}")


def _canonical(c: _Checker, v: Any, path: tuple[str | int, ...], expert: bool) -> str:
    c.string(v, path)
    for brace in _BRACES.findall(v):
        if brace != "{E}":
            raise c.fail(path, f"{brace} is not a placeholder ({{E}}, an expert number, is the only one)")
    if "{E}" in v and not expert:
        raise c.fail(path, f"family {v!r} has {{E}} but the name has none to take it from")
    return v


def _split(c: _Checker, v: Any, path: tuple[str | int, ...], expert: bool) -> Split:
    c.obj(v, path, SPLIT_FIELDS, required=("split",))
    out = []
    for i, p in enumerate(c.array(v["split"], path + ("split",), nonempty=True, of="[family, size expression] pairs")):
        where = path + ("split", i)
        if not isinstance(p, list) or len(p) != 2:
            raise c.fail(where, f"expected a pair [family, size expression], not {_kind(p)}")
        name = c.string(p[0], where + (0,))
        for brace in _BRACES.findall(name):
            if brace != "{E}":
                raise c.fail(where + (0,), f"{brace} is not a placeholder ({{E}}, a band number, is the only one)")
        out.append((name, c.expr(p[1], where)))
    axis = v.get("axis", "rows")
    if axis not in ("rows", "cols"):
        raise c.fail(path + ("axis",), f"is \"rows\" or \"cols\", not {_kind(axis)}")
    when = c.scalars(v.get("when", {}), path + ("when",))
    return Split(tuple(out), axis, c.expr(v.get("groups", "1"), path + ("groups",)), tuple(when.items()),
                 c.string(v.get("kind", ""), path + ("kind",), empty=True))


# --- families.json and common.json ------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A canonical family: which side of the residual stream it is on, and what it is."""

    name: str
    role: str | None  # "reads" (its input is the residual stream), "writes" (its output is), None
    kind: str  # one of KINDS
    about: str = ""


def families_file(doc: Any, where: str) -> tuple[str, dict[str, str], dict[str, Family]]:
    """(about, kinds, families) of families.json."""
    c = _Checker(where)
    c.obj(doc, (), ("about", "kinds", "families"), required=("families",))
    kinds = c.string_map(doc.get("kinds", {}), ("kinds",))
    for k in kinds:
        if k not in KINDS:
            raise c.fail(("kinds", k), f"unknown kind (known: {', '.join(KINDS)})")
    out = {}
    for name, f in c.obj(doc["families"], ("families",)).items():
        path = ("families", name)
        c.obj(f, path, ("role", "kind", "about"), required=("role", "kind"))
        if f["role"] is not None and f["role"] not in ROLES:
            raise c.fail(path + ("role",), f"a role is \"reads\", \"writes\" or null, not {_kind(f['role'])}")
        if f["kind"] not in KINDS:
            raise c.fail(path + ("kind",), f"unknown kind {f['kind']!r} (known: {', '.join(KINDS)})")
        out[name] = Family(name, f["role"], f["kind"], c.text(f.get("about", ""), path + ("about",)))
    return c.text(doc.get("about", ""), ("about",)), kinds, out


@dataclass(frozen=True)
class QuantFormat:
    """A storage format that cannot be read: recognised by `marker`, refused with its companions."""

    marker: str  # suffix of one tensor that identifies the format
    companions: tuple[str, ...]  # suffixes (after the base name) of every tensor it owns; "*" = prefix
    name: str
    dtypes: tuple[str, ...] = ()  # the marker's dtype must be one of these (empty: any)


@dataclass(frozen=True)
class MainRule:
    """A stack name (regex) that marks the main stack: the one the seed's JSON keys describe."""

    pattern: str
    why: str


@dataclass(frozen=True)
class Common:
    """What holds for every architecture: common.json."""

    ignore: tuple[tuple[str, str], ...]  # name suffix -> why it is not a weight
    scale_suffixes: tuple[str, ...]  # scales that dequantise the `.weight` beside them
    refused: tuple[QuantFormat, ...]
    config_keys: Mapping[str, tuple[str, ...]]  # meaning -> keys, the first present wins
    derived: Mapping[str, Expr]  # meaning -> expression, when no key is present
    output_heads: tuple[str, ...]
    input_embeddings: tuple[str, ...]
    main_stack: tuple[MainRule, ...]
    about: str = ""


COMMON_FIELDS = ("about", "ignore", "scale_suffixes", "refused", "config_keys", "derived", "output_heads",
                 "input_embeddings", "main_stack")


def common_file(doc: Any, where: str) -> Common:
    c = _Checker(where)
    c.obj(doc, (), COMMON_FIELDS, required=COMMON_FIELDS[1:])
    refused = []
    for i, q in enumerate(c.array(doc["refused"], ("refused",))):
        path = ("refused", i)
        c.obj(q, path, ("marker", "companions", "name", "dtypes"), required=("marker", "companions", "name"))
        refused.append(QuantFormat(c.string(q["marker"], path + ("marker",)),
                                   c.strings(q["companions"], path + ("companions",), nonempty=True),
                                   c.string(q["name"], path + ("name",)),
                                   c.strings(q.get("dtypes", []), path + ("dtypes",))))
    rules = []
    for i, r in enumerate(c.array(doc["main_stack"], ("main_stack",), nonempty=False)):
        c.obj(r, ("main_stack", i), ("stack", "why"), required=("stack", "why"))
        rules.append(MainRule(c.regex(r["stack"], ("main_stack", i, "stack")), c.string(r["why"], ("main_stack", i, "why"))))
    return Common(
        ignore=tuple(c.string_map(doc["ignore"], ("ignore",)).items()),
        scale_suffixes=c.strings(doc["scale_suffixes"], ("scale_suffixes",)),
        refused=tuple(refused),
        config_keys=c.aliases(doc["config_keys"], ("config_keys",)),
        derived={k: c.expr(v, ("derived", k)) for k, v in c.obj(doc["derived"], ("derived",)).items()},
        output_heads=c.strings(doc["output_heads"], ("output_heads",)),
        input_embeddings=c.strings(doc["input_embeddings"], ("input_embeddings",)),
        main_stack=tuple(rules),
        about=c.text(doc.get("about", ""), ("about",)),
    )
