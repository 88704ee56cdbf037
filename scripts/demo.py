"""The real chain on loopback for a newcomer: private nginx with the Lua exporter, the service
(twistd) attached to it, and a short load of viewers. Cleans up after itself."""

from __future__ import annotations

import argparse
import http.client
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.nginx import NginxServer, find_nginx  # noqa: E402

VIEWER_PATHS = [
    "/live/hls/foo-high/index.m3u8", "/live/hls/foo-high/seg1.ts", "/live/hls/foo-high/seg2.ts",
    "/live/hls/foo-low/index.m3u8", "/live/hls/foo-low/seg1.ts",
    "/live/dash/bar-low/manifest.mpd", "/live/dash/bar-low/seg1.m4s",
    "/live/hls/foo-high/missing.ts",
]
AGENTS = ["VLC/3.0.18 LibVLC/3.0.18", "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0",
          "AppleCoreMedia/1.0.0.21A329", "ExoPlayerLib/2.19.1"]


def viewers(port: int, n: int, until: float, counter: list) -> None:
    """One viewer: its own loopback address and player, fetching playlists and segments."""
    rnd = random.Random(n)
    ua = AGENTS[n % len(AGENTS)]
    while time.time() < until:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5,
                                          source_address=(f"127.0.0.{10 + n}", 0))
        headers = {"User-Agent": ua}
        if rnd.random() < 0.1:
            headers["Range"] = "bytes=0-999"
        conn.request("GET", rnd.choice(VIEWER_PATHS), headers=headers)
        conn.getresponse().read()
        conn.close()
        counter[0] += 1
        time.sleep(rnd.uniform(0.05, 0.3))


def summarise(line: bytes) -> str:
    d = json.loads(line)
    s = d["streamer-id"]
    return (f"  {d['start-time']} {s['content-id']}/{s['format']}/{s['quality']}: "
            f"{d['data']['client-count']} clients, {d['data']['bytes-sent']} bytes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=25, help="how long viewers watch")
    parser.add_argument("--duration", type=int, default=5, help="interval length (-d)")
    parser.add_argument("--socket", help="send to this sfive hub datagram socket instead")
    parser.add_argument("--raw", action="store_true", help="print datasets as JSON lines")
    args = parser.parse_args()

    prefix = Path(tempfile.mkdtemp(prefix="sfive-demo-"))
    nginx = NginxServer(find_nginx(), prefix / "nginx")
    service = None
    try:
        nginx.start()
        print(f"demo: private nginx with the sfive exporter on {nginx.url('/')}", flush=True)
        command = [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=",
                   "-l", str(prefix / "sfive-ngxlua.log"), "sfive-ngxlua", "-n", "demo",
                   "-d", str(args.duration), "-t", "demo", "-S", "foo/hls/high,low",
                   "-S", "bar/dash/low", "-u", nginx.url("/sfive")]
        if args.socket:
            command += ["-s", args.socket]
        print("demo: " + " ".join(command[command.index("sfive-ngxlua"):]), flush=True)
        service = subprocess.Popen(command, stdout=subprocess.PIPE)
        threading.Thread(target=echo, args=(service, args.raw), daemon=True).start()
        time.sleep(1)
        until = time.time() + args.seconds
        counter = [0]
        threads = [threading.Thread(target=viewers, args=(nginx.port, n, until, counter),
                                    daemon=True) for n in range(8)]
        for t in threads:
            t.start()
        print(f"demo: 8 viewers watching for {args.seconds}s; datasets every "
              f"{args.duration}s (all streamers, empty ones too):", flush=True)
        while any(t.is_alive() for t in threads):
            time.sleep(1)
        print(f"demo: {counter[0]} viewer requests made; waiting for the last interval",
              flush=True)
        time.sleep(args.duration + 2)
        return 0
    finally:
        if service is not None:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=15)
            log = (prefix / "sfive-ngxlua.log").read_text(errors="replace").splitlines()
            print("demo: the service's last log lines:")
            for line in [x for x in log if "reported:" in x][-2:]:
                print("  " + line.split("] ", 1)[-1])
        nginx.stop()
        shutil.rmtree(prefix, ignore_errors=True)
        print("demo: stopped nginx and the service, removed " + str(prefix))


def echo(service: subprocess.Popen, raw: bool) -> None:
    for line in service.stdout:
        if line.startswith(b"{"):
            print(line.decode().rstrip() if raw else summarise(line), flush=True)


if __name__ == "__main__":
    sys.exit(main())
