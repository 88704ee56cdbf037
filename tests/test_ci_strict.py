"""Under CI=true a skip of a real part fails the run; elsewhere it stays a skip with its
reason. Run on a small suite of its own, with this repository's hook (tests/ci_strict.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = '''
import os, pytest

@pytest.fixture
def nginx_binary():
    pytest.skip("nginx is not installed (apt-get install nginx libnginx-mod-http-lua)")

def test_needs_nginx(nginx_binary):
    pass

@pytest.mark.skipif(True, reason="promtool is not installed")
def test_needs_promtool():
    pass

@pytest.mark.skipif(True, reason="root reads any file")
def test_permissions():
    pass

@pytest.mark.xfail(reason="known")
def test_known():
    assert False
'''


@pytest.mark.parametrize("ci, failed", [("true", 2), ("", 0)])
def test_skips_of_real_parts_fail_under_ci(tmp_path, ci, failed):
    (tmp_path / "test_suite.py").write_text(SUITE)
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "ci_strict",
         "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    summary = done.stdout.strip().splitlines()[-1]
    if failed:
        assert done.returncode == 1, done.stdout
        # a skip at setup (a fixture's, a skipif's) becomes an error of that test
        assert f"{failed} errors" in summary and "1 skipped" in summary, summary
        assert "nginx is not installed" in done.stdout and "CI=true" in done.stdout
    else:
        assert done.returncode == 0, done.stdout
        assert "3 skipped" in summary, summary
    assert "1 xfailed" in summary
