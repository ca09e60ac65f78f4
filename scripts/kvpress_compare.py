"""Our policies against NVIDIA kvpress's presses: same model, same prompts, same context/question split.

    .venv/bin/python scripts/kvpress_compare.py --kvpress-python /work/kvpress-venv/bin/python \\
        --samples 10 --kvpress-workers 3 --json /tmp/kvpress-compare.json

Results and the venv recipe: docs/kvpress-comparison.md.

Builds ``--samples`` samples of each task (the built-in ``passkey`` and ``kv`` tasks of
d2o_core/eval/tasks.py; seeds 0..N-1, needle depths spread evenly: sample i at (i + 0.5) / N; one
length, ``--tokens``, counted with the chat template), splits each prompt into its context and its
question (the last paragraph), and answers it greedily with

- ours: StreamingLLM, SnapKV, TOVA, KeyDiff and key norm with ``compress_every=0`` (the context is
  compressed once; the cache then only grows), through ``d2o_core.compare(..., question=...)``: the
  question, with the chat template's turn end and assistant header, is read after the compression and
  never evicted;
- kvpress: StreamingLLMPress, SnapKVPress, TOVAPress, KeyDiffPress and KnormPress with
  ``compression_ratio = 1 - budget``, through kvpress's "kv-press-text-generation" pipeline, which
  compresses the context and then appends the question (kvpress's own convention), in kvpress's own
  virtual environment (it pins transformers < 5.3): this script runs itself there with ``--kvpress-side``,
  a mode that imports only kvpress, transformers and torch;

plus the full cache on both sides as a check that the two pipelines agree without compression. Both
score with the task's own scorer (``tasks.score``) and a dated markdown table is printed: hits out of N
per task, budget and policy, ours and kvpress's, and how many answers are the same text.

Settings aligned with kvpress 0.5.5 (its press defaults, set explicitly on both sides):

- the same prompt tokens: our context ids (``engine.encode_parts``) and question ids equal the ids
  kvpress's pipeline makes from the same context and ``"\\n\\n" + question`` (the blank line our
  ``encode_parts`` puts between them); the script checks this for every sample;
- the same number of kept entries: kvpress keeps ``int(n * (1 - compression_ratio))`` context entries
  per layer and kv-head, we keep ``round(budget * n)``; each of our policies gets the budget
  ``kept / n`` so both keep exactly as many (``--nominal-budget`` turns this off); the kvpress side
  reports its cache length after the compression and the script checks it;
- StreamingLLM: ``n_sink=4`` (StreamingLLMPress's ``n_sink``), the rest of the budget the most recent
  entries;
- SnapKV: ``window=64``, ``kernel=5`` (SnapKVPress's ``window_size``, ``kernel_size``), no sinks; the
  window is kept inside the budget on both sides; scores are pooled per position and averaged over each
  kv-head's query heads;
- TOVA: no sinks; the last context query's attention averaged over all heads of the layer, one decision
  per layer; the last context entry is kept (kvpress pads it with the maximum score, we keep a recent
  window of one);
- KeyDiff and key norm: ``recent_share=0``, ``n_sink=0`` (kvpress keeps no window and no sinks);
- greedy decoding on both sides, ``--max-new-tokens`` new tokens, stopping at the end-of-turn token;
  float32 on CPU on both sides. Attention differs in implementation only (ours: the explorer's own
  attention function; kvpress: the model's default, sdpa), so logits may differ in the last bits.

Without ``--kvpress-python`` (or the environment variable KVPRESS_PYTHON), or when kvpress cannot be
imported there, the script says so and prints our side only (exit status 0).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("passkey", "kv")
POLICIES = ("streaming", "snapkv", "tova", "keydiff", "knorm")
# kvpress 0.5.5's press for each policy, and the settings set explicitly on both sides.
PRESSES = {
    "full": (None, {}),
    "streaming": ("StreamingLLMPress", {"n_sink": 4}),
    "snapkv": ("SnapKVPress", {"window_size": 64, "kernel_size": 5}),
    "tova": ("TOVAPress", {}),
    "keydiff": ("KeyDiffPress", {}),
    "knorm": ("KnormPress", {}),
}
OURS = {
    "full": {},
    "streaming": {"n_sink": 4},
    "snapkv": {"window": 64, "kernel": 5, "n_sink": 0},
    "tova": {"n_sink": 0},
    "keydiff": {"recent_share": 0.0, "n_sink": 0},
    "knorm": {"recent_share": 0.0, "n_sink": 0},
}
QUIET = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def kvpress_kept(n: int, budget: float) -> int:
    """Entries kvpress keeps of an ``n``-token context at ``compression_ratio = 1 - budget``."""
    ratio = 1 - budget
    return max(1, int(n * (1 - ratio)))  # kvpress.utils.compute_n_kept, the same float arithmetic


# -- kvpress's side (its own venv: imports kvpress, transformers and torch only) ----------------------------


def kvpress_side(request_path: str, answer_path: str) -> None:
    """Answer every (sample, run) of the request with kvpress's pipeline; write answers and token ids."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    import dataclasses  # noqa: PLC0415

    import kvpress  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline  # noqa: PLC0415

    transformers.utils.logging.disable_progress_bar()
    if os.environ.get("KVPRESS_COMPARE_THREADS"):
        torch.set_num_threads(int(os.environ["KVPRESS_COMPARE_THREADS"]))
    request = json.loads(Path(request_path).read_text())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(request["model"])
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    defaults = {}
    for name, (press_name, _) in PRESSES.items():
        if press_name:
            fields = dataclasses.fields(getattr(kvpress, press_name))
            defaults[name] = {f.name: f.default for f in fields if f.name != "compression_ratio"}
    out = {
        "kvpress": getattr(kvpress, "__version__", None) or _dist_version("kvpress"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "attn_implementation": model.config._attn_implementation,
        "press_defaults": defaults,
        "samples": [],
    }
    start = time.perf_counter()
    for i, sample in enumerate(request["samples"]):
        inputs = pipe.preprocess(
            sample["context"], questions=[sample["question"]], answer_prefix="", max_context_length=10**9
        )
        row = {
            "context_ids": inputs["context_ids"][0].tolist(),
            "question_ids": inputs["questions_ids"][0][0].tolist(),
            "answers": [],
        }
        for run in request["runs"]:
            press_name, settings = PRESSES[run["policy"]]
            press = None
            if press_name:
                press = getattr(kvpress, press_name)(compression_ratio=1 - run["budget"], **settings)
            cache = DynamicCache()
            with torch.no_grad():
                answer = pipe(
                    sample["context"],
                    question=sample["question"],
                    press=press,
                    max_new_tokens=request["max_new_tokens"],
                    cache=cache,
                )["answer"]
            kept = sorted({cache.get_seq_length(layer) for layer in range(len(cache))})
            row["answers"].append({"text": answer, "kept": kept})
        out["samples"].append(row)
        Path(answer_path).write_text(json.dumps(out))  # what is done so far, should the run be cut short
        log(f"  kvpress: sample {i + 1}/{len(request['samples'])} ({time.perf_counter() - start:.0f} s)")
    Path(answer_path).write_text(json.dumps(out))


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# -- our side --------------------------------------------------------------------------------------------


def split(prompt: str) -> tuple[str, str]:
    """(context, question): the task's prompt ends with a blank line and the question."""
    context, question = prompt.rsplit("\n\n", 1)
    return context, question


def build_samples(lm, tasks, n, tokens):
    from d2o_core.engine import encode  # noqa: PLC0415
    from d2o_core.eval.tasks import make_sample  # noqa: PLC0415

    count = lambda text: len(encode(lm, text, True))
    return [make_sample(task, tokens, round((i + 0.5) / n, 4), i, count) for task in tasks for i in range(n)]


def runs_for(budgets, policies):
    return [{"policy": "full", "budget": 1.0}] + [
        {"policy": p, "budget": b} for b in budgets for p in policies
    ]


def our_side(lm, samples, runs, max_new_tokens, nominal):
    """Per sample: ids, kept counts and answer texts of every run (one shared prefill per sample)."""
    from d2o_core import POLICIES, compare  # noqa: PLC0415
    from d2o_core.engine import encode_parts  # noqa: PLC0415

    rows, start = [], time.perf_counter()
    for i, sample in enumerate(samples):
        context, question = split(sample.prompt)
        ids, held = encode_parts(lm, context, question, True)
        n = len(ids)
        policies, kept = [], []
        for run in runs:
            if run["policy"] == "full":
                policies.append(POLICIES["full"]())
                kept.append(n)
                continue
            k = kvpress_kept(n, run["budget"])
            budget = run["budget"] if nominal else k / n
            policy = POLICIES[run["policy"]](budget=budget, compress_every=0, **OURS[run["policy"]])
            policies.append(policy)
            kept.append(policy.budget_tokens(n))
        results = compare(
            lm,
            context,
            policies,
            question=question,
            max_new_tokens=max_new_tokens,
            chat=True,
            fidelity=False,
            attention=False,
        )
        by_label = dict(zip(_labels(policies), range(len(policies))))
        ordered = [None] * len(policies)
        for label, result in results.items():
            ordered[by_label[label]] = result.text
        assert None not in ordered
        rows.append({"context_ids": ids, "question_ids": held, "kept": kept, "texts": ordered})
        log(f"  ours: sample {i + 1}/{len(samples)} ({time.perf_counter() - start:.0f} s)")
    return rows


def _labels(policies):
    from d2o_core.runner import result_labels  # noqa: PLC0415

    return result_labels(policies)


def start_kvpress(python: str, model_dir: Path, samples, runs, max_new_tokens, threads: int, workers: int):
    """Start kvpress's side in its own venv, the samples split over `workers` processes; returns a handle
    for `finish_kvpress`, or None (with a sentence on stdout) when kvpress cannot be imported there."""
    env = {**os.environ, **QUIET, "OMP_NUM_THREADS": str(threads), "KVPRESS_COMPARE_THREADS": str(threads)}
    probe = subprocess.run([python, "-c", "import kvpress"], capture_output=True, text=True, env=env)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"kvpress is not importable with {python} ({last}); printing our side only.")
        return None
    tmp = tempfile.TemporaryDirectory(prefix="kvpress-compare-")
    items = [{"context": c, "question": "\n\n" + q} for c, q in (split(s.prompt) for s in samples)]
    workers = max(1, min(workers, len(items)))
    bounds = [round(k * len(items) / workers) for k in range(workers + 1)]
    shards = []
    for k in range(workers):
        request, answers = Path(tmp.name) / f"request-{k}.json", Path(tmp.name) / f"answers-{k}.json"
        request.write_text(
            json.dumps(
                {
                    "model": str(model_dir),
                    "samples": items[bounds[k] : bounds[k + 1]],
                    "runs": runs,
                    "max_new_tokens": max_new_tokens,
                }
            )
        )
        cmd = [python, str(Path(__file__).resolve()), "--kvpress-side", str(request), str(answers)]
        shards.append((answers, subprocess.Popen(cmd, env=env)))
    log(f"kvpress's side: {python}, {workers} process(es), answers in {tmp.name}")
    return tmp, shards, time.perf_counter()


def finish_kvpress(handle) -> tuple[dict, float]:
    """Wait for kvpress's side: (its answers, every shard's samples in order; its wall time in seconds)."""
    tmp, shards, start = handle
    with tmp:
        codes = [process.wait() for _, process in shards]
        if any(codes):
            raise SystemExit(f"kvpress's side failed (exit status {max(codes)}); see its output above.")
        parts = [json.loads(answers.read_text()) for answers, _ in shards]
        merged = parts[0] | {"samples": [row for part in parts for row in part["samples"]]}
        return merged, time.perf_counter() - start


# -- the table -------------------------------------------------------------------------------------------


def table(samples, runs, ours, theirs) -> str:
    from d2o_core.eval.tasks import score  # noqa: PLC0415

    n_per_task = {t: sum(s.task == t for s in samples) for t in dict.fromkeys(s.task for s in samples)}
    head = "| task | budget | policy | ours | kvpress | ours - kvpress | same answer |"
    if theirs is None:
        head = "| task | budget | policy | ours |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for task, n in n_per_task.items():
        index = [i for i, s in enumerate(samples) if s.task == task]
        for j, run in enumerate(runs):
            hits = sum(score(samples[i], ours[i]["texts"][j]) for i in index)
            budget = "100 %" if run["policy"] == "full" else f"{100 * run['budget']:g} %"
            cells = [task, budget, run["policy"], f"{hits:g}/{n}"]
            if theirs is not None:
                other = [theirs["samples"][i]["answers"][j]["text"] for i in index]
                their_hits = sum(score(samples[i], t) for i, t in zip(index, other))
                same = sum(ours[i]["texts"][j].strip() == t.strip() for i, t in zip(index, other))
                cells += [f"{their_hits:g}/{n}", f"{hits - their_hits:+g}", f"{same}/{n}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks(samples, runs, ours, theirs) -> list[str]:
    """Sentences for every way the two sides' inputs differ (token ids, kept counts)."""
    problems = []
    for i, (mine, other) in enumerate(zip(ours, theirs["samples"])):
        name = f"{samples[i].task} seed {samples[i].seed}"
        if mine["context_ids"] != other["context_ids"] or mine["question_ids"] != other["question_ids"]:
            problems.append(f"{name}: the context or question token ids differ between the two sides.")
        for j, run in enumerate(runs):
            kept = other["answers"][j]["kept"]
            if kept != [mine["kept"][j]] and run["policy"] != "full":
                problems.append(
                    f"{name} {run['policy']}@{run['budget']}: kvpress kept {kept}, ours {mine['kept'][j]}"
                )
    for name, (_, settings) in PRESSES.items():
        defaults = theirs["press_defaults"].get(name, {})
        for key, value in settings.items():
            if defaults.get(key) != value:
                problems.append(
                    f"{PRESSES[name][0]}.{key} defaults to {defaults.get(key)!r} in this kvpress; "
                    f"both sides use {value!r} here."
                )
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10, help="samples per task (seeds 0..N-1)")
    parser.add_argument(
        "--tokens", type=int, default=1024, help="prompt length in tokens (chat template included)"
    )
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--budgets", default="0.2,0.4", help="fractions of the context kept")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument(
        "--kvpress-python",
        default=os.environ.get("KVPRESS_PYTHON"),
        help="python of a venv with kvpress (e.g. /work/kvpress-venv/bin/python)",
    )
    parser.add_argument(
        "--nominal-budget",
        action="store_true",
        help="give our policies the nominal budget instead of kvpress's kept count / n",
    )
    parser.add_argument(
        "--sequential",
        dest="parallel",
        action="store_false",
        help="run kvpress's side before ours with every thread (default: both at once, one thread each)",
    )
    parser.add_argument(
        "--kvpress-workers",
        type=int,
        default=1,
        help="kvpress processes, each answering a share of the samples (one thread each with our side)",
    )
    parser.add_argument("--json", help="write every sample's answers and the table here")
    parser.add_argument("--kvpress-side", nargs=2, metavar=("REQUEST", "ANSWERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.kvpress_side:
        kvpress_side(*args.kvpress_side)
        return 0

    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    sys.path.insert(0, str(ROOT))
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    import d2o_core  # noqa: PLC0415

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    budgets = [float(b) for b in args.budgets.split(",")]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in PRESSES or p == "full"]
    if unknown:
        parser.error(f"no kvpress press is paired with {unknown}; choose from {', '.join(POLICIES)}.")
    started = time.perf_counter()
    theirs, their_seconds = None, 0.0
    lm = d2o_core.load_model(device="cpu", dtype="float32")
    samples = build_samples(lm, tasks, args.samples, args.tokens)
    runs = runs_for(budgets, policies)
    handle = None
    if not args.kvpress_python:
        print("No kvpress python given (--kvpress-python or KVPRESS_PYTHON); printing our side only.")
    else:
        threads = 1 if args.parallel else torch.get_num_threads()
        handle = start_kvpress(
            args.kvpress_python,
            d2o_core.bundled_folder(),
            samples,
            runs,
            args.max_new_tokens,
            threads,
            args.kvpress_workers,
        )
        if handle is not None and args.parallel:
            torch.set_num_threads(1)  # the two sides share the cores: one thread each
        elif handle is not None:
            theirs, their_seconds = finish_kvpress(handle)
            handle = None
    log(f"{len(samples)} samples x {len(runs)} runs; our side...")
    t0 = time.perf_counter()
    ours = our_side(lm, samples, runs, args.max_new_tokens, args.nominal_budget)
    our_seconds = time.perf_counter() - t0
    if handle is not None:
        log("waiting for kvpress's side...")
        theirs, their_seconds = finish_kvpress(handle)

    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    lengths = sorted({len(o["context_ids"]) + len(o["question_ids"]) for o in ours})
    budget_note = "nominal" if args.nominal_budget else "kvpress's kept count / context length"
    print(f"\n### Ours vs kvpress, {date}\n")
    print(
        f"Model {lm.name} (the bundled converted folder), float32 on CPU ({platform.machine()}); "
        f"{args.samples} samples per task, prompts of {lengths[0]}-{lengths[-1]} tokens "
        f"(target {args.tokens}, chat template included), needle depths (i + 0.5) / {args.samples}; "
        f"greedy, {args.max_new_tokens} new tokens; compress_every=0, question kept whole; "
        f"our budget = {budget_note}."
    )
    versions = f"ours: transformers {transformers.__version__}, torch {torch.__version__}"
    if theirs is not None:
        versions += (
            f"; kvpress {theirs['kvpress']}: transformers {theirs['transformers']}, torch {theirs['torch']}, "
            f"attention {theirs['attn_implementation']}"
        )
    timing = f"ours {our_seconds:.0f} s"
    if theirs is not None:
        how = "one after the other"
        if args.parallel:
            how = f"at once: ours in one process, kvpress in {args.kvpress_workers}, one thread each"
        timing += f", kvpress {their_seconds:.0f} s ({how})"
    print(f"Versions: {versions}. Wall time: {timing}.\n")
    text = table(samples, runs, ours, theirs)
    print(text)
    problems = checks(samples, runs, ours, theirs) if theirs is not None else []
    if theirs is not None:
        print(
            "\nInputs checked: "
            + (
                "; ".join(problems)
                if problems
                else "the same context and question token ids, and the same number of kept entries "
                "in every layer, on both sides."
            )
        )
    if args.json:
        dump = {
            "date": date,
            "args": vars(args),
            "runs": runs,
            "samples": [
                {
                    "task": s.task,
                    "seed": s.seed,
                    "depth": s.depth,
                    "answer": s.answer,
                    "n_tokens": s.n_tokens,
                    "ours": o["texts"],
                    "kvpress": None if theirs is None else [a["text"] for a in t["answers"]],
                }
                for s, o, t in zip(samples, ours, theirs["samples"] if theirs else [None] * len(ours))
            ],
            "table": text,
            "problems": problems,
        }
        Path(args.json).write_text(json.dumps(dump, indent=1))
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
