//! DiffusionModelUNet and ControlNet parity with MONAI 1.6.1 and monai-generative 0.2.3, and the
//! ControlNet initialisation from a trained UNet, on the cases of `tests/gen_unet_fixtures.py`
//! (state dicts read by medgen's own torch.save reader).
mod common;

use common::{fixtures, max_abs, max_abs_diff};
use medgen::checkpoint::{load_model, Generation, StateDict};
use medgen::nets::{Conditioning, ControlNet, ControlNetConfig, DiffusionModelUNet, DiffusionModelUNetConfig};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Tensor};

/// fp32 CPU, both sides on one thread and the same libtorch. Errors are measured relative to the
/// output's scale (max |reference|); the bound is the 1e-5.
const REL_TOL: f64 = 1e-5;

struct Report {
    rows: Vec<String>,
    failures: Vec<String>,
}

impl Report {
    fn new() -> Self {
        Self { rows: Vec::new(), failures: Vec::new() }
    }

    fn check(&mut self, case: &str, what: &str, got: &Tensor, want: &Tensor) {
        if got.size() != want.size() {
            self.failures.push(format!("{case} {what}: shape {:?} vs {:?}", got.size(), want.size()));
            return;
        }
        let err = max_abs_diff(got, want);
        let scale = max_abs(want).max(1e-30);
        let rel = err / scale;
        self.rows.push(format!("{case:40} {what:28} max_abs_err {err:.3e}  max|ref| {scale:.3e}  rel {rel:.2e}"));
        if rel > REL_TOL || err.is_nan() {
            self.failures.push(format!("{case} {what}: relative error {rel:e} > {REL_TOL:e}"));
        }
    }

    fn finish(self, title: &str) {
        println!("{title}\n{}", self.rows.join("\n"));
        assert!(self.failures.is_empty(), "{} failures:\n{}", self.failures.len(), self.failures.join("\n"));
    }
}

fn manifest(kind: &str) -> (PathBuf, Vec<Value>) {
    let root = fixtures().join("unet");
    let text = std::fs::read_to_string(root.join("manifest.json")).expect("unet manifest");
    let all: Vec<Value> = serde_json::from_str(&text).unwrap();
    let cases: Vec<Value> = all.into_iter().filter(|c| c["kind"] == kind).collect();
    (root, cases)
}

fn lib_generation(c: &Value) -> Generation {
    if c["lib"] == "generative" {
        Generation::Generative
    } else {
        Generation::Monai
    }
}

struct Io(StateDict);

impl Io {
    fn load(dir: &Path) -> Self {
        Io(StateDict::load(&dir.join("io.safetensors"), None).unwrap())
    }
    fn get(&self, k: &str) -> Tensor {
        self.0.get(k).unwrap_or_else(|| panic!("fixture lacks {k}")).shallow_clone()
    }
    fn opt(&self, k: &str) -> Option<Tensor> {
        self.0.get(k).map(|t| t.shallow_clone())
    }
}

fn read_config<T: serde::de::DeserializeOwned>(dir: &Path, section: &str) -> T {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let params = medgen::config::model_params(&v, section);
    serde_json::from_value(params).unwrap()
}

#[test]
fn unet_matches_monai_and_generative() {
    tch::set_num_threads(1);
    let _g = tch::no_grad_guard();
    let (root, cases) = manifest("unet");
    assert!(cases.len() >= 20, "expected the full fixture set, found {} UNet cases", cases.len());
    let mut r = Report::new();
    let mut saw_full_size = false;
    for c in &cases {
        let case = c["dir"].as_str().unwrap();
        let dir = root.join(case);
        let cfg: DiffusionModelUNetConfig = read_config(&dir, "ldm");
        let sd = StateDict::load(&dir.join("state_dict.pt"), None).unwrap();
        let loaded = load_model(sd, Device::Cpu, |p, g| DiffusionModelUNet::new(p, &cfg, g)).unwrap();
        assert_eq!(loaded.generation, lib_generation(c), "{case}: naming generation");
        let io = Io::load(&dir);
        let (x, t) = (io.get("x"), io.get("timesteps"));
        if cfg.channels == [256, 512, 768] && cfg.cross_attention_dim == Some(1024) {
            assert_eq!(x.size()[2..], [20, 28]);
            assert_eq!(io.get("context").size()[1..], [77, 1024]);
            saw_full_size = true;
        }
        let (context, class_labels) = (io.opt("context"), io.opt("class_labels"));
        let n_res = c["num_down_res"].as_u64().unwrap() as usize;
        let residuals: Vec<Tensor> = (0..n_res).map(|i| io.get(&format!("down_res_{i}"))).collect();
        let mid = io.opt("mid_res");
        let cond = Conditioning {
            context: context.as_ref(),
            class_labels: class_labels.as_ref(),
            down_block_additional_residuals: (n_res > 0).then_some(residuals.as_slice()),
            mid_block_additional_residual: mid.as_ref(),
        };
        let out = loaded.model.forward(&x, &t, &cond).unwrap();
        r.check(case, "forward", &out, &io.get("output"));
        if let Some(expanded) = io.opt("output_timesteps_expanded") {
            // Batch-1 timesteps broadcast: equal to MONAI's explicit per-element result.
            let t_b = t.expand([x.size()[0]], false).contiguous();
            r.check(
                case,
                "forward (timesteps per element)",
                &loaded.model.forward(&x, &t_b, &cond).unwrap(),
                &expanded,
            );
        }
        if let Some(monai_conv) = io.opt("monai_load_old_state_dict_output") {
            let d = max_abs_diff(&out, &monai_conv);
            r.rows.push(format!("{case:40} {:28} differs from MONAI load_old_state_dict by {d:.3e}", ""));
            assert!(d > 1e-4, "{case}: expected MONAI's load_old_state_dict output to differ (it applies proj_attn)");
        }
    }
    assert!(saw_full_size, "the reference ldm_v0 case at full size is missing");
    r.finish("UNet parity (relative to max |ref|):");
}

fn controlnet_inputs(io: &Io) -> (Tensor, Tensor, Tensor, Option<Tensor>, Option<Tensor>) {
    (io.get("x"), io.get("timesteps"), io.get("controlnet_cond"), io.opt("context"), io.opt("class_labels"))
}

#[test]
fn controlnet_matches_monai_and_generative() {
    tch::set_num_threads(1);
    let _g = tch::no_grad_guard();
    let (root, cases) = manifest("controlnet");
    assert!(cases.len() >= 12, "expected the full fixture set, found {} ControlNet cases", cases.len());
    let mut r = Report::new();
    let mut saw_full_size = false;
    for c in &cases {
        let case = c["dir"].as_str().unwrap();
        let dir = root.join(case);
        let cfg: ControlNetConfig = read_config(&dir, "controlnet");
        let sd = StateDict::load(&dir.join("state_dict.pt"), None).unwrap();
        assert!(sd.contains("controlnet_down_blocks.0.weight"), "{case}: the bare zero conv key");
        let loaded = load_model(sd, Device::Cpu, |p, g| ControlNet::new(p, &cfg, g)).unwrap();
        assert_eq!(loaded.generation, lib_generation(c), "{case}: naming generation");
        let io = Io::load(&dir);
        let (x, t, cn_cond, context, class_labels) = controlnet_inputs(&io);
        if cfg.conditioning_embedding_num_channels == [64, 128, 128, 256] {
            assert_eq!(cn_cond.size()[2..], [160, 224]);
            saw_full_size = true;
        }
        let scale = c["conditioning_scale"].as_f64().unwrap();
        let cond =
            Conditioning { context: context.as_ref(), class_labels: class_labels.as_ref(), ..Default::default() };
        let out = loaded.model.forward(&x, &t, &cn_cond, scale, &cond).unwrap();
        let n = c["num_down"].as_u64().unwrap() as usize;
        assert_eq!(out.down_block_res_samples.len(), n, "{case}: number of down residuals");
        for (i, d) in out.down_block_res_samples.iter().enumerate() {
            r.check(case, &format!("down_{i}"), d, &io.get(&format!("down_{i}")));
        }
        r.check(case, "mid", &out.mid_block_res_sample, &io.get("mid"));
        if let Some(monai_conv) = io.opt("monai_load_old_state_dict_mid") {
            let d = max_abs_diff(&out.mid_block_res_sample, &monai_conv);
            r.rows.push(format!("{case:40} {:28} differs from MONAI load_old_state_dict by {d:.3e}", ""));
            assert!(d > 1e-3, "{case}: expected MONAI's load_old_state_dict to leave the attention q/k/v random");
        }
    }
    assert!(saw_full_size, "the reference controlnet_v0 case at full size is missing");
    r.finish("ControlNet parity (relative to max |ref|):");
}

/// `controlnet.load_state_dict(unet.state_dict(), strict=False)` in the library that made the
/// checkpoints, against `ControlNet::init_from_unet`: same tensors, same missing/unexpected keys,
/// same outputs. For monai-generative checkpoints the ControlNet is also built with MONAI names,
/// so the old UNet goes through the renaming (which MONAI's own converter gets wrong).
#[test]
fn controlnet_init_from_unet_matches_load_state_dict_strict_false() {
    tch::set_num_threads(1);
    let _g = tch::no_grad_guard();
    let (root, cases) = manifest("init");
    assert!(cases.len() >= 6, "expected the full fixture set, found {} init cases", cases.len());
    let mut r = Report::new();
    for c in &cases {
        let case = c["dir"].as_str().unwrap();
        let dir = root.join(case);
        let cfg: ControlNetConfig = read_config(&dir, "controlnet");
        let unet_cfg: DiffusionModelUNetConfig = read_config(&dir, "unet");
        cfg.matches_unet(&unet_cfg).unwrap();
        let generation = lib_generation(c);
        let before = StateDict::load(&dir.join("controlnet_before.pt"), None).unwrap();
        let after = StateDict::load(&dir.join("controlnet_after.pt"), None).unwrap();
        let unet = StateDict::load(&dir.join("unet.pt"), None).unwrap();
        let loaded = load_model(before, Device::Cpu, |p, g| ControlNet::new(p, &cfg, g)).unwrap();
        assert_eq!(loaded.generation, generation);
        let report = ControlNet::init_from_unet(&loaded.vs, unet).unwrap();

        let want_missing: Vec<String> =
            c["missing_keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_string()).collect();
        let mut got_missing: Vec<String> = report.missing.iter().map(|(k, _)| k.clone()).collect();
        got_missing.sort();
        let want_unexpected: Vec<&str> =
            c["unexpected_keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
        assert!(want_missing.iter().all(|k| k.starts_with("controlnet_")), "{case}: {want_missing:?}");
        assert!(!report.copied.is_empty());
        if generation == Generation::Monai {
            assert_eq!(got_missing, want_missing, "{case}: missing keys");
            let mut got_unexpected = report.unexpected.clone();
            got_unexpected.sort();
            assert_eq!(got_unexpected, want_unexpected, "{case}: unexpected keys");
            // Every tensor equals MONAI's result, bit for bit.
            let vars = loaded.vs.variables();
            assert_eq!(vars.len(), after.len(), "{case}: tensor count");
            for (k, v) in &vars {
                let want = after.get(k).unwrap_or_else(|| panic!("{case}: {k} not in MONAI's state dict"));
                assert!(v.equal(want), "{case}: {k} differs from MONAI's load_state_dict(strict=False)");
            }
        } else {
            // Under MONAI names the old UNet's renamed keys count; the ControlNet's own layers are
            // the only ones left untouched, as in the old library.
            assert_eq!(got_missing, want_missing, "{case}: missing keys (after renaming)");
        }

        let io = Io::load(&dir);
        let (x, t, cn_cond, context, class_labels) = controlnet_inputs(&io);
        let cond =
            Conditioning { context: context.as_ref(), class_labels: class_labels.as_ref(), ..Default::default() };
        let out = loaded.model.forward(&x, &t, &cn_cond, 1.0, &cond).unwrap();
        for (i, d) in out.down_block_res_samples.iter().enumerate() {
            r.check(case, &format!("down_{i}"), d, &io.get(&format!("down_{i}")));
        }
        r.check(case, "mid", &out.mid_block_res_sample, &io.get("mid"));

        if generation == Generation::Generative {
            // The same old UNet into a ControlNet built for MONAI names (what a team training a new
            // ControlNet in medgen on a ported UNet does): same copied weights, same outputs up to
            // the two libraries' attention formulas (einsum vs baddbmm, ~1e-6).
            let vs = VarStore::new(Device::Cpu);
            let model = ControlNet::new(&vs.root(), &cfg, Generation::Monai).unwrap();
            let own: StateDict = {
                let mut s = StateDict::new();
                for (k, v) in loaded.vs.variables() {
                    if k.starts_with("controlnet_") {
                        s.insert(k, v);
                    }
                }
                s
            };
            let unet = StateDict::load(&dir.join("unet.pt"), None).unwrap();
            let rep = ControlNet::init_from_unet(&vs, unet).unwrap();
            assert!(rep.missing.iter().all(|(k, _)| k.starts_with("controlnet_")), "{case}: {}", rep.describe());
            medgen::checkpoint::load_partial(&vs, &own).unwrap();
            let out = model.forward(&x, &t, &cn_cond, 1.0, &cond).unwrap();
            r.check(case, "mid (MONAI-named ControlNet)", &out.mid_block_res_sample, &io.get("mid"));
        }
    }
    r.finish("ControlNet initialised from a UNet (relative to max |ref|):");
}

#[test]
fn fresh_controlnet_is_a_no_op_and_bad_inputs_are_named() {
    let cfg = ControlNetConfig {
        in_channels: 3,
        channels: vec![16, 32],
        attention_levels: vec![false, true],
        num_res_blocks: medgen::nets::PerLevel::Same(1),
        norm_num_groups: 8,
        num_head_channels: medgen::nets::PerLevel::Same(16),
        with_conditioning: true,
        cross_attention_dim: Some(8),
        conditioning_embedding_num_channels: vec![8, 8],
        ..Default::default()
    };
    let vs = VarStore::new(Device::Cpu);
    let cn = ControlNet::new(&vs.root(), &cfg, Generation::Monai).unwrap();
    let x = Tensor::randn([2, 3, 8, 8], (tch::Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[5i64]);
    let ctx = Tensor::randn([2, 4, 8], (tch::Kind::Float, Device::Cpu));
    let cond_img = Tensor::rand([2, 1, 16, 16], (tch::Kind::Float, Device::Cpu));
    let cond = Conditioning { context: Some(&ctx), ..Default::default() };
    let out = cn.forward(&x, &t, &cond_img, 1.0, &cond).unwrap();
    // Zero-initialised conv_out and zero convolutions: a new ControlNet changes nothing.
    assert_eq!(out.down_block_res_samples.len(), 4);
    for d in &out.down_block_res_samples {
        assert_eq!(max_abs(d), 0.0);
    }
    assert_eq!(max_abs(&out.mid_block_res_sample), 0.0);

    let bad = Tensor::rand([2, 1, 8, 8], (tch::Kind::Float, Device::Cpu));
    let e = cn.forward(&x, &t, &bad, 1.0, &cond).err().unwrap().to_string();
    assert!(e.contains("controlnet_cond") && e.contains("[2, 1, 8, 8]"), "{e}");
    let bad_ctx = Tensor::randn([2, 4, 9], (tch::Kind::Float, Device::Cpu));
    let e = cn
        .forward(&x, &t, &cond_img, 1.0, &Conditioning { context: Some(&bad_ctx), ..Default::default() })
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("context") && e.contains("[2, 4, 9]"), "{e}");
    // A conditioned model without a context: its attention widths (16, 32) are not cross_attention_dim.
    let e = cn.forward(&x, &t, &cond_img, 1.0, &Conditioning::default()).err().unwrap().to_string();
    assert!(e.contains("needs a context"), "{e}");
    let odd = Tensor::randn([2, 3, 9, 8], (tch::Kind::Float, Device::Cpu));
    let e = cn.forward(&odd, &t, &cond_img, 1.0, &cond).err().unwrap().to_string();
    assert!(e.contains("divisible by 2"), "{e}");

    // A UNet whose encoder differs cannot initialise this ControlNet, and nothing is copied.
    let ucfg = DiffusionModelUNetConfig {
        in_channels: 3,
        out_channels: 3,
        channels: vec![16, 48],
        attention_levels: vec![false, true],
        num_res_blocks: medgen::nets::PerLevel::Same(1),
        norm_num_groups: 8,
        num_head_channels: medgen::nets::PerLevel::Same(16),
        with_conditioning: true,
        cross_attention_dim: Some(8),
        ..Default::default()
    };
    assert!(cfg.matches_unet(&ucfg).is_err());
    let uvs = VarStore::new(Device::Cpu);
    let _unet = DiffusionModelUNet::new(&uvs.root(), &ucfg, Generation::Monai).unwrap();
    let mut usd = StateDict::new();
    for (k, v) in uvs.variables() {
        usd.insert(k, v.ones_like());
    }
    let snapshot = || -> std::collections::BTreeMap<String, Tensor> {
        vs.variables().into_iter().map(|(k, v)| (k, v.copy())).collect()
    };
    let before = snapshot();
    let e = ControlNet::init_from_unet(&vs, usd).err().unwrap().to_string();
    assert!(e.contains("shape mismatch") && e.contains("model expects [32, 16, 3, 3]"), "{e}");
    let after = snapshot();
    assert!(before.iter().all(|(k, a)| a.equal(&after[k])), "a failed init must leave the model untouched");
}
