"""The live kernel, as the reconcile loop sees it: netlink + nftables + sysctl in one object."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from .. import commands, nftdelta
from ..errors import KernelError, raise_first
from ..model import ForeignUsage, Fwmark, KernelState, Mark, Route, Rule, SockMark, Sysctl
from . import cgroups, nfnetlink, sysctl
from .rtnl import Rtnl
from .nftables import Nftables

if TYPE_CHECKING:
    import _socket


class LiveKernel:
    """Reads and writes what is ours in the current network namespace. With ``directory`` (the
    state directory) what the nftables ruleset held is remembered there between runs (nftmemo.py)."""

    def __init__(self, directory: Optional[str] = None) -> None:
        self.netlink = Rtnl()
        self.nft = Nftables()
        self.nft_exists = False
        self.nft_intact = True
        #: our marks as last read or written (the base of an element-by-element change)
        self._nft_marks: Optional[Set[Mark]] = None
        self.sockmark_targets: Set[str] = set()
        self._paths: Dict[str, Optional[str]] = {}
        #: program id -> (value, mask): the socket programs we attached (from the record), and
        #: those found attached at the last read or attached since
        self.known_ids: Dict[int, Tuple[int, int]] = {}
        self.live_ids: Dict[int, Tuple[int, int]] = {}
        #: the netfilter socket (conntrack flush, ruleset generation), opened at first use and
        #: closed with the kernel (see flush_conntrack)
        self._conntrack: Optional[_socket.socket] = None
        self._memo = None
        if directory is not None:
            from .nftmemo import NftMemo

            self._memo = NftMemo(directory, self.nft, lambda: nfnetlink.nft_generation(self._netfilter()))

    def close(self) -> None:
        if self._memo is not None:
            self._memo.save()
        self.netlink.close()
        if self._conntrack is not None:
            self._conntrack.close()

    def _netfilter(self) -> _socket.socket:
        if self._conntrack is None:
            self._conntrack = nfnetlink.conntrack_socket()
        return self._conntrack

    def read(self, sysctl_slots: Iterable[str]) -> KernelState:
        self.netlink.invalidate()
        marks, self.nft_intact, self.nft_exists = (self._memo or self.nft).our_marks()
        self._nft_marks = set(marks)
        return KernelState(
            frozenset(self.netlink.our_rules()),
            frozenset(self.netlink.our_routes()),
            frozenset(marks),
            frozenset(self.read_sysctls(sysctl_slots)),
            frozenset(self._sockmarks()),
        )

    def read_scope(self, tables: Set[int], ifaces: Set[str], sysctl_slots: Iterable[str]) -> KernelState:
        """Our entries of one connection: the rules and routes of ``tables``, the rules, marks and
        sysctls of ``ifaces`` (read whole and picked out here; the daemon's resident kernel reads
        them by connection)."""
        return self.read(sysctl_slots).within(tables, ifaces)

    # ---- socket marks by cgroup (apps) ------------------------------------

    def cgroup_path(self, target: str) -> Optional[str]:
        """The target's cgroup directory, asked once per reconcile."""
        if target not in self._paths:
            self._paths[target] = cgroups.path_of(target)
        return self._paths[target]

    def read_sockmarks(self, targets: Set[str], known: Dict[int, Tuple[int, int]]) -> Set[SockMark]:
        """Our socket marks on ``targets`` (``known``: ids we attached); later reads include them."""
        self.sockmark_targets = set(targets)
        self.known_ids.update(known)
        return self._sockmarks()

    def _sockmarks(self) -> Set[SockMark]:
        out: Set[SockMark] = set()
        self.live_ids = {}
        if not self.sockmark_targets:  # the common case: no apps, no bpf
            return out
        from . import cgroupbpf

        for target in sorted(self.sockmark_targets):
            path = self.cgroup_path(target)
            for prog_id, (value, mask) in cgroupbpf.attached(path, self.known_ids) if path else ():
                out.add(SockMark(target, value, mask))
                self.live_ids[prog_id] = (value, mask)
        return out

    def attach_sockmark(self, entry: SockMark) -> None:
        from ..errors import KernelError, raise_first
        from . import cgroupbpf

        path = self.cgroup_path(entry.target)
        if path is None:
            raise KernelError(f"cannot mark the sockets of {entry.target}: its cgroup does not exist")
        self.sockmark_targets.add(entry.target)
        prog_id = cgroupbpf.attach(path, entry.value, entry.mask, self.known_ids)
        self.known_ids[prog_id] = self.live_ids[prog_id] = (entry.value, entry.mask)

    def detach_sockmark(self, entry: SockMark) -> None:
        from . import cgroupbpf

        path = self.cgroup_path(entry.target)
        if path is not None:
            cgroupbpf.detach(path, entry.value, entry.mask, self.known_ids)

    def read_sysctls(self, slots: Iterable[str]) -> Set[Sysctl]:
        out = set()
        for slot in slots:
            family, iface, key = slot.split("/")
            value = self.read_sysctl(family, iface, key)
            if value is not None:
                out.add(Sysctl(family, iface, key, value))
        return out

    def read_sysctl(self, family: str, iface: str, key: str) -> Optional[int]:
        return sysctl.read(family, iface, key)

    def foreign(self) -> ForeignUsage:
        usage = self.netlink.foreign_usage()
        marks, writers, early = (self._memo or self.nft).foreign()
        return ForeignUsage(usage.tables, usage.priorities, usage.marks + tuple(marks), tuple(writers),
                            tuple(early))

    def unusable_addresses(self, iface: Optional[str] = None) -> Set[str]:
        return self.netlink.unusable_addresses(iface)

    def write_sysctl(self, entry: Sysctl) -> None:
        sysctl.write(entry)

    # one entry, or many in one netlink batch (each one's error, None where done)

    def add_routes(self, routes: Sequence[Route]) -> List[Optional[Exception]]:
        return self.netlink.add_routes(routes)

    def del_routes(self, routes: Sequence[Route]) -> List[Optional[Exception]]:
        return self.netlink.del_routes(routes)

    def add_rules(self, rules: Sequence[Rule]) -> List[Optional[Exception]]:
        return self.netlink.add_rules(rules)

    def del_rules(self, rules: Sequence[Rule]) -> List[Optional[Exception]]:
        return self.netlink.del_rules(rules)

    def add_route(self, route: Route) -> None:
        raise_first(self.add_routes([route]))

    def del_route(self, route: Route) -> None:
        raise_first(self.del_routes([route]))

    def add_rule(self, rule: Rule) -> None:
        raise_first(self.add_rules([rule]))

    def del_rule(self, rule: Rule) -> None:
        raise_first(self.del_rules([rule]))

    def flush_conntrack(self, mark: Fwmark) -> None:
        """The socket stays open until :meth:`close`: releasing a netfilter netlink socket waits for
        nftables' deferred release of the last transaction's deleted objects (an RCU grace period,
        ~10 ms here: ``nft_rcv_nl_event`` flushes that work); the flush follows the transaction that
        deleted the marking, and the later close finds the wait (mostly) over."""
        nfnetlink.flush_conntrack_mark(mark.value, mark.mask, self._netfilter())

    def change_marks(self, before: Iterable[Mark], after: Iterable[Mark]) -> None:
        """One connection's marks go from ``before`` to ``after`` (the others stay)."""
        if self._nft_marks is None:
            self.read(())
        assert self._nft_marks is not None
        self.set_marks((self._nft_marks - set(before)) | set(after))

    def set_marks(self, marks: Iterable[Mark]) -> None:
        marks = set(marks)
        change = nftdelta.delta(self._nft_marks, marks) \
            if self.nft_exists and self.nft_intact and self._nft_marks is not None else None
        if change is None:
            self.nft.replace(marks, self.nft_exists)
        elif change["nftables"]:
            try:
                self.nft.change(change)
            except KernelError:  # the table changed under us: write it whole
                self.nft.replace(marks, self.nft_exists)
        self._nft_marks = marks
        self.nft_exists = bool(marks)
        self.nft_intact = True
        if self._memo is not None:
            self._memo.wrote(marks)


class DryRunKernel(LiveKernel):
    """Reads the live kernel; every write becomes a shell command in :attr:`commands` instead."""

    def __init__(self) -> None:
        super().__init__()
        self.commands: List[str] = []
        self._sysctls: Dict[Tuple[str, str, str], int] = {}

    def read_sysctl(self, family: str, iface: str, key: str) -> Optional[int]:
        if (family, iface, key) in self._sysctls:
            return self._sysctls[(family, iface, key)]
        return sysctl.read(family, iface, key)

    def write_sysctl(self, entry: Sysctl) -> None:
        self._sysctls[entry.slot] = entry.value
        self.commands.append(commands.sysctl(entry))

    def add_routes(self, routes: Sequence[Route]) -> List[Optional[Exception]]:
        return self._say([commands.route("replace", r) for r in routes])

    def del_routes(self, routes: Sequence[Route]) -> List[Optional[Exception]]:
        return self._say([commands.route("delete", r) for r in routes])

    def add_rules(self, rules: Sequence[Rule]) -> List[Optional[Exception]]:
        return self._say([commands.rule("add", r) for r in rules])

    def del_rules(self, rules: Sequence[Rule]) -> List[Optional[Exception]]:
        return self._say([commands.rule("delete", r) for r in rules])

    def _say(self, lines: List[str]) -> List[Optional[Exception]]:
        self.commands.extend(lines)
        return [None] * len(lines)

    def set_marks(self, marks: Iterable[Mark]) -> None:
        self.commands.append(commands.nft_replace(marks, self.nft_exists))

    def flush_conntrack(self, mark: Fwmark) -> None:
        self.commands.append(commands.conntrack_flush(mark))

    def attach_sockmark(self, entry: SockMark) -> None:
        self.commands.append(commands.sockmark("attach", entry, self.cgroup_path(entry.target) or ""))

    def detach_sockmark(self, entry: SockMark) -> None:
        self.commands.append(commands.sockmark("detach", entry, self.cgroup_path(entry.target) or ""))
