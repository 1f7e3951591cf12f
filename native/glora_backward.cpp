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

#include <algorithm>
#include <cstring>
#include <unordered_map>

int32_t glora_graph_alloc(glora_model * m, ggml_cgraph * gf) {
    int32_t rc = glora_sched_fit(m->be, &m->sched, gf);
    if (rc) return rc;
    ggml_backend_sched_reset(m->sched.sched);
    if (!ggml_backend_sched_alloc_graph(m->sched.sched, gf)) {
        return glora_fail(GLORA_ERR_OUT_OF_MEMORY, "could not allocate the compute graph (%d nodes) on %s",
                          ggml_graph_n_nodes(gf), m->be.device_name.c_str());
    }
    m->placement.record(m->be, m->sched.sched, gf);
    return GLORA_OK;
}

int32_t glora_graph_compute(glora_model * m, ggml_cgraph * gf) {
    const ggml_status st = ggml_backend_sched_graph_compute(m->sched.sched, gf);
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

using acc_map = std::unordered_map<const ggml_tensor *, ggml_tensor *>;

// A and B accumulate their gradient in place into the trainer's buffers
acc_map accumulators(const glora_trainer * t) {
    acc_map acc;
    for (size_t i = 0; i < t->params_t.size(); ++i) acc[t->params_t[i]] = t->grad[i];
    return acc;
}

// A transposed copy of the frozen matrix w (or its F16 forward copy), ne = [n_out, n_in], made inside
// the step's graph: its memory is the compute buffer's, allocated just before the one product that
// reads it and reused by the next. The same values as the persistent copy (w dequantized to F32, then
// rounded to the copy type), so the gradients do not depend on which one ran.
ggml_tensor * transient_transposed(const glora_model * m, ggml_context * ctx, ggml_tensor * w) {
    const ggml_type type = glora_copy_type(m, m->frozen_matrix(w));
    const ggml_type out_type = m->wf.source.count(w) ? w->type : type;   // a forward copy keeps its type
    ggml_tensor * wt = m->be.ops->transposed_weight(ctx, w, out_type);
    ggml_format_name(wt, "%s.T", w->name);
    return wt;
}

// ggml's backward of y = mul_mat(W, x) gives dx = out_prod(W, transpose(dy)) = Wᵀ·dy. Through a frozen
// matrix we compute the same product as mul_mat(Wᵀ, dy): with the model's persistent transposed copy
// when it has one, else with a transient one made in this graph. An out_prod through a frozen matrix
// that is not of that form means ggml's backward changed: GLORA_ERR_INTERNAL, not a silent slow path.
int32_t use_transposed_weights(const glora_model * model, ggml_context * ctx, ggml_cgraph * gf) {
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (node->op != GGML_OP_OUT_PROD || !model->frozen_matrix(node->src[0])) continue;
        ggml_tensor * w = node->src[0];                                    // [n_in, n_out]
        ggml_tensor * dy = node->src[1]->op == GGML_OP_TRANSPOSE ? node->src[1]->src[0] : nullptr;   // [n_out, T]
        if (!dy || w->ne[1] != dy->ne[0] || node->ne[0] != w->ne[0] || node->ne[1] != dy->ne[1]) {
            return glora_fail(GLORA_ERR_INTERNAL, "backward: out_prod '%s' through weight '%s' %s with %s is not "
                              "Wᵀ·dy; ggml's backward of mul_mat changed", node->name, w->name,
                              glora_shape_str(w).c_str(), glora_shape_str(node->src[1]).c_str());
        }
        ggml_tensor * wt = model->transposed(w);                           // [n_out, n_in]
        if (!wt) wt = transient_transposed(model, ctx, w);
        node->op = GGML_OP_MUL_MAT;                     // -> [n_in, T], the shape out_prod had
        memset(node->op_params, 0, sizeof(node->op_params));
        node->src[0] = wt;
        node->src[1] = dy;
    }
    return GLORA_OK;
}

// Scales what ggml's backward adds to each LoRA parameter's accumulator (acc += contribution) by
// `scale`, in F32. Every parameter of the graph must get a contribution: if ggml's backward stopped
// accumulating that way, its gradient would silently come out unscaled (times the step's tokens).
int32_t scale_param_grads(ggml_context * ctx, ggml_cgraph * gf, const glora_trainer * t, float scale) {
    const acc_map acc = accumulators(t);
    std::unordered_map<const ggml_tensor *, bool> scaled;   // accumulator of a parameter in gf -> got a contribution
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        auto it = acc.find(ggml_graph_node(gf, i));
        if (it != acc.end()) scaled[it->second] = false;
    }
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        auto it = scaled.find(node->view_src);
        if (node->op != GGML_OP_ADD || it == scaled.end()) continue;   // acc += contribution
        ggml_tensor * contrib = node->src[1];
        if (!ggml_is_contiguous(contrib)) contrib = ggml_cont(ctx, contrib);
        node->src[1] = ggml_scale(ctx, contrib, scale);
        it->second = true;
    }
    for (const auto & [acc, done] : scaled) {
        if (!done) {
            return glora_fail(GLORA_ERR_INTERNAL, "backward: the gradient '%s' %s received no contribution to scale; "
                              "ggml's backward no longer accumulates with an add", acc->name,
                              glora_shape_str(acc).c_str());
        }
    }
    return GLORA_OK;
}

// Per-row loss weights: ggml's backward of the cross-entropy gives every logit row the gradient
// softmax - label (times the loss's seed); multiplying that [n_vocab, n_rows] gradient by w [1, n_rows]
// before anything reads it makes the parameters' gradient that of sum_r w_r CE_r. (Weighting the labels
// would not: ggml's backward assumes each label row sums to 1.) The forward's loss stays unweighted.
int32_t weight_loss_rows(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * w) {
    ggml_tensor * back = nullptr;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (node->op != GGML_OP_CROSS_ENTROPY_LOSS_BACK) continue;
        if (back) return glora_fail(GLORA_ERR_INTERNAL, "backward: two cross-entropy gradients to weight by row");
        back = node;
    }
    if (!back || back->ne[1] != w->ne[1]) {
        return glora_fail(GLORA_ERR_INTERNAL, "backward: no cross-entropy gradient of %lld rows to weight",
                          (long long) w->ne[1]);
    }
    ggml_tensor * weighted = ggml_mul(ctx, back, w);
    int n = 0;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        for (ggml_tensor *& src : node->src) {
            if (src == back) {
                src = weighted;
                ++n;
            }
        }
    }
    if (!n) return glora_fail(GLORA_ERR_INTERNAL, "backward: nothing reads the cross-entropy gradient");
    return GLORA_OK;
}

// The operand of mul_mat that stands for t in out_prod: tᵀ, contiguous (a transposed view is undone).
ggml_tensor * transposed_operand(const glora_model * m, ggml_context * ctx, ggml_tensor * t) {
    if (t->op == GGML_OP_TRANSPOSE && ggml_is_contiguous(t->src[0])) return t->src[0];
    if (t->type != GGML_TYPE_F32) return ggml_cont(ctx, ggml_transpose(ctx, t));
    return m->be.ops->transposed_f32(ctx, t);
}

// ggml's autodiff has no backward for GEGLU or tanh (ggml.c, ggml_compute_backward aborts on both), which
// gemma's FFN and softcaps use. Before ggml_build_backward_expand each such node takes, for the moment,
// an op of the same shape whose backward ggml has and whose gradient nodes can be found again; after
// it, the node gets its own op back and those gradient nodes the derivative of the real op, made of
// ops every backend has. The forward keeps llama.cpp's kernels, so its values do not change.
//  - geglu(g, u) = gelu(g)·u stands in as swiglu(g, u) = silu(g)·u, whose backward is dg = silu_back(dy·u, g)
//    and du = silu(g)·dy (ggml.c, GGML_GLU_OP_SWIGLU): silu_back(a, g) becomes a·gelu'(g), silu(g)
//    becomes gelu(g).
//  - tanh(x) stands in as exp(x), whose backward is mul(exp(x), dy) (GGML_UNARY_OP_EXP): the first
//    factor becomes 1 - tanh(x)².
struct stand_in {
    ggml_tensor * node;
    bool          geglu;     // else tanh
};

std::vector<stand_in> put_stand_ins(ggml_cgraph * gf) {
    std::vector<stand_in> out;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        int32_t * params = (int32_t *) node->op_params;
        if (node->op == GGML_OP_GLU && ggml_get_glu_op(node) == GGML_GLU_OP_GEGLU && node->src[1]) {
            params[0] = GGML_GLU_OP_SWIGLU;
            out.push_back({node, true});
        } else if (node->op == GGML_OP_UNARY && ggml_get_unary_op(node) == GGML_UNARY_OP_TANH) {
            params[0] = GGML_UNARY_OP_EXP;
            out.push_back({node, false});
        }
    }
    return out;
}

// d gelu(g) / dg of ggml's tanh approximation, gelu(g) = 0.5·g·(1 + tanh(c·g·(1 + a·g²)))
// (ggml-cpu/vec.h: GELU_COEF_A, SQRT_2_OVER_PI):
// gelu'(g) = 0.5·(1 + t) + 0.5·c·g·(1 - t²)·(1 + 3a·g²), t = tanh(c·g·(1 + a·g²))
ggml_tensor * gelu_derivative(ggml_context * ctx, ggml_tensor * g) {
    constexpr float a = 0.044715f, c = 0.79788456080286535587989211986876f;
    ggml_tensor * g2 = ggml_sqr(ctx, g);
    ggml_tensor * t  = ggml_tanh(ctx, ggml_scale(ctx, ggml_mul(ctx, g, ggml_scale_bias(ctx, g2, a, 1.0f)), c));
    ggml_tensor * dt = ggml_mul(ctx, ggml_scale_bias(ctx, ggml_sqr(ctx, t), -1.0f, 1.0f),
                                ggml_scale_bias(ctx, g2, 3.0f * a, 1.0f));
    return ggml_add(ctx, ggml_scale_bias(ctx, t, 0.5f, 0.5f), ggml_scale(ctx, ggml_mul(ctx, g, dt), 0.5f * c));
}

int32_t remove_stand_ins(ggml_context * ctx, ggml_cgraph * gf, const std::vector<stand_in> & stand_ins) {
    for (const stand_in & si : stand_ins) {
        ggml_tensor * node = si.node;
        int32_t * params = (int32_t *) node->op_params;
        params[0] = si.geglu ? GGML_GLU_OP_GEGLU : GGML_UNARY_OP_TANH;
        ggml_tensor * dy = ggml_graph_get_grad(gf, node);
        if (!dy) continue;                        // nothing below it needs a gradient
        ggml_tensor * g = node->src[0];
        ggml_tensor * deriv = nullptr;            // made once, for the first gradient node that needs it
        int found = 0;
        for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
            ggml_tensor * n = ggml_graph_node(gf, i);
            if (si.geglu && n->op == GGML_OP_SILU_BACK && n->src[1] == g) {
                if (!deriv) deriv = gelu_derivative(ctx, g);
                n->op = GGML_OP_MUL;              // (dy·u)·gelu'(g), silu_back's shape
                memset(n->op_params, 0, sizeof(n->op_params));
                n->src[1] = deriv;
                ++found;
            } else if (si.geglu && n->op == GGML_OP_UNARY && ggml_get_unary_op(n) == GGML_UNARY_OP_SILU &&
                       n->src[0] == g) {
                ((int32_t *) n->op_params)[0] = GGML_UNARY_OP_GELU;   // du = gelu(g)·dy
                ++found;
            } else if (!si.geglu && n->op == GGML_OP_MUL && n->src[0] == node && n->src[1] == dy) {
                n->src[0] = ggml_scale_bias(ctx, ggml_sqr(ctx, node), -1.0f, 1.0f);   // (1 - tanh²)·dy
                ++found;
            }
        }
        if (!found) {
            return glora_fail(GLORA_ERR_INTERNAL, "backward: no gradient node of '%s' (%s) to give its derivative; "
                              "ggml's backward of %s changed", node->name, si.geglu ? "geglu" : "tanh",
                              si.geglu ? "swiglu" : "exp");
        }
    }
    return GLORA_OK;
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
int32_t build_backward(const glora_model * m, ggml_context * ctx, ggml_cgraph ** gf, size_t graph_size,
                       ggml_tensor * loss, const acc_map & acc, const glora_trainer * t, float param_scale,
                       ggml_tensor ** seed, ggml_tensor * row_weights = nullptr) {
    std::vector<ggml_tensor *> grad_accs((size_t) ggml_graph_n_nodes(*gf), nullptr);
    for (int i = 0; i < ggml_graph_n_nodes(*gf); ++i) {
        auto it = acc.find(ggml_graph_node(*gf, i));
        if (it != acc.end()) grad_accs[(size_t) i] = it->second;
    }
    const std::vector<stand_in> stand_ins = put_stand_ins(*gf);
    ggml_build_backward_expand(ctx, *gf, grad_accs.data());
    int32_t rc = remove_stand_ins(ctx, *gf, stand_ins);
    if (rc) return rc;
    rc = use_transposed_weights(m, ctx, *gf);
    if (rc) return rc;
    if (row_weights && (rc = weight_loss_rows(ctx, *gf, row_weights))) return rc;
    *seed = ggml_graph_get_grad(*gf, loss);
    ggml_set_input(*seed);
    if ((rc = scale_param_grads(ctx, *gf, t, param_scale))) return rc;
    *gf = glora_graph_in_order(ctx, *gf, graph_size);   // with the scales
    *gf = glora_faster_products(m, ctx, *gf, graph_size);
    return GLORA_OK;
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
    glora_sched        * plan;      // a scheduler of its own for measuring: a no-alloc plan left in the
                                    // model's scheduler makes its next allocation reuse a buffer it never made

    template <class F> int32_t operator()(ggml_cgraph * gf, F && set_inputs) {
        if (measure) {
            int32_t rc = glora_sched_fit(m->be, plan, gf);
            if (rc) return rc;
            std::vector<size_t> sizes(m->be.backends.size(), 0);
            ggml_backend_sched_reserve_size(plan->sched, gf, sizes.data());
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
                           double * out_loss_sum, size_t * measure, glora_sched * plan) {
    glora_model * m = t->adapter->model;
    const glora_graph_options opt = training_options(t);
    const size_t budget = glora_graph_budget(m, batch, opt, true);
    graph_ctx g(budget);
    glora_graph_inputs in;
    ggml_tensor * logits = glora_build_forward(g.ctx, m, batch, opt, true, &in);
    ggml_tensor * loss = glora_build_loss(g.ctx, logits, 1.0f, &in, batch->loss_weights != nullptr,
                                          glora_logit_scale(batch));
    ggml_set_loss(loss);
    ggml_cgraph * gf = ggml_new_graph_custom(g.ctx, budget, true);
    ggml_build_forward_expand(gf, loss);
    ggml_tensor * seed = nullptr;
    int32_t rc = build_backward(m, g.ctx, &gf, budget, loss, accumulators(t), t, loss_weight, &seed, in.row_weights);
    if (rc) return rc;
    rc = executor{m, measure, plan}(gf, [&] {
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
    for (const ggml_tensor * w : L.projections()) {
        if (a->find(w)) return true;
    }
    return false;
}

int32_t backward_checkpointed(glora_trainer * t, const glora_batch * batch, float loss_weight, uint64_t dropout_seed,
                              double * out_loss_sum, size_t * measure, glora_sched * plan) {
    glora_model * m = t->adapter->model;
    const int n_layer = m->hp.n_layer;
    int32_t rc = ensure_checkpoints(t, (int64_t) batch->n_seq * batch->n_tokens);
    if (rc) return rc;
    glora_host_inputs host;
    const glora_graph_options base = training_options(t);
    const bool chunked = !glora_attention_chunks(batch, base).empty();    // masks of their own per chunk
    if (!measure) glora_host_inputs_build(batch, chunked ? 0 : batch->n_tokens, m->hp.n_swa, &host);
    executor exec{m, measure, plan};

    // forward: x_0 = the token embeddings, x_{i+1} = block_i(x_i); nothing else is kept
    for (int il = -1; il < n_layer; ++il) {
        glora_graph_options opt = base;
        opt.head = false;
        opt.layer_begin = opt.layer_end = il < 0 ? 0 : il;
        if (il >= 0) opt.layer_end = il + 1;
        const size_t budget = glora_graph_budget(m, batch, opt, false);
        graph_ctx g(budget);
        if (il >= 0) opt.x_in = glora_bind(g.ctx, t->ckpt[(size_t) il]);
        glora_graph_inputs in;
        ggml_tensor * y = glora_build_forward(g.ctx, m, batch, opt, false, &in);
        ggml_tensor * out = ggml_cpy(g.ctx, y, t->ckpt[(size_t) (il + 1)]);
        ggml_cgraph * gf = ggml_new_graph_custom(g.ctx, budget, false);
        ggml_build_forward_expand(gf, out);
        gf = glora_faster_products(m, g.ctx, gf, budget);   // the products the recompute runs
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
        if (sub.loss_weights) sub.loss_weights += r0;
        sub.n_loss     = (int32_t) std::min<int64_t>(chunk, batch->n_loss - r0);
        glora_graph_options opt = base;
        opt.layer_begin = opt.layer_end = n_layer;
        opt.loss_row0 = r0;
        const size_t budget = glora_graph_budget(m, &sub, opt, true);
        graph_ctx g(budget);
        opt.x_in = glora_bind(g.ctx, t->ckpt[(size_t) n_layer]);
        ggml_set_param(opt.x_in);
        glora_graph_inputs in;
        ggml_tensor * logits = glora_build_forward(g.ctx, m, &sub, opt, true, &in);
        ggml_tensor * loss = glora_build_loss(g.ctx, logits, 1.0f, &in, sub.loss_weights != nullptr,
                                              glora_logit_scale(&sub));
        ggml_set_loss(loss);
        ggml_cgraph * gf = ggml_new_graph_custom(g.ctx, budget, true);
        ggml_build_forward_expand(gf, loss);
        acc_map acc = accumulators(t);
        acc[opt.x_in] = d_top;
        ggml_tensor * seed = nullptr;
        if ((rc = build_backward(m, g.ctx, &gf, budget, loss, acc, t, loss_weight, &seed, in.row_weights))) return rc;
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
        glora_graph_options opt = base;
        opt.head = false;
        opt.layer_begin = il;
        opt.layer_end = il + 1;
        const size_t budget = glora_graph_budget(m, batch, opt, true);
        graph_ctx g(budget);
        opt.x_in = glora_bind(g.ctx, t->ckpt[(size_t) il]);
        if (need_dx) ggml_set_param(opt.x_in);
        glora_graph_inputs in;
        ggml_tensor * y = glora_build_forward(g.ctx, m, batch, opt, false, &in);   // [n_embd, N]
        ggml_tensor * dy = glora_bind(g.ctx, t->dx[(size_t) ((il + 1) & 1)]);
        ggml_tensor * loss = ggml_sum(g.ctx, ggml_mul(g.ctx, y, dy));
        ggml_set_name(loss, "surrogate_loss");
        ggml_set_loss(loss);
        ggml_cgraph * gf = ggml_new_graph_custom(g.ctx, budget, true);
        ggml_build_forward_expand(gf, loss);
        acc_map acc = accumulators(t);
        ggml_tensor * dx = t->dx[(size_t) (il & 1)];
        if (need_dx) acc[opt.x_in] = dx;
        ggml_tensor * seed = nullptr;
        if ((rc = build_backward(m, g.ctx, &gf, budget, loss, acc, t, loss_weight, &seed))) return rc;
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

// ggml's graph allocator keeps at most 256 free blocks per buffer (MAX_FREE_BLOCKS, ggml-alloc.c) and
// aborts past that. A one-graph backward keeps, for every attention chunk of every block, the tensors
// its backward reads, with freed temporaries between them, so its holes grow with blocks x chunks. On
// ggml's allocation plans (glora_trainer_measure), tiny models of 2-8 blocks failed from 268-344 block
// chunks, SmolLM2 (30 blocks) passed 480 and failed at 960; this bound stays below all of them.
// Gradient checkpointing (one block per graph) trains longer rows.
constexpr int64_t MAX_ONE_GRAPH_BLOCK_CHUNKS = 240;

int32_t check_one_graph_chunks(const glora_model * m, const glora_batch * batch, const glora_graph_options & opt) {
    const int64_t n_layer = m->hp.n_layer;
    const int64_t chunks = (batch->n_tokens + GLORA_ATTN_CHUNK - 1) / GLORA_ATTN_CHUNK;
    // a packed sequence has a chunk per sample however short (glora_attention_chunks): a micro-batch of many
    // short rows reaches the allocator's limit as one long row does (GRPO's 16 packed completions on SmolLM2)
    const int64_t actual = std::max<int64_t>(chunks, (int64_t) glora_attention_chunks(batch, opt).size());
    if (actual <= 1 || n_layer * actual <= MAX_ONE_GRAPH_BLOCK_CHUNKS) return GLORA_OK;
    if (actual > chunks) {
        return glora_fail(GLORA_ERR_UNSUPPORTED,
                          "a micro-batch packed into one sequence of %lld samples is %lld attention chunks in each "
                          "of %lld blocks, more than one training graph can hold (ggml's allocator would run out of "
                          "free blocks); use gradient checkpointing, or at most %lld rows per micro-batch",
                          (long long) actual, (long long) actual, (long long) n_layer,
                          (long long) std::max<int64_t>(1, MAX_ONE_GRAPH_BLOCK_CHUNKS / n_layer));
    }
    const int64_t fits = std::max<int64_t>(1, MAX_ONE_GRAPH_BLOCK_CHUNKS / n_layer) * GLORA_ATTN_CHUNK;
    return glora_fail(GLORA_ERR_UNSUPPORTED,
                      "sequences of %d tokens are %lld attention chunks in each of %lld blocks, more than one "
                      "training graph can hold (ggml's allocator would run out of free blocks); use gradient "
                      "checkpointing, or at most %lld tokens per sequence", batch->n_tokens, (long long) chunks,
                      (long long) n_layer, (long long) fits);
}

}  // namespace

ggml_cgraph * glora_graph_in_order(ggml_context * ctx, ggml_cgraph * gf, size_t graph_size) {
    ggml_cgraph * out = ggml_new_graph_custom(ctx, graph_size, false);
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) ggml_build_forward_expand(out, ggml_graph_node(gf, i));
    return out;
}

// out_prod(a, b) sums over dim 1 of both, mul_mat over dim 0, so out_prod(a, b) = mul_mat(aᵀ, bᵀ), with
// the same broadcast of a over b's dims 2 and 3. Every backend multiplies fastest through mul_mat (the
// CPU's out_prod in F32 is a loop of axpy's of length ne0 over rows, several times slower than its
// mul_mat kernels: the attention backward spent ~14% of a step there). Products with long rows but a
// short side (dA: [n_in, rank]) or a short sum (K = rank) stay as they are: there the axpy's are long and
// a transpose would cost more than it saves. Then the device's own rewrite (glora_backend_ops::rewrite),
// which also puts the new transposes in order (one rebuild of the graph for both).
ggml_cgraph * glora_faster_products(const glora_model * m, ggml_context * ctx, ggml_cgraph * gf, size_t graph_size) {
    constexpr int64_t min_dim = 32;
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
    return m->be.ops->rewrite(m, ctx, gf, graph_size, changed);
}

int32_t glora_trainer_backward(glora_trainer * trainer, const glora_batch * batch, float loss_weight,
                               uint64_t dropout_seed, double * out_loss_sum, size_t * measure) {
    glora_model * m = trainer->adapter->model;
    // the graphs' budgets, before any graph is built: the whole model in one graph, or each block (the
    // head's chunks are smaller than a block)
    const glora_graph_options opt = training_options(trainer);
    int32_t rc = GLORA_OK;
    if (!trainer->params.gradient_checkpointing) {
        rc = glora_check_graph_budget(m, batch, opt, true);
        if (rc == GLORA_OK) rc = check_one_graph_chunks(m, batch, opt);
    }
    for (int il = 0; rc == GLORA_OK && trainer->params.gradient_checkpointing && il < m->hp.n_layer; ++il) {
        glora_graph_options block = opt;
        block.head = false;
        block.layer_begin = il;
        block.layer_end = il + 1;
        rc = glora_check_graph_budget(m, batch, block, true);
    }
    if (rc) return rc;
    glora_sched plan;
    return trainer->params.gradient_checkpointing
        ? backward_checkpointed(trainer, batch, loss_weight, dropout_seed, out_loss_sum, measure, &plan)
        : backward_one_graph(trainer, batch, loss_weight, dropout_seed, out_loss_sum, measure, &plan);
}

// Test-only (see ggml_lora.h): one of the backward's rewrites on a small graph without the pattern it
// looks for, so that the tests see it refuse instead of passing the graph through unchanged.
extern "C" GLORA_API int32_t glora_selftest(glora_trainer * trainer, const char * name) {
    return glora_guard(__func__, [&]() -> int32_t {
        glora_clear_error();
        GLORA_CHECK_ARG(trainer && name, "glora_selftest: NULL argument");
        const glora_model * m = trainer->adapter->model;
        const glora_pair & p = trainer->adapter->pairs[0];
        const int64_t n_in = p.weight->ne[0], n_out = p.weight->ne[1], T = 8;
        graph_ctx g(64);
        if (strcmp(name, "transposed_weights") == 0) {
            // out_prod through a frozen weight whose right side is not a transposed view: not Wᵀ·dy
            ggml_tensor * y = ggml_new_tensor_2d(g.ctx, GGML_TYPE_F32, T, n_out);            // [T, n_out]
            ggml_tensor * dx = ggml_out_prod(g.ctx, const_cast<ggml_tensor *>(p.weight), y);  // [n_in, T]
            ggml_cgraph * gf = ggml_new_graph_custom(g.ctx, 64, false);
            ggml_build_forward_expand(gf, dx);
            return use_transposed_weights(m, g.ctx, gf);
        }
        if (strcmp(name, "param_grads") == 0) {
            // without accumulators ggml sets A's gradient in a tensor of its own: no add to scale
            ggml_tensor * x = ggml_new_tensor_2d(g.ctx, GGML_TYPE_F32, n_in, T);              // [n_in, T]
            ggml_tensor * loss = ggml_sum(g.ctx, ggml_mul_mat(g.ctx, p.a, x));
            ggml_set_loss(loss);
            ggml_cgraph * gf = ggml_new_graph_custom(g.ctx, 64, true);
            ggml_build_forward_expand(gf, loss);
            ggml_build_backward_expand(g.ctx, gf, nullptr);
            return scale_param_grads(g.ctx, gf, trainer, 1.0f);
        }
        return glora_fail(GLORA_ERR_INVALID_ARGUMENT, "unknown self-test '%s' (transposed_weights, param_grads)", name);
    });
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
