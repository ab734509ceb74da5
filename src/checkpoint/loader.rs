//! Loading a [`StateDict`] into a model's `VarStore`.
//!
//! `VarStore::load` ignores extra keys, changes the model's dtype to the file's and can leave
//! a model half-loaded. Here every problem is found before anything is copied and reported
//! in one error, so a model is either fully loaded or untouched.
use super::state_dict::StateDict;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use tch::{nn::VarStore, Kind, Tensor};

/// What a load did; for the partial mode this is the whole answer.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub copied: Vec<String>,
    /// Model variables the checkpoint lacks, with the model's shape.
    pub missing: Vec<(String, Vec<i64>)>,
    /// Checkpoint entries the model has no variable for.
    pub unexpected: Vec<String>,
    /// Entries present in both whose shape or dtype class differs.
    pub mismatched: Vec<String>,
}

impl LoadReport {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }

    /// One line per problem, headed by counts.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} missing, {} unexpected, {} mismatched",
            self.missing.len(),
            self.unexpected.len(),
            self.mismatched.len()
        );
        for (k, shape) in &self.missing {
            s.push_str(&format!("\n  missing key {k} (model shape {shape:?})"));
        }
        for k in &self.unexpected {
            s.push_str(&format!("\n  unexpected key {k}"));
        }
        for m in &self.mismatched {
            s.push_str(&format!("\n  {m}"));
        }
        s
    }
}

#[derive(PartialEq, Eq, Debug)]
enum KindClass {
    Float,
    Int,
    Bool,
    Other,
}

fn class(k: Kind) -> KindClass {
    match k {
        Kind::Half | Kind::Float | Kind::Double | Kind::BFloat16 => KindClass::Float,
        Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64 => KindClass::Int,
        Kind::Bool => KindClass::Bool,
        _ => KindClass::Other,
    }
}

fn plan(vs: &VarStore, sd: &StateDict) -> (LoadReport, Vec<(Tensor, String)>) {
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let mut report = LoadReport::default();
    let mut copies = Vec::new();
    for (name, var) in &vars {
        match sd.get(name) {
            None => report.missing.push((name.clone(), var.size())),
            Some(src) => {
                if src.size() != var.size() {
                    report.mismatched.push(format!(
                        "shape mismatch for {name}: model expects {:?}, checkpoint has {:?}",
                        var.size(),
                        src.size()
                    ));
                } else if class(src.kind()) != class(var.kind()) || class(src.kind()) == KindClass::Other {
                    report.mismatched.push(format!(
                        "dtype mismatch for {name}: model expects {:?}, checkpoint has {:?}",
                        var.kind(),
                        src.kind()
                    ));
                } else {
                    copies.push((var.shallow_clone(), name.clone()));
                }
            }
        }
    }
    for name in sd.names() {
        if !vars.contains_key(name) {
            report.unexpected.push(name.clone());
        }
    }
    (report, copies)
}

fn copy_all(sd: &StateDict, copies: Vec<(Tensor, String)>, report: &mut LoadReport) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        for (mut var, name) in copies {
            let src = &sd.get(&name).expect("planned from sd");
            // Keep the model's dtype and device (a fp16 file loads into a fp32 model as fp32).
            var.f_copy_(&src.f_to_kind(var.kind())?.f_to_device(var.device())?)?;
            report.copied.push(name);
        }
        Ok(())
    })
}

/// Loads every variable of `vs` from `sd`. Any missing, unexpected or mismatched entry is an
/// error listing all of them (key, model shape, checkpoint shape); nothing is copied then.
/// Floating dtypes convert to the model's dtype; float vs integer is a mismatch.
pub fn load_strict(vs: &VarStore, sd: &StateDict) -> Result<LoadReport> {
    let (mut report, copies) = plan(vs, sd);
    if !report.is_clean() {
        bail!("checkpoint does not match the model: {}", report.describe());
    }
    copy_all(sd, copies, &mut report)?;
    Ok(report)
}

/// What `load_partial` would do, without copying anything.
pub fn plan_partial(vs: &VarStore, sd: &StateDict) -> LoadReport {
    let (mut report, copies) = plan(vs, sd);
    report.copied = copies.into_iter().map(|(_, name)| name).collect();
    report
}

/// Copies every entry whose name and shape match, leaves the other variables as they are,
/// and reports what was copied and what was not (MONAI's `strict=False`, made visible).
pub fn load_partial(vs: &VarStore, sd: &StateDict) -> Result<LoadReport> {
    let (mut report, copies) = plan(vs, sd);
    copy_all(sd, copies, &mut report)?;
    Ok(report)
}
