"""Pod networking for the plan-running harness: what a CNI plugin gives pods.

A bridge on the host with the first address of a /24, and for each pod a network
namespace joined to the bridge by a veth pair, with an address of its own and a
default route through the bridge. Every pod can bind the same ports (8000, 5557) on
its own address, as pods do; the host (where the operator and the tests run) and the
other pods reach it there. Needs root and ``ip`` (iproute2); ``unavailable()`` says why
not otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "pod networks need root (network namespaces)"
    for tool in ("ip", "unshare", "setpriv"):
        if shutil.which(tool) is None:
            return f"pod networks need {tool!r} (iproute2 / util-linux)"
    probe = subprocess.run(["ip", "netns", "add", f"kvmprobe{os.getpid()}"], capture_output=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", f"kvmprobe{os.getpid()}"], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")


@dataclass
class PodNetwork:
    """Invariant: every name in ``pods`` has a namespace ``<tag>-<n>`` and an address
    in ``subnet``; ``teardown`` removes them all and the bridge."""

    tag: str = field(default_factory=lambda: f"kvm{os.getpid() % 100000}")
    pods: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (netns, ip)
    _next: int = 2

    def __post_init__(self) -> None:
        pid = os.getpid()
        self.subnet = f"10.{200 + pid % 50}.{pid // 50 % 250}"
        self.bridge = f"{self.tag}br"[:15]

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    def setup(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add(self, pod: str) -> tuple[str, str]:
        """A namespace and an address for ``pod`` (its netns name, its IP)."""
        n = self._next
        self._next += 1
        if n > 250:
            raise RuntimeError("the harness's pod network is full (250 pods)")
        ns, host_if, ip = f"{self.tag}-{n}", f"{self.tag}v{n}"[:15], f"{self.subnet}.{n}"
        _ip("netns", "add", ns)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", host_if, "master", self.bridge, "up")
        _ip("addr", "add", f"{ip}/24", "dev", "eth0", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)
        _ip("route", "add", "default", "via", self.gateway, ns=ns)
        self.pods[pod] = (ns, ip)
        return ns, ip

    def remove(self, pod: str) -> None:
        entry = self.pods.pop(pod, None)
        if entry is not None:
            subprocess.run(["ip", "netns", "del", entry[0]], capture_output=True)

    def teardown(self) -> None:
        for pod in list(self.pods):
            self.remove(pod)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
