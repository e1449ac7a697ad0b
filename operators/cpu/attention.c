/* Causal attention for prefill (fp32, AVX-512, OpenMP): T new queries at absolute positions
 * q_offset .. q_offset + T - 1 against S keys, query at position p seeing keys j <= p (j < S).
 *
 * Flash-style: online softmax over key blocks of BK keys, never the full score matrix. A work item
 * is (KV head, block of queries); its rows are the G query heads of that KV head for each query
 * (row = query * G + head), so each K/V tile is read once for all of them. Per key block the tile
 * of K is packed transposed ([D][BK]); then, per tile of RT rows: S = Q K^T in an RT x BK register
 * tile (one broadcast q value times 16 keys per FMA), the online softmax in base 2 (exponent
 * s * scale * log2 e - max in one FMA), and O += P V with V rows vectorised over D. Key blocks
 * wholly above the diagonal are skipped; in diagonal blocks, row tiles skip the key vectors none
 * of their rows sees, and only there are keys masked. Work items run largest first, each on
 * whichever thread is free (their sizes differ up to T / block).
 *
 * Each row's result depends on its own position, q row and keys 0..p only: row tiles, query
 * blocks, the thread count and S (past p) change which rows share a tile, never one row's
 * arithmetic (masked keys give p = 0 exactly). So results are deterministic, the same at any
 * thread count, and a chunk of a prefill has the same bits as those rows of the whole prefill.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#ifdef __AVX512F__
#include "simd.h"

#define BK 64           /* keys per block */
#define NV (BK / 16)    /* score vectors per row of a tile */
#define RT 6            /* rows per register tile: RT x NV score accumulators, RT x 4 output ones */
#define CW 4            /* output vectors (of 16 dims) per pass over a tile's keys */
#define ROWS 192        /* rows (queries x heads) per work item aimed at */
#define PF_HINT _MM_HINT_T0

/* 2^x for x <= 0: 2^n * p(r), n = round(x), r = x - n in [-1/2, 1/2] (exact), a degree-6
 * polynomial (Cephes exp2f; relative error ~1e-7). Below -200 (masked keys at -inf): 0. */
static inline __m512 exp2_512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-200.0f));
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Lanes 0..7: the maxima of a[0] .. a[7] (a transpose-and-max tree: 24 instructions where eight
 * separate reductions take about 64). */
static inline __m512 max8(const __m512 a[8]) {
    __m512 b[4], c[2];
    for (int i = 0; i < 4; i++)  /* per quarter: [a2i 0v2, a2i+1 0v2, a2i 1v3, a2i+1 1v3] */
        b[i] = _mm512_max_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 2; i++) {  /* quarter q, element e: quarter q's max of a[4i + e] */
        __m512d u = _mm512_castps_pd(b[2 * i]), w = _mm512_castps_pd(b[2 * i + 1]);
        c[i] = _mm512_max_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(u, w)), _mm512_castpd_ps(_mm512_unpackhi_pd(u, w)));
    }
    /* [c0 q0vq1, c0 q2vq3, c1 q0vq1, c1 q2vq3], then quarters 0 and 1: a[0..3], a[4..7] */
    __m512 e = _mm512_max_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
    return _mm512_max_ps(_mm512_shuffle_f32x4(e, e, 0x08), _mm512_shuffle_f32x4(e, e, 0x0D));
}

/* kt[d * BK + j] = key j's dim d for the n (<= BK) keys at kb (row stride ss); zeros past n. */
static void pack_kt(const float *kb, int64_t ss, int64_t n, int64_t D, float *kt) {
    for (int64_t j0 = 0; j0 < BK; j0 += 16)
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
            __m512 r[16];
            for (int j = 0; j < 16; j++)
                r[j] = j0 + j < n ? _mm512_loadu_ps(kb + (j0 + j) * ss + d0) : _mm512_setzero_ps();
            transpose16(r);
            for (int d = 0; d < 16; d++) _mm512_store_ps(kt + (d0 + d) * BK + j0, r[d]);
        }
}

/* o[r][c0 .. c0 + cw) = o * alpha[r] + sum_{k < nk} p[r][k] v[k] for the tile's RT rows: one
 * pass over the keys with RT x cw accumulators. o and v point at dimension 16 * c0. */
static inline __attribute__((always_inline)) void pv_pass(
        const float *p, const float *v, int64_t ss, int64_t nk, float *o, int64_t D, const float *alpha,
        const int cw) {
    __m512 acc[RT][CW];
    for (int r = 0; r < RT; r++) {
        __m512 a = _mm512_set1_ps(alpha[r]);
        for (int c = 0; c < cw; c++) acc[r][c] = _mm512_mul_ps(_mm512_load_ps(o + r * D + 16 * c), a);
    }
    for (int64_t k = 0; k < nk; k++) {
        const float *vr = v + k * ss;
        __m512 vv[CW];
        for (int c = 0; c < cw; c++) vv[c] = _mm512_loadu_ps(vr + 16 * c);
        for (int r = 0; r < RT; r++) {
            __m512 b = _mm512_set1_ps(p[r * BK + k]);
            for (int c = 0; c < cw; c++) acc[r][c] = _mm512_fmadd_ps(b, vv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < RT; r++)
        for (int c = 0; c < cw; c++) _mm512_store_ps(o + r * D + 16 * c, acc[r][c]);
}

static void pv_pass4(const float *p, const float *v, int64_t ss, int64_t nk, float *o, int64_t D, const float *alpha) {
    pv_pass(p, v, ss, nk, o, D, alpha, 4);
}
static void pv_pass3(const float *p, const float *v, int64_t ss, int64_t nk, float *o, int64_t D, const float *alpha) {
    pv_pass(p, v, ss, nk, o, D, alpha, 3);
}
static void pv_pass2(const float *p, const float *v, int64_t ss, int64_t nk, float *o, int64_t D, const float *alpha) {
    pv_pass(p, v, ss, nk, o, D, alpha, 2);
}
static void pv_pass1(const float *p, const float *v, int64_t ss, int64_t nk, float *o, int64_t D, const float *alpha) {
    pv_pass(p, v, ss, nk, o, D, alpha, 1);
}

/* Scores of one row tile against the first 16 * nv keys of a packed block, and the online softmax:
 *   qs      the tile's RT rows of queries (row stride D), kt the packed block [D][BK]
 *   factor  |scale| * log2(e) > 0 (q negated for a negative scale): scores in base 2
 *   lim     per row, how many of the block's keys it sees (<= 16 * nv); NULL: all 16 * nv
 *   m       the rows' running maxima (base 2), l the rows' running sums (16 lanes per row)
 *   p       [RT][BK]: the probabilities of the 16 * nv keys; alpha [16]: the rows' rescalings */
static inline __attribute__((always_inline)) void scores(
        const float *qs, const float *kt, int64_t D, float factor, const int64_t *lim, float *m, float *l, float *p,
        float *alpha, const int nv) {
    __m512 acc[RT][NV];
    for (int r = 0; r < RT; r++)
        for (int c = 0; c < nv; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        __m512 kv[NV];
        for (int c = 0; c < nv; c++) kv[c] = _mm512_load_ps(kt + d * BK + 16 * c);
        for (int r = 0; r < RT; r++) {
            __m512 b = _mm512_set1_ps(qs[r * D + d]);
            for (int c = 0; c < nv; c++) acc[r][c] = _mm512_fmadd_ps(b, kv[c], acc[r][c]);
        }
    }
    const __m512 f = _mm512_set1_ps(factor);
    if (lim) {
        const __m512 ninf = _mm512_set1_ps(-INFINITY);
        for (int r = 0; r < RT; r++)
            for (int c = 0; c < nv; c++) {
                int64_t left = lim[r] - 16 * c;
                __mmask16 keep = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1u);
                acc[r][c] = _mm512_mask_mov_ps(ninf, keep, acc[r][c]);
            }
    }
    __m512 x[8];
    for (int r = 0; r < 8; r++) {
        x[r] = acc[r < RT ? r : 0][0];
        for (int c = 1; c < nv; c++) x[r] = _mm512_max_ps(x[r], acc[r < RT ? r : 0][c]);
    }
    /* factor > 0: the largest score times it is the largest product (rounding is monotonic). */
    const __mmask16 rows = (__mmask16)((1u << RT) - 1u);
    __m512 m_old = _mm512_maskz_loadu_ps(rows, m);
    __m512 m_new = _mm512_maskz_max_ps(rows, m_old, _mm512_mul_ps(max8(x), f));
    float mx[16] __attribute__((aligned(64)));
    _mm512_mask_storeu_ps(m, rows, m_new);
    _mm512_store_ps(alpha, exp2_512(_mm512_sub_ps(m_old, m_new)));  /* first block: exp2(-inf) = 0 */
    _mm512_store_ps(mx, m_new);
    for (int r = 0; r < RT; r++) {
        __m512 mr = _mm512_set1_ps(mx[r]), sum = _mm512_setzero_ps();
        for (int c = 0; c < nv; c++) {
            __m512 e = exp2_512(_mm512_fmsub_ps(acc[r][c], f, mr));  /* one rounding */
            _mm512_store_ps(p + r * BK + 16 * c, e);
            sum = _mm512_add_ps(sum, e);
        }
        _mm512_store_ps(l + 16 * r, _mm512_fmadd_ps(_mm512_load_ps(l + 16 * r), _mm512_set1_ps(alpha[r]), sum));
    }
}

#define SCORES_ARGS const float *qs, const float *kt, int64_t D, float factor, const int64_t *lim, float *m, float *l, \
    float *p, float *alpha
#define SCORES_PASS qs, kt, D, factor, lim, m, l, p, alpha
static void scores4(SCORES_ARGS) { scores(SCORES_PASS, 4); }
static void scores3(SCORES_ARGS) { scores(SCORES_PASS, 3); }
static void scores2(SCORES_ARGS) { scores(SCORES_PASS, 2); }
static void scores1(SCORES_ARGS) { scores(SCORES_PASS, 1); }

/* One row tile against one packed key block, of which the tile's rows see the first nk (<= BK)
 * keys (`lim` per row, or NULL: all nk = BK); v, ss: the block's first value row and row stride;
 * o the rows' outputs (row stride D). Arguments otherwise as `scores`. */
static void tile_block(SCORES_ARGS, const float *v, int64_t ss, int64_t nk, float *o) {
    switch ((nk + 15) / 16) {  /* diagonal blocks: only the key vectors some row sees */
        case 4: scores4(SCORES_PASS); break;
        case 3: scores3(SCORES_PASS); break;
        case 2: scores2(SCORES_PASS); break;
        default: scores1(SCORES_PASS); break;
    }
    int64_t c0 = 0;
    for (; c0 + 4 <= D / 16; c0 += 4) pv_pass4(p, v + 16 * c0, ss, nk, o + 16 * c0, D, alpha);
    switch (D / 16 - c0) {
        case 3: pv_pass3(p, v + 16 * c0, ss, nk, o + 16 * c0, D, alpha); break;
        case 2: pv_pass2(p, v + 16 * c0, ss, nk, o + 16 * c0, D, alpha); break;
        case 1: pv_pass1(p, v + 16 * c0, ss, nk, o + 16 * c0, D, alpha); break;
        default: break;
    }
}

typedef struct {
    const float *q, *k, *v;
    int64_t q_st, q_sh, k_sh, k_ss, v_sh, v_ss, T, S, q_offset, G, D;
    float factor;  /* |scale| * log2(e), at least FLT_MIN */
    int negate;    /* scale < 0: the queries are negated */
    float *out, *lse;
    int64_t o_st, o_sh;
} Problem;

typedef struct {  /* one thread's buffers, 64-byte aligned */
    float *qs, *o, *l, *m, *kt, *p;
} Scratch;

/* Queries i0 .. i0 + nq - 1 of KV head h: their nq * G rows, padded to whole tiles. */
static void work_item(const Problem *a, int64_t h, int64_t i0, int64_t nq, Scratch *s) {
    const int64_t G = a->G, D = a->D, rows = nq * G, tiles = (rows + RT - 1) / RT, padded = tiles * RT;
    for (int64_t r = 0; r < padded; r++) {
        float *dst = s->qs + r * D;
        if (r < rows) {
            const float *src = a->q + (i0 + r / G) * a->q_st + (h * G + r % G) * a->q_sh;
            if (a->negate)
                for (int64_t d = 0; d < D; d++) dst[d] = -src[d];
            else
                memcpy(dst, src, sizeof(float) * D);
        } else {
            memset(dst, 0, sizeof(float) * D);  /* padding rows: scores 0, results dropped */
        }
        memset(s->o + r * D, 0, sizeof(float) * D);
        memset(s->l + 16 * r, 0, sizeof(float) * 16);
        s->m[r] = -INFINITY;
    }
    const float *kh = a->k + h * a->k_sh, *vh = a->v + h * a->v_sh;
    const int64_t first = a->q_offset + i0, last = a->q_offset + i0 + nq - 1;  /* positions */
    const int64_t end = last + 1 < a->S ? last + 1 : a->S;  /* keys anyone sees */
    float alpha[16] __attribute__((aligned(64)));
    for (int64_t k0 = 0; k0 < end; k0 += BK) {
        const int64_t nb = a->S - k0 < BK ? a->S - k0 : BK;  /* keys in this block */
        pack_kt(kh + k0 * a->k_ss, a->k_ss, nb, D, s->kt);
        /* The next block's K and V rows are fetched a few per tile while this block computes (from
         * L3 or memory on long contexts, where the hardware prefetcher alone left the pack and the
         * first tile's values waiting). */
        const int64_t left = end - k0 - BK, next = left <= 0 ? 0 : left < BK ? left : BK, per = (next + tiles - 1) / tiles;
        const char *kn = (const char *)(kh + (k0 + BK) * a->k_ss), *vn = (const char *)(vh + (k0 + BK) * a->v_ss);
        for (int64_t t = 0; t < tiles; t++) {
            for (int64_t j = t * per; j < (t + 1) * per && j < next; j++)
                for (int64_t b = 0; b < 4 * D; b += 64) {
                    _mm_prefetch(kn + j * 4 * a->k_ss + b, PF_HINT);
                    _mm_prefetch(vn + j * 4 * a->v_ss + b, PF_HINT);
                }
            const int64_t r0 = t * RT, r1 = (r0 + RT - 1 < rows ? r0 + RT - 1 : rows - 1);
            const int64_t lo = first + r0 / G, hi = first + r1 / G;  /* the tile's positions */
            if (k0 > hi) continue;  /* sees none of this block */
            int64_t lim[RT], nk = hi - k0 + 1 < nb ? hi - k0 + 1 : nb;
            int masked = nb < BK || k0 + BK - 1 > lo;
            if (masked)
                for (int r = 0; r < RT; r++) {
                    int64_t pos = first + (r0 + r < rows ? r0 + r : rows - 1) / G, n = pos - k0 + 1;
                    lim[r] = n < nb ? n : nb;
                }
            tile_block(s->qs + r0 * D, s->kt, D, a->factor, masked ? lim : NULL, s->m + r0, s->l + 16 * r0, s->p, alpha,
                       vh + k0 * a->v_ss, a->v_ss, nk, s->o + r0 * D);
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        int64_t i = i0 + r / G, hq = h * G + r % G;
        float sum = _mm512_reduce_add_ps(_mm512_load_ps(s->l + 16 * r));
        __m512 inv = _mm512_set1_ps(1.0f / sum);
        float *dst = a->out + i * a->o_st + hq * a->o_sh;
        for (int64_t d = 0; d < D; d += 16)
            _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_load_ps(s->o + r * D + d), inv));
        if (a->lse) a->lse[hq * a->T + i] = s->m[r] * 0.69314718055994531f + logf(sum);
    }
}

static void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }
#endif

/* Causal attention of T queries (positions q_offset + i) over S keys, grouped-query.
 *   q      query i, head h at q + i * q_st + h * q_sh (D contiguous), unscaled
 *   k, v   KV head h, key j at k + h * k_sh + j * k_ss (D contiguous); query head h reads KV
 *          head h / (Hq / Hkv)
 *   out    query i, head h at out + i * o_st + h * o_sh; lse [Hq, T] (natural log) or NULL
 * Query i sees keys j <= q_offset + i, j < S. With S == 0: out 0, lse -inf.
 * Returns 0, -1 for a shape the kernel does not take (D % 16, D > 256, Hq % Hkv, q_offset < 0),
 * -2 when out of memory. */
int sc_causal_attention(const float *q, int64_t q_st, int64_t q_sh, const float *k, int64_t k_sh, int64_t k_ss,
                        const float *v, int64_t v_sh, int64_t v_ss, int64_t T, int64_t S, int64_t q_offset,
                        int64_t Hq, int64_t Hkv, int64_t D, float scale, float *out, int64_t o_st, int64_t o_sh,
                        float *lse) {
#ifdef __AVX512F__
    if (D <= 0 || D % 16 != 0 || D > 256 || Hkv <= 0 || Hq % Hkv != 0 || q_offset < 0 || T < 0 || S < 0) return -1;
    if (T == 0 || Hq == 0) return 0;
    if (S == 0) {
        for (int64_t i = 0; i < T; i++)
            for (int64_t h = 0; h < Hq; h++) memset(out + i * o_st + h * o_sh, 0, sizeof(float) * D);
        if (lse)
            for (int64_t i = 0; i < T * Hq; i++) lse[i] = -INFINITY;
        return 0;
    }
    const int64_t G = Hq / Hkv;
    /* Queries per work item: about ROWS rows, fewer where that leaves threads without work (a
     * row's result does not depend on this choice). */
    int64_t bq = ROWS / G < 8 ? 8 : ROWS / G;
    const int64_t want = 4 * (int64_t)omp_get_max_threads();
    while (bq > 8 && Hkv * ((T + bq - 1) / bq) < want) bq /= 2;
    const int64_t blocks = (T + bq - 1) / bq, items = blocks * Hkv, padded = (bq * G + RT - 1) / RT * RT;
    /* Scores are multiplied by a positive factor (so the largest score gives the largest product);
     * a zero scale gets the least normal float (every weight then rounds to 1). */
    float factor = (float)(fabs((double)scale) * 1.4426950408889634);
    Problem a = {q, k, v, q_st, q_sh, k_sh, k_ss, v_sh, v_ss, T, S, q_offset, G, D, factor < FLT_MIN ? FLT_MIN : factor,
                 scale < 0, out, lse, o_st, o_sh};
    int failed = 0;
#pragma omp parallel
    {
        Scratch s = {alloc64(sizeof(float) * padded * D), alloc64(sizeof(float) * padded * D),
                     alloc64(sizeof(float) * padded * 16), alloc64(sizeof(float) * (padded + 16)),
                     alloc64(sizeof(float) * D * BK), alloc64(sizeof(float) * RT * BK)};
        int ok = s.qs && s.o && s.l && s.m && s.kt && s.p;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
        /* Largest first (the last query blocks see the most keys), then whatever thread is free. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (!ok) continue;
            int64_t b = blocks - 1 - it / Hkv, h = it % Hkv, i0 = b * bq;
            work_item(&a, h, i0, T - i0 < bq ? T - i0 : bq, &s);
        }
        free(s.qs); free(s.o); free(s.l); free(s.m); free(s.kt); free(s.p);
    }
    return failed ? -2 : 0;
#else
    (void)q; (void)q_st; (void)q_sh; (void)k; (void)k_sh; (void)k_ss; (void)v; (void)v_sh; (void)v_ss; (void)T;
    (void)S; (void)q_offset; (void)Hq; (void)Hkv; (void)D; (void)scale; (void)out; (void)o_st; (void)o_sh; (void)lse;
    return -1;
#endif
}
