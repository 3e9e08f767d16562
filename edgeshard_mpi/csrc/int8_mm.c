/* y = (x @ w.T) * scales for int8 weights w (n x k, one bf16 scale per row) and a few fp32 rows x (m x k).

   A decode step's product reads every weight once and meets only a few rows, so it is bound by
   reading w. Each row of x is quantized to int16 with one scale of its own (15 bits: finer than the
   bf16 that aten's _weight_int8pack_mm takes), and w's bytes, sign-extended to int16, meet it in
   _mm256_madd_epi16, 16 products to the instruction, summed exactly in int32. Built for AVX2 at first
   use (cpu_kernels.py); rows of w are split among the threads, a contiguous run each, which a
   thread reads in order, prefetching ahead, since rows of a few hundred bytes are too short for the
   hardware prefetcher to follow on its own. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* An int32 lane gains at most 2 * 127 * 32767 per 16 columns: flush to float every SPAN columns. */
#define SPAN 4096
#define PREFETCH 4096 /* bytes ahead */

static inline float bf16(uint16_t bits) {
    union { uint32_t u; float f; } v = {(uint32_t)bits << 16};
    return v.f;
}

static inline int32_t hsum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static inline __m256i madd(__m256i w16, const int16_t *x) {
    return _mm256_madd_epi16(w16, _mm256_loadu_si256((const __m256i *)x));
}

/* out[j] = sum_i w[i] * x[j][i] for NX rows of x (1, 2 or 4): w's bytes are extended once for all. */
#define DOTS(NX)                                                                                   \
    static void dots##NX(const int8_t *w, const int16_t *x, int64_t k, float *out) {               \
        float total[NX] = {0};                                                                    \
        for (int64_t i0 = 0; i0 < k; i0 += SPAN) {                                                \
            int64_t i1 = i0 + SPAN < k ? i0 + SPAN : k, i = i0;                                   \
            __m256i a[NX];                                                                        \
            for (int j = 0; j < NX; j++) a[j] = _mm256_setzero_si256();                           \
            for (; i + 32 <= i1; i += 32) {                                                       \
                _mm_prefetch((const char *)(w + i + PREFETCH), _MM_HINT_T0);                      \
                __m256i b = _mm256_loadu_si256((const __m256i *)(w + i));                         \
                __m256i lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(b));                     \
                __m256i hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(b, 1));                \
                for (int j = 0; j < NX; j++)                                                      \
                    a[j] = _mm256_add_epi32(a[j], _mm256_add_epi32(madd(lo, x + j * k + i),        \
                                                                   madd(hi, x + j * k + i + 16))); \
            }                                                                                     \
            for (int j = 0; j < NX; j++) {                                                        \
                int32_t s = hsum(a[j]);                                                           \
                for (int64_t t = i; t < i1; t++) s += (int32_t)w[t] * x[j * k + t];               \
                total[j] += (float)s;                                                             \
            }                                                                                     \
        }                                                                                         \
        for (int j = 0; j < NX; j++) out[j] = total[j];                                           \
    }
DOTS(1)
DOTS(2)
DOTS(4)

/* Returns 0, or -1 when memory for the quantized rows could not be had. */
int int8_mm(const float *x, const int8_t *w, const uint16_t *scales, float *y, int64_t m, int64_t n, int64_t k,
            int threads) {
    int16_t *xq = malloc(sizeof(int16_t) * m * k);
    float *xs = malloc(sizeof(float) * m);
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return -1;
    }
    for (int64_t j = 0; j < m; j++) {
        const float *row = x + j * k;
        float amax = 0;
        for (int64_t i = 0; i < k; i++) amax = fmaxf(amax, fabsf(row[i]));
        xs[j] = amax > 0 ? amax / 32767.f : 1.f;
        float inv = 1.f / xs[j];
        for (int64_t i = 0; i < k; i++) xq[j * k + i] = (int16_t)lrintf(row[i] * inv);
    }
    /* static: each thread takes one contiguous run of rows, which it reads as one stream */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const int8_t *wr = w + r * k;
        float out[4], scale = bf16(scales[r]);
        int64_t j = 0;
        for (; j + 4 <= m; j += 4) {
            dots4(wr, xq + j * k, k, out);
            for (int u = 0; u < 4; u++) y[(j + u) * n + r] = out[u] * xs[j + u] * scale;
        }
        for (; j + 2 <= m; j += 2) {
            dots2(wr, xq + j * k, k, out);
            for (int u = 0; u < 2; u++) y[(j + u) * n + r] = out[u] * xs[j + u] * scale;
        }
        for (; j < m; j++) {
            dots1(wr, xq + j * k, k, out);
            y[j * n + r] = out[0] * xs[j] * scale;
        }
    }
    free(xq);
    free(xs);
    return 0;
}
