"""Deterministic generator of realistic nginx-lua exporter lines for the benchmarks.

Live traffic is a few thousand viewers (ip + user agent) polling a handful of HLS
and DASH streams: the same clients, URL prefixes and timestamps over and over, times
increasing with many requests per second, mostly status 200.  The generator models
that with a fixed pool of viewers, each watching one stream, and inserts about
MALFORMED_FRACTION bad lines (invalid JSON, missing fields, wrong types).  Lines are laid
out byte for byte as nginx/sfive.lua writes them: compact, keys in its order, strings
escaped as it escapes them (", \\ and control characters; other characters as UTF-8).

Usage: python bench/gen.py --lines N --seed S [-o FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from datetime import datetime, timedelta, timezone
from typing import Iterator

MALFORMED_FRACTION = 0.01
START = datetime(2026, 11, 28, 9, 0, 0, tzinfo=timezone.utc)
LOCAL = timezone(timedelta(hours=1))
Z_FRACTION = 0.1
REQUESTS_PER_SECOND = 800
SEGMENT_SECONDS = 6

CONTENTS = (("av", 6), ("event-2", 3), ("test", 1))
FORMATS = ("hls", "dash")
QUALITIES = (("high", 5), ("medium", 3), ("low", 2))
STREAMER_IDS = ("av,event-2/hls,dash/high,medium,low",)
"""Streamer ids configured in the benchmark: content "test" is served but not configured."""

NAMEFORMAT = "/[^/]+/(?P<format>hls|dash)/(?P<content>.+)-(?P<quality>[^-]+)/.*"
VIEWERS = 4000
IPS = 3000
STATUSES = ((200, 930), (206, 30), (304, 20), (404, 20))
OTHER_URLS = ("/", "/favicon.ico", "/live/player.js", "/live/index.html", "/robots.txt")

_BROWSERS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/{v}.0.0.0 Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64; rv:{v}.0) Gecko/20100101 Firefox/{v}.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.{v} Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_{v} like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/{v}.0.0.0 Mobile Safari/537.36",
    "VLC/3.0.{v} LibVLC/3.0.{v}",
    "AppleCoreMedia/1.0.0.21A{v} (iPhone; U; CPU OS 17_0 like Mac OS X; en_us)",
    'ExoPlayerLib/2.19.{v} "quoted"',
)


def _user_agents(rng: random.Random) -> list[str]:
    uas = [b.format(v=rng.randrange(0, 130)) for b in _BROWSERS for _ in range(5)]
    return sorted(set(uas))


def _ips(rng: random.Random) -> list[str]:
    ips = set()
    while len(ips) < IPS:
        if rng.random() < 0.15:
            a, b, c = rng.randrange(65536), rng.randrange(65536), rng.randrange(1, 65536)
            ips.add(f"2001:db8:{a:x}:{b:x}::{c:x}")
        else:
            a, b = rng.choice((10, 81, 93, 178, 192, 213)), rng.randrange(256)
            c, d = rng.randrange(256), rng.randrange(1, 255)
            ips.add(f"{a}.{b}.{c}.{d}")
    return sorted(ips)


def _streams() -> tuple[list[tuple[str, str, str]], list[int]]:
    streams, weights = [], []
    for content, cw in CONTENTS:
        for fmt in FORMATS:
            for quality, qw in QUALITIES:
                streams.append((content, fmt, quality))
                weights.append(cw * qw * (3 if fmt == "hls" else 2))
    return streams, weights


def _segment_bytes(quality: str) -> int:
    return {"high": 1_500_000, "medium": 700_000, "low": 300_000}[quality]


class _Clock:
    """Millisecond timestamps, formatted with a cached per-second prefix."""

    def __init__(self) -> None:
        self.ms = int(START.timestamp() * 1000)
        self._sec = -1
        self._local = self._utc = ""

    def format(self, utc: bool) -> str:
        sec, ms = divmod(self.ms, 1000)
        if sec != self._sec:
            self._sec = sec
            t = datetime.fromtimestamp(sec, timezone.utc)
            self._utc = t.strftime("%Y-%m-%dT%H:%M:%S")
            self._local = t.astimezone(LOCAL).strftime("%Y-%m-%dT%H:%M:%S")
        if utc:
            return f"{self._utc}.{ms:03d}Z"
        return f"{self._local}.{ms:03d}+01:00"


def _dumps(obj: object) -> str:
    """JSON as nginx/sfive.lua writes it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _malformed(rng: random.Random, good: dict) -> bytes:
    """One bad line of a random kind, derived from a good record."""
    kind = rng.randrange(6)
    if kind == 0:
        text = _dumps(good)
        return text[: rng.randrange(1, len(text) - 1)].encode() + b"\n"
    if kind == 1:
        return rng.choice((b"not json at all\n", b"{\"seq\":1,,}\n", b"[1, 2, 3]\n",
                           b"\"just a string\"\n", b"{\"time\": \"\xff\xfe\"}\n"))
    bad = dict(good)
    if kind == 2:
        del bad[rng.choice(("time", "client", "ua", "url", "status", "bytes-sent"))]
    elif kind == 3:
        key = rng.choice(("status", "bytes-sent"))
        bad[key] = str(good[key])
    elif kind == 4:
        bad[rng.choice(("time", "url", "client", "ua", "bytes-sent", "status"))] = None
    else:
        bad["time"] = rng.choice(("yesterday", "2026-13-45T25:61:00.000+01:00", "1764320400"))
    return _dumps(bad).encode() + b"\n"


def generate(n: int, seed: int = 1) -> Iterator[bytes]:
    """Yield n exporter lines (bytes, newline-terminated), the same for the same seed."""
    rng = random.Random(seed)
    uas = _user_agents(rng)
    ips = _ips(rng)
    streams, sweights = _streams()
    viewers = []
    for _ in range(VIEWERS):
        ip = rng.choice(ips)
        ua = rng.choice(uas)
        content, fmt, quality = rng.choices(streams, sweights)[0]
        prefix = f"/live/{fmt}/{content}-{quality}/"
        viewers.append((ip, ua, _dumps(ip), _dumps(ua), fmt, prefix,
                        _segment_bytes(quality)))
    heavy = viewers[: VIEWERS // 10]
    statuses = [s for s, w in STATUSES for _ in range(w)]
    clock = _Clock()
    mean_gap = 2000.0 / REQUESTS_PER_SECOND
    seg0 = rng.randrange(1000, 5000)
    t0 = clock.ms
    elapsed = 0.0
    rand = rng.random
    for seq in range(1, n + 1):
        elapsed += rand() * mean_gap
        clock.ms = t0 + int(elapsed)
        ip, ua, ipj, uaj, fmt, prefix, segsize = (
            heavy[int(rand() * len(heavy))] if rand() < 0.5 else viewers[int(rand() * VIEWERS)])
        r = rand()
        seg = seg0 + (clock.ms - t0) // (SEGMENT_SECONDS * 1000)
        if r < 0.03:
            url, size = OTHER_URLS[int(rand() * len(OTHER_URLS))], 4000
        elif fmt == "hls":
            if r < 0.18:
                url, size = prefix + "index.m3u8", 420
            else:
                url, size = f"{prefix}{seg}.ts", segsize
        elif r < 0.13:
            url, size = prefix + "index.mpd", 1800
        elif r < 0.16:
            url, size = prefix + "init.mp4", 900
        else:
            url, size = f"{prefix}seg-{seg}.m4s", segsize
        status = statuses[int(rand() * len(statuses))]
        if status == 200:
            sent = size + 250 + int(rand() * size * 0.05)
        elif status == 206:
            sent = int(rand() * size) + 300
        else:
            sent = 180 + int(rand() * 200)
        t = clock.format(rand() < Z_FRACTION)
        if rand() < MALFORMED_FRACTION:
            yield _malformed(rng, {"seq": seq, "time": t, "client": ip, "ua": ua, "url": url,
                                   "status": status, "bytes-sent": sent})
            continue
        yield (f'{{"seq":{seq},"time":"{t}","client":{ipj},"ua":{uaj},"url":"{url}",'
               f'"status":{status},"bytes-sent":{sent}}}\n').encode()


def write(path: str, n: int, seed: int = 1) -> None:
    """Write n generated lines to path."""
    with open(path, "wb") as f:
        f.writelines(generate(n, seed))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=100_000, help="number of lines (100000)")
    p.add_argument("--seed", type=int, default=1, help="random seed (1)")
    p.add_argument("-o", "--output", help="output file (default: standard output)")
    a = p.parse_args(argv)
    if a.output:
        write(a.output, a.lines, a.seed)
    else:
        out = sys.stdout.buffer
        try:
            out.writelines(generate(a.lines, a.seed))
            out.flush()
        except BrokenPipeError:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
