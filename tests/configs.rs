//! The shipped configs parse into the models they describe, and bad model configs are refused
//! with the reason (what MONAI raises, or would only hit deep inside a forward pass).
use medgen::checkpoint::Generation;
use medgen::config;
use medgen::generate::{SamplerChoice, SamplingSection};
use medgen::losses::perceptual::PerceptualLossConfig;
use medgen::nets::lpips::LpipsNet;
use medgen::nets::patch_discriminator::{PatchDiscriminator, PatchDiscriminatorConfig};
use medgen::nets::PerLevel;
use medgen::nets::{
    AutoencoderKL, AutoencoderKLConfig, ControlNet, ControlNetConfig, DiffusionModelUNet, DiffusionModelUNetConfig,
};
use medgen::schedulers::SchedulerKind;
use medgen::train::aekl::AeklLossWeights;
use medgen::train::run::TrainSettings;
use std::path::PathBuf;

fn cfg(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs").join(name)
}

#[test]
fn reference_configs_parse() {
    let unet = config::unet_config(&cfg("ldm_v0.json")).unwrap();
    assert_eq!(unet.channels, [256, 512, 768]);
    assert_eq!(unet.num_head_channels, PerLevel::Each(vec![0, 512, 768]));
    assert_eq!(unet.cross_attention_dim, Some(1024));
    let cn = config::controlnet_config(&cfg("controlnet_v0.json")).unwrap();
    assert_eq!(cn.conditioning_embedding_num_channels, [64, 128, 128, 256]);
    // The reference ControlNet copies the reference UNet's encoder.
    cn.matches_unet(&unet).unwrap();
    for file in ["ldm_v0.json", "controlnet_v0.json"] {
        for kind in [SchedulerKind::Ddpm, SchedulerKind::Ddim, SchedulerKind::Pndm] {
            let s = config::scheduler_config(&cfg(file), kind).unwrap();
            assert_eq!(s.num_train_timesteps, 1000);
            assert_eq!(s.beta_start, Some(0.0015));
        }
    }
    config::aekl_config(&cfg("aekl_v0.json")).unwrap();
}

fn trainable_numel(vs: &tch::nn::VarStore) -> i64 {
    vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
}

fn train_settings(root: &serde_json::Value, file: &str) -> TrainSettings {
    serde_json::from_value(root["train"].clone()).unwrap_or_else(|e| panic!("{file}: `train`: {e}"))
}

/// configs/reference/ is the article's training as its scripts ran it (reference-repo.md §1.4, §2): the networks of
/// the v0 configs, the .sh files' batches, epochs, validation cadence, adv_start and scale factor, and the learning
/// rates. Each network is built (random weights, CPU) and has the reference's parameter count (§7.3).
#[test]
fn reference_training_configs() {
    let f = |name: &str| cfg(&format!("reference/{name}"));
    let root = |name: &str| config::read_json(&f(name)).unwrap();
    // The networks are the v0 configs' exactly.
    for (file, v0, section) in [
        ("aekl.json", "aekl_v0.json", "stage1"),
        ("ldm.json", "ldm_v0.json", "ldm"),
        ("controlnet.json", "controlnet_v0.json", "controlnet"),
    ] {
        let (r, v) = (root(file), config::read_json(&cfg(v0)).unwrap());
        assert_eq!(r[section]["params"], v[section]["params"], "{file}");
        assert_eq!(r[section]["base_lr"], v[section]["base_lr"], "{file}");
    }
    let (a, l, c) = (root("aekl.json"), root("ldm.json"), root("controlnet.json"));
    let a_v0 = config::read_json(&cfg("aekl_v0.json")).unwrap();
    assert_eq!(a["stage1"], a_v0["stage1"]);
    assert_eq!(a["discriminator"], a_v0["discriminator"]);
    assert_eq!(l["ldm"]["scheduler"], c["ldm"]["scheduler"]);

    let s = train_settings(&a, "aekl.json");
    assert_eq!((s.batch_size, s.n_epochs, s.eval_freq, s.adv_start, s.seed), (256, 100, 5, 10, 42));
    for (file, v, batch) in [("ldm.json", &l, 512), ("controlnet.json", &c, 384)] {
        let s = train_settings(v, file);
        assert_eq!((s.batch_size, s.n_epochs, s.eval_freq, s.seed), (batch, 150, 10, 42), "{file}");
        assert_eq!((s.scale_factor, s.context_dropout), (Some(0.3), 0.1), "{file}");
        assert_eq!(v["sampling"]["scale_factor"], 0.3, "{file}");
    }
    let w: AeklLossWeights = serde_json::from_value(a["stage1"].clone()).unwrap();
    assert_eq!((w.perceptual_weight, w.adv_weight, w.kl_weight), (0.002, 0.005, 1e-8));
    assert_eq!((a["stage1"]["base_lr"].as_f64(), a["stage1"]["disc_lr"].as_f64()), (Some(1e-5), Some(5e-5)));
    // The perceptual loss names torchvision's SqueezeNet 1.1 checkpoint, which the user supplies.
    let p: PerceptualLossConfig = serde_json::from_value(config::model_params(&a, "perceptual_network")).unwrap();
    assert_eq!(p.network_type, LpipsNet::Squeeze);
    let backbone = p.backbone_weights.expect("the reference perceptual loss needs its ImageNet trunk");
    assert_eq!(backbone.file_name().unwrap(), LpipsNet::Squeeze.torchvision_file());

    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    AutoencoderKL::new(&vs.root(), &config::aekl_config(&f("aekl.json")).unwrap(), Generation::Monai).unwrap();
    assert_eq!(trainable_numel(&vs), 34_010_024);
    let d: PatchDiscriminatorConfig = serde_json::from_value(config::model_params(&a, "discriminator")).unwrap();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    PatchDiscriminator::new(&vs.root(), &d).unwrap();
    assert_eq!(trainable_numel(&vs), 11_032_193);
    let unet = config::unet_config(&f("ldm.json")).unwrap();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    DiffusionModelUNet::new(&vs.root(), &unet, Generation::Monai).unwrap();
    assert_eq!(trainable_numel(&vs), 263_636_995);
    drop(vs);
    let cn = config::controlnet_config(&f("controlnet.json")).unwrap();
    cn.matches_unet(&unet).unwrap();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    ControlNet::new(&vs.root(), &cn, Generation::Monai).unwrap();
    assert_eq!(trainable_numel(&vs), 117_883_072);
}

/// reference-repo.md §4: the sampling scripts' DDIM (clip_sample=False, monai-generative's
/// spacing) runs 200 steps as 995, 990, ..., 0 and never clips. It is what `--reference-sampling`
/// gives for every config, whatever its `sampling` section's default.
#[test]
fn reference_sampling_scheduler() {
    let reference = SamplerChoice { reference: true, ..Default::default() };
    for file in [
        "ldm_v0.json",
        "controlnet_v0.json",
        "demo/ldm.json",
        "demo/controlnet.json",
        "reference/ldm.json",
        "reference/controlnet.json",
    ] {
        let section = SamplingSection::of(&cfg(file)).unwrap();
        let (kind, s, steps) = section.resolve(&cfg(file), &reference).unwrap();
        assert_eq!((kind, steps), (SchedulerKind::Ddim, 200), "{file}");
        assert_eq!(s.clip_sample, Some(false));
        let mut sched = medgen::schedulers::build(kind, &s).unwrap();
        sched.set_timesteps(steps).unwrap();
        let want: Vec<i64> = (0..200).rev().map(|i| 5 * i).collect();
        assert_eq!(sched.timesteps(), want.as_slice(), "{file}");
        // The config's own default builds too, and another sampler keeps the training schedule.
        let (kind, s, steps) = section.resolve(&cfg(file), &SamplerChoice::default()).unwrap();
        medgen::schedulers::build(kind, &s).unwrap().set_timesteps(steps).unwrap();
        let other = SamplerChoice { kind: Some(SchedulerKind::UniPc), steps: Some(15), ..Default::default() };
        let (kind, u, steps) = section.resolve(&cfg(file), &other).unwrap();
        assert_eq!((kind, steps), (SchedulerKind::UniPc, 15));
        assert_eq!(
            (u.schedule, u.beta_start, u.beta_end, u.prediction_type),
            (s.schedule, s.beta_start, s.beta_end, s.prediction_type)
        );
    }
}

#[track_caller]
fn unet_err(c: DiffusionModelUNetConfig) -> String {
    format!("{:#}", c.validate().unwrap_err())
}

#[test]
fn bad_unet_and_controlnet_configs_name_the_problem() {
    let base = DiffusionModelUNetConfig {
        channels: vec![32, 64],
        attention_levels: vec![false, true],
        num_head_channels: PerLevel::Each(vec![0, 32]),
        num_res_blocks: PerLevel::Same(1),
        ..Default::default()
    };
    base.validate().unwrap();
    let e = unet_err(DiffusionModelUNetConfig { with_conditioning: true, ..base.clone() });
    assert!(e.contains("cross_attention_dim"), "{e}");
    let e = unet_err(DiffusionModelUNetConfig { cross_attention_dim: Some(8), ..base.clone() });
    assert!(e.contains("with_conditioning"), "{e}");
    // The middle block always has attention, with the last level's head width: 0 there is an error
    // (a ZeroDivisionError in MONAI), 0 at a level without attention is fine.
    let e = unet_err(DiffusionModelUNetConfig { num_head_channels: PerLevel::Same(0), ..base.clone() });
    assert!(e.contains("num_head_channels[1] = 0"), "{e}");
    let e = unet_err(DiffusionModelUNetConfig { num_head_channels: PerLevel::Each(vec![0, 32, 32]), ..base.clone() });
    assert!(e.contains("num_head_channels"), "{e}");
    // Spatial attention takes channels / num_head_channels heads, which must split the channels.
    let c = DiffusionModelUNetConfig {
        channels: vec![32, 96],
        num_head_channels: PerLevel::Each(vec![0, 13]),
        ..base.clone()
    };
    let e = unet_err(c);
    assert!(e.contains("96 channels") && e.contains("7 heads"), "{e}");
    let e = unet_err(DiffusionModelUNetConfig { channels: vec![32, 48], ..base.clone() });
    assert!(e.contains("48 is not a multiple of 32"), "{e}");
    let e = unet_err(DiffusionModelUNetConfig { num_res_blocks: PerLevel::Each(vec![1, 1, 1]), ..base.clone() });
    assert!(e.contains("num_res_blocks"), "{e}");
    let e = unet_err(DiffusionModelUNetConfig { dropout_cattn: 1.5, ..base.clone() });
    assert!(e.contains("dropout_cattn"), "{e}");
    let e = unet_err(DiffusionModelUNetConfig { spatial_dims: 4, ..base.clone() });
    assert!(e.contains("spatial_dims"), "{e}");

    let cn = ControlNetConfig { conditioning_embedding_num_channels: vec![], ..Default::default() };
    assert!(format!("{:#}", cn.validate().unwrap_err()).contains("conditioning_embedding_num_channels"));

    // Unknown keys are named (a misspelt option must not fall back to a default silently).
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("ldm.json");
    std::fs::write(&p, r#"{"ldm": {"params": {"channels": [32, 64], "atention_levels": [false, true]}}}"#).unwrap();
    let e = format!("{:#}", config::unet_config(&p).unwrap_err());
    assert!(e.contains("atention_levels") && e.contains("ldm.json"), "{e}");
    std::fs::write(&p, r#"{"ldm": {"scheduler": {"schedule": "linear_beta", "eta": 0.5}}}"#).unwrap();
    let e = format!("{:#}", config::scheduler_config(&p, SchedulerKind::Ddpm).unwrap_err());
    assert!(e.contains("eta"), "{e}");
}

#[track_caller]
fn aekl_err(c: AutoencoderKLConfig) -> String {
    format!("{:#}", c.validate().unwrap_err())
}

fn small_aekl() -> AutoencoderKLConfig {
    AutoencoderKLConfig {
        channels: vec![8, 8, 16],
        attention_levels: vec![false, false, true],
        num_res_blocks: PerLevel::Same(1),
        norm_num_groups: 4,
        ..Default::default()
    }
}

/// What MONAI's AutoencoderKL refuses in its constructor, and what it only fails on inside a forward pass.
#[test]
fn bad_aekl_configs_name_the_problem() {
    let base = small_aekl();
    base.validate().unwrap();
    let e = aekl_err(AutoencoderKLConfig { channels: vec![0, 0, 0], ..base.clone() });
    assert!(e.contains("channels must be positive"), "{e}");
    let e = aekl_err(AutoencoderKLConfig { channels: vec![8, 8, 18], ..base.clone() });
    assert!(e.contains("18 is not a multiple of 4"), "{e}");
    let e = aekl_err(AutoencoderKLConfig { attention_levels: vec![false, true], ..base.clone() });
    assert!(e.contains("attention_levels"), "{e}");
    let e = aekl_err(AutoencoderKLConfig { num_res_blocks: PerLevel::Each(vec![1, 1]), ..base.clone() });
    assert!(e.contains("num_res_blocks"), "{e}");
    let e = aekl_err(AutoencoderKLConfig { num_res_blocks: PerLevel::Each(vec![1, 1, -1]), ..base.clone() });
    assert!(e.contains("negative"), "{e}");
    // A level without ResBlocks keeps the previous level's width.
    let e = aekl_err(AutoencoderKLConfig { num_res_blocks: PerLevel::Each(vec![1, 1, 0]), ..base.clone() });
    assert!(e.contains("num_res_blocks[2] = 0 needs channels[2] == channels[1]"), "{e}");
    // The decoder passes it through at the next level's width.
    let e = aekl_err(AutoencoderKLConfig { num_res_blocks: PerLevel::Each(vec![1, 0, 1]), ..base.clone() });
    assert!(e.contains("num_res_blocks[1] = 0 needs channels[1] == channels[2]"), "{e}");
    for (name, c) in [
        ("in_channels", AutoencoderKLConfig { in_channels: 0, ..base.clone() }),
        ("out_channels", AutoencoderKLConfig { out_channels: -1, ..base.clone() }),
        ("latent_channels", AutoencoderKLConfig { latent_channels: 0, ..base.clone() }),
        ("norm_num_groups", AutoencoderKLConfig { norm_num_groups: 0, ..base.clone() }),
        ("spatial_dims", AutoencoderKLConfig { spatial_dims: 4, ..base.clone() }),
        (
            "channels must not be empty",
            AutoencoderKLConfig { channels: vec![], attention_levels: vec![], ..base.clone() },
        ),
    ] {
        let e = aekl_err(c);
        assert!(e.contains(name), "{name}: {e}");
    }
    // The same rule through a config file names the file.
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("aekl.json");
    std::fs::write(
        &p,
        r#"{"stage1": {"params": {"channels": [8, 16], "attention_levels": [false, false],
        "num_res_blocks": [1, 0], "norm_num_groups": 4}}}"#,
    )
    .unwrap();
    let e = format!("{:#}", config::aekl_config(&p).unwrap_err());
    assert!(e.contains("aekl.json") && e.contains("num_res_blocks[1] = 0"), "{e}");
}

/// The width rule is not stricter than the network: a level without ResBlocks at the same width builds and
/// runs; images too small to encode, of a size that cannot come back, or of an integer dtype are refused
/// before the first layer.
#[test]
fn aekl_inputs_are_checked_before_the_forward_pass() {
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let cfg =
        AutoencoderKLConfig { num_res_blocks: PerLevel::Each(vec![0, 1, 1]), channels: vec![8, 8, 16], ..small_aekl() };
    cfg.validate().unwrap();
    let ae = AutoencoderKL::new(&vs.root(), &cfg, medgen::checkpoint::Generation::Monai).unwrap();
    let x = tch::Tensor::rand([1, 1, 8, 12], (tch::Kind::Float, tch::Device::Cpu));
    assert_eq!(tch::no_grad(|| ae.reconstruct(&x)).unwrap().size(), [1, 1, 8, 12]);
    ae.check_reconstructable(&x, "x").unwrap();
    let e = format!(
        "{:#}",
        ae.encode(&tch::Tensor::rand([1, 1, 3, 12], (tch::Kind::Float, tch::Device::Cpu))).unwrap_err()
    );
    assert!(e.contains("3x12") && e.contains("at least 4x4"), "{e}");
    let odd = tch::Tensor::rand([1, 1, 10, 12], (tch::Kind::Float, tch::Device::Cpu));
    let e = format!("{:#}", ae.check_reconstructable(&odd, "the image batch").unwrap_err());
    assert!(e.contains("the image batch is 10x12") && e.contains("multiples of 4"), "{e}");
    let ints = tch::Tensor::ones([1, 1, 8, 8], (tch::Kind::Int64, tch::Device::Cpu));
    let e = format!("{:#}", ae.encode(&ints).unwrap_err());
    assert!(e.contains("Int64"), "{e}");
}
