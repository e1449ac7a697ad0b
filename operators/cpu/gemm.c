/* streamctx native SGEMM for CPU prefill (fp32, AVX-512, OpenMP), with fused epilogues.
 *
 *   sc_gemm_nt          y = residual + (norm(x) . w^T + bias), norm, bias and residual optional;
 *   sc_gemm_nt_swiglu   y = silu(norm(x) . wg^T) * (norm(x) . wu^T), the norm optional;
 * norm(x) = x * rsqrt(mean(x^2) + eps) * norm_w, the RMSNorm of the Llama family.
 *
 * BLIS-style: w is packed (transposed with AVX-512 shuffles, by all threads together) into strips
 * of 32 columns, [K][32] each; each thread packs its rows of x ([K][12] per tile of 12 rows, the
 * RMSNorm folded in) and runs a 12 x 32 register tile over the strips: 12 broadcasts of x times 2
 * vectors of w per k, 24 accumulators. A strip's packed columns (L2) serve a group of tiles whose
 * packed x (X_BYTES, L2) serves every strip. For the SwiGLU pair a strip holds 16 columns of wg
 * then the same 16 of wu, so one tile has both halves and its epilogue writes silu(g) * u: g and
 * u never reach memory. Threads split the rows, or the strips where that balances better
 * (`thread_grid`). Weights used again and again (a model's) are packed once (`sc_pack_weights`)
 * and read in place by `sc_gemm_packed`, for any number of rows: decode's few rows then split the
 * strips between the threads, each one sequential stream of its strips; the decode layer
 * (kernels.c) runs `sc_gemm_part` inside its own parallel region.
 *
 * Summation order of every output (bit-determinism): K is cut into ceil(K / KB_MAX) blocks of
 * equal length (the last shorter), each summed from zero in k order in one accumulator lane, the
 * blocks added in order; then the bias, then the residual. It depends on K only: never on M, on
 * the row's place in a tile, on the thread split or the thread count. The normed x is rounded as
 * sc_rms_norm rounds it, and silu(g) * u as sc_silu_mul, so the fused steps have the bits of the
 * separate kernels around the plain product.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "simd.h"

#ifdef __AVX512F__

#define MR 12          /* rows of x per register tile */
#define NR 32          /* packed columns per strip (2 vectors) */
#define KB_MAX 192     /* k per summation block (MKL's order on this machine, and its accuracy) */
#define X_BYTES (384 * 1024)  /* a thread's group of packed x tiles (all of K), kept in L2 */
#define GROUP_MAX 32           /* tiles in a group at most */
#define PF_B 8         /* k steps ahead that the tile prefetches its strip */
#define DECODE_ROWS 64 /* at most this many rows: the threads split the strips, never the rows, */
#define DECODE_MR 8    /* in tiles of 8 rows (16 rows of SmolLM2 from memory: 12 + 4 ~150 GFLOP/s, 8 + 8 ~170) */

/* Contiguous share [lo, hi) of n items for part `t` of `parts`. */
static inline void split(int64_t n, int parts, int t, int64_t *lo, int64_t *hi) {
    int64_t per = n / parts, extra = n % parts;
    *lo = t * per + (t < extra ? t : extra);
    *hi = *lo + per + (t < extra ? 1 : 0);
}

static inline __mmask16 tail_mask(int64_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

/* dst[k * 32 + i] = src_i[k] for k < K: one half (16 packed columns) of a strip; rows i >= rows
 * are zeros. */
static void pack_half(const float *src, int64_t ld, int rows, int64_t K, float *dst) {
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 mk = tail_mask(K - k);
        __m512 r[16];
        for (int i = 0; i < 16; i++)
            r[i] = i < rows ? _mm512_maskz_loadu_ps(mk, src + i * ld + k) : _mm512_setzero_ps();
        transpose16(r);
        int64_t n = K - k < 16 ? K - k : 16;
        for (int64_t c = 0; c < n; c++) _mm512_store_ps(dst + (k + c) * NR, r[c]);
    }
}

/* Strip s of the packed weights, [K][32]: plain, columns 32s..32s+31 of w; SwiGLU, columns
 * 16s..16s+15 of wg then the same of wu. */
static void pack_strip(const float *w0, const float *w1, int64_t N, int64_t K, int64_t s, float *dst) {
    if (w1 == NULL) {
        int64_t n0 = s * NR;
        pack_half(w0 + n0 * K, K, (int)(N - n0 < 16 ? N - n0 : 16), K, dst);
        int64_t n1 = n0 + 16;
        pack_half(w0 + (n1 < N ? n1 : 0) * K, K, (int)(N - n1 <= 0 ? 0 : N - n1 < 16 ? N - n1 : 16), K, dst + 16);
    } else {
        int64_t n0 = s * 16;
        int rows = (int)(N - n0 < 16 ? N - n0 : 16);
        pack_half(w0 + n0 * K, K, rows, K, dst);
        pack_half(w1 + n0 * K, K, rows, K, dst + 16);
    }
}

/* One tile of x: dst[k * 12 + i] = x[i, k] (times scale[i] * norm_w[k], in that order, as the
 * RMSNorm x * rsqrt(..) * w) for i < rows, zeros below. */
static void pack_x(const float *x, int64_t ldx, int rows, const float *scale, const float *norm_w,
                   int64_t K, float *dst) {
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 mk = tail_mask(K - k);
        __m512 r[16];
        __m512 nw = norm_w ? _mm512_maskz_loadu_ps(mk, norm_w + k) : _mm512_setzero_ps();
        for (int i = 0; i < 16; i++) {
            if (i < rows) {
                r[i] = _mm512_maskz_loadu_ps(mk, x + i * ldx + k);
                if (norm_w) r[i] = _mm512_mul_ps(_mm512_mul_ps(r[i], _mm512_set1_ps(scale[i])), nw);
            } else {
                r[i] = _mm512_setzero_ps();
            }
        }
        transpose16(r);
        int64_t n = K - k < 16 ? K - k : 16;
        for (int64_t c = 0; c < n; c++) _mm512_mask_storeu_ps(dst + (k + c) * MR, 0x0FFF, r[c]);
    }
}

/* Where a tile's results go on the last k block. */
typedef struct {
    float *y;
    int64_t ldy;
    const float *res;   /* NULL: none */
    int64_t ldr;
    const float *bias;  /* NULL: none */
    __mmask16 m0, m1;   /* valid columns of the two halves (SwiGLU: m0 only) */
    int swiglu;
} tile_out;

/* R rows (R a constant: 12, 8 or 4; `rows` <= R of them real) of a tile over all of K: per k
 * block (kb long, the last shorter) acc = sum_k ap[k][i] * bp[k][:] from zero, added to the
 * blocks before it; then the epilogue writes the real rows. Running all of K in one call, the
 * block sums kept by the tile, beat cycling k blocks through a partial-sum buffer by 3-5%. */
static inline __attribute__((always_inline)) void tile(
        const int R, int rows, int64_t K, int64_t kb, const float *restrict ap, const float *restrict bp,
        const tile_out *o) {
    __m512 acc[MR][2], sum[MR][2];
    for (int i = 0; i < R; i++) { sum[i][0] = _mm512_setzero_ps(); sum[i][1] = _mm512_setzero_ps(); }
    for (int64_t k0 = 0; k0 < K; k0 += kb) {
        int64_t kc = K - k0 < kb ? K - k0 : kb;
        for (int i = 0; i < R; i++) { acc[i][0] = _mm512_setzero_ps(); acc[i][1] = _mm512_setzero_ps(); }
        for (int64_t k = 0; k < kc; k++) {
            __m512 b0 = _mm512_load_ps(bp), b1 = _mm512_load_ps(bp + 16);
#if PF_B > 0
            _mm_prefetch((const char *)(bp + PF_B * NR), _MM_HINT_T0);
            _mm_prefetch((const char *)(bp + PF_B * NR + 16), _MM_HINT_T0);
#endif
            for (int i = 0; i < R; i++) {
                __m512 a = _mm512_set1_ps(ap[i]);
                acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
            }
            ap += MR;
            bp += NR;
        }
        if (k0 == 0)
            for (int i = 0; i < R; i++) { sum[i][0] = acc[i][0]; sum[i][1] = acc[i][1]; }
        else
            for (int i = 0; i < R; i++) {
                sum[i][0] = _mm512_add_ps(sum[i][0], acc[i][0]);
                sum[i][1] = _mm512_add_ps(sum[i][1], acc[i][1]);
            }
    }
    for (int i = 0; i < R; i++) { acc[i][0] = sum[i][0]; acc[i][1] = sum[i][1]; }
    if (o->swiglu) {
        const __m512 one = _mm512_set1_ps(1.0f);
        for (int i = 0; i < R; i++) {
            if (i >= rows) break;
            __m512 g = acc[i][0];
            __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            _mm512_mask_storeu_ps(o->y + i * o->ldy, o->m0, _mm512_mul_ps(s, acc[i][1]));
        }
        return;
    }
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    if (o->bias) {
        b0 = _mm512_maskz_loadu_ps(o->m0, o->bias);
        b1 = _mm512_maskz_loadu_ps(o->m1, o->bias + 16);
    }
    for (int i = 0; i < R; i++) {
        if (i >= rows) break;
        __m512 v0 = acc[i][0], v1 = acc[i][1];
        if (o->bias) { v0 = _mm512_add_ps(v0, b0); v1 = _mm512_add_ps(v1, b1); }
        if (o->res) {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(o->m0, o->res + i * o->ldr));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(o->m1, o->res + i * o->ldr + 16));
        }
        _mm512_mask_storeu_ps(o->y + i * o->ldy, o->m0, v0);
        if (o->m1) _mm512_mask_storeu_ps(o->y + i * o->ldy + 16, o->m1, v1);
    }
}

static void tile12(int rows, int64_t K, int64_t kb, const float *ap, const float *bp, const tile_out *o) {
    tile(12, rows, K, kb, ap, bp, o);
}
static void tile8(int rows, int64_t K, int64_t kb, const float *ap, const float *bp, const tile_out *o) {
    tile(8, rows, K, kb, ap, bp, o);
}
static void tile4(int rows, int64_t K, int64_t kb, const float *ap, const float *bp, const tile_out *o) {
    tile(4, rows, K, kb, ap, bp, o);
}
static void tile1(int rows, int64_t K, int64_t kb, const float *ap, const float *bp, const tile_out *o) {
    tile(1, rows, K, kb, ap, bp, o);
}

/* Per-thread buffers kept between calls: the calling thread's packed weights (slot 0; dropped
 * after a call that needed more than KEEP_BYTES, e.g. a vocabulary-sized lm_head) and each OpenMP
 * thread's packed rows of x (slot 1). */
#define KEEP_BYTES ((size_t)32 << 20)
static _Thread_local float *buf[2];
static _Thread_local size_t cap[2];

static void release(int slot) {
    free(buf[slot]);
    buf[slot] = NULL;
    cap[slot] = 0;
}

static float *buffer(int slot, size_t floats) {
    if (cap[slot] < floats) {
        free(buf[slot]);
        size_t bytes = (floats * sizeof(float) + 4095) & ~(size_t)4095;
        buf[slot] = aligned_alloc(4096, bytes);
        cap[slot] = buf[slot] ? floats : 0;
    }
    return buf[slot];
}

/* The grid of threads: tm parts of the row tiles by tn parts of the strips (tm * tn = nt), the
 * one with the least work on its busiest thread, rows first on ties (each thread then reads only
 * its rows of x and shares the packed weights). */
static void thread_grid(int nt, int64_t mtiles, int64_t nstrips, int *tm, int *tn) {
    int64_t best = INT64_MAX;
    for (int n = 1; n <= nt; n++) {
        if (nt % n) continue;
        int m = nt / n;
        int64_t cost = ((mtiles + m - 1) / m) * ((nstrips + n - 1) / n);
        if (cost < best) { best = cost; *tm = m; *tn = n; }
    }
}

/* One thread's share of y = epilogue(norm(x) . packed^T), inside a parallel region (every thread
 * of the team calls it; no barrier inside or at the end). `wp`: the packed strips (`pack_strip`
 * layout, 64-byte aligned). Returns 0, or -1 when this thread's buffer could not be allocated
 * (its outputs are then not written). */
int sc_gemm_part(const float *x, int64_t ldx, const float *wp, int swiglu, const float *bias, const float *norm_w,
                 float eps, const float *res, int64_t ldr, float *y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
    const int64_t sw = swiglu ? 16 : NR;                 /* output columns per strip */
    const int mr = M <= DECODE_ROWS ? DECODE_MR : MR;   /* rows a tile takes */
    const int64_t nstrips = (N + sw - 1) / sw, mtiles = (M + mr - 1) / mr;
    const int64_t nkb = (K + KB_MAX - 1) / KB_MAX, kb = (K + nkb - 1) / nkb;
    int64_t group = X_BYTES / (MR * K * (int64_t)sizeof(float));
    group = group < 2 ? 2 : group > GROUP_MAX ? GROUP_MAX : group;
    int nt = omp_get_num_threads(), t = omp_get_thread_num();
    int tm = 1, tn = nt;
    if (M > DECODE_ROWS) thread_grid(nt, mtiles, nstrips, &tm, &tn);  /* decode: every thread its strips */
    int64_t mlo, mhi, slo, shi;
    split(mtiles, tm, t / tn, &mlo, &mhi);
    split(nstrips, tn, t % tn, &slo, &shi);
    if (slo == shi || mlo == mhi) return 0;
    int64_t mine = (mhi - mlo) < group ? (mhi - mlo) : group;
    float *ap = buffer(1, (size_t)(mine * MR * K));
    if (!ap) return -1;
    float scale[GROUP_MAX * MR];
    for (int64_t mb = mlo; mb < mhi; mb += group) {
        int64_t me = mb + group < mhi ? mb + group : mhi;
        for (int64_t ti = mb; ti < me; ti++) {
            int64_t m0 = ti * mr;
            int rows = (int)(M - m0 < mr ? M - m0 : mr);
            float *sc = scale + (ti - mb) * MR;
            if (norm_w)
                for (int i = 0; i < rows; i++) sc[i] = rms_scale(x + (m0 + i) * ldx, K, eps);
            pack_x(x + m0 * ldx, ldx, rows, sc, norm_w, K, ap + (ti - mb) * MR * K);
        }
        for (int64_t s = slo; s < shi; s++) {
            int64_t n0 = s * sw, cols = N - n0 < sw ? N - n0 : sw;
            tile_out o = {.ldy = ldy, .ldr = ldr, .swiglu = swiglu,
                          .bias = bias ? bias + n0 : NULL,
                          .m0 = tail_mask(cols), .m1 = swiglu ? 0 : tail_mask(cols - 16)};
            const float *bs = wp + s * K * NR;
            for (int64_t ti = mb; ti < me; ti++) {
                int64_t m0 = ti * mr;
                int rows = (int)(M - m0 < mr ? M - m0 : mr);
                o.y = y + m0 * ldy + n0;
                o.res = res ? res + m0 * ldr + n0 : NULL;
                const float *a = ap + (ti - mb) * MR * K;
                if (rows > 8) tile12(rows, K, kb, a, bs, &o);
                else if (rows > 4) tile8(rows, K, kb, a, bs, &o);
                else if (rows > 1) tile4(rows, K, kb, a, bs, &o);
                else tile1(rows, K, kb, a, bs, &o);
            }
        }
    }
    return 0;
}

/* The product over weights `wp` packed already, or w0 (and w1) packed by all threads first. */
static int gemm(const float *x, int64_t ldx, const float *wp, const float *w0, const float *w1, const float *bias,
                const float *norm_w, float eps, const float *res, int64_t ldr, float *y, int64_t ldy,
                int64_t M, int64_t N, int64_t K, int swiglu) {
    const int64_t nstrips = (N + (swiglu ? 16 : NR) - 1) / (swiglu ? 16 : NR);
    float *packed = (float *)wp;
    if (!packed && !(packed = buffer(0, (size_t)(nstrips * K * NR)))) return -1;
    int failed = 0;
#pragma omp parallel
    {
        if (!wp) {
            int64_t lo, hi;
            split(nstrips, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
            for (int64_t s = lo; s < hi; s++) pack_strip(w0, w1, N, K, s, packed + s * K * NR);
#pragma omp barrier
        }
        if (sc_gemm_part(x, ldx, packed, swiglu, bias, norm_w, eps, res, ldr, y, ldy, M, N, K)) {
#pragma omp atomic write
            failed = 1;
        }
    }
    if (!wp && (size_t)(nstrips * K * NR) * sizeof(float) > KEEP_BYTES) release(0);
    return failed ? -1 : 0;
}
#endif

/* y[M, N] = residual + (norm(x) . w^T + bias), each term optional:
 *   x [M, K] (row stride ldx), w [N, K] contiguous, bias [N] or NULL;
 *   norm_w [K] or NULL: x's rows are RMS-normed first, x * rsqrt(mean(x^2) + eps) * norm_w;
 *   residual [M, N] (row stride ldr) or NULL; it may be y itself (ldr == ldy), not overlap it
 *   otherwise; y (row stride ldy) must not overlap x.
 * Returns 0, -1 when a buffer could not be allocated, -2 without AVX-512. */
int sc_gemm_nt(const float *x, int64_t ldx, const float *w, const float *bias, const float *norm_w, float eps,
               const float *residual, int64_t ldr, float *y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
#ifdef __AVX512F__
    if (M <= 0 || N <= 0 || K <= 0) return 0;
    return gemm(x, ldx, NULL, w, NULL, bias, norm_w, eps, residual, ldr, y, ldy, M, N, K, 0);
#else
    (void)x; (void)ldx; (void)w; (void)bias; (void)norm_w; (void)eps; (void)residual; (void)ldr; (void)y;
    (void)ldy; (void)M; (void)N; (void)K;
    return -2;
#endif
}

/* y[M, N] = silu(h . w_gate^T) * (h . w_up^T), h = x or its RMSNorm (norm_w [K] or NULL), the
 * SwiGLU MLP's first half: w_gate, w_up [N, K] contiguous; x, y as in sc_gemm_nt. */
int sc_gemm_nt_swiglu(const float *x, int64_t ldx, const float *w_gate, const float *w_up, const float *norm_w,
                      float eps, float *y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
#ifdef __AVX512F__
    if (M <= 0 || N <= 0 || K <= 0) return 0;
    return gemm(x, ldx, NULL, w_gate, w_up, NULL, norm_w, eps, NULL, 0, y, ldy, M, N, K, 1);
#else
    (void)x; (void)ldx; (void)w_gate; (void)w_up; (void)norm_w; (void)eps; (void)y; (void)ldy; (void)M; (void)N;
    (void)K;
    return -2;
#endif
}

/* Strips of w (N x K, contiguous) for sc_gemm_packed: ceil(N / 32) strips of [K][32] floats, or
 * for the SwiGLU pair (w1 = w_up given) ceil(N / 16) strips, 16 columns of w0 then 16 of w1;
 * columns past N are zeros. dst: that many floats, 64-byte aligned. */
void sc_pack_weights(const float *w0, const float *w1, int64_t N, int64_t K, float *dst) {
#ifdef __AVX512F__
    const int64_t nstrips = (N + (w1 ? 16 : NR) - 1) / (w1 ? 16 : NR);
#pragma omp parallel
    {
        int64_t lo, hi;
        split(nstrips, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        for (int64_t s = lo; s < hi; s++) pack_strip(w0, w1, N, K, s, dst + s * K * NR);
    }
#else
    (void)w0; (void)w1; (void)N; (void)K; (void)dst;
#endif
}

/* sc_gemm_nt (swiglu 0) or sc_gemm_nt_swiglu (swiglu 1; bias and residual NULL) over weights
 * packed by sc_pack_weights: the same bits, without packing them on each call. */
int sc_gemm_packed(const float *x, int64_t ldx, const float *packed, int swiglu, const float *bias,
                   const float *norm_w, float eps, const float *residual, int64_t ldr, float *y, int64_t ldy,
                   int64_t M, int64_t N, int64_t K) {
#ifdef __AVX512F__
    if (M <= 0 || N <= 0 || K <= 0) return 0;
    return gemm(x, ldx, packed, NULL, NULL, bias, norm_w, eps, residual, ldr, y, ldy, M, N, K, swiglu);
#else
    (void)x; (void)ldx; (void)packed; (void)swiglu; (void)bias; (void)norm_w; (void)eps; (void)residual; (void)ldr;
    (void)y; (void)ldy; (void)M; (void)N; (void)K;
    return -2;
#endif
}
