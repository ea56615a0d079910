"""Who is asking: API keys (checked in constant time, never logged) and the client's address
(`X-Forwarded-For` believed only from a trusted proxy, each address in one canonical spelling so
that one client has one budget). Pure functions over settings values."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def key_id(key: str) -> str:
    """A short, stable, non-reversible name for a key: what logs and limits see."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Access:
    key_digests: tuple[tuple[bytes, str], ...] = ()  # (sha256 of key, key id)
    trusted: tuple[Network, ...] = ()

    @classmethod
    def build(cls, api_keys: Iterable[str], trusted_proxies: Iterable[str]) -> Access:
        digests = tuple((hashlib.sha256(k.encode()).digest(), key_id(k)) for k in api_keys)
        return cls(digests, tuple(parse_networks(trusted_proxies)))

    @property
    def auth_required(self) -> bool:
        return bool(self.key_digests)

    def authenticate(self, authorization: str | None) -> str | None:
        """The key id for a `Bearer` header that carries an accepted key, else None.

        Every stored digest is compared, in constant time, whatever matched first."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        presented = hashlib.sha256(authorization[7:].strip().encode()).digest()
        found = None
        for digest, ident in self.key_digests:
            if hmac.compare_digest(digest, presented):
                found = ident
        return found

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str:
        """The peer, or, when the peer is a trusted proxy, the nearest untrusted address in
        `X-Forwarded-For` (read right to left, as each proxy appends the address it saw), in
        `canonical_address` form."""
        address = canonical_address(peer or "") or peer or "unknown"
        if not forwarded_for or not self._trusted(address):
            return address
        for hop in reversed(forwarded_for.split(",")):
            canonical = canonical_address(hop)
            if canonical is None:
                break  # a malformed chain: believe no further
            address = canonical
            if not self._trusted(canonical):
                break
        return address

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)


def canonical_address(text: str) -> str | None:
    """One spelling per address, or None when `text` is not one: surrounding spaces, a port
    (`1.2.3.4:80`, `[::1]:80`), brackets and an IPv6 zone are dropped; an IPv4-mapped IPv6
    address becomes its IPv4 address; IPv6 is written compressed and in lower case."""
    text = text.strip()
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if not bracket or (port and not _is_port(port)):
            return None
        text = host
    elif text.count(":") == 1:  # IPv4 with a port (IPv6 has at least two colons)
        host, _, port = text.partition(":")
        if not _is_port(":" + port):
            return None
        text = host
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _is_port(text: str) -> bool:
    """`:` and one to five ASCII digits."""
    digits = text[1:]
    return text.startswith(":") and 0 < len(digits) <= 5 and digits.isascii() and digits.isdigit()


def parse_networks(values: Iterable[str]) -> list[Network]:
    """Addresses and CIDRs; raises ValueError naming the first bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as err:
            raise ValueError(f"{value!r} is not an address or CIDR") from err
    return networks
