"""``maskd-bench``: the suite's command line.

    maskd-bench check-golden DIR [--impl fast|literal|both]   compare every loss with the reference cases in DIR
    maskd-bench bench-losses [--out reports]                  the loss benchmark (same as ``nox -s bench_losses``)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _check_golden(args: argparse.Namespace) -> int:
    from experiments.golden import check_golden, summary_line

    impls = ["fast", "literal"] if args.impl == "both" else [args.impl]
    all_results = []
    for impl in impls:
        try:
            results = check_golden(args.directory, impl=impl, rtol_value=args.rtol_value, rtol_grad=args.rtol_grad)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for r in results:
            print(f"[{impl}] {r.line()}" if len(impls) > 1 else r.line())
        all_results += results
    print(summary_line(all_results))
    return 0 if all_results and all(r.passed for r in all_results) else 1


def _bench_losses(args: argparse.Namespace) -> int:
    from experiments.bench_losses import main as bench_main

    return bench_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskd-bench",
        description="MasKD reproducibility and benchmark suite (MasKD, FitNet, FGD, CWD).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    golden = sub.add_parser("check-golden", help="check every loss against a directory of golden cases",
                            description="Run this project's implementation of every case in DIR/golden.json in "
                                        "float64 and compare values (rtol 1e-10) and gradients (rtol 1e-8). "
                                        "Exits 1 if any case is off, missing or unknown.")
    golden.add_argument("directory", type=Path, help="directory with golden.json and inputs_/grads_*.pt")
    golden.add_argument("--impl", choices=["fast", "literal", "both"], default="fast",
                        help="which form of each loss to check (default: fast, the one training uses)")
    golden.add_argument("--rtol-value", type=float, default=1e-10)
    golden.add_argument("--rtol-grad", type=float, default=1e-8)
    golden.set_defaults(func=_check_golden)

    bench = sub.add_parser("bench-losses", help="loss benchmark (fast vs literal vs mse)", add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench_losses)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
