// W4A8 matrix products for csmcli's int4 weights: y[M, N] = x[M, K] @ W[N, K]^T.
//
// Weights are 4-bit codes q with one fp16 scale and minimum per output row and group of G inputs
// (w = q * scale + min).  Each call quantizes x to int8 per row and group (x ~ sx * xq, with
// sx = max|x| / 127) and multiplies with integer dot-product instructions, so a product costs a
// few instructions per 64 weight bytes and runs at memory speed.  Per group,
//   sum_k w_k x_k ~= scale * (sx * sum_k q_k xq_k + corr) + min * sum_k x_k,
//   corr = 8 * (sum_k x_k - sx * sum_k xq_k),
// which is exact but for scale * sum_k (q_k - 8)(x_k - sx xq_k): the rounding of x meets centred
// codes, so its error is that of the weights' spread, not of their offset.
//
// Packed layout (csmcli.qkernel.pack writes it): blocks of 16 output rows; per block and group,
// 64 header bytes (16 fp16 scales, 16 fp16 minimums), then G/8 chunks of 64 bytes where byte
// c*4+i holds q[row c][k0+i] in its low nibble and q[row c][k0+4+i] in its high one (k0 = 8 * chunk).
//
// Three paths, chosen by the caller from what the CPU reports: AVX-512 VNNI (vpdpbusd, 16 rows a
// vector), AVX2 (vpmaddubsw + vpmaddwd, two halves of 8 rows) and AVX-VNNI (AVX2's halves with
// vpdpbusd on 256-bit vectors, as laptops since Alder Lake have without AVX-512).  Codes are at most
// 15, so the AVX2 path's 16-bit pair sums (at most 2 * 2 * 15 * 127) cannot saturate.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

// Compilers that know AVX-VNNI (GCC 11, Clang 12); with older ones that path reports it cannot run.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define CSM_AVXVNNI 1
#define CSM_AVX2_TARGET "avx2,fma,f16c,avxvnni"
#else
#define CSM_AVXVNNI 0
#define CSM_AVX2_TARGET "avx2,fma,f16c"
#endif

enum { PATH_AVX2 = 1, PATH_AVX512_VNNI = 2, PATH_AVX_VNNI = 3 };

extern "C" {

int csm_int4_cpu_has(int path) {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (path == PATH_AVX2) return avx2;
    if (path == PATH_AVX512_VNNI)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vnni");
#if CSM_AVXVNNI
    if (path == PATH_AVX_VNNI) return avx2 && __builtin_cpu_supports("avxvnni");
#endif
    return 0;
}

}  // extern "C"

// One row's group of G floats (a multiple of 8) -> int8 codes, with the group's scale sx, the sum of
// its values and the correction corr.  Both kernel paths have AVX2.  Codes round to nearest even, as
// lrintf does in the default rounding mode.
__attribute__((target("avx2,fma"))) static void quantize_group(const float* v, int G, int8_t* out, float* sx, float* xs,
                                                               float* corr) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
    for (int k = 0; k < G; k += 8) {
        const __m256 a = _mm256_loadu_ps(v + k);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, a));
        sum = _mm256_add_ps(sum, a);
    }
    float lanes[8], sums[8];
    _mm256_storeu_ps(lanes, amax);
    _mm256_storeu_ps(sums, sum);
    float top = 0.f, total = 0.f;
    for (int i = 0; i < 8; ++i) {
        top = lanes[i] > top ? lanes[i] : top;  // fmaxf would be a library call here
        total += sums[i];
    }
    const float scale = top / 127.f;
    const __m256 inv = _mm256_set1_ps(top > 0.f ? 127.f / top : 0.f);
    __m256i codes = _mm256_setzero_si256();
    for (int k = 0; k < G; k += 8) {
        const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + k), inv));
        codes = _mm256_add_epi32(codes, q);
        const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        _mm_storel_epi64((__m128i*)(out + k), _mm_packs_epi16(w, w));
    }
    int counts[8], count = 0;
    _mm256_storeu_si256((__m256i*)counts, codes);
    for (int i = 0; i < 8; ++i) count += counts[i];
    *sx = scale;
    *xs = total;
    *corr = 8.f * (total - scale * (float)count);
}

static inline size_t group_bytes(int G) { return 64 + (size_t)8 * G; }

// From four activation rows on, a block's integer products are compute-bound, and the hardware
// prefetcher alone then leaves the weights' stream from memory at about half speed: ask for the
// bytes a few hundred cycles ahead.  With fewer rows the loop is bound by memory: there the extra
// requests competed with the prefetcher's on an AMD EPYC, and on an Intel Xeon they read a lone
// row's weights a quarter faster, so the caller sets the row count from which passes prefetch
// (csm_prefetch_from) by the CPU.
static int prefetch_rows = 4;
constexpr int PREFETCH_BYTES = 2048;

// Sets the row count from which passes prefetch; returns the one it replaces.
extern "C" int csm_prefetch_from(int rows) {
    const int was = prefetch_rows;
    prefetch_rows = rows < 1 ? 1 : rows;
    return was;
}

// acc += a . broadcast(*x), the broadcast folded into the instruction's memory operand and the
// accumulator tied to its register: with the intrinsic GCC copies every accumulator at each use.
__attribute__((target("avx512f,avx512vnni"))) static inline void dpbusd_bcast(__m512i& acc, __m512i a, const int32_t* x) {
    asm("vpdpbusd %[x]%{1to16%}, %[a], %[acc]" : [acc] "+v"(acc) : [a] "v"(a), [x] "m"(*x));
}

template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512vl,f16c"))) static void block_vnni(
    const uint8_t* wb, int K, int G, const int8_t* xq, int ldx, const float* sx, const float* xs, const float* corr, float* y, int ldy, int ncols) {
    const int ng = K / G;
    const __m512i mask = _mm512_set1_epi8(0x0F);
    __m512 accf[MB];
    for (int m = 0; m < MB; ++m) accf[m] = _mm512_setzero_ps();
    for (int g = 0; g < ng; ++g) {
        const uint8_t* p = wb + (size_t)g * group_bytes(G);
        const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
        const __m512 mins = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + 32)));
        p += 64;
        // Two accumulators per row keep a lone row's dependency chains short; from five rows on,
        // one per row, so that accumulators and sums stay in the 32 registers (no spills).
        constexpr int NA = MB <= 4 ? 2 : 1;
        __m512i acc[MB][NA];
        for (int m = 0; m < MB; ++m)
            for (int h = 0; h < NA; ++h) acc[m][h] = _mm512_setzero_si512();
        const int8_t* xg = xq + (size_t)g * G;
        for (int j = 0; j < G / 8; ++j) {
            if (MB >= prefetch_rows) _mm_prefetch((const char*)(p + 64 * j + PREFETCH_BYTES), _MM_HINT_T0);
            const __m512i v = _mm512_loadu_si512((const void*)(p + 64 * j));
            const __m512i a = _mm512_and_si512(v, mask);
            const __m512i b = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
            for (int m = 0; m < MB; ++m) {
                const int32_t* xm = (const int32_t*)(xg + (size_t)m * ldx + 8 * j);
                dpbusd_bcast(acc[m][0], a, xm);
                dpbusd_bcast(acc[m][NA - 1], b, xm + 1);
            }
        }
        for (int m = 0; m < MB; ++m) {
            const __m512 dot = _mm512_cvtepi32_ps(NA == 2 ? _mm512_add_epi32(acc[m][0], acc[m][NA - 1]) : acc[m][0]);
            const __m512 t = _mm512_fmadd_ps(dot, _mm512_set1_ps(sx[m * ng + g]), _mm512_set1_ps(corr[m * ng + g]));
            accf[m] = _mm512_fmadd_ps(scale, t, accf[m]);
            accf[m] = _mm512_fmadd_ps(mins, _mm512_set1_ps(xs[m * ng + g]), accf[m]);
        }
    }
    const __mmask16 keep = (__mmask16)((1u << ncols) - 1);
    for (int m = 0; m < MB; ++m) _mm512_mask_storeu_ps(y + (size_t)m * ldy, keep, accf[m]);
}

// acc += a . x with every operand in a register, the accumulator tied as in dpbusd_bcast.
__attribute__((target("avx512f,avx512vnni"))) static inline void dpbusd(__m512i& acc, __m512i a, __m512i x) {
    asm("vpdpbusd %[x], %[a], %[acc]" : [acc] "+v"(acc) : [a] "v"(a), [x] "v"(x));
}

// Two adjacent full blocks (32 output rows) for MB activation rows, each broadcast of the rows'
// codes feeding both blocks.  With one block, a pass of several rows loads one broadcast per
// multiply-add, and those loads rather than the multiply-adds bound it.  The float sums (2 * MB
// vectors, which would not fit in the registers beside the integer ones) stay in an L1 array,
// touched once per group.  The arithmetic is block_vnni's, in the same order: the same floats.
template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512vl,f16c"))) static void pair_vnni(
    const uint8_t* wb, size_t stride, int K, int G, const int8_t* xq, int ldx, const float* sx, const float* xs,
    const float* corr, float* y, int ldy) {
    const int ng = K / G;
    const __m512i mask = _mm512_set1_epi8(0x0F);
    alignas(64) float accf[MB][2][16];
    for (int m = 0; m < MB; ++m)
        for (int u = 0; u < 2; ++u) _mm512_store_ps(accf[m][u], _mm512_setzero_ps());
    for (int g = 0; g < ng; ++g) {
        const uint8_t* p[2] = {wb + (size_t)g * group_bytes(G), wb + stride + (size_t)g * group_bytes(G)};
        __m512i acc[MB][2];
        for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
        const int8_t* xg = xq + (size_t)g * G;
        for (int j = 0; j < G / 8; ++j) {
            __m512i a[2], b[2];
            for (int u = 0; u < 2; ++u) {
                const uint8_t* chunk = p[u] + 64 + 64 * j;
                if (MB >= prefetch_rows) _mm_prefetch((const char*)(chunk + PREFETCH_BYTES), _MM_HINT_T0);
                const __m512i v = _mm512_loadu_si512((const void*)chunk);
                a[u] = _mm512_and_si512(v, mask);
                b[u] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
            }
            for (int m = 0; m < MB; ++m) {
                const int32_t* xm = (const int32_t*)(xg + (size_t)m * ldx + 8 * j);
                const __m512i xa = _mm512_set1_epi32(xm[0]), xb = _mm512_set1_epi32(xm[1]);
                for (int u = 0; u < 2; ++u) dpbusd(acc[m][u], a[u], xa);
                for (int u = 0; u < 2; ++u) dpbusd(acc[m][u], b[u], xb);
            }
        }
        for (int u = 0; u < 2; ++u) {
            const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p[u]));
            const __m512 mins = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p[u] + 32)));
            for (int m = 0; m < MB; ++m) {
                const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][u]), _mm512_set1_ps(sx[m * ng + g]),
                                                 _mm512_set1_ps(corr[m * ng + g]));
                const __m512 f = _mm512_fmadd_ps(scale, t, _mm512_load_ps(accf[m][u]));
                _mm512_store_ps(accf[m][u], _mm512_fmadd_ps(mins, _mm512_set1_ps(xs[m * ng + g]), f));
            }
        }
    }
    for (int m = 0; m < MB; ++m)
        for (int u = 0; u < 2; ++u) _mm512_storeu_ps(y + (size_t)m * ldy + 16 * u, _mm512_load_ps(accf[m][u]));
}

#if CSM_AVXVNNI
// acc0 += a0 . broadcast(*x) and acc1 += a1 . broadcast(*x) on AVX-VNNI: one broadcast for both
// halves of a block, and the accumulators tied to their registers (with the intrinsic GCC copies
// them at each use and spills them, which chains each through memory).
__attribute__((target("avx2,avxvnni"))) static inline void dpbusd_avx_halves(__m256i& acc0, __m256i& acc1, __m256i a0,
                                                                             __m256i a1, const int32_t* x) {
    __m256i t;
    asm("vpbroadcastd %[x], %[t]\n\t"
        "%{vex%} vpdpbusd %[t], %[a0], %[acc0]\n\t"
        "%{vex%} vpdpbusd %[t], %[a1], %[acc1]"
        : [acc0] "+x"(acc0), [acc1] "+x"(acc1), [t] "=&x"(t)
        : [a0] "x"(a0), [a1] "x"(a1), [x] "m"(*x));
}
#endif

// The AVX2 and AVX-VNNI paths share their code but for a chunk's multiply-adds, where VNNI's take
// both halves of the block per broadcast.  Both are compiled for AVX-VNNI's target where the
// compiler knows it (it adds no other instruction), and only VNNI's instances use it.
template <int MB, bool VNNI>
__attribute__((target(CSM_AVX2_TARGET))) static void block_avx2(
    const uint8_t* wb, int K, int G, const int8_t* xq, int ldx, const float* sx, const float* xs, const float* corr, float* y, int ldy, int ncols) {
    const int ng = K / G;
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    alignas(32) float accf[MB][16] = {};  // in L1, so that the loop's registers go to the integer sums
    for (int g = 0; g < ng; ++g) {
        const uint8_t* header = wb + (size_t)g * group_bytes(G);
        const uint8_t* p = header + 64;
        __m256i acc[MB][2];
        for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
        const int8_t* xg = xq + (size_t)g * G;
        for (int j = 0; j < G / 8; ++j) {
            if (MB >= prefetch_rows) _mm_prefetch((const char*)(p + 64 * j + PREFETCH_BYTES), _MM_HINT_T0);
            __m256i a[2], b[2];  // each half's codes for inputs k0..k0+3 (low nibbles) and k0+4..k0+7
            for (int h = 0; h < 2; ++h) {
                const __m256i v = _mm256_loadu_si256((const __m256i*)(p + 64 * j + 32 * h));
                a[h] = _mm256_and_si256(v, mask);
                b[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            }
#if CSM_AVXVNNI
            if constexpr (VNNI) {
                for (int m = 0; m < MB; ++m) {
                    const int32_t* xm = (const int32_t*)(xg + (size_t)m * ldx + 8 * j);
                    dpbusd_avx_halves(acc[m][0], acc[m][1], a[0], a[1], xm);
                    dpbusd_avx_halves(acc[m][0], acc[m][1], b[0], b[1], xm + 1);
                }
                continue;
            }
#endif
            for (int h = 0; h < 2; ++h) {
                for (int m = 0; m < MB; ++m) {
                    int32_t xa, xb;
                    memcpy(&xa, xg + (size_t)m * ldx + 8 * j, 4);
                    memcpy(&xb, xg + (size_t)m * ldx + 8 * j + 4, 4);
                    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(a[h], _mm256_set1_epi32(xa)),
                                                           _mm256_maddubs_epi16(b[h], _mm256_set1_epi32(xb)));
                    acc[m][h] = _mm256_add_epi32(acc[m][h], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        for (int h = 0; h < 2; ++h) {
            const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(header + 16 * h)));
            const __m256 mins = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(header + 32 + 16 * h)));
            for (int m = 0; m < MB; ++m) {
                const __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][h]), _mm256_set1_ps(sx[m * ng + g]),
                                                 _mm256_set1_ps(corr[m * ng + g]));
                const __m256 f = _mm256_fmadd_ps(scale, t, _mm256_load_ps(accf[m] + 8 * h));
                _mm256_store_ps(accf[m] + 8 * h, _mm256_fmadd_ps(mins, _mm256_set1_ps(xs[m * ng + g]), f));
            }
        }
    }
    for (int m = 0; m < MB; ++m) memcpy(y + (size_t)m * ldy, accf[m], sizeof(float) * ncols);
}

typedef void (*block_fn)(const uint8_t*, int, int, const int8_t*, int, const float*, const float*, const float*, float*,
                         int, int);

// Activation rows per pass over a weight block: as many as the accumulators that fit in registers
// (32 vectors on AVX-512, 16 on AVX2); the block is re-read from cache for each further pass.
static int rows_per_pass(int path) { return path == PATH_AVX512_VNNI ? 8 : 4; }

// A path's block function for a pass of ``rows`` rows, from the tables of each path's functions.
template <class Fn>
static Fn for_path(int path, int rows, const Fn* vnni, const Fn* avx2, const Fn* avx_vnni) {
    return (path == PATH_AVX512_VNNI ? vnni : path == PATH_AVX_VNNI ? avx_vnni : avx2)[rows - 1];
}

typedef void (*pair_fn)(const uint8_t*, size_t, int, int, const int8_t*, int, const float*, const float*, const float*,
                        float*, int);

// The AVX-512 VNNI path's function for a pass of ``rows`` rows over two blocks.
static pair_fn pick_pair(int rows) {
    static const pair_fn fns[8] = {pair_vnni<1>, pair_vnni<2>, pair_vnni<3>, pair_vnni<4>,
                                   pair_vnni<5>, pair_vnni<6>, pair_vnni<7>, pair_vnni<8>};
    return fns[rows - 1];
}

// Rows from which the AVX-512 VNNI path takes blocks in pairs: two (one row is bound by memory,
// where block_vnni's two accumulators a row serve it).  A setting so that A/B scripts can compare.
static int pair_rows = 2;

// Sets the row count from which int4 products on AVX-512 VNNI pair their blocks; returns the one it
// replaces.
extern "C" int csm_pair_from(int rows) {
    const int was = pair_rows;
    pair_rows = rows < 1 ? 1 : rows;
    return was;
}

// Blocks a pass takes together: pairs on the AVX-512 VNNI path from pair_rows rows on, else one.
static int blocks_per_pass(int path, int M) { return path == PATH_AVX512_VNNI && M >= pair_rows ? 2 : 1; }

static block_fn pick(int path, int rows) {
    static const block_fn vnni[8] = {block_vnni<1>, block_vnni<2>, block_vnni<3>, block_vnni<4>,
                                     block_vnni<5>, block_vnni<6>, block_vnni<7>, block_vnni<8>};
    static const block_fn avx2[4] = {block_avx2<1, false>, block_avx2<2, false>, block_avx2<3, false>,
                                     block_avx2<4, false>};
    static const block_fn avx_vnni[4] = {block_avx2<1, true>, block_avx2<2, true>, block_avx2<3, true>,
                                         block_avx2<4, true>};
    return for_path(path, rows, vnni, avx2, avx_vnni);
}

// W8A8 over csmcli.qkernel.pack_int8's layout of an int8 weight W[N, K] (one float32 scale per
// output row, applied at the end): blocks of 16 output rows; per block and group of G inputs, 64
// header bytes (16 int32: -128 times the sum of each row's weights in the group), then G/4 chunks
// of 64 bytes where byte c*4+i holds W[row c][k0+i] (k0 = 4 * chunk).  Like the int4 layout, a
// chunk is one vector of 16 rows, so each activation row costs one multiply-add per 64 weights.
static inline size_t group_bytes8(int G) { return 64 + (size_t)16 * G; }

// VNNI multiplies unsigned by signed bytes: the activations' codes go in as x + 128 (their bits
// with the top one flipped, see flip_codes), and the header's -128 * sum(w) starts each group's
// accumulator to take the offset back out.
template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512vl"))) static void block_vnni8(
    const uint8_t* wb, int K, int G, const int8_t* xq, int ldx, const float* sx, const float* scales, float* y,
    int ldy, int ncols) {
    const int ng = K / G;
    __m512 accf[MB];
    for (int m = 0; m < MB; ++m) accf[m] = _mm512_setzero_ps();
    for (int g = 0; g < ng; ++g) {
        const uint8_t* p = wb + (size_t)g * group_bytes8(G);
        const __m512i offset = _mm512_loadu_si512((const void*)p);
        p += 64;
        __m512i acc[MB];
        for (int m = 0; m < MB; ++m) acc[m] = offset;
        const int8_t* xg = xq + (size_t)g * G;
        for (int j = 0; j < G / 4; ++j) {
            if (MB >= prefetch_rows) _mm_prefetch((const char*)(p + 64 * j + PREFETCH_BYTES), _MM_HINT_T0);
            const __m512i v = _mm512_loadu_si512((const void*)(p + 64 * j));
            for (int m = 0; m < MB; ++m) {
                int32_t xm;
                memcpy(&xm, xg + (size_t)m * ldx + 4 * j, 4);
                acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_set1_epi32(xm), v);
            }
        }
        for (int m = 0; m < MB; ++m)
            accf[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]), _mm512_set1_ps(sx[m * ng + g]), accf[m]);
    }
    const __mmask16 keep = (__mmask16)((1u << ncols) - 1);
    const __m512 s = _mm512_maskz_loadu_ps(keep, scales);
    for (int m = 0; m < MB; ++m) _mm512_mask_storeu_ps(y + (size_t)m * ldy, keep, _mm512_mul_ps(accf[m], s));
}

// AVX2 has no unsigned-by-signed multiply-add into 32 bits: |w| times x with w's sign moved onto x
// (both within +-127, so the 16-bit pair sums cannot saturate); the header is not needed.  AVX-VNNI
// (VNNI) has it: unsigned codes and the header, as on AVX-512 VNNI, in two halves of 8 rows.
template <int MB, bool VNNI>
__attribute__((target(CSM_AVX2_TARGET))) static void block_avx2_8(const uint8_t* wb, int K, int G, const int8_t* xq,
                                                                   int ldx, const float* sx, const float* scales, float* y,
                                                                   int ldy, int ncols) {
    const int ng = K / G;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 accf[MB][2];
    for (int m = 0; m < MB; ++m) accf[m][0] = accf[m][1] = _mm256_setzero_ps();
    for (int g = 0; g < ng; ++g) {
        const uint8_t* p = wb + (size_t)g * group_bytes8(G);
        __m256i acc[MB][2];
        for (int h = 0; h < 2; ++h) {
            const __m256i start = VNNI ? _mm256_loadu_si256((const __m256i*)(p + 32 * h)) : _mm256_setzero_si256();
            for (int m = 0; m < MB; ++m) acc[m][h] = start;
        }
        p += 64;
        const int8_t* xg = xq + (size_t)g * G;
        for (int j = 0; j < G / 4; ++j) {
            if (MB >= prefetch_rows) _mm_prefetch((const char*)(p + 64 * j + PREFETCH_BYTES), _MM_HINT_T0);
            __m256i v[2], a[2];
            for (int h = 0; h < 2; ++h) {
                v[h] = _mm256_loadu_si256((const __m256i*)(p + 64 * j + 32 * h));
                a[h] = _mm256_abs_epi8(v[h]);
            }
            for (int m = 0; m < MB; ++m) {
                int32_t xm;
                memcpy(&xm, xg + (size_t)m * ldx + 4 * j, 4);
                const __m256i xb = _mm256_set1_epi32(xm);  // the same 4 inputs for both halves' rows
#if CSM_AVXVNNI
                if constexpr (VNNI) {
                    for (int h = 0; h < 2; ++h) acc[m][h] = _mm256_dpbusd_avx_epi32(acc[m][h], xb, v[h]);
                    continue;
                }
#endif
                for (int h = 0; h < 2; ++h) {
                    const __m256i pairs = _mm256_maddubs_epi16(a[h], _mm256_sign_epi8(xb, v[h]));
                    acc[m][h] = _mm256_add_epi32(acc[m][h], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        for (int m = 0; m < MB; ++m) {
            const __m256 xscale = _mm256_set1_ps(sx[m * ng + g]);
            for (int h = 0; h < 2; ++h)
                accf[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][h]), xscale, accf[m][h]);
        }
    }
    float row[16];
    for (int m = 0; m < MB; ++m) {
        for (int h = 0; h < 2; ++h) _mm256_storeu_ps(row + 8 * h, accf[m][h]);
        for (int c = 0; c < ncols; ++c) y[(size_t)m * ldy + c] = row[c] * scales[c];
    }
}

typedef void (*block8_fn)(const uint8_t*, int, int, const int8_t*, int, const float*, const float*, float*, int, int);

static block8_fn pick8(int path, int rows) {
    static const block8_fn vnni[8] = {block_vnni8<1>, block_vnni8<2>, block_vnni8<3>, block_vnni8<4>,
                                      block_vnni8<5>, block_vnni8<6>, block_vnni8<7>, block_vnni8<8>};
    static const block8_fn avx2[4] = {block_avx2_8<1, false>, block_avx2_8<2, false>, block_avx2_8<3, false>,
                                      block_avx2_8<4, false>};
    static const block8_fn avx_vnni[4] = {block_avx2_8<1, true>, block_avx2_8<2, true>, block_avx2_8<3, true>,
                                          block_avx2_8<4, true>};
    return for_path(path, rows, vnni, avx2, avx_vnni);
}

// int8 codes -> the same values plus 128 as unsigned bytes, in place (the top bit flipped).
__attribute__((target("avx2"))) static void flip_codes(int8_t* q, int n) {
    const __m256i top = _mm256_set1_epi8((char)0x80);
    int k = 0;
    for (; k + 32 <= n; k += 32)
        _mm256_storeu_si256((__m256i*)(q + k), _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(q + k)), top));
    for (; k < n; ++k) q[k] = (int8_t)(q[k] ^ 0x80);
}

// The activations' int8 codes and per-group sums, in the calling thread's buffer (reused across
// calls); the threads of a parallel region share its pointers.  A row of codes takes ld = K + 64
// bytes: with K a multiple of 4 KiB, rows K apart would share their L1 sets, and the 8 rows a
// kernel reads together would evict one another.
struct Codes {
    int8_t* xq;
    float *sx, *xs, *corr;
    int K, G, ng, ld;
    Codes(int M, int K_, int G_) : K(K_), G(G_), ng(K_ / G_), ld(K_ + 64) {
        static thread_local std::vector<uint8_t> scratch;
        const size_t codes = (size_t)M * ld;
        scratch.resize(codes + sizeof(float) * 3 * (size_t)M * ng);
        xq = (int8_t*)scratch.data();
        sx = (float*)(scratch.data() + codes);
        xs = sx + (size_t)M * ng;
        corr = xs + (size_t)M * ng;
    }
    // Quantizes group i of the M * ng (row-major) of x, as unsigned codes (+128) with ``offset``;
    // each one is independent of the others.
    void fill(const float* x, int i, bool offset) const {
        const int m = i / ng, g = i % ng;
        int8_t* out = xq + (size_t)m * ld + (size_t)g * G;
        quantize_group(x + (size_t)m * K + (size_t)g * G, G, out, sx + i, xs + i, corr + i);
        if (offset) flip_codes(out, G);
    }
};

// A product over a weight in ceil(N / 16) blocks of 16 output rows: quantizes x's rows once, then
// calls block(codes, b, span, m0, rows, ncols) for each unit of ``span`` adjacent blocks from
// block b (pairs of full blocks where span is 2, the rest one by one) and pass of rows
// m0..m0+rows-1, the units shared among the threads.
template <class Block>
static void over_blocks(int path, const float* x, int M, int K, int G, int N, bool offset, int span, Block block) {
    const Codes c(M, K, G);
    const int blocks = (N + 15) / 16;
    const int pairs = span == 2 ? N / 32 : 0;
    const int units = blocks - pairs;
    const int per_pass = rows_per_pass(path);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int i = 0; i < M * c.ng; ++i) c.fill(x, i, offset);
#pragma omp for schedule(static)
        for (int u = 0; u < units; ++u) {
            const int b = u < pairs ? 2 * u : u + pairs, n = u < pairs ? 2 : 1;
            const int ncols = N - 16 * b < 16 ? N - 16 * b : 16;
            for (int m0 = 0; m0 < M; m0 += per_pass) block(c, b, n, m0, M - m0 < per_pass ? M - m0 : per_pass, ncols);
        }
    }
}

extern "C" {

// y[M, N] = x[M, K] @ W^T for a weight packed in ceil(N / 16) blocks.  Returns 0, or -1 when the
// path cannot run here.
int csm_int4_matmul(int path, const float* x, int M, int K, int G, const void* weights, int N, float* y) {
    const uint8_t* w = (const uint8_t*)weights;
    if (!csm_int4_cpu_has(path) || K % G != 0 || G % 8 != 0) return -1;
    const int ng = K / G;
    const size_t stride = (size_t)ng * group_bytes(G);
    const int span = blocks_per_pass(path, M);
    over_blocks(path, x, M, K, G, N, false, span, [&](const Codes& c, int b, int n, int m0, int rows, int ncols) {
        const int8_t* xq = c.xq + (size_t)m0 * c.ld;
        const size_t at = (size_t)m0 * ng;
        float* out = y + (size_t)m0 * N + 16 * b;
        if (n == 2)
            pick_pair(rows)(w + b * stride, stride, K, G, xq, c.ld, c.sx + at, c.xs + at, c.corr + at, out, N);
        else
            pick(path, rows)(w + b * stride, K, G, xq, c.ld, c.sx + at, c.xs + at, c.corr + at, out, N, ncols);
    });
    return 0;
}

// y[M, N] = (x[M, K] @ W^T) * scales for an int8 weight in pack_int8's layout (ceil(N / 16)
// blocks) and its float32 scales [N], with activations quantized to int8 per row and group of G
// (unsigned codes on the VNNI paths).  Returns 0, or -1 when the path cannot run here.
int csm_int8_matmul(int path, const float* x, int M, int K, int G, const uint8_t* w, const float* scales, int N,
                    float* y) {
    if (!csm_int4_cpu_has(path) || K % G != 0 || G % 8 != 0) return -1;
    const int ng = K / G;
    const size_t stride = (size_t)ng * group_bytes8(G);
    const bool unsigned_codes = path == PATH_AVX512_VNNI || path == PATH_AVX_VNNI;
    over_blocks(path, x, M, K, G, N, unsigned_codes, 1, [&](const Codes& c, int b, int, int m0, int rows, int ncols) {
        pick8(path, rows)(w + b * stride, K, G, c.xq + (size_t)m0 * c.ld, c.ld, c.sx + (size_t)m0 * ng,
                          scales + 16 * b, y + (size_t)m0 * N + 16 * b, N, ncols);
    });
    return 0;
}

// An int8 weight as csm_step's products get it: pack_int8's blocks and the float32 scales [N].
struct Int8Weight {
    const uint8_t* weight;
    const float* scales;
};

// csm_int8_matmul in csm_int4_matmul's signature, for csm_step: ``weights`` points to an Int8Weight
// and ``G`` is the activation group.
int csm_int8_product(int path, const float* x, int M, int K, int G, const void* weights, int N, float* y) {
    const Int8Weight* w = (const Int8Weight*)weights;
    return csm_int8_matmul(path, x, M, K, G, w->weight, w->scales, N, y);
}

}  // extern "C"

// ---- One transformer step ------------------------------------------------------------------------
//
// A whole decoding step of a Llama-style stack (RMSNorm, fused QKV, rotate-half RoPE, grouped-query
// attention over a KV cache, output projection, SwiGLU) in one call: a step of the depth decoder is
// about 1.3 ms of int4 weights, and ~30 eager torch operations per layer cost as much again.  The
// residual stream stays in float32.  The products are the caller's kernel, any function with
// csm_int4_matmul's signature (csm_int4_matmul itself, or csmcli's bf16 kernel's csm_bf16_product).

typedef int (*product_fn)(int path, const float* x, int M, int K, int arg, const void* w, int N, float* y);

namespace {

// Multiply-adds of a step's attention from which its heads are shared among the threads.
constexpr int64_t PARALLEL_ATTENTION = 8192;

__attribute__((target("avx2,fma"))) inline float dot(const float* a, const float* b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float lanes[8], s = 0.f;
    _mm256_storeu_ps(lanes, acc);
    for (int j = 0; j < 8; ++j) s += lanes[j];
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

// e^x for a vector, Cephes' single-precision polynomial (about 1 ulp), inputs clamped to finite results.
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// out[m] = x[m] * rsqrt(mean(x[m]^2) + eps) * w, as F.rms_norm followed by the weight.
__attribute__((target("avx2,fma"))) void rms_norm(const float* x, float* out, int M, int D, const float* w, float eps) {
    for (int m = 0; m < M; ++m) {
        const float* v = x + (size_t)m * D;
        const float r = 1.f / sqrtf(dot(v, v, D) / (float)D + eps);
        for (int i = 0; i < D; ++i) out[(size_t)m * D + i] = v[i] * r * w[i];
    }
}

// act[m, i] = silu(gu[m, i]) * gu[m, F + i]: the gate is the first half of the fused product.
__attribute__((target("avx2,fma"))) void swiglu(const float* gu, float* act, int M, int F) {
    if (F % 8) {
        for (int m = 0; m < M; ++m)
            for (int i = 0; i < F; ++i) {
                const float g = gu[(size_t)m * 2 * F + i];
                act[(size_t)m * F + i] = g / (1.f + expf(-g)) * gu[(size_t)m * 2 * F + F + i];
            }
        return;
    }
    const int64_t chunks = (int64_t)M * F / 8;
#pragma omp parallel for schedule(static) if (chunks >= 512)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t m = c * 8 / F, i = c * 8 % F;
        const float* g = gu + (size_t)m * 2 * F + i;
        const __m256 gv = _mm256_loadu_ps(g), uv = _mm256_loadu_ps(g + F);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(act + (size_t)m * F + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e)), uv));
    }
}

__attribute__((target("avx2,fma"))) inline void axpy(float a, const float* x, float* y, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(_mm256_set1_ps(a), _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; ++i) y[i] += a * x[i];
}

// The residual connection: x += o over n floats.
inline void add_into(float* x, const float* o, size_t n) {
    for (size_t i = 0; i < n; ++i) x[i] += o[i];
}

inline float bf16_value(uint16_t v) {
    const uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline uint16_t bf16_round(float f) {  // to nearest even, as torch converts
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64);  // NaN stays NaN
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// A cache row of head_dim values (float32 or bfloat16) read into / written from floats.
struct CacheView {
    char* base;
    int bf16;
    const int64_t* strides;  // in elements: layer, key/value, slot, head, position
    size_t at(int l, int kv, int b, int h, int64_t p) const {
        return (size_t)(l * strides[0] + kv * strides[1] + b * strides[2] + h * strides[3] + p * strides[4]) *
               (bf16 ? 2 : 4);
    }
    void put(size_t off, const float* v, int n) const {
        if (bf16)
            for (int i = 0; i < n; ++i) ((uint16_t*)(base + off))[i] = bf16_round(v[i]);
        else
            memcpy(base + off, v, sizeof(float) * n);
    }
    void get(size_t off, float* v, int n) const {
        if (bf16)
            for (int i = 0; i < n; ++i) v[i] = bf16_value(((const uint16_t*)(base + off))[i]);
        else
            memcpy(v, base + off, sizeof(float) * n);
    }
};

}  // namespace

extern "C" {

// x[B*T, dim] (float32, rows of slot b at positions pos[b*T + t]) through n_layers blocks and the
// final norm, in place.  Each row attends to its slot's cached keys at positions 0..pos, after its
// own key and value are written there.  weights: per layer wqkv, wo, w13, w2 in the layout of
// product, which gets path and args[0..3] (the int4 kernel's input groups) with them; norms: per
// layer the attention and feed-forward norm weights, then the final one (float32); cos, sin: RoPE
// tables [positions, head_dim], sin with rotate-half's sign folded in.  Returns 0, or -1 when this
// CPU lacks the AVX2 path's instructions (csm_int4_cpu_has(1)) or a product cannot run here.
int csm_step(product_fn product, int path, int n_layers, int dim, int n_heads, int n_kv, int head_dim, int ffn,
             float eps, const void* const* weights, const int* args, const float* const* norms, const float* cos,
             const float* sin, float* x, int B, int T, const int64_t* pos, void* cache, int cache_bf16,
             const int64_t* strides) {
    if (!csm_int4_cpu_has(1) || n_kv <= 0 || n_heads % n_kv) return -1;
    const int M = B * T, qd = n_heads * head_dim, kvd = n_kv * head_dim, nqkv = qd + 2 * kvd, half = head_dim / 2;
    static thread_local std::vector<float> h, qkv, att, o, gu, act;
    h.resize((size_t)M * dim);
    qkv.resize((size_t)M * nqkv);
    att.resize((size_t)M * qd);
    o.resize((size_t)M * dim);
    gu.resize((size_t)M * 2 * ffn);
    act.resize((size_t)M * ffn);
    const CacheView kv{(char*)cache, cache_bf16, strides};
    int64_t longest = 0;
    for (int r = 0; r < M; ++r) longest = pos[r] > longest ? pos[r] : longest;
    const float scale = 1.f / sqrtf((float)head_dim);
    for (int l = 0; l < n_layers; ++l) {
        const void* const* w = weights + 4 * l;
        rms_norm(x, h.data(), M, dim, norms[2 * l], eps);
        if (product(path, h.data(), M, dim, args[0], w[0], nqkv, qkv.data())) return -1;
        for (int r = 0; r < M; ++r) {  // RoPE on query and key heads, then this row's key and value into the cache
            float* row = qkv.data() + (size_t)r * nqkv;
            const float* c = cos + pos[r] * head_dim;
            const float* s = sin + pos[r] * head_dim;
            for (int j = 0; j < n_heads + n_kv; ++j) {
                float* v = row + j * head_dim;
                for (int i = 0; i < half; ++i) {
                    const float a = v[i], b = v[i + half];
                    v[i] = a * c[i] + b * s[i];
                    v[i + half] = b * c[i + half] + a * s[i + half];
                }
            }
            for (int j = 0; j < n_kv; ++j) {
                kv.put(kv.at(l, 0, r / T, j, pos[r]), row + qd + j * head_dim, head_dim);
                kv.put(kv.at(l, 1, r / T, j, pos[r]), row + qd + kvd + j * head_dim, head_dim);
            }
        }
        const int per_kv = n_heads / n_kv;
        const float* qs = qkv.data();  // the buffers are this thread's: other threads get the pointers
        float* outs = att.data();
#pragma omp parallel if ((int64_t)M * n_heads * (longest + 1) * head_dim >= PARALLEL_ATTENTION)
        {
            std::vector<float> scores(longest + 1), key(head_dim), acc(head_dim);
#pragma omp for schedule(static)
            for (int c = 0; c < M * n_heads; ++c) {
                const int r = c / n_heads, j = c % n_heads, b = r / T;
                const float* q = qs + (size_t)r * nqkv + j * head_dim;
                const int64_t keys = pos[r] + 1;
                float top = -INFINITY;
                for (int64_t p = 0; p < keys; ++p) {
                    kv.get(kv.at(l, 0, b, j / per_kv, p), key.data(), head_dim);
                    scores[p] = dot(q, key.data(), head_dim) * scale;
                    top = scores[p] > top ? scores[p] : top;
                }
                float total = 0.f;
                for (int64_t p = 0; p < keys; ++p) total += scores[p] = expf(scores[p] - top);
                for (int i = 0; i < head_dim; ++i) acc[i] = 0.f;
                for (int64_t p = 0; p < keys; ++p) {
                    kv.get(kv.at(l, 1, b, j / per_kv, p), key.data(), head_dim);
                    axpy(scores[p] / total, key.data(), acc.data(), head_dim);
                }
                memcpy(outs + (size_t)r * qd + j * head_dim, acc.data(), sizeof(float) * head_dim);
            }
        }
        if (product(path, att.data(), M, qd, args[1], w[1], dim, o.data())) return -1;
        add_into(x, o.data(), (size_t)M * dim);
        rms_norm(x, h.data(), M, dim, norms[2 * l + 1], eps);
        if (product(path, h.data(), M, dim, args[2], w[2], 2 * ffn, gu.data())) return -1;
        swiglu(gu.data(), act.data(), M, ffn);
        if (product(path, act.data(), M, ffn, args[3], w[3], dim, o.data())) return -1;
        add_into(x, o.data(), (size_t)M * dim);
    }
    rms_norm(x, x, M, dim, norms[2 * n_layers], eps);
    return 0;
}

}  // extern "C"

// ---- A frame's depth-decoder steps ---------------------------------------------------------------
//
// Steps 1..31 of csmcli.model.CSMModel.decode_frame in one call: each step's stack (csm_step), the
// codebook's head, sampling, and the next step's input (the code's embedding through the
// projection).  Between them a bfloat16 model's values are rounded to bfloat16 where the eager
// step's tensors are (stack output, logits, projection output), so the codes are the eager step's.

namespace {

// One matrix: a product of csm_step's kind, the path and argument it takes, its weight.
struct Matrix {
    product_fn product;
    int path, arg, out_features;
    const void* weight;
};

// A transformer as csm_step takes it.
struct Stack {
    product_fn product;
    int path, n_layers, dim, n_heads, n_kv, head_dim, ffn;
    float eps;
    const void* const* weights;
    const int* args;
    const float* const* norms;
    const float *cos, *sin;
};

}  // namespace

extern "C" {

// csmcli.sampling.sample's inputs for rows 0..B-1 (csmcli.qkernel.Sampling fills it): the rows'
// settings, the frame's keys [rows, codebooks], the per-code hashes, recent codes [rows, window,
// codebooks] (null: no penalty), the candidates k and which rules any row uses.
struct Sampling {
    const float* temperature;
    const int64_t* top_k;
    const float* top_p;
    const float* penalty;
    const int64_t* keys;
    int64_t keys_stride;
    const int64_t* hashes;
    const int64_t* recent;
    int64_t recent_strides[3];
    int window, k, num_codes, top_p_rule, greedy_rule;
};

struct Depth {
    Stack stack;
    const Matrix* heads;  // codebooks - 1
    Matrix projection;
    const void* embeddings;  // [codebooks * vocab, embedding_dim], float32 or bfloat16
    int embeddings_bf16, embedding_dim, vocab, codebooks, round_bf16;
};

}  // extern "C"

namespace {

inline uint64_t mix32(uint64_t x) {  // csmcli.sampling._mix32
    const uint64_t m = 0xFFFFFFFFull;
    x &= m;
    x ^= x >> 16;
    x = (x * 0x7FEB352Dull) & m;
    x ^= x >> 15;
    x = (x * 0x846CA68Bull) & m;
    return x ^ (x >> 16);
}

inline void round_bf16(float* v, size_t n) {
    for (size_t i = 0; i < n; ++i) v[i] = bf16_value(bf16_round(v[i]));
}

typedef std::pair<float, int64_t> Candidate;

// The k best scores first, as torch.topk orders them on the CPU (the same algorithms with the
// same comparison), so that ties fall as they do there.
void top_k(std::vector<Candidate>& q, int k) {
    const auto better = [](const Candidate& a, const Candidate& b) {
        return (std::isnan(a.first) && !std::isnan(b.first)) || a.first > b.first;
    };
    if ((int64_t)k * 64 <= (int64_t)q.size()) {
        std::partial_sort(q.begin(), q.begin() + k, q.end(), better);
    } else {
        std::nth_element(q.begin(), q.begin() + (k - 1), q.end(), better);
        std::sort(q.begin(), q.begin() + (k - 1), better);
    }
}

// One row's code from its logits, by csmcli.sampling.sample's rules.
int64_t sample_row(const Sampling& s, int b, int codebook, const float* logits) {
    const int n = s.num_codes;
    const float temperature = s.temperature[b] < 1e-5f ? 1e-5f : s.temperature[b];
    static thread_local std::vector<Candidate> q;
    static thread_local std::vector<char> seen;
    seen.assign(n, 0);
    if (s.recent)
        for (int w = 0; w < s.window; ++w) {
            const int64_t c = s.recent[b * s.recent_strides[0] + w * s.recent_strides[1] + codebook * s.recent_strides[2]];
            if (c >= 0 && c < n) seen[c] = 1;
        }
    const float p = s.penalty[b];
    q.resize(n);
    for (int c = 0; c < n; ++c) {
        float l = logits[c];
        if (seen[c]) l = l > 0.f ? l / p : l * p;
        q[c] = Candidate(l / temperature, c);
    }
    const int k = s.k < 1 ? 1 : s.k > n ? n : s.k;
    top_k(q, k);
    static thread_local std::vector<char> keep;
    keep.resize(k);
    for (int j = 0; j < k; ++j) keep[j] = j < s.top_k[b];
    if (s.top_p_rule) {  // the mass of the better candidates, from a softmax over the kept ones
        static thread_local std::vector<float> probs;
        probs.resize(k);
        float top = -INFINITY, total = 0.f;
        for (int j = 0; j < k; ++j)
            if (keep[j] && q[j].first > top) top = q[j].first;
        for (int j = 0; j < k; ++j) total += probs[j] = keep[j] ? expf(q[j].first - top) : 0.f;
        double mass = 0.0;  // torch's cumsum adds in double on the CPU
        for (int j = 0; j < k; ++j) {
            probs[j] /= total;
            mass += probs[j];
            const float before = (float)mass - probs[j];
            keep[j] = keep[j] && (before < s.top_p[b] || s.top_p[b] >= 1.f);
        }
    }
    const uint64_t key = (uint64_t)s.keys[b * s.keys_stride + codebook];
    int pick = 0;
    float best = -INFINITY;
    for (int j = 0; j < k; ++j) {
        if (!keep[j]) continue;
        const uint64_t bits = mix32(key ^ (uint64_t)s.hashes[q[j].second]);
        const float u = ((float)(bits >> 8) + 0.5f) * (1.f / (1 << 24));
        const float v = q[j].first + -logf(-logf(u));
        if (v > best) best = v, pick = j;
    }
    if (s.greedy_rule && (s.temperature[b] == 0.f || s.top_k[b] == 1)) return q[0].second;
    return q[pick].second;
}

}  // namespace

extern "C" {

// codes[b] for rows b < B of logits [B, ld] (their first num_codes) and codebook: sample_row.
void csm_sample(const Sampling* s, const float* logits, int64_t ld, int B, int codebook, int64_t* codes) {
    for (int b = 0; b < B; ++b) codes[b] = sample_row(*s, b, codebook, logits + b * ld);
}

// Codes of codebooks 1..codebooks-1 into codes[b * codes_stride + i] for rows b < B, from x [B, 2,
// dim] (float32: step 1's two rows, the backbone state and codebook 0's embedding through the
// projection); the depth decoder's cache as csm_step takes it.  Returns 0, or -1 as csm_step does.
int csm_depth(const Depth* d, const Sampling* s, const float* x, int B, void* cache, int cache_bf16,
              const int64_t* strides, int64_t* codes, int64_t codes_stride) {
    const Stack& st = d->stack;
    const int dim = st.dim, vocab_out = d->heads[0].out_features, e = d->embedding_dim;
    static thread_local std::vector<float> rows, last, logits, embedded;
    static thread_local std::vector<int64_t> pos;
    rows.assign(x, x + (size_t)B * 2 * dim);
    last.resize((size_t)B * dim);
    logits.resize((size_t)B * vocab_out);
    embedded.resize((size_t)B * e);
    pos.resize((size_t)B * 2);
    for (int i = 1; i < d->codebooks; ++i) {
        const int T = i == 1 ? 2 : 1;
        for (int b = 0; b < B; ++b)
            for (int t = 0; t < T; ++t) pos[b * T + t] = i == 1 ? t : i;
        if (csm_step(st.product, st.path, st.n_layers, dim, st.n_heads, st.n_kv, st.head_dim, st.ffn, st.eps, st.weights,
                     st.args, st.norms, st.cos, st.sin, rows.data(), B, T, pos.data(), cache, cache_bf16, strides))
            return -1;
        for (int b = 0; b < B; ++b) memcpy(&last[(size_t)b * dim], &rows[((size_t)b * T + T - 1) * dim], sizeof(float) * dim);
        if (d->round_bf16) round_bf16(last.data(), last.size());
        const Matrix& head = d->heads[i - 1];
        if (head.product(head.path, last.data(), B, dim, head.arg, head.weight, vocab_out, logits.data())) return -1;
        if (d->round_bf16) round_bf16(logits.data(), logits.size());
        for (int b = 0; b < B; ++b) {
            const int64_t code = sample_row(*s, b, i, &logits[(size_t)b * vocab_out]);
            codes[b * codes_stride + i] = code;
            const size_t row = (size_t)(code + (int64_t)i * d->vocab) * e;
            float* out = &embedded[(size_t)b * e];
            if (d->embeddings_bf16)
                for (int c = 0; c < e; ++c) out[c] = bf16_value(((const uint16_t*)d->embeddings)[row + c]);
            else
                memcpy(out, (const float*)d->embeddings + row, sizeof(float) * e);
        }
        const Matrix& proj = d->projection;
        if (proj.product(proj.path, embedded.data(), B, e, proj.arg, proj.weight, dim, rows.data())) return -1;
        if (d->round_bf16) round_bf16(rows.data(), (size_t)B * dim);
    }
    return 0;
}

}  // extern "C"
