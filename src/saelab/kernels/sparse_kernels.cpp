// CPU kernels for the sparse (TopK / BatchTopK) training step: exact top-k selection and the products of a
// sparse [B, d_sae] latent matrix Z (k entries per token) with dense matrices. float32 data, int64 indices.
//
// Why hand-written: after the encoder matmul, a TopK step is selection, gathers and scatters, and the torch
// operators for them (topk, embedding_bag, CSR products) spend 3-5x the memory traffic the work needs on CPU.
// Loaded through ctypes by kernels/native.py, which compiles this file once per machine and falls back to the
// torch path when no compiler is present. Every function here has a torch twin there, and
// tests/test_native_kernels.py checks each against it.
//
// Threads: each call splits its work into `threads` contiguous parts run by OpenMP. Built with -fopenmp, this
// library needs libgomp.so.1, and the loader gives it the one torch already loaded (its wheel bundles
// libgomp.so.1), so these kernels run on torch's own thread pool. Threads of their own would compete with
// torch's, which spin for a while after each operator: that cost 40% of the sparse kernels' time here.
// Results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

using i64 = int64_t;

namespace {

// Run body(part, lo, hi) for each non-empty range [bounds[part], bounds[part + 1]), one OpenMP thread per range.
template <class Body>
void run_parts(const std::vector<i64>& bounds, Body&& body) {
  const int parts = static_cast<int>(bounds.size()) - 1;
#pragma omp parallel for num_threads(parts) schedule(static, 1)
  for (int part = 0; part < parts; ++part)
    if (bounds[part] < bounds[part + 1]) body(part, bounds[part], bounds[part + 1]);
}

// Equal ranges of [0, n), each boundary a multiple of `align` (so no two threads write one cache line).
std::vector<i64> even_bounds(i64 n, int threads, i64 align = 1) {
  threads = std::max(1, threads);
  std::vector<i64> bounds(threads + 1, n);
  bounds[0] = 0;
  for (int t = 1; t < threads; ++t) bounds[t] = std::min(n, (n * t / threads + align - 1) / align * align);
  return bounds;
}

// Ranges of [0, n) holding about equal shares of the entries, by CSR offsets (offsets[n] entries in all).
std::vector<i64> balanced_bounds(const i64* offsets, i64 n, int threads, i64 align) {
  threads = std::max(1, threads);
  std::vector<i64> bounds(threads + 1, n);
  bounds[0] = 0;
  for (int t = 1; t < threads; ++t) {
    const i64 target = offsets[n] * t / threads;
    i64 at = std::lower_bound(offsets, offsets + n + 1, target) - offsets;
    at = std::min(n, (at + align - 1) / align * align);
    bounds[t] = std::max(bounds[t - 1], at);
  }
  return bounds;
}

// Order-preserving unsigned keys for floats: a < b as floats <=> key(a) < key(b) (with -0 < +0, and NaN above
// +inf, which is where torch.topk ranks NaN). Selection works on keys, so it needs only integer compares.
inline uint32_t float_key(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b ^ ((b >> 31) ? 0xFFFFFFFFu : 0x80000000u);
}

#if defined(__AVX512F__)
inline __m512i float_keys(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  return _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32(b, 31), _mm512_set1_epi32(INT32_MIN)));
}
#endif

// How many of keys[0..n) are >= probe.
inline i64 count_at_least(const uint32_t* keys, i64 n, uint32_t probe) {
  i64 count = 0, i = 0;
#if defined(__AVX512F__)
  const __m512i p = _mm512_set1_epi32(static_cast<int>(probe));
  for (; i + 16 <= n; i += 16) count += __builtin_popcount(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(keys + i), p));
#endif
  for (; i < n; ++i) count += keys[i] >= probe;
  return count;
}

// The largest key t with count(t) >= rank, where count(probe) says how many candidate keys are >= probe: the
// rank-th largest candidate key. Built bit by bit from the top, each bit one counting pass over the (few,
// cache-resident) candidates.
template <class Count>
uint32_t kth_largest_key(i64 rank, Count&& count) {
  uint32_t t = 0;
  for (int bit = 31; bit >= 0; --bit)
    if (count(t | (1u << bit)) >= rank) t |= 1u << bit;
  return t;
}

// How many of keys[0..n) are > t.
inline i64 count_above(const uint32_t* keys, i64 n, uint32_t t) {
  return t == UINT32_MAX ? 0 : count_at_least(keys, n, t + 1);
}

// Appends (key, id_offset + i) for the entries i in [lo, hi) whose x[i] + bias[i] has a key >= cutoff, in
// index order. The buffers need 16 slots of slack past the last kept entry (a whole vector is stored, then
// the end advances by the hits).
template <class Index>
i64 collect_at_least(const float* x, const float* bias, i64 lo, i64 hi, uint32_t cutoff, uint32_t* keys, Index* ids,
                     i64 id_offset) {
  i64 n = 0, i = lo;
#if defined(__AVX512F__)
  const __m512i c = _mm512_set1_epi32(static_cast<int>(cutoff));
  for (; i + 16 <= hi; i += 16) {
    const __m512i k = float_keys(_mm512_add_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(bias + i)));
    const __mmask16 hits = _mm512_cmpge_epu32_mask(k, c);  // no branch on hits: it would mispredict often
    _mm512_storeu_si512(keys + n, _mm512_maskz_compress_epi32(hits, k));
    const i64 at = id_offset + i;
    if constexpr (sizeof(Index) == 4) {
      const __m512i where = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(at)),
                                             _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
      _mm512_storeu_si512(ids + n, _mm512_maskz_compress_epi32(hits, where));
    } else {
      const __m512i where = _mm512_add_epi64(_mm512_set1_epi64(at), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
      const int low = __builtin_popcount(hits & 0xFF);
      _mm512_storeu_si512(ids + n, _mm512_maskz_compress_epi64(hits & 0xFF, where));
      _mm512_storeu_si512(ids + n + low,
                          _mm512_maskz_compress_epi64(hits >> 8, _mm512_add_epi64(where, _mm512_set1_epi64(8))));
    }
    n += __builtin_popcount(hits);
  }
#endif
  for (; i < hi; ++i) {
    const uint32_t k = float_key(x[i] + bias[i]);
    if (k >= cutoff) {
      keys[n] = k;
      ids[n++] = static_cast<Index>(id_offset + i);
    }
  }
  return n;
}

// Of candidates keys[0..n) in index order, those above t and the first `ties` equal to t, passed in order to
// take(j) (j: the candidate's position): the top of the candidates when t is the keep-th largest key.
template <class Take>
void take_top(const uint32_t* keys, i64 n, uint32_t t, i64 ties, Take&& take) {
  for (i64 j = 0; j < n; ++j)
    if (keys[j] > t || (keys[j] == t && ties-- > 0)) take(j);
}

// The keep largest of the candidate keys held by parts (part p: keys[p][0..found[p]), in index order; parts in
// index order; ties: the lower index wins), passed in index order to emit(p, j, out): part p's candidate j goes
// to output position out. Returns how many were emitted (keep, if there were that many candidates).
template <class Emit>
i64 take_top_of_parts(const std::vector<std::vector<uint32_t>>& keys, const std::vector<i64>& found, i64 keep,
                      Emit&& emit) {
  const int parts = static_cast<int>(found.size());
  // The exact keep-th largest key t, each part counting its own candidates.
  const uint32_t t = kth_largest_key(keep, [&](uint32_t probe) {
    i64 count = 0;
#pragma omp parallel for num_threads(parts) schedule(static, 1) reduction(+ : count)
    for (int p = 0; p < parts; ++p) count += count_at_least(keys[p].data(), found[p], probe);
    return count;
  });
  // Each part keeps its keys above t, and the ties at t go to the lowest indices: parts in index order take
  // them while the quota lasts. Then every part writes its share at its own offset.
  std::vector<i64> above(parts), ties(parts), taken_ties(parts), offset(parts + 1, 0);
#pragma omp parallel for num_threads(parts) schedule(static, 1)
  for (int p = 0; p < parts; ++p) {
    above[p] = count_above(keys[p].data(), found[p], t);
    ties[p] = count_at_least(keys[p].data(), found[p], t) - above[p];
  }
  i64 ties_left = keep;
  for (int p = 0; p < parts; ++p) ties_left -= above[p];
  for (int p = 0; p < parts; ++p) {
    taken_ties[p] = std::min(ties[p], ties_left);
    ties_left -= taken_ties[p];
    offset[p + 1] = offset[p] + above[p] + taken_ties[p];
  }
#pragma omp parallel for num_threads(parts) schedule(static, 1)
  for (int p = 0; p < parts; ++p) {
    i64 out = offset[p];
    take_top(keys[p].data(), found[p], t, taken_ties[p], [&](i64 j) { emit(p, j, out++); });
  }
  return offset[parts];
}

// The k largest of row[0..m) (ties: the lower index wins) into vals/ids, in ascending index order.
//
// Split the row into k strided groups (columns j, j + k, j + 2k, ...): each group's max is at least the
// smallest group max t0, so at least k entries are >= t0, and the k largest are among them. The group maxima
// are one vectorised pass; the entries >= t0 (about 4k for a random row) are collected in index order, and a
// bitwise search over their keys gives the exact k-th largest. No data-dependent branches in the hot loops.
// Columns past the last full stripe of k belong to no group: still candidates, just not part of the bound.
struct RowScratch {
  std::vector<uint32_t> group_max, keys;
  std::vector<int32_t> ids;
};

// Leaves the candidates (keys, ids in index order; n of them) in s and returns the k-th largest key of row + bias.
uint32_t row_kth_key(const float* row, const float* bias, i64 m, i64 k, RowScratch& s, i64& n) {
  s.group_max.resize(k);
  uint32_t* gm = s.group_max.data();
  for (i64 j = 0; j < k; ++j) gm[j] = float_key(row[j] + bias[j]);
  const i64 stripes = m / k;
  for (i64 st = 1; st < stripes; ++st) {
    const float* stripe = row + st * k;
    const float* stripe_bias = bias + st * k;
    i64 j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= k; j += 16) {
      const __m512 v = _mm512_add_ps(_mm512_loadu_ps(stripe + j), _mm512_loadu_ps(stripe_bias + j));
      _mm512_storeu_si512(gm + j, _mm512_max_epu32(_mm512_loadu_si512(gm + j), float_keys(v)));
    }
#endif
    for (; j < k; ++j) gm[j] = std::max(gm[j], float_key(stripe[j] + stripe_bias[j]));
  }
  const uint32_t t0 = *std::min_element(gm, gm + k);
  s.keys.resize(m + 16);
  s.ids.resize(m + 16);
  n = collect_at_least(row, bias, 0, m, t0, s.keys.data(), s.ids.data(), 0);
  const uint32_t* keys = s.keys.data();
  return kth_largest_key(k, [&](uint32_t probe) { return count_at_least(keys, n, probe); });
}

void row_topk(const float* row, const float* bias, i64 m, i64 k, float* vals, i64* ids, RowScratch& s) {
  i64 n = 0;
  const uint32_t t = row_kth_key(row, bias, m, k, s, n);
  i64 out = 0;
  take_top(s.keys.data(), n, t, k - count_above(s.keys.data(), n, t), [&](i64 j) {
    const i64 id = s.ids[j];
    ids[out] = id;
    vals[out++] = row[id] + bias[id];
  });
}

// y[0..d) = plus - minus + sum over terms t of coef(t) * src(t)[0..d), where term(t) returns (coef, src) and
// plus, minus are [d] or null (zero). With AVX-512, 128
// floats of y are held in 8 registers across all terms (loads and FMAs only; accumulating into memory would
// store y once per term). The sum runs over terms in order, so the result does not depend on threads.
// skip(t, lo, hi), if given, says that term t's src is zero on [lo, hi): the term is then left out of those
// columns (a cross-layer transcoder's decoder rows are zero before their layer; LayerSpan).
struct NeverSkip {
  bool operator()(i64, i64, i64) const { return false; }
};

template <class Term, class Skip = NeverSkip>
inline void weighted_row_sum(float* y, i64 d, i64 n_terms, Term&& term, const float* plus = nullptr,
                             const float* minus = nullptr, Skip skip = Skip{}) {
  i64 c0 = 0;
#if defined(__AVX512F__)
  const auto start = [&](i64 at, __mmask16 lanes) {
    __m512 v = plus ? _mm512_maskz_loadu_ps(lanes, plus + at) : _mm512_setzero_ps();
    return minus ? _mm512_sub_ps(v, _mm512_maskz_loadu_ps(lanes, minus + at)) : v;
  };
  for (; c0 + 128 <= d; c0 += 128) {
    __m512 a0 = start(c0, 0xFFFF), a1 = start(c0 + 16, 0xFFFF), a2 = start(c0 + 32, 0xFFFF),
           a3 = start(c0 + 48, 0xFFFF), a4 = start(c0 + 64, 0xFFFF), a5 = start(c0 + 80, 0xFFFF),
           a6 = start(c0 + 96, 0xFFFF), a7 = start(c0 + 112, 0xFFFF);
    for (i64 t = 0; t < n_terms; ++t) {
      if (skip(t, c0, c0 + 128)) continue;
      const auto [coef, src] = term(t);
      const __m512 c = _mm512_set1_ps(coef);
      const float* p = src + c0;
      a0 = _mm512_fmadd_ps(c, _mm512_loadu_ps(p), a0);
      a1 = _mm512_fmadd_ps(c, _mm512_loadu_ps(p + 16), a1);
      a2 = _mm512_fmadd_ps(c, _mm512_loadu_ps(p + 32), a2);
      a3 = _mm512_fmadd_ps(c, _mm512_loadu_ps(p + 48), a3);
      a4 = _mm512_fmadd_ps(c, _mm512_loadu_ps(p + 64), a4);
      a5 = _mm512_fmadd_ps(c, _mm512_loadu_ps(p + 80), a5);
      a6 = _mm512_fmadd_ps(c, _mm512_loadu_ps(p + 96), a6);
      a7 = _mm512_fmadd_ps(c, _mm512_loadu_ps(p + 112), a7);
    }
    float* q = y + c0;
    _mm512_storeu_ps(q, a0);
    _mm512_storeu_ps(q + 16, a1);
    _mm512_storeu_ps(q + 32, a2);
    _mm512_storeu_ps(q + 48, a3);
    _mm512_storeu_ps(q + 64, a4);
    _mm512_storeu_ps(q + 80, a5);
    _mm512_storeu_ps(q + 96, a6);
    _mm512_storeu_ps(q + 112, a7);
  }
  for (; c0 < d; c0 += 16) {
    const __mmask16 lanes = c0 + 16 <= d ? 0xFFFF : static_cast<__mmask16>((1u << (d - c0)) - 1);
    __m512 acc = start(c0, lanes);
    for (i64 t = 0; t < n_terms; ++t) {
      if (skip(t, c0, c0 + 16)) continue;
      const auto [coef, src] = term(t);
      acc = _mm512_fmadd_ps(_mm512_set1_ps(coef), _mm512_maskz_loadu_ps(lanes, src + c0), acc);
    }
    _mm512_mask_storeu_ps(y + c0, lanes, acc);
  }
#else
  for (i64 j = 0; j < d; ++j) y[j] = (plus ? plus[j] : 0.f) - (minus ? minus[j] : 0.f);
  for (i64 t = 0; t < n_terms; ++t) {
    const auto [coef, src] = term(t);
    for (i64 j = 0; j < d; ++j) y[j] += coef * src[j];
  }
#endif
}

// a . b, with four independent vector accumulators (so the FMAs do not wait on each other) under AVX-512.
inline float dot(const float* a, const float* b, i64 d) {
  i64 i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (; i + 64 <= d; i += 64) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
    s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
  }
  for (; i < d; i += 16) {
    const __mmask16 lanes = i + 16 <= d ? 0xFFFF : static_cast<__mmask16>((1u << (d - i)) - 1);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes, a + i), _mm512_maskz_loadu_ps(lanes, b + i), s0);
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#endif
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

// A cross-layer transcoder's block structure, for the sparse products below (saes/cross_layer.py): latents come
// in groups of `group` (one per layer), and row j of a table (or, for sparse_t_dense, output row j) is nonzero
// only on the columns [lo, hi) of its group g = j / group: lo = g * step, and hi = lo + step (an encoder, or a
// per-layer decoder: its layer alone) or the row's end (a CLT's decoder: its layer and every later one). The
// products then skip the columns outside; group 0 means no structure (every column).
struct LayerSpan {
  i64 group, step;
  int suffix;
  void of(i64 j, i64 d, i64& lo, i64& hi) const {
    if (group <= 0) {
      lo = 0, hi = d;
      return;
    }
    lo = std::min(d, j / group * step);
    hi = suffix ? d : std::min(d, lo + step);
  }
};

// The bfloat16 screen. approx = bf16(xb Wb) (xb = bf16(x), Wb = bf16(W); a bf16 matmul accumulating in float32)
// misses the exact pre-activation v = x . w_j + bias_j by at most
//   e = row_a[r] col_a[j] + row_b[r] col_b[j] + rel_a |a| + rel_b |bias_j|
// (native.Screen derives the terms: the inputs' rounding errors, the float32 sums, the output's rounding); so v
// lies in [a + bias - e, a + bias + e]. Exact selection then only needs exact values for the entries whose
// interval reaches the selection's threshold.
inline float bf16_value(uint16_t h) {
  const uint32_t b = static_cast<uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}

struct ScreenBounds {
  const uint16_t* approx;  // [rows, ld] bf16 bits
  i64 ld;
  const float *bias, *row_a, *col_a, *row_b, *col_b;  // [m], [rows], [m], [rows], [m]
  float rel_a, rel_b;

  float error(float a, i64 r, i64 j) const {
    return row_a[r] * col_a[j] + row_b[r] * col_b[j] + rel_a * std::fabs(a) + rel_b * std::fabs(bias[j]) + 1e-30f;
  }
  float low(i64 r, i64 j) const {
    const float a = bf16_value(approx[r * ld + j]);
    return (a + bias[j]) - error(a, r, j);
  }
  // lo[j], hi[j] of row r for j in [0, m).
  void row(i64 r, i64 m, float* lo, float* hi) const {
    const uint16_t* a_row = approx + r * ld;
    i64 j = 0;
#if defined(__AVX512F__)
    const __m512 scale_a = _mm512_set1_ps(row_a[r]), scale_b = _mm512_set1_ps(row_b[r]), ra = _mm512_set1_ps(rel_a),
                 rb = _mm512_set1_ps(rel_b), tiny = _mm512_set1_ps(1e-30f);
    for (; j + 16 <= m; j += 16) {
      const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a_row + j)));
      const __m512 a = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)), b = _mm512_loadu_ps(bias + j);
      __m512 e = _mm512_fmadd_ps(ra, _mm512_abs_ps(a), _mm512_fmadd_ps(rb, _mm512_abs_ps(b), tiny));
      e = _mm512_fmadd_ps(scale_a, _mm512_loadu_ps(col_a + j), _mm512_fmadd_ps(scale_b, _mm512_loadu_ps(col_b + j), e));
      const __m512 v = _mm512_add_ps(a, b);
      _mm512_storeu_ps(lo + j, _mm512_sub_ps(v, e));
      _mm512_storeu_ps(hi + j, _mm512_add_ps(v, e));
    }
#endif
    for (; j < m; ++j) {
      const float a = bf16_value(a_row[j]), v = a + bias[j], e = error(a, r, j);
      lo[j] = v - e;
      hi[j] = v + e;
    }
  }
};

// How many of v[0..n) have a key >= cutoff.
inline i64 count_keys_at_least(const float* v, i64 n, uint32_t cutoff) {
  i64 count = 0, i = 0;
#if defined(__AVX512F__)
  const __m512i c = _mm512_set1_epi32(static_cast<int>(cutoff));
  for (; i + 16 <= n; i += 16) count += __builtin_popcount(_mm512_cmpge_epu32_mask(float_keys(_mm512_loadu_ps(v + i)), c));
#endif
  for (; i < n; ++i) count += float_key(v[i]) >= cutoff;
  return count;
}

// Row r's screened candidates: the columns whose hi reaches `cutoff` (in index order, appended to ids with
// id_offset added), with their exact values x[r] . wt[col] + bias[col] and those values' keys. Returns how many.
template <class Index>
i64 exact_candidates(const float* bias, const float* hi, i64 m, uint32_t cutoff, const float* x_row,
                     const float* wt, i64 d, const std::vector<float>& zeros, std::vector<uint32_t>& keys,
                     std::vector<Index>& ids, std::vector<float>& vals, i64 at, i64 id_offset) {
  if (keys.size() < static_cast<size_t>(at + m + 16)) {
    keys.resize(at + m + 16);
    ids.resize(at + m + 16);
    vals.resize(at + m + 16);
  }
  const i64 n = collect_at_least(hi, zeros.data(), 0, m, cutoff, keys.data() + at, ids.data() + at, id_offset);
  for (i64 c = at; c < at + n; ++c) {
    const i64 col = static_cast<i64>(ids[c]) - id_offset;
    vals[c] = dot(x_row, wt + col * d, d) + bias[col];
    keys[c] = float_key(vals[c]);
  }
  return n;
}

}  // namespace

extern "C" {

// Each of the `rows` rows of x + bias (x's row stride `ld`; bias [m] or null) keeps its k largest entries:
// ids [rows, k] and their values (bias included), each row's entries in ascending column order.
void saelab_row_topk(const float* x, const float* bias, i64 rows, i64 m, i64 ld, i64 k, float* vals, i64* ids,
                     int threads) {
  if (k <= 0 || k > m) return;
  const std::vector<float> zeros(bias ? 0 : m, 0.f);
  if (!bias) bias = zeros.data();
  run_parts(even_bounds(rows, threads), [&](int, i64 lo, i64 hi) {
    RowScratch scratch;
    for (i64 r = lo; r < hi; ++r) row_topk(x + r * ld, bias, m, k, vals + r * k, ids + r * k, scratch);
  });
}

// The `keep` largest entries of the [n / width, width] matrix x + bias (bias [width] added to every row, or
// null), by flat index (ties: lower indices win), in ascending index order, with their values; returns keep
// (0 < keep <= n).
//
// A sample estimates a cutoff that about 1.2 keep entries reach; one pass (split across threads)
// collects those candidates in index order, and a bitwise search over their keys gives the exact keep-th
// largest. If the sample's cutoff was too high (fewer than keep candidates), it retries with lower ones,
// ending with every entry as a candidate, so the result is exact whatever the sample says.
i64 saelab_batch_topk(const float* x, const float* bias, i64 n, i64 width, i64 keep, i64* ids_out, float* vals_out,
                      int threads) {
  if (keep <= 0 || keep > n || width <= 0 || n % width) return -1;
  const std::vector<float> zeros(bias ? 0 : width, 0.f);
  if (!bias) bias = zeros.data();
  const auto value = [&](i64 i) { return x[i] + bias[i % width]; };
  // The sample: 4,096 runs of 16 consecutive entries (a cache line each) at hashed positions, so it costs
  // 4,096 cache misses rather than 65,536.
  const i64 n_runs = n / 16, n_sample = std::min<i64>(n_runs, 1 << 12) * 16;
  std::vector<uint32_t> sample(n_sample);
  for (i64 i = 0; i < n_sample / 16; ++i) {
    const i64 start = static_cast<i64>((static_cast<uint64_t>(i) * 2654435761ULL) % static_cast<uint64_t>(n_runs)) * 16;
    for (i64 j = 0; j < 16; ++j) sample[i * 16 + j] = float_key(value(start + j));
  }
  const double expected = static_cast<double>(keep) / n * n_sample;
  const std::vector<i64> bounds = even_bounds(n, threads, 16);
  const int parts = static_cast<int>(bounds.size()) - 1;
  std::vector<std::vector<uint32_t>> keys(parts);
  std::vector<std::vector<i64>> ids(parts);
  std::vector<i64> found(parts);
  i64 total = 0;
  for (int attempt = 0; total < keep; ++attempt) {
    const i64 rank = static_cast<i64>(std::ceil(expected * 1.2 * (1 << (2 * attempt)) + 4 * std::sqrt(expected) + 8));
    uint32_t cutoff = 0;  // every entry
    if (attempt < 3 && rank < n_sample) {  // (with fewer than 16 entries there is no sample: take them all)
      std::nth_element(sample.begin(), sample.begin() + rank, sample.end(), std::greater<uint32_t>());
      cutoff = sample[rank];
    }
    const double share = cutoff ? std::min(1.0, 1.5 * rank / n_sample) : 1.0;
    run_parts(bounds, [&](int part, i64 lo, i64 hi) {
      const size_t room = static_cast<size_t>(share * (hi - lo)) + 16;
      keys[part].resize(room);
      ids[part].resize(room);
      // Collect row segment by row segment (the bias restarts each row), growing the buffers if the sample
      // underestimated this part's share.
      i64 got = 0;
      for (i64 at = lo; at < hi;) {
        const i64 row_start = at - at % width, end = std::min(hi, row_start + width);
        if (keys[part].size() < static_cast<size_t>(got + (end - at) + 16)) {
          keys[part].resize(got + (end - at) + 16);
          ids[part].resize(got + (end - at) + 16);
        }
        got += collect_at_least(x + row_start, bias, at - row_start, end - row_start, cutoff, keys[part].data() + got,
                                ids[part].data() + got, row_start);
        at = end;
      }
      found[part] = got;
    });
    total = 0;
    for (int p = 0; p < parts; ++p) total += found[p];
  }
  return take_top_of_parts(keys, found, keep, [&](int p, i64 j, i64 out) {
    ids_out[out] = ids[p][j];
    vals_out[out] = value(ids[p][j]);
  });
}

// Stable counting sort of entries by group id: order[] lists entry indices group by group (entries keep their
// order within a group) and offsets[g]..offsets[g+1] is group g's slice. ids in [0, n_groups).
void saelab_group_by(const i64* ids, i64 n, i64 n_groups, i64* order, i64* offsets) {
  std::fill(offsets, offsets + n_groups + 1, 0);
  for (i64 e = 0; e < n; ++e) ++offsets[ids[e] + 1];
  for (i64 g = 0; g < n_groups; ++g) offsets[g + 1] += offsets[g];
  std::vector<i64> next(offsets, offsets + n_groups);
  for (i64 e = 0; e < n; ++e) order[next[ids[e]]++] = e;
}

// out[r] = bias + sum over row r's entries e of values[e] * table[cols[e]] - minus[r]: the decoder of a sparse Z
// (and, with minus = x, the reconstruction error). Row r's entries are row_offsets[r]..row_offsets[r+1]; table
// is [*, d], out and minus [rows, d], bias [d]; bias and minus may be null. row_sq (optional, [rows]) gets
// ||out[r]||^2.
void saelab_sparse_decode(const float* values, const i64* cols, const i64* row_offsets, i64 rows, const float* table,
                          i64 d, const float* bias, const float* minus, float* out, float* row_sq, i64 span_group,
                          i64 span_step, int span_suffix, int threads) {
  const LayerSpan span{span_group, span_step, span_suffix};
  run_parts(balanced_bounds(row_offsets, rows, threads, 1), [&](int, i64 lo, i64 hi) {
    for (i64 r = lo; r < hi; ++r) {
      const i64 first = row_offsets[r];
      float* y = out + r * d;
      weighted_row_sum(
          y, d, row_offsets[r + 1] - first,
          [&](i64 t) { return std::pair<float, const float*>(values[first + t], table + cols[first + t] * d); }, bias,
          minus ? minus + r * d : nullptr, [&](i64 t, i64 c_lo, i64 c_hi) {
            i64 s_lo, s_hi;
            span.of(cols[first + t], d, s_lo, s_hi);
            return c_hi <= s_lo || c_lo >= s_hi;
          });
      if (row_sq) row_sq[r] = dot(y, y, d);
    }
  });
}

// out[e] = dense[r] . table[cols[e]] for every entry e of row r: a dense product sampled at Z's entries.
// With a span, only the columns where table's row is nonzero are summed.
void saelab_sampled_dot(const i64* cols, const i64* row_offsets, i64 rows, const float* table, const float* dense,
                        i64 d, float* out, i64 span_group, i64 span_step, int span_suffix, int threads) {
  const LayerSpan span{span_group, span_step, span_suffix};
  run_parts(balanced_bounds(row_offsets, rows, threads, 1), [&](int, i64 lo, i64 hi) {
    for (i64 r = lo; r < hi; ++r)
      for (i64 e = row_offsets[r]; e < row_offsets[r + 1]; ++e) {
        i64 s_lo, s_hi;
        span.of(cols[e], d, s_lo, s_hi);
        out[e] = dot(dense + r * d + s_lo, table + cols[e] * d + s_lo, s_hi - s_lo);
      }
  });
}

// Z^T dense for Z given by entries grouped by column (order/col_offsets from saelab_group_by over the entries'
// columns; rows[e] is entry e's row): sum_e coef[e] dense[rows[e]] per column c, minus (sum_e coef[e]) shift if
// shift ([d]) is given, written as out[c, :] ([n_cols, d]) or, if transposed, as out[:, c] ([d, n_cols]).
// col_sums (optional, [n_cols]) gets sum_e coef[e] per column. With shift = b_dec this is (x - b_dec)^T Z, the
// encoder's weight gradient when its input is centred, without forming x - b_dec. With a span, out[c, :] is
// computed on column c's span alone and is 0 elsewhere (the weight's zero blocks, whose gradient is masked).
void saelab_sparse_t_dense(const i64* order, const i64* col_offsets, i64 n_cols, const i64* rows, const float* coef,
                           const float* dense, i64 d, const float* shift, float* out, int transposed, float* col_sums,
                           i64 span_group, i64 span_step, int span_suffix, int threads) {
  const LayerSpan span{span_group, span_step, span_suffix};
  // Transposed, 16 columns are summed into a tile and then written a row of out at a time (16 floats, one
  // cache line): out's row stride is often a multiple of 4 KiB, so writing column by column would thrash L1.
  constexpr i64 TILE = 16;
  run_parts(balanced_bounds(col_offsets, n_cols, threads, TILE), [&](int, i64 lo, i64 hi) {
    std::vector<float> tile(transposed ? TILE * d : 0);
    for (i64 c0 = lo; c0 < hi; c0 += TILE) {
      const i64 width = std::min(TILE, hi - c0);
      for (i64 c = c0; c < c0 + width; ++c) {
        const i64 first = col_offsets[c], count = col_offsets[c + 1] - first;
        float* y = transposed ? tile.data() + (c - c0) * d : out + c * d;
        i64 s_lo, s_hi;
        span.of(c, d, s_lo, s_hi);
        std::fill(y, y + s_lo, 0.f);
        std::fill(y + s_hi, y + d, 0.f);
        weighted_row_sum(y + s_lo, s_hi - s_lo, count, [&](i64 t) {
          const i64 e = order[first + t];
          return std::pair<float, const float*>(coef[e], dense + rows[e] * d + s_lo);
        });
        if (col_sums || shift) {
          float total = 0.f;
          for (i64 t = 0; t < count; ++t) total += coef[order[first + t]];
          if (col_sums) col_sums[c] = total;
          if (shift)
            for (i64 i = s_lo; i < s_hi; ++i) y[i] -= total * shift[i];
        }
      }
      if (transposed)
        for (i64 i = 0; i < d; ++i)
          for (i64 l = 0; l < width; ++l) out[i * n_cols + c0 + l] = tile[l * d + i];
    }
  });
}

// TopK through the bfloat16 screen (ScreenBounds): each row's k largest exact pre-activations
// x[r] . wt[j] + bias[j] (x [rows, d], wt = W^T [m, d]), ties to the lower index, as saelab_row_topk would give
// on the float32 matmul. Per row: L = the k-th largest lower bound (at least k exact values reach it), the
// candidates are the columns whose upper bound reaches L (no other can), and their exact values decide.
// Returns the number of candidates (whose exact value was computed) over all rows.
i64 saelab_screened_row_topk(const uint16_t* approx, i64 ld, const float* bias, const float* row_a, const float* col_a,
                             const float* row_b, const float* col_b, float rel_a, float rel_b, const float* x,
                             const float* wt, i64 d, i64 rows, i64 m, i64 k, float* vals, i64* ids, int threads) {
  if (k <= 0 || k > m) return -1;
  const ScreenBounds sb{approx, ld, bias, row_a, col_a, row_b, col_b, rel_a, rel_b};
  const std::vector<float> zeros(m, 0.f);
  const std::vector<i64> bounds = even_bounds(rows, threads);
  std::vector<i64> screened(bounds.size() - 1, 0);
  run_parts(bounds, [&](int part, i64 first, i64 last) {
    RowScratch scratch;
    std::vector<float> lo(m), hi(m), cand_vals;
    std::vector<uint32_t> cand_keys;
    std::vector<int32_t> cand_ids;
    for (i64 r = first; r < last; ++r) {
      sb.row(r, m, lo.data(), hi.data());
      i64 n_lo = 0;
      const uint32_t low_kth = row_kth_key(lo.data(), zeros.data(), m, k, scratch, n_lo);
      const i64 n = exact_candidates(bias, hi.data(), m, low_kth, x + r * d, wt, d, zeros, cand_keys, cand_ids, cand_vals,
                                     0, 0);
      screened[part] += n;
      const uint32_t* keys = cand_keys.data();
      const uint32_t t = kth_largest_key(k, [&](uint32_t probe) { return count_at_least(keys, n, probe); });
      i64 out = r * k;
      take_top(keys, n, t, k - count_above(keys, n, t), [&](i64 j) {
        ids[out] = cand_ids[j];
        vals[out++] = cand_vals[j];
      });
    }
  });
  i64 total = 0;
  for (const i64 n : screened) total += n;
  return total;
}

// BatchTopK through the bfloat16 screen: the `keep` largest exact pre-activations of the whole [rows, m] matrix
// (as saelab_batch_topk on the float32 matmul gives them: flat ids ascending, ties to the lower index).
// A sample of lower bounds suggests a cutoff c; one pass counts the lower bounds >= c and collects the entries
// whose upper bound reaches c, with exact values. If at least keep lower bounds reach c, so do keep exact
// values, and every entry of the top keep is a candidate; otherwise it retries with a lower c. Returns the
// number of candidates, or -1 if three cutoffs all failed (the caller then runs the float32 matmul).
i64 saelab_screened_batch_topk(const uint16_t* approx, i64 ld, const float* bias, const float* row_a,
                               const float* col_a, const float* row_b, const float* col_b, float rel_a, float rel_b,
                               const float* x, const float* wt, i64 d, i64 rows, i64 m, i64 keep, i64* ids_out,
                               float* vals_out, int threads) {
  const i64 n = rows * m;
  if (keep <= 0 || keep > n || m <= 0) return -1;
  const ScreenBounds sb{approx, ld, bias, row_a, col_a, row_b, col_b, rel_a, rel_b};
  const std::vector<float> zeros(m, 0.f);
  const i64 n_sample = std::min<i64>(n, 1 << 16);
  std::vector<uint32_t> sample(n_sample);
  for (i64 i = 0; i < n_sample; ++i) {
    const i64 at = static_cast<i64>((static_cast<uint64_t>(i) * 2654435761ULL) % static_cast<uint64_t>(n));
    sample[i] = float_key(sb.low(at / m, at % m));
  }
  const double expected = static_cast<double>(keep) / n * n_sample;
  const std::vector<i64> bounds = even_bounds(rows, threads);
  const int parts = static_cast<int>(bounds.size()) - 1;
  std::vector<std::vector<uint32_t>> keys(parts);
  std::vector<std::vector<i64>> ids(parts);
  std::vector<std::vector<float>> vals(parts);
  std::vector<i64> found(parts), reached(parts);
  for (int attempt = 0; attempt < 3; ++attempt) {
    const i64 rank = static_cast<i64>(std::ceil(expected * 1.1 * (1 << (2 * attempt)) + 4 * std::sqrt(expected) + 8));
    uint32_t cutoff = 0;  // every entry (a tiny matrix: the sample is smaller than the rank)
    if (rank < n_sample) {
      std::nth_element(sample.begin(), sample.begin() + rank, sample.end(), std::greater<uint32_t>());
      cutoff = sample[rank];
    }
    run_parts(bounds, [&](int part, i64 first, i64 last) {
      std::vector<float> lo(m), hi(m);
      found[part] = reached[part] = 0;
      for (i64 r = first; r < last; ++r) {
        sb.row(r, m, lo.data(), hi.data());
        reached[part] += count_keys_at_least(lo.data(), m, cutoff);
        found[part] += exact_candidates(bias, hi.data(), m, cutoff, x + r * d, wt, d, zeros, keys[part], ids[part],
                                        vals[part], found[part], r * m);
      }
    });
    i64 total_reached = 0, total_found = 0;
    for (int p = 0; p < parts; ++p) total_reached += reached[p], total_found += found[p];
    if (total_reached >= keep) {
      take_top_of_parts(keys, found, keep, [&](int p, i64 j, i64 out) {
        ids_out[out] = ids[p][j];
        vals_out[out] = vals[p][j];
      });
      return total_found;
    }
    if (cutoff == 0) break;
  }
  return -1;
}

// The screen's norms. Columns: wt = W^T ([m, d]; the exact values read its contiguous rows), w_norm[j] = |w_j|
// and w_error[j] = |w_j - float(Wb[:, j])| (Wb = bf16(W), [d, m]). Rows: x_norm[r] = |x_r| and x_error[r] =
// |x_r - float(xb[r])|. The transpose is blocked by 32 x 32 so both sides move whole cache lines.
void saelab_screen_prepare(const float* x, const uint16_t* xb, i64 rows, const float* W, const uint16_t* Wb, i64 d,
                           i64 m, float* wt, float* x_norm, float* x_error, float* w_norm, float* w_error,
                           int threads) {
  constexpr i64 BLOCK = 32;
  run_parts(even_bounds(m, threads, BLOCK), [&](int, i64 first, i64 last) {
    float sq[BLOCK], err[BLOCK];
    for (i64 j0 = first; j0 < last; j0 += BLOCK) {
      const i64 j1 = std::min(last, j0 + BLOCK);
      std::fill(sq, sq + BLOCK, 0.f);
      std::fill(err, err + BLOCK, 0.f);
      for (i64 i0 = 0; i0 < d; i0 += BLOCK) {
        const i64 i1 = std::min(d, i0 + BLOCK);
        for (i64 i = i0; i < i1; ++i)
          for (i64 j = j0; j < j1; ++j) {
            const float w = W[i * m + j], e = w - bf16_value(Wb[i * m + j]);
            wt[j * d + i] = w;
            sq[j - j0] += w * w;
            err[j - j0] += e * e;
          }
      }
      for (i64 j = j0; j < j1; ++j) {
        w_norm[j] = std::sqrt(sq[j - j0]);
        w_error[j] = std::sqrt(err[j - j0]);
      }
    }
  });
  run_parts(even_bounds(rows, threads), [&](int, i64 first, i64 last) {
    for (i64 r = first; r < last; ++r) {
      float sq = 0.f, err = 0.f;
      for (i64 i = 0; i < d; ++i) {
        const float v = x[r * d + i], e = v - bf16_value(xb[r * d + i]);
        sq += v * v;
        err += e * e;
      }
      x_norm[r] = std::sqrt(sq);
      x_error[r] = std::sqrt(err);
    }
  });
}

// JumpReLU's training forward, one pass over pre = x W ([rows, m]): with p = pre + bias and s = p - theta (per
// column), f = p where s > 0 and 0 elsewhere (written to out, [rows, m]), fired[j] = 1 if f > 0 on some row
// (else 0), and the entries within the threshold's kernel window, |s| < width, listed in row-major order as
// band_rows / band_cols with band_weights[e] = 1 - |s| / weight_scale (the triangle kernel's value). Returns
// the number of active entries (s > 0) and sets *band to the number of window entries; if that exceeds
// `capacity`, none are listed (pre is left as it was, so the caller can retry with room).
i64 saelab_jumprelu_forward(const float* pre, float* out, const float* bias, const float* theta, i64 rows, i64 m, float width,
                            float weight_scale, i64* band_rows, i64* band_cols, float* band_weights, i64 capacity,
                            i64* band, uint8_t* fired, int threads) {
  const std::vector<i64> bounds = even_bounds(rows, threads);
  const int parts = static_cast<int>(bounds.size()) - 1;
  std::vector<std::vector<int32_t>> cols(parts);
  std::vector<std::vector<float>> dist(parts);
  std::vector<std::vector<i64>> row_ends(parts);  // per row of the part: its entries end here
  std::vector<std::vector<float>> most(parts);  // per column: the part's largest f (fired if > 0)
  std::vector<i64> active(parts, 0);
  run_parts(bounds, [&](int part, i64 first, i64 last) {
    std::vector<float>& top = most[part];
    top.assign(m, 0.f);
    std::vector<int32_t>& c = cols[part];
    std::vector<float>& dv = dist[part];
    i64 count = 0;
    for (i64 r = first; r < last; ++r) {
      const float* row = pre + r * m;
      float* f_row = out + r * m;
      i64 j = 0;
#if defined(__AVX512F__)
      const __m512 w = _mm512_set1_ps(width);
      const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      for (; j + 16 <= m; j += 16) {
        const __m512 v = _mm512_add_ps(_mm512_loadu_ps(row + j), _mm512_loadu_ps(bias + j));
        const __m512 sh = _mm512_sub_ps(v, _mm512_loadu_ps(theta + j));
        const __mmask16 on = _mm512_cmp_ps_mask(sh, _mm512_setzero_ps(), _CMP_GT_OQ);
        const __m512 f = _mm512_maskz_mov_ps(on, v);
        _mm512_storeu_ps(f_row + j, f);
        _mm512_storeu_ps(top.data() + j, _mm512_max_ps(_mm512_loadu_ps(top.data() + j), f));
        count += __builtin_popcount(on);
        const __m512 d = _mm512_abs_ps(sh);
        const __mmask16 near = _mm512_cmp_ps_mask(d, w, _CMP_LT_OQ);
        if (near) {
          const size_t at = c.size(), hits = __builtin_popcount(near);
          c.resize(at + 16);
          dv.resize(at + 16);
          _mm512_storeu_si512(c.data() + at, _mm512_maskz_compress_epi32(near, _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(j)))));
          _mm512_storeu_ps(dv.data() + at, _mm512_maskz_compress_ps(near, d));
          c.resize(at + hits);
          dv.resize(at + hits);
        }
      }
#endif
      for (; j < m; ++j) {
        const float v = row[j] + bias[j], sh = v - theta[j], f = sh > 0 ? v : 0.f;
        f_row[j] = f;
        top[j] = std::max(top[j], f);
        count += sh > 0;
        if (std::fabs(sh) < width) {
          c.push_back(static_cast<int32_t>(j));
          dv.push_back(std::fabs(sh));
        }
      }
      row_ends[part].push_back(static_cast<i64>(c.size()));
    }
    active[part] = count;
  });
  i64 total_active = 0, total_band = 0;
  for (int p = 0; p < parts; ++p) total_active += active[p], total_band += static_cast<i64>(cols[p].size());
  for (i64 j = 0; j < m; ++j) {
    bool any = false;
    for (int p = 0; p < parts; ++p) any = any || most[p][j] > 0.f;
    fired[j] = any;
  }
  *band = total_band;
  if (total_band > capacity) return total_active;
  i64 at = 0;
  for (int p = 0; p < parts; ++p) {
    i64 start = 0, r = bounds[p];
    for (const i64 end : row_ends[p]) {
      for (i64 e = start; e < end; ++e, ++at) {
        band_rows[at] = r;
        band_cols[at] = cols[p][e];
        band_weights[at] = 1.f - dist[p][e] / weight_scale;
      }
      start = end;
      ++r;
    }
  }
  return total_active;
}


// The Gated SAE's elementwise work around its matmuls (fused.GatedFunction), one pass each. Work is split by
// column ranges (every column summed over rows in order by one thread), so no result depends on the threads.
// Each row segment is one plain loop over restrict pointers, which GCC vectorises: no two buffers may overlap.
namespace {

void gated_forward_segment(const float* __restrict z, const float* __restrict bias_gate, const float* __restrict gain,
                           const float* __restrict mag_shift, i64 n, float* __restrict gate, float* __restrict pi_mag,
                           float* __restrict f, float* __restrict top, float* __restrict col_sum) {
  for (i64 j = 0; j < n; ++j) {
    const float zj = z[j], g = std::max(zj + bias_gate[j], 0.f), pm = zj * gain[j] + mag_shift[j];
    const float fj = g > 0.f ? std::max(pm, 0.f) : 0.f;
    gate[j] = g;
    pi_mag[j] = pm;
    f[j] = fj;
    top[j] = std::max(top[j], fj);
    col_sum[j] += g;
  }
}

void gated_mag_segment(float* __restrict g, const float* __restrict f, const float* __restrict pi_mag,
                       const float* __restrict gain, i64 n, float* __restrict sum_g, float* __restrict sum_pg) {
  for (i64 j = 0; j < n; ++j) {
    const float gj = f[j] > 0.f ? g[j] : 0.f;
    sum_g[j] += gj;
    sum_pg[j] += pi_mag[j] * gj;
    g[j] = gj * gain[j];
  }
}

void gated_gate_segment(const float* __restrict g_gate, const float* __restrict gate, float* __restrict g_z, i64 n,
                        float* __restrict sum_h) {
  for (i64 j = 0; j < n; ++j) {
    const float h = gate[j] > 0.f ? g_gate[j] : 0.f;
    sum_h[j] += h;
    g_z[j] += h;
  }
}

}  // namespace

// Forward, from z = x W ([rows, m]): gate = ReLU(z + bias_gate), pi_mag = z gain + mag_shift, f = 1[gate > 0]
// ReLU(pi_mag), each into its own buffer; fired[j] = 1 if f > 0 on some row. Returns sum(gate), the L1 penalty's
// sum.
double saelab_gated_forward(const float* z, const float* bias_gate, const float* gain, const float* mag_shift, i64 rows,
                            i64 m, float* gate, float* pi_mag, float* f, uint8_t* fired, int threads) {
  const std::vector<i64> bounds = even_bounds(m, threads, 16);
  std::vector<double> partial(bounds.size() - 1, 0.0);
  run_parts(bounds, [&](int part, i64 lo, i64 hi) {
    std::vector<float> top(hi - lo, 0.f), col_sum(hi - lo, 0.f);
    for (i64 r = 0; r < rows; ++r) {
      const i64 o = r * m + lo;
      gated_forward_segment(z + o, bias_gate + lo, gain + lo, mag_shift + lo, hi - lo, gate + o, pi_mag + o, f + o,
                            top.data(), col_sum.data());
    }
    double total = 0.0;
    for (i64 j = lo; j < hi; ++j) {
      fired[j] = top[j - lo] > 0.f;
      total += col_sum[j - lo];
    }
    partial[part] = total;
  });
  double total = 0.0;
  for (const double p : partial) total += p;
  return total;
}

// Backward, magnitude path, in place over g ([rows, m], dL/df): g <- g 1[f > 0] (dL/dpi_mag), with its column
// sums into sum_g and those of pi_mag g into sum_pg, then g <- g gain (dL/dz from this path).
void saelab_gated_backward_mag(float* g, const float* f, const float* pi_mag, const float* gain, i64 rows, i64 m,
                               float* sum_g, float* sum_pg, int threads) {
  run_parts(even_bounds(m, threads, 16), [&](int, i64 lo, i64 hi) {
    std::fill(sum_g + lo, sum_g + hi, 0.f);
    std::fill(sum_pg + lo, sum_pg + hi, 0.f);
    for (i64 r = 0; r < rows; ++r)
      gated_mag_segment(g + r * m + lo, f + r * m + lo, pi_mag + r * m + lo, gain + lo, hi - lo, sum_g + lo,
                        sum_pg + lo);
  });
}

// Backward, gate path: h = g_gate 1[gate > 0] (dL/dpi_gate), its column sums into sum_h, and g_z += h.
void saelab_gated_backward_gate(const float* g_gate, const float* gate, float* g_z, i64 rows, i64 m, float* sum_h,
                                int threads) {
  run_parts(even_bounds(m, threads, 16), [&](int, i64 lo, i64 hi) {
    std::fill(sum_h + lo, sum_h + hi, 0.f);
    for (i64 r = 0; r < rows; ++r)
      gated_gate_segment(g_gate + r * m + lo, gate + r * m + lo, g_z + r * m + lo, hi - lo, sum_h + lo);
  });
}

}  // extern "C"
