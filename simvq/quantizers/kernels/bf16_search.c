/* Fused bf16 nearest-code candidate search (AVX512-BF16), used by simvq/quantizers/search.py ("bf16-fused").
 *
 * For every token i and code k it evaluates v[i,k] = csq[k] + sum_p a[i,p] . b[k,p] with vdpbf16ps
 * (bf16 products, exact in fp32, accumulated in fp32, starting from csq[k]) and never writes the distance
 * matrix: while the values are still in registers it updates, per token, the running minimum of v and the
 * running threshold thr[i] = min over the scan of (running minimum + twoe[i]), and records the tile's own
 * minimum per token. When a token block's pass over a block of codes ends, every code whose value is <= the
 * threshold of that moment is kept (flush_tiles): a tile's recorded minimum says which of its tokens may have
 * one, and only those tokens' values are evaluated again. Since the running minimum only falls, every code
 * within twoe[i] of the final minimum is kept; once a range of tokens is scanned, their kept codes are
 * filtered against the final minimum and settled exactly (filter_tokens, settle_token). A token whose full
 * list had to refuse a code that turns out to be within the final threshold (more than `cap` candidates; see
 * keep()), or whose values could leave the fp32 range (bound_tokens), is left to the caller's exact search.
 *
 * Layout (contiguous):
 *   z       [n][dim] float: the tokens; mean [dim]: the point they and the codes are centred on
 *   apack   [token blocks][pairs][MR] uint32: two bf16 (an even/odd coordinate pair) of one token each,
 *           written by the kernel (bound_tokens) from z - mean
 *   b       [k_pad / NR][pairs][NR] uint32: codes, two bf16 per uint32, tile-blocked (a tile's NR codes of a
 *           pair side by side, so that a tile reads its codes as one stream; k_pad a multiple of NR)
 *   csq     [k_pad] float: per-code start value (padding codes: +inf, never kept)
 *   twoe    [n_pad] float: per-token threshold margin above the running minimum (written by the kernel)
 *   run_min, thr [n_pad] float: the running minimum and threshold
 *   count   [n_pad] int32, cand_idx / cand_val [cap][n_pad]: kept codes and their values, slot-major (slot s of
 *           token i at s * n_pad + i: the first slots of neighbouring tokens share cache lines, and a search
 *           touches about one line per 16 tokens and slot used, not one per token)
 *   dropped, compact_thr [n_pad] float: state of full lists
 * The state is initialised by the kernel itself (to FLT_MAX, count 0), as each range of token blocks starts.
 * Threads: simvq_bf16_search handles the token blocks [tb0, tb1); simvq_bf16_search_all splits all blocks into
 * pieces taken dynamically by an OpenMP team. Built with -fopenmp after torch is loaded, the library binds to
 * the libgomp torch already uses (same soname), so the team is torch's own thread pool: no second set of
 * threads competing for the cores, and torch.set_num_threads governs it. Without OpenMP it runs serially.
 *
 * simvq_bf16_pack writes the operands: bf16 rounding (to nearest even) of fp32 rows (centred on request),
 * scaled by a power of two, in the tokens' blocks or the codes' tiles, with the norm of each row's
 * rounding residual and, on request, each row's squared norm.
 *
 * When its range is scanned, simvq_bf16_search settles its tokens (skipped if out is NULL). filter_tokens
 * filters each token's kept codes against its final minimum: those within limit[i] of it (the sum rounded up)
 * are its candidates. One candidate is the answer (out[i]). Tokens with several have their candidates' rows
 * fetched while the range's other tokens are filtered; settle_token then compares them by sum((z - c)^2) in
 * double on the original coordinates: a best candidate ahead of all others by more than the rounding of both
 * sums, here and in any other summation order, is the answer; otherwise the near-ties are moved to the front
 * of the list and out[i] = -2, for the caller's own double re-rank (so that every search path breaks
 * near-ties the same way). An overflowed token gets -1, for the caller's exact search.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MR 32 /* tokens per tile: two 16-lane vectors */
#define NR 10 /* codes per tile: MT x NR = 20 fp32 accumulators */
#define MT (MR / 16)
#define CODE_ROWS (4 * NR) /* codes per unit of work when the codes are packed */
#define ABI_VERSION 15

typedef struct {
    const float *z;    /* [n][dim]: the tokens, original coordinates */
    const float *mean; /* [dim]: the codebook's mean (the tokens are centred on it) */
    const uint32_t *b;
    const float *csq;
    /* per token, written by the kernel: its packed operand, bound and margin (see bound_tokens) */
    uint32_t *apack;
    float *zres;   /* [n_pad]: || z' - bf16(z') || */
    float *zsq;    /* [n_pad]: ||z'||^2 in float (+inf on padding tokens) */
    float *twoe;   /* [n_pad]: the threshold margin above the running minimum */
    double *limit; /* [n_pad]: 2 E, the margin above the final minimum in the finish */
    /* the scan's state */
    float *run_min;
    float *thr;
    int32_t *count;
    int32_t *cand_idx;
    float *cand_val;
    float *dropped;     /* [n_pad]: the smallest value refused by a full list */
    float *compact_thr; /* [n_pad]: the threshold at the list's last compaction */
    /* the finish (filter_tokens, settle_token); out == NULL: none, the state is left for the caller */
    const float *codes; /* [k][dim]: the codes, original coordinates */
    int64_t *out;       /* [n]: the nearest code, -2 (near-ties left) or -1 (overflow) */
    int32_t *near;      /* [n]: near-ties left first in the list (out = -2), else 0 */
    int64_t *stats;     /* [3]: tokens with several candidates, with near-ties left, overflowed (added to) */
    /* E = 1.1 (bound[0] |dz| + bound[1] |z'| + bound[2] |z'|^2 + bound[3]), the fp32 norms times bound[4];
     * bound[5]: max |c'| (inflated likewise); see _bf16_error_coefficients in search.py */
    double bound[6];
    int64_t pairs, k_pad, cap, kb_codes, n, dim, rows; /* rows: n_pad, the state's length */
} simvq_search_args;

int simvq_bf16_abi(int32_t *mr, int32_t *nr) {
    *mr = MR;
    *nr = NR;
    return ABI_VERSION;
}

/* Append (code, v) to the token's list. A full list first drops what the threshold has excluded since its
 * last compaction (those values exceed every final candidate's); if it is still full, v is refused and only
 * the smallest refused value is remembered: the caller treats the token as overflowed when that value is
 * within the final threshold (a candidate may have been refused), and as settled otherwise. So a list
 * filled early, while the threshold was still high, does not by itself send a token to the exact path. */
static void keep(const simvq_search_args *g, int64_t tok, int32_t code, float v) {
    int32_t c = g->count[tok];
    const int64_t st = g->rows;
    int32_t *idx = g->cand_idx + tok;
    float *val = g->cand_val + tok;
    if (c == g->cap) {
        const float t = g->thr[tok];
        if (t < g->compact_thr[tok]) {
            g->compact_thr[tok] = t;
            int32_t w = 0;
            for (int32_t i = 0; i < c; i++)
                if (val[i * st] <= t) {
                    idx[w * st] = idx[i * st];
                    val[w * st] = val[i * st];
                    w++;
                }
            c = w;
            g->count[tok] = c;
        }
        if (c == g->cap) {
            if (v < g->dropped[tok]) g->dropped[tok] = v;
            return;
        }
    }
    idx[c * st] = code;
    val[c * st] = v;
    g->count[tok] = c + 1;
}

/* acc[t][j] = csq[j0 + j] + sum_p a[p][16 t + lane] . b[j0 / NR][p][j]: one MR x NR tile, in registers */
#define TILE(acc, a, g, j0)                                                                               \
    do {                                                                                                  \
        const uint32_t *bt = (g)->b + (j0) * P;                                                            \
        _Pragma("GCC unroll 16") for (int j = 0; j < NR; j++) {                                           \
            const __m512 c = _mm512_set1_ps((g)->csq[(j0) + j]);                                          \
            _Pragma("GCC unroll 4") for (int t = 0; t < MT; t++) acc[t][j] = c;                          \
        }                                                                                                 \
        for (int64_t p = 0; p < P; p++) {                                                                 \
            __m512bh av[MT];                                                                              \
            _Pragma("GCC unroll 4") for (int t = 0; t < MT; t++)                                         \
                av[t] = (__m512bh)_mm512_loadu_si512((a) + p * MR + 16 * t);                              \
            _Pragma("GCC unroll 16") for (int j = 0; j < NR; j++) {                                       \
                const __m512bh bv = (__m512bh)_mm512_set1_epi32((int)bt[p * NR + j]);                     \
                _Pragma("GCC unroll 4") for (int t = 0; t < MT; t++)                                     \
                    acc[t][j] = _mm512_dpbf16_ps(acc[t][j], av[t], bv);                                   \
            }                                                                                             \
        }                                                                                                 \
    } while (0)

/* sum((z - c)^2) in double: each difference of two floats rounds at most once, its square and sum once (fused)
 * or twice, and each term passes through at most dim + 3 additions (four accumulators of 8 lanes, then
 * across them and the lanes, then the tail): relative error <= (dim + 8) 2^-53, and the same holds for any
 * other summation order (the caller's). Four accumulators: one chain of dim / 8 dependent additions made a
 * token's settling wait on the adder's latency. */
static double dist64(const float *z, const float *c, int64_t dim) {
    __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
    int64_t q = 0;
    for (; q + 32 <= dim; q += 32) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) {
            const __m512d d = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(z + q + 8 * u)),
                                            _mm512_cvtps_pd(_mm256_loadu_ps(c + q + 8 * u)));
            acc[u] = _mm512_fmadd_pd(d, d, acc[u]);
        }
    }
    for (; q + 8 <= dim; q += 8) {
        const __m512d d = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(z + q)), _mm512_cvtps_pd(_mm256_loadu_ps(c + q)));
        acc[0] = _mm512_fmadd_pd(d, d, acc[0]);
    }
    double sum = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3])));
    for (; q < dim; q++) {
        const double d = (double)z[q] - (double)c[q];
        sum += d * d;
    }
    return sum;
}

/* Filter the kept codes of tokens [i0, i1) (at most 16) against their final minima after their scan: a
 * token's candidates are its codes within limit[i] of its minimum (the sum rounded up by 2^-50 of its terms).
 * One candidate is the answer (out[i]); a token whose values left the fp32 range or whose list refused a
 * candidate gets -1; a token with several gets out[i] = -3 and its candidates moved to the front of its list
 * (count[i] = how many), for settle_token, and their rows are asked for (so they arrive while the other
 * tokens of the range are filtered). Sixteen tokens at a time, the list slots across the lanes: one token at
 * a time, the branches on its count of codes and candidates went the wrong way often: -2.5% at K = 1,024.
 * stats: see simvq_search_args. */
static void filter_tokens(const simvq_search_args *g, int64_t i0, int64_t i1, int64_t stats[3]) {
    const __mmask16 valid = (__mmask16)((1u << (i1 - i0)) - 1);
    const __mmask8 lo = (__mmask8)valid, hi = (__mmask8)(valid >> 8);
    const __m512i cnt = _mm512_maskz_loadu_epi32(valid, g->count + i0);
    const __m512 m = _mm512_maskz_loadu_ps(valid, g->run_min + i0);
    __m512d lim[2];
    for (int h = 0; h < 2; h++) {
        const __m512d mh = _mm512_cvtps_pd(h ? _mm512_extractf32x8_ps(m, 1) : _mm512_castps512_ps256(m));
        const __m512d e = _mm512_maskz_loadu_pd(h ? hi : lo, g->limit + i0 + 8 * h);
        lim[h] = _mm512_fmadd_pd(_mm512_set1_pd(0x1p-50), _mm512_add_pd(_mm512_abs_pd(mh), e), _mm512_add_pd(mh, e));
    }
    /* under the limit, per lane */
#define UNDER(mask, v)                                                                                              \
    ((mask) & (__mmask16)(_mm512_cmp_pd_mask(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), lim[0], _CMP_LE_OQ) |   \
                          (unsigned)_mm512_cmp_pd_mask(_mm512_cvtps_pd(_mm512_extractf32x8_ps((v), 1)), lim[1],   \
                                                       _CMP_LE_OQ) << 8))
    const __m512 dropped = _mm512_maskz_loadu_ps(valid, g->dropped + i0);
    /* values out of the fp32 range (bound_tokens), or a candidate may have been refused */
    const __mmask16 over = valid & (_mm512_cmp_ps_mask(dropped, _mm512_set1_ps(-__builtin_inff()), _CMP_EQ_OQ) |
                                    _mm512_cmpgt_epi32_mask(cnt, _mm512_set1_epi32((int)g->cap)) |
                                    _mm512_cmplt_epi32_mask(cnt, _mm512_set1_epi32(1)) | UNDER(valid, dropped));
    const __mmask16 live = valid & ~over;
    const int32_t most = _mm512_mask_reduce_max_epi32(live, cnt);
    const int64_t st = g->rows;
    __m512i kept = _mm512_setzero_si512(), first = _mm512_set1_epi32(-1);
    __mmask16 under_at[most > 0 ? most : 1]; /* per slot, the lanes whose code there is a candidate */
    for (int32_t slot = 0; slot < most; slot++) {
        const __mmask16 in = _mm512_mask_cmpgt_epi32_mask(live, cnt, _mm512_set1_epi32(slot));
        const __mmask16 under = under_at[slot] = UNDER(in, _mm512_maskz_loadu_ps(in, g->cand_val + slot * st + i0));
        first = _mm512_mask_loadu_epi32(first, under & _mm512_cmpeq_epi32_mask(kept, _mm512_setzero_si512()),
                                        g->cand_idx + slot * st + i0);
        kept = _mm512_mask_add_epi32(kept, under, kept, _mm512_set1_epi32(1));
    }
#undef UNDER
    /* the minimum itself is always under the limit: a live token has one candidate at least */
    const __mmask16 one = _mm512_mask_cmpeq_epi32_mask(live, kept, _mm512_set1_epi32(1));
    const __mmask16 several = _mm512_mask_cmpgt_epi32_mask(live, kept, _mm512_set1_epi32(1));
    __m512i res = _mm512_mask_mov_epi32(_mm512_set1_epi32(-1), one, first);
    res = _mm512_mask_mov_epi32(res, several, _mm512_set1_epi32(-3));
    _mm512_mask_storeu_epi64(g->out + i0, lo, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(res)));
    _mm512_mask_storeu_epi64(g->out + i0 + 8, hi, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(res, 1)));
    _mm512_mask_storeu_epi32(g->near + i0, valid, _mm512_setzero_si512());
    stats[0] += __builtin_popcount(several);
    stats[2] += __builtin_popcount(valid & ~one & ~several);
    for (unsigned todo = several; todo; todo &= todo - 1) {
        const int l = __builtin_ctz(todo);
        const int64_t i = i0 + l;
        int32_t *idx = g->cand_idx + i;
        int32_t n_kept = 0;
        for (int32_t slot = 0; slot < g->count[i]; slot++)
            if (under_at[slot] >> l & 1) idx[n_kept++ * st] = idx[slot * st];
        g->count[i] = n_kept;
        for (int32_t slot = 0; slot < n_kept; slot++) {
            const char *row = (const char *)(g->codes + (int64_t)idx[slot * st] * g->dim);
            for (int64_t off = 0; off < g->dim * 4; off += 64) _mm_prefetch(row + off, _MM_HINT_T0);
        }
    }
}

/* Settle a token with several candidates (filter_tokens): compare them by sum((z - c)^2) in double on the
 * original coordinates; a best candidate ahead of all others by more than the rounding of both sums, here
 * and in any other summation order, is the answer; otherwise its near-ties are left first in its list
 * (near[i] of them, out[i] = -2) for the caller. */
static void settle_token(const simvq_search_args *g, int64_t i, int64_t stats[3]) {
    /* the order of two sums is certain when they differ by more than both evaluations' errors here and in
     * the caller's order: four times (dim + 8) 2^-53 of their size, with margin */
    const double rel = 4.5 * (double)(g->dim + 8) * 0x1p-53;
    const int64_t st = g->rows;
    int32_t *idx = g->cand_idx + i;
    const int32_t kept = g->count[i];
    int32_t cand[kept];
    double d[kept];
    double best = 0.0;
    int32_t best_s = -1;
    for (int32_t s = 0; s < kept; s++) {
        cand[s] = idx[s * st];
        d[s] = dist64(g->z + i * g->dim, g->codes + (int64_t)cand[s] * g->dim, g->dim);
        if (best_s < 0 || d[s] < best) {
            best = d[s];
            best_s = s;
        }
    }
    /* candidates within that of the best may swap under another summation order: those near-ties (the best
     * among them) are left to the caller; the absolute term covers subnormal results */
    const double near = best + rel * 1.01 * best + 0x1p-1020;
    int32_t n_near = 0;
    for (int32_t s = 0; s < kept; s++)
        if (d[s] <= near) {
            idx[n_near * st] = cand[s];
            n_near++;
        }
    if (n_near == 1) {
        g->out[i] = idx[0];
    } else {
        g->out[i] = -2;
        g->near[i] = n_near;
        stats[1]++;
    }
}

void simvq_bf16_pack(const float *x, const float *mean, int64_t n, int64_t dim, int64_t pairs, float scale,
                     int32_t layout, uint16_t *out, float *resid, float *sq, int64_t r0, int64_t r1);

/* Pack tokens [i0, i1) (centred, rounded, token-blocked), initialise their state and set their margins:
 * E from the polynomial in the token's norms, |v| <= reach = E + 2 max|c'| |z'| + max|c'|^2, and
 * twoe = fl32((2 E + u32 reach) (1 + 2^-20) / (1 - u32)) >= 2 E plus the rounding of an fp32 sum of size
 * reach (so fl32(min + twoe) >= min + 2 E). A token whose values may leave the fp32 range (reach >= 1e37,
 * or not finite) gets dropped = -inf: the finish sends it to the caller's exact search. */
static void bound_tokens(const simvq_search_args *g, int64_t i0, int64_t i1) {
    simvq_bf16_pack(g->z, g->mean, g->n, g->dim, g->pairs, 1.0f, 1, (uint16_t *)g->apack, g->zres, g->zsq, i0, i1);
    const double *k = g->bound;
    const double grow = k[4], cm = k[5], factor = (1 + 0x1p-20) / (1 - 0x1p-24);
    for (int64_t i = i0; i < i1; i++) {
        g->run_min[i] = g->thr[i] = g->dropped[i] = __FLT_MAX__;
        g->compact_thr[i] = __builtin_inff();
        g->count[i] = 0;
        if (i >= g->n) { /* padding: zero tokens, never settled */
            g->twoe[i] = 0.0f;
            g->limit[i] = 0.0;
            continue;
        }
        /* |z'| from the fp32 sum of squares, its square root in double (closer than an fp32 root) */
        const double zn = __builtin_sqrt((double)g->zsq[i]) * grow, dzn = (double)g->zres[i] * grow;
        const double err = 1.1 * (k[0] * dzn + zn * (k[1] + k[2] * zn) + k[3]);
        const double reach = err + zn * (2 * cm) + cm * cm;
        g->limit[i] = 2 * err;
        if (reach < 1e37) {
            g->twoe[i] = (float)((2 * err + reach * 0x1p-24) * factor);
        } else {
            g->twoe[i] = 0.0f;
            g->dropped[i] = -__builtin_inff();
        }
    }
}

/* The minimum of a tile's NR values per lane, as a tree (depth 4, not a chain of NR: the tile's result is
 * ready sooner, and the next tile's work waits less on it) */
static inline __m512 tile_min(const __m512 v[NR]) {
    __m512 m[NR];
#pragma GCC unroll 16
    for (int j = 0; j < NR; j++) m[j] = v[j];
    int n = NR;
    while (n > 1) {
#pragma GCC unroll 16
        for (int j = 0; j < n / 2; j++) m[j] = _mm512_min_ps(m[2 * j], m[2 * j + 1]);
        if (n & 1) m[n / 2] = m[n - 1];
        n = (n + 1) / 2;
    }
    return m[0];
}

/* Codes per pass: blocks of codes that stay in the per-core L2 cache while every token block of a range passes
 * (kb_codes rounded up to whole tiles). */
static inline int64_t code_block(const simvq_search_args *g) {
    const int64_t kb = (g->kb_codes + NR - 1) / NR * NR;
    return kb < NR ? NR : kb;
}

/* Keep the codes of the tile from code j0 on that are under the thresholds of tokens tok0 + 16 t + lane, for
 * the lanes set in `lanes` (operands a): each such token's NR values of the tile evaluated again, one code per
 * lane, in four partial sums: another order of the same fp32 sum, within the same bound E (so the kept set
 * still holds every code that can be the nearest). */
static void keep_tile(const simvq_search_args *g, int64_t tok0, const uint32_t *a, int64_t j0, int t, unsigned lanes) {
    const int64_t P = g->pairs;
    const uint32_t *bt = g->b + j0 * P;
    const __mmask16 codes = (__mmask16)((1u << NR) - 1);
    while (lanes) {
        const int r = 16 * t + __builtin_ctz(lanes);
        lanes &= lanes - 1;
        __m512 acc[4] = {_mm512_maskz_loadu_ps(codes, g->csq + j0), _mm512_setzero_ps(), _mm512_setzero_ps(),
                         _mm512_setzero_ps()};
        int64_t p = 0;
        for (; p + 4 <= P; p += 4) {
#pragma GCC unroll 4
            for (int u = 0; u < 4; u++)
                acc[u] = _mm512_dpbf16_ps(acc[u], (__m512bh)_mm512_maskz_loadu_epi32(codes, bt + (p + u) * NR),
                                          (__m512bh)_mm512_set1_epi32((int)a[(p + u) * MR + r]));
        }
        for (; p < P; p++)
            acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_maskz_loadu_epi32(codes, bt + p * NR),
                                      (__m512bh)_mm512_set1_epi32((int)a[p * MR + r]));
        const __m512 v = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        const int64_t tok = tok0 + r;
        unsigned kept = _mm512_mask_cmp_ps_mask(codes, v, _mm512_set1_ps(g->thr[tok]), _CMP_LE_OQ);
        float vals[16];
        _mm512_storeu_ps(vals, v);
        while (kept) {
            const int j = __builtin_ctz(kept);
            kept &= kept - 1;
            keep(g, tok, (int32_t)(j0 + j), vals[j]);
        }
    }
}

/* Tiles whose minima flush_tiles lists at a time */
#define LIST_TILES 64

/* Keep the codes under the current threshold of token block tok0 (operands a) among the n tiles from code
 * j_first on, whose per-token minima are tmin. Codes are kept when the block's pass over a code block ends,
 * against the threshold of that moment: the running minimum falls fast early in a pass, and most codes under
 * the threshold when their tile was computed are no longer under it then (at K = 1,024, d = 128: ~5 codes
 * kept per token when kept at once, ~1.5 at the end of the pass). A tile holds a code under a token's
 * threshold only if its minimum for that token is: the tiles (halves of the block) where some token's is
 * are listed first, without a branch per tile (taken for about one in five, unpredictably), and then have
 * those tokens' values evaluated again (keep_tile). Evaluating again (about 1.5 token-tiles per token)
 * replaced a log of the values of every tile that might hold a kept code (63% of the tiles at K = 1,024). */
static void flush_tiles(const simvq_search_args *g, int64_t tok0, const uint32_t *a, float (*tmin)[MT][16],
                        int64_t j_first, int n) {
    __m512 th[MT];
#pragma GCC unroll 4
    for (int t = 0; t < MT; t++) th[t] = _mm512_loadu_ps(g->thr + tok0 + 16 * t);
    for (int q0 = 0; q0 < n; q0 += LIST_TILES) {
        const int q1 = q0 + LIST_TILES < n ? q0 + LIST_TILES : n;
        uint32_t list[LIST_TILES * MT]; /* lanes << 16 | (q - q0) * MT + t */
        int listed = 0;
        for (int q = q0; q < q1; q++) {
#pragma GCC unroll 4
            for (int t = 0; t < MT; t++) {
                const unsigned lanes = _mm512_cmp_ps_mask(_mm512_load_ps(tmin[q][t]), th[t], _CMP_LE_OQ);
                list[listed] = lanes << 16 | (unsigned)((q - q0) * MT + t);
                listed += lanes != 0;
            }
        }
        for (int i = 0; i < listed; i++) {
            const int q = q0 + (int)(list[i] & 0xFFFF) / MT, t = (int)(list[i] & 0xFFFF) % MT;
            keep_tile(g, tok0, a, j_first + (int64_t)q * NR, t, list[i] >> 16);
        }
    }
}

/* Token blocks [tb0, tb1). The rows of tokens [ahead0, ahead1) (the piece this thread does next, whole token
 * blocks; an empty range: none) and the packed operands they will be written to are asked for during the
 * last pass over the codes, a few lines per tile, so that they are in the core's cache when that piece is
 * packed: the scan is bound by arithmetic, the packing by memory (at K = 1,024, two threads: 245 -> 65-110 us
 * per search, of ~1.7 ms). tminbuf: room for the tile minima of one pass (tmin_tiles tiles; NULL: 16 tiles
 * on the stack, the codes then kept every 16 tiles, against a higher threshold). */
void simvq_bf16_search(const simvq_search_args *g, int64_t tb0, int64_t tb1, int64_t ahead0, int64_t ahead1,
                       float (*tminbuf)[MT][16], int64_t tmin_tiles) {
    const int64_t P = g->pairs;
    const int64_t kb = code_block(g);
    bound_tokens(g, tb0 * MR, tb1 * MR);
    /* the tile minima of the pass (see flush_tiles) */
    float stack[16][MT][16] __attribute__((aligned(64)));
    float(*tmin)[MT][16] = tminbuf ? tminbuf : stack;
    const int cap_tiles = tminbuf ? (int)tmin_tiles : 16;
    const char *ahead = (const char *)(g->z + ahead0 * g->dim);
    const int64_t ahead_bytes = ahead1 > ahead0 ? ((ahead1 < g->n ? ahead1 : g->n) - ahead0) * g->dim * 4 : 0;
    const char *ahead_a = (const char *)(g->apack + ahead0 * P);
    const int64_t ahead_a_bytes = ahead1 > ahead0 ? (ahead1 - ahead0) * P * 4 : 0;
    int64_t ahead_off = 0, ahead_step = 0;
    for (int64_t k0 = 0; k0 < g->k_pad; k0 += kb) {
        const int64_t k1 = k0 + kb < g->k_pad ? k0 + kb : g->k_pad;
        if (k1 == g->k_pad) /* the last pass: its tiles share the lines out */
            ahead_step = ((ahead_bytes + ahead_a_bytes) / 64 / ((k1 - k0) / NR * (tb1 - tb0)) + 1) * 64;
        for (int64_t tb = tb0; tb < tb1; tb++) {
            const uint32_t *a = g->apack + tb * P * MR;
            const int64_t tok0 = tb * MR;
            /* the lines of the block's first two list slots, which the pass's end will write (the matmul
             * between searches evicts them) */
            for (int64_t slot = 0; slot < 2 && slot < g->cap; slot++)
                for (int h = 0; h < MR; h += 16) {
                    _mm_prefetch((const char *)(g->cand_idx + slot * g->rows + tok0 + h), _MM_HINT_T0);
                    _mm_prefetch((const char *)(g->cand_val + slot * g->rows + tok0 + h), _MM_HINT_T0);
                }
            int n_tiles = 0;
            int64_t j_first = k0;
            for (int64_t j0 = k0; j0 < k1; j0 += NR) {
                __m512 acc[MT][NR];
                TILE(acc, a, g, j0);
                for (const int64_t end = ahead_off + ahead_step; ahead_off < end && ahead_off < ahead_bytes + ahead_a_bytes;
                     ahead_off += 64)
                    _mm_prefetch(ahead_off < ahead_bytes ? ahead + ahead_off : ahead_a + (ahead_off - ahead_bytes), _MM_HINT_T1);
                /* per token, the tile's own minimum, recorded for flush_tiles: a code of the tile can be under
                 * the threshold only if it is. No value is NaN: a token whose values could overflow is never
                 * settled here (bound_tokens), and padding codes give +inf. */
#pragma GCC unroll 4
                for (int t = 0; t < MT; t++) {
                    float *thr_p = g->thr + tok0 + 16 * t;
                    float *min_p = g->run_min + tok0 + 16 * t;
                    const __m512 tm = tile_min(acc[t]);
                    const __m512 mn = _mm512_min_ps(tm, _mm512_loadu_ps(min_p));
                    _mm512_storeu_ps(min_p, mn);
                    const __m512 nt = _mm512_add_ps(mn, _mm512_loadu_ps(g->twoe + tok0 + 16 * t));
                    const __m512 th = _mm512_min_ps(nt, _mm512_loadu_ps(thr_p));
                    _mm512_storeu_ps(thr_p, th);
                    _mm512_store_ps(tmin[n_tiles][t], tm);
                }
                if (++n_tiles == cap_tiles) {
                    flush_tiles(g, tok0, a, tmin, j_first, n_tiles);
                    n_tiles = 0;
                    j_first = j0 + NR;
                }
            }
            flush_tiles(g, tok0, a, tmin, j_first, n_tiles);
        }
    }
    if (g->out) { /* the range's tokens are scanned: settle them while their lists are in this core's cache */
        int64_t stats[3] = {0, 0, 0};
        const int64_t i1 = tb1 * MR < g->n ? tb1 * MR : g->n;
        for (int64_t i = tb0 * MR; i < i1; i += 16) filter_tokens(g, i, i + 16 < i1 ? i + 16 : i1, stats);
        for (int64_t i = tb0 * MR; i < i1; i++)
            if (g->out[i] == -3) settle_token(g, i, stats);
        for (int q = 0; q < 3; q++)
            if (stats[q]) __atomic_fetch_add(g->stats + q, stats[q], __ATOMIC_RELAXED);
    }
}


/* All token blocks, in `pieces` ranges taken dynamically by `threads` threads. A thread takes its next piece
 * as it starts one, and asks for that piece's rows while it scans (see simvq_bf16_search), except for the
 * last pieces (as many as threads): taken early, one would leave another thread idle at the end. */
void simvq_bf16_search_all(const simvq_search_args *g, int64_t blocks, int32_t threads, int64_t pieces) {
    if (pieces < 1) pieces = 1;
    int64_t taken = 0;
#pragma omp parallel num_threads(threads)
    {
        /* the tile minima of one pass, per thread and call (a fresh buffer per piece could come back as new pages) */
        const int64_t kb = code_block(g), tiles = (kb < g->k_pad ? kb : g->k_pad) / NR;
        float(*tminbuf)[MT][16] = aligned_alloc(64, tiles * sizeof(float[MT][16]));
        int64_t cur = __atomic_fetch_add(&taken, 1, __ATOMIC_RELAXED);
        while (cur < pieces) {
            int64_t next = pieces;
            if (__atomic_load_n(&taken, __ATOMIC_RELAXED) + threads < pieces)
                next = __atomic_fetch_add(&taken, 1, __ATOMIC_RELAXED);
            const int64_t a0 = next < pieces ? blocks * next / pieces * MR : 0;
            const int64_t a1 = next < pieces ? blocks * (next + 1) / pieces * MR : 0;
            simvq_bf16_search(g, blocks * cur / pieces, blocks * (cur + 1) / pieces, a0, a1, tminbuf, tiles);
            cur = next < pieces ? next : __atomic_fetch_add(&taken, 1, __ATOMIC_RELAXED);
        }
        free(tminbuf);
    }
}

int32_t simvq_bf16_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* out[p][c] = in[c][p] for a 16 x 16 tile of 32-bit values held in registers */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    /* r[4 i + j] holds, in each 128-bit lane L, element 4 L + j of rows 4 i .. 4 i + 3 */
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
        const __m512i a = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88), b = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xDD);
        const __m512i c = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88), e = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xDD);
        t[j] = _mm512_shuffle_i32x4(a, c, 0x88);      /* lane 0: column j */
        t[8 + j] = _mm512_shuffle_i32x4(a, c, 0xDD);  /* lane 2: column 8 + j */
        t[4 + j] = _mm512_shuffle_i32x4(b, e, 0x88);  /* lane 1: column 4 + j */
        t[12 + j] = _mm512_shuffle_i32x4(b, e, 0xDD); /* lane 3: column 12 + j */
    }
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* Rows [r0, r1) of the operands: y_i = x_i - mean (fp32, as torch computes it; mean may be NULL: y_i = x_i)
 * rounded to bf16 (to nearest even) times `scale` (a power of two: exact) into `out`, in tiles of `tile` rows:
 * [n_pad / tile][pairs][tile] uint32 (two bf16 of one row: an even/odd coordinate pair), layout 1 the tokens'
 * (tile = MR, r0 and r1 multiples of 16), layout 2 the codes' (tile = NR, r0 and r1 multiples of NR). Rows
 * n..n_pad-1 and the odd coordinate of an odd dim are zero. resid[i] = || y_i - bf16(y_i) || (the residuals
 * are exact in float); sq (may be NULL) gets ||y_i||^2 in float, +inf on padding rows. Rows are packed 16 (or
 * NR) at a time, 16 pairs by 16 rows transposed in registers: one store per pair for the group, where a
 * 4-byte store per pair and row made the packing 3x slower. */
void simvq_bf16_pack(const float *x, const float *mean, int64_t n, int64_t dim, int64_t pairs,
                     float scale, int32_t layout, uint16_t *out, float *resid, float *sq, int64_t r0, int64_t r1) {
    const int tile = layout == 2 ? NR : MR, group = layout == 2 ? NR : 16;
    const __mmask16 lanes = (__mmask16)((1u << group) - 1);
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t g0 = r0; g0 < r1; g0 += group) {
        /* the next group's rows, asked for while this one is packed: a piece's rows span a few pages, and the
         * hardware's prefetch, which restarts at each page, left the packing inside a search 2-3x slower
         * than the same packing of all rows at once */
        const int64_t nx = g0 + group;
        if (nx < r1 && nx < n) {
            const char *p = (const char *)(x + nx * dim);
            const int64_t bytes = (n - nx < group ? n - nx : group) * dim * 4;
            for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
        }
        __m512 acc[16], sum[16];
        for (int r = 0; r < 16; r++) acc[r] = sum[r] = _mm512_setzero_ps();
        uint32_t *o = (uint32_t *)out + (g0 / tile) * pairs * tile + (g0 % tile);
        for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
            /* coordinates [2 p0, 2 p0 + 32) of the group's rows, as 16 pairs each, then one store per pair */
            __m512i t[16];
            for (int r = 0; r < 16; r++) {
                const int64_t i = g0 + r;
                if (r >= group || i >= n) {
                    t[r] = _mm512_setzero_si512();
                    continue;
                }
                __m256bh h[2];
                for (int half = 0; half < 2; half++) {
                    const int64_t q = 2 * p0 + 16 * half;
                    const int64_t left = dim - q;
                    const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
                    __m512 v = _mm512_maskz_loadu_ps(m, x + i * dim + q);
                    if (mean) v = _mm512_maskz_sub_ps(m, v, _mm512_maskz_loadu_ps(m, mean + q));
                    sum[r] = _mm512_fmadd_ps(v, v, sum[r]);
                    h[half] = _mm512_cvtneps_pbh(v);
                    const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h[half]), 16));
                    const __m512 d = _mm512_sub_ps(v, back);
                    acc[r] = _mm512_fmadd_ps(d, d, acc[r]);
                    if (scale != 1.0f) h[half] = _mm512_cvtneps_pbh(_mm512_mul_ps(v, sc));
                }
                t[r] = _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)h[0]), (__m256i)h[1], 1);
            }
            transpose16(t);
            const int np = pairs - p0 < 16 ? (int)(pairs - p0) : 16;
            for (int p = 0; p < np; p++) _mm512_mask_storeu_epi32(o + (p0 + p) * tile, lanes, t[p]);
        }
        for (int r = 0; r < group; r++) {
            const int64_t i = g0 + r;
            if (i < n) {
                resid[i] = __builtin_sqrtf(_mm512_reduce_add_ps(acc[r]));
                if (sq) sq[i] = _mm512_reduce_add_ps(sum[r]);
            } else if (sq) {
                sq[i] = __builtin_inff();
            }
        }
    }
}

/* simvq_bf16_pack over rows [0, n_pad) on `threads` threads, in ranges of whole tiles (MR rows for the tokens'
 * layout, CODE_ROWS for the codes'). */
void simvq_bf16_pack_all(const float *x, const float *mean, int64_t n, int64_t n_pad, int64_t dim, int64_t pairs,
                         float scale, int32_t layout, uint16_t *out, float *resid, float *sq, int32_t threads) {
    const int64_t step = layout == 2 ? CODE_ROWS : MR, blocks = (n_pad + step - 1) / step;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t r1 = (blk + 1) * step < n_pad ? (blk + 1) * step : n_pad;
        simvq_bf16_pack(x, mean, n, dim, pairs, scale, layout, out, resid, sq, blk * step, r1);
    }
}


/* max(m, v), where a NaN in either stays (as torch's max) */
static inline double max_nan(double m, double v) { return (v > m || v != v) ? v : m; }

/* The codes' operands in one threaded call: mean[q] = the codes' mean (summed in double, per thread in
 * partial[threads][dim], then rounded to float), then simvq_bf16_pack of codes - mean, scale -2, in tiles,
 * with resid and the squared norms csq (+inf on the k_pad - k padding codes), and maxima[0] = max csq[0, k),
 * maxima[1] = max resid (NaN if any is NaN). A search of a small codebook takes about a millisecond; the
 * torch passes this replaces (a mean, a reduction per maximum) cost tens of microseconds each. */
void simvq_bf16_codes(const float *codes, int64_t k, int64_t k_pad, int64_t dim, int64_t pairs, float *mean,
                      double *partial, uint32_t *b, float *resid, float *csq, double *maxima, int32_t threads) {
    const int64_t rows_per_block = CODE_ROWS, blocks = (k_pad + rows_per_block - 1) / rows_per_block;
    int32_t team = 1;
    maxima[0] = maxima[1] = -__builtin_inf();
#pragma omp parallel num_threads(threads)
    {
        int32_t tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#pragma omp single
        team = omp_get_num_threads();
#endif
        double *mine = partial + tid * dim;
        for (int64_t q = 0; q < dim; q++) mine[q] = 0.0;
        const int64_t r0 = k * tid / team, r1 = k * (tid + 1) / team;
        for (int64_t i = r0; i < r1; i++) {
            const float *row = codes + i * dim;
            int64_t q = 0;
            for (; q + 8 <= dim; q += 8)
                _mm512_storeu_pd(mine + q, _mm512_add_pd(_mm512_loadu_pd(mine + q), _mm512_cvtps_pd(_mm256_loadu_ps(row + q))));
            for (; q < dim; q++) mine[q] += (double)row[q];
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t q = 0; q < dim; q++) {
            double sum = 0.0;
            for (int32_t t = 0; t < team; t++) sum += partial[t * dim + q];
            mean[q] = (float)(sum / (double)k);
        }
        double mc = -__builtin_inf(), mr = -__builtin_inf();
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; blk++) {
            const int64_t i0 = blk * rows_per_block, i1 = i0 + rows_per_block < k_pad ? i0 + rows_per_block : k_pad;
            simvq_bf16_pack(codes, mean, k, dim, pairs, -2.0f, 2, (uint16_t *)b, resid, csq, i0, i1);
            for (int64_t i = i0; i < i1 && i < k; i++) {
                mc = max_nan(mc, (double)csq[i]);
                mr = max_nan(mr, (double)resid[i]);
            }
        }
#pragma omp critical
        {
            maxima[0] = max_nan(maxima[0], mc);
            maxima[1] = max_nan(maxima[1], mr);
        }
    }
}
