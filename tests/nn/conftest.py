import pytest

from sparsekern.nn import kernel_choice


@pytest.fixture(params=["extension", "python"])
def dense_node(request, monkeypatch):
    """Which dense-kernel node runs on the CPU: the extension's C++ one or ``kernel_choice._DenseKernel`` (what
    other devices and dtypes run)."""
    if request.param == "python":
        monkeypatch.setattr(kernel_choice, "_fused", lambda *args: False)
    elif not kernel_choice._dispatch.extension_loaded:
        pytest.skip("no compiled extension")
    return request.param
