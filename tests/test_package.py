"""The library is a package: `pip wheel .` builds d2o_core alone, declaring its own dependencies (torch,
transformers, pydantic, ...) and the page's gradio and plotly only under the extra `app`; importing any
part of d2o_core loads no gradio and no plotly; run files record the library's version."""

from __future__ import annotations

import email.parser
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from helpers import TEXT
from packaging.requirements import Requirement

import d2o_core
from d2o_core import runfile

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built offline, with the venv's setuptools, from a copy of the checkout (no build/ in it)."""
    src = tmp_path_factory.mktemp("src")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("d2o_core", "ui"):  # ui/ is copied so that the wheel is seen to leave it out
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md", "app.py"):
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index"]
    cmd += ["--disable-pip-version-check", "-q", "-w", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (found,) = out.glob("*.whl")
    return found


def metadata_of(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(zf.read(name).decode("utf-8"))


def test_the_wheel_holds_the_library_and_nothing_of_the_page(wheel):
    with zipfile.ZipFile(wheel) as zf:
        tops = {n.split("/")[0] for n in zf.namelist()}
        files = zf.namelist()
    assert tops == {"d2o_core", f"d2o_cache_explorer-{PROJECT['version']}.dist-info"}, tops
    assert "d2o_core/policies/d2o.py" in files and "d2o_core/eval/bench.py" in files  # subpackages too
    assert not [n for n in files if n.endswith(".pyc")]


def test_the_wheel_requires_torch_transformers_pydantic_and_gradio_plotly_only_for_the_app(wheel):
    meta = metadata_of(wheel)
    assert (meta["Name"], meta["Version"]) == (PROJECT["name"], PROJECT["version"])
    assert meta["Requires-Python"] == ">=3.11"
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    hard = {r.name.lower() for r in reqs if r.marker is None}
    assert {"torch", "transformers", "pydantic", "numpy", "pandas", "accelerate", "gguf"} <= hard, hard
    assert not hard & {"gradio", "gradio-client", "gradio_client", "plotly", "ray"}, hard
    by_extra = {
        extra: {r.name.lower() for r in reqs if r.marker and r.marker.evaluate({"extra": extra})}
        for extra in meta.get_all("Provides-Extra")
    }
    assert {"gradio", "plotly"} <= by_extra["app"] and "ray" in by_extra["ray"], by_extra
    # torch stays the installed 2.13.0 (requirements.txt): the range must admit it, or pip pulls another.
    (torch_req,) = [r for r in reqs if r.name == "torch"]
    assert torch_req.specifier.contains("2.13.0")


def test_importing_every_d2o_core_module_loads_no_gradio_and_no_plotly():
    code = (
        "import importlib, pkgutil, sys, d2o_core\n"
        "for m in pkgutil.walk_packages(d2o_core.__path__, 'd2o_core.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'plotly', 'ui')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_the_version_is_the_projects():
    assert d2o_core.__version__.split("+")[0] == PROJECT["version"], (
        f"d2o_core reports {d2o_core.__version__}, pyproject.toml says {PROJECT['version']}: "
        "run `make setup` to reinstall the project"
    )


def test_a_saved_run_records_the_library_version(tiny):
    results = d2o_core.compare(tiny, TEXT, [d2o_core.POLICIES["h2o"](budget=0.5)], max_new_tokens=2)
    saved = runfile.save_run(results, {"model": tiny.name})
    assert json.loads(saved)["meta"]["d2o_core_version"] == d2o_core.__version__
    _, meta = runfile.load_run(saved)
    assert meta["d2o_core_version"] == d2o_core.__version__ and meta["d2o_core_version"]
