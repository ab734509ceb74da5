//! The checkpoint reader is bounded and never panics (issue 15, parts 2 and 6a).
//!
//! Thousands of deterministic byte-level mutations (bit flips, byte sets, truncations, splices,
//! length fields, and zip entries mutated with their CRC fixed so the damage reaches the
//! unpickler) of small valid zip `.pt`, legacy `.pt` and `.safetensors` files go through
//! `StateDict::load`: none may panic, every error names the file, and the memory a read takes
//! stays under a set bound. Hand-built files check each bound on its own: storage entries that
//! inflate beyond their pickle, pickles that would build gigabytes, deep nesting, shared dicts
//! with 2^60 paths, views larger than their storage.
//!
//! Memory is measured twice: this binary's allocator counts the Rust heap per thread (peak per
//! read) and refuses any single thread more than [`HARD_CAP`], so a regression fails the test
//! instead of taking the machine down; libtorch allocates outside it, so the process's peak
//! RSS (VmHWM, reset through /proc/self/clear_refs) bounds everything together.
mod common;

use common::fixtures;
use medgen::checkpoint::pickle::Value;
use medgen::checkpoint::torch_file::TorchFile;
use medgen::checkpoint::StateDict;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Cursor, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;
use zip::write::SimpleFileOptions;
use zip::CompressionMethod;

// ---------------------------------------------------------------------------------------------
// Memory accounting.

/// No thread of this binary may hold more Rust heap than this: an allocation beyond it fails
/// (fallible reservations see an error, others abort the process: a loud failure either way).
const HARD_CAP: isize = 1 << 30;
/// Rust heap one read of a mutated small file may take above what the thread held before.
const READ_BOUND: isize = 64 << 20;
/// Peak RSS growth allowed over the whole fuzz run (libtorch included).
const RSS_BOUND_KB: u64 = 256 << 10;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

struct Counting;

/// Adds `delta` to this thread's live bytes; false (and no change) when that would pass the cap.
fn account(delta: isize) -> bool {
    LIVE.try_with(|live| {
        let now = live.get() + delta;
        if delta > 0 && now > HARD_CAP {
            return false;
        }
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
        true
    })
    .unwrap_or(true)
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if !account(l.size() as isize) {
            return std::ptr::null_mut();
        }
        let p = System.alloc(l);
        if p.is_null() {
            account(-(l.size() as isize));
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if !account(l.size() as isize) {
            return std::ptr::null_mut();
        }
        let p = System.alloc_zeroed(l);
        if p.is_null() {
            account(-(l.size() as isize));
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        account(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let delta = new_size as isize - l.size() as isize;
        if !account(delta) {
            return std::ptr::null_mut();
        }
        let q = System.realloc(p, l, new_size);
        if q.is_null() {
            account(-delta);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The tests of this binary run one at a time: the peak RSS is the whole process's.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` and returns its result with the most Rust heap this thread held above the start.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, isize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let r = f();
    (r, PEAK.with(Cell::get) - start)
}

fn proc_status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    line[field.len()..].trim().trim_end_matches("kB").trim().parse().unwrap()
}

/// Resets the process's peak RSS to its current RSS and returns that.
fn reset_peak_rss() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5")
        .expect("cannot reset the peak RSS through /proc/self/clear_refs: the memory bound cannot be checked");
    proc_status_kb("VmHWM:")
}

// ---------------------------------------------------------------------------------------------
// Reading.

enum Outcome {
    Loaded,
    Refused(String),
    Panicked(String),
}

/// Reads a file the way every command does, catching panics.
fn read(path: &Path) -> Outcome {
    match catch_unwind(AssertUnwindSafe(|| StateDict::load(path, None))) {
        Ok(Ok(_)) => Outcome::Loaded,
        Ok(Err(e)) => Outcome::Refused(format!("{e:#}")),
        Err(p) => Outcome::Panicked(
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default(),
        ),
    }
}

/// Reads `bytes` written to `dir/name` and returns the outcome and the Rust heap peak.
fn read_bytes(dir: &Path, name: &str, bytes: &[u8]) -> (Outcome, isize) {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let r = peak_during(|| read(&p));
    std::fs::remove_file(&p).unwrap();
    r
}

fn ckpt(name: &str) -> PathBuf {
    fixtures().join("checkpoint").join(name)
}

// ---------------------------------------------------------------------------------------------
// Zip surgery: entries found through the central directory, so that a mutated entry can get
// its CRC recomputed (otherwise the zip layer rejects every change before the unpickler sees it).

struct Entry {
    name: String,
    central: usize,
    local: usize,
    data: usize,
    size: usize,
}

fn u16_at(b: &[u8], i: usize) -> usize {
    u16::from_le_bytes([b[i], b[i + 1]]) as usize
}
fn u32_at(b: &[u8], i: usize) -> usize {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as usize
}

/// The entries of a small (non-zip64) archive, as written by torch.save or `zip_file`.
fn zip_entries(b: &[u8]) -> Vec<Entry> {
    let eocd = (0..=b.len() - 22).rev().find(|&i| b[i..i + 4] == *b"PK\x05\x06").expect("no end of central directory");
    let (count, mut at) = (u16_at(b, eocd + 10), u32_at(b, eocd + 16));
    let mut out = Vec::new();
    for _ in 0..count {
        assert_eq!(&b[at..at + 4], b"PK\x01\x02", "central directory entry");
        let (nlen, elen, clen) = (u16_at(b, at + 28), u16_at(b, at + 30), u16_at(b, at + 32));
        let local = u32_at(b, at + 42);
        let name = String::from_utf8_lossy(&b[at + 46..at + 46 + nlen]).into_owned();
        let data = local + 30 + u16_at(b, local + 26) + u16_at(b, local + 28);
        out.push(Entry { name, central: at, local, data, size: u32_at(b, at + 20) });
        at += 46 + nlen + elen + clen;
    }
    out
}

/// Recomputes an entry's CRC in its local and central headers after its data changed.
fn fix_crc(b: &mut [u8], e: &Entry) {
    let mut crc = flate2::Crc::new();
    crc.update(&b[e.data..e.data + e.size]);
    let sum = crc.sum().to_le_bytes();
    b[e.local + 14..e.local + 18].copy_from_slice(&sum);
    b[e.central + 16..e.central + 20].copy_from_slice(&sum);
}

/// Sets an entry's uncompressed size in both headers.
fn set_size(b: &mut [u8], e: &Entry, size: u32) {
    b[e.local + 22..e.local + 26].copy_from_slice(&size.to_le_bytes());
    b[e.central + 24..e.central + 28].copy_from_slice(&size.to_le_bytes());
}

/// A zip archive of the given entries (name, data, compressed or stored).
fn zip_file(entries: &[(&str, &[u8], bool)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, data, deflate) in entries {
        let method = if *deflate { CompressionMethod::Deflated } else { CompressionMethod::Stored };
        w.start_file(
            *name,
            SimpleFileOptions::default().compression_method(method).large_file(data.len() > u32::MAX as usize),
        )
        .unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

// ---------------------------------------------------------------------------------------------
// Mutations.

/// Values that make length fields lie: huge, sign-flipping, off by one.
const INTERESTING: &[u64] =
    &[0, 1, 0x7f, 0x80, 0xff, 0x7fff, 0xffff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 1 << 40, u64::MAX >> 1, u64::MAX];

fn flip_bits(rng: &mut ChaCha8Rng, b: &mut [u8], range: std::ops::Range<usize>) {
    for _ in 0..rng.random_range(1..=8) {
        let i = rng.random_range(range.clone());
        b[i] ^= 1 << rng.random_range(0..8);
    }
}

fn set_bytes(rng: &mut ChaCha8Rng, b: &mut [u8], range: std::ops::Range<usize>) {
    for _ in 0..rng.random_range(1..=4) {
        let i = rng.random_range(range.clone());
        b[i] = match rng.random_range(0..5) {
            0 => 0,
            1 => 0xff,
            2 => 0x7f,
            3 => 0x80,
            _ => rng.random(),
        };
    }
}

/// Overwrites 1, 2, 4 or 8 bytes at a random place with a lying length.
fn set_length(rng: &mut ChaCha8Rng, b: &mut [u8], range: std::ops::Range<usize>) {
    let width = [1, 2, 4, 8][rng.random_range(0..4)];
    let i = rng.random_range(range);
    let v = INTERESTING[rng.random_range(0..INTERESTING.len())].to_le_bytes();
    let end = (i + width).min(b.len());
    let n = end - i;
    b[i..end].copy_from_slice(&v[..n]);
}

fn mutate(rng: &mut ChaCha8Rng, seed: &Seed, all: &[Seed]) -> (String, Vec<u8>) {
    let mut b = seed.bytes.clone();
    let len = b.len();
    let kind = rng.random_range(0..8);
    let what = match kind {
        0 => {
            flip_bits(rng, &mut b, 0..len);
            "bit flips"
        }
        1 => {
            set_bytes(rng, &mut b, 0..len);
            "byte sets"
        }
        2 => {
            b.truncate(rng.random_range(0..len));
            "truncation"
        }
        3 => {
            let other = &all[rng.random_range(0..all.len())].bytes;
            let (i, j) = (rng.random_range(0..=len), rng.random_range(0..=other.len()));
            b.truncate(i);
            b.extend_from_slice(&other[j..]);
            "splice"
        }
        4 => {
            set_length(rng, &mut b, 0..len);
            "length field"
        }
        // Format-aware: the parts where lengths and structure live.
        _ => match seed.format {
            Format::Zip => {
                let entries = zip_entries(&b);
                let e = &entries[rng.random_range(0..entries.len())];
                // data.pkl most of the time: it is where the unpickler gets exercised.
                let e = if rng.random_bool(0.6) {
                    entries.iter().find(|e| e.name.ends_with("data.pkl")).unwrap()
                } else {
                    e
                };
                match rng.random_range(0..4) {
                    0 if e.size > 0 => {
                        flip_bits(rng, &mut b, e.data..e.data + e.size);
                        fix_crc(&mut b, e);
                        "zip entry bit flips, CRC fixed"
                    }
                    1 if e.size > 0 => {
                        set_length(rng, &mut b, e.data..e.data + e.size);
                        fix_crc(&mut b, e);
                        "zip entry length field, CRC fixed"
                    }
                    2 => {
                        // A size field of the local or central header (compressed or not).
                        let at = [e.local + 18, e.local + 22, e.central + 20, e.central + 24][rng.random_range(0..4)];
                        let v = INTERESTING[rng.random_range(0..INTERESTING.len())] as u32;
                        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
                        "zip header size field"
                    }
                    _ => {
                        set_bytes(rng, &mut b, e.local..e.data);
                        "zip local header bytes"
                    }
                }
            }
            Format::Legacy => {
                set_length(rng, &mut b, 0..len);
                flip_bits(rng, &mut b, 0..len);
                "legacy length field and bit flips"
            }
            Format::Safetensors => {
                let header_end = 8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
                match rng.random_range(0..3) {
                    0 => {
                        let v = INTERESTING[rng.random_range(0..INTERESTING.len())];
                        let v = if rng.random_bool(0.5) {
                            v
                        } else {
                            (header_end as u64 - 8).wrapping_add(rng.random_range(0..3)).wrapping_sub(1)
                        };
                        b[..8].copy_from_slice(&v.to_le_bytes());
                        "safetensors header length"
                    }
                    1 => {
                        // A number of the JSON header (shape or offset) replaced.
                        let digits: Vec<usize> = (8..header_end).filter(|&i| b[i].is_ascii_digit()).collect();
                        let i = digits[rng.random_range(0..digits.len())];
                        let mut j = i;
                        while j < header_end && b[j].is_ascii_digit() {
                            j += 1;
                        }
                        let v = INTERESTING[rng.random_range(0..INTERESTING.len())].to_string();
                        let mut out = b[..i].to_vec();
                        out.extend_from_slice(v.as_bytes());
                        out.extend_from_slice(&b[j..]);
                        // Keep the header length consistent so the JSON itself is what is tested.
                        let new_len = (header_end - 8 + v.len()) as u64 - (j - i) as u64;
                        out[..8].copy_from_slice(&new_len.to_le_bytes());
                        b = out;
                        "safetensors header number"
                    }
                    _ => {
                        flip_bits(rng, &mut b, 8..header_end);
                        "safetensors header bit flips"
                    }
                }
            }
        },
    };
    (what.to_string(), b)
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Format {
    Zip,
    Legacy,
    Safetensors,
}

struct Seed {
    name: String,
    format: Format,
    bytes: Vec<u8>,
}

/// The valid files mutated: torch.save fixtures (zip and legacy), the lpips wheel's legacy
/// heads, and safetensors files written by medgen's own writer.
fn seeds(dir: &Path) -> Vec<Seed> {
    let mut out = Vec::new();
    for f in ["dtypes.pt", "views.pt", "model.pt", "training.pt"] {
        out.push(Seed { name: f.into(), format: Format::Zip, bytes: std::fs::read(ckpt(f)).unwrap() });
    }
    for f in ["dtypes_legacy.pt", "views_legacy.pt"] {
        out.push(Seed { name: f.into(), format: Format::Legacy, bytes: std::fs::read(ckpt(f)).unwrap() });
    }
    let lpips = std::fs::read_to_string(ckpt("lpips_dir.txt")).unwrap();
    let alex = Path::new(lpips.trim()).join("alex.pth");
    out.push(Seed { name: "alex.pth".into(), format: Format::Legacy, bytes: std::fs::read(alex).unwrap() });
    for f in ["dtypes.pt", "views.pt"] {
        let sd = StateDict::load(&ckpt(f), None).unwrap();
        let meta = [("medgen.generation".to_string(), "monai".to_string())].into_iter().collect();
        let p = dir.join(f.replace(".pt", ".safetensors"));
        sd.save_safetensors(&p, &meta).unwrap();
        out.push(Seed {
            name: p.file_name().unwrap().to_string_lossy().into(),
            format: Format::Safetensors,
            bytes: std::fs::read(&p).unwrap(),
        });
    }
    for s in &out {
        assert!(
            matches!(read_bytes(dir, &format!("valid-{}", s.name), &s.bytes).0, Outcome::Loaded),
            "{} must load",
            s.name
        );
    }
    out
}

const MUTATIONS: usize = 6000;

#[test]
fn mutated_checkpoints_never_panic_and_stay_bounded() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let seeds = seeds(tmp.path());
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let mut panics = Vec::new();
    let mut unnamed = Vec::new();
    let (mut loaded, mut refused, mut worst) = (0, 0, (0isize, String::new()));
    let start = Instant::now();
    let rss0 = reset_peak_rss();
    for i in 0..MUTATIONS {
        let seed = &seeds[i % seeds.len()];
        let (what, bytes) = mutate(&mut rng, seed, &seeds);
        let ext = if seed.format == Format::Safetensors { "safetensors" } else { "pt" };
        let name = format!("case{i}.{ext}");
        let case = format!("case {i}: {what} of {} ({} bytes)", seed.name, bytes.len());
        let (outcome, peak) = read_bytes(tmp.path(), &name, &bytes);
        if peak > worst.0 {
            worst = (peak, case.clone());
        }
        match outcome {
            Outcome::Loaded => loaded += 1,
            Outcome::Refused(e) => {
                refused += 1;
                if !e.contains(&name) {
                    unnamed.push(format!("{case}: {e}"));
                }
            }
            Outcome::Panicked(m) => panics.push(format!("{case}: {m}")),
        }
    }
    let rss_growth = proc_status_kb("VmHWM:").saturating_sub(rss0);
    eprintln!(
        "{MUTATIONS} mutations of {} files in {:.1} s: {loaded} loaded, {refused} refused, {} panicked; \
         largest Rust heap for one read {} KiB ({}); peak RSS growth {rss_growth} KiB",
        seeds.len(),
        start.elapsed().as_secs_f64(),
        panics.len(),
        worst.0 >> 10,
        worst.1
    );
    assert!(panics.is_empty(), "{} reads panicked, e.g.:\n{}", panics.len(), panics[..panics.len().min(10)].join("\n"));
    assert!(
        unnamed.is_empty(),
        "{} errors do not name the file, e.g.:\n{}",
        unnamed.len(),
        unnamed[..unnamed.len().min(10)].join("\n")
    );
    assert!(worst.0 <= READ_BOUND, "{}: {} bytes of Rust heap, bound {READ_BOUND}", worst.1, worst.0);
    assert!(rss_growth <= RSS_BOUND_KB, "peak RSS grew by {rss_growth} KiB over the run, bound {RSS_BOUND_KB} KiB");
    // The peak RSS reading is live: 64 MiB touched now shows in it.
    let rss = proc_status_kb("VmRSS:");
    let touched = std::hint::black_box(vec![1u8; 64 << 20]);
    let hwm = proc_status_kb("VmHWM:");
    assert!(hwm >= rss + (60 << 10), "VmHWM {hwm} KiB after touching 64 MiB at VmRSS {rss} KiB: not a peak RSS");
    drop(touched);
    // The mutations must reach past the first check: most refused, some still loaded (tensor
    // data damaged, structure intact).
    assert!(refused > MUTATIONS / 2 && loaded > 0, "{loaded} loaded, {refused} refused");
}

// ---------------------------------------------------------------------------------------------
// Hand-built files, one bound each.

/// The storage key, dtype size and element count of the tensor `name` in a torch.save file.
fn storage_of(path: &Path, name: &str) -> (String, usize) {
    let f = TorchFile::open(path).unwrap();
    let Value::Dict(d) = &f.root else { panic!("root is not a dict") };
    let d = d.borrow();
    let (_, v) = d.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == name)).unwrap();
    let Value::Tensor(t) = v else { panic!("{name} is not a tensor") };
    (t.storage.key.clone(), t.storage.numel * t.storage.dtype.elem_size())
}

/// The entries of a torch zip, with the one named `replace` given new data.
fn rebuild_zip(src: &[u8], replace: &str, data: &[u8], deflate: bool) -> Vec<u8> {
    let mut a = zip::ZipArchive::new(Cursor::new(src)).unwrap();
    let mut entries: Vec<(String, Vec<u8>, bool)> = Vec::new();
    for i in 0..a.len() {
        let mut e = a.by_index(i).unwrap();
        let name = e.name().unwrap().into_owned();
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut buf).unwrap();
        entries.push(if name == replace { (name, data.to_vec(), deflate) } else { (name, buf, false) });
    }
    assert!(entries.iter().any(|(n, _, _)| n == replace), "no entry {replace}");
    zip_file(&entries.iter().map(|(n, d, z)| (n.as_str(), d.as_slice(), *z)).collect::<Vec<_>>())
}

fn refused(dir: &Path, name: &str, bytes: &[u8], max_heap: isize) -> String {
    let t = Instant::now();
    let (outcome, peak) = read_bytes(dir, name, bytes);
    let e = match outcome {
        Outcome::Refused(e) => e,
        Outcome::Loaded => panic!("{name} loaded"),
        Outcome::Panicked(m) => panic!("{name} panicked: {m}"),
    };
    eprintln!("{name}: refused in {:.2} s with {} KiB of Rust heap: {e}", t.elapsed().as_secs_f64(), peak >> 10);
    assert!(peak <= max_heap, "{name}: {peak} bytes of Rust heap, bound {max_heap}");
    assert!(e.contains(name), "{name}: the error names the file: {e}");
    e
}

#[test]
fn storage_entries_never_inflate_beyond_their_pickle() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let src_path = ckpt("dtypes.pt");
    let src = std::fs::read(&src_path).unwrap();
    let (key, nbytes) = storage_of(&src_path, "f32");
    let entry = zip_entries(&src).into_iter().find(|e| e.name.ends_with(&format!("data/{key}"))).unwrap().name;
    let zeros = vec![0u8; 64 << 20];

    // 64 MiB of zeros (about 64 KiB compressed) where the pickle declares 15 float32s.
    let bomb = rebuild_zip(&src, &entry, &zeros, true);
    assert!(bomb.len() < 1 << 20, "the bomb is small: {} bytes", bomb.len());
    let e = refused(tmp.path(), "inflating.pt", &bomb, 1 << 20);
    assert!(e.contains(&entry) && e.contains(&nbytes.to_string()), "names the entry and the declared size: {e}");

    // The same, with both zip headers lying that the entry holds exactly what the pickle says.
    let mut lying = bomb.clone();
    let e0 = zip_entries(&lying).into_iter().find(|e| e.name == entry).unwrap();
    set_size(&mut lying, &e0, nbytes as u32);
    let e = refused(tmp.path(), "lying.pt", &lying, 1 << 20);
    assert!(e.contains(&entry), "names the entry: {e}");

    // Stored, one float more and one float less than declared.
    for (name, n) in [("more.pt", nbytes + 4), ("fewer.pt", nbytes - 4)] {
        let e = refused(tmp.path(), name, &rebuild_zip(&src, &entry, &vec![0u8; n], false), 1 << 20);
        assert!(e.contains(&entry) && e.contains(&n.to_string()), "{name}: names the entry and its size: {e}");
    }

    // A data.pkl inflating to 65 MiB is refused before it is read.
    let pkl = zip_entries(&src).into_iter().find(|e| e.name.ends_with("data.pkl")).unwrap().name;
    let e = refused(tmp.path(), "big_pickle.pt", &rebuild_zip(&src, &pkl, &vec![0u8; 65 << 20], true), 1 << 20);
    assert!(e.contains(&pkl) && e.contains("MiB"), "{e}");
}

/// A tiny pickle assembler for hand-built data.pkl files.
mod pk {
    pub fn s(x: &str) -> Vec<u8> {
        let mut v = vec![0x8c, x.len() as u8];
        v.extend_from_slice(x.as_bytes());
        v
    }
    pub fn int(i: u64) -> Vec<u8> {
        let mut v = vec![0x8a, 8];
        v.extend_from_slice(&i.to_le_bytes());
        v
    }
    pub fn tuple(items: &[Vec<u8>]) -> Vec<u8> {
        let mut v = vec![b'('];
        items.iter().for_each(|i| v.extend_from_slice(i));
        v.push(b't');
        v
    }
    /// `_rebuild_tensor_v2(storage '0' of `numel` floats, offset, size, stride, False, {})`.
    pub fn tensor(numel: u64, offset: u64, size: &[u64], stride: &[u64]) -> Vec<u8> {
        let mut v = b"ctorch._utils\n_rebuild_tensor_v2\n".to_vec();
        let mut pid = tuple(&[s("storage"), b"ctorch\nFloatStorage\n".to_vec(), s("0"), s("cpu"), int(numel)]);
        pid.push(b'Q');
        let size = tuple(&size.iter().map(|&d| int(d)).collect::<Vec<_>>());
        let stride = tuple(&stride.iter().map(|&d| int(d)).collect::<Vec<_>>());
        v.extend(tuple(&[pid, int(offset), size, stride, vec![0x89], b"}".to_vec()]));
        v.push(b'R');
        v
    }
    /// `{name: value}` as a whole pickle.
    pub fn dict_of(name: &str, value: Vec<u8>) -> Vec<u8> {
        let mut v = vec![0x80, 2, b'}'];
        v.extend(s(name));
        v.extend(value);
        v.extend(b"s.");
        v
    }
}

/// A torch zip with this data.pkl and a storage `0` of `storage_floats` float32s.
fn torch_zip(pickle: &[u8], storage_floats: usize) -> Vec<u8> {
    zip_file(&[
        ("archive/data.pkl", pickle, false),
        ("archive/byteorder", b"little", false),
        ("archive/data/0", &vec![0u8; 4 * storage_floats], false),
        ("archive/version", b"3\n", false),
    ])
}

#[test]
fn hand_built_pickles_are_refused_within_bounds() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The assembler itself is right: a plain file loads.
    let ok = torch_zip(&pk::dict_of("w", pk::tensor(12, 0, &[3, 4], &[4, 1])), 12);
    assert!(matches!(read_bytes(dir, "ok.pt", &ok).0, Outcome::Loaded));

    // Declared sizes the file does not hold: 10^15 elements, and a view past its storage.
    let e = refused(
        dir,
        "huge_numel.pt",
        &torch_zip(&pk::dict_of("w", pk::tensor(1_000_000_000_000_000, 0, &[2], &[1])), 12),
        1 << 20,
    );
    assert!(e.contains("archive/data/0"), "{e}");
    let e = refused(
        dir,
        "past_storage.pt",
        &torch_zip(&pk::dict_of("w", pk::tensor(12, 5, &[4, 4], &[4, 1])), 12),
        1 << 20,
    );
    assert!(e.contains("reaches element"), "{e}");
    // An expanded view of 2^40 floats from one stored float, and sizes whose product overflows.
    let e = refused(
        dir,
        "expanded.pt",
        &torch_zip(&pk::dict_of("w", pk::tensor(1, 0, &[1 << 20, 1 << 20], &[0, 0])), 1),
        1 << 20,
    );
    assert!(e.contains("MiB"), "{e}");
    let e = refused(
        dir,
        "overflow.pt",
        &torch_zip(&pk::dict_of("w", pk::tensor(1, 0, &[1 << 40; 3], &[0; 3])), 1),
        1 << 20,
    );
    assert!(e.contains("overflows"), "{e}");

    // Billion laughs: one 1 MiB string fetched from the memo 20,000 times (20 GiB if built).
    let mut p = vec![0x80, 2, b'X'];
    p.extend((1u32 << 20).to_le_bytes());
    p.extend(vec![b'a'; 1 << 20]);
    p.extend(b"q\x00(");
    p.extend(b"h\x00".repeat(20_000));
    p.extend(b"l.");
    let e = refused(dir, "laughs.pt", &torch_zip(&p, 1), 160 << 20);
    assert!(e.contains("MiB of objects"), "{e}");

    // Tuples nested a million deep (one byte per level), then dicts 200,000 deep: dropping
    // them must not recurse (this test thread has a 2 MiB stack).
    let mut p = vec![0x80, 2, b')'];
    p.extend(vec![0x85; 1_000_000]);
    p.push(b'.');
    refused(dir, "deep_tuples.pt", &torch_zip(&p, 1), 256 << 20);
    let mut p = vec![0x80, 2];
    p.extend(b"}K\x00".repeat(200_000));
    p.extend(b"}");
    p.extend(b"s".repeat(200_000));
    p.push(b'.');
    let e = refused(dir, "deep_dicts.pt", &torch_zip(&p, 1), 256 << 20);
    assert!(e.contains("levels deep") || e.contains("no state dict"), "{e}");

    // Sixty levels of a dict holding the previous one twice: 2^60 paths to one tensor.
    let mut p = vec![0x80, 2, b'}'];
    p.extend(pk::s("w"));
    p.extend(pk::tensor(1, 0, &[1], &[1]));
    p.extend(b"sr\x00\x00\x00\x000");
    for i in 0u32..60 {
        p.extend(b"}(");
        p.extend(pk::s("a"));
        p.push(b'j');
        p.extend(i.to_le_bytes());
        p.extend(pk::s("b"));
        p.push(b'j');
        p.extend(i.to_le_bytes());
        p.extend(b"ur");
        p.extend((i + 1).to_le_bytes());
        p.push(b'0');
    }
    let mut root = vec![b'}'];
    root.extend(pk::s("x"));
    root.push(b'j');
    root.extend(60u32.to_le_bytes());
    root.extend(b"s.");
    p.extend(root);
    let e = refused(dir, "shared_dicts.pt", &torch_zip(&p, 1), 64 << 20);
    assert!(e.contains("entries"), "{e}");
    let path = dir.join("shared_dicts_key.pt");
    std::fs::write(&path, torch_zip(&p, 1)).unwrap();
    let (r, peak) = peak_during(|| StateDict::load(&path, Some("x")));
    let e = format!("{:#}", r.expect_err("loaded 2^60 tensors"));
    eprintln!("shared_dicts_key.pt with --key x: {} KiB of Rust heap: {e}", peak >> 10);
    assert!(e.contains("entries") && e.contains("shared_dicts_key.pt"), "{e}");
    assert!(peak < 16 << 20, "{peak} bytes of Rust heap");
}

#[test]
fn legacy_storages_larger_than_the_file_are_refused() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let src = std::fs::read(ckpt("views_legacy.pt")).unwrap();
    // The last storage's 8-byte element count sits right before its data, at the end.
    let sd = StateDict::load(&ckpt("views_legacy.pt"), None).unwrap();
    assert!(!sd.is_empty());
    let mut hits = 0;
    for at in 0..src.len() - 8 {
        let n = u64::from_le_bytes(src[at..at + 8].try_into().unwrap());
        // The storage header: the number of float32s from here to the end.
        if n > 0 && n.checked_mul(4).and_then(|b| b.checked_add(at as u64 + 8)) == Some(src.len() as u64) {
            hits += 1;
            for v in [n + 1, 1 << 40, u64::MAX] {
                let mut b = src.clone();
                b[at..at + 8].copy_from_slice(&v.to_le_bytes());
                let e = refused(tmp.path(), "legacy_lies.pt", &b, 1 << 20);
                assert!(e.contains("elements") || e.contains("truncated"), "{e}");
            }
        }
    }
    assert_eq!(hits, 1, "found the last storage header of views_legacy.pt");
}

#[test]
fn safetensors_lengths_are_checked_before_reading() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let file = |header: &str, data: usize| {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend(vec![0u8; data]);
        b
    };
    let ok = file(r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#, 24);
    assert!(matches!(read_bytes(tmp.path(), "ok.safetensors", &ok).0, Outcome::Loaded));
    let mut huge = ok.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = refused(tmp.path(), "huge_header.safetensors", &huge, 1 << 20);
    assert!(e.contains("header length"), "{e}");
    // A terabyte tensor declared, 24 bytes present.
    let tb = file(r#"{"w":{"dtype":"F32","shape":[262144,1048576],"data_offsets":[0,1099511627776]}}"#, 24);
    let e = refused(tmp.path(), "terabyte.safetensors", &tb, 1 << 20);
    assert!(e.contains("1099511627776"), "{e}");
    // Offsets that disagree with dtype and shape, and shapes whose product overflows.
    let bad = file(r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#, 20);
    refused(tmp.path(), "bad_offsets.safetensors", &bad, 1 << 20);
    let ovf = file(r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}"#, 0);
    refused(tmp.path(), "overflow.safetensors", &ovf, 1 << 20);
}

#[test]
fn large_tensors_take_a_small_multiple_of_their_size() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    const FLOATS: u64 = 16 << 20; // 64 MiB
    let pt = tmp.path().join("large.pt");
    std::fs::write(&pt, torch_zip(&pk::dict_of("w", pk::tensor(FLOATS, 0, &[FLOATS], &[1])), FLOATS as usize)).unwrap();
    let st = tmp.path().join("large.safetensors");
    StateDict::load(&pt, None).unwrap().save_safetensors(&st, &Default::default()).unwrap();
    for p in [&pt, &st] {
        let rss0 = reset_peak_rss();
        let sd = StateDict::load(p, None).unwrap();
        let growth = proc_status_kb("VmHWM:").saturating_sub(rss0);
        eprintln!("{}: peak RSS +{} MiB for 64 MiB of tensors", p.display(), growth >> 10);
        assert_eq!(sd.get("w").unwrap().numel() as u64, FLOATS);
        assert!(growth <= (3 * 64) << 10, "{}: peak RSS grew by {growth} KiB for 64 MiB of tensors", p.display());
    }
}
