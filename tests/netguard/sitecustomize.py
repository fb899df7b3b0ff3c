"""Loopback-only network guard for the test suite and every Python process it starts.

tests/conftest.py puts this directory first on PYTHONPATH, so Python runs this file at
start-up in each child; conftest also calls install() in the pytest process itself.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from typing import Any

ENV_VAR = "TRAINKIT_NETGUARD"
MARK = "__trainkit_netguard__"
MESSAGE_PREFIX = "trainkit test guard: connection to"
_ALLOWED_NAMES = frozenset({"localhost", "localhost."})
_INET_FAMILIES = frozenset({socket.AF_INET, getattr(socket, "AF_INET6", socket.AF_INET)})


def enabled(environ: Any = None) -> bool:
    """Whether the guard is on: it is unless TRAINKIT_NETGUARD is "0".

    Fail closed: this file is only ever on PYTHONPATH because the suite put it there,
    so a child that lost the variable (a scrubbed environment) still stays on loopback.
    """
    env = os.environ if environ is None else environ
    return str(env.get(ENV_VAR, "1")).strip() != "0"


def is_allowed_host(host: object) -> bool:
    """True for loopback addresses (127.0.0.0/8, ::1, mapped) and the name localhost."""
    if isinstance(host, (bytes, bytearray)):
        try:
            host = bytes(host).decode("ascii")
        except UnicodeDecodeError:
            return False
    if not isinstance(host, str):
        return False
    name = host.strip().lower()
    if name in _ALLOWED_NAMES:
        return True
    # "[::1]" and "fe80::1%eth0" are how some callers spell IPv6 hosts.
    name = name.strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False  # any other host name would need a DNS query: not allowed
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def _describe(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address)


def _blocked(target: str) -> OSError:
    return OSError(
        f"{MESSAGE_PREFIX} {target} blocked: tests may only reach loopback "
        "(127.0.0.0/8, ::1, localhost)"
    )


def _check_socket_address(sock: socket.socket, address: object) -> None:
    if sock.family not in _INET_FAMILIES:
        return  # unix sockets, netlink: never leave the machine
    host = address[0] if isinstance(address, tuple) and address else address
    if not is_allowed_host(host):
        raise _blocked(_describe(address))


def _mark(func: Callable[..., Any]) -> Callable[..., Any]:
    setattr(func, MARK, True)
    return func


def install() -> bool:
    """Wrap the socket entry points in this process; returns False if already installed."""
    if getattr(socket.getaddrinfo, MARK, False):
        return False

    true_connect = socket.socket.connect
    true_connect_ex = socket.socket.connect_ex
    true_sendto = socket.socket.sendto
    true_create_connection = socket.create_connection
    true_getaddrinfo = socket.getaddrinfo
    true_gethostbyname = socket.gethostbyname
    true_gethostbyname_ex = socket.gethostbyname_ex
    true_gethostbyaddr = socket.gethostbyaddr
    true_getnameinfo = socket.getnameinfo

    def connect(self: socket.socket, address: Any) -> None:
        _check_socket_address(self, address)
        return true_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        _check_socket_address(self, address)
        return true_connect_ex(self, address)

    def sendto(self: socket.socket, data: Any, *args: Any) -> int:
        # sendto(data, address) or sendto(data, flags, address): UDP needs no connect().
        if args:
            _check_socket_address(self, args[-1])
        return true_sendto(self, data, *args)

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        if not is_allowed_host(address[0]):
            raise _blocked(_describe(address))
        return true_create_connection(address, *args, **kwargs)

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        # host None asks for the wildcard/passive address: no lookup leaves the machine.
        if host is not None and not is_allowed_host(host):
            raise _blocked(f"{host}:{port}" if port is not None else str(host))
        return true_getaddrinfo(host, port, *args, **kwargs)

    def gethostbyname(host: str) -> str:
        if not is_allowed_host(host):
            raise _blocked(str(host))
        return true_gethostbyname(host)

    def gethostbyname_ex(host: str) -> tuple[str, list[str], list[str]]:
        if not is_allowed_host(host):
            raise _blocked(str(host))
        return true_gethostbyname_ex(host)

    def gethostbyaddr(ip: str) -> tuple[str, list[str], list[str]]:
        if not is_allowed_host(ip):
            raise _blocked(str(ip))
        return true_gethostbyaddr(ip)

    def getnameinfo(sockaddr: Any, flags: int) -> tuple[str, str]:
        if not is_allowed_host(sockaddr[0]):
            raise _blocked(_describe(sockaddr))
        return true_getnameinfo(sockaddr, flags)

    socket.socket.connect = _mark(connect)  # type: ignore[method-assign]
    socket.socket.connect_ex = _mark(connect_ex)  # type: ignore[method-assign]
    socket.socket.sendto = _mark(sendto)  # type: ignore[method-assign]
    socket.create_connection = _mark(create_connection)
    socket.getaddrinfo = _mark(getaddrinfo)
    socket.gethostbyname = _mark(gethostbyname)
    socket.gethostbyname_ex = _mark(gethostbyname_ex)
    socket.gethostbyaddr = _mark(gethostbyaddr)
    socket.getnameinfo = _mark(getnameinfo)
    return True


if __name__ == "sitecustomize" and enabled():
    install()
