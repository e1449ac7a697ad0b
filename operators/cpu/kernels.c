/* streamctx native CPU kernels (fp32, AVX-512, OpenMP).
 *
 * Built on first use by streamctx.operators.cpu.native (gcc -O3 -march=native -fopenmp) and
 * loaded with ctypes after torch, so `#pragma omp` regions run on torch's own OpenMP pool.
 *
 * The steps decode spends its time on, which no BLAS call shape or torch op does well here:
 *   sc_matmul_nt                y[M, N] = x[M, K] . w[N, K]^T (+ bias), for the few rows of decode;
 *   sc_paged_decode_attention   one query per session against its paged K/V blocks;
 *   sc_rms_norm, sc_silu_mul    the elementwise steps between them, in one pass each;
 *   sc_rope_append              RoPE of the decoded tokens' q and k and their K/V cache writes;
 *   sc_decode_layer             one decoder layer, with gemm.c's packed products, in one parallel region.
 *
 * Each output is computed by one thread in an order that depends only on K (or on the session's
 * keys), never on M, on the batch, or on the thread count: a session's row of a batched product
 * has the same bits as the product of that row alone, and 1, 2 or 8 threads give the same bits.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "gemm.h"
#include "simd.h"

int sc_version(void) { return 1; }

int sc_has_avx512(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

/* Contiguous share [lo, hi) of n items for this thread: the split never affects an output. */
static inline void share(int64_t n, int64_t *lo, int64_t *hi) {
    int nt = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t per = n / nt, extra = n % nt;
    *lo = t * per + (t < extra ? t : extra);
    *hi = *lo + per + (t < extra ? 1 : 0);
}

#ifdef __AVX512F__
/* ---------------------------------------------------------------------------------------------
 * y = x . w^T. Tiles of MR x-rows by NR w-rows; each (m, n) pair accumulates 16 lanes over K in
 * steps of 16 (the last step masked), then one fixed lane reduction: the same order for every
 * tile shape, so tails and full tiles agree bit for bit.
 */
#define MR 4
#define NR 4
/* Keeps a loaded vector in a register: gcc otherwise folds the load into every FMA that uses it,
 * and the tile then issues MR * NR loads per step instead of MR + NR (for the x rows too: 16
 * rows' products at ~135 GFLOP/s from cache with the folded loads, ~170 without). */
/* Weight blocks ahead of the current one whose lines a tile prefetches: one block ahead keeps a
 * one-row product (decode of one session) at 26 GB/s, two at 29-30 (SmolLM2, 2 threads). */
#define PF_BLOCKS 2
#define IN_REGISTER(v) __asm__("" : "+v"(v))

static inline __attribute__((always_inline)) void tile(
        const float *x, int64_t ldx, const float *w, int64_t ldw, const float *bias, const float *res, int64_t ldr,
        float *y, int64_t ldy, int64_t K, int mr, int nr, const char *pf, int64_t pf_lines) {
    __m512 acc[MR][NR];
    /* Prefetches `pf_lines` cache lines from `pf` (part of the next weight block), spread over the
     * k steps, so the next block streams in while this one computes; into L2, leaving L1 to the
     * x rows the passes re-read (products of 5 and 8 rows from memory: 51 -> 73 and 82 -> 112
     * GFLOP/s with L1 prefetches instead). */
    int64_t per_step = (pf_lines + (K + 15) / 16 - 1) / ((K + 15) / 16), done = 0;
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 wv[NR];
        for (int j = 0; j < NR; j++) {
            wv[j] = j < nr ? _mm512_loadu_ps(w + j * ldw + k) : _mm512_setzero_ps();
            IN_REGISTER(wv[j]);
        }
        for (int64_t l = 0; l < per_step && done < pf_lines; l++, done++) _mm_prefetch(pf + 64 * done, _MM_HINT_T1);
        for (int i = 0; i < MR; i++) {
            if (i >= mr) break;
            __m512 xv = _mm512_loadu_ps(x + i * ldx + k);
            IN_REGISTER(xv);  /* else folded into each of its NR FMAs: MR * NR loads a step */
            for (int j = 0; j < NR; j++)
                if (j < nr) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    if (k < K) {
        __mmask16 mask = (__mmask16)((1u << (K - k)) - 1u);
        __m512 wv[NR];
        for (int j = 0; j < NR; j++)
            wv[j] = j < nr ? _mm512_maskz_loadu_ps(mask, w + j * ldw + k) : _mm512_setzero_ps();
        for (int i = 0; i < MR; i++) {
            if (i >= mr) break;
            __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * ldx + k);
            for (int j = 0; j < NR; j++)
                if (j < nr) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MR; i++) {
        if (i >= mr) break;
        for (int j = 0; j < NR; j++) {
            if (j >= nr) break;
            float s = _mm512_reduce_add_ps(acc[i][j]);
            s = bias ? s + bias[j] : s;
            y[i * ldy + j] = res ? res[i * ldr + j] + s : s;
        }
    }
}

#define TILE_ARGS const float *x, int64_t ldx, const float *w, int64_t ldw, const float *bias, const float *res, \
    int64_t ldr, float *y, int64_t ldy, int64_t K
#define TILE_PASS x, ldx, w, ldw, bias, res, ldr, y, ldy, K
static void tile_4x4(TILE_ARGS, const char *pf, int64_t pf_lines) { tile(TILE_PASS, MR, NR, pf, pf_lines); }
static void tile_1x4(TILE_ARGS, const char *pf, int64_t pf_lines) { tile(TILE_PASS, 1, NR, pf, pf_lines); }
static void tile_any(TILE_ARGS, int mr, int nr) { tile(TILE_PASS, mr, nr, NULL, 0); }
#endif

#ifdef __AVX512F__
/* At most MR rows of x: the weight rows one after another, each thread one sequential stream.
 * A tile over four weight rows streams at half the rate with one x row (SmolLM2, 2 threads: 26
 * vs 46 GB/s, torch.sum 46-52 GB/s at the time). Same per-output order as `tile`: one accumulator
 * over K in steps of 16 (the last masked), one lane reduction, then the bias. */
static inline __attribute__((always_inline)) void matrows(
        const float *x, int64_t ldx, const float *w, const float *bias, const float *res, int64_t ldr,
        float *y, int64_t ldy, int64_t N, int64_t K, const int mr) {
    {
        int64_t lo, hi;
        share(N, &lo, &hi);
        __mmask16 mask = (__mmask16)((1u << (K % 16)) - 1u);
        for (int64_t n = lo; n < hi; n++) {
            const float *wr = w + n * K;
            __m512 acc[MR];
            for (int i = 0; i < mr; i++) acc[i] = _mm512_setzero_ps();
            int64_t k = 0;
            for (; k + 16 <= K; k += 16) {
                __m512 wv = _mm512_loadu_ps(wr + k);
                for (int i = 0; i < mr; i++) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * ldx + k), wv, acc[i]);
            }
            if (k < K) {
                __m512 wv = _mm512_maskz_loadu_ps(mask, wr + k);
                for (int i = 0; i < mr; i++)
                    acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + i * ldx + k), wv, acc[i]);
            }
            for (int i = 0; i < mr; i++) {
                float s = _mm512_reduce_add_ps(acc[i]);
                s = bias ? s + bias[n] : s;
                y[i * ldy + n] = res ? res[i * ldr + n] + s : s;
            }
        }
    }
}

#define MATROWS_ARGS const float *x, int64_t ldx, const float *w, const float *bias, const float *res, int64_t ldr, \
    float *y, int64_t ldy, int64_t N, int64_t K
#define MATROWS_PASS x, ldx, w, bias, res, ldr, y, ldy, N, K
static void matrows_1(MATROWS_ARGS) { matrows(MATROWS_PASS, 1); }
static void matrows_2(MATROWS_ARGS) { matrows(MATROWS_PASS, 2); }
static void matrows_3(MATROWS_ARGS) { matrows(MATROWS_PASS, 3); }
static void matrows_4(MATROWS_ARGS) { matrows(MATROWS_PASS, 4); }
#endif

#ifdef __AVX512F__
/* The product inside a parallel region (each thread its share of the outputs, no barrier at the
 * end): y[m * ldy + n] = res[m * ldr + n] + (sum_k x[m * ldx + k] * w[n * K + k] + bias[n]), where
 * bias and res may be NULL; y may alias res (each output is read, then written, by one thread). */
static void matmul_part(const float *x, int64_t ldx, const float *w, const float *bias, const float *res,
                        int64_t ldr, float *y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
    switch (M) {  /* the few rows of decode: one weight stream a thread */
        case 1: matrows_1(x, ldx, w, bias, res, ldr, y, ldy, N, K); return;
        case 2: matrows_2(x, ldx, w, bias, res, ldr, y, ldy, N, K); return;
        case 3: matrows_3(x, ldx, w, bias, res, ldr, y, ldy, N, K); return;
        case 4: matrows_4(x, ldx, w, bias, res, ldr, y, ldy, N, K); return;
        default: break;
    }
    int64_t nblocks = (N + NR - 1) / NR, lo, hi;
    share(nblocks, &lo, &hi);
    for (int64_t nb = lo; nb < hi; nb++) {
        int64_t n = nb * NR;
        int nr = (int)(N - n < NR ? N - n : NR);
        const float *wn = w + n * K;
        const float *bn = bias ? bias + n : NULL, *rn = res ? res + n : NULL;
        int64_t m = 0;
        if (nr == NR) {
            /* A block ahead (this thread's) is prefetched in equal parts over the passes. */
            int64_t passes = M / MR + (M % MR == 1), lines = PF_BLOCKS && nb + PF_BLOCKS < hi ? NR * K / 16 : 0;
            const char *next = (const char *)(wn + PF_BLOCKS * NR * K);
            for (int64_t pass = 0; m + MR <= M; m += MR, pass++)
                tile_4x4(x + m * ldx, ldx, wn, K, bn, rn ? rn + m * ldr : NULL, ldr, y + m * ldy + n, ldy, K,
                         next + 64 * (pass * lines / passes), (pass + 1) * lines / passes - pass * lines / passes);
            if (M - m == 1) {
                tile_1x4(x + m * ldx, ldx, wn, K, bn, rn ? rn + m * ldr : NULL, ldr, y + m * ldy + n, ldy, K,
                         next + 64 * ((passes - 1) * lines / passes), lines - (passes - 1) * lines / passes);
                m = M;
            }
        }
        for (; m < M; m += MR) {
            int mr = (int)(M - m < MR ? M - m : MR);
            tile_any(x + m * ldx, ldx, wn, K, bn, rn ? rn + m * ldr : NULL, ldr, y + m * ldy + n, ldy, K, mr, nr);
        }
    }
}
#endif

/* y[m * ldy + n] = sum_k x[m * ldx + k] * w[n * K + k] (+ bias[n]); bias may be NULL. */
void sc_matmul_nt(const float *x, int64_t ldx, const float *w, const float *bias,
                  float *y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
#ifdef __AVX512F__
#pragma omp parallel
    matmul_part(x, ldx, w, bias, NULL, 0, y, ldy, M, N, K);
#else
    (void)x; (void)ldx; (void)w; (void)bias; (void)y; (void)ldy; (void)M; (void)N; (void)K;
#endif
}

#ifdef __AVX512F__
/* r[j] = the sum of the 16 lanes of a[j], for 16 vectors at once (a transpose-and-add tree: about
 * 3 instructions a vector where 16 separate reductions take 8 each). Each sum's order depends on
 * lane positions only. */
static inline __m512 reduce16(const __m512 a[16]) {
    __m512 b[8], c[4], e[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit quarter: [a2i 0+2, a2i+1 0+2, a2i 1+3, a2i+1 1+3] */
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* quarter q, element r: quarter q's sum of a[4i + r] */
        __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
        c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)  /* [c2i q0+q1, c2i q2+q3, c2i+1 q0+q1, c2i+1 q2+q3] */
        e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(e[0], e[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

#define MAX_G 16     /* query heads per KV head */
#define MAX_DV 16    /* head_dim / 16 */
#define SPAN 512     /* keys per work item: longer sessions are split and merged by lse */

/* One (session, KV head): G query rows q[G, D] against keys begin..end-1 (at most SPAN of them)
 * found through `blocks`. Writes out[g * ostride + d] and, when lse != NULL, lse[g] (natural log).
 * Two passes, each one long sequential read: all the span's keys (scores of every query row,
 * 16 keys per reduce16, each chunk of 16 rows read from L1 by the other rows), a softmax over the
 * span's scores, then all its values. Runs of keys never cross a block, so each run is consecutive
 * rows in memory. `dv` (D / 16) is a constant in the specialised copies below, so the loops over
 * it unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void attend(
        const float *q, int64_t qstride, const float *kh, const float *vh, const int32_t *blocks,
        int64_t begin, int64_t end, int64_t bs, int G, float scale, float *out, int64_t ostride, float *lse,
        const int dv) {
    const int64_t D = 16 * dv, n = end - begin;
    float s[MAX_G][SPAN + 16] __attribute__((aligned(64)));  /* scores, then probabilities */
    float mx[MAX_G], sum[MAX_G];
    __m512 qv[MAX_G][MAX_DV];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < dv; c++) qv[g][c] = _mm512_mul_ps(_mm512_loadu_ps(q + g * qstride + c * 16), _mm512_set1_ps(scale));
    /* Pass 1: scores. */
    for (int64_t t0 = begin; t0 < end;) {
        int64_t in_block = t0 % bs, nt = bs - in_block < end - t0 ? bs - in_block : end - t0;
        const float *kt = kh + ((int64_t)blocks[t0 / bs] * bs + in_block) * D;  /* nt consecutive rows */
        for (int64_t j0 = 0; j0 < nt; j0 += 16) {
            int64_t m = nt - j0 < 16 ? nt - j0 : 16;
            for (int g = 0; g < G; g++) {
                __m512 a[16];
                if (m == 16) {  /* a full group: no conditions, so the 16 chains stay in registers */
                    for (int j = 0; j < 16; j++) {
                        const float *kr = kt + (j0 + j) * D;
                        a[j] = _mm512_mul_ps(qv[g][0], _mm512_loadu_ps(kr));
                        for (int c = 1; c < dv; c++) a[j] = _mm512_fmadd_ps(qv[g][c], _mm512_loadu_ps(kr + c * 16), a[j]);
                    }
                } else {
                    for (int j = 0; j < 16; j++) {
                        if (j < m) {
                            const float *kr = kt + (j0 + j) * D;
                            a[j] = _mm512_mul_ps(qv[g][0], _mm512_loadu_ps(kr));
                            for (int c = 1; c < dv; c++) a[j] = _mm512_fmadd_ps(qv[g][c], _mm512_loadu_ps(kr + c * 16), a[j]);
                        } else {
                            a[j] = _mm512_setzero_ps();
                        }
                    }
                }
                _mm512_storeu_ps(&s[g][t0 - begin + j0], reduce16(a));  /* past-the-end lanes: overwritten or unused */
            }
        }
        t0 += nt;
    }
    /* Softmax over the span, per query row. */
    for (int g = 0; g < G; g++) {
        __m512 mx16 = _mm512_set1_ps(-FLT_MAX);
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 mask = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
            mx16 = _mm512_mask_max_ps(mx16, mask, mx16, _mm512_loadu_ps(&s[g][j]));
        }
        float m = _mm512_reduce_max_ps(mx16);
        __m512 mv = _mm512_set1_ps(m), acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 mask = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
            __m512 p = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(_mm512_loadu_ps(&s[g][j]), mv)));
            _mm512_storeu_ps(&s[g][j], p);
            acc = _mm512_add_ps(acc, p);
        }
        mx[g] = m;
        sum[g] = _mm512_reduce_add_ps(acc);
    }
    /* Pass 2: values, in chunks of 16 rows that every query row reads from L1. */
    __m512 ov[MAX_G][MAX_DV];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < dv; c++) ov[g][c] = _mm512_setzero_ps();
    for (int64_t t0 = begin; t0 < end;) {
        int64_t in_block = t0 % bs, nt = bs - in_block < end - t0 ? bs - in_block : end - t0;
        const float *vt = vh + ((int64_t)blocks[t0 / bs] * bs + in_block) * D;
        const int64_t at = t0 - begin;
        for (int64_t j0 = 0; j0 < nt; j0 += 16) {
            int64_t m = nt - j0 < 16 ? nt - j0 : 16;
            for (int g = 0; g < G; g++) {
                __m512 o[MAX_DV], o2[MAX_DV];  /* odd rows in o2: two chains halve the FMA latency a row */
                for (int c = 0; c < dv; c++) {
                    o[c] = ov[g][c];
                    o2[c] = _mm512_setzero_ps();
                }
                int64_t j = 0;
                for (; j + 2 <= m; j += 2) {
                    const float *vr = vt + (j0 + j) * D;
                    __m512 p = _mm512_set1_ps(s[g][at + j0 + j]), p2 = _mm512_set1_ps(s[g][at + j0 + j + 1]);
                    for (int c = 0; c < dv; c++) {
                        o[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + c * 16), o[c]);
                        o2[c] = _mm512_fmadd_ps(p2, _mm512_loadu_ps(vr + D + c * 16), o2[c]);
                    }
                }
                if (j < m) {
                    __m512 p = _mm512_set1_ps(s[g][at + j0 + j]);
                    for (int c = 0; c < dv; c++) o[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vt + (j0 + j) * D + c * 16), o[c]);
                }
                for (int c = 0; c < dv; c++) ov[g][c] = _mm512_add_ps(o[c], o2[c]);
            }
        }
        t0 += nt;
    }
    for (int g = 0; g < G; g++) {
        __m512 inv = _mm512_set1_ps(1.0f / sum[g]);
        for (int c = 0; c < dv; c++) _mm512_storeu_ps(out + g * ostride + c * 16, _mm512_mul_ps(ov[g][c], inv));
        if (lse) lse[g] = mx[g] + logf(sum[g]);
    }
}

#define ATTEND_ARGS const float *q, int64_t qstride, const float *kh, const float *vh, const int32_t *blocks, \
    int64_t begin, int64_t end, int64_t bs, int G, float scale, float *out, int64_t ostride, float *lse
#define ATTEND_PASS q, qstride, kh, vh, blocks, begin, end, bs, G, scale, out, ostride, lse
static void attend_d64(ATTEND_ARGS) { attend(ATTEND_PASS, 4); }
static void attend_d128(ATTEND_ARGS) { attend(ATTEND_PASS, 8); }
static void attend_any(ATTEND_ARGS, int dv) { attend(ATTEND_PASS, dv); }

static void attend_one(ATTEND_ARGS, int64_t D) {
    if (D == 64) attend_d64(ATTEND_PASS);
    else if (D == 128) attend_d128(ATTEND_PASS);
    else attend_any(ATTEND_PASS, (int)(D / 16));
}
#endif

/* RoPE (rotate-half form) and the cache write of one decoded token for each of B sessions.
 *   qkv       row b at qkv + b * ldq: [Hq + 2 Hkv, D] (q heads, k heads, v heads), not rotated
 *   cos, sin  row b at cos + b * ldcs ([D]; ldcs 0: one row for all)
 *   slots[b]  the pool slot of session b's new token; pos[b], rope_pos[b] its positions
 *   k_pool, v_pool [Hkv, S, D]; pos_pool, rope_pool [S]
 *   q_out     [B, Hq, D]: the rotated queries
 * Each value is x * cos + rot(x) * sin with the two products rounded apart (no FMA), the same bits
 * as torch's `apply_rope` on the same inputs. */
#define ROPE_ARGS const float *qkv, int64_t ldq, const float *cos, const float *sin, int64_t ldcs, \
    const int64_t *slots, const int64_t *pos, const int64_t *rope_pos, float *k_pool, float *v_pool, \
    int64_t *pos_pool, int64_t *rope_pool, int64_t S, float *q_out
#define ROPE_PASS qkv, ldq, cos, sin, ldcs, slots, pos, rope_pos, k_pool, v_pool, pos_pool, rope_pool, S, q_out
static void rope_rows(ROPE_ARGS, int64_t b0, int64_t b1, int64_t Hq, int64_t Hkv, int64_t D) {
    int64_t half = D / 2;
    for (int64_t b = b0; b < b1; b++) {
        const float *row = qkv + b * ldq, *c = cos + b * ldcs, *s = sin + b * ldcs;
        for (int64_t h = 0; h < Hq + Hkv; h++) {
            const float *x = row + h * D;
            float *o = h < Hq ? q_out + (b * Hq + h) * D : k_pool + ((h - Hq) * S + slots[b]) * D;
            for (int64_t d = 0; d < half; d++) {
                float a = x[d] * c[d], r = -x[d + half] * s[d];
                o[d] = a + r;
            }
            for (int64_t d = half; d < D; d++) {
                float a = x[d] * c[d], r = x[d - half] * s[d];
                o[d] = a + r;
            }
        }
        for (int64_t h = 0; h < Hkv; h++)
            memcpy(v_pool + (h * S + slots[b]) * D, row + (Hq + Hkv + h) * D, sizeof(float) * D);
        pos_pool[slots[b]] = pos[b];
        rope_pool[slots[b]] = rope_pos[b];
    }
}

void sc_rope_append(ROPE_ARGS, int64_t B, int64_t Hq, int64_t Hkv, int64_t D) {
    rope_rows(ROPE_PASS, 0, B, Hq, Hkv, D);
}

/* y[m, :] = x[m, :] / sqrt(mean(x[m, :]^2) + eps) * w, rows of H (x row stride ldx, y contiguous).
 * Single-threaded: for the few rows of decode a parallel region costs more than the work. */
#ifdef __AVX512F__
static void rms_rows(const float *x, int64_t ldx, const float *w, float eps, float *y, int64_t m0, int64_t m1,
                     int64_t H) {
    for (int64_t m = m0; m < m1; m++) {
        const float *xr = x + m * ldx;
        float *yr = y + m * H;
        __m512 r = _mm512_set1_ps(rms_scale(xr, H, eps));
        int64_t k = 0;
        for (; k + 16 <= H; k += 16)
            _mm512_storeu_ps(yr + k, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(xr + k), r), _mm512_loadu_ps(w + k)));
        if (k < H) {
            __mmask16 mask = (__mmask16)((1u << (H - k)) - 1u);
            __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, xr + k), r);
            _mm512_mask_storeu_ps(yr + k, mask, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, w + k)));
        }
    }
}
#endif

void sc_rms_norm(const float *x, int64_t ldx, const float *w, float eps, float *y, int64_t M, int64_t H) {
#ifdef __AVX512F__
    rms_rows(x, ldx, w, eps, y, 0, M, H);
#else
    (void)x; (void)ldx; (void)w; (void)eps; (void)y; (void)M; (void)H;
#endif
}

/* out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i], for n values. */
#ifdef __AVX512F__
/* Values i0..n-1 (i0 a multiple of 16 or the whole range: each value's bits never depend on it). */
static void silu_mul_range(const float *gate, const float *up, float *out, int64_t i0, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = i0; i < n; i += 16) {
        __mmask16 mask = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        __m512 g = _mm512_maskz_loadu_ps(mask, gate + i);
        __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, e));
        _mm512_mask_storeu_ps(out + i, mask, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(mask, up + i)));
    }
}
#endif

void sc_silu_mul(const float *gate, const float *up, float *out, int64_t n) {
#ifdef __AVX512F__
    silu_mul_range(gate, up, out, 0, n);
#else
    (void)gate; (void)up; (void)out; (void)n;
#endif
}

/* Decode attention of B sessions, one query each, over a paged cache.
 *   q      [B, Hq, D] contiguous (rotated, unscaled)
 *   k, v   one layer of the pool: [Hkv, S, D] contiguous, S = num_blocks * block_size slots
 *   blocks int32 block ids; session b uses blocks[offsets[b] .. offsets[b+1]), key t at slot
 *          blocks[offsets[b] + t / bs] * bs + t % bs, t < lengths[b] (lengths[b] >= 1)
 *   out    [B, Hq, D]; lse [B, Hq] or NULL
 * Query heads h * G .. h * G + G - 1 share KV head h (grouped-query attention).
 * Work items are (session, KV head, span of at most SPAN keys): a long session's spans run on
 * several threads (one session's 3 KV heads would leave 2 threads unevenly loaded) and are merged
 * through their lse in span order. Spans are fixed by the session's own length, so a session's
 * result does not depend on the batch or the thread count.
 * Returns 0, -1 for a shape the kernel does not take (the caller checks beforehand), -2 when out
 * of memory. */

#ifdef __AVX512F__
/* Where sessions' spans go: first[b] is session b's first span (a session has ceil(length / SPAN)),
 * part / part_lse hold split sessions' partial results ([spans, Hq, D] and [spans, Hq]). */
typedef struct {
    int64_t *first;
    float *part, *part_lse;
} span_plan;

static void free_plan(span_plan *plan) {
    free(plan->first);
    free(plan->part);
    free(plan->part_lse);
}

/* 0, or -2 when out of memory (nothing then left allocated). */
static int plan_spans(const int64_t *lengths, int64_t B, int64_t Hq, int64_t D, span_plan *plan) {
    plan->first = malloc(sizeof(int64_t) * (B + 1));
    plan->part = plan->part_lse = NULL;
    if (!plan->first) return -2;
    plan->first[0] = 0;
    for (int64_t b = 0; b < B; b++) plan->first[b + 1] = plan->first[b] + (lengths[b] + SPAN - 1) / SPAN;
    int64_t spans = plan->first[B];
    if (spans > B) {
        plan->part = malloc(sizeof(float) * spans * Hq * D);
        plan->part_lse = malloc(sizeof(float) * spans * Hq);
        if (!plan->part || !plan->part_lse) {
            free_plan(plan);
            return -2;
        }
    }
    return 0;
}

/* The attention inside a parallel region (see sc_paged_decode_attention), ending after the merge
 * with no barrier. */
static void attention_part(const float *q, const float *k, const float *v, int64_t S, const int32_t *blocks,
                           const int64_t *offsets, const int64_t *lengths, int64_t bs, int64_t B, int64_t Hq,
                           int64_t Hkv, int64_t D, float scale, float *out, float *lse, const span_plan *plan) {
    const int64_t *first = plan->first;
    float *part = plan->part, *part_lse = plan->part_lse;
    int G = (int)(Hq / Hkv);
    int64_t items = first[B] * Hkv, lo, hi;
    share(items, &lo, &hi);
    int64_t b = 0;
    for (int64_t it = lo; it < hi; it++) {
        int64_t span = it / Hkv, h = it % Hkv;
        while (first[b + 1] <= span) b++;
        int64_t begin = (span - first[b]) * SPAN, end = begin + SPAN < lengths[b] ? begin + SPAN : lengths[b];
        const float *qh = q + (b * Hq + h * G) * D;
        if (first[b + 1] - first[b] == 1)  /* one span: straight to the output */
            attend_one(qh, D, k + h * S * D, v + h * S * D, blocks + offsets[b], begin, end, bs, G, scale,
                       out + (b * Hq + h * G) * D, D, lse ? lse + b * Hq + h * G : NULL, D);
        else
            attend_one(qh, D, k + h * S * D, v + h * S * D, blocks + offsets[b], begin, end, bs, G, scale,
                       part + (span * Hq + h * G) * D, D, part_lse + span * Hq + h * G, D);
    }
    if (first[B] == B) return;  /* no session was split */
#pragma omp barrier
    /* Merge the spans of split sessions: (session, query head) rows, in span order. */
    share(B * Hq, &lo, &hi);
    for (int64_t row = lo; row < hi; row++) {
        int64_t b = row / Hq, i = row % Hq, n = first[b + 1] - first[b];
        if (n == 1) continue;
        float m = -FLT_MAX, total = 0.0f;
        for (int64_t c = 0; c < n; c++) {
            float l = part_lse[(first[b] + c) * Hq + i];
            m = l > m ? l : m;
        }
        float *o = out + row * D;
        for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
        for (int64_t c = 0; c < n; c++) {
            float wc = expf(part_lse[(first[b] + c) * Hq + i] - m);
            total += wc;
            const float *pc = part + ((first[b] + c) * Hq + i) * D;
            for (int64_t d = 0; d < D; d++) o[d] += wc * pc[d];
        }
        for (int64_t d = 0; d < D; d++) o[d] /= total;
        if (lse) lse[row] = m + logf(total);
    }
}
#endif

int sc_paged_decode_attention(const float *q, const float *k, const float *v, int64_t S,
                              const int32_t *blocks, const int64_t *offsets, const int64_t *lengths,
                              int64_t bs, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, float scale,
                              float *out, float *lse) {
#ifdef __AVX512F__
    if (D % 16 != 0 || D / 16 > MAX_DV || Hq % Hkv != 0 || Hq / Hkv > MAX_G) return -1;
    span_plan plan;
    if (plan_spans(lengths, B, Hq, D, &plan)) return -2;
#pragma omp parallel
    attention_part(q, k, v, S, blocks, offsets, lengths, bs, B, Hq, Hkv, D, scale, out, lse, &plan);
    free_plan(&plan);
    return 0;
#else
    (void)q; (void)k; (void)v; (void)S; (void)blocks; (void)offsets; (void)lengths; (void)bs; (void)B;
    (void)Hq; (void)Hkv; (void)D; (void)scale; (void)out; (void)lse;
    return -1;
#endif
}

/* ---------------------------------------------------------------------------------------------
 * One decoder layer (Llama family) for B sessions decoding one token each, in one parallel
 * region: the products over the layer's packed weights (gemm.c, the RMSNorms folded into them,
 * the SwiGLU pair in one pass, the residuals added in place), RoPE with the cache write, and the
 * paged attention. The same kernels in the same order as the layer's separate native calls
 * (`gemm_packed`, `rope_append`, `paged_decode_attention`), so the same bits, without a return to
 * Python between the steps.
 */
typedef struct {
    const float *ln_attn, *w_qkv, *b_qkv, *w_o, *b_o, *ln_mlp, *w_gate_up, *w_down, *b_down;  /* w_*: packed */
    int64_t H, I, Hq, Hkv, D;  /* hidden, intermediate, query heads, KV heads, head dim */
    float eps, scale;          /* RMSNorm epsilon, attention scale */
} sc_layer_weights;

typedef struct {
    float *k_pool, *v_pool;         /* [Hkv, S, D] */
    int64_t *pos_pool, *rope_pool;  /* [S] */
    int64_t S, bs;                  /* slots, block size */
    const int64_t *slots, *pos, *rope_pos;  /* [B]: the new tokens' slots and positions */
    const float *cos, *sin;         /* [B or 1, D] */
    int64_t ldcs;                   /* D, or 0 for one row shared by all */
    const int32_t *blocks;          /* block tables, as sc_paged_decode_attention */
    const int64_t *offsets, *lengths;
} sc_layer_cache;

/* Floats of scratch sc_decode_layer needs for B rows. */
int64_t sc_decode_scratch_floats(const sc_layer_weights *w, int64_t B) {
    return B * ((w->Hq + 2 * w->Hkv) * w->D + 2 * w->Hq * w->D + w->I);
}

/* x [B, H] (contiguous) is updated in place:
 *   x += o_proj(attention(rope(qkv(rms_norm(x)))));  x += down(silu(gate(h)) * up(h)), h = rms_norm(x)
 * appending each session's new K/V at its slot. scratch: sc_decode_scratch_floats(w, B) floats.
 * Returns 0, -1 for shapes the attention kernel does not take, -2 when out of memory. */
int sc_decode_layer(const sc_layer_weights *w, const sc_layer_cache *c, float *x, int64_t B, float *scratch) {
#ifdef __AVX512F__
    const int64_t H = w->H, I = w->I, Hq = w->Hq, Hkv = w->Hkv, D = w->D, W = (Hq + 2 * Hkv) * D;
    if (D % 16 != 0 || D / 16 > MAX_DV || Hq % Hkv != 0 || Hq / Hkv > MAX_G) return -1;
    float *qkv = scratch, *q = qkv + B * W, *a = q + B * Hq * D, *mid = a + B * Hq * D;
    span_plan plan;
    if (plan_spans(c->lengths, B, Hq, D, &plan)) return -2;
    int failed = 0;
#pragma omp parallel
    {
        int64_t lo, hi;
        int rc = sc_gemm_part(x, H, w->w_qkv, 0, w->b_qkv, w->ln_attn, w->eps, NULL, 0, qkv, W, B, W, H);
#pragma omp barrier
        share(B, &lo, &hi);
        rope_rows(qkv, W, c->cos, c->sin, c->ldcs, c->slots, c->pos, c->rope_pos, c->k_pool, c->v_pool,
                  c->pos_pool, c->rope_pool, c->S, q, lo, hi, Hq, Hkv, D);
#pragma omp barrier
        attention_part(q, c->k_pool, c->v_pool, c->S, c->blocks, c->offsets, c->lengths, c->bs, B, Hq, Hkv, D,
                       w->scale, a, NULL, &plan);
#pragma omp barrier
        rc |= sc_gemm_part(a, Hq * D, w->w_o, 0, w->b_o, NULL, 0.0f, x, H, x, H, B, H, Hq * D);
#pragma omp barrier
        rc |= sc_gemm_part(x, H, w->w_gate_up, 1, NULL, w->ln_mlp, w->eps, NULL, 0, mid, I, B, I, H);
#pragma omp barrier
        rc |= sc_gemm_part(mid, I, w->w_down, 0, w->b_down, NULL, 0.0f, x, H, x, H, B, H, I);
        if (rc) {
#pragma omp atomic write
            failed = 1;
        }
    }
    free_plan(&plan);
    return failed ? -2 : 0;
#else
    (void)w; (void)c; (void)x; (void)B; (void)scratch;
    return -1;
#endif
}
