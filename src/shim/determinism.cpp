// `--deterministic`: the global flags of ATen's context that make a seeded CUDA run repeat itself,
// as `torch.backends.cudnn.deterministic = True; torch.backends.cudnn.benchmark = False;
// torch.use_deterministic_algorithms(True, warn_only=True)` and TF32 off. tch 0.26 exposes only the
// benchmark flag. The flags are process-wide and read when a kernel is chosen, so they can be set
// on a machine without a GPU (and read back, which is how the CPU test checks them).
#include <ATen/Context.h>

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>

extern "C" {

// 0, or 1 with libtorch's message in `err`.
int medgen_set_deterministic(char* err, size_t err_len) try {
  // cuBLAS reductions are only reproducible with a fixed workspace; PyTorch asks for this variable
  // whenever deterministic algorithms are on. It must be set before the first cuBLAS handle, which
  // `--deterministic` guarantees by running before any tensor is made; a user's value wins.
  setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", 0);
  auto& ctx = at::globalContext();
  ctx.setDeterministicCuDNN(true);
  ctx.setBenchmarkCuDNN(false);
  // TF32 rounds fp32 convolution and matmul inputs to 10 mantissa bits on Ampere and later:
  // results then differ from the CPU's and between GPU generations. The legacy setters keep
  // PyTorch's TF32 state in its one (legacy) API, so nothing mixes the two.
  ctx.setAllowTF32CuDNN(false);
  ctx.setAllowTF32CuBLAS(false);
  ctx.setFloat32MatmulPrecision("highest");
  // warn_only: an op with no deterministic CUDA kernel warns (naming itself) instead of ending a
  // long run; the warning says what would not repeat.
  ctx.setDeterministicAlgorithms(true, true);
  return 0;
} catch (const std::exception& e) {
  if (err != nullptr && err_len > 0) {
    const auto* c = dynamic_cast<const c10::Error*>(&e);
    std::strncpy(err, c ? c->what_without_backtrace() : e.what(), err_len - 1);
    err[err_len - 1] = '\0';
  }
  return 1;
}

// Bit 0 deterministic cuDNN, 1 cuDNN benchmark, 2 TF32 in cuDNN, 3 TF32 in cuBLAS, 4 deterministic
// algorithms, 5 their warn-only mode; -1 if libtorch refused to answer.
int medgen_determinism_flags() try {
  auto& ctx = at::globalContext();
  return (ctx.deterministicCuDNN() ? 1 : 0) | (ctx.benchmarkCuDNN() ? 2 : 0) | (ctx.allowTF32CuDNN() ? 4 : 0) |
         (ctx.allowTF32CuBLAS() ? 8 : 0) | (ctx.deterministicAlgorithms() ? 16 : 0) |
         (ctx.deterministicAlgorithmsWarnOnly() ? 32 : 0);
} catch (...) {
  return -1;
}
}
