/*
 * ggml_lora.h: the whole C ABI of ggml-lora.
 *
 * Python reads the declarations between the cffi markers below (preprocessor lines removed) and opens
 * the library in cffi ABI mode, so this header stays cffi-clean: standard integer types, no ggml types,
 * no function-like macros.
 *
 * Conventions
 *   - Every function that can fail returns an int32_t status (GLORA_OK = 0). On failure a message that
 *     names the file, tensor, shape or argument is kept per thread; glora_last_error() returns it.
 *   - Nothing here calls exit/abort/printf. Inputs are validated before ggml sees them.
 *   - Shapes in comments are in ggml order: ne = [n_in, n_out] for a weight W of numpy shape (n_out, n_in).
 *   - LoRA tensors: lora_a ne = [n_in, rank], lora_b ne = [rank, n_out], both F32, row-major; as numpy,
 *     lora_a is (rank, n_in) and lora_b is (n_out, rank), the PEFT layout.
 */
#ifndef GGML_LORA_H
#define GGML_LORA_H

#include <stddef.h>
#include <stdint.h>

#if defined(GLORA_BUILD)
#  if defined(_WIN32)
#    define GLORA_API __declspec(dllexport)
#  else
#    define GLORA_API __attribute__((visibility("default")))
#  endif
#else
#  define GLORA_API
#endif

#define GLORA_ABI_VERSION 16

#ifdef __cplusplus
extern "C" {
#endif

/* cffi-begin */

/* ---------------------------------------------------------------------------------------------- */
/* status, errors, logging                                                                         */
/* ---------------------------------------------------------------------------------------------- */

enum glora_status {
    GLORA_OK                   = 0,
    GLORA_ERR_INVALID_ARGUMENT = 1,  /* a caller-supplied value is out of range or inconsistent     */
    GLORA_ERR_IO               = 2,  /* a file could not be opened or read                           */
    GLORA_ERR_FORMAT           = 3,  /* a file is not what it claims (bad GGUF, missing tensor, ...) */
    GLORA_ERR_UNSUPPORTED      = 4,  /* valid, but not something this build can do                   */
    GLORA_ERR_OUT_OF_MEMORY    = 5,  /* a buffer could not be allocated                              */
    GLORA_ERR_BACKEND          = 6,  /* a ggml backend failed to compute                             */
    GLORA_ERR_INTERNAL         = 7   /* a bug in ggml-lora                                           */
};

typedef void (*glora_log_callback)(int32_t level, const char * text, void * user_data);

GLORA_API int32_t      glora_abi_version(void);             /* == GLORA_ABI_VERSION of the build  */
GLORA_API const char * glora_last_error(void);              /* this thread's last error message   */
/* level follows ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 cont. NULL restores the default
 * (drop everything). The callback may be called from ggml's worker threads. */
GLORA_API void         glora_set_log_callback(glora_log_callback callback, void * user_data);

/* ---------------------------------------------------------------------------------------------- */
/* devices                                                                                         */
/* ---------------------------------------------------------------------------------------------- */

enum glora_device_type {
    GLORA_DEVICE_CPU   = 0,
    GLORA_DEVICE_GPU   = 1,
    GLORA_DEVICE_IGPU  = 2,
    GLORA_DEVICE_ACCEL = 3
};

typedef struct glora_device_info {
    char     name[128];          /* ggml device name, e.g. "CPU", "CUDA0"      */
    char     description[256];   /* human-readable, e.g. the CPU or GPU model  */
    int32_t  type;               /* enum glora_device_type                     */
    uint64_t memory_free;        /* bytes                                      */
    uint64_t memory_total;       /* bytes                                      */
} glora_device_info;

GLORA_API int32_t glora_device_count(void);
GLORA_API int32_t glora_device_get(int32_t index, glora_device_info * out);

/* ---------------------------------------------------------------------------------------------- */
/* base model                                                                                      */
/* ---------------------------------------------------------------------------------------------- */

typedef struct glora_model   glora_model;
typedef struct glora_adapter glora_adapter;
typedef struct glora_trainer glora_trainer;

enum glora_rope_type {
    GLORA_ROPE_NORM = 0,         /* rotate adjacent pairs (x[2i], x[2i+1])      */
    GLORA_ROPE_NEOX = 2          /* rotate halves (x[i], x[i + n_rot/2])        */
};

enum glora_ffn_act {
    GLORA_FFN_SWIGLU = 0,        /* silu(gate·x) * (up·x): llama, qwen, phi3 (gate and up fused)  */
    GLORA_FFN_GEGLU  = 1         /* gelu(gate·x) * (up·x), ggml's tanh GELU: gemma2, gemma3       */
};

/* What the GGUF's metadata says about the architecture; the Python side reads and checks it. The
 * tensors themselves (and so n_embd, n_ff, n_vocab, biases, q/k norms) come from the file. */
typedef struct glora_model_params {
    const char * device;         /* ggml device name, or "auto" (first GPU, else CPU)            */
    int32_t      n_threads;      /* CPU threads; <= 0 means all cores                            */
    int32_t      n_layer;        /* blocks blk.0 .. blk.{n_layer-1}                              */
    int32_t      n_head;         /* query heads                                                  */
    int32_t      n_head_kv;      /* key/value heads (GQA when < n_head)                          */
    int32_t      head_dim;       /* per-head size of q, k and v                                  */
    int32_t      n_rot;          /* rotated dimensions per head                                  */
    int32_t      rope_type;      /* enum glora_rope_type                                         */
    int32_t      n_ctx_orig;     /* training context of the base model (rope's n_ctx_orig)      */
    float        rope_freq_base;
    float        rope_freq_scale;
    float        rms_eps;
    float        kq_scale;       /* attention logit scale, usually 1/sqrt(head_dim)              */
    int32_t      use_mmap;       /* CPU: map the file instead of reading it (weights cost only the
                                  * pages touched, shared with the page cache); ignored elsewhere  */
    /* What an architecture does differently from llama; zero everywhere is llama's block. */
    float        embd_scale;     /* token embeddings times this (gemma: sqrt(n_embd)); 0 means 1  */
    int32_t      ffn_act;        /* enum glora_ffn_act                                           */
    int32_t      scale_q;        /* 1: Q times kq_scale before the product and softmax scale 1, as
                                  * llama.cpp's gemma and phi3 graphs do; 0: scale in the softmax  */
    float        attn_softcap;   /* cap·tanh(kq/cap) on the attention logits (gemma2); 0: none   */
    float        final_softcap;  /* cap·tanh(logits/cap) (gemma2, some gemma3); 0: none          */
    int32_t      n_swa;          /* sliding window: key p0 hidden from query p1 when p1-p0 >= n_swa,
                                  * in the layers flagged in swa_layers; 0: no sliding window     */
    const uint8_t * swa_layers;  /* n_layer flags (1: sliding-window layer), read at load; may be
                                  * NULL when n_swa is 0                                           */
    float        rope_freq_base_swa;   /* rope of the sliding-window layers                      */
    float        rope_freq_scale_swa;
} glora_model_params;

typedef struct glora_tensor_info {
    char     name[128];
    int32_t  type;               /* ggml type id                                                 */
    int32_t  n_dims;
    int64_t  ne[4];
    uint64_t nbytes;
} glora_tensor_info;

GLORA_API int32_t glora_model_load(const char * path, const glora_model_params * params, glora_model ** out);
GLORA_API void    glora_model_free(glora_model * model);
/* the device the model lives on, as in glora_device_info.name */
GLORA_API const char * glora_model_device(const glora_model * model);
GLORA_API int32_t glora_model_n_tensors(const glora_model * model);
GLORA_API int32_t glora_model_tensor_info(const glora_model * model, int32_t index, glora_tensor_info * out);
/* Where the work of the graphs run since the last reset went (ggml's scheduler may place an op the
 * model's device lacks on the CPU). Work is estimated per node: 2·M·N·K for a product (MUL_MAT,
 * OUT_PROD), one per output value for other ops; views and reshapes count nothing. */
typedef struct glora_placement {
    double  device_work;         /* on the model's device                                          */
    double  cpu_work;            /* on the CPU as the scheduler's fallback (0 when the device is
                                    the CPU)                                                         */
    int64_t device_nodes;
    int64_t cpu_nodes;
    char    cpu_ops[512];        /* the fallback's ops, most work first: "SOFT_MAX_BACK x24, ..."    */
} glora_placement;
/* reset != 0 clears the tally after reading it */
GLORA_API int32_t glora_model_placement(glora_model * model, int32_t reset, glora_placement * out);
/* raw stored bytes of a weight (size = nbytes), e.g. to prove a training step left it unchanged */
GLORA_API int32_t glora_model_read_tensor(const glora_model * model, const char * name, void * dst, uint64_t size);
/* 1 when this CPU has AMX-BF16 tiles and Linux granted this process their state, else 0 */
GLORA_API int32_t glora_cpu_has_amx_bf16(void);
/* The instruction sets this library's ggml CPU backend was built for (ggml's CPU feature list, as
 * llama.cpp's system info prints it: "AVX2=1;FMA=1;..."), into out (size bytes, NUL-terminated,
 * truncated to fit); returns the length of the whole list. */
GLORA_API int32_t glora_cpu_features(char * out, uint64_t size);
/* bf16 != 0: the products through the frozen weights run on AMX tiles, activations rounded to BF16, sums
 * in F32: the training forward of glora_trainer_params.f16_weights reads the stored blocks (no forward
 * copies) and the backward's transposed copies are BF16 instead of F16. CPU with
 * AMX-BF16 only (GLORA_ERR_UNSUPPORTED elsewhere). Copies already made in the other type are dropped:
 * a trainer made before with keep_transposed then makes its transposed copies step by step. */
GLORA_API int32_t glora_model_set_bf16(glora_model * model, int32_t bf16);

/* ---------------------------------------------------------------------------------------------- */
/* adapters: LoRA pairs on named base weights                                                      */
/* ---------------------------------------------------------------------------------------------- */

/* n_targets weights by GGUF name (e.g. "blk.3.attn_q.weight"), each with its rank. The scale of a pair
 * is alpha / rank, as llama.cpp applies it. A and B start at zero. */
GLORA_API int32_t glora_adapter_new(glora_model * model, int32_t n_targets, const char * const * weight_names,
                                    const int32_t * ranks, float alpha, glora_adapter ** out);
GLORA_API void    glora_adapter_free(glora_adapter * adapter);
/* which: 0 = lora_a (n = n_in*rank), 1 = lora_b (n = rank*n_out); float32 in ggml (row-major) order */
GLORA_API int32_t glora_adapter_set(glora_adapter * adapter, int32_t target, int32_t which, const float * data, int64_t n);
GLORA_API int32_t glora_adapter_get(const glora_adapter * adapter, int32_t target, int32_t which, float * data, int64_t n);
/* The factor on B·A·x of one pair in place of alpha / rank (PEFT's per-module lora_alpha, rsLoRA's
 * alpha / sqrt(rank) with mixed ranks); 0 restores alpha / rank. A user scale still multiplies it. */
GLORA_API int32_t glora_adapter_set_pair_scale(glora_adapter * adapter, int32_t target, float scale);

/* ---------------------------------------------------------------------------------------------- */
/* forward                                                                                         */
/* ---------------------------------------------------------------------------------------------- */

/* A batch of n_seq sequences of n_tokens each; row r of the flattened batch is seq r / n_tokens,
 * position r % n_tokens. loss_rows/labels may be NULL when only logits are wanted. */
typedef struct glora_batch {
    const int32_t * tokens;      /* [n_seq * n_tokens] token ids                                  */
    int32_t         n_seq;
    int32_t         n_tokens;
    const int32_t * segments;    /* NULL, or [n_seq * n_tokens] sample ids: attention stays inside
                                    a sample and positions restart at each new id (packing)       */
    const int32_t * loss_rows;   /* [n_loss] flattened rows whose logits carry loss, ascending    */
    const int32_t * labels;      /* [n_loss] next-token targets for those rows                    */
    int32_t         n_loss;
    const float   * loss_weights; /* NULL (every row 1), or [n_loss] finite weights of any sign: the
                                    training gradient is that of sum_r w_r * CE_r (preference losses
                                    are such sums); losses reported stay the unweighted CE sums     */
    const uint64_t * seq_keys;   /* NULL, or [n_seq] keys of the sequences' dropout masks: the mask of
                                    token t of sequence s then depends on (dropout seed, LoRA pair,
                                    seq_keys[s], t) only, not on the batch it sits in nor its padding,
                                    so one row gets the same mask however the step is split into
                                    micro-batches or processes. NULL: keyed by the flat position in
                                    this batch                                                      */
    float           logit_scale; /* 0 (a zeroed struct) or 1: the loss rows' logits as computed; else
                                    each is multiplied by it before the softmax of the loss, in the
                                    forward and its gradient (GRPO scores sampled tokens with
                                    logits / temperature); finite and > 0. glora_logits ignores it  */
} glora_batch;

/* logits for every position: out = [n_seq * n_tokens * n_vocab] float32. adapters may be NULL when
 * n_adapters == 0; scales[i] multiplies adapter i (llama.cpp's user scale). */
GLORA_API int32_t glora_logits(glora_model * model, const glora_adapter * const * adapters, const float * scales,
                               int32_t n_adapters, const glora_batch * batch, float * out);
/* on != 0: glora_logits multiplies by copies of the weights that llama.cpp (with its default
 * use_extra_bufts) stores repacked in the CPU's extra buffer types, made on first use (extra memory for
 * those weights only), so that it runs llama.cpp's kernels for them; 0 (the default): the stored weights,
 * as llama.cpp runs with use_extra_bufts = false. CPU only; elsewhere a no-op. */
GLORA_API int32_t glora_model_set_llama_weights(glora_model * model, int32_t on);

/* sum over batch->loss_rows of the next-token cross-entropy (natural log). f16_weights != 0: through
 * the model's F16 copies of its quantized weights (made on first use and kept with the model, 2 bytes
 * per weight; faster on CPU, close to but not llama.cpp's arithmetic); 0: through the stored blocks. */
GLORA_API int32_t glora_loss(glora_model * model, const glora_adapter * adapter, float scale, int32_t f16_weights,
                             const glora_batch * batch, double * out_loss_sum);
/* the next-token cross-entropy (natural log) of each loss row: out_rows = [n_loss] float32, in the order of
 * batch->loss_rows, computed as glora_loss's graph computes them (the same forward), in double from the
 * logits; sequence log-probabilities are minus their sums over a sequence's rows. */
GLORA_API int32_t glora_row_losses(glora_model * model, const glora_adapter * adapter, float scale, int32_t f16_weights,
                                   const glora_batch * batch, float * out_rows);

/* ---------------------------------------------------------------------------------------------- */
/* training                                                                                        */
/* ---------------------------------------------------------------------------------------------- */

enum glora_optimizer {
    GLORA_OPTIMIZER_ADAMW = 0,
    GLORA_OPTIMIZER_SGD   = 1
};

typedef struct glora_trainer_params {
    int32_t optimizer;           /* enum glora_optimizer                                          */
    float   dropout;             /* LoRA dropout on the input of A, in [0, 1)                     */
    int32_t gradient_checkpointing; /* != 0: keep only block inputs and recompute each block in the
                                       backward (memory of one block instead of all; about one more
                                       forward pass of compute); the LM head and loss then run over
                                       chunks of loss rows                                          */
    int32_t f16_weights;         /* != 0: the training forward multiplies by F16 copies of the quantized
                                    weights (made once per model, 2 bytes per weight) instead of their
                                    stored blocks: faster on CPU, but no longer llama.cpp's arithmetic.
                                    Evaluation uses the stored blocks unless glora_loss is asked */
    int32_t keep_transposed;     /* != 0: keep transposed F16 copies of every frozen matrix for the
                                    backward (made once per model, 2 bytes per weight; the step skips
                                    their dequantize-transpose). 0: each step makes them transiently in
                                    its compute buffer, one at a time where it needs them, so the frozen
                                    model costs its file size. The gradients are the same either way  */
} glora_trainer_params;

/* Per optimizer step, from Python's schedule. */
typedef struct glora_opt_step {
    float   learning_rate;
    float   beta1;               /* AdamW                                                          */
    float   beta2;               /* AdamW                                                          */
    float   eps;                 /* AdamW                                                          */
    float   weight_decay;        /* decoupled: w *= 1 - lr * weight_decay                          */
    int64_t step;                /* 1-based optimizer step, for AdamW bias correction              */
    float   grad_scale;          /* multiplies the accumulated gradient (clipping); 1 = none       */
} glora_opt_step;

/* The trainer owns gradient accumulators and optimizer moments for every pair of the adapter. */
GLORA_API int32_t glora_trainer_new(glora_adapter * adapter, const glora_trainer_params * params, glora_trainer ** out);
GLORA_API void    glora_trainer_free(glora_trainer * trainer);
/* forward + backward of loss_weight * (sum of cross-entropy over the batch's loss rows); the gradient
 * of A and B is added to the accumulators. Pass loss_weight = 1 / (supervised tokens in the whole
 * optimizer step). dropout_seed picks the dropout masks. out_loss_sum gets the unweighted sum.
 * Rows too long for the step's graphs are refused before any graph is built, naming the length that
 * fits: GLORA_ERR_UNSUPPORTED for one graph of too many attention chunks (gradient checkpointing trains
 * them), GLORA_ERR_INVALID_ARGUMENT past the largest graph this build makes. */
GLORA_API int32_t glora_trainer_accumulate(glora_trainer * trainer, const glora_batch * batch, float loss_weight,
                                           uint64_t dropout_seed, double * out_loss_sum);
/* Memory of one accumulate call for a batch of n_seq x n_tokens with n_loss supervised rows, from the
 * sizes of the tensors and ggml's allocation plan of the very graphs the call builds (nothing runs). */
typedef struct glora_memory {
    uint64_t weights;            /* the base model's weights as stored                            */
    uint64_t transposed;         /* working copies of the weights for the backward product        */
    uint64_t f16_weights;        /* F16 copies for the forward (glora_trainer_params.f16_weights)  */
    uint64_t adapter;            /* LoRA A and B                                                   */
    uint64_t optimizer;          /* gradient accumulators and AdamW moments                        */
    uint64_t checkpoints;        /* block inputs and gradient buffers (gradient checkpointing)     */
    uint64_t compute;            /* the largest compute buffer of the call's graphs                */
} glora_memory;
GLORA_API int32_t glora_trainer_measure(glora_trainer * trainer, int32_t n_seq, int32_t n_tokens, int32_t n_loss,
                                        glora_memory * out);
/* L2 norm over all accumulated gradients */
GLORA_API int32_t glora_trainer_grad_norm(glora_trainer * trainer, double * out_norm);
/* one optimizer update from the accumulated gradients, which are then zeroed */
GLORA_API int32_t glora_trainer_step(glora_trainer * trainer, const glora_opt_step * step);
GLORA_API int32_t glora_trainer_zero_grad(glora_trainer * trainer);
/* kind: 0 = accumulated gradient, 1 = AdamW first moment m, 2 = second moment v; which as in
 * glora_adapter_get. set != 0 writes data into the state instead of reading it. */
GLORA_API int32_t glora_trainer_state(glora_trainer * trainer, int32_t target, int32_t which, int32_t kind,
                                      float * data, int64_t n, int32_t set);

/* ---------------------------------------------------------------------------------------------- */
/* tensor data conversion (merging adapters into a base model)                                     */
/* ---------------------------------------------------------------------------------------------- */

/* ggml's own row conversions, so a merged model is stored exactly as llama.cpp's quantizer (without an
 * importance matrix) would store it. type: a ggml type id among F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
 * Q8_0, Q2_K..Q6_K, IQ4_NL, IQ4_XS (others: GLORA_ERR_UNSUPPORTED). n_per_row must be a multiple of the
 * type's block size; data holds n_rows rows of ggml_row_size(type, n_per_row) bytes. */
GLORA_API int32_t glora_dequantize_rows(int32_t type, const void * data, float * out, int64_t n_rows, int64_t n_per_row);
GLORA_API int32_t glora_quantize_rows(int32_t type, const float * values, void * out, int64_t n_rows, int64_t n_per_row);

/* ---------------------------------------------------------------------------------------------- */
/* tests                                                                                           */
/* ---------------------------------------------------------------------------------------------- */

/* Test-only: out[b][M][N] = x[b][M][K]·w[b][N][K]ᵀ for b < n_mat (w BF16 bits, x and out F32) through the
 * AMX product of glora_model_set_bf16, on n_threads; GLORA_ERR_UNSUPPORTED without AMX-BF16. */
GLORA_API int32_t glora_selftest_amx(const uint16_t * w, const float * x, float * out, int64_t K, int64_t N,
                                     int64_t M, int64_t n_mat, int32_t n_threads);
/* Test-only: out[n1][n0] = sum_k a[k][n0] * b[k][n1] (b_transposed: b is [n1][K], multiplied through a
 * transposed view), as ggml_out_prod defines it, through ggml's CPU kernel (ours = 0) or the library's (ours = 1), computed `repeats` times. */
GLORA_API int32_t glora_selftest_out_prod(const float * a, const float * b, float * out, int64_t n0, int64_t n1,
                                          int64_t K, int32_t b_transposed, int32_t ours, int32_t n_threads,
                                          int32_t repeats);
/* Test-only: out[M][N] = x[M][K] · w[N][K]ᵀ, w in F16 (w_f16) or F32, through ggml-lora's FMA kernel for products
 * through working copies (ours != 0) or ggml's mul_mat; M >= 16. */
GLORA_API int32_t glora_selftest_fma(const void * w, int32_t w_f16, const float * x, float * out, int64_t K,
                                     int64_t N, int64_t M, int32_t ours, int32_t n_threads);
/* Test-only: runs one of the backward's graph rewrites on a small graph that lacks the pattern it
 * rewrites, and returns its status (GLORA_ERR_INTERNAL, naming the tensor, when it refuses as it should).
 * name: "transposed_weights" (an out_prod through a frozen weight that is not W^T dy) or "param_grads" (a
 * LoRA parameter whose gradient is not accumulated with an add, so the loss weight cannot be applied). */
GLORA_API int32_t glora_selftest(glora_trainer * trainer, const char * name);

/* cffi-end */

#ifdef __cplusplus
}
#endif

#endif /* GGML_LORA_H */
