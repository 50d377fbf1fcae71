// Fused sender-gather contractions for Geodite's receiver-sorted edges: XLA:CPU FFI handlers.
// Compiled at first use by geodite_jax/fused.py (see its docstring for the operations and their VJPs).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>
#include <sched.h>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;

static int num_threads() {
  static int n = [] {
    const char* env = std::getenv("GEODITE_KERNEL_THREADS");
    if (env && std::atoi(env) > 0) return std::atoi(env);
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return 1;
  }();
  return n;
}

// fn(lo, hi) over [0, n) split into contiguous ranges, one per thread (the caller runs the first).
template <typename Fn> static void parallel_for(int64_t n, int64_t min_per_thread, Fn&& fn) {
  int64_t t = std::min<int64_t>(num_threads(), std::max<int64_t>(1, n / std::max<int64_t>(1, min_per_thread)));
  std::vector<std::thread> workers;
  for (int64_t k = 1; k < t; ++k) workers.emplace_back([&, k] { fn(n * k / t, n * (k + 1) / t); });
  fn(0, n / t);
  for (auto& w : workers) w.join();
}

// Σ_c a[c] b[c] in 16 lane-wise partial sums, so the compiler vectorises the reduction without reassociating it.
template <typename T> static inline T lane_dot(const T* a, const T* b, int64_t f) {
  T lanes[16] = {};
  int64_t c = 0;
  for (; c + 16 <= f; c += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += a[c + l] * b[c + l];
  for (; c < f; ++c) lanes[0] += a[c] * b[c];
  T acc = 0;
  for (int l = 0; l < 16; ++l) acc += lanes[l];
  return acc;
}

// Receiver rows: the edges are sorted by receiver, row n owns edges off[n] .. off[n + 1] - 1.
// fn(n, e) for every edge e of every row n, the rows split over threads (for kernels with per-edge outputs).
template <typename Fn> static void for_row_edges(int64_t nr, const int64_t* off, Fn&& fn) {
  parallel_for(nr, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n)
      for (int64_t e = off[n]; e < off[n + 1]; ++e) fn(n, e);
  });
}

template <typename T>
static void gather_sum(const T* w, const T* x, const int32_t* snd, const int64_t* off, T* out, int64_t nr,
                       int64_t sf, int64_t f) {
  const int64_t s_rows = sf / f;
  parallel_for(nr, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      T* o = out + n * sf;
      std::fill(o, o + sf, T(0));
      for (int64_t e = off[n]; e < off[n + 1]; ++e) {
        const T* we = w + e * f;
        const T* xs = x + int64_t(snd[e]) * sf;
        for (int64_t s = 0; s < s_rows; ++s) {
          T* os = o + s * f;
          const T* xss = xs + s * f;
          for (int64_t c = 0; c < f; ++c) os[c] += we[c] * xss[c];
        }
      }
    }
  });
}

template <typename T>
static void edge_dot(const T* g, const T* x, const int32_t* snd, const int64_t* off, T* out, int64_t nr,
                     int64_t sf, int64_t f) {
  const int64_t s_rows = sf / f;
  for_row_edges(nr, off, [&](int64_t n, int64_t e) {
    const T* gn = g + n * sf;
    const T* xs = x + int64_t(snd[e]) * sf;
    T* o = out + e * f;
    std::fill(o, o + f, T(0));
    for (int64_t s = 0; s < s_rows; ++s) {
      const T* gs = gn + s * f;
      const T* xss = xs + s * f;
      for (int64_t c = 0; c < f; ++c) o[c] += gs[c] * xss[c];
    }
  });
}

// Each thread owns a contiguous range of sender rows and scans all edges for them: no races, no atomics.
template <typename T>
static void scatter_sum(const T* w, const T* g, const int32_t* snd, const int64_t* off, T* out, int64_t n_out,
                        int64_t nr, int64_t sf, int64_t f) {
  const int64_t s_rows = sf / f;
  parallel_for(n_out, 16, [&](int64_t lo, int64_t hi) {
    std::fill(out + lo * sf, out + hi * sf, T(0));
    for (int64_t n = 0; n < nr; ++n) {
      const T* gr = g + n * sf;
      for (int64_t e = off[n]; e < off[n + 1]; ++e) {
        const int64_t k = snd[e];
        if (k < lo || k >= hi) continue;
        const T* we = w + e * f;
        T* o = out + k * sf;
        for (int64_t s = 0; s < s_rows; ++s) {
          T* os = o + s * f;
          const T* gs = gr + s * f;
          for (int64_t c = 0; c < f; ++c) os[c] += we[c] * gs[c];
        }
      }
    }
  });
}

// fn(T{}) with T the C++ type of `type` (float32 or float64); any other dtype is an error, never reinterpreted.
template <typename Fn> static ffi::Error by_float_type(ffi::DataType type, Fn&& fn) {
  if (type == ffi::DataType::F32) fn(float{});
  else if (type == ffi::DataType::F64) fn(double{});
  else return ffi::Error::InvalidArgument("the fused kernels take float32 or float64 arrays");
  return ffi::Error::Success();
}

static ffi::Error check_senders(ffi::Buffer<ffi::S32> snd, int64_t n_rows) {
  const int32_t* p = snd.typed_data();
  for (int64_t e = 0, n = snd.element_count(); e < n; ++e)
    if (p[e] < 0 || p[e] >= n_rows) return ffi::Error::InvalidArgument("sender index out of range");
  return ffi::Error::Success();
}

// Row offsets [nr + 1] of the receivers [E] (sorted, each in [0, nr)), or an error naming what is wrong.
static ffi::Error row_offsets(ffi::Buffer<ffi::S32> rcv, int64_t nr, std::vector<int64_t>& off) {
  const int32_t* r = rcv.typed_data();
  off.assign(nr + 1, 0);
  int32_t prev = 0;
  for (int64_t e = 0, n = rcv.element_count(); e < n; ++e) {
    if (r[e] < prev || r[e] >= nr)
      return ffi::Error::InvalidArgument(r[e] < prev ? "receivers not sorted (the fused kernels need them sorted)"
                                                     : "receiver index out of range");
    ++off[r[e] + 1];
    prev = r[e];
  }
  for (int64_t n = 0; n < nr; ++n) off[n + 1] += off[n];
  return ffi::Error::Success();
}

// The indices of a family-1 call: senders into `n_src` rows, receivers into `nr` rows.
static ffi::Error indices(ffi::Buffer<ffi::S32> snd, int64_t n_src, ffi::Buffer<ffi::S32> rcv, int64_t nr,
                          std::vector<int64_t>& off) {
  if (rcv.element_count() != snd.element_count())
    return ffi::Error::InvalidArgument("senders and receivers differ in length");
  if (auto err = check_senders(snd, n_src); err.failure()) return err;
  return row_offsets(rcv, nr, off);
}

static ffi::Error gather_sum_impl(ffi::AnyBuffer w, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> snd,
                                  ffi::Buffer<ffi::S32> rcv, ffi::Result<ffi::AnyBuffer> out) {
  auto xd = x.dimensions();
  const int64_t f = xd.back(), sf = x.element_count() / xd.front(), nr = out->dimensions().front();
  std::vector<int64_t> off;
  if (auto err = indices(snd, xd.front(), rcv, nr, off); err.failure()) return err;
  return by_float_type(x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    gather_sum(w.typed_data<T>(), x.typed_data<T>(), snd.typed_data(), off.data(), out->typed_data<T>(), nr, sf, f);
  });
}

static ffi::Error edge_dot_impl(ffi::AnyBuffer g, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> snd,
                                ffi::Buffer<ffi::S32> rcv, ffi::Result<ffi::AnyBuffer> out) {
  auto xd = x.dimensions();
  const int64_t f = xd.back(), sf = x.element_count() / xd.front(), nr = g.dimensions().front();
  std::vector<int64_t> off;
  if (auto err = indices(snd, xd.front(), rcv, nr, off); err.failure()) return err;
  return by_float_type(x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    edge_dot(g.typed_data<T>(), x.typed_data<T>(), snd.typed_data(), off.data(), out->typed_data<T>(), nr, sf, f);
  });
}

static ffi::Error scatter_sum_impl(ffi::AnyBuffer w, ffi::AnyBuffer g, ffi::Buffer<ffi::S32> snd,
                                   ffi::Buffer<ffi::S32> rcv, ffi::Result<ffi::AnyBuffer> out) {
  auto od = out->dimensions();
  const int64_t f = od.back(), sf = out->element_count() / od.front(), nr = g.dimensions().front();
  std::vector<int64_t> off;
  if (auto err = indices(snd, od.front(), rcv, nr, off); err.failure()) return err;
  return by_float_type(g.element_type(), [&](auto tag) {
    using T = decltype(tag);
    scatter_sum(w.typed_data<T>(), g.typed_data<T>(), snd.typed_data(), off.data(), out->typed_data<T>(), od.front(),
                nr, sf, f);
  });
}

#define BIND ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::S32>>() \
    .Arg<ffi::Buffer<ffi::S32>>().Ret<ffi::AnyBuffer>()
XLA_FFI_DEFINE_HANDLER_SYMBOL(GeoditeGatherSum, gather_sum_impl, BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GeoditeEdgeDot, edge_dot_impl, BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GeoditeScatterSum, scatter_sum_impl, BIND);
// Degree projections: rows s < split form group 0, the rest group 1 (L=1 rows 0-2, L=2 rows 3-7).
// proj:    out[e, l, :] = sum_{s in l} c[e, s] x[snd[e], s, :]                     [E, 2, F]
// proj_dc: out[e, s]    = sum_f u[e, l(s), f] x[snd[e], s, f]                       [E, S]
// proj_dx: out[k, s, :] = sum_{e: snd[e] = k} c[e, s] u[e, l(s), :]                 [N, S, F]
template <typename T>
static void proj(const T* c, const T* x, const int32_t* snd, T* out, int64_t n_edges, int64_t s_rows, int64_t f,
                 int64_t split) {
  parallel_for(n_edges, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t e = lo; e < hi; ++e) {
      const T* xs = x + int64_t(snd[e]) * s_rows * f;
      T* o = out + e * 2 * f;
      std::fill(o, o + 2 * f, T(0));
      for (int64_t s = 0; s < s_rows; ++s) {
        T* ol = o + (s < split ? 0 : f);
        const T cs = c[e * s_rows + s];
        const T* xss = xs + s * f;
        for (int64_t k = 0; k < f; ++k) ol[k] += cs * xss[k];
      }
    }
  });
}

template <typename T>
static void proj_dc(const T* u, const T* x, const int32_t* snd, T* out, int64_t n_edges, int64_t s_rows, int64_t f,
                    int64_t split) {
  parallel_for(n_edges, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t e = lo; e < hi; ++e) {
      const T* xs = x + int64_t(snd[e]) * s_rows * f;
      for (int64_t s = 0; s < s_rows; ++s) {
        const T* ul = u + e * 2 * f + (s < split ? 0 : f);
        out[e * s_rows + s] = lane_dot(ul, xs + s * f, f);
      }
    }
  });
}

template <typename T>
static void proj_dx(const T* c, const T* u, const int32_t* snd, T* out, int64_t n_out, int64_t n_edges,
                    int64_t s_rows, int64_t f, int64_t split) {
  parallel_for(n_out, 16, [&](int64_t lo, int64_t hi) {
    std::fill(out + lo * s_rows * f, out + hi * s_rows * f, T(0));
    for (int64_t e = 0; e < n_edges; ++e) {
      const int64_t k = snd[e];
      if (k < lo || k >= hi) continue;
      T* o = out + k * s_rows * f;
      for (int64_t s = 0; s < s_rows; ++s) {
        const T cs = c[e * s_rows + s];
        const T* ul = u + e * 2 * f + (s < split ? 0 : f);
        T* os = o + s * f;
        for (int64_t q = 0; q < f; ++q) os[q] += cs * ul[q];
      }
    }
  });
}

static ffi::Error proj_impl(ffi::AnyBuffer c, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> snd,
                            ffi::Result<ffi::AnyBuffer> out, int64_t split) {
  auto xd = x.dimensions();
  const int64_t f = xd.back(), s_rows = x.element_count() / xd.front() / f, e = snd.element_count();
  if (auto err = check_senders(snd, xd.front()); err.failure()) return err;
  return by_float_type(x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    proj(c.typed_data<T>(), x.typed_data<T>(), snd.typed_data(), out->typed_data<T>(), e, s_rows, f, split);
  });
}

static ffi::Error proj_dc_impl(ffi::AnyBuffer u, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> snd,
                               ffi::Result<ffi::AnyBuffer> out, int64_t split) {
  auto xd = x.dimensions();
  const int64_t f = xd.back(), s_rows = x.element_count() / xd.front() / f, e = snd.element_count();
  if (auto err = check_senders(snd, xd.front()); err.failure()) return err;
  return by_float_type(x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    proj_dc(u.typed_data<T>(), x.typed_data<T>(), snd.typed_data(), out->typed_data<T>(), e, s_rows, f, split);
  });
}

static ffi::Error proj_dx_impl(ffi::AnyBuffer c, ffi::AnyBuffer u, ffi::Buffer<ffi::S32> snd,
                               ffi::Result<ffi::AnyBuffer> out, int64_t split) {
  auto od = out->dimensions();
  const int64_t f = od.back(), s_rows = out->element_count() / od.front() / f, e = snd.element_count();
  if (auto err = check_senders(snd, od.front()); err.failure()) return err;
  return by_float_type(u.element_type(), [&](auto tag) {
    using T = decltype(tag);
    proj_dx(c.typed_data<T>(), u.typed_data<T>(), snd.typed_data(), out->typed_data<T>(), od.front(), e, s_rows, f, split);
  });
}

#define BIND_PROJ ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::S32>>() \
    .Ret<ffi::AnyBuffer>().Attr<int64_t>("split")
XLA_FFI_DEFINE_HANDLER_SYMBOL(GeoditeProj, proj_impl, BIND_PROJ);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GeoditeProjDc, proj_dc_impl, BIND_PROJ);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GeoditeProjDx, proj_dx_impl, BIND_PROJ);
// Projected inner products, Q⊥·K⊥ = Q·K − Σ_L (Y_L·Q)(Y_L·K), per edge (receiver rows as above):
// out[e, :] = sum_s q[r(e), s, :] k[snd[e], s, :]
//             − sum_L (sum_{s in L} y[e, s] q[r(e), s, :]) (sum_{s in L} y[e, s] k[snd[e], s, :])
template <typename T>
static void projected_dot(const T* q, const T* k, const T* y, const int32_t* snd, const int64_t* off, T* out,
                          int64_t nr, int64_t s_rows, int64_t f, int64_t split) {
  parallel_for(nr, 16, [&](int64_t lo, int64_t hi) {
    std::vector<T> tmp(4 * f);
    T *yq1 = tmp.data(), *yk1 = yq1 + f, *yq2 = yk1 + f, *yk2 = yq2 + f;
    for (int64_t n = lo; n < hi; ++n) {
      const T* qn = q + n * s_rows * f;
      for (int64_t e = off[n]; e < off[n + 1]; ++e) {
        const T* kj = k + int64_t(snd[e]) * s_rows * f;
        const T* ye = y + e * s_rows;
        T* o = out + e * f;
        std::fill(tmp.begin(), tmp.end(), T(0));
        std::fill(o, o + f, T(0));
        for (int64_t s = 0; s < s_rows; ++s) {
          const T* qs = qn + s * f;
          const T* ks = kj + s * f;
          const T ys = ye[s];
          T* yq = s < split ? yq1 : yq2;
          T* yk = s < split ? yk1 : yk2;
          for (int64_t c = 0; c < f; ++c) {
            o[c] += qs[c] * ks[c];
            yq[c] += ys * qs[c];
            yk[c] += ys * ks[c];
          }
        }
        for (int64_t c = 0; c < f; ++c) o[c] -= yq1[c] * yk1[c] + yq2[c] * yk2[c];
      }
    }
  });
}

static ffi::Error projected_dot_impl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer y, ffi::Buffer<ffi::S32> snd,
                                     ffi::Buffer<ffi::S32> rcv, ffi::Result<ffi::AnyBuffer> out, int64_t split) {
  auto kd = k.dimensions();
  const int64_t f = kd.back(), s_rows = k.element_count() / kd.front() / f, nr = q.dimensions().front();
  std::vector<int64_t> off;
  if (auto err = indices(snd, kd.front(), rcv, nr, off); err.failure()) return err;
  return by_float_type(k.element_type(), [&](auto tag) {
    using T = decltype(tag);
    projected_dot(q.typed_data<T>(), k.typed_data<T>(), y.typed_data<T>(), snd.typed_data(), off.data(),
                  out->typed_data<T>(), nr, s_rows, f, split);
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(GeoditeProjectedDot, projected_dot_impl,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>().Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("split"));
// Its first derivatives, given the cotangent v [E, F]: dq [Nq, S, F], dk [Nk, S, F], dy [E, S]. Pass 1 runs over
// receivers (dq, dy: gathers only); pass 2 gives each thread a range of sender rows (dk: no races).
template <typename T>
static void projected_dot_bwd(const T* q, const T* k, const T* y, const T* v, const int32_t* snd, const int64_t* off,
                              T* dq, T* dk, T* dy, int64_t nr, int64_t nk, int64_t s_rows, int64_t f, int64_t split) {
  auto projections = [&](const T* qn, const T* kj, const T* ye, T* yq1, T* yk1, T* yq2, T* yk2) {
    std::fill(yq1, yq1 + 4 * f, T(0));  // the four rows are contiguous
    for (int64_t s = 0; s < s_rows; ++s) {
      T* yq = s < split ? yq1 : yq2;
      T* yk = s < split ? yk1 : yk2;
      const T ys = ye[s];
      for (int64_t c = 0; c < f; ++c) {
        yq[c] += ys * qn[s * f + c];
        yk[c] += ys * kj[s * f + c];
      }
    }
  };
  parallel_for(nr, 16, [&](int64_t lo, int64_t hi) {
    std::vector<T> tmp(4 * f);
    T *yq1 = tmp.data(), *yk1 = yq1 + f, *yq2 = yk1 + f, *yk2 = yq2 + f;
    for (int64_t n = lo; n < hi; ++n) {
      const T* qn = q + n * s_rows * f;
      T* dqn = dq + n * s_rows * f;
      std::fill(dqn, dqn + s_rows * f, T(0));
      for (int64_t e = off[n]; e < off[n + 1]; ++e) {
        const T* kj = k + int64_t(snd[e]) * s_rows * f;
        const T* ye = y + e * s_rows;
        const T* ve = v + e * f;
        projections(qn, kj, ye, yq1, yk1, yq2, yk2);
        for (int64_t s = 0; s < s_rows; ++s) {
          const T* yk = s < split ? yk1 : yk2;
          const T* yq = s < split ? yq1 : yq2;
          const T ys = ye[s];
          T lanes[16] = {};
          int64_t c = 0;
          for (; c + 16 <= f; c += 16)
            for (int l = 0; l < 16; ++l) {
              const int64_t i = c + l;
              dqn[s * f + i] += ve[i] * (kj[s * f + i] - ys * yk[i]);
              lanes[l] += ve[i] * (qn[s * f + i] * yk[i] + kj[s * f + i] * yq[i]);
            }
          for (; c < f; ++c) {
            dqn[s * f + c] += ve[c] * (kj[s * f + c] - ys * yk[c]);
            lanes[0] += ve[c] * (qn[s * f + c] * yk[c] + kj[s * f + c] * yq[c]);
          }
          T acc = 0;
          for (int l = 0; l < 16; ++l) acc += lanes[l];
          dy[e * s_rows + s] = -acc;
        }
      }
    }
  });
  parallel_for(nk, 16, [&](int64_t lo, int64_t hi) {
    std::vector<T> tmp(4 * f);
    T *yq1 = tmp.data(), *yk1 = yq1 + f, *yq2 = yk1 + f, *yk2 = yq2 + f;
    std::fill(dk + lo * s_rows * f, dk + hi * s_rows * f, T(0));
    for (int64_t n = 0; n < nr; ++n) {
      for (int64_t e = off[n]; e < off[n + 1]; ++e) {
        const int64_t kk = snd[e];
        if (kk < lo || kk >= hi) continue;
        const T* qn = q + n * s_rows * f;
        const T* kj = k + kk * s_rows * f;
        const T* ye = y + e * s_rows;
        const T* ve = v + e * f;
        projections(qn, kj, ye, yq1, yk1, yq2, yk2);
        T* dkj = dk + kk * s_rows * f;
        for (int64_t s = 0; s < s_rows; ++s) {
          const T* yq = s < split ? yq1 : yq2;
          const T ys = ye[s];
          for (int64_t c = 0; c < f; ++c) dkj[s * f + c] += ve[c] * (qn[s * f + c] - ys * yq[c]);
        }
      }
    }
  });
}

static ffi::Error projected_dot_bwd_impl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer y, ffi::AnyBuffer v,
                                         ffi::Buffer<ffi::S32> snd, ffi::Buffer<ffi::S32> rcv,
                                         ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                                         ffi::Result<ffi::AnyBuffer> dy, int64_t split) {
  auto kd = k.dimensions();
  const int64_t f = kd.back(), s_rows = k.element_count() / kd.front() / f, nr = q.dimensions().front();
  std::vector<int64_t> off;
  if (auto err = indices(snd, kd.front(), rcv, nr, off); err.failure()) return err;
  return by_float_type(k.element_type(), [&](auto tag) {
    using T = decltype(tag);
    projected_dot_bwd(q.typed_data<T>(), k.typed_data<T>(), y.typed_data<T>(), v.typed_data<T>(), snd.typed_data(),
                      off.data(), dq->typed_data<T>(), dk->typed_data<T>(), dy->typed_data<T>(), nr, kd.front(),
                      s_rows, f, split);
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(GeoditeProjectedDotBwd, projected_dot_bwd_impl,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("split"));

// Edge outer products summed per receiver (the sparse layout's Σ_j o_ij ⊗ Y_ij) and their partials, receiver
// rows as above; one closed family again (the partials of Σ_e Σ_{s,f} o_ef y_es u_{r(e)sf}):
// outer_sum: out[n, s, :] = sum_{e in row n} y[e, s] o[e, :]                 [R, S, F]
// outer_do:  out[e, :]    = sum_s y[e, s] u[r(e), s, :]                       [E, F]
// outer_dy:  out[e, s]    = sum_f u[r(e), s, f] o[e, f]                       [E, S]
template <typename T>
static void outer_sum(const T* o, const T* y, const int64_t* off, T* out, int64_t nr, int64_t s_rows, int64_t f) {
  parallel_for(nr, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      T* on = out + n * s_rows * f;
      std::fill(on, on + s_rows * f, T(0));
      for (int64_t e = off[n]; e < off[n + 1]; ++e) {
        const T* oe = o + e * f;
        const T* ye = y + e * s_rows;
        for (int64_t s = 0; s < s_rows; ++s) {
          const T ys = ye[s];
          T* os = on + s * f;
          for (int64_t c = 0; c < f; ++c) os[c] += ys * oe[c];
        }
      }
    }
  });
}

template <typename T>
static void outer_do(const T* u, const T* y, const int64_t* off, T* out, int64_t nr, int64_t s_rows, int64_t f) {
  for_row_edges(nr, off, [&](int64_t n, int64_t e) {
    const T* un = u + n * s_rows * f;
    const T* ye = y + e * s_rows;
    T* oe = out + e * f;
    std::fill(oe, oe + f, T(0));
    for (int64_t s = 0; s < s_rows; ++s) {
      const T ys = ye[s];
      const T* us = un + s * f;
      for (int64_t c = 0; c < f; ++c) oe[c] += ys * us[c];
    }
  });
}

template <typename T>
static void outer_dy(const T* u, const T* o, const int64_t* off, T* out, int64_t nr, int64_t s_rows, int64_t f) {
  for_row_edges(nr, off, [&](int64_t n, int64_t e) {
    for (int64_t s = 0; s < s_rows; ++s) out[e * s_rows + s] = lane_dot(u + (n * s_rows + s) * f, o + e * f, f);
  });
}

// Receivers [E] of edge arrays with `n_edges` rows: sorted, in [0, nr).
static ffi::Error edge_rows(ffi::Buffer<ffi::S32> rcv, int64_t n_edges, int64_t nr, std::vector<int64_t>& off) {
  if (rcv.element_count() != n_edges) return ffi::Error::InvalidArgument("receivers and edge arrays differ in length");
  return row_offsets(rcv, nr, off);
}

static ffi::Error outer_sum_impl(ffi::AnyBuffer o, ffi::AnyBuffer y, ffi::Buffer<ffi::S32> rcv,
                                 ffi::Result<ffi::AnyBuffer> out) {
  auto od = o.dimensions();
  const int64_t f = od.back(), s_rows = y.dimensions().back(), nr = out->dimensions().front();
  std::vector<int64_t> off;
  if (auto err = edge_rows(rcv, od.front(), nr, off); err.failure()) return err;
  return by_float_type(o.element_type(), [&](auto tag) {
    using T = decltype(tag);
    outer_sum(o.typed_data<T>(), y.typed_data<T>(), off.data(), out->typed_data<T>(), nr, s_rows, f);
  });
}

static ffi::Error outer_do_impl(ffi::AnyBuffer u, ffi::AnyBuffer y, ffi::Buffer<ffi::S32> rcv,
                                ffi::Result<ffi::AnyBuffer> out) {
  auto ud = u.dimensions();
  const int64_t f = ud.back(), s_rows = y.dimensions().back(), nr = ud.front();
  std::vector<int64_t> off;
  if (auto err = edge_rows(rcv, y.dimensions().front(), nr, off); err.failure()) return err;
  return by_float_type(u.element_type(), [&](auto tag) {
    using T = decltype(tag);
    outer_do(u.typed_data<T>(), y.typed_data<T>(), off.data(), out->typed_data<T>(), nr, s_rows, f);
  });
}

static ffi::Error outer_dy_impl(ffi::AnyBuffer u, ffi::AnyBuffer o, ffi::Buffer<ffi::S32> rcv,
                                ffi::Result<ffi::AnyBuffer> out) {
  auto ud = u.dimensions();
  const int64_t f = ud.back(), s_rows = out->dimensions().back(), nr = ud.front();
  std::vector<int64_t> off;
  if (auto err = edge_rows(rcv, o.dimensions().front(), nr, off); err.failure()) return err;
  return by_float_type(u.element_type(), [&](auto tag) {
    using T = decltype(tag);
    outer_dy(u.typed_data<T>(), o.typed_data<T>(), off.data(), out->typed_data<T>(), nr, s_rows, f);
  });
}

#define BIND_OUTER ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::S32>>() \
    .Ret<ffi::AnyBuffer>()
XLA_FFI_DEFINE_HANDLER_SYMBOL(GeoditeOuterSum, outer_sum_impl, BIND_OUTER);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GeoditeOuterDo, outer_do_impl, BIND_OUTER);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GeoditeOuterDy, outer_dy_impl, BIND_OUTER);
