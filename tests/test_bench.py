"""The benchmark's own parts: a deterministic generator and a baseline that counts fairly.

Totals are checked against a straightforward computation with the standard library
(json, datetime.fromisoformat, re), written independently of bench/baseline.py.
"""

import json
import re
from datetime import datetime

import pytest
from support import exporter_layout

from bench import baseline, gen, mtailrun

FIELDS = {"seq": int, "time": str, "client": str, "ua": str, "url": str, "status": int,
          "bytes-sent": int}


def _record(line: bytes):
    """The record of a well-formed line, or None."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    for name, kind in FIELDS.items():
        if not isinstance(obj.get(name), kind) or isinstance(obj.get(name), bool):
            return None
    try:
        when = datetime.fromisoformat(obj["time"].replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return obj


def _expected(lines):
    streamers = set()
    for spec in gen.STREAMER_IDS:
        cs, fs, qs = (part.split(",") for part in spec.split("/"))
        streamers |= {(c, f, q) for c in cs for f in fs for q in qs}
    url_re = re.compile(gen.NAMEFORMAT)
    accepted, per, clients = 0, {}, {}
    for line in lines:
        rec = _record(line)
        if rec is None or rec["status"] not in (200, 206):
            continue
        m = url_re.match(rec["url"])
        if not m:
            continue
        key = (m["content"], m["format"], m["quality"])
        if key not in streamers:
            continue
        accepted += 1
        per[key] = per.get(key, 0) + rec["bytes-sent"]
        clients.setdefault(key, set()).add((rec["client"], rec["ua"]))
    return accepted, per, sum(len(c) for c in clients.values())


def test_generator_is_deterministic():
    a = b"".join(gen.generate(3000, seed=7))
    assert a == b"".join(gen.generate(3000, seed=7))
    assert a != b"".join(gen.generate(3000, seed=8))
    assert a.count(b"\n") == 3000


def test_generator_lines_look_like_live_traffic():
    lines = list(gen.generate(20_000, seed=3))
    records = [r for r in map(_record, lines) if r is not None]
    bad = len(lines) - len(records)
    assert 0.7 * gen.MALFORMED_FRACTION <= bad / len(lines) <= 1.3 * gen.MALFORMED_FRACTION
    kinds = set()
    for line in lines:
        try:
            obj = json.loads(line.decode("utf-8"))
        except ValueError:
            kinds.add("invalid")
            continue
        if isinstance(obj, dict) and not FIELDS.keys() <= obj.keys():
            kinds.add("missing")
        elif isinstance(obj, dict) and _record(line) is None:
            kinds.add("wrong")
    assert kinds == {"invalid", "missing", "wrong"}
    times = [datetime.fromisoformat(r["time"].replace("Z", "+00:00")) for r in records]
    assert times == sorted(times)
    assert {r["time"][-1] for r in records} == {"Z", "0"}
    assert len({r["client"] for r in records}) > 1000
    assert 20 <= len({r["ua"] for r in records}) <= 100
    statuses = {r["status"] for r in records}
    assert statuses == {200, 206, 304, 404}
    urls = {r["url"] for r in records}
    assert any(u.endswith(".ts") for u in urls) and any(u.endswith(".m4s") for u in urls)
    assert any(u.endswith("index.m3u8") for u in urls) and any(u.endswith(".mpd") for u in urls)
    seconds = {r["time"][:19] for r in records}
    assert len(records) / len(seconds) > 100


def test_generator_lines_are_laid_out_as_the_exporter_writes_them():
    for line in gen.generate(5_000, seed=5):
        record = _record(line)
        if record is not None:
            assert list(record) == list(FIELDS)
            assert line == exporter_layout(record) + b"\n"


def test_baseline_totals_equal_a_straightforward_count():
    lines = list(gen.generate(5000, seed=5))
    totals = baseline.run(lines, gen.STREAMER_IDS, gen.NAMEFORMAT)
    accepted, per, clients = _expected(lines)
    assert accepted > 3000
    assert totals.lines == 5000
    assert totals.accepted == accepted
    assert {k: v for k, v in totals.per_streamer.items() if v} == per
    assert totals.bytes_sent == sum(per.values())
    assert totals.clients == clients


@pytest.mark.skipif(not mtailrun.available(), reason="mtail is not installed")
def test_mtail_program_counts_what_the_baseline_counts(tmp_path):
    src, clean = tmp_path / "in.log", tmp_path / "clean.log"
    gen.write(str(src), 5000, seed=5)
    mtailrun.utf8_clean_copy(str(src), str(clean))
    assert clean.read_bytes().count(b"\n") == 5000
    result = mtailrun.run(str(clean))
    totals = baseline.run(str(src), gen.STREAMER_IDS, gen.NAMEFORMAT)
    assert (result.records, result.bytes_sent) == (totals.accepted, totals.bytes_sent)
    assert result.per_streamer == {k: v for k, v in totals.per_streamer.items() if v}
