#include "core/strided_copy.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>

#include "core/thread_pool.h"

namespace tb {
namespace {

// Fixed-size element moves: memcpy with a constant size compiles to plain loads and
// stores, is safe for misaligned data and does not break strict aliasing.
template <int N>
struct Bytes {
  unsigned char b[N];
};

template <int U>
inline void swap_unit(unsigned char* p) {
  if constexpr (U == 2) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    v = __builtin_bswap16(v);
    std::memcpy(p, &v, 2);
  } else if constexpr (U == 4) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    v = __builtin_bswap32(v);
    std::memcpy(p, &v, 4);
  } else if constexpr (U == 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    v = __builtin_bswap64(v);
    std::memcpy(p, &v, 8);
  }
}

// Moves one element of N bytes, swapping every U-byte unit when U > 0.
template <int N, int U>
inline void move_elem(char* d, const char* s) {
  Bytes<N> v;
  std::memcpy(&v, s, N);
  if constexpr (U > 0) {
    for (int k = 0; k < N; k += U) swap_unit<U>(v.b + k);
  }
  std::memcpy(d, &v, N);
}

// A collapsed, reordered copy problem. Dimension ndim-1 is innermost.
struct Plan {
  int ndim = 0;
  int64_t itemsize = 0;
  int swap = 0;
  int kdims = 1;  // dimensions handled by the kernel (1, or 2 for a tiled transpose)
  char* dst = nullptr;
  const char* src = nullptr;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> ds{};
  std::array<int64_t, kMaxDims> ss{};
  // kernel(dst, src, shape, dst strides, src strides) over the last kdims dimensions.
  void (*kernel)(const Plan&, char*, const char*, const int64_t*, const int64_t*,
                 const int64_t*) = nullptr;
};

using Kernel = decltype(Plan::kernel);

constexpr size_t kLargeCopyBytes = size_t{1} << 19;

// Contiguous copies with ordinary (cached) vector stores, never `rep movsb`.
__attribute__((target_clones("avx2", "default"))) void copy_loop(char* __restrict d,
                                                                 const char* __restrict s,
                                                                 size_t n) {
  size_t i = 0;
  for (; i + 128 <= n; i += 128) __builtin_memcpy(d + i, s + i, 128);
  std::memcpy(d + i, s + i, n - i);
}

void k_memcpy_rows(const Plan& p, char* d, const char* s, const int64_t* shape, const int64_t*,
                   const int64_t*) {
  copy_bytes(d, s, static_cast<size_t>(shape[0] * p.itemsize));
}

// Contiguous byte swaps are common (big-endian files) and vectorize well with AVX2;
// target_clones compiles both versions and picks one at load time.
#define TB_SWAP_CONTIG(NAME, U)                                           \
  __attribute__((target_clones("avx2", "default"))) void NAME(            \
      char* __restrict d, const char* __restrict s, int64_t bytes) {      \
    for (int64_t i = 0; i < bytes; i += U) move_elem<U, U>(d + i, s + i); \
  }
TB_SWAP_CONTIG(swap_contig2, 2)
TB_SWAP_CONTIG(swap_contig4, 4)
TB_SWAP_CONTIG(swap_contig8, 8)
#undef TB_SWAP_CONTIG

// Reversal (a[::-1]) is the usual negative-stride case; it vectorizes with permutes.
#define TB_REVERSE(NAME, N)                                                \
  __attribute__((target_clones("avx2", "default"))) void NAME(             \
      char* __restrict d, const char* __restrict s, int64_t n) {           \
    for (int64_t i = 0; i < n; ++i) move_elem<N, 0>(d + i * N, s - i * N); \
  }
TB_REVERSE(reverse1, 1)
TB_REVERSE(reverse2, 2)
TB_REVERSE(reverse4, 4)
TB_REVERSE(reverse8, 8)
#undef TB_REVERSE

template <int N, int U>
void k_elem(const Plan&, char* d, const char* s, const int64_t* shape, const int64_t* ds,
            const int64_t* ss) {
  const int64_t n = shape[0], dst = ds[0], sst = ss[0];
  if (dst == N && sst == N) {
    if constexpr (U == 2) return swap_contig2(d, s, n * N);
    if constexpr (U == 4) return swap_contig4(d, s, n * N);
    if constexpr (U == 8) return swap_contig8(d, s, n * N);
    for (int64_t i = 0; i < n; ++i) move_elem<N, U>(d + i * N, s + i * N);
  } else if (U == 0 && dst == N && sst == -N) {
    if constexpr (N == 1) return reverse1(d, s, n);
    if constexpr (N == 2) return reverse2(d, s, n);
    if constexpr (N == 4) return reverse4(d, s, n);
    if constexpr (N == 8) return reverse8(d, s, n);
    for (int64_t i = 0; i < n; ++i) move_elem<N, U>(d + i * N, s - i * N);
  } else if (dst == N) {
    for (int64_t i = 0; i < n; ++i) move_elem<N, U>(d + i * N, s + i * sst);
  } else {
    for (int64_t i = 0; i < n; ++i) move_elem<N, U>(d + i * dst, s + i * sst);
  }
}

void k_elem_generic(const Plan& p, char* d, const char* s, const int64_t* shape, const int64_t* ds,
                    const int64_t* ss) {
  const size_t n = static_cast<size_t>(p.itemsize);
  for (int64_t i = 0; i < shape[0]; ++i) copy_bytes(d + i * ds[0], s + i * ss[0], n);
}

// Two dimensions (a outer, b inner) where dst is contiguous along b and src along a.
// Large ones are copied in T x T tiles through a small buffer: the tile's src rows are read whole
// into the buffer, then dst rows are written whole from it, so neither side strides through memory
// element by element. (Without the buffer, power-of-two row pitches make the tile's lines collide
// in the same cache sets.)
template <int N, int U>
void k_tile(const Plan&, char* d, const char* s, const int64_t* shape, const int64_t* ds,
            const int64_t* ss) {
  // Strides in locals: stores through char* may alias the arrays they came from, which
  // would make the compiler reload them after every element.
  const int64_t na = shape[0], nb = shape[1];
  const int64_t da = ds[0], db = ds[1], sa = ss[0], sb = ss[1];
  if (na * nb * N <= (int64_t{1} << 20)) {
    // Fits in L2: plain tiles of one cache line per row beat two passes through a buffer.
    constexpr int64_t TD = N >= 16 ? 4 : 64 / N;
    for (int64_t a0 = 0; a0 < na; a0 += TD) {
      const int64_t a1 = std::min(na, a0 + TD);
      for (int64_t b0 = 0; b0 < nb; b0 += TD) {
        const int64_t b1 = std::min(nb, b0 + TD);
        for (int64_t a = a0; a < a1; ++a) {
          char* dr = d + a * da;
          const char* sr = s + a * sa;
          for (int64_t b = b0; b < b1; ++b) move_elem<N, U>(dr + b * db, sr + b * sb);
        }
      }
    }
    return;
  }
  constexpr int64_t T = std::min<int64_t>(64, 256 / N);
  alignas(64) unsigned char buf[T][T * N];
  for (int64_t a0 = 0; a0 < na; a0 += T) {
    const int64_t ta = std::min(na - a0, T);
    for (int64_t b0 = 0; b0 < nb; b0 += T) {
      const int64_t tb = std::min(nb - b0, T);
      for (int64_t j = 0; j < tb; ++j) {
        const char* sr = s + a0 * sa + (b0 + j) * sb;
        if (sa == N) {
          std::memcpy(buf[j], sr, static_cast<size_t>(ta * N));
        } else {  // src runs backwards along a
          for (int64_t i = 0; i < ta; ++i) std::memcpy(buf[j] + i * N, sr + i * sa, N);
        }
      }
      for (int64_t i = 0; i < ta; ++i) {
        char* dr = d + (a0 + i) * da + b0 * db;
        for (int64_t j = 0; j < tb; ++j)
          move_elem<N, U>(dr + j * db, reinterpret_cast<const char*>(buf[j] + i * N));
      }
    }
  }
}

template <int N, int U>
Kernel pick(bool tiled) {
  return tiled ? &k_tile<N, U> : &k_elem<N, U>;
}

Kernel pick_kernel(int64_t itemsize, int swap, bool tiled) {
  switch (itemsize * 100 + swap) {
    case 100:
      return pick<1, 0>(tiled);
    case 200:
      return pick<2, 0>(tiled);
    case 202:
      return pick<2, 2>(tiled);
    case 400:
      return pick<4, 0>(tiled);
    case 404:
      return pick<4, 4>(tiled);
    case 402:
      return pick<4, 2>(tiled);
    case 800:
      return pick<8, 0>(tiled);
    case 808:
      return pick<8, 8>(tiled);
    case 804:
      return pick<8, 4>(tiled);
    case 1600:
      return pick<16, 0>(tiled);
    case 1608:
      return pick<16, 8>(tiled);
    case 1604:
      return pick<16, 4>(tiled);
    default:
      return nullptr;
  }
}

// Runs the plan with dimension 0 restricted to [begin, end).
void run_range(const Plan& p, int64_t begin, int64_t end) {
  std::array<int64_t, kMaxDims> shape = p.shape;
  shape[0] = end - begin;
  char* d = p.dst + begin * p.ds[0];
  const char* s = p.src + begin * p.ss[0];
  const int outer = p.ndim - p.kdims;
  if (outer == 0) {
    p.kernel(p, d, s, shape.data(), p.ds.data(), p.ss.data());
    return;
  }
  // Odometer over the outer dimensions; the kernel does the rest.
  std::array<int64_t, kMaxDims> idx{};
  const int64_t* ks = shape.data() + outer;
  const int64_t* kd = p.ds.data() + outer;
  const int64_t* kss = p.ss.data() + outer;
  for (;;) {
    p.kernel(p, d, s, ks, kd, kss);
    int k = outer - 1;
    for (; k >= 0; --k) {
      if (++idx[k] < shape[k]) {
        d += p.ds[k];
        s += p.ss[k];
        break;
      }
      d -= (shape[k] - 1) * p.ds[k];
      s -= (shape[k] - 1) * p.ss[k];
      idx[k] = 0;
    }
    if (k < 0) return;
  }
}

}  // namespace

void copy_bytes(void* dst, const void* src, size_t n) {
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  // Two cases where glibc's memcpy is slow, measured on a 2-core AMD EPYC (glibc 2.36):
  // - from 2 KiB to 512 KiB it uses `rep movsb`, which ran 15-25x slower (2-3 GB/s
  //   against 30-50) when dst was 1 to 31 bytes past src modulo 4 KiB (from 32 bytes on,
  //   memcpy was as fast as this loop or up to 1.9x faster). glibc avoids short distances
  //   on Intel CPUs itself, not on AMD. NumPy arrays allocated one after another are often
  //   16 bytes apart modulo 4 KiB;
  // - above about 512 KiB it switches to non-temporal stores, which measured about 20%
  //   slower with two threads copying at once (64-256 MiB).
  const uintptr_t gap = (reinterpret_cast<uintptr_t>(d) - reinterpret_cast<uintptr_t>(s)) & 4095;
  if (n >= kLargeCopyBytes || (n > 2048 && gap != 0 && gap < 32))
    copy_loop(d, s, n);
  else
    std::memcpy(d, s, n);
}

bool strided_copy(StridedPtr dst, StridedPtr src, const int64_t* shape, int ndim, int64_t itemsize,
                  const CopyOptions& options) {
  if (ndim < 0 || ndim > kMaxDims || itemsize <= 0) return false;
  const int swap = options.swap_unit;
  if (swap != 0 && (swap != 2 && swap != 4 && swap != 8)) return false;
  if (swap != 0 && itemsize % swap != 0) return false;

  Plan p;
  p.itemsize = itemsize;
  p.swap = swap;
  p.dst = static_cast<char*>(dst.data);
  p.src = static_cast<const char*>(src.data);

  // Drop unit dimensions; an empty shape copies nothing.
  struct Dim {
    int64_t n, ds, ss;
  };
  std::array<Dim, kMaxDims> dims;
  int n = 0;
  int64_t numel = 1;
  for (int i = 0; i < ndim; ++i) {
    if (shape[i] < 0) return false;
    if (shape[i] == 0) return true;
    numel *= shape[i];
    if (shape[i] != 1) dims[n++] = {shape[i], dst.strides[i], src.strides[i]};
  }
  // Follow the destination's layout: largest |stride| outermost, so writes stream.
  std::stable_sort(dims.begin(), dims.begin() + n, [](const Dim& a, const Dim& b) {
    const int64_t da = std::llabs(a.ds), db = std::llabs(b.ds);
    if (da != db) return da > db;
    return std::llabs(a.ss) > std::llabs(b.ss);
  });
  // Collapse an outer dimension into the inner one when both sides are contiguous across it.
  int m = 0;
  for (int i = 0; i < n; ++i) {
    dims[m++] = dims[i];
    while (m >= 2) {
      Dim& o = dims[m - 2];
      Dim& in = dims[m - 1];
      if (o.ds == in.ds * in.n && o.ss == in.ss * in.n) {
        o = {o.n * in.n, in.ds, in.ss};
        --m;
      } else {
        break;
      }
    }
  }
  if (m == 0) dims[m++] = {1, itemsize, itemsize};  // a single element

  // A transposed pair: dst contiguous along the innermost dimension, src along another.
  // Move that one next to the innermost and copy the two in tiles.
  bool tiled = false;
  const Dim& last = dims[m - 1];
  if (m >= 2 && std::llabs(last.ds) == itemsize && std::llabs(last.ss) != itemsize && last.n >= 8) {
    for (int k = m - 2; k >= 0; --k) {
      if (std::llabs(dims[k].ss) == itemsize && dims[k].n >= 8) {
        Dim t = dims[k];
        for (int j = k; j < m - 2; ++j) dims[j] = dims[j + 1];
        dims[m - 2] = t;
        tiled = true;
        break;
      }
    }
  }

  p.ndim = m;
  for (int i = 0; i < m; ++i) {
    p.shape[i] = dims[i].n;
    p.ds[i] = dims[i].ds;
    p.ss[i] = dims[i].ss;
  }
  if (tiled) {
    p.kdims = 2;
    p.kernel = pick_kernel(itemsize, swap, true);
  } else if (swap == 0 && p.ds[m - 1] == itemsize && p.ss[m - 1] == itemsize) {
    p.kernel = &k_memcpy_rows;
  } else {
    p.kernel = pick_kernel(itemsize, swap, false);
  }
  if (p.kernel == nullptr) {
    if (swap != 0) return false;  // swapping is only defined for the sizes above
    p.kdims = 1;
    p.kernel = &k_elem_generic;
  }

  // Split dimension 0 across the pool when the copy is large enough to pay for it.
  const int64_t bytes = numel * itemsize;
  int64_t tasks = 1;
  const int nthreads = get_num_threads();
  if (bytes >= options.min_parallel_bytes && p.shape[0] > 1 && nthreads > 1) {
    // Tasks of about 1 MiB (at least two per thread), claimed dynamically: when another
    // process's thread holds a core, a descheduled helper then delays the copy by at
    // most one small task instead of its whole share.
    const int64_t by_size = bytes >> 20;
    const int64_t by_threads = 2 * int64_t{nthreads};
    tasks = std::min<int64_t>(p.shape[0], std::max(by_size, by_threads));
  }
  if (tasks <= 1) {
    run_range(p, 0, p.shape[0]);
    return true;
  }
  const int64_t n0 = p.shape[0];
  parallel_for(tasks, [&](int64_t t) { run_range(p, n0 * t / tasks, n0 * (t + 1) / tasks); });
  return true;
}

}  // namespace tb
