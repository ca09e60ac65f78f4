"""The About tab's text, generated: the prose of assets/about.md with the policy table and the figure list
filled in from the registry (`d2o_core.POLICIES`) and the figures' captions (`ui.figures`).

What this module is: `about_markdown()`; a policy registered later (README: "Write your own policy")
and a figure given a caption appear in the About tab without editing it. What it is not: layout
(ui/layout.py places the Markdown) or the captions themselves (next to each figure's builder).
"""

from __future__ import annotations

import re
from pathlib import Path

from d2o_core import POLICIES

from . import figures
from .safe_text import markdown_text

ASSETS = Path(__file__).resolve().parent.parent / "assets"
_POLICIES = re.compile(r"<!-- policies[^>]*-->")
_FIGURES = re.compile(r"<!-- figures[^>]*-->")
# A description's trailing "(https://...)": its paper, shown as a link named after the paper's host.
_LINK = re.compile(r"\s*\((https://[A-Za-z0-9./_?=#%-]+)\)\s*$")
_ARXIV = re.compile(r"https://arxiv\.org/abs/(\d{4}\.\d{4,5})")


def paper_link(url: str) -> str:
    """'[arXiv 2406.13035](https://arxiv.org/abs/2406.13035)', or the host's name for other papers."""
    arxiv = _ARXIV.fullmatch(url)
    name = f"arXiv {arxiv.group(1)}" if arxiv else url.split("/")[2]
    return f"[{name}]({url})"


def policy_rows() -> list[tuple[str, str, str]]:
    """Per registered policy: (registry name, title, one-line description), the paper as a Markdown link."""
    rows = []
    for name, cls in POLICIES.items():
        if cls is None:  # a test may hold a name's place
            continue
        text = str(getattr(cls, "description", "") or "")
        title = str(getattr(cls, "title", name) or name)
        text = text[len(title) + 1 :].strip() if text.startswith(f"{title}:") else text
        link = _LINK.search(text)
        body = markdown_text(text[: link.start()] if link else text)
        rows.append((name, title, body + (f" ({paper_link(link.group(1))})" if link else "")))
    return rows


def policy_table() -> str:
    lines = ["| policy | what it keeps, and its paper | name in the CLI and API |", "|---|---|---|"]
    lines += [f"| **{markdown_text(t)}** | {d} | `{markdown_text(n)}` |" for n, t, d in policy_rows()]
    return "\n".join(lines)


def figure_list() -> str:
    """Every figure, tab by tab, with its caption."""
    parts = []
    for tab, entries in figures.FIGURES.items():
        parts.append(f"**{tab} tab**\n")
        parts += [f"- **{title}**: {figures.CAPTIONS[name]}" for name, title in entries]
        parts.append("")
    return "\n".join(parts).rstrip()


def about_markdown(prose: str | None = None) -> str:
    """The About tab: `prose` (assets/about.md by default) with the policy table and the figure list."""
    if prose is None:
        path = ASSETS / "about.md"
        prose = path.read_text(encoding="utf-8") if path.is_file() else ""
    if not _POLICIES.search(prose):
        prose += "\n\n<!-- policies -->\n"
    if not _FIGURES.search(prose):
        prose += "\n\n## The figures\n\n<!-- figures -->\n"
    prose = _POLICIES.sub(lambda _: policy_table(), prose, count=1)
    return _FIGURES.sub(lambda _: figure_list(), prose, count=1)
