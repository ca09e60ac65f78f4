"""What `cache_for` costs per token inside `model.generate()` against the explorer's own loop.

    python -m d2o_core interop-bench --prompt-tokens 2048 --budget 0.2 --new-tokens 32 --policies h2o,d2o

What this module is: a benchmark that prints ratios measured in one run (the machines are shared
and noisy; ratios measured side by side hold). For each policy it generates the same passkey
prompt (tasks.py) greedily with `d2o_core.generate` and with `model.generate(past_key_values=
cache_for(...))`, interleaved over `repeats` rounds, checks that both give the same tokens, and
reports each side's median prefill time and decode ms per token (from the runs' own clocks: the
explorer's, and the cache's hooks), their ratios, and a plain `model.generate()` (full cache) as the
floor.

What it is not: a profiler; the times are wall clocks around whole generations.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..engine import encode
from ..interop import cache_for
from ..models import LoadedModel, load_model
from ..policies import build
from ..runner import generate
from .tasks import make_sample


def _timed(fn: Callable) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_interop_bench(
    lm: LoadedModel,
    *,
    prompt_tokens: int,
    budget: float,
    new_tokens: int,
    policies: list[str],
    repeats: int = 3,
) -> dict:
    """Per policy: medians of prefill seconds and decode ms/token, the explorer's `generate` against
    `model.generate(past_key_values=cache_for(...))`, their ratios, and whether the tokens agree."""
    count = lambda s: len(lm.tokenizer(s)["input_ids"])  # noqa: E731
    ids = encode(lm, make_sample("passkey", prompt_tokens, 0.5, 0, count).prompt, chat=True)
    inputs = torch.tensor([ids], device=lm.device)
    # No EOS on either side, so both generate exactly `new_tokens` tokens by the same rule (argmax).
    lm = dataclasses.replace(lm, eos_ids=set())
    config = copy.deepcopy(lm.model.generation_config)
    config.eos_token_id, config.pad_token_id, config.do_sample = None, 0, False
    kwargs = {
        "max_new_tokens": new_tokens,
        "generation_config": config,
        "attention_mask": torch.ones_like(inputs),
    }
    out = {"prompt_tokens": len(ids), "budget": budget, "new_tokens": new_tokens, "policies": {}}
    plain = []
    for name in policies:
        policy = build(name, budget)
        rows = {"explorer": [], "generate": []}
        same = True
        for _ in range(repeats):  # interleaved, so machine noise hits both alike
            ref = generate(lm, ids, policy, max_new_tokens=new_tokens, fidelity=False)
            rows["explorer"].append(ref.metrics)
            cache = cache_for(lm, policy)
            got = lm.model.generate(inputs, past_key_values=cache, **kwargs)
            rows["generate"].append(cache.result(got).metrics)
            # generate() stops at the model's EOS whatever its config says; the explorer here does not.
            new = got[0, len(ids) :].tolist()
            same &= new == ref.token_ids[: len(new)]
            plain.append(_timed(lambda: lm.model.generate(inputs, **kwargs))[0])
        stats = {
            f"{side}_{key}": statistics.median(m[key] for m in runs)
            for side, runs in rows.items()
            for key in ("prefill_seconds", "decode_ms_per_token")
        }
        stats["decode_generate_over_explorer"] = (
            stats["generate_decode_ms_per_token"] / stats["explorer_decode_ms_per_token"]
        )
        stats["prefill_generate_over_explorer"] = (
            stats["generate_prefill_seconds"] / stats["explorer_prefill_seconds"]
        )
        out["policies"][name] = stats | {"same_tokens": same}
    out["plain_generate_seconds"] = statistics.median(plain)
    return out


def cmd_interop_bench(args) -> int:
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    lm = load_model(args.model, args.device, args.dtype)
    out = run_interop_bench(
        lm,
        prompt_tokens=args.prompt_tokens,
        budget=args.budget,
        new_tokens=args.new_tokens,
        policies=names,
        repeats=args.repeats,
    )
    print(
        f"{out['prompt_tokens']} prompt tokens, {args.new_tokens} new tokens, {100 * args.budget:g} % budget"
    )
    print(f"plain model.generate (full cache): {out['plain_generate_seconds']:.2f} s")
    for name, s in out["policies"].items():
        print(
            f"{name}: decode ms/token explorer {s['explorer_decode_ms_per_token']:.1f}, "
            f"generate(cache_for) {s['generate_decode_ms_per_token']:.1f} "
            f"(ratio {s['decode_generate_over_explorer']:.2f}); prefill s explorer "
            f"{s['explorer_prefill_seconds']:.2f}, generate {s['generate_prefill_seconds']:.2f} "
            f"(ratio {s['prefill_generate_over_explorer']:.2f}); same tokens: {s['same_tokens']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def add_parser(sub, model_args: Callable) -> None:
    p = sub.add_parser("interop-bench", help="cache_for in model.generate() against the explorer's own loop")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--policies", default="h2o,d2o")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    model_args(p)
    p.set_defaults(func=cmd_interop_bench)
