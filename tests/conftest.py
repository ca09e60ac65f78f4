"""Shared fixtures: tiny random GQA Llama models (no downloads), the bundled model, and no network.

Tests never touch the network. The settings below are in place before anything imports huggingface_hub,
transformers or gradio (they read them at import time; `make test` exports them too), and every
subprocess a test starts inherits them. `netguard` fails any test during which this process, or a python
subprocess it started, looked up or connected to a host other than loopback.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "DO_NOT_TRACK": "1",
}
os.environ.update(OFFLINE_ENV)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # netguard and helpers, whatever the import mode
import netguard  # noqa: E402 - the guard goes in before anything that might open a socket

netguard.install()
# Python subprocesses load netguard_site/sitecustomize.py: the same guard, reporting to this file.
NETGUARD_LOG = Path(tempfile.mkdtemp(prefix="d2o-netguard-")) / "blocked.log"
NETGUARD_LOG.touch()
os.environ["D2O_NETGUARD_LOG"] = str(NETGUARD_LOG)
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(HERE / "netguard_site"), os.environ.get("PYTHONPATH")) if p
)

import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each, or they thrash
    import torch  # noqa: E402

    torch.set_num_threads(1)
from helpers import (  # noqa: E402, F401 - re-exported: `from conftest import ...` works as well
    TEXT,
    CharTokenizer,
    held_positions,
    policy_cache,
    prefill_cache,
    shared_prefill,
    slot_of,
    tiny_model,
    walk,
)

import d2o_core  # noqa: E402
from d2o_core import models  # noqa: E402

_subprocess_log_read = 0


def network_attempts() -> list[str]:
    """What was blocked since the last call, in this process and in python subprocesses (consumed)."""
    global _subprocess_log_read
    found, netguard.blocked[:] = list(netguard.blocked), []
    with open(NETGUARD_LOG, encoding="utf-8") as f:
        f.seek(_subprocess_log_read)
        found += f.read().splitlines()
        _subprocess_log_read = f.tell()
    return found


@pytest.fixture(autouse=True)
def no_network():
    """Fails the test if anything tried to reach a host other than loopback meanwhile (even if caught)."""
    yield
    tried = network_attempts()
    if tried:
        pytest.fail("the network was used (tests must stay offline):\n  " + "\n  ".join(tried), pytrace=False)


def pytest_sessionfinish(session):
    tried = network_attempts()  # after the last test: background threads, subprocesses shutting down
    if tried:
        print("\nthe network was used (tests must stay offline):\n  " + "\n  ".join(tried), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config):
    shutil.rmtree(NETGUARD_LOG.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny():
    return tiny_model()


@pytest.fixture(scope="session")
def bundled():
    """The bundled SmolLM2-135M-Instruct (converted once, then cached)."""
    return d2o_core.load_model()


@pytest.fixture
def cli_tiny(monkeypatch, tiny):
    """The command line loads the tiny model instead of the bundled one (`compare` and `run` call the
    name they imported, the eval commands `models.load_model`)."""
    from d2o_core import __main__ as cli  # noqa: PLC0415

    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: tiny)
    monkeypatch.setattr(cli, "load_model", models.load_model)
    return tiny
