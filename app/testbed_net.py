"""The Linux side of a testbed (``fedseg.app.testbed``): the ``ip`` and ``tc`` commands that make a host's network
namespace and its shaped link into the bridge, and the reaping of what the hosts' commands leave running.

The commands need root (CAP_NET_ADMIN): ``fedseg.app.testbed.can_run`` says whether this process has it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedseg.app.testbed import Host


class TestbedError(RuntimeError):
    """The testbed cannot be made or used (not root, a bad name, a command that failed)."""


def run_command(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """``argv`` run here (in the root namespace); a failure is a ``TestbedError`` naming it, unless not ``check``."""
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise TestbedError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done


def tbf(rate: str) -> list[str]:
    """A token bucket at ``rate``: a 64 KiB burst, and packets queued at most 200 ms (then dropped, as a full
    router queue does; TCP slows down to the rate)."""
    return ["root", "tbf", "rate", rate, "burst", "64kb", "latency", "200ms"]


def make_host(host: Host, prefix: int, bridge: str, hosts_file: str) -> None:
    """Make ``host``'s namespace and its link into ``bridge`` (shaped if the host has a rate), and its /etc/hosts."""
    ns = host.namespace
    run_command("ip", "netns", "add", ns)
    inside = ["ip", "netns", "exec", ns]
    run_command(*inside, "ip", "link", "set", "lo", "up")
    run_command("ip", "link", "add", host.link, "type", "veth", "peer", "name", host.link + "h", "netns", ns)
    run_command(*inside, "ip", "link", "set", host.link + "h", "name", "eth0")
    run_command(*inside, "ip", "addr", "add", f"{host.address}/{prefix}", "dev", "eth0")
    run_command(*inside, "ip", "link", "set", "eth0", "up")
    run_command("ip", "link", "set", host.link, "master", bridge)
    run_command("ip", "link", "set", host.link, "up")
    if host.rate:  # the uplink (leaving the host) and the downlink (leaving the bridge towards it)
        run_command(*inside, "tc", "qdisc", "replace", "dev", "eth0", *tbf(host.rate))
        run_command("tc", "qdisc", "replace", "dev", host.link, *tbf(host.rate))
    etc = os.path.join("/etc/netns", ns)
    os.makedirs(etc, exist_ok=True)
    with open(os.path.join(etc, "hosts"), "w", encoding="utf-8") as f:
        f.write(hosts_file)


def namespace_exists(namespace: str) -> bool:
    return os.path.exists(os.path.join("/run/netns", namespace))


def namespace_pids(namespace: str) -> list[int]:
    if not namespace_exists(namespace):
        return []
    out = run_command("ip", "netns", "pids", namespace, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]


def launch(command: list[str], **kwargs) -> subprocess.Popen:
    """``command`` started in a session of its own; what it leaves running is this process's to reap."""
    _adopt_orphans()
    with _launch_lock:
        process = subprocess.Popen(command, start_new_session=True, **kwargs)
        _launched.add(process.pid)
    return process


# What the hosts' commands leave running (a kit's start.sh forks its daemon and exits) is adopted by this process
# (PR_SET_CHILD_SUBREAPER) and reaped when it ends. Otherwise a killed host leaves zombies of PID 1 on machines
# whose init does not reap, and NVFlare's start script takes a zombie's pid in daemon_pid.fl for a running server.
# Only orphans are reaped: a command this process started itself (``_launched``), or a process of its own session
# (started by anything else here), is left to its Popen.
_launch_lock = threading.Lock()
_launched: set[int] = set()
_reaping = False
PR_SET_CHILD_SUBREAPER = 36


def _adopt_orphans() -> None:
    global _reaping
    if _reaping:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        return
    _reaping = True
    threading.Thread(target=_reap_orphans, name="testbed-reaper", daemon=True).start()


def _reap_orphans() -> None:
    own, session = os.getpid(), os.getsid(0)
    while True:
        time.sleep(0.3)
        with _launch_lock:
            for pid in _ended_children(own):
                if pid in _launched or _session(pid) == session:
                    continue
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, session, ..."""
    with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
        return f.read().rsplit(")", 1)[1].split()


def _ended_children(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = _stat(int(entry))
                if fields[0] == "Z" and int(fields[1]) == parent:
                    found.append(int(entry))
    return found


def _session(pid: int) -> int | None:
    try:
        return int(_stat(pid)[3])
    except (OSError, IndexError, ValueError):
        return None
