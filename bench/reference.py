"""The Python MONAI reference side of `make bench`: times one operation the way the reference scripts
(Warvito/generative_brain_controlnet, monai-generative 0.2) do it, and prints ONE JSON line on stdout.

    python bench/reference.py CASE [--config C] [--ldm-config L] [--controlnet-config CN] [--stage1-config A]
        [--batch B] [--steps S] [--n N] [--input DIR] [--reps R] [--warmup W] [--threads T] [--height H] [--width W]

Same options and output as `medgen bench CASE` (bench/run.py runs the two alternately). Networks are built from the
JSON configs (the reference layout: stage1.params, ldm.params, controlnet.params, discriminator.params, ldm.scheduler)
with generative.networks.nets and RANDOM weights under fixed seeds: this is for timing only. Everything runs on the
CPU in fp32 (no autocast, no GradScaler: the reference's scalers are identity when AMP is off).

Cases (docs: /work/shared/docs/reference-repo.md):
  aekl-step        one G step (L1 + kl*KL + adv*generator loss, clip 1, Adam) then one D step (section 3.5); the
                   perceptual term is skipped (no LPIPS backbone offline).
  ldm-step         encode with the frozen AEKL (posterior sample) * 0.3, noise, random t, v-prediction MSE, AdamW
                   (3.6); a random (B,77,cross_attention_dim) context stands in for the CLIP text encoder.
  controlnet-step  the same with the frozen UNet and a trained ControlNet on a (B,1,H,W) FLAIR (3.7).
  denoise-step     one step of sample_flair_to_t1w.py (4.2) under no_grad: latent and FLAIR duplicated, ControlNet
                   then UNet on the 2B batch with one timestep, guidance 7, DDIM step. Unconditioned UNet: no
                   duplication, no guidance.
  sample           a whole FLAIR->T1w sample of B images: S DDIM steps as above, decode latent/0.3, clip.
  preprocess       create_png_dataset.py (1.1) over the first N subject folders of --input (copied to a scratch
                   folder, as medgen does), via tests/gen_preprocess_fixtures.py's reference_extract.
  diversity        compute_msssim_sample.py (5.3): MultiScaleSSIMMetric(2, data_range=1, kernel_size=7) per
                   ordered pair (i != j) of N random images.
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# torch, MONAI and generative are imported by the cases that use them (`load_torch`), not by `preprocess`: the
# reference create_png_dataset.py imports only nibabel, numpy and PIL, and the peak RSS should say so.
torch = F = None

CASES = ["aekl-step", "ldm-step", "controlnet-step", "denoise-step", "sample", "preprocess", "diversity"]
SCALE_FACTOR = 0.3
GUIDANCE = 7.0


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def status_mb(field):
    """A memory line of /proc/self/status (`VmHWM:` peak, `VmRSS:` now), in MiB; NaN where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def load_torch(threads):
    global torch, F
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    import monai_compat  # noqa: F401  (before anything from generative)
    import torch as _torch
    import torch.nn.functional as _F
    torch, F = _torch, _F
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def need(value, flag):
    if value is None:
        raise SystemExit(f"this case needs {flag}")
    return value


def read(path):
    return json.loads(Path(path).read_text())


def params(cfg, key):
    """`cfg[key]["params"]` without the config-only keys medgen ignores too (comments)."""
    return {k: v for k, v in cfg[key]["params"].items() if not k.startswith("_")}


def build_aekl(path):
    from generative.networks.nets import AutoencoderKL
    return AutoencoderKL(**params(read(path), "stage1"))


def build_unet(path):
    from generative.networks.nets import DiffusionModelUNet
    return DiffusionModelUNet(**params(read(path), "ldm"))


def build_controlnet(path):
    from generative.networks.nets import ControlNet
    return ControlNet(**params(read(path), "controlnet"))


def scheduler_args(path, ddim):
    """`ldm.scheduler` as the reference scripts pass it; DDIM sampling as theirs: clip_sample False."""
    s = dict(read(path)["ldm"]["scheduler"])
    args = dict(num_train_timesteps=s.get("num_train_timesteps", 1000), schedule=s.get("schedule", "linear_beta"),
                prediction_type=s.get("prediction_type", "epsilon"))
    for k in ("beta_start", "beta_end"):
        if k in s:
            args[k] = s[k]
    if ddim:
        args["clip_sample"] = False
    return args


def downsampling(stage1_path):
    if stage1_path is None:
        return 8
    return 2 ** (len(read(stage1_path)["stage1"]["params"]["num_channels"]) - 1)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------------------------------------------
# cases: each returns (rep, units_per_rep, unit)


def case_aekl_step(a):
    from generative.losses import PatchAdversarialLoss
    from generative.networks.nets import PatchDiscriminator

    path = need(a.config, "--config")
    cfg = read(path)
    st = cfg["stage1"]
    model = build_aekl(path).train()
    disc = PatchDiscriminator(**params(cfg, "discriminator")).train()
    log(f"aekl-step: AutoencoderKL {n_params(model):,} params, PatchDiscriminator {n_params(disc):,}")
    opt_g = torch.optim.Adam(model.parameters(), lr=st.get("base_lr", 1e-4))
    opt_d = torch.optim.Adam(disc.parameters(), lr=st.get("disc_lr", 1e-4))
    adv_loss = PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)
    kl_weight, adv_weight = st.get("kl_weight", 1e-8), st.get("adv_weight", 0.005)
    images = torch.rand(a.batch, 1, a.height, a.width)

    def rep():
        # GENERATOR (training_functions.py::train_epoch_aekl, AMP off, perceptual term skipped)
        opt_g.zero_grad(set_to_none=True)
        reconstruction, z_mu, z_sigma = model(x=images)
        l1_loss = F.l1_loss(reconstruction.float(), images.float())
        kl_loss = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1, dim=[1, 2, 3])
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
        if adv_weight > 0:
            logits_fake = disc(reconstruction.contiguous().float())[-1]
            generator_loss = adv_loss(logits_fake, target_is_real=True, for_discriminator=False)
        else:
            generator_loss = torch.tensor([0.0])
        loss = l1_loss + kl_weight * kl_loss + adv_weight * generator_loss
        loss = loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1)
        opt_g.step()
        # DISCRIMINATOR
        if adv_weight > 0:
            opt_d.zero_grad(set_to_none=True)
            logits_fake = disc(reconstruction.contiguous().detach())[-1]
            loss_d_fake = adv_loss(logits_fake, target_is_real=False, for_discriminator=True)
            logits_real = disc(images.contiguous().detach())[-1]
            loss_d_real = adv_loss(logits_real, target_is_real=True, for_discriminator=True)
            discriminator_loss = (loss_d_fake + loss_d_real) * 0.5
            d_loss = adv_weight * discriminator_loss
            d_loss.backward()
            torch.nn.utils.clip_grad_norm_(disc.parameters(), 1)
            opt_d.step()

    return rep, 1, "step"


def case_diffusion_step(a, controlnet):
    from generative.networks.schedulers import DDPMScheduler

    stage1_path = need(a.stage1_config, "--stage1-config")
    if controlnet:
        unet_path, cn_path = need(a.ldm_config, "--ldm-config"), need(a.config, "--config")
    else:
        unet_path, cn_path = need(a.config, "--config"), None
    stage1 = build_aekl(stage1_path).eval()
    unet = build_unet(unet_path)
    cn = build_controlnet(cn_path) if cn_path else None
    log(f"{a.case}: AutoencoderKL {n_params(stage1):,} params, UNet {n_params(unet):,}"
        + (f", ControlNet {n_params(cn):,}" if cn is not None else ""))
    if cn is not None:
        # train_controlnet.py: the diffusion model frozen (requires_grad False, eval), the ControlNet trained.
        unet.eval()
        for p in unet.parameters():
            p.requires_grad = False
        cn.train()
        trained, lr = cn, read(cn_path)["controlnet"].get("base_lr", 2.5e-5)
    else:
        unet.train()
        trained, lr = unet, read(unet_path)["ldm"].get("base_lr", 2.5e-5)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=lr)
    scheduler = DDPMScheduler(**scheduler_args(unet_path, ddim=False))
    ucfg = read(unet_path)["ldm"]["params"]
    images = torch.rand(a.batch, 1, a.height, a.width)
    flair = torch.rand(a.batch, 1, a.height, a.width)
    context = (torch.randn(a.batch, 77, ucfg["cross_attention_dim"]) if ucfg.get("with_conditioning") else None)

    def rep():
        # training_functions.py::train_epoch_ldm / train_epoch_controlnet, AMP off, text encoder replaced by a
        # fixed random context
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (images.shape[0],)).long()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            z_mu, z_sigma = stage1.encode(images)  # Stage1Wrapper: a posterior sample, not the mean
            e = stage1.sampling(z_mu, z_sigma) * SCALE_FACTOR
        noise = torch.randn_like(e)
        noisy_e = scheduler.add_noise(original_samples=e, noise=noise, timesteps=timesteps)
        if cn is not None:
            down_block_res_samples, mid_block_res_sample = cn(
                x=noisy_e, timesteps=timesteps, context=context, controlnet_cond=flair)
            noise_pred = unet(x=noisy_e, timesteps=timesteps, context=context,
                              down_block_additional_residuals=down_block_res_samples,
                              mid_block_additional_residual=mid_block_res_sample)
        else:
            noise_pred = unet(x=noisy_e, timesteps=timesteps, context=context)
        if scheduler.prediction_type == "v_prediction":
            target = scheduler.get_velocity(e, noise, timesteps)
        else:
            target = noise
        loss = F.mse_loss(noise_pred.float(), target.float())
        loss.backward()
        optimizer.step()

    return rep, 1, "step"


def case_sampling(a, whole):
    from generative.networks.schedulers import DDIMScheduler

    ldm_path = need(a.ldm_config, "--ldm-config")
    cn_path = need(a.controlnet_config, "--controlnet-config")
    if whole:
        need(a.stage1_config, "--stage1-config")
    unet = build_unet(ldm_path).eval()
    cn = build_controlnet(cn_path).eval()
    stage1 = build_aekl(a.stage1_config).eval() if a.stage1_config else None
    log(f"{a.case}: UNet {n_params(unet):,} params, ControlNet {n_params(cn):,}"
        + (f", AutoencoderKL {n_params(stage1):,}" if stage1 is not None else ""))
    ucfg = read(ldm_path)["ldm"]["params"]
    f = downsampling(a.stage1_config)
    latent_c = (read(a.stage1_config)["stage1"]["params"]["latent_channels"] if a.stage1_config
                else ucfg["in_channels"])
    b = a.batch
    latent0 = torch.randn(b, latent_c, a.height // f, a.width // f)
    flair = torch.rand(b, 1, a.height, a.width)
    guided = bool(ucfg.get("with_conditioning"))
    if guided:
        # prompt_embeds of ["", prompt]: one (77, d) row each, the "" half first as in the reference batch
        d = ucfg["cross_attention_dim"]
        uncond, cond = torch.randn(1, 77, d), torch.randn(1, 77, d)
        context = torch.cat([uncond.expand(b, -1, -1), cond.expand(b, -1, -1)], 0)
        cond_input = torch.cat([flair] * 2)
    else:
        context, cond_input = None, flair
    scheduler = DDIMScheduler(**scheduler_args(ldm_path, ddim=True))
    scheduler.set_timesteps(a.steps if whole else 200)

    def denoise(noise, t):
        """One step of sample_flair_to_t1w.py's loop."""
        if guided:
            noise_input = torch.cat([noise] * 2)
        else:
            noise_input = noise
        ts = torch.Tensor((t,)).long()
        down_block_res_samples, mid_block_res_sample = cn(
            x=noise_input, timesteps=ts, controlnet_cond=cond_input, conditioning_scale=1.0, context=context)
        model_output = unet(x=noise_input, timesteps=ts, context=context,
                            down_block_additional_residuals=down_block_res_samples,
                            mid_block_additional_residual=mid_block_res_sample)
        if guided:
            noise_pred_uncond, noise_pred_text = model_output.chunk(2)
            model_output = noise_pred_uncond + GUIDANCE * (noise_pred_text - noise_pred_uncond)
        noise, _ = scheduler.step(model_output, t, noise)
        return noise

    if whole:
        def rep():
            with torch.no_grad():
                noise = latent0.clone()
                for t in scheduler.timesteps:
                    noise = denoise(noise, t)
                sample = stage1.decode_stage_2_outputs(noise / SCALE_FACTOR)
                sample = torch.clip(sample, 0, 1)
            return sample
        return rep, b, "image"

    t0 = scheduler.timesteps[0]

    def rep():
        with torch.no_grad():
            return denoise(latent0, t0)

    return rep, 1, "step"


def case_preprocess(a):
    import gen_preprocess_fixtures as ref

    input_dir = Path(need(a.input, "--input"))
    subjects = sorted(p for p in input_dir.iterdir() if p.is_dir())[: a.n]
    if not subjects:
        raise SystemExit(f"{input_dir}: no subject folders")
    scratch = Path(tempfile.mkdtemp(prefix="medgen-bench-py-"))
    src = scratch / "in"
    for s in subjects:
        shutil.copytree(s, src / s.name)
    paths = sorted(list(src.glob("**/*T1w.nii.gz")) + list(src.glob("**/*T1w.nii")))
    cases = {str(p.relative_to(src)): None for p in paths}
    log(f"preprocess: {len(paths)} T1w volumes in {len(subjects)} subject folders")

    def rep():
        out = scratch / "out"
        shutil.rmtree(out, ignore_errors=True)
        ref.reference_extract(src, out, ref.REFERENCE_CROP, cases)

    return rep, len(paths), "volume", scratch


def case_diversity(a):
    from generative.metrics import MultiScaleSSIMMetric

    n = a.n
    images = torch.rand(n, 1, a.height, a.width)
    ms_ssim = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=7)

    def rep():
        # compute_msssim_sample.py: every ordered pair with different file names, batch size 1
        values = []
        for i in range(n):
            img = images[i:i + 1]
            for j in range(n):
                if i == j:
                    continue
                values.append(ms_ssim(img, images[j:j + 1]))
        return torch.cat(values).mean().item()

    return rep, n * (n - 1), "pair"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("case", choices=CASES)
    ap.add_argument("--config")
    ap.add_argument("--ldm-config")
    ap.add_argument("--controlnet-config")
    ap.add_argument("--stage1-config")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--input")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--height", type=int, default=160)
    ap.add_argument("--width", type=int, default=224)
    a = ap.parse_args()
    if a.reps < 1:
        raise SystemExit("--reps must be at least 1")
    if a.case != "preprocess":
        load_torch(a.threads)
    import_rss = status_mb("VmRSS:")

    scratch = None
    if a.case == "aekl-step":
        rep, units, unit = case_aekl_step(a)
    elif a.case in ("ldm-step", "controlnet-step"):
        rep, units, unit = case_diffusion_step(a, a.case == "controlnet-step")
    elif a.case in ("denoise-step", "sample"):
        rep, units, unit = case_sampling(a, a.case == "sample")
    elif a.case == "preprocess":
        rep, units, unit, scratch = case_preprocess(a)
    else:
        rep, units, unit = case_diversity(a)

    try:
        for _ in range(a.warmup):
            rep()
        times = []
        for _ in range(a.reps):
            t = time.perf_counter()
            rep()
            times.append(time.perf_counter() - t)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    print(json.dumps({
        "case": a.case, "impl": "python", "times_s": times, "units_per_rep": units, "unit": unit,
        "peak_rss_mb": status_mb("VmHWM:"), "import_rss_mb": import_rss,
        "params": {"config": a.config, "ldm_config": a.ldm_config, "controlnet_config": a.controlnet_config,
                   "stage1_config": a.stage1_config, "batch": a.batch, "steps": a.steps, "n": a.n,
                   "threads": a.threads, "height": a.height, "width": a.width},
    }), flush=True)


if __name__ == "__main__":
    main()
