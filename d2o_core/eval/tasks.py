"""Long-context retrieval tasks for scoring KV-cache policies, generated in code (RULER style).

Three synthetic tasks; each prompt has a requested token length, one "needle" at a
relative depth (0.0 = start, 1.0 = end) and a question at the end:

- ``passkey``: a 5-digit pass key hidden in repeated filler sentences.
- ``kv``: many ``"key": "value"`` lines of random 8-character hex strings; the value
  of one key is asked for.
- ``vt``: variable tracking; a chain ``VAR QPWXZ = 48217.``, ``VAR HJKLM = VAR QPWXZ.``,
  ... hidden in filler (first assignment at the depth, later hops spread after it);
  every name in the chain must be given.

Samples are pure functions of their arguments (seeded ``random.Random``, no
downloads). Length is measured with a caller-supplied ``count_tokens`` and fitted
by an interpolation search on the number of filler units (a handful of calls), so
``n_tokens <= target_tokens`` and within about one filler unit (or 1 %) below it.
Scoring is RULER's exact match: every answer string must appear in the output,
case-insensitive and whitespace-normalised.

This module only builds prompts and scores outputs: it applies no chat template,
runs no model, and does not reproduce RULER's data files or its other tasks.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import pairwise

TASKS: tuple[str, ...] = ("passkey", "kv", "vt")
FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
HEADERS = {
    "passkey": "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.",
    "kv": "Below are many key-value pairs, one per line. Remember the value of each key; "
    "I will ask you for one of them.",
    "vt": "Memorize and track the chain of variable assignments hidden in the following text.",
}


@dataclass(frozen=True)
class TaskSample:
    """One generated prompt with its expected answers.

    ``prompt`` is the user message (the runner applies the chat template);
    ``answers`` holds every string that must appear in the output (for ``vt`` the
    chain names, also joined by ", " in ``answer``); ``n_tokens`` is
    ``count_tokens(prompt)``.
    """

    task: str
    prompt: str
    answer: str
    answers: tuple[str, ...]
    target_tokens: int
    n_tokens: int
    depth: float
    seed: int


@dataclass
class _Spec:
    """Pieces of a prompt: header, filler unit generator, needles, question."""

    header: str
    unit: Callable[[int], str]
    needles: list[str]  # needles[0] goes at the depth, the rest are spread after it
    sep: str
    question: str
    answers: tuple[str, ...]


def _spec(task: str, rng: random.Random, digits: int, hops: int | None) -> _Spec:
    filler = lambda i: FILLER[i % len(FILLER)]
    number = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    if task == "passkey":
        needle = f"The pass key is {number}. Remember it. {number} is the pass key."
        return _Spec(
            HEADERS[task],
            filler,
            [needle],
            " ",
            "What is the pass key? Answer with the number only.",
            (number,),
        )
    if task == "kv":
        hexs = lambda: f"{rng.getrandbits(32):08x}"
        key, value = hexs(), hexs()

        lines: list[str] = []
        seen = {key}

        def unit(i: int) -> str:  # i-th distractor line, generated lazily, keys unique
            while len(lines) <= i:
                k = hexs()
                if k not in seen:
                    seen.add(k)
                    lines.append(f'"{k}": "{hexs()}"')
            return lines[i]

        question = f'What is the value of key "{key}"? Answer with the value only.'
        return _Spec(HEADERS[task], unit, [f'"{key}": "{value}"'], "\n", question, (value,))
    hops = rng.randint(2, 4) if hops is None else hops
    question = (
        f"Question: find all variables that are assigned the value {number} in the text above, "
        f"directly or through other variables. Answer: the variables assigned the value {number} are"
    )
    taken = " ".join((HEADERS[task], question, *FILLER)).casefold()
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names and name.casefold() not in taken:
            names.append(name)
    needles = [f"VAR {names[0]} = {number}."] + [f"VAR {b} = VAR {a}." for a, b in pairwise(names)]
    return _Spec(HEADERS[task], filler, needles, " ", question, tuple(names))


def _assemble(spec: _Spec, n: int, depth: float) -> str:
    """Prompt with ``n`` filler units, needles[0] where its character offset / length ~ depth."""
    units = [spec.unit(i) for i in range(n)]
    fixed = len(spec.header) + 2 + len(spec.question) + 2 + len(spec.sep) * (n + len(spec.needles) - 1)
    total = fixed + sum(map(len, units)) + sum(map(len, spec.needles))
    offsets = [len(spec.header) + 2]
    for u in units:
        offsets.append(offsets[-1] + len(u) + len(spec.sep))
    first = min(range(n + 1), key=lambda i: abs(offsets[i] - depth * total))
    m = len(spec.needles)
    slots = [first] + [first + round(k * (n - first) / m) for k in range(1, m)]
    pieces: list[str] = []
    for j in range(n + 1):
        pieces += [needle for needle, slot in zip(spec.needles, slots, strict=True) if slot == j]
        pieces += units[j : j + 1]
    return f"{spec.header}\n\n{spec.sep.join(pieces)}\n\n{spec.question}"


def _fit(spec: _Spec, depth: float, target: int, count: Callable[[str], int], task: str) -> tuple[str, int]:
    """Largest prompt (in filler units) with at most ``target`` tokens; interpolation search."""
    unit_text = spec.sep.join(spec.unit(i) for i in range(32))
    return fit_units(lambda n: _assemble(spec, n, depth), unit_text, target, count, task)


def fit_units(
    build: Callable[[int], str], unit_text: str, target: int, count: Callable[[str], int], task: str
) -> tuple[str, int]:
    """(prompt, tokens): the largest ``build(n)`` with at most ``target`` tokens (interpolation search).

    ``build(n)`` is the prompt with ``n`` filler units (its length grows with ``n``); ``unit_text`` is 32
    units as they would be joined, for the first guess of tokens per unit. Other task modules (ruler.py)
    fit their prompts with it too.
    """
    best = build(0)
    lo, t_lo = 0, count(best)
    t0 = t_lo
    if t_lo > target:
        raise ValueError(
            f"target_tokens={target} is too small for task {task!r}: its instructions, needle and "
            f"question alone take {t_lo} tokens. Ask for at least {t_lo} tokens (a few hundred is typical)."
        )
    per_unit = max(count(unit_text) / 32, 0.5)
    hi, t_hi, bisect = 4 * target + 64, math.inf, False
    slack = max(3, target // 100)
    for _ in range(64):
        if hi - lo <= 1 or target - t_lo <= slack:
            break
        if bisect or t_hi == math.inf:
            guess = (lo + hi) // 2 if bisect else lo + round((target - t_lo) / per_unit)
        else:
            guess = lo + round((target - t_lo) * (hi - lo) / (t_hi - t_lo))
        n = min(max(guess, lo + 1), hi - 1)
        text, width = build(n), hi - lo
        t = count(text)
        per_unit = max((t - t0) / n, 0.1)
        if t <= target:
            best, lo, t_lo = text, n, t
        else:
            hi, t_hi = n, t
        bisect = hi - lo > width / 2 and t_hi != math.inf  # interpolation stalled: halve next time
    return best, t_lo


def make_sample(
    task: str,
    target_tokens: int,
    depth: float,
    seed: int,
    count_tokens: Callable[[str], int],
    *,
    digits: int = 5,
    hops: int | None = None,
) -> TaskSample:
    """Build one sample of ``task`` close to ``target_tokens`` tokens with its needle at ``depth``.

    Parameters
    ----------
    task : one of ``TASKS``.
    target_tokens : requested prompt length; the result has at most this many tokens.
    depth : relative position of the needle (first assignment for ``vt``), 0.0 to 1.0.
    seed : needle seed; the same seed gives the same needle at every length and depth.
    count_tokens : ``str -> int``, e.g. ``lambda s: len(tokenizer(s)["input_ids"])``.
    digits : digits of the pass key / ``vt`` value (1-12).
    hops : ``vt`` links ``VAR b = VAR a`` (chain of ``hops + 1`` names); default random 2-4.
    """
    whole = lambda x: isinstance(x, int) and not isinstance(x, bool)
    checks = (
        (task in TASKS, f"Unknown task {task!r}; choose one of {', '.join(TASKS)}."),
        (
            whole(target_tokens) and target_tokens >= 1,
            f"target_tokens must be a positive whole number, got {target_tokens!r}.",
        ),
        (
            isinstance(depth, int | float) and 0.0 <= depth <= 1.0,
            f"depth must be between 0.0 (start) and 1.0 (end), got {depth!r}.",
        ),
        (whole(seed), f"seed must be a whole number, got {seed!r}."),
        (whole(digits) and 1 <= digits <= 12, f"digits must be between 1 and 12, got {digits!r}."),
        (
            hops is None or whole(hops) and 1 <= hops <= 20,
            f"hops must be between 1 and 20 variable links, got {hops!r}.",
        ),
        (callable(count_tokens), "count_tokens must be a function str -> int, e.g. a tokenizer's length."),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    spec = _spec(task, random.Random(f"{task}:{seed}"), digits, hops)
    prompt, n_tokens = _fit(spec, float(depth), target_tokens, count_tokens, task)
    answers = spec.answers
    return TaskSample(task, prompt, ", ".join(answers), answers, target_tokens, n_tokens, float(depth), seed)


def make_suite(
    tasks: Iterable[str] | str,
    lengths: Iterable[int],
    depths: Iterable[float],
    samples: int,
    seed: int,
    count_tokens: Callable[[str], int],
) -> list[TaskSample]:
    """Every (task, length, depth, sample index) combination, in that nesting order.

    Sample ``i`` uses seed ``seed + i`` at every length and depth, so a grid varies
    only length and depth for a given needle.
    """
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    lengths, depths = tuple(lengths), tuple(depths)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive whole number, got {samples!r}.")
    if not tasks or not lengths or not depths:
        raise ValueError("make_suite needs at least one task, one length and one depth.")
    return [
        make_sample(task, length, depth, seed + i, count_tokens)
        for task in tasks
        for length in lengths
        for depth in depths
        for i in range(samples)
    ]


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def partial_score(sample: TaskSample, output: str) -> float:
    """Fraction of ``sample.answers`` found in ``output`` (RULER's partial match)."""
    out = _norm(output)
    return sum(_norm(a) in out for a in sample.answers) / len(sample.answers)


def score(sample: TaskSample, output: str) -> float:
    """1.0 when every ``sample.answers`` string is in ``output`` (case/whitespace-insensitive), else 0.0."""
    return 1.0 if partial_score(sample, output) == 1.0 else 0.0
