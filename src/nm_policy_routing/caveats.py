"""Pure: settings that are in place but cannot take effect on this host, and why.

``status`` shows them per connection and apply logs them. Three causes: rp_filter
under a higher ``net.ipv4.conf.all.rp_filter`` (the kernel uses the higher of the
two), a foreign strict reverse-path filter that runs before our marking (firewalld's
IPv6 rpfilter at priority -290), and foreign rules that write all 32 mark bits.
"""

from __future__ import annotations

from typing import List, Optional

from .model import ConnectionPlan, ForeignUsage

RP_NAMES = {0: "off", 1: "strict", 2: "loose"}


def _rp_filter(cp: ConnectionPlan, rp_all: Optional[int]) -> List[str]:
    out = []
    for entry in cp.state.sysctls:
        if entry.key != "rp_filter" or rp_all is None or rp_all <= entry.value:
            continue
        mine, effective = RP_NAMES.get(entry.value, str(entry.value)), RP_NAMES.get(rp_all, str(rp_all))
        out.append(f"rp-filter={mine} has no effect on {entry.iface}: the kernel uses the higher of "
                   f"net.ipv4.conf.all.rp_filter ({rp_all}) and net.ipv4.conf.{entry.iface}.rp_filter "
                   f"({entry.value}), so {entry.iface} filters {effective}; to make it count, set "
                   "net.ipv4.conf.all.rp_filter=0 (in /etc/sysctl.d) and give each interface its own value")
    return out


def _early_rpfilter(cp: ConnectionPlan, foreign: ForeignUsage) -> List[str]:
    policy, iface = cp.policy, cp.connection.iface
    if policy is None or "incoming" not in policy.match:
        return []
    families = {m for m in (r.family for r in cp.state.rules if r.fwmask)}
    out = []
    for family, owner in sorted(set(foreign.early_rpfilter)):
        if family in families:
            out.append(f"IPv{family} packets arriving on {iface} from senders routed by another interface are "
                       f"dropped by the strict reverse-path filter of {owner}, which runs before this policy "
                       f"marks them: 'incoming' cannot work for IPv{family}; make that filter loose "
                       "(firewalld: IPv6_rpfilter=loose in /etc/firewalld/firewalld.conf) or use match=source")
    return out


def _writers(cp: ConnectionPlan, foreign: ForeignUsage) -> List[str]:
    if cp.allocation is None or cp.allocation.fwmark is None:
        return []
    return [f"fwmark {cp.allocation.fwmark} can be overwritten by {writer}, which writes all 32 mark bits: "
            "packets it matches lose this policy's mark; make that rule write only its own bits (nft: "
            "meta mark set meta mark & ~BITS | VALUE; iptables: MARK --set-xmark VALUE/BITS)"
            for writer in foreign.mark_writers]


def caveats(cp: ConnectionPlan, foreign: ForeignUsage, rp_all: Optional[int]) -> List[str]:
    """Why parts of an applied plan cannot take effect (empty when nothing stands in the way).

    ``rp_all`` is ``net.ipv4.conf.all.rp_filter`` (None if unknown)."""
    if cp.status != "ok" or not cp.state:
        return []
    return _rp_filter(cp, rp_all) + _early_rpfilter(cp, foreign) + _writers(cp, foreign)
