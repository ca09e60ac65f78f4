"""Break one D2O rule at a time and check that the fast tests notice (hand-written mutation testing).

    .venv/bin/python tests/mutants.py            # every mutant; prints which tests caught it
    .venv/bin/python tests/mutants.py M3 M5      # just these

Each mutant is one textual edit of the engine (the rules docs/policies.md names); the file is
restored afterwards, also on Ctrl-C. A mutant that no test catches is a hole in the suite.
Not collected by pytest (the name does not start with `test_`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/test_d2o_engine.py",
    "tests/test_invariants.py",
    "tests/test_reference.py",
    "tests/test_ops.py",
    "tests/test_policies.py",
]

# name: (file, text, replacement, what it breaks)
MUTANTS = {
    "M1": (
        "d2o_core/policies/merging.py",
        "kv[:, heads, target] = new.to(kv.dtype)",
        "kv[0, heads, target] = new[0].to(kv.dtype)",
        "decode merges never write the target's value",
    ),
    "M2": (
        "d2o_core/policies/merging.py",
        "v_keep = ops.apply_merge(v_keep, v_gone, target, w_self, w_in)",
        "v_keep = v_keep",
        "prefill merges never write the target's value",
    ),
    "M3": (
        "d2o_core/policies/merging.py",
        "        cache.tau = tau\n",
        "        pass\n",
        "the threshold is never carried forward",
    ),
    "M4": (
        "d2o_core/policies/merging.py",
        "tau = sim.mean()",
        "tau = sim.max()",
        "the first threshold is the max",
    ),
    "M5": (
        "d2o_core/policies/d2o.py",
        'beta=0.7, statistic="max"',
        'beta=0.7, statistic="mean"',
        "the paper's EMA statistic is the mean",
    ),
    "M6": (
        "d2o_core/policies/merging.py",
        "decided.append(ops.merge_decision(row_sim, tau, rule.shared_by_heads))",
        "decided.append(ops.merge_decision(row_sim, tau, False))",
        "the official decision is per head at decode",
    ),
    "M7": (
        "d2o_core/policies/base.py",
        "return max(1, round(self.budget * n_prompt))",
        "return max(1, int(self.budget * n_prompt))",
        "per-layer budgets floored",
    ),
    "M8": (
        "d2o_core/policies/base.py",
        "n_recent = min(round(self.recent_share * plan.budget)",
        "n_recent = min(int(self.recent_share * plan.budget)",
        "the recent window floored",
    ),
    "M9": (
        "d2o_core/ops.py",
        "w_in = torch.sigmoid(sim.float() - 1.0) * on",
        "w_in = torch.sigmoid(sim.float()) * on",
        "paper weights without the target's own e",
    ),
    "M10": (
        "d2o_core/ops.py",
        "return 1.0 - on / 2, w_in",
        "return 1.0 - on, w_in",
        "official decode weights: target not averaged",
    ),
    "M11": (
        "d2o_core/policies/scoring.py",
        "        stored += row\n",
        "        stored.copy_(row)\n",
        "decode scores not accumulated",
    ),
    "M12": (
        "d2o_core/ops.py",
        "torch.lerp(tau, new, beta)",
        "torch.lerp(tau, new, 1 - beta)",
        "EMA weights swapped",
    ),
    "M14": (
        "d2o_core/ops.py",
        "return (sim.mean(dim=0, keepdim=True) >= tau).expand_as(sim)",
        "return sim >= tau",
        "the official decision is per head everywhere",
    ),
    "M15": (
        "d2o_core/ops.py",
        "w = np.exp(-(f - f.min()))",
        "w = np.exp(f - f.min())",
        "sparse layers get the larger budgets",
    ),
}


def run(name: str) -> tuple[bool, str]:
    path, old, new, _ = MUTANTS[name]
    file = ROOT / path
    text = file.read_text()
    if text.count(old) != 1:
        return False, f"cannot apply: {old!r} found {text.count(old)} times in {path}"
    try:
        file.write_text(text.replace(old, new))
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    finally:
        file.write_text(text)
    failed = [line.split(" ")[1] for line in done.stdout.splitlines() if line.startswith("FAILED ")]
    return done.returncode != 0, ", ".join(failed) or done.stdout.strip().splitlines()[-1]


def main(names: list[str]) -> int:
    survivors = []
    for name in names or list(MUTANTS):
        caught, detail = run(name)
        print(f"{name} {'caught' if caught else 'SURVIVED'}: {MUTANTS[name][3]} -> {detail}", flush=True)
        if not caught:
            survivors.append(name)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
