"""The journal: entries carry the connection (text and fields), each change has its owner,
one entry per connection and event, errors not repeated at every resync."""

from __future__ import annotations

import logging
import os
import socket
import struct

from nm_policy_routing.journal import JournalHandler, about, encode, stderr_is_journal
from nm_policy_routing.story import entries, tell
from tests.unit.test_planner import conn
from tests.unit.test_reconcile import _FakeKernel


class _MarkingKernel(_FakeKernel):
    """The in-memory kernel, accepting nft marking and keeping sysctls."""

    def read_sysctl(self, family, iface, key):
        found = [s.value for s in self.state.sysctls if s.slot == (family, iface, key)]
        return found[0] if found else 0

    def write_sysctl(self, entry):
        from nm_policy_routing.model import replace

        kept = frozenset(s for s in self.state.sysctls if s.slot != entry.slot)
        self.state = replace(self.state, sysctls=kept | {entry})

    def set_marks(self, marks):
        from nm_policy_routing.model import replace

        self.state = replace(self.state, marks=frozenset(marks))


def parse(datagram: bytes) -> dict:
    """The journal's native protocol, read back (as journald does)."""
    fields, i = {}, 0
    while i < len(datagram):
        end = datagram.index(b"\n", i)
        line = datagram[i:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            i = end + 1
        else:
            name, size = line, struct.unpack("<Q", datagram[end + 1:end + 9])[0]
            value = datagram[end + 9:end + 9 + size]
            i = end + 9 + size + 1
        fields[name.decode()] = value.decode()
    return fields


def test_encode_binary_safe_for_multiline_values() -> None:
    data = encode([("MESSAGE", "one\ntwo"), ("PRIORITY", "3")])
    assert parse(data) == {"MESSAGE": "one\ntwo", "PRIORITY": "3"}


def test_handler_sends_one_datagram_with_the_connection_fields(tmp_path) -> None:
    path = str(tmp_path / "socket")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    handler = JournalHandler(path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test_journal.handler")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        c = conn("0b5c-uuid", "eth1")
        logger.error("connection %s refused", c.id, extra=about(c))
        fields = parse(server.recv(65536))
    finally:
        logger.removeHandler(handler)
        handler.close()
        server.close()
    assert fields["MESSAGE"] == "connection id-eth1 refused"
    assert fields["PRIORITY"] == "3"
    assert fields["SYSLOG_IDENTIFIER"] == "nm-policy-routing"
    assert (fields["CONNECTION_UUID"], fields["CONNECTION_ID"], fields["NM_DEVICE"]) == \
        ("0b5c-uuid", "id-eth1", "eth1")


def test_journal_stream_must_match_stderr() -> None:
    st = os.fstat(2)
    assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})


def test_each_connection_gets_one_entry_applied_then_removed(tmp_path) -> None:
    from nm_policy_routing.reconcile import Engine

    kernel = _MarkingKernel()
    engine = Engine(str(tmp_path), kernel_factory=lambda: kernel)
    a = conn("uuid-a", "eth1", n=1, table="100", fwmark="0x1", priority="1000")
    b = conn("uuid-b", "eth2", n=2, table="200", fwmark="0x2", priority="2000")
    told = entries(engine.reconcile([a, b]))
    assert [(level, c.uuid if c else None) for level, c, _ in told] == \
        [(logging.INFO, "uuid-a"), (logging.INFO, "uuid-b")]
    text_a = told[0][2]
    assert text_a.startswith("connection 'id-eth1' (uuid-a) on eth1: policy applied: ")
    assert "table 100" in text_a and "table 200" not in text_a and "nft incoming eth1" in text_a
    told = entries(engine.remove("uuid-b"))
    assert len(told) == 1 and told[0][1].uuid == "uuid-b"
    assert told[0][2].startswith("connection 'id-eth2' (uuid-b) on eth2: policy removed: ")
    assert "delete -4 rule priority 2000 fwmark 0x2/0xffffffff table 200" in told[0][2]
    assert entries(engine.reconcile([a])) == [], "nothing changed, nothing told"


def test_a_refused_policy_is_an_error_told_once(tmp_path, caplog) -> None:
    from nm_policy_routing.reconcile import Engine

    engine = Engine(str(tmp_path), kernel_factory=_MarkingKernel)
    bad = conn("uuid-bad", "eth3", n=3, table="254")
    seen: dict = {}
    with caplog.at_level(logging.INFO, logger="nm_policy_routing"):
        tell(engine.reconcile([bad]), seen)
        tell(engine.reconcile([bad]), seen)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].getMessage().startswith("connection 'id-eth3' (uuid-bad) on eth3: policy refused (invalid policy)")
    assert errors[0].npr_connection_uuid == "uuid-bad" and errors[0].npr_device == "eth3"


def test_a_disabled_policy_is_told_as_removed(tmp_path) -> None:
    from nm_policy_routing.reconcile import Engine

    kernel = _MarkingKernel()
    engine = Engine(str(tmp_path), kernel_factory=lambda: kernel)
    engine.reconcile([conn("uuid-a", "eth1", n=1, table="100", fwmark="0x1", priority="1000")])
    told = entries(engine.reconcile([conn("uuid-a", "eth1", n=1, enable="no")]))
    assert [(level, text.split(": ")[1]) for level, _, text in told] == [(logging.INFO, "policy removed")]
