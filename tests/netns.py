"""Hosts for the fleet tests: Linux network namespaces on one virtual switch, made and removed by the test.

Each host is a namespace with one veth link to a bridge that lives in a namespace of its own, so
nothing in the machine's own network is touched. A host has its own address (10.77.N.x/24) and
only its loopback and that link: a process started in it (``Host.popen``) can reach the other hosts
and nothing else. Faults are what they are on a real network:

* ``cut`` / ``restore``: the host's link goes down and up (a partition: packets vanish, no RST, so
  callers wait out their deadlines);
* ``netem``: loss and delay on the host's link (``tc qdisc ... netem``);
* ``unplug``: the link is deleted (the host is gone for good; its processes keep running, unreachable).

Needs root and iproute2 (``ip netns``); ``Network.available()`` says why not where it cannot run.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass, field

_networks = itertools.count()


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    return subprocess.run(command, capture_output=True, text=True, check=check)


@dataclass
class Host:
    network: Network
    name: str
    address: str
    netns: str
    link: str  # the host's end of its veth pair
    switch_port: str  # the other end, on the bridge
    processes: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, command: list[str], **kwargs) -> subprocess.Popen:
        """``command`` run inside this host (its network namespace), as a child of the test."""
        process = subprocess.Popen(["ip", "netns", "exec", self.netns, *command], **kwargs)
        self.processes.append(process)
        return process

    def cut(self) -> None:
        _ip("link", "set", "dev", self.switch_port, "down", netns=self.network.switch)

    def restore(self) -> None:
        _ip("link", "set", "dev", self.switch_port, "up", netns=self.network.switch)

    def netem(self, *spec: str) -> None:
        """``tc qdisc replace ... netem SPEC`` on the host's link, e.g. ("loss", "10%", "delay", "5ms")."""
        subprocess.run(["ip", "netns", "exec", self.netns, "tc", "qdisc", "replace", "dev", self.link, "root",
                        "netem", *spec], check=True, capture_output=True, text=True)

    def unplug(self) -> None:
        _ip("link", "del", self.switch_port, netns=self.network.switch)


class Network:
    """A switch and the hosts plugged into it; ``close()`` removes every namespace (and so every link)."""

    def __init__(self) -> None:
        n = next(_networks)
        self.prefix = f"ddt{os.getpid() % 10000}n{n}"
        self.subnet = f"10.77.{(os.getpid() + n) % 250 + 1}"
        self.switch = f"{self.prefix}-sw"
        self.hosts: list[Host] = []
        _ip("netns", "add", self.switch)
        _ip("link", "add", "br0", "type", "bridge", netns=self.switch)
        _ip("link", "set", "br0", "up", netns=self.switch)

    @staticmethod
    def available() -> str | None:
        """None where namespaces can be made here; else why not."""
        if shutil.which("ip") is None:
            return "iproute2 (ip) is not installed"
        if os.geteuid() != 0:
            return "network namespaces need root"
        probe = f"ddtprobe{os.getpid()}"
        made = _ip("netns", "add", probe, check=False)
        if made.returncode:
            return f"cannot make a network namespace here: {made.stderr.strip()}"
        _ip("netns", "del", probe, check=False)
        return None

    def netem_available(self) -> str | None:
        """None where ``tc ... netem`` works on this kernel (the sch_netem module); else why not."""
        host = self.hosts[0] if self.hosts else self.host("probe")
        done = subprocess.run(["ip", "netns", "exec", host.netns, "tc", "qdisc", "replace", "dev", host.link, "root",
                               "netem", "delay", "1ms"], capture_output=True, text=True)
        if done.returncode:
            return f"tc netem is not available here: {done.stderr.strip() or done.returncode}"
        subprocess.run(["ip", "netns", "exec", host.netns, "tc", "qdisc", "del", "dev", host.link, "root"],
                       capture_output=True)
        return None

    def host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        netns, link, port = f"{self.prefix}-{name}", f"eth{index}", f"p{index}"
        address = f"{self.subnet}.{10 + index}"
        _ip("netns", "add", netns)
        _ip("link", "add", link, "netns", netns, "type", "veth", "peer", "name", port, "netns", self.switch)
        _ip("link", "set", port, "master", "br0", netns=self.switch)
        _ip("link", "set", port, "up", netns=self.switch)
        _ip("addr", "add", f"{address}/24", "dev", link, netns=netns)
        _ip("link", "set", link, "up", netns=netns)
        _ip("link", "set", "lo", "up", netns=netns)
        host = Host(self, name, address, netns, link, port)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        for host in self.hosts:
            for process in host.processes:
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=30)
            _ip("netns", "del", host.netns, check=False)
        _ip("netns", "del", self.switch, check=False)
