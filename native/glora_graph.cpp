// The forward graph of a llama-family model with LoRA, built the way llama.cpp builds it
// (src/models/llama.cpp, llm_graph_context::build_lora_mm and build_attn_mha), plus the loss.
#include "glora_internal.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace {

struct builder {
    ggml_context              * ctx;
    const glora_model         * m;
    const glora_batch         * batch;
    const glora_graph_options & opt;
    glora_graph_inputs        * in;
    int64_t                     mask_row0 = 0;   // first row of x in the batch, for dropout masks
    bool                        x_loss_rows = false;   // x's rows are the batch's loss rows (the head)

    // y = W·x + Σ_adapters s·(alpha/rank)·B·(A·dropout(x)), in build_lora_mm's op order.
    // w: ne = [n_in, n_out]; x: ne = [n_in, N]; y: ne = [n_out, N]
    ggml_tensor * lora_mm(ggml_tensor * w, ggml_tensor * x) {
        ggml_tensor * wm = w;
        if (opt.f16_weights) {
            auto it = m->wf.of.find(w);
            if (it != m->wf.of.end()) wm = it->second;
        }
        if (opt.llama_weights) {
            auto it = m->wr.of.find(w);
            if (it != m->wr.of.end()) wm = it->second;
        }
        ggml_tensor * res = ggml_mul_mat(ctx, wm, x);
        // a training forward that may trade llama.cpp's arithmetic for speed (f16_weights) multiplies this
        // stored matrix itself: the backend may run it as it runs a working copy (the CPU: AMX tiles in
        // BF16, or its FMA kernel; glora_model_prepare_f16_forward makes no copies in BF16 mode)
        if (opt.f16_weights && wm == w) glora_hint(res, GLORA_HINT_FROZEN);
        for (const glora_active_adapter & aa : opt.adapters) {
            const glora_pair * p = aa.adapter->find(w);
            if (!p) continue;
            // llama.cpp: scale = alpha ? user_scale * alpha / rank : user_scale
            // a pair scale of its own (per-module alpha) replaces alpha / rank
            const float alpha = aa.adapter->alpha;
            const float scale = p->scale > 0.0f ? aa.scale * p->scale
                              : alpha != 0.0f   ? aa.scale * alpha / (float) p->rank : aa.scale;
            ggml_tensor * xin = x;
            if (opt.dropout > 0.0f) {
                ggml_tensor * mask = ggml_new_tensor(ctx, GGML_TYPE_F32, GGML_MAX_DIMS, x->ne);
                ggml_format_name(mask, "dropout.%s", w->name);
                ggml_set_input(mask);
                in->dropout.push_back(mask);
                in->dropout_salt.push_back((uint64_t) (p - aa.adapter->pairs.data()) + 1);
                in->dropout_offset.push_back((uint64_t) (mask_row0 * x->ne[0]));
                in->dropout_loss_rows.push_back(x_loss_rows ? 1 : 0);
                xin = ggml_mul(ctx, x, mask);
            }
            ggml_tensor * ax = ggml_mul_mat(ctx, p->a, xin);   // [rank, N]
            ggml_tensor * ab;                                  // [n_out, N]
            if (opt.expand_gqa) {
                // training graphs scale the small [rank, N] product instead of the [n_out, N] one (the
                // same value up to rounding; one pass over a big activation less, forward and backward)
                ab = ggml_mul_mat(ctx, p->b, ggml_scale(ctx, ax, scale));
            } else {
                ab = ggml_scale(ctx, ggml_mul_mat(ctx, p->b, ax), scale);   // llama.cpp's order
            }
            res = ggml_add(ctx, res, ab);
        }
        return res;
    }

    // An attention product; in a training forward with BF16 products on AMX tiles it runs there too, and
    // so do the float32 products of that graph's backward (glora_amx_products), as PyTorch's autocast
    // multiplies q, k, the probabilities and v in bfloat16.
    ggml_tensor * attn_mm(ggml_tensor * a, ggml_tensor * b) {
        ggml_tensor * t = ggml_mul_mat(ctx, a, b);
        if (opt.f16_weights) glora_hint(t, GLORA_HINT_ATTENTION);
        return t;
    }

    // [a, b, n_head_kv, S] -> [a, b, n_head, S] where query head h reads KV head h / (n_head / n_head_kv),
    // the grouping ggml_mul_mat's broadcast uses; x must be contiguous.
    ggml_tensor * repeat_heads(ggml_tensor * x) {
        const int64_t group = m->hp.n_head / m->hp.n_head_kv;
        ggml_tensor * flat = ggml_reshape_4d(ctx, x, x->ne[0] * x->ne[1], 1, x->ne[2] * x->ne[3], 1);
        ggml_tensor * rep  = ggml_repeat_4d(ctx, flat, flat->ne[0], group, flat->ne[2], 1);
        return ggml_reshape_4d(ctx, rep, x->ne[0], x->ne[1], group * x->ne[2], x->ne[3]);
    }

    ggml_tensor * rms_norm(ggml_tensor * x, ggml_tensor * w) {
        return ggml_mul(ctx, ggml_rms_norm(ctx, x, m->hp.rms_eps), w);
    }

    // Q, K and V of a block's input x ne = [n_embd, N], each ne = [hd, heads, N]. From one fused matrix
    // (phi3) they are views of its rows, as build_qkv splits them (src/llama-graph.cpp:1663-1689); V is
    // made contiguous for the reshapes below (the same values).
    void qkv(const glora_layer & L, ggml_tensor * x, ggml_tensor ** q, ggml_tensor ** k, ggml_tensor ** v) {
        const glora_model_params & hp = m->hp;
        const int64_t N = x->ne[1], hd = hp.head_dim;
        if (L.wqkv) {
            ggml_tensor * f = lora_mm(L.wqkv, x);               // [n_q + 2*n_kv, N]
            const size_t es = ggml_element_size(f);
            const int64_t n_q = hd * hp.n_head, n_kv = hd * hp.n_head_kv;
            *q = ggml_view_3d(ctx, f, hd, hp.n_head, N, hd * es, f->nb[1], 0);
            *k = ggml_view_3d(ctx, f, hd, hp.n_head_kv, N, hd * es, f->nb[1], (size_t) n_q * es);
            *v = ggml_cont(ctx, ggml_view_3d(ctx, f, hd, hp.n_head_kv, N, hd * es, f->nb[1], (size_t) (n_q + n_kv) * es));
            return;
        }
        ggml_tensor * qf = lora_mm(L.wq, x);                    // [n_head*hd, N]
        ggml_tensor * kf = lora_mm(L.wk, x);                    // [n_head_kv*hd, N]
        ggml_tensor * vf = lora_mm(L.wv, x);
        if (L.bq) qf = ggml_add(ctx, qf, L.bq);
        if (L.bk) kf = ggml_add(ctx, kf, L.bk);
        if (L.bv) vf = ggml_add(ctx, vf, L.bv);
        *q = ggml_reshape_3d(ctx, qf, hd, hp.n_head, N);        // [hd, n_head, N]
        *k = ggml_reshape_3d(ctx, kf, hd, hp.n_head_kv, N);     // [hd, n_head_kv, N]
        *v = ggml_reshape_3d(ctx, vf, hd, hp.n_head_kv, N);
    }

    // cap·tanh(x/cap), as llama.cpp's gemma2 attention (src/llama-graph.cpp:2708-2714) and final
    // logits (src/models/gemma2.cpp:167-169). ggml has no backward for tanh: glora_backward.cpp's
    // exact_activations supplies it.
    ggml_tensor * softcap(ggml_tensor * x, float cap) {
        return ggml_scale(ctx, ggml_tanh(ctx, ggml_scale(ctx, x, 1.0f / cap)), cap);
    }

    // The attention logits kq of queries that are already scaled -> probabilities.
    ggml_tensor * softmax(ggml_tensor * kq, ggml_tensor * mask) {
        const glora_model_params & hp = m->hp;
        if (hp.attn_softcap > 0.0f) kq = softcap(kq, hp.attn_softcap);
        return ggml_soft_max_ext(ctx, kq, mask, hp.scale_q ? 1.0f : hp.kq_scale, 0.0f);
    }

    // x: ne = [n_embd, N] -> ne = [n_embd, N]
    ggml_tensor * attention(const glora_layer & L, ggml_tensor * x, int il) {
        const glora_model_params & hp = m->hp;
        const int64_t T = batch->n_tokens, S = batch->n_seq, N = T * S;

        ggml_tensor * q, * k, * v;
        qkv(L, x, &q, &k, &v);
        if (L.q_norm) {
            q = rms_norm(q, L.q_norm);
            k = rms_norm(k, L.k_norm);
        }
        // sliding-window layers have a rope base and scale of their own (src/llama-model.cpp:2329-2335)
        const float base  = L.swa ? hp.rope_freq_base_swa : hp.rope_freq_base;
        const float scale = L.swa ? hp.rope_freq_scale_swa : hp.rope_freq_scale;
        q = ggml_rope_ext(ctx, q, in->positions, m->rope_freqs, hp.n_rot, hp.rope_type, hp.n_ctx_orig,
                          base, scale, 0.0f, 1.0f, 32.0f, 1.0f);
        k = ggml_rope_ext(ctx, k, in->positions, m->rope_freqs, hp.n_rot, hp.rope_type, hp.n_ctx_orig,
                          base, scale, 0.0f, 1.0f, 32.0f, 1.0f);
        ggml_format_name(q, "q_rope.%d", il);
        ggml_format_name(k, "k_rope.%d", il);
        // gemma and phi3 scale Q, then attend with scale 1 (src/models/gemma3.cpp:152-156, phi3.cpp:123-128)
        if (hp.scale_q) q = ggml_scale(ctx, q, hp.kq_scale);

        // heads become a batch dimension: [hd, T, heads, S]
        q = ggml_permute(ctx, ggml_reshape_4d(ctx, q, hp.head_dim, hp.n_head, T, S), 0, 2, 1, 3);
        // the CPU's kq product takes a slow path (4x slower over long sequences) for a permuted q. The
        // llama.cpp-exact forward keeps it: the fast kernel sums in another order, and through 30
        // quantized layers that moves SmolLM2's logits by up to 1.2
        if (opt.expand_gqa) q = ggml_cont(ctx, q);
        k = ggml_permute(ctx, ggml_reshape_4d(ctx, k, hp.head_dim, hp.n_head_kv, T, S), 0, 2, 1, 3);
        // v transposed for the second product: [T, hd, n_head_kv, S]
        ggml_tensor * vt = ggml_cont(ctx, ggml_permute(ctx, ggml_reshape_4d(ctx, v, hp.head_dim, hp.n_head_kv, T, S),
                                                       1, 2, 0, 3));
        if (opt.expand_gqa && hp.n_head != hp.n_head_kv) {
            k  = repeat_heads(ggml_cont(ctx, k));               // [hd, T, n_head, S]
            vt = repeat_heads(vt);                              // [T, hd, n_head, S]
        }
        if (!in->mask_chunks.empty()) {
            return lora_out(L, chunked_attention(q, k, vt, L.swa));
        }
        ggml_tensor * mask = L.swa ? in->mask_swa : in->mask;
        const int64_t n_kv = mask->ne[0];
        if (n_kv > T) {
            k  = ggml_pad(ctx, ggml_cont(ctx, k), 0, (int) (n_kv - T), 0, 0);   // [hd, n_kv, n_head_kv, S]
            vt = ggml_pad(ctx, vt, (int) (n_kv - T), 0, 0, 0);                   // [n_kv, hd, n_head_kv, S]
        }

        ggml_tensor * kq = attn_mm(k, q);                        // [n_kv, T_q, n_head, S]; GQA by broadcast
        ggml_mul_mat_set_prec(kq, GGML_PREC_F32);
        kq = softmax(kq, mask);
        ggml_tensor * kqv = attn_mm(vt, kq);                     // [hd, T_q, n_head, S]
        return lora_out(L, ggml_cont_2d(ctx, ggml_permute(ctx, kqv, 0, 2, 1, 3), hp.head_dim * hp.n_head, N));
    }

    // the output projection of the heads' outputs cur ne = [n_head*hd, N] -> ne = [n_embd, N]
    ggml_tensor * lora_out(const glora_layer & L, ggml_tensor * cur) {
        cur = lora_mm(L.wo, cur);
        if (L.bo) cur = ggml_add(ctx, cur, L.bo);
        return cur;
    }

    // Causal attention by query chunk: chunk [r0, r1) multiplies with keys [k0, r1) only. Keys past r1
    // are masked for every query of the chunk, and keys before k0 too (another sample's, when k0 > 0), so
    // the result is the full square's up to float summation order. The chunks' outputs go into place in
    // the [hd, n_head, T, S] layout the output projection reads, whose gradient arrives contiguous: ggml's
    // backward of acc views the gradient with the forward's strides, so it must not be a permuted view.
    // q: [hd, T, n_head, S]; k: [hd, T, n_head, S]; vt: [T, hd, n_head, S] -> [hd*n_head, T*S]
    ggml_tensor * chunked_attention(ggml_tensor * q, ggml_tensor * k, ggml_tensor * vt, bool swa) {
        const glora_model_params & hp = m->hp;
        const int64_t T = q->ne[1], S = q->ne[3];
        ggml_tensor * out = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, hp.head_dim, hp.n_head, T, S);
        ggml_set_name(out, "attn_zeros");
        ggml_set_input(out);
        in->zeros.push_back(out);
        for (const glora_graph_inputs::mask_chunk & c : in->mask_chunks) {
            const int64_t rows = c.r1 - c.r0;
            ggml_tensor * qc = ggml_cont(ctx, ggml_view_4d(ctx, q, q->ne[0], rows, q->ne[2], q->ne[3], q->nb[1], q->nb[2],
                                                            q->nb[3], (size_t) c.r0 * q->nb[1]));
            const int64_t keys = c.r1 - c.k0;
            ggml_tensor * kc = ggml_view_4d(ctx, k, k->ne[0], keys, k->ne[2], k->ne[3], k->nb[1], k->nb[2], k->nb[3],
                                            (size_t) c.k0 * k->nb[1]);
            ggml_tensor * vc = ggml_view_4d(ctx, vt, keys, vt->ne[1], vt->ne[2], vt->ne[3], vt->nb[1], vt->nb[2],
                                            vt->nb[3], (size_t) c.k0 * vt->nb[0]);
            ggml_tensor * kq = attn_mm(kc, qc);                        // [keys, rows, n_head, S]
            ggml_mul_mat_set_prec(kq, GGML_PREC_F32);
            kq = softmax(kq, swa ? c.mask_swa : c.mask);
            ggml_tensor * kqv = attn_mm(vc, kq);                       // [hd, rows, n_head, S]
            kqv = ggml_cont(ctx, ggml_permute(ctx, kqv, 0, 2, 1, 3)); // [hd, n_head, rows, S]
            out = ggml_acc(ctx, out, kqv, out->nb[1], out->nb[2], out->nb[3], (size_t) c.r0 * out->nb[2]);
        }
        return ggml_reshape_2d(ctx, out, hp.head_dim * hp.n_head, T * S);
    }

    ggml_tensor * ffn(const glora_layer & L, ggml_tensor * x) {
        ggml_tensor * gate, * up;                               // [n_ff, N]
        if (L.ffn_gate) {
            gate = lora_mm(L.ffn_gate, x);
            up   = lora_mm(L.ffn_up, x);
        } else {
            // phi3: ffn_up holds [gate; up], the halves ggml_swiglu reads (src/models/phi3.cpp:144-149;
            // ggml-cpu/ops.cpp:3372-3374 takes the first half as the gate); as views, elementwise the same
            ggml_tensor * f = lora_mm(L.ffn_up, x);             // [2*n_ff, N]
            const int64_t n_ff = f->ne[0] / 2;
            gate = ggml_view_2d(ctx, f, n_ff, f->ne[1], f->nb[1], 0);
            up   = ggml_view_2d(ctx, f, n_ff, f->ne[1], f->nb[1], (size_t) n_ff * ggml_element_size(f));
        }
        // the split forms: the fused ones have no backward. GEGLU (gemma, src/llama-graph.cpp:1872-1875)
        // has none either; glora_backward.cpp's exact_activations supplies it
        ggml_tensor * h = m->hp.ffn_act == GLORA_FFN_GEGLU ? ggml_geglu_split(ctx, gate, up)
                                                          : ggml_swiglu_split(ctx, gate, up);
        return lora_mm(L.ffn_down, h);
    }

    // rms_norm(x)·w where the block has that norm (gemma's post-norms), else x
    ggml_tensor * post_norm(ggml_tensor * x, ggml_tensor * w) {
        return w ? rms_norm(x, w) : x;
    }

    ggml_tensor * build(bool rows_only) {
        const int64_t T = batch->n_tokens, S = batch->n_seq, N = T * S;
        const int32_t l0 = opt.layer_begin;
        const int32_t l1 = opt.layer_end < 0 ? m->hp.n_layer : opt.layer_end;
        if (l0 < l1) {
            in->positions = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, N);
            ggml_set_name(in->positions, "positions");
            ggml_set_input(in->positions);
            const int64_t n_kv = opt.pad_kv ? (T + GLORA_KV_PAD - 1) / GLORA_KV_PAD * GLORA_KV_PAD : T;
            const std::vector<glora_attn_chunk> chunks = glora_attention_chunks(batch, opt);
            // a mask only for the kinds of layer [l0, l1) has: an input outside the graph gets no memory
            bool global = false, swa = false;
            for (int32_t il = l0; il < l1; ++il) (m->layers[(size_t) il].swa ? swa : global) = true;
            auto new_mask = [&](int64_t keys, int64_t rows, const char * name, long long r0) {
                ggml_tensor * mask = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, keys, rows, 1, S);
                if (r0 < 0) ggml_set_name(mask, name);
                else ggml_format_name(mask, "%s.%lld", name, r0);
                ggml_set_input(mask);
                return mask;
            };
            if (!chunks.empty()) {
                for (const glora_attn_chunk & c : chunks) {
                    in->mask_chunks.push_back({global ? new_mask(c.r1 - c.k0, c.r1 - c.r0, "kq_mask", c.r0) : nullptr,
                                               c.k0, c.r0, c.r1,
                                               swa ? new_mask(c.r1 - c.k0, c.r1 - c.r0, "kq_mask_swa", c.r0) : nullptr});
                }
            } else {
                if (global) in->mask = new_mask(n_kv, T, "kq_mask", -1);
                if (swa) in->mask_swa = new_mask(n_kv, T, "kq_mask_swa", -1);
            }
        }
        in->dropout_p = opt.dropout;

        ggml_tensor * x = opt.x_in;
        if (!x) {
            in->tokens = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, N);
            ggml_set_name(in->tokens, "tokens");
            ggml_set_input(in->tokens);
            x = ggml_get_rows(ctx, m->tok_embd, in->tokens);    // [n_embd, N]
            // gemma: times sqrt(n_embd) (src/models/gemma3.cpp:91)
            if (m->hp.embd_scale > 0.0f) x = ggml_scale(ctx, x, m->hp.embd_scale);
            ggml_set_name(x, "embd");
        }
        for (int il = l0; il < l1; ++il) {
            const glora_layer & L = m->layers[(size_t) il];
            // gemma's sandwich: x + post_norm(attn(norm(x))), then the same for the FFN
            // (src/models/gemma3.cpp:162-190)
            ggml_tensor * h = post_norm(attention(L, rms_norm(x, L.attn_norm), il), L.attn_post_norm);
            x = ggml_add(ctx, x, h);
            h = post_norm(ffn(L, rms_norm(x, L.ffn_norm)), L.ffn_post_norm);
            x = ggml_add(ctx, x, h);
            ggml_format_name(x, "block_out.%d", il);
        }
        if (!opt.head) return x;
        if (rows_only) {
            // only the supervised rows reach the LM head: [n_embd, n_loss]
            in->loss_rows = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, batch->n_loss);
            ggml_set_name(in->loss_rows, "loss_rows");
            ggml_set_input(in->loss_rows);
            x = ggml_get_rows(ctx, x, in->loss_rows);
        }
        x = rms_norm(x, m->output_norm);
        mask_row0 = opt.loss_row0;
        x_loss_rows = rows_only;
        ggml_tensor * logits = lora_mm(m->output, x);                     // [n_vocab, N or n_loss]
        // gemma2 always, gemma3 when the file says (src/models/gemma3.cpp:210-214)
        if (m->hp.final_softcap > 0.0f) logits = softcap(logits, m->hp.final_softcap);
        ggml_set_name(logits, "logits");
        return logits;
    }
};

// splitmix64: a counter-based generator, so a mask depends only on (seed, pair, element)
inline uint64_t mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

}  // namespace

ggml_tensor * glora_build_forward(ggml_context * ctx, const glora_model * model, const glora_batch * batch,
                                  const glora_graph_options & opt, bool rows_only, glora_graph_inputs * in) {
    builder b{ctx, model, batch, opt, in};
    return b.build(rows_only);
}

ggml_tensor * glora_build_loss(ggml_context * ctx, ggml_tensor * row_logits, float weight, glora_graph_inputs * in,
                               bool row_weights, float logit_scale) {
    if (logit_scale != 1.0f) {
        // a node of its own: ggml's backward scales the cross-entropy's gradient by it on the way back
        row_logits = ggml_scale(ctx, row_logits, logit_scale);
        ggml_set_name(row_logits, "scaled_logits");
    }
    if (row_weights) {
        in->row_weights = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, row_logits->ne[1]);
        ggml_set_name(in->row_weights, "row_weights");
        ggml_set_input(in->row_weights);
    }
    // ggml's cross entropy is the mean over rows; weight·n_rows turns it into weight·sum.
    in->labels = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, row_logits->ne[0], row_logits->ne[1]);
    ggml_set_name(in->labels, "labels");
    ggml_set_input(in->labels);
    // the token ids ride along as a third source, which ggml's op ignores and glora_cross_entropy_ops
    // reads instead of the one-hot matrix
    in->label_ids = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, row_logits->ne[1]);
    ggml_set_name(in->label_ids, "label_ids");
    ggml_set_input(in->label_ids);
    ggml_tensor * loss = ggml_cross_entropy_loss(ctx, row_logits, in->labels);
    loss->src[2] = in->label_ids;
    loss = ggml_scale(ctx, loss, weight * (float) row_logits->ne[1]);
    ggml_set_name(loss, "loss");
    ggml_set_output(loss);
    return loss;
}

// ---- node budget ----------------------------------------------------------------------------------

namespace {

// Nodes of a graph per unit of its shape, from counts of real graphs after every rewrite (the debug log
// of glora_sched_fit prints them) over tiny llama (GQA), qwen2 (biases) and qwen3 (q/k norms) models of
// 1..3 blocks, 8..700 rows, every projection and the LM head adapted, with and without dropout and
// checkpointing; tests/test_native_safety.py runs such a grid and checks every graph against its
// budget (largest share used: 74%). [0]: forward only, [1]: with ggml's backward and the rewrites of
// glora_backward.cpp.
// Observed, backward: a chunk 27 (forward 10); a pair 21-25 (forward 6, 8 on the LM head); dropout 2 a
// pair (forward 1); a block without pairs or chunks ~75 (qwen3's norms add ~20; forward ~45); chunked
// attention adds ~46 to a block over one square (forward ~20); the head alone 15 (forward 6).
struct node_counts {
    size_t fixed;       // inputs, embedding lookup, loss
    size_t block;       // a block's norms, projections, rope, residuals, GQA copies, chunking
    size_t chunk;       // one query chunk of a block's attention
    size_t pair;        // one LoRA pair on a projection
    size_t dropout;     // its dropout mask
    size_t head;        // final norm and LM head
};
constexpr node_counts NODES[2] = {
    // fixed  block  chunk  pair  dropout  head
    {  8,     56,    10,    8,    2,       8  },
    {  16,    100,   28,    25,   3,       16 },
};

}  // namespace

size_t glora_graph_budget(const glora_model * m, const glora_batch * batch, const glora_graph_options & opt,
                          bool backward) {
    const node_counts & c = NODES[backward ? 1 : 0];
    const int64_t T = batch->n_tokens;
    const int32_t l0 = opt.layer_begin;
    const int32_t l1 = opt.layer_end < 0 ? m->hp.n_layer : opt.layer_end;
    const int64_t blocks = std::max(0, l1 - l0);
    // as glora_build_forward chooses: query chunks, or one square
    const int64_t chunks = std::max<int64_t>(1, (int64_t) glora_attention_chunks(batch, opt).size());
    int64_t pairs = 0;
    for (const glora_active_adapter & aa : opt.adapters) {
        for (int32_t il = l0; il < l1; ++il) {
            const glora_layer & L = m->layers[(size_t) il];
            for (const ggml_tensor * w : L.projections()) pairs += aa.adapter->find(w) != nullptr;
        }
        if (opt.head) pairs += aa.adapter->find(m->output) != nullptr;
    }
    const size_t per_pair = c.pair + (opt.dropout > 0.0f ? c.dropout : 0);
    // with the backward, one transient transposed copy per frozen matrix (<= 7 a block, the LM head's); in
    // BF16 graphs, at most, an x rounded per product through a frozen matrix and each stored weight of the
    // forward packed for the tiles (glora_amx_products)
    size_t copies = backward ? (size_t) blocks * 7 + (opt.head ? 1 : 0) : 0;
    if (m->bf16) copies += (size_t) blocks * (backward ? 21 : 14);
    // what other architectures add to llama's block (estimates from their ops, checked by the same grid):
    // gemma's post-norms, Q scale, GEGLU and its derivative (glora_backward.cpp, exact_activations); the
    // attention softcap per chunk and the final one on the head; phi3's views of its fused matrices
    const glora_model_params & hp = m->hp;
    const bool gemma = hp.ffn_act == GLORA_FFN_GEGLU;
    const size_t arch_block = (gemma ? (backward ? 48 : 10) : 0) + (hp.scale_q ? (backward ? 6 : 2) : 0);
    const size_t arch_chunk = hp.attn_softcap > 0.0f ? (backward ? 16 : 3) : 0;
    const size_t arch_head  = hp.final_softcap > 0.0f ? (backward ? 16 : 3) : 0;
    const size_t n = c.fixed + (size_t) blocks * (c.block + arch_block + (size_t) chunks * (c.chunk + arch_chunk)) +
                     (size_t) pairs * per_pair + (opt.head ? c.head + arch_head : 0) + copies;
    return n + n / 4;   // a quarter over the counts, for what the grid of shapes did not reach
}

int32_t glora_check_graph_budget(const glora_model * m, const glora_batch * batch, const glora_graph_options & opt,
                                 bool backward) {
    const int64_t rows = (int64_t) batch->n_seq * batch->n_tokens;
    if (rows > m->be.max_rows) {
        return glora_fail(GLORA_ERR_INVALID_ARGUMENT, "a batch of %lld token rows (%d x %d) is more than %s takes in "
                          "one graph (%lld); lower batch_size or max_seq_length (gradient_accumulation_steps keeps "
                          "the step's size)", (long long) rows, batch->n_seq, batch->n_tokens,
                          m->be.device_name.c_str(), (long long) m->be.max_rows);
    }
    const size_t budget = glora_graph_budget(m, batch, opt, backward);
    if (budget <= GLORA_MAX_GRAPH_NODES) return GLORA_OK;
    // the longest sequence whose graph fits, by bisection (the budget grows with the length)
    glora_batch probe = *batch;
    int64_t lo = 0, hi = batch->n_tokens;
    while (hi - lo > 1) {
        probe.n_tokens = (int32_t) ((lo + hi) / 2);
        if (glora_graph_budget(m, &probe, opt, backward) <= GLORA_MAX_GRAPH_NODES) lo = probe.n_tokens;
        else hi = probe.n_tokens;
    }
    return glora_fail(GLORA_ERR_INVALID_ARGUMENT,
                      "sequences of %d tokens need a graph of about %zu nodes%s, more than the %zu this build "
                      "supports; at most %lld tokens per sequence fit", batch->n_tokens, budget,
                      backward ? " with its backward" : "", GLORA_MAX_GRAPH_NODES, (long long) lo);
}

int32_t glora_validate_batch(const glora_model * model, const glora_batch * batch, bool need_loss) {
    GLORA_CHECK_ARG(batch && batch->tokens, "batch: tokens is NULL");
    GLORA_CHECK_ARG(batch->n_seq > 0 && batch->n_tokens > 0, "batch: n_seq=%d and n_tokens=%d must be positive",
                    batch->n_seq, batch->n_tokens);
    const int64_t N = (int64_t) batch->n_seq * batch->n_tokens;
    for (int64_t i = 0; i < N; ++i) {
        const int32_t t = batch->tokens[i];
        GLORA_CHECK_ARG(t >= 0 && t < model->n_vocab, "batch: token id %d at row %lld is outside [0, n_vocab=%lld)", t,
                        (long long) i, (long long) model->n_vocab);
    }
    GLORA_CHECK_ARG(std::isfinite(batch->logit_scale) && batch->logit_scale >= 0.0f,
                    "batch: logit_scale %g must be finite and > 0 (0: 1)", (double) batch->logit_scale);
    if (need_loss) {
        GLORA_CHECK_ARG(batch->n_loss > 0 && batch->loss_rows && batch->labels,
                        "batch: no loss rows (n_loss=%d); at least one supervised token is needed", batch->n_loss);
        for (int32_t i = 0; i < batch->n_loss; ++i) {
            const int32_t r = batch->loss_rows[i], y = batch->labels[i];
            GLORA_CHECK_ARG(r >= 0 && r < N, "batch: loss row %d is outside [0, %lld)", r, (long long) N);
            GLORA_CHECK_ARG(y >= 0 && y < model->n_vocab, "batch: label %d of loss row %d is outside [0, n_vocab=%lld)",
                            y, r, (long long) model->n_vocab);
            GLORA_CHECK_ARG(!batch->loss_weights || std::isfinite(batch->loss_weights[i]),
                            "batch: loss weight %g of loss row %d is not finite", (double) (batch->loss_weights ?
                            batch->loss_weights[i] : 0.0f), r);
        }
    }
    return GLORA_OK;
}

std::vector<glora_attn_chunk> glora_attention_chunks(const glora_batch * batch, const glora_graph_options & opt) {
    std::vector<glora_attn_chunk> out;
    const int64_t T = batch->n_tokens;
    if (opt.attn_chunk <= 0 || opt.pad_kv) return out;
    // one sequence of packed samples: each sample's queries against its own keys only
    const int32_t * seg = batch->n_seq == 1 ? batch->segments : nullptr;
    const bool samples = seg && std::any_of(seg + 1, seg + T, [&](int32_t id) { return id != seg[0]; });
    if (!samples && T <= opt.attn_chunk) return out;
    for (int64_t s0 = 0; s0 < T;) {
        int64_t s1 = s0 + 1;
        while (samples && s1 < T && seg[s1] == seg[s0]) ++s1;
        if (!samples) s1 = T;
        for (int64_t r0 = s0; r0 < s1; r0 += opt.attn_chunk) out.push_back({s0, r0, std::min(s1, r0 + opt.attn_chunk)});
        s0 = s1;
    }
    return out;
}

// Key j is visible to query t when it is not later, lies in the same segment and, with a sliding window,
// is fewer than n_swa positions back (src/llama-hparams.h:482-487: masked when p1 - p0 >= n_swa).
static inline bool visible(const int32_t * seg, const int32_t * pos, int64_t j, int64_t t, int32_t n_swa) {
    return j <= t && (!seg || seg[j] == seg[t]) && (n_swa <= 0 || pos[t] - pos[j] < n_swa);
}

void glora_host_inputs_build(const glora_batch * batch, int64_t n_kv, int32_t n_swa, glora_host_inputs * out) {
    // positions restart at every new segment; attention is causal and stays inside a segment
    const int64_t T = batch->n_tokens, S = batch->n_seq, N = T * S;
    out->n_kv = n_kv;
    out->pos.assign((size_t) N, 0);
    out->mask.assign((size_t) (n_kv * T * S), -INFINITY);
    out->mask_swa.assign(n_swa > 0 ? (size_t) (n_kv * T * S) : 0, -INFINITY);
    for (int64_t s = 0; s < S; ++s) {
        const int32_t * seg = batch->segments ? batch->segments + s * T : nullptr;
        int32_t * pos = out->pos.data() + s * T;
        int32_t p = 0;
        for (int64_t t = 0; t < T; ++t) {
            if (seg && t > 0 && seg[t] != seg[t - 1]) p = 0;
            pos[t] = p++;
            if (n_kv == 0) continue;
            float * row = out->mask.data() + (s * T + t) * n_kv;   // query t, keys 0..n_kv-1
            float * row_swa = n_swa > 0 ? out->mask_swa.data() + (s * T + t) * n_kv : nullptr;
            for (int64_t j = 0; j <= t; ++j) {
                if (visible(seg, pos, j, t, 0)) row[j] = 0.0f;
                if (row_swa && visible(seg, pos, j, t, n_swa)) row_swa[j] = 0.0f;
            }
        }
    }
}

void glora_graph_set_inputs(const glora_model * model, const glora_batch * batch, const glora_graph_inputs & in,
                            uint64_t dropout_seed, const glora_host_inputs * host) {
    const int64_t N = (int64_t) batch->n_tokens * batch->n_seq;
    if (in.tokens) ggml_backend_tensor_set(in.tokens, batch->tokens, 0, (size_t) N * sizeof(int32_t));
    if (in.positions) {
        const ggml_tensor * any_mask = in.mask ? in.mask : in.mask_swa;
        const int64_t n_kv = any_mask ? any_mask->ne[0] : 0;
        const int32_t n_swa = in.mask_swa ? model->hp.n_swa : 0;
        glora_host_inputs own;
        if (!host || host->n_kv != n_kv || (n_swa > 0 && host->mask_swa.empty())) {
            glora_host_inputs_build(batch, n_kv, n_swa, &own);
            host = &own;
        }
        ggml_backend_tensor_set(in.positions, host->pos.data(), 0, host->pos.size() * sizeof(int32_t));
        if (in.mask) ggml_backend_tensor_set(in.mask, host->mask.data(), 0, host->mask.size() * sizeof(float));
        if (in.mask_swa) {
            ggml_backend_tensor_set(in.mask_swa, host->mask_swa.data(), 0, host->mask_swa.size() * sizeof(float));
        }
        for (ggml_tensor * z : in.zeros) ggml_backend_tensor_memset(z, 0, 0, ggml_nbytes(z));
        std::vector<float> buf;
        const int32_t * pos_all = host->pos.data();
        for (const glora_graph_inputs::mask_chunk & c : in.mask_chunks) {
            // rows r0..r1 of every sequence, keys k0..r1: causal, inside a segment, within the window
            const int64_t T = batch->n_tokens, rows = c.r1 - c.r0, keys = c.r1 - c.k0;
            for (ggml_tensor * mask : {c.mask, c.mask_swa}) {
                if (!mask) continue;
                const int32_t window = mask == c.mask_swa ? model->hp.n_swa : 0;
                buf.assign((size_t) (keys * rows * batch->n_seq), -INFINITY);
                for (int64_t s = 0; s < batch->n_seq; ++s) {
                    const int32_t * seg = batch->segments ? batch->segments + s * T : nullptr;
                    const int32_t * pos = pos_all + s * T;
                    for (int64_t t = c.r0; t < c.r1; ++t) {
                        float * row = buf.data() + (s * rows + t - c.r0) * keys;
                        for (int64_t j = c.k0; j <= t; ++j) {
                            if (visible(seg, pos, j, t, window)) row[j - c.k0] = 0.0f;
                        }
                    }
                }
                ggml_backend_tensor_set(mask, buf.data(), 0, buf.size() * sizeof(float));
            }
        }
    }

    if (in.loss_rows) {
        ggml_backend_tensor_set(in.loss_rows, batch->loss_rows, 0, (size_t) batch->n_loss * sizeof(int32_t));
    }
    if (in.label_ids && in.label_ids->buffer) {
        ggml_backend_tensor_set(in.label_ids, batch->labels, 0, (size_t) batch->n_loss * sizeof(int32_t));
    }
    if (in.labels && in.labels->buffer) {   // not when the graph's cross-entropy reads the ids instead
        // one-hot [n_vocab, n_loss] written in place: a host copy would be n_vocab·n_loss floats (200 MB
        // for 1024 rows of a 49k vocabulary) on top of the graph's own
        const int64_t V = model->n_vocab;
        const float one = 1.0f;
        ggml_backend_tensor_memset(in.labels, 0, 0, ggml_nbytes(in.labels));
        for (int32_t i = 0; i < batch->n_loss; ++i) {
            ggml_backend_tensor_set(in.labels, &one, (size_t) (i * V + batch->labels[i]) * sizeof(float), sizeof(float));
        }
    }
    if (in.row_weights) {
        ggml_backend_tensor_set(in.row_weights, batch->loss_weights, 0, (size_t) batch->n_loss * sizeof(float));
    }
    if (!in.dropout.empty()) {
        const float p = in.dropout_p, keep = 1.0f / (1.0f - p);
        const uint64_t threshold = (uint64_t) ((double) p * 18446744073709551616.0);
        std::vector<float> buf;
        const int64_t T = batch->n_tokens;
        for (size_t i = 0; i < in.dropout.size(); ++i) {
            ggml_tensor * t = in.dropout[i];
            buf.resize((size_t) ggml_nelements(t));
            const uint64_t base = mix64(dropout_seed ^ mix64(in.dropout_salt[i]));
            if (!batch->seq_keys) {
                for (size_t e = 0; e < buf.size(); ++e) {
                    buf[e] = mix64(base + in.dropout_offset[i] + e) >= threshold ? keep : 0.0f;
                }
            } else {
                // row r of x is token t of sequence s: its mask depends on (base, seq_keys[s], t) only
                const int64_t n_in = t->ne[0], rows = ggml_nelements(t) / n_in;
                for (int64_t r = 0; r < rows; ++r) {
                    const int64_t flat = in.dropout_loss_rows[i] ? batch->loss_rows[r] : r;
                    const uint64_t row_base = mix64(base ^ mix64(~batch->seq_keys[flat / T])) +
                                              (uint64_t) ((flat % T) * n_in);
                    float * out = buf.data() + r * n_in;
                    for (int64_t e = 0; e < n_in; ++e) {
                        out[e] = mix64(row_base + (uint64_t) e) >= threshold ? keep : 0.0f;
                    }
                }
            }
            ggml_backend_tensor_set(t, buf.data(), 0, buf.size() * sizeof(float));
        }
    }
}
