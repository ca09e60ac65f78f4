"""Throughput under a KV-memory cap: how many rows each policy fits, and the tokens/s that buys.

What this module is: `run_throughput` (the measurement, with `serving`'s admission and decode),
the policy specs it takes (`make_policies`: "d2o:official" too) and the `throughput` subcommand;
the pure tables and ratios it prints are in throughput_tables.py. Every policy gets the same cap
(default: the KV of ONE full-cache row of the prompt length plus its new tokens). Cap mode finds
the largest batch under it; with `batches`, a sweep also runs each batch size regardless of the
cap, for the plot.

How it is measured, and why so: admission (a 2k-token prefill, then compression) costs seconds
per row and decoding is what is compared, so every prompt is read once and compressed for every
policy from that one prefill (`serving.admit_shared`; each row is what `serve_batch` would have
built). A policy keeps admitting rows while they fit under the cap, counted exactly as
`serve_batch` counts (and at least as many as the sweep needs). Then every point (a policy at a
batch size: one row alone, the largest batch under the cap, the sweep's sizes) is decoded
`repeats` times from fresh copies of its admitted rows, INTERLEAVED: round after round, each
round decoding every point once, so slow drifts of a shared machine's load hit every policy
alike. A point reports the median tokens/s and ms/step of its rounds, and keeps every round.

What it is not: a serving engine or a statistics package (medians of a few rounds, one untimed
warm-up; every row decodes `new_tokens`, EOS ignored, equal work). No plotting (ui/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..policies import POLICIES, Policy, build
from ..policies.parse import parse_assignments
from ..run_summary import jsonable
from ..serving import MB, admit_shared, cap_too_small, decode_rows, entry_bytes, full_cache_mb
from . import bench
from .throughput_tables import ratio_lines, ratio_runs, ratios, rows_under_cap, table

MAX_ROWS = 64  # a cap that fits more rows than this is almost surely a typo
REPEATS = 3  # timed rounds per point: the median of 3 shrugs off one disturbed round
MAX_REPEATS = 50
Progress = Callable[[int, int, str], None]


def make_policies(
    specs: Sequence[str | Policy], budget: float, settings: dict[str, dict] | None = None
) -> list[Policy]:
    """`["full", "h2o", "d2o", "d2o:official"]` -> Policy objects; full at 1.0, the rest at `budget`.

    `name:variant` sets the policy's `variant`; `settings` ({"d2o": {"variant": "official"}}, what
    the CLI's `--set d2o.variant=official` gives) applies to every spec of that name.
    """
    specs, settings = list(specs or []), settings or {}
    if not specs:
        raise ValueError(f"No policy given: list at least one of {', '.join(POLICIES)}, e.g. full,h2o,d2o.")
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
        raise ValueError(f"budget is the fraction of the prompt kept, in (0, 1], e.g. 0.2; got {budget!r}.")
    names = {s.partition(":")[0].strip() for s in specs if isinstance(s, str)}
    unused = sorted(set(settings) - names)
    if unused:
        raise ValueError(f"Settings name {', '.join(unused)}, which is not among the policies.")
    out = []
    for spec in specs:
        if isinstance(spec, Policy):
            out.append(spec)
            continue
        name, _, variant = str(spec).strip().partition(":")
        extra = dict(settings.get(name, {})) | ({"variant": variant.strip()} if variant else {})
        out.append(build(name, 1.0 if name == "full" else float(budget), **extra))
    labels = [p.label for p in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"List each policy once; got {', '.join(labels)}.")
    return out


def check_batches(batches) -> list[int]:
    """Batch sizes as whole numbers >= 1, each once, sorted; a sentence otherwise."""
    whole = lambda b: isinstance(b, int) and not isinstance(b, bool)
    items = list(batches)
    if not items or not all(whole(b) and 1 <= b <= MAX_ROWS for b in items):
        raise ValueError(f"Batch sizes are whole numbers from 1 to {MAX_ROWS}, e.g. 1,2,4,8; got {items}.")
    return sorted(set(items))


@dataclass
class _Admitted:
    """One policy's admitted rows (never decoded: points decode fresh copies) and their memory."""

    policy: Policy
    rows: list = field(default_factory=list)
    need: list = field(default_factory=list)  # bytes each row holds while decoding
    admission: list = field(default_factory=list)  # bytes held while admitting row i after rows < i

    def fit(self, cap: float) -> int:
        """How many rows serve_batch would admit under `cap` bytes (in order, while they fit)."""
        held, k = 0, 0
        while k < len(self.need) and held + self.need[k] <= cap:
            held, k = held + self.need[k], k + 1
        return k

    def wants_more(self, cap: float, least: int) -> bool:
        """Rows are still needed: fewer than `least`, or all admitted so far still fit the cap."""
        return len(self.rows) < least or sum(self.need) <= cap


def _admit_all(lm, chosen, least: dict, cap_mb: float, prompt_tokens: int, new_tokens: int, say) -> dict:
    """Admit prompts 0, 1, ... (one prefill each, compressed for every policy still admitting)."""
    cap, per_entry = cap_mb * MB, entry_bytes(lm)
    admitted = {p.label: _Admitted(p) for p in chosen}
    index = 0
    while True:
        needing = [a for a in admitted.values() if a.wants_more(cap, least[a.policy.label])]
        if not needing:
            return admitted
        ids = bench.bench_prompt(lm, prompt_tokens, seed=index)  # distinct prompts of one length
        rows, prefill_entries = admit_shared(lm, index, ids, [a.policy for a in needing], new_tokens)
        for a, row in zip(needing, rows):
            a.admission.append(sum(a.need) + (prefill_entries + row.cache.stored_entries()) * per_entry)
            a.rows.append(row)
            a.need.append(row.peak_entries * per_entry)
            if index == 0:
                _check_fits(a, cap_mb)
        index += 1
        say(f"admitted prompt {index} ({', '.join(a.policy.label for a in needing)})")


def _check_fits(a: _Admitted, cap_mb: float) -> None:
    """Sentences for a cap that holds no row, or implausibly many (almost surely a typo)."""
    row_mb = a.need[0] / MB
    if row_mb > cap_mb:
        raise cap_too_small(cap_mb, row_mb, a.policy)
    fit = rows_under_cap(cap_mb, row_mb)
    if fit > MAX_ROWS:
        raise ValueError(
            f"The cap of {cap_mb:.1f} MB fits {fit} rows of {a.policy.label}; at most {MAX_ROWS} are run "
            "here. Lower kv_cap_mb."
        )


@dataclass
class _Point:
    """A policy at one batch size, decoded once per round."""

    admitted: _Admitted
    batch: int
    runs: list = field(default_factory=list)  # serving.decode_rows records, one per round
    rss_mb: float = math.nan

    def decode(self, lm, new_tokens: int, say) -> dict:
        rows = [row.fresh() for row in self.admitted.rows[: self.batch]]
        return decode_rows(lm, rows, new_tokens, stop_at_eos=False, say=say)

    def record(self, mode: str, cap_mb: float) -> dict:
        a, b = self.admitted, self.batch
        tps = [
            r["generated"] / r["decode_seconds"] if r["decode_seconds"] > 0 else math.nan for r in self.runs
        ]
        ms = [1000 * r["decode_seconds"] / r["steps"] if r["steps"] else math.nan for r in self.runs]
        peak = sum(a.need[:b]) / MB
        return {
            "policy": a.policy.label,
            "budget": a.policy.budget,
            "batch": b,
            "tokens_per_second": statistics.median(tps),
            "decode_ms_per_step": statistics.median(ms),
            "kv_mb_cap": cap_mb,
            "kv_mb_decode_peak": peak,
            "kv_mb_admission_peak": max(a.admission[:b]) / MB,
            "rss_mb": self.rss_mb,
            "fits_cap": bool(peak <= cap_mb * (1 + 1e-9)),
            "mode": mode,
            "kv_mb_row": peak / b,
            "prefill_seconds": sum(row.prefill_seconds for row in a.rows[:b]),
            "tokens_per_second_runs": tps,
            "decode_ms_per_step_runs": ms,
        }


def _checks(lm, prompt_tokens, new_tokens, kv_cap_mb, repeats) -> None:
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)
    if not whole(prompt_tokens) or not 1 <= prompt_tokens <= lm.max_prompt_tokens:
        raise ValueError(
            f"prompt_tokens must be a whole number from 1 to {lm.max_prompt_tokens}; got {prompt_tokens!r}."
        )
    if not whole(new_tokens) or new_tokens < 2:
        raise ValueError(f"new_tokens must be a whole number >= 2 (steps are timed); got {new_tokens!r}.")
    if kv_cap_mb is not None and (
        isinstance(kv_cap_mb, bool) or not isinstance(kv_cap_mb, int | float) or not kv_cap_mb > 0
    ):
        raise ValueError(f"kv_cap_mb must be a positive number of MB; got {kv_cap_mb!r}.")
    if not whole(repeats) or not 1 <= repeats <= MAX_REPEATS:
        raise ValueError(f"repeats must be a whole number from 1 to {MAX_REPEATS}; got {repeats!r}.")


def run_throughput(
    lm,
    *,
    prompt_tokens: int = 2048,
    budget: float = 0.2,
    new_tokens: int = 32,
    policies: Sequence[str | Policy] = ("full", "h2o", "d2o"),
    kv_cap_mb: float | None = None,
    batches: Sequence[int] | None = None,
    progress: Progress | None = None,
    settings: dict[str, dict] | None = None,
    sweep_policies: Sequence[str] | None = None,
    repeats: int = REPEATS,
) -> dict:
    """Largest batch under the cap per policy (mode "cap"), and with `batches` a sweep (mode "sweep").

    Parameters
    ----------
    policies : names, `name:variant` specs (e.g. "d2o:official") or Policy objects.
    kv_cap_mb : decode-time KV allowed for a whole batch; default `full_cache_mb(lm, prompt_tokens,
        new_tokens)`, one full-cache row.
    batches : batch sizes run regardless of the cap, for every policy, or only for those whose spec
        or label is in `sweep_policies`.
    repeats : timed rounds; each round decodes every point once, interleaved across policies.
    progress : `progress(done, total, message)`, called after every admission and decode and inside them.

    Returns
    -------
    dict (JSON-ready after `run_summary.jsonable`): rows (`ROW_KEYS` plus kv_mb_row, prefill_seconds,
    tokens_per_second_runs and decode_ms_per_step_runs (every round; the row's figures are their
    medians) and, for cap rows, single_tokens_per_second: one row alone), machine, prompt_tokens
    (actual), target_tokens, new_tokens, budget, kv_mb_cap, kv_cap_default, date, policies, batches,
    repeats, ratios (of the medians), ratio_runs (the same ratios round by round), wall_seconds.
    """
    chosen = make_policies(policies, budget, settings)
    sizes = check_batches(batches) if batches is not None else []
    _checks(lm, prompt_tokens, new_tokens, kv_cap_mb, repeats)
    named = lambda spec, p: sweep_policies is None or {str(spec), p.label} & set(sweep_policies)
    swept = {p.label for spec, p in zip(policies, chosen) if named(spec, p)}
    cap_mb = float(kv_cap_mb) if kv_cap_mb is not None else full_cache_mb(lm, prompt_tokens, new_tokens)
    report = progress or (lambda done, total, message: None)
    done, total = 0, 1

    def say(message: str) -> None:
        report(done, total, message)

    start = time.perf_counter()
    least = {p.label: max(sizes) if sizes and p.label in swept else 1 for p in chosen}
    admitted = _admit_all(lm, chosen, least, cap_mb, prompt_tokens, new_tokens, say)
    points, fits = {}, {}
    for p in chosen:
        a = admitted[p.label]
        fits[p.label] = a.fit(cap_mb * MB)
        for size in [1, fits[p.label], *(sizes if p.label in swept else [])]:
            points.setdefault((p.label, size), _Point(a, size))
    # Round order: every policy alone, then each at its cap batch, then the sweep's sizes.
    order = sorted(
        points.values(), key=lambda pt: (pt.batch != 1, pt.batch != fits[pt.admitted.policy.label], pt.batch)
    )
    done, total = 1, 1 + repeats * len(order)
    say("warm-up")
    order[0].decode(lm, new_tokens, say)  # not recorded
    for round_ in range(repeats):
        for point in order:
            label = f"{point.admitted.policy.label} x{point.batch}, round {round_ + 1}/{repeats}"
            point.runs.append(point.decode(lm, new_tokens, lambda m, label=label: say(f"{label}: {m}")))
            point.rss_mb = bench.peak_rss_mb()
            done += 1
            say(f"{label} done")
    rows = []
    for p in chosen:
        cap = points[(p.label, fits[p.label])].record("cap", cap_mb)
        single = points[(p.label, 1)].record("cap", cap_mb)["tokens_per_second"]
        rows.append(cap | {"single_tokens_per_second": single})
    rows += [
        points[(p.label, size)].record("sweep", cap_mb) for p in chosen if p.label in swept for size in sizes
    ]
    say("done")
    doc = {
        "rows": rows,
        "machine": bench.machine_info(lm) | {"peak_rss_mb": bench.peak_rss_mb()},
        "prompt_tokens": len(admitted[chosen[0].label].rows[0].ids),
        "target_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "budget": float(budget),
        "kv_mb_cap": cap_mb,
        "kv_cap_default": kv_cap_mb is None,  # True: one full-cache row of this length
        "date": datetime.date.today().isoformat(),
        "policies": [p.label for p in chosen],
        "batches": sizes,
        "repeats": repeats,
        "wall_seconds": time.perf_counter() - start,
    }
    return doc | {"ratios": ratios(rows), "ratio_runs": ratio_runs(rows)}


# -- command line ----------------------------------------------------------------------------------


def print_report(doc: dict) -> None:
    """Every row as a table, the ratio sentences and the settings, on standard output."""
    fmt = lambda x: f"{x:.3g}"
    print(table(doc).to_string(index=False, float_format=fmt))
    print()
    print("\n".join(ratio_lines(doc) or ["(no ratio: run the full cache too)"]))
    print(
        f"\n{doc['prompt_tokens']} prompt tokens, {doc['new_tokens']} new tokens, "
        f"cap {doc['kv_mb_cap']:.1f} MB; {doc['wall_seconds']:.0f} s in all"
    )


def settings_from_args(assignments: list[str]) -> dict[str, dict]:
    """`["d2o.variant=official", "d2o.merge=no"]` -> typed settings per policy (`policies.parse`)."""
    return parse_assignments(assignments)


def cmd_throughput(args) -> int:
    specs = bench.split(args.policies, str, "--policies", "full,h2o,d2o,d2o:official")
    batches = bench.split(args.batches, int, "--batches", "1,2,4,8") if args.batches else None
    swept = bench.split(args.sweep_policies or "", str, "--sweep-policies", "full,h2o,d2o") or None
    settings = settings_from_args(args.set)
    make_policies(specs, args.budget, settings)  # fail on bad input before loading the model
    if batches is not None:
        check_batches(batches)
    lm = bench.load(args)
    with bench.progress_bar("throughput") as progress:
        doc = run_throughput(
            lm, prompt_tokens=args.prompt_tokens, budget=args.budget, new_tokens=args.new_tokens,
            policies=specs, kv_cap_mb=args.kv_cap_mb, batches=batches, progress=progress, settings=settings,
            sweep_policies=swept, repeats=args.repeats,
        )  # fmt: skip
    print_report(doc)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(jsonable(doc), indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def add_parser(sub, model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the `throughput` subcommand to the CLI's subparsers."""
    p = sub.add_parser("throughput", help="tokens/s per policy at the largest batch under one KV-memory cap")
    p.add_argument("--prompt-tokens", type=int, default=2048, help="tokens per prompt (every row the same)")
    p.add_argument("--budget", type=float, default=0.2, help="fraction of the prompt kept, (0, 1]")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per row (EOS ignored)")
    p.add_argument(
        "--policies", default="full,h2o,d2o", help=f"comma list of {', '.join(POLICIES)}; d2o:official too"
    )
    p.add_argument("--set", action="append", default=[], metavar="POLICY.SETTING=VALUE")
    p.add_argument("--kv-cap-mb", type=float, default=None, help="KV cap per batch (default: one full row)")
    p.add_argument(
        "--batches", default=None, help="also run these batch sizes regardless of the cap, 1,2,4,8"
    )
    p.add_argument(
        "--sweep-policies", default=None, help="sweep only these, e.g. full,h2o,d2o (default: all)"
    )
    p.add_argument(
        "--repeats", type=int, default=REPEATS, help="timed rounds per point, interleaved across policies"
    )
    p.add_argument(
        "--json", default=None, help="write every number here; the app reads assets/throughput.json"
    )
    model_args(p)
    p.set_defaults(func=cmd_throughput)
