"""Answer metrics for your own data: contains, exact match, token F1 and ROUGE-L.

- ``contains``: 1.0 when an answer appears in the output (case and whitespace ignored), else 0.0.
- ``exact``: 1.0 when the output equals an answer after LongBench's ``normalize_answer`` (lower case,
  punctuation and the articles a/an/the removed, whitespace collapsed).
- ``f1``: LongBench's ``qa_f1_score``: F1 over the normalised whitespace tokens of output and answer.
- ``rouge_l``: ROUGE-L F-measure from Google's ``rouge-score`` package (its own tokenizer: lower
  case, letters and digits only; imported when first used).

With several answers each metric takes the best one (as LongBench does). Aliases such as
``exact_match``, ``qa_f1`` or ``rouge`` are accepted (`canonical`).

What it is not: the synthetic tasks' scoring (RULER's share of answers found, ruler.score) or any
model code.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import cache

METRICS: tuple[str, ...] = ("contains", "exact", "f1", "rouge_l")
ALIASES = {
    "contains": "contains", "string_match": "contains", "substring": "contains",
    "exact": "exact", "exact_match": "exact", "em": "exact",
    "f1": "f1", "qa_f1": "f1", "qa_f1_score": "f1", "token_f1": "f1",
    "rouge_l": "rouge_l", "rouge-l": "rouge_l", "rougel": "rouge_l", "rouge": "rouge_l",
}  # fmt: skip
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def canonical(metric: str) -> str:
    """The metric's name in METRICS; ValueError for anything else."""
    name = ALIASES.get(str(metric).strip().lower())
    if name is None:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}.")
    return name


def normalize_answer(text: str) -> str:
    """LongBench's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def contains(output: str, answer: str) -> float:
    norm = lambda s: " ".join(s.split()).casefold()
    return float(norm(answer) in norm(output))


def exact(output: str, answer: str) -> float:
    return float(normalize_answer(output) == normalize_answer(answer))


def token_f1(output: str, answer: str) -> float:
    """LongBench's QA F1 over normalised tokens (0.0 when nothing is shared)."""
    pred, truth = normalize_answer(output).split(), normalize_answer(answer).split()
    same = sum((Counter(pred) & Counter(truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(truth)
    return 2 * precision * recall / (precision + recall)


@cache
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer  # noqa: PLC0415 - only the rouge_l metric needs it
    except ImportError:
        raise ValueError(
            "The rouge_l metric needs the rouge-score package: pip install rouge-score"
        ) from None
    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(output: str, answer: str) -> float:
    """ROUGE-L F-measure (rouge-score's tokenizer: lower case, letters and digits)."""
    return float(_rouge_scorer().score(answer, output)["rougeL"].fmeasure)


_FUNCTIONS = {"contains": contains, "exact": exact, "f1": token_f1, "rouge_l": rouge_l}


def score(metric: str, output: str, answers: Sequence[str]) -> float:
    """The best score of ``output`` against any of ``answers`` under ``metric``."""
    fn = _FUNCTIONS[canonical(metric)]
    return max((fn(output, a) for a in answers), default=0.0)
