//! DPM-Solver++ and UniPC parity with diffusers 0.42 on the cases of `tests/gen_multistep_fixtures.py`
//! (timesteps, sigmas, every step fed diffusers' inputs, and a whole loop with a deterministic network), diffusers'
//! timestep lists for every step count, and the error paths.
mod common;

use common::fixtures;
use medgen::checkpoint::StateDict;
use medgen::schedulers::{build, DpmSolverScheduler, Scheduler, SchedulerConfig, SchedulerKind, UniPcScheduler};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// The cases `gen_multistep_fixtures.py` writes: 3 (kind, order) x 2 schedules x 3 predictions x 3 spacings, plus 20.
const EXPECTED_CASES: usize = 74;
/// Step by step, on diffusers' own inputs (the same libtorch and op sequence: expected bit-identical).
const STEP_TOL: f64 = 1e-6;
/// The final sample of a whole loop, fed with medgen's own samples.
const LOOP_TOL: f64 = 1e-5;

fn root() -> PathBuf {
    fixtures().join("multistep")
}

fn manifest() -> Vec<serde_json::Value> {
    let path = root().join("manifest.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (run `make fixtures`)", path.display()));
    serde_json::from_str::<serde_json::Value>(&text).unwrap().as_array().unwrap().clone()
}

/// Max absolute difference; a shape mismatch or a NaN/inf on either side is an infinite error.
fn diff(got: &Tensor, want: &Tensor) -> f64 {
    if got.size() != want.size() {
        return f64::INFINITY;
    }
    let (g, w) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
    let d = f64::try_from((&g - &w).abs().max()).unwrap();
    if d.is_nan() || !bool::try_from(g.isfinite().all()).unwrap() {
        f64::INFINITY
    } else {
        d
    }
}

fn timesteps_of(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(&t.to_kind(Kind::Int64).reshape([-1])).unwrap()
}

/// The whole-loop "network" of the fixture: `0.9·x + 0.1·sin(x) + cos(t/1000)`, in the same op order.
fn toy_network(x: &Tensor, t: i64) -> Tensor {
    x * 0.9 + x.sin() * 0.1 + (t as f64 / 1000.0).cos()
}

fn sigmas_of(kind: SchedulerKind, cfg: &SchedulerConfig, n: usize) -> Vec<f32> {
    match kind {
        SchedulerKind::DpmSolver => {
            let mut s = DpmSolverScheduler::new(cfg).unwrap();
            s.set_timesteps(n).unwrap();
            s.sigmas().to_vec()
        }
        SchedulerKind::UniPc => {
            let mut s = UniPcScheduler::new(cfg).unwrap();
            s.set_timesteps(n).unwrap();
            s.sigmas().to_vec()
        }
        other => panic!("not a multistep kind: {other}"),
    }
}

#[derive(Default)]
struct Row {
    step: f64,
    x0: f64,
    loop_final: f64,
    loop_max: f64,
    failures: Vec<String>,
}

fn check_case(c: &serde_json::Value, io: &StateDict) -> Row {
    let name = c["case"].as_str().unwrap();
    let t = |k: &str| io.get(k).unwrap_or_else(|| panic!("{name}: fixture lacks {k}")).shallow_clone();
    let kind: SchedulerKind = c["kind"].as_str().unwrap().parse().unwrap();
    // The manifest's config goes through the same serde path as a user's config file.
    let cfg: SchedulerConfig =
        serde_json::from_value(c["config"].clone()).unwrap_or_else(|e| panic!("{name}: config does not parse: {e}"));
    let n = c["num_inference_steps"].as_u64().unwrap() as usize;
    let mut row = Row::default();

    let mut s = build(kind, &cfg).unwrap_or_else(|e| panic!("{name}: build failed: {e:#}"));
    assert_eq!(s.kind(), kind);
    s.set_timesteps(n).unwrap_or_else(|e| panic!("{name}: set_timesteps({n}) failed: {e:#}"));
    let want_ts = timesteps_of(&t("timesteps"));
    if s.timesteps() != want_ts.as_slice() {
        row.failures.push(format!("{name}: timesteps {:?} != diffusers' {want_ts:?}", s.timesteps()));
        return row;
    }
    assert_eq!(s.num_inference_steps(), Some(want_ts.len()));
    let sigmas = Tensor::from_slice(&sigmas_of(kind, &cfg, n));
    if !sigmas.equal(&t("sigmas")) {
        row.failures.push(format!("{name}: sigmas differ from diffusers' by {:e}", diff(&sigmas, &t("sigmas"))));
    }

    // Step by step: diffusers' sample and model output at every step.
    for (i, &ts) in want_ts.iter().enumerate() {
        let (prev, x0) = match s.step(&t(&format!("model_output_{i}")), ts, &t(&format!("sample_{i}"))) {
            Ok(r) => r,
            Err(e) => {
                row.failures.push(format!("{name}: step {i} (t={ts}) failed: {e:#}"));
                return row;
            }
        };
        let d = diff(&prev, &t(&format!("prev_sample_{i}")));
        row.step = row.step.max(d);
        if d > STEP_TOL {
            row.failures.push(format!("{name}: prev_sample_{i} (t={ts}) max abs error {d:e} > {STEP_TOL:e}"));
        }
        let d = diff(&x0.expect("the multistep samplers return x0"), &t(&format!("pred_original_sample_{i}")));
        row.x0 = row.x0.max(d);
        if d > STEP_TOL {
            row.failures.push(format!("{name}: pred_original_sample_{i} max abs error {d:e} > {STEP_TOL:e}"));
        }
    }

    // The whole loop, on medgen's own samples, as src/sampling.rs runs it.
    let mut s = build(kind, &cfg).unwrap();
    s.set_timesteps(n).unwrap();
    let mut x = t("traj_init");
    let timesteps = s.timesteps().to_vec();
    for (i, &ts) in timesteps.iter().enumerate() {
        x = match s.step(&toy_network(&x, ts), ts, &x) {
            Ok((prev, _)) => prev,
            Err(e) => {
                row.failures.push(format!("{name}: loop step {i} (t={ts}) failed: {e:#}"));
                return row;
            }
        };
        row.loop_max = row.loop_max.max(diff(&x, &t(&format!("traj_{i}"))));
    }
    row.loop_final = diff(&x, &t(&format!("traj_{}", timesteps.len() - 1)));
    if row.loop_final > LOOP_TOL {
        row.failures.push(format!("{name}: whole loop final sample max abs error {:e} > {LOOP_TOL:e}", row.loop_final));
    }
    row
}

#[test]
fn multistep_samplers_match_diffusers() {
    tch::set_num_threads(1);
    let cases = manifest();
    assert_eq!(cases.len(), EXPECTED_CASES, "expected the full fixture set");
    let (mut lines, mut failures) = (Vec::new(), Vec::new());
    let mut worst = Row::default();
    for c in &cases {
        let name = c["case"].as_str().unwrap();
        let io = StateDict::load(&root().join(c["file"].as_str().unwrap()), None).unwrap();
        let row = check_case(c, &io);
        let status = if row.failures.is_empty() { "ok" } else { "FAIL" };
        lines.push(format!(
            "{name:44} {:>4} steps {status:4} step {:.1e}  x0 {:.1e}  loop final {:.1e} (max over steps {:.1e})",
            c["num_steps"], row.step, row.x0, row.loop_final, row.loop_max
        ));
        worst.step = worst.step.max(row.step);
        worst.x0 = worst.x0.max(row.x0);
        worst.loop_final = worst.loop_final.max(row.loop_final);
        worst.loop_max = worst.loop_max.max(row.loop_max);
        failures.extend(row.failures);
    }
    println!("{}", lines.join("\n"));
    println!(
        "worst over {} cases: step {:e}  x0 {:e}  loop final {:e}  loop any step {:e}",
        cases.len(),
        worst.step,
        worst.x0,
        worst.loop_final,
        worst.loop_max
    );
    assert!(failures.is_empty(), "parity failures:\n{}", failures.join("\n"));
}

/// diffusers' timestep lists for every n in 1..=T: medgen gives the same list, or refuses the ones diffusers gets
/// wrong (n+1 timesteps ending at −1, repeated timesteps, timesteps past T−1), and says so.
#[test]
fn timesteps_match_diffusers_for_every_step_count() {
    let io = StateDict::load(&root().join("timestep_tables.safetensors"), None).unwrap();
    let mut report = Vec::new();
    for t_max in [1000i64, 50] {
        for (spacing, offset) in [("leading", 0i64), ("leading", 1), ("linspace", 0), ("trailing", 0)] {
            let key = format!("{t_max}_{spacing}_{offset}");
            let all = timesteps_of(io.get(&format!("ts_{key}")).unwrap_or_else(|| panic!("fixture lacks ts_{key}")));
            let lens = timesteps_of(io.get(&format!("len_{key}")).unwrap());
            assert_eq!(lens.len() as i64, t_max, "{key}: one list per n");
            let mut cfg = serde_json::json!({"num_train_timesteps": t_max, "timestep_spacing": spacing});
            if offset != 0 {
                cfg["steps_offset"] = offset.into();
            }
            let cfg: SchedulerConfig = serde_json::from_value(cfg).unwrap();
            let mut scheds: Vec<Box<dyn Scheduler>> =
                vec![build(SchedulerKind::DpmSolver, &cfg).unwrap(), build(SchedulerKind::UniPc, &cfg).unwrap()];
            let (mut start, mut refused) = (0usize, Vec::new());
            for (i, &len) in lens.iter().enumerate() {
                let n = i + 1;
                let want = &all[start..start + len as usize];
                start += len as usize;
                let sound = want.len() == n
                    && want.iter().all(|x| (0..t_max).contains(x))
                    && want.windows(2).all(|w| w[1] < w[0]);
                for s in scheds.iter_mut() {
                    match (s.set_timesteps(n), sound) {
                        (Ok(()), true) => assert_eq!(s.timesteps(), want, "{} {key} n={n}", s.kind()),
                        (Err(_), false) => {}
                        (Ok(()), false) => {
                            panic!("{} {key} n={n}: accepted diffusers' unsound list {want:?}", s.kind())
                        }
                        (Err(e), true) => panic!("{} {key} n={n}: refused diffusers' list {want:?}: {e:#}", s.kind()),
                    }
                }
                if !sound {
                    refused.push(n);
                }
            }
            assert_eq!(start, all.len(), "{key}: the lengths cover the table");
            report.push(format!(
                "T={t_max} {spacing} offset {offset}: {} lists equal, refused n = {refused:?}",
                t_max as usize - refused.len()
            ));
        }
    }
    println!("{}", report.join("\n"));
}

// ---- configuration ----

fn cfg(json: serde_json::Value) -> SchedulerConfig {
    serde_json::from_value(json).unwrap()
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_mentions(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} should mention {n:?}");
    }
}

#[test]
fn kind_strings() {
    for (s, k) in [
        ("dpm-solver++", SchedulerKind::DpmSolver),
        ("DPMSolver++", SchedulerKind::DpmSolver),
        ("dpm_solver", SchedulerKind::DpmSolver),
        ("dpm-solver", SchedulerKind::DpmSolver),
        ("DPMPP", SchedulerKind::DpmSolver),
        ("unipc", SchedulerKind::UniPc),
        ("UniPC", SchedulerKind::UniPc),
    ] {
        assert_eq!(s.parse::<SchedulerKind>().unwrap(), k, "{s}");
    }
    assert_eq!(SchedulerKind::DpmSolver.to_string(), "dpm-solver++");
    assert_eq!(SchedulerKind::UniPc.as_str(), "unipc");
    assert_eq!(serde_json::to_value(SchedulerKind::DpmSolver).unwrap(), "dpm-solver++");
    assert_eq!(serde_json::to_value(SchedulerKind::UniPc).unwrap(), "unipc");
    assert_eq!(serde_json::from_value::<SchedulerKind>("dpm-solver++".into()).unwrap(), SchedulerKind::DpmSolver);
    assert_eq!(serde_json::from_value::<SchedulerKind>("unipc".into()).unwrap(), SchedulerKind::UniPc);
    for alias in ["dpmsolver++", "dpm_solver", "dpm-solver", "dpmpp"] {
        assert_eq!(serde_json::from_value::<SchedulerKind>(alias.into()).unwrap(), SchedulerKind::DpmSolver);
    }
    assert_mentions(
        &err_of("euler".parse::<SchedulerKind>()),
        &["euler", "ddpm", "ddim", "pndm", "dpm-solver++", "unipc"],
    );
}

#[test]
fn defaults_are_diffusers_constructor_defaults() {
    for kind in [SchedulerKind::DpmSolver, SchedulerKind::UniPc] {
        let s = build(kind, &SchedulerConfig::default()).unwrap();
        assert_eq!(s.num_inference_steps(), None, "{kind}: None until set_timesteps, as diffusers");
        let all: Vec<i64> = (0..1000).rev().collect();
        assert_eq!(s.timesteps(), all.as_slice(), "{kind}: diffusers' constructor timesteps");
    }
    let d = DpmSolverScheduler::new(&SchedulerConfig::default()).unwrap();
    assert_eq!((d.solver_order(), d.lower_order_final()), (2, true));
    let u = UniPcScheduler::new(&SchedulerConfig::default()).unwrap();
    assert_eq!((u.solver_order(), u.lower_order_final()), (2, true));
    // diffusers' linspace: 999, then k·(999/10) rounded.
    let mut d = d;
    d.set_timesteps(10).unwrap();
    assert_eq!(d.timesteps(), &[999, 899, 799, 699, 599, 500, 400, 300, 200, 100]);
    assert_eq!(d.sigmas().len(), 11);
    assert_eq!(d.sigmas()[10], 0.0);
}

#[test]
fn fields_a_kind_does_not_take_are_refused() {
    let b = |kind, json| err_of(build(kind, &cfg(json)));
    use SchedulerKind::*;
    for kind in [DpmSolver, UniPc] {
        let k = kind.as_str();
        assert_mentions(&b(kind, serde_json::json!({"eta": 0.0})), &["eta", k]);
        assert_mentions(&b(kind, serde_json::json!({"clip_sample": false})), &["clip_sample", k]);
        assert_mentions(&b(kind, serde_json::json!({"set_alpha_to_one": true})), &["set_alpha_to_one", k]);
        assert_mentions(&b(kind, serde_json::json!({"variance_type": "fixed_small"})), &["variance_type", k]);
        assert_mentions(&b(kind, serde_json::json!({"noise_device": "cpu"})), &["noise_device", k]);
        assert_mentions(&b(kind, serde_json::json!({"skip_prk_steps": true})), &["skip_prk_steps", k]);
        assert_mentions(&b(kind, serde_json::json!({"solver_order": 3})), &["solver_order 3", k]);
        assert_mentions(&b(kind, serde_json::json!({"solver_order": 0})), &["solver_order 0", k]);
        // diffusers ignores steps_offset outside `leading`; medgen says so instead.
        assert_mentions(&b(kind, serde_json::json!({"steps_offset": 1})), &["steps_offset", "leading", "linspace"]);
        assert_mentions(
            &b(kind, serde_json::json!({"steps_offset": 2, "timestep_spacing": "trailing"})),
            &["steps_offset", "trailing"],
        );
        build(kind, &cfg(serde_json::json!({"steps_offset": 0, "timestep_spacing": "trailing"}))).unwrap();
    }
    // A config file is checked when it is read (config::scheduler_config), before any build.
    let order3 = cfg(serde_json::json!({"solver_order": 3}));
    assert_mentions(&err_of(order3.check_applies_to(DpmSolver)), &["solver_order 3", "dpm-solver++"]);
    // Unknown diffusers options are refused by name.
    let unknown = serde_json::from_value::<SchedulerConfig>(serde_json::json!({"use_karras_sigmas": true}));
    assert_mentions(&unknown.unwrap_err().to_string(), &["use_karras_sigmas"]);
    // The MONAI samplers refuse the diffusers-only spacing and fields.
    for kind in [Ddpm, Ddim] {
        assert_mentions(&b(kind, serde_json::json!({"timestep_spacing": "trailing"})), &["trailing", kind.as_str()]);
    }
    assert_mentions(&b(Pndm, serde_json::json!({"timestep_spacing": "trailing"})), &["timestep_spacing", "pndm"]);
    for kind in [Ddpm, Ddim, Pndm] {
        assert_mentions(&b(kind, serde_json::json!({"solver_order": 2})), &["solver_order", kind.as_str()]);
        assert_mentions(
            &b(kind, serde_json::json!({"lower_order_final": true})),
            &["lower_order_final", kind.as_str()],
        );
    }
    // UniPC at order 2 without lower_order_final would end in inf/NaN (diffusers does).
    assert_mentions(&b(UniPc, serde_json::json!({"lower_order_final": false})), &["lower_order_final", "inf"]);
    build(UniPc, &cfg(serde_json::json!({"lower_order_final": false, "solver_order": 1}))).unwrap();
    build(DpmSolver, &cfg(serde_json::json!({"lower_order_final": false}))).unwrap();
}

// ---- the run ----

fn ones(shape: &[i64]) -> Tensor {
    Tensor::ones(shape, (Kind::Float, Device::Cpu))
}

#[test]
fn step_counts_are_checked() {
    for kind in [SchedulerKind::DpmSolver, SchedulerKind::UniPc] {
        let mut s = build(kind, &SchedulerConfig::default()).unwrap();
        assert_mentions(&err_of(s.set_timesteps(1001)), &["1001", "1000"]);
        assert_mentions(&err_of(s.set_timesteps(0)), &["num_inference_steps", "0"]);
        // linspace with n = T repeats a timestep.
        assert_mentions(&err_of(s.set_timesteps(1000)), &["repeats timestep"]);
        let mut t = build(kind, &cfg(serde_json::json!({"timestep_spacing": "trailing"}))).unwrap();
        assert_mentions(&err_of(t.set_timesteps(61)), &["62 timesteps", "61 steps"]);
        let mut l = build(kind, &cfg(serde_json::json!({"timestep_spacing": "leading", "steps_offset": 1}))).unwrap();
        assert_mentions(&err_of(l.set_timesteps(999)), &["1000", "outside"]);
        // The legacy cosine has ᾱ[0] = 1: sigma 0 where the trailing spacing reaches timestep 0.
        let legacy = cfg(serde_json::json!({"schedule": "cosine", "cosine_version": "legacy",
                                             "num_train_timesteps": 50, "timestep_spacing": "trailing"}));
        let mut c = build(kind, &legacy).unwrap();
        assert_mentions(&err_of(c.set_timesteps(50)), &["timestep 0", "ᾱ"]);
        c.set_timesteps(10).unwrap();
    }
}

#[test]
fn timesteps_out_of_order_are_refused() {
    for kind in [SchedulerKind::DpmSolver, SchedulerKind::UniPc] {
        let mut s = build(kind, &SchedulerConfig::default()).unwrap();
        let x = ones(&[1, 2, 3, 3]);
        assert_mentions(&err_of(s.step(&x, 999, &x)), &["set_timesteps"]);
        s.set_timesteps(5).unwrap();
        let ts = s.timesteps().to_vec();
        assert_mentions(&err_of(s.step(&x, ts[1], &x)), &[&ts[1].to_string(), &ts[0].to_string(), "in order"]);
        let _ = s.step(&x, ts[0], &x).unwrap();
        // The same timestep again, or skipping one.
        assert_mentions(&err_of(s.step(&x, ts[0], &x)), &["step 1 of 5", &ts[1].to_string()]);
        assert_mentions(&err_of(s.step(&x, ts[2], &x)), &["step 1 of 5"]);
        // The run's shape is fixed; a mismatched model output is named.
        assert_mentions(
            &err_of(s.step(&ones(&[2, 2, 3, 3]), ts[1], &ones(&[2, 2, 3, 3]))),
            &["shape", "set_timesteps"],
        );
        assert_mentions(&err_of(s.step(&ones(&[1, 2, 3]), ts[1], &x)), &["model_output", "[1, 2, 3]", "[1, 2, 3, 3]"]);
        for &t in &ts[1..] {
            let _ = s.step(&x, t, &x).unwrap();
        }
        assert_mentions(&err_of(s.step(&x, 0, &x)), &["all 5 steps have run"]);
        // set_timesteps starts a new run.
        s.set_timesteps(5).unwrap();
        let _ = s.step(&x, ts[0], &x).unwrap();
    }
}

/// A bf16 model output (a network under autocast) is cast to the sample's float32 first: the step equals the one
/// fed the same values already in float32, and returns float32.
#[test]
fn half_precision_model_output_with_float_sample() {
    for kind in [SchedulerKind::DpmSolver, SchedulerKind::UniPc] {
        for pred in ["epsilon", "v_prediction", "sample"] {
            let c = cfg(serde_json::json!({"prediction_type": pred}));
            let (mut a, mut b) = (build(kind, &c).unwrap(), build(kind, &c).unwrap());
            a.set_timesteps(6).unwrap();
            b.set_timesteps(6).unwrap();
            tch::manual_seed(3);
            let mut xa = Tensor::randn([2, 3, 4, 4], (Kind::Float, Device::Cpu));
            let mut xb = xa.copy();
            for &t in &a.timesteps().to_vec() {
                let half = toy_network(&xa, t).to_kind(Kind::BFloat16);
                let (pa, x0) = a.step(&half, t, &xa).unwrap();
                let (pb, _) = b.step(&half.to_kind(Kind::Float), t, &xb).unwrap();
                assert_eq!(pa.kind(), Kind::Float, "{kind} {pred}: prev_sample stays float32");
                assert_eq!(x0.unwrap().kind(), Kind::Float);
                assert!(pa.equal(&pb), "{kind} {pred} t={t}: a bf16 output must act as its float32 value");
                (xa, xb) = (pa, pb);
            }
            assert!(bool::try_from(xa.isfinite().all()).unwrap());
        }
    }
}

/// A config file's `sampling` section selects the new kinds by name, and its bad values are refused when it is read,
/// naming the file.
#[test]
fn sampling_config_selects_the_multistep_kinds() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, sampling: serde_json::Value| {
        let path = tmp.path().join(name);
        std::fs::write(&path, serde_json::json!({ "sampling": sampling }).to_string()).unwrap();
        path
    };
    let ok = write(
        "dpm.json",
        serde_json::json!({"scheduler_kind": "dpmpp", "scheduler": {
            "schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0205,
            "prediction_type": "v_prediction", "timestep_spacing": "trailing", "solver_order": 2}}),
    );
    let (kind, c) = medgen::config::sampling_scheduler(&ok).unwrap();
    assert_eq!(kind, SchedulerKind::DpmSolver);
    let mut s = build(kind, &c).unwrap();
    s.set_timesteps(10).unwrap();
    assert_eq!(s.timesteps(), &[999, 899, 799, 699, 599, 499, 399, 299, 199, 99]);

    let bad = write("unipc.json", serde_json::json!({"scheduler_kind": "unipc", "scheduler": {"solver_order": 3}}));
    let msg = err_of(medgen::config::sampling_scheduler(&bad));
    assert_mentions(&msg, &["unipc.json", "solver_order 3"]);
    let bad = write(
        "ddim.json",
        serde_json::json!({"scheduler_kind": "ddim", "scheduler": {"timestep_spacing": "trailing"}}),
    );
    assert_mentions(&err_of(medgen::config::sampling_scheduler(&bad)), &["ddim.json", "trailing"]);
}
