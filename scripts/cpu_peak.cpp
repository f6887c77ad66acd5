// One core's peak rate for the instructions csmcli's CPU kernels are built on, in nanoseconds per
// instruction and multiply-adds per second: what bounds a batch's products once the weights are in
// cache.  x86-64 with AVX-512 VNNI and BF16 for every line; build and run:
//   g++ -O2 -mavx512f -mavx512vnni -mavx512bf16 -o /tmp/cpu_peak scripts/cpu_peak.cpp && /tmp/cpu_peak
// Each line runs eight independent accumulators, so latency does not count, only throughput.
#include <chrono>
#include <cstdio>

static double seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

#define EIGHT(op) op(0) op(1) op(2) op(3) op(4) op(5) op(6) op(7)
#define CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7"
#define ZMM(name, i) name " %%zmm30, %%zmm31, %%zmm" #i "\n"
#define YMM(name, i) name " %%ymm14, %%ymm15, %%ymm" #i "\n"
#define DPBUSD_Z(i) ZMM("vpdpbusd", i)
#define DPBUSD_Y(i) YMM("vpdpbusd", i)
#define DPBF16_Z(i) ZMM("vdpbf16ps", i)
#define FMA_Z(i) ZMM("vfmadd231ps", i)
#define FMA_Y(i) YMM("vfmadd231ps", i)
#define MADDUBS_Y(i) YMM("vpmaddubsw", i)

static const long ROUNDS = 50000000;

static void report(const char* name, double elapsed, int macs) {
    const double ns = elapsed / (ROUNDS * 8.0) * 1e9;
    std::printf("%-24s %6.3f ns each  %7.1f G multiply-adds/s\n", name, ns, macs / ns);
}

int main() {
    long n = 0;
    double t = seconds();
    for (long i = 0; i < ROUNDS * 8; ++i) asm volatile("add $1, %0" : "+r"(n));  // one cycle each
    std::printf("clock about %.2f GHz (dependent adds)\n", ROUNDS * 8 / (seconds() - t) / 1e9);
#define TIME(label, body, macs)                                              \
    t = seconds();                                                           \
    for (long i = 0; i < ROUNDS; ++i) asm volatile(EIGHT(body)::: CLOBBERS); \
    report(label, seconds() - t, macs);
    TIME("vpdpbusd zmm (int8)", DPBUSD_Z, 64)
    TIME("vpdpbusd ymm (int8)", DPBUSD_Y, 32)
    TIME("vdpbf16ps zmm (bf16)", DPBF16_Z, 32)
    TIME("vfmadd231ps zmm (f32)", FMA_Z, 16)
    TIME("vfmadd231ps ymm (f32)", FMA_Y, 8)
    TIME("vpmaddubsw ymm (int8)", MADDUBS_Y, 32)
    return 0;
}
