"""Compressed training equals a masked-dense reference run: dense weights times a mask, gradients and
weights masked, the same drop/grow rules written over dense masks (the obviously right version)."""
import math

import pytest
import torch
import torch.nn.functional as F
from dst_helpers import tiny_data, tiny_mlp, train_step

import sparsekern

STEPS, DELTA_T, TOTAL = 240, 20, 300
DTYPE = torch.float64  # both runs do the same math; float64 keeps near-ties from flipping a selection


class MaskedDenseMLP:
    """The oracle: dense weights, bool masks, everything masked by hand."""

    def __init__(self, sparse_model, optimizer_factory):
        layers = [m for m in sparse_model if isinstance(m, sparsekern.nn.SparseLinear)]
        self.weights = [m.dense_weight().detach().clone().requires_grad_() for m in layers]
        self.biases = [m.bias.detach().clone().requires_grad_() for m in layers]
        self.masks = [m.mask().clone() for m in layers]
        self.optimizer = optimizer_factory(self.weights + self.biases)
        self.effective = []

    def forward(self, x):
        self.effective = []
        for i, (w, b, mask) in enumerate(zip(self.weights, self.biases, self.masks)):
            w_eff = w * mask  # masks the gradient too: d(w * mask)/dw = mask
            w_eff.retain_grad()  # its gradient is the dense gradient RigL grows by
            self.effective.append(w_eff)
            x = x @ w_eff.t() + b
            if i < len(self.weights) - 1:
                x = F.relu(x)
        return x

    def step(self, batch):
        x, y = batch
        loss = F.cross_entropy(self.forward(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for w, mask in zip(self.weights, self.masks):
                w.mul_(mask)
        return loss.item()

    @torch.no_grad()
    def update(self, t, algorithm, generator, reinit_when_same, drop_fraction=0.3, end_step=int(0.75 * TOTAL)):
        fraction = drop_fraction / 2 * (1 + math.cos(math.pi * t / end_step))
        for i, (w, mask) in enumerate(zip(self.weights, self.masks)):
            flat_mask, flat_w = mask.reshape(-1), w.reshape(-1)
            n_drop = math.floor(int(flat_mask.sum()) * fraction)
            if n_drop == 0:
                continue
            active = flat_mask.nonzero().squeeze(1)
            dropped = active[torch.sort(flat_w[active].abs(), stable=True).indices[:n_drop]]
            kept = flat_mask.clone()
            kept[dropped] = False
            if algorithm == "SET":
                scores = torch.rand(flat_mask.numel(), generator=generator).to(DTYPE)
            else:
                scores = self.effective[i].grad.reshape(-1).abs()
            candidates = (~kept).nonzero().squeeze(1)
            grown = candidates[torch.sort(-scores[candidates], stable=True).indices[:n_drop]]
            new_mask = kept.clone()
            new_mask[grown] = True
            # Dropped and grown weights are 0, with zero optimizer state; one dropped and grown back keeps
            # its own unless reinit_when_same.
            keep = kept if reinit_when_same else new_mask & flat_mask
            flat_w.mul_(keep)
            for value in self.optimizer.state[w].values():
                if value.dim():
                    value.reshape(-1).mul_(keep)
            mask.copy_(new_mask.reshape(mask.shape))


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2),
}


@pytest.mark.parametrize("reinit_when_same", [False, True])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("algorithm", ["Static", "SET", "RigL"])
def test_compressed_training_matches_masked_dense(algorithm, optimizer_name, reinit_when_same):
    model = tiny_mlp(seed=3, density=0.3, dtype=DTYPE)
    oracle = MaskedDenseMLP(model, OPTIMIZERS[optimizer_name])
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    algo = getattr(sparsekern.dst, algorithm)(model, optimizer, total_steps=TOTAL, delta_t=DELTA_T,
                                             generator=torch.Generator().manual_seed(7),
                                             reinit_when_same=reinit_when_same)
    oracle_generator = torch.Generator().manual_seed(7)
    batches = tiny_data(dtype=DTYPE)
    layers = list(algo.layers.values())
    for step in range(STEPS):
        batch = batches[step % len(batches)]
        loss, _ = train_step(model, optimizer, algo, batch)
        oracle_loss = oracle.step(batch)
        assert loss == pytest.approx(oracle_loss, rel=1e-9, abs=1e-12), f"step {step + 1}"
        if algorithm != "Static" and algo.is_update_step(step + 1):
            oracle.update(step + 1, algorithm, oracle_generator, reinit_when_same)
        for layer, mask in zip(layers, oracle.masks):
            assert torch.equal(layer.mask(), mask), f"step {step + 1}: patterns differ"
    for layer, w in zip(layers, oracle.weights):
        torch.testing.assert_close(layer.dense_weight().detach(), w.detach(), rtol=1e-9, atol=1e-12)
    if algorithm != "Static":
        assert sum(r["mask_distance"] for rec in algo.history for r in rec["layers"].values()) > 0
        if algorithm == "RigL":  # the case that tells the two apart happens
            assert sum(r["regrown"] for rec in algo.history for r in rec["layers"].values()) > 0
