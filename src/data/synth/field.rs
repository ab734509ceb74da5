//! Smooth random fields: uniform cubic B-splines whose node values are random, evaluated slice by
//! slice on the output grid (separably, so a slice costs a few multiply-adds per voxel).
use rand::Rng;
use rand_distr::{Distribution, Normal};

/// `C` channels of a cubic B-spline over an output grid; node `n` sits at voxel `(n − 1) · spacing`.
#[derive(Clone, Debug)]
pub struct Spline<const C: usize> {
    nodes: [usize; 3],
    spacing: f32,
    coef: Vec<[f32; C]>,
}

/// Index of the first of the four nodes that carry voxel `x`, and their weights.
#[inline]
fn taps(x: f32, spacing: f32) -> (usize, [f32; 4]) {
    let t = x / spacing + 1.0;
    let base = t.floor();
    let u = t - base;
    let (u2, u3) = (u * u, u * u * u);
    let w = [
        (1.0 - u).powi(3) / 6.0,
        (3.0 * u3 - 6.0 * u2 + 4.0) / 6.0,
        (-3.0 * u3 + 3.0 * u2 + 3.0 * u + 1.0) / 6.0,
        u3 / 6.0,
    ];
    (base as usize - 1, w)
}

/// `y += a · x`, channel by channel.
#[inline]
fn axpy<const C: usize>(y: &mut [f32; C], a: f32, x: &[f32; C]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

impl<const C: usize> Spline<C> {
    /// Node values `N(0, sd[ch])`, drawn node by node in a fixed order.
    pub fn random(rng: &mut impl Rng, dims: [usize; 3], spacing: f32, sd: [f32; C]) -> Self {
        let nodes = dims.map(|n| ((n.max(1) - 1) as f32 / spacing).floor() as usize + 4);
        let normals: Vec<Normal<f32>> = sd.iter().map(|&s| Normal::new(0.0, s.max(0.0)).expect("finite SD")).collect();
        let coef =
            (0..nodes.iter().product::<usize>()).map(|_| std::array::from_fn(|ch| normals[ch].sample(rng))).collect();
        Spline { nodes, spacing, coef }
    }

    /// Adds `other`'s channel `from` onto channel `to`, node by node (both on the same nodes).
    pub fn add_channel<const D: usize>(&mut self, to: usize, other: &Spline<D>, from: usize) {
        assert_eq!(self.nodes, other.nodes, "splines on different nodes");
        for (a, b) in self.coef.iter_mut().zip(&other.coef) {
            a[to] += b[from];
        }
    }

    /// Values on output slice `k`, `[j * nx + i]` (NIfTI order within the slice).
    pub fn slice(&self, k: usize, nx: usize, ny: usize) -> Vec<[f32; C]> {
        let [na, nb, nc] = self.nodes;
        let (kc, wz) = taps(k as f32, self.spacing);
        // Collapse the four z planes: plane[a][b].
        let mut plane = vec![[0f32; C]; na * nb];
        for a in 0..na {
            for b in 0..nb {
                let base = (a * nb + b) * nc + kc;
                let p = &mut plane[a * nb + b];
                for (t, w) in wz.iter().enumerate() {
                    axpy(p, *w, &self.coef[base + t]);
                }
            }
        }
        let ytaps: Vec<(usize, [f32; 4])> = (0..ny).map(|j| taps(j as f32, self.spacing)).collect();
        let mut out = vec![[0f32; C]; nx * ny];
        let mut row = vec![[0f32; C]; nb];
        for i in 0..nx {
            let (ic, wx) = taps(i as f32, self.spacing);
            for (b, r) in row.iter_mut().enumerate() {
                *r = [0.0; C];
                for (t, w) in wx.iter().enumerate() {
                    axpy(r, *w, &plane[(ic + t) * nb + b]);
                }
            }
            for (j, (jc, wy)) in ytaps.iter().enumerate() {
                let o = &mut out[j * nx + i];
                for (t, w) in wy.iter().enumerate() {
                    axpy(o, *w, &row[jc + t]);
                }
            }
        }
        out
    }

    /// Direct (non-separable) evaluation at one voxel, for checking `slice`.
    #[cfg(test)]
    pub fn at(&self, i: usize, j: usize, k: usize) -> [f32; C] {
        let [_, nb, nc] = self.nodes;
        let (ic, wx) = taps(i as f32, self.spacing);
        let (jc, wy) = taps(j as f32, self.spacing);
        let (kc, wz) = taps(k as f32, self.spacing);
        let mut v = [0f32; C];
        for (ta, wa) in wx.iter().enumerate() {
            for (tb, wb) in wy.iter().enumerate() {
                for (tc, wc) in wz.iter().enumerate() {
                    let n = &self.coef[((ic + ta) * nb + jc + tb) * nc + kc + tc];
                    for ch in 0..C {
                        v[ch] += wa * wb * wc * n[ch];
                    }
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn separable_slices_match_direct_evaluation() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let s = Spline::<2>::random(&mut rng, [23, 31, 17], 7.0, [1.0, 0.5]);
        for k in [0, 6, 16] {
            let sl = s.slice(k, 23, 31);
            for (i, j) in [(0, 0), (22, 30), (7, 14), (13, 3)] {
                let (a, b) = (sl[j * 23 + i], s.at(i, j, k));
                for ch in 0..2 {
                    assert!((a[ch] - b[ch]).abs() < 1e-5, "({i},{j},{k}) ch {ch}: {a:?} vs {b:?}");
                }
            }
        }
    }

    #[test]
    fn weights_partition_unity() {
        for x in [0.0, 0.3, 5.9, 12.0] {
            let (_, w) = taps(x, 6.0);
            assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }
}
