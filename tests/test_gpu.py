"""The GPU path (bfloat16 on CUDA). Skipped cleanly on machines without CUDA, such as CI.

Set D2O_GPU_MODEL to a local path or hub id (e.g. a 7B instruct model) to also run a real model.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import TEXT, tiny_model

import d2o_core
from d2o_core import POLICIES

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_tiny_model_in_bfloat16_on_cuda_keeps_the_invariants():
    lm = tiny_model(dtype=torch.bfloat16)
    lm.model.to("cuda")
    lm.device = torch.device("cuda")
    full_budget = [POLICIES[k](budget=1.0) for k in ("full", "h2o", "d2o")]
    res = d2o_core.compare(lm, TEXT, full_budget, max_new_tokens=40, chat=False)
    assert res["h2o"].token_ids == res["full"].token_ids == res["d2o"].token_ids
    res = d2o_core.compare(
        lm, TEXT, [POLICIES[k](budget=0.2) for k in ("full", "h2o", "d2o")], max_new_tokens=12, chat=False
    )
    assert (res["d2o"].events.kind == "merge").any()
    assert res["d2o"].metrics["kv_bytes_final"] == lm.n_layers * round(0.2 * len(TEXT)) * 2 * 2 * 16 * 2


@pytest.mark.skipif(not os.environ.get("D2O_GPU_MODEL"), reason="set D2O_GPU_MODEL to a model to load")
def test_a_real_model_in_bfloat16_compares_policies():
    lm = d2o_core.load_model(os.environ["D2O_GPU_MODEL"], device="cuda", dtype="bfloat16")
    prompt = "Summarise the plot of Romeo and Juliet in three sentences. " * 20
    res = d2o_core.compare(
        lm, prompt, [POLICIES[k](budget=0.2) for k in ("full", "h2o", "d2o")], max_new_tokens=32
    )
    for r in res.values():
        assert r.text.strip()
    assert 0.15 < res["d2o"].metrics["kv_fraction"] < 0.25
    assert res["d2o"].layer_budgets["budget_tokens"].nunique() > 1
