"""Sweep cells: one unit of work each (model x task x sample x policy configuration x budget x length).

What this module is: policy configurations (`parse_configs`: ``d2o``, ``d2o:official``,
``h2o:recent_share=0.3``), the grid of cells (`plan`), each cell's stable key (a hash of its
settings), the model a worker loads (`ModelSpec`), and running one cell into its record (`run_cell`,
the same in this process and in a Ray worker). A cell generates with one policy from its own prefill
(greedy, EOS stops it), so its tokens/s is that policy's alone.

A record (one JSON object per finished cell, store.py writes it)::

    {"format": "d2o-sweep-cell/1", "key": ..., "settings": {what the key hashes},
     "config": "d2o(variant=official)", "policy_settings": {every setting of the policy},
     "result": {"score", "output", "answers", "prompt_tokens", "truncated_tokens", "new_tokens",
                "kv_mb", "kv_mb_peak", "kv_mb_full", "kv_fraction", "tokens_per_second",
                "prefill_seconds", "decode_seconds", "wall_seconds", (with fidelity:)
                "token_agreement", "mean_kl_to_full"},
     "model": {"name", "source", "device", "dtype", "n_layers", "shape_only"},
     "versions": {"d2o_core", "torch", "transformers", "python"},
     "machine": {"platform", "node", "cpus", "torch_threads", "gpu"},
     "finished": ISO time (UTC), "worker_pid": ...}

What it is not: scheduling (executor.py), storage (store.py) or the metrics themselves (scoring.py,
ruler.score, RunResult.metrics).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .. import models
from ..engine import encode
from ..policies import POLICIES, build
from ..run_summary import jsonable
from ..runner import compare, generate
from . import ruler, scoring
from .data import Example

FORMAT = "d2o-sweep-cell/1"
FIDELITY = ("token_agreement", "mean_kl_to_full")  # with --fidelity
SYNTHETIC_METRIC = "string_match_all"  # RULER's: the share of the answers found in the output


@dataclass(frozen=True)
class PolicyConfig:
    """A policy name and the settings given for it (budget aside): one curve on the leaderboard."""

    name: str
    settings: tuple[tuple[str, object], ...] = ()

    def policy(self, budget: float):
        return build(self.name, 1.0 if self.name == "full" else budget, **dict(self.settings))

    @property
    def label(self) -> str:
        return self.policy(0.5).label


def _value(text: str):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return tuple(value) if isinstance(value, list) else value


def parse_configs(specs: Sequence[str], settings: dict[str, dict] | None = None) -> list[PolicyConfig]:
    """`["full", "d2o:official", "h2o:recent_share=0.3"]` -> PolicyConfigs, validated.

    After the name, ``:``-separated parts are ``setting=value`` (values read as JSON when they are) or
    a bare variant (``d2o:official`` is ``d2o:variant=official``). `settings` (the CLI's
    ``--set d2o.merge=false``) apply to every configuration of that policy; a part overrides them.
    """
    settings = settings or {}
    names = [s.split(":", 1)[0].strip() for s in specs if s.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if not names or unknown:
        raise ValueError(f"Choose policies from {', '.join(POLICIES)}; got {names or 'none'}.")
    unused = sorted(set(settings) - set(names))
    if unused:
        raise ValueError(f"--set names {', '.join(unused)}, which is not among --policies.")
    out: list[PolicyConfig] = []
    for spec in (s.strip() for s in specs if s.strip()):
        name, *parts = spec.split(":")
        given = dict(settings.get(name, {}))
        for part in parts:
            key, sep, value = part.partition("=")
            if sep:
                given[key.strip()] = _value(value.strip())
            elif part.strip():
                given["variant"] = part.strip()
        config = PolicyConfig(name, tuple(sorted(given.items())))
        config.policy(0.5)  # bad settings say so now, before any model loads
        out.append(config)
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"List each policy configuration once; got {labels}.")
    return out


def cell_key(settings: dict) -> str:
    """A stable hash of a cell's settings (sorted JSON): the name of its record."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class Cell:
    """One unit of work: `settings` (JSON, hashed into `key`) and, for a data row, its text."""

    settings: dict
    example: Example | None = None
    key: str = field(init=False)

    def __post_init__(self) -> None:
        self.key = cell_key(self.settings)


@dataclass(frozen=True)
class ModelSpec:
    """What a worker loads (picklable; a Ray actor calls it once): `models.load_model`'s arguments.

    `device_map="auto"` spreads a model larger than one GPU over the worker's GPUs (accelerate).
    """

    name: str | None = None
    device: str | None = None
    dtype: str | None = None
    device_map: str | None = None

    def __call__(self) -> models.LoadedModel:
        extra = {"device_map": self.device_map} if self.device_map else {}
        return models.load_model(self.name, self.device, self.dtype, **extra)

    @property
    def id(self) -> str:
        """The model's part of every cell key: its name, or the bundled model's."""
        return self.name or os.environ.get("D2O_MODEL") or models.BUNDLED


def _float_list(values, what: str) -> list[float]:
    out = [float(v) for v in values]
    if not out or any(not 0 < v <= 1 for v in out) or len(set(out)) != len(out):
        raise ValueError(f"{what} are distinct fractions in (0, 1], e.g. 0.1,0.2,0.4; got {list(values)}.")
    return out


def plan(
    model_id: str,
    configs: Sequence[PolicyConfig],
    budgets: Sequence[float],
    *,
    tasks: Sequence[str] = (),
    lengths: Sequence[int] = (),
    depths: Sequence[float] = (0.5,),
    samples: int = 1,
    seed: int = 0,
    examples: Sequence[Example] = (),
    metric: str = "contains",
    max_new_tokens: int = 16,
    chat: bool = True,
    fidelity: bool = False,
    dtype: str | None = None,
) -> list[Cell]:
    """Every cell, sample by sample (each sample's configurations and budgets together).

    A synthetic task gives one sample per (length, depth, seed ``seed + i`` for i < samples); ``cwe``
    and ``fwe`` ignore depth. Each data row is one sample at its own length. A "full" configuration
    runs once per sample, at budget 1.0; the others at every budget.
    """
    budgets = _float_list(budgets, "Budgets")
    unknown = [t for t in tasks if t not in ruler.SYNTHETIC]
    if unknown:
        raise ValueError(f"Choose tasks from {', '.join(ruler.SYNTHETIC)}; got {list(tasks)}.")
    if tasks and (not lengths or any(isinstance(n, bool) or int(n) != n or n < 1 for n in lengths)):
        raise ValueError(f"Lengths are prompt sizes in tokens, e.g. 512,1024; got {list(lengths) or 'none'}.")
    if tasks and (not depths or any(not 0 <= float(d) <= 1 for d in depths)):
        raise ValueError(f"Depths are fractions in [0, 1], e.g. 0.1,0.5,0.9; got {list(depths) or 'none'}.")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"--samples must be a positive whole number; got {samples!r}.")
    if not tasks and not examples:
        raise ValueError("Nothing to run: give --tasks, --data FILE.jsonl, or both.")
    if not configs:
        raise ValueError(f"Choose policies from {', '.join(POLICIES)}; got none.")
    metric = scoring.canonical(metric)
    common = {"model": model_id, "dtype": dtype, "max_new_tokens": int(max_new_tokens), "chat": bool(chat)}
    common["fidelity"] = bool(fidelity)
    samples_: list[tuple[dict, Example | None]] = []
    for task in tasks:
        for length in lengths:
            for depth in [None] if task in ruler.DEPTHLESS else depths:
                for i in range(samples):
                    d = None if depth is None else float(depth)
                    sample = {"task": task, "source": "synthetic", "sample": seed + i, "length": int(length)}
                    samples_.append((sample | {"depth": d, "data": None, "metric": SYNTHETIC_METRIC}, None))
    for ex in examples:
        sample = {"task": ex.task, "source": "data", "sample": ex.id, "length": ex.length, "depth": None}
        # A row's question is read after its context's compression, kept whole (kvpress's convention).
        kept = {"question_kept_whole": ex.question is not None}
        samples_.append((sample | kept | {"data": ex.digest, "metric": ex.metric or metric}, ex))
    cells: list[Cell] = []
    for sample, ex in samples_:
        for config in configs:
            for budget in [1.0] if config.name == "full" else budgets:
                policy = {"policy": config.name, "policy_settings": dict(config.settings), "budget": budget}
                cells.append(Cell(common | sample | policy, ex))
    return cells


# -- the worker's side: one cell into its record -------------------------------------------------


def machine() -> dict:
    """Where a cell ran: platform, host name, CPUs, torch threads and the GPU if there is one."""
    import torch  # noqa: PLC0415 - already loaded with the model

    info = {
        "platform": platform.platform(),
        "node": platform.node(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def versions() -> dict:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    import d2o_core  # noqa: PLC0415

    return {
        "d2o_core": getattr(d2o_core, "__version__", None),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _fit_context(lm, ex: Example, chat: bool) -> tuple[Example, int]:
    """(row, tokens cut): a row over the model's limit loses the middle of its context (LongBench)."""
    limit = lm.max_prompt_tokens
    n = len(encode(lm, ex.prompt(), chat))
    if n <= limit:
        return ex, 0
    ids, excess = lm.tokenizer(ex.context)["input_ids"], n - limit
    for _ in range(4):
        keep = len(ids) - excess - 8
        if keep <= 0:
            raise ValueError(f"row {ex.id}: its question alone is over the model's {limit}-token limit.")
        head, tail = ids[: keep // 2], ids[len(ids) - (keep - keep // 2) :]
        decode = lambda part: lm.tokenizer.decode(part, skip_special_tokens=True)
        cut = dataclasses.replace(ex, context=decode(head) + decode(tail))
        got = len(encode(lm, cut.prompt(), chat))
        if got <= limit:
            return cut, n - got
        excess += got - limit
    raise ValueError(f"row {ex.id}: could not cut it to the model's {limit}-token limit.")


def _prompt(lm, cell: Cell, samples: dict) -> tuple[str, str | None, tuple, Callable[[str], float], int]:
    """(prompt or context, question kept whole or None, answers, scorer, tokens cut) for a cell;
    synthetic samples are cached per worker."""
    s = cell.settings
    if s["source"] == "data":
        ex, cut = _fit_context(lm, cell.example, s["chat"])
        answers = ex.answers
        scorer = lambda out: scoring.score(s["metric"], out, answers)  # noqa: E731
        if s.get("question_kept_whole"):
            return ex.context, ex.question, answers, scorer, cut
        return ex.prompt(), None, answers, scorer, cut
    args = (s["task"], s["length"], 0.5 if s["depth"] is None else s["depth"], s["sample"])
    if args not in samples:
        if s["length"] > lm.max_prompt_tokens:
            raise ValueError(f"Length {s['length']} is over this model's limit of {lm.max_prompt_tokens}.")
        count = lambda text: len(lm.tokenizer(text)["input_ids"])  # the user message, as tasks.py expects
        samples[args] = ruler.make_sample(*args, count)
    sample = samples[args]
    return sample.prompt, None, sample.answers, lambda out: ruler.score(sample, out), 0


def run_cell(lm: models.LoadedModel, cell: Cell, samples: dict | None = None) -> dict:
    """Generate the cell's policy on its prompt and return its record (raises on bad input)."""
    start = time.perf_counter()
    s = cell.settings
    config = PolicyConfig(s["policy"], tuple(sorted(s["policy_settings"].items())))
    policy = config.policy(s["budget"])
    prompt, question, answers, scorer, cut = _prompt(lm, cell, {} if samples is None else samples)
    kwargs = dict(max_new_tokens=s["max_new_tokens"], chat=s["chat"], attention=False, question=question)
    if s["fidelity"] and policy.name != "full":  # the full cache reads along, for agreement and KL
        results = compare(lm, prompt, [build("full", 1.0), policy], **kwargs)
        res = results[next(label for label in results if label != "full")]
    else:
        res = generate(lm, prompt, policy, fidelity=False, **kwargs)
    m = res.metrics
    result = {
        "score": scorer(res.text), "output": res.text, "answers": list(answers),
        "prompt_tokens": m["prompt_tokens"], "truncated_tokens": cut, "new_tokens": m["new_tokens"],
        "kv_mb": m["kv_bytes_final"] / 1e6, "kv_mb_peak": m["kv_bytes_peak"] / 1e6,
        "kv_mb_full": m["kv_bytes_full"] / 1e6, "kv_fraction": m["kv_fraction"],
        "tokens_per_second": m["tokens_per_second"], "prefill_seconds": m["prefill_seconds"],
        "decode_seconds": m["decode_seconds"],
    }  # fmt: skip
    if s["fidelity"]:
        result |= {k: m.get(k, 1.0 if policy.name == "full" else math.nan) for k in FIDELITY}
    result["wall_seconds"] = time.perf_counter() - start
    record = {
        "format": FORMAT, "key": cell.key, "settings": s, "config": config.label,
        "policy_settings": policy.settings(), "result": result,
        "model": {"name": lm.name, "source": lm.source, "device": str(lm.device),
                  "dtype": str(lm.dtype).removeprefix("torch."), "n_layers": lm.n_layers,
                  "shape_only": lm.shape_only},
        "versions": versions(), "machine": machine(),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"), "worker_pid": os.getpid(),
    }  # fmt: skip
    return jsonable(record)


def try_cell(lm, cell: Cell, samples: dict | None = None) -> tuple[dict | None, dict | None]:
    """(record, None), or (None, {"error": one line, "traceback"}) when it fails: the sweep goes on."""
    try:
        return run_cell(lm, cell, samples), None
    except Exception as exc:  # noqa: BLE001 - any one cell's failure is recorded, the sweep continues
        return None, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
