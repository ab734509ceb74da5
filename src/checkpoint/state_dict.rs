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
            let (selected, label) = select(&root, key).with_context(|| format!("in {}", path.display()))?;
            if let Some(label) = label {
                sd.notes.push(label);
            }
            let mut refs = Vec::new();
            flatten(&selected, String::new(), 0, &mut refs, &mut sd.notes)?;
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

fn count_tensors(v: &Value) -> usize {
    fn go(v: &Value, depth: usize) -> usize {
        match v {
            Value::Tensor(_) => 1,
            Value::Dict(d) if depth < MAX_DEPTH => d.borrow().iter().map(|(_, v)| go(v, depth + 1)).sum(),
            _ => 0,
        }
    }
    go(v, 0)
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

fn select(root: &Value, key: Option<&str>) -> Result<(Value, Option<String>)> {
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
    let candidates: Vec<(String, Value)> = d
        .borrow()
        .iter()
        .filter(|(_, v)| count_tensors(v) > 0 && !is_optimizer_state(v))
        .filter_map(|(k, v)| Some((key_string(k)?, v.clone())))
        .collect();
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
                let names: Vec<String> =
                    many.iter().map(|(k, v)| format!("{k:?} ({} tensors)", count_tensors(v))).collect();
                bail!("the checkpoint holds several state dicts: {}; choose one with --key", names.join(", "))
            }
        }
    }
}

fn flatten(
    v: &Value,
    prefix: String,
    depth: usize,
    out: &mut Vec<(String, super::pickle::TensorRef)>,
    notes: &mut Vec<String>,
) -> Result<()> {
    match v {
        Value::Tensor(t) => {
            out.push((prefix, t.clone()));
            Ok(())
        }
        Value::Dict(_) if depth >= MAX_DEPTH => {
            bail!("dicts nested more than {MAX_DEPTH} levels deep at {prefix:?}")
        }
        Value::Dict(d) => {
            for (k, v) in d.borrow().iter() {
                let k = key_string(k).ok_or_else(|| anyhow!("non-string key {} under {prefix:?}", k.describe()))?;
                let name = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
                flatten(v, name, depth + 1, out, notes)?;
            }
            Ok(())
        }
        other => {
            notes.push(format!("skipped non-tensor entry {prefix:?} ({})", other.type_name()));
            Ok(())
        }
    }
}
