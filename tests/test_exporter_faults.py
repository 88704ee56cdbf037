"""Exporter faults, provoked for real against a twisted.web exporter on 127.0.0.1.

Each fault must end in a logged reconnect with backoff, and records arriving after the reconnect
must be counted normally. Timers (backoff, connect timeout, idle watchdog, reporting) run on a
task.Clock; the HTTP traffic is real.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress

import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers.faults import T0, Exporter, line, settings
from support import wait_for
from twisted.internet import ssl

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


@pytest_twisted.ensureDeferred
async def test_dns_failure_is_retried_with_backoff(service, logs):
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
    await next_attempt(run, logs, 1)
    assert logs.matching("exporter sent nothing for 30s; reconnecting")
    await wait_for(lambda: len(exporter.requests) == 2)
    assert exporter.requests[1].args == {b"after": [b"42"]}
    exporter.send(line(T0 + 3, seq=43))
    await wait_for(lambda: run.stats.accepted == 3)
    assert not run.stats.rejected


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
    assert exporter.requests[1].args == {b"after": [b"1"]}
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
    context = ssl.CertificateOptions(privateKey=key, certificate=cert)
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
