"""Shared fixtures: tiny random GQA Llama models (no downloads) and the bundled model (integration)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import d2o_core

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class CharTokenizer:
    """One token per ASCII character; no chat template, no EOS (tiny models never stop early)."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text: str) -> dict:
        return {"input_ids": [min(ord(c), 127) for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(int(i)) for i in ids)


def tiny_model(layers: int = 4, heads: int = 4, kv_heads: int = 2, seed: int = 0, dtype=torch.float32):
    """A random Llama-style causal LM with grouped-query attention, built from a config."""
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=2048,
        initializer_range=0.2,  # peakier attention than the default, so scores differ between tokens
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return d2o_core.from_model(model, CharTokenizer(), name=f"tiny-{layers}x{heads}q{kv_heads}kv")


@pytest.fixture(scope="session")
def tiny():
    return tiny_model()


@pytest.fixture(scope="session")
def bundled():
    """The bundled SmolLM2-135M-Instruct (converted once, then cached)."""
    return d2o_core.load_model()


TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
)
