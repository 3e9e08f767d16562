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

/* y[j][r] for R rows of w and C rows of x, R * C sums at once: each widened weight vector meets C
   rows of x and each vector of x R weight rows, so a multiply-add takes fewer loads than a row of w
   against rows of x one by one (a smollm2 step at 16 rows: about 0.8x its time). R * C accumulators
   and R weight vectors stay in the 16 AVX2 registers. */
#define BLOCK(R, C)                                                                                \
    static void block##R##C(const uint16_t *w, const float *x, int64_t k, float *y, int64_t n) {   \
        __m256 a[R][C];                                                                           \
        for (int r = 0; r < R; r++)                                                               \
            for (int j = 0; j < C; j++) a[r][j] = _mm256_setzero_ps();                             \
        int64_t i = 0;                                                                            \
        for (; i + 8 <= k; i += 8) {                                                              \
            __m256 b[R];                                                                          \
            for (int r = 0; r < R; r++) {                                                         \
                _mm_prefetch((const char *)(w + r * k + i) + PREFETCH, _MM_HINT_T0);               \
                b[r] = widen(w + r * k + i);                                                      \
            }                                                                                     \
            for (int j = 0; j < C; j++) {                                                         \
                __m256 xv = _mm256_loadu_ps(x + j * k + i);                                       \
                for (int r = 0; r < R; r++) a[r][j] = _mm256_fmadd_ps(b[r], xv, a[r][j]);          \
            }                                                                                     \
        }                                                                                         \
        for (int r = 0; r < R; r++)                                                               \
            for (int j = 0; j < C; j++) {                                                         \
                float s = hsum(a[r][j]);                                                          \
                for (int64_t t = i; t < k; t++) s += widen1(w[r * k + t]) * x[j * k + t];         \
                y[j * n + r] = s;                                                                 \
            }                                                                                     \
    }
BLOCK(1, 1) BLOCK(1, 2) BLOCK(1, 3) BLOCK(1, 4)
BLOCK(2, 1) BLOCK(2, 2) BLOCK(2, 3) BLOCK(2, 4)

typedef void (*block_fn)(const uint16_t *, const float *, int64_t, float *, int64_t);
static const block_fn BLOCKS[2][4] = {{block11, block12, block13, block14}, {block21, block22, block23, block24}};
#define ROWS_W 2 /* R at most */
#define ROWS_X 4 /* C at most */

void bf16_mm(const float *x, const uint16_t *w, float *y, int64_t m, int64_t n, int64_t k, int threads) {
    int64_t pairs = (n + ROWS_W - 1) / ROWS_W;
    /* static: each thread takes one contiguous run of w's rows, which it reads as one stream */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < pairs; g++) {
        int64_t r = g * ROWS_W, rows = n - r < ROWS_W ? n - r : ROWS_W;
        for (int64_t j = 0; j < m; j += ROWS_X) {
            int64_t cols = m - j < ROWS_X ? m - j : ROWS_X;
            BLOCKS[rows - 1][cols - 1](w + r * k, x + j * k, k, y + j * n + r, n);
        }
    }
}
