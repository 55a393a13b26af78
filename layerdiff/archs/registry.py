"""Every architecture data file, read once: `extends` resolved, sorted by priority.

The package's own files are in `layerdiff/archs/data/`. More directories can
be added without touching code: `load(extra=[dir, ...])`, or the environment
variable LAYERDIFF_ARCH_PATH (directories separated by os.pathsep). Extra
directories are searched first, so a file there also replaces a packaged file
of the same name. Each directory holds architecture files (`<name>.json`),
fragments (`_<name>.json`, used only through `extends`) and optionally a
`families.json` adding canonical families; `common.json` (what holds for
every architecture) is the package's only.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import ArchitectureError
from .schema import Arch, ArchFile, Common, Family, arch_file, common_file, families_file, field_path
from .sizes import ConfigView

DATA = Path(__file__).resolve().parent / "data"
_ROOT = DATA.parent.parent.parent  # errors name packaged files from here: layerdiff/archs/data/x.json
ENV = "LAYERDIFF_ARCH_PATH"
FAMILIES, COMMON = "families", "common"
# `experts.3.down_proj` and `experts.down_proj` (all experts) are `down_proj` as far as roles go.
_EXPERT = re.compile(r"^(?:.*\.)?experts\.(?:\d+\.|\{E\}\.)?(?P<base>.+)$")


def is_bias(name: str) -> bool:
    """A bias family (`*.bias`): its scale follows another schedule than the weights'."""
    return name.endswith(".bias")


@dataclass(frozen=True)
class Registry:
    """The loaded tables: matchable architectures in priority order, fragments, families, common data."""

    archs: tuple[Arch, ...]  # higher priority first, ties by name
    fragments: Mapping[str, Arch]
    families: Mapping[str, Family]
    kinds: Mapping[str, str]  # kind -> what it means
    families_about: str
    common: Common
    directories: tuple[str, ...]  # where files were read, first searched first

    def get(self, name: str) -> Arch:
        for a in self.archs:
            if a.name == name:
                return a
        return self.fragments[name]

    def family(self, name: str, arch: Arch | None = None) -> Family | None:
        """What a canonical family is: declared, the table's own role, a bias, or an expert's base family."""
        declared = self.families.get(name)
        if arch is not None and name in arch.roles:
            return Family(name, arch.roles[name], declared.kind if declared else "matrix",
                          declared.about if declared else "")
        if declared is not None:
            return declared
        if is_bias(name):
            return Family(name, None, "bias")
        m = _EXPERT.match(name)
        if m:
            base = self.family(m.group("base"), arch)
            return Family(name, base.role, base.kind, base.about) if base else None
        return None

    def role(self, name: str, arch: Arch | None = None) -> str | None:
        """"reads" or "writes" the residual stream, or None (norms, biases, unknown names)."""
        f = self.family(name, arch)
        return f.role if f else None

    def view(self, cfg: Mapping[str, Any], arch: Arch | None) -> ConfigView:
        """config.json as the architecture reads it: its own key aliases first, then the common ones."""
        common = self.common.config_keys
        own = arch.config_keys if arch else {}
        aliases = {k: tuple(dict.fromkeys(own.get(k, ()) + common.get(k, (k,)))) for k in {*common, *own}}
        return ConfigView(cfg, aliases, self.common.derived, arch.defaults if arch else {})


_CACHE: dict[tuple[str, ...], Registry] = {}


def directories(extra: Iterable[str | os.PathLike[str]] = (), env: bool = True) -> tuple[Path, ...]:
    """Where tables are read, first searched first: `extra`, then LAYERDIFF_ARCH_PATH, then the package."""
    dirs = [Path(d) for d in extra]
    if env:
        dirs += [Path(d) for d in os.environ.get(ENV, "").split(os.pathsep) if d.strip()]
    return (*dict.fromkeys(d.resolve() for d in dirs), DATA)


def load(extra: Iterable[str | os.PathLike[str]] = (), env: bool = True) -> Registry:
    """The tables of the package and of `extra` directories (and LAYERDIFF_ARCH_PATH's), cached."""
    dirs = directories(extra, env)
    key = tuple(str(d) for d in dirs)
    hit = _CACHE.get(key)
    if hit is None:
        hit = _CACHE[key] = _load(dirs)
    return hit


def _where(path: Path) -> str:
    """How errors name a file: the package's relative to its root, others as they are."""
    try:
        return str(path.relative_to(_ROOT))
    except ValueError:
        return str(path)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice in one object")
        out[k] = v
    return out


def read_json(path: Path) -> Any:
    where = _where(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except OSError as e:
        raise ArchitectureError(where, f"cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ArchitectureError(where, "is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ArchitectureError(where, f"is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}") from None
    except ValueError as e:
        raise ArchitectureError(where, f"is not valid JSON: {e}") from None


def _load(dirs: tuple[Path, ...]) -> Registry:
    files: dict[str, ArchFile] = {}
    families: dict[str, Family] = {}
    kinds: dict[str, str] = {}
    about = ""
    common: Common | None = None
    for d in reversed(dirs):  # the package first, so that earlier directories replace what it has
        if not d.is_dir():
            raise ArchitectureError(str(d), f"is not a directory (from {ENV} or load(extra=...))")
        for path in sorted(d.glob("*.json")):
            stem = path.stem
            if stem == COMMON:
                if d != DATA:
                    raise ArchitectureError(_where(path), "common.json is read from the package only")
                common = common_file(read_json(path), _where(path))
            elif stem == FAMILIES:
                text, more_kinds, more = families_file(read_json(path), _where(path))
                about, kinds, families = about or text, {**kinds, **more_kinds}, {**families, **more}
            else:
                files[stem] = arch_file(read_json(path), _where(path), stem)
    if common is None:
        raise ArchitectureError(str(DATA / "common.json"), "is missing from the package")
    resolved = _resolve(files)
    archs = sorted((a for n, a in resolved.items() if not files[n].fragment), key=lambda a: (-a.priority, a.name))
    fragments = {n: a for n, a in resolved.items() if files[n].fragment}
    return Registry(tuple(archs), fragments, families, kinds, about, common, tuple(str(d) for d in dirs))


def _resolve(files: dict[str, ArchFile]) -> dict[str, Arch]:
    """Each file with what it extends merged in (in order, its own entries last)."""
    done: dict[str, Arch] = {}

    def visit(name: str, chain: tuple[str, ...]) -> Arch:
        if name in done:
            return done[name]
        f = files[name]
        names: dict[str, Any] = {}
        defaults: dict[str, Any] = {}
        config_keys: dict[str, tuple[str, ...]] = {}
        ignore: dict[str, str] = {}
        transposed: dict[str, None] = {}
        roles: dict[str, str | None] = {}
        for i, parent in enumerate(f.extends):
            if parent in chain or parent == name:
                cycle = " -> ".join(chain[chain.index(parent):] + (name, parent)) if parent in chain else f"{name} -> {name}"
                raise ArchitectureError(f.file, f"{field_path('extends', i)}: cycle {cycle}")
            if parent not in files:
                raise ArchitectureError(f.file, f"{field_path('extends', i)}: no architecture or fragment "
                                                f"{parent!r} (known: {', '.join(sorted(files))})")
            p = visit(parent, chain + (name,))
            names.update(p.names)
            defaults.update(p.defaults)
            config_keys.update(p.config_keys)
            ignore.update(p.ignore)
            transposed.update(dict.fromkeys(p.transposed))
            roles.update(p.roles)
        names.update(f.names)
        for i, t in enumerate(f.transposed):
            if t not in names:
                raise ArchitectureError(f.file, f"{field_path('transposed', i)}: {t!r} is not one of the names")
        arch = Arch(
            name=f.name, file=f.file, model_types=f.model_types, priority=f.priority, names=names,
            stack=f.stack, config=f.config, defaults={**defaults, **f.defaults},
            config_keys={**config_keys, **f.config_keys}, ignore={**ignore, **f.ignore},
            transposed=tuple({**transposed, **dict.fromkeys(f.transposed)}), roles={**roles, **f.roles},
            about=f.about, extends=f.extends, declared=f.declared,
        )
        done[name] = arch
        return arch

    for name in files:
        visit(name, ())
    return done
