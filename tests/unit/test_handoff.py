"""The handoff protocol's request parsing: only an action, an interface and a UUID get through."""

import pytest

from nm_policy_routing.handoff import Request, parse_request


def test_a_well_formed_request() -> None:
    assert parse_request(b"pre-up\teth1.100\t5e1f0000-0000-4000-8000-00000000e701\n") == \
        Request("pre-up", "eth1.100", "5e1f0000-0000-4000-8000-00000000e701")


@pytest.mark.parametrize("line", [
    b"", b"up\n", b"up eth1 uuid\n", b"hostname\teth1\tu\n", b"up\teth1/../x\tu\n", b"up\t\tu\n",
    b"up\teth1\t../../etc\n", b"up\teth1\tu\textra\n", b"up\teth1\t\xff\n", b"up\tan-interface-name-too-long\tu\n",
])
def test_anything_else_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        parse_request(line)
