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
// Queries and keys are cut into blocks; no T x T tensor ever exists. The
// block products go through ATen's GEMM (at::mm_out / at::addmm_out) on
// from_blob views of the strided head columns, so nothing is copied; small
// products (short sequences) run as plain loops (tile_matmul). A NaN or Inf
// at one position reaches no earlier position's output and no later
// position's gradient: masked probabilities and score gradients are exactly
// 0, and where one would meet a non-finite value on the diagonal, the block
// runs as loops that skip masked pairs (causal_matmul). The
// elementwise work (mask, rescale, row sums) is plain loops over contiguous
// rows, with the exp from vector_math.h (vectorized) for float32 and libm's
// for float64, all in the input's precision. lse has the input's dtype: for float32 and float64,
// the two dtypes dispatched here, that is stats_dtype. bfloat16 runs as
// float32 (bfloat16.h) and keeps a float32 lse.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
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
// Big products go to ATen's GEMM; small ones (short sequences, small heads)
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
  if (!accumulate) {
    for (int64_t r = 0; r < out.size(0); ++r) {
      std::fill(out_data + r * out.stride(0), out_data + r * out.stride(0) + n, scalar_t(0));
    }
  }
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
    Tensor scratch = at::empty({kQueryBlock * (kKeyBlock + 3)}, options);
    scalar_t* scores = scratch.mutable_data_ptr<scalar_t>();
    scalar_t* row_max = scores + kQueryBlock * kKeyBlock;
    scalar_t* row_sum = row_max + kQueryBlock;
    scalar_t* rescale = row_sum + kQueryBlock;

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
  const scalar_t* qkv_data = qkv.const_data_ptr<scalar_t>();
  const scalar_t* grad_out_data = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* out_data = out.const_data_ptr<scalar_t>();
  const scalar_t* lse_data = lse.const_data_ptr<scalar_t>();
  scalar_t* grad_qkv_data = grad_qkv.mutable_data_ptr<scalar_t>();

  // One task per (batch, head): it owns that head's columns of grad_qkv
  // and walks key blocks and query blocks in a fixed order, so the sums
  // are race-free and the same run to run.
  at::parallel_for(0, B * n_head, 1, [&](int64_t begin, int64_t end) {
    // Scratch per chunk: probabilities P and dP / dS, each
    // [kQueryBlock, kKeyBlock], then D [T], then with dropout the mask's
    // multipliers Z [kQueryBlock, kKeyBlock].
    const int64_t tile = kQueryBlock * kKeyBlock;
    Tensor scratch = at::empty({(mask ? 3 : 2) * tile + T}, options);
    scalar_t* probs = scratch.mutable_data_ptr<scalar_t>();
    scalar_t* grad_scores = probs + tile;
    scalar_t* row_dot = grad_scores + tile;
    scalar_t* keep = row_dot + T;

    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_head;
      const int64_t h = task % n_head;
      const scalar_t* head_rows = qkv_data + b * T * qkv_stride + h * hd;
      scalar_t* grad_head_rows = grad_qkv_data + b * T * qkv_stride + h * hd;
      const scalar_t* grad_out_rows = grad_out_data + b * T * C + h * hd;
      const scalar_t* out_rows = out_data + b * T * C + h * hd;
      const scalar_t* lse_rows = lse_data + (b * n_head + h) * T;

      // D_i = rowsum(dO_i * O_i) [T], summed in the order small_matmul
      // sums dP = dO v^T: dS = P (dP - D) is a difference of nearly equal
      // numbers, and where it is 0 in exact math (a query that sees one key,
      // so O = v) the two then cancel exactly instead of leaving rounding
      // noise in dq and dk.
      for (int64_t i = 0; i < T; ++i) {
        const scalar_t* dO = grad_out_rows + i * C;
        const scalar_t* O = out_rows + i * C;
        row_dot[i] = lane_sum<scalar_t>(hd, [&](int64_t c) { return dO[c] * O[c]; });
      }

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
            drop_probabilities(keep, rows, cols, b * n_head + h, T, query_start, key_start,
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
  AT_DISPATCH_FLOATING_TYPES(dtype, "causal_attention_forward", [&] {
    attention_forward_kernel<scalar_t>(qkv, n_head, out, lse, mask ? &*mask : nullptr);
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
  AT_DISPATCH_FLOATING_TYPES(dtype, "causal_attention_backward", [&] {
    attention_backward_kernel<scalar_t>(grad_out, qkv, out, lse, n_head,
                                        mask ? &*mask : nullptr, grad_qkv);
  });
  return grad_qkv;
}

}  // namespace nanoblock::cpu
