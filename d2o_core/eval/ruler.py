"""More synthetic tasks in RULER's family, generated offline from a seed: needles, aggregation.

Tasks (names as the sweep takes them; tasks.py keeps ``passkey``, ``kv`` and ``vt``, RULER's variable
tracking):

- ``niah_single``: one needle "One of the special magic numbers for {key} is: {value}." in filler
  prose; the key's number is asked for.
- ``niah_multikey``: four needles with different keys; one key's number is asked for (the other three
  are distractors).
- ``niah_multivalue``: four needles with the same key and different numbers; all four are asked for.
- ``niah_multiquery``: four needles with different keys; all four numbers are asked for.
- ``cwe`` (common words extraction): a numbered list of coded words; ten appear many times, the rest a
  few times; the ten common ones are asked for.
- ``fwe`` (frequent words extraction): coded words whose counts follow a Zipf law (exponent 2), shuffled;
  the three most frequent are asked for.

Needle tasks put the first (asked) needle at the depth and spread the others after it, as tasks.py
does; ``cwe`` and ``fwe`` have no depth. Filler prose and key words come from filler.py (written for
this project, CC0); coded words are random syllables. Every sample is a pure function of (task, length,
depth, seed, tokenizer): no downloads. Lengths are fitted with tasks.fit_units (at most the target).
RULER's list sizes are scaled down for short prompts: ``cwe`` repeats each common word
``clamp(target // 120, 4, 30)`` times and each other word a tenth of that (at least once).

Scoring (``score``) is RULER's ``string_match_all``: the share of answers found in the output,
case-insensitive.

What it is not: RULER's own data files or prompt templates verbatim; no model is run here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from . import tasks
from .filler import ADJECTIVES, NOUNS, SENTENCES
from .tasks import TaskSample, _assemble, _Spec, fit_units

NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
AGGREGATION_TASKS = ("cwe", "fwe")
RULER_TASKS: tuple[str, ...] = NEEDLE_TASKS + AGGREGATION_TASKS
SYNTHETIC: tuple[str, ...] = tasks.TASKS + RULER_TASKS
DEPTHLESS = frozenset(AGGREGATION_TASKS)  # one sample per length and seed; depth is not used

NIAH_HEADER = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards."
)
CWE_HEADER = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often."
)
FWE_HEADER = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words."
)
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def _numbers(rng: random.Random, k: int) -> list[str]:
    out: list[str] = []
    while len(out) < k:
        value = str(rng.randint(1_000_000, 9_999_999))
        if value not in out:
            out.append(value)
    return out


def _keys(rng: random.Random, k: int) -> list[str]:
    out: list[str] = []
    while len(out) < k:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in out:
            out.append(key)
    return out


class _Words:
    """Distinct coded words of three syllables (six letters, so none contains another), drawn lazily."""

    def __init__(self, rng: random.Random):
        self.rng, self.words, self.seen = rng, [], set()

    def __getitem__(self, i: int) -> str:
        while len(self.words) <= i:
            word = "".join(self.rng.choice(_CONSONANTS) + self.rng.choice(_VOWELS) for _ in range(3))
            if word not in self.seen:
                self.seen.add(word)
                self.words.append(word)
        return self.words[i]


def _needle_spec(task: str, rng: random.Random) -> _Spec:
    kind = task.removeprefix("niah_")
    n_keys = 1 if kind in ("single", "multivalue") else 4
    keys, values = _keys(rng, n_keys), _numbers(rng, 1 if kind == "single" else 4)
    if kind == "multivalue":
        keys = keys * 4
    needle = "One of the special magic numbers for {} is: {}."
    needles = [needle.format(k, v) for k, v in zip(keys, values)]
    if kind in ("single", "multikey"):
        question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
        question += " Answer with the number only."
        answers = (values[0],)
    elif kind == "multivalue":
        question = f"What are all the special magic numbers for {keys[0]} mentioned in the provided text?"
        answers = tuple(values)
    else:
        asked = ", ".join(keys[:-1]) + f" and {keys[-1]}"
        question = f"What are all the special magic numbers for {asked} mentioned in the provided text?"
        answers = tuple(values)
    unit = lambda i: SENTENCES[i % len(SENTENCES)]
    return _Spec(NIAH_HEADER, unit, needles, " ", question, answers)


def _cwe(rng: random.Random, seed: int, target: int) -> tuple[Callable[[int], str], str, tuple[str, ...]]:
    words = _Words(rng)
    freq_common = min(30, max(4, target // 120))
    freq_rare = max(1, freq_common // 10)
    common = [words[i] for i in range(10)]
    question = "Question: What are the 10 most common words in the above list? Answer with the words only."

    def build(n: int) -> str:
        items = common * freq_common + [words[10 + i] for i in range(n)] * freq_rare
        random.Random(f"cwe:{seed}:{n}").shuffle(items)
        listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return f"{CWE_HEADER}\n\n{listing}\n\n{question}"

    unit_text = "\n".join(f"{i + 1}. {words[10 + i]}" for i in range(32))
    return build, unit_text, tuple(common)


def fwe_counts(n: int) -> list[int]:
    """Counts by rank for about ``n`` coded words: Zipf, exponent 2, the top three strictly above the rest."""
    size = max(10, n // 4)
    harmonic = sum(1 / k**2 for k in range(1, size + 1))
    counts = [max(1, math.floor(n / (k**2 * harmonic))) for k in range(1, size + 1)]
    for i in (2, 1, 0):  # rank 3 above every later one, rank 2 above rank 3, rank 1 above rank 2
        counts[i] = max(counts[i], max(counts[i + 1 :]) + 1)
    return counts


def _fwe(rng: random.Random, seed: int) -> tuple[Callable[[int], str], str, tuple[str, ...]]:
    words = _Words(rng)
    question = (
        "Question: What are the three most frequently appeared coded words in the above coded text? "
        "Answer with the three words only."
    )

    def build(n: int) -> str:
        items = [words[k] for k, c in enumerate(fwe_counts(n)) for _ in range(c)]
        random.Random(f"fwe:{seed}:{n}").shuffle(items)
        return f"{FWE_HEADER}\n\n{' '.join(items)}\n\n{question}"

    unit_text = " ".join(words[i] for i in range(32))
    return build, unit_text, (words[0], words[1], words[2])


def make_sample(
    task: str, target_tokens: int, depth: float, seed: int, count_tokens: Callable[[str], int]
) -> TaskSample:
    """One sample of any synthetic task (tasks.py's or RULER_TASKS) near ``target_tokens`` tokens.

    ``depth`` places the asked needle (ignored by ``cwe`` and ``fwe``, whose samples carry NaN); the same
    seed gives the same keys, numbers and words at every length and depth.
    """
    if task in tasks.TASKS:
        return tasks.make_sample(task, target_tokens, depth, seed, count_tokens)
    if task not in RULER_TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(SYNTHETIC)}.")
    if isinstance(target_tokens, bool) or not isinstance(target_tokens, int) or target_tokens < 1:
        raise ValueError(f"target_tokens must be a positive whole number, got {target_tokens!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be a whole number, got {seed!r}.")
    rng = random.Random(f"{task}:{seed}")
    if task in NEEDLE_TASKS:
        if not isinstance(depth, int | float) or not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be between 0.0 (start) and 1.0 (end), got {depth!r}.")
        spec = _needle_spec(task, rng)
        unit_text = spec.sep.join(spec.unit(i) for i in range(32))
        build, answers = (lambda n: _assemble(spec, n, float(depth))), spec.answers
        depth = float(depth)
    else:
        build, unit_text, answers = _cwe(rng, seed, target_tokens) if task == "cwe" else _fwe(rng, seed)
        depth = math.nan
    prompt, n_tokens = fit_units(build, unit_text, target_tokens, count_tokens, task)
    return TaskSample(task, prompt, ", ".join(answers), answers, target_tokens, n_tokens, depth, seed)


def score(sample: TaskSample, output: str) -> float:
    """RULER's string_match_all: the share of ``sample.answers`` in ``output`` (case-insensitive)."""
    return tasks.partial_score(sample, output)
