//! Shared foundations of Stockade: identifiers, credentials, the sled wire protocol, aligned
//! buffers, units, the injected clock, metrics and logging conventions.

pub mod admin;
pub mod aligned;
pub mod clock;
pub mod cred;
pub mod events;
pub mod http_server;
pub mod ids;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod signals;
pub mod sled_client;
pub mod sled_proto;
pub mod throttle;
pub mod units;

pub use aligned::AlignedBuf;
pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use cred::{ClusterKey, Credential};
pub use ids::{ChunkIndex, DeviceId, Epoch, NodeId, SledId, VolumeId};
pub use units::ByteSize;
