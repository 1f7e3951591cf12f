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

// Every F32 out_prod of gf (on the CPU backend) runs as out_prod_f32, in place: same nodes, same order.
void glora_out_prods(const glora_model * m, ggml_context * ctx, ggml_cgraph * gf) {
    if (!ggml_backend_is_cpu(m->be.main)) return;
    ggml_tensor * tmpl = nullptr;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (fits_out_prod(node)) glora_as_custom(ctx, node, &tmpl, out_prod_f32, nullptr);
    }
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
bool glora_cross_entropy_ops(const glora_model * m, ggml_context * ctx, ggml_cgraph * gf) {
    if (!ggml_backend_is_cpu(m->be.main)) return false;
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

