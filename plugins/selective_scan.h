/* mamba-deploy selective-scan kernels: the C ABI.
 *
 * One shared library (libmamba_scan.so) with two launchers, used by the TensorRT IPluginV3 plugins
 * (mamba_deploy/trt/plugin.py, through ctypes) and testable on their own (tests/test_plugin_kernels_gpu.py).
 *
 * Math (Mamba-1 S6, Gu & Dao 2023), per batch b, channel d, state index n; all arithmetic in fp32:
 *     δ_t  = softplus(δ_raw_t + δ_bias)        (if delta_softplus; softplus(v) = v when v > threshold)
 *     h_t  = exp(δ_t·A[d,n])·h_{t−1} + δ_t·B_t[n]·x_t
 *     y_t  = (Σ_n h_t[n]·C_t[n] + D[d]·x_t) · SiLU(z_t)
 *
 * Layouts (row-major, contiguous):
 *   step:  x, delta, z, y [batch, dim]       B, C [batch, dstate]
 *   scan:  x, delta, z, y [batch, dim, L]    B, C [batch, dstate, L]
 *   both:  A [dim, dstate] fp32; D, delta_bias [dim] fp32 (may be NULL: treated as 0);
 *          z may be NULL (no gate); state_in / state_out [batch, dim, dstate] fp32.
 * x, delta, z, B, C and y share the activation dtype `dtype` (MAMBA_SCAN_F32 / F16 / BF16).
 * state_out may equal state_in (in-place update); every other output must not alias an input.
 *
 * Limits: 1 <= dstate <= 256; batch, dim, seqlen >= 0 (zero sizes launch nothing).
 * Returns 0 on success, else a cudaError_t value (cudaErrorInvalidValue = 1 for bad arguments).
 * Kernels are launched asynchronously on `stream`; nothing synchronizes.
 */
#ifndef MAMBA_DEPLOY_SELECTIVE_SCAN_H
#define MAMBA_DEPLOY_SELECTIVE_SCAN_H

#ifdef __cplusplus
extern "C" {
#endif

#define MAMBA_SCAN_ABI_VERSION 2  /* 2: the library also holds the Mamba-2 kernels of ssd.h */
#define MAMBA_SCAN_MAX_DSTATE 256

enum mamba_scan_dtype { MAMBA_SCAN_F32 = 0, MAMBA_SCAN_F16 = 1, MAMBA_SCAN_BF16 = 2 };

int mamba_scan_abi_version(void);

/* One decode step for a batch. */
int mamba_selective_scan_step(const void* x, const void* delta, const float* A, const void* B, const void* C,
                              const float* D, const float* delta_bias, const void* z,
                              const float* state_in, float* state_out, void* y,
                              long long batch, long long dim, int dstate, int dtype,
                              int delta_softplus, float softplus_threshold, void* stream);

/* The scan over a sequence of length seqlen from state_in; writes every y and the final state. */
int mamba_selective_scan(const void* x, const void* delta, const float* A, const void* B, const void* C,
                         const float* D, const float* delta_bias, const void* z,
                         const float* state_in, float* state_out, void* y,
                         long long batch, long long dim, long long seqlen, int dstate, int dtype,
                         int delta_softplus, float softplus_threshold, void* stream);

/* cudaGetErrorString for a code returned above. */
const char* mamba_scan_error_string(int code);

#ifdef __cplusplus
}
#endif
#endif
