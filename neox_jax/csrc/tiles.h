// The ISA-independent part of the weight-only matmul: register tiles of R output channels x BB rows of x,
// each a set of dot products over k accumulated in fp32 vectors, then reduced and scaled once.
//
// Included by each ISA's translation unit inside its own namespace, after it defines NEOX_TARGET (the
// function attribute that enables its instructions) and `struct Isa`:
//   V, kWidth             a vector of kWidth floats
//   zero(), load_x(const float*), load_w(const int8_t*), load_w(const Fp8*), load_w(const float*)
//   (kWidth elements each)
//   fma(a, b, acc), sum(v)
// and kTileR1 (channels per tile when x has one row: the decode step) and kTileR, kTileB (otherwise).
// Weight values meet x exactly (int8 and e4m3 convert to fp32 without rounding); the products accumulate in
// fp32 and the channel's scale multiplies the fp32 sum, as neox_jax.quantize's XLA path computes.

template <class W, int R, int BB>
NEOX_TARGET __attribute__((always_inline)) inline void accumulate(const float* x, int64_t ldx, const W* w,
                                                                   int64_t ldw, typename Isa::V (&acc)[R][BB]) {
  typename Isa::V xv[BB];
#pragma GCC unroll 16
  for (int b = 0; b < BB; ++b) xv[b] = Isa::load_x(x + b * ldx);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const typename Isa::V wv = Isa::load_w(w + r * ldw);
#pragma GCC unroll 16
    for (int b = 0; b < BB; ++b) acc[r][b] = Isa::fma(wv, xv[b], acc[r][b]);
  }
}

constexpr int64_t kPrefetchTiles = 2;

// acc[r][b] += sum over whole vectors i of x[b, i] * w[r, i]; returns the first i not done. The tile's weights
// are R contiguous rows; the next tiles' follow them. The hardware prefetchers do not cross a page and a decode
// tile is about one page, so the loop prefetches kPrefetchTiles tiles ahead (with locality `kHint`), spread
// over its own steps (prefetching past the array is harmless: it never faults).
template <class W, int R, int BB, int kHint>
NEOX_TARGET __attribute__((always_inline)) inline int64_t whole_vectors(const float* x, const W* w, int64_t k,
                                                                        typename Isa::V (&acc)[R][BB]) {
  constexpr int L = Isa::kWidth;
  constexpr int64_t kStepBytes = int64_t{R} * L * sizeof(W), kStepLines = (kStepBytes + 63) / 64;
  const char* ahead = reinterpret_cast<const char*>(w) + kPrefetchTiles * R * k * int64_t{sizeof(W)};
  int64_t i = 0;
  for (; i + L <= k; i += L, ahead += kStepBytes) {
    for (int64_t line = 0; line < kStepLines; ++line) __builtin_prefetch(ahead + 64 * line, 0, kHint);
    accumulate<W, R, BB>(x + i, k, w + i, k, acc);
  }
  return i;
}

// y[b, r] = scale[r] * sum_i x[b, i] * w[r, i] for b < BB, r < R; x rows and w rows are k long.
template <class W, int R, int BB>
NEOX_TARGET void tile(const float* x, const W* w, int64_t k, const float* scale, float* y, int64_t ldy) {
  constexpr int L = Isa::kWidth;
  typename Isa::V acc[R][BB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < BB; ++b) acc[r][b] = Isa::zero();
  const int64_t i = prefetch_into_l1(kPrefetchTiles * R * k * int64_t{sizeof(W)}, sizeof(W))
                        ? whole_vectors<W, R, BB, 3>(x, w, k, acc)
                        : whole_vectors<W, R, BB, 2>(x, w, k, acc);
  if (i < k) {  // the last partial vector, zero-padded (a zero weight adds nothing)
    float x_tail[BB][L] = {};
    W w_tail[R][L] = {};
    for (int b = 0; b < BB; ++b)
      for (int64_t j = i; j < k; ++j) x_tail[b][j - i] = x[b * k + j];
    for (int r = 0; r < R; ++r)
      for (int64_t j = i; j < k; ++j) w_tail[r][j - i] = w[r * k + j];
    accumulate<W, R, BB>(&x_tail[0][0], L, &w_tail[0][0], L, acc);
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < BB; ++b) y[b * ldy + r] = scale ? Isa::sum(acc[r][b]) * scale[r] : Isa::sum(acc[r][b]);
}

// Rows [m_begin, m_end) of x against R channels from `n`: full tiles of kTileB rows, then one smaller tile.
template <class W, int R, int BB>
NEOX_TARGET void channel_block(const Matmul& p, const W* w, int64_t n, int64_t m_begin, int64_t m_end) {
  const float* x = p.x + m_begin * p.k;
  float* y = p.y + m_begin * p.n + n;
  const float* scale = p.scale ? p.scale + n : nullptr;
  int64_t b = m_begin;
  for (; b + BB <= m_end; b += BB, x += BB * p.k, y += BB * p.n) tile<W, R, BB>(x, w, p.k, scale, y, p.n);
  if constexpr (BB > 1) {
    switch (m_end - b) {
      case 0: break;
#define NEOX_CASE(c) case c: if constexpr (c < BB) tile<W, R, c>(x, w, p.k, scale, y, p.n); break;
      NEOX_CASE(1) NEOX_CASE(2) NEOX_CASE(3) NEOX_CASE(4) NEOX_CASE(5) NEOX_CASE(6) NEOX_CASE(7)
#undef NEOX_CASE
    }
  }
}

// Bytes of x rows kept in cache while a task's channels pass over them (prefill: x is reread per channel block).
constexpr int64_t kXBlockBytes = 128 * 1024;

template <class W, int R, int BB>
NEOX_TARGET void rows_tiled(const Matmul& p, int64_t n_begin, int64_t n_end) {
  static_assert(BB <= 8, "channel_block's remainder cases go up to 7 rows");
  const W* w = static_cast<const W*>(p.w);
  const int64_t m_block = std::max<int64_t>(BB, kXBlockBytes / (4 * p.k) / BB * BB);
  for (int64_t m0 = 0; m0 < p.m; m0 += m_block) {
    const int64_t m1 = std::min(p.m, m0 + m_block);
    int64_t n = n_begin;
    for (; n + R <= n_end; n += R) channel_block<W, R, BB>(p, w + n * p.k, n, m0, m1);
    for (; n < n_end; ++n) channel_block<W, 1, BB>(p, w + n * p.k, n, m0, m1);
  }
}

template <class W>
NEOX_TARGET void rows_typed(const Matmul& p, int64_t n_begin, int64_t n_end) {
  if (p.m == 1) {
    rows_tiled<W, Isa::kTileR1, 1>(p, n_begin, n_end);
  } else {
    rows_tiled<W, Isa::kTileR, Isa::kTileB>(p, n_begin, n_end);
  }
}

void rows(const Matmul& p, int64_t n_begin, int64_t n_end) {
  switch (p.w_type) {
    case WeightType::kInt8: return rows_typed<int8_t>(p, n_begin, n_end);
    case WeightType::kFp8E4M3: return rows_typed<Fp8>(p, n_begin, n_end);
    case WeightType::kFp32: return rows_typed<float>(p, n_begin, n_end);
  }
}
