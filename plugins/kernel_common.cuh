// Device helpers shared by the plugin kernels (selective_scan.cu, ssd.cu): dtype conversions, softplus, SiLU and
// the shuffle reduction over a group of G lanes. Each kernel file includes it into its own anonymous namespace.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// softplus with torch's threshold rule (v > threshold → v); log1p(exp(v)) is exact enough in fp32.
__device__ __forceinline__ float softplus(float v, float threshold) { return v > threshold ? v : log1pf(expf(v)); }

__device__ __forceinline__ float silu(float v) { return v / (1.f + expf(-v)); }

// Sum over the G lanes of a group (G a power of two, G | 32); every lane of the warp must call it.
template <int G>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int offset = G / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, G);
    return v;
}

}  // namespace
