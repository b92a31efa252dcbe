"""The ``stem-boost`` command (also ``python -m stem_boost``).

    stem-boost compare [--config FILE_OR_NAME] [--set key=value ...] [--out DIR]
    stem-boost bench [ARGS ...]          # scripts/bench_kernel.py (GPU), ARGS passed through
    stem-boost configs                   # the packaged configs

``compare`` evaluates the configured model in dense / native sparse / Stem / ablation modes and
writes a report folder (report.md, report.html, PNG plots, results.json). Without ``--config`` it
runs the embedded default: a tiny random-weight DSA testbed on the CPU (a few minutes).
"""

from __future__ import annotations

import argparse
import importlib.util
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
    print(f"stem-boost compare: {cfg['name']} ({cfg['_source']}) -> {out}/", flush=True)
    t0 = time.perf_counter()
    try:
        res = run(cfg)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"stem-boost: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    paths = write_report(res, out)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    for note in res["notes"]:
        print(f"note: {note}")
    print(f"report: {paths['report.html'].resolve()}")
    print(f"        {paths['report.md'].resolve()}")
    print(f"data:   {paths['results.json'].resolve()}")
    return 0


def _bench(bench_args: list[str]) -> int:
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernel.py"
    if not script.is_file():
        print(f"stem-boost bench needs a source checkout: {script} not found", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("stem_boost_bench_kernel", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = sys.argv
    sys.argv = [str(script), *bench_args]
    try:
        module.main()
    finally:
        sys.argv = saved
    return 0


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
                   help="YAML file, or the name of a packaged config (default: tiny_dsa, the embedded testbed)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key (dotted path, YAML value), e.g. --set tasks.lengths=[1024]")
    c.add_argument("--out", default=None, help="report folder (default: the config's output.dir)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=_compare)
    # `bench ARGS...` is dispatched in main() before parsing, so every argument (--help included)
    # reaches the benchmark script; listed here for the help text
    sub.add_parser("bench", help="run scripts/bench_kernel.py (needs a CUDA GPU); arguments are passed through")
    k = sub.add_parser("configs", help="list the packaged configs")
    k.set_defaults(func=_configs)
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
