// fastlars._C.HostPlan: the host path of a LARS/LAMB step over native CPU groups (host_step.h).
//
// The maths stays in the ops (ops.cpp), called through the dispatcher with the cached tensor lists (LARS
// with fp32 state: lars_step_carrying_norms directly, lars_step.h, profiled under the op's name);
// this file reproduces, bit for bit, what fastlars/optim/_base.py does around them:
//   norms_g   = fastlars::grad_norms(grads_g, grad_scale)          (only without a GradScaler flag, or for
//                                                                    LAMB's clipping; LARS otherwise passes
//                                                                    none and its op folds ||g|| in)
//   skip      = max(found_inf, any non-finite norm) > 0            (a NaN found_inf never skips)
//   skipped  += skip;  steps += 1 − skip
//   ||G||     = sqrt(Σ_g sum(norms_g²));  clip = ||G|| > c ? ||G||⁻¹·c : 1     (LAMB max_grad_norm c)
//   fastlars::lars_step_ / lamb_step_ per group, unless skip.
// Groups with low-precision state or stochastically rounded weights call lars_lowbit_step_ /
// lamb_lowbit_step_ with the buffers' codes and scales as native_lowbit.py passes them (LARS then always
// passes ||g|| from grad_norms, which under a GradScaler does not enter the skip flag: functional.lars_step;
// its ||w|| is carried as for fp32 state, through lars_lowbit_step_carrying_norms).
#include "host_step.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/python_variable.h>

#include "../autograd_versions.h"
#include "../common/quant_math.h"
#include "lars_step.h"

#include <array>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace fastlars::cpu {
namespace {

namespace py = pybind11;

using LambOp = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                    double, const std::optional<at::Tensor>&, double, double, double, double, bool, bool, bool, bool,
                    bool, std::optional<at::ArrayRef<double>>, bool, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&);
using NormsOp = at::Tensor(at::TensorList, const std::optional<at::Tensor>&);
using LambLowbitOp = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                          at::TensorList, at::TensorList, at::TensorList, at::IntArrayRef, double,
                          const std::optional<at::Tensor>&, double, double, double, double, bool, bool, bool, bool,
                          bool, std::optional<at::ArrayRef<double>>, bool, const std::optional<at::Tensor>&,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                          const std::optional<at::Tensor>&);

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// ---------------------------------------------------------------- reading Python values strictly
// Any value of another type than the Python step would accept makes the plan step refuse (false).
bool as_double(PyObject* o, double& out) {
  if (o == nullptr || PyBool_Check(o) || !(PyFloat_Check(o) || PyLong_Check(o))) return false;
  out = PyFloat_AsDouble(o);
  if (out == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

bool as_bool(PyObject* o, bool& out) {
  if (o == nullptr || !PyBool_Check(o)) return false;
  out = o == Py_True;
  return true;
}

// The option names a group dict is read with, interned once (a lookup then hashes nothing).
struct OptionKeys {
  py::object params = key("params"), lr = key("lr"), weight_decay = key("weight_decay"), eps = key("eps"),
             maximize = key("maximize"), trust_clip = key("trust_clip"),
             trust_ratio_bounds = key("trust_ratio_bounds"), adapt = key("adapt"),
             momentum_style = key("momentum_style"), momentum = key("momentum"),
             trust_coefficient = key("trust_coefficient"), nesterov = key("nesterov"), betas = key("betas"),
             max_grad_norm = key("max_grad_norm"), bias_correction = key("bias_correction"),
             grad_averaging = key("grad_averaging"), decoupled_decay = key("decoupled_decay"),
             state_dtype = key("state_dtype"), stochastic_rounding = key("stochastic_rounding"),
             rounding_seed = key("rounding_seed");

  static py::object key(const char* name) {
    return py::reinterpret_steal<py::object>(PyUnicode_InternFromString(name));
  }
};

PyObject* item(PyObject* dict, const py::object& key) { return PyDict_GetItem(dict, key.ptr()); }  // borrowed or null

// dict[key] (borrowed, or null with no error set) for a key whose hash is known: Tensor.__hash__ is a Python
// function (id-based), which would otherwise run once per parameter and step.
PyObject* lookup(PyObject* dict, PyObject* key, Py_hash_t hash) {
#if PY_VERSION_HEX < 0x030D0000
  PyObject* value = _PyDict_GetItem_KnownHash(dict, key, hash);
#else
  (void)hash;
  PyObject* value = PyDict_GetItemWithError(dict, key);
#endif
  if (value == nullptr) PyErr_Clear();
  return value;
}

bool is_cpu_scalar(const at::Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.numel() == 1 && !t.key_set().has(c10::DispatchKey::Python);
}

// An optional one-element CPU tensor argument (grad_scale, found_inf, a tensor lr).
bool optional_scalar(PyObject* o, std::optional<at::Tensor>& out) {
  if (o == nullptr || o == Py_None) return true;
  if (!THPVariable_Check(o)) return false;
  const at::Tensor& t = THPVariable_Unpack(o);
  if (!is_cpu_scalar(t)) return false;
  out = t;
  return true;
}

// The learning rate as the native backend passes it: (value, nullopt) or (0, tensor).
bool learning_rate(PyObject* o, double& value, std::optional<at::Tensor>& tensor) {
  if (o != nullptr && THPVariable_Check(o)) {
    value = 0.0;
    return optional_scalar(o, tensor) && tensor.has_value();
  }
  return as_double(o, value);
}

// trust_ratio_bounds: None, or a pair (lo, hi) with lo <= hi.
bool ratio_bounds(PyObject* o, bool& has, std::array<double, 2>& bounds) {
  has = o != nullptr && o != Py_None;
  if (!has) return o != nullptr;
  if (!(PyTuple_Check(o) || PyList_Check(o)) || PySequence_Size(o) != 2) return false;
  for (Py_ssize_t k = 0; k < 2; ++k) {
    PyObject* v = PySequence_GetItem(o, k);
    const bool ok = as_double(v, bounds[k]);
    Py_XDECREF(v);
    if (!ok) return false;
  }
  return bounds[0] <= bounds[1];
}

// ----------------------------------------------------------------------------- tensor checks
// The conditions under which the native CPU ops accept a tensor (ops.cpp: check_dense_cpu,
// check_supported_dtype, check_like), as booleans.
// (A tensor subclass that dispatches to Python is refused: the Python step hands it to the op through its
// __torch_dispatch__.)
bool dense_cpu(const at::Tensor& t) {
  return t.defined() && t.layout() == at::kStrided && t.device().is_cpu() && t.is_non_overlapping_and_dense() &&
         !t.key_set().has(c10::DispatchKey::Python);
}

bool supported(const at::Tensor& t) {
  const auto type = t.scalar_type();
  return type == at::kFloat || type == at::kBFloat16 || type == at::kHalf;
}

bool like(const at::Tensor& t, const at::Tensor& param, at::ScalarType type) {
  if (!dense_cpu(t) || t.scalar_type() != type || t.sizes() != param.sizes()) return false;
  for (int64_t d = 0; d < param.dim(); ++d) {
    if (param.size(d) != 1 && t.stride(d) != param.stride(d)) return false;
  }
  return true;
}

// -------------------------------------------------------------------------------- the plan
struct Options {
  double lr = 0.0;
  std::optional<at::Tensor> lr_tensor;
  bool has_bounds = false;
  std::array<double, 2> bounds{};
  bool maximize = false, trust_clip = false, adapt = false;
  double weight_decay = 0.0, eps = 0.0;
  // LARS
  double momentum = 0.0, trust_coefficient = 0.0;
  bool nesterov = false, mlperf = true;
  // LAMB
  double beta1 = 0.0, beta2 = 0.0, max_grad_norm = 0.0;
  bool bias_correction = true, grad_averaging = true, decoupled_decay = false;
};

struct Param {
  PyObject* object;         // the param as listed in the group (a new reference, released by the plan)
  bool takes_part;          // had a gradient when the plan was made
  Py_hash_t hash = -1;      // its hash, as the state dict keys it (when it takes part)
  PyObject* state = nullptr;            // its state dict (new reference) when it takes part
  std::vector<PyObject*> state_values;  // the state entries the plan uses (new references)
  // Per buffer its "<name>_absmax" entry, then "state_format" (new references; null where absent).
  std::vector<PyObject*> format_values;
};

struct Group {
  PyObject* params_list = nullptr;  // the group's "params" list object (new reference)
  std::vector<Param> members;
  // Of the params that take part, in order:
  std::vector<at::Tensor> params, grads, steps, masters;  // masters: empty, or one per param (the param itself
                                                           // where it has none), as the Python step passes them
  std::vector<std::vector<at::Tensor>> buffers;
  std::vector<std::vector<at::Tensor>> scales;  // per buffer: the int8 block scales, or an empty placeholder
  std::vector<bool> has_master;
  bool low_precision = false;          // steps through the lowbit ops
  std::vector<int64_t> rounding_keys;  // sr_tensor_key per param (stochastically rounded weights), or none
  std::vector<py::object> storage;     // state_dtype, stochastic_rounding, rounding_seed when planned
  Options options;
  at::Tensor norms;  // this step's ||g||, or empty (LARS: computed in its op)
  // LARS with fp32 state: per param, ||w|| of its weights (the master where it has one) after the plan's last
  // update (-1: unknown), and the storage and version counter they had then (lars_step.h).
  std::vector<float> w_norms;
  std::vector<const void*> w_storage;
  std::vector<int64_t> w_versions;
};

// The tensor whose ||w|| LARS takes: the param's fp32 master where the step keeps one, else the param.
const at::Tensor& norm_weight(const Group& g, size_t i) { return g.masters.empty() ? g.params[i] : g.masters[i]; }

int64_t version_of(const at::Tensor& t) {
  return static_cast<int64_t>(t.unsafeGetTensorImpl()->version_counter().current_version());
}

// Nothing wrote `t` since its version and storage were recorded (an in-place op through autograd's view
// of it bumps its version counter; a write through `.data` or a raw pointer does not, hence
// LARS.reuse_weight_norms). Inference tensors have no version counter: never.
bool unchanged_since(const at::Tensor& t, const void* storage, int64_t version) {
  return !t.is_inference() && t.data_ptr() == storage && version_of(t) == version;
}

class HostPlan {
 public:
  HostPlan(const std::string& algorithm, py::object state, const std::vector<std::string>& buffer_names,
           py::list groups, bool reuse_weight_norms)
      : lamb_(algorithm == "lamb"), reuse_weight_norms_(reuse_weight_norms), state_(state),
        buffer_names_(buffer_names) {
    TORCH_CHECK(algorithm == "lars" || algorithm == "lamb", "HostPlan: algorithm must be 'lars' or 'lamb'");
    std::vector<std::string> names{"step"};
    names.insert(names.end(), buffer_names_.begin(), buffer_names_.end());
    for (const std::string& name : names) keys_.push_back(py::reinterpret_steal<py::object>(PyUnicode_InternFromString(name.c_str())));
    master_key_ = py::reinterpret_steal<py::object>(PyUnicode_InternFromString("master_param"));
    for (const std::string& name : buffer_names_) {
      format_keys_.push_back(py::reinterpret_steal<py::object>(PyUnicode_InternFromString((name + "_absmax").c_str())));
    }
    format_keys_.push_back(py::reinterpret_steal<py::object>(PyUnicode_InternFromString("state_format")));
    for (py::handle entry : groups) {
      // (the group's params list, per param whether it takes part, per taking-part param its state dict,
      //  whether it steps low-precision state, its rounding keys, (state_dtype, stochastic_rounding,
      //  rounding_seed) as planned)
      py::tuple spec = py::reinterpret_borrow<py::tuple>(entry);
      TORCH_CHECK(spec.size() == 6, "HostPlan: a group is (params, takes_part, states, low_precision, "
                  "rounding_keys, storage)");
      py::list params = spec[0].cast<py::list>();
      std::vector<bool> takes_part = spec[1].cast<std::vector<bool>>();
      py::list state_dicts = spec[2].cast<py::list>();
      TORCH_CHECK(takes_part.size() == params.size(), "HostPlan: one takes-part flag per param");
      Group g;
      g.low_precision = spec[3].cast<bool>();
      g.rounding_keys = spec[4].cast<std::vector<int64_t>>();
      for (py::handle value : spec[5].cast<py::tuple>()) g.storage.push_back(py::reinterpret_borrow<py::object>(value));
      TORCH_CHECK(g.storage.size() == 3, "HostPlan: storage is (state_dtype, stochastic_rounding, rounding_seed)");
      g.params_list = params.ptr();
      Py_INCREF(g.params_list);
      g.buffers.resize(buffer_names_.size());
      g.scales.resize(buffer_names_.size());
      size_t k = 0;
      for (size_t i = 0; i < params.size(); ++i) {
        Param member{params[i].ptr(), takes_part[i]};
        Py_INCREF(member.object);
        if (member.takes_part) {
          TORCH_CHECK(k < state_dicts.size(), "HostPlan: one state dict per taking-part param");
          member.hash = PyObject_Hash(member.object);
          if (member.hash == -1) throw py::error_already_set();
          member.state = state_dicts[k++].ptr();
          Py_INCREF(member.state);
          g.params.push_back(THPVariable_Unpack(member.object));
          for (size_t b = 0; b < keys_.size(); ++b) {
            PyObject* value = PyDict_GetItem(member.state, keys_[b].ptr());
            TORCH_CHECK(value != nullptr && THPVariable_Check(value), "HostPlan: state lacks ", names[b]);
            Py_INCREF(value);
            member.state_values.push_back(value);
            (b == 0 ? g.steps : g.buffers[b - 1]).push_back(THPVariable_Unpack(value));
          }
          for (size_t f = 0; f < format_keys_.size(); ++f) {
            PyObject* value = PyDict_GetItem(member.state, format_keys_[f].ptr());
            Py_XINCREF(value);
            member.format_values.push_back(value);
            if (f == buffer_names_.size()) break;
            if (value != nullptr) {
              TORCH_CHECK(THPVariable_Check(value), "HostPlan: ", buffer_names_[f], "_absmax is not a tensor");
              g.scales[f].push_back(THPVariable_Unpack(value));
            } else {
              g.scales[f].push_back(empty_scales_);
            }
          }
          PyObject* master = PyDict_GetItem(member.state, master_key_.ptr());
          g.has_master.push_back(master != nullptr);
          if (master != nullptr) {
            TORCH_CHECK(THPVariable_Check(master), "HostPlan: master_param is not a tensor");
            Py_INCREF(master);
            member.state_values.push_back(master);
            g.masters.push_back(THPVariable_Unpack(master));
          } else {
            g.masters.push_back(g.params.back());
          }
        }
        g.members.push_back(member);
      }
      bool any_master = false;
      for (bool m : g.has_master) any_master |= m;
      if (!any_master) g.masters.clear();
      TORCH_CHECK(g.rounding_keys.empty() || g.rounding_keys.size() == g.params.size(),
                  "HostPlan: one rounding key per taking-part param, or none");
      g.grads.resize(g.params.size());
      groups_.push_back(std::move(g));
    }
  }

  ~HostPlan() {
    py::gil_scoped_acquire gil;
    for (Group& g : groups_) {
      Py_XDECREF(g.params_list);
      for (Param& m : g.members) {
        Py_XDECREF(m.object);
        Py_XDECREF(m.state);
        for (PyObject* v : m.state_values) Py_XDECREF(v);
        for (PyObject* v : m.format_values) Py_XDECREF(v);
      }
    }
  }

  HostPlan(const HostPlan&) = delete;
  HostPlan& operator=(const HostPlan&) = delete;

  // One optimizer step; false (and nothing changed) when the cached view or a tensor is not as planned.
  bool step(py::list param_groups, py::object state, py::object grad_scale_obj, py::object found_inf_obj,
            py::object skipped_obj) {
    std::optional<at::Tensor> grad_scale, scaler_found_inf;
    if (!optional_scalar(grad_scale_obj.ptr(), grad_scale) || !optional_scalar(found_inf_obj.ptr(), scaler_found_inf)) {
      return false;
    }
    if (!THPVariable_Check(skipped_obj.ptr())) return false;
    at::Tensor skipped = THPVariable_Unpack(skipped_obj.ptr());
    if (!is_cpu_scalar(skipped) || skipped.dim() != 0) return false;
    // The plan must not keep this step's gradients alive after it (zero_grad(set_to_none) frees them).
    struct Release {
      std::vector<Group>& groups;
      ~Release() {
        for (Group& g : groups) {
          for (at::Tensor& grad : g.grads) grad.reset();
          g.norms.reset();
        }
      }
    } release_grads{groups_};
    if (!current(param_groups, state)) return false;

    py::gil_scoped_release release;
    return run(grad_scale, scaler_found_inf, skipped);
  }

  int64_t tensors() const {
    int64_t n = 0;
    for (const Group& g : groups_) n += static_cast<int64_t>(g.params.size());
    return n;
  }

 private:
  // Whether the optimizer still holds what the plan cached, every tensor passes the ops' checks, and
  // every option reads as the Python step would read it. Fills grads and options. Needs the GIL.
  bool current(py::list param_groups, py::object state) {
    if (state.ptr() != state_.ptr() || !PyDict_Check(state.ptr())) return false;
    if (static_cast<size_t>(PyList_GET_SIZE(param_groups.ptr())) != groups_.size()) return false;
    for (size_t gi = 0; gi < groups_.size(); ++gi) {
      Group& g = groups_[gi];
      PyObject* group = PyList_GET_ITEM(param_groups.ptr(), gi);
      if (!PyDict_Check(group)) return false;
      PyObject* params = item(group, keys_opt_.params);
      if (params != g.params_list || !PyList_Check(params) ||
          static_cast<size_t>(PyList_GET_SIZE(params)) != g.members.size()) {
        return false;
      }
      size_t k = 0;
      for (size_t i = 0; i < g.members.size(); ++i) {
        const Param& m = g.members[i];
        if (PyList_GET_ITEM(params, i) != m.object) return false;
        const at::Tensor& grad = THPVariable_Unpack(m.object).grad();
        if (grad.defined() != m.takes_part) return false;
        if (!m.takes_part) continue;
        if (lookup(state.ptr(), m.object, m.hash) != m.state) return false;
        for (size_t b = 0; b < keys_.size(); ++b) {
          if (PyDict_GetItem(m.state, keys_[b].ptr()) != m.state_values[b]) return false;
        }
        if (PyDict_GetItem(m.state, master_key_.ptr()) != (g.has_master[k] ? m.state_values.back() : nullptr)) {
          return false;
        }
        for (size_t f = 0; f < format_keys_.size(); ++f) {
          if (PyDict_GetItem(m.state, format_keys_[f].ptr()) != m.format_values[f]) return false;
        }
        if (!tensors_ok(g, k, grad)) return false;
        g.grads[k] = grad;
        ++k;
      }
      if (!g.params.empty() && !read_options(group, g.options)) return false;  // the Python step reads no other
      if (!same_storage(group, g)) return false;
    }
    return true;
  }

  // Whether the group's storage options read as when planned (they choose the op and the rounding keys).
  bool same_storage(PyObject* group, const Group& g) const {
    const py::object* keys[] = {&keys_opt_.state_dtype, &keys_opt_.stochastic_rounding, &keys_opt_.rounding_seed};
    for (size_t i = 0; i < g.storage.size(); ++i) {
      PyObject* value = item(group, *keys[i]);
      if (value == nullptr) return false;
      const int same = PyObject_RichCompareBool(value, g.storage[i].ptr(), Py_EQ);
      if (same != 1) {
        if (same < 0) PyErr_Clear();
        return false;
      }
    }
    return true;
  }

  bool tensors_ok(const Group& g, size_t k, const at::Tensor& grad) const {
    const at::Tensor& p = g.params[k];
    if (!dense_cpu(p) || !supported(p) || !like(grad, p, p.scalar_type())) return false;
    const at::Tensor& step = g.steps[k];
    if (!is_cpu_scalar(step) || step.scalar_type() != at::kFloat || !step.is_contiguous()) return false;
    const bool master = g.has_master[k];
    if (master) {
      const at::Tensor& w = g.masters[k];
      // The op treats a master that is the param (or shares its data) as none.
      if (w.is_same(p) || (p.numel() > 0 && w.data_ptr() == p.data_ptr()) || !like(w, p, at::kFloat)) return false;
    }
    if (g.low_precision) return lowbit_tensors_ok(g, k);
    const at::ScalarType state_type = master ? at::kFloat : p.scalar_type();
    for (const auto& list : g.buffers) {
      if (!like(list[k], p, state_type)) return false;
    }
    return true;
  }

  // The checks of lowbit_ops.cpp's lowbit_tensors on param k's buffers: each one like the param, either
  // floating or uint8 codes with contiguous fp32 scales of shape (rows, ceil(row_length / 256)); int8 codes
  // and stochastically rounded weights need a contiguous or channels_last param.
  bool lowbit_tensors_ok(const Group& g, size_t k) const {
    const at::Tensor& p = g.params[k];
    const int64_t rows = p.dim() >= 2 ? p.size(0) : 1;
    int64_t row_length = p.dim() >= 2 ? 1 : p.numel();  // of the shape, also without rows (block_layout)
    for (int64_t d = 1; d < p.dim(); ++d) row_length *= p.size(d);
    const int64_t blocks_per_row = (row_length + quant::kBlockSize - 1) / quant::kBlockSize;
    bool any_codes = false;
    for (size_t b = 0; b < g.buffers.size(); ++b) {
      const at::Tensor& x = g.buffers[b][k];
      if (!dense_cpu(x) || !like(x, p, x.scalar_type())) return false;
      if (x.scalar_type() == at::kByte) {
        const at::Tensor& s = g.scales[b][k];
        if (!s.defined() || !s.device().is_cpu() || s.scalar_type() != at::kFloat || !s.is_contiguous() ||
            s.dim() != 2 || s.size(0) != rows || s.size(1) != blocks_per_row || s.key_set().has(c10::DispatchKey::Python)) {
          return false;
        }
        any_codes = true;
      } else if (!supported(x)) {
        return false;
      }
    }
    const bool rounded = !g.rounding_keys.empty() && g.masters.empty() && p.scalar_type() == at::kBFloat16;
    if (!(any_codes || rounded)) return true;
    if (p.is_contiguous()) return true;
    if (p.dim() == 4) return p.is_contiguous(at::MemoryFormat::ChannelsLast);
    if (p.dim() == 5) return p.is_contiguous(at::MemoryFormat::ChannelsLast3d);
    return false;
  }

  bool read_options(PyObject* group, Options& o) const {
    if (!learning_rate(item(group, keys_opt_.lr), o.lr, o.lr_tensor)) return false;
    if (!as_double(item(group, keys_opt_.weight_decay), o.weight_decay) || !as_double(item(group, keys_opt_.eps), o.eps) ||
        !as_bool(item(group, keys_opt_.maximize), o.maximize) || !as_bool(item(group, keys_opt_.trust_clip), o.trust_clip) ||
        !ratio_bounds(item(group, keys_opt_.trust_ratio_bounds), o.has_bounds, o.bounds)) {
      return false;
    }
    PyObject* adapt = item(group, keys_opt_.adapt);
    if (adapt == Py_None) {
      o.adapt = o.weight_decay != 0.0;
    } else if (!as_bool(adapt, o.adapt)) {
      return false;
    }
    if (!lamb_) {
      PyObject* style = item(group, keys_opt_.momentum_style);
      if (style == nullptr || !PyUnicode_Check(style)) return false;
      const char* name = PyUnicode_AsUTF8(style);
      if (name == nullptr) {
        PyErr_Clear();
        return false;
      }
      o.mlperf = std::string(name) == "mlperf";
      if (!o.mlperf && std::string(name) != "torch") return false;
      return as_double(item(group, keys_opt_.momentum), o.momentum) &&
             as_double(item(group, keys_opt_.trust_coefficient), o.trust_coefficient) &&
             as_bool(item(group, keys_opt_.nesterov), o.nesterov);
    }
    PyObject* betas = item(group, keys_opt_.betas);
    if (betas == nullptr || !(PyTuple_Check(betas) || PyList_Check(betas)) || PySequence_Size(betas) != 2) return false;
    for (Py_ssize_t k = 0; k < 2; ++k) {
      PyObject* v = PySequence_GetItem(betas, k);
      const bool ok = as_double(v, k == 0 ? o.beta1 : o.beta2);
      Py_XDECREF(v);
      if (!ok) return false;
    }
    PyObject* clip = item(group, keys_opt_.max_grad_norm);
    o.max_grad_norm = 0.0;
    if (clip == nullptr || (clip != Py_None && !as_double(clip, o.max_grad_norm))) return false;
    return as_bool(item(group, keys_opt_.bias_correction), o.bias_correction) &&
           as_bool(item(group, keys_opt_.grad_averaging), o.grad_averaging) &&
           as_bool(item(group, keys_opt_.decoupled_decay), o.decoupled_decay);
  }

  // The step proper, after every check passed (no Python objects touched: runs without the GIL).
  bool run(const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& scaler_found_inf,
           at::Tensor& skipped) {
    static const auto norms_op = op_handle<NormsOp>("fastlars::grad_norms");
    bool clipping = false;  // over the groups that take part, as the Python step asks
    for (const Group& g : groups_) clipping |= lamb_ && !g.params.empty() && g.options.max_grad_norm != 0.0;
    // As _needs_grad_norms: the norms give the skip flag when no GradScaler does, and LAMB's ||G||.
    const bool norms_needed = !scaler_found_inf.has_value() || clipping;

    // skip = max(found_inf, any non-finite norm) > 0, as torch.stack(flags).amax() > 0 gives it.
    float flag = 0.0f;
    bool nan_flag = false;
    if (scaler_found_inf.has_value()) {
      flag = scaler_found_inf->item<float>();
      nan_flag = std::isnan(flag);
    }
    std::vector<at::Tensor> norm_sums;
    for (Group& g : groups_) {
      if (g.params.empty()) continue;
      if (!norms_needed) {
        g.norms = empty_norms_;  // LARS: ||g|| beside ||w|| in its op's norm pass
        continue;
      }
      g.norms = norms_op.call(g.grads, grad_scale);
      const float* n = g.norms.data_ptr<float>();
      for (int64_t i = 0; i < g.norms.numel(); ++i) {
        if (!std::isfinite(n[i])) flag = std::max(flag, 1.0f);
      }
      if (clipping) norm_sums.push_back(g.norms.to(at::kFloat).square().sum());
    }
    const bool skip = !nan_flag && flag > 0.0f;
    if (skip) {
      skipped.add_(1.0);
      return true;
    }
    for (Group& g : groups_) {
      for (at::Tensor& step : g.steps) *step.data_ptr<float>() += 1.0f;
      bump_versions(g.steps);
    }
    std::optional<at::Tensor> global_norm;
    if (clipping) global_norm = at::stack(norm_sums).sum().sqrt();
    for (Group& g : groups_) {
      if (g.params.empty()) continue;
      // Low-precision LARS takes ||g|| from grad_norms (after the skip test, which its norms do not enter
      // when a GradScaler gave the flag), as functional.lars_step computes them.
      if (!lamb_ && g.low_precision && g.norms.numel() == 0) g.norms = norms_op.call(g.grads, grad_scale);
      update(g, grad_scale, global_norm);
    }
    return true;
  }

  // The group's update op, then the version counters of every tensor it wrote (autograd_versions.h: the
  // ops' ADInplaceOrView kernel is skipped here, as it would box every list argument of the call).
  void update(Group& g, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& global_norm) const {
    const Options& o = g.options;
    const std::optional<at::ArrayRef<double>> bounds =
        o.has_bounds ? std::optional<at::ArrayRef<double>>(at::ArrayRef<double>(o.bounds.data(), 2)) : std::nullopt;
    {
      at::AutoDispatchBelowADInplaceOrView below_versions;
      if (g.low_precision) {
        update_lowbit(g, grad_scale, global_norm, bounds);
      } else if (!lamb_) {
        update_lars(g, grad_scale, bounds);
      } else {
        update_lamb(g, grad_scale, global_norm, bounds);
      }
    }
    bump_versions(g.params);
    bump_versions(g.masters);
    for (const std::vector<at::Tensor>& buffer : g.buffers) bump_versions(buffer);
    for (const std::vector<at::Tensor>& scales : g.scales) bump_versions(scales);
    if (!lamb_ && reuse_weight_norms_) remember_weights(g);
  }

  void update_lamb(const Group& g, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& global_norm,
                   const std::optional<at::ArrayRef<double>>& bounds) const {
    static const auto lamb_op = op_handle<LambOp>("fastlars::lamb_step_");
    const Options& o = g.options;
    const std::optional<at::Tensor> none;
    lamb_op.call(g.params, g.grads, g.buffers[0], g.buffers[1], g.masters, g.steps, o.lr, o.lr_tensor, o.beta1,
                 o.beta2, o.eps, o.weight_decay, o.bias_correction, o.grad_averaging, o.decoupled_decay,
                 o.trust_clip, o.adapt, bounds, o.maximize, clip_coefficient(o, global_norm), grad_scale, none, none);
  }

  // Per param, ||w|| carried from the plan's last update while its weights are unchanged, else -1 (always
  // -1 without reuse_weight_norms_: every step then takes the norm pass).
  std::vector<float> known_weight_norms(const Group& g) const {
    const size_t n = g.params.size();
    std::vector<float> known(n, -1.0f);
    for (size_t i = 0; reuse_weight_norms_ && i < g.w_norms.size() && i < n; ++i) {
      if (g.w_norms[i] >= 0.0f && unchanged_since(norm_weight(g, i), g.w_storage[i], g.w_versions[i])) {
        known[i] = g.w_norms[i];
      }
    }
    return known;
  }

  // lars_step_ with each weight's ||w|| carried from the plan's last update while it is unchanged
  // (lars_step.h).
  void update_lars(Group& g, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::ArrayRef<double>>& bounds) const {
    const Options& o = g.options;
    const std::optional<at::Tensor> none;
    const std::vector<float> known = known_weight_norms(g);
    RECORD_FUNCTION("fastlars::lars_step_", std::vector<c10::IValue>());  // as a dispatcher call would
    lars_step_carrying_norms(g.params, g.grads, g.buffers[0], g.masters, g.norms, o.lr, o.lr_tensor, o.momentum,
                             o.weight_decay, o.trust_coefficient, o.eps, o.nesterov, o.trust_clip, o.mlperf, o.adapt,
                             bounds, o.maximize, grad_scale, none, none, &known,
                             reuse_weight_norms_ ? &g.w_norms : nullptr);
  }

  // After a LARS update carrying ||w'||: each weight's storage and version counter now (after the step's
  // own bump), which the next step's weights must still have for its norm to be reused.
  static void remember_weights(Group& g) {
    const size_t n = g.params.size();
    g.w_storage.resize(n);
    g.w_versions.resize(n);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& w = norm_weight(g, i);
      if (w.is_inference()) {
        g.w_norms[i] = -1.0f;
        continue;
      }
      g.w_storage[i] = w.data_ptr();
      g.w_versions[i] = version_of(w);
    }
  }

  static std::optional<at::Tensor> clip_coefficient(const Options& o, const std::optional<at::Tensor>& global_norm) {
    if (o.max_grad_norm == 0.0) return std::nullopt;
    // reference.lamb_clip_coefficient: where(G > c, c / G, 1), c / G as torch's G⁻¹·c
    const at::Tensor& G = *global_norm;
    return at::where(G.gt(o.max_grad_norm), G.reciprocal().mul(o.max_grad_norm), at::ones_like(G));
  }

  void update_lowbit(Group& g, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& global_norm,
                     const std::optional<at::ArrayRef<double>>& bounds) const {
    static const auto lamb_op = op_handle<LambLowbitOp>("fastlars::lamb_lowbit_step_");
    const Options& o = g.options;
    const std::optional<at::Tensor> none;
    if (!lamb_) {  // with each weight's ||w|| carried as update_lars does
      const std::vector<float> known = known_weight_norms(g);
      RECORD_FUNCTION("fastlars::lars_lowbit_step_", std::vector<c10::IValue>());
      lars_lowbit_step_carrying_norms(g.params, g.grads, g.buffers[0], g.scales[0], g.masters, g.norms, g.steps,
                                      g.rounding_keys, o.lr, o.lr_tensor, o.momentum, o.weight_decay,
                                      o.trust_coefficient, o.eps, o.nesterov, o.trust_clip, o.mlperf, o.adapt, bounds,
                                      o.maximize, grad_scale, none, none, &known,
                                      reuse_weight_norms_ ? &g.w_norms : nullptr);
      return;
    }
    lamb_op.call(g.params, g.grads, g.buffers[0], g.scales[0], g.buffers[1], g.scales[1], g.masters, g.steps,
                 g.rounding_keys, o.lr, o.lr_tensor, o.beta1, o.beta2, o.eps, o.weight_decay, o.bias_correction,
                 o.grad_averaging, o.decoupled_decay, o.trust_clip, o.adapt, bounds, o.maximize,
                 clip_coefficient(o, global_norm), grad_scale, none, none);
  }

  bool lamb_;
  bool reuse_weight_norms_;  // LARS: carry ||w|| between steps (lars_step.h)
  py::object state_;
  std::vector<std::string> buffer_names_;
  std::vector<py::object> keys_;  // interned "step" and the buffer names
  py::object master_key_;
  std::vector<py::object> format_keys_;  // interned "<buffer>_absmax" per buffer, then "state_format"
  at::Tensor empty_scales_ = at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  OptionKeys keys_opt_;
  at::Tensor empty_norms_ = at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  std::vector<Group> groups_;
};

}  // namespace

void register_host_plan(py::module_& m) {
  py::class_<HostPlan>(m, "HostPlan",
                       "A LARS/LAMB optimizer's step over native CPU groups with its tensor lists cached "
                       "(fastlars/optim/_host.py builds and invalidates it).")
      .def(py::init<const std::string&, py::object, const std::vector<std::string>&, py::list, bool>(),
           py::arg("algorithm"), py::arg("state"), py::arg("buffer_names"), py::arg("groups"),
           py::arg("reuse_weight_norms") = true)
      .def("step", &HostPlan::step, py::arg("param_groups"), py::arg("state"), py::arg("grad_scale"),
           py::arg("found_inf"), py::arg("skipped"),
           "One step; False (and nothing changed) when the optimizer no longer matches the plan.")
      .def_property_readonly("tensors", &HostPlan::tensors, "How many params take part in a step.");
}

}  // namespace fastlars::cpu
