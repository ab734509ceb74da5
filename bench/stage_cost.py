#!/usr/bin/env python3
"""What one training step of each medgen stage costs, from a medgen config directory: FLOPs and memory.

The stage's networks are MONAI Generative's (the reference's), built from the config's `params` and run on fake
CUDA tensors (torch's FakeTensorMode: shapes, dtypes and CUDA autocast's dtype rules, no data, no GPU). One
training step is what `medgen train` runs (src/train/aekl.rs, src/train/diffusion.rs, as reference-repo.md §3.5-3.7):

- aekl: AutoencoderKL forward (posterior sample) and backward, LPIPS on (reconstruction, image) when
  perceptual_weight > 0, and from adv_start on the discriminator on the reconstruction (generator step) then on the
  detached reconstruction and the image (discriminator step), each with its backward.
- ldm: the frozen encoder's forward (no grad), the UNet forward and backward on the (batch, 77, width) context.
- controlnet: the frozen encoder, the ControlNet forward and backward, the frozen UNet forward with the ControlNet's
  residuals and the backward through it to them.

medgen reads the CLIP context from a file; the reference runs the SD-2.1 text encoder every step, with gradients
(reference-repo.md §3.4): the `reference` GFLOP column adds it (a CLIPTextModel of that shape, random weights).

FLOPs: torch.utils.flop_counter.FlopCounterMode (convolutions, matrix products, attention; not norms or pointwise
ops). Memory: every storage an op creates is tracked until it is freed (a weak reference per storage), so the peak
is the live bytes of the step as the CUDA caching allocator would be asked for them, without its rounding and
fragmentation, cuDNN workspaces or the CUDA context. Weights, gradients (kept between steps: medgen zeroes them in
place) and the Adam moments are counted from the parameter counts. The tracked peak is measured at two batch sizes
and extrapolated linearly (checked against a third); `--cpu-check` runs the AutoencoderKL step for real on the CPU
and compares its resident-memory growth with the same prediction on CPU tensors.

    .venv/bin/python bench/stage_cost.py --set reference=configs/reference:175000 --set demo=configs/demo:800 \\
        --json bench/stage_cost.json --doc docs/reference-configs.md [--cpu-check 2]

`--check docs/reference-configs.md` regenerates the doc's block (the sets it names) and exits 1 where it differs;
`--check-memory SET:STAGE,...` limits the slow memory part to those rows (make test's subset).
"""
import argparse
import contextlib
import json
import math
import os
import re
import sys
import threading
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

# The reference's image and text shapes (reference-repo.md §1.3, §3.4).
IMAGE = (1, 160, 224)
CONTEXT_TOKENS = 77
# H100 SXM dense fp16/bf16 tensor-core peak (no sparsity), TFLOP/s; the estimate assumes this fraction of it. The
# low end is for the AutoencoderKL: at 128 channels a 3x3 convolution does 2304 FLOP per output value, while the
# group norm and SiLU after it (fp32 under autocast) move about 22 bytes per value: 6.6 ps at 3.35 TB/s against
# the convolution's 2.3 ps at the tensor cores' peak.
H100_PEAK_TFLOPS = 989.4
UTILISATION = (0.20, 0.40)
# Where the reference ran each stage (cluster/runai/training/*.sh): GPUs under DataParallel.
REFERENCE_GPUS = {"aekl": 8, "ldm": 4, "controlnet": 4}
GIB = 1024**3
# What one process may plan to use of an 80 GB H100 (79.6 GiB on the card): the rest is for the CUDA context, cuDNN's
# workspaces, the caching allocator's rounding and fragmentation and DDP's gradient buckets, none of them tracked.
H100_PLAN_GIB = 72


def read(path):
    with open(path) as f:
        return json.load(f)


def params_of(cfg, section):
    s = cfg.get(section, cfg)
    return dict(s.get("params", s))


# --- networks ------------------------------------------------------------------------------------------------------


def build_aekl(cfg):
    from generative.networks.nets import AutoencoderKL

    return AutoencoderKL(**params_of(cfg, "stage1"))


def build_discriminator(cfg):
    from generative.networks.nets.patchgan_discriminator import PatchDiscriminator

    return PatchDiscriminator(**params_of(cfg, "discriminator"))


def build_lpips(cfg):
    import lpips

    net = params_of(cfg, "perceptual_network").get("network_type", "alex")
    # The reference's LPIPS (PerceptualLoss -> lpips.LPIPS(net=...)) without loading any weights: the FLOPs and
    # memory do not depend on them.
    m = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False).eval()
    # Its scaling constants come from the legacy torch.Tensor constructor, which ignores the default device.
    for name, v in (("shift", [-0.030, -0.088, -0.188]), ("scale", [0.458, 0.448, 0.450])):
        m.scaling_layer.register_buffer(name, torch.tensor(v)[None, :, None, None])
    return m


def build_unet(cfg):
    from generative.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(**params_of(cfg, "ldm"))


def build_controlnet(cfg):
    from generative.networks.nets import ControlNet

    return ControlNet(**params_of(cfg, "controlnet"))


def build_text_encoder(width):
    from transformers import CLIPTextConfig, CLIPTextModel

    # SD-2.1(-base)'s text encoder: the OpenCLIP ViT-H text tower (reference-repo.md §3.4).
    c = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=23,
        num_attention_heads=16,
        max_position_embeddings=CONTEXT_TOKENS,
        hidden_act="gelu",
        projection_dim=512,
    )
    c._attn_implementation = "eager"
    return CLIPTextModel(c)


def count(module, trainable=None):
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


# --- measuring -----------------------------------------------------------------------------------------------------


# CUDA autocast's fp16 rules (torch/csrc/autograd/autocast_mode.cpp's CUDA lists) for the ops these networks call:
# matrix products run in fp16; reductions, norms, losses, exp/log/pow and upsampling in fp32; `cat` at the widest
# input type. `verify_emulation` checks them against real CUDA autocast on fake CUDA tensors, op by op.
LOWER = {
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear", "matmul",
    "__matmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "prelu", "scaled_dot_product_attention",
}
FP32 = {
    "exp", "log", "log2", "log10", "log1p", "expm1", "pow", "__pow__", "rsqrt", "reciprocal", "layer_norm",
    "group_norm", "softmax", "log_softmax", "sum", "cumsum", "cumprod", "prod", "mse_loss", "l1_loss",
    "smooth_l1_loss", "interpolate", "norm", "cosine_similarity", "binary_cross_entropy_with_logits", "logsumexp",
    "acos", "asin", "cosh", "sinh", "tan", "erfinv", "softplus",
}
PROMOTE = {"cat", "stack", "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "index_put", "scatter_add"}


class EmulatedCudaAutocast(torch.overrides.TorchFunctionMode):
    """torch.autocast("cuda", torch.float16) on CPU tensors. Fake CUDA tensors follow CUDA autocast's rules, but
    the autograd engine will not run backward on them without a GPU; CPU fake tensors do, with these rules."""

    def __init__(self):
        super().__init__()
        self.cache = {}

    def _cast(self, t, dtype):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype):
            return t
        if dtype != torch.float16:
            return t.to(dtype)
        # Autocast caches the fp16 copy of a leaf that requires grad (a trained weight) for the region.
        if t.requires_grad and t.is_leaf and torch.is_grad_enabled():
            if id(t) not in self.cache:
                self.cache[id(t)] = (t, t.to(dtype))
            return self.cache[id(t)][1]
        return t.to(dtype)

    def _map(self, x, dtype):
        if isinstance(x, (list, tuple)):
            return type(x)(self._map(v, dtype) for v in x)
        return self._cast(x, dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in LOWER or name in FP32:
            dtype = torch.float16 if name in LOWER else torch.float32
            from_ = torch.float32 if name in LOWER else torch.float16
            cast = lambda v: self._map(v, dtype) if _dtype_in(v, from_) else v  # noqa: E731
            args, kwargs = [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}
        elif name in PROMOTE:
            leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if len({t.dtype for t in leaves}) > 1:
                args = [self._map(a, torch.float32) for a in args]
        return func(*args, **kwargs)


def _dtype_in(v, dtype):
    return any(isinstance(t, torch.Tensor) and t.dtype == dtype for t in tree_leaves(v))


@contextlib.contextmanager
def autocast(amp, device):
    """fp16 autocast with CUDA's rules: the real one for fake CUDA tensors (torch.autocast refuses without a GPU, so
    its state is set directly), the emulation for CPU tensors."""
    if not amp:
        yield
    elif device == "cpu":
        with EmulatedCudaAutocast():
            yield
    else:
        prev = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", torch.float16)
        torch.autocast_increment_nesting()
        try:
            yield
        finally:
            if torch.autocast_decrement_nesting() == 0:
                torch.clear_autocast_cache()
            torch.set_autocast_enabled("cuda", prev[0])
            torch.set_autocast_dtype("cuda", prev[1])


# The ops whose output dtype autocast decides, compared in order between real and emulated autocast. Matrix products
# are compared as a set of dtypes: the kernels differ by device (a linear layer is addmm, mm + add or bmm), as do
# cuDNN's batch norm and the odd clone, which are not compared.
COMPARED = {
    "convolution", "native_group_norm", "native_layer_norm", "_softmax", "upsample_nearest2d", "silu", "gelu",
    "leaky_relu", "mse_loss", "l1_loss", "sum", "mean", "exp", "log", "pow", "cat", "batch_norm",
}
MATMUL = {"mm", "addmm", "bmm", "baddbmm"}


class OpLog(TorchDispatchMode):
    """The ops of COMPARED run under it, with their first output's dtype, and the dtypes of matrix products."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.matmul_dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        name = {"cudnn_batch_norm": "batch_norm", "native_batch_norm": "batch_norm"}.get(name, name)
        first = next((t for t in tree_leaves(out) if isinstance(t, torch.Tensor)), None)
        if name in COMPARED:
            self.ops.append((name, str(first.dtype).replace("torch.", "")))
        elif name in MATMUL:
            self.matmul_dtypes.add(str(first.dtype).replace("torch.", ""))
        return out


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under it that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = {}
        self.now = 0
        self.peak = 0

    def _sweep(self):
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view or an in-place result shares an input's storage: no new memory (the weights and the gradients
        # that exist before the step are such inputs).
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        new = {}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st._cdata not in self.live and st._cdata not in inputs:
                    new[st._cdata] = st
        if new:
            # The live total can only reach a new peak when something is allocated, so frees need to be found only
            # then: sweeping after every op (views, in-place ops) gave the same peaks, slower.
            self._sweep()
            for key, st in new.items():
                self.live[key] = (StorageWeakRef(st), st.nbytes())
                self.now += st.nbytes()
            self.peak = max(self.peak, self.now)
        return out


@contextlib.contextmanager
def saved_bytes(acc):
    """Sums the bytes of the distinct storages autograd saves for backward (parameters excluded)."""
    seen = set()

    def pack(t):
        st = t.untyped_storage()
        if not isinstance(t, torch.nn.Parameter) and st._cdata not in seen:
            seen.add(st._cdata)
            acc[0] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def prepare_grads(*modules):
    """Gradients exist before the step, as in medgen (zeroed in place, never freed)."""
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)


# --- one training step per stage ----------------------------------------------------------------------------------


def aekl_generator(nets, x, adversarial):
    ae, disc, lp, w = nets["ae"], nets["disc"], nets.get("lpips"), nets["weights"]
    z_mu, z_sigma = ae.encode(x)
    rec = ae.decode(ae.sampling(z_mu, z_sigma))
    rec32, x32 = rec.float(), x.float()
    loss = F.l1_loss(rec32, x32)
    if lp is not None:
        loss = loss + w["perceptual_weight"] * lp(rec32, x32).mean()
    kl = 0.5 * torch.sum(z_mu.float().pow(2) + z_sigma.float().pow(2) - torch.log(z_sigma.float().pow(2)) - 1)
    loss = loss + w["kl_weight"] * kl / x.shape[0]
    if adversarial:
        logits = disc(rec32.contiguous())[-1]
        loss = loss + w["adv_weight"] * F.mse_loss(logits.float(), torch.ones_like(logits.float()))
    return loss, rec


def aekl_discriminator(nets, x, rec):
    disc = nets["disc"]
    fake = disc(rec.detach().contiguous())[-1].float()
    real = disc(x.contiguous())[-1].float()
    d = 0.5 * (F.mse_loss(fake, torch.zeros_like(fake)) + F.mse_loss(real, torch.ones_like(real)))
    return nets["weights"]["adv_weight"] * d


def diffusion_loss(nets, x, flair, token_ids):
    ae, unet, cn, te = nets["ae"], nets["unet"], nets.get("controlnet"), nets.get("text_encoder")
    b = x.shape[0]
    with torch.no_grad():
        e = ae.encode_stage_2_inputs(x).float() * 0.3
    noise = torch.randn_like(e)
    t = torch.randint(0, 1000, (b,), device=x.device)
    noisy = e + noise  # add_noise is pointwise: only its shape matters here
    if te is not None:
        context = te(token_ids)[0]
    elif nets["width"] is not None:
        context = torch.zeros(b, CONTEXT_TOKENS, nets["width"], device=x.device)
    else:
        context = None
    if cn is not None:
        down, mid = cn(x=noisy, timesteps=t, controlnet_cond=flair, conditioning_scale=1.0, context=context)
        pred = unet(
            x=noisy, timesteps=t, context=context, down_block_additional_residuals=down, mid_block_additional_residual=mid
        )
    else:
        pred = unet(x=noisy, timesteps=t, context=context)
    return F.mse_loss(pred.float(), noise)


def run_step(stage, nets, batch, amp, device, adversarial=True, saved=None, backward=True):
    """One training step (forward passes under autocast when `amp`, backward passes outside, as medgen). Returns
    the bytes autograd saved for backward."""
    saved = saved if saved is not None else [0]
    x = torch.rand(batch, *IMAGE, device=device)
    if stage == "aekl":
        with saved_bytes(saved), autocast(amp, device):
            loss, rec = aekl_generator(nets, x, adversarial)
        if backward:
            loss.backward()
        if adversarial:
            with saved_bytes(saved), autocast(amp, device):
                d = aekl_discriminator(nets, x, rec)
            if backward:
                d.backward()
    else:
        flair = torch.rand(batch, *IMAGE, device=device) if stage == "controlnet" else None
        ids = torch.zeros(batch, CONTEXT_TOKENS, dtype=torch.long, device=device)
        with saved_bytes(saved), autocast(amp, device):
            loss = diffusion_loss(nets, x, flair, ids)
        if backward:
            loss.backward()
    return saved[0]


def verify_emulation(stage, cfgs, batch=1):
    """The forward passes of one step under real CUDA autocast (fake CUDA tensors) and under the emulation (fake CPU
    tensors): the same ops with the same output dtypes, and the same bytes saved for backward."""
    result = {}
    for device in ("cuda", "cpu"):
        with FakeTensorMode():
            nets, trained, _ = build_stage(stage, cfgs, device)
            log, saved = OpLog(), [0]
            with log:
                run_step(stage, nets, batch, amp=True, device=device, saved=saved, backward=False)
            result[device] = (log.ops, saved[0], log.matmul_dtypes)
    (cuda_ops, cuda_saved, cuda_mm), (cpu_ops, cpu_saved, cpu_mm) = result["cuda"], result["cpu"]
    mismatches = sum(a != b for a, b in zip(cuda_ops, cpu_ops)) + abs(len(cuda_ops) - len(cpu_ops))
    first = next((f"{a} vs {b}" for a, b in zip(cuda_ops, cpu_ops) if a != b), None)
    return {
        "stage": stage,
        "ops": len(cuda_ops),
        "mismatched_ops": mismatches,
        "first_mismatch": first,
        "matmul_dtypes": {"cuda": sorted(cuda_mm), "emulated": sorted(cpu_mm)},
        "saved_bytes_cuda": cuda_saved,
        "saved_bytes_emulated": cpu_saved,
    }


def build_stage(stage, cfgs, device, text_encoder=False):
    """The stage's networks on `device`, trained ones with gradients, frozen ones without."""
    nets = {}
    with torch.device(device):
        if stage == "aekl":
            c = cfgs["aekl"]
            nets["ae"], nets["disc"] = build_aekl(c), build_discriminator(c)
            nets["weights"] = {k: float(c["stage1"][k]) for k in ("perceptual_weight", "kl_weight", "adv_weight")}
            if nets["weights"]["perceptual_weight"] > 0:
                nets["lpips"] = build_lpips(c).requires_grad_(False)
            trained, frozen = [nets["ae"], nets["disc"]], [nets.get("lpips")]
        else:
            nets["ae"] = build_aekl(cfgs["aekl"]).requires_grad_(False).eval()
            unet_params = params_of(cfgs["ldm"], "ldm")
            nets["width"] = unet_params.get("cross_attention_dim") if unet_params.get("with_conditioning") else None
            nets["unet"] = build_unet(cfgs["ldm"])
            if stage == "controlnet":
                nets["unet"].requires_grad_(False).eval()
                nets["controlnet"] = build_controlnet(cfgs["controlnet"])
                trained, frozen = [nets["controlnet"]], [nets["ae"], nets["unet"]]
            else:
                trained, frozen = [nets["unet"]], [nets["ae"]]
            if text_encoder and nets["width"] is not None:
                # The reference's encoder is in no optimiser but is not frozen: its gradients are computed.
                nets["text_encoder"] = build_text_encoder(nets["width"])
    trained = [m for m in trained if m is not None]
    frozen = [m for m in frozen if m is not None]
    return nets, trained, frozen


def flops_per_image(stage, cfgs, adversarial=True, text_encoder=False, batch=2):
    with FakeTensorMode():
        nets, trained, _ = build_stage(stage, cfgs, "cpu", text_encoder=text_encoder)
        prepare_grads(*trained)
        counter = FlopCounterMode(display=False)
        with counter:
            run_step(stage, nets, batch, amp=False, device="cpu", adversarial=adversarial)
    return counter.get_total_flops() / batch


def param_counts(stage, cfgs):
    """(trained, frozen) parameter counts of the stage."""
    with FakeTensorMode():
        _, trained, frozen = build_stage(stage, cfgs, "cpu")
        # Frozen weights, and the trained stage's parameters that do not train (none in these nets).
        return sum(count(m, True) for m in trained), sum(count(m) for m in frozen) + sum(count(m, False) for m in trained)


def aekl_forward_by_hand(cfg):
    """The AutoencoderKL's forward FLOPs (encode, sample, decode; one image) twice: by FlopCounterMode, and summed
    over its Conv2d layers from their shapes, 2 * k_h * k_w * C_in / groups * C_out * H_out * W_out each (it has no
    attention in these configs, so convolutions are all its matrix work). Guards against a torch release counting
    differently."""
    with FakeTensorMode():
        ae = build_aekl(cfg)
        if any(isinstance(m, torch.nn.MultiheadAttention) or "attn" in n.lower() for n, m in ae.named_modules()):
            return None
        total = [0]

        def hook(m, _inputs, out):
            kh, kw = m.kernel_size
            total[0] += 2 * kh * kw * (m.in_channels // m.groups) * m.out_channels * out.shape[0] * out[0, 0].numel()

        hooks = [m.register_forward_hook(hook) for m in ae.modules() if isinstance(m, torch.nn.Conv2d)]
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            z_mu, z_sigma = ae.encode(torch.rand(1, *IMAGE))
            ae.decode(ae.sampling(z_mu, z_sigma))
        for h in hooks:
            h.remove()
    return {"flop_counter": counter.get_total_flops(), "by_hand": total[0]}


def memory(stage, cfgs, batches, amp, adversarial=True):
    """Tracked peak and saved-for-backward bytes of one step at each batch size (fake tensors)."""
    out = {}
    with FakeTensorMode():
        nets, trained, frozen = build_stage(stage, cfgs, "cpu")
        prepare_grads(*trained)
        for b in batches:
            tracker, saved = LiveBytes(), [0]
            with tracker:
                run_step(stage, nets, b, amp=amp, device="cpu", adversarial=adversarial, saved=saved)
            out[b] = {"peak": tracker.peak, "saved": saved[0]}
            prepare_grads(*trained)
    n_trained = sum(count(m, True) for m in trained)
    # Frozen weights, and the trained stage's parameters that do not train (none in these nets).
    n_frozen = sum(count(m) for m in frozen) + sum(count(m, False) for m in trained)
    return out, n_trained, n_frozen


def linear(points):
    """(constant, per image) of a straight line through the first two (batch, bytes) points."""
    (b0, y0), (b1, y1) = points[0], points[1]
    per = (y1 - y0) / (b1 - b0)
    return y0 - per * b0, per


# --- the CPU cross-check ------------------------------------------------------------------------------------------


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_check(cfgs, batch, stage="aekl"):
    """Runs a real fp32 step on the CPU after a first one and compares the growth of resident memory (sampled every millisecond)
    with the tracked peak of the same step on fake CPU tensors. Large blocks are mmap'ed (MALLOC_MMAP_THRESHOLD_,
    set by re-executing this script), so freed memory leaves the resident set at once."""
    with FakeTensorMode():
        nets, trained, _ = build_stage(stage, cfgs, "cpu")
        prepare_grads(*trained)
        tracker, saved = LiveBytes(), [0]
        with tracker:
            run_step(stage, nets, batch, amp=False, device="cpu", saved=saved)
        predicted = tracker.peak
    torch.manual_seed(0)
    nets, trained, _ = build_stage(stage, cfgs, "cpu")
    prepare_grads(*trained)
    # A first step pages in the kernels' code and oneDNN's primitive caches, which the second, measured step (as
    # every later training step) finds in place.
    run_step(stage, nets, batch, amp=False, device="cpu")
    base = rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    counter = FlopCounterMode(display=False)
    t0 = time.perf_counter()
    with counter:
        run_step(stage, nets, batch, amp=False, device="cpu")
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    return {
        "stage": stage,
        "batch": batch,
        "precision": "fp32",
        "predicted_peak_bytes": predicted,
        "measured_rss_growth_bytes": peak[0] - base,
        "seconds": seconds,
        "gflop": counter.get_total_flops() / 1e9,
        "threads": torch.get_num_threads(),
    }


# --- the report ---------------------------------------------------------------------------------------------------


STAGES = ("aekl", "ldm", "controlnet")


def read_set(directory):
    return {s: read(os.path.join(directory, f"{s}.json")) for s in STAGES}


def analyse(name, directory, train_images, memory_stages=STAGES, verify=True, batches=(1, 2, 4)):
    """The rows of one config set: FLOPs of every stage, memory of the stages in `memory_stages`, and the autocast
    emulation's check when `verify`."""
    cfgs = read_set(directory)
    rows = []
    for stage in STAGES:
        t = cfgs[stage].get("train", {})
        batch, epochs = int(t.get("batch_size", 8)), int(t.get("n_epochs", 10))
        steps = math.ceil(train_images / batch)
        row = {"set": name, "config": os.path.join(directory, f"{stage}.json"), "stage": stage, "batch": batch}
        row.update({"n_epochs": epochs, "train_images": train_images, "steps_per_epoch": steps})
        row["params_trained"], row["params_frozen"] = param_counts(stage, cfgs)
        if stage == "aekl":
            adv_start = min(int(t.get("adv_start", 0)), epochs)
            g_on = flops_per_image(stage, cfgs, adversarial=True)
            g_off = flops_per_image(stage, cfgs, adversarial=False)
            row["gflop_per_image"] = g_on / 1e9
            row["gflop_per_image_before_adv_start"] = g_off / 1e9
            row["adv_start"] = adv_start
            total = train_images * (adv_start * g_off + (epochs - adv_start) * g_on)
            row["forward_by_hand"] = aekl_forward_by_hand(cfgs["aekl"])
        else:
            g = flops_per_image(stage, cfgs)
            row["gflop_per_image"] = g / 1e9
            if params_of(cfgs["ldm"], "ldm").get("with_conditioning"):
                row["reference_gflop_per_image"] = flops_per_image(stage, cfgs, text_encoder=True) / 1e9
            total = train_images * epochs * g
        row["tflop_per_epoch"] = train_images * row["gflop_per_image"] / 1e3
        row["pflop_total"] = total / 1e15
        if stage in memory_stages:
            mem = {}
            for precision, amp in (("fp32", False), ("fp16_amp", True)):
                points, n_trained, n_frozen = memory(stage, cfgs, batches, amp)
                const, per = linear([(b, points[b]["peak"]) for b in batches[:2]])
                check_b = batches[2]
                static = 16 * n_trained + 4 * n_frozen
                mem[precision] = {
                    "static_bytes": static,
                    "peak_constant_bytes": const,
                    "peak_per_image_bytes": per,
                    "saved_per_image_bytes": (points[batches[1]]["saved"] - points[batches[0]]["saved"])
                    / (batches[1] - batches[0]),
                    "linearity_check": {"batch": check_b, "tracked": points[check_b]["peak"], "line": const + per * check_b},
                    "at_batch_bytes": static + const + per * batch,
                }
                gpus = REFERENCE_GPUS[stage]
                if name == "reference" and batch % gpus == 0:
                    mem[precision]["reference_gpus"] = gpus
                    mem[precision]["per_gpu_bytes"] = static + const + per * (batch // gpus)
            row["memory"] = mem
        if verify:
            row["autocast_check"] = verify_emulation(stage, cfgs)
        rates = [H100_PEAK_TFLOPS * u for u in UTILISATION]
        row["h100_seconds_per_epoch"] = [row["tflop_per_epoch"] / r for r in reversed(rates)]
        row["h100_seconds_total"] = [row["pflop_total"] * 1e3 / r for r in reversed(rates)]
        rows.append(row)
        print(f"{name} {stage}: {row['gflop_per_image']:.1f} GFLOP/image", file=sys.stderr)
    return rows


def fmt_int(n):
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def gib(b):
    return f"{b / GIB:.1f}"


def two_digits(x):
    """Two significant digits, never in exponent form."""
    if x >= 10:
        return f"{x:,.0f}"
    return f"{x:.{max(1, 1 - math.floor(math.log10(x)))}f}"


def duration(seconds):
    """A (fast, slow) pair of durations in the unit of the slow one."""
    slow = seconds[1]
    unit, div = ("h", 3600) if slow >= 3 * 3600 else ("min", 60) if slow >= 180 else ("s", 1)
    return f"{two_digits(seconds[0] / div)}–{two_digits(seconds[1] / div)} {unit}"


def flop_line(r):
    g = f"{r['gflop_per_image']:.1f}"
    if "gflop_per_image_before_adv_start" in r:
        g += f" ({r['gflop_per_image_before_adv_start']:.1f} before epoch {r['adv_start']})"
    if "reference_gflop_per_image" in r:
        g += f" (reference, text encoder too: {r['reference_gflop_per_image']:.1f})"
    return (
        f"| {r['set']} | {r['stage']} | {fmt_int(r['params_trained'])} | {fmt_int(r['params_frozen'])} | {g} | "
        f"{r['batch']} | {r['steps_per_epoch']:,} | {r['tflop_per_epoch']:,.1f} | {duration(r['h100_seconds_per_epoch'])} | "
        f"{r['n_epochs']} | {r['pflop_total']:,.2f} | {duration(r['h100_seconds_total'])} |"
    )


def memory_line(r):
    a, h = r["memory"]["fp32"], r["memory"]["fp16_amp"]
    split = "–"
    if "per_gpu_bytes" in h:
        split = f"{gib(h['per_gpu_bytes'])} ({h['reference_gpus']} × {r['batch'] // h['reference_gpus']})"
    fits = "more than 8"
    for n in (1, 2, 4, 8):
        each = h["static_bytes"] + h["peak_constant_bytes"] + h["peak_per_image_bytes"] * r["batch"] / n
        if r["batch"] % n == 0 and each <= H100_PLAN_GIB * GIB:
            fits = f"{n} ({gib(each)} each)"
            break
    return (
        f"| {r['set']} | {r['stage']} | {r['batch']} | {gib(a['static_bytes'])} | "
        f"{a['peak_per_image_bytes'] / 2**20:,.0f} / {h['peak_per_image_bytes'] / 2**20:,.0f} | "
        f"{gib(a['at_batch_bytes'])} / {gib(h['at_batch_bytes'])} | {split} | {fits} |"
    )


def markdown(rows, sets, checks=(), demo_times=()):
    """The generated block. Its first line names the sets, so that --check can regenerate it alone."""
    out = ["<!-- bench/stage_cost.py " + " ".join(f"--set {n}={d}:{i}" for n, d, i in sets) + " -->", ""]
    lo, hi = (f"{u * 100:.0f} %" for u in UTILISATION)
    out.append(
        "| set | stage | trained params | frozen params | GFLOP per training image (forward + backward) | batch | "
        "steps per epoch | TFLOP per epoch | H100 time per epoch | epochs | PFLOP, whole run | "
        f"H100 time, whole run ({hi}–{lo} of {H100_PEAK_TFLOPS:g} TFLOP/s) |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    out += [flop_line(r) for r in rows]
    out.append("")
    out.append(
        "| set | stage | batch | weights + grads + Adam (GiB) | activations per image, fp32 / fp16 AMP (MiB) | "
        "peak at the batch, fp32 / fp16 AMP (GiB) | per GPU at the reference's split, fp16 AMP (GiB) | "
        f"fewest 80 GB H100s (NPROC) at ≤ {H100_PLAN_GIB} GiB each, fp16 AMP |"
    )
    out.append("|---|---|---|---|---|---|---|---|")
    out += [memory_line(r) for r in rows if "memory" in r]
    lin = [m["linearity_check"] for r in rows if "memory" in r for m in r["memory"].values()]
    if lin:
        worst = max(abs(c["line"] - c["tracked"]) / c["tracked"] for c in lin)
        out.append("")
        out.append(
            f"Linearity: in each of the {len(lin)} (stage, precision) pairs above, the line through the tracked peaks "
            f"at batch 1 and 2 meets the tracked peak at batch {lin[0]['batch']} within {worst * 100:.2f} %."
        )
    hand = [r for r in rows if r.get("forward_by_hand")]
    if hand:
        out.append("")
        out.append(
            "FLOP count check, AutoencoderKL forward (encode, sample, decode) of one image: "
            + "; ".join(
                f"{r['set']}: {r['forward_by_hand']['flop_counter'] / 1e9:,.2f} GFLOP by FlopCounterMode, "
                f"{r['forward_by_hand']['by_hand'] / 1e9:,.2f} GFLOP summed over its Conv2d layers "
                "(2·k²·C_in·C_out·H_out·W_out)"
                for r in hand
            )
            + "."
        )
    v = [r["autocast_check"] for r in rows if "autocast_check" in r]
    if v:
        bad = [c for c in v if c["mismatched_ops"] or c["matmul_dtypes"]["cuda"] != c["matmul_dtypes"]["emulated"]]
        worst = max(abs(c["saved_bytes_cuda"] - c["saved_bytes_emulated"]) / c["saved_bytes_cuda"] for c in v)
        out.append("")
        out.append(
            f"fp16 AMP check: the forward passes of the {len(v)} steps above under real CUDA autocast (fake CUDA "
            f"tensors) and under the emulation used for the backward passes: {sum(c['ops'] for c in v):,} ops "
            f"compared, {sum(c['mismatched_ops'] for c in v)} with another output dtype, {len(bad)} steps differing; "
            f"bytes saved for backward within {worst * 100:.3f} % (cuDNN's batch norm saves its statistics in fp32)."
        )
    for c in checks:
        out.append("")
        out.append(
            f"CPU cross-check ({c['stage']}, {c['set']} config, batch {c['batch']}, fp32, {c['threads']} threads, "
            f"the second of two steps): tracked peak {c['predicted_peak_bytes'] / 2**20:,.0f} MiB, measured "
            f"resident-memory growth {c['measured_rss_growth_bytes'] / 2**20:,.0f} MiB "
            f"({c['measured_rss_growth_bytes'] / c['predicted_peak_bytes']:.2f}×); {c['gflop']:,.0f} GFLOP in "
            f"{c['seconds']:.1f} s ({c['gflop'] / c['seconds']:.0f} GFLOP/s, PyTorch)."
        )
    for d in demo_times:
        out.append("")
        out.append(
            f"Demo {d['stage']} on this project's 2 CPU cores (README): {d['pflop'] * 1e3:,.1f} TFLOP over "
            f"{d['epochs']} epochs in {d['minutes']} min = {d['gflops']:.0f} GFLOP/s achieved by medgen "
            "(training steps only counted; the wall time includes validation and sample grids)."
        )
    return "\n".join(out)


# README, "What the demo training gives": minutes for the demo configs' whole runs on 2 cores.
DEMO_MINUTES = {"aekl": 6.5, "ldm": 9.3, "controlnet": 10.0}

BEGIN, END = "<!-- stage_cost:begin -->", "<!-- stage_cost:end -->"
SETS_LINE = re.compile(r"<!-- bench/stage_cost\.py (.*) -->")


def parse_set(s):
    m = re.fullmatch(r"([\w-]+)=(.+):(\d+)", s)
    if not m:
        raise ValueError(f"--set {s!r}: expected NAME=CONFIG_DIR:TRAINING_IMAGES")
    return m[1], m[2], int(m[3])


def doc_block(path):
    with open(path) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        sys.exit(f"{path}: no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    block, tail = rest.split(END, 1)
    return head, block.strip("\n"), tail


def demo_wall_times(rows):
    out = []
    for r in rows:
        if r["set"] == "demo":
            minutes = DEMO_MINUTES[r["stage"]]
            out.append(
                {
                    "stage": r["stage"],
                    "epochs": r["n_epochs"],
                    "minutes": minutes,
                    "pflop": r["pflop_total"],
                    "gflops": r["pflop_total"] * 1e6 / (minutes * 60),
                }
            )
    return out


def check(path, sets, memory_rows):
    """Regenerates the doc's block from the configs, memory only for the (set, stage) pairs in `memory_rows`, and
    fails on any regenerated line the doc does not hold, or any table row of the doc that was regenerated
    differently or not at all. Not compared: the CPU cross-check (a measurement) and the autocast check (not rerun:
    it tests the emulation, not the configs)."""
    _, block, _ = doc_block(path)
    doc_lines = block.split("\n")
    rows = []
    for name, directory, n in sets:
        stages = tuple(s for s in STAGES if (name, s) in memory_rows)
        rows += analyse(name, directory, n, memory_stages=stages, verify=False)
    fresh = markdown(rows, sets, demo_times=demo_wall_times(rows)).split("\n")
    # The linearity line sums up every memory row: it can be compared only when all of them were recomputed.
    partial = any((n, s) not in memory_rows for n, _, _ in sets for s in STAGES)
    compared = [line for line in fresh if line and not (partial and line.startswith("Linearity:"))]
    problems = [f"not in the doc: {line}" for line in compared if line not in doc_lines]
    # Each doc table row, by its (set, stage, which table): the regenerated one of that key, when there is one.
    def key(line):
        cells = [c.strip() for c in line.strip("|").split("|")]
        return (cells[0], cells[1], "memory" if len(cells) == 8 else "flops")

    fresh_rows = {key(line): line for line in fresh if line.startswith("| ") and not line.startswith("| set ")}
    for line in doc_lines:
        if line.startswith("| ") and not line.startswith("| set "):
            k = key(line)
            if k[2] == "flops" or (k[0], k[1]) in memory_rows:
                if fresh_rows.get(k) != line:
                    problems.append(f"differs from a fresh computation ({fresh_rows.get(k, 'no such row')}): {line}")
    return problems, len(fresh_rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", default=[], help="NAME=CONFIG_DIR:TRAINING_IMAGES")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--doc", help="replace the block between the stage_cost markers of this markdown file")
    ap.add_argument("--check", metavar="DOC", help="exit 1 unless DOC's block matches a fresh computation (the sets "
                    "are the ones its block names unless --set is given)")
    ap.add_argument("--check-memory", default="all", help="with --check: SET:STAGE,... whose memory rows are "
                    "recomputed and compared (the slow part), or all")
    ap.add_argument("--cpu-check", type=int, default=0, help="batch of the real CPU AutoencoderKL step (0: none)")
    ap.add_argument("--cpu-check-set", default="reference", help="which --set's AutoencoderKL the check runs")
    a = ap.parse_args()
    if a.cpu_check and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    try:
        sets = [parse_set(s) for s in a.set]
    except ValueError as e:
        ap.error(str(e))
    if a.check:
        t0 = time.perf_counter()
        if not sets:
            m = SETS_LINE.search(doc_block(a.check)[1])
            if not m:
                sys.exit(f"{a.check}: its block names no sets; give --set")
            sets = [parse_set(s) for s in m[1].split()[1::2]]
        if a.check_memory == "all":
            memory_rows = {(n, s) for n, _, _ in sets for s in STAGES}
        else:
            memory_rows = {tuple(x.split(":", 1)) for x in a.check_memory.split(",") if x}
        problems, n = check(a.check, sets, memory_rows)
        for p in problems:
            print(f"{a.check}: {p}", file=sys.stderr)
        if problems:
            sys.exit(f"{a.check}: out of date; regenerate with bench/stage_cost.py --doc {a.check} (its docstring)")
        print(f"{a.check}: {n} rows match a fresh computation ({time.perf_counter() - t0:.0f} s)")
        return
    if not sets:
        ap.error("give --set (or --check DOC)")
    rows = []
    for name, directory, n in sets:
        rows += analyse(name, directory, n)
    checks = []
    if a.cpu_check:
        directory = {n: d for n, d, _ in sets}[a.cpu_check_set]
        c = cpu_check(read_set(directory), a.cpu_check)
        c["set"] = a.cpu_check_set
        checks.append(c)
        print(f"cpu check: {c}", file=sys.stderr)
    demo_times = demo_wall_times(rows)
    table = markdown(rows, sets, checks, demo_times)
    print(table)
    if a.json:
        meta = {
            "torch": torch.__version__,
            "image": IMAGE,
            "context_tokens": CONTEXT_TOKENS,
            "h100_peak_tflops": H100_PEAK_TFLOPS,
            "utilisation": UTILISATION,
        }
        doc = {"meta": meta, "rows": rows, "cpu_checks": checks, "demo_wall_time": demo_times}
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        os.replace(tmp, a.json)
    if a.doc:
        head, _, tail = doc_block(a.doc)
        tmp = a.doc + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{head}{BEGIN}\n{table}\n{END}{tail}")
        os.replace(tmp, a.doc)


if __name__ == "__main__":
    main()
