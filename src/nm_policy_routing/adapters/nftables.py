"""Our nftables table through libnftables JSON: read it back, replace it in one transaction.

Only ``table inet nm_policy_routing`` is ever written; the rest of the ruleset is
read to learn which mark bits foreign tables write.
"""

from __future__ import annotations

import errno
from typing import Any, Dict, Iterable, List, Set, Tuple

from .. import nftjson
from ..errors import KernelError, NotPermittedError
from ..model import NFT_TABLE, Fwmark, Mark


class Nftables:
    """A libnftables context, bound to the network namespace of the creating thread."""

    def __init__(self) -> None:
        import nftables  # Debian's python3-nftables

        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)

    def _run(self, what: str, cmd: Dict[str, Any], missing_ok: bool = False) -> Dict[str, Any]:
        rc, output, error = self._nft.json_cmd(cmd)
        if rc == 0:
            return output or {}
        if missing_ok and ("No such file" in error or rc == errno.ENOENT):
            return {}
        if "Operation not permitted" in error:
            raise NotPermittedError(f"cannot {what}: not permitted (needs root or CAP_NET_ADMIN)")
        raise KernelError(f"nftables refused to {what}: {error.strip() or rc}")

    def listing(self) -> Dict[str, Any]:
        cmd = {"nftables": [{"list": {"table": {"family": "inet", "name": NFT_TABLE}}}]}
        return self._run("list our table", cmd, missing_ok=True)

    def exists(self) -> bool:
        return bool(self.listing().get("nftables"))

    def our_marks(self) -> Tuple[Set[Mark], bool, bool]:
        """(marks, intact, exists) of our table as the kernel holds it."""
        listing = self.listing()
        if not listing.get("nftables"):
            return set(), True, False
        marks, intact = nftjson.parse_table(listing)
        return marks, intact, True

    def foreign_marks(self) -> List[Tuple[Fwmark, str]]:
        ruleset = self._run("list the ruleset", {"nftables": [{"list": {"ruleset": None}}]})
        return nftjson.foreign_marks(ruleset)

    def replace(self, marks: Iterable[Mark], exists: bool) -> None:
        marks = set(marks)
        if not marks:
            if exists:
                self._run("delete our table", nftjson.delete_table(), missing_ok=True)
            return
        self._run("replace our table", nftjson.replace_table(marks, exists))
