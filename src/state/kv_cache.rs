//! KV stores: one [`KvStore`] holds one block of one attention layer's keys/values (see
//! [`super::PagedKv`], which strings blocks together per sequence).
//!
//! Storage is preallocated in chunks of [`KV_CHUNK_TOKENS`] tokens and grown by whole chunks, never
//! reallocated per token. Quantized stores (`kv_int8`, `kv_fp8`) quantize on write and hand
//! attention dequantized keys/values in the compute dtype.

use candle_core::{DType, Device, Result, Tensor};

use crate::quant::KvProfile;

/// Growth step of every KV store, in tokens.
pub const KV_CHUNK_TOKENS: usize = 256;

/// Keys and values of one attention layer for one sequence.
///
/// Tensors are `[1, kv_heads, tokens, head_dim]` (batch of one: the cache is per sequence).
pub trait KvStore: Send + Sync {
    /// Appends `k`, `v` (`[1, kv_heads, t, head_dim]`, compute dtype) and returns all cached keys
    /// and values so far, `[1, kv_heads, len, head_dim]` in the compute dtype.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)>;
    /// Tokens cached.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The stored keys/values, `[1, kv_heads, len, head_dim]` in the compute dtype (a view of
    /// the storage for dense stores, decoded for quantized ones).
    fn read(&self) -> Result<(Tensor, Tensor)>;
    /// Bytes currently allocated for this layer (capacity, scales included).
    fn allocated_bytes(&self) -> usize;
    /// Forgets every token but keeps the allocation.
    fn clear(&mut self);
    /// Drops tokens after `len` (used to rewind a sequence).
    fn truncate(&mut self, len: usize);
    /// Appends without handing the cache back, for attention kernels that read
    /// [`KvStore::contents`] in place (no per-step dequantization). Defaults to `append`.
    fn write(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        self.append(k, v).map(|_| ())
    }
    /// The stored keys/values at full capacity (only the first `len()` tokens are valid), for
    /// attention kernels that read the stored form directly; `None` before the first append.
    fn contents(&self) -> Option<KvContents<'_>> {
        None
    }
}

/// What a store holds, at full capacity (`[1, kv_heads, capacity, …]`).
pub enum KvContents<'a> {
    /// Keys and values in the compute dtype.
    Dense { k: &'a Tensor, v: &'a Tensor },
    /// Byte codes (`u8` holding int8 + 128 for `kv_int8`, `F8E4M3` for `kv_fp8`),
    /// `[1, kv_heads, capacity, head_dim]`, and f16 scales `[1, kv_heads, capacity, 1]`.
    Quantized {
        profile: KvProfile,
        k_codes: &'a Tensor,
        k_scales: &'a Tensor,
        v_codes: &'a Tensor,
        v_scales: &'a Tensor,
    },
}

/// Shape of one layer's cache, shared by all stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Hard limit (the model's or the user's context length).
    pub max_tokens: usize,
}

impl KvLayout {
    /// The capacity to grow to so `needed` tokens fit: `None` when `capacity` already holds them,
    /// else whole [`KV_CHUNK_TOKENS`] chunks bounded by `max_tokens`; an error past `max_tokens`.
    pub(crate) fn grown_capacity(&self, capacity: usize, needed: usize) -> Result<Option<usize>> {
        if needed <= capacity {
            return Ok(None);
        }
        if needed > self.max_tokens {
            candle_core::bail!(
                "KV cache full: {needed} tokens exceed the context limit of {}",
                self.max_tokens
            );
        }
        Ok(Some(
            needed
                .div_ceil(KV_CHUNK_TOKENS)
                .saturating_mul(KV_CHUNK_TOKENS)
                .min(self.max_tokens),
        ))
    }
}

/// Unquantized store in the compute dtype.
pub struct DenseKvStore {
    layout: KvLayout,
    dtype: DType,
    device: Device,
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

impl DenseKvStore {
    pub fn new(layout: KvLayout, dtype: DType, device: &Device) -> Self {
        Self {
            layout,
            dtype,
            device: device.clone(),
            k: None,
            v: None,
            len: 0,
        }
    }

    fn capacity(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0))
    }

    /// Makes room for `needed` tokens, growing by whole chunks (bounded by `max_tokens`).
    fn reserve(&mut self, needed: usize) -> Result<()> {
        let Some(new_cap) = self.layout.grown_capacity(self.capacity(), needed)? else {
            return Ok(());
        };
        let shape = (1, self.layout.kv_heads, new_cap, self.layout.head_dim);
        let grow = |old: Option<&Tensor>| -> Result<Tensor> {
            let fresh = Tensor::zeros(shape, self.dtype, &self.device)?;
            if let Some(old) = old {
                fresh.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            Ok(fresh)
        };
        let k = grow(self.k.as_ref())?;
        let v = grow(self.v.as_ref())?;
        self.k = Some(k);
        self.v = Some(v);
        Ok(())
    }
}

impl KvStore for DenseKvStore {
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        self.reserve(self.len + t)?;
        let (kc, vc) = (self.k.as_ref().unwrap(), self.v.as_ref().unwrap());
        kc.slice_set(&k.to_dtype(self.dtype)?.contiguous()?, 2, self.len)?;
        vc.slice_set(&v.to_dtype(self.dtype)?.contiguous()?, 2, self.len)?;
        self.len += t;
        Ok((kc.narrow(2, 0, self.len)?, vc.narrow(2, 0, self.len)?))
    }

    fn len(&self) -> usize {
        self.len
    }

    fn read(&self) -> Result<(Tensor, Tensor)> {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) => Ok((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?)),
            _ => candle_core::bail!("internal error: reading an empty KV store"),
        }
    }

    fn allocated_bytes(&self) -> usize {
        2 * self.capacity()
            * self.layout.kv_heads
            * self.layout.head_dim
            * self.dtype.size_in_bytes()
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    fn contents(&self) -> Option<KvContents<'_>> {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) => Some(KvContents::Dense { k, v }),
            _ => None,
        }
    }
}

/// Builds the store for a profile (quantized ones live in `kv_quant`).
pub fn new_store(
    profile: KvProfile,
    layout: KvLayout,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn KvStore>> {
    match profile {
        KvProfile::Default => Ok(Box::new(DenseKvStore::new(layout, dtype, device))),
        KvProfile::KvInt8 => Ok(Box::new(super::kv_quant::Int8KvStore::new(
            layout, dtype, device,
        )?)),
        KvProfile::KvFp8 => Ok(Box::new(super::kv_quant::Fp8KvStore::new(
            layout, dtype, device,
        )?)),
    }
}
