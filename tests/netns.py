"""Two network namespaces joined by a veth pair, made by a test and removed after it: a server
end and a client end with link-local addresses, so the client's packets can be dropped without
touching the machine's own network (nothing is added to the namespace the suite runs in).

Sockets are made inside a namespace by a short-lived thread that enters it (`setns` changes only
the calling thread's namespace, and a socket stays in the namespace it was made in), so the test
process itself never moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

_CLONE_NEWNET = 0x40000000
SERVER_ADDRESS = "169.254.77.1"  # link-local, and only inside the test's own namespaces
CLIENT_ADDRESS = "169.254.77.2"
# Drop everything the client's namespace receives or sends: a peer that vanished (unplugged, out
# of coverage), which acknowledges nothing and says nothing.
_VANISH = """
table inet vanish {
    chain input { type filter hook input priority 0; policy drop; }
    chain output { type filter hook output priority 0; policy drop; }
}
"""


def _unavailable(why: str) -> None:
    """Skip where namespaces cannot be made, except on CI where that is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"network namespaces are required on CI: {why}")
    pytest.skip(f"network namespaces cannot be made here: {why}")


async def _run(*args: str, stdin: bytes | None = None) -> None:
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(10):
        _, err = await proc.communicate(stdin)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)}: {err.decode(errors='replace').strip()}")


def _in_namespace(name: str, make: Callable[[], socket.socket]) -> socket.socket:
    """`make()` run by a thread inside namespace `name`."""
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def enter_and_make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {name}")
            finally:
                os.close(fd)
            made.append(make())
        except BaseException as err:  # handed to the caller's thread
            failed.append(err)

    thread = threading.Thread(target=enter_and_make, name=f"netns-{name}")
    thread.start()
    thread.join(10)
    if failed:
        raise failed[0]
    if not made:
        raise RuntimeError(f"could not make a socket in {name}")
    return made[0]


@dataclass
class VethPair:
    server_ns: str
    client_ns: str

    def listener(self) -> socket.socket:
        """A listening socket on the server end, any port."""

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((SERVER_ADDRESS, 0))
            sock.listen(16)
            sock.setblocking(False)
            return sock

        return _in_namespace(self.server_ns, make)

    def client(self) -> socket.socket:
        """An unconnected, non-blocking TCP socket on the client end."""

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            return sock

        return _in_namespace(self.client_ns, make)

    async def vanish_client(self) -> None:
        """From now on the client's namespace drops every packet, both ways."""
        try:
            await _run(
                "ip", "netns", "exec", self.client_ns, "nft", "-f", "-", stdin=_VANISH.encode()
            )  # fmt: skip
        except RuntimeError as err:  # a kernel without nf_tables
            _unavailable(f"packets cannot be dropped: {err}")


@contextlib.asynccontextmanager
async def veth_pair() -> AsyncIterator[VethPair]:
    if os.geteuid() != 0:
        _unavailable("not root")
    if shutil.which("ip") is None:
        _unavailable("iproute2 (`ip`) is not installed")
    if shutil.which("nft") is None:
        _unavailable("nftables (`nft`) is not installed; scripts/ensure-tools.sh installs it")
    tag = uuid.uuid4().hex[:8]
    pair = VethPair(server_ns=f"aisrv-{tag}", client_ns=f"aicli-{tag}")
    made: list[str] = []
    try:
        for name in (pair.server_ns, pair.client_ns):
            try:
                await _run("ip", "netns", "add", name)
            except RuntimeError as err:
                _unavailable(str(err))
            made.append(name)
        await _run(
            "ip", "link", "add", "s0", "netns", pair.server_ns, "type", "veth",
            "peer", "name", "c0", "netns", pair.client_ns,
        )  # fmt: skip
        for ns, dev, address in (
            (pair.server_ns, "s0", SERVER_ADDRESS),
            (pair.client_ns, "c0", CLIENT_ADDRESS),
        ):
            await _run("ip", "-n", ns, "addr", "add", f"{address}/30", "dev", dev)
            await _run("ip", "-n", ns, "link", "set", dev, "up")
        yield pair
    finally:
        for name in made:  # removing a namespace removes its end of the veth pair too
            with contextlib.suppress(RuntimeError):
                await _run("ip", "netns", "delete", name)
