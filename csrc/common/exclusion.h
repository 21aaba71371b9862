// "Is pair (row i, key j) excluded": the one definition of the exclusion rule in C++, shared by
// the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda); docs/design.md, The primitive.
//
// Row i leaves key j out of its log-sum-exp when
//   1. j is in row i's list: lists[i, e] == j + key_offset for some e < E (-1 = none), or
//   2. the label rule is on (row_labels != nullptr) and
//        row_labels[i] == key_labels[j]  and  positive[i] != j + key_offset
//      (every key sharing the row's label, except the row's designated positive; -1 = none), or
//   3. the threshold rule is on (threshold != nullptr; false-negative filtering) and
//        L_ij > threshold[i]  and  positive[i] != j + key_offset
//      with L_ij = s <q_i, k_j> the pair's logit as the kernel computed it (so this clause is
//      tested where the logit exists: dropped() / threshold_dropped(), not excluded()); +inf
//      drops nothing. A row's dropped count is the number of keys clause 3 removes among those
//      clauses 1 and 2 keep.
// key_offset numbers the keys in the lists and positives: 0 for the rows of a log-sum-exp
// against k; row_offset for the key side of the paired backward, whose rows are the keys k and
// whose keys are the rows of q, numbered in a gathered batch (csrc/ops.cpp, _lse_bwd_paired).
// Labels are always looked up by local index.
//
// Torch-free and usable from host C++ and CUDA device code (INFONCE_HD below). The CUDA kernels
// test the rule on tiles, with indices local to the tile: tile_index() turns a list entry or a
// positive into a tile-local index and label_excluded() is clause 2 on local indices; for a key
// j in the tile [base, base + size) the two forms agree:
//   excluded(i, j) == (local j in {tile_index(lists[i, e] - key_offset, base, size)})
//                     || label_excluded(row_labels[i], key_labels[j], j - base,
//                                       tile_index(positive[i] - key_offset, base, size)).
// and clause 3 is threshold_dropped(L_ij, threshold[i], j - base, the same local positive).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define INFONCE_HD __host__ __device__ __forceinline__
#else
#define INFONCE_HD inline
#endif

namespace infonce_kernels {

// Index `e` relative to a tile [base, base + size): its local index, or -1 when outside.
// -1 ("none") is always outside since base >= 0.
INFONCE_HD int tile_index(int64_t e, int64_t base, int size) {
  return (e >= base && e < base + size) ? static_cast<int>(e - base) : -1;
}

// Clause 2 on tile-local indices: the row's label, the key's label, the key's local index `lk`
// and the row's positive as a local index `lp` of the same tile (-1 = none or outside the tile,
// never equal to a local index).
INFONCE_HD bool label_excluded(int64_t row_label, int64_t key_label, int lk, int lp) {
  return row_label == key_label && lk != lp;
}

// Clause 3 on tile-local indices: the pair's logit, the row's threshold, the key's local index
// and the row's positive as a local index of the same tile (-1 = none or outside).
template <typename T>
INFONCE_HD bool threshold_dropped(T logit, T threshold, int lk, int lp) {
  return logit > threshold && lk != lp;
}

// One side's rule, as raw pointers (host or device memory, read where the code runs).
struct ExclusionRule {
  const int64_t* lists = nullptr;       // (rows, E) row-major, -1 = none; nullptr when E == 0
  int64_t E = 0;                        // 0, 1 or 2
  const int64_t* row_labels = nullptr;  // (rows,); nullptr when the label rule is off
  const int64_t* key_labels = nullptr;  // (keys,)
  const int64_t* positive = nullptr;    // (rows,), -1 = none; set with the label or threshold rule
  const void* threshold = nullptr;      // (rows,) of the accumulation type; nullptr when the rule is off
  int64_t key_offset = 0;

  INFONCE_HD bool labelled() const { return row_labels != nullptr; }
  INFONCE_HD bool thresholded() const { return threshold != nullptr; }

  // Clause 1: key (local index) is in row's list.
  INFONCE_HD bool listed(int64_t row, int64_t key) const {
    for (int64_t e = 0; e < E; ++e) {
      if (lists[row * E + e] == key + key_offset) return true;
    }
    return false;
  }

  // Clause 2 (only with the label rule on).
  INFONCE_HD bool by_label(int64_t row, int64_t key) const {
    return row_labels[row] == key_labels[key] && positive[row] != key + key_offset;
  }

  // Clauses 1 and 2 (the pair's logit is not needed).
  INFONCE_HD bool excluded(int64_t row, int64_t key) const {
    return listed(row, key) || (labelled() && by_label(row, key));
  }

  // Clause 3 (only with the threshold rule on), T the accumulation type of `logit`.
  template <typename T>
  INFONCE_HD bool dropped(int64_t row, int64_t key, T logit) const {
    return logit > static_cast<const T*>(threshold)[row] && positive[row] != key + key_offset;
  }
};

}  // namespace infonce_kernels
