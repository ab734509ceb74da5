//! Files written by `torch.save`: the zip format (PyTorch >= 1.6) and the legacy format
//! (several pickles back to back, then the raw storages), read without Python.
//!
//! The pickle is parsed by [`super::pickle`]; tensors are then rebuilt from their storages
//! with `as_strided`, so any view (offset, transposed strides, shared storage) comes out as
//! PyTorch would give it, made contiguous.
//!
//! Reading is bounded by what the file really holds: a storage is read only after its zip
//! entry (or legacy header) is checked against the size its pickle declares, and never past
//! it; pickles are capped at [`MAX_PICKLE_BYTES`]; copies made for views are bounded by the
//! storage bytes read. Peak memory is then about twice the tensors (bytes read, then the
//! tensor built from them), plus what the pickle builds (see [`super::pickle`]).
use super::pickle::{parse_storage_pid, unpickle, StorageDtype, StorageRef, TensorRef, Value};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// `torch.serialization.MAGIC_NUMBER` as the little-endian bytes of its pickled LONG1.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const LEGACY_PROTOCOL_VERSION: i64 = 1001;

/// The most pickle read into memory: `data.pkl`, or the pickles heading a legacy file. A state
/// dict takes about 100 bytes of pickle per tensor, so this is far beyond any real checkpoint.
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// Deflate emits at most 258 bytes per 2 bits of input; an entry declaring more than this many
/// bytes per compressed byte cannot hold what it declares.
const MAX_DEFLATE_RATIO: u64 = 1032;
/// Bytes that non-contiguous views (expanded, transposed, strided) may materialise beyond the
/// storage bytes read so far: torch keeps views as views, medgen copies them contiguous, so
/// without a bound a few hundred bytes of pickle could ask for terabytes.
const VIEW_COPY_ALLOWANCE: u64 = 64 << 20;
/// More dimensions than any real tensor has; bounds the per-tensor arrays a pickle can ask for.
const MAX_DIMS: usize = 64;

enum Storages {
    Zip {
        archive: zip::ZipArchive<BufReader<File>>,
        prefix: String,
        file_len: u64,
    },
    /// Legacy files: where each storage's bytes start, and how many there are (read on demand,
    /// so memory follows the tensors, not the file).
    Legacy {
        file: File,
        at: HashMap<String, (u64, u64)>,
    },
}

/// An opened `torch.save` file: the unpickled object tree plus access to its storages.
pub struct TorchFile {
    path: PathBuf,
    pub root: Value,
    storages: Storages,
    cache: HashMap<String, Tensor>,
    /// Size of the pickle(s) the object tree came from: what bounds walks through it.
    pickle_bytes: usize,
    /// Storage bytes read so far, and bytes copied out of them for non-contiguous views.
    read_bytes: u64,
    copied_bytes: u64,
}

/// Reads a whole zip entry after checking that the archive can hold what it declares, and
/// never more than it declares.
fn read_entry(e: &mut zip::read::ZipFile<'_, BufReader<File>>, name: &str, file_len: u64) -> Result<Vec<u8>> {
    let (size, packed) = (e.size(), e.compressed_size());
    if packed > file_len {
        bail!("entry {name} claims {packed} compressed bytes in a file of {file_len}");
    }
    match e.compression() {
        zip::CompressionMethod::Stored if packed != size => {
            bail!("entry {name} is stored uncompressed but declares {size} bytes in {packed}")
        }
        zip::CompressionMethod::Deflated if size > packed.saturating_mul(MAX_DEFLATE_RATIO).saturating_add(1024) => {
            bail!("entry {name} declares {size} bytes from {packed} compressed bytes: more than deflate can produce")
        }
        zip::CompressionMethod::Stored | zip::CompressionMethod::Deflated => {}
        other => bail!("entry {name} uses compression {other:?}, which torch.save never writes"),
    }
    let mut buf = Vec::new();
    let want = usize::try_from(size).map_err(|_| anyhow!("entry {name}: {size} bytes do not fit in memory"))?;
    buf.try_reserve_exact(want).map_err(|_| anyhow!("entry {name}: cannot allocate {size} bytes"))?;
    // One byte more than declared, to see an entry that holds more.
    e.take(size + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("cannot read {name} (truncated or corrupt file?)"))?;
    if buf.len() as u64 != size {
        bail!(
            "entry {name} holds {}{} bytes, but its header declares {size}",
            buf.len(),
            if buf.len() as u64 > size { "+" } else { "" }
        );
    }
    Ok(buf)
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

    fn new(path: &Path, root: Value, storages: Storages, pickle_bytes: usize) -> Self {
        Self {
            path: path.to_path_buf(),
            root,
            storages,
            cache: HashMap::new(),
            pickle_bytes,
            read_bytes: 0,
            copied_bytes: 0,
        }
    }

    pub fn pickle_bytes(&self) -> usize {
        self.pickle_bytes
    }

    fn open_zip(path: &Path) -> Result<Self> {
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
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
        let byteorder = format!("{prefix}byteorder");
        if let Ok(mut e) = archive.by_name(&byteorder) {
            if e.size() > 16 {
                bail!("entry {byteorder} declares {} bytes: not a byte order", e.size());
            }
            let b = read_entry(&mut e, &byteorder, file_len)?;
            let s = String::from_utf8_lossy(&b);
            if s.trim() != "little" {
                bail!("big-endian checkpoints are not supported (byteorder = {s:?})");
            }
        }
        let mut e = archive.by_name(&pkl_name)?;
        if e.size() > MAX_PICKLE_BYTES {
            bail!("{pkl_name} declares {} bytes; pickles over {} MiB are refused", e.size(), MAX_PICKLE_BYTES >> 20);
        }
        let pickle = read_entry(&mut e, &pkl_name, file_len)?;
        drop(e);
        let mut pl = |pid: Value| parse_storage_pid(&pid).map(|s| Value::Storage(Box::new(s)));
        let (root, _) = unpickle(&pickle, &mut pl).with_context(|| format!("in {pkl_name}"))?;
        Ok(Self::new(path, root, Storages::Zip { archive, prefix, file_len }, pickle.len()))
    }

    fn open_legacy(path: &Path) -> Result<Self> {
        let mut file = File::open(path)?;
        let file_len = file.metadata()?.len();
        // The pickles come first, their length unknown until parsed: read at most the cap.
        let mut data = Vec::new();
        (&mut file).take(MAX_PICKLE_BYTES).read_to_end(&mut data)?;
        let capped = data.len() as u64 == MAX_PICKLE_BYTES && file_len > MAX_PICKLE_BYTES;
        let hint = move || {
            if capped {
                format!(" (only the first {} MiB are read as pickle)", MAX_PICKLE_BYTES >> 20)
            } else {
                String::new()
            }
        };
        let mut pos = 0;
        let mut no_pid =
            |pid: Value| -> Result<Value> { bail!("unexpected persistent id {} in a legacy header", pid.describe()) };
        let (magic, n) = unpickle(&data[pos..], &mut no_pid).context("legacy header (magic number)")?;
        pos += n;
        match &magic {
            Value::BigInt(b) if *b == LEGACY_MAGIC => {}
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
        // The first reference to a storage is the one torch wrote its data with.
        let mut declared: HashMap<String, (StorageDtype, usize)> = HashMap::new();
        let mut pl = |pid: Value| -> Result<Value> {
            let s = parse_storage_pid(&pid)?;
            declared.entry(s.key.clone()).or_insert((s.dtype, s.numel));
            Ok(Value::Storage(Box::new(s)))
        };
        let (root, n) = unpickle(&data[pos..], &mut pl).with_context(|| format!("legacy checkpoint body{}", hint()))?;
        pos += n;
        let (keys, n) =
            unpickle(&data[pos..], &mut no_pid).with_context(|| format!("legacy storage key list{}", hint()))?;
        pos += n;
        drop(data);
        let keys: Vec<String> = match &keys {
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
        let pickle_bytes = pos;
        // Each storage: its element count (8 bytes, little-endian), then its data.
        let mut pos = pos as u64;
        let mut at = HashMap::new();
        for key in keys {
            let (dtype, numel) =
                *declared.get(&key).ok_or_else(|| anyhow!("storage {key} is listed but never referenced"))?;
            let mut hdr = [0u8; 8];
            file.seek(SeekFrom::Start(pos))?;
            file.read_exact(&mut hdr).map_err(|_| anyhow!("file truncated in the header of storage {key}"))?;
            let held = u64::from_le_bytes(hdr);
            if held != numel as u64 {
                bail!("storage {key}: the file holds {held} elements but the pickle declares {numel}");
            }
            let nbytes = (numel as u64)
                .checked_mul(dtype.elem_size() as u64)
                .ok_or_else(|| anyhow!("storage {key}: absurd size {numel}"))?;
            pos += 8;
            let left = file_len.saturating_sub(pos);
            if nbytes > left {
                bail!("file truncated in storage {key}: needs {nbytes} bytes, {left} left");
            }
            if at.insert(key.clone(), (pos, nbytes)).is_some() {
                bail!("storage {key} is listed twice");
            }
            pos += nbytes;
        }
        Ok(Self::new(path, root, Storages::Legacy { file, at }, pickle_bytes))
    }

    fn storage(&mut self, s: &StorageRef) -> Result<Tensor> {
        if let Some(t) = self.cache.get(&s.key) {
            return Ok(t.shallow_clone());
        }
        let elem = s.dtype.elem_size();
        let bytes = match &mut self.storages {
            Storages::Zip { archive, prefix, file_len } => {
                let name = format!("{prefix}data/{}", s.key);
                let nbytes = s
                    .numel
                    .checked_mul(elem)
                    .ok_or_else(|| anyhow!("storage {name}: {} elements of {elem} bytes overflow", s.numel))?;
                let mut e = archive.by_name(&name).with_context(|| format!("storage entry {name} missing"))?;
                // Checked before reading: an entry never inflates beyond what the pickle declares.
                if e.size() != nbytes as u64 {
                    bail!(
                        "storage entry {name} holds {} bytes, but the pickle declares {} {:?} elements ({nbytes} bytes)",
                        e.size(),
                        s.numel,
                        s.dtype
                    );
                }
                read_entry(&mut e, &name, *file_len)?
            }
            Storages::Legacy { file, at } => {
                let &(offset, nbytes) =
                    at.get(&s.key).ok_or_else(|| anyhow!("storage {} has no data in the file", s.key))?;
                let mut buf = Vec::new();
                buf.try_reserve_exact(nbytes as usize)
                    .map_err(|_| anyhow!("storage {}: cannot allocate {nbytes} bytes", s.key))?;
                file.seek(SeekFrom::Start(offset))?;
                file.take(nbytes).read_to_end(&mut buf)?;
                if buf.len() as u64 != nbytes {
                    bail!("file truncated in storage {}: needs {nbytes} bytes, found {}", s.key, buf.len());
                }
                buf
            }
        };
        if bytes.len() % elem != 0 {
            bail!("storage {}: {} bytes is not a multiple of the element size {elem}", s.key, bytes.len());
        }
        let numel = bytes.len() / elem;
        if numel < s.numel {
            bail!("storage {}: the pickle declares {} elements but the file holds {numel}", s.key, s.numel);
        }
        let t = super::tensor_from_bytes(&bytes, &[numel as i64], s.dtype.kind())?;
        self.read_bytes += bytes.len() as u64;
        self.cache.insert(s.key.clone(), t.shallow_clone());
        Ok(t)
    }

    /// Materialises one tensor reference as a contiguous CPU tensor.
    pub fn tensor(&mut self, t: &TensorRef) -> Result<Tensor> {
        if t.size.len() > MAX_DIMS {
            bail!("tensor with {} dimensions (more than {MAX_DIMS})", t.size.len());
        }
        if t.size.iter().any(|&d| d < 0) || t.stride.iter().any(|&d| d < 0) {
            bail!("negative size {:?} or stride {:?}", t.size, t.stride);
        }
        let view_numel = t
            .size
            .iter()
            .try_fold(1i64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| anyhow!("tensor of size {:?}: element count overflows", t.size))?;
        let storage = self.storage(&t.storage)?;
        let numel = storage.numel() as i64;
        let offset = t
            .storage
            .view_offset
            .checked_add(t.offset)
            .and_then(|o| i64::try_from(o).ok())
            .ok_or_else(|| anyhow!("storage offset {} + {} overflows", t.storage.view_offset, t.offset))?;
        // as_strided does not bound-check: do it here so a corrupt pickle cannot read
        // outside the storage.
        if view_numel > 0 {
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
        let view = storage.f_as_strided(&t.size, &t.stride, offset)?;
        if !view.is_contiguous() {
            let bytes = (view_numel as u64).saturating_mul(t.storage.dtype.elem_size() as u64);
            self.copied_bytes = self.copied_bytes.saturating_add(bytes);
            let allowed = self.read_bytes.saturating_add(VIEW_COPY_ALLOWANCE);
            if self.copied_bytes > allowed {
                bail!(
                    "tensor of size {:?}, stride {:?}: copying the views of this file would take {} bytes, \
                     more than its {} bytes of storage plus {} MiB",
                    t.size,
                    t.stride,
                    self.copied_bytes,
                    self.read_bytes,
                    VIEW_COPY_ALLOWANCE >> 20
                );
            }
        }
        Ok(view.f_contiguous()?)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
