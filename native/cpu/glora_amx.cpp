// Products on Intel AMX tiles in BF16 (glora_model::bf16): a training forward's products through the stored
// frozen weights and its attention products, and the backward's through the BF16 transposed copies.
//
// ggml's CPU mul_mat multiplies BF16 weights by BF16-rounded activations with AVX-512 dot products at
// tens of GFLOP/s per core; an AMX core multiplies 16x32 by 32x16 BF16 tiles into FP32 accumulators an
// order of magnitude faster (a 576x576 by 576x1024 product: ~35 against ~450 GFLOP/s on one Sapphire
// Rapids core). ggml's own AMX code only covers quantized weights and crashes in the pinned tree (see
// ggml_lora/llama.py), so this is a kernel of our own, run as a CPU custom op that takes the place of a
// mul_mat node after the graph is built: dst[m][n] = Σ_k x[m][k]·w[n][k], w BF16 or any type ggml converts
// to F32 [N rows of K], x F32, for each matrix of a stack (attention: one per head and sequence).
//
// Per thread, over its share of x's rows (or of w's, or of the stack) in panels of up to P rows, K in
// chunks of at most 1024: the panel's rows are rounded to BF16
// (the A tiles: 16 rows of 32 values); then for each block of 32 rows of w, the block is rearranged into
// the B tiles' layout (pairs of k side by side: a 16x16 transpose of 32-bit words) and the panel runs
// against it in 32x32 output blocks (four FP32 accumulator tiles, K in steps of 32), stored straight into
// dst. Both rearrangements are one pass over data the products read P or 32 times.
//
// A product through a frozen matrix (one 2-D matrix each side) gets both rearrangements done once, by
// nodes of their own that all threads share: x rounded to BF16 (one node for the products that read the
// same x: q, k and v; gate and up) and a stored weight dequantized into the B tiles' layout (a transient
// BF16 matrix, freed after its product; in the backward it takes the place of the transposed copy).
// Done inside the product, each thread repeated the one the threads did not split (a thread of two
// rounded all of x, or dequantized and packed all of w) and each product rounded its x again.
//
// The same arithmetic as ggml's BF16 mul_mat (BF16 x BF16 products, FP32 sums); only the order of the
// sums differs. Used only where the CPU has AMX-BF16 and the kernel granted the process its tile state.
#include "glora_internal.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <unordered_map>

#if defined(__x86_64__) && defined(__linux__) && !defined(GLORA_NO_AMX) && \
    (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#define GLORA_HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kTile = 32;                 // output block: 32 rows of x by 32 rows of w
constexpr size_t  kPanelBudget = 2u << 20;    // bytes of BF16 x rows a thread keeps at once
constexpr int64_t kScratchPerK = 72;          // bytes per k of a thread's scratch besides its panel
constexpr int64_t kChunk = 1024;              // the longest run of K one pass multiplies (a multiple of 256)

// n rounded up to whole tile steps
int64_t whole_tiles(int64_t n) { return (n + kTile - 1) / kTile * kTile; }

// the longest run of K a product of inner dimension K multiplies at once, in whole tile steps
int64_t chunk(int64_t K) { return std::min(whole_tiles(K), kChunk); }

#ifdef GLORA_HAVE_AMX

bool detect() {
    const char * off = getenv("GGML_LORA_NO_AMX");     // the tiles left alone, as on a CPU without them
    if (off && *off && strcmp(off, "0") != 0) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24);
    if (!amx_bf16 || !amx_tile) return false;
    // Linux hands out the 8 KiB tile state only on request (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA);
    // without it the first tile instruction raises SIGILL. The grant is for the whole process.
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

struct tile_config {
    uint8_t  palette_id;
    uint8_t  start_row;
    uint8_t  reserved[14];
    uint16_t colsb[16];
    uint8_t  rows[16];
};

#define GLORA_AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))

// tiles 0-3: FP32 accumulators C[m-half][n-half]; 4, 5: A (16 rows of x, 32 BF16 each); 6, 7: B (16 pairs
// of k by 16 rows of w). Every tile is 16 rows of 64 bytes. A constant in memory: GCC 12 drops the stores
// that fill a local configuration before ldtilecfg reads it (seen here: the palette only, then #GP).
alignas(64) const tile_config kTileConfig = {
    1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

GLORA_AMX_TARGET void load_tile_config() { _tile_loadconfig(&kTileConfig); }

// Rows [n0, n0 + n_rows) (n_rows <= 32), columns [k0, k0 + K) of w -> B tiles for KP pairs of k (2·KP >= K):
// out[h][kp][i] = the BF16 pair kp of row 16h + i, zero past the rows and columns that exist. BF16 rows
// are moved as 32-bit words; rows of any other type are converted to F32 by ggml (row_f: K floats), then
// rounded to BF16 (row_b: 2·KP values) as ggml's copy to BF16 rounds: the values a BF16 copy would hold.
void pack_w(const ggml_tensor * w, const char * w_data, int64_t n0, int64_t n_rows, int64_t k0, int64_t K,
            int64_t KP, uint32_t * out, float * row_f, uint16_t * row_b) {
    const ggml_to_float_t to_float = ggml_get_type_traits(w->type)->to_float;
    const size_t offset = (size_t) (k0 / ggml_blck_size(w->type)) * ggml_type_size(w->type);
    for (int64_t h = 0; h < 2; ++h) {
        uint32_t * o = out + h * KP * 16;
        for (int64_t i = 0; i < 16; ++i) {
            if (16 * h + i >= n_rows) {
                for (int64_t kp = 0; kp < KP; ++kp) o[kp * 16 + i] = 0;
                continue;
            }
            const char * src = w_data + (n0 + 16 * h + i) * w->nb[1] + offset;
            const char * row = src;
            if (w->type != GGML_TYPE_BF16 || K < 2 * KP) {
                if (w->type == GGML_TYPE_BF16) memcpy(row_b, src, (size_t) K * 2);
                else if (w->type == GGML_TYPE_F32) ggml_cpu_fp32_to_bf16((const float *) src, (ggml_bf16_t *) row_b, K);
                else {
                    to_float(src, row_f, K);
                    ggml_cpu_fp32_to_bf16(row_f, (ggml_bf16_t *) row_b, K);
                }
                for (int64_t k = K; k < 2 * KP; ++k) row_b[k] = 0;
                row = (const char *) row_b;
            }
            for (int64_t kp = 0; kp < KP; ++kp) memcpy(o + kp * 16 + i, row + 4 * kp, 4);   // any alignment
        }
    }
}

// rows [m0, m0 + 32) of the panel (BF16, K per row, zeros past the end of rows and of K) against the
// packed block of w rows [n0, n0 + 32): dst rows m0.., columns n0.. (only the first `rows` and `cols` of
// them exist), set, or added to (the later chunks of a long K).
GLORA_AMX_TARGET void block(const uint16_t * xp, int64_t K, const uint32_t * wp, float * dst, int64_t ldd,
                            int64_t rows, int64_t cols, bool accumulate) {
    const int64_t KP = K / 2;
    const bool whole = rows >= kTile && cols >= kTile;
    const int64_t nr = std::min(rows, kTile), nc = std::min(cols, kTile);
    alignas(64) float c[kTile][kTile];
    if (!accumulate) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    } else if (whole) {
        _tile_loadd(0, dst, ldd * 4);
        _tile_loadd(1, dst + 16, ldd * 4);
        _tile_loadd(2, dst + 16 * ldd, ldd * 4);
        _tile_loadd(3, dst + 16 * ldd + 16, ldd * 4);
    } else {
        memset(c, 0, sizeof c);
        for (int64_t r = 0; r < nr; ++r) memcpy(c[r], dst + r * ldd, (size_t) nc * 4);
        // GCC's tile intrinsics are asm without a memory clobber: nothing orders c's stores before them
        __asm__ __volatile__("" ::: "memory");
        _tile_loadd(0, &c[0][0], kTile * 4);
        _tile_loadd(1, &c[0][16], kTile * 4);
        _tile_loadd(2, &c[16][0], kTile * 4);
        _tile_loadd(3, &c[16][16], kTile * 4);
    }
    const uint16_t * a0 = xp;
    const uint16_t * a1 = xp + 16 * K;
    const uint32_t * b0 = wp;
    const uint32_t * b1 = wp + KP * 16;
    for (int64_t k = 0; k < K; k += 32) {
        _tile_loadd(4, a0 + k, K * 2);
        _tile_loadd(5, a1 + k, K * 2);
        _tile_loadd(6, b0 + k / 2 * 16, 64);
        _tile_loadd(7, b1 + k / 2 * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    if (whole) {
        _tile_stored(0, dst, ldd * 4);
        _tile_stored(1, dst + 16, ldd * 4);
        _tile_stored(2, dst + 16 * ldd, ldd * 4);
        _tile_stored(3, dst + 16 * ldd + 16, ldd * 4);
        return;
    }
    _tile_stored(0, &c[0][0], kTile * 4);
    _tile_stored(1, &c[0][16], kTile * 4);
    _tile_stored(2, &c[16][0], kTile * 4);
    _tile_stored(3, &c[16][16], kTile * 4);
    __asm__ __volatile__("" ::: "memory");      // the tile stores land in c before it is read
    for (int64_t r = 0; r < nr; ++r) memcpy(dst + r * ldd, c[r], (size_t) nc * 4);
}

GLORA_AMX_TARGET void release_tiles() { _tile_release(); }

// w packed whole (pack_weights): for each block of 32 rows, for each chunk of K, pack_w's layout of it.
// The words before block n0 / 32's chunk at k0: 16 per k of every block before it (K rounded up to a
// tile step, as the chunks are), and 16 per k of the chunks before k0 (whole kChunk ones).
int64_t packed_offset(int64_t K, int64_t n0, int64_t k0) {
    return n0 / kTile * 16 * whole_tiles(K) + 16 * k0;
}

// dst = w (src[0], a frozen matrix or its working copy, K = w->ne[0]) in the B tiles' layout, once for
// all threads and panels of a product (packed_offset): each block of 32 rows of w by the threads in turn.
void pack_weights(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto * scratch = (const glora_amx_scratch *) userdata;
    const ggml_tensor * w = dst->src[0];
    const int64_t K = w->ne[0], N = w->ne[1];
    const int64_t KC = chunk(K);
    const int nt = std::min(nth, scratch->n_threads);
    if (ith >= nt) return;
    uint8_t * mine = scratch->data + (size_t) ith * scratch->per_thread;
    auto * row_f = (float *) (mine + 64 * KC);
    auto * row_b = (uint16_t *) (mine + 68 * KC);
    auto * out = (uint32_t *) dst->data;
    const int64_t n_blocks = (N + kTile - 1) / kTile;
    for (int64_t nb = ith; nb < n_blocks; nb += nt) {
        const int64_t n0 = nb * kTile;
        for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
            const int64_t kc = std::min(kChunk, K - k0);
            pack_w(w, (const char *) w->data, n0, std::min(kTile, N - n0), k0, kc, whole_tiles(kc) / 2,
                   out + packed_offset(K, n0, k0), row_f, row_b);
        }
    }
}

// dst = the transposed copy wᵀ of a frozen matrix w (src[0], ne = [n_in, n_out]; dst ne = [n_out, n_in],
// both multiples of 32) in the B tiles' layout (packed_offset with K = n_out, N = n_in), straight from w:
// the backward's transient copy and its packing in one pass. Each pair of w's rows is a pair of k; 16 of
// their columns make 16 words. The values of the BF16 copy (w dequantized to F32, rounded as ggml rounds).
void pack_transposed(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * w = dst->src[0];
    const int64_t N = w->ne[0], K = w->ne[1];
    const ggml_to_float_t to_float = ggml_get_type_traits(w->type)->to_float;
    const int64_t blck = ggml_blck_size(w->type);
    constexpr int64_t kSeg = 256;                   // columns at a time: a multiple of every block size
    float f[2][kSeg];
    uint16_t b[2][kSeg];
    auto * out = (uint32_t *) dst->data;
    const int64_t n_pairs = K / 2;
    for (int64_t kp = n_pairs * ith / nth; kp < n_pairs * (ith + 1) / nth; ++kp) {
        const int64_t k = 2 * kp, k0 = k / kChunk * kChunk;
        const int64_t KP = std::min(kChunk, K - k0) / 2;     // pairs in this chunk of K (a whole tile step)
        for (int64_t c0 = 0; c0 < N; c0 += kSeg) {
            const int64_t len = std::min(kSeg, N - c0);
            for (int j = 0; j < 2; ++j) {
                const char * src = (const char *) w->data + (k + j) * w->nb[1] + (size_t) (c0 / blck) * ggml_type_size(w->type);
                if (w->type == GGML_TYPE_BF16) {
                    memcpy(b[j], src, (size_t) len * 2);
                    continue;
                }
                if (w->type == GGML_TYPE_F32) memcpy(f[j], src, (size_t) len * 4);
                else to_float(src, f[j], len);
                ggml_cpu_fp32_to_bf16(f[j], (ggml_bf16_t *) b[j], len);
            }
            for (int64_t n = c0; n < c0 + len; n += 16) {
                uint32_t * o = out + packed_offset(K, n / kTile * kTile, k0) + n % kTile / 16 * KP * 16 + (k - k0) / 2 * 16;
                for (int64_t i = 0; i < 16; ++i) o[i] = (uint32_t) b[0][n - c0 + i] | (uint32_t) b[1][n - c0 + i] << 16;
            }
        }
    }
}

// One 2-D product of the op: rows [m_begin, m_end) of x (F32 rows, or BF16 ones where x_bf16, at byte
// stride ldx_b from x_data) by
// rows [n_begin, n_end) of w (w's type, rows at w->nb[1] from w_data, K = w->ne[0]) into dst (F32 rows at
// byte stride ldd_b from dst_data), with this thread's scratch.
void product(const ggml_tensor * w, const char * w_data, const uint32_t * w_packed, const char * x_data,
             size_t ldx_b, bool x_bf16, char * dst_data, size_t ldd_b, int64_t m_begin, int64_t m_end,
             int64_t n_begin, int64_t n_end, uint8_t * mine, size_t per_thread) {
    const int64_t K = w->ne[0];
    const int64_t ldd = (int64_t) (ldd_b / 4);
    // K in chunks of at most kChunk: a panel of x rows and a block of w stay in the core's caches
    // however long K is (the LM head's backward: K = n_vocab); later chunks add to dst. A K that is not
    // a whole number of tile steps ends in zeros (x's and w's alike).
    const int64_t KC = chunk(K);
    auto * wp    = (uint32_t *) mine;                                     // 64·KC bytes: the packed block of w
    auto * row_f = (float *) (mine + 64 * KC);                            // 4·KC
    auto * row_b = (uint16_t *) (mine + 68 * KC);                         // 2·KC
    auto * xp    = (uint16_t *) (mine + kScratchPerK * KC);               // the panel of x rows
    const int64_t panel = std::min<int64_t>(1024, (int64_t) ((per_thread - kScratchPerK * KC) / (2 * KC)) / kTile * kTile);
    for (int64_t p0 = m_begin; p0 < m_end; p0 += panel) {
        const int64_t rows = std::min(panel, m_end - p0);
        const int64_t padded = whole_tiles(rows);
        for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
            const int64_t kc = std::min(kChunk, K - k0);
            const int64_t kt = whole_tiles(kc);
            for (int64_t r = 0; r < rows; ++r) {
                uint16_t * row = xp + r * kt;
                if (x_bf16) memcpy(row, (const uint16_t *) (x_data + (p0 + r) * ldx_b) + k0, (size_t) kc * 2);
                else ggml_cpu_fp32_to_bf16((const float *) (x_data + (p0 + r) * ldx_b) + k0, (ggml_bf16_t *) row, kc);
                for (int64_t k = kc; k < kt; ++k) row[k] = 0;
            }
            memset(xp + rows * kt, 0, (size_t) (padded - rows) * kt * 2);
            for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
                const int64_t cols = std::min(kTile, n_end - n0);
                const uint32_t * b = wp;
                if (w_packed) b = w_packed + packed_offset(K, n0, k0);
                else pack_w(w, w_data, n0, cols, k0, kc, kt / 2, wp, row_f, row_b);
                for (int64_t s = 0; s < padded; s += kTile) {
                    block(xp + s * kt, kt, b, (float *) (dst_data + (p0 + s) * ldd_b) + n0, ldd, rows - s, cols,
                          k0 > 0);
                }
            }
        }
    }
}
#endif

// The custom op: dst = mul_mat(w, x) with w = src[0], x = src[1] (F32), dst F32 contiguous, as fits()
// admits them: for each (i2, i3) of x and dst, the 2-D product with w's matrix (i2 / r2, i3 / r3), r2 and
// r3 ggml's broadcast factors. With src[2] (round_rows: x rounded to BF16 once for every product that
// reads it) the rows come from there; with src[3] (pack_weights or pack_transposed, for 2-D products) the
// B tiles.
void amx_mul_mat(ggml_tensor * dst, int ith, int nth, void * userdata) {
#ifdef GLORA_HAVE_AMX
    const auto * scratch = (const glora_amx_scratch *) userdata;
    const ggml_tensor * w = dst->src[0];
    const ggml_tensor * x = dst->src[2] ? dst->src[2] : dst->src[1];
    const bool x_bf16 = x->type == GGML_TYPE_BF16;
    const auto * w_packed = dst->src[3] ? (const uint32_t *) dst->src[3]->data : nullptr;
    const int64_t N = w->ne[1], M = x->ne[1];
    const int64_t n_mat = x->ne[2] * x->ne[3];
    const int64_t r2 = x->ne[2] / w->ne[2], r3 = x->ne[3] / w->ne[3];
    const int nt = std::min(nth, scratch->n_threads);                    // threads with scratch of their own
    if (ith >= nt) return;
    uint8_t * mine = scratch->data + (size_t) ith * scratch->per_thread;
    auto run = [&](int64_t i, int64_t m_begin, int64_t m_end, int64_t n_begin, int64_t n_end) {
        const int64_t i2 = i % x->ne[2], i3 = i / x->ne[2];
        product(w, (const char *) w->data + (i2 / r2) * w->nb[2] + (i3 / r3) * w->nb[3], w_packed,
                (const char *) x->data + i2 * x->nb[2] + i3 * x->nb[3], x->nb[1], x_bf16,
                (char *) dst->data + i2 * dst->nb[2] + i3 * dst->nb[3], dst->nb[1],
                m_begin, m_end, n_begin, n_end, mine, scratch->per_thread);
    };
    load_tile_config();
    if (n_mat >= nt) {                       // many matrices (attention's heads by sequences): whole ones each
        for (int64_t i = n_mat * ith / nt; i < n_mat * (ith + 1) / nt; ++i) run(i, 0, M, 0, N);
    } else {
        // Each thread packs every block of w it multiplies, once per panel of x, and rounds every row of x
        // it reads: split the longer of the two sides among the threads, so that the shorter one is what
        // each thread repeats.
        int64_t m_begin = 0, m_end = M, n_begin = 0, n_end = N;
        const int64_t n_blocks = (N + kTile - 1) / kTile;
        if (N >= M && n_blocks >= nt) {
            n_begin = n_blocks * ith / nt * kTile;
            n_end   = std::min(N, n_blocks * (ith + 1) / nt * kTile);
        } else {
            const int64_t blocks = (M + kTile - 1) / kTile;
            m_begin = blocks * ith / nt * kTile;
            m_end   = std::min(M, blocks * (ith + 1) / nt * kTile);
        }
        if (m_begin < m_end && n_begin < n_end) {
            for (int64_t i = 0; i < n_mat; ++i) run(i, m_begin, m_end, n_begin, n_end);
        }
    }
    release_tiles();
#else
    (void) dst; (void) ith; (void) nth; (void) userdata;
#endif
}

// dst = mul_mat(w, x) that amx_mul_mat computes: w with contiguous rows, BF16 (a working copy), F32, or
// any type ggml converts to F32 (a stored weight), by F32 x with contiguous rows at any strides,
// broadcast over dims 2 and 3 as ggml's mul_mat does; dst contiguous; any K and N (tails padded with zeros).
bool fits(const ggml_tensor * node) {
    const ggml_tensor * w = node->src[0];
    const ggml_tensor * x = node->src[1];
    if (node->op != GGML_OP_MUL_MAT || x->type != GGML_TYPE_F32 || node->type != GGML_TYPE_F32) return false;
    if (!ggml_is_contiguous(node)) return false;
    if (x->ne[2] % w->ne[2] || x->ne[3] % w->ne[3]) return false;
    if (w->type != GGML_TYPE_BF16 && w->type != GGML_TYPE_F32 && !ggml_get_type_traits(w->type)->to_float) return false;
    if (w->nb[0] != ggml_type_size(w->type) || w->ne[0] % ggml_blck_size(w->type)) return false;
    return x->nb[0] == 4 && x->nb[1] % 4 == 0;
}

// dst = src[0] (F32 rows, a 2-D product's x) rounded to BF16, contiguous; the threads share the rows.
void round_rows(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * x = dst->src[0];
    const int64_t K = x->ne[0], M = x->ne[1];
    for (int64_t r = M * ith / nth; r < M * (ith + 1) / nth; ++r) {
        ggml_cpu_fp32_to_bf16((const float *) ((const char *) x->data + r * x->nb[1]),
                              (ggml_bf16_t *) ((char *) dst->data + r * dst->nb[1]), K);
    }
}

// node (a mul_mat that fits) becomes the AMX op in place (glora_as_custom), with scratch enough for its K
// on n_threads.
void to_amx(ggml_context * ctx, ggml_tensor * node, glora_amx_scratch * s, int n_threads, ggml_tensor ** tmpl) {
    const int64_t KC = chunk(node->src[0]->ne[0]);
    const size_t need = std::max<size_t>(kPanelBudget, (size_t) KC * 2 * kTile) + kScratchPerK * (size_t) KC;
    if (need > s->per_thread || s->n_threads < n_threads) {
        s->per_thread = std::max(need, s->per_thread);
        s->n_threads  = std::max(n_threads, s->n_threads);
        s->buf.assign(s->per_thread * (size_t) s->n_threads + 64, 0);
        s->data = (uint8_t *) (((uintptr_t) s->buf.data() + 63) & ~(uintptr_t) 63);
    }
    glora_as_custom(ctx, node, tmpl, amx_mul_mat, s);
}

}  // namespace

// The products the graph builder described for reduced precision that go to the tiles: a training
// forward's attention, and its products through stored frozen matrices of a type other than F32 (an F32
// matrix keeps its F32 product, as PyTorch's autocast would not round a float32 weight it has no copy of).
static bool amx_hinted(const ggml_tensor * node) {
    const glora_product_hint h = glora_hint_of(node);
    return h == GLORA_HINT_ATTENTION || (h == GLORA_HINT_FROZEN && node->src[0]->type != GGML_TYPE_F32);
}

bool glora_amx_available() {
#ifdef GLORA_HAVE_AMX
    static const bool ok = detect();
    return ok;
#else
    return false;
#endif
}

// Replaces by the AMX op each product through a BF16 working copy of a frozen matrix (persistent or
// transient transposed copy), each forward product the graph builder hinted (amx_hinted: the training
// forward through a stored weight, in place of a forward copy, and the attention's products), and in a
// graph with hints every other F32 product that fits but the LoRA products (the attention's backward).
// Products of graphs without hints through the stored weights keep ggml's kernels: evaluation stays
// llama.cpp's arithmetic.
//
// A 2-D product's x (one matrix: the products through frozen weights) is rounded to BF16 once, in a node
// of its own that every product reading it shares (q, k and v read one x; gate and up another): otherwise
// each product rounds it again, and each thread rounds all of it where the threads split w's rows (an
// eighth of a BF16 step went there). The LM head's products are left as they were: their x is a logits
// gradient (n_vocab rows), whose BF16 copy would cost more memory than the rounding costs time.
// Returns true when it added such nodes (the caller rebuilds the graph in order).
bool glora_amx_products(const glora_model * m, ggml_context * ctx, ggml_cgraph * gf) {
#ifndef GLORA_HAVE_AMX
    (void) m, (void) ctx, (void) gf;
    return false;      // a build without the tiles never sets m->bf16 (glora_amx_available() is false)
#else
    if (!m->bf16) return false;
    glora_amx_scratch & s = m->amx;
    ggml_tensor * tmpl = nullptr;
    ggml_tensor * pack_tmpl = nullptr;
    std::unordered_map<const ggml_tensor *, ggml_tensor *> rounded;     // x -> its BF16 rows
    bool marked = false;                    // a training forward in BF16: its backward's F32 products too
    for (int i = 0; i < ggml_graph_n_nodes(gf) && !marked; ++i) {
        const ggml_tensor * node = ggml_graph_node(gf, i);
        marked = node->op == GGML_OP_MUL_MAT && amx_hinted(node);
    }
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        if (!fits(node)) continue;
        ggml_tensor * w = node->src[0];
        // the backward's transient transposed copy, made in this graph from the frozen matrix w->src[0]
        const bool transient = m->transient_copy(w);
        const bool copy = w->type == GGML_TYPE_BF16 && (m->wf.source.count(w) || m->wt.source.count(w) || transient);
        // (the LoRA products themselves stay in F32: their operands are the trained parameters)
        const bool lora = (w->flags & GGML_TENSOR_FLAG_PARAM) || (node->src[1]->flags & GGML_TENSOR_FLAG_PARAM);
        const bool f32 = marked && !lora && w->type == GGML_TYPE_F32 && node->src[1]->type == GGML_TYPE_F32;
        if (!copy && !f32 && !amx_hinted(node)) continue;
        to_amx(ctx, node, &s, m->be.n_threads, &tmpl);
        ggml_tensor * x = node->src[1];
        if (!(copy || m->frozen_matrix(w)) || w->ne[1] >= m->n_vocab || x->ne[0] >= m->n_vocab) continue;
        if (ggml_nrows(x) != x->ne[1]) continue;
        ggml_tensor *& xb = rounded[x];
        if (!xb) {
            ggml_tensor * args[] = {x};
            xb = ggml_custom_4d(ctx, GGML_TYPE_BF16, x->ne[0], x->ne[1], 1, 1, args, 1, round_rows, GGML_N_TASKS_MAX,
                                nullptr);
            ggml_format_name(xb, "%s.bf16", x->name);
        }
        node->src[2] = xb;
        if (copy) {
            // a transient copy becomes its packed form, made straight from the frozen matrix (the same
            // size when both sides are whole tiles); a persistent copy is left as it is
            const ggml_tensor * src = w->src[0];
            if (transient && w->ne[0] % kTile == 0 && w->ne[1] % kTile == 0 && ggml_is_contiguous(w) &&
                (src->type == GGML_TYPE_F32 || src->type == GGML_TYPE_BF16 || ggml_get_type_traits(src->type)->to_float)) {
                glora_as_custom(ctx, w, &pack_tmpl, pack_transposed, nullptr);
                node->src[3] = w;
            }
            continue;
        }
        ggml_tensor * args[] = {w};
        node->src[3] = ggml_custom_4d(ctx, GGML_TYPE_BF16, whole_tiles(w->ne[0]), whole_tiles(w->ne[1]), 1, 1, args, 1,
                                      pack_weights, GGML_N_TASKS_MAX, &s);
        ggml_format_name(node->src[3], "%s.tiles", w->name);
    }
    return !rounded.empty();
#endif
}

// Test-only (see ggml_lora.h): out[b][M][N] = x[b][M][K] · w[b][N][K]ᵀ through the AMX op in a graph of its own.
extern "C" GLORA_API int32_t glora_selftest_amx(const uint16_t * w, const float * x, float * out, int64_t K,
                                                int64_t N, int64_t M, int64_t n_mat, int32_t n_threads) {
    return glora_guard(__func__, [&]() -> int32_t {
        GLORA_CHECK_ARG(w && x && out, "glora_selftest_amx: NULL argument");
        GLORA_CHECK_ARG(K > 0 && N > 0 && M > 0 && n_mat > 0 && n_threads > 0 && n_threads <= GGML_MAX_N_THREADS,
                        "glora_selftest_amx: K=%lld, N=%lld, M=%lld, n_mat=%lld and n_threads=%d must be positive",
                        (long long) K, (long long) N, (long long) M, (long long) n_mat, n_threads);
        if (!glora_amx_available()) return glora_fail(GLORA_ERR_UNSUPPORTED, "this CPU has no AMX-BF16 tiles");
        // w, x, the product, the graph and its work buffer
        const size_t bytes = (size_t) n_mat * (K * N * 2 + K * M * 4 + N * M * 4) + 16 * ggml_tensor_overhead()
                           + ggml_graph_overhead() + ((size_t) 1 << 20);
        ggml_init_params ip = {bytes, nullptr, false};
        ggml_context * ctx = ggml_init(ip);
        if (!ctx) return glora_fail(GLORA_ERR_OUT_OF_MEMORY, "glora_selftest_amx: %zu bytes", bytes);
        ggml_tensor * wt = ggml_new_tensor_3d(ctx, GGML_TYPE_BF16, K, N, n_mat);
        ggml_tensor * xt = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, K, M, n_mat);
        memcpy(wt->data, w, ggml_nbytes(wt));
        memcpy(xt->data, x, ggml_nbytes(xt));
        ggml_tensor * y = ggml_mul_mat(ctx, wt, xt);
        glora_amx_scratch s;
        ggml_tensor * tmpl = nullptr;
        to_amx(ctx, y, &s, n_threads, &tmpl);
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, y);
        const ggml_status st = ggml_graph_compute_with_ctx(ctx, gf, n_threads);
        if (st == GGML_STATUS_SUCCESS) memcpy(out, y->data, ggml_nbytes(y));
        ggml_free(ctx);
        return st == GGML_STATUS_SUCCESS ? GLORA_OK : glora_fail(GLORA_ERR_BACKEND, "glora_selftest_amx: status %d", (int) st);
    });
}
