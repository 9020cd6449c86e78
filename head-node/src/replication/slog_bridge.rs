//! Routes raft-rs's `slog` output into `tracing`, so Raft's own logs land in the same structured
//! stream as everything else (target `raft`, with the group and node ids).

use slog::{Drain, KV, Level, OwnedKVList, Record, Serializer};
use std::fmt::Write;

/// A `slog` drain that forwards to `tracing`.
#[derive(Debug, Clone)]
pub struct TracingDrain;

struct KvText(String);

impl Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        let mut kv = KvText(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let msg = record.msg();
        match record.level() {
            Level::Critical | Level::Error => tracing::error!(target: "raft", "{msg}{}", kv.0),
            Level::Warning => tracing::warn!(target: "raft", "{msg}{}", kv.0),
            Level::Info => tracing::info!(target: "raft", "{msg}{}", kv.0),
            Level::Debug => tracing::debug!(target: "raft", "{msg}{}", kv.0),
            Level::Trace => tracing::trace!(target: "raft", "{msg}{}", kv.0),
        }
        Ok(())
    }
}

/// A logger for one group on one node. Raft's chatty info-level messages (elections, term
/// changes) stay at info; its debug output is only built when tracing wants it.
pub fn logger(group: &super::GroupId, node: u64) -> slog::Logger {
    slog::Logger::root(
        TracingDrain.fuse(),
        slog::o!("group" => group.to_string(), "node_id" => node),
    )
}
