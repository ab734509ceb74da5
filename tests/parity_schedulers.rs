//! Scheduler parity with MONAI 1.6.1 and monai-generative 0.2.3 on the cases of
//! `tests/gen_scheduler_fixtures.py` (read by medgen's own safetensors loader), the spec's golden
//! values (monai-networks.md §5.5, reference-repo.md §4), and input validation.
mod common;

use common::fixtures;
use medgen::checkpoint::StateDict;
use medgen::schedulers::{
    build, DdimScheduler, DdpmScheduler, PndmScheduler, Scheduler, SchedulerConfig, SchedulerKind,
};
use tch::{Device, Kind, Tensor};

/// fp32 CPU, same libtorch, same op sequence: every value is expected bit-identical; the
/// tolerance only bounds what a failure would look like.
const ABS_TOL: f64 = 1e-6;

/// Max absolute difference, where NaN (or an infinity) at the same place in both counts as
/// equal: the legacy cosine has ᾱ[0] == 1, so DDPM's and DDIM's t=0 step divide by zero there,
/// in PyTorch as here. A shape mismatch or a NaN on one side only is an infinite error.
fn diff(got: &Tensor, want: &Tensor) -> f64 {
    if got.size() != want.size() {
        return f64::INFINITY;
    }
    if got.numel() == 0 {
        return 0.0;
    }
    let (g, w) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
    if !g.isnan().equal(&w.isnan()) {
        return f64::INFINITY;
    }
    let same = g.eq_tensor(&w).logical_or(&g.isnan());
    let d = (&g - &w).abs().masked_fill(&same, 0.0);
    f64::try_from(d.max()).unwrap()
}

/// Worst error per group of checks, for one table row per case.
#[derive(Default)]
struct Errors {
    cols: Vec<(&'static str, f64)>,
    failures: Vec<String>,
}

impl Errors {
    fn record(&mut self, col: &'static str, what: &str, err: f64) {
        match self.cols.iter_mut().find(|(c, _)| *c == col) {
            Some((_, e)) => *e = e.max(err),
            None => self.cols.push((col, err)),
        }
        if err > ABS_TOL || err.is_nan() {
            self.failures.push(format!("{what}: max abs error {err:e} > {ABS_TOL:e}"));
        }
    }

    fn fail(&mut self, what: String) {
        self.failures.push(what);
    }
}

fn timesteps_of(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(&t.to_kind(Kind::Int64).reshape([-1])).unwrap()
}

fn check_case(c: &serde_json::Value, io: &StateDict, e: &mut Errors) {
    let name = c["case"].as_str().unwrap();
    let t = |k: &str| io.get(k).unwrap_or_else(|| panic!("{name}: fixture lacks {k}")).shallow_clone();
    let kind: SchedulerKind = c["kind"].as_str().unwrap().parse().unwrap();
    // The manifest's config goes through the same serde path as a user's config file.
    let cfg: SchedulerConfig = serde_json::from_value(c["config"].clone())
        .unwrap_or_else(|err| panic!("{name}: config does not parse: {err}"));
    let n = c["num_inference_steps"].as_u64().unwrap() as usize;
    let mut s = build(kind, &cfg).unwrap_or_else(|err| panic!("{name}: build failed: {err:#}"));

    let ns = s.noise_schedule();
    for (k, got) in [("betas", ns.betas()), ("alphas", ns.alphas()), ("alphas_cumprod", ns.alphas_cumprod())] {
        e.record("tables", &format!("{name} {k}"), diff(got, &t(k)));
    }
    if s.timesteps() != timesteps_of(&t("default_timesteps")).as_slice() {
        e.fail(format!("{name}: timesteps before set_timesteps differ from MONAI's"));
    }

    for (op, ts, out) in [
        ("add_noise", "add_noise_timesteps", "add_noise"),
        ("add_noise", "add_noise_timestep_0d", "add_noise_0d"),
        ("get_velocity", "add_noise_timesteps", "velocity"),
        ("get_velocity", "add_noise_timestep_0d", "velocity_0d"),
    ] {
        let (x0, noise, ts) = (t("add_noise_original"), t("add_noise_noise"), t(ts));
        let got = match op {
            "add_noise" => s.add_noise(&x0, &noise, &ts),
            _ => s.get_velocity(&x0, &noise, &ts),
        };
        match got {
            Ok(got) => e.record(
                if op == "add_noise" { "add_noise" } else { "velocity" },
                &format!("{name} {out}"),
                diff(&got, &t(out)),
            ),
            Err(err) => e.fail(format!("{name} {out}: {err:#}")),
        }
    }

    s.set_timesteps(n).unwrap_or_else(|err| panic!("{name}: set_timesteps({n}) failed: {err:#}"));
    let want_ts = timesteps_of(&t("timesteps"));
    if s.timesteps() != want_ts.as_slice() {
        e.fail(format!("{name}: timesteps {:?} != MONAI's {:?}", s.timesteps(), want_ts));
    }
    let want_n = timesteps_of(&t("num_inference_steps"))[0] as usize;
    if s.num_inference_steps() != Some(want_n) {
        e.fail(format!("{name}: num_inference_steps {:?} != MONAI's {want_n}", s.num_inference_steps()));
    }

    // The full trajectory, fed with our own previous sample: errors would accumulate.
    tch::manual_seed(c["trajectory_seed"].as_i64().unwrap());
    let mut x = t("sample_init");
    let timesteps = s.timesteps().to_vec();
    for (i, &ts) in timesteps.iter().enumerate() {
        let (prev, x0) = match s.step(&t(&format!("model_output_{i}")), ts, &x) {
            Ok(r) => r,
            Err(err) => return e.fail(format!("{name}: step {i} (t={ts}) failed: {err:#}")),
        };
        e.record(
            "prev_sample",
            &format!("{name} prev_sample_{i} (t={ts})"),
            diff(&prev, &t(&format!("prev_sample_{i}"))),
        );
        let key = format!("pred_original_sample_{i}");
        match (x0, io.get(&key)) {
            (Some(x0), Some(want)) => e.record("pred_x0", &format!("{name} {key}"), diff(&x0, want)),
            (None, None) => {}
            (got, _) => {
                e.fail(format!("{name}: {key} present here: {}, in MONAI: {}", got.is_some(), io.contains(&key)))
            }
        }
        x = prev;
    }

    if let Some(rule) = c["reversed"].as_str() {
        check_inversion(name, c, io, &cfg, n, rule == "legacy", e);
    }
}

fn check_inversion(
    name: &str,
    c: &serde_json::Value,
    io: &StateDict,
    cfg: &SchedulerConfig,
    n: usize,
    legacy: bool,
    e: &mut Errors,
) {
    let t = |k: &str| io.get(k).unwrap_or_else(|| panic!("{name}: fixture lacks {k}")).shallow_clone();
    let mut d = DdimScheduler::new(cfg).unwrap();
    d.set_timesteps(n).unwrap();
    let error_at = c["reversed_error_at"].as_u64().map(|i| i as usize);
    let mut x = t("reversed_sample_init");
    let ascending: Vec<i64> = d.timesteps().iter().rev().copied().collect();
    for (i, &ts) in ascending.iter().enumerate() {
        let mo = t(&format!("reversed_model_output_{i}"));
        let r = if legacy { d.reversed_step_legacy(&mo, ts, &x) } else { d.reversed_step(&mo, ts, &x) };
        match (r, error_at == Some(i)) {
            (Err(_), true) => return,
            (Ok(_), true) => return e.fail(format!("{name}: reversed_step at t={ts} succeeded where MONAI raised")),
            (Err(err), false) => return e.fail(format!("{name}: reversed_step at t={ts} failed: {err:#}")),
            (Ok((next, x0)), false) => {
                let what = format!("{name} reversed_sample_{i} (t={ts})");
                e.record("reversed", &what, diff(&next, &t(&format!("reversed_sample_{i}"))));
                let what = format!("{name} reversed_pred_original_sample_{i}");
                e.record("reversed", &what, diff(&x0, &t(&format!("reversed_pred_original_sample_{i}"))));
                x = next;
            }
        }
    }
}

#[test]
fn schedulers_match_monai_and_generative() {
    tch::set_num_threads(1);
    let root = fixtures().join("schedulers");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("manifest.json")).unwrap()).unwrap();
    let cases = manifest.as_array().unwrap();
    assert!(cases.len() >= 60, "expected the full fixture set, found {} cases", cases.len());
    let (mut rows, mut failures) = (Vec::new(), Vec::new());
    for c in cases {
        let name = c["case"].as_str().unwrap();
        let io = StateDict::load(&root.join(c["file"].as_str().unwrap()), None).unwrap();
        let mut e = Errors::default();
        check_case(c, &io, &mut e);
        let cols: Vec<String> = e.cols.iter().map(|(k, v)| format!("{k} {v:.1e}")).collect();
        let status = if e.failures.is_empty() { "ok" } else { "FAIL" };
        rows.push(format!("{name:36} {:>3} steps  {status:4} max_abs_err: {}", c["num_steps"], cols.join("  ")));
        failures.extend(e.failures);
    }
    println!("{}", rows.join("\n"));
    assert!(failures.is_empty(), "parity failures:\n{}", failures.join("\n"));
}

// ---- golden values of the spec ----

fn cfg(json: serde_json::Value) -> SchedulerConfig {
    serde_json::from_value(json).unwrap()
}

/// Printed with 8 significant digits: within half a unit of the last digit.
fn assert_golden(what: &str, got: f32, want: f64) {
    let err = (f64::from(got) - want).abs();
    assert!(err <= 6e-8 * want.abs(), "{what}: got {got:e}, spec says {want:e}");
}

#[test]
fn golden_beta_schedules() {
    let lin = build(SchedulerKind::Ddpm, &SchedulerConfig::default()).unwrap();
    let ns = lin.noise_schedule();
    assert_golden("linear beta[0]", ns.beta_at(0).unwrap(), 9.9999997e-05);
    assert_golden("linear beta[999]", ns.beta_at(999).unwrap(), 0.02);
    assert_golden("linear alphas_cumprod[499]", ns.alpha_cumprod_at(499).unwrap(), 0.078587234);
    assert_golden("linear alphas_cumprod[999]", ns.alpha_cumprod_at(999).unwrap(), 4.0358304e-05);

    let c = cfg(serde_json::json!({"schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0195}));
    let s = build(SchedulerKind::Ddpm, &c).unwrap();
    assert_golden(
        "scaled_linear(0.0015, 0.0195) ac[499]",
        s.noise_schedule().alpha_cumprod_at(499).unwrap(),
        0.11584447,
    );
    assert_golden(
        "scaled_linear(0.0015, 0.0195) ac[999]",
        s.noise_schedule().alpha_cumprod_at(999).unwrap(),
        1.4230386e-04,
    );

    let c = cfg(serde_json::json!({"schedule": "linear_beta", "beta_start": 0.0015, "beta_end": 0.0195}));
    let s = build(SchedulerKind::Ddpm, &c).unwrap();
    assert_golden("linear(0.0015, 0.0195) ac[999]", s.noise_schedule().alpha_cumprod_at(999).unwrap(), 2.5692019e-05);

    // reference-repo.md §4: the sampling schedule of the reference repo.
    let c = cfg(serde_json::json!({"schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0205}));
    let s = build(SchedulerKind::Ddim, &c).unwrap();
    let ns = s.noise_schedule();
    for (t, beta, ac) in [
        (0, 1.5000001e-3, 0.99849999),
        (499, 8.2631279e-3, 0.10857603),
        (995, 2.0380415e-2, 1.0526287e-4),
        (999, 2.0500001e-2, 9.6910881e-5),
    ] {
        assert_golden(&format!("scaled_linear(0.0015, 0.0205) beta[{t}]"), ns.beta_at(t).unwrap(), beta);
        assert_golden(&format!("scaled_linear(0.0015, 0.0205) ac[{t}]"), ns.alpha_cumprod_at(t).unwrap(), ac);
    }
}

/// The timestep lists the spec gives are monai-generative 0.2's ("leading" spacing), which the
/// reference repo ran; MONAI 1.6.1's linspace lists are checked against the fixtures.
#[test]
fn golden_timesteps_leading() {
    let reference = serde_json::json!({
        "schedule": "scaled_linear_beta", "num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0205,
        "prediction_type": "v_prediction", "clip_sample": false, "timestep_spacing": "leading"
    });
    let mut ddim = DdimScheduler::new(&cfg(reference)).unwrap();
    ddim.set_timesteps(200).unwrap();
    let want: Vec<i64> = (0..200).rev().map(|i| i * 5).collect();
    assert_eq!(ddim.timesteps(), want.as_slice(), "DDIM 200 steps: 995, 990, ..., 0");
    assert_eq!(ddim.timesteps()[0], 995);
    assert_eq!(ddim.final_alpha_cumprod(), 1.0, "set_alpha_to_one: alpha_prev at t=0 is 1");

    let leading = cfg(serde_json::json!({"timestep_spacing": "leading"}));
    let mut ddpm = DdpmScheduler::new(&leading).unwrap();
    let all: Vec<i64> = (0..1000).rev().collect();
    assert_eq!(ddpm.timesteps(), all.as_slice(), "DDPM before set_timesteps: T-1..0");
    assert_eq!(ddpm.num_inference_steps(), None);
    ddpm.set_timesteps(7).unwrap();
    assert_eq!(ddpm.timesteps(), &[852, 710, 568, 426, 284, 142, 0]);

    let mut ddim = DdimScheduler::new(&leading).unwrap();
    ddim.set_timesteps(10).unwrap();
    assert_eq!(ddim.timesteps(), &[900, 800, 700, 600, 500, 400, 300, 200, 100, 0]);
    let offset = cfg(serde_json::json!({"timestep_spacing": "leading", "steps_offset": 1}));
    let mut ddim = DdimScheduler::new(&offset).unwrap();
    ddim.set_timesteps(10).unwrap();
    assert_eq!(ddim.timesteps(), &[901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
}

#[test]
fn golden_pndm_prk_timesteps_and_strides() {
    let mut s = PndmScheduler::new(&SchedulerConfig::default()).unwrap();
    s.set_timesteps(10).unwrap();
    let want = [900, 850, 850, 800, 800, 750, 750, 700, 700, 650, 650, 600, 600, 500, 400, 300, 200, 100, 0];
    assert_eq!(s.timesteps(), &want);
    assert_eq!(s.num_inference_steps(), Some(19), "MONAI overwrites num_inference_steps with len(timesteps)");
    // The (t, prev) pairs the spec lists, at their positions; "..." entries are not checked.
    let spec: [(usize, (i64, i64)); 10] = [
        (0, (900, 874)),
        (1, (900, 850)),
        (2, (900, 824)),
        (3, (900, 800)),
        (4, (800, 774)),
        (11, (700, 600)),
        (12, (600, 548)),
        (13, (500, 448)),
        (17, (100, 48)),
        (18, (0, -52)),
    ];
    let x = Tensor::ones([1, 1, 2, 2], (Kind::Float, Device::Cpu));
    let mo = Tensor::zeros([1, 1, 2, 2], (Kind::Float, Device::Cpu));
    let timesteps = s.timesteps().to_vec();
    let mut pairs = Vec::new();
    for &t in &timesteps {
        let _ = s.step(&mo, t, &x).unwrap();
        pairs.push(s.last_step_indices().unwrap());
    }
    for (i, pair) in spec {
        assert_eq!(pairs[i], pair, "PNDM n=10 step {i}: (t, prev)");
    }
    // set_timesteps resets the multistep state.
    s.set_timesteps(10).unwrap();
    assert_eq!(s.counter(), 0);
    let _ = s.step(&mo, 900, &x).unwrap();
    assert_eq!(s.last_step_indices(), Some((900, 874)));
}

#[test]
fn per_scheduler_defaults_and_reference_config() {
    let d = SchedulerConfig::default();
    let ddim = DdimScheduler::new(&d).unwrap();
    assert_eq!(ddim.final_alpha_cumprod(), 1.0, "DDIM set_alpha_to_one defaults to True");
    assert_eq!(ddim.eta(), 0.0);
    assert_eq!(ddim.num_inference_steps(), Some(1000), "DDIM's constructor calls set_timesteps(T)");
    let pndm = PndmScheduler::new(&d).unwrap();
    let ac0 = pndm.noise_schedule().alpha_cumprod_at(0).unwrap();
    assert_eq!(pndm.final_alpha_cumprod(), ac0, "PNDM set_alpha_to_one defaults to False");
    let ddpm = DdpmScheduler::new(&d).unwrap();
    assert_eq!(ddpm.variance_type().as_str(), "fixed_small");
    // DDPM clips x0 to [-1, 1] by default: at t=999 this epsilon means x0 ~ 790, clipped to 1.
    let mut ddpm = ddpm;
    let x = Tensor::zeros([1, 1, 2, 2], (Kind::Float, Device::Cpu));
    let (_, x0) = ddpm.step(&(x.ones_like() * -5.0), 999, &x).unwrap();
    assert_eq!(f64::try_from(x0.unwrap().max()).unwrap(), 1.0);

    // The reference YAML's `scheduler:` section, key for key, builds every kind.
    let yaml_section = serde_json::json!({
        "schedule": "scaled_linear_beta", "num_train_timesteps": 1000,
        "beta_start": 0.0015, "beta_end": 0.0205, "prediction_type": "v_prediction"
    });
    let c = cfg(yaml_section);
    for kind in [SchedulerKind::Ddpm, SchedulerKind::Ddim, SchedulerKind::Pndm] {
        let s = build(kind, &c).unwrap();
        assert_eq!(s.kind(), kind);
        assert_eq!(s.num_train_timesteps(), 1000);
        assert_eq!(s.prediction_type().as_str(), "v_prediction");
    }
    for (s, k) in [("ddpm", SchedulerKind::Ddpm), ("DDIM", SchedulerKind::Ddim), ("pndm", SchedulerKind::Pndm)] {
        assert_eq!(s.parse::<SchedulerKind>().unwrap(), k);
    }
}

// ---- bad input ----

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn parse_err(json: serde_json::Value) -> String {
    serde_json::from_value::<SchedulerConfig>(json).map(|_| ()).unwrap_err().to_string()
}

fn assert_mentions(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} should mention {n:?}");
    }
}

#[test]
fn bad_config_is_refused_clearly() {
    assert_mentions(&parse_err(serde_json::json!({"schedule": "linear_beta", "beta_strat": 1e-4})), &["beta_strat"]);
    assert_mentions(&parse_err(serde_json::json!({"prediction_type": "eps"})), &["eps", "v_prediction"]);
    assert_mentions(&parse_err(serde_json::json!({"variance_type": "fixed"})), &["fixed", "fixed_small"]);
    assert_mentions(&parse_err(serde_json::json!({"schedule": "quadratic"})), &["quadratic"]);
    assert_mentions(
        &parse_err(serde_json::json!({"schedule": "cosine", "cosine_version": "v2"})),
        &["v2", "monai-1.5"],
    );
    assert_mentions(&err_of("euler".parse::<SchedulerKind>()), &["euler"]);

    let b = |kind, json| err_of(build(kind, &cfg(json)));
    assert_mentions(&b(SchedulerKind::Ddpm, serde_json::json!({"eta": 0.5})), &["eta", "ddpm"]);
    assert_mentions(&b(SchedulerKind::Pndm, serde_json::json!({"clip_sample": false})), &["clip_sample", "pndm"]);
    assert_mentions(&b(SchedulerKind::Ddim, serde_json::json!({"variance_type": "learned"})), &["variance_type"]);
    assert_mentions(&b(SchedulerKind::Pndm, serde_json::json!({"prediction_type": "sample"})), &["sample", "pndm"]);
    assert_mentions(
        &b(SchedulerKind::Ddpm, serde_json::json!({"schedule": "cosine", "beta_start": 1e-4})),
        &["beta_start", "cosine"],
    );
    assert_mentions(&b(SchedulerKind::Ddpm, serde_json::json!({"sig_range": 3.0})), &["sig_range"]);
    assert_mentions(&b(SchedulerKind::Ddpm, serde_json::json!({"num_train_timesteps": 0})), &["num_train_timesteps"]);
    assert_mentions(&b(SchedulerKind::Ddim, serde_json::json!({"steps_offset": 1000})), &["steps_offset", "1000"]);
    assert_mentions(&b(SchedulerKind::Pndm, serde_json::json!({"steps_offset": -1})), &["steps_offset", "-1"]);
    // PNDM's constructor runs set_timesteps(T): with Runge-Kutta steps T must be >= 4.
    assert_mentions(&b(SchedulerKind::Pndm, serde_json::json!({"num_train_timesteps": 3})), &["skip_prk_steps"]);
}

#[test]
fn bad_calls_are_refused_clearly() {
    let d = SchedulerConfig::default();
    let x = Tensor::zeros([2, 3, 4, 4], (Kind::Float, Device::Cpu));
    for kind in [SchedulerKind::Ddpm, SchedulerKind::Ddim, SchedulerKind::Pndm] {
        let mut s = build(kind, &d).unwrap();
        assert_mentions(&err_of(s.set_timesteps(1001)), &["1001", "1000"]);
        assert_mentions(&err_of(s.set_timesteps(0)), &["num_inference_steps"]);
        assert_mentions(&err_of(s.step(&x, 1000, &x)), &["timestep 1000", "out of range"]);
        assert_mentions(&err_of(s.step(&x, -1, &x)), &["timestep -1"]);
        let wrong = Tensor::zeros([2, 4, 4, 4], (Kind::Float, Device::Cpu));
        assert_mentions(&err_of(s.step(&wrong, 10, &x)), &["shape", "[2, 4, 4, 4]"]);

        let t_ok = Tensor::from_slice(&[1i64, 999]);
        assert!(s.add_noise(&x, &x, &t_ok).is_ok());
        let t_float = Tensor::from_slice(&[1.0f32, 2.0]);
        assert_mentions(&err_of(s.add_noise(&x, &x, &t_float)), &["integer"]);
        assert_mentions(&err_of(s.add_noise(&x, &x, &Tensor::from_slice(&[1i64, 1000]))), &["timestep 1000"]);
        assert_mentions(&err_of(s.get_velocity(&x, &x, &Tensor::from_slice(&[-3i64, 5]))), &["timestep -3"]);
        assert_mentions(
            &err_of(s.add_noise(&x, &x, &Tensor::from_slice(&[1i64, 2, 3]))),
            &["3 timesteps", "batch of 2"],
        );
        let small = Tensor::zeros([2, 3, 4, 3], (Kind::Float, Device::Cpu));
        assert_mentions(&err_of(s.add_noise(&x, &small, &t_ok)), &["noise", "shape"]);
    }
    let mut pndm = PndmScheduler::new(&d).unwrap();
    assert_mentions(&err_of(pndm.set_timesteps(3)), &["3", "skip_prk_steps"]);

    // MONAI 1.6.1's inversion fails past the last training timestep; the legacy rule does not.
    let mut ddim = DdimScheduler::new(&d).unwrap();
    ddim.set_timesteps(10).unwrap();
    assert_mentions(&err_of(ddim.reversed_step(&x, 950, &x)), &["950", "past the last training timestep"]);
    assert!(ddim.reversed_step_legacy(&x, 950, &x).is_ok());
}
