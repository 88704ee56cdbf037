"""Options: the original's command line, defaults, and refusals with one clear message."""

import socket

import pytest
from twisted.python import usage

from sfive_ngxlua.settings import DEFAULT_NAMEFORMAT, ModelOptions, Options, parse_streamer_ids


def parse(*argv):
    options = Options()
    options.parseOptions(list(argv))
    return options.settings()


def test_defaults_match_the_original_and_the_issue():
    s = parse("-S", "av/hls/high")
    assert s.url == "http://localhost/sfive"
    assert s.duration == 15
    assert s.nameformat == DEFAULT_NAMEFORMAT
    assert s.hostname == socket.gethostname()
    assert s.socket is None and s.hub is None
    assert s.statuses == frozenset({200, 206})
    assert s.grace == 1.0
    assert s.tags == ()


def test_original_short_options():
    s = parse("-s", "/run/sfive/sock", "-n", "host1", "-d", "2", "-t", "a", "-t", "b",
              "-S", "C1,C2/hls,dash/high,low", "-u", "https://x:1/sfive", "-F",
              r"/(?P<format>[^/]+)/(?P<content>[^/]+)/(?P<quality>[^/]+)")
    assert (s.socket, s.hostname, s.duration, s.tags) == ("/run/sfive/sock", "host1", 2, ("a", "b"))
    assert s.url == "https://x:1/sfive"
    assert len(s.streamers) == 8
    assert s.streamers[0] == ("C1", "hls", "high")
    assert s.streamers[-1] == ("C2", "dash", "low")


def test_streamer_ids_combine_and_deduplicate():
    assert parse_streamer_ids(["a/hls/hi", "a,b/hls/hi"]) == (
        ("a", "hls", "hi"), ("b", "hls", "hi"))


@pytest.mark.parametrize("argv, message", [
    ([], "at least one --streamer-id"),
    (["-S", "a/b"], "must be three parts"),
    (["-S", "a/b/c/d"], "must be three parts"),
    (["-S", "a//c"], "empty format part"),
    (["-S", "a,/b/c"], "empty content part"),
    (["-S", "a/b/c", "-F", "(unclosed"], "not a valid regular expression"),
    (["-S", "a/b/c", "-F", "(?P<content>.*)/(?P<format>.*)"], "lacks the named group(s) quality"),
    (["-S", "a/b/c", "-d", "0"], "--duration must be a positive integer"),
    (["-S", "a/b/c", "-d", "1.5"], "--duration must be a positive integer"),
    (["-S", "a/b/c", "-d", "x"], "--duration must be a positive integer"),
    (["-S", "a/b/c", "-u", "ftp://host/sfive"], "must be an http:// or https:// URL"),
    (["-S", "a/b/c", "-u", "localhost/sfive"], "must be an http:// or https:// URL"),
    (["-S", "a/b/c", "--status", "200,ok"], "'ok' is not an HTTP status code"),
    (["-S", "a/b/c", "--grace", "-1"], "--grace must be a non-negative"),
    (["-S", "a/b/c", "--queue-limit", "0"], "--queue-limit must be a positive integer"),
    (["-S", "a/b/c", "-s", "/x", "--hub", "unix:path=/y"], "either --socket or --hub"),
    (["-S", "a/b/c", "--hub", "/y"], "not a client endpoint"),
    (["-S", "a/b/c", "--hub", "tcp:host=x"], "not a client endpoint"),
    (["-S", "a/b/c", "-u", "http://host:abc/sfive"], "--url 'http://host:abc/sfive'"),
    (["-S", "a/b/c", "-u", "http://u:p@host:99999/x"], "out of range"),
    (["-S", "a/b/c", "--metrics", "tcp:abc"], "not a server endpoint"),
    (["-S", "a/b/c", "--metrics", "bogus:1"], "not a server endpoint"),
    (["-S", "a/b/c", "--flush-period", "2"], "--flush-period goes with --file"),
])
def test_invalid_options_are_refused_with_a_clear_message(argv, message):
    with pytest.raises(usage.UsageError) as e:
        parse(*argv)
    assert message in str(e.value)


def test_model_options_have_no_exporter_url():
    """Replay shares the model options but has no --url."""
    options = ModelOptions()
    with pytest.raises(usage.UsageError):
        options.parseOptions(["-S", "a/b/c", "-u", "http://x/"])


@pytest.mark.parametrize("argv, reason", [
    (["--hub", "tcp:host=hub"], "(tcp needs port=)"),
    (["--hub", "tcp:hub"], "(tcp needs port=)"),
    (["--hub", "/run/sfive/pipe"],
     "(no endpoint type before '/run/sfive/pipe': a unix socket is unix:path=/run/sfive/pipe)"),
    (["--hub", "unix:"], "(unix needs path=PATH)"),
    (["--hub", "unix:path=/p:mode=x"], "(unix has no parameter mode=)"),
    (["--hub", "tcp:host=hub:port=99999"], "(port 99999 is out of range (1-65535))"),
    (["--hub", "tcp:host=hub:port=4o00"], "('4o00' is not a whole number)"),
    (["--hub", "bogus:1"], "(unknown endpoint type 'bogus')"),
    (["--metrics", "tcp:abc"], "('abc' is not a whole number)"),
    (["--metrics", "tcp:9166:interfase=127.0.0.1"], "(tcp has no parameter interfase=)"),
    (["--metrics", "tcp:70000"], "(port 70000 is out of range (0-65535))"),
])
def test_endpoint_errors_read_as_the_operator_wrote_them(argv, reason):
    """Twisted's TypeError about a constructor's arguments is not a message for an operator."""
    with pytest.raises(usage.UsageError) as e:
        parse("-S", "a/b/c", *argv)
    message = str(e.value)
    assert reason in message and "__init__" not in message and "_parse" not in message
    assert message.startswith(f"{argv[0]} {argv[1]!r}: not a ")


def test_good_endpoints_pass():
    hub = "unix:path=/run/sfive/pipe"
    assert parse("-S", "a/b/c", "--hub", hub).hub == hub
    assert parse("-S", "a/b/c", "--hub", "tcp:host=hub:port=4000").hub
    assert parse("-S", "a/b/c", "--metrics", "tcp:9166:interface=127.0.0.1").metrics


def test_console_commands_refuse_in_one_line(capsys):
    """replay and retire: one line on standard error, exit 64, no usage text."""
    from sfive_ngxlua.replay import main

    with pytest.raises(SystemExit) as e:
        main(["-S", "a/b/c", "--max-clinets", "5", "-"])
    assert e.value.code == 64
    err = capsys.readouterr().err
    assert err == ("sfive-ngxlua-replay: option --max-clinets not recognized (did you mean "
                   "--max-clients?); sfive-ngxlua-replay --help lists the options\n")
