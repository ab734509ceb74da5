//! Exact Euclidean distance transform (Felzenszwalb & Huttenlocher 2012) and hole filling on a
//! C-ordered 3-D grid of 1 mm voxels: the morphology the anatomy needs (closing, skull shell).
use rayon::prelude::*;

/// A 3-D boolean grid, indexed `(a * ny + b) * nz + c`.
#[derive(Clone, Debug)]
pub struct Grid3 {
    pub dims: [usize; 3],
    pub data: Vec<bool>,
}

impl Grid3 {
    pub fn index(&self, a: usize, b: usize, c: usize) -> usize {
        (a * self.dims[1] + b) * self.dims[2] + c
    }

    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.data.iter().filter(|&&v| v).count()
    }
}

/// Squared distance (in voxels²) from every voxel to the nearest `true` voxel of `features`;
/// infinite when there is none. Voxels outside the grid are not features.
pub fn squared_distance(features: &Grid3) -> Vec<f32> {
    let [na, nb, nc] = features.dims;
    let mut d: Vec<f32> = features.data.iter().map(|&f| if f { 0.0 } else { f32::INFINITY }).collect();
    if d.is_empty() {
        return d;
    }
    // Axis 2: contiguous lines.
    d.par_chunks_mut(nc).for_each_init(LineBuffers::default, |buf, line| buf.transform_in_place(line));
    // Axis 1: lines inside one contiguous a-plane.
    d.par_chunks_mut(nb * nc).for_each_init(LineBuffers::default, |buf, plane| {
        for c in 0..nc {
            buf.gather(plane.iter().skip(c).step_by(nc).copied());
            buf.transform();
            for (b, v) in buf.out.iter().enumerate() {
                plane[b * nc + c] = *v as f32;
            }
        }
    });
    // Axis 0: the lines cross every plane, so each b computes its lines into its own buffer and
    // the results are scattered afterwards (no shared mutable state between threads).
    let columns: Vec<Vec<f32>> = (0..nb)
        .into_par_iter()
        .map_init(LineBuffers::default, |buf, b| {
            let mut col = vec![0f32; na * nc];
            for c in 0..nc {
                buf.gather((0..na).map(|a| d[(a * nb + b) * nc + c]));
                buf.transform();
                for (a, v) in buf.out.iter().enumerate() {
                    col[a * nc + c] = *v as f32;
                }
            }
            col
        })
        .collect();
    for (b, col) in columns.iter().enumerate() {
        for a in 0..na {
            let dst = (a * nb + b) * nc;
            d[dst..dst + nc].copy_from_slice(&col[a * nc..(a + 1) * nc]);
        }
    }
    d
}

/// Reusable per-thread buffers of the 1-D transform (lower envelope of parabolas).
#[derive(Default)]
struct LineBuffers {
    f: Vec<f64>,
    out: Vec<f64>,
    v: Vec<usize>,
    z: Vec<f64>,
}

impl LineBuffers {
    fn gather(&mut self, values: impl Iterator<Item = f32>) {
        self.f.clear();
        self.f.extend(values.map(f64::from));
    }

    fn transform_in_place(&mut self, line: &mut [f32]) {
        self.gather(line.iter().copied());
        self.transform();
        for (dst, v) in line.iter_mut().zip(&self.out) {
            *dst = *v as f32;
        }
    }

    /// `out[q] = min_p (q - p)² + f[p]`. Infinite samples are left out of the envelope: with a
    /// large finite stand-in the intersection formula would cancel catastrophically.
    fn transform(&mut self) {
        let n = self.f.len();
        self.v.clear();
        self.z.clear();
        for q in 0..n {
            let fq = self.f[q];
            if !fq.is_finite() {
                continue;
            }
            let hq = fq + (q * q) as f64;
            let mut s = f64::NEG_INFINITY;
            while let Some(&p) = self.v.last() {
                s = (hq - (self.f[p] + (p * p) as f64)) / (2.0 * (q - p) as f64);
                if s <= *self.z.last().unwrap_or(&f64::NEG_INFINITY) {
                    self.v.pop();
                    self.z.pop();
                    s = f64::NEG_INFINITY;
                } else {
                    break;
                }
            }
            self.v.push(q);
            self.z.push(s);
        }
        self.out.clear();
        if self.v.is_empty() {
            self.out.resize(n, f64::INFINITY);
            return;
        }
        let mut k = 0;
        for q in 0..n {
            while k + 1 < self.v.len() && self.z[k + 1] < q as f64 {
                k += 1;
            }
            let p = self.v[k];
            let dq = q as f64 - p as f64;
            self.out.push(dq * dq + self.f[p]);
        }
    }
}

/// Morphological closing with a Euclidean ball of radius `r` voxels: dilation then erosion, each
/// a threshold of an exact distance transform (so the ball is round, not a cube or a diamond).
pub fn close(mask: &Grid3, r: f32) -> Grid3 {
    let r2 = r * r;
    let to_mask = squared_distance(mask);
    let dilated = Grid3 { dims: mask.dims, data: to_mask.iter().map(|&d| d <= r2).collect() };
    let outside = Grid3 { dims: mask.dims, data: dilated.data.iter().map(|&v| !v).collect() };
    let to_outside = squared_distance(&outside);
    Grid3 { dims: mask.dims, data: to_outside.iter().map(|&d| d > r2).collect() }
}

/// Sets every voxel not reachable from the grid border through `false` voxels (6-connected).
pub fn fill_holes(mask: &mut Grid3) {
    let [na, nb, nc] = mask.dims;
    let mut outside = vec![false; mask.data.len()];
    let mut stack = Vec::new();
    let seed = |i: usize, outside: &mut Vec<bool>, stack: &mut Vec<usize>| {
        if !mask.data[i] && !outside[i] {
            outside[i] = true;
            stack.push(i);
        }
    };
    for a in 0..na {
        for b in 0..nb {
            for c in 0..nc {
                if a == 0 || b == 0 || c == 0 || a + 1 == na || b + 1 == nb || c + 1 == nc {
                    seed(mask.index(a, b, c), &mut outside, &mut stack);
                }
            }
        }
    }
    while let Some(i) = stack.pop() {
        let (a, rem) = (i / (nb * nc), i % (nb * nc));
        let (b, c) = (rem / nc, rem % nc);
        if a > 0 {
            seed(i - nb * nc, &mut outside, &mut stack);
        }
        if a + 1 < na {
            seed(i + nb * nc, &mut outside, &mut stack);
        }
        if b > 0 {
            seed(i - nc, &mut outside, &mut stack);
        }
        if b + 1 < nb {
            seed(i + nc, &mut outside, &mut stack);
        }
        if c > 0 {
            seed(i - 1, &mut outside, &mut stack);
        }
        if c + 1 < nc {
            seed(i + 1, &mut outside, &mut stack);
        }
    }
    for (m, o) in mask.data.iter_mut().zip(&outside) {
        *m = !*o;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_match_brute_force() {
        let dims = [7, 9, 11];
        let mut g = Grid3 { dims, data: vec![false; 7 * 9 * 11] };
        let pts = [(1, 2, 3), (5, 8, 0), (6, 0, 10)];
        for &(a, b, c) in &pts {
            let i = g.index(a, b, c);
            g.data[i] = true;
        }
        let d = squared_distance(&g);
        for a in 0..dims[0] {
            for b in 0..dims[1] {
                for c in 0..dims[2] {
                    let want = pts
                        .iter()
                        .map(|&(x, y, z)| {
                            let (da, db, dc) = (a as i64 - x as i64, b as i64 - y as i64, c as i64 - z as i64);
                            (da * da + db * db + dc * dc) as f32
                        })
                        .fold(f32::INFINITY, f32::min);
                    assert_eq!(d[g.index(a, b, c)], want, "voxel ({a}, {b}, {c})");
                }
            }
        }
        let empty = Grid3 { dims, data: vec![false; 7 * 9 * 11] };
        assert!(squared_distance(&empty).iter().all(|v| v.is_infinite()));
    }

    #[test]
    fn fill_and_close() {
        // A hollow 5³ cube: filling closes its cavity; a one-voxel notch is closed by r = 1.5.
        let dims = [9, 9, 9];
        let mut g = Grid3 { dims, data: vec![false; 729] };
        for a in 2..7 {
            for b in 2..7 {
                for c in 2..7 {
                    let shell = a == 2 || a == 6 || b == 2 || b == 6 || c == 2 || c == 6;
                    let i = g.index(a, b, c);
                    g.data[i] = shell;
                }
            }
        }
        let mut filled = g.clone();
        fill_holes(&mut filled);
        assert_eq!(filled.count(), 125);
        let mut notched = filled.clone();
        let i = notched.index(4, 4, 6);
        notched.data[i] = false;
        let closed = close(&notched, 1.5);
        assert!(closed.data[i], "the notch is closed");
        assert_eq!(closed.count(), 125, "closing adds nothing else to a cube");
    }
}
