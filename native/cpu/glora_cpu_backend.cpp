// The CPU backend's table of hooks (glora_backend_ops): what a model on ggml's CPU backend runs beyond
// ggml's own ops. Custom ops run on the CPU only, so this table is chosen only when the model's device
// is the CPU (glora_backends_init); the kernels themselves are glora_cpu_kernels.cpp and glora_amx.cpp.
//
// The rewrites, in the order glora_faster_products applies them to a training or loss graph:
//   1. products of short dot products (LoRA's B·(A·x), K = rank) become out_prod  (this file)
//   2. the cross-entropy and its gradient read token ids, not one-hot labels       (glora_cross_entropy_ops)
//   3. F32 out_prods run as our kernel                                             (glora_out_prods)
//   4. products through F16/BF16/F32 working copies on CPUs without AVX-512: FMA   (glora_fma_products)
//   5. with bf16 (AMX-BF16 tiles): products through BF16 copies and hinted ones     (glora_amx_products)
// and, when the backward needs them, transient transposed weights (dequantize_transpose) and tiled F32
// transposes (transpose_f32).
#include "glora_internal.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <cstring>

namespace {

// dst = wᵀ in dst's type (F16, BF16 or F32), from a weight w of any type with ne = [n_in, n_out]:
// dst ne = [n_out, n_in]. The CPU op of the transient transposed copies. A tile is 32 rows of w by 256
// columns (a multiple of every block size). w in dst's 2-byte type (an F16 forward copy) is moved as
// 16-bit words, bit for bit what converting through F32 gives; other types are dequantized into a
// 32 KiB buffer on the stack (no heap allocation inside ggml's worker threads) and each of dst's rows
// gets its 32 values through ggml's vectorized row conversion. Either way a tile writes one cache line
// per row of dst. (The per-value scalar conversion this replaces took 15% of an F16-copy step.)
void dequantize_transpose(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * w = dst->src[0];
    constexpr int64_t rows = 32, cols = 256;
    const int64_t n_in = w->ne[0], n_out = w->ne[1];
    if (w->type == dst->type && ggml_type_size(w->type) == 2 && ggml_blck_size(w->type) == 1) {
        for (int64_t r0 = (int64_t) ith * rows; r0 < n_out; r0 += (int64_t) nth * rows) {
            const int64_t nr = std::min(rows, n_out - r0);
            for (int64_t c0 = 0; c0 < n_in; c0 += cols) {
                const int64_t nc = std::min(cols, n_in - c0);
                for (int64_t i = 0; i < nc; ++i) {
                    auto * d = (uint16_t *) ((char *) dst->data + (c0 + i) * dst->nb[1] + r0 * dst->nb[0]);
                    const char * src = (const char *) w->data + r0 * w->nb[1] + (c0 + i) * w->nb[0];
                    for (int64_t r = 0; r < nr; ++r) d[r] = *(const uint16_t *) (src + r * w->nb[1]);
                }
            }
        }
        return;
    }
    const auto * traits = ggml_get_type_traits(w->type);
    float buf[rows * cols];
    float col[rows];
    for (int64_t r0 = (int64_t) ith * rows; r0 < n_out; r0 += (int64_t) nth * rows) {
        const int64_t nr = std::min(rows, n_out - r0);
        for (int64_t c0 = 0; c0 < n_in; c0 += cols) {
            const int64_t nc = std::min(cols, n_in - c0);    // a whole number of blocks: n_in is
            for (int64_t r = 0; r < nr; ++r) {
                const char * src = (const char *) w->data + (r0 + r) * w->nb[1] + c0 / traits->blck_size * traits->type_size;
                if (w->type == GGML_TYPE_F32) memcpy(buf + r * cols, src, (size_t) nc * sizeof(float));
                else traits->to_float(src, buf + r * cols, nc);
            }
            for (int64_t i = 0; i < nc; ++i) {
                char * d = (char *) dst->data + (c0 + i) * dst->nb[1] + r0 * dst->nb[0];
                for (int64_t r = 0; r < nr; ++r) col[r] = buf[r * cols + i];
                switch (dst->type) {
                    case GGML_TYPE_F16:  ggml_cpu_fp32_to_fp16(col, (ggml_fp16_t *) d, nr); break;
                    case GGML_TYPE_BF16: ggml_cpu_fp32_to_bf16(col, (ggml_bf16_t *) d, nr); break;
                    default:             memcpy(d, col, (size_t) nr * sizeof(float)); break;
                }
            }
        }
    }
}

// dst = src with dims 0 and 1 swapped, F32, dst contiguous; src may have any strides. In square tiles,
// so that reads and writes both stay within a few cache lines (ggml's cont of a transposed view reads
// element by element across rows: ~1 GB/s, 17% of a 2048-token step).
void transpose_f32(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * src = dst->src[0];
    constexpr int64_t tile = 32;
    const int64_t n0 = src->ne[0], n1 = src->ne[1], n2 = src->ne[2], n3 = src->ne[3];
    const int64_t t0 = (n0 + tile - 1) / tile, t1 = (n1 + tile - 1) / tile;
    const int64_t n_tiles = t0 * t1 * n2 * n3;
    for (int64_t t = ith; t < n_tiles; t += nth) {
        const int64_t i3 = t / (t0 * t1 * n2), i2 = t / (t0 * t1) % n2;
        const int64_t b1 = t / t0 % t1 * tile, b0 = t % t0 * tile;
        const char * s = (const char *) src->data + i2 * src->nb[2] + i3 * src->nb[3];
        float * d = (float *) ((char *) dst->data + i2 * dst->nb[2] + i3 * dst->nb[3]);
        const int64_t e0 = std::min(b0 + tile, n0), e1 = std::min(b1 + tile, n1);
        if (src->nb[0] == sizeof(float)) {
            glora_transpose_tile(s + b0 * src->nb[0] + b1 * src->nb[1], src->nb[1], d + b0 * n1 + b1, n1, e0 - b0, e1 - b1);
            continue;
        }
        for (int64_t i0 = b0; i0 < e0; ++i0) {
            for (int64_t i1 = b1; i1 < e1; ++i1) {
                d[i0 * n1 + i1] = *(const float *) (s + i0 * src->nb[0] + i1 * src->nb[1]);
            }
        }
    }
}

bool amx_tiles() { return glora_amx_available(); }

ggml_tensor * cpu_transposed_weight(ggml_context * ctx, ggml_tensor * w, ggml_type out_type) {
    ggml_tensor * args[] = {w};
    return ggml_custom_4d(ctx, out_type, w->ne[1], w->ne[0], 1, 1, args, 1, dequantize_transpose, GGML_N_TASKS_MAX,
                          nullptr);
}

ggml_tensor * cpu_transposed_f32(ggml_context * ctx, ggml_tensor * t) {
    ggml_tensor * args[] = {t};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, t->ne[1], t->ne[0], t->ne[2], t->ne[3], args, 1, transpose_f32,
                          GGML_N_TASKS_MAX, nullptr);
}

ggml_cgraph * cpu_rewrite(const glora_model * m, ggml_context * ctx, ggml_cgraph * gf, size_t graph_size, bool stale) {
    constexpr int64_t min_dim = 32;
    bool changed = stale;
    // LoRA's B·(A·x): a mul_mat whose dot products are `rank` long runs at a few GFLOP/s on the CPU, while
    // out_prod does it as `rank` long axpy's per output column.
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (node->op != GGML_OP_MUL_MAT) continue;
        ggml_tensor * x = node->src[0];                 // [K, M]
        ggml_tensor * y = node->src[1];                 // [K, N]
        if (x->type != GGML_TYPE_F32 || y->type != GGML_TYPE_F32 || ggml_n_dims(x) > 2 || ggml_n_dims(y) > 2) continue;
        if (x->ne[0] >= min_dim || node->ne[0] < min_dim || node->ne[1] < min_dim) continue;
        node->src[0] = x->op == GGML_OP_TRANSPOSE && ggml_is_contiguous(x->src[0]) ? x->src[0]
                                                                                     : cpu_transposed_f32(ctx, x);   // [M, K]
        node->src[1] = ggml_transpose(ctx, y);          // [N, K], a view
        node->op = GGML_OP_OUT_PROD;                    // -> [M, N], mul_mat's shape
        memset(node->op_params, 0, sizeof(node->op_params));
        changed = true;
    }
    changed = glora_cross_entropy_ops(ctx, gf) || changed;
    if (changed) gf = glora_graph_in_order(ctx, gf, graph_size);
    glora_out_prods(ctx, gf);         // in place: the same nodes, the same order
    glora_fma_products(m, ctx, gf);   // likewise
    if (glora_amx_products(m, ctx, gf)) gf = glora_graph_in_order(ctx, gf, graph_size);   // with the rounded rows
    return gf;
}

}  // namespace

const glora_backend_ops glora_cpu_backend_ops = {
    /*.name              =*/ "CPU",
    /*.bf16_tiles        =*/ amx_tiles,
    /*.transposed_weight =*/ cpu_transposed_weight,
    /*.transposed_f32    =*/ cpu_transposed_f32,
    /*.rewrite           =*/ cpu_rewrite,
};
