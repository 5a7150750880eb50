/* Fused fp32 nearest-code search (AVX2 + FMA), used by simvq/quantizers/search.py ("fp32-fused") on CPUs
 * without hardware bf16.
 *
 * For every token i and code k it evaluates v[i,k] = csq[k] + sum_p a[i,p] b[k,p] in fp32, a = -2 (z - mean)
 * and b = c - mean: the dot product is accumulated with FMAs from zero and csq added last, so that each value
 * is the matmul form ||c'||^2 - 2 z'.c' of the exact path with its rounding bound (_rounding_bound in
 * search.py; the bound holds for any summation order). The distance matrix is never written: while a tile's
 * values are in registers the kernel keeps, per token, the smallest value (m1), the code that first reached
 * it in code order (idx) and the smallest value of every other code (m2). The caller accepts idx where
 * m2 - m1 exceeds twice the bound (no other code can be nearer) and sends the other tokens to the exact path,
 * whose fp64 re-rank settles near-ties; a token whose values cannot be trusted (non-finite) goes there too.
 *
 * Layout (contiguous):
 *   z      [n][dim] float: the tokens; mean [dim]: the point they and the codes are centred on
 *   b      [k_pad / NR][dim][NR] float: the centred codes, tile-blocked (a tile's NR codes of a coordinate
 *          side by side, so a tile reads its codes as one stream; k_pad a multiple of NR, zero codes past K)
 *   csq    [k_pad] float: ||c - mean||^2 (padding codes: +inf, never smaller than anything kept)
 *   apack  [token blocks][dim][MR] float: -2 (z - mean) of MR tokens per coordinate (written by the kernel;
 *          zero on padding tokens)
 *   znorm  [n_pad] float: ||z - mean|| (rounded from double; written by the kernel)
 *   m1, m2 [n_pad] float, idx [n_pad] int32: the result (written by the kernel)
 * simvq_fp32_codes writes b and csq from the codes in one pass. Tokens whose runner-up is too near are listed
 * again by simvq_fp32_collect: every code whose value (the same, bit for bit) is under a given threshold.
 *
 * Threads: simvq_fp32_search_all runs on an OpenMP team; loaded after torch, the library binds to the libgomp
 * torch already uses, so the team is torch's own (torch.set_num_threads governs it). Without OpenMP it runs
 * serially. With parts = 1 it splits the token blocks into pieces taken dynamically; each piece packs its
 * tokens, then passes over the codes one cache block (kb_codes codes, sized for L2) at a time. With fewer
 * token blocks than the team can share (a few tokens), parts > 1 also splits the codes into `parts` ranges of
 * whole tiles: every (token block, range) pair is one piece with its own state (m1, m2, idx hold `parts`
 * arrays of n_pad), and the ranges are merged in code order at the end, so the result is the one a single
 * pass gives, bit for bit.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MR 16 /* tokens per block: two 8-lane vectors */
#define NR 6  /* codes per tile: 2 x 6 = 12 accumulators, 2 token vectors and a broadcast code in 16 registers */
#define MT (MR / 8)
#define ABI_VERSION 4

typedef struct {
    const float *z;
    const float *mean;
    const float *b;
    const float *csq;
    float *apack;
    float *znorm;
    float *m1;
    float *m2;
    int32_t *idx;
    int64_t n, dim, k_pad, kb_codes;
} simvq_fp32_args;

int simvq_fp32_abi(int32_t *mr, int32_t *nr) {
    *mr = MR;
    *nr = NR;
    return ABI_VERSION;
}

int32_t simvq_fp32_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The code tiles of a codebook `codes` [k][dim] in one threaded pass: b = codes - mean (one fp32 subtraction
 * per coordinate, as torch's codes - mean) and csq = ||b||^2 (summed in double, rounded once: within the
 * bound's allowance for any fp32 summation), with zero codes and csq = +inf past k up to k_pad */
void simvq_fp32_codes(const float *codes, const float *mean, int64_t k, int64_t k_pad, int64_t dim, float *b,
                      float *csq, int32_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < k_pad / NR; t++) {
        /* a tile's NR codes side by side: its rows read in step, b written in order, NR independent sums */
        float *bt = b + t * dim * NR;
        const float *row[NR];
        double sq[NR];
        for (int j = 0; j < NR; j++) {
            row[j] = t * NR + j < k ? codes + (t * NR + j) * dim : mean; /* past k: mean - mean = 0 */
            sq[j] = 0.0;
        }
        for (int64_t p = 0; p < dim; p++) {
            const float m = mean[p];
#pragma GCC unroll 8
            for (int j = 0; j < NR; j++) {
                const float y = row[j][p] - m;
                bt[p * NR + j] = y;
                sq[j] += (double)y * (double)y;
            }
        }
        for (int j = 0; j < NR; j++) csq[t * NR + j] = t * NR + j < k ? (float)sq[j] : INFINITY;
    }
}

/* r[j] = element j of each of r[0..7]: an 8 x 8 transpose in registers */
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
#pragma GCC unroll 2
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
        r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
        r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
    }
}

/* apack and znorm of token block tb, eight tokens at a time (rows read eight coordinates at a time and
 * transposed in registers); the block's state starts empty (m1 = m2 = +inf, idx 0) */
static void pack_block(const simvq_fp32_args *g, int64_t tb) {
    const int64_t dim = g->dim, i0 = tb * MR;
    float *a = g->apack + tb * dim * MR;
    const __m256 minus2 = _mm256_set1_ps(-2.0f);
    for (int h = 0; h < MT; h++) {
        const float *row[8];
        int64_t valid = g->n - (i0 + 8 * h); /* rows of this half that are tokens */
        if (valid > 8) valid = 8;
        for (int r = 0; r < 8; r++) row[r] = r < valid ? g->z + (i0 + 8 * h + r) * dim : g->mean; /* y = 0 */
        __m256d sq[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
        int64_t p = 0;
        for (; p + 8 <= dim; p += 8) {
            const __m256 mv = _mm256_loadu_ps(g->mean + p);
            __m256 y[8];
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++) y[r] = _mm256_sub_ps(_mm256_loadu_ps(row[r] + p), mv); /* as torch's z - mean */
            transpose8(y);
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                _mm256_storeu_ps(a + (p + j) * MR + 8 * h, _mm256_mul_ps(y[j], minus2)); /* exact */
                const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(y[j]));
                const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(y[j], 1));
                sq[2 * (j & 1)] = _mm256_fmadd_pd(lo, lo, sq[2 * (j & 1)]);
                sq[2 * (j & 1) + 1] = _mm256_fmadd_pd(hi, hi, sq[2 * (j & 1) + 1]);
            }
        }
        double tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (; p < dim; p++)
            for (int r = 0; r < 8; r++) {
                const float y = row[r][p] - g->mean[p];
                a[p * MR + 8 * h + r] = -2.0f * y;
                tail[r] += (double)y * (double)y;
            }
        double lanes[8];
        _mm256_storeu_pd(lanes, _mm256_add_pd(sq[0], sq[2]));
        _mm256_storeu_pd(lanes + 4, _mm256_add_pd(sq[1], sq[3]));
        for (int r = 0; r < 8; r++) {
            const int64_t i = i0 + 8 * h + r;
            g->znorm[i] = (float)sqrt(lanes[r] + tail[r]);
            g->m1[i] = INFINITY;
            g->m2[i] = INFINITY;
            g->idx[i] = 0;
        }
    }
}

/* The values of one tile: token block a (packed) against the NR codes of tile bt, csq added last */
static inline __attribute__((always_inline)) void tile_values(const float *a, const float *bt, const float *csq,
                                                              int64_t dim, __m256 acc[MT][NR]) {
#pragma GCC unroll 8
    for (int j = 0; j < NR; j++)
#pragma GCC unroll 2
        for (int t = 0; t < MT; t++) acc[t][j] = _mm256_setzero_ps();
    for (int64_t p = 0; p < dim; p++) {
        __m256 av[MT];
#pragma GCC unroll 2
        for (int t = 0; t < MT; t++) av[t] = _mm256_loadu_ps(a + p * MR + 8 * t);
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) {
            const __m256 bv = _mm256_broadcast_ss(bt + p * NR + j);
#pragma GCC unroll 2
            for (int t = 0; t < MT; t++) acc[t][j] = _mm256_fmadd_ps(av[t], bv, acc[t][j]);
        }
    }
#pragma GCC unroll 2
    for (int t = 0; t < MT; t++)
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) acc[t][j] = _mm256_add_ps(acc[t][j], _mm256_broadcast_ss(csq + j));
}

/* One token block against the tiles of codes [k0, k1): the values of an MR x NR tile in registers, then the
 * block's running state, touched only when some token's value falls below its m2 (after the first tiles,
 * rarely: the records of a running second minimum). */
static void scan_block(const simvq_fp32_args *g, int64_t tb, int64_t k0, int64_t k1) {
    const int64_t dim = g->dim;
    const float *a = g->apack + tb * dim * MR;
    float *m1 = g->m1 + tb * MR, *m2 = g->m2 + tb * MR;
    int32_t *idx = g->idx + tb * MR;
    for (int64_t k = k0; k < k1; k += NR) {
        __m256 acc[MT][NR];
        tile_values(a, g->b + k * dim, g->csq + k, dim, acc); /* tile k / NR starts at (k / NR) * dim * NR */
#pragma GCC unroll 2
        for (int t = 0; t < MT; t++) {
            __m256 tmin = acc[t][0];
#pragma GCC unroll 8
            for (int j = 1; j < NR; j++) tmin = _mm256_min_ps(tmin, acc[t][j]);
            __m256 s2 = _mm256_loadu_ps(m2 + 8 * t);
            if (!_mm256_movemask_ps(_mm256_cmp_ps(tmin, s2, _CMP_LT_OQ))) continue;
            __m256 s1 = _mm256_loadu_ps(m1 + 8 * t);
            __m256i si = _mm256_loadu_si256((const __m256i *)(idx + 8 * t));
#pragma GCC unroll 8
            for (int j = 0; j < NR; j++) {
                const __m256 v = acc[t][j];
                /* NaN values (possible only for tokens the caller re-checks) change nothing */
                const __m256 lt = _mm256_cmp_ps(v, s1, _CMP_LT_OQ), lt2 = _mm256_cmp_ps(v, s2, _CMP_LT_OQ);
                /* m2 = min(m2, max(m1, v)) on lanes where v < m2: the larger of the old m1 and v */
                s2 = _mm256_blendv_ps(s2, _mm256_blendv_ps(v, s1, lt), lt2);
                s1 = _mm256_blendv_ps(s1, v, lt);
                si = _mm256_castps_si256(
                    _mm256_blendv_ps(_mm256_castsi256_ps(si), _mm256_castsi256_ps(_mm256_set1_epi32((int)(k + j))), lt));
            }
            _mm256_storeu_ps(m1 + 8 * t, s1);
            _mm256_storeu_ps(m2 + 8 * t, s2);
            _mm256_storeu_si256((__m256i *)(idx + 8 * t), si);
        }
    }
}

/* Token blocks [tb0, tb1): pack them, then pass over the codes one cache block at a time */
static void search_blocks(const simvq_fp32_args *g, int64_t tb0, int64_t tb1) {
    for (int64_t tb = tb0; tb < tb1; tb++) pack_block(g, tb);
    int64_t kb = g->kb_codes / NR * NR;
    if (kb < NR) kb = NR;
    for (int64_t k0 = 0; k0 < g->k_pad; k0 += kb) {
        const int64_t k1 = k0 + kb < g->k_pad ? k0 + kb : g->k_pad;
        for (int64_t tb = tb0; tb < tb1; tb++) scan_block(g, tb, k0, k1);
    }
}

/* The first code of range q of `parts` over `tiles` tiles (range q ends where range q + 1 starts) */
static inline int64_t range_start(int64_t tiles, int64_t q, int64_t parts) { return tiles * q / parts * NR; }

/* Token blocks in pieces (parts = 1), or every (token block, code range) pair (parts > 1); see the header */
void simvq_fp32_search_all(const simvq_fp32_args *g, int64_t blocks, int32_t threads, int64_t pieces, int64_t parts) {
    if (pieces < 1) pieces = 1;
    int64_t taken = 0;
    if (parts <= 1) {
#pragma omp parallel num_threads(threads)
        {
            int64_t cur;
            while ((cur = __atomic_fetch_add(&taken, 1, __ATOMIC_RELAXED)) < pieces)
                search_blocks(g, blocks * cur / pieces, blocks * (cur + 1) / pieces);
        }
        return;
    }
    const int64_t rows = blocks * MR, tiles = g->k_pad / NR;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t tb = 0; tb < blocks; tb++) {
            pack_block(g, tb); /* and part 0's state */
            for (int64_t q = 1; q < parts; q++)
                for (int64_t i = tb * MR; i < (tb + 1) * MR; i++) {
                    g->m1[q * rows + i] = INFINITY;
                    g->m2[q * rows + i] = INFINITY;
                    g->idx[q * rows + i] = 0;
                }
        }
        int64_t cur;
        while ((cur = __atomic_fetch_add(&taken, 1, __ATOMIC_RELAXED)) < blocks * parts) {
            const int64_t q = cur / blocks, tb = cur % blocks;
            simvq_fp32_args h = *g;
            h.m1 += q * rows;
            h.m2 += q * rows;
            h.idx += q * rows;
            scan_block(&h, tb, range_start(tiles, q, parts), range_start(tiles, q + 1, parts));
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            /* the ranges in code order: a later range takes the token only with a strictly smaller value */
            float s1 = g->m1[i], s2 = g->m2[i];
            int32_t si = g->idx[i];
            for (int64_t q = 1; q < parts; q++) {
                const float v1 = g->m1[q * rows + i], v2 = g->m2[q * rows + i];
                if (v1 < s1) {
                    s2 = s1 < v2 ? s1 : v2;
                    s1 = v1;
                    si = g->idx[q * rows + i];
                } else if (v1 < s2) {
                    s2 = v1;
                }
            }
            g->m1[i] = s1;
            g->m2[i] = s2;
            g->idx[i] = si;
        }
    }
}

/* Every pair (token i, code k) of the n tokens (packed into apack, state initialised) whose value is at most
 * thr[i]: its token in rows, its code in cols, in no particular order, at most cap pairs written. Returns the
 * number of such pairs (more than cap: the caller settles these tokens another way). The values are the ones
 * simvq_fp32_search_all evaluates, bit for bit (the same tiles, the same operations). Pieces: every (token
 * block, code range) pair, as in the search with parts. */
int64_t simvq_fp32_collect(const simvq_fp32_args *g, const float *thr, int64_t blocks, int32_t threads,
                           int64_t parts, int64_t cap, int32_t *rows, int32_t *cols) {
    const int64_t tiles = g->k_pad / NR;
    if (parts < 1) parts = 1;
    int64_t taken = 0, found = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t tb = 0; tb < blocks; tb++) pack_block(g, tb);
        int64_t cur;
        while ((cur = __atomic_fetch_add(&taken, 1, __ATOMIC_RELAXED)) < blocks * parts) {
            const int64_t q = cur / blocks, tb = cur % blocks, dim = g->dim;
            const float *a = g->apack + tb * dim * MR;
            __m256 limit[MT];
            float lanes[MR];
            for (int r = 0; r < MR; r++) lanes[r] = tb * MR + r < g->n ? thr[tb * MR + r] : -INFINITY;
#pragma GCC unroll 2
            for (int t = 0; t < MT; t++) limit[t] = _mm256_loadu_ps(lanes + 8 * t);
            for (int64_t k = range_start(tiles, q, parts); k < range_start(tiles, q + 1, parts); k += NR) {
                __m256 acc[MT][NR];
                tile_values(a, g->b + k * dim, g->csq + k, dim, acc);
#pragma GCC unroll 2
                for (int t = 0; t < MT; t++)
#pragma GCC unroll 8
                    for (int j = 0; j < NR; j++) {
                        int mask = _mm256_movemask_ps(_mm256_cmp_ps(acc[t][j], limit[t], _CMP_LE_OQ));
                        while (mask) {
                            const int r = __builtin_ctz(mask);
                            mask &= mask - 1;
                            const int64_t at = __atomic_fetch_add(&found, 1, __ATOMIC_RELAXED);
                            if (at < cap) {
                                rows[at] = (int32_t)(tb * MR + 8 * t + r);
                                cols[at] = (int32_t)(k + j);
                            }
                        }
                    }
            }
        }
    }
    return found;
}
