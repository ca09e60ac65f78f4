"""Every hand-written mutant in tests/mutants.py still applies: its anchor occurs once in its file.

A mutant whose anchor no longer matches the code tests nothing; this keeps refactors honest.
"""

from __future__ import annotations

import pytest
from mutants import MUTANTS, ROOT


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_each_mutant_anchor_occurs_exactly_once(name):
    path, old, new, _ = MUTANTS[name]
    assert (ROOT / path).read_text().count(old) == 1, f"{name}: {old!r} in {path}"
    assert old != new
