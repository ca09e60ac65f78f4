"""Shape-only models (`random:<shape>`): seeded weights, real shapes, the bundled tokenizer, and notices.

Only `random:tiny` gets real weights here; the 7B/8B shapes are checked from their configs and
on the meta device (no memory). Needs the bundled tokenizer (or `D2O_TOKENIZER`).
"""

from __future__ import annotations

import argparse

import pytest
import torch

import d2o_core
from d2o_core import models, shape_models
from d2o_core.__main__ import main
from d2o_core.eval import bench

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def tokenizer():
    try:
        return shape_models.tokenizer()
    except ValueError as exc:
        pytest.skip(f"no tokenizer for random: models here ({exc})")


@pytest.fixture(scope="session")
def rtiny(tokenizer):
    return d2o_core.load_model("random:tiny", device="cpu")


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_same_seed_gives_the_same_weights_and_another_seed_others(tokenizer, rtiny):
    config = shape_models.shape_config("tiny", tokenizer)
    again = weights(shape_models.build_model(config, 0, CPU, torch.float32))
    first = weights(rtiny.model)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = d2o_core.load_model("random:tiny@seed=3", device="cpu").model.state_dict()
    assert not torch.equal(
        first["model.layers.0.self_attn.q_proj.weight"], other["model.layers.0.self_attn.q_proj.weight"]
    )


def test_a_random_model_is_shape_only_and_says_so(rtiny):
    assert rtiny.shape_only and "shape only" in rtiny.source and rtiny.name == "random:tiny"
    assert rtiny.n_layers == 4 and rtiny.n_kv_heads == 2 < rtiny.config.num_attention_heads  # GQA
    assert not models.LoadedModel(rtiny.model, rtiny.tokenizer, "x", CPU, torch.float32).shape_only


def test_dtype_and_device_are_respected(tokenizer):
    lm = d2o_core.load_model("random:tiny@seed=1", device="cpu", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16 and lm.device == CPU
    assert all(p.dtype == torch.bfloat16 and p.device == CPU for p in lm.model.parameters())


def test_paper_shapes_match_the_published_configs_without_building_weights(tokenizer):
    l2, l3 = (
        shape_models.shape_config("llama-2-7b", tokenizer),
        shape_models.shape_config("llama-3-8b", tokenizer),
    )
    for c in (l2, l3):
        assert (c.num_hidden_layers, c.num_attention_heads, c.head_dim, c.hidden_size) == (32, 32, 128, 4096)
    assert (l2.num_key_value_heads, l2.intermediate_size, l2.rope_parameters["rope_theta"]) == (
        32,
        11008,
        1e4,
    )
    assert (l3.num_key_value_heads, l3.intermediate_size, l3.rope_parameters["rope_theta"]) == (8, 14336, 5e5)
    assert l3.vocab_size == 128256 and shape_models.shape_config("llama-2-7b").vocab_size == 32000
    # On the meta device nothing is allocated; the parameter counts are the published ones.
    counts = {
        shape: sum(
            p.numel()
            for p in shape_models.build_model(
                shape_models.shape_config(shape), 0, torch.device("meta"), torch.bfloat16
            ).parameters()
        )
        for shape in ("llama-2-7b", "llama-3-8b")
    }
    assert counts == {"llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248}


def test_the_vocabulary_covers_every_token_of_the_tokenizer(tokenizer, rtiny):
    assert len(tokenizer) > 32000
    assert shape_models.shape_config("llama-2-7b", tokenizer).vocab_size == len(tokenizer)  # widened
    assert rtiny.config.vocab_size >= len(rtiny.tokenizer)
    assert rtiny.model.get_input_embeddings().weight.shape[0] >= len(rtiny.tokenizer)


@pytest.mark.parametrize("name", ["random:foo", "random:tiny@seed=x", "random:"])
def test_an_unknown_shape_or_bad_name_lists_the_known_shapes(name):
    with pytest.raises(ValueError, match=r"random:tiny, random:llama-2-7b, random:llama-3-8b"):
        d2o_core.load_model(name, device="cpu")


def test_generate_runs_and_its_metrics_say_shape_only(rtiny):
    res = d2o_core.generate(rtiny, "hello there", d2o_core.POLICIES["d2o"](budget=0.5), max_new_tokens=3)
    assert (
        len(res.token_ids) == 3
        and res.metrics["shape_only"] is True
        and res.metrics["model"] == "random:tiny"
    )


def test_cli_compare_runs_on_a_random_shape_and_prints_the_notice(tokenizer, capsys):
    argv = ["compare", "--model", "random:tiny", "--device", "cpu", "--prompt", "hello there"]
    assert main([*argv, "--max-new-tokens", "4", "--policies", "full,h2o,d2o"]) == 0
    out, err = capsys.readouterr()
    assert "meaningless" in err and "=== d2o" in out.lower()


def test_bench_and_sweep_say_so_too(tokenizer, rtiny, capsys):
    bench.load(argparse.Namespace(model="random:tiny", device="cpu", dtype=None))  # bench, sweep, results
    assert "meaningless" in capsys.readouterr().err
    assert bench.machine_info(rtiny)["shape_only"] is True


def test_a_missing_tokenizer_says_how_to_provide_one(monkeypatch):
    monkeypatch.delenv("D2O_TOKENIZER", raising=False)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="D2O_TOKENIZER"):
        d2o_core.load_model("random:tiny", device="cpu")
    monkeypatch.setenv("D2O_TOKENIZER", "/no/such/folder")
    with pytest.raises(ValueError, match="not a folder"):
        d2o_core.load_model("random:tiny", device="cpu")


def test_a_tokenizer_folder_from_the_environment_is_used(tokenizer, tmp_path, monkeypatch):
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)  # no bundled package
    monkeypatch.setenv("D2O_TOKENIZER", str(tmp_path))
    assert shape_models.tokenizer()("hello there")["input_ids"] == tokenizer("hello there")["input_ids"]


@pytest.mark.integration
def test_the_tokenizer_loads_from_the_gguf_without_converting_the_model(tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("D2O_TOKENIZER", raising=False)
    monkeypatch.setenv("D2O_CACHE_DIR", str(tmp_path))  # no converted folder here
    assert shape_models.tokenizer()("hello there")["input_ids"] == tokenizer("hello there")["input_ids"]
    assert not any(tmp_path.iterdir())


def test_the_page_loads_a_random_shape_the_host_lists(tokenizer, monkeypatch):
    from ui.engine import Engine, allowed_models

    monkeypatch.setenv("D2O_MODELS", "random:tiny")
    assert allowed_models() == ["random:tiny"]
    assert Engine().get().shape_only
