"""Untrusted text shown as text: the one rule for every string from a file, a prompt or a model.

Why: a run file is anyone's JSON, and the page renders markup in several places. `gr.Markdown`
renders HTML and Markdown, and Gradio's sanitiser keeps `<svg><a href="javascript:...">`, forms,
full-page `position:fixed` overlays and external images; Markdown adds links, images, Mermaid
diagrams (```mermaid) and KaTeX (`$$`). `gr.Error` messages are rendered as HTML. Plotly's titles,
legends, tick labels and hover text read a subset of HTML (`<a href>`, `<span style>`).

So every such string reaches a component through one of these two functions:

- `markdown_text(value)`: for `gr.Markdown` values (titles, status lines): one line of plain text;
- `html_text(value)`: for HTML contexts: `gr.Error` messages and plotly's labels.

Textboxes, Dropdown choices and Dataframe cells of the default "str" type already show their
values as text, so they need neither. What this is not: validation; nothing here rejects text.
"""

from __future__ import annotations

import html
import re

# Line breaks and other control characters (C0, DEL, C1): the text stays on its caller's line, so
# nothing in it can start a block (a heading, list, quote, table, code fence or HTML block).
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
# Within a line, the characters that Markdown (CommonMark and GitHub's extensions, as Gradio's
# `marked` reads them) or Gradio's renderer give a meaning: HTML and entities (< > &), links,
# images and autolinks ([ ] ( ) ! : @), code (`), emphasis (* _ ~), KaTeX ($), heading closers (#)
# and escapes themselves (\). A backslash before an ASCII punctuation character makes it literal
# text. The dot of "www." is the one other autolink.
_ACTIVE = re.compile(r"([\\`*_~\[\]()!<>&$:@#])")
_WWW = re.compile(r"(www)\.", re.IGNORECASE)
# Gradio swaps "%%%LATEX_BLOCK_<n>%%%" in the rendered HTML for its n-th KaTeX block, after
# backslashes are gone: a percent sign goes out as an entity, which that search never sees.
_PERCENT = "&#37;"


def markdown_text(value) -> str:
    """`value` as Markdown source, for use inside a line, that renders as exactly its characters.

    Line breaks and control characters become spaces; otherwise only escapes are added.
    """
    text = _ACTIVE.sub(r"\\\1", _CONTROLS.sub(" ", str(value)))
    return _WWW.sub(r"\1\\.", text).replace("%", _PERCENT)


def html_text(value) -> str:
    """`value` as HTML text (`&`, `<`, `>` as entities): for `gr.Error` messages and plotly's labels."""
    return html.escape(str(value), quote=False)
