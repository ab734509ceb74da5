//! `medgen convert --bundle` on bundle-shaped folders with the published generative bundles' layouts
//! (tests/gen_bundle_fixtures.py): the converted autoencoder and UNet reproduce monai-generative's outputs from the
//! bundle's own checkpoints, the sampler settings are the bundle's, and a bundle medgen cannot read fails with an
//! error naming what it could not read.
mod common;

use common::{fixtures, max_abs_diff};
use medgen::bundle::convert_bundle;
use medgen::checkpoint::{load_model, StateDict};
use medgen::config::{aekl_config, read_json, sampling_scheduler, unet_config};
use medgen::nets::{AutoencoderKL, Conditioning, DiffusionModelUNet};
use std::path::{Path, PathBuf};
use tch::Device;

const TOL: f64 = 1e-5;

fn out_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bundle_import").join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn published_bundle_layouts_convert_and_match_monai_generative() {
    tch::set_num_threads(1);
    let root = fixtures().join("bundles");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("manifest.json")).unwrap()).unwrap();
    let cases = manifest.as_array().unwrap();
    assert!(cases.len() >= 4, "expected the full fixture set, found {} bundles", cases.len());
    let mut failures = Vec::new();
    for c in cases {
        let case = c["case"].as_str().unwrap();
        let out = out_dir(case);
        let converted = convert_bundle(&root.join(c["dir"].as_str().unwrap()), &out).unwrap();
        let io = StateDict::load(&root.join(c["io"].as_str().unwrap()), None).unwrap();
        let t = |k: &str| io.get(k).unwrap_or_else(|| panic!("{case}: fixture lacks {k}")).shallow_clone();
        let _g = tch::no_grad_guard();

        let ae_cfg = aekl_config(&out.join("aekl.json")).unwrap();
        let sd = StateDict::load(&out.join("autoencoder.safetensors"), None).unwrap();
        let ae = load_model(sd, Device::Cpu, |p, g| AutoencoderKL::new(p, &ae_cfg, g)).unwrap().model;
        let decode_err = max_abs_diff(&ae.decode_stage_2_outputs(&t("z")).unwrap(), &t("decoded"));

        let unet_cfg = unet_config(&out.join("ldm.json")).unwrap();
        let sd = StateDict::load(&out.join("diffusion_model.safetensors"), None).unwrap();
        assert_eq!(sd.metadata.get("medgen.scale_factor").map(String::as_str), Some("1.0"), "{case}: scale factor");
        let unet = load_model(sd, Device::Cpu, |p, g| DiffusionModelUNet::new(p, &unet_cfg, g)).unwrap().model;
        let context = io.get("context").map(|c| c.shallow_clone());
        let cond = Conditioning { context: context.as_ref(), ..Default::default() };
        let unet_err = max_abs_diff(&unet.forward(&t("x"), &t("timesteps"), &cond).unwrap(), &t("unet_out"));
        println!("{case:50} decode max_abs_err {decode_err:.3e}  unet max_abs_err {unet_err:.3e}");
        if decode_err > TOL || unet_err > TOL || decode_err.is_nan() || unet_err.is_nan() {
            failures.push(format!("{case}: decode {decode_err:e}, unet {unet_err:e}"));
        }

        // The bundle's sampler: DDIM, 50 steps, its betas, the latent shape of its noise.
        let (kind, sched) = sampling_scheduler(&out.join("ldm.json")).unwrap();
        assert_eq!(kind.as_str(), "ddim", "{case}");
        assert_eq!(sched.beta_end, c["beta_end"].as_f64(), "{case}: beta_end");
        assert_eq!(sched.clip_sample, Some(false), "{case}: clip_sample");
        let ldm = read_json(&out.join("ldm.json")).unwrap();
        assert_eq!(ldm["sampling"]["num_inference_steps"], 50, "{case}");
        assert_eq!(ldm["sampling"]["latent_shape"], c["latent"], "{case}: latent shape");
        let summary = &converted.summary;
        assert_eq!(summary["conditioning"].is_string(), c["conditioned"].as_bool().unwrap(), "{case}: {summary}");
        // Classes medgen does not convert are listed, not silently dropped.
        assert!(summary["not_converted"].as_array().is_some_and(|a| !a.is_empty()), "{case}: {summary}");
    }
    assert!(failures.is_empty(), "bundle parity failures:\n{}", failures.join("\n"));
}

/// A copy of a fixture bundle with `edit` applied to its inference.json.
fn edited_bundle(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = fixtures().join("bundles").join("brats_mri_generative_diffusion_v1.1");
    let dst = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bundle_import_bad").join(name);
    let _ = std::fs::remove_dir_all(&dst);
    copy_dir(&src, &dst);
    let f = dst.join("configs/inference.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&f, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    dst
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// A change to a bundle's inference.json.
type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;

#[test]
fn bundles_medgen_cannot_read_fail_naming_the_problem() {
    let maisi = "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi";
    let cases: Vec<(&str, Edit, Vec<&str>)> = vec![
        (
            "unknown_target",
            Box::new(move |v| v["autoencoder_def"]["_target_"] = maisi.into()),
            vec![maisi, "not supported"],
        ),
        (
            "expression",
            Box::new(|v| v["load_diffusion_path"] = "$os.path.join(@model_dir, 'model.pt')".into()),
            vec!["$os.path.join(@model_dir, 'model.pt')", "load_diffusion_path"],
        ),
        (
            "missing_reference",
            Box::new(|v| v["network_def"]["spatial_dims"] = "@spatial_dim".into()),
            vec!["spatial_dim", "network_def"],
        ),
        (
            "macro",
            Box::new(|v| v["latent_channels"] = "%configs/train.json#latent_channels".into()),
            vec!["%configs/train.json#latent_channels", "macros"],
        ),
        (
            "unknown_parameter",
            Box::new(|v| v["network_def"]["with_magic"] = true.into()),
            vec!["network_def", "with_magic"],
        ),
        (
            "never_loaded",
            Box::new(|v| v.as_object_mut().unwrap().remove("load_diffusion").map(|_| ()).unwrap()),
            vec!["network_def", "never loaded"],
        ),
        ("cycle", Box::new(|v| v["latent_channels"] = "@latent_shape#0".into()), vec!["a cycle?"]),
        (
            "no_steps",
            Box::new(|v| v.as_object_mut().unwrap().remove("set_timesteps").map(|_| ()).unwrap()),
            vec!["set_timesteps"],
        ),
    ];
    for (name, edit, needles) in cases {
        let dir = edited_bundle(name, edit);
        let e = format!("{:#}", convert_bundle(&dir, &out_dir(&format!("bad_{name}"))).unwrap_err());
        for n in needles {
            assert!(e.contains(n), "{name}: the error should name {n:?}: {e}");
        }
    }
    // Weights that do not fit the definition: the key and both shapes.
    let dir = edited_bundle("wrong_width", |v| v["autoencoder_def"]["num_res_blocks"] = 1.into());
    let e = format!("{:#}", convert_bundle(&dir, &out_dir("bad_wrong_width")).unwrap_err());
    assert!(e.contains("model_autoencoder.pt") && e.contains("autoencoder_def"), "{e}");
    // Not a bundle.
    let e = format!("{:#}", convert_bundle(&fixtures().join("bundles"), &out_dir("bad_not_bundle")).unwrap_err());
    assert!(e.contains("no configs/inference.json"), "{e}");
}

#[test]
fn the_command_line_converts_a_bundle() {
    let out = out_dir("cli");
    let bundle = fixtures().join("bundles").join("brain_image_synthesis_latent_diffusion_model");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_medgen"))
        .args(["convert", "--bundle"])
        .arg(&bundle)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    for f in ["aekl.json", "ldm.json", "autoencoder.safetensors", "diffusion_model.safetensors", "bundle.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(stderr.contains("conditioning channels"), "the conditioning note: {stderr}");
    // --bundle with --model is refused by the parser.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_medgen"))
        .args(["convert", "--model", "aekl", "--bundle"])
        .arg(&bundle)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}
