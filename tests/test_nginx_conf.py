"""``sfive-ngxlua-nginx-conf``: a pip user's way to the nginx files. The installed command's
copy runs in a real nginx with the Lua module (the exporter streams a request it served)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from support import wait_for

from lab.nginx import fetch, subscribe

COMMAND = str(Path(sys.executable).parent / "sfive-ngxlua-nginx-conf")


def test_it_says_where_the_files_are_and_how_to_copy_them():
    done = subprocess.run([COMMAND], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    directory = Path(re.match(r"# the sfive-ngxlua nginx files are in (/\S+)/", done.stdout)[1])
    assert (directory / "sfive.lua").is_file() and (directory / "sfive.conf").is_file()
    assert "sfive-ngxlua-nginx-conf --copy /etc/nginx/sfive-ngxlua" in done.stdout


def test_print_writes_one_file_and_refuses_others():
    shipped = (Path(__file__).parent.parent / "nginx" / "sfive.lua").read_text()
    done = subprocess.run([COMMAND, "--print", "sfive.lua"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout == shipped
    bad = subprocess.run([COMMAND, "--print", "nginx.conf"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 64 and len(bad.stderr.splitlines()) == 1
    assert "not one of sfive.lua, sfive.conf" in bad.stderr


@pytest_twisted.inlineCallbacks
def test_the_copy_runs_in_a_real_nginx(tmp_path, nginx_factory):
    target = tmp_path / "sfive-ngxlua"
    done = subprocess.run([COMMAND, "--copy", str(target)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"include {target}/sfive.conf;" in done.stdout
    assert f"include {target}/sfive-location.conf;" in done.stdout
    conf = (target / "sfive.conf").read_text()
    assert f'lua_package_path "{target}/?.lua;;";' in conf and "/usr/share/" not in conf
    assert (target / "README.md").read_text() == (
        Path(__file__).parent.parent / "nginx" / "README.md").read_text()
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["README.md", "sfive-location.conf", "sfive-log.conf", "sfive-log.logrotate",
         "sfive.conf", "sfive.lua"])
    # nginx includes the copied sfive.conf as it is, which loads the copied sfive.lua
    nginx = nginx_factory(http_config=conf)
    _, stream = yield subscribe(nginx)
    status, _ = yield fetch(nginx.url("/live/hls/foo-high/seg1.ts"), ua="copied-conf")
    assert status == 200
    yield wait_for(lambda: any(r["ua"] == "copied-conf" for r in stream.records()),
                   timeout=20, what="the request in the exporter's stream")
    stream.close()
