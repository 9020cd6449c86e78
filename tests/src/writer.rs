//! A writer that records every acknowledged write (a ledger) and a check that every
//! acknowledged write reads back: the "no acknowledged write lost" tests share them.

use crate::nbd::NbdClient;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Block size of the writer.
pub const BS: usize = 64 * 1024;

/// The content of write `id`: its id in the first 8 bytes, then a byte pattern.
pub fn block(id: u64) -> Vec<u8> {
    let mut b = vec![(id % 251) as u8 + 1; BS];
    b[..8].copy_from_slice(&id.to_le_bytes());
    b
}

/// What the writer did.
#[derive(Debug, Default)]
pub struct Ledger {
    /// offset → id of the last acknowledged write.
    pub acked: HashMap<u64, u64>,
    /// offset → writes after the last acknowledged one that failed (a node died): they may or
    /// may not have landed (committed before the failure without the reply getting through).
    pub maybe: HashMap<u64, Vec<u64>>,
    /// The write in flight right now: (offset, id).
    pub in_flight: Option<(u64, u64)>,
    /// id → (offset, outcome) of every write attempted (for failure messages).
    pub history: HashMap<u64, (u64, &'static str)>,
    /// Acknowledged writes.
    pub writes: u64,
    /// Writes that failed, and connection attempts that failed (each counted, unlike `maybe`,
    /// from which a later acknowledged write to the same offset removes them).
    pub errors: u64,
    /// Longest time between two acknowledged writes.
    pub longest_gap: Duration,
}

/// Writes random 64 KiB blocks to `export` through `target` (reconnecting to whatever `target`
/// says when the connection fails), recording every acknowledged write, until `stop`.
pub fn writer(
    export: &str,
    seed: u64,
    size: u64,
    target: Arc<Mutex<SocketAddr>>,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let blocks = size / BS as u64;
    let mut id = 0u64;
    let mut conn: Option<NbdClient> = None;
    let mut last_ok = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if pause.load(Ordering::SeqCst) {
            conn = None;
            std::thread::sleep(Duration::from_millis(10));
            last_ok = Instant::now();
            continue;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => {
                let addr = *target.lock().unwrap();
                match NbdClient::connect(addr, export, Duration::from_secs(60)) {
                    Ok(c) => conn.insert(c),
                    Err(_) => {
                        ledger.lock().unwrap().errors += 1;
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                }
            }
        };
        id += 1;
        let off = rng.gen_range(0..blocks) * BS as u64;
        ledger.lock().unwrap().in_flight = Some((off, id));
        match c.write(off, &block(id)) {
            Ok(()) => {
                let mut l = ledger.lock().unwrap();
                l.acked.insert(off, id);
                l.maybe.remove(&off);
                l.history.insert(id, (off, "acked"));
                l.in_flight = None;
                l.writes += 1;
                l.longest_gap = l.longest_gap.max(last_ok.elapsed());
                last_ok = Instant::now();
            }
            Err(_) => {
                // Unacknowledged: it may or may not have landed.
                let mut l = ledger.lock().unwrap();
                l.maybe.entry(off).or_default().push(id);
                l.history.insert(id, (off, "failed"));
                l.errors += 1;
                l.in_flight = None;
                conn = None;
            }
        }
    }
}

/// Every acknowledged write reads back — or a later write to the same block whose outcome is
/// unknown (it failed when a node died, or was in flight when the writer paused).
pub fn verify(addr: SocketAddr, export: &str, ledger: &Ledger, what: &str) {
    let mut c =
        NbdClient::connect(addr, export, Duration::from_secs(60)).expect("connect to verify");
    for (off, id) in &ledger.acked {
        let got = c.read(*off, BS as u32).expect("read");
        let got_id = u64::from_le_bytes(got[..8].try_into().unwrap());
        let unknown = ledger.maybe.get(off).is_some_and(|m| m.contains(&got_id))
            || ledger
                .in_flight
                .is_some_and(|(o, i)| o == *off && i == got_id);
        let ok = got_id == *id || (got_id > *id && unknown);
        assert!(
            ok,
            "{what}: block at {off} holds write {got_id} (attempted: {:?}), last acknowledged {id}; in flight {:?}",
            ledger.history.get(&got_id),
            ledger.in_flight
        );
        assert_eq!(got, block(got_id), "{what}: block at {off} is torn");
    }
}
