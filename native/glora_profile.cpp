// Per-op timings of the graphs the library runs, to see where a step's time goes: with
// GGML_LORA_PROFILE=1 in the environment, a table of time per op kind goes to stderr at exit (=2: per
// op and shapes). Every
// node then runs as a call of its own, which costs time of its own: compare shares, not totals.
#include "glora_internal.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;

struct op_stats {
    double  seconds = 0.0;
    int64_t calls   = 0;
};

struct profile {
    std::mutex                      mu;
    std::map<std::string, op_stats> ops;
    clock_type::time_point          start;

    ~profile() {
        std::vector<std::pair<std::string, op_stats>> rows(ops.begin(), ops.end());
        std::sort(rows.begin(), rows.end(), [](const auto & a, const auto & b) { return a.second.seconds > b.second.seconds; });
        double total = 0.0;
        for (const auto & r : rows) total += r.second.seconds;
        if (rows.empty() || total <= 0.0) return;
        fprintf(stderr, "ggml-lora profile: %.3f s in graph nodes\n%8s %6s %9s  %s\n", total, "seconds", "share", "calls",
                "op [src types] (c: src1 contiguous, nc: not)");
        for (const auto & r : rows) {
            fprintf(stderr, "%8.3f %5.1f%% %9lld  %s\n", r.second.seconds, 100.0 * r.second.seconds / total,
                    (long long) r.second.calls, r.first.c_str());
        }
    }
};

profile * g_profile = nullptr;

int g_level = 0;   // GGML_LORA_PROFILE=2: also the shapes

std::string op_key(const ggml_tensor * t) {
    std::string key = ggml_op_desc(t);
    if (g_level >= 2) key += " " + glora_shape_str(t);
    if (t->src[0]) {
        key += " [";
        key += ggml_type_name(t->src[0]->type);
        if (g_level >= 2) key += " " + glora_shape_str(t->src[0]);
        if (t->src[1]) {
            key += " x ";
            key += ggml_type_name(t->src[1]->type);
            if (g_level >= 2) key += " " + glora_shape_str(t->src[1]);
            key += ggml_is_contiguous(t->src[1]) ? " c" : " nc";
        }
        key += "]";
    }
    return key;
}

bool on_node(ggml_tensor * t, bool ask, void * user) {
    auto * p = static_cast<profile *>(user);
    if (ask) {
        p->start = clock_type::now();
        return true;
    }
    const double s = std::chrono::duration<double>(clock_type::now() - p->start).count();
    std::lock_guard<std::mutex> lock(p->mu);
    op_stats & st = p->ops[op_key(t)];
    st.seconds += s;
    st.calls += 1;
    return true;
}

}  // namespace

void glora_profile_attach(ggml_backend_sched_t sched) {
    static const int level = [] {
        const char * v = getenv("GGML_LORA_PROFILE");
        return v ? atoi(v) : 0;
    }();
    if (level <= 0) return;
    g_level = level;
    static profile p;
    g_profile = &p;
    ggml_backend_sched_set_eval_callback(sched, on_node, g_profile);
}
