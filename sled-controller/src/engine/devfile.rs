//! Opening a device: a block device, or a regular file (created sparse at a given size for
//! development), always `O_DIRECT`.

use super::DeviceKind;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

/// Errors opening a device.
#[derive(Debug, thiserror::Error)]
pub enum DevFileError {
    /// Open or create failed.
    #[error("opening device {path}: {source}")]
    Open {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("device {path} is neither a regular file nor a block device")]
    NotADevice {
        /// Path.
        path: String,
    },
    /// Another process (a second sled controller, a mount) has the device open.
    #[error(
        "device {path} is in use by another process (another sled controller on the same device?); a device has one owner"
    )]
    InUse {
        /// Path.
        path: String,
    },
    /// The file system does not support `O_DIRECT` (tmpfs, for example).
    #[error(
        "device {path}: O_DIRECT is not supported here ({source}); put development device files on a disk-backed file system, not tmpfs"
    )]
    NoDirectIo {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// How long a busy device lock is retried before the device is called in use.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// An open device file.
#[derive(Debug)]
pub struct DevFile {
    /// The descriptor (`O_RDWR | O_DIRECT | O_CLOEXEC`).
    pub file: File,
    /// File or block device.
    pub kind: DeviceKind,
    /// Size in bytes (rounded down to 4 KiB).
    pub size: u64,
}

impl DevFile {
    /// Opens `path`. When it does not exist and `create_size` is given, creates a sparse file of
    /// that size. An existing file smaller than `create_size` is extended (sparse).
    pub fn open(path: &Path, create_size: Option<u64>) -> Result<Self, DevFileError> {
        let err = |source| DevFileError::Open {
            path: path.display().to_string(),
            source,
        };
        if !path.exists() {
            let Some(size) = create_size else {
                return Err(err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "no such file (give a size to create a sparse development device)",
                )));
            };
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(err)?;
            }
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(err)?;
            f.set_len(size).map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        let meta = std::fs::metadata(path).map_err(err)?;
        let ft = meta.file_type();
        let kind = if ft.is_block_device() {
            DeviceKind::Block
        } else if ft.is_file() {
            DeviceKind::File
        } else {
            return Err(DevFileError::NotADevice {
                path: path.display().to_string(),
            });
        };
        let in_use = || DevFileError::InUse {
            path: path.display().to_string(),
        };
        // A block device opened O_EXCL cannot be opened so again, nor mounted, until closed.
        let excl = if kind == DeviceKind::Block {
            libc::O_EXCL
        } else {
            0
        };
        // One owner per device: two sled controllers on one device would each rewrite its
        // metadata under the other. A sled that has just died can hold the device a little
        // longer: the kernel tears its io_uring down (and drops the ring's hold on the file)
        // after the process has gone, so a busy device is retried for a moment before it is
        // called in use.
        let deadline = std::time::Instant::now() + LOCK_PATIENCE;
        let busy_wait = || {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            true
        };
        let file = loop {
            match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC | excl)
                .open(path)
            {
                Ok(f) => break f,
                Err(source) => match source.raw_os_error() {
                    Some(libc::EINVAL) => {
                        return Err(DevFileError::NoDirectIo {
                            path: path.display().to_string(),
                            source,
                        });
                    }
                    Some(libc::EBUSY) if busy_wait() => {}
                    Some(libc::EBUSY) => return Err(in_use()),
                    _ => return Err(err(source)),
                },
            }
        };
        // The lock goes with the descriptor (and the process).
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err(e));
            }
            if !busy_wait() {
                return Err(in_use());
            }
        }
        let size = match kind {
            DeviceKind::Block => {
                let mut sz: u64 = 0;
                // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
                unsafe { blkgetsize64(file.as_raw_fd(), &raw mut sz) }
                    .map_err(|e| err(io::Error::from(e)))?;
                sz
            }
            _ => {
                // Only a file that holds no sled yet grows to the configured size: a formatted
                // one that is shorter than its superblock says was truncated, and growing it
                // would turn the lost tail into holes that the layout check could not see.
                match create_size.filter(|w| *w > meta.len()) {
                    Some(want) if !formatted(&file).map_err(err)? => {
                        file.set_len(want).map_err(err)?;
                        want
                    }
                    _ => meta.len(),
                }
            }
        };
        Ok(Self {
            file,
            kind,
            size: size & !(common::aligned::ALIGN as u64 - 1),
        })
    }

    /// Makes `[offset, offset+len)` read as zeros, synchronously: a punched hole in a file,
    /// `BLKZEROOUT` on a block device. Durable only after a following fdatasync.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.kind {
            DeviceKind::Block => {
                let range = [offset, len];
                // SAFETY: BLKZEROOUT reads two u64s through the pointer, which is valid.
                unsafe { blkzeroout(self.file.as_raw_fd(), &raw const range) }
                    .map(drop)
                    .map_err(io::Error::from)
            }
            _ => punch_hole(&self.file, offset, len),
        }
    }
}

impl Drop for DevFile {
    fn drop(&mut self) {
        // Give the device up now, not when the kernel has finished with every io_uring that
        // still refers to the file: a sled restarted at once finds it free.
        // SAFETY: flock on a descriptor we own; no memory is involved.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// True when either copy of the superblock (the first two pages) carries the sled's magic.
fn formatted(file: &File) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let page = crate::layout::PAGE as usize;
    let mut buf = common::AlignedBuf::zeroed(2 * page);
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    // O_DIRECT reads come in whole pages; a shorter file holds no superblock copy past `got`.
    let magic = &crate::layout::SB_MAGIC;
    Ok((0..2).any(|i| got >= (i + 1) * page && buf[i * page..].starts_with(magic)))
}

/// Punches a hole in a regular file (keeps its size).
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an owned descriptor; no pointers involved.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
