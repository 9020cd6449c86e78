//! Segments zero-filled ahead of need.
//!
//! An `fdatasync` after a write that grows a file (or fills an unwritten extent) must also write
//! the inode, so on a disk without FUA it costs about twice a sync after overwriting blocks
//! already written (measured in bench/README.md: 227 µs against 113 µs). So while the active
//! segment fills, a helper thread writes the next segment's whole length with zeros and makes
//! that durable; when the writer rotates, the spare gets its header and its name
//! (`writer::start_segment`), and every
//! batch written into it is an overwrite. A zero tail after the last batch is a clean end on
//! replay (see `recover::scan`). When no spare is ready in time the writer creates an empty
//! segment and appends, as it would without spares: a spare never holds up a commit.

use super::WalError;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// File name suffix of a spare being prepared (never a segment: replay ignores it, open
/// removes it).
pub(crate) const SPARE_SUFFIX: &str = ".spare";

/// Zeros written per call while filling a spare, each followed by a sync, so the fill reaches
/// the disk as a steady trickle (at most this much queued in front of a commit's sync), not as
/// one burst.
const FILL_CHUNK: usize = 1 << 20;

/// Removes spares an earlier run left (filled or not: they are only ever a head start).
pub(crate) fn remove_leftovers(dir: &Path) -> Result<(), WalError> {
    let io = |source| WalError::Io {
        path: dir.to_path_buf(),
        what: "removing leftover spare segments",
        source,
    };
    for ent in fs::read_dir(dir).map_err(io)? {
        let ent = ent.map_err(io)?;
        if ent.file_name().to_string_lossy().ends_with(SPARE_SUFFIX) {
            fs::remove_file(ent.path()).map_err(io)?;
        }
    }
    Ok(())
}

/// A spare that a helper thread is filling.
#[derive(Debug)]
struct Filling {
    path: PathBuf,
    done: mpsc::Receiver<io::Result<File>>,
}

/// The writer's spare segment, if any.
#[derive(Debug, Default)]
pub(crate) struct Spare {
    filling: Option<Filling>,
    /// Preparing a spare failed; the log appends from now on (until restart).
    off: bool,
    /// Numbers the spare files of this run.
    next_id: u64,
}

impl Spare {
    /// Whether a spare is being filled or ready.
    pub(crate) fn pending(&self) -> bool {
        self.filling.is_some()
    }

    /// Starts filling a spare of `len` bytes in `dir`, unless one is already on its way.
    pub(crate) fn prepare(&mut self, dir: &Path, len: u64) {
        if self.off || self.filling.is_some() {
            return;
        }
        self.next_id += 1;
        let path = dir.join(format!("{:020}{SPARE_SUFFIX}", self.next_id));
        let (tx, rx) = mpsc::sync_channel(1);
        let target = path.clone();
        let spawned = std::thread::Builder::new()
            .name("raft-log-spare".into())
            .spawn(move || {
                let _ = tx.send(fill(&target, len));
            });
        match spawned {
            Ok(_) => self.filling = Some(Filling { path, done: rx }),
            Err(e) => {
                tracing::warn!(error = %e, "raft log: cannot start the thread that zero-fills segments; appending instead");
                self.off = true;
            }
        }
    }

    /// The filled spare and its path, if one is ready now. Never waits.
    pub(crate) fn take(&mut self) -> Option<(File, PathBuf)> {
        let f = self.filling.as_ref()?;
        let got = match f.done.try_recv() {
            Err(mpsc::TryRecvError::Empty) => return None,
            Ok(got) => got,
            Err(mpsc::TryRecvError::Disconnected) => {
                Err(io::Error::other("the zero-filling thread stopped"))
            }
        };
        let f = self.filling.take()?;
        match got {
            Ok(file) => Some((file, f.path)),
            Err(e) => {
                tracing::warn!(file = %f.path.display(), error = %e, "raft log: zero-filling a segment failed; appending instead");
                let _ = fs::remove_file(&f.path);
                self.off = true;
                None
            }
        }
    }
}

/// Creates `path` and writes `len` zeros into it, durably (data and size).
fn fill(path: &Path, len: u64) -> io::Result<File> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let zeros = vec![0u8; FILL_CHUNK];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(FILL_CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], off)?;
        file.sync_data()?;
        off += n as u64;
    }
    file.sync_all()?;
    Ok(file)
}
