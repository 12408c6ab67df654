"""Bad arguments to sparsify / densities, in the style of OpInfo error inputs: each case is a call, the
error type and a substring naming the argument; a rejected call leaves the model untouched."""
import re

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.sparsity import densities


def _mlp():
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


# (id, call(model), error type, substring)
CASES = [
    ("bsr-block-0", lambda m: sparsekern.sparsify(m, 0.5, format="bsr", block=0), ValueError,
     "sparsify: block must be a positive int, got 0"),
    ("bsr-block-negative", lambda m: sparsekern.sparsify(m, 0.5, format="bsr", block=-1), ValueError,
     "sparsify: block must be a positive int, got -1"),
    ("bsr-block-float", lambda m: sparsekern.sparsify(m, 0.5, format="bsr", block=16.0), ValueError,
     "block must be a positive int, got 16.0"),
    ("format", lambda m: sparsekern.sparsify(m, 0.5, format="coo"), ValueError,
     "sparsify: format must be one of ('csr', 'bsr'), got 'coo'"),
    ("density-string", lambda m: sparsekern.sparsify(m, "0.5"),
     ValueError, "sparsify: density must lie in (0, 1], got '0.5'"),
    ("density-zero", lambda m: sparsekern.sparsify(m, 0.0), ValueError, "density must lie in (0, 1], got 0.0"),
    ("density-negative", lambda m: sparsekern.sparsify(m, -0.1), ValueError, "density must lie in (0, 1], got -0.1"),
    ("density-above-one", lambda m: sparsekern.sparsify(m, 1.5), ValueError, "density must lie in (0, 1], got 1.5"),
    ("density-nan", lambda m: sparsekern.sparsify(m, float("nan")), ValueError, "density must lie in (0, 1], got nan"),
    ("density-bool", lambda m: sparsekern.sparsify(m, True), ValueError, "density must lie in (0, 1], got True"),
    ("distribution", lambda m: sparsekern.sparsify(m, 0.5, distribution="erdos"), ValueError,
     "sparsify: distribution must be one of ('uniform', 'er', 'erk'), got 'erdos'"),
    ("init", lambda m: sparsekern.sparsify(m, 0.5, init="kaiming"), ValueError,
     "sparsify: init must be one of ('sparse', 'dense', 'layer'), got 'kaiming'"),
    ("model-not-a-module", lambda m: sparsekern.sparsify({"w": torch.zeros(2, 2)}, 0.5), TypeError,
     "sparsify: model must be an nn.Module, got dict"),
    ("nothing-to-sparsify", lambda m: sparsekern.sparsify(nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4)), 0.5),
     ValueError, "sparsify: the model has no nn.Linear, nn.Conv2d (groups=1) or transformers Conv1D to sparsify"),
    ("all-layers-dense", lambda m: sparsekern.sparsify(m, 0.5, dense_layers=["0", "2"]), ValueError,
     "to sparsify outside dense_layers ['0', '2']"),
    ("unknown-dense-layer", lambda m: sparsekern.sparsify(m, 0.5, dense_layers=["fc"]), ValueError,
     "sparsify: dense_layers names no module of the model: ['fc']"),
    ("generator", lambda m: sparsekern.sparsify(m, 0.5, generator=0), TypeError,
     "sparsify: generator must be a torch.Generator or None, got int"),
    ("inplace-not-bool", lambda m: sparsekern.sparsify(m, 0.5, inplace="no"), TypeError,
     "sparsify: inplace must be a bool, got str"),
    ("density-keeps-no-weight", lambda m: sparsekern.sparsify(m, 1e-12), ValueError,
     "sparsify: density 1e-12 keeps no weight in layers ['0', '2']"),
    ("already-sparse", lambda m: sparsekern.sparsify(sparsekern.sparsify(_mlp(), 0.5), 0.5), ValueError,
     "sparsify: the model is already sparse"),
    ("meta-device", lambda m: sparsekern.sparsify(_mlp().to("meta"), 0.5), ValueError,
     "sparsify: layer '0' has its weight on the meta device"),
    ("lazy", lambda m: sparsekern.sparsify(nn.Sequential(nn.LazyLinear(8), nn.ReLU()), 0.5), ValueError,
     "sparsify: layer '0' has an uninitialized (lazy) weight"),
    ("densities-distribution", lambda m: densities(m, 0.5, "normal"), ValueError,
     "densities: distribution must be one of"),
    ("densities-empty", lambda m: densities([], 0.5), ValueError, "densities: no layers given"),
    ("densities-shape", lambda m: densities([(4,)], 0.5), ValueError, "every shape must have >= 2 positive int dims"),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_arguments_raise_and_leave_the_model_dense(call, error, match):
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=re.escape(match)):
        call(model)
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_dense_layers_none_means_none():
    model = sparsekern.sparsify(_mlp(), 0.5, dense_layers=None)
    assert all(isinstance(model[i], sparsekern.nn.SparseLinear) for i in (0, 2))
