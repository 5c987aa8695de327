"""Where a callback may go: a callback URL's host is resolved, and every address it
resolves to must be a public (global) one, or inside a network the operator allows.

Checking the resolved addresses (not the spelling of the host) refuses every way of
writing an internal address: ``127.1``, ``0x7f000001``, ``2130706433``, ``[::1]``,
``[::ffff:127.0.0.1]``, or a name that resolves to one of them.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence

import anyio

__all__ = [
    "Address",
    "Network",
    "Resolver",
    "check",
    "networks",
    "refusal",
    "resolve",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[Address]]]

RESOLVE_TIMEOUT = 2.0


def networks(allow: str | Iterable[str] | None) -> tuple[Network, ...]:
    """The operator's allow list: addresses or networks (``127.0.0.1``, ``10.0.0.0/8``,
    ``::1``), as an iterable or one comma-separated string; ``ValueError`` if one is not
    an address or network."""
    if allow is None:
        return ()
    items = allow.split(",") if isinstance(allow, str) else allow
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in items if item.strip())


def refusal(address: Address, allow: Sequence[Network] = ()) -> str | None:
    """Why a callback must not go to ``address`` (``"loopback"``, ``"private"``...), or
    None if it may: a global address, or one inside ``allow``."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in allow):
        return None
    kinds = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
    )
    for kind, found in kinds:
        if found:
            return kind
    return None if address.is_global else "non-global"


async def resolve(host: str, port: int) -> list[Address]:
    """Every address ``host`` resolves to (a numeric host in any spelling included)."""
    with anyio.fail_after(RESOLVE_TIMEOUT):
        found = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[Address] = []
    for *_, sockaddr in found:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


async def check(
    host: str, port: int, allow: Sequence[Network], resolver: Resolver = resolve
) -> Address:
    """The address to send a callback for ``host`` to: ``ValueError`` saying why if the
    host does not resolve or any of its addresses is refused."""
    try:
        addresses = await resolver(host, port)
    except (OSError, TimeoutError, UnicodeError) as exc:
        raise ValueError(f"cannot resolve {host!r}") from exc
    if not addresses:
        raise ValueError(f"cannot resolve {host!r}")
    for address in addresses:
        kind = refusal(address, allow)
        if kind is not None:
            raise ValueError(
                f"{host!r} resolves to {kind} address {address}: callbacks there are refused "
                "unless the operator allows it (callback_allow)"
            )
    return addresses[0]
