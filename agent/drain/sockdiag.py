"""Sample the app's TCP connections, so the traffic-aware drain can see when requests stop.

The drain needs two facts per poll: which connections to the app's ports are still open, and how
long ago data last arrived on each of them. The kernel knows both. We ask it directly over
``NETLINK_SOCK_DIAG`` (the interface ``ss`` uses) rather than running ``ss`` or parsing ``/proc``:

* the kernel filters by state and by local port itself (inet_diag bytecode), so a poll costs
  time for the app's connections only, not for every socket in the pod;
* ``struct tcp_info`` comes with each socket, giving ``tcpi_last_data_recv`` (ms since data last
  arrived) and ``tcpi_bytes_received`` -- the only cheap way to tell a busy keep-alive connection
  from an idle one -- and ``tcpi_last_data_sent``: a connection that received data more recently
  than it sent any holds a request the app has read but not yet answered;
* it is one round trip per address family, with no process to spawn and no text to format.

Why not pyroute2: its ``DiagSocket`` decodes every attribute of every socket in Python (over
twenty times the CPU per poll of the small ``struct`` parser below, which reads only the fields
the drain uses), adds megabytes of RSS on import, and its sync socket cannot be used inside a
running event loop. The poll's budget (< 5 ms CPU at 1,000 connections, < 50 ms at 10,000) is
checked by ``bench/bench_sockdiag.py``.

A connection can open, carry a request and close between two polls. The netlink watcher still
counts it (``Poll.missed``, ``Poll.unaccounted_opens``): the dump includes TIME_WAIT sockets, which
a connection the app closed first leaves behind for 60 s, and each poll reads the network
namespace's count of accepted connections (``/proc/net/snmp`` PassiveOpens), which shows those a
client closed first. Both are unprivileged and cost a few per cent of a poll: TIME_WAIT sockets
are filtered by port in the kernel like the others, and the count is one small file.

Where netlink is not available (a sandbox such as gVisor, a kernel without ``inet_diag``), the
``/proc/net/tcp{,6}`` fallback still counts connections and queues, but cannot say when data was
last received or sent (``None``).

Only TCP sockets in the current network namespace are seen: the agent shares the pod's network
namespace with the app, so those are the app's connections. Ports are *local* ports: the watcher
reports server-side sockets of the app's listeners, never the app's own outgoing connections
(their local port is ephemeral).

This module does no logging: the caller knows what is worth saying (and logs ``.source``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, Self, runtime_checkable

from agent.config import MAX_PORT_RANGES, port_ranges

__all__ = [
    "NetlinkWatcher",
    "Poll",
    "ProcWatcher",
    "SocketSample",
    "SocketWatcher",
    "open_watcher",
]

# --------------------------------------------------------------------------------------------
# TCP states (include/net/tcp_states.h). The kernel numbers them from 1; index 0 is unused.
# --------------------------------------------------------------------------------------------
TCP_STATE_NAMES: tuple[str, ...] = (
    "UNKNOWN",  # 0: not a TCP state
    "ESTABLISHED",  # 1
    "SYN_SENT",  # 2
    "SYN_RECV",  # 3
    "FIN_WAIT1",  # 4
    "FIN_WAIT2",  # 5
    "TIME_WAIT",  # 6
    "CLOSE",  # 7
    "CLOSE_WAIT",  # 8
    "LAST_ACK",  # 9
    "LISTEN",  # 10
    "CLOSING",  # 11
    "NEW_SYN_RECV",  # 12: kernel-internal state of request sockets
    "BOUND_INACTIVE",  # 13: kernel >= 6.5, bound but neither listening nor connected
)
TCP_ESTABLISHED = 1
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9
TCP_CLOSING = 11

# The states we report: a connection where a request may still be in flight.
# * ESTABLISHED: the normal case.
# * CLOSE_WAIT: the client closed its side, the app has not: a response may still be written.
# * FIN_WAIT1 / FIN_WAIT2 / CLOSING / LAST_ACK: the app closed (or both did); FIN_WAIT1,
#   CLOSING and LAST_ACK may still hold unacknowledged response bytes (send_queue), and in
#   FIN_WAIT2 a half-closed client may still send.
# Left out, on purpose:
# * LISTEN: a listener is not a connection; it exists for the whole life of the app.
# * SYN_RECV: half-open request sockets are not full sockets (the kernel has no tcp_info for
#   them) and last one round trip; the connection is seen as ESTABLISHED on the next poll.
# * TIME_WAIT / CLOSE: the connection is over; nothing more reaches the app.
# * SYN_SENT: outgoing, and the app's outgoing sockets have ephemeral local ports anyway.
WATCHED_STATES: frozenset[int] = frozenset(
    {TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING}
)
# inet_diag_req_v2.idiag_states is a bitmask of (1 << state) (the kernel's TCPF_* flags).
WATCHED_STATES_MASK: int = sum(1 << state for state in WATCHED_STATES)
TCP_TIME_WAIT = 6
# The netlink watcher asks for TIME_WAIT too. A connection the app closes first ends in
# TIME_WAIT on the app's side for 60 s, as a mini-socket without tcp_info: a connection that
# opened, carried a request and closed between two polls is still there at the next one. Such
# sockets are never samples (the connection is over); they only tell the drain that a
# connection it never saw open did exist (``Poll.missed``).
DUMP_STATES_MASK: int = WATCHED_STATES_MASK | (1 << TCP_TIME_WAIT)

# A connection the *client* closes first leaves nothing behind on the app's side (CLOSE_WAIT,
# then LAST_ACK, gone within a round trip). What the kernel does keep is a count: PassiveOpens
# in /proc/net/snmp, every connection accepted in this network namespace (the pod's). Opens that
# no socket the watcher saw (open or in TIME_WAIT) and no connection of the agent's own accounts
# for are connections the watcher missed (``Poll.unaccounted_opens``). The file is per network
# namespace and world-readable: no privilege needed.
PROC_NET_SNMP = "net/snmp"
# Cookies of the sockets seen in this many recent polls count as "seen before": a socket that one
# dump skipped (see the kernel quirk at PROC_NET_FILES) is not mistaken for a new connection.
SEEN_MEMORY_POLLS = 2

# /proc/net/tcp "tr" column value for a socket whose timer is the TIME_WAIT timer, i.e. a
# time-wait mini-socket (net/ipv4/tcp_ipv4.c, get_timewait4_sock). An orphaned FIN_WAIT2 socket
# becomes such a mini-socket: it is reported with state FIN_WAIT2 but the app has already closed
# it. Netlink reports these too (without tcp_info); both paths skip them, so both count the same.
PROC_TIMER_TIME_WAIT = 3

# --------------------------------------------------------------------------------------------
# Netlink (include/uapi/linux/netlink.h, sock_diag.h, inet_diag.h)
# --------------------------------------------------------------------------------------------
NETLINK_SOCK_DIAG = 4  # netlink protocol number of sock_diag (NETLINK_INET_DIAG before 3.3)
SOCK_DIAG_BY_FAMILY = 20  # request/reply message type carrying inet_diag_req_v2 / inet_diag_msg
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02  # set on every message of a multi-part (dump) reply; NLMSG_DONE ends it
NLM_F_DUMP = 0x100 | 0x200  # NLM_F_ROOT | NLM_F_MATCH: "all sockets that match"

# struct nlmsghdr { __u32 nlmsg_len; __u16 nlmsg_type; __u16 nlmsg_flags; __u32 nlmsg_seq;
#                   __u32 nlmsg_pid; }  -- host byte order, 16 bytes.
NLMSGHDR = struct.Struct("=IHHII")
# The payload of NLMSG_ERROR (struct nlmsgerr) and of NLMSG_DONE starts with an int: a negative
# errno, or 0.
NLMSG_ERRNO = struct.Struct("=i")

# struct nlattr / struct rtattr { __u16 len; __u16 type; }, payload padded to 4 bytes.
NLATTR = struct.Struct("=HH")

# struct inet_diag_req_v2 (inet_diag.h), 56 bytes:
#   __u8 sdiag_family; __u8 sdiag_protocol; __u8 idiag_ext; __u8 pad; __u32 idiag_states;
#   struct inet_diag_sockid id;   -- 48 bytes, unused in a dump (zeroed)
INET_DIAG_REQ_V2 = struct.Struct("=BBBxI48x")
INET_DIAG_REQ_BYTECODE = 1  # request attribute: a filter program run on each socket
INET_DIAG_INFO = 2  # reply attribute: struct tcp_info; requested by bit (INFO - 1) in idiag_ext
INET_DIAG_EXT_INFO = 1 << (INET_DIAG_INFO - 1)

# struct inet_diag_msg (inet_diag.h), 72 bytes, of which we read:
#   0  __u8 idiag_family; 1 __u8 idiag_state; (2 timer, 3 retrans)
#   4  struct inet_diag_sockid { 4 __be16 sport; 6 __be16 dport; 8 __be32 src[4];
#                                24 __be32 dst[4]; 40 __u32 if; 44 __u32 cookie[2]; }
#   52 __u32 idiag_expires; 56 __u32 idiag_rqueue; 60 __u32 idiag_wqueue; 64 uid; 68 inode
# Ports are network byte order (swapped with ntohs), the queues host order. For established
# sockets rqueue is the unread bytes (rcv_nxt - copied_seq), wqueue the unacknowledged bytes
# (write_seq - snd_una) (net/ipv4/tcp_diag.c, tcp_diag_get_info). The cookie is a unique id
# of the socket, read as one opaque 64-bit key. The IPv4 form reads only the first 4 bytes of
# the peer address.
INET_DIAG_MSG_LEN = 72
INET_DIAG_MSG_V4 = struct.Struct("=BBxxHH16x4s12x4xQ4xII")
INET_DIAG_MSG_V6 = struct.Struct("=BBxxHH16x16s4xQ4xII")

# struct tcp_info (include/uapi/linux/tcp.h), host byte order. Offsets checked against the
# header with offsetof(). The kernel sends its own sizeof(struct tcp_info): older kernels send
# less, newer ones more, so every field is read only when the attribute is long enough.
#   0   8 x __u8 (state, ca_state, retransmits, probes, backoff, options, wscales, flags)
#   8   __u32 rto, ato, snd_mss, rcv_mss, unacked, sacked, lost, retrans, fackets (to 44)
#   44  __u32 tcpi_last_data_sent   ms since data was last sent (jiffies resolution)
#   48  __u32 tcpi_last_ack_sent    (not read)
#   52  __u32 tcpi_last_data_recv   ms since data was last received (jiffies resolution)
#   120 __u64 tcpi_bytes_acked      kernel >= 4.1 (RFC 4898 tcpEStatsAppHCThruOctetsAcked)
#   128 __u64 tcpi_bytes_received   kernel >= 4.1 (RFC 4898 tcpEStatsAppHCThruOctetsReceived)
# Both "last" values count from the connection's creation when no data has moved yet.
# The two "last" times, in every tcp_info since Linux 2.6.
TCPI_LAST_DATA = struct.Struct("=44xI4xI")
# The same, plus tcpi_bytes_acked and tcpi_bytes_received, when tcp_info reaches that far.
TCPI_LAST_DATA_AND_BYTES = struct.Struct("=44xI4xI64xQQ")

# inet_diag bytecode (inet_diag.h, interpreted by net/ipv4/inet_diag.c, inet_diag_bc_run):
# struct inet_diag_bc_op { __u8 code; __u8 yes; __u16 no; }. The program runs op by op; a true
# condition advances by `yes` bytes, a false one by `no` bytes. The socket matches when the
# program ends exactly at its last byte, and is rejected when a jump lands 4 bytes beyond it.
# A port comparison is followed by a second op whose `no` holds the port (host byte order).
# S_GE/S_LE exist since the first inet_diag (S_EQ/D_EQ came years later), so ranges use them.
INET_DIAG_BC_OP = struct.Struct("=BBH")
INET_DIAG_BC_JMP = 1
INET_DIAG_BC_S_GE = 2
INET_DIAG_BC_S_LE = 3
# A port range [lo, hi] compiles to 16 bytes: S_GE, lo, S_LE, hi; ranges are OR-ed with a 4-byte
# JMP-to-accept after each range but the last.
BC_RANGE_BYTES = 16
BC_JMP_BYTES = 4
# MAX_PORT_RANGES keeps the program well inside the 16-bit attribute length; the configuration
# refuses more at start-up (agent.config), with this module's own merging of ports into ranges.

# One datagram of a dump reply is at most 32 KiB (net/netlink/af_netlink.c caps the dump skb at
# SZ_32K, sized from the largest buffer the reader ever offered). 64 KiB always holds one, so a
# single preallocated buffer is reused for every datagram: no copies, no growth, whatever the
# number of sockets. MSG_TRUNC makes recv report a longer datagram instead of cutting it.
RECV_BUFFER_BYTES = 64 * 1024
# Socket receive buffer: room for a few datagrams queued by the kernel while we parse.
SO_RCVBUF_BYTES = 1024 * 1024
# A dump of 10,000 sockets takes tens of ms; a poll that takes seconds means a stuck kernel
# reply, and the drain must not hang on it. The poll raises TimeoutError (an OSError) instead.
POLL_TIMEOUT_SECONDS = 2.0

# Peer addresses are decoded once and reused: ipaddress objects cost ~1 us each, and thousands
# of connections usually come from a few hundred peers. Cleared when it grows past this.
PEER_CACHE_MAX = 65536

# An IPv4 peer of a dual-stack (AF_INET6) listener appears as ::ffff:a.b.c.d.
IPV4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"

PROC_NET_FILES: tuple[tuple[str, int], ...] = (("net/tcp", 4), ("net/tcp6", 16))

# Kernel quirk, both paths: neither a netlink dump nor a /proc/net/tcp read is a snapshot. The
# kernel hands the table out in chunks (a 32 KiB datagram, a 4 KiB page of text) and resumes
# each chunk at "hash bucket b, n-th socket in it". When another socket in that bucket comes or
# goes between two chunks (any connection in the pod opening or closing), an entry is repeated
# or skipped. Repeats were seen on /proc under normal load; they are removed by socket identity
# (the netlink cookie, the /proc address pair). A skipped socket is back on the next poll.


@dataclass(frozen=True, slots=True)
class SocketSample:
    """One TCP connection on a watched port, as the kernel saw it at ``Poll.taken_at``.

    Frozen so that a poll can be shared between the drain loop, metrics and logs without copies.
    """

    local_port: int
    peer: ipaddress.IPv4Address | ipaddress.IPv6Address
    """IPv4-mapped IPv6 peers (dual-stack listeners) are given as IPv4 addresses."""
    peer_port: int
    state: str
    """Kernel state name: "ESTABLISHED", "CLOSE_WAIT", "FIN_WAIT1", ..."""
    receive_queue: int
    """Bytes received but not yet read by the app (idiag_rqueue): a request waiting for it."""
    send_queue: int
    """Bytes sent but not yet acknowledged by the peer (idiag_wqueue): a response in flight."""
    last_data_received_ms: int | None
    """ms between the last data received and the poll (kernel jiffies resolution, 1-10 ms).

    For a connection that never received data, its age. ``None`` on the /proc path.
    """
    last_data_sent_ms: int | None
    """ms between the last data sent and the poll (tcpi_last_data_sent), like the above.

    For a connection that never sent data, its age. ``None`` on the /proc path. Received more
    recently than sent (``last_data_received_ms < last_data_sent_ms``, with bytes received):
    the app has read a request and not answered it yet.
    """
    bytes_received: int | None
    """Bytes received over the connection's life; ``None`` on /proc or kernels before 4.1."""
    bytes_acked: int | None = None
    """Bytes the app sent that the peer acknowledged; ``None`` on /proc or kernels before 4.1.
    Zero with bytes received: a first request the app has not answered yet (the two "last data"
    times cannot tell, as connection and request arrive within the same millisecond)."""


@dataclass(frozen=True, slots=True)
class Poll:
    """The watched sockets at one instant."""

    taken_at: float
    """``time.monotonic()`` just before the kernel request: ``last_data_received_ms`` and
    ``last_data_sent_ms`` count back from this instant, so ``taken_at - ms / 1000`` is when data
    last arrived (or left)."""
    sockets: tuple[SocketSample, ...]
    missed: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    """Peers of connections to a watched port that opened and closed since the previous poll
    without ever being seen open (found in TIME_WAIT): traffic the app had meanwhile."""
    unaccounted_opens: int = 0
    """Connections the kernel accepted in this network namespace since the previous poll that
    nothing seen accounts for (a client closed first, between two polls): traffic, of which the
    port and peer are unknown. Always 0 on the /proc path and on the first poll."""


@runtime_checkable
class SocketWatcher(Protocol):
    """What the drain needs from a watcher: a synchronous poll taking a few milliseconds.

    ``poll`` blocks for at most a couple of seconds (then raises ``TimeoutError``); call it from
    a thread (``asyncio.to_thread``) if the event loop must never stall. Not thread-safe: one
    poll at a time per watcher.
    """

    source: str
    """``"netlink"`` or ``"proc"``: which way the kernel is asked; worth a log line."""

    def poll(self) -> Poll: ...

    def close(self) -> None: ...


# The one speed trick in the netlink loop (_read_dump): a sample is built by setting its slots
# directly instead of calling SocketSample(...). The frozen dataclass __init__ makes one
# object.__setattr__ call per field, about twice the cost of the slot setters, and per socket
# that difference is what keeps a poll inside its CPU budget (bench/bench_sockdiag.py) on a
# small, busy sidecar CPU. Same object and values either way (tests compare netlink samples
# with SocketSample(...)).
# Keyed by field name, so the order of the fields does not matter here; a new field must be
# set in _read_dump too, or reading it raises AttributeError.
_SLOT_SETTERS = {name: getattr(SocketSample, name).__set__ for name in SocketSample.__slots__}


def _normalise_ports(ports: Iterable[int]) -> frozenset[int]:
    """Validate the ports once, at construction, so that a typo fails at start-up, not at drain."""
    result: set[int] = set()
    for port in ports:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"not a TCP port: {port!r}")
        result.add(port)
    if not result:
        raise ValueError("at least one port to watch is required")
    return frozenset(result)


def _port_ranges(ports: frozenset[int]) -> list[tuple[int, int]]:
    """Merge consecutive ports into ranges: one bytecode test per range instead of per port."""
    return port_ranges(ports)


def _build_port_filter(ports: frozenset[int]) -> bytes:
    """Compile "local port is one of `ports`" to inet_diag bytecode, run by the kernel per socket.

    Layout, for ranges r0..rn (offsets relative to each op; L = total length):

        r_i:  S_GE yes=8  no=20  | op(no=lo) | S_LE yes=8  no=12 | op(no=hi)   -- 16 bytes
              JMP  yes=4  no=to the end (accept)                              -- not after r_n

    A failed test jumps to the start of the next range, which is 20 bytes on from S_GE and 12 on
    from S_LE; for the last range that same distance lands 4 bytes past the end: reject. The
    kernel's verifier (inet_diag_bc_audit) walks the `yes` chain, so every op's `yes` goes to the
    next op, and every `no` must land on an op boundary or exactly at L or L + 4.
    """
    ranges = _port_ranges(ports)
    if len(ranges) > MAX_PORT_RANGES:
        raise ValueError(f"too many port ranges ({len(ranges)} > {MAX_PORT_RANGES})")
    total = len(ranges) * (BC_RANGE_BYTES + BC_JMP_BYTES) - BC_JMP_BYTES
    program = bytearray()
    for index, (low, high) in enumerate(ranges):
        program += INET_DIAG_BC_OP.pack(INET_DIAG_BC_S_GE, 8, BC_RANGE_BYTES + BC_JMP_BYTES)
        program += INET_DIAG_BC_OP.pack(0, 0, low)
        program += INET_DIAG_BC_OP.pack(INET_DIAG_BC_S_LE, 8, 8 + BC_JMP_BYTES)
        program += INET_DIAG_BC_OP.pack(0, 0, high)
        if index < len(ranges) - 1:
            program += INET_DIAG_BC_OP.pack(INET_DIAG_BC_JMP, 4, total - len(program))
    assert len(program) == total
    return bytes(program)


def _build_request(family: int, bytecode: bytes, states_mask: int) -> bytearray:
    """One SOCK_DIAG_BY_FAMILY dump request; the sequence number is patched in per poll."""
    attribute = NLATTR.pack(NLATTR.size + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    body = (
        INET_DIAG_REQ_V2.pack(family, socket.IPPROTO_TCP, INET_DIAG_EXT_INFO, states_mask)
        + attribute
    )
    header = NLMSGHDR.pack(
        NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 0, 0
    )
    return bytearray(header + body)


def _decode_peer(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """4 or 16 network-order bytes to an address; IPv4-mapped IPv6 becomes plain IPv4."""
    if len(raw) == 16 and raw[:12] == IPV4_MAPPED_PREFIX:
        return ipaddress.IPv4Address(raw[12:])
    return ipaddress.ip_address(raw)


class PassiveOpens:
    """Reads TCP PassiveOpens (connections accepted) of this network namespace, /proc/net/snmp.

    The file is kept open and re-read from offset 0 (the kernel regenerates it on each read):
    one pread of ~1.5 KB per poll.
    """

    def __init__(self, proc_root: str = "/proc") -> None:
        self._fd = os.open(os.path.join(proc_root, "self", PROC_NET_SNMP), os.O_RDONLY)
        try:
            header, _ = self._tcp_lines()
            self._index = header.index(b"PassiveOpens")
        except BaseException:
            os.close(self._fd)
            raise

    def _tcp_lines(self) -> tuple[list[bytes], list[bytes]]:
        data = os.pread(self._fd, 16384, 0)
        lines = [line.split() for line in data.splitlines() if line.startswith(b"Tcp:")]
        if len(lines) < 2:
            raise OSError("no Tcp: lines in /proc/net/snmp")
        return lines[0], lines[1]

    def read(self) -> int:
        return int(self._tcp_lines()[1][self._index])

    def close(self) -> None:
        os.close(self._fd)


class NetlinkWatcher:
    """Polls the kernel over NETLINK_SOCK_DIAG: filtered in the kernel, with tcp_info.

    One netlink socket is kept open between polls. If a poll fails half-way (timeout, error),
    the socket is dropped, so that the rest of an unread reply cannot be mistaken for the next
    poll's; the next poll opens a fresh one.
    """

    source: str = "netlink"

    def __init__(
        self,
        ports: Iterable[int],
        *,
        own_accepts: Callable[[], int] | None = None,
        count_accepts: bool = True,
        proc_root: str = "/proc",
    ) -> None:
        """Open the netlink socket now: a kernel or sandbox without it fails here (OSError).

        ``own_accepts``: how many connections the agent's own listener has accepted so far
        (they share the pod's PassiveOpens count). ``count_accepts=False`` leaves PassiveOpens
        out (hostNetwork pods, whose count is the node's). ``proc_root``: where ``net/snmp`` is
        read (tests).
        """
        self.ports: frozenset[int] = _normalise_ports(ports)
        self._own_accepts = own_accepts or (lambda: 0)
        self._count_accepts = count_accepts
        self._proc_root = proc_root
        self._snmp: PassiveOpens | None = None
        # Cookies of the sockets of the last SEEN_MEMORY_POLLS polls, newest last.
        self._recent: list[set[int]] = []
        self._opens_at_start = self._own_at_start = 0
        self._accounted = 0
        self._unaccounted_high = 0
        bytecode = _build_port_filter(self.ports)
        # AF_UNSPEC is not accepted (sock_diag dispatches on the family), and the kernel walks
        # its whole socket table per request, so one request per family.
        self._requests: tuple[tuple[int, bytearray], ...] = (
            (socket.AF_INET, _build_request(socket.AF_INET, bytecode, DUMP_STATES_MASK)),
            (socket.AF_INET6, _build_request(socket.AF_INET6, bytecode, DUMP_STATES_MASK)),
        )
        self._buffer = bytearray(RECV_BUFFER_BYTES)
        self._peers: dict[bytes, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
        self._seq = 0
        self._sock: socket.socket | None = None
        self._sock = self._open()

    @staticmethod
    def _open() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SO_RCVBUF_BYTES)
            sock.settimeout(POLL_TIMEOUT_SECONDS)
            sock.bind((0, 0))  # let the kernel pick our netlink port id
        except BaseException:
            sock.close()
            raise
        return sock

    def poll(self) -> Poll:
        """Dump the watched sockets of both address families; raises OSError on failure."""
        sock = self._sock if self._sock is not None else self._open()
        self._sock = sock
        samples: list[SocketSample] = []
        seen: set[int] = set()
        closed: dict[int, bytes] = {}
        # Read before the dump: a connection opened in between is seen before it is counted,
        # which the running maximum in _account absorbs (never the other way round).
        opens: int | None = None
        if self._count_accepts:
            if self._snmp is None:
                self._snmp = PassiveOpens(self._proc_root)
            opens = self._snmp.read()
        own = self._own_accepts()
        taken_at = time.monotonic()
        try:
            for family, request in self._requests:
                sent_at = time.monotonic()
                self._seq = (self._seq + 1) & 0xFFFFFFFF
                struct.pack_into("=I", request, 8, self._seq)  # nlmsghdr.nlmsg_seq
                sock.send(request)
                # tcpi_last_data_recv/_sent count back from when the kernel reads each socket, i.e.
                # from sent_at or later. Rebase the second family's values onto taken_at so the
                # whole poll has one reference instant (clamped at 0: data that arrived between
                # the two requests is "now").
                rebase_ms = round((sent_at - taken_at) * 1000)
                self._read_dump(sock, family, self._seq, rebase_ms, samples, seen, closed)
        except BaseException:
            self._drop_socket()
            raise
        missed, unaccounted = self._account(seen, closed, opens, own)
        return Poll(taken_at, tuple(samples), missed, unaccounted)

    def _account(
        self, seen: set[int], closed: dict[int, bytes], opens: int | None, own: int
    ) -> tuple[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...], int]:
        """Which connections happened since the last poll without being seen open.

        * In TIME_WAIT and not seen recently: it opened and closed in between (``missed``).
        * Every new socket, open or closed, accounts for one accepted connection; so does every
          connection the agent itself accepted. Accepted connections beyond those were missed
          too (``unaccounted``). Counting is cumulative with a running maximum: a connection
          seen in a dump before the counter read shows it makes the difference dip for one
          poll, and must not hide a missed one later.
        """
        everything = seen.union(closed)
        if not self._recent:  # first poll: what exists now existed before the drain
            self._recent = [everything]
            self._opens_at_start, self._own_at_start = opens or 0, own
            return (), 0
        new = everything.difference(*self._recent)
        self._recent.append(everything)
        del self._recent[:-SEEN_MEMORY_POLLS]
        missed = tuple(self._peer(closed[cookie]) for cookie in closed.keys() & new)
        if opens is None:
            return missed, 0
        self._accounted += len(new)
        passive_opens = opens - self._opens_at_start
        unaccounted_now = passive_opens - (own - self._own_at_start) - self._accounted
        unaccounted = 0
        if unaccounted_now > self._unaccounted_high:
            unaccounted = unaccounted_now - self._unaccounted_high
            self._unaccounted_high = unaccounted_now
        return missed, unaccounted

    def _peer(self, raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        peer = self._peers.get(raw)
        if peer is None:
            if len(self._peers) >= PEER_CACHE_MAX:
                self._peers.clear()
            peer = self._peers[raw] = _decode_peer(raw)
        return peer

    def _read_dump(
        self,
        sock: socket.socket,
        family: int,
        seq: int,
        rebase_ms: int,
        out: list[SocketSample],
        seen: set[int],
        closed: dict[int, bytes],
    ) -> None:
        """Read one multi-part reply into `out`, datagram by datagram, until NLMSG_DONE.

        A datagram holds several netlink messages. Each SOCK_DIAG_BY_FAMILY message is one
        socket: a fixed struct inet_diag_msg, then attributes (struct nlattr + payload), one of
        which is tcp_info (INET_DIAG_INFO). The inner loop runs once per socket, so structs and
        helpers are bound to local names first (a plain CPython speed-up), and it stays one
        function, longer than the 60 lines tests/test_code_shape.py allows elsewhere: a helper
        call per socket is what the poll's CPU budget cannot spare.
        """
        buffer = self._buffer
        peers = self._peers
        unpack_header = NLMSGHDR.unpack_from
        unpack_attr = NLATTR.unpack_from
        msg_struct = INET_DIAG_MSG_V4 if family == socket.AF_INET else INET_DIAG_MSG_V6
        unpack_msg = msg_struct.unpack_from
        unpack_last_and_bytes = TCPI_LAST_DATA_AND_BYTES.unpack_from
        unpack_last = TCPI_LAST_DATA.unpack_from
        ntohs = socket.ntohs
        states = TCP_STATE_NAMES
        new_sample = object.__new__  # see _SLOT_SETTERS
        set_local_port = _SLOT_SETTERS["local_port"]
        set_peer = _SLOT_SETTERS["peer"]
        set_peer_port = _SLOT_SETTERS["peer_port"]
        set_state = _SLOT_SETTERS["state"]
        set_receive_queue = _SLOT_SETTERS["receive_queue"]
        set_send_queue = _SLOT_SETTERS["send_queue"]
        set_last_data_received_ms = _SLOT_SETTERS["last_data_received_ms"]
        set_last_data_sent_ms = _SLOT_SETTERS["last_data_sent_ms"]
        set_bytes_received = _SLOT_SETTERS["bytes_received"]
        set_bytes_acked = _SLOT_SETTERS["bytes_acked"]
        header_len = NLMSGHDR.size
        attr_header_len = NLATTR.size
        attrs_from = header_len + INET_DIAG_MSG_LEN  # attributes follow inet_diag_msg
        while True:
            size = sock.recv_into(buffer, 0, socket.MSG_TRUNC)
            if size > len(buffer):
                raise OSError(f"netlink datagram of {size} bytes exceeds the receive buffer")
            if size == 0:
                raise OSError("netlink socket returned no data")
            offset = 0
            finished = False
            while offset + header_len <= size:
                msg_len, msg_type, msg_flags, msg_seq, _pid = unpack_header(buffer, offset)
                if msg_len < header_len or offset + msg_len > size:
                    raise OSError(f"malformed netlink message (length {msg_len})")
                end = offset + msg_len
                next_offset = offset + ((msg_len + 3) & ~3)  # messages are 4-byte aligned
                if msg_seq != seq:
                    pass  # left over from an earlier request; never ours to parse
                elif msg_type == SOCK_DIAG_BY_FAMILY and msg_len >= attrs_from:
                    if not msg_flags & NLM_F_MULTI:
                        finished = True
                    _fam, state, sport, dport, raw_peer, cookie, rqueue, wqueue = unpack_msg(
                        buffer, offset + header_len
                    )
                    # Find the tcp_info attribute: walk the attributes, each padded to 4 bytes.
                    info_at = info_len = -1
                    attr = offset + attrs_from
                    while attr + attr_header_len <= end:
                        attr_len, attr_type = unpack_attr(buffer, attr)
                        if attr_len < attr_header_len:
                            break  # malformed; the kernel never sends this
                        if attr_type == INET_DIAG_INFO:
                            info_at = attr + attr_header_len
                            info_len = attr_len - attr_header_len
                            break
                        attr += (attr_len + 3) & ~3
                    if info_at < 0:
                        # No tcp_info: a time-wait mini-socket (TIME_WAIT, or an orphaned
                        # FIN_WAIT2) that the app has already closed, not a connection it
                        # serves. Only remembered, for _account.
                        closed[cookie] = raw_peer
                        offset = next_offset
                        continue
                    if cookie in seen:
                        # A repeat, see the kernel quirk at PROC_NET_FILES.
                        offset = next_offset
                        continue
                    seen.add(cookie)
                    # The kernel sends its own sizeof(struct tcp_info): read what it has.
                    if info_len >= TCPI_LAST_DATA_AND_BYTES.size:
                        sent_ms, received_ms, acked, received = unpack_last_and_bytes(
                            buffer, info_at
                        )
                    elif info_len >= TCPI_LAST_DATA.size:  # kernel < 4.1: no byte count
                        sent_ms, received_ms = unpack_last(buffer, info_at)
                        acked = received = None
                    else:
                        sent_ms = received_ms = acked = received = None
                    # Count back from the poll's taken_at (see poll); clamp at 0.
                    if sent_ms is not None:
                        sent_ms = sent_ms - rebase_ms if sent_ms > rebase_ms else 0
                    if received_ms is not None:
                        received_ms = received_ms - rebase_ms if received_ms > rebase_ms else 0
                    peer = peers.get(raw_peer)
                    if peer is None:
                        if len(peers) >= PEER_CACHE_MAX:
                            peers.clear()
                        peer = peers[raw_peer] = _decode_peer(raw_peer)
                    # SocketSample(...) without its __init__: see _SLOT_SETTERS for why.
                    sample = new_sample(SocketSample)
                    set_local_port(sample, ntohs(sport))
                    set_peer(sample, peer)
                    set_peer_port(sample, ntohs(dport))
                    set_state(sample, states[state] if state < len(states) else str(state))
                    set_receive_queue(sample, rqueue)
                    set_send_queue(sample, wqueue)
                    set_last_data_received_ms(sample, received_ms)
                    set_last_data_sent_ms(sample, sent_ms)
                    set_bytes_received(sample, received)
                    set_bytes_acked(sample, acked)
                    out.append(sample)
                elif msg_type == NLMSG_DONE:
                    finished = True
                    if msg_len >= header_len + NLMSG_ERRNO.size:
                        # A dump that failed part-way says so here (negative errno).
                        errno = NLMSG_ERRNO.unpack_from(buffer, offset + header_len)[0]
                        if errno < 0:
                            raise OSError(-errno, os.strerror(-errno))
                elif msg_type == NLMSG_ERROR:
                    errno = NLMSG_ERRNO.unpack_from(buffer, offset + header_len)[0]
                    if errno < 0:
                        # e.g. ENOENT: no inet_diag module; EINVAL: bytecode rejected.
                        raise OSError(-errno, os.strerror(-errno))
                    finished = True  # errno 0 is an acknowledgement: nothing more follows
                offset = next_offset
            if finished:
                return

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        """Close the netlink socket and /proc/net/snmp; a later poll would reopen them."""
        self._drop_socket()
        if self._snmp is not None:
            self._snmp.close()
            self._snmp = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ProcWatcher:
    """Fallback: parses /proc/net/tcp and /proc/net/tcp6 (counts and queues, no last-data).

    Costs more than netlink (the kernel formats every socket of the namespace as text, and we
    filter afterwards), and cannot tell when data last moved: ``last_data_received_ms``,
    ``last_data_sent_ms`` and ``bytes_received`` are ``None``.
    """

    source: str = "proc"

    def __init__(self, ports: Iterable[int], proc_root: str = "/proc") -> None:
        """`proc_root` lets tests use crafted files; /proc/net is our network namespace's."""
        self.ports: frozenset[int] = _normalise_ports(ports)
        self._paths = tuple(
            (os.path.join(proc_root, name), width) for name, width in PROC_NET_FILES
        )
        # The files print the local port as 4 upper-case hex digits: compare text, parse only
        # the lines that match.
        self._port_hex: frozenset[bytes] = frozenset(b"%04X" % port for port in self.ports)
        self._peers: dict[bytes, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}

    def poll(self) -> Poll:
        """Read both files; a missing tcp6 (IPv6 disabled) is fine, a missing tcp is an error."""
        taken_at = time.monotonic()
        samples: list[SocketSample] = []
        seen: set[bytes] = set()
        for path, width in self._paths:
            try:
                with open(path, "rb", buffering=0) as file:
                    data = file.readall()
            except FileNotFoundError:
                if width == 16:
                    continue
                raise
            self._parse(data, samples, seen)
        return Poll(taken_at, tuple(samples))

    def _parse(self, data: bytes, out: list[SocketSample], seen: set[bytes]) -> None:
        """Parse one file. Line format (net/ipv4/tcp_ipv4.c, get_tcp4_sock; tcp6 alike):

        ``sl: LOCAL:PORT REMOTE:PORT st tx_queue:rx_queue tr:tm->when retrnsmt uid ...``

        Addresses are the in-memory (network-order) words printed as host-order hex ``%08X``;
        ports and state are hex; tx_queue / rx_queue are what netlink calls wqueue / rqueue.
        """
        port_hex = self._port_hex
        peers = self._peers
        states = TCP_STATE_NAMES
        watched = WATCHED_STATES
        for line in data.splitlines()[1:]:  # the first line is the column header
            fields = line.split(None, 6)
            if len(fields) < 6:
                continue
            local = fields[1]
            if local[-4:] not in port_hex:
                continue
            state = int(fields[3], 16)
            if state not in watched:
                continue
            if int(fields[5][:2], 16) == PROC_TIMER_TIME_WAIT:
                continue  # time-wait mini-socket, see PROC_TIMER_TIME_WAIT
            remote = fields[2]
            identity = local + remote
            if identity in seen:  # a repeat, see the kernel quirk at PROC_NET_FILES
                continue
            seen.add(identity)
            raw_host, _, raw_port = remote.partition(b":")
            peer = peers.get(raw_host)
            if peer is None:
                if len(peers) >= PEER_CACHE_MAX:
                    peers.clear()
                peer = peers[raw_host] = _decode_peer(_proc_address(raw_host))
            tx_queue, _, rx_queue = fields[4].partition(b":")
            out.append(
                SocketSample(
                    int(local[-4:], 16),
                    peer,
                    int(raw_port, 16),
                    states[state],
                    int(rx_queue, 16),
                    int(tx_queue, 16),
                    None,
                    None,
                    None,
                )
            )

    def close(self) -> None:
        """Nothing is held open between polls; present for the SocketWatcher interface."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _proc_address(text: bytes) -> bytes:
    """/proc hex address to network-order bytes: each 32-bit word was printed in host order."""
    words = [int(text[i : i + 8], 16) for i in range(0, len(text), 8)]
    return struct.pack(f"={len(words)}I", *words)


def open_watcher(
    ports: Iterable[int],
    *,
    force_proc: bool = False,
    own_accepts: Callable[[], int] | None = None,
    count_accepts: bool = True,
) -> SocketWatcher:
    """netlink when available, else /proc (the caller logs which, from .source).

    "Available" is proven by one real poll, not just by opening the socket: a kernel without the
    inet_diag module, or a sandbox that accepts the socket but not the request, fails there.
    A ValueError (bad ports) is not a reason to fall back and propagates.
    """
    port_set = _normalise_ports(ports)
    if not force_proc:
        try:
            watcher = NetlinkWatcher(port_set, own_accepts=own_accepts, count_accepts=count_accepts)
        except OSError:
            pass
        else:
            try:
                watcher.poll()
            except OSError:
                watcher.close()
            else:
                return watcher
    return ProcWatcher(port_set)


# Sockets only a living process holds: its listener, and connections it has not closed. (Once a
# process exits, its closed connections linger as orphans in FIN_WAIT1/FIN_WAIT2/LAST_ACK for up
# to a minute; those say nothing about the app.)
APP_ALIVE_STATES: frozenset[bytes] = frozenset(
    b"%02X" % TCP_STATE_NAMES.index(name) for name in ("LISTEN", "ESTABLISHED", "CLOSE_WAIT")
)


def app_is_up(ports: Iterable[int], proc_root: str = "/proc") -> bool:
    """Does anything in our network namespace still listen on, or hold an open connection on,
    one of ``ports``?

    After the drain of a classic sidecar the agent waits for the app to exit. Spring Boot closes
    its listener the instant it gets SIGTERM and then finishes its requests, so the listener alone
    would say "gone" too early; its open connections are the rest of its life. Read from
    /proc/net/tcp and tcp6, which list every socket of the namespace whatever process holds it.
    """
    port_hex = {b"%04X" % port for port in _normalise_ports(ports)}
    for name, width in PROC_NET_FILES:
        try:
            with open(os.path.join(proc_root, name), "rb") as file:
                lines = file.read().splitlines()[1:]
        except FileNotFoundError:
            if width == 16:
                continue  # IPv6 disabled
            raise
        for line in lines:
            fields = line.split(None, 4)
            if len(fields) > 3 and fields[3] in APP_ALIVE_STATES and fields[1][-4:] in port_hex:
                return True
    return False
