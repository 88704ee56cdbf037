"""Shared pytest setup: tests import the modules next to them (support) and the
repository's lab package (lab.nginx); fixtures for a private nginx running the shipped
exporter; under CI (CI=true) a skip is a failure (ci_strict)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from ci_strict import pytest_runtest_makereport  # noqa: E402, F401 (the hook)

from lab.nginx import (  # noqa: E402
    NginxBinary,
    NginxServer,
    NginxUnavailable,
    find_nginx,
)


@pytest.fixture(scope="session")
def nginx_binary() -> NginxBinary:
    """The nginx to test with; skips (saying why) when nginx or its Lua module is missing,
    which fails under CI."""
    try:
        return find_nginx()
    except NginxUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def nginx_factory(nginx_binary, tmp_path):
    """Start private nginx servers: nginx_factory(ring_size=..., knobs=..., workers=...)."""
    servers: list[NginxServer] = []

    def start(**options) -> NginxServer:
        server = NginxServer(nginx_binary, tmp_path / f"nginx{len(servers)}", **options)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def nginx(nginx_factory) -> NginxServer:
    """A private nginx with the exporter and default knobs, on a free loopback port."""
    return nginx_factory()
