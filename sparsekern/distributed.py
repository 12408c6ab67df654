"""Multi-process training through torch.distributed (DDP, launched by ``torchrun``): the few helpers the
training loop and ``sparsekern train`` share.

One process per device: torchrun sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; ``setup`` joins the group (NCCL on CUDA, gloo on the CPU) and ``teardown`` leaves it.
Outside torchrun (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) every helper is the single-process identity, so
code written with them runs unchanged in one process.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler, Sampler

__all__ = ["DistributedContext", "launched_world_size", "parse_device", "resolve_device", "setup", "teardown",
           "exit_process", "is_distributed", "rank", "world_size", "is_main_process", "unwrap", "wrap_ddp",
           "ShardSampler", "shard_sampler", "set_epoch", "all_reduce_mean", "broadcast", "all_reduce_sums",
           "all_reduce_totals", "average_float_buffers",
           "state_digest", "gather_objects"]


def launched_world_size() -> int:
    """The number of processes torchrun launched (``WORLD_SIZE``; 1 outside torchrun)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"sparsekern.distributed: WORLD_SIZE must be an int >= 1, got {text!r}") from None
    if value < 1:
        raise ValueError(f"sparsekern.distributed: WORLD_SIZE must be an int >= 1, got {value}")
    return value


def parse_device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N >= 0), normalized; ValueError otherwise."""
    spec = text.strip().lower()
    if spec in ("auto", "cpu", "cuda"):
        return spec
    if spec.startswith("cuda:") and spec[5:].isdigit():
        return f"cuda:{int(spec[5:])}"
    raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")


def resolve_device(spec: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """The device a process trains on. ``auto`` is CUDA where available, else the CPU; under torchrun
    ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK`` (one process per GPU). Raises ValueError (naming the
    device) where CUDA is asked for and absent, or the index does not exist."""
    spec = parse_device(spec)
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"{spec} was asked for, but CUDA is not available (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'none'}); use --device cpu")
    count = torch.cuda.device_count()
    if spec == "cuda":
        index = local_rank if distributed else torch.cuda.current_device()
    elif distributed:
        raise ValueError(f"under torchrun each process takes the GPU of its LOCAL_RANK; use --device cuda "
                         f"(or auto), got {spec} (restrict the GPUs with CUDA_VISIBLE_DEVICES)")
    else:
        index = int(spec.split(":")[1])
    if index >= count:
        raise ValueError(f"cuda:{index} does not exist: this machine shows {count} CUDA device(s)"
                         + (f" and LOCAL_RANK is {local_rank}" if distributed else ""))
    return torch.device("cuda", index)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among ``world_size`` processes, and the device it trains on."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: Union[str, torch.device] = "auto") -> DistributedContext:
    """Resolve ``device`` (a spec for ``resolve_device``, or a device as it resolved) and, under torchrun
    (``WORLD_SIZE`` > 1), join the process group through the environment (``env://``): NCCL when the
    device is CUDA, gloo on the CPU. In one process nothing is initialized."""
    size = launched_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if size > 1 else 0
    target = device if isinstance(device, torch.device) else resolve_device(device, local_rank, size > 1)
    if size == 1:
        return DistributedContext(0, 0, 1, target)
    if not dist.is_available():
        raise RuntimeError(f"sparsekern.distributed: WORLD_SIZE is {size} but this torch build has no "
                           "torch.distributed")
    if target.type == "cuda":
        torch.cuda.set_device(target)  # NCCL's collectives run on the current device
        dist.init_process_group("nccl", init_method="env://", device_id=target)
    else:
        dist.init_process_group("gloo", init_method="env://")
    return DistributedContext(dist.get_rank(), local_rank, dist.get_world_size(), target)


def teardown() -> None:
    """Leave the process group once every rank is done (no rank tears it down while another still
    talks to it). Nothing to do in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int = 0) -> None:
    """Flush and end the process now, skipping interpreter shutdown. For the end of a distributed run,
    after ``teardown``: every output is written and the group is gone, but torch's gloo backend can abort
    in exit-time destructors ("terminate called without an active exception", SIGABRT, about 1 run in
    10-50 with torch 2.13), which torchrun would report as a failed run."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more to save
            pass
    os._exit(code)


# -- where this process stands ------------------------------------------------------------------
def is_distributed() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes files and prints."""
    return rank() == 0


def unwrap(model: nn.Module) -> nn.Module:
    """The module a DistributedDataParallel wrapper holds (the model itself otherwise): what checkpoints
    save, so their keys carry no ``module.`` prefix and load into a single-process model."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel without the per-forward copy of rank 0's buffers: the sparse
    patterns live in buffers, and each rank must reach the same pattern through the DST algorithm's
    all-reduced scores, never by receiving rank 0's (``average_float_buffers`` handles BatchNorm's).
    Buffers are still synced once, at construction, where every rank holds the same ones anyway."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # torch 2.13 renamed broadcast_buffers (deprecated there, with a warning) to forward_sync_buffers.
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


# -- data: each rank its own shard -----------------------------------------------------------------
class ShardSampler(Sampler[int]):
    """Every ``num_replicas``-th index from ``rank`` in order, without padding: the shards are disjoint and
    their union is the dataset, so sums over them (evaluation) add up to the whole split exactly. (torch's
    DistributedSampler pads the shards to equal length with repeated examples, which would count those twice.)"""

    def __init__(self, length: int, num_replicas: int, rank: int):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"ShardSampler: rank must lie in [0, {num_replicas}), got {rank}")
        self.length, self.num_replicas, self.rank = length, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return max(0, math.ceil((self.length - self.rank) / self.num_replicas))


def shard_sampler(dataset, shuffle: bool, seed: int, num_replicas: int, rank: int) -> Sampler[int]:
    """This rank's sampler of ``dataset``. Training (``shuffle``): torch's DistributedSampler, a permutation
    seeded by (seed, epoch) and the same on every rank, split among them; it pads with repeated examples so
    every rank runs the same number of steps (DDP needs that). Call ``set_epoch`` each epoch for a new
    order. Evaluation: ``ShardSampler``, no padding."""
    if shuffle:
        return DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
    return ShardSampler(len(dataset), num_replicas, rank)


def _distributed_sampler(loader) -> Optional[DistributedSampler]:
    """A loader's DistributedSampler, directly or inside its batch sampler; None without one."""
    samplers = [getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)]
    samplers += [getattr(s, "sampler", None) for s in samplers]  # a BatchSampler wraps the per-index sampler
    return next((s for s in samplers if isinstance(s, DistributedSampler)), None)


def set_epoch(loader, epoch: int) -> None:
    """Tell a loader's distributed sampler (directly or inside its batch sampler) which epoch begins, so
    each epoch has its own order; loaders without one are left alone."""
    sampler = _distributed_sampler(loader)
    if sampler is not None:
        sampler.set_epoch(epoch)


def own_examples(loader) -> Optional[int]:
    """How many of the examples a rank's loader yields each epoch are its share of the data set, where its
    DistributedSampler pads the shards to equal length with repeated examples (None where nothing is padded).
    The padding comes last: rank r's k-th example is position r + k x num_replicas of the padded order, and
    the positions from len(dataset) on repeat the first ones."""
    sampler = _distributed_sampler(loader)
    if sampler is None or sampler.drop_last or sampler.total_size <= len(sampler.dataset):
        return None
    return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))


# -- collectives ---------------------------------------------------------------------------------
def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (in place); identity outside torch.distributed."""
    if is_distributed():
        dist.all_reduce(t)
        t.div_(dist.get_world_size())
    return t


def broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor on every rank (in place); identity outside torch.distributed."""
    if is_distributed():
        dist.broadcast(t, src=0)
    return t


def all_reduce_sums(values: Sequence[float], device=None) -> List[float]:
    """The sums over ranks of ``values`` (one float64 all-reduce; identity in one process). ``device`` is
    where the tensor goes: NCCL reduces CUDA tensors only."""
    if not is_distributed():
        return [float(v) for v in values]
    sums = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return sums.tolist()


def all_reduce_totals(loss: float, correct: Optional[int], count: int, device=None):
    """(loss, correct, count) summed over ranks, each rank having summed its own examples; ``correct`` is None
    (outputs that are not class scores) where a rank that saw examples says so (one with none cannot tell)."""
    no_accuracy = correct is None and count > 0
    loss, correct_sum, count, no_accuracy = all_reduce_sums((loss, correct or 0, count, no_accuracy), device)
    return loss, None if no_accuracy else int(correct_sum), int(count)


@torch.no_grad()
def average_float_buffers(model: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm's running statistics) over ranks, in place. DDP runs
    with ``broadcast_buffers=False`` so that rank 0's sparse patterns are never copied over the others'
    (each rank must reach the same pattern by itself); the running statistics, estimated on each rank's own
    batches, are then made one by this call before evaluation and checkpoints. Integer buffers (patterns,
    counters) are left alone."""
    if not is_distributed():
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            all_reduce_mean(buffer)


def state_digest(state: dict) -> str:
    """SHA-256 of a state_dict's tensors (names, dtypes, shapes and bytes, in key order): equal digests mean
    bit-identical models, e.g. the same patterns and values on every rank."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gather_objects(obj) -> List:
    """``obj`` of every rank, in rank order, on every rank (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    gathered: List[Optional[object]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
