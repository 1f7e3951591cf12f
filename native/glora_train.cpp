// Adapters, forward evaluation, and the training step: backward to A and B only, then the optimizer.
#include "glora_internal.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <unordered_map>

// ---- adapters -------------------------------------------------------------------------------------

const glora_pair * glora_adapter::find(const ggml_tensor * weight) const {
    for (const glora_pair & p : pairs) {
        if (p.weight == weight) return &p;
    }
    return nullptr;
}

static void adapter_free(glora_adapter * a) {
    if (!a) return;
    if (a->buf) ggml_backend_buffer_free(a->buf);
    if (a->ctx) ggml_free(a->ctx);
    delete a;
}

extern "C" GLORA_API int32_t glora_adapter_new(glora_model * model, int32_t n_targets, const char * const * weight_names,
                                               const int32_t * ranks, float alpha, glora_adapter ** out) {
    return glora_guard(__func__, [&]() -> int32_t {
        glora_clear_error();
        GLORA_CHECK_ARG(model && out, "glora_adapter_new: NULL argument");
        GLORA_CHECK_ARG(n_targets > 0 && weight_names && ranks, "glora_adapter_new: no targets");
        GLORA_CHECK_ARG(std::isfinite(alpha), "glora_adapter_new: alpha is not finite");
        *out = nullptr;

        // freed on every early return, and when an exception unwinds to the guard
        std::unique_ptr<glora_adapter, void (*)(glora_adapter *)> a(new glora_adapter(), adapter_free);
        a->model = model;
        a->alpha = alpha;
        ggml_init_params ip = { ggml_tensor_overhead() * (size_t) (2 * n_targets + 1), nullptr, true };
        a->ctx = ggml_init(ip);
        for (int32_t i = 0; i < n_targets; ++i) {
            const char * name = weight_names[i];
            const ggml_tensor * w = name ? model->find(name) : nullptr;
            if (!w) {
                return glora_fail(GLORA_ERR_INVALID_ARGUMENT, "LoRA target '%s' is not a tensor of %s",
                                  name ? name : "(null)", model->path.c_str());
            }
            if (ggml_n_dims(w) != 2) {
                return glora_fail(GLORA_ERR_INVALID_ARGUMENT,
                                  "LoRA target '%s' has shape %s; only 2-D weights take LoRA", name,
                                  glora_shape_str(w).c_str());
            }
            const int64_t n_in = w->ne[0], n_out = w->ne[1];
            const int32_t r = ranks[i];
            if (r <= 0 || r > n_in || r > n_out) {
                return glora_fail(GLORA_ERR_INVALID_ARGUMENT,
                                  "rank %d for '%s' must be in [1, min(n_in=%lld, n_out=%lld)]", r, name,
                                  (long long) n_in, (long long) n_out);
            }
            if (a->find(w)) {
                return glora_fail(GLORA_ERR_INVALID_ARGUMENT, "LoRA target '%s' is listed twice", name);
            }
            glora_pair p;
            p.weight = w;
            p.rank   = r;
            p.a = ggml_new_tensor_2d(a->ctx, GGML_TYPE_F32, n_in, r);     // ne = [n_in, rank]
            p.b = ggml_new_tensor_2d(a->ctx, GGML_TYPE_F32, r, n_out);    // ne = [rank, n_out]
            ggml_format_name(p.a, "%s.lora_a", name);
            ggml_format_name(p.b, "%s.lora_b", name);
            a->pairs.push_back(p);
        }
        a->buf = ggml_backend_alloc_ctx_tensors_from_buft(a->ctx, model->be.bufts[0]);
        if (!a->buf) {
            return glora_fail(GLORA_ERR_OUT_OF_MEMORY, "could not allocate the LoRA tensors on %s",
                              model->be.device_name.c_str());
        }
        ggml_backend_buffer_clear(a->buf, 0);
        *out = a.release();
        return GLORA_OK;
    });
}

extern "C" GLORA_API void glora_adapter_free(glora_adapter * adapter) {
    glora_guard_void(__func__, [&] { adapter_free(adapter); });
}

static int32_t pair_tensor(const glora_adapter * a, int32_t target, int32_t which, int64_t n, ggml_tensor ** out) {
    GLORA_CHECK_ARG(a != nullptr, "adapter is NULL");
    GLORA_CHECK_ARG(target >= 0 && target < (int32_t) a->pairs.size(), "LoRA target index %d out of range [0, %zu)",
                    target, a->pairs.size());
    GLORA_CHECK_ARG(which == 0 || which == 1, "which=%d must be 0 (lora_a) or 1 (lora_b)", which);
    ggml_tensor * t = which == 0 ? a->pairs[(size_t) target].a : a->pairs[(size_t) target].b;
    GLORA_CHECK_ARG(n == ggml_nelements(t), "'%s' has %lld elements (shape %s), got %lld", t->name,
                    (long long) ggml_nelements(t), glora_shape_str(t).c_str(), (long long) n);
    *out = t;
    return GLORA_OK;
}

// Copies n floats between data and one of the pair tensors (set: into the tensor).
static int32_t pair_copy(const glora_adapter * adapter, int32_t target, int32_t which, float * data, int64_t n,
                         bool set) {
    ggml_tensor * t;
    int32_t rc = pair_tensor(adapter, target, which, n, &t);
    if (rc) return rc;
    GLORA_CHECK_ARG(data != nullptr, "glora_adapter_%s: data is NULL", set ? "set" : "get");
    if (set) ggml_backend_tensor_set(t, data, 0, ggml_nbytes(t));
    else     ggml_backend_tensor_get(t, data, 0, ggml_nbytes(t));
    return GLORA_OK;
}

extern "C" GLORA_API int32_t glora_adapter_set(glora_adapter * adapter, int32_t target, int32_t which, const float * data, int64_t n) {
    return glora_guard(__func__, [&]() -> int32_t {
        return pair_copy(adapter, target, which, const_cast<float *>(data), n, true);
    });
}

extern "C" GLORA_API int32_t glora_adapter_get(const glora_adapter * adapter, int32_t target, int32_t which, float * data, int64_t n) {
    return glora_guard(__func__, [&]() -> int32_t { return pair_copy(adapter, target, which, data, n, false); });
}

extern "C" GLORA_API int32_t glora_adapter_set_pair_scale(glora_adapter * adapter, int32_t target, float scale) {
    return glora_guard(__func__, [&]() -> int32_t {
        GLORA_CHECK_ARG(adapter != nullptr, "adapter is NULL");
        GLORA_CHECK_ARG(target >= 0 && target < (int32_t) adapter->pairs.size(),
                        "LoRA target index %d out of range [0, %zu)", target, adapter->pairs.size());
        GLORA_CHECK_ARG(std::isfinite(scale) && scale >= 0.0f, "pair scale %g must be finite and >= 0", (double) scale);
        adapter->pairs[(size_t) target].scale = scale;
        return GLORA_OK;
    });
}

// ---- running a graph ------------------------------------------------------------------------------

namespace {

struct graph_run {
    ggml_context * ctx = nullptr;
    ~graph_run() { if (ctx) ggml_free(ctx); }
};

// One tensor in a backend buffer of its own, outside any graph's allocation, freed with the object.
struct held_tensor {
    ggml_context *        ctx = nullptr;
    ggml_backend_buffer_t buf = nullptr;
    ggml_tensor *         t   = nullptr;
    ~held_tensor() {
        if (buf) ggml_backend_buffer_free(buf);
        if (ctx) ggml_free(ctx);
    }
    int32_t alloc(const glora_model * m, ggml_type type, int64_t ne0, int64_t ne1, const char * name) {
        ggml_init_params ip = { ggml_tensor_overhead(), nullptr, true };
        ctx = ggml_init(ip);
        t = ggml_new_tensor_2d(ctx, type, ne0, ne1);
        ggml_set_name(t, name);
        buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, m->be.bufts[0]);
        if (!buf) {
            return glora_fail(GLORA_ERR_OUT_OF_MEMORY, "could not allocate %s [%lld, %lld] on %s", name,
                              (long long) ne0, (long long) ne1, m->be.device_name.c_str());
        }
        return GLORA_OK;
    }
};

int32_t alloc_graph(glora_model * m, ggml_cgraph * gf) { return glora_graph_alloc(m, gf); }
int32_t run(glora_model * m, ggml_cgraph * gf) { return glora_graph_compute(m, gf); }

// Builds the forward-only graph ending at `out` in ctx (made for `budget` nodes) and runs it with batch's
// inputs. `faster`: with glora_faster_products' op forms (training and loss graphs), or as built
// (llama.cpp's forms).
int32_t run_forward(glora_model * m, ggml_context * ctx, size_t budget, ggml_tensor * out, const glora_batch * batch,
                    const glora_graph_inputs & in, bool faster) {
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, budget, false);
    ggml_build_forward_expand(gf, out);
    if (faster) gf = glora_faster_products(m, ctx, gf, budget);
    int32_t rc = alloc_graph(m, gf);
    if (rc) return rc;
    glora_graph_set_inputs(m, batch, in, 0);
    return run(m, gf);
}

int32_t check_adapter_model(const glora_model * m, const glora_adapter * a) {
    GLORA_CHECK_ARG(a->model == m, "the adapter was made for another model (%s)", a->model->path.c_str());
    return GLORA_OK;
}

}  // namespace

extern "C" GLORA_API int32_t glora_logits(glora_model * model, const glora_adapter * const * adapters, const float * scales,
                                          int32_t n_adapters, const glora_batch * batch, float * out) {
    return glora_guard(__func__, [&]() -> int32_t {
        glora_clear_error();
        GLORA_CHECK_ARG(model && out, "glora_logits: NULL argument");
        GLORA_CHECK_ARG(n_adapters >= 0 && (n_adapters == 0 || (adapters && scales)), "glora_logits: bad adapter list");
        int32_t rc = glora_validate_batch(model, batch, false);
        if (rc) return rc;
        glora_graph_options opt;
        opt.pad_kv = true;
        if (model->llama_weights) {
            if ((rc = glora_model_prepare_llama_weights(model))) return rc;
            opt.llama_weights = true;
        }
        for (int32_t i = 0; i < n_adapters; ++i) {
            GLORA_CHECK_ARG(adapters[i] != nullptr, "glora_logits: adapter %d is NULL", i);
            if ((rc = check_adapter_model(model, adapters[i]))) return rc;
            opt.adapters.push_back({adapters[i], scales[i]});
        }
        if ((rc = glora_check_graph_budget(model, batch, opt, false))) return rc;
        const size_t budget = glora_graph_budget(model, batch, opt, false);
        graph_run g;
        g.ctx = glora_graph_ctx(budget);
        glora_graph_inputs in;
        ggml_tensor * logits = glora_build_forward(g.ctx, model, batch, opt, false, &in);
        ggml_set_output(logits);
        if ((rc = run_forward(model, g.ctx, budget, logits, batch, in, false))) return rc;
        ggml_backend_tensor_get(logits, out, 0, ggml_nbytes(logits));
        return GLORA_OK;
    });
}

// The loss of a batch. With more loss rows than one LM-head chunk, the blocks run in one graph whose
// output stays in a buffer of its own, then the head and the loss run over chunks of loss rows (as in
// the checkpointed backward): the logits and one-hot labels of every row never exist at once (for
// 2048 rows of a 49k vocabulary they are 400 MB each).
//
// With out_rows, each row's cross-entropy instead: the chunk's logits are read back (at most one LM-head
// chunk of them, ~64 MiB) and log-softmax is taken in double.
// Runs inside the caller's guard.
static int32_t loss_impl(glora_model * model, const glora_adapter * adapter, float scale, int32_t f16_weights,
                         const glora_batch * batch, double * out_loss_sum, float * out_rows) {
    glora_clear_error();
    GLORA_CHECK_ARG(model && (out_loss_sum || out_rows), "glora_loss: NULL argument");
    GLORA_CHECK_ARG(f16_weights == 0 || f16_weights == 1, "f16_weights=%d must be 0 or 1", f16_weights);
    int32_t rc = glora_validate_batch(model, batch, true);
    if (rc) return rc;
    if (f16_weights && (rc = glora_model_prepare_f16_forward(model))) return rc;
    glora_graph_options opt;
    opt.expand_gqa = true;   // the same graph as training, so losses and gradients agree exactly
    opt.attn_chunk = GLORA_ATTN_CHUNK;
    opt.f16_weights = f16_weights != 0;
    if (adapter) {
        if ((rc = check_adapter_model(model, adapter))) return rc;
        opt.adapters.push_back({adapter, scale});
    }
    if ((rc = glora_check_graph_budget(model, batch, opt, false))) return rc;
    const int64_t chunk = glora_head_chunk_rows(model);
    const bool chunked = batch->n_loss > chunk;

    held_tensor top;   // the last block's output [n_embd, n_seq * n_tokens], when chunked
    if (chunked) {
        const int64_t n_rows = (int64_t) batch->n_seq * batch->n_tokens;
        if ((rc = top.alloc(model, GGML_TYPE_F32, model->n_embd, n_rows, "loss.top"))) return rc;
        glora_graph_options blocks = opt;
        blocks.head = false;
        const size_t budget = glora_graph_budget(model, batch, blocks, false);
        graph_run g;
        g.ctx = glora_graph_ctx(budget);
        glora_graph_inputs in;
        ggml_tensor * y = glora_build_forward(g.ctx, model, batch, blocks, false, &in);
        if ((rc = run_forward(model, g.ctx, budget, ggml_cpy(g.ctx, y, top.t), batch, in, true))) return rc;
    }

    double sum = 0.0;
    for (int64_t r0 = 0; r0 < batch->n_loss; r0 += chunked ? chunk : batch->n_loss) {
        glora_batch sub = *batch;
        glora_graph_options head = opt;
        if (chunked) {
            sub.loss_rows += r0;
            sub.labels    += r0;
            if (sub.loss_weights) sub.loss_weights += r0;
            sub.n_loss     = (int32_t) std::min<int64_t>(chunk, batch->n_loss - r0);
            head.layer_begin = head.layer_end = model->hp.n_layer;
            head.loss_row0 = r0;
        }
        const size_t budget = glora_graph_budget(model, &sub, head, false);
        graph_run g;
        g.ctx = glora_graph_ctx(budget);
        if (chunked) head.x_in = glora_bind(g.ctx, top.t);
        glora_graph_inputs in;
        ggml_tensor * logits = glora_build_forward(g.ctx, model, &sub, head, true, &in);
        if (out_rows) {
            ggml_set_output(logits);
            if ((rc = run_forward(model, g.ctx, budget, logits, &sub, in, true))) return rc;
            const int64_t V = model->n_vocab;
            std::vector<float> host((size_t) (V * sub.n_loss));
            ggml_backend_tensor_get(logits, host.data(), 0, host.size() * sizeof(float));
            const double s = glora_logit_scale(&sub);
            for (int32_t i = 0; i < sub.n_loss; ++i) {
                const float * l = host.data() + (size_t) i * V;
                const double mx = s * *std::max_element(l, l + V);
                double z = 0.0;
                for (int64_t v = 0; v < V; ++v) z += std::exp(s * l[v] - mx);
                const double ce = mx + std::log(z) - s * l[sub.labels[i]];
                out_rows[r0 + i] = (float) ce;
                sum += ce;
            }
            continue;
        }
        ggml_tensor * loss = glora_build_loss(g.ctx, logits, 1.0f, &in, false, glora_logit_scale(&sub));
        if ((rc = run_forward(model, g.ctx, budget, loss, &sub, in, true))) return rc;
        float v = 0.0f;
        ggml_backend_tensor_get(loss, &v, 0, sizeof(v));
        sum += v;
    }
    if (out_loss_sum) *out_loss_sum = sum;
    return GLORA_OK;
}

extern "C" GLORA_API int32_t glora_loss(glora_model * model, const glora_adapter * adapter, float scale,
                                        int32_t f16_weights, const glora_batch * batch, double * out_loss_sum) {
    return glora_guard(__func__, [&] { return loss_impl(model, adapter, scale, f16_weights, batch, out_loss_sum, nullptr); });
}

extern "C" GLORA_API int32_t glora_row_losses(glora_model * model, const glora_adapter * adapter, float scale,
                                              int32_t f16_weights, const glora_batch * batch, float * out_rows) {
    return glora_guard(__func__, [&] { return loss_impl(model, adapter, scale, f16_weights, batch, nullptr, out_rows); });
}

// ---- trainer --------------------------------------------------------------------------------------

static void trainer_free(glora_trainer * t) {
    if (!t) return;
    glora_trainer_release_checkpoints(t);
    if (t->buf_grad) ggml_backend_buffer_free(t->buf_grad);
    if (t->buf_opt) ggml_backend_buffer_free(t->buf_opt);
    if (t->ctx_grad) ggml_free(t->ctx_grad);
    if (t->ctx_opt) ggml_free(t->ctx_opt);
    delete t;
}

static ggml_context * meta_ctx(size_t n_tensors) {
    ggml_init_params ip = { ggml_tensor_overhead() * (n_tensors + 1), nullptr, true };
    return ggml_init(ip);
}

extern "C" GLORA_API int32_t glora_trainer_new(glora_adapter * adapter, const glora_trainer_params * params, glora_trainer ** out) {
    return glora_guard(__func__, [&]() -> int32_t {
        glora_clear_error();
        GLORA_CHECK_ARG(adapter && params && out, "glora_trainer_new: NULL argument");
        GLORA_CHECK_ARG(params->optimizer == GLORA_OPTIMIZER_ADAMW || params->optimizer == GLORA_OPTIMIZER_SGD,
                        "unknown optimizer %d", params->optimizer);
        GLORA_CHECK_ARG(params->dropout >= 0.0f && params->dropout < 0.999f, "dropout %g must be in [0, 1)",
                        (double) params->dropout);
        GLORA_CHECK_ARG(params->gradient_checkpointing == 0 || params->gradient_checkpointing == 1,
                        "gradient_checkpointing=%d must be 0 or 1", params->gradient_checkpointing);
        GLORA_CHECK_ARG(params->keep_transposed == 0 || params->keep_transposed == 1,
                        "keep_transposed=%d must be 0 or 1", params->keep_transposed);
        GLORA_CHECK_ARG(params->f16_weights == 0 || params->f16_weights == 1, "f16_weights=%d must be 0 or 1",
                        params->f16_weights);
        *out = nullptr;
        // freed on every early return, and when an exception unwinds to the guard
        std::unique_ptr<glora_trainer, void (*)(glora_trainer *)> t(new glora_trainer(), trainer_free);
        t->adapter = adapter;
        t->params  = *params;
        const size_t n = adapter->pairs.size() * 2;
        t->ctx_grad = meta_ctx(n);
        t->ctx_opt  = meta_ctx(2 * n);
        for (glora_pair & p : adapter->pairs) {
            for (ggml_tensor * w : {p.a, p.b}) {
                ggml_set_param(w);
                t->params_t.push_back(w);
                t->grad.push_back(ggml_dup_tensor(t->ctx_grad, w));
                t->m.push_back(ggml_dup_tensor(t->ctx_opt, w));
                t->v.push_back(ggml_dup_tensor(t->ctx_opt, w));
                ggml_format_name(t->grad.back(), "grad.%s", w->name);
                ggml_format_name(t->m.back(), "adam_m.%s", w->name);
                ggml_format_name(t->v.back(), "adam_v.%s", w->name);
            }
        }
        ggml_backend_buffer_type_t buft = adapter->model->be.bufts[0];
        t->buf_grad = ggml_backend_alloc_ctx_tensors_from_buft(t->ctx_grad, buft);
        t->buf_opt  = ggml_backend_alloc_ctx_tensors_from_buft(t->ctx_opt, buft);
        if (!t->buf_grad || !t->buf_opt) {
            return glora_fail(GLORA_ERR_OUT_OF_MEMORY, "could not allocate optimizer state on %s",
                              adapter->model->be.device_name.c_str());
        }
        ggml_backend_buffer_clear(t->buf_grad, 0);
        ggml_backend_buffer_clear(t->buf_opt, 0);
        // without keep_transposed the backward makes its transposed copies transiently, step by step
        int32_t rc = params->keep_transposed ? glora_model_prepare_backward(adapter->model) : GLORA_OK;
        if (rc == GLORA_OK && params->f16_weights) rc = glora_model_prepare_f16_forward(adapter->model);
        if (rc) {
            return rc;
        }
        *out = t.release();
        return GLORA_OK;
    });
}

extern "C" GLORA_API void glora_trainer_free(glora_trainer * trainer) {
    glora_guard_void(__func__, [&] { trainer_free(trainer); });
}

extern "C" GLORA_API int32_t glora_trainer_accumulate(glora_trainer * trainer, const glora_batch * batch, float loss_weight,
                                                      uint64_t dropout_seed, double * out_loss_sum) {
    return glora_guard(__func__, [&]() -> int32_t {
        glora_clear_error();
        GLORA_CHECK_ARG(trainer && out_loss_sum, "glora_trainer_accumulate: NULL argument");
        GLORA_CHECK_ARG(std::isfinite(loss_weight) && loss_weight > 0.0f, "loss_weight %g must be positive and finite",
                        (double) loss_weight);
        const int32_t rc = glora_validate_batch(trainer->adapter->model, batch, true);
        if (rc) return rc;
        return glora_trainer_backward(trainer, batch, loss_weight, dropout_seed, out_loss_sum);
    });
}

static uint64_t ctx_nbytes(ggml_context * ctx) {
    uint64_t n = 0;
    for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) n += ggml_nbytes(t);
    return n;
}

extern "C" GLORA_API int32_t glora_trainer_measure(glora_trainer * trainer, int32_t n_seq, int32_t n_tokens, int32_t n_loss,
                                                   glora_memory * out) {
    return glora_guard(__func__, [&]() -> int32_t {
        glora_clear_error();
        GLORA_CHECK_ARG(trainer && out, "glora_trainer_measure: NULL argument");
        GLORA_CHECK_ARG(n_seq > 0 && n_tokens > 0, "n_seq=%d and n_tokens=%d must be positive", n_seq, n_tokens);
        GLORA_CHECK_ARG(n_loss > 0 && (int64_t) n_loss <= (int64_t) n_seq * n_tokens,
                        "n_loss=%d must be in [1, n_seq*n_tokens=%lld]", n_loss, (long long) n_seq * n_tokens);
        glora_model * model = trainer->adapter->model;
        // only the shapes matter for the graphs; the data are never read
        std::vector<int32_t> zeros((size_t) n_seq * (size_t) n_tokens, 0);
        glora_batch batch = {};
        batch.tokens = zeros.data();
        batch.n_seq = n_seq;
        batch.n_tokens = n_tokens;
        batch.loss_rows = zeros.data();
        batch.labels = zeros.data();
        batch.n_loss = n_loss;
        size_t compute = 0;
        double unused = 0.0;
        const int32_t rc = glora_trainer_backward(trainer, &batch, 1.0f, 0, &unused, &compute);
        if (rc) return rc;
        *out = {};
        out->weights     = model->weights_nbytes();
        out->transposed  = model->wt.nbytes();
        out->f16_weights = trainer->params.f16_weights ? model->wf.nbytes() : 0;
        out->adapter     = ctx_nbytes(trainer->adapter->ctx);
        out->optimizer   = ctx_nbytes(trainer->ctx_grad) + ctx_nbytes(trainer->ctx_opt);
        out->checkpoints = trainer->ctx_ckpt ? ctx_nbytes(trainer->ctx_ckpt) : 0;
        out->compute     = compute;
        return GLORA_OK;
    });
}

extern "C" GLORA_API int32_t glora_trainer_grad_norm(glora_trainer * trainer, double * out_norm) {
    return glora_guard(__func__, [&]() -> int32_t {
        GLORA_CHECK_ARG(trainer && out_norm, "glora_trainer_grad_norm: NULL argument");
        // LoRA gradients are small (r·(n_in+n_out) per pair): reading them back is cheaper than a graph
        double sum = 0.0;
        std::vector<float> buf;
        for (ggml_tensor * g : trainer->grad) {
            buf.resize((size_t) ggml_nelements(g));
            ggml_backend_tensor_get(g, buf.data(), 0, ggml_nbytes(g));
            for (float x : buf) sum += (double) x * (double) x;
        }
        *out_norm = std::sqrt(sum);
        return GLORA_OK;
    });
}

extern "C" GLORA_API int32_t glora_trainer_zero_grad(glora_trainer * trainer) {
    return glora_guard(__func__, [&]() -> int32_t {
        GLORA_CHECK_ARG(trainer, "glora_trainer_zero_grad: NULL argument");
        ggml_backend_buffer_clear(trainer->buf_grad, 0);
        return GLORA_OK;
    });
}

extern "C" GLORA_API int32_t glora_trainer_step(glora_trainer * trainer, const glora_opt_step * step) {
    return glora_guard(__func__, [&]() -> int32_t {
        glora_clear_error();
        GLORA_CHECK_ARG(trainer && step, "glora_trainer_step: NULL argument");
        GLORA_CHECK_ARG(std::isfinite(step->learning_rate) && step->learning_rate > 0.0f,
                        "learning_rate %g must be positive and finite", (double) step->learning_rate);
        GLORA_CHECK_ARG(step->weight_decay >= 0.0f && step->weight_decay * step->learning_rate < 1.0f,
                        "weight_decay %g must be >= 0 with learning_rate * weight_decay < 1",
                        (double) step->weight_decay);
        GLORA_CHECK_ARG(std::isfinite(step->grad_scale) && step->grad_scale >= 0.0f, "grad_scale %g must be >= 0",
                        (double) step->grad_scale);
        const bool adamw = trainer->params.optimizer == GLORA_OPTIMIZER_ADAMW;
        if (adamw) {
            GLORA_CHECK_ARG(step->beta1 >= 0.0f && step->beta1 < 1.0f && step->beta2 >= 0.0f && step->beta2 < 1.0f,
                            "betas (%g, %g) must be in [0, 1)", (double) step->beta1, (double) step->beta2);
            GLORA_CHECK_ARG(step->eps > 0.0f, "eps %g must be positive", (double) step->eps);
            GLORA_CHECK_ARG(step->step >= 1, "optimizer step %lld must be >= 1", (long long) step->step);
        }
        glora_model * model = trainer->adapter->model;

        graph_run g;
        const size_t n = trainer->params_t.size();
        g.ctx = glora_graph_ctx(4 * n + 8);
        ggml_cgraph * gf = ggml_new_graph_custom(g.ctx, 4 * n + 8, false);
        ggml_tensor * hyper = ggml_new_tensor_1d(g.ctx, GGML_TYPE_F32, adamw ? 7 : 2);
        ggml_set_name(hyper, "opt_params");
        ggml_set_input(hyper);
        for (size_t i = 0; i < n; ++i) {
            ggml_tensor * grad = trainer->grad[i];
            if (step->grad_scale != 1.0f) grad = ggml_scale(g.ctx, grad, step->grad_scale);
            ggml_tensor * upd = adamw
                ? ggml_opt_step_adamw(g.ctx, trainer->params_t[i], grad, trainer->m[i], trainer->v[i], hyper)
                : ggml_opt_step_sgd(g.ctx, trainer->params_t[i], grad, hyper);
            ggml_build_forward_expand(gf, upd);
        }
        int32_t rc = alloc_graph(model, gf);
        if (rc) return rc;
        if (adamw) {
            const double t = (double) step->step;
            const float h[7] = {
                step->learning_rate, step->beta1, step->beta2, step->eps, step->weight_decay,
                (float) (1.0 / (1.0 - std::pow((double) step->beta1, t))),   // beta1h: bias correction of m
                (float) (1.0 / (1.0 - std::pow((double) step->beta2, t))),   // beta2h: bias correction of v
            };
            ggml_backend_tensor_set(hyper, h, 0, sizeof(h));
        } else {
            const float h[2] = { step->learning_rate, step->weight_decay };
            ggml_backend_tensor_set(hyper, h, 0, sizeof(h));
        }
        if ((rc = run(model, gf))) return rc;
        ggml_backend_buffer_clear(trainer->buf_grad, 0);
        return GLORA_OK;
    });
}

extern "C" GLORA_API int32_t glora_trainer_state(glora_trainer * trainer, int32_t target, int32_t which, int32_t kind,
                                                 float * data, int64_t n, int32_t set) {
    return glora_guard(__func__, [&]() -> int32_t {
        GLORA_CHECK_ARG(trainer && data, "glora_trainer_state: NULL argument");
        GLORA_CHECK_ARG(kind >= 0 && kind <= 2, "kind=%d must be 0 (grad), 1 (m) or 2 (v)", kind);
        ggml_tensor * p;
        int32_t rc = pair_tensor(trainer->adapter, target, which, n, &p);
        if (rc) return rc;
        const size_t i = (size_t) target * 2 + (size_t) which;
        ggml_tensor * t = kind == 0 ? trainer->grad[i] : kind == 1 ? trainer->m[i] : trainer->v[i];
        if (set) ggml_backend_tensor_set(t, data, 0, ggml_nbytes(t));
        else     ggml_backend_tensor_get(t, data, 0, ggml_nbytes(t));
        return GLORA_OK;
    });
}
