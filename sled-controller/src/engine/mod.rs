//! The I/O seam: submit an operation with a tag, later collect its completion.
//!
//! Three engines implement [`IoEngine`] and run the same test suite:
//! * [`uring::UringEngine`] — io_uring on a file or block device opened `O_DIRECT`; the production
//!   engine.
//! * [`sync::SyncEngine`] — `pread`/`pwrite` on the same kind of file descriptor; a fallback for
//!   kernels without io_uring and a reference to compare against.
//! * [`mem::MemEngine`] — a sparse in-memory image. Its crash mode
//!   ([`mem::MemEngine::crash_model`]) completes operations in a seeded random order, keeps writes
//!   volatile until they are made durable, and on a simulated power cut drops every volatile write
//!   and may tear a write that was in flight. It is what proves the device layout crash-safe.
//!
//! A full submission queue is back-pressure: [`IoEngine::submit`] hands the operation back and
//! the caller retries after the next completion.

pub mod devfile;
pub mod mem;
pub mod sync;
pub mod uring;

use common::AlignedBuf;
use std::fmt;
use std::io;
use std::time::Duration;

/// One operation. Buffers are moved in and handed back in the [`Completion`], so they stay alive
/// (and unaliased) while the kernel uses them.
#[derive(Debug)]
pub enum OpKind {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read {
        /// Destination (aligned; length a multiple of 4 KiB).
        buf: AlignedBuf,
        /// Device offset (4 KiB aligned).
        offset: u64,
    },
    /// Write `buf` at `offset`. With `dsync`, the data is durable when the operation completes.
    Write {
        /// Source (aligned; length a multiple of 4 KiB).
        buf: AlignedBuf,
        /// Device offset (4 KiB aligned).
        offset: u64,
        /// Durable at completion (`RWF_DSYNC`).
        dsync: bool,
    },
    /// Make every completed write durable (`fdatasync`).
    Fsync,
    /// Make a range read as zeros (punch a hole in a file, `BLKZEROOUT` on a block device). Not
    /// durable until a following [`OpKind::Fsync`].
    ZeroRange {
        /// Device offset (4 KiB aligned).
        offset: u64,
        /// Length (4 KiB aligned).
        len: u64,
    },
}

impl OpKind {
    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            OpKind::Read { .. } => "read",
            OpKind::Write { .. } => "write",
            OpKind::Fsync => "fsync",
            OpKind::ZeroRange { .. } => "zero_range",
        }
    }
}

/// An operation with the caller's tag.
#[derive(Debug)]
pub struct Op {
    /// Echoed in the completion.
    pub tag: u64,
    /// What to do.
    pub kind: OpKind,
}

/// The result of an operation.
#[derive(Debug)]
pub struct Completion {
    /// The tag given at submission.
    pub tag: u64,
    /// Bytes transferred (reads and writes) or 0, or the error.
    pub result: io::Result<usize>,
    /// The buffer of a read or write, handed back.
    pub buf: Option<AlignedBuf>,
}

/// An I/O engine: one per device, driven from one thread.
pub trait IoEngine: Send + fmt::Debug {
    /// Size of the device in bytes.
    fn size(&self) -> u64;

    /// How many operations may be in flight at once.
    fn capacity(&self) -> usize;

    /// Operations submitted and not yet collected.
    fn in_flight(&self) -> usize;

    /// Queues an operation. `Err(op)` when the engine is full: back-pressure, not an error; retry
    /// after collecting a completion.
    fn submit(&mut self, op: Op) -> Result<(), Op>;

    /// Pushes queued operations to the device and collects finished ones into `out`. With
    /// `wait`, blocks up to that long until at least one operation finishes or the doorbell
    /// rings (see [`Doorbell`]); without, returns at once.
    fn poll(
        &mut self,
        wait: Option<Duration>,
        doorbell: &Doorbell,
        out: &mut Vec<Completion>,
    ) -> io::Result<()>;

    /// The device's kind, for choosing how to discard and for logs.
    fn kind(&self) -> DeviceKind;

    /// A descriptor that polls readable while completions wait to be collected, for a driver
    /// that waits in an event loop instead of in [`IoEngine::poll`]; `None` when the engine
    /// completes operations without the kernel's help.
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// Whether operations were queued since the last [`IoEngine::poll`] pushed them to the device
    /// (such a driver must poll again before it waits).
    fn unsubmitted(&self) -> bool {
        false
    }
}

/// What backs an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A regular file (trim = punched hole).
    File,
    /// A block device (trim = `BLKZEROOUT`).
    Block,
    /// Memory.
    Mem,
}

/// An eventfd that wakes a device thread blocked in [`IoEngine::poll`]: rung when a request is
/// queued while the thread sleeps, and when the request queue closes (otherwise the thread would
/// never notice and shutdown would hang).
#[derive(Debug)]
pub struct Doorbell {
    fd: std::os::fd::OwnedFd,
    id: u64,
}

/// Source of doorbell identities (file descriptor numbers are reused, identities are not).
static NEXT_DOORBELL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Doorbell {
    /// A new doorbell (non-blocking eventfd).
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly created, owned, valid descriptor.
        let fd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
        let id = NEXT_DOORBELL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Self { fd, id })
    }

    /// Rings: the next (or current) blocking poll returns.
    pub fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an owned eventfd. A failure can only be
        // EAGAIN (counter saturated), in which case the bell is already ringing.
        unsafe {
            libc::write(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                (&raw const one).cast(),
                8,
            )
        };
    }

    /// Clears a ring (non-blocking); true when it had rung.
    pub fn clear(&self) -> bool {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from an owned non-blocking eventfd.
        let n = unsafe {
            libc::read(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                (&raw mut v).cast(),
                8,
            )
        };
        n == 8
    }

    /// Blocks until rung (used by engines whose operations complete synchronously).
    pub fn wait(&self, timeout_ms: i32) {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.fd),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is a valid pollfd array of length 1 for the duration of the call.
        unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) };
        self.clear();
    }

    /// A unique identity: an engine that armed a watch on another doorbell must arm this one.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The raw descriptor (for io_uring to read).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }
}

const POLL_SLICE: Duration = Duration::from_millis(100);

/// Runs one operation to completion, blocking (used to format and open a device before its
/// thread starts serving). Other completions collected meanwhile are an error: the engine must
/// be idle.
pub fn run_sync(
    engine: &mut dyn IoEngine,
    kind: OpKind,
) -> io::Result<(usize, Option<AlignedBuf>)> {
    const TAG: u64 = u64::MAX - 1;
    let doorbell = Doorbell::new()?;
    let mut op = Op { tag: TAG, kind };
    loop {
        match engine.submit(op) {
            Ok(()) => break,
            Err(back) => {
                op = back;
                let mut sink = Vec::new();
                engine.poll(Some(POLL_SLICE), &doorbell, &mut sink)?;
                if !sink.is_empty() {
                    return Err(io::Error::other("run_sync on a busy engine"));
                }
            }
        }
    }
    let mut out = Vec::new();
    loop {
        engine.poll(Some(POLL_SLICE), &doorbell, &mut out)?;
        if let Some(pos) = out.iter().position(|c| c.tag == TAG) {
            let c = out.swap_remove(pos);
            return c.result.map(|n| (n, c.buf));
        }
    }
}

/// Reads `len` bytes at `offset` synchronously.
pub fn read_sync(engine: &mut dyn IoEngine, offset: u64, len: usize) -> io::Result<AlignedBuf> {
    let (n, buf) = run_sync(
        engine,
        OpKind::Read {
            buf: AlignedBuf::zeroed(len),
            offset,
        },
    )?;
    let buf = buf.ok_or_else(|| io::Error::other("engine lost a read buffer"))?;
    if n != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("short read at {offset}: {n} of {len} bytes"),
        ));
    }
    Ok(buf)
}

/// Writes `buf` at `offset` synchronously and durably.
pub fn write_sync(engine: &mut dyn IoEngine, offset: u64, buf: AlignedBuf) -> io::Result<()> {
    let len = buf.len();
    let (n, _) = run_sync(
        engine,
        OpKind::Write {
            buf,
            offset,
            dsync: true,
        },
    )?;
    if n != len {
        return Err(io::Error::other(format!(
            "short write at {offset}: {n} of {len} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
