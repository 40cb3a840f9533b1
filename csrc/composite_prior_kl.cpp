// The composite prior's KL term per user, Σ_k [log q(z|x) − log p(z)], in one pass over each row
// (CPU, float32 / float64): what recvae_fast.model._KLPerUser computes with some 30 torch ops on
// B × K tensors, each a pass over memory.
//
// For each element (u, k), with z = mu + dz, dz = eps·exp(logvar/2):
//   log q       = −(logvar + eps²)/2                           (its −log(2π)/2 is added per row below)
//   comp_c      = −(lv_c + log 2π + d_c·slope_c)/2 + log w_c,   d_c = z − m_c,   slope_c = d_c·exp(−lv_c)
//                 for the three Gaussians (m_c, lv_c): (prior_mean, prior_logvar), (old_mu, old_logvar)
//                 and (prior_mean, uniform_logvar), w_c their mixture weights
//   log p       = logsumexp_c comp_c = M + log Σ_c exp(comp_c − M),   M = max_c comp_c
//   kl[u]       = Σ_k (log q − log p) − K·log(2π)/2                     (summed in double)
// and, when the gradients are wanted, S = Σ_c r_c·slope_c with r_c = exp(comp_c − log p) (so that
// d kl/d mu = S and d kl/d logvar = (dz·S − 1)/2, taken by the caller) and dz.
//
// exp is fast_exp.h's (vectorised, under one ulp); for a positive argument x it is 1/exp(−x), which
// gives +inf past the type's range. Σ_c exp(comp_c − M) lies in [1, 3], where log is a short series
// (log_1_to_3). An infinite or NaN M is log p itself (all components −inf: −inf, as logsumexp).
// Rows are spread over OpenMP threads (torch's pool: see topk_masked.cpp) with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "checks.h"
#include "fast_exp.h"

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define KL_TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KL_TARGETS
#endif
#define AI inline __attribute__((always_inline))

template <class T>
AI T exp_any(T x) {
    return x > T(0) ? T(1) / exp_nonpositive(-x) : exp_nonpositive(x);
}

// log s for s in [1, 3]: s = 2^e·m with m in [0.75, 1.5), log m = 2·atanh(t), t = (m − 1)/(m + 1) in
// [−1/7, 1/5], by its odd series (to t^9 for float, t^23 for double: the first term left out is
// under 4e-9 and 3e-19).
AI float log_1_to_3(float s) {
    const bool halve = s >= 1.5f;
    const float m = halve ? s * 0.5f : s;
    const float t = (m - 1.0f) / (m + 1.0f), t2 = t * t;
    float p = 1.0f / 9.0f;
    p = p * t2 + 1.0f / 7.0f;
    p = p * t2 + 1.0f / 5.0f;
    p = p * t2 + 1.0f / 3.0f;
    p = p * t2 + 1.0f;
    return 2.0f * t * p + (halve ? 0.693147180559945309f : 0.0f);
}

AI double log_1_to_3(double s) {
    const bool halve = s >= 1.5;
    const double m = halve ? s * 0.5 : s;
    const double t = (m - 1.0) / (m + 1.0), t2 = t * t;
    double p = 1.0 / 23.0;
    for (int n = 21; n >= 1; n -= 2) p = p * t2 + 1.0 / double(n);
    return 2.0 * t * p + (halve ? 0.6931471805599453094 : 0.0);
}

// The prior's per-column parameters (length K), with exp(−lv) of the two fixed Gaussians once.
template <class T>
struct Fixed {
    const T *mean, *logvar, *inv_var, *uniform_logvar, *inv_uniform_var;
    T log_w[3];
};

template <class T>
AI double kl_row(const T* __restrict__ mu, const T* __restrict__ logvar, const T* __restrict__ eps,
                 const T* __restrict__ old_mu, const T* __restrict__ old_logvar, const Fixed<T>& f, int64_t K,
                 T* __restrict__ slope_out, T* __restrict__ dz_out) {
    double total = 0;
    const T* __restrict__ pm = f.mean;
    const T* __restrict__ plv = f.logvar;
    const T* __restrict__ piv = f.inv_var;
    const T* __restrict__ ulv = f.uniform_logvar;
    const T* __restrict__ uiv = f.inv_uniform_var;
    const T lw0 = f.log_w[0], lw1 = f.log_w[1], lw2 = f.log_w[2];
#pragma omp simd reduction(+ : total)
    for (int64_t k = 0; k < K; ++k) {
        const T dz = exp_any(T(0.5) * logvar[k]) * eps[k];
        const T z = mu[k] + dz;
        const T log_q = T(-0.5) * (logvar[k] + eps[k] * eps[k]);
        const T d0 = z - pm[k], s0 = d0 * piv[k];
        const T c0 = T(-0.5) * (plv[k] + d0 * s0) + lw0;
        const T d1 = z - old_mu[k], s1 = d1 * exp_any(-old_logvar[k]);
        const T c1 = T(-0.5) * (old_logvar[k] + d1 * s1) + lw1;
        const T s2 = d0 * uiv[k];
        const T c2 = T(-0.5) * (ulv[k] + d0 * s2) + lw2;
        T m = c0 > c1 ? c0 : c1;
        m = c2 > m ? c2 : m;
        const bool finite = m - m == T(0);  // false for ±inf and NaN
        const T e0 = exp_nonpositive(c0 - m), e1 = exp_nonpositive(c1 - m), e2 = exp_nonpositive(c2 - m);
        const T sum = e0 + e1 + e2;  // in [1, 3]; NaN when a component is (NaN then reaches log p)
        const T log_p = finite ? m + log_1_to_3(sum) : m;
        total += double(log_q - log_p);
        if (slope_out) {
            slope_out[k] = (e0 * s0 + e1 * s1 + e2 * s2) / sum;
            dz_out[k] = dz;
        }
    }
    return total;
}

#define KL_ROW_ARGS(T) const T* mu, const T* logvar, const T* eps, const T* old_mu, const T* old_logvar, \
                       const Fixed<T>& f, int64_t K, T* slope_out, T* dz_out
KL_TARGETS double kl_row_f32(KL_ROW_ARGS(float)) { return kl_row<float>(mu, logvar, eps, old_mu, old_logvar, f, K, slope_out, dz_out); }
KL_TARGETS double kl_row_f64(KL_ROW_ARGS(double)) { return kl_row<double>(mu, logvar, eps, old_mu, old_logvar, f, K, slope_out, dz_out); }
inline double kl_row_any(KL_ROW_ARGS(float)) { return kl_row_f32(mu, logvar, eps, old_mu, old_logvar, f, K, slope_out, dz_out); }
inline double kl_row_any(KL_ROW_ARGS(double)) { return kl_row_f64(mu, logvar, eps, old_mu, old_logvar, f, K, slope_out, dz_out); }

constexpr const char* FN = "composite_prior_kl";

[[noreturn]] void fail(const std::string& what) { checks::value_error(FN, what); }

// a's data after checking it: B × K like mu (rows ≥ 0), or 1-D with `cols` entries (rows < 0;
// `count` names them in the message).
template <class T>
T* data_of(const py::array& a, const char* name, int64_t rows, int64_t cols, bool writable, const char* count = "K") {
    checks::same_dtype(FN, a, name, py::dtype::of<T>(), "mu");
    const bool ok = rows < 0 ? checks::has_shape(a, {cols}) : checks::has_shape(a, {rows, cols});
    if (!ok) fail(std::string(name) + (rows < 0 ? std::string(" must have ") + count + " entries" : " must be B × K like mu"));
    checks::contiguous(FN, a, name);
    if (writable) checks::writable(FN, a, name);
    return static_cast<T*>(const_cast<void*>(a.data()));
}

template <class T>
void run(const py::array& mu_a, const py::array& logvar_a, const py::array& eps_a, const py::array& prior_mean_a,
         const py::array& prior_logvar_a, const py::array& old_mu_a, const py::array& old_logvar_a,
         const py::array& uniform_logvar_a, const py::sequence& log_weights, py::array& kl_a, const py::object& slope_obj,
         const py::object& dz_obj, int n_threads) {
    if (mu_a.ndim() != 2) fail("mu must be 2-D (B × K)");
    const int64_t B = mu_a.shape(0), K = mu_a.shape(1);
    const T* mu = data_of<T>(mu_a, "mu", B, K, false);
    const T* logvar = data_of<T>(logvar_a, "logvar", B, K, false);
    const T* eps = data_of<T>(eps_a, "eps", B, K, false);
    const T* old_mu = data_of<T>(old_mu_a, "old_mu", B, K, false);
    const T* old_logvar = data_of<T>(old_logvar_a, "old_logvar", B, K, false);
    const T* prior_mean = data_of<T>(prior_mean_a, "prior_mean", -1, K, false);
    const T* prior_logvar = data_of<T>(prior_logvar_a, "prior_logvar", -1, K, false);
    const T* uniform_logvar = data_of<T>(uniform_logvar_a, "uniform_logvar", -1, K, false);
    T* kl = data_of<T>(kl_a, "kl", -1, B, true, "B");
    if (slope_obj.is_none() != dz_obj.is_none()) fail("slope and dz go together");
    T* slope = slope_obj.is_none() ? nullptr : data_of<T>(py::cast<py::array>(slope_obj), "slope", B, K, true);
    T* dz = dz_obj.is_none() ? nullptr : data_of<T>(py::cast<py::array>(dz_obj), "dz", B, K, true);
    if (py::len(log_weights) != 3) fail("log_weights must have 3 entries");
    const py::array inputs[] = {mu_a, logvar_a, eps_a, prior_mean_a, prior_logvar_a, old_mu_a, old_logvar_a, uniform_logvar_a};
    for (const py::object& out : {py::object(kl_a), slope_obj, dz_obj}) {
        if (out.is_none()) continue;
        const py::array o = py::cast<py::array>(out);
        for (const py::array& in : inputs)
            if (checks::overlap(o, in)) fail("kl, slope and dz must not overlap the inputs");
    }
    Fixed<T> f{};
    const double half_log_2pi = 0.9189385332046727418;
    for (int c = 0; c < 3; ++c) f.log_w[c] = T(py::cast<double>(log_weights[c]) - half_log_2pi);  // with comp's −log(2π)/2
    std::vector<T> inv_var(static_cast<size_t>(K)), inv_uniform_var(static_cast<size_t>(K));
    py::gil_scoped_release release;
    for (int64_t k = 0; k < K; ++k) {
        inv_var[k] = T(std::exp(-double(prior_logvar[k])));
        inv_uniform_var[k] = T(std::exp(-double(uniform_logvar[k])));
    }
    f.mean = prior_mean;
    f.logvar = prior_logvar;
    f.inv_var = inv_var.data();
    f.uniform_logvar = uniform_logvar;
    f.inv_uniform_var = inv_uniform_var.data();
    const double constant = -half_log_2pi * double(K);  // log q's −log(2π)/2 per element
#if defined(_OPENMP)
#pragma omp parallel for num_threads(n_threads) schedule(static)
#endif
    for (int64_t u = 0; u < B; ++u) {
        const int64_t o = u * K;
        kl[u] = T(kl_row_any(mu + o, logvar + o, eps + o, old_mu + o, old_logvar + o, f, K, slope ? slope + o : nullptr,
                             dz ? dz + o : nullptr) + constant);
    }
}

void composite_prior_kl(py::array mu, py::array logvar, py::array eps, py::array prior_mean, py::array prior_logvar,
                        py::array old_mu, py::array old_logvar, py::array uniform_logvar, py::sequence log_weights,
                        py::array kl, py::object slope, py::object dz, int n_threads) {
    if (n_threads < 1) n_threads = 1;
    checks::dispatch_float(FN, "mu", mu.dtype(), [&](auto element) {
        run<decltype(element)>(mu, logvar, eps, prior_mean, prior_logvar, old_mu, old_logvar, uniform_logvar, log_weights,
                               kl, slope, dz, n_threads);
    });
}

}  // namespace

PYBIND11_MODULE(_composite_prior_kl, m) {
    m.doc() = "The composite prior's KL term per user, with the slope its gradients need (CPU)";
    m.def("composite_prior_kl", &composite_prior_kl, py::arg("mu"), py::arg("logvar"), py::arg("eps"),
          py::arg("prior_mean"), py::arg("prior_logvar"), py::arg("old_mu"), py::arg("old_logvar"),
          py::arg("uniform_logvar"), py::arg("log_weights"), py::arg("kl"), py::arg("slope"), py::arg("dz"),
          py::arg("n_threads"));
}
