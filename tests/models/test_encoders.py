"""The BERT-style encoder and the ViT: published parameter counts, shapes, argument checks, sparse training."""
import pytest
import torch
import torch.nn.functional as F

import sparsekern
from sparsekern.models import BertEncoder, VisionTransformer, get_model
from sparsekern.nn import SparseWeightMixin


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_published_parameter_counts():
    assert n_params(get_model("vit-s16", 1000)) == 22_050_664  # timm vit_small_patch16_224
    # BERT-Small (L=4, H=512) with a 2-way classifier: BertForSequenceClassification's count
    assert n_params(get_model("bert-small", 2)) == 28_764_674


def test_forward_shapes_and_checks():
    vit = VisionTransformer(5, 3, 32, patch_size=8, hidden=16, layers=2, heads=2, mlp=32)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="32x32"):
        vit(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionTransformer(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="multiple of heads"):
        BertEncoder(hidden=30, heads=4)
    bert = BertEncoder(3, vocab_size=20, hidden=16, layers=2, heads=2, ffn=32, max_len=8).eval()
    ids = torch.randint(0, 20, (2, 8))
    assert bert(ids).shape == (2, 3)
    with pytest.raises(ValueError, match="at most 8 tokens"):
        bert(torch.randint(0, 20, (2, 9)))
    # masked positions do not change the output; the unmasked ones do
    mask = torch.tensor([[1] * 5 + [0] * 3] * 2)
    other = ids.clone()
    other[:, 5:] = (other[:, 5:] + 1) % 20
    torch.testing.assert_close(bert(ids, mask), bert(other, mask))
    assert not torch.allclose(bert(ids), bert(other))


@pytest.mark.parametrize("build, x", [
    (lambda: VisionTransformer(4, 3, 16, patch_size=8, hidden=16, layers=1, heads=2, mlp=32),
     torch.randn(3, 3, 16, 16)),
    (lambda: BertEncoder(4, vocab_size=20, hidden=16, layers=1, heads=2, ffn=32, max_len=8, dropout=0.0),
     torch.randint(0, 20, (3, 8))),
])
def test_sparsify_swaps_every_projection_and_trains(build, x):
    torch.manual_seed(0)
    dense = build()
    model = sparsekern.sparsify(dense, 0.5, "erk", init="dense", inplace=False,
                                generator=torch.Generator().manual_seed(0))
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert not linears and sum(isinstance(m, SparseWeightMixin) for m in model.modules()) == 8
    F.cross_entropy(model(x), torch.arange(3)).backward()
    grads = [m.values.grad for m in model.modules() if isinstance(m, SparseWeightMixin)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
