// Philox4x32-10, the counter-based random generator of Salmon et al.,
// "Parallel random numbers: as easy as 1, 2, 3" (SC 2011): four 32-bit words
// from a 128-bit counter and a 64-bit key, ten rounds of multiply-xor.
// The same words for the same (counter, key) on every machine, so any element
// of a dropout mask can be made on its own, in any order, on the CPU or on
// a GPU thread (kernel_api.h says which counter each element uses).
//
// Plain C++ with no dependencies; usable in CUDA device code too.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NANOBLOCK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NANOBLOCK_HOST_DEVICE inline
#endif

namespace nanoblock {

struct Philox4 {
  uint32_t w[4];
};

namespace philox_detail {

constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key increments

// One round: two 32x32 -> 64-bit products, their halves xor-ed with the
// other counter words and the key.
NANOBLOCK_HOST_DEVICE Philox4 round(Philox4 c, uint32_t k0, uint32_t k1) {
  const uint64_t p0 = uint64_t(kMul0) * c.w[0];
  const uint64_t p1 = uint64_t(kMul1) * c.w[2];
  return Philox4{{uint32_t(p1 >> 32) ^ c.w[1] ^ k0, uint32_t(p1),
                  uint32_t(p0 >> 32) ^ c.w[3] ^ k1, uint32_t(p0)}};
}

}  // namespace philox_detail

// Philox4x32-10 of counter (c0..c3) under key (k0, k1).
NANOBLOCK_HOST_DEVICE Philox4 philox4x32_10(Philox4 counter, uint32_t k0, uint32_t k1) {
  using namespace philox_detail;
  for (int r = 0; r < 9; ++r) {
    counter = round(counter, k0, k1);
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return round(counter, k0, k1);
}

// The dropout mask of kernel_api.h: element `index` of dropout `which` under
// rng = (seed, offset) is kept when
//   philox4x32_10(counter = (lo(index / 4), hi(index / 4), lo(offset + which),
//                            hi(offset + which)),
//                 key = (lo(seed), hi(seed))).w[index % 4] >= threshold,
// threshold = floor(p * 2^32); kept elements are scaled by 1 / (1 - p).
// An integer comparison, so CPU and GPU keep exactly the same elements.
struct DropoutBits {
  uint32_t k0, k1;      // the seed
  uint64_t stream;      // offset + which
  uint32_t threshold;   // floor(p * 2^32)

  NANOBLOCK_HOST_DEVICE DropoutBits(uint64_t seed, uint64_t offset, uint64_t which, double p)
      : k0(uint32_t(seed)), k1(uint32_t(seed >> 32)), stream(offset + which),
        threshold(uint32_t(p * 4294967296.0)) {}

  // The four words of the group of elements 4 * group .. 4 * group + 3.
  NANOBLOCK_HOST_DEVICE Philox4 group(uint64_t group) const {
    return philox4x32_10(Philox4{{uint32_t(group), uint32_t(group >> 32), uint32_t(stream),
                                  uint32_t(stream >> 32)}},
                         k0, k1);
  }

  NANOBLOCK_HOST_DEVICE bool keep(uint32_t word) const { return word >= threshold; }
};

}  // namespace nanoblock
