"""Run a command under a unit file's confinement, as far as it can be had without systemd.

For tests/test_debian.py on machines where systemd is not PID 1 (containers). Run as root by
Debian's python3 (standard library only), inside a private mount namespace:

    unshare --mount --uts --ipc --propagation private \
        python3 confine.py UNIT-FILE USER -- COMMAND...

What it applies, read from the unit file: ProtectSystem=strict (every mount read-only, per
mount: ``remount,bind,ro`` leaves the superblocks and the host's view alone),
ReadWritePaths=, StateDirectory=, RuntimeDirectory= (writable; they must exist, made as
systemd makes them), ProtectKernelTunables= and ProtectControlGroups= (/proc/sys and /sys
read-only), PrivateTmp=, ProtectHome=yes, PrivateDevices= (a /dev of the pseudo devices, plus
the syslog socket that systemd links to journald's), ProtectHostname= and RemoveIPC= in part
(UTS and IPC namespaces from unshare), User=/Group= with the user's groups,
CapabilityBoundingSet= (empty), NoNewPrivileges=, UMask=, and a seccomp filter made with
libseccomp for SystemCallFilter= (systemd's own groups, from ``systemd-analyze
syscall-filter``; @default always allowed), SystemCallErrorNumber=, SystemCallArchitectures=
native, RestrictAddressFamilies= (socket(2) families; others get the error number, where
systemd answers EAFNOSUPPORT) and MemoryDenyWriteExecute=.

What it does not: PrivateUsers= (no user namespace), ProtectProc=/ProcSubset= (no private
/proc), IPAddressDeny=/IPAddressAllow= and DevicePolicy= (cgroup BPF programs),
ProtectKernelLogs=, ProtectClock=,
RestrictNamespaces=, RestrictRealtime=, RestrictSUIDSGID=, LockPersonality=, PrivateMounts=
(the namespace is private anyway), KeyringMode=.
"""

import ctypes
import errno
import os
import pwd
import re
import subprocess
import sys
import tempfile


def unit_settings(path):
    settings = {}
    for line in open(path):
        m = re.match(r"^([A-Za-z]+)=(.*)$", line.strip())
        if m:
            settings.setdefault(m.group(1), []).append(m.group(2))
    return settings


def sh(*cmd):
    subprocess.run(cmd, check=True)


def mounts():
    out = []
    for line in open("/proc/self/mountinfo"):
        target = line.split()[4].replace("\\040", " ")
        out.append(target)
    return out


def under(path, top):
    return path == top or path.startswith(top.rstrip("/") + "/")


def file_system(settings, writable):
    # PrivateDevices=: a /dev of the pseudo devices only (and the syslog socket, which
    # systemd links to journald's).
    dev = tempfile.mkdtemp(prefix="confine-dev-", dir="/run")
    sh("mount", "-t", "tmpfs", "-o", "mode=0755,nosuid,noexec", "tmpfs", dev)
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        open(os.path.join(dev, name), "w").close()
        sh("mount", "--bind", "/dev/" + name, os.path.join(dev, name))
    if os.path.exists("/dev/log"):
        open(os.path.join(dev, "log"), "w").close()
        sh("mount", "--bind", "/dev/log", os.path.join(dev, "log"))
    os.symlink("/proc/self/fd", os.path.join(dev, "fd"))
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    os.chmod(os.path.join(dev, "shm"), 0o1777)
    sh("mount", "--move", dev, "/dev")
    os.rmdir(dev)
    # ReadWritePaths=, StateDirectory=, RuntimeDirectory=: their own mounts, before the rest
    # goes read-only.
    for path in writable:
        sh("mount", "--bind", path, path)
    # ProtectSystem=strict (and ProtectKernelTunables=, ProtectControlGroups=): every mount
    # read-only, per mount (remount,bind: the superblock and the host's view are untouched).
    sh("mount", "--bind", "/proc/sys", "/proc/sys")
    for target in mounts():
        if any(under(target, w) for w in writable) or under(target, "/dev"):
            continue
        if under(target, "/proc") and target != "/proc/sys":
            continue
        subprocess.run(["mount", "-o", "remount,bind,ro", target], check=False,
                       stderr=subprocess.DEVNULL)
    # PrivateTmp=
    for path in ("/tmp", "/var/tmp"):
        sh("mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", path)
    # ProtectHome=yes
    for path in ("/home", "/root", "/run/user"):
        if os.path.isdir(path):
            sh("mount", "-t", "tmpfs", "-o", "ro,mode=0000", "tmpfs", path)


def syscall_groups():
    groups, current = {}, None
    out = subprocess.run(["systemd-analyze", "syscall-filter"], check=True,
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.split()[0], [])
        elif line.strip() and not line.strip().startswith("#") and current is not None:
            current.append(line.strip())
    return groups


def expand(names, groups):
    out = set()
    for name in names:
        if name.startswith("@"):
            out |= expand(groups[name], groups)
        else:
            out.add(name)
    return out


class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64),
                ("b", ctypes.c_uint64)]


ALLOW = 0x7FFF0000
CMP_EQ, CMP_MASKED_EQ = 4, 7


def seccomp(settings):
    """SystemCallFilter= (allow list, then deny lists), SystemCallErrorNumber=,
    SystemCallArchitectures=native, RestrictAddressFamilies=, MemoryDenyWriteExecute=."""
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(Cmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    groups = syscall_groups()
    allowed = expand(["@default"], groups)
    for value in settings["SystemCallFilter"]:
        deny = value.startswith("~")
        names = expand(value.lstrip("~").split(), groups)
        allowed = allowed - names if deny else allowed | names
    errno_name = settings.get("SystemCallErrorNumber", ["EPERM"])[-1]
    ctx = lib.seccomp_init(0x00050000 | getattr(errno, errno_name))
    assert ctx

    def rule(name, *cmps):
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            return
        array = (Cmp * max(1, len(cmps)))(*cmps)
        rc = lib.seccomp_rule_add_array(ctx, ALLOW, nr, len(cmps), array)
        assert rc == 0, (name, rc)

    special = {"socket", "mmap", "mmap2", "mprotect", "pkey_mprotect", "shmat"}
    for name in sorted(allowed - special):
        rule(name)
    families = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10}
    if "socket" in allowed:
        for family in settings["RestrictAddressFamilies"][-1].split():
            rule("socket", Cmp(0, CMP_EQ, families[family], 0))
    mdwe = settings.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes"
    write, execute = 0x2, 0x4
    for name in ("mmap", "mmap2"):
        if name in allowed:
            for prot in ((0, write, execute) if mdwe else ()):
                rule(name, Cmp(2, CMP_MASKED_EQ, write | execute, prot))
            if not mdwe:
                rule(name)
    for name in ("mprotect", "pkey_mprotect"):
        if name in allowed:
            rule(name, *([Cmp(2, CMP_MASKED_EQ, execute, 0)] if mdwe else []))
    if "shmat" in allowed:
        rule("shmat", *([Cmp(2, CMP_MASKED_EQ, 0o100000, 0)] if mdwe else []))
    assert lib.seccomp_load(ctx) == 0


def main():
    unit, user = sys.argv[1], sys.argv[2]
    command = sys.argv[sys.argv.index("--") + 1:]
    settings = unit_settings(unit)
    writable = []
    for key, base in (("RuntimeDirectory", "/run"), ("StateDirectory", "/var/lib")):
        for name in settings.get(key, []):
            writable.append(os.path.join(base, name))
    for path in settings.get("ReadWritePaths", []):
        path = path.lstrip("-")
        if os.path.isdir(path):
            writable.append(path)
    file_system(settings, writable)
    libc = ctypes.CDLL(None, use_errno=True)
    # CapabilityBoundingSet= (empty): drop every capability from the bounding set.
    cap = 0
    while libc.prctl(24, cap, 0, 0, 0) == 0:  # PR_CAPBSET_DROP, until EINVAL past the last
        cap += 1
    # User=, Group= (and the user's groups, as systemd gives them); the uid change clears the
    # permitted and effective capabilities.
    account = pwd.getpwnam(user)
    os.setgroups(os.getgrouplist(user, account.pw_gid))
    os.setresgid(account.pw_gid, account.pw_gid, account.pw_gid)
    os.setresuid(account.pw_uid, account.pw_uid, account.pw_uid)
    os.umask(int(settings["UMask"][-1], 8))
    os.chdir("/")
    # NoNewPrivileges=
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    seccomp(settings)
    os.execve(command[0], command, {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})


if __name__ == "__main__":
    main()
