//! Running the `medgen` binary, and the tiny data set and configs the end-to-end tests train on.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// One libtorch thread, as the fixtures were made: results are then bit-identical to
/// PyTorch's instead of differing in float rounding.
pub fn medgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medgen")).args(args).env("OMP_NUM_THREADS", "1").output().expect("medgen runs")
}

/// Asserts the command succeeded; returns what it printed.
pub fn ok(o: Output) -> String {
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "medgen failed:\n{out}\n{err}");
    format!("{out}{err}")
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// 12 T1w/FLAIR PNG pairs of `size`x`size` with some structure, split 10/2.
pub fn data(dir: &Path, size: u32) {
    let mut lists = [String::from("t1w\tflair\n"), String::from("t1w\tflair\n")];
    for i in 0..12u32 {
        let (c, r2) = (size as i32 / 2, 150 * (size * size) / (32 * 32));
        let t1w = image::GrayImage::from_fn(size, size, |x, y| {
            let d = ((x as i32 - c).pow(2) + (y as i32 - c).pow(2)) as u32;
            image::Luma([if d < r2 { 120 + ((x * 3 + y * 5 + i * 17) % 90) as u8 } else { (i * 7 % 20) as u8 }])
        });
        let flair = image::GrayImage::from_fn(size, size, |x, y| image::Luma([255 - t1w.get_pixel(x, y)[0] / 2]));
        let (t, f) = (dir.join(format!("s{i}_T1w.png")), dir.join(format!("s{i}_FLAIR.png")));
        t1w.save(&t).unwrap();
        flair.save(&f).unwrap();
        lists[(i >= 10) as usize].push_str(&format!("{}\t{}\n", t.display(), f.display()));
    }
    std::fs::write(dir.join("train.tsv"), &lists[0]).unwrap();
    std::fs::write(dir.join("validation.tsv"), &lists[1]).unwrap();
}

pub fn configs(dir: &Path, epochs: u32) -> [PathBuf; 3] {
    let train = format!(
        r#""train": {{"batch_size": 4, "n_epochs": {epochs}, "eval_freq": 1, "seed": 5, "checkpoint_every": 1,
  "adv_start": 1, "sample_steps": 2, "context_dropout": 0.1}}"#
    );
    let aekl = format!(
        r#"{{"stage1": {{"base_lr": 0.001, "disc_lr": 0.001, "perceptual_weight": 0.0, "adv_weight": 0.01,
  "kl_weight": 1e-6, "params": {{"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "channels": [8, 8],
  "latent_channels": 3, "num_res_blocks": 1, "attention_levels": [false, false], "norm_num_groups": 4,
  "with_encoder_nonlocal_attn": false, "with_decoder_nonlocal_attn": false}}}},
 "discriminator": {{"params": {{"spatial_dims": 2, "channels": 8, "num_layers_d": 2, "in_channels": 1}}}},
 {train}}}"#
    );
    let sched = r#""scheduler": {"schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0205,
  "prediction_type": "v_prediction"}"#;
    let encoder = r#""spatial_dims": 2, "in_channels": 3, "num_res_blocks": 1, "channels": [8, 16],
  "attention_levels": [false, true], "num_head_channels": [0, 8], "norm_num_groups": 4"#;
    let ldm =
        format!(r#"{{"ldm": {{"base_lr": 0.001, "params": {{{encoder}, "out_channels": 3}}, {sched}}}, {train}}}"#);
    let cn = format!(
        r#"{{"controlnet": {{"base_lr": 0.001, "params": {{{encoder}, "conditioning_embedding_num_channels": [8, 8]}}}},
 "ldm": {{{sched}}}, {train}}}"#
    );
    let paths = [dir.join("aekl.json"), dir.join("ldm.json"), dir.join("controlnet.json")];
    for (p, c) in paths.iter().zip([aekl, ldm, cn]) {
        std::fs::write(p, c).unwrap();
    }
    paths
}
