// normfuse._C.batch_layer_step / assoc_layer_step / ilm_layer_step: a module call's common path as
// one C call.
//
// A BIN / IEBN / AssocNorm / ILMNorm module call on the compiled backends used to be, in Python: read the
// parameters and buffers, a predicate over every check (normfuse/_checks.py), the backend choice,
// dtype and layout handling (normfuse/_autograd.py: run_layer), then the whole-layer op through
// torch's generic custom-op binding (arguments boxed one by one against the schema). About 8 us
// of host time a call on a 2-core CI machine: half the forward of a small layer (issue 13, host
// cost). Here the same conditions are tested in C and the op is called unboxed.
//
// Contract: the function either returns the layer's output, computed exactly as the Python
// common path computes it (same op, same arguments), or returns NotImplemented, and then the
// caller runs its Python path, which checks everything in the documented order, raises the
// documented error or converts what needs converting. It declines (NotImplemented) whenever it is
// not sure: a tensor subclass, a parameter or buffer that is not a dense contiguous tensor of the
// accumulation dtype (float32, float64 for float64 input), an input neither contiguous nor
// channels-last, momentum=None, an activation other than None / "relu", a device the current
// backend setting does not run on the compiled ops (`devices`: bit 0 CPU, bit 1 CUDA, from
// normfuse.backends.compiled_devices()), a torch-function mode. The caller tests what only Python
// knows (torch.compile tracing, forward-mode AD levels, functorch transforms) before calling.
// Nothing is mutated before the op runs, and the op checks again what it relies on.
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "common/op_handles.h"
#include "common/torch_glue.h"

namespace {

using nf_ops::find;

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---- argument reading: every function answers "not sure" (false / nullopt) rather than raise ----

// A plain tensor (Tensor or Parameter, no subclass), else nullptr.
const Tensor* plain_tensor(PyObject* o) {
  if (o == nullptr || !THPVariable_CheckExact(o)) return nullptr;
  const Tensor& t = THPVariable_Unpack(o);
  if (!t.defined() || t.layout() != at::kStrided || t.is_nested() ||
      t.unsafeGetTensorImpl()->has_symbolic_sizes_strides())
    return nullptr;
  return &t;
}

// A parameter or statistic the kernels read as is: (size,) dense, acc dtype, on the input's device.
bool vector_ok(const Tensor& t, const Tensor& input, at::ScalarType acc, int64_t size) {
  return t.dim() == 1 && t.size(0) == size && t.scalar_type() == acc && t.device() == input.device() &&
         t.is_contiguous();
}

bool matrix_ok(const Tensor& t, const Tensor& input, at::ScalarType acc, int64_t rows, int64_t cols) {
  return t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.scalar_type() == acc &&
         t.device() == input.device() && t.is_contiguous();
}

// A finite number >= 0 (int or float, not bool), as normfuse._checks.check_number wants.
std::optional<double> number(PyObject* o) {
  double v = 0.0;
  if (PyFloat_CheckExact(o)) {
    v = PyFloat_AS_DOUBLE(o);
  } else if (PyLong_CheckExact(o)) {
    v = PyLong_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return std::nullopt;
    }
  } else {
    return std::nullopt;
  }
  if (!std::isfinite(v) || v < 0.0) return std::nullopt;
  return v;
}

std::optional<int64_t> integer(PyObject* o) {
  if (!PyLong_CheckExact(o)) return std::nullopt;
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow || (v == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return std::nullopt;
  }
  return static_cast<int64_t>(v);
}

// Py_True / Py_False only.
std::optional<bool> flag(PyObject* o) {
  if (o == Py_True) return true;
  if (o == Py_False) return false;
  return std::nullopt;
}

// The fused activation: None -> false, "relu" -> true, anything else -> not sure.
std::optional<bool> relu_flag(PyObject* o) {
  if (o == Py_None) return false;
  if (PyUnicode_CheckExact(o) && PyUnicode_CompareWithASCIIString(o, "relu") == 0) return true;
  return std::nullopt;
}

// An inference tensor (torch.inference_mode) outside inference mode: autograd cannot save it and
// torch refuses to update it in place there; the checked path says which (normfuse/_checks.py).
bool inference_outside(const Tensor& t) {
  return t.is_inference() && !c10::InferenceMode::is_enabled();
}

// An inference tensor a call may save for its backward (grad mode on: whether anything requires
// grad is the checked path's question); under no_grad nothing is saved.
bool saved_inference(const Tensor& t) {
  return inference_outside(t) && c10::GradMode::is_enabled();
}

// The input: a plain floating tensor of one of `ranks` (a tuple of ints), not empty, contiguous or
// channels-last (C innermost), on a device the compiled backend runs under the current setting.
const Tensor* input_ok(PyObject* o, PyObject* ranks, int64_t devices) {
  const Tensor* x = plain_tensor(o);
  if (x == nullptr || inference_outside(*x)) return nullptr;
  const at::ScalarType dt = x->scalar_type();
  if (dt != at::kFloat && dt != at::kHalf && dt != at::kBFloat16 && dt != at::kDouble) return nullptr;
  if (x->is_cpu()) {
    if (!(devices & 1)) return nullptr;
  } else if (x->is_cuda()) {
    if (!(devices & 2) || dt == at::kDouble) return nullptr;  // "auto": float64 on a GPU -> torch
  } else {
    return nullptr;
  }
  const int64_t dim = x->dim();
  bool rank_ok = false;
  if (!PyTuple_Check(ranks)) return nullptr;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(ranks); ++i) {
    const auto r = integer(PyTuple_GET_ITEM(ranks, i));
    if (r && *r == dim) rank_ok = true;
  }
  if (!rank_ok || x->numel() == 0) return nullptr;
  if (x->is_contiguous() || nf_glue::is_channels_last_dense(*x)) return x;
  return nullptr;
}

// A value of a module's _parameters / _buffers dict (borrowed): nullptr when missing (the caller
// declines). Keys are interned once: a lookup then hashes nothing and compares pointers.
PyObject* entry(PyObject* dict, const char* name) {
  if (!PyDict_CheckExact(dict)) return nullptr;
  static std::vector<std::pair<const char*, PyObject*>> keys;  // a handful of names; GIL held
  PyObject* key = nullptr;
  for (const auto& [n, k] : keys) {
    if (n == name) key = k;  // the same string literal: compare the pointers
  }
  if (key == nullptr) {
    key = PyUnicode_InternFromString(name);
    if (key == nullptr) {
      PyErr_Clear();
      return nullptr;
    }
    keys.emplace_back(name, key);
  }
  PyObject* v = PyDict_GetItemWithError(dict, key);
  if (v == nullptr) PyErr_Clear();
  return v;
}

// A parameter: nullopt when absent (None, allowed only when `optional`); *ok false when not sure.
OptTensor parameter(PyObject* params, const char* name, bool optional, const Tensor& x, at::ScalarType acc,
                    int64_t size, bool* ok) {
  PyObject* o = entry(params, name);
  if (o == nullptr || (o == Py_None && !optional)) {
    *ok = false;
    return std::nullopt;
  }
  if (o == Py_None) return std::nullopt;
  const Tensor* t = plain_tensor(o);
  if (t == nullptr || !vector_ok(*t, x, acc, size) || saved_inference(*t)) {
    *ok = false;  // (an inference tensor autograd may have to save: the checked path decides)
    return std::nullopt;
  }
  return *t;
}

// A running statistic (updated in training) sharing memory with a parameter: not sure (the checked
// path says so).
bool shares_with_running(const OptTensor& rm, const OptTensor& rv, std::initializer_list<const Tensor*> params) {
  if (!rm.has_value()) return false;
  for (const Tensor* p : params) {
    if (p != nullptr && (nf_glue::shares_memory(*rm, *p) || nf_glue::shares_memory(*rv, *p))) return true;
  }
  return false;
}

// The op call without the GIL, as torch's own bindings do; errors become Python exceptions there.
struct ReleasedGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleasedGil() { PyEval_RestoreThread(state); }
};

using BatchOp = Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                       const OptTensor&, bool, double, double, const OptTensor&, bool);
using IebnOp = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                      const OptTensor&, const OptTensor&, bool, double, double, const OptTensor&, bool);
using AssocOp = Tensor(const Tensor&, int64_t, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                       const Tensor&, double, bool);

// batch_layer_step(layer, input, parameters, buffers, training, track_running_stats, momentum,
//                  eps, num_features, activation, ranks, devices)
// layer: 0 BIN (gate, weight?, bias?), 1 IEBN (gate_weight, gate_bias, weight?, bias?); the
// module's _parameters and _buffers dicts; the rest its attributes (ranks: its _ranks tuple).
// Running statistics and the batch counter as nn.BatchNorm uses them (see
// normfuse/modules.py, _BatchStatsNorm._fast_arguments, whose rules this mirrors).
PyObject* batch_layer_step(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 12) {
    PyErr_SetString(PyExc_TypeError, "batch_layer_step takes 12 arguments");
    return nullptr;
  }
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
  const auto layer = integer(args[0]);
  const auto devices = integer(args[11]);
  if (!layer || (*layer != 0 && *layer != 1) || !devices) Py_RETURN_NOTIMPLEMENTED;
  const Tensor* xp = input_ok(args[1], args[10], *devices);
  const auto training = flag(args[4]);
  const auto track = flag(args[5]);
  const auto momentum = number(args[6]);
  const auto eps = number(args[7]);
  const auto channels = integer(args[8]);
  const auto relu = relu_flag(args[9]);
  if (!xp || !training || !track || !momentum || !eps || !channels || !relu) Py_RETURN_NOTIMPLEMENTED;
  const Tensor& x = *xp;
  const int64_t C = x.size(1);
  if (C != *channels) Py_RETURN_NOTIMPLEMENTED;
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  // nn.BatchNorm's rules: batch statistics in training or without running statistics; the running
  // ones updated (and the batch counted) in training with tracking; read in eval.
  PyObject* buffers = args[3];
  PyObject* rm_obj = entry(buffers, "running_mean");
  PyObject* rv_obj = entry(buffers, "running_var");
  PyObject* nbt_obj = entry(buffers, "num_batches_tracked");
  if (rm_obj == nullptr || rv_obj == nullptr || nbt_obj == nullptr) Py_RETURN_NOTIMPLEMENTED;
  OptTensor rm, rv, nbt;
  const bool use_stats = !*training || *track;  // running statistics passed to the op
  if (use_stats && rm_obj != Py_None) {
    const Tensor* m = plain_tensor(rm_obj);
    const Tensor* v = plain_tensor(rv_obj);
    // (one requiring grad with grad mode on: the checked path refuses it, as nn.BatchNorm does)
    // (updated in training: sharing memory with each other or the input; inference tensors,
    // which training may not update and eval may not save for the backward)
    if (m == nullptr || v == nullptr || !vector_ok(*m, x, acc, C) || !vector_ok(*v, x, acc, C) ||
        (*training ? inference_outside(*m) || inference_outside(*v)
                   : saved_inference(*m) || saved_inference(*v)) ||
        (*training && (nf_glue::shares_memory(*m, *v) || nf_glue::shares_memory(*m, x) ||
                       nf_glue::shares_memory(*v, x))) ||
        ((m->requires_grad() || v->requires_grad()) && c10::GradMode::is_enabled()))
      Py_RETURN_NOTIMPLEMENTED;
    rm = *m;
    rv = *v;
  } else if (use_stats && rv_obj != Py_None) {
    Py_RETURN_NOTIMPLEMENTED;  // one of the two: the checked path says so
  }
  const bool use_batch = *training || !rm.has_value();
  if (*training && *track) {
    const Tensor* n = plain_tensor(nbt_obj);
    if (n == nullptr || n->scalar_type() != at::kLong || n->dim() > 1 || n->numel() != 1 ||
        n->device() != x.device() || inference_outside(*n))
      Py_RETURN_NOTIMPLEMENTED;
    nbt = *n;
  }
  if (use_batch && x.numel() <= C) Py_RETURN_NOTIMPLEMENTED;  // one value per channel

  PyObject* params = args[2];
  bool ok = true;
  Tensor y;
  if (*layer == 0) {
    const OptTensor gate = parameter(params, "gate", false, x, acc, C, &ok);
    const OptTensor weight = parameter(params, "weight", true, x, acc, C, &ok);
    const OptTensor bias = parameter(params, "bias", true, x, acc, C, &ok);
    if (!ok || (use_batch && shares_with_running(rm, rv, {&*gate, weight ? &*weight : nullptr, bias ? &*bias : nullptr})))
      Py_RETURN_NOTIMPLEMENTED;
    static const auto op = find<BatchOp>("normfuse::bin_layer");
    ReleasedGil released;
    y = op.call(x, *gate, weight, bias, rm, rv, use_batch, *momentum, *eps, nbt, *relu);
  } else {
    const OptTensor gate_weight = parameter(params, "gate_weight", false, x, acc, C, &ok);
    const OptTensor gate_bias = parameter(params, "gate_bias", false, x, acc, C, &ok);
    const OptTensor weight = parameter(params, "weight", true, x, acc, C, &ok);
    const OptTensor bias = parameter(params, "bias", true, x, acc, C, &ok);
    if (!ok || (use_batch && shares_with_running(rm, rv, {gate_weight ? &*gate_weight : nullptr,
                                                          gate_bias ? &*gate_bias : nullptr,
                                                          weight ? &*weight : nullptr, bias ? &*bias : nullptr})))
      Py_RETURN_NOTIMPLEMENTED;
    static const auto op = find<IebnOp>("normfuse::iebn_layer");
    ReleasedGil released;
    y = op.call(x, *gate_weight, *gate_bias, weight, bias, rm, rv, use_batch, *momentum, *eps, nbt, *relu);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// AssocNorm and ILM-Norm: a GroupNorm whose per-sample weight and bias a meta network predicts
// (encoder (E, K), two decoders (K, E), weight and bias (C,)). AssocNorm's K is the number of groups
// G; ILM-Norm's the number of key groups C / key_group_size, and it wants more than one value per
// group and per key group (its unbiased variances; normfuse/_checks.py: ilm_layer_ok).
struct MetaLayer {
  const char* op;                          // the whole-layer op
  const char* decoders[2];                 // the decoders' parameter names
  bool keyed;                              // ILM-Norm: key groups of key_group_size channels
};
constexpr MetaLayer kAssocLayer{"normfuse::assoc_layer", {"decoder_mean", "decoder_var"}, false};
constexpr MetaLayer kIlmLayer{"normfuse::ilm_layer", {"decoder_weight", "decoder_bias"}, true};

// args: input, parameters, num_channels, num_groups, [key_group_size,] eps, activation, devices.
PyObject* meta_layer_step(const MetaLayer& layer, PyObject* const* args) {
  static PyObject* const all_ranks = Py_BuildValue("(iiii)", 2, 3, 4, 5);
  if (all_ranks == nullptr) {  // out of memory at the first call: not sure of anything
    PyErr_Clear();
    Py_RETURN_NOTIMPLEMENTED;
  }
  const Py_ssize_t k = layer.keyed ? 1 : 0;  // ILM-Norm's extra argument shifts the last three
  const auto devices = integer(args[6 + k]);
  const Tensor* xp = devices ? input_ok(args[0], all_ranks, *devices) : nullptr;
  const auto channels = integer(args[2]);
  const auto groups = integer(args[3]);
  const auto key_group_size = layer.keyed ? integer(args[4]) : std::optional<int64_t>(1);
  const auto eps = number(args[4 + k]);
  const auto relu = relu_flag(args[5 + k]);
  if (!xp || !channels || !groups || !key_group_size || !eps || !relu) Py_RETURN_NOTIMPLEMENTED;
  const Tensor& x = *xp;
  const int64_t C = x.size(1), G = *groups, S = *key_group_size;
  if (C != *channels || G <= 0 || C % G != 0 || S <= 0 || C % S != 0) Py_RETURN_NOTIMPLEMENTED;
  const int64_t K = layer.keyed ? C / S : G;  // the meta network's width
  if (layer.keyed) {
    const int64_t plane = x.numel() / (x.size(0) * C);
    if ((C / G) * plane <= 1 || S * plane <= 1) Py_RETURN_NOTIMPLEMENTED;  // one value per (key) group
  }
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  PyObject* params = args[1];
  const Tensor* enc = plain_tensor(entry(params, "encoder"));
  const Tensor* dec0 = plain_tensor(entry(params, layer.decoders[0]));
  const Tensor* dec1 = plain_tensor(entry(params, layer.decoders[1]));
  if (!enc || !dec0 || !dec1 || enc->dim() != 2 || enc->size(0) == 0) Py_RETURN_NOTIMPLEMENTED;
  const int64_t E = enc->size(0);
  if (!matrix_ok(*enc, x, acc, E, K) || !matrix_ok(*dec0, x, acc, K, E) || !matrix_ok(*dec1, x, acc, K, E) ||
      saved_inference(*enc) || saved_inference(*dec0) || saved_inference(*dec1))
    Py_RETURN_NOTIMPLEMENTED;  // (an inference tensor autograd may have to save: the checks decide)
  bool ok = true;
  const OptTensor weight = parameter(params, "weight", false, x, acc, C, &ok);
  const OptTensor bias = parameter(params, "bias", false, x, acc, C, &ok);
  if (!ok) Py_RETURN_NOTIMPLEMENTED;
  // Both ops share one schema (csrc/ops.cpp); one handle each.
  static const auto assoc_op = find<AssocOp>(kAssocLayer.op);
  static const auto ilm_op = find<AssocOp>(kIlmLayer.op);
  const auto& op = layer.keyed ? ilm_op : assoc_op;
  // Owning copies (reference counts, not data) before the GIL goes: the pointers above borrow
  // from the module's _parameters dict, which another thread may change meanwhile (m.encoder =
  // ..., load_state_dict(assign=True)) and so free the tensor the op reads. (x is the caller's
  // argument: alive for the call.)
  const Tensor encoder = *enc, decoder0 = *dec0, decoder1 = *dec1;
  Tensor y;
  {
    ReleasedGil released;
    y = op.call(x, G, encoder, decoder0, decoder1, *weight, *bias, *eps, *relu);
  }
  return THPVariable_Wrap(std::move(y));
}

// assoc_layer_step(input, parameters, num_channels, num_groups, eps, activation, devices): AssocNorm
// (encoder (M, G), decoder_mean and decoder_var (G, M), weight and bias (C,)).
PyObject* assoc_layer_step(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7) {
    PyErr_SetString(PyExc_TypeError, "assoc_layer_step takes 7 arguments");
    return nullptr;
  }
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
  return meta_layer_step(kAssocLayer, args);
  END_HANDLE_TH_ERRORS
}

// ilm_layer_step(input, parameters, num_channels, num_groups, key_group_size, eps, activation,
// devices): ILMNorm (encoder (E, K), decoder_weight and decoder_bias (K, E), weight and bias (C,),
// K = C / key_group_size). `devices` leaves out those whose ILM kernels are not yet trusted
// (normfuse/_autograd.py: _ILM_KERNELS).
PyObject* ilm_layer_step(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 8) {
    PyErr_SetString(PyExc_TypeError, "ilm_layer_step takes 8 arguments");
    return nullptr;
  }
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
  return meta_layer_step(kIlmLayer, args);
  END_HANDLE_TH_ERRORS
}

#ifdef NORMFUSE_WITH_CUDA
}  // namespace
namespace nf_glue {  // csrc/cuda/layer_steps_cuda.cpp, csrc/cuda/layer_directions_cuda.cpp
const char* fused_steps();
bool set_fused_steps(const char* mode);
const char* single_read();
bool set_single_read(const char* mode);
int64_t single_read_launches();
}  // namespace nf_glue
namespace {

// A run-time switch of the CUDA kernels' paths, for the bench that validates them: returns the
// previous mode, and sets `mode` when one is given (positional, a str; None leaves it).
PyObject* mode_switch(PyObject* const* args, Py_ssize_t nargs, const char* (*get)(), bool (*set)(const char*),
                      const char* usage) {
  HANDLE_TH_ERRORS
  const char* previous = get();
  if (nargs > 1 || (nargs == 1 && args[0] != Py_None && !PyUnicode_Check(args[0]))) {
    PyErr_Format(PyExc_TypeError, "%s", usage);
    return nullptr;
  }
  if (nargs == 1 && args[0] != Py_None) {
    const char* mode = PyUnicode_AsUTF8(args[0]);
    if (mode == nullptr) return nullptr;
    if (!set(mode)) {
      PyErr_Format(PyExc_ValueError, "%s, got '%s'", usage, mode);
      return nullptr;
    }
  }
  return PyUnicode_FromString(previous);
  END_HANDLE_TH_ERRORS
}

// fused_steps([mode]): whether a CUDA BIN / IEBN layer step computes its coefficients in the
// reduction's launch ("auto": the small ones, "1": always, "0": never; bench/steps_probe.py).
PyObject* fused_steps(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  return mode_switch(args, nargs, nf_glue::fused_steps, nf_glue::set_fused_steps,
                     "fused_steps([mode]): mode must be '0', '1', 'auto' or None");
}

// single_read([mode]): whether a CUDA BIN / IEBN layer direction runs as one cooperative launch
// when it fits on the GPU ("auto") or never ("0", the default; kernels/single_read.cuh).
PyObject* single_read(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  return mode_switch(args, nargs, nf_glue::single_read, nf_glue::set_single_read,
                     "single_read([mode]): mode must be '0', 'auto' or None");
}

// single_read_launches(): how many single-read launches this process has made (which path ran).
PyObject* single_read_launches(PyObject* /*self*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(static_cast<long long>(nf_glue::single_read_launches()));
}
#endif

}  // namespace

std::vector<PyMethodDef>& nf_module_methods();  // csrc/ops.cpp

namespace {

const bool registered = [] {
  nf_module_methods().push_back(
      {"batch_layer_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(batch_layer_step)),
       METH_FASTCALL, "BIN / IEBN module call's common path (csrc/python_layer_step.cpp)."});
  nf_module_methods().push_back(
      {"assoc_layer_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(assoc_layer_step)),
       METH_FASTCALL, "AssocNorm module call's common path (csrc/python_layer_step.cpp)."});
  nf_module_methods().push_back(
      {"ilm_layer_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(ilm_layer_step)),
       METH_FASTCALL, "ILMNorm module call's common path (csrc/python_layer_step.cpp)."});
#ifdef NORMFUSE_WITH_CUDA
  nf_module_methods().push_back(
      {"fused_steps", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fused_steps)), METH_FASTCALL,
       "fused_steps([mode]): CUDA layer steps' fusion mode (bench)."});
  nf_module_methods().push_back(
      {"single_read", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(single_read)), METH_FASTCALL,
       "single_read([mode]): CUDA layer directions' single-read mode, '0' or 'auto' (bench)."});
  nf_module_methods().push_back({"single_read_launches", single_read_launches, METH_NOARGS,
                                 "single_read_launches(): single-read launches made by this process."});
#endif
  return true;
}();

}  // namespace
