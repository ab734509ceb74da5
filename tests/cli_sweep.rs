//! Every subcommand over a corpus of bad inputs (issue 15, 6(b)): images of mixed sizes, wrong dtypes,
//! corrupt and empty files, bad configs, missing paths, empty lists. Each must exit 1 with one `error:` line
//! naming what is wrong: never a panic (101), an internal error (70), an abort or a signal, and no half-written
//! file in its output folder. A few inputs that used to panic but are valid (integer tensors where floats are
//! expected) must now succeed.
mod common;

use common::run::{configs, data, medgen, s};
use medgen::checkpoint::{Generation, StateDict};
use medgen::nets::{AutoencoderKL, ControlNet, DiffusionModelUNet};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Device, Kind, Tensor};

/// Where a case could write, and what may be there after it failed.
enum Out {
    /// Nothing: validation happens before the first file is created.
    Untouched(PathBuf),
    /// Complete files only (e.g. a training run's logs), no temporary or half-written one.
    NoPartial(PathBuf),
    None,
}

struct Case {
    name: &'static str,
    args: Vec<String>,
    /// Substrings the error line must contain (the bad file or field, and what is wrong with it).
    expect: Vec<String>,
    out: Out,
}

fn case(name: &'static str, args: &[&str], expect: &[&str], out: Out) -> Case {
    Case {
        name,
        args: args.iter().map(|a| a.to_string()).collect(),
        expect: expect.iter().map(|e| e.to_string()).collect(),
        out,
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Runs one case; returns its error line, or a description of what went wrong.
fn check(c: &Case) -> Result<String, String> {
    let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
    let o = medgen(&args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let mut problems = Vec::new();
    match o.status.code() {
        Some(1) => {}
        Some(code) => problems.push(format!("exit code {code} (want 1)")),
        None => problems.push(format!("killed by a signal ({:?})", o.status)),
    }
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    let error_lines: Vec<&&str> = lines.iter().filter(|l| l.starts_with("error:")).collect();
    let is_launch = c.args[0] == "launch";
    if is_launch {
        // The child's error line, then the launcher's own lines.
        if lines.iter().any(|l| l.contains("panicked") || l.contains("internal error")) {
            problems.push("a panic".into());
        }
    } else {
        // One `error:` line. Around it only: before, `preprocess`'s report of each file it skipped (by design,
        // with the reason); after, a checkpoint load report's indented key-by-key list (`  missing key ...`),
        // which the error line itself summarises with counts.
        let at = lines.iter().position(|l| l.starts_with("error:"));
        let fits = at.is_some_and(|at| {
            lines[..at].iter().all(|l| l.starts_with("skipped ")) && lines[at + 1..].iter().all(|l| l.starts_with("  "))
        });
        if error_lines.len() != 1 || !fits {
            problems.push(format!("{} stderr lines, {} `error:` lines (want one)", lines.len(), error_lines.len()));
        }
    }
    let last = error_lines.last().map(|l| l.to_string()).unwrap_or_default();
    for e in &c.expect {
        if !err.contains(e.as_str()) {
            problems.push(format!("the error does not mention {e:?}"));
        }
    }
    if !is_launch && !c.expect.iter().all(|e| last.contains(e.as_str())) {
        problems.push("the `error:` line is not the one naming the problem".into());
    }
    match &c.out {
        Out::Untouched(dir) => {
            let files = files_under(dir);
            if !files.is_empty() {
                problems.push(format!("files left in {}: {files:?}", dir.display()));
            }
        }
        Out::NoPartial(dir) => {
            let partial: Vec<PathBuf> = files_under(dir)
                .into_iter()
                .filter(|p| {
                    let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    n.starts_with(".tmp") || n.ends_with(".tmp")
                })
                .collect();
            if !partial.is_empty() {
                problems.push(format!("half-written files left: {partial:?}"));
            }
        }
        Out::None => {}
    }
    if problems.is_empty() {
        return Ok(last);
    }
    Err(format!("{}: {}\n  medgen {}\n  stderr: {err}", c.name, problems.join("; "), args.join(" ")))
}

fn gray(path: &Path, w: u32, h: u32, v: u8) {
    image::GrayImage::from_fn(w, h, |x, y| image::Luma([v.wrapping_add((x * 7 + y * 3) as u8)])).save(path).unwrap();
}

fn save(path: &Path, tensors: Vec<(&str, Tensor)>) {
    let mut sd = StateDict::new();
    for (k, v) in tensors {
        sd.insert(k, v);
    }
    sd.save_safetensors(path, &BTreeMap::new()).unwrap();
}

/// The randomly initialised weights of a model, as a medgen weights file.
fn save_weights(vs: &VarStore, path: &Path) {
    let mut vars = vs.variables().into_iter().collect::<Vec<_>>();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    save(path, vars.iter().map(|(k, v)| (k.as_str(), v.detach())).collect());
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

/// `cfg` with `"sampling": {...}` added at the top level.
fn with_sampling(cfg: &Path, out: &Path, sampling: &str) {
    let text = std::fs::read_to_string(cfg).unwrap();
    let text = text.trim_end().strip_suffix('}').unwrap().to_string() + &format!(r#", "sampling": {sampling}}}"#);
    write(out, text.as_bytes());
}

#[test]
fn every_subcommand_refuses_bad_input_with_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let p = |name: &str| d.join(name);
    let ps = |name: &str| d.join(name).to_str().unwrap().to_string();

    // Good data and models to vary one thing at a time: 32x32 pairs, the tiny configs of tests/common/run.rs.
    let good = p("good");
    std::fs::create_dir_all(&good).unwrap();
    data(&good, 32);
    let [aekl_cfg, ldm_base, cn_base] = configs(d, 1);
    let ldm_cfg = p("ldm_sampling.json");
    let cn_cfg = p("cn_sampling.json");
    with_sampling(&ldm_base, &ldm_cfg, r#"{"num_inference_steps": 2, "latent_shape": [3, 16, 16]}"#);
    with_sampling(&cn_base, &cn_cfg, r#"{"num_inference_steps": 2}"#);
    let (aekl_w, ldm_w, cn_w) = (p("aekl.safetensors"), p("ldm.safetensors"), p("cn.safetensors"));
    {
        let vs = VarStore::new(Device::Cpu);
        AutoencoderKL::new(&vs.root(), &medgen::config::aekl_config(&aekl_cfg).unwrap(), Generation::Monai).unwrap();
        save_weights(&vs, &aekl_w);
        let vs = VarStore::new(Device::Cpu);
        let ucfg = medgen::config::unet_config(&ldm_cfg).unwrap();
        DiffusionModelUNet::new(&vs.root(), &ucfg, Generation::Monai).unwrap();
        save_weights(&vs, &ldm_w);
        let vs = VarStore::new(Device::Cpu);
        ControlNet::new(&vs.root(), &medgen::config::controlnet_config(&cn_cfg).unwrap(), Generation::Monai).unwrap();
        save_weights(&vs, &cn_w);
    }

    // Broken files.
    write(&p("empty.pt"), b"");
    write(&p("junk.pt"), b"PK\x03\x04 this is not a zip archive");
    write(&p("empty.safetensors"), b"");
    let weights = std::fs::read(&aekl_w).unwrap();
    write(&p("truncated.safetensors"), &weights[..weights.len() / 2]);
    write(&p("not_json.json"), b"{\"stage1\": {\"params\": ");
    write(&p("empty.json"), b"");
    write(
        &p("zero_channels.json"),
        br#"{"stage1": {"params": {"channels": [0, 0], "attention_levels": [false, false], "norm_num_groups": 4}}}"#,
    );
    write(&p("zero_blocks.json"), br#"{"stage1": {"params": {"channels": [8, 16], "attention_levels": [false, false], "num_res_blocks": [1, 0], "norm_num_groups": 4}}}"#);
    write(&p("junk.png"), b"\x89PNG\r\n\x1a\n but then nothing");
    write(&p("empty.png"), b"");
    let ldm_zero = p("ldm_zero_latent.json");
    with_sampling(&ldm_base, &ldm_zero, r#"{"num_inference_steps": 2, "latent_shape": [3, 0, 16]}"#);
    let ldm_neg = p("ldm_negative_latent.json");
    with_sampling(&ldm_base, &ldm_neg, r#"{"num_inference_steps": 2, "latent_shape": [3, -4, 16]}"#);
    // A context file with no prompt rows.
    let ctx0 = p("context_0_rows.safetensors");
    let z = |n: i64| Tensor::zeros([n, 77, 8], (Kind::Float, Device::Cpu));
    save(&ctx0, vec![("context", z(0)), ("uncond_context", z(1)), ("null_context", z(1))]);

    // Training data sets: mixed sizes, an empty list, a missing image, a corrupt image, a 16-bit image, odd sizes.
    let dataset = |name: &str, rows: &[(PathBuf, PathBuf)]| -> PathBuf {
        let dir = p(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut list = String::from("t1w\tflair\n");
        for (t, f) in rows {
            list.push_str(&format!("{}\t{}\n", t.display(), f.display()));
        }
        write(&dir.join("train.tsv"), list.as_bytes());
        write(&dir.join("validation.tsv"), list.as_bytes());
        dir
    };
    let pair = |i: u32| (good.join(format!("s{i}_T1w.png")), good.join(format!("s{i}_FLAIR.png")));
    let small = (p("small_T1w.png"), p("small_FLAIR.png"));
    gray(&small.0, 16, 16, 40);
    gray(&small.1, 16, 16, 90);
    let mut mixed_rows: Vec<_> = (0..7).map(pair).collect();
    mixed_rows.push(small.clone());
    let mixed = dataset("mixed", &mixed_rows);
    let empty_list = dataset("empty_list", &[]);
    let missing_png = dataset("missing_png", &[pair(0), (p("nowhere_T1w.png"), pair(1).1)]);
    let corrupt_png = dataset("corrupt_png", &[pair(0), (p("junk.png"), pair(1).1)]);
    let deep = p("deep_T1w.png");
    image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_fn(32, 32, |x, _| image::Luma([x as u16 * 1000]))
        .save(&deep)
        .unwrap();
    let deep_png = dataset("deep_png", &[pair(0), (deep.clone(), pair(1).1)]);
    let odd = (p("odd_T1w.png"), p("odd_FLAIR.png"));
    gray(&odd.0, 31, 32, 10);
    gray(&odd.1, 31, 32, 20);
    let odd_size = dataset("odd_size", &[odd.clone(), odd.clone()]);

    // Sampling inputs: FLAIR PNGs of two sizes in a folder; a list whose real T1w has another size.
    let flair_dir = p("flair_two_sizes");
    std::fs::create_dir_all(&flair_dir).unwrap();
    std::fs::copy(pair(0).1, flair_dir.join("a_FLAIR.png")).unwrap();
    std::fs::copy(&small.1, flair_dir.join("b_FLAIR.png")).unwrap();
    let empty_dir = p("empty_dir");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let t1w_other_size = p("t1w_other_size.tsv");
    write(&t1w_other_size, format!("t1w\tflair\n{}\t{}\n", small.0.display(), pair(0).1.display()).as_bytes());
    let header_only = p("header_only.tsv");
    write(&header_only, b"t1w\tflair\n");
    let no_header = p("no_header.tsv");
    write(&no_header, b"");

    let odd_flair_dir = p("flair_odd");
    std::fs::create_dir_all(&odd_flair_dir).unwrap();
    std::fs::copy(&odd.1, odd_flair_dir.join("c_FLAIR.png")).unwrap();
    // Volumes that are not NIfTI: every subject skipped, nothing usable.
    let bids = p("bids_corrupt");
    std::fs::create_dir_all(bids.join("sub-01/ses-1/anat")).unwrap();
    write(&bids.join("sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"), b"\x1f\x8b not really gzip");
    write(&bids.join("sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii.gz"), b"");

    // Evaluation: 128x128 T1w (MS-SSIM's smallest), its "sample", and a 64x64 FLAIR.
    let ev = p("eval");
    std::fs::create_dir_all(ev.join("samples")).unwrap();
    gray(&ev.join("e_T1w.png"), 128, 128, 10);
    gray(&ev.join("samples/e_T1w.png"), 128, 128, 12);
    gray(&ev.join("e_FLAIR.png"), 64, 64, 30);
    let ev_list = ev.join("list.tsv");
    write(
        &ev_list,
        format!("t1w\tflair\n{}\t{}\n", ev.join("e_T1w.png").display(), ev.join("e_FLAIR.png").display()).as_bytes(),
    );
    let div_dir = p("diversity_two_sizes");
    std::fs::create_dir_all(&div_dir).unwrap();
    gray(&div_dir.join("sample_0.png"), 128, 128, 0);
    gray(&div_dir.join("sample_1.png"), 128, 112, 0);

    // Forward inputs.
    let f = |shape: &[i64]| Tensor::rand(shape, (Kind::Float, Device::Cpu));
    let in_odd = p("in_odd.safetensors");
    save(&in_odd, vec![("x", f(&[1, 1, 31, 32]))]);
    let in_tiny = p("in_tiny.safetensors");
    save(&in_tiny, vec![("x", f(&[1, 1, 1, 1]))]);
    let in_channels = p("in_channels.safetensors");
    save(&in_channels, vec![("x", f(&[1, 2, 32, 32]))]);
    let in_int_x = p("in_int_x.safetensors");
    save(&in_int_x, vec![("x", Tensor::ones([1, 1, 32, 32], (Kind::Int64, Device::Cpu)))]);
    let unet_int = p("unet_int.safetensors");
    save(
        &unet_int,
        vec![
            ("x", Tensor::ones([1, 3, 16, 16], (Kind::Int64, Device::Cpu))),
            ("timesteps", Tensor::from_slice(&[10i64])),
        ],
    );
    let unet_bad_t = p("unet_bad_t.safetensors");
    save(&unet_bad_t, vec![("x", f(&[1, 3, 16, 16])), ("timesteps", f(&[2, 2]))]);
    let unet_ctx = p("unet_ctx.safetensors");
    save(&unet_ctx, vec![("x", f(&[1, 3, 16, 16])), ("timesteps", Tensor::from_slice(&[3i64])), ("context", z(1))]);
    let cn_int = p("cn_int.safetensors");
    save(
        &cn_int,
        vec![
            ("x", f(&[1, 3, 16, 16])),
            ("timesteps", Tensor::from_slice(&[3i64])),
            ("controlnet_cond", Tensor::ones([1, 1, 32, 32], (Kind::Bool, Device::Cpu))),
        ],
    );
    let cn_cond_size = p("cn_cond_size.safetensors");
    save(
        &cn_cond_size,
        vec![
            ("x", f(&[1, 3, 16, 16])),
            ("timesteps", Tensor::from_slice(&[3i64])),
            ("controlnet_cond", f(&[1, 1, 7, 7])),
        ],
    );

    let out = |name: &str| d.join("out").join(name);
    let os = |name: &str| out(name).to_str().unwrap().to_string();
    let (aekl_c, ldm_c, cn_c) = (s(&aekl_cfg).to_string(), s(&ldm_cfg).to_string(), s(&cn_cfg).to_string());
    let (aekl_ws, ldm_ws, cn_ws) = (s(&aekl_w).to_string(), s(&ldm_w).to_string(), s(&cn_w).to_string());
    let stage1 = ["--stage1-config", &aekl_c, "--stage1-weights", &aekl_ws];
    let ldm = ["--ldm-config", &ldm_c, "--ldm-weights", &ldm_ws];
    let cn = ["--controlnet-config", &cn_c, "--controlnet-weights", &cn_ws];
    let cat = |parts: &[&[&str]]| -> Vec<String> { parts.concat().iter().map(|s| s.to_string()).collect() };
    let c2 = |name: &'static str, args: Vec<String>, expect: &[&str], out: Out| Case {
        name,
        args,
        expect: expect.iter().map(|e| e.to_string()).collect(),
        out,
    };
    let sample_t1w = |o: &str, extra: &[&str]| {
        cat(&[
            &["sample", "t1w", "--device", "cpu", "--num", "2", "--scale-factor", "1", "--output", o],
            &stage1,
            &ldm,
            extra,
        ])
    };
    let sample_flair = |o: &str, input: &str, extra: &[&str]| {
        cat(&[
            &["sample", "flair-to-t1w", "--device", "cpu", "--scale-factor", "1", "--output", o, "--input", input],
            &stage1,
            &ldm,
            &cn,
            extra,
        ])
    };
    let train = |data: &Path, run: &str| {
        cat(&[&["train", "aekl", "--config", &aekl_c, "--data", s(data), "--run", run, "--max-steps", "4"]])
    };
    let eval_reconstruction = |list: &str, o: &str| {
        cat(&[&["eval", "reconstruction", "--device", "cpu", "--list", list, "--output", o], &stage1])
    };
    let fwd = |model: &str, cfg: &str, w: &str, inputs: &Path, o: &str, extra: &[&str]| {
        cat(&[
            &["forward", "--model", model, "--config", cfg, "--weights", w, "--inputs", s(inputs), "--output", o],
            extra,
        ])
    };

    let cases = vec![
        // convert
        case(
            "convert: missing checkpoint",
            &[
                "convert",
                "--model",
                "aekl",
                "--config",
                &aekl_c,
                "--input",
                &ps("nowhere.pt"),
                "--output",
                &os("c1/w.safetensors"),
            ],
            &["nowhere.pt"],
            Out::Untouched(out("c1")),
        ),
        case(
            "convert: empty checkpoint",
            &[
                "convert",
                "--model",
                "aekl",
                "--config",
                &aekl_c,
                "--input",
                &ps("empty.pt"),
                "--output",
                &os("c2/w.safetensors"),
            ],
            &["empty.pt"],
            Out::Untouched(out("c2")),
        ),
        case(
            "convert: corrupt checkpoint",
            &[
                "convert",
                "--model",
                "aekl",
                "--config",
                &aekl_c,
                "--input",
                &ps("junk.pt"),
                "--output",
                &os("c3/w.safetensors"),
            ],
            &["junk.pt"],
            Out::Untouched(out("c3")),
        ),
        case(
            "convert: truncated safetensors",
            &[
                "convert",
                "--model",
                "aekl",
                "--config",
                &aekl_c,
                "--input",
                &ps("truncated.safetensors"),
                "--output",
                &os("c4/w.safetensors"),
            ],
            &["truncated.safetensors"],
            Out::Untouched(out("c4")),
        ),
        case(
            "convert: config not JSON",
            &[
                "convert",
                "--model",
                "aekl",
                "--config",
                &ps("not_json.json"),
                "--input",
                &aekl_ws,
                "--output",
                &os("c5/w.safetensors"),
            ],
            &["not_json.json"],
            Out::Untouched(out("c5")),
        ),
        case(
            "convert: empty config",
            &[
                "convert",
                "--model",
                "aekl",
                "--config",
                &ps("empty.json"),
                "--input",
                &aekl_ws,
                "--output",
                &os("c6/w.safetensors"),
            ],
            &["empty.json"],
            Out::Untouched(out("c6")),
        ),
        case(
            "convert: zero channels",
            &[
                "convert",
                "--model",
                "aekl",
                "--config",
                &ps("zero_channels.json"),
                "--input",
                &aekl_ws,
                "--output",
                &os("c7/w.safetensors"),
            ],
            &["zero_channels.json", "channels must be positive"],
            Out::Untouched(out("c7")),
        ),
        case(
            "convert: a level without ResBlocks changes width",
            &[
                "convert",
                "--model",
                "aekl",
                "--config",
                &ps("zero_blocks.json"),
                "--input",
                &aekl_ws,
                "--output",
                &os("c8/w.safetensors"),
            ],
            &["zero_blocks.json", "num_res_blocks[1] = 0"],
            Out::Untouched(out("c8")),
        ),
        case(
            "convert: weights of another model",
            &[
                "convert",
                "--model",
                "unet",
                "--config",
                &ldm_c,
                "--input",
                &aekl_ws,
                "--output",
                &os("c9/w.safetensors"),
            ],
            &["aekl.safetensors"],
            Out::Untouched(out("c9")),
        ),
        // inspect
        case(
            "inspect: missing",
            &["inspect", "--input", &ps("nowhere.safetensors")],
            &["nowhere.safetensors"],
            Out::None,
        ),
        case("inspect: empty", &["inspect", "--input", &ps("empty.safetensors")], &["empty.safetensors"], Out::None),
        case(
            "inspect: truncated",
            &["inspect", "--input", &ps("truncated.safetensors")],
            &["truncated.safetensors"],
            Out::None,
        ),
        case("inspect: corrupt torch file", &["inspect", "--input", &ps("junk.pt")], &["junk.pt"], Out::None),
        // forward
        c2(
            "forward: AEKL x of odd size",
            fwd("aekl", &aekl_c, &aekl_ws, &in_odd, &os("f1/o.safetensors"), &[]),
            &["in_odd.safetensors", "31x32", "multiples of 2"],
            Out::Untouched(out("f1")),
        ),
        c2(
            "forward: AEKL x too small",
            fwd("aekl", &aekl_c, &aekl_ws, &in_tiny, &os("f2/o.safetensors"), &["--op", "encode"]),
            &["1x1", "at least 2x2"],
            Out::Untouched(out("f2")),
        ),
        c2(
            "forward: AEKL x with 2 channels",
            fwd("aekl", &aekl_c, &aekl_ws, &in_channels, &os("f3/o.safetensors"), &[]),
            &["1 channels", "[1, 2, 32, 32]"],
            Out::Untouched(out("f3")),
        ),
        c2(
            "forward: inputs file empty",
            fwd("aekl", &aekl_c, &aekl_ws, &p("empty.safetensors"), &os("f4/o.safetensors"), &[]),
            &["empty.safetensors"],
            Out::Untouched(out("f4")),
        ),
        c2(
            "forward: inputs file missing",
            fwd("aekl", &aekl_c, &aekl_ws, &p("nowhere.safetensors"), &os("f5/o.safetensors"), &[]),
            &["nowhere.safetensors"],
            Out::Untouched(out("f5")),
        ),
        c2(
            "forward: weights truncated",
            fwd("aekl", &aekl_c, &ps("truncated.safetensors"), &in_odd, &os("f6/o.safetensors"), &[]),
            &["truncated.safetensors"],
            Out::Untouched(out("f6")),
        ),
        c2(
            "forward: UNet timesteps 2-D",
            fwd("unet", &ldm_c, &ldm_ws, &unet_bad_t, &os("f7/o.safetensors"), &[]),
            &["timesteps", "[2, 2]"],
            Out::Untouched(out("f7")),
        ),
        c2(
            "forward: context for an unconditioned UNet",
            fwd("unet", &ldm_c, &ldm_ws, &unet_ctx, &os("f8/o.safetensors"), &[]),
            &["context", "with_conditioning = false"],
            Out::Untouched(out("f8")),
        ),
        c2(
            "forward: ControlNet cond of the wrong size",
            fwd("controlnet", &cn_c, &cn_ws, &cn_cond_size, &os("f9/o.safetensors"), &[]),
            &["controlnet_cond", "[1, 1, 7, 7]"],
            Out::Untouched(out("f9")),
        ),
        // encode-prompt
        case(
            "encode-prompt: missing text encoder",
            &[
                "encode-prompt",
                "--text-encoder",
                &ps("nowhere_te"),
                "--tokenizer",
                &ps("nowhere_tok"),
                "--prompt",
                "a brain",
                "--output",
                &os("e1/c.safetensors"),
            ],
            &["nowhere_"],
            Out::Untouched(out("e1")),
        ),
        case(
            "encode-prompt: an empty folder",
            &[
                "encode-prompt",
                "--text-encoder",
                s(&empty_dir),
                "--tokenizer",
                s(&empty_dir),
                "--prompt",
                "a brain",
                "--output",
                &os("e2/c.safetensors"),
            ],
            &["empty_dir"],
            Out::Untouched(out("e2")),
        ),
        // preprocess
        case(
            "preprocess: missing input",
            &["preprocess", "--input", &ps("nowhere_bids"), "--output", &os("p1")],
            &["nowhere_bids"],
            Out::Untouched(out("p1")),
        ),
        case(
            "preprocess: no volumes",
            &["preprocess", "--input", s(&empty_dir), "--output", &os("p2")],
            &["empty_dir"],
            Out::NoPartial(out("p2")),
        ),
        case(
            "preprocess: corrupt volumes",
            &["preprocess", "--input", s(&bids), "--output", &os("p3")],
            &["nothing usable", "bids_corrupt"],
            Out::NoPartial(out("p3")),
        ),
        // synth
        case(
            "synth: missing nilearn wheel",
            &["synth", "--nilearn-wheel", &ps("nowhere.whl"), "--output", &os("y1"), "--subjects", "1"],
            &["nowhere.whl"],
            Out::Untouched(out("y1")),
        ),
        case(
            "synth: corrupt nilearn wheel",
            &["synth", "--nilearn-wheel", &ps("junk.pt"), "--output", &os("y2"), "--subjects", "1"],
            &["junk.pt"],
            Out::Untouched(out("y2")),
        ),
        // train
        c2(
            "train: a batch of mixed sizes",
            train(&mixed, &os("t1")),
            &["small_T1w.png", "16x16", "32x32"],
            Out::NoPartial(out("t1")),
        ),
        c2("train: empty list", train(&empty_list, &os("t2")), &["train.tsv", "empty"], Out::Untouched(out("t2"))),
        c2(
            "train: missing data folder",
            train(&p("nowhere_data"), &os("t3")),
            &["nowhere_data"],
            Out::Untouched(out("t3")),
        ),
        c2("train: a missing image", train(&missing_png, &os("t4")), &["nowhere_T1w.png"], Out::NoPartial(out("t4"))),
        c2("train: a corrupt image", train(&corrupt_png, &os("t5")), &["junk.png"], Out::NoPartial(out("t5"))),
        c2(
            "train: a 16-bit image",
            train(&deep_png, &os("t6")),
            &["deep_T1w.png", "8-bit grayscale"],
            Out::NoPartial(out("t6")),
        ),
        c2(
            "train: images the autoencoder cannot reconstruct",
            train(&odd_size, &os("t7")),
            &["32x31", "multiples of 2"],
            Out::NoPartial(out("t7")),
        ),
        c2(
            "train: bad config",
            cat(&[&["train", "aekl", "--config", &ps("zero_channels.json"), "--data", s(&good), "--run", &os("t8")]]),
            &["zero_channels.json"],
            Out::Untouched(out("t8")),
        ),
        // sample
        c2(
            "sample t1w: zero latent_shape",
            cat(&[
                &["sample", "t1w", "--device", "cpu", "--num", "1", "--scale-factor", "1", "--output", &os("s1")],
                &stage1,
                &["--ldm-config", s(&ldm_zero), "--ldm-weights", &ldm_ws],
            ]),
            &["latent_shape", "positive"],
            Out::Untouched(out("s1")),
        ),
        c2(
            "sample t1w: negative latent_shape",
            cat(&[
                &["sample", "t1w", "--device", "cpu", "--num", "1", "--scale-factor", "1", "--output", &os("s2")],
                &stage1,
                &["--ldm-config", s(&ldm_neg), "--ldm-weights", &ldm_ws],
            ]),
            &["latent_shape", "-4"],
            Out::Untouched(out("s2")),
        ),
        c2(
            "sample t1w: a context file with 0 rows",
            sample_t1w(&os("s3"), &["--context", s(&ctx0)]),
            &["context_0_rows.safetensors", "empty"],
            Out::Untouched(out("s3")),
        ),
        c2(
            "sample t1w: truncated stage-1 weights",
            cat(&[
                &[
                    "sample",
                    "t1w",
                    "--device",
                    "cpu",
                    "--num",
                    "1",
                    "--output",
                    &os("s4"),
                    "--stage1-config",
                    &aekl_c,
                    "--stage1-weights",
                    &ps("truncated.safetensors"),
                ],
                &ldm,
            ]),
            &["truncated.safetensors"],
            Out::Untouched(out("s4")),
        ),
        c2(
            "sample flair-to-t1w: FLAIR of two sizes",
            sample_flair(&os("s5"), s(&flair_dir), &[]),
            &["a_FLAIR.png", "b_FLAIR.png", "32x32", "16x16"],
            Out::Untouched(out("s5")),
        ),
        c2(
            "sample flair-to-t1w: real T1w of another size",
            sample_flair(&os("s6"), s(&t1w_other_size), &[]),
            &["small_T1w.png", "16x16", "32x32"],
            Out::Untouched(out("s6")),
        ),
        c2(
            "sample flair-to-t1w: empty folder",
            sample_flair(&os("s7"), s(&empty_dir), &[]),
            &["empty_dir", "no PNG"],
            Out::Untouched(out("s7")),
        ),
        c2(
            "sample flair-to-t1w: header-only list",
            sample_flair(&os("s8"), s(&header_only), &[]),
            &["header_only.tsv", "nothing to translate"],
            Out::Untouched(out("s8")),
        ),
        c2(
            "sample flair-to-t1w: empty list file",
            sample_flair(&os("s9"), s(&no_header), &[]),
            &["no_header.tsv", "empty"],
            Out::Untouched(out("s9")),
        ),
        c2(
            "sample flair-to-t1w: a corrupt FLAIR",
            sample_flair(&os("s10"), s(&corrupt_png.join("train.tsv")), &[]),
            &["junk.png"],
            Out::Untouched(out("s10")),
        ),
        c2(
            "sample flair-to-t1w: a size the autoencoder cannot reconstruct",
            sample_flair(&os("s11"), s(&odd_flair_dir), &[]),
            &["c_FLAIR.png", "32x31", "multiples of 2"],
            Out::Untouched(out("s11")),
        ),
        // eval
        c2(
            "eval reconstruction: a size the autoencoder cannot reconstruct",
            eval_reconstruction(s(&odd_size.join("train.tsv")), &os("v9")),
            &["odd_T1w.png", "32x31", "multiples of 2"],
            Out::Untouched(out("v9")),
        ),
        c2(
            "eval reconstruction: mixed sizes",
            eval_reconstruction(s(&mixed.join("train.tsv")), &os("v1")),
            &["small_T1w.png", "16x16", "32x32"],
            Out::Untouched(out("v1")),
        ),
        c2(
            "eval reconstruction: an empty list",
            eval_reconstruction(s(&header_only), &os("v2")),
            &["header_only.tsv", "empty"],
            Out::Untouched(out("v2")),
        ),
        case(
            "eval flair-to-t1w --baselines: FLAIR of another size",
            &[
                "eval",
                "flair-to-t1w",
                "--list",
                s(&ev_list),
                "--samples",
                s(&ev.join("samples")),
                "--baselines",
                "--output",
                &os("v3"),
            ],
            &["e_FLAIR.png", "64x64", "128x128"],
            Out::Untouched(out("v3")),
        ),
        case(
            "eval flair-to-t1w: no samples",
            &["eval", "flair-to-t1w", "--list", s(&ev_list), "--samples", s(&empty_dir), "--output", &os("v4")],
            &["e_T1w.png", "missing"],
            Out::Untouched(out("v4")),
        ),
        case(
            "eval diversity: samples of two sizes",
            &["eval", "diversity", "--samples", s(&div_dir), "--output", &os("v5")],
            &["sample_0.png", "sample_1.png", "128x128", "112x128"],
            Out::Untouched(out("v5")),
        ),
        case(
            "eval diversity: no samples",
            &["eval", "diversity", "--samples", s(&empty_dir), "--output", &os("v6")],
            &["empty_dir", "no PNG"],
            Out::Untouched(out("v6")),
        ),
        case(
            "eval fid: missing wheel",
            &[
                "eval",
                "fid",
                "--device",
                "cpu",
                "--samples",
                s(&ev.join("samples")),
                "--real",
                s(&ev_list),
                "--fid-wheel",
                &ps("nowhere.whl"),
                "--output",
                &os("v7"),
            ],
            &["nowhere.whl"],
            Out::Untouched(out("v7")),
        ),
        case(
            "eval report: missing folder",
            &["eval", "report", "--eval", &ps("nowhere_eval"), "--output", &os("v8/report.md")],
            &["nowhere_eval"],
            Out::Untouched(out("v8")),
        ),
        // launch
        c2(
            "launch: a rank with bad input",
            [
                vec!["launch".to_string(), "--nproc".into(), "1".into(), "--".into()],
                train(&p("nowhere_data"), &os("l1")),
            ]
            .concat(),
            &["nowhere_data", "rank 0"],
            Out::Untouched(out("l1")),
        ),
    ];

    let mut failures = Vec::new();
    for c in &cases {
        let t = std::time::Instant::now();
        let r = check(c);
        println!("{:60} {:5.1} s {}", c.name, t.elapsed().as_secs_f64(), if r.is_err() { "FAILED" } else { "ok" });
        match r {
            Ok(line) => println!("    {line}"),
            Err(e) => failures.push(e),
        }
    }

    // Inputs that used to panic and are valid: integer and bool tensors where floats are expected are cast.
    let valid = [
        (
            "AEKL x int64",
            fwd("aekl", &aekl_c, &aekl_ws, &in_int_x, &os("ok1.safetensors"), &[]),
            out("ok1.safetensors"),
        ),
        ("UNet x int64", fwd("unet", &ldm_c, &ldm_ws, &unet_int, &os("ok2.safetensors"), &[]), out("ok2.safetensors")),
        (
            "ControlNet cond bool",
            fwd("controlnet", &cn_c, &cn_ws, &cn_int, &os("ok3.safetensors"), &[]),
            out("ok3.safetensors"),
        ),
    ];
    for (name, args, output) in valid {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = medgen(&a);
        if !o.status.success() || !output.exists() {
            failures.push(format!("{name}: {:?}\n  stderr: {}", o.status, String::from_utf8_lossy(&o.stderr)));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases misbehaved:\n{}",
        failures.len(),
        cases.len() + 3,
        failures.join("\n")
    );
}
