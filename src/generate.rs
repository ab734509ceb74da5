//! Generating images with trained models, as the reference sampling scripts do (reference-repo.md
//! §4): the trained stages loaded from their configs and weights, one seed per image so any image
//! can be regenerated alone, batches of images sampled together, and PNGs quantised as the
//! reference saves them (clip to [0, 1], ×255, truncate).
use crate::amp::Precision;
use crate::checkpoint::{load_model, Loaded, StateDict};
use crate::config::{self, read_json};
use crate::nets::{AutoencoderKL, ControlNet, DiffusionModelUNet};
use crate::sampling::{decode_latent, decode_latent_windowed, initial_noise, sample_latent, Control, TextConditioning};
use crate::schedulers::{self, SchedulerConfig, SchedulerKind};
use crate::sliding_window::SlidingWindowConfig;
use crate::text::context::PromptContexts;
use crate::train::stages::META_SCALE_FACTOR;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// The `sampling` section of an LDM or ControlNet config: what the reference sampling scripts
/// hard-code or pass on their command line. Every field may be overridden on the command line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SamplingSection {
    #[serde(default)]
    pub scheduler_kind: Option<SchedulerKind>,
    #[serde(default)]
    pub scheduler: Option<SchedulerConfig>,
    #[serde(default)]
    pub num_inference_steps: Option<usize>,
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    #[serde(default)]
    pub scale_factor: Option<f64>,
    #[serde(default)]
    pub latent_shape: Option<Vec<i64>>,
    #[serde(default)]
    pub controlnet_scale: Option<f64>,
    /// 3-D models: the voxel size (mm, `[x, y, z]`) written into generated volumes' headers.
    #[serde(default)]
    pub voxel_size: Option<Vec<f64>>,
    /// The networks' precision when the command line gives none (default fp32).
    #[serde(default)]
    pub precision: Option<Precision>,
    #[serde(default, rename = "_comment")]
    pub comment: Option<String>,
}

impl SamplingSection {
    /// The config's `sampling` section; absent, everything defaults.
    pub fn of(path: &Path) -> Result<Self> {
        match read_json(path)?.get("sampling") {
            Some(s) => serde_json::from_value(s.clone())
                .with_context(|| format!("{}: invalid `sampling` section", path.display())),
            None => Ok(Self::default()),
        }
    }

    /// The sampling scheduler: the section's, or, without one, the reference's rule: DDIM on the
    /// training schedule (`ldm.scheduler`), `clip_sample` off, monai-generative's `leading` spacing.
    pub fn scheduler(&self, config: &Path) -> Result<(SchedulerKind, SchedulerConfig)> {
        match (&self.scheduler_kind, &self.scheduler) {
            (Some(_), Some(_)) => config::sampling_scheduler(config),
            (None, None) => {
                Ok((SchedulerKind::Ddim, reference_ddim(config::scheduler_config(config, SchedulerKind::Ddpm)?)))
            }
            _ => bail!("{}: `sampling` needs both scheduler_kind and scheduler, or neither", config.display()),
        }
    }
}

/// The reference sampling scripts' DDIM on a training schedule: `clip_sample` off and
/// monai-generative's `leading` spacing (200 steps run as 995, 990, ..., 0).
pub fn reference_ddim(train: SchedulerConfig) -> SchedulerConfig {
    SchedulerConfig {
        clip_sample: Some(false),
        timestep_spacing: Some(crate::schedulers::TimestepSpacing::Leading),
        variance_type: None,
        ..train
    }
}

/// How a sampling run chooses its sampler: the config's `sampling` section, with command-line
/// overrides, or the reference scripts' own settings.
#[derive(Debug, Clone, Default)]
pub struct SamplerChoice {
    /// Another sampler than the config's, on the same training schedule and prediction type.
    pub kind: Option<SchedulerKind>,
    pub steps: Option<usize>,
    /// The reference's settings, whatever the config says: 200 DDIM steps, `clip_sample` off,
    /// `leading` spacing (`SamplingSection::scheduler` without a section).
    pub reference: bool,
}

/// The reference scripts' number of DDIM steps.
pub const REFERENCE_STEPS: usize = 200;

impl SamplingSection {
    /// The sampler, its parameters and the number of steps `choice` asks for.
    pub fn resolve(&self, config: &Path, choice: &SamplerChoice) -> Result<(SchedulerKind, SchedulerConfig, usize)> {
        if choice.reference {
            ensure!(
                choice.kind.is_none() && choice.steps.is_none(),
                "the reference sampling settings fix the sampler and the steps: drop --scheduler and --steps"
            );
            let (kind, cfg) = SamplingSection::default().scheduler(config)?;
            return Ok((kind, cfg, REFERENCE_STEPS));
        }
        let (kind, cfg) = self.scheduler(config)?;
        let steps = choice.steps.or(self.num_inference_steps).unwrap_or(REFERENCE_STEPS);
        ensure!(steps > 0, "the number of sampling steps must be positive");
        match choice.kind {
            Some(k) if k != kind => Ok((k, schedule_only(&cfg), steps)),
            _ => Ok((kind, cfg, steps)),
        }
    }
}

/// The training schedule and prediction type of `cfg`, every sampler-specific field left to the
/// new sampler's defaults: what another sampler of the same model starts from.
pub fn schedule_only(cfg: &SchedulerConfig) -> SchedulerConfig {
    SchedulerConfig {
        schedule: cfg.schedule,
        num_train_timesteps: cfg.num_train_timesteps,
        beta_start: cfg.beta_start,
        beta_end: cfg.beta_end,
        sig_range: cfg.sig_range,
        s: cfg.s,
        cosine_version: cfg.cosine_version,
        prediction_type: cfg.prediction_type,
        ..SchedulerConfig::default()
    }
}

/// The trained models a sampling run needs.
pub struct Models {
    pub autoencoder: Loaded<AutoencoderKL>,
    pub unet: Loaded<DiffusionModelUNet>,
    pub controlnet: Option<Loaded<ControlNet>>,
    /// The latent scale factor the LDM was trained with.
    pub scale_factor: f64,
}

/// Where the models come from (config, weights) and the sampling overrides.
#[derive(Debug, Clone)]
pub struct ModelPaths {
    pub stage1: (PathBuf, PathBuf),
    pub ldm: (PathBuf, PathBuf),
    pub controlnet: Option<(PathBuf, PathBuf)>,
    /// Overrides the scale factor recorded in the LDM's weights (or the config's).
    pub scale_factor: Option<f64>,
}

fn frozen<M>(
    cfg: &Path,
    weights: &Path,
    device: Device,
    build: impl FnOnce(&tch::nn::Path, crate::checkpoint::Generation) -> Result<M>,
) -> Result<Loaded<M>> {
    let sd = StateDict::load(weights, None)?;
    let mut l = load_model(sd, device, build)
        .with_context(|| format!("{} does not fit the config {}", weights.display(), cfg.display()))?;
    l.vs.freeze();
    Ok(l)
}

impl Models {
    pub fn load(p: &ModelPaths, device: Device) -> Result<Self> {
        let ae_cfg = config::aekl_config(&p.stage1.0)?;
        let autoencoder = frozen(&p.stage1.0, &p.stage1.1, device, |vs, g| AutoencoderKL::new(vs, &ae_cfg, g))?;
        let unet_cfg = config::unet_config(&p.ldm.0)?;
        let unet = frozen(&p.ldm.0, &p.ldm.1, device, |vs, g| DiffusionModelUNet::new(vs, &unet_cfg, g))?;
        let controlnet = match &p.controlnet {
            Some((c, w)) => {
                let cn_cfg = config::controlnet_config(c)?;
                cn_cfg.matches_unet(&unet_cfg)?;
                Some(frozen(c, w, device, |vs, g| ControlNet::new(vs, &cn_cfg, g))?)
            }
            None => None,
        };
        // The scale factor: explicit, else the one training recorded, else the config's (the
        // reference passes 0.3 on the command line).
        let recorded = match unet.state_dict.metadata.get(META_SCALE_FACTOR) {
            Some(v) => Some(
                v.parse::<f64>().with_context(|| format!("{}: bad {META_SCALE_FACTOR} {v:?}", p.ldm.1.display()))?,
            ),
            None => None,
        };
        let from_config = SamplingSection::of(&p.ldm.0)?.scale_factor;
        let scale_factor = p.scale_factor.or(recorded).or(from_config).with_context(|| {
            format!(
                "no latent scale factor: {} records none and {} has no sampling.scale_factor; pass --scale-factor",
                p.ldm.1.display(),
                p.ldm.0.display()
            )
        })?;
        if let (None, Some(r), Some(c)) = (p.scale_factor, recorded, from_config) {
            if r != c {
                eprintln!("note: using the scale factor {r} recorded in {}, not the config's {c}", p.ldm.1.display());
            }
        }
        Ok(Self { autoencoder, unet, controlnet, scale_factor })
    }

    /// The latent shape `[channels, spatial...]` of an image of `spatial` size.
    pub fn latent_shape(&self, spatial: &[i64]) -> Vec<i64> {
        self.autoencoder.model.config().latent_shape(spatial)
    }
}

/// How the UNet is conditioned on text during sampling.
pub enum Text {
    /// An unconditioned UNet.
    None,
    /// Classifier-free guidance between the `""` and prompt contexts (as the reference, even
    /// at scale 0).
    Guided { contexts: PromptContexts, guidance_scale: f64 },
}

impl Text {
    /// Checks the text conditioning against the UNet: a conditioned UNet needs contexts, an
    /// unconditioned one takes no guidance.
    pub fn new(
        unet: &DiffusionModelUNet,
        contexts: Option<PromptContexts>,
        guidance: Option<f64>,
        default_guidance: f64,
    ) -> Result<Self> {
        match (unet.config().cross_attention_dim, contexts) {
            (None, None) => {
                if let Some(g) = guidance.filter(|&g| g != 0.0) {
                    bail!("the UNet is unconditioned: classifier-free guidance ({g}) does not apply");
                }
                Ok(Text::None)
            }
            (None, Some(_)) => bail!("the UNet is unconditioned (with_conditioning false): it takes no --context"),
            (Some(_), None) => bail!("the UNet is conditioned: give --context (from `medgen encode-prompt`)"),
            (Some(d), Some(c)) => {
                ensure!(c.width() == d, "context width {} but the UNet's cross_attention_dim is {d}", c.width());
                Ok(Text::Guided { contexts: c, guidance_scale: guidance.unwrap_or(default_guidance) })
            }
        }
    }

    fn conditioning(&self) -> TextConditioning<'_> {
        match self {
            Text::None => TextConditioning::None,
            Text::Guided { contexts, guidance_scale } => TextConditioning::Guided {
                uncond: &contexts.uncond_context,
                cond: &contexts.context,
                guidance_scale: *guidance_scale,
            },
        }
    }
}

/// One batch of the reverse process, decoded.
pub struct Sampler<'a> {
    pub models: &'a Models,
    pub text: &'a Text,
    pub scheduler_kind: SchedulerKind,
    pub scheduler: SchedulerConfig,
    pub steps: usize,
    pub conditioning_scale: f64,
    /// The UNet's and the ControlNet's precision (the decoder runs in float32).
    pub precision: Precision,
    /// Sample a lone image as a pair with itself (twice the work), so that it reproduces its copy
    /// from a batch run bit for bit: libtorch's CPU kernels take another path for a batch of one
    /// (about 1e-6 apart), which many steps can turn into a different PNG level.
    pub match_batch: bool,
    /// Decode by a sliding window over the latent (MONAI's `SlidingWindowInferer`), so the decoder's
    /// activations never span the whole latent; `None`: decode it whole.
    pub decode_window: Option<&'a SlidingWindowConfig>,
    pub device: Device,
}

impl Sampler<'_> {
    /// Images `(B, 1, H, W)` (volumes `(B, 1, X, Y, Z)`) in the decoder's range (not clipped) for `seeds`, each
    /// from `initial_noise([1] + latent_shape, seed)` as the reference draws it; `latent_shape` is
    /// `[channels, spatial...]`. `control`: the FLAIR slices (control volumes) for ControlNet sampling.
    pub fn sample(
        &self,
        seeds: &[i64],
        latent_shape: &[i64],
        control: Option<&Tensor>,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        if seeds.len() == 1 && self.match_batch {
            let pair = [seeds[0], seeds[0]];
            let control = control.map(|c| Tensor::cat(&[c, c], 0));
            let inner = Sampler { match_batch: false, scheduler: self.scheduler.clone(), ..*self };
            return Ok(inner.sample(&pair, latent_shape, control.as_ref(), on_step)?.narrow(0, 0, 1));
        }
        let one = [&[1], latent_shape].concat();
        let noise: Vec<Tensor> = seeds.iter().map(|&s| initial_noise(&one, s, self.device)).collect();
        let noise = Tensor::cat(&noise, 0);
        let mut scheduler = schedulers::build(self.scheduler_kind, &self.scheduler)?;
        scheduler.set_timesteps(self.steps)?;
        let cond = control.map(|c| c.to_device(self.device));
        let ctrl = match (&self.models.controlnet, &cond) {
            (Some(cn), Some(c)) => {
                Some(Control { controlnet: &cn.model, cond: c, conditioning_scale: self.conditioning_scale })
            }
            (None, None) => None,
            (Some(_), None) => bail!("ControlNet sampling needs the control (FLAIR) images"),
            (None, Some(_)) => bail!("control images given but no ControlNet loaded"),
        };
        let text = self.text.conditioning();
        let unet = &self.models.unet.model;
        let latent = sample_latent(unet, ctrl.as_ref(), scheduler.as_mut(), &noise, &text, self.precision, on_step)?;
        // The decoder stays in float32: it runs once per image (~3 % of a 20-step bf16 sample at the reference
        // configs), and in bf16 it alone took ~1 dB off the bf16-vs-fp32 PSNR (39.6-39.9 -> 40.8-41.0 dB there).
        let ae = &self.models.autoencoder.model;
        match self.decode_window {
            None => decode_latent(ae, &latent, self.models.scale_factor, Precision::Fp32),
            Some(w) => decode_latent_windowed(ae, &latent, self.models.scale_factor, w),
        }
    }
}
