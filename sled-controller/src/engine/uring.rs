//! The io_uring engine: one ring per device, driven by the device's own thread.
//!
//! The device file is registered with the ring (fixed file 0) so the kernel skips the per-op file
//! lookup. The sled's buffer region ([`BufPool`]) is registered too (fixed buffer 0, see
//! [`UringEngine::register_pool`]): a read or write whose buffer lies inside it goes out as
//! `READ_FIXED`/`WRITE_FIXED`, so the kernel does not pin and unpin its pages per operation; any
//! other buffer (larger than the pool's classes, or allocated when the pool was used up) goes
//! out as a plain `READ`/`WRITE`. The doorbell eventfd is watched with a one-shot `POLL_ADD` kept
//! armed in the ring, so a blocking wait returns as soon as a request is queued or the queue
//! closes. Short reads and
//! writes (possible on some file systems near holes) are resubmitted for the remainder, so the
//! caller only ever sees whole operations or errors.

use super::devfile::DevFile;
use super::{Completion, DeviceKind, Doorbell, IoEngine, Op, OpKind};
use common::aligned::BufPool;
use io_uring::{IoUring, opcode, types};
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// User data of doorbell polls: this plus the doorbell's id (slots are small indices).
const DOORBELL_TAG: u64 = 1 << 62;

/// An operation the kernel holds, with its progress.
#[derive(Debug)]
struct InFlight {
    tag: u64,
    kind: OpKind,
    done: usize,
}

/// io_uring engine over an `O_DIRECT` device file.
pub struct UringEngine {
    ring: IoUring,
    dev: DevFile,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    /// The doorbell whose poll is armed in the ring (a poll armed on another doorbell, such as
    /// one used while opening the device, would never wake the device thread).
    doorbell_armed: Option<u64>,
    /// The buffer region registered as fixed buffer 0 (held so it outlives the ring).
    pool: Option<BufPool>,
    /// Reads and writes submitted with the registered buffer.
    fixed_ops: u64,
    /// Entries pushed since the last successful submission.
    queued: bool,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("kind", &self.dev.kind)
            .field("size", &self.dev.size)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl UringEngine {
    /// Builds a ring of `depth` entries over an open device.
    pub fn new(dev: DevFile, depth: u32) -> io::Result<Self> {
        let depth = depth.clamp(2, 4096);
        // One submission slot stays free for the doorbell poll.
        let ring = IoUring::builder().setup_cqsize(depth * 2).build(depth)?;
        ring.submitter().register_files(&[dev.file.as_raw_fd()])?;
        let cap = depth as usize - 1;
        Ok(Self {
            ring,
            dev,
            slots: (0..cap).map(|_| None).collect(),
            free: (0..cap).rev().collect(),
            in_flight: 0,
            doorbell_armed: None,
            pool: None,
            fixed_ops: 0,
            queued: false,
        })
    }

    /// Registers `pool`'s region with the ring as fixed buffer 0; from then on reads and writes
    /// of buffers inside it use `READ_FIXED`/`WRITE_FIXED`. Fails (leaving the engine as it was)
    /// when the kernel refuses, e.g. over the locked-memory limit of an unprivileged process.
    pub fn register_pool(&mut self, pool: &BufPool) -> io::Result<()> {
        if self.pool.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a buffer region is already registered",
            ));
        }
        let (base, len) = pool.region();
        let iov = libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        };
        // SAFETY: the region stays allocated and at the same address while self.pool holds a
        // reference to it, which lasts as long as the ring (both are dropped with self, the ring
        // first since it is declared first; the kernel keeps its own page pins until then).
        unsafe { self.ring.submitter().register_buffers(&[iov])? };
        self.pool = Some(pool.clone());
        Ok(())
    }

    /// Reads and writes submitted with the registered buffer so far.
    pub fn fixed_ops(&self) -> u64 {
        self.fixed_ops
    }

    fn sqe_for(&mut self, slot: usize, f: &InFlight) -> io_uring::squeue::Entry {
        let fd = types::Fixed(0);
        let user = slot as u64;
        match &f.kind {
            OpKind::Read { buf, offset } => {
                let rest = buf.len() - f.done;
                // SAFETY: done < len, so the pointer stays inside the buffer's allocation.
                let ptr = unsafe { buf.as_ptr().add(f.done) } as *mut u8;
                let offset = offset + f.done as u64;
                if self.pool.as_ref().is_some_and(|p| p.contains(ptr, rest)) {
                    self.fixed_ops += 1;
                    opcode::ReadFixed::new(fd, ptr, rest as u32, 0)
                        .offset(offset)
                        .build()
                        .user_data(user)
                } else {
                    opcode::Read::new(fd, ptr, rest as u32)
                        .offset(offset)
                        .build()
                        .user_data(user)
                }
            }
            OpKind::Write { buf, offset, dsync } => {
                let rest = buf.len() - f.done;
                // SAFETY: done < len, so the pointer stays inside the buffer's allocation.
                let ptr = unsafe { buf.as_ptr().add(f.done) };
                let offset = offset + f.done as u64;
                let flags = if *dsync { libc::RWF_DSYNC } else { 0 };
                if self.pool.as_ref().is_some_and(|p| p.contains(ptr, rest)) {
                    self.fixed_ops += 1;
                    opcode::WriteFixed::new(fd, ptr, rest as u32, 0)
                        .offset(offset)
                        .rw_flags(flags)
                        .build()
                        .user_data(user)
                } else {
                    opcode::Write::new(fd, ptr, rest as u32)
                        .offset(offset)
                        .rw_flags(flags)
                        .build()
                        .user_data(user)
                }
            }
            OpKind::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(user),
            // A file punches a hole; a block device zeroes the range (the kernel's
            // `blkdev_fallocate`: an offloaded write-zeroes where the device has one, written
            // zeros otherwise — BLKZEROOUT's work, but in the ring's worker, not this thread,
            // so zeroing a 64 MiB chunk does not stall every other request of the device).
            OpKind::ZeroRange { offset, len } => {
                let mode = if self.dev.kind == DeviceKind::Block {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                };
                opcode::Fallocate::new(fd, *len)
                    .offset(*offset)
                    .mode(mode)
                    .build()
                    .user_data(user)
            }
        }
    }

    fn push(&mut self, sqe: &io_uring::squeue::Entry) -> bool {
        // SAFETY: the entry's buffers live in self.slots (heap memory owned by the AlignedBuf,
        // which does not move when the slot vector is reallocated) until the completion for this
        // user_data is reaped; the registered file stays open for the ring's life.
        let pushed = unsafe { self.ring.submission().push(sqe).is_ok() };
        self.queued |= pushed;
        pushed
    }

    fn arm_doorbell(&mut self, doorbell: &Doorbell) {
        if self.doorbell_armed == Some(doorbell.id()) {
            return;
        }
        let sqe = opcode::PollAdd::new(types::Fd(doorbell.raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(DOORBELL_TAG + doorbell.id());
        // SAFETY: a poll entry references no memory; the eventfd outlives the wait because the
        // caller holds it across poll().
        if unsafe { self.ring.submission().push(&sqe).is_ok() } {
            self.doorbell_armed = Some(doorbell.id());
        }
    }

    fn reap(&mut self, doorbell: &Doorbell, out: &mut Vec<Completion>) {
        let mut resubmit = Vec::new();
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (user, res) in cqes {
            if user >= DOORBELL_TAG {
                // A doorbell poll fired (possibly one armed for an older doorbell).
                if self.doorbell_armed == Some(user - DOORBELL_TAG) {
                    self.doorbell_armed = None;
                }
                doorbell.clear();
                continue;
            }
            let slot = user as usize;
            let Some(mut f) = self.slots.get_mut(slot).and_then(Option::take) else {
                tracing::error!(slot, "io_uring completion for an empty slot");
                continue;
            };
            let total = match &f.kind {
                OpKind::Read { buf, .. } | OpKind::Write { buf, .. } => buf.len(),
                _ => 0,
            };
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else if total > 0 {
                let n = res as usize;
                if n == 0 {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "{} returned 0 bytes at {} of {total}",
                            f.kind.name(),
                            f.done
                        ),
                    ))
                } else if f.done + n < total {
                    f.done += n;
                    resubmit.push((slot, f));
                    continue;
                } else {
                    Ok(total)
                }
            } else {
                Ok(0)
            };
            self.free.push(slot);
            self.in_flight -= 1;
            let buf = match f.kind {
                OpKind::Read { buf, .. } | OpKind::Write { buf, .. } => Some(buf),
                _ => None,
            };
            out.push(Completion {
                tag: f.tag,
                result,
                buf,
            });
        }
        for (slot, f) in resubmit {
            let sqe = self.sqe_for(slot, &f);
            self.slots[slot] = Some(f);
            // The slot was just freed by its completion, so the queue has room.
            if !self.push(&sqe) {
                tracing::error!(slot, "submission queue full on resubmit");
            }
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The kernel may still write into buffers owned by in-flight slots: wait for every
        // operation before they are freed.
        while self.in_flight > 0 {
            if let Err(e) = self.ring.submit_and_wait(1)
                && e.raw_os_error() != Some(libc::EINTR)
            {
                tracing::error!(error = %e, "io_uring wait during drop; leaking buffers");
                for s in &mut self.slots {
                    if let Some(f) = s.take() {
                        std::mem::forget(f);
                    }
                }
                return;
            }
            let done: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for user in done {
                if user < DOORBELL_TAG
                    && self
                        .slots
                        .get_mut(user as usize)
                        .and_then(Option::take)
                        .is_some()
                {
                    self.in_flight -= 1;
                }
            }
        }
    }
}

impl IoEngine for UringEngine {
    fn size(&self) -> u64 {
        self.dev.size
    }

    fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn kind(&self) -> DeviceKind {
        self.dev.kind
    }

    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.ring.as_raw_fd())
    }

    fn unsubmitted(&self) -> bool {
        self.queued
    }

    fn submit(&mut self, op: Op) -> Result<(), Op> {
        let Some(slot) = self.free.pop() else {
            return Err(op);
        };
        let f = InFlight {
            tag: op.tag,
            kind: op.kind,
            done: 0,
        };
        let sqe = self.sqe_for(slot, &f);
        self.slots[slot] = Some(f);
        if !self.push(&sqe) {
            // Cannot happen (capacity < ring size), but hand the op back rather than lose it.
            let f = self.slots[slot].take().expect("slot just filled");
            self.free.push(slot);
            return Err(Op {
                tag: f.tag,
                kind: f.kind,
            });
        }
        self.in_flight += 1;
        Ok(())
    }

    fn poll(
        &mut self,
        wait: Option<Duration>,
        doorbell: &Doorbell,
        out: &mut Vec<Completion>,
    ) -> io::Result<()> {
        let block = wait.filter(|_| out.is_empty());
        if block.is_some() {
            self.arm_doorbell(doorbell);
        }
        let res = match block {
            Some(d) => {
                let ts = types::Timespec::from(d);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit(),
        };
        match res {
            Ok(_) => self.queued = false,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        self.reap(doorbell, out);
        Ok(())
    }
}
