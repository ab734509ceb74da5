//! `.safetensors` read and write (with header metadata) through the `safetensors` crate,
//! converting to and from tch tensors.
use super::state_dict::StateDict;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::Metadata;
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use tch::{Kind, Tensor};

/// True when the file starts like a safetensors file: an 8-byte little-endian header length
/// that fits in the file, followed by `{`. (Torch zip files start with `PK`; legacy pickles
/// have a magic-number byte at offset 8.)
pub fn looks_like(path: &Path) -> Result<bool> {
    let mut head = [0u8; 9];
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata().with_context(|| format!("cannot read {}", path.display()))?.len();
    let n = f.read(&mut head).with_context(|| format!("cannot read {}", path.display()))?;
    if n < 9 || &head[..2] == b"PK" || head[8] != b'{' {
        return Ok(false);
    }
    let header_len = u64::from_le_bytes(head[..8].try_into().unwrap());
    Ok(header_len.saturating_add(8) <= len || path.extension().is_some_and(|e| e == "safetensors"))
}

fn kind_of(d: Dtype) -> Result<Kind> {
    Ok(match d {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        other => bail!("safetensors dtype {other:?} is not supported"),
    })
}

fn dtype_of(k: Kind) -> Result<Dtype> {
    Ok(match k {
        Kind::Bool => Dtype::BOOL,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        other => bail!("tensor kind {other:?} cannot be written to safetensors"),
    })
}

/// The safetensors format's own limit on the JSON header.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Reads the header, then each tensor straight from the file, so memory follows the tensors
/// (one buffer at a time on top of them) rather than holding the whole file as well.
pub fn read(path: &Path) -> Result<StateDict> {
    let corrupt = |what: String| anyhow!("corrupt safetensors file {}: {what}", path.display());
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata().with_context(|| format!("cannot read {}", path.display()))?.len();
    let mut n8 = [0u8; 8];
    f.read_exact(&mut n8).map_err(|_| corrupt(format!("{len} bytes, shorter than a header")))?;
    let n = u64::from_le_bytes(n8);
    if n > MAX_HEADER_BYTES || n > len.saturating_sub(8) {
        return Err(corrupt(format!("header length {n} in a file of {len} bytes")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| corrupt(format!("cannot read the header: {e}")))?;
    // Deserializing validates offsets against dtype and shape (contiguous, no overlap).
    let meta: Metadata = serde_json::from_slice(&header).map_err(|e| corrupt(format!("header: {e}")))?;
    drop(header);
    let data_start = 8 + n;
    let names = meta.offset_keys();
    let end = names.last().and_then(|k| meta.info(k)).map_or(0, |i| i.data_offsets.1) as u64;
    if end != len.saturating_sub(data_start) {
        return Err(corrupt(format!(
            "the header describes {end} bytes of tensors, the file holds {}",
            len - data_start
        )));
    }
    let mut sd = StateDict::new();
    if let Some(m) = meta.metadata() {
        sd.metadata = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    }
    // In the order the data sits in the file (the header itself is a JSON map, unordered).
    for name in names {
        let info = meta.info(&name).ok_or_else(|| corrupt(format!("tensor {name} has no entry")))?;
        let kind = kind_of(info.dtype).with_context(|| format!("{}: tensor {name}", path.display()))?;
        let shape = info
            .shape
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<Result<Vec<i64>, _>>()
            .map_err(|_| corrupt(format!("tensor {name}: shape {:?} out of range", info.shape)))?;
        let (s, e) = info.data_offsets;
        let mut bytes = vec![0u8; e - s];
        f.seek(SeekFrom::Start(data_start + s as u64))?;
        f.read_exact(&mut bytes).map_err(|err| corrupt(format!("tensor {name}: {err}")))?;
        let t = super::tensor_from_bytes(&bytes, &shape, kind)
            .with_context(|| format!("{}: tensor {name}", path.display()))?;
        sd.insert(name, t);
    }
    Ok(sd)
}

struct Bytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Bytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes tensors (moved to CPU, made contiguous) and metadata. The file appears atomically:
/// it is written under a temporary name in the same directory, then renamed.
pub fn write<'a>(
    path: &Path,
    tensors: impl Iterator<Item = (&'a String, &'a Tensor)>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut items = Vec::new();
    for (name, t) in tensors {
        let t = t.f_to_device(tch::Device::Cpu)?.f_contiguous()?;
        let dtype = dtype_of(t.kind()).with_context(|| format!("tensor {name}"))?;
        let numel = t.numel();
        let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        items.push((name.clone(), Bytes { dtype, shape, data }));
    }
    let meta: Option<HashMap<String, String>> =
        if metadata.is_empty() { None } else { Some(metadata.clone().into_iter().collect()) };
    let refs: Vec<(String, &Bytes)> = items.iter().map(|(n, b)| (n.clone(), b)).collect();
    crate::io::atomic::write_with(path, |tmp| {
        safetensors::serialize_to_file(refs, meta, tmp).map_err(|e| anyhow!("cannot write {}: {e}", tmp.display()))
    })
}
