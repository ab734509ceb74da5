//! The torch.save reader against files written by PyTorch 2.13 (tests/gen_checkpoint_fixtures.py)
//! and the legacy files shipped in the lpips wheel.
mod common;

use common::{assert_same, fixtures};
use medgen::checkpoint::StateDict;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    fixtures().join("checkpoint")
}

fn expected() -> StateDict {
    StateDict::load(&dir().join("expected.safetensors"), None).unwrap()
}

/// Every `stem/*` entry of expected.safetensors, compared bit for bit with `sd`.
fn assert_matches(stem: &str, sd: &StateDict) {
    let exp = expected();
    let prefix = format!("{stem}/");
    let names: Vec<&String> = exp.names().iter().filter(|n| n.starts_with(&prefix)).collect();
    assert!(!names.is_empty(), "no expected tensors for {stem}");
    assert_eq!(sd.len(), names.len(), "{stem}: tensor count; got {:?}", sd.names());
    for n in names {
        let key = &n[prefix.len()..];
        let got = sd.get(key).unwrap_or_else(|| panic!("{stem}: missing {key}; got {:?}", sd.names()));
        assert_same(&format!("{stem}/{key}"), got, exp.get(n).unwrap());
    }
}

fn load(name: &str, key: Option<&str>) -> anyhow::Result<StateDict> {
    StateDict::load(&dir().join(name), key)
}

#[test]
fn zip_legacy_and_protocol_4_files_give_every_dtype_exactly() {
    for f in ["dtypes.pt", "dtypes_legacy.pt", "dtypes_proto4.pt"] {
        let sd = load(f, None).unwrap();
        assert_matches("dtypes", &sd);
        assert_eq!(sd.names()[0], "f32", "{f}: file order kept");
    }
}

#[test]
fn views_of_shared_storages_are_rebuilt() {
    for f in ["views.pt", "views_legacy.pt"] {
        assert_matches("views", &load(f, None).unwrap());
    }
}

#[test]
fn state_dict_with_metadata_and_int_buffers() {
    // An OrderedDict carrying `_metadata`, which tch's own loader rejects.
    assert_matches("model", &load("model.pt", None).unwrap());
}

#[test]
fn training_checkpoints_select_the_state_dict() {
    let sd = load("training.pt", None).unwrap();
    assert_matches("model", &sd);
    assert!(sd.notes.iter().any(|n| n.contains("state_dict")), "{:?}", sd.notes);
    assert_matches("model", &load("ldm_ckpt.pt", Some("diffusion")).unwrap());
    assert_matches("model", &load("ldm_ckpt.pt", None).unwrap());
    assert_matches("model", &load("nested_key.pt", Some("outer.ema")).unwrap());
    let opt = load("training.pt", Some("optimizer")).unwrap();
    assert!(opt.names().iter().any(|n| n.starts_with("state.")), "{:?}", opt.names());
    assert!(opt.notes.iter().any(|n| n.contains("param_groups")), "non-tensor leaves reported: {:?}", opt.notes);
}

#[test]
fn dataparallel_prefix_is_stripped() {
    let sd = load("dataparallel.pt", None).unwrap();
    assert_matches("model", &sd);
    assert!(sd.notes.iter().any(|n| n.contains("module.")));
}

#[test]
fn ambiguous_or_wrong_keys_are_explained() {
    let e = format!("{:#}", load("two_models.pt", None).unwrap_err());
    assert!(e.contains("model_a") && e.contains("model_b") && e.contains("--key"), "{e}");
    let e = format!("{:#}", load("training.pt", Some("nope")).unwrap_err());
    assert!(e.contains("\"nope\"") && e.contains("state_dict"), "{e}");
    let e = format!("{:#}", load("training.pt", Some("epoch")).unwrap_err());
    assert!(e.contains("epoch") && e.contains("int"), "{e}");
}

#[test]
fn code_in_a_pickle_is_refused_with_its_name() {
    for (f, global) in [
        ("malicious_system.pt", "posix.system"),
        ("malicious_system_proto4.pt", "posix.system"),
        ("malicious_eval_legacy.pt", "__builtin__.eval"),
        ("whole_module.pt", "torch.nn.modules.container.Sequential"),
    ] {
        let e = format!("{:#}", load(f, None).unwrap_err());
        assert!(e.contains(&format!("`{global}`")), "{f}: {e}");
        assert!(e.contains(f), "{f}: the error names the file: {e}");
    }
}

#[test]
fn lpips_wheel_legacy_heads() {
    let wdir = std::fs::read_to_string(dir().join("lpips_dir.txt")).unwrap();
    for net in ["alex", "squeeze", "vgg"] {
        let p = Path::new(wdir.trim()).join(format!("{net}.pth"));
        assert_eq!(std::fs::read(&p).unwrap()[0], 0x80, "{net}.pth is a legacy file");
        assert_matches(&format!("lpips_{net}"), &StateDict::load(&p, None).unwrap());
    }
}

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn truncated_files_are_errors_naming_the_file() {
    let tmp = scratch();
    for f in ["dtypes.pt", "dtypes_legacy.pt", "views_legacy.pt", "model.pt"] {
        let bytes = std::fs::read(dir().join(f)).unwrap();
        let mut cuts: Vec<usize> = (0..bytes.len()).step_by(37).collect();
        cuts.extend([1, 2, 8, bytes.len() - 1, bytes.len() - 22]);
        for cut in cuts {
            let p = tmp.path().join(format!("cut{cut}-{f}"));
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let r = std::panic::catch_unwind(|| StateDict::load(&p, None));
            let r = r.unwrap_or_else(|_| panic!("{f} cut at {cut}: panicked"));
            let e = format!("{:#}", r.expect_err(&format!("{f} cut at {cut} loaded")));
            assert!(e.contains(&format!("cut{cut}-{f}")), "{f} cut at {cut}: {e}");
        }
    }
}

#[test]
fn corrupt_bytes_never_panic() {
    let tmp = scratch();
    for f in ["dtypes.pt", "dtypes_legacy.pt", "model.pt"] {
        let bytes = std::fs::read(dir().join(f)).unwrap();
        let mut errors = 0;
        for i in (0..bytes.len()).step_by(13) {
            let mut b = bytes.clone();
            b[i] ^= 0xa5;
            let p = tmp.path().join(format!("flip{i}-{f}"));
            std::fs::write(&p, &b).unwrap();
            // Flipped tensor data may still load (with other values): only panics are bugs.
            match std::panic::catch_unwind(|| StateDict::load(&p, None)) {
                Err(_) => panic!("{f} with byte {i} flipped: panicked"),
                Ok(Err(_)) => errors += 1,
                Ok(Ok(_)) => {}
            }
        }
        assert!(errors > 0, "{f}: no corruption was detected at all");
    }
    let p = tmp.path().join("garbage.pt");
    std::fs::write(&p, b"this is not a checkpoint").unwrap();
    let e = format!("{:#}", StateDict::load(&p, None).unwrap_err());
    assert!(e.contains("garbage.pt"), "{e}");
    let e = format!("{:#}", StateDict::load(&tmp.path().join("absent.pt"), None).unwrap_err());
    assert!(e.contains("absent.pt"), "{e}");
}

#[test]
fn safetensors_round_trip_with_metadata() {
    let tmp = scratch();
    let src = load("dtypes.pt", None).unwrap();
    let mut meta = BTreeMap::new();
    meta.insert("medgen.model".to_string(), "test".to_string());
    let p = tmp.path().join("out.safetensors");
    src.save_safetensors(&p, &meta).unwrap();
    let back = StateDict::load(&p, None).unwrap();
    assert_eq!(back.metadata.get("medgen.model").map(String::as_str), Some("test"));
    assert_matches("dtypes", &back);
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    let bytes = std::fs::read(&p).unwrap();
    let cut = tmp.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
    let e = format!("{:#}", StateDict::load(&cut, None).unwrap_err());
    assert!(e.contains("cut.safetensors"), "{e}");
}
