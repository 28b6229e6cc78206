// Block layouts for the DALL-E masks: which key blocks each query block visits, and which of those
// need element-wise masking. Plain C++, shared by every backend and by the ctest.
#include "layout.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <stdexcept>
#include <tuple>

namespace dalle_fast {

bool parse_mask_kind(const std::string& name, MaskKind* kind) {
  if (name == "causal") {
    *kind = MaskKind::kCausal;
  } else if (name == "row") {
    *kind = MaskKind::kRow;
  } else if (name == "column") {
    *kind = MaskKind::kColumn;
  } else if (name == "conv") {
    *kind = MaskKind::kConv;
  } else {
    return false;
  }
  return true;
}

const char* mask_kind_name(MaskKind kind) {
  switch (kind) {
    case MaskKind::kCausal:
      return "causal";
    case MaskKind::kRow:
      return "row";
    case MaskKind::kColumn:
      return "column";
    case MaskKind::kConv:
      return "conv";
  }
  return "?";
}

std::string validate_mask_spec(const MaskSpec& m) {
  if (m.text_len < 0) return "text_len must be >= 0, got " + std::to_string(m.text_len);
  if (m.image_size < 1 || m.image_size > kMaxImageSize)
    return "image_size must be in [1, " + std::to_string(kMaxImageSize) + "], got " + std::to_string(m.image_size);
  if (m.kernel_size < 1 || m.kernel_size % 2 == 0)
    return "kernel_size must be a positive odd number, got " + std::to_string(m.kernel_size);
  return "";
}

int64_t key_intervals(const MaskSpec& m, int64_t i, KeyInterval* out) {
  const int64_t T = m.text_len;
  if (i < T) {  // text query: causal over text
    out[0] = {0, i + 1};
    return 1;
  }
  const int64_t p = i - T, W = m.image_size;
  // Image keys as image-relative ranges, ascending; shifted by T and merged with [0, T) below.
  int64_t n = 0;
  auto push = [&](int64_t lo, int64_t hi) {  // image-relative [lo, hi), clipped to [0, p]
    lo = std::max<int64_t>(lo, 0);
    hi = std::min<int64_t>(hi, p + 1);
    if (lo >= hi) return;
    lo += T;
    hi += T;
    if (n > 0 && lo <= out[n - 1].hi) {
      out[n - 1].hi = std::max(out[n - 1].hi, hi);
    } else {
      out[n++] = {lo, hi};
    }
  };
  if (T > 0) out[n++] = {0, T};
  switch (m.kind) {
    case MaskKind::kCausal:
      push(0, p + 1);
      break;
    case MaskKind::kRow:
      push(p - W, p + 1);
      break;
    case MaskKind::kColumn:
      push(p - p % W, p + 1);
      break;
    case MaskKind::kConv: {
      const int64_t s = m.kernel_size / 2;
      for (int64_t dr = s; dr >= 0; --dr) push(p - dr * W - s, p - dr * W + s + 1);
      break;
    }
  }
  return n;
}

BlockLayout build_block_layout(const MaskSpec& m, int64_t block) {
  BlockLayout L;
  L.block = block;
  L.seq_len = m.seq_len();
  L.num_blocks = (L.seq_len + block - 1) / block;
  const int64_t nb = L.num_blocks;

  std::vector<KeyInterval> iv(max_key_intervals(m));
  std::vector<int64_t> covered(nb);  // allowed pairs per key block, for the current query block
  std::vector<std::vector<std::pair<int32_t, uint8_t>>> by_key(nb);
  L.q_ptr.push_back(0);
  for (int64_t qb = 0; qb < nb; ++qb) {
    const int64_t q0 = qb * block, q1 = std::min(q0 + block, L.seq_len);
    std::fill(covered.begin(), covered.end(), 0);
    for (int64_t i = q0; i < q1; ++i) {
      const int64_t n = key_intervals(m, i, iv.data());
      for (int64_t t = 0; t < n; ++t) {
        for (int64_t kb = iv[t].lo / block; kb * block < iv[t].hi; ++kb) {
          const int64_t lo = std::max(iv[t].lo, kb * block);
          const int64_t hi = std::min(iv[t].hi, (kb + 1) * block);
          covered[kb] += hi - lo;
        }
      }
    }
    for (int64_t kb = 0; kb < nb; ++kb) {
      if (covered[kb] == 0) continue;
      const int64_t width = std::min((kb + 1) * block, L.seq_len) - kb * block;
      const uint8_t full = covered[kb] == (q1 - q0) * width;
      L.q_kblock.push_back(static_cast<int32_t>(kb));
      L.q_full.push_back(full);
      by_key[kb].push_back({static_cast<int32_t>(qb), full});
      L.allowed_pairs += covered[kb];
    }
    if (L.q_kblock.size() > static_cast<size_t>(INT32_MAX))  // offsets are 32-bit in the kernels
      throw std::length_error("dalle_fast: the block layout of this mask has more than 2^31 - 1 entries; the "
                              "sequence is too long for the attention kernels");
    L.q_ptr.push_back(static_cast<int32_t>(L.q_kblock.size()));
  }
  L.k_ptr.push_back(0);
  for (int64_t kb = 0; kb < nb; ++kb) {
    for (const auto& e : by_key[kb]) {
      L.k_qblock.push_back(e.first);
      L.k_full.push_back(e.second);
    }
    L.k_ptr.push_back(static_cast<int32_t>(L.k_qblock.size()));
  }
  return L;
}

std::shared_ptr<const BlockLayout> get_block_layout(const MaskSpec& m, int64_t block) {
  using Key = std::tuple<int32_t, int64_t, int64_t, int64_t, int64_t>;
  static std::mutex mutex;
  static std::map<Key, std::shared_ptr<const BlockLayout>> cache;
  // kernel_size only shapes the conv mask; keep one entry for the other kinds.
  const int64_t ks = m.kind == MaskKind::kConv ? m.kernel_size : 0;
  const Key key{static_cast<int32_t>(m.kind), m.text_len, m.image_size, ks, block};
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto built = std::make_shared<const BlockLayout>(build_block_layout(m, block));
  std::lock_guard<std::mutex> lock(mutex);
  return cache.emplace(key, std::move(built)).first->second;
}

}  // namespace dalle_fast
