// normfuse._C.tensors_ok: the per-tensor part of the Python layer's argument checks
// (normfuse/_checks.py, check_tensor) as one C call, for the common path of a layer call.
//
// tensors_ok(input, shape, required, optional) -> bool: True when `input` and every tensor of
// the tuples `required` and `optional` (where None is allowed) are plain tensors (Tensor or
// Parameter, no subclass: a subclass may answer .device / .dtype / .shape differently from its
// TensorImpl), and every such tensor is strided (dense), on the input's device, of a floating dtype (float16,
// bfloat16, float32, float64) and of exactly `shape`. It is a conservative predicate: False means
// only "not sure", and the caller then runs the Python checks, which raise the documented error
// (or pass). It never raises for bad arguments of the checked call. Issue 13: the same checks
// in Python cost ~0.4 us a tensor, a visible share of a small layer's host cost.
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <vector>

namespace {

constexpr Py_ssize_t kMaxDims = 8;

bool floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

bool tensors_ok(PyObject* seq, bool optional, const at::Device& device, c10::IntArrayRef shape) {
  if (!PyTuple_Check(seq)) return false;
  const Py_ssize_t n = PyTuple_GET_SIZE(seq);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* o = PyTuple_GET_ITEM(seq, i);
    if (o == Py_None) {
      if (optional) continue;
      return false;
    }
    if (!THPVariable_CheckExact(o)) return false;
    const at::Tensor& t = THPVariable_Unpack(o);
    // Nested or symbolic-size tensors have no plain sizes(), and the checks refuse sparse and
    // other non-strided layouts: leave them all to the Python checks.
    if (!t.defined() || t.layout() != at::kStrided || t.is_nested() ||
        t.unsafeGetTensorImpl()->has_symbolic_sizes_strides())
      return false;
    if (t.device() != device || !floating(t.scalar_type()) || t.sizes() != shape) return false;
  }
  return true;
}

}  // namespace

namespace {

PyObject* nf_tensors_ok(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "tensors_ok(input, shape, required, optional) takes 4 arguments");
    return nullptr;
  }
  if (!THPVariable_CheckExact(args[0]) || !PyTuple_Check(args[1])) Py_RETURN_FALSE;
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  if (!input.defined()) Py_RETURN_FALSE;
  const Py_ssize_t ndim = PyTuple_GET_SIZE(args[1]);
  if (ndim > kMaxDims) Py_RETURN_FALSE;
  std::array<int64_t, kMaxDims> dims{};
  for (Py_ssize_t d = 0; d < ndim; ++d) {
    PyObject* item = PyTuple_GET_ITEM(args[1], d);
    if (!PyLong_CheckExact(item)) Py_RETURN_FALSE;
    int overflow = 0;
    dims[d] = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow || (dims[d] == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      Py_RETURN_FALSE;
    }
  }
  const c10::IntArrayRef shape(dims.data(), static_cast<size_t>(ndim));
  const at::Device device = input.device();
  if (tensors_ok(args[2], false, device, shape) && tensors_ok(args[3], true, device, shape)) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

}  // namespace

std::vector<PyMethodDef>& nf_module_methods();  // csrc/ops.cpp

namespace {

// Added to normfuse._C when the library loads (before PyInit__C reads the list).
const bool registered = [] {
  nf_module_methods().push_back(
      {"tensors_ok", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(nf_tensors_ok)), METH_FASTCALL,
       "tensors_ok(input, shape, required, optional): the common path of normfuse/_checks.py "
       "(csrc/python_checks.cpp)."});
  return true;
}();

}  // namespace
