//! `medgen convert` + `medgen forward` round trips from the command line, against the
//! AutoencoderKL parity fixtures.
mod common;

use common::run::{medgen, ok, s};
use common::{fixtures, max_abs_diff};
use medgen::checkpoint::StateDict;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

/// `medgen convert --model aekl`.
fn convert(cfg: &Path, input: &Path, output: &Path) -> Output {
    medgen(&["convert", "--model", "aekl", "--config", s(cfg), "--input", s(input), "--output", s(output)])
}

/// `medgen forward --model aekl`, plus `extra` options.
fn forward(cfg: &Path, weights: &Path, inputs: &Path, output: &Path, extra: &[&str]) -> Output {
    let mut args =
        vec!["forward", "--model", "aekl", "--config", s(cfg), "--weights", s(weights), "--inputs", s(inputs)];
    args.extend(["--output", s(output)]);
    args.extend(extra);
    medgen(&args)
}

/// convert, then forward each op, for one fixture case; compares with PyTorch's outputs.
fn round_trip(case: &str, expect_generation: &str) {
    let dir = fixtures().join("aekl").join(case);
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("weights/aekl.safetensors");
    let cfg = dir.join("config.json");
    let msg = ok(convert(&cfg, &dir.join("state_dict.pt"), &weights));
    assert!(msg.contains(expect_generation), "{msg}");
    let converted = StateDict::load(&weights, None).unwrap();
    assert_eq!(converted.metadata.get("medgen.generation").map(String::as_str), Some(expect_generation));
    assert!(!converted.names().iter().any(|n| n.contains("proj_attn")), "old keys renamed");

    let io = StateDict::load(&dir.join("io.safetensors"), None).unwrap();
    let mut inputs = StateDict::new();
    inputs.insert("x", io.get("x").unwrap().shallow_clone());
    inputs.insert("z", io.get("z").unwrap().shallow_clone());
    let in_path = tmp.path().join("in.safetensors");
    inputs.save_safetensors(&in_path, &BTreeMap::new()).unwrap();
    for (op, outputs) in [
        ("reconstruct", vec![("reconstruction", "reconstruction")]),
        ("encode", vec![("z_mu", "z_mu"), ("z_sigma", "z_sigma")]),
        ("decode", vec![("image", "decoded")]),
        ("forward", vec![("reconstruction", "forward_reconstruction"), ("z_mu", "forward_z_mu")]),
        ("encode_stage_2_inputs", vec![("z", "encode_stage_2_inputs")]),
    ] {
        let out = tmp.path().join(format!("{op}.safetensors"));
        ok(forward(&cfg, &weights, &in_path, &out, &["--op", op, "--seed", "4321", "--device", "cpu"]));
        let got = StateDict::load(&out, None).unwrap();
        for (name, reference) in outputs {
            let err = max_abs_diff(got.get(name).unwrap(), io.get(reference).unwrap());
            println!("{case} {op}.{name}: max abs error {err:.3e}");
            assert!(err <= 1e-5, "{case} {op}.{name}: max abs error {err}");
        }
    }
}

#[test]
fn convert_and_forward_new_checkpoint() {
    round_trip("attn_nonlocal-monai", "monai");
}

#[test]
fn convert_and_forward_old_checkpoint() {
    round_trip("attn_nonlocal-generative", "generative-0.2");
    // The old transposed-conv layout has no MONAI >= 1.4 equivalent; the metadata keeps it.
    round_trip("convtranspose-generative", "generative-0.2");
}

#[test]
fn forward_accepts_a_torch_checkpoint_directly() {
    let dir = fixtures().join("aekl/odd_groups-generative");
    let tmp = tempfile::tempdir().unwrap();
    let io = StateDict::load(&dir.join("io.safetensors"), None).unwrap();
    let mut inputs = StateDict::new();
    inputs.insert("image", io.get("x").unwrap().shallow_clone());
    let in_path = tmp.path().join("in.safetensors");
    inputs.save_safetensors(&in_path, &BTreeMap::new()).unwrap();
    let out = tmp.path().join("out.safetensors");
    ok(forward(&dir.join("config.json"), &dir.join("state_dict.pt"), &in_path, &out, &[]));
    let got = StateDict::load(&out, None).unwrap();
    let err = max_abs_diff(got.get("reconstruction").unwrap(), io.get("reconstruction").unwrap());
    assert!(err <= 1e-5, "{err}");
}

#[test]
fn convert_with_the_wrong_config_fails_clearly_and_writes_nothing() {
    let root = fixtures().join("aekl");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.safetensors");
    let o = convert(&root.join("no_attn-monai/config.json"), &root.join("attn_nonlocal-monai/state_dict.pt"), &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("missing key") && err.contains("unexpected key") && err.contains("shape mismatch for"),
        "{err}"
    );
    assert!(err.contains("attn_nonlocal-monai/state_dict.pt"), "names the file: {err}");
    assert!(!out.exists(), "nothing written on failure");

    let no_attn = root.join("no_attn-monai");
    let o = forward(&no_attn.join("config.json"), &no_attn.join("state_dict.pt"), &out, &out, &["--device", "cuda:7"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cuda:7"), "{err}");
}

#[test]
fn bad_configs_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.json");
    std::fs::write(
        &cfg,
        r#"{"stage1": {"params": {"channels": [8, 16], "attention_levels": [false], "norm_num_groups": 4}}}"#,
    )
    .unwrap();
    let o = convert(&cfg, &cfg, &tmp.path().join("o"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("bad.json") && err.contains("attention_levels"), "{err}");
    std::fs::write(&cfg, r#"{"channels": [8, 16], "atention_levels": [false, true]}"#).unwrap();
    let e = format!("{:#}", medgen::config::aekl_config(&cfg).unwrap_err());
    assert!(e.contains("atention_levels"), "unknown keys are named: {e}");
    std::fs::write(&cfg, r#"{"channels": [8, 12], "attention_levels": [false, true], "norm_num_groups": 8}"#).unwrap();
    let e = format!("{:#}", medgen::config::aekl_config(&cfg).unwrap_err());
    assert!(e.contains("12 is not a multiple of 8"), "{e}");
}

fn model_cmd(sub: &str, model: &str, cfg: &Path, rest: &[&str]) -> Output {
    let mut args = vec![sub, "--model", model, "--config", s(cfg)];
    args.extend(rest);
    medgen(&args)
}

fn save(path: &Path, tensors: Vec<(&str, tch::Tensor)>) {
    let mut sd = StateDict::new();
    for (k, v) in tensors {
        sd.insert(k, v);
    }
    sd.save_safetensors(path, &BTreeMap::new()).unwrap();
}

/// An old (monai-generative) UNet and ControlNet: convert both, run the ControlNet from the command line,
/// feed its output file to the UNet, and compare each step with PyTorch.
#[test]
fn convert_and_forward_unet_and_controlnet() {
    let root = fixtures().join("unet");
    let tmp = tempfile::tempdir().unwrap();
    for (model, case, expect_generation) in [
        ("controlnet", "cn_cond_multihead-generative", "generative-0.2"),
        ("controlnet", "cn_uncond-monai", "monai"),
        ("unet", "residuals-generative", "generative-0.2"),
        ("unet", "class_embeds-monai", "monai"),
    ] {
        let dir = root.join(case);
        let cfg = dir.join("config.json");
        let weights = tmp.path().join(format!("{case}.safetensors"));
        let weights_s = s(&weights).to_string();
        let msg =
            ok(model_cmd("convert", model, &cfg, &["--input", s(&dir.join("state_dict.pt")), "--output", &weights_s]));
        assert!(msg.contains(expect_generation), "{msg}");
        let io = StateDict::load(&dir.join("io.safetensors"), None).unwrap();
        let get = |k: &str| io.get(k).unwrap().shallow_clone();
        let mut inputs = vec![("x", get("x")), ("timesteps", get("timesteps"))];
        for k in ["context", "class_labels", "controlnet_cond"] {
            if let Some(t) = io.get(k) {
                inputs.push((k, t.shallow_clone()));
            }
        }
        let names: Vec<String> = (0..20).map(|i| format!("down_block_additional_residuals.{i}")).collect();
        let mut i = 0;
        while let Some(t) = io.get(&format!("down_res_{i}")) {
            inputs.push((names[i].as_str(), t.shallow_clone()));
            i += 1;
        }
        if let Some(t) = io.get("mid_res") {
            inputs.push(("mid_block_additional_residual", t.shallow_clone()));
        }
        let in_path = tmp.path().join(format!("{case}-in.safetensors"));
        save(&in_path, inputs);
        let out = tmp.path().join(format!("{case}-out.safetensors"));
        let rest = ["--weights", &weights_s, "--inputs", s(&in_path), "--output", s(&out)];
        ok(model_cmd("forward", model, &cfg, &rest));
        let got = StateDict::load(&out, None).unwrap();
        let pairs: Vec<(String, String)> = if model == "unet" {
            vec![("output".into(), "output".into())]
        } else {
            let n = (0..).take_while(|i| io.contains(&format!("down_{i}"))).count();
            let mut p: Vec<(String, String)> =
                (0..n).map(|i| (format!("down_block_res_samples.{i}"), format!("down_{i}"))).collect();
            p.push(("mid_block_res_sample".into(), "mid".into()));
            p
        };
        for (name, reference) in pairs {
            let err = max_abs_diff(got.get(&name).unwrap(), io.get(&reference).unwrap());
            println!("{case} {name}: max abs error {err:.3e}");
            assert!(err <= 1e-5, "{case} {name}: max abs error {err}");
        }
    }

    // Chained: a ControlNet's output file is a valid residual input for a UNet of the same encoder.
    let unet_dir = root.join("init_cond-monai");
    let unet_cfg = tmp.path().join("unet.json");
    let cn_cfg = tmp.path().join("cn.json");
    let both: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(unet_dir.join("config.json")).unwrap()).unwrap();
    std::fs::write(&unet_cfg, both["unet"].to_string()).unwrap();
    std::fs::write(&cn_cfg, both["controlnet"].to_string()).unwrap();
    let io = StateDict::load(&unet_dir.join("io.safetensors"), None).unwrap();
    let get = |k: &str| io.get(k).unwrap().shallow_clone();
    let in_path = tmp.path().join("chain-in.safetensors");
    save(
        &in_path,
        vec![
            ("x", get("x")),
            ("timesteps", get("timesteps")),
            ("context", get("context")),
            ("controlnet_cond", get("controlnet_cond")),
        ],
    );
    let cn_out = tmp.path().join("chain-cn.safetensors");
    let cn_w = unet_dir.join("controlnet_after.pt");
    ok(model_cmd(
        "forward",
        "controlnet",
        &cn_cfg,
        &["--weights", s(&cn_w), "--inputs", s(&in_path), "--output", s(&cn_out), "--conditioning-scale", "0.5"],
    ));
    let cn_res = StateDict::load(&cn_out, None).unwrap();
    let err = max_abs_diff(&(get("mid") * 0.5), cn_res.get("mid_block_res_sample").unwrap());
    assert!(err <= 1e-6, "conditioning scale: {err}");
    let mut chained: Vec<(&str, tch::Tensor)> =
        vec![("x", get("x")), ("timesteps", get("timesteps")), ("context", get("context"))];
    for (k, v) in cn_res.iter() {
        chained.push((k.as_str(), v.shallow_clone()));
    }
    let chain_in = tmp.path().join("chain-unet-in.safetensors");
    save(&chain_in, chained);
    let unet_out = tmp.path().join("chain-unet.safetensors");
    let unet_w = unet_dir.join("unet.pt");
    ok(model_cmd(
        "forward",
        "unet",
        &unet_cfg,
        &["--weights", s(&unet_w), "--inputs", s(&chain_in), "--output", s(&unet_out)],
    ));
    let with_residuals = StateDict::load(&unet_out, None).unwrap().get("output").unwrap().shallow_clone();
    assert_eq!(with_residuals.size(), get("x").size());
    // The residuals were used: without them the output differs.
    let plain_in = tmp.path().join("plain-unet-in.safetensors");
    save(&plain_in, vec![("x", get("x")), ("timesteps", get("timesteps")), ("context", get("context"))]);
    let plain_out = tmp.path().join("plain-unet.safetensors");
    ok(model_cmd(
        "forward",
        "unet",
        &unet_cfg,
        &["--weights", s(&unet_w), "--inputs", s(&plain_in), "--output", s(&plain_out)],
    ));
    let plain = StateDict::load(&plain_out, None).unwrap().get("output").unwrap().shallow_clone();
    assert!(max_abs_diff(&plain, &with_residuals) > 1e-3, "the ControlNet residuals changed nothing");

    // A stray or misspelt input tensor is an error naming it, not silently ignored.
    let stray_in = tmp.path().join("stray-in.safetensors");
    save(&stray_in, vec![("x", get("x")), ("timesteps", get("timesteps")), ("contxt", get("context"))]);
    let o = model_cmd(
        "forward",
        "unet",
        &unet_cfg,
        &["--weights", s(&unet_w), "--inputs", s(&stray_in), "--output", s(&plain_out)],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("\"contxt\""), "{}", String::from_utf8_lossy(&o.stderr));

    // An AutoencoderKL op on a UNet is refused by name.
    let o = model_cmd(
        "forward",
        "unet",
        &unet_cfg,
        &["--weights", s(&unet_w), "--inputs", s(&chain_in), "--output", s(&unet_out), "--op", "decode"],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("AutoencoderKL operation"));
}

/// `medgen encode-prompt` against transformers (tests/gen_prompt_fixtures.py), then the context file
/// read back as training and sampling read it.
#[test]
fn encode_prompt_round_trip() {
    let root = fixtures().join("prompt");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ctx/reference.safetensors");
    let expected = StateDict::load(&root.join("expected.safetensors"), None).unwrap();
    let prompts: Vec<String> = expected.metadata["prompts"].split('\n').map(String::from).collect();
    let run = |extra: &[&str], out: &Path| {
        let te = root.join("text_encoder");
        let tok = root.join("tokenizer");
        let mut args = vec!["encode-prompt", "--text-encoder", s(&te), "--tokenizer", s(&tok), "--output", s(out)];
        for p in &prompts {
            args.extend(["--prompt", p.as_str()]);
        }
        args.extend(extra);
        ok(medgen(&args))
    };
    let msg = run(&[], &out);
    assert!(msg.contains("\"t</w>\", \"1</w>\", \"-</w>\", \"weighted</w>\""), "prints the tokens: {msg}");
    let ctx = medgen::text::context::PromptContexts::load(&out, tch::Device::Cpu).unwrap();
    assert_eq!(ctx.prompts, prompts);
    for (name, got) in
        [("context", &ctx.context), ("uncond_context", &ctx.uncond_context), ("null_context", &ctx.null_context)]
    {
        let err = max_abs_diff(got, expected.get(name).unwrap());
        println!("encode-prompt {name}: max abs error {err:.3e}");
        assert!(err <= 1e-5, "{name}: {err}");
    }
    let ids = ctx.input_ids.as_ref().expect("ids saved");
    for (got, name) in ids.iter().zip(["input_ids", "uncond_input_ids", "null_input_ids"]) {
        assert!(got.equal(expected.get(name).unwrap()), "{name}");
    }
    // diffusers' clip_skip=1: the penultimate layer, final layer norm applied.
    let skip = tmp.path().join("skip.safetensors");
    run(&["--clip-skip", "1"], &skip);
    let ctx = medgen::text::context::PromptContexts::load(&skip, tch::Device::Cpu).unwrap();
    let err = max_abs_diff(&ctx.context, expected.get("context_clip_skip_1").unwrap());
    assert!(err <= 1e-5, "clip_skip 1: {err}");

    // Not a context file: named.
    let e = format!(
        "{:#}",
        medgen::text::context::PromptContexts::load(&root.join("text_encoder/model.safetensors"), tch::Device::Cpu)
            .unwrap_err()
    );
    assert!(e.contains("model.safetensors") && e.contains("not a context file"), "{e}");
}
