/* mamba-deploy Mamba-2 (SSD) kernels: the C ABI. Built into the same libmamba_scan.so as selective_scan.h.
 *
 * Math (Mamba-2, Dao & Gu 2024 §6–7; upstream mamba_ssm/modules/mamba2.py step), per batch b, head h, head
 * channel p, state index n; head h reads group g = h / (nheads / ngroups) of B and C; all arithmetic in fp32:
 *     dt_t = clamp(softplus(dt_raw_t + dt_bias[h]), dt_min, dt_max)   (softplus only if dt_softplus;
 *            softplus(v) = v when v > softplus_threshold, torch's rule; 20 in torch and upstream)
 *     h_t  = exp(dt_t·A[h])·h_{t−1} + dt_t·x_t·B_t[g]
 *     y_t  = Σ_n h_t[n]·C_t[g][n] + D·x_t        (D = D[h], or D[h][p] when d_per_channel; the z gate is left
 *                                                  to the graph)
 *
 * Layouts (row-major, contiguous):
 *   step:  x, y [batch, nheads, headdim]       dt [batch, nheads]       B, C [batch, ngroups, dstate]
 *   scan:  x, y [batch, L, nheads, headdim]    dt [batch, L, nheads]    B, C [batch, L, ngroups, dstate]
 *   both:  A, dt_bias [nheads] fp32; D [nheads] (= [nheads, 1]) or [nheads, headdim] fp32 (d_per_channel);
 *          D and dt_bias may be NULL (0);
 *          state_in / state_out [batch, nheads, headdim, dstate] fp32.
 * x, dt, B, C and y share the activation dtype `dtype` (MAMBA_SCAN_F32 / F16 / BF16 of selective_scan.h).
 * state_out may equal state_in (in-place update); every other output must not alias an input.
 *
 * Limits: 1 <= dstate <= 256; nheads % ngroups == 0; batch <= 65535; zero sizes launch nothing (the scan with
 * L = 0 copies state_in to state_out). Returns 0 on success, else a cudaError_t value (cudaErrorInvalidValue = 1
 * for bad arguments). Kernels run asynchronously on `stream`.
 */
#ifndef MAMBA_DEPLOY_SSD_H
#define MAMBA_DEPLOY_SSD_H

#ifdef __cplusplus
extern "C" {
#endif

/* One decode step for a batch. */
int mamba2_ssd_step(const void* x, const void* dt, const float* A, const void* B, const void* C, const float* D,
                    const float* dt_bias, const float* state_in, float* state_out, void* y,
                    long long batch, int nheads, int headdim, int ngroups, int dstate, int d_per_channel,
                    int dtype, int dt_softplus, float softplus_threshold, float dt_min, float dt_max,
                    void* stream);

/* The scan over a sequence of length seqlen from state_in; writes every y and the final state. */
int mamba2_ssd_scan(const void* x, const void* dt, const float* A, const void* B, const void* C, const float* D,
                    const float* dt_bias, const float* state_in, float* state_out, void* y,
                    long long batch, long long seqlen, int nheads, int headdim, int ngroups, int dstate,
                    int d_per_channel, int dtype, int dt_softplus, float softplus_threshold, float dt_min,
                    float dt_max, void* stream);

#ifdef __cplusplus
}
#endif
#endif
