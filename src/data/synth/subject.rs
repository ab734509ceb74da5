//! One synthetic subject: its random draws (pose, deformation, lesions, tissue parameters, head
//! layers, bias, noise) and the voxel loop that turns the anatomy into a FLAIR/T1w pair.
use super::anatomy::{Anatomy, SHELL_LIMIT_MM};
use super::field::Spline;
use super::params::{LesionParams, Relaxation, SynthParams, Tissues};
use super::signal::{flair_signal, t1w_signal, Tissue, TISSUE_COUNT};
use ndarray::{Array3, ShapeBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde::Serialize;

/// Label of a voxel no tissue fills to `PURE_FRACTION`.
pub const MIXED: u8 = 255;
pub const PURE_FRACTION: f32 = 0.8;

/// Independent random streams, so that changing one part of the model (say the lesion count)
/// leaves the others (the deformation, the noise) as they were.
#[derive(Clone, Copy)]
enum Stream {
    Pose = 1,
    Deform = 2,
    Scanner = 3,
    Tissue = 4,
    Lesion = 5,
    Noise = 6,
}

/// ChaCha8 keyed by (seed, subject, stream, index): a subject depends on nothing but its number
/// and the seed, whatever the subject count, thread count or order.
fn rng(seed: u64, subject: u64, stream: Stream, index: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (n, v) in [seed, subject, stream as u64, index].iter().enumerate() {
        key[n * 8..n * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// `N(0, sd)` cut at `clip` SDs by rejection.
fn clipped_normal(rng: &mut impl Rng, sd: f64, clip: f64) -> f64 {
    loop {
        let z: f64 = StandardNormal.sample(rng);
        if z.abs() <= clip {
            return z * sd;
        }
    }
}

type Mat3 = [[f32; 3]; 3];

fn mul(a: &Mat3, b: &Mat3) -> Mat3 {
    std::array::from_fn(|r| std::array::from_fn(|c| (0..3).map(|k| a[r][k] * b[k][c]).sum()))
}

fn mat_vec(m: &Mat3, v: [f32; 3]) -> [f32; 3] {
    std::array::from_fn(|r| m[r][0] * v[0] + m[r][1] * v[1] + m[r][2] * v[2])
}

fn transpose(m: &Mat3) -> Mat3 {
    std::array::from_fn(|r| std::array::from_fn(|c| m[c][r]))
}

/// Rotation by `angles` (radians) about x, then y, then z.
fn rotation(angles: [f64; 3]) -> Mat3 {
    let [x, y, z] = angles.map(|a| a as f32);
    let rx = [[1.0, 0.0, 0.0], [0.0, x.cos(), -x.sin()], [0.0, x.sin(), x.cos()]];
    let ry = [[y.cos(), 0.0, y.sin()], [0.0, 1.0, 0.0], [-y.sin(), 0.0, y.cos()]];
    let rz = [[z.cos(), -z.sin(), 0.0], [z.sin(), z.cos(), 0.0], [0.0, 0.0, 1.0]];
    mul(&rz, &mul(&ry, &rx))
}

/// A uniformly random rotation (from a random unit quaternion).
fn random_rotation(rng: &mut impl Rng) -> Mat3 {
    let mut q: [f32; 4] = std::array::from_fn(|_| StandardNormal.sample(rng));
    let n = q.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
    q.iter_mut().for_each(|v| *v /= n);
    let [w, x, y, z] = q;
    [
        [1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - w * z), 2.0 * (x * z + w * y)],
        [2.0 * (x * y + w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - w * x)],
        [2.0 * (x * z - w * y), 2.0 * (y * z + w * x), 1.0 - 2.0 * (x * x + y * y)],
    ]
}

/// An ellipsoid in template mm: `|to_unit · (q − centre)| < 1` inside.
#[derive(Clone, Debug)]
struct Lesion {
    centre: [f32; 3],
    to_unit: Mat3,
    reach_mm: f32,
    mean_semi_axis_mm: f32,
}

impl Lesion {
    /// Fraction of the voxel at `q` inside, with a 1 mm linear edge (partial volume).
    #[inline]
    fn membership(&self, q: [f32; 3]) -> f32 {
        let d = [q[0] - self.centre[0], q[1] - self.centre[1], q[2] - self.centre[2]];
        if d.iter().any(|v| v.abs() > self.reach_mm) {
            return 0.0;
        }
        let u = mat_vec(&self.to_unit, d);
        let rho = (u[0] * u[0] + u[1] * u[1] + u[2] * u[2]).sqrt();
        (0.5 - (rho - 1.0) * self.mean_semi_axis_mm).clamp(0.0, 1.0)
    }
}

/// What was drawn for a subject, in words a reader of the data set can use.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct SubjectSummary {
    pub subject: usize,
    pub scale: [f64; 3],
    pub rotation_deg: [f64; 3],
    pub translation_mm: [f64; 3],
    pub ventricle_expansion: f64,
    pub lesions: usize,
    pub flair_snr: f64,
    pub t1w_snr: f64,
}

/// Everything drawn for one subject; `synthesize` needs nothing else but the anatomy.
pub struct Subject {
    number: usize,
    seed: u64,
    dims: [usize; 3],
    crop_centre: [f32; 3],
    anchor: [f32; 3],
    /// Scanner mm (about the crop centre, after the displacement) → template mm, about the anchor.
    to_template: Mat3,
    translation: [f32; 3],
    displacement: Spline<3>,
    /// Channels: log bias FLAIR, log bias T1w, log head-layer thickness factor.
    scanner: Spline<3>,
    ventricle_centre: [f32; 3],
    ventricle_inv_sigma: [f32; 3],
    ventricle_alpha: f32,
    lesions: Vec<Lesion>,
    /// Layer outer boundaries, mm from the closed brain mask: CSF, inner table, diploë, outer table, fat, skin.
    layer_bounds: [f32; 6],
    /// Stored-unit signal of each tissue.
    flair: [f32; TISSUE_COUNT],
    t1w: [f32; TISSUE_COUNT],
    flair_sigma: f32,
    t1w_sigma: f32,
    pub summary: SubjectSummary,
}

/// Slice `k` of the FLAIR, the T1w and the labels (empty without labels).
type SliceJob<'a> = (usize, ((&'a mut [i16], &'a mut [i16]), &'a mut [u8]));

/// One subject's pair, indexed `[i, j, k]` like `read_volume`, and optionally its tissue labels
/// (`Tissue as u8` where a tissue fills at least `PURE_FRACTION` of the voxel, else `MIXED`).
pub struct SubjectVolumes {
    pub flair: Array3<i16>,
    pub t1w: Array3<i16>,
    pub labels: Option<Array3<u8>>,
    pub summary: SubjectSummary,
}

fn jittered(r: &Relaxation, rng: &mut impl Rng, sd: [f64; 3], clip: f64) -> Relaxation {
    Relaxation {
        t1_ms: r.t1_ms * (1.0 + clipped_normal(rng, sd[0], clip)),
        t2_ms: r.t2_ms * (1.0 + clipped_normal(rng, sd[1], clip)),
        pd: r.pd * (1.0 + clipped_normal(rng, sd[2], clip)),
    }
}

/// Nominal parameters by tissue index; air's and the lesion's are placeholders (air has no
/// signal, the lesion is derived from the subject's white matter).
fn by_tissue(t: &Tissues) -> [Relaxation; TISSUE_COUNT] {
    let none = Relaxation { t1_ms: 1.0, t2_ms: 1.0, pd: 0.0 };
    [none, t.wm, t.gm, t.csf, none, t.bone, t.marrow, t.fat, t.skin]
}

/// Stored-unit FLAIR and T1w signal of every tissue, from jittered relaxation parameters.
fn tissue_signals(p: &SynthParams, r: &mut impl Rng) -> ([f32; TISSUE_COUNT], [f32; TISSUE_COUNT]) {
    let (j, sc) = (&p.jitter, &p.scanner);
    let nominal = by_tissue(&p.tissues);
    let mut relaxation = nominal;
    for t in Tissue::ALL.into_iter().filter(|&t| t != Tissue::Air && t != Tissue::Lesion) {
        let sd = [j.t1_rel_sd, j.t2_rel_sd, j.pd_rel_sd];
        relaxation[t as usize] = jittered(&nominal[t as usize], r, sd, j.clip_sd);
    }
    let (wm, lp) = (relaxation[Tissue::Wm as usize], &p.lesions);
    relaxation[Tissue::Lesion as usize] = Relaxation {
        t1_ms: wm.t1_ms * r.random_range(lp.t1_ratio[0]..=lp.t1_ratio[1]),
        t2_ms: wm.t2_ms * r.random_range(lp.t2_ratio[0]..=lp.t2_ratio[1]),
        pd: wm.pd * r.random_range(lp.pd_ratio[0]..=lp.pd_ratio[1]),
    };
    // Fixed gains (nominal white matter at `wm_level`): the jitter shows in the stored values.
    let flair_gain = sc.wm_level / flair_signal(&p.tissues.wm, &p.sequences.flair);
    let t1w_gain = sc.wm_level / t1w_signal(&p.tissues.wm, &p.sequences.t1w);
    let mut flair = [0f32; TISSUE_COUNT];
    let mut t1w = [0f32; TISSUE_COUNT];
    for t in Tissue::ALL.into_iter().skip(1) {
        let rel = &relaxation[t as usize];
        flair[t as usize] = (flair_gain * flair_signal(rel, &p.sequences.flair)) as f32;
        t1w[t as usize] = (t1w_gain * t1w_signal(rel, &p.sequences.t1w)) as f32;
    }
    (flair, t1w)
}

/// Outer boundaries of the head layers (CSF, inner table, diploë, outer table, fat, skin), mm.
fn layer_bounds(p: &SynthParams, r: &mut impl Rng) -> [f32; 6] {
    let h = &p.head;
    let nominal = [h.csf_mm, h.inner_table_mm, h.diploe_mm, h.outer_table_mm, h.fat_mm, h.skin_mm];
    let mut total = 0.0;
    nominal.map(|t| {
        total += t * (1.0 + clipped_normal(r, h.thickness_rel_sd, p.jitter.clip_sd));
        total as f32
    })
}

fn draw_lesions(anatomy: &Anatomy, lp: &LesionParams, r: &mut impl Rng) -> Vec<Lesion> {
    let count = r.random_range(lp.count[0]..=lp.count[1]);
    let sites = anatomy.lesion_sites();
    (0..count)
        .map(|_| {
            let site = sites[r.random_range(0..sites.len())];
            let centre = site.map(|c| c + r.random_range(-0.5f32..0.5));
            let semi: [f32; 3] =
                std::array::from_fn(|_| r.random_range(lp.semi_axis_mm[0]..=lp.semi_axis_mm[1]) as f32);
            let axes = random_rotation(r);
            // Rows of `to_unit` are the ellipsoid's axes divided by their lengths.
            let to_unit = std::array::from_fn(|row| axes[row].map(|v| v / semi[row]));
            let reach_mm = semi.iter().fold(0f32, |a, &b| a.max(b)) + 1.0;
            Lesion { centre, to_unit, reach_mm, mean_semi_axis_mm: semi.iter().sum::<f32>() / 3.0 }
        })
        .collect()
}

impl Subject {
    /// Draws subject `number` (1-based) of the data set made with `seed`.
    pub fn draw(anatomy: &Anatomy, p: &SynthParams, seed: u64, number: usize) -> Subject {
        let n = number as u64;
        let dims = p.grid.dims;

        let mut r = rng(seed, n, Stream::Pose, 0);
        let pose = &p.pose;
        let rot_deg: [f64; 3] =
            std::array::from_fn(|ax| clipped_normal(&mut r, pose.rotation_sd_deg[ax], pose.clip_sd));
        let translation: [f64; 3] =
            std::array::from_fn(|ax| clipped_normal(&mut r, pose.translation_sd_mm[ax], pose.clip_sd));
        let global = pose.scale_mean * (1.0 + clipped_normal(&mut r, pose.scale_sd, pose.clip_sd));
        let scale: [f64; 3] =
            std::array::from_fn(|_| global * (1.0 + clipped_normal(&mut r, pose.anisotropy_sd, pose.clip_sd)));
        let alpha = r.random_range(p.deformation.ventricle_expansion[0]..=p.deformation.ventricle_expansion[1]);
        // The head is the template scaled then rotated; a scanner point is mapped back through the inverse.
        let rot = rotation(rot_deg.map(f64::to_radians));
        let inv_scale: Mat3 =
            std::array::from_fn(|r| std::array::from_fn(|c| if r == c { 1.0 / scale[r] as f32 } else { 0.0 }));
        let to_template = mul(&inv_scale, &transpose(&rot));

        let mut r = rng(seed, n, Stream::Deform, 0);
        let d = &p.deformation;
        let displacement = Spline::random(&mut r, dims, d.spacing_mm as f32, [d.node_sd_mm as f32; 3]);

        let mut r = rng(seed, n, Stream::Scanner, 0);
        let sc = &p.scanner;
        let spacing = sc.field_spacing_mm as f32;
        let (own, shared) = (sc.bias_own_log_sd as f32, sc.bias_shared_log_sd as f32);
        let mut scanner = Spline::random(&mut r, dims, spacing, [own, own, p.head.spatial_log_sd as f32]);
        let receive = Spline::random(&mut r, dims, spacing, [shared]);
        scanner.add_channel(0, &receive, 0);
        scanner.add_channel(1, &receive, 0);
        let flair_snr = r.random_range(sc.flair_snr[0]..=sc.flair_snr[1]);
        let t1w_snr = r.random_range(sc.t1w_snr[0]..=sc.t1w_snr[1]);

        let mut r = rng(seed, n, Stream::Tissue, 0);
        let (flair, t1w) = tissue_signals(p, &mut r);
        let layer_bounds = layer_bounds(p, &mut r);
        let mut r = rng(seed, n, Stream::Lesion, 0);
        let lesions = draw_lesions(anatomy, &p.lesions, &mut r);

        let summary = SubjectSummary {
            subject: number,
            scale,
            rotation_deg: rot_deg,
            translation_mm: translation,
            ventricle_expansion: alpha,
            lesions: lesions.len(),
            flair_snr,
            t1w_snr,
        };
        Subject {
            number,
            seed,
            dims,
            crop_centre: p.grid.crop_centre_vox.map(|v| v as f32),
            anchor: p.grid.anchor_mm.map(|v| v as f32),
            to_template,
            translation: translation.map(|v| v as f32),
            displacement,
            scanner,
            ventricle_centre: d.ventricle_centre_mm.map(|v| v as f32),
            ventricle_inv_sigma: d.ventricle_sigma_mm.map(|v| 1.0 / v as f32),
            ventricle_alpha: alpha as f32,
            lesions,
            layer_bounds,
            flair,
            t1w,
            flair_sigma: (sc.wm_level / flair_snr) as f32,
            t1w_sigma: (sc.wm_level / t1w_snr) as f32,
            summary,
        }
    }

    /// Renders the pair; slices in parallel when `parallel` (one subject at a time), else serially
    /// (when the caller already runs one subject per thread).
    pub fn synthesize(&self, anatomy: &Anatomy, labels: bool, parallel: bool) -> SubjectVolumes {
        let [nx, ny, nz] = self.dims;
        let plane = nx * ny;
        let mut flair = vec![0i16; plane * nz];
        let mut t1w = vec![0i16; plane * nz];
        let mut lab = if labels { vec![0u8; plane * nz] } else { Vec::new() };
        let lab_chunks: Vec<&mut [u8]> =
            if labels { lab.chunks_mut(plane).collect() } else { (0..nz).map(|_| &mut [][..]).collect() };
        let work = flair.chunks_mut(plane).zip(t1w.chunks_mut(plane)).zip(lab_chunks).enumerate();
        let render =
            |(k, ((f, t), l)): SliceJob| self.render_slice(anatomy, k, f, t, if labels { Some(l) } else { None });
        if parallel {
            work.collect::<Vec<_>>().into_par_iter().for_each(render);
        } else {
            work.for_each(render);
        }
        let shape = (nx, ny, nz).f();
        SubjectVolumes {
            flair: Array3::from_shape_vec(shape, flair).expect("sized above"),
            t1w: Array3::from_shape_vec(shape, t1w).expect("sized above"),
            labels: labels.then(|| Array3::from_shape_vec(shape, lab).expect("sized above")),
            summary: self.summary.clone(),
        }
    }

    /// Template mm of output voxel `(i, j, k)` given the slice's displacement there.
    #[inline]
    fn template_point(&self, i: usize, j: usize, k: usize, u: [f32; 3]) -> [f32; 3] {
        let p = [
            i as f32 - self.crop_centre[0] + u[0] - self.translation[0],
            j as f32 - self.crop_centre[1] + u[1] - self.translation[1],
            k as f32 - self.crop_centre[2] + u[2] - self.translation[2],
        ];
        let m = mat_vec(&self.to_template, p);
        let mut q = [m[0] + self.anchor[0], m[1] + self.anchor[1], m[2] + self.anchor[2]];
        // Pulling template points towards the ventricles' centre enlarges them in the output.
        let d: [f32; 3] = std::array::from_fn(|ax| q[ax] - self.ventricle_centre[ax]);
        let e2: f32 = (0..3).map(|ax| (d[ax] * self.ventricle_inv_sigma[ax]).powi(2)).sum();
        if e2 < 25.0 {
            let pull = self.ventricle_alpha * (-0.5 * e2).exp();
            for ax in 0..3 {
                q[ax] -= pull * d[ax];
            }
        }
        q
    }

    /// Tissue fractions at template point `q`; `thickness` scales the head layers.
    #[inline]
    fn fractions(&self, anatomy: &Anatomy, q: [f32; 3], thickness: f32) -> Option<[f32; TISSUE_COUNT]> {
        let m = anatomy.mm_to_vox();
        let v: [f32; 3] = std::array::from_fn(|r| m[r][0] * q[0] + m[r][1] * q[1] + m[r][2] * q[2] + m[r][3]);
        let s = anatomy.sample(v)?;
        let mut f = [0f32; TISSUE_COUNT];
        let lesion = self.lesions.iter().fold(0f32, |a, l| a.max(l.membership(q)));
        f[Tissue::Lesion as usize] = s.wm * lesion;
        f[Tissue::Wm as usize] = s.wm - f[Tissue::Lesion as usize];
        f[Tissue::Gm as usize] = s.gm;
        f[Tissue::Csf as usize] = s.csf;
        let outside = (1.0 - s.gm - s.wm - s.csf).max(0.0);
        if outside > 0.0 {
            // Each layer gets the part of a 1 mm interval around the voxel's distance that falls in it.
            let scale = thickness.min(SHELL_LIMIT_MM / self.layer_bounds[5]);
            let below = |b: f32| (b * scale - s.distance_mm + 0.5).clamp(0.0, 1.0);
            let layers = [Tissue::Csf, Tissue::Bone, Tissue::Marrow, Tissue::Bone, Tissue::Fat, Tissue::Skin];
            let mut previous = 0.0;
            for (t, b) in layers.iter().zip(self.layer_bounds) {
                let c = below(b);
                f[*t as usize] += outside * (c - previous);
                previous = c;
            }
            f[Tissue::Air as usize] = outside * (1.0 - previous);
        }
        Some(f)
    }

    fn render_slice(&self, anatomy: &Anatomy, k: usize, flair: &mut [i16], t1w: &mut [i16], labels: Option<&mut [u8]>) {
        let [nx, ny, _] = self.dims;
        let displacement = self.displacement.slice(k, nx, ny);
        let scanner = self.scanner.slice(k, nx, ny);
        let mut noise = rng(self.seed, self.number as u64, Stream::Noise, k as u64);
        let mut labels = labels;
        for j in 0..ny {
            for i in 0..nx {
                let idx = j * nx + i;
                let q = self.template_point(i, j, k, displacement[idx]);
                let field = scanner[idx];
                let (mut sf, mut st) = (0f32, 0f32);
                let fractions = self.fractions(anatomy, q, field[2].exp());
                if let Some(f) = &fractions {
                    for ((fraction, flair), t1w) in f.iter().zip(&self.flair).zip(&self.t1w).skip(1) {
                        sf += fraction * flair;
                        st += fraction * t1w;
                    }
                    sf *= field[0].exp();
                    st *= field[1].exp();
                }
                // Rician: the magnitude of the signal plus complex Gaussian noise.
                let n: [f32; 4] = std::array::from_fn(|_| StandardNormal.sample(&mut noise));
                flair[idx] = to_i16(sf + self.flair_sigma * n[0], self.flair_sigma * n[1]);
                t1w[idx] = to_i16(st + self.t1w_sigma * n[2], self.t1w_sigma * n[3]);
                if let Some(l) = labels.as_deref_mut() {
                    l[idx] = match &fractions {
                        None => Tissue::Air as u8,
                        Some(f) => {
                            let (t, v) =
                                f.iter().enumerate().fold((0, 0f32), |a, (t, &v)| if v > a.1 { (t, v) } else { a });
                            if v >= PURE_FRACTION {
                                t as u8
                            } else {
                                MIXED
                            }
                        }
                    };
                }
            }
        }
    }
}

#[inline]
fn to_i16(re: f32, im: f32) -> i16 {
    (re * re + im * im).sqrt().round().min(i16::MAX as f32) as i16
}
