"""The reliability suite's fixtures (a pytest plugin: ``pytest_plugins = ("helpers.fixtures",)``).

Kept apart from ``helpers.faults`` so that test modules can import the helpers there while pytest
loads this module itself.
"""

from __future__ import annotations

from typing import List

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from helpers.faults import DatagramHub, Exporter, LogCapture, Running
from sfive_ngxlua.settings import Settings


@pytest.fixture
def logs():
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


@pytest_twisted.async_yield_fixture
async def service():
    """``service(settings, sink=..., clock=...)`` builds and starts; all are stopped after."""
    started: List[Running] = []

    def start(settings: Settings, **kw: object) -> Running:
        run = Running(settings, **kw)
        started.append(run)
        return run.start()

    yield start
    for run in reversed(started):
        await run.stop()


@pytest_twisted.async_yield_fixture
async def exporter():
    """A listening exporter, stopped after the test."""
    exp = Exporter().listen()
    yield exp
    await exp.stop()


@pytest.fixture
def dgram_hub(tmp_path):
    """A unix datagram hub at a fresh path, not yet open; closed after the test."""
    hub = DatagramHub(str(tmp_path / "hub.sock"), bind=False)
    yield hub
    hub.close()
