//! `medgen sample flair-to-t1w` on NIfTI volumes (docs/volumes.md), with tiny randomly initialised models:
//! the output keeps the input's geometry (checked with nibabel), slice i equals the PNG path's slice i bit for
//! bit after the PNG's quantisation, zero outside the translated slices and the crop, the crop recorded by
//! training is the default, and every bad volume is one clear error with no output file.
mod common;

use common::run::{configs, medgen, ok, s};
use medgen::checkpoint::{Generation, StateDict};
use medgen::io::volume::read_volume;
use medgen::nets::{AutoencoderKL, ControlNet, DiffusionModelUNet};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::{nn::VarStore, Device};

const CROP: &str = "4:36,2:34";
const SLICES: &str = "3:9";
const SHAPE: [usize; 3] = [40, 36, 12];

fn python() -> PathBuf {
    let p = PathBuf::from(
        std::env::var_os("MEDGEN_VENV_PYTHON").expect("MEDGEN_VENV_PYTHON is not set (make test sets it)"),
    );
    assert!(p.is_file(), "{} missing: run `make setup`", p.display());
    p
}

fn script(args: &[&str]) -> Output {
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/volume_headers.py");
    Command::new(python()).arg(helper).args(args).output().expect("python runs")
}

/// `cfg` with `"sampling": {...}` added at the top level.
fn with_sampling(cfg: &Path, out: &Path, sampling: &str) {
    let text = std::fs::read_to_string(cfg).unwrap();
    let text = text.trim_end().strip_suffix('}').unwrap().to_string() + &format!(r#", "sampling": {sampling}}}"#);
    std::fs::write(out, text).unwrap();
}

/// The randomly initialised weights of a model, with `meta` in the safetensors header.
fn save_weights(vs: &VarStore, path: &Path, meta: &BTreeMap<String, String>) {
    let mut vars = vs.variables().into_iter().collect::<Vec<_>>();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut sd = StateDict::new();
    for (k, v) in vars {
        sd.insert(k, v.detach());
    }
    sd.save_safetensors(path, meta).unwrap();
}

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    /// Model arguments without the crop recorded.
    models: Vec<String>,
    /// The same models, the ControlNet weights recording CROP and SLICES as training would.
    models_recorded: Vec<String>,
    flair: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_path_buf();
    let o = script(&["write", s(&d)]);
    assert!(o.status.success(), "volume_headers.py write: {}", String::from_utf8_lossy(&o.stderr));
    let [aekl_cfg, ldm_base, cn_base] = configs(&d, 1);
    let (ldm_cfg, cn_cfg) = (d.join("ldm_sampling.json"), d.join("cn_sampling.json"));
    with_sampling(&ldm_base, &ldm_cfg, r#"{"num_inference_steps": 2}"#);
    with_sampling(&cn_base, &cn_cfg, r#"{"num_inference_steps": 2}"#);
    let (aekl_w, ldm_w, cn_w, cn_rec) = (
        d.join("aekl.safetensors"),
        d.join("ldm.safetensors"),
        d.join("cn.safetensors"),
        d.join("cn_recorded.safetensors"),
    );
    tch::manual_seed(11);
    let none = BTreeMap::new();
    let vs = VarStore::new(Device::Cpu);
    AutoencoderKL::new(&vs.root(), &medgen::config::aekl_config(&aekl_cfg).unwrap(), Generation::Monai).unwrap();
    save_weights(&vs, &aekl_w, &none);
    let vs = VarStore::new(Device::Cpu);
    DiffusionModelUNet::new(&vs.root(), &medgen::config::unet_config(&ldm_cfg).unwrap(), Generation::Monai).unwrap();
    save_weights(&vs, &ldm_w, &none);
    let vs = VarStore::new(Device::Cpu);
    ControlNet::new(&vs.root(), &medgen::config::controlnet_config(&cn_cfg).unwrap(), Generation::Monai).unwrap();
    save_weights(&vs, &cn_w, &none);
    let recorded: BTreeMap<String, String> = [("medgen.crop", CROP), ("medgen.slices", SLICES)]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    save_weights(&vs, &cn_rec, &recorded);
    let args = |cn: &Path| -> Vec<String> {
        [
            "--device",
            "cpu",
            "--scale-factor",
            "1",
            "--stage1-config",
            s(&aekl_cfg),
            "--stage1-weights",
            s(&aekl_w),
            "--ldm-config",
            s(&ldm_cfg),
            "--ldm-weights",
            s(&ldm_w),
            "--controlnet-config",
            s(&cn_cfg),
            "--controlnet-weights",
            s(cn),
            "--seed",
            "3",
            "--batch-size",
            "4",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let flair = d.join("bids/sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii.gz");
    Setup { models: args(&cn_w), models_recorded: args(&cn_rec), flair, dir: d, _tmp: tmp }
}

fn sample(models: &[String], input: &Path, output: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&str> = vec!["sample", "flair-to-t1w", "--input", s(input), "--output", s(output)];
    args.extend(models.iter().map(String::as_str));
    args.extend(extra);
    medgen(&args)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Exit 1 and one `error:` line holding every one of `expect`.
fn assert_error(o: &Output, expect: &[&str]) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "want exit 1:\n{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "want one error line:\n{err}");
    for e in expect {
        assert!(errors[0].contains(e), "the error line does not mention {e:?}:\n{err}");
    }
    err
}

#[test]
fn a_volume_translates_as_its_png_slices_do_and_keeps_its_header() {
    let t = setup();
    let d = &t.dir;
    // The PNG path: preprocess the same pair with the same crop, then translate the list.
    let png = d.join("png");
    ok(medgen(&[
        "preprocess",
        "--input",
        s(&d.join("bids")),
        "--output",
        s(&png),
        "--crop",
        CROP,
        "--slices",
        SLICES,
        "--split",
        "0,0",
    ]));
    let from_pngs = d.join("from_pngs");
    ok(sample(&t.models, &png.join("test.tsv"), &from_pngs, &[]));

    // The volume path, crop and slices given (the weights record none).
    let out = d.join("vol/t1w.nii.gz");
    let log = ok(sample(&t.models, &t.flair, &out, &["--crop", CROP, "--slices", SLICES]));
    assert!(!log.contains("record no training crop"), "a fallback note with --crop and --slices given:\n{log}");
    let v = read_volume(&out).unwrap();
    assert_eq!(v.dims(), SHAPE);
    let mut inside_nonzero = 0;
    for ((i, j, k), &x) in v.data.indexed_iter() {
        let inside = (4..36).contains(&i) && (2..34).contains(&j) && (3..9).contains(&k);
        if !inside {
            assert_eq!(x, 0.0, "voxel {:?} outside the crop and slices is {x}", (i, j, k));
        } else if x > 0.0 {
            inside_nonzero += 1;
        }
    }
    assert!(inside_nonzero > 1000, "only {inside_nonzero} translated voxels are non-zero: a vacuous comparison");
    let mut levels = std::collections::BTreeSet::new();
    for slice in 0..6usize {
        let name = format!("sub-01_ses-1_slice-{slice}_T1w.png");
        let img = image::open(from_pngs.join(&name)).unwrap().into_luma8();
        assert_eq!(img.dimensions(), (32, 32));
        for (c, r, p) in img.enumerate_pixels() {
            let x = v.data[[4 + r as usize, 2 + c as usize, 3 + slice]] as f32;
            // The PNG path's quantisation of the same float32 image (`save_png`).
            let q = (x * 255.0) as u8;
            assert_eq!(q, p[0], "slice {slice} pixel (row {r}, col {c}): volume {x} -> {q}, PNG {}", p[0]);
            levels.insert(q);
        }
    }
    assert!(levels.len() > 20, "only {} grey levels: a vacuous comparison", levels.len());

    // The geometry, per nibabel.
    let o = script(&["compare", s(&t.flair), s(&out)]);
    assert!(
        o.status.success(),
        "header check:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    // The crop recorded in the weights is the default: the same volume, bit for bit.
    let recorded = d.join("vol/recorded.nii.gz");
    let log = ok(sample(&t.models_recorded, &t.flair, &recorded, &[]));
    assert!(!log.contains("record no training crop"), "{log}");
    assert!(read_volume(&recorded).unwrap().data == v.data, "the recorded crop's translation differs");

    // No record and no --crop: the reference's crop, said on stderr, too large for this volume.
    let fallback = d.join("vol/fallback.nii.gz");
    let o = sample(&t.models, &t.flair, &fallback, &[]);
    let err = assert_error(&o, &["sub-01_ses-1_FLAIR.nii.gz", "[40, 36, 12]", "[176, 240, 171]"]);
    assert!(err.contains("record no training crop") && err.contains("16:176"), "{err}");
    assert!(!fallback.exists());
}

#[test]
fn bad_volumes_are_one_clear_error_and_write_nothing() {
    let t = setup();
    let bad = t.dir.join("bad");
    let crop = ["--crop", CROP, "--slices", SLICES];
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("junk.nii.gz", &crop, &["junk.nii.gz", "NIfTI"]),
        ("truncated.nii.gz", &crop, &["truncated.nii.gz"]),
        ("flat.nii.gz", &crop, &["flat.nii.gz", "3-D", "[40, 36]"]),
        ("two_volumes.nii.gz", &crop, &["two_volumes.nii.gz", "3-D", "[40, 36, 12, 2]"]),
        ("nan.nii.gz", &crop, &["nan.nii.gz", "non-finite"]),
        ("constant.nii.gz", &crop, &["constant.nii.gz", "constant"]),
        ("small.nii.gz", &crop, &["small.nii.gz", "[20, 36, 12]", "[36, 34, 9]"]),
        (
            "one_of_4d.nii.gz",
            &["--crop", CROP, "--slices", "3:20"],
            &["one_of_4d.nii.gz", "[40, 36, 12]", "[36, 34, 20]"],
        ),
        ("missing.nii.gz", &crop, &["missing.nii.gz"]),
    ];
    let out_dir = t.dir.join("out");
    for (name, extra, expect) in cases {
        let out = out_dir.join(name);
        let o = sample(&t.models, &bad.join(name), &out, extra);
        assert_error(&o, expect);
        assert!(files_under(&out_dir).is_empty(), "{name}: files left: {:?}", files_under(&out_dir));
    }
    // A crop the autoencoder cannot take, options for the other mode.
    let out = out_dir.join("x.nii.gz");
    assert_error(
        &sample(&t.models, &t.flair, &out, &["--crop", "4:35,2:34", "--slices", SLICES]),
        &["31x32", "multiples of 2"],
    );
    assert_error(&sample(&t.models, &t.flair, &out, &["--rows", "0"]), &["--rows"]);
    assert_error(&sample(&t.models, &t.flair, &t.dir.join("x.png"), &crop), &["x.png", ".nii"]);
    assert!(files_under(&out_dir).is_empty());

    // A folder: the good volume (a 4-D file holding one volume) is translated, each bad one reported, exit 1.
    let folder_out = t.dir.join("folder_out");
    let o = sample(&t.models, &bad, &folder_out, &crop);
    let err = assert_error(&o, &["7 of 8 volumes", s(&bad)]);
    for (name, _, _) in &cases[..7] {
        assert!(err.lines().any(|l| l.starts_with("skipped ") && l.contains(name)), "{name} not reported:\n{err}");
    }
    let written: Vec<PathBuf> = files_under(&folder_out);
    assert_eq!(written, vec![folder_out.join("one_of_4d.nii.gz")], "{err}");
    // The same voxels as the 3-D file they came from.
    let single = t.dir.join("single.nii.gz");
    ok(sample(&t.models, &t.flair, &single, &crop));
    assert!(read_volume(&single).unwrap().data == read_volume(&written[0]).unwrap().data);
}

#[test]
fn preprocess_reports_uniform_slices_of_a_wide_range() {
    let t = setup();
    let png = t.dir.join("png_blank");
    let log = ok(medgen(&[
        "preprocess",
        "--input",
        s(&t.dir.join("bids_blank")),
        "--output",
        s(&png),
        "--crop",
        CROP,
        "--slices",
        "3:12",
        "--split",
        "1,0",
    ]));
    assert!(log.contains("note: 4 slice pairs in 1 volumes are uniform"), "{log}");
    let sum: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(png.join("preprocess_summary.json")).unwrap()).unwrap();
    assert_eq!(sum["counts"]["blank_slices"], 4, "{sum}");
    let blank = &sum["blank_slices"][0];
    assert!(blank["path"].as_str().unwrap().ends_with("sub-02_ses-1_T1w.nii.gz"), "{sum}");
    // Slices 8, 9, 10, 11 of the volume are zero: 5..9 of the PNGs, and they are still written and listed.
    assert_eq!(blank["slices"], serde_json::json!([5, 6, 7, 8]), "{sum}");
    assert_eq!(sum["counts"]["pngs_written"], 18);
}
