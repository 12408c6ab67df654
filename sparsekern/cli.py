"""The ``sparsekern`` command line."""
from __future__ import annotations

import argparse
import sys


def _bench(args: argparse.Namespace) -> int:
    if args.gpu:
        from .bench import gpu as bench_gpu
        argv = ["--sizes", args.sizes] + (["--quick"] if args.quick else []) + \
            (["--output", args.output] if args.output else []) + (["--cases", *args.cases] if args.cases else [])
        return bench_gpu.main(argv)
    if args.models is not None:
        from .bench import models as bench_models
        return bench_models.main(models=args.models, quick=args.quick, output=args.output, threads=args.threads,
                                 sizes=args.sizes)
    if args.train:
        from .bench import train as bench_train
        return bench_train.main(quick=args.quick, output=args.output, threads=args.threads)
    from .bench import ops as bench_ops
    return bench_ops.main(quick=args.quick, cases=args.cases, output=args.output, threads=args.threads,
                          sizes=args.sizes)


def _floats(text: str):
    return tuple(float(v) for v in text.replace(",", " ").split())


def _study(args: argparse.Namespace) -> int:
    import math

    from .studies import STUDIES
    module, config_cls = STUDIES[args.study]
    overrides = {"seeds": tuple(args.seeds) if args.seeds else None, "data": args.data, "data_dir": args.data_dir,
                 "out": args.out, "steps": args.steps}
    if args.densities:
        if args.study == "lottery":
            if len(args.densities) != 1 or not 0 < args.densities[0] < 1:
                raise SystemExit("sparsekern study lottery: --densities takes one density in (0, 1): the ticket's")
            # rounds of prune_fraction (0.2 or the quick setting's) that reach the density
            fraction = (config_cls.quick_config() if args.quick else config_cls()).prune_fraction
            overrides["rounds"] = max(1, round(math.log(args.densities[0]) / math.log(1 - fraction)))
        else:
            overrides["densities"] = tuple(args.densities)
    if args.model:
        if args.study == "gradient-flow":
            overrides["models"] = tuple(args.model)
        elif len(args.model) == 1:
            overrides["model"] = args.model[0]
        else:
            raise SystemExit(f"sparsekern study {args.study}: --model takes one model")
    if args.no_progress:
        overrides["progress"] = False
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = config_cls.quick_config(**overrides) if args.quick else config_cls(**overrides)
    result = module.run(config)
    print((__import__("pathlib").Path(result["dir"]) / "summary.md").read_text())
    print(f"results: {result['dir']}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    import torch

    from . import dst as dst_algorithms
    from .data import load_data
    from .models import get_model
    from .sparsity import sparsify
    from .train import evaluate, fit

    torch.manual_seed(args.seed)
    splits = load_data(args.data, args.data_dir, image_size=args.image_size)
    train_loader, val_loader, test_loader = splits.loaders(args.batch_size, seed=args.seed)
    kwargs = {"padding": 2} if args.model == "lenet5" and splits.image_size < 28 else {}
    model = get_model(args.model, num_classes=splits.num_classes, in_channels=splits.in_channels,
                      image_size=splits.image_size, **kwargs)
    if args.method != "dense":
        sparsify(model, args.density, args.distribution, init=args.init,
                 generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    total_steps = args.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(total_steps, 1))
    algo = None
    if args.method != "dense":
        algo = dst_algorithms.create(args.method, model, optimizer, max(total_steps, 1), delta_t=args.delta_t,
                                     generator=torch.Generator().manual_seed(args.seed))
    out = Path(args.out) / "train" / f"{args.model}-{args.data}-{args.method}-d{args.density}-s{args.seed}"
    start = time.perf_counter()
    log = fit(model, train_loader, val_loader, args.epochs, optimizer, scheduler=scheduler, dst=algo,
              grad_flow_every=args.grad_flow_every, log_path=str(out / "log.json"), scheduler_interval="step",
              progress=not args.no_progress)
    test = evaluate(model, test_loader)
    summary = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "test": test,
               "seconds": time.perf_counter() - start, "final_epoch": log["epochs"][-1] if log["epochs"] else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"test accuracy {test['accuracy']:.4f}  test loss {test['loss']:.4f}  ({summary['seconds']:.0f} s); "
          f"log: {out / 'log.json'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .studies.demo import DemoConfig, print_table, run
    result = run(DemoConfig(quick=args.quick, out=args.out, progress=not args.no_progress))
    print_table(result)
    print(f"plot: {result['plot']}")
    return 0


def _gpu_check(args: argparse.Namespace) -> int:
    from . import gpu_check
    return gpu_check.run_check(args, ["sparsekern", *sys.argv[1:]])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsekern", description="Fast unstructured-sparse training for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="time the sparse kernels against dense PyTorch and peers")
    bench.add_argument("--quick", action="store_true", help="fewer cases and repeats (about a minute)")
    bench.add_argument("--cases", nargs="*", default=None,
                       choices=("linear", "conv", "topk", "dst", "spmm", "sddmm", "bsr", "masked", "resnet-dense",
                                "resnet-csr", "resnet-bsr"),
                       help="subset of case groups: linear conv topk; with --gpu also spmm sddmm bsr masked "
                            "resnet-dense resnet-csr resnet-bsr dst (default: all)")
    bench.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    bench.add_argument("--output", default=None, help="also write the markdown table to this file")
    bench.add_argument("--sizes", choices=("full", "tiny"), default="full",
                       help="tiny: toy shapes that run in seconds, for smoke tests (default: full, the benchmark shapes)")
    bench.add_argument("--train", action="store_true",
                       help="time whole training steps (sparse vs dense MLP and ResNet-20) instead of ops")
    bench.add_argument("--models", nargs="*", default=None, metavar="MODEL",
                       choices=("resnet50", "resnet18", "bert", "vit", "convnext", "mlp"),
                       help="time training steps of whole networks dense vs 90%% sparse (ERK, uniform), with the "
                            "FLOP bound and every sparse layer: resnet50 resnet18 bert vit convnext mlp (none named: all)")
    bench.add_argument("--gpu", action="store_true",
                       help="time the Triton and CUDA kernels on the GPU against cuBLAS, cuSPARSE and torch BSR")
    bench.set_defaults(func=_bench)

    data_choices = ("digits", "synthetic", "mnist", "fashion-mnist", "cifar10")
    study = sub.add_parser("study", help="reproduce one of the paper's findings: numbers, plots, a summary")
    study.add_argument("study", choices=("gradient-flow", "dst", "lottery"))
    study.add_argument("--quick", action="store_true", help="a tiny setting (under a minute) for smoke tests")
    study.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the study's)")
    study.add_argument("--densities", type=float, nargs="+", default=None,
                       help="densities (fraction of weights kept); lottery: the one ticket density")
    study.add_argument("--model", nargs="+", default=None,
                       help="model(s): mlp lenet5 resnet20 ... (gradient-flow takes several)")
    study.add_argument("--data", choices=data_choices, default=None, help="data set (default: digits, offline)")
    study.add_argument("--data-dir", default=None, help="directory of the standard files (mnist, cifar10, ...)")
    study.add_argument("--steps", type=int, default=None, help="training steps per run (default: the study's)")
    study.add_argument("--out", default="results", help="results root: <out>/<study>/<config hash>/")
    study.add_argument("--no-progress", action="store_true", help="no progress bars")
    study.set_defaults(func=_study)

    train = sub.add_parser("train", help="train one model, dense or sparse (static, SET, SNFS, RigL)")
    train.add_argument("--model", default="mlp")
    train.add_argument("--data", choices=data_choices, default="digits")
    train.add_argument("--data-dir", default=None)
    train.add_argument("--image-size", type=int, default=None, help="resize/pad the images (e.g. 32 for MNIST)")
    train.add_argument("--density", type=float, default=0.1)
    train.add_argument("--method", choices=("dense", "static", "set", "snfs", "rigl"), default="rigl")
    train.add_argument("--distribution", choices=("uniform", "er", "erk"), default="erk")
    train.add_argument("--init", choices=("sparse", "dense", "layer"), default="sparse")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=0.05)
    train.add_argument("--momentum", type=float, default=0.9)
    train.add_argument("--weight-decay", type=float, default=5e-4)
    train.add_argument("--delta-t", type=int, default=100, help="steps between mask updates")
    train.add_argument("--grad-flow-every", type=int, default=0, help="log the gradient norm every N steps")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", default="results")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=_train)

    demo = sub.add_parser("demo", help="RigL at 90 %% sparsity vs dense on offline digits: table + plot")
    demo.add_argument("--quick", action="store_true", help="60 steps instead of 400")
    demo.add_argument("--out", default="results")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_demo)

    from .gpu_check import add_arguments as gpu_check_arguments
    gpu_check = gpu_check_arguments(sub.add_parser(
        "gpu-check", help="on a GPU machine: environment, build, GPU tests, GPU benchmark and the targets, "
                          "in stages with time budgets (about 7 minutes); report.md + report.json"))
    gpu_check.set_defaults(func=_gpu_check)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
