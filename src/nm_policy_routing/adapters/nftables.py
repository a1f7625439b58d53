"""Our nftables table through libnftables JSON: read it back, replace it in one transaction.

Only ``table inet nm_policy_routing`` is ever written; the rest of the ruleset is
read to learn which mark bits foreign tables write and what drops before our marking.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from .. import nftjson
from ..errors import KernelError, NotPermittedError
from ..model import NFT_TABLE, Fwmark, Mark

log = logging.getLogger(__name__)


def _in_child(work: Callable[[], Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """``work()`` in a forked child, its JSON result back through a pipe; None if the child
    died by a signal. Errors it raises come back as KernelError."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        code = 0
        try:
            payload = json.dumps({"ok": work()})
        except BaseException as exc:  # the child's fence: report, exit
            payload, code = json.dumps({"error": str(exc), "kind": type(exc).__name__}), 1
        with os.fdopen(write_end, "w") as out:
            out.write(payload)
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) or not text:
        return None
    answer = json.loads(text)
    if "error" in answer:
        error = NotPermittedError if answer.get("kind") == "NotPermittedError" else KernelError
        raise error(answer["error"])
    return answer["ok"]


class Nftables:
    """A libnftables context, made at its first use (a hook run that finds nothing to change
    loads no libnftables) and bound to the network namespace of that thread."""

    def __init__(self) -> None:
        self._ctx: Any = None
        #: transactions committed through this context (each adds one to the ruleset's generation)
        self.commits = 0
        #: the last :meth:`foreign` listed the ruleset (False: the listing crashed)
        self.listed = False

    def _run(self, what: str, cmd: Dict[str, Any], missing_ok: bool = False, commit: bool = False) -> Dict[str, Any]:
        if self._ctx is None:
            import nftables  # Debian's python3-nftables

            self._ctx = nftables.Nftables()
            self._ctx.set_json_output(True)
            self._ctx.set_handle_output(False)
        rc, output, error = self._ctx.json_cmd(cmd)
        if rc == 0:
            self.commits += commit
            return output or {}
        if missing_ok and ("No such file" in error or rc == errno.ENOENT):
            return {}
        if "Operation not permitted" in error:
            raise NotPermittedError(f"cannot {what}: not permitted (needs root or CAP_NET_ADMIN)")
        raise KernelError(f"nftables refused to {what}: {error.strip() or rc}")

    def listing(self) -> Dict[str, Any]:
        cmd = {"nftables": [{"list": {"table": {"family": "inet", "name": NFT_TABLE}}}]}
        return self._run("list our table", cmd, missing_ok=True)

    def our_marks(self) -> Tuple[Set[Mark], bool, bool]:
        """(marks, intact, exists) of our table as the kernel holds it."""
        listing = self.listing()
        if not listing.get("nftables"):
            return set(), True, False
        marks, intact = nftjson.parse_table(listing)
        return marks, intact, True

    def foreign(self) -> Tuple[List[Tuple[Fwmark, str]], List[str], List[Tuple[int, str]]]:
        """What other tables do with marks: (bits they manage, writers of all bits, strict
        reverse-path filters before our marking). The whole ruleset is listed in a child
        process: libnftables 1.0.6 (Debian 12) crashes with SIGSEGV on sets written by
        nft >= 1.1.2 (containers ship one), and a crash must cost only these checks."""
        ruleset = _in_child(lambda: self._run("list the ruleset", {"nftables": [{"list": {"ruleset": None}}]}))
        self.listed = ruleset is not None
        if ruleset is None:
            log.warning("listing the nftables ruleset crashed libnftables (a set written by a newer nft, "
                        "see nftables commit be737a19); mark bits of other tables are not checked")
            return [], [], []
        return (nftjson.foreign_marks(ruleset), nftjson.all_bit_writers(ruleset),
                nftjson.early_rpfilter(ruleset))

    def replace(self, marks: Iterable[Mark], exists: bool) -> None:
        marks = set(marks)
        if not marks:
            if exists:
                self._run("delete our table", nftjson.delete_table(), missing_ok=True, commit=True)
            return
        self._run("replace our table", nftjson.replace_table(marks, exists), commit=True)

    def change(self, cmd: Dict[str, Any]) -> None:
        """One transaction of element-by-element changes to our table (nftdelta.py)."""
        self._run("change our table's marking entries", cmd, commit=True)
