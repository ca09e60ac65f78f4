"""`python -m d2o_core results` (`make results`): rerun a fixed sweep and benchmark, rewrite README's tables.

What this module is: the fixed settings (RESULTS_SWEEP, RESULTS_BENCH), the markdown tables
built from their frames, and the rewrite of the README block between
`<!-- results:start -->` and `<!-- results:end -->` (nothing else in the file changes).

What it is not: the sweep and the benchmark themselves (sweep.py, bench.py).
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from . import bench
from .report import jsonable
from .shapes import NOTICE
from .sweep import fidelity_table, run_sweep, score_table

START, END = "<!-- results:start -->", "<!-- results:end -->"
# `make results`: 24 compare calls of 7 policies, then `make bench`'s settings; ~7-10 minutes in
# all on a 2-core CPU with the bundled model (measured). kv answers restate the 8-hex key before
# the value: ~24 tokens with SmolLM2's tokenizer.
RESULTS_SWEEP = dict(
    tasks=("passkey", "kv"), lengths=(512, 1024), depths=(0.1, 0.5, 0.9), samples=2,
    budgets=(0.2, 0.4), policy_names=("full", "streaming", "h2o", "d2o"), max_new_tokens=24, seed=0,
)  # fmt: skip
RESULTS_BENCH = dict(prompt_tokens=(512, 1024, 2048), budget=0.2, new_tokens=32, repeats=3, load=True)


def markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table; floats to 3 significant digits, NaN as a dash."""

    def cell(v) -> str:
        if isinstance(v, float):
            return "–" if math.isnan(v) else f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"
        return str(v)

    rows = [list(map(str, df.columns)), ["---"] * df.shape[1]]
    rows += [[cell(v) for v in row] for row in df.itertuples(index=False)]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def replace_block(text: str, block: str) -> str | None:
    """`text` with the lines between the START and END marker lines replaced; None without both."""
    lines = text.splitlines(keepends=True)
    marks = [i for i, line in enumerate(lines) if line.strip() in (START, END)]
    if len(marks) != 2 or lines[marks[0]].strip() != START or lines[marks[1]].strip() != END:
        return None
    return "".join(lines[: marks[0] + 1]) + block.rstrip("\n") + "\n" + "".join(lines[marks[1] :])


def results_block(df: pd.DataFrame, doc: dict, seconds: float) -> str:
    """The README block: machine and date, retrieval scores, fidelity summary, bench tables and targets."""
    m, s, b = doc["machine"], RESULTS_SWEEP, RESULTS_BENCH
    percent = lambda t: t.assign(budget=[f"{100 * x:g} %" for x in t["budget"]])
    fid = percent(fidelity_table(df)).rename(
        columns={"kv_fraction": "KV of full", "token_agreement": "agreement", "mean_kl_to_full": "KL to full",
                 "nll_of_reference": "NLL of full's tokens", "decode_ms_per_token": "decode ms/token"}
    )  # fmt: skip
    return "\n".join(
        [
            f"Measured {datetime.date.today().isoformat()} by `python -m d2o_core results` "
            f"({seconds / 60:.1f} min): {m['model']} ({m['dtype']}) on {m['cpu']}, {m['cores']} cores, "
            f"torch {m['torch']}, transformers {m['transformers']}, device {m['device']}."
            + (f" Note: {NOTICE}" if m.get("shape_only") else ""),
            "",
            f"Retrieval, exact match (tasks.py; mean over depths {', '.join(map(str, s['depths']))} and "
            f"{s['samples']} samples; greedy, {s['max_new_tokens']} new tokens):",
            "",
            markdown(percent(score_table(df, ("task", "target_tokens")))),
            "",
            "Fidelity to the full cache (same runs; teacher-forced on the full cache's tokens):",
            "",
            markdown(fid),
            "",
            f"Cost (`python -m d2o_core bench`, budget {100 * b['budget']:g} %, {b['new_tokens']} new "
            f"tokens, median of {b['repeats']} after a warm-up; peak RSS {doc['peak_rss_mb']:.0f} MB):",
            "",
            markdown(bench.policy_table(doc)),
            "",
            markdown(bench.ratio_table(doc)),
            "",
            *[f"- {line}" for line in bench.target_lines(doc)],
        ]
    )


def cmd_results(args) -> int:
    readme = Path(args.readme)
    if not readme.is_file() or replace_block(readme.read_text(), "") is None:
        print(f"{readme} has no {START} ... {END} block: the tables will only be printed.", file=sys.stderr)
    start = time.perf_counter()
    lm = bench.load(args)
    with bench.progress_bar("results: sweep") as progress:
        df = run_sweep(lm, **RESULTS_SWEEP, progress=progress)
    with bench.progress_bar("results: bench") as progress:
        doc = bench.run_bench(
            lm, **RESULTS_BENCH, model=args.model, device=args.device, dtype=args.dtype, progress=progress
        )
    block = results_block(df, doc, time.perf_counter() - start)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "sweep.csv", index=False)
    (out / "bench.json").write_text(json.dumps(jsonable(doc), indent=2))
    (out / "results.md").write_text(block + "\n")
    new = replace_block(readme.read_text(), block) if readme.is_file() else None
    if new is None:
        print(block + f"\n\n{readme} was not changed: it has no {START} ... {END} block.")
    else:
        readme.write_text(new)
        print(
            f"rewrote the results block of {readme}; wrote {out}/sweep.csv, bench.json, results.md",
            file=sys.stderr,
        )
    return 0


def add_parser(sub, model_args: Callable) -> None:
    """Add the `results` subcommand to the CLI's subparsers."""
    p = sub.add_parser("results", help="rerun the fixed sweep and benchmark; rewrite README's results block")
    p.add_argument("--readme", default="README.md", help=f"file whose {START} ... {END} block is rewritten")
    p.add_argument("--out", default="results", help="folder for sweep.csv, bench.json and results.md")
    model_args(p)
    p.set_defaults(func=cmd_results)
