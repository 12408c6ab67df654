"""One rank of a torchrun launch made by tests/test_train_distributed.py (not a test module itself).

Runs ``sparsekern train`` (the arguments after argv[1]) and stops every rank, as a killed run would, once rank 0
has written its argv[1]-th checkpoint: every rank meets the others at a barrier after that checkpoint's state
was gathered (and, on rank 0, written) and leaves the process there.
"""
import os
import sys

import torch.distributed as dist

import sparsekern.train as train_module
from sparsekern.cli import main

STOP_AT = int(sys.argv[1])
states = [0]
real_state, real_save = train_module._fit_state, train_module.save_checkpoint


def _stop() -> None:
    dist.barrier()
    os._exit(0)


def fit_state(*args, **kwargs):
    state = real_state(*args, **kwargs)  # every rank gathers it, rank 0 then writes it
    states[0] += 1
    if states[0] == STOP_AT and dist.get_rank() != 0:
        _stop()
    return state


def save_checkpoint(*args, **kwargs):
    path = real_save(*args, **kwargs)
    if states[0] == STOP_AT:
        _stop()
    return path


train_module._fit_state, train_module.save_checkpoint = fit_state, save_checkpoint
sys.exit(main(sys.argv[2:]))
