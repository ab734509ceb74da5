//! Files written by `torch.save`: the zip format (PyTorch >= 1.6) and the legacy format
//! (several pickles back to back, then the raw storages), read without Python.
//!
//! The pickle is parsed by [`super::pickle`]; tensors are then rebuilt from their storages
//! with `as_strided`, so any view (offset, transposed strides, shared storage) comes out as
//! PyTorch would give it, made contiguous.
use super::pickle::{parse_storage_pid, unpickle, StorageDtype, StorageRef, TensorRef, Value};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// `torch.serialization.MAGIC_NUMBER` as the little-endian bytes of its pickled LONG1.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const LEGACY_PROTOCOL_VERSION: i64 = 1001;

enum Storages {
    Zip {
        archive: zip::ZipArchive<BufReader<File>>,
        prefix: String,
    },
    /// Legacy files: every storage read up front (they follow the pickles sequentially).
    Loaded(HashMap<String, Vec<u8>>),
}

/// An opened `torch.save` file: the unpickled object tree plus access to its storages.
pub struct TorchFile {
    path: PathBuf,
    pub root: Value,
    storages: Storages,
    cache: HashMap<String, Tensor>,
}

impl TorchFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut head = [0u8; 4];
        let n = File::open(path)
            .with_context(|| format!("cannot open {}", path.display()))?
            .read(&mut head)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let r = if n >= 4 && head == *b"PK\x03\x04" {
            Self::open_zip(path)
        } else if n >= 2 && head[0] == 0x80 {
            Self::open_legacy(path)
        } else {
            Err(anyhow!("not a torch.save file (neither zip nor legacy pickle)"))
        };
        r.with_context(|| format!("cannot read PyTorch checkpoint {}", path.display()))
    }

    fn open_zip(path: &Path) -> Result<Self> {
        let file = File::open(path)?;
        let mut archive = zip::ZipArchive::new(BufReader::new(file)).context("corrupt zip archive")?;
        let pkl: Vec<String> = archive
            .file_names()
            .filter_map(|n| n.ok())
            .filter(|n| n.ends_with("data.pkl"))
            .map(|n| n.into_owned())
            .collect();
        let pkl_name = match pkl.as_slice() {
            [one] => one.clone(),
            [] => {
                bail!("zip archive has no data.pkl: not a torch.save file (TorchScript archives are not state dicts)")
            }
            many => bail!("zip archive has several data.pkl entries: {many:?}"),
        };
        let prefix = pkl_name.strip_suffix("data.pkl").unwrap().to_string();
        if let Ok(mut e) = archive.by_name(&format!("{prefix}byteorder")) {
            let mut s = String::new();
            e.read_to_string(&mut s).context("cannot read byteorder entry")?;
            if s.trim() != "little" {
                bail!("big-endian checkpoints are not supported (byteorder = {s:?})");
            }
        }
        let mut pickle = Vec::new();
        archive
            .by_name(&pkl_name)?
            .read_to_end(&mut pickle)
            .with_context(|| format!("cannot read {pkl_name} (truncated file?)"))?;
        let mut pl = |pid: Value| parse_storage_pid(&pid).map(Value::Storage);
        let (root, _) = unpickle(&pickle, &mut pl).with_context(|| format!("in {pkl_name}"))?;
        Ok(Self { path: path.to_path_buf(), root, storages: Storages::Zip { archive, prefix }, cache: HashMap::new() })
    }

    fn open_legacy(path: &Path) -> Result<Self> {
        let data = std::fs::read(path)?;
        let mut pos = 0;
        let mut no_pid =
            |pid: Value| -> Result<Value> { bail!("unexpected persistent id {} in a legacy header", pid.describe()) };
        let (magic, n) = unpickle(&data[pos..], &mut no_pid).context("legacy header (magic number)")?;
        pos += n;
        match magic {
            Value::BigInt(b) if b == LEGACY_MAGIC => {}
            _ => bail!("pickle file without the torch.save magic number: not a PyTorch checkpoint"),
        }
        let (version, n) = unpickle(&data[pos..], &mut no_pid).context("legacy header (protocol version)")?;
        pos += n;
        if !matches!(version, Value::Int(LEGACY_PROTOCOL_VERSION)) {
            bail!("unsupported legacy protocol version {}", version.describe());
        }
        let (sys_info, n) = unpickle(&data[pos..], &mut no_pid).context("legacy header (sys info)")?;
        pos += n;
        if let Value::Dict(d) = &sys_info {
            for (k, v) in d.borrow().iter() {
                if matches!(k, Value::Str(s) if s == "little_endian") && matches!(v, Value::Bool(false)) {
                    bail!("big-endian checkpoints are not supported");
                }
            }
        }
        let mut dtypes: HashMap<String, StorageDtype> = HashMap::new();
        let mut pl = |pid: Value| -> Result<Value> {
            let s = parse_storage_pid(&pid)?;
            dtypes.insert(s.key.clone(), s.dtype);
            Ok(Value::Storage(s))
        };
        let (root, n) = unpickle(&data[pos..], &mut pl).context("legacy checkpoint body")?;
        pos += n;
        let (keys, n) = unpickle(&data[pos..], &mut no_pid).context("legacy storage key list")?;
        pos += n;
        let keys: Vec<String> = match keys {
            Value::List(l) => l
                .borrow()
                .iter()
                .map(|k| match k {
                    Value::Str(s) => Ok(s.clone()),
                    other => bail!("storage key is {}", other.describe()),
                })
                .collect::<Result<_>>()?,
            other => bail!("expected the storage key list, found {}", other.describe()),
        };
        let mut storages = HashMap::new();
        for key in keys {
            let dtype = *dtypes.get(&key).ok_or_else(|| anyhow!("storage {key} is listed but never referenced"))?;
            let hdr = data.get(pos..pos + 8).ok_or_else(|| anyhow!("file truncated in the header of storage {key}"))?;
            let numel = u64::from_le_bytes(hdr.try_into().unwrap()) as usize;
            pos += 8;
            let nbytes =
                numel.checked_mul(dtype.elem_size()).ok_or_else(|| anyhow!("storage {key}: absurd size {numel}"))?;
            let bytes = data.get(pos..pos.saturating_add(nbytes)).ok_or_else(|| {
                anyhow!("file truncated in storage {key}: needs {nbytes} bytes, {} left", data.len() - pos)
            })?;
            pos += nbytes;
            storages.insert(key, bytes.to_vec());
        }
        Ok(Self { path: path.to_path_buf(), root, storages: Storages::Loaded(storages), cache: HashMap::new() })
    }

    fn storage(&mut self, s: &StorageRef) -> Result<Tensor> {
        if let Some(t) = self.cache.get(&s.key) {
            return Ok(t.shallow_clone());
        }
        let bytes = match &mut self.storages {
            Storages::Zip { archive, prefix } => {
                let name = format!("{prefix}data/{}", s.key);
                let mut e = archive.by_name(&name).with_context(|| format!("storage entry {name} missing"))?;
                // The declared size comes from the file: cap the pre-allocation, not the read.
                let mut buf = Vec::with_capacity(e.size().min(1 << 28) as usize);
                e.read_to_end(&mut buf).with_context(|| format!("cannot read storage {name} (truncated file?)"))?;
                buf
            }
            Storages::Loaded(m) => {
                m.get(&s.key).cloned().ok_or_else(|| anyhow!("storage {} has no data in the file", s.key))?
            }
        };
        let elem = s.dtype.elem_size();
        if bytes.len() % elem != 0 {
            bail!("storage {}: {} bytes is not a multiple of the element size {elem}", s.key, bytes.len());
        }
        let numel = bytes.len() / elem;
        if numel < s.numel {
            bail!("storage {}: the pickle declares {} elements but the file holds {numel}", s.key, s.numel);
        }
        let t = super::tensor_from_bytes(&bytes, &[numel as i64], s.dtype.kind())?;
        self.cache.insert(s.key.clone(), t.shallow_clone());
        Ok(t)
    }

    /// Materialises one tensor reference as a contiguous CPU tensor.
    pub fn tensor(&mut self, t: &TensorRef) -> Result<Tensor> {
        let storage = self.storage(&t.storage)?;
        let numel = storage.numel() as i64;
        let offset = (t.storage.view_offset + t.offset) as i64;
        if t.size.iter().any(|&d| d < 0) || t.stride.iter().any(|&d| d < 0) {
            bail!("negative size {:?} or stride {:?}", t.size, t.stride);
        }
        // as_strided does not bound-check: do it here so a corrupt pickle cannot read
        // outside the storage.
        if !t.size.contains(&0) {
            let last = t
                .size
                .iter()
                .zip(&t.stride)
                .try_fold(offset, |acc, (&n, &s)| acc.checked_add((n - 1).checked_mul(s)?))
                .ok_or_else(|| anyhow!("tensor extent overflows"))?;
            if last >= numel {
                bail!(
                    "tensor of size {:?}, stride {:?}, offset {offset} reaches element {last} of a storage of {numel}",
                    t.size,
                    t.stride
                );
            }
        }
        Ok(storage.f_as_strided(&t.size, &t.stride, offset)?.f_contiguous()?)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
