//! `medgen preprocess` against the reference scripts run in Python (`tests/gen_preprocess_fixtures.py`): the PNGs
//! (file set and decoded pixels), the lists (text, up to the output root), every bad case skipped with its reason,
//! `--resume`, `--split`, `--lists`, `--threads`, and the exit status when nothing is usable.
//!
//! PNG files are compared decoded, not byte for byte: PIL and the `image` crate deflate and filter differently, so
//! equal pixels give different bytes. What a reader sees is asserted: 8-bit grayscale, width x height, every pixel.
mod common;

use common::fixtures;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

const LISTS: [&str; 3] = ["train.tsv", "validation.tsv", "test.tsv"];
const SUMMARY: &str = "preprocess_summary.json";

fn root() -> PathBuf {
    fixtures().join("preprocess")
}

fn manifest_run(name: &str) -> Value {
    let path = root().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let manifest: Value = serde_json::from_str(&text).unwrap();
    manifest["runs"][name].clone()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

fn medgen(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medgen")).arg("preprocess").args(args).output().expect("medgen runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Runs a manifest case into `output`, with `extra` arguments after the case's own.
fn run_case(case: &Value, output: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["--input".to_string(), s(&root().join(case["input"].as_str().unwrap()))];
    args.extend(["--output".to_string(), s(output)]);
    args.extend(strings(&case["args"]));
    args.extend(extra.iter().map(|a| a.to_string()));
    medgen(&args)
}

fn ok(o: Output) -> String {
    let t = text(&o);
    assert!(o.status.success(), "medgen preprocess failed:\n{t}");
    t
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn summary(dir: &Path) -> Value {
    let path = dir.join(SUMMARY);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// Every file under `dir`, relative to it.
fn files(dir: &Path) -> BTreeSet<PathBuf> {
    fn walk(dir: &Path, base: &Path, out: &mut BTreeSet<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, base, out);
            } else {
                out.insert(p.strip_prefix(base).unwrap().to_path_buf());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// The output's PNG tree equals the reference's: the same files (nothing else left behind, no temporary files) and
/// the same decoded pixels. Returns how many files also happen to be byte-identical.
fn assert_pngs(expected: &Path, got: &Path) -> usize {
    let want = files(expected);
    let mut have = files(got);
    for f in LISTS.iter().chain([&SUMMARY]) {
        have.remove(Path::new(f));
    }
    assert_eq!(have, want, "PNG file sets differ ({} vs {})", got.display(), expected.display());
    let mut same_bytes = 0;
    for rel in &want {
        let (a, b) = (expected.join(rel), got.join(rel));
        let ref_img = image::open(&a).unwrap_or_else(|e| panic!("{}: {e}", a.display()));
        let img = image::open(&b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
        assert_eq!(ref_img.color(), image::ColorType::L8, "{}", a.display());
        assert_eq!(img.color(), image::ColorType::L8, "{}: not 8-bit grayscale", b.display());
        assert_eq!((img.width(), img.height()), (ref_img.width(), ref_img.height()), "{}: size", b.display());
        let (p, q) = (img.as_bytes(), ref_img.as_bytes());
        let diff = p.iter().zip(q).filter(|(x, y)| x != y).count();
        assert_eq!(diff, 0, "{}: {diff} of {} pixels differ from the reference", b.display(), p.len());
        same_bytes += usize::from(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
    }
    same_bytes
}

/// The lists equal the reference's, with its `@ROOT@` standing for the absolute output directory.
fn assert_lists(expected: &Path, got: &Path, output: &Path) {
    let root = s(&std::path::absolute(output).unwrap());
    for f in LISTS {
        let want = std::fs::read_to_string(expected.join(f)).unwrap().replace("@ROOT@", &root);
        let have = std::fs::read_to_string(got.join(f)).unwrap_or_else(|e| panic!("{}: {e}", got.join(f).display()));
        assert_eq!(have, want, "{f} differs from the reference's");
    }
}

/// Each T1w file's fate in the summary (processed, resumed, or skipped with the right kind and a reason naming a
/// file) equals the manifest's; paths relative to the input.
fn assert_fates(sum: &Value, case: &Value, resumed_as_processed: bool) {
    let input = PathBuf::from(sum["input"].as_str().unwrap());
    assert!(input.is_absolute());
    let rel = |p: &Value| {
        let p = Path::new(p.as_str().unwrap());
        s(p.strip_prefix(&input).unwrap_or_else(|_| panic!("{} is not under {}", p.display(), input.display())))
    };
    let mut got = BTreeMap::new();
    for p in sum["processed"].as_array().unwrap() {
        got.insert(rel(p), "processed".to_string());
    }
    for p in sum["resumed"].as_array().unwrap() {
        got.insert(rel(p), if resumed_as_processed { "processed" } else { "resumed" }.to_string());
    }
    for skip in sum["skipped"].as_array().unwrap() {
        let reason = skip["reason"].as_str().unwrap();
        assert!(!reason.is_empty(), "{skip}");
        got.insert(rel(&skip["path"]), skip["kind"].as_str().unwrap().to_string());
    }
    let want: BTreeMap<String, String> =
        case["fates"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect();
    assert_eq!(got, want, "fates differ from the manifest's");
    let counts = &sum["counts"];
    assert_eq!(counts["found"].as_u64().unwrap() as usize, want.len());
    let skipped = want.values().filter(|v| *v != "processed").count();
    assert_eq!(counts["skipped"].as_u64().unwrap() as usize, skipped);
}

/// The lists' sizes in the summary equal the reference's.
fn assert_sizes(sum: &Value, case: &Value) {
    let lists = sum["lists"].as_array().expect("lists in the summary");
    for (list, name) in lists.iter().zip(["train", "validation", "test"]) {
        let want = &case["sizes"][name];
        assert_eq!(list["subjects"], want["subjects"], "{name} subjects");
        assert_eq!(list["rows"], want["rows"], "{name} rows");
        assert_eq!(list["missing_flair"], 0, "{name}");
    }
}

#[test]
fn default_crop_matches_the_reference() {
    let case = manifest_run("default");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("png");
    let log = ok(run_case(&case, &out, &[]));
    assert!(log.contains("volumes/s"), "{log}");
    let same = assert_pngs(&root().join(case["png"].as_str().unwrap()), &out);
    println!("default crop: all PNGs decode to the reference's pixels ({same} also byte-identical)");
    assert_lists(&root().join(case["lists"].as_str().unwrap()), &out, &out);
    let sum = summary(&out);
    assert_fates(&sum, &case, false);
    assert_sizes(&sum, &case);
    assert_eq!(sum["counts"]["pngs_written"], 30);
    assert!(sum["volumes_per_second"].as_f64().unwrap() > 0.0);
    // The reasons name what is wrong.
    let reasons: Vec<String> =
        sum["skipped"].as_array().unwrap().iter().map(|s| s["reason"].as_str().unwrap().to_string()).collect();
    for needle in ["sub-08_ses-01_FLAIR.nii.gz", "[100, 100, 168]", "[176, 240, 172]", "needs at least [176, 240, 171]"]
    {
        assert!(reasons.iter().any(|r| r.contains(needle)), "no reason mentions {needle}: {reasons:#?}");
    }
}

#[test]
fn custom_crop_with_split_counts() {
    let case = manifest_run("custom_counts");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("png");
    ok(run_case(&case, &out, &["--threads", "1"]));
    assert_pngs(&root().join(case["png"].as_str().unwrap()), &out);
    assert_lists(&root().join(case["lists"].as_str().unwrap()), &out, &out);
    let sum = summary(&out);
    assert_fates(&sum, &case, false);
    assert_sizes(&sum, &case);
    assert_eq!(sum["threads"], 1);
}

/// Fractions, a separate lists directory, and more threads than volumes per core.
#[test]
fn custom_crop_with_split_fractions_and_lists_dir() {
    let case = manifest_run("custom_fractions");
    let tmp = tempfile::tempdir().unwrap();
    let (out, lists) = (tmp.path().join("png"), tmp.path().join("ids"));
    ok(run_case(&case, &out, &["--threads", "3", "--lists", &s(&lists)]));
    assert_pngs(&root().join(case["png"].as_str().unwrap()), &out);
    assert_lists(&root().join(case["lists"].as_str().unwrap()), &lists, &out);
    for f in LISTS.iter().chain([&SUMMARY]) {
        assert!(!out.join(f).exists(), "{f} written to the output instead of --lists");
    }
    let sum = summary(&lists);
    assert_fates(&sum, &case, false);
    assert_sizes(&sum, &case);
    assert_eq!(sum["threads"], 3);
}

/// A lists directory inside the output is not taken for a subject.
#[test]
fn lists_dir_inside_the_output_is_not_a_subject() {
    let case = manifest_run("custom_counts");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("png");
    let lists = out.join("lists");
    ok(run_case(&case, &out, &["--lists", &s(&lists)]));
    assert_lists(&root().join(case["lists"].as_str().unwrap()), &lists, &out);
}

fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, SystemTime)> {
    files(dir)
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "png"))
        .map(|f| {
            let p = dir.join(&f);
            let m = std::fs::metadata(&p).unwrap().modified().unwrap();
            (f, (std::fs::read(&p).unwrap(), m))
        })
        .collect()
}

#[test]
fn resume_skips_finished_volumes_and_redoes_incomplete_ones() {
    let case = manifest_run("custom_counts");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("png");
    ok(run_case(&case, &out, &[]));
    let first = summary(&out);
    let processed = first["counts"]["processed"].as_u64().unwrap();
    assert!(processed > 0);
    let before = snapshot(&out);

    // Everything done: nothing is read or written, every volume counts as done, the lists are the same.
    let log = ok(run_case(&case, &out, &["--resume"]));
    let second = summary(&out);
    assert_eq!(second["counts"]["processed"], 0, "{log}");
    assert_eq!(second["counts"]["resumed"].as_u64().unwrap(), processed);
    assert_eq!(second["counts"]["pngs_written"], 0);
    assert_eq!(second["resumed"], first["processed"]);
    assert_fates(&second, &case, true);
    assert!(snapshot(&out) == before, "--resume rewrote finished PNGs");
    assert_lists(&root().join(case["lists"].as_str().unwrap()), &out, &out);

    // One slice missing: that volume alone is done again, and its PNGs come back the same.
    let victim = before.keys().find(|k| k.to_str().unwrap().contains("sub-02_ses-1_slice-7_FLAIR")).unwrap().clone();
    std::fs::remove_file(out.join(&victim)).unwrap();
    ok(run_case(&case, &out, &["--resume"]));
    let third = summary(&out);
    let redone = strings(&third["processed"]);
    assert_eq!(redone.len(), 1, "{redone:?}");
    assert!(redone[0].ends_with("sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz"), "{redone:?}");
    assert_eq!(third["counts"]["resumed"].as_u64().unwrap(), processed - 1);
    let after = snapshot(&out);
    assert_eq!(after.keys().collect::<Vec<_>>(), before.keys().collect::<Vec<_>>());
    for (f, (bytes, _)) in &after {
        assert!(*bytes == before[f].0, "{} changed", f.display());
    }
    assert_pngs(&root().join(case["png"].as_str().unwrap()), &out);

    // Without --resume everything is done again.
    ok(run_case(&case, &out, &[]));
    assert_eq!(summary(&out)["counts"]["processed"].as_u64().unwrap(), processed);
}

#[test]
fn nothing_usable_exits_non_zero_with_a_summary() {
    let case = manifest_run("nothing");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("png");
    let o = run_case(&case, &out, &[]);
    let t = text(&o);
    assert!(!o.status.success(), "exit status 0 with nothing usable:\n{t}");
    assert!(t.contains("nothing usable"), "{t}");
    let sum = summary(&out);
    assert_fates(&sum, &case, false);
    assert!(sum["lists"].is_null());
    for f in LISTS {
        assert!(!out.join(f).exists(), "{f} written although nothing was usable");
    }

    // An empty input is no better.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = medgen(&["--input".into(), s(&empty), "--output".into(), s(&tmp.path().join("out2"))]);
    assert!(!o.status.success(), "{}", text(&o));
}

#[test]
fn bad_arguments_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let input = s(&root().join("custom/input"));
    let out = s(&tmp.path().join("out"));
    for (extra, needle) in [
        (vec!["--split", "0.9,0.2"], "more than 1"),
        (vec!["--split", "3"], "TRAIN,VALIDATION"),
        (vec!["--crop", "10:5,0:3"], "greater than START"),
        (vec!["--slices", "4"], "START:END"),
    ] {
        let mut args = vec!["--input".to_string(), input.clone(), "--output".to_string(), out.clone()];
        args.extend(extra.iter().map(|a| a.to_string()));
        let o = medgen(&args);
        assert!(!o.status.success(), "{extra:?} accepted");
        assert!(text(&o).contains(needle), "{extra:?}: {}", text(&o));
    }
    let missing = tmp.path().join("no-such-dir");
    let o = medgen(&["--input".into(), s(&missing), "--output".into(), out]);
    assert!(!o.status.success());
    assert!(text(&o).contains("no-such-dir"), "{}", text(&o));
}

/// A subject whose PNGs cannot be written is skipped; the others are extracted and listed.
#[test]
fn unwritable_output_is_skipped_not_fatal() {
    let case = manifest_run("custom_counts");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("png");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("sub-02"), "a file where the subject directory goes").unwrap();
    ok(run_case(&case, &out, &[]));
    let sum = summary(&out);
    let skipped: Vec<(String, String)> = sum["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "write_failed")
        .map(|s| (s["path"].as_str().unwrap().to_string(), s["reason"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(skipped[0].0.ends_with("sub-02_ses-1_T1w.nii.gz") && skipped[0].1.contains("sub-02"), "{skipped:?}");
    let want = case["fates"].as_object().unwrap().values().filter(|v| *v == "processed").count();
    assert_eq!(sum["counts"]["processed"].as_u64().unwrap() as usize, want - 1);
    let listed: u64 = sum["lists"].as_array().unwrap().iter().map(|l| l["rows"].as_u64().unwrap()).sum();
    assert_eq!(listed as usize, (want - 1) * 12, "12 slices of every processed volume listed");
}
