//! The additive attention mask both decoder families use (causal, optionally sliding-window).

use std::ops::Range;

use candle_core::{DType, Device, Result, Tensor};

/// Additive mask `[queries.len(), keys.len()]` for queries at positions `queries` over keys at
/// positions `keys`: 0 where the key is visible, −∞ where it lies after the query or, with a
/// sliding `window`, `window` or more positions before it.
pub(crate) fn causal_mask(
    queries: Range<usize>,
    keys: Range<usize>,
    window: Option<usize>,
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    let (t, len) = (queries.len(), keys.len());
    let mut mask = Vec::with_capacity(t * len);
    for q in queries {
        for k in keys.clone() {
            let visible = k <= q && window.is_none_or(|w| q - k < w);
            mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
        }
    }
    Tensor::from_vec(mask, (t, len), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_and_sliding_visibility() {
        let m = causal_mask(2..4, 1..4, Some(2), &Device::Cpu, DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let ninf = f32::NEG_INFINITY;
        // Query 2 sees keys 1, 2; query 3 sees keys 2, 3 (window 2).
        assert_eq!(m, vec![vec![0., 0., ninf], vec![ninf, 0., 0.]]);
    }
}
