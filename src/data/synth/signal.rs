//! Tissue classes and the two signal equations.
//!
//! **Why the T1w image comes from a signal equation and not from the real T1 template.** Both
//! images of a pair are computed from the same deformed tissue fractions (GM, WM, CSF, lesion,
//! skull and scalp layers) with the same per-subject relaxation times: FLAIR by inversion
//! recovery, T1w by a spoiled gradient echo. The alternative, the deformed ICBM T1 with lesions
//! painted in, has real texture (an average of 152 brains, itself smooth), but its contrast is
//! fixed while the FLAIR's follows the jittered T1/T2/PD, its lesions would be painted with a
//! contrast no equation ties to their FLAIR brightness, it has no skull, and where the template's
//! intensities and its GM/WM segmentation disagree (partial volume at the cortex, deep nuclei) the
//! pair would disagree too. With both images from one tissue model the FLAIR→T1w mapping the
//! ControlNet learns is exactly the physics, lesions and per-subject contrast included, and every
//! difference between the two images is explained by the sequences, the bias field and the noise.
//! The price is texture: within a tissue class the T1w varies only through partial volume, bias
//! and noise.
//!
//! **Why a spoiled gradient echo for T1w.** UK Biobank's T1w is an MPRAGE, whose closed form
//! depends on readout details (echo train, flip angle, timing) that the reference does not give;
//! the simple inversion-recovery stand-in exaggerates grey/white contrast (WM/GM ≈ 2.1). A FLASH
//! with TR 20 ms, α 30° gives the MPRAGE-like ordering and ratios (WM/GM ≈ 1.35, CSF/WM ≈ 0.35)
//! from a textbook equation.
use super::params::{FlairSequence, Relaxation, T1wSequence};

/// Tissue classes, in the order of fraction and signal arrays; the value is the label code.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tissue {
    Air = 0,
    Wm = 1,
    Gm = 2,
    Csf = 3,
    Lesion = 4,
    Bone = 5,
    Marrow = 6,
    Fat = 7,
    Skin = 8,
}

pub const TISSUE_COUNT: usize = 9;

impl Tissue {
    pub const ALL: [Tissue; TISSUE_COUNT] = [
        Tissue::Air,
        Tissue::Wm,
        Tissue::Gm,
        Tissue::Csf,
        Tissue::Lesion,
        Tissue::Bone,
        Tissue::Marrow,
        Tissue::Fat,
        Tissue::Skin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tissue::Air => "air",
            Tissue::Wm => "white matter",
            Tissue::Gm => "grey matter",
            Tissue::Csf => "CSF",
            Tissue::Lesion => "lesion",
            Tissue::Bone => "bone",
            Tissue::Marrow => "marrow",
            Tissue::Fat => "fat",
            Tissue::Skin => "skin",
        }
    }
}

/// FLAIR magnitude: `PD·|1 − 2e^(−TI/T1) + e^(−TR/T1)|·e^(−TE/T2)` (TR ≫ TE, ideal inversion).
pub fn flair_signal(r: &Relaxation, s: &FlairSequence) -> f64 {
    let mz = 1.0 - 2.0 * (-s.ti_ms / r.t1_ms).exp() + (-s.tr_ms / r.t1_ms).exp();
    r.pd * mz.abs() * (-s.te_ms / r.t2_ms).exp()
}

/// Spoiled gradient echo: `PD·sin α·(1 − E1)/(1 − cos α·E1)·e^(−TE/T2)`, `E1 = e^(−TR/T1)`.
pub fn t1w_signal(r: &Relaxation, s: &T1wSequence) -> f64 {
    let e1 = (-s.tr_ms / r.t1_ms).exp();
    let a = s.flip_deg.to_radians();
    r.pd * a.sin() * (1.0 - e1) / (1.0 - a.cos() * e1) * (-s.te_ms / r.t2_ms).exp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synth::params::{LesionParams, Sequences, Tissues};

    #[test]
    fn nominal_contrasts() {
        let (t, s) = (Tissues::default(), Sequences::default());
        let f = |r: &Relaxation| flair_signal(r, &s.flair);
        let w = |r: &Relaxation| t1w_signal(r, &s.t1w);
        assert!(f(&t.gm) > 1.15 * f(&t.wm) && f(&t.wm) > 10.0 * f(&t.csf), "FLAIR GM > WM ≫ CSF");
        assert!(w(&t.wm) > 1.25 * w(&t.gm) && w(&t.gm) > 1.5 * w(&t.csf), "T1w WM > GM > CSF");
        assert!(w(&t.fat) > 1.4 * w(&t.wm) && w(&t.bone) < 0.2 * w(&t.csf), "fat bright, bone silent");
    }

    #[test]
    fn every_lesion_is_bright_on_flair_and_dark_on_t1w() {
        let (t, s, l) = (Tissues::default(), Sequences::default(), LesionParams::default());
        for t1 in l.t1_ratio {
            for t2 in l.t2_ratio {
                for pd in l.pd_ratio {
                    let les = Relaxation { t1_ms: t.wm.t1_ms * t1, t2_ms: t.wm.t2_ms * t2, pd: t.wm.pd * pd };
                    let f = flair_signal(&les, &s.flair) / flair_signal(&t.wm, &s.flair);
                    let w = t1w_signal(&les, &s.t1w) / t1w_signal(&t.wm, &s.t1w);
                    assert!(f > 1.45 && w < 0.9, "ratios {t1} {t2} {pd}: FLAIR {f:.2}, T1w {w:.2} × WM");
                }
            }
        }
    }
}
