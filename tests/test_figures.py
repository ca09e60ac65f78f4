"""Figures: each builder draws what its frame says, and survives an empty frame."""

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
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
    # The colours span 0-100 %: a full layer (100 %) is never the colour of D2O's largest one.
    assert (heat.zmin, heat.zmax) == (0, 1)
    assert np.asarray(heat.text)[0, 1] == "50"  # each cell shows its budget in tokens, readable
    assert heat.textfont.size >= 11
    hover = np.asarray(heat.hovertext)
    assert "protected" in hover[0, 1] and "protected" not in hover[0, 0] and "protected" not in hover[1, 1]
    assert "50 tokens" in hover[0, 1]
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 1 and bars[0].xaxis == "x2" and bars[0].orientation == "h"
    np.testing.assert_allclose(bars[0].x, [0.7, 0.2, 0.4])
    assert bars[0].marker.color == figures.policy_colours(["h2o", "d2o"])["d2o"]
    assert fig.layout.xaxis2.title.text == "F_l (high = sparse)"
    assert fig.layout.title.text == "Per-layer KV budget"
    assert fig.layout.template == pio.templates["plotly_white"]


def test_budget_heatmap_puts_the_full_cache_at_the_top_and_drops_numbers_too_small_to_read():
    n = 30
    d2o = budgets(list(np.linspace(0.12, 0.24, n)), [0.3] * n, [False] * n)
    full = budgets([1.0] * n, [np.nan] * n, [False] * n)
    fig = figures.budget_heatmap(with_policy({"full": full, "d2o": d2o}))
    heat = fig.data[0]
    stops = [colour for _, colour in heat.colorscale]  # Viridis: evenly spaced stops
    rgb = lambda v: px.colors.sample_colorscale(stops, [(v - heat.zmin) / (heat.zmax - heat.zmin)])  # noqa: E731
    assert rgb(1.0) != rgb(0.24) and heat.zmax == 1  # the full cache apart from D2O's largest layer
    row_px = (fig.layout.height - 150) / n
    assert row_px >= heat.textfont.size + 3 >= 14  # 30 layers: each row has room for its number
    many = budgets([0.2] * 120, [0.3] * 120, [False] * 120)
    crowded = figures.budget_heatmap(with_policy({"d2o": many})).data[0]
    assert crowded.text is None and crowded.texttemplate is None  # no number rather than an unreadable one


def test_budget_heatmap_without_density_says_so_instead_of_drawing_bars():
    fig = figures.budget_heatmap(with_policy({"h2o": budgets([0.3, 0.3], [np.nan] * 2, [False, True])}))
    assert [t.type for t in fig.data] == ["heatmap"]
    assert any("F_l" in text for text in annotation_texts(fig))


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
    # Decoding steps on the right; other layers and heads are filtered out; step 0 has a band of its own.
    assert {evicted.xaxis, merged.xaxis, links.xaxis} == {"x2"}
    assert list(evicted.x) == [] and list(merged.x) == [3] and list(merged.y) == [12]
    assert list(links.x) == [3, 3.35, None]  # slanted, so one step's links stay apart
    assert list(links.y) == [12, 99, None]
    # The target's text comes from another layer's row; "<b>" is escaped, not rendered as markup.
    assert "&lt;b&gt;" in merged.hovertext[0] and "position 99" in merged.hovertext[0]
    band_merged, band_evicted = trace(fig, "merged at step 0"), trace(fig, "evicted at step 0")
    assert band_merged.xaxis == band_evicted.xaxis == "x" and band_merged.orientation == "h"
    # Ten prompt positions: one bar each; position 6 was merged at step 0, position 4 evicted.
    assert list(band_merged.y) == list(range(10)) and list(band_merged.x) == [0] * 6 + [1] + [0] * 3
    assert list(band_evicted.x) == [0] * 4 + [1] + [0] * 5
    assert "⏎foo" not in str(band_evicted.hovertext) and "position 4" in band_evicted.hovertext[4]
    assert {s.y0 for s in fig.layout.shapes} == {9.5} and "generated tokens start" in annotation_texts(fig)
    assert all(str(part) in fig.layout.title.text for part in ("d2o", "layer 0", "head 0"))


def test_timeline_spreads_hundreds_of_step0_merges_over_positions_instead_of_one_column():
    n_prompt, rng = 850, np.random.default_rng(1)
    gone = np.sort(rng.choice(np.arange(4, n_prompt - 20), 680, replace=False))
    kinds = np.where(np.arange(680) % 5 == 0, "evict", "merge")
    events = frame(
        {
            "step": [0] * 680 + [1, 2],
            "layer": [0] * 682,
            "head": [0] * 682,
            "kind": [*kinds, "evict", "merge"],
            "position": [*gone, 2, 849],
            "token": ["w"] * 682,
            "target_position": [*np.where(kinds == "merge", 0, -1), -1, 1],
            "similarity": [0.9] * 682,
            "score": [0.1] * 682,
        },
        EVENTS_SCHEMA,
    )
    fig = figures.timeline(events, 0, 0, n_prompt, "d2o")
    markers = [t for t in fig.data if t.type == "scatter" and t.mode == "markers"]
    assert len(markers) == 2
    assert all(0 not in list(t.x) for t in markers)  # no pile of markers at x = 0
    band = [trace(fig, "merged at step 0"), trace(fig, "evicted at step 0")]
    assert 20 <= len(band[0].y) <= 64  # spread over the positions, a bar per span
    counts = [sum(x * w for x, w in zip(t.x, t.width)) for t in band]
    assert np.allclose(counts, [(kinds == "merge").sum(), (kinds == "evict").sum()])
    assert list(trace(fig, "evicted").x) == [1] and list(trace(fig, "merged").x) == [2]


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
    later = events["step"].to_numpy() > 0  # step 0's events are the band on the left
    n_merges = int(((kinds == "merge") & later).sum())
    assert len(trace(fig, "evicted").x) + len(trace(fig, "merged").x) == later.sum()
    assert len(trace(fig, "merged into").x) == 3 * n_merges
    # WebGL for this many; a small one is SVG (above). The step-0 band is bars.
    assert {t.type for t in fig.data if t.xaxis == "x2"} == {"scattergl"}
    assert {t.type for t in fig.data if t.xaxis == "x"} == {"bar"}


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
    assert tuple(fig.layout.yaxis.range) == (2.5, -0.5) and fig.layout.xaxis.visible is False
    assert heat.textfont.size >= 11 and not fig.layout.updatemenus  # three rows: one page


def test_survival_outlines_sinks_and_marks_merged_tokens_under_their_text():
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
    bars = trace(fig, "merged share (bar length)")
    merged_positions = np.flatnonzero(df["merged_share"] > 0)  # position 9 has kept 1.0, so no merge
    starts, ends = np.asarray(bars.x[0::3], float), np.asarray(bars.x[1::3], float)
    np.testing.assert_allclose(np.round(starts), merged_positions % 4)
    # A bar's length is the merged share, and it runs along the tile's lower edge, under the text.
    np.testing.assert_allclose(ends - starts, 0.9 * df["merged_share"].to_numpy()[merged_positions])
    offsets = np.asarray(bars.y[0::3], float) - merged_positions // 4
    assert (offsets > 0.3).all() and (offsets < 0.5).all()


def test_survival_of_a_4k_token_prompt_pages_rows_of_readable_text():
    fig = figures.survival(survival_frame(4000))
    heat = fig.data[0]
    n_rows = np.asarray(heat.z).shape[0]
    low, high = sorted(fig.layout.yaxis.range)
    shown = high - low
    assert shown <= 24 and n_rows == 200  # a page of rows, not 200 rows squeezed into one figure
    assert heat.textfont.size >= 11 and (fig.layout.height - 200) / shown >= 24  # px per row
    (menu,) = fig.layout.updatemenus
    pages = [b.args[0]["yaxis.range"] for b in menu.buttons]
    assert len(pages) == -(-n_rows // 24) and pages[0] == [23.5, -0.5] and pages[-1][0] == n_rows - 0.5
    assert fig.layout.dragmode == "pan"  # and the rows can be dragged


def test_survival_puts_generated_tokens_on_rows_of_their_own_and_outlines_marks():
    df = survival_frame(10)
    marks = pd.DataFrame({"name": ["needle", "question"], "start": [4, 7], "end": [6, 8]})
    fig = figures.survival(df, per_row=4, n_prompt=6, marks=marks)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (3, 4)  # 6 prompt tokens on rows 0-1, then 4 generated tokens on row 2
    np.testing.assert_allclose(z[2], df["kept_share"][6:])
    assert np.isnan(z[1, 2:]).all()
    assert [s.y0 for s in fig.layout.shapes] == [1.5] and "generated ↓" in annotation_texts(fig)
    needle, question = trace(fig, "needle"), trace(fig, "question")
    assert {(round(x), round(y)) for x, y in zip(needle.x, needle.y) if x is not None} == {(0, 1), (1, 1)}
    assert {round(x) for x in question.x if x is not None} == {1} and question.line.color != needle.line.color


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


def test_a_figure_file_leaves_plotly_js_out_and_says_where_to_look():
    html = figures.to_html(figures.drift(empty_with_policy(DRIFT_SCHEMA)), caption="How to read <it>")
    assert html.lstrip().lower().startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    assert "<html>" in html[:200] and "Plotly.newPlot" in html and len(html) < 100_000  # plotly.js is ~4.7 MB
    assert "<script src" not in html.replace("'", '"').replace('"', "") and "cdn.plot.ly" not in html
    assert "report.html" in html and "How to read &lt;it&gt;" in html


def step0_events() -> pd.DataFrame:
    """Layer 1 head 0 at step 0: positions 2 and 3 merged into 5, 6 into 0, 4 evicted; noise elsewhere."""
    return frame(
        {
            "step": [0, 0, 0, 0, 0, 3],
            "layer": [1, 1, 1, 1, 0, 1],
            "head": [0, 0, 0, 0, 0, 0],
            "kind": ["merge", "merge", "evict", "merge", "evict", "evict"],
            "position": [2, 3, 4, 6, 1, 5],
            "token": [" b", " c", " d", " f", " a", " e"],
            "target_position": [5, 5, -1, 0, -1, -1],
            "similarity": [0.9, 0.8, np.nan, 0.7, np.nan, np.nan],
            "score": [0.1] * 6,
        },
        EVENTS_SCHEMA,
    )


def test_step0_view_strikes_evicted_tokens_and_links_each_merged_one_to_its_target():
    tokens = ["<s>", " a", " b", " c", " d", " e", " f", " g"]
    fig = figures.step0(step0_events(), tokens, layer=1, head=0, policy="d2o", n_sink=1, per_row=4)
    heat = fig.data[0]
    state = np.asarray(heat.customdata).ravel()[:8].tolist()
    assert state == ["target", "kept", "merged", "merged", "evicted", "target", "merged", "kept"]
    text = np.asarray(heat.text).ravel()[:8]
    # Targets are numbered in reading order: position 0 is #1 (absorbed 1), position 5 is #2 (absorbed 2).
    assert text[0].endswith("#1 ←1") and text[5].endswith("#2 ←2")
    assert text[2].endswith("→#2") and text[3].endswith("→#2") and text[6].endswith("→#1")
    assert text[4].startswith("<s>") and "</s>" in text[4] and "<s>" not in text[1]  # evicted: struck through
    assert text[1] == "·a<br>"  # kept: the token alone (step 3's eviction of " e" is not step 0)
    z = np.asarray(heat.z).ravel()
    colour = lambda i: heat.colorscale[int(2 * z[i])][1]  # noqa: E731 - the stepped scale: two stops per code
    assert colour(2) == colour(3) != colour(6)  # merged into the same token: the same colour
    assert colour(2) != colour(5) and colour(4) != colour(1)  # target strong, merged light; evicted grey
    hover = np.asarray(heat.hovertext).ravel()
    assert "into #2 <b>·e</b> (position 5)" in hover[2] and "absorbed 2: ·b, ·c" in hover[5]
    assert heat.textfont.size >= 11
    assert "7 prompt tokens" not in annotation_texts(fig)[0] and "8 prompt tokens" in annotation_texts(fig)[0]
    assert "3 merged into 2 kept tokens, 1 evicted" in annotation_texts(fig)[0]
    assert all(part in fig.layout.title.text for part in ("Step 0", "layer 1", "head 0", "d2o"))


def test_step0_view_of_a_long_prompt_pages_and_of_a_quiet_head_says_nothing_left():
    tokens = [f" w{i}" for i in range(4000)]
    fig = figures.step0(step0_events(), tokens, layer=1, head=0)
    low, high = sorted(fig.layout.yaxis.range)
    assert high - low <= 16 and len(fig.layout.updatemenus[0].buttons) == 250 // 16 + 1
    quiet = figures.step0(step0_events(), tokens[:8], layer=5, head=0)
    assert set(np.asarray(quiet.data[0].customdata).ravel()[:8]) == {"kept"}
    assert "all kept at step 0" in annotation_texts(quiet)[0]
    assert annotation_texts(figures.step0(step0_events(), [], 1, 0)) == [figures.NO_DATA]


def test_every_figure_builder_has_a_one_line_caption_and_a_place_in_the_figure_list():
    import importlib
    import inspect
    import pkgutil

    import ui.figures as package

    builders = set()
    for info in pkgutil.iter_modules(package.__path__):
        if info.name == "common":  # the helpers the builders share, not figures of their own
            continue
        module = importlib.import_module(f"ui.figures.{info.name}")
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ == module.__name__ and not name.startswith("_"):
                if inspect.signature(fn).return_annotation in (go.Figure, "go.Figure"):
                    builders.add(name)
    assert {"budget_heatmap", "timeline", "step0", "survival", "kept_tokens", "cache_over_time"} <= builders
    assert builders <= set(figures.CAPTIONS), builders - set(figures.CAPTIONS)
    for name, caption in figures.CAPTIONS.items():
        assert caption and "\n" not in caption and len(caption) < 500, name
    listed = [name for entries in figures.FIGURES.values() for name, _ in entries]
    assert sorted(listed) == sorted(builders)


def test_each_caption_lives_next_to_its_builder():
    """CAPTIONS is collected from the figure modules (`CAPTION`, or `CAPTIONS` by builder name), so a
    caption is edited beside the figure it explains, never in the package's __init__."""
    import importlib
    import inspect
    import pkgutil

    import ui.figures as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"ui.figures.{info.name}")
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ == module.__name__ and name in figures.CAPTIONS:
                own = getattr(module, "CAPTIONS", {}).get(name) or getattr(module, "CAPTION", None)
                found[name] = own
    assert found == figures.CAPTIONS
    source = Path(package.__file__).read_text()
    assert "How to read" not in source and "entries each layer holds" not in source


def test_sweep_curves_speak_in_words_not_field_names():
    frame = sweep_frame().rename(columns={"score": "mean_kl_to_full"})
    fig = figures.sweep_curves(frame, y="mean_kl_to_full", facet=None)
    words = [fig.layout.title.text, fig.layout.yaxis.title.text, fig.data[0].hovertemplate]
    assert all("_" not in w and "mean mean" not in w for w in words), words
    assert "KL" in fig.layout.title.text and "budget %{x:.0%}" in fig.data[0].hovertemplate
    agreement = sweep_frame().rename(columns={"score": "token_agreement"})
    agreement = figures.sweep_curves(agreement, "token_agreement")
    assert agreement.layout.yaxis.tickformat == ".0%" and "Agreement" in agreement.layout.title.text
    assert figures.sweep_curves(sweep_frame()).layout.title.text.startswith("Task score")


def test_f_l_is_worded_one_way_in_figures_and_captions():
    d2o = budgets([0.5, 0.1], [0.7, 0.2], [False, False])
    axis = figures.budget_heatmap(with_policy({"d2o": d2o})).layout.xaxis2.title.text
    assert axis == figures.common.F_L_AXIS == "F_l (high = sparse)"
    assert (
        "high F_l = sparse, peaked attention" in figures.F_L_MEANING
        and "low F_l = dense" in figures.F_L_MEANING
    )
    assert (
        figures.F_L_MEANING in figures.CAPTIONS["budget_heatmap"]
        and figures.F_L_MEANING in figures.CAPTIONS["attention_map"]
    )
    docs = (Path(__file__).resolve().parent.parent / "docs" / "policies.md").read_text().replace("`", "")
    assert "high f_l = sparse, peaked attention" in docs.lower() and "low f_l = dense" in docs.lower()
