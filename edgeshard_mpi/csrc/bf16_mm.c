/* y = x @ w.T for bf16 weights w (n x k) and a few fp32 rows x (m x k), in fp32 arithmetic.

   On a CPU without bf16 instructions (AVX512-BF16, AMX) torch's bf16 product of more than a row or
   two takes a slow path: 16 rows took 4x fp32's time on an AVX2 AMD EPYC. Here each bf16 weight is
   widened to fp32 in a register (a bf16 is the top half of an fp32: a 16-bit shift) and meets the
   rows in fused multiply-adds, so a step reads the weights' bf16 bytes, half of fp32's, and computes
   as fp32 does. The sums are fp32, as torch's bf16 product keeps them before it rounds. Rows of w are
   split among the threads, a contiguous run each, prefetched ahead, as in int8_mm.c. */
#include <immintrin.h>
#include <stdint.h>

#define PREFETCH 2048 /* bytes ahead */

static inline __m256 widen(const uint16_t *w) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

static inline float widen1(uint16_t bits) {
    union { uint32_t u; float f; } v = {(uint32_t)bits << 16};
    return v.f;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* out[j] = sum_i w[i] * x[j][i] for NX rows of x (1, 2, 4 or 8): each widened weight serves them all. */
#define DOTS(NX)                                                                                   \
    static void dots##NX(const uint16_t *w, const float *x, int64_t k, float *out) {              \
        __m256 a[NX];                                                                             \
        for (int j = 0; j < NX; j++) a[j] = _mm256_setzero_ps();                                  \
        int64_t i = 0;                                                                            \
        for (; i + 8 <= k; i += 8) {                                                              \
            _mm_prefetch((const char *)(w + i) + PREFETCH, _MM_HINT_T0);                          \
            __m256 b = widen(w + i);                                                              \
            for (int j = 0; j < NX; j++) a[j] = _mm256_fmadd_ps(b, _mm256_loadu_ps(x + j * k + i), a[j]); \
        }                                                                                         \
        for (int j = 0; j < NX; j++) {                                                            \
            float s = hsum(a[j]);                                                                 \
            for (int64_t t = i; t < k; t++) s += widen1(w[t]) * x[j * k + t];                     \
            out[j] = s;                                                                           \
        }                                                                                         \
    }
DOTS(1)
DOTS(2)
DOTS(4)
DOTS(8)

void bf16_mm(const float *x, const uint16_t *w, float *y, int64_t m, int64_t n, int64_t k, int threads) {
    /* static: each thread takes one contiguous run of rows, which it reads as one stream */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const uint16_t *wr = w + r * k;
        float out[8];
        int64_t j = 0;
        for (; j + 8 <= m; j += 8) {
            dots8(wr, x + j * k, k, out);
            for (int u = 0; u < 8; u++) y[(j + u) * n + r] = out[u];
        }
        for (; j + 4 <= m; j += 4) {
            dots4(wr, x + j * k, k, out);
            for (int u = 0; u < 4; u++) y[(j + u) * n + r] = out[u];
        }
        for (; j + 2 <= m; j += 2) {
            dots2(wr, x + j * k, k, out);
            for (int u = 0; u < 2; u++) y[(j + u) * n + r] = out[u];
        }
        for (; j < m; j++) {
            dots1(wr, x + j * k, k, out);
            y[j * n + r] = out[0];
        }
    }
}
