"""Plain frozen data shared by the core: connection facts, policies, kernel entries.

Kernel entries are canonical and hashable so that a diff is set arithmetic.
Nothing here does I/O or imports an adapter. The classes are plain data classes, made by
the local :func:`dataclass` (the standard module's behaviour, cheaper to import: the
dispatcher hook imports this module at every event).
"""

from __future__ import annotations

import functools
import ipaddress
from operator import attrgetter
from typing import Any, Callable, Container, FrozenSet, Iterable, Mapping, Optional, Tuple


class FrozenInstanceError(AttributeError):
    """An attempt to change a field of a frozen data class."""


class _Field:
    """A field's default made per instance (``default_factory``) or left out of ``repr``."""

    def __init__(self, default: Any, default_factory: Optional[Callable[[], Any]], repr: bool) -> None:
        self.default, self.default_factory, self.repr = default, default_factory, repr


_NO_DEFAULT = object()


def field(*, default: Any = _NO_DEFAULT, default_factory: Optional[Callable[[], Any]] = None,
          repr: bool = True) -> Any:
    """As ``dataclasses.field``: a default, a default made per instance, or kept out of ``repr``."""
    return _Field(default, default_factory, repr)


def dataclass(cls=None, *, frozen: bool = False, order: bool = False):
    """As ``@dataclasses.dataclass([frozen=True][, order=True])`` for the classes of the core: the
    fields are the class's annotations in order with their defaults (or :func:`field`); it gets
    ``__init__`` (by position or keyword, then ``__post_init__`` if the class has one), ``==``
    and ``repr`` by the fields' values as a tuple, with ``frozen`` immutability and ``hash``,
    with ``order`` the comparisons; :func:`replace` copies with changes. Not the standard module:
    on Python 3.11 it compiles every generated method on its own (~110 here: ~10 ms) and imports
    ``inspect`` (~6 ms), both at every dispatcher event; these methods are closures."""
    if cls is None:
        return functools.partial(dataclass, frozen=frozen, order=order)
    names = tuple(name for name, kind in cls.__annotations__.items() if not str(kind).startswith("ClassVar"))
    defaults, factories, in_repr = {}, {}, []
    for name in names:
        spec = cls.__dict__.get(name, _NO_DEFAULT)
        spec = spec if isinstance(spec, _Field) else _Field(spec, None, True)
        if spec.default_factory is not None:
            factories[name] = spec.default_factory
        if spec.default is not _NO_DEFAULT:
            defaults[name] = spec.default
            setattr(cls, name, spec.default)  # a default reads as a class attribute, as with dataclasses
        elif name in cls.__dict__:
            delattr(cls, name)
        if spec.repr:
            in_repr.append(name)
    values = attrgetter(*names) if len(names) > 1 else (lambda obj, get=attrgetter(*names): (get(obj),))
    post_init = getattr(cls, "__post_init__", None)
    count, required = len(names), [name for name in names if name not in defaults and name not in factories]
    #: every field in order, with its default (a factory's or a required field's: filled per call)
    template = {name: defaults.get(name, _NO_DEFAULT) for name in names}

    def __init__(self, *args, **kwargs) -> None:
        if len(args) == count and not kwargs:  # every field by position
            fields = dict(zip(names, args))
        else:
            fields = template.copy()
            fields.update(zip(names, args))
            if kwargs:
                fields.update(kwargs)
            if len(fields) != count or len(args) > count or not kwargs.keys().isdisjoint(names[:len(args)]):
                raise TypeError(f"{cls.__name__}() takes the fields {', '.join(names)}, once each: not "
                                f"{len(args)} by position and {', '.join(kwargs) or 'none'} by name")
            for name, make in factories.items():
                if name not in kwargs and names.index(name) >= len(args):
                    fields[name] = make()
            if len(args) < len(required):
                for name in required:
                    if fields[name] is _NO_DEFAULT:
                        raise TypeError(f"{cls.__name__}() missing argument {name!r}")
        object.__setattr__(self, "__dict__", fields)
        if post_init is not None:
            post_init(self)

    def frozen_field(self, name, *value) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __eq__(self, other):
        return values(self) == values(other) if other.__class__ is self.__class__ else NotImplemented

    def __lt__(self, other):
        return values(self) < values(other) if other.__class__ is self.__class__ else NotImplemented

    def __le__(self, other):
        return values(self) <= values(other) if other.__class__ is self.__class__ else NotImplemented

    def __gt__(self, other):
        return values(self) > values(other) if other.__class__ is self.__class__ else NotImplemented

    def __ge__(self, other):
        return values(self) >= values(other) if other.__class__ is self.__class__ else NotImplemented

    def __hash__(self) -> int:
        return hash(values(self))

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}({', '.join(f'{n}={getattr(self, n)!r}' for n in in_repr)})"

    methods = {"__init__": __init__, "__eq__": __eq__, "__repr__": __repr__}
    if frozen:
        methods.update(__setattr__=frozen_field, __delattr__=frozen_field, __hash__=__hash__)
    if order:
        methods.update(__lt__=__lt__, __le__=__le__, __gt__=__gt__, __ge__=__ge__)
    for name, method in methods.items():
        if name not in cls.__dict__:  # a method the class writes itself stays
            method.__qualname__ = f"{cls.__qualname__}.{name}"
            setattr(cls, name, method)
    if not frozen and "__hash__" not in cls.__dict__:
        cls.__hash__ = None  # mutable with ==: not hashable (as dataclasses does)
    cls.__match_args__ = names
    cls.__data_fields__ = names
    return cls


def replace(obj, **changes):
    """A copy of a data class instance with some fields changed (as ``dataclasses.replace``)."""
    return type(obj)(**{**{name: getattr(obj, name) for name in type(obj).__data_fields__}, **changes})


PREFIX = "nm-policy-routing."

#: The rule/route protocol number that tags what is ours (named in rt_protos.d).
RT_PROTO = 214
RT_PROTO_NAME = "nm-policy-routing"

#: The mark bits ``fwmark=auto`` allocates inside (8 bits: 255 connections).
#: Chosen clear of Tailscale (0x00ff0000), kube-proxy (0xc000), mwan3 (0x3f00)
#: and WireGuard's 51820 (0xca6c); it overlaps Calico (0xffff0000), which is
#: detected and reported.
AUTO_MARK_MASK = 0xFF000000
AUTO_TABLE_RANGE = (10000, 19999)
AUTO_PRIORITY_RANGE = (10000, 19999)

NFT_TABLE = "nm_policy_routing"

MATCH_KINDS = ("incoming", "source", "outgoing")
FAMILIES = {4: "ipv4", 6: "ipv6"}


@dataclass(frozen=True)
class Address:
    """One interface address: ``ip`` in canonical text, with its prefix length."""

    ip: str
    prefixlen: int

    @property
    def family(self) -> int:
        return 6 if ":" in self.ip else 4

    @property
    def network(self) -> str:
        return _network(self.ip, self.prefixlen)

    @property
    def link_local(self) -> bool:
        return _link_local(self.ip)

    @classmethod
    def parse(cls, text: str) -> "Address":
        return cls(*_parse_address(text.strip()))


# ipaddress parses slowly and the daemon meets the same addresses at every event: remember
@functools.lru_cache(maxsize=4096)
def _network(ip: str, prefixlen: int) -> str:
    return str(ipaddress.ip_interface(f"{ip}/{prefixlen}").network)


@functools.lru_cache(maxsize=4096)
def _link_local(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_link_local


@functools.lru_cache(maxsize=4096)
def _parse_address(text: str) -> Tuple[str, int]:
    iface = ipaddress.ip_interface(text)
    return str(iface.ip), iface.network.prefixlen


def real_gateway(text: Optional[str]) -> Optional[str]:
    """A gateway as NetworkManager gives it -> the address, or None when there is none.

    ``0.0.0.0`` and ``::`` mean none (a never-default VPN's ``VPN_IP4_GATEWAY``; NetworkManager
    even writes ``VPN_IP6_GATEWAY=0.0.0.0``), and so do an empty or unreadable value."""
    try:
        address = ipaddress.ip_address((text or "").strip())
    except ValueError:
        return None
    return None if address.is_unspecified else str(address)


@dataclass(frozen=True)
class Connection:
    """What the planner needs to know of one active connection."""

    uuid: str
    id: str
    iface: str
    addresses: Tuple[Address, ...] = ()
    gateway4: Optional[str] = None
    gateway6: Optional[str] = None
    #: the connection's ``user`` data (all keys; the policy parser picks ours)
    user_data: Tuple[Tuple[str, str], ...] = ()
    #: NetworkManager's connection.type (for type-specific defaults)
    type: str = ""

    def addresses_of(self, family: int) -> Tuple[Address, ...]:
        return tuple(a for a in self.addresses if a.family == family)

    def gateway_of(self, family: int) -> Optional[str]:
        return self.gateway4 if family == 4 else self.gateway6

    @property
    def user(self) -> Mapping[str, str]:
        return dict(self.user_data)

    @property
    def label(self) -> str:
        return f"{self.id} ({self.uuid})" if self.id and self.id != self.uuid else self.uuid


@dataclass(frozen=True)
class Fwmark:
    """A packet mark: ``value`` under ``mask`` (a value of -1: "writes these bits")."""

    value: int
    mask: int

    def __str__(self) -> str:
        if self.value < 0:
            return f"bits 0x{self.mask:x}"
        return f"0x{self.value:x}/0x{self.mask:x}"

    def overlaps(self, other: "Fwmark") -> bool:
        """True when a packet carrying one of the marks could match the other.

        A value of -1 stands for "writes these bits, any value" (a foreign nft rule).
        """
        common = self.mask & other.mask
        if not common:
            return False
        if self.value < 0 or other.value < 0:
            return True
        return (self.value & common) == (other.value & common)


@dataclass(frozen=True)
class ExtraRoute:
    """A route the policy adds to the connection's table: ``prefix``, optionally ``via`` a gateway."""

    prefix: str
    via: Optional[str] = None

    @property
    def family(self) -> int:
        return 6 if ":" in self.prefix else 4


@dataclass(frozen=True, order=True)
class App:
    """Who ``apps`` routes through a connection: ``kind`` is ``uid``, ``unit`` or ``cgroup``.

    ``value`` is the uid (as text), the unit name, or the cgroup path (from the cgroup2 root);
    ``name`` is what the user wrote (``user:alice`` keeps ``alice``)."""

    kind: str
    value: str
    name: str = ""

    @property
    def uid(self) -> int:
        return int(self.value)

    @property
    def needs_cgroup(self) -> bool:
        return self.kind in ("unit", "cgroup")

    @property
    def target(self) -> str:
        """The socket-mark target text: ``unit:NAME`` or ``cgroup:/PATH``."""
        return f"{self.kind}:{self.value}"

    def __str__(self) -> str:
        if self.kind == "uid":
            return f"user:{self.name}" if self.name else f"uid:{self.value}"
        return self.target


@dataclass(frozen=True)
class Policy:
    """A validated policy. ``None`` for table/fwmark/priority means ``auto``."""

    enable: bool = False
    table: Optional[int] = None
    fwmark: Optional[Fwmark] = None
    priority: Optional[int] = None
    match: FrozenSet[str] = frozenset({"incoming"})
    src_valid_mark: bool = True
    rp_filter: str = "keep"
    family: str = "both"
    routes: Tuple[ExtraRoute, ...] = ()
    #: users, units and cgroups whose new connections leave by this connection
    apps: Tuple[App, ...] = ()

    def wants_family(self, family: int) -> bool:
        return self.family == "both" or self.family == FAMILIES[family]

    @property
    def uses_marks(self) -> bool:
        return bool(self.match & {"incoming", "outgoing"}) or any(a.needs_cgroup for a in self.apps)


@dataclass(frozen=True)
class Allocation:
    """What a connection's auto values resolved to."""

    table: int
    priority: int
    fwmark: Optional[Fwmark] = None


# ---- kernel entries ------------------------------------------------------


@dataclass(frozen=True, order=True)
class Rule:
    """One routing policy rule of ours (``ip -FAMILY rule``)."""

    family: int
    priority: int
    table: int
    fwmark: int = 0
    fwmask: int = 0
    src: Optional[str] = None
    src_len: int = 0
    #: only packets arriving on this interface (forwarded ones: a local or reverse-path
    #: lookup has iif lo)
    iif: Optional[str] = None
    #: ``uidrange uid_start-uid_end``; -1 = no uid range
    uid_start: int = -1
    uid_end: int = -1

    def __str__(self) -> str:
        sel = []
        if self.src:
            sel.append(f"from {self.src}/{self.src_len}")
        if self.iif:
            sel.append(f"iif {self.iif}")
        if self.fwmask:
            sel.append(f"fwmark 0x{self.fwmark:x}/0x{self.fwmask:x}")
        if self.uid_start >= 0:
            sel.append(f"uidrange {self.uid_start}-{self.uid_end}")
        return f"-{self.family} rule priority {self.priority} {' '.join(sel) or 'all'} table {self.table}"


@dataclass(frozen=True, order=True)
class Route:
    """One route of ours in a policy table (``ip -FAMILY route ... table TABLE``)."""

    family: int
    table: int
    dst: str
    oif: str
    gateway: Optional[str] = None
    prefsrc: Optional[str] = None

    def __str__(self) -> str:
        via = f" via {self.gateway}" if self.gateway else ""
        src = f" src {self.prefsrc}" if self.prefsrc else ""
        return f"-{self.family} route {self.dst}{via} dev {self.oif}{src} table {self.table}"


@dataclass(frozen=True, order=True)
class Mark:
    """nft marking: packets arriving on (incoming) / flows leaving by (outgoing) ``iface``."""

    direction: str
    iface: str
    value: int
    mask: int

    def __str__(self) -> str:
        return f"nft {self.direction} {self.iface} -> mark 0x{self.value:x}/0x{self.mask:x}"


@dataclass(frozen=True, order=True)
class SockMark:
    """A cgroup's new sockets get mark bits ``mask`` := ``value`` (a cgroup BPF program).

    ``target`` is ``unit:NAME`` or ``cgroup:/PATH``; the kernel adapter finds its directory."""

    target: str
    value: int
    mask: int

    def __str__(self) -> str:
        return f"socket mark 0x{self.value:x}/0x{self.mask:x} for {self.target}"


@dataclass(frozen=True, order=True)
class Sysctl:
    """``/proc/sys/net/<family>/conf/<iface>/<key>`` = value."""

    family: str
    iface: str
    key: str
    value: int

    @property
    def name(self) -> str:
        return f"net.{self.family}.conf.{self.iface}.{self.key}"

    @property
    def slot(self) -> Tuple[str, str, str]:
        return (self.family, self.iface, self.key)

    def __str__(self) -> str:
        return f"sysctl {self.name}={self.value}"


@dataclass(frozen=True)
class KernelState:
    """A set of kernel entries: desired (from the planner) or current (read back)."""

    rules: FrozenSet[Rule] = frozenset()
    routes: FrozenSet[Route] = frozenset()
    marks: FrozenSet[Mark] = frozenset()
    sysctls: FrozenSet[Sysctl] = frozenset()
    sockmarks: FrozenSet[SockMark] = frozenset()

    def __or__(self, other: "KernelState") -> "KernelState":
        return KernelState(
            self.rules | other.rules,
            self.routes | other.routes,
            self.marks | other.marks,
            self.sysctls | other.sysctls,
            self.sockmarks | other.sockmarks,
        )

    def __sub__(self, other: "KernelState") -> "KernelState":
        return KernelState(
            self.rules - other.rules,
            self.routes - other.routes,
            self.marks - other.marks,
            self.sysctls - other.sysctls,
            self.sockmarks - other.sockmarks,
        )

    def __bool__(self) -> bool:
        return bool(self.rules or self.routes or self.marks or self.sysctls or self.sockmarks)

    @classmethod
    def union(cls, states: "Iterable[KernelState]") -> "KernelState":
        """All of ``states`` at once (``a | b | ...`` copies the growing sets each time: O(N^2))."""
        rules: set = set()
        routes: set = set()
        marks: set = set()
        sysctls: set = set()
        sockmarks: set = set()
        for state in states:
            rules.update(state.rules)
            routes.update(state.routes)
            marks.update(state.marks)
            sysctls.update(state.sysctls)
            sockmarks.update(state.sockmarks)
        return cls(frozenset(rules), frozenset(routes), frozenset(marks), frozenset(sysctls), frozenset(sockmarks))

    def within(self, tables: "Container[int]", ifaces: "Container[str]") -> "KernelState":
        """The entries of one connection: those of its tables and of its interfaces (an incoming
        policy's forward rule looks up main: it is the connection's by its iif)."""
        return KernelState(
            frozenset(r for r in self.rules if r.table in tables or (r.iif is not None and r.iif in ifaces)),
            frozenset(r for r in self.routes if r.table in tables),
            frozenset(m for m in self.marks if m.iface in ifaces),
            frozenset(s for s in self.sysctls if s.iface in ifaces),
        )

    def entries(self) -> list:
        return [*sorted(self.sysctls), *sorted(self.routes), *sorted(self.rules), *sorted(self.marks),
                *sorted(self.sockmarks)]


@dataclass(frozen=True)
class ForeignUsage:
    """What others already use in the kernel: the planner avoids it and reports clashes."""

    #: tables holding routes that are not ours (any family); a set, or a lazy container
    #: that asks the kernel about one table at a time
    tables: Container[int] = frozenset()
    #: (family, priority) holding rules that are not ours
    priorities: FrozenSet[Tuple[int, int]] = frozenset()
    #: mark bits used by foreign rules or nft tables, with who uses them
    marks: Tuple[Tuple[Fwmark, str], ...] = ()
    #: foreign nft rules that write all 32 mark bits (who: what), reported, not avoidable
    mark_writers: Tuple[str, ...] = ()
    #: foreign strict reverse-path filters before our marking: (family, who)
    early_rpfilter: Tuple[Tuple[int, str], ...] = ()
    #: marks other connections hold, by mask, then value (the one-connection planning: the
    #: planner checks a mark against them in O(masks), as against the ones it allocates)
    held_marks: Mapping[int, Mapping[int, Tuple["Fwmark", str]]] = field(default_factory=dict)


@dataclass(frozen=True)
class ConnectionPlan:
    """The planner's answer for one connection."""

    connection: Connection
    policy: Optional[Policy]
    allocation: Optional[Allocation] = None
    state: KernelState = field(default_factory=KernelState)
    errors: Tuple[str, ...] = ()
    #: "applied" (ok), "disabled", "invalid" (policy errors), "conflict"
    status: str = "ok"
