// What the C++ that calls normfuse ops through the dispatcher shares (layer_autograd.cpp,
// layer_steps.cpp, python_layer_step.cpp): typed op handles and the plane size of an input.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>

namespace nf_ops {

// A typed handle of op `name` ("normfuse::moments"), looked up once by the caller (keep it in a
// static): a signature that does not match ops.cpp throws at the lookup instead of miscompiling.
template <class Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Elements of one (n, c) plane: the product of the spatial sizes (1 for (N, C) inputs).
inline int64_t plane_size(const at::Tensor& x) {
  int64_t plane = 1;
  for (int64_t d = 2; d < x.dim(); ++d) plane *= x.size(d);
  return plane;
}

}  // namespace nf_ops
