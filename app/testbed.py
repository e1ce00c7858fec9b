"""A federation's machines on one Linux host: each in its own network namespace, with its own address and host
name, joined by a bridge, each machine's link shaped to a bandwidth, any link cut and restored.

What a federation across hospitals meets (a server reached by its DNS name through its certificate, slow uplinks,
a VPN that drops, a server host that dies) without a second machine: ``fedseg testbed up`` makes one namespace
per host (``ip netns``), a veth pair from each into a bridge, addresses in one private /24 no other interface of
this host uses, the host names in each namespace's own ``/etc/hosts`` (``ip netns exec`` mounts
``/etc/netns/<ns>/hosts``), and a token bucket (``tc tbf``) on both ends of a shaped host's link. The bridge has
no address: nothing outside the namespaces reaches in, as nothing connects in to a hospital.

Everything made is listed in a state file (``/run/fedseg-testbed/<name>.json``) before it is made, so
``fedseg testbed down`` removes it all (the processes in each namespace first), also after a failure half-way
up; ``up`` first removes any testbed whose owner process is gone (a killed test). Needs root (CAP_NET_ADMIN).
The ``ip``/``tc`` commands themselves, and the reaping of what the hosts leave running, are
``fedseg.app.testbed_net``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from fedseg.app.testbed_net import (
    TestbedError,
    launch,
    make_host,
    namespace_exists,
    namespace_pids,
    run_command,
    tbf,
)

STATE_DIR = "/run/fedseg-testbed"
DOMAIN = "fedseg.test"  # RFC 2606: never a real name
SUBNET_POOL = ipaddress.ip_network("10.200.0.0/13")  # /24s are picked from here, never one in use on this host
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]{0,7}$")  # short: interface names stay under 16 characters
HOST_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


def can_run() -> str | None:
    """None if this process can build a testbed, else the reason it cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2 / util-linux)"
    return None


@dataclass
class Host:
    name: str  # short name, e.g. "server", "site-1"
    address: str
    namespace: str
    link: str  # the veth end on the bridge (in the root namespace): down cuts the host off
    rate: str | None  # e.g. "20mbit"; None: unshaped

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{DOMAIN}"


@dataclass
class Testbed:
    """A made (or half-made) testbed, as its state file records it."""

    name: str
    subnet: str
    owner_pid: int
    bridge: str
    hosts: dict[str, Host] = field(default_factory=dict)

    # -- state ------------------------------------------------------------------------------------------
    @staticmethod
    def state_path(name: str) -> str:
        return os.path.join(STATE_DIR, f"{name}.json")

    def save(self) -> None:
        os.makedirs(STATE_DIR, exist_ok=True)
        tmp = self.state_path(self.name) + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=1)
        os.replace(tmp, self.state_path(self.name))

    @classmethod
    def load(cls, name: str) -> Testbed:
        with open(cls.state_path(name), encoding="utf-8") as f:
            data = json.load(f)
        hosts = {k: Host(**v) for k, v in data.pop("hosts").items()}
        return cls(**data, hosts=hosts)

    # -- use ----------------------------------------------------------------------------------------------
    def host(self, name: str) -> Host:
        if name not in self.hosts:
            raise TestbedError(f"testbed {self.name}: no host {name!r} (hosts: {sorted(self.hosts)})")
        return self.hosts[name]

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` as it runs on ``host``: in its namespace, with its host name (a UTS namespace of its own)."""
        h = self.host(host)
        return [
            "ip", "netns", "exec", h.namespace,
            "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', h.fqdn, *argv,
        ]  # fmt: skip

    def run(
        self, host: str, argv: Sequence[str], check: bool = False, timeout: float | None = None, **kwargs
    ) -> subprocess.CompletedProcess:
        """``subprocess.run`` of ``argv`` on ``host`` (stdin/stdout/stderr/capture_output/env/cwd/text as there)."""
        if kwargs.pop("capture_output", False):
            kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        with self.popen(host, argv, **kwargs) as process:
            try:
                out, err = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                raise
        done = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        if check:
            done.check_returncode()
        return done

    def popen(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """``argv`` started on ``host`` in a session of its own; what it leaves running is this process's to reap."""
        return launch(self.command(host, argv), **kwargs)

    def set_link(self, host: str, up: bool) -> None:
        """Cut (``up=False``) or restore a host's only link: its packets go nowhere, as with a dropped VPN."""
        run_command("ip", "link", "set", self.host(host).link, "up" if up else "down")

    def shape(self, host: str, rate: str | None) -> None:
        """Set a host's link to ``rate`` both ways (tc units, e.g. ``100mbit``), or unshaped with None."""
        h = self.host(host)
        inside = ["ip", "netns", "exec", h.namespace]
        for device in ([*inside, "tc", "qdisc"], "eth0"), (["tc", "qdisc"], h.link):
            prefix, name = device
            if rate:
                run_command(*prefix, "replace", "dev", name, *tbf(rate))
            else:
                run_command(*prefix, "del", "dev", name, "root", check=False)
        h.rate = rate
        self.save()

    def kill_host(self, host: str, grace: float = 0.0) -> list[int]:
        """Kill every process on ``host`` (SIGTERM and ``grace`` seconds, then SIGKILL); returns their pids."""
        namespace = self.host(host).namespace
        pids = namespace_pids(namespace)
        if grace > 0:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            deadline = time.time() + grace
            while time.time() < deadline and namespace_pids(namespace):
                time.sleep(0.2)
        for pid in namespace_pids(namespace):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 10  # gone, and reaped (a zombie's pid still answers `kill -0`)
        while (namespace_pids(namespace) or any(os.path.exists(f"/proc/{p}") for p in pids)) and time.time() < deadline:
            time.sleep(0.1)
        return pids

    def processes(self) -> dict[str, list[int]]:
        return {name: namespace_pids(h.namespace) for name, h in self.hosts.items() if namespace_exists(h.namespace)}

    def hosts_file(self) -> str:
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{h.address} {h.fqdn} {h.name}" for h in self.hosts.values()]
        return "\n".join(lines) + "\n"

    def down(self, grace: float = 5.0) -> None:
        """Remove every process, namespace, link and file of this testbed; safe to call again."""
        for name, h in self.hosts.items():
            if namespace_exists(h.namespace):
                self.kill_host(name, grace=grace)
                run_command("ip", "netns", "del", h.namespace, check=False)
            shutil.rmtree(os.path.join("/etc/netns", h.namespace), ignore_errors=True)
            run_command("ip", "link", "del", h.link, check=False)
        run_command("ip", "link", "del", self.bridge, check=False)
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.state_path(self.name))


def _subnets_in_use() -> list[ipaddress.IPv4Network]:
    out = run_command("ip", "-o", "-4", "addr", "show").stdout + run_command("ip", "-4", "route", "show").stdout
    found = []
    for token in re.findall(r"\d+\.\d+\.\d+\.\d+(?:/\d+)?", out):
        with contextlib.suppress(ValueError):
            found.append(ipaddress.ip_network(token, strict=False))
    for path in _state_files():  # other testbeds' subnets, even while their namespaces hold them
        with contextlib.suppress(OSError, ValueError, KeyError), open(path, encoding="utf-8") as f:
            found.append(ipaddress.ip_network(json.load(f)["subnet"]))
    return found


def _free_subnet() -> ipaddress.IPv4Network:
    used = _subnets_in_use()
    for subnet in SUBNET_POOL.subnets(new_prefix=24):
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise TestbedError(f"no free /24 in {SUBNET_POOL}")


def _state_files() -> list[str]:
    if not os.path.isdir(STATE_DIR):
        return []
    return [os.path.join(STATE_DIR, f) for f in sorted(os.listdir(STATE_DIR)) if f.endswith(".json")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Tear down every testbed whose owner process is gone (a test that was killed); returns their names."""
    removed = []
    for path in _state_files():
        name = os.path.basename(path)[: -len(".json")]
        try:
            testbed = Testbed.load(name)
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if testbed.owner_pid and not _alive(testbed.owner_pid):  # 0: made by `fedseg testbed up`, kept until down
            testbed.down(grace=0)
            removed.append(name)
    return removed


def up(name: str, hosts: Sequence[str], rates: dict[str, str] | None = None, owner_pid: int | None = None) -> Testbed:
    """Make testbed ``name`` with ``hosts`` (in address order); ``rates`` maps a host to its link's rate (tc units,
    e.g. ``20mbit``), both ways. ``owner_pid`` (default: this process) is the process whose end makes the testbed
    stale; 0 keeps it until ``down``. The testbed is torn down again if any step fails."""
    reason = can_run()
    if reason:
        raise TestbedError(f"testbed {name}: {reason}")
    if not NAME_PATTERN.match(name):
        raise TestbedError(f"testbed name {name!r}: 1-8 lower-case letters and digits, starting with a letter")
    rates = dict(rates or {})
    bad = [h for h in hosts if not HOST_PATTERN.match(h)] + [h for h in rates if h not in hosts]
    if bad or len(set(hosts)) != len(hosts) or not hosts:
        raise TestbedError(f"testbed {name}: bad or repeated host names {bad or list(hosts)}")
    remove_stale()
    if os.path.exists(Testbed.state_path(name)):
        raise TestbedError(f"testbed {name} is up already (fedseg testbed down --name {name})")
    subnet = _free_subnet()
    addresses = list(subnet.hosts())
    owner = os.getpid() if owner_pid is None else owner_pid
    testbed = Testbed(name=name, subnet=str(subnet), owner_pid=owner, bridge=f"{name}-br")
    for i, host in enumerate(hosts):
        testbed.hosts[host] = Host(
            name=host,
            address=str(addresses[i]),
            namespace=f"{name}-{host}",
            link=f"{name}-{i}",
            rate=rates.get(host),
        )
    testbed.save()  # listed before made: down() removes a half-made testbed too
    try:
        run_command("ip", "link", "add", testbed.bridge, "type", "bridge")
        run_command("ip", "link", "set", testbed.bridge, "up")
        for host in testbed.hosts.values():
            make_host(host, subnet.prefixlen, testbed.bridge, testbed.hosts_file())
    except BaseException:
        testbed.down(grace=0)
        raise
    return testbed


@contextlib.contextmanager
def testbed(name: str, hosts: Sequence[str], rates: dict[str, str] | None = None):
    """A testbed for the block; removed with everything on it afterwards, however the block ends."""
    made = up(name, hosts, rates)
    try:
        yield made
    finally:
        made.down()


def down(name: str) -> None:
    try:
        Testbed.load(name).down()
    except FileNotFoundError:
        raise TestbedError(f"testbed {name} is not up") from None


def names() -> list[str]:
    """The testbeds that are up (their state files)."""
    return [os.path.basename(path)[: -len(".json")] for path in _state_files()]


def parse_rates(items: Sequence[str]) -> dict[str, str]:
    """``HOST=RATE`` items (``site-1=20mbit``) as a dict."""
    rates = {}
    for item in items:
        host, sep, rate = item.partition("=")
        if not sep or not re.match(r"^\d+(\.\d+)?[kmg]?bit$", rate):
            raise TestbedError(f"--rate {item!r}: expected HOST=RATE with RATE like 20mbit, 512kbit or 1gbit")
        rates[host] = rate
    return rates


def describe(testbed: Testbed) -> str:
    lines = [f"testbed {testbed.name}: {testbed.subnet}, bridge {testbed.bridge}"]
    for h in testbed.hosts.values():
        lines.append(f"  {h.fqdn:28} {h.address:15} netns {h.namespace}  link {h.link}  {h.rate or 'unshaped'}")
    lines.append(f"run a command on a host: ip netns exec {next(iter(testbed.hosts.values())).namespace} <command>")
    return "\n".join(lines)
