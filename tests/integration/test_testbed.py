"""The multi-host testbed itself (``fedseg testbed``): hosts with their own address and name, shaped and cut links,
and a teardown that leaves nothing behind, also after a failure half-way up or an owner that was killed."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from helpers.commands import VENV

from fedseg.app import testbed as testbeds

pytestmark = pytest.mark.skipif(testbeds.can_run() is not None, reason=f"testbed: {testbeds.can_run()}")

RECEIVE = (
    "import socket;s=socket.socket();s.bind(('0.0.0.0',9000));s.listen();c,_=s.accept();\nwhile c.recv(65536): pass"
)
SEND = "import socket,sys;s=socket.create_connection((sys.argv[1],9000),timeout=5);s.sendall(b'x'*int(sys.argv[2]))"


def leftovers(name: str) -> list[str]:
    """What of testbed ``name`` is still on this machine: namespaces, links, hosts files, its state file."""
    found = [n for n in os.listdir("/run/netns") if n.startswith(f"{name}-")] if os.path.isdir("/run/netns") else []
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [line.split(": ")[1] for line in links.splitlines() if f" {name}-" in line]
    found += [n for n in os.listdir("/etc/netns") if n.startswith(f"{name}-")] if os.path.isdir("/etc/netns") else []
    return found + ([testbeds.Testbed.state_path(name)] if os.path.exists(testbeds.Testbed.state_path(name)) else [])


def send(testbed, sender: str, receiver: str, size: int) -> float:
    """Seconds to move ``size`` bytes from one host to another by the receiver's host name."""
    server = testbed.popen(receiver, [sys.executable, "-c", RECEIVE])
    try:
        time.sleep(0.5)
        started = time.time()
        testbed.run(sender, [sys.executable, "-c", SEND, f"{receiver}.{testbeds.DOMAIN}", str(size)], check=True)
        server.wait(timeout=60)
        return time.time() - started
    finally:
        server.kill()


def test_hosts_have_their_own_names_and_addresses_links_are_shaped_and_down_leaves_nothing():
    testbed = testbeds.up("fsgt", ["server", "site-1", "site-2"], {"site-1": "20mbit"})
    try:
        assert len({h.address for h in testbed.hosts.values()}) == 3
        name = testbed.run("site-1", ["hostname"], capture_output=True, text=True, check=True).stdout.strip()
        assert name == "site-1.fedseg.test"
        resolved = testbed.run("site-2", ["getent", "hosts", "server.fedseg.test"], capture_output=True, text=True)
        assert resolved.stdout.split()[0] == testbed.host("server").address
        # 2.5 MB at 20 Mbit/s takes at least 1 s; the unshaped host is not held to it
        assert send(testbed, "site-1", "server", 2_500_000) > 0.9
        assert (
            "rate 20Mbit"
            in subprocess.run(
                ["tc", "qdisc", "show", "dev", testbed.host("site-1").link], capture_output=True, text=True
            ).stdout
        )
        testbed.set_link("site-2", up=False)  # cut: nothing gets through, either way
        cut = testbed.run("site-2", [sys.executable, "-c", SEND, "server.fedseg.test", "10"], capture_output=True)
        assert cut.returncode != 0
        testbed.set_link("site-2", up=True)
        assert send(testbed, "site-2", "server", 1000) < 30
        sleeper = testbed.popen("site-2", ["sleep", "600"])
    finally:
        testbed.down()
    assert sleeper.wait(timeout=10) != 0  # the processes on its hosts went with it
    assert leftovers("fsgt") == []


def test_a_failure_half_way_up_removes_what_was_made():
    with pytest.raises(testbeds.TestbedError, match="tc qdisc"):
        testbeds.up("fsgf", ["server", "site-1"], {"site-1": "20 mbit"})
    assert leftovers("fsgf") == []


def test_a_testbed_whose_owner_was_killed_is_removed_by_the_next_one():
    owner = subprocess.Popen(["sleep", "600"])
    testbeds.up("fsgk", ["a", "b"], owner_pid=owner.pid)
    owner.kill()
    owner.wait()
    with testbeds.testbed("fsgn", ["a"]):
        assert leftovers("fsgk") == []


def test_the_command_brings_a_testbed_up_and_down():
    fedseg = os.path.join(VENV, "bin", "fedseg")
    up = subprocess.run(
        [fedseg, "testbed", "up", "fsgc", "--hosts", "server", "site-1", "--rate", "site-1=100mbit"],
        capture_output=True,
        text=True,
    )
    try:
        assert up.returncode == 0, up.stderr
        assert "site-1.fedseg.test" in up.stdout and "100mbit" in up.stdout
        assert "fsgc" in subprocess.run([fedseg, "testbed", "list"], capture_output=True, text=True).stdout
    finally:
        down = subprocess.run([fedseg, "testbed", "down", "fsgc"], capture_output=True, text=True)
    assert down.returncode == 0, down.stderr
    assert leftovers("fsgc") == []
    again = subprocess.run([fedseg, "testbed", "down", "fsgc"], capture_output=True, text=True)
    assert again.returncode == 1 and again.stderr.strip() == "fedseg testbed: testbed fsgc is not up"
