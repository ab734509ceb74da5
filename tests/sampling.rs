//! End-to-end sampling against the reference loops (`tests/gen_sampling_fixtures.py`): the same
//! seed, models and scheduler give the same latent and decoded image as PyTorch; and the seeded
//! initial noise equals `torch.manual_seed(S); torch.randn(shape)`.
mod common;

use common::{fixtures, max_abs, max_abs_diff};
use medgen::amp::Precision;
use medgen::checkpoint::{load_model, Loaded, StateDict};
use medgen::config;
use medgen::nets::{AutoencoderKL, Conditioning, ControlNet, DiffusionModelUNet};
use medgen::sampling::{decode_latent, initial_noise, sample_latent, Control, TextConditioning};
use medgen::schedulers::{self, SchedulerConfig, SchedulerKind};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// The loops are bit-exact step by step on one thread; 1e-4 is the bound for the image.
const TOL: f64 = 1e-4;

/// One case of the sampling fixtures: its models, scheduler settings and inputs.
struct Case {
    name: String,
    aekl: Loaded<AutoencoderKL>,
    unet: Loaded<DiffusionModelUNet>,
    controlnet: Option<Loaded<ControlNet>>,
    kind: SchedulerKind,
    scheduler: SchedulerConfig,
    steps: usize,
    noise: Tensor,
    io: StateDict,
    guidance: Option<f64>,
    scale_factor: f64,
}

impl Case {
    fn get(&self, k: &str) -> Tensor {
        self.io.get(k).unwrap_or_else(|| panic!("{}: fixture lacks {k}", self.name)).shallow_clone()
    }

    fn text(&self) -> TextConditioning<'_> {
        match (self.guidance, self.io.get("uncond_context"), self.io.get("context")) {
            (Some(g), Some(u), Some(c)) => TextConditioning::Guided { uncond: u, cond: c, guidance_scale: g },
            (None, None, Some(c)) => TextConditioning::Context(c),
            (None, None, None) => TextConditioning::None,
            _ => panic!("{}: unexpected conditioning", self.name),
        }
    }

    fn control<'a>(&'a self, image: &'a Tensor) -> Option<Control<'a>> {
        self.controlnet.as_ref().map(|l| Control { controlnet: &l.model, cond: image, conditioning_scale: 1.0 })
    }

    /// The whole loop with the library's sampler, then the decoder, at `precision`.
    fn sample(&self, precision: Precision) -> (Tensor, Tensor, usize) {
        let mut scheduler = schedulers::build(self.kind, &self.scheduler).unwrap();
        scheduler.set_timesteps(self.steps).unwrap();
        let image = self.io.get("controlnet_cond").map(|t| t.shallow_clone());
        let control = image.as_ref().and_then(|i| self.control(i));
        let mut steps = 0;
        let latent = sample_latent(
            &self.unet.model,
            control.as_ref(),
            scheduler.as_mut(),
            &self.noise,
            &self.text(),
            precision,
            &mut |_, _| steps += 1,
        )
        .unwrap();
        // As `medgen sample`: the decoder in float32 whatever the networks' precision.
        let image = decode_latent(&self.aekl.model, &latent, self.scale_factor, Precision::Fp32).unwrap();
        (latent, image, steps)
    }
}

fn cases() -> Vec<Case> {
    let root = fixtures().join("sampling");
    let manifest: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(root.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest.len() >= 6, "expected the full fixture set, found {} cases", manifest.len());
    manifest
        .iter()
        .map(|c| {
            let name = c["dir"].as_str().unwrap().to_string();
            let dir = root.join(&name);
            let cfg_path = dir.join("config.json");
            let cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
            let s = &cfg["sampling"];
            let kind: SchedulerKind = s["scheduler"].as_str().unwrap().parse().unwrap();
            let load = |f: &str| StateDict::load(&dir.join(f), None).unwrap();
            let aekl_cfg = config::aekl_config(&cfg_path).unwrap();
            let aekl = load_model(load("aekl.pt"), Device::Cpu, |p, g| AutoencoderKL::new(p, &aekl_cfg, g)).unwrap();
            let unet_cfg = config::unet_config(&cfg_path).unwrap();
            let unet =
                load_model(load("unet.pt"), Device::Cpu, |p, g| DiffusionModelUNet::new(p, &unet_cfg, g)).unwrap();
            let controlnet = cfg.get("controlnet").map(|_| {
                let cn_cfg = config::controlnet_config(&cfg_path).unwrap();
                load_model(load("controlnet.pt"), Device::Cpu, |p, g| ControlNet::new(p, &cn_cfg, g)).unwrap()
            });
            let shape: Vec<i64> = s["latent_shape"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            Case {
                aekl,
                unet,
                controlnet,
                kind,
                scheduler: config::scheduler_config(&cfg_path, kind).unwrap(),
                steps: s["num_inference_steps"].as_u64().unwrap() as usize,
                noise: initial_noise(&shape, s["seed"].as_i64().unwrap(), Device::Cpu),
                io: load("io.safetensors"),
                guidance: s["guidance_scale"].as_f64(),
                scale_factor: s["scale_factor"].as_f64().unwrap(),
                name,
            }
        })
        .collect()
}

#[test]
fn reference_sampling_loops_give_the_same_images() {
    tch::set_num_threads(1);
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for case in cases() {
        let name = &case.name;
        let mut scheduler = schedulers::build(case.kind, &case.scheduler).unwrap();
        scheduler.set_timesteps(case.steps).unwrap();
        let want_t: Vec<i64> = Vec::try_from(case.get("timesteps")).unwrap();
        assert_eq!(scheduler.timesteps(), want_t.as_slice(), "{name}: timesteps");
        assert!(case.noise.equal(&case.get("noise")), "{name}: seeded initial noise differs from torch.randn");

        let (latent, image, steps) = case.sample(Precision::Fp32);
        assert_eq!(steps, want_t.len());
        for (what, got, want) in [("latent", &latent, case.get("latent")), ("image", &image, case.get("image"))] {
            let err = max_abs_diff(got, &want);
            rows.push(format!("{name:30} {what:8} max_abs_err {err:.3e}  max|ref| {:.3e}", max_abs(&want)));
            if err > TOL || err.is_nan() {
                failures.push(format!("{name} {what}: max abs error {err:e} > {TOL:e}"));
            }
        }
    }
    println!("{}", rows.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The loop embeds the control image once; the reference embeds it at every step, for both
/// guidance halves. Run that way by hand (the ControlNet's whole `forward` at every step), the
/// same latent must come out, bit for bit.
#[test]
fn control_image_embedded_once_equals_the_uncached_loop() {
    tch::set_num_threads(1);
    let mut checked = 0;
    for case in cases().into_iter().filter(|c| c.controlnet.is_some()) {
        let cn = &case.controlnet.as_ref().unwrap().model;
        let flair = case.get("controlnet_cond");
        let (cached, _, _) = case.sample(Precision::Fp32);

        let _no_grad = tch::no_grad_guard();
        let mut scheduler = schedulers::build(case.kind, &case.scheduler).unwrap();
        scheduler.set_timesteps(case.steps).unwrap();
        let g = case.guidance.expect("the ControlNet fixtures are guided");
        let (u, c) = (case.get("uncond_context"), case.get("context"));
        let batch = case.noise.size()[0];
        let context = Tensor::cat(&[u.expand([batch, -1, -1], false), c.expand([batch, -1, -1], false)], 0);
        let mut x = case.noise.shallow_clone();
        for &t in &scheduler.timesteps().to_vec() {
            let input = Tensor::cat(&[&x, &x], 0);
            let ts = Tensor::from_slice(&[t]);
            let cond = Conditioning { context: Some(&context), ..Default::default() };
            let res = cn.forward(&input, &ts, &Tensor::cat(&[&flair, &flair], 0), 1.0, &cond).unwrap();
            let out = case.unet.model.forward(&input, &ts, &res.conditioning(Some(&context), None)).unwrap();
            let halves = out.chunk(2, 0);
            let guided = &halves[0] + (&halves[1] - &halves[0]) * g;
            x = scheduler.step(&guided, t, &x).unwrap().0;
        }
        assert!(cached.equal(&x), "{}: cached vs uncached max diff {:e}", case.name, max_abs_diff(&cached, &x));
        checked += 1;
    }
    assert_eq!(checked, 2, "expected the two ControlNet fixture cases");
}

/// bf16 autocast on the networks, fp32 noise and sampler: the decoded images stay within 40 dB
/// PSNR of the fp32 ones (images clipped to [0, 1], as saved), and bf16 really ran (they differ).
#[test]
fn bf16_sampling_stays_within_40_db_of_fp32() {
    let mut rows = Vec::new();
    for case in cases() {
        let (_, fp32, _) = case.sample(Precision::Fp32);
        let (latent, bf16, _) = case.sample(Precision::Bf16);
        assert_eq!(latent.kind(), Kind::Float, "{}: the latent stays float32", case.name);
        assert_eq!(bf16.kind(), Kind::Float, "{}: the image is returned in float32", case.name);
        let (a, b) = (fp32.clamp(0.0, 1.0), bf16.clamp(0.0, 1.0));
        let mse = f64::try_from((&a - &b).square().mean(Kind::Double)).unwrap();
        let psnr = 10.0 * (1.0 / mse).log10();
        rows.push(format!("{:30} bf16 vs fp32 PSNR {psnr:.2} dB", case.name));
        assert!(mse > 0.0, "{}: bf16 gave the fp32 image bit for bit: autocast did not run", case.name);
        assert!(psnr >= 40.0, "{}: bf16 vs fp32 PSNR {psnr:.2} dB < 40", case.name);
    }
    println!("{}", rows.join("\n"));
}

/// reference-repo.md §4: torch 2.1.2 CPU `randn((1,3,20,28))` after `manual_seed(seed)`.
#[test]
fn seeded_noise_matches_the_reference_values() {
    for (seed, first, sum) in [
        (0, [-1.1258398f32, -1.1523602, -0.2505786, -0.4338788], 46.940113f64),
        (1, [-1.5255959, -0.7502318, -0.6539809, -1.6094848], 42.969086),
        (999, [-0.2527987, 1.4072133, 0.2910496, 1.0364678], -12.013616),
    ] {
        let n = initial_noise(&[1, 3, 20, 28], seed, Device::Cpu);
        let v: Vec<f32> = Vec::try_from(n.flatten(0, -1).narrow(0, 0, 4)).unwrap();
        for (a, b) in v.iter().zip(first) {
            assert!((a - b).abs() <= 1e-6, "seed {seed}: {v:?} vs {first:?}");
        }
        let s = f64::try_from(n.sum(tch::Kind::Double)).unwrap();
        assert!((s - sum).abs() < 1e-4, "seed {seed}: sum {s} vs {sum}");
    }
    // Any device gets the CPU generator's numbers.
    let a = initial_noise(&[2, 3], 5, Device::Cpu);
    let b = initial_noise(&[2, 3], 5, Device::cuda_if_available());
    assert!(a.equal(&b.to_device(Device::Cpu)));
}
