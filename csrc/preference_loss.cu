// Fused preference-loss reductions on per-sequence log-probs: one launch per direction for a whole
// batch (the twin of prefopt/kernels/preference_loss.py, function for function; both are tested against
// prefopt/losses/formulas.py, which carries the derivations).
//
// Each loss type is one device function, written as its paper writes it and generic over the
// scalar type S. The forward evaluates it on plain numbers (S = C, the compute type); the backward
// on forward-mode dual numbers (S = Dual<C, 3>) seeded with the example's three variables, so the
// same line of math gives the value and its exact partial derivatives: no formula is written
// twice, and each elementary function carries its own derivative once (Dual below). The
// variables of example i are
//
//     x0 = chosen - ref_chosen,   x1 = rejected - ref_rejected   (an absent reference is 0),
//     x2 = margin (DPO) or nll (ORPO), else unused,
//
// so every family routes its gradients alike: d/d chosen = dL/dx0, d/d ref_chosen = -dL/dx0, ...
//
// Layout: one block of 256 threads. Thread t takes examples t, t + 256, ... in order and keeps its
// own partial sums; the block merges them in a fixed tree (warp shuffles, then the 8 warp results
// in order), so the reduced loss and the metrics are deterministic, without atomics. Preference
// batches are small (tens to thousands of pairs), so one block is also the cheapest launch. Math
// runs in float32 (float64 for float64 inputs); nothing synchronizes with the host.
#include <cfloat>
#include <cmath>
#include <type_traits>

#include "token_stats_common.cuh"

namespace prefopt {
namespace {

constexpr int kVariables = 3;
// Batch sums behind the reduced loss and the metrics (see add_to_sums).
constexpr int kSums = 10;

template <typename C>
struct Math;

template <>
struct Math<float> {
  static constexpr float kTiny = FLT_MIN;  // the smallest normal float: ORPO's clamp of log p = 0
  __device__ __forceinline__ static float exp(float x) { return expf(x); }
  __device__ __forceinline__ static float log(float x) { return logf(x); }
  __device__ __forceinline__ static float log1p(float x) { return log1pf(x); }
  __device__ __forceinline__ static float expm1(float x) { return expm1f(x); }
};

template <>
struct Math<double> {
  static constexpr double kTiny = DBL_MIN;
  __device__ __forceinline__ static double exp(double x) { return ::exp(x); }
  __device__ __forceinline__ static double log(double x) { return ::log(x); }
  __device__ __forceinline__ static double log1p(double x) { return ::log1p(x); }
  __device__ __forceinline__ static double expm1(double x) { return ::expm1(x); }
};

// Element i of a tensor of any prefopt_dtype, in the compute type C, and back. The dtype is one
// for the whole launch, so the switch costs one uniform branch per access, and one kernel per
// compute type serves every dtype. Half types go through float (explicit intrinsics: torch builds
// with __CUDA_NO_HALF_CONVERSIONS__).
template <typename C>
__device__ __forceinline__ C load_element(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case PREFOPT_FLOAT16: return Element<__half>::to_float(static_cast<const __half*>(base)[i]);
    case PREFOPT_BFLOAT16: return Element<__nv_bfloat16>::to_float(static_cast<const __nv_bfloat16*>(base)[i]);
    case PREFOPT_FLOAT64: return static_cast<C>(static_cast<const double*>(base)[i]);
    case PREFOPT_INT32: return static_cast<C>(static_cast<const int32_t*>(base)[i]);
    case PREFOPT_INT64: return static_cast<C>(static_cast<const int64_t*>(base)[i]);
    default: return static_cast<C>(static_cast<const float*>(base)[i]);
  }
}

template <typename C>
__device__ __forceinline__ void store_element(void* base, int dtype, int64_t i, C value) {
  switch (dtype) {
    case PREFOPT_FLOAT16: static_cast<__half*>(base)[i] = Element<__half>::from_float(static_cast<float>(value)); break;
    case PREFOPT_BFLOAT16:
      static_cast<__nv_bfloat16*>(base)[i] = Element<__nv_bfloat16>::from_float(static_cast<float>(value));
      break;
    case PREFOPT_FLOAT64: static_cast<double*>(base)[i] = static_cast<double>(value); break;
    default: static_cast<float*>(base)[i] = static_cast<float>(value); break;
  }
}

// A completion's token count, at least 1 (TRL's clamp: an empty completion counts as one token;
// a NaN stays NaN, as torch.clamp keeps it).
template <typename C>
__device__ __forceinline__ C token_count(const void* lengths, int dtype, int64_t i) {
  const C count = load_element<C>(lengths, dtype, i);
  return count < C(1) ? C(1) : count;
}

// ---------------------------------------------------------------------------------------------
// Forward-mode dual numbers: a value and its partial derivatives with respect to N variables.
// ---------------------------------------------------------------------------------------------

template <typename C, int N>
struct Dual {
  C value;
  C d[N];

  __device__ __forceinline__ static Dual variable(C v, int index) {
    Dual x;
    x.value = v;
#pragma unroll
    for (int k = 0; k < N; ++k) x.d[k] = k == index ? C(1) : C(0);
    return x;
  }

  // f(x) by the chain rule, from f(value) and f'(value).
  __device__ __forceinline__ Dual then(C f, C slope) const {
    Dual out;
    out.value = f;
#pragma unroll
    for (int k = 0; k < N; ++k) out.d[k] = slope * d[k];
    return out;
  }

  // Constants carry no derivative, so none is multiplied by one (inf * 0 would be NaN). Only the
  // mixed forms the losses use are defined (nvcc warns about unused friends).
  __device__ __forceinline__ friend Dual operator-(const Dual& a) { return a.then(-a.value, C(-1)); }
  __device__ __forceinline__ friend Dual operator+(const Dual& a, C b) { return a.then(a.value + b, C(1)); }
  __device__ __forceinline__ friend Dual operator-(const Dual& a, C b) { return a.then(a.value - b, C(1)); }
  __device__ __forceinline__ friend Dual operator-(C a, const Dual& b) { return b.then(a - b.value, C(-1)); }
  __device__ __forceinline__ friend Dual operator*(C a, const Dual& b) { return b.then(a * b.value, a); }
  __device__ __forceinline__ friend Dual operator/(const Dual& a, C b) { return a.then(a.value / b, C(1) / b); }

  __device__ __forceinline__ friend Dual operator+(const Dual& a, const Dual& b) {
    Dual out;
    out.value = a.value + b.value;
#pragma unroll
    for (int k = 0; k < N; ++k) out.d[k] = a.d[k] + b.d[k];
    return out;
  }
  __device__ __forceinline__ friend Dual operator-(const Dual& a, const Dual& b) {
    Dual out;
    out.value = a.value - b.value;
#pragma unroll
    for (int k = 0; k < N; ++k) out.d[k] = a.d[k] - b.d[k];
    return out;
  }
  __device__ __forceinline__ friend Dual operator*(const Dual& a, const Dual& b) {
    Dual out;
    out.value = a.value * b.value;
#pragma unroll
    for (int k = 0; k < N; ++k) out.d[k] = a.d[k] * b.value + a.value * b.d[k];
    return out;
  }
};

// The real type under a scalar type: C itself, or the C of Dual<C, N>.
template <typename S>
struct RealOf {
  using type = S;
};

template <typename C, int N>
struct RealOf<Dual<C, N>> {
  using type = C;
};

template <typename S>
using Real = typename RealOf<S>::type;

template <typename C>
__device__ __forceinline__ C value_of(C x) {
  return x;
}

template <typename C, int N>
__device__ __forceinline__ C value_of(const Dual<C, N>& x) {
  return x.value;
}

// ---------------------------------------------------------------------------------------------
// Elementary functions, stable over the whole real line: each on plain numbers, then lifted to
// dual numbers with its derivative.
// ---------------------------------------------------------------------------------------------

template <typename C>
using IfReal = std::enable_if_t<std::is_floating_point_v<C>, C>;

template <typename C>
__device__ __forceinline__ IfReal<C> sigmoid(C x) {
  const C e = Math<C>::exp(x >= C(0) ? -x : x);  // exp(-|x|) <= 1: never overflows
  return x >= C(0) ? C(1) / (C(1) + e) : e / (C(1) + e);
}

template <typename C>
__device__ __forceinline__ IfReal<C> log_sigmoid(C x) {
  return (x < C(0) ? x : C(0)) - Math<C>::log1p(Math<C>::exp(x >= C(0) ? -x : x));
}

template <typename C>
__device__ __forceinline__ IfReal<C> exponential(C x) {
  return Math<C>::exp(x);
}

// e^x - 1 without cancellation near 0.
template <typename C>
__device__ __forceinline__ IfReal<C> exp_minus_one(C x) {
  return Math<C>::expm1(x);
}

// log(1 - e^x) for x < 0, accurate on both sides of -ln 2 (Maechler): -expm1 near 0, where
// 1 - e^x cancels, and log1p far below, where e^x is tiny.
template <typename C>
__device__ __forceinline__ IfReal<C> log1mexp(C x) {
  constexpr C kMinusLn2 = C(-0.6931471805599453);
  return x > kMinusLn2 ? Math<C>::log(-Math<C>::expm1(x)) : Math<C>::log1p(-Math<C>::exp(x));
}

template <typename C>
__device__ __forceinline__ IfReal<C> relu(C x) {
  return x > C(0) ? x : C(0);
}

// min(x, bound), with torch.clamp(max=bound)'s gradient: 1 up to and including the bound.
template <typename C>
__device__ __forceinline__ IfReal<C> clamp_max(C x, C bound) {
  return x <= bound ? x : bound;
}

template <typename C, int N>
__device__ __forceinline__ Dual<C, N> sigmoid(const Dual<C, N>& x) {
  const C s = sigmoid(x.value);
  return x.then(s, s * sigmoid(-x.value));
}

template <typename C, int N>
__device__ __forceinline__ Dual<C, N> log_sigmoid(const Dual<C, N>& x) {
  return x.then(log_sigmoid(x.value), sigmoid(-x.value));
}

template <typename C, int N>
__device__ __forceinline__ Dual<C, N> exponential(const Dual<C, N>& x) {
  const C e = exponential(x.value);
  return x.then(e, e);
}

template <typename C, int N>
__device__ __forceinline__ Dual<C, N> exp_minus_one(const Dual<C, N>& x) {
  return x.then(exp_minus_one(x.value), exponential(x.value));
}

template <typename C, int N>
__device__ __forceinline__ Dual<C, N> log1mexp(const Dual<C, N>& x) {
  // d/dx log(1 - e^x) = e^x / (e^x - 1), finite for every x < 0.
  return x.then(log1mexp(x.value), Math<C>::exp(x.value) / Math<C>::expm1(x.value));
}

template <typename C, int N>
__device__ __forceinline__ Dual<C, N> relu(const Dual<C, N>& x) {
  return x.then(relu(x.value), x.value > C(0) ? C(1) : C(0));
}

template <typename C, int N>
__device__ __forceinline__ Dual<C, N> clamp_max(const Dual<C, N>& x, C bound) {
  return x.then(clamp_max(x.value, bound), x.value <= bound ? C(1) : C(0));
}

template <typename S>
__device__ __forceinline__ S square(const S& x) {
  return x * x;
}

// ---------------------------------------------------------------------------------------------
// The loss types, one function each. c and r are the chosen and rejected log-ratios (policy minus
// reference log-prob; the log-probs themselves for the reference-free losses), m the target
// margin, and z = beta (c - r) - m.
// ---------------------------------------------------------------------------------------------

// DPO (Rafailov et al. 2023); with eps > 0, conservative DPO: labels flipped at rate eps.
template <typename S, typename C>
__device__ __forceinline__ S smoothed_logistic(const S& z, C eps) {
  return -(C(1) - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
}

// rDPO (Chowdhury et al. 2024, eq. 6): unbiased under labels flipped with probability eps < 1/2.
template <typename S, typename C>
__device__ __forceinline__ S robust_logistic(const S& z, C eps) {
  return (-(C(1) - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (C(1) - C(2) * eps);
}

// SLiC's hinge loss.
template <typename S>
__device__ __forceinline__ S hinge(const S& z) {
  return relu(Real<S>(1) - z);
}

// IPO (Azar et al. 2023): (h - 1/(2 beta))^2 on the difference of log-ratios h; a margin m moves
// the target to (m + 1/2) / beta, i.e. the margin sits inside beta h.
template <typename S, typename M, typename C>
__device__ __forceinline__ S ipo(const S& h, const M& m, C beta) {
  return square(h - (m + C(0.5)) / beta);
}

// EXO (Ji et al. 2024), pairwise: KL(p_theta || p_label) over {chosen, rejected} with
// p_theta = (sigma(z), sigma(-z)) and p_label = (1 - eps, eps).
template <typename S, typename C>
__device__ __forceinline__ S exo_pair(const S& z, C eps) {
  return sigmoid(z) * (log_sigmoid(z) - Math<C>::log1p(-eps)) + sigmoid(-z) * (log_sigmoid(-z) - Math<C>::log(eps));
}

// NCA (Chen et al. 2024), pairwise, on the rewards beta c and beta r.
template <typename S, typename C>
__device__ __forceinline__ S nca_pair(const S& chosen_reward, const S& rejected_reward) {
  return -log_sigmoid(chosen_reward) - C(0.5) * log_sigmoid(-chosen_reward) - C(0.5) * log_sigmoid(-rejected_reward);
}

// BCO (Jung et al. 2024), pairwise, around the reward shift delta.
template <typename S, typename C>
__device__ __forceinline__ S bco_pair(const S& chosen_reward, const S& rejected_reward, C delta) {
  return -log_sigmoid(chosen_reward - delta) - log_sigmoid(delta - rejected_reward);
}

// SPPO (Wu et al. 2024) with hard labels: each log-ratio pulled to +-1/(2 beta).
template <typename S, typename C>
__device__ __forceinline__ S sppo_hard(const S& c, const S& r, C beta) {
  return square(c - C(0.5) / beta) + square(r + C(0.5) / beta);
}

// APO-zero (D'Oosterlinck et al. 2024): 1 - sigma(beta c) + sigma(beta r), the first term written
// sigma(-beta c), which keeps its precision where sigma(beta c) is close to 1.
template <typename S>
__device__ __forceinline__ S apo_zero(const S& chosen_reward, const S& rejected_reward) {
  return sigmoid(-chosen_reward) + sigmoid(rejected_reward);
}

// APO-down: sigma(beta c) + 1 - sigma(z), the second term written sigma(-z).
template <typename S>
__device__ __forceinline__ S apo_down(const S& chosen_reward, const S& z) {
  return sigmoid(chosen_reward) + sigmoid(-z);
}

// DiscoPOP (Lu et al. 2024): (1 - sigma(z/tau)) (-log sigma(z)) + sigma(z/tau) exp(-z). The
// second product is formed in log space: exp(-z) overflows long before sigma(z/tau) underflows.
template <typename S, typename C>
__device__ __forceinline__ S discopop(const S& z, C tau) {
  return -log_sigmoid(z) * sigmoid(-z / tau) + exponential(log_sigmoid(z / tau) - z);
}

// DPO on log-ratios normalized by completion length.
template <typename S>
__device__ __forceinline__ S sigmoid_norm(const S& z_normalized) {
  return -log_sigmoid(z_normalized);
}

// The f-divergence score f'(e^x) of a log-ratio x (prefopt/losses/formulas.py, f_divergence_scores,
// derives each): 1 forward KL, 2 Jensen-Shannon, 3 alpha-divergence with its exponent clamped at 80;
// 0, reverse KL, is x itself.
template <typename S, typename C>
__device__ __forceinline__ S f_divergence_score(const S& x, int f_divergence, C coef) {
  switch (f_divergence) {
    case 1: return -exp_minus_one(-x);
    case 2: return log_sigmoid(x) + C(0.6931471805599453);
    case 3: return exp_minus_one(clamp_max((coef - C(1)) * x, C(80))) / (coef - C(1));
    default: return x;
  }
}

// AlphaPO (Gupta et al. 2025): the reward (1 - p^(-alpha)) / alpha of p = e^x.
template <typename S, typename C>
__device__ __forceinline__ S alphapo_reward(const S& x, C alpha) {
  return -exp_minus_one(-alpha * x) / alpha;
}

// KTO (Ethayarajh et al. 2024): 1 - sigma(s) for a desirable example, 1 - sigma(-s) otherwise,
// s = beta (r - kl); written sigma(-s) and sigma(s), without the cancellation of 1 - sigma.
template <typename S, typename C>
__device__ __forceinline__ S kto(const S& s, bool desirable, C weight) {
  return weight * sigmoid(desirable ? -s : s);
}

// The log-odds log(p / (1 - p)) of p = e^x, with log p = 0 (infinite odds) clamped to the
// -tiny, the negative normal number nearest 0, where only the plain x term keeps a gradient.
template <typename S, typename C>
__device__ __forceinline__ S log_odds(const S& x, C tiny) {
  return x - log1mexp(clamp_max(x, -tiny));
}

// ---------------------------------------------------------------------------------------------
// The families: the loss of one example from its variables x (see the top of the file).
// ---------------------------------------------------------------------------------------------

// How many metrics each family writes (prefopt._codes.METRIC_NAMES).
__host__ __device__ __forceinline__ int metric_count(int family) {
  switch (family) {
    case PREFOPT_FAMILY_DPO:
    case PREFOPT_FAMILY_CPO: return 6;
    case PREFOPT_FAMILY_KTO: return 7;
    case PREFOPT_FAMILY_ORPO: return 9;
    default: return 0;
  }
}

struct LossParams {
  prefopt_preference_inputs in;
  prefopt_preference_config config;
  int dtype;  // of every floating input and output
  int64_t n;
  // Forward outputs.
  void* loss;
  void* losses;
  void* chosen_rewards;
  void* rejected_rewards;
  void* metrics;
  // Backward inputs and outputs.
  const void* grad_loss;
  const void* grad_losses;
  void* grad_chosen;
  void* grad_rejected;
  void* grad_ref_chosen;
  void* grad_ref_rejected;
  void* grad_margin;
  void* grad_nll;
};

// The constants of a launch in the compute type.
template <typename C>
struct Constants {
  C beta, eps, tau, gamma, offset, desirable_weight, undesirable_weight, f_coef, alpha;
  C nll_weight;    // CPO: cpo_alpha * n, the NLL term's weight before division by total_tokens
  C total_tokens;  // CPO: chosen tokens in the batch (with a nonzero cpo_alpha)
};

template <typename C>
struct Example {
  C x[kVariables];
  C policy_chosen;    // the log-prob inputs themselves, for the logps/* metrics
  C policy_rejected;
  C chosen_length;    // token counts, >= 1 (1 where not given)
  C rejected_length;
  C pair_weight;      // WPO's weight of the pair's loss, 1 where not given
  bool desirable;
};

// One example's loss (with its derivatives when S is a Dual), its rewards, and ORPO's extra
// per-example metrics.
template <typename S>
struct Scored {
  S loss;
  Real<S> chosen_reward;
  Real<S> rejected_reward;
  Real<S> extras[3];
};

template <typename S, typename C>
__device__ __forceinline__ S dpo_type_loss(int type, const LossParams& p, const Constants<C>& k, const Example<C>& e,
                                          const S& c, const S& r, const S& m) {
  const C beta = k.beta;
  const S z = beta * (c - r) - m;
  switch (type) {
    case PREFOPT_LOSS_SIGMOID: return smoothed_logistic(z, k.eps);
    case PREFOPT_LOSS_ROBUST: return robust_logistic(z, k.eps);
    case PREFOPT_LOSS_HINGE: return hinge(z);
    // On sums (the paper's), or per token when lengths are given (TRL's convention).
    case PREFOPT_LOSS_IPO:
      return p.in.chosen_lengths ? ipo(c / e.chosen_length - r / e.rejected_length, m, beta) : ipo(c - r, m, beta);
    case PREFOPT_LOSS_EXO_PAIR: return exo_pair(z, k.eps);
    case PREFOPT_LOSS_NCA_PAIR: return nca_pair<S, C>(beta * c, beta * r);
    case PREFOPT_LOSS_BCO_PAIR: return bco_pair(beta * c, beta * r, k.offset);
    case PREFOPT_LOSS_SPPO_HARD: return sppo_hard(c, r, beta);
    case PREFOPT_LOSS_APO_ZERO: return apo_zero(beta * c, beta * r);
    case PREFOPT_LOSS_APO_DOWN: return apo_down(beta * c, z);
    case PREFOPT_LOSS_DISCOPOP: return discopop(z, k.tau);
    default: return sigmoid_norm(beta * (c / e.chosen_length - r / e.rejected_length) - m);
  }
}

// The weighted sum of the listed types, summed in list order as prefopt.losses.dpo_loss does.
template <typename S, typename C>
__device__ __forceinline__ Scored<S> score_dpo(const LossParams& p, const Constants<C>& k, const Example<C>& e,
                                               const S (&x)[kVariables]) {
  const int* types = p.config.loss_types;
  const double* weights = p.config.loss_weights;
  // Under an f-divergence the types see the scores of the log-ratios (only the types that allow
  // one reach here with it); the rewards keep the log-ratios.
  const S c = f_divergence_score(x[0], p.config.f_divergence, k.f_coef);
  const S r = f_divergence_score(x[1], p.config.f_divergence, k.f_coef);
  S loss = C(weights[0]) * dpo_type_loss(types[0], p, k, e, c, r, x[2]);
  for (int t = 1; t < p.config.num_loss_types; ++t) {
    loss = loss + C(weights[t]) * dpo_type_loss(types[t], p, k, e, c, r, x[2]);
  }
  return {e.pair_weight * loss, k.beta * value_of(x[0]), k.beta * value_of(x[1]), {C(0), C(0), C(0)}};
}

// The reference point is kl for "kto" and 0 for "apo_zero_unpaired".
template <typename S, typename C>
__device__ __forceinline__ Scored<S> score_kto(const LossParams& p, const Constants<C>& k, const Example<C>& e,
                                               const S (&x)[kVariables]) {
  const C reference_point = p.config.loss_types[0] == PREFOPT_LOSS_KTO ? k.offset : C(0);
  const S loss = kto(k.beta * (x[0] - reference_point), e.desirable,
                     e.desirable ? k.desirable_weight : k.undesirable_weight);
  // A reward counts for its own class and is 0 in the other's vector.
  const C reward = k.beta * value_of(x[0]);
  return {loss, e.desirable ? reward : C(0), e.desirable ? C(0) : reward, {C(0), C(0), C(0)}};
}

// CPO (Xu et al. 2024) and SimPO (Meng et al. 2024): the DPO types on policy log-probs (per-token
// averages for ipo and simpo), SimPO's gamma as the margin, plus CPO's NLL of the chosen, a token
// mean over the batch.
template <typename S, typename C>
__device__ __forceinline__ Scored<S> score_cpo(const LossParams& p, const Constants<C>& k, const Example<C>& e,
                                               const S (&x)[kVariables]) {
  const int type = p.config.loss_types[0];
  S c = x[0];
  S r = x[1];
  if (type == PREFOPT_LOSS_IPO || type == PREFOPT_LOSS_SIMPO) {
    c = c / e.chosen_length;
    r = r / e.rejected_length;
  }
  if (p.config.alpha != 0.0) {
    c = alphapo_reward(c, k.alpha);
    r = alphapo_reward(r, k.alpha);
  }
  const S h = c - r;
  S loss;
  switch (type) {
    case PREFOPT_LOSS_SIGMOID: loss = smoothed_logistic(k.beta * h, k.eps); break;
    case PREFOPT_LOSS_HINGE: loss = hinge(k.beta * h); break;
    case PREFOPT_LOSS_IPO: loss = ipo(h, C(0), k.beta); break;
    default: loss = smoothed_logistic(k.beta * h - k.gamma, k.eps); break;
  }
  if (p.config.cpo_alpha != 0.0) loss = loss - k.nll_weight * x[0] / k.total_tokens;
  return {loss, k.beta * value_of(c), k.beta * value_of(r), {C(0), C(0), C(0)}};
}

// ORPO (Hong et al. 2024): NLL of the chosen plus beta (-log sigma(log-odds ratio)), on per-token
// average log-probs. The NLL is x2 where given (one per pair, or the batch's for every pair), the
// pair's -c otherwise.
template <typename S, typename C>
__device__ __forceinline__ Scored<S> score_orpo(const LossParams& p, const Constants<C>& k, const Example<C>&,
                                                const S (&x)[kVariables]) {
  const S& c = x[0];
  const S& r = x[1];
  const S log_odds_ratio = log_odds(c, Math<C>::kTiny) - log_odds(r, Math<C>::kTiny);
  const S ratio = log_sigmoid(log_odds_ratio);
  const S nll = p.in.nll ? x[2] : -c;
  return {nll - k.beta * ratio, k.beta * value_of(c), k.beta * value_of(r),
          {value_of(ratio), value_of(log_odds_ratio), value_of(nll)}};
}

template <typename S, typename C>
__device__ __forceinline__ Scored<S> score(const LossParams& p, const Constants<C>& k, const Example<C>& e,
                                           const S (&x)[kVariables]) {
  switch (p.config.family) {
    case PREFOPT_FAMILY_DPO: return score_dpo(p, k, e, x);
    case PREFOPT_FAMILY_KTO: return score_kto(p, k, e, x);
    case PREFOPT_FAMILY_CPO: return score_cpo(p, k, e, x);
    default: return score_orpo(p, k, e, x);
  }
}

// ---------------------------------------------------------------------------------------------
// The batch: loading examples, fixed-order block sums, the kernels.
// ---------------------------------------------------------------------------------------------

template <typename C>
__device__ __forceinline__ Example<C> load_example(const LossParams& p, int64_t i) {
  const prefopt_preference_inputs& in = p.in;
  const int dtype = p.dtype;
  Example<C> e;
  e.policy_chosen = load_element<C>(in.chosen, dtype, i);
  e.policy_rejected = in.rejected ? load_element<C>(in.rejected, dtype, i) : C(0);
  e.x[0] = in.ref_chosen ? e.policy_chosen - load_element<C>(in.ref_chosen, dtype, i) : e.policy_chosen;
  e.x[1] = in.ref_rejected ? e.policy_rejected - load_element<C>(in.ref_rejected, dtype, i) : e.policy_rejected;
  e.x[2] = in.margin ? load_element<C>(in.margin, dtype, i)
           : in.nll  ? load_element<C>(in.nll, dtype, in.nll_is_vector ? i : 0)
                     : C(0);
  e.chosen_length = in.chosen_lengths ? token_count<C>(in.chosen_lengths, in.lengths_dtype, i) : C(1);
  e.rejected_length = in.rejected_lengths ? token_count<C>(in.rejected_lengths, in.lengths_dtype, i) : C(1);
  e.pair_weight = in.pair_weights ? load_element<C>(in.pair_weights, dtype, i) : C(1);
  e.desirable = in.desirable ? in.desirable[i] != 0 : true;
  return e;
}

// Sums each entry of `values` over the block, in a fixed tree (a shuffle tree in each warp, then
// the 8 warp results in warp order): the same inputs give the same bits. Every thread gets the
// sums; the trailing barrier makes the function safe to call again.
template <typename C, int K>
__device__ __forceinline__ void block_sum(C (&values)[K]) {
  constexpr unsigned kAll = 0xffffffffu;
  __shared__ C warp_sums[kWarps][K];
  __shared__ C totals[K];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) values[k] += __shfl_down_sync(kAll, values[k], offset);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) warp_sums[warp][k] = values[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) values[k] = lane < kWarps ? warp_sums[lane][k] : C(0);
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) {
#pragma unroll
      for (int k = 0; k < K; ++k) values[k] += __shfl_down_sync(kAll, values[k], offset);
    }
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) totals[k] = values[k];
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) values[k] = totals[k];
}

template <typename C>
__device__ __forceinline__ Constants<C> constants(const LossParams& p) {
  const prefopt_preference_config& config = p.config;
  Constants<C> k;
  k.beta = C(config.beta);
  k.eps = C(config.label_smoothing);
  k.tau = C(config.discopop_tau);
  k.gamma = C(config.simpo_gamma);
  k.offset = p.in.offset ? load_element<C>(p.in.offset, p.dtype, 0) : C(config.offset_value);
  k.desirable_weight = C(config.desirable_weight);
  k.undesirable_weight = C(config.undesirable_weight);
  k.f_coef = C(config.f_alpha_divergence_coef);
  k.alpha = C(config.alpha);
  k.nll_weight = C(config.cpo_alpha) * C(p.n);
  k.total_tokens = C(1);
  if (config.family == PREFOPT_FAMILY_CPO && config.cpo_alpha != 0.0) {
    // The NLL term is a token mean over the whole batch: its denominator comes first.
    C tokens[1] = {C(0)};
    for (int64_t i = threadIdx.x; i < p.n; i += kThreads) {
      tokens[0] += token_count<C>(p.in.chosen_lengths, p.in.lengths_dtype, i);
    }
    block_sum(tokens);
    k.total_tokens = tokens[0];
  }
  return k;
}

// What one example adds to the batch sums. Pairs: loss, chosen and rejected rewards, wins,
// reward margin, chosen and rejected log-probs, ORPO's extras. KTO: loss, the rewards and the
// log-probs of each class, and the class sizes.
template <typename C>
__device__ __forceinline__ void add_to_sums(C (&sums)[kSums], int family, const Example<C>& e, const Scored<C>& s) {
  sums[0] += s.loss;
  sums[1] += s.chosen_reward;
  sums[2] += s.rejected_reward;
  if (family == PREFOPT_FAMILY_KTO) {
    sums[3] += e.desirable ? e.policy_chosen : C(0);
    sums[4] += e.desirable ? C(0) : e.policy_chosen;
    sums[5] += e.desirable ? C(1) : C(0);
    sums[6] += e.desirable ? C(0) : C(1);
  } else {
    // TRL's accuracy: strict wins only.
    sums[3] += s.chosen_reward > s.rejected_reward ? C(1) : C(0);
    sums[4] += s.chosen_reward - s.rejected_reward;
    sums[5] += e.policy_chosen;
    sums[6] += e.policy_rejected;
#pragma unroll
    for (int j = 0; j < 3; ++j) sums[7 + j] += s.extras[j];
  }
}

// The metrics in prefopt._codes.METRIC_NAMES order. A KTO class absent from the batch has
// no mean: 0/0 gives NaN, as a mean of nothing should.
template <typename C>
__device__ __forceinline__ void write_loss_and_metrics(const LossParams& p, const C (&sums)[kSums]) {
  const C n = C(p.n);
  store_element(p.loss, p.dtype, 0, p.config.mean ? sums[0] / n : sums[0]);
  if (p.config.family == PREFOPT_FAMILY_KTO) {
    const C chosen = sums[1] / sums[5];
    const C rejected = sums[2] / sums[6];
    const C kto_metrics[7] = {chosen, rejected, chosen - rejected, sums[3] / sums[5], sums[4] / sums[6],
                              sums[5], sums[6]};
    for (int j = 0; j < 7; ++j) store_element(p.metrics, p.dtype, j, kto_metrics[j]);
  } else {
    const int count = metric_count(p.config.family);
    for (int j = 0; j < count; ++j) store_element(p.metrics, p.dtype, j, sums[1 + j] / n);
  }
}

// One block per launch, so no occupancy to keep: __launch_bounds__(kThreads, 1) lets ptxas use the
// registers the float64 dual numbers need (~170) instead of capping at 64 and spilling. C is the
// compute type: double for float64 inputs, float otherwise.
template <typename C>
__global__ void __launch_bounds__(kThreads, 1) preference_loss_forward_kernel(const LossParams p) {
  const Constants<C> k = constants<C>(p);
  C sums[kSums] = {};
  for (int64_t i = threadIdx.x; i < p.n; i += kThreads) {
    const Example<C> e = load_example<C>(p, i);
    const Scored<C> s = score(p, k, e, e.x);
    store_element(p.losses, p.dtype, i, s.loss);
    store_element(p.chosen_rewards, p.dtype, i, s.chosen_reward);
    store_element(p.rejected_rewards, p.dtype, i, s.rejected_reward);
    add_to_sums(sums, p.config.family, e, s);
  }
  block_sum(sums);
  if (threadIdx.x == 0) write_loss_and_metrics(p, sums);
}

// Gradients of grad_loss * loss + sum_i grad_losses[i] losses[i]: example i's loss receives
// g_i = grad_losses[i] + grad_loss (/ n for the mean).
template <typename C>
__global__ void __launch_bounds__(kThreads, 1) preference_loss_backward_kernel(const LossParams p) {
  using D = Dual<C, kVariables>;
  const Constants<C> k = constants<C>(p);
  const C grad_loss = load_element<C>(p.grad_loss, p.dtype, 0);
  const C grad_each = p.config.mean ? grad_loss / C(p.n) : grad_loss;
  C grad_nll_sum[1] = {C(0)};
  for (int64_t i = threadIdx.x; i < p.n; i += kThreads) {
    const Example<C> e = load_example<C>(p, i);
    D x[kVariables];
#pragma unroll
    for (int v = 0; v < kVariables; ++v) x[v] = D::variable(e.x[v], v);
    const Scored<D> s = score(p, k, e, x);
    const C g = load_element<C>(p.grad_losses, p.dtype, i) + grad_each;
    const C grad_chosen = g * s.loss.d[0];
    const C grad_rejected = g * s.loss.d[1];
    const C grad_extra = g * s.loss.d[2];
    if (p.grad_chosen) store_element(p.grad_chosen, p.dtype, i, grad_chosen);
    if (p.grad_ref_chosen) store_element(p.grad_ref_chosen, p.dtype, i, -grad_chosen);
    if (p.grad_rejected) store_element(p.grad_rejected, p.dtype, i, grad_rejected);
    if (p.grad_ref_rejected) store_element(p.grad_ref_rejected, p.dtype, i, -grad_rejected);
    if (p.grad_margin) store_element(p.grad_margin, p.dtype, i, grad_extra);
    if (p.grad_nll) {
      if (p.in.nll_is_vector) {
        store_element(p.grad_nll, p.dtype, i, grad_extra);
      } else {
        grad_nll_sum[0] += grad_extra;
      }
    }
  }
  // One NLL shared by the batch: its gradient is the sum over the pairs.
  if (p.grad_nll && !p.in.nll_is_vector) {
    block_sum(grad_nll_sum);
    if (threadIdx.x == 0) store_element(p.grad_nll, p.dtype, 0, grad_nll_sum[0]);
  }
}

// ---------------------------------------------------------------------------------------------
// Argument checks, on the host, before anything is launched: what prefopt.losses validates and a
// kernel would otherwise turn into NaN or a read out of bounds.
// ---------------------------------------------------------------------------------------------

bool is_floating(int dtype) { return dtype >= PREFOPT_FLOAT32 && dtype <= PREFOPT_FLOAT64; }

bool is_finite(double x) { return std::isfinite(x); }

// The DPO types an f-divergence may change (TRL's set, less sft, which has no kernel).
bool takes_f_divergence(int type) {
  switch (type) {
    case PREFOPT_LOSS_SIGMOID:
    case PREFOPT_LOSS_ROBUST:
    case PREFOPT_LOSS_HINGE:
    case PREFOPT_LOSS_IPO:
    case PREFOPT_LOSS_EXO_PAIR:
    case PREFOPT_LOSS_DISCOPOP:
    case PREFOPT_LOSS_SIGMOID_NORM: return true;
    default: return false;
  }
}

bool valid_dpo_type(int type, const prefopt_preference_inputs& in, const prefopt_preference_config& config) {
  const double eps = config.label_smoothing;
  if (config.f_divergence != 0 && !takes_f_divergence(type)) return false;
  switch (type) {
    case PREFOPT_LOSS_ROBUST: return eps >= 0.0 && eps < 0.5;
    case PREFOPT_LOSS_EXO_PAIR: return eps > 0.0 && eps < 1.0;
    case PREFOPT_LOSS_DISCOPOP: return config.discopop_tau > 0.0 && is_finite(config.discopop_tau);
    case PREFOPT_LOSS_SIGMOID_NORM: return in.chosen_lengths != nullptr;
    default: return type >= PREFOPT_LOSS_SIGMOID && type < PREFOPT_LOSS_SIGMOID_NORM;
  }
}

bool valid_loss(int dtype, int64_t n, const prefopt_preference_inputs* inputs, const prefopt_preference_config* config) {
  if (!is_floating(dtype) || n < 1 || inputs == nullptr || config == nullptr) return false;
  const prefopt_preference_inputs& in = *inputs;
  const prefopt_preference_config& k = *config;
  if (in.chosen == nullptr || !(k.beta > 0.0) || !is_finite(k.beta)) return false;
  if ((in.chosen_lengths || in.rejected_lengths) && !(in.lengths_dtype >= PREFOPT_FLOAT32 && in.lengths_dtype <= PREFOPT_INT64)) {
    return false;
  }
  if (in.nll_is_vector && in.nll == nullptr) return false;
  if (k.num_loss_types < 0 || k.num_loss_types > PREFOPT_MAX_LOSS_TYPES) return false;
  // The DPO-only and CPO-only options are refused elsewhere, like the inputs a family does not read.
  if (k.f_divergence < 0 || k.f_divergence > 3 || !is_finite(k.f_alpha_divergence_coef) || !is_finite(k.alpha)) {
    return false;
  }
  if (k.family != PREFOPT_FAMILY_DPO && (k.f_divergence != 0 || in.pair_weights)) return false;
  if (k.family != PREFOPT_FAMILY_CPO && k.alpha != 0.0) return false;
  if (k.f_divergence == 3 && k.f_alpha_divergence_coef == 1.0) return false;  // the caller passes reverse KL
  const int type = k.num_loss_types > 0 ? k.loss_types[0] : -1;
  // Inputs a family does not read are refused rather than silently ignored.
  const bool pair = in.rejected != nullptr;
  const bool reference = in.ref_chosen != nullptr;
  switch (k.family) {
    case PREFOPT_FAMILY_DPO: {
      if (!pair || !reference || in.ref_rejected == nullptr || in.desirable || in.nll || k.num_loss_types < 1) return false;
      if ((in.chosen_lengths == nullptr) != (in.rejected_lengths == nullptr)) return false;
      for (int t = 0; t < k.num_loss_types; ++t) {
        if (!valid_dpo_type(k.loss_types[t], in, k) || !is_finite(k.loss_weights[t])) return false;
      }
      return true;
    }
    case PREFOPT_FAMILY_KTO:
      return reference && in.desirable && !pair && !in.ref_rejected && !in.margin && !in.nll && k.num_loss_types == 1 &&
             (type == PREFOPT_LOSS_KTO || type == PREFOPT_LOSS_APO_ZERO_UNPAIRED);
    case PREFOPT_FAMILY_CPO: {
      const bool averaged = type == PREFOPT_LOSS_IPO || type == PREFOPT_LOSS_SIMPO;
      return pair && !reference && !in.ref_rejected && !in.margin && !in.desirable && !in.nll &&
             k.num_loss_types == 1 &&
             (averaged || type == PREFOPT_LOSS_SIGMOID || type == PREFOPT_LOSS_HINGE) &&
             (!averaged || (in.chosen_lengths && in.rejected_lengths)) &&
             (k.cpo_alpha == 0.0 || in.chosen_lengths) && is_finite(k.cpo_alpha);
    }
    case PREFOPT_FAMILY_ORPO:
      return pair && !reference && !in.ref_rejected && !in.margin && !in.desirable && k.num_loss_types == 0;
    default:
      return false;
  }
}

LossParams params_of(int dtype, int64_t n, const prefopt_preference_inputs* inputs,
                     const prefopt_preference_config* config) {
  LossParams p = {};
  p.in = *inputs;
  p.config = *config;
  p.dtype = dtype;
  p.n = n;
  return p;
}

// One block: the float64 instance of a kernel for float64 inputs, the float32 one otherwise.
using LossKernel = void (*)(LossParams);

cudaError_t launch(const LossParams& p, LossKernel float_kernel, LossKernel double_kernel, cudaStream_t stream) {
  const LossKernel kernel = p.dtype == PREFOPT_FLOAT64 ? double_kernel : float_kernel;
  PREFOPT_LAUNCH(kernel, 1, kThreads, stream, p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace prefopt

using namespace prefopt;

extern "C" int prefopt_preference_loss_metric_count(int family) { return metric_count(family); }

extern "C" cudaError_t prefopt_preference_loss_forward(
    int dtype, int64_t n, const prefopt_preference_inputs* inputs, const prefopt_preference_config* config,
    void* loss, void* losses, void* chosen_rewards, void* rejected_rewards, void* metrics, cudaStream_t stream) {
  if (!valid_loss(dtype, n, inputs, config)) return cudaErrorInvalidValue;
  if (!loss || !losses || !chosen_rewards || !rejected_rewards || !metrics) return cudaErrorInvalidValue;
  LossParams p = params_of(dtype, n, inputs, config);
  p.loss = loss;
  p.losses = losses;
  p.chosen_rewards = chosen_rewards;
  p.rejected_rewards = rejected_rewards;
  p.metrics = metrics;
  return launch(p, preference_loss_forward_kernel<float>, preference_loss_forward_kernel<double>, stream);
}

extern "C" cudaError_t prefopt_preference_loss_backward(
    int dtype, int64_t n, const prefopt_preference_inputs* inputs, const prefopt_preference_config* config,
    const void* grad_loss, const void* grad_losses, void* grad_chosen, void* grad_rejected,
    void* grad_ref_chosen, void* grad_ref_rejected, void* grad_margin, void* grad_nll, cudaStream_t stream) {
  if (!valid_loss(dtype, n, inputs, config) || !grad_loss || !grad_losses) return cudaErrorInvalidValue;
  const prefopt_preference_inputs& in = *inputs;
  if ((grad_rejected && !in.rejected) || (grad_ref_chosen && !in.ref_chosen) ||
      (grad_ref_rejected && !in.ref_rejected) || (grad_margin && !in.margin) || (grad_nll && !in.nll)) {
    return cudaErrorInvalidValue;
  }
  LossParams p = params_of(dtype, n, inputs, config);
  p.grad_loss = grad_loss;
  p.grad_losses = grad_losses;
  p.grad_chosen = grad_chosen;
  p.grad_rejected = grad_rejected;
  p.grad_ref_chosen = grad_ref_chosen;
  p.grad_ref_rejected = grad_ref_rejected;
  p.grad_margin = grad_margin;
  p.grad_nll = grad_nll;
  return launch(p, preference_loss_backward_kernel<float>, preference_loss_backward_kernel<double>, stream);
}
