//! The head node's state directory: the fencing epoch counter and volume descriptions.
//!
//! Every file is replaced atomically (write a temporary file, fsync it, rename it over the old
//! one, fsync the directory), so a crash leaves either the old or the new version.

use crate::volume::VolumeSpec;
use common::ids::Epoch;
use std::path::{Path, PathBuf};

/// Errors of the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An I/O error.
    #[error("state directory {path}: {source}")]
    Io {
        /// File or directory.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A file does not parse.
    #[error("state file {path} is corrupt: {message}")]
    Corrupt {
        /// File.
        path: String,
        /// What is wrong.
        message: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `value` as JSON to `path` atomically.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let text = serde_json::to_vec_pretty(value).map_err(|e| StateError::Corrupt {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    write_atomic(path, &text)
}

/// Writes bytes to `path` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating) a state directory.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir.join("volumes")).map_err(io(dir))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Increments and returns the epoch counter (durably, before it is used).
    pub fn bump_epoch(&self) -> Result<Epoch, StateError> {
        let next = Epoch(self.epoch()?.0 + 1);
        self.set_epoch(next)?;
        Ok(next)
    }

    /// Raises the epoch counter to at least `at_least` (durably) and returns it.
    pub fn raise_epoch(&self, at_least: Epoch) -> Result<Epoch, StateError> {
        let e = self.epoch()?.max(at_least);
        self.set_epoch(e)?;
        Ok(e)
    }

    fn set_epoch(&self, e: Epoch) -> Result<(), StateError> {
        write_atomic(&self.dir.join("epoch"), format!("{}\n", e.0).as_bytes())
    }

    /// The epoch counter (0 when never started).
    pub fn epoch(&self) -> Result<Epoch, StateError> {
        let path = self.dir.join("epoch");
        let current = match std::fs::read_to_string(&path) {
            Ok(t) => t.trim().parse::<u64>().map_err(|e| StateError::Corrupt {
                path: path.display().to_string(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(&path)(e)),
        };
        Ok(Epoch(current))
    }

    fn volume_path(&self, name: &str) -> PathBuf {
        self.dir.join("volumes").join(format!("{name}.json"))
    }

    /// A volume's description, if it exists.
    pub fn load_volume(&self, name: &str) -> Result<Option<VolumeSpec>, StateError> {
        let path = self.volume_path(name);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| StateError::Corrupt {
                    path: path.display().to_string(),
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Saves a volume's description.
    pub fn save_volume(&self, spec: &VolumeSpec) -> Result<(), StateError> {
        write_json_atomic(&self.volume_path(&spec.name), spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_increase_and_corruption_is_named() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        assert_eq!(s.bump_epoch().unwrap(), Epoch(1));
        assert_eq!(s.bump_epoch().unwrap(), Epoch(2));
        std::fs::write(d.path().join("epoch"), "garbage").unwrap();
        let e = s.bump_epoch().unwrap_err().to_string();
        assert!(e.contains("corrupt"), "{e}");
        std::fs::write(d.path().join("volumes/v.json"), "{").unwrap();
        assert!(s.load_volume("v").is_err());
        assert!(s.load_volume("missing").unwrap().is_none());
    }
}
