//! An in-memory engine, with an optional crash model.
//!
//! The image is sparse (4 KiB blocks in a map) and shared through [`MemImage`], so a test can cut
//! the power and open a new engine on what survived.
//!
//! **Plain mode** behaves like an ideal device: operations complete at submission, in order, and
//! are durable at once.
//!
//! **Crash model** ([`MemEngine::crash_model`]) behaves like a device with a volatile write cache,
//! driven by a seeded RNG so every run is reproducible:
//! * operations complete in a random order, a random number at a time;
//! * a completed write without `dsync` (and a zeroing) is *volatile*: readable, but lost on a power
//!   cut unless an `Fsync` submitted after its completion has completed (if a later write to the
//!   same block completed in between, that one is made durable in its place: a cache flush writes
//!   what the cache holds when it runs, and either way the block is that write or a newer one);
//! * [`MemImage::power_cut`] drops each volatile block with probability ½ (a cache may have
//!   written some back), and for each write still in flight applies all, none or a torn prefix of
//!   its 512-byte sectors.

use super::{Completion, DeviceKind, Doorbell, IoEngine, Op, OpKind};
use common::AlignedBuf;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

const BLOCK: u64 = 4096;
const SECTOR: usize = 512;

#[derive(Debug, Default)]
struct ImageState {
    size: u64,
    /// What survives a power cut.
    durable: HashMap<u64, Box<[u8]>>,
    /// Completed but not yet durable: block → (data, version).
    volatile: HashMap<u64, (Box<[u8]>, u64)>,
    version: u64,
    /// Writes submitted and not completed, by op id: what a power cut may tear.
    in_flight: HashMap<u64, (u64, Box<[u8]>)>,
    /// Bumped by a power cut; engines of an older generation fail every operation.
    generation: u64,
    rng: Option<ChaCha8Rng>,
    /// Fsyncs still to fail (fault injection), leaving what they covered volatile.
    failing_fsyncs: u32,
    /// `RWF_DSYNC` writes still to fail (fault injection; table pages are always written so).
    failing_dsync_writes: u32,
    /// `RWF_DSYNC` writes still to tear: the first 4 KiB lands, then the write fails.
    tearing_dsync_writes: u32,
    /// Byte ranges `[start, end)` every read touching which fails with `EIO` (bad sectors).
    unreadable: Vec<(u64, u64)>,
}

/// A sparse in-memory device image shared by engines.
#[derive(Debug, Clone)]
pub struct MemImage(Arc<Mutex<ImageState>>);

impl MemImage {
    /// An all-zero image of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self(Arc::new(Mutex::new(ImageState {
            size: size & !(BLOCK - 1),
            ..Default::default()
        })))
    }

    fn lock(&self) -> MutexGuard<'_, ImageState> {
        // A panic while holding the lock leaves plain data, still usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads what the image holds now (volatile data included), for assertions.
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let st = self.lock();
        let mut out = vec![0u8; len];
        read_into(&st, offset, &mut out);
        out
    }

    /// Makes the next `n` writes with `RWF_DSYNC` land their first 4 KiB only, then fail with
    /// `EIO` (a device error in the middle of a write).
    pub fn tear_dsync_writes(&self, n: u32) {
        self.lock().tearing_dsync_writes = n;
    }

    /// Makes the next `n` writes with `RWF_DSYNC` fail with `EIO`, writing nothing.
    pub fn fail_dsync_writes(&self, n: u32) {
        self.lock().failing_dsync_writes = n;
    }

    /// Makes every read that touches `len` bytes at `offset` fail with `EIO`, as a bad sector
    /// does, until the range is written.
    pub fn make_unreadable(&self, offset: u64, len: u64) {
        self.lock()
            .unreadable
            .push((offset, offset.saturating_add(len)));
    }

    /// Makes the next `n` fsyncs fail with `EIO` (what they would cover stays volatile).
    pub fn fail_fsyncs(&self, n: u32) {
        self.lock().failing_fsyncs = n;
    }

    /// Simulates a power cut with a seeded RNG: volatile blocks survive with probability ½ and
    /// in-flight writes land fully, not at all, or torn at a sector boundary. Engines opened
    /// before the cut fail from now on.
    pub fn power_cut(&self, seed: u64) {
        let mut st = self.lock();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let volatile: Vec<(u64, Box<[u8]>)> =
            st.volatile.drain().map(|(b, (d, _))| (b, d)).collect();
        for (block, data) in volatile {
            if rng.gen_bool(0.5) {
                put_block(&mut st.durable, block, &data);
            }
        }
        let in_flight: Vec<(u64, Box<[u8]>)> = st.in_flight.drain().map(|(_, v)| v).collect();
        for (offset, data) in in_flight {
            let sectors = data.len() / SECTOR;
            let keep = match rng.gen_range(0..3) {
                0 => 0,
                1 => sectors,
                _ => rng.gen_range(0..=sectors),
            };
            let mut st_durable = std::mem::take(&mut st.durable);
            write_range(&mut st_durable, offset, &data[..keep * SECTOR]);
            st.durable = st_durable;
        }
        st.generation += 1;
    }
}

fn put_block(map: &mut HashMap<u64, Box<[u8]>>, block: u64, data: &[u8]) {
    if data.iter().all(|&b| b == 0) {
        map.remove(&block);
    } else {
        map.insert(block, data.into());
    }
}

/// Writes bytes at a byte offset into a block map (read-modify-write of partial blocks).
fn write_range(map: &mut HashMap<u64, Box<[u8]>>, offset: u64, data: &[u8]) {
    let mut pos = 0usize;
    while pos < data.len() {
        let abs = offset + pos as u64;
        let block = abs / BLOCK;
        let within = (abs % BLOCK) as usize;
        let n = (BLOCK as usize - within).min(data.len() - pos);
        let mut cur = map
            .get(&block)
            .map(|b| b.to_vec())
            .unwrap_or_else(|| vec![0; BLOCK as usize]);
        cur[within..within + n].copy_from_slice(&data[pos..pos + n]);
        put_block(map, block, &cur);
        pos += n;
    }
}

fn read_into(st: &ImageState, offset: u64, out: &mut [u8]) {
    for (i, chunk) in out.chunks_mut(BLOCK as usize).enumerate() {
        let block = offset / BLOCK + i as u64;
        if let Some((d, _)) = st.volatile.get(&block) {
            chunk.copy_from_slice(&d[..chunk.len()]);
        } else if let Some(d) = st.durable.get(&block) {
            chunk.copy_from_slice(&d[..chunk.len()]);
        } else {
            chunk.fill(0);
        }
    }
}

#[derive(Debug)]
struct Pending {
    op: Op,
    id: u64,
    /// For an fsync: the volatile versions it covers (those completed before it was submitted).
    covers: Vec<(u64, u64)>,
}

/// The in-memory engine.
#[derive(Debug)]
pub struct MemEngine {
    image: MemImage,
    crash: bool,
    generation: u64,
    pending: Vec<Pending>,
    next_id: u64,
    cap: usize,
}

impl MemEngine {
    /// A plain engine: in-order, immediately durable.
    pub fn new(image: MemImage) -> Self {
        let generation = image.lock().generation;
        Self {
            image,
            crash: false,
            generation,
            pending: Vec::new(),
            next_id: 0,
            cap: 64,
        }
    }

    /// A crash-model engine whose completion order and batching come from `seed`.
    pub fn crash_model(image: MemImage, seed: u64) -> Self {
        {
            let mut st = image.lock();
            st.rng = Some(ChaCha8Rng::seed_from_u64(seed));
        }
        Self {
            crash: true,
            ..Self::new(image)
        }
    }

    /// The shared image.
    pub fn image(&self) -> &MemImage {
        &self.image
    }

    fn complete(&self, st: &mut ImageState, p: Pending) -> Completion {
        let Pending { op, id, covers } = p;
        st.in_flight.remove(&id);
        if st.generation != self.generation {
            return Completion {
                tag: op.tag,
                result: Err(io::Error::other("device lost power")),
                buf: None,
            };
        }
        let (result, buf) = match op.kind {
            OpKind::Read { mut buf, offset } => {
                let end = offset + buf.len() as u64;
                if end > st.size {
                    (Err(io::Error::from_raw_os_error(libc::EINVAL)), Some(buf))
                } else if st.unreadable.iter().any(|&(s, e)| offset < e && s < end) {
                    (Err(io::Error::from_raw_os_error(libc::EIO)), Some(buf))
                } else {
                    read_into(st, offset, &mut buf);
                    (Ok(buf.len()), Some(buf))
                }
            }
            OpKind::Write {
                buf, dsync: true, ..
            } if st.failing_dsync_writes > 0 => {
                st.failing_dsync_writes -= 1;
                (Err(io::Error::from_raw_os_error(libc::EIO)), Some(buf))
            }
            OpKind::Write {
                buf,
                offset,
                dsync: true,
            } if st.tearing_dsync_writes > 0 && offset + buf.len() as u64 <= st.size => {
                st.tearing_dsync_writes -= 1;
                let first = buf.len().min(BLOCK as usize);
                apply_write(st, offset, &buf[..first], true);
                (Err(io::Error::from_raw_os_error(libc::EIO)), Some(buf))
            }
            OpKind::Write { buf, offset, dsync } => {
                let end = offset + buf.len() as u64;
                if end > st.size {
                    (Err(io::Error::from_raw_os_error(libc::EINVAL)), Some(buf))
                } else {
                    // A written sector is readable again (the device remapped it).
                    st.unreadable.retain(|&(s, e)| !(offset <= s && e <= end));
                    apply_write(st, offset, &buf, dsync || !self.crash);
                    (Ok(buf.len()), Some(buf))
                }
            }
            OpKind::Fsync if st.failing_fsyncs > 0 => {
                st.failing_fsyncs -= 1;
                (Err(io::Error::from_raw_os_error(libc::EIO)), None)
            }
            OpKind::Fsync => {
                for (block, version) in covers {
                    if let Some((_, v)) = st.volatile.get(&block)
                        && *v >= version
                    {
                        let (d, _) = st.volatile.remove(&block).expect("checked present");
                        put_block(&mut st.durable, block, &d);
                    }
                }
                (Ok(0), None)
            }
            OpKind::ZeroRange { offset, len } => {
                if offset + len > st.size {
                    (Err(io::Error::from_raw_os_error(libc::EINVAL)), None)
                } else {
                    let zeros = vec![0u8; len as usize];
                    apply_write(st, offset, &zeros, !self.crash);
                    (Ok(0), None)
                }
            }
        };
        Completion {
            tag: op.tag,
            result,
            buf,
        }
    }
}

fn apply_write(st: &mut ImageState, offset: u64, data: &[u8], durable: bool) {
    if durable {
        for (i, _) in data.chunks(BLOCK as usize).enumerate() {
            st.volatile.remove(&(offset / BLOCK + i as u64));
        }
        let mut d = std::mem::take(&mut st.durable);
        write_range(&mut d, offset, data);
        st.durable = d;
    } else {
        for (i, chunk) in data.chunks(BLOCK as usize).enumerate() {
            st.version += 1;
            let v = st.version;
            st.volatile
                .insert(offset / BLOCK + i as u64, (chunk.into(), v));
        }
    }
}

impl IoEngine for MemEngine {
    fn size(&self) -> u64 {
        self.image.lock().size
    }

    fn capacity(&self) -> usize {
        self.cap
    }

    fn in_flight(&self) -> usize {
        self.pending.len()
    }

    fn kind(&self) -> DeviceKind {
        DeviceKind::Mem
    }

    fn submit(&mut self, op: Op) -> Result<(), Op> {
        if self.pending.len() >= self.cap {
            return Err(op);
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut st = self.image.lock();
        let covers = match &op.kind {
            OpKind::Fsync => st.volatile.iter().map(|(b, (_, v))| (*b, *v)).collect(),
            _ => Vec::new(),
        };
        if let OpKind::Write { buf, offset, .. } = &op.kind {
            st.in_flight.insert(id, (*offset, (&buf[..]).into()));
        }
        drop(st);
        self.pending.push(Pending { op, id, covers });
        Ok(())
    }

    fn poll(
        &mut self,
        wait: Option<Duration>,
        doorbell: &Doorbell,
        out: &mut Vec<Completion>,
    ) -> io::Result<()> {
        if self.pending.is_empty() {
            if let Some(d) = wait {
                doorbell.wait(d.as_millis().min(i32::MAX as u128) as i32);
            }
            return Ok(());
        }
        let mut st = self.image.lock();
        if !self.crash {
            for p in std::mem::take(&mut self.pending) {
                out.push(self.complete(&mut st, p));
            }
            return Ok(());
        }
        // Crash model: complete a random, non-empty (when waiting) subset in random order.
        let mut rng = st
            .rng
            .take()
            .unwrap_or_else(|| ChaCha8Rng::seed_from_u64(0));
        let min = usize::from(wait.is_some());
        let n = rng.gen_range(min..=self.pending.len());
        for _ in 0..n {
            let i = rng.gen_range(0..self.pending.len());
            let p = self.pending.swap_remove(i);
            out.push(self.complete(&mut st, p));
        }
        st.rng = Some(rng);
        Ok(())
    }
}

/// Convenience: an aligned buffer filled with one byte.
pub fn filled(len: usize, byte: u8) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(len);
    b.fill(byte);
    b
}

impl MemImage {
    /// Overwrites bytes durably, behind the engine's back (tests use it to corrupt a device).
    pub fn write_durable(&self, offset: u64, data: &[u8]) {
        let mut st = self.lock();
        let mut d = std::mem::take(&mut st.durable);
        write_range(&mut d, offset, data);
        st.durable = d;
        for (i, _) in data.chunks(BLOCK as usize).enumerate() {
            st.volatile.remove(&(offset / BLOCK + i as u64));
        }
    }
}
