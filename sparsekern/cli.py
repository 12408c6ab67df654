"""The ``sparsekern`` command line."""
from __future__ import annotations

import argparse
import sys

_DEFAULT_MALLOC_HELP = ("leave the C library's malloc as it is (default: keep freed memory for reuse, "
                        "sparsekern.allocator.keep_freed_memory: steady step times, the peak stays resident)")


def _keep_freed_memory(args: argparse.Namespace) -> None:
    if not args.default_malloc:
        from .allocator import keep_freed_memory
        keep_freed_memory()


def _refuse(args: argparse.Namespace, mode: str, why: str, given) -> None:
    """A usage error naming the options of ``given`` ((flag, given?) pairs) that ``mode`` does not read."""
    flags = [flag for flag, on in given if on]
    if flags:
        args.parser.error(f"argument {mode}: {why}; not with {' '.join(flags)}")


def _bench(args: argparse.Namespace) -> int:
    if args.targets:
        _refuse(args, "--targets", "runs the cases its targets name, at their sizes",
                (("--models", args.models is not None), ("--train", args.train), ("--gpu", args.gpu),
                 ("--cases", args.cases is not None), ("--quick", args.quick), ("--channels-last", args.channels_last)))
        _keep_freed_memory(args)
        from .bench import targets as bench_targets
        return bench_targets.main(output=args.output, threads=args.threads, sizes=args.sizes, isa=args.isa,
                                  repeat=args.repeat)
    if args.repeat != 1:
        args.parser.error("argument --repeat: only with --targets")
    if args.channels_last and args.models is None:
        args.parser.error("argument --channels-last: only with --models (the op benchmarks fix their own layouts)")
    if args.isa != "native" and args.models is None:
        args.parser.error("argument --isa: only with --models or --targets (each model runs in a process of its own, "
                          "which takes the restriction when its libraries load)")
    if args.gpu:
        _refuse(args, "--gpu", "the GPU benchmark reads --cases, --quick, --sizes and --output",
                (("--models", args.models is not None), ("--train", args.train),
                 ("--threads", args.threads is not None), ("--default-malloc", args.default_malloc)))
        from .bench import gpu as bench_gpu
        argv = ["--sizes", args.sizes] + (["--quick"] if args.quick else []) + \
            (["--output", args.output] if args.output else []) + (["--cases", *args.cases] if args.cases else [])
        return bench_gpu.main(argv)
    if args.models is not None:
        _refuse(args, "--models", "times every case of the models named",
                (("--train", args.train), ("--cases", args.cases is not None)))
    elif args.train:
        _refuse(args, "--train", "times every training-step case", (("--cases", args.cases is not None),))
    elif args.cases:
        from .bench.ops import GROUPS
        gpu_only = [case for case in args.cases if case not in GROUPS]
        if gpu_only:
            args.parser.error(f"argument --cases: {' '.join(gpu_only)} only with --gpu (the op benchmarks' cases: "
                              f"{' '.join(GROUPS)})")
    _keep_freed_memory(args)
    if args.models is not None:
        from .bench import models as bench_models
        return bench_models.main(models=args.models, quick=args.quick, output=args.output, threads=args.threads,
                                 sizes=args.sizes, channels_last=args.channels_last, isa=args.isa)
    if args.train:
        from .bench import train as bench_train
        return bench_train.main(quick=args.quick, output=args.output, threads=args.threads, sizes=args.sizes)
    from .bench import ops as bench_ops
    return bench_ops.main(quick=args.quick, cases=args.cases, output=args.output, threads=args.threads,
                          sizes=args.sizes)


# -- argument types: a bad number is a parser error naming the argument ---------------------------------
def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {value}")
        return value
    parse.__name__ = f"int >= {minimum}"
    return parse


def _float_in(low: float, high: float, low_open: bool = True, what: str = ""):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        ok = (low < value if low_open else low <= value) and value <= high and value == value
        if not ok:
            raise argparse.ArgumentTypeError(
                f"must lie in {'(' if low_open else '['}{low:g}, {high:g}]{what}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def _device(text: str) -> str:
    from .distributed import parse_device
    try:
        return parse_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


_device.__name__ = "device"
_DENSITY = _float_in(0.0, 1.0, what=" (the fraction of weights kept)")
_POSITIVE = _float_in(0.0, float("inf"))
_NON_NEGATIVE = _float_in(0.0, float("inf"), low_open=False)
_FRACTION = _float_in(0.0, 1.0, low_open=False, what=" (a fraction of the steps)")
_DROP_FRACTION = _float_in(0.0, 1.0, low_open=False, what=" (a fraction of each layer's active weights)")
_END_FRACTION = _float_in(0.0, 1.0, what=" (a fraction of the steps)")
DATA_CHOICES = ("digits", "synthetic", "mnist", "fashion-mnist", "cifar10")
NEEDS_DATA_DIR = ("fashion-mnist", "cifar10")


def _check_data(parser: argparse.ArgumentParser, data: str, data_dir) -> None:
    """--data / --data-dir consistency, and the optional extra for the bundled MNIST subset."""
    import os

    if data_dir is not None:
        if data in ("digits", "synthetic"):
            parser.error(f"argument --data-dir: only mnist, fashion-mnist and cifar10 read files; --data {data} "
                         f"is built in, got --data-dir {data_dir!r}")
        if not os.path.isdir(data_dir):
            parser.error(f"argument --data-dir: must be an existing directory, got {data_dir!r}")
    elif data in NEEDS_DATA_DIR:
        parser.error(f"argument --data-dir: --data {data} needs the directory holding its standard files, got none")
    elif data == "digits":
        from importlib.util import find_spec
        if find_spec("sklearn") is None:
            parser.error("argument --data: digits is scikit-learn's bundled set, which the optional extra "
                         "sparsekern[studies] installs (pip install 'sparsekern[studies]'); or --data synthetic")
    elif data == "mnist":
        from .data import mnist_subset_path
        try:
            mnist_subset_path()
        except (ImportError, FileNotFoundError) as err:
            parser.error(f"argument --data: mnist without --data-dir needs the optional extra "
                         f"sparsekern[data] (pip install 'sparsekern[data]'): {err}")


def _check_models(parser: argparse.ArgumentParser, names) -> None:
    from .models import MODELS
    for name in names or ():
        if name.lower().replace("_", "-") not in MODELS:
            parser.error(f"argument --model: must be one of {', '.join(MODELS)}, got {name!r}")


def _study_config(args: argparse.Namespace, name: str):
    import math

    from .studies import STUDIES
    module, config_cls = STUDIES[name]
    overrides = {"seeds": tuple(args.seeds) if args.seeds else None, "data": args.data, "data_dir": args.data_dir,
                 "out": args.out, "steps": args.steps}
    if args.densities:
        if name == "lottery":
            if len(args.densities) != 1 or not 0 < args.densities[0] < 1:
                args.parser.error(f"argument --densities: study lottery takes one density in (0, 1), the ticket's, "
                                  f"got {args.densities}")
            # rounds of prune_fraction (the default or the quick setting's) that reach the density
            fraction = (config_cls.quick_config() if args.quick else config_cls()).prune_fraction
            overrides["rounds"] = max(1, round(math.log(args.densities[0]) / math.log(1 - fraction)))
        else:
            overrides["densities"] = tuple(args.densities)
    if args.model:
        if name == "gradient-flow":
            overrides["models"] = tuple(args.model)
        elif len(args.model) == 1:
            overrides["model"] = args.model[0]
        else:
            args.parser.error(f"argument --model: study {name} takes one model, got {len(args.model)}: {args.model}")
    if args.no_progress:
        overrides["progress"] = False
    if args.fresh:
        overrides["fresh"] = True
    overrides["grad_flow_data"] = args.grad_flow_data
    if args.measured_kernels:
        overrides["deterministic"] = False
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return module, (config_cls.quick_config(**overrides) if args.quick else config_cls(**overrides))


def _study(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        args.parser.error(f"argument --seeds: must be distinct (paired comparisons pair runs by seed), "
                          f"got {args.seeds}")
    if args.study != "all" and args.report is not None:
        args.parser.error(f"argument --report: only with study all (one study writes its summary in its run "
                          f"directory), got study {args.study}")
    if args.study == "all" and args.model:
        args.parser.error("argument --model: study all runs each study's own models; run one study to choose, "
                          f"got {args.model}")
    _check_models(args.parser, args.model)
    data = args.data or ("digits" if args.quick else "mnist")
    _check_data(args.parser, data, args.data_dir)
    names = ("gradient-flow", "dst", "lottery") if args.study == "all" else (args.study,)
    configs = [_study_config(args, name) for name in names]  # every setting checked before any run
    results = {}
    for name, (module, config) in zip(names, configs):
        results[name] = module.run(config)
        if args.study != "all":
            print((Path(results[name]["dir"]) / "summary.md").read_text())
            print(f"results: {results[name]['dir']}")
    if args.study == "all":
        from .studies.report import write_report
        report = write_report(results, args.report or __import__("os").path.join(args.out, "report"))
        print(f"report: {report}")
    return 0


def _train(args: argparse.Namespace) -> int:
    """One training run; under torchrun (WORLD_SIZE > 1) one process of a DDP run."""
    import os

    from . import distributed

    _check_models(args.parser, [args.model])
    _check_data(args.parser, args.data, args.data_dir)
    try:
        world_size = distributed.launched_world_size()
        device = distributed.resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")), world_size > 1)
    except ValueError as err:
        args.parser.error(f"argument --device: {err}")
    if world_size > 1 and args.method == "snfs":
        args.parser.error(f"argument --method: snfs moves weights between layers (their nnz changes), which "
                          f"DDP's gradient buckets cannot follow; under torchrun (WORLD_SIZE={world_size}) use "
                          "static, set or rigl")
    if args.method in ("dense", "static"):
        # mask-update settings a run whose pattern never changes would ignore
        given = [flag for flag, set_ in (("--delta-t", args.delta_t is not None),
                                         ("--drop-fraction", args.drop_fraction != _LATER_ARGS["drop_fraction"]),
                                         ("--end-fraction", args.end_fraction != _LATER_ARGS["end_fraction"]),
                                         ("--reinit-when-same", args.reinit_when_same)) if set_]
        if given:
            args.parser.error(f"argument {given[0]}: sets the mask updates of set, snfs and rigl; --method "
                              f"{args.method} never changes its pattern")
    _keep_freed_memory(args)
    if args.deterministic:
        # cuBLAS needs a fixed workspace for deterministic products; set before CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        import torch
        # warn_only: a CUDA op without a deterministic implementation warns rather than stopping the run
        torch.use_deterministic_algorithms(True, warn_only=True)
    context = distributed.setup(device)
    code = _train_run(args, context)
    if context.distributed:
        distributed.teardown()
        # Every output is written and the group is gone; end here, as torch's gloo can abort the process
        # in exit-time destructors (SIGABRT), which torchrun would report as a failed run.
        distributed.exit_process(code)
    return code


def _train_run(args: argparse.Namespace, context) -> int:
    import hashlib
    import json
    import time
    from pathlib import Path

    import torch

    from . import distributed, dst as dst_algorithms
    from .data import load_data
    from .models import build_model
    from .nn import fast_modules
    from .sparsity import sparsify
    from .train import ResumeError, evaluate, fit, lr_scheduler

    torch.manual_seed(args.seed)  # every rank builds the same model and the same patterns from the seed
    splits = load_data(args.data, args.data_dir, image_size=args.image_size)
    train_loader, val_loader, test_loader = splits.loaders(args.batch_size, seed=args.seed,
                                                           num_replicas=context.world_size, rank=context.rank)
    try:
        model = build_model(args.model, splits.num_classes, splits.in_channels, splits.image_size, args.seed,
                            he_init=False)  # the model's own init (PyTorch defaults, He for the ResNets)
    except ValueError as err:  # a model too deep for the images (LeNet-5 on 8x8 digits)
        args.parser.error(f"argument --image-size: {err} (the images are {splits.image_size}x{splits.image_size}; "
                          "--image-size resizes them)")
    if args.method != "dense":
        sparsify(model, args.density, args.distribution, init=args.init,
                 generator=torch.Generator().manual_seed(args.seed))
    if not args.plain_modules:
        fast_modules(model)  # the same modules in every method, so that dense and sparse runs compare
    model.to(context.device)
    trained = distributed.wrap_ddp(model, context.device) if context.distributed else model
    optimizer = torch.optim.SGD(trained.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    total_steps = args.epochs * len(train_loader)
    scheduler = lr_scheduler(optimizer, total_steps, args.lr_schedule, int(args.warmup * total_steps))
    algo = None
    if args.method != "dense":
        # Given the DDP wrapper, as the algorithms are tested (SNFS refuses redistribution under it).
        # Updates run to end_fraction of training: a short run gets about ten of them.
        delta_t = args.delta_t or max(1, min(100, int(args.end_fraction * total_steps) // 10))
        algo = dst_algorithms.create(args.method, trained, optimizer, max(total_steps, 1), delta_t=delta_t,
                                     drop_fraction=args.drop_fraction, end_fraction=args.end_fraction,
                                     reinit_when_same=args.reinit_when_same,
                                     generator=torch.Generator().manual_seed(args.seed))
    run_args = {k: v for k, v in vars(args).items() if k not in ("func", "parser")}
    # what a resumed run must share with the run it continues (the rest only says how to run it)
    meta = {"args": {k: v for k, v in run_args.items()
                     if k not in _RUN_ONLY and not (k in _LATER_ARGS and v == _LATER_ARGS[k])},
            "world_size": context.world_size}
    # one directory per setting: runs that differ in any other argument (--lr, --epochs, --data-dir...) do not
    # overwrite each other, and --resume finds the run of its arguments
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:8]
    out = (Path(args.out) / "train" /
           f"{args.model}-{args.data}-{args.method}-d{args.density}-s{args.seed}-{digest}")
    resume = _resume_state(args, out / "checkpoint.pt", meta) if args.resume else None
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(meta, indent=1, default=str))
    start = time.perf_counter()
    try:
        log = fit(trained, train_loader, val_loader, args.epochs, optimizer, scheduler=scheduler, dst=algo,
                  grad_flow_every=args.grad_flow_every, log_path=str(out / "log.json"), scheduler_interval="step",
                  progress=not args.no_progress and context.is_main, checkpoint_every=args.checkpoint_every,
                  checkpoint_path=out / "checkpoint.pt" if args.checkpoint_every else None, device=context.device,
                  resume=resume, checkpoint_meta=meta)
    except ResumeError as err:
        args.parser.error(f"argument --resume: {err}")
    test = evaluate(model, test_loader, device=context.device, across_ranks=context.distributed)._asdict()
    summary = {"args": run_args, "test": test,
               "seconds": time.perf_counter() - start, "final_epoch": log["epochs"][-1] if log["epochs"] else None,
               "world_size": context.world_size, "device": str(context.device),
               "delta_t": None if algo is None else algo.delta_t,
               "resumed_from": None if resume is None else {"step": int(resume["step"]),
                                                            "epochs_done": resume["fit"]["epochs_done"]}}
    agree = True
    if context.distributed:
        # Every rank must end with the same patterns and values: a digest of each rank's model, in the summary.
        digests = distributed.gather_objects(distributed.state_digest(model.state_dict()))
        agree = len(set(digests)) == 1
        summary["rank_model_digests"] = digests
    if context.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"test accuracy {test['accuracy']:.4f}  test loss {test['loss']:.4f}  ({summary['seconds']:.0f} s); "
              f"log: {out / 'log.json'}")
        if not agree:
            print(f"sparsekern train: the {context.world_size} ranks ended with different models (digests in "
                  f"{out / 'summary.json'}); this is a bug, please report it", file=sys.stderr)
    return 0 if agree else 1


# train arguments that say how to run, not what: a resumed run may change them
_RUN_ONLY = ("no_progress", "device", "default_malloc", "resume", "checkpoint_every", "out", "deterministic")
# arguments added after runs were written: at their defaults they stay out of the run's hash, so the run
# directories (and --resume) of earlier runs keep their names
_LATER_ARGS = {"drop_fraction": 0.3, "end_fraction": 0.75, "reinit_when_same": False}


def _resume_state(args: argparse.Namespace, path, meta: dict) -> dict:
    """The checkpoint ``train --resume`` continues from, checked to come from a run of these arguments."""
    import json

    from .train import read_fit_checkpoint

    if not path.is_file():
        # runs of the same model, data, method, density and seed with checkpoints: say how their arguments differ
        prefix = path.parent.name.rsplit("-", 1)[0]
        near = [f"{other.parent.name} ({'; '.join(_differences(json.loads(other.read_text()), meta))})"
                for other in sorted(path.parent.parent.glob(f"{prefix}-*/args.json"))
                if (other.parent / "checkpoint.pt").is_file()]
        args.parser.error(f"argument --resume: no checkpoint at {path} (a run writes one with --checkpoint-every N; "
                          "--out and the run's arguments name its directory)" +
                          (f"; beside it, checkpoints of runs with other arguments: {', '.join(near)}" if near else ""))
    try:
        state = read_fit_checkpoint(path)
    except ValueError as err:
        args.parser.error(f"argument --resume: {err}")
    differ = _differences(state.get("meta") or {}, meta)
    if differ:
        args.parser.error(f"argument --resume: {path} is from a run with other arguments ({'; '.join(differ)}); "
                          "resume with the run's own")
    return state


def _differences(theirs: dict, ours: dict) -> list:
    """How a run's setting (``{"args": ..., "world_size": ...}``) differs from this one's, as flags."""
    differ = [f"--{k.replace('_', '-')} {theirs.get('args', {}).get(k)!r} there, {ours['args'].get(k)!r} here"
              for k in sorted(set(theirs.get("args", {})) | set(ours["args"]))
              if theirs.get("args", {}).get(k) != ours["args"].get(k)]
    if theirs.get("world_size") != ours["world_size"]:
        differ.append(f"{theirs.get('world_size')} process(es) there, {ours['world_size']} here")
    return differ


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
                       help="tiny: toy shapes that run in seconds, for smoke tests "
                            "(default: full, the benchmark shapes)")
    bench.add_argument("--train", action="store_true",
                       help="time whole training steps (sparse vs dense MLP and ResNet-20) instead of ops")
    bench.add_argument("--models", nargs="*", default=None, metavar="MODEL",
                       choices=("resnet50", "resnet18", "bert", "vit", "convnext", "mlp"),
                       help="time training steps of whole networks dense vs 90%% sparse (ERK, uniform), with the "
                            "FLOP bound and every sparse layer: resnet50 resnet18 bert vit convnext mlp "
                            "(none named: all)")
    bench.add_argument("--channels-last", action="store_true",
                       help="with --models: both models and the images in channels_last (default: NCHW)")
    bench.add_argument("--isa", choices=("native", "avx2"), default="native",
                       help="with --models or --targets: avx2 holds torch, oneDNN, MKL and the sparsekern loops to "
                            "AVX2 in every process, a proxy for an AVX2 host on an AVX-512 one (default: native)")
    bench.add_argument("--targets", action="store_true",
                       help="run what the CPU speed targets need (ResNet-50, ViT, ConvNeXt, BERT, MLP steps; linear "
                            "and conv ops) and say each met or missed on this host, with its margin and bound "
                            "(--output FILE: also FILE.json)")
    bench.add_argument("--repeat", type=_int_at_least(1), default=1,
                       help="with --targets: run each case N times and judge the median ratio (default: 1)")
    bench.add_argument("--gpu", action="store_true",
                       help="time the Triton and CUDA kernels on the GPU against cuBLAS, cuSPARSE and torch BSR")
    bench.add_argument("--default-malloc", action="store_true", help=_DEFAULT_MALLOC_HELP)
    bench.set_defaults(func=_bench, parser=bench)

    data_choices = DATA_CHOICES
    study = sub.add_parser("study", help="reproduce the paper's findings: numbers, plots, a summary with verdicts")
    study.add_argument("study", choices=("gradient-flow", "dst", "lottery", "all"),
                       help="one study, or all three and one report")
    study.add_argument("--quick", action="store_true", help="a tiny setting on digits (seconds) for smoke tests")
    study.add_argument("--seeds", type=_int_at_least(0), nargs="+", default=None,
                       help="training seeds (default: 0 to 9)")
    study.add_argument("--densities", type=_DENSITY, nargs="+", default=None,
                       help="densities (fraction of weights kept); lottery: the one ticket density")
    study.add_argument("--model", nargs="+", default=None,
                       help="model(s): mlp (LeNet-300-100) lenet5 ... (gradient-flow takes several)")
    study.add_argument("--data", choices=data_choices, default=None,
                       help="data set (default: mnist, the 5,000-image real-MNIST subset of sparsekern[data]; "
                            "with --data-dir the full MNIST files; digits: the fast offline smoke set)")
    study.add_argument("--data-dir", default=None, help="directory of the standard files (mnist, cifar10, ...)")
    study.add_argument("--steps", type=_int_at_least(1), default=None,
                       help="training steps per run (default: the study's)")
    study.add_argument("--out", default="results", help="results root: <out>/<study>/<config hash>/")
    study.add_argument("--report", default=None,
                       help="study all: directory of the report (README.md, and each study's summary, results and "
                            "plots); default: <out>/report")
    study.add_argument("--no-progress", action="store_true", help="no progress bars")
    study.add_argument("--grad-flow-data", choices=("val", "train"), default=None,
                       help="the fixed batch gradient norms are measured on: the first 1000 validation images "
                            "(default) or training images (train: as the paper's code)")
    study.add_argument("--measured-kernels", action="store_true",
                       help="let each sparse layer time its kernels (faster; two runs can then differ in the last "
                            "bits, which training amplifies); default: torch's deterministic algorithms and the "
                            "density rule, the same numbers on every run")
    study.add_argument("--fresh", action="store_true",
                       help="train every job again (default: a job that an earlier run of the same config and code "
                            "finished, kept in <run dir>/jobs/, is read, so a stopped study goes on where it stopped)")
    study.set_defaults(func=_study, parser=study)

    train = sub.add_parser("train", help="train one model, dense or sparse (static, SET, SNFS, RigL)")
    train.add_argument("--model", default="mlp")
    train.add_argument("--data", choices=data_choices, default="digits")
    train.add_argument("--data-dir", default=None)
    train.add_argument("--image-size", type=_int_at_least(1), default=None,
                       help="resize/pad the images (e.g. 32 for MNIST)")
    train.add_argument("--density", type=_DENSITY, default=0.1)
    train.add_argument("--method", choices=("dense", "static", "set", "snfs", "rigl"), default="rigl")
    train.add_argument("--distribution", choices=("uniform", "er", "erk"), default="erk")
    train.add_argument("--init", choices=("sparse", "dense", "layer"), default="sparse")
    train.add_argument("--plain-modules", action="store_true",
                       help="keep nn.BatchNorm2d, nn.MaxPool2d, depthwise nn.Conv2d and nn.Linear heads of at most 16 "
                            "outputs as they are (default: "
                            "sparsekern.fast_modules, their faster CPU kernels, in every method, dense included)")
    train.add_argument("--epochs", type=_int_at_least(0), default=10)
    train.add_argument("--batch-size", type=_int_at_least(1), default=128,
                       help="examples per step and per process: under torchrun each of the N processes takes its "
                            "own batches of this size (the DDP convention), so a step sees N times as many")
    train.add_argument("--lr", type=_POSITIVE, default=0.05)
    train.add_argument("--lr-schedule", choices=("cosine", "step", "constant"), default="cosine",
                       help="per step: cosine to 0, step (x0.1 at 50 %% and 75 %% of the steps) or constant "
                            "(default: cosine)")
    train.add_argument("--warmup", type=_FRACTION, default=0.0,
                       help="ramp the learning rate up linearly over this fraction of the steps (default: 0; the "
                            "studies take 0.05, as a full-rate first step can diverge)")
    train.add_argument("--momentum", type=_NON_NEGATIVE, default=0.9)
    train.add_argument("--weight-decay", type=_NON_NEGATIVE, default=5e-4)
    train.add_argument("--delta-t", type=_int_at_least(1), default=None,
                       help="steps between mask updates (default: 100, or a tenth of the steps with updates on a run "
                            "too short for ten updates at 100)")
    train.add_argument("--drop-fraction", type=_DROP_FRACTION, default=_LATER_ARGS["drop_fraction"],
                       help="DST: the fraction of each layer's active weights dropped (and grown) at the first "
                            "update, decayed by a cosine to 0 at --end-fraction (default: 0.3, RigL's)")
    train.add_argument("--end-fraction", type=_END_FRACTION, default=_LATER_ARGS["end_fraction"],
                       help="DST: the fraction of the steps after which the pattern stays (default: 0.75)")
    train.add_argument("--reinit-when-same", action="store_true",
                       help="DST: restart a weight dropped and grown back in the same update at zero (default: it "
                            "keeps its value and optimizer state, as in the paper's code)")
    train.add_argument("--grad-flow-every", type=_int_at_least(0), default=0,
                       help="log the gradient norm every N steps")
    train.add_argument("--checkpoint-every", type=_int_at_least(0), default=0,
                       help="save model, optimizer and DST state every N steps (0: never) to <run>/checkpoint.pt")
    train.add_argument("--resume", action="store_true",
                       help="continue the run from its checkpoint.pt (written with --checkpoint-every; the other "
                            "arguments must be the run's own, but --checkpoint-every, --deterministic, --device, "
                            "--no-progress and --default-malloc may differ): "
                            "model, optimizer, DST and scheduler state, the log, the position in the data and the "
                            "RNG state, so the run goes on as if never stopped (bit for bit with --deterministic)")
    train.add_argument("--deterministic", action="store_true",
                       help="the same numbers on every run of these arguments on this machine, and a resumed run "
                            "bit for bit the run it continues: torch's deterministic algorithms, and every sparse "
                            "layer's kernel by the density rule instead of measured (slower where the measured "
                            "choice wins)")
    train.add_argument("--seed", type=_int_at_least(0), default=0)
    train.add_argument("--device", type=_device, default="auto",
                       help="auto (CUDA if available, else the CPU), cpu, cuda or cuda:N; under torchrun auto and "
                            "cuda give each process the GPU of its LOCAL_RANK (default: auto)")
    train.add_argument("--out", default="results")
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("--default-malloc", action="store_true", help=_DEFAULT_MALLOC_HELP)
    train.set_defaults(func=_train, parser=train)

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
