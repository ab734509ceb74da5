//! The CLIP tokenizer, on the `tokenizers` crate: the pipeline of `transformers.CLIPTokenizer`
//! (NFC, whitespace runs to one space, lower case; CLIP's word/number/punctuation split; byte-level
//! BPE with a `</w>` end-of-word suffix; `<|startoftext|> … <|endoftext|>`; padding and truncation
//! to 77), built from any of the files a team has:
//!
//! * a Hugging Face `tokenizer.json`;
//! * a Hugging Face tokenizer folder with `vocab.json` + `merges.txt` (what the Stable Diffusion
//!   repositories ship), whose `special_tokens_map.json` / `tokenizer_config.json` give the pad
//!   token and the length;
//! * OpenAI's `bpe_simple_vocab_16e6.txt[.gz]` (the canonical merges; it ships in the
//!   `open-clip-torch` wheel).
//!
//! The model families pad differently: SD-2.x with `!` (id 0), SD-1.x with `<|endoftext|>`.
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;
use std::io::Read;
use std::path::Path;
use tch::Tensor;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

pub const BOS_TOKEN: &str = "<|startoftext|>";
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// CLIP's context length.
pub const MAX_LENGTH: usize = 77;
/// CLIP's pre-tokenisation: the special tokens, English contractions, letter runs, single
/// digits, and runs of anything else but spaces.
const CLIP_SPLIT: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// Merges the canonical vocabulary file contributes (OpenAI's `SimpleTokenizer` takes lines
/// 1..=48894: 49408 tokens = 2 x 256 bytes + 48894 merges + 2 special).
const BPE_FILE_MERGES: usize = 49152 - 256 - 2;

pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    pad_token: String,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("max_length", &self.max_length)
            .field("pad_token", &self.pad_token)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// What a Hugging Face tokenizer folder says about padding and length.
#[derive(Default)]
struct FolderSettings {
    pad_token: Option<String>,
    max_length: Option<usize>,
}

/// A special token in `special_tokens_map.json` / `tokenizer_config.json`: a string, or an
/// object with `content`.
fn token_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

fn folder_settings(dir: &Path) -> Result<FolderSettings> {
    let mut s = FolderSettings::default();
    // tokenizer_config.json wins, as in transformers.
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let p = dir.join(name);
        if !p.is_file() {
            continue;
        }
        let v = read_json(&p)?;
        if let Some(t) = v.get("pad_token").and_then(token_string) {
            s.pad_token = Some(t);
        }
        if let Some(n) = v.get("model_max_length").and_then(|n| n.as_u64()) {
            // transformers writes a huge sentinel when a tokenizer has no length of its own.
            if n < 1_000_000 {
                s.max_length = Some(n as usize);
            }
        }
    }
    Ok(s)
}

/// GPT-2's reversible byte-to-character map that byte-level BPE vocabularies are written in:
/// printable bytes stand for themselves, the others for code points from 256 up.
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut order: Vec<(u32, u32)> = (0..256).filter(|&b| printable(b)).map(|b| (b, b)).collect();
    let mut n = 0;
    for b in 0..256 {
        if !printable(b) {
            order.push((b, 256 + n));
            n += 1;
        }
    }
    order.into_iter().map(|(_, c)| char::from_u32(c).expect("valid code point")).collect()
}

impl ClipTokenizer {
    /// Loads any of the supported sources (see the module docs). `pad_token` overrides what the
    /// files say; it is required when they say nothing (the BPE vocabulary file).
    pub fn load(path: &Path, pad_token: Option<&str>) -> Result<Self> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if path.is_dir() {
            let settings = folder_settings(path)?;
            let pad = pad_token.map(str::to_string).or(settings.pad_token);
            let max_length = settings.max_length.unwrap_or(MAX_LENGTH);
            let json = path.join("tokenizer.json");
            if json.is_file() {
                return Self::from_tokenizer_json(&json, pad.as_deref(), max_length);
            }
            let (vocab, merges) = (path.join("vocab.json"), path.join("merges.txt"));
            ensure!(
                vocab.is_file() && merges.is_file(),
                "{} holds neither tokenizer.json nor vocab.json + merges.txt",
                path.display()
            );
            let pad = pad.ok_or_else(|| no_pad_error(path))?;
            return Self::from_vocab_merges(&vocab, &merges, &pad, max_length);
        }
        ensure!(path.is_file(), "tokenizer {} not found", path.display());
        if name.ends_with(".json") {
            // A tokenizer.json next to its tokenizer_config.json (a Hugging Face folder).
            let settings = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => folder_settings(d)?,
                _ => FolderSettings::default(),
            };
            let pad = pad_token.map(str::to_string).or(settings.pad_token);
            return Self::from_tokenizer_json(path, pad.as_deref(), settings.max_length.unwrap_or(MAX_LENGTH));
        }
        let pad = pad_token.ok_or_else(|| no_pad_error(path))?;
        Self::from_bpe_vocab(path, pad)
    }

    /// OpenAI's `bpe_simple_vocab_16e6.txt` (gzip-compressed or not).
    pub fn from_bpe_vocab(path: &Path, pad_token: &str) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let text = if bytes.starts_with(&[0x1f, 0x8b]) {
            let mut s = String::new();
            flate2::read::GzDecoder::new(bytes.as_slice())
                .read_to_string(&mut s)
                .with_context(|| format!("{} is not a valid gzip text file", path.display()))?;
            s
        } else {
            String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8 text", path.display()))?
        };
        let lines: Vec<&str> = text.split('\n').collect();
        ensure!(
            lines.len() > BPE_FILE_MERGES,
            "{}: {} lines, a CLIP BPE vocabulary has at least {}",
            path.display(),
            lines.len(),
            BPE_FILE_MERGES + 1
        );
        let merges = lines[1..=BPE_FILE_MERGES]
            .iter()
            .enumerate()
            .map(|(i, l)| parse_merge(l).with_context(|| format!("{} line {}", path.display(), i + 2)))
            .collect::<Result<Vec<_>>>()?;
        let bytes = bytes_to_unicode();
        let mut tokens: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
        tokens.extend(bytes.iter().map(|c| format!("{c}</w>")));
        tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.extend([BOS_TOKEN.to_string(), EOS_TOKEN.to_string()]);
        let vocab: Vocab = tokens.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
        Self::build(vocab, merges, pad_token, MAX_LENGTH, &path.display().to_string())
    }

    /// A Hugging Face `vocab.json` + `merges.txt` pair.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path, pad_token: &str, max_length: usize) -> Result<Self> {
        let v = read_json(vocab)?;
        let obj = v.as_object().ok_or_else(|| anyhow!("{}: expected a token -> id object", vocab.display()))?;
        let vocab_map = obj
            .iter()
            .map(|(k, id)| {
                let id = id.as_u64().and_then(|i| u32::try_from(i).ok());
                Ok((k.clone(), id.ok_or_else(|| anyhow!("{}: id of {k:?} is not an integer", vocab.display()))?))
            })
            .collect::<Result<Vocab>>()?;
        let text = std::fs::read_to_string(merges).with_context(|| format!("cannot read {}", merges.display()))?;
        let merge_list = text
            .lines()
            .enumerate()
            .filter(|(i, l)| !(l.is_empty() || (*i == 0 && l.starts_with("#version"))))
            .map(|(i, l)| parse_merge(l).with_context(|| format!("{} line {}", merges.display(), i + 1)))
            .collect::<Result<Vec<_>>>()?;
        Self::build(vocab_map, merge_list, pad_token, max_length, &vocab.display().to_string())
    }

    /// A Hugging Face `tokenizer.json`, used as it is (normaliser, pre-tokeniser, model); only
    /// padding and truncation are set here. Without a pad token from the caller, the file's own
    /// padding configuration gives it.
    pub fn from_tokenizer_json(path: &Path, pad_token: Option<&str>, max_length: usize) -> Result<Self> {
        let tokenizer =
            Tokenizer::from_file(path).map_err(|e| anyhow!("{}: not a tokenizer.json: {e}", path.display()))?;
        let pad = match pad_token {
            Some(p) => p.to_string(),
            None => tokenizer.get_padding().map(|p| p.pad_token.clone()).ok_or_else(|| no_pad_error(path))?,
        };
        Self::finish(tokenizer, &pad, max_length, &path.display().to_string())
    }

    fn build(
        vocab: Vocab,
        merges: Vec<(String, String)>,
        pad_token: &str,
        max_length: usize,
        source: &str,
    ) -> Result<Self> {
        for t in [BOS_TOKEN, EOS_TOKEN] {
            ensure!(vocab.contains_key(t), "{source}: the vocabulary lacks {t}");
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(EOS_TOKEN.to_string())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .fuse_unk(false)
            .build()
            .map_err(|e| anyhow!("{source}: cannot build the BPE model: {e}"))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let err = |e| anyhow!("{source}: {e}");
        tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")
                .map_err(err)?
                .into(),
            Lowercase.into(),
        ])));
        let split =
            Split::new(SplitPattern::Regex(CLIP_SPLIT.into()), tokenizers::SplitDelimiterBehavior::Removed, true)
                .map_err(err)?;
        // The byte-level step keeps its own (GPT-2) regex split, as transformers configures it.
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        let bos = tokenizer.token_to_id(BOS_TOKEN).expect("checked above");
        let eos = tokenizer.token_to_id(EOS_TOKEN).expect("checked above");
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new((EOS_TOKEN.into(), eos), (BOS_TOKEN.into(), bos))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        Self::finish(tokenizer, pad_token, max_length, source)
    }

    /// Padding, truncation and the special tokens. transformers registers the pad, start and end
    /// tokens as special added tokens, so a `!` in a prompt is split off on its own under SD-2.x
    /// padding ("wow!!" is `wow`, `!`, `!`): reproduced.
    fn finish(mut tokenizer: Tokenizer, pad_token: &str, max_length: usize, source: &str) -> Result<Self> {
        ensure!(max_length >= 2, "{source}: max_length {max_length} leaves no room for the start and end tokens");
        let id =
            |t: &str| tokenizer.token_to_id(t).ok_or_else(|| anyhow!("{source}: the vocabulary has no token {t:?}"));
        let (bos_id, eos_id, pad_id) = (id(BOS_TOKEN)?, id(EOS_TOKEN)?, id(pad_token)?);
        let specials: Vec<AddedToken> =
            [pad_token, BOS_TOKEN, EOS_TOKEN].iter().map(|t| AddedToken::from(t.to_string(), true)).collect();
        tokenizer.add_special_tokens(&specials);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| anyhow!("{source}: {e}"))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad_token.to_string(),
        }));
        Ok(Self { tokenizer, max_length, bos_id, eos_id, pad_id, pad_token: pad_token.to_string() })
    }

    /// `max_length` ids: start token, the prompt's tokens (truncated), end token, padding.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| anyhow!("cannot tokenize {text:?}: {e}"))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// `(len, max_length)` int64 ids.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(texts.len() * self.max_length);
        for t in texts {
            ids.extend(self.encode(t)?);
        }
        Ok(Tensor::from_slice(&ids).view([texts.len() as i64, self.max_length as i64]))
    }

    /// The token strings of ids (for showing what a prompt became).
    pub fn tokens(&self, ids: &[i64]) -> Vec<String> {
        ids.iter().map(|&i| self.tokenizer.id_to_token(i as u32).unwrap_or_else(|| format!("<{i}>"))).collect()
    }

    /// The reference training script's classifier-free-guidance drop: `[BOS] + [EOS] * 76`,
    /// hard-coded there. It is not what `""` tokenizes to under SD-2.x padding
    /// (`[BOS, EOS, 0, ...]`), which is what the reference samples with.
    pub fn training_null_ids(&self) -> Vec<i64> {
        let mut ids = vec![self.bos_id as i64];
        ids.extend(std::iter::repeat_n(self.eos_id as i64, self.max_length - 1));
        ids
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }
    pub fn pad_token(&self) -> &str {
        &self.pad_token
    }
    pub fn pad_id(&self) -> i64 {
        self.pad_id as i64
    }
    pub fn bos_id(&self) -> i64 {
        self.bos_id as i64
    }
    pub fn eos_id(&self) -> i64 {
        self.eos_id as i64
    }
}

fn parse_merge(line: &str) -> Result<(String, String)> {
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => Ok((a.to_string(), b.to_string())),
        _ => bail!("a merge is two space-separated symbols, got {line:?}"),
    }
}

fn no_pad_error(path: &Path) -> anyhow::Error {
    anyhow!(
        "{} does not say which token pads: give one (`!` for Stable Diffusion 2.x, `{EOS_TOKEN}` for 1.x)",
        path.display()
    )
}
