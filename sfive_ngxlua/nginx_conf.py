"""``sfive-ngxlua-nginx-conf``: where the nginx side (the Lua exporter, its configuration
snippets, the access-log format) is installed, and a copy of it for nginx to include."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

from twisted.python import usage

from . import __version__
from .settings import parse_command_line

DEBIAN_DIR = Path("/usr/share/sfive-ngxlua/nginx")
"""Where the Debian package installs the files, and the directory the shipped snippets name."""

FILES = ("sfive.lua", "sfive.conf", "sfive-location.conf", "sfive-log.conf",
         "sfive-log.logrotate", "README.md")


def nginx_dir() -> Path:
    """The installed files: inside the Python package (pip), the source tree (a checkout), or
    the Debian package's directory."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "nginx", here.parent / "nginx", DEBIAN_DIR):
        if (candidate / "sfive.lua").is_file():
            return candidate
    raise FileNotFoundError("the sfive-ngxlua nginx files are not installed (looked in "
                            f"{here / 'nginx'} and {DEBIAN_DIR})")


def text_for(name: str, directory: Path) -> str:
    """A file's text; in the snippets the directory they name (``lua_package_path``, the
    include lines in the comments) set to ``directory``."""
    text = (nginx_dir() / name).read_text(encoding="utf-8")
    return text.replace(f"{DEBIAN_DIR}/", f"{directory}/") if name.endswith(".conf") else text


def copy(target: Path) -> List[Path]:
    """Copy the files into ``target`` (made if needed), pointing at it; the paths written."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name in FILES:
        if not (nginx_dir() / name).is_file():
            continue
        path = target / name
        path.write_text(text_for(name, target), encoding="utf-8")
        path.chmod(0o644)
        written.append(path)
    return written


def how_to_include(directory: Path) -> str:
    return (f"# in nginx's http {{ }}:\n    include {directory}/sfive.conf;\n"
            f"# in the server {{ }} the service fetches from (loopback, port 80):\n"
            f"    include {directory}/sfive-location.conf;\n"
            f"# or, for nginx's own access log as the source (--file), in http {{ }}:\n"
            f"    include {directory}/sfive-log.conf;\n"
            f"# then: nginx -t && systemctl reload nginx\n")


class Options(usage.Options):
    synopsis = "[--copy DIR | --print FILE]"
    longdesc = ("Without options: where the nginx files are and how to include them. "
                f"Files: {', '.join(FILES)}.")
    optParameters = [
        ["copy", "c", None, "copy the files into DIR (made if needed) with sfive.conf's "
                            "lua_package_path set to DIR, e.g. /etc/nginx/sfive-ngxlua"],
        ["print", "p", None, "write FILE (e.g. sfive.lua) to standard output"],
    ]

    def opt_version(self) -> None:
        """print the version and exit"""
        print(f"sfive-ngxlua-nginx-conf {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self["copy"] and self["print"]:
            raise usage.UsageError("give either --copy or --print, not both")
        if self["print"] and self["print"] not in FILES:
            raise usage.UsageError(f"--print {self['print']!r}: not one of {', '.join(FILES)}")
        if self["copy"] is not None and not self["copy"].strip():
            raise usage.UsageError("--copy: empty path")


def main(argv: Optional[List[str]] = None) -> int:
    options = Options()
    parse_command_line(options, argv, "sfive-ngxlua-nginx-conf")
    try:
        source = nginx_dir()
        if options["print"]:
            sys.stdout.write(text_for(options["print"], source))
            return 0
        if options["copy"]:
            target = Path(os.path.abspath(options["copy"]))
            for path in copy(target):
                sys.stderr.write(f"wrote {path}\n")
            sys.stdout.write(how_to_include(target))
            return 0
    except OSError as e:
        sys.stderr.write(f"sfive-ngxlua-nginx-conf: {e}\n")
        return 1
    if source == DEBIAN_DIR:
        sys.stdout.write(f"# the sfive-ngxlua nginx files are in {source}/\n"
                         + how_to_include(source))
    else:
        sys.stdout.write(
            f"# the sfive-ngxlua nginx files are in {source}/, but sfive.conf names "
            f"{DEBIAN_DIR}/: copy them first, e.g.\n"
            "    sfive-ngxlua-nginx-conf --copy /etc/nginx/sfive-ngxlua\n"
            "# which prints the include lines for that directory.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
