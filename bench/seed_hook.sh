#!/bin/sh
# The baseline: a hand-written dispatcher hook doing the seed's fix for eth1 with shell
# commands (what a sysadmin would write). $1 = interface, $2 = action.
[ "$1" = eth1 ] || exit 0
case "$2" in
up)
    nft -f - <<'NFT'
table inet seedfix {
    chain pre { type filter hook prerouting priority mangle; iifname "eth1" meta mark set 0x1 ct mark set meta mark; }
    chain out { type route hook output priority mangle; meta mark set ct mark; }
}
NFT
    ip rule add priority 1000 fwmark 0x1 table 100
    ip route replace default via 10.0.1.1 dev eth1 src 10.0.1.2 table 100
    echo 1 > /proc/sys/net/ipv4/conf/eth1/src_valid_mark
    ;;
down)
    nft delete table inet seedfix
    ip rule del priority 1000 fwmark 0x1 table 100
    ip route flush table 100
    echo 0 > /proc/sys/net/ipv4/conf/eth1/src_valid_mark
    ;;
esac
exit 0
