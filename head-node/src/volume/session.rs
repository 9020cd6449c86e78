//! Client sessions: a client that gives up on a head node ends what it left there.
//!
//! A client that rides through head-node failures ([`RemoteVolume`](crate::nbd::client::RemoteVolume),
//! behind `stockade volume attach --local` and the image tools) sends a request to one head
//! node and, when no answer comes, sends it again through another. The head node it left may
//! be frozen rather than dead (SIGSTOP, a VM paused, a long stall) with the request still in
//! its socket or its tasks. Woken up, it would hand that request to the volume's leader after
//! the client had moved on — after a later write of the client to the same blocks — and
//! overwrite it.
//!
//! So such a client names itself: a random 64-bit id for its lifetime, and a generation it
//! raises at every connection ([`ClientSession`], sent in the NBD option
//! [`OPT_SESSION`](crate::nbd::proto::OPT_SESSION)). Before a head node answers `NBD_OPT_GO`
//! for a session it commits the session to the volume's Raft log
//! ([`EntryHeader::ClientSession`](crate::replication::entry::EntryHeader)): from then on the
//! volume's leader refuses every proposal made for an older generation of that client
//! ([`SessionFloors`]). The client sends nothing on the new connection before that answer, so
//! whatever its old connection left behind either reached the log before the session entry
//! (and any later write of the client lands after it) or is refused.
//!
//! The check is made where proposals enter the log, on the leader, against the replicated
//! floors and those the leader has itself proposed (a session entry not yet applied); a new
//! leader applies every committed entry before it serves. Requests carry their session on the
//! task that serves them ([`scope`], [`current`]), and forwarded calls carry it to the leader.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;

/// One connection's identity as a client: who, and which of its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClientSession {
    /// Random, for the client's lifetime.
    pub client: u64,
    /// Raised at each connection of the client.
    pub generation: u64,
}

impl ClientSession {
    /// The data of the NBD option: client id, then generation, both big-endian.
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.client.to_be_bytes());
        b[8..].copy_from_slice(&self.generation.to_be_bytes());
        b
    }

    /// Parses the NBD option's data (exactly 16 bytes).
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b: &[u8; 16] = b.try_into().ok()?;
        let (c, g) = b.split_at(8);
        Some(Self {
            client: u64::from_be_bytes(c.try_into().ok()?),
            generation: u64::from_be_bytes(g.try_into().ok()?),
        })
    }
}

impl std::fmt::Display for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "client {:016x} generation {}",
            self.client, self.generation
        )
    }
}

tokio::task_local! {
    static CURRENT: ClientSession;
}

/// Runs `f` on behalf of `session` (nothing changes with `None`): what it proposes is checked
/// against the session's floor.
pub async fn scope<F: Future>(session: Option<ClientSession>, f: F) -> F::Output {
    match session {
        Some(s) => CURRENT.scope(s, f).await,
        None => f.await,
    }
}

/// The session the current task serves, if any.
pub fn current() -> Option<ClientSession> {
    CURRENT.try_with(|s| *s).ok()
}

/// The most clients a volume remembers. Beyond it the client whose last connection was
/// recorded longest ago is forgotten — by when it connected, not by how busy it is — and its
/// older connections are no longer fenced. That takes this many other clients connecting after
/// its last connection, each with a new id (every `attach --local` endpoint and every image
/// copy is one).
pub const MAX_CLIENTS: usize = 4096;

/// Per client, the oldest generation whose requests are still accepted. Bounded by
/// [`MAX_CLIENTS`]. Raising is absolute (a maximum), so replaying entries over a state that
/// already holds them changes nothing but the eviction order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionFloors {
    /// Client → (floor generation, when it was recorded: `next` at the time).
    floors: BTreeMap<u64, (u64, u64)>,
    next: u64,
}

impl SessionFloors {
    /// Records that `s` is the client's current connection: older generations end.
    pub fn raise(&mut self, s: ClientSession) {
        let at = self.next;
        self.next += 1;
        let e = self.floors.entry(s.client).or_insert((s.generation, at));
        *e = (e.0.max(s.generation), at);
        if self.floors.len() > MAX_CLIENTS
            && let Some(oldest) = self
                .floors
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(c, _)| *c)
        {
            self.floors.remove(&oldest);
        }
    }

    /// Whether requests of `s` may still be proposed.
    pub fn admits(&self, s: ClientSession) -> bool {
        self.floors
            .get(&s.client)
            .is_none_or(|(floor, _)| s.generation >= *floor)
    }

    /// Clients remembered.
    pub fn len(&self) -> usize {
        self.floors.len()
    }

    /// No client remembered.
    pub fn is_empty(&self) -> bool {
        self.floors.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(client: u64, generation: u64) -> ClientSession {
        ClientSession { client, generation }
    }

    #[test]
    fn a_new_generation_ends_the_older_ones_of_its_client_only() {
        let mut f = SessionFloors::default();
        assert!(f.admits(s(1, 1)), "unknown clients are admitted");
        f.raise(s(1, 2));
        assert!(!f.admits(s(1, 1)));
        assert!(f.admits(s(1, 2)));
        assert!(f.admits(s(1, 3)));
        assert!(f.admits(s(2, 1)), "another client");
        // A late, older session entry does not lower the floor.
        f.raise(s(1, 1));
        assert!(!f.admits(s(1, 1)));
        let again = {
            let mut g = f.clone();
            g.raise(s(1, 2));
            g
        };
        assert!(!again.admits(s(1, 1)) && again.admits(s(1, 2)));
    }

    #[test]
    fn the_client_recorded_longest_ago_is_forgotten_first() {
        let mut f = SessionFloors::default();
        for c in 0..MAX_CLIENTS as u64 {
            f.raise(s(c, 5));
        }
        // Client 0 connects again: it is now the most recent.
        f.raise(s(0, 6));
        f.raise(s(u64::MAX, 1));
        assert_eq!(f.len(), MAX_CLIENTS);
        assert!(!f.admits(s(0, 5)), "client 0 was refreshed, not evicted");
        assert!(f.admits(s(1, 4)), "client 1 was the oldest: forgotten");
        assert!(!f.admits(s(2, 4)));
    }

    #[test]
    fn the_option_data_round_trips_and_wrong_lengths_are_refused() {
        let x = s(0x0102_0304_0506_0708, 9);
        let b = x.encode();
        assert_eq!(&b[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(ClientSession::decode(&b), Some(x));
        assert_eq!(ClientSession::decode(&b[..15]), None);
        assert_eq!(ClientSession::decode(&[0; 17]), None);
        assert_eq!(ClientSession::decode(&[]), None);
    }

    #[tokio::test]
    async fn the_session_follows_the_task_that_serves_it() {
        assert_eq!(current(), None);
        let got = scope(Some(s(7, 1)), async { current() }).await;
        assert_eq!(got, Some(s(7, 1)));
        assert_eq!(scope(None, async { current() }).await, None);
        assert_eq!(current(), None);
    }
}
