/* Expert kernels for swarmoe's MoE layers on x86-64 Linux with AVX-512 (built by kernels.py).
 *
 * Why hand-written: an MoE layer at decode and small batches runs each expert on a few rows.
 * Stock kernels treat that as a GEMM (packing the weight first) or as separate GEMV calls with a
 * Python step between each; with the layer's weights cold in memory the useful limit is the
 * memory bus. These stream each expert's weights once while computing every row against them.
 *
 * Three entry points: swarmoe_experts runs a list of experts end to end for swarmoe's worker
 * threads (any expert provider: dequantised INT4/FP8, offloaded caches); swarmoe_moe runs a
 * whole layer of stacked full-precision experts, routing included, on its own helper threads;
 * swarmoe_linear runs a dense linear layer over a few rows (decode) on those same threads.
 *
 * Layout: weights row-major as checkpoints store them (gate/up [I, H], down [H, I]); activations
 * row-major; float32 accumulation whatever the weight dtype.
 */
#include <immintrin.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef __AVX512F__
#error "swarmoe expert kernels need AVX-512F"
#endif

enum { F32 = 0, BF16 = 1 };

/* Vector loads of weights and activations as float32 lanes (bf16 widened exactly), whole or the
 * first n elements (the rest zero). */
static inline __m512 load_f32(const void* p, int64_t i) { return _mm512_loadu_ps((const float*)p + i); }
static inline __m512 mload_f32(const void* p, int64_t i, int64_t n) {
    return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), (const float*)p + i);
}
static inline __m512 widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
static inline __m512 load_bf16(const void* p, int64_t i) {
    return widen_bf16(_mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i)));
}
static inline __m512 mload_bf16(const void* p, int64_t i, int64_t n) {
    return widen_bf16(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), (const uint16_t*)p + i));
}
static inline __m512 fma_f32(__m512 acc, __m512 w, __m512 x) { return _mm512_fmadd_ps(w, x, acc); }
/* Prefetch distance along a weight row in the four-row tiles: with four interleaved streams the
 * hardware prefetcher alone keeps fewer lines in flight than one core can use. One-row tiles read
 * memory in order, which the hardware prefetcher follows better without these. */
enum { PREFETCH_BYTES = 1024 };
static inline void prefetch(const void* p, int64_t i, int64_t size) {
    _mm_prefetch((const char*)p + i * size + PREFETCH_BYTES, _MM_HINT_T0);
}

#ifdef __AVX512BF16__
/* bf16 weights against bf16 activations: one instruction multiplies 32 pairs and adds them into
 * 16 float32 lanes (twice the work per instruction of widening to float32). */
#define BF16_ACTIVATIONS 1
static inline __m512 load_raw(const void* p, int64_t i) { return _mm512_castsi512_ps(_mm512_loadu_si512((const uint16_t*)p + i)); }
static inline __m512 mload_raw(const void* p, int64_t i, int64_t n) {
    return _mm512_castsi512_ps(_mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), (const uint16_t*)p + i));
}
static inline __m512 dot_bf16(__m512 acc, __m512 w, __m512 x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
}
#else
#define BF16_ACTIVATIONS 0
#endif

/* y[m*ldy + r] = sum_k w[r*K + k] * x[m*ldx + k] for R weight rows and MT activation rows:
 * each weight vector is loaded once and used for every row (R*MT accumulators in registers).
 * STEP elements per vector; WSIZE, XSIZE: bytes per weight and per activation element. */
#define TILE(NAME, STEP, WSIZE, XSIZE, LOADW, MLOADW, LOADX, MLOADX, FMA, R, MT)                   \
    static void NAME##_##R##x##MT(const void* w, int64_t K, const void* x, int64_t ldx, float* y,  \
                                  int64_t ldy) {                                                   \
        __m512 acc[R][MT];                                                                         \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                        \
            _Pragma("GCC unroll 8") for (int m = 0; m < MT; m++) acc[r][m] = _mm512_setzero_ps();   \
        int64_t k = 0;                                                                             \
        for (; k + STEP <= K; k += STEP) {                                                         \
            __m512 wv[R];                                                                          \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                  \
                wv[r] = LOADW(w, r * K + k);                                                       \
                if (R > 1 && (k * WSIZE) % 64 == 0) prefetch(w, r * K + k, WSIZE);                 \
            }                                                                                      \
            _Pragma("GCC unroll 8") for (int m = 0; m < MT; m++) {                                 \
                __m512 xv = LOADX(x, m * ldx + k);                                                 \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[r][m] = FMA(acc[r][m], wv[r], xv); \
            }                                                                                      \
        }                                                                                          \
        if (k < K) {                                                                               \
            __m512 wv[R];                                                                          \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) wv[r] = MLOADW(w, r * K + k, K - k); \
            _Pragma("GCC unroll 8") for (int m = 0; m < MT; m++) {                                 \
                __m512 xv = MLOADX(x, m * ldx + k, K - k);                                         \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[r][m] = FMA(acc[r][m], wv[r], xv); \
            }                                                                                      \
        }                                                                                          \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                        \
            _Pragma("GCC unroll 8") for (int m = 0; m < MT; m++)                                   \
                y[m * ldy + r] = _mm512_reduce_add_ps(acc[r][m]);                                  \
    }

typedef void (*tile_fn)(const void*, int64_t, const void*, int64_t, float*, int64_t);

#define TILES(NAME, ...)                                                                           \
    TILE(NAME, __VA_ARGS__, 4, 1) TILE(NAME, __VA_ARGS__, 4, 2) TILE(NAME, __VA_ARGS__, 4, 3)      \
    TILE(NAME, __VA_ARGS__, 4, 4) TILE(NAME, __VA_ARGS__, 4, 5) TILE(NAME, __VA_ARGS__, 4, 6)      \
    TILE(NAME, __VA_ARGS__, 1, 1) TILE(NAME, __VA_ARGS__, 1, 2) TILE(NAME, __VA_ARGS__, 1, 3)      \
    TILE(NAME, __VA_ARGS__, 1, 4) TILE(NAME, __VA_ARGS__, 1, 5) TILE(NAME, __VA_ARGS__, 1, 6)      \
    static const tile_fn NAME##_tiles[2][7] = {                                                    \
        {0, NAME##_1x1, NAME##_1x2, NAME##_1x3, NAME##_1x4, NAME##_1x5, NAME##_1x6},               \
        {0, NAME##_4x1, NAME##_4x2, NAME##_4x3, NAME##_4x4, NAME##_4x5, NAME##_4x6}};

TILES(f32, 16, 4, 4, load_f32, mload_f32, load_f32, mload_f32, fma_f32)
#if BF16_ACTIVATIONS
TILES(bf16, 32, 2, 2, load_raw, mload_raw, load_raw, mload_raw, dot_bf16)
#else
TILES(bf16, 16, 2, 4, load_bf16, mload_bf16, load_f32, mload_f32, fma_f32)
#endif

enum { MAX_TILE_ROWS = 6 };

/* Bytes per activation element that the kernels of `dtype` read: float32, or bf16 where bf16
 * weights take bf16 activations. */
static inline int64_t x_size(int dtype) { return dtype == BF16 && BF16_ACTIVATIONS ? 2 : 4; }

/* Up to this many activation rows, as long as they fit in a part of L1 beside the streaming
 * weights, weights are read one row at a time, straight through memory: four rows at a time are
 * four streams 2-4 KiB apart, which the hardware prefetcher follows poorly (measured on Zen 4
 * with caches cold: an expert's weights read at ~18 GB/s that way, ~31 GB/s in order, both
 * threads busy). With more or longer activation rows, the four-row tiles' fewer activation loads
 * per weight matter more (one-row tiles reading 32 KiB of activations: 17 GB/s, four-row 22). */
enum { ROW_BY_ROW_MAX = 12, ROW_BY_ROW_X_BYTES = 16 << 10 };

/* y[M, N] (row stride ldy) = x[M, K] (row stride ldx) @ w[N, K]^T: one or four weight rows at a
 * time, every activation row against them before moving on, so each weight is read from memory
 * once. */
static void matmul_wt(int dtype, const void* w, int64_t N, int64_t K, const void* x, int64_t M, int64_t ldx,
                      float* y, int64_t ldy) {
    const tile_fn(*tiles)[7] = dtype == BF16 ? bf16_tiles : f32_tiles;
    const int64_t wsize = dtype == BF16 ? 2 : 4, xsize = x_size(dtype);
    for (int64_t n = 0; n < N;) {
        const int four = N - n >= 4 && (M > ROW_BY_ROW_MAX || M * K * xsize > ROW_BY_ROW_X_BYTES);
        const char* wn = (const char*)w + n * K * wsize;
        for (int64_t m = 0; m < M; m += MAX_TILE_ROWS) {
            const int64_t rows = M - m < MAX_TILE_ROWS ? M - m : MAX_TILE_ROWS;
            tiles[four][rows](wn, K, (const char*)x + m * ldx * xsize, ldx, y + m * ldy + n, ldy);
        }
        n += four ? 4 : 1;
    }
}

/* ---- INT4 weights (compressed-tensors pack-quantized: symmetric, group 32, stored +8) ----
 *
 * A weight row of K inputs is K/2 bytes: byte b holds input 2b in its low nibble and 2b+1 in its
 * high one, so each 16 bytes are 32 inputs, evens in the low nibbles, odds in the high ones, with
 * one scale. Rather than interleave the nibbles, the activations are stored in that order
 * (int4_order: each 32-block's evens, then its odds), once per row, and the weights are
 * dequantised in registers ((q - 8) * scale, exact in float32) as they stream in: 4.5 bits read
 * per weight instead of the 16 or 32 of a dequantised copy. */

static inline float bf16_value(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Position of input i in INT4 order. */
static inline int64_t int4_position(int64_t i) { return (i & ~(int64_t)31) + ((i & 1) << 4) + ((i & 31) >> 1); }

/* One row of K float32 activations (K % 32 == 0) into INT4 order. */
static void int4_order(const float* src, float* dst, int64_t K) {
    for (int64_t i = 0; i < K; i++) dst[int4_position(i)] = src[i];
}

/* The 32 weights of 16 packed bytes b with scale sc, as float32: evens, then odds. */
static inline void int4_block(const uint8_t* b16, float sc, __m512* even, __m512* odd) {
    const __m128i b = _mm_loadu_si128((const __m128i*)b16), low = _mm_set1_epi8(0x0f);
    const __m512 scale = _mm512_set1_ps(sc), shift = _mm512_set1_ps(-8.0f * sc);
    *even = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, low))), scale, shift);
    *odd = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low))), scale,
                           shift);
}

static inline float int4_scale(int sdtype, const void* s, int64_t g) {
    return sdtype == BF16 ? bf16_value(((const uint16_t*)s)[g]) : ((const float*)s)[g];
}

/* y[m * ldy] = one INT4 weight row (packed w, scales s in sdtype) against MT activation rows in
 * INT4 order (row stride ldx). Evens and odds keep accumulators of their own. */
#define INT4_TILE(MT)                                                                              \
    static void int4_##MT(int sdtype, const uint8_t* w, const void* s, int64_t K, const float* x, \
                          int64_t ldx, float* y, int64_t ldy) {                                    \
        __m512 even_acc[MT], odd_acc[MT];                                                          \
        _Pragma("GCC unroll 8") for (int m = 0; m < MT; m++) even_acc[m] = odd_acc[m] = _mm512_setzero_ps(); \
        for (int64_t k = 0; k < K; k += 32) {                                                      \
            __m512 even, odd;                                                                      \
            int4_block(w + k / 2, int4_scale(sdtype, s, k / 32), &even, &odd);                     \
            _Pragma("GCC unroll 8") for (int m = 0; m < MT; m++) {                                 \
                even_acc[m] = _mm512_fmadd_ps(even, _mm512_loadu_ps(x + m * ldx + k), even_acc[m]); \
                odd_acc[m] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(x + m * ldx + k + 16), odd_acc[m]); \
            }                                                                                      \
        }                                                                                          \
        _Pragma("GCC unroll 8") for (int m = 0; m < MT; m++)                                       \
            y[m * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(even_acc[m], odd_acc[m]));             \
    }

typedef void (*int4_fn)(int, const uint8_t*, const void*, int64_t, const float*, int64_t, float*, int64_t);
INT4_TILE(1) INT4_TILE(2) INT4_TILE(3) INT4_TILE(4) INT4_TILE(5) INT4_TILE(6)
static const int4_fn int4_tiles[7] = {0, int4_1, int4_2, int4_3, int4_4, int4_5, int4_6};

/* Per-thread room for four dequantised weight rows of K values, for more activation rows than one
 * tile takes (then each weight is dequantised once, not once per tile); NULL without memory. */
static __thread float* dequantised;
static __thread int64_t dequantised_size;

static float* dequantised_rows(int64_t K) {
    if (4 * K > dequantised_size) {
        free(dequantised);
        dequantised = aligned_alloc(64, ((4 * K * sizeof(float) + 63) / 64) * 64);
        dequantised_size = dequantised ? 4 * K : 0;
    }
    return dequantised;
}

/* y[M, N] (row stride ldy) = x[M, K] (row stride ldx) @ w[N, K]^T for quantised weight rows that
 * `dequantise` writes four (the last ones: one) at a time into an L1 buffer as float32, each
 * against all M activation rows in one-tile chunks. Returns 0, or -1 without memory for it. */
typedef void (*dequantise_fn)(const void* ctx, int64_t n, int64_t rows, float* dst);
static int matmul_dequantised(dequantise_fn dequantise, const void* ctx, int64_t N, int64_t K, const float* x,
                              int64_t M, int64_t ldx, float* y, int64_t ldy) {
    float* buf = dequantised_rows(K);
    if (buf == NULL) return -1;
    for (int64_t n = 0; n < N;) {
        const int64_t four = N - n >= 4, rows = four ? 4 : 1;
        dequantise(ctx, n, rows, buf);
        for (int64_t m = 0; m < M; m += MAX_TILE_ROWS) {
            const int64_t tile = M - m < MAX_TILE_ROWS ? M - m : MAX_TILE_ROWS;
            f32_tiles[four][tile](buf, K, x + m * ldx, ldx, y + m * ldy + n, ldy);
        }
        n += rows;
    }
    return 0;
}

typedef struct {
    const uint8_t* w;
    const char* s;
    int64_t K;
    int sdtype;
} int4_rows_t;

/* Rows n..n+rows-1 of an INT4 projection into dst as float32, in INT4 order. */
static void int4_dequantise(const void* ctx, int64_t n, int64_t rows, float* dst) {
    const int4_rows_t* c = ctx;
    const int64_t K = c->K, ssize = c->sdtype == BF16 ? 2 : 4;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t k = 0; k < K; k += 32) {
            __m512 even, odd;
            int4_block(c->w + (n + r) * K / 2 + k / 2, int4_scale(c->sdtype, c->s + (n + r) * (K / 32) * ssize, k / 32),
                       &even, &odd);
            _mm512_storeu_ps(dst + r * K + k, even);
            _mm512_storeu_ps(dst + r * K + k + 16, odd);
        }
}

/* y[M, N] (row stride ldy) = x[M, K] (INT4 order, row stride ldx) @ w[N, K]^T for INT4 rows w
 * with scales s (sdtype, [N, K/32]); each weight row is read once, in memory order. Up to one
 * tile of activation rows, weights are dequantised in registers; beyond, four rows at a time into
 * a buffer that stays in L1 for every tile of activation rows. */
static void matmul_int4(int sdtype, const void* w, const void* s, int64_t N, int64_t K, const float* x, int64_t M,
                        int64_t ldx, float* y, int64_t ldy) {
    const int64_t ssize = sdtype == BF16 ? 2 : 4;
    const int4_rows_t rows_of = {w, s, K, sdtype};
    if (M > MAX_TILE_ROWS && matmul_dequantised(int4_dequantise, &rows_of, N, K, x, M, ldx, y, ldy) == 0) return;
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m += MAX_TILE_ROWS) {
            const int64_t rows = M - m < MAX_TILE_ROWS ? M - m : MAX_TILE_ROWS;
            int4_tiles[rows](sdtype, (const uint8_t*)w + n * K / 2, (const char*)s + n * (K / 32) * ssize, K,
                             x + m * ldx, ldx, y + m * ldy + n, ldy);
        }
}

/* ---- Block-FP8 weights (K2: float8 e4m3, one float32 scale per 128x128 block) ----
 *
 * Each byte is widened to float32 exactly in registers: its sign, exponent and mantissa bits are
 * moved into float32's fields, which reads them with float32's exponent bias (127 for e4m3's 7),
 * so a multiply by 2^120 makes the value right, subnormals included. One byte read per weight. */

enum { FP8_BLOCK = 128 };

static inline __m512 fp8_values(__m128i b) {
    const __m512i v = _mm512_cvtepu8_epi32(b);
    const __m512i bits = _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0x80)), 24),
                                         _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0x7f)), 20));
    return _mm512_mul_ps(_mm512_castsi512_ps(bits), _mm512_set1_ps(0x1p120f));
}

/* y[m * ldy] = one FP8 weight row (K bytes; scales: its block row, one float per 128 inputs)
 * against MT float32 activation rows (row stride ldx). */
#define FP8_TILE(MT)                                                                               \
    static void fp8_##MT(const uint8_t* w, const float* scales, int64_t K, const float* x, int64_t ldx, \
                         float* y, int64_t ldy) {                                                  \
        __m512 acc[MT];                                                                            \
        _Pragma("GCC unroll 8") for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_ps();          \
        for (int64_t k = 0; k < K; k += 16) {                                                      \
            const int64_t left = K - k;                                                            \
            const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);  \
            const __m512 wv = _mm512_mul_ps(fp8_values(_mm_maskz_loadu_epi8(mask, w + k)),         \
                                            _mm512_set1_ps(scales[k / FP8_BLOCK]));                \
            _Pragma("GCC unroll 8") for (int m = 0; m < MT; m++)                                   \
                acc[m] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + m * ldx + k), acc[m]); \
        }                                                                                          \
        _Pragma("GCC unroll 8") for (int m = 0; m < MT; m++) y[m * ldy] = _mm512_reduce_add_ps(acc[m]); \
    }

typedef void (*fp8_fn)(const uint8_t*, const float*, int64_t, const float*, int64_t, float*, int64_t);
FP8_TILE(1) FP8_TILE(2) FP8_TILE(3) FP8_TILE(4) FP8_TILE(5) FP8_TILE(6)
static const fp8_fn fp8_tiles[7] = {0, fp8_1, fp8_2, fp8_3, fp8_4, fp8_5, fp8_6};

/* y[M, N] (row stride ldy) = x[M, K] (float32, row stride ldx) @ rows row0..row0+N-1 of an FP8
 * projection (w points at row row0; grid: the projection's whole block-scale grid,
 * [ceil(rows / 128), ceil(K / 128)]). */
typedef struct {
    const uint8_t* w;
    const float* grid;
    int64_t row0, K;
} fp8_rows_t;

/* Rows n..n+rows-1 of an FP8 projection (as matmul_fp8 takes it) into dst as float32. */
static void fp8_dequantise(const void* ctx, int64_t n, int64_t rows, float* dst) {
    const fp8_rows_t* c = ctx;
    const int64_t K = c->K, blocks = (K + FP8_BLOCK - 1) / FP8_BLOCK;
    for (int64_t r = 0; r < rows; r++) {
        const float* scales = c->grid + (c->row0 + n + r) / FP8_BLOCK * blocks;
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 mask = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
            const __m512 v = fp8_values(_mm_maskz_loadu_epi8(mask, c->w + (n + r) * K + k));
            _mm512_mask_storeu_ps(dst + r * K + k, mask, _mm512_mul_ps(v, _mm512_set1_ps(scales[k / FP8_BLOCK])));
        }
    }
}

static void matmul_fp8(const uint8_t* w, const float* grid, int64_t row0, int64_t N, int64_t K, const float* x,
                       int64_t M, int64_t ldx, float* y, int64_t ldy) {
    const int64_t blocks = (K + FP8_BLOCK - 1) / FP8_BLOCK;
    const fp8_rows_t rows_of = {w, grid, row0, K};
    if (M > MAX_TILE_ROWS && matmul_dequantised(fp8_dequantise, &rows_of, N, K, x, M, ldx, y, ldy) == 0) return;
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m += MAX_TILE_ROWS) {
            const int64_t rows = M - m < MAX_TILE_ROWS ? M - m : MAX_TILE_ROWS;
            fp8_tiles[rows](w + n * K, grid + (row0 + n) / FP8_BLOCK * blocks, K, x + m * ldx, ldx, y + m * ldy + n, ldy);
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

/* silu(gate) * up for M rows of I values (gate overwritten), written where the down projection
 * reads them: act, row stride ld, in its activation format (x_size); act may be gate itself. */
static void swiglu_rows(int dtype, float* gate, const float* up, int64_t M, int64_t I, void* act, int64_t ld) {
    const int64_t xsize = x_size(dtype);
    for (int64_t m = 0; m < M; m++) {
        float* g = gate + m * I;
        silu_mul(g, up + m * I, I);
        char* row = (char*)act + m * ld * xsize;
        if (xsize == 2)
            for (int64_t i = 0; i < I; i++) ((uint16_t*)row)[i] = to_bf16(g[i]);
        else if (row != (char*)g)
            memcpy(row, g, I * sizeof(float));
    }
}

/* silu(gate) * up for M rows of I values (gate overwritten) into act (row stride ld, float32) in
 * INT4 order, as columns lo..lo+I-1 of the down projection's input. */
static void swiglu_int4_rows(float* gate, const float* up, int64_t M, int64_t I, int64_t lo, float* act, int64_t ld) {
    for (int64_t m = 0; m < M; m++) {
        silu_mul(gate + m * I, up + m * I, I);
        for (int64_t i = 0; i < I; i++) act[m * ld + int4_position(lo + i)] = gate[m * I + i];
    }
}

static void widen_row(const uint16_t* src, float* dst, int64_t H) {
    for (int64_t h = 0; h < H; h++) dst[h] = bf16_value(src[h]);
}

/* Row `row` of src (dtype) into dst as the kernels of dtype read activations (x_size). */
static void load_row(int dtype, const void* src, int64_t row, int64_t H, void* dst) {
    if (dtype == F32 || x_size(dtype) == 2) {
        const int64_t size = dtype == F32 ? 4 : 2;
        memcpy(dst, (const char*)src + row * H * size, H * size);
        return;
    }
    widen_row((const uint16_t*)src + row * H, dst, H);
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

/* Scratch of one expert over M rows: activations in, the two projections, their product as the
 * down projection reads it, and the float32 result. */
typedef struct {
    void* xs; /* [M, H] as load_row writes them */
    float *hg, *hu; /* [M, I] */
    void* act;      /* [M, I], in place of hg when activations are float32 */
    float* ys;      /* [M, H] */
} expert_scratch;

static int64_t expert_scratch_floats(int64_t M, int64_t H, int64_t I) { return M * (2 * H + 3 * I); }

static expert_scratch expert_scratch_at(float* base, int64_t M, int64_t H, int64_t I) {
    expert_scratch s = {.xs = base, .ys = base + M * H, .hg = base + 2 * M * H};
    s.hu = s.hg + M * I;
    s.act = s.hu + M * I;
    return s;
}

/* s.ys = SwiGLU expert (gate/up [I, H], down [H, I]) over the M rows in s.xs. */
static void expert_rows(int dtype, const void* gate, const void* up, const void* down, int64_t M, int64_t H,
                        int64_t I, expert_scratch s) {
    matmul_wt(dtype, gate, I, H, s.xs, M, H, s.hg, I);
    matmul_wt(dtype, up, I, H, s.xs, M, H, s.hu, I);
    void* act = x_size(dtype) == 2 ? s.act : s.hg;
    swiglu_rows(dtype, s.hg, s.hu, M, I, act, I);
    matmul_wt(dtype, down, H, I, act, M, I, s.ys, H);
}

/* The same for packed INT4 weights (gs, us, ds: their scales, in sdtype): activations float32 in
 * INT4 order, the SwiGLU product scattered into that order for the down projection. s.ys doubles
 * as room for widening the input rows. */
static void expert_rows_int4(int dtype, int sdtype, const void* x, const int64_t* rows, const void* gate, const void* gs,
                             const void* up, const void* us, const void* down, const void* ds, int64_t M, int64_t H,
                             int64_t I, expert_scratch s) {
    float* xs = s.xs;
    for (int64_t m = 0; m < M; m++) {
        const float* row = (const float*)x + rows[m] * H;
        if (dtype == BF16) {
            widen_row((const uint16_t*)x + rows[m] * H, s.ys + m * H, H);
            row = s.ys + m * H;
        }
        int4_order(row, xs + m * H, H);
    }
    matmul_int4(sdtype, gate, gs, I, H, xs, M, H, s.hg, I);
    matmul_int4(sdtype, up, us, I, H, xs, M, H, s.hu, I);
    swiglu_int4_rows(s.hg, s.hu, M, I, 0, s.act, I);
    matmul_int4(sdtype, down, ds, H, I, s.act, M, I, s.ys, H);
}

/* Runs experts first..last-1 of a dispatch. Expert j owns pairs ends[j-1]..ends[j]-1 of `pairs`
 * (ends[-1] = 0); pair p is row p of `out` and reads row p / k of `x`, scaled by weights[p].
 * With pairs == NULL (the shared experts) expert j reads and writes rows ends[j-1]..ends[j]-1
 * directly, unscaled. gate/up/down hold the weight addresses of experts first..last-1 (their
 * [0] is expert `first`'s); with scales != NULL they are packed INT4 and scales holds three
 * more such arrays (gate, up, down scales, in sdtype). Returns 0, or -1 when scratch memory
 * could not be allocated. */
int swarmoe_experts(int64_t first, int64_t last, const int64_t* gate, const int64_t* up, const int64_t* down,
                    const int64_t* ends, const int64_t* pairs, int64_t k, const float* weights, const void* x,
                    void* out, int64_t H, int64_t I, int dtype, const int64_t* const* scales, int sdtype) {
    int64_t most = 0;
    for (int64_t j = first; j < last; j++) {
        const int64_t rows = ends[j] - (j ? ends[j - 1] : 0);
        most = rows > most ? rows : most;
    }
    /* the scratch of the largest expert, then its rows' indices (int64, two floats each) */
    const int64_t floats = (expert_scratch_floats(most, H, I) + 1) & ~(int64_t)1;
    float* base = scratch_floats(floats + 2 * most);
    if (base == NULL && most) return -1;
    int64_t* rows = (int64_t*)(base + floats);
    for (int64_t j = first; j < last; j++) {
        const int64_t begin = j ? ends[j - 1] : 0, M = ends[j] - begin;
        if (M == 0) continue;
        expert_scratch s = expert_scratch_at(base, M, H, I);
        for (int64_t m = 0; m < M; m++) rows[m] = pairs ? pairs[begin + m] / k : begin + m;
        if (scales) {
            const int64_t i = j - first;
            expert_rows_int4(dtype, sdtype, x, rows, (const void*)gate[i], (const void*)scales[0][i], (const void*)up[i],
                             (const void*)scales[1][i], (const void*)down[i], (const void*)scales[2][i], M, H, I, s);
        } else {
            for (int64_t m = 0; m < M; m++) load_row(dtype, x, rows[m], H, (char*)s.xs + m * H * x_size(dtype));
            expert_rows(dtype, (const void*)gate[j - first], (const void*)up[j - first], (const void*)down[j - first],
                        M, H, I, s);
        }
        for (int64_t m = 0; m < M; m++) {
            const int64_t p = pairs ? pairs[begin + m] : begin + m;
            store_row(dtype, s.ys + m * H, pairs && weights ? weights[p] : 1.0f, out, p, H);
        }
    }
    return 0;
}

/* ---- The whole MoE layer in one call: routing, shared and routed experts, the weighted sum ----
 *
 * For decode and small batches the layer's fixed costs (a router GEMV, a handful of small ops,
 * hand-offs between threads) cost as much as streaming the experts' weights once the caches are
 * cold. Here the calling thread and a few persistent helpers run the layer in phases whose work
 * items each thread takes in turn; a phase waits only for the items of the phase it depends on,
 * so a helper that wakes late joins wherever the work is and the caller never waits for it to
 * start. Every (token, expert) pair's weighted row and the shared experts' rows land in rows
 * of their own; the last phase sums each token's rows in a fixed order, so the result does not
 * depend on which thread ran what. */

typedef struct {
    int64_t tokens, hidden, inter, shared_inter, experts, top_k, groups, top_groups, threads;
    int32_t dtype, norm_top_k;
    float scaling;
    const float* router; /* [experts, hidden] float32 */
    const float* bias;   /* [experts] float32, or NULL */
    const void* gate_up; /* [experts, 2 * inter, hidden] */
    const void* down;    /* [experts, hidden, inter] */
    const void* shared_gate; /* [shared_inter, hidden], or NULL: no shared experts */
    const void* shared_up;
    const void* shared_down; /* [hidden, shared_inter] */
    const void* x;           /* [tokens, hidden] */
    void* y;                 /* [tokens, hidden] */
    int64_t* indices;        /* [tokens, top_k]: the routing, for the caller; NULL: not needed */
    /* How the routed experts are stored: in dtype (EXPERTS_DENSE); INT4, gate_up and down packed
     * ([experts, 2 * inter, hidden / 8] and [experts, hidden, inter / 8] int32) with these their
     * scales in dtype ([..., hidden / 32] and [..., inter / 32]); or FP8 (float8 e4m3 [experts,
     * 2 * inter, hidden] and [experts, hidden, inter]) with these their float32 block scales
     * ([experts, 2, ceil(inter / 128), ceil(hidden / 128)]: gate's grid, then up's; and
     * [experts, ceil(hidden / 128), ceil(inter / 128)]). */
    const void* gate_up_scale;
    const void* down_scale;
    int32_t format;
} swarmoe_moe_args;

enum { EXPERTS_DENSE = 0, EXPERTS_INT4 = 1, EXPERTS_FP8 = 2 };

enum { MAX_THREADS = 64, TASK_ROWS = 32, ROUTER_ROWS = 32, SELECT_TOKENS = 16, COMBINE_TOKENS = 8 };
/* Below this many (token, expert) pairs per thread, experts run in MAX_PARTS parts. */
enum { SPLIT_BELOW_PAIRS = 16, MAX_PARTS = 2 };

/* One expert (-1: the shared experts) over rows begin..end-1 (of the pairs sorted by expert, or
 * tokens for the shared experts), for part lo..hi-1 of the intermediate range (up tasks: gate,
 * up and the SwiGLU product) or of the hidden range (down tasks: those output columns). Either
 * part is a run of whole weight rows, so every task streams contiguous memory. */
typedef struct {
    int64_t expert, begin, end, lo, hi;
} task_t;

typedef struct {
    _Atomic int64_t next, done;
    int64_t items;
} phase_t;

/* y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]), all in dtype; y row-major. */
typedef struct {
    int64_t rows, in, out, threads;
    int32_t dtype;
    const void *x, *w, *bias;
    void* y;
} swarmoe_linear_args;

static struct {
    pthread_mutex_t lock; /* one call at a time */
    int helpers;
    _Atomic uint32_t generation; /* futex word: bumped for every call */
    _Atomic int open, active, failed;
    void (*job)(void); /* what the threads of the current call run */
    int64_t threads;   /* how many threads the current call uses */
    const swarmoe_moe_args* a;
    phase_t router, shared, select, plan, up, down, combine;
    const swarmoe_linear_args* l;
    phase_t linear;
    int64_t linear_rows; /* output rows per item */
    const void* linear_x; /* the activations as the kernels read them: the caller's, or widened */
    void* widened;        /* float32 copy of bf16 activations, on CPUs without AVX512-BF16 */
    int64_t widened_bytes;
    /* buffers, grown by the caller between layers */
    int64_t cap_tokens, cap_experts, cap_hidden, cap_k, cap_inter;
    float *xf, *logits, *weights, *rows, *shared_rows;
    void *act, *shared_act; /* SwiGLU products, [pairs sorted by expert, I] and [tokens, shared I] */
    int64_t *counts, *pairs, *indices;
    int64_t* routing; /* the caller's indices, else ours */
    int64_t parts;    /* each expert's work is cut in this many up and this many down tasks */
    task_t *shared_up, *shared_down, *up_tasks, *down_tasks;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void reset_after_fork(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pool.helpers = 0; /* the helpers did not survive the fork; new ones start on first use */
    atomic_store(&pool.active, 0);
    atomic_store(&pool.open, 0);
}

static void watch_forks(void) { pthread_atfork(NULL, NULL, reset_after_fork); }

static void wait_done(phase_t* ph) {
    for (int spins = 0; atomic_load(&ph->done) < ph->items;) {
        _mm_pause();
        if (++spins == 4096) {
            sched_yield();
            spins = 0;
        }
    }
}

static const float* x_f32(void) { return pool.a->dtype == F32 ? (const float*)pool.a->x : pool.xf; }

static void router_item(int64_t i) {
    const swarmoe_moe_args* a = pool.a;
    const int64_t e0 = i * ROUTER_ROWS, rows = a->experts - e0 < ROUTER_ROWS ? a->experts - e0 : ROUTER_ROWS;
    matmul_wt(F32, a->router + e0 * a->hidden, rows, a->hidden, x_f32(), a->tokens, a->hidden, pool.logits + e0,
              a->experts);
}

/* The weights and sizes of expert e (-1: the shared experts, never INT4). */
typedef struct {
    const char *gate, *up, *down;
    const char *gate_scale, *up_scale, *down_scale; /* INT4: per row; FP8: the block grids */
    int64_t inter;
    int format;
} expert_t;

static expert_t expert_at(int64_t e) {
    const swarmoe_moe_args* a = pool.a;
    if (e < 0) return (expert_t){.gate = a->shared_gate, .up = a->shared_up, .down = a->shared_down, .inter = a->shared_inter};
    const int64_t wsize = a->dtype == BF16 ? 2 : 4, I = a->inter, H = a->hidden;
    if (a->format == EXPERTS_INT4) {
        const char* gate = (const char*)a->gate_up + e * 2 * I * H / 2;
        const char* gate_scale = (const char*)a->gate_up_scale + e * 2 * I * (H / 32) * wsize;
        return (expert_t){gate, gate + I * H / 2, (const char*)a->down + e * H * I / 2, gate_scale,
                          gate_scale + I * (H / 32) * wsize, (const char*)a->down_scale + e * H * (I / 32) * wsize, I,
                          EXPERTS_INT4};
    }
    if (a->format == EXPERTS_FP8) {
        const int64_t bi = (I + FP8_BLOCK - 1) / FP8_BLOCK, bh = (H + FP8_BLOCK - 1) / FP8_BLOCK;
        const char* gate = (const char*)a->gate_up + e * 2 * I * H;
        const char* gate_scale = (const char*)a->gate_up_scale + e * 2 * bi * bh * 4;
        return (expert_t){gate, gate + I * H, (const char*)a->down + e * H * I, gate_scale, gate_scale + bi * bh * 4,
                          (const char*)a->down_scale + e * bh * bi * 4, I, EXPERTS_FP8};
    }
    const char* gate = (const char*)a->gate_up + e * 2 * I * H * wsize;
    return (expert_t){.gate = gate, .up = gate + I * H * wsize, .down = (const char*)a->down + e * H * I * wsize, .inter = I};
}

/* Bytes per element of the activations an expert's kernels read: float32 for quantised experts. */
static int64_t act_size(const expert_t* ex) { return ex->format != EXPERTS_DENSE ? 4 : x_size(pool.a->dtype); }

/* y[M, N] = x[M, K] @ rows lo..lo+N-1 of one projection of an expert (w, with scales s if
 * quantised). */
static void project(const expert_t* ex, const char* w, const char* s, int64_t lo, int64_t N, int64_t K, const void* x,
                    int64_t M, float* y) {
    const int dtype = pool.a->dtype;
    const int64_t wsize = dtype == BF16 ? 2 : 4;
    if (ex->format == EXPERTS_INT4)
        matmul_int4(dtype, w + lo * K / 2, s + lo * (K / 32) * wsize, N, K, x, M, K, y, N);
    else if (ex->format == EXPERTS_FP8)
        matmul_fp8((const uint8_t*)w + lo * K, (const float*)s, lo, N, K, x, M, K, y, N);
    else
        matmul_wt(dtype, w + lo * K * wsize, N, K, x, M, K, y, N);
}

/* Gate and up rows lo..hi-1 of a task's expert over its rows, SwiGLU, into the act rows. */
static void up_item(const task_t* t) {
    const swarmoe_moe_args* a = pool.a;
    const expert_t ex = expert_at(t->expert);
    const int64_t H = a->hidden, M = t->end - t->begin, I = t->hi - t->lo, asize = act_size(&ex);
    float* xs = scratch_floats(M * H + 2 * M * I);
    if (xs == NULL) {
        atomic_store(&pool.failed, 1);
        return;
    }
    float *hg = xs + M * H, *hu = hg + M * I;
    /* The activations as the kernels read them: bf16 straight from x, else float32 (in INT4 order
     * for INT4 experts). */
    const char* x = asize == 2 ? (const char*)a->x : (const char*)x_f32();
    for (int64_t m = 0; m < M; m++) {
        const int64_t tok = t->expert < 0 ? t->begin + m : pool.pairs[t->begin + m] / a->top_k;
        if (ex.format == EXPERTS_INT4)
            int4_order((const float*)x + tok * H, xs + m * H, H);
        else
            memcpy((char*)xs + m * H * asize, x + tok * H * asize, H * asize);
    }
    project(&ex, ex.gate, ex.gate_scale, t->lo, I, H, xs, M, hg);
    project(&ex, ex.up, ex.up_scale, t->lo, I, H, xs, M, hu);
    char* act = (t->expert < 0 ? (char*)pool.shared_act : (char*)pool.act) + t->begin * ex.inter * asize;
    if (ex.format == EXPERTS_INT4)
        swiglu_int4_rows(hg, hu, M, I, t->lo, (float*)act, ex.inter);
    else /* float32 rows for FP8 experts */
        swiglu_rows(ex.format == EXPERTS_FP8 ? F32 : a->dtype, hg, hu, M, I, act + t->lo * asize, ex.inter);
}

/* Down rows lo..hi-1 (output columns) of a task's expert over its act rows, weighted, into the
 * rows of its pairs (or tokens). */
static void down_item(const task_t* t) {
    const swarmoe_moe_args* a = pool.a;
    const expert_t ex = expert_at(t->expert);
    const int64_t H = a->hidden, M = t->end - t->begin, N = t->hi - t->lo;
    float* ys = scratch_floats(M * N);
    if (ys == NULL) {
        atomic_store(&pool.failed, 1);
        return;
    }
    const char* act = (t->expert < 0 ? (const char*)pool.shared_act : (const char*)pool.act) +
                      t->begin * ex.inter * act_size(&ex);
    project(&ex, ex.down, ex.down_scale, t->lo, N, ex.inter, act, M, ys);
    for (int64_t m = 0; m < M; m++) {
        if (t->expert < 0) {
            memcpy(pool.shared_rows + (t->begin + m) * H + t->lo, ys + m * N, N * sizeof(float));
        } else {
            const int64_t p = pool.pairs[t->begin + m];
            const float w = pool.weights[p];
            float* dst = pool.rows + p * H + t->lo;
            for (int64_t h = 0; h < N; h++) dst[h] = ys[m * N + h] * w;
        }
    }
}

/* Tasks for an expert over rows begin..end-1: `parts` up and `parts` down tasks per run of at
 * most TASK_ROWS rows. Returns how many up tasks it wrote (as many down tasks). */
static int64_t expert_tasks(int64_t e, int64_t begin, int64_t end, task_t* up, task_t* down) {
    const int64_t I = expert_at(e).inter, H = pool.a->hidden, parts = pool.parts;
    int64_t n = 0;
    for (int64_t b = begin; b < end; b += TASK_ROWS) {
        const int64_t stop = b + TASK_ROWS < end ? b + TASK_ROWS : end;
        for (int64_t j = 0; j < parts; j++, n++) {
            up[n] = (task_t){e, b, stop, I * j / parts, I * (j + 1) / parts};
            down[n] = (task_t){e, b, stop, H * j / parts, H * (j + 1) / parts};
        }
    }
    return n;
}

/* Sigmoid scores, noaux_tc choice (score + correction bias) within the best groups, top-k,
 * weights from the unbiased scores, as Router.select. */
static void select_item(int64_t i) {
    const swarmoe_moe_args* a = pool.a;
    const int64_t E = a->experts, k = a->top_k, t0 = i * SELECT_TOKENS;
    const int64_t t1 = t0 + SELECT_TOKENS < a->tokens ? t0 + SELECT_TOKENS : a->tokens;
    float choice[E];
    for (int64_t t = t0; t < t1; t++) {
        float* s = pool.logits + t * E;
        int64_t e = 0;
        for (; e + 16 <= E; e += 16) {
            __m512 l = _mm512_loadu_ps(s + e);
            _mm512_storeu_ps(s + e, _mm512_div_ps(_mm512_set1_ps(1.0f),
                                                  _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), l)))));
        }
        for (; e < E; e++) s[e] = 1.0f / (1.0f + expf(-s[e]));
        for (e = 0; e < E; e++) choice[e] = s[e] + (a->bias ? a->bias[e] : 0.0f);
        if (a->top_groups < a->groups) {
            const int64_t size = E / a->groups;
            float gscore[a->groups];
            for (int64_t g = 0; g < a->groups; g++) {
                float b1 = -INFINITY, b2 = -INFINITY;
                for (int64_t j = g * size; j < (g + 1) * size; j++) {
                    if (choice[j] > b1) {
                        b2 = b1;
                        b1 = choice[j];
                    } else if (choice[j] > b2) {
                        b2 = choice[j];
                    }
                }
                gscore[g] = b1 + b2;
            }
            for (int64_t g = 0; g < a->groups; g++) {
                int64_t better = 0; /* groups ahead of g (ties: the lower index ahead) */
                for (int64_t h = 0; h < a->groups; h++)
                    better += gscore[h] > gscore[g] || (gscore[h] == gscore[g] && h < g);
                if (better >= a->top_groups)
                    for (int64_t j = g * size; j < (g + 1) * size; j++) choice[j] = -INFINITY;
            }
        }
        int64_t* idx = pool.routing + t * k;
        float best[k];
        int64_t n = 0;
        for (e = 0; e < E; e++) { /* insertion into the k best so far, best first */
            if (n == k && !(choice[e] > best[k - 1])) continue;
            int64_t j = n < k ? n++ : k - 1;
            for (; j > 0 && choice[e] > best[j - 1]; j--) {
                best[j] = best[j - 1];
                idx[j] = idx[j - 1];
            }
            best[j] = choice[e];
            idx[j] = e;
        }
        float* w = pool.weights + t * k;
        float sum = 0.0f;
        for (int64_t j = 0; j < k; j++) sum += (w[j] = s[idx[j]]);
        for (int64_t j = 0; j < k; j++) w[j] = (a->norm_top_k ? w[j] / (sum + 1e-20f) : w[j]) * a->scaling;
    }
}

/* Pairs (token * k + slot) sorted by expert (counting sort), and the experts' tasks (the shared
 * experts' down tasks after the routed experts'). */
static void plan_item(void) {
    const swarmoe_moe_args* a = pool.a;
    const int64_t E = a->experts, pairs = a->tokens * a->top_k;
    int64_t* counts = pool.counts;
    memset(counts, 0, E * sizeof(int64_t));
    for (int64_t p = 0; p < pairs; p++) counts[pool.routing[p]]++;
    int64_t n = 0, offset = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t c = counts[e];
        n += expert_tasks(e, offset, offset + c, pool.up_tasks + n, pool.down_tasks + n);
        counts[e] = offset; /* now the next free position of expert e */
        offset += c;
    }
    for (int64_t p = 0; p < pairs; p++) pool.pairs[counts[pool.routing[p]]++] = p;
    pool.up.items = n;
    if (a->shared_gate) {
        memcpy(pool.down_tasks + n, pool.shared_down, pool.shared.items * sizeof(task_t));
        n += pool.shared.items;
    }
    pool.down.items = n;
}

/* Each token's k weighted rows summed in slot order, then its shared experts' row. */
static void combine_item(int64_t i) {
    const swarmoe_moe_args* a = pool.a;
    const int64_t H = a->hidden, k = a->top_k, t0 = i * COMBINE_TOKENS;
    const int64_t t1 = t0 + COMBINE_TOKENS < a->tokens ? t0 + COMBINE_TOKENS : a->tokens;
    for (int64_t t = t0; t < t1; t++) {
        float* sum = pool.rows + t * k * H;
        for (int64_t j = 1; j < k; j++)
            for (int64_t h = 0; h < H; h++) sum[h] += sum[j * H + h];
        if (a->shared_gate)
            for (int64_t h = 0; h < H; h++) sum[h] += pool.shared_rows[t * H + h];
        store_row(a->dtype, sum, 1.0f, a->y, t, H);
    }
}

/* Take items of a phase until none is left. */
#define TAKE(PH, CALL)                                                   \
    for (int64_t i_; (i_ = atomic_fetch_add(&pool.PH.next, 1)) < pool.PH.items;) { \
        const int64_t i = i_;                                            \
        CALL;                                                            \
        atomic_fetch_add(&pool.PH.done, 1);                              \
    }

/* One thread's part of a layer. The shared experts' up tasks need no routing and fill the wait
 * for it; every down task waits for all up tasks, so both phases split evenly across threads. */
static void work(void) {
    TAKE(router, router_item(i));
    TAKE(shared, up_item(&pool.shared_up[i]));
    wait_done(&pool.router);
    TAKE(select, select_item(i));
    wait_done(&pool.select);
    TAKE(plan, (void)i; plan_item());
    wait_done(&pool.plan);
    TAKE(up, up_item(&pool.up_tasks[i]));
    wait_done(&pool.up);
    wait_done(&pool.shared);
    TAKE(down, down_item(&pool.down_tasks[i]));
    wait_done(&pool.down);
    TAKE(combine, combine_item(i));
}

static void* helper_main(void* arg) {
    const int tid = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&pool.generation);
    for (;;) {
        uint32_t now;
        for (int spins = 0; (now = atomic_load(&pool.generation)) == seen;) {
            if (++spins < 2000) {
                _mm_pause();
                continue;
            }
            syscall(SYS_futex, &pool.generation, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
            spins = 0;
        }
        seen = now;
        atomic_fetch_add(&pool.active, 1);
        if (atomic_load(&pool.open) && tid < pool.threads) pool.job();
        atomic_fetch_sub(&pool.active, 1);
    }
    return NULL;
}

static void* grow(void* p, int64_t bytes) {
    free(p);
    return aligned_alloc(64, ((bytes + 63) / 64) * 64);
}

/* Buffers for a layer of this shape; 0, or -1 without memory. */
static int reserve(const swarmoe_moe_args* a) {
    const int64_t n = a->tokens, E = a->experts, H = a->hidden, k = a->top_k;
    const int64_t I = a->inter > a->shared_inter ? a->inter : a->shared_inter;
    if (n > pool.cap_tokens || E > pool.cap_experts || H > pool.cap_hidden || k > pool.cap_k || I > pool.cap_inter) {
        const int64_t nn = n > pool.cap_tokens ? n : pool.cap_tokens, ee = E > pool.cap_experts ? E : pool.cap_experts;
        const int64_t hh = H > pool.cap_hidden ? H : pool.cap_hidden, kk = k > pool.cap_k ? k : pool.cap_k;
        const int64_t ii = I > pool.cap_inter ? I : pool.cap_inter;
        pool.cap_tokens = pool.cap_experts = pool.cap_hidden = pool.cap_k = pool.cap_inter = 0;
        /* tasks: per expert and per run of TASK_ROWS pairs, MAX_PARTS of each kind (+ shared) */
        const int64_t tasks = MAX_PARTS * (ee + nn * kk / TASK_ROWS + 1), shared = MAX_PARTS * (nn / TASK_ROWS + 1);
        pool.xf = grow(pool.xf, nn * hh * 4);
        pool.logits = grow(pool.logits, nn * ee * 4);
        pool.weights = grow(pool.weights, nn * kk * 4);
        pool.counts = grow(pool.counts, ee * 8);
        pool.pairs = grow(pool.pairs, nn * kk * 8);
        pool.indices = grow(pool.indices, nn * kk * 8);
        pool.up_tasks = grow(pool.up_tasks, tasks * sizeof(task_t));
        pool.down_tasks = grow(pool.down_tasks, (tasks + shared) * sizeof(task_t));
        pool.shared_up = grow(pool.shared_up, shared * sizeof(task_t));
        pool.shared_down = grow(pool.shared_down, shared * sizeof(task_t));
        pool.rows = grow(pool.rows, nn * kk * hh * 4);
        pool.shared_rows = grow(pool.shared_rows, nn * hh * 4);
        pool.act = grow(pool.act, nn * kk * ii * 4);
        pool.shared_act = grow(pool.shared_act, nn * ii * 4);
        if (!(pool.xf && pool.logits && pool.weights && pool.counts && pool.pairs && pool.indices && pool.up_tasks &&
              pool.down_tasks && pool.shared_up && pool.shared_down && pool.rows && pool.shared_rows && pool.act &&
              pool.shared_act))
            return -1;
        pool.cap_tokens = nn, pool.cap_experts = ee, pool.cap_hidden = hh, pool.cap_k = kk, pool.cap_inter = ii;
    }
    return 0;
}

/* The threads a call asks for, up to what the pool runs (torch may run more). */
static int64_t capped(int64_t threads) { return threads < MAX_THREADS ? threads : MAX_THREADS; }

/* Helpers up to `threads` - 1 (fewer if the system refuses more); call with the lock held. */
static void start_helpers(int64_t threads) {
    while (pool.helpers < threads - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int made = pthread_create(&t, &attr, helper_main, (void*)(intptr_t)(pool.helpers + 1));
        pthread_attr_destroy(&attr);
        if (made) break;
        pool.helpers++;
    }
}

/* Runs `job` on the caller and the helpers until `last` is done, and returns once no helper is
 * still inside it; call with the lock held and the job's phases started. */
static void run_job(void (*job)(void), int64_t threads, phase_t* last) {
    pool.job = job;
    pool.threads = threads;
    atomic_store(&pool.failed, 0);
    atomic_store(&pool.open, 1);
    atomic_fetch_add(&pool.generation, 1);
    syscall(SYS_futex, &pool.generation, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
    job();
    wait_done(last);
    atomic_store(&pool.open, 0);
    while (atomic_load(&pool.active)) _mm_pause();
}

static void start_phase(phase_t* ph, int64_t items) {
    atomic_store(&ph->next, 0);
    atomic_store(&ph->done, 0);
    ph->items = items;
}

/* One MoE layer (see swarmoe_moe_args). Returns 0; -1 without memory; -2 for a bad shape. */
int swarmoe_moe(const swarmoe_moe_args* a) {
    if (a->threads < 1 || a->top_k < 1 || a->top_k > a->experts || a->groups < 1 ||
        a->experts % a->groups)
        return -2;
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, watch_forks);
    pthread_mutex_lock(&pool.lock);
    int status = reserve(a);
    const int64_t threads = capped(a->threads);
    if (status == 0) {
        start_helpers(threads);
        pool.a = a;
        pool.routing = a->indices ? a->indices : pool.indices;
        if (a->dtype == BF16) {
            widen_row(a->x, pool.xf, a->tokens * a->hidden); /* the router reads float32 */
        }
        start_phase(&pool.router, (a->experts + ROUTER_ROWS - 1) / ROUTER_ROWS);
        /* Few pairs per thread (decode): each expert's work is cut in parts, so that the threads
         * share a layer's handful of experts evenly. */
        pool.parts = a->tokens * a->top_k < SPLIT_BELOW_PAIRS * threads ? MAX_PARTS : 1;
        start_phase(&pool.shared, a->shared_gate ? expert_tasks(-1, 0, a->tokens, pool.shared_up, pool.shared_down) : 0);
        start_phase(&pool.select, (a->tokens + SELECT_TOKENS - 1) / SELECT_TOKENS);
        start_phase(&pool.plan, 1);
        start_phase(&pool.up, 0); /* the plan sets how many up and down tasks */
        start_phase(&pool.down, 0);
        start_phase(&pool.combine, (a->tokens + COMBINE_TOKENS - 1) / COMBINE_TOKENS);
        run_job(work, threads, &pool.combine);
        status = atomic_load(&pool.failed) ? -1 : 0;
    }
    pthread_mutex_unlock(&pool.lock);
    return status;
}

/* ---- A dense linear layer over a few rows ----
 *
 * At decode a linear layer multiplies one or a few rows by a weight that comes cold from memory.
 * The threads take runs of output rows in turn, each streaming its weight rows once, in memory
 * order, for all the input rows. */

/* Output rows n0..n0+rows-1 of item i: float32 in scratch, then with the bias, in dtype. */
static void linear_item(int64_t i) {
    const swarmoe_linear_args* l = pool.l;
    const int64_t M = l->rows, K = l->in, N = l->out, n0 = i * pool.linear_rows;
    const int64_t rows = N - n0 < pool.linear_rows ? N - n0 : pool.linear_rows, wsize = l->dtype == BF16 ? 2 : 4;
    float* ys = scratch_floats(M * rows);
    if (ys == NULL) {
        atomic_store(&pool.failed, 1);
        return;
    }
    matmul_wt(l->dtype, (const char*)l->w + n0 * K * wsize, rows, K, pool.linear_x, M, K, ys, rows);
    for (int64_t m = 0; m < M; m++)
        for (int64_t r = 0; r < rows; r++) {
            float v = ys[m * rows + r];
            if (l->bias)
                v += l->dtype == F32 ? ((const float*)l->bias)[n0 + r] : bf16_value(((const uint16_t*)l->bias)[n0 + r]);
            if (l->dtype == F32)
                ((float*)l->y)[m * N + n0 + r] = v;
            else
                ((uint16_t*)l->y)[m * N + n0 + r] = to_bf16(v);
        }
}

static void linear_work(void) { TAKE(linear, linear_item(i)); }

/* Items per thread: enough that a thread that starts late still gets its share. */
enum { LINEAR_ITEMS_PER_THREAD = 8 };

/* One linear layer (see swarmoe_linear_args). Returns 0; -1 without memory; -2 for a bad shape. */
int swarmoe_linear(const swarmoe_linear_args* l) {
    if (l->threads < 1 || l->rows < 1 || l->in < 1 || l->out < 1) return -2;
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, watch_forks);
    pthread_mutex_lock(&pool.lock);
    int status = 0;
    const int64_t xsize = x_size(l->dtype), bytes = l->rows * l->in * xsize;
    pool.linear_x = l->x;
    if (xsize != (l->dtype == BF16 ? 2 : 4)) {
        if (bytes > pool.widened_bytes) {
            pool.widened = grow(pool.widened, bytes);
            pool.widened_bytes = pool.widened ? bytes : 0;
        }
        if (pool.widened == NULL) status = -1;
        else widen_row(l->x, pool.widened, l->rows * l->in);
        pool.linear_x = pool.widened;
    }
    if (status == 0) {
        const int64_t threads = capped(l->threads);
        start_helpers(threads);
        pool.l = l;
        const int64_t parts = threads * LINEAR_ITEMS_PER_THREAD;
        pool.linear_rows = (l->out + parts - 1) / parts;
        start_phase(&pool.linear, (l->out + pool.linear_rows - 1) / pool.linear_rows);
        run_job(linear_work, threads, &pool.linear);
        status = atomic_load(&pool.failed) ? -1 : 0;
    }
    pthread_mutex_unlock(&pool.lock);
    return status;
}
