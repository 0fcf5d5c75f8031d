// The op schemas of docs/architecture.md, declared once for every backend of the `normfuse`
// namespace, and the Python module `normfuse._C` (importing it runs the static registrations).
// Implementations register elsewhere with TORCH_LIBRARY_IMPL(normfuse, CPU|CUDA, m); fake (meta)
// implementations live in normfuse/_extension.py.
#include <Python.h>
#include <torch/library.h>

#include <vector>

TORCH_LIBRARY(normfuse, m) {
  // Generic full-tensor kernels (csrc/cpu/generic_ops_cpu.cpp, csrc/cuda/generic_ops_cuda.cpp).
  m.def("moments(Tensor input) -> (Tensor mean, Tensor m2)");
  // Fused ReLU (docs/architecture.md, "Fused activation"): affine_apply(relu=True) writes
  // max(v, 0) of the pre-activation v = (x - mean) * scale + shift; the backward passes, given
  // the forward's scale and shift, recompute v with the forward's arithmetic and use dy only
  // where v > 0 (ReLU's derivative at 0 is 0, as torch's). No mask is saved.
  m.def("affine_apply(Tensor input, Tensor mean, Tensor scale, Tensor shift, bool relu=False) -> Tensor");
  m.def(
      "backward_sums(Tensor grad_output, Tensor input, Tensor mean, Tensor? scale=None, "
      "Tensor? shift=None) -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def(
      "backward_apply(Tensor grad_output, Tensor input, Tensor mean, Tensor c_dy, Tensor c_x, "
      "Tensor c_0, Tensor? scale=None, Tensor? shift=None) -> Tensor");

  // Per-layer coefficient functions (csrc/cpu/coefficients_*.cpp, csrc/cuda/coefficients*).
  // The BIN / IEBN forwards also count the batch: given num_batches_tracked (a 0-dim int64
  // tensor) and training, the kernel that updates the running statistics adds 1 to it, so a
  // module's training forward needs no extra launch for nn.BatchNorm's counter.
  m.def(
      "bin_coefficients(Tensor mean, Tensor m2, SymInt plane_size, Tensor gate, Tensor? weight, "
      "Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, "
      "float momentum, float eps, Tensor(c!)? num_batches_tracked=None) -> (Tensor scale, Tensor shift)");
  m.def(
      "bin_coefficients_backward(Tensor sum_dy, Tensor sum_dy_xmu, Tensor mean, Tensor m2, "
      "SymInt plane_size, Tensor gate, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps) -> (Tensor c_dy, Tensor c_x, Tensor c_0, "
      "Tensor grad_gate, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "iebn_coefficients(Tensor mean, Tensor m2, SymInt plane_size, Tensor gate_weight, "
      "Tensor gate_bias, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, "
      "Tensor(c!)? num_batches_tracked=None) -> (Tensor scale, Tensor shift)");
  m.def(
      "iebn_coefficients_backward(Tensor sum_dy, Tensor sum_dy_xmu, Tensor mean, Tensor m2, "
      "SymInt plane_size, Tensor gate_weight, Tensor gate_bias, Tensor? weight, Tensor? bias, "
      "Tensor? running_mean, Tensor? running_var, bool training, float eps) "
      "-> (Tensor c_dy, Tensor c_x, Tensor c_0, Tensor grad_gate_weight, Tensor grad_gate_bias, "
      "Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "assoc_coefficients(Tensor mean, Tensor m2, SymInt plane_size, int num_groups, Tensor encoder, "
      "Tensor decoder_mean, Tensor decoder_var, Tensor weight, Tensor bias, float eps) "
      "-> (Tensor scale, Tensor shift)");
  m.def(
      "assoc_coefficients_backward(Tensor sum_dy, Tensor sum_dy_xmu, Tensor mean, Tensor m2, "
      "SymInt plane_size, int num_groups, Tensor encoder, Tensor decoder_mean, Tensor decoder_var, "
      "Tensor weight, Tensor bias, float eps) -> (Tensor c_dy, Tensor c_x, Tensor c_0, "
      "Tensor grad_encoder, Tensor grad_decoder_mean, Tensor grad_decoder_var, "
      "Tensor grad_weight, Tensor grad_bias)");
  // ILM-Norm: K = encoder.shape[1] key groups feed the meta network, num_groups groups normalise
  // (normfuse/coefficients/ilm.py). Kernels: CPU (cpu/coefficients_ilm_impl.h), CUDA
  // (kernels/coefficients_ilm.cuh; the cuda backend's layers call them once verified on a GPU,
  // normfuse/_autograd.py _ILM_KERNELS).
  m.def(
      "ilm_coefficients(Tensor mean, Tensor m2, SymInt plane_size, int num_groups, Tensor encoder, "
      "Tensor decoder_weight, Tensor decoder_bias, Tensor weight, Tensor bias, float eps) "
      "-> (Tensor scale, Tensor shift)");
  m.def(
      "ilm_coefficients_backward(Tensor sum_dy, Tensor sum_dy_xmu, Tensor mean, Tensor m2, "
      "SymInt plane_size, int num_groups, Tensor encoder, Tensor decoder_weight, Tensor decoder_bias, "
      "Tensor weight, Tensor bias, float eps) -> (Tensor c_dy, Tensor c_x, Tensor c_0, "
      "Tensor grad_encoder, Tensor grad_decoder_weight, Tensor grad_decoder_bias, "
      "Tensor grad_weight, Tensor grad_bias)");

  // A BIN / IEBN layer's reduction and coefficient step as one op per direction (what the whole-layer
  // ops call): moments then <layer>_coefficients, and backward_sums then
  // <layer>_coefficients_backward, with the same arguments and results (running statistics and
  // num_batches_tracked updated in place in training). One op, so a device can run the coefficient
  // step in the reduction's own launch: on CUDA, for a small layer, the last block of the
  // reduction computes the coefficients (csrc/cuda/layer_steps_cuda.cpp), which takes a kernel
  // launch and its fixed latency off every layer step (issue 13). Elsewhere the composition
  // (csrc/common/layer_compositions.h: through the dispatcher, csrc/layer_steps.cpp; on the CPU the
  // kernels called directly, csrc/cpu/layer_directions_cpu.cpp). plane_size is the input's.
  m.def(
      "bin_moments_coefficients(Tensor input, Tensor gate, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, float eps, "
      "Tensor(c!)? num_batches_tracked=None) -> (Tensor mean, Tensor m2, Tensor scale, Tensor shift)");
  m.def(
      "iebn_moments_coefficients(Tensor input, Tensor gate_weight, Tensor gate_bias, Tensor? weight, "
      "Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, "
      "float eps, Tensor(c!)? num_batches_tracked=None) "
      "-> (Tensor mean, Tensor m2, Tensor scale, Tensor shift)");
  m.def(
      "bin_sums_coefficients_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor m2, "
      "Tensor gate, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "bool training, float eps, Tensor? scale=None, Tensor? shift=None) -> (Tensor c_dy, Tensor c_x, "
      "Tensor c_0, Tensor grad_gate, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "iebn_sums_coefficients_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor m2, "
      "Tensor gate_weight, Tensor gate_bias, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps, Tensor? scale=None, Tensor? shift=None) "
      "-> (Tensor c_dy, Tensor c_x, Tensor c_0, Tensor grad_gate_weight, Tensor grad_gate_bias, "
      "Tensor grad_weight, Tensor grad_bias)");

  // A BIN / IEBN layer's whole direction as one op (what the whole-layer ops call): the layer step
  // then affine_apply(input, mean, scale, shift, relu), and the backward layer step then
  // backward_apply(grad_output, input, mean, c_dy, c_x, c_0, scale, shift), with the same arguments
  // and results (running statistics and num_batches_tracked updated in place in training). One op,
  // so a device can run a whole direction in one launch: on CUDA, when the activation fits on chip,
  // one cooperative launch that reads x (and dy) once (issue 14). Elsewhere the composition
  // (csrc/layer_steps.cpp; on the CPU without inner dispatches, csrc/cpu/layer_directions_cpu.cpp). The
  // statistics and coefficients are returned for the backward (scale and shift: the fused ReLU's mask).
  m.def(
      "bin_layer_forward(Tensor input, Tensor gate, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, float eps, "
      "Tensor(c!)? num_batches_tracked=None, bool relu=False) "
      "-> (Tensor output, Tensor mean, Tensor m2, Tensor scale, Tensor shift)");
  m.def(
      "iebn_layer_forward(Tensor input, Tensor gate_weight, Tensor gate_bias, Tensor? weight, "
      "Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, "
      "float eps, Tensor(c!)? num_batches_tracked=None, bool relu=False) "
      "-> (Tensor output, Tensor mean, Tensor m2, Tensor scale, Tensor shift)");
  m.def(
      "bin_layer_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor m2, Tensor gate, "
      "Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, bool training, "
      "float eps, Tensor? scale=None, Tensor? shift=None) "
      "-> (Tensor grad_input, Tensor grad_gate, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "iebn_layer_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor m2, Tensor gate_weight, "
      "Tensor gate_bias, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "bool training, float eps, Tensor? scale=None, Tensor? shift=None) "
      "-> (Tensor grad_input, Tensor grad_gate_weight, Tensor grad_gate_bias, Tensor grad_weight, "
      "Tensor grad_bias)");

  // IEBN with one value per plane (a 2-d (N, C) input), CPU only (csrc/cpu/iebn_pointwise_*): the
  // gate reads each value itself there, so the layer is computed elementwise from per-channel
  // statistics, mean and rstd (C,): the batch's (the moments of x viewed as one sample) or the running
  // ones. What iebn_layer runs for such an input on the CPU. The backward returns every parameter's
  // gradient (weight's also without a weight: that of a weight of 1); batch_stats: mean and rstd
  // are x's own, and their gradient flows into grad_input.
  m.def(
      "iebn_pointwise_apply(Tensor input, Tensor mean, Tensor rstd, Tensor gate_weight, Tensor gate_bias, "
      "Tensor? weight, Tensor? bias, bool relu=False) -> Tensor");
  m.def(
      "iebn_pointwise_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor rstd, "
      "Tensor gate_weight, Tensor gate_bias, Tensor? weight, Tensor? bias, bool batch_stats, "
      "bool relu=False) -> (Tensor grad_input, Tensor grad_gate_weight, Tensor grad_gate_bias, "
      "Tensor grad_weight, Tensor grad_bias)");

  // An AssocNorm / ILM-Norm layer's whole direction as one op (what the whole-layer ops call):
  // moments -> <layer>_coefficients -> affine_apply(input, mean, scale, shift, relu), and
  // backward_sums -> <layer>_coefficients_backward -> backward_apply, with the same arguments and
  // results. On the CPU one dispatch instead of three per direction (issue 13, host cost); on
  // other devices the composition (csrc/common/layer_compositions.h). Statistics and coefficients
  // returned for the backward as by the BIN / IEBN directions.
  m.def(
      "assoc_layer_forward(Tensor input, int num_groups, Tensor encoder, Tensor decoder_mean, "
      "Tensor decoder_var, Tensor weight, Tensor bias, float eps, bool relu=False) "
      "-> (Tensor output, Tensor mean, Tensor m2, Tensor scale, Tensor shift)");
  m.def(
      "ilm_layer_forward(Tensor input, int num_groups, Tensor encoder, Tensor decoder_weight, "
      "Tensor decoder_bias, Tensor weight, Tensor bias, float eps, bool relu=False) "
      "-> (Tensor output, Tensor mean, Tensor m2, Tensor scale, Tensor shift)");
  m.def(
      "assoc_layer_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor m2, int num_groups, "
      "Tensor encoder, Tensor decoder_mean, Tensor decoder_var, Tensor weight, Tensor bias, float eps, "
      "Tensor? scale=None, Tensor? shift=None) -> (Tensor grad_input, Tensor grad_encoder, "
      "Tensor grad_decoder_mean, Tensor grad_decoder_var, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "ilm_layer_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor m2, int num_groups, "
      "Tensor encoder, Tensor decoder_weight, Tensor decoder_bias, Tensor weight, Tensor bias, float eps, "
      "Tensor? scale=None, Tensor? shift=None) -> (Tensor grad_input, Tensor grad_encoder, "
      "Tensor grad_decoder_weight, Tensor grad_decoder_bias, Tensor grad_weight, Tensor grad_bias)");

  // Whole layers, one op per direction (csrc/layer_autograd.cpp): moments -> coefficients ->
  // affine_apply in one call, and an Autograd kernel whose C++ node runs backward_sums ->
  // coefficients backward -> backward_apply. Same arguments and semantics as the coefficient
  // ops (running statistics and num_batches_tracked updated in place in training); they save the
  // host the Python autograd.Function of a layer step. Double backward goes through
  // normfuse::_layer_backward_graph, defined and implemented in Python (normfuse/_autograd.py).
  m.def(
      "bin_layer(Tensor input, Tensor gate, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, "
      "Tensor(c!)? num_batches_tracked=None, bool relu=False) -> Tensor");
  m.def(
      "iebn_layer(Tensor input, Tensor gate_weight, Tensor gate_bias, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, float eps, "
      "Tensor(c!)? num_batches_tracked=None, bool relu=False) -> Tensor");
  m.def(
      "assoc_layer(Tensor input, int num_groups, Tensor encoder, Tensor decoder_mean, "
      "Tensor decoder_var, Tensor weight, Tensor bias, float eps, bool relu=False) -> Tensor");
  m.def(
      "ilm_layer(Tensor input, int num_groups, Tensor encoder, Tensor decoder_weight, "
      "Tensor decoder_bias, Tensor weight, Tensor bias, float eps, bool relu=False) -> Tensor");
}

// Functions other translation units add to the module: csrc/python_checks.cpp registers
// tensors_ok from a static initializer, which runs when the library is loaded, before PyInit__C.
// A build without that file (the ASan variant of tests/test_cpu_asan.py) has only has_cuda.
std::vector<PyMethodDef>& nf_module_methods() {
  static std::vector<PyMethodDef> methods;
  return methods;
}

namespace {

// Whether the CUDA kernels were compiled into this build (not whether a GPU is visible).
PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef NORMFUSE_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

std::vector<PyMethodDef> methods;

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "normfuse C++/CUDA ops (registered as torch.ops.normfuse.*).", -1, nullptr};

}  // namespace

// Plain CPython module (no pybind11): it only needs a few functions, and it keeps this TU light.
PyMODINIT_FUNC PyInit__C(void) {
  methods = {{"has_cuda", has_cuda, METH_NOARGS, "True if the CUDA kernels were compiled in."}};
  for (const PyMethodDef& m : nf_module_methods()) methods.push_back(m);
  methods.push_back({nullptr, nullptr, 0, nullptr});
  module_def.m_methods = methods.data();
  return PyModule_Create(&module_def);
}
