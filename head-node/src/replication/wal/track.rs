//! What the writer knows about the log on disk: for each group, where the records that make up
//! its current state are (so segments nobody needs can be deleted and the few live records of
//! an old segment can be copied forward), and for each segment, how many of those records it
//! holds.

use crate::replication::log::{LogView, Step};
use raft::prelude::HardState;
use std::collections::{BTreeMap, VecDeque};

/// Where a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub seg: u64,
    pub offset: u64,
    /// Header and body.
    pub len: u32,
}

/// A record that still sets part of a group's state, and the bytes it keeps alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Item {
    pub loc: Loc,
    pub bytes: u64,
}

/// Consecutive live entries written by one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Run {
    pub loc: Loc,
    pub first: u64,
    /// Term of each entry, from `first`.
    pub terms: VecDeque<u64>,
    /// Bytes of each entry in the record body.
    pub sizes: VecDeque<u32>,
    pub bytes: u64,
}

impl Run {
    pub(crate) fn new(loc: Loc, first: u64, terms: &[u64], sizes: &[u32]) -> Self {
        Self {
            loc,
            first,
            terms: terms.iter().copied().collect(),
            sizes: sizes.iter().copied().collect(),
            bytes: sizes.iter().map(|s| u64::from(*s)).sum(),
        }
    }

    /// Last index (the run is never empty).
    pub(crate) fn last(&self) -> u64 {
        self.first + self.terms.len() as u64 - 1
    }
}

/// Per segment: its salt, size, and the live records it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegInfo {
    pub salt: u64,
    pub size: u64,
    /// Items and runs located in this segment.
    pub refs: u64,
    /// Bytes those keep alive (an estimate of what copying them forward costs).
    pub live: u64,
}

/// The segments, by sequence number.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Segments {
    pub map: BTreeMap<u64, SegInfo>,
}

impl Segments {
    pub(crate) fn add(&mut self, seg: u64, bytes: u64) {
        if let Some(s) = self.map.get_mut(&seg) {
            s.refs += 1;
            s.live += bytes;
        }
    }

    pub(crate) fn release(&mut self, seg: u64, bytes: u64) {
        if let Some(s) = self.map.get_mut(&seg) {
            s.refs = s.refs.saturating_sub(1);
            s.live = s.live.saturating_sub(bytes);
        }
    }

    pub(crate) fn replace(&mut self, slot: &mut Option<Item>, new: Option<Item>) {
        if let Some(old) = slot.take() {
            self.release(old.loc.seg, old.bytes);
        }
        if let Some(n) = new {
            self.add(n.loc.seg, n.bytes);
        }
        *slot = new;
    }
}

/// Where a group's state is on disk, and what checking its next writes needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct GroupTrack {
    /// The current hard state (the writer derives the one after an installed snapshot from it).
    pub hs_value: HardState,
    pub hs: Option<Item>,
    pub cs: Option<Item>,
    pub snap: Option<Item>,
    pub trunc: Option<Item>,
    pub snap_index: u64,
    pub truncated: (u64, u64),
    /// Live entries, consecutive from `truncated.0 + 1`.
    pub runs: VecDeque<Run>,
}

impl LogView for GroupTrack {
    fn truncated(&self) -> (u64, u64) {
        self.truncated
    }
    fn last_index(&self) -> u64 {
        self.runs.back().map_or(self.truncated.0, Run::last)
    }
    fn snapshot_index(&self) -> u64 {
        self.snap_index
    }
    fn hard_state(&self) -> HardState {
        self.hs_value.clone()
    }
    fn term_of(&self, index: u64) -> Option<u64> {
        let pos = self.runs.partition_point(|r| r.last() < index);
        let r = self.runs.get(pos)?;
        if index < r.first {
            return None;
        }
        r.terms.get((index - r.first) as usize).copied()
    }
}

/// What a step of a write did, as the writer applies it: the step and where its record went.
#[derive(Debug)]
pub(crate) enum Applied<'a> {
    Append {
        first: u64,
        terms: &'a [u64],
        sizes: &'a [u32],
    },
    HardState(&'a HardState),
    /// A snapshot's index and term (install or store).
    Snapshot {
        index: u64,
        term: u64,
    },
    Other,
}

impl GroupTrack {
    /// Every segment this group's state lives in, once per item or run.
    pub(crate) fn for_each_ref(&self, mut f: impl FnMut(u64, u64)) {
        for i in [&self.hs, &self.cs, &self.snap, &self.trunc]
            .into_iter()
            .flatten()
        {
            f(i.loc.seg, i.bytes);
        }
        for r in &self.runs {
            f(r.loc.seg, r.bytes);
        }
    }

    /// Releases everything (the group is removed).
    pub(crate) fn release_all(&mut self, segs: &mut Segments) {
        self.for_each_ref(|seg, bytes| segs.release(seg, bytes));
        *self = GroupTrack::default();
    }

    fn truncate_from(&mut self, index: u64, segs: &mut Segments) {
        while let Some(r) = self.runs.back_mut() {
            if r.first >= index {
                segs.release(r.loc.seg, r.bytes);
                self.runs.pop_back();
                continue;
            }
            let keep = (index - r.first) as usize;
            while r.terms.len() > keep {
                r.terms.pop_back();
                if let Some(s) = r.sizes.pop_back() {
                    r.bytes -= u64::from(s);
                    if let Some(info) = segs.map.get_mut(&r.loc.seg) {
                        info.live = info.live.saturating_sub(u64::from(s));
                    }
                }
            }
            break;
        }
    }

    fn compact_to(&mut self, index: u64, segs: &mut Segments) {
        while let Some(r) = self.runs.front_mut() {
            if r.last() < index {
                segs.release(r.loc.seg, r.bytes);
                self.runs.pop_front();
                continue;
            }
            while r.first < index {
                r.terms.pop_front();
                r.first += 1;
                if let Some(s) = r.sizes.pop_front() {
                    r.bytes -= u64::from(s);
                    if let Some(info) = segs.map.get_mut(&r.loc.seg) {
                        info.live = info.live.saturating_sub(u64::from(s));
                    }
                }
            }
            break;
        }
    }

    /// Applies one planned step whose record is at `loc` (`applied` carries what the step
    /// needs from its op).
    pub(crate) fn apply(
        &mut self,
        step: &Step,
        applied: Applied<'_>,
        loc: Loc,
        segs: &mut Segments,
    ) {
        let item = |bytes: u64| Some(Item { loc, bytes });
        let len = u64::from(loc.len);
        match step {
            Step::Append { .. } => {
                if let Applied::Append {
                    first,
                    terms,
                    sizes,
                } = applied
                    && !terms.is_empty()
                {
                    self.truncate_from(first, segs);
                    let run = Run::new(loc, first, terms, sizes);
                    segs.add(loc.seg, run.bytes);
                    self.runs.push_back(run);
                }
            }
            Step::HardState { .. } => {
                if let Applied::HardState(hs) = applied {
                    self.hs_value = hs.clone();
                }
                segs.replace(&mut self.hs, item(len));
            }
            Step::ConfState { .. } => segs.replace(&mut self.cs, item(len)),
            Step::ApplySnapshot { hard_state, .. } => {
                if let Applied::Snapshot { index, term } = applied {
                    self.truncated = (index, term);
                    self.snap_index = index;
                }
                self.hs_value = hard_state.clone();
                while let Some(r) = self.runs.pop_back() {
                    segs.release(r.loc.seg, r.bytes);
                }
                segs.replace(&mut self.hs, item(0));
                segs.replace(&mut self.cs, item(0));
                segs.replace(&mut self.trunc, item(0));
                segs.replace(&mut self.snap, item(len));
            }
            Step::SetSnapshot { .. } => {
                if let Applied::Snapshot { index, .. } = applied {
                    self.snap_index = index;
                }
                segs.replace(&mut self.snap, item(len));
            }
            Step::Compact { index, term } => {
                self.compact_to(*index, segs);
                self.truncated = (index - 1, *term);
                segs.replace(&mut self.trunc, item(len));
            }
            Step::Remove => self.release_all(segs),
        }
    }

    /// Entries `[first, first + sizes.len())` were copied to `loc` (segment clean-up): the run
    /// starting at `first` now lives there.
    pub(crate) fn move_run(&mut self, first: u64, loc: Loc, segs: &mut Segments) {
        if let Some(r) = self.runs.iter_mut().find(|r| r.first == first) {
            segs.release(r.loc.seg, r.bytes);
            r.loc = loc;
            segs.add(loc.seg, r.bytes);
        }
    }
}
