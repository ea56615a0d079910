"""Who is asking: API keys (checked in constant time, never logged) and the client's address
(`X-Forwarded-For` believed only from a trusted proxy). Pure functions over settings values."""

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
        `X-Forwarded-For` (read right to left, as each proxy appends the address it saw)."""
        address = peer or "unknown"
        if not forwarded_for or not self._trusted(address):
            return address
        for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                break  # a malformed chain: believe no further
            address = hop
            if not self._trusted(hop):
                break
        return address

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)


def parse_networks(values: Iterable[str]) -> list[Network]:
    """Addresses and CIDRs; raises ValueError naming the first bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as err:
            raise ValueError(f"{value!r} is not an address or CIDR") from err
    return networks
