"""A ReLU or GELU fused into the sparse linear layer before it (SparseLinear(activation=...), fuse_activations): the
same results and gradients as the layer followed by the activation, on every kernel and backend, in DST's dense
gradient, through densify, checkpoints and lottery tickets; found in Sequentials and in declared pairs of children
(this library's transformer layers, transformers' intermediate blocks)."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern
from sparsekern.nn import (
    FusedActivation,
    SparseLinear,
    fuse_activations,
    fused_activations,
    kernel_choice as kc,
    unfuse_activations,
)

from sk_testing import gen, random_mask

HAS_NODE = kc._dispatch.extension_loaded


def _pair(k, m, density, bias=True, dtype=torch.float32, seed=0, act="relu"):
    """An unfused layer and its fused twin (same weights)."""
    lin = nn.Linear(k, m, bias=bias).to(dtype)
    plain = SparseLinear.from_dense(lin, random_mask((m, k), density, gen(seed)))
    fused = copy.deepcopy(plain)
    fused.activation = act
    return plain, fused


def _run(module, x, g, act=None):
    xs = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(xs)
    if act:
        y = getattr(F, act)(y)
    y.backward(g)
    return [y.detach(), xs.grad, module.values.grad, None if module.bias is None else module.bias.grad]


def _same(got, want, dtype, exact=True):
    """exact: bitwise (the ReLU), else to the dtype's rounding (the node's GELU is not ATen's to the last bit)."""
    for a, b, what in zip(got, want, ("y", "x.grad", "values.grad", "bias.grad")):
        if b is None:
            assert a is None, what
        elif not exact and dtype == torch.bfloat16:
            # The gradient at the product rounded in another place (gelu' here, F.gelu's dz there), then summed
            # over up to 130 rows: to a few bf16 roundings of the tensor's scale.
            diff = (a.float() - b.float()).abs()
            assert a.shape == b.shape and (a.numel() == 0 or diff.max() <= 0.03 * (1 + b.float().abs().max())), what
        elif not exact:
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(a, b, msg=what, rtol=tol, atol=tol)
        elif dtype == torch.float64 or what != "bias.grad":
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=what)
        else:  # the bias gradient's sum may run in another order
            torch.testing.assert_close(a, b, msg=what)


@pytest.mark.parametrize("kernel", ["csr", "dense", "auto"])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("shape,bias", [((6, 20), True), ((2, 3, 20), False), ((0, 20), True), ((130, 20), True)],
                         ids=str)
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_fused_activation_matches_the_layer_then_the_activation(kernel, backend, dtype, density, shape, bias, act):
    if backend == "cpp" and not HAS_NODE:
        pytest.skip("no compiled extension")
    plain, fused = _pair(20, 12, density, bias, dtype, act=act)
    plain.kernel = fused.kernel = kernel
    x = torch.randn(shape, generator=gen(1)).to(dtype) * 2
    g = torch.randn(*shape[:-1], 12, generator=gen(2)).to(dtype)
    with sparsekern.backend(backend if backend == "reference" else None):
        want = _run(plain, x, g, act)
        got = _run(fused, x, g)
    if act == "relu":
        assert (got[0] >= 0).all()
    _same(got, want, dtype, exact=act == "relu")


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_fused_activation_keeps_non_finite_inputs_as_the_module_does(act):
    """NaN passes ReLU as NaN and its gradient is 0 where the output is not positive (NaN included), as in
    nn.ReLU's threshold_backward; GELU keeps NaN and makes Inf NaN as F.gelu does; the dense kernel's NaN routing
    still sends such a call to the sparse kernel."""
    for kernel in ("csr", "dense"):
        plain, fused = _pair(16, 8, 0.4, act=act)
        plain.kernel = fused.kernel = kernel
        x = torch.randn(5, 16, generator=gen(3))
        x[1, 3], x[2, 0] = float("nan"), float("inf")
        g = torch.randn(5, 8, generator=gen(4))
        got, want = _run(fused, x, g), _run(plain, x, g, act)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.skipif(not HAS_NODE, reason="no compiled extension")
@pytest.mark.parametrize("bias", [True, False])
def test_the_fused_node_has_exact_first_and_second_gradients(bias):
    _, layer = _pair(9, 7, 0.5, bias, torch.float64, seed=5)
    layer.kernel = "csr"
    # Inputs away from the kink at 0, where ReLU's derivative jumps and finite differences are meaningless.
    x = torch.randn(4, 9, dtype=torch.float64, generator=gen(6))
    with torch.no_grad():
        pre = F.linear(x, layer.dense_weight(), layer.bias)
    keep = (pre.abs() > 0.05).all(1)
    x = x[keep].requires_grad_(True)

    def f(x, values, *b):
        return torch.ops.sparsekern._sparse_linear_relu_node(x, values, b[0] if b else None, layer.row_ptr,
                                                             layer.col_idx, *layer.pattern.transpose())
    inputs = (x, layer.values) + ((layer.bias,) if bias else ())
    torch.autograd.gradcheck(f, inputs)
    torch.autograd.gradgradcheck(f, inputs)
    y = layer(x)
    assert y.grad_fn.name().endswith("::LinearReluNode>")  # the fused node, no ReLU node after it


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(24, 32), nn.ReLU(inplace=True), nn.Linear(32, 32), nn.ReLU(),
                         nn.Sequential(nn.Linear(32, 16), nn.ReLU()), nn.Linear(16, 5), nn.ReLU(), nn.Tanh())


def _sparse_mlp(fuse, seed=0):
    return sparsekern.sparsify(_mlp(seed), 0.4, "uniform", init="dense", generator=gen(seed),
                               fuse_activations=fuse)


def test_fuse_activations_fuses_each_relu_after_a_sparse_linear_and_computes_the_same():
    plain, fused = _sparse_mlp(False), _sparse_mlp(True)
    assert [type(m).__name__ for m in fused] == ["Flatten", "SparseLinear", "FusedActivation", "SparseLinear",
                                                 "FusedActivation", "Sequential", "SparseLinear", "FusedActivation",
                                                 "Tanh"]
    assert isinstance(fused[5][1], FusedActivation) and fused[5][0].activation == "relu"
    assert fuse_activations(fused) == []  # nothing left to fuse
    assert "activation='relu'" in repr(fused[1]) and "ReLU(inplace=True)" in repr(fused[2])
    x, y = torch.randn(8, 2, 12, generator=gen(7)), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    for model in (plain, fused):
        F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(fused(x), plain(x))
    for (name, a), (_, b) in zip(plain.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    assert fused.state_dict().keys() == plain.state_dict().keys()


def test_fuse_activations_leaves_what_it_cannot_fuse():
    shared = SparseLinear(8, 8, density=0.5)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.GELU(), nn.Linear(8, 8), nn.ReLU(), nn.ReLU())
    assert fuse_activations(model) == []  # a layer used twice; a dense layer; a ReLU after a ReLU
    tanh = nn.Sequential(SparseLinear(8, 8, density=0.5), nn.GELU(approximate="tanh"), nn.SiLU())
    assert fuse_activations(tanh) == []  # GELU's tanh form is not the kernel's
    lone = nn.Sequential(SparseLinear(8, 8, density=0.5), nn.ReLU())
    assert fuse_activations(lone) == ["0"] and fuse_activations(lone[0]) == []
    with pytest.raises(TypeError, match="fuse_activations: model must be an nn.Module"):
        fuse_activations("model")
    with pytest.raises(TypeError, match="sparsify: fuse_activations must be a bool"):
        sparsekern.sparsify(_mlp(), 0.5, fuse_activations="yes")
    with pytest.raises(ValueError, match="SparseLinear: activation must be one of"):
        SparseLinear(4, 4, activation="silu")
    layer = SparseLinear(4, 4)
    with pytest.raises(ValueError, match="activation must be one of"):
        layer.activation = "tanh"
    assert layer.activation is None


def test_unfuse_and_densify_give_the_model_back():
    original = _mlp(3)
    fused = sparsekern.sparsify(copy.deepcopy(original), 0.4, "uniform", init="dense", generator=gen(3),
                                fuse_activations=True)
    relu = fused[2].original
    twin = copy.deepcopy(fused)
    assert unfuse_activations(twin) == ["1", "3", "6", "5.0"]
    assert [type(m).__name__ for m in twin] == ["Flatten", "SparseLinear", "ReLU", "SparseLinear", "ReLU", "Sequential",
                                                "SparseLinear", "ReLU", "Tanh"]
    assert twin[1].activation is None and type(twin[5][1]) is nn.ReLU
    assert fused[2].original is relu and relu.inplace
    dense = sparsekern.densify(copy.deepcopy(fused))
    assert [type(m) for m in dense] == [type(m) for m in original]
    x = torch.randn(4, 24, generator=gen(8))
    torch.testing.assert_close(dense(x), fused(x))
    # A fused layer alone: its dense equivalent is the linear and the ReLU.
    alone = fused[3].to_dense()
    assert isinstance(alone, nn.Sequential) and isinstance(alone[1], nn.ReLU)
    h = torch.randn(4, 32, generator=gen(9))
    torch.testing.assert_close(alone(h), fused[3](h))


def test_fused_models_checkpoints_load_either_way():
    fused, plain = _sparse_mlp(True, seed=1), _sparse_mlp(False, seed=2)
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    plain.load_state_dict(torch.load(buf))
    x = torch.randn(3, 24, generator=gen(10))
    torch.testing.assert_close(plain(x), fused(x))
    whole = io.BytesIO()
    torch.save(fused, whole)
    whole.seek(0)
    again = torch.load(whole, weights_only=False)
    torch.testing.assert_close(again(x), fused(x))
    assert again[1].activation == "relu"


def test_rigl_dense_gradient_of_a_fused_layer_is_taken_before_its_relu():
    """DST's dense gradient needs the gradient at the product; a fused layer's output is after its ReLU."""
    grads = []
    for fuse in (False, True):
        model = _sparse_mlp(fuse, seed=4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        algo = sparsekern.dst.RigL(model, optimizer, total_steps=10, delta_t=1)
        x, y = torch.randn(6, 24, generator=gen(11)), torch.tensor([0, 1, 2, 3, 4, 0])
        F.cross_entropy(model(x), y).backward()
        grads.append({name: algo.layer_dense_grad(name) for name in algo.layers})
        optimizer.step()
        assert algo.step() is True
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_a_lottery_ticket_of_a_fused_model_is_the_plain_model():
    from sparsekern.lottery import to_dense_model
    fused = _sparse_mlp(True, seed=5)
    dense = to_dense_model(fused)
    assert [type(m) for m in dense] == [type(m) for m in _mlp()]
    x = torch.randn(3, 24, generator=gen(12))
    torch.testing.assert_close(dense(x), fused(x))


def _vit(seed=0):
    torch.manual_seed(seed)
    from sparsekern.models import VisionTransformer
    return VisionTransformer(num_classes=5, image_size=16, patch_size=8, hidden=32, layers=2, heads=2, mlp=64).train()


def test_transformer_layers_declare_their_gelu_and_fuse_it():
    """EncoderLayer declares (fc1, act): each feed-forward's GELU goes into its fc1; the model computes the same
    (to float32 rounding), its gradients too, and unfuse / densify give the GELU modules back."""
    plain = sparsekern.sparsify(_vit(), 0.3, "uniform", init="dense", generator=gen(13))
    fused = copy.deepcopy(plain)
    assert fuse_activations(fused) == ["layers.0.fc1", "layers.1.fc1"]
    assert fused.layers[0].fc1.activation == "gelu" and isinstance(fused.layers[0].act, FusedActivation)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    x, y = torch.randn(3, 3, 16, 16, generator=gen(14)), torch.tensor([0, 1, 4])
    for model in (plain, fused):
        F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(fused(x), plain(x))
    for (name, a), (_, b) in zip(plain.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name, rtol=1e-4, atol=1e-6)
    twin = copy.deepcopy(fused)
    assert unfuse_activations(twin) == ["layers.0.fc1", "layers.1.fc1"]
    assert type(twin.layers[1].act) is nn.GELU and twin.layers[1].fc1.activation is None
    dense = sparsekern.densify(copy.deepcopy(fused))
    assert type(dense.layers[0].act) is nn.GELU and type(dense.layers[0].fc1) is nn.Linear
    torch.testing.assert_close(dense(x), fused(x))
    alone = fused.layers[0].fc1.to_dense()
    assert isinstance(alone, nn.Sequential) and type(alone[1]) is nn.GELU
    # sparsify(fuse_activations=True) fuses them too.
    again = sparsekern.sparsify(_vit(), 0.3, "uniform", init="dense", generator=gen(13), fuse_activations=True)
    assert [n for n, m in again.named_modules() if isinstance(m, FusedActivation)] == ["layers.0.act", "layers.1.act"]


def test_rigl_dense_gradient_of_a_fused_gelu_layer_is_taken_before_its_gelu():
    """A GELU's backward needs the product, not the output: the dense gradient recomputes it from the input."""
    grads = []
    for fuse in (False, True):
        model = sparsekern.sparsify(_vit(1), 0.3, "uniform", init="dense", generator=gen(15), fuse_activations=fuse)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        algo = sparsekern.dst.RigL(model, optimizer, total_steps=10, delta_t=1)
        x, y = torch.randn(4, 3, 16, 16, generator=gen(16)), torch.tensor([0, 1, 2, 3])
        F.cross_entropy(model(x), y).backward()
        grads.append({name: algo.layer_dense_grad(name) for name in algo.layers})
        optimizer.step()
        assert algo.step() is True
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="a GELU layer needs its input x"):
        _pair(4, 4, 0.5, act="gelu")[1].pre_activation_grad(torch.ones(2, 4), torch.ones(2, 4))


def test_convnext_blocks_fuse_their_gelu():
    torch.manual_seed(2)
    from sparsekern.models import ConvNeXt
    plain = sparsekern.sparsify(ConvNeXt(10, depths=(1, 2), dims=(8, 16)), 0.5, "uniform", init="dense",
                                generator=gen(20))
    fused = copy.deepcopy(plain)
    assert fuse_activations(fused) == ["stages.0.0.pwconv1", "stages.1.0.pwconv1", "stages.1.1.pwconv1"]
    x = torch.randn(2, 3, 32, 32, generator=gen(21))
    torch.testing.assert_close(fused(x), plain(x))
    fused(x).sum().backward()
    plain(x).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name, rtol=1e-4, atol=1e-6)


def test_transformers_intermediate_blocks_fuse_their_gelu():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install '.[models]'")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    sparse = sparsekern.sparsify(copy.deepcopy(model), 0.3, "uniform", init="dense", generator=gen(17))
    fused = copy.deepcopy(sparse)
    assert fuse_activations(fused) == [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    ids = torch.randint(0, 50, (2, 9), generator=gen(18))
    torch.testing.assert_close(fused(input_ids=ids).logits, sparse(input_ids=ids).logits)
    convnext = transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
        num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3))
    sparse = sparsekern.sparsify(convnext, 0.5, "uniform", init="dense", generator=gen(22))
    fused = copy.deepcopy(sparse)
    assert fuse_activations(fused) == ["convnext.encoder.stages.0.layers.0.pwconv1",
                                       "convnext.encoder.stages.1.layers.0.pwconv1"]
    pixels = torch.randn(2, 3, 32, 32, generator=gen(23))
    torch.testing.assert_close(fused(pixel_values=pixels).logits, sparse(pixel_values=pixels).logits)
    # A GELU of another form (tanh) stays where it is.
    config.hidden_act = "gelu_new"
    other = sparsekern.sparsify(transformers.BertForSequenceClassification(config), 0.3, "uniform", init="dense",
                                generator=gen(19))
    assert fuse_activations(other) == []


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_a_compiled_fused_layer_computes_the_same(act):
    """Under torch.compile the layer runs the op (its fake kernel traces) and then the activation's function."""
    plain, fused = _pair(16, 8, 0.5, act=act, seed=6)
    compiled = torch.compile(fused, backend="eager", fullgraph=True)
    x, g = torch.randn(5, 16, generator=gen(24)), torch.randn(5, 8, generator=gen(25))
    got, want = _run(compiled, x, g), _run(plain, x, g, act)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_fused_activations_names_each_fused_layer_with_the_module_it_fused():
    model = _mlp()
    acts = {name: m for name, m in model.named_modules() if isinstance(m, (nn.ReLU, nn.Tanh))}
    sparse = sparsekern.sparsify(model, 0.4, "uniform", init="dense", generator=gen(0))
    assert fused_activations(sparse) == {}
    fused = fuse_activations(sparse)
    got = fused_activations(sparse)
    assert sorted(got) == sorted(fused) == ["1", "3", "5.0", "6"]
    assert [got[n] for n in ("1", "3", "5.0", "6")] == [acts["2"], acts["4"], acts["5.1"], acts["7"]]  # themselves
    unfuse_activations(sparse)
    assert fused_activations(sparse) == {}
    with pytest.raises(TypeError, match="fused_activations: model must be an nn.Module"):
        fused_activations("model")
