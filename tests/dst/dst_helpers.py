"""Helpers of the DST tests: a tiny MLP, its data, one training step."""
import torch
from torch import nn

import sparsekern


def tiny_mlp(seed=0, density=0.3, sizes=(16, 32, 32, 4), dtype=torch.float32, sparse=True):
    torch.manual_seed(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).to(dtype)
    if sparse:
        sparsekern.sparsify(model, density, distribution="uniform", init="dense",
                            generator=torch.Generator().manual_seed(seed))
    return model


def tiny_data(n_batches=8, batch=32, n_in=16, n_out=4, seed=123, dtype=torch.float32):
    """Fixed batches labelled by a random linear teacher: learnable, deterministic."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n_in, n_out, generator=g, dtype=dtype)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(batch, n_in, generator=g, dtype=dtype)
        batches.append((x, (x @ teacher).argmax(1)))
    return batches


def train_step(model, optimizer, algo, batch):
    x, y = batch
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    changed = algo.step() if algo is not None else False
    return loss.item(), changed
