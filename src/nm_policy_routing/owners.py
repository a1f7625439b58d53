"""Pure: name the owner of foreign routing state we recognise (for conflict messages)."""

from __future__ import annotations

from typing import Optional

U32 = 0xFFFFFFFF


def rule_owner(priority: int, table: int, fwmark: int = 0, fwmask: int = 0) -> str:
    """Who probably installed a foreign rule, from its priority, table and mark."""
    where = f"rule priority {priority}, table {table}"
    name = _by_mark(fwmark, fwmask)
    if name is None:
        if 5200 <= priority <= 5299 or table == 52:
            name = "Tailscale"
        elif 30768 <= priority <= 31767 or priority == 20053:
            name = "NetworkManager"
        elif table == 51820:
            name = "WireGuard (wg-quick)"
    return f"{name} ({where})" if name else f"a foreign rule ({where})"


def _by_mark(fwmark: int, fwmask: int) -> Optional[str]:
    if not fwmask:
        return None
    if fwmask == U32 and fwmark == 51820:
        return "WireGuard (wg-quick)"
    if fwmask == U32 and 51820 <= fwmark <= 52319:
        return "NetworkManager WireGuard"
    if fwmask & 0x00FF0000 and not fwmask & ~0x00FF0000 & U32:
        return "Tailscale"
    if fwmask in (0x4000, 0x8000, 0xC000):
        return "Kubernetes kube-proxy"
    if fwmask == 0x3F00:
        return "mwan3"
    return None


def nft_owner(family: str, table: str, chain: str) -> str:
    where = f"nft table {family} {table} (chain {chain})"
    lowered = table.lower()
    for prefix, name in (("nm-wg-", "NetworkManager WireGuard"), ("kube", "Kubernetes kube-proxy"),
                         ("cali", "Calico"), ("ts-", "Tailscale"), ("tailscale", "Tailscale"),
                         ("firewalld", "firewalld"), ("mwan3", "mwan3")):
        if lowered.startswith(prefix):
            return f"{name} ({where})"
    return where
