"""Throughput under a KV-memory cap: how many rows each policy fits, and the tokens/s that buys.

What this module is: `run_throughput` (the measurement, through `serving.serve_batch`), the
policy specs it takes (`make_policies`: "d2o:official" too) and the `throughput` subcommand; the
pure tables and ratios it prints are in throughput_tables.py. Every policy gets the same cap
(default: the KV of ONE full-cache row of the prompt length plus its new tokens). Cap mode finds
the largest batch under it; with `batches`, a sweep also runs each batch size regardless of the
cap, for the plot.

How the largest batch is found: one row is served alone under the cap first (the probe). That
gives the exact decode-time KV of a row (prompts of one length give rows of one size) and the
one-sequence speed; `rows_under_cap` then says how many rows fit, and exactly that many prompts
are served under the cap, so no time goes on decoding a second wave. The probe doubles as the
sweep's batch-1 point, and the cap run as the sweep's point of the same size.

What it is not: a serving engine or a statistics package: one timed run per point, after one
warm-up, every row decoding `new_tokens` (EOS ignored, equal work). No plotting (ui/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..policies import POLICIES, Policy, build
from ..run_summary import jsonable
from ..serving import BatchResult, full_cache_mb, serve_batch
from . import bench
from .throughput_tables import ratio_lines, ratios, rows_under_cap, table

MAX_ROWS = 64  # a cap that fits more rows than this is almost surely a typo
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


def _row(policy: Policy, result: BatchResult, mode: str, cap_mb: float) -> dict:
    """One record from the first (in practice only) wave of `result`."""
    wave, m = result.waves[0], result.metrics
    seconds = wave["decode_seconds"]
    peak = wave["kv_mb_decode_peak"]
    return {
        "policy": policy.label,
        "budget": policy.budget,
        "batch": wave["batch"],
        "tokens_per_second": wave["generated"] / seconds if seconds > 0 else math.nan,
        "decode_ms_per_step": 1000 * seconds / wave["steps"] if wave["steps"] else math.nan,
        "kv_mb_cap": cap_mb,
        "kv_mb_decode_peak": peak,
        "kv_mb_admission_peak": m["kv_mb_admission_peak"],
        "rss_mb": m["rss_mb"],
        "fits_cap": bool(peak <= cap_mb * (1 + 1e-9)),
        "mode": mode,
        "kv_mb_row": peak / wave["batch"],
        "prefill_seconds": wave["prefill_seconds"],
    }


def _checks(lm, prompt_tokens, new_tokens, kv_cap_mb) -> None:
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
) -> dict:
    """Largest batch under the cap per policy (mode "cap"), and with `batches` a sweep (mode "sweep").

    Parameters
    ----------
    policies : names, `name:variant` specs (e.g. "d2o:official") or Policy objects.
    kv_cap_mb : decode-time KV allowed for a whole batch; default `full_cache_mb(lm, prompt_tokens,
        new_tokens)`, one full-cache row.
    batches : batch sizes run regardless of the cap, for every policy, or only for those whose spec
        or label is in `sweep_policies`.
    progress : `progress(done, total, message)`, called after every serve_batch call and inside them.

    Returns
    -------
    dict (JSON-ready after `run_summary.jsonable`): rows (`ROW_KEYS` plus kv_mb_row, prefill_seconds and,
    for cap rows, single_tokens_per_second: one row alone), machine, prompt_tokens (actual),
    target_tokens, new_tokens, budget, kv_mb_cap, kv_cap_default, date, policies, batches, ratios,
    wall_seconds.
    """
    chosen = make_policies(policies, budget, settings)
    sizes = check_batches(batches) if batches is not None else []
    _checks(lm, prompt_tokens, new_tokens, kv_cap_mb)
    named = lambda spec, p: sweep_policies is None or {str(spec), p.label} & set(sweep_policies)
    swept = [p for spec, p in zip(policies, chosen) if named(spec, p)]
    cap_mb = float(kv_cap_mb) if kv_cap_mb is not None else full_cache_mb(lm, prompt_tokens, new_tokens)
    prompts: list[list[int]] = []
    total, done = 2 * len(chosen) + len(sizes) * len(swept) + 1, 0
    say = progress or (lambda done, total, message: None)

    def serve(policy: Policy, count: int, batch: int | None) -> BatchResult:
        nonlocal done
        while len(prompts) < count:  # distinct prompts of one length: passkey samples, seeds 0, 1, ...
            prompts.append(bench.bench_prompt(lm, prompt_tokens, seed=len(prompts)))
        inner = lambda message: say(done, total, f"{policy.label}: {message}")
        result = serve_batch(
            lm, prompts[:count], policy, max_new_tokens=new_tokens, kv_cap_mb=cap_mb, batch=batch,
            stop_at_eos=False, progress=inner,
        )  # fmt: skip
        done += 1
        say(done, total, f"{policy.label}: {result.waves[0]['batch']} rows done")
        return result

    start = time.perf_counter()
    serve(chosen[0], 1, 1)  # warm-up, not recorded
    rows, cap_runs = [], {}
    for policy in chosen:
        probe = serve(policy, 1, None)  # one row alone under the cap: raises if even that does not fit
        fit = rows_under_cap(cap_mb, probe.waves[0]["kv_mb_decode_peak"])
        if fit > MAX_ROWS:
            raise ValueError(
                f"The cap of {cap_mb:.1f} MB fits {fit} rows of {policy.label}; at most {MAX_ROWS} are run "
                "here. Lower kv_cap_mb."
            )
        main = probe if fit == 1 else serve(policy, fit, None)
        if fit == 1:
            done += 1
        single = _row(policy, probe, "cap", cap_mb)["tokens_per_second"]
        rows.append(_row(policy, main, "cap", cap_mb) | {"single_tokens_per_second": single})
        cap_runs[policy.label] = {1: probe, main.waves[0]["batch"]: main}
    for policy in swept:
        for size in sizes:
            run = cap_runs[policy.label].get(size)
            if run is not None and len(run.waves) == 1:
                done += 1  # the same work was done in cap mode: reuse it
            else:
                run = serve(policy, size, size)
            rows.append(_row(policy, run, "sweep", cap_mb))
    say(total, total, "done")
    doc = {
        "rows": rows,
        "machine": bench.machine_info(lm) | {"peak_rss_mb": bench.peak_rss_mb()},
        "prompt_tokens": len(prompts[0]),
        "target_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "budget": float(budget),
        "kv_mb_cap": cap_mb,
        "kv_cap_default": kv_cap_mb is None,  # True: one full-cache row of this length
        "date": datetime.date.today().isoformat(),
        "policies": [p.label for p in chosen],
        "batches": sizes,
        "wall_seconds": time.perf_counter() - start,
    }
    return doc | {"ratios": ratios(rows)}


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
    """`["d2o.variant=official"]` -> {"d2o": {"variant": "official"}}; values parsed as JSON if they are."""
    out: dict[str, dict] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        name, dot, field = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set takes policy.setting=value, e.g. d2o.variant=official; got {item!r}.")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        out.setdefault(name, {})[field] = tuple(value) if isinstance(value, list) else value
    return out


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
            sweep_policies=swept,
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
        "--json", default=None, help="write every number here; the app reads assets/throughput.json"
    )
    model_args(p)
    p.set_defaults(func=cmd_throughput)
