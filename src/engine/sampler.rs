//! Choosing the next token from logits: repetition penalties, then temperature, top-k, top-p and
//! min-p (the order transformers applies them), then a seeded draw. Temperature 0 is greedy.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings (defaults: greedy-free sampling at 0.8 like llama.cpp/Ollama).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    /// Divides positive / multiplies negative logits of recent tokens (1.0: off).
    pub repeat_penalty: f32,
    /// Recent tokens the penalties look at.
    pub repeat_last_n: usize,
    /// Subtracted once from the logit of every recent token (0: off).
    pub presence_penalty: f32,
    /// Subtracted per occurrence of a recent token (0: off).
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: Some(40),
            top_p: Some(0.9),
            min_p: None,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token from `logits` given the tokens of the sequence so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        self.apply_penalties(&mut logits, history);
        if self.params.temperature <= 0.0 {
            return argmax(&logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        // Candidates sorted by logit, best first.
        let mut cand: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l as f64 * inv_t))
            .collect();
        if cand.is_empty() {
            return argmax(&logits);
        }
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if let Some(k) = self.params.top_k.filter(|&k| k > 0) {
            cand.truncate(k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        let mut keep = probs.len();
        if let Some(top_p) = self.params.top_p.filter(|&p| p < 1.0) {
            let mut cum = 0.0;
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if let Some(min_p) = self.params.min_p.filter(|&p| p > 0.0) {
            let floor = probs[0] * min_p;
            keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        let total: f64 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        for (i, p) in probs[..keep].iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[keep - 1].0
    }

    fn apply_penalties(&self, logits: &mut [f32], history: &[u32]) {
        let p = &self.params;
        if p.repeat_penalty == 1.0 && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0 {
            return;
        }
        let recent = &history[history.len().saturating_sub(p.repeat_last_n)..];
        let mut counts = std::collections::HashMap::<u32, usize>::new();
        for &t in recent {
            *counts.entry(t).or_default() += 1;
        }
        for (&t, &n) in &counts {
            let Some(l) = logits.get_mut(t as usize) else {
                continue;
            };
            if p.repeat_penalty != 1.0 {
                *l = if *l > 0.0 {
                    *l / p.repeat_penalty
                } else {
                    *l * p.repeat_penalty
                };
            }
            *l -= p.presence_penalty + p.frequency_penalty * n as f32;
        }
    }
}

fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k: None,
            top_p: None,
            min_p: None,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn temperature_zero_is_argmax() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0], &[]), 1);
    }

    #[test]
    fn same_seed_same_draws_and_distribution_follows_softmax() {
        let logits = [0.0f32, (3f32).ln(), f32::NEG_INFINITY];
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0)
            });
            (0..4000)
                .map(|_| s.sample(&logits, &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!(
            (ones - 0.75).abs() < 0.03,
            "token 1 drawn {ones} of the time, expected 0.75"
        );
        assert!(!a.contains(&2));
    }

    #[test]
    fn top_k_top_p_min_p_restrict_candidates() {
        let logits = [5.0f32, 4.0, 3.0, 2.0, 1.0];
        let mut k = Sampler::new(SamplingParams {
            top_k: Some(2),
            ..params(5.0)
        });
        assert!((0..500).all(|_| k.sample(&logits, &[]) < 2));
        let mut p = Sampler::new(SamplingParams {
            top_p: Some(0.5),
            ..params(1.0)
        });
        assert!(
            (0..500).all(|_| p.sample(&logits, &[]) == 0),
            "top 1 has 64% of the mass"
        );
        let mut m = Sampler::new(SamplingParams {
            min_p: Some(0.3),
            ..params(1.0)
        });
        // p1/p0 = e^-1 ≈ 0.37 ≥ 0.3, p2/p0 = e^-2 < 0.3.
        let drawn: std::collections::HashSet<u32> =
            (0..500).map(|_| m.sample(&logits, &[])).collect();
        assert_eq!(drawn, [0, 1].into_iter().collect());
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            ..params(0.0)
        });
        assert_eq!(s.sample(&[2.0, 1.5], &[0]), 1, "2.0 / 2 = 1.0 < 1.5");
        let mut f = Sampler::new(SamplingParams {
            frequency_penalty: 0.3,
            ..params(0.0)
        });
        assert_eq!(f.sample(&[2.0, 1.5], &[0, 0]), 1, "2.0 - 0.6 < 1.5");
        assert_eq!(f.sample(&[2.0, 1.5], &[0]), 0, "2.0 - 0.3 > 1.5");
        let mut pr = Sampler::new(SamplingParams {
            presence_penalty: 1.0,
            ..params(0.0)
        });
        assert_eq!(pr.sample(&[2.0, 1.5], &[0, 0, 0]), 1);
    }
}
