// Loading a GGUF base model (one file, or every part of a gguf-split one): every weight in its stored type,
// in one buffer on the chosen device or, on the CPU, views of the mapped files.
#include "glora_internal.h"

#include "ggml-cpu.h"

#include "gguf.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>

#if defined(__unix__) || defined(__APPLE__)
#  include <fcntl.h>
#  include <sys/mman.h>
#  include <sys/stat.h>
#  include <unistd.h>
#  define GLORA_HAVE_MMAP 1
#endif

ggml_tensor * glora_model::find(const char * name) const {
    return ggml_get_tensor(ctx_w, name);
}

ggml_tensor * glora_model::transposed(const ggml_tensor * w) const {
    auto src = wf.source.find(w);
    if (src != wf.source.end()) w = src->second;
    auto it = wt.of.find(w);
    return it == wt.of.end() ? nullptr : it->second;
}

const ggml_tensor * glora_model::frozen_matrix(const ggml_tensor * w) const {
    auto src = wf.source.find(w);
    if (src != wf.source.end()) w = src->second;
    return matrices.count(w) ? w : nullptr;
}

ggml_type glora_copy_type(const glora_model * m, const ggml_tensor * w) {
    if (w->type == GGML_TYPE_F32 || w->type == GGML_TYPE_BF16) return w->type;
    return m->bf16 ? GGML_TYPE_BF16 : GGML_TYPE_F16;
}

static void model_free(glora_model * m) {
    if (!m) return;
    m->sched.release();
    m->wt.release();
    m->wf.release();
    m->wr.release();
    if (m->buf_w) ggml_backend_buffer_free(m->buf_w);
    for (glora_mapped_file & mf : m->maps) {
        if (mf.buf) ggml_backend_buffer_free(mf.buf);
#ifdef GLORA_HAVE_MMAP
        munmap(mf.addr, mf.size);
#endif
    }
    if (m->ctx_w) ggml_free(m->ctx_w);
    glora_backends_free(&m->be);
    delete m;
}

// Looks up a weight and checks its shape; `required` decides whether absence is an error.
static int32_t get_weight(glora_model * m, const char * name, int64_t ne0, int64_t ne1, bool required,
                          ggml_tensor ** out) {
    ggml_tensor * t = m->find(name);
    *out = t;
    if (!t) {
        return required ? glora_fail(GLORA_ERR_FORMAT, "%s: tensor '%s' is missing", m->path.c_str(), name)
                        : GLORA_OK;
    }
    const int64_t want1 = ne1 < 0 ? 1 : ne1;
    if (t->ne[0] != ne0 || t->ne[1] != want1 || t->ne[2] != 1 || t->ne[3] != 1) {
        return glora_fail(GLORA_ERR_FORMAT, "%s: tensor '%s' has shape %s, expected [%lld, %lld]", m->path.c_str(),
                          name, glora_shape_str(t).c_str(), (long long) ne0, (long long) want1);
    }
    return GLORA_OK;
}

static int32_t bind_tensors(glora_model * m) {
    const glora_model_params & hp = m->hp;
    ggml_tensor * embd = m->find("token_embd.weight");
    if (!embd || ggml_n_dims(embd) != 2) {
        return glora_fail(GLORA_ERR_FORMAT, "%s: tensor 'token_embd.weight' is missing or not 2-D", m->path.c_str());
    }
    m->n_embd  = embd->ne[0];
    m->n_vocab = embd->ne[1];
    m->tok_embd = embd;
    const int64_t n_embd = m->n_embd;
    const int64_t n_q    = (int64_t) hp.n_head * hp.head_dim;
    const int64_t n_kv   = (int64_t) hp.n_head_kv * hp.head_dim;

    int32_t rc;
    if ((rc = get_weight(m, "output_norm.weight", n_embd, -1, true, &m->output_norm))) return rc;
    if ((rc = get_weight(m, "output.weight", n_embd, m->n_vocab, false, &m->output))) return rc;
    if (!m->output) m->output = m->tok_embd;   // tied embeddings
    if ((rc = get_weight(m, "rope_freqs.weight", hp.n_rot / 2, -1, false, &m->rope_freqs))) return rc;

    // n_ff from ffn_down, which every architecture has unfused (phi3 fuses gate into ffn_up)
    ggml_tensor * down0 = m->find("blk.0.ffn_down.weight");
    if (!down0) {
        return glora_fail(GLORA_ERR_FORMAT, "%s: tensor 'blk.0.ffn_down.weight' is missing", m->path.c_str());
    }
    m->n_ff = down0->ne[0];
    // phi3 stores Q, K and V in one matrix and gate and up in ffn_up (src/models/phi3.cpp:46-52)
    const bool fused = m->find("blk.0.attn_qkv.weight") != nullptr;

    m->layers.resize((size_t) hp.n_layer);
    char name[128];
    for (int il = 0; il < hp.n_layer; ++il) {
        glora_layer & L = m->layers[(size_t) il];
        struct spec { const char * suffix; int64_t ne0, ne1; bool required; ggml_tensor ** dst; } specs[] = {
            {"attn_norm.weight",   n_embd,      -1,     true,  &L.attn_norm},
            {"attn_q.weight",      n_embd,      n_q,    !fused, &L.wq},
            {"attn_k.weight",      n_embd,      n_kv,   !fused, &L.wk},
            {"attn_v.weight",      n_embd,      n_kv,   !fused, &L.wv},
            {"attn_qkv.weight",    n_embd,      n_q + 2 * n_kv, fused, &L.wqkv},
            {"attn_output.weight", n_q,         n_embd, true,  &L.wo},
            {"attn_q.bias",        n_q,         -1,     false, &L.bq},
            {"attn_k.bias",        n_kv,        -1,     false, &L.bk},
            {"attn_v.bias",        n_kv,        -1,     false, &L.bv},
            {"attn_output.bias",   n_embd,      -1,     false, &L.bo},
            {"attn_q_norm.weight", hp.head_dim, -1,     false, &L.q_norm},
            {"attn_k_norm.weight", hp.head_dim, -1,     false, &L.k_norm},
            {"ffn_norm.weight",    n_embd,      -1,     true,  &L.ffn_norm},
            {"ffn_gate.weight",    n_embd,      m->n_ff, !fused, &L.ffn_gate},
            {"ffn_up.weight",      n_embd,      (fused ? 2 : 1) * m->n_ff, true, &L.ffn_up},
            {"ffn_down.weight",    m->n_ff,     n_embd, true,  &L.ffn_down},
            {"post_attention_norm.weight", n_embd, -1,  false, &L.attn_post_norm},
            {"post_ffw_norm.weight",       n_embd, -1,  false, &L.ffn_post_norm},
        };
        for (const spec & s : specs) {
            snprintf(name, sizeof(name), "blk.%d.%s", il, s.suffix);
            if ((rc = get_weight(m, name, s.ne0, s.ne1, s.required, s.dst))) return rc;
        }
        if ((L.q_norm == nullptr) != (L.k_norm == nullptr)) {
            return glora_fail(GLORA_ERR_FORMAT, "%s: block %d has only one of attn_q_norm/attn_k_norm", m->path.c_str(), il);
        }
        if ((L.attn_post_norm == nullptr) != (L.ffn_post_norm == nullptr)) {
            return glora_fail(GLORA_ERR_FORMAT, "%s: block %d has only one of post_attention_norm/post_ffw_norm",
                              m->path.c_str(), il);
        }
        if (fused && (L.wq || L.wk || L.wv || L.ffn_gate)) {
            return glora_fail(GLORA_ERR_FORMAT, "%s: block %d has attn_qkv and separate q/k/v or ffn_gate weights",
                              m->path.c_str(), il);
        }
        L.swa = hp.n_swa > 0 && hp.swa_layers && hp.swa_layers[il];
    }
    return GLORA_OK;
}

// One file of the model (the only one, or a part of a gguf-split model) and where its weights lie in it.
struct glora_part {
    std::string path;
    std::vector<std::pair<ggml_tensor *, size_t>> weights;   // weight, offset of its data in this file
};

static int32_t read_weights(glora_model * m, const std::vector<glora_part> & parts) {
    std::vector<uint8_t> staging;
    const bool host = ggml_backend_buffer_is_host(m->buf_w);
    for (const glora_part & part : parts) {
        const char * path = part.path.c_str();
        FILE * f = fopen(path, "rb");
        if (!f) return glora_fail(GLORA_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        std::unique_ptr<FILE, int (*)(FILE *)> guard(f, fclose);
        fseek(f, 0, SEEK_END);
        const long long file_size = ftell(f);
        for (const auto & [t, offset] : part.weights) {
            const size_t nbytes = ggml_nbytes(t);
            if ((long long) (offset + nbytes) > file_size) {
                return glora_fail(GLORA_ERR_FORMAT, "%s: data of tensor '%s' lies outside the file (truncated?)",
                                  path, t->name);
            }
            void * dst = t->data;
            if (!host) {
                staging.resize(nbytes);
                dst = staging.data();
            }
            if (fseek(f, (long) offset, SEEK_SET) != 0 || fread(dst, 1, nbytes, f) != nbytes) {
                return glora_fail(GLORA_ERR_IO, "%s: short read of tensor '%s'", path, t->name);
            }
            if (!host) {
                ggml_backend_tensor_set(t, dst, 0, nbytes);
            }
            m->tensors.push_back(t);
        }
    }
    return GLORA_OK;
}

// The weights as views of the mapped file(s), as llama.cpp's mmap: a page costs memory only once something
// reads it (an untied model's token_embd: the rows of the tokens seen), and the kernel may drop it
// again under pressure. The weights are never written, so the mappings are read-only. Returns
// GLORA_ERR_UNSUPPORTED, having mapped nothing, where a file cannot be mapped; the caller then reads them.
static int32_t map_weights(glora_model * m, const std::vector<glora_part> & parts) {
#ifdef GLORA_HAVE_MMAP
    for (const glora_part & part : parts) {
        const char * path = part.path.c_str();
        const int fd = open(path, O_RDONLY);
        if (fd < 0) return glora_fail(GLORA_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        struct stat st;
        void * addr = MAP_FAILED;
        if (fstat(fd, &st) == 0 && st.st_size > 0) {
            addr = mmap(nullptr, (size_t) st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        }
        close(fd);
        if (addr == MAP_FAILED) {       // all or nothing: the read path allocates every weight
            for (glora_mapped_file & mf : m->maps) munmap(mf.addr, mf.size);
            m->maps.clear();
            return GLORA_ERR_UNSUPPORTED;
        }
        m->maps.push_back({addr, (size_t) st.st_size, nullptr});
        for (const auto & [t, offset] : part.weights) {
            if (offset + ggml_nbytes(t) > (size_t) st.st_size || offset % 32) {
                return glora_fail(GLORA_ERR_FORMAT, "%s: data of tensor '%s' lies outside the file (truncated?)",
                                  path, t->name);
            }
        }
    }
    for (size_t i = 0; i < parts.size(); ++i) {
        glora_mapped_file & mf = m->maps[i];
        mf.buf = ggml_backend_cpu_buffer_from_ptr(mf.addr, mf.size);
        if (!mf.buf) return glora_fail(GLORA_ERR_OUT_OF_MEMORY, "%s: could not wrap the mapped file", parts[i].path.c_str());
        ggml_backend_buffer_set_usage(mf.buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        for (const auto & [t, offset] : parts[i].weights) {
            if (ggml_backend_tensor_alloc(mf.buf, t, (char *) mf.addr + offset) != GGML_STATUS_SUCCESS) {
                return glora_fail(GLORA_ERR_INTERNAL, "%s: could not place tensor '%s' in the mapped file",
                                  parts[i].path.c_str(), t->name);
            }
            m->tensors.push_back(t);
        }
    }
    return GLORA_OK;
#else
    (void) m; (void) parts;
    return GLORA_ERR_UNSUPPORTED;
#endif
}

namespace {

// A GGUF's parsed header and the metadata context of its tensors, freed together.
struct gguf_file {
    gguf_context * gguf = nullptr;
    ggml_context * meta = nullptr;
    ~gguf_file() {
        if (gguf) gguf_free(gguf);
        if (meta) ggml_free(meta);
    }
};

// A split.* key, which gguf-split writes as UINT16 (split.no, split.count) or INT32 (split.tensors.count);
// -1 when absent. gguf_get_val_* assert on another type, so the type is checked first.
int32_t split_key(const gguf_context * g, const char * path, const char * key, gguf_type type, int64_t * out) {
    *out = -1;
    const int64_t id = gguf_find_key(g, key);
    if (id < 0) return GLORA_OK;
    if (gguf_get_kv_type(g, id) != type) {
        return glora_fail(GLORA_ERR_FORMAT, "%s: metadata key '%s' has type %s, expected %s", path, key,
                          gguf_type_name(gguf_get_kv_type(g, id)), gguf_type_name(type));
    }
    *out = type == GGUF_TYPE_UINT16 ? (int64_t) gguf_get_val_u16(g, id) : (int64_t) gguf_get_val_i32(g, id);
    return GLORA_OK;
}

// Opens `path` and, when it is the first part of a gguf-split model, every other part, as llama.cpp's
// loader does (src/llama-model-loader.cpp:595-671): the first part holds every key and split.count,
// part i (from 0) is named <prefix>-<i+1>-of-<count>.gguf (llama_split_path/llama_split_prefix,
// src/llama.cpp:545-593), says split.no = i, and the parts hold split.tensors.count tensors together.
int32_t open_parts(const char * path, std::vector<std::unique_ptr<gguf_file>> * files, std::vector<std::string> * paths) {
    auto open_one = [&](const std::string & p) -> int32_t {
        auto f = std::make_unique<gguf_file>();
        gguf_init_params gp = { /*.no_alloc =*/ true, /*.ctx =*/ &f->meta };
        f->gguf = gguf_init_from_file(p.c_str(), gp);
        if (!f->gguf) return glora_fail(GLORA_ERR_FORMAT, "%s: not a readable GGUF file", p.c_str());
        files->push_back(std::move(f));
        paths->push_back(p);
        return GLORA_OK;
    };
    int32_t rc = open_one(path);
    int64_t count = -1, no = -1;
    if (rc == GLORA_OK) rc = split_key((*files)[0]->gguf, path, "split.count", GGUF_TYPE_UINT16, &count);
    if (rc != GLORA_OK || count <= 1) return rc;
    if ((rc = split_key((*files)[0]->gguf, path, "split.no", GGUF_TYPE_UINT16, &no))) return rc;
    if (no != 0) {
        return glora_fail(GLORA_ERR_INVALID_ARGUMENT, "%s is part %lld of %lld of a split model; load the first "
                          "part, -00001-of-%05lld.gguf", path, (long long) no + 1, (long long) count, (long long) count);
    }
    char suffix[32];
    snprintf(suffix, sizeof(suffix), "-%05d-of-%05d.gguf", 1, (int) count);
    const std::string first(path);
    const size_t n_suffix = strlen(suffix);
    if (first.size() <= n_suffix || first.compare(first.size() - n_suffix, n_suffix, suffix) != 0) {
        return glora_fail(GLORA_ERR_FORMAT, "%s: split.count=%lld but the name does not end in '%s', so its other "
                          "parts cannot be found", path, (long long) count, suffix);
    }
    const std::string prefix = first.substr(0, first.size() - n_suffix);
    for (int i = 1; i < count; ++i) {
        char tail[32];
        snprintf(tail, sizeof(tail), "-%05d-of-%05d.gguf", i + 1, (int) count);
        const std::string p = prefix + tail;
        FILE * probe = fopen(p.c_str(), "rb");
        if (!probe) {
            return glora_fail(GLORA_ERR_IO, "%s: part %d of %lld of the model is missing: %s", p.c_str(), i + 1,
                              (long long) count, strerror(errno));
        }
        fclose(probe);
        if ((rc = open_one(p))) return rc;
        if ((rc = split_key(files->back()->gguf, p.c_str(), "split.no", GGUF_TYPE_UINT16, &no))) return rc;
        if (no != i) {
            return glora_fail(GLORA_ERR_FORMAT, "%s: split.no=%lld, expected %d (the parts were mixed up?)", p.c_str(),
                              (long long) no, i);
        }
    }
    return GLORA_OK;
}

// The weights of every part in one metadata context, and where each lies: the only file's own context
// when there is one part; a context holding copies of every part's tensors otherwise.
int32_t gather_weights(glora_model * m, std::vector<std::unique_ptr<gguf_file>> & files,
                       const std::vector<std::string> & paths, std::vector<glora_part> * parts) {
    if (files.size() == 1) {
        m->ctx_w = files[0]->meta;
        files[0]->meta = nullptr;
    } else {
        size_t n_tensors = 0;
        for (const auto & f : files) n_tensors += (size_t) gguf_get_n_tensors(f->gguf);
        int64_t want = -1;
        int32_t rc = split_key(files[0]->gguf, paths[0].c_str(), "split.tensors.count", GGUF_TYPE_INT32, &want);
        if (rc) return rc;
        if (want >= 0 && (size_t) want != n_tensors) {
            return glora_fail(GLORA_ERR_FORMAT, "%s: split.tensors.count=%lld but its %zu parts hold %zu tensors",
                              paths[0].c_str(), (long long) want, files.size(), n_tensors);
        }
        ggml_init_params ip = { ggml_tensor_overhead() * (n_tensors + 1), nullptr, true };
        m->ctx_w = ggml_init(ip);
        for (size_t i = 0; i < files.size(); ++i) {
            for (ggml_tensor * t = ggml_get_first_tensor(files[i]->meta); t; t = ggml_get_next_tensor(files[i]->meta, t)) {
                if (m->find(t->name)) {
                    return glora_fail(GLORA_ERR_FORMAT, "%s: tensor '%s' is also in an earlier part", paths[i].c_str(),
                                      t->name);
                }
                ggml_set_name(ggml_dup_tensor(m->ctx_w, t), t->name);
            }
        }
    }
    for (size_t i = 0; i < files.size(); ++i) {
        const gguf_context * g = files[i]->gguf;
        glora_part part{paths[i], {}};
        for (int64_t j = 0; j < gguf_get_n_tensors(g); ++j) {
            ggml_tensor * t = m->find(gguf_get_tensor_name(g, j));
            part.weights.push_back({t, gguf_get_data_offset(g) + gguf_get_tensor_offset(g, j)});
        }
        parts->push_back(std::move(part));
    }
    return GLORA_OK;
}

}  // namespace

uint64_t glora_model::weights_nbytes() const {
    if (buf_w) return (uint64_t) ggml_backend_buffer_get_size(buf_w);
    uint64_t n = 0;
    for (const glora_mapped_file & mf : maps) n += mf.size;
    return n;
}

extern "C" GLORA_API int32_t glora_model_load(const char * path, const glora_model_params * params, glora_model ** out) {
    return glora_guard(__func__, [&]() -> int32_t {
        glora_clear_error();
        GLORA_CHECK_ARG(path && params && out, "glora_model_load: NULL argument");
        *out = nullptr;
        const glora_model_params & hp = *params;
        GLORA_CHECK_ARG(hp.n_layer > 0 && hp.n_head > 0 && hp.n_head_kv > 0 && hp.head_dim > 0,
                        "%s: invalid hparams n_layer=%d n_head=%d n_head_kv=%d head_dim=%d", path, hp.n_layer,
                        hp.n_head, hp.n_head_kv, hp.head_dim);
        GLORA_CHECK_ARG(hp.n_head % hp.n_head_kv == 0, "%s: n_head=%d is not a multiple of n_head_kv=%d", path,
                        hp.n_head, hp.n_head_kv);
        GLORA_CHECK_ARG(hp.n_rot > 0 && hp.n_rot <= hp.head_dim && hp.n_rot % 2 == 0,
                        "%s: n_rot=%d must be even and in (0, head_dim=%d]", path, hp.n_rot, hp.head_dim);
        GLORA_CHECK_ARG(hp.rope_type == GLORA_ROPE_NORM || hp.rope_type == GLORA_ROPE_NEOX, "%s: unknown rope type %d",
                        path, hp.rope_type);
        GLORA_CHECK_ARG(hp.ffn_act == GLORA_FFN_SWIGLU || hp.ffn_act == GLORA_FFN_GEGLU, "%s: unknown ffn_act %d", path,
                        hp.ffn_act);
        GLORA_CHECK_ARG(hp.scale_q == 0 || hp.scale_q == 1, "%s: scale_q=%d must be 0 or 1", path, hp.scale_q);
        GLORA_CHECK_ARG(std::isfinite(hp.embd_scale) && hp.embd_scale >= 0.0f && std::isfinite(hp.attn_softcap) &&
                        hp.attn_softcap >= 0.0f && std::isfinite(hp.final_softcap) && hp.final_softcap >= 0.0f,
                        "%s: embd_scale=%g, attn_softcap=%g, final_softcap=%g must be finite and >= 0 (0: none)", path,
                        (double) hp.embd_scale, (double) hp.attn_softcap, (double) hp.final_softcap);
        GLORA_CHECK_ARG(hp.n_swa >= 0 && (hp.n_swa == 0 || hp.swa_layers != nullptr),
                        "%s: n_swa=%d must be >= 0, with swa_layers when positive", path, hp.n_swa);
        GLORA_CHECK_ARG(hp.n_swa == 0 || (std::isfinite(hp.rope_freq_base_swa) && hp.rope_freq_base_swa > 0.0f &&
                                          std::isfinite(hp.rope_freq_scale_swa) && hp.rope_freq_scale_swa > 0.0f),
                        "%s: rope_freq_base_swa=%g, rope_freq_scale_swa=%g must be positive", path,
                        (double) hp.rope_freq_base_swa, (double) hp.rope_freq_scale_swa);
        // ggml's CPU backend is built for at most GGML_MAX_N_THREADS threads (ggml.h; its threadpool's
        // CPU masks have that many entries) and does not check the count it is given
        GLORA_CHECK_ARG(hp.n_threads <= GGML_MAX_N_THREADS, "n_threads=%d is more than ggml's limit of %d threads",
                        hp.n_threads, GGML_MAX_N_THREADS);

        // both freed on every early return, and when an exception unwinds to the guard
        std::unique_ptr<glora_model, void (*)(glora_model *)> m(new glora_model(), model_free);
        m->path = path;
        m->hp   = hp;

        std::vector<std::unique_ptr<gguf_file>> files;
        std::vector<std::string> paths;
        std::vector<glora_part> parts;
        int32_t rc = open_parts(path, &files, &paths);
        if (rc == GLORA_OK) rc = gather_weights(m.get(), files, paths, &parts);
        files.clear();
        if (rc != GLORA_OK) return rc;

        rc = glora_backends_init(hp.device, hp.n_threads, &m->be);
        if (rc == GLORA_OK) {
            m->hp.device = m->be.device_name.c_str();
            rc = bind_tensors(m.get());
            m->hp.swa_layers = nullptr;   // the caller's array; bind_tensors copied it into the layers
        }
        bool mapped = false;
        if (rc == GLORA_OK && hp.use_mmap && m->be.main == m->be.cpu) {
            rc = map_weights(m.get(), parts);
            mapped = rc == GLORA_OK;
            if (rc == GLORA_ERR_UNSUPPORTED) rc = GLORA_OK;          // not mappable here: read it instead
        }
        if (rc == GLORA_OK) {
            if (!mapped) m->buf_w = ggml_backend_alloc_ctx_tensors_from_buft(m->ctx_w, m->be.bufts[0]);
            if (!mapped && !m->buf_w) {
                rc = glora_fail(GLORA_ERR_OUT_OF_MEMORY, "%s: could not allocate the weights on %s", path,
                                m->be.device_name.c_str());
            } else {
                if (!mapped) {
                    ggml_backend_buffer_set_usage(m->buf_w, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
                    rc = read_weights(m.get(), parts);
                }
                for (const glora_layer & L : m->layers) {
                    for (ggml_tensor * w : L.projections()) m->matrices.insert(w);
                }
                m->matrices.insert(m->output);
            }
        }
        if (rc == GLORA_OK) {
            // the scheduler grows with the graphs it is given (glora_sched_fit); made here so that a backend
            // that cannot make one fails the load, not the first step
            m->sched.profile = true;
            ggml_context * ctx = glora_graph_ctx(1);
            ggml_cgraph * empty = ggml_new_graph_custom(ctx, 1, false);
            rc = glora_sched_fit(m->be, &m->sched, empty);
            ggml_free(ctx);
        }
        if (rc != GLORA_OK) return rc;
        *out = m.release();
        return GLORA_OK;
    });
}

extern "C" GLORA_API void glora_model_free(glora_model * model) {
    glora_guard_void(__func__, [&] { model_free(model); });
}

extern "C" GLORA_API const char * glora_model_device(const glora_model * model) {
    return glora_guard_or(__func__, "", [&] { return model ? model->be.device_name.c_str() : ""; });
}

extern "C" GLORA_API int32_t glora_model_n_tensors(const glora_model * model) {
    return glora_guard_or(__func__, (int32_t) 0, [&] { return model ? (int32_t) model->tensors.size() : 0; });
}

extern "C" GLORA_API int32_t glora_model_tensor_info(const glora_model * model, int32_t index, glora_tensor_info * out) {
    return glora_guard(__func__, [&]() -> int32_t {
        GLORA_CHECK_ARG(model && out, "glora_model_tensor_info: NULL argument");
        GLORA_CHECK_ARG(index >= 0 && index < (int32_t) model->tensors.size(), "tensor index %d out of range [0, %zu)",
                        index, model->tensors.size());
        const ggml_tensor * t = model->tensors[(size_t) index];
        snprintf(out->name, sizeof(out->name), "%s", t->name);
        out->type   = (int32_t) t->type;
        out->n_dims = ggml_n_dims(t);
        for (int i = 0; i < 4; ++i) out->ne[i] = t->ne[i];
        out->nbytes = ggml_nbytes(t);
        return GLORA_OK;
    });
}

extern "C" GLORA_API int32_t glora_model_read_tensor(const glora_model * model, const char * name, void * dst, uint64_t size) {
    return glora_guard(__func__, [&]() -> int32_t {
        GLORA_CHECK_ARG(model && name && dst, "glora_model_read_tensor: NULL argument");
        const ggml_tensor * t = model->find(name);
        GLORA_CHECK_ARG(t != nullptr, "%s: no tensor named '%s'", model->path.c_str(), name);
        GLORA_CHECK_ARG(size == ggml_nbytes(t), "tensor '%s' has %zu bytes, buffer has %llu", name, ggml_nbytes(t),
                        (unsigned long long) size);
        ggml_backend_tensor_get(t, dst, 0, size);
        return GLORA_OK;
    });
}

extern "C" GLORA_API int32_t glora_cpu_has_amx_bf16(void) {
    return glora_guard_or(__func__, (int32_t) 0, [] { return (int32_t) (glora_amx_available() ? 1 : 0); });
}

extern "C" GLORA_API int32_t glora_cpu_features(char * out, uint64_t size) {
    return glora_guard_or(__func__, (int32_t) 0, [&] {
        std::string list;
        ggml_backend_reg_t reg = ggml_backend_cpu_reg();
        auto get = (ggml_backend_get_features_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features");
        for (const ggml_backend_feature * f = get ? get(reg) : nullptr; f && f->name; ++f) {
            list += std::string(list.empty() ? "" : ";") + f->name + "=" + f->value;
        }
        if (out && size) snprintf(out, (size_t) size, "%s", list.c_str());
        return (int32_t) list.size();
    });
}

extern "C" GLORA_API int32_t glora_model_set_llama_weights(glora_model * model, int32_t on) {
    return glora_guard(__func__, [&]() -> int32_t {
        GLORA_CHECK_ARG(model != nullptr, "glora_model_set_llama_weights: NULL model");
        GLORA_CHECK_ARG(on == 0 || on == 1, "on=%d must be 0 or 1", on);
        model->llama_weights = on != 0;
        return GLORA_OK;
    });
}

extern "C" GLORA_API int32_t glora_model_set_bf16(glora_model * model, int32_t bf16) {
    return glora_guard(__func__, [&]() -> int32_t {
        GLORA_CHECK_ARG(model != nullptr, "glora_model_set_bf16: NULL model");
        GLORA_CHECK_ARG(bf16 == 0 || bf16 == 1, "bf16=%d must be 0 or 1", bf16);
        if (bf16 && !model->be.ops->bf16_tiles()) {
            return glora_fail(GLORA_ERR_UNSUPPORTED, "bf16 products run on AMX-BF16 tiles (an Intel CPU of Sapphire "
                              "Rapids or later, with a Linux kernel that grants its tile state); %s has none "
                              "(%s backend)", model->be.device_name.c_str(), model->be.ops->name);
        }
        if (model->bf16 != (bf16 != 0)) {    // copies made in the other type are made again on next use
            model->wf.release();
            model->wt.release();
            model->bf16 = bf16 != 0;
        }
        return GLORA_OK;
    });
}

namespace {

// The weights that take working copies: every projection of the blocks, and the LM head.
std::vector<ggml_tensor *> copied_weights(const glora_model * m) {
    std::vector<ggml_tensor *> weights;
    for (const glora_layer & L : m->layers) {
        for (ggml_tensor * w : L.projections()) weights.push_back(w);
    }
    weights.push_back(m->output);
    return weights;
}

// Copies of `weights`, transposed or not, in one new buffer: F32 for F32 weights, BF16 for BF16 weights
// (the same values: BF16 reaches 3.4e38 where F16 overflows to inf above 65504), else F16. One small
// graph per weight: dequantize every row (get_rows), then copy (transposed) into the copy.
int32_t make_copies(glora_model * m, const std::vector<ggml_tensor *> & weights, bool transposed, const char * suffix,
                    glora_weight_copies * out) {
    ggml_init_params ip = { ggml_tensor_overhead() * (weights.size() + 1), nullptr, true };
    out->ctx = ggml_init(ip);
    for (ggml_tensor * w : weights) {
        const ggml_type type = glora_copy_type(m, w);
        ggml_tensor * t = transposed ? ggml_new_tensor_2d(out->ctx, type, w->ne[1], w->ne[0])    // [n_out, n_in]
                                     : ggml_new_tensor_2d(out->ctx, type, w->ne[0], w->ne[1]);
        ggml_format_name(t, "%s%s", w->name, suffix);
        out->of[w] = t;
        out->source[t] = w;
    }
    out->buf = ggml_backend_alloc_ctx_tensors_from_buft(out->ctx, m->be.bufts[0]);
    if (!out->buf) {
        out->release();
        return glora_fail(GLORA_ERR_OUT_OF_MEMORY, "could not allocate working copies of the weights on %s",
                          m->be.device_name.c_str());
    }
    int32_t rc = GLORA_OK;
    for (ggml_tensor * w : weights) {
        ggml_context * ctx = glora_graph_ctx(8);
        ggml_tensor * ids = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, w->ne[1]);
        ggml_set_input(ids);
        ggml_tensor * rows = ggml_get_rows(ctx, w, ids);                          // F32 [n_in, n_out]
        ggml_tensor * out_t = ggml_cpy(ctx, transposed ? ggml_transpose(ctx, rows) : rows, out->of[w]);
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, 8, false);
        ggml_build_forward_expand(gf, out_t);
        rc = glora_graph_alloc(m, gf);
        if (rc == GLORA_OK) {
            std::vector<int32_t> idx((size_t) w->ne[1]);
            for (size_t i = 0; i < idx.size(); ++i) idx[i] = (int32_t) i;
            ggml_backend_tensor_set(ids, idx.data(), 0, idx.size() * sizeof(int32_t));
            if (ggml_backend_sched_graph_compute(m->sched.sched, gf) != GGML_STATUS_SUCCESS) {
                rc = glora_fail(GLORA_ERR_BACKEND, "copying '%s' failed", w->name);
            }
        }
        ggml_free(ctx);
        if (rc) break;
    }
    if (m->sched.sched) ggml_backend_sched_reset(m->sched.sched);
    if (rc) out->release();
    return rc;
}

}  // namespace

void glora_weight_copies::release() {
    if (buf) ggml_backend_buffer_free(buf);
    if (ctx) ggml_free(ctx);
    buf = nullptr;
    ctx = nullptr;
    of.clear();
    source.clear();
}

uint64_t glora_weight_copies::nbytes() const { return buf ? (uint64_t) ggml_backend_buffer_get_size(buf) : 0; }

int32_t glora_model_prepare_backward(glora_model * m) {
    if (m->wt.ctx) return GLORA_OK;
    return make_copies(m, copied_weights(m), true, ".T", &m->wt);
}

int32_t glora_model_prepare_f16_forward(glora_model * m) {
    if (m->wf.ctx || m->bf16) return GLORA_OK;     // bf16: the AMX products read the stored blocks
    std::vector<ggml_tensor *> weights;
    for (ggml_tensor * w : copied_weights(m)) {
        if (ggml_is_quantized(w->type)) weights.push_back(w);     // F16 and F32 weights are used as they are
    }
    if (weights.empty()) return GLORA_OK;
    return make_copies(m, weights, false, ".f16", &m->wf);
}

void glora_llama_weights::release() {
    for (ggml_backend_buffer_t b : bufs) ggml_backend_buffer_free(b);
    if (ctx) ggml_free(ctx);
    bufs.clear();
    ctx = nullptr;
    of.clear();
    ready = false;
}

namespace {

// Whether llama.cpp's loader would place weight w in buffer type buft for a product: the op it tests, a
// mul_mat by 512 rows, with w in a dummy buffer of that type (src/llama-model-loader.cpp:927-1064).
bool extra_buft_takes(ggml_backend_dev_t dev, ggml_backend_buffer_type_t buft, const ggml_tensor * w) {
    ggml_init_params ip = { ggml_tensor_overhead() * 4, nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * t = ggml_new_tensor(ctx, w->type, GGML_MAX_DIMS, w->ne);
    ggml_tensor * b = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, w->ne[0], 512, w->ne[2], w->ne[3]);
    ggml_tensor * op = ggml_mul_mat(ctx, t, b);
    t->buffer = ggml_backend_buft_alloc_buffer(buft, 0);
    const bool ok = t->buffer && ggml_backend_dev_supports_op(dev, op);
    if (t->buffer) ggml_backend_buffer_free(t->buffer);
    ggml_free(ctx);
    return ok;
}

}  // namespace

// llama.cpp puts a quantized weight in the first of the CPU's extra buffer types that takes it
// (src/llama-model.cpp:1117-1120), which stores it repacked for kernels of its own (ggml-cpu/repack.cpp:
// Q4_K as q4_K_8x8 on AVX2, and so on, as the CPU allows). Those sum in another order than the plain
// kernels, and ggml's tiled K-quant kernel (ggml-cpu/tiled/tiled.cpp:605-614) takes exactly the
// weights that are not repacked; on a model as sensitive as Gemma 3 270M the difference reaches 0.4 in
// a logit. So the llama.cpp-exact forward multiplies by twins of those weights placed the same way:
// extra memory for those weights only, made on the first call that needs them.
int32_t glora_model_prepare_llama_weights(glora_model * m) {
    if (m->wr.ready) return GLORA_OK;
    m->wr.ready = true;
    if (m->be.main != m->be.cpu) return GLORA_OK;
    ggml_backend_dev_t dev = ggml_backend_get_device(m->be.cpu);
    ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
    auto get_extra = reg ? (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(
                               reg, "ggml_backend_dev_get_extra_bufts") : nullptr;
    ggml_backend_buffer_type_t * extra = get_extra ? get_extra(dev) : nullptr;
    if (!extra || !*extra) return GLORA_OK;

    std::vector<ggml_tensor *> weights = copied_weights(m);
    if (m->output == m->tok_embd) weights.pop_back();   // tied: llama.cpp places token_embd for get_rows
    std::vector<std::pair<ggml_tensor *, ggml_backend_buffer_type_t>> placed;
    for (ggml_tensor * w : weights) {
        for (ggml_backend_buffer_type_t * b = extra; *b; ++b) {
            if (extra_buft_takes(dev, *b, w)) {
                placed.push_back({w, *b});
                break;
            }
        }
    }
    if (placed.empty()) return GLORA_OK;
    ggml_init_params ip = { ggml_tensor_overhead() * (placed.size() + 1), nullptr, true };
    m->wr.ctx = ggml_init(ip);
    std::vector<ggml_backend_buffer_type_t> bufts;
    for (auto & [w, buft] : placed) {
        if (std::find(bufts.begin(), bufts.end(), buft) == bufts.end()) bufts.push_back(buft);
    }
    int32_t rc = GLORA_OK;
    for (ggml_backend_buffer_type_t buft : bufts) {
        // one buffer per type: its tensors laid out one after another at the type's alignment
        size_t size = 0;
        std::vector<ggml_tensor *> twins;
        for (auto & [w, b] : placed) {
            if (b != buft) continue;
            ggml_tensor * t = ggml_new_tensor(m->wr.ctx, w->type, GGML_MAX_DIMS, w->ne);
            ggml_format_name(t, "%s.llama", w->name);
            m->wr.of[w] = t;
            twins.push_back(t);
            size += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, t), ggml_backend_buft_get_alignment(buft));
        }
        ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(buft, size);
        if (!buf) {
            rc = glora_fail(GLORA_ERR_OUT_OF_MEMORY, "could not allocate %zu bytes of %s weights", size,
                            ggml_backend_buft_name(buft));
            break;
        }
        m->wr.bufs.push_back(buf);
        ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        char * base = (char *) ggml_backend_buffer_get_base(buf);
        size_t offset = 0;
        for (ggml_tensor * t : twins) {
            if (ggml_backend_tensor_alloc(buf, t, base + offset) != GGML_STATUS_SUCCESS) {
                rc = glora_fail(GLORA_ERR_INTERNAL, "could not place '%s' in a %s buffer", t->name,
                                ggml_backend_buft_name(buft));
                break;
            }
            offset += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, t), ggml_backend_buft_get_alignment(buft));
        }
        if (rc) break;
    }
    if (rc == GLORA_OK) {
        for (auto & [w, buft] : placed) {
            ggml_tensor * t = m->wr.of[w];
            ggml_backend_tensor_set(t, w->data, 0, ggml_nbytes(w));   // the buffer type repacks as it stores
        }
    }
    if (rc) {
        m->wr.release();
        m->wr.ready = true;   // use the plain weights rather than fail every later call
    }
    return rc;
}
