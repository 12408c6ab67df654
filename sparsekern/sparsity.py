"""Per-layer densities (uniform, ER, ERK) and ``sparsify``: swap a model's dense layers for sparse ones."""
from __future__ import annotations

import copy
import math
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .init import INITS, check_density, initialize_
from .nn import FORMATS, SparseConv2d, SparseLinear, SparseWeightMixin, random_block_mask, random_mask
from .nn.base import load_all_or_nothing
from .nn.conv1d import dense_weight_of, is_conv1d
from .nn.fast_modules import fast_modules as make_fast, plain_modules as make_plain
from .nn.fuse import fuse_activations as fuse_modules, unfuse_activations as unfuse_modules

__all__ = ["DISTRIBUTIONS", "densities", "sparsifiable_layers", "sparsify", "densify"]

DISTRIBUTIONS = ("uniform", "er", "erk")
Shapes = Union[nn.Module, Mapping[str, Sequence[int]], Sequence[Sequence[int]]]


def _check_distribution(where: str, distribution: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"{where}: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def _is_sparsifiable(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _weight_shape(module: nn.Module) -> tuple:
    """The layer's weight shape as its sparse module holds it: (out, in, ...), a Conv1D's transposed."""
    return tuple(dense_weight_of(module).shape)


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def sparsifiable_layers(model: nn.Module, dense_layers: Iterable[str] = ()) -> Dict[str, nn.Module]:
    """The ``nn.Linear``, ``nn.Conv2d`` (groups = 1; any padding_mode) and transformers ``Conv1D`` (GPT-2's
    projections) modules of ``model`` by qualified name, leaving out those named in ``dense_layers`` (a name
    also covers everything under it)."""
    dense_layers = tuple(dense_layers)
    return {name: m for name, m in model.named_modules() if _is_sparsifiable(m) and not _under(name, dense_layers)}


def _check_shared_consistently_dense(model: nn.Module, dense_layers: Sequence[str]) -> None:
    """A layer registered under several names is one layer: dense_layers must name all of them or none."""
    names_of: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if _is_sparsifiable(module):
            names_of.setdefault(id(module), []).append(name)
    for names in names_of.values():
        dense = [n for n in names if _under(n, dense_layers)]
        if dense and len(dense) < len(names):
            raise ValueError(f"sparsify: dense_layers must name all or none of the names of a shared layer: "
                             f"{names} are one module, got dense {dense} but sparse "
                             f"{[n for n in names if n not in dense]}")


def _check_no_parameter_shared_with_another_module(model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
    """A sparse layer holds its own copy of the weight and bias, so one that another module also holds
    (``b.weight = a.weight``, an embedding tied to its head) would be untied. The same module under two
    names is one layer and stays tied (``_check_shared_consistently_dense``)."""
    holders: Dict[int, List[tuple]] = {}  # id of a parameter -> [(qualified name, module holding it)]
    for name, module in model.named_modules(remove_duplicate=False):
        for key, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((f"{name}.{key}" if name else key, module))
    for name, layer in layers.items():
        for key, param in layer._parameters.items():
            others = [(n, m) for n, m in holders.get(id(param), []) if m is not layer]
            if others:
                modules = [name] + list(dict.fromkeys(n.rpartition(".")[0] for n, _ in others))
                raise ValueError(f"sparsify: {f'{name}.{key}' if name else key} is the same parameter as "
                                 f"{[n for n, _ in others]} of another module; sparsifying it would untie them. "
                                 f"Keep them dense: dense_layers={modules}")


def _check_materialized(layers: Mapping[str, nn.Module]) -> None:
    """A mask is drawn from (and values copied out of) real weights."""
    for name, layer in layers.items():
        for key, param in layer._parameters.items():
            if param is None:
                continue
            if torch.nn.parameter.is_lazy(param):
                raise ValueError(f"sparsify: layer {name!r} has an uninitialized (lazy) {key}; run a forward pass "
                                 "to initialize it first")
            if param.is_meta:
                raise ValueError(f"sparsify: layer {name!r} has its {key} on the meta device (no data); "
                                 "materialize the model first (model.to_empty(device=...) and initialize it)")


def _erdos_renyi(shapes: List[Sequence[int]], density: float, include_kernel: bool) -> List[float]:
    """google-research/rigl ``get_sparsities_erdos_renyi``, as densities: layer i keeps eps * raw_i of its
    weights, eps solved so the kept total is density * total; a layer whose eps * raw exceeds 1 is made
    dense and eps solved again over the rest."""
    numels = [math.prod(s) for s in shapes]
    if include_kernel:  # ERK: sum of all dims over their product
        raw = [sum(s) / n for s, n in zip(shapes, numels)]
    else:  # ER: (n_in + n_out) / (n_in * n_out); PyTorch weights are (out, in, ...)
        raw = [(s[0] + s[1]) / (s[0] * s[1]) for s in shapes]
    dense = set()
    eps = 0.0
    while len(dense) < len(shapes):
        free = [i for i in range(len(shapes)) if i not in dense]
        kept_left = density * sum(numels) - sum(numels[i] for i in dense)
        eps = kept_left / sum(raw[i] * numels[i] for i in free)
        max_raw = max(raw[i] for i in free)
        if eps * max_raw <= 1.0:
            break
        dense.update(i for i in free if raw[i] == max_raw)
    return [1.0 if i in dense else min(1.0, eps * raw[i]) for i in range(len(shapes))]


def densities(model_or_shapes: Shapes, density: float,
              distribution: str = "erk") -> Union[Dict[str, float], List[float]]:
    """Per-layer densities whose weighted mean is ``density``.

    ``model_or_shapes``: a model (its sparsifiable layers, see ``sparsifiable_layers``; returns
    {name: density}), a mapping name -> weight shape (returns a dict), or a sequence of weight shapes
    in PyTorch layout (out, in, kh, kw) (returns a list). ``distribution``: ``uniform`` (every layer
    ``density``), ``er`` (Erdős–Rényi) or ``erk`` (Erdős–Rényi-Kernel), as in google-research/rigl.
    """
    density = check_density("densities", density)
    _check_distribution("densities", distribution)
    if isinstance(model_or_shapes, nn.Module):
        layers = sparsifiable_layers(model_or_shapes)
        names, shapes = list(layers), [_weight_shape(m) for m in layers.values()]
    elif isinstance(model_or_shapes, Mapping):
        names, shapes = list(model_or_shapes), [tuple(s) for s in model_or_shapes.values()]
    else:
        names, shapes = None, [tuple(s) for s in model_or_shapes]
    if not shapes:
        raise ValueError("densities: no layers given (a model needs nn.Linear or nn.Conv2d layers)")
    for s in shapes:
        if len(s) < 2 or any(not isinstance(d, int) or d <= 0 for d in s):
            raise ValueError(f"densities: every shape must have >= 2 positive int dims, got {s}")
    if distribution == "uniform":
        result = [density] * len(shapes)
    else:
        result = _erdos_renyi(shapes, density, include_kernel=distribution == "erk")
    return result if names is None else dict(zip(names, result))


def _to_sparse(module: nn.Module, mask: torch.Tensor, format: str = "csr", block: int = 32) -> nn.Module:
    cls = SparseConv2d if isinstance(module, nn.Conv2d) else SparseLinear
    sparse = cls.from_dense(module, mask, format, block)
    sparse.values.requires_grad_(module.weight.requires_grad)
    return sparse.train(module.training)


def sparsify(model: nn.Module, density: float, distribution: str = "erk", init: str = "sparse",
             dense_layers: Iterable[str] = (), inplace: bool = True,
             generator: Optional[torch.Generator] = None, format: str = "csr", block: int = 32,
             fuse_activations: bool = False, fast_modules: bool = False) -> nn.Module:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` (groups = 1) of ``model`` by its sparse module, and
    every transformers ``Conv1D`` (GPT-2's projections, a linear layer with its weight stored transposed) by a
    ``SparseLinear`` of its (out, in) weight (``densify`` gives the Conv1D back).

    Per-layer densities follow ``distribution`` over the replaced layers (those in ``dense_layers``,
    qualified module names, stay dense and do not count). Each mask keeps round(density * numel)
    weights drawn uniformly at random from ``generator``, every layer's mask before any init draws from it, so
    a seed gives the same masks whatever the init. ``init``: ``sparse`` (per-unit scaled,
    ``sparsekern.init.sparse_init_``), ``dense`` (the dense layer's weights, masked) or ``layer``
    (the dense weights scaled by 1/sqrt(layer density)). Returns the model (a copy if not ``inplace``).

    ``format="bsr"`` makes block-sparse layers (whole ``block`` x ``block`` blocks, random at the layer's
    density over blocks) wherever both weight dims are multiples of ``block``; the other layers (a
    stem conv of 3*3*3 columns, a 10-way classifier) stay CSR, with a warning naming them.

    ``fuse_activations=True`` then fuses each ``nn.ReLU`` that follows a sparse linear layer in an
    ``nn.Sequential`` into that layer (``sparsekern.fuse_activations``; ``densify`` undoes it).

    ``fast_modules=True`` also makes every ``nn.BatchNorm2d``, ``nn.MaxPool2d``, depthwise ``nn.Conv2d`` and
    ``nn.Linear`` of at most 16 outputs left dense its faster CPU version, ``FastBatchNorm2d``, ``FastMaxPool2d``,
    ``FastDepthwiseConv2d`` and ``FastNarrowLinear``
    (``sparsekern.fast_modules``; ``densify`` undoes it).
    """
    density = check_density("sparsify", density)
    _check_distribution("sparsify", distribution)
    if init not in INITS:
        raise ValueError(f"sparsify: init must be one of {INITS}, got {init!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(format, str) or format not in FORMATS:
        raise ValueError(f"sparsify: format must be one of {FORMATS}, got {format!r}")
    if format == "bsr" and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"sparsify: block must be a positive int, got {block!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"sparsify: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if not isinstance(fuse_activations, bool):
        raise TypeError(f"sparsify: fuse_activations must be a bool, got {type(fuse_activations).__name__}")
    if not isinstance(fast_modules, bool):
        raise TypeError(f"sparsify: fast_modules must be a bool, got {type(fast_modules).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"sparsify: inplace must be a bool, got {type(inplace).__name__}")
    if dense_layers is None:
        dense_layers = ()
    dense_layers = (dense_layers,) if isinstance(dense_layers, str) else tuple(dense_layers)
    names = {name for name, _ in model.named_modules(remove_duplicate=False)}
    unknown = [d for d in dense_layers if d not in names]
    if unknown:
        raise ValueError(f"sparsify: dense_layers names no module of the model: {unknown}")
    _check_shared_consistently_dense(model, dense_layers)
    layers = sparsifiable_layers(model, dense_layers)
    if not layers:
        if any(isinstance(m, SparseWeightMixin) for m in model.modules()):
            raise ValueError("sparsify: the model is already sparse (it has sparsekern sparse layers and no "
                             "nn.Linear or nn.Conv2d left to sparsify); sparsekern.densify(model) first to "
                             "sparsify it again")
        kept = f" outside dense_layers {list(dense_layers)}" if dense_layers else ""
        raise ValueError(f"sparsify: the model has no nn.Linear, nn.Conv2d (groups=1) or transformers Conv1D to "
                         f"sparsify{kept}")
    _check_materialized(layers)
    _check_no_parameter_shared_with_another_module(model, layers)
    if not inplace:
        model = copy.deepcopy(model)
        layers = sparsifiable_layers(model, dense_layers)
    shapes = {n: _weight_shape(m) for n, m in layers.items()}
    layer_densities = densities(shapes, density, distribution)
    format_of = {name: "csr" if format == "csr" or shapes[name][0] % block or math.prod(shapes[name][1:]) % block
                 else "bsr" for name in layers}
    as_csr = [name for name, fmt in format_of.items() if fmt != format]
    # A mask keeps round(density * entries) entries (blocks for bsr); a layer left with none would compute
    # nothing, which density 0 is rejected for too.
    empty = [name for name, m in layers.items() if round(layer_densities[name] * (
        m.weight.numel() // block ** 2 if format_of[name] == "bsr" else m.weight.numel())) == 0]
    if empty:
        raise ValueError(f"sparsify: density {density!r} keeps no weight in layers {empty} "
                         f"(per-layer densities {[layer_densities[n] for n in empty]}); raise density")
    # Every mask is drawn before any layer is initialized: a seed's masks are then the same whatever the init (an
    # init that draws numbers between two layers' masks would shift every later mask), so runs that compare inits
    # compare them on one mask.
    masks = {}
    for name, module in layers.items():
        shape, d, device = shapes[name], layer_densities[name], module.weight.device
        masks[name] = (random_block_mask(shape, d, block, generator, device=device) if format_of[name] == "bsr"
                       else random_mask(shape, d, generator, device=device))
    sparse_of: Dict[int, nn.Module] = {}  # id of a dense layer -> its sparse module
    for name, module in layers.items():
        sparse = _to_sparse(module, masks[name], format_of[name], block)
        initialize_(sparse, init, layer_densities[name], generator=generator)
        if name == "":
            return sparse  # the model itself was the one layer
        sparse_of[id(module)] = sparse
    # Every place a dense layer is registered gets its one sparse module, so a module used twice
    # (tied) stays tied; named_modules() lists such a module under its first name only.
    for parent in list(model.modules()):
        for child, module in list(parent._modules.items()):
            if module is not None and id(module) in sparse_of:
                setattr(parent, child, sparse_of[id(module)])
    if as_csr:
        warnings.warn(f"sparsify: format='bsr' needs weight dims that are multiples of block={block}; these layers "
                      f"are CSR instead: {as_csr}", stacklevel=2)
    if fuse_activations:
        fuse_modules(model)
    if fast_modules:
        make_fast(model)
    if not getattr(model, "_sparsekern_checks_loads", False):  # one whole-model check per load
        model.register_load_state_dict_pre_hook(load_all_or_nothing)
        model._sparsekern_checks_loads = True
    return model


def densify(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Replace every sparse module of ``model`` by the plain ``nn.Linear`` / ``nn.Conv2d`` it stands for
    (``to_dense``: the weight is 0 outside the pattern; bias, requires_grad and train/eval mode kept).
    A sparse module registered under several names becomes one dense module (tied stays tied).
    Returns the model (a copy if not ``inplace``); a sparse module passed alone is returned dense."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"densify: model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, SparseWeightMixin):
        return model.to_dense()
    unfuse_modules(model)  # the ReLUs back in their places, so each layer becomes the plain module it stood for
    make_plain(model)
    dense_of: Dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for child, module in list(parent._modules.items()):
            if isinstance(module, SparseWeightMixin):
                if id(module) not in dense_of:
                    dense_of[id(module)] = module.to_dense()
                setattr(parent, child, dense_of[id(module)])
    return model
