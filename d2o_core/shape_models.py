"""Shape-only models: a published model's architecture with seeded random weights (`random:<shape>`).

What this module is: the known shapes (`SHAPES`), the `LlamaConfig` each one gives
(`shape_config`, cheap: no weights), the seeded builder (`build_model`) and `load_random`,
which `models.load_model` calls for names such as ``random:llama-3-8b`` or
``random:tiny@seed=3`` (the seed defaults to 0). They measure speed and memory at a paper's
scale (Llama-2-7B, Llama-3-8B) without downloading its weights; `random:tiny` is small enough
for CPU tests. The weights are built directly on the target device in the target dtype; the
same seed gives the same weights on the same device.

The tokenizer is the bundled SmolLM2 one (from the converted folder when it is cached, else
straight from the GGUF file, without converting the model), or the one in the folder named by
env `D2O_TOKENIZER` when that is set. Where the tokenizer has more tokens than the shape's
vocabulary (49152 against Llama-2's 32000), the model's vocabulary is widened to the
tokenizer's size so every token id is valid; the embedding and output matrices then differ
from the paper's by that many rows.

What it is not: a language model. The generated texts are meaningless (`NOTICE`), and so are
agreement, KL and task scores; only timings and KV memory count.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, initialization

from . import models

PREFIX = "random:"
NOTICE = "random weights (shape only): the generated texts are meaningless; only speed and memory count."
SOURCE = "random weights (shape only)"

# LlamaConfig arguments per shape; the vocabulary may be widened to the tokenizer's size.
SHAPES: dict[str, dict] = {
    "tiny": dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        hidden_size=64, intermediate_size=128, vocab_size=256, max_position_embeddings=4096,
    ),
    "llama-2-7b": dict(
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
        hidden_size=4096, intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "llama-3-8b": dict(
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        hidden_size=4096, intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
}  # fmt: skip
_NAME = re.compile(r"random:(?P<shape>[^@\s]+)(?:@seed=(?P<seed>\d+))?")


def _known(shape: str) -> str:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(PREFIX + s for s in SHAPES)}.")
    return shape


def parse(name: str) -> tuple[str, int]:
    """``"random:llama-3-8b@seed=3"`` -> ("llama-3-8b", 3); the seed defaults to 0."""
    match = _NAME.fullmatch(name.strip())
    if not match:
        raise ValueError(
            f"{name!r} is not a shape-only model name; write random:<shape> or random:<shape>@seed=<n> "
            f"with a shape among {', '.join(PREFIX + s for s in SHAPES)} (e.g. random:tiny@seed=3)."
        )
    return _known(match["shape"]), int(match["seed"] or 0)


def shape_config(shape: str, tokenizer=None) -> LlamaConfig:
    """The `LlamaConfig` of `shape` (no weights built), its vocabulary widened to `tokenizer`'s size."""
    kwargs = dict(SHAPES[_known(shape)])
    if tokenizer is not None:
        kwargs["vocab_size"] = max(kwargs["vocab_size"], len(tokenizer))
        kwargs |= dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaConfig(**kwargs, pad_token_id=None, tie_word_embeddings=False)


def build_model(config: LlamaConfig, seed: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights from `config`, made on `device` in `dtype`, initialised once from `seed`.

    The modules are created without torch's default initialisation, then transformers'
    own (normal(0, initializer_range), norms at one) runs once under the seed.
    """
    with torch.device(device), initialization.no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    torch.manual_seed(seed)
    model.init_weights()
    return model.eval()


def tokenizer():
    """The folder in `D2O_TOKENIZER` when set, else the bundled SmolLM2 tokenizer (model not converted)."""
    folder = os.environ.get("D2O_TOKENIZER")
    if folder:
        if not Path(folder).is_dir():
            raise ValueError(f"D2O_TOKENIZER={folder} is not a folder; set it to a tokenizer folder.")
        return AutoTokenizer.from_pretrained(folder)
    try:
        gguf = models.bundled_gguf()
    except FileNotFoundError:
        raise ValueError(
            "random: models need a tokenizer: install the bundled model "
            f"({models.INSTALL_HINT}) or set D2O_TOKENIZER to a folder holding one."
        ) from None
    converted = models.bundled_dir(gguf)
    if (converted / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(converted)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def load_random(name: str, device: torch.device, dtype: torch.dtype) -> models.LoadedModel:
    """A `LoadedModel` with `shape_only` True for ``random:<shape>[@seed=<n>]`` (see the module docstring)."""
    start = time.perf_counter()
    shape, seed = parse(name)
    tok = tokenizer()
    model = build_model(shape_config(shape, tok), seed, device, dtype)
    lm = models.from_model(model, tok, name=name.strip())
    lm.load_seconds, lm.source, lm.shape_only = time.perf_counter() - start, SOURCE, True
    return lm
