"""The socket watcher against real loopback TCP connections (IPv4 and IPv6).

Every test opens its own listeners on ephemeral ports and watches only those, so sockets of
other processes on the machine never count. Kernel state changes (a FIN, data arriving) are
asynchronous to the syscalls that cause them, so tests poll until the expected state shows up,
with a deadline, rather than sleeping a guessed time.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.drain import sockdiag
from agent.drain.sockdiag import (
    NetlinkWatcher,
    Poll,
    ProcWatcher,
    SocketSample,
    SocketWatcher,
    app_is_up,
    open_watcher,
)
from tests.harness.support import free_port

IPv4 = ipaddress.IPv4Address
LOCALHOST_V4 = IPv4("127.0.0.1")
LOCALHOST_V6 = ipaddress.IPv6Address("::1")
SETTLE_SECONDS = 3.0


def _ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_available(), reason="no IPv6 loopback (::1)")


class Endpoints:
    """Listeners and connections opened by one test, all closed at its end."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()

    def listen(
        self, host: str = "127.0.0.1", port: int = 0, *, v6only: bool = True
    ) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = self._stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        listener.bind((host, port))
        listener.listen(128)
        return listener

    def connect(
        self, listener: socket.socket, host: str | None = None
    ) -> tuple[socket.socket, socket.socket]:
        """A connected (client, server-side) pair; the server side is accepted."""
        address = listener.getsockname()
        target = (host or address[0], address[1])
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        client = self._stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
        client.connect(target)
        server, _ = listener.accept()
        self._stack.enter_context(server)
        return client, server

    def close(self) -> None:
        self._stack.close()


@pytest.fixture
def endpoints() -> Iterator[Endpoints]:
    opened = Endpoints()
    yield opened
    opened.close()


WATCHERS: dict[str, Callable[[list[int]], SocketWatcher]] = {
    "netlink": NetlinkWatcher,
    "proc": ProcWatcher,
}


@pytest.fixture(params=sorted(WATCHERS))
def make_watcher(request: pytest.FixtureRequest) -> Iterator[Callable[..., SocketWatcher]]:
    """Both implementations, for the behaviour they must share."""
    opened: list[SocketWatcher] = []

    def make(ports: list[int]) -> SocketWatcher:
        watcher = WATCHERS[request.param](ports)
        opened.append(watcher)
        return watcher

    yield make
    for watcher in opened:
        watcher.close()


def poll_until(
    watcher: SocketWatcher, condition: Callable[[Poll], bool], timeout: float = SETTLE_SECONDS
) -> Poll:
    """Poll until `condition` holds; fail with the last poll if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        result = watcher.poll()
        if condition(result):
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s; last poll: {result.sockets}")
        time.sleep(0.01)


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def only(result: Poll) -> SocketSample:
    assert len(result.sockets) == 1, result.sockets
    return result.sockets[0]


# --- what is reported ----------------------------------------------------------------------


def test_ipv4_connection_is_reported_with_ports_peer_and_state(
    endpoints: Endpoints, make_watcher: Callable[..., SocketWatcher]
) -> None:
    listener = endpoints.listen("127.0.0.1")
    client, _server = endpoints.connect(listener)
    watcher = make_watcher([port_of(listener)])

    sample = only(watcher.poll())

    assert sample.local_port == port_of(listener)
    assert sample.peer == LOCALHOST_V4
    assert isinstance(sample.peer, ipaddress.IPv4Address)
    assert sample.peer_port == port_of(client)
    assert sample.state == "ESTABLISHED"


@needs_ipv6
def test_ipv6_connection_is_reported(
    endpoints: Endpoints, make_watcher: Callable[..., SocketWatcher]
) -> None:
    listener = endpoints.listen("::1")
    client, _server = endpoints.connect(listener)
    watcher = make_watcher([port_of(listener)])

    sample = only(watcher.poll())

    assert sample.local_port == port_of(listener)
    assert sample.peer == LOCALHOST_V6
    assert sample.peer_port == port_of(client)
    assert sample.state == "ESTABLISHED"


@needs_ipv6
def test_ipv4_peer_of_dual_stack_listener_is_reported_as_ipv4(
    endpoints: Endpoints, make_watcher: Callable[..., SocketWatcher]
) -> None:
    listener = endpoints.listen("::", v6only=False)  # what a JVM listening on *:8080 does
    client, server = endpoints.connect(listener, host="127.0.0.1")
    assert server.family == socket.AF_INET6  # the kernel socket is IPv6, peer ::ffff:127.0.0.1
    watcher = make_watcher([port_of(listener)])

    sample = only(watcher.poll())

    assert sample.peer == LOCALHOST_V4
    assert isinstance(sample.peer, ipaddress.IPv4Address)
    assert sample.peer_port == port_of(client)


def test_connection_on_another_port_and_client_sides_are_not_reported(
    endpoints: Endpoints, make_watcher: Callable[..., SocketWatcher]
) -> None:
    watched = endpoints.listen()
    other = endpoints.listen()
    endpoints.connect(watched)
    endpoints.connect(other)
    endpoints.connect(other)
    watcher = make_watcher([port_of(watched)])

    result = watcher.poll()

    # One server-side socket; not the client side (whose *peer* port is the watched one), not
    # the two connections of the other listener.
    assert [s.local_port for s in result.sockets] == [port_of(watched)]


def test_listening_socket_is_not_reported(make_watcher: Callable[..., SocketWatcher]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        watcher = make_watcher([port_of(listener)])
        assert watcher.poll().sockets == ()


def test_no_sockets_at_all_gives_an_empty_poll(
    make_watcher: Callable[..., SocketWatcher],
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        unused_port = port_of(listener)
    watcher = make_watcher([unused_port])  # nothing bound there now

    result = watcher.poll()

    assert result.sockets == ()
    assert isinstance(result.taken_at, float)


def _free_port_run(length: int) -> list[int]:
    """`length` consecutive ports that are all free (retries: another process may hold one)."""
    for _ in range(50):
        with socket.create_server(("127.0.0.1", 0)) as probe:
            first = port_of(probe)
        candidates = list(range(first, first + length))
        if candidates[-1] > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in candidates:
                    stack.enter_context(socket.create_server(("127.0.0.1", port)))
        except OSError:
            continue
        return candidates
    pytest.skip("no run of free consecutive ports")


@pytest.mark.parametrize(
    ("watched_indexes", "expected_indexes"),
    [
        pytest.param([0, 2], [0, 2], id="two-separate-ports-skip-the-one-between"),
        pytest.param([0, 1], [0, 1], id="adjacent-ports-merged-into-one-range"),
        pytest.param([0, 1, 3], [0, 1, 3], id="range-plus-single"),
    ],
)
def test_several_ports_at_once(
    endpoints: Endpoints,
    make_watcher: Callable[..., SocketWatcher],
    watched_indexes: list[int],
    expected_indexes: list[int],
) -> None:
    ports = _free_port_run(4)
    listeners = [endpoints.listen(port=port) for port in ports]
    for count, listener in enumerate(listeners, start=1):  # 1, 2, 3, 4 connections
        for _ in range(count):
            endpoints.connect(listener)
    watcher = make_watcher([ports[i] for i in watched_indexes])

    result = watcher.poll()

    seen = sorted(s.local_port for s in result.sockets)
    expected = sorted(ports[i] for i in expected_indexes for _ in range(i + 1))
    assert seen == expected


def test_close_wait_is_reported_when_the_client_closed_first(
    endpoints: Endpoints, make_watcher: Callable[..., SocketWatcher]
) -> None:
    listener = endpoints.listen()
    client, _server = endpoints.connect(listener)
    watcher = make_watcher([port_of(listener)])

    client.close()  # the app has not closed its side: a response could still be written

    result = poll_until(watcher, lambda p: [s.state for s in p.sockets] == ["CLOSE_WAIT"])
    assert only(result).local_port == port_of(listener)


def test_half_closed_fin_wait2_is_reported_but_orphaned_one_is_not(
    endpoints: Endpoints, make_watcher: Callable[..., SocketWatcher]
) -> None:
    listener = endpoints.listen()
    half_client, half_server = endpoints.connect(listener)
    _orphan_client, orphan_server = endpoints.connect(listener)
    watcher = make_watcher([port_of(listener)])

    half_server.shutdown(socket.SHUT_WR)  # app still holds it and may read the client's data
    orphan_server.close()  # app let go: the kernel keeps only a time-wait mini-socket

    result = poll_until(watcher, lambda p: [s.state for s in p.sockets] == ["FIN_WAIT2"])
    assert only(result).peer_port == port_of(half_client)


# --- netlink only: tcp_info and queues -----------------------------------------------------


def test_last_data_received_is_small_after_data_and_grows_while_idle(
    endpoints: Endpoints,
) -> None:
    listener = endpoints.listen()
    client, server = endpoints.connect(listener)
    with NetlinkWatcher([port_of(listener)]) as watcher:
        time.sleep(0.3)
        idle = only(watcher.poll())
        assert idle.last_data_received_ms is not None
        assert idle.last_data_received_ms >= 250  # no data yet: counts from the handshake

        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        fresh_poll = poll_until(watcher, lambda p: p.sockets[0].bytes_received == 18)
        fresh = only(fresh_poll)
        assert fresh.last_data_received_ms is not None
        assert fresh.last_data_received_ms < 200

        time.sleep(0.3)
        later_poll = watcher.poll()
        later = only(later_poll)
        assert later.last_data_received_ms is not None
        grown = later.last_data_received_ms - fresh.last_data_received_ms
        assert 250 <= grown <= 2000  # jiffies resolution, and a slow machine
        # The instant it counts back from: just before the poll's request.
        assert later_poll.taken_at - fresh_poll.taken_at >= 0.3
        assert server.recv(100) == b"GET / HTTP/1.1\r\n\r\n"


def test_data_sent_by_the_app_does_not_count_as_received(endpoints: Endpoints) -> None:
    listener = endpoints.listen()
    client, server = endpoints.connect(listener)
    with NetlinkWatcher([port_of(listener)]) as watcher:
        time.sleep(0.3)
        server.sendall(b"HTTP/1.1 200 OK\r\n\r\n")  # the client's ACK comes back at once
        result = poll_until(watcher, lambda p: p.sockets[0].send_queue == 0)
        assert client.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"

    sample = only(result)
    assert sample.last_data_received_ms is not None
    assert sample.last_data_received_ms >= 250  # not tcpi_last_data_sent nor last_ack_recv
    assert sample.bytes_received == 0
    assert sample.last_data_sent_ms is not None
    assert sample.last_data_sent_ms < 200  # but it is data sent


@pytest.mark.parametrize(
    "host", ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)], ids=["ipv4", "ipv6"]
)
def test_request_read_but_not_answered_then_answered(endpoints: Endpoints, host: str) -> None:
    """What the drain reads as a request in flight: data received after the last data sent."""
    listener = endpoints.listen(host)
    client, server = endpoints.connect(listener)
    with NetlinkWatcher([port_of(listener)]) as watcher:
        time.sleep(0.3)
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert server.recv(100) == b"GET / HTTP/1.1\r\n\r\n"  # read, not answered yet

        waiting = only(poll_until(watcher, lambda p: p.sockets[0].bytes_received == 18))
        assert waiting.last_data_received_ms is not None
        assert waiting.last_data_sent_ms is not None
        assert waiting.last_data_received_ms < waiting.last_data_sent_ms
        assert waiting.last_data_sent_ms >= 250  # nothing sent yet: the connection's age
        assert waiting.bytes_acked == 0  # the one fact that also works with no pause above

        time.sleep(0.1)  # the app works on it
        server.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        answered = only(poll_until(watcher, lambda p: p.sockets[0].send_queue == 0))
        assert client.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"

    assert answered.last_data_received_ms is not None
    assert answered.last_data_sent_ms is not None
    assert answered.last_data_sent_ms <= answered.last_data_received_ms
    assert answered.last_data_sent_ms < 200
    assert answered.bytes_received == 18
    assert answered.bytes_acked == len(b"HTTP/1.1 200 OK\r\n\r\n")


def test_poll_timestamp_is_taken_before_the_kernel_is_asked(endpoints: Endpoints) -> None:
    listener = endpoints.listen()
    endpoints.connect(listener)
    with NetlinkWatcher([port_of(listener)]) as watcher:
        before = time.monotonic()
        result = watcher.poll()
        after = time.monotonic()
    assert before <= result.taken_at <= after


def test_unread_data_shows_in_receive_queue(
    endpoints: Endpoints, make_watcher: Callable[..., SocketWatcher]
) -> None:
    listener = endpoints.listen()
    client, server = endpoints.connect(listener)
    watcher = make_watcher([port_of(listener)])

    client.sendall(b"x" * 1000)  # the app does not read it

    poll_until(watcher, lambda p: [s.receive_queue for s in p.sockets] == [1000])
    assert _drain(server) == 1000
    result = poll_until(watcher, lambda p: [s.receive_queue for s in p.sockets] == [0])
    assert only(result).send_queue == 0


def _drain(sock: socket.socket) -> int:
    """Read whatever is queued; returns how many bytes."""
    total = 0
    with contextlib.suppress(BlockingIOError):
        while chunk := sock.recv(65536, socket.MSG_DONTWAIT):
            total += len(chunk)
    return total


def test_bytes_received_counts_bytes(endpoints: Endpoints) -> None:
    listener = endpoints.listen()
    client, server = endpoints.connect(listener)
    with NetlinkWatcher([port_of(listener)]) as watcher:
        assert only(watcher.poll()).bytes_received == 0

        client.sendall(b"a" * 1234)
        poll_until(watcher, lambda p: p.sockets[0].bytes_received == 1234)
        client.sendall(b"b" * 766)
        result = poll_until(watcher, lambda p: p.sockets[0].bytes_received == 2000)

    assert only(result).receive_queue == 2000  # nothing read yet
    assert _drain(server) == 2000


def test_proc_watcher_sees_the_same_connections_as_netlink(endpoints: Endpoints) -> None:
    v4 = endpoints.listen("127.0.0.1")
    listeners = [v4]
    for _ in range(5):
        endpoints.connect(v4)
    if _ipv6_available():
        v6 = endpoints.listen("::1")
        listeners.append(v6)
        for _ in range(3):
            endpoints.connect(v6)
    closing_client, _ = endpoints.connect(v4)
    closing_client.close()
    ports = [port_of(listener) for listener in listeners]

    def key(sample: SocketSample) -> tuple[object, ...]:
        return (sample.local_port, sample.peer, sample.peer_port, sample.state)

    with NetlinkWatcher(ports) as netlink, ProcWatcher(ports) as proc:
        netlink_result = poll_until(netlink, lambda p: "CLOSE_WAIT" in {s.state for s in p.sockets})
        proc_result = proc.poll()

    assert len(netlink_result.sockets) == len(proc_result.sockets) == 6 + 3 * (len(ports) - 1)
    assert sorted(map(key, netlink_result.sockets), key=str) == sorted(
        map(key, proc_result.sockets), key=str
    )
    assert all(s.last_data_received_ms is None for s in proc_result.sockets)
    assert all(s.last_data_sent_ms is None for s in proc_result.sockets)
    assert all(s.bytes_received is None for s in proc_result.sockets)
    assert all(s.last_data_received_ms is not None for s in netlink_result.sockets)
    assert all(s.last_data_sent_ms is not None for s in netlink_result.sockets)


# --- choosing the watcher ------------------------------------------------------------------


def test_open_watcher_uses_netlink_here_and_proc_when_forced() -> None:
    netlink = open_watcher([8080])
    proc = open_watcher([8080], force_proc=True)
    try:
        assert netlink.source == "netlink"
        assert isinstance(netlink, NetlinkWatcher)
        assert proc.source == "proc"
        assert isinstance(proc, ProcWatcher)
        assert isinstance(proc, SocketWatcher)
    finally:
        netlink.close()
        proc.close()


def test_open_watcher_falls_back_to_proc_when_netlink_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An unknown netlink protocol fails at socket() like a kernel or sandbox without sock_diag.
    monkeypatch.setattr(sockdiag, "NETLINK_SOCK_DIAG", 31)
    with pytest.raises(OSError, match=r"[Pp]rotocol"):
        NetlinkWatcher([8080])

    watcher = open_watcher([8080])

    assert watcher.source == "proc"


@pytest.mark.parametrize("ports", [[], [0], [65536], [True]])
def test_invalid_ports_are_rejected(ports: list[int]) -> None:
    with pytest.raises(ValueError, match="port"):
        open_watcher(ports)


def test_netlink_watcher_reopens_after_close(endpoints: Endpoints) -> None:
    listener = endpoints.listen()
    endpoints.connect(listener)
    watcher = NetlinkWatcher([port_of(listener)])
    watcher.close()
    assert len(watcher.poll().sockets) == 1
    watcher.close()


# --- /proc parser on a crafted file --------------------------------------------------------

# Real /proc/net/tcp lines (x86, little-endian), edited: port 0x1F90 = 8080 is watched.
PROC_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1
   1: 0100007F:1F90 0200007F:D431 01 0000000A:000001F4 00:00000000 00000000  1000        0 2 1
   2: 0100007F:1F90 0300007F:D432 08 00000000:00000000 00:00000000 00000000  1000        0 3 1
   3: 0100007F:1F90 0400007F:D433 06 00000000:00000000 03:00001771 00000000     0        0 0 3
   4: 0100007F:1F90 0500007F:D434 05 00000000:00000000 03:00001771 00000000     0        0 0 3
   5: 0100007F:1F91 0600007F:D435 01 00000000:00000000 00:00000000 00000000  1000        0 4 1
   6: 0100007F:D436 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 5 1
   7: 0100007F:1F90 0200007F:D431 01 0000000A:000001F4 00:00000000 00000000  1000        0 2 1
   8: 0100007F:1F90 0700007F:D437 03 00000000:00000000 01:00000064 00000000     0        0 0 0
"""
PROC_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue \
rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:A001 01 \
00000010:00000020 00:00000000 00000000  1000        0 6 1
   1: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000A00007F:A002 04 \
00000000:00000000 00:00000000 00000000  1000        0 7 1
"""


@pytest.mark.skipif(sys.byteorder != "little", reason="crafted file is in x86 byte order")
def test_proc_parser_on_a_crafted_file(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(PROC_TCP)
    (tmp_path / "net" / "tcp6").write_text(PROC_TCP6)

    result = ProcWatcher([8080], proc_root=str(tmp_path)).poll()

    assert sorted(result.sockets, key=lambda s: s.peer_port) == [
        SocketSample(8080, LOCALHOST_V6, 0xA001, "ESTABLISHED", 0x20, 0x10, None, None, None),
        # IPv4-mapped peer of an IPv6 socket
        SocketSample(8080, IPv4("127.0.0.10"), 0xA002, "FIN_WAIT1", 0, 0, None, None, None),
        # line 1 (its repeat, line 7, is dropped); queues are hex: tx 0xA, rx 0x1F4
        SocketSample(8080, IPv4("127.0.0.2"), 0xD431, "ESTABLISHED", 500, 10, None, None, None),
        SocketSample(8080, IPv4("127.0.0.3"), 0xD432, "CLOSE_WAIT", 0, 0, None, None, None),
    ]
    # Not there: LISTEN (0), TIME_WAIT (3), time-wait mini-socket in FIN_WAIT2 (4), another
    # port (5), a client side whose peer is 8080 (6), SYN_RECV (8).


def test_proc_watcher_without_tcp6_file(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(PROC_TCP)

    result = ProcWatcher([8081], proc_root=str(tmp_path)).poll()

    assert [(s.peer, s.peer_port) for s in result.sockets] == [
        (ipaddress.IPv4Address("127.0.0.6"), 0xD435)
    ]


def test_proc_watcher_without_tcp_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ProcWatcher([8080], proc_root=str(tmp_path)).poll()


# --- netlink parser on crafted kernel replies ----------------------------------------------
# Paths a healthy modern kernel does not take on demand: replies split across datagrams with
# stale and repeated messages, a short (pre-4.1) tcp_info, errors, timeouts. The layouts are
# written out here from the kernel headers, independently of the module's constants.

NLMSG_ERROR, NLMSG_DONE, SOCK_DIAG_BY_FAMILY, NLM_F_MULTI = 2, 3, 20, 2
TCP_INFO_LEN = 232  # sizeof(struct tcp_info) in 5.x headers
OLD_TCP_INFO_LEN = 104  # 3.x: ends at tcpi_total_retrans, no tcpi_bytes_received


def nl_message(msg_type: int, seq: int, payload: bytes, flags: int = NLM_F_MULTI) -> bytes:
    """struct nlmsghdr + payload, padded to 4 bytes."""
    header = struct.pack("=IHHII", 16 + len(payload), msg_type, flags, seq, 0)
    return header + payload + b"\0" * (-len(payload) % 4)


def nl_attr(attr_type: int, data: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(data), attr_type) + data + b"\0" * (-len(data) % 4)


def diag_message(
    seq: int,
    *,
    family: int,
    state: int,
    ports: tuple[int, int],
    peer: str,
    cookie: int,
    queues: tuple[int, int] = (0, 0),
    info: bytes | None,
) -> bytes:
    """struct inet_diag_msg (inet_diag.h) + INET_DIAG_SHUTDOWN + INET_DIAG_INFO attributes."""
    peer_bytes = ipaddress.ip_address(peer).packed.ljust(16, b"\0")
    body = (
        struct.pack("=BBBB", family, state, 0, 0)
        + struct.pack(">HH", *ports)
        + b"\0" * 16  # idiag_src
        + peer_bytes  # idiag_dst
        + struct.pack("=IQ", 0, cookie)  # idiag_if, idiag_cookie
        + struct.pack("=IIIII", 0, queues[0], queues[1], 1000, 12345)
        + nl_attr(8, b"\0")  # INET_DIAG_SHUTDOWN comes first
    )
    if info is not None:
        body += nl_attr(2, info)
    return nl_message(SOCK_DIAG_BY_FAMILY, seq, body)


def tcp_info(
    length: int, last_data_recv: int, bytes_received: int = 0, last_data_sent: int = 0
) -> bytes:
    """struct tcp_info (include/uapi/linux/tcp.h) cut to `length`, as an older kernel sends."""
    info = bytearray(max(length, 64))
    struct.pack_into("=I", info, 40, 777_777)  # tcpi_fackets: must not be read
    struct.pack_into("=I", info, 44, last_data_sent)
    struct.pack_into("=I", info, 48, 888_888)  # tcpi_last_ack_sent: must not be read
    struct.pack_into("=I", info, 52, last_data_recv)
    struct.pack_into("=I", info, 56, 999_999)  # tcpi_last_ack_recv: must not be read
    if length >= 136:
        struct.pack_into("=Q", info, 128, bytes_received)
    return bytes(info[:length])


def done(seq: int, error: int = 0) -> bytes:
    return nl_message(NLMSG_DONE, seq, struct.pack("=i", error))


def error(seq: int, errno_value: int) -> bytes:
    return nl_message(NLMSG_ERROR, seq, struct.pack("=i", -errno_value) + b"\0" * 16, flags=0)


class FakeKernel:
    """Stands in for the netlink socket: records requests, replays datagrams per request."""

    def __init__(self, replies: Callable[[int, int], list[bytes]]) -> None:
        self.replies = replies  # (family, seq) -> datagrams
        self.requests: list[bytes] = []
        self.queue: list[bytes] = []
        self.closed = False

    def send(self, request: bytes | bytearray) -> int:
        self.requests.append(bytes(request))
        seq = struct.unpack_from("=I", request, 8)[0]
        self.queue.extend(self.replies(request[16], seq))
        return len(request)

    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0) -> int:
        if not self.queue:
            raise TimeoutError("timed out")  # what a socket with a timeout raises
        datagram = self.queue.pop(0)
        buffer[: len(datagram)] = datagram
        return len(datagram)

    def close(self) -> None:
        self.closed = True


def watcher_on(kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> NetlinkWatcher:
    monkeypatch.setattr(NetlinkWatcher, "_open", staticmethod(lambda: kernel))
    return NetlinkWatcher([8080, 8443])


def test_netlink_reply_in_several_datagrams_with_stale_repeated_and_short_messages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def replies(family: int, seq: int) -> list[bytes]:
        if family == socket.AF_INET:
            first = diag_message(
                seq, family=family, state=1, ports=(8080, 40001), peer="10.0.0.1", cookie=1,
                queues=(7, 9), info=tcp_info(TCP_INFO_LEN, 1500, 4242, last_data_sent=1400),
            )  # fmt: skip
            old_kernel = diag_message(
                seq, family=family, state=8, ports=(8443, 40002), peer="10.0.0.2", cookie=2,
                info=tcp_info(OLD_TCP_INFO_LEN, 70, last_data_sent=90),
            )  # fmt: skip
            no_info = diag_message(
                seq, family=family, state=5, ports=(8080, 40003), peer="10.0.0.3", cookie=3,
                info=None,
            )  # fmt: skip
            stale = diag_message(
                seq - 1, family=family, state=1, ports=(8080, 40004), peer="10.0.0.4", cookie=4,
                info=tcp_info(TCP_INFO_LEN, 1),
            )  # fmt: skip
            return [stale + first, old_kernel + first + no_info, done(seq)]
        mapped = diag_message(
            seq, family=family, state=1, ports=(8080, 40005), peer="::ffff:10.0.0.5", cookie=5,
            info=tcp_info(TCP_INFO_LEN + 48, 0, 1, 5),  # a newer kernel's longer tcp_info
        )  # fmt: skip
        return [mapped + done(seq)]

    kernel = FakeKernel(replies)
    # A frozen clock: the second family's times are rebased by the time between the two requests
    # (whole ms), which a loaded machine can make 1 ms; this test is about the parsing.
    monkeypatch.setattr(sockdiag, "time", type("Clock", (), {"monotonic": lambda: 1000.0}))
    result = watcher_on(kernel, monkeypatch).poll()

    assert sorted(result.sockets, key=lambda s: s.peer_port) == [
        SocketSample(8080, IPv4("10.0.0.1"), 40001, "ESTABLISHED", 7, 9, 1500, 1400, 4242, 0),
        SocketSample(8443, IPv4("10.0.0.2"), 40002, "CLOSE_WAIT", 0, 0, 70, 90, None, None),
        SocketSample(8080, IPv4("10.0.0.5"), 40005, "ESTABLISHED", 0, 0, 0, 5, 1, 0),
    ]
    # The requests: one per family, TCP, tcp_info asked for, states and a port filter.
    assert [request[16] for request in kernel.requests] == [socket.AF_INET, socket.AF_INET6]
    for request in kernel.requests:
        length, msg_type, flags = struct.unpack_from("=IHH", request)
        assert (length, msg_type, flags) == (len(request), SOCK_DIAG_BY_FAMILY, 0x301)
        _family, protocol, ext, states = struct.unpack_from("=BBBxI", request, 16)
        assert (protocol, ext) == (socket.IPPROTO_TCP, 1 << (2 - 1))
        assert states & (1 << 1)  # ESTABLISHED
        assert states & (1 << 8)  # CLOSE_WAIT
        assert states & (1 << 6)  # TIME_WAIT: connections closed between two polls
        assert not states & ((1 << 10) | (1 << 3))  # LISTEN, SYN_RECV
        bytecode_length, attr_type = struct.unpack_from("=HH", request, 16 + 56)
        assert attr_type == 1  # INET_DIAG_REQ_BYTECODE
        assert bytecode_length == len(request) - 16 - 56


def test_netlink_values_of_the_second_request_count_back_from_taken_at(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def replies(family: int, seq: int) -> list[bytes]:
        peer = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        message = diag_message(
            seq, family=family, state=1, ports=(8080, 40000 + family), peer=peer, cookie=family,
            info=tcp_info(TCP_INFO_LEN, 80, last_data_sent=120),
        )  # fmt: skip
        return [message + done(seq)]

    clock = iter([100.0, 100.0, 100.050])  # taken_at, AF_INET sent, AF_INET6 sent 50 ms later
    monkeypatch.setattr(sockdiag, "time", type("Clock", (), {"monotonic": lambda: next(clock)}))
    result = watcher_on(FakeKernel(replies), monkeypatch).poll()

    assert result.taken_at == 100.0
    by_family = {
        type(s.peer): (s.last_data_received_ms, s.last_data_sent_ms) for s in result.sockets
    }
    assert by_family == {ipaddress.IPv4Address: (80, 120), ipaddress.IPv6Address: (30, 70)}


def test_netlink_rebase_clamps_at_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    def replies(family: int, seq: int) -> list[bytes]:
        message = diag_message(
            seq, family=family, state=1, ports=(8080, 40000 + family), peer="::1", cookie=family,
            info=tcp_info(TCP_INFO_LEN, 10, last_data_sent=20),
        )  # fmt: skip
        return [message + done(seq)] if family == socket.AF_INET6 else [done(seq)]

    clock = iter([100.0, 100.0, 100.050])  # data moved between the two requests: "now"
    monkeypatch.setattr(sockdiag, "time", type("Clock", (), {"monotonic": lambda: next(clock)}))
    sample = only(watcher_on(FakeKernel(replies), monkeypatch).poll())

    assert (sample.last_data_received_ms, sample.last_data_sent_ms) == (0, 0)


@pytest.mark.parametrize("length", [0, 44, 52, 55])
def test_netlink_tcp_info_too_short_for_the_last_data_times_gives_none(
    monkeypatch: pytest.MonkeyPatch, length: int
) -> None:
    def replies(family: int, seq: int) -> list[bytes]:
        if family != socket.AF_INET:
            return [done(seq)]
        message = diag_message(
            seq, family=family, state=1, ports=(8080, 40001), peer="10.0.0.1", cookie=1,
            queues=(3, 4), info=tcp_info(length, 80, last_data_sent=120),
        )  # fmt: skip
        return [message + done(seq)]

    result = watcher_on(FakeKernel(replies), monkeypatch).poll()

    assert result.sockets == (
        SocketSample(8080, IPv4("10.0.0.1"), 40001, "ESTABLISHED", 3, 4, None, None, None),
    )


def test_netlink_error_reply_raises_and_drops_the_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeKernel(lambda family, seq: [error(seq, errno.ENOENT)])
    watcher = watcher_on(kernel, monkeypatch)

    with pytest.raises(OSError, match="No such file") as raised:
        watcher.poll()

    assert raised.value.errno == errno.ENOENT
    assert kernel.closed  # the rest of a reply must not be read as the next poll's


def test_netlink_dump_error_in_done_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeKernel(lambda family, seq: [done(seq, -errno.EINTR)])
    with pytest.raises(InterruptedError):
        watcher_on(kernel, monkeypatch).poll()


def test_netlink_reply_that_never_ends_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeKernel(lambda family, seq: [])  # no NLMSG_DONE ever comes
    with pytest.raises(TimeoutError):
        watcher_on(kernel, monkeypatch).poll()
    assert kernel.closed


def test_open_watcher_falls_back_when_the_first_request_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernel = FakeKernel(lambda family, seq: [error(seq, errno.EPROTONOSUPPORT)])
    monkeypatch.setattr(NetlinkWatcher, "_open", staticmethod(lambda: kernel))

    watcher = open_watcher([8080])

    assert watcher.source == "proc"
    assert kernel.closed


def test_netlink_socket_has_a_timeout_so_a_poll_cannot_hang() -> None:
    with NetlinkWatcher([8080]) as watcher:
        timeout = watcher._sock.gettimeout() if watcher._sock is not None else None
    assert timeout is not None
    assert 0 < timeout <= 5


def test_app_is_up_while_it_listens_or_holds_a_connection() -> None:
    """The agent's sign that the app exited: no listener and no open connection on its ports.
    Spring Boot closes its listener at SIGTERM and then finishes its requests."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    assert app_is_up([port])
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    listener.close()  # the listener is gone, a request is still being served
    assert app_is_up([port])
    accepted.close()  # the app's last socket: what is left (FIN_WAIT, the client's) is not it
    try:
        assert not app_is_up([port])
        assert not app_is_up([free_port()])
    finally:
        client.close()


# --- every connection seen: closed between two polls --------------------------------------------


def _short_connections(server: socket.socket, count: int, *, app_closes: bool) -> None:
    """``count`` connections of one request each, all opened and closed before the next poll."""
    port = server.getsockname()[1]
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        conn.recv(100)
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
        client.recv(100)
        first, second = (conn, client) if app_closes else (client, conn)
        first.close()
        second.recv(100)  # the end of the stream
        second.close()


@pytest.mark.parametrize("app_closes", [True, False])
def test_connections_closed_between_two_polls_are_still_counted(app_closes: bool) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        watcher = NetlinkWatcher([server.getsockname()[1]])
        try:
            first = watcher.poll()
            assert (first.missed, first.unaccounted_opens) == ((), 0)
            _short_connections(server, 5, app_closes=app_closes)
            after = watcher.poll()
            if app_closes:
                # The app's side lingers in TIME_WAIT: five connections never seen open.
                assert after.missed == (ipaddress.IPv4Address("127.0.0.1"),) * 5
            else:
                # Nothing is left on the app's side; the namespace's count of accepted
                # connections shows them (at least five: this machine's namespace is shared).
                assert after.missed == ()
                assert after.unaccounted_opens >= 5
            again = watcher.poll()  # the TIME_WAIT sockets are not new any more
            assert again.missed == ()
            assert len(first.missed + after.missed + again.missed) == (5 if app_closes else 0)
        finally:
            watcher.close()
