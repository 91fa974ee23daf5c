//! Borrowed byte ranges of a shared owner (an mmapped checkpoint shard, or a `Vec` in tests).
//!
//! Quantized weights stay in the file's pages: a [`SharedBytes`] is an `Arc` to the mapping plus a
//! range, so loading an MXFP4 tensor copies nothing and resident memory grows only with the pages
//! a forward pass actually touches.

use std::sync::Arc;

/// A cheap-to-clone view of `len` bytes at `start` inside a shared owner.
#[derive(Clone)]
pub struct SharedBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl SharedBytes {
    /// Views `owner[start..start + len]`; `None` when the range is out of bounds.
    pub fn new(
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        start: usize,
        len: usize,
    ) -> Option<Self> {
        let end = start.checked_add(len)?;
        if end > (*owner).as_ref().len() {
            return None;
        }
        Some(Self { owner, start, len })
    }

    /// Owns `bytes` (tests, weights built in memory).
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        Self {
            owner: Arc::new(bytes),
            start: 0,
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A sub-range of this view; `None` when out of bounds.
    pub fn slice(&self, start: usize, len: usize) -> Option<Self> {
        if start.checked_add(len)? > self.len {
            return None;
        }
        Some(Self {
            owner: self.owner.clone(),
            start: self.start + start,
            len,
        })
    }
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBytes({} bytes)", self.len)
    }
}
