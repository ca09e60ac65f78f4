"""Evaluation, apart from the engine: what the numbers in the README come from.

- `tasks`: generated retrieval prompts (passkey, needle, ...) and their scoring;
- `sweep`: fidelity and retrieval over budgets and policies;
- `bench`: speed and memory of one prompt per policy (cost table, targets);
- `throughput` / `throughput_tables`: many rows under one KV-memory cap, and their tables;
- `batch_step`: one stacked decode step against one row and a plain transformers floor;
- `readme_tables`: `make results`, the README blocks it rewrites.

What it is not: the engine (cache, policies, runner live in `d2o_core/`); nothing here is needed
to run a comparison.
"""
