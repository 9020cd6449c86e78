//! A volume served straight from its sleds: the NBD [`Volume`] over a [`SledStore`].
//!
//! Writes are acknowledged once every replica has them durable, so FLUSH and FUA have nothing
//! left to do and several connections see each other's writes at once (multi-conn). Overlapping
//! mutations are ordered by a first-come-first-served range lock, so every replica applies them
//! in the same order. Requests not aligned to 4 KiB are widened to whole blocks with a
//! read-modify-write under the lock.

use super::rangelock::RangeLock;
use super::store::{SledStore, StoreError};
use super::{BLOCK, VolumeSpec};
use crate::nbd::{ExportInfo, Extent, Volume, VolumeError};
use common::AlignedBuf;
use std::sync::Arc;

/// Largest READ/WRITE payload advertised.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// A volume served from its sleds by this head node.
#[derive(Debug)]
pub struct DirectVolume {
    store: Arc<SledStore>,
    locks: RangeLock,
    detached: tokio::sync::watch::Sender<bool>,
}

fn to_volume_error(e: StoreError) -> VolumeError {
    match e {
        StoreError::NoSpace(_) => VolumeError::NoSpace,
        StoreError::OutOfRange { offset, len } => VolumeError::OutOfRange {
            offset,
            length: len,
        },
        StoreError::Deposed { .. } | StoreError::Io(_) => {
            VolumeError::io(std::io::Error::other(e.to_string()))
        }
    }
}

const fn floor(v: u64) -> u64 {
    v / BLOCK * BLOCK
}

const fn ceil(v: u64) -> u64 {
    v.div_ceil(BLOCK) * BLOCK
}

impl DirectVolume {
    /// A volume over an opened store.
    pub fn new(store: Arc<SledStore>) -> Self {
        let (detached, _) = tokio::sync::watch::channel(false);
        Self {
            store,
            locks: RangeLock::new(),
            detached,
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<SledStore> {
        &self.store
    }

    /// The description.
    pub fn spec(&self) -> VolumeSpec {
        self.store.spec()
    }

    /// Detaches: connections finish what they have in flight and disconnect.
    pub fn detach(&self) {
        self.detached.send_replace(true);
    }

    async fn lock(&self, start: u64, end: u64) -> super::rangelock::RangeGuard {
        self.locks.lock(start / BLOCK, (end - 1) / BLOCK).await
    }

    /// Writes `data` over `[start, end)` (block-aligned) where the caller's bytes are at
    /// `offset`: reads the partial blocks at the edges first. Caller holds the lock.
    async fn read_modify_write(&self, offset: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let end = offset + bytes.len() as u64;
        let (start, stop) = (floor(offset), ceil(end));
        let mut buf = AlignedBuf::zeroed((stop - start) as usize);
        if offset != start {
            let head = self.store.read(start, BLOCK).await?;
            buf[..BLOCK as usize].copy_from_slice(&head);
        }
        if end != stop && (stop - BLOCK != start || offset == start) {
            let tail = self.store.read(stop - BLOCK, BLOCK).await?;
            let at = (stop - BLOCK - start) as usize;
            buf[at..].copy_from_slice(&tail);
        }
        let at = (offset - start) as usize;
        buf[at..at + bytes.len()].copy_from_slice(bytes);
        self.store.write(start, buf.into_bytes()).await
    }
}

impl Volume for DirectVolume {
    fn info(&self) -> ExportInfo {
        let spec = self.store.spec();
        ExportInfo {
            name: spec.name.clone(),
            description: format!("stockade volume {}", spec.id),
            size: spec.size,
            read_only: false,
            multi_conn: true,
            min_block: 512,
            preferred_block: BLOCK as u32,
            max_block: MAX_PAYLOAD,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, VolumeError> {
        let end = offset + u64::from(len);
        let (start, stop) = (floor(offset), ceil(end));
        let buf = self
            .store
            .read(start, stop - start)
            .await
            .map_err(to_volume_error)?;
        if start == offset && stop == end {
            return Ok(buf);
        }
        let at = (offset - start) as usize;
        Ok(AlignedBuf::from_slice(&buf[at..at + len as usize]))
    }

    async fn write(&self, offset: u64, data: AlignedBuf, _fua: bool) -> Result<(), VolumeError> {
        let end = offset + data.len() as u64;
        let _g = self.lock(offset, end).await;
        let res = if offset.is_multiple_of(BLOCK) && end.is_multiple_of(BLOCK) {
            self.store.write(offset, data.into_bytes()).await
        } else {
            self.read_modify_write(offset, &data).await
        };
        res.map_err(to_volume_error)
    }

    async fn flush(&self) -> Result<(), VolumeError> {
        // Every acknowledged write is already durable on every replica.
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), VolumeError> {
        // A hint: discard the whole blocks inside the range, leave partial ones alone.
        let (start, stop) = (ceil(offset), floor(offset + len));
        if start >= stop {
            return Ok(());
        }
        let _g = self.lock(start, stop).await;
        self.store
            .zero(start, stop - start, true)
            .await
            .map_err(to_volume_error)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        _fast_only: bool,
        _fua: bool,
    ) -> Result<(), VolumeError> {
        // Zeroing is a metadata operation on the sleds (punched holes, checksum flags): always
        // fast, so FAST_ZERO never has to fail.
        let end = offset + len;
        let _g = self.lock(offset, end).await;
        let (start, stop) = (ceil(offset), floor(end));
        let res = async {
            if start >= stop {
                // Inside one or two partial blocks.
                let zeros = vec![0u8; len as usize];
                return self.read_modify_write(offset, &zeros).await;
            }
            if offset < start {
                let zeros = vec![0u8; (start - offset) as usize];
                self.read_modify_write(offset, &zeros).await?;
            }
            if stop < end {
                let zeros = vec![0u8; (end - stop) as usize];
                self.read_modify_write(stop, &zeros).await?;
            }
            self.store.zero(start, stop - start, !no_hole).await
        }
        .await;
        res.map_err(to_volume_error)
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, VolumeError> {
        let runs = self.store.allocation(offset, len);
        if runs.is_empty() {
            return Err(VolumeError::OutOfRange {
                offset,
                length: len,
            });
        }
        Ok(runs
            .into_iter()
            .map(|(l, allocated)| {
                if allocated {
                    Extent::data(l)
                } else {
                    Extent::hole(l)
                }
            })
            .collect())
    }

    async fn cache(&self, _offset: u64, _len: u64) -> Result<(), VolumeError> {
        Ok(())
    }

    async fn closed(&self) {
        let mut rx = self.detached.subscribe();
        tokio::select! {
            _ = rx.wait_for(|d| *d) => {}
            _ = self.store.deposed() => {}
        }
    }
}
