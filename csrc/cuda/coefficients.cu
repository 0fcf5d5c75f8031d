// Non-template entry points of the coefficient kernels (declared in kernels/coefficients_launch.cuh)
// and, through them, the instantiation of the kernel templates: float statistics only (the GPU
// backends keep float32 statistics for every input dtype). Plain CUDA: no torch headers.
#include "kernels/coefficients_assoc.cuh"
#include "kernels/coefficients_batch.cuh"
#include "kernels/coefficients_ilm.cuh"
#include "kernels/coefficients_launch.cuh"

namespace nf {

cudaError_t launch_bin_coefficients(const BatchCoefParams<float>& p, cudaStream_t stream) {
  return launch_batch_coef_forward<coef::BinMath<float>>(p, stream);
}
cudaError_t launch_bin_coefficients_backward(const BatchCoefParams<float>& p, cudaStream_t stream) {
  return launch_batch_coef_backward<coef::BinMath<float>>(p, stream);
}
cudaError_t launch_iebn_coefficients(const BatchCoefParams<float>& p, cudaStream_t stream) {
  return launch_batch_coef_forward<coef::IebnMath<float>>(p, stream);
}
cudaError_t launch_iebn_coefficients_backward(const BatchCoefParams<float>& p, cudaStream_t stream) {
  return launch_batch_coef_backward<coef::IebnMath<float>>(p, stream);
}
cudaError_t launch_assoc_coefficients(const AssocCoefParams<float>& p, cudaStream_t stream) {
  return launch_assoc_coef_forward(p, stream);
}
cudaError_t launch_assoc_coefficients_backward(const AssocCoefParams<float>& p, cudaStream_t stream) {
  return launch_assoc_coef_backward(p, stream);
}
cudaError_t launch_ilm_coefficients(const IlmCoefParams<float>& p, cudaStream_t stream) {
  return launch_ilm_coef_forward(p, stream);
}
cudaError_t launch_ilm_coefficients_backward(const IlmCoefParams<float>& p, cudaStream_t stream) {
  return launch_ilm_coef_backward(p, stream);
}

}  // namespace nf
