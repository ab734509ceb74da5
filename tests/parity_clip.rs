//! CLIP text encoder parity with Hugging Face transformers' `CLIPTextModel` on the folders of
//! `tests/gen_clip_fixtures.py` (read by medgen's own safetensors / torch.save reader through
//! `load_text_encoder`), and the errors of bad folders, configs and inputs.
mod common;

use common::{fixtures, max_abs, max_abs_diff};
use medgen::checkpoint::StateDict;
use medgen::text::clip_text_model::{
    load_text_encoder, normalize_text_encoder_keys, ClipActivation, ClipAttention, ClipOutputLayer, ClipTextConfig,
    ClipTextModel, LoadedTextEncoder, POSITION_IDS_KEY,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// fp32 CPU, both sides on one thread and the same libtorch: the bound on the max abs error.
const ABS_TOL: f64 = 1e-5;

struct Report {
    rows: Vec<String>,
    failures: Vec<String>,
}

impl Report {
    fn new() -> Self {
        Self { rows: Vec::new(), failures: Vec::new() }
    }

    fn check(&mut self, case: &str, what: &str, got: &Tensor, want: &Tensor) {
        if got.size() != want.size() {
            self.failures.push(format!("{case} {what}: shape {:?} vs {:?}", got.size(), want.size()));
            return;
        }
        let err = max_abs_diff(got, want);
        self.rows.push(format!("{case:26} {what:34} max_abs_err {err:.3e}  max|ref| {:.3e}", max_abs(want)));
        if err > ABS_TOL || err.is_nan() {
            self.failures.push(format!("{case} {what}: max abs error {err:e} > {ABS_TOL:e}"));
        }
    }

    fn finish(self, title: &str) {
        println!("{title}\n{}", self.rows.join("\n"));
        assert!(self.failures.is_empty(), "{} failures:\n{}", self.failures.len(), self.failures.join("\n"));
    }
}

fn root() -> PathBuf {
    fixtures().join("clip")
}

fn manifest() -> Vec<Value> {
    let path = root().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().expect("manifest cases").clone()
}

fn case_dir(name: &str) -> PathBuf {
    let d = root().join(name);
    assert!(d.is_dir(), "fixture case {} missing", d.display());
    d
}

fn io(dir: &Path) -> StateDict {
    StateDict::load(&dir.join("io.safetensors"), None).unwrap()
}

fn get(io: &StateDict, k: &str) -> Tensor {
    io.get(k).unwrap_or_else(|| panic!("fixture lacks {k}")).shallow_clone()
}

fn load(dir: &Path) -> LoadedTextEncoder {
    load_text_encoder(dir, Device::Cpu).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()))
}

fn has_note(enc: &LoadedTextEncoder, needle: &str) -> bool {
    enc.notes.iter().any(|n| n.contains(needle))
}

#[test]
fn clip_text_encoder_matches_transformers() {
    tch::set_num_threads(1);
    let _g = tch::no_grad_guard();
    let cases = manifest();
    let names: Vec<&str> = cases.iter().map(|c| c["case"].as_str().unwrap()).collect();
    for want in [
        "small_gelu",
        "small_quick_gelu",
        "small_gelu_new",
        "small_gelu_pytorch_tanh",
        "small_gelu_sharded",
        "small_gelu_bin4x",
        "small_quick_gelu_fp16",
        "full_clip_model",
        "sd21_text_encoder",
    ] {
        assert!(names.contains(&want), "fixture case {want} missing from the manifest ({names:?})");
    }
    let mut r = Report::new();
    let mut saw = BTreeMap::new();
    for c in &cases {
        let case = c["case"].as_str().unwrap();
        let dir = case_dir(c["dir"].as_str().unwrap());
        let mut enc = load(&dir);
        let cfg = enc.config.clone();
        println!("{case}: {}", enc.notes.join("; "));
        let act: ClipActivation = serde_json::from_value(c["hidden_act"].clone()).unwrap();
        assert_eq!(cfg.hidden_act, act, "{case}: activation");
        match c["layout"].as_str().unwrap() {
            "transformers-5" => assert!(has_note(&enc, "added the `text_model.` prefix"), "{case}: {:?}", enc.notes),
            "transformers-4" => {
                assert!(has_note(&enc, "read pytorch_model.bin"), "{case}: {:?}", enc.notes);
                assert!(has_note(&enc, "dropped the text_model.embeddings.position_ids"), "{case}: {:?}", enc.notes);
            }
            "clip-model" => {
                assert!(has_note(&enc, "full CLIP config"), "{case}: {:?}", enc.notes);
                assert!(has_note(&enc, "kept only the text tower"), "{case}: {:?}", enc.notes);
                assert!(has_note(&enc, "logit_scale"), "{case}: {:?}", enc.notes);
            }
            other => panic!("{case}: unknown layout {other}"),
        }
        if c["dtype"] == "float16" {
            assert!(has_note(&enc, "converted Half weights to float32"), "{case}: {:?}", enc.notes);
        }
        assert!(enc.vs.variables().values().all(|v| v.kind() == Kind::Float), "{case}: model must be float32");
        if case.ends_with("_sharded") {
            assert!(enc.weights.len() >= 2, "{case}: expected several shards, read {:?}", enc.weights);
        }
        if c["sd21"] == true {
            let sd21 = ClipTextConfig {
                vocab_size: 49408,
                hidden_size: 1024,
                intermediate_size: 4096,
                num_hidden_layers: 23,
                num_attention_heads: 16,
                max_position_embeddings: 77,
                hidden_act: ClipActivation::Gelu,
                layer_norm_eps: 1e-5,
            };
            assert_eq!(cfg, sd21, "{case}: the SD-2.1 text encoder sizes");
        }
        saw.insert(case.to_string(), ());

        let io = io(&dir);
        let batches = c["batches"].as_u64().unwrap();
        assert!(batches >= 3, "{case}: expected 3 input batches");
        for i in 0..batches {
            let ids = get(&io, &format!("ids.{i}"));
            assert_eq!(ids.kind(), Kind::Int64);
            let tag = |what: &str| format!("{what} [{i}: {:?}]", ids.size());
            let last = get(&io, &format!("last_hidden_state.{i}"));
            let pen = get(&io, &format!("penultimate.{i}"));
            let pen_ln = get(&io, &format!("penultimate_ln.{i}"));
            let m = &enc.model;
            r.check(case, &tag("last_hidden_state"), &m.forward(&ids).unwrap(), &last);
            r.check(
                case,
                &tag("hidden_states[-2]"),
                &m.forward_layer(&ids, ClipOutputLayer::PENULTIMATE).unwrap(),
                &pen,
            );
            r.check(
                case,
                &tag("clip_skip=1 (ln(hs[-2]))"),
                &m.forward_layer(&ids, ClipOutputLayer::clip_skip(1)).unwrap(),
                &pen_ln,
            );
            if i == 0 {
                // All hidden states at once: the same tensors as the selector gives.
                let hs = m.hidden_states(&ids).unwrap();
                assert_eq!(hs.len() as i64, cfg.num_hidden_layers + 1, "{case}: hidden_states count");
                r.check(case, &tag("hidden_states()[-2]"), &hs[hs.len() - 2], &pen);
                r.check(case, &tag("ln(hidden_states()[-1])"), &m.final_layer_norm(&hs[hs.len() - 1]), &last);
            }
            if let Some(sdpa_ref) = io.get(&format!("last_hidden_state_sdpa.{i}")) {
                enc.model.set_attention(ClipAttention::Sdpa);
                r.check(case, &tag("last_hidden_state sdpa vs HF sdpa"), &enc.model.forward(&ids).unwrap(), sdpa_ref);
                enc.model.set_attention(ClipAttention::Eager);
            }
        }
        // medgen's sdpa path against HF's eager reference: the two formulas agree to float32 rounding.
        enc.model.set_attention(ClipAttention::Sdpa);
        let ids = get(&io, "ids.0");
        r.check(
            case,
            "last_hidden_state sdpa vs HF eager [0]",
            &enc.model.forward(&ids).unwrap(),
            &get(&io, "last_hidden_state.0"),
        );
    }
    assert!(saw.contains_key("sd21_text_encoder"), "the SD-2.1-size case is missing");
    r.finish("CLIP text encoder parity (max abs error vs transformers):");
}

/// What transformers 5.24 writes (no `text_model.` prefix) and what 4.x files hold (prefix, position_ids).
#[test]
fn fixture_layouts_are_the_real_ones() {
    let sd5 = StateDict::load(&case_dir("small_gelu").join("model.safetensors"), None).unwrap();
    assert!(sd5.contains("embeddings.token_embedding.weight"));
    assert!(sd5.names().iter().all(|k| !k.starts_with("text_model.")), "{:?}", sd5.names());
    assert!(!sd5.names().iter().any(|k| k.contains("position_ids")));
    let sd4 = StateDict::load(&case_dir("small_gelu_bin4x").join("pytorch_model.bin"), None).unwrap();
    assert!(sd4.names().iter().all(|k| k.starts_with("text_model.")), "{:?}", sd4.names());
    let pos = sd4.get(POSITION_IDS_KEY).expect("the 4.x position_ids buffer");
    assert_eq!((pos.kind(), pos.size()), (Kind::Int64, vec![1, 77]));
    let full = StateDict::load(&case_dir("full_clip_model").join("model.safetensors"), None).unwrap();
    for k in ["logit_scale", "text_projection.weight", "visual_projection.weight"] {
        assert!(full.contains(k), "full CLIPModel lacks {k}");
    }
    assert!(full.names().iter().any(|k| k.starts_with("vision_model.")));
    let h = StateDict::load(&case_dir("small_quick_gelu_fp16").join("model.safetensors"), None).unwrap();
    assert!(h.iter().all(|(_, t)| t.kind() == Kind::Half));
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), to.display()));
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn write_json(p: &Path, v: &Value) {
    std::fs::write(p, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_has(e: &str, needles: &[&str]) {
    for n in needles {
        assert!(e.contains(n), "error lacks {n:?}:\n{e}");
    }
}

#[test]
fn folder_errors_name_the_path() {
    let src = case_dir("small_gelu");
    let gone = src.join("does_not_exist");
    assert_has(&err_of(load_text_encoder(&gone, Device::Cpu)), &["does_not_exist", "not found"]);

    let d = tmp();
    copy(&src.join("model.safetensors"), &d.path().join("model.safetensors"));
    let e = err_of(load_text_encoder(d.path(), Device::Cpu));
    assert_has(&e, &[&d.path().join("config.json").display().to_string(), "not found"]);

    let d = tmp();
    copy(&src.join("config.json"), &d.path().join("config.json"));
    let e = err_of(load_text_encoder(d.path(), Device::Cpu));
    assert_has(&e, &["no weights in", &d.path().display().to_string(), "model.safetensors", "pytorch_model.bin"]);
}

#[test]
fn safetensors_is_preferred_over_pytorch_model_bin() {
    let d = tmp();
    copy(&case_dir("small_gelu").join("config.json"), &d.path().join("config.json"));
    copy(&case_dir("small_gelu").join("model.safetensors"), &d.path().join("model.safetensors"));
    copy(&case_dir("small_gelu_bin4x").join("pytorch_model.bin"), &d.path().join("pytorch_model.bin"));
    let enc = load(d.path());
    assert_eq!(enc.weights, vec![d.path().join("model.safetensors")]);
    assert!(has_note(&enc, "read model.safetensors (also present: pytorch_model.bin)"), "{:?}", enc.notes);
}

#[test]
fn hidden_size_not_matching_the_weights_names_key_and_shapes() {
    let src = case_dir("small_gelu");
    let d = tmp();
    let mut cfg = read_json(&src.join("config.json"));
    cfg["hidden_size"] = json!(32);
    write_json(&d.path().join("config.json"), &cfg);
    copy(&src.join("model.safetensors"), &d.path().join("model.safetensors"));
    let e = err_of(load_text_encoder(d.path(), Device::Cpu));
    assert_has(
        &e,
        &[
            "model.safetensors",
            "config.json",
            "shape mismatch for text_model.embeddings.token_embedding.weight: model expects [1000, 32], checkpoint has \
             [1000, 64]",
            "shape mismatch for text_model.encoder.layers.2.mlp.fc1.weight: model expects [128, 32], checkpoint has \
             [128, 64]",
        ],
    );
}

#[test]
fn position_ids_that_are_not_arange_are_refused() {
    let src = case_dir("small_gelu_bin4x");
    let mut sd = StateDict::load(&src.join("pytorch_model.bin"), None).unwrap();
    let cfg = ClipTextConfig::from_file(&src.join("config.json")).unwrap();
    let mut clean = StateDict::load(&src.join("pytorch_model.bin"), None).unwrap();
    let notes = normalize_text_encoder_keys(&mut clean, &cfg).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(!clean.contains(POSITION_IDS_KEY));

    let pos = sd.remove(POSITION_IDS_KEY).unwrap();
    let shuffled = pos.copy();
    let _ = shuffled.get(0).get(5).fill_(9);
    sd.insert(POSITION_IDS_KEY, shuffled);
    let d = tmp();
    copy(&src.join("config.json"), &d.path().join("config.json"));
    sd.save_safetensors(&d.path().join("model.safetensors"), &BTreeMap::new()).unwrap();
    let e = err_of(load_text_encoder(d.path(), Device::Cpu));
    assert_has(&e, &[POSITION_IDS_KEY, "not arange(77)", "position 5 holds 9"]);

    let mut short = StateDict::new();
    short.insert(POSITION_IDS_KEY, Tensor::arange(76, (Kind::Int64, Device::Cpu)).unsqueeze(0));
    let e = err_of(normalize_text_encoder_keys(&mut short, &cfg));
    assert_has(&e, &[POSITION_IDS_KEY, "[1, 76]", "[1, 77]"]);
}

fn small_model() -> (VarStore, ClipTextModel) {
    let cfg = ClipTextConfig {
        vocab_size: 1000,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        ..Default::default()
    };
    let vs = VarStore::new(Device::Cpu);
    let m = ClipTextModel::new(&vs.root(), &cfg).unwrap();
    (vs, m)
}

#[test]
fn bad_input_ids_are_named_errors() {
    let _g = tch::no_grad_guard();
    let (_vs, m) = small_model();
    let ids = Tensor::zeros([2, 77], (Kind::Int64, Device::Cpu));
    let _ = ids.get(1).get(3).fill_(1000);
    let e = err_of(m.forward(&ids));
    assert_has(&e, &["token id 1000 at input_ids[1, 3]", "vocab_size 1000"]);
    let _ = ids.get(1).get(3).fill_(-1);
    assert_has(&err_of(m.forward(&ids)), &["token id -1 at input_ids[1, 3]"]);

    let long = Tensor::zeros([1, 78], (Kind::Int64, Device::Cpu));
    assert_has(&err_of(m.forward(&long)), &["sequence length 78", "max_position_embeddings (77)"]);
    assert_has(&err_of(m.forward(&Tensor::zeros([77], (Kind::Int64, Device::Cpu)))), &["(batch, sequence)", "[77]"]);
    assert_has(&err_of(m.forward(&Tensor::zeros([1, 5], (Kind::Float, Device::Cpu)))), &["integer token ids"]);
    let ok = Tensor::zeros([1, 5], (Kind::Int64, Device::Cpu));
    assert_has(&err_of(m.forward_layer(&ok, ClipOutputLayer::clip_skip(4))), &["cannot skip 4 layers", "with 3"]);
    // Skipping every layer is the embeddings' output (HF hidden_states[0]).
    let h0 = m.forward_layer(&ok, ClipOutputLayer { skip_last_layers: 3, final_layer_norm: false }).unwrap();
    assert!(h0.equal(&m.hidden_states(&ok).unwrap()[0]));
}

fn config_err(v: Value) -> String {
    err_of(ClipTextConfig::from_value(&v, "some/config.json"))
}

#[test]
fn configs_parse_as_transformers_reads_them() {
    // Defaults (openai/clip-vit-base-patch32) and ignored HF keys.
    let (cfg, note) = ClipTextConfig::from_value(
        &json!({"architectures": ["CLIPTextModel"], "torch_dtype":
        "float16", "projection_dim": 1024, "bos_token_id": 0, "model_type": "clip_text_model"}),
        "c",
    )
    .unwrap();
    assert_eq!((cfg, note), (ClipTextConfig::default(), None));
    assert_eq!(ClipTextConfig::default().hidden_act, ClipActivation::QuickGelu);

    // A full CLIPModel config: its text_config; with the older text_config_dict, that alone over the defaults
    // (transformers' reading: openai/clip-vit-large-patch14 lists only the sizes there).
    let full = ClipTextConfig::from_file(&case_dir("full_clip_model").join("config.json")).unwrap();
    assert_eq!((full.hidden_size, full.num_hidden_layers, full.hidden_act), (64, 3, ClipActivation::QuickGelu));
    let (cfg, note) = ClipTextConfig::from_value(
        &json!({"model_type": "clip", "text_config": {"hidden_size": 768, "num_attention_heads": 12,
                "hidden_act": "gelu", "vocab_size": 100}, "text_config_dict": {"hidden_size": 768,
                "num_attention_heads": 12}, "vision_config": {"hidden_size": 1024}}),
        "full.json",
    )
    .unwrap();
    let want = (768, 12, ClipActivation::QuickGelu, 49408);
    assert_eq!((cfg.hidden_size, cfg.num_attention_heads, cfg.hidden_act, cfg.vocab_size), want);
    assert!(note.unwrap().contains("full CLIP config: used its text_config_dict"));
    let (cfg, _) = ClipTextConfig::from_value(&json!({"text_config": {"hidden_act": "gelu"}}), "c").unwrap();
    assert_eq!(cfg.hidden_act, ClipActivation::Gelu);
    for act in ["gelu_new", "gelu_pytorch_tanh"] {
        assert!(ClipTextConfig::from_value(&json!({ "hidden_act": act }), "c").is_ok());
    }

    assert_has(&config_err(json!({"model_type": "clip_vision_model"})), &["some/config.json", "clip_vision_model"]);
    assert_has(&config_err(json!({"model_type": "bert", "hidden_size": 64})), &["some/config.json", "\"bert\""]);
    assert_has(&config_err(json!({"hidden_act": "relu"})), &["some/config.json", "hidden_act \"relu\"", "quick_gelu"]);
    assert_has(
        &config_err(json!({"hidden_size": 64, "num_attention_heads": 5})),
        &["some/config.json", "hidden_size (64) must be divisible by num_attention_heads (5)"],
    );
    assert_has(&config_err(json!({"num_hidden_layers": 0})), &["some/config.json", "num_hidden_layers"]);
    assert_has(&config_err(json!({"vocab_size": "many"})), &["some/config.json"]);
    assert_has(
        &config_err(json!({"model_type": "clip", "text_config": {"model_type": "clip_vision_model"}})),
        &["text_config.model_type"],
    );

    let d = tmp();
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    assert_has(&err_of(ClipTextConfig::from_file(&d.path().join("config.json"))), &["config.json", "not valid JSON"]);
}
