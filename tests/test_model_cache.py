"""The converted-model cache heals: verified at load, rebuilt when it does not match, never half-written.

The real conversion (the bundled GGUF dequantised, ~20 s) is replaced by a fake that saves a tiny random
Llama and a word-level tokenizer into the folder, in an empty `D2O_CACHE_DIR`; the GGUF is a dummy file.
`SMALL` and `EDGE` are shrunk so the tiny weights take the large-file path (first/last bytes hashed on
every load, whole only when the file changed since its last full hash).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_model
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as token_models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from d2o_core import models

WORDS = "hello there the quick brown fox jumps over lazy dog".split()


def fake_convert(gguf: Path, folder: Path) -> None:
    """What `_convert` writes, in miniature: a tiny Llama's weights and config, and a tokenizer."""
    tiny_model(layers=2, seed=1).model.save_pretrained(folder)
    vocab = {"<unk>": 0, "</s>": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    tok = Tokenizer(token_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache dir, a dummy GGUF and the fake conversion; `cache.conversions` counts them."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    root = tmp_path / "cache"
    monkeypatch.setenv("D2O_CACHE_DIR", str(root))
    monkeypatch.delenv("D2O_MODEL", raising=False)
    monkeypatch.setattr(models, "bundled_gguf", lambda: gguf)
    monkeypatch.setattr(models, "SMALL", 4096)  # the weights (~100 KB) take the large-file path
    monkeypatch.setattr(models, "EDGE", 256)
    calls = []

    def convert(gguf, folder):
        calls.append(folder)
        fake_convert(gguf, folder)

    monkeypatch.setattr(models, "_convert", convert)

    class Cache:
        conversions = calls
        target = models.bundled_dir(gguf)
        weights = target / "model.safetensors"

    Cache.root = root
    return Cache


def reference_weights() -> dict[str, torch.Tensor]:
    return tiny_model(layers=2, seed=1).model.state_dict()


def assert_loads_the_right_weights(folder: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(folder)
    for name, value in reference_weights().items():
        assert torch.equal(model.state_dict()[name], value), name


def converted(cache) -> Path:
    folder, _ = models._converted_bundled()
    assert folder == cache.target
    return folder


def test_a_conversion_writes_a_manifest_and_the_next_load_uses_it(cache):
    folder, source = models._converted_bundled()
    assert source == "bundled (converted from GGUF)"
    manifest = json.loads((folder / models.MANIFEST).read_text())
    assert manifest["files"]["model.safetensors"]["size"] == cache.weights.stat().st_size
    assert len(manifest["files"]["model.safetensors"]["sha256"]) == 64
    assert {"config.json", "tokenizer_config.json"} <= set(manifest["files"])
    assert models._converted_bundled() == (folder, "bundled (cached conversion)")
    assert len(cache.conversions) == 1
    assert not [p for p in cache.root.iterdir() if p.name.startswith(models.TEMP_PREFIXES)]


def _overwrite_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64) if any(data[middle : middle + 64]) else b"\xff" * 64
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(_overwrite_middle, id="overwritten-middle"),
        pytest.param(lambda p: p.write_bytes(bytes(p.stat().st_size)), id="zeroed"),
        pytest.param(lambda p: os.truncate(p, p.stat().st_size // 2), id="truncated"),
        pytest.param(lambda p: p.unlink(), id="deleted"),
        pytest.param(lambda p: (p.parent / "config.json").write_text("{}"), id="config-overwritten"),
        pytest.param(lambda p: (p.parent / models.MANIFEST).unlink(), id="no-manifest"),
        pytest.param(lambda p: (p.parent / models.MANIFEST).write_text('{"files": {}}'), id="empty-manifest"),
    ],
)
def test_a_damaged_cache_is_converted_again_whole(cache, damage):
    folder = converted(cache)
    damage(cache.weights)
    assert models.verify_converted(folder) is not None
    again, source = models._converted_bundled()  # no "Directory not empty", no SafetensorError
    assert again == folder and "rebuilt" in source
    assert len(cache.conversions) == 2
    assert models.verify_converted(folder) is None
    assert_loads_the_right_weights(folder)
    assert not [p for p in cache.root.iterdir() if p.name.startswith(models.TEMP_PREFIXES)]


def test_the_weights_are_hashed_whole_only_when_the_file_changed(cache, monkeypatch):
    folder = converted(cache)
    hashed = []
    real = models._sha256
    monkeypatch.setattr(
        models, "_sha256", lambda p, edges=False: hashed.append((p.name, edges)) or real(p, edges)
    )
    assert models.verify_converted(folder) is None
    # The file is the one hashed whole at conversion: its first and last bytes only.
    assert [edges for name, edges in hashed if name == "model.safetensors"] == [True]
    assert ("config.json", False) in hashed  # small files are hashed whole every time
    # A byte changed in the middle, where the edges do not reach: the new mtime asks for the full hash.
    _overwrite_middle(cache.weights)
    assert "differs" in models.verify_converted(folder)


def test_a_same_size_edit_in_the_middle_is_caught_even_at_the_same_mtime_after_a_copy(cache):
    folder = converted(cache)
    stamp = cache.weights.stat()
    data = bytearray(cache.weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy = cache.weights.with_name("copy")  # a new file (new inode) with the old mtime: hashed whole
    copy.write_bytes(bytes(data))
    os.utime(copy, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    copy.replace(cache.weights)
    assert "differs" in models.verify_converted(folder)


def test_a_truncated_weights_file_never_surfaces_as_a_safetensors_error(cache):
    converted(cache)
    os.truncate(cache.weights, 1000)
    lm = models.load_model(device="cpu")  # the bundled model, rebuilt on the way
    assert lm.source.endswith("rebuilt")
    assert torch.equal(lm.model.state_dict()["lm_head.weight"], reference_weights()["lm_head.weight"])


def test_a_conversion_that_fails_leaves_no_folder_behind(cache, monkeypatch):
    def broken(gguf, folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed halfway")

    monkeypatch.setattr(models, "_convert", broken)
    with pytest.raises(RuntimeError, match="killed halfway"):
        models._converted_bundled()
    assert not cache.target.exists()
    assert not [p for p in cache.root.iterdir() if p.name.startswith(models.TEMP_PREFIXES)]


def test_a_failed_rebuild_keeps_nothing_half_written_at_the_target(cache, monkeypatch):
    converted(cache)
    os.truncate(cache.weights, 10)

    def broken(gguf, folder):
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        models._converted_bundled()
    assert models.verify_converted(cache.target) is not None  # still the old (bad) one, never a mix
    monkeypatch.setattr(models, "_convert", fake_convert)
    assert models.verify_converted(models._converted_bundled()[0]) is None


def test_stale_temporary_folders_of_a_killed_conversion_are_removed(cache):
    cache.root.mkdir(parents=True)
    old, fresh = cache.root / ".converting-old", cache.root / ".converting-fresh"
    for folder in (old, fresh):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(bytes(1000))
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    converted(cache)
    assert not old.exists()
    assert fresh.exists()  # maybe another process converting right now
