// The backward's F32 out_prods as a CPU custom op of our own, on every x86 class (and elsewhere).
//
// ggml's CPU out_prod (dst[i0,i1] = Σ_k a[i0,k]·b[i1,k]) zeroes the whole result on one thread, then
// adds one axpy of a's row k per (i1, k) into dst's row i1: every dst row is read and written K times.
// The out_prods a LoRA backward keeps (glora_faster_products leaves them) are of two shapes, and both
// run at 4-8 GFLOP/s there: a short sum (K = rank: d(A·x) = Aᵀ·d(ax), and B·(A·x) as an out_prod) with
// a big result ([n_in, T]), and a long sum (K = T) with a small result (dA: [n_in, rank]).
//
// Here each thread takes whole blocks of 64 x 8 results, sums them over k in a block of its own in L1
// (the same order as ggml: k ascending), and writes each result once. The short sum then reads a's K
// rows from cache and writes dst once; the long sum reads a once and keeps its 2 KiB of sums in L1.
// The loops are compiled three times (AVX-512, AVX2 + FMA, the build's baseline) and the CPU picks.
#include "glora_internal.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <cstring>

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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx512f"))) void block_avx512(const operands & o, int64_t i0, int64_t ni, int64_t j0, int64_t nj) {
    block_body(o, i0, ni, j0, nj);
}
__attribute__((target("avx2,fma"))) void block_avx2(const operands & o, int64_t i0, int64_t ni, int64_t j0, int64_t nj) {
    block_body(o, i0, ni, j0, nj);
}
#endif
void block_baseline(const operands & o, int64_t i0, int64_t ni, int64_t j0, int64_t nj) {
    block_body(o, i0, ni, j0, nj);
}

using block_fn = void (*)(const operands &, int64_t, int64_t, int64_t, int64_t);

block_fn pick() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return block_avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return block_avx2;
#endif
    return block_baseline;
}

// dst = out_prod(a, b) as ggml defines it: dst[i0,i1,i2,i3] = Σ_k a[i0,k,i2/r2,i3/r3]·b[i1,k,i2,i3];
// a's rows contiguous, b at any strides, dst contiguous (fits_out_prod).
void out_prod_f32(ggml_tensor * dst, int ith, int nth, void *) {
    static const block_fn block = pick();
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

}  // namespace

// Every F32 out_prod of gf (on the CPU backend) runs as out_prod_f32, in place: same nodes, same order.
void glora_out_prods(const glora_model * m, ggml_context * ctx, ggml_cgraph * gf) {
    if (!ggml_backend_is_cpu(m->be.main)) return;
    ggml_tensor * tmpl = nullptr;    // the op's parameters, from one template tensor per graph
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (!fits_out_prod(node)) continue;
        if (!tmpl) {
            ggml_tensor * args[] = {node->src[0], node->src[1]};
            tmpl = ggml_custom_4d(ctx, GGML_TYPE_F32, 1, 1, 1, 1, args, 2, out_prod_f32, GGML_N_TASKS_MAX, nullptr);
        }
        node->op = tmpl->op;
        memcpy(node->op_params, tmpl->op_params, sizeof(node->op_params));
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
        if (ours) {
            ggml_tensor * args[] = {y->src[0], y->src[1]};
            ggml_tensor * tmpl = ggml_custom_4d(ctx, GGML_TYPE_F32, 1, 1, 1, 1, args, 2, out_prod_f32, GGML_N_TASKS_MAX, nullptr);
            y->op = tmpl->op;
            memcpy(y->op_params, tmpl->op_params, sizeof(y->op_params));
        }
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, y);
        ggml_status st = GGML_STATUS_SUCCESS;
        for (int32_t r = 0; r < repeats && st == GGML_STATUS_SUCCESS; ++r) st = ggml_graph_compute_with_ctx(ctx, gf, n_threads);
        if (st == GGML_STATUS_SUCCESS) memcpy(out, y->data, ggml_nbytes(y));
        ggml_free(ctx);
        return st == GGML_STATUS_SUCCESS ? GLORA_OK : glora_fail(GLORA_ERR_BACKEND, "glora_selftest_out_prod: status %d", (int) st);
    });
}
