"""The benchmark: ratios and target marks on hand-made numbers, the CLI end to end on the tiny model.

No assertion here depends on how fast anything ran.
"""

from __future__ import annotations

import json
import math

import pytest

from d2o_core.__main__ import main
from d2o_core.eval import bench

LENGTH = 300  # the smallest passkey prompt is ~240 characters (= tokens with the CharTokenizer)
POLICY_KEYS = {"prefill_seconds", "decode_ms_per_token", "kv_bytes_final", "kv_bytes_peak"}


def run(n, full=(2.0, 50.0), h2o=(4.0, 40.0), d2o=(5.0, 46.0), compare=9.0, single=3.0) -> dict:
    """One length's measurements, (prefill s, decode ms/token) per policy."""
    out = {
        "target_tokens": n,
        "prompt_tokens": n - 2,
        "compare_seconds": compare,
        "single_full_seconds": single,
    }
    for name, (prefill, decode) in (("full", full), ("h2o", h2o), ("d2o", d2o)):
        out[name] = {"prefill_seconds": prefill, "decode_ms_per_token": decode}
    return out | {"ratios": bench.ratios(out)}


def test_ratios_divide_within_one_run():
    r = run(512)["ratios"]
    assert r["h2o_over_full_decode"] == pytest.approx(0.8)
    assert r["d2o_over_full_decode"] == pytest.approx(0.92)
    assert r["d2o_over_h2o_decode"] == pytest.approx(1.15)
    assert r["h2o_over_full_prefill"] == pytest.approx(2.0)
    assert r["d2o_over_h2o_prefill"] == pytest.approx(1.25)
    assert r["compare_over_single"] == pytest.approx(3.0)
    missing = bench.ratios({"full": {"decode_ms_per_token": 50.0, "prefill_seconds": 1.0}})
    assert math.isnan(missing["d2o_over_full_decode"]) and math.isnan(missing["compare_over_single"])


def marks(doc: dict) -> list:
    return [t["passed"] for t in bench.targets(doc)]


def test_targets_are_issue_23s_ratios_at_2048_tokens_and_20_percent():
    fast = run(2048, full=(2.0, 50.0), h2o=(2.2, 50.0), d2o=(2.3, 52.5), compare=3.9, single=3.0)
    doc = {"runs": [run(512, h2o=(9.0, 90.0), compare=99.0), fast], "budget": 0.2}
    assert marks(doc) == [True, True, True, True, True]  # limits inclusive; the 512-token run is not judged
    assert [t["at_prompt_tokens"] for t in bench.targets(doc)] == [2046] * 5
    slow = run(2048, full=(2.0, 50.0), h2o=(2.4, 51.0), d2o=(2.4, 53.0), compare=4.0, single=3.0)
    assert marks({"runs": [slow], "budget": 0.2}) == [False, False, True, False, False]
    assert bench.targets({"runs": [slow], "budget": 0.2})[0]["value"] == pytest.approx(1.2)


def test_targets_not_measured_are_not_marked():
    assert marks({"runs": [run(1024)], "budget": 0.2}) == [None] * 5  # no 2048 run
    doc = {"runs": [run(2048)], "budget": 0.4}  # 2048 but not 20 %
    assert marks(doc) == [None] * 5
    lines = bench.target_lines(doc | {"targets": bench.targets(doc)})
    assert [line[:4] for line in lines] == ["n/a "] * 5
    fast = {"runs": [run(2048, h2o=(2.0, 40.0))], "budget": 0.2}
    assert [line[:4] for line in bench.target_lines(fast | {"targets": bench.targets(fast)})][0] == "PASS"


def test_cli_bench_writes_the_documented_json(cli_tiny, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--prompt-tokens", f"{LENGTH},{LENGTH + 30}", "--budget", "0.25", "--new-tokens", "3"]
    assert main([*argv, "--repeats", "1", "--no-load", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {"compare_seconds", "single_full_seconds", "prompt_tokens", "runs", "ratios", "targets"} <= set(
        doc
    )
    assert [r["target_tokens"] for r in doc["runs"]] == [LENGTH, LENGTH + 30]
    top = doc["runs"][1]
    assert doc["prompt_tokens"] == top["prompt_tokens"] and doc["compare_seconds"] == top["compare_seconds"]
    for r in doc["runs"]:
        assert LENGTH - 20 < r["prompt_tokens"] <= r["target_tokens"]
        for name in ("full", "h2o", "d2o"):
            assert POLICY_KEYS <= set(r[name]) and r[name]["prefill_seconds"] > 0
        assert r["full"]["kv_bytes_final"] == r["full"]["kv_bytes_peak"]
        assert r["h2o"]["kv_bytes_final"] < r["h2o"]["kv_bytes_peak"] <= r["full"]["kv_bytes_peak"]
        assert r["d2o"]["kv_bytes_final"] == pytest.approx(0.25 * r["full"]["kv_bytes_final"], rel=0.05)
        assert r["ratios"]["d2o_over_h2o_decode"] == pytest.approx(
            r["d2o"]["decode_ms_per_token"] / r["h2o"]["decode_ms_per_token"]
        )
    assert doc["load"] is None and doc["policies"] == ["full", "h2o", "d2o"] and doc["peak_rss_mb"] > 0
    assert {"cpu", "cores", "torch", "device"} <= set(doc["machine"]) and len(doc["targets"]) == len(
        bench.TARGETS
    )
    printed = capsys.readouterr().out
    assert "decode ms/token" in printed and "compare/single" in printed and "n/a" in printed


def test_timed_runs_decode_every_token_even_when_the_model_would_stop(tiny, monkeypatch):
    import dataclasses

    stopping = dataclasses.replace(tiny, eos_ids=set(range(128)))  # every token is an end token
    seen, real = [], bench.generate

    def spy(lm, *args, **kwargs):
        res = real(lm, *args, **kwargs)
        seen.append((kwargs["fidelity"], res.metrics["new_tokens"]))
        return res

    monkeypatch.setattr(bench, "generate", spy)
    doc = bench.run_bench(stopping, [LENGTH], 0.5, 4, ["h2o"], repeats=1)
    assert seen == [(False, 4)] * 4  # (full, h2o) x (warm-up, one timed round)
    assert doc["policies"] == ["full", "h2o"] and "h2o" in doc and "d2o" not in doc


@pytest.mark.parametrize(
    "bad",
    [
        ["--budget", "0"],
        ["--budget", "1.5"],
        ["--policies", "full,nope"],
        ["--prompt-tokens", "x"],
        ["--prompt-tokens", "100000"],
        ["--repeats", "0"],
    ],
)
def test_cli_bench_rejects_bad_input(cli_tiny, capsys, bad):
    assert main(["bench", "--no-load", *bad]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: ")


# The loads run in fresh processes; these stand-ins for LOAD_CODE skip importing torch (~10 s here).
FAILING_LOAD = "import sys; sys.exit(f'OSError: no model at {sys.argv[1]}')"
TIMED_LOAD = "import json, os; print(json.dumps({'seconds': 0.5, 'cache': os.environ['D2O_CACHE_DIR']}))"


def test_load_measurement_reports_a_failed_load_instead_of_raising(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "LOAD_CODE", FAILING_LOAD)
    result = bench.measure_load(str(tmp_path / "no-such-model"))
    assert result == {"error": f"OSError: no model at {tmp_path / 'no-such-model'}"}


def test_load_measurement_times_a_cold_then_a_cached_load_in_one_fresh_cache(monkeypatch):
    monkeypatch.setattr(bench, "LOAD_CODE", TIMED_LOAD)
    result = bench.measure_load()
    assert result["cold_seconds"] == result["cached_seconds"] == 0.5
    assert result["cold_cache"] == result["cached_cache"] != str(bench.models.cache_dir())


def test_machine_info_names_the_cpu_and_versions(tiny):
    info = bench.machine_info(tiny)
    assert info["cpu"] and info["cores"] >= 1 and info["device"] == "cpu" and info["model"] == tiny.name
