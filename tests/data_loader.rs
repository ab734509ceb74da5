//! The training data loader and its augmentations: MONAI's deterministic transforms for the same
//! parameters (tests/gen_augment_fixtures.py), PNG reading, pair alignment under augmentation,
//! determinism per seed, batching.
mod common;

use common::{fixtures, max_abs_diff};
use medgen::checkpoint::StateDict;
use medgen::data::augment::{Affine, AugmentConfig, AugmentParams};
use medgen::data::loader::{read_list, DataLoader, LoaderConfig};
use medgen::io::png::load_png;
use serde_json::Value;
use std::path::Path;
use tch::Tensor;

#[test]
fn augmentations_match_monai_for_the_same_parameters() {
    let root = fixtures().join("augment");
    let io = StateDict::load(&root.join("augment.safetensors"), None).unwrap();
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(root.join("manifest.json")).unwrap()).unwrap();
    let img = io.get("image").unwrap();
    for c in &cases {
        let name = c["name"].as_str().unwrap();
        let f = |k: &str| -> Option<[f64; 2]> { c.get(k).map(|v| [v[0].as_f64().unwrap(), v[1].as_f64().unwrap()]) };
        let p = AugmentParams {
            flip: c.get("flip").is_some(),
            affine: f("translate").map(|translate| Affine { translate, scale: f("scale").unwrap() }),
            shift: c.get("shift").map(|v| v.as_f64().unwrap()),
            gamma: c.get("gamma").map(|v| v.as_f64().unwrap()),
        };
        // `apply` ends with the [0, 1] clamp MONAI's two thresholds perform; the fixture stops before it.
        let got = p.apply(img).unwrap();
        let want = io.get(name).unwrap().clamp(0.0, 1.0);
        let err = max_abs_diff(&got, &want);
        println!("{name:24} max abs error {err:.3e}");
        assert!(err <= 1e-5, "{name}: {err}");
    }
}

/// Writes `n` PNG pairs (FLAIR identical to T1w, so an aligned augmentation keeps them equal) and
/// their list; returns the list path.
fn write_pairs(dir: &Path, n: usize) -> std::path::PathBuf {
    let mut tsv = String::from("t1w\tflair\n");
    for i in 0..n {
        let img =
            image::GrayImage::from_fn(24, 16, |x, y| image::Luma([((x * 7 + y * 13 + i as u32 * 31) % 256) as u8]));
        let t1w = dir.join(format!("s{i}_T1w.png"));
        let flair = dir.join(format!("s{i}_FLAIR.png"));
        img.save(&t1w).unwrap();
        img.save(&flair).unwrap();
        // Relative paths resolve against the list's directory.
        tsv.push_str(&format!("s{i}_T1w.png\t{}\n", flair.display()));
    }
    let list = dir.join("train.tsv");
    std::fs::write(&list, tsv).unwrap();
    list
}

fn all_batches(loader: &DataLoader, epoch: u64) -> Vec<medgen::data::loader::Batch> {
    loader.epoch(epoch).into_iter().map(|b| b.unwrap()).collect()
}

#[test]
fn loader_keeps_pairs_aligned_and_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let list = write_pairs(tmp.path(), 23);
    let records = read_list(&list).unwrap();
    assert_eq!(records.len(), 23);
    assert_eq!(records[0].t1w, tmp.path().join("s0_T1w.png"));

    // Exactly u8 / 255 (division), shape (1, H, W).
    let px = load_png(&records[3].t1w).unwrap();
    assert_eq!(px.size(), [1, 16, 24]);
    let raw = image::open(&records[3].t1w).unwrap().to_luma8();
    let want: Vec<f32> = raw.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    assert!(px.flatten(0, -1).equal(&Tensor::from_slice(&want)));

    // Everything applies often, to see it happen.
    let aug = AugmentConfig {
        flip_prob: 0.5,
        affine_prob: 0.9,
        shift_prob: 0.5,
        contrast_prob: 0.5,
        ..AugmentConfig::default()
    };
    let cfg = LoaderConfig {
        batch_size: 5,
        augment: Some(aug),
        with_flair: true,
        context_dropout: 0.3,
        seed: 7,
        ..Default::default()
    };
    let loader = DataLoader::new(records.clone(), cfg.clone()).unwrap();
    assert_eq!(loader.num_batches(), 5);
    let a = all_batches(&loader, 0);
    assert_eq!(a.len(), 5);
    assert_eq!(a[4].t1w.size(), [3, 1, 16, 24], "the last batch is partial without drop_last");
    let mut changed = 0;
    for b in &a {
        let flair = b.flair.as_ref().unwrap();
        assert!(b.t1w.equal(flair), "FLAIR and T1w of a pair must get the same augmentation");
        for (k, &row) in b.rows.iter().enumerate() {
            let original = load_png(&records[row].t1w).unwrap();
            if max_abs_diff(&b.t1w.get(k as i64), &original) > 1e-6 {
                changed += 1;
            }
            let v = b.t1w.get(k as i64);
            assert!(f64::try_from(v.min()).unwrap() >= 0.0 && f64::try_from(v.max()).unwrap() <= 1.0);
        }
    }
    assert!(changed >= 15, "augmentation should change most samples, changed {changed} of 23");
    let dropped: usize = a.iter().map(|b| b.drop_context.iter().filter(|&&d| d).count()).sum();
    assert!((1..23).contains(&dropped), "context dropout 0.3 dropped {dropped} of 23");

    // Same seed, same epoch: the same batches, whatever the thread timing. Another epoch: another order.
    let again = all_batches(&DataLoader::new(records.clone(), cfg.clone()).unwrap(), 0);
    for (x, y) in a.iter().zip(&again) {
        assert_eq!(x.rows, y.rows);
        assert!(x.t1w.equal(&y.t1w));
        assert_eq!(x.drop_context, y.drop_context);
    }
    let rows = |bs: &[medgen::data::loader::Batch]| bs.iter().flat_map(|b| b.rows.clone()).collect::<Vec<_>>();
    let e1 = all_batches(&loader, 1);
    assert_ne!(rows(&a), rows(&e1));
    let mut sorted = rows(&e1);
    sorted.sort();
    assert_eq!(sorted, (0..23).collect::<Vec<_>>(), "an epoch visits every row once");
    let other_seed = DataLoader::new(records.clone(), LoaderConfig { seed: 8, ..cfg.clone() }).unwrap();
    assert_ne!(rows(&a), rows(&all_batches(&other_seed, 0)));

    // No shuffle, no augmentation, drop_last: the list order, the images as read.
    let plain = LoaderConfig { batch_size: 4, shuffle: false, drop_last: true, ..Default::default() };
    let p = all_batches(&DataLoader::new(records.clone(), plain).unwrap(), 0);
    assert_eq!(p.len(), 5);
    assert_eq!(rows(&p), (0..20).collect::<Vec<_>>());
    assert!(p[0].t1w.get(1).equal(&load_png(&records[1].t1w).unwrap()));
    assert!(p[0].flair.is_none());
}

#[test]
fn bad_data_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let list = write_pairs(tmp.path(), 3);
    let records = read_list(&list).unwrap();
    // A colour PNG and a missing file: the epoch ends with an error naming the file.
    image::RgbImage::new(4, 4).save(&records[1].t1w).unwrap();
    let e = format!("{:#}", load_png(&records[1].t1w).unwrap_err());
    assert!(e.contains("s1_T1w.png") && e.contains("8-bit grayscale"), "{e}");
    std::fs::remove_file(records[2].flair.clone().unwrap()).unwrap();
    let cfg = LoaderConfig { batch_size: 3, shuffle: false, with_flair: true, ..Default::default() };
    let r: Vec<_> = DataLoader::new(records, cfg).unwrap().epoch(0).into_iter().collect();
    let e = format!("{:#}", r.last().unwrap().as_ref().unwrap_err());
    assert!(e.contains("s1_T1w.png") || e.contains("s2_FLAIR.png"), "{e}");

    let bad = tmp.path().join("bad.tsv");
    std::fs::write(&bad, "image\tlabel\na\tb\n").unwrap();
    let e = format!("{:#}", read_list(&bad).unwrap_err());
    assert!(e.contains("bad.tsv") && e.contains("t1w"), "{e}");
    let no_flair = tmp.path().join("t1.tsv");
    std::fs::write(&no_flair, "t1w\ns0_T1w.png\n").unwrap();
    let e = DataLoader::new(read_list(&no_flair).unwrap(), LoaderConfig { with_flair: true, ..Default::default() });
    assert!(format!("{:#}", e.err().unwrap()).contains("no flair"));
}

/// Data-parallel shards (torch's DistributedSampler layout): disjoint, together the whole epoch
/// (padded by repeating its start), each epoch reshuffled from the shared seed, and the ranks' k-th
/// batches together are the k-th batch of one process with world_size times the batch size.
#[test]
fn shards_partition_each_epoch_like_distributed_sampler() {
    let records: Vec<medgen::data::loader::PairRecord> =
        (0..11).map(|i| medgen::data::loader::PairRecord { t1w: format!("t{i}.png").into(), flair: None }).collect();
    let cfg = |batch: usize, shard| LoaderConfig { batch_size: batch, seed: 9, shard, ..Default::default() };
    for world in [2usize, 3, 4] {
        let whole = DataLoader::new(records.clone(), cfg(2 * world, None)).unwrap();
        for epoch in 0..3u64 {
            let order = whole.order(epoch);
            let shards: Vec<Vec<usize>> = (0..world)
                .map(|r| DataLoader::new(records.clone(), cfg(2, Some((r, world)))).unwrap().order(epoch))
                .collect();
            let per = 11usize.div_ceil(world);
            assert!(shards.iter().all(|s| s.len() == per), "world {world}");
            let mut seen: Vec<usize> = shards.concat();
            seen.sort();
            let mut expected: Vec<usize> = order.iter().chain(order.iter().take(per * world - 11)).copied().collect();
            expected.sort();
            assert_eq!(seen, expected, "world {world} epoch {epoch}: not a partition of the padded order");
            for k in 0..per.div_ceil(2) {
                let mut together: Vec<usize> =
                    shards.iter().flat_map(|s| s.chunks(2).nth(k).unwrap().to_vec()).collect();
                together.sort();
                let padded: Vec<usize> = (0..per * world).map(|i| order[i % 11]).collect();
                let mut one: Vec<usize> = padded.chunks(2 * world).nth(k).unwrap().to_vec();
                one.sort();
                assert_eq!(together, one, "world {world} epoch {epoch} batch {k}");
            }
        }
        let a = DataLoader::new(records.clone(), cfg(2, Some((0, world)))).unwrap();
        assert_ne!(a.order(0), a.order(1), "no reshuffle between epochs");
    }
    assert!(DataLoader::new(records, cfg(2, Some((2, 2)))).is_err());
}

/// A batch of mixed sizes is an error naming both files and both sizes, and it ends the epoch: the
/// batches before it arrive, nothing after it (never a shorter epoch that looks complete).
#[test]
fn a_batch_of_mixed_sizes_is_an_error_naming_both_files() {
    let tmp = tempfile::tempdir().unwrap();
    let list = write_pairs(tmp.path(), 6);
    let records = read_list(&list).unwrap();
    // Row 4 (second batch of 3): a 12x10 pair among 16x24 ones.
    let small = image::GrayImage::from_fn(10, 12, |x, y| image::Luma([(x + y) as u8]));
    small.save(&records[4].t1w).unwrap();
    small.save(records[4].flair.as_ref().unwrap()).unwrap();
    for with_flair in [false, true] {
        let cfg = LoaderConfig { batch_size: 3, shuffle: false, with_flair, ..Default::default() };
        let loader = DataLoader::new(records.clone(), cfg).unwrap();
        assert_eq!(loader.num_batches(), 2);
        let got: Vec<_> = loader.epoch(0).into_iter().collect();
        assert_eq!(got.len(), 2, "one good batch, then the error");
        assert!(got[0].is_ok());
        let e = format!("{:#}", got[1].as_ref().unwrap_err());
        assert!(e.contains("s3_T1w.png") && e.contains("16x24"), "{e}");
        assert!(e.contains("s4_T1w.png") && e.contains("12x10"), "{e}");
    }
    // The same size everywhere: exactly num_batches batches, then the end.
    let cfg = LoaderConfig { batch_size: 4, shuffle: false, ..Default::default() };
    let loader = DataLoader::new(read_list(&write_pairs(tmp.path(), 6)).unwrap(), cfg).unwrap();
    let got: Vec<_> = loader.epoch(0).into_iter().map(|b| b.unwrap()).collect();
    assert_eq!(got.len(), loader.num_batches());
    assert_eq!(got.iter().map(|b| b.rows.len()).collect::<Vec<_>>(), [4, 2]);
}

/// The size check the sampler, the metrics and the grids share.
#[test]
fn stack_images_names_both_files() {
    use medgen::io::png::stack_images;
    let a = Tensor::zeros([1, 4, 6], (tch::Kind::Float, tch::Device::Cpu));
    let b = Tensor::zeros([1, 4, 5], (tch::Kind::Float, tch::Device::Cpu));
    let (pa, pb) = (Path::new("a.png"), Path::new("b.png"));
    assert_eq!(stack_images(&[a.shallow_clone(), a.shallow_clone()], &[pa, pa]).unwrap().size(), [2, 1, 4, 6]);
    let e = format!("{:#}", stack_images(&[a, b], &[pa, pb]).unwrap_err());
    assert!(e.contains("a.png is 4x6") && e.contains("b.png is 4x5"), "{e}");
    assert!(stack_images(&[], &[]).is_err());
}
