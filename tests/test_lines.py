"""Line splitting: any chunking gives the same lines; over-long lines are skipped, not held."""

from sfive_ngxlua.lines import LineSplitter


def split_all(chunks, limit=100):
    s = LineSplitter(limit)
    out = []
    for c in chunks:
        out.extend(s.feed(c))
    return out, s


def test_chunk_boundaries_do_not_matter():
    data = b"one\ntwo\r\nthree\n\nfour"
    whole, _ = split_all([data])
    for cut in range(len(data) + 1):
        parts, s = split_all([data[:cut], data[cut:]])
        assert parts == whole == [b"one", b"two", b"three"]
        assert s.pending == 4


def test_bytewise_feeding():
    data = b"alpha\nbeta\ngamma\n"
    parts, _ = split_all([data[i:i + 1] for i in range(len(data))])
    assert parts == [b"alpha", b"beta", b"gamma"]


def test_too_long_lines_are_skipped_and_counted_across_chunks():
    parts, s = split_all([b"ok\n" + b"x" * 60, b"y" * 60, b"z" * 60, b"\nafter\n"], limit=100)
    assert parts == [b"ok", b"after"]
    assert s.too_long == 1
    assert s.pending == 0


def test_endless_line_is_never_buffered():
    s = LineSplitter(1000)
    for _ in range(1000):
        assert s.feed(b"x" * 4096) == []
        assert s.pending <= 1000
    assert s.too_long == 1
    assert s.feed(b"\nnext\n") == [b"next"]


def test_reset_discards_the_partial_line():
    s = LineSplitter(100)
    assert s.feed(b"full\npart") == [b"full"]
    assert s.reset() == 4
    assert s.feed(b"ial\nnew\n") == [b"ial", b"new"]
