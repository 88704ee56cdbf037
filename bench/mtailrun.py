"""Run bench/sfive.mtail over a file with mtail in one-shot mode, timed by child rusage.

mtail 3.0.0~rc50 (Debian bookworm) stops feeding lines to its programs at the first
line holding invalid UTF-8 or U+FFFD and then buffers the rest of the file (quadratic
time, gigabytes of memory), so it is given a copy of the input in which such bytes are
escaped (`\\xff`): the line count is unchanged and only already malformed lines change.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PROGRAM = Path(__file__).with_name("sfive.mtail")


@dataclass
class MtailResult:
    """CPU seconds (user + sys of the mtail process), wall seconds and its counters."""

    cpu: float
    wall: float
    records: int = 0
    bytes_sent: int = 0
    per_streamer: dict[tuple[str, str, str], int] = field(default_factory=dict)


def available() -> bool:
    """Whether an mtail binary is on PATH."""
    return shutil.which("mtail") is not None


def version() -> str:
    """mtail's version line."""
    out = subprocess.run(["mtail", "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else "?"


def utf8_clean_copy(src: str, dst: str) -> None:
    """Copy src to dst with invalid UTF-8 and U+FFFD escaped, line by line."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        for line in f:
            if line.isascii():
                out.write(line)
            else:
                text = line.decode("utf-8", "backslashreplace").replace("\ufffd", "\\ufffd")
                out.write(text.encode("utf-8"))


def _counters(doc: dict, name: str) -> dict[tuple[str, str, str], int]:
    out: dict[tuple[str, str, str], int] = {}
    for metric in doc.get(name, []):
        keys = metric.get("Keys", [])
        for lv in metric.get("LabelValues", []):
            labels = dict(zip(keys, lv["Labels"]))
            key = (labels["content"], labels["format"], labels["quality"])
            out[key] = out.get(key, 0) + int(lv["Value"]["Value"])
    return out


def run(log: str, gomaxprocs: int | None = 1) -> MtailResult:
    """One one-shot run of sfive.mtail over log (already UTF-8 clean)."""
    with tempfile.TemporaryDirectory(prefix="sfive-mtail-") as tmp:
        progs = Path(tmp, "progs")
        progs.mkdir()
        shutil.copy(PROGRAM, progs / PROGRAM.name)
        env = dict(os.environ)
        if gomaxprocs:
            env["GOMAXPROCS"] = str(gomaxprocs)
        cmd = ["mtail", "--one_shot", "--one_shot_format=json", "--progs", str(progs),
               "--logs", log, "--address", "127.0.0.1", "--port", "0", "--logtostderr",
               "--vm_logs_runtime_errors=false"]
        with open(Path(tmp, "out.json"), "wb") as out, open(Path(tmp, "err"), "wb") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
            _, status, ru = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            tail = Path(tmp, "err").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"mtail exited with {proc.returncode}:\n{tail}")
        doc = json.loads(Path(tmp, "out.json").read_text())
    per = _counters(doc, "sfive_bytes_sent")
    records = sum(_counters(doc, "sfive_records").values())
    if _counters(doc, "sfive_client_bytes_sent") != per:
        raise RuntimeError("mtail's per-client bytes do not add up to its per-stream bytes")
    return MtailResult(cpu=ru.ru_utime + ru.ru_stime, wall=wall, records=records,
                       bytes_sent=sum(per.values()), per_streamer=per)
