// The ISA-independent part of the decode attention (attention.h): for each (batch, head), the dot products of every
// query against every visible key (each key read once, for all the queries), the softmax's exponentials, then the
// weighted sums of the values (each value read once per kQueryTile queries), divided by the weights' sum.
//
// Included by each ISA's translation unit inside its own namespace, after tiles.h (whose `struct Isa` it uses,
// with sum4(const V (&)[4], float*), broadcast(float), store(float*, V), kQueryTile (queries whose value sums share
// the registers) and F, I: vector_math.h's types of the ISA's width, for the exponentials).
//
// Summation order: each query's score is the same dot product whatever the other queries; its weights' sum and
// each element of its weighted values accumulate one key at a time in key order (the cache's slots, then the new
// tokens), an invisible key adding an exact zero. So a query's output depends neither on how many queries share
// the call nor on where invisible keys lie: a speculative pass's query gets the bits of the one-token step that
// sees the same keys in the same order. XLA's path sums in other orders (to fp32 rounding).

constexpr int kKeyTile = 4;  // keys whose dot products run together: independent FMA chains
constexpr int kValueVectors = 4;  // vectors of an output row accumulated together over the keys
// Keys ahead of the current tile whose lines are prefetched into L1: the hardware prefetchers stop at each page.
constexpr int64_t kPrefetchKeys = 16;

// Isa's operations on one float, for the last H % kWidth elements.
struct Lane {
  using V = float;
  static constexpr int kWidth = 1;
  NEOX_TARGET static V zero() { return 0.0f; }
  NEOX_TARGET static V load_x(const float* p) { return *p; }
  NEOX_TARGET static V broadcast(float x) { return x; }
  NEOX_TARGET static V fma(V a, V b, V acc) { return __builtin_fmaf(a, b, acc); }
  NEOX_TARGET static void store(float* p, V v) { *p = v; }
};

// d[g] = q . k[g] over h elements, for G (1 or kKeyTile) keys of h floats each, one after another from `k`: each
// key's products summed in the same order whatever G (Isa::sum4 pairs as Isa::sum).
template <int G>
NEOX_TARGET NEOX_INLINE void dots(const float* q, const float* k, int64_t h, float* d) {
  typename Isa::V acc[G];
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) acc[g] = Isa::zero();
  int64_t i = 0;
  for (; i + Isa::kWidth <= h; i += Isa::kWidth) {
    const typename Isa::V qv = Isa::load_x(q + i);
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) acc[g] = Isa::fma(qv, Isa::load_x(k + g * h + i), acc[g]);
  }
  if constexpr (G == kKeyTile) {
    Isa::sum4(acc, d);
  } else {
    d[0] = Isa::sum(acc[0]);
  }
  for (int g = 0; g < G; ++g)
    for (int64_t j = i; j < h; ++j) d[g] = __builtin_fmaf(q[j], k[g * h + j], d[g]);
}

inline bool visible(int32_t key_position, int32_t query_position) {
  return key_position >= 0 && key_position <= query_position;
}

// w[t * cols + c] = query t's q . k for key c (the cache's slots, then the new tokens), -inf where the key is not
// visible from it. Key tiles no query sees (empty slots) are not read.
NEOX_TARGET void scores(const DecodeAttention& p, int64_t b, int64_t n, float* w, int64_t cols) {
  const int64_t h = p.h;
  const int32_t* query_positions = p.query_positions + b * p.t;
  const int32_t latest = *std::max_element(query_positions, query_positions + p.t);
  constexpr float kInvisible = -__builtin_inff();
  int64_t col = 0;
  for (const KeyPart& part : p.parts) {
    const float* keys = part.k + (b * p.n + n) * part.slots * h;
    const float* values = part.v + (b * p.n + n) * part.slots * h;
    const int32_t* key_positions = part.positions + b * part.slots;
    for (int64_t s = 0; s < part.slots; s += kKeyTile) {
      const int tile = static_cast<int>(std::min<int64_t>(kKeyTile, part.slots - s));
      bool seen = false;
      for (int g = 0; g < tile; ++g) seen |= visible(key_positions[s + g], latest);
      if (seen) {  // keys ahead (past the pair's end: the next pair's, or nothing; a prefetch never faults), and
                   // this tile's values into L2 for the weighted sums after the scores
        for (int64_t byte = 0; byte < tile * h * int64_t{sizeof(float)}; byte += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(keys + (s + kPrefetchKeys) * h) + byte, 0, 3);
          __builtin_prefetch(reinterpret_cast<const char*>(values + s * h) + byte, 0, 2);
        }
      }
      for (int64_t t = 0; t < p.t; ++t) {
        float* row = w + t * cols + col + s;
        float d[kKeyTile];
        if (!seen) {
          std::fill(row, row + tile, kInvisible);
          continue;
        }
        const float* query = p.q + ((b * p.n + n) * p.t + t) * h;
        if (tile == kKeyTile) {
          dots<kKeyTile>(query, keys + s * h, h, d);
        } else {
          for (int g = 0; g < tile; ++g) {
            dots<1>(query, keys + (s + g) * h, h, d + g);
          }
        }
        for (int g = 0; g < tile; ++g)
          row[g] = visible(key_positions[s + g], query_positions[t]) ? d[g] : kInvisible;
      }
    }
    col += part.slots;
  }
}

// row = exp(row / root - max(row / root)) (the scores: q . k / fp32(sqrt H), as XLA's path divides), in place, and
// returns the sum of row (one key at a time). max(row) / root is max(row / root): division by a positive number
// rounds monotonically. A row that sees no key (all -inf) becomes all ones, as XLA's path's all-masked row: every
// score MASKED, each weight exp(0); a NaN score makes the whole row NaN, as there.
NEOX_TARGET float exponentials(float* row, int64_t cols, float root) {
  using F = typename Isa::F;
  using I = typename Isa::I;
  constexpr int64_t kLanes = sizeof(F) / sizeof(float);
  F top_lanes = F{} - __builtin_inff();
  int64_t c = 0;
  for (; c + kLanes <= cols; c += kLanes) {
    F x;
    std::memcpy(&x, row + c, sizeof(x));
    top_lanes = x > top_lanes || x != x ? x : top_lanes;  // a NaN score wins, as in XLA's max
  }
  float top = -__builtin_inff();
  for (int64_t l = 0; l < kLanes; ++l) top = top_lanes[l] > top || top_lanes[l] != top_lanes[l] ? top_lanes[l] : top;
  for (; c < cols; ++c) top = row[c] > top || row[c] != row[c] ? row[c] : top;
  if (top == -__builtin_inff()) {
    std::fill(row, row + cols, 1.0f);
    return static_cast<float>(cols);
  }
  top /= root;
  for (c = 0; c < cols; c += kLanes) {
    const int64_t lanes = std::min(kLanes, cols - c);
    F x = F{} - __builtin_inff();
    std::memcpy(&x, row + c, lanes * sizeof(float));
    x = x / root - top;
    F e = x;
    exp_nonpositive<F, I>(e);
    e = x < -88.72f ? (F{} + 0.0f) : e;  // e^x under fp32's smallest normal; -inf (invisible) - top included
    std::memcpy(row + c, &e, lanes * sizeof(float));
  }
  float total = 0.0f;
  for (c = 0; c < cols; ++c) total += row[c];
  return total;
}

// out[t0 + t, h0 .. h0 + C * Ops::kWidth) for t < TB: the weighted sum of the values over the keys, one key at a
// time (keys of zero weight for every one of the TB queries skipped), divided by each query's total.
template <class Ops, int TB, int C>
NEOX_TARGET NEOX_INLINE void weigh_values(const DecodeAttention& p, int64_t b, int64_t n, const float* w,
                                          int64_t cols, int64_t t0, int64_t h0, const float* total) {
  typename Ops::V acc[TB][C];
#pragma GCC unroll 4
  for (int t = 0; t < TB; ++t)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[t][c] = Ops::zero();
  int64_t col = 0;
  for (const KeyPart& part : p.parts) {
    const float* values = part.v + (b * p.n + n) * part.slots * p.h + h0;
    const float* weights = w + t0 * cols + col;
    for (int64_t s = 0; s < part.slots; ++s) {
      float ws[TB];
      bool weighed = false;
#pragma GCC unroll 4
      for (int t = 0; t < TB; ++t) {
        ws[t] = weights[t * cols + s];
        weighed |= ws[t] != 0.0f;
      }
      if (!weighed) continue;
      typename Ops::V vv[C];
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) vv[c] = Ops::load_x(values + s * p.h + c * Ops::kWidth);
#pragma GCC unroll 4
      for (int t = 0; t < TB; ++t) {
        const typename Ops::V wv = Ops::broadcast(ws[t]);
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) acc[t][c] = Ops::fma(wv, vv[c], acc[t][c]);
      }
    }
    col += part.slots;
  }
#pragma GCC unroll 4
  for (int t = 0; t < TB; ++t) {
    float* out = p.out + ((b * p.n + n) * p.t + t0 + t) * p.h + h0;
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) Ops::store(out + c * Ops::kWidth, acc[t][c] / Ops::broadcast(total[t0 + t]));
  }
}

// Queries t0 .. t0 + TB over the whole head dimension: whole tiles of vectors, single vectors, single floats.
template <int TB>
NEOX_TARGET void weigh_all_values(const DecodeAttention& p, int64_t b, int64_t n, const float* w, int64_t cols,
                                  int64_t t0, const float* total) {
  constexpr int64_t kTile = kValueVectors * Isa::kWidth;
  int64_t h0 = 0;
  for (; h0 + kTile <= p.h; h0 += kTile) weigh_values<Isa, TB, kValueVectors>(p, b, n, w, cols, t0, h0, total);
  for (; h0 + Isa::kWidth <= p.h; h0 += Isa::kWidth) weigh_values<Isa, TB, 1>(p, b, n, w, cols, t0, h0, total);
  for (; h0 < p.h; ++h0) weigh_values<Lane, TB, 1>(p, b, n, w, cols, t0, h0, total);
}

NEOX_TARGET void attend(const DecodeAttention& p, int64_t begin, int64_t end) {
  const int64_t cols = p.parts[0].slots + p.parts[1].slots;
  const float root = std::sqrt(static_cast<float>(p.h));  // XLA's np.sqrt(H).astype(float32): both correctly rounded
  thread_local std::vector<float> weights, totals;  // [T, cols], [T]: a task's scratch, reused by the thread
  weights.resize(p.t * cols);
  totals.resize(p.t);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / p.n, n = i % p.n;
    scores(p, b, n, weights.data(), cols);
    for (int64_t t = 0; t < p.t; ++t) totals[t] = exponentials(weights.data() + t * cols, cols, root);
    for (int64_t t0 = 0; t0 < p.t; t0 += Isa::kQueryTile) {
      switch (std::min<int64_t>(Isa::kQueryTile, p.t - t0)) {
        case 4: weigh_all_values<4>(p, b, n, weights.data(), cols, t0, totals.data()); break;
        case 3: weigh_all_values<3>(p, b, n, weights.data(), cols, t0, totals.data()); break;
        case 2: weigh_all_values<2>(p, b, n, weights.data(), cols, t0, totals.data()); break;
        default: weigh_all_values<1>(p, b, n, weights.data(), cols, t0, totals.data());
      }
    }
  }
}
