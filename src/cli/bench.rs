//! `medgen bench CASE`: times one operation of the pipeline the way `bench/reference.py` times
//! the Python MONAI reference (same options, same JSON line), so `bench/run.py` can run the two
//! side by side. Networks get random weights (timing only); inputs are random with fixed seeds.
use crate::amp::Precision;
use crate::config::{self, model_params, read_json};
use crate::data::preprocess::{self, Crop, Progress, Span, Split};
use crate::generate::{reference_ddim, schedule_only};
use crate::memory_format::to_channels_last;
use crate::metrics::ssim::{ms_ssim_diversity, SsimConfig};
use crate::nets::patch_discriminator::{PatchDiscriminator, PatchDiscriminatorConfig};
use crate::nets::{AutoencoderKL, Conditioning, ControlNet, DiffusionModelUNet};
use crate::sampling::{decode_latent, sample_latent, Control, TextConditioning};
use crate::schedulers::{self, NoiseSchedule, SchedulerConfig, SchedulerKind};
use crate::train::aekl::{aekl_step, AeklLossWeights, AeklModels, AeklOptimizers};
use crate::train::diffusion::{diffusion_loss, diffusion_step, ControlInput};
use crate::train::grad_scaler::GradScaler;
use crate::train::optim::{Adam, AdamConfig};
use anyhow::{ensure, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    AeklStep,
    LdmStep,
    ControlnetStep,
    DenoiseStep,
    Sample,
    Preprocess,
    Diversity,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(value_enum)]
    case: Case,
    /// The stage config of a training-step case.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    ldm_config: Option<PathBuf>,
    #[arg(long)]
    controlnet_config: Option<PathBuf>,
    #[arg(long)]
    stage1_config: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    batch: i64,
    #[arg(long, default_value_t = 200)]
    steps: usize,
    #[arg(long, default_value_t = 100)]
    n: usize,
    /// `preprocess`: a folder of volumes (e.g. data/raw); the first `--n` subjects are used.
    #[arg(long)]
    input: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 2)]
    threads: i32,
    /// Which library's networks to build: `generative` (monai-generative 0.2, what the reference scripts and
    /// bench/reference.py run) or `monai` (MONAI core >= 1.4, what `medgen train` builds from scratch). They
    /// differ in small ops (F.silu or x*sigmoid(x) in the ControlNet's conditioning embedding, baddbmm or
    /// einsum attention), so a like-for-like timing needs the same one on both sides.
    #[arg(long, value_enum, default_value_t = Naming::Generative)]
    naming: Naming,
    /// sample: the sampler, on the LDM config's training schedule (`leading` spacing and no clipping for DDIM,
    /// as the reference; the multistep samplers' own defaults otherwise).
    #[arg(long, default_value = "ddim")]
    scheduler: SchedulerKind,
    #[arg(long, default_value_t = 160)]
    height: i64,
    #[arg(long, default_value_t = 224)]
    width: i64,
    /// `denoise-step`, `sample`: the networks' weights and the noise and control image in the channels-last (NHWC)
    /// layout. `denoise-step` also runs one step in the default layout first (untimed) and reports the largest
    /// differences of the step's output (`channels_last_max_abs_diff`) and of the networks' guided output
    /// (`channels_last_model_output_max_abs_diff`, beside that output's largest magnitude).
    #[arg(long)]
    channels_last: bool,
    /// `denoise-step`, `sample`: the networks' forward passes in float32 or under autocast.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    precision: Precision,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Naming {
    Generative,
    Monai,
}

impl Naming {
    fn generation(self) -> crate::checkpoint::Generation {
        match self {
            Naming::Generative => crate::checkpoint::Generation::Generative,
            Naming::Monai => crate::checkpoint::Generation::Monai,
        }
    }
}

/// Peak resident memory of this process (VmHWM), in MiB.
fn peak_rss_mb() -> f64 {
    status_mb("VmHWM:")
}

/// A memory line of /proc/self/status, in MiB (NaN where there is none).
fn status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// CPU time of all this process's threads, in seconds. On a machine shared with other work, a `--threads 1` run's
/// CPU time per rep measures the work itself, where the wall time also counts the waits for a core.
fn process_cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which `ts` is, and reads nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn need<'a>(p: &'a Option<PathBuf>, flag: &str) -> Result<&'a Path> {
    p.as_deref().with_context(|| format!("this case needs {flag}"))
}

/// What one repetition does, and how many units it processes.
type Rep<'a> = Box<dyn FnMut() -> Result<()> + 'a>;

pub fn run(a: Args) -> Result<()> {
    // What the process holds before any work: libtorch and the CUDA libraries it links are loaded at start
    // (the Python side's `import_rss_mb` is the same figure after its imports).
    let start_rss = status_mb("VmRSS:");
    tch::set_num_threads(a.threads);
    tch::manual_seed(0);
    let dev = Device::Cpu;
    let (h, w, b) = (a.height, a.width, a.batch);
    ensure!(a.reps >= 1, "--reps must be at least 1");
    ensure!(
        matches!(a.case, Case::DenoiseStep | Case::Sample) || (!a.channels_last && a.precision == Precision::Fp32),
        "--channels-last and --precision apply to denoise-step and sample only"
    );
    let scratch = Scratch(std::env::temp_dir().join(format!("medgen-bench-{}", std::process::id())));
    let _guard_holder;
    let mut channels_last_diff = None;
    let (mut rep, units, unit): (Rep, usize, &str) = match a.case {
        Case::AeklStep => {
            let path = need(&a.config, "--config")?;
            let cfg = read_json(path)?;
            let ae_vs = VarStore::new(dev);
            let ae = AutoencoderKL::new(&ae_vs.root(), &config::aekl_config(path)?, a.naming.generation())?;
            let d_vs = VarStore::new(dev);
            let d_cfg: PatchDiscriminatorConfig = serde_json::from_value(model_params(&cfg, "discriminator"))?;
            let disc = PatchDiscriminator::new(&d_vs.root(), &d_cfg)?;
            let weights: AeklLossWeights = serde_json::from_value(cfg["stage1"].clone())?;
            let w8 = AeklLossWeights { perceptual_weight: 0.0, ..weights };
            let adv = crate::losses::adversarial::PatchAdversarialLoss::reference();
            let lr = |k: &str| cfg["stage1"][k].as_f64().unwrap_or(1e-4);
            let mut o = AeklOptimizers {
                g: Adam::from_var_store(AdamConfig::adam(lr("base_lr")), &ae_vs)?,
                d: Adam::from_var_store(AdamConfig::adam(lr("disc_lr")), &d_vs)?,
                scaler_g: GradScaler::for_precision(Precision::Fp32)?,
                scaler_d: GradScaler::for_precision(Precision::Fp32)?,
            };
            let images = Tensor::rand([b, 1, h, w], (Kind::Float, dev));
            let f = 1i64 << (ae.config().channels.len() - 1);
            let eps = Tensor::randn([b, ae.config().latent_channels, h / f, w / f], (Kind::Float, dev));
            _guard_holder = (ae_vs, d_vs);
            let rep = move || -> Result<()> {
                let m = AeklModels { autoencoder: &ae, discriminator: &disc, perceptual: None, adversarial: &adv };
                aekl_step(&m, &mut o, Precision::Fp32, &images, &eps, &w8, w8.adv_weight > 0.0).map(|_| ())
            };
            (Box::new(rep), 1, "step")
        }
        Case::LdmStep | Case::ControlnetStep => {
            let controlnet = a.case == Case::ControlnetStep;
            let stage1 = need(&a.stage1_config, "--stage1-config")?;
            let (unet_path, cn_path) = if controlnet {
                (need(&a.ldm_config, "--ldm-config")?, Some(need(&a.config, "--config")?))
            } else {
                (need(&a.config, "--config")?, None)
            };
            let ae_vs = VarStore::new(dev);
            let ae = AutoencoderKL::new(&ae_vs.root(), &config::aekl_config(stage1)?, a.naming.generation())?;
            let u_vs = VarStore::new(dev);
            let ucfg = config::unet_config(unet_path)?;
            let unet = DiffusionModelUNet::new(&u_vs.root(), &ucfg, a.naming.generation())?;
            let cn = match cn_path {
                Some(p) => {
                    let vs = VarStore::new(dev);
                    let net = ControlNet::new(&vs.root(), &config::controlnet_config(p)?, a.naming.generation())?;
                    Some((vs, net))
                }
                None => None,
            };
            let mut u_vs = u_vs;
            let trained = match &cn {
                Some((vs, _)) => {
                    u_vs.freeze();
                    vs
                }
                None => &u_vs,
            };
            let mut opt = Adam::from_var_store(AdamConfig::adamw(2.5e-5), trained)?;
            let mut scaler = GradScaler::for_precision(Precision::Fp32)?;
            let sched = NoiseSchedule::from_config(&config::scheduler_config(unet_path, SchedulerKind::Ddpm)?)?;
            let pred = config::scheduler_config(unet_path, SchedulerKind::Ddpm)?.prediction_type;
            let images = Tensor::rand([b, 1, h, w], (Kind::Float, dev));
            let flair = Tensor::rand([b, 1, h, w], (Kind::Float, dev));
            let context = ucfg.cross_attention_dim.map(|d| Tensor::randn([b, 77, d], (Kind::Float, dev)));
            let rep = move || -> Result<()> {
                let latent = tch::no_grad(|| ae.encode_stage_2_inputs(&images))? * 0.3;
                let noise = Tensor::randn(latent.size(), (Kind::Float, dev));
                let t = Tensor::randint(1000, [b], (Kind::Int64, dev));
                let control = cn.as_ref().map(|(_, net)| ControlInput { controlnet: net, cond: &flair });
                diffusion_step(&mut opt, &mut scaler, Precision::Fp32, dev, || {
                    diffusion_loss(&unet, control.as_ref(), &sched, pred, &latent, &noise, &t, context.as_ref())
                })
                .map(|_| ())
            };
            (Box::new(rep), 1, "step")
        }
        Case::DenoiseStep | Case::Sample => {
            let lp = need(&a.ldm_config, "--ldm-config")?;
            let cp = need(&a.controlnet_config, "--controlnet-config")?;
            let mut vs = VarStore::new(dev);
            let ucfg = config::unet_config(lp)?;
            let unet = DiffusionModelUNet::new(&(vs.root() / "unet"), &ucfg, a.naming.generation())?;
            let net = ControlNet::new(&(vs.root() / "cn"), &config::controlnet_config(cp)?, a.naming.generation())?;
            let ae = match &a.stage1_config {
                Some(p) => {
                    Some(AutoencoderKL::new(&(vs.root() / "ae"), &config::aekl_config(p)?, a.naming.generation())?)
                }
                None => None,
            };
            let f = ae.as_ref().map_or(8, |ae| 1i64 << (ae.config().channels.len() - 1));
            let latent_c = ae.as_ref().map_or(ucfg.in_channels, |ae| ae.config().latent_channels);
            let noise = Tensor::randn([b, latent_c, h / f, w / f], (Kind::Float, dev));
            let flair = Tensor::rand([b, 1, h, w], (Kind::Float, dev));
            let ctx = ucfg.cross_attention_dim.map(|d| {
                (Tensor::randn([1, 77, d], (Kind::Float, dev)), Tensor::randn([1, 77, d], (Kind::Float, dev)))
            });
            // The reference's DDIM (denoise-step always; sample by default), or another sampler on the same
            // training schedule.
            let train_cfg = config::scheduler_config(lp, SchedulerKind::Ddpm)?;
            let sched_cfg = reference_ddim(train_cfg.clone());
            let kind = a.scheduler;
            let sample_cfg = if kind == SchedulerKind::Ddim { sched_cfg.clone() } else { schedule_only(&train_cfg) };
            let steps = if a.case == Case::Sample { a.steps } else { 1 };
            let sample = a.case == Case::Sample;
            if sample {
                ensure!(ae.is_some(), "sample needs --stage1-config");
            }
            let precision = a.precision;
            let (noise, flair) = if a.channels_last {
                if !sample {
                    // MONAI zero-initialises the output convolutions (the UNet's last one, the ControlNet's zero
                    // convs): on these random weights the step's output would not depend on the networks at all.
                    // They get random values for this check only, and their zeros back for the timed reps.
                    let zeroed = randomize_zeroed(&vs)?;
                    let step = DenoiseStep {
                        unet: &unet,
                        controlnet: &net,
                        ctx: ctx.as_ref(),
                        noise: &noise,
                        flair: &flair,
                        sched_cfg: &sched_cfg,
                        precision,
                    };
                    let contiguous = step.run()?;
                    crate::memory_format::varstore_to_channels_last(&mut vs)?;
                    let (noise, flair) = (to_channels_last(&noise)?, to_channels_last(&flair)?);
                    let nhwc = DenoiseStep { noise: &noise, flair: &flair, ..step }.run()?;
                    let diff = |a: &Tensor, b: &Tensor| a.f_sub(b)?.f_abs()?.f_max()?.f_double_value(&[]);
                    let scale = contiguous.0.f_abs()?.f_max()?.f_double_value(&[])?;
                    channels_last_diff = Some((diff(&nhwc.0, &contiguous.0)?, diff(&nhwc.1, &contiguous.1)?, scale));
                    tch::no_grad(|| zeroed.into_iter().try_for_each(|mut v| v.f_zero_().map(|_| ())))?;
                    (noise, flair)
                } else {
                    crate::memory_format::varstore_to_channels_last(&mut vs)?;
                    (to_channels_last(&noise)?, to_channels_last(&flair)?)
                }
            } else {
                (noise, flair)
            };
            _guard_holder = (vs, VarStore::new(dev));
            let rep = move || -> Result<()> {
                if sample {
                    let mut s = schedulers::build(kind, &sample_cfg)?;
                    s.set_timesteps(steps)?;
                    let text = match &ctx {
                        Some((u, c)) => TextConditioning::Guided { uncond: u, cond: c, guidance_scale: 7.0 },
                        None => TextConditioning::None,
                    };
                    let control = Control { controlnet: &net, cond: &flair, conditioning_scale: 1.0 };
                    let latent =
                        sample_latent(&unet, Some(&control), s.as_mut(), &noise, &text, precision, &mut |_, _| {})?;
                    let _ =
                        decode_latent(ae.as_ref().expect("checked"), &latent, 0.3, Precision::Fp32)?.clamp(0.0, 1.0);
                } else {
                    let step = DenoiseStep {
                        unet: &unet,
                        controlnet: &net,
                        ctx: ctx.as_ref(),
                        noise: &noise,
                        flair: &flair,
                        sched_cfg: &sched_cfg,
                        precision,
                    };
                    let _ = step.run()?;
                }
                Ok(())
            };
            (Box::new(rep), if sample { b as usize } else { 1 }, if sample { "image" } else { "step" })
        }
        Case::Preprocess => {
            let input = need(&a.input, "--input")?;
            let mut subjects: Vec<PathBuf> = std::fs::read_dir(input)
                .with_context(|| format!("cannot read {}", input.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            subjects.sort();
            subjects.truncate(a.n);
            ensure!(!subjects.is_empty(), "{}: no subject folders", input.display());
            let tmp = scratch.0.clone();
            let src = tmp.join("in");
            std::fs::create_dir_all(&src)?;
            // Copies, not links: the volume search does not follow symbolic links.
            for s in &subjects {
                copy_tree(s, &src.join(s.file_name().context("a subject folder without a name")?))?;
            }
            let n = subjects.len();
            let threads = a.threads.max(1) as usize;
            let rep = move || -> Result<()> {
                let out = tmp.join("out");
                let _ = std::fs::remove_dir_all(&out);
                let opts = preprocess::Options {
                    input: src.clone(),
                    output: out,
                    lists: None,
                    crop: Crop::parse("16:176,16:240", "166:171".parse::<Span>()?)?,
                    split: "0.8,0.1".parse::<Split>()?,
                    resume: false,
                    threads,
                };
                let s = preprocess::run(&opts, &NoProgress)?;
                ensure!(s.counts.processed == n, "processed {} of {n} volumes", s.counts.processed);
                Ok(())
            };
            (Box::new(rep), n, "volume")
        }
        Case::Diversity => {
            let images = Tensor::rand([a.n as i64, 1, h, w], (Kind::Float, dev));
            let n = a.n;
            let rep = move || -> Result<()> { ms_ssim_diversity(&images, &SsimConfig::reference()).map(|_| ()) };
            // Counted as the reference counts (ordered pairs); MS-SSIM is symmetric, so medgen computes each
            // unordered pair once.
            (Box::new(rep), n * (n - 1), "pair")
        }
    };
    for _ in 0..a.warmup {
        rep()?;
    }
    let (mut times, mut cpu_times) = (Vec::with_capacity(a.reps), Vec::with_capacity(a.reps));
    for _ in 0..a.reps {
        let (t, cpu) = (Instant::now(), process_cpu_s());
        rep()?;
        times.push(t.elapsed().as_secs_f64());
        cpu_times.push(process_cpu_s() - cpu);
    }
    let out = json!({
        "case": clap::ValueEnum::to_possible_value(&a.case).map(|v| v.get_name().to_string()), "impl": "medgen", "times_s": times, "cpu_times_s": cpu_times, "units_per_rep": units, "unit": unit,
        "peak_rss_mb": peak_rss_mb(), "import_rss_mb": start_rss, "channels_last_max_abs_diff": channels_last_diff.map(|d| d.1),
        "channels_last_model_output_max_abs_diff": channels_last_diff.map(|d| d.0),
        "channels_last_model_output_max_abs": channels_last_diff.map(|d| d.2),
        "params": {"config": a.config, "ldm_config": a.ldm_config, "controlnet_config": a.controlnet_config,
                   "stage1_config": a.stage1_config, "naming": format!("{:?}", a.naming).to_lowercase(), "batch": b, "steps": a.steps, "n": a.n, "threads": a.threads,
                   "height": h, "width": w, "channels_last": a.channels_last, "precision": a.precision,
                   "scheduler": a.scheduler},
    });
    println!("{out}");
    Ok(())
}

/// One step of the sampler as `sample_flair_to_t1w.py` runs it: ControlNet, UNet, guidance 7 where the UNet has
/// a text context, then DDIM, under no_grad. A one-timestep schedule would change DDIM's stride, so the first of
/// the 200 steps is run by hand with the sampler's own pieces.
#[derive(Clone, Copy)]
struct DenoiseStep<'a> {
    unet: &'a DiffusionModelUNet,
    controlnet: &'a ControlNet,
    /// The unconditional and conditional contexts, `(1, 77, dim)`.
    ctx: Option<&'a (Tensor, Tensor)>,
    noise: &'a Tensor,
    flair: &'a Tensor,
    sched_cfg: &'a SchedulerConfig,
    precision: Precision,
}

impl DenoiseStep<'_> {
    /// The networks' (guided) output and the step's `prev_sample`.
    fn run(&self) -> Result<(Tensor, Tensor)> {
        let _g = tch::no_grad_guard();
        let mut s = schedulers::build(SchedulerKind::Ddim, self.sched_cfg)?;
        s.set_timesteps(200)?;
        let t = s.timesteps()[0];
        let (noise, flair) = (self.noise, self.flair);
        let b = noise.size()[0];
        let (x, context) = match self.ctx {
            Some((u, c)) => (
                Tensor::cat(&[noise, noise], 0),
                Some(Tensor::cat(&[u.expand([b, 77, -1], false), c.expand([b, 77, -1], false)], 0)),
            ),
            None => (noise.shallow_clone(), None),
        };
        let cond = if self.ctx.is_some() { Tensor::cat(&[flair, flair], 0) } else { flair.shallow_clone() };
        let ts = Tensor::from_slice(&[t]);
        let c = Conditioning { context: context.as_ref(), ..Default::default() };
        let out = {
            let _autocast = self.precision.autocast(noise.device());
            let res = self.controlnet.forward(&x, &ts, &cond, 1.0, &c)?;
            self.unet.forward(&x, &ts, &res.conditioning(context.as_ref(), None))?
        };
        let out = out.f_to_kind(Kind::Float)?;
        let out = if self.ctx.is_some() {
            let hv = out.chunk(2, 0);
            &hv[0] + (&hv[1] - &hv[0]) * 7.0
        } else {
            out
        };
        let prev = s.step(&out, t, noise)?.0;
        Ok((out, prev))
    }
}

/// Gives every all-zero variable of `vs` random values; returns those variables.
fn randomize_zeroed(vs: &VarStore) -> Result<Vec<Tensor>> {
    let _g = tch::no_grad_guard();
    let mut zeroed = Vec::new();
    for (_, mut v) in vs.variables() {
        if v.numel() > 0 && v.f_abs()?.f_max()?.f_double_value(&[])? == 0.0 {
            v.f_copy_(&(Tensor::f_randn(v.size(), (v.kind(), v.device()))? * 0.05))?;
            zeroed.push(v);
        }
    }
    Ok(zeroed)
}

/// A scratch folder, removed however the run ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct NoProgress;
impl Progress for NoProgress {}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let p = e?.path();
        let dest = to.join(p.file_name().context("a file without a name")?);
        if p.is_dir() {
            copy_tree(&p, &dest)?;
        } else {
            std::fs::copy(&p, &dest).with_context(|| format!("cannot copy {}", p.display()))?;
        }
    }
    Ok(())
}
