// mamba-deploy selective-scan kernels (decode step and sequence scan). C ABI and math: selective_scan.h.
// Reference implementation (ground truth of the tests): mamba_deploy/ops/selective_scan.py
// (selective_state_update, selective_scan_ref).
//
// Work split, both kernels: a group of G lanes (G = 4…32, a power of two, G | 32) owns one (batch, channel) row;
// lane j of the group keeps h[n] for n = j, j+G, j+2G, … in registers (PER = ⌈N/G⌉ ≤ 8 values), so a row's N
// state values are read and written once, coalesced, and ⟨h, C⟩ is a shuffle reduction inside the group.
// A block of 128 threads holds 128/G consecutive channels of one batch element.
//
// Scan kernel: time runs sequentially; per chunk of TC steps the block stages B, C (shared by all its rows,
// transposed to [t][n] so a group's lanes read consecutive banks) and the rows' x, δ, SiLU(z) in shared memory,
// with coalesced loads along L, and writes y back through shared memory, coalesced.
#include <cstdint>

#include "kernel_common.cuh"
#include "selective_scan.h"

namespace {

constexpr int kThreads = 128;

struct Params {
    const void* x;
    const void* delta;
    const float* A;
    const void* B;
    const void* C;
    const float* D;
    const float* delta_bias;
    const void* z;
    const float* state_in;
    float* state_out;
    void* y;
    int64_t batch, dim, seqlen;
    int dstate;
    int delta_softplus;
    float softplus_threshold;
};

// δ = softplus(v) with torch's threshold rule (v > threshold → v).
__device__ __forceinline__ float discretize_delta(float v, const Params& p) {
    return p.delta_softplus ? softplus(v, p.softplus_threshold) : v;
}

// ---------------------------------------------------------------------------------------------------------------
// Decode step: grid (⌈dim / rows⌉, batch).
template <typename T, int G, int PER>
__global__ void __launch_bounds__(kThreads) step_kernel(Params p) {
    constexpr int kRows = kThreads / G;
    const int j = threadIdx.x % G;
    const int64_t b = blockIdx.y;
    const int64_t d = int64_t(blockIdx.x) * kRows + threadIdx.x / G;
    const bool valid = d < p.dim;  // no early return: the whole warp takes part in the shuffles
    const int N = p.dstate;
    const int64_t row = b * p.dim + d;

    float x = 0.f, dt = 0.f, gate = 1.f, Dd = 0.f;
    if (valid) {
        x = to_f32(static_cast<const T*>(p.x)[row]);
        const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
        dt = discretize_delta(to_f32(static_cast<const T*>(p.delta)[row]) + bias, p);
        if (p.z) gate = silu(to_f32(static_cast<const T*>(p.z)[row]));
        if (p.D) Dd = p.D[d];
    }
    const T* Bb = static_cast<const T*>(p.B) + b * N;
    const T* Cb = static_cast<const T*>(p.C) + b * N;
    const float dtx = dt * x;
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int n = j + k * G;
        if (valid && n < N) {
            const int64_t s = row * N + n;
            const float h = expf(dt * p.A[d * N + n]) * p.state_in[s] + dtx * to_f32(Bb[n]);
            p.state_out[s] = h;  // in place is safe: this lane read state_in[s] just above
            acc += h * to_f32(Cb[n]);
        }
    }
    acc = group_sum<G>(acc);
    if (valid && j == 0) static_cast<T*>(p.y)[row] = from_f32<T>((acc + Dd * x) * gate);
}

// ---------------------------------------------------------------------------------------------------------------
// Sequence scan: grid (⌈dim / rows⌉, batch); dynamic shared memory, see scan_smem_floats().
__host__ __device__ inline int scan_chunk_len(int N) {
    int tc = 4096 / N;  // keeps B and C tiles at ≤ 32 KiB
    return tc > 64 ? 64 : (tc < 8 ? 8 : tc);
}
__host__ __device__ inline int padded(int n) { return n | 1; }  // odd row stride: no bank conflicts

template <int G>
__host__ __device__ inline size_t scan_smem_floats(int N) {
    const int tc = scan_chunk_len(N);
    return size_t(2) * tc * padded(N) + size_t(3) * (kThreads / G) * padded(tc);
}

template <typename T, int G, int PER>
__global__ void __launch_bounds__(kThreads) scan_kernel(Params p) {
    constexpr int kRows = kThreads / G;
    extern __shared__ float smem[];
    const int N = p.dstate;
    const int TC = scan_chunk_len(N);
    const int NP = padded(N), TP = padded(TC);
    float* sB = smem;                    // [TC][NP]
    float* sC = sB + TC * NP;            // [TC][NP]
    float* sX = sC + TC * NP;            // [kRows][TP]  x, later reused for y
    float* sDt = sX + kRows * TP;        // [kRows][TP]  δ (discretized)
    float* sG = sDt + kRows * TP;        // [kRows][TP]  SiLU(z)

    const int tid = threadIdx.x;
    const int j = tid % G;
    const int r = tid / G;
    const int64_t b = blockIdx.y;
    const int64_t d0 = int64_t(blockIdx.x) * kRows;
    const int64_t d = d0 + r;
    const bool valid = d < p.dim;
    const int64_t L = p.seqlen;
    const int64_t row = b * p.dim + d;

    float h[PER], a[PER];
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int n = j + k * G;
        const bool on = valid && n < N;
        h[k] = on ? p.state_in[row * N + n] : 0.f;
        a[k] = on ? p.A[d * N + n] : 0.f;
    }
    const float Dd = (valid && p.D) ? p.D[d] : 0.f;
    const T* xg = static_cast<const T*>(p.x);
    const T* dg = static_cast<const T*>(p.delta);
    const T* zg = static_cast<const T*>(p.z);
    const T* Bg = static_cast<const T*>(p.B) + b * N * L;
    const T* Cg = static_cast<const T*>(p.C) + b * N * L;
    T* yg = static_cast<T*>(p.y);

    for (int64_t t0 = 0; t0 < L; t0 += TC) {
        const int tc = int(L - t0 < TC ? L - t0 : TC);
        __syncthreads();  // the previous chunk's y has been written out
        for (int i = tid; i < N * TC; i += kThreads) {  // consecutive i → consecutive t: coalesced reads
            const int n = i / TC, t = i % TC;
            if (t < tc) {
                sB[t * NP + n] = to_f32(Bg[int64_t(n) * L + t0 + t]);
                sC[t * NP + n] = to_f32(Cg[int64_t(n) * L + t0 + t]);
            }
        }
        for (int i = tid; i < kRows * TC; i += kThreads) {
            const int rr = i / TC, t = i % TC;
            const int64_t dd = d0 + rr;
            if (t < tc && dd < p.dim) {
                const int64_t e = (b * p.dim + dd) * L + t0 + t;
                const float bias = p.delta_bias ? p.delta_bias[dd] : 0.f;
                sX[rr * TP + t] = to_f32(xg[e]);
                sDt[rr * TP + t] = discretize_delta(to_f32(dg[e]) + bias, p);
                sG[rr * TP + t] = zg ? silu(to_f32(zg[e])) : 1.f;
            }
        }
        __syncthreads();
        for (int t = 0; t < tc; ++t) {
            const float dt = sDt[r * TP + t];
            const float x = sX[r * TP + t];
            const float dtx = dt * x;
            float acc = 0.f;
#pragma unroll
            for (int k = 0; k < PER; ++k) {
                const int n = j + k * G;
                if (n < N) {
                    h[k] = expf(dt * a[k]) * h[k] + dtx * sB[t * NP + n];
                    acc += h[k] * sC[t * NP + n];
                }
            }
            acc = group_sum<G>(acc);
            if (j == 0) sX[r * TP + t] = (acc + Dd * x) * sG[r * TP + t];  // y replaces x (only this row reads it)
        }
        __syncthreads();
        for (int i = tid; i < kRows * TC; i += kThreads) {
            const int rr = i / TC, t = i % TC;
            const int64_t dd = d0 + rr;
            if (t < tc && dd < p.dim) yg[(b * p.dim + dd) * L + t0 + t] = from_f32<T>(sX[rr * TP + t]);
        }
    }
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int n = j + k * G;
        if (valid && n < N) p.state_out[row * N + n] = h[k];
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side: pick (G, PER) from N, the element type from the dtype code.
template <typename T, int G, int PER>
cudaError_t launch(const Params& p, bool scan, cudaStream_t stream) {
    constexpr int kRows = kThreads / G;
    const dim3 grid(unsigned((p.dim + kRows - 1) / kRows), unsigned(p.batch));
    if (!scan) {
        step_kernel<T, G, PER><<<grid, kThreads, 0, stream>>>(p);
    } else {
        const size_t smem = scan_smem_floats<G>(p.dstate) * sizeof(float);
        if (smem > 48 * 1024) {
            cudaError_t e = cudaFuncSetAttribute(scan_kernel<T, G, PER>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
            if (e != cudaSuccess) return e;
        }
        scan_kernel<T, G, PER><<<grid, kThreads, smem, stream>>>(p);
    }
    return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_shape(const Params& p, bool scan, cudaStream_t s) {
    const int N = p.dstate;
    if (N <= 4) return launch<T, 4, 1>(p, scan, s);
    if (N <= 8) return launch<T, 8, 1>(p, scan, s);
    if (N <= 16) return launch<T, 16, 1>(p, scan, s);
    if (N <= 32) return launch<T, 32, 1>(p, scan, s);
    if (N <= 64) return launch<T, 32, 2>(p, scan, s);
    if (N <= 128) return launch<T, 32, 4>(p, scan, s);
    return launch<T, 32, 8>(p, scan, s);
}

int run(const Params& p, int dtype, bool scan, void* stream) {
    if (p.dstate < 1 || p.dstate > MAMBA_SCAN_MAX_DSTATE || p.batch < 0 || p.dim < 0 || p.seqlen < 0 ||
        p.batch > 65535)
        return int(cudaErrorInvalidValue);
    if (p.batch == 0 || p.dim == 0 || (scan && p.seqlen == 0)) {
        // nothing to compute; the scan still owes the (unchanged) final state
        if (scan && p.batch && p.dim && p.state_out != p.state_in)
            return int(cudaMemcpyAsync(p.state_out, p.state_in, sizeof(float) * p.batch * p.dim * p.dstate,
                                       cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(stream)));
        return 0;
    }
    if (!p.x || !p.delta || !p.A || !p.B || !p.C || !p.state_in || !p.state_out || !p.y)
        return int(cudaErrorInvalidValue);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    switch (dtype) {
        case MAMBA_SCAN_F32: return int(dispatch_shape<float>(p, scan, s));
        case MAMBA_SCAN_F16: return int(dispatch_shape<__half>(p, scan, s));
        case MAMBA_SCAN_BF16: return int(dispatch_shape<__nv_bfloat16>(p, scan, s));
        default: return int(cudaErrorInvalidValue);
    }
}

}  // namespace

extern "C" {

int mamba_scan_abi_version(void) { return MAMBA_SCAN_ABI_VERSION; }

int mamba_selective_scan_step(const void* x, const void* delta, const float* A, const void* B, const void* C,
                              const float* D, const float* delta_bias, const void* z,
                              const float* state_in, float* state_out, void* y,
                              long long batch, long long dim, int dstate, int dtype,
                              int delta_softplus, float softplus_threshold, void* stream) {
    const Params p{x, delta, A, B, C, D, delta_bias, z, state_in, state_out, y,
                   batch, dim, 1, dstate, delta_softplus, softplus_threshold};
    return run(p, dtype, false, stream);
}

int mamba_selective_scan(const void* x, const void* delta, const float* A, const void* B, const void* C,
                         const float* D, const float* delta_bias, const void* z,
                         const float* state_in, float* state_out, void* y,
                         long long batch, long long dim, long long seqlen, int dstate, int dtype,
                         int delta_softplus, float softplus_threshold, void* stream) {
    const Params p{x, delta, A, B, C, D, delta_bias, z, state_in, state_out, y,
                   batch, dim, seqlen, dstate, delta_softplus, softplus_threshold};
    return run(p, dtype, true, stream);
}

const char* mamba_scan_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // extern "C"
