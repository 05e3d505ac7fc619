// aql_kernels._C: the eager CPU route of cross_entropy_with_scores, softmax_scores and fisher_ema_
// for small calls, in C++ against torch (built by setup.py with torch.utils.cpp_extension; optional: without it
// the Python route runs, with the same results).
//
// Why: on [64, 10] logits the Python route spent ~125 us per forward + backward (one core of the
// 2-core EPYC CI machine) against ~44 us for F.cross_entropy, nearly all of it host work: seven
// output tensors allocated from Python, a Python autograd.Function (apply, then a backward in
// Python) and a ctypes call per kernel. Here one Python call validates the inputs, allocates the
// outputs (at::detail::empty_cpu, no dispatcher), calls the CPU library's kernel, reduces the loss
// and records a C++ autograd node whose backward calls the backward kernel: no Python runs in
// backward (126 -> 43 us against F.cross_entropy's 45 us, one thread; `python -m benchmarks.host_cost`).
//
// fisher_ema_ on the CPU tensor lists of a small model: the Python route checks its lists with
// C-level maps and caches the checked address layout, but gradients set to None by zero_grad come
// back at new addresses, and the ctypes call has its cost: ~28 us for the 8 tensors of the MNIST-1D
// CNN against ~22 us for torch._foreach_mul_ + _foreach_addcmul_. Here one loop over the two lists
// checks them (exact torch.Tensor, CPU, float32 contiguous states, shapes, no overlap) and calls
// the kernel (~4 us).
//
// The kernels are the CPU library's (libaql_cpu.so, the C ABI of csrc/c_api.h): its loader hands
// their addresses over once (set_kernels), so this module does not link the library, and every
// instruction-set variant and the library's own checks stay in one place.
//
// Coverage: 2-D float32 / bfloat16 / float16 logits on the CPU with unit column stride and rows that
// do not overlap, int64 targets of length N, N >= 1 (sequences arrive as the [B * T, V] rows that
// scores.py's sequence layer makes). Anything else, and any non-zero status of a
// kernel (a target out of range, say), returns None: the caller then takes the Python route, which
// validates, raises its own errors and handles every other case. The results are those of the
// Python route bit for bit: the same kernels, the loss summed by at::sum as `rows.sum()` does and
// divided as `sum / count` does in float32, the same float32 gradient per row.
#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/sum.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../c_api.h"

namespace py = pybind11;

namespace {

using Forward = decltype(&aql_softmax_scores);
using Backward = decltype(&aql_softmax_scores_backward);
using FisherEma = decltype(&aql_fisher_ema);
using LastError = decltype(&aql_last_error);

// The CPU library's entry points; an op whose kernel is NULL (a library built without it) is never
// covered.
struct Kernels {
  Forward forward = nullptr;
  Backward backward = nullptr;
  FisherEma fisher_ema = nullptr;
  LastError last_error = nullptr;
};
Kernels kernels;

void set_kernels(uintptr_t forward, uintptr_t backward, uintptr_t fisher_ema, uintptr_t last_error) {
  if (last_error == 0) throw std::invalid_argument("aql_kernels._C.set_kernels: NULL aql_last_error");
  kernels = Kernels{reinterpret_cast<Forward>(forward), reinterpret_cast<Backward>(backward),
                    reinterpret_cast<FisherEma>(fisher_ema), reinterpret_cast<LastError>(last_error)};
}

bool ready() { return kernels.forward != nullptr && kernels.backward != nullptr; }

enum class Reduction { kMean, kSum, kNone };

std::optional<Reduction> parse_reduction(const std::string &name) {
  if (name == "mean") return Reduction::kMean;
  if (name == "sum") return Reduction::kSum;
  if (name == "none") return Reduction::kNone;
  return std::nullopt;
}

// The C ABI's element-type code of a logits dtype, -1 when it has none.
int32_t dtype_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return AQL_DTYPE_F32;
    case at::kBFloat16:
      return AQL_DTYPE_BF16;
    case at::kHalf:
      return AQL_DTYPE_F16;
    default:
      return -1;
  }
}

bool plain_cpu(const at::Tensor &tensor) {
  return tensor.defined() && tensor.device().is_cpu() && tensor.layout() == at::kStrided && !tensor.is_conj() && !tensor.is_neg();
}

// Whether this module computes the call (see Coverage above); the row stride then in *row_stride.
bool covered(const at::Tensor &logits, const at::Tensor *targets, int64_t *row_stride) {
  if (!plain_cpu(logits) || logits.dim() != 2 || dtype_code(logits.scalar_type()) < 0) return false;
  const int64_t n = logits.size(0), v = logits.size(1);
  if (n < 1 || v < 1) return false;
  if (v > 1 && logits.stride(1) != 1) return false;
  if (n > 1 && logits.stride(0) < v) return false;  // expanded or overlapping rows
  if (targets != nullptr) {
    if (!plain_cpu(*targets) || targets->dim() != 1 || targets->scalar_type() != at::kLong || targets->size(0) != n) return false;
    if (n > 1 && targets->stride(0) != 1) return false;
  }
  *row_stride = n > 1 ? logits.stride(0) : v;
  return true;
}

at::Tensor empty_floats(int64_t n) { return at::detail::empty_cpu({n}, at::kFloat, false, std::nullopt); }

// The seven statistics of the rows (loss and el2n undefined without targets), or nothing when the
// kernel returns a non-zero status.
struct Statistics {
  at::Tensor lse, entropy, maxprob, margin, argmax, loss, el2n;
};

std::optional<Statistics> forward_statistics(const at::Tensor &logits, const at::Tensor *targets, int64_t ignore_index,
                                             int64_t row_stride) {
  const int64_t n = logits.size(0), v = logits.size(1);
  Statistics s;
  s.lse = empty_floats(n);
  s.entropy = empty_floats(n);
  s.maxprob = empty_floats(n);
  s.margin = empty_floats(n);
  s.argmax = at::detail::empty_cpu({n}, at::kLong, false, std::nullopt);
  if (targets != nullptr) {
    s.loss = empty_floats(n);
    s.el2n = empty_floats(n);
  }
  const aql_status status = kernels.forward(
      logits.const_data_ptr(), dtype_code(logits.scalar_type()), n, v, row_stride,
      targets != nullptr ? targets->const_data_ptr<int64_t>() : nullptr, ignore_index, s.lse.mutable_data_ptr<float>(),
      s.entropy.mutable_data_ptr<float>(), s.maxprob.mutable_data_ptr<float>(), s.margin.mutable_data_ptr<float>(),
      s.argmax.mutable_data_ptr<int64_t>(), targets != nullptr ? s.loss.mutable_data_ptr<float>() : nullptr,
      targets != nullptr ? s.el2n.mutable_data_ptr<float>() : nullptr);
  if (status != AQL_OK) return std::nullopt;
  return s;
}

int64_t count_valid(const at::Tensor &targets, int64_t ignore_index) {
  const int64_t *t = targets.const_data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t i = 0, n = targets.size(0); i < n; ++i) count += t[i] != ignore_index;
  return count;
}

// The reduced loss from the per-row NLL, as the Python route's _reduce computes it: at::sum, then
// for "mean" a float32 division by the number of valid rows (NaN when there are none).
at::Tensor reduce(const at::Tensor &nll, Reduction reduction, int64_t count) {
  if (reduction == Reduction::kNone) return nll;
  at::Tensor total = at::sum(nll);
  if (reduction == Reduction::kMean) {
    float *value = total.mutable_data_ptr<float>();
    *value = *value / static_cast<float>(count);
  }
  return total;
}

// d loss / d logits: the backward kernel with grad_rows[i] = d loss / d nll_i.
at::Tensor gradient(const at::Tensor &logits, const at::Tensor &targets, const at::Tensor &lse, const at::Tensor &grad_rows,
                    int64_t ignore_index) {
  const int64_t n = logits.size(0), v = logits.size(1);
  at::Tensor grad = at::detail::empty_cpu({n, v}, logits.scalar_type(), false, std::nullopt);
  const int32_t code = dtype_code(logits.scalar_type());
  const int64_t row_stride = n > 1 ? logits.stride(0) : v;
  const aql_status status =
      kernels.backward(logits.const_data_ptr(), code, n, v, row_stride, targets.const_data_ptr<int64_t>(), ignore_index,
                       lse.const_data_ptr<float>(), grad_rows.const_data_ptr<float>(), grad.mutable_data_ptr(), code, v);
  if (status != AQL_OK) throw std::runtime_error(std::string("aql_softmax_scores_backward failed: ") + kernels.last_error());
  return grad;
}

// The rows' gradient d loss / d nll_i as float32 [N], as the Python route's _rows_gradient: the
// incoming gradient itself for "none", else its scalar (divided by the count in float32 for
// "mean") in every row.
at::Tensor rows_gradient(const at::Tensor &grad_loss, Reduction reduction, int64_t n, int64_t count) {
  at::Tensor g = grad_loss.scalar_type() == at::kFloat ? grad_loss : grad_loss.to(at::kFloat);
  if (reduction == Reduction::kNone) return g.contiguous();
  float value = *g.const_data_ptr<float>();
  if (reduction == Reduction::kMean) value = value / static_cast<float>(count);
  at::Tensor rows = empty_floats(n);
  float *out = rows.mutable_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) out[i] = value;
  return rows;
}

}  // namespace

namespace aql {  // (named: autograd shows the node as CppNode<aql::CrossEntropyWithScores>)

// The loss's autograd node: the statistics leave through `out` (detached, as the Python route's
// scores), the loss is the only output.
struct CrossEntropyWithScores : public torch::autograd::Function<CrossEntropyWithScores> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &logits, const at::Tensor &targets,
                            int64_t ignore_index, int64_t reduction, int64_t row_stride, Statistics *out, bool *failed) {
    std::optional<Statistics> s = forward_statistics(logits, &targets, ignore_index, row_stride);
    if (!s) {
      *failed = true;
      return empty_floats(0);
    }
    const auto kind = static_cast<Reduction>(reduction);
    const int64_t count = kind == Reduction::kMean ? count_valid(targets, ignore_index) : 0;
    at::Tensor loss = reduce(s->loss, kind, count);
    ctx->save_for_backward({logits, targets, s->lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["count"] = count;
    *out = std::move(*s);
    return loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx, torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &targets = saved[1], &lse = saved[2];
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const auto kind = static_cast<Reduction>(ctx->saved_data["reduction"].toInt());
    const int64_t count = ctx->saved_data["count"].toInt();
    const at::Tensor grad_rows = rows_gradient(grads[0], kind, logits.size(0), count);
    return {gradient(logits, targets, lse, grad_rows, ignore_index), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace aql

namespace {

py::tuple as_tuple(at::Tensor loss, Statistics &s) {
  return py::make_tuple(std::move(loss), std::move(s.lse), std::move(s.entropy), std::move(s.maxprob), std::move(s.margin),
                        std::move(s.argmax), std::move(s.loss), std::move(s.el2n));
}

// (loss, lse, entropy, maxprob, margin, argmax, nll, el2n), or None when not covered.
py::object cross_entropy(const at::Tensor &logits, const at::Tensor &targets, int64_t ignore_index, const std::string &reduction) {
  int64_t row_stride = 0;
  const std::optional<Reduction> kind = parse_reduction(reduction);
  if (!ready() || !kind || !covered(logits, &targets, &row_stride)) return py::none();
  if (at::GradMode::is_enabled() && logits.requires_grad()) {
    Statistics s;
    bool failed = false;
    at::Tensor loss = aql::CrossEntropyWithScores::apply(logits, targets, ignore_index, static_cast<int64_t>(*kind), row_stride, &s, &failed);
    if (failed) return py::none();
    // "none": the loss is the NLL of the rows; the scores carry it detached
    s.loss = *kind == Reduction::kNone ? loss.detach() : s.loss;
    return as_tuple(std::move(loss), s);
  }
  std::optional<Statistics> s = forward_statistics(logits, &targets, ignore_index, row_stride);
  if (!s) return py::none();
  at::Tensor loss = reduce(s->loss, *kind, *kind == Reduction::kMean ? count_valid(targets, ignore_index) : 0);
  return as_tuple(std::move(loss), *s);
}

// (lse, entropy, maxprob, margin, argmax, loss | None, el2n | None), or None when not covered.
py::object softmax_scores(const at::Tensor &logits, const std::optional<at::Tensor> &targets, int64_t ignore_index) {
  int64_t row_stride = 0;
  const at::Tensor *t = targets.has_value() ? &*targets : nullptr;
  if (!ready() || !covered(logits, t, &row_stride)) return py::none();
  std::optional<Statistics> s = forward_statistics(logits, t, ignore_index, row_stride);
  if (!s) return py::none();
  if (t == nullptr)
    return py::make_tuple(std::move(s->lse), std::move(s->entropy), std::move(s->maxprob), std::move(s->margin),
                          std::move(s->argmax), py::none(), py::none());
  return py::make_tuple(std::move(s->lse), std::move(s->entropy), std::move(s->maxprob), std::move(s->margin),
                        std::move(s->argmax), std::move(s->loss), std::move(s->el2n));
}

// ---- fisher_ema_ ------------------------------------------------------------------------------

// Whether the byte ranges [start, stop) of the updated states overlap one another, or a gradient
// overlaps one of them (gradients may overlap each other: they are only read), as fisher.py's
// _first_overlap decides.
bool overlapping(std::vector<std::pair<uintptr_t, uintptr_t>> &states, const std::vector<std::pair<uintptr_t, uintptr_t>> &grads) {
  std::sort(states.begin(), states.end());
  for (size_t i = 1; i < states.size(); ++i)
    if (states[i].first < states[i - 1].second) return true;
  for (const auto &[start, stop] : grads) {
    // the state with the highest start below this gradient's stop is the only one that can overlap it
    auto after = std::lower_bound(states.begin(), states.end(), std::make_pair(stop, uintptr_t{0}));
    if (after != states.begin() && std::prev(after)->second > start) return true;
  }
  return false;
}

// fisher[i] = decay fisher[i] + (1 - decay) (scale grads[i])^2 for every grads[i] that is not None.
// Returns false, having changed nothing, for what it does not cover (fisher.py then validates and
// raises, or runs its general route): lists or tuples of equal length >= 1 of exact torch.Tensor
// objects (None among the gradients), every state a CPU float32 contiguous tensor, every gradient a
// CPU float32 / bfloat16 / float16 contiguous tensor of its state's shape and at least one element,
// no overlap, decay a float in [0, 1), scale a float of magnitude <= the largest float32.
bool fisher_ema(py::handle fisher, py::handle grads, py::handle decay_object, py::handle scale_object) {
  if (kernels.fisher_ema == nullptr || !PyFloat_CheckExact(decay_object.ptr()) || !PyFloat_CheckExact(scale_object.ptr())) return false;
  const double decay = PyFloat_AS_DOUBLE(decay_object.ptr()), scale = PyFloat_AS_DOUBLE(scale_object.ptr());
  if (!(decay >= 0.0 && decay < 1.0) || !(std::fabs(scale) <= static_cast<double>(std::numeric_limits<float>::max()))) return false;
  PyObject *f = fisher.ptr(), *g = grads.ptr();
  if (!(PyList_CheckExact(f) || PyTuple_CheckExact(f)) || !(PyList_CheckExact(g) || PyTuple_CheckExact(g))) return false;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(f);
  if (count == 0 || PySequence_Fast_GET_SIZE(g) != count) return false;
  PyObject **states = PySequence_Fast_ITEMS(f), **gradients = PySequence_Fast_ITEMS(g);
  std::vector<float *> state_pointers;
  std::vector<const void *> grad_pointers;
  std::vector<int32_t> codes;
  std::vector<int64_t> numels;
  std::vector<std::pair<uintptr_t, uintptr_t>> state_ranges, grad_ranges;
  state_pointers.reserve(count);
  grad_pointers.reserve(count);
  codes.reserve(count);
  numels.reserve(count);
  state_ranges.reserve(count);
  grad_ranges.reserve(count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!THPVariable_CheckExact(states[i])) return false;
    const at::Tensor &state = THPVariable_Unpack(states[i]);
    if (!plain_cpu(state) || state.scalar_type() != at::kFloat || !state.is_contiguous()) return false;
    if (gradients[i] == Py_None) continue;
    if (!THPVariable_CheckExact(gradients[i])) return false;
    const at::Tensor &grad = THPVariable_Unpack(gradients[i]);
    const int32_t code = dtype_code(grad.scalar_type());
    if (!plain_cpu(grad) || code < 0 || !grad.is_contiguous() || grad.sizes() != state.sizes()) return false;
    const int64_t numel = state.numel();
    if (numel == 0) return false;
    const auto state_start = reinterpret_cast<uintptr_t>(state.const_data_ptr());
    const auto grad_start = reinterpret_cast<uintptr_t>(grad.const_data_ptr());
    state_pointers.push_back(static_cast<float *>(const_cast<void *>(state.const_data_ptr())));
    grad_pointers.push_back(grad.const_data_ptr());
    codes.push_back(code);
    numels.push_back(numel);
    state_ranges.emplace_back(state_start, state_start + 4 * static_cast<uintptr_t>(numel));
    grad_ranges.emplace_back(grad_start, grad_start + static_cast<uintptr_t>(grad.element_size() * numel));
  }
  if (overlapping(state_ranges, grad_ranges)) return false;
  if (state_pointers.empty()) return true;
  const aql_status status = kernels.fisher_ema(static_cast<int64_t>(state_pointers.size()), state_pointers.data(),
                                               grad_pointers.data(), codes.data(), numels.data(), decay, scale);
  // the arguments were checked above: a failure here is the library's (out of memory, a bug), and
  // the states may be partly updated, so it raises rather than falling back
  if (status != AQL_OK) throw std::runtime_error(std::string("aql_fisher_ema failed: ") + kernels.last_error());
  return true;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The eager CPU route of aql_kernels.scores for small calls (see csrc/torch/extension.cpp).";
  m.def("set_kernels", &set_kernels, py::arg("forward"), py::arg("backward"), py::arg("fisher_ema"), py::arg("last_error"),
        "Hands over the addresses of aql_softmax_scores, aql_softmax_scores_backward, aql_fisher_ema (0 where the "
        "library lacks one) and aql_last_error.");
  m.def("fisher_ema", &fisher_ema, py::arg("fisher"), py::arg("grads"), py::arg("decay"), py::arg("scale"),
        "fisher_ema_ on CPU tensor lists; False, with nothing changed, when the arguments are not covered.");
  m.def("cross_entropy", &cross_entropy, py::arg("logits"), py::arg("targets"), py::arg("ignore_index"), py::arg("reduction"),
        "(loss, lse, entropy, maxprob, margin, argmax, nll, el2n) of cross_entropy_with_scores on 2-D logits, or None "
        "when the inputs are not covered (the caller then takes the Python route).");
  m.def("softmax_scores", &softmax_scores, py::arg("logits"), py::arg("targets"), py::arg("ignore_index"),
        "The SoftmaxScores fields of 2-D logits, or None when the inputs are not covered.");
}
