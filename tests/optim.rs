//! Optimiser parity with PyTorch 2.13 on the cases of `tests/gen_optim_fixtures.py`: Adam/AdamW (L2 and decoupled
//! weight decay, amsgrad, learning-rate schedule, parameters without a gradient), `clip_grad_norm` and the
//! `GradScaler` with inf/NaN injected; exact resume through a safetensors checkpoint; load errors; freezing.
//!
//! Same libtorch, same ops, f32 on CPU: every value is expected bit-identical to PyTorch's, and the tests require
//! it. They print the worst relative error as well (max |got - want| / max |want| per tensor), which the issue bounds
//! by 1e-6.
mod common;

use common::fixtures;
use medgen::checkpoint::StateDict;
use medgen::train::grad_scaler::{GradScaler, GradScalerConfig};
use medgen::train::optim::{clip_grad_norm, defined_grads, named_trainable_variables, Adam, AdamConfig};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

const REL_TOL: f64 = 1e-6;

fn dir() -> PathBuf {
    fixtures().join("optim")
}

fn manifest() -> Value {
    let path = dir().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn load(file: &str) -> StateDict {
    StateDict::load(&dir().join(file), None).unwrap_or_else(|e| panic!("{file}: {e:#}"))
}

fn get<'a>(sd: &'a StateDict, key: &str) -> &'a Tensor {
    sd.get(key).unwrap_or_else(|| panic!("fixture tensor {key} missing"))
}

/// Worst relative error and number of values that are not bit-identical (NaN matching NaN counts as identical).
#[derive(Default, Clone, Copy)]
struct Diff {
    rel: f64,
    differing: i64,
}

impl Diff {
    fn of(what: &str, got: &Tensor, want: &Tensor) -> Diff {
        assert_eq!(got.size(), want.size(), "{what}: shape");
        assert_eq!(got.kind(), want.kind(), "{what}: dtype");
        if got.numel() == 0 {
            return Diff::default();
        }
        let (g, w) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
        let both_nan = g.isnan().logical_and(&w.isnan());
        let differing = i64::try_from(g.ne_tensor(&w).logical_and(&both_nan.logical_not()).sum(Kind::Int64)).unwrap();
        let err = f64::try_from((&g - &w).abs().masked_fill(&both_nan, 0.0).max()).unwrap();
        let scale = f64::try_from(w.abs().masked_fill(&w.isnan(), 0.0).max()).unwrap().max(f64::MIN_POSITIVE);
        Diff { rel: if differing == 0 { 0.0 } else { err / scale }, differing }
    }

    fn merge(&mut self, other: Diff) {
        self.rel = self.rel.max(other.rel);
        self.differing += other.differing;
    }

    fn check(&self, what: &str) {
        assert!(self.rel <= REL_TOL, "{what}: max relative error {:e} > {REL_TOL:e}", self.rel);
        assert_eq!(self.differing, 0, "{what}: {} value(s) not bit-identical (max rel {:e})", self.differing, self.rel);
    }
}

struct Case {
    name: String,
    config: AdamConfig,
    names: Vec<String>,
    steps: usize,
    lr_schedule: Option<Vec<f64>>,
    clip: Option<f64>,
}

fn config_of(v: &Value) -> AdamConfig {
    let lr = v["lr"].as_f64().unwrap();
    let base = match v["algorithm"].as_str().unwrap() {
        "adam" => AdamConfig::adam(lr),
        "adamw" => AdamConfig::adamw(lr),
        other => panic!("algorithm {other}"),
    };
    base.betas(v["betas"][0].as_f64().unwrap(), v["betas"][1].as_f64().unwrap())
        .eps(v["eps"].as_f64().unwrap())
        .weight_decay(v["weight_decay"].as_f64().unwrap())
        .amsgrad(v["amsgrad"].as_bool().unwrap())
}

fn cases() -> Vec<Case> {
    let m = manifest();
    m["adam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_string(),
            config: config_of(c),
            names: c["params"].as_array().unwrap().iter().map(|p| p[0].as_str().unwrap().to_string()).collect(),
            steps: c["steps"].as_u64().unwrap() as usize,
            lr_schedule: c
                .get("lr_schedule")
                .map(|s| s.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()),
            clip: c.get("clip").and_then(Value::as_f64),
        })
        .collect()
}

/// Leaf parameters from fixture tensors (copies: the fixture stays as it was).
fn leaves(sd: &StateDict, prefix: &str, names: &[String]) -> Vec<Tensor> {
    names.iter().map(|n| get(sd, &format!("{prefix}.{n}")).copy().set_requires_grad(true)).collect()
}

fn named(names: &[String], params: &[Tensor]) -> Vec<(String, Tensor)> {
    names.iter().cloned().zip(params.iter().map(Tensor::shallow_clone)).collect()
}

/// `p.grad = g` (times the loss scale) through a backward of `sum_i (p_i * g_i).sum()`, as the generator does.
fn backward_with(params: &[Tensor], grads: &[Option<&Tensor>], scaler: Option<&mut GradScaler>) {
    let terms: Vec<Tensor> =
        params.iter().zip(grads).filter_map(|(p, g)| g.map(|g| (p * g).sum(Kind::Float))).collect();
    if terms.is_empty() {
        return;
    }
    let mut loss = Tensor::stack(&terms, 0).sum(Kind::Float);
    if let Some(s) = scaler {
        loss = s.scale(&loss).unwrap();
    }
    loss.backward();
}

/// Step `k` of a case: learning rate, zero_grad, backward, clipping, step. Returns the clip norm.
fn run_step(case: &Case, sd: &StateDict, k: usize, params: &[Tensor], opt: &mut Adam) -> Option<Tensor> {
    if let Some(s) = &case.lr_schedule {
        opt.set_lr(s[k]);
    }
    opt.zero_grad();
    let grads: Vec<Option<&Tensor>> = case.names.iter().map(|n| sd.get(&format!("grad.{k}.{n}"))).collect();
    backward_with(params, &grads, None);
    let norm = case.clip.map(|c| opt.clip_grad_norm(c).unwrap());
    opt.step().unwrap();
    norm
}

fn state_of(opt: &Adam, prefix: &str) -> StateDict {
    let mut sd = StateDict::new();
    opt.save_state(&mut sd, prefix).unwrap();
    sd
}

#[test]
fn adam_matches_pytorch_every_step() {
    tch::set_num_threads(1);
    println!("{:<24} {:>12} {:>10} {:>12} {:>10}", "case", "params rel", "differing", "state rel", "differing");
    for case in cases() {
        let sd = load(&format!("adam_{}.safetensors", case.name));
        let params = leaves(&sd, "init", &case.names);
        let mut opt = Adam::new(case.config, named(&case.names, &params)).unwrap();
        let (mut pd, mut sdiff) = (Diff::default(), Diff::default());
        for k in 0..case.steps {
            let norm = run_step(&case, &sd, k, &params, &mut opt);
            if let Some(norm) = norm {
                pd.merge(Diff::of(&format!("{} norm {k}", case.name), &norm, get(&sd, &format!("norm.{k}"))));
            }
            for (n, p) in case.names.iter().zip(&params) {
                pd.merge(Diff::of(&format!("{} step {k} {n}", case.name), p, get(&sd, &format!("param.{k}.{n}"))));
            }
            if k == 4 {
                // The saved state is PyTorch's optimizer.state_dict() entry for entry.
                let ours = state_of(&opt, "opt");
                let want: Vec<&String> = sd.names().iter().filter(|n| n.starts_with("state5.")).collect();
                assert_eq!(ours.len(), want.len(), "{}: number of state tensors", case.name);
                for key in want {
                    let mine = ours.get(&key.replacen("state5.", "opt.", 1)).unwrap_or_else(|| panic!("no {key}"));
                    sdiff.merge(Diff::of(&format!("{} {key}", case.name), mine, get(&sd, key)));
                }
            }
        }
        println!(
            "{:<24} {:>12.3e} {:>10} {:>12.3e} {:>10}",
            case.name, pd.rel, pd.differing, sdiff.rel, sdiff.differing
        );
        pd.check(&format!("{} parameters", case.name));
        sdiff.check(&format!("{} state", case.name));
    }
}

fn assert_same_state(what: &str, a: &StateDict, b: &StateDict) {
    assert_eq!(a.names().len(), b.names().len(), "{what}: entries");
    for (k, t) in a.iter() {
        let u = b.get(k).unwrap_or_else(|| panic!("{what}: {k} missing"));
        assert!(t.kind() == u.kind() && t.equal(u), "{what}: {k} differs");
    }
    assert_eq!(a.metadata, b.metadata, "{what}: metadata");
}

/// Five steps, a checkpoint on disk (weights and optimiser state), a fresh optimiser built with other
/// hyper-parameters that the checkpoint overrides, five more steps: bitwise the same as ten straight steps.
#[test]
fn resume_through_a_checkpoint_is_bitwise_identical() {
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir().unwrap();
    for case in cases() {
        let sd = load(&format!("adam_{}.safetensors", case.name));
        let straight = leaves(&sd, "init", &case.names);
        let mut opt = Adam::new(case.config, named(&case.names, &straight)).unwrap();
        for k in 0..case.steps {
            run_step(&case, &sd, k, &straight, &mut opt);
        }

        let first = leaves(&sd, "init", &case.names);
        let mut opt1 = Adam::new(case.config, named(&case.names, &first)).unwrap();
        for k in 0..5 {
            run_step(&case, &sd, k, &first, &mut opt1);
        }
        let mut ckpt = StateDict::new();
        for (n, p) in case.names.iter().zip(&first) {
            ckpt.insert(format!("model.{n}"), p.detach().copy());
        }
        opt1.save_state(&mut ckpt, "optimizer").unwrap();
        let path = tmp.path().join(format!("{}.safetensors", case.name));
        ckpt.save_safetensors(&path, &ckpt.metadata).unwrap();
        drop((opt1, first));

        let back = StateDict::load(&path, None).unwrap();
        let resumed = leaves(&back, "model", &case.names);
        let other = if case.config.decoupled_weight_decay { AdamConfig::adamw(123.0) } else { AdamConfig::adam(123.0) };
        let mut opt2 = Adam::new(other.betas(0.1, 0.2).eps(0.5), named(&case.names, &resumed)).unwrap();
        opt2.load_state(&back, "optimizer").unwrap();
        assert_eq!(opt2.config().amsgrad, case.config.amsgrad, "{}: amsgrad restored", case.name);
        for k in 5..case.steps {
            run_step(&case, &sd, k, &resumed, &mut opt2);
        }
        for ((n, a), b) in case.names.iter().zip(&straight).zip(&resumed) {
            assert!(a.equal(b), "{}: {n} differs after resuming", case.name);
        }
        assert_same_state(&case.name, &state_of(&opt, "o"), &state_of(&opt2, "o"));
        println!("{}: resumed run bitwise identical to the straight one", case.name);
    }
}

/// A state after three steps of a small AdamW with amsgrad, and its optimiser.
fn small_state() -> (Vec<String>, Vec<Tensor>, Adam, StateDict) {
    let names: Vec<String> = ["enc.weight", "enc.bias"].iter().map(|s| s.to_string()).collect();
    let params = vec![Tensor::ones([3, 2], (Kind::Float, Device::Cpu)), Tensor::ones([3], (Kind::Float, Device::Cpu))];
    let params: Vec<Tensor> = params.into_iter().map(|p| p.set_requires_grad(true)).collect();
    let mut opt = Adam::new(AdamConfig::adamw(0.1).amsgrad(true), named(&names, &params)).unwrap();
    for k in 0..3 {
        opt.zero_grad();
        let g: Vec<Tensor> = params.iter().map(|p| p.ones_like() * (k as f64 + 0.5)).collect();
        backward_with(&params, &[Some(&g[0]), Some(&g[1])], None);
        opt.step().unwrap();
    }
    let sd = state_of(&opt, "opt");
    (names, params, opt, sd)
}

fn load_err(sd: &StateDict, config: AdamConfig) -> String {
    let (names, params, _, _) = small_state();
    let mut opt = Adam::new(config, named(&names, &params)).unwrap();
    let before = state_of(&opt, "opt");
    let err = format!("{:#}", opt.load_state(sd, "opt").expect_err("the load should fail"));
    // Nothing changed: the checks come before any assignment.
    assert_same_state("after a failed load", &before, &state_of(&opt, "opt"));
    err
}

fn edited(sd: &StateDict, f: impl Fn(&str, &Tensor) -> Option<(String, Tensor)>) -> StateDict {
    let mut out = StateDict::new();
    for (k, t) in sd.iter() {
        if let Some((k2, t2)) = f(k, t) {
            out.insert(k2, t2);
        }
    }
    out.metadata = sd.metadata.clone();
    out
}

#[test]
fn load_state_errors_name_the_key() {
    let (_, _, _, sd) = small_state();
    let cfg = AdamConfig::adamw(0.1).amsgrad(true);

    let renamed = edited(&sd, |k, t| Some((k.replace("enc.bias", "enc.bais"), t.shallow_clone())));
    let e = load_err(&renamed, cfg);
    assert!(e.contains("opt.exp_avg.enc.bais") || e.contains("enc.bais"), "{e}");
    assert!(e.contains("no parameter named \"enc.bais\""), "{e}");

    let reshaped = edited(&sd, |k, t| {
        Some((k.to_string(), if k == "opt.exp_avg_sq.enc.weight" { t.reshape([2, 3]) } else { t.shallow_clone() }))
    });
    let e = load_err(&reshaped, cfg);
    assert!(e.contains("opt.exp_avg_sq.enc.weight") && e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");

    let partial = edited(&sd, |k, t| (k != "opt.exp_avg_sq.enc.bias").then(|| (k.to_string(), t.shallow_clone())));
    let e = load_err(&partial, cfg);
    assert!(e.contains("incomplete") && e.contains("opt.exp_avg_sq.enc.bias"), "{e}");

    let no_max = edited(&sd, |k, t| (!k.contains("max_exp_avg_sq")).then(|| (k.to_string(), t.shallow_clone())));
    let e = load_err(&no_max, cfg);
    assert!(e.contains("opt.max_exp_avg_sq.enc"), "{e}");

    // A state saved without amsgrad has no max_exp_avg_sq; one that claims so but holds it is refused.
    let mut not_ams = sd_clone(&sd);
    not_ams.metadata.insert("opt.amsgrad".into(), "false".into());
    let e = load_err(&not_ams, cfg);
    assert!(e.contains("unexpected optimiser entry") && e.contains("max_exp_avg_sq"), "{e}");

    let e = load_err(&sd, AdamConfig::adam(0.1).amsgrad(true));
    assert!(e.contains("adamw") && e.contains("adam"), "{e}");

    let mut no_meta = sd_clone(&sd);
    no_meta.metadata.remove("opt.beta2");
    let e = load_err(&no_meta, cfg);
    assert!(e.contains("opt.beta2"), "{e}");

    let mut bad_meta = sd_clone(&sd);
    bad_meta.metadata.insert("opt.lr".into(), "fast".into());
    let e = load_err(&bad_meta, cfg);
    assert!(e.contains("opt.lr") && e.contains("fast"), "{e}");

    let bad_step =
        edited(&sd, |k, t| Some((k.to_string(), if k == "opt.step.enc.weight" { t + 0.5 } else { t.shallow_clone() })));
    let e = load_err(&bad_step, cfg);
    assert!(e.contains("opt.step.enc.weight") && e.contains("3.5"), "{e}");

    let stray = edited(&sd, |k, t| Some((k.replace("opt.exp_avg.enc.weight", "opt.momentum.enc.weight"), t.copy())));
    let e = load_err(&stray, cfg);
    assert!(e.contains("opt.momentum.enc.weight"), "{e}");
    println!("load errors:\n  {}", e);
}

fn sd_clone(sd: &StateDict) -> StateDict {
    edited(sd, |k, t| Some((k.to_string(), t.shallow_clone())))
}

#[test]
fn clip_grad_norm_matches_pytorch() {
    tch::set_num_threads(1);
    let m = manifest();
    for case in m["clip"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let sd = load(&format!("clip_{name}.safetensors"));
        let names: Vec<String> = case["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().into()).collect();
        let params = leaves(&sd, "grad_in", &names);
        let grads: Vec<Tensor> = names.iter().map(|n| get(&sd, &format!("grad_in.{n}")).copy()).collect();
        backward_with(&params, &grads.iter().map(Some).collect::<Vec<_>>(), None);
        let total = clip_grad_norm(&defined_grads(&params), case["max_norm"].as_f64().unwrap()).unwrap();
        let mut d = Diff::of(&format!("{name} total norm"), &total, get(&sd, "total_norm"));
        for (n, p) in names.iter().zip(&params) {
            d.merge(Diff::of(&format!("{name} {n}"), &p.grad(), get(&sd, &format!("grad_out.{n}"))));
        }
        println!(
            "clip {name:<12} total norm {:.6} rel {:.3e} differing {}",
            total.double_value(&[]),
            d.rel,
            d.differing
        );
        d.check(&format!("clip {name}"));
    }
}

struct ScalerRun {
    names_a: Vec<String>,
    names_b: Vec<String>,
    pa: Vec<Tensor>,
    pb: Vec<Tensor>,
    opt_a: Adam,
    opt_b: Adam,
    scaler: GradScaler,
}

fn scaler_names(m: &Value, key: &str) -> Vec<String> {
    m["scaler"][key].as_array().unwrap().iter().map(|p| p[0].as_str().unwrap().to_string()).collect()
}

fn scaler_config(s: &Value) -> GradScalerConfig {
    GradScalerConfig {
        init_scale: s["init_scale"].as_f64().unwrap(),
        growth_factor: s["growth_factor"].as_f64().unwrap(),
        backoff_factor: s["backoff_factor"].as_f64().unwrap(),
        growth_interval: s["growth_interval"].as_i64().unwrap(),
        enabled: true,
    }
}

fn scaler_run(m: &Value, sd: &StateDict, prefix: &str) -> ScalerRun {
    let s = &m["scaler"];
    let (names_a, names_b) = (scaler_names(m, "params_a"), scaler_names(m, "params_b"));
    let (pa, pb) = (leaves(sd, prefix, &names_a), leaves(sd, prefix, &names_b));
    let opt_a = Adam::new(config_of(&s["a"]), named(&names_a, &pa)).unwrap();
    let opt_b = Adam::new(config_of(&s["b"]), named(&names_b, &pb)).unwrap();
    let scaler = GradScaler::new(scaler_config(s)).unwrap();
    ScalerRun { names_a, names_b, pa, pb, opt_a, opt_b, scaler }
}

/// One iteration of the scripted sequence; checks it against the fixture and returns its differences.
fn scaler_step(m: &Value, sd: &StateDict, k: usize, r: &mut ScalerRun) -> Diff {
    let s = &m["scaler"];
    let mut d = Diff::default();
    let scalar = |key: String| get(sd, &key).double_value(&[]);
    assert_eq!(r.scaler.get_scale(), scalar(format!("scale_before.{k}")), "scale before step {k}");
    r.opt_a.zero_grad();
    r.opt_b.zero_grad();
    let all: Vec<Tensor> = r.pa.iter().chain(&r.pb).map(Tensor::shallow_clone).collect();
    let grads: Vec<Option<&Tensor>> =
        r.names_a.iter().chain(&r.names_b).map(|n| Some(get(sd, &format!("grad.{k}.{n}")))).collect();
    backward_with(&all, &grads, Some(&mut r.scaler));
    let clip_steps: Vec<usize> =
        s["clip_steps"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    if clip_steps.contains(&k) {
        r.scaler.unscale_(&mut r.opt_a).unwrap();
        let norm = r.opt_a.clip_grad_norm(s["clip_max_norm"].as_f64().unwrap()).unwrap();
        d.merge(Diff::of(&format!("scaler norm {k}"), &norm, get(sd, &format!("norm.{k}"))));
    }
    let stepped_a = r.scaler.step(&mut r.opt_a).unwrap();
    let stepped_b = r.scaler.step(&mut r.opt_b).unwrap();
    assert_eq!(stepped_a, scalar(format!("found_a.{k}")) == 0.0, "step {k}: optimiser a stepped");
    assert_eq!(stepped_b, scalar(format!("found_b.{k}")) == 0.0, "step {k}: optimiser b stepped");
    r.scaler.update().unwrap();
    assert_eq!(r.scaler.get_scale(), scalar(format!("scale_after.{k}")), "scale after step {k}");
    assert_eq!(r.scaler.growth_tracker() as f64, scalar(format!("tracker_after.{k}")), "growth tracker after step {k}");
    for (n, p) in r.names_a.iter().chain(&r.names_b).zip(r.pa.iter().chain(&r.pb)) {
        d.merge(Diff::of(&format!("scaler step {k} {n}"), p, get(sd, &format!("param.{k}.{n}"))));
    }
    print!(
        "{}{}{} ",
        if stepped_a { "" } else { "a-skip," },
        if stepped_b { "" } else { "b-skip," },
        r.scaler.get_scale()
    );
    d
}

#[test]
fn grad_scaler_matches_pytorch() {
    tch::set_num_threads(1);
    let m = manifest();
    let sd = load("scaler.safetensors");
    let mut run = scaler_run(&m, &sd, "init");
    let mut d = Diff::default();
    print!("scale after each step: ");
    for k in 0..m["scaler"]["steps"].as_u64().unwrap() as usize {
        d.merge(scaler_step(&m, &sd, k, &mut run));
    }
    println!("\nscaler parameters: rel {:.3e}, differing {}", d.rel, d.differing);
    d.check("scaler parameters");
}

/// Saved after an update (two optimisers and the scaler in one file), restored into fresh objects whose scaler has
/// other hyper-parameters: the rest of the sequence still matches PyTorch's uninterrupted run.
#[test]
fn grad_scaler_resume_matches_pytorch() {
    tch::set_num_threads(1);
    let m = manifest();
    let sd = load("scaler.safetensors");
    let save_after = m["scaler"]["save_after"].as_u64().unwrap() as usize;
    let mut run = scaler_run(&m, &sd, "init");
    for k in 0..=save_after {
        scaler_step(&m, &sd, k, &mut run);
    }
    let mut ckpt = StateDict::new();
    for (n, p) in run.names_a.iter().chain(&run.names_b).zip(run.pa.iter().chain(&run.pb)) {
        ckpt.insert(format!("model.{n}"), p.detach().copy());
    }
    run.opt_a.save_state(&mut ckpt, "optimizer_g").unwrap();
    run.opt_b.save_state(&mut ckpt, "optimizer_d").unwrap();
    run.scaler.save_state(&mut ckpt, "grad_scaler").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ckpt.safetensors");
    ckpt.save_safetensors(&path, &ckpt.metadata).unwrap();

    let back = StateDict::load(&path, None).unwrap();
    let mut fresh = scaler_run(&m, &back, "model");
    fresh.scaler =
        GradScaler::new(GradScalerConfig { init_scale: 3.0, growth_interval: 99, ..Default::default() }).unwrap();
    fresh.opt_a.load_state(&back, "optimizer_g").unwrap();
    fresh.opt_b.load_state(&back, "optimizer_d").unwrap();
    fresh.scaler.load_state(&back, "grad_scaler").unwrap();
    assert_eq!(fresh.scaler.config().growth_interval, m["scaler"]["growth_interval"].as_i64().unwrap());
    let mut d = Diff::default();
    for k in save_after + 1..m["scaler"]["steps"].as_u64().unwrap() as usize {
        d.merge(scaler_step(&m, &sd, k, &mut fresh));
    }
    println!();
    d.check("resumed scaler run");
}

fn one_param_opt() -> (Tensor, Adam) {
    let p = Tensor::from_slice(&[1f32, -2.0, 3.0]).set_requires_grad(true);
    let opt = Adam::new(AdamConfig::adam(0.1), vec![("w".into(), p.shallow_clone())]).unwrap();
    (p, opt)
}

#[test]
fn grad_scaler_misuse_and_disabled() {
    let (p, mut opt) = one_param_opt();
    let mut scaler = GradScaler::new(GradScalerConfig::default()).unwrap();
    assert_eq!(scaler.get_scale(), 65536.0);
    let e = scaler.update().unwrap_err().to_string();
    assert!(e.contains("before any scale()"), "{e}");
    scaler.scale(&p.sum(Kind::Float)).unwrap().backward();
    assert_eq!(Vec::<f32>::try_from(p.grad()).unwrap(), vec![65536.0; 3]);
    scaler.unscale_(&mut opt).unwrap();
    assert_eq!(Vec::<f32>::try_from(p.grad()).unwrap(), vec![1.0; 3]);
    let e = scaler.unscale_(&mut opt).unwrap_err().to_string();
    assert!(e.contains("already been called"), "{e}");
    assert!(scaler.step(&mut opt).unwrap());
    let e = scaler.step(&mut opt).unwrap_err().to_string();
    assert!(e.contains("step() has already been called"), "{e}");
    let e = scaler.unscale_(&mut opt).unwrap_err().to_string();
    assert!(e.contains("after step()"), "{e}");
    let mut sd = StateDict::new();
    let e = scaler.save_state(&mut sd, "s").unwrap_err().to_string();
    assert!(e.contains("after update()"), "{e}");
    scaler.update().unwrap();
    assert_eq!(scaler.growth_tracker(), 1);

    // No gradient at all for an optimiser: PyTorch's "No inf checks were recorded".
    opt.zero_grad();
    let _ = scaler.scale(&Tensor::from(1f32)).unwrap();
    let e = scaler.step(&mut opt).unwrap_err().to_string();
    assert!(e.contains("no inf checks"), "{e}");

    // FP16 gradients cannot be unscaled (PyTorch's rule: the unscaled values would underflow).
    let h = Tensor::ones([2], (Kind::Half, Device::Cpu)).set_requires_grad(true);
    let mut hopt = Adam::new(AdamConfig::adam(0.1), vec![("h".into(), h.shallow_clone())]).unwrap();
    let mut s2 = GradScaler::new(GradScalerConfig::default()).unwrap();
    s2.scale(&h.sum(Kind::Float)).unwrap().backward();
    let e = s2.unscale_(&mut hopt).unwrap_err().to_string();
    assert!(e.contains("FP16"), "{e}");

    let mut off = GradScaler::new(GradScalerConfig { enabled: false, ..Default::default() }).unwrap();
    let (q, mut qopt) = one_param_opt();
    let loss = (&q * &q).sum(Kind::Float);
    let scaled = off.scale(&loss).unwrap();
    assert!(scaled.equal(&loss));
    assert_eq!(off.get_scale(), 1.0);
    scaled.backward();
    let before = q.detach().copy();
    assert!(off.step(&mut qopt).unwrap());
    assert!(!q.equal(&before), "a disabled scaler still steps");
    off.update().unwrap();
    let mut sd = StateDict::new();
    off.save_state(&mut sd, "s").unwrap();
    let e = scaler.load_state(&sd, "s").unwrap_err().to_string();
    assert!(e.contains("disabled"), "{e}");
    let e = scaler.load_state(&StateDict::new(), "s").unwrap_err().to_string();
    assert!(e.contains("s.enabled"), "{e}");
}

/// Names and order from a VarStore, freezing, and set_to_none semantics: a parameter without a fresh gradient
/// neither moves nor counts a step.
#[test]
fn var_store_frozen_and_untouched_parameters() {
    let vs = VarStore::new(Device::Cpu);
    let root = vs.root();
    let a = nn::linear(&root / "enc", 3, 2, Default::default());
    let b = nn::linear(&root / "dec", 2, 1, Default::default());
    let _buffer = (&root / "stats").zeros_no_train("running_mean", &[2]);
    let named = named_trainable_variables(&vs).unwrap();
    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    // Creation order (tch's `linear` makes its bias first), not the store's hash order; buffers left out.
    assert_eq!(names, ["enc.bias", "enc.weight", "dec.bias", "dec.weight"]);
    let mut opt = Adam::from_var_store(AdamConfig::adamw(0.1), &vs).unwrap();
    assert_eq!(opt.param_names().collect::<Vec<_>>(), names);

    let x = Tensor::ones([4, 3], (Kind::Float, Device::Cpu));
    let snapshot = |t: &Tensor| t.detach().copy();
    let steps = |opt: &Adam| -> BTreeMap<String, f64> {
        let sd = state_of(opt, "o");
        sd.iter()
            .filter(|(k, _)| k.starts_with("o.step."))
            .map(|(k, t)| (k[7..].to_string(), t.double_value(&[])))
            .collect()
    };

    // Step 1: all four get gradients.
    opt.zero_grad();
    x.apply(&a).apply(&b).sum(Kind::Float).backward();
    opt.step().unwrap();
    assert_eq!(steps(&opt).values().copied().collect::<Vec<_>>(), vec![1.0; 4]);

    // Step 2: only the encoder's output enters the loss; the decoder's zeroed gradients stay untouched.
    let dec_w = snapshot(&b.ws);
    opt.zero_grad();
    x.apply(&a).sum(Kind::Float).backward();
    assert_eq!(opt.grads().unwrap().len(), 2);
    opt.step().unwrap();
    assert!(b.ws.equal(&dec_w), "a parameter without a fresh gradient must not move");
    let s = steps(&opt);
    assert_eq!((s["enc.weight"], s["dec.weight"]), (2.0, 1.0));

    // Step 3: a live gradient on a frozen parameter is ignored (by step, and by the clipping).
    opt.zero_grad();
    x.apply(&a).apply(&b).sum(Kind::Float).backward();
    let _ = a.ws.set_requires_grad(false);
    let enc_w = snapshot(&a.ws);
    assert_eq!(opt.grads().unwrap().len(), 3);
    let _ = opt.clip_grad_norm(1.0).unwrap();
    opt.step().unwrap();
    assert!(a.ws.equal(&enc_w), "a frozen parameter must not move");
    let s = steps(&opt);
    assert_eq!((s["enc.weight"], s["enc.bias"], s["dec.weight"]), (2.0, 3.0, 2.0));

    // The learning rate is read at each step.
    opt.set_lr(0.0);
    let _ = a.ws.set_requires_grad(true);
    let all: HashMap<String, Tensor> = vs.variables().into_iter().map(|(k, v)| (k, snapshot(&v))).collect();
    opt.zero_grad();
    x.apply(&a).apply(&b).sum(Kind::Float).backward();
    opt.step().unwrap();
    for (k, v) in vs.variables() {
        assert!(v.equal(&all[&k]), "{k} moved with lr 0 (AdamW decays by lr * wd)");
    }
}

#[test]
fn adam_rejects_bad_parameters() {
    let p = Tensor::ones([2], (Kind::Float, Device::Cpu));
    let e = Adam::new(AdamConfig::adam(1e-3), vec![("a".into(), p.shallow_clone()), ("a".into(), p.shallow_clone())]);
    assert!(e.err().unwrap().to_string().contains("\"a\" is given twice"));
    let i = Tensor::ones([2], (Kind::Int64, Device::Cpu));
    let e = Adam::new(AdamConfig::adam(1e-3), vec![("i".into(), i)]).err().unwrap().to_string();
    assert!(e.contains("\"i\"") && e.contains("Int64"), "{e}");
    let e = Adam::new(AdamConfig::adam(1e-3).betas(0.9, 1.0), vec![("p".into(), p)]).err().unwrap().to_string();
    assert!(e.contains("beta2"), "{e}");
}
