/* int8 weight-only matmul for decoding on x86 CPUs with AVX2 and FMA: y = (x @ W^T) * scales.
 *
 * x (M, K) fp32 row-major, W (N, K) int8 row-major, scales (N,) fp32, y (M, N) fp32.
 * nanollm/inference/native.py compiles this file with the system C compiler on first use
 * and calls it through ctypes; quantize.py decides when (few rows, fp32, on the CPU).
 *
 * Why its own kernel: a decode step streams every weight once, so int8 should take a
 * quarter of fp32's time in the matmuls. torch's aten._weight_int8pack_mm only has a
 * vectorised x86 path for bf16 activations, and on a CPU without native bf16 it is
 * compute-bound well below the memory's speed. Here each 8 weights are widened to fp32
 * (vpmovsxbd + vcvtdq2ps) and meet the fp32 activations in one FMA, with a prefetch of the
 * next rows, so the loop runs at the speed of memory; the activations are never rounded.
 *
 * Work split: output rows in blocks of 4 (M = 1) or 2 (M > 1), blocks shared among OpenMP
 * threads (torch's own runtime when torch is loaded first: the same libgomp.so.1). For
 * M > 1 each widened weight vector meets up to 4 activation rows before the next is loaded.
 * Sums are fp32 in 8 lanes per accumulator, added across lanes at the end of each row.
 */
#include <immintrin.h>
#include <stdint.h>

static inline __m256 widen8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline float lane_sum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

/* The K % 8 tail of one dot product, in scalar code. */
static inline float tail_dot(const float *x, const int8_t *w, long k0, long K) {
    float t = 0.0f;
    for (long k = k0; k < K; k++) t += x[k] * (float)w[k];
    return t;
}

/* One row of x against rows n..n+3 of W. */
static void rows4_m1(const float *x, const int8_t *w, const float *s, float *y, long n, long K, long N) {
    const int8_t *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    const char *next = (const char *)(w0 + 4 * K); /* the next block's rows, fetched while these run */
    const char *end = (const char *)(w + N * K);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        /* 4 rows x 16 bytes consumed per step: prefetch the same 64 bytes of the next block */
        if (next + 4 * k < end) _mm_prefetch(next + 4 * k, _MM_HINT_T0);
        __m256 xv = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(xv, widen8(w0 + k), a0);
        a1 = _mm256_fmadd_ps(xv, widen8(w1 + k), a1);
        a2 = _mm256_fmadd_ps(xv, widen8(w2 + k), a2);
        a3 = _mm256_fmadd_ps(xv, widen8(w3 + k), a3);
        xv = _mm256_loadu_ps(x + k + 8);
        a0 = _mm256_fmadd_ps(xv, widen8(w0 + k + 8), a0);
        a1 = _mm256_fmadd_ps(xv, widen8(w1 + k + 8), a1);
        a2 = _mm256_fmadd_ps(xv, widen8(w2 + k + 8), a2);
        a3 = _mm256_fmadd_ps(xv, widen8(w3 + k + 8), a3);
    }
    for (; k + 8 <= K; k += 8) {
        __m256 xv = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(xv, widen8(w0 + k), a0);
        a1 = _mm256_fmadd_ps(xv, widen8(w1 + k), a1);
        a2 = _mm256_fmadd_ps(xv, widen8(w2 + k), a2);
        a3 = _mm256_fmadd_ps(xv, widen8(w3 + k), a3);
    }
    y[n] = (lane_sum(a0) + tail_dot(x, w0, k, K)) * s[n];
    y[n + 1] = (lane_sum(a1) + tail_dot(x, w1, k, K)) * s[n + 1];
    y[n + 2] = (lane_sum(a2) + tail_dot(x, w2, k, K)) * s[n + 2];
    y[n + 3] = (lane_sum(a3) + tail_dot(x, w3, k, K)) * s[n + 3];
}

/* Rows m..m+MT-1 of x against rows n..n+NT-1 of W (MT <= 4, NT <= 2): each widened weight
 * vector meets MT activation rows. Always inlined with constant MT and NT, so that the unused
 * accumulators vanish and the rest stay in registers. */
static inline __attribute__((always_inline)) void tile(const float *x, const int8_t *w, const float *s, float *y,
                                                       long n, long m, long K, long N, const int MT, const int NT) {
    const int8_t *wr[2] = {w + n * K, w + (n + NT - 1) * K};
    const float *xr[4];
    for (int i = 0; i < MT; i++) xr[i] = x + (m + i) * K;
    __m256 c[4][2];
    for (int i = 0; i < MT; i++)
        for (int j = 0; j < NT; j++) c[i][j] = _mm256_setzero_ps();
    long k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 v[2];
        for (int j = 0; j < NT; j++) v[j] = widen8(wr[j] + k);
        for (int i = 0; i < MT; i++) {
            __m256 xv = _mm256_loadu_ps(xr[i] + k);
            for (int j = 0; j < NT; j++) c[i][j] = _mm256_fmadd_ps(xv, v[j], c[i][j]);
        }
    }
    for (int i = 0; i < MT; i++)
        for (int j = 0; j < NT; j++) y[(m + i) * N + n + j] = (lane_sum(c[i][j]) + tail_dot(xr[i], wr[j], k, K)) * s[n + j];
}

/* All M rows of x against rows n..n+NT-1 of W, in tiles of 4 rows and one of the remainder. */
static inline __attribute__((always_inline)) void rows_all_m(const float *x, const int8_t *w, const float *s, float *y,
                                                             long n, long M, long K, long N, const int NT) {
    long m = 0;
    for (; m + 4 <= M; m += 4) tile(x, w, s, y, n, m, K, N, 4, NT);
    switch (M - m) {
        case 3: tile(x, w, s, y, n, m, K, N, 3, NT); break;
        case 2: tile(x, w, s, y, n, m, K, N, 2, NT); break;
        case 1: tile(x, w, s, y, n, m, K, N, 1, NT); break;
    }
}

static void rows2(const float *x, const int8_t *w, const float *s, float *y, long n, long M, long K, long N) {
    /* this block's rows are read M / 4 times: fetch the next block's while the first pass runs */
    const char *next = (const char *)(w + (n + 2) * K), *end = (const char *)(w + N * K);
    for (long off = 0; off < 2 * K && next + off < end; off += 64) _mm_prefetch(next + off, _MM_HINT_T1);
    rows_all_m(x, w, s, y, n, M, K, N, 2);
}

static void rows1(const float *x, const int8_t *w, const float *s, float *y, long n, long M, long K, long N) {
    rows_all_m(x, w, s, y, n, M, K, N, 1);
}

void nanollm_int8_gemm(const float *x, const int8_t *w, const float *s, float *y, long M, long N, long K,
                       int threads) {
    if (M == 1) {
        long blocks = N / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (long b = 0; b < blocks; b++) rows4_m1(x, w, s, y, 4 * b, K, N);
        for (long n = 4 * blocks; n < N; n++) rows1(x, w, s, y, n, 1, K, N);
        return;
    }
    long blocks = (N + 1) / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; b++) {
        if (2 * b + 1 < N)
            rows2(x, w, s, y, 2 * b, M, K, N);
        else
            rows1(x, w, s, y, 2 * b, M, K, N);
    }
}

/* The instruction set this file was built for, for the loader's log line. */
const char *nanollm_int8_isa(void) { return "avx2+fma"; }
