//! Training-loss parity: the PatchDiscriminator (MONAI 1.6.1 and monai-generative 0.2.3: init, eval and train
//! forward, gradients, BatchNorm buffers), PatchAdversarialLoss (every criterion, reduction, target and list form,
//! values and input gradients) and the reference KL term, on the fixtures of `tests/gen_loss_fixtures.py`
//! (state dicts read by medgen's own torch.save reader).
mod common;

use common::{fixtures, max_abs, max_abs_diff};
use medgen::checkpoint::{load_model, Generation, StateDict};
use medgen::config::{model_params, read_json};
use medgen::losses::adversarial::PatchAdversarialLoss;
use medgen::losses::kl::kl_loss;
use medgen::nets::patch_discriminator::{PatchDiscriminator, PatchDiscriminatorConfig};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tch::{nn::VarStore, Device, Tensor};

/// Both sides run one thread on the same libtorch, so every comparison is expected bit-exact; the tolerance
/// (relative to the largest reference magnitude) only keeps the table readable if a kernel ever changes.
const REL_TOL: f64 = 1e-6;

#[derive(Default)]
struct Table {
    rows: Vec<String>,
    failures: Vec<String>,
    worst: f64,
    exact: usize,
}

impl Table {
    fn check(&mut self, case: &str, what: &str, got: &Tensor, want: &Tensor) {
        if got.size() != want.size() {
            self.failures.push(format!("{case} {what}: shape {:?}, expected {:?}", got.size(), want.size()));
            return;
        }
        let err = max_abs_diff(got, want);
        let scale = max_abs(want);
        // An all-zero reference (zero-initialised biases) is compared absolutely.
        let rel = if scale == 0.0 { err } else { err / scale };
        self.worst = self.worst.max(rel);
        self.exact += usize::from(err == 0.0);
        self.rows.push(format!("{case:40} {what:36} abs {err:.3e}  rel {rel:.3e}  (max |ref| {scale:.3e})"));
        if rel > REL_TOL || rel.is_nan() {
            self.failures.push(format!("{case} {what}: relative error {rel:e} > {REL_TOL:e} (abs {err:e})"));
        }
    }

    fn finish(self, title: &str) {
        println!("{title}\n{}", self.rows.join("\n"));
        let n = self.rows.len();
        println!("{title}: {n} comparisons, {} bit-exact, worst relative error {:.3e}", self.exact, self.worst);
        assert!(self.failures.is_empty(), "{title} parity failures:\n{}", self.failures.join("\n"));
    }
}

fn load_io(path: &Path) -> StateDict {
    StateDict::load(path, None).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

fn get<'a>(io: &'a StateDict, case: &str, key: &str) -> &'a Tensor {
    io.get(key).unwrap_or_else(|| panic!("{case}: fixture lacks {key}"))
}

/// Every running_mean/running_var/num_batches_tracked of the store against the fixture's `prefix.*` copies.
fn check_buffers(t: &mut Table, case: &str, vs: &VarStore, io: &StateDict, prefix: &str) {
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().filter(|k| k.contains(".running_") || k.ends_with("tracked")).collect();
    names.sort();
    let want: BTreeSet<&str> =
        io.names().iter().filter_map(|n| n.strip_prefix(&format!("{prefix}."))).collect::<BTreeSet<_>>();
    let have: BTreeSet<&str> = names.iter().map(|s| s.as_str()).collect();
    assert_eq!(have, want, "{case}: BatchNorm buffers of the model vs the fixture");
    for n in names {
        t.check(case, &format!("{prefix}.{n}"), &vars[n], get(io, case, &format!("{prefix}.{n}")));
    }
}

fn check_outputs(t: &mut Table, case: &str, what: &str, outs: &[Tensor], io: &StateDict, n: usize) {
    assert_eq!(outs.len(), n, "{case}: number of {what} outputs");
    for (i, o) in outs.iter().enumerate() {
        t.check(case, &format!("{what}.{i}"), o, get(io, case, &format!("{what}.{i}")));
    }
}

#[test]
fn patch_discriminator_matches_monai_and_generative() {
    tch::set_num_threads(1);
    let root = fixtures().join("losses/discriminator");
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(root.join("manifest.json")).unwrap()).unwrap();
    let cases = manifest.as_array().unwrap();
    assert!(cases.len() >= 29, "expected the full fixture set, found {} cases", cases.len());
    let mut t = Table::default();
    for c in cases {
        let case = c["dir"].as_str().unwrap();
        let dir = root.join(case);
        let lib = c["lib"].as_str().unwrap();
        let (seed, noise_seed) = (c["seed"].as_i64().unwrap(), c["noise_seed"].as_i64().unwrap());
        let n_out = c["outputs"].as_u64().unwrap() as usize;
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let cfg: PatchDiscriminatorConfig =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{case}: config {text}: {e}"));
        cfg.validate().unwrap();

        // Init: same seed, same draws in the same order as the library's constructor.
        let init = if lib == "generative" { Generation::Generative } else { Generation::Monai };
        tch::manual_seed(seed);
        let vs = VarStore::new(Device::Cpu);
        let d = PatchDiscriminator::new(&vs.root(), &cfg).unwrap();
        if init == Generation::Monai {
            tch::manual_seed(seed);
            d.reset_parameters(init).unwrap();
        }
        let init_sd = load_io(&dir.join("init_state_dict.pt"));
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let names: BTreeSet<&String> = vars.keys().collect();
        assert_eq!(names, init_sd.names().iter().collect::<BTreeSet<_>>(), "{case}: state-dict keys");
        for (k, v) in &vars {
            t.check(case, &format!("init {k}"), v, get(&init_sd, case, k));
        }

        // Strict load of the perturbed state dict, BatchNorm buffers included.
        let sd = load_io(&dir.join("state_dict.pt"));
        let n_keys = sd.len();
        let loaded = load_model(sd, Device::Cpu, |p, _| PatchDiscriminator::new(p, &cfg)).unwrap();
        assert_eq!(loaded.report.copied.len(), n_keys, "{case}: every entry loaded");
        let (d, vs) = (&loaded.model, &loaded.vs);
        let io = load_io(&dir.join("io.safetensors"));
        let x = get(&io, case, "x");

        let eval = tch::no_grad(|| d.forward_t(x, false));
        check_outputs(&mut t, case, "eval", &eval, &io, n_out);

        // Train mode with autograd: batch statistics, running-stat update, dropout from the seeded generator.
        let xg = x.copy().set_requires_grad(true);
        tch::manual_seed(noise_seed);
        let train = d.forward_t(&xg, true);
        (train.last().unwrap() * get(&io, case, "g")).sum(None).backward();
        check_outputs(&mut t, case, "train", &train, &io, n_out);
        t.check(case, "grad.x", &xg.grad(), get(&io, case, "grad.x"));
        let mut grads = 0;
        for (k, v) in vs.variables().into_iter().collect::<BTreeMap<_, _>>() {
            if v.requires_grad() {
                t.check(case, &format!("grad.{k}"), &v.grad(), get(&io, case, &format!("grad.{k}")));
                grads += 1;
            }
        }
        let want_grads = io.names().iter().filter(|n| n.starts_with("grad.") && *n != "grad.x").count();
        assert_eq!(grads, want_grads, "{case}: one gradient per parameter");
        check_buffers(&mut t, case, vs, &io, "after1");

        tch::manual_seed(noise_seed + 1);
        let train2 = tch::no_grad(|| d.forward_t(get(&io, case, "x2"), true));
        check_outputs(&mut t, case, "train2", &train2, &io, n_out);
        check_buffers(&mut t, case, vs, &io, "after2");
        let eval2 = tch::no_grad(|| d.forward_t(x, false));
        check_outputs(&mut t, case, "eval2", &eval2, &io, n_out);

        // The trained state (int64 num_batches_tracked included) round-trips through a safetensors file.
        let mut out = StateDict::new();
        for (k, v) in vs.variables() {
            out.insert(k, v.detach());
        }
        let file = tempfile::Builder::new().suffix(".safetensors").tempfile().unwrap();
        out.save_safetensors(file.path(), &Default::default()).unwrap();
        let again = load_model(load_io(file.path()), Device::Cpu, |p, _| PatchDiscriminator::new(p, &cfg)).unwrap();
        let eval3 = tch::no_grad(|| again.model.forward_t(x, false));
        check_outputs(&mut t, &format!("{case} (saved)"), "eval2", &eval3, &io, n_out);
        check_buffers(&mut t, &format!("{case} (saved)"), &again.vs, &io, "after2");
    }
    t.finish("PatchDiscriminator");
}

#[test]
fn reference_discriminator_config_parses() {
    let root = read_json(&Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/aekl_v0.json")).unwrap();
    let cfg: PatchDiscriminatorConfig = serde_json::from_value(model_params(&root, "discriminator")).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg, PatchDiscriminatorConfig::reference());
    // The reference's 160x224 slices give (B, 1, 18, 26) logits.
    let vs = VarStore::new(Device::Cpu);
    let d = PatchDiscriminator::new(&vs.root(), &cfg).unwrap();
    let x = Tensor::zeros([1, 1, 160, 224], (tch::Kind::Float, Device::Cpu));
    let sizes: Vec<Vec<i64>> = tch::no_grad(|| d.forward_t(&x, false)).iter().map(|t| t.size()).collect();
    assert_eq!(
        sizes,
        vec![
            vec![1, 128, 80, 112],
            vec![1, 256, 40, 56],
            vec![1, 512, 20, 28],
            vec![1, 1024, 19, 27],
            vec![1, 1, 18, 26]
        ]
    );
}

#[test]
fn adversarial_loss_matches_monai_and_generative() {
    tch::set_num_threads(1);
    let root = fixtures().join("losses");
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(root.join("adversarial.json")).unwrap()).unwrap();
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 192, "2 libraries x 4 criteria x 3 reductions x 2 targets x 2 modes x 2 input forms");
    let io = load_io(&root.join("adversarial.safetensors"));
    let mut t = Table::default();
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let loss: PatchAdversarialLoss = serde_json::from_value(serde_json::json!({
            "criterion": c["criterion"],
            "reduction": c["reduction"],
            "no_activation_leastsq": c["no_activation_leastsq"],
        }))
        .unwrap();
        let (real, for_disc) = (c["target_is_real"].as_bool().unwrap(), c["for_discriminator"].as_bool().unwrap());
        let kind = c["inputs"].as_str().unwrap();
        let n_in = if kind == "list" { 2 } else { 1 };
        let xs: Vec<Tensor> =
            (0..n_in).map(|i| get(&io, name, &format!("in.{kind}.{i}")).copy().set_requires_grad(true)).collect();
        let reduced = c["reduction"] != "none";
        assert_eq!(c["list_returned"].as_bool().unwrap(), !reduced, "{name}: MONAI returns a list exactly for none");
        let values = match (kind, reduced) {
            ("single", _) => vec![loss.forward(&xs[0], real, for_disc)],
            (_, true) => vec![loss.forward_list(&xs, real, for_disc).unwrap()],
            (_, false) => loss.losses(&xs, real, for_disc),
        };
        assert_eq!(values.len(), c["values"].as_u64().unwrap() as usize, "{name}: number of losses");
        let total = if reduced {
            values[0].shallow_clone()
        } else {
            let weighted =
                values.iter().enumerate().map(|(i, v)| (v * get(&io, name, &format!("{name}/w.{i}"))).sum(None));
            weighted.reduce(|a, b| a + b).unwrap()
        };
        total.backward();
        for (i, v) in values.iter().enumerate() {
            t.check(name, &format!("value.{i}"), v, get(&io, name, &format!("{name}/value.{i}")));
        }
        for (i, x) in xs.iter().enumerate() {
            t.check(name, &format!("grad.{i}"), &x.grad(), get(&io, name, &format!("{name}/grad.{i}")));
        }
    }
    t.finish("PatchAdversarialLoss");
}

#[test]
fn kl_loss_matches_reference_training() {
    tch::set_num_threads(1);
    let root = fixtures().join("losses");
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(root.join("kl.json")).unwrap()).unwrap();
    let io = load_io(&root.join("kl.safetensors"));
    let mut t = Table::default();
    for c in cases.as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let mu = get(&io, name, &format!("{name}/z_mu")).copy().set_requires_grad(true);
        let sigma = get(&io, name, &format!("{name}/z_sigma")).copy().set_requires_grad(true);
        let kl = kl_loss(&mu, &sigma);
        kl.backward();
        t.check(name, "value", &kl, get(&io, name, &format!("{name}/value")));
        t.check(name, "grad.z_mu", &mu.grad(), get(&io, name, &format!("{name}/grad.z_mu")));
        t.check(name, "grad.z_sigma", &sigma.grad(), get(&io, name, &format!("{name}/grad.z_sigma")));
    }
    t.finish("KL");
}
