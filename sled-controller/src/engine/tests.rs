//! The same engine tests over the io_uring, sync and mem engines.

use super::devfile::{DevFile, DevFileError};
use super::mem::{MemEngine, MemImage, filled};
use super::sync::SyncEngine;
use super::uring::UringEngine;
use super::*;
use std::collections::HashMap;
use std::path::PathBuf;

/// A scratch directory on a disk-backed file system (O_DIRECT does not work on tmpfs).
pub(crate) fn scratch_dir() -> tempfile::TempDir {
    let base = std::env::var_os("STOCKADE_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-scratch")
        });
    std::fs::create_dir_all(&base).expect("create scratch base");
    tempfile::Builder::new()
        .prefix("engine-")
        .tempdir_in(base)
        .expect("scratch dir")
}

const SIZE: u64 = 64 << 20;

/// Runs `f` over each engine kind with a fresh 64 MiB device.
fn each_engine(f: impl Fn(&str, &mut dyn IoEngine)) {
    let dir = scratch_dir();
    {
        let dev = DevFile::open(&dir.path().join("uring.img"), Some(SIZE)).unwrap();
        let mut e = UringEngine::new(dev, 32).unwrap();
        f("uring", &mut e);
    }
    {
        let dev = DevFile::open(&dir.path().join("sync.img"), Some(SIZE)).unwrap();
        let mut e = SyncEngine::new(dev, 32);
        f("sync", &mut e);
    }
    {
        let mut e = MemEngine::new(MemImage::new(SIZE));
        f("mem", &mut e);
    }
    {
        let mut e = MemEngine::crash_model(MemImage::new(SIZE), 7);
        f("mem-crash", &mut e);
    }
}

/// Collects completions until every tag in `tags` has completed.
fn drain(e: &mut dyn IoEngine, tags: usize) -> HashMap<u64, Completion> {
    let bell = Doorbell::new().unwrap();
    let mut got = HashMap::new();
    let mut out = Vec::new();
    while got.len() < tags {
        e.poll(Some(Duration::from_millis(100)), &bell, &mut out)
            .unwrap();
        for c in out.drain(..) {
            assert!(got.insert(c.tag, c).is_none(), "tag completed twice");
        }
    }
    got
}

#[test]
fn writes_then_reads_many_in_flight() {
    each_engine(|name, e| {
        assert_eq!(e.size(), SIZE, "{name}");
        for i in 0..16u64 {
            e.submit(Op {
                tag: i,
                kind: OpKind::Write {
                    buf: filled(8192, i as u8 + 1),
                    offset: i * 1_048_576,
                    dsync: i % 2 == 0,
                },
            })
            .unwrap();
        }
        let done = drain(e, 16);
        for (tag, c) in &done {
            assert_eq!(*c.result.as_ref().unwrap(), 8192, "{name} tag {tag}");
            assert!(c.buf.is_some());
        }
        e.submit(Op {
            tag: 100,
            kind: OpKind::Fsync,
        })
        .unwrap();
        drain(e, 1)[&100].result.as_ref().unwrap();
        for i in 0..16u64 {
            e.submit(Op {
                tag: 200 + i,
                kind: OpKind::Read {
                    buf: AlignedBuf::zeroed(8192),
                    offset: i * 1_048_576,
                },
            })
            .unwrap();
        }
        let done = drain(e, 16);
        for i in 0..16u64 {
            let c = &done[&(200 + i)];
            let buf = c.buf.as_ref().unwrap();
            assert!(buf.iter().all(|&b| b == i as u8 + 1), "{name} block {i}");
        }
    });
}

#[test]
fn zero_range_reads_zeros() {
    each_engine(|name, e| {
        write_sync(e, 1 << 20, filled(1 << 20, 0xab)).unwrap();
        run_sync(
            e,
            OpKind::ZeroRange {
                offset: (1 << 20) + 4096,
                len: 8192,
            },
        )
        .unwrap();
        run_sync(e, OpKind::Fsync).unwrap();
        let b = read_sync(e, 1 << 20, 4 * 4096).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0xab), "{name}");
        assert!(b[4096..12288].iter().all(|&x| x == 0), "{name}");
        assert!(b[12288..].iter().all(|&x| x == 0xab), "{name}");
    });
}

#[test]
fn full_engine_hands_the_op_back() {
    each_engine(|name, e| {
        let cap = e.capacity();
        let mut accepted = 0;
        let mut refused = None;
        for i in 0..(cap as u64 + 8) {
            let op = Op {
                tag: i,
                kind: OpKind::Write {
                    buf: filled(4096, 9),
                    offset: i * 4096,
                    dsync: false,
                },
            };
            match e.submit(op) {
                Ok(()) => accepted += 1,
                Err(back) => {
                    // The op comes back intact: same tag, same buffer.
                    assert_eq!(back.tag, i);
                    match &back.kind {
                        OpKind::Write { buf, .. } => assert!(buf.iter().all(|&b| b == 9)),
                        other => panic!("{other:?}"),
                    }
                    refused = Some(back);
                    break;
                }
            }
        }
        // Sync-style engines complete at submission but still bound the uncollected ones.
        assert!(accepted <= cap, "{name}: {accepted} > {cap}");
        let back = refused.unwrap_or_else(|| panic!("{name} never pushed back"));
        drain(e, accepted);
        e.submit(back).unwrap();
        drain(e, 1);
    });
}

#[test]
fn out_of_range_is_an_error_not_a_panic() {
    each_engine(|name, e| {
        let r = read_sync(e, SIZE, 4096);
        assert!(r.is_err(), "{name}: read past the end succeeded");
    });
}

#[test]
fn large_io_round_trips() {
    each_engine(|name, e| {
        let mut buf = AlignedBuf::zeroed(8 << 20);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        let copy = buf.clone();
        write_sync(e, 4 << 20, buf).unwrap();
        let back = read_sync(e, 4 << 20, 8 << 20).unwrap();
        assert!(back[..] == copy[..], "{name}");
    });
}

#[test]
fn doorbell_wakes_a_blocked_poll() {
    each_engine(|name, e| {
        // A blocking run_sync first arms (in io_uring) a watch on its own temporary doorbell:
        // the engine must still watch the doorbell it is given next.
        write_sync(e, 0, filled(4096, 1)).unwrap();
        read_sync(e, 0, 4096).unwrap();
        let bell = std::sync::Arc::new(Doorbell::new().unwrap());
        let b2 = bell.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            b2.ring();
        });
        let start = std::time::Instant::now();
        let mut out = Vec::new();
        e.poll(Some(Duration::from_secs(10)), &bell, &mut out)
            .unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{name}: doorbell did not wake the poll"
        );
        t.join().unwrap();
    });
}

#[test]
fn crash_model_drops_unsynced_writes_and_keeps_synced_ones() {
    // Over many seeds: a dsync write and an fsynced write always survive a cut.
    for seed in 0..50 {
        let img = MemImage::new(SIZE);
        let mut e = MemEngine::crash_model(img.clone(), seed);
        write_sync(&mut e, 0, filled(4096, 1)).unwrap();
        run_sync(
            &mut e,
            OpKind::Write {
                buf: filled(4096, 2),
                offset: 4096,
                dsync: false,
            },
        )
        .unwrap();
        run_sync(&mut e, OpKind::Fsync).unwrap();
        run_sync(
            &mut e,
            OpKind::Write {
                buf: filled(4096, 3),
                offset: 8192,
                dsync: false,
            },
        )
        .unwrap();
        img.power_cut(seed);
        assert!(img.read(0, 4096).iter().all(|&b| b == 1), "seed {seed}");
        assert!(img.read(4096, 4096).iter().all(|&b| b == 2), "seed {seed}");
        let third = img.read(8192, 4096);
        assert!(
            third.iter().all(|&b| b == 3) || third.iter().all(|&b| b == 0),
            "seed {seed}: an unsynced 4 KiB block is either there or not"
        );
        // The old engine is dead after the cut.
        assert!(read_sync(&mut e, 0, 4096).is_err());
    }
}

#[test]
fn device_file_errors_are_clear() {
    let dir = scratch_dir();
    let missing = DevFile::open(&dir.path().join("nope"), None).unwrap_err();
    assert!(missing.to_string().contains("no such file"), "{missing}");
    let not_dev = DevFile::open(dir.path(), None).unwrap_err();
    assert!(not_dev.to_string().contains("neither"), "{not_dev}");
}

#[test]
fn a_device_has_one_owner_at_a_time() {
    let dir = scratch_dir();
    let path = dir.path().join("owned.img");
    let first = DevFile::open(&path, Some(SIZE)).unwrap();
    let second = DevFile::open(&path, Some(2 * SIZE)).unwrap_err();
    assert!(
        matches!(second, DevFileError::InUse { .. }),
        "second open of a device in use: {second}"
    );
    assert!(second.to_string().contains("in use"), "{second}");
    // The refused open changed nothing: not even the size it asked for.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);
    drop(first);
    let again = DevFile::open(&path, None).unwrap();
    assert_eq!(again.size, SIZE);
}

#[test]
fn registered_buffers_go_out_as_fixed_ops_and_round_trip() {
    let dir = scratch_dir();
    let dev = DevFile::open(&dir.path().join("fixed.img"), Some(SIZE)).unwrap();
    let mut e = UringEngine::new(dev, 32).unwrap();
    let pool = common::aligned::BufPool::new(1 << 20);
    e.register_pool(&pool).unwrap();
    assert!(e.register_pool(&pool).is_err(), "one region per ring");
    // Pooled buffers of several classes, and one from the heap.
    let lens = [4096usize, 8192, 65536, 4096, 12288];
    for (i, len) in lens.iter().enumerate() {
        let mut buf = pool.alloc(*len);
        buf.fill(i as u8 + 1);
        e.submit(Op {
            tag: i as u64,
            kind: OpKind::Write {
                buf,
                offset: i as u64 * 1_048_576,
                dsync: true,
            },
        })
        .unwrap();
    }
    e.submit(Op {
        tag: 99,
        kind: OpKind::Write {
            buf: filled(4096, 0xEE),
            offset: 40 << 20,
            dsync: true,
        },
    })
    .unwrap();
    let done = drain(&mut e, lens.len() + 1);
    assert!(done.values().all(|c| c.result.is_ok()));
    assert_eq!(
        e.fixed_ops(),
        lens.len() as u64,
        "only pooled buffers go out fixed"
    );
    drop(done);
    for (i, len) in lens.iter().enumerate() {
        e.submit(Op {
            tag: i as u64,
            kind: OpKind::Read {
                buf: pool.alloc(*len),
                offset: i as u64 * 1_048_576,
            },
        })
        .unwrap();
    }
    let done = drain(&mut e, lens.len());
    for (i, len) in lens.iter().enumerate() {
        let c = &done[&(i as u64)];
        assert_eq!(*c.result.as_ref().unwrap(), *len);
        let buf = c.buf.as_ref().unwrap();
        assert!(pool.contains(buf.as_ptr(), *len));
        assert!(
            buf.iter().all(|&b| b == i as u8 + 1),
            "read {i} saw other data"
        );
    }
    assert_eq!(e.fixed_ops(), 2 * lens.len() as u64);
    drop(done);
    // The heap-written block reads back through a pooled buffer too.
    let out = read_sync(&mut e, 40 << 20, 4096).unwrap();
    assert!(out.iter().all(|&b| b == 0xEE));
    // Out of range with a registered buffer: an error, not a panic.
    e.submit(Op {
        tag: 7,
        kind: OpKind::Read {
            buf: pool.alloc(4096),
            offset: SIZE,
        },
    })
    .unwrap();
    let done = drain(&mut e, 1);
    assert!(done[&7].result.is_err());
}
