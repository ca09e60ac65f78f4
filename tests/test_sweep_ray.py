"""Sweep cells as Ray tasks: two local workers give the in-process run's cells; a rerun computes none.

One local Ray instance for the whole test (a few seconds to start on two cores), bound to loopback.
Workers build the same tiny random model from `helpers.tiny_model` (a picklable loader: each worker
imports it by name, so tests/ goes on their PYTHONPATH). Ray's dashboard process asks the cloud
metadata servers where it runs even with usage stats off; an HTTP proxy on a closed loopback port
answers it here, so nothing leaves the machine (the network guard checks the workers too).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_model

from d2o_core.__main__ import main
from d2o_core.eval import cells, executor, store

TIMING = {"tokens_per_second", "prefill_seconds", "decode_seconds", "wall_seconds"}
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def local_ray_env(monkeypatch):
    """A local Ray instance that stays on this machine and can import tests/helpers.py."""
    if importlib.util.find_spec("ray") is None:  # not importorskip: Ray must import after the settings
        pytest.skip("Ray is not installed (pip install 'd2o-cache-explorer[ray]')")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's own switch: bind to loopback
    if "ray" in sys.modules:  # imported earlier in this session: the switch was read already
        monkeypatch.setattr(sys.modules["ray"]._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)


def comparable(folder: Path) -> dict:
    """key -> the record without timings and where it ran."""
    out = {}
    for r in store.load_records(folder):
        out[r["key"]] = (
            r["settings"],
            r["config"],
            {k: v for k, v in r["result"].items() if k not in TIMING},
        )
    return out


def test_two_ray_workers_give_the_in_process_cells_and_a_rerun_computes_none(local_ray_env, tmp_path):
    configs = cells.parse_configs(["full", "h2o", "d2o"])
    plan = cells.plan(
        "tiny", configs, [0.25, 0.5], tasks=["passkey"], lengths=[280], depths=[0.5], max_new_tokens=2
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray worker (1 CPU) runs, so the sums add up in the same order
    try:
        here = executor.execute(plan, tmp_path / "here", tiny_model, progress=False)
    finally:
        torch.set_num_threads(threads)
    ray = executor.execute(plan, tmp_path / "ray", tiny_model, workers=2, progress=False)
    assert (here.done, ray.done, ray.failed) == (5, 5, 0)
    assert len(ray.workers) == 2 and len({w["pid"] for w in ray.workers}) == 2
    assert comparable(tmp_path / "ray") == comparable(tmp_path / "here")
    again = executor.execute(plan, tmp_path / "ray", tiny_model, workers=2, progress=False)
    assert (again.skipped, again.done, again.workers) == (5, 0, [])  # nothing to do: Ray does not even start


def test_workers_without_ray_say_how_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    assert main(["sweep", "--tasks", "kv", "--workers", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'd2o-cache-explorer[ray]'" in err
