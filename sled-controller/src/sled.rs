//! The sled: its devices, which device holds which chunk, and the credential check.
//!
//! Every device keeps the fence records of every volume claimed on the sled, so a claim goes to
//! all devices and is acknowledged when all have made it durable; a mutation goes to the device
//! holding (or about to hold) its chunk, which checks the epoch. The MAC of every credential is
//! verified here, before anything reaches a device.

use crate::device::thread::DeviceHandle;
use crate::device::{DevError, DevRequest, DeviceStatus, Holder, Reply};
use crate::metrics::SledMetrics;
use common::AlignedBuf;
use common::aligned::BufPool;
use common::cred::{ClusterKey, Credential, VerifiedCredentials};
use common::ids::{ChunkIndex, SledId, VolumeId};
use common::sled_proto::{DeviceStat, SledStat, VolumeStat};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Mutex;
use tokio::sync::oneshot;

/// Volumes whose verified credential one connection remembers.
const CREDENTIALS_PER_CONNECTION: usize = 1024;

/// Errors of sled operations (device errors plus credential refusals).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SledError {
    /// The device refused or failed.
    #[error(transparent)]
    Device(#[from] DevError),
    /// The credential's MAC does not verify.
    #[error(
        "credential for volume {0} does not verify (forged, or minted with another cluster key)"
    )]
    BadCredential(VolumeId),
}

/// A device as the sled sees it.
#[derive(Debug)]
pub struct Device {
    /// The thread owning it.
    pub handle: DeviceHandle,
    /// Path.
    pub path: String,
    /// Chunks it can hold.
    pub chunks_total: u64,
}

/// Where a chunk lives, and what is under way on it.
///
/// The device thread decides what it holds; the catalog only routes. It may therefore name a
/// device for a chunk the device no longer holds (harmless: reads there see zeros, writes allocate
/// there), but it must never forget a chunk a device holds, or reads would go elsewhere and a
/// write would allocate it a second time on another device. So an entry is dropped only when
/// nothing can have allocated the chunk since: no mutation routed to it is unanswered, and none
/// was answered since the drop was decided on.
#[derive(Debug, Clone, Copy)]
struct Place {
    dev: usize,
    /// Writes and allocations routed here and not answered yet.
    pending: u32,
    /// Writes and allocations answered so far.
    answered: u64,
    /// The device may hold the chunk: it said so at start, or a write or allocation succeeded or
    /// ended in a way that leaves it unknown (an I/O error, a shutdown).
    held: bool,
}

impl Place {
    fn new(dev: usize, held: bool) -> Self {
        Self {
            dev,
            pending: 0,
            answered: 0,
            held,
        }
    }
}

#[derive(Debug, Default)]
struct Catalog {
    where_: HashMap<(VolumeId, ChunkIndex), Place>,
    used: Vec<u64>,
}

impl Catalog {
    fn forget(&mut self, key: (VolumeId, ChunkIndex)) {
        if let Some(p) = self.where_.remove(&key) {
            self.used[p.dev] = self.used[p.dev].saturating_sub(1);
        }
    }
}

/// A write or allocation routed to a device ([`Sled::route_write`]); hand it back to
/// [`Sled::write_done`] with its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    /// The device.
    pub dev: usize,
    /// The chunk.
    pub chunk: ChunkIndex,
}

/// Whether a write or allocation that ended with `res` may have left its chunk allocated. A
/// fencing refusal may: the fence is checked again when the write is submitted, after its
/// chunk was allocated, and a newer claim can arrive in between.
fn may_hold(res: Result<(), &DevError>) -> bool {
    matches!(
        res,
        Ok(()) | Err(DevError::Io(_) | DevError::ShuttingDown | DevError::Fenced { .. })
    )
}

/// The sled.
#[derive(Debug)]
pub struct Sled {
    id: SledId,
    key: ClusterKey,
    chunk_size: u64,
    devices: Vec<Device>,
    catalog: Mutex<Catalog>,
    metrics: SledMetrics,
    pool: Option<BufPool>,
}

async fn ask<T>(dev: &Device, make: impl FnOnce(Reply<T>) -> DevRequest) -> Result<T, DevError> {
    let (tx, rx) = oneshot::channel();
    dev.handle.send(make(Reply::Once(tx))).await;
    rx.await.unwrap_or(Err(DevError::ShuttingDown))
}

impl Sled {
    /// A sled over started devices; learns where every chunk is from the devices themselves.
    pub async fn new(
        id: SledId,
        key: ClusterKey,
        chunk_size: u64,
        devices: Vec<Device>,
        metrics: SledMetrics,
        pool: Option<BufPool>,
    ) -> Self {
        let mut catalog = Catalog {
            where_: HashMap::new(),
            used: vec![0; devices.len()],
        };
        for (i, d) in devices.iter().enumerate() {
            let (tx, rx) = oneshot::channel();
            d.handle.send(DevRequest::Status { reply: tx }).await;
            if let Ok(st) = rx.await {
                catalog.used[i] = st.chunks.len() as u64;
                for k in st.chunks {
                    catalog.where_.insert(k, Place::new(i, true));
                }
            }
        }
        Self {
            id,
            key,
            chunk_size,
            devices,
            catalog: Mutex::new(catalog),
            metrics,
            pool,
        }
    }

    /// This sled's id.
    pub fn id(&self) -> SledId {
        self.id
    }

    /// A zeroed buffer for a request's data: from the registered pool when there is one.
    pub fn alloc(&self, len: usize) -> AlignedBuf {
        BufPool::alloc_in(self.pool.as_ref(), len)
    }

    /// The cluster key (for the handshake).
    pub fn key(&self) -> &ClusterKey {
        &self.key
    }

    /// Chunk size shared by all devices.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Metrics.
    pub fn metrics(&self) -> &SledMetrics {
        &self.metrics
    }

    fn catalog(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn verify(&self, cred: &Credential) -> Result<Holder, SledError> {
        self.checked(cred, self.key.verify(cred))
    }

    /// Verifies a credential's MAC through a connection's cache of credentials that verified
    /// before (see [`VerifiedCredentials`]: only the exact same credential skips the HMAC).
    pub fn verify_cached(
        &self,
        cache: &mut VerifiedCredentials,
        cred: &Credential,
    ) -> Result<Holder, SledError> {
        self.checked(cred, cache.verify(cred))
    }

    /// A cache of verified credentials for one connection.
    pub fn credential_cache(&self) -> VerifiedCredentials {
        VerifiedCredentials::new(self.key.clone(), CREDENTIALS_PER_CONNECTION)
    }

    fn checked(&self, cred: &Credential, verified: bool) -> Result<Holder, SledError> {
        if !verified {
            self.metrics.credential_refusals.inc();
            tracing::warn!(volume_id = %cred.volume, epoch = cred.epoch.0, node_id = cred.holder.0,
                "refused a credential whose MAC does not verify");
            return Err(SledError::BadCredential(cred.volume));
        }
        Ok(Holder {
            epoch: cred.epoch,
            node: cred.holder,
        })
    }

    /// The device to send a read, write-zeroes or trim of a chunk to: the one holding it, or the
    /// first (which validates the range and checks the fence) when no device does.
    pub fn route(&self, volume: VolumeId, chunk: ChunkIndex) -> usize {
        self.locate(volume, chunk).unwrap_or(0)
    }

    /// The device to send a write of a chunk to. A chunk no device holds yet is pinned to the
    /// device with the most free chunks, so concurrent first writes to it all go to the same
    /// device (which allocates it once). Every routed write must be handed back to
    /// [`Sled::write_done`] with its result.
    pub fn route_write(&self, volume: VolumeId, chunk: ChunkIndex) -> Routed {
        let mut cat = self.catalog();
        let cat = &mut *cat;
        let place = match cat.where_.entry((volume, chunk)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let dev = self.most_free(&cat.used);
                cat.used[dev] += 1;
                e.insert(Place::new(dev, false))
            }
        };
        place.pending += 1;
        Routed {
            dev: place.dev,
            chunk,
        }
    }

    /// A write or allocation routed by [`Sled::route_write`] was answered with `res`. A pin
    /// that nothing allocated is dropped once no write to it is under way (another device may
    /// have room, and a client sending refused writes must not grow the catalog or skew
    /// placement); a device that ran out of space is counted as full.
    pub fn write_done(&self, volume: VolumeId, routed: Routed, res: Result<(), &DevError>) {
        let mut cat = self.catalog();
        let key = (volume, routed.chunk);
        if let Some(place) = cat.where_.get_mut(&key)
            && place.dev == routed.dev
        {
            place.pending = place.pending.saturating_sub(1);
            place.answered += 1;
            place.held |= may_hold(res);
            if place.pending == 0 && !place.held {
                cat.forget(key);
            }
        }
        if matches!(res, Err(DevError::NoSpace)) {
            cat.used[routed.dev] = self.devices[routed.dev].chunks_total;
        }
    }

    /// The handle of device `dev` (an index from [`Sled::route`] or [`Sled::route_write`]).
    pub fn device(&self, dev: usize) -> &DeviceHandle {
        &self.devices[dev].handle
    }

    /// Number of devices.
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// The device holding a chunk, if any.
    fn locate(&self, volume: VolumeId, chunk: ChunkIndex) -> Option<usize> {
        self.catalog().where_.get(&(volume, chunk)).map(|p| p.dev)
    }

    /// The device for a new chunk: the one with the most free chunks (the first of equals).
    fn most_free(&self, used: &[u64]) -> usize {
        (0..self.devices.len())
            .rev()
            .max_by_key(|&i| self.devices[i].chunks_total.saturating_sub(used[i]))
            .unwrap_or(0)
    }

    /// Reads; chunks never written read as zeros.
    pub async fn read(
        &self,
        volume: VolumeId,
        chunk: ChunkIndex,
        offset: u64,
        len: u32,
    ) -> Result<AlignedBuf, SledError> {
        // Validate even when nothing is allocated, so bad ranges always get the same answer.
        let dev = self.route(volume, chunk);
        Ok(ask(&self.devices[dev], |reply| DevRequest::Read {
            volume,
            chunk,
            offset,
            len,
            reply,
        })
        .await?)
    }

    /// Writes (allocating the chunk on its first write).
    pub async fn write(
        &self,
        cred: &Credential,
        chunk: ChunkIndex,
        offset: u64,
        data: AlignedBuf,
    ) -> Result<(), SledError> {
        let fence = self.verify(cred)?;
        let volume = cred.volume;
        let routed = self.route_write(volume, chunk);
        let res = ask(&self.devices[routed.dev], |reply| DevRequest::Write {
            fence,
            volume,
            chunk,
            offset,
            data,
            cached: false,
            reply,
        })
        .await;
        self.write_done(volume, routed, res.as_ref().copied());
        Ok(res?)
    }

    /// Write-zeroes or trim: the range reads as zeros afterwards.
    pub async fn zero(
        &self,
        cred: &Credential,
        chunk: ChunkIndex,
        offset: u64,
        len: u64,
    ) -> Result<(), SledError> {
        let fence = self.verify(cred)?;
        let volume = cred.volume;
        // Unallocated chunks are already zero, but the fence is still checked (by device 0).
        let dev = self.locate(volume, chunk).unwrap_or(0);
        Ok(ask(&self.devices[dev], |reply| DevRequest::Zero {
            fence,
            volume,
            chunk,
            offset,
            len,
            reply,
        })
        .await?)
    }

    /// Allocates a chunk ahead of its first write: on the device already holding it, or on the
    /// device with the most free chunks, then the next when one is full.
    pub async fn allocate(&self, cred: &Credential, chunk: ChunkIndex) -> Result<(), SledError> {
        let fence = self.verify(cred)?;
        let volume = cred.volume;
        for _ in 0..self.devices.len() {
            let routed = self.route_write(volume, chunk);
            let res = ask(&self.devices[routed.dev], |reply| DevRequest::Allocate {
                fence,
                volume,
                chunk,
                reply,
            })
            .await;
            self.write_done(volume, routed, res.as_ref().copied());
            match res {
                // Full: write_done counted the device as full, so the next route avoids it.
                Err(DevError::NoSpace) => continue,
                other => return Ok(other?),
            }
        }
        Err(DevError::NoSpace.into())
    }

    /// Frees a chunk. Its catalog entry goes only when no write to the chunk was under way or
    /// answered while the free was: such a write may have been queued behind the free on the
    /// device and allocated the chunk again there.
    pub async fn free(&self, cred: &Credential, chunk: ChunkIndex) -> Result<(), SledError> {
        let fence = self.verify(cred)?;
        let volume = cred.volume;
        let key = (volume, chunk);
        let (dev, answered) = {
            let cat = self.catalog();
            cat.where_
                .get(&key)
                .map_or((0, None), |p| (p.dev, Some(p.answered)))
        };
        ask(&self.devices[dev], |reply| DevRequest::Free {
            fence,
            volume,
            chunk,
            reply,
        })
        .await?;
        let mut cat = self.catalog();
        if let Some(p) = cat.where_.get(&key)
            && p.dev == dev
            && p.pending == 0
            && Some(p.answered) == answered
        {
            cat.forget(key);
        }
        Ok(())
    }

    /// Claims the volume on every device; acknowledged when all records are durable.
    pub async fn claim(&self, cred: &Credential) -> Result<Holder, SledError> {
        let fence = self.verify(cred)?;
        let volume = cred.volume;
        self.on_every_fence(|reply| DevRequest::Claim {
            volume,
            fence,
            reply,
        })
        .await?;
        Ok(fence)
    }

    /// Retires the volume on every device (see [`Request::Retire`](common::sled_proto::Request)):
    /// its fence records become tombstones. Done when all are durable.
    pub async fn retire(&self, cred: &Credential) -> Result<(), SledError> {
        let fence = self.verify(cred)?;
        let volume = cred.volume;
        self.on_every_fence(|reply| DevRequest::Retire {
            volume,
            fence,
            reply,
        })
        .await?;
        let mut cat = self.catalog();
        let gone: Vec<_> = cat
            .where_
            .keys()
            .filter(|(v, _)| *v == volume)
            .copied()
            .collect();
        for key in gone {
            cat.forget(key);
        }
        Ok(())
    }

    /// Sends a fence-record request to every device (the records are replicated on all of them)
    /// and waits for all: `Fenced` from any wins over other errors.
    async fn on_every_fence(
        &self,
        req: impl Fn(oneshot::Sender<Result<Holder, DevError>>) -> DevRequest,
    ) -> Result<(), SledError> {
        let mut waits = Vec::new();
        for d in &self.devices {
            let (tx, rx) = oneshot::channel();
            d.handle.send(req(tx)).await;
            waits.push(rx);
        }
        let mut result = Ok(());
        for rx in waits {
            match rx.await.unwrap_or(Err(DevError::ShuttingDown)) {
                Ok(_) => {}
                Err(e @ DevError::Fenced { .. }) => result = Err(e),
                Err(e) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        Ok(result?)
    }

    /// Makes every cached write acknowledged so far durable, on every device.
    pub async fn flush(&self) -> Result<(), SledError> {
        let mut waits = Vec::new();
        for d in &self.devices {
            let (tx, rx) = oneshot::channel();
            d.handle
                .send(DevRequest::Flush {
                    reply: Reply::Once(tx),
                })
                .await;
            waits.push(rx);
        }
        let mut result = Ok(());
        for rx in waits {
            if let Err(e) = rx.await.unwrap_or(Err(DevError::ShuttingDown))
                && result.is_ok()
            {
                result = Err(e);
            }
        }
        Ok(result?)
    }

    /// Device statuses.
    pub async fn statuses(&self) -> Vec<DeviceStatus> {
        let mut out = Vec::new();
        for d in &self.devices {
            let (tx, rx) = oneshot::channel();
            d.handle.send(DevRequest::Status { reply: tx }).await;
            if let Ok(st) = rx.await {
                out.push(st);
            }
        }
        out
    }

    /// Sled statistics.
    pub async fn stat(&self) -> SledStat {
        SledStat {
            sled: self.id,
            devices: self
                .statuses()
                .await
                .into_iter()
                .map(|s| DeviceStat {
                    device: s.device,
                    path: s.path,
                    chunk_size: s.chunk_size,
                    chunks_total: s.chunks_total,
                    chunks_used: s.chunks.len() as u64,
                })
                .collect(),
        }
    }

    /// What the sled holds of a volume.
    pub async fn volume_stat(&self, volume: VolumeId) -> VolumeStat {
        let mut fence = None;
        let mut chunks = Vec::new();
        for st in self.statuses().await {
            for (v, h) in st.fences {
                if v == volume && fence.is_none_or(|(e, _)| e < h.epoch) {
                    fence = Some((h.epoch, h.node));
                }
            }
            chunks.extend(
                st.chunks
                    .into_iter()
                    .filter(|(v, _)| *v == volume)
                    .map(|(_, c)| c),
            );
        }
        chunks.sort();
        VolumeStat { fence, chunks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::core::{CoreConfig, DeviceCore};
    use crate::device::open::format;
    use crate::device::thread::spawn_device;
    use crate::engine::mem::{MemEngine, MemImage};
    use crate::metrics::DeviceMetrics;
    use common::clock::{ManualClock, SharedClock};
    use common::ids::{Epoch, NodeId, Uuid128};
    use std::sync::Arc;

    const CHUNK: u64 = 8 << 20;
    const V: VolumeId = VolumeId(0xa);

    async fn two_device_sled() -> Sled {
        let mut devices = Vec::new();
        for i in 0..2u64 {
            let image = MemImage::new(64 << 20);
            let mut e = MemEngine::new(image.clone());
            format(&mut e, "mem", Uuid128(1), CHUNK).expect("format");
            let clock: SharedClock = Arc::new(ManualClock::new());
            let (core, _) = DeviceCore::open(
                MemEngine::new(image),
                "mem",
                Some(Uuid128(1)),
                clock,
                CoreConfig::default(),
                DeviceMetrics::unregistered(&format!("mem{i}")),
            )
            .expect("open");
            let chunks_total = core.superblock().geometry.chunk_count;
            let (handle, _join) = spawn_device(format!("mem{i}"), core, 64).expect("spawn");
            devices.push(Device {
                handle,
                path: format!("mem{i}"),
                chunks_total,
            });
        }
        let metrics = SledMetrics::new(&prometheus::Registry::new()).expect("metrics");
        let key = ClusterKey::from_bytes([7; 32]);
        Sled::new(Uuid128(1), key, CHUNK, devices, metrics, None).await
    }

    /// A write queued on the device behind a free of its chunk allocates the chunk again there.
    /// The free must not then drop the chunk from the catalog: reads would go to the other
    /// device and see zeros, and the next write would allocate the chunk a second time there.
    #[tokio::test]
    async fn a_write_queued_behind_a_free_keeps_its_chunk_where_it_is() {
        let sled = two_device_sled().await;
        let cred = sled.key().mint(V, Epoch(1), NodeId(1));
        sled.claim(&cred).await.expect("claim");
        // Chunk 100 takes device 0, so the chunks below go to device 1.
        sled.write(
            &cred,
            ChunkIndex(100),
            0,
            crate::engine::mem::filled(4096, 1),
        )
        .await
        .expect("write");
        let mut raced = 0;
        for c in 0..5 {
            let chunk = ChunkIndex(c);
            sled.write(&cred, chunk, 0, crate::engine::mem::filled(4096, 2))
                .await
                .expect("first write");
            assert_eq!(sled.locate(V, chunk), Some(1));
            let free = sled.free(&cred, chunk);
            tokio::pin!(free);
            // One poll queues the free on device 1; it then waits for the device's answer.
            let pending = tokio::select! {
                biased;
                r = &mut free => { r.expect("free"); false }
                () = std::future::ready(()) => true,
            };
            sled.write(&cred, chunk, 4096, crate::engine::mem::filled(4096, 3))
                .await
                .expect("write behind the free");
            if pending {
                free.await.expect("free");
                raced += 1;
            }
            let read = sled.read(V, chunk, 0, 8192).await.expect("read");
            assert!(read[..4096].iter().all(|&b| b == 0), "freed data is gone");
            assert!(
                read[4096..].iter().all(|&b| b == 3),
                "the later write reads back"
            );
            assert_eq!(sled.locate(V, chunk), Some(1));
            let statuses = sled.statuses().await;
            let holders: Vec<usize> = (0..2)
                .filter(|&d| statuses[d].chunks.contains(&(V, chunk)))
                .collect();
            assert_eq!(
                holders,
                [1],
                "the chunk is held once, where the catalog says"
            );
            // Leave device 1 with the most free chunks for the next round.
            sled.free(&cred, chunk).await.expect("free");
        }
        assert!(
            raced > 0,
            "no free was ever still queued when the write was sent"
        );
    }

    /// A first write whose chunk is allocated and which is then refused because a newer claim
    /// arrived meanwhile leaves the chunk on its device: the catalog must keep it there, or the
    /// new holder's write allocates it a second time on the other device (and a restart then
    /// picks one of the two copies).
    #[tokio::test]
    async fn a_first_write_fenced_after_its_allocation_keeps_its_chunk_where_it_is() {
        let sled = two_device_sled().await;
        let old = sled.key().mint(V, Epoch(1), NodeId(1));
        let new = sled.key().mint(V, Epoch(2), NodeId(2));
        sled.claim(&old).await.expect("claim");
        // Chunk 100 takes device 0, so chunk 0 goes to device 1.
        sled.write(
            &old,
            ChunkIndex(100),
            0,
            crate::engine::mem::filled(4096, 1),
        )
        .await
        .expect("write");
        let write = sled.write(&old, ChunkIndex(0), 0, crate::engine::mem::filled(4096, 2));
        tokio::pin!(write);
        // One poll routes the write and queues it on device 1 (it starts allocating there).
        let done = tokio::select! {
            biased;
            r = &mut write => Some(r),
            () = std::future::ready(()) => None,
        };
        assert!(done.is_none(), "the first write finished at once");
        sled.claim(&new).await.expect("newer claim");
        let r = write.await;
        let held = sled.statuses().await[1]
            .chunks
            .contains(&(V, ChunkIndex(0)));
        if held {
            assert_eq!(
                sled.locate(V, ChunkIndex(0)),
                Some(1),
                "the catalog forgot a chunk device 1 holds (the write ended {r:?})"
            );
        }
        sled.write(
            &new,
            ChunkIndex(0),
            4096,
            crate::engine::mem::filled(4096, 3),
        )
        .await
        .expect("the new holder's write");
        let statuses = sled.statuses().await;
        let holders: Vec<usize> = (0..2)
            .filter(|&d| statuses[d].chunks.contains(&(V, ChunkIndex(0))))
            .collect();
        assert_eq!(
            holders,
            [1],
            "the chunk is held once (the old write ended {r:?})"
        );
    }

    /// A first write to a chunk pins it to a device before the device answers; a refusal that
    /// allocated nothing must drop the pin, or a client sending refused writes (with a valid
    /// credential) grows the catalog and skews placement without bound.
    #[tokio::test]
    async fn a_refused_first_write_leaves_no_pin_behind() {
        let sled = two_device_sled().await;
        let cred = sled.key().mint(V, Epoch(1), NodeId(1));
        sled.claim(&cred).await.expect("claim");
        for chunk in 0..5 {
            let r = sled
                .write(&cred, ChunkIndex(chunk), 512, AlignedBuf::zeroed(4096))
                .await;
            assert!(r.is_err(), "an unaligned write is refused");
            let r = sled
                .write(&cred, ChunkIndex(chunk), CHUNK, AlignedBuf::zeroed(4096))
                .await;
            assert!(r.is_err(), "a write past the chunk is refused");
        }
        {
            let cat = sled.catalog();
            assert!(cat.where_.is_empty(), "pins left: {:?}", cat.where_);
            assert_eq!(cat.used, [0, 0]);
        }
        sled.write(&cred, ChunkIndex(0), 0, AlignedBuf::zeroed(4096))
            .await
            .expect("a good write");
        let cat = sled.catalog();
        assert_eq!(cat.where_.len(), 1);
        assert_eq!(cat.used.iter().sum::<u64>(), 1);
    }

    /// Opens (formatting when `fresh`) the uring devices at `paths` and builds a sled on them,
    /// driven from the event loop or by device threads.
    async fn uring_sled(
        paths: &[std::path::PathBuf],
        fresh: bool,
        event_loop: bool,
    ) -> (Sled, Vec<tokio::task::JoinHandle<()>>) {
        use crate::engine::devfile::DevFile;
        use crate::engine::uring::UringEngine;
        let mut devices = Vec::new();
        let mut tasks = Vec::new();
        for (i, path) in paths.iter().enumerate() {
            let dev = DevFile::open(path, Some(64 << 20)).expect("device file");
            let mut engine = UringEngine::new(dev, 64).expect("ring");
            if fresh {
                format(&mut engine, "dev", Uuid128(1), CHUNK).expect("format");
            }
            let clock: SharedClock = Arc::new(ManualClock::new());
            let name = format!("dev{i}");
            let (core, _) = DeviceCore::open(
                engine,
                &name,
                Some(Uuid128(1)),
                clock,
                CoreConfig::default(),
                DeviceMetrics::unregistered(&name),
            )
            .expect("open");
            let chunks_total = core.superblock().geometry.chunk_count;
            let handle = if event_loop {
                let (handle, task) =
                    crate::device::thread::spawn_device_task(name.clone(), core, 64)
                        .expect("spawn task");
                tasks.push(task);
                handle
            } else {
                let (handle, join) = spawn_device(name.clone(), core, 64).expect("spawn");
                tasks.push(tokio::task::spawn_blocking(move || drop(join.join())));
                handle
            };
            devices.push(Device {
                handle,
                path: name,
                chunks_total,
            });
        }
        let metrics = SledMetrics::new(&prometheus::Registry::new()).expect("metrics");
        let key = ClusterKey::from_bytes([7; 32]);
        (
            Sled::new(Uuid128(1), key, CHUNK, devices, metrics, None).await,
            tasks,
        )
    }

    /// Block `b` of the test pattern: every byte derived from the block's number.
    fn pattern(b: u64) -> AlignedBuf {
        crate::engine::mem::filled(4096, (b % 251) as u8 + 1)
    }

    /// Two devices on real files, each driven from the test's event loop (the sled's default):
    /// a burst of writes and then of reads many times larger than a reply slice, all in flight
    /// at once, each answered with its own data; stopping writes the checksums back, and the
    /// devices reopen under device threads with every block intact.
    #[tokio::test]
    async fn devices_driven_from_the_event_loop_answer_bursts_and_reopen_intact() {
        let dir = crate::engine::tests::scratch_dir();
        let paths = [dir.path().join("a.img"), dir.path().join("b.img")];
        const BLOCKS: u64 = 256;
        let place = |b: u64| (ChunkIndex(b % 5), (b / 5) * 4096 * 3);
        let (sled, tasks) = uring_sled(&paths, true, true).await;
        let cred = sled.key().mint(V, Epoch(1), NodeId(1));
        sled.claim(&cred).await.expect("claim");
        let writes = (0..BLOCKS).map(|b| {
            let (chunk, off) = place(b);
            sled.write(&cred, chunk, off, pattern(b))
        });
        for r in futures_util::future::join_all(writes).await {
            r.expect("write");
        }
        let reads = (0..BLOCKS).map(|b| {
            let (chunk, off) = place(b);
            sled.read(V, chunk, off, 4096)
        });
        for (b, r) in futures_util::future::join_all(reads)
            .await
            .into_iter()
            .enumerate()
        {
            assert_eq!(&r.expect("read")[..], &pattern(b as u64)[..], "block {b}");
        }
        drop(sled);
        for t in tasks {
            t.await.expect("device task");
        }

        let (sled, tasks) = uring_sled(&paths, false, false).await;
        for b in 0..BLOCKS {
            let (chunk, off) = place(b);
            let got = sled
                .read(V, chunk, off, 4096)
                .await
                .expect("read after reopen");
            assert_eq!(&got[..], &pattern(b)[..], "block {b} after reopen");
        }
        drop(sled);
        for t in tasks {
            t.await.expect("device thread");
        }
    }
}
