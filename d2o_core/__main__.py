"""Command line: `python -m d2o_core COMMAND ...` (run, compare, show, sweep, bench, throughput, ...).

What this module is: argument parsing and printing only (see --help of each); the work is in
runner.py and eval/ (sweep, bench, throughput, batch_step, readme_tables). `show` reads a run file
(runfile.py); its `--html` report draws figures, so it imports `ui.report_html` lazily
(d2o_core itself never imports plotly or gradio).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from . import run_summary
from .models import load_model
from .policies import POLICIES, build
from .runner import iter_compare
from .shape_models import NOTICE

MAX_ERROR = 600  # characters of an error line: a message quoting its input never floods the terminal


def policies_from_args(names: str, budget: float, assignments: list[str]) -> list:
    """`--policies full,h2o --budget 0.2 --set d2o.variant=official` -> Policy objects."""
    from .eval.throughput import settings_from_args  # noqa: PLC0415 - keeps `compare` start-up light

    settings = settings_from_args(assignments)
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in POLICIES]
    if unknown:  # named here, cut short: a name is echoed back, never 100 KB of it
        raise ValueError(f"unknown policy {unknown[0][:40]!r}; choose from {', '.join(POLICIES)}.")
    unused = sorted(set(settings) - set(chosen))
    if unused:
        raise ValueError(f"--set names {', '.join(unused)}, which is not among --policies.")
    return [build(name, budget, **settings.get(name, {})) for name in chosen]


def _read_prompt(args) -> str:
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            what = "a folder" if path.is_dir() else "not a file"
            raise ValueError(f"--prompt-file {args.prompt_file[:80]} is {what}; give a text file.")
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--prompt-file {args.prompt_file[:80]} cannot be read as text: {exc}") from None
    if args.prompt:
        return args.prompt
    if not sys.stdin.isatty():
        return sys.stdin.read()
    raise ValueError("give a prompt with --prompt TEXT, --prompt-file FILE, or on standard input.")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="local path, hub id, or random:<shape> for speed/memory only (default: bundled SmolLM2-135M)",
    )
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16"
    )


def _generation_args(parser: argparse.ArgumentParser, default_policies: str) -> None:
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--prompt-file", default=None)
    parser.add_argument(
        "--question",
        default=None,
        help="kept whole: the prompt is then the context, which is compressed; the question is read after",
    )
    parser.add_argument("--policies", default=default_policies, help=f"comma list of {', '.join(POLICIES)}")
    parser.add_argument(
        "--budget", type=float, default=0.2, help="fraction of the prompt kept per layer, (0, 1]"
    )
    parser.add_argument("--set", action="append", default=[], metavar="POLICY.SETTING=VALUE")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-chat", action="store_true", help="feed the prompt raw, without the chat template"
    )
    parser.add_argument("--json", default=None, help="write the whole result (texts, metrics, frames) here")
    _model_args(parser)


def _check_output(path: str | None, option: str) -> None:
    """Refuse an output path that cannot be written, before any work is done for it."""
    if path is None:
        return
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise ValueError(f"{option} {path[:80]} is a folder; give a file name to write.")
    if not folder.is_dir():
        raise ValueError(f"{option} {path[:80]}: there is no folder {str(folder)[:80]} to write it in.")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"{option} {path[:80]} cannot be written here (permission denied).")


def cmd_compare(args, stream: bool = False) -> int:
    policies = policies_from_args(args.policies, args.budget, args.set)
    if stream and len(policies) != 1:
        raise ValueError("run streams one policy; use compare for several.")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be 0 (greedy) or a positive number; got {args.temperature}.")
    _check_output(args.json, "--json")  # before generating, not after
    prompt = _read_prompt(args)
    lm = load_model(args.model, args.device, args.dtype)
    print(
        f"model: {lm.name} ({lm.source}) on {lm.device}, loaded in {lm.load_seconds:.1f} s", file=sys.stderr
    )
    if lm.shape_only:
        print(f"note: {NOTICE}", file=sys.stderr)
    results, shown = {}, 0
    for update in iter_compare(
        lm,
        prompt,
        policies,
        max_new_tokens=args.max_new_tokens,
        chat=not args.no_chat,
        temperature=args.temperature,
        seed=args.seed,
        question=args.question,
    ):
        if update.kind == "status":
            print(update.text, file=sys.stderr)
        elif update.kind == "token" and stream and update.label == policies[0].label:
            print(run_summary.printable(update.text[shown:]), end="", flush=True)
            shown = len(update.text)
        elif update.kind == "done":
            results = update.results
    if stream:
        print()
    _print_results(results, texts=not stream)
    if args.json:
        meta = {"model": lm.name, "prompt": prompt, "max_new_tokens": args.max_new_tokens}
        if args.question:
            meta["question"] = args.question
        Path(args.json).write_text(run_summary.comparison_json(results, meta))
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


def _say(text: str) -> None:
    """Print a line that may quote a run file or a model: control characters as visible escapes."""
    print(run_summary.printable(text))


def _print_results(results: dict, texts: bool = True) -> None:
    if texts:
        for label, res in results.items():
            _say(f"\n=== {label} ===\n{res.text}")
    _say("\n" + run_summary.summary(results).to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    for label, res in results.items():
        if res.layer_budgets["density"].notna().any():
            _say(f"\n{label} per-layer budgets (tokens): {run_summary.budgets_line(res)}")


def cmd_show(args) -> int:
    """Print a saved run's texts and summary; `--html` also writes the offline report with every figure.

    The figures come from `ui.report_html`, imported here and only here (it needs plotly).
    """
    from .runfile import load_run  # noqa: PLC0415 - pydantic only for this command

    _check_output(args.html, "--html")
    results, meta = load_run(Path(args.path))
    facts = ", ".join(f"{k} {meta[k]}" for k in ("model", "max_new_tokens", "created") if meta.get(k))
    _say(f"{args.path}: {len(results)} policies" + (f" ({facts})" if facts else ""))
    _print_results(results)
    if args.html:
        report_html = run_summary.html_writer("report_html", "report_html")
        Path(args.html).write_text(report_html(results, meta), encoding="utf-8")
        print(f"\nwrote {args.html}", file=sys.stderr)
    return 0


def cmd_example_runs(args) -> int:
    """Store every example's run for the page's instant first view (`ui.stored_runs`, which drives the
    page's own handler, so a stored run is made exactly as a live one)."""
    try:
        from ui.engine import Engine, allowed_models  # noqa: PLC0415 - the page's code path, on purpose
        from ui.stored_runs import write_stored_runs  # noqa: PLC0415
    except ImportError as exc:
        raise ValueError(
            f"example-runs needs the app's ui package ({exc}); run it from the repository root."
        ) from None
    engine = Engine([args.model] if args.model else allowed_models())
    write_stored_runs(engine, Path(args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d2o_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compare", help="generate with several policies from one shared prefill")
    _generation_args(p, "full,h2o,d2o")
    p = sub.add_parser("run", help="generate with one policy, streaming the text")
    _generation_args(p, "d2o")
    p = sub.add_parser("show", help="print a saved run (--json of compare, or the page's run.json)")
    p.add_argument("path", help="a run file (d2o-run JSON)")
    p.add_argument("--html", default=None, help="also write a standalone HTML report with every figure here")
    p = sub.add_parser(
        "example-runs", help="store every example's run for the page's first view (assets/runs)"
    )
    p.add_argument("--model", default=None, help="model to run (default: the page's default)")
    p.add_argument("--out", default="assets/runs", help="folder for the stored runs")
    p.set_defaults(func=cmd_example_runs)
    from .eval import (  # noqa: PLC0415 - light `compare` start-up
        batch_step,
        bench,
        interop_bench,
        leaderboard,
        readme_tables,
        sweep_cli,
        throughput,
    )

    sweep_cli.add_parser(sub, _model_args)
    leaderboard.add_parser(sub)
    bench.add_parser(sub, _model_args)
    throughput.add_parser(sub, _model_args)
    readme_tables.add_parser(sub, _model_args)
    batch_step.add_parser(sub, _model_args)
    interop_bench.add_parser(sub, _model_args)
    args = parser.parse_args(argv)
    try:
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "run":
            return cmd_compare(args, stream=True)
        if args.command == "show":
            return cmd_show(args)
        return args.func(args)
    except (ValueError, OSError) as exc:  # bad input or a file that cannot be read or written
        message = str(exc)
        message = message if len(message) <= MAX_ERROR else message[:MAX_ERROR] + "..."
        print(f"error: {run_summary.printable(message)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
