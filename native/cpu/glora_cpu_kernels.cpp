// CPU kernels of our own for ops whose ggml CPU versions are slow where a LoRA step spends its time, run
// as custom ops that take the place of ggml's nodes after the graph (and its backward) is built. The
// loops are plain C++ compiled three times (AVX-512, AVX2 + FMA, the build's baseline); the CPU picks.
//
// out_prod. ggml's (dst[i0,i1] = Σ_k a[i0,k]·b[i1,k]) zeroes the whole result on one thread, then adds
// one axpy of a's row k per (i1, k) into dst's row i1: every dst row is read and written K times. The
// out_prods a LoRA backward keeps (glora_faster_products leaves them) are of two shapes, and both run at
// 4-8 GFLOP/s there: a short sum (K = rank: d(A·x) = Aᵀ·d(ax), and B·(A·x) as an out_prod) with a big
// result ([n_in, T]), and a long sum (K = T) with a small result (dA: [n_in, rank]). Here each thread
// takes whole blocks of 64 x 8 results, sums them over k in a block of its own in L1 (the same order as
// ggml: k ascending), and writes each result once.
//
// Cross-entropy. ggml's forward and backward call the C library's expf once per logit (n_vocab per row:
// 10% of a 4x256 step on SmolLM2) and read a one-hot F32 label matrix as large as the logits. Here the
// label is a row's token id, and exp a polynomial the compiler vectorizes.

#include "glora_internal.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

// A kernel `name##_body(args)` compiled for AVX-512, AVX2 + FMA and the baseline, and `name` the one this
// CPU runs (chosen at the first call).
// A build for AVX2-only machines (GLORA_AVX2_ONLY, CMake's GGML_LORA_AVX2_ONLY) has no AVX-512 variant.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(GLORA_AVX2_ONLY)
#define GLORA_ISA_VARIANTS(name, params, args)                                                         \
    __attribute__((target("avx2,fma"))) void name##_avx2 params { name##_body args; }                  \
    void name##_base params { name##_body args; }                                                       \
    void name params {                                                                                  \
        static const auto fn = [] {                                                                     \
            __builtin_cpu_init();                                                                       \
            if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return name##_avx2;   \
            return name##_base;                                                                         \
        }();                                                                                            \
        fn args;                                                                                        \
    }
#elif defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GLORA_ISA_VARIANTS(name, params, args)                                                         \
    __attribute__((target("avx512f"))) void name##_avx512 params { name##_body args; }                 \
    __attribute__((target("avx2,fma"))) void name##_avx2 params { name##_body args; }                  \
    void name##_base params { name##_body args; }                                                       \
    void name params {                                                                                  \
        static const auto fn = [] {                                                                     \
            __builtin_cpu_init();                                                                       \
            if (__builtin_cpu_supports("avx512f")) return name##_avx512;                               \
            if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return name##_avx2;   \
            return name##_base;                                                                         \
        }();                                                                                            \
        fn args;                                                                                        \
    }
#else
#define GLORA_ISA_VARIANTS(name, params, args) void name params { name##_body args; }
#endif

namespace {

constexpr int64_t kRows = 64;   // results per block along dst's dim 0 (a's rows)
constexpr int64_t kCols = 8;    // along dst's dim 1 (b's rows)

struct operands {
    const char * a;   size_t a_k;            // a's row k at a + k·a_k (contiguous floats)
    const char * b;   size_t b_i, b_k;       // b[i1, k] at b + i1·b_i + k·b_k
    float      * d;   int64_t ld;            // dst row i1 at d + i1·ld
    int64_t      K;
};

// dst[i0 .. i0+ni, j0 .. j0+nj] of one matrix
__attribute__((always_inline)) inline void block_body(const operands & o, int64_t i0, int64_t ni, int64_t j0,
                                                      int64_t nj) {
    alignas(64) float acc[kCols][kRows];
    for (int64_t jj = 0; jj < nj; ++jj) {
        for (int64_t ii = 0; ii < kRows; ++ii) acc[jj][ii] = 0.0f;
    }
    for (int64_t k = 0; k < o.K; ++k) {
        const float * a = (const float *) (o.a + k * o.a_k) + i0;
        const char * bk = o.b + k * o.b_k;
        for (int64_t jj = 0; jj < nj; ++jj) {
            const float c = *(const float *) (bk + (j0 + jj) * o.b_i);
            float * r = acc[jj];
            if (ni == kRows) {
                for (int64_t ii = 0; ii < kRows; ++ii) r[ii] += c * a[ii];
            } else {
                for (int64_t ii = 0; ii < ni; ++ii) r[ii] += c * a[ii];
            }
        }
    }
    for (int64_t jj = 0; jj < nj; ++jj) memcpy(o.d + (j0 + jj) * o.ld + i0, acc[jj], (size_t) ni * sizeof(float));
}

GLORA_ISA_VARIANTS(block, (const operands & o, int64_t i0, int64_t ni, int64_t j0, int64_t nj), (o, i0, ni, j0, nj))

// dst = out_prod(a, b) as ggml defines it: dst[i0,i1,i2,i3] = Σ_k a[i0,k,i2/r2,i3/r3]·b[i1,k,i2,i3];
// a's rows contiguous, b at any strides, dst contiguous (fits_out_prod).
void out_prod_f32(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * a = dst->src[0];
    const ggml_tensor * b = dst->src[1];
    const int64_t n0 = dst->ne[0], n1 = dst->ne[1], n2 = dst->ne[2];
    const int64_t r2 = dst->ne[2] / a->ne[2], r3 = dst->ne[3] / a->ne[3];
    const int64_t bi = (n0 + kRows - 1) / kRows, bj = (n1 + kCols - 1) / kCols;
    const int64_t per_mat = bi * bj, n_blocks = per_mat * n2 * dst->ne[3];
    for (int64_t t = n_blocks * ith / nth; t < n_blocks * (ith + 1) / nth; ++t) {
        const int64_t mat = t / per_mat, i2 = mat % n2, i3 = mat / n2;
        const int64_t ib = (t % per_mat) % bi, jb = (t % per_mat) / bi;   // dst's dim 0 fastest
        const operands o = {(const char *) a->data + (i2 / r2) * a->nb[2] + (i3 / r3) * a->nb[3], a->nb[1],
                            (const char *) b->data + i2 * b->nb[2] + i3 * b->nb[3], b->nb[0], b->nb[1],
                            (float *) ((char *) dst->data + i2 * dst->nb[2] + i3 * dst->nb[3]),
                            (int64_t) (dst->nb[1] / sizeof(float)), a->ne[1]};
        const int64_t i0 = ib * kRows, j0 = jb * kCols;
        block(o, i0, std::min(kRows, n0 - i0), j0, std::min(kCols, n1 - j0));
    }
}

bool fits_out_prod(const ggml_tensor * node) {
    const ggml_tensor * a = node->src[0];
    const ggml_tensor * b = node->src[1];
    return node->op == GGML_OP_OUT_PROD && node->type == GGML_TYPE_F32 && a->type == GGML_TYPE_F32
        && b->type == GGML_TYPE_F32 && ggml_is_contiguous(node) && a->nb[0] == sizeof(float)
        && node->ne[2] % a->ne[2] == 0 && node->ne[3] % a->ne[3] == 0 && b->ne[2] == node->ne[2]
        && b->ne[3] == node->ne[3];
}

// ---- cross-entropy ----------------------------------------------------------------------------------


// (vf16 values never cross a call: every function that takes or returns one is inlined, so the ABI note
// GCC gives for 64-byte vectors without AVX-512 does not apply)
#pragma GCC diagnostic ignored "-Wpsabi"

// 16 floats as one value: GCC and Clang lower the operators to whatever vectors the function's target
// has (one AVX-512 register, two AVX2 ones, four SSE ones), with no intrinsics.
typedef float   vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
constexpr int64_t kRun = 512;  // logits per float partial sum before it joins the row's double sum

__attribute__((always_inline)) inline vf16 load16(const float * p) {
    vf16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

// e^x for x <= 0 (a logit minus its row's maximum), to about 1 ulp: x = n·ln2 + r with |r| <= ln2/2 (n
// rounded by adding and subtracting 1.5·2^23), e^r by its Taylor polynomial of degree 7 (remainder below
// 1e-8 relative), 2^n into the exponent bits. Below -87.3 (where e^x leaves float's normal range, and
// for -inf: a masked entry) it gives 0, a term that cannot change a sum that holds e^0 = 1.
__attribute__((always_inline)) inline vf16 exp_nonpositive(vf16 x) {
    const vf16 lo = vf16{} - 87.3f;
    const vi16 under = x < lo;
    x = under ? lo : x;
    const vf16 n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
    const vf16 r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
    vf16 p = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
    const vf16 e = p * (vf16) bits;
    return under ? vf16{} : e;
}

// A row's maximum and Σ e^(x - max): the sum in float lanes over runs of kRun logits, the runs in double
// (ggml sums in double too). The tail past the last 16 is padded with -inf (e^-inf = 0).
__attribute__((always_inline)) inline void row_stats_body(const float * x, int64_t n, float * out_max, double * out_sum) {
    const int64_t whole = n / kLanes * kLanes;
    alignas(64) float tail[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) tail[l] = whole + l < n ? x[whole + l] : -INFINITY;
    vf16 m = load16(tail);
    for (int64_t i = 0; i < whole; i += kLanes) {
        const vf16 v = load16(x + i);
        m = v > m ? v : m;
    }
    float mx = m[0];
    for (int l = 1; l < kLanes; ++l) mx = std::max(mx, m[l]);
    double sum = 0.0;
    for (int64_t r0 = 0; r0 < whole; r0 += kRun) {
        vf16 acc = {};
        for (int64_t j = r0; j < std::min(whole, r0 + kRun); j += kLanes) acc += exp_nonpositive(load16(x + j) - mx);
        for (int l = 0; l < kLanes; ++l) sum += (double) acc[l];
    }
    if (whole < n) {
        const vf16 e = exp_nonpositive(load16(tail) - mx);
        for (int64_t l = 0; l < n - whole; ++l) sum += (double) e[l];
    }
    *out_max = mx;
    *out_sum = sum;
}
GLORA_ISA_VARIANTS(row_stats, (const float * x, int64_t n, float * out_max, double * out_sum), (x, n, out_max, out_sum))

// dst[i] = c·e^(x[i] - mx)
__attribute__((always_inline)) inline void scaled_exp_body(const float * x, int64_t n, float mx, float c, float * dst) {
    const int64_t whole = n / kLanes * kLanes;
    for (int64_t i = 0; i < whole; i += kLanes) {
        const vf16 e = exp_nonpositive(load16(x + i) - mx) * c;
        memcpy(dst + i, &e, sizeof e);
    }
    if (whole < n) {
        alignas(64) float tail[kLanes] = {};
        for (int64_t l = 0; l < n - whole; ++l) tail[l] = x[whole + l];
        const vf16 e = exp_nonpositive(load16(tail) - mx) * c;
        for (int64_t l = 0; l < n - whole; ++l) dst[whole + l] = e[l];
    }
}
GLORA_ISA_VARIANTS(scaled_exp, (const float * x, int64_t n, float mx, float c, float * dst), (x, n, mx, c, dst))

// dst[r] = CE of logits row r (src[0]: [n_vocab, n_rows]) against token src[1][r] (I32), divided by
// n_rows: ggml's cross_entropy_loss is the SUM of these (the mean over rows).
void ce_rows(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * logits = dst->src[0];
    const auto * ids = (const int32_t *) dst->src[1]->data;
    const int64_t V = logits->ne[0], nr = logits->ne[1];
    for (int64_t r = nr * ith / nth; r < nr * (ith + 1) / nth; ++r) {
        const float * x = (const float *) ((const char *) logits->data + r * logits->nb[1]);
        float mx;
        double sum;
        row_stats(x, V, &mx, &sum);
        ((float *) dst->data)[r] = (float) (((double) mx + std::log(sum) - (double) x[ids[r]]) / (double) nr);
    }
}

// ggml's cross_entropy_loss_back with a token per row: dst = (softmax(logits) - onehot(ids))·d / n_rows,
// d the loss's gradient (src[0]), logits src[1], ids src[2].
void ce_back(ggml_tensor * dst, int ith, int nth, void *) {
    const float d = *(const float *) dst->src[0]->data;
    const ggml_tensor * logits = dst->src[1];
    const auto * ids = (const int32_t *) dst->src[2]->data;
    const int64_t V = logits->ne[0], nr = logits->ne[1];
    const float d_by_nr = d / (float) nr;
    for (int64_t r = nr * ith / nth; r < nr * (ith + 1) / nth; ++r) {
        const float * x = (const float *) ((const char *) logits->data + r * logits->nb[1]);
        float * g = (float *) ((char *) dst->data + r * dst->nb[1]);
        float mx;
        double sum;
        row_stats(x, V, &mx, &sum);
        scaled_exp(x, V, mx, (float) (d_by_nr / sum), g);
        g[ids[r]] -= d_by_nr;
    }
}

// A tile of a transpose: d[i0·ld + i1] = the float at s + i0·4 + i1·ls, for i0 < n0, i1 < n1. In 8x8
// blocks: eight 8-float loads along i0, three rounds of shuffles, eight 8-float stores along i1 (the
// scalar loop this replaces read one float per cache line it touched: 6% of a BF16 step on AMX).
typedef float vf8 __attribute__((vector_size(32)));
__attribute__((always_inline)) inline void transpose_tile_body(const char * s, size_t ls, float * d, int64_t ld,
                                                               int64_t n0, int64_t n1) {
    int64_t w0 = 0, w1 = 0;     // the whole 8x8 blocks: i0 < w0, i1 < w1
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
    w0 = n0 / 8 * 8;
    w1 = n1 / 8 * 8;
    for (int64_t i1 = 0; i1 < w1; i1 += 8) {
        for (int64_t i0 = 0; i0 < w0; i0 += 8) {
            vf8 r[8], u[8];
            for (int j = 0; j < 8; ++j) memcpy(&r[j], s + (size_t) (i1 + j) * ls + (size_t) i0 * 4, sizeof(vf8));
            for (int j = 0; j < 8; j += 2) {        // pairs of rows interleaved
                u[j]     = __builtin_shufflevector(r[j], r[j + 1], 0, 8, 1, 9, 4, 12, 5, 13);
                u[j + 1] = __builtin_shufflevector(r[j], r[j + 1], 2, 10, 3, 11, 6, 14, 7, 15);
            }
            for (int j = 0; j < 8; j += 4) {        // then pairs of pairs: four rows of one column per half
                r[j]     = __builtin_shufflevector(u[j], u[j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
                r[j + 1] = __builtin_shufflevector(u[j], u[j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
                r[j + 2] = __builtin_shufflevector(u[j + 1], u[j + 3], 0, 1, 8, 9, 4, 5, 12, 13);
                r[j + 3] = __builtin_shufflevector(u[j + 1], u[j + 3], 2, 3, 10, 11, 6, 7, 14, 15);
            }
            for (int c = 0; c < 4; ++c) {           // halves of rows 0-3 and 4-7: columns c and c + 4
                const vf8 lo = __builtin_shufflevector(r[c], r[c + 4], 0, 1, 2, 3, 8, 9, 10, 11);
                const vf8 hi = __builtin_shufflevector(r[c], r[c + 4], 4, 5, 6, 7, 12, 13, 14, 15);
                memcpy(d + (i0 + c) * ld + i1, &lo, sizeof lo);
                memcpy(d + (i0 + c + 4) * ld + i1, &hi, sizeof hi);
            }
        }
    }
#endif
#endif
    for (int64_t i0 = 0; i0 < n0; ++i0) {
        for (int64_t i1 = i0 < w0 ? w1 : 0; i1 < n1; ++i1) {
            memcpy(d + i0 * ld + i1, s + (size_t) i1 * ls + (size_t) i0 * 4, sizeof(float));
        }
    }
}
GLORA_ISA_VARIANTS(transpose_tile, (const char * s, size_t ls, float * d, int64_t ld, int64_t n0, int64_t n1),
                   (s, ls, d, ld, n0, n1))

}  // namespace

void glora_transpose_tile(const char * s, size_t ls, float * d, int64_t ld, int64_t n0, int64_t n1) {
    transpose_tile(s, ls, d, ld, n0, n1);
}

void glora_as_custom(ggml_context * ctx, ggml_tensor * node, ggml_tensor ** tmpl, ggml_custom_op_t fn, void * userdata) {
    if (!*tmpl) {
        ggml_tensor * args[] = {node->src[0]};
        *tmpl = ggml_custom_4d(ctx, GGML_TYPE_F32, 1, 1, 1, 1, args, 1, fn, GGML_N_TASKS_MAX, userdata);
    }
    node->op = (*tmpl)->op;
    memcpy(node->op_params, (*tmpl)->op_params, sizeof(node->op_params));
}

// ---- products through F16 / BF16 / F32 working copies, on CPUs without AVX-512 ------------------------
//
// ggml multiplies an F16 matrix by rounding x to F16 and converting both sides to F32 inside its inner
// loop (llamafile's tinyBLAS); on an AVX2 CPU that ran at 70 GFLOP/s on two cores where MKL's sgemm,
// PyTorch's, ran at 110-125, and these products are three quarters of an F16-copy step. Here w's rows are
// converted once into an F32 panel that stays in L1/L2 (16 rows of w, k interleaved: panel[k][16]) and a
// 6 x 16 register block of dst accumulates over a run of k from x's F32 rows and the panel: 12 FMAs for
// 2 panel loads and 6 broadcasts, as BLAS kernels do. x is not rounded (F32 throughout: closer to the
// exact product than ggml's F16 path).

typedef float vf8 __attribute__((vector_size(32)));

constexpr int64_t kPanel = 16;      // rows of w (columns of dst) per panel
constexpr int64_t kPanels = 4;      // panels that share one pass over a block of x's rows
constexpr int64_t kRunK = 256;      // k per panel (4 panels: 64 KiB)
constexpr int64_t kBlockM = 6;      // rows of x (of dst) per register block

struct fma_operands {
    const float * x;  int64_t ldx;      // x's row m at x + m·ldx
    float       * d;  int64_t ldd;      // dst's row m at d + m·ldd
};

// dst[m0 .. m0+MR, n0 .. n0+nr] (+)= x[m0 .., k0 .. k0+kc] · panel, nr <= 16
template <int MR>
__attribute__((always_inline)) inline void fma_block(const fma_operands & o, int64_t m0, int64_t k0, int64_t kc,
                                                     const float * panel, int64_t n0, int64_t nr, bool add) {
    vf8 acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = vf8{};
    const float * xr[MR];
    for (int i = 0; i < MR; ++i) xr[i] = o.x + (m0 + i) * o.ldx + k0;
    for (int64_t k = 0; k < kc; ++k) {
        vf8 b0, b1;
        memcpy(&b0, panel + k * kPanel, sizeof(b0));
        memcpy(&b1, panel + k * kPanel + 8, sizeof(b1));
        for (int i = 0; i < MR; ++i) {
            const float a = xr[i][k];
            acc[i][0] += a * b0;
            acc[i][1] += a * b1;
        }
    }
    for (int i = 0; i < MR; ++i) {
        float * d = o.d + (m0 + i) * o.ldd + n0;
        alignas(32) float r[kPanel];
        memcpy(r, &acc[i][0], sizeof(acc[i][0]));
        memcpy(r + 8, &acc[i][1], sizeof(acc[i][1]));
        if (add) {
            for (int64_t j = 0; j < nr; ++j) d[j] += r[j];
        } else {
            memcpy(d, r, (size_t) nr * sizeof(float));
        }
    }
}

// Panels [p0, p1) of dst = x · wᵀ (w: ne = [K, N] in F16, BF16 or F32; x: [K, M] F32; dst: [N, M] F32,
// rows contiguous), a run of k at a time.
__attribute__((always_inline)) inline void fma_panels_body(const ggml_tensor * w, const fma_operands & o, int64_t m_begin,
                                                           int64_t m_end, int64_t p0, int64_t p1) {
    const int64_t K = w->ne[0], N = w->ne[1];
    alignas(64) float panels[kPanels][kRunK * kPanel];
    float row[kRunK];
    for (int64_t g0 = p0; g0 < p1; g0 += kPanels) {
        const int64_t ng = std::min(kPanels, p1 - g0);
        for (int64_t k0 = 0; k0 < K; k0 += kRunK) {
            const int64_t kc = std::min(kRunK, K - k0);
            for (int64_t p = 0; p < ng; ++p) {
                for (int64_t j = 0; j < kPanel; ++j) {
                    const int64_t n = (g0 + p) * kPanel + j;
                    if (n >= N) {
                        for (int64_t k = 0; k < kc; ++k) panels[p][k * kPanel + j] = 0.0f;
                        continue;
                    }
                    const char * src = (const char *) w->data + n * w->nb[1] + k0 * w->nb[0];
                    switch (w->type) {
                        case GGML_TYPE_F16:  ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) src, row, kc); break;
                        case GGML_TYPE_BF16: ggml_cpu_bf16_to_fp32((const ggml_bf16_t *) src, row, kc); break;
                        default:             memcpy(row, src, (size_t) kc * sizeof(float)); break;
                    }
                    for (int64_t k = 0; k < kc; ++k) panels[p][k * kPanel + j] = row[k];
                }
            }
            for (int64_t m0 = m_begin; m0 < m_end; m0 += kBlockM) {
                const int64_t mr = std::min(kBlockM, m_end - m0);
                for (int64_t p = 0; p < ng; ++p) {
                    const int64_t n0 = (g0 + p) * kPanel, nr = std::min(kPanel, N - n0);
                    switch (mr) {
                        case 6: fma_block<6>(o, m0, k0, kc, panels[p], n0, nr, k0 > 0); break;
                        case 5: fma_block<5>(o, m0, k0, kc, panels[p], n0, nr, k0 > 0); break;
                        case 4: fma_block<4>(o, m0, k0, kc, panels[p], n0, nr, k0 > 0); break;
                        case 3: fma_block<3>(o, m0, k0, kc, panels[p], n0, nr, k0 > 0); break;
                        case 2: fma_block<2>(o, m0, k0, kc, panels[p], n0, nr, k0 > 0); break;
                        default: fma_block<1>(o, m0, k0, kc, panels[p], n0, nr, k0 > 0); break;
                    }
                }
            }
        }
    }
}

GLORA_ISA_VARIANTS(fma_panels, (const ggml_tensor * w, const fma_operands & o, int64_t m_begin, int64_t m_end,
                                 int64_t p0, int64_t p1), (w, o, m_begin, m_end, p0, p1))

// The custom op: dst = mul_mat(w, x) for a 2-D w and x as fits_fma() admits them. The threads split
// dst's columns by panel, or, with fewer than 4 panels per thread, x's rows in whole register blocks
// (each thread then packs every panel itself).
void fma_mul_mat(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * w = dst->src[0];
    const ggml_tensor * x = dst->src[1];
    const int64_t panels = (w->ne[1] + kPanel - 1) / kPanel, M = x->ne[1];
    const fma_operands o = {(const float *) x->data, (int64_t) (x->nb[1] / sizeof(float)), (float *) dst->data,
                            (int64_t) (dst->nb[1] / sizeof(float))};
    if (panels >= 4 * (int64_t) nth) {
        fma_panels(w, o, 0, M, panels * ith / nth, panels * (ith + 1) / nth);
        return;
    }
    const int64_t blocks = (M + kBlockM - 1) / kBlockM;
    const int64_t m_begin = blocks * ith / nth * kBlockM, m_end = std::min(M, blocks * (ith + 1) / nth * kBlockM);
    if (m_begin < m_end) fma_panels(w, o, m_begin, m_end, 0, panels);
}

bool fits_fma(const ggml_tensor * node) {
    const ggml_tensor * w = node->src[0];
    const ggml_tensor * x = node->src[1];
    return node->op == GGML_OP_MUL_MAT && node->type == GGML_TYPE_F32 && ggml_is_contiguous(node)
        && (w->type == GGML_TYPE_F16 || w->type == GGML_TYPE_BF16 || w->type == GGML_TYPE_F32)
        && x->type == GGML_TYPE_F32 && ggml_n_dims(w) <= 2 && ggml_n_dims(x) <= 2 && w->nb[0] == ggml_type_size(w->type)
        && x->nb[0] == sizeof(float) && x->ne[1] >= 16;
}

// Whether this CPU runs fma_mul_mat rather than ggml's kernels: without AVX-512 (there the kernel, in
// 256-bit vectors, ran at half of ggml's AVX-512 F16 kernel) and with AVX2 + FMA. GGML_LORA_NO_FMA=1 keeps
// ggml's kernels; GGML_LORA_FMA=1 takes ours on any CPU with AVX2 + FMA (so that tests on an AVX-512
// machine train through it too).
bool fma_preferred() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    static const bool yes = [] {
        auto set = [](const char * name) {
            const char * v = getenv(name);
            return v && *v && strcmp(v, "0") != 0;
        };
        if (set("GGML_LORA_NO_FMA")) return false;
        __builtin_cpu_init();
        if (set("GGML_LORA_FMA")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#ifdef GLORA_AVX2_ONLY
        const bool avx512 = false;
#else
        const bool avx512 = __builtin_cpu_supports("avx512f");
#endif
        return !avx512 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }();
    return yes;
#else
    return false;
#endif
}

// Every F32 out_prod of gf (on the CPU backend) runs as out_prod_f32, in place: same nodes, same order.
void glora_out_prods(ggml_context * ctx, ggml_cgraph * gf) {
    ggml_tensor * tmpl = nullptr;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (fits_out_prod(node)) glora_as_custom(ctx, node, &tmpl, out_prod_f32, nullptr);
    }
}

// The products through frozen matrices' F16, BF16 or F32 working copies (forward copies, persistent or
// transient transposed copies) and those hinted GLORA_HINT_FROZEN run as fma_mul_mat, in place, where
// fma_preferred(); not in BF16 mode (those run on AMX tiles). Graphs without hints through the stored
// weights (evaluation) keep ggml's kernels: llama.cpp's arithmetic. Returns whether anything changed.
bool glora_fma_products(const glora_model * m, ggml_context * ctx, ggml_cgraph * gf) {
    if (m->bf16 || !fma_preferred()) return false;
    ggml_tensor * tmpl = nullptr;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (node->op != GGML_OP_MUL_MAT || !fits_fma(node)) continue;
        const ggml_tensor * w = node->src[0];
        const bool marked = glora_hint_of(node) == GLORA_HINT_FROZEN;
        if (!(m->wf.source.count(w) || m->wt.source.count(w) || m->transient_copy(w) || marked)) continue;
        glora_as_custom(ctx, node, &tmpl, fma_mul_mat, nullptr);
    }
    return tmpl != nullptr;
}

// Test-only (see ggml_lora.h): out[M][N] = x[M][K] · w[N][K]ᵀ (w in F16 when w_f16, else F32) through
// fma_mul_mat (ours != 0) or ggml's mul_mat.
extern "C" GLORA_API int32_t glora_selftest_fma(const void * w, int32_t w_f16, const float * x, float * out, int64_t K,
                                                int64_t N, int64_t M, int32_t ours, int32_t n_threads) {
    return glora_guard(__func__, [&]() -> int32_t {
        glora_clear_error();
        GLORA_CHECK_ARG(w && x && out, "glora_selftest_fma: NULL argument");
        GLORA_CHECK_ARG(K > 0 && N > 0 && M >= 16 && n_threads > 0 && n_threads <= GGML_MAX_N_THREADS,
                        "glora_selftest_fma: K=%lld, N=%lld and n_threads=%d must be positive and M=%lld at least 16",
                        (long long) K, (long long) N, n_threads, (long long) M);
        const ggml_type wt = w_f16 ? GGML_TYPE_F16 : GGML_TYPE_F32;
        const size_t bytes = (size_t) (K * N) * ggml_type_size(wt) + (size_t) (2 * K * M + N * M) * 4   // + ggml's work
                           + 16 * ggml_tensor_overhead() + ggml_graph_overhead() + ((size_t) 1 << 20);
        ggml_init_params ip = {bytes, nullptr, false};
        ggml_context * ctx = ggml_init(ip);
        if (!ctx) return glora_fail(GLORA_ERR_OUT_OF_MEMORY, "glora_selftest_fma: %zu bytes", bytes);
        ggml_tensor * wm = ggml_new_tensor_2d(ctx, wt, K, N);
        ggml_tensor * xm = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, M);
        memcpy(wm->data, w, ggml_nbytes(wm));
        memcpy(xm->data, x, ggml_nbytes(xm));
        ggml_tensor * y = ggml_mul_mat(ctx, wm, xm);
        ggml_tensor * tmpl = nullptr;
        if (ours) glora_as_custom(ctx, y, &tmpl, fma_mul_mat, nullptr);
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, y);
        const ggml_status st = ggml_graph_compute_with_ctx(ctx, gf, n_threads);
        if (st == GGML_STATUS_SUCCESS) memcpy(out, y->data, ggml_nbytes(y));
        ggml_free(ctx);
        return st == GGML_STATUS_SUCCESS ? GLORA_OK : glora_fail(GLORA_ERR_BACKEND, "glora_selftest_fma: status %d", (int) st);
    });
}

// Test-only (see ggml_lora.h): out[n1][n0] = Σ_k a[k][n0]·b[k][n1] (b_transposed: b given as [n1][K]), the
// out_prod a LoRA backward runs, through ggml's kernel (ours = 0) or this file's, `repeats` times.
extern "C" GLORA_API int32_t glora_selftest_out_prod(const float * a, const float * b, float * out, int64_t n0,
                                                     int64_t n1, int64_t K, int32_t b_transposed, int32_t ours,
                                                     int32_t n_threads, int32_t repeats) {
    return glora_guard(__func__, [&]() -> int32_t {
        GLORA_CHECK_ARG(a && b && out, "glora_selftest_out_prod: NULL argument");
        GLORA_CHECK_ARG(n0 > 0 && n1 > 0 && K > 0 && n_threads > 0 && n_threads <= GGML_MAX_N_THREADS && repeats > 0,
                        "glora_selftest_out_prod: n0=%lld, n1=%lld, K=%lld, n_threads=%d and repeats=%d must be positive",
                        (long long) n0, (long long) n1, (long long) K, n_threads, repeats);
        const size_t bytes = (size_t) (n0 * K + n1 * K + n0 * n1) * 4 + 16 * ggml_tensor_overhead()
                           + ggml_graph_overhead() + ((size_t) 1 << 20);
        ggml_init_params ip = {bytes, nullptr, false};
        ggml_context * ctx = ggml_init(ip);
        if (!ctx) return glora_fail(GLORA_ERR_OUT_OF_MEMORY, "glora_selftest_out_prod: %zu bytes", bytes);
        ggml_tensor * at = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n0, K);
        ggml_tensor * bt = b_transposed ? ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, n1)
                                        : ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n1, K);
        memcpy(at->data, a, ggml_nbytes(at));
        memcpy(bt->data, b, ggml_nbytes(bt));
        ggml_tensor * y = ggml_out_prod(ctx, at, b_transposed ? ggml_transpose(ctx, bt) : bt);   // [n0, n1]
        ggml_tensor * tmpl = nullptr;
        if (ours) glora_as_custom(ctx, y, &tmpl, out_prod_f32, nullptr);
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, y);
        ggml_status st = GGML_STATUS_SUCCESS;
        for (int32_t r = 0; r < repeats && st == GGML_STATUS_SUCCESS; ++r) st = ggml_graph_compute_with_ctx(ctx, gf, n_threads);
        if (st == GGML_STATUS_SUCCESS) memcpy(out, y->data, ggml_nbytes(y));
        ggml_free(ctx);
        return st == GGML_STATUS_SUCCESS ? GLORA_OK : glora_fail(GLORA_ERR_BACKEND, "glora_selftest_out_prod: status %d", (int) st);
    });
}

// The cross-entropy of gf (glora_build_loss: ggml's op with the rows' token ids as an extra src[2]) and
// its gradient run as ce_rows + SUM and ce_back, in place; the one-hot labels are read no more (the
// caller rebuilds the graph, which drops them). Returns whether anything changed.
bool glora_cross_entropy_ops(ggml_context * ctx, ggml_cgraph * gf) {
    std::vector<std::pair<const ggml_tensor *, ggml_tensor *>> ids_of;    // one-hot labels -> token ids
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        ggml_tensor * ids = node->src[2];
        if (node->op != GGML_OP_CROSS_ENTROPY_LOSS || !ids || ids->type != GGML_TYPE_I32) continue;
        ggml_tensor * logits = node->src[0];
        if (logits->type != GGML_TYPE_F32 || logits->nb[0] != sizeof(float) || ggml_nrows(logits) != ids->ne[0]) continue;
        ggml_tensor * args[] = {logits, ids};
        ggml_tensor * rows = ggml_custom_4d(ctx, GGML_TYPE_F32, logits->ne[1], 1, 1, 1, args, 2, ce_rows,
                                            GGML_N_TASKS_MAX, nullptr);
        ids_of.emplace_back(node->src[1], ids);
        node->op = GGML_OP_SUM;
        memset(node->op_params, 0, sizeof(node->op_params));
        node->src[0] = rows;
        node->src[1] = node->src[2] = nullptr;
    }
    ggml_tensor * tmpl = nullptr;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (node->op != GGML_OP_CROSS_ENTROPY_LOSS_BACK || !ggml_is_contiguous(node)) continue;
        auto it = std::find_if(ids_of.begin(), ids_of.end(), [&](const auto & p) { return p.first == node->src[2]; });
        if (it == ids_of.end()) continue;
        glora_as_custom(ctx, node, &tmpl, ce_back, nullptr);
        node->src[2] = it->second;
    }
    return !ids_of.empty();
}

