// mamba-deploy Mamba-2 (SSD) kernels: decode step and sequence scan. C ABI and math: ssd.h.
// Reference (ground truth of the tests, float64): tests/test_triton_ssd.py (ssd_reference), the recurrence itself.
//
// Work split, both kernels: a group of G lanes owns one (batch, head, head channel) row; lane j keeps h[n] for
// n = j, j+G, … in registers (PER = ⌈N/G⌉ values), so a row's N state values are read and written once and
// ⟨h, C⟩ is a shuffle reduction inside the group. dt and exp(dt·A) are per (batch, head, t): one exp per step
// and row, not per state element.
// Step: G = 32 lanes for N ≥ 32 (coalesced state traffic; the step is memory-bound).
// Scan: fewer lanes per row (more state values per lane: fewer shuffles per FMA); the rows of a block are
// consecutive channels of ONE head, so per chunk of TC steps the block stages that head's B, C (its group), dt,
// exp(dt·A) and its rows' x in shared memory with coalesced loads, and writes y back through shared memory.
// Time runs sequentially inside the block (the recurrence in exact fp32, no cumsum-and-divide).
#include <cstdint>

#include "kernel_common.cuh"
#include "selective_scan.h"
#include "ssd.h"

namespace {

constexpr int kSsdThreads = 128;

struct SsdParams {
    const void* x;
    const void* dt;
    const float* A;
    const void* B;
    const void* C;
    const float* D;
    const float* dt_bias;
    const float* state_in;
    float* state_out;
    void* y;
    int64_t batch, seqlen;
    int nheads, headdim, ngroups, dstate;
    int d_per_channel;
    int dt_softplus;
    float softplus_threshold;
    float dt_min, dt_max;
};

__device__ __forceinline__ float ssd_dt(float raw, int h, const SsdParams& p) {
    float v = raw + (p.dt_bias ? p.dt_bias[h] : 0.f);
    if (p.dt_softplus) v = softplus(v, p.softplus_threshold);
    return fminf(fmaxf(v, p.dt_min), p.dt_max);
}

__device__ __forceinline__ float ssd_D(const SsdParams& p, int h, int c) {
    if (!p.D) return 0.f;
    return p.d_per_channel ? p.D[int64_t(h) * p.headdim + c] : p.D[h];
}

// ---------------------------------------------------------------------------------------------------------------
// Decode step: grid (⌈nheads·headdim / rows⌉, batch).
template <typename T, int G, int PER>
__global__ void __launch_bounds__(kSsdThreads) ssd_step_kernel(SsdParams p) {
    constexpr int kRows = kSsdThreads / G;
    const int j = threadIdx.x % G;
    const int64_t b = blockIdx.y;
    const int64_t HP = int64_t(p.nheads) * p.headdim;
    const int64_t r = int64_t(blockIdx.x) * kRows + threadIdx.x / G;   // h·headdim + c
    const bool valid = r < HP;  // no early return: the whole warp takes part in the shuffles
    const int h = valid ? int(r / p.headdim) : 0;
    const int c = valid ? int(r % p.headdim) : 0;
    const int g = h / (p.nheads / p.ngroups);
    const int N = p.dstate;

    float x = 0.f, dt = 0.f, decay = 1.f, Dd = 0.f;
    if (valid) {
        x = to_f32(static_cast<const T*>(p.x)[b * HP + r]);
        dt = ssd_dt(to_f32(static_cast<const T*>(p.dt)[b * p.nheads + h]), h, p);
        decay = expf(dt * p.A[h]);
        Dd = ssd_D(p, h, c);
    }
    const T* Bb = static_cast<const T*>(p.B) + (b * p.ngroups + g) * N;
    const T* Cb = static_cast<const T*>(p.C) + (b * p.ngroups + g) * N;
    const float dtx = dt * x;
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int n = j + k * G;
        if (valid && n < N) {
            const int64_t s = (b * HP + r) * N + n;
            const float hv = decay * p.state_in[s] + dtx * to_f32(Bb[n]);
            p.state_out[s] = hv;  // in place is safe: this lane read state_in[s] just above
            acc += hv * to_f32(Cb[n]);
        }
    }
    acc = group_sum<G>(acc);
    if (valid && j == 0) static_cast<T*>(p.y)[b * HP + r] = from_f32<T>(acc + Dd * x);
}

// ---------------------------------------------------------------------------------------------------------------
// Sequence scan: grid (⌈headdim / rows⌉, nheads, batch); dynamic shared memory, see ssd_scan_smem_floats().
__host__ __device__ inline int ssd_chunk_len(int N) {
    int tc = 4096 / N;  // keeps the B and C tiles at <= 32 KiB
    return tc > 64 ? 64 : (tc < 16 ? 16 : tc);
}
__host__ __device__ inline int ssd_padded(int n) { return n | 1; }  // odd row stride: no bank conflicts

// State values per lane read from shared memory as float4 when PER is a multiple of 4: lane j owns the float4s
// j, j+G, j+2G, … of a row (consecutive lanes, consecutive 16-byte words: no bank conflicts; the rows of a warp
// read the same words: broadcast), so a step costs PER/4 shared loads per operand instead of PER.
template <int G, int PER>
struct SsdLanes {
    static constexpr int kVec = PER % 4 == 0 ? 4 : 1;
    // row stride of the B/C tiles: G·PER (a multiple of 4, covers every lane's float4s) or odd for scalars
    __host__ __device__ static int row_stride(int N) { return kVec == 4 ? G * PER : ssd_padded(N); }
    __device__ static int n_of(int j, int k) { return (j + (k / kVec) * G) * kVec + k % kVec; }
};

template <int G, int PER>
__host__ __device__ inline size_t ssd_scan_smem_floats(int N) {
    const int tc = ssd_chunk_len(N);
    return size_t(2) * tc * SsdLanes<G, PER>::row_stride(N) + size_t(kSsdThreads / G) * ssd_padded(tc) +
           size_t(2) * tc;
}

template <typename T, int G, int PER>
__global__ void __launch_bounds__(kSsdThreads) ssd_scan_kernel(SsdParams p) {
    constexpr int kRows = kSsdThreads / G;
    extern __shared__ float smem[];
    const int N = p.dstate;
    const int TC = ssd_chunk_len(N);
    using Lanes = SsdLanes<G, PER>;
    const int NP = Lanes::row_stride(N), TP = ssd_padded(TC);
    float* sB = smem;                    // [TC][NP]
    float* sC = sB + TC * NP;            // [TC][NP]
    float* sX = sC + TC * NP;            // [kRows][TP]  x, then y
    float* sDt = sX + kRows * TP;        // [TC]         dt (discretized)
    float* sDec = sDt + TC;              // [TC]         exp(dt·A)

    const int tid = threadIdx.x;
    const int j = tid % G;
    const int rr = tid / G;
    const int64_t b = blockIdx.z;
    const int h = blockIdx.y;
    const int H = p.nheads, P = p.headdim;
    const int c0 = blockIdx.x * kRows;
    const int c = c0 + rr;
    const bool valid = c < P;
    const int g = h / (H / p.ngroups);
    const int64_t L = p.seqlen;
    const int64_t state_row = ((b * H + h) * int64_t(P) + c) * N;
    const float Ah = p.A[h];

    float hs[PER];
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int n = Lanes::n_of(j, k);
        hs[k] = (valid && n < N) ? p.state_in[state_row + n] : 0.f;
    }
    const float Dd = valid ? ssd_D(p, h, c) : 0.f;
    const T* xg = static_cast<const T*>(p.x);
    const T* dg = static_cast<const T*>(p.dt);
    const T* Bg = static_cast<const T*>(p.B);
    const T* Cg = static_cast<const T*>(p.C);
    T* yg = static_cast<T*>(p.y);

    for (int64_t t0 = 0; t0 < L; t0 += TC) {
        const int tc = int(L - t0 < TC ? L - t0 : TC);
        __syncthreads();  // the previous chunk's y has been written out
        for (int i = tid; i < N * TC; i += kSsdThreads) {  // consecutive i → consecutive n: coalesced
            const int t = i / N, n = i % N;
            if (t < tc) {
                const int64_t e = ((b * L + t0 + t) * p.ngroups + g) * N + n;
                sB[t * NP + n] = to_f32(Bg[e]);
                sC[t * NP + n] = to_f32(Cg[e]);
            }
        }
        for (int i = tid; i < kRows * TC; i += kSsdThreads) {  // consecutive i → consecutive channels
            const int t = i / kRows, r2 = i % kRows;
            if (t < tc && c0 + r2 < P) sX[r2 * TP + t] = to_f32(xg[((b * L + t0 + t) * H + h) * P + c0 + r2]);
        }
        for (int t = tid; t < tc; t += kSsdThreads) {
            const float dt = ssd_dt(to_f32(dg[(b * L + t0 + t) * H + h]), h, p);
            sDt[t] = dt;
            sDec[t] = expf(dt * Ah);
        }
        __syncthreads();
        for (int t = 0; t < tc; ++t) {
            const float x = sX[rr * TP + t];
            const float dtx = sDt[t] * x;
            const float dec = sDec[t];
            float acc = 0.f;
            if constexpr (Lanes::kVec == 4) {
#pragma unroll
                for (int m = 0; m < PER / 4; ++m) {
                    const int w = (j + m * G) * 4;
                    const float4 b4 = *reinterpret_cast<const float4*>(sB + t * NP + w);
                    const float4 c4 = *reinterpret_cast<const float4*>(sC + t * NP + w);
                    if (w < N) { hs[m * 4] = dec * hs[m * 4] + dtx * b4.x; acc += hs[m * 4] * c4.x; }
                    if (w + 1 < N) { hs[m * 4 + 1] = dec * hs[m * 4 + 1] + dtx * b4.y; acc += hs[m * 4 + 1] * c4.y; }
                    if (w + 2 < N) { hs[m * 4 + 2] = dec * hs[m * 4 + 2] + dtx * b4.z; acc += hs[m * 4 + 2] * c4.z; }
                    if (w + 3 < N) { hs[m * 4 + 3] = dec * hs[m * 4 + 3] + dtx * b4.w; acc += hs[m * 4 + 3] * c4.w; }
                }
            } else {
#pragma unroll
                for (int k = 0; k < PER; ++k) {
                    const int n = Lanes::n_of(j, k);
                    if (n < N) {
                        hs[k] = dec * hs[k] + dtx * sB[t * NP + n];
                        acc += hs[k] * sC[t * NP + n];
                    }
                }
            }
            acc = group_sum<G>(acc);
            if (j == 0) sX[rr * TP + t] = acc + Dd * x;  // y replaces x (only this row reads it)
        }
        __syncthreads();
        for (int i = tid; i < kRows * TC; i += kSsdThreads) {
            const int t = i / kRows, r2 = i % kRows;
            if (t < tc && c0 + r2 < P)
                yg[((b * L + t0 + t) * H + h) * P + c0 + r2] = from_f32<T>(sX[r2 * TP + t]);
        }
    }
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int n = Lanes::n_of(j, k);
        if (valid && n < N) p.state_out[state_row + n] = hs[k];
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side.
template <typename T, int G, int PER>
cudaError_t ssd_launch_step(const SsdParams& p, cudaStream_t stream) {
    constexpr int kRows = kSsdThreads / G;
    const int64_t HP = int64_t(p.nheads) * p.headdim;
    const dim3 grid(unsigned((HP + kRows - 1) / kRows), unsigned(p.batch));
    ssd_step_kernel<T, G, PER><<<grid, kSsdThreads, 0, stream>>>(p);
    return cudaGetLastError();
}

template <typename T, int G, int PER>
cudaError_t ssd_launch_scan(const SsdParams& p, cudaStream_t stream) {
    constexpr int kRows = kSsdThreads / G;
    const dim3 grid(unsigned((p.headdim + kRows - 1) / kRows), unsigned(p.nheads), unsigned(p.batch));
    const size_t smem = ssd_scan_smem_floats<G, PER>(p.dstate) * sizeof(float);
    if (smem > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(ssd_scan_kernel<T, G, PER>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             int(smem));
        if (e != cudaSuccess) return e;
    }
    ssd_scan_kernel<T, G, PER><<<grid, kSsdThreads, smem, stream>>>(p);
    return cudaGetLastError();
}

template <typename T>
cudaError_t ssd_dispatch(const SsdParams& p, bool scan, cudaStream_t s) {
    const int N = p.dstate;
    if (!scan) {
        if (N <= 4) return ssd_launch_step<T, 4, 1>(p, s);
        if (N <= 8) return ssd_launch_step<T, 8, 1>(p, s);
        if (N <= 16) return ssd_launch_step<T, 16, 1>(p, s);
        if (N <= 32) return ssd_launch_step<T, 32, 1>(p, s);
        if (N <= 64) return ssd_launch_step<T, 32, 2>(p, s);
        if (N <= 128) return ssd_launch_step<T, 32, 4>(p, s);
        return ssd_launch_step<T, 32, 8>(p, s);
    }
    if (N <= 4) return ssd_launch_scan<T, 4, 1>(p, s);
    if (N <= 8) return ssd_launch_scan<T, 4, 2>(p, s);
    if (N <= 16) return ssd_launch_scan<T, 4, 4>(p, s);
    if (N <= 32) return ssd_launch_scan<T, 8, 4>(p, s);
    if (N <= 64) return ssd_launch_scan<T, 8, 8>(p, s);
    if (N <= 128) return ssd_launch_scan<T, 8, 16>(p, s);
    return ssd_launch_scan<T, 16, 16>(p, s);
}

int ssd_run(const SsdParams& p, int dtype, bool scan, void* stream) {
    if (p.dstate < 1 || p.dstate > MAMBA_SCAN_MAX_DSTATE || p.batch < 0 || p.seqlen < 0 || p.nheads < 0 ||
        p.headdim < 0 || p.ngroups < 1 || (p.nheads % p.ngroups) != 0 || p.batch > 65535 || p.nheads > 65535)
        return int(cudaErrorInvalidValue);
    if (dtype != MAMBA_SCAN_F32 && dtype != MAMBA_SCAN_F16 && dtype != MAMBA_SCAN_BF16)
        return int(cudaErrorInvalidValue);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (p.batch == 0 || p.nheads == 0 || p.headdim == 0) return 0;
    if (!p.state_in || !p.state_out) return int(cudaErrorInvalidValue);
    if (scan && p.seqlen == 0) {  // nothing to compute; the scan still owes the (unchanged) final state
        if (p.state_out == p.state_in) return 0;
        return int(cudaMemcpyAsync(p.state_out, p.state_in,
                                   sizeof(float) * p.batch * p.nheads * p.headdim * p.dstate,
                                   cudaMemcpyDeviceToDevice, s));
    }
    if (!p.x || !p.dt || !p.A || !p.B || !p.C || !p.y) return int(cudaErrorInvalidValue);
    switch (dtype) {
        case MAMBA_SCAN_F32: return int(ssd_dispatch<float>(p, scan, s));
        case MAMBA_SCAN_F16: return int(ssd_dispatch<__half>(p, scan, s));
        default: return int(ssd_dispatch<__nv_bfloat16>(p, scan, s));
    }
}

}  // namespace

extern "C" {

int mamba2_ssd_step(const void* x, const void* dt, const float* A, const void* B, const void* C, const float* D,
                    const float* dt_bias, const float* state_in, float* state_out, void* y,
                    long long batch, int nheads, int headdim, int ngroups, int dstate, int d_per_channel,
                    int dtype, int dt_softplus, float softplus_threshold, float dt_min, float dt_max,
                    void* stream) {
    const SsdParams p{x, dt, A, B, C, D, dt_bias, state_in, state_out, y, batch, 1, nheads, headdim, ngroups,
                      dstate, d_per_channel, dt_softplus, softplus_threshold, dt_min, dt_max};
    return ssd_run(p, dtype, false, stream);
}

int mamba2_ssd_scan(const void* x, const void* dt, const float* A, const void* B, const void* C, const float* D,
                    const float* dt_bias, const float* state_in, float* state_out, void* y,
                    long long batch, long long seqlen, int nheads, int headdim, int ngroups, int dstate,
                    int d_per_channel, int dtype, int dt_softplus, float softplus_threshold, float dt_min,
                    float dt_max, void* stream) {
    const SsdParams p{x, dt, A, B, C, D, dt_bias, state_in, state_out, y, batch, seqlen, nheads, headdim, ngroups,
                      dstate, d_per_channel, dt_softplus, softplus_threshold, dt_min, dt_max};
    return ssd_run(p, dtype, true, stream);
}

}  // extern "C"
