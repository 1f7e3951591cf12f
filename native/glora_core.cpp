// Errors, logging, devices and backend selection.
#include "glora_internal.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <thread>
#include <unordered_set>

// ---- errors ---------------------------------------------------------------------------------------

static thread_local std::string g_last_error;

static std::string vformat(const char * fmt, va_list args) {
    va_list copy;
    va_copy(copy, args);
    const int n = vsnprintf(nullptr, 0, fmt, copy);
    va_end(copy);
    std::string s(n > 0 ? (size_t) n : 0, '\0');
    if (n > 0) {
        vsnprintf(s.data(), (size_t) n + 1, fmt, args);
    }
    return s;
}

int32_t glora_fail(int32_t code, const char * fmt, ...) noexcept {
    va_list args;
    va_start(args, fmt);
    try {
        g_last_error = vformat(fmt, args);
    } catch (...) {
        g_last_error.clear();   // no memory for the message: the status still says what happened
    }
    va_end(args);
    return code;
}

void glora_clear_error() noexcept { g_last_error.clear(); }

int32_t glora_exception_status(const char * fn) noexcept {
    try {
        throw;
    } catch (const std::bad_alloc & e) {
        return glora_fail(GLORA_ERR_OUT_OF_MEMORY, "%s: out of host memory (%s)", fn, e.what());
    } catch (const std::exception & e) {
        return glora_fail(GLORA_ERR_INTERNAL, "%s: C++ exception: %s", fn, e.what());
    } catch (...) {
        return glora_fail(GLORA_ERR_INTERNAL, "%s: unknown C++ exception", fn);
    }
}

void glora_exception_log(const char * fn) noexcept {
    glora_exception_status(fn);
    glora_log(GGML_LOG_LEVEL_ERROR, "%s\n", g_last_error.c_str());
}

std::string glora_shape_str(const ggml_tensor * t) {
    char buf[128];
    snprintf(buf, sizeof(buf), "[%lld, %lld, %lld, %lld] %s", (long long) t->ne[0], (long long) t->ne[1],
             (long long) t->ne[2], (long long) t->ne[3], ggml_type_name(t->type));
    return buf;
}

extern "C" GLORA_API int32_t glora_abi_version(void) {
    return glora_guard_or(__func__, (int32_t) GLORA_ABI_VERSION, [] { return (int32_t) GLORA_ABI_VERSION; });
}
extern "C" GLORA_API const char * glora_last_error(void) {
    return glora_guard_or(__func__, "", [] { return g_last_error.c_str(); });
}

// ---- logging --------------------------------------------------------------------------------------

static std::mutex             g_log_mutex;
static glora_log_callback     g_log_cb   = nullptr;
static void                 * g_log_user = nullptr;

static void forward_log(int32_t level, const char * text) {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    if (g_log_cb) {
        g_log_cb(level, text, g_log_user);
    }
}

static void ggml_log_to_callback(enum ggml_log_level level, const char * text, void * /*user*/) {
    forward_log((int32_t) level, text);
}

void glora_log(int32_t level, const char * fmt, ...) noexcept {
    va_list args;
    va_start(args, fmt);
    try {
        std::string s = vformat(fmt, args);
        forward_log(level, s.c_str());
    } catch (...) {
        // no memory for the text, or the mutex failed: a log line is not worth a crash
    }
    va_end(args);
}

extern "C" GLORA_API void glora_set_log_callback(glora_log_callback callback, void * user_data) {
    glora_guard_void(__func__, [&] {
        {
            std::lock_guard<std::mutex> lock(g_log_mutex);
            g_log_cb   = callback;
            g_log_user = user_data;
        }
        // Our statically linked ggml has its own logger; without this it would print to stderr.
        ggml_log_set(ggml_log_to_callback, nullptr);
    });
}

// ---- devices --------------------------------------------------------------------------------------

static void copy_str(char * dst, size_t cap, const char * src) {
    snprintf(dst, cap, "%s", src ? src : "");
}

static void ensure_quiet_logger() {
    // ggml logs to stderr until a callback is set; route it through ours (which drops by default).
    static std::once_flag once;
    std::call_once(once, [] { ggml_log_set(ggml_log_to_callback, nullptr); });
}

extern "C" GLORA_API int32_t glora_device_count(void) {
    return glora_guard_or(__func__, (int32_t) 0, [] {
        ensure_quiet_logger();
        return (int32_t) ggml_backend_dev_count();
    });
}

extern "C" GLORA_API int32_t glora_device_get(int32_t index, glora_device_info * out) {
    return glora_guard(__func__, [&]() -> int32_t {
        ensure_quiet_logger();
        GLORA_CHECK_ARG(out != nullptr, "glora_device_get: out is NULL");
        const int32_t n = (int32_t) ggml_backend_dev_count();
        GLORA_CHECK_ARG(index >= 0 && index < n, "device index %d out of range [0, %d)", index, n);
        ggml_backend_dev_t dev = ggml_backend_dev_get((size_t) index);
        size_t free = 0, total = 0;
        ggml_backend_dev_memory(dev, &free, &total);
        copy_str(out->name, sizeof(out->name), ggml_backend_dev_name(dev));
        copy_str(out->description, sizeof(out->description), ggml_backend_dev_description(dev));
        switch (ggml_backend_dev_type(dev)) {
            case GGML_BACKEND_DEVICE_TYPE_GPU:   out->type = GLORA_DEVICE_GPU;   break;
            case GGML_BACKEND_DEVICE_TYPE_IGPU:  out->type = GLORA_DEVICE_IGPU;  break;
            case GGML_BACKEND_DEVICE_TYPE_ACCEL: out->type = GLORA_DEVICE_ACCEL; break;
            default:                             out->type = GLORA_DEVICE_CPU;   break;
        }
        out->memory_free  = free;
        out->memory_total = total;
        return GLORA_OK;
    });
}

// ---- tensor data conversion ------------------------------------------------------------------------

static int32_t check_row_type(int32_t type, int64_t n_rows, int64_t n_per_row) {
    switch ((ggml_type) type) {
        case GGML_TYPE_F32: case GGML_TYPE_F16: case GGML_TYPE_BF16:
        case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_1: case GGML_TYPE_Q5_0: case GGML_TYPE_Q5_1: case GGML_TYPE_Q8_0:
        case GGML_TYPE_Q2_K: case GGML_TYPE_Q3_K: case GGML_TYPE_Q4_K: case GGML_TYPE_Q5_K: case GGML_TYPE_Q6_K:
        case GGML_TYPE_IQ4_NL: case GGML_TYPE_IQ4_XS:
            break;
        default:
            return glora_fail(GLORA_ERR_UNSUPPORTED, "ggml type %d: converting rows of this type is not supported", type);
    }
    const int64_t blck = ggml_blck_size((ggml_type) type);
    GLORA_CHECK_ARG(n_rows >= 0 && n_per_row > 0, "n_rows %lld, n_per_row %lld", (long long) n_rows, (long long) n_per_row);
    GLORA_CHECK_ARG(n_per_row % blck == 0, "%s: a row of %lld values is not a whole number of %lld-value blocks",
                    ggml_type_name((ggml_type) type), (long long) n_per_row, (long long) blck);
    return GLORA_OK;
}

extern "C" GLORA_API int32_t glora_dequantize_rows(int32_t type, const void * data, float * out, int64_t n_rows,
                                                   int64_t n_per_row) {
    return glora_guard(__func__, [&]() -> int32_t {
        GLORA_CHECK_ARG(data != nullptr && out != nullptr, "glora_dequantize_rows: NULL buffer");
        if (int32_t st = check_row_type(type, n_rows, n_per_row)) return st;
        const size_t row = ggml_row_size((ggml_type) type, n_per_row);
        if (type == GGML_TYPE_F32) {
            std::memcpy(out, data, row * (size_t) n_rows);
            return GLORA_OK;
        }
        const auto * traits = ggml_get_type_traits((ggml_type) type);
        GLORA_CHECK_ARG(traits->to_float != nullptr, "%s has no conversion to float", ggml_type_name((ggml_type) type));
        for (int64_t r = 0; r < n_rows; ++r) {
            traits->to_float((const char *) data + r * row, out + r * n_per_row, n_per_row);
        }
        return GLORA_OK;
    });
}

extern "C" GLORA_API int32_t glora_quantize_rows(int32_t type, const float * values, void * out, int64_t n_rows,
                                                 int64_t n_per_row) {
    return glora_guard(__func__, [&]() -> int32_t {
        GLORA_CHECK_ARG(values != nullptr && out != nullptr, "glora_quantize_rows: NULL buffer");
        if (int32_t st = check_row_type(type, n_rows, n_per_row)) return st;
        if (n_rows == 0) return GLORA_OK;
        ggml_quantize_chunk((ggml_type) type, values, out, 0, n_rows, n_per_row, nullptr);
        return GLORA_OK;
    });
}

static std::string device_names() {
    std::string s;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        if (!s.empty()) s += ", ";
        s += ggml_backend_dev_name(ggml_backend_dev_get(i));
    }
    return s;
}

// ---- backends -------------------------------------------------------------------------------------

int32_t glora_backends_init(const char * device, int32_t n_threads, glora_backends * out) {
    ensure_quiet_logger();
    ggml_backend_dev_t dev = nullptr;
    if (device == nullptr || device[0] == '\0' || strcmp(device, "auto") == 0) {
        dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU);
        if (!dev) dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_IGPU);
        if (!dev) dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    } else {
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t d = ggml_backend_dev_get(i);
            if (strcasecmp(ggml_backend_dev_name(d), device) == 0) {
                dev = d;
                break;
            }
        }
        if (!dev) {
            return glora_fail(GLORA_ERR_INVALID_ARGUMENT, "unknown device '%s'; this build has: %s", device,
                              device_names().c_str());
        }
    }
    if (!dev) {
        return glora_fail(GLORA_ERR_BACKEND, "no ggml device available");
    }

    ggml_backend_t main = ggml_backend_dev_init(dev, nullptr);
    if (!main) {
        return glora_fail(GLORA_ERR_BACKEND, "could not initialise device '%s'", ggml_backend_dev_name(dev));
    }
    out->main        = main;
    out->device_name = ggml_backend_dev_name(dev);
    out->backends.push_back(main);
    out->bufts.push_back(ggml_backend_dev_buffer_type(dev));

    // the one place that asks which device this is: it picks the device's table of hooks
    out->ops = ggml_backend_is_cpu(main) ? &glora_cpu_backend_ops : &glora_ggml_backend_ops;
    // ggml-vulkan dispatches row-wise ops (RMS_NORM, ...) as one workgroup per row and asserts that the count
    // is within the device's maxComputeWorkGroupCount (ggml/src/ggml-vulkan/ggml-vulkan-common.h:258), of
    // which Vulkan guarantees 65535: a graph of more token rows would abort the process, so it is refused
    if (strcmp(ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev)), "Vulkan") == 0) out->max_rows = 65535;
    if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU) {
        out->cpu = main;
    } else {
        // every op the device lacks falls back to the CPU
        out->cpu = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
        if (!out->cpu) {
            glora_backends_free(out);
            return glora_fail(GLORA_ERR_BACKEND, "could not initialise the CPU backend");
        }
        out->backends.push_back(out->cpu);
        out->bufts.push_back(ggml_backend_get_default_buffer_type(out->cpu));
    }
    const int hw = (int) std::thread::hardware_concurrency();
    out->n_threads = n_threads > 0 ? n_threads : (hw > 0 ? hw : 1);
    ggml_backend_cpu_set_n_threads(out->cpu, out->n_threads);
    return GLORA_OK;
}

void glora_backends_free(glora_backends * b) {
    for (ggml_backend_t be : b->backends) {
        ggml_backend_free(be);
    }
    b->backends.clear();
    b->bufts.clear();
    b->main = b->cpu = nullptr;
}

// ---- ggml's ops: the table of a device without special code of its own ------------------------------

static bool no_tiles() { return false; }

static ggml_tensor * ggml_transposed_weight(ggml_context * ctx, ggml_tensor * w, ggml_type out_type) {
    ggml_tensor * f32 = ggml_is_quantized(w->type) ? ggml_cast(ctx, w, GGML_TYPE_F32) : w;
    return ggml_cpy(ctx, ggml_transpose(ctx, f32), ggml_new_tensor_2d(ctx, out_type, w->ne[1], w->ne[0]));
}

static ggml_tensor * ggml_transposed_f32(ggml_context * ctx, ggml_tensor * t) {
    return ggml_cont(ctx, ggml_transpose(ctx, t));
}

// ggml's backward leaves views in the sources of some ops (out_prod(x, transpose(dy)) for a product's
// weight gradient) that a device may take only contiguous (Vulkan's OUT_PROD): the scheduler would run
// such a node on the CPU. Where the device supports the op once its sources are contiguous, they are made
// so here, on the device (a copy of a [rank, T]-sized operand at most: the large out_prods became
// mul_mat in glora_faster_products).
static ggml_cgraph * ggml_as_built(const glora_model * m, ggml_context * ctx, ggml_cgraph * gf, size_t graph_size,
                                   bool stale) {
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (node->op == GGML_OP_NONE || ggml_backend_supports_op(m->be.main, node)) continue;
        ggml_tensor * was[GGML_MAX_SRC];
        bool any = false;
        for (int s = 0; s < GGML_MAX_SRC; ++s) {
            was[s] = node->src[s];
            if (node->src[s] && !ggml_is_contiguous(node->src[s])) {
                node->src[s] = ggml_cont(ctx, node->src[s]);
                any = true;
            }
        }
        if (any && ggml_backend_supports_op(m->be.main, node)) {
            stale = true;
        } else {
            std::copy(was, was + GGML_MAX_SRC, node->src);   // no better: leave it to the CPU fallback
        }
    }
    return stale ? glora_graph_in_order(ctx, gf, graph_size) : gf;
}

const glora_backend_ops glora_ggml_backend_ops = {
    /*.name              =*/ "ggml",
    /*.bf16_tiles        =*/ no_tiles,
    /*.transposed_weight =*/ ggml_transposed_weight,
    /*.transposed_f32    =*/ ggml_transposed_f32,
    /*.rewrite           =*/ ggml_as_built,
};

// ---- placement ------------------------------------------------------------------------------------

// A node's work for the placement report: 2·M·N·K for the products, one per output value otherwise.
static double node_work(const ggml_tensor * node) {
    switch (node->op) {
        case GGML_OP_NONE: case GGML_OP_VIEW: case GGML_OP_RESHAPE: case GGML_OP_PERMUTE: case GGML_OP_TRANSPOSE:
            return 0.0;
        case GGML_OP_MUL_MAT:     // sums over src0's rows (ne0)
            return 2.0 * (double) ggml_nelements(node) * (double) node->src[0]->ne[0];
        case GGML_OP_OUT_PROD:    // sums over src0's dim 1
            return 2.0 * (double) ggml_nelements(node) * (double) node->src[0]->ne[1];
        default:
            return (double) ggml_nelements(node);
    }
}

void glora_placement_tally::record(const glora_backends & be, ggml_backend_sched_t sched, ggml_cgraph * gf) {
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        const double w = node_work(node);
        if (w == 0.0) continue;
        ggml_backend_t where = ggml_backend_sched_get_tensor_backend(sched, node);
        if (where == nullptr || where == be.main) {
            device_work += w;
            device_nodes += 1;
        } else {
            cpu_work += w;
            cpu_nodes += 1;
            auto & op = cpu_ops[ggml_op_desc(node)];
            op.first += 1;
            op.second += w;
        }
    }
}

extern "C" GLORA_API int32_t glora_model_placement(glora_model * model, int32_t reset, glora_placement * out) {
    return glora_guard(__func__, [&]() -> int32_t {
        GLORA_CHECK_ARG(model != nullptr && out != nullptr, "glora_model_placement: NULL argument");
        const glora_placement_tally & t = model->placement;
        out->device_work  = t.device_work;
        out->cpu_work     = t.cpu_work;
        out->device_nodes = t.device_nodes;
        out->cpu_nodes    = t.cpu_nodes;
        std::vector<std::pair<std::string, std::pair<int64_t, double>>> ops(t.cpu_ops.begin(), t.cpu_ops.end());
        std::sort(ops.begin(), ops.end(), [](const auto & a, const auto & b) { return a.second.second > b.second.second; });
        std::string list;
        for (const auto & op : ops) {
            list += (list.empty() ? "" : ", ") + op.first + " x" + std::to_string(op.second.first);
        }
        copy_str(out->cpu_ops, sizeof(out->cpu_ops), list.c_str());
        if (reset) model->placement.clear();
        return GLORA_OK;
    });
}

void glora_sched::release() {
    if (sched) ggml_backend_sched_free(sched);
    sched = nullptr;
    capacity = 0;
}

// Every tensor ggml's scheduler hashes: the graph's nodes and its leafs (sources that are neither a
// node nor a parameter, as ggml_visit_parents sorts them; ggml has no public count of the leafs).
static size_t graph_tensors(ggml_cgraph * gf) {
    std::unordered_set<const ggml_tensor *> leafs;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        const ggml_tensor * node = ggml_graph_node(gf, i);
        for (const ggml_tensor * src : node->src) {
            if (src && src->op == GGML_OP_NONE && !(src->flags & GGML_TENSOR_FLAG_PARAM)) leafs.insert(src);
        }
    }
    return (size_t) ggml_graph_n_nodes(gf) + leafs.size();
}

int32_t glora_sched_fit(const glora_backends & be, glora_sched * s, ggml_cgraph * gf) {
    const size_t need = graph_tensors(gf);
    glora_log(GGML_LOG_LEVEL_DEBUG, "graph: %d nodes, %zu leafs, budget %d\n", ggml_graph_n_nodes(gf),
              need - (size_t) ggml_graph_n_nodes(gf), ggml_graph_size(gf));
    if (s->sched && s->capacity >= need) return GLORA_OK;
    // a quarter more, so that the slightly larger graph of the next batch does not make another
    const size_t capacity = std::max<size_t>(std::max(need + need / 4, s->capacity), 4096);
    s->release();
    s->sched = ggml_backend_sched_new(const_cast<ggml_backend_t *>(be.backends.data()),
                                      const_cast<ggml_backend_buffer_type_t *>(be.bufts.data()),
                                      (int) be.backends.size(), capacity, false, true);
    if (!s->sched) {
        return glora_fail(GLORA_ERR_BACKEND, "could not create a backend scheduler for %zu tensors", capacity);
    }
    s->capacity = capacity;
    if (s->profile) glora_profile_attach(s->sched);
    return GLORA_OK;
}

ggml_context * glora_graph_ctx(size_t n_nodes) {
    ggml_init_params p = {
        /*.mem_size   =*/ ggml_tensor_overhead() * n_nodes * 2 + 3 * ggml_graph_overhead_custom(n_nodes, true),
        /*.mem_buffer =*/ nullptr,
        /*.no_alloc   =*/ true,
    };
    return ggml_init(p);
}
