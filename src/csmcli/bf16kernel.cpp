// bfloat16 weights times float32 rows: y[M, N] = x[M, K] @ W[N, K]^T in float32.
//
// For CPUs whose oneDNN cannot multiply bfloat16 (no AVX-512 BW/VL, no AVX-NE-CONVERT), and for
// AVX-512 CPUs without AMX, where oneDNN's bf16 products are slower: the weights are read once per
// call as bfloat16 and widened in registers, so a product streams half the bytes of a float32
// copy.  A bfloat16 value is the top half of a float32, so widening is a shift or a mask of 32-bit
// lanes, without shuffles.
//
// Packed layout (csmcli.bf16kernel.pack writes it): blocks of 16 output rows; per block and input
// column k, 16 values where element 2j holds W[16b + j][k] and element 2j+1 holds W[16b + 8 + j][k].
// One 32-byte load then gives, per 32-bit lane j, rows j (low half, shifted up) and 8 + j (high
// half, masked), each multiplied by the broadcast x[m][k].  Any K works; N is padded to 16 rows.
//
// Two paths, chosen by the caller from what the CPU reports: AVX2 + FMA (8 lanes a vector, up to 4
// rows a pass) and AVX-512F (the column's 16 values zero-extended into one vector of 16 lanes, up to
// 8 rows a pass), whose twice as wide multiply-adds serve a batch's rows, bound by them rather than
// by memory.  Both add each row's products in the same order (see pass_rows): the same floats.
//
// Each thread takes whole blocks; a block's columns go in chunks that stay in L1, and every
// activation row is applied to a chunk before the next is read, so the weights stream from memory
// once per call whatever M is.

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { PATH_AVX2 = 1, PATH_AVX512 = 2 };

extern "C" {

// Whether this CPU runs ``path``.
int csm_bf16_cpu_has(int path) {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (path == PATH_AVX2) return avx2;
    if (path == PATH_AVX512) return avx2 && __builtin_cpu_supports("avx512f");
    return 0;
}

}  // extern "C"

// Columns per chunk: 256 columns of a block are 8 KiB of weights, and of 8 rows 8 KiB of x.
static const int CHUNK = 256;
// Activation rows of the next pass over a chunk, ``left`` rows to go: AVX2 up to 4 (two
// accumulators a row, unrolled by U, in 16 registers); AVX-512 8 where 8 are left (one accumulator
// a row in 32), else as AVX2.  Every row then gets AVX2's unrolling, whose sums it adds in the same
// order: both paths give the same floats.
static int pass_rows(int path, int left) {
    if (path == PATH_AVX512 && left >= 8) return 8;
    return left < 4 ? left : 4;
}
// With four rows or more a pass is bound by its multiply-adds, and the hardware prefetcher alone
// then streams the weights at well under memory speed: ask for them PREFETCH_BYTES ahead.  Fewer
// rows are bound by memory, where it depends on the CPU (see qkernel.cpp): the caller sets the row
// count from which passes prefetch (csm_prefetch_from).
static int prefetch_rows = 4;
static const int PREFETCH_BYTES = 4096;

// Sets the row count from which passes prefetch; returns the one it replaces.
extern "C" int csm_prefetch_from(int rows) {
    const int was = prefetch_rows;
    prefetch_rows = rows < 1 ? 1 : rows;
    return was;
}

// acc[m][16] += x[m][0:kn] . block columns 0:kn, for MB rows; w points at the chunk's first column.
template <int MB, int U>
__attribute__((target("avx2,fma"))) static void pass(const uint16_t* w, int kn, const float* x, int ldx,
                                                     float* acc) {
    // The loops over rows and unrolled columns are unrolled by pragma: otherwise GCC keeps the
    // accumulator arrays on the stack and stores every accumulator at every column.
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 lo[U][MB], hi[U][MB];
    #pragma GCC unroll 8
    for (int u = 0; u < U; ++u)
        #pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) lo[u][m] = hi[u][m] = _mm256_setzero_ps();
    int k = 0;
    for (; k + U <= kn; k += U) {
        #pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
            if (MB >= prefetch_rows) _mm_prefetch((const char*)(w + (size_t)(k + u) * 16) + PREFETCH_BYTES, _MM_HINT_T0);
            const __m256i v = _mm256_loadu_si256((const __m256i*)(w + (size_t)(k + u) * 16));
            const __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            const __m256 b = _mm256_castsi256_ps(_mm256_and_si256(v, high));
            #pragma GCC unroll 8
            for (int m = 0; m < MB; ++m) {
                const __m256 xb = _mm256_broadcast_ss(x + (size_t)m * ldx + k + u);
                lo[u][m] = _mm256_fmadd_ps(a, xb, lo[u][m]);
                hi[u][m] = _mm256_fmadd_ps(b, xb, hi[u][m]);
            }
        }
    }
    for (; k < kn; ++k) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(w + (size_t)k * 16));
        const __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        const __m256 b = _mm256_castsi256_ps(_mm256_and_si256(v, high));
        #pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
            const __m256 xb = _mm256_broadcast_ss(x + (size_t)m * ldx + k);
            lo[0][m] = _mm256_fmadd_ps(a, xb, lo[0][m]);
            hi[0][m] = _mm256_fmadd_ps(b, xb, hi[0][m]);
        }
    }
    #pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
        #pragma GCC unroll 8
        for (int u = 1; u < U; ++u) {
            lo[0][m] = _mm256_add_ps(lo[0][m], lo[u][m]);
            hi[0][m] = _mm256_add_ps(hi[0][m], hi[u][m]);
        }
        _mm256_storeu_ps(acc + 16 * m, _mm256_add_ps(_mm256_loadu_ps(acc + 16 * m), lo[0][m]));
        _mm256_storeu_ps(acc + 16 * m + 8, _mm256_add_ps(_mm256_loadu_ps(acc + 16 * m + 8), hi[0][m]));
    }
}

// pass on AVX-512F: one vector of 16 lanes a row, lane 2j for row j and 2j + 1 for row 8 + j, put
// back in row order when added to acc (the lanes' sums are pass's, in the same order).
template <int MB, int U>
__attribute__((target("avx512f"))) static void pass512(const uint16_t* w, int kn, const float* x, int ldx,
                                                     float* acc) {
    __m512 sum[U][MB];
    #pragma GCC unroll 8
    for (int u = 0; u < U; ++u)
        #pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) sum[u][m] = _mm512_setzero_ps();
    int k = 0;
    for (; k + U <= kn; k += U) {
        #pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
            if (MB >= prefetch_rows) _mm_prefetch((const char*)(w + (size_t)(k + u) * 16) + PREFETCH_BYTES, _MM_HINT_T0);
            const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w + (size_t)(k + u) * 16)));
            const __m512 a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            #pragma GCC unroll 8
            for (int m = 0; m < MB; ++m)
                sum[u][m] = _mm512_fmadd_ps(a, _mm512_set1_ps(x[(size_t)m * ldx + k + u]), sum[u][m]);
        }
    }
    for (; k < kn; ++k) {
        const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w + (size_t)k * 16)));
        const __m512 a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        #pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) sum[0][m] = _mm512_fmadd_ps(a, _mm512_set1_ps(x[(size_t)m * ldx + k]), sum[0][m]);
    }
    const __m512i order = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    #pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
        #pragma GCC unroll 8
        for (int u = 1; u < U; ++u) sum[0][m] = _mm512_add_ps(sum[0][m], sum[u][m]);
        const __m512 rows = _mm512_permutexvar_ps(order, sum[0][m]);
        _mm512_storeu_ps(acc + 16 * m, _mm512_add_ps(_mm512_loadu_ps(acc + 16 * m), rows));
    }
}

typedef void (*pass_fn)(const uint16_t*, int, const float*, int, float*);

// Unrolled so that eight independent multiply-add chains (AVX2) hide the FMA latency; AVX-512
// unrolls as AVX2 does (see pass_rows) and its 8-row pass has eight chains too.
static pass_fn pick(int path, int rows) {
    static const pass_fn avx2[4] = {pass<1, 4>, pass<2, 2>, pass<3, 2>, pass<4, 1>};
    static const pass_fn avx512[8] = {pass512<1, 4>, pass512<2, 2>, pass512<3, 2>, pass512<4, 1>,
                                      nullptr,       nullptr,       nullptr,       pass512<8, 1>};
    return (path == PATH_AVX512 ? avx512 : avx2)[rows - 1];
}

extern "C" {

// y[M, N] = x[M, K] @ W^T for a weight packed in ceil(N / 16) blocks, on ``path``.  Returns 0; -1
// when this CPU cannot run the path; -2 when the scratch accumulators cannot be allocated.
int csm_bf16_matmul(int path, const float* x, int M, int K, const uint16_t* w, int N, float* y) {
    if (!csm_bf16_cpu_has(path)) return -1;
    const int blocks = (N + 15) / 16;
    int failed = 0;
#pragma omp parallel
    {
        float* acc = (float*)malloc(sizeof(float) * 16 * (size_t)M);
        if (acc == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int b = 0; b < blocks; ++b) {
            if (acc == NULL) continue;
            const uint16_t* wb = w + (size_t)b * K * 16;
            memset(acc, 0, sizeof(float) * 16 * (size_t)M);
            for (int k0 = 0; k0 < K; k0 += CHUNK) {
                const int kn = K - k0 < CHUNK ? K - k0 : CHUNK;
                for (int m0 = 0, rows; m0 < M; m0 += rows) {
                    rows = pass_rows(path, M - m0);
                    pick(path, rows)(wb + (size_t)k0 * 16, kn, x + (size_t)m0 * K + k0, K, acc + 16 * m0);
                }
            }
            const int n0 = 16 * b, width = N - n0 < 16 ? N - n0 : 16;
            for (int m = 0; m < M; ++m) memcpy(y + (size_t)m * N + n0, acc + 16 * m, sizeof(float) * width);
        }
        free(acc);
    }
    return failed ? -2 : 0;
}

// csm_bf16_matmul with the signature of the products of csmcli.qkernel's fused step (csm_step),
// which passes an argument this kernel does not need.
int csm_bf16_product(int path, const float* x, int M, int K, int arg, const void* w, int N, float* y) {
    (void)arg;
    return csm_bf16_matmul(path, x, M, K, (const uint16_t*)w, N, y);
}

}  // extern "C"
