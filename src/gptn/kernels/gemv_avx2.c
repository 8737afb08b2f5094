/* y = W x + b for one fp32 row x, W (out, in) row-major: a decode step's product at batch 1, where reading
 * W from memory is the whole cost. Four rows of W at a time against 16 values of x (8-wide FMAs, two
 * accumulators a row), the rows split across OpenMP threads. Built for AVX2 + FMA by gptn.cpu_gemv, which
 * loads it only where PyTorch's libgomp is already loaded: one OpenMP runtime, one thread pool. */
#include <immintrin.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

/* rows [o, o + n) of y, n <= 4 */
static inline void block(const float *W, const float *x, const float *b, float *y, int64_t o, int n, int64_t in) {
    const float *w[4];
    __m256 a0[4], a1[4];
    for (int r = 0; r < 4; r++) {
        w[r] = W + (o + (r < n ? r : 0)) * in;  /* a short block repeats its first row: read, never written */
        a0[r] = _mm256_setzero_ps();
        a1[r] = _mm256_setzero_ps();
    }
    int64_t i = 0;
    for (; i + 16 <= in; i += 16) {
        __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        for (int r = 0; r < 4; r++) {
            a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w[r] + i), x0, a0[r]);
            a1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w[r] + i + 8), x1, a1[r]);
        }
    }
    for (int r = 0; r < n; r++) {
        float s = hsum(_mm256_add_ps(a0[r], a1[r]));
        for (int64_t j = i; j < in; j++)
            s += w[r][j] * x[j];
        y[o + r] = s + (b ? b[o + r] : 0.0f);
    }
}

void gptn_gemv_f32(const float *W, const float *x, const float *b, float *y, int64_t out, int64_t in, int threads) {
    int64_t blocks = (out + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t k = 0; k < blocks; k++)
        block(W, x, b, y, 4 * k, out - 4 * k < 4 ? (int)(out - 4 * k) : 4, in);
}
