"""The ``sparsekern`` command line."""
from __future__ import annotations

import argparse
import sys


def _bench(args: argparse.Namespace) -> int:
    if args.train:
        from .bench import train as bench_train
        return bench_train.main(quick=args.quick, output=args.output, threads=args.threads)
    from .bench import ops as bench_ops
    return bench_ops.main(quick=args.quick, cases=args.cases, output=args.output, threads=args.threads,
                          sizes=args.sizes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsekern", description="Fast unstructured-sparse training for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="time the sparse kernels against dense PyTorch and peers")
    bench.add_argument("--quick", action="store_true", help="fewer cases and repeats (about a minute)")
    bench.add_argument("--cases", nargs="*", default=None, choices=("linear", "conv", "topk"),
                       help="subset of case groups: linear conv topk (default: all)")
    bench.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    bench.add_argument("--output", default=None, help="also write the markdown table to this file")
    bench.add_argument("--sizes", choices=("full", "tiny"), default="full",
                       help="tiny: toy shapes that run in seconds, for smoke tests (default: full, the issue's shapes)")
    bench.add_argument("--train", action="store_true",
                       help="time whole training steps (sparse vs dense MLP and ResNet-20) instead of ops")
    bench.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
