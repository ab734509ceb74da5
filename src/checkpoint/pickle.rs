//! A restricted unpickler for the files `torch.save` writes.
//!
//! Written by hand because no Rust crate reads pickles *safely*: `serde-pickle` does not allow
//! persistent ids (how torch refers to tensor storages) and resolves globals freely. Here a
//! `GLOBAL` outside [`ALLOWED_GLOBALS`] is an error the moment it is read, so no pickle can
//! make medgen call anything: the same policy as `torch.load(weights_only=True)`, enforced
//! by construction since nothing here can execute code.
//!
//! Covers protocols 0 to 5 as far as state dicts and training checkpoints need them.
//! Mutable containers are shared (`Rc<RefCell<..>>`) so memo references see later
//! `SETITEMS`/`APPENDS`, as in Python.
//!
//! Hostile input is bounded: lengths are checked against the bytes left, the objects built
//! are charged against a budget proportional to the pickle's size, values are dropped without
//! recursion (nesting can be as deep as the pickle is long) and nothing here recurses on input.
use anyhow::{anyhow, bail, Context, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Callables and classes a checkpoint may name. Everything else is refused.
pub const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "device"),
    ("torch", "Size"),
    ("_codecs", "encode"),
    ("torch", "FloatStorage"),
    ("torch", "DoubleStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
];

/// Element type of a torch storage, named after its `torch.<X>Storage` class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageDtype {
    pub fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "DoubleStorage" => Self::F64,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    pub fn elem_size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    pub fn kind(self) -> tch::Kind {
        use tch::Kind;
        match self {
            Self::F32 => Kind::Float,
            Self::F64 => Kind::Double,
            Self::F16 => Kind::Half,
            Self::BF16 => Kind::BFloat16,
            Self::I64 => Kind::Int64,
            Self::I32 => Kind::Int,
            Self::I16 => Kind::Int16,
            Self::I8 => Kind::Int8,
            Self::U8 => Kind::Uint8,
            Self::Bool => Kind::Bool,
        }
    }
}

/// A storage named by a persistent id; its bytes live outside the pickle.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: StorageDtype,
    pub numel: usize,
    /// Legacy (non-zip) files can reference a view of a larger root storage.
    pub view_offset: usize,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a strided view of a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: usize,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

pub type List = Rc<RefCell<Vec<Value>>>;
pub type Dict = Rc<DictItems>;
pub type DictItems = RefCell<Vec<(Value, Value)>>;

#[derive(Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for i64, kept as little-endian two's complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Rc<Vec<Value>>),
    List(List),
    Dict(Dict),
    Set(List),
    /// An allowed global (class or function) that has not been called.
    Global(String, String),
    // Boxed: every value on the stack and in the memo is as large as the largest variant.
    Storage(Box<StorageRef>),
    Tensor(Box<TensorRef>),
}

/// Containers can nest as deep as the pickle is long (one byte per level): dropping them
/// recursively would overflow the stack, so children are moved to a heap list first.
impl Drop for Value {
    fn drop(&mut self) {
        let mut pending = Vec::new();
        detach_children(self, &mut pending);
        while let Some(mut v) = pending.pop() {
            detach_children(&mut v, &mut pending);
        }
    }
}

/// Moves the children of a container nobody else holds into `out`.
fn detach_children(v: &mut Value, out: &mut Vec<Value>) {
    match v {
        Value::Tuple(t) => {
            if let Some(items) = Rc::get_mut(t) {
                out.append(items);
            }
        }
        Value::List(l) | Value::Set(l) if Rc::strong_count(l) == 1 => {
            if let Ok(mut items) = l.try_borrow_mut() {
                out.append(&mut items);
            }
        }
        Value::Dict(d) if Rc::strong_count(d) == 1 => {
            if let Ok(mut items) = d.try_borrow_mut() {
                for (k, v) in items.drain(..) {
                    out.push(k);
                    out.push(v);
                }
            }
        }
        _ => {}
    }
}

/// Shows a few levels and items only: values can be deep, cyclic (a list appended to itself)
/// or huge.
impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn show(v: &Value, depth: usize, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            const ITEMS: usize = 8;
            let seq = |items: &[Value], open: &str, close: &str, f: &mut std::fmt::Formatter<'_>| {
                if depth == 0 && !items.is_empty() {
                    return write!(f, "{open}..{close}");
                }
                write!(f, "{open}")?;
                for (i, x) in items.iter().take(ITEMS).enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    show(x, depth - 1, f)?;
                }
                if items.len() > ITEMS {
                    write!(f, ", .. ({} items)", items.len())?;
                }
                write!(f, "{close}")
            };
            match v {
                Value::None => write!(f, "None"),
                Value::Bool(b) => write!(f, "{b}"),
                Value::Int(i) => write!(f, "{i}"),
                Value::BigInt(b) => write!(f, "int of {} bytes", b.len()),
                Value::Float(x) => write!(f, "{x}"),
                Value::Str(s) if s.len() <= 80 => write!(f, "{s:?}"),
                Value::Str(s) => write!(f, "str of {} bytes", s.len()),
                Value::Bytes(b) => write!(f, "bytes of {} bytes", b.len()),
                Value::Tuple(t) => seq(t, "(", ")", f),
                Value::List(l) | Value::Set(l) => match l.try_borrow() {
                    Ok(items) => seq(&items, "[", "]", f),
                    Err(_) => write!(f, "[...]"),
                },
                Value::Dict(d) => match d.try_borrow() {
                    Ok(items) if depth == 0 && !items.is_empty() => write!(f, "{{..}}"),
                    Ok(items) => {
                        write!(f, "{{")?;
                        for (i, (k, x)) in items.iter().take(ITEMS).enumerate() {
                            if i > 0 {
                                write!(f, ", ")?;
                            }
                            show(k, depth - 1, f)?;
                            write!(f, ": ")?;
                            show(x, depth - 1, f)?;
                        }
                        if items.len() > ITEMS {
                            write!(f, ", .. ({} items)", items.len())?;
                        }
                        write!(f, "}}")
                    }
                    Err(_) => write!(f, "{{...}}"),
                },
                Value::Global(m, n) => write!(f, "{m}.{n}"),
                Value::Storage(s) => write!(f, "{s:?}"),
                Value::Tensor(t) => write!(f, "{t:?}"),
            }
        }
        show(self, 3, f)
    }
}

/// Bytes a value occupies, counting only what it owns itself (containers' items are counted
/// when they are created).
fn cost(v: &Value) -> usize {
    std::mem::size_of::<Value>()
        + match v {
            Value::Str(s) => s.len(),
            Value::Bytes(b) | Value::BigInt(b) => b.len(),
            Value::Global(m, n) => m.len() + n.len(),
            Value::Storage(s) => s.key.len(),
            Value::Tensor(t) => t.storage.key.len() + 8 * (t.size.len() + t.stride.len()),
            _ => 0,
        }
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Set(_) => "set",
            Value::Global(..) => "class",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    fn as_usize(&self, what: &str) -> Result<usize> {
        match self {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            other => bail!("expected a non-negative int for {what}, found {}", other.describe()),
        }
    }

    fn as_str(&self, what: &str) -> Result<&str> {
        match self {
            Value::Str(s) => Ok(s),
            other => bail!("expected a str for {what}, found {}", other.describe()),
        }
    }

    fn as_int_seq(&self, what: &str) -> Result<Vec<i64>> {
        let items: Vec<Value> = match self {
            Value::Tuple(t) => t.as_ref().clone(),
            Value::List(l) => l.borrow().clone(),
            other => bail!("expected a tuple of ints for {what}, found {}", other.describe()),
        };
        items
            .iter()
            .map(|v| match v {
                Value::Int(i) => Ok(*i),
                other => bail!("expected an int in {what}, found {}", other.describe()),
            })
            .collect()
    }

    /// Short description for error messages (never dumps large structures).
    pub fn describe(&self) -> String {
        match self {
            Value::Int(i) => format!("int {i}"),
            Value::Str(s) if s.len() <= 60 => format!("str {s:?}"),
            Value::Global(m, n) => format!("{m}.{n}"),
            other => other.type_name().to_string(),
        }
    }
}

enum Slot {
    Value(Value),
    Mark,
}

/// What unpickling may build, counted cumulatively: a fixed allowance plus this many bytes per
/// byte of pickle. torch.save pickles take 25 to 40 per byte (a 940 kB training checkpoint
/// pickle: 26 MB); without a bound, a few kilobytes of memo gets (`BINGET` of one large string)
/// would build gigabytes.
const BUDGET_BASE: usize = 32 << 20;
const BUDGET_PER_BYTE: usize = 96;
/// Dicts up to this size find a repeated key by a linear search; larger ones get an index.
const INDEX_FROM: usize = 32;

/// A dict key as Python would hash it (the keys torch writes: str and int).
#[derive(Hash, PartialEq, Eq)]
enum Key {
    Str(String),
    Int(i64),
}

impl Key {
    fn of(v: &Value) -> Option<Self> {
        match v {
            Value::Str(s) => Some(Key::Str(s.clone())),
            Value::Int(i) => Some(Key::Int(*i)),
            _ => None,
        }
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    memo: HashMap<u64, Value>,
    persistent_load: &'a mut dyn FnMut(Value) -> Result<Value>,
    budget: usize,
    budget_left: usize,
    /// Key positions of the dicts `SETITEM(S)` has filled, so that a repeated key replaces its
    /// value without a linear search per item (quadratic on large dicts). Holding the dict
    /// keeps its address from being reused by another.
    dict_index: HashMap<*const DictItems, (Dict, HashMap<Key, usize>)>,
}

/// Unpickles one pickle starting at `data[0]`. Returns the value and the number of bytes read
/// (legacy torch files hold several pickles back to back). `persistent_load` resolves
/// persistent ids (`BINPERSID`), which torch uses for storages.
pub fn unpickle(data: &[u8], persistent_load: &mut dyn FnMut(Value) -> Result<Value>) -> Result<(Value, usize)> {
    let budget = BUDGET_BASE.saturating_add(BUDGET_PER_BYTE.saturating_mul(data.len()));
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        persistent_load,
        budget,
        budget_left: budget,
        dict_index: HashMap::new(),
    };
    let v = m.run()?;
    Ok((v, m.pos))
}

/// Rejects any global outside the allow-list, naming it.
pub fn check_global(module: &str, name: &str) -> Result<()> {
    if ALLOWED_GLOBALS.iter().any(|(m, n)| *m == module && *n == name) {
        Ok(())
    } else if module.starts_with("torch.nn.modules")
        || module.starts_with("monai.")
        || module.starts_with("generative.")
    {
        bail!(
            "refusing to load global `{module}.{name}`: this file pickles a whole model object, not a state \
             dict; in Python, save `model.state_dict()` instead"
        )
    } else {
        bail!(
            "refusing to load global `{module}.{name}`: only tensors, storages and plain containers \
             are allowed in a checkpoint (this file would run code under Python's torch.load)"
        )
    }
}

impl Machine<'_> {
    fn charge(&mut self, bytes: usize) -> Result<()> {
        self.budget_left = self.budget_left.checked_sub(bytes).ok_or_else(|| {
            anyhow!(
                "malformed pickle: it builds more than {} MiB of objects from {} bytes (offset {})",
                self.budget >> 20,
                self.data.len(),
                self.pos
            )
        })?;
        Ok(())
    }
    /// Charges for a container of `n` items built from the stack.
    fn charge_items(&mut self, n: usize) -> Result<()> {
        self.charge(n.saturating_mul(std::mem::size_of::<Value>()))
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| {
            anyhow!(
                "pickle truncated: wanted {n} bytes at offset {}, only {} left",
                self.pos,
                self.data.len().saturating_sub(self.pos)
            )
        })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| anyhow!("pickle truncated: unterminated text line at offset {}", self.pos))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn utf8(&mut self, n: usize) -> Result<String> {
        let pos = self.pos;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).with_context(|| format!("invalid UTF-8 string at offset {pos}"))
    }
    fn bytes(&mut self, n: usize) -> Result<Vec<u8>> {
        Ok(self.take(n)?.to_vec())
    }

    fn push(&mut self, v: Value) -> Result<()> {
        self.charge(cost(&v))?;
        self.stack.push(Slot::Value(v));
        Ok(())
    }
    fn pop(&mut self) -> Result<Value> {
        match self.stack.pop() {
            Some(Slot::Value(v)) => Ok(v),
            Some(Slot::Mark) => bail!("malformed pickle: unexpected MARK at offset {}", self.pos),
            None => bail!("malformed pickle: stack underflow at offset {}", self.pos),
        }
    }
    fn top(&mut self) -> Result<&mut Value> {
        match self.stack.last_mut() {
            Some(Slot::Value(v)) => Ok(v),
            _ => bail!("malformed pickle: no object on the stack at offset {}", self.pos),
        }
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mut items = Vec::new();
        loop {
            match self.stack.pop() {
                Some(Slot::Value(v)) => items.push(v),
                Some(Slot::Mark) => break,
                None => bail!("malformed pickle: MARK not found (offset {})", self.pos),
            }
        }
        items.reverse();
        Ok(items)
    }
    fn memo_get(&self, idx: u64) -> Result<Value> {
        self.memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| anyhow!("malformed pickle: memo entry {idx} missing (offset {})", self.pos))
    }
    fn memo_put(&mut self, idx: u64) -> Result<()> {
        let v = self.top()?.clone();
        self.charge(cost(&v))?;
        self.memo.insert(idx, v);
        Ok(())
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8().context("pickle ended before STOP")?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        bail!("unsupported pickle protocol {proto}");
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'(' => {
                    self.charge(std::mem::size_of::<Slot>())?;
                    self.stack.push(Slot::Mark);
                }
                b'0' => {
                    self.stack.pop().ok_or_else(|| anyhow!("malformed pickle: POP on empty stack"))?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                // Memo.
                b'p' => {
                    let l = self.line()?;
                    let idx = l.trim().parse().with_context(|| format!("bad PUT index {l:?}"))?;
                    self.memo_put(idx)?;
                }
                b'q' => {
                    let i = self.u8()? as u64;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()? as u64;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    self.memo_put(i)?;
                }
                b'g' => {
                    let l = self.line()?;
                    let idx = l.trim().parse().with_context(|| format!("bad GET index {l:?}"))?;
                    let v = self.memo_get(idx)?;
                    self.push(v)?;
                }
                b'h' => {
                    let i = self.u8()? as u64;
                    let v = self.memo_get(i)?;
                    self.push(v)?;
                }
                b'j' => {
                    let i = self.u32()? as u64;
                    let v = self.memo_get(i)?;
                    self.push(v)?;
                }
                // Scalars.
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.push(Value::Int(v))?;
                }
                b'K' => {
                    let v = self.u8()? as i64;
                    self.push(Value::Int(v))?;
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.push(Value::Int(v))?;
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.bytes(n)?;
                    self.push(long_from_le(b))?;
                }
                0x8b => {
                    let n = self.u32()? as usize;
                    let b = self.bytes(n)?;
                    self.push(long_from_le(b))?;
                }
                b'I' => {
                    let l = self.line()?;
                    let v = match l.trim() {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        s => Value::Int(s.parse().with_context(|| format!("bad INT {s:?}"))?),
                    };
                    self.push(v)?;
                }
                b'L' => {
                    let l = self.line()?;
                    let s = l.trim().trim_end_matches('L');
                    let v = s.parse().with_context(|| format!("LONG {s:?} does not fit in i64"))?;
                    self.push(Value::Int(v))?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.push(Value::Float(v))?;
                }
                b'F' => {
                    let l = self.line()?;
                    let v = l.trim().parse().with_context(|| format!("bad FLOAT {l:?}"))?;
                    self.push(Value::Float(v))?;
                }
                // Strings and bytes.
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.utf8(n)?;
                    self.push(Value::Str(s))?;
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.utf8(n)?;
                    self.push(Value::Str(s))?;
                }
                0x8d => {
                    let n = usize::try_from(self.u64()?)?;
                    let s = self.utf8(n)?;
                    self.push(Value::Str(s))?;
                }
                // Python 2 `str`: torch's legacy files use it for short ASCII strings.
                b'T' => {
                    let n = self.u32()? as usize;
                    let b = self.bytes(n)?;
                    self.push(Value::Str(String::from_utf8_lossy(&b).into_owned()))?;
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let b = self.bytes(n)?;
                    self.push(Value::Str(String::from_utf8_lossy(&b).into_owned()))?;
                }
                b'S' => {
                    let l = self.line()?;
                    let s = l.trim();
                    let s = s
                        .strip_prefix('\'')
                        .and_then(|s| s.strip_suffix('\''))
                        .or_else(|| s.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
                        .ok_or_else(|| anyhow!("bad STRING {s:?}"))?;
                    self.push(Value::Str(s.to_string()))?;
                }
                b'V' => {
                    let l = self.line()?;
                    self.push(Value::Str(l))?;
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.bytes(n)?;
                    self.push(Value::Bytes(b))?;
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.bytes(n)?;
                    self.push(Value::Bytes(b))?;
                }
                0x8e | 0x96 => {
                    let n = usize::try_from(self.u64()?)?;
                    let b = self.bytes(n)?;
                    self.push(Value::Bytes(b))?;
                }
                // Containers.
                b')' => self.push(Value::Tuple(Rc::new(Vec::new())))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.charge_items(items.len())?;
                    self.push(Value::Tuple(Rc::new(items)))?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(Rc::new(items)))?;
                }
                b']' => self.push(Value::List(Rc::new(RefCell::new(Vec::new()))))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.charge_items(items.len())?;
                    self.push(Value::List(Rc::new(RefCell::new(items))))?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.charge_items(items.len())?;
                    self.append(items)?;
                }
                b'}' => self.push(Value::Dict(Rc::new(RefCell::new(Vec::new()))))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    self.charge_items(items.len())?;
                    let pairs = pairs(items)?;
                    self.push(Value::Dict(Rc::new(RefCell::new(pairs))))?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.charge_items(items.len())?;
                    let p = pairs(items)?;
                    self.set_items(p)?;
                }
                0x8f => self.push(Value::Set(Rc::new(RefCell::new(Vec::new()))))?,
                0x90 => {
                    let items = self.pop_mark()?;
                    self.charge_items(items.len())?;
                    match self.top()? {
                        Value::Set(s) => s.borrow_mut().extend(items),
                        other => bail!("malformed pickle: ADDITEMS on {}", other.type_name()),
                    }
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.charge_items(items.len())?;
                    self.push(Value::Set(Rc::new(RefCell::new(items))))?;
                }
                // Globals and calls: the only places code could run, hence the allow-list.
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    check_global(&module, &name)?;
                    self.push(Value::Global(module, name))?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        bail!("malformed pickle: STACK_GLOBAL needs two strings (offset {at})");
                    };
                    let (module, name) = (module.clone(), name.clone());
                    check_global(&module, &name)?;
                    self.push(Value::Global(module, name))?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.call(func, args)?;
                    self.push(v)?;
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.call(cls, args)?;
                    self.push(v)?;
                }
                0x92 => {
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    if !matches!(&kwargs, Value::Dict(d) if d.borrow().is_empty()) {
                        bail!("refusing NEWOBJ_EX with keyword arguments for {}", cls.describe());
                    }
                    let v = self.call(cls, args)?;
                    self.push(v)?;
                }
                b'b' => {
                    let state = self.pop()?;
                    let obj = self.top()?;
                    match obj {
                        // OrderedDict `_metadata` and tensor/parameter extra state: not needed
                        // to rebuild weights.
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => bail!("refusing BUILD (setstate) on {} with {}", other.describe(), state.describe()),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = (self.persistent_load)(pid)?;
                    self.push(v)?;
                }
                b'P' => {
                    let l = self.line()?;
                    let v = (self.persistent_load)(Value::Str(l))?;
                    self.push(v)?;
                }
                b'i' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    check_global(&module, &name)?;
                    bail!("refusing INST of {module}.{name}");
                }
                b'o' => bail!("refusing OBJ opcode (instantiates an arbitrary class) at offset {at}"),
                0x82..=0x84 => bail!("refusing EXT opcode (extension registry) at offset {at}"),
                0x97 | 0x98 => bail!("out-of-band pickle buffers are not supported (offset {at})"),
                other => bail!("unknown pickle opcode 0x{other:02x} at offset {at}"),
            }
        }
    }

    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        match self.top()? {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            other => bail!("malformed pickle: APPEND to {}", other.type_name()),
        }
    }

    fn set_items(&mut self, items: Vec<(Value, Value)>) -> Result<()> {
        let d = match self.top()? {
            Value::Dict(d) => d.clone(),
            other => bail!("malformed pickle: SETITEM on {}", other.type_name()),
        };
        let ptr = Rc::as_ptr(&d);
        if !self.dict_index.contains_key(&ptr) && d.borrow().len() + items.len() <= INDEX_FROM {
            let mut entries = d.borrow_mut();
            for (k, v) in items {
                // Python semantics: a repeated key replaces the earlier value in place.
                match entries.iter_mut().find(|(e, _)| same_key(e, &k)) {
                    Some(slot) => slot.1 = v,
                    None => entries.push((k, v)),
                }
            }
            return Ok(());
        }
        // The index copies the keys: charged like the values they come from.
        let new_keys = if self.dict_index.contains_key(&ptr) { 0 } else { d.borrow().len() };
        let key_bytes: usize = items.iter().map(|(k, _)| cost(k)).sum();
        self.charge(key_bytes + new_keys * std::mem::size_of::<Value>())?;
        let (_, index) = self.dict_index.entry(ptr).or_insert_with(|| {
            let index = d.borrow().iter().enumerate().filter_map(|(i, (k, _))| Some((Key::of(k)?, i))).collect();
            (d.clone(), index)
        });
        let mut entries = d.borrow_mut();
        for (k, v) in items {
            // Python semantics: a repeated key replaces the earlier value in place.
            match Key::of(&k) {
                Some(key) => match index.get(&key) {
                    Some(&i) => entries[i].1 = v,
                    None => {
                        index.insert(key, entries.len());
                        entries.push((k, v));
                    }
                },
                None => entries.push((k, v)),
            }
        }
        Ok(())
    }

    /// Applies an allowed callable. Every global reaching here passed [`check_global`].
    fn call(&mut self, func: Value, args: Value) -> Result<Value> {
        let (mut func, mut args) = (func, args);
        // `_rebuild_from_type_v2(func, type, args, state)` calls `func(*args)`; a loop, not
        // recursion, since a pickle can nest such calls arbitrarily deep.
        loop {
            let Value::Global(module, name) = &func else {
                bail!("refusing to call a {} (only allowed globals can be called)", func.describe());
            };
            if (module.as_str(), name.as_str()) != ("torch._tensor", "_rebuild_from_type_v2") {
                break;
            }
            let a = tuple_items(&args, "torch._tensor._rebuild_from_type_v2")?;
            if a.len() < 3 {
                bail!("torch._tensor._rebuild_from_type_v2 expects 4 arguments, got {}", a.len());
            }
            (func, args) = (a[0].clone(), a[2].clone());
        }
        let v = call(&func, &args)?;
        if let Value::Dict(d) = &v {
            let items = d.borrow();
            let n = items.len();
            let bytes: usize = items.iter().map(|(k, x)| cost(k) + cost(x)).sum();
            drop(items);
            self.charge(bytes + n * std::mem::size_of::<(Value, Value)>())?;
        }
        self.charge(cost(&v))?;
        Ok(v)
    }
}

fn same_key(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::Int(x), Value::Int(y)) => x == y,
        _ => false,
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        bail!("malformed pickle: odd number of items for a dict");
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn long_from_le(b: Vec<u8>) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    if b.len() <= 8 {
        let neg = b[b.len() - 1] & 0x80 != 0;
        let mut buf = [if neg { 0xff } else { 0 }; 8];
        buf[..b.len()].copy_from_slice(&b);
        Value::Int(i64::from_le_bytes(buf))
    } else {
        Value::BigInt(b)
    }
}

fn tuple_items(args: &Value, what: &str) -> Result<Vec<Value>> {
    match args {
        Value::Tuple(t) => Ok(t.as_ref().clone()),
        other => bail!("expected an argument tuple for {what}, found {}", other.describe()),
    }
}

/// Applies an allowed callable other than `_rebuild_from_type_v2` (see [`Machine::call`]).
fn call(func: &Value, args: &Value) -> Result<Value> {
    let Value::Global(module, name) = func else {
        bail!("refusing to call a {} (only allowed globals can be called)", func.describe());
    };
    let full = format!("{module}.{name}");
    let a = tuple_items(args, &full)?;
    match full.as_str() {
        "collections.OrderedDict" => {
            let d: Dict = Rc::new(RefCell::new(Vec::new()));
            if let Some(items) = a.first() {
                let items = match items {
                    Value::List(l) => l.borrow().clone(),
                    Value::Tuple(t) => t.as_ref().clone(),
                    other => bail!("OrderedDict from {} is not supported", other.describe()),
                };
                for it in items {
                    let kv = match &it {
                        Value::List(l) => l.borrow().clone(),
                        other => tuple_items(other, "OrderedDict item")?,
                    };
                    if kv.len() != 2 {
                        bail!("OrderedDict item must be a pair");
                    }
                    d.borrow_mut().push((kv[0].clone(), kv[1].clone()));
                }
            }
            Ok(Value::Dict(d))
        }
        "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
            if a.len() < 4 {
                bail!("{full} expects at least 4 arguments, got {}", a.len());
            }
            let Value::Storage(storage) = &a[0] else {
                bail!("{full}: first argument is {}, not a storage", a[0].describe());
            };
            let offset = a[1].as_usize("storage_offset")?;
            let size = a[2].as_int_seq("size")?;
            let stride = a[3].as_int_seq("stride")?;
            if size.len() != stride.len() {
                bail!("{full}: size {size:?} and stride {stride:?} differ in length");
            }
            Ok(Value::Tensor(Box::new(TensorRef { storage: (**storage).clone(), offset, size, stride })))
        }
        "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
            match a.into_iter().next() {
                Some(t @ Value::Tensor(_)) => Ok(t),
                Some(other) => bail!("{full}: data is {}, not a tensor", other.describe()),
                None => bail!("{full}: missing data argument"),
            }
        }
        "torch.device" => match a.first() {
            Some(Value::Str(s)) => Ok(Value::Str(s.clone())),
            _ => Ok(Value::Str(format!("{:?}", Value::Tuple(Rc::new(a.clone()))))),
        },
        "torch.Size" => match a.into_iter().next() {
            Some(v) => Ok(Value::Tuple(Rc::new(v.as_int_seq("torch.Size")?.into_iter().map(Value::Int).collect()))),
            None => Ok(Value::Tuple(Rc::new(Vec::new()))),
        },
        // Protocol-2 pickles encode `bytes` as _codecs.encode(latin-1 str, "latin1").
        "_codecs.encode" => {
            let s = a.first().ok_or_else(|| anyhow!("_codecs.encode: no argument"))?.as_str("_codecs.encode")?;
            Ok(Value::Bytes(s.chars().map(|c| c as u32 as u8).collect()))
        }
        _ => bail!("refusing to call `{full}`: it is allowed as a value but not as a callable"),
    }
}

/// Parses a torch storage persistent id: `('storage', torch.XStorage, key, location, numel[, view])`.
pub fn parse_storage_pid(pid: &Value) -> Result<StorageRef> {
    let Value::Tuple(t) = pid else {
        bail!("unexpected persistent id {}", pid.describe());
    };
    let tag = t.first().map(|v| v.as_str("persistent id tag")).transpose()?;
    if tag != Some("storage") {
        bail!(
            "unsupported persistent id {:?}: only tensor storages are allowed (is this a whole pickled module?)",
            tag
        );
    }
    if t.len() < 5 {
        bail!("storage persistent id has {} fields, expected 5 or 6", t.len());
    }
    let Value::Global(module, class) = &t[1] else {
        bail!("storage type is {}, not a storage class", t[1].describe());
    };
    let dtype = StorageDtype::from_class(class)
        .filter(|_| module == "torch")
        .ok_or_else(|| anyhow!("unsupported storage type {module}.{class}"))?;
    let key = match &t[2] {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => bail!("storage key is {}", other.describe()),
    };
    let numel = t[4].as_usize("storage size")?;
    let mut view_offset = 0;
    if let Some(Value::Tuple(view)) = t.get(5) {
        // Legacy view metadata: (view_key, offset, view_size).
        if view.len() == 3 {
            view_offset = view[1].as_usize("storage view offset")?;
        }
    }
    Ok(StorageRef { key, dtype, numel, view_offset })
}
