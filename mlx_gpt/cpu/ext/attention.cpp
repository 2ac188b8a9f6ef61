// Attention as one primitive per pass, each (batch, head) pair a task for the pool.
//
// Through MLX's graph, attention is batched matmuls over heads split out of the projection: each
// transposed view is copied before a matmul and after it, the batched matmul is one BLAS call
// per head, and the backward pass adds the gradients of every copy. Here a task reads its head's
// rows where the projection left them, keeps a few rows of scores in cache, and writes its
// output rows where the transpose back to (B, T, C) expects them. The backward pass recomputes
// the attention weights from the forward pass's log-sum-exps (one more q k^T) rather than
// keeping a (T, S) matrix per head from the forward pass.
//
// The products are small, below the sizes where BLAS pays for its packing: tile.h runs them.
//
// Decoding (one or two queries, over a fixed cache of which only `length` positions are written)
// reads each written key and value row once, where it lies.
//
// Packed rows (several examples in a row, each seeing only itself) pass each query's first key,
// its example's first token (`lo`, nondecreasing along a row): a tile of queries multiplies only
// the keys from its first row's, and a tile of keys only the queries up to the last that sees it,
// so a row of short examples costs about what its examples cost apart.
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "common.h"
#include "parallel.h"
#include "primitives.h"
#include "tile.h"
#include "vecmath.h"

namespace mlx_gpt {

namespace {

constexpr int kDims = 4;            // (B, nh, T, hs)
constexpr int64_t kFewQueries = 2;  // decoding: forward_rows

// One (batch, head) slice of a (B, nh, rows, hs) array: row i starts at p + i * stride.
template <class T>
struct Rows {
  T* p;
  int64_t stride;
  T* row(int64_t i) const { return p + i * stride; }
};
using Slice = Rows<const float>;
using MutSlice = Rows<float>;

// A (B, nh, rows, hs) array as the kernels read it: its data (copied when its last axis is not
// contiguous) and the strides of its first three axes.
struct View {
  const float* data;
  int64_t sb, sh, st;
  std::vector<float> copy;

  explicit View(const mx::array& a) {
    auto& s = a.strides();
    if (s[3] == 1 || a.shape(3) == 1) {
      data = a.data<float>();
      sb = s[0], sh = s[1], st = s[2];
      return;
    }
    int64_t n1 = a.shape(1), n2 = a.shape(2), n3 = a.shape(3);
    copy.resize(static_cast<size_t>(a.size()));
    const float* src = a.data<float>();
    float* dst = copy.data();
    for (int64_t i0 = 0; i0 < a.shape(0); ++i0)
      for (int64_t i1 = 0; i1 < n1; ++i1)
        for (int64_t i2 = 0; i2 < n2; ++i2)
          for (int64_t i3 = 0; i3 < n3; ++i3)
            *dst++ = src[i0 * s[0] + i1 * s[1] + i2 * s[2] + i3 * s[3]];
    data = copy.data();
    sb = n1 * n2 * n3, sh = n2 * n3, st = n3;
  }

  Slice slice(int64_t b, int64_t h) const { return {data + b * sb + h * sh, st}; }
};

// Output arrays of logical shape (B, nh, rows, hs) stored as (B, rows, nh, hs).
float* allocate_heads_last(mx::array& out) {
  int64_t nh = out.shape(1), rows = out.shape(2), hs = out.shape(3);
  mx::Strides strides{rows * nh * hs, hs, nh * hs, 1};
  bool row_contiguous = nh == 1 || rows == 1;
  out.set_data(mx::allocator::malloc(out.nbytes()), out.size(), strides,
               mx::array::Flags{true, row_contiguous, false});
  return out.data<float>();
}

// head h of batch b of such an output with `rows` rows
MutSlice heads_last(float* base, int64_t nh, int64_t rows, int64_t hs, int64_t b, int64_t h) {
  return {base + b * rows * nh * hs + h * hs, nh * hs};
}

// the first key query row r sees: 0, or in packed rows the first of its own example
inline int64_t first_key(const int32_t* lo, int64_t r) { return lo ? lo[r] : 0; }

// the first query that sees key j
inline int64_t first_query(int64_t j, int64_t t, int64_t s, bool causal) {
  if (!causal) return 0;
  int64_t r = j - (s - t);
  return r < 0 ? 0 : r;
}

// kt (hs x s) = the rows of x (s x hs) as columns, by blocks of kCols rows so that each write
// fills a run of kCols floats (one row at a time wrote one float per cache line)
void transpose_into(Slice x, int64_t s, int64_t hs, float* kt) {
  for (int64_t j0 = 0; j0 < s; j0 += kCols) {
    int64_t w = std::min<int64_t>(kCols, s - j0);
    for (int64_t d = 0; d < hs; ++d) {
      float* out = kt + d * s + j0;
      for (int64_t j = 0; j < w; ++j) out[j] = x.row(j0 + j)[d];
    }
  }
}

struct Shape {
  int64_t batch, heads, t, s, hs;
  float scale;
  bool causal;
};

// Per-thread scratch, grown as needed and kept for the next call.
std::vector<float>& scratch(size_t n) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer;
}

// forward_head for a few queries (decoding): each score a dot product with a key row where it
// lies, and the output a weighted sum of value rows, one pass over each; the tiled path would
// first copy all the keys into a transposed block
void forward_rows(const Shape& z, Slice q, Slice k, Slice v, MutSlice y, float* lse, const int32_t* lo) {
  const int64_t t = z.t, s = z.s, hs = z.hs;
  const float scale = z.scale;
  float* p = scratch(static_cast<size_t>(s)).data();
  for (int64_t r = 0; r < t; ++r) {
    float* yr = y.row(r);
    for (int64_t d = 0; d < hs; ++d) yr[d] = 0.0f;
    int64_t a = first_key(lo, r), n = visible(r, t, s, z.causal);
    if (n <= a) {
      lse[r] = -std::numeric_limits<float>::infinity();
      continue;
    }
    const float* qr = q.row(r);
    for (int64_t j = a; j < n; ++j) p[j] = dot(qr, k.row(j), hs);
    float m = max(p + a, n - a) * scale;
    for (int64_t j = a; j < n; ++j) p[j] = exp_nonpositive(p[j] * scale - m);
    float total = sum(p + a, n - a);
    for (int64_t j = a; j < n; ++j) {
      const float* vj = v.row(j);
      const float w = p[j];
      for (int64_t d = 0; d < hs; ++d) yr[d] += w * vj[d];
    }
    const float inverse = 1.0f / total;
    for (int64_t d = 0; d < hs; ++d) yr[d] *= inverse;
    lse[r] = m + std::log(total);
  }
}

void forward_head(const Shape& z, Slice q, Slice k, Slice v, MutSlice y, float* lse, const int32_t* lo) {
  const int64_t t = z.t, s = z.s, hs = z.hs;
  const float scale = z.scale;  // a local: a float read through z might alias the rows written
  auto& buffer = scratch(static_cast<size_t>(hs * s + kRows * s));
  float* kt = buffer.data();
  float* p = kt + hs * s;  // kRows rows of scores, then weights
  transpose_into(k, s, hs, kt);
  for (int64_t i0 = 0; i0 < t; i0 += kRows) {
    int64_t rows = std::min<int64_t>(kRows, t - i0);
    // the tile's columns: from its first row's first key to its last row's last
    int64_t from = first_key(lo, i0), width = visible(i0 + rows - 1, t, s, z.causal);
    int64_t span = std::max<int64_t>(width - from, 0);
    matmul(rows, span, hs, q.row(i0), q.stride, 1, kt + from, s, p + from, s);
    float inverse[kRows];
    for (int64_t r = 0; r < rows; ++r) {
      float* pr = p + r * s;
      int64_t a = first_key(lo, i0 + r), n = visible(i0 + r, t, s, z.causal);
      if (n <= a) {  // sees no key: its output is 0
        for (int64_t j = from; j < width; ++j) pr[j] = 0.0f;
        inverse[r] = 0.0f;
        lse[i0 + r] = -std::numeric_limits<float>::infinity();
        continue;
      }
      float m = max(pr + a, n - a) * scale;
      for (int64_t j = from; j < a; ++j) pr[j] = 0.0f;
      for (int64_t j = a; j < n; ++j) pr[j] = exp_nonpositive(pr[j] * scale - m);
      for (int64_t j = n; j < width; ++j) pr[j] = 0.0f;
      float total = sum(pr + a, n - a);
      inverse[r] = 1.0f / total;
      lse[i0 + r] = m + std::log(total);
    }
    matmul(rows, hs, span, p + from, s, 1, v.row(from), v.stride, y.row(i0), y.stride);  // span 0: zeros
    for (int64_t r = 0; r < rows; ++r) {
      float* yr = y.row(i0 + r);
      for (int64_t d = 0; d < hs; ++d) yr[d] *= inverse[r];
    }
  }
}

// dq = scale dS k, dk = scale dS^T q, dv = P^T dO, with P recomputed from the log-sum-exps and
// dS = P (dP - rowsum(dO o)), dP = dO v^T
void backward_head(const Shape& z, Slice q, Slice k, Slice v, Slice o, const float* lse, Slice g, MutSlice dq,
                   MutSlice dk, MutSlice dv, const int32_t* lo) {
  const int64_t t = z.t, s = z.s, hs = z.hs;
  const float scale = z.scale;
  auto& buffer = scratch(static_cast<size_t>(2 * hs * s + 2 * t * s + t));
  float* kt = buffer.data();
  float* vt = kt + hs * s;
  float* p = vt + hs * s;  // (t, s) attention weights
  float* ds = p + t * s;   // (t, s) gradient of the scaled scores, times the scale
  float* delta = ds + t * s;
  transpose_into(k, s, hs, kt);
  transpose_into(v, s, hs, vt);
  for (int64_t i = 0; i < t; ++i) delta[i] = dot(g.row(i), o.row(i), hs);
  for (int64_t i0 = 0; i0 < t; i0 += kRows) {
    int64_t rows = std::min<int64_t>(kRows, t - i0);
    int64_t from = first_key(lo, i0), width = visible(i0 + rows - 1, t, s, z.causal);
    float* pt = p + i0 * s;
    float* dst = ds + i0 * s;
    int64_t span = std::max<int64_t>(width - from, 0);
    matmul(rows, span, hs, q.row(i0), q.stride, 1, kt + from, s, pt + from, s);
    matmul(rows, span, hs, g.row(i0), g.stride, 1, vt + from, s, dst + from, s);
    for (int64_t r = 0; r < rows; ++r) {
      float* pr = pt + r * s;
      float* dr = dst + r * s;
      int64_t a = first_key(lo, i0 + r), n = visible(i0 + r, t, s, z.causal);
      float shift = lse[i0 + r], dl = delta[i0 + r];
      for (int64_t j = 0; j < a; ++j) pr[j] = dr[j] = 0.0f;
      for (int64_t j = a; j < n; ++j) {
        float w = exp_nonpositive(pr[j] * scale - shift);
        pr[j] = w;
        dr[j] = (w * (dr[j] - dl)) * scale;
      }
      for (int64_t j = std::max(a, n); j < s; ++j) pr[j] = dr[j] = 0.0f;
    }
    matmul(rows, hs, span, dst + from, s, 1, k.row(from), k.stride, dq.row(i0), dq.stride);  // span 0: zeros
  }
  // key j gets contributions from queries first_query(j)..t-1 (in packed rows, up to the last of
  // its example); rows outside those are zero in p, ds
  int64_t end = 0;  // packed rows: one past the last query that sees a key of the tiles so far
  for (int64_t j0 = 0; j0 < s; j0 += kRows) {
    int64_t rows = std::min<int64_t>(kRows, s - j0);
    int64_t from = first_query(j0, t, s, z.causal), until = t;
    if (lo) {
      end = std::max(end, from);
      while (end < t && lo[end] <= j0 + rows - 1) ++end;
      until = end;
    }
    int64_t kk = std::max<int64_t>(until - from, 0);
    auto transposed = [&](const float* a, Slice b, MutSlice c) {
      if (rows == kRows)
        tile_rows<kRows>(hs, kk, a + from * s + j0, 1, s, b.row(from), b.stride, c.row(j0), c.stride);
      else
        for (int64_t r = 0; r < rows; ++r)
          tile_rows<1>(hs, kk, a + from * s + j0 + r, 1, s, b.row(from), b.stride, c.row(j0 + r), c.stride);
    };
    transposed(p, g, dv);
    transposed(ds, q, dk);
  }
}

Shape shape_of(const mx::array& q, const mx::array& k, float scale, bool causal) {
  return {q.shape(0), q.shape(1), q.shape(2), k.shape(2), q.shape(3), scale, causal};
}

void check_shapes(const mx::array& q, const mx::array& k, const mx::array& v, float scale) {
  for (auto* a : {&q, &k, &v}) require_float32(*a, "attention: q, k and v");
  if (q.ndim() != kDims || k.ndim() != kDims || v.ndim() != kDims)
    throw std::invalid_argument("attention: q, k and v must be (B, nh, T, hs)");
  if (k.shape() != v.shape() || k.shape(0) != q.shape(0) || k.shape(1) != q.shape(1) || k.shape(3) != q.shape(3))
    throw std::invalid_argument("attention: k and v must be (B, nh, S, hs) for q (B, nh, T, hs)");
  if (!(scale > 0.0f)) throw std::invalid_argument("attention: scale must be positive");
}

// (batch, head) pairs per task: one query over a few dozen keys is microseconds of work, less than
// handing it to another thread
int64_t heads_per_task(const Shape& z) {
  constexpr int64_t kMinWork = 1 << 16;  // multiply-adds
  int64_t work = std::max<int64_t>(1, z.t * z.s * z.hs);
  return std::max<int64_t>(1, kMinWork / work);
}

// Each query's first key from packed rows' `starts` (B, T): clamped to [its row's previous one, the
// query itself], so that a malformed input can neither read outside the row nor break the
// nondecreasing order the tiles rely on (well-formed starts are left as they are).
std::vector<int32_t> first_keys(const mx::array& starts, const Shape& z) {
  std::vector<int32_t> lo(static_cast<size_t>(z.batch * z.t));
  const int32_t* in = starts.data<int32_t>();
  for (int64_t b = 0; b < z.batch; ++b) {
    int32_t previous = 0;
    for (int64_t r = 0; r < z.t; ++r) {
      int64_t i = b * z.t + r;
      previous = static_cast<int32_t>(std::clamp<int64_t>(in[i], previous, r));
      lo[i] = previous;
    }
  }
  return lo;
}

const int32_t* row_of(const std::vector<int32_t>& lo, const Shape& z, int64_t b) {
  return lo.empty() ? nullptr : lo.data() + b * z.t;
}

// an Attention primitive's output; its other, the log-sum-exps, feeds the backward pass
mx::array output_of(const mx::array& q, std::shared_ptr<Attention> attention, const std::vector<mx::array>& inputs) {
  return mx::array::make_arrays({q.shape(), {q.shape(0), q.shape(1), q.shape(2)}}, {mx::float32, mx::float32},
                                std::move(attention), inputs)[0];
}

}  // namespace

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal,
                    const std::optional<mx::array>& starts, mx::StreamOrDevice s) {
  check_shapes(q, k, v, scale);
  std::vector<mx::array> inputs{q, k, v};
  if (starts) {
    if (!causal) throw std::invalid_argument("attention: packed rows (starts) are causal");
    if (starts->dtype() != mx::int32 || starts->ndim() != 2 || starts->shape(0) != q.shape(0) ||
        starts->shape(1) != q.shape(2) || k.shape(2) != q.shape(2))
      throw std::invalid_argument("attention: starts must be (B, T) int32 for q (B, nh, T, hs) and T keys");
    inputs.push_back(mx::contiguous(*starts, false, s));
  }
  return output_of(q, std::make_shared<Attention>(mx::to_stream(s), scale, causal, starts.has_value()), inputs);
}

mx::array cache_attention(const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& length,
                          float scale, mx::StreamOrDevice s) {
  check_shapes(q, k, v, scale);
  if (length.dtype() != mx::int32 || (length.size() != 1 && (length.ndim() != 1 || length.shape(0) != q.shape(0))))
    throw std::invalid_argument("cache_attention: length must be one int32, or one for each row of the batch");
  return output_of(q, std::make_shared<Attention>(mx::to_stream(s), scale, true), {q, k, v, length});
}

void Attention::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  Shape z = shape_of(inputs[0], inputs[1], scale_, causal_);
  float* y = allocate_heads_last(outputs[0]);
  float* lse = allocate(outputs[1]);
  dispatch(stream(), inputs, outputs, [in = inputs, z, y, lse, packed = packed_]() mutable {
    std::vector<int32_t> first;
    const int32_t* lengths = nullptr;  // a cache: the keys after a row's length are not written yet
    int64_t per_row = 0;               // whether each row has a length of its own (batched serving)
    if (packed) {
      first = first_keys(in[3], z);
    } else if (in.size() == 4) {
      lengths = in[3].data<int32_t>();
      per_row = in[3].size() == 1 ? 0 : 1;
    }
    View qv(in[0]), kv(in[1]), vv(in[2]);
    auto forward = z.t <= kFewQueries ? forward_rows : forward_head;
    Pool::instance().run(z.batch * z.heads, heads_per_task(z), [&](int, int64_t lo, int64_t hi) {
      for (int64_t task = lo; task < hi; ++task) {
        int64_t b = task / z.heads, h = task % z.heads;
        Shape zb = z;
        if (lengths) zb.s = std::clamp<int64_t>(lengths[b * per_row], 0, z.s);
        forward(zb, qv.slice(b, h), kv.slice(b, h), vv.slice(b, h), heads_last(y, z.heads, z.t, z.hs, b, h),
                lse + task * z.t, row_of(first, z, b));
      }
    });
  });
}

std::vector<mx::array> Attention::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                      const std::vector<int>& argnums, const std::vector<mx::array>& outputs) {
  if (primals.size() == 4 && !packed_)
    throw std::invalid_argument("cache_attention has no gradient: it is for decoding");
  std::vector<mx::array> inputs{primals[0], primals[1], primals[2], outputs[0], outputs[1], cotangents[0]};
  if (packed_) inputs.push_back(primals[3]);
  auto grads = mx::array::make_arrays({primals[0].shape(), primals[1].shape(), primals[2].shape()},
                                      {mx::float32, mx::float32, mx::float32},
                                      std::make_shared<AttentionGrad>(stream(), scale_, causal_, packed_), inputs);
  std::vector<mx::array> out;
  for (int a : argnums) out.push_back(a < 3 ? grads[a] : mx::zeros_like(primals[a], stream()));  // starts: none
  return out;
}

void AttentionGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  Shape z = shape_of(inputs[0], inputs[1], scale_, causal_);
  float* dq = allocate_heads_last(outputs[0]);
  float* dk = allocate_heads_last(outputs[1]);
  float* dv = allocate_heads_last(outputs[2]);
  dispatch(stream(), inputs, outputs,
           [in = inputs, z, dq, dk, dv] {
             std::vector<int32_t> first;
             if (in.size() == 7) first = first_keys(in[6], z);  // packed rows
             View qv(in[0]), kv(in[1]), vv(in[2]), ov(in[3]), gv(in[5]);
             const float* lse = in[4].data<float>();
             Pool::instance().run(z.batch * z.heads, 1, [&](int, int64_t lo, int64_t hi) {
               for (int64_t task = lo; task < hi; ++task) {
                 int64_t b = task / z.heads, h = task % z.heads;
                 backward_head(z, qv.slice(b, h), kv.slice(b, h), vv.slice(b, h), ov.slice(b, h), lse + task * z.t,
                               gv.slice(b, h), heads_last(dq, z.heads, z.t, z.hs, b, h),
                               heads_last(dk, z.heads, z.s, z.hs, b, h), heads_last(dv, z.heads, z.s, z.hs, b, h),
                               row_of(first, z, b));
               }
             });
           });
}

}  // namespace mlx_gpt
