/* The packed-weight product (gemm.c) as the other sources call it inside their own parallel regions. */
#ifndef STREAMCTX_GEMM_H
#define STREAMCTX_GEMM_H

#include <stdint.h>

/* This thread's share of y[M, N] = residual + (norm(x) . w^T + bias), or for swiglu = 1
 * silu(norm(x) . w_gate^T) * (norm(x) . w_up^T), over weights packed by sc_pack_weights. Every
 * thread of the team calls it; it has no barrier. Returns 0, or -1 when out of memory. */
int sc_gemm_part(const float *x, int64_t ldx, const float *packed, int swiglu, const float *bias, const float *norm_w,
                 float eps, const float *res, int64_t ldr, float *y, int64_t ldy, int64_t M, int64_t N, int64_t K);

#endif
