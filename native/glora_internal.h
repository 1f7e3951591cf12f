// Internal declarations shared by the native sources. Not part of the ABI.
#pragma once

#include "ggml_lora.h"

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <map>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

// ---- errors ---------------------------------------------------------------------------------------

// Records a printf-style message as this thread's last error and returns `code`.
// Neither throws: both run inside the guards' catch blocks.
int32_t glora_fail(int32_t code, const char * fmt, ...) noexcept
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void glora_clear_error() noexcept;
void glora_log(int32_t level, const char * fmt, ...) noexcept
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

// ---- the C boundary -------------------------------------------------------------------------------

// Every extern "C" function runs its body through one of the guards below: a C++ exception unwinding
// out of the library (std::bad_alloc from a std::vector, std::length_error, ...) would terminate the
// Python process that called it. Inside a catch block: records the exception as this thread's error
// (std::bad_alloc: GLORA_ERR_OUT_OF_MEMORY, anything else: GLORA_ERR_INTERNAL), naming `fn`.
int32_t glora_exception_status(const char * fn) noexcept;

// For functions that return a status: the body's status, or the exception's.
template <class F> int32_t glora_guard(const char * fn, F && body) noexcept {
    try {
        return body();
    } catch (...) {
        return glora_exception_status(fn);
    }
}

// For functions without a status (void, a pointer, a count): the exception is logged as an error and
// `fallback` returned.
void glora_exception_log(const char * fn) noexcept;
template <class R, class F> R glora_guard_or(const char * fn, R fallback, F && body) noexcept {
    try {
        return body();
    } catch (...) {
        glora_exception_log(fn);
        return fallback;
    }
}
template <class F> void glora_guard_void(const char * fn, F && body) noexcept {
    try {
        body();
    } catch (...) {
        glora_exception_log(fn);
    }
}

#define GLORA_CHECK_ARG(cond, ...) \
    do { if (!(cond)) return glora_fail(GLORA_ERR_INVALID_ARGUMENT, __VA_ARGS__); } while (0)

std::string glora_shape_str(const ggml_tensor * t);

// ---- backends -------------------------------------------------------------------------------------

struct glora_backend_ops;

// The device the model lives on plus the CPU as the scheduler's fallback (the last backend).
struct glora_backends {
    std::vector<ggml_backend_t>             backends;   // [device, ..., cpu]
    std::vector<ggml_backend_buffer_type_t> bufts;
    ggml_backend_t                          main = nullptr;
    ggml_backend_t                          cpu  = nullptr;
    std::string                             device_name;
    int                                     n_threads = 1;   // the CPU backend's
    const glora_backend_ops               * ops = nullptr;     // this device's hooks (see below)
    int64_t                                 max_rows = INT64_MAX;   // token rows one graph may hold here
};

int32_t glora_backends_init(const char * device, int32_t n_threads, glora_backends * out);
void    glora_backends_free(glora_backends * b);

// A scheduler, and how many graph nodes plus leafs its tables hold. ggml sizes those tables when it
// makes the scheduler and asserts that every graph it is given fits them (ggml_backend_sched_alloc_graph,
// ggml_backend_sched_reserve_size); glora_sched_fit replaces the scheduler by a larger one first.
struct glora_sched {
    ggml_backend_sched_t sched    = nullptr;
    size_t               capacity = 0;
    bool                 profile  = false;   // attach glora_profile (the schedulers that run graphs)

    glora_sched() = default;
    glora_sched(const glora_sched &) = delete;
    glora_sched & operator=(const glora_sched &) = delete;
    ~glora_sched() { release(); }
    void release();
};
int32_t glora_sched_fit(const glora_backends & be, glora_sched * s, ggml_cgraph * gf);

// Where the nodes of the graphs run so far were placed, tallied at allocation (glora_graph_alloc).
struct glora_placement_tally {
    double                         device_work = 0, cpu_work = 0;
    int64_t                        device_nodes = 0, cpu_nodes = 0;
    std::map<std::string, std::pair<int64_t, double>> cpu_ops;   // op name -> (nodes, work)

    void record(const glora_backends & be, ggml_backend_sched_t sched, ggml_cgraph * gf);
    void clear() { *this = glora_placement_tally(); }
};

// ---- model ----------------------------------------------------------------------------------------

struct glora_layer {
    ggml_tensor * attn_norm = nullptr;      // ne = [n_embd]
    ggml_tensor * wq = nullptr;             // ne = [n_embd, n_head*head_dim]
    ggml_tensor * wk = nullptr;             // ne = [n_embd, n_head_kv*head_dim]
    ggml_tensor * wv = nullptr;             // ne = [n_embd, n_head_kv*head_dim]
    ggml_tensor * wo = nullptr;             // ne = [n_head*head_dim, n_embd]
    ggml_tensor * bq = nullptr;             // optional biases (qwen2), ne = [n_out]
    ggml_tensor * bk = nullptr;
    ggml_tensor * bv = nullptr;
    ggml_tensor * bo = nullptr;
    ggml_tensor * q_norm = nullptr;         // optional per-head RMS norm (qwen3), ne = [head_dim]
    ggml_tensor * k_norm = nullptr;
    ggml_tensor * ffn_norm = nullptr;       // ne = [n_embd]
    ggml_tensor * ffn_gate = nullptr;       // ne = [n_embd, n_ff]
    ggml_tensor * ffn_up = nullptr;         // ne = [n_embd, n_ff]
    ggml_tensor * ffn_down = nullptr;       // ne = [n_ff, n_embd]
    // gemma2/gemma3: "sandwich" norms of the attention and FFN outputs, before their residual adds
    ggml_tensor * attn_post_norm = nullptr; // ne = [n_embd]
    ggml_tensor * ffn_post_norm = nullptr;  // ne = [n_embd]
    // phi3: Q, K and V in one matrix, ne = [n_embd, n_q + 2*n_kv], in place of wq/wk/wv; and ffn_up
    // holding gate and up, ne = [n_embd, 2*n_ff] (gate first), with ffn_gate NULL
    ggml_tensor * wqkv = nullptr;
    bool          swa = false;              // attends within the model's sliding window only

    // The frozen projection matrices the block has (the non-NULL ones): LoRA targets, copy sources.
    std::vector<ggml_tensor *> projections() const {
        std::vector<ggml_tensor *> out;
        for (ggml_tensor * w : {wq, wk, wv, wqkv, wo, ffn_gate, ffn_up, ffn_down}) {
            if (w) out.push_back(w);
        }
        return out;
    }
};

// Working copies of some weights, keyed by the weight they copy, in one buffer.
struct glora_weight_copies {
    ggml_context          * ctx = nullptr;
    ggml_backend_buffer_t   buf = nullptr;
    std::unordered_map<const ggml_tensor *, ggml_tensor *> of;
    std::unordered_map<const ggml_tensor *, const ggml_tensor *> source;   // copy -> weight

    void     release();
    uint64_t nbytes() const;
};

// Copies of some weights in the CPU's extra buffer types (ggml-cpu/repack.cpp's CPU_REPACK), which lay
// them out for their own kernels, as llama.cpp's loader places them.
struct glora_llama_weights {
    bool                                     ready = false;
    ggml_context                           * ctx = nullptr;
    std::vector<ggml_backend_buffer_t>       bufs;
    std::unordered_map<const ggml_tensor *, ggml_tensor *> of;

    void release();
};

// One part of the model file mapped into memory (a gguf-split model has several), its weights views into it.
struct glora_mapped_file {
    void                  * addr = nullptr;
    size_t                  size = 0;
    ggml_backend_buffer_t   buf  = nullptr;   // a CPU buffer over [addr, addr + size)
};

// Per-thread working memory of the AMX products (glora_amx.cpp), sized on the calling thread when a
// graph is rewritten, read by ggml's worker threads when it runs.
struct glora_amx_scratch {
    std::vector<uint8_t> buf;
    uint8_t            * data = nullptr;     // buf aligned to 64 bytes
    size_t               per_thread = 0;
    int                  n_threads = 0;
};

struct glora_model {
    glora_model_params       hp;             // copied; hp.device points into device_name
    std::string              path;
    int64_t                  n_embd  = 0;
    int64_t                  n_vocab = 0;
    int64_t                  n_ff    = 0;

    glora_backends           be;
    ggml_context           * ctx_w   = nullptr;   // tensor metadata of every weight, of every part
    ggml_backend_buffer_t    buf_w   = nullptr;   // their data on the main device, when read from the file
    std::vector<glora_mapped_file> maps;          // or (CPU, use_mmap) the mapped files, one per part
    std::vector<ggml_tensor *> tensors;           // in file order, parts in order

    ggml_tensor            * tok_embd    = nullptr;   // ne = [n_embd, n_vocab]
    ggml_tensor            * output_norm = nullptr;   // ne = [n_embd]
    ggml_tensor            * output      = nullptr;   // ne = [n_embd, n_vocab]; == tok_embd when tied
    ggml_tensor            * rope_freqs  = nullptr;   // optional, ne = [n_rot/2]
    std::vector<glora_layer> layers;

    glora_sched              sched;                   // runs every graph of the model
    glora_placement_tally    placement;               // where the graphs' work ran (glora_model_placement)

    // Transposed working copies for the backward pass: weight ne = [n_in, n_out] -> ne = [n_out, n_in]
    // (F16; F32 and BF16 weights keep their type). dx = Wᵀ·dy then runs as mul_mat, which every backend has and
    // runs fast, instead of out_prod through a quantized W (CPU only, and slow there).
    glora_weight_copies      wt;
    // Optional F16 copies of the quantized weights, same shape, for a training forward that trades
    // memory and llama.cpp's exact arithmetic for speed (glora_trainer_params.f16_weights).
    glora_weight_copies      wf;
    // Twins of the weights llama.cpp stores repacked in the CPU's extra buffer types, for the
    // llama.cpp-exact forward (glora_model_prepare_llama_weights); made on first use.
    glora_llama_weights      wr;
    bool                     llama_weights = false;   // glora_logits uses wr (glora_model_set_llama_weights)
    // Products on AMX tiles in BF16, transposed copies in BF16, no forward copies (glora_model_set_bf16).
    bool                     bf16 = false;
    mutable glora_amx_scratch amx;

    // The frozen matrices a backward product may run through: every projection and the LM head.
    std::unordered_set<const ggml_tensor *> matrices;

    // The persistent transposed copy of w, which is a weight or its F16 forward copy; NULL if none.
    ggml_tensor * transposed(const ggml_tensor * w) const;
    // The base weight of w when w is a frozen matrix or its F16 forward copy; NULL otherwise.
    const ggml_tensor * frozen_matrix(const ggml_tensor * w) const;
    // Whether w is the backward's transient transposed copy of a frozen matrix, made in the graph by a
    // custom op from it (transient_transposed in glora_backward.cpp).
    bool transient_copy(const ggml_tensor * w) const {
        return w->op == GGML_OP_CUSTOM && w->src[0] && frozen_matrix(w->src[0]);
    }
    ggml_tensor * find(const char * name) const;
    uint64_t weights_nbytes() const;              // what the weights' buffers (or mappings) hold
};

// The op_params slot of a mul_mat that the graph builder marks products in for the rewrites that follow
// (glora_hint); ggml leaves it unused (0: precision, 1: hint).
constexpr int GLORA_MARK_SLOT = GGML_MAX_OP_PARAMS / sizeof(int32_t) - 1;

// ---- adapters -------------------------------------------------------------------------------------

struct glora_pair {
    const ggml_tensor * weight = nullptr;   // the base weight, ne = [n_in, n_out]
    ggml_tensor       * a = nullptr;        // ne = [n_in, rank]
    ggml_tensor       * b = nullptr;        // ne = [rank, n_out]
    int32_t             rank = 0;
    float               scale = 0.0f;       // > 0: the pair's factor in place of alpha / rank
};

struct glora_adapter {
    glora_model           * model = nullptr;
    float                   alpha = 0.0f;
    ggml_context          * ctx = nullptr;
    ggml_backend_buffer_t   buf = nullptr;
    std::vector<glora_pair> pairs;

    const glora_pair * find(const ggml_tensor * weight) const;
};

// ---- graph ----------------------------------------------------------------------------------------

struct glora_active_adapter {
    const glora_adapter * adapter;
    float                 scale;            // user scale; the pair scale alpha/rank is applied on top
};

// Inputs of one forward graph, filled after allocation by glora_graph_set_inputs.
struct glora_graph_inputs {
    ggml_tensor * tokens    = nullptr;      // I32 [n_seq*n_tokens]
    ggml_tensor * positions = nullptr;      // I32 [n_seq*n_tokens]
    ggml_tensor * mask      = nullptr;      // F32 [n_kv, n_tokens, 1, n_seq], 0 or -INF; n_kv >= n_tokens
    // or, for causal attention in query chunks, one mask per chunk: queries [r0, r1) see keys [k0, r1)
    ggml_tensor * mask_swa  = nullptr;      // the same for sliding-window layers (models with them)
    struct mask_chunk { ggml_tensor * mask; int64_t k0, r0, r1; ggml_tensor * mask_swa; };   // mask: F32 [r1 - k0, r1 - r0, 1, n_seq]
    std::vector<mask_chunk> mask_chunks;
    std::vector<ggml_tensor *> zeros;       // inputs set to 0
    ggml_tensor * loss_rows = nullptr;      // I32 [n_loss]
    ggml_tensor * labels    = nullptr;      // F32 [n_vocab, n_loss] one-hot (unallocated when unused)
    ggml_tensor * label_ids = nullptr;      // I32 [n_loss]: the same labels as token ids (CPU kernels)
    ggml_tensor * row_weights = nullptr;    // F32 [1, n_loss] batch->loss_weights (training with them)
    std::vector<ggml_tensor *> dropout;     // F32 masks, one per LoRA pair input when dropout > 0
    std::vector<uint64_t>      dropout_salt;
    std::vector<uint64_t>      dropout_offset;  // of element 0 in the mask of the whole batch
    std::vector<uint8_t>       dropout_loss_rows;  // 1: the mask's rows are the batch's loss rows (LM head)
    float                      dropout_p = 0.0f;
};

struct glora_graph_options {
    std::vector<glora_active_adapter> adapters;
    float dropout = 0.0f;                   // on the input of every A, training only
    // Pad the keys to a multiple of 256 with masked zeros, as llama.cpp's KV cache does, so the
    // attention sums group exactly like llama.cpp's (forward only: ggml_pad has no backward).
    bool  pad_kv  = false;
    // Give every query head its own copy of K and V instead of broadcasting the shared KV heads: the
    // backward of a broadcast mul_mat only supports one sequence (ggml.c, GGML_OP_MUL_MAT backward).
    // Training graphs (and the loss graph, which must match them) set it; they also make q contiguous
    // and scale LoRA's [rank, N] product rather than the [n_out, N] one (llama.cpp's order).
    bool  expand_gqa = false;
    // Causal attention in chunks of this many queries, each against the keys up to its last query
    // only: about half the products and softmax of the full T x T square over long rows (0: off;
    // training graphs without padded keys only). A single sequence of packed samples is chunked at
    // their boundaries too, each chunk against its own sample's keys (glora_attention_chunks).
    int64_t attn_chunk = 0;
    // Matmuls through the model's F16 copies of its quantized weights (glora_model::wf) where it has them.
    bool  f16_weights = false;
    // Matmuls through the twins of glora_model::wr where it has them: llama.cpp's kernels for those
    // weights (the llama.cpp-exact forward of glora_logits).
    bool  llama_weights = false;
    // A slice of the model, for gradient checkpointing: blocks [layer_begin, layer_end) (layer_end < 0:
    // all), starting from x_in ne = [n_embd, n_seq*n_tokens] instead of the token embeddings when set,
    // and ending at the last block's output instead of the logits when head is false.
    int32_t       layer_begin = 0;
    int32_t       layer_end   = -1;
    ggml_tensor * x_in        = nullptr;
    bool          head        = true;
    // The loss rows are batch rows [loss_row0, loss_row0 + n_loss) of a larger batch (the head in
    // chunks): the head's dropout mask is then that slice of the whole batch's mask.
    int64_t       loss_row0   = 0;
};

// Positions and attention mask of one batch on the host, built once and uploaded into every graph of a
// step (gradient checkpointing runs two graphs per block).
struct glora_host_inputs {
    std::vector<int32_t> pos;               // [n_seq*n_tokens]
    std::vector<float>   mask;              // [n_kv, n_tokens, 1, n_seq]
    std::vector<float>   mask_swa;          // the same within the sliding window (n_swa > 0)
    int64_t              n_kv = 0;
};
// n_kv = 0: positions only (graphs whose attention runs in chunks fill their masks from the batch).
// n_swa > 0: also the sliding-window mask.
void glora_host_inputs_build(const glora_batch * batch, int64_t n_kv, int32_t n_swa, glora_host_inputs * out);

// The query chunks {k0, r0, r1} of a graph's attention (queries [r0, r1) against keys [k0, r1)), or
// none for one mask over the whole square: with opt.attn_chunk, rows longer than a chunk, and a single
// sequence of several packed samples (one chunk per sample, or more for a long one).
struct glora_attn_chunk { int64_t k0, r0, r1; };
std::vector<glora_attn_chunk> glora_attention_chunks(const glora_batch * batch, const glora_graph_options & opt);

constexpr int64_t GLORA_KV_PAD = 256;       // llama_kv_cache::get_n_kv pads to max(n_pad, 256)
constexpr int64_t GLORA_ATTN_CHUNK = 256;   // query chunk of the training graphs' attention
// Loss rows per LM-head chunk (gradient checkpointing, and the loss of batches with more rows).
int64_t glora_head_chunk_rows(const glora_model * model);
// A leaf of graph context ctx that is the allocated tensor t (same buffer and data), for graphs that
// read or accumulate into a tensor outside their own allocation.
ggml_tensor * glora_bind(ggml_context * ctx, const ggml_tensor * t);

// Builds the forward pass; returns logits ne = [n_vocab, n_seq*n_tokens] (or only the loss rows when
// batch->n_loss > 0 and rows_only).
ggml_tensor * glora_build_forward(ggml_context * ctx, const glora_model * model, const glora_batch * batch,
                                  const glora_graph_options & opt, bool rows_only, glora_graph_inputs * in);
// Cross-entropy of row_logits · logit_scale summed over the loss rows, times `weight`: a scalar. With
// `row_weights`, also an input in->row_weights for the backward's per-row weights (glora_weight_loss_rows).
ggml_tensor * glora_build_loss(ggml_context * ctx, ggml_tensor * row_logits, float weight, glora_graph_inputs * in,
                               bool row_weights = false, float logit_scale = 1.0f);
// batch->logit_scale with 0 (a zeroed struct) read as 1
inline float glora_logit_scale(const glora_batch * batch) { return batch->logit_scale == 0.0f ? 1.0f : batch->logit_scale; }
// Uploads tokens, positions, mask, rows, labels and dropout masks (those the graph has); host may be NULL.
void glora_graph_set_inputs(const glora_model * model, const glora_batch * batch, const glora_graph_inputs & in,
                            uint64_t dropout_seed, const glora_host_inputs * host = nullptr);

int32_t glora_validate_batch(const glora_model * model, const glora_batch * batch, bool need_loss);

// Build the working copies once per model (no-op when they exist).
int32_t glora_model_prepare_backward(glora_model * model);
// The type of a working copy of w: F32 for F32, BF16 for BF16 (F16 overflows above 65504), else F16,
// or BF16 when the model's copies are BF16 (glora_model_set_bf16).
ggml_type glora_copy_type(const glora_model * m, const ggml_tensor * w);

int32_t glora_model_prepare_f16_forward(glora_model * model);

// ---- backend-specific code ------------------------------------------------------------------------
//
// The graph code says what it computes; what a backend does beyond ggml's own ops is in its table of
// hooks (glora_backend_ops), chosen once per model from its device (glora_backends_init). The CPU's is
// native/cpu/ (our kernels as custom ops, AMX and FMA products, transposes, cross-entropy). A device
// without a table of its own (Vulkan, CUDA, Metal) gets glora_ggml_backend_ops: ggml's ops as built.
// Adding a backend's special code is a table in a folder of its own and a line in glora_backends_init.

// What the graph builder says of a product, kept in op_params[GLORA_MARK_SLOT]: a backend's rewrite may
// choose a kernel for it (reduced precision included), and one that knows no kernel leaves it alone.
enum glora_product_hint : int32_t {
    GLORA_HINT_NONE      = 0,
    GLORA_HINT_FROZEN    = 0x4e5a5246,   // a training forward's product through a stored frozen matrix
    GLORA_HINT_ATTENTION = 0x4e545441,   // a training forward's attention product (q·k, p·v)
};
inline void glora_hint(ggml_tensor * product, glora_product_hint hint) { product->op_params[GLORA_MARK_SLOT] = hint; }
inline glora_product_hint glora_hint_of(const ggml_tensor * product) {
    return (glora_product_hint) product->op_params[GLORA_MARK_SLOT];
}

struct glora_backend_ops {
    const char * name;
    // products in bfloat16 on tiles (glora_model_set_bf16)
    bool (*bf16_tiles)();
    // wᵀ in out_type (ne = [n_out, n_in]), made inside a graph from the frozen matrix w of any stored type
    ggml_tensor * (*transposed_weight)(ggml_context * ctx, ggml_tensor * w, ggml_type out_type);
    // tᵀ, contiguous, for an F32 t of any strides
    ggml_tensor * (*transposed_f32)(ggml_context * ctx, ggml_tensor * t);
    // a training or loss graph with the backend's kernels in it: gf (changed in place or not) or a new graph
    // of the same computation made in ctx. `stale`: nodes of gf have new sources that gf does not hold
    // yet, so the result must be a graph rebuilt in order (glora_graph_in_order; the graph context has
    // room for two rebuilds). Every graph whose numbers must agree with a training graph's goes through
    // it (glora_faster_products).
    ggml_cgraph * (*rewrite)(const glora_model * m, ggml_context * ctx, ggml_cgraph * gf, size_t graph_size,
                             bool stale);
};
extern const glora_backend_ops glora_ggml_backend_ops;   // glora_core.cpp
extern const glora_backend_ops glora_cpu_backend_ops;    // cpu/glora_cpu_backend.cpp

// The nodes of gf, in order, in a new graph; expanding each pulls in the nodes a rewrite gave it.
ggml_cgraph * glora_graph_in_order(ggml_context * ctx, ggml_cgraph * gf, size_t graph_size);

// -- the CPU's (native/cpu/) --
// AMX-BF16 tiles usable by this process (CPU support, and Linux granted the tile state); the first call asks.
bool glora_amx_available();
// Products through BF16 working copies of frozen matrices, and hinted ones, run on AMX tiles (model->bf16);
// true when it added nodes (each x rounded to BF16 once), so that gf must be rebuilt in order.
bool glora_amx_products(const glora_model * m, ggml_context * ctx, ggml_cgraph * gf);
// The twins of glora_model::wr (no-op when made, or off the CPU).
int32_t glora_model_prepare_llama_weights(glora_model * model);
// node becomes the custom op fn (all threads, userdata) in place, keeping its sources; the op's parameters
// come from *tmpl, one template tensor per graph and op made on first use (so a rewrite adds one tensor
// to the graph's context, not one per node).
void glora_as_custom(ggml_context * ctx, ggml_tensor * node, ggml_tensor ** tmpl, ggml_custom_op_t fn, void * userdata);
// d[i0·ld + i1] = the float at s + i0·4 + i1·ls bytes, for i0 < n0, i1 < n1: a tile of a transpose.
void glora_transpose_tile(const char * s, size_t ls, float * d, int64_t ld, int64_t n0, int64_t n1);
// The F32 out_prods of gf run as a CPU kernel of our own (glora_cpu_kernels.cpp), in place.
void glora_out_prods(ggml_context * ctx, ggml_cgraph * gf);
// Products through the frozen matrices' working copies, and those hinted GLORA_HINT_FROZEN, on a CPU
// without AVX-512, in place: our FMA kernel (glora_cpu_kernels.cpp) instead of ggml's. Returns whether any changed.
bool glora_fma_products(const glora_model * m, ggml_context * ctx, ggml_cgraph * gf);
// The cross-entropy and its gradient of gf run as CPU kernels of our own that read token ids instead of
// one-hot labels (glora_cpu_kernels.cpp), in place; true when gf changed (rebuild it to drop the labels).
bool glora_cross_entropy_ops(ggml_context * ctx, ggml_cgraph * gf);

// Node budget of the graph glora_build_forward builds from (batch, opt), with ggml's backward and the
// rewrites of glora_backward.cpp when `backward`: an upper bound on its nodes and on its leafs, from the
// blocks, LoRA pairs and attention chunks it holds. Sizes its context and ggml_new_graph_custom.
size_t glora_graph_budget(const glora_model * model, const glora_batch * batch, const glora_graph_options & opt,
                          bool backward);
// The largest budget this build takes on (the graph's metadata alone is ~1 KiB a node).
constexpr size_t GLORA_MAX_GRAPH_NODES = (size_t) 1 << 21;
// GLORA_ERR_INVALID_ARGUMENT, naming the length and the longest that fits, when that graph's budget is
// over GLORA_MAX_GRAPH_NODES; entry points call it before they build any graph.
int32_t glora_check_graph_budget(const glora_model * model, const glora_batch * batch, const glora_graph_options & opt,
                                 bool backward);

// A context for the metadata of a graph of n_nodes (and of two rewrites of it), sized from ggml's own overheads.
ggml_context * glora_graph_ctx(size_t n_nodes);

// Allocates the graph's tensors with the model's scheduler, and runs it.
int32_t glora_graph_alloc(glora_model * model, ggml_cgraph * gf);
int32_t glora_graph_compute(glora_model * model, ggml_cgraph * gf);
// The training graphs' products in their fastest CPU form: big out_prods as mul_mat of transposed
// operands, mul_mats with short dot products (LoRA's rank) as out_prod. Returns gf, or a new graph of
// the same computation (allocated in ctx) when any node changed. Every graph whose numbers must agree
// with a training graph's (the loss graph, the checkpointed forward) goes through it too.
ggml_cgraph * glora_faster_products(const glora_model * model, ggml_context * ctx, ggml_cgraph * gf, size_t graph_size);
// With GGML_LORA_PROFILE=1: times every node the scheduler runs, by op, and prints a table at exit.
void glora_profile_attach(ggml_backend_sched_t sched);

// ---- trainer --------------------------------------------------------------------------------------

// Gradient accumulators and optimizer moments mirror the adapter's pairs one to one:
// params_t = [A0, B0, A1, B1, ...] and grad/m/v in the same order and shapes.
struct glora_trainer {
    glora_adapter        * adapter = nullptr;
    glora_trainer_params   params{};
    ggml_context         * ctx_grad = nullptr;
    ggml_context         * ctx_opt  = nullptr;
    ggml_backend_buffer_t  buf_grad = nullptr;
    ggml_backend_buffer_t  buf_opt  = nullptr;
    std::vector<ggml_tensor *> params_t, grad, m, v;

    // gradient checkpointing: the input of every block and of the head, x_0 .. x_{n_layer}, and two
    // gradient buffers used in turn (d x_{i+1} in, d x_i out); each ne = [n_embd, n_rows], kept
    // between steps while the batch size stays the same
    ggml_context         * ctx_ckpt = nullptr;
    ggml_backend_buffer_t  buf_ckpt = nullptr;
    std::vector<ggml_tensor *> ckpt;
    ggml_tensor          * dx[2] = {nullptr, nullptr};
    int64_t                ckpt_rows = 0;
};

// glora_backward.cpp: forward + backward of one micro-batch into the accumulators. With measure set,
// nothing runs: *measure gets the largest compute buffer the step's graphs need (bytes).
int32_t glora_trainer_backward(glora_trainer * trainer, const glora_batch * batch, float loss_weight,
                               uint64_t dropout_seed, double * out_loss_sum, size_t * measure = nullptr);
void    glora_trainer_release_checkpoints(glora_trainer * trainer);
