"""sparsify, training, RigL and checkpoints on real Hugging Face models built from tiny configs (no
weights, offline): code written for nn.Linear / nn.Conv2d must keep working with the sparse modules."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern
from sparsekern.models import BertEncoder, VisionTransformer
from sparsekern.nn import SparseWeightMixin, kernel_choice
from sparsekern.sparsity import sparsifiable_layers

transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[models]'")

BATCH, CLASSES = 4, 3


def _resnet():
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1],
                                       layer_type="bottleneck", num_labels=CLASSES)
    return transformers.ResNetForImageClassification(config), {"pixel_values": (BATCH, 3, 32, 32)}


def _convnext():
    config = transformers.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                         num_labels=CLASSES)
    return transformers.ConvNextForImageClassification(config), {"pixel_values": (BATCH, 3, 32, 32)}


def _vit():
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, num_labels=CLASSES)
    return transformers.ViTForImageClassification(config), {"pixel_values": (BATCH, 3, 32, 32)}


def _bert_config():
    return transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, num_labels=CLASSES)


def _bert():
    return transformers.BertModel(_bert_config()), {"input_ids": (BATCH, 12)}


def _bert_classifier():
    return transformers.BertForSequenceClassification(_bert_config()), {"input_ids": (BATCH, 12)}


def _gpt2():
    # GPT-2's attention and MLP projections are transformers' Conv1D (the weight stored transposed); its head
    # shares the token embedding's weight, so it stays dense (DENSE_LAYERS)
    config = transformers.GPT2Config(vocab_size=60, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    return transformers.GPT2LMHeadModel(config), {"input_ids": (BATCH, 12), "labels": (BATCH, 12)}


MODELS = {"resnet": _resnet, "convnext": _convnext, "vit": _vit, "bert": _bert, "bert-classifier": _bert_classifier,
          "gpt2": _gpt2}
DENSE_LAYERS = {"gpt2": ("lm_head",)}


def _inputs(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randint(0, 60, shape, generator=g) if name in ("input_ids", "labels")
            else torch.randn(shape, generator=g) for name, shape in spec.items()}


def _loss(model, inputs):
    out = model(**inputs)
    if getattr(out, "loss", None) is not None:  # a language model given its labels
        return out.loss
    if hasattr(out, "logits"):
        return F.cross_entropy(out.logits, torch.arange(BATCH) % CLASSES)
    # BertModel: regress both outputs (hidden states and pooler) onto fixed targets
    g = torch.Generator().manual_seed(1)
    return sum(F.mse_loss(t, torch.randn(t.shape, generator=g)) for t in (out.last_hidden_state, out.pooler_output))


def _build(name, seed=0, density=0.1):
    torch.manual_seed(seed)
    model, spec = MODELS[name]()
    dense_layers = DENSE_LAYERS.get(name, ())
    n_layers = len(sparsifiable_layers(model, dense_layers))
    sparsekern.sparsify(model, density, "erk", generator=torch.Generator().manual_seed(seed), dense_layers=dense_layers)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseWeightMixin)}
    assert len(layers) == n_layers > 0
    return model, spec, layers


@pytest.mark.parametrize("name", MODELS)
def test_training_step(name):
    model, spec, layers = _build(name)
    inputs = _inputs(spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(6):
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(model.train(), inputs)
        loss.backward()
        if step == 0:
            for layer_name, m in layers.items():
                g = m.values.grad
                assert g is not None and g.shape == m.values.shape, layer_name
                assert torch.isfinite(g).all() and g.abs().sum() > 0, layer_name
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    total = sum(m.nnz for m in layers.values())
    numel = sum(m.weight.numel() for m in layers.values())  # the read-only dense view
    assert total / numel == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("kernel", [None, "csr", "gemm", "dense"], ids=["measured", "csr", "gemm", "dense"])
@pytest.mark.parametrize("name", MODELS)
def test_inference_mode_and_a_non_finite_loss(name, kernel):
    """Whichever kernels run the layers: eval under inference mode (no autograd kernels at all) gives no_grad's
    outputs, and a diverging step (an Inf loss, so Inf and NaN gradients) gives gradients, not an error."""
    model, spec, layers = _build(name)
    inputs = _inputs(spec)
    kernel_choice.set_kernel(kernel)
    try:
        model.eval()
        with torch.no_grad():
            want = model(**inputs)
        with torch.inference_mode():
            got = model(**inputs)
        for key in want.keys():
            torch.testing.assert_close(got[key], want[key])
        (_loss(model.train(), inputs) * float("inf")).backward()
    finally:
        kernel_choice.set_kernel(None)
    for layer_name, m in layers.items():
        assert m.values.grad is not None and m.values.grad.shape == m.values.shape, layer_name


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("name", ["vit", "bert", "gpt2"])
def test_gradient_checkpointing_gives_the_plain_gradients(name, reentrant):
    """transformers' activation checkpointing recomputes each block's forward in the backward (tests/nn/
    test_checkpointing.py: from a layer's first call, kernels measured inside)."""
    model, spec, _ = _build(name)
    plain = copy.deepcopy(model)
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    inputs = _inputs(spec)
    _loss(model.train(), inputs).backward()
    _loss(plain.train(), inputs).backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", ["resnet", "bert"])
def test_explain_takes_a_batch_of_keyword_inputs(name):
    model, spec, layers = _build(name)
    rows = sparsekern.explain(model, _inputs(spec), print_table=False)
    assert sorted(r["name"] for r in rows) == sorted(layers)  # (in the order the forward called them)
    assert all(r["kernel"] in ("csr", "gemm", "dense") for r in rows)


@pytest.mark.parametrize("name", MODELS)
def test_rigl_update_then_checkpoint_round_trip(name, tmp_path):
    model, spec, layers = _build(name)
    inputs = _inputs(spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    algo = sparsekern.dst.RigL(model, optimizer, total_steps=8, delta_t=2, drop_fraction=0.5)
    nnz = {n: m.nnz for n, m in layers.items()}
    masks = {n: m.mask().clone() for n, m in layers.items()}
    changed = False
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        _loss(model.train(), inputs).backward()
        optimizer.step()
        changed |= algo.step()
    assert changed and len(algo.history) == 1
    assert {n: m.nnz for n, m in layers.items()} == nnz
    assert any(not torch.equal(m.mask(), masks[n]) for n, m in layers.items())
    # training goes on after the update (the optimizer holds the remapped values)
    optimizer.zero_grad(set_to_none=True)
    _loss(model, inputs).backward()
    assert all(torch.isfinite(m.values.grad).all() for m in layers.values())
    optimizer.step()

    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh, _, fresh_layers = _build(name, seed=1, density=0.2)  # other pattern, other nnz
    fresh.load_state_dict(torch.load(path))
    for n, m in layers.items():
        assert torch.equal(fresh_layers[n].mask(), m.mask()) and torch.equal(fresh_layers[n].values, m.values)
    model.eval(), fresh.eval()
    with torch.no_grad():
        expected, got = model(**inputs), fresh(**inputs)
    for key in expected.keys():
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_vit_reads_the_projection_weight():
    # ViTModel.forward casts the pixels to projection.weight.dtype: the sparse conv must answer it
    model, spec, _ = _build("vit")
    assert isinstance(model.vit.embeddings.patch_embeddings.projection, SparseWeightMixin)
    assert model.vit.embeddings.patch_embeddings.projection.weight.dtype == torch.float32
    model.double()
    out = model(pixel_values=_inputs(spec)["pixel_values"])  # float32 pixels, cast by the model
    assert out.logits.dtype == torch.float64


def test_convnext_keeps_depthwise_convs_dense():
    model, _, _ = _build("convnext")
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(not isinstance(m, SparseWeightMixin) for m in depthwise)


# -- our encoders compute what the Hugging Face definitions compute ---------------------------------

_BERT_NAMES = [(r"^bert\.embeddings\.word_embeddings\.", "word."),
               (r"^bert\.embeddings\.position_embeddings\.", "position."),
               (r"^bert\.embeddings\.token_type_embeddings\.", "segment."),
               (r"^bert\.embeddings\.LayerNorm\.", "norm."),
               (r"^bert\.encoder\.layer\.(\d+)\.", r"layers.\1."), (r"attention\.self\.", "attn."),
               (r"attention\.output\.dense\.", "attn.out."), (r"attention\.output\.LayerNorm\.", "norm1."),
               (r"intermediate\.dense\.", "fc1."), (r"output\.dense\.", "fc2."), (r"output\.LayerNorm\.", "norm2."),
               (r"^bert\.pooler\.dense\.", "pooler.")]
# transformers 4.x and 5.x names of the ViT layers
_VIT_NAMES = [(r"^vit\.embeddings\.cls_token$", "cls_token"), (r"^vit\.embeddings\.position_embeddings$", "position"),
              (r"^vit\.embeddings\.patch_embeddings\.projection\.", "patch."),
              (r"^vit\.(?:encoder\.layer|layers)\.(\d+)\.", r"layers.\1."),
              (r"attention\.(?:attention\.query|q_proj)\.", "attn.query."),
              (r"attention\.(?:attention\.key|k_proj)\.", "attn.key."),
              (r"attention\.(?:attention\.value|v_proj)\.", "attn.value."),
              (r"attention\.(?:output\.dense|o_proj)\.", "attn.out."), (r"layernorm_before\.", "norm1."),
              (r"layernorm_after\.", "norm2."), (r"(?:intermediate\.dense|mlp\.fc1)\.", "fc1."),
              (r"(?:output\.dense|mlp\.fc2)\.", "fc2."), (r"^vit\.layernorm\.", "norm."), (r"^classifier\.", "head.")]


def _renamed(state, rules):
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def test_bert_encoder_matches_hf_bert():
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(_bert_config()).eval()
    ours = BertEncoder(CLASSES, vocab_size=60, hidden=32, layers=2, heads=2, ffn=64, max_len=16).eval()
    ours.load_state_dict(_renamed(hf.state_dict(), _BERT_NAMES))
    ids = _inputs({"input_ids": (BATCH, 12)})["input_ids"]
    mask = (torch.arange(12) < torch.tensor([[12], [9], [5], [12]])).long()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask), hf(input_ids=ids, attention_mask=mask).logits)


def test_vision_transformer_matches_hf_vit():
    torch.manual_seed(0)
    hf = _vit()[0].eval()
    ours = VisionTransformer(CLASSES, 3, 32, patch_size=8, hidden=32, layers=2, heads=2, mlp=64,
                             eps=hf.config.layer_norm_eps).eval()
    ours.load_state_dict(_renamed(hf.state_dict(), _VIT_NAMES))
    x = _inputs({"pixel_values": (BATCH, 3, 32, 32)})["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits)


@pytest.mark.parametrize("name", MODELS)
def test_densify_gives_back_plain_modules_with_the_same_outputs(name):
    model, spec, layers = _build(name)
    inputs = _inputs(spec)
    model.eval()
    with torch.no_grad():
        expected = model(**inputs)
    dense = sparsekern.densify(model, inplace=False)
    assert not any(isinstance(m, SparseWeightMixin) for m in dense.modules())
    assert len(sparsifiable_layers(dense, DENSE_LAYERS.get(name, ()))) == len(layers)
    with torch.no_grad():
        got = dense(**inputs)
    for key in expected.keys():
        torch.testing.assert_close(got[key], expected[key])


def test_gpt2_conv1d_projections_become_sparse_linears_and_come_back():
    """transformers' Conv1D computes x @ W + b with W stored (in, out): sparsify takes it as the nn.Linear of W^T
    (masks, ERK densities and the sparse layer's weight in (out, in)), and densify gives back Conv1D modules
    whose state dict loads into the original architecture, with the same outputs."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model, spec = _gpt2()
    original = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert len(original) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block
    reference = copy.deepcopy(model).eval()
    sparsekern.sparsify(model, 0.1, "erk", init="dense", dense_layers=["lm_head"],
                        generator=torch.Generator().manual_seed(0))
    modules = dict(model.named_modules())
    for name, conv in original.items():
        sparse = modules[name]
        assert isinstance(sparse, sparsekern.nn.SparseLinear)
        assert (sparse.out_features, sparse.in_features) == (conv.nf, conv.weight.shape[0])
        # the kept weights are the Conv1D's own, at the mask's (out, in) positions
        torch.testing.assert_close(sparse.dense_weight().detach(), conv.weight.detach().t() * sparse.mask(),
                                   rtol=0, atol=0)
        with torch.no_grad():  # the reference computes with the same weights masked
            dict(reference.named_modules())[name].weight.mul_(sparse.mask().t())
    inputs = _inputs(spec)
    model.eval()
    with torch.no_grad():
        expected, got = reference(**inputs), model(**inputs)
    torch.testing.assert_close(got.logits, expected.logits)
    dense = sparsekern.densify(model, inplace=False)
    assert all(isinstance(dict(dense.named_modules())[n], Conv1D) for n in original)
    fresh = transformers.GPT2LMHeadModel(dense.config).eval()
    fresh.load_state_dict(dense.state_dict())  # strict: the names and (in, out) shapes of the original
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, got.logits)


def test_gpt2_magnitude_pruning_reads_conv1d_weights_as_out_by_in():
    """Pruning masks of a dense GPT-2 are in (out, in) and keep the Conv1D weights of largest magnitude."""
    from sparsekern.lottery import apply_masks, layer_weights, magnitude_prune

    torch.manual_seed(0)
    model, _ = _gpt2()
    weights = layer_weights(model, ignore=["lm_head"])
    conv = dict(model.named_modules())["transformer.h.0.mlp.c_fc"]
    assert weights["transformer.h.0.mlp.c_fc"].shape == (conv.nf, conv.weight.shape[0])
    masks = magnitude_prune(model, 0.3, ignore=["lm_head"])
    sparse = apply_masks(model, masks)
    layer = dict(sparse.named_modules())["transformer.h.0.mlp.c_fc"]
    kept = conv.weight.detach().t().abs()[layer.mask()]
    dropped = conv.weight.detach().t().abs()[~layer.mask()]
    assert layer.nnz > 0 and float(kept.min()) >= float(dropped.max())


def test_a_conv1d_mask_must_be_out_by_in():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(6, 4)  # nf = 6 outputs, nx = 4 inputs: weight (4, 6)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of the weight's shape \(6, 4\)"):
        sparsekern.nn.SparseLinear.from_dense(conv, torch.ones(4, 6, dtype=torch.bool))
    layer = sparsekern.nn.SparseLinear.from_dense(conv, torch.ones(6, 4, dtype=torch.bool))
    x = torch.randn(3, 4)
    torch.testing.assert_close(layer(x), conv(x))
    assert isinstance(layer.to_dense(), Conv1D)
