"""The stored example runs in assets/runs: one per example, of the page's default columns."""

from __future__ import annotations

from helpers import PAGE_FIGURES
from pydantic_core import from_json  # 3x json.loads on these ~100 MB

from ui import stored_runs as S
from ui.policy_controls import DEFAULT_PICKED


def test_every_example_in_assets_has_a_stored_run_of_the_default_columns():
    names = [e["name"] for e in S.examples()]
    assert S.FIRST in names
    for example in S.examples():  # the raw files (reading them through load_run is tested above)
        doc = from_json(S.gzip.decompress((S.RUNS / f"{S.slug(example['name'])}.json.gz").read_bytes()))
        meta, results = doc["meta"], doc["results"].values()
        assert meta["prompt"] == example["prompt"] and meta["max_new_tokens"] == example["max_new_tokens"]
        assert [r["settings"]["policy"] for r in results] == list(DEFAULT_PICKED)
        assert all(r["settings"]["budget"] == 0.2 for r in results)
        assert doc["prompt_attention"]["column_sums"]  # the attention view has data


def test_the_first_view_is_the_passkey_run_with_every_figure():
    page = S.first_view()
    assert page["status"].startswith(f"Stored run of the example “{S.FIRST}”")
    for key in PAGE_FIGURES:
        assert page[key].data, key
