// Forward + backward of one micro-batch into the trainer's gradient accumulators (A and B only), in
// one of two ways that give the same gradients:
//
//  - one graph: ggml's autodiff over the whole model, which keeps every activation the backward needs
//    until the backward reaches it;
//  - gradient checkpointing: the forward runs block by block and keeps only the block inputs
//    x_0 .. x_{n_layer} (each ne = [n_embd, N]). The LM head and the loss run over chunks of loss rows
//    and give d x_{n_layer}. Then, from the top, block i is rebuilt from x_i and differentiated through
//    the surrogate loss sum(block_out ⊙ d x_{i+1}), whose gradient at block_out is exactly d x_{i+1};
//    that yields d x_i and the gradients of the block's A and B. Peak memory is one block's graph.
#include "glora_internal.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <cstring>
#include <unordered_map>
#include <unordered_set>

int32_t glora_graph_alloc(glora_model * m, ggml_cgraph * gf) {
    ggml_backend_sched_reset(m->sched);
    if (!ggml_backend_sched_alloc_graph(m->sched, gf)) {
        return glora_fail(GLORA_ERR_OUT_OF_MEMORY, "could not allocate the compute graph (%d nodes) on %s",
                          ggml_graph_n_nodes(gf), m->be.device_name.c_str());
    }
    return GLORA_OK;
}

int32_t glora_graph_compute(glora_model * m, ggml_cgraph * gf) {
    const ggml_status st = ggml_backend_sched_graph_compute(m->sched, gf);
    if (st != GGML_STATUS_SUCCESS) {
        return glora_fail(GLORA_ERR_BACKEND, "graph compute failed on %s (ggml status %d)", m->be.device_name.c_str(), (int) st);
    }
    return GLORA_OK;
}

void glora_trainer_release_checkpoints(glora_trainer * t) {
    if (t->buf_ckpt) ggml_backend_buffer_free(t->buf_ckpt);
    if (t->ctx_ckpt) ggml_free(t->ctx_ckpt);
    t->buf_ckpt = nullptr;
    t->ctx_ckpt = nullptr;
    t->ckpt.clear();
    t->dx[0] = t->dx[1] = nullptr;
    t->ckpt_rows = 0;
}

namespace {

struct graph_ctx {
    ggml_context * ctx;
    explicit graph_ctx(size_t n_nodes) : ctx(glora_graph_ctx(n_nodes)) {}
    ~graph_ctx() { ggml_free(ctx); }
};

// Node budget of a checkpointed graph (one block, or the head): ~40 forward nodes plus 6 per LoRA pair,
// about three times that with the backward.
constexpr size_t GRAPH_SIZE_BLOCK = 4096;

// ggml's backward of y = mul_mat(W, x) gives dx = out_prod(W, transpose(dy)) = Wᵀ·dy. Through a frozen
// weight we compute the same product as mul_mat(Wᵀ, dy) with the model's transposed working copy.
void use_transposed_weights(const glora_model * model, ggml_cgraph * gf) {
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (node->op != GGML_OP_OUT_PROD || node->src[1]->op != GGML_OP_TRANSPOSE) continue;
        ggml_tensor * wt = model->transposed(node->src[0]);   // [n_out, n_in]
        if (!wt) continue;
        ggml_tensor * dy = node->src[1]->src[0];        // [n_out, T]
        if (wt->ne[0] != dy->ne[0] || node->ne[0] != wt->ne[1] || node->ne[1] != dy->ne[1]) continue;
        node->op = GGML_OP_MUL_MAT;                     // -> [n_in, T], the shape out_prod had
        memset(node->op_params, 0, sizeof(node->op_params));
        node->src[0] = wt;
        node->src[1] = dy;
    }
}

using acc_map = std::unordered_map<const ggml_tensor *, ggml_tensor *>;

// A and B accumulate their gradient in place into the trainer's buffers
acc_map accumulators(const glora_trainer * t) {
    acc_map acc;
    for (size_t i = 0; i < t->params_t.size(); ++i) acc[t->params_t[i]] = t->grad[i];
    return acc;
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
        for (int64_t i0 = b0; i0 < e0; ++i0) {
            for (int64_t i1 = b1; i1 < e1; ++i1) {
                d[i0 * n1 + i1] = *(const float *) (s + i0 * src->nb[0] + i1 * src->nb[1]);
            }
        }
    }
}

// The operand of mul_mat that stands for t in out_prod: tᵀ, contiguous (a transposed view is undone).
ggml_tensor * transposed_operand(const glora_model * m, ggml_context * ctx, ggml_tensor * t) {
    if (t->op == GGML_OP_TRANSPOSE && ggml_is_contiguous(t->src[0])) return t->src[0];
    if (!ggml_backend_is_cpu(m->be.main) || t->type != GGML_TYPE_F32) return ggml_cont(ctx, ggml_transpose(ctx, t));
    ggml_tensor * args[] = {t};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, t->ne[1], t->ne[0], t->ne[2], t->ne[3], args, 1, transpose_f32,
                          GGML_N_TASKS_MAX, nullptr);
}


// The nodes of gf, in order, in a new graph; expanding each pulls in the nodes a rewrite gave it.
ggml_cgraph * in_order(ggml_context * ctx, ggml_cgraph * gf, size_t graph_size) {
    ggml_cgraph * out = ggml_new_graph_custom(ctx, graph_size, false);
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) ggml_build_forward_expand(out, ggml_graph_node(gf, i));
    return out;
}

// Adds the backward of `loss` to *gf (params accumulate into acc) and returns the loss seed, an input
// set to 1 so that the accumulators are not reset by ggml_graph_reset. *gf may be replaced by a graph
// of the same computation with faster ops.
//
// The loss is built unweighted (a sum over rows, so the gradient of every logit row is O(1)) and the
// contributions to the parameters' accumulators are scaled by `param_scale` (the loss weight) as they
// are added, in F32. Weighting the loss itself (1/tokens) made the activation gradients so small that
// the backward products, which round them to F16 against the F16 weight copies, lost them to
// underflow: on SmolLM2 4x256 the LoRA gradients came out 20-30% off PyTorch's, and training lagged.
ggml_tensor * build_backward(const glora_model * m, ggml_context * ctx, ggml_cgraph ** gf, size_t graph_size,
                             ggml_tensor * loss, const acc_map & acc, const glora_trainer * t, float param_scale) {
    std::vector<ggml_tensor *> grad_accs((size_t) ggml_graph_n_nodes(*gf), nullptr);
    for (int i = 0; i < ggml_graph_n_nodes(*gf); ++i) {
        auto it = acc.find(ggml_graph_node(*gf, i));
        if (it != acc.end()) grad_accs[(size_t) i] = it->second;
    }
    ggml_build_backward_expand(ctx, *gf, grad_accs.data());
    use_transposed_weights(m, *gf);
    ggml_tensor * seed = ggml_graph_get_grad(*gf, loss);
    ggml_set_input(seed);
    const std::unordered_set<const ggml_tensor *> params(t->grad.begin(), t->grad.end());
    bool scaled = false;
    for (int i = 0; i < ggml_graph_n_nodes(*gf); ++i) {
        ggml_tensor * node = ggml_graph_node(*gf, i);
        if (node->op != GGML_OP_ADD || !params.count(node->view_src)) continue;   // acc += contribution
        ggml_tensor * contrib = node->src[1];
        if (!ggml_is_contiguous(contrib)) contrib = ggml_cont(ctx, contrib);
        node->src[1] = ggml_scale(ctx, contrib, param_scale);
        scaled = true;
    }
    if (scaled) *gf = in_order(ctx, *gf, graph_size);
    *gf = glora_faster_products(m, ctx, *gf, graph_size);
    return seed;
}

void set_one(ggml_tensor * t) {
    const float one = 1.0f;
    ggml_backend_tensor_set(t, &one, 0, sizeof(one));
}

float read_scalar(const ggml_tensor * t) {
    float v = 0.0f;
    ggml_backend_tensor_get(t, &v, 0, sizeof(v));
    return v;
}

// Runs a graph; with `measure` set only plans its allocation and keeps the largest compute buffer.
struct executor {
    glora_model        * m;
    size_t             * measure;
    ggml_backend_sched_t plan;      // a scheduler of its own for measuring: a no-alloc plan left in the
                                    // model's scheduler makes its next allocation reuse a buffer it never made

    template <class F> int32_t operator()(ggml_cgraph * gf, F && set_inputs) {
        if (measure) {
            std::vector<size_t> sizes(m->be.backends.size(), 0);
            ggml_backend_sched_reserve_size(plan, gf, sizes.data());
            size_t total = 0;
            for (size_t s : sizes) total += s;
            *measure = std::max(*measure, total);
            return GLORA_OK;
        }
        int32_t rc = glora_graph_alloc(m, gf);
        if (rc) return rc;
        set_inputs();
        return glora_graph_compute(m, gf);
    }
};

glora_graph_options training_options(const glora_trainer * t) {
    glora_graph_options opt;
    opt.adapters.push_back({t->adapter, 1.0f});
    opt.dropout = t->params.dropout;
    opt.expand_gqa = true;
    opt.attn_chunk = GLORA_ATTN_CHUNK;
    opt.f16_weights = t->params.f16_weights != 0;
    return opt;
}

int32_t backward_one_graph(glora_trainer * t, const glora_batch * batch, float loss_weight, uint64_t dropout_seed,
                           double * out_loss_sum, size_t * measure, ggml_backend_sched_t plan) {
    glora_model * m = t->adapter->model;
    graph_ctx g(m->graph_size);
    glora_graph_inputs in;
    ggml_tensor * logits = glora_build_forward(g.ctx, m, batch, training_options(t), true, &in);
    ggml_tensor * loss = glora_build_loss(g.ctx, logits, 1.0f, &in);
    ggml_set_loss(loss);
    ggml_cgraph * gf = ggml_new_graph_custom(g.ctx, m->graph_size, true);
    ggml_build_forward_expand(gf, loss);
    ggml_tensor * seed = build_backward(m, g.ctx, &gf, m->graph_size, loss, accumulators(t), t, loss_weight);
    int32_t rc = executor{m, measure, plan}(gf, [&] {
        glora_graph_set_inputs(m, batch, in, dropout_seed);
        set_one(seed);
    });
    if (rc || measure) return rc;
    *out_loss_sum = (double) read_scalar(loss);
    return GLORA_OK;
}

int32_t ensure_checkpoints(glora_trainer * t, int64_t n_rows) {
    if (t->ckpt_rows == n_rows) return GLORA_OK;
    glora_trainer_release_checkpoints(t);
    const glora_model * m = t->adapter->model;
    const int n = m->hp.n_layer + 1;
    ggml_init_params ip = { ggml_tensor_overhead() * (size_t) (n + 3), nullptr, true };
    t->ctx_ckpt = ggml_init(ip);
    for (int i = 0; i < n; ++i) {
        t->ckpt.push_back(ggml_new_tensor_2d(t->ctx_ckpt, GGML_TYPE_F32, m->n_embd, n_rows));
        ggml_format_name(t->ckpt.back(), "ckpt.x%d", i);
    }
    for (int i = 0; i < 2; ++i) {
        t->dx[i] = ggml_new_tensor_2d(t->ctx_ckpt, GGML_TYPE_F32, m->n_embd, n_rows);
        ggml_format_name(t->dx[i], "ckpt.dx%d", i);
    }
    t->buf_ckpt = ggml_backend_alloc_ctx_tensors_from_buft(t->ctx_ckpt, m->be.bufts[0]);
    if (!t->buf_ckpt) {
        glora_trainer_release_checkpoints(t);
        return glora_fail(GLORA_ERR_OUT_OF_MEMORY, "could not allocate %d checkpoints of [%lld, %lld] on %s", n,
                          (long long) m->n_embd, (long long) n_rows, m->be.device_name.c_str());
    }
    t->ckpt_rows = n_rows;
    return GLORA_OK;
}


bool block_has_pairs(const glora_adapter * a, const glora_layer & L) {
    for (const ggml_tensor * w : {L.wq, L.wk, L.wv, L.wo, L.ffn_gate, L.ffn_up, L.ffn_down}) {
        if (a->find(w)) return true;
    }
    return false;
}

int32_t backward_checkpointed(glora_trainer * t, const glora_batch * batch, float loss_weight, uint64_t dropout_seed,
                              double * out_loss_sum, size_t * measure, ggml_backend_sched_t plan) {
    glora_model * m = t->adapter->model;
    const int n_layer = m->hp.n_layer;
    int32_t rc = ensure_checkpoints(t, (int64_t) batch->n_seq * batch->n_tokens);
    if (rc) return rc;
    glora_host_inputs host;
    if (!measure) glora_host_inputs_build(batch, batch->n_tokens, &host);
    executor exec{m, measure, plan};
    const glora_graph_options base = training_options(t);

    // forward: x_0 = the token embeddings, x_{i+1} = block_i(x_i); nothing else is kept
    for (int il = -1; il < n_layer; ++il) {
        graph_ctx g(GRAPH_SIZE_BLOCK);
        glora_graph_options opt = base;
        opt.head = false;
        opt.layer_begin = opt.layer_end = il < 0 ? 0 : il;
        if (il >= 0) {
            opt.layer_end = il + 1;
            opt.x_in = glora_bind(g.ctx, t->ckpt[(size_t) il]);
        }
        glora_graph_inputs in;
        ggml_tensor * y = glora_build_forward(g.ctx, m, batch, opt, false, &in);
        ggml_tensor * out = ggml_cpy(g.ctx, y, t->ckpt[(size_t) (il + 1)]);
        ggml_cgraph * gf = ggml_new_graph_custom(g.ctx, GRAPH_SIZE_BLOCK, false);
        ggml_build_forward_expand(gf, out);
        gf = glora_faster_products(m, g.ctx, gf, GRAPH_SIZE_BLOCK);   // the products the recompute runs
        if ((rc = exec(gf, [&] { glora_graph_set_inputs(m, batch, in, dropout_seed, &host); }))) return rc;
    }

    // LM head and loss over chunks of loss rows; d x_{n_layer} accumulates in dx[n_layer % 2]
    ggml_tensor * d_top = t->dx[n_layer & 1];
    if (!measure) ggml_backend_tensor_memset(d_top, 0, 0, ggml_nbytes(d_top));
    const int64_t chunk = glora_head_chunk_rows(m);
    double loss_sum = 0.0;
    for (int64_t r0 = 0; r0 < batch->n_loss; r0 += chunk) {
        glora_batch sub = *batch;
        sub.loss_rows += r0;
        sub.labels    += r0;
        sub.n_loss     = (int32_t) std::min<int64_t>(chunk, batch->n_loss - r0);
        graph_ctx g(GRAPH_SIZE_BLOCK);
        glora_graph_options opt = base;
        opt.layer_begin = opt.layer_end = n_layer;
        opt.loss_row0 = r0;
        opt.x_in = glora_bind(g.ctx, t->ckpt[(size_t) n_layer]);
        ggml_set_param(opt.x_in);
        glora_graph_inputs in;
        ggml_tensor * logits = glora_build_forward(g.ctx, m, &sub, opt, true, &in);
        ggml_tensor * loss = glora_build_loss(g.ctx, logits, 1.0f, &in);
        ggml_set_loss(loss);
        ggml_cgraph * gf = ggml_new_graph_custom(g.ctx, GRAPH_SIZE_BLOCK, true);
        ggml_build_forward_expand(gf, loss);
        acc_map acc = accumulators(t);
        acc[opt.x_in] = d_top;
        ggml_tensor * seed = build_backward(m, g.ctx, &gf, GRAPH_SIZE_BLOCK, loss, acc, t, loss_weight);
        if ((rc = exec(gf, [&] {
                 glora_graph_set_inputs(m, &sub, in, dropout_seed, &host);
                 set_one(seed);
             }))) {
            return rc;
        }
        if (!measure) loss_sum += (double) read_scalar(loss);
    }

    // blocks from the top: recompute block i from x_i, backward from sum(block_out ⊙ d x_{i+1})
    for (int il = n_layer - 1; il >= 0; --il) {
        const bool need_dx = il > 0;   // x_0 is the embedding lookup, which has no LoRA
        if (!need_dx && !block_has_pairs(t->adapter, m->layers[(size_t) il])) continue;
        graph_ctx g(GRAPH_SIZE_BLOCK);
        glora_graph_options opt = base;
        opt.head = false;
        opt.layer_begin = il;
        opt.layer_end = il + 1;
        opt.x_in = glora_bind(g.ctx, t->ckpt[(size_t) il]);
        if (need_dx) ggml_set_param(opt.x_in);
        glora_graph_inputs in;
        ggml_tensor * y = glora_build_forward(g.ctx, m, batch, opt, false, &in);   // [n_embd, N]
        ggml_tensor * dy = glora_bind(g.ctx, t->dx[(size_t) ((il + 1) & 1)]);
        ggml_tensor * loss = ggml_sum(g.ctx, ggml_mul(g.ctx, y, dy));
        ggml_set_name(loss, "surrogate_loss");
        ggml_set_loss(loss);
        ggml_cgraph * gf = ggml_new_graph_custom(g.ctx, GRAPH_SIZE_BLOCK, true);
        ggml_build_forward_expand(gf, loss);
        acc_map acc = accumulators(t);
        ggml_tensor * dx = t->dx[(size_t) (il & 1)];
        if (need_dx) acc[opt.x_in] = dx;
        ggml_tensor * seed = build_backward(m, g.ctx, &gf, GRAPH_SIZE_BLOCK, loss, acc, t, loss_weight);
        if ((rc = exec(gf, [&] {
                 if (need_dx) ggml_backend_tensor_memset(dx, 0, 0, ggml_nbytes(dx));
                 glora_graph_set_inputs(m, batch, in, dropout_seed, &host);
                 set_one(seed);
             }))) {
            return rc;
        }
    }
    if (!measure) *out_loss_sum = loss_sum;
    return GLORA_OK;
}

}  // namespace

// ggml's CPU out_prod in F32 is a loop of axpy's of length ne0 over rows, several times slower than its
// mul_mat kernels (the attention backward spent ~14% of a step there), and far slower for short rows
// (LoRA's rank: d(A·x) = Bᵀ·d(B·A·x) has rows of `rank` floats). out_prod(a, b) sums over dim 1 of both,
// mul_mat over dim 0, so out_prod(a, b) = mul_mat(aᵀ, bᵀ), with the same broadcast of a over b's dims 2
// and 3. Products with long rows but a short side (dA: [n_in, rank]) or a short sum (K = rank) stay as
// they are: there the axpy's are long and a transpose would cost more than it saves.
// Returns gf, or a new graph with the transposes in order when any node changed.
ggml_cgraph * glora_faster_products(const glora_model * m, ggml_context * ctx, ggml_cgraph * gf, size_t graph_size) {
    constexpr int64_t min_dim = 32;
    const bool cpu = ggml_backend_is_cpu(m->be.main);
    bool changed = false;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (node->op != GGML_OP_OUT_PROD) continue;
        ggml_tensor * a = node->src[0];
        ggml_tensor * b = node->src[1];
        if (a->type != GGML_TYPE_F32 || b->type != GGML_TYPE_F32) continue;
        if (a->ne[1] < min_dim || (node->ne[0] >= min_dim && node->ne[1] < min_dim)) continue;
        node->src[0] = transposed_operand(m, ctx, a);   // [K, a.ne0, a.ne2, a.ne3]
        node->src[1] = transposed_operand(m, ctx, b);   // [K, b.ne0, b.ne2, b.ne3]
        node->op = GGML_OP_MUL_MAT;                     // -> [a.ne0, b.ne0, b.ne2, b.ne3], out_prod's shape
        memset(node->op_params, 0, sizeof(node->op_params));
        changed = true;
    }
    // The other way round for LoRA's B·(A·x): a mul_mat whose dot products are `rank` long runs at a
    // few GFLOP/s on the CPU, while out_prod does it as `rank` long axpy's per output column.
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (node->op != GGML_OP_MUL_MAT || !cpu) continue;
        ggml_tensor * x = node->src[0];                 // [K, M]
        ggml_tensor * y = node->src[1];                 // [K, N]
        if (x->type != GGML_TYPE_F32 || y->type != GGML_TYPE_F32 || ggml_n_dims(x) > 2 || ggml_n_dims(y) > 2) continue;
        if (x->ne[0] >= min_dim || node->ne[0] < min_dim || node->ne[1] < min_dim) continue;
        node->src[0] = transposed_operand(m, ctx, x);   // [M, K], contiguous
        node->src[1] = ggml_transpose(ctx, y);          // [N, K], a view
        node->op = GGML_OP_OUT_PROD;                    // -> [M, N], mul_mat's shape
        memset(node->op_params, 0, sizeof(node->op_params));
        changed = true;
    }
    return changed ? in_order(ctx, gf, graph_size) : gf;
}

int32_t glora_trainer_backward(glora_trainer * trainer, const glora_batch * batch, float loss_weight,
                               uint64_t dropout_seed, double * out_loss_sum, size_t * measure) {
    glora_model * m = trainer->adapter->model;
    ggml_backend_sched_t plan = nullptr;
    if (measure) {
        plan = ggml_backend_sched_new(m->be.backends.data(), m->be.bufts.data(), (int) m->be.backends.size(),
                                      m->graph_size, false, true);
        if (!plan) return glora_fail(GLORA_ERR_BACKEND, "could not create a scheduler to measure with");
    }
    const int32_t rc = trainer->params.gradient_checkpointing
        ? backward_checkpointed(trainer, batch, loss_weight, dropout_seed, out_loss_sum, measure, plan)
        : backward_one_graph(trainer, batch, loss_weight, dropout_seed, out_loss_sum, measure, plan);
    if (plan) ggml_backend_sched_free(plan);
    return rc;
}

// Loss rows per LM-head chunk, so that its logits, labels and their gradient stay near 3 × 64 MiB.
int64_t glora_head_chunk_rows(const glora_model * m) {
    return std::max<int64_t>(16, ((int64_t) 64 << 20) / (m->n_vocab * (int64_t) sizeof(float)));
}

// A graph leaf that is the persistent tensor t (same buffer and data), so a graph reads it, or as a
// param accumulates into it, without a copy. A leaf of its own because params must have op NONE.
ggml_tensor * glora_bind(ggml_context * ctx, const ggml_tensor * t) {
    ggml_tensor * x = ggml_new_tensor(ctx, t->type, GGML_MAX_DIMS, t->ne);
    ggml_backend_tensor_alloc(t->buffer, x, t->data);
    ggml_format_name(x, "%s.leaf", t->name);
    return x;
}
