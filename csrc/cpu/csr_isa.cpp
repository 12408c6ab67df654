// The vector width of the CSR tile engine's loops (csr_engine.h: isa, set_isa): read by each op once
// per call, not inside the loops; and the build of the cloned functions that runs (common.h: clone_level).
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

#include "cpu/common.h"
#include "cpu/csr_engine.h"

namespace sparsekern {
namespace csr {
namespace {

bool cpu_has_avx512() {
#if SK_HAVE_AVX512
  static const bool has = [] {
    __builtin_cpu_init();  // may run from a static initializer, before the libgcc constructor
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  }();
  return has;
#else
  return false;
#endif
}

// "auto": 64-byte loops wherever the CPU has AVX-512. Zen 4 splits them into 256-bit halves, yet
// measured there (SparseLinear 4096^2, batch 256, 1 thread) they are 5-12 % faster than 32-byte loops.
Isa auto_isa() { return cpu_has_avx512() ? Isa::avx512 : Isa::avx2; }

// Parses "auto" | "avx2" | "avx512"; false for an unknown name or an ISA this CPU lacks.
bool parse_isa(const std::string& name, Isa* out) {
  if (name == "auto") *out = auto_isa();
  else if (name == "avx2") *out = Isa::avx2;
  else if (name == "avx512" && cpu_has_avx512()) *out = Isa::avx512;
  else return false;
  return true;
}

// SPARSEKERN_ISA, read once when the extension loads; a bad value warns and means auto.
std::atomic<Isa> current_isa{[] {
  const char* env = std::getenv("SPARSEKERN_ISA");
  Isa isa = auto_isa();
  if (env && *env && !parse_isa(env, &isa))
    TORCH_WARN("SPARSEKERN_ISA=", env,
               " ignored: expected auto, avx2 or avx512 (avx512 only on a CPU with "
               "AVX-512F/BW/DQ/VL); using ",
               isa_name(isa));
  return isa;
}()};

// The best build of the cloned functions this CPU runs (common.h clone_level).
int cpu_clone_level() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const int level = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v4") ? 2 : __builtin_cpu_supports("x86-64-v3") ? 1 : 0;
  }();
  return level;
#else
  return 0;
#endif
}

int clone_level_for(Isa isa) { return isa == Isa::avx512 ? cpu_clone_level() : std::min(cpu_clone_level(), 1); }

}  // namespace

Isa isa() { return current_isa.load(std::memory_order_relaxed); }

const char* isa_name(Isa isa) { return isa == Isa::avx512 ? "avx512" : "avx2"; }

bool isa_supported(const std::string& name) {
  Isa isa;
  return parse_isa(name, &isa);
}

std::string set_isa(const std::string& name) {
  Isa isa;
  TORCH_CHECK(name == "auto" || name == "avx2" || name == "avx512",
              "_set_isa: isa must be 'auto', 'avx2' or 'avx512', got '", name, "'");
  TORCH_CHECK(parse_isa(name, &isa), "_set_isa: isa 'avx512' needs a CPU with AVX-512F/BW/DQ/VL (and an x86-64 "
                                     "GCC build); this one has none");
  current_isa.store(isa);
  clone_level_now.store(clone_level_for(isa));
  return isa_name(isa);
}

}  // namespace csr

// After current_isa (one translation unit initializes in order): SPARSEKERN_ISA's level from load on.
std::atomic<int> clone_level_now{csr::clone_level_for(csr::isa())};

}  // namespace sparsekern

// Private ops for tests and benchmarks (wrapped by sparsekern/isa.py); not part of the op contract.
TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  m.def("_isa() -> str", [] { return std::string(sparsekern::csr::isa_name(sparsekern::csr::isa())); });
  m.def("_isa_supported(str isa) -> bool",
        [](const std::string& name) { return sparsekern::csr::isa_supported(name); });
  m.def("_set_isa(str isa) -> str", [](const std::string& name) { return sparsekern::csr::set_isa(name); });
  m.def("_clone_level() -> int", [] { return int64_t(sparsekern::clone_level()); });
}
