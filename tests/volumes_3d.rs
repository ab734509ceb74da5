//! The 3-D pipeline end to end on a tiny data set, CPU: `medgen train` (AutoencoderKL, LDM, ControlNet,
//! `spatial_dims: 3`) on NIfTI volumes, resumed exactly after an interruption, then `medgen sample 3d` writing
//! NIfTI volumes: unconditional with a header from the voxel size, translated from control volumes with their
//! headers, and decoded by a sliding window. Bad inputs get errors naming them.
mod common;

use common::run::{medgen, ok, s};
use medgen::checkpoint::StateDict;
use medgen::io::volume::{read_volume, write_volume};
use ndarray::Array3;
use nifti::NiftiHeader;
use std::path::{Path, PathBuf};

const SIZE: usize = 16;

/// A header with its own geometry (oblique-free, 1.2 x 1.1 x 2 mm, shifted), to see it carried over.
fn header() -> NiftiHeader {
    NiftiHeader {
        pixdim: [1.0, 1.2, 1.1, 2.0, 0.0, 0.0, 0.0, 0.0],
        sform_code: 2,
        srow_x: [1.2, 0.0, 0.0, -10.0],
        srow_y: [0.0, 1.1, 0.0, 5.0],
        srow_z: [0.0, 0.0, 2.0, 3.5],
        ..NiftiHeader::default()
    }
}

/// 6 T1w/FLAIR volume pairs (a bright ball on a dark background, raw intensities up to ~900), split 4/2.
fn volumes(dir: &Path) {
    let mut lists = [String::from("t1w\tflair\n"), String::from("t1w\tflair\n")];
    for i in 0..6usize {
        let c = SIZE as f32 / 2.0 - 0.5;
        let t1w = Array3::from_shape_fn((SIZE, SIZE, SIZE), |(x, y, z)| {
            let d = ((x as f32 - c).powi(2) + (y as f32 - c).powi(2) + (z as f32 - c).powi(2)).sqrt();
            if d < 5.0 + i as f32 * 0.3 {
                600.0 + ((x * 3 + y * 5 + z * 7 + i * 17) % 300) as f32
            } else {
                (i * 7 % 20) as f32
            }
        });
        let flair = t1w.mapv(|v| 1000.0 - v / 2.0);
        let (t, f) = (dir.join(format!("s{i}_T1w.nii.gz")), dir.join(format!("s{i}_FLAIR.nii.gz")));
        write_volume(&t, &t1w, Some(&header())).unwrap();
        write_volume(&f, &flair, Some(&header())).unwrap();
        lists[(i >= 4) as usize].push_str(&format!("{}\t{}\n", t.display(), f.display()));
    }
    std::fs::write(dir.join("train.tsv"), &lists[0]).unwrap();
    std::fs::write(dir.join("validation.tsv"), &lists[1]).unwrap();
}

fn configs(dir: &Path) -> [PathBuf; 3] {
    let train = r#""train": {"batch_size": 2, "n_epochs": 2, "eval_freq": 1, "seed": 5, "checkpoint_every": 1,
  "adv_start": 1, "sample_steps": 2}"#;
    let aekl = format!(
        r#"{{"stage1": {{"base_lr": 0.001, "disc_lr": 0.001, "perceptual_weight": 0.0, "adv_weight": 0.01,
  "kl_weight": 1e-6, "params": {{"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": [4, 8],
  "latent_channels": 2, "num_res_blocks": 1, "attention_levels": [false, false], "norm_num_groups": 4,
  "with_encoder_nonlocal_attn": false, "with_decoder_nonlocal_attn": true}}}},
 "discriminator": {{"params": {{"spatial_dims": 3, "channels": 4, "num_layers_d": 2, "in_channels": 1}}}},
 {train}}}"#
    );
    let sched = r#""scheduler": {"schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0205,
  "prediction_type": "v_prediction"}"#;
    let unet = r#""spatial_dims": 3, "in_channels": 2, "num_res_blocks": 1, "channels": [8, 16],
  "attention_levels": [false, true], "num_head_channels": [0, 8], "norm_num_groups": 4"#;
    let sampling = r#""sampling": {"scheduler_kind": "ddim", "scheduler": {"schedule": "scaled_linear_beta",
  "beta_start": 0.0015, "beta_end": 0.0205, "prediction_type": "v_prediction", "clip_sample": false},
  "num_inference_steps": 3, "latent_shape": [2, 8, 8, 8], "voxel_size": [1.5, 1.5, 2.0]}"#;
    let ldm = format!(
        r#"{{"ldm": {{"base_lr": 0.001, "params": {{{unet}, "out_channels": 2}}, {sched}}}, {train}, {sampling}}}"#
    );
    let cn = format!(
        r#"{{"controlnet": {{"base_lr": 0.001, "params": {{{unet}, "conditioning_embedding_num_channels": [4, 4]}}}},
 "ldm": {{{sched}}}, {train}, {sampling}}}"#
    );
    let paths = [dir.join("aekl.json"), dir.join("ldm.json"), dir.join("controlnet.json")];
    for (p, c) in paths.iter().zip([aekl, ldm, cn]) {
        std::fs::write(p, c).unwrap();
    }
    paths
}

fn train(stage: &str, cfg: &Path, data: &Path, run: &Path, extra: &[&str]) -> String {
    let mut args = vec!["train", stage, "--config", s(cfg), "--data", s(data), "--run", s(run)];
    args.extend(extra);
    ok(medgen(&args))
}

fn fails(args: &[&str]) -> String {
    let o = medgen(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "medgen {args:?} should fail:\n{err}");
    err
}

fn same_weights(a: &Path, b: &Path) -> bool {
    let (a, b) = (StateDict::load(a, None).unwrap(), StateDict::load(b, None).unwrap());
    a.names() == b.names() && a.iter().all(|(k, t)| b.get(k).is_some_and(|o| o.equal(t)))
}

fn in_unit_range(v: &Array3<f64>) -> bool {
    v.iter().all(|x| (0.0..=1.0).contains(x))
}

#[test]
fn three_d_train_sample_nifti() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    volumes(d);
    let [aekl, ldm, cn] = configs(d);
    let runs = d.join("runs");

    // Training on volumes, each stage; the autoencoder also stopped mid-run and resumed: identical weights.
    let log = train("aekl", &aekl, d, &runs.join("aekl"), &[]);
    assert!(log.contains("NIfTI volumes: they are not augmented"), "{log}");
    train("aekl", &aekl, d, &runs.join("aekl_r"), &["--max-steps", "3"]);
    let log = train("aekl", &aekl, d, &runs.join("aekl_r"), &["--resume"]);
    assert!(log.contains("resuming aekl at epoch 1 step 3"), "{log}");
    let fin = |r: &str| runs.join(r).join("final_model.safetensors");
    assert!(same_weights(&fin("aekl"), &fin("aekl_r")), "3-D aekl: resumed != straight");
    assert!(runs.join("aekl/reconstructions_epoch0002.png").is_file());
    let aekl_w = fin("aekl");
    let stage1 = ["--stage1-config", s(&aekl), "--stage1-weights", s(&aekl_w)];
    train("ldm", &ldm, d, &runs.join("ldm"), &stage1);
    train("ldm", &ldm, d, &runs.join("ldm_r"), &[&stage1[..], &["--max-steps", "2"]].concat());
    train("ldm", &ldm, d, &runs.join("ldm_r"), &[&stage1[..], &["--resume"]].concat());
    assert!(same_weights(&fin("ldm"), &fin("ldm_r")), "3-D ldm: resumed != straight");
    assert!(runs.join("ldm/samples_epoch0002.png").is_file());
    let ldm_w = fin("ldm");
    let both = [&stage1[..], &["--ldm-config", s(&ldm), "--ldm-weights", s(&ldm_w)]].concat();
    train("controlnet", &cn, d, &runs.join("cn"), &both);

    // Unconditional volumes: the config's latent shape and voxel size.
    let out = d.join("samples");
    let base = [&["sample", "3d"][..], &both[..], &["--device", "cpu"]].concat();
    ok(medgen(&[&base[..], &["--num", "2", "--output", s(&out)]].concat()));
    let v = read_volume(&out.join("sample_1.nii.gz")).unwrap();
    assert_eq!(v.dims(), [SIZE; 3]);
    assert!(in_unit_range(&v.data));
    assert_eq!(&v.header.pixdim[1..4], &[1.5, 1.5, 2.0]);
    assert_eq!((v.header.sform_code, v.header.srow_z), (1, [0.0, 0.0, 2.0, 0.0]));
    assert!(out.join("sample_0.nii.gz").is_file() && out.join("manifest.json").is_file());

    // Sliding-window decoding: a window over the whole latent is the whole decode, bit for bit; smaller Gaussian
    // windows give a volume of the same geometry.
    let whole_window = d.join("sw_whole");
    ok(medgen(&[&base[..], &["--num", "2", "--output", s(&whole_window), "--sw-roi", "0,0,0"]].concat()));
    assert_eq!(read_volume(&whole_window.join("sample_1.nii.gz")).unwrap().data, v.data);
    let windowed = d.join("sw_small");
    ok(medgen(
        &[&base[..], &["--num", "1", "--output", s(&windowed), "--sw-roi", "4,4,4", "--sw-mode", "gaussian"]].concat(),
    ));
    let w = read_volume(&windowed.join("sample_0.nii.gz")).unwrap();
    assert_eq!(w.dims(), [SIZE; 3]);
    assert!(in_unit_range(&w.data));

    // ControlNet translation of the validation FLAIR volumes: each output keeps its control's name and geometry.
    let controls = d.join("controls");
    std::fs::create_dir(&controls).unwrap();
    for i in [4, 5] {
        let name = format!("s{i}_FLAIR.nii.gz");
        std::fs::copy(d.join(&name), controls.join(&name)).unwrap();
    }
    let cn_w = fin("cn");
    let cn_args = ["--controlnet-config", s(&cn), "--controlnet-weights", s(&cn_w), "--control", s(&controls)];
    let translated = d.join("translated");
    ok(medgen(&[&base[..], &cn_args[..], &["--output", s(&translated)]].concat()));
    let t = read_volume(&translated.join("s5_FLAIR.nii.gz")).unwrap();
    let input = read_volume(&controls.join("s5_FLAIR.nii.gz")).unwrap();
    assert_eq!(t.dims(), input.dims());
    assert!(in_unit_range(&t.data));
    let geometry = |h: &NiftiHeader| (h.pixdim, h.sform_code, h.srow_x, h.srow_y, h.srow_z, h.qform_code);
    assert_eq!(geometry(&t.header), geometry(&input.header));

    // Bad inputs: the outputs would overwrite the controls, a latent of the wrong width, odd-sized or corrupt controls.
    let e = fails(&[&base[..], &cn_args[..], &["--output", s(&controls)]].concat());
    assert!(e.contains("holds the control volumes"), "{e}");
    let e = fails(&[&base[..], &["--output", s(&d.join("x")), "--latent-shape", "3,8,8,8"]].concat());
    assert!(e.contains("latent_channels is 2"), "{e}");
    let odd = d.join("odd");
    std::fs::create_dir(&odd).unwrap();
    write_volume(&odd.join("odd.nii.gz"), &Array3::from_elem((15, 16, 16), 1.0f32), None).unwrap();
    let e = fails(&[&base[..], &cn_args[..4], &["--control", s(&odd), "--output", s(&d.join("y"))]].concat());
    assert!(e.contains("odd.nii.gz is 15x16x16"), "{e}");
    let broken = d.join("broken.nii.gz");
    std::fs::write(&broken, b"not a volume").unwrap();
    let e = fails(&[&base[..], &cn_args[..4], &["--control", s(&broken), "--output", s(&d.join("z"))]].concat());
    assert!(e.contains("broken.nii.gz"), "{e}");
    // The slice tasks refuse a 3-D autoencoder; `train` refuses a list mixing PNGs and volumes.
    let e = fails(&[&["sample", "t1w"][..], &both[..], &["--num", "1", "--output", s(&d.join("w"))]].concat());
    assert!(e.contains("3-D autoencoder: sample its volumes with `medgen sample 3d`"), "{e}");
    let mixed = d.join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    image::GrayImage::new(16, 16).save(mixed.join("a.png")).unwrap();
    let row = format!("t1w\tflair\n{}\t{}\n", mixed.join("a.png").display(), d.join("s0_FLAIR.nii.gz").display());
    std::fs::write(mixed.join("train.tsv"), &row).unwrap();
    std::fs::write(mixed.join("validation.tsv"), "t1w\tflair\n").unwrap();
    let e = fails(&["train", "aekl", "--config", s(&aekl), "--data", s(&mixed), "--run", s(&d.join("mixed_run"))]);
    assert!(e.contains("mixes NIfTI volumes") && e.contains("a.png"), "{e}");
}
