//! Input-activation statistics of matmul weights, for `xllm imatrix`: per weight and per input
//! column, the sum of squared activations and the number of tokens (rows) seen; one row of sums
//! and one count per expert for expert tensors. llama.cpp's `llama-imatrix` collects the same
//! (its `IMatrixCollector::collect_imatrix`), and `xllm quantize --imatrix` / `llama-quantize
//! --imatrix` use `sum / count` to weigh each column's rounding error.
//!
//! The collector sits below the architectures (they call down into it): a layer holds an
//! `Option<Tap>`, `None` unless a model is built for `xllm imatrix`, so the normal path pays one
//! branch per matmul.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor};

/// Sums (f64, so millions of tokens add up without drift) and counts of one weight.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WeightStats {
    /// `counts.len()` rows of `cols` sums.
    pub sums: Vec<f64>,
    /// Tokens seen, per matrix (expert).
    pub counts: Vec<u64>,
}

/// Collects statistics from every tapped layer of one model; shared by the layers.
#[derive(Debug, Default)]
pub struct ActivationStats {
    entries: Mutex<BTreeMap<String, WeightStats>>,
}

impl ActivationStats {
    pub fn new() -> Arc<ActivationStats> {
        Arc::new(ActivationStats::default())
    }

    /// Adds `rows` (row-major, `cols` each) as input of matrix `expert` of `n_mat` of `name`.
    pub fn add_rows(
        &self,
        name: &str,
        n_mat: usize,
        expert: usize,
        rows: &[f32],
        cols: usize,
    ) -> Result<()> {
        if cols == 0 || rows.len() % cols != 0 || expert >= n_mat {
            candle_core::bail!("activation stats for '{name}': bad shape");
        }
        // Square and sum outside the lock; threads of one forward pass do not wait on each other.
        let mut acc = vec![0f64; cols];
        for row in rows.chunks_exact(cols) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += (v as f64) * (v as f64);
            }
        }
        if acc.iter().any(|v| !v.is_finite()) {
            candle_core::bail!("non-finite activations reach '{name}'");
        }
        let mut entries = self.entries.lock().expect("stats lock");
        let e = entries.entry(name.to_string()).or_default();
        if e.sums.is_empty() {
            e.sums = vec![0.0; cols * n_mat];
            e.counts = vec![0; n_mat];
        }
        if e.sums.len() != cols * n_mat {
            candle_core::bail!(
                "activation stats for '{name}': {cols} columns x {n_mat} matrices, earlier {}",
                e.sums.len()
            );
        }
        for (s, a) in e.sums[expert * cols..(expert + 1) * cols]
            .iter_mut()
            .zip(&acc)
        {
            *s += a;
        }
        e.counts[expert] += (rows.len() / cols) as u64;
        Ok(())
    }

    /// Everything collected so far, by weight name.
    pub fn snapshot(&self) -> BTreeMap<String, WeightStats> {
        self.entries.lock().expect("stats lock").clone()
    }
}

/// A layer's link to the collector: the weight names whose input it sees (several for stacked
/// projections such as q/k/v, which share one input), and for an expert's slice of a 3-D expert
/// tensor, which matrix of how many (llama.cpp keeps one row of sums and one count per expert).
#[derive(Debug, Clone)]
pub struct Tap {
    pub stats: Arc<ActivationStats>,
    pub names: Vec<String>,
    /// Matrices of the weight (experts; 1 for a 2-D weight).
    pub n_mat: usize,
    /// The matrix this tap's rows go to, for [`Tap::record`].
    pub expert: usize,
}

impl Tap {
    /// A tap for 2-D weights (one matrix each).
    pub fn new(stats: &Arc<ActivationStats>, names: Vec<String>) -> Tap {
        Tap {
            stats: stats.clone(),
            names,
            n_mat: 1,
            expert: 0,
        }
    }

    /// A tap for matrix `expert` of the `n_mat` of 3-D expert tensors `names`.
    pub fn expert(
        stats: &Arc<ActivationStats>,
        names: Vec<String>,
        n_mat: usize,
        expert: usize,
    ) -> Tap {
        Tap {
            stats: stats.clone(),
            names,
            n_mat,
            expert,
        }
    }

    /// Records `x [.., cols]` (any float dtype) for every name, as input of this tap's matrix.
    pub fn record(&self, x: &Tensor) -> Result<()> {
        let cols = x.dim(x.rank() - 1)?;
        let rows = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.record_rows(self.expert, &rows, cols)
    }

    /// Records `rows` (row-major, `cols` each) for every name as input of matrix `expert` (an
    /// expert dispatch calls this with the rows of the tokens routed to `expert` only).
    pub fn record_rows(&self, expert: usize, rows: &[f32], cols: usize) -> Result<()> {
        for name in &self.names {
            self.stats.add_rows(name, self.n_mat, expert, rows, cols)?;
        }
        Ok(())
    }
}

/// Taps of a layer's routed experts where the expert matmuls are not [`Tap`]-carrying layers
/// (gpt-oss's MXFP4 kernel): `input` sees the rows entering an expert (gate and up), `hidden`
/// the rows entering its down projection.
#[derive(Debug, Clone)]
pub struct ExpertTaps {
    pub input: Tap,
    pub hidden: Tap,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_squares_per_column_and_counts_rows_per_expert() {
        let s = ActivationStats::new();
        s.add_rows("w", 1, 0, &[1.0, 2.0, 3.0, -1.0], 2).unwrap();
        s.add_rows("w", 1, 0, &[2.0, 0.5], 2).unwrap();
        s.add_rows("e", 3, 2, &[1.0, 1.0, 2.0, 3.0], 2).unwrap();
        let m = s.snapshot();
        assert_eq!(m["w"].sums, vec![1.0 + 9.0 + 4.0, 4.0 + 1.0 + 0.25]);
        assert_eq!(m["w"].counts, vec![3]);
        assert_eq!(m["e"].sums, vec![0.0, 0.0, 0.0, 0.0, 5.0, 10.0]);
        assert_eq!(m["e"].counts, vec![0, 0, 2]);
        assert!(s.add_rows("w", 1, 0, &[1.0, 2.0, 3.0], 3).is_err());
        assert!(s.add_rows("x", 1, 0, &[f32::NAN, 1.0], 2).is_err());
    }

    #[test]
    fn a_tap_records_for_every_name_it_serves() {
        let s = ActivationStats::new();
        let tap = Tap::new(&s, vec!["q".into(), "k".into()]);
        let x = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &candle_core::Device::Cpu).unwrap();
        tap.record(&x).unwrap();
        let m = s.snapshot();
        assert_eq!(m["q"], m["k"]);
        assert_eq!(m["q"].sums, vec![10.0, 20.0]);
        assert_eq!(m["q"].counts, vec![2]);
    }
}
