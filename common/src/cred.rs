//! The cluster key, fencing credentials and the mutual-authentication handshake.
//!
//! Every head node and sled controller of a cluster holds the same 256-bit key, read from a key
//! file. It is used for two things:
//!
//! * **Fencing credentials** (US10484015B2): a head node mints `{volume, epoch, holder, mac}`
//!   where `mac = HMAC-SHA256(key, "stockade-cred-v1" ‖ volume ‖ epoch ‖ holder)`. Nothing but a
//!   key holder can mint one, so a sled can trust the epoch it carries.
//! * **Connection authentication**: both ends prove knowledge of the key over fresh nonces before
//!   anything else is accepted (see [`HandshakeProof`]).

use crate::ids::{Epoch, NodeId, VolumeId};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

type HmacSha256 = Hmac<Sha256>;

/// Length of the cluster key in bytes.
pub const KEY_LEN: usize = 32;

/// Errors loading or creating a cluster key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("cluster key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file does not hold 64 hex digits.
    #[error("cluster key file {path}: expected 64 hex digits (a 256-bit key), found {found}")]
    Format {
        /// The file.
        path: String,
        /// What was found instead.
        found: String,
    },
}

/// The shared secret of a cluster.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; KEY_LEN]);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

impl ClusterKey {
    /// A key from raw bytes.
    pub fn from_bytes(b: [u8; KEY_LEN]) -> Self {
        Self(b)
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        let mut b = [0u8; KEY_LEN];
        rand::Rng::fill(&mut rand::thread_rng(), &mut b[..]);
        Self(b)
    }

    /// Hex text, as stored in key files.
    pub fn to_hex(&self) -> String {
        hex_encode(&self.0)
    }

    /// Reads a key file: 64 hex digits, surrounding whitespace ignored.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let bytes = std::fs::read(path).map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let format = |found: String| KeyError::Format {
            path: path.display().to_string(),
            found,
        };
        // A file of raw key bytes is the likely mistake here: say so rather than "not UTF-8".
        let text = String::from_utf8(bytes)
            .map_err(|e| format(format!("{} bytes of binary data", e.as_bytes().len())))?;
        Self::parse(text.trim()).ok_or_else(|| format(format!("{} characters", text.trim().len())))
    }

    /// Reads the key file, or creates it with a fresh key (mode 0600) when it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        if path.exists() {
            return Self::load(path);
        }
        let key = Self::generate();
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            writeln!(f, "{}", key.to_hex()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        Ok(key)
    }

    /// Parses 64 hex digits.
    pub fn parse(hex: &str) -> Option<Self> {
        let bytes = hex_decode(hex)?;
        let arr: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(Self(arr))
    }

    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut m =
            <HmacSha256 as Mac>::new_from_slice(&self.0).expect("hmac takes any key length");
        for p in parts {
            m.update(p);
        }
        m
    }

    fn cred_mac(&self, volume: VolumeId, epoch: Epoch, holder: NodeId) -> HmacSha256 {
        self.mac(&[
            b"stockade-cred-v1",
            &volume.to_le_bytes(),
            &epoch.0.to_le_bytes(),
            &holder.0.to_le_bytes(),
        ])
    }

    /// Mints a fencing credential for `holder` at `epoch` on `volume`.
    pub fn mint(&self, volume: VolumeId, epoch: Epoch, holder: NodeId) -> Credential {
        let mac = self.cred_mac(volume, epoch, holder).finalize().into_bytes();
        Credential {
            volume,
            epoch,
            holder,
            mac: mac.into(),
        }
    }

    /// True when `cred` was minted with this key (constant-time comparison).
    pub fn verify(&self, cred: &Credential) -> bool {
        self.cred_mac(cred.volume, cred.epoch, cred.holder)
            .verify_slice(&cred.mac)
            .is_ok()
    }

    /// The proof one side of a handshake sends: it binds the role of the sender and both nonces.
    pub fn handshake_proof(
        &self,
        role: HandshakeRole,
        own_nonce: &[u8; 32],
        peer_nonce: &[u8; 32],
    ) -> HandshakeProof {
        let tag = role.tag();
        let out = self
            .mac(&[b"stockade-hello-v1", tag, own_nonce, peer_nonce])
            .finalize()
            .into_bytes();
        HandshakeProof(out.into())
    }

    /// Checks a proof received from the peer playing `role`.
    pub fn verify_handshake(
        &self,
        role: HandshakeRole,
        peer_nonce: &[u8; 32],
        own_nonce: &[u8; 32],
        proof: &HandshakeProof,
    ) -> bool {
        self.mac(&[b"stockade-hello-v1", role.tag(), peer_nonce, own_nonce])
            .verify_slice(&proof.0)
            .is_ok()
    }

    /// A MAC over arbitrary bytes with a domain separator, for other authenticated messages.
    pub fn sign(&self, domain: &[u8], data: &[u8]) -> [u8; 32] {
        self.mac(&[domain, data]).finalize().into_bytes().into()
    }
}

/// Which side of a connection produced a handshake proof; the roles are bound into the MAC so a
/// proof cannot be reflected back to its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeRole {
    /// The side that opened the connection.
    Client,
    /// The side that accepted it.
    Server,
}

impl HandshakeRole {
    fn tag(self) -> &'static [u8] {
        match self {
            HandshakeRole::Client => b"client",
            HandshakeRole::Server => b"server",
        }
    }
}

/// A handshake proof (HMAC-SHA256 output).
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeProof(pub [u8; 32]);

impl fmt::Debug for HandshakeProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HandshakeProof({}…)", hex_encode(&self.0[..4]))
    }
}

/// A fresh random nonce for a handshake.
pub fn nonce() -> [u8; 32] {
    let mut b = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut b[..]);
    b
}

/// A fencing credential: the right of `holder` to mutate `volume` at `epoch`.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// The volume this credential covers.
    pub volume: VolumeId,
    /// The epoch of the holder's claim (the Raft term of its leadership).
    pub epoch: Epoch,
    /// The head node that holds it.
    pub holder: NodeId,
    /// HMAC-SHA256 over the fields above with the cluster key.
    pub mac: [u8; 32],
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("volume", &self.volume)
            .field("epoch", &self.epoch)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

/// Credentials that verified under one cluster key, remembered so that a connection sending the
/// same credential for a whole epoch pays for its HMAC once.
///
/// A credential is accepted without recomputing its MAC only when it is *exactly* one that
/// verified before — volume, epoch, holder and every MAC byte (compared in constant time); any
/// other credential, including one for the same volume and epoch with different MAC bytes, is
/// verified in full. One entry per volume (the newest that verified), at most `max_entries`
/// volumes; beyond that an arbitrary entry is forgotten. Meant to live in one connection (no
/// locking).
pub struct VerifiedCredentials {
    key: ClusterKey,
    by_volume: HashMap<VolumeId, Credential>,
    max_entries: usize,
}

impl fmt::Debug for VerifiedCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedCredentials")
            .field("entries", &self.by_volume.len())
            .field("max_entries", &self.max_entries)
            .finish_non_exhaustive()
    }
}

impl VerifiedCredentials {
    /// An empty cache for credentials minted with `key`, remembering at most `max_entries`
    /// volumes (at least one).
    pub fn new(key: ClusterKey, max_entries: usize) -> Self {
        Self {
            key,
            by_volume: HashMap::new(),
            max_entries: max_entries.max(1),
        }
    }

    /// True when `cred` was minted with the key: answered from the cache for a credential that
    /// verified before, otherwise by [`ClusterKey::verify`] (and remembered when it verifies).
    pub fn verify(&mut self, cred: &Credential) -> bool {
        if self
            .by_volume
            .get(&cred.volume)
            .is_some_and(|known| same_credential(known, cred))
        {
            return true;
        }
        if !self.key.verify(cred) {
            return false;
        }
        if self.by_volume.len() >= self.max_entries
            && !self.by_volume.contains_key(&cred.volume)
            && let Some(evict) = self.by_volume.keys().next().copied()
        {
            self.by_volume.remove(&evict);
        }
        self.by_volume.insert(cred.volume, *cred);
        true
    }

    /// Volumes remembered.
    pub fn len(&self) -> usize {
        self.by_volume.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.by_volume.is_empty()
    }
}

/// Every field equal; the MAC compared without an early exit.
fn same_credential(a: &Credential, b: &Credential) -> bool {
    let diff = a
        .mac
        .iter()
        .zip(&b.mac)
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    let fields = a.volume == b.volume && a.epoch == b.epoch && a.holder == b.holder;
    std::hint::black_box(diff) == 0 && fields
}

/// Lowercase hex.
pub fn hex_encode(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// Parses hex (either case); `None` on odd length or a non-hex digit.
pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_verifies_only_with_its_fields_and_key() {
        let k = ClusterKey::from_bytes([7; 32]);
        let c = k.mint(VolumeId(1), Epoch(5), NodeId(2));
        assert!(k.verify(&c));
        for bad in [
            Credential {
                epoch: Epoch(6),
                ..c
            },
            Credential {
                holder: NodeId(3),
                ..c
            },
            Credential {
                volume: VolumeId(2),
                ..c
            },
        ] {
            assert!(!k.verify(&bad), "{bad:?} must not verify");
        }
        let other = ClusterKey::from_bytes([8; 32]);
        assert!(!other.verify(&c));
    }

    #[test]
    fn verified_credentials_only_skip_the_mac_of_exactly_the_same_credential() {
        let k = ClusterKey::from_bytes([7; 32]);
        let mut cache = VerifiedCredentials::new(k.clone(), 2);
        let c = k.mint(VolumeId(1), Epoch(5), NodeId(2));
        assert!(cache.verify(&c));
        assert!(cache.verify(&c), "the same credential again");
        assert_eq!(cache.len(), 1);
        // Same fields, other MAC bytes (every byte position): verified again, and refused.
        for i in 0..32 {
            let mut forged = c;
            forged.mac[i] ^= 1;
            assert!(!cache.verify(&forged), "MAC byte {i} flipped");
        }
        // The remembered fields with another epoch, holder or volume: refused.
        for bad in [
            Credential {
                epoch: Epoch(6),
                ..c
            },
            Credential {
                holder: NodeId(3),
                ..c
            },
            Credential {
                volume: VolumeId(2),
                ..c
            },
        ] {
            assert!(!cache.verify(&bad), "{bad:?}");
        }
        // Minted with another key: refused.
        let other = ClusterKey::from_bytes([8; 32]).mint(VolumeId(1), Epoch(5), NodeId(2));
        assert!(!cache.verify(&other));
        // A new epoch verifies and replaces the volume's entry; the old one still verifies (it
        // is genuine; the device refuses its epoch).
        let c6 = k.mint(VolumeId(1), Epoch(6), NodeId(2));
        assert!(cache.verify(&c6));
        assert!(cache.verify(&c));
        // Bounded.
        for v in 2..10 {
            assert!(cache.verify(&k.mint(VolumeId(v), Epoch(1), NodeId(1))));
            assert!(cache.len() <= 2);
        }
        assert!(cache.verify(&c6));
    }

    #[test]
    fn handshake_proofs_are_role_bound() {
        let k = ClusterKey::generate();
        let (a, b) = (nonce(), nonce());
        let p = k.handshake_proof(HandshakeRole::Client, &a, &b);
        assert!(k.verify_handshake(HandshakeRole::Client, &a, &b, &p));
        assert!(!k.verify_handshake(HandshakeRole::Server, &a, &b, &p));
        assert!(!k.verify_handshake(HandshakeRole::Client, &b, &a, &p));
    }

    #[test]
    fn key_file_round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let k = ClusterKey::load_or_create(&p).unwrap();
        assert_eq!(ClusterKey::load(&p).unwrap(), k);
        std::fs::write(&p, "abc").unwrap();
        let e = ClusterKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("64 hex digits"), "{e}");
        // Raw key bytes instead of hex text: named as such.
        std::fs::write(&p, [0xffu8, 0xfe, 0x00, 0x9c]).unwrap();
        let e = ClusterKey::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("64 hex digits") && e.contains("4 bytes of binary data"),
            "{e}"
        );
        assert!(ClusterKey::load(&dir.path().join("missing")).is_err());
    }
}
