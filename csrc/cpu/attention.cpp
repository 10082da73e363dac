// Causal self-attention on the CPU, FlashAttention-2 style.
//
// Input is c_attn's output qkv [B, T, 3C]: q = qkv[..., 0:C],
// k = qkv[..., C:2C], v = qkv[..., 2C:3C], each holding n_head heads of
// hd = C / n_head columns (head h in columns h*hd .. (h+1)*hd).
//
// Forward, per (batch, head):
//   S = q k^T * scale (scale = 1/sqrt(hd)), causal (key j <= query i),
//   P = softmax(S) over keys, out = P v  -> out [B, T, C] (heads merged),
//   lse = logsumexp of each row of S      -> lse [B, n_head, T].
// Backward, from the saved out and lse only (P is recomputed):
//   P = exp(S - lse), D_i = rowsum(dO_i * O_i), dS = P * (dP - D),
//   dv = P^T dO, dP = dO v^T, dq = dS k * scale, dk = dS^T q * scale
//   -> grad_qkv [B, T, 3C] (dq, dk, dv in place of q, k, v).
// Dropout of the probabilities (kernel_api.h), Z the scaled mask: the forward
// takes row sums and lse of P, then out = (P o Z) v; the backward makes Z
// again, dv = (P o Z)^T dO and dS = P * (Z o dP - D), D unchanged.
//
// Two paths, picked by T alone (so the forward and backward of a call take
// the same one):
// - Tiled (T > kShortSequenceMax): queries and keys are cut into blocks; no
//   T x T tensor ever exists. The block products go through ATen's GEMM
//   (at::mm_out / at::addmm_out) on from_blob views of the strided head
//   columns, so nothing is copied; small products run as plain loops
//   (tile_matmul).
// - Short (T <= kShortSequenceMax, the second half of this file): a task
//   takes a whole head, its scores [T, T] in scratch, and every product runs
//   through one register-blocked tile on raw pointers (product_tile), where
//   the tiled path's per-product overhead (views, GEMM calls) would dominate.
// A NaN or Inf at one position reaches no earlier position's output and no
// later position's gradient: masked probabilities and score gradients are
// exactly 0; the short path's products visit only the visible pairs, and
// where a tiled block's masked 0 would meet a non-finite value on the
// diagonal, the block runs as loops that skip masked pairs (causal_matmul).
// The elementwise work (mask, rescale, row sums) is plain loops over
// contiguous rows, with the exp from vector_math.h (vectorized) for float32
// and libm's for float64, all in the input's precision. lse has the input's
// dtype: for float32 and float64, the two dtypes dispatched here, that is
// stats_dtype. bfloat16 runs as float32 (bfloat16.h) and keeps a float32 lse.
// Every entry is summed in an order fixed by the shape (one task per head,
// or per query block), so one or two threads give the same bits.

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>

#include "../kernels.h"
#include "bfloat16.h"
#include "dropout.h"
#include "vector_math.h"

namespace nanoblock::cpu {
namespace {

// Block sizes, chosen by measurement on a 2-core machine (B=8, T=256,
// C=384, 6 heads, hd=64; 64x64 blocks everywhere were about 1.1x slower).
// Every GEMM call costs a few microseconds of overhead, so the loops keep
// one dimension long: the forward pass takes a short query block against
// long key blocks (cut off at the block's last query, so only a
// triangle of kForwardQueryBlock is wasted on the diagonal); the backward
// pass takes a short key block against long query blocks (starting at the
// block's first key, so again only a small triangle is wasted).
constexpr int64_t kForwardQueryBlock = 64;
constexpr int64_t kForwardKeyBlock = 256;
constexpr int64_t kBackwardQueryBlock = 256;
constexpr int64_t kBackwardKeyBlock = 64;

// A [rows, cols] matrix view of memory whose rows are row_stride apart
// (e.g. one head's columns inside qkv [B, T, 3C] have row_stride 3C).
template <typename scalar_t>
Tensor matrix_view(const scalar_t* data, int64_t rows, int64_t cols,
                   int64_t row_stride, const at::TensorOptions& options) {
  return at::from_blob(const_cast<scalar_t*>(data), {rows, cols},
                       {row_stride, 1}, options);
}

// The product of two tiles: out [m, n] = a [m, k] @ b [k, n], or out += it
// when accumulate. a, b and out are strided views (b often a transposed one).
// Big products go to ATen's GEMM; small ones (a ragged last block, small heads)
// run as plain loops, because each GEMM call costs a few microseconds, more
// than a product of fewer than kSmallProduct multiply-adds takes.
constexpr int64_t kSmallProduct = 32 * 32 * 32;

// The loops, on raw pointers: a[i][p] at a + i * a_row + p * a_col, out's
// rows contiguous. b_row_major: b's rows are contiguous (b[p][j] at
// b + p * b_stride + j), so the inner loop runs along them; otherwise b is a
// transposed view (b[p][j] at b + j * b_stride + p), a's rows must be
// contiguous (a_col == 1), and each entry is a dot product.
template <typename T>
NANOBLOCK_INLINE void small_matmul(const T* a, int64_t a_row, int64_t a_col, const T* b,
                                   int64_t b_stride, bool b_row_major, T* out,
                                   int64_t out_stride, int64_t m, int64_t n, int64_t k,
                                   bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    const T* a_i = a + i * a_row;
    T* o = out + i * out_stride;
    if (b_row_major) {
      if (!accumulate) std::fill(o, o + n, T(0));
      for (int64_t p = 0; p < k; ++p) {
        const T* b_row = b + p * b_stride;
        const T f = a_i[p * a_col];
        for (int64_t j = 0; j < n; ++j) o[j] += f * b_row[j];
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const T* b_col = b + j * b_stride;
        const T dot = lane_sum<T>(k, [&](int64_t p) { return a_i[p] * b_col[p]; });
        o[j] = accumulate ? o[j] + dot : dot;
      }
    }
  }
}

NANOBLOCK_VECTORIZE void small_matmul(const float* a, int64_t a_row, int64_t a_col,
                                      const float* b, int64_t b_stride, bool b_row_major,
                                      float* out, int64_t out_stride, int64_t m, int64_t n,
                                      int64_t k, bool accumulate) {
  small_matmul<float>(a, a_row, a_col, b, b_stride, b_row_major, out, out_stride, m, n, k,
                      accumulate);
}

void small_matmul(const double* a, int64_t a_row, int64_t a_col, const double* b,
                  int64_t b_stride, bool b_row_major, double* out, int64_t out_stride, int64_t m,
                  int64_t n, int64_t k, bool accumulate) {
  small_matmul<double>(a, a_row, a_col, b, b_stride, b_row_major, out, out_stride, m, n, k,
                       accumulate);
}

// out[i] = a[i] . b[i] for i < rows (rows of k, stride apart), each summed
// exactly as small_matmul sums a dot product: lane_sum, in a function
// vectorized like it, so that its multiply-adds fuse where small_matmul's do.
template <typename T>
NANOBLOCK_INLINE void lane_row_dots(const T* a, const T* b, int64_t stride, int64_t rows,
                                    int64_t k, T* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* a_i = a + i * stride;
    const T* b_i = b + i * stride;
    out[i] = lane_sum<T>(k, [&](int64_t p) { return a_i[p] * b_i[p]; });
  }
}

NANOBLOCK_VECTORIZE void lane_row_dots(const float* a, const float* b, int64_t stride,
                                       int64_t rows, int64_t k, float* out) {
  lane_row_dots<float>(a, b, stride, rows, k, out);
}

void lane_row_dots(const double* a, const double* b, int64_t stride, int64_t rows, int64_t k,
                   double* out) {
  lane_row_dots<double>(a, b, stride, rows, k, out);
}

template <typename scalar_t>
void tile_matmul(Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  // The loops need out's rows contiguous, and b's rows contiguous, or b's
  // columns and a's rows; the attention's views always are.
  const bool b_row_major = b.stride(1) == 1;
  const bool loops_fit =
      out.stride(1) == 1 && (b_row_major || (b.stride(0) == 1 && a.stride(1) == 1));
  if (m * n * k < kSmallProduct && loops_fit) {
    small_matmul(a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(1),
                 b.const_data_ptr<scalar_t>(), b_row_major ? b.stride(0) : b.stride(1),
                 b_row_major, out.mutable_data_ptr<scalar_t>(), out.stride(0), m, n, k,
                 accumulate);
  } else if (accumulate) {
    at::addmm_out(out, out, a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// Number of keys of the block starting at key_start that query `query` may
// see (keys key_start .. query), clamped to [0, cols].
inline int64_t visible_keys(int64_t query, int64_t key_start, int64_t cols) {
  return std::clamp<int64_t>(query - key_start + 1, 0, cols);
}

// The exact causal product (see causal_matmul) as loops on raw pointers: for
// queries i < rows and keys j < cols with j <= diag + i, out[i] += a[i][j] *
// b[j], or with transpose_a out[j] += a[i][j] * b[i]; a's rows contiguous,
// b's and out's rows n long and contiguous.
template <typename T>
NANOBLOCK_INLINE void causal_products(const T* a, int64_t a_stride, const T* b,
                                      int64_t b_stride, T* out, int64_t out_stride, int64_t n,
                                      int64_t rows, int64_t cols, int64_t diag,
                                      bool transpose_a) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t end = std::min(cols, diag + i + 1);
    for (int64_t j = 0; j < end; ++j) {
      const T f = a[i * a_stride + j];
      const T* src = b + (transpose_a ? i : j) * b_stride;
      T* dst = out + (transpose_a ? j : i) * out_stride;
      for (int64_t c = 0; c < n; ++c) dst[c] += f * src[c];
    }
  }
}

NANOBLOCK_VECTORIZE void causal_products(const float* a, int64_t a_stride, const float* b,
                                         int64_t b_stride, float* out, int64_t out_stride,
                                         int64_t n, int64_t rows, int64_t cols, int64_t diag,
                                         bool transpose_a) {
  causal_products<float>(a, a_stride, b, b_stride, out, out_stride, n, rows, cols, diag,
                         transpose_a);
}

void causal_products(const double* a, int64_t a_stride, const double* b, int64_t b_stride,
                     double* out, int64_t out_stride, int64_t n, int64_t rows, int64_t cols,
                     int64_t diag, bool transpose_a) {
  causal_products<double>(a, a_stride, b, b_stride, out, out_stride, n, rows, cols, diag,
                          transpose_a);
}

// Sets rows [rows, n] (row_stride apart) to 0.
template <typename scalar_t>
void zero_rows(scalar_t* data, int64_t rows, int64_t n, int64_t row_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(data + r * row_stride, data + r * row_stride + n, scalar_t(0));
  }
}

// Whether rows first .. last - 1 of a matrix (rows n long and contiguous,
// row_stride apart) are all finite: x * 0 is 0 for finite x, NaN otherwise.
template <typename scalar_t>
bool rows_finite(const scalar_t* data, int64_t row_stride, int64_t first, int64_t last,
                 int64_t n) {
  for (int64_t r = first; r < last; ++r) {
    const scalar_t* row = data + r * row_stride;
    if (lane_sum<scalar_t>(n, [&](int64_t c) { return row[c] * scalar_t(0); }) != 0) {
      return false;
    }
  }
  return true;
}

// A product with a block of probabilities or score gradients a [rows, cols]
// (queries query_start + i, keys key_start + j) over the visible pairs only:
// query i sees key j when j <= diag + i, diag = query_start - key_start.
//   transpose_a false: out [rows, n] (+)= a @ b, b [cols, n]   (P v, dS k)
//   transpose_a true:  out [cols, n] (+)= a^T @ b, b [rows, n] (P^T dO, dS^T q)
// a is exactly 0 where masked, so the product of the whole block is right
// unless a masked 0 meets a NaN or Inf in b (a later key's v or k, an earlier
// query's dO or q): 0 * NaN is NaN, and would carry a non-finite value to
// earlier positions' outputs or later positions' gradients. So the rows of b
// that some masked entry meets are checked first (at most a block's diagonal
// rows); only if one is not finite does the block run as loops over the
// visible pairs, never reading a masked one.
template <typename scalar_t>
void causal_matmul(Tensor& out, const Tensor& a, const Tensor& b, int64_t diag,
                   bool transpose_a, bool accumulate) {
  const int64_t rows = a.size(0), cols = a.size(1), n = b.size(1);
  const scalar_t* b_data = b.const_data_ptr<scalar_t>();
  // Keys that some query does not see, and queries that do not see every key.
  const int64_t first_masked_key = std::clamp<int64_t>(diag + 1, 0, cols);
  const int64_t first_full_query = std::clamp<int64_t>(cols - 1 - diag, 0, rows);
  const bool finite = transpose_a
                          ? rows_finite(b_data, b.stride(0), 0, first_full_query, n)
                          : rows_finite(b_data, b.stride(0), first_masked_key, cols, n);
  if (finite) {
    tile_matmul<scalar_t>(out, transpose_a ? a.t() : a, b, accumulate);
    return;
  }
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  if (!accumulate) zero_rows(out_data, out.size(0), n, out.stride(0));
  causal_products(a.const_data_ptr<scalar_t>(), a.stride(0), b_data, b.stride(0), out_data,
                  out.stride(0), n, rows, cols, diag, transpose_a);
}

// The row max, in kLanes partial maxima (vector_math.h's lane_sum says why).
template <typename scalar_t>
scalar_t max_of(const scalar_t* x, int64_t n) {
  scalar_t lane[kLanes];
  std::fill(lane, lane + kLanes, -std::numeric_limits<scalar_t>::infinity());
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lane[l] = std::max(lane[l], x[i + l]);
    }
  }
  for (; i < n; ++i) {
    lane[0] = std::max(lane[0], x[i]);
  }
  return *std::max_element(lane, lane + kLanes);
}

template <typename scalar_t>
scalar_t sum_of(const scalar_t* x, int64_t n) {
  return lane_sum<scalar_t>(n, [&](int64_t i) { return x[i]; });
}

// Turns one row of raw scores q.k (cols of them, the first `visible`
// unmasked) into exponents score * scale - offset. Masked entries get 0
// for now (no -inf into the exp); exp_and_mask zeroes them after the exp.
template <typename scalar_t>
void scores_to_exponents(scalar_t* row, int64_t visible, int64_t cols,
                         scalar_t scale, scalar_t offset) {
  for (int64_t c = 0; c < visible; ++c) {
    row[c] = row[c] * scale - offset;
  }
  std::fill(row + visible, row + cols, scalar_t(0));
}

// exp of n contiguous values in place: float32 through vector_math.h
// (vectorized, AVX2 where the CPU has it), float64 through libm.
NANOBLOCK_VECTORIZE void exp_in_place(float* data, int64_t n) {
  for (int64_t i = 0; i < n; ++i) data[i] = exp_float(data[i]);
}

void exp_in_place(double* data, int64_t n) {
  for (int64_t i = 0; i < n; ++i) data[i] = std::exp(data[i]);
}

// Exponentiates a block of exponents [rows, cols] (contiguous) in place
// and zeroes its masked entries (key key_start + c above query
// query_start + r), giving probabilities that are 0 above the diagonal.
template <typename scalar_t>
void exp_and_mask(scalar_t* data, int64_t rows, int64_t cols, int64_t query_start,
                  int64_t key_start) {
  exp_in_place(data, rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t visible = visible_keys(query_start + r, key_start, cols);
    std::fill(data + r * cols + visible, data + (r + 1) * cols,
              scalar_t(0));
  }
}

// Multiplies each of the rows [rows, cols] (rows row_stride apart) by its
// factor.
template <typename scalar_t>
void scale_rows(scalar_t* data, int64_t rows, int64_t cols,
                int64_t row_stride, const scalar_t* factor) {
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* row = data + r * row_stride;
    const scalar_t f = factor[r];
    for (int64_t c = 0; c < cols; ++c) {
      row[c] *= f;
    }
  }
}

// Dropout of a block of probabilities [rows, cols] (contiguous; queries
// query_start.., keys key_start.. of head = b * n_head + h): each query's
// visible keys times their mask multipliers; the masked rest is never read.
template <typename scalar_t>
void drop_probabilities(scalar_t* data, int64_t rows, int64_t cols, int64_t head, int64_t T,
                        int64_t query_start, int64_t key_start, const DropoutMask& mask) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t query = query_start + r;
    mask.apply(data + r * cols, visible_keys(query, key_start, cols),
               uint64_t((head * T + query) * T + key_start));
  }
}

// A chunk's scratch: one buffer (kept alive by storage), handed out as
// consecutive pieces of the given sizes in elements.
template <typename scalar_t, size_t N>
std::array<scalar_t*, N> scratch_pieces(Tensor& storage, const at::TensorOptions& options,
                                        const int64_t (&sizes)[N]) {
  storage = at::empty({std::accumulate(sizes, sizes + N, int64_t(0))}, options);
  std::array<scalar_t*, N> pieces;
  scalar_t* next = storage.mutable_data_ptr<scalar_t>();
  for (size_t i = 0; i < N; ++i) {
    pieces[i] = next;
    next += sizes[i];
  }
  return pieces;
}

// mask: null without dropout.
template <typename scalar_t>
void attention_forward_kernel(const Tensor& qkv, int64_t n_head,
                              const Tensor& out, const Tensor& lse,
                              const DropoutMask* mask) {
  constexpr int64_t kQueryBlock = kForwardQueryBlock;
  constexpr int64_t kKeyBlock = kForwardKeyBlock;
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  const int64_t hd = C / n_head;
  const int64_t qkv_stride = 3 * C;  // between rows (positions) of qkv
  const scalar_t scale = scalar_t(1) / std::sqrt(scalar_t(hd));
  const int64_t query_blocks = (T + kQueryBlock - 1) / kQueryBlock;
  const auto options = qkv.options();
  const scalar_t* qkv_data = qkv.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  scalar_t* lse_data = lse.mutable_data_ptr<scalar_t>();

  // One task per (batch, head, query block).
  at::parallel_for(0, B * n_head * query_blocks, 1, [&](int64_t begin,
                                                        int64_t end) {
    // Scratch per chunk: scores / probabilities [kQueryBlock, kKeyBlock],
    // then the running max, running sum and rescale factors, each
    // [kQueryBlock].
    Tensor scratch;
    const auto [scores, row_max, row_sum, rescale] = scratch_pieces<scalar_t>(
        scratch, options, {kQueryBlock * kKeyBlock, kQueryBlock, kQueryBlock, kQueryBlock});

    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (n_head * query_blocks);
      const int64_t h = task / query_blocks % n_head;
      const int64_t query_start = task % query_blocks * kQueryBlock;
      const int64_t rows = std::min(kQueryBlock, T - query_start);
      // This block's queries see keys 0 .. query_end - 1; keys past that
      // (above the diagonal) are never visited.
      const int64_t query_end = query_start + rows;

      const scalar_t* head_rows = qkv_data + b * T * qkv_stride + h * hd;
      Tensor q = matrix_view(head_rows + query_start * qkv_stride, rows, hd,
                             qkv_stride, options);
      scalar_t* out_rows = out_data + (b * T + query_start) * C + h * hd;
      // The output block [rows, hd] doubles as the accumulator.
      Tensor out_block = matrix_view(out_rows, rows, hd, C, options);

      std::fill(row_max, row_max + rows,
                -std::numeric_limits<scalar_t>::infinity());
      std::fill(row_sum, row_sum + rows, scalar_t(0));

      for (int64_t key_start = 0; key_start < query_end;
           key_start += kKeyBlock) {
        const int64_t cols = std::min(kKeyBlock, query_end - key_start);
        const scalar_t* key_rows = head_rows + key_start * qkv_stride;
        Tensor k = matrix_view(key_rows + C, cols, hd, qkv_stride, options);
        Tensor v = matrix_view(key_rows + 2 * C, cols, hd, qkv_stride,
                               options);
        Tensor s = matrix_view(scores, rows, cols, cols, options);

        // Online softmax: scores [rows, cols] = q k^T becomes
        // exp(score * scale - new_max), and the running sums and the
        // output so far are rescaled by exp(old_max - new_max).
        tile_matmul<scalar_t>(s, q, k.t(), false);
        for (int64_t r = 0; r < rows; ++r) {
          scalar_t* row = scores + r * cols;
          const int64_t visible =
              visible_keys(query_start + r, key_start, cols);
          // scale > 0, so max(s) * scale == max(s * scale). Key 0 is
          // visible to every query, so the first block gives a finite max
          // and exp(-inf - new_max) = 0 discards the empty start.
          const scalar_t new_max =
              std::max(row_max[r], max_of(row, visible) * scale);
          scores_to_exponents(row, visible, cols, scale, new_max);
          rescale[r] = std::exp(row_max[r] - new_max);
          row_max[r] = new_max;
        }
        exp_and_mask(scores, rows, cols, query_start, key_start);
        for (int64_t r = 0; r < rows; ++r) {
          row_sum[r] =
              row_sum[r] * rescale[r] + sum_of(scores + r * cols, cols);
        }
        // The sums above are of P; out sums P o Z.
        if (mask) {
          drop_probabilities(scores, rows, cols, b * n_head + h, T, query_start, key_start,
                             *mask);
        }
        // out_block [rows, hd] (+)= P v over the visible keys.
        if (key_start != 0) scale_rows(out_rows, rows, hd, C, rescale);
        causal_matmul<scalar_t>(out_block, s, v, query_start - key_start, false,
                                key_start != 0);
      }

      // Normalize; lse = max + log(sum) per query.
      scalar_t* lse_rows = lse_data + (b * n_head + h) * T + query_start;
      for (int64_t r = 0; r < rows; ++r) {
        rescale[r] = scalar_t(1) / row_sum[r];
        lse_rows[r] = row_max[r] + std::log(row_sum[r]);
      }
      scale_rows(out_rows, rows, hd, C, rescale);
    }
  });
}

// One (batch, head) of the backward, task = b * n_head + h (both paths):
// its first rows of qkv (q; k and v C and 2C further on; rows 3C apart), of
// dO and out (rows C apart) and of grad_qkv (as qkv's), and its lse [T].
template <typename scalar_t>
struct BackwardHead {
  const scalar_t* qkv_rows;
  const scalar_t* grad_out_rows;
  const scalar_t* out_rows;
  const scalar_t* lse_rows;
  scalar_t* grad_qkv_rows;
};

template <typename scalar_t>
BackwardHead<scalar_t> backward_head(const Tensor& grad_out, const Tensor& qkv,
                                     const Tensor& out, const Tensor& lse,
                                     const Tensor& grad_qkv, int64_t n_head, int64_t task) {
  const int64_t T = qkv.size(1), C = qkv.size(2) / 3;
  const int64_t b = task / n_head, h = task % n_head, hd = C / n_head;
  const int64_t qkv_offset = b * T * 3 * C + h * hd, offset = b * T * C + h * hd;
  return {qkv.const_data_ptr<scalar_t>() + qkv_offset,
          grad_out.const_data_ptr<scalar_t>() + offset, out.const_data_ptr<scalar_t>() + offset,
          lse.const_data_ptr<scalar_t>() + task * T,
          grad_qkv.mutable_data_ptr<scalar_t>() + qkv_offset};
}

// mask: null without dropout.
template <typename scalar_t>
void attention_backward_kernel(const Tensor& grad_out, const Tensor& qkv,
                               const Tensor& out, const Tensor& lse,
                               int64_t n_head, const DropoutMask* mask,
                               const Tensor& grad_qkv) {
  constexpr int64_t kQueryBlock = kBackwardQueryBlock;
  constexpr int64_t kKeyBlock = kBackwardKeyBlock;
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  const int64_t hd = C / n_head;
  const int64_t qkv_stride = 3 * C;
  const scalar_t scale = scalar_t(1) / std::sqrt(scalar_t(hd));
  const auto options = qkv.options();

  // One task per (batch, head): it owns that head's columns of grad_qkv
  // and walks key blocks and query blocks in a fixed order, so the sums
  // are race-free and the same run to run.
  at::parallel_for(0, B * n_head, 1, [&](int64_t begin, int64_t end) {
    // Scratch per chunk: probabilities P and dP / dS, each
    // [kQueryBlock, kKeyBlock], then D [T], then with dropout the mask's
    // multipliers Z [kQueryBlock, kKeyBlock].
    const int64_t tile = kQueryBlock * kKeyBlock;
    Tensor scratch;
    const auto [probs, grad_scores, row_dot, keep] =
        scratch_pieces<scalar_t>(scratch, options, {tile, tile, T, mask ? tile : 0});

    for (int64_t task = begin; task < end; ++task) {
      const auto [head_rows, grad_out_rows, out_rows, lse_rows, grad_head_rows] =
          backward_head<scalar_t>(grad_out, qkv, out, lse, grad_qkv, n_head, task);

      // D_i = rowsum(dO_i * O_i) [T], summed as small_matmul sums dP =
      // dO v^T: dS = P (dP - D) is a difference of nearly equal numbers,
      // and where it is 0 in exact math (a query that sees one key, so
      // O = v) the two then cancel exactly instead of leaving rounding
      // noise in dq and dk.
      lane_row_dots(grad_out_rows, out_rows, C, T, hd, row_dot);

      for (int64_t key_start = 0; key_start < T; key_start += kKeyBlock) {
        const int64_t cols = std::min(kKeyBlock, T - key_start);
        const scalar_t* key_rows = head_rows + key_start * qkv_stride;
        scalar_t* grad_key_rows = grad_head_rows + key_start * qkv_stride;
        Tensor k = matrix_view(key_rows + C, cols, hd, qkv_stride, options);
        Tensor v = matrix_view(key_rows + 2 * C, cols, hd, qkv_stride,
                               options);
        Tensor grad_k = matrix_view(grad_key_rows + C, cols, hd, qkv_stride,
                                    options);
        Tensor grad_v = matrix_view(grad_key_rows + 2 * C, cols, hd,
                                    qkv_stride, options);

        // Only queries >= key_start see this key block.
        for (int64_t query_start = key_start; query_start < T;
             query_start += kQueryBlock) {
          const int64_t rows = std::min(kQueryBlock, T - query_start);
          Tensor q = matrix_view(head_rows + query_start * qkv_stride, rows,
                                 hd, qkv_stride, options);
          Tensor grad_q = matrix_view(
              grad_head_rows + query_start * qkv_stride, rows, hd,
              qkv_stride, options);
          Tensor grad_out_block = matrix_view(
              grad_out_rows + query_start * C, rows, hd, C, options);
          Tensor p = matrix_view(probs, rows, cols, cols, options);
          Tensor dp = matrix_view(grad_scores, rows, cols, cols, options);

          // P = exp(q k^T * scale - lse) [rows, cols], 0 above the diagonal.
          tile_matmul<scalar_t>(p, q, k.t(), false);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t visible =
                visible_keys(query_start + r, key_start, cols);
            scores_to_exponents(probs + r * cols, visible, cols, scale,
                                lse_rows[query_start + r]);
          }
          exp_and_mask(probs, rows, cols, query_start, key_start);
          // With dropout: Z [rows, cols] (1 where masked), and P o Z, the
          // probabilities out was made of, in dP's buffer until dP comes.
          if (mask) {
            std::fill(keep, keep + rows * cols, scalar_t(1));
            drop_probabilities(keep, rows, cols, task, T, query_start, key_start,
                               *mask);
            for (int64_t i = 0; i < rows * cols; ++i) grad_scores[i] = probs[i] * keep[i];
          }

          // dv_j += (P o Z)^T dO_i [cols, hd]; the first query block overwrites.
          const int64_t diag = query_start - key_start;
          const bool first_for_key = query_start == key_start;
          causal_matmul<scalar_t>(grad_v, mask ? dp : p, grad_out_block, diag, true,
                                  !first_for_key);

          // dP = dO_i v_j^T (times Z with dropout: the gradient reaching P),
          // then dS = P * (dP - D) * scale [rows, cols];
          // the softmax scale is folded in here for both dq and dk. Masked
          // entries are set to exactly 0, not P * (dP - D): dP is NaN there
          // where a masked v or dO is (causal_matmul says why that matters).
          tile_matmul<scalar_t>(dp, grad_out_block, v.t(), false);
          if (mask) {
            for (int64_t i = 0; i < rows * cols; ++i) grad_scores[i] *= keep[i];
          }
          for (int64_t r = 0; r < rows; ++r) {
            scalar_t* ds = grad_scores + r * cols;
            const scalar_t* pr = probs + r * cols;
            const scalar_t d = row_dot[query_start + r];
            const int64_t visible = visible_keys(query_start + r, key_start, cols);
            for (int64_t c = 0; c < visible; ++c) {
              ds[c] = pr[c] * (ds[c] - d) * scale;
            }
            std::fill(ds + visible, ds + cols, scalar_t(0));
          }

          // dk_j += dS^T q_i [cols, hd]; dq_i += dS k_j [rows, hd], where
          // key block 0 (the first to reach every query) overwrites.
          causal_matmul<scalar_t>(grad_k, dp, q, diag, true, !first_for_key);
          causal_matmul<scalar_t>(grad_q, dp, k, diag, false, key_start != 0);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Short sequences: a whole head in one tile.
//
// At small T the tiled kernels above spend their time around tiny products:
// views, checks, and in small_matmul a dot product with its reduction per
// score. Up to short_sequence_max() positions a task takes a whole (batch,
// head) instead. Its scores [T, T] fit in scratch, so the softmax needs no
// running max. The head's q, k, v (and dO) are copied once into padded
// scratch, and every product runs through one register-blocked tile on raw
// pointers (product_tile) over the visible pairs only: a NaN or Inf meets no
// masked pair, so nothing needs checking.

// Sequences of at most this many positions take the short path. Measured on
// the 2-core machine (benchmarks/bench_attention_cpu.py --paths, float32,
// medians; single runs vary by about 15%): the short path's time over the
// tiled path's at 2 threads, 1 thread in brackets.
//   B, T, C, n_head      forward       forward+backward
//   64, 24, 96, 4        0.28 (0.17)   0.36 (0.36)    the demo's
//   16, 24, 128, 4       0.36 (0.50)   0.36 (0.30)
//   8, 64, 128, 4        0.55 (0.56)   0.51 (0.63)
//   8, 64, 384, 6        0.57 (0.41)   0.74 (0.64)
//   4, 128, 128, 4       0.70 (1.18)   0.71 (0.82)
//   8, 128, 384, 6       0.69 (0.75)   0.86 (0.98)
//   4, 192, 384, 6       0.80 (0.91)   0.87 (1.04)
//   4, 256, 384, 6       0.85 (0.93)   1.02 (1.09)
//   2, 256, 768, 12      0.98 (0.99)   0.89 (1.03)
//   1, 512, 384, 6       1.24 (1.13)   1.07 (1.17)
// The short path wins clearly up to T = 128, by little or not at 192 to 256,
// and loses at 512; at 128 its T x T scratch stays small (64 KiB a buffer).
constexpr int64_t kShortSequenceMax = 128;

// The crossover in force: kShortSequenceMax, or the environment's
// NANOBLOCK_CPU_ATTENTION_SHORT_MAX (read on every call; 0 sends every
// length to the tiled path). Benchmarks and tests use it to run the two
// paths at one length.
int64_t short_sequence_max() {
  const char* v = std::getenv("NANOBLOCK_CPU_ATTENTION_SHORT_MAX");
  return v != nullptr ? std::atoll(v) : kShortSequenceMax;
}

// Eight floats or four doubles as one value (GCC's and Clang's vector
// extension): an AVX register in the x86-64-v3 clone, two SSE ones in the
// baseline. Copied in and out with memcpy (unaligned).
template <typename T>
struct Vector;
template <>
struct Vector<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vector<double> {
  typedef double type __attribute__((vector_size(32)));
};

// A tile of a product is kTileRows rows by kPanel<T> columns (two vectors):
// eight accumulators, which stay in registers. The short path's scratch
// matrices are padded to whole tiles with zeros: rows to a multiple of
// kTileRows, columns (keys, or a head's hd) to a multiple of kPanel.
constexpr int64_t kTileRows = 4;
template <typename T>
constexpr int64_t kPanel = 2 * int64_t(sizeof(typename Vector<T>::type) / sizeof(T));

inline int64_t round_up(int64_t n, int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

// out[r][c] = sum over p of a[r * a_row + p * a_step] * b[p * b_stride + c]
// for r < kTileRows, c < kPanel, where row r sums p from begin + r *
// begin_step to end + r * end_step, in order (steps 0 or 1: the causal
// staircase of the tile's rows). Only rows < rows and columns < cols are
// stored (out's rows out_stride apart); b's rows must be a whole panel long.
template <typename T>
NANOBLOCK_INLINE void product_tile(const T* a, int64_t a_row, int64_t a_step, const T* b,
                                   int64_t b_stride, int64_t begin, int64_t begin_step,
                                   int64_t end, int64_t end_step, T* out, int64_t out_stride,
                                   int64_t rows, int64_t cols) {
  using V = typename Vector<T>::type;
  constexpr int64_t kHalf = kPanel<T> / 2;
  V acc[kTileRows][2] = {};
  // Adds a(r, p) * b[p] to rows first .. last - 1.
  const auto add = [&](int64_t p, int64_t first, int64_t last) {
    V b0, b1;
    std::memcpy(&b0, b + p * b_stride, sizeof(V));
    std::memcpy(&b1, b + p * b_stride + kHalf, sizeof(V));
    for (int64_t r = 0; r < kTileRows; ++r) {
      if (r < first || r >= last) continue;
      const T f = a[r * a_row + p * a_step];
      acc[r][0] += f * b0;
      acc[r][1] += f * b1;
    }
  };
  // Every row sums p in [all_begin, end); the steps' few p on either side
  // go to some rows only.
  const int64_t all_begin = begin + (kTileRows - 1) * begin_step;
  const int64_t last_end = end + (kTileRows - 1) * end_step;
  const auto add_some = [&](int64_t p) {
    add(p, end_step ? std::max<int64_t>(0, p - end + 1) : 0,
        begin_step ? std::min<int64_t>(kTileRows, p - begin + 1) : kTileRows);
  };
  for (int64_t p = begin; p < std::min(all_begin, end); ++p) add_some(p);
  for (int64_t p = all_begin; p < end; ++p) add(p, 0, kTileRows);
  for (int64_t p = std::max(all_begin, end); p < last_end; ++p) add_some(p);

  // Whole vectors stored as such, a ragged end (hd not a multiple of a
  // vector) element by element.
  for (int64_t r = 0; r < rows; ++r) {
    T* o = out + r * out_stride;
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t n = std::min(kHalf, cols - half * kHalf);
      if (n == kHalf) {
        std::memcpy(o + half * kHalf, &acc[r][half], sizeof(V));
      } else {
        for (int64_t c = 0; c < n; ++c) o[half * kHalf + c] = acc[r][half][c];
      }
    }
  }
}

// The scores of a whole head, scores [T_rows, T_cols] (contiguous):
// s[i][j] = sum_p a[i][p] * bt[p][j] over p < k, for every query i and the
// keys j of the panels that reach its diagonal (the masked ones among them
// are discarded later); a [T_rows, k] (rows a_stride apart), bt [k, T_cols].
template <typename T>
NANOBLOCK_INLINE void causal_scores(const T* a, int64_t a_stride, const T* bt, int64_t k,
                                    T* scores, int64_t T_rows, int64_t T_cols) {
  for (int64_t i = 0; i < T_rows; i += kTileRows) {
    for (int64_t j = 0; j < i + kTileRows; j += kPanel<T>) {
      product_tile(a + i * a_stride, a_stride, 1, bt + j, T_cols, 0, 0, k, 0,
                   scores + i * T_cols + j, T_cols, kTileRows, kPanel<T>);
    }
  }
}

NANOBLOCK_VECTORIZE void causal_scores(const float* a, int64_t a_stride, const float* bt,
                                       int64_t k, float* scores, int64_t T_rows,
                                       int64_t T_cols) {
  causal_scores<float>(a, a_stride, bt, k, scores, T_rows, T_cols);
}

void causal_scores(const double* a, int64_t a_stride, const double* bt, int64_t k,
                   double* scores, int64_t T_rows, int64_t T_cols) {
  causal_scores<double>(a, a_stride, bt, k, scores, T_rows, T_cols);
}

// A product with probabilities or score gradients w [T_rows, T_cols]
// (query i, key j; contiguous) over the visible pairs j <= i only, for the
// seq (= T) positions:
//   transpose_w false: out [seq, n] = w @ b    (P v, dS k)
//   transpose_w true:  out [seq, n] = w^T @ b  (P^T dO, dS^T q)
// b [T_rows, n_cols] (contiguous, n_cols = n rounded up to a panel), out's
// rows out_stride apart.
template <typename T>
NANOBLOCK_INLINE void visible_product(const T* w, int64_t T_cols, bool transpose_w,
                                      const T* b, int64_t n_cols, T* out, int64_t out_stride,
                                      int64_t seq, int64_t n) {
  for (int64_t i = 0; i < seq; i += kTileRows) {
    const int64_t rows = std::min(kTileRows, seq - i);
    for (int64_t c = 0; c < n; c += kPanel<T>) {
      const int64_t cols = std::min(kPanel<T>, n - c);
      if (transpose_w) {  // out row (key) i + r sums queries p in [i + r, seq)
        product_tile(w + i, 1, T_cols, b + c, n_cols, i, 1, seq, 0, out + i * out_stride + c,
                     out_stride, rows, cols);
      } else {  // out row (query) i + r sums keys p in [0, i + r + 1)
        product_tile(w + i * T_cols, T_cols, 1, b + c, n_cols, 0, 0, i + 1, 1,
                     out + i * out_stride + c, out_stride, rows, cols);
      }
    }
  }
}

NANOBLOCK_VECTORIZE void visible_product(const float* w, int64_t T_cols, bool transpose_w,
                                         const float* b, int64_t n_cols, float* out,
                                         int64_t out_stride, int64_t seq, int64_t n) {
  visible_product<float>(w, T_cols, transpose_w, b, n_cols, out, out_stride, seq, n);
}

void visible_product(const double* w, int64_t T_cols, bool transpose_w, const double* b,
                     int64_t n_cols, double* out, int64_t out_stride, int64_t seq, int64_t n) {
  visible_product<double>(w, T_cols, transpose_w, b, n_cols, out, out_stride, seq, n);
}

// out[i] = a[i] . b[i] for i < rows (rows of k; a's a_stride apart, b's
// b_stride apart), each summed over p in order exactly as product_tile sums
// an entry: an update out[i] += a * b of its own per p, never a reduction
// (which the compiler vectorizes as products, then adds, where product_tile's
// updates are fused multiply-adds wherever the CPU has them).
template <typename T>
NANOBLOCK_INLINE void row_dots(const T* a, int64_t a_stride, const T* b, int64_t b_stride,
                               int64_t rows, int64_t k, T* out) {
  std::fill(out, out + rows, T(0));
  for (int64_t p = 0; p < k; ++p) {
    for (int64_t i = 0; i < rows; ++i) out[i] += a[i * a_stride + p] * b[i * b_stride + p];
  }
}

NANOBLOCK_VECTORIZE void row_dots(const float* a, int64_t a_stride, const float* b,
                                  int64_t b_stride, int64_t rows, int64_t k, float* out) {
  row_dots<float>(a, a_stride, b, b_stride, rows, k, out);
}

void row_dots(const double* a, int64_t a_stride, const double* b, int64_t b_stride,
              int64_t rows, int64_t k, double* out) {
  row_dots<double>(a, a_stride, b, b_stride, rows, k, out);
}

// dst [dst_rows, dst_cols] = src [rows, cols] (src's rows src_stride apart),
// zero elsewhere.
template <typename scalar_t>
void copy_padded(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t cols,
                 scalar_t* dst, int64_t dst_rows, int64_t dst_cols) {
  for (int64_t r = 0; r < dst_rows; ++r) {
    scalar_t* d = dst + r * dst_cols;
    const int64_t n = r < rows ? cols : 0;
    std::copy(src + r * src_stride, src + r * src_stride + n, d);
    std::fill(d + n, d + dst_cols, scalar_t(0));
  }
}

// dst [cols, dst_cols] = src [rows, cols]^T (src's rows src_stride apart),
// zero in columns rows .. dst_cols - 1.
template <typename scalar_t>
void transpose_padded(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t cols,
                      scalar_t* dst, int64_t dst_cols) {
  for (int64_t c = 0; c < cols; ++c) {
    scalar_t* d = dst + c * dst_cols;
    for (int64_t r = 0; r < rows; ++r) d[r] = src[r * src_stride + c];
    std::fill(d + rows, d + dst_cols, scalar_t(0));
  }
}

// The sizes of the short path's work: qkv's B, T, C, hd and row stride, and
// the padded ones of its scratch: T as rows (T_rows), T as score columns
// (T_cols), and hd (hd_cols).
struct ShortSizes {
  int64_t B, T, C, hd, qkv_stride, T_rows, T_cols, hd_cols;
};

template <typename scalar_t>
ShortSizes short_sizes(const Tensor& qkv, int64_t n_head) {
  const int64_t T = qkv.size(1), C = qkv.size(2) / 3, hd = C / n_head;
  return {qkv.size(0), T, C, hd, 3 * C, round_up(T, kTileRows), round_up(T, kPanel<scalar_t>),
          round_up(hd, kPanel<scalar_t>)};
}

// mask: null without dropout.
template <typename scalar_t>
void short_attention_forward_kernel(const Tensor& qkv, int64_t n_head, const Tensor& out,
                                    const Tensor& lse, const DropoutMask* mask) {
  const auto [B, T, C, hd, qkv_stride, T_rows, T_cols, hd_cols] =
      short_sizes<scalar_t>(qkv, n_head);
  const scalar_t scale = scalar_t(1) / std::sqrt(scalar_t(hd));
  const scalar_t* qkv_data = qkv.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  scalar_t* lse_data = lse.mutable_data_ptr<scalar_t>();

  // One task per (batch, head).
  at::parallel_for(0, B * n_head, 1, [&](int64_t begin, int64_t end) {
    // Scratch per chunk: q [T_rows, hd], k^T [hd, T_cols], v [T_rows,
    // hd_cols], scores / probabilities [T_rows, T_cols], then each row's max
    // and 1 / sum [T].
    Tensor scratch;
    const auto [q, keys_t, v, scores, row_max, inv_sum] = scratch_pieces<scalar_t>(
        scratch, qkv.options(),
        {T_rows * hd, hd * T_cols, T_rows * hd_cols, T_rows * T_cols, T, T});

    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_head, h = task % n_head;
      const scalar_t* head_rows = qkv_data + b * T * qkv_stride + h * hd;
      scalar_t* out_rows = out_data + b * T * C + h * hd;
      scalar_t* lse_rows = lse_data + task * T;
      copy_padded(head_rows, qkv_stride, T, hd, q, T_rows, hd);
      transpose_padded(head_rows + C, qkv_stride, T, hd, keys_t, T_cols);
      copy_padded(head_rows + 2 * C, qkv_stride, T, hd, v, T_rows, hd_cols);

      // P = softmax(q k^T * scale) over each query's keys 0 .. i.
      causal_scores(q, hd, keys_t, hd, scores, T_rows, T_cols);
      for (int64_t r = 0; r < T; ++r) {
        scalar_t* row = scores + r * T_cols;
        row_max[r] = max_of(row, r + 1) * scale;  // scale > 0, as in the tiled forward
        scores_to_exponents(row, r + 1, T_cols, scale, row_max[r]);
      }
      exp_and_mask(scores, T, T_cols, 0, 0);
      for (int64_t r = 0; r < T; ++r) {
        const scalar_t sum = sum_of(scores + r * T_cols, T_cols);
        inv_sum[r] = scalar_t(1) / sum;
        lse_rows[r] = row_max[r] + std::log(sum);
      }
      if (mask) drop_probabilities(scores, T, T_cols, task, T, 0, 0, *mask);

      // out = (P v) / sum.
      visible_product(scores, T_cols, false, v, hd_cols, out_rows, C, T, hd);
      scale_rows(out_rows, T, hd, C, inv_sum);
    }
  });
}

// mask: null without dropout.
template <typename scalar_t>
void short_attention_backward_kernel(const Tensor& grad_out, const Tensor& qkv,
                                     const Tensor& out, const Tensor& lse, int64_t n_head,
                                     const DropoutMask* mask, const Tensor& grad_qkv) {
  const auto [B, T, C, hd, qkv_stride, T_rows, T_cols, hd_cols] =
      short_sizes<scalar_t>(qkv, n_head);
  const scalar_t scale = scalar_t(1) / std::sqrt(scalar_t(hd));

  // One task per (batch, head), which owns that head's columns of grad_qkv.
  at::parallel_for(0, B * n_head, 1, [&](int64_t begin, int64_t end) {
    // Scratch per chunk: q, k, dO [T_rows, hd_cols], k^T and v^T
    // [hd, T_cols], D [T], P and dP / dS [T_rows, T_cols], then with dropout
    // the mask's multipliers Z [T, T_cols].
    const int64_t head = T_rows * hd_cols, head_t = hd * T_cols, tile = T_rows * T_cols;
    Tensor scratch;
    const auto [q, k, grad_out_block, keys_t, values_t, row_dot, probs, grad_scores, keep] =
        scratch_pieces<scalar_t>(scratch, qkv.options(),
                                 {head, head, head, head_t, head_t, T, tile, tile,
                                  mask ? T * T_cols : 0});

    for (int64_t task = begin; task < end; ++task) {
      const auto [head_rows, grad_out_rows, out_rows, lse_rows, grad_q] =
          backward_head<scalar_t>(grad_out, qkv, out, lse, grad_qkv, n_head, task);
      scalar_t* grad_k = grad_q + C;
      scalar_t* grad_v = grad_q + 2 * C;
      copy_padded(head_rows, qkv_stride, T, hd, q, T_rows, hd_cols);
      copy_padded(head_rows + C, qkv_stride, T, hd, k, T_rows, hd_cols);
      copy_padded(grad_out_rows, C, T, hd, grad_out_block, T_rows, hd_cols);
      transpose_padded(head_rows + C, qkv_stride, T, hd, keys_t, T_cols);
      transpose_padded(head_rows + 2 * C, qkv_stride, T, hd, values_t, T_cols);

      // P = exp(q k^T * scale - lse), 0 above the diagonal; with dropout
      // Z, and P o Z (what out was made of) in dP's buffer until dP comes.
      causal_scores(q, hd_cols, keys_t, hd, probs, T_rows, T_cols);
      for (int64_t r = 0; r < T; ++r) {
        scores_to_exponents(probs + r * T_cols, r + 1, T_cols, scale, lse_rows[r]);
      }
      exp_and_mask(probs, T, T_cols, 0, 0);
      if (mask) {
        std::fill(keep, keep + T * T_cols, scalar_t(1));
        drop_probabilities(keep, T, T_cols, task, T, 0, 0, *mask);
        for (int64_t i = 0; i < T * T_cols; ++i) grad_scores[i] = probs[i] * keep[i];
      }

      // dv = (P o Z)^T dO.
      visible_product(mask ? grad_scores : probs, T_cols, true, grad_out_block, hd_cols, grad_v,
                      qkv_stride, T, hd);

      // dP = dO v^T (times Z with dropout), D = rowsum(dO * O), then
      // dS = P (dP - D) * scale over the visible pairs. D is summed as
      // each dP is (row_dots), for the tiled backward's reason: where P
      // is (nearly) one-hot, O is (nearly) that key's v, and dP - D then
      // cancels (exactly, for a query that sees one key) instead of leaving
      // rounding noise in dq and dk.
      causal_scores(grad_out_block, hd_cols, values_t, hd, grad_scores, T_rows, T_cols);
      row_dots(grad_out_rows, C, out_rows, C, T, hd, row_dot);
      if (mask) {
        for (int64_t i = 0; i < T * T_cols; ++i) grad_scores[i] *= keep[i];
      }
      for (int64_t r = 0; r < T; ++r) {
        scalar_t* ds = grad_scores + r * T_cols;
        const scalar_t* pr = probs + r * T_cols;
        for (int64_t c = 0; c <= r; ++c) ds[c] = pr[c] * (ds[c] - row_dot[r]) * scale;
      }

      // dk = dS^T q, dq = dS k.
      visible_product(grad_scores, T_cols, true, q, hd_cols, grad_k, qkv_stride, T, hd);
      visible_product(grad_scores, T_cols, false, k, hd_cols, grad_q, qkv_stride, T, hd);
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> causal_attention_forward(const Tensor& qkv,
                                                    int64_t n_head,
                                                    const Dropout& dropout) {
  if (is_bf16(qkv)) {
    auto [out, lse] = causal_attention_forward(to_float(qkv), n_head, dropout);
    return {to_bf16(out), lse};
  }
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  Tensor out = at::empty({B, T, C}, qkv.options());
  Tensor lse = at::empty({B, n_head, T},
                         qkv.options().dtype(stats_dtype(qkv.scalar_type())));
  if (out.numel() == 0) {
    return {out, lse};
  }
  const auto dtype = qkv.scalar_type();
  const std::optional<DropoutMask> mask =
      dropout.active() ? std::optional<DropoutMask>(dropout) : std::nullopt;
  const bool short_sequence = T <= short_sequence_max();
  AT_DISPATCH_FLOATING_TYPES(dtype, "causal_attention_forward", [&] {
    if (short_sequence) {
      short_attention_forward_kernel<scalar_t>(qkv, n_head, out, lse, mask ? &*mask : nullptr);
    } else {
      attention_forward_kernel<scalar_t>(qkv, n_head, out, lse, mask ? &*mask : nullptr);
    }
  });
  return {out, lse};
}

Tensor causal_attention_backward(const Tensor& grad_out, const Tensor& qkv,
                                 const Tensor& out, const Tensor& lse,
                                 int64_t n_head, const Dropout& dropout) {
  if (is_bf16(qkv)) {
    return to_bf16(causal_attention_backward(to_float(grad_out), to_float(qkv), to_float(out),
                                             lse, n_head, dropout));
  }
  Tensor grad_qkv = at::empty_like(qkv);
  if (grad_qkv.numel() == 0) {
    return grad_qkv;
  }
  const auto dtype = qkv.scalar_type();
  const std::optional<DropoutMask> mask =
      dropout.active() ? std::optional<DropoutMask>(dropout) : std::nullopt;
  const bool short_sequence = qkv.size(1) <= short_sequence_max();
  AT_DISPATCH_FLOATING_TYPES(dtype, "causal_attention_backward", [&] {
    if (short_sequence) {
      short_attention_backward_kernel<scalar_t>(grad_out, qkv, out, lse, n_head,
                                                mask ? &*mask : nullptr, grad_qkv);
    } else {
      attention_backward_kernel<scalar_t>(grad_out, qkv, out, lse, n_head,
                                          mask ? &*mask : nullptr, grad_qkv);
    }
  });
  return grad_qkv;
}

}  // namespace nanoblock::cpu
