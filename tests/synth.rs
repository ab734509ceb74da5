//! `medgen synth`: tissue contrast and lesions on the reference crop, placement of the crop,
//! determinism, and the data set on disk (layout, grid, resume).
use medgen::data::synth::{subject_paths, Manifest, SubjectVolumes, SynthParams, Synthesizer, Tissue, MANIFEST_FILE};
use medgen::io::volume::read_volume;
use ndarray::{s, Array3, ArrayView3};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The nilearn wheel `make setup` downloads. Missing is a failure, never a skip.
fn wheel() -> PathBuf {
    let path = std::env::var_os("MEDGEN_NILEARN_WHEEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/wheels/nilearn-0.14.1-py3-none-any.whl")
    });
    assert!(
        path.is_file(),
        "nilearn wheel not found at {}: run `make setup` (or set MEDGEN_NILEARN_WHEEL)",
        path.display()
    );
    path
}

fn synthesizer() -> &'static Synthesizer {
    static SYNTH: OnceLock<Synthesizer> = OnceLock::new();
    SYNTH.get_or_init(|| Synthesizer::new(&wheel(), SynthParams::default()).expect("anatomy from the wheel"))
}

/// Subjects 1–3 of seed 0 with their labels, rendered once for all tests.
fn subjects() -> &'static [SubjectVolumes] {
    static SUBJECTS: OnceLock<Vec<SubjectVolumes>> = OnceLock::new();
    SUBJECTS.get_or_init(|| (1..=3).map(|n| synthesizer().subject(0, n, true)).collect())
}

/// The reference crop `[16:176, 16:240, 166:171]`.
fn crop<T>(v: &Array3<T>) -> ArrayView3<'_, T> {
    v.slice(s![16..176, 16..240, 166..171])
}

/// Mean intensity over the voxels labelled `tissue`, and their count.
fn mean_where(image: ArrayView3<i16>, labels: ArrayView3<u8>, tissue: Tissue) -> (f64, usize) {
    let (sum, n) = image
        .iter()
        .zip(labels.iter())
        .filter(|(_, &l)| l == tissue as u8)
        .fold((0.0, 0), |(s, n), (&v, _)| (s + v as f64, n + 1));
    (sum / n.max(1) as f64, n)
}

#[test]
fn tissue_contrast_on_the_crop() {
    for v in subjects() {
        let sub = v.summary.subject;
        let labels = v.labels.as_ref().expect("labels asked for");
        let (l, fl, t1) = (crop(labels), crop(&v.flair), crop(&v.t1w));
        let f = |t| mean_where(fl, l, t);
        let t = |t| mean_where(t1, l, t);
        let (fw, fg, fc) = (f(Tissue::Wm), f(Tissue::Gm), f(Tissue::Csf));
        let (tw, tg, tc) = (t(Tissue::Wm), t(Tissue::Gm), t(Tissue::Csf));
        for (name, (_, n)) in [("WM", fw), ("GM", fg), ("CSF", fc)] {
            assert!(n > 500, "sub {sub}: only {n} pure {name} voxels in the crop");
        }
        println!(
            "sub {sub}: FLAIR WM {:.1} GM {:.1} CSF {:.1}; T1w WM {:.1} GM {:.1} CSF {:.1}",
            fw.0, fg.0, fc.0, tw.0, tg.0, tc.0
        );
        assert!(fg.0 > 1.08 * fw.0 && fw.0 > 3.0 * fc.0, "sub {sub}: FLAIR must be GM > WM ≫ CSF");
        assert!(tw.0 > 1.15 * tg.0 && tg.0 > 1.5 * tc.0, "sub {sub}: T1w must be WM > GM > CSF");
    }
}

#[test]
fn lesions_are_bright_on_flair_and_dark_on_t1w() {
    let mut in_crop = 0;
    for v in subjects() {
        let sub = v.summary.subject;
        let labels = v.labels.as_ref().unwrap().view();
        let (fw, _) = mean_where(v.flair.view(), labels, Tissue::Wm);
        let (tw, _) = mean_where(v.t1w.view(), labels, Tissue::Wm);
        let (fl, n) = mean_where(v.flair.view(), labels, Tissue::Lesion);
        let (tl, _) = mean_where(v.t1w.view(), labels, Tissue::Lesion);
        println!(
            "sub {sub}: {} lesions, {n} lesion voxels; FLAIR {fl:.1} vs WM {fw:.1}, T1w {tl:.1} vs WM {tw:.1}",
            v.summary.lesions
        );
        assert!(n >= 20, "sub {sub}: only {n} lesion voxels");
        assert!(fl > 1.3 * fw, "sub {sub}: lesions must be bright on FLAIR");
        assert!(tl < 0.92 * tw, "sub {sub}: lesions must be dark on T1w");
        let (_, n_crop) = mean_where(crop(&v.flair), crop(v.labels.as_ref().unwrap()), Tissue::Lesion);
        in_crop += n_crop;
    }
    assert!(in_crop >= 10, "lesions should reach the crop slab in some subject ({in_crop} voxels in 3 subjects)");
}

#[test]
fn the_crop_holds_an_axial_slice_of_the_brain() {
    let brain = |l: u8| [Tissue::Wm, Tissue::Gm, Tissue::Lesion].iter().any(|&t| t as u8 == l);
    for v in subjects() {
        let sub = v.summary.subject;
        let labels = crop(v.labels.as_ref().unwrap());
        for k in 0..5 {
            let sl = labels.slice(s![.., .., k]);
            let area = sl.iter().filter(|&&l| brain(l)).count();
            let fraction = area as f64 / sl.len() as f64;
            println!("sub {sub} slice {k}: brain covers {:.0} % of the crop", 100.0 * fraction);
            assert!(fraction > 0.15, "sub {sub} slice {k}: brain covers {:.0} % of the crop", 100.0 * fraction);
            // The brain lies inside the frame, longer along the 224-pixel (anterior–posterior) axis.
            let rows: Vec<usize> = (0..160).filter(|&i| sl.row(i).iter().any(|&l| brain(l))).collect();
            let cols: Vec<usize> = (0..224).filter(|&j| sl.column(j).iter().any(|&l| brain(l))).collect();
            let (r0, r1, c0, c1) = (rows[0], *rows.last().unwrap(), cols[0], *cols.last().unwrap());
            assert!(r0 > 0 && r1 < 159 && c0 > 0 && c1 < 223, "sub {sub} slice {k}: the crop cuts the brain");
            assert!(
                c1 - c0 > r1 - r0 + 15,
                "sub {sub} slice {k}: brain {}×{} is not longer along axis 1",
                r1 - r0,
                c1 - c0
            );
            // Lateral ventricles: fluid near the middle of the slice.
            let centre = sl.slice(s![55..105, 60..170]);
            let csf = centre.iter().filter(|&&l| l == Tissue::Csf as u8).count();
            assert!(csf > 100, "sub {sub} slice {k}: only {csf} CSF voxels near the centre (no ventricles?)");
        }
    }
}

#[test]
fn subjects_are_deterministic_and_differ() {
    let again = synthesizer().subject(0, 2, false);
    let first = &subjects()[1];
    assert!(again.flair == first.flair && again.t1w == first.t1w, "same seed and subject must give the same volumes");
    let (a, b) = (crop(&subjects()[0].flair), crop(&subjects()[1].flair));
    let differing = a.iter().zip(b.iter()).filter(|(x, y)| (**x - **y).abs() > 10).count();
    assert!(differing > a.len() / 4, "subjects 1 and 2 are nearly the same ({differing} voxels differ)");
    let other_seed = synthesizer().subject(1, 2, false);
    assert!(other_seed.flair != first.flair, "another seed must give another subject");
}

fn medgen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_medgen")).args(args).output().expect("run medgen")
}

fn synth_cli(out: &Path, extra: &[&str]) -> std::process::Output {
    let wheel = wheel();
    let mut args = vec!["synth", "--nilearn-wheel", wheel.to_str().unwrap(), "--output", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    medgen(&args)
}

fn assert_ok(o: &std::process::Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{what} failed: {stdout}{}", String::from_utf8_lossy(&o.stderr));
    stdout
}

#[test]
fn cli_writes_a_reproducible_resumable_data_set() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    assert_ok(&synth_cli(&a, &["--subjects", "2", "--seed", "5"]), "synth a");

    let manifest: Manifest = serde_json::from_str(&std::fs::read_to_string(a.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!((manifest.seed, manifest.subjects), (5, 2));
    assert_eq!(manifest.params, SynthParams::default());

    // The files read back as the library's volumes, on the expected grid.
    let (t1w_path, flair_path) = subject_paths(&a, 2);
    let lib = synthesizer().subject(5, 2, false);
    for (path, want) in [(&t1w_path, &lib.t1w), (&flair_path, &lib.flair)] {
        let v = read_volume(path).unwrap();
        assert_eq!(v.dims(), SynthParams::default().grid.dims, "{}", path.display());
        assert_eq!(v.header.datatype, 4, "{}: int16", path.display());
        assert_eq!(v.header.srow_y, [0.0, 1.0, 0.0, -127.5], "{}: axis 1 is posterior→anterior", path.display());
        assert!(
            v.data.iter().zip(want.iter()).all(|(a, b)| *a == *b as f64),
            "{} differs from the library",
            path.display()
        );
    }

    // A subject does not depend on the subject count: byte-identical files.
    assert_ok(&synth_cli(&b, &["--subjects", "1", "--seed", "5"]), "synth b");
    let (x, y) = (subject_paths(&a, 1), subject_paths(&b, 1));
    for (x, y) in [(&x.0, &y.0), (&x.1, &y.1)] {
        assert!(std::fs::read(x).unwrap() == std::fs::read(y).unwrap(), "{} and {} differ", x.display(), y.display());
    }

    // --resume leaves complete subjects alone and adds the missing ones, clearing what a killed
    // run left behind.
    let stale = subject_paths(&a, 3).0.with_file_name(".tmp-1-sub-0003_ses-01_T1w.nii.gz");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, b"half a file").unwrap();
    let before = std::fs::metadata(&t1w_path).unwrap().modified().unwrap();
    let stdout = assert_ok(&synth_cli(&a, &["--subjects", "3", "--seed", "5", "--resume"]), "resume");
    assert!(stdout.contains("1 subjects written, 2 already there"), "{stdout}");
    assert_eq!(std::fs::metadata(&t1w_path).unwrap().modified().unwrap(), before, "resume rewrote sub-0002");
    assert!(subject_paths(&a, 3).1.is_file() && !stale.exists());

    // ...but refuses to mix two data sets.
    let o = synth_cli(&a, &["--subjects", "3", "--seed", "6", "--resume"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("seed"), "resume with another seed: {stderr}");

    let o = medgen(&["synth", "--nilearn-wheel", "/nonexistent/nilearn.whl", "--output", b.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("/nonexistent/nilearn.whl"), "missing wheel: {stderr}");
}
