// A sparse layer's kept route in C++: `sparsekern._C.LayerRoute`, which the layers' forward calls first
// (sparsekern/nn/kernel_choice.py: _keep_fast; conv.py and linear.py: forward). Python's route (kernel_choice.run)
// keys each call on 21 fields and then calls the extension's op through torch.ops: with the caches cold from the
// layers between two calls, the module's forward cost 166-200 us over its dense twin's, the op called directly from
// Python 67-92 (ResNet-50's 64 -> 256 1x1 conv at 28x28, batch 16, on its dense kernel; AMD Zen 5, 2 threads); through
// this object, 81. It checks the same things in C++ and calls the layer's C++ autograd node through the dispatcher
// (csr's node, the dense kernel, or a full pattern's dense op on a view of its values).
//
// A route is built by Python right after a call whose Python route it kept, and snapshots what that call saw. A call
// runs here only when everything Python's key holds is unchanged (the input's sizes, strides, dtype, device and
// requires_grad, the layer's values and bias tensors and their dtype, size and requires_grad, the layer's kernel
// setting and activation, grad mode, autocast, torch.func transforms, deterministic algorithms, the thread count,
// the loops' ISA, kernel_choice's overrides and generation, the backends' generation) and so is what the kept op
// arguments depend on (the pattern module, its CSR buffers and their version counters); also no JIT tracing, no
// torch function or dispatch mode, inference mode as it was, and an input of class torch.Tensor. Otherwise __call__
// returns None and Python's route decides (and keeps a new route). A dense-kernel call whose output's feature 0 is
// not finite also returns None: Python's route then runs the layer's sparse kernel (the dense one ran in vain).
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/csr_engine.h"

namespace py = pybind11;

namespace sparsekern {
namespace route {
namespace {

using OptTensor = std::optional<at::Tensor>;

// What the route calls: the dense kernel, the conv's csr node, the linear's csr node (by its fused activation), or
// the dense op on a view of the values (a full pattern's dense kernel, with torch's own autograd as its twin).
enum class Kind { dense, conv, linear, linear_relu, linear_gelu, full_conv, full_linear };
enum class Act { none, relu, gelu };

c10::OperatorHandle handle(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

// A full pattern's linear as SparseLinear.dense_forward runs it: the narrow kernel (narrow_linear.cpp) for a head of
// at most 16 outputs over float32/float64, else at::linear.
at::Tensor full_linear(const at::Tensor& x, const at::Tensor& w, const OptTensor& bias) {
  static const auto narrow =
      handle("sparsekern::_narrow_linear").typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)>();
  const auto dtype = x.scalar_type();
  if (w.size(0) < 1 || w.size(0) > 16 || (dtype != at::kFloat && dtype != at::kDouble) || w.scalar_type() != dtype ||
      (bias.has_value() && bias->scalar_type() != dtype) || x.dim() < 1 || x.size(-1) != w.size(1))
    return at::linear(x, w, bias);
  if (x.dim() == 2) return narrow.call(x, w, bias);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = w.size(0);
  return narrow.call(x.reshape({-1, w.size(1)}), w, bias).view(sizes);
}

at::Tensor conv_node(const at::Tensor& x, const at::Tensor& values, const OptTensor& bias, const at::Tensor& row_ptr,
                     const at::Tensor& col_idx, at::IntArrayRef ks, at::IntArrayRef st, at::IntArrayRef pad,
                     at::IntArrayRef dil) {
  static const auto op =
      handle("sparsekern::_sparse_conv2d_node")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                            const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>();
  return op.call(x, values, bias, row_ptr, col_idx, ks, st, pad, dil);
}

using LinearNode = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

at::Tensor linear_node(Kind kind, const at::Tensor& x, const at::Tensor& values, const OptTensor& bias,
                       const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& t_row_ptr,
                       const at::Tensor& t_col_idx, const at::Tensor& t_perm) {
  static const auto plain = handle("sparsekern::_sparse_linear_node").typed<LinearNode>();
  static const auto relu = handle("sparsekern::_sparse_linear_relu_node").typed<LinearNode>();
  static const auto gelu = handle("sparsekern::_sparse_linear_gelu_node").typed<LinearNode>();
  const auto& op = kind == Kind::linear_relu ? relu : kind == Kind::linear_gelu ? gelu : plain;
  return op.call(x, values, bias, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm);
}

std::tuple<at::Tensor, bool> dense_kernel(const at::Tensor& x, const at::Tensor& values, const OptTensor& bias,
                                          const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                          const OptTensor& t_row_ptr, const OptTensor& t_col_idx,
                                          const OptTensor& t_perm, const at::Tensor& weight, at::IntArrayRef st,
                                          at::IntArrayRef pad, at::IntArrayRef dil) {
  static const auto op =
      handle("sparsekern::_dense_kernel")
          .typed<std::tuple<at::Tensor, bool>(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                                              const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                              const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                              bool)>();
  return op.call(x, values, bias, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, weight, st, pad, dil, true);
}

// Interned attribute and key names, made once.
struct Names {
  py::str dict{"__dict__"}, params{"_parameters"}, buffers{"_buffers"}, modules{"_modules"}, values{"values"},
      bias{"bias"}, pattern{"pattern"}, row_ptr{"row_ptr"}, col_idx{"col_idx"}, t_row_ptr{"t_row_ptr"},
      t_col_idx{"t_col_idx"}, t_perm{"t_perm"}, kernel{"kernel"}, activation{"_activation"};
};

const Names& names() {
  static const Names* n = new Names();  // never destroyed: Python may be gone at exit
  return *n;
}

// d[key] (borrowed), or nullptr where d is not a dict or has no such key.
PyObject* item(PyObject* d, const py::str& key) {
  return d != nullptr && PyDict_CheckExact(d) ? PyDict_GetItemWithError(d, key.ptr()) : nullptr;
}

bool same(PyObject* a, const py::object& b) {
  if (a == b.ptr()) return true;
  if (a == nullptr || !b) return false;
  const int eq = PyObject_RichCompareBool(a, b.ptr(), Py_EQ);
  if (eq < 0) PyErr_Clear();
  return eq == 1;
}

// The global states a route's call depends on, or that keep a call off any C++ route.
struct Modes {
  bool grad, inference, deterministic;
  int threads;
  csr::Isa isa;
  static Modes now() {
    return {at::GradMode::is_enabled(), c10::InferenceMode::is_enabled(), at::globalContext().deterministicAlgorithms(),
            at::get_num_threads(), csr::isa()};
  }
  bool operator==(const Modes& o) const {
    return grad == o.grad && inference == o.inference && deterministic == o.deterministic && threads == o.threads &&
           isa == o.isa;
  }
};

// A torch.func transform is active: functorch includes its front-mode key in the thread's dispatch keys while its
// layer stack is not empty (what torch._C._are_functorch_transforms_active reads).
bool functorch_active() {
  return c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

// States under which no route runs: Python's path handles them (tracing, modes, transforms, autocast).
bool foreign_state() {
  return torch::jit::tracer::isTracing() || c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
         at::impl::PythonTorchFunctionTLS::stack_len() > 0 || functorch_active() ||
         at::autocast::is_autocast_enabled(at::kCPU);
}

struct Tensors {
  at::Tensor values, row_ptr, col_idx;
  OptTensor bias, t_row_ptr, t_col_idx, t_perm;  // the transpose: a linear's
};

class LayerRoute {
 public:
  // module: the layer (its call just kept Python's route for x); kind: "dense" (a conv's dense kernel),
  // "dense_linear", "conv" or "linear" (the csr nodes), "full_conv" or "full_linear" (a full pattern's dense kernel);
  // watched: the kernel_choice and dispatch modules' dicts with the names to watch in each. The rest: the op's kept
  // arguments (the dense kernel's weight buffer; sizes: the conv node's kernel size, a full pattern's weight shape;
  // the conv's geometry).
  LayerRoute(py::handle module, py::handle x, const std::string& kind, std::optional<at::Tensor> weight,
             std::vector<int64_t> sizes, std::vector<int64_t> stride, std::vector<int64_t> padding,
             std::vector<int64_t> dilation, std::vector<std::pair<py::dict, std::vector<std::string>>> watched)
      : weight_(std::move(weight)),
        sizes_(std::move(sizes)),
        stride_(std::move(stride)),
        padding_(std::move(padding)),
        dilation_(std::move(dilation)) {
    const Names& n = names();
    if (kind == "dense" || kind == "dense_linear") {
      kind_ = Kind::dense;
    } else if (kind == "conv" || kind == "linear") {
      kind_ = kind == "conv" ? Kind::conv : Kind::linear;
    } else if (kind == "full_conv" || kind == "full_linear") {
      kind_ = kind == "full_conv" ? Kind::full_conv : Kind::full_linear;
    } else {
      throw py::value_error("LayerRoute: kind must be 'dense', 'dense_linear', 'conv', 'linear', 'full_conv' or "
                            "'full_linear', got '" +
                            kind + "'");
    }
    transpose_ = kind == "dense_linear" || kind == "linear";
    TORCH_CHECK_VALUE(kind_ != Kind::dense || weight_.has_value(), "LayerRoute: the dense kernel needs its weight");
    py::object d = module.attr(n.dict);
    PyObject* a = item(d.ptr(), n.activation);
    activation_ = py::reinterpret_borrow<py::object>(a != nullptr ? a : Py_None);
    const std::string act_name = activation_.is_none() ? "" : py::str(activation_).cast<std::string>();
    act_ = act_name == "relu" ? Act::relu : act_name == "gelu" ? Act::gelu : Act::none;
    if (kind_ == Kind::linear)
      kind_ = act_ == Act::relu ? Kind::linear_relu : act_ == Act::gelu ? Kind::linear_gelu : kind_;
    kernel_ = module.attr(n.kernel);
    params_ = py::reinterpret_borrow<py::object>(item(d.ptr(), n.params));
    modules_ = py::reinterpret_borrow<py::object>(item(d.ptr(), n.modules));
    pattern_ = py::reinterpret_borrow<py::object>(item(modules_.ptr(), n.pattern));
    values_obj_ = py::reinterpret_borrow<py::object>(item(params_.ptr(), n.values));
    // A layer whose values or pattern live elsewhere (torch.nn.utils.parametrize moves values out of _parameters):
    // Python's route alone.
    const bool held = params_ && modules_ && pattern_ && values_obj_ && THPVariable_Check(values_obj_.ptr()) &&
                      (act_name.empty() || act_ != Act::none);
    bias_obj_ = bias_of(d.ptr());
    for (auto& [dict, keys] : watched)
      for (const std::string& k : keys) {
        PyObject* v = item(dict.ptr(), py::str(k));
        watched_.push_back({dict, py::str(k), py::reinterpret_borrow<py::object>(v != nullptr ? v : Py_None)});
      }
    modes_ = Modes::now();
    usable_ = held && !foreign_state() && THPVariable_CheckExact(x.ptr());
    Tensors t;
    if (usable_ && tensors(d.ptr(), t)) {
      const at::Tensor& xt = THPVariable_Unpack(x.ptr());
      x_sizes_ = xt.sizes().vec();
      x_strides_ = xt.strides().vec();
      x_keys_ = xt.key_set();
      x_dtype_ = xt.scalar_type();
      x_grad_ = xt.requires_grad();
      values_keys_ = t.values.key_set();
      values_dtype_ = t.values.scalar_type();
      values_numel_ = t.values.numel();
      values_grad_ = t.values.requires_grad();
      bias_grad_ = t.bias.has_value() && t.bias->requires_grad();
      row_ptr_ = t.row_ptr;
      col_idx_ = t.col_idx;
      row_ptr_version_ = row_ptr_._version();
      col_idx_version_ = col_idx_._version();
      usable_ = xt.device().is_cpu() && t.values.device().is_cpu();
    } else {
      usable_ = false;
    }
  }

  // Whether this route can ever run (false: a state that keeps every call on Python's path held when it was made).
  bool usable() const { return usable_; }

  // The layer's output for x, or None where Python's route must decide.
  py::object call(py::handle module, py::handle x) {
    if (!usable_ || !THPVariable_CheckExact(x.ptr()) || foreign_state() || !(Modes::now() == modes_)) return py::none();
    const at::Tensor& xt = THPVariable_Unpack(x.ptr());
    if (xt.key_set() != x_keys_ || xt.scalar_type() != x_dtype_ || xt.requires_grad() != x_grad_ ||
        !xt.sizes().equals(x_sizes_) || !xt.strides().equals(x_strides_))
      return py::none();
    for (const Watched& w : watched_)
      if (!same(item(w.dict.ptr(), w.key), w.value)) return py::none();
    const Names& n = names();
    py::object d = module.attr(n.dict);
    if (item(d.ptr(), n.params) != params_.ptr() || item(d.ptr(), n.modules) != modules_.ptr()) return py::none();
    Tensors t;
    if (!tensors(d.ptr(), t)) return py::none();
    PyObject* a = item(d.ptr(), n.activation);
    if (!same(a != nullptr ? a : Py_None, activation_)) return py::none();
    PyObject* k = item(d.ptr(), n.kernel);
    if (k == nullptr) {  // the class's
      py::object kk = module.attr(n.kernel);
      if (!same(kk.ptr(), kernel_)) return py::none();
    } else if (!same(k, kernel_)) {
      return py::none();
    }
    if (PyErr_Occurred()) throw py::error_already_set();
    at::Tensor y;
    {
      py::gil_scoped_release no_gil;
      y = run(xt, t);
    }
    if (!y.defined()) return py::none();
    return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(y)));
  }

 private:
  struct Watched {
    py::dict dict;
    py::str key;
    py::object value;
  };

  // The layer's bias (None included) from its __dict__ d, as nn.Module's attribute lookup finds it.
  static py::object bias_of(PyObject* d) {
    const Names& n = names();
    PyObject* b = item(item(d, n.params), n.bias);
    if (b != nullptr) return py::reinterpret_borrow<py::object>(b);
    PyObject* own = item(d, n.bias);  // a bias of None set as a plain attribute
    return py::reinterpret_borrow<py::object>(own != nullptr ? own : Py_None);
  }

  // The call's tensors, read from the layer's __dict__ d as Python's route reads them; false where they are not the
  // ones this route was made for (another values or bias tensor, another pattern, CSR buffers written since).
  bool tensors(PyObject* d, Tensors& t) const {
    const Names& n = names();
    PyObject* values = item(params_.ptr(), n.values);
    if (values != values_obj_.ptr() || item(modules_.ptr(), n.pattern) != pattern_.ptr()) return false;
    const py::object bias = bias_of(d);
    if (bias.ptr() != bias_obj_.ptr()) return false;
    py::object pd = pattern_.attr(n.dict);
    PyObject* buffers = item(pd.ptr(), n.buffers);
    PyObject* rp = item(buffers, n.row_ptr);
    PyObject* ci = item(buffers, n.col_idx);
    if (rp == nullptr || ci == nullptr || !THPVariable_Check(rp) || !THPVariable_Check(ci)) return false;
    t.values = THPVariable_Unpack(values);
    t.row_ptr = THPVariable_Unpack(rp);
    t.col_idx = THPVariable_Unpack(ci);
    if (!bias.is_none()) {
      if (!THPVariable_Check(bias.ptr())) return false;
      t.bias = THPVariable_Unpack(bias.ptr());
    }
    if (row_ptr_.defined()) {  // (made: the same tensors, unchanged since)
      if (!t.row_ptr.is_same(row_ptr_) || !t.col_idx.is_same(col_idx_) || t.row_ptr._version() != row_ptr_version_ ||
          t.col_idx._version() != col_idx_version_)
        return false;
      if (t.values.key_set() != values_keys_ || t.values.scalar_type() != values_dtype_ ||
          t.values.numel() != values_numel_ || t.values.requires_grad() != values_grad_ ||
          (t.bias.has_value() && t.bias->requires_grad()) != bias_grad_)
        return false;
    }
    if (transpose_) {
      PyObject* tr[3] = {item(buffers, n.t_row_ptr), item(buffers, n.t_col_idx), item(buffers, n.t_perm)};
      for (PyObject* b : tr)
        if (b == nullptr || !THPVariable_Check(b)) return false;
      t.t_row_ptr = THPVariable_Unpack(tr[0]);
      t.t_col_idx = THPVariable_Unpack(tr[1]);
      t.t_perm = THPVariable_Unpack(tr[2]);
    }
    return true;
  }

  // The layer's fused activation (a linear's), as F.relu / F.gelu (exact) apply it.
  at::Tensor activate(const at::Tensor& y) const {
    return act_ == Act::relu ? at::relu(y) : act_ == Act::gelu ? at::gelu(y) : y;
  }

  at::Tensor run(const at::Tensor& x, const Tensors& t) const {
    switch (kind_) {
      case Kind::conv:
        return conv_node(x, t.values, t.bias, t.row_ptr, t.col_idx, sizes_, stride_, padding_, dilation_);
      case Kind::full_conv: return at::conv2d(x, t.values.reshape(sizes_), t.bias, stride_, padding_, dilation_);
      case Kind::full_linear: return activate(full_linear(x, t.values.reshape(sizes_), t.bias));
      case Kind::dense: {
        auto [y, finite] = dense_kernel(x, t.values, t.bias, t.row_ptr, t.col_idx, t.t_row_ptr, t.t_col_idx, t.t_perm,
                                        *weight_, stride_, padding_, dilation_);
        if (!finite) return at::Tensor();
        return activate(y);
      }
      default: {
        const int64_t in = x.size(-1);
        const at::Tensor x2 = x.dim() == 2 ? x : x.reshape({x.numel() / std::max<int64_t>(in, 1), in});
        at::Tensor y =
            linear_node(kind_, x2, t.values, t.bias, t.row_ptr, t.col_idx, *t.t_row_ptr, *t.t_col_idx, *t.t_perm);
        if (x.dim() == 2) return y;
        std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
        shape.push_back(y.size(-1));
        return y.reshape(shape);
      }
    }
  }

  Kind kind_ = Kind::dense;
  Act act_ = Act::none;
  OptTensor weight_;
  std::vector<int64_t> sizes_, stride_, padding_, dilation_;
  py::object activation_, kernel_, params_, modules_, pattern_, values_obj_, bias_obj_;
  std::vector<Watched> watched_;
  Modes modes_{};
  bool usable_ = false, transpose_ = false;
  std::vector<int64_t> x_sizes_, x_strides_;
  c10::DispatchKeySet x_keys_, values_keys_;
  c10::ScalarType x_dtype_ = at::kFloat, values_dtype_ = at::kFloat;
  int64_t values_numel_ = 0;
  bool x_grad_ = false, values_grad_ = false, bias_grad_ = false;
  at::Tensor row_ptr_, col_idx_;
  int64_t row_ptr_version_ = 0, col_idx_version_ = 0;
};

}  // namespace

void bind(py::module_& m) {
  py::class_<LayerRoute>(m, "LayerRoute")
      .def(py::init<py::handle, py::handle, const std::string&, std::optional<at::Tensor>, std::vector<int64_t>,
                    std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                    std::vector<std::pair<py::dict, std::vector<std::string>>>>(),
           py::arg("module"), py::arg("x"), py::arg("kind"), py::arg("weight"), py::arg("sizes"), py::arg("stride"),
           py::arg("padding"), py::arg("dilation"), py::arg("watched"))
      .def_property_readonly("usable", &LayerRoute::usable)
      // A copied or pickled layer holds no route (this one reads the original's dicts): None, made again on a call.
      .def("__deepcopy__", [](const LayerRoute&, py::handle) { return py::none(); })
      .def("__reduce__", [](const LayerRoute&) { return py::make_tuple(py::none().get_type(), py::tuple()); })
      .def("__call__", &LayerRoute::call, py::arg("module"), py::arg("x"));
}

}  // namespace route
}  // namespace sparsekern
