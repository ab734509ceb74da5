//! The training data loader: a `t1w`/`flair` TSV list and its PNGs, read as the reference reads
//! them (8-bit grayscale, `u8 / 255.0`), or its NIfTI volumes (3-D models, `data::volumes`),
//! augmented (PNGs) with one draw per sample for both images, batched, and decoded in parallel
//! (rayon) on a background thread ahead of the training step.
//!
//! Everything random (the order and each sample's augmentation) is a function of the seed, the
//! epoch and the sample's row, not of thread timing: the same seed gives the same batches.
use super::augment::AugmentConfig;
use super::volumes::load_volume;
use crate::io::png::{load_png, stack_images};
use crate::io::volume::is_volume_name;
use anyhow::{anyhow, bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use tch::Tensor;

/// One row of a list: a T1w slice and, in ControlNet lists, its FLAIR slice.
#[derive(Debug, Clone, PartialEq)]
pub struct PairRecord {
    pub t1w: PathBuf,
    pub flair: Option<PathBuf>,
}

/// Reads a list written by `medgen preprocess` (or the reference `create_datalist.py`): a header
/// naming the `t1w` and optionally `flair` columns, tab-separated. Relative paths are relative
/// to the list's directory.
pub fn read_list(path: &Path) -> Result<Vec<PairRecord>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read list {}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().with_context(|| format!("{} is empty", path.display()))?.split('\t').collect();
    let col = |name: &str| header.iter().position(|h| h.trim() == name);
    let t1w_col =
        col("t1w").with_context(|| format!("{}: no `t1w` column in the header {header:?}", path.display()))?;
    let flair_col = col("flair");
    let base = path.parent().unwrap_or(Path::new(""));
    let mut records = Vec::new();
    for (i, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let field = |c: usize| -> Result<PathBuf> {
            let f =
                fields.get(c).with_context(|| format!("{} line {}: {} fields", path.display(), i + 2, fields.len()))?;
            Ok(base.join(f.trim()))
        };
        records.push(PairRecord { t1w: field(t1w_col)?, flair: flair_col.map(field).transpose()? });
    }
    Ok(records)
}

/// One batch: `(B, 1, H, W)` images, the list rows they came from, and which samples drop their
/// text conditioning (the reference's classifier-free-guidance dropout).
#[derive(Debug)]
pub struct Batch {
    pub t1w: Tensor,
    pub flair: Option<Tensor>,
    pub rows: Vec<usize>,
    pub drop_context: Vec<bool>,
}

#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub shuffle: bool,
    pub drop_last: bool,
    pub augment: Option<AugmentConfig>,
    /// Load the `flair` column too (ControlNet training).
    pub with_flair: bool,
    /// Probability that a sample's text is replaced by the null prompt (0.1 in the reference).
    pub context_dropout: f64,
    pub seed: u64,
    /// Batches decoded ahead of the consumer.
    pub prefetch: usize,
    /// Data-parallel training: `(rank, world_size)`. Each epoch's order (the same on every rank)
    /// is padded to a multiple of `world_size` by repeating its start, and rank `r` takes positions
    /// `r, r + world_size, ...`, as torch's DistributedSampler: the shards are disjoint, and the
    /// ranks' k-th batches together are the k-th batch of one process with `world_size` times the
    /// batch size.
    pub shard: Option<(usize, usize)>,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 8,
            shuffle: true,
            drop_last: false,
            augment: None,
            with_flair: false,
            context_dropout: 0.0,
            seed: 42,
            prefetch: 2,
            shard: None,
        }
    }
}

pub struct DataLoader {
    records: std::sync::Arc<Vec<PairRecord>>,
    cfg: LoaderConfig,
}

/// A generator for one sample of one epoch: independent of the order samples are decoded in.
fn sample_rng(seed: u64, epoch: u64, row: usize) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ row as u64);
    r
}

/// A PNG slice `(1, H, W)`, or a NIfTI volume `(1, X, Y, Z)` normalised as [`crate::data::volumes`] says.
fn load_image(path: &Path) -> Result<Tensor> {
    if is_volume_name(path) {
        load_volume(path)
    } else {
        load_png(path)
    }
}

/// Whether a list names NIfTI volumes (3-D training) rather than PNG slices; a list mixing both is an error
/// naming one of each.
pub fn lists_volumes(records: &[PairRecord]) -> Result<bool> {
    let paths = || records.iter().flat_map(|r| std::iter::once(&r.t1w).chain(r.flair.as_ref()));
    let volume = paths().find(|p| is_volume_name(p));
    let slice = paths().find(|p| !is_volume_name(p));
    match (volume, slice) {
        (Some(v), Some(s)) => bail!(
            "the list mixes NIfTI volumes ({}) and 2-D images ({}): a model trains on one or the other",
            v.display(),
            s.display()
        ),
        (v, _) => Ok(v.is_some()),
    }
}

fn load_sample(rec: &PairRecord, cfg: &LoaderConfig, epoch: u64, row: usize) -> Result<(Tensor, Option<Tensor>, bool)> {
    let mut rng = sample_rng(cfg.seed, epoch, row);
    let params = cfg.augment.map(|a| a.draw(&mut rng)).unwrap_or_default();
    let drop = cfg.context_dropout > 0.0 && rng.random::<f64>() < cfg.context_dropout;
    let aug = |img: Tensor| -> Result<Tensor> {
        if cfg.augment.is_some() {
            params.apply(&img)
        } else {
            Ok(img)
        }
    };
    let t1w = aug(load_image(&rec.t1w)?)?;
    let flair = if cfg.with_flair {
        let p = rec.flair.as_ref().with_context(|| format!("row {row}: the list has no flair column"))?;
        let f = aug(load_image(p)?)?;
        ensure!(
            f.size() == t1w.size(),
            "row {row}: FLAIR {} is {:?}, T1w {} is {:?}",
            p.display(),
            f.size(),
            rec.t1w.display(),
            t1w.size()
        );
        Some(f)
    } else {
        None
    };
    Ok((t1w, flair, drop))
}

impl DataLoader {
    pub fn new(records: Vec<PairRecord>, cfg: LoaderConfig) -> Result<Self> {
        ensure!(cfg.batch_size > 0, "batch_size must be positive");
        ensure!(!records.is_empty(), "the list is empty");
        ensure!((0.0..=1.0).contains(&cfg.context_dropout), "context_dropout must be in [0, 1]");
        if let Some((rank, world)) = cfg.shard {
            ensure!(world > 0 && rank < world, "shard {rank} of {world} does not exist");
        }
        ensure!(
            cfg.augment.is_none() || !lists_volumes(&records)?,
            "the augmentations are 2-D: volumes are loaded without them"
        );
        if cfg.with_flair {
            if let Some(i) = records.iter().position(|r| r.flair.is_none()) {
                bail!("row {i} has no flair image, which ControlNet training needs");
            }
        }
        Ok(Self { records: std::sync::Arc::new(records), cfg })
    }

    /// Samples per epoch (of this rank's shard).
    pub fn len(&self) -> usize {
        match self.cfg.shard {
            Some((_, world)) => self.records.len().div_ceil(world),
            None => self.records.len(),
        }
    }

    /// The same loader over the whole list (e.g. for statistics every rank must agree on).
    pub fn unsharded(&self) -> DataLoader {
        DataLoader { records: self.records.clone(), cfg: LoaderConfig { shard: None, ..self.cfg.clone() } }
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Batches per epoch.
    pub fn num_batches(&self) -> usize {
        let (n, b) = (self.len(), self.cfg.batch_size);
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The row order of an epoch.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.records.len()).collect();
        if self.cfg.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.seed ^ 0x5EED_0000_0000_0000);
            rng.set_stream(epoch);
            order.shuffle(&mut rng);
        }
        match self.cfg.shard {
            Some((rank, world)) => {
                let total = self.len() * world;
                (rank..total).step_by(world).map(|i| order[i % order.len()]).collect()
            }
            None => order,
        }
    }

    /// The batches of `epoch`, decoded on a background thread `prefetch` batches ahead: exactly
    /// [`num_batches`](Self::num_batches) of them, or an error (a file that cannot be read, images of
    /// different sizes in one batch, the thread stopping early) after which the epoch ends.
    pub fn epoch(&self, epoch: u64) -> Epoch {
        let records = self.records.clone();
        let cfg = self.cfg.clone();
        let order = self.order(epoch);
        let nb = self.num_batches();
        spawn_epoch(nb, self.cfg.prefetch, move |tx| send_batches(&records, &cfg, &order, nb, epoch, tx))
    }
}

/// Runs `send` on a background thread that feeds the returned epoch of `expected` batches; a panic in
/// it reaches the consumer as an error.
fn spawn_epoch(
    expected: usize,
    prefetch: usize,
    send: impl FnOnce(&SyncSender<Result<Batch>>) + Send + 'static,
) -> Epoch {
    let (tx, rx) = sync_channel(prefetch.max(1));
    std::thread::spawn(move || {
        if let Err(msg) = crate::panics::catch(|| send(&tx)) {
            let _ = tx.send(Err(anyhow!("the data loader failed: {msg}, please report")));
        }
    });
    Epoch(Batches { rx, received: 0, expected, finished: false })
}

/// Decodes and sends the batches of an epoch until the first error (which is sent too) or until the
/// receiver is gone.
fn send_batches(
    records: &[PairRecord],
    cfg: &LoaderConfig,
    order: &[usize],
    nb: usize,
    epoch: u64,
    tx: &SyncSender<Result<Batch>>,
) {
    for chunk in order.chunks(cfg.batch_size).take(nb) {
        let batch = collate(records, cfg, chunk, epoch);
        let failed = batch.is_err();
        if tx.send(batch).is_err() || failed {
            return;
        }
    }
}

/// The samples of `chunk` (list rows) decoded in parallel and stacked into one batch.
fn collate(records: &[PairRecord], cfg: &LoaderConfig, chunk: &[usize], epoch: u64) -> Result<Batch> {
    let samples: Vec<_> =
        chunk.par_iter().map(|&row| load_sample(&records[row], cfg, epoch, row)).collect::<Result<_>>()?;
    let t1w_paths: Vec<&Path> = chunk.iter().map(|&r| records[r].t1w.as_path()).collect();
    let t1w = stack_images(&samples.iter().map(|x| x.0.shallow_clone()).collect::<Vec<_>>(), &t1w_paths)?;
    let flair = if cfg.with_flair {
        let (mut imgs, mut paths) = (Vec::with_capacity(chunk.len()), Vec::with_capacity(chunk.len()));
        for (&row, s) in chunk.iter().zip(&samples) {
            let rec = &records[row];
            let (Some(img), Some(p)) = (&s.1, &rec.flair) else { bail!("row {row}: no FLAIR image") };
            imgs.push(img.shallow_clone());
            paths.push(p.as_path());
        }
        Some(stack_images(&imgs, &paths)?)
    } else {
        None
    };
    Ok(Batch { t1w, flair, rows: chunk.to_vec(), drop_context: samples.iter().map(|x| x.2).collect() })
}

/// The batches of one epoch, to iterate over. An `IntoIterator` (as the channel receiver it replaced
/// was), so the training loops' `.into_iter()` calls stay as they were.
pub struct Epoch(Batches);

impl IntoIterator for Epoch {
    type Item = Result<Batch>;
    type IntoIter = Batches;

    fn into_iter(self) -> Batches {
        self.0
    }
}

/// The batches of one epoch, as they are decoded. It yields exactly the epoch's number of batches, or
/// stops after an error: a loader thread that ends early (it never should) is an error too, so an
/// epoch can never end short without a word.
pub struct Batches {
    rx: Receiver<Result<Batch>>,
    received: usize,
    expected: usize,
    finished: bool,
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.finished || self.received == self.expected {
            return None;
        }
        let item = match self.rx.recv() {
            Ok(Ok(batch)) => {
                self.received += 1;
                return Some(Ok(batch));
            }
            Ok(Err(e)) => e,
            Err(_) => anyhow!("the data loader stopped after {} of {} batches", self.received, self.expected),
        };
        self.finished = true;
        Some(Err(item))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        Batch {
            t1w: Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu)),
            flair: None,
            rows: vec![0],
            drop_context: vec![false],
        }
    }

    /// A loader thread that stops early (it never should) is an error naming how far it got, not the end of
    /// a shorter epoch.
    #[test]
    fn an_epoch_that_ends_early_is_an_error() {
        let mut epoch = spawn_epoch(3, 2, |tx| {
            let _ = tx.send(Ok(batch()));
        })
        .into_iter();
        assert!(epoch.next().unwrap().is_ok());
        let e = format!("{:#}", epoch.next().unwrap().unwrap_err());
        assert_eq!(e, "the data loader stopped after 1 of 3 batches");
        assert!(epoch.next().is_none());
    }

    /// A panic while decoding is caught on the loader thread and arrives as an error after the batches sent
    /// before it.
    #[test]
    fn a_panic_in_the_loader_thread_is_an_error() {
        let mut epoch = spawn_epoch(3, 2, |tx| {
            let _ = tx.send(Ok(batch()));
            panic!("decoder bug");
        })
        .into_iter();
        assert!(epoch.next().unwrap().is_ok());
        let e = format!("{:#}", epoch.next().unwrap().unwrap_err());
        assert!(
            e.starts_with("the data loader failed: internal error at ") && e.ends_with("decoder bug, please report"),
            "{e}"
        );
        assert!(epoch.next().is_none());
    }

    /// Exactly the expected batches, then the end, even if the thread had more.
    #[test]
    fn an_epoch_yields_exactly_its_batches() {
        let epoch = spawn_epoch(2, 1, |tx| {
            for _ in 0..3 {
                if tx.send(Ok(batch())).is_err() {
                    return;
                }
            }
        });
        let batches: Vec<Batch> = epoch.into_iter().map(|b| b.unwrap()).collect();
        assert_eq!(batches.len(), 2);
    }
}
