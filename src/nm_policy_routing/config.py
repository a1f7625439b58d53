"""Global defaults: the same keys as a profile's, for every connection, by type or interface.

The file (``/etc/nm-policy-routing/defaults.conf``, or ``NM_POLICY_ROUTING_DEFAULTS``)
is INI; later, more specific sections win, and a profile's own keys win over all::

    [defaults]                 # every connection
    enable = yes
    match = incoming,outgoing

    [type:802-11-wireless]     # NetworkManager's connection.type
    rp-filter = loose

    [interface:wwan*]          # shell pattern on the interface name
    enable = no

Keys may carry the ``nm-policy-routing.`` prefix or not. Pure parsing here; the
file is read by :func:`load`.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from .errors import PolicyError
from .model import PREFIX, Connection, dataclass, field
from .policy import KEYS, policy_keys

DEFAULT_PATH = "/etc/nm-policy-routing/defaults.conf"


def path(override: Optional[str] = None) -> str:
    return override or os.environ.get("NM_POLICY_ROUTING_DEFAULTS") or DEFAULT_PATH


@dataclass(frozen=True)
class Section:
    name: str
    kind: str  # "defaults", "type", "interface"
    pattern: str
    values: Tuple[Tuple[str, str], ...]

    def applies(self, conn: Connection) -> bool:
        if self.kind == "defaults":
            return True
        if self.kind == "type":
            return conn.type == self.pattern
        import fnmatch

        return fnmatch.fnmatchcase(conn.iface or "", self.pattern)


@dataclass(frozen=True)
class Defaults:
    """Parsed defaults; :meth:`for_connection` gives the keys (no prefix) with their source."""

    source: str = ""
    sections: Tuple[Section, ...] = ()
    problems: Tuple[str, ...] = field(default=())

    def with_sources(self, conn: Connection) -> Dict[str, Tuple[str, str]]:
        out: Dict[str, Tuple[str, str]] = {}
        order = {"defaults": 0, "type": 1, "interface": 2}
        for section in sorted(self.sections, key=lambda s: order[s.kind]):
            if section.applies(conn):
                for key, value in section.values:
                    out[key] = (value, f"{self.source} [{section.name}]")
        return out

    def for_connection(self, conn: Connection) -> Dict[str, str]:
        return {k: v for k, (v, _) in self.with_sources(conn).items()}


def parse(text: str, source: str = DEFAULT_PATH) -> Defaults:
    """Parse the defaults file; problems (bad sections, unknown keys, bad values) are collected."""
    import configparser  # only when there is a file: the hook reads it at every event

    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",), comment_prefixes=("#", ";"),
                                       inline_comment_prefixes=("#",), strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # keys are case-sensitive, as in profiles
    problems: List[str] = []
    try:
        parser.read_string(text, source=source)
    except configparser.Error as exc:
        return Defaults(source, (), (f"{source}: cannot parse: {exc}".replace("\n", " "),))
    sections = []
    for name in parser.sections():
        kind, _, pattern = name.partition(":")
        if name == "defaults":
            kind, pattern = "defaults", "*"
        elif kind not in ("type", "interface") or not pattern:
            problems.append(f"{source}: unknown section [{name}]; use [defaults], [type:TYPE] or "
                            "[interface:PATTERN]")
            continue
        raw = {k if k.startswith(PREFIX) else PREFIX + k: v for k, v in parser.items(name)}
        ours, key_problems = policy_keys(raw)
        problems += [f"{source} [{name}]: {p}" for p in key_problems]
        sections.append(Section(name, kind, pattern, tuple(sorted(ours.items()))))
    defaults = Defaults(source, tuple(sections), tuple(problems))
    return _validated(defaults)


def _validated(defaults: Defaults) -> Defaults:
    """Each section's values must form a valid policy on their own (over the built-ins)."""
    from .policy import parse_policy

    problems = list(defaults.problems)
    for section in defaults.sections:
        try:
            parse_policy({PREFIX + k: v for k, v in section.values}, f"{defaults.source} [{section.name}]")
        except PolicyError as exc:
            problems += [f"{defaults.source} [{section.name}]: {p}" for p in exc.problems]
    return Defaults(defaults.source, defaults.sections, tuple(problems))


def load(override: Optional[str] = None) -> Defaults:
    """Read the defaults file; a missing file means no defaults."""
    where = path(override)
    try:
        with open(where, encoding="utf-8") as handle:
            return parse(handle.read(), where)
    except FileNotFoundError:
        return Defaults(where)
    except (OSError, UnicodeDecodeError) as exc:
        return Defaults(where, (), (f"{where}: cannot read: {exc}",))


__all__ = ["Defaults", "KEYS", "load", "parse", "path"]
