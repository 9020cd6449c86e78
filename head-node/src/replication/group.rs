//! One volume's Raft group on one node, without I/O: the group core.
//!
//! The core owns the raft-rs `RawNode`, the replicated [`VolumeState`], the [`Overlay`] of
//! committed-unflushed data and the bookkeeping of proposals and reads. It never blocks and never
//! reads a clock: a driver feeds it ticks, messages and proposals, persists what it asks, sends
//! what it returns, and acts on its [`Event`]s. The same core runs under the async driver in
//! production and under the deterministic simulation in tests.
//!
//! `Ready` handling is raft-rs's asynchronous form (`advance_append_async`, as TiKV drives it),
//! so a driver may make several log writes durable at once, in order, while the group goes on:
//! [`GroupCore::ready`] returns the messages to send at once, applies a snapshot and the
//! committed entries to the state machine, applies the log write to the in-memory log (raft-rs
//! reads entries from there before they are durable), advances, and returns the write to make
//! durable with the messages that must wait for it; [`GroupCore::persisted`], called for each
//! write once it is durable, in order, tells raft-rs (`on_persist_ready`, which lets it count
//! this node's copy towards a commit) and hands back those messages. raft-rs applies only
//! entries that are durable here as well as committed.

use super::GroupId;
use super::entry::{EntryError, EntryHeader, VolumeState};
use super::memlog::RaftLog;
use super::overlay::Overlay;
use crate::volume::session::{ClientSession, SessionFloors};
use bytes::Bytes;
use common::ids::NodeId;
use raft::prelude::{
    ConfChange, ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, MessageType,
    Snapshot,
};
use raft::{ProgressState, RawNode, ReadOnlyOption, StateRole};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

/// Raft timing and limits of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// Ticks without a heartbeat before a follower campaigns (plus a random 0..this jitter).
    pub election_tick: usize,
    /// Ticks between heartbeats.
    pub heartbeat_tick: usize,
    /// Largest append message (entries beyond it wait for the next one; one entry always fits).
    pub max_size_per_msg: u64,
    /// Append messages in flight per follower.
    pub max_inflight_msgs: usize,
    /// Largest batch of committed entries handed out per ready.
    pub max_committed_size_per_ready: u64,
    /// Snapshot exactly at the applied index, every `compact_every` state entries (the
    /// metadata group, whose state is not replay-safe), instead of at the flushed index.
    pub exact_snapshots: bool,
    /// State entries between two exact snapshots.
    pub compact_every: u64,
    /// This node lost its Raft state and rejoins: the group neither votes nor campaigns until
    /// it holds everything its leader has committed, up to an entry of the leader's own term
    /// (see [`GroupCore::rejoining`]).
    pub rejoining: bool,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            election_tick: 10,
            heartbeat_tick: 2,
            max_size_per_msg: 4 << 20,
            max_inflight_msgs: 256,
            max_committed_size_per_ready: 64 << 20,
            exact_snapshots: false,
            compact_every: 256,
            rejoining: false,
        }
    }
}

/// Errors of the group core.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// Raft refused (not leader, proposal dropped, …).
    #[error("raft: {0}")]
    Raft(String),
    /// This node is not the leader; `leader` is who is, if known.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The known leader.
        leader: Option<NodeId>,
    },
    /// A log entry this build cannot read.
    #[error(transparent)]
    Entry(#[from] EntryError),
    /// A data entry that does not fit the volume (see [`EntryHeader::check_data`]).
    #[error("invalid entry: {0}")]
    Invalid(String),
    /// A proposal for a client connection the client has replaced (see
    /// [`crate::volume::session`]).
    #[error("{0} has ended: the client connected again since")]
    SessionEnded(ClientSession),
}

impl From<raft::Error> for GroupError {
    fn from(e: raft::Error) -> Self {
        GroupError::Raft(e.to_string())
    }
}

/// What happened inside the core that its driver must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The proposal `tag` was committed and applied at `index`.
    Applied {
        /// The proposer's tag.
        tag: u64,
        /// Its log index.
        index: u64,
    },
    /// The proposal `tag` will never be applied (leadership changed); the caller retries.
    Dropped {
        /// The proposer's tag.
        tag: u64,
    },
    /// A linearizable read `tag` may be served once applied reaches `index`.
    ReadReady {
        /// The reader's tag.
        tag: u64,
        /// The read index.
        index: u64,
    },
    /// This node became leader in `term` and has applied an entry of its term: it may claim
    /// the sleds with epoch `term`, flush the unflushed tail and serve.
    LeaderReady {
        /// The term (and fencing epoch).
        term: u64,
    },
    /// This node stopped being leader (or never was in this term).
    SteppedDown {
        /// The new term.
        term: u64,
        /// The new leader, if known.
        leader: Option<NodeId>,
    },
    /// A data entry was committed (the leader's flusher needs it).
    Committed {
        /// Its index.
        index: u64,
    },
    /// Everything at or below `index` is on the sleds (a `FlushedUpTo` was applied).
    Flushed {
        /// The flushed index.
        index: u64,
    },
    /// A metadata entry changed the volume state.
    StateChanged,
    /// A snapshot replaced the state (the overlay was cleared).
    SnapshotApplied {
        /// Its index.
        index: u64,
    },
    /// A committed entry could not be decoded: the group must stop.
    Fatal(String),
}

/// What one `Ready` asks the driver to do before [`GroupCore::persisted`].
#[derive(Debug)]
pub struct ReadyWork {
    /// Messages to send now (before the write is durable).
    pub messages: Vec<Message>,
    /// What to make durable (already applied to the in-memory log).
    pub write: LogWrite,
    /// The raft-rs ready number (0: a write of this core's own, no ready).
    number: u64,
    /// Messages to send once the write is durable (a follower's answers, votes).
    after: Vec<Message>,
    /// The index of the snapshot it installs: applied (for raft-rs) once it is durable.
    snapshot_index: Option<u64>,
}

/// A durable change of a group's log.
#[derive(Debug, Default, Clone)]
pub struct LogWrite {
    /// Entries to append (replacing any at or after the first one's index).
    pub entries: Vec<Entry>,
    /// New hard state.
    pub hard_state: Option<HardState>,
    /// New membership.
    pub conf_state: Option<ConfState>,
    /// A snapshot to install.
    pub snapshot: Option<Snapshot>,
    /// Store this snapshot (metadata and volume state at its index) and drop the entries at or
    /// below its index.
    pub compact: Option<Snapshot>,
}

impl LogWrite {
    /// True when nothing needs to be written.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.hard_state.is_none()
            && self.conf_state.is_none()
            && self.snapshot.is_none()
            && self.compact.is_none()
    }
}

/// The context of a rejoining node's ReadIndex request starts with this, followed by the
/// node's last log index (little-endian u64): 17 bytes, so never taken for a read's 8-byte tag.
const REJOIN_CTX: &[u8] = b"rejoining";

/// The last log index a rejoining node's ReadIndex context carries.
fn rejoin_last_index(ctx: &[u8]) -> Option<u64> {
    let rest = ctx.strip_prefix(REJOIN_CTX)?;
    Some(u64::from_le_bytes(rest.try_into().ok()?))
}

/// The group core.
pub struct GroupCore<L: RaftLog> {
    group: GroupId,
    node: NodeId,
    raw: RawNode<L>,
    log: L,
    cfg: GroupConfig,
    seed: u64,
    /// The replicated state (everything but data).
    pub state: VolumeState,
    /// Committed data not yet known to be on the sleds.
    pub overlay: Overlay,
    /// The session entries this node has proposed (applied or not): a proposal for an older
    /// session is refused from the moment the newer one is in the log. Never lowered: a
    /// session entry a leadership change dropped was still the client's choice.
    proposed_sessions: SessionFloors,
    applied: u64,
    pending: BTreeMap<u64, (u64, u64)>,
    reads: Vec<u64>,
    role: StateRole,
    term: u64,
    leader: u64,
    /// Index of this leader's first entry in its term; serving waits until it is applied.
    leader_ready_at: Option<u64>,
    leader_ready_sent: bool,
    pending_compact: Option<u64>,
    /// State entries applied since the last exact snapshot.
    since_snapshot: u64,
    /// Set while this node rejoins after losing its state (see [`GroupCore::rejoining`]).
    rejoining: bool,
    /// The leader's commit index, once it answered this node's rejoining ReadIndex.
    rejoin_target: Option<u64>,
    /// Ticks spent rejoining (paces the ReadIndex requests).
    rejoin_ticks: u64,
    /// Writes handed out by [`GroupCore::ready`] and not yet [`GroupCore::persisted`].
    writes_in_flight: usize,
    /// Ticks held back, and whether a campaign was asked for, while the sole voter, not
    /// leading, has writes in flight (see [`GroupCore::tick`]).
    ticks_owed: u64,
    campaign_owed: bool,
    events: Vec<Event>,
    /// Every applied entry `(index, term, context, data)`, for the simulation's invariants.
    #[cfg(test)]
    pub(crate) trace: Vec<(u64, u64, Bytes, Bytes)>,
}

impl<L: RaftLog> std::fmt::Debug for GroupCore<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCore")
            .field("group", &self.group)
            .field("node", &self.node)
            .field("role", &self.role)
            .field("term", &self.term)
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

impl<L: RaftLog> GroupCore<L> {
    /// A core over `log` (which holds the group's persisted state). `seed` drives the election
    /// jitter so a simulation replays exactly.
    pub fn new(
        group: GroupId,
        node: NodeId,
        log: L,
        cfg: GroupConfig,
        seed: u64,
    ) -> Result<Self, GroupError> {
        // raft-rs draws its election timeout from a thread RNG whenever it resets its timer;
        // every call into raft is followed by `sync_jitter`, which replaces that draw with one
        // from our seeded RNG before a tick can elapse, so runs replay exactly.
        let rcfg = raft::Config {
            id: node.0,
            election_tick: cfg.election_tick,
            heartbeat_tick: cfg.heartbeat_tick,
            min_election_tick: cfg.election_tick,
            max_election_tick: 2 * cfg.election_tick,
            max_size_per_msg: cfg.max_size_per_msg,
            max_inflight_msgs: cfg.max_inflight_msgs,
            max_committed_size_per_ready: cfg.max_committed_size_per_ready,
            check_quorum: true,
            pre_vote: true,
            // ReadIndex, not leases: a leader paused (SIGSTOP, a long GC, a VM freeze) would
            // still believe its lease valid when it resumes and answer stale reads.
            read_only_option: ReadOnlyOption::Safe,
            ..Default::default()
        };
        rcfg.validate()?;
        let snap = log.snapshot(0, 0).ok();
        let state = match &snap {
            Some(s) => VolumeState::decode(&s.data)?,
            None => VolumeState::default(),
        };
        let applied = snap.as_ref().map_or(0, |s| s.get_metadata().index);
        let rcfg = raft::Config { applied, ..rcfg };
        let logger = super::slog_bridge::logger(&group, node.0);
        let raw = RawNode::new(&rcfg, log.clone(), &logger)?;
        let rejoining = cfg.rejoining;
        let mut core = Self {
            group,
            node,
            raw,
            log,
            cfg,
            seed: {
                let mut r = ChaCha8Rng::seed_from_u64(seed ^ node.0);
                r.r#gen()
            },
            state,
            overlay: Overlay::new(),
            proposed_sessions: SessionFloors::default(),
            applied,
            pending: BTreeMap::new(),
            reads: Vec::new(),
            role: StateRole::Follower,
            term: 0,
            leader: 0,
            leader_ready_at: None,
            leader_ready_sent: false,
            pending_compact: None,
            since_snapshot: 0,
            rejoining,
            rejoin_target: None,
            rejoin_ticks: 0,
            writes_in_flight: 0,
            ticks_owed: 0,
            campaign_owed: false,
            events: Vec::new(),
            #[cfg(test)]
            trace: Vec::new(),
        };
        core.sync_jitter();
        Ok(core)
    }

    /// The group.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// This node.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// True when this node is the leader.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        let l = self.raw.raft.leader_id;
        (l != raft::INVALID_ID).then_some(NodeId(l))
    }

    /// The role.
    pub fn role(&self) -> StateRole {
        self.raw.raft.state
    }

    /// Highest applied index.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Highest committed index.
    pub fn committed(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    /// Voters of the group.
    pub fn voters(&self) -> Vec<u64> {
        self.raw.raft.prs().conf().voters().ids().iter().collect()
    }

    /// The election timeout this node uses in its current (term, role, leader): a pure function
    /// of the seed and that state, so a run replays exactly whatever raft-rs's own RNG drew.
    fn desired_timeout(&self) -> usize {
        let e = self.cfg.election_tick;
        let r = &self.raw.raft;
        let mut x = self.seed
            ^ r.term.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ (r.state as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9)
            ^ r.leader_id.wrapping_mul(0x94d0_49bb_1331_11eb);
        // splitmix64 finaliser
        x ^= x >> 30;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 27;
        x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        e + (x % e as u64) as usize
    }

    /// Replaces a timer reset drawn by raft-rs's thread RNG with our seeded choice.
    fn sync_jitter(&mut self) {
        let want = self.desired_timeout();
        if self.raw.raft.randomized_election_timeout() != want {
            self.raw.raft.set_randomized_election_timeout(want);
        }
    }

    /// True while this node rejoins the group after losing its Raft state (its log and the
    /// votes it cast are gone, though its peers counted them). Such a node must not vote: it
    /// could elect a peer that lacks entries committed with this node's help before the loss
    /// (with a third node down, nobody would be left to object), and acknowledged writes would
    /// be lost. Nor may it campaign: a lagging peer could elect it. It only follows: it asks
    /// the leader for its commit index (a ReadIndex round, which a leader answers only once it
    /// has committed an entry of its own term, so the index covers everything committed
    /// before, in any term) and rejoins for good once its own log is committed that far.
    pub fn rejoining(&self) -> bool {
        self.rejoining
    }

    /// One tick of the logical clock. A rejoining follower's election clock stands still, so
    /// it never campaigns; every election timeout it asks the leader for its commit index
    /// again (a leader that has not committed in its term yet, or a lost message, gives no
    /// answer), telling it where its log ends: a leader that recorded more as replicated to
    /// this node before it lost its state replicates to it afresh (see `forget_progress`).
    ///
    /// The group's only voter, when not leading, ticks only with none of its log writes in
    /// flight (ticks meanwhile are held and given once the last one is durable): it becomes
    /// leader the moment it campaigns, and raft-rs requires every entry of a new leader's log
    /// to be durable. In a larger group the vote requests go out only once the candidate's
    /// earlier writes are durable, so an election cannot end before they are.
    pub fn tick(&mut self) {
        if self.must_wait_for_writes() {
            self.ticks_owed += 1;
            return;
        }
        self.tick_now();
    }

    /// True while this node may not campaign: the only voter, not leading, with log writes in
    /// flight.
    fn must_wait_for_writes(&self) -> bool {
        if self.writes_in_flight == 0 || self.is_leader() {
            return false;
        }
        let voters = self.raw.raft.prs().conf().voters().ids();
        voters.len() == 1 && voters.contains(self.raw.raft.id)
    }

    fn tick_now(&mut self) {
        if self.rejoining && !self.is_leader() {
            self.rejoin_ticks += 1;
            if self.rejoin_ticks % self.cfg.election_tick.max(1) as u64 == 1
                && self.leader().is_some()
            {
                let mut ctx = REJOIN_CTX.to_vec();
                ctx.extend_from_slice(&self.raw.raft.raft_log.last_index().to_le_bytes());
                self.raw.read_index(ctx);
            }
            return;
        }
        self.raw.tick();
        self.sync_jitter();
    }

    /// Starts an election now (tests, leadership transfer). A rejoining node does not.
    /// With log writes in flight, it starts once they are durable (see [`GroupCore::tick`]).
    pub fn campaign(&mut self) -> Result<(), GroupError> {
        if self.rejoining {
            return Ok(());
        }
        if self.must_wait_for_writes() {
            self.campaign_owed = true;
            return Ok(());
        }
        let r = self.raw.campaign();
        self.sync_jitter();
        Ok(r?)
    }

    /// Delivers a message from a peer.
    pub fn step(&mut self, mut msg: Message) -> Result<(), GroupError> {
        match msg.get_msg_type() {
            MessageType::MsgHeartbeat => self.guard_heartbeat(&mut msg),
            MessageType::MsgReadIndex if self.is_leader() => {
                if let Some(last) = msg.entries.first().and_then(|e| rejoin_last_index(&e.data)) {
                    self.forget_progress(msg.from, last);
                }
            }
            _ => {}
        }
        if self.rejoining
            && matches!(
                msg.get_msg_type(),
                MessageType::MsgRequestVote
                    | MessageType::MsgRequestPreVote
                    | MessageType::MsgTimeoutNow
            )
        {
            // No vote, no pre-vote, no leadership handed over: the candidate hears nothing and
            // its election times out.
            return Ok(());
        }
        let r = self.raw.step(msg);
        self.sync_jitter();
        self.check_rejoined();
        Ok(r?)
    }

    /// A leader's heartbeat carries the commit index up to what it believes this node holds.
    /// A node that lost its state holds less: raft would take the index as committed here
    /// (and abort when it lies past the log's end). While rejoining, and whenever the index
    /// lies past the end, only appends (which check that the logs match) advance the commit.
    fn guard_heartbeat(&mut self, msg: &mut Message) {
        let log = &self.raw.raft.raft_log;
        if msg.commit > log.last_index() && !self.rejoining {
            tracing::warn!(group = %self.group, node_id = self.node.0, leader = msg.from,
                leader_commit = msg.commit, last_index = log.last_index(),
                "the leader believes this node holds log entries it does not: its Raft state \
                 was lost; stop it and start it with --rejoin");
        }
        if self.rejoining || msg.commit > log.last_index() {
            msg.commit = msg.commit.min(log.committed);
        }
    }

    /// On the leader: a rejoining peer said its log ends at `last`. What this leader recorded
    /// as replicated to it before it lost its state is gone: its progress starts again from
    /// `last` as a probe (the logs' first mismatch, or a snapshot, is found from there). Safe
    /// for the commit index, which never moves back and only counts acknowledgements to come.
    fn forget_progress(&mut self, peer: u64, last: u64) {
        let leader_last = self.raw.raft.raft_log.last_index();
        let Some(pr) = self.raw.raft.mut_prs().get_mut(peer) else {
            return;
        };
        if pr.matched <= last {
            // The progress may still be stale: a snapshot sent to the emptied peer that is no
            // newer than what the leader recorded as its match is acknowledged with an index
            // that raises nothing, and the progress would wait for it forever.
            if pr.state == ProgressState::Snapshot && pr.matched >= pr.pending_snapshot {
                pr.become_probe();
            }
            return;
        }
        tracing::info!(group = %self.group, peer, recorded = pr.matched, last,
            "a rejoining peer lost log entries it had acknowledged; replicating to it afresh");
        pr.matched = 0;
        pr.become_probe();
        pr.next_idx = last.min(leader_last) + 1;
    }

    /// Ends rejoining once this node's log is committed up to the leader's answer, and durable
    /// that far (a vote must never rest on entries a crash could still take back).
    fn check_rejoined(&mut self) {
        let Some(target) = self.rejoin_target.filter(|_| self.rejoining) else {
            return;
        };
        let log = &self.raw.raft.raft_log;
        if log.committed.min(log.persisted) >= target {
            self.rejoining = false;
            tracing::info!(
                group = %self.group,
                node_id = self.node.0,
                committed = target,
                "rejoined: this node holds everything committed and votes again"
            );
        }
    }

    /// Tells raft a peer could not be reached (it slows down sending to it).
    pub fn report_unreachable(&mut self, peer: u64) {
        self.raw.report_unreachable(peer);
    }

    /// Proposes an entry; returns its index. `tag` comes back in [`Event::Applied`] or
    /// [`Event::Dropped`].
    pub fn propose(
        &mut self,
        tag: u64,
        header: &EntryHeader,
        data: Bytes,
    ) -> Result<u64, GroupError> {
        self.propose_for(tag, header, data, None)
    }

    /// Proposes an entry on behalf of a client `session`: refused when the client has
    /// connected again since (a session entry of a later generation is applied, or proposed
    /// here). Proposing a session entry ends the older sessions at once, before it commits.
    pub fn propose_for(
        &mut self,
        tag: u64,
        header: &EntryHeader,
        data: Bytes,
        session: Option<ClientSession>,
    ) -> Result<u64, GroupError> {
        if !self.is_leader() {
            return Err(GroupError::NotLeader {
                leader: self.leader(),
            });
        }
        if let Some(s) = session
            && !(self.state.sessions.admits(s) && self.proposed_sessions.admits(s))
        {
            return Err(GroupError::SessionEnded(s));
        }
        if let EntryHeader::ClientSession(s) = header {
            self.proposed_sessions.raise(*s);
        }
        header
            .check_data(data.len(), self.state.spec.as_ref().map(|s| s.size))
            .map_err(GroupError::Invalid)?;
        let before = self.raw.raft.raft_log.last_index();
        self.raw.propose(header.encode(), data.to_vec())?;
        let index = self.raw.raft.raft_log.last_index();
        if index == before {
            return Err(GroupError::Raft("proposal dropped".into()));
        }
        self.pending.insert(index, (self.raw.raft.term, tag));
        Ok(index)
    }

    /// Proposes a membership change; `tag` comes back like a proposal's. (raft-rs turns a
    /// change proposed while another is pending into an empty entry: check the membership
    /// once applied.)
    pub fn propose_conf_change(&mut self, tag: u64, cc: ConfChangeV2) -> Result<u64, GroupError> {
        if !self.is_leader() {
            return Err(GroupError::NotLeader {
                leader: self.leader(),
            });
        }
        let before = self.raw.raft.raft_log.last_index();
        self.raw.propose_conf_change(vec![], cc)?;
        let index = self.raw.raft.raft_log.last_index();
        if index == before {
            return Err(GroupError::Raft("membership change dropped".into()));
        }
        self.pending.insert(index, (self.raw.raft.term, tag));
        Ok(index)
    }

    /// Learners of the group.
    pub fn learners(&self) -> Vec<u64> {
        self.raw
            .raft
            .prs()
            .conf()
            .learners()
            .iter()
            .copied()
            .collect()
    }

    /// On the leader: each peer's matched index.
    pub fn progress(&self) -> Vec<(u64, u64)> {
        if !self.is_leader() {
            return Vec::new();
        }
        let mut v: Vec<(u64, u64)> = self
            .raw
            .raft
            .prs()
            .iter()
            .map(|(id, pr)| (*id, pr.matched))
            .collect();
        v.sort_unstable();
        v
    }

    /// Last index in the log.
    pub fn last_index(&self) -> u64 {
        self.raw.raft.raft_log.last_index()
    }

    /// Asks for a linearizable read; [`Event::ReadReady`] carries `tag` back.
    pub fn read_index(&mut self, tag: u64) -> Result<(), GroupError> {
        if !self.is_leader() {
            return Err(GroupError::NotLeader {
                leader: self.leader(),
            });
        }
        self.raw.read_index(tag.to_le_bytes().to_vec());
        self.reads.push(tag);
        Ok(())
    }

    /// Steps down at once because a sled refused a write of this node's term: another node
    /// claimed the volume with a higher epoch (`epoch`).
    ///
    /// The term stays what it is: a sled's epoch is not a Raft term to adopt. A retired
    /// volume's tombstone reads as epoch `u64::MAX`, and adopting it would persist a term no
    /// election can follow (the next campaign overflows) and drag the whole group there
    /// through this node's answers. A real newer leader's term reaches this node through Raft.
    pub fn fenced(&mut self, epoch: u64) {
        if self.is_leader() {
            tracing::info!(group = %self.group, term = self.raw.raft.term, fenced_by = epoch,
                "stepping down: a sled holds a newer claim");
            self.raw
                .raft
                .become_follower(self.raw.raft.term, raft::INVALID_ID);
            self.sync_jitter();
            self.observe_role();
        }
    }

    /// Drains the events produced so far.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// True when the core has something for the driver.
    pub fn has_ready(&self) -> bool {
        self.raw.has_ready() || self.pending_compact.is_some()
    }

    /// The membership in effect (applied).
    fn conf_state(&self) -> ConfState {
        self.raw.raft.prs().conf().to_conf_state()
    }

    fn observe_role(&mut self) {
        let (role, term, leader) = (
            self.raw.raft.state,
            self.raw.raft.term,
            self.raw.raft.leader_id,
        );
        if (role, term, leader) == (self.role, self.term, self.leader) {
            return;
        }
        let was_leader = self.role == StateRole::Leader;
        let changed_role_or_term = role != self.role || term != self.term;
        self.role = role;
        self.term = term;
        self.leader = leader;
        if role == StateRole::Leader {
            if !was_leader {
                self.leader_ready_at = Some(self.raw.raft.raft_log.last_index());
                self.leader_ready_sent = false;
            }
        } else {
            self.leader_ready_at = None;
            self.leader_ready_sent = false;
            if was_leader || changed_role_or_term {
                self.events.push(Event::SteppedDown {
                    term,
                    leader: (leader != raft::INVALID_ID).then_some(NodeId(leader)),
                });
            }
            // Nothing proposed or read here can be answered by this node any more.
            for (_, (_, tag)) in std::mem::take(&mut self.pending) {
                self.events.push(Event::Dropped { tag });
            }
            for tag in std::mem::take(&mut self.reads) {
                self.events.push(Event::Dropped { tag });
            }
        }
    }

    fn maybe_leader_ready(&mut self) {
        if let Some(at) = self.leader_ready_at
            && !self.leader_ready_sent
            && self.applied >= at
            && self.is_leader()
        {
            self.leader_ready_sent = true;
            self.events.push(Event::LeaderReady {
                term: self.raw.raft.term,
            });
        }
    }

    fn apply_entries(&mut self, ents: Vec<Entry>) -> Option<ConfState> {
        let mut conf = None;
        for e in ents {
            if e.index <= self.applied {
                continue;
            }
            self.applied = e.index;
            #[cfg(test)]
            self.trace
                .push((e.index, e.term, e.context.clone(), e.data.clone()));
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if !e.context.is_empty() {
                        match EntryHeader::decode(&e.context) {
                            Ok(Some(h)) => self.apply_header(e.index, h, e.data.clone()),
                            Ok(None) => {}
                            Err(err) => {
                                tracing::error!(group = %self.group, index = e.index, error = %err,
                                    "cannot apply a committed log entry");
                                self.events.push(Event::Fatal(err.to_string()));
                            }
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    if let Ok(cc) = protobuf::Message::parse_from_bytes(&e.data) {
                        let cc: ConfChange = cc;
                        if let Ok(cs) = self.raw.apply_conf_change(&cc) {
                            conf = Some(cs);
                        }
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    if let Ok(cc) = protobuf::Message::parse_from_bytes(&e.data) {
                        let cc: ConfChangeV2 = cc;
                        if let Ok(cs) = self.raw.apply_conf_change(&cc) {
                            conf = Some(cs);
                        }
                    }
                }
            }
            if let Some((term, tag)) = self.pending.remove(&e.index) {
                self.events.push(if term == e.term {
                    Event::Applied {
                        tag,
                        index: e.index,
                    }
                } else {
                    Event::Dropped { tag }
                });
            }
        }
        if conf.is_some() {
            // Store a snapshot with the new membership: a node just added may need one to
            // catch up, and raft-rs refuses a snapshot whose membership lacks its recipient.
            let at = if self.cfg.exact_snapshots {
                self.applied
            } else {
                self.state.flushed
            };
            self.pending_compact = Some(self.pending_compact.unwrap_or(0).max(at));
        }
        self.maybe_leader_ready();
        conf
    }

    fn apply_header(&mut self, index: u64, h: EntryHeader, data: bytes::Bytes) {
        self.state.note_applied(index, &h);
        match &h {
            EntryHeader::Write { .. } | EntryHeader::Zero { .. } => {
                let size = self.state.spec.as_ref().map(|s| s.size);
                if let Err(why) = h.check_data(data.len(), size) {
                    // Never proposed by a correct leader (it checks first). Every node skips
                    // it alike, so the replicas stay the same and none panics on it.
                    tracing::error!(group = %self.group, index, error = %why,
                        "skipping a malformed data entry");
                    return;
                }
                self.overlay.insert(index, h, data);
                self.events.push(Event::Committed { index });
            }
            EntryHeader::FlushedUpTo { index: f } => {
                let f = (*f).min(index);
                self.state.apply(&h);
                self.overlay.remove_upto(f);
                self.pending_compact = Some(self.pending_compact.unwrap_or(0).max(f));
                self.events.push(Event::Flushed { index: f });
            }
            _ => {
                self.state.apply(&h);
                self.events.push(Event::StateChanged);
                if self.cfg.exact_snapshots {
                    self.since_snapshot += 1;
                    if self.since_snapshot >= self.cfg.compact_every {
                        self.since_snapshot = 0;
                        self.pending_compact = Some(index);
                    }
                }
            }
        }
    }

    /// A snapshot at `f` (clamped to what is applied and in the log; with exact snapshots, at
    /// the applied index) carrying the state and the current membership, for compaction;
    /// `None` when there is nothing to store. At `first - 1` it re-stores the snapshot there
    /// with the current membership.
    fn snapshot_at(&self, f: u64) -> Option<Snapshot> {
        let first = self.log.first_index().ok()?;
        let last = self.log.last_index().ok()?;
        let f = if self.cfg.exact_snapshots {
            if self.applied > last {
                return None;
            }
            self.applied
        } else {
            f.max(first - 1).min(self.applied).min(last)
        };
        if f == 0 || f + 1 < first {
            return None;
        }
        let term = self.log.term(f).ok()?;
        let mut snap = Snapshot::default();
        let m = snap.mut_metadata();
        m.index = f;
        m.term = term;
        m.set_conf_state(self.conf_state());
        snap.data = self.state.encode().into();
        Some(snap)
    }

    /// Phase one of a `Ready`: returns the messages to send now and the write to make durable;
    /// the committed entries and a received snapshot are already applied. `None` when there is
    /// nothing to do.
    pub fn ready(&mut self) -> Option<ReadyWork> {
        let compact = match self.pending_compact.take() {
            Some(f) => {
                let snap = self.snapshot_at(f);
                if snap.is_none() && self.cfg.exact_snapshots && self.applied > f.max(1) {
                    // Applied entries not in the log yet: try again after the next write.
                    self.pending_compact = Some(f);
                }
                snap
            }
            None => None,
        };
        if !self.raw.has_ready() {
            self.observe_role();
            // Only a compaction (the persisted hard state must cover it: raft-rs refuses to
            // restart with a commit index below the snapshot).
            compact.as_ref()?;
            let write = LogWrite {
                hard_state: Some(self.raw.raft.hard_state()),
                conf_state: Some(self.conf_state()),
                compact,
                ..LogWrite::default()
            };
            if let Err(e) = self.write_in_memory(&write) {
                self.events.push(Event::Fatal(e.to_string()));
                return None;
            }
            self.writes_in_flight += 1;
            return Some(ReadyWork {
                messages: Vec::new(),
                write,
                number: 0,
                after: Vec::new(),
                snapshot_index: None,
            });
        }
        let mut rd = self.raw.ready();
        let messages = rd.take_messages();
        let mut write = LogWrite {
            compact,
            ..LogWrite::default()
        };
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            match VolumeState::decode(&snap.data) {
                Ok(s) => {
                    self.state = s;
                    self.overlay.clear();
                    self.applied = snap.get_metadata().index;
                    self.events.push(Event::SnapshotApplied {
                        index: snap.get_metadata().index,
                    });
                }
                Err(err) => self.events.push(Event::Fatal(err.to_string())),
            }
            // The snapshot replaces the log up to its index, past any compaction planned
            // before it arrived: storing that one after it would go back (the log refuses).
            write.compact = None;
            write.snapshot = Some(snap);
        }
        let committed = rd.take_committed_entries();
        let applied_to = committed.last().map(|e| e.index);
        if let Some(cs) = self.apply_entries(committed) {
            write.conf_state = Some(cs);
        }
        // A write that drops entries (a compaction) or replaces the log (a snapshot) also
        // writes the membership in effect: otherwise a compaction could drop the entry of a
        // membership change no log record holds, and a restart would bring the node back
        // with the members it had before. (Committed entries are applied only here, so a
        // membership applied is always written with the write of the ready that applied it.)
        if write.conf_state.is_none() && (write.compact.is_some() || write.snapshot.is_some()) {
            write.conf_state = Some(self.conf_state());
        }
        for rs in rd.take_read_states() {
            if rejoin_last_index(&rs.request_ctx).is_some() {
                self.rejoin_target = self.rejoin_target.max(Some(rs.index));
                self.check_rejoined();
                continue;
            }
            let tag = rs
                .request_ctx
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes);
            if let Some(tag) = tag {
                self.reads.retain(|t| *t != tag);
                self.events.push(Event::ReadReady {
                    tag,
                    index: rs.index,
                });
            }
        }
        write.entries = rd.take_entries();
        // What must be durable before raft may go on: entries, a snapshot, a new term or vote
        // (raft-rs's `must_sync`), and what this core adds — a membership or a compaction. A
        // hard state in which only the commit index moved is not: a restarted node recovers
        // the commit index from Raft itself (a leader commits an entry of its new term, a
        // follower learns it from the leader), so a sync of its own — one more `fdatasync` per
        // commit on the leader, per heartbeat on a follower — buys nothing. It is written with
        // the next durable write instead (every durable write carries the current hard
        // state), which keeps it close behind.
        let must_sync = rd.must_sync() || write.conf_state.is_some() || write.compact.is_some();
        if must_sync {
            write.hard_state = Some(self.raw.raft.hard_state());
        } else if let Some(hs) = rd.hs() {
            // In memory only.
            self.log.set_commit(hs.commit);
        }
        let after = rd.take_persisted_messages();
        let number = rd.number();
        // raft-rs reads the entries from the log before they are durable, so they go there
        // first; then it may go on (`on_persist_ready` tells it when they are durable).
        if let Err(e) = self.write_in_memory(&write) {
            self.events.push(Event::Fatal(e.to_string()));
        }
        let snapshot_index = write.snapshot.as_ref().map(|s| s.get_metadata().index);
        self.raw.advance_append_async(rd);
        // The committed entries taken above are applied (raft-rs hands out only entries that
        // are durable here too; a snapshot counts as applied once it is).
        if let Some(i) = applied_to {
            self.raw.advance_apply_to(i);
        }
        self.writes_in_flight += 1;
        self.observe_role();
        Some(ReadyWork {
            messages,
            write,
            number,
            after,
            snapshot_index,
        })
    }

    /// Applies a log write to the in-memory log, in the order the WAL replays it.
    fn write_in_memory(&mut self, write: &LogWrite) -> raft::Result<()> {
        if let Some(s) = &write.snapshot {
            self.log.apply_snapshot(s.clone())?;
        }
        self.log.append(&write.entries)?;
        if let Some(hs) = &write.hard_state {
            self.log.set_hard_state(hs.clone());
        }
        if let Some(cs) = &write.conf_state {
            self.log.set_conf_state(cs.clone());
        }
        if let Some(snap) = &write.compact {
            self.log.compact(snap.clone())?;
        }
        Ok(())
    }

    /// Phase two, once `work.write` is durable (writes become durable in the order
    /// [`GroupCore::ready`] handed them out): tells raft-rs, and returns the messages that had to
    /// wait for the write.
    pub fn persisted(&mut self, work: ReadyWork) -> Result<Vec<Message>, GroupError> {
        let ReadyWork {
            write,
            number,
            after,
            snapshot_index,
            ..
        } = work;
        self.log.made_durable(&write);
        self.writes_in_flight = self.writes_in_flight.saturating_sub(1);
        // A write of this core's own (a compaction) has no ready number.
        if number != 0 {
            self.raw.on_persist_ready(number);
        }
        if let Some(i) = snapshot_index
            && i > self.raw.raft.raft_log.applied()
        {
            self.raw.advance_apply_to(i);
        }
        if !self.must_wait_for_writes() {
            for _ in 0..std::mem::take(&mut self.ticks_owed) {
                self.tick_now();
            }
            if std::mem::take(&mut self.campaign_owed) {
                self.campaign()?;
            }
        }
        self.check_rejoined();
        self.observe_role();
        self.maybe_leader_ready();
        Ok(after)
    }
}
