"""Tests never touch the network: a guard on Python's sockets that lets loopback through and stops the rest.

`install()` wraps name lookups (`socket.getaddrinfo`, `gethostbyname`, `gethostbyname_ex`) and outbound
addresses (`socket.socket.connect`, `connect_ex`, `sendto`). A host that is not loopback raises
`NetworkBlocked` before the real call runs, so nothing is looked up or sent, and is recorded in
`blocked` (and in the file `log`, for subprocesses), so a test fails even where library code swallows
the error, as gradio's analytics threads do.

`tests/conftest.py` installs it in the pytest process and fails any test during which something tried;
python subprocesses started by tests get it from `tests/netguard_site/sitecustomize.py` and write what
they tried to the file named by `D2O_NETGUARD_LOG`. With `D2O_NETGUARD_TRACE=<file>`, every lookup and
connect, allowed or not, is appended to that file (to check a whole run by hand).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import traceback

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
INET = (socket.AF_INET, socket.AF_INET6)

blocked: list[str] = []  # what this process tried since the last check; the guard raised for each
_real: dict = {}
_log: str | None = None


class NetworkBlocked(RuntimeError):
    """A test (or code it called) tried to reach a host that is not this machine's loopback."""


def is_loopback(host) -> bool:
    """True for loopback names and addresses, and the unspecified host (None, "", 0.0.0.0, ::)."""
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip().strip("[]").split("%")[0].rstrip(".").lower()
    if not host or host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # any other name
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def _caller() -> str:
    """The innermost frame outside this module, as file:line."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename != __file__:
            return f"{frame.filename}:{frame.lineno}"
    return "?"


def _append(path: str | None, line: str) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _check(kind: str, host, port=None) -> None:
    allowed, trace = is_loopback(host), os.environ.get("D2O_NETGUARD_TRACE")
    if allowed and not trace:
        return
    line = f"{kind}({host!r}, {port!r}) from {_caller()} (pid {os.getpid()})"
    _append(trace, ("allowed " if allowed else "BLOCKED ") + line)
    if allowed:
        return
    blocked.append(line)
    _append(_log, line)
    raise NetworkBlocked(f"tests must not use the network: {line}")


def _address(sock, address) -> tuple:
    """(host, port) of an AF_INET/AF_INET6 address; (None, None) for other families (unix sockets...)."""
    if sock.family in INET and isinstance(address, tuple) and address:
        return address[0], address[1] if len(address) > 1 else None
    return None, None


def install(log: str | None = None) -> None:
    """Guard this process (idempotent); `log`: a file that also receives every blocked attempt."""
    global _log
    _log = log
    if _real:
        return
    _real.update(
        getaddrinfo=socket.getaddrinfo,
        gethostbyname=socket.gethostbyname,
        gethostbyname_ex=socket.gethostbyname_ex,
        connect=socket.socket.connect,
        connect_ex=socket.socket.connect_ex,
        sendto=socket.socket.sendto,
    )

    def getaddrinfo(host, port, *args, **kwargs):
        _check("getaddrinfo", host, port)
        return _real["getaddrinfo"](host, port, *args, **kwargs)

    def gethostbyname(host):
        _check("gethostbyname", host)
        return _real["gethostbyname"](host)

    def gethostbyname_ex(host):
        _check("gethostbyname_ex", host)
        return _real["gethostbyname_ex"](host)

    def connect(self, address):
        host, port = _address(self, address)
        if port is not None:
            _check("connect", host, port)
        return _real["connect"](self, address)

    def connect_ex(self, address):
        host, port = _address(self, address)
        if port is not None:
            _check("connect_ex", host, port)
        return _real["connect_ex"](self, address)

    def sendto(self, data, *args):
        host, port = _address(self, args[-1]) if args else (None, None)
        if port is not None:
            _check("sendto", host, port)
        return _real["sendto"](self, data, *args)

    socket.getaddrinfo, socket.gethostbyname, socket.gethostbyname_ex = (
        getaddrinfo,
        gethostbyname,
        gethostbyname_ex,
    )
    socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = connect, connect_ex, sendto
