//! Identifiers and units that are written to devices and sent on the wire.
//!
//! These are fixed early because they are persisted: a [`VolumeId`] is a 128-bit value that is
//! never reused (a volume's name is only a label), a [`NodeId`] names a head node (the holder of
//! a fencing credential), an [`Epoch`] orders claims, and a [`ChunkIndex`] names a chunk within a
//! volume.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Error parsing an identifier from text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {kind} {text:?}: expected {expected}")]
pub struct ParseIdError {
    kind: &'static str,
    text: String,
    expected: &'static str,
}

/// A volume, for its whole life. Displayed as 32 lowercase hex digits. Zero is reserved (it
/// marks an empty slot on devices); [`VolumeId::random`] never returns it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct VolumeId(pub u128);

impl VolumeId {
    /// A fresh random id (v4 UUID bits); collisions are not a practical concern at 122 bits.
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().as_u128())
    }

    /// Little-endian bytes, as written to devices.
    pub fn to_le_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }

    /// Inverse of [`VolumeId::to_le_bytes`].
    pub fn from_le_bytes(b: [u8; 16]) -> Self {
        Self(u128::from_le_bytes(b))
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeId({self})")
    }
}

impl FromStr for VolumeId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 {
            return Err(ParseIdError {
                kind: "volume id",
                text: s.to_string(),
                expected: "32 hex digits",
            });
        }
        u128::from_str_radix(&hex, 16)
            .map(VolumeId)
            .map_err(|_| ParseIdError {
                kind: "volume id",
                text: s.to_string(),
                expected: "32 hex digits",
            })
    }
}

macro_rules! u64_newtype {
    ($(#[$m:meta])* $name:ident, $kind:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse::<u64>().map($name).map_err(|_| ParseIdError {
                    kind: $kind,
                    text: s.to_string(),
                    expected: "an unsigned 64-bit integer",
                })
            }
        }
    };
}

u64_newtype!(
    /// A head node: the holder named in fencing credentials, and its Raft peer id.
    /// Zero is reserved (raft-rs uses it for "no node").
    NodeId,
    "node id"
);
u64_newtype!(
    /// A fencing epoch. Claims with a higher epoch depose every holder of a lower one.
    Epoch,
    "epoch"
);
u64_newtype!(
    /// The index of a chunk within its volume (byte offset / chunk size).
    ChunkIndex,
    "chunk index"
);

/// A sled or a device: a random 128-bit id written in the device superblock.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Uuid128(pub u128);

impl Uuid128 {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().as_u128())
    }
}

impl fmt::Display for Uuid128 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", uuid::Uuid::from_u128(self.0))
    }
}

impl fmt::Debug for Uuid128 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", uuid::Uuid::from_u128(self.0))
    }
}

impl FromStr for Uuid128 {
    type Err = ParseIdError;
    /// A UUID, with or without hyphens (as sleds and devices are listed).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s.trim())
            .map(|u| Self(u.as_u128()))
            .map_err(|_| ParseIdError {
                kind: "sled or device id",
                text: s.to_string(),
                expected: "a UUID such as 67e55044-10b1-426f-9247-bb680e5fe0c8",
            })
    }
}

/// The sled (machine) a sled controller runs; written in each of its devices' superblocks.
pub type SledId = Uuid128;
/// One storage device of a sled.
pub type DeviceId = Uuid128;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_ids_round_trip_through_text_and_refuse_garbage() {
        let id = Uuid128(0x67e5_5044_10b1_426f_9247_bb68_0e5f_e0c8);
        assert_eq!(id.to_string().parse::<Uuid128>().unwrap(), id);
        assert_eq!(
            "67e5504410b1426f9247bb680e5fe0c8"
                .parse::<Uuid128>()
                .unwrap(),
            id
        );
        let e = "sled-1".parse::<Uuid128>().unwrap_err().to_string();
        assert!(e.contains("sled-1") && e.contains("UUID"), "{e}");
    }

    #[test]
    fn volume_id_round_trips_through_text() {
        let v = VolumeId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let s = v.to_string();
        assert_eq!(s, "0123456789abcdef0011223344556677");
        assert_eq!(s.parse::<VolumeId>().unwrap(), v);
        assert!("xyz".parse::<VolumeId>().is_err());
        assert!("0123".parse::<VolumeId>().is_err());
    }

    #[test]
    fn newtypes_parse_and_reject() {
        assert_eq!("42".parse::<Epoch>().unwrap(), Epoch(42));
        assert!("-1".parse::<NodeId>().is_err());
    }
}
