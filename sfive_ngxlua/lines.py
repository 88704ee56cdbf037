"""Incremental splitting of a byte stream into lines, with a bound on a line's length."""

from __future__ import annotations

from typing import List, Optional, Tuple


class LineSplitter:
    """Feed chunks, get complete lines back; over-long lines are skipped without being buffered.

    Each chunk is split once (no re-splitting of what was buffered before), so the cost is linear
    in the input whatever the chunking.
    """

    def __init__(self, max_length: int = 65536) -> None:
        self.max_length = max_length
        self.too_long = 0
        self._pending = b""
        self._skipping = False

    def feed(self, data: bytes) -> List[bytes]:
        """Return the lines completed by ``data`` (without their line ends; empty ones dropped)."""
        start = 0
        if self._skipping:
            start = data.find(b"\n") + 1
            if start == 0:
                return []
            self._skipping = False
        lines = data[start:].split(b"\n") if start else data.split(b"\n")
        if self._pending:
            lines[0] = self._pending + lines[0]
            self._pending = b""
        last = lines.pop()
        limit = self.max_length
        if len(last) > limit and not (len(last) == limit + 1 and last.endswith(b"\r")):
            self._skipping = True
            self.too_long += 1
        else:
            self._pending = last
        if (b"\r" not in data and not (lines and lines[0].endswith(b"\r"))
                and (not lines or max(map(len, lines)) <= limit)):
            return list(filter(None, lines))
        out = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                continue
            if len(line) > limit:
                self.too_long += 1
                continue
            out.append(line)
        return out

    def feed_blocks(self, data: bytes, size: int = 4096) -> Optional[List[bytes]]:
        """``feed`` for the common case, without cutting the chunk into lines: the complete
        lines as blocks of whole lines joined by "\\n", each block at most ``size`` bytes
        (so no line in it is over-long); a block may hold empty lines, which do not count.
        None, with nothing consumed, unless the chunk is plain (no CR, no line longer than
        ``size``, none being skipped): then call ``feed``."""
        pending = self._pending
        size = min(size, self.max_length)
        if self._skipping or b"\r" in data or b"\r" in pending:
            return None
        last = data.rfind(b"\n")
        if last < 0 or len(data) - last - 1 > self.max_length:
            return None
        blocks = []
        start = 0
        if pending:
            start = data.find(b"\n") + 1
            if len(pending) + start - 1 > size:
                return None
            blocks.append(pending + data[:start - 1])
        while last - start > size:
            cut = data.rfind(b"\n", start, start + size + 1)
            if cut < 0:
                return None
            blocks.append(data[start:cut])
            start = cut + 1
        if start < last:
            blocks.append(data[start:last])
        self._pending = data[last + 1:]
        return blocks

    def reset(self) -> int:
        """Forget a partial line (the stream was cut); return how many bytes were discarded."""
        dropped = len(self._pending)
        self._pending = b""
        self._skipping = False
        return dropped

    def state(self) -> Tuple[bytes, bool, int]:
        """What the splitter holds (the partial line, whether it is skipping an over-long one,
        the over-long count): ``restore`` it to feed the same bytes again after a failure."""
        return self._pending, self._skipping, self.too_long

    def restore(self, state: Tuple[bytes, bool, int]) -> None:
        self._pending, self._skipping, self.too_long = state

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held back: at most ``max_length``, plus the CR of a CRLF
        that a chunk boundary split."""
        return len(self._pending)
