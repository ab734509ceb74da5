//! The strict and partial loaders, and the old-to-new renaming, on a small AutoencoderKL.
use medgen::checkpoint::{load_model, load_partial, load_strict, Generation, StateDict};
use medgen::nets::{AutoencoderKL, AutoencoderKLConfig, PerLevel};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn cfg() -> AutoencoderKLConfig {
    AutoencoderKLConfig {
        channels: vec![8, 16],
        attention_levels: vec![false, true],
        num_res_blocks: PerLevel::Same(1),
        norm_num_groups: 4,
        ..Default::default()
    }
}

fn model(generation: Generation) -> (VarStore, AutoencoderKL) {
    let vs = VarStore::new(Device::Cpu);
    let m = AutoencoderKL::new(&vs.root(), &cfg(), generation).unwrap();
    (vs, m)
}

/// A full, correct state dict for the model, with distinct random values.
fn state_dict(vs: &VarStore) -> StateDict {
    tch::manual_seed(7);
    let mut sd = StateDict::new();
    let mut vars: Vec<_> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, v) in vars {
        sd.insert(k, Tensor::randn(v.size(), (Kind::Float, Device::Cpu)));
    }
    sd
}

fn snapshot(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = vs.variables().into_iter().map(|(k, t)| (k, t.copy())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn unchanged(vs: &VarStore, before: &[(String, Tensor)]) -> bool {
    let after = snapshot(vs);
    after.len() == before.len() && after.iter().zip(before).all(|(a, b)| a.0 == b.0 && a.1.equal(&b.1))
}

#[test]
fn strict_load_copies_everything() {
    let (vs, _m) = model(Generation::Monai);
    let sd = state_dict(&vs);
    let r = load_strict(&vs, &sd).unwrap();
    assert_eq!(r.copied.len(), sd.len());
    for (k, v) in vs.variables() {
        assert!(v.equal(sd.get(&k).unwrap()), "{k}");
    }
}

#[test]
fn every_problem_is_reported_at_once_and_nothing_is_loaded() {
    let (vs, _m) = model(Generation::Monai);
    let before = snapshot(&vs);
    let mut sd = state_dict(&vs);
    assert!(sd.remove("encoder.blocks.0.conv.bias").is_some());
    assert!(sd.remove("decoder.blocks.2.attn.to_q.weight").is_some());
    sd.insert("encoder.blocks.99.weight", Tensor::zeros([3], (Kind::Float, Device::Cpu)));
    sd.insert("quant_conv_mu.conv.weight", Tensor::zeros([3, 3, 3, 3], (Kind::Float, Device::Cpu)));
    sd.insert("post_quant_conv.conv.bias", Tensor::zeros([3], (Kind::Int64, Device::Cpu)));
    let e = format!("{:#}", load_strict(&vs, &sd).unwrap_err());
    for needle in [
        "2 missing, 1 unexpected, 2 mismatched",
        "missing key encoder.blocks.0.conv.bias (model shape [8])",
        "missing key decoder.blocks.2.attn.to_q.weight (model shape [16, 16])",
        "unexpected key encoder.blocks.99.weight",
        "shape mismatch for quant_conv_mu.conv.weight: model expects [3, 3, 1, 1], checkpoint has [3, 3, 3, 3]",
        "dtype mismatch for post_quant_conv.conv.bias: model expects Float, checkpoint has Int64",
    ] {
        assert!(e.contains(needle), "missing {needle:?} in:\n{e}");
    }
    assert!(unchanged(&vs, &before), "a failed strict load modified the model");
}

#[test]
fn half_precision_checkpoints_load_into_a_float_model() {
    let (vs, _m) = model(Generation::Monai);
    let sd = state_dict(&vs);
    let mut half = StateDict::new();
    for (k, v) in sd.iter() {
        half.insert(k.clone(), v.to_kind(Kind::Half));
    }
    load_strict(&vs, &half).unwrap();
    for (k, v) in vs.variables() {
        assert_eq!(v.kind(), Kind::Float, "{k} keeps the model dtype");
    }
}

#[test]
fn partial_load_reports_what_it_did_not_copy() {
    let (vs, _m) = model(Generation::Monai);
    let mut sd = state_dict(&vs);
    assert!(sd.remove("encoder.blocks.0.conv.bias").is_some());
    sd.insert("extra.weight", Tensor::zeros([1], (Kind::Float, Device::Cpu)));
    sd.insert("quant_conv_mu.conv.weight", Tensor::zeros([3, 3, 3, 3], (Kind::Float, Device::Cpu)));
    let r = load_partial(&vs, &sd).unwrap();
    assert_eq!(r.missing.len(), 1);
    assert_eq!(r.unexpected, vec!["extra.weight".to_string()]);
    assert_eq!(r.mismatched.len(), 1);
    assert_eq!(r.copied.len(), vs.variables().len() - 2);
}

/// An old-layout state dict, built from a new one by the inverse of the documented rules.
fn to_old_names(sd: &StateDict) -> StateDict {
    let mut old = StateDict::new();
    for (k, v) in sd.iter() {
        if k.contains(".attn.out_proj.") {
            // Old checkpoints carry a never-applied `proj_attn` instead: give it values that
            // would change the output if anyone applied them.
            old.insert(k.replace(".attn.out_proj.", ".proj_attn."), v.shallow_clone());
        } else {
            old.insert(k.replace(".attn.", ".").replace(".postconv.", ".conv."), v.shallow_clone());
        }
    }
    old
}

#[test]
fn old_names_are_renamed_and_proj_attn_is_not_applied() {
    let (vs, m) = model(Generation::Monai);
    let sd = state_dict(&vs);
    // Reference: the new model with an identity output projection = the old library's math.
    let mut reference = StateDict::new();
    for (k, v) in sd.iter() {
        let v = if k.ends_with("attn.out_proj.weight") {
            Tensor::eye(v.size()[0], (Kind::Float, Device::Cpu))
        } else if k.ends_with("attn.out_proj.bias") {
            v.zeros_like()
        } else {
            v.shallow_clone()
        };
        reference.insert(k.clone(), v);
    }
    load_strict(&vs, &reference).unwrap();
    let x = Tensor::randn([1, 1, 16, 16], (Kind::Float, Device::Cpu));
    let want = m.reconstruct(&x).unwrap();

    let old = to_old_names(&sd);
    assert_eq!(Generation::detect(old.names()), Generation::Generative);
    let loaded = load_model(old, Device::Cpu, |p, g| AutoencoderKL::new(p, &cfg(), g)).unwrap();
    assert_eq!(loaded.generation, Generation::Generative);
    assert!(loaded.state_dict.notes.iter().any(|n| n.contains("proj_attn")), "{:?}", loaded.state_dict.notes);
    let got = loaded.model.reconstruct(&x).unwrap();
    let err = f64::try_from((got - want).abs().max()).unwrap();
    assert!(err < 1e-5, "old checkpoint output differs from the identity-projection reference: {err}");
}
