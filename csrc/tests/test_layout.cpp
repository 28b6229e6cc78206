// ctest for csrc/layout.cpp: the element predicate, the key intervals and the block layouts checked
// against brute-force definitions written straight from the paper. No torch needed.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../layout.h"

using namespace dalle_fast;

static int failures = 0;
#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      ++failures;                                           \
      std::fprintf(stderr, "%s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                    \
      std::fprintf(stderr, "\n");                           \
      if (failures > 20) std::exit(1);                      \
    }                                                       \
  } while (0)

// The paper's definitions, written independently of layout.cpp. Column is in RASTER order here.
static bool brute(MaskKind kind, int64_t T, int64_t W, int64_t ks, int64_t i, int64_t j) {
  if (j > i) return false;
  if (i < T || j < T) return true;
  const int64_t p = i - T, q = j - T;
  const int64_t pr = p / W, pc = p % W, qr = q / W, qc = q % W;
  switch (kind) {
    case MaskKind::kCausal:
      return true;
    case MaskKind::kRow:
      return p - q <= W;
    case MaskKind::kColumn:
      return qc == pc && qr <= pr;
    case MaskKind::kConv: {
      const int64_t s = ks / 2;
      for (int64_t dr = 0; dr <= s; ++dr)
        for (int64_t dc = -s; dc <= s; ++dc)
          if (dr * W + dc >= 0 && p - (dr * W + dc) == q) return true;
      return false;
    }
  }
  return false;
}

// Raster image index <-> index on transposed image states (its own inverse).
static int64_t transpose_index(int64_t T, int64_t W, int64_t i) {
  if (i < T) return i;
  const int64_t p = i - T;
  return T + (p % W) * W + p / W;
}

static void check_predicate_and_intervals(MaskKind kind, int64_t T, int64_t W, int64_t ks) {
  const MaskSpec m{kind, T, W, ks};
  const int64_t N = m.seq_len();
  std::vector<KeyInterval> iv(max_key_intervals(m));
  for (int64_t i = 0; i < N; ++i) {
    const int64_t n = key_intervals(m, i, iv.data());
    EXPECT(n >= 1 && n <= max_key_intervals(m), "interval count %lld", (long long)n);
    for (int64_t t = 1; t < n; ++t) EXPECT(iv[t - 1].hi < iv[t].lo, "intervals not disjoint/sorted");
    for (int64_t j = 0; j < N; ++j) {
      bool in = false;
      for (int64_t t = 0; t < n; ++t) in |= iv[t].lo <= j && j < iv[t].hi;
      // The kernels' column kind lives on transposed states; transposing a square grid is an
      // involution, so map both indices back to raster order for the brute force.
      const bool want = kind == MaskKind::kColumn
                            ? brute(kind, T, W, ks, transpose_index(T, W, i), transpose_index(T, W, j))
                            : brute(kind, T, W, ks, i, j);
      EXPECT(mask_allows(m, i, j) == want, "%s T=%lld W=%lld i=%lld j=%lld predicate", mask_kind_name(kind),
             (long long)T, (long long)W, (long long)i, (long long)j);
      EXPECT(in == want, "%s T=%lld W=%lld i=%lld j=%lld intervals", mask_kind_name(kind), (long long)T,
             (long long)W, (long long)i, (long long)j);
    }
  }
}

// The split forms the GPU kernels evaluate in partial tiles (query rows, key rows) equal mask_allows on
// every pair, padding included (tiles run past seq_len), in the kernels' 32-bit arithmetic.
static void check_split_forms(MaskKind kind, int T, int W, int ks) {
  const MaskSpec m{kind, T, W, ks};
  const int N = static_cast<int>(m.seq_len()), padded = N + 64;  // a 64-wide tile reaches N + 63
  const bool conv = kind == MaskKind::kConv;
  for (int i = 0; i < padded; ++i) {
    const QueryRow<int> qr = query_row<int>(m, i, N);
    const TokenPos<int> qpos = token_pos<int>(m, i);
    for (int j = 0; j < padded; ++j) {
      const bool want = i < N && j < N && mask_allows(m, i, j);
      const KeyRow<int> kr = key_row<int>(m, j, N);
      const bool by_query = conv ? query_row_sees_conv<int>(m, qr, token_pos<int>(m, j)) : query_row_sees<int>(m, qr, j);
      const bool by_key = conv ? key_row_seen_by_conv<int>(m, kr, qpos) : key_row_seen_by<int>(kr, i);
      EXPECT(by_query == want && by_key == want, "%s T=%d W=%d ks=%d i=%d j=%d: query form %d, key form %d, want %d",
             mask_kind_name(kind), T, W, ks, i, j, by_query, by_key, want);
    }
  }
}

static void check_layout(MaskKind kind, int64_t T, int64_t W, int64_t ks, int64_t block) {
  const MaskSpec m{kind, T, W, ks};
  const BlockLayout L = build_block_layout(m, block);
  const int64_t N = m.seq_len();
  EXPECT(L.num_blocks == (N + block - 1) / block, "num_blocks");
  int64_t pairs = 0;
  std::vector<int> state(L.num_blocks * L.num_blocks, 0);  // 0 skipped, 1 partial, 2 full
  for (int64_t qb = 0; qb < L.num_blocks; ++qb)
    for (int32_t e = L.q_ptr[qb]; e < L.q_ptr[qb + 1]; ++e) {
      if (e > L.q_ptr[qb]) EXPECT(L.q_kblock[e - 1] < L.q_kblock[e], "unsorted row");
      state[qb * L.num_blocks + L.q_kblock[e]] = L.q_full[e] ? 2 : 1;
    }
  for (int64_t qb = 0; qb < L.num_blocks; ++qb) {
    for (int64_t kb = 0; kb < L.num_blocks; ++kb) {
      int64_t any = 0, all = 1;
      for (int64_t i = qb * block; i < std::min(N, (qb + 1) * block); ++i)
        for (int64_t j = kb * block; j < std::min(N, (kb + 1) * block); ++j) {
          const bool a = mask_allows(m, i, j);
          any += a;
          all &= a;
        }
      pairs += any;
      const int want = any == 0 ? 0 : (all ? 2 : 1);
      EXPECT(state[qb * L.num_blocks + kb] == want, "%s T=%lld W=%lld block=%lld (%lld,%lld): got %d want %d",
             mask_kind_name(kind), (long long)T, (long long)W, (long long)block, (long long)qb, (long long)kb,
             state[qb * L.num_blocks + kb], want);
    }
  }
  EXPECT(pairs == L.allowed_pairs, "allowed_pairs %lld vs %lld", (long long)L.allowed_pairs, (long long)pairs);
  // The key-major CSR is the exact transpose of the query-major one.
  for (int64_t kb = 0; kb < L.num_blocks; ++kb)
    for (int32_t e = L.k_ptr[kb]; e < L.k_ptr[kb + 1]; ++e) {
      const int want = L.k_full[e] ? 2 : 1;
      EXPECT(state[L.k_qblock[e] * L.num_blocks + kb] == want, "key-major entry (%d,%lld)", L.k_qblock[e],
             (long long)kb);
    }
  EXPECT(L.k_qblock.size() == L.q_kblock.size(), "transpose size");
}

int main() {
  const MaskKind kinds[] = {MaskKind::kCausal, MaskKind::kRow, MaskKind::kColumn, MaskKind::kConv};
  // The paper's Figure 11 setting (6 text + 4x4 image) and odd sizes around it.
  for (MaskKind k : kinds) {
    for (int64_t T : {0, 1, 6, 7}) {
      for (int64_t W : {1, 3, 4, 5, 11, 12}) {  // 11, 12: the conv windows of ks = 11 touch, then part
        for (int64_t ks : {1, 3, 11}) {
          if (k != MaskKind::kConv && ks != 11) continue;
          check_predicate_and_intervals(k, T, W, ks);
          check_split_forms(k, static_cast<int>(T), static_cast<int>(W), static_cast<int>(ks));
          for (int64_t block : {1, 3, 4, 16}) check_layout(k, T, W, ks, block);
        }
      }
    }
  }
  // Pair counts at 256 text + 32x32 image (N = 1280), as stated in the paper digest.
  const int64_t expected[] = {819840, 328304, 311936, 352209};
  for (int t = 0; t < 4; ++t) {
    const BlockLayout L = build_block_layout(MaskSpec{kinds[t], 256, 32, 11}, 64);
    EXPECT(L.allowed_pairs == expected[t], "%s pairs %lld, want %lld", mask_kind_name(kinds[t]),
           (long long)L.allowed_pairs, (long long)expected[t]);
    check_layout(kinds[t], 37, 9, 11, 32);
    for (int ks : {3, 5, 11, 13}) check_split_forms(kinds[t], 37, 13, ks);
  }
  // 6 text + 4x4, row mask: the image query at grid (1, 1) sees all 6 text tokens and image 0..5.
  {
    const MaskSpec m{MaskKind::kRow, 6, 4, 11};
    const int64_t i = 6 + 5;
    int64_t seen = 0;
    for (int64_t j = 0; j < m.seq_len(); ++j) seen += mask_allows(m, i, j);
    EXPECT(seen == 6 + 5, "row example sees %lld", (long long)seen);
  }
  // The cache returns the same object for the same key and ignores kernel_size for non-conv kinds.
  {
    auto a = get_block_layout(MaskSpec{MaskKind::kRow, 6, 4, 11}, 4);
    auto b = get_block_layout(MaskSpec{MaskKind::kRow, 6, 4, 3}, 4);
    auto c = get_block_layout(MaskSpec{MaskKind::kConv, 6, 4, 3}, 4);
    auto d = get_block_layout(MaskSpec{MaskKind::kConv, 6, 4, 5}, 4);
    EXPECT(a.get() == b.get(), "cache miss for equal row layouts");
    EXPECT(c.get() != d.get(), "conv layouts with different kernels share a cache entry");
  }
  EXPECT(validate_mask_spec(MaskSpec{MaskKind::kConv, 6, 4, 4}).find("kernel_size") != std::string::npos,
         "even kernel accepted");
  EXPECT(validate_mask_spec(MaskSpec{MaskKind::kRow, -1, 4, 11}).find("text_len") != std::string::npos,
         "negative text_len accepted");
  EXPECT(validate_mask_spec(MaskSpec{MaskKind::kRow, 3, 0, 11}).find("image_size") != std::string::npos,
         "empty image accepted");
  EXPECT(validate_mask_spec(MaskSpec{MaskKind::kRow, 3, kMaxImageSize + 1, 11}).find("image_size") !=
             std::string::npos,
         "an image side whose square overflows 32 bits accepted");
  EXPECT(validate_mask_spec(MaskSpec{MaskKind::kRow, 3, kMaxImageSize, 11}).empty(), "the largest image refused");
  if (failures) {
    std::fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  std::printf("layout tests passed\n");
  return 0;
}
