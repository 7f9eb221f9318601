// pybind11 entry points. Every kernel takes one named argument struct of plain numbers (data
// pointers, sizes, strides in elements, dtype codes; declared in the family's header, one field per
// def_readwrite below) so the module has no libtorch ABI dependency; Python validates first and
// fills the struct with collapsekit._cargs.fill_args. (selective_scan still takes a flat list.)
//
// Each kernel exists once per instruction-set build (namespace base, and avx2 on x86-64);
// CK_DISPATCH calls the best one this CPU supports, or the one forced with set_isa().
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <string>

#include "common.h"
#include "class_sums.h"
#include "within_class.h"
#include "pairwise.h"
#include "nearest_center.h"
#include "etf_logits.h"
#include "ssd_scan.h"
#include "selective_scan.h"

namespace py = pybind11;
using namespace collapsekit;

namespace {

bool cpu_has_avx2() {
#if defined(COLLAPSEKIT_HAVE_AVX2) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(COLLAPSEKIT_HAVE_AVX512) && defined(__GNUC__)
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// "base", "avx2" or "avx512". Kernels without an AVX-512 build (CMakeLists.txt: CK_AVX512_SOURCES
// lists the files where it measured faster) run their AVX2 build under "avx512".
std::string g_isa;

void set_isa(const std::string& isa) {
  if (isa == "auto") g_isa = cpu_has_avx512() ? "avx512" : cpu_has_avx2() ? "avx2" : "base";
  else if (isa == "base") g_isa = "base";
  else if (isa == "avx2") {
    if (!cpu_has_avx2()) throw std::invalid_argument("collapsekit._C.set_isa: this CPU or build has no AVX2 kernels");
    g_isa = "avx2";
  } else if (isa == "avx512") {
    if (!cpu_has_avx512())
      throw std::invalid_argument("collapsekit._C.set_isa: this CPU or build has no AVX-512 kernels");
    g_isa = "avx512";
  } else
    throw std::invalid_argument("collapsekit._C.set_isa: isa must be 'auto', 'base', 'avx2' or 'avx512', got '" +
                                isa + "'");
}

// The fields of LabeledRowsArgs (common.h), shared by ClassSumsArgs and WithinClassArgs.
template <typename T>
void bind_labeled_rows(py::class_<T>& c) {
  c.def(py::init<>())
      .def_readwrite("features", &T::features).def_readwrite("feature_dtype", &T::feature_dtype)
      .def_readwrite("N", &T::N).def_readwrite("D", &T::D).def_readwrite("fs0", &T::fs0).def_readwrite("fs1", &T::fs1)
      .def_readwrite("labels", &T::labels).def_readwrite("label_dtype", &T::label_dtype)
      .def_readwrite("K", &T::K).def_readwrite("ls0", &T::ls0).def_readwrite("ls1", &T::ls1)
      .def_readwrite("weights", &T::weights).def_readwrite("ws0", &T::ws0).def_readwrite("ws1", &T::ws1);
}

}  // namespace

#if defined(COLLAPSEKIT_HAVE_AVX2)
#define CK_DISPATCH(fn) [](auto... a) { return g_isa != "base" ? avx2::fn(a...) : base::fn(a...); }
#else
#define CK_DISPATCH(fn) [](auto... a) { return base::fn(a...); }
#endif
// For the kernels that also have an AVX-512 build (CK_AVX512_SOURCES in CMakeLists.txt).
#if defined(COLLAPSEKIT_HAVE_AVX512)
#define CK_DISPATCH512(fn) \
  [](auto... a) { return g_isa == "avx512" ? avx512::fn(a...) : g_isa == "avx2" ? avx2::fn(a...) : base::fn(a...); }
#else
#define CK_DISPATCH512(fn) CK_DISPATCH(fn)
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "collapsekit CPU kernels (raw-pointer ABI, no libtorch link)";
  const char* env = std::getenv("COLLAPSEKIT_ISA");
  set_isa(env && *env ? env : "auto");
  m.def("set_isa", &set_isa, "Kernel instruction set: 'auto', 'base', 'avx2' or 'avx512' (tests run each)");
  m.def("isa", [] { return g_isa; });
  m.def("max_threads", &max_threads);
#ifdef COLLAPSEKIT_OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif

  // One argument struct per entry point (declared in the family's header; fields documented
  // there), filled from Python by collapsekit._cargs.fill_args. No py::dynamic_attr(): a misspelt
  // field raises AttributeError instead of being silently ignored.
  py::class_<ClassSumsArgs> csa(m, "ClassSumsArgs", "arguments of class_sums (see csrc/class_sums.h)");
  bind_labeled_rows(csa);
  csa.def_readwrite("C", &ClassSumsArgs::C).def_readwrite("sums", &ClassSumsArgs::sums)
      .def_readwrite("counts", &ClassSumsArgs::counts).def_readwrite("path", &ClassSumsArgs::path)
      .def_readwrite("num_threads", &ClassSumsArgs::num_threads);
  m.def("class_sums", static_cast<void (*)(const ClassSumsArgs&)>(CK_DISPATCH(class_sums)),
        py::call_guard<py::gil_scoped_release>(), py::arg("args"),
        "sums[C, D], counts[C] (accumulation dtype, contiguous) of weighted feature rows per label");
  m.def("choose_class_sums_path", &choose_class_sums_path);

  py::class_<WithinClassArgs> wca(m, "WithinClassArgs", "arguments of within_class_variance (see csrc/within_class.h)");
  bind_labeled_rows(wca);
  wca.def_readwrite("C", &WithinClassArgs::C).def_readwrite("means", &WithinClassArgs::means)
      .def_readwrite("out", &WithinClassArgs::out).def_readwrite("num_threads", &WithinClassArgs::num_threads);
  m.def("within_class_variance", static_cast<void (*)(const WithinClassArgs&)>(CK_DISPATCH(within_class_variance)),
        py::call_guard<py::gil_scoped_release>(), py::arg("args"),
        "out[C] (accumulation dtype) = per-class sum of w * ||h - means[label]||^2; means contiguous, acc dtype");
  py::class_<CenterRowsArgs>(m, "CenterRowsArgs", "arguments of center_rows (see csrc/within_class.h)")
      .def(py::init<>())
      .def_readwrite("features", &CenterRowsArgs::features).def_readwrite("feature_dtype", &CenterRowsArgs::feature_dtype)
      .def_readwrite("R", &CenterRowsArgs::R).def_readwrite("D", &CenterRowsArgs::D)
      .def_readwrite("fs0", &CenterRowsArgs::fs0).def_readwrite("fs1", &CenterRowsArgs::fs1)
      .def_readwrite("labels", &CenterRowsArgs::labels).def_readwrite("label_dtype", &CenterRowsArgs::label_dtype)
      .def_readwrite("ls0", &CenterRowsArgs::ls0).def_readwrite("weights", &CenterRowsArgs::weights)
      .def_readwrite("ws0", &CenterRowsArgs::ws0).def_readwrite("C", &CenterRowsArgs::C)
      .def_readwrite("means", &CenterRowsArgs::means).def_readwrite("out", &CenterRowsArgs::out)
      .def_readwrite("out_weights", &CenterRowsArgs::out_weights)
      .def_readwrite("num_threads", &CenterRowsArgs::num_threads);
  m.def("center_rows", static_cast<void (*)(const CenterRowsArgs&)>(CK_DISPATCH(center_rows)),
        py::call_guard<py::gil_scoped_release>(), py::arg("args"),
        "out[R, D] = features - means[labels] (zero rows for out-of-range labels), out_weights[R] = weights");

  py::class_<PairwiseTileArgs>(m, "PairwiseTileArgs", "arguments of pairwise_tile_sums (see csrc/pairwise.h)")
      .def(py::init<>())
      .def_readwrite("gram", &PairwiseTileArgs::gram).def_readwrite("gram_dtype", &PairwiseTileArgs::gram_dtype)
      .def_readwrite("ta", &PairwiseTileArgs::ta).def_readwrite("tb", &PairwiseTileArgs::tb)
      .def_readwrite("gs0", &PairwiseTileArgs::gs0)
      .def_readwrite("norms2_a", &PairwiseTileArgs::norms2_a).def_readwrite("norms2_b", &PairwiseTileArgs::norms2_b)
      .def_readwrite("var_a", &PairwiseTileArgs::var_a).def_readwrite("var_b", &PairwiseTileArgs::var_b)
      .def_readwrite("strict_upper", &PairwiseTileArgs::strict_upper)
      .def_readwrite("inv_k1", &PairwiseTileArgs::inv_k1).def_readwrite("out", &PairwiseTileArgs::out)
      .def_readwrite("num_threads", &PairwiseTileArgs::num_threads);
  m.def("pairwise_tile_sums", static_cast<void (*)(const PairwiseTileArgs&)>(CK_DISPATCH(pairwise_tile_sums)),
        py::call_guard<py::gil_scoped_release>(), py::arg("args"),
        "out[6] (fp64) += pair count, sums of cos, cos^2, |cos + 1/(K-1)|, log-kernel, CDNV over one Gram tile");

  py::class_<ArgminTileArgs>(m, "ArgminTileArgs", "arguments of argmin_tile_update (see csrc/nearest_center.h)")
      .def(py::init<>())
      .def_readwrite("dots", &ArgminTileArgs::dots).def_readwrite("dtype", &ArgminTileArgs::dtype)
      .def_readwrite("R", &ArgminTileArgs::R).def_readwrite("T", &ArgminTileArgs::T)
      .def_readwrite("ds0", &ArgminTileArgs::ds0).def_readwrite("offsets", &ArgminTileArgs::offsets)
      .def_readwrite("alpha", &ArgminTileArgs::alpha).def_readwrite("col0", &ArgminTileArgs::col0)
      .def_readwrite("best", &ArgminTileArgs::best).def_readwrite("best_idx", &ArgminTileArgs::best_idx)
      .def_readwrite("num_threads", &ArgminTileArgs::num_threads);
  m.def("argmin_tile_update", static_cast<void (*)(const ArgminTileArgs&)>(CK_DISPATCH(argmin_tile_update)),
        py::call_guard<py::gil_scoped_release>(), py::arg("args"),
        "running arg-min of offsets[j] + alpha * dots[r, j] over one [R, T] tile (best/best_idx updated in place)");

  py::class_<NormalizeRowsArgs>(m, "NormalizeRowsArgs", "arguments of normalize_rows (see csrc/etf_logits.h)")
      .def(py::init<>())
      .def_readwrite("features", &NormalizeRowsArgs::features)
      .def_readwrite("feature_dtype", &NormalizeRowsArgs::feature_dtype)
      .def_readwrite("R", &NormalizeRowsArgs::R).def_readwrite("D", &NormalizeRowsArgs::D)
      .def_readwrite("fs0", &NormalizeRowsArgs::fs0).def_readwrite("fs1", &NormalizeRowsArgs::fs1)
      .def_readwrite("eps", &NormalizeRowsArgs::eps).def_readwrite("scale", &NormalizeRowsArgs::scale)
      .def_readwrite("out", &NormalizeRowsArgs::out).def_readwrite("inv_norms", &NormalizeRowsArgs::inv_norms)
      .def_readwrite("num_threads", &NormalizeRowsArgs::num_threads);
  m.def("normalize_rows", static_cast<void (*)(const NormalizeRowsArgs&)>(CK_DISPATCH(normalize_rows)),
        py::call_guard<py::gil_scoped_release>(), py::arg("args"),
        "out[R, D] (acc dtype) = scale * h / max(||h||, eps); inv_norms[R] = 1 / max(||h||, eps) (0 = not wanted)");
  py::class_<NormalizeRowsBackwardArgs>(m, "NormalizeRowsBackwardArgs",
                                        "arguments of normalize_rows_backward (see csrc/etf_logits.h)")
      .def(py::init<>())
      .def_readwrite("features", &NormalizeRowsBackwardArgs::features)
      .def_readwrite("feature_dtype", &NormalizeRowsBackwardArgs::feature_dtype)
      .def_readwrite("R", &NormalizeRowsBackwardArgs::R).def_readwrite("D", &NormalizeRowsBackwardArgs::D)
      .def_readwrite("fs0", &NormalizeRowsBackwardArgs::fs0).def_readwrite("fs1", &NormalizeRowsBackwardArgs::fs1)
      .def_readwrite("eps", &NormalizeRowsBackwardArgs::eps).def_readwrite("grad", &NormalizeRowsBackwardArgs::grad)
      .def_readwrite("num_threads", &NormalizeRowsBackwardArgs::num_threads);
  m.def("normalize_rows_backward",
        static_cast<void (*)(const NormalizeRowsBackwardArgs&)>(CK_DISPATCH(normalize_rows_backward)),
        py::call_guard<py::gil_scoped_release>(), py::arg("args"),
        "grad[R, D] (acc dtype, in place) <- the vector-Jacobian product of h / max(||h||, eps)");

  py::class_<SsdArgs>(m, "SsdArgs", "arguments of the SSD scan kernels (see csrc/ssd_scan.h)")
      .def(py::init<>())
      .def_readwrite("dtype", &SsdArgs::dtype).def_readwrite("b", &SsdArgs::b).def_readwrite("l", &SsdArgs::l)
      .def_readwrite("h", &SsdArgs::h).def_readwrite("p", &SsdArgs::p).def_readwrite("g", &SsdArgs::g)
      .def_readwrite("n", &SsdArgs::n).def_readwrite("x", &SsdArgs::x).def_readwrite("xs", &SsdArgs::xs)
      .def_readwrite("dt", &SsdArgs::dt).def_readwrite("dts", &SsdArgs::dts).def_readwrite("A", &SsdArgs::A)
      .def_readwrite("B", &SsdArgs::B).def_readwrite("bs", &SsdArgs::bs).def_readwrite("C", &SsdArgs::C)
      .def_readwrite("cs", &SsdArgs::cs).def_readwrite("D", &SsdArgs::D).def_readwrite("z", &SsdArgs::z)
      .def_readwrite("zs", &SsdArgs::zs).def_readwrite("dt_bias", &SsdArgs::dt_bias)
      .def_readwrite("dt_softplus", &SsdArgs::dt_softplus).def_readwrite("dt_clamp", &SsdArgs::dt_clamp)
      .def_readwrite("dt_min", &SsdArgs::dt_min).def_readwrite("dt_max", &SsdArgs::dt_max)
      .def_readwrite("decay_scale", &SsdArgs::decay_scale).def_readwrite("state_norm_max", &SsdArgs::state_norm_max)
      .def_readwrite("chunk_size", &SsdArgs::chunk_size).def_readwrite("init", &SsdArgs::init)
      .def_readwrite("ckpt", &SsdArgs::ckpt).def_readwrite("pre_norms", &SsdArgs::pre_norms)
      .def_readwrite("path", &SsdArgs::path).def_readwrite("window", &SsdArgs::window)
      .def_readwrite("num_threads", &SsdArgs::num_threads);
  using s1 = void (*)(const SsdArgs&, uintptr_t, uintptr_t, uintptr_t);
  m.def("ssd_scan_forward", static_cast<s1>(CK_DISPATCH512(ssd_scan_forward)), py::call_guard<py::gil_scoped_release>(),
        py::arg("args"), py::arg("out"), py::arg("final_state"), py::arg("norms"),
        "SSD scan forward: out (b, l, h, p) contiguous in the feature dtype; optional final state, norms, checkpoints");
  using s2 = void (*)(const SsdArgs&, uintptr_t, const std::vector<int64_t>&, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                      uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t);
  m.def("ssd_scan_backward", static_cast<s2>(CK_DISPATCH512(ssd_scan_backward)), py::call_guard<py::gil_scoped_release>(),
        py::arg("args"), py::arg("dout"), py::arg("dout_strides"), py::arg("dfinal"), py::arg("dx"), py::arg("dz"),
        py::arg("ddt"), py::arg("dA"), py::arg("dB"), py::arg("dC"), py::arg("dD"), py::arg("dinit"),
        "SSD scan backward from the forward's chunk checkpoints (per-head dB/dC, per-(b, h) dA/dD)");
  m.def("choose_ssd_path", &choose_ssd_path, py::arg("args"), py::arg("want_norms"),
        "the forward path 'auto' picks: 1 recurrent, 2 chunked (docs/ssd_scan.md)");
  using s = void (*)(std::vector<int64_t>);
  m.def("selective_scan_fwd", static_cast<s>(CK_DISPATCH(selective_scan_fwd)), py::call_guard<py::gil_scoped_release>(),
        py::arg("args"),
        "Mamba-1 selective scan forward; args: the flat int64 list of SelectiveScanArgs (csrc/selective_scan.h)");
  m.def("selective_scan_bwd", static_cast<s>(CK_DISPATCH(selective_scan_bwd)), py::call_guard<py::gil_scoped_release>(),
        py::arg("args"),
        "Mamba-1 selective scan backward from checkpoints; args as selective_scan_fwd");
}
