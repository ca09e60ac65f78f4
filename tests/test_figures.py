"""Figures: each builder draws what its frame says, and survives an empty frame."""

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from d2o_core.events import (
    DRIFT_SCHEMA,
    EVENTS_SCHEMA,
    LAYER_BUDGETS_SCHEMA,
    STEPS_SCHEMA,
    SURVIVAL_SCHEMA,
    frame,
)
from ui import figures


def with_policy(parts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Concatenate per-policy frames under a leading `policy` column, as the app does."""
    framed = [df.assign(policy=label) for label, df in parts.items()]
    out = pd.concat(framed, ignore_index=True) if framed else pd.DataFrame()
    return out[["policy", *[c for c in out.columns if c != "policy"]]]


def empty_with_policy(schema: dict[str, str]) -> pd.DataFrame:
    return frame({}, schema).assign(policy=pd.Series([], dtype="str"))[["policy", *schema]]


def budgets(fractions: list[float], density: list[float], protected: list[bool]) -> pd.DataFrame:
    return frame(
        {
            "layer": range(len(fractions)),
            "budget_tokens": [round(100 * f) for f in fractions],
            "budget_fraction": fractions,
            "density": density,
            "protected": protected,
        },
        LAYER_BUDGETS_SCHEMA,
    )


def events_frame() -> pd.DataFrame:
    """Layer 0 head 0: one eviction, two merges (one target known by text, one not); noise elsewhere."""
    return frame(
        {
            "step": [0, 0, 3, 0, 5],
            "layer": [0, 0, 0, 1, 0],
            "head": [0, 0, 0, 0, 1],
            "kind": ["evict", "merge", "merge", "evict", "evict"],
            "position": [4, 6, 12, 2, 7],
            "token": ["\nfoo", " cat", "<b>", " the", "x"],
            "target_position": [-1, 2, 99, -1, -1],
            "similarity": [np.nan, 0.91, 0.75, np.nan, np.nan],
            "score": [0.01, 0.02, 0.03, 0.04, 0.05],
        },
        EVENTS_SCHEMA,
    )


def trace(fig: go.Figure, name: str):
    matches = [t for t in fig.data if t.name == name]
    assert len(matches) == 1, [t.name for t in fig.data]
    return matches[0]


def annotation_texts(fig: go.Figure) -> list[str]:
    return [a.text for a in fig.layout.annotations]


def test_policy_colours_are_fixed_per_family_and_independent_of_order():
    labels = ["full", "streaming", "h2o", "d2o", "d2o(variant=official)", "mystery"]
    colours = figures.policy_colours(labels)
    assert colours == figures.policy_colours(list(reversed(labels)))
    assert len(set(colours.values())) == len(labels)
    assert (
        colours["d2o"]
        == figures.policy_colours(["d2o"])["d2o"]
        == figures.policy_colours(["h2o", "d2o"])["d2o"]
    )
    assert colours["full"] in {"#4d4d4d", "#000000", "#969696", "#252525"}  # grey family
    # A variant gets a shade of its family, not another family's colour.
    assert colours["d2o(variant=official)"] in figures.common._FAMILIES["d2o"]
    assert colours["mystery"] not in {c for shades in figures.common._FAMILIES.values() for c in shades}


def test_budget_heatmap_cells_hold_each_policys_fraction_and_density_sits_beside():
    h2o = budgets([0.2, 0.2, 0.2], [np.nan] * 3, [False, False, False])
    d2o = budgets([0.5, 0.1, 0.3], [0.7, 0.2, 0.4], [True, False, False])
    fig = figures.budget_heatmap(with_policy({"h2o": h2o, "d2o": d2o}))
    heat = fig.data[0]
    assert heat.type == "heatmap" and list(heat.x) == ["h2o", "d2o"] and list(heat.y) == [0, 1, 2]
    z = np.asarray(heat.z)
    np.testing.assert_allclose(z[:, 0], [0.2, 0.2, 0.2])
    np.testing.assert_allclose(z[:, 1], [0.5, 0.1, 0.3])
    assert heat.colorbar.title.text == "share of prompt kept"
    # The colours span the compressed layers (D2O's differences stay visible), not 0-100 %.
    assert (heat.zmin, heat.zmax) == (0.1, 0.5)
    assert np.asarray(heat.text)[0, 1] == "50"  # each cell shows its budget in tokens
    hover = np.asarray(heat.hovertext)
    assert "protected" in hover[0, 1] and "protected" not in hover[0, 0] and "protected" not in hover[1, 1]
    assert "50 tokens" in hover[0, 1]
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 1 and bars[0].xaxis == "x2" and bars[0].orientation == "h"
    np.testing.assert_allclose(bars[0].x, [0.7, 0.2, 0.4])
    assert bars[0].marker.color == figures.policy_colours(["h2o", "d2o"])["d2o"]
    assert fig.layout.title.text == "Per-layer KV budget"
    assert fig.layout.template == pio.templates["plotly_white"]


def test_budget_heatmap_without_density_says_so_instead_of_drawing_bars():
    fig = figures.budget_heatmap(with_policy({"h2o": budgets([0.3, 0.3], [np.nan] * 2, [False, True])}))
    assert [t.type for t in fig.data] == ["heatmap"]
    assert any("density" in text for text in annotation_texts(fig))


def test_cache_over_time_cells_hold_stored_entries_per_layer_and_step():
    steps = frame(
        {
            "step": [1, 0, 0, 1, 2, 2],
            "layer": [0, 0, 1, 1, 0, 1],
            "stored": [11, 10, 20, 21, 12, 22],
            "budget": [10] * 6,
            "evicted": [1, 5, 4, 0, 2, 3],
            "merged": [1, 0, 2, 0, 0, 1],
        },
        STEPS_SCHEMA,
    )
    fig = figures.cache_over_time(steps, policy="h2o")
    heat = fig.data[0]
    assert list(heat.x) == [0, 1, 2] and list(heat.y) == [0, 1]
    np.testing.assert_array_equal(np.asarray(heat.z), [[10, 11, 12], [20, 21, 22]])
    assert "evicted 3 (merged 1)" in heat.hovertext[1][2] and "budget 10" in heat.hovertext[1][2]
    assert "h2o" in fig.layout.title.text
    assert fig.layout.xaxis.title.text == "step (0 = prefill compression)"


def test_timeline_marks_evictions_and_merges_and_links_each_merge_to_its_target():
    fig = figures.timeline(events_frame(), layer=0, head=0, n_prompt=10, policy="d2o")
    evicted, merged, links = trace(fig, "evicted"), trace(fig, "merged"), trace(fig, "merged into")
    assert {t.type for t in (evicted, merged, links)} == {"scatter"}  # a few events: SVG, not WebGL
    assert (evicted.marker.symbol, evicted.marker.color) != (merged.marker.symbol, merged.marker.color)
    # Other layers and heads are filtered out.
    assert list(evicted.x) == [0] and list(evicted.y) == [4]
    assert list(merged.x) == [0, 3] and list(merged.y) == [6, 12]
    assert list(links.x) == [0, 0.35, None, 3, 3.35, None]  # slanted, so one step's links stay apart
    assert list(links.y) == [6, 2, None, 12, 99, None]
    assert "⏎foo" in evicted.hovertext[0] and "score 0.01" in evicted.hovertext[0]
    # The target's text comes from another layer's row; "<b>" is escaped, not rendered as markup.
    assert "·cat" in merged.hovertext[0] and "·the" in merged.hovertext[0] and "0.91" in merged.hovertext[0]
    assert "&lt;b&gt;" in merged.hovertext[1] and "position 99" in merged.hovertext[1]
    assert [s.y0 for s in fig.layout.shapes] == [9.5] and "generated tokens start" in annotation_texts(fig)
    assert all(str(part) in fig.layout.title.text for part in ("d2o", "layer 0", "head 0"))


def test_timeline_for_a_head_without_events_explains_instead_of_raising():
    fig = figures.timeline(events_frame(), layer=3, head=0, n_prompt=10)
    assert fig.data == () and "layer 3" in annotation_texts(fig)[0]


def test_timeline_builds_with_fifty_thousand_events():
    n = 50_000
    rng = np.random.default_rng(0)
    kinds = rng.choice(["evict", "merge"], n)
    positions = rng.integers(0, 4000, n)
    events = frame(
        {
            "step": rng.integers(0, 500, n),
            "layer": np.zeros(n, int),
            "head": np.zeros(n, int),
            "kind": kinds,
            "position": positions,
            "token": [f" t{p}" for p in positions],
            "target_position": np.where(kinds == "merge", rng.integers(0, 4000, n), -1),
            "similarity": np.where(kinds == "merge", 0.9, np.nan),
            "score": rng.random(n),
        },
        EVENTS_SCHEMA,
    )
    fig = figures.timeline(events, 0, 0, n_prompt=3500)
    n_merges = int((kinds == "merge").sum())
    assert len(trace(fig, "evicted").x) + len(trace(fig, "merged").x) == n
    assert len(trace(fig, "merged into").x) == 3 * n_merges
    assert {t.type for t in fig.data} == {"scattergl"}  # WebGL for this many; a small one is SVG (above)


def survival_frame(n: int) -> pd.DataFrame:
    kept = np.linspace(0.0, 1.0, n)
    merged = np.where(np.arange(n) % 3 == 0, (1 - kept) / 2, 0.0)
    return frame(
        {
            "position": np.arange(n),
            "token": ["<s>", " a_very_long_token", "\nb", *[f"t{i}" for i in range(3, n)]],
            "kept_share": kept,
            "merged_share": merged,
            "evicted_share": 1 - kept - merged,
            "is_sink": np.arange(n) < 2,
        },
        SURVIVAL_SCHEMA,
    )


def test_survival_tiles_are_coloured_by_kept_share_in_reading_order():
    df = survival_frame(10)
    fig = figures.survival(df, policy="h2o", per_row=4)
    heat = fig.data[0]
    z = np.asarray(heat.z, dtype=float)
    assert z.shape == (3, 4)
    np.testing.assert_allclose(z.ravel()[:10], df["kept_share"])
    assert np.isnan(z.ravel()[10:]).all()
    text, hover = np.asarray(heat.text), np.asarray(heat.hovertext)
    assert text[0, 0] == "&lt;s&gt;" and text[0, 1] == "·a_ve…" and text[0, 2] == "⏎b"
    assert "·a_very_long_token" in hover[0, 1] and "position 5" in hover[1, 1]
    assert heat.colorscale[0][1] != heat.colorscale[-1][1] and (heat.zmin, heat.zmax) == (0, 1)
    assert fig.layout.yaxis.autorange == "reversed" and fig.layout.xaxis.visible is False


def test_survival_outlines_sinks_and_marks_merged_tokens():
    df = survival_frame(10)
    fig = figures.survival(df, per_row=4)
    sinks = trace(fig, "attention sink")
    corners = [(x, y) for x, y in zip(sinks.x, sinks.y, strict=True) if x is not None]
    assert {(round(x + 0.5), round(y + 0.5)) for x, y in corners} == {
        (0, 0),
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
        (0, 1),
    }
    dots = trace(fig, "partly merged")
    merged_positions = np.flatnonzero(df["merged_share"] > 0)  # position 9 has kept 1.0, so no merge
    np.testing.assert_allclose(np.floor(dots.x), merged_positions % 4)
    np.testing.assert_allclose(np.round(dots.y), merged_positions // 4)


def test_survival_height_grows_with_rows_and_is_capped():
    short = figures.survival(survival_frame(10), per_row=4).layout.height
    long = figures.survival(survival_frame(400), per_row=4).layout.height
    huge = figures.survival(survival_frame(4000), per_row=4).layout.height
    assert short < long <= huge == 1600


def test_drift_agreement_is_the_running_mean_in_both_panels_with_one_colour_per_policy():
    def one(kl, agrees):
        return frame(
            {"step": range(1, 5), "kl_to_full": kl, "agrees": agrees, "nll": [1.0] * 4}, DRIFT_SCHEMA
        )

    df = with_policy(
        {"h2o": one([0.1, 0.4, 0.2, 0.3], [True, False, False, True]), "d2o": one([0.0] * 4, [True] * 4)}
    )
    fig = figures.drift(df)
    assert len(fig.data) == 4
    h2o = [t for t in fig.data if t.name == "h2o"]
    kl_line, agreement = sorted(h2o, key=lambda t: t.yaxis)
    np.testing.assert_allclose(kl_line.y, [0.1, 0.4, 0.2, 0.3])
    np.testing.assert_allclose(agreement.y, [1.0, 0.5, 1 / 3, 0.5])
    assert (
        kl_line.line.color == agreement.line.color != [t for t in fig.data if t.name == "d2o"][0].line.color
    )
    assert [t.showlegend for t in fig.data].count(False) == 2
    assert fig.layout.title.text == "Drift from the full cache (teacher-forced on its tokens)"


def sweep_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "policy": ["h2o", "h2o", "h2o", "d2o", "d2o", "d2o", "h2o"],
            "budget": [0.1, 0.1, 0.5, 0.1, 0.5, 0.5, 0.1],
            "score": [0.0, 1.0, 1.0, 1.0, 0.5, 1.0, 0.5],
            "task": ["qa", "qa", "qa", "qa", "qa", "qa", "sum"],
        }
    )


def test_sweep_curves_average_per_facet_policy_and_budget():
    fig = figures.sweep_curves(sweep_frame())
    assert [a.text for a in fig.layout.annotations] == ["qa", "sum"]
    by_panel = {(t.name, t.xaxis): t for t in fig.data}
    assert set(by_panel) == {("h2o", "x"), ("d2o", "x"), ("h2o", "x2")}
    np.testing.assert_allclose(by_panel["h2o", "x"].y, [0.5, 1.0])
    np.testing.assert_allclose(by_panel["d2o", "x"].y, [1.0, 0.75])
    assert list(by_panel["h2o", "x"].customdata) == [2, 1]
    assert [t.showlegend for t in fig.data].count(True) == 2
    assert fig.layout.xaxis.tickformat == ".0%" and fig.layout.xaxis.title.text == "KV budget (% of prompt)"


@pytest.mark.parametrize("facet", [None, "no_such_column"])
def test_sweep_curves_without_a_facet_pool_everything_in_one_panel(facet):
    fig = figures.sweep_curves(sweep_frame(), facet=facet)
    assert {t.xaxis for t in fig.data} == {"x"}
    h2o = trace(fig, "h2o")
    np.testing.assert_allclose(h2o.x, [0.1, 0.5])
    np.testing.assert_allclose(h2o.y, [0.5, 1.0])


def test_sweep_curves_name_the_missing_column():
    with pytest.raises(ValueError, match="accuracy"):
        figures.sweep_curves(sweep_frame(), y="accuracy")


EMPTY_CASES = {
    "budget_heatmap": lambda: figures.budget_heatmap(empty_with_policy(LAYER_BUDGETS_SCHEMA)),
    "cache_over_time": lambda: figures.cache_over_time(frame({}, STEPS_SCHEMA), "h2o"),
    "timeline": lambda: figures.timeline(frame({}, EVENTS_SCHEMA), 0, 0, n_prompt=10),
    "survival": lambda: figures.survival(frame({}, SURVIVAL_SCHEMA)),
    "drift": lambda: figures.drift(empty_with_policy(DRIFT_SCHEMA)),
    "sweep_curves": lambda: figures.sweep_curves(pd.DataFrame(columns=["policy", "budget", "score", "task"])),
}


@pytest.mark.parametrize("name", EMPTY_CASES)
def test_every_builder_turns_an_empty_frame_into_a_no_data_note(name):
    fig = EMPTY_CASES[name]()
    assert isinstance(fig, go.Figure) and fig.data == ()
    assert annotation_texts(fig) == [figures.NO_DATA]
    assert fig.layout.title.text and fig.layout.template == pio.templates["plotly_white"]


def test_to_html_is_a_standalone_document_with_plotly_inlined():
    html = figures.to_html(figures.drift(empty_with_policy(DRIFT_SCHEMA)))
    assert html.lstrip().lower().startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    assert "<body>" in html and "Plotly.newPlot" in html and len(html) > 1_000_000  # plotly.js is ~4 MB
    assert 'src="https://cdn.plot.ly' not in html
