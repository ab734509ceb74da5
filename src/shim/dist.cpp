// PyTorch's own collective engine (c10d) for medgen's data-parallel training: a TCPStore for the
// rendezvous (rank 0 serves it at MASTER_ADDR:MASTER_PORT, as torchrun's default), and a Gloo
// process group (CPU tensors, and CUDA tensors through host staging) or, where this libtorch was
// built with it and the NCCL headers were found, an NCCL one for GPUs. tch does not bind c10d; this
// file is the whole binding, with C linkage. Every function catches C++ exceptions and returns the
// message, so a dead peer or a timeout is a Rust error, never an abort.
//
// ProcessGroupGloo.hpp includes Gloo's headers, which the PyPI wheel does not ship (Gloo itself is
// compiled into libtorch_cpu): `make setup` extracts them from Debian's libgloo-dev. Only types
// held behind pointers come from them, nothing of Gloo's is linked from there.
//
// NCCL's process group runs watchdog threads that must be joined before the process exits (else
// they outlive libtorch's static state and abort the exit): the Rust side ends every group with
// medgen_dist_shutdown after a clean run, or medgen_dist_abort after a failure.
#include <ATen/ATen.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#ifdef USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <ATen/core/grad_mode.h>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

void set_error(char* err, size_t len, const std::string& msg) {
  if (err == nullptr || len == 0) return;
  std::strncpy(err, msg.c_str(), len - 1);
  err[len - 1] = '\0';
}

std::string message(const std::exception& e) {
  if (auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

template <typename F>
int guarded(char* err, size_t len, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    set_error(err, len, message(e));
  } catch (...) {
    set_error(err, len, "unknown C++ exception");
  }
  return 1;
}

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

// Launches one collective per tensor (each a bucket) before waiting on any, so the engine
// pipelines them; then waits for all.
template <typename Launch>
void each_then_wait(Group* g, at::Tensor** ts, int n, Launch&& launch) {
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  works.reserve(n);
  for (int i = 0; i < n; ++i) {
    std::vector<at::Tensor> one{*ts[i]};
    works.push_back(launch(one));
  }
  for (auto& w : works) w->wait(g->timeout);
}

}  // namespace

extern "C" {

// Which backends this build has: bit 0 Gloo, bit 1 NCCL.
int medgen_dist_backends() {
  int b = 0;
#ifdef USE_C10D_GLOO
  b |= 1;
#endif
#ifdef USE_C10D_NCCL
  b |= 2;
#endif
  return b;
}

// Joins the group: `backend` "gloo" or "nccl"; `cuda_device` this rank's GPU, or -1 for none.
// Returns a handle, or null with the reason in `err`.
void* medgen_dist_new(const char* backend, const char* master_addr, int master_port, int rank, int world_size,
                      int cuda_device, double timeout_s, char* err, size_t err_len) {
  Group* out = nullptr;
  int rc = guarded(err, err_len, [&] {
    const std::string name(backend), addr(master_addr);
    // NCCL creates its communicators, and Gloo stages CUDA tensors, on the current device; and
    // a stream or allocation made before it is set lands on cuda:0, shared by every local rank.
    if (cuda_device >= 0) {
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)
          ->setDevice(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(cuda_device)));
    }
    const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000.0));
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(master_port);
    so.isServer = rank == 0;
    so.numWorkers = world_size;
    so.waitWorkers = true;
    so.timeout = timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(addr, so);
    c10::intrusive_ptr<c10d::Backend> pg;
    if (name == "gloo") {
#ifdef USE_C10D_GLOO
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      // As torch.distributed: GLOO_SOCKET_IFNAME picks the interface; otherwise the host's own
      // address, or the loopback one for a job on one machine addressed as such.
      if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname) {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      } else if (is_loopback(addr)) {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      } else {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, opts);
#else
      throw std::runtime_error("this medgen was built without the Gloo headers (run `make setup`, then rebuild)");
#endif
    } else if (name == "nccl") {
#ifdef USE_C10D_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, opts);
      // As init_process_group(device_id=...): barriers and object collectives use this GPU
      // instead of guessing rank % device count.
      if (cuda_device >= 0) pg->setBoundDeviceId(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(cuda_device)));
#else
      throw std::runtime_error("this medgen was built without NCCL (its headers were not found at build time)");
#endif
    } else {
      throw std::runtime_error("unknown backend `" + name + "` (gloo or nccl)");
    }
    out = new Group{store, pg, timeout};
  });
  return rc == 0 ? out : nullptr;
}

// After a clean run: as destroy_process_group, NCCL flushes its queue and joins its watchdog;
// then the group and the store are freed (rank 0's store server stops: every rank has passed the
// final barrier). The handle is gone even when this fails.
int medgen_dist_shutdown(void* g, char* err, size_t err_len) {
  std::unique_ptr<Group> grp(static_cast<Group*>(g));
  return guarded(err, err_len, [&] { grp->backend->shutdown(); });
}

// After a failure, when peers may be dead or stuck: NCCL aborts its communicators and stops its
// watchdog without waiting for them. The group is not freed: freeing a Gloo group waits for its
// queued collectives, each up to the timeout, and the process is about to exit anyway.
int medgen_dist_abort(void* g, char* err, size_t err_len) {
  auto* grp = static_cast<Group*>(g);
  return guarded(err, err_len, [&] { grp->backend->abort(); });
}

// In-place sum of each tensor across the group (every rank passes the same shapes, in order).
int medgen_dist_all_reduce_sum(void* g, at::Tensor** ts, int n, char* err, size_t err_len) {
  auto* grp = static_cast<Group*>(g);
  return guarded(err, err_len, [&] {
    each_then_wait(grp, ts, n, [&](std::vector<at::Tensor>& one) {
      c10d::AllreduceOptions o;
      o.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
      o.timeout = grp->timeout;
      return grp->backend->allreduce(one, o);
    });
  });
}

// Each tensor replaced by rank `root`'s.
int medgen_dist_broadcast(void* g, at::Tensor** ts, int n, int root, char* err, size_t err_len) {
  auto* grp = static_cast<Group*>(g);
  return guarded(err, err_len, [&] {
    each_then_wait(grp, ts, n, [&](std::vector<at::Tensor>& one) {
      c10d::BroadcastOptions o;
      o.rootRank = root;
      o.timeout = grp->timeout;
      return grp->backend->broadcast(one, o);
    });
  });
}

int medgen_dist_barrier(void* g, char* err, size_t err_len) {
  auto* grp = static_cast<Group*>(g);
  return guarded(err, err_len, [&] {
    c10d::BarrierOptions o;
    o.timeout = grp->timeout;
    grp->backend->barrier(o)->wait(grp->timeout);
  });
}

}

// ---------------------------------------------------------------------------------------------
// Gradient averaging that overlaps the backward pass, as DDP's reducer does: a hook on every
// parameter copies its gradient into a flat bucket as soon as autograd has computed it, and a
// bucket's all-reduce starts the moment its last gradient arrives, while the backward pass goes on
// with the earlier layers. Buckets follow the parameters in reverse order (gradients arrive
// roughly from the last layer back). `finish` sends what never arrived (unused parameters: their
// current gradient or zeros), waits, and writes the averages into `.grad`.

namespace {

struct Bucket {
  at::Tensor flat;
  std::vector<int> params;
  std::vector<int64_t> offsets;
  int pending = 0;
  c10::intrusive_ptr<c10d::Work> work;
};

struct Reducer {
  Group* group;
  std::vector<at::Tensor> params;
  std::vector<int> bucket_of, slot_of;
  std::vector<bool> ready;
  std::vector<Bucket> buckets;
  bool armed = false;
  std::mutex m;

  void launch(Bucket& b) {
    std::vector<at::Tensor> one{b.flat};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
    o.timeout = group->timeout;
    b.work = group->backend->allreduce(one, o);
  }

  void put(int i, const at::Tensor& grad) {
    at::NoGradGuard ng;
    Bucket& b = buckets[bucket_of[i]];
    const auto n = params[i].numel();
    b.flat.narrow(0, b.offsets[slot_of[i]], n).copy_(grad.reshape({n}));
  }

  void on_grad(int i, const at::Tensor& grad) {
    std::lock_guard<std::mutex> lock(m);
    if (!armed || ready[i]) return;
    put(i, grad);
    ready[i] = true;
    Bucket& b = buckets[bucket_of[i]];
    if (--b.pending == 0) launch(b);
  }
};

}  // namespace

extern "C" {

void* medgen_reducer_new(void* g, at::Tensor** ps, int n, int64_t bucket_bytes, char* err, size_t err_len) {
  Reducer* out = nullptr;
  int rc = guarded(err, err_len, [&] {
    auto r = std::make_unique<Reducer>();
    r->group = static_cast<Group*>(g);
    for (int i = 0; i < n; ++i) r->params.push_back(*ps[i]);
    r->bucket_of.assign(n, -1);
    r->slot_of.assign(n, -1);
    r->ready.assign(n, false);
    int64_t bytes = 0;
    for (int i = n - 1; i >= 0; --i) {
      const auto& p = r->params[i];
      TORCH_CHECK(p.requires_grad(), "parameter ", i, " does not require grad");
      const int64_t size = p.numel() * static_cast<int64_t>(p.element_size());
      bool fits = !r->buckets.empty();
      if (fits) {
        const auto& first = r->params[r->buckets.back().params[0]];
        fits = first.scalar_type() == p.scalar_type() && first.device() == p.device() && bytes + size <= bucket_bytes;
      }
      if (!fits) {
        r->buckets.emplace_back();
        bytes = 0;
      }
      Bucket& b = r->buckets.back();
      r->bucket_of[i] = static_cast<int>(r->buckets.size()) - 1;
      r->slot_of[i] = static_cast<int>(b.params.size());
      b.offsets.push_back(b.params.empty() ? 0 : b.offsets.back() + r->params[b.params.back()].numel());
      b.params.push_back(i);
      bytes += size;
    }
    for (auto& b : r->buckets) {
      const auto& last = r->params[b.params.back()];
      b.flat = at::zeros({b.offsets.back() + last.numel()}, last.options().requires_grad(false));
    }
    Reducer* raw = r.get();
    for (int i = 0; i < n; ++i) {
      r->params[i].register_hook([raw, i](const at::Tensor& grad) { raw->on_grad(i, grad); });
    }
    out = r.release();
  });
  return rc == 0 ? out : nullptr;
}

// Before a backward pass whose gradients are to be averaged.
void medgen_reducer_prepare(void* rp) {
  auto* r = static_cast<Reducer*>(rp);
  std::lock_guard<std::mutex> lock(r->m);
  std::fill(r->ready.begin(), r->ready.end(), false);
  for (auto& b : r->buckets) {
    b.pending = static_cast<int>(b.params.size());
    b.work.reset();
  }
  r->armed = true;
}

// After it: every parameter's `.grad` becomes the mean over the group.
int medgen_reducer_finish(void* rp, char* err, size_t err_len) {
  auto* r = static_cast<Reducer*>(rp);
  return guarded(err, err_len, [&] {
    std::lock_guard<std::mutex> lock(r->m);
    TORCH_CHECK(r->armed, "finish without prepare");
    r->armed = false;
    at::NoGradGuard ng;
    for (auto& b : r->buckets) {
      if (b.pending == 0) continue;
      for (int i : b.params) {
        if (r->ready[i]) continue;
        const auto& g = r->params[i].grad();
        if (g.defined()) {
          r->put(i, g);
        } else {
          b.flat.narrow(0, b.offsets[r->slot_of[i]], r->params[i].numel()).zero_();
        }
      }
      b.pending = 0;
      r->launch(b);
    }
    const double world = static_cast<double>(r->group->backend->getSize());
    for (auto& b : r->buckets) {
      b.work->wait(r->group->timeout);
      b.flat.div_(world);
      for (size_t k = 0; k < b.params.size(); ++k) {
        auto& p = r->params[b.params[k]];
        auto avg = b.flat.narrow(0, b.offsets[k], p.numel()).view(p.sizes());
        if (p.grad().defined()) {
          p.mutable_grad().copy_(avg);
        } else {
          p.mutable_grad() = avg.clone();
        }
      }
      b.work.reset();
    }
  });
}
// No free: the hooks hold the reducer, which lives as long as the parameters (the whole run).
}
