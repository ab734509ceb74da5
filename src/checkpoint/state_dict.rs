//! A flat, ordered `name -> tensor` map read from any supported checkpoint file, with the
//! choices made on the way (sub-dict selected, prefix stripped, entries skipped) recorded.
use super::pickle::Value;
use super::safetensors_file;
use super::torch_file::TorchFile;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::Tensor;

/// Prefixes that wrappers add to every key: `DataParallel`/DDP and `torch.compile`.
const WRAPPER_PREFIXES: &[&str] = &["module.", "_orig_mod."];

#[derive(Debug, Default)]
pub struct StateDict {
    names: Vec<String>,
    tensors: HashMap<String, Tensor>,
    /// Safetensors header metadata (empty for torch files).
    pub metadata: BTreeMap<String, String>,
    /// What the reader decided on the user's behalf, for reporting.
    pub notes: Vec<String>,
}

impl StateDict {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        let name = name.into();
        if self.tensors.insert(name.clone(), t).is_none() {
            self.names.push(name);
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        let t = self.tensors.remove(name)?;
        self.names.retain(|n| n != name);
        Some(t)
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Names in file order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.names.iter().map(move |n| (n, &self.tensors[n]))
    }

    /// Reads a checkpoint: `.safetensors`, or a `torch.save` file (zip or legacy).
    ///
    /// `key` selects a sub-dict of a training checkpoint (`state_dict`, `model.ema`, ...);
    /// without it the reader uses the top level when it holds tensors, or the one sub-dict
    /// that does (preferring `state_dict` when there are several), and says so in `notes`.
    pub fn load(path: &Path, key: Option<&str>) -> Result<Self> {
        let mut sd = if safetensors_file::looks_like(path)? {
            if let Some(k) = key {
                bail!("--key {k:?} applies to torch.save checkpoints, but {} is a safetensors file", path.display());
            }
            safetensors_file::read(path)?
        } else {
            let mut file = TorchFile::open(path)?;
            let root = file.root.clone();
            let mut sd = StateDict::new();
            let (selected, label) =
                select(&root, key, file.pickle_bytes()).with_context(|| format!("in {}", path.display()))?;
            if let Some(label) = label {
                sd.notes.push(label);
            }
            let mut refs = Vec::new();
            let mut walk = Walk {
                out: &mut refs,
                notes: &mut sd.notes,
                entries: 0,
                name_bytes: 0,
                max_entries: max_entries(file.pickle_bytes()),
            };
            walk.flatten(&selected, String::new(), 0).with_context(|| format!("in {}", path.display()))?;
            for (name, t) in refs {
                let tensor =
                    file.tensor(&t).with_context(|| format!("tensor {name:?} in {}", file.path().display()))?;
                sd.insert(name, tensor);
            }
            sd
        };
        if sd.is_empty() {
            bail!("{} holds no tensors", path.display());
        }
        sd.strip_wrapper_prefix();
        Ok(sd)
    }

    fn strip_wrapper_prefix(&mut self) {
        for prefix in WRAPPER_PREFIXES {
            if self.names.iter().all(|n| n.starts_with(prefix)) {
                let old = std::mem::take(&mut self.names);
                let mut tensors = std::mem::take(&mut self.tensors);
                for n in old {
                    let t = tensors.remove(&n).unwrap();
                    self.insert(n[prefix.len()..].to_string(), t);
                }
                self.notes.push(format!("stripped the `{prefix}` prefix from every key"));
            }
        }
    }

    pub fn save_safetensors(&self, path: &Path, metadata: &BTreeMap<String, String>) -> Result<()> {
        safetensors_file::write(path, self.iter(), metadata)
    }
}

fn dict_get(d: &Value, key: &str) -> Option<Value> {
    let Value::Dict(d) = d else { return None };
    d.borrow().iter().find(|(k, _)| key_string(k).as_deref() == Some(key)).map(|(_, v)| v.clone())
}

fn key_string(k: &Value) -> Option<String> {
    match k {
        Value::Str(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Follows a dotted key through nested dicts; a key that itself contains dots is tried whole
/// first, as checkpoints may use such names.
fn lookup(v: &Value, key: &str) -> Option<Value> {
    if let Some(x) = dict_get(v, key) {
        return Some(x);
    }
    let mut idx = key.len();
    while let Some(i) = key[..idx].rfind('.') {
        if let Some(head) = dict_get(v, &key[..i]) {
            if let Some(x) = lookup(&head, &key[i + 1..]) {
                return Some(x);
            }
        }
        idx = i;
    }
    None
}

/// Nesting deeper than this is refused: no real checkpoint comes close, and it bounds recursion.
const MAX_DEPTH: usize = 64;
/// Bytes of key names (joined with dots) a walk may build; see [`max_entries`].
const MAX_NAME_BYTES: usize = 64 << 20;

/// Entries a walk through a checkpoint's dicts may visit. A pickle can share one dict under many
/// keys (memo references), so a few hundred bytes can describe a tree with 2^60 paths; without
/// sharing, every entry takes at least 3 bytes of pickle (key, value, its share of SETITEMS).
fn max_entries(pickle_bytes: usize) -> usize {
    4096 + pickle_bytes / 3
}

/// Tensors under `v`, visiting at most `limit` entries in all (`visits` is shared by every call
/// for one file).
fn count_tensors(v: &Value, visits: &mut usize, limit: usize) -> usize {
    fn go(v: &Value, depth: usize, visits: &mut usize, limit: usize) -> usize {
        *visits += 1;
        match v {
            Value::Tensor(_) => 1,
            Value::Dict(d) if depth < MAX_DEPTH => {
                let mut n = 0;
                for (_, x) in d.borrow().iter() {
                    if *visits >= limit {
                        break;
                    }
                    n += go(x, depth + 1, visits, limit);
                }
                n
            }
            _ => 0,
        }
    }
    go(v, 0, visits, limit)
}

fn is_optimizer_state(v: &Value) -> bool {
    dict_get(v, "param_groups").is_some() && dict_get(v, "state").is_some()
}

fn top_keys(v: &Value) -> Vec<String> {
    match v {
        Value::Dict(d) => d
            .borrow()
            .iter()
            .map(|(k, v)| format!("{} ({})", key_string(k).unwrap_or_else(|| k.describe()), v.type_name()))
            .collect(),
        _ => vec![],
    }
}

fn select(root: &Value, key: Option<&str>, pickle_bytes: usize) -> Result<(Value, Option<String>)> {
    let limit = max_entries(pickle_bytes);
    if !matches!(root, Value::Dict(_)) {
        bail!("the checkpoint's top level is a {}, not a dict of tensors", root.type_name());
    }
    if let Some(key) = key {
        let v = lookup(root, key)
            .ok_or_else(|| anyhow!("key {key:?} not found; top-level entries: {}", top_keys(root).join(", ")))?;
        if !matches!(v, Value::Dict(_)) {
            bail!("entry {key:?} is a {}, not a dict of tensors", v.type_name());
        }
        return Ok((v, Some(format!("used the entry {key:?} of the checkpoint"))));
    }
    let Value::Dict(d) = root else { unreachable!() };
    let direct = d.borrow().iter().any(|(_, v)| matches!(v, Value::Tensor(_)));
    if direct {
        return Ok((root.clone(), None));
    }
    let mut visits = 0;
    let candidates: Vec<(String, Value)> = d
        .borrow()
        .iter()
        .filter(|(_, v)| count_tensors(v, &mut visits, limit) > 0 && !is_optimizer_state(v))
        .filter_map(|(k, v)| Some((key_string(k)?, v.clone())))
        .collect();
    if visits >= limit {
        bail!(
            "the checkpoint has more than {limit} entries for its {pickle_bytes} bytes of pickle \
             (dicts shared under several keys): refusing"
        );
    }
    let mut visits = 0;
    match candidates.as_slice() {
        [] => bail!("no state dict found; top-level entries: {}", top_keys(root).join(", ")),
        [(k, v)] => Ok((v.clone(), Some(format!("used the entry {k:?} (the only state dict in the checkpoint)")))),
        many => {
            if let Some((k, v)) = many.iter().find(|(k, _)| k == "state_dict") {
                let others: Vec<&str> = many.iter().filter(|(o, _)| o != k).map(|(o, _)| o.as_str()).collect();
                Ok((
                    v.clone(),
                    Some(format!("used the entry \"state_dict\"; also present: {others:?} (choose with --key)")),
                ))
            } else {
                let names: Vec<String> = many
                    .iter()
                    .map(|(k, v)| format!("{k:?} ({} tensors)", count_tensors(v, &mut visits, limit)))
                    .collect();
                bail!("the checkpoint holds several state dicts: {}; choose one with --key", names.join(", "))
            }
        }
    }
}

/// Collects the tensors under a dict with their dotted names, within [`max_entries`] and
/// [`MAX_NAME_BYTES`].
struct Walk<'a> {
    out: &'a mut Vec<(String, super::pickle::TensorRef)>,
    notes: &'a mut Vec<String>,
    entries: usize,
    name_bytes: usize,
    max_entries: usize,
}

impl Walk<'_> {
    fn flatten(&mut self, v: &Value, prefix: String, depth: usize) -> Result<()> {
        self.entries += 1;
        self.name_bytes += prefix.len();
        if self.entries > self.max_entries || self.name_bytes > MAX_NAME_BYTES {
            bail!(
                "more than {} entries or {} MiB of key names (at {:?}; dicts shared under several keys?): refusing",
                self.max_entries,
                MAX_NAME_BYTES >> 20,
                short(&prefix)
            );
        }
        match v {
            Value::Tensor(t) => {
                self.out.push((prefix, (**t).clone()));
                Ok(())
            }
            Value::Dict(_) if depth >= MAX_DEPTH => {
                bail!("dicts nested more than {MAX_DEPTH} levels deep at {:?}", short(&prefix))
            }
            Value::Dict(d) => {
                for (k, v) in d.borrow().iter() {
                    let k = key_string(k)
                        .ok_or_else(|| anyhow!("non-string key {} under {:?}", k.describe(), short(&prefix)))?;
                    let name = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
                    self.flatten(v, name, depth + 1)?;
                }
                Ok(())
            }
            other => {
                self.notes.push(format!("skipped non-tensor entry {prefix:?} ({})", other.type_name()));
                Ok(())
            }
        }
    }
}

/// A key name cut for an error message (names built from a hostile file can be huge).
fn short(name: &str) -> String {
    match name.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &name[..i]),
        None => name.to_string(),
    }
}
