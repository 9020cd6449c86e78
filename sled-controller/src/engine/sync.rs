//! The synchronous engine: `pread`/`pwritev2` on the `O_DIRECT` device file, performed at
//! submission. A reference for the io_uring engine and a fallback where io_uring is unavailable.

use super::devfile::DevFile;
use super::{Completion, DeviceKind, Doorbell, IoEngine, Op, OpKind};
use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Synchronous engine.
#[derive(Debug)]
pub struct SyncEngine {
    dev: DevFile,
    done: VecDeque<Completion>,
    cap: usize,
}

impl SyncEngine {
    /// An engine over an open device; `cap` completions may wait to be collected.
    pub fn new(dev: DevFile, cap: usize) -> Self {
        Self {
            dev,
            done: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    fn run(&self, kind: &mut OpKind) -> io::Result<usize> {
        let fd = self.dev.file.as_raw_fd();
        match kind {
            OpKind::Read { buf, offset } => {
                let mut done = 0;
                while done < buf.len() {
                    // SAFETY: the destination range lies inside buf, which is exclusively
                    // borrowed for the call.
                    let n = unsafe {
                        libc::pread(
                            fd,
                            buf.as_mut_ptr().add(done).cast(),
                            buf.len() - done,
                            (*offset + done as u64) as libc::off_t,
                        )
                    };
                    match n {
                        n if n < 0 => {
                            let e = io::Error::last_os_error();
                            if e.kind() == io::ErrorKind::Interrupted {
                                continue;
                            }
                            return Err(e);
                        }
                        0 => {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!("read returned 0 bytes at {done} of {}", buf.len()),
                            ));
                        }
                        n => done += n as usize,
                    }
                }
                Ok(done)
            }
            OpKind::Write { buf, offset, dsync } => {
                let mut done = 0;
                while done < buf.len() {
                    let iov = libc::iovec {
                        // SAFETY: the source range lies inside buf.
                        iov_base: unsafe { buf.as_ptr().add(done) } as *mut libc::c_void,
                        iov_len: buf.len() - done,
                    };
                    let flags = if *dsync { libc::RWF_DSYNC } else { 0 };
                    // SAFETY: iov points at one valid iovec describing memory inside buf.
                    let n = unsafe {
                        libc::pwritev2(
                            fd,
                            &raw const iov,
                            1,
                            (*offset + done as u64) as libc::off_t,
                            flags,
                        )
                    };
                    match n {
                        n if n < 0 => {
                            let e = io::Error::last_os_error();
                            if e.kind() == io::ErrorKind::Interrupted {
                                continue;
                            }
                            return Err(e);
                        }
                        0 => return Err(io::Error::other("write returned 0 bytes")),
                        n => done += n as usize,
                    }
                }
                Ok(done)
            }
            OpKind::Fsync => {
                self.dev.file.sync_data()?;
                Ok(0)
            }
            OpKind::ZeroRange { offset, len } => self.dev.zero_range(*offset, *len).map(|()| 0),
        }
    }
}

impl IoEngine for SyncEngine {
    fn size(&self) -> u64 {
        self.dev.size
    }

    fn capacity(&self) -> usize {
        self.cap
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn kind(&self) -> DeviceKind {
        self.dev.kind
    }

    fn submit(&mut self, mut op: Op) -> Result<(), Op> {
        if self.done.len() >= self.cap {
            return Err(op);
        }
        let result = self.run(&mut op.kind);
        let buf = match op.kind {
            OpKind::Read { buf, .. } | OpKind::Write { buf, .. } => Some(buf),
            _ => None,
        };
        self.done.push_back(Completion {
            tag: op.tag,
            result,
            buf,
        });
        Ok(())
    }

    fn poll(
        &mut self,
        wait: Option<Duration>,
        doorbell: &Doorbell,
        out: &mut Vec<Completion>,
    ) -> io::Result<()> {
        if self.done.is_empty()
            && let Some(d) = wait
        {
            doorbell.wait(d.as_millis().min(i32::MAX as u128) as i32);
        }
        out.extend(self.done.drain(..));
        Ok(())
    }
}
