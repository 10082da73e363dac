// Dropout masks on the CPU, element by element from Philox (the contract is
// in kernel_api.h): nothing is stored, a backward makes its forward's mask
// again from the same rng.
#pragma once

#include "../kernels.h"
#include "../philox.h"

namespace nanoblock::cpu {

class DropoutMask {
 public:
  explicit DropoutMask(const Dropout& d)
      : bits_(uint64_t(d.rng.const_data_ptr<int64_t>()[0]),
              uint64_t(d.rng.const_data_ptr<int64_t>()[1]), uint64_t(d.which), d.p),
        scale_(1.0 / (1.0 - d.p)) {}

  // Calls f(i, z) for i < n with z the multiplier (0 or 1 / (1 - p)) of
  // element first_index + i; one Philox call per four elements.
  template <typename scalar_t, typename F>
  void for_each(int64_t n, uint64_t first_index, F f) const {
    const scalar_t scale = static_cast<scalar_t>(scale_);
    int64_t i = 0;
    while (i < n) {
      const uint64_t index = first_index + uint64_t(i);
      const Philox4 words = bits_.group(index / 4);
      for (uint64_t lane = index % 4; lane < 4 && i < n; ++lane, ++i) {
        f(i, bits_.keep(words.w[lane]) ? scale : scalar_t(0));
      }
    }
  }

  // data[i] *= its multiplier, for i < n (x * 0 keeps a NaN, as PyTorch's
  // dropout does).
  template <typename scalar_t>
  void apply(scalar_t* data, int64_t n, uint64_t first_index) const {
    for_each<scalar_t>(n, first_index, [&](int64_t i, scalar_t z) { data[i] *= z; });
  }

 private:
  DropoutBits bits_;
  double scale_;
};

}  // namespace nanoblock::cpu
