"""The command line answers bad input with one `error: ...` sentence and exit status 2, never a traceback,
and refuses what it can before loading a model or generating anything.

Where a model is needed, `cli_tiny` stands in for the bundled one; `--model` and `--device` cases use the
real loader, which must refuse them before it loads or downloads anything (the tests run offline).
"""

from __future__ import annotations

import re
import time

import pytest
from test_model_cache import fake_convert

from d2o_core import __main__ as cli
from d2o_core import models

PROMPT = ["--prompt", "The quick brown fox", "--max-new-tokens", "2"]


def refused(argv: list[str], capsys) -> str:
    """Run the CLI; it must exit 2 with a single `error:` line on stderr. Returns that line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def no_generation(monkeypatch):
    """Fail the test if anything is generated (the refusal must come first)."""

    def generate(*args, **kwargs):
        raise AssertionError("generation started before the bad input was refused")

    monkeypatch.setattr(cli, "iter_compare", generate)


@pytest.mark.parametrize(
    "argv,said",
    [
        (["compare", *PROMPT, "--set", "d2o.budget=5"], "has no setting 'budget'"),
        (["compare", *PROMPT, "--temperature", "nan"], "--temperature must be 0 .* got nan"),
        (["compare", *PROMPT, "--temperature", "-1"], "--temperature must be 0"),
        (["compare", *PROMPT, "--temperature", "inf"], "--temperature must be 0 .* got inf"),
        (["compare", *PROMPT, "--budget", "20"], "fraction in \\(0, 1\\]"),
        (["compare", *PROMPT, "--policies", "x" * 100_000], "unknown policy 'x{40}'; choose from"),
        (["run", *PROMPT, "--policies", "h2o,d2o"], "run streams one policy"),
    ],
)
def test_bad_settings_are_refused_before_the_model_loads(argv, said, capsys, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(cli, "load_model", models.load_model)
    line = refused(argv, capsys)
    assert re.search(said, line), line
    assert len(line) < 400  # a 100 KB name is not echoed back whole


def test_a_protected_layer_the_model_lacks_is_a_sentence(cli_tiny, capsys):
    line = refused(["compare", *PROMPT, "--policies", "d2o", "--set", "d2o.protected_layers=999"], capsys)
    # (the model is needed to know its layers; the refusal comes at the compression, before decoding)
    assert "protected layer 999 does not exist in a model with 4 layers" in line


def test_a_prompt_file_that_is_a_folder_is_a_sentence(cli_tiny, tmp_path, capsys, monkeypatch):
    no_generation(monkeypatch)
    line = refused(["compare", "--prompt-file", str(tmp_path)], capsys)
    assert line == f"error: --prompt-file {tmp_path} is a folder; give a text file."
    assert "is not a file" in refused(["compare", "--prompt-file", str(tmp_path / "none.txt")], capsys)


def test_a_prompt_file_that_is_not_text_is_a_sentence(cli_tiny, tmp_path, capsys, monkeypatch):
    no_generation(monkeypatch)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert "cannot be read as text" in refused(["compare", "--prompt-file", str(binary)], capsys)


@pytest.mark.parametrize("where", ["folder", "missing-parent"])
def test_a_json_path_that_cannot_be_written_is_refused_before_generating(
    where, cli_tiny, tmp_path, capsys, monkeypatch
):
    no_generation(monkeypatch)
    path = tmp_path if where == "folder" else tmp_path / "no" / "such" / "run.json"
    line = refused(["compare", *PROMPT, "--json", str(path)], capsys)
    assert "is a folder" in line if where == "folder" else "there is no folder" in line


def test_show_html_into_a_folder_is_refused_before_reading_the_run(tmp_path, capsys):
    line = refused(["show", str(tmp_path / "absent.json"), "--html", str(tmp_path)], capsys)
    assert line == f"error: --html {tmp_path} is a folder; give a file name to write."


def test_a_model_folder_that_does_not_exist_is_a_sentence(capsys, monkeypatch):
    no_generation(monkeypatch)
    line = refused(["compare", *PROMPT, "--model", "/nonexistent"], capsys)
    assert line == "error: There is no model folder at /nonexistent; give a folder holding config.json."


def test_a_hub_id_offline_is_one_sentence_at_once(capsys, monkeypatch):
    """The tests run with HF_HUB_OFFLINE=1: the hub is never tried, and the answer says why."""
    assert models._hub_offline()
    no_generation(monkeypatch)
    start = time.perf_counter()
    line = refused(["compare", *PROMPT, "--model", "org/x"], capsys)
    assert time.perf_counter() - start < 5
    assert "org/x is not a folder here nor in the local hub cache" in line and "HF_HUB_OFFLINE" in line


def test_a_hub_id_without_a_network_is_one_sentence_without_waiting_for_the_hub(capsys, monkeypatch):
    """Not offline by setting, but no route to the hub: one probe (bounded), then a sentence; transformers
    (which retried for 52 s) is never asked."""
    monkeypatch.setattr(models, "_hub_offline", lambda: False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("hub tried"))
    line = refused(["compare", *PROMPT, "--model", "org/x"], capsys)
    assert "cannot be reached from this machine" in line


def test_a_hub_id_that_is_no_valid_id_is_a_sentence(capsys):
    assert "neither a model folder here nor a hub id" in refused(
        ["compare", *PROMPT, "--model", "a b/c?d"], capsys
    )


@pytest.mark.parametrize("device", ["bogus", "cuda:99", "meta"])
def test_a_device_that_does_not_exist_is_a_sentence(device, capsys, monkeypatch):
    no_generation(monkeypatch)
    line = refused(["compare", *PROMPT, "--device", device], capsys)
    assert "device" in line and ("got" in line or "no CUDA GPU" in line or "CUDA GPU(s)" in line), line


@pytest.mark.parametrize("damage", ["truncated-weights", "no-tokenizer"])
def test_a_broken_model_folder_is_a_sentence(damage, tmp_path, capsys, monkeypatch):
    no_generation(monkeypatch)
    fake_convert(None, tmp_path)  # a tiny model and tokenizer, as test_model_cache.py saves them
    if damage == "truncated-weights":
        weights = tmp_path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (tmp_path / name).unlink()
    line = refused(["compare", *PROMPT, "--model", str(tmp_path), "--device", "cpu"], capsys)
    assert line.startswith(f"error: The model {tmp_path} could not be loaded (local folder): ")


def test_an_error_line_is_cut_short(capsys, monkeypatch):
    def loud(args):
        raise ValueError("y" * 50_000)

    monkeypatch.setattr(cli, "cmd_compare", loud)
    line = refused(["compare", *PROMPT], capsys)
    assert len(line) <= len("error: ") + cli.MAX_ERROR + 3
