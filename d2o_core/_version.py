"""The library's version: from the installed package's metadata, else from the source tree.

What this module is: `__version__`, read once at import. An installed package (`pip install .`, or
`make setup`'s editable install) answers from its metadata, which `pyproject.toml` wrote. Run
straight from a checkout that was never installed, it falls back to the `version` line of the
`pyproject.toml` beside the package, with "+source" appended so a run file says where it came from;
with neither, "0+unknown". Run files record it as `meta.d2o_core_version` (runfile.py).

What it is not: no version control queries, no network.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "d2o-cache-explorer"


def _from_source_tree() -> str | None:
    """The `[project]` version of the repository's pyproject.toml, when this package sits in one."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    if project.get("name") != DISTRIBUTION or not isinstance(project.get("version"), str):
        return None
    return project["version"]


def version() -> str:
    """This library's version string, e.g. "0.18.0" (installed) or "0.18.0+source" (a bare checkout)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    source = _from_source_tree()
    return f"{source}+source" if source else "0+unknown"


__version__ = version()
