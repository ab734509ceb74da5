//! Image-quality metric parity: SSIM and MS-SSIM (MONAI 1.6.1 and monai-generative 0.2.3), PSNR / MAE / MSE
//! (MONAI), the sample-diversity MS-SSIM (the reference's loop over ordered pairs) and numpy's mean / population
//! std, on the fixtures of `tests/gen_metric_fixtures.py` (read by medgen's own torch.save reader).
mod common;

use common::{fixtures, max_abs_diff};
use medgen::checkpoint::StateDict;
use medgen::metrics::regression::{mae, mse, psnr, MeanStd};
use medgen::metrics::ssim::{
    ms_ssim, ms_ssim_diversity, ms_ssim_pairwise, ssim, upper_triangle_mean, SsimConfig, MONAI_KERNEL_SIZE,
};
use serde_json::Value;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Absolute tolerance on every metric value. Both sides run one thread on the same libtorch with the same operation
/// order, so most comparisons are bit-exact; the tolerance is the task's bound, not slack for a different formula.
const TOL: f64 = 1e-6;

#[derive(Default)]
struct Table {
    rows: Vec<String>,
    failures: Vec<String>,
    worst: f64,
    exact: usize,
}

impl Table {
    fn check(&mut self, case: &str, what: &str, got: &Tensor, want: &Tensor) {
        if got.size() != want.size() {
            self.failures.push(format!("{case} {what}: shape {:?}, expected {:?}", got.size(), want.size()));
            return;
        }
        // Infinite PSNRs (identical images) must match as infinities.
        let same_inf = got.isinf().eq_tensor(&want.isinf()).all().int64_value(&[]) == 1;
        let finite = want.isfinite();
        let err = if same_inf {
            max_abs_diff(
                &got.where_self(&finite, &Tensor::zeros_like(got)),
                &want.where_self(&finite, &Tensor::zeros_like(want)),
            )
        } else {
            f64::INFINITY
        };
        let err = if got.isnan().any().int64_value(&[]) == 1 { f64::NAN } else { err };
        self.worst = self.worst.max(err);
        self.exact += usize::from(err == 0.0);
        self.rows.push(format!("{case:36} {what:22} max abs err {err:.3e}"));
        if err.is_nan() || err > TOL {
            self.failures
                .push(format!("{case} {what}: max abs error {err:e} > {TOL:e}\n  got  {got:?}\n  want {want:?}"));
        }
    }

    fn check_f64(&mut self, case: &str, what: &str, got: f64, want: f64) {
        self.check(case, what, &Tensor::from(got), &Tensor::from(want));
    }

    fn finish(self, title: &str) {
        println!("{title}\n{}", self.rows.join("\n"));
        let n = self.rows.len();
        println!("{title}: {n} comparisons, {} bit-exact, worst absolute error {:.3e}", self.exact, self.worst);
        assert!(n > 0, "{title}: nothing compared");
        assert!(self.failures.is_empty(), "{title} parity failures:\n{}", self.failures.join("\n"));
    }
}

struct Fixture {
    cases: Vec<Value>,
    tensors: StateDict,
}

impl Fixture {
    fn load() -> Self {
        let root = fixtures().join("metrics");
        let text = std::fs::read_to_string(root.join("manifest.json"))
            .unwrap_or_else(|e| panic!("{}: {e}", root.join("manifest.json").display()));
        let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
        let path = root.join("tensors.pt");
        let tensors = StateDict::load(&path, None).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        Self { cases, tensors }
    }

    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.cases.iter().filter(|c| c["kind"] == kind).collect()
    }

    fn get(&self, case: &str, what: &str) -> &Tensor {
        self.tensors.get(&format!("{case}/{what}")).unwrap_or_else(|| panic!("{case}: fixture lacks {what}"))
    }

    fn has(&self, case: &str, what: &str) -> bool {
        self.tensors.contains(&format!("{case}/{what}"))
    }
}

/// The case's MONAI constructor arguments as a config: absent arguments take MONAI's defaults, which differ from
/// [`SsimConfig::default`] (the reference's) in the kernel size only.
fn config(case: &Value) -> SsimConfig {
    let mut params = case["params"].clone();
    let obj = params.as_object_mut().unwrap();
    obj.entry("kernel_size").or_insert(Value::from(MONAI_KERNEL_SIZE));
    serde_json::from_value(params.clone()).unwrap_or_else(|e| panic!("{}: params {params}: {e}", case["name"]))
}

fn name(case: &Value) -> &str {
    case["name"].as_str().unwrap()
}

/// MONAI's `(B, 1)` outputs as `(B,)`.
fn flat(t: &Tensor) -> Tensor {
    assert_eq!(t.dim(), 2, "MONAI metric outputs are (B, 1), got {:?}", t.size());
    t.flatten(0, -1)
}

#[test]
fn ssim_ms_ssim_psnr_mae_mse_match_monai() {
    tch::set_num_threads(1);
    let fx = Fixture::load();
    let cases = fx.of_kind("pair");
    assert!(cases.len() >= 18, "expected the full fixture set, found {} pair cases", cases.len());
    let mut t = Table::default();
    let mut regression = 0;
    for c in cases {
        let case = name(c);
        let cfg = config(c);
        let (x, y) = (fx.get(case, "x"), fx.get(case, "y"));
        let got_ssim = ssim(x, y, &cfg).unwrap_or_else(|e| panic!("{case}: {e:#}"));
        let got_ms = ms_ssim(x, y, &cfg).unwrap_or_else(|e| panic!("{case}: {e:#}"));
        assert_eq!(got_ms.kind(), Kind::Float, "{case}: MONAI computes in float32 whatever the input");
        for lib in ["monai", "generative"] {
            t.check(case, &format!("ssim.{lib}"), &got_ssim, &flat(fx.get(case, &format!("ssim.{lib}"))));
            t.check(case, &format!("ms_ssim.{lib}"), &got_ms, &flat(fx.get(case, &format!("ms_ssim.{lib}"))));
        }
        // Symmetry, which the diversity shortcut relies on.
        t.check(case, "ms_ssim(y, x)", &ms_ssim(y, x, &cfg).unwrap(), &got_ms);
        if let Some(max_val) = c["psnr_max_val"].as_f64() {
            regression += 1;
            t.check(case, "psnr", &psnr(x, y, max_val).unwrap(), &flat(fx.get(case, "psnr")));
            t.check(case, "mae", &mae(x, y).unwrap(), &flat(fx.get(case, "mae")));
            t.check(case, "mse", &mse(x, y).unwrap(), &flat(fx.get(case, "mse")));
            assert_eq!(psnr(x, y, max_val).unwrap().kind(), x.kind(), "{case}: PSNR keeps the input dtype");
        }
    }
    assert!(regression >= 7, "expected the regression cases, found {regression}");
    t.finish("SSIM / MS-SSIM / PSNR / MAE / MSE vs MONAI");
}

#[test]
fn ms_ssim_size_check_fails_where_monai_does() {
    tch::set_num_threads(1);
    let fx = Fixture::load();
    let cases = fx.of_kind("size_error");
    assert!(cases.len() >= 3, "expected the size-error cases, found {}", cases.len());
    let mut t = Table::default();
    for c in cases {
        let case = name(c);
        let cfg = config(c);
        let (x, y) = (fx.get(case, "x"), fx.get(case, "y"));
        let err = ms_ssim(x, y, &cfg).expect_err(case).to_string();
        let size = x.size();
        println!("{case}: {err}\n  MONAI: {}", c["monai_error"]);
        assert!(
            err.contains(&format!("{}x{}", size[2], size[3])),
            "{case}: the error should name the image size {size:?}: {err}"
        );
        // The same rejection from the diversity path, before any work.
        let images = Tensor::cat(&[x, y], 0);
        assert!(ms_ssim_pairwise(&images, &cfg, None, &mut |_, _| {}).is_err(), "{case}: diversity accepted it");
        // Single-scale SSIM has no such check in MONAI.
        if fx.has(case, "ssim.generative") {
            t.check(case, "ssim.generative", &ssim(x, y, &cfg).unwrap(), &flat(fx.get(case, "ssim.generative")));
        }
    }
    // The reference's images pass with its kernel 7 and fail with MONAI's default 11.
    let x = Tensor::zeros([1, 1, 160, 224], (Kind::Float, Device::Cpu));
    assert!(ms_ssim(&x, &x, &SsimConfig::reference()).is_ok());
    assert!(ms_ssim(&x, &x, &SsimConfig::monai_default()).is_err());
    t.finish("SSIM on MS-SSIM-rejected sizes");
}

#[test]
fn bad_inputs_are_errors() {
    let opts = (Kind::Float, Device::Cpu);
    let a = Tensor::rand([2, 1, 160, 224], opts);
    let b = Tensor::rand([2, 1, 160, 220], opts);
    let cfg = SsimConfig::reference();
    for err in [ms_ssim(&a, &b, &cfg).unwrap_err(), ssim(&a, &b, &cfg).unwrap_err(), psnr(&a, &b, 1.0).unwrap_err()] {
        assert!(err.to_string().contains("224") && err.to_string().contains("220"), "{err}");
    }
    let three = Tensor::rand([2, 160, 224], opts);
    assert!(ms_ssim(&three, &three, &cfg).is_err());
    assert!(ssim(&a.narrow(2, 0, 5), &a.narrow(2, 0, 5), &cfg).is_err(), "window larger than the image");
    assert!(ms_ssim_pairwise(&a.narrow(0, 0, 1), &cfg, None, &mut |_, _| {}).is_err(), "one image has no pairs");
    let bad: Result<SsimConfig, _> = serde_json::from_str(r#"{"kernel_size": 7, "colour": 1}"#);
    assert!(bad.is_err(), "unknown arguments are rejected");
    let win: SsimConfig = serde_json::from_str(r#"{"win_size": [5, 7], "kernel_sigma": 1.0}"#).unwrap();
    assert_eq!(win.kernel_size.get(2), vec![5, 7]);
}

#[test]
fn diversity_matches_the_reference_pairwise_loop() {
    tch::set_num_threads(1);
    let fx = Fixture::load();
    let cases = fx.of_kind("diversity");
    assert!(cases.len() >= 2, "expected the diversity cases, found {}", cases.len());
    let mut t = Table::default();
    for c in cases {
        let case = name(c);
        let cfg = config(c);
        let images = fx.get(case, "images");
        let n = images.size()[0];
        let want = fx.get(case, "matrix");
        let off_diag = Tensor::eye(n, (Kind::Bool, Device::Cpu)).logical_not();
        for chunk in [None, Some(1), Some(4)] {
            let mut calls = 0;
            let mut last = (0, 0);
            let got = ms_ssim_pairwise(images, &cfg, chunk, &mut |done, total| {
                calls += 1;
                last = (done, total);
            })
            .unwrap();
            let total = (n * (n - 1) / 2) as usize;
            assert_eq!(last, (total, total), "{case}: progress ends at the pair count");
            assert!(calls >= n as usize - 1, "{case}: progress after every block");
            assert!(got.diagonal(0, 0, 1).isnan().all().int64_value(&[]) == 1, "{case}: NaN diagonal");
            let what = format!("pairs chunk {chunk:?}");
            t.check(case, &what, &got.masked_select(&off_diag), &want.masked_select(&off_diag));
            t.check_f64(
                case,
                &format!("mean chunk {chunk:?}"),
                upper_triangle_mean(&got).unwrap(),
                fx.get(case, "mean").double_value(&[]),
            );
        }
        t.check_f64(
            case,
            "ms_ssim_diversity",
            ms_ssim_diversity(images, &cfg).unwrap(),
            fx.get(case, "mean").double_value(&[]),
        );
        assert_eq!(c["pairs"].as_i64().unwrap(), n * (n - 1), "{case}: the reference's ordered pairs");
    }
    // Libtorch's own thread count must not move the values beyond the tolerance either.
    tch::set_num_threads(2);
    let c = fx.of_kind("diversity")[0];
    let case = name(c);
    t.check_f64(
        case,
        "2 threads",
        ms_ssim_diversity(fx.get(case, "images"), &config(c)).unwrap(),
        fx.get(case, "mean").double_value(&[]),
    );
    t.finish("MS-SSIM diversity vs the reference's loop");
}

/// Smooth random images: a few Gaussian bumps each, so that pairs have a spread of MS-SSIM values.
fn bumps(n: i64, c: i64, h: i64, w: i64) -> Tensor {
    let opts = (Kind::Float, Device::Cpu);
    let yy = Tensor::linspace(-1.0, 1.0, h, opts).view([1, 1, h, 1]);
    let xx = Tensor::linspace(-1.0, 1.0, w, opts).view([1, 1, 1, w]);
    let mut img = Tensor::zeros([n, c, h, w], opts);
    for _ in 0..5 {
        let p = Tensor::rand([4, n, c, 1, 1], opts);
        let (cy, cx, s, a) = (p.get(0) * 1.6 - 0.8, p.get(1) * 1.6 - 0.8, p.get(2) * 0.3 + 0.05, p.get(3));
        let d2 = (&yy - cy).square() + (&xx - cx).square();
        img += a * (-d2 / (s.square() * 2.0)).exp();
    }
    (img + Tensor::rand([n, c, h, w], opts) * 0.05).clamp(0.0, 1.0)
}

#[test]
fn diversity_equals_the_explicit_pairwise_mean() {
    tch::manual_seed(7);
    for (images, cfg) in [
        (bumps(6, 1, 160, 224), SsimConfig::reference()),
        (bumps(5, 2, 64, 80), SsimConfig { weights: vec![0.2, 0.3, 0.5], ..SsimConfig::reference() }),
    ] {
        let n = images.size()[0];
        // The reference's loop: every ordered pair i != j, one pair per call.
        let mut values = Vec::new();
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    let v = ms_ssim(&images.narrow(0, i, 1), &images.narrow(0, j, 1), &cfg).unwrap();
                    values.push(v.double_value(&[0]));
                }
            }
        }
        let want = values.iter().sum::<f64>() / values.len() as f64;
        let got = ms_ssim_diversity(&images, &cfg).unwrap();
        println!("diversity of {:?}: {got} vs explicit loop {want}, diff {:.3e}", images.size(), (got - want).abs());
        assert!((got - want).abs() <= TOL, "diversity {got} vs explicit pairwise mean {want}");
        let spread =
            values.iter().cloned().fold(f64::INFINITY, f64::min) < values.iter().cloned().fold(0.0, f64::max) - 0.01;
        assert!(spread, "test images should give a spread of values: {values:?}");
    }
}

#[test]
fn mean_std_matches_numpy() {
    let fx = Fixture::load();
    let cases = fx.of_kind("mean_std");
    assert!(cases.len() >= 5, "expected the mean/std cases, found {}", cases.len());
    let mut t = Table::default();
    for c in &cases {
        let case = name(c);
        let m = MeanStd::of_tensor(fx.get(case, "values")).unwrap();
        let (want_mean, want_std) = (fx.get(case, "mean").double_value(&[]), fx.get(case, "std").double_value(&[]));
        t.check_f64(case, "mean", m.mean, want_mean);
        t.check_f64(case, "std", m.std, want_std);
        // Relative agreement far below the absolute bound: the same summation order as numpy.
        assert!(
            (m.mean - want_mean).abs() <= 1e-14 * want_mean.abs().max(1.0),
            "{case}: mean {} vs {want_mean}",
            m.mean
        );
        assert!((m.std - want_std).abs() <= 1e-14 * want_std.abs().max(1.0), "{case}: std {} vs {want_std}", m.std);
        println!("{case}: {m} (numpy {})", c["report"]);
        assert_eq!(m.to_string(), c["report"].as_str().unwrap(), "{case}: the reference's printed line");
    }
    t.finish("MeanStd vs numpy");
}

/// Not a parity check: how long the diversity of 200 reference-sized images takes here (`--ignored`; libtorch's
/// thread count from `MEDGEN_TIMING_THREADS`, else its default; pairs per block from `MEDGEN_TIMING_CHUNK`, else
/// the default).
#[test]
#[ignore]
fn diversity_timing_200_images() {
    if let Some(n) = std::env::var("MEDGEN_TIMING_THREADS").ok().and_then(|v| v.parse().ok()) {
        tch::set_num_threads(n);
    }
    tch::manual_seed(3);
    let images = bumps(200, 1, 160, 224);
    let start = Instant::now();
    let chunk = std::env::var("MEDGEN_TIMING_CHUNK").ok().and_then(|v| v.parse().ok());
    let matrix = ms_ssim_pairwise(&images, &SsimConfig::reference(), chunk, &mut |_, _| {}).unwrap();
    let v = upper_triangle_mean(&matrix).unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "200 images (19900 pairs) of 160x224: diversity {v:.6} in {secs:.1}s ({:.2} ms/pair) with {} threads, chunk {chunk:?}",
        secs / 19900.0 * 1e3,
        tch::get_num_threads()
    );
}
