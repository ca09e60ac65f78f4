"""The no-network guard bites: lookups of and connects to other hosts fail before anything is sent,
in the pytest process and in python subprocesses, while loopback keeps working."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import conftest
import netguard
import pytest


@pytest.fixture
def nothing_real(monkeypatch):
    """The real socket calls fail the test if reached: a blocked call must stop before them."""
    called = []
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "connect", "connect_ex", "sendto"):
        monkeypatch.setitem(netguard._real, name, lambda *args, name=name: called.append((name, args)))
    yield called
    assert called == []


@pytest.fixture
def expect_blocked():
    """Returns a check that the guard recorded `n` attempts, which it then forgets (they were the point)."""

    def check(n: int) -> list[str]:
        tried = conftest.network_attempts()
        assert len(tried) == n, tried
        return tried

    return check


def _connect(family, address, how="connect"):
    with socket.socket(family) as s:
        getattr(s, how)(address)


def _sendto(address):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", address)


ATTEMPTS = {
    "getaddrinfo": lambda: socket.getaddrinfo("huggingface.co", 443),
    "gethostbyname": lambda: socket.gethostbyname("api.gradio.app"),
    "gethostbyname_ex": lambda: socket.gethostbyname_ex("pypi.org"),
    "connect": lambda: _connect(socket.AF_INET, ("10.255.255.1", 80)),
    "connect_ex": lambda: _connect(socket.AF_INET, ("10.255.255.1", 80), "connect_ex"),
    "connect-ipv6": lambda: _connect(socket.AF_INET6, ("2001:db8::1", 443, 0, 0)),
    "sendto-dns-server": lambda: _sendto(("10.255.255.53", 53)),
    "create_connection": lambda: socket.create_connection(("huggingface.co", 443), timeout=0.1),
}


@pytest.mark.parametrize("attempt", ATTEMPTS.values(), ids=ATTEMPTS.keys())
def test_other_hosts_are_blocked_before_anything_is_sent(nothing_real, expect_blocked, attempt):
    with pytest.raises(netguard.NetworkBlocked, match="tests must not use the network"):
        attempt()
    expect_blocked(1)


def test_a_swallowed_attempt_in_a_background_thread_is_still_reported(nothing_real, expect_blocked):
    def phone_home():
        try:
            socket.getaddrinfo("api.gradio.app", 443)
        except Exception:
            pass  # what analytics threads do

    thread = threading.Thread(target=phone_home)
    thread.start()
    thread.join()
    assert "api.gradio.app" in expect_blocked(1)[0]


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST.",
        "127.0.0.1",
        "127.8.9.1",
        "::1",
        "[::1]",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "",
        None,
    ],
)
def test_loopback_names_and_addresses_pass(host):
    assert netguard.is_loopback(host)


@pytest.mark.parametrize(
    "host", ["huggingface.co", "10.255.255.1", "8.8.8.8", "2001:db8::1", "localhost.example"]
)
def test_everything_else_is_not_loopback(host):
    assert not netguard.is_loopback(host)


def test_loopback_connections_work():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(("localhost", server.getsockname()[1]), timeout=5):
            server.accept()[0].close()
    assert socket.getaddrinfo("localhost", 80)
    assert conftest.network_attempts() == []


def test_python_subprocesses_are_guarded_too(tmp_path):
    log = tmp_path / "blocked.log"
    code = "import socket; socket.getaddrinfo('huggingface.co', 443)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=os.environ | {"D2O_NETGUARD_LOG": str(log)},  # its own log: the session's stays clean
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "NetworkBlocked" in done.stderr
    assert "getaddrinfo('huggingface.co', 443)" in log.read_text()


def test_tests_run_offline():
    import huggingface_hub.constants as hub

    assert hub.HF_HUB_OFFLINE and hub.HF_HUB_DISABLE_TELEMETRY  # read at import: the settings came first
    assert set(conftest.OFFLINE_ENV) <= set(os.environ)  # and subprocesses inherit them
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"  # (gradio sets HF_HUB_DISABLE_TELEMETRY=True)
