/* Vector helpers shared by the native kernels' sources (each includes this header; everything
 * is static inline, so each source gets its own copy with the same bits). */
#ifndef STREAMCTX_SIMD_H
#define STREAMCTX_SIMD_H

#include <math.h>
#include <stdint.h>

#ifdef __AVX512F__
#include <immintrin.h>

/* ---------------------------------------------------------------------------------------------
 * exp(x): 2^n * p(r), r in [-ln2/2, ln2/2], Cody-Waite split of ln 2 and a degree-6
 * polynomial (relative error ~2e-7, as expf); 0 below -103, inf above 88.7.
 */
static inline __m512 exp512(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f);
    const __m512 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(x, _mm512_set1_ps(-103.0f));  /* below: 0 after scalef */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.3981999507e-3f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
    p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* RMSNorm's 1 / sqrt(mean(x^2) + eps) of one row of n floats: squares summed in 16 lanes over n
 * in steps of 16 (the last masked), then one lane reduction. */
static inline float rms_scale(const float *x, int64_t n, float eps) {
    __m512 acc = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        __m512 v = _mm512_loadu_ps(x + k);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    if (k < n) {
        __m512 v = _mm512_maskz_loadu_ps((__mmask16)((1u << (n - k)) - 1u), x + k);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    return 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)n + eps);
}

/* In place: r[i] lane j becomes r[j] lane i (a 16 x 16 block of floats held as 16 rows). */
static inline __attribute__((always_inline)) void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {  /* per 128-bit quarter: [a0 b0 a1 b1], [a2 b2 a3 b3] */
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {  /* r[4i + e], quarter q: column 4q + e of rows 4i .. 4i + 3 */
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int e = 0; e < 4; e++) {
        t[e] = _mm512_shuffle_f32x4(r[e], r[4 + e], 0x88);
        t[4 + e] = _mm512_shuffle_f32x4(r[e], r[4 + e], 0xDD);
        t[8 + e] = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0x88);
        t[12 + e] = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0xDD);
    }
    for (int e = 0; e < 4; e++) {
        r[e] = _mm512_shuffle_f32x4(t[e], t[8 + e], 0x88);
        r[8 + e] = _mm512_shuffle_f32x4(t[e], t[8 + e], 0xDD);
        r[4 + e] = _mm512_shuffle_f32x4(t[4 + e], t[12 + e], 0x88);
        r[12 + e] = _mm512_shuffle_f32x4(t[4 + e], t[12 + e], 0xDD);
    }
}
#endif

#endif
