"""`python -m d2o_core results` (`make results`): rerun fixed measurements, rewrite README's tables.

What this module is: the fixed settings (RESULTS_SWEEP, RESULTS_BENCH, RESULTS_THROUGHPUT), the
markdown tables built from their results, and the rewrite of two README blocks: between
`<!-- results:start -->` and `<!-- results:end -->` (sweep and bench) and between
`<!-- throughput:start -->` and `<!-- throughput:end -->` (throughput under a KV cap, whose JSON
also goes to `assets/throughput.json` beside the README, for the app). Nothing else in the file changes.
`--no-throughput` skips the throughput part; `--throughput-only` runs only it, and with
`--throughput-from FILE` (a `throughput --json` output) rewrites its block without running.

What it is not: the measurements themselves (sweep.py, bench.py, throughput.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from ..policies import POLICIES
from ..run_summary import jsonable
from ..shape_models import NOTICE
from . import bench, throughput_tables
from .sweep import fidelity_table, run_sweep, score_table

START, END = "<!-- results:start -->", "<!-- results:end -->"
TP_START, TP_END = "<!-- throughput:start -->", "<!-- throughput:end -->"
# `make results`: 24 compare calls of every registered policy at two budgets, then `make bench`'s
# settings; several minutes on a 2-core CPU with the bundled model. kv answers restate the 8-hex
# key before the value: ~24 tokens with SmolLM2's tokenizer.
RESULTS_SWEEP = dict(
    tasks=("passkey", "kv"), lengths=(512, 1024), depths=(0.1, 0.5, 0.9), samples=2,
    budgets=(0.2, 0.4), policy_names=tuple(POLICIES), max_new_tokens=24, seed=0,
)  # fmt: skip
# policy_names: every registered policy, so a new one joins the tables without an edit here.
RESULTS_BENCH = dict(prompt_tokens=(512, 1024, 2048), budget=0.2, new_tokens=32, repeats=3, load=True)
# Largest batch under one full-cache row's KV for each policy, then a batch-size sweep of three,
# every point timed in 3 interleaved rounds (medians): 8 prefills of 2048 tokens shared by every
# policy plus 4 x 18 decodes, several minutes more on a 2-core CPU.
RESULTS_THROUGHPUT = dict(
    prompt_tokens=2048, budget=0.2, new_tokens=32,
    policies=("full", "streaming", "h2o", "d2o", "d2o:official"),
    batches=(1, 2, 4, 8), sweep_policies=("full", "h2o", "d2o"), repeats=5,
)  # fmt: skip


def markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table; floats to 3 significant digits, NaN as a dash."""

    def cell(v) -> str:
        if isinstance(v, float):
            return "–" if math.isnan(v) else f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"
        return str(v)

    rows = [list(map(str, df.columns)), ["---"] * df.shape[1]]
    rows += [[cell(v) for v in row] for row in df.itertuples(index=False)]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def replace_block(text: str, block: str, start: str = START, end: str = END) -> str | None:
    """`text` with the lines between the `start` and `end` marker lines replaced; None without both."""
    lines = text.splitlines(keepends=True)
    marks = [i for i, line in enumerate(lines) if line.strip() in (start, end)]
    if len(marks) != 2 or lines[marks[0]].strip() != start or lines[marks[1]].strip() != end:
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


def _timing(doc: dict) -> str:
    """How each point was timed, in words (older files ran each point once)."""
    n = doc.get("repeats", 1)
    return (
        "one timed run per point"
        if n == 1
        else f"the median of {n} rounds per point, interleaved across policies"
    )


def throughput_block(doc: dict) -> str:
    """The README throughput block: settings and machine, the table at the cap, the sweep, the ratios."""
    m = doc["machine"]
    sweep = throughput_tables.sweep_table(doc)
    return "\n".join(
        [
            f"Measured {doc.get('date', 'on an unrecorded date')} ({doc['wall_seconds'] / 60:.1f} min): "
            f"{m['model']} ({m['dtype']}) on {m['cpu']}, {m['cores']} cores, device {m['device']}; "
            f"{doc['prompt_tokens']} prompt tokens per row, budget {100 * doc['budget']:g} %, "
            f"{doc['new_tokens']} new tokens per row (EOS ignored), {_timing(doc)} after a warm-up; "
            f"cap {doc['kv_mb_cap']:.1f} MB of KV per batch"
            + (" (one full-cache row)." if doc.get("kv_cap_default", True) else ".")
            + (f" Note: {NOTICE}" if m.get("shape_only") else ""),
            "",
            markdown(throughput_tables.cap_table(doc)),
            "",
            *[f"- {line}" for line in throughput_tables.ratio_lines(doc)],
            *(
                ["", "Tokens/s by batch size, regardless of the cap:", "", markdown(sweep)]
                if len(sweep)
                else []
            ),
        ]
    )


def _rewrite(readme: Path, block: str, start: str, end: str) -> bool:
    """Replace `readme`'s block between `start` and `end`; False (and the block printed) without one."""
    new = replace_block(readme.read_text(), block, start, end) if readme.is_file() else None
    if new is None:
        print(block + f"\n\n{readme} was not changed: it has no {start} ... {end} block.")
        return False
    readme.write_text(new)
    return True


def run_throughput_part(args, lm=None) -> None:
    """Run RESULTS_THROUGHPUT (or read `--throughput-from`), write its JSON and README block."""
    from . import throughput  # noqa: PLC0415 - only this part needs it

    if args.throughput_from:
        doc = json.loads(Path(args.throughput_from).read_text())
    else:
        lm = lm or bench.load(args)
        with bench.progress_bar("results: throughput") as progress:
            doc = jsonable(throughput.run_throughput(lm, **RESULTS_THROUGHPUT, progress=progress))
    out = Path(args.throughput_json or Path(args.readme).parent / "assets" / "throughput.json")
    if not args.throughput_from or out.resolve() != Path(args.throughput_from).resolve():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2))
    if _rewrite(Path(args.readme), throughput_block(doc), TP_START, TP_END):
        print(f"rewrote the throughput block of {args.readme}; wrote {out}", file=sys.stderr)


def cmd_results(args) -> int:
    readme = Path(args.readme)
    if args.throughput_from and not args.throughput_only:
        raise ValueError("--throughput-from rewrites only the throughput block: add --throughput-only.")
    if args.throughput_only:
        run_throughput_part(args)
        return 0
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
    if _rewrite(readme, block, START, END):
        print(
            f"rewrote the results block of {readme}; wrote {out}/sweep.csv, bench.json, results.md",
            file=sys.stderr,
        )
    if args.throughput:
        run_throughput_part(args, lm)
    return 0


def add_parser(sub, model_args: Callable) -> None:
    """Add the `results` subcommand to the CLI's subparsers."""
    p = sub.add_parser("results", help="rerun the fixed measurements; rewrite README's results blocks")
    p.add_argument("--readme", default="README.md", help=f"file whose {START} ... {END} block is rewritten")
    p.add_argument("--out", default="results", help="folder for sweep.csv, bench.json and results.md")
    p.add_argument(
        "--throughput", action=argparse.BooleanOptionalAction, default=True,
        help="also run the throughput benchmark (2048 prompt tokens; several minutes on a CPU)",
    )  # fmt: skip
    p.add_argument("--throughput-only", action="store_true", help="run only the throughput part")
    p.add_argument(
        "--throughput-from", default=None, metavar="FILE",
        help="with --throughput-only: rewrite the block from this `throughput --json` file, without running",
    )  # fmt: skip
    p.add_argument(
        "--throughput-json",
        default=None,
        help="where the throughput JSON goes (default: assets/ beside --readme)",
    )
    model_args(p)
    p.set_defaults(func=cmd_results)
