"""What one decode step costs for a batch of rows against one row: is batching paying?

    python -m d2o_core batch-step --prompt-tokens 2048 --budget 0.2 --rows 8 --policies h2o,d2o

What this module is: a benchmark that prints ratios measured in one run (the machines are
shared and noisy; absolute times move, ratios measured side by side hold). For each policy it
admits `rows` prompts of the requested length (prefill + compression), stacks them as in
`serve_batch`, and times decode steps of the whole batch and of its first row alone,
interleaved. The floor is plain transformers with a DynamicCache holding as many entries as
the compressed rows (the same shapes without any policy work): a policy's batch ratio within
~20 % of the floor's means the batching machinery costs little beyond the model itself.

What it is not: a throughput measurement under a memory cap (that is `throughput`).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache

from .. import engine, serving
from ..batching import StackedBatch
from ..models import LoadedModel, load_model
from ..policies import build
from .tasks import make_sample


def _timed(fn: Callable, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def policy_steps(lm: LoadedModel, policy, prompts: list[str], steps: int) -> tuple[float, float, int]:
    """Median seconds of a decode step for all rows stacked and for the first row alone, and its entries."""
    rows = [
        serving.admit(lm, i, engine.encode(lm, p, True), policy, 2 * steps + 4)[0]
        for i, p in enumerate(prompts)
    ]
    together = StackedBatch([row.cache for row in rows])
    alone = StackedBatch([rows[0].cache.clone()])
    entries = round(rows[0].cache.stored_entries() / lm.n_layers)  # mean per layer
    times = {"together": [], "alone": []}
    for step in range(1, steps + 3):  # interleaved, so machine noise hits both alike; 2 warm-up steps
        t_all = _timed(engine.decode_step, lm, together, [100] * len(rows), step)
        t_one = _timed(engine.decode_step, lm, alone, [100], step)
        if step > 2:
            times["together"].append(t_all)
            times["alone"].append(t_one)
    return statistics.median(times["together"]), statistics.median(times["alone"]), entries


def floor_steps(lm: LoadedModel, n_rows: int, entries: int, steps: int) -> tuple[float, float]:
    """The same for plain transformers SDPA, a DynamicCache of `entries` per row (cropped back each step)."""
    model = lm.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        caches = {}
        with torch.no_grad():
            for b in (n_rows, 1):
                caches[b] = DynamicCache()
                model(input_ids=torch.full((b, entries), 100, device=lm.device), past_key_values=caches[b])
            times = {n_rows: [], 1: []}
            for step in range(steps + 2):
                for b in (n_rows, 1):
                    ids = torch.full((b, 1), 100, device=lm.device)
                    t = _timed(model, input_ids=ids, past_key_values=caches[b], logits_to_keep=1)
                    caches[b].crop(-1)
                    if step >= 2:
                        times[b].append(t)
    finally:
        model.set_attn_implementation(previous)
    return statistics.median(times[n_rows]), statistics.median(times[1])


def run_batch_step(
    lm: LoadedModel, *, prompt_tokens: int, budget: float, rows: int, policies: list[str], steps: int = 8
) -> dict:
    """Per policy: ms per step for `rows` stacked rows and for one, their ratio, and the floor's."""
    if rows < 2:
        raise ValueError(f"rows must be at least 2 to compare a batch with one row; got {rows}.")
    count = lambda s: len(lm.tokenizer(s)["input_ids"])  # noqa: E731
    prompts = [make_sample("passkey", prompt_tokens, 0.5, seed, count).prompt for seed in range(rows)]
    out = {"prompt_tokens": prompt_tokens, "budget": budget, "rows": rows, "policies": {}}
    entries = None
    for name in policies:
        together, alone, entries = policy_steps(lm, build(name, budget), prompts, steps)
        out["policies"][name] = {
            "batch_ms": 1000 * together,
            "one_ms": 1000 * alone,
            "ratio": together / alone,
        }
    batch, one = floor_steps(lm, rows, entries or round(budget * prompt_tokens), steps)
    out["floor"] = {"entries": entries, "batch_ms": 1000 * batch, "one_ms": 1000 * one, "ratio": batch / one}
    for stats in out["policies"].values():
        stats["over_floor"] = stats["ratio"] / out["floor"]["ratio"]
    return out


def cmd_batch_step(args) -> int:
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    lm = load_model(args.model, args.device, args.dtype)
    out = run_batch_step(
        lm,
        prompt_tokens=args.prompt_tokens,
        budget=args.budget,
        rows=args.rows,
        policies=names,
        steps=args.steps,
    )
    floor = out["floor"]
    print(f"{args.rows} rows of {args.prompt_tokens} prompt tokens at {100 * args.budget:g} % budget")
    print(
        f"floor (transformers, {floor['entries']} entries): 1 row {floor['one_ms']:.1f} ms, "
        f"{args.rows} rows {floor['batch_ms']:.1f} ms, ratio {floor['ratio']:.2f}"
    )
    for name, s in out["policies"].items():
        print(
            f"{name}: 1 row {s['one_ms']:.1f} ms, {args.rows} rows {s['batch_ms']:.1f} ms, "
            f"ratio {s['ratio']:.2f} ({s['over_floor']:.2f}x the floor's ratio)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def add_parser(sub, model_args: Callable) -> None:
    p = sub.add_parser("batch-step", help="decode step of a stacked batch vs one row, against a plain floor")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--policies", default="h2o,d2o")
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement (after 2 warm-up steps)")
    p.add_argument("--json", default=None)
    model_args(p)
    p.set_defaults(func=cmd_batch_step)
