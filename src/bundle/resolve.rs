//! A MONAI bundle's config files read as `monai.bundle.ConfigParser` reads them, as far as the generative bundles
//! use its syntax: `@id` references (ids are `#`-separated paths through objects and lists), `$` expressions, and
//! the `_target_` / `_requires_` / `_disabled_` / `_desc_` / `_mode_` keys. medgen never runs Python: of the
//! expressions it evaluates only the small language the bundles write their values in (string and list
//! concatenation of references and literals, e.g. `$@bundle_root + '/models/model.pt'`, `$[1] + @latent_shape`);
//! anything else it needs is an error that quotes the expression.
//!
//! Written by hand: no Rust crate reads MONAI bundle configs.
use anyhow::{bail, ensure, Context, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// References deeper than this are a cycle (or a config no bundle writes).
const MAX_DEPTH: usize = 64;

/// The merged top-level namespace of a bundle's config files.
#[derive(Debug)]
pub struct BundleConfig {
    pub dir: PathBuf,
    root: Map<String, Value>,
    /// Which file each top-level key came from, for error messages.
    origin: Vec<(String, PathBuf)>,
    /// How deep the reference being followed is (through values and expressions), to stop cycles.
    depth: std::cell::Cell<usize>,
}

/// Counts one level of reference following while alive.
struct Level<'a>(&'a std::cell::Cell<usize>);

impl<'a> Level<'a> {
    fn enter(depth: &'a std::cell::Cell<usize>) -> Result<Self> {
        ensure!(depth.get() < MAX_DEPTH, "references nest more than {MAX_DEPTH} deep (a cycle?)");
        depth.set(depth.get() + 1);
        Ok(Self(depth))
    }
}

impl Drop for Level<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

impl BundleConfig {
    /// `configs/inference.json`, then the `configs/train*.json` files for the keys it lacks (where some bundles define
    /// the networks they train): the inference file wins, as it is the one that samples.
    pub fn read(dir: &Path) -> Result<Self> {
        let configs = dir.join("configs");
        let inference = configs.join("inference.json");
        if !inference.is_file() {
            let yaml = configs.join("inference.yaml");
            ensure!(
                !yaml.is_file(),
                "{}: YAML bundle configs are not read by medgen; convert it to JSON (same keys) first",
                yaml.display()
            );
            bail!("{} is not a MONAI bundle: it has no configs/inference.json", dir.display());
        }
        let mut files = vec![inference];
        let mut train: Vec<PathBuf> = std::fs::read_dir(&configs)
            .with_context(|| format!("cannot list {}", configs.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                name.starts_with("train") && name.ends_with(".json")
            })
            .collect();
        train.sort();
        files.extend(train);
        let mut root = Map::new();
        let mut origin = Vec::new();
        for f in &files {
            let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
            let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", f.display()))?;
            let Value::Object(m) = v else { bail!("{}: a bundle config must be a JSON object", f.display()) };
            for (k, v) in m {
                if !root.contains_key(&k) {
                    origin.push((k.clone(), f.clone()));
                    root.insert(k, v);
                }
            }
        }
        Ok(Self { dir: dir.to_path_buf(), root, origin, depth: Default::default() })
    }

    /// The file a top-level key was read from.
    pub fn origin(&self, key: &str) -> String {
        let top = key.split('#').next().unwrap_or(key);
        self.origin
            .iter()
            .find(|(k, _)| k == top)
            .map(|(_, f)| f.strip_prefix(&self.dir).unwrap_or(f).display().to_string())
            .unwrap_or_else(|| "configs".to_string())
    }

    /// The top-level keys and their raw (unresolved) values.
    pub fn entries(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.root.iter()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.raw(id).is_ok()
    }

    /// The raw value at an id (`a#b#0`).
    pub fn raw(&self, id: &str) -> Result<&Value> {
        let mut parts = id.split('#');
        let first = parts.next().unwrap_or_default();
        let mut v = self.root.get(first).with_context(|| format!("the bundle config has no `{first}`"))?;
        for p in parts {
            v = match v {
                Value::Object(m) => m.get(p),
                Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get(i)),
                _ => None,
            }
            .with_context(|| format!("the bundle config has no `{id}` (no `{p}` there)"))?;
        }
        Ok(v)
    }

    /// The value at `id` with every `@` reference replaced by what it names, every `$` expression evaluated (an
    /// error quoting any that is beyond the concatenation language), and the `_requires_`, `_disabled_`, `_desc_`
    /// and `_mode_` keys dropped (`_target_` is kept). For the values medgen converts: network and scheduler
    /// definitions, paths, shapes.
    pub fn resolved(&self, id: &str) -> Result<Value> {
        self.resolve(self.raw(id)?).with_context(|| format!("resolving `{id}` ({})", self.origin(id)))
    }

    fn resolve(&self, v: &Value) -> Result<Value> {
        let _level = Level::enter(&self.depth)?;
        Ok(match v {
            Value::String(s) if is_reference(s) => {
                let id = &s[1..];
                let target = self.raw(id)?;
                self.resolve(target).with_context(|| format!("resolving `{s}`"))?
            }
            Value::String(s) if s.starts_with('$') => self.evaluate(v)?,
            Value::String(s) if s.starts_with('%') => {
                bail!("`{s}`: `%` macros (values from other files) are not supported by medgen")
            }
            Value::Array(a) => Value::Array(a.iter().map(|x| self.resolve(x)).collect::<Result<_>>()?),
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "_requires_" | "_disabled_" | "_desc_" | "_mode_"))
                    .map(|(k, x)| Ok((k.clone(), self.resolve(x)?)))
                    .collect::<Result<_>>()?,
            ),
            other => other.clone(),
        })
    }

    /// Evaluates a value that must be a string or a list: plain JSON, a reference, or a `$` expression in the
    /// concatenation language (see the module docs).
    pub fn evaluate(&self, v: &Value) -> Result<Value> {
        let _level = Level::enter(&self.depth)?;
        match v {
            Value::String(s) if s.starts_with('$') => {
                let mut p = ExprParser { src: &s[1..], pos: 0, cfg: self };
                let out = p.expr(0).with_context(|| format!("cannot evaluate the expression `{s}`"))?;
                p.skip_ws();
                ensure!(
                    p.pos == p.src.len(),
                    "cannot evaluate the expression `{s}`: medgen reads only references, string and number literals, \
                     lists and `+`; `{}` is beyond that",
                    &p.src[p.pos..]
                );
                Ok(out)
            }
            other => self.resolve(other),
        }
    }

    /// `evaluate` of the value at `id`.
    pub fn evaluate_id(&self, id: &str) -> Result<Value> {
        self.evaluate(self.raw(id)?).with_context(|| format!("`{id}` ({})", self.origin(id)))
    }
}

/// `@id` where id is a path of names: a whole-string reference (`"@a#b"`), not an expression.
pub fn is_reference(s: &str) -> bool {
    s.len() > 1 && s.starts_with('@') && s[1..].chars().all(|c| c.is_alphanumeric() || c == '_' || c == '#')
}

/// The concatenation language: `term ('+' term)*`, a term being `@id`, a quoted string, an integer, or a list
/// `[...]` / tuple `(...)` of expressions.
struct ExprParser<'a> {
    src: &'a str,
    pos: usize,
    cfg: &'a BundleConfig,
}

impl ExprParser<'_> {
    fn skip_ws(&mut self) {
        while self.src[self.pos..].starts_with(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<char> {
        self.skip_ws();
        self.src[self.pos..].chars().next()
    }

    fn expr(&mut self, depth: usize) -> Result<Value> {
        ensure!(depth < MAX_DEPTH, "the expression nests too deep");
        let mut acc = self.term(depth)?;
        while self.peek() == Some('+') {
            self.pos += 1;
            let rhs = self.term(depth)?;
            acc = match (acc, rhs) {
                (Value::String(a), Value::String(b)) => Value::String(a + &b),
                (Value::Array(mut a), Value::Array(b)) => {
                    a.extend(b);
                    Value::Array(a)
                }
                (Value::Number(a), Value::Number(b)) if a.is_i64() && b.is_i64() => {
                    Value::from(a.as_i64().unwrap() + b.as_i64().unwrap())
                }
                (a, b) => bail!("`+` of {a} and {b}: only strings, lists or integers add up"),
            };
        }
        Ok(acc)
    }

    fn term(&mut self, depth: usize) -> Result<Value> {
        match self.peek() {
            Some('@') => {
                let start = self.pos;
                self.pos += 1;
                while self.src[self.pos..].starts_with(|c: char| c.is_alphanumeric() || c == '_' || c == '#') {
                    self.pos += 1;
                }
                let id = &self.src[start + 1..self.pos];
                ensure!(!id.is_empty(), "a lone `@`");
                let v = self.cfg.raw(id)?;
                self.cfg.evaluate(v).with_context(|| format!("`@{id}`"))
            }
            Some(q @ ('\'' | '"')) => {
                self.pos += 1;
                let end = self.src[self.pos..].find(q).context("an unterminated string")?;
                let s = self.src[self.pos..self.pos + end].to_string();
                ensure!(!s.contains('\\'), "escapes in string literals are not read");
                self.pos += end + 1;
                Ok(Value::String(s))
            }
            Some(c) if c.is_ascii_digit() || c == '-' => {
                let start = self.pos;
                self.pos += 1;
                while self.src[self.pos..].starts_with(|c: char| c.is_ascii_digit()) {
                    self.pos += 1;
                }
                let n: i64 = self.src[start..self.pos].parse().context("a malformed integer")?;
                Ok(Value::from(n))
            }
            Some(open @ ('[' | '(')) => {
                let close = if open == '[' { ']' } else { ')' };
                self.pos += 1;
                let mut items = Vec::new();
                if self.peek() == Some(close) {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                loop {
                    items.push(self.expr(depth + 1)?);
                    match self.peek() {
                        Some(',') => {
                            self.pos += 1;
                            if self.peek() == Some(close) {
                                self.pos += 1;
                                break;
                            }
                        }
                        Some(c) if c == close => {
                            self.pos += 1;
                            break;
                        }
                        _ => bail!("expected `,` or `{close}` at `{}`", &self.src[self.pos..]),
                    }
                }
                Ok(Value::Array(items))
            }
            _ => bail!("`{}` is not a reference, literal or list", &self.src[self.pos..]),
        }
    }
}

/// The argument list of the first call of `func(` in `expr`, as written (balanced parentheses).
pub fn call_argument<'a>(expr: &'a str, func: &str) -> Option<&'a str> {
    let start = expr.find(func)? + func.len();
    let mut depth = 1;
    for (i, c) in expr[start..].char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&expr[start..start + i]);
                }
            }
            _ => {}
        }
    }
    None
}
