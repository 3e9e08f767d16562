/* y = x @ w.T for a weight w (n x k) held as panels, bf16 or fp32, and a few fp32 rows x (m x k), in fp32
   arithmetic.

   A panel is a run of PANEL rows of w stored column by column (cpu_kernels.to_panels: [n / PANEL][k][PANEL],
   the last run padded with zeros). Each step of k reads a run's PANEL weights as three vectors (bf16
   ones widened to fp32 in registers: a bf16 is the top half of an fp32, a 16-bit shift) and meets up to
   4 rows of x, each row's value broadcast: 12 multiply-adds for 7 loads and no sum across lanes, where
   dot products of a row of w and a row of x (bf16_mm.c) take 6 loads for 8 and sum across lanes at
   their end. The 4 x 3 accumulators, 3 weight vectors and a broadcast value fill the 16 AVX2 registers.
   Runs are split among the threads, a contiguous run of them each, prefetched ahead.

   bf16: a smollm2 decode step at 16 rows took 0.83-0.87x bf16_mm's time, and at one row 0.94x
   (benchmarks/bf16_panels.py). fp32: its 210 layer products at 16 rows took 0.65-0.70x the time of
   torch's fastest form (oneDNN on reordered weights), on a 2-core AVX2 AMD EPYC (benchmarks/f32_panels.py). */
#include <immintrin.h>
#include <stdint.h>

#define PANEL 24

static inline __m256 widen(const uint16_t *w) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* Accumulators as named variables, not an array: gcc keeps an array of them in memory. */
#define FMA3(r, xr)                                                                                \
    if (R > r) {                                                                                   \
        __m256 a = _mm256_broadcast_ss((xr) + i);                                                  \
        c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0);                                                 \
        c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1);                                                 \
        c##r##2 = _mm256_fmadd_ps(a, b2, c##r##2);                                                 \
    }
#define STORE3(r)                                                                                  \
    if (R > r) {                                                                                   \
        float *yr = cols == PANEL ? y + r * n : t;                                                 \
        _mm256_storeu_ps(yr, c##r##0);                                                             \
        _mm256_storeu_ps(yr + 8, c##r##1);                                                         \
        _mm256_storeu_ps(yr + 16, c##r##2);                                                        \
        for (int64_t j = 0; cols < PANEL && j < cols; j++) y[r * n + j] = t[j]; /* the padded run */ \
    }
/* A run's sums for ROWS rows of x, on weights of type T, each vector of 8 read by LOAD, prefetched
   AHEAD steps of k ahead: a step reads 48 bytes of bf16, under a 64-byte line, or 96 of fp32, two. */
#define PANEL_ROWS(NAME, ROWS, T, LOAD, AHEAD)                                                     \
    static void NAME##ROWS(const float *x, int64_t k, const T *p, float *y, int64_t n, int64_t cols) { \
        const int R = ROWS;                                                                        \
        __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;   \
        __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;                   \
        const float *x0 = x, *x1 = x + k, *x2 = x + 2 * k, *x3 = x + 3 * k;                        \
        for (int64_t i = 0; i < k; i++, p += PANEL) {                                              \
            _mm_prefetch((const char *)(p + AHEAD * PANEL), _MM_HINT_T0);                          \
            if (sizeof(T) == 4) _mm_prefetch((const char *)(p + AHEAD * PANEL + 16), _MM_HINT_T0);  \
            __m256 b0 = LOAD(p), b1 = LOAD(p + 8), b2 = LOAD(p + 16);                               \
            FMA3(0, x0) FMA3(1, x1) FMA3(2, x2) FMA3(3, x3)                                        \
        }                                                                                          \
        float t[PANEL];                                                                            \
        STORE3(0) STORE3(1) STORE3(2) STORE3(3)                                                    \
    }
PANEL_ROWS(bf16_, 1, uint16_t, widen, 16) PANEL_ROWS(bf16_, 2, uint16_t, widen, 16)
PANEL_ROWS(bf16_, 3, uint16_t, widen, 16) PANEL_ROWS(bf16_, 4, uint16_t, widen, 16)
PANEL_ROWS(f32_, 1, float, _mm256_loadu_ps, 8) PANEL_ROWS(f32_, 2, float, _mm256_loadu_ps, 8)
PANEL_ROWS(f32_, 3, float, _mm256_loadu_ps, 8) PANEL_ROWS(f32_, 4, float, _mm256_loadu_ps, 8)

#define PANELS_MM(NAME, T)                                                                         \
    void NAME##panels_mm(const float *x, const T *p, float *y, int64_t m, int64_t n, int64_t k, int threads) { \
        static void (*const rows_of[4])(const float *, int64_t, const T *, float *, int64_t, int64_t) = { \
            NAME##1, NAME##2, NAME##3, NAME##4};                                                   \
        int64_t runs = (n + PANEL - 1) / PANEL;                                                    \
        /* static: each thread takes one contiguous run of panels, which it reads as one stream */ \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                          \
        for (int64_t q = 0; q < runs; q++) {                                                       \
            int64_t cols = n - q * PANEL < PANEL ? n - q * PANEL : PANEL;                          \
            for (int64_t r = 0; r < m; r += 4) {                                                   \
                int64_t rows = m - r < 4 ? m - r : 4;                                              \
                rows_of[rows - 1](x + r * k, k, p + q * k * PANEL, y + r * n + q * PANEL, n, cols); \
            }                                                                                      \
        }                                                                                          \
    }
PANELS_MM(bf16_, uint16_t)
PANELS_MM(f32_, float)
