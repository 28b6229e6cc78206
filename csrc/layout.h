// The DALL-E attention masks as index arithmetic, and the block layouts the kernels walk.
//
// Plain C++ (no torch headers): it is included by the CPU kernels, by the CUDA kernels (the
// element predicate is __host__ __device__) and by the standalone ctest in csrc/tests/.
//
// Token order is [text_len text tokens ; image_size**2 image tokens]. Text queries attend causally to
// text; image queries attend to every text token plus the image keys their kind selects:
//   causal  every earlier image token (ordinary dense causal attention)
//   row     the previous image_size + 1 image tokens in raster order, itself included
//   column  the same column, rows up to its own. Kernels always see COLUMN on transposed image states
//           (the paper's mask (c)): token (r, c) sits at image index c * image_size + r, so the allowed
//           keys of image index p are the contiguous run [p - p % image_size, p].
//   conv    raster offsets o = dr * W + dc >= 0 with 0 <= dr <= s, -s <= dc <= s, s = kernel_size / 2
//           (11x11 kernel: 61 keys). Offsets wrap around row ends, as the paper's "with wraparound".
#pragma once

#include <cstdint>
#ifndef __CUDACC_RTC__  // NVRTC (dalle_fast/ops/nvrtc.py) reads the device part only
#include <memory>
#include <string>
#include <vector>
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define DF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DF_HOST_DEVICE inline
#endif

namespace dalle_fast {

enum class MaskKind : int32_t { kCausal = 0, kRow = 1, kColumn = 2, kConv = 3 };

#ifndef __CUDACC_RTC__
// Parses "causal" | "row" | "column" | "conv"; returns false for anything else.
bool parse_mask_kind(const std::string& name, MaskKind* kind);
const char* mask_kind_name(MaskKind kind);
#endif

// The largest image side: image_size^2 tokens must fit the kernels' 32-bit token indices.
constexpr int64_t kMaxImageSize = 46340;

struct MaskSpec {
  MaskKind kind;
  int64_t text_len;
  int64_t image_size;
  int64_t kernel_size;  // only read by kConv

  DF_HOST_DEVICE int64_t seq_len() const { return text_len + image_size * image_size; }
};

// Is raster offset o >= 0 inside the causal conv kernel of half-width s on a grid W wide? Kernel row
// dr in [0, s] allows the offsets [dr W - s, dr W + s]. When 2 s + 1 >= W these windows touch and their
// union is [-s, s W + s]; otherwise o lies in row d = (o + s) / W's window iff (o + s) - d W <= 2 s.
template <typename I>
DF_HOST_DEVICE bool conv_offset_allowed(I o, I W, I s) {
  if (2 * s + 1 >= W) return o <= s * W + s;
  const I d = (o + s) / W;
  return d <= s && o + s - d * W <= 2 * s;
}

// May query i attend to key j? (Absolute token indices; kColumn means transposed image states.) I is
// the index type. The GPU kernels evaluate the split forms below instead, in 32-bit arithmetic.
template <typename I>
DF_HOST_DEVICE bool mask_allows_t(const MaskSpec& m, I i, I j) {
  if (j > i) return false;
  const I T = static_cast<I>(m.text_len);
  if (i < T || j < T) return true;  // text->text causal, image->text dense
  const I p = i - T, q = j - T, W = static_cast<I>(m.image_size);
  switch (m.kind) {
    case MaskKind::kCausal:
      return true;
    case MaskKind::kRow:
      return p - q <= W;
    case MaskKind::kColumn:
      return q >= p - p % W;
    case MaskKind::kConv:
      return conv_offset_allowed<I>(p - q, W, static_cast<I>(m.kernel_size / 2));
  }
  return false;
}

DF_HOST_DEVICE bool mask_allows(const MaskSpec& m, int64_t i, int64_t j) { return mask_allows_t<int64_t>(m, i, j); }

// ---- The predicate split for the kernels' partial tiles ------------------------------------------------
// A tile's rows and columns each hold a handful of distinct tokens, so the GPU kernels compute what
// depends on one token once per row or column and keep a few compares per element (no division, which
// costs as much as the rest together). Indices >= seq_len are padding, never visible. Each form equals
// mask_allows on every pair: csrc/tests/test_layout.cpp checks them all.

// A token's index with its image row and column (0, 0 for text tokens).
template <typename I>
struct TokenPos {
  I idx, r, c;
};

template <typename I>
DF_HOST_DEVICE TokenPos<I> token_pos(const MaskSpec& m, I x) {
  const I T = static_cast<I>(m.text_len), W = static_cast<I>(m.image_size);
  if (x < T) return TokenPos<I>{x, 0, 0};
  const I r = (x - T) / W;
  return TokenPos<I>{x, r, x - T - r * W};
}

// Conv, for image tokens with key <= query: is raster offset dr * W + dc (dr, dc the row and column
// differences, |dc| < W) inside the kernel? The same windows as conv_offset_allowed: row d of the
// kernel allows offsets [d W - s, d W + s], so the offset lies in window dr (|dc| <= s), dr + 1
// (dc >= W - s) or dr - 1 (dc <= s - W); dr >= 0 follows from offset >= 0.
template <typename I>
DF_HOST_DEVICE bool conv_pos_allowed(I dr, I dc, I W, I s) {
  if (2 * s + 1 >= W) return dr * W + dc <= s * W + s;
  return (dc >= -s && dc <= s && dr <= s) || (dc >= W - s && dr < s) || (dc <= s - W && dr <= s + 1);
}

// Query-major (rows of queries, as in the forward and dQ): what query i brings to its row.
template <typename I>
struct QueryRow {
  I last;          // i, or -1 for padding: keys j <= last can be seen
  I lo;            // kinds other than conv: image keys j >= lo are seen, text keys always
  TokenPos<I> pos; // conv
};

template <typename I>
DF_HOST_DEVICE QueryRow<I> query_row(const MaskSpec& m, I i, I seq_len) {
  const I T = static_cast<I>(m.text_len), W = static_cast<I>(m.image_size);
  QueryRow<I> q{i < seq_len ? i : I(-1), 0, TokenPos<I>{i, 0, 0}};
  if (i < T) return q;  // text: every key up to itself
  switch (m.kind) {
    case MaskKind::kCausal:
      break;
    case MaskKind::kRow:
      q.lo = i - W;
      break;
    case MaskKind::kColumn:
      q.lo = i - (i - T) % W;
      break;
    case MaskKind::kConv:
      q.pos = token_pos<I>(m, i);
      break;
  }
  return q;
}

// Kinds other than conv.
template <typename I>
DF_HOST_DEVICE bool query_row_sees(const MaskSpec& m, const QueryRow<I>& q, I j) {
  return j <= q.last && (j < static_cast<I>(m.text_len) || j >= q.lo);
}

// Conv, with the key's position.
template <typename I>
DF_HOST_DEVICE bool query_row_sees_conv(const MaskSpec& m, const QueryRow<I>& q, const TokenPos<I>& k) {
  return k.idx <= q.last && (k.idx < static_cast<I>(m.text_len) ||
                             conv_pos_allowed<I>(q.pos.r - k.r, q.pos.c - k.c, static_cast<I>(m.image_size),
                                                 static_cast<I>(m.kernel_size / 2)));
}

// Key-major (rows of keys, as in the dK/dV pass): what key j brings to its row.
template <typename I>
struct KeyRow {
  I first;         // j: queries i >= first can see it
  I hi;            // kinds other than conv: the last query that sees it (-1 for padding)
  TokenPos<I> pos; // conv
};

template <typename I>
DF_HOST_DEVICE KeyRow<I> key_row(const MaskSpec& m, I j, I seq_len) {
  const I T = static_cast<I>(m.text_len), W = static_cast<I>(m.image_size);
  KeyRow<I> k{j, j < seq_len ? seq_len - 1 : I(-1), token_pos<I>(m, j < seq_len ? j : I(0))};
  if (j < T || j >= seq_len) return k;  // a text key: every later query
  switch (m.kind) {
    case MaskKind::kCausal:
    case MaskKind::kConv:
      break;
    case MaskKind::kRow:
      k.hi = j < seq_len - W ? j + W : seq_len - 1;  // (j + W could overflow I)
      break;
    case MaskKind::kColumn:
      k.hi = j - (j - T) % W + W - 1;  // the end of its (transposed) row, never past seq_len - 1
      break;
  }
  return k;
}

// Kinds other than conv.
template <typename I>
DF_HOST_DEVICE bool key_row_seen_by(const KeyRow<I>& k, I i) {
  return i >= k.first && i <= k.hi;
}

// Conv, with the query's position.
template <typename I>
DF_HOST_DEVICE bool key_row_seen_by_conv(const MaskSpec& m, const KeyRow<I>& k, const TokenPos<I>& q) {
  return q.idx >= k.first && q.idx <= k.hi &&
         (k.first < static_cast<I>(m.text_len) ||
          conv_pos_allowed<I>(q.r - k.pos.r, q.c - k.pos.c, static_cast<I>(m.image_size),
                              static_cast<I>(m.kernel_size / 2)));
}

#ifndef __CUDACC_RTC__  // the host's part: key intervals, block layouts, validation

// A half-open key range [lo, hi).
struct KeyInterval {
  int64_t lo, hi;
};

// Upper bound on the number of disjoint intervals key_intervals() writes for this spec.
inline int64_t max_key_intervals(const MaskSpec& m) {
  return m.kind == MaskKind::kConv ? m.kernel_size / 2 + 2 : 2;
}

// The keys query i may attend to, as sorted disjoint intervals written to out (capacity
// max_key_intervals). Returns the count. Never empty: every query sees itself.
int64_t key_intervals(const MaskSpec& m, int64_t i, KeyInterval* out);

// Block-sparse layout at one block size (same for queries and keys). Entries are CSR rows sorted by
// block index; a "full" entry needs no masking inside, a partial one is masked element-wise.
struct BlockLayout {
  int64_t block = 0;
  int64_t seq_len = 0;
  int64_t num_blocks = 0;
  // Query-major: key blocks visited by query block qb are q_kblock[q_ptr[qb] .. q_ptr[qb + 1]).
  std::vector<int32_t> q_ptr, q_kblock;
  std::vector<uint8_t> q_full;
  // Key-major (the transpose): query blocks that read key block kb, for key-parallel backward passes.
  std::vector<int32_t> k_ptr, k_qblock;
  std::vector<uint8_t> k_full;
  // Allowed (query, key) pairs: the work the mask asks for, before block rounding.
  int64_t allowed_pairs = 0;
};

// Builds the layout in O(seq_len * intervals + blocks) time and memory, never O(seq_len^2).
BlockLayout build_block_layout(const MaskSpec& m, int64_t block);

// Cached build_block_layout, keyed by (kind, text_len, image_size, kernel_size, block). Thread-safe.
std::shared_ptr<const BlockLayout> get_block_layout(const MaskSpec& m, int64_t block);

// Returns an empty string when the spec is valid, else a message naming the bad argument.
std::string validate_mask_spec(const MaskSpec& m);

// The spec the kernels and layout caches use for a valid one: a conv window wider than the grid sees what
// one of width 2 image_size + 1 sees (every earlier image token), so kernel_size is clamped to that,
// which bounds the key intervals and keeps the kernels' 32-bit window radius exact.
inline MaskSpec normalize_mask_spec(MaskSpec m) {
  if (m.kind == MaskKind::kConv && m.kernel_size > 2 * m.image_size + 1) m.kernel_size = 2 * m.image_size + 1;
  return m;
}

#endif  // __CUDACC_RTC__

}  // namespace dalle_fast
