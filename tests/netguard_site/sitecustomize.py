"""Python subprocesses started by the tests load this (conftest puts this folder on PYTHONPATH): the same
network guard as the pytest process, reporting blocked attempts to the file `D2O_NETGUARD_LOG`."""

import importlib.util
import os
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "netguard", Path(__file__).resolve().parent.parent / "netguard.py"
)
netguard = importlib.util.module_from_spec(_spec)
sys.modules["netguard"] = netguard
_spec.loader.exec_module(netguard)
netguard.install(log=os.environ.get("D2O_NETGUARD_LOG"))
