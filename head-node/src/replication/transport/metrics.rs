//! Metrics of the peer transport. Label `peer` is a configured node id (bounded by the cluster
//! size) or `unknown` for a refused handshake whose claimed id is not a configured peer.

use common::metrics::{MetricsError, counter_vec, latency_vec, register};
use prometheus::{HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// The transport's metric families.
#[derive(Debug, Clone)]
pub struct PeerMetrics {
    pub(crate) connections: IntGaugeVec,
    pub(crate) connections_established: IntCounterVec,
    pub(crate) messages_sent: IntCounterVec,
    pub(crate) messages_received: IntCounterVec,
    pub(crate) dropped: IntCounterVec,
    pub(crate) frames_sent: IntCounterVec,
    pub(crate) frames_received: IntCounterVec,
    pub(crate) sent_bytes: IntCounterVec,
    pub(crate) received_bytes: IntCounterVec,
    pub(crate) rpc_duration: HistogramVec,
    pub(crate) rpc_failures: IntCounterVec,
    pub(crate) handshake_failures: IntCounterVec,
    pub(crate) protocol_errors: IntCounterVec,
}

impl PeerMetrics {
    /// Registers the families in `r`.
    pub fn new(r: &Registry) -> Result<Self, MetricsError> {
        Ok(Self {
            connections: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "stockade_peer_connections",
                        "Authenticated connections up to each peer head node (0 or 1).",
                    ),
                    &["peer"],
                )?,
            )?,
            connections_established: counter_vec(
                r,
                "stockade_peer_connections_established_total",
                "Connections to each peer that completed the handshake (dialed or accepted).",
                &["peer"],
            )?,
            messages_sent: counter_vec(
                r,
                "stockade_peer_messages_sent_total",
                "Messages written to a peer connection, by kind (raft, request, response).",
                &["peer", "kind"],
            )?,
            messages_received: counter_vec(
                r,
                "stockade_peer_messages_received_total",
                "Messages received from a peer, by kind: raft (decoded and addressed to this node; those then dropped because the inbound channel is full are also in the dropped counter), request, response (matched to a waiting call).",
                &["peer", "kind"],
            )?,
            dropped: counter_vec(
                r,
                "stockade_peer_dropped_messages_total",
                "Raft messages dropped, by reason (unreachable, queue_full, disconnected, too_large, encode, decode, misaddressed, inbound_full, no_handler).",
                &["peer", "reason"],
            )?,
            frames_sent: counter_vec(
                r,
                "stockade_peer_frames_sent_total",
                "Frames written to a peer connection, by kind (raft, request, response, rpc_error, ping).",
                &["peer", "kind"],
            )?,
            frames_received: counter_vec(
                r,
                "stockade_peer_frames_received_total",
                "Frames read from an authenticated peer connection, by kind.",
                &["peer", "kind"],
            )?,
            sent_bytes: counter_vec(
                r,
                "stockade_peer_sent_bytes_total",
                "Bytes written to a peer connection after the handshake (headers included).",
                &["peer"],
            )?,
            received_bytes: counter_vec(
                r,
                "stockade_peer_received_bytes_total",
                "Bytes read from a peer connection after the handshake (headers included).",
                &["peer"],
            )?,
            rpc_duration: latency_vec(
                r,
                "stockade_peer_rpc_duration_seconds",
                "Time from an RPC call to its reply (successful calls).",
                &["peer"],
            )?,
            rpc_failures: counter_vec(
                r,
                "stockade_peer_rpc_failures_total",
                "RPC calls that failed, by reason (unreachable, disconnected, timeout, refused, too_large).",
                &["peer", "reason"],
            )?,
            handshake_failures: counter_vec(
                r,
                "stockade_peer_handshake_failures_total",
                "Handshakes that did not complete, by reason (bad_proof, unknown_node, wrong_node, not_dialer, version, refused, malformed, timeout, io, overload).",
                &["peer", "reason"],
            )?,
            protocol_errors: counter_vec(
                r,
                "stockade_peer_protocol_errors_total",
                "Authenticated connections closed for a bad frame, by reason (checksum, too_large, malformed, unexpected, batch, idle, io).",
                &["peer", "reason"],
            )?,
        })
    }

    pub(crate) fn drop_raft(&self, peer: &str, reason: &str, n: u64) {
        if n > 0 {
            self.dropped.with_label_values(&[peer, reason]).inc_by(n);
        }
    }

    /// Forgets the series of a removed peer (its connection gauge would otherwise linger).
    pub(crate) fn forget_peer(&self, peer: &str) {
        let _ = self.connections.remove_label_values(&[peer]);
    }
}
