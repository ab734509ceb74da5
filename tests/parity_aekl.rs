//! AutoencoderKL parity with MONAI 1.6.1 and monai-generative 0.2.3, every API op, on the
//! cases of `tests/gen_aekl_fixtures.py` (state dicts read by medgen's own torch.save reader).
mod common;

use common::{fixtures, max_abs, max_abs_diff};
use medgen::checkpoint::{load_model, Generation, StateDict};
use medgen::config::aekl_config;
use medgen::nets::AutoencoderKL;
use tch::{Device, Tensor};

/// fp32 CPU, both sides on one thread and the same libtorch: measured errors are 0 for every
/// op except where the attention formula differs from monai-generative's `baddbmm` (~1e-7).
const ABS_TOL: f64 = 1e-5;

fn check(rows: &mut Vec<String>, failures: &mut Vec<String>, case: &str, op: &str, got: &Tensor, want: &Tensor) {
    let err = max_abs_diff(got, want);
    let scale = max_abs(want);
    let tol = ABS_TOL;
    rows.push(format!("{case:28} {op:24} max_abs_err {err:.3e}  (max |ref| {scale:.3e}, tol {tol:.1e})"));
    if err > tol || err.is_nan() {
        failures.push(format!("{case} {op}: max abs error {err:e} > {tol:e}"));
    }
}

#[test]
fn autoencoder_kl_matches_monai_and_generative() {
    tch::set_num_threads(1);
    let root = fixtures().join("aekl");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("manifest.json")).unwrap()).unwrap();
    let cases = manifest.as_array().unwrap();
    assert!(cases.len() >= 10, "expected the full fixture set, found {} cases", cases.len());
    let (mut rows, mut failures) = (Vec::new(), Vec::new());
    for c in cases {
        let dir = root.join(c["dir"].as_str().unwrap());
        let lib = c["lib"].as_str().unwrap();
        let case = c["dir"].as_str().unwrap();
        let noise_seed = c["noise_seed"].as_i64().unwrap();
        let cfg = aekl_config(&dir.join("config.json")).unwrap();
        let sd = StateDict::load(&dir.join("state_dict.pt"), None).unwrap();
        let loaded = load_model(sd, Device::Cpu, |p, g| AutoencoderKL::new(p, &cfg, g)).unwrap();
        let expected_gen = if lib == "generative" { Generation::Generative } else { Generation::Monai };
        // Cases with neither attention nor upsampling would be indistinguishable; all have some.
        assert_eq!(loaded.generation, expected_gen, "{case}: naming generation");
        let io = StateDict::load(&dir.join("io.safetensors"), None).unwrap();
        let t = |k: &str| io.get(k).unwrap_or_else(|| panic!("{case}: fixture lacks {k}")).shallow_clone();
        let m = &loaded.model;
        let _g = tch::no_grad_guard();
        let x = t("x");
        let (mu, sigma) = m.encode(&x).unwrap();
        check(&mut rows, &mut failures, case, "encode.z_mu", &mu, &t("z_mu"));
        check(&mut rows, &mut failures, case, "encode.z_sigma", &sigma, &t("z_sigma"));
        check(&mut rows, &mut failures, case, "decode", &m.decode(&t("z")).unwrap(), &t("decoded"));
        check(
            &mut rows,
            &mut failures,
            case,
            "decode_stage_2_outputs",
            &m.decode_stage_2_outputs(&t("z")).unwrap(),
            &t("decode_stage_2_outputs"),
        );
        check(&mut rows, &mut failures, case, "reconstruct", &m.reconstruct(&x).unwrap(), &t("reconstruction"));
        // Same seed, same libtorch: randn_like draws the same noise as PyTorch.
        tch::manual_seed(noise_seed);
        let eps = t("z_sigma").randn_like();
        check(&mut rows, &mut failures, case, "randn_like (seeded)", &eps, &t("randn_like_z_sigma"));
        tch::manual_seed(noise_seed);
        let (rec, fmu, fsig) = m.forward(&x).unwrap();
        check(&mut rows, &mut failures, case, "forward.reconstruction", &rec, &t("forward_reconstruction"));
        check(&mut rows, &mut failures, case, "forward.z_mu", &fmu, &t("forward_z_mu"));
        check(&mut rows, &mut failures, case, "forward.z_sigma", &fsig, &t("forward_z_sigma"));
        tch::manual_seed(noise_seed);
        check(&mut rows, &mut failures, case, "sampling", &m.sampling(&t("z_mu"), &t("z_sigma")), &t("sampling"));
        tch::manual_seed(noise_seed);
        check(
            &mut rows,
            &mut failures,
            case,
            "encode_stage_2_inputs",
            &m.encode_stage_2_inputs(&x).unwrap(),
            &t("encode_stage_2_inputs"),
        );
        if let Some(monai_conv) = io.get("monai_load_old_state_dict_reconstruction") {
            // The fixture is sensitive to the proj_attn trap: MONAI's converter applies it.
            let d = max_abs_diff(&m.reconstruct(&x).unwrap(), monai_conv);
            rows.push(format!("{case:28} {:24} differs by {d:.3e} (must be large)", "vs load_old_state_dict"));
            if d < 1e-3 {
                failures.push(format!("{case}: output equals MONAI's load_old_state_dict result (proj_attn applied?)"));
            }
        }
    }
    println!("{}", rows.join("\n"));
    assert!(failures.is_empty(), "parity failures:\n{}", failures.join("\n"));
}
