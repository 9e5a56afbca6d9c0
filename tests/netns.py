"""Network namespaces standing in for machines, for the tests of the gateway on several hosts.

`HostNetwork` makes a bridge in the root namespace (the "Redis machine": its address is
`root_address`) and, per host, a namespace joined to the bridge by a veth pair, with an address
of its own and its own loopback. A process started with `ip netns exec <name>` in one sees the
others only through the bridge, as over a LAN: its 127.0.0.1 is its own. Needs root and `ip`
(iproute2); the names carry the test process's pid, so two runs do not collide, and `close`
removes everything it made.
"""

from __future__ import annotations

import os
import shutil
import subprocess


def _ip(*args: str) -> None:
    run = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if run.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {run.stderr.strip()}")


class HostNetwork:
    def __init__(self, hosts: int):
        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise RuntimeError("network namespaces need root and iproute2 (ip)")
        tag = os.getpid() % 100000
        # A /24 of 10.200.0.0/13 chosen by the pid; `_free_subnet` refuses one in use.
        self.prefix = f"10.{200 + tag % 8}.{tag // 8 % 250}"
        self.bridge = f"gwbr{tag}"
        self.root_address = f"{self.prefix}.1"
        self.names = [f"gwhost{tag}-{i}" for i in range(hosts)]
        self.addresses = [f"{self.prefix}.{i + 2}" for i in range(hosts)]
        self._veths = [f"gw{tag}v{i}" for i in range(hosts)]
        self._made: list[tuple[str, str]] = []

    def _free_subnet(self) -> None:
        used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True,
                              timeout=10).stdout
        if f" {self.prefix}." in used:
            raise RuntimeError(f"{self.prefix}.0/24 is already in use here")

    def open(self) -> HostNetwork:
        self._free_subnet()
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made.append(("link", self.bridge))
            _ip("addr", "add", f"{self.root_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for name, address, veth in zip(self.names, self.addresses, self._veths, strict=True):
                _ip("netns", "add", name)
                self._made.append(("netns", name))
                _ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
                self._made.append(("link", veth))
                _ip("link", "set", f"{veth}p", "netns", name)
                _ip("link", "set", veth, "master", self.bridge)
                _ip("link", "set", veth, "up")
                _ip("-n", name, "addr", "add", f"{address}/24", "dev", f"{veth}p")
                _ip("-n", name, "link", "set", f"{veth}p", "up")
                _ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Remove the namespaces and links (run it after their processes are gone)."""
        for kind, name in reversed(self._made):
            try:
                _ip(kind, "del", name)
            except RuntimeError:
                pass  # a veth goes with its peer's namespace
        self._made.clear()
