//! Sliding-window decoding against MONAI 1.6.1's `SlidingWindowInferer` (tests/gen_sliding_window_fixtures.py):
//! constant and Gaussian blending, per-axis overlaps and sigmas, windows of two batch elements in one predictor call,
//! a latent padded up to the window, axes falling back to the whole latent; 2-D and 3-D autoencoders.
mod common;

use common::{fixtures, max_abs, max_abs_diff};
use medgen::checkpoint::{load_model, StateDict};
use medgen::nets::{AutoencoderKL, AutoencoderKLConfig};
use medgen::sliding_window::{sliding_window_inference, SlidingWindowConfig};
use tch::Device;

/// Same libtorch, one thread, MONAI's order of operations: the measured difference is 0.
const TOL: f64 = 1e-5;

#[test]
fn windowed_decoding_matches_monai() {
    tch::set_num_threads(1);
    let root = fixtures().join("sliding_window");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("manifest.json")).unwrap()).unwrap();
    let cases = manifest.as_array().unwrap();
    assert!(cases.len() >= 7, "expected the full fixture set, found {} cases", cases.len());
    let mut failures = Vec::new();
    for c in cases {
        let case = c["case"].as_str().unwrap();
        let dir = root.join(c["dir"].as_str().unwrap());
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let ae_cfg: AutoencoderKLConfig = serde_json::from_value(cfg["autoencoder"].clone()).unwrap();
        let sw: SlidingWindowConfig = serde_json::from_value(cfg["sliding_window"].clone()).unwrap();
        let sd = StateDict::load(&dir.join("state_dict.pt"), None).unwrap();
        let ae = load_model(sd, Device::Cpu, |p, g| AutoencoderKL::new(p, &ae_cfg, g)).unwrap().model;
        let io = StateDict::load(&dir.join("io.safetensors"), None).unwrap();
        let z = io.get("z").unwrap();
        let _g = tch::no_grad_guard();
        let got = sliding_window_inference(z, &sw, |w| ae.decode_stage_2_outputs(w)).unwrap();
        let want = io.get("windowed").unwrap();
        let err = max_abs_diff(&got, want);
        // The windowed decode must differ from the whole one (else the case tests nothing about windows), except
        // where one window covers the latent.
        let whole_gap = max_abs_diff(&ae.decode_stage_2_outputs(z).unwrap(), io.get("whole").unwrap());
        let window_effect = max_abs_diff(want, io.get("whole").unwrap());
        println!(
            "{case:28} shape {:?}  max_abs_err {err:.3e} (max |ref| {:.3e}); whole-latent decode err {whole_gap:.3e}; \
             windowed vs whole {window_effect:.3e}",
            got.size(),
            max_abs(want)
        );
        if err > TOL || err.is_nan() || whole_gap > TOL {
            failures.push(format!("{case}: windowed err {err:e}, whole err {whole_gap:e}"));
        }
        if case != "3d_whole" && window_effect < 1e-4 {
            failures.push(format!("{case}: the windowed decode equals the whole one: the case does not test windows"));
        }
    }
    assert!(failures.is_empty(), "sliding-window failures:\n{}", failures.join("\n"));
}

#[test]
fn bad_settings_are_refused_with_the_setting_named() {
    let z = tch::Tensor::zeros([1, 3, 8, 8, 8], (tch::Kind::Float, Device::Cpu));
    let id = |w: &tch::Tensor| Ok(w.shallow_clone());
    for (cfg, needle) in [
        (SlidingWindowConfig::new(vec![4, 4]), "roi_size [4, 4] has 2 entries"),
        (
            SlidingWindowConfig { overlap: vec![1.0], ..SlidingWindowConfig::new(vec![4, 4, 4]) },
            "overlap must be in [0, 1)",
        ),
        (
            SlidingWindowConfig { overlap: vec![0.1, 0.2], ..SlidingWindowConfig::new(vec![4, 4, 4]) },
            "overlap has 2 entries",
        ),
        (SlidingWindowConfig { sw_batch_size: 0, ..SlidingWindowConfig::new(vec![4, 4, 4]) }, "sw_batch_size"),
        (SlidingWindowConfig { sigma_scale: vec![0.0], ..SlidingWindowConfig::new(vec![4, 4, 4]) }, "sigma_scale"),
    ] {
        let e = sliding_window_inference(&z, &cfg, id).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
    // A predictor that changes the batch is a wiring error, not something to blend.
    let e = sliding_window_inference(&z, &SlidingWindowConfig::new(vec![4, 4, 4]), |w: &tch::Tensor| {
        Ok(w.repeat([2, 1, 1, 1, 1]))
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("the predictor returned shape"), "{e}");
}
