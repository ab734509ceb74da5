//! The shipped configs parse into the models they describe, and bad model configs are refused
//! with the reason (what MONAI raises, or would only hit deep inside a forward pass).
use medgen::config;
use medgen::nets::PerLevel;
use medgen::nets::{ControlNetConfig, DiffusionModelUNetConfig};
use medgen::schedulers::SchedulerKind;
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

/// reference-repo.md §4: the sampling scripts' DDIM (clip_sample=False, monai-generative's
/// spacing) runs 200 steps as 995, 990, ..., 0 and never clips.
#[test]
fn reference_sampling_scheduler() {
    for file in ["ldm_v0.json", "controlnet_v0.json"] {
        let (kind, s) = config::sampling_scheduler(&cfg(file)).unwrap();
        assert_eq!(kind, SchedulerKind::Ddim);
        assert_eq!(s.clip_sample, Some(false));
        let mut sched = medgen::schedulers::build(kind, &s).unwrap();
        sched.set_timesteps(200).unwrap();
        let want: Vec<i64> = (0..200).rev().map(|i| 5 * i).collect();
        assert_eq!(sched.timesteps(), want.as_slice(), "{file}");
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
    let e = unet_err(DiffusionModelUNetConfig { spatial_dims: 3, ..base.clone() });
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
