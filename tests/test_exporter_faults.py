"""Exporter faults, provoked for real against a twisted.web exporter on 127.0.0.1.

Each fault must end in a logged reconnect with backoff, and records arriving after the reconnect
must be counted normally. Timers (backoff, connect timeout, idle watchdog, reporting) run on a
task.Clock; the HTTP traffic is real.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import math

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers.faults import T0, Exporter, Running, heartbeat, line, settings
from support import wait_for
from twisted.internet import reactor, ssl
from twisted.internet._resolver import HostResolution
from twisted.internet.interfaces import IHostnameResolver
from twisted.logger import formatEvent
from zope.interface import implementer

from sfive_ngxlua import fetch

pytest_plugins = ("helpers.fixtures",)


def reconnect_events(logs):
    return [e for e in logs.events if "reconnecting in" in e.get("log_format", "")]


async def next_attempt(run, logs, count: int) -> None:
    """Wait for the ``count``-th logged reconnect and advance the clock by its delay."""
    await wait_for(lambda: len(reconnect_events(logs)) >= count)
    run.clock.advance(reconnect_events(logs)[count - 1]["delay"])


async def report(run) -> dict:
    """Advance to the first interval's report; return its dataset for foo/hls/high."""
    run.clock.advance(T0 + 11 - run.clock.seconds())
    await wait_for(lambda: run.datasets)
    return run.datasets[0]


@pytest_twisted.ensureDeferred
async def test_connection_refused_backs_off_then_counts_after_reconnect(service, logs):
    gone = Exporter().listen()
    number = gone.number
    await gone.stop()
    run = service(settings(url=f"http://127.0.0.1:{number}/sfive"))

    await next_attempt(run, logs, 1)
    await next_attempt(run, logs, 2)
    await wait_for(lambda: len(reconnect_events(logs)) >= 3)
    events = reconnect_events(logs)
    assert all("refused" in e["why"].lower() for e in events)
    delays = [e["delay"] for e in events]
    for n, delay in enumerate(delays):
        assert 1.5**n <= delay < 1.5**n + 1, delays
    assert run.stats.exporter_reconnects == 3
    assert run.stats.accepted == 0

    back = Exporter().listen(number=number)
    try:
        back.plan.append(("stream", line(T0 + 1, seq=1), line(T0 + 2, seq=2, sent=50)))
        run.clock.advance(delays[-1])
        await wait_for(lambda: run.stats.accepted == 2)
        assert logs.matching(f"connected to http://127.0.0.1:{number}/sfive")
        assert run.fetch.failures == 0, "backoff is reset after a good connection"
        dataset = await report(run)
        assert dataset["data"]["bytes-sent"] == 150
    finally:
        await back.stop()


@implementer(IHostnameResolver)
class _NoInvalidNames:
    """The reactor's resolver, except that ``.invalid`` names (RFC 6761) have no addresses
    at once, as a resolver that knows the special-use names answers, without asking DNS."""

    def __init__(self, real: IHostnameResolver) -> None:
        self.real = real

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None,  # noqa: ANN001,ANN201,N803
                        transportSemantics="TCP"):  # noqa: N803
        if not hostName.rstrip(".").endswith(".invalid"):
            return self.real.resolveHostName(receiver, hostName, portNumber, addressTypes,
                                             transportSemantics)
        resolution = HostResolution(hostName)
        receiver.resolutionBegan(resolution)
        receiver.resolutionComplete()
        return resolution


@pytest.fixture
def no_dns_for_invalid():
    real = reactor.installNameResolver(_NoInvalidNames(reactor.nameResolver))
    yield
    reactor.installNameResolver(real)


@pytest_twisted.ensureDeferred
async def test_dns_failure_is_retried_with_backoff(service, logs, no_dns_for_invalid):
    run = service(settings(url="http://sfive-exporter.invalid:8080/sfive"))
    await next_attempt(run, logs, 1)
    await wait_for(lambda: len(reconnect_events(logs)) >= 2)
    first, second = reconnect_events(logs)[:2]
    assert "sfive-exporter.invalid" in first["why"]
    assert second["delay"] >= 1.5
    assert run.stats.exporter_reconnects == 2
    assert run.fetch.running


@pytest_twisted.ensureDeferred
async def test_error_answers_are_retried_then_the_stream_counts(service, exporter, logs):
    exporter.plan.extend([("status", 503), ("status", 404),
                          ("stream", line(T0 + 1, seq=7), line(T0 + 3, seq=8))])
    run = service(settings(url=exporter.url()))
    await next_attempt(run, logs, 1)
    await next_attempt(run, logs, 2)
    await wait_for(lambda: run.stats.accepted == 2)
    whys = [e["why"] for e in reconnect_events(logs)]
    assert whys == ["HTTP 503 Service Unavailable", "HTTP 404 Not Found"]
    assert len(exporter.requests) == 3
    assert not run.stats.rejected
    assert (await report(run))["data"]["bytes-sent"] == 200


@pytest_twisted.ensureDeferred
async def test_headers_that_never_come_time_out(service, exporter, logs):
    exporter.plan.extend([("silent",), ("stream", line(T0 + 1, seq=1))])
    run = service(settings(url=exporter.url(), connect_timeout=5.0))
    await wait_for(lambda: exporter.requests)
    assert not reconnect_events(logs)
    run.clock.advance(5.0)
    await next_attempt(run, logs, 1)
    assert reconnect_events(logs)[0]["why"] == "no answer within 5s"
    await wait_for(lambda: run.stats.accepted == 1)
    assert len(exporter.requests) == 2


@pytest_twisted.ensureDeferred
async def test_idle_body_is_dropped_and_resumed_after_last_seq(service, exporter, logs):
    exporter.plan.append(("stream", line(T0 + 1, seq=41)))
    run = service(settings(url=exporter.url(), idle_timeout=30.0))
    await wait_for(lambda: run.stats.accepted == 1)
    run.clock.advance(29.0)
    assert run.fetch.body is not None, "not idle yet"
    exporter.send(line(T0 + 2, seq=42))
    await wait_for(lambda: run.stats.accepted == 2)
    run.clock.advance(29.0)
    assert run.fetch.body is not None, "data restarted the idle timer"
    run.clock.advance(1.0)
    assert run.fetch.body is not None, "a second look, once the reactor read its sockets"
    run.clock.advance(fetch.IDLE_RECHECK)
    await next_attempt(run, logs, 1)
    assert logs.matching("exporter sent nothing for 30s; reconnecting")
    await wait_for(lambda: len(exporter.requests) == 2)
    assert exporter.requests[1].args == {b"v": [b"2"], b"after": [b"42"]}
    exporter.send(line(T0 + 3, seq=43))
    await wait_for(lambda: run.stats.accepted == 3)
    assert not run.stats.rejected


@pytest_twisted.ensureDeferred
async def test_a_stall_past_the_idle_timeout_reads_what_came_before_it_judges(
        service, exporter, logs):
    """The reactor runs its timers before its I/O: after a stall longer than --idle-timeout
    the watchdog fires before the bytes that came during the stall are read. It looks again
    once they are: no reconnect, no gap. Silent all the same, it reconnects as before."""
    exporter.plan.append(("stream", line(T0 + 1, seq=41)))
    run = service(settings(url=exporter.url(), idle_timeout=30.0))
    await wait_for(lambda: run.stats.accepted == 1)
    body = run.fetch.body
    exporter.send(line(T0 + 2, seq=42))  # on its way while the service stalls
    run.clock.advance(35.0)  # the stall: the watchdog's time passed, the socket not read yet
    assert run.fetch.body is body, "cut before reading what came during the stall"
    await wait_for(lambda: run.stats.accepted == 2)  # the same turn's I/O
    run.clock.advance(fetch.IDLE_RECHECK)
    assert run.fetch.body is body and run.stats.exporter_reconnects == 0
    assert not reconnect_events(logs) and len(exporter.requests) == 1
    run.clock.advance(35.0)  # a stall with nothing on its way: silent for real
    assert run.fetch.body is body
    run.clock.advance(fetch.IDLE_RECHECK)
    assert run.fetch.body is None
    await next_attempt(run, logs, 1)
    assert reconnect_events(logs)[0]["why"] == "idle for 35s"
    await wait_for(lambda: len(exporter.requests) == 2)
    assert exporter.requests[1].args == {b"v": [b"2"], b"after": [b"42"]}


class Deaf:
    """A body transport whose stopProducing never leads to connectionLost (stands in for a
    transport that does not report it: no real one here fails that way on demand)."""

    stopped = 0

    def stopProducing(self):  # noqa: N802 (the interface)
        self.stopped += 1


@pytest_twisted.ensureDeferred
async def test_an_idle_body_whose_transport_never_reports_its_end_is_still_retried(
        service, exporter, logs):
    exporter.plan.append(("stream", line(T0 + 1, seq=41)))
    run = service(settings(url=exporter.url(), idle_timeout=30.0))
    await wait_for(lambda: run.stats.accepted == 1)
    old, real = run.fetch.body, run.fetch.body.transport
    old.transport = deaf = Deaf()
    try:
        run.clock.advance(30.0)
        run.clock.advance(fetch.IDLE_RECHECK)
        assert deaf.stopped == 1 and run.fetch.body is None
        assert not run.stats.source_connected
        await next_attempt(run, logs, 1)
        assert reconnect_events(logs)[0]["why"] == "idle for 30s"
        await wait_for(lambda: len(exporter.requests) == 2)
        assert exporter.requests[1].args == {b"v": [b"2"], b"after": [b"41"]}
        old.connectionLost()  # late after all: the old body is ignored
        assert len(reconnect_events(logs)) == 1
        exporter.send(line(T0 + 2, seq=42))
        await wait_for(lambda: run.stats.accepted == 2)
    finally:
        real.stopProducing()


@pytest_twisted.ensureDeferred
async def test_cut_mid_line_discards_the_partial_line(service, exporter, logs):
    whole = line(T0 + 1, seq=1)
    cut_one = line(T0 + 2, seq=2, sent=7)
    exporter.plan.append(("stream", whole[:10], whole[10:] + cut_one[:15], cut_one[15:30]))
    run = service(settings(url=exporter.url()))
    await wait_for(lambda: run.fetch.pipeline.splitter.pending == 30)
    exporter.cut()
    await next_attempt(run, logs, 1)
    assert "discarded a partial line of 30 bytes" in reconnect_events(logs)[0]["why"]
    assert run.stats.lines == 1 and run.stats.accepted == 1
    assert not run.stats.rejected, "the partial line was not parsed"

    await wait_for(lambda: len(exporter.requests) == 2)
    assert exporter.requests[1].args == {b"v": [b"2"], b"after": [b"1"]}
    exporter.send(cut_one[:5], cut_one[5:] + line(T0 + 3, seq=3))
    await wait_for(lambda: run.stats.accepted == 3)
    assert not run.stats.rejected
    assert (await report(run))["data"]["bytes-sent"] == 207


def _tls_material(tmp_path):
    """A private CA and a server certificate for 127.0.0.1 signed by it; another, unrelated CA."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def ca(name):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    ca_key, ca_cert = ca("sfive test CA")
    _, other_cert = ca("some other CA")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (tmp_path / "other-ca.pem").write_bytes(other_cert.public_bytes(pem))
    # through PEM: Debian's pyOpenSSL (23.0) takes no cryptography objects
    context = ssl.PrivateCertificate.loadPEM(cert.public_bytes(pem) + key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())).options()
    return context, tmp_path / "ca.pem", tmp_path / "other-ca.pem"


@pytest_twisted.ensureDeferred
async def test_https_with_private_ca_and_basic_auth_never_logs_the_password(
        service, logs, tmp_path, monkeypatch):
    context, ca_file, other_ca = _tls_material(tmp_path)
    password = "pa:ss-W0rd"
    tls = Exporter().listen(context_factory=context)
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(other_ca))
        tls.plan.extend([("status", 401), ("stream", line(T0 + 1, seq=5))])
        run = service(settings(url=tls.url(userinfo="operator:pa%3Ass-W0rd@")))
        await wait_for(lambda: reconnect_events(logs))
        assert "certificate verify failed" in reconnect_events(logs)[0]["why"]
        assert not tls.requests, "a certificate from an untrusted CA is refused"

        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        await next_attempt(run, logs, 1)
        await wait_for(lambda: len(reconnect_events(logs)) == 2)
        assert reconnect_events(logs)[1]["why"] == "HTTP 401 Unauthorized"
        await next_attempt(run, logs, 2)
        await wait_for(lambda: run.stats.accepted == 1)

        assert tls.requests[-1].isSecure()
        for request in tls.requests:
            assert (request.getUser(), request.getPassword()) == (b"operator", password.encode())
        assert logs.matching(f"https://operator:***@127.0.0.1:{tls.number}/sfive")
        tls.cut()
        await wait_for(lambda: len(reconnect_events(logs)) == 3)
        assert "Connection lost" in reconnect_events(logs)[2]["why"]
    finally:
        await tls.stop()
    secrets = [password, "pa%3Ass-W0rd", base64.b64encode(b"operator:" + password.encode())
               .decode()]
    text = logs.everything()
    assert len(logs.events) > 5
    for secret in secrets:
        assert secret not in text


# -- protocol 2 (nginx/README.md): ring identity, heartbeats, the watermark --------------------

RING = "00c0ffee00c0ffee"
OTHER_RING = "00000000deadbeef"


@pytest_twisted.ensureDeferred
async def test_v2_heartbeats_are_the_watermark_and_keep_the_connection_alive(service, logs):
    exporter = Exporter(ring=RING).listen()
    try:
        run = service(settings(url=exporter.url(), idle_timeout=30.0))
        assert run.fetch.watermark(run.clock.seconds()) == float("-inf")
        await wait_for(lambda: run.stats.exporter_connected)
        assert exporter.requests[0].args == {b"v": [b"2"]}, "from now: no ring, no after"
        assert (run.fetch.protocol, run.fetch.ring, run.stats.ring_size) == (2, RING, None)
        assert logs.matching(f"(protocol 2, ring {RING})")
        assert run.fetch.watermark(run.clock.seconds()) == float("-inf"), "no heartbeat yet"
        exporter.send(line(T0 + 1, seq=1), heartbeat(1, T0 + 1.5))
        await wait_for(lambda: run.stats.heartbeats == 1)
        assert run.stats.lines == 1 and run.stats.accepted == 1, "a heartbeat is no record line"
        assert run.fetch.watermark(T0 + 99) == T0 + 1.5
        for n in range(3):  # nothing but heartbeats for 3 x 29 s: still one connection
            run.clock.advance(29.0)
            exporter.send(heartbeat(1, T0 + 1.5 + 29 * (n + 1)))
            await wait_for(lambda n=n: run.stats.heartbeats == n + 2)
        assert run.fetch.body is not None and len(exporter.requests) == 1
        assert run.stats.exporter_reconnects == 0
        exporter.send(heartbeat(2, T0 + 90.0))
        await wait_for(lambda: run.fetch.pipeline.last_seq == 2)
        exporter.cut()
        await wait_for(lambda: not run.stats.exporter_connected)
        assert run.fetch.watermark(T0 + 500) == T0 + 90.0, "disconnected: the last heartbeat"
        assert run.fetch.position() == {"kind": "exporter", "ring": RING, "seq": 2}
        await next_attempt(run, logs, 1)
        await wait_for(lambda: len(exporter.requests) == 2)
        assert exporter.requests[1].args == {b"v": [b"2"], b"ring": [RING.encode()],
                                             b"after": [b"2"]}
    finally:
        await exporter.stop()


@pytest_twisted.ensureDeferred
async def test_a_new_ring_is_read_from_its_first_record(service, logs):
    exporter = Exporter(ring=RING).listen()
    try:
        run = service(settings(url=exporter.url()))
        await wait_for(lambda: run.stats.exporter_connected)
        exporter.send(line(T0 + 1, seq=41))
        await wait_for(lambda: run.stats.accepted == 1)
        exporter.ring = OTHER_RING  # nginx restarted: a new dict, a new ring
        exporter.cut()
        await next_attempt(run, logs, 1)
        await wait_for(lambda: run.fetch.ring == OTHER_RING)
        assert exporter.requests[1].args == {b"v": [b"2"], b"ring": [RING.encode()],
                                             b"after": [b"41"]}
        assert logs.matching(f"a new ring {OTHER_RING} (was {RING}): nginx was restarted")
        assert run.fetch.pipeline.last_seq is None, "the new ring's numbers start again"
        exporter.send(line(T0 + 2, seq=1), line(T0 + 3, seq=2))
        await wait_for(lambda: run.stats.accepted == 3)
        assert run.fetch.position() == {"kind": "exporter", "ring": OTHER_RING, "seq": 2}
        run.clock.advance(T0 + 11 - run.clock.seconds())
        assert not run.datasets, "protocol 2: held until a heartbeat says the records are in"
        exporter.send(heartbeat(2, T0 + 11.0))
        await wait_for(lambda: run.datasets)
        assert run.datasets[0]["data"]["bytes-sent"] == 300
    finally:
        await exporter.stop()


@pytest_twisted.ensureDeferred
async def test_a_v1_exporter_keeps_the_wall_clock_rule(service, exporter, logs):
    run = service(settings(url=exporter.url()))
    await wait_for(lambda: run.stats.exporter_connected)
    assert exporter.requests[0].args == {b"v": [b"2"]}
    assert run.fetch.protocol == 1 and run.fetch.ring is None
    assert run.fetch.watermark(T0 + 7) == -math.inf, "connected, but no valid line yet"
    exporter.send(b"not json\n")
    await wait_for(lambda: run.stats.lines == 1)
    assert run.fetch.watermark(T0 + 7) == -math.inf, "a line not in the format vouches for none"
    exporter.send(line(T0 + 1, seq=5))
    await wait_for(lambda: run.stats.accepted == 1)
    assert run.fetch.watermark(T0 + 7) == T0 + 7, "connected, after a first valid line: now"
    run.clock.advance(2.0)
    exporter.cut()
    await wait_for(lambda: not run.stats.exporter_connected)
    assert run.fetch.watermark(T0 + 50) == T0 + 2, "disconnected: when it lost the connection"
    await next_attempt(run, logs, 1)
    await wait_for(lambda: len(exporter.requests) == 2)
    assert exporter.requests[1].args == {b"v": [b"2"], b"after": [b"5"]}, "no ring: as today"


@pytest_twisted.ensureDeferred
async def test_protocol_2_without_a_valid_ring_is_read_as_protocol_1(service, logs):
    exporter = Exporter(ring="not-hex").listen()
    try:
        run = service(settings(url=exporter.url()))
        await wait_for(lambda: run.stats.exporter_connected)
        assert run.fetch.protocol == 1 and run.fetch.ring is None
        assert logs.matching("protocol '2' with ring 'not-hex' is not one this service reads")
    finally:
        await exporter.stop()


@pytest_twisted.ensureDeferred
async def test_resume_continues_from_a_checkpointed_position(logs):
    exporter = Exporter(ring=RING).listen()
    run = Running(settings(url=exporter.url()))
    try:
        with pytest.raises(ValueError):
            run.fetch.resume({"kind": "file", "path": "/x"})
        with pytest.raises(ValueError):
            run.fetch.resume(["exporter", RING, 3])
        with pytest.raises(ValueError):
            run.fetch.resume({"kind": "exporter", "ring": "not hex!", "seq": 3})
        run.fetch.resume({"kind": "exporter", "ring": RING, "seq": 77})
        run.start()
        await wait_for(lambda: exporter.requests)
        assert exporter.requests[0].args == {b"v": [b"2"], b"ring": [RING.encode()],
                                             b"after": [b"77"]}
        assert logs.matching("after sequence 77")
    finally:
        await run.stop()
        await exporter.stop()


@pytest_twisted.ensureDeferred
async def test_records_the_ring_lost_are_logged_with_their_time_range(service, exporter, logs):
    run = service(settings(url=exporter.url()))
    await wait_for(lambda: run.stats.exporter_connected)
    exporter.send(line(T0 + 1, seq=1) + b'{"lost":5,"seq":7}\n')
    await wait_for(lambda: run.stats.lost == 5)
    assert not logs.matching("the exporter lost"), "the range ends with the next record"
    exporter.send(line(T0 + 4, seq=7))
    await wait_for(lambda: logs.matching("the exporter lost"))
    [text] = logs.matching("the exporter lost")
    assert "lost 5 records (sequence 2 to 6)" in text
    assert "between 2027-01-15T08:00:01Z and 2027-01-15T08:00:04Z" in text
    exporter.send(b'{"lost":2,"seq":10}\n')
    await wait_for(lambda: run.stats.lost == 7)
    exporter.cut()
    await wait_for(lambda: len(logs.matching("the exporter lost")) == 2)
    assert "between 2027-01-15T08:00:04Z and (unknown)" in logs.matching("the exporter lost")[1]


# -- the ring's history (heartbeats name the oldest record held) and cut URLs -----------------


def test_heartbeat_fields_of_the_rings_history_are_read_and_bad_ones_ignored():
    from sfive_ngxlua.records import Heartbeat, RecordParser

    parse = RecordParser(settings()).parse
    assert parse(b'{"seq":9,"hb":1800000010.5,"oldest":3,"oldest-time":1800000001.25}') == \
        Heartbeat(9, 1800000010.5, 3, 1800000001.25)
    assert parse(b'{"seq":9,"hb":1800000010.5}') == Heartbeat(9, 1800000010.5, None, None)
    assert parse(b'{"seq":9,"hb":1800000010.5,"oldest":3}') == Heartbeat(9, 1800000010.5, 3)
    # an exporter's extra fields that are not what they should be: the beat still counts
    for bad in (b'"oldest":"3"', b'"oldest":0', b'"oldest":true', b'"oldest":1.5'):
        assert parse(b'{"seq":9,"hb":1800000010.5,' + bad + b"}") == Heartbeat(9, 1800000010.5)
    assert parse(b'{"seq":9,"hb":1800000010.5,"oldest":3,"oldest-time":"x"}') == \
        Heartbeat(9, 1800000010.5, 3, None)


def test_a_url_the_exporter_cut_is_rejected_as_url_truncated():
    from sfive_ngxlua.records import REASONS, RecordParser

    parse = RecordParser(settings()).parse
    cut = (b'{"seq":1,"time":"2027-01-15T08:00:00.000+00:00","client":"10.0.0.1","ua":"u",'
           b'"url":"/live/hls/foo-high/seg1.t","url-truncated":9000,"status":200,'
           b'"bytes-sent":5}')
    assert "url-truncated" in REASONS
    assert parse(cut) == "url-truncated", "a cut URL can match another stream: never counted"
    assert parse(cut.replace(b'"status":200', b'"status":404')) == "status"
    assert parse(cut.replace(b',"url-truncated":9000', b"")).streamer == ("foo", "hls", "high")


@pytest_twisted.ensureDeferred
async def test_the_ring_history_comes_from_the_heartbeats(service, logs):
    exporter = Exporter(ring=RING).listen()
    try:
        run = service(settings(url=exporter.url()))
        await wait_for(lambda: run.stats.exporter_connected)
        exporter.send(heartbeat(0, T0 + 1.0))  # an empty ring: nothing held, nothing said
        await wait_for(lambda: run.stats.heartbeats == 1)
        assert (run.stats.ring_size, run.stats.ring_history) == (None, None)
        exporter.send(line(T0 + 1, seq=500), heartbeat(500, T0 + 2.0, 101, T0 - 118.0))
        await wait_for(lambda: run.stats.heartbeats == 2)
        assert run.stats.ring_size == 400
        assert run.stats.ring_history == pytest.approx(120.0)
        run.clock.advance(11.0)  # the first interval's due time, by the clock and the watermark:
        exporter.send(heartbeat(500, T0 + 11.0, 101, T0 - 109.0))  # the line says its history
        reported = await wait_for(lambda: [e for e in logs.events if "figures" in e])
        assert reported[0]["figures"]["ring_history"] == "120s"
        assert "ring_history=120s" in formatEvent(reported[0])
    finally:
        await exporter.stop()
