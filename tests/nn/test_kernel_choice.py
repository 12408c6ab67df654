"""Per-layer kernel choice: every kernel of a layer computes the same thing, the choice is measured once
per key and cached, and overrides work."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern
from sparsekern import isa as sk_isa
from sparsekern.nn import SparseConv2d, SparseLinear, kernel_choice as kc

from sk_testing import assert_close, gen, random_mask


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    kc.clear_cache()
    monkeypatch.setattr(kc, "_autotune", True)
    monkeypatch.setattr(kc, "_forced", None)
    # No choice from a cache file that SPARSEKERN_KERNEL_CACHE may name: the tests count measurements.
    monkeypatch.setattr(kc, "_cache_file", None)
    monkeypatch.setattr(kc, "_stored", {})
    yield
    kc.clear_cache()


def fake_clock(monkeypatch, clock):
    """kc's clock is ``clock[0]``, which only the timed calls advance; no real page faults (more than a few in a timed
    call mark it unclean, which changes the rounds) and no cache eviction between calls."""
    monkeypatch.setattr(kc, "_clock", lambda: clock[0])
    monkeypatch.setattr(kc, "_minor_faults", lambda: 0)
    monkeypatch.setattr(kc, "EVICT_BYTES", 0)


def _grads(module, x, kernel):
    module.kernel = kernel
    xs = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(xs)
    g = torch.randn(y.shape, generator=gen(7), dtype=y.dtype)
    y.backward(g)
    out = (y.detach(), xs.grad, module.values.grad.clone(), None if module.bias is None else module.bias.grad.clone())
    module.kernel = "auto"
    return out


def _close(got, want, what):
    if want is None:
        assert got is None, what
    else:
        assert got is not None, what
        assert_close(got, want, scale=10.0)


def _dense_twin_grads(module, x):
    dense = module.to_dense()
    xs = x.detach().clone().requires_grad_(True)
    y = dense(xs)
    y.backward(torch.randn(y.shape, generator=gen(7), dtype=y.dtype))
    mask = module.mask()
    return y.detach(), xs.grad, dense.weight.grad[mask], None if dense.bias is None else dense.bias.grad


# (cin, cout, kernel, stride, padding, dilation, hw)
CONV_GEOMETRIES = [
    (8, 6, 1, 1, 0, 1, 5),     # 1x1: pixels are the GEMM's rows
    (8, 6, 1, 2, 0, 1, 7),     # 1x1 stride 2: a strided view first
    (5, 4, 3, 1, 1, 1, 6),     # 3x3 padded: im2col
    (4, 7, 3, 2, 1, 1, 9),     # stride 2, odd size
    (3, 5, 7, 2, 3, 1, 12),    # the ResNet stem's shape
    (4, 3, 3, 1, 2, 2, 8),     # dilation
    (6, 4, (1, 3), (2, 1), (0, 1), 1, 7),  # rectangular
]


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=str)
@pytest.mark.parametrize("density,empty_rows", [(0.0, False), (0.3, True), (1.0, False)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("kernel", ["csr", "gemm", "dense"])
def test_conv_kernels_match_dense_twin(geometry, density, empty_rows, layout, kernel):
    cin, cout, k, s, p, d, hw = geometry
    torch.manual_seed(hash((geometry, density)) % 2**31)
    dense = nn.Conv2d(cin, cout, k, s, p, d, dtype=torch.float64)
    mask = random_mask(dense.weight.shape, density, gen(3), empty_rows)
    layer = SparseConv2d.from_dense(dense, mask)
    x = torch.randn(2, cin, hw, hw + 1, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(2, cin, hw, 2 * (hw + 1), dtype=torch.float64)[..., ::2]
    got = _grads(layer, x, kernel)
    want = _dense_twin_grads(layer, x)
    for g, w, what in zip(got, want, ("y", "dx", "d_values", "d_bias")):
        _close(g, w, f"{kernel} {what}")
    if layout == "channels_last":  # y and dx keep the input's layout, as the dense twin's do
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("x_shape", [(5, 12), (2, 3, 12), (0, 12)], ids=str)
@pytest.mark.parametrize("kernel", ["csr", "dense"])
def test_linear_kernels_match_dense_twin(x_shape, kernel):
    torch.manual_seed(0)
    dense = nn.Linear(12, 9, dtype=torch.float64)
    layer = SparseLinear.from_dense(dense, random_mask((9, 12), 0.3, gen(1), True))
    x = torch.randn(x_shape, dtype=torch.float64)
    for g, w, what in zip(_grads(layer, x, kernel), _dense_twin_grads(layer, x), ("y", "dx", "d_values", "d_bias")):
        _close(g, w, f"{kernel} {what}")


def _measuring(monkeypatch):
    """Measure every layer, however small, and count the measurements."""
    calls = []
    real = kc._measure
    monkeypatch.setattr(kc, "MIN_TUNE_MACS", 0)
    monkeypatch.setattr(kc, "_measure", lambda m, x: calls.append(m) or real(m, x))
    return calls


@pytest.mark.parametrize("evict_bytes", [kc.EVICT_BYTES, 0], ids=["caches-evicted", "hot"])
def test_auto_measures_once_per_key_and_caches(monkeypatch, evict_bytes):
    monkeypatch.setattr(kc, "EVICT_BYTES", evict_bytes)
    calls = _measuring(monkeypatch)
    a = SparseConv2d(8, 8, 3, padding=1, density=0.2)
    b = SparseConv2d(8, 8, 3, padding=1, density=0.2)  # same key: shares a's measurement
    x = torch.randn(2, 8, 6, 6)
    a(x), a(x), b(x)
    assert len(calls) == 1
    choice = kc.lookup(a, x)
    assert set(choice.times_ms) <= {"csr", "gemm", "dense"} and "csr" in choice.times_ms
    t = choice.times_ms
    fastest = min(t, key=t.get)
    assert choice.kernel == ("dense" if t["dense"] <= (1 + kc.dense_margin(a)) * t[fastest] else fastest)
    a(torch.randn(3, 8, 6, 6))  # another batch: another key
    assert len(calls) == 2
    with torch.no_grad():  # forward only: another key
        a(x)
    assert len(calls) == 3


def test_each_vector_width_of_the_loops_is_measured_apart(monkeypatch):
    # sparsekern.isa.set changes the width of the CSR and conv loops at run time: a choice measured at one
    # width says nothing about the other (on an Intel AVX-512 host the 64-byte loops run 1.1-1.3x faster).
    if not (sparsekern.ops.HAS_EXTENSION and sk_isa.supported("avx2") and sk_isa.supported("avx512")):
        pytest.skip("needs the extension on a CPU with both widths (AVX-512)")
    calls = _measuring(monkeypatch)
    layer = SparseLinear(16, 16, density=0.25)
    x = torch.randn(4, 16)
    with sk_isa.use("avx2"):
        layer(x), layer(x)
        key_avx2 = kc.choice_key(layer, x)
    with sk_isa.use("avx512"):
        layer(x)
        key_avx512 = kc.choice_key(layer, x)
    assert key_avx2 != key_avx512 and len(calls) == 2


def test_choice_survives_dst_but_not_pruning(monkeypatch):
    calls = _measuring(monkeypatch)
    layer = SparseLinear(16, 16, density=0.25)
    x = torch.randn(4, 16)
    layer(x)
    # A DST step: same nnz, another pattern -> the cached choice holds.
    mask = random_mask((16, 16), 0.25, gen(9))
    layer.update_pattern_(mask, torch.randn(int(mask.sum())))
    layer(x)
    assert len(calls) == 1
    layer.set_pattern(random_mask((16, 16), 0.1, gen(9)))  # pruning: fewer nonzeros
    layer(x)
    assert len(calls) == 2


def test_measurement_leaves_no_gradient(monkeypatch):
    _measuring(monkeypatch)
    layer = SparseLinear(16, 8, density=0.5)
    x = torch.randn(4, 16, requires_grad=True)
    y = layer(x)
    assert layer.values.grad is None and layer.bias.grad is None and x.grad is None
    y.sum().backward()
    reference = layer.to_dense()
    x2 = x.detach().clone().requires_grad_(True)
    reference(x2).sum().backward()
    assert_close(layer.values.grad, reference.weight.grad[layer.mask()])
    assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("density,kernel", [(0.1, "csr"), (0.5, "dense"), (1.0, "dense")])
def test_small_layers_are_not_measured(density, kernel):
    """Below MIN_TUNE_MACS the density rule decides: dense from RULE_DENSE_FROM on, else csr."""
    layer = SparseLinear(8, 8, density=density)
    x = torch.randn(2, 8)
    layer(x)
    choice = kc.lookup(layer, x)
    assert choice.kernel == kernel and choice.times_ms == {} and "density rule" in choice.reason


def test_overrides(monkeypatch):
    calls = _measuring(monkeypatch)
    layer = SparseConv2d(4, 4, 1, density=0.5)
    x = torch.randn(1, 4, 3, 3)
    layer.kernel = "gemm"
    layer(x)
    assert "kernel='gemm'" in repr(layer)
    layer.kernel = "auto"
    kc.set_kernel("dense")
    try:
        layer(x)
        lin = SparseLinear(4, 4)
        lin(torch.randn(2, 4))
    finally:
        kc.set_kernel(None)
    kc.set_autotune(False)
    try:
        layer(x)
    finally:
        kc.set_autotune(True)
    assert calls == []


def test_last_kernel_reports_what_the_last_call_ran():
    layer = SparseLinear(8, 8, density=0.5)
    assert kc.last_kernel(layer) is None
    x = torch.randn(4, 8)
    for kernel in ("dense", "csr"):
        layer.kernel = kernel
        layer(x)
        assert kc.last_kernel(layer) == kernel


def test_deterministic_algorithms_take_the_rule_not_a_measurement(monkeypatch, capsys):
    """Under torch.use_deterministic_algorithms(True) no layer is measured: dense from RULE_DENSE_FROM on,
    csr below, the same in every process; explain says so."""
    calls = _measuring(monkeypatch)
    model = nn.Sequential(SparseLinear(16, 16, density=0.5), SparseConv2d(4, 4, 3, padding=1, density=0.1))
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert kc.resolve(model[0], torch.randn(8, 16)) == "dense"
        assert kc.resolve(model[1], torch.randn(2, 4, 6, 6)) == "csr"
        model[0](torch.randn(8, 16)).sum().backward()
        rows = kc.explain(model[1], torch.randn(2, 4, 6, 6), print_table=False)
    finally:
        torch.use_deterministic_algorithms(before)
    assert calls == [] and kc.cached_choices() == {}
    assert rows[0]["kernel"] == "csr" and rows[0]["reason"] == "deterministic rule"


@pytest.mark.parametrize("bad", ["fast", "gemm"])
def test_bad_kernel_names_raise(bad):
    layer = SparseLinear(4, 4)
    layer.kernel = bad
    with pytest.raises(ValueError, match="kernel"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="set_kernel"):
        kc.set_kernel("fast")


def test_conv_rejects_wrong_channels_before_choosing():
    layer = SparseConv2d(4, 4, 3)
    with pytest.raises(ValueError, match=r"sparse_conv2d: x must have 4 channels"):
        layer(torch.randn(1, 5, 8, 8))


def test_explain_reports_every_sparse_layer(monkeypatch, capsys):
    _measuring(monkeypatch)
    model = nn.Sequential(SparseConv2d(3, 8, 3, padding=1, density=0.5), nn.ReLU(), nn.Flatten(),
                          SparseLinear(8 * 6 * 6, 10, density=0.1))
    rows = sparsekern.explain(model, torch.randn(2, 3, 6, 6))
    assert [r["name"] for r in rows] == ["0", "3"]
    assert rows[0]["kernel"] in ("csr", "gemm", "dense") and set(rows[0]["times_ms"]) >= {"csr"}
    assert rows[1]["shape"] == (10, 288) and abs(rows[1]["density"] - 0.1) < 0.01
    assert all(p.grad is None for p in model.parameters())  # explain leaves the model's gradients alone
    out = capsys.readouterr().out
    assert "kernel choice" in out and "vs dense" in out


@pytest.mark.parametrize("pin", ["batched", "direct"])
def test_conv_kernels_of_each_pass_are_reported(pin, monkeypatch):
    """cpu_conv_kernels names the C++ kernel of each pass of a conv's csr kernel, as the op runs it (pinned here), and
    explain() shows it; where no C++ conv runs (the dense kernel, BSR, the reference backend): None."""
    monkeypatch.setenv("SPARSEKERN_CONV_KERNEL", pin)
    x = torch.randn(8, 4, 7, 7)
    conv3, conv1 = SparseConv2d(4, 6, 3, padding=1, density=0.5), SparseConv2d(4, 6, 1, density=0.5)
    assert conv3.cpu_conv_kernels(x) == f"{pin}/{pin}/{pin}"
    one = "direct" if pin == "direct" else "pointwise"  # pinned direct, a 1x1 conv leaves its pointwise kernels too
    assert conv1.cpu_conv_kernels(x) == f"{one}/{one}/{one}"
    conv3.kernel = "csr"
    row, = sparsekern.explain(nn.Sequential(conv3), x, print_table=False)
    assert row["kernel"] == "csr" and row["conv_kernels"] == f"{pin}/{pin}/{pin}"
    conv3.kernel = "dense"
    row, = sparsekern.explain(nn.Sequential(conv3), x, print_table=False)
    assert row["conv_kernels"] is None  # the dense kernel runs no sparse conv
    with sparsekern.ops.dispatch.backend("reference"):
        assert conv3.cpu_conv_kernels(x) is None
    conv3.format = "bsr"
    assert conv3.cpu_conv_kernels(x) is None
    p = conv3.pattern
    with pytest.raises(ValueError, match=r"pass_index must be 0 \(forward\), 1 .* or 2 \(weight gradient\), got 3"):
        torch.ops.sparsekern._conv2d_cpu_kernel(list(x.shape), p.row_ptr, p.col_idx, [3, 3], [1, 1], [1, 1], [1, 1], 3)


def test_compiled_model_uses_default_kernel(monkeypatch):
    calls = _measuring(monkeypatch)
    layer = SparseLinear(16, 8, density=0.5)
    compiled = torch.compile(layer, backend="eager", fullgraph=False)
    x = torch.randn(4, 16)
    assert_close(compiled(x), F.linear(x, layer.dense_weight(), layer.bias))
    assert calls == []


def test_choices_persist_in_the_cache_file(monkeypatch, tmp_path):
    calls = _measuring(monkeypatch)
    path = tmp_path / "kernels.json"
    monkeypatch.setattr(kc, "_cache_file", str(path))
    monkeypatch.setattr(kc, "_stored", {})
    layer = SparseLinear(16, 8, density=0.5)
    x = torch.randn(4, 16)
    layer(x)
    assert len(calls) == 1 and path.exists()
    kc.clear_cache()  # a new process: the file answers, nothing is measured
    monkeypatch.setattr(kc, "_stored", {})
    kc._load_cache_file()
    layer(x)
    assert len(calls) == 1 and kc.lookup(layer, x).reason == "cached on disk"
    stale = json.loads(path.read_text())
    stale["tag"]["sparsekern"] = "0.0.0"  # another version's (or CPU's) file: not used
    path.write_text(json.dumps(stale))
    monkeypatch.setattr(kc, "_stored", {})
    kc.clear_cache()
    kc._load_cache_file()
    assert kc._stored == {}
    layer(x)
    assert len(calls) == 2 and json.loads(path.read_text())["tag"] == kc.file_tag()
    rebuilt = json.loads(path.read_text())
    rebuilt["tag"]["extension"] = "0" * 16  # the same version rebuilt from other sources: not used either
    path.write_text(json.dumps(rebuilt))
    monkeypatch.setattr(kc, "_stored", {})
    kc._load_cache_file()
    assert kc._stored == {}
    path.write_text("{not json")  # a broken file costs a measurement, not an error
    monkeypatch.setattr(kc, "_stored", {})
    kc.clear_cache()
    kc._load_cache_file()
    layer(x)
    assert len(calls) == 3
    path.write_text('{"a": 1}')  # the old untagged format: ignored too
    monkeypatch.setattr(kc, "_stored", {})
    kc._load_cache_file()
    assert kc._stored == {}


CPUINFO = """processor\t: {p}
vendor_id\t: AuthenticAMD
cpu family\t: {family}
model\t\t: {model}
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu avx2

"""


def test_cache_file_of_another_cpu_generation_with_the_same_name_is_not_used(tmp_path, monkeypatch):
    # Under KVM, Zen 3, Zen 4 and Zen 5 hosts all name themselves "AMD EPYC": the family and model tell them apart.
    def host(family, model):
        info = tmp_path / f"cpuinfo-{family}-{model}"
        info.write_text(CPUINFO.format(p=0, family=family, model=model) + CPUINFO.format(p=1, family=99, model=99))
        monkeypatch.setattr(sk_isa, "_CPUINFO", str(info))
        return sk_isa.cpu_model()

    zen4, zen5 = host(25, 17), host(26, 2)
    assert zen4 == "AMD EPYC (AuthenticAMD family 25 model 17 stepping 1)"  # the first processor's block
    assert zen5 == "AMD EPYC (AuthenticAMD family 26 model 2 stepping 1)"
    path = tmp_path / "choices.json"
    monkeypatch.setattr(kc, "_cache_file", str(path))
    monkeypatch.setattr(kc, "_stored", {})
    kc._store(("a key",), kc.Choice("dense", {"dense": 1.0, "csr": 2.0}))
    assert json.loads(path.read_text())["tag"]["cpu"] == zen5
    host(25, 17)
    monkeypatch.setattr(kc, "_stored", {})
    kc._load_cache_file()
    assert kc._stored == {}  # measured on the Zen 5 host: not trusted on the Zen 4 one
    host(26, 2)
    kc._load_cache_file()
    assert repr(("a key",)) in kc._stored
    monkeypatch.setattr(sk_isa, "_CPUINFO", str(tmp_path / "missing"))
    assert sk_isa.cpu_model()  # no /proc/cpuinfo: the platform's name, never an error


def test_dense_weight_caches_its_index_per_pattern_version():
    layer = SparseLinear(6, 5, density=0.4)
    first = layer.dense_weight()
    assert torch.equal(first, layer.sparse_weight().to_dense())
    mask = random_mask((5, 6), 0.4, gen(2))
    layer.update_pattern_(mask, torch.arange(int(mask.sum()), dtype=torch.float32))  # written in place
    assert torch.equal(layer.dense_weight(), layer.sparse_weight().to_dense())
    full = SparseLinear(6, 5, density=1.0)
    w = full.dense_weight()
    assert w.data_ptr() == full.values.data_ptr()  # a full pattern is a view of the values
    w.sum().backward()
    assert torch.equal(full.values.grad, torch.ones(30))


@pytest.mark.parametrize("times,density,expected", [({"csr": 1.0, "gemm": 2.0, "dense": 3.0}, 0.1, "csr"),
                                                    ({"csr": 1.0, "gemm": 0.5, "dense": 3.0}, 0.1, "gemm"),
                                                    ({"csr": 1.0, "gemm": 2.0, "dense": 1.04}, 0.1, "dense"),
                                                    ({"csr": 1.0, "gemm": 2.0, "dense": 0.5}, 0.1, "dense"),
                                                    ({"csr": 1.0, "gemm": 2.0, "dense": 1.1}, 0.1, "csr"),
                                                    ({"csr": 1.0, "gemm": 2.0, "dense": 1.1}, 0.95, "dense"),
                                                    ({"csr": 1.0, "gemm": 2.0, "dense": 1.3}, 0.95, "csr")], ids=str)
def test_the_fastest_wins_and_near_ties_go_to_dense(monkeypatch, times, density, expected):
    """A sparse kernel is chosen over the dense one only where it measured DENSE_MARGIN faster, NEAR_DENSE_MARGIN
    from a density of NEAR_DENSE on."""
    layer = SparseConv2d(4, 4, 3, padding=1, density=density)
    x = torch.randn(2, 4, 8, 8)
    monkeypatch.setattr(kc, "MIN_TUNE_MACS", 0)
    clock = [0.0]  # a fake clock that each call advances by the kernel's time: no timing noise

    def timer(module, x, kernel):
        return lambda: clock.__setitem__(0, clock[0] + times[kernel] / 1e3)
    fake_clock(monkeypatch, clock)
    monkeypatch.setattr(kc, "_timer", timer)
    assert kc._measure(layer, x).kernel == expected


@pytest.mark.parametrize("density,slow_calls,expected", [(0.1, 4, "csr"), (0.1, 100, "dense"), (0.6, 4, "dense")],
                         ids=["misfire-caught", "dense-really-faster", "dense-layer-not-rechecked"])
def test_a_sparse_layer_losing_to_dense_gets_a_second_measurement(monkeypatch, density, slow_calls, expected):
    """csr runs 5 ms for its first `slow_calls` calls (an interference that lasts the first set of rounds), then 1 ms;
    dense 2 ms. A layer below RULE_DENSE_FROM that picked dense is measured once more, and the minimum counts."""
    layer = SparseConv2d(8, 8, 3, padding=1, density=density)
    x = torch.randn(2, 8, 8, 8)
    monkeypatch.setattr(kc, "MIN_TUNE_MACS", 0)
    clock, calls = [0.0], {"csr": 0, "gemm": 0, "dense": 0}
    base = {"csr": 1.0, "gemm": 9.0, "dense": 2.0}

    def timer(module, x, kernel):
        def run():
            calls[kernel] += 1
            slow = kernel == "csr" and calls[kernel] <= slow_calls
            clock[0] += (5.0 if slow else base[kernel]) / 1e3
        return run
    fake_clock(monkeypatch, clock)
    monkeypatch.setattr(kc, "_timer", timer)
    choice = kc._measure(layer, x)
    assert choice.kernel == expected
    first_set = kc.WARMUP + kc.REPEATS
    assert calls["dense"] == (2 * first_set - kc.WARMUP if density < kc.RULE_DENSE_FROM else first_set)


@pytest.mark.parametrize("times,rounds", [({"csr": 1.0, "gemm": 2.0, "dense": 3.0}, {"csr": 3, "gemm": 3, "dense": 3}),
                                          ({"csr": 1.0, "gemm": 2.0, "dense": 1.1},
                                           {"csr": kc.MAX_REPEATS, "gemm": kc.REPEATS, "dense": kc.MAX_REPEATS}),
                                          ({"csr": 1.0, "gemm": 5.0, "dense": 2.5}, {"csr": 3, "gemm": 1, "dense": 3})],
                         ids=["clear", "close-call", "given-up"])
def test_close_calls_get_more_rounds(monkeypatch, times, rounds):
    """Three rounds settle a clear winner; candidates within CLOSE_RATIO of the fastest run up to
    MAX_REPEATS rounds; a candidate GIVE_UP_RATIO slower after one round is dropped."""
    layer = SparseConv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    monkeypatch.setattr(kc, "MIN_TUNE_MACS", 0)
    clock, calls = [0.0], {k: 0 for k in times}

    def timer(module, x, kernel):
        def run():
            calls[kernel] += 1
            clock[0] += times[kernel] / 1e3
        return run
    fake_clock(monkeypatch, clock)
    monkeypatch.setattr(kc, "_timer", timer)
    kc._measure(layer, x)
    assert {k: n - kc.WARMUP for k, n in calls.items()} == rounds


def _node_name(grad_fn) -> str:
    return grad_fn.name() if type(grad_fn).__name__ == "CppFunction" else type(grad_fn).__name__


def _checked_layer(kind: str, bias: bool, density: float, kernel: str):
    """A float64 layer pinned to ``kernel``, its input (requiring grad) and parameters, and the call of the layer
    on them (for gradcheck): kind is linear, linear-3d, linear-wide (66 outputs: the dense kernel runs the forward
    as x W^T, without timing its orientation), conv or conv-channels-last."""
    if kind.startswith("linear"):
        out = 66 if kind == "linear-wide" else 4
        layer = SparseLinear(5, out, bias=bias, density=density, generator=gen(11), dtype=torch.float64)
        x = torch.randn((2, 3, 5) if kind == "linear-3d" else (3, 5), dtype=torch.float64, generator=gen(12))
    else:
        layer = SparseConv2d(3, 4, 3, stride=2, padding=1, bias=bias, density=density, generator=gen(13),
                             dtype=torch.float64)
        x = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=gen(14))
        if kind == "conv-channels-last":
            x = x.to(memory_format=torch.channels_last)
    layer.kernel = kernel
    names = ("values", "bias") if bias else ("values",)
    inputs = (x.requires_grad_(),) + tuple(getattr(layer, n).detach().clone().requires_grad_() for n in names)

    def call(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))
    return layer, inputs, call


@pytest.mark.parametrize("density", [0.5, 1.0], ids=["d0.5", "full"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind", ["linear", "linear-3d", "linear-wide", "conv", "conv-channels-last"])
def test_the_dense_kernel_has_exact_first_and_second_gradients(kind, bias, density, dense_node):
    """A layer on the dense kernel (scattered weight, NaN/Inf routing; a full pattern: torch's own autograd
    on a view of the values, no custom node): gradcheck in x, values and bias, and gradgradcheck."""
    layer, inputs, g = _checked_layer(kind, bias, density, "dense")
    torch.autograd.gradcheck(g, inputs)
    torch.autograd.gradgradcheck(g, inputs)
    node = _node_name(g(*inputs).grad_fn)
    custom = "DenseKernel>" in node if dense_node == "extension" else node == "_DenseKernelBackward"
    assert custom == (density < 1.0), node


@pytest.mark.parametrize("mode", [1, 2, 3], ids=["as-is", "transposed", "narrow"])
@pytest.mark.parametrize("shape,kind", [((7, 5, 3), "linear"), ((2, 6, 5, 9), "linear-3d"),
                                        ((7, 5, 66), "linear-wide")], ids=["2d", "3d", "wide"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_the_dense_kernels_linear_products_are_exact_either_way_round(mode, shape, kind, bias):
    """The dense kernel of a linear times both orientations of its narrow forward (x W^T or (W x^T)^T, under 64
    outputs) and of its weight gradient (g^T x or (x^T g)^T) once per shape and keeps the faster, and for a head of
    at most 16 outputs those against the narrow kernels (forward, and both gradients together): each way it gives
    the dense twin's output (contiguous) and gradients, and passes gradcheck and gradgradcheck."""
    if not kc._dispatch.extension_loaded:
        pytest.skip("no compiled extension")
    ops = torch.ops.sparsekern
    before = ops._set_dense_products(mode)
    try:
        layer = SparseLinear(shape[-2], shape[-1], bias=bias, density=0.5, generator=gen(31))
        x = torch.randn(*shape[:-2], shape[-2], generator=gen(32))
        got, want = _grads(layer, x, "dense"), _dense_twin_grads(layer, x)
        for g, w, what in zip(got, want, ("y", "x.grad", "values.grad", "bias.grad")):
            _close(g, w, what)
        assert got[0].is_contiguous() and got[1].shape == x.shape
        layer.kernel = "dense"
        calls = _aten_calls(lambda: layer(x.detach().clone().requires_grad_()).backward(
            torch.ones(*shape[:-2], shape[-1])))
        gemms = {"aten::mm", "aten::addmm", "aten::matmul", "aten::bmm"} & calls
        assert bool(gemms) == (mode != 3 or shape[-1] > 16), calls
        _, inputs, call = _checked_layer(kind, bias, 0.5, "dense")
        torch.autograd.gradcheck(call, inputs)
        torch.autograd.gradgradcheck(call, inputs)
    finally:
        ops._set_dense_products(before)
    with pytest.raises(ValueError, match="mode must be 0, 1, 2 or 3"):
        ops._set_dense_products(4)


def _aten_calls(fn) -> set:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("mode", [1, 2], ids=["onednn", "gemm"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("hw", [3, 8], ids=["hw9", "hw64"])  # NCHW weight gradient: one GEMM over copies; batched
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_the_dense_kernels_pointwise_conv_products_are_exact_either_way(mode, channels_last, hw, bias):
    """A 1x1 conv (stride 1, no padding) on the dense kernel runs each product (forward, input and weight gradient)
    as oneDNN's convolution or as GEMMs over its channels, whichever measured faster for the shape: either way it
    gives the dense twin's output, in the twin's memory format, and gradients, and passes gradcheck and
    gradgradcheck; an output gradient in the other layout than the input runs the convolution."""
    if not kc._dispatch.extension_loaded:
        pytest.skip("no compiled extension")
    ops = torch.ops.sparsekern
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    before = ops._set_dense_products(mode)
    try:
        layer = SparseConv2d(6, 5, 1, bias=bias, density=0.5, generator=gen(35))
        x = torch.randn(3, 6, hw, hw, generator=gen(36)).contiguous(memory_format=fmt)
        got, want = _grads(layer, x, "dense"), _dense_twin_grads(layer, x)
        for g, w, what in zip(got, want, ("y", "x.grad", "values.grad", "bias.grad")):
            _close(g, w, what)
        assert got[0].is_contiguous(memory_format=fmt) and got[1].is_contiguous(memory_format=fmt)
        layer.kernel = "dense"
        calls = _aten_calls(lambda: layer(x.detach().clone().requires_grad_()).backward(
            torch.ones(3, 5, hw, hw).contiguous(memory_format=fmt)))
        assert ("aten::convolution" in calls) == (mode == 1), calls
        assert ("aten::convolution_backward" in calls) == (mode == 1), calls
        # The output's gradient in the other layout: the convolution's backward, the same gradients.
        other = torch.contiguous_format if channels_last else torch.channels_last
        layer.zero_grad(set_to_none=True)
        xs = x.detach().clone().requires_grad_()
        y = layer(xs)
        g = torch.randn(y.shape, generator=gen(7)).contiguous(memory_format=other)
        calls = _aten_calls(lambda: y.backward(g))
        assert "aten::convolution_backward" in calls, calls
        dense = layer.to_dense()
        xd = x.detach().clone().requires_grad_()
        dense(xd).backward(g)
        _close(xs.grad, xd.grad, "x.grad, other layout")
        _close(layer.values.grad, dense.weight.grad[layer.mask()], "values.grad, other layout")

        layer64 = SparseConv2d(3, 4, 1, bias=bias, density=0.5, generator=gen(37), dtype=torch.float64)
        layer64.kernel = "dense"
        names = ("values", "bias") if bias else ("values",)
        x64 = torch.randn(2, 3, hw, hw, dtype=torch.float64, generator=gen(38)).contiguous(memory_format=fmt)
        inputs = (x64.requires_grad_(),) + tuple(getattr(layer64, n).detach().clone().requires_grad_() for n in names)

        def call(x, *params):
            return torch.func.functional_call(layer64, dict(zip(names, params)), (x,))
        torch.autograd.gradcheck(call, inputs)
        torch.autograd.gradgradcheck(call, inputs)
    finally:
        ops._set_dense_products(before)


def test_the_dense_kernels_pointwise_weight_gradient_sums_chunks_of_images_where_cout_exceeds_the_pixels():
    """NCHW, H*W >= 64, as GEMMs: the images' products are summed a chunk of images at a time where holding all of
    them (N x Cout x Cin) would take more memory than the input (Cout > H*W): the same gradients."""
    if not kc._dispatch.extension_loaded:
        pytest.skip("no compiled extension")
    ops = torch.ops.sparsekern
    before = ops._set_dense_products(2)
    try:
        for cout, n in ((150, 3), (100, 5), (64, 4)):  # chunks of 1, of 3 (and a last of 2), the whole batch
            layer = SparseConv2d(6, cout, 1, bias=False, density=0.5, generator=gen(41))
            x = torch.randn(n, 6, 8, 8, generator=gen(42))
            got, want = _grads(layer, x, "dense"), _dense_twin_grads(layer, x)
            for g, w, what in zip(got, want, ("y", "x.grad", "values.grad", "bias.grad")):
                _close(g, w, what)
    finally:
        ops._set_dense_products(before)


def test_the_dense_kernels_pointwise_conv_runs_onednns_convolution_when_deterministic():
    """Under torch.use_deterministic_algorithms the dense kernel times no product: a 1x1 conv runs nn.Conv2d's
    convolution, bit for bit."""
    if not kc._dispatch.extension_loaded:
        pytest.skip("no compiled extension")
    layer = SparseConv2d(16, 8, 1, density=0.5, generator=gen(39))
    layer.kernel = "dense"
    x = torch.randn(2, 16, 6, 6, generator=gen(40))
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        y = layer(x)
        dense = layer.to_dense()
        assert torch.equal(y, F.conv2d(x, dense.weight, dense.bias))
    finally:
        torch.use_deterministic_algorithms(before)


def test_the_dense_kernels_linear_products_keep_nn_linears_orientation_when_deterministic():
    """Under torch.use_deterministic_algorithms the dense kernel times no product (the faster way can differ
    between processes): a layer of 17 to 63 outputs runs nn.Linear's addmm, bit for bit, a head of up to 16 the
    narrow linear's loops (whose sums keep their order over any threads), bit for bit."""
    if not kc._dispatch.extension_loaded:
        pytest.skip("no compiled extension")
    ops = torch.ops.sparsekern
    x = torch.randn(64, 256, generator=gen(34))
    for out in (10, 40):
        layer = SparseLinear(256, out, density=0.5, generator=gen(33))
        layer.kernel = "dense"
        weight = layer.to_dense().weight.detach()
        before_mode = ops._set_dense_products(3)
        loops = ops._narrow_linear(x, weight, layer.bias.detach()) if out <= 16 else None
        ops._set_dense_products(before_mode)
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            y = layer(x)
            assert torch.equal(y, F.linear(x, weight, layer.bias) if loops is None else loops), out
        finally:
            torch.use_deterministic_algorithms(before)


def _partial_layer(kind: str, seed: int):
    """A layer storing 60 % of its weight (its dense kernel has a buffer to scatter into) and an input for it."""
    if kind == "linear":
        return SparseLinear(12, 9, density=0.6, generator=gen(seed)), torch.randn(5, 12, generator=gen(seed + 1))
    return (SparseConv2d(4, 6, 3, padding=1, density=0.6, generator=gen(seed + 2)),
            torch.randn(2, 4, 5, 5, generator=gen(seed + 3)))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_dense_kernel_rewrites_one_weight_buffer_and_stays_exact(kind, dense_node):
    """A partial pattern's dense kernel scatters its values into one buffer call after call: results and
    gradients follow every in-place update of the values, a new pattern, a new dtype, no-grad and
    inference-mode calls; a graph whose values changed since its forward refuses backward (as nn.Linear's)."""
    layer, x = _partial_layer(kind, seed=21)
    layer.kernel = "dense"
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)

    def check():
        got = _grads(layer, x, "dense")
        layer.kernel = "dense"
        for g, w, what in zip(got, _dense_twin_grads(layer, x), ("y", "x.grad", "values.grad", "bias.grad")):
            _close(g, w, what)
        with torch.no_grad():
            assert_close(layer(x), layer.to_dense()(x), scale=10.0)
        return got

    check()
    buffer = kc._dense_buffers[layer][2]
    for _ in range(2):  # optimizer steps write the values in place: same buffer, new weights
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        check()
        assert kc._dense_buffers[layer][2] is buffer
    with torch.inference_mode():
        assert_close(layer(x), layer.to_dense()(x), scale=10.0)
    check()
    mask = random_mask(tuple(layer.weight_shape), 0.5, gen(25))
    layer.update_pattern_(mask, torch.randn(int(mask.sum()), generator=gen(26)))
    with torch.inference_mode():  # the new pattern's first buffer is an inference tensor: not written outside
        assert_close(layer(x), layer.to_dense()(x), scale=10.0)
    assert kc._dense_buffers[layer][2].is_inference()
    check()
    assert kc._dense_buffers[layer][2] is not buffer and not kc._dense_buffers[layer][2].is_inference()
    layer.double()
    x = x.double()
    check()
    stale = layer(x)
    with torch.no_grad():
        layer.values.add_(1.0)
    layer(x).sum().backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.sum().backward()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_kept_dense_route_calls_the_op_straight_until_its_arguments_change(kind, monkeypatch):
    """After a first call, a layer whose route is the dense kernel's C++ node calls the op with the arguments
    that call built (kernel_choice._dense_fast), with the same results and gradients; a new pattern (same nnz)
    or a new values tensor makes it build them again, never a stale buffer."""
    if not kc._dispatch.extension_loaded:
        pytest.skip("no compiled extension")
    layer, x = _partial_layer(kind, seed=31)
    built = []
    real = kc._dense_forward
    monkeypatch.setattr(kc, "_dense_forward", lambda *a, **k: built.append(1) or real(*a, **k))

    def check():
        got = _grads(layer, x, "dense")
        for g, w, what in zip(got, _dense_twin_grads(layer, x), ("y", "x.grad", "values.grad", "bias.grad")):
            _close(g, w, what)

    check()
    assert len(built) == 1
    for _ in range(3):
        check()
    assert len(built) == 1  # the kept route: the op called straight
    nnz = layer.nnz
    mask = random_mask(tuple(layer.weight_shape), nnz / layer.weight_shape.numel(), gen(35))
    assert int(mask.sum()) == nnz
    layer.update_pattern_(mask, torch.randn(nnz, generator=gen(36)))  # the same nnz: the route's key holds
    check()
    assert len(built) == 2  # the old buffer holds entries the new pattern does not store: rebuilt
    check()
    assert len(built) == 2
    layer.values = nn.Parameter(layer.values.detach().clone() * 2)
    check()
    assert len(built) == 3


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind", ["linear", "linear-3d", "conv", "conv-channels-last"])
def test_the_csr_kernel_runs_as_one_cpp_node_with_exact_gradients(kind, bias):
    """On the CPU the csr kernel of a layer is one C++ autograd node (the op's kernels, no Python formula):
    gradcheck and gradgradcheck in x, values and bias; the output and input gradient keep a channels_last
    layout; another backend, or a torch.func transform, takes the op's own path."""
    if not kc._dispatch.extension_loaded:
        pytest.skip("no compiled extension")
    layer, inputs, g = _checked_layer(kind, bias, 0.5, "csr")
    torch.autograd.gradcheck(g, inputs)
    torch.autograd.gradgradcheck(g, inputs)
    y = g(*inputs)
    name = _node_name(y.grad_fn if kind != "linear-3d" else y.grad_fn.next_functions[0][0])
    assert ("::LinearNode>" if kind.startswith("linear") else "ConvNode>") in name
    if kind == "conv-channels-last":
        (dx,) = torch.autograd.grad(y, inputs[0], torch.ones_like(y))
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert dx.is_contiguous(memory_format=torch.channels_last)
    with sparsekern.backend("reference"):
        assert "Node>" not in _node_name(g(*inputs).grad_fn)
    with torch.inference_mode():
        torch.testing.assert_close(layer(inputs[0].detach()), y.detach())


def _route_counts(monkeypatch, layer):
    """Count resolve() calls and C++ node runs of ``layer`` on Python's route (the layer keeps no C++ route here,
    which would run the node itself: tests/nn/test_layer_route.py)."""
    monkeypatch.setattr(kc, "_LayerRoute", None)
    counts = {"resolve": 0, "node": 0}
    real_resolve, real_node = kc.resolve, layer.csr_node

    def resolve(module, x):
        counts["resolve"] += 1
        return real_resolve(module, x)

    def node(x):
        counts["node"] += 1
        return real_node(x)

    monkeypatch.setattr(kc, "resolve", resolve)
    monkeypatch.setattr(layer, "csr_node", node)
    return counts


def test_a_layer_remembers_its_route_until_anything_it_depends_on_changes(monkeypatch):
    """run() keeps each layer's last route (kernel, and whether the C++ node runs it) under a key of the call:
    a call with the same key skips resolve(); every setting, mode and input property the route depends on
    gives another key, so the route is resolved again (and the node does not run where it must not)."""
    if not kc._dispatch.extension_loaded:
        pytest.skip("no compiled extension")
    layer = SparseLinear(32, 16, density=0.2)
    layer.kernel = "csr"
    counts = _route_counts(monkeypatch, layer)
    x = torch.randn(8, 32, requires_grad=True)
    layer(x), layer(x)
    assert counts == {"resolve": 1, "node": 2}

    def resolves_again(change, node_runs=True):
        before = dict(counts)
        change()
        assert counts["resolve"] == before["resolve"] + 1, change
        assert counts["node"] == before["node"] + (1 if node_runs else 0), change
        layer(x)  # back to the first key: resolved again, the node runs
        assert counts["resolve"] == before["resolve"] + 2 and counts["node"] == before["node"] + (2 if node_runs else 1)

    resolves_again(lambda: layer(torch.randn(4, 32)))                      # shape, requires_grad
    resolves_again(lambda: layer(torch.randn(32, 8).t()))                  # strides
    before = dict(counts)
    with pytest.raises(TypeError, match="dtype"):  # an input no kernel takes: the op names it, nothing is kept
        layer(x.detach().double())
    layer(x)
    assert counts == {"resolve": before["resolve"], "node": before["node"] + 1}

    def no_grad():
        with torch.no_grad():
            layer(x)
    resolves_again(no_grad)

    def reference_backend():
        with sparsekern.backend("reference"):
            layer(x)
    resolves_again(reference_backend, node_runs=False)

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
    resolves_again(autocast, node_runs=False)

    def threads():
        n = torch.get_num_threads()
        torch.set_num_threads(n + 1)
        try:
            layer(x)
        finally:
            torch.set_num_threads(n)
    resolves_again(threads)

    def pinned_dense():
        layer.kernel = "dense"
        layer(x)
        layer.kernel = "csr"
    resolves_again(pinned_dense, node_runs=False)

    def frozen():
        layer.values.requires_grad_(False)
        layer(x)
        layer.values.requires_grad_(True)
    resolves_again(frozen)

    def deterministic():
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            layer(x)
        finally:
            torch.use_deterministic_algorithms(before)
    resolves_again(deterministic)

    layer.kernel = "auto"  # the global overrides act on "auto" layers
    layer(x)
    counts["resolve"] = counts["node"] = 0
    layer(x)
    assert counts == {"resolve": 0, "node": 1}

    def forced_dense():
        kc.set_kernel("dense")
        try:
            layer(x)
        finally:
            kc.set_kernel(None)
    resolves_again(forced_dense, node_runs=False)

    before = dict(counts)
    kc.clear_cache()  # the choice is gone: resolved (measured) anew, then kept again
    layer(x), layer(x)
    assert counts == {"resolve": before["resolve"] + 1, "node": before["node"] + 2}


def test_a_remembered_route_gives_the_same_results_and_gradients():
    layer = SparseLinear(24, 12, density=0.3)
    x = torch.randn(6, 24, requires_grad=True)
    first = _grads(layer, x, "auto")
    assert layer.__dict__.get(kc._ROUTE) is not None
    again = _grads(layer, x, "auto")
    for a, b, what in zip(first, again, ("y", "x.grad", "values.grad", "bias.grad")):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=what)
    assert "_sparsekern_route" not in layer.state_dict()


def test_a_conv_on_gemm_keeps_its_products_node_check_in_the_route(monkeypatch):
    """The gemm kernel's products run as the spmm node (NCHW) or the sparse_linear node (channels_last): the
    route keeps that check too, and an override of either op's backend resolves it again."""
    if not kc._dispatch.extension_loaded:
        pytest.skip("no compiled extension")
    checks = []
    real = kc._node
    monkeypatch.setattr(kc, "_node", lambda m, k, x: checks.append(k) or real(m, k, x))
    layer = SparseConv2d(8, 6, 1, density=0.3, generator=gen(21))
    layer.kernel = "gemm"
    x = torch.randn(2, 8, 5, 5, generator=gen(22), requires_grad=True)

    def graph(y):
        names, todo = set(), [y.grad_fn]
        while todo and len(names) < 30:
            node = todo.pop()
            if node is not None:
                names.add(node.name())
                todo += [n for n, _ in node.next_functions]
        return names

    want = layer.to_dense()(x)
    for _ in range(2):
        y = layer(x)
        assert any(n.endswith("SpmmNode>") for n in graph(y))
        torch.testing.assert_close(y, want)
    assert checks == ["gemm"]
    with sparsekern.backend("reference", op="spmm"):
        y = layer(x)
    assert checks == ["gemm"] * 2 and not any("Node>" in n for n in graph(y))
    torch.testing.assert_close(y, want)
    cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    y = layer(cl)
    assert checks == ["gemm"] * 3 and any(n.endswith("::LinearNode>") for n in graph(y))
    torch.testing.assert_close(y, want)
    layer(x)
    assert checks == ["gemm"] * 4


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("out_in", [(9, 5), (40, 16), (33, 37), (6, 70)], ids=str)
@pytest.mark.parametrize("density,empty_rows", [(0.0, False), (0.5, True), (0.96, False)])
@pytest.mark.parametrize("kind", ["linear", "linear-t", "conv"])
def test_the_dense_kernels_float32_scatter_and_gather(isa, out_in, density, empty_rows, kind):
    """The dense kernel's float32 scatter of the values and gather of the weight gradient (AVX-512: one expanding
    load or compress per 16 columns of a row; else element by element) over rows shorter than, equal to and longer
    than 16 columns, ragged ends, empty rows and an empty pattern, a linear's weight gradient as it lies and
    transposed, through value updates between calls: against the dense twin."""
    if not sk_isa.supported(isa):
        pytest.skip(f"isa {isa}: this CPU lacks AVX-512F/BW/DQ/VL")
    out, cin = out_in
    torch.manual_seed(hash((out_in, density, kind)) % 2**31)
    if kind == "conv":
        dense = nn.Conv2d(cin, out, 3, padding=1)
        x = torch.randn(2, cin, 5, 6)
    else:
        dense = nn.Linear(cin, out)
        x = torch.randn(7, cin) if kind == "linear" else torch.randn(cin, 7).t()  # an x^T g weight gradient
    layer = (SparseConv2d if kind == "conv" else SparseLinear).from_dense(
        dense, random_mask(dense.weight.shape, density, gen(5), empty_rows))
    with sk_isa.use(isa):
        for step in range(3):
            got = _grads(layer, x, "dense")
            for g, w, what in zip(got, _dense_twin_grads(layer, x), ("y", "dx", "d_values", "d_bias")):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=f"step {step}: {what}")
            with torch.no_grad():
                layer.values.mul_(-1.5).add_(0.25)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_strided_1x1_conv_as_gemm_has_exact_first_and_second_gradients(layout):
    """The GEMM route's strided 1x1 conv subsamples x through one node (one zero fill and one strided copy in its
    backward): gradcheck and gradgradcheck in x and the values, in either layout."""
    torch.manual_seed(0)
    dense = nn.Conv2d(5, 4, 1, stride=2, bias=False, dtype=torch.float64)
    layer = SparseConv2d.from_dense(dense, random_mask(dense.weight.shape, 0.6, gen(3)))
    layer.kernel = "gemm"
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    values = layer.values.detach().clone().requires_grad_()

    def call(x, values):
        return torch.func.functional_call(layer, {"values": values}, (x,))
    torch.autograd.gradcheck(call, (x, values))
    torch.autograd.gradgradcheck(call, (x, values))
    assert_close(call(x, values), layer.to_dense()(x), scale=10.0)


@pytest.mark.parametrize("faulting,expected", [("dense", "dense"), ("csr", "csr"), ("none", "dense")])
def test_calls_that_take_page_faults_do_not_decide(monkeypatch, faulting, expected):
    """Timed calls that took fresh pages (more than FAULT_PAGES minor faults) count only where a candidate has no
    clean call: here the faulting candidate's first timed call runs 6 ms (1 ms clean), the others 1.2 ms (dense) and
    1.5 ms (csr). Counted as it ran, that call would drop it after the first round (GIVE_UP_RATIO)."""
    layer = SparseConv2d(8, 8, 3, padding=1, density=0.1)
    x = torch.randn(2, 8, 8, 8)
    monkeypatch.setattr(kc, "MIN_TUNE_MACS", 0)
    clock, faults, calls = [0.0], [0], {"csr": 0, "gemm": 0, "dense": 0}
    base = {"csr": 1.5, "gemm": 9.0, "dense": 1.2}

    def timer(module, x, kernel):
        def run():
            calls[kernel] += 1
            fresh = kernel == faulting and calls[kernel] == kc.WARMUP + 1
            if fresh:
                faults[0] += 1000
            clock[0] += (6.0 if fresh else 1.0 if kernel == faulting else base[kernel]) / 1e3
        return run
    monkeypatch.setattr(kc, "_clock", lambda: clock[0])
    monkeypatch.setattr(kc, "_minor_faults", lambda: faults[0])
    monkeypatch.setattr(kc, "_timer", timer)
    choice = kc._measure(layer, x)
    assert choice.kernel == expected
    if faulting != "none":
        assert choice.times_ms[faulting] == pytest.approx(1.0)
