//! The CLIP tokenizer against `transformers.CLIPTokenizer` (tests/gen_tokenizer_fixtures.py): every
//! source medgen reads (the canonical `.gz` vocabulary, a vocab.json + merges.txt folder, a
//! tokenizer.json), both padding conventions, 240+ prompts.
mod common;

use common::fixtures;
use medgen::text::tokenizer::{ClipTokenizer, EOS_TOKEN};
use serde_json::Value;
use std::path::PathBuf;

fn bpe_vocab() -> PathBuf {
    let p = std::env::var_os("MEDGEN_CLIP_VOCAB").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/share/clip/bpe_simple_vocab_16e6.txt.gz")
    });
    assert!(p.is_file(), "CLIP BPE vocabulary not found at {} (run `make setup`)", p.display());
    p
}

fn reference() -> (PathBuf, Vec<String>, Value) {
    let root = fixtures().join("tokenizer");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(root.join("ids.json")).unwrap()).unwrap();
    let prompts: Vec<String> = v["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().into()).collect();
    assert!(prompts.len() >= 200, "expected at least 200 prompts, found {}", prompts.len());
    (root, prompts, v)
}

fn check(name: &str, tok: &ClipTokenizer, prompts: &[String], want: &Value) {
    let want = want.as_array().unwrap();
    let mut mismatches = Vec::new();
    for (p, w) in prompts.iter().zip(want) {
        let w: Vec<i64> = w.as_array().unwrap().iter().map(|i| i.as_i64().unwrap()).collect();
        let got = tok.encode(p).unwrap();
        if got != w {
            mismatches.push(format!("{p:?}\n  medgen       {got:?}\n  transformers {w:?}"));
        }
    }
    println!("{name}: {} prompts, {} mismatches", prompts.len(), mismatches.len());
    assert!(
        mismatches.is_empty(),
        "{name}: {} of {} prompts differ:\n{}",
        mismatches.len(),
        prompts.len(),
        mismatches.join("\n")
    );
}

#[test]
fn token_ids_match_transformers_for_every_source_and_padding() {
    let (root, prompts, v) = reference();
    let gz = bpe_vocab();
    for (conv, pad) in [("sd2", "!"), ("sd1", EOS_TOKEN)] {
        let want = &v[conv];
        check(
            &format!("{conv} from the .gz vocabulary"),
            &ClipTokenizer::load(&gz, Some(pad)).unwrap(),
            &prompts,
            want,
        );
        // The folder's own special_tokens_map.json gives the pad token.
        let folder = ClipTokenizer::load(&root.join(conv), None).unwrap();
        assert_eq!(folder.pad_token(), pad);
        check(&format!("{conv} from vocab.json + merges.txt"), &folder, &prompts, want);
        let json = ClipTokenizer::load(&root.join(format!("{conv}-json/tokenizer.json")), None).unwrap();
        check(&format!("{conv} from tokenizer.json"), &json, &prompts, want);
    }
}

/// reference-repo.md §3.4: the three token sequences the reference uses.
#[test]
fn reference_prompts() {
    let tok = ClipTokenizer::load(&bpe_vocab(), Some("!")).unwrap();
    let ids = tok.encode("T1-weighted image of a brain.").unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[..11], [49406, 339, 272, 268, 43179, 2867, 539, 320, 4812, 269, 49407]);
    assert!(ids[11..].iter().all(|&i| i == 0), "SD-2.x pads with '!' = 0");
    let empty = tok.encode("").unwrap();
    assert_eq!(empty[..2], [49406, 49407]);
    assert!(empty[2..].iter().all(|&i| i == 0));
    let null = tok.training_null_ids();
    assert_eq!(null[0], 49406);
    assert!(null[1..].iter().all(|&i| i == 49407) && null.len() == 77);
    assert_eq!(tok.tokens(&ids[1..4]), ["t</w>", "1</w>", "-</w>"]);
    let sd1 = ClipTokenizer::load(&bpe_vocab(), Some(EOS_TOKEN)).unwrap();
    assert!(sd1.encode("").unwrap()[1..].iter().all(|&i| i == 49407));
    // Truncation keeps the end token last.
    let long = tok.encode(&"brain ".repeat(200)).unwrap();
    assert_eq!((long.len(), long[76]), (77, 49407));
    let batch = tok.encode_batch(&["a", "b c"]).unwrap();
    assert_eq!(batch.size(), [2, 77]);
}

#[test]
fn bad_tokenizer_sources_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let e = format!("{:#}", ClipTokenizer::load(&bpe_vocab(), None).unwrap_err());
    assert!(e.contains("does not say which token pads") && e.contains("bpe_simple_vocab"), "{e}");
    let e = format!("{:#}", ClipTokenizer::load(&tmp.path().join("nope.txt"), Some("!")).unwrap_err());
    assert!(e.contains("nope.txt") && e.contains("not found"), "{e}");
    let e = format!("{:#}", ClipTokenizer::load(tmp.path(), Some("!")).unwrap_err());
    assert!(e.contains("neither tokenizer.json nor vocab.json"), "{e}");
    let bad = tmp.path().join("short.txt");
    std::fs::write(&bad, "#version\na b\n").unwrap();
    let e = format!("{:#}", ClipTokenizer::load(&bad, Some("!")).unwrap_err());
    assert!(e.contains("short.txt") && e.contains("lines"), "{e}");
    let e = format!("{:#}", ClipTokenizer::load(&bpe_vocab(), Some("<pad>")).unwrap_err());
    assert!(e.contains("no token \"<pad>\""), "{e}");
    let json = tmp.path().join("tokenizer.json");
    std::fs::write(&json, "{\"not\": \"a tokenizer\"}").unwrap();
    let e = format!("{:#}", ClipTokenizer::load(&json, Some("!")).unwrap_err());
    assert!(e.contains("tokenizer.json") && e.contains("not a tokenizer.json"), "{e}");
}
