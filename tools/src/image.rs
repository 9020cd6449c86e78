//! `stockade volume import NAME FILE` and `volume export NAME FILE`: copy a raw image into or
//! out of a volume over the cluster's NBD path, with a progress bar and a SHA-256 at the end.
//!
//! Both go through [`RemoteVolume`], the NBD client that follows the volume's head nodes, so a
//! copy rides through a head-node failover like any client does. Pieces of [`PIECE`] bytes are
//! copied with [`IN_FLIGHT`] requests in flight, in order, hashing as they go.
//!
//! Nothing is lost on bad input: every check (sizes, attachments, an existing output file)
//! happens before the first byte is written. An import writes only the volume's first
//! `len(FILE)` bytes; an export writes to a temporary file next to FILE and renames it into
//! place only once the copy and its checksum are complete.
//!
//! Verification: an import reads the range back from the volume and compares its SHA-256 with
//! the file's; an export reads the written file back and compares it with what the volume
//! served. The digest printed is the image's.

use crate::admin_client::{AdminClient, AdminError};
use common::AlignedBuf;
use common::admin::{AttachVolume, DetachVolume, VolumeInfo};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use head_node::nbd::backend::{Volume, VolumeError};
use head_node::nbd::client::{RemoteConfig, RemoteError, RemoteVolume};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes per request.
pub const PIECE: u64 = 4 << 20;
/// Requests in flight.
pub const IN_FLIGHT: usize = 8;

/// Errors of an import or export.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The admin API refused or could not be reached.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The request makes no sense; nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// The NBD connection could not be made.
    #[error("connecting to volume {volume}: {source}")]
    Connect {
        /// The volume.
        volume: String,
        /// The cause.
        source: RemoteError,
    },
    /// An NBD request failed.
    #[error("{what} at offset {offset} of volume {volume}: {source}")]
    Io {
        /// `reading` or `writing`.
        what: &'static str,
        /// The volume.
        volume: String,
        /// Where.
        offset: u64,
        /// The cause.
        source: VolumeError,
    },
    /// Ctrl-C or SIGTERM stopped the copy; what this command attached was detached and a
    /// partial output file removed.
    #[error("interrupted: {0}")]
    Interrupted(String),
    /// The checksum at the end did not match.
    #[error(
        "checksum mismatch: {what} has sha256 {got}, the copy expected {want}; the copy is not trustworthy"
    )]
    Mismatch {
        /// What was re-read.
        what: String,
        /// Its digest.
        got: String,
        /// The copy's digest.
        want: String,
    },
}

/// The result of an import or export, as `--json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Copied {
    /// The volume.
    pub volume: String,
    /// The local file.
    pub file: PathBuf,
    /// Bytes copied.
    pub bytes: u64,
    /// SHA-256 of the bytes copied (hex).
    pub sha256: String,
    /// The checksum was verified by reading the copy back.
    pub verified: bool,
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::File {
        path: path.to_path_buf(),
        source,
    }
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// A volume made reachable over NBD for the copy; detaches what it attached when done.
struct Session<'a> {
    client: &'a AdminClient,
    name: String,
    attachment: Option<u64>,
    remote: Arc<RemoteVolume>,
}

impl<'a> Session<'a> {
    /// Attaches `info` exclusively (refused when someone else has it) and connects.
    async fn open(
        client: &'a AdminClient,
        info: &VolumeInfo,
        who: &str,
    ) -> Result<Self, ImageError> {
        let att = client
            .attach(
                &info.name,
                &AttachVolume {
                    shared: false,
                    client: Some(format!("{who} (pid {})", std::process::id())),
                },
            )
            .await?;
        let registry = prometheus::Registry::new();
        let cfg = RemoteConfig::new(info.name.clone(), att.endpoints);
        match RemoteVolume::connect(cfg, &registry).await {
            Ok(remote) => Ok(Session {
                client,
                name: info.name.clone(),
                attachment: Some(att.attachment.id),
                remote,
            }),
            Err(source) => {
                detach(client, &info.name, att.attachment.id).await;
                Err(ImageError::Connect {
                    volume: info.name.clone(),
                    source,
                })
            }
        }
    }

    /// Closes the connection and removes the attachment made by [`Session::open`].
    async fn close(&mut self) {
        self.remote.shutdown().await;
        if let Some(id) = self.attachment.take() {
            detach(self.client, &self.name, id).await;
        }
    }
}

/// Removes attachment `id` of `name`; a failure is only reported (the copy's result stands).
async fn detach(client: &AdminClient, name: &str, id: u64) {
    let req = DetachVolume {
        attachment: Some(id),
    };
    if let Err(e) = client.detach(name, &req).await {
        eprintln!(
            "warning: could not detach volume {name} (attachment {id}): {e}; run `stockade volume detach {name}`"
        );
    }
}

/// The volume, refused when a client has it attached (its view would be torn).
async fn idle_volume(
    client: &AdminClient,
    name: &str,
    what: &str,
) -> Result<VolumeInfo, ImageError> {
    let info = client.volume(name).await?;
    if let Some(a) = info.attachments.first() {
        return Err(ImageError::Refused(format!(
            "volume {name} is attached (attachment {}{}); a client may be using it, so {what} would tear its data: detach it first (`stockade volume detach {name}`)",
            a.id,
            a.client
                .as_deref()
                .map(|c| format!(", client {c}"))
                .unwrap_or_default()
        )));
    }
    Ok(info)
}

/// Pieces `[off, off+len)` covering `[0, total)`.
fn pieces(total: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..total.div_ceil(PIECE)).map(move |i| {
        let off = i * PIECE;
        (off, PIECE.min(total - off))
    })
}

/// SHA-256 of `[0, len)` of the volume, read back over NBD.
async fn volume_digest(
    remote: &Arc<RemoteVolume>,
    name: &str,
    len: u64,
    pb: &ProgressBar,
) -> Result<Vec<u8>, ImageError> {
    let mut h = Sha256::new();
    let mut reads = stream::iter(pieces(len))
        .map(|(off, n)| read_piece(remote, name, off, n))
        .buffered(IN_FLIGHT);
    while let Some(buf) = reads.try_next().await? {
        h.update(&buf[..]);
        pb.inc(buf.len() as u64);
    }
    Ok(h.finalize().to_vec())
}

/// NBD requests are whole multiples of the servers' minimum block size (512 bytes, which every
/// volume size is a multiple of): an image's last piece may not be.
const MIN_BLOCK: u64 = 512;

/// Reads `[off, off+n)`; a tail shorter than a block is read as its whole block and cut.
async fn read_piece(
    remote: &Arc<RemoteVolume>,
    name: &str,
    off: u64,
    n: u64,
) -> Result<AlignedBuf, ImageError> {
    let whole = n.next_multiple_of(MIN_BLOCK);
    let buf = remote
        .read(off, whole as u32)
        .await
        .map_err(|source| ImageError::Io {
            what: "reading",
            volume: name.to_string(),
            offset: off,
            source,
        })?;
    Ok(if whole == n {
        buf
    } else {
        AlignedBuf::from_slice(&buf[..n as usize])
    })
}

/// Writes `data` at `off`; a tail shorter than a block is merged into what its block holds
/// (the copy holds the volume exclusively, so nothing changes it in between).
async fn write_piece(
    remote: &Arc<RemoteVolume>,
    name: &str,
    off: u64,
    data: AlignedBuf,
) -> Result<u64, ImageError> {
    let n = data.len() as u64;
    let io = |what: &'static str| {
        let volume = name.to_string();
        move |source| ImageError::Io {
            what,
            volume,
            offset: off,
            source,
        }
    };
    if !n.is_multiple_of(MIN_BLOCK) {
        let whole = n.next_multiple_of(MIN_BLOCK);
        let mut block = remote
            .read(off, whole as u32)
            .await
            .map_err(io("reading"))?;
        block[..n as usize].copy_from_slice(&data[..]);
        remote
            .write(off, block, false)
            .await
            .map_err(io("writing"))?;
    } else if data.iter().all(|b| *b == 0) {
        remote
            .write_zeroes(off, n, false, false, false)
            .await
            .map_err(io("writing"))?;
    } else {
        remote
            .write(off, data, false)
            .await
            .map_err(io("writing"))?;
    }
    Ok(n)
}

/// Copies FILE into the first `len(FILE)` bytes of volume `name`.
pub async fn import(client: &AdminClient, name: &str, path: &Path) -> Result<Copied, ImageError> {
    // Looked at before it is opened: opening a FIFO would wait for a writer, forever.
    let meta = std::fs::metadata(path).map_err(file_err(path))?;
    if !meta.is_file() {
        return Err(ImageError::Refused(format!(
            "{}: not a regular file (import takes a raw image file)",
            path.display()
        )));
    }
    let mut file = File::open(path).map_err(file_err(path))?;
    let len = file.metadata().map_err(file_err(path))?.len();
    if len == 0 {
        // Most likely the wrong file (or one still being written): say so rather than report
        // a copy of nothing as a success.
        return Err(ImageError::Refused(format!(
            "{} is empty: nothing to import",
            path.display()
        )));
    }
    let info = idle_volume(client, name, "importing").await?;
    if len > info.size {
        // Volume sizes are multiples of 4 KiB: suggest one the resize will take.
        let want = len.div_ceil(4096) * 4096;
        return Err(ImageError::Refused(format!(
            "{} is {len} bytes but volume {name} is {} bytes: grow it first (`stockade volume resize {name} --size {want}`)",
            path.display(),
            info.size
        )));
    }
    // Ctrl-C or SIGTERM, from before the attach on, ends the copy but not the clean-up: the
    // attachment made for it is removed, or the volume would stay attached and refuse the
    // next import.
    let mut stop = common::signals::Shutdown::catch();
    let mut s = Session::open(client, &info, "stockade volume import").await?;
    let res = tokio::select! {
        r = import_data(&s.remote, name, &mut file, path, len) => r,
        _ = stop.wait() => Err(ImageError::Interrupted(format!(
            "volume {name} holds part of {} now; import it again",
            path.display()
        ))),
    };
    s.close().await;
    let sha = res?;
    Ok(Copied {
        volume: name.to_string(),
        file: path.to_path_buf(),
        bytes: len,
        sha256: hex(&sha),
        verified: true,
    })
}

async fn import_data(
    remote: &Arc<RemoteVolume>,
    name: &str,
    file: &mut File,
    path: &Path,
    len: u64,
) -> Result<Vec<u8>, ImageError> {
    let pb = progress(len, &format!("import {name}"));
    let mut h = Sha256::new();
    file.seek(SeekFrom::Start(0)).map_err(file_err(path))?;
    // Read the file in order (hashing it), write up to IN_FLIGHT pieces at once.
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for (off, n) in pieces(len) {
        let mut buf = AlignedBuf::zeroed(n as usize);
        if let Err(e) = file.read_exact(&mut buf[..]) {
            let e = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "the file ended before byte {}, its size when the import started: it changed while it was read; volume {name} holds part of it now, import it again",
                        off + n
                    ),
                )
            } else {
                e
            };
            return Err(file_err(path)(e));
        }
        h.update(&buf[..]);
        pending.push(write_piece(remote, name, off, buf));
        if pending.len() >= IN_FLIGHT
            && let Some(done) = pending.next().await
        {
            pb.inc(done?);
        }
    }
    while let Some(done) = pending.next().await {
        pb.inc(done?);
    }
    remote.flush().await.map_err(|source| ImageError::Io {
        what: "flushing",
        volume: name.to_string(),
        offset: 0,
        source,
    })?;
    pb.finish_and_clear();
    let want = h.finalize().to_vec();
    let pb = progress(len, &format!("verify {name}"));
    let got = volume_digest(remote, name, len, &pb).await?;
    pb.finish_and_clear();
    if got != want {
        return Err(ImageError::Mismatch {
            what: format!("volume {name} read back"),
            got: hex(&got),
            want: hex(&want),
        });
    }
    Ok(want)
}

/// Copies the whole of volume `name` into FILE (created; never overwritten unless `force`).
pub async fn export(
    client: &AdminClient,
    name: &str,
    path: &Path,
    force: bool,
) -> Result<Copied, ImageError> {
    // symlink_metadata: a dangling symbolic link is a name in use too.
    match std::fs::symlink_metadata(path) {
        // Not even --force replaces a directory: refused before the copy, not after it.
        Ok(m) if m.is_dir() => {
            return Err(ImageError::Refused(format!(
                "{} is a directory; give the name of the file to write",
                path.display()
            )));
        }
        Ok(_) if !force => {
            return Err(ImageError::Refused(format!(
                "{} exists; pass --force to replace it",
                path.display()
            )));
        }
        _ => {}
    }
    let info = idle_volume(client, name, "exporting").await?;
    let file_name = path
        .file_name()
        .ok_or_else(|| ImageError::Refused(format!("{}: not a file name", path.display())))?;
    let tmp = path.with_file_name(format!(
        ".{}.stockade-partial-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let mut stop = common::signals::Shutdown::catch();
    let mut s = Session::open(client, &info, "stockade volume export").await?;
    let res = tokio::select! {
        r = export_data(&s.remote, name, &tmp, info.size) => r,
        _ = stop.wait() => Err(ImageError::Interrupted(format!(
            "{} was not written",
            path.display()
        ))),
    };
    s.close().await;
    let sha = match res {
        Ok(sha) => sha,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let placed = if force {
        std::fs::rename(&tmp, path)
    } else {
        place_new(&tmp, path)
    }
    .and_then(|()| sync_parent(path));
    placed.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            ImageError::Refused(format!(
                "{} appeared while the volume was being exported; nothing was replaced (pass --force to replace it)",
                path.display()
            ))
        } else {
            file_err(path)(e)
        }
    })?;
    Ok(Copied {
        volume: name.to_string(),
        file: path.to_path_buf(),
        bytes: info.size,
        sha256: hex(&sha),
        verified: true,
    })
}

/// Moves `tmp` to `path` unless `path` exists, even if it appeared while the copy ran: an
/// atomic no-replace rename; on file systems without it, a hard link (which fails if the name
/// exists); on those without hard links either (vfat, exFAT, some FUSE and network file
/// systems), a check then a rename, with the small window that leaves.
fn place_new(tmp: &Path, path: &Path) -> std::io::Result<()> {
    use nix::errno::Errno;
    match nix::fcntl::renameat2(
        None,
        tmp,
        None,
        path,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    ) {
        Ok(()) => return Ok(()),
        Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {}
        Err(e) => return Err(e.into()),
    }
    match std::fs::hard_link(tmp, path) {
        Ok(()) => return std::fs::remove_file(tmp),
        Err(e) if !matches!(e.raw_os_error(), Some(libc::EPERM | libc::EOPNOTSUPP)) => {
            return Err(e);
        }
        Err(_) => {}
    }
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(std::io::ErrorKind::AlreadyExists.into());
    }
    std::fs::rename(tmp, path)
}

/// Makes the new name durable: the directory entry is written when its directory is synced.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

async fn export_data(
    remote: &Arc<RemoteVolume>,
    name: &str,
    tmp: &Path,
    len: u64,
) -> Result<Vec<u8>, ImageError> {
    let file = File::options()
        .write(true)
        .read(true)
        .create_new(true)
        .open(tmp)
        .map_err(file_err(tmp))?;
    // Sparse: pieces that read as zeros are not written.
    file.set_len(len).map_err(file_err(tmp))?;
    let pb = progress(len, &format!("export {name}"));
    let mut h = Sha256::new();
    let mut reads = stream::iter(pieces(len))
        .map(|(off, n)| async move { read_piece(remote, name, off, n).await.map(|b| (off, b)) })
        .buffered(IN_FLIGHT);
    while let Some((off, buf)) = reads.try_next().await? {
        h.update(&buf[..]);
        if !buf.iter().all(|b| *b == 0) {
            file.write_all_at(&buf[..], off).map_err(file_err(tmp))?;
        }
        pb.inc(buf.len() as u64);
    }
    file.sync_all().map_err(file_err(tmp))?;
    pb.finish_and_clear();
    let want = h.finalize().to_vec();
    // Read the file back.
    let mut f = File::open(tmp).map_err(file_err(tmp))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; PIECE as usize];
    loop {
        let n = f.read(&mut buf).map_err(file_err(tmp))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let got = h.finalize().to_vec();
    if got != want {
        return Err(ImageError::Mismatch {
            what: format!("{} read back", tmp.display()),
            got: hex(&got),
            want: hex(&want),
        });
    }
    Ok(want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range_exactly() {
        assert_eq!(pieces(0).count(), 0);
        let p: Vec<_> = pieces(PIECE * 2 + 5).collect();
        assert_eq!(p, vec![(0, PIECE), (PIECE, PIECE), (2 * PIECE, 5)]);
        let p: Vec<_> = pieces(512).collect();
        assert_eq!(p, vec![(0, 512)]);
    }

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(hex(&[0, 0xab, 0x0f]), "00ab0f");
    }

    fn nowhere() -> AdminClient {
        AdminClient::new(vec!["http://127.0.0.1:9".parse().unwrap()], None).unwrap()
    }

    /// A FIFO is refused at once: opening it first would wait for a writer forever.
    #[tokio::test]
    async fn importing_a_fifo_is_refused_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            import(&nowhere(), "v", &fifo),
        )
        .await
        .expect("no wait");
        assert!(matches!(r, Err(ImageError::Refused(_))), "{r:?}");
    }

    /// An empty image is refused (nothing would be copied), before the cluster is asked
    /// anything: `nowhere()` answers no request.
    #[tokio::test]
    async fn importing_an_empty_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        let r = import(&nowhere(), "v", &empty).await;
        assert!(
            matches!(&r, Err(ImageError::Refused(m)) if m.contains("is empty")),
            "{r:?}"
        );
    }

    /// A directory is refused even with --force, before anything is copied.
    #[tokio::test]
    async fn exporting_onto_a_directory_is_refused_even_with_force() {
        let dir = tempfile::tempdir().unwrap();
        let r = export(&nowhere(), "v", dir.path(), true).await;
        assert!(
            matches!(&r, Err(ImageError::Refused(m)) if m.contains("is a directory")),
            "{r:?}"
        );
    }

    /// Without --force a name in use is never replaced, a dangling symbolic link included; the
    /// file lands whole under its name otherwise.
    #[tokio::test]
    async fn an_export_never_replaces_a_name_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("missing"), &link).unwrap();
        let r = export(&nowhere(), "v", &link, false).await;
        assert!(
            matches!(&r, Err(ImageError::Refused(m)) if m.contains("exists")),
            "{r:?}"
        );
        let (tmp, to) = (dir.path().join("tmp"), dir.path().join("out"));
        std::fs::write(&tmp, b"data").unwrap();
        std::fs::write(&to, b"old").unwrap();
        let e = place_new(&tmp, &to).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&to).unwrap(), b"old");
        std::fs::remove_file(&to).unwrap();
        place_new(&tmp, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"data");
        assert!(!tmp.exists());
        sync_parent(&to).unwrap();
    }
}
