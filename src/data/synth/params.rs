//! Every number the synthesis uses, in one serialisable struct: `synth.json` records it, and a
//! resumed run refuses to mix data sets made with different values.
use serde::{Deserialize, Serialize};

/// Relaxation times (ms) and proton density (relative to water) of one tissue at 3 T.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Relaxation {
    pub t1_ms: f64,
    pub t2_ms: f64,
    pub pd: f64,
}

const fn rel(t1_ms: f64, t2_ms: f64, pd: f64) -> Relaxation {
    Relaxation { t1_ms, t2_ms, pd }
}

/// Nominal tissue parameters. Brain values are typical 3 T literature values (Wansapura 1999,
/// Stanisz 2005, Lu 2005 for CSF T1); lesions are set relative to white matter
/// (`LesionParams`). The extra-cerebral tissues only need the right
/// ordering (bone silent, marrow and fat bright on both sequences): marrow and fat keep fat's T1
/// but get an effective PD (septa, partial volume) that puts fat at about 1.6 × white matter on
/// T1w, as on an MPRAGE; the spoiled gradient echo would make it 2.5 × with fat's own PD.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Tissues {
    pub wm: Relaxation,
    pub gm: Relaxation,
    pub csf: Relaxation,
    pub bone: Relaxation,
    pub marrow: Relaxation,
    pub fat: Relaxation,
    pub skin: Relaxation,
}

impl Default for Tissues {
    fn default() -> Self {
        Tissues {
            wm: rel(850.0, 70.0, 0.69),
            gm: rel(1350.0, 100.0, 0.80),
            csf: rel(4300.0, 1800.0, 1.0),
            bone: rel(300.0, 2.0, 0.08),
            marrow: rel(500.0, 70.0, 0.55),
            fat: rel(380.0, 110.0, 0.58),
            skin: rel(1000.0, 40.0, 0.75),
        }
    }
}

/// Per-subject jitter: every T1, T2 and PD is multiplied by `1 + N(0, sd)`, cut at `clip_sd`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TissueJitter {
    pub t1_rel_sd: f64,
    pub t2_rel_sd: f64,
    pub pd_rel_sd: f64,
    pub clip_sd: f64,
}

impl Default for TissueJitter {
    fn default() -> Self {
        TissueJitter { t1_rel_sd: 0.05, t2_rel_sd: 0.07, pd_rel_sd: 0.03, clip_sd: 2.5 }
    }
}

/// Fluid-attenuated inversion recovery, magnitude: `PD·|1 − 2e^(−TI/T1) + e^(−TR/T1)|·e^(−TE/T2)`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FlairSequence {
    pub tr_ms: f64,
    pub te_ms: f64,
    /// Derived: the inversion time that nulls the nominal CSF (`Sequences::default`).
    pub ti_ms: f64,
}

/// Spoiled gradient echo (FLASH):
/// `PD·sin α·(1 − E1)/(1 − cos α·E1)·e^(−TE/T2)`, `E1 = e^(−TR/T1)`, T2 standing in for T2*.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct T1wSequence {
    pub tr_ms: f64,
    pub te_ms: f64,
    pub flip_deg: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Sequences {
    pub flair: FlairSequence,
    pub t1w: T1wSequence,
}

/// The inversion time at which `1 − 2e^(−TI/T1) + e^(−TR/T1)` is zero.
pub fn null_inversion_time(t1_ms: f64, tr_ms: f64) -> f64 {
    t1_ms * (2.0 / (1.0 + (-tr_ms / t1_ms).exp())).ln()
}

impl Default for Sequences {
    fn default() -> Self {
        let tr_ms = 9000.0;
        let ti_ms = null_inversion_time(Tissues::default().csf.t1_ms, tr_ms);
        Sequences {
            flair: FlairSequence { tr_ms, te_ms: 85.0, ti_ms },
            t1w: T1wSequence { tr_ms: 20.0, te_ms: 4.5, flip_deg: 30.0 },
        }
    }
}

/// Output grid and where the anatomy sits in it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GridParams {
    /// Voxels along (left→right, posterior→anterior, inferior→superior), 1 mm isotropic.
    pub dims: [usize; 3],
    /// Voxel coordinates of the centre of the reference crop `[16:176, 16:240, 166:171]`.
    pub crop_centre_vox: [f64; 3],
    /// Template (MNI) point, mm, drawn onto the crop centre before the subject's pose: the
    /// bodies of the lateral ventricles, mid-way between the frontal and occipital poles.
    pub anchor_mm: [f64; 3],
}

impl Default for GridParams {
    fn default() -> Self {
        GridParams { dims: [176, 240, 256], crop_centre_vox: [95.5, 127.5, 168.0], anchor_mm: [0.0, -17.0, 17.0] }
    }
}

/// Head pose and size: a random rotation, translation and scaling between scanner and template.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PoseParams {
    /// Rotation SD about the left-right (pitch), anterior-posterior (roll), inferior-superior (yaw) axes.
    pub rotation_sd_deg: [f64; 3],
    pub translation_sd_mm: [f64; 3],
    /// Mean linear size of a subject's head relative to the template: MNI templates are larger
    /// than the average native brain.
    pub scale_mean: f64,
    pub scale_sd: f64,
    /// Extra per-axis scaling (head shape).
    pub anisotropy_sd: f64,
    pub clip_sd: f64,
}

impl Default for PoseParams {
    fn default() -> Self {
        PoseParams {
            rotation_sd_deg: [4.0, 2.0, 3.0],
            translation_sd_mm: [2.0, 3.0, 2.5],
            scale_mean: 0.93,
            scale_sd: 0.03,
            anisotropy_sd: 0.02,
            clip_sd: 2.5,
        }
    }
}

/// Non-linear deformation: a cubic B-spline displacement with random node values, plus a
/// radial expansion around the lateral ventricles (ventricle size is the largest anatomical
/// difference between adult brains at that level).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DeformParams {
    pub spacing_mm: f64,
    /// Per-node SD of each displacement component; the interpolated field's RMS is about a third.
    pub node_sd_mm: f64,
    pub ventricle_centre_mm: [f64; 3],
    pub ventricle_sigma_mm: [f64; 3],
    /// Expansion strength, uniform in this range (negative shrinks).
    pub ventricle_expansion: [f64; 2],
}

impl Default for DeformParams {
    fn default() -> Self {
        DeformParams {
            spacing_mm: 24.0,
            node_sd_mm: 8.0,
            ventricle_centre_mm: [0.0, -12.0, 14.0],
            ventricle_sigma_mm: [14.0, 28.0, 16.0],
            ventricle_expansion: [-0.15, 0.35],
        }
    }
}

/// White-matter lesions (hyperintensities): ellipsoids centred in deep and periventricular white
/// matter, whose tissue is the subject's white matter with T1, T2 and PD lengthened by
/// demyelination and oedema. Ratios to white matter, uniform per subject, keep every lesion
/// bright on FLAIR (1.5–2.2 × WM) and dark on T1w (0.7–0.9 × WM), as white-matter
/// hyperintensities are; independent jitter of absolute values would not.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LesionParams {
    pub t1_ratio: [f64; 2],
    pub t2_ratio: [f64; 2],
    pub pd_ratio: [f64; 2],
    /// Number per subject, uniform inclusive.
    pub count: [usize; 2],
    /// Semi-axis lengths, uniform.
    pub semi_axis_mm: [f64; 2],
    /// Centres are drawn among template voxels with at least this white-matter probability...
    pub site_min_wm: f64,
    /// ...and an MNI z in this range: where white-matter hyperintensities concentrate (around the
    /// lateral ventricles and in the centrum semiovale), which is also the slab the crop sees.
    pub site_z_mm: [f64; 2],
}

impl Default for LesionParams {
    fn default() -> Self {
        LesionParams {
            t1_ratio: [1.4, 1.7],
            t2_ratio: [2.2, 3.2],
            pd_ratio: [1.05, 1.15],
            count: [2, 10],
            semi_axis_mm: [2.0, 6.0],
            site_min_wm: 0.9,
            site_z_mm: [-5.0, 40.0],
        }
    }
}

/// Extra-cerebral layers outside the closed brain mask, innermost first, mm.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HeadParams {
    /// Closing radius of the brain mask before the layers are laid on it.
    pub closing_mm: f64,
    pub csf_mm: f64,
    pub inner_table_mm: f64,
    pub diploe_mm: f64,
    pub outer_table_mm: f64,
    pub fat_mm: f64,
    pub skin_mm: f64,
    /// Per-subject SD of each thickness (relative).
    pub thickness_rel_sd: f64,
    /// Node SD of the log of a smooth thickness factor (skull and scalp are not uniform).
    pub spatial_log_sd: f64,
}

impl HeadParams {
    pub fn total_mm(&self) -> f64 {
        self.csf_mm + self.inner_table_mm + self.diploe_mm + self.outer_table_mm + self.fat_mm + self.skin_mm
    }
}

impl Default for HeadParams {
    fn default() -> Self {
        HeadParams {
            closing_mm: 8.0,
            csf_mm: 2.0,
            inner_table_mm: 1.8,
            diploe_mm: 2.5,
            outer_table_mm: 1.8,
            fat_mm: 4.0,
            skin_mm: 2.0,
            thickness_rel_sd: 0.15,
            spatial_log_sd: 0.3,
        }
    }
}

/// Scanner effects: a smooth multiplicative bias field (the receive coil, shared by both
/// sequences, plus a smaller per-sequence part) and Rician noise.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ScannerParams {
    pub field_spacing_mm: f64,
    /// Node SD of the log bias; the interpolated field's SD is about a third.
    pub bias_shared_log_sd: f64,
    pub bias_own_log_sd: f64,
    /// Signal-to-noise ratio of nominal white matter, uniform in the range.
    pub flair_snr: [f64; 2],
    pub t1w_snr: [f64; 2],
    /// Stored int16 value of nominal white matter. Small on purpose: the noise SD is then 2–4
    /// units, so rounding adds under 2 % to the noise variance while the air background, most
    /// of the grid, stays cheap to compress; and the brightest tissue (fat) still spans more
    /// int16 steps than the 255 levels of the reference's PNGs.
    pub wm_level: f64,
}

impl Default for ScannerParams {
    fn default() -> Self {
        ScannerParams {
            field_spacing_mm: 64.0,
            bias_shared_log_sd: 0.3,
            bias_own_log_sd: 0.15,
            flair_snr: [30.0, 45.0],
            t1w_snr: [40.0, 60.0],
            wm_level: 100.0,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct SynthParams {
    pub grid: GridParams,
    pub tissues: Tissues,
    pub jitter: TissueJitter,
    pub sequences: Sequences,
    pub pose: PoseParams,
    pub deformation: DeformParams,
    pub lesions: LesionParams,
    pub head: HeadParams,
    pub scanner: ScannerParams,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inversion_time_nulls_csf() {
        let s = Sequences::default().flair;
        let t1 = Tissues::default().csf.t1_ms;
        let mz = 1.0 - 2.0 * (-s.ti_ms / t1).exp() + (-s.tr_ms / t1).exp();
        assert!(mz.abs() < 1e-12, "{mz}");
        assert!((2400.0..2600.0).contains(&s.ti_ms), "TI {}", s.ti_ms);
    }
}
