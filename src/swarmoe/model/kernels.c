/* Expert kernels for swarmoe's MoE dispatch on CPUs with AVX-512 (built by kernels.py).
 *
 * Why hand-written: an MoE layer at decode and small batches runs each expert on a few rows.
 * Stock kernels treat that as a GEMM (packing the weight first) or as separate GEMV calls with a
 * Python step between each; with the layer's weights cold in memory the useful limit is the
 * memory bus. Here one call runs a list of experts end to end: gathers its rows, streams each
 * expert's weights once while computing every row against them, applies SwiGLU, scales by the
 * routing weight and writes the rows back, with no Python in between.
 *
 * Layout: weights row-major as checkpoints store them (gate/up [I, H], down [H, I]); activations
 * row-major; float32 accumulation whatever the weight dtype.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef __AVX512F__
#error "swarmoe expert kernels need AVX-512F"
#endif

enum { F32 = 0, BF16 = 1 };

static inline __m512 load_f32(const void* p, int64_t i) { return _mm512_loadu_ps((const float*)p + i); }
static inline __m512 load_bf16(const void* p, int64_t i) {
    __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline __m512 mload_f32(const void* p, int64_t i, __mmask16 m) { return _mm512_maskz_loadu_ps(m, (const float*)p + i); }
static inline __m512 mload_bf16(const void* p, int64_t i, __mmask16 m) {
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)p + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* y[m*ldy + r] = sum_k w[r*K + k] * x[m*ldx + k] for R weight rows and MT activation rows:
 * each weight vector is loaded once and used for every row (R*MT accumulators in registers). */
#define TILE(NAME, LOAD, MLOAD, R, MT)                                                             \
    static void NAME##_##R##x##MT(const void* w, int64_t K, const float* x, int64_t ldx, float* y, \
                                  int64_t ldy) {                                                   \
        __m512 acc[R][MT];                                                                         \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                        \
            _Pragma("GCC unroll 8") for (int m = 0; m < MT; m++) acc[r][m] = _mm512_setzero_ps();   \
        int64_t k = 0;                                                                             \
        for (; k + 16 <= K; k += 16) {                                                             \
            __m512 wv[R];                                                                          \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) wv[r] = LOAD(w, r * K + k);        \
            _Pragma("GCC unroll 8") for (int m = 0; m < MT; m++) {                                 \
                __m512 xv = _mm512_loadu_ps(x + m * ldx + k);                                      \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                \
                    acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);                             \
            }                                                                                      \
        }                                                                                          \
        if (k < K) {                                                                               \
            __mmask16 tail = (__mmask16)((1u << (K - k)) - 1);                                     \
            __m512 wv[R];                                                                          \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) wv[r] = MLOAD(w, r * K + k, tail); \
            _Pragma("GCC unroll 8") for (int m = 0; m < MT; m++) {                                 \
                __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * ldx + k);                          \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                \
                    acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);                             \
            }                                                                                      \
        }                                                                                          \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                        \
            _Pragma("GCC unroll 8") for (int m = 0; m < MT; m++)                                   \
                y[m * ldy + r] = _mm512_reduce_add_ps(acc[r][m]);                                  \
    }

typedef void (*tile_fn)(const void*, int64_t, const float*, int64_t, float*, int64_t);

#define TILES(NAME, LOAD, MLOAD)                                                                   \
    TILE(NAME, LOAD, MLOAD, 4, 1) TILE(NAME, LOAD, MLOAD, 4, 2) TILE(NAME, LOAD, MLOAD, 4, 3)      \
    TILE(NAME, LOAD, MLOAD, 4, 4) TILE(NAME, LOAD, MLOAD, 4, 5) TILE(NAME, LOAD, MLOAD, 4, 6)      \
    TILE(NAME, LOAD, MLOAD, 1, 1) TILE(NAME, LOAD, MLOAD, 1, 2) TILE(NAME, LOAD, MLOAD, 1, 3)      \
    TILE(NAME, LOAD, MLOAD, 1, 4) TILE(NAME, LOAD, MLOAD, 1, 5) TILE(NAME, LOAD, MLOAD, 1, 6)      \
    static const tile_fn NAME##_tiles[2][7] = {                                                    \
        {0, NAME##_1x1, NAME##_1x2, NAME##_1x3, NAME##_1x4, NAME##_1x5, NAME##_1x6},               \
        {0, NAME##_4x1, NAME##_4x2, NAME##_4x3, NAME##_4x4, NAME##_4x5, NAME##_4x6}};

TILES(f32, load_f32, mload_f32)
TILES(bf16, load_bf16, mload_bf16)

enum { MAX_TILE_ROWS = 6 };

/* y[M, N] (row stride ldy) = x[M, K] (row stride ldx) @ w[N, K]^T: four weight rows at a time,
 * every activation row against them before moving on, so each weight is read from memory once. */
static void matmul_wt(int dtype, const void* w, int64_t N, int64_t K, const float* x, int64_t M, int64_t ldx,
                      float* y, int64_t ldy) {
    const tile_fn(*tiles)[7] = dtype == BF16 ? bf16_tiles : f32_tiles;
    const int64_t wsize = dtype == BF16 ? 2 : 4;
    for (int64_t n = 0; n < N;) {
        const int four = N - n >= 4;
        const char* wn = (const char*)w + n * K * wsize;
        for (int64_t m = 0; m < M; m += MAX_TILE_ROWS) {
            const int64_t rows = M - m < MAX_TILE_ROWS ? M - m : MAX_TILE_ROWS;
            tiles[four][rows](wn, K, x + m * ldx, ldx, y + m * ldy + n, ldy);
        }
        n += four ? 4 : 1;
    }
}

/* Accurate to a few ulp over the float range: exp(v) = 2^n * e^r, |r| <= ln2/2, with a
 * degree-6 polynomial for e^r. */
static inline __m512 exp512(__m512 v) {
    v = _mm512_max_ps(_mm512_min_ps(v, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.3365447504f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* gate[i] = silu(gate[i]) * up[i] for one row of I values. */
static void silu_mul(float* gate, const float* up, int64_t I) {
    int64_t i = 0;
    for (; i + 16 <= I; i += 16) {
        __m512 g = _mm512_loadu_ps(gate + i);
        __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_storeu_ps(gate + i, _mm512_mul_ps(s, _mm512_loadu_ps(up + i)));
    }
    for (; i < I; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);            /* round to nearest even */
}

static void load_row(int dtype, const void* src, int64_t row, int64_t H, float* dst) {
    if (dtype == F32) {
        memcpy(dst, (const float*)src + row * H, H * sizeof(float));
        return;
    }
    const uint16_t* s = (const uint16_t*)src + row * H;
    for (int64_t h = 0; h < H; h++) {
        uint32_t u = (uint32_t)s[h] << 16;
        memcpy(dst + h, &u, 4);
    }
}

static void store_row(int dtype, const float* src, float scale, void* dst, int64_t row, int64_t H) {
    if (dtype == F32) {
        float* d = (float*)dst + row * H;
        for (int64_t h = 0; h < H; h++) d[h] = src[h] * scale;
        return;
    }
    uint16_t* d = (uint16_t*)dst + row * H;
    for (int64_t h = 0; h < H; h++) d[h] = to_bf16(src[h] * scale);
}

/* Per-thread scratch, grown as needed and kept: the callers are a few persistent workers. */
static __thread float* scratch;
static __thread int64_t scratch_size;

static float* scratch_floats(int64_t n) {
    if (n > scratch_size) {
        free(scratch);
        scratch = aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64);
        scratch_size = scratch ? n : 0;
    }
    return scratch;
}

/* Runs experts first..last-1 of a dispatch. Expert j owns pairs ends[j-1]..ends[j]-1 of `pairs`
 * (ends[-1] = 0); pair p is row p of `out` and reads row p / k of `x`, scaled by weights[p].
 * With pairs == NULL (the shared experts) expert j reads and writes rows ends[j-1]..ends[j]-1
 * directly, unscaled. gate/up/down hold the weight addresses of experts first..last-1 (their
 * [0] is expert `first`'s). Returns 0, or -1 when
 * scratch memory could not be allocated (nothing written then). */
int swarmoe_experts(int64_t first, int64_t last, const int64_t* gate, const int64_t* up, const int64_t* down,
                    const int64_t* ends, const int64_t* pairs, int64_t k, const float* weights, const void* x,
                    void* out, int64_t H, int64_t I, int dtype) {
    int64_t most = 0;
    for (int64_t j = first; j < last; j++) {
        const int64_t rows = ends[j] - (j ? ends[j - 1] : 0);
        most = rows > most ? rows : most;
    }
    float* xs = scratch_floats(most * (2 * H + 2 * I));
    if (xs == NULL && most) return -1;
    float* ys = xs + most * H;
    float* hg = ys + most * H;
    float* hu = hg + most * I;
    for (int64_t j = first; j < last; j++) {
        const int64_t begin = j ? ends[j - 1] : 0, M = ends[j] - begin;
        if (M == 0) continue;
        for (int64_t m = 0; m < M; m++)
            load_row(dtype, x, pairs ? pairs[begin + m] / k : begin + m, H, xs + m * H);
        matmul_wt(dtype, (const void*)gate[j - first], I, H, xs, M, H, hg, I);
        matmul_wt(dtype, (const void*)up[j - first], I, H, xs, M, H, hu, I);
        for (int64_t m = 0; m < M; m++) silu_mul(hg + m * I, hu + m * I, I);
        matmul_wt(dtype, (const void*)down[j - first], H, I, hg, M, I, ys, H);
        for (int64_t m = 0; m < M; m++) {
            const int64_t p = pairs ? pairs[begin + m] : begin + m;
            store_row(dtype, ys + m * H, pairs && weights ? weights[p] : 1.0f, out, p, H);
        }
    }
    return 0;
}
