"""VATP, value-aware token pruning (Guo et al., EMNLP 2024, arXiv 2406.12335).

An entry's importance is H2O's accumulated attention times the L1 norm of its value vector:
tokens that draw attention but carry near-zero values change the output little. Per kv-head,
in float32 (the query heads of a group summed, as for H2O). The paper keeps the initial
attention-sink tokens regardless (their values are small, so their product would be low):
`n_sink` is 4 here. Budget split and recent window as H2O; at decode the product is recomputed
from the current accumulated scores at every eviction (the paper prunes at prefill; this project
evicts one entry per step like H2O, and `compress_every` chooses otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .h2o import H2O
from .scoring import Accumulated, Scoring


@dataclass(frozen=True)
class ValueAware(Accumulated):
    """Accumulated attention, ranked by `score * ||v||_1` at every eviction."""

    ranks_entries = True

    def rank(self, keys, values, stored):
        return stored * values.float().abs().sum(dim=-1)


@dataclass(frozen=True)
class VATP(H2O):
    """H2O with each entry's accumulated attention weighted by its value's L1 norm; sinks kept."""

    n_sink: int = 4

    name: ClassVar[str] = "vatp"
    title: ClassVar[str] = "VATP"
    description: ClassVar[str] = (
        "VATP: accumulated attention times the value's L1 norm (https://arxiv.org/abs/2406.12335)"
    )

    def scoring(self) -> Scoring:
        return ValueAware()
