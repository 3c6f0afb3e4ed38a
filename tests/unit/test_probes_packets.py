"""Probe packets: what is sent, how answers are recognised (pure: bytes in, values out)."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys

import pytest
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP, TCP, IPerror, TCPerror, in4_chksum
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPerror6,
    IPv6,
    in6_chksum,
)
from scapy.utils import checksum

from agent.probe_types import ProbeSpec, errno_measurement
from agent.probe_wire import (
    EchoReply,
    IcmpError,
    TcpAnswer,
    build_dns_query,
    build_echo,
    build_syn,
    classify_tcp,
    parse_dns_reply,
    parse_icmp4,
    parse_icmp6,
    parse_tcp,
    tcp_ports,
)

ME4, THEM4 = "10.20.1.10", "198.51.100.10"
ME6, THEM6 = "fd20:0:0:1::10", "2001:db8:100::10"


def test_echo_request_v4_is_valid_icmp() -> None:
    msg = build_echo(socket.AF_INET, ME4, THEM4, ident=0x1234, seq=7)
    icmp = ICMP(msg)
    assert (icmp.type, icmp.id, icmp.seq) == (8, 0x1234, 7)
    assert checksum(msg) == 0  # a correct internet checksum sums to zero


def test_echo_request_v6_carries_a_correct_checksum() -> None:
    msg = build_echo(socket.AF_INET6, ME6, THEM6, ident=99, seq=3)
    req = ICMPv6EchoRequest(msg)
    assert (req.type, req.id, req.seq) == (128, 99, 3)
    assert in6_chksum(58, IPv6(src=ME6, dst=THEM6), msg) == 0


@pytest.mark.parametrize("v6", [False, True])
def test_syn_segment(v6: bool) -> None:
    family, src, dst = (socket.AF_INET6, ME6, THEM6) if v6 else (socket.AF_INET, ME4, THEM4)
    seg = build_syn(family, src, dst, sport=40001, dport=443, seq=123456)
    tcp = TCP(seg)
    assert (tcp.sport, tcp.dport, tcp.seq, str(tcp.flags)) == (40001, 443, 123456, "S")
    # the checksum is right for this source and destination (pseudo-header)
    if v6:
        assert in6_chksum(6, IPv6(src=src, dst=dst), seg) == 0
    else:
        assert in4_chksum(6, IP(src=src, dst=dst), seg) == 0


def test_tcp_answers_are_told_apart() -> None:
    seq = 1000

    def answer(flags: str, ack: int) -> TcpAnswer:
        segment = bytes(TCP(sport=443, dport=40001, flags=flags, ack=ack))
        parsed = parse_tcp(segment, THEM4)
        assert parsed is not None
        return parsed

    assert classify_tcp(answer("SA", seq + 1), seq) == "open"
    assert classify_tcp(answer("RA", seq + 1), seq) == "closed"
    assert classify_tcp(answer("SA", seq + 7), seq) is None  # not ours
    assert classify_tcp(answer("A", seq + 1), seq) is None
    assert classify_tcp(answer("RA", 0), 0xFFFFFFFF) == "closed"  # sequence wraps
    assert tcp_ports(bytes(TCP(sport=443, dport=40001))) == (443, 40001)
    assert tcp_ports(b"\0" * 10) is None


def test_icmp4_echo_reply_and_noise() -> None:
    reply = bytes(IP(src=THEM4, dst=ME4) / ICMP(type=0, id=5, seq=9) / b"x")
    assert parse_icmp4(reply) == EchoReply(src=THEM4, ident=5, seq=9)
    request = bytes(IP(src=THEM4, dst=ME4) / ICMP(type=8, id=5, seq=9))
    assert parse_icmp4(request) is None
    assert parse_icmp4(b"\x45" + b"\0" * 10) is None


def test_icmp4_error_quoting_our_syn() -> None:
    err = bytes(IP(src="198.51.100.1", dst=ME4) / ICMP(type=3, code=13)
                / IPerror(src=ME4, dst=THEM4, proto=6) / TCPerror(sport=40001, dport=443))
    assert parse_icmp4(err) == IcmpError(
        reporter="198.51.100.1", type=3, code=13, inner_dst=THEM4, inner_proto=6,
        inner_a=40001, inner_b=443)


def test_icmp4_error_quoting_our_echo() -> None:
    err = bytes(IP(src="198.51.100.1", dst=ME4) / ICMP(type=3, code=1)
                / IPerror(src=ME4, dst=THEM4, proto=1) / ICMP(type=8, id=5, seq=9))
    parsed = parse_icmp4(err)
    assert isinstance(parsed, IcmpError)
    assert (parsed.inner_proto, parsed.inner_a, parsed.inner_b) == (1, 5, 9)
    assert parsed.text() == "icmp 3/1 from 198.51.100.1"


def test_icmp6_reply_and_errors() -> None:
    assert parse_icmp6(bytes(ICMPv6EchoReply(id=5, seq=9)), THEM6) == \
        EchoReply(src=THEM6, ident=5, seq=9)
    assert parse_icmp6(bytes(ICMPv6EchoRequest(id=5, seq=9)), THEM6) is None
    err = bytes(ICMPv6DestUnreach(code=1) / IPerror6(src=ME6, dst=THEM6, nh=6)
                / TCPerror(sport=40001, dport=443))
    assert parse_icmp6(err, "2001:db8:100::1") == IcmpError(
        reporter="2001:db8:100::1", type=1, code=1, inner_dst=THEM6, inner_proto=6,
        inner_a=40001, inner_b=443)
    echo_err = bytes(ICMPv6DestUnreach(code=0) / IPerror6(src=ME6, dst=THEM6, nh=58)
                     / ICMPv6EchoRequest(id=5, seq=9))
    parsed = parse_icmp6(echo_err, "2001:db8:100::1")
    assert isinstance(parsed, IcmpError)
    assert (parsed.inner_proto, parsed.inner_a, parsed.inner_b) == (58, 5, 9)


def test_dns_query_and_reply() -> None:
    query = build_dns_query(0xBEEF, "example.net")
    msg = DNS(query)
    assert msg.id == 0xBEEF and msg.rd == 1 and msg.qd[0].qname == b"example.net."
    reply = bytes(DNS(id=0xBEEF, qr=1, rcode=3, qd=DNSQR(qname="example.net")))
    assert parse_dns_reply(reply, 0xBEEF) == "answer rcode=3"
    assert parse_dns_reply(reply, 0xBEEE) is None  # someone else's id
    assert parse_dns_reply(b"\xbe\xef", 0xBEEF) is None  # too short
    assert parse_dns_reply(query, 0xBEEF) == "answer rcode=0"  # an echo is still an answer


@pytest.mark.parametrize(
    ("err", "refused_reachable", "outcome", "detail"),
    [
        (errno.ECONNREFUSED, True, "reachable", "refused"),
        (errno.EPERM, False, "unreachable", "blocked-locally"),
        (errno.EACCES, False, "unreachable", "blocked-locally"),
        (errno.ENETUNREACH, True, "unreachable", "no-route"),
        (errno.EHOSTUNREACH, True, "unreachable", "host-unreachable"),
        (errno.ETIMEDOUT, True, "unreachable", "timeout"),
        (errno.EBADF, True, "error", "Bad file descriptor"),
    ],
)
def test_socket_errors(err: int, refused_reachable: bool, outcome: str, detail: str) -> None:
    m = errno_measurement(err, 0.25, refused_reachable=refused_reachable)
    assert (m.outcome, m.detail, m.duration_seconds) == (outcome, detail, 0.25)


def test_spec_parse() -> None:
    spec = ProbeSpec.parse("tcp-syn:[2001:db8::1]:443", timeout=0.3)
    assert (spec.type, spec.address, spec.port, spec.timeout, spec.family) == \
        ("tcp-syn", "2001:db8::1", 443, 0.3, socket.AF_INET6)
    assert ProbeSpec.parse("dns:192.0.2.53").port == 53
    with pytest.raises(ValueError, match="TYPE:TARGET"):
        ProbeSpec.parse("http:192.0.2.1:80")
    with pytest.raises(ValueError, match="need a port"):
        ProbeSpec.parse("tcp:192.0.2.1")


def test_cli_and_daemon_modules_do_not_import_scapy() -> None:
    """Scapy takes about half a second to import: only a sweep may pay for it."""
    code = ("import sys, agent.cli, agent.probes, agent.probe_sweep, agent.probe_types, "
            "agent.probe_wire, agent.probes_bridge, agent.metrics, agent.daemon; "
            "print(sorted(m for m in sys.modules if m.startswith('scapy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"
