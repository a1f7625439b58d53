"""Untrusted user data -> a validated, frozen :class:`Policy`, or every problem at once.

This is the only place where text from a connection profile becomes values; it is
the pydantic boundary. Nothing raises out of :func:`parse_policy` but
:class:`PolicyError`, which lists each bad key with its value and accepted forms.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple


from .errors import PolicyError
from .model import MATCH_KINDS, PREFIX, App, ExtraRoute, Fwmark, Policy

U32 = 0xFFFFFFFF
MAX_VALUE_SHOWN = 60
MAX_ROUTES = 64
MAX_APPS = 64

_DEC = re.compile(r"(?:0|[1-9][0-9]{0,9})\Z")
_HEX = re.compile(r"0[xX][0-9a-fA-F]{1,8}\Z")
_ADDR_CHARS = re.compile(r"[0-9a-fA-F.:]+\Z")
_BOOL = {"yes": True, "true": True, "1": True, "on": True,
         "no": False, "false": False, "0": False, "off": False}

ACCEPTED = {
    "enable": "yes/no (also true/false, 1/0, on/off)",
    "table": "a number 1-4294967295 except 253, 254, 255 (decimal or 0x hex), or 'auto'",
    "fwmark": "VALUE or VALUE/MASK (decimal or 0x hex, VALUE non-zero and inside MASK), or 'auto'",
    "priority": "a number 1-32765, or 'auto'",
    "match": "a comma list of incoming, source, outgoing",
    "src-valid-mark": "yes/no",
    "rp-filter": "keep, off, strict or loose",
    "family": "ipv4, ipv6 or both",
    "routes": "a comma list of 'PREFIX [via GATEWAY]', e.g. '10.9.0.0/16 via 192.0.2.1'",
    "apps": "a comma list of user:NAME, uid:N, unit:NAME.service (or .slice, .scope), "
            "cgroup:/PATH (from the cgroup2 root)",
}
KEYS = tuple(ACCEPTED)


def show(value: str) -> str:
    """A value as it may be shown in a message: quoted, escaped, shortened."""
    text = value if len(value) <= MAX_VALUE_SHOWN else value[:MAX_VALUE_SHOWN] + "..."
    shown = repr(text)
    if len(value) > MAX_VALUE_SHOWN:
        shown += f" ({len(value)} characters)"
    return shown


def parse_number(text: str) -> int:
    """ASCII decimal or 0x hex only: ``int()`` would take '١٠٠', '1_000' and ' 7'."""
    if _DEC.match(text):
        return int(text, 10)
    if _HEX.match(text):
        return int(text, 16)
    raise ValueError("not a number")


def _in_range(text: str, low: int, high: int) -> int:
    number = parse_number(text)
    if not low <= number <= high:
        raise ValueError("out of range")
    return number


def _is_auto(text: str) -> bool:
    return text.lower() == "auto"


def parse_bool(text: str) -> bool:
    try:
        return _BOOL[text.lower()]
    except KeyError:
        raise ValueError("not a yes/no value") from None


def parse_table(text: str) -> Optional[int]:
    if _is_auto(text):
        return None
    table = _in_range(text, 1, U32)
    if table in (253, 254, 255):
        raise ValueError("reserved table (default, main, local)")
    return table


def parse_priority(text: str) -> Optional[int]:
    return None if _is_auto(text) else _in_range(text, 1, 32765)


def parse_fwmark(text: str) -> Optional[Fwmark]:
    if _is_auto(text):
        return None
    value_text, sep, mask_text = text.partition("/")
    value = _in_range(value_text, 1, U32)
    mask = _in_range(mask_text, 1, U32) if sep else U32
    if value & ~mask:
        raise ValueError("VALUE has bits outside MASK")
    return Fwmark(value, mask)


def parse_match(text: str) -> frozenset:
    items = [item.strip(" ") for item in text.split(",")]
    if not all(item in MATCH_KINDS for item in items):
        raise ValueError("unknown match")
    return frozenset(items)


def parse_choice(text: str, choices: Tuple[str, ...]) -> str:
    if text.lower() not in choices:
        raise ValueError("not one of the choices")
    return text.lower()


def _parse_ip(text: str) -> ipaddress._BaseAddress:
    if not _ADDR_CHARS.match(text):
        raise ValueError("not an address")
    return ipaddress.ip_address(text)


def parse_routes(text: str) -> Tuple[ExtraRoute, ...]:
    if not text.strip(" "):
        return ()
    routes = []
    for item in text.split(","):
        words = item.split(" ")
        words = [w for w in words if w]
        if len(words) not in (1, 3) or (len(words) == 3 and words[1] != "via"):
            raise ValueError("not 'PREFIX [via GATEWAY]'")
        prefix_text = words[0]
        address_text, _, length_text = prefix_text.partition("/")
        address = _parse_ip(address_text)
        length = parse_number(length_text) if length_text else address.max_prefixlen
        network = ipaddress.ip_network(f"{address}/{length}", strict=True)
        via = None
        if len(words) == 3:
            gateway = _parse_ip(words[2])
            if gateway.version != network.version:
                raise ValueError("gateway family differs from the prefix")
            via = str(gateway)
        routes.append(ExtraRoute(str(network), via))
    if len(routes) > MAX_ROUTES:
        raise ValueError("too many routes")
    return tuple(routes)


_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?\Z")
_UNIT = re.compile(r"[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]+)?\.(service|slice|scope)\Z")
_CGROUP_PART = re.compile(r"[A-Za-z0-9_.:@\\-]{1,255}\Z")


def _app(item: str) -> App:
    kind, sep, value = item.partition(":")
    if not sep or not value:
        raise ValueError(f"{show(item)} is not KIND:VALUE")
    if kind == "user":
        if not _USER.match(value):
            raise ValueError(f"{show(value)} is not a user name")
        import pwd

        try:
            return App("uid", str(pwd.getpwnam(value).pw_uid), value)
        except KeyError:
            raise ValueError(f"unknown user {show(value)}") from None
    if kind == "uid":
        if not _DEC.match(value) or int(value) >= U32:
            raise ValueError(f"{show(value)} is not a uid (0-4294967294)")
        return App("uid", str(int(value)))
    if kind == "unit":
        if len(value) > 255 or not _UNIT.match(value):
            raise ValueError(f"{show(value)} is not a unit name ending in .service, .slice or .scope")
        return App("unit", value)
    if kind == "cgroup":
        parts = value.strip("/").split("/")
        if not value.startswith("/") or len(value) > 4096 or value.strip("/") == "" \
                or any(p in (".", "..") or not _CGROUP_PART.match(p) for p in parts):
            raise ValueError(f"{show(value)} is not a cgroup path like /system.slice/backup.service")
        return App("cgroup", "/" + "/".join(parts))
    raise ValueError(f"unknown kind {show(kind)} (user, uid, unit, cgroup)")


def parse_apps(text: str) -> Tuple[App, ...]:
    if not text.strip(" "):
        return ()
    apps: List[App] = []
    for item in text.split(","):
        app = _app(item.strip(" "))
        if app not in apps:
            apps.append(app)
    if len(apps) > MAX_APPS:
        raise ValueError("too many entries")
    return tuple(apps)


#: field -> the parser that turns its text into a value (or raises ValueError)
PARSERS = {
    "enable": parse_bool,
    "table": parse_table,
    "fwmark": parse_fwmark,
    "priority": parse_priority,
    "match": parse_match,
    "src_valid_mark": parse_bool,
    "rp_filter": lambda v: parse_choice(v, ("keep", "off", "strict", "loose")),
    "family": lambda v: parse_choice(v, ("ipv4", "ipv6", "both")),
    "routes": parse_routes,
    "apps": parse_apps,
}


@functools.lru_cache(maxsize=1)
def _input_model():
    """The pydantic model, built on first use: importing pydantic costs ~100 ms, and the
    dispatcher hook's common paths (a remembered policy, a removal) never need it."""
    from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

    class _PolicyInput(BaseModel):
        """Raw text per key; each validator turns one key into a value or a ValueError."""

        model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

        enable: bool = False
        table: Optional[int] = None
        fwmark: Optional[Any] = None
        priority: Optional[int] = None
        match: Any = frozenset({"incoming"})
        src_valid_mark: bool = Field(True, alias="src-valid-mark")
        rp_filter: str = Field("keep", alias="rp-filter")
        family: str = "both"
        routes: Any = ()
        apps: Any = ()

        @field_validator("*", mode="before")
        @classmethod
        def _parse(cls, v: str, info: ValidationInfo) -> Any:
            return PARSERS[info.field_name](v)

    return _PolicyInput


_FIELD_TO_KEY = {"src_valid_mark": "src-valid-mark", "rp_filter": "rp-filter"}


def policy_keys(user_data: Mapping[str, str]) -> Tuple[Dict[str, str], List[str]]:
    """Our keys (prefix stripped) and problems with keys that look like ours but are not."""
    ours: Dict[str, str] = {}
    problems: List[str] = []
    for key, value in user_data.items():
        if key.startswith(PREFIX):
            name = key[len(PREFIX):]
            if name in ACCEPTED:
                ours[name] = value
                continue
            if name.lower() in ACCEPTED:
                problems.append(
                    f"key {show(key)} (value {show(value)}) differs from ours only in case: "
                    f"keys are lowercase, '{PREFIX}{name.lower()}'.")
                continue
            import difflib

            guess = difflib.get_close_matches(name.lower(), KEYS, n=1, cutoff=0.6)
            hint = f"; did you mean '{PREFIX}{guess[0]}'?" if guess else ""
            problems.append(
                f"unknown key {show(key)} (value {show(value)}){hint} "
                f"Known keys: {', '.join(PREFIX + k for k in KEYS)}."
            )
        elif key.lower().startswith(PREFIX):
            problems.append(
                f"key {show(key)} (value {show(value)}) differs from ours only in case: "
                f"keys are lowercase, e.g. '{PREFIX}{key[len(PREFIX):].lower()}'."
            )
    return ours, problems


def parse_policy(
    user_data: Mapping[str, str],
    connection: str = "?",
    defaults: Optional[Mapping[str, str]] = None,
) -> Policy:
    """Validate a connection's user data (over ``defaults``) into a :class:`Policy`.

    Raises :class:`PolicyError` listing every problem, each with key, value and the
    accepted forms. ``defaults`` holds keys without prefix, already trusted text.
    """
    ours, problems = policy_keys(user_data)
    merged = dict(defaults or {})
    merged.update(ours)
    from pydantic import ValidationError

    try:
        raw = _input_model().model_validate(merged)
    except ValidationError as exc:
        for err in exc.errors():
            name = str(err["loc"][0]) if err.get("loc") else "?"
            key = _FIELD_TO_KEY.get(name, name)
            value = merged.get(key, "")
            why = _reason(err)
            problems.append(
                f"{PREFIX}{key}={show(str(value))}: {why}; accepted: {ACCEPTED.get(key, '?')}."
            )
        raw = None
    if problems:
        raise PolicyError(connection, problems)
    assert raw is not None
    policy = Policy(
        enable=raw.enable,
        table=raw.table,
        fwmark=raw.fwmark,
        priority=raw.priority,
        match=raw.match,
        src_valid_mark=raw.src_valid_mark,
        rp_filter=raw.rp_filter,
        family=raw.family,
        routes=raw.routes,
        apps=raw.apps,
    )
    return policy


def _reason(err: Mapping[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, ValueError) and inner.args:
        return str(inner.args[0])
    if err.get("type", "").endswith("_type"):
        return "not text"
    return str(err.get("msg", "invalid"))
