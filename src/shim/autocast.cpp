// Autocast controls that tch 0.26 does not expose: tch's `autocast` only switches CUDA autocast
// on with its default dtype (fp16); mixed precision in bf16, and autocast on the CPU, need the
// per-device enable flag and dtype of ATen's autocast state. C linkage so Rust can declare them.
// Also the loss scaler's fused unscale, whose TensorList form tch does not bind.
#include <ATen/autocast_mode.h>
#include <ATen/ATen.h>
#include <cstdio>
#include <exception>
#include <vector>

namespace {
at::DeviceType device_type(int cuda) { return cuda ? at::kCUDA : at::kCPU; }
}

extern "C" {

// Sets autocast on or off for the CPU (cuda = 0) or CUDA, with the given reduced dtype
// (0 = float16, 1 = bfloat16). Returns the previous state: bit 0 enabled, bits 1.. the dtype code
// (0 float16, 1 bfloat16, 2 another dtype).
int medgen_autocast_set(int cuda, int enabled, int bf16) {
  const auto dev = device_type(cuda);
  const bool was = at::autocast::is_autocast_enabled(dev);
  const auto old = at::autocast::get_autocast_dtype(dev);
  const int old_code = old == at::kHalf ? 0 : (old == at::kBFloat16 ? 1 : 2);
  at::autocast::set_autocast_enabled(dev, enabled != 0);
  at::autocast::set_autocast_dtype(dev, bf16 ? at::kBFloat16 : at::kHalf);
  return (was ? 1 : 0) | (old_code << 1);
}

// Restores a state returned by medgen_autocast_set.
void medgen_autocast_restore(int cuda, int state) {
  const auto dev = device_type(cuda);
  at::autocast::set_autocast_enabled(dev, (state & 1) != 0);
  const int code = state >> 1;
  if (code == 0) at::autocast::set_autocast_dtype(dev, at::kHalf);
  if (code == 1) at::autocast::set_autocast_dtype(dev, at::kBFloat16);
}

int medgen_autocast_increment_nesting() { return at::autocast::increment_nesting(); }

// As torch.autocast's __exit__: the cast cache is cleared when the outermost region ends.
void medgen_autocast_decrement_nesting() {
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
}

// GradScaler's `_unscale_grads_` for one device: `_amp_foreach_non_finite_check_and_unscale_` over
// all of that device's gradients in one call (one fused kernel launch on CUDA). `grads` are tch's
// tensor handles (at::Tensor*); found_inf and inv_scale are 1-element float tensors on the same
// device. Returns 0, or 1 with the exception's message in err.
int medgen_amp_unscale(void** grads, int n, void* found_inf, void* inv_scale, char* err, size_t len) {
  try {
    std::vector<at::Tensor> list;
    list.reserve(n);
    for (int i = 0; i < n; ++i) list.push_back(*static_cast<at::Tensor*>(grads[i]));
    at::_amp_foreach_non_finite_check_and_unscale_(list, *static_cast<at::Tensor*>(found_inf),
                                                   *static_cast<at::Tensor*>(inv_scale));
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, len, "%s", e.what());
    return 1;
  }
}
}
