// Deterministic reductions over rows on the CPU.
//
// Parameter gradients (LayerNorm weight/bias, Linear bias) are sums over all
// N = B * T rows. Splitting the rows by thread would make the sum's order, and
// so its rounding, depend on the thread count. Instead the rows are cut into a
// number of blocks that depends only on N; each block writes its own partial
// sum and the partials are added in block order. Same inputs, same bits, on
// any number of threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace nanoblock::cpu {

struct RowBlocks {
  int64_t count;     // number of blocks
  int64_t rows_per;  // rows in each block (the last may have fewer)

  explicit RowBlocks(int64_t rows) {
    // At least 16 rows a block to amortize the partial sums; at most 64 blocks
    // so the partials stay small next to the data.
    count = std::min<int64_t>(std::max<int64_t>((rows + 15) / 16, 1), 64);
    rows_per = std::max<int64_t>((rows + count - 1) / count, 1);
  }
  int64_t begin(int64_t block, int64_t rows) const { return std::min(block * rows_per, rows); }
  int64_t end(int64_t block, int64_t rows) const { return std::min((block + 1) * rows_per, rows); }
};

// Adds partials [blocks, C] (acc_t) in block order into out [C] (scalar_t).
template <typename scalar_t, typename acc_t>
void sum_partials(const acc_t* partials, int64_t blocks, int64_t C, scalar_t* out) {
  for (int64_t c = 0; c < C; c++) {
    acc_t total = 0;
    for (int64_t b = 0; b < blocks; b++) total += partials[b * C + c];
    out[c] = static_cast<scalar_t>(total);
  }
}

}  // namespace nanoblock::cpu
