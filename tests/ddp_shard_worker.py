"""One rank of a torchrun launch made by tests/test_train_distributed.py (not a test module itself).

Joins the group with ``sparsekern.distributed.setup``, records which training examples its loader gives
it in two epochs and what ``evaluate(..., across_ranks=True)`` returns on its validation shard; rank 0
writes every rank's record and the whole split's evaluation to the JSON file named by argv[1].
"""
import json
import sys

import torch

from sparsekern import distributed
from sparsekern.data import make_loaders, make_synthetic
from sparsekern.train import evaluate

# Odd sizes: the training shards need one padded example, the validation shards differ in length.
N_TRAIN, N_VAL, BATCH, EPOCHS = 51, 21, 8, 2


def main(out_path: str) -> None:
    context = distributed.setup("cpu")
    splits = make_synthetic(n_train=N_TRAIN, n_val=N_VAL, n_test=8)
    train, val, _ = splits.loaders(BATCH, seed=3, num_replicas=context.world_size, rank=context.rank)
    epochs = []
    for epoch in range(EPOCHS):
        distributed.set_epoch(train, epoch)
        epochs.append([int(i) for batch in train.sampler for i in batch])  # the loader's index batches
    torch.manual_seed(0)  # the same model on every rank
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(splits.train.images[0].numel(), 4))
    record = {"rank": context.rank, "world_size": context.world_size, "epochs": epochs,
              "train_batches": len(train), "evaluation": list(evaluate(model, val, across_ranks=True))}
    records = distributed.gather_objects(record)
    if distributed.is_main_process():
        whole = evaluate(model, make_loaders(splits.val, 1000, shuffle=False))
        with open(out_path, "w") as f:
            json.dump({"ranks": records, "whole": list(whole)}, f)
    distributed.teardown()
    distributed.exit_process(0)


if __name__ == "__main__":
    main(sys.argv[1])
