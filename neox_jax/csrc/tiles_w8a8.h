// The ISA-independent part of the activation-quantized matmul (w8a8.h): register tiles of R output channels x
// BB rows of qx, each a set of int32 dot products over k, then reduced and scaled once.
//
// Included by each ISA's w8a8 translation unit inside its own namespace, after it defines NEOX_TARGET and
// `struct Isa8`:
//   Acc, W, X            an int32 accumulator vector, a loaded weight vector and a loaded qx vector
//   kBytes               int8 values per vector
//   zero(), load_x(const int8_t*), load_w(const int8_t*), load_w_tail(const int8_t*, count) (the lanes past
//   count zero), dot(acc, w, x) (acc plus the lanes' products, exact modulo 2^32), sum(acc) (modulo 2^32)
//   kWeightOffset        what dot adds to each weight (sum_k qx * (w + offset)), corrected once per row here
// and kTileR1 (channels per one-row tile: the decode step, w8a8_stream_tile) and kTileR, kTileB (otherwise);
//   Stream               the struct of the same members (but the tiles) the one-row tile runs: Isa8 itself, or
//                        narrower vectors where they stream the weights faster
//
// Exactness: every lane sum is an integer computed modulo 2^32, and the true result sum_k qx * w fits in int32
// (w8a8.h's kMaxW8A8K), so the reduced, offset-corrected sum is exact whatever wrapped on the way. The fp32
// epilogue is the same two roundings as neox_jax.quantize's XLA formulation: float(sum) * x_scale, then * w_scale.

namespace {

template <int R, int BB>
NEOX_TARGET __attribute__((always_inline)) inline void w8a8_accumulate(const int8_t* x, int64_t ldx,
                                                                       const typename Isa8::W (&w)[R],
                                                                       typename Isa8::Acc (&acc)[R][BB]) {
  typename Isa8::X xv[BB];
#pragma GCC unroll 16
  for (int b = 0; b < BB; ++b) xv[b] = Isa8::load_x(x + b * ldx);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int b = 0; b < BB; ++b) acc[r][b] = Isa8::dot(acc[r][b], w[r], xv[b]);
}

// 2, as tiles.h's; 64 KiB ahead instead measured no better (the 50304 x 512 head, interleaved runs). Into L1 or L2
// as matmul.h's prefetch_into_l1 decides (its measurements include these tiles').
constexpr int64_t kW8A8PrefetchTiles = 2;

// acc[r][b] += the int32 dot products over whole vectors of k; returns the first i not done. The tile's weights
// are R contiguous rows, the next tiles' follow them: as the weight-only kernel does (tiles.h), prefetch
// kW8A8PrefetchTiles tiles ahead with locality kHint, spread over the steps, since the hardware prefetchers stop
// at each page (a tile of 8 channels of k = 512 is one page). Prefetching past the array never faults.
template <int R, int BB, int kHint>
NEOX_TARGET __attribute__((always_inline)) inline int64_t w8a8_whole_vectors(const W8A8& p, const int8_t* qx,
                                                                             const int8_t* w,
                                                                             typename Isa8::Acc (&acc)[R][BB]) {
  constexpr int L = Isa8::kBytes;
  typename Isa8::W wv[R];
  constexpr int64_t kStepBytes = int64_t{R} * L, kStepLines = (kStepBytes + 63) / 64;
  const int8_t* ahead = w + kW8A8PrefetchTiles * R * p.k;
  int64_t i = 0;
  for (; i + L <= p.k; i += L, ahead += kStepBytes) {
    if constexpr (L >= 16)
      for (int64_t line = 0; line < kStepLines; ++line) __builtin_prefetch(ahead + 64 * line, 0, kHint);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) wv[r] = Isa8::load_w(w + r * p.k + i);
    w8a8_accumulate<R, BB>(qx + i, p.ldq, wv, acc);
  }
  return i;
}

// y[row + b, channel + r] from the tile's int32 sums: the offset corrected, then the two fp32 scales.
template <int R, int BB>
NEOX_TARGET void w8a8_store(const W8A8& p, const int32_t (&sums)[R][BB], int64_t row, int64_t channel) {
  for (int b = 0; b < BB; ++b) {
    const uint32_t offset = static_cast<uint32_t>(Isa8::kWeightOffset) * static_cast<uint32_t>(p.qx_sum[row + b]);
    float* y = p.y + (row + b) * p.n + channel;
    for (int r = 0; r < R; ++r) {
      const int32_t dot = static_cast<int32_t>(static_cast<uint32_t>(sums[r][b]) - offset);
      y[r] = static_cast<float>(dot) * p.x_scale[row + b] * p.w_scale[channel + r];
    }
  }
}

// y[b, r] for b < BB, r < R: qx rows are ldq apart, weight rows k apart, y rows ldy apart.
template <int R, int BB>
NEOX_TARGET void w8a8_tile(const W8A8& p, const int8_t* qx, int64_t row, const int8_t* w, int64_t channel) {
  typename Isa8::Acc acc[R][BB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < BB; ++b) acc[r][b] = Isa8::zero();
  typename Isa8::W wv[R];
  const int64_t i = prefetch_into_l1(kW8A8PrefetchTiles * R * p.k, 1) ? w8a8_whole_vectors<R, BB, 3>(p, qx, w, acc)
                                                                      : w8a8_whole_vectors<R, BB, 2>(p, qx, w, acc);
  if (i < p.k) {  // the last partial vector: weights past k read as zero, qx is zero-padded past k
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) wv[r] = Isa8::load_w_tail(w + r * p.k + i, p.k - i);
    w8a8_accumulate<R, BB>(qx + i, p.ldq, wv, acc);
  }
  int32_t sums[R][BB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < BB; ++b) sums[r][b] = Isa8::sum(acc[r][b]);
  w8a8_store<R, BB>(p, sums, row, channel);
}

// One row of qx (a decode step) against R channels, reading the weights in the order they are stored: each
// channel's row from its start to its end, then the next. A single forward stream is what the hardware
// prefetchers follow best, across pages too, so no software prefetch; the tiles above read R rows side by side
// (R streams, prefetched by hand), which streamed a one-row call ~25% slower on the 2-core AMD EPYC (Zen 4).
// Each channel's sum is one dependency chain; consecutive channels' chains overlap out of order.
template <int R>
NEOX_TARGET void w8a8_stream_tile(const W8A8& p, const int8_t* w, int64_t channel) {
  using S = typename Isa8::Stream;
  static_assert(S::kWeightOffset == Isa8::kWeightOffset, "w8a8_store corrects Isa8's offset");
  constexpr int L = S::kBytes;
  const int64_t whole = p.k / L * L;
  typename S::Acc acc[R];
  for (int r = 0; r < R; ++r) acc[r] = S::zero();
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    for (int64_t i = 0; i < whole; i += L) acc[r] = S::dot(acc[r], S::load_w(w + r * p.k + i), S::load_x(p.qx + i));
  if (whole < p.k)  // the last partial vector, as w8a8_tile's
    for (int r = 0; r < R; ++r)
      acc[r] = S::dot(acc[r], S::load_w_tail(w + r * p.k + whole, p.k - whole), S::load_x(p.qx + whole));
  int32_t sums[R][1];
  for (int r = 0; r < R; ++r) sums[r][0] = S::sum(acc[r]);
  w8a8_store<R, 1>(p, sums, 0, channel);
}

// Rows [m_begin, m_end) against R channels from `channel`: full tiles of BB rows, then one smaller tile.
template <int R, int BB>
NEOX_TARGET void w8a8_channel_block(const W8A8& p, int64_t channel, int64_t m_begin, int64_t m_end) {
  const int8_t* w = p.w + channel * p.k;
  int64_t b = m_begin;
  for (; b + BB <= m_end; b += BB) w8a8_tile<R, BB>(p, p.qx + b * p.ldq, b, w, channel);
  if constexpr (BB > 1) {
    switch (m_end - b) {
      case 0: break;
#define NEOX_CASE(c) case c: if constexpr (c < BB) w8a8_tile<R, c>(p, p.qx + b * p.ldq, b, w, channel); break;
      NEOX_CASE(1) NEOX_CASE(2) NEOX_CASE(3) NEOX_CASE(4) NEOX_CASE(5) NEOX_CASE(6) NEOX_CASE(7)
#undef NEOX_CASE
    }
  }
}

// Bytes of qx rows kept in cache while a task's channels pass over them (prefill: qx is reread per channel block).
constexpr int64_t kQxBlockBytes = 128 * 1024;

template <int R, int BB>
NEOX_TARGET void w8a8_rows_tiled(const W8A8& p, int64_t n_begin, int64_t n_end) {
  static_assert(BB <= 8, "w8a8_channel_block's remainder cases go up to 7 rows");
  const int64_t m_block = std::max<int64_t>(BB, kQxBlockBytes / p.ldq / BB * BB);
  for (int64_t m0 = 0; m0 < p.m; m0 += m_block) {
    const int64_t m1 = std::min(p.m, m0 + m_block);
    int64_t n = n_begin;
    for (; n + R <= n_end; n += R) w8a8_channel_block<R, BB>(p, n, m0, m1);
    for (; n < n_end; ++n) w8a8_channel_block<1, BB>(p, n, m0, m1);
  }
}

}  // namespace

void w8a8_rows(const W8A8& p, int64_t n_begin, int64_t n_end) {
  if (p.m == 1) {
    constexpr int R = Isa8::kTileR1;
    int64_t n = n_begin;
    for (; n + R <= n_end; n += R) w8a8_stream_tile<R>(p, p.w + n * p.k, n);
    for (; n < n_end; ++n) w8a8_stream_tile<1>(p, p.w + n * p.k, n);
  } else {
    w8a8_rows_tiled<Isa8::kTileR, Isa8::kTileB>(p, n_begin, n_end);
  }
}
