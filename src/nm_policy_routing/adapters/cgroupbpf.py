"""Socket marks by cgroup: a six-instruction cgroup BPF program, loaded with the raw bpf(2) call.

The program (BPF_PROG_TYPE_CGROUP_SOCK, attach type BPF_CGROUP_INET_SOCK_CREATE) runs
when a process of the cgroup (or of a cgroup below it) creates an IPv4/IPv6 socket and
sets ``mark = (mark & ~MASK) | VALUE`` on it. The mark is on the socket before
connect(), so the route lookup (``ip rule fwmark VALUE/MASK lookup T``) chooses the
table and with it the source address. Sockets that exist already are not touched.

One program per cgroup (BPF_F_ALLOW_OVERRIDE): it stays attached while the cgroup
exists, without a process or a pin holding it, and is detached without its fd, so
CAP_BPF and CAP_NET_ADMIN suffice. Ours are recognized by the program ids we attached
(remembered by the caller), or, with CAP_SYS_ADMIN, by the program name
:data:`PROG_NAME`, VALUE and MASK read back from its instructions. No library: ctypes
and the system call, because the program is a handful of words.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from typing import Dict, List, Optional, Tuple

Mark = Tuple[int, int]

from ..errors import KernelError, NotPermittedError

PROG_NAME = b"npr_sock_mark"

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}

BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16

BPF_PROG_TYPE_CGROUP_SOCK = 9
BPF_CGROUP_INET_SOCK_CREATE = 2
BPF_F_ALLOW_OVERRIDE = 1

#: offsetof(struct bpf_sock, mark)
_MARK_OFFSET = 16
_AND_K32 = 0x54  # BPF_ALU | BPF_AND | BPF_K
_OR_K32 = 0x44   # BPF_ALU | BPF_OR | BPF_K
_ATTR_SIZE = 128
_INFO_SIZE = 256

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, _s32(imm))


def _s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def program(value: int, mask: int) -> bytes:
    """``sk->mark = (sk->mark & ~mask) | value; return 1`` (1 = allow the socket)."""
    return b"".join((
        _insn(0x61, dst=2, src=1, off=_MARK_OFFSET),  # r2 = *(u32 *)(r1 + mark)
        _insn(_AND_K32, dst=2, imm=~mask),            # w2 &= ~mask
        _insn(_OR_K32, dst=2, imm=value),             # w2 |= value
        _insn(0x63, dst=1, src=2, off=_MARK_OFFSET),  # *(u32 *)(r1 + mark) = r2
        _insn(0xB7, dst=0, imm=1),                    # r0 = 1
        _insn(0x95),                                  # exit
    ))


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise KernelError(f"cgroup socket marks: unknown bpf(2) number on {platform.machine()}")
    result = _libc.syscall(number, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _attr(*fields: Tuple[int, str, int]) -> ctypes.Array:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    for offset, fmt, value in fields:
        struct.pack_into(fmt, attr, offset, value)
    return attr


def _fail(what: str, exc: OSError) -> Exception:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return NotPermittedError(f"cannot {what}: not permitted (needs CAP_BPF and CAP_NET_ADMIN, and the bpf "
                                 "system call: root, or the shipped service unit)")
    return KernelError(f"the kernel refused to {what}: {exc.strerror}")


def load(value: int, mask: int) -> int:
    """Load the program for this mark; returns its fd (the caller closes it)."""
    code = program(value, mask)
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = _attr((0, "<I", BPF_PROG_TYPE_CGROUP_SOCK), (4, "<I", len(code) // 8),
                 (8, "<Q", ctypes.addressof(insns)), (16, "<Q", ctypes.addressof(license_)),
                 (24, "<I", 1), (28, "<I", len(log)), (32, "<Q", ctypes.addressof(log)),
                 (68, "<I", BPF_CGROUP_INET_SOCK_CREATE))
    attr[48:48 + len(PROG_NAME)] = PROG_NAME
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except OSError as exc:
        detail = log.value.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise _fail(f"load the socket-mark program for mark 0x{value:x}/0x{mask:x} ({detail[0]})", exc) from exc


def _open_cgroup(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError as exc:
        raise KernelError(f"cgroup {path} does not exist (the unit is not running?)") from exc


def _prog_id(prog: int) -> int:
    info = ctypes.create_string_buffer(_INFO_SIZE)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _attr((0, "<I", prog), (4, "<I", _INFO_SIZE), (8, "<Q", ctypes.addressof(info))))
    return struct.unpack_from("<I", info, 4)[0]


def attach(path: str, value: int, mask: int, known: Optional[Dict[int, Mark]] = None) -> int:
    """Attach the socket-mark program for VALUE/MASK to the cgroup directory ``path``; its program id.

    One program per cgroup (BPF_F_ALLOW_OVERRIDE: a child cgroup may set its own): a
    program someone else attached there is reported, never replaced."""
    cgroup = _open_cgroup(path)
    try:
        for prog_id in _query(cgroup):
            mark = _identify(prog_id, known or {})
            if mark is None:
                raise KernelError(f"cgroup {path} already has a socket-creation BPF program (id {prog_id}) that "
                                  "is not ours: not replaced; remove it, or list another unit or cgroup")
        prog = load(value, mask)
        try:
            _bpf(BPF_PROG_ATTACH, _attr((0, "<I", cgroup), (4, "<I", prog),
                                        (8, "<I", BPF_CGROUP_INET_SOCK_CREATE), (12, "<I", BPF_F_ALLOW_OVERRIDE)))
            return _prog_id(prog)
        finally:
            os.close(prog)
    except OSError as exc:
        raise _fail(f"attach the socket-mark program to cgroup {path}", exc) from exc
    finally:
        os.close(cgroup)


def _query(cgroup: int) -> List[int]:
    ids = (ctypes.c_uint32 * 64)()
    attr = _attr((0, "<I", cgroup), (4, "<I", BPF_CGROUP_INET_SOCK_CREATE),
                 (16, "<Q", ctypes.addressof(ids)), (24, "<I", len(ids)))
    _bpf(BPF_PROG_QUERY, attr)
    count = struct.unpack_from("<I", attr, 24)[0]
    return list(ids[:min(count, len(ids))])


def _identify(prog_id: int, known: Dict[int, Mark]) -> Optional[Mark]:
    """(value, mask) if the program is ours: by the ids we attached, else by name (needs CAP_SYS_ADMIN)."""
    if prog_id in known:
        return known[prog_id]
    try:
        prog = _bpf(BPF_PROG_GET_FD_BY_ID, _attr((0, "<I", prog_id)))
    except OSError:
        return None  # gone, or not permitted (CAP_SYS_ADMIN): not known to be ours
    try:
        return _read_mark(prog)
    except OSError:
        return None
    finally:
        os.close(prog)


def _read_mark(prog: int) -> Optional[Mark]:
    """(value, mask) if ``prog`` is our program, read back from its instructions."""
    insns = ctypes.create_string_buffer(64 * 8)
    info = ctypes.create_string_buffer(_INFO_SIZE)
    struct.pack_into("<I", info, 20, len(insns))  # xlated_prog_len
    struct.pack_into("<Q", info, 32, ctypes.addressof(insns))  # xlated_prog_insns
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _attr((0, "<I", prog), (4, "<I", _INFO_SIZE), (8, "<Q", ctypes.addressof(info))))
    name = info.raw[64:80].split(b"\0", 1)[0]
    if name != PROG_NAME[:15]:
        return None
    length = min(struct.unpack_from("<I", info, 20)[0], len(insns))
    value = mask = None
    for offset in range(0, length, 8):
        code, _, _, imm = struct.unpack_from("<BBhi", insns, offset)
        if code == _AND_K32:
            mask = ~imm & 0xFFFFFFFF
        elif code == _OR_K32:
            value = imm & 0xFFFFFFFF
    return (value, mask) if value is not None and mask is not None else None


def attached(path: str, known: Optional[Dict[int, Mark]] = None) -> List[Tuple[int, Mark]]:
    """(program id, (value, mask)) of our programs on the cgroup ``path`` (none if it is gone)."""
    try:
        cgroup = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return []
    try:
        found = [(i, _identify(i, known or {})) for i in _query(cgroup)]
        return [(i, mark) for i, mark in found if mark is not None]
    except OSError as exc:
        raise _fail(f"list the programs attached to cgroup {path}", exc) from exc
    finally:
        os.close(cgroup)


def detach(path: str, value: int, mask: int, known: Optional[Dict[int, Mark]] = None) -> None:
    """Detach our program for VALUE/MASK from ``path``; nothing to do if it (or the cgroup) is gone."""
    if not any(mark == (value, mask) for _, mark in attached(path, known)):
        return
    try:
        cgroup = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:  # one program per cgroup (not ALLOW_MULTI): detached without its fd
        _bpf(BPF_PROG_DETACH, _attr((0, "<I", cgroup), (8, "<I", BPF_CGROUP_INET_SOCK_CREATE)))
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise _fail(f"detach the socket-mark program from cgroup {path}", exc) from exc
    finally:
        os.close(cgroup)
