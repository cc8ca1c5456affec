//! Feature tests of the raft log, including crash damage made by editing the files directly.

use std::fs;
use std::path::{Path, PathBuf};

use super::*;

/// Payload of record `index`; sizes vary so records straddle buffer and sector boundaries.
fn payload(index: u64) -> Vec<u8> {
    let len = (index * 37 % 300) as usize + 1;
    (0..len)
        .map(|i| (index as u8).wrapping_mul(31).wrapping_add(i as u8) | 1)
        .collect()
}

/// Zeros written ahead in the tests: small, so the zeroer's pieces interleave with records.
const TEST_ZERO_AHEAD: u64 = 16 * 1024;

fn open(dir: &Path, segment_bytes: u64) -> LogStore {
    LogStore::open(
        dir,
        LogOptions {
            segment_bytes,
            zero_ahead_bytes: TEST_ZERO_AHEAD,
        },
    )
    .unwrap()
}

fn reopen(log: LogStore) -> LogStore {
    let (dir, opts) = (log.dir.clone(), log.opts);
    drop(log);
    LogStore::open(&dir, opts).unwrap()
}

fn append_all(log: &mut LogStore, indexes: impl IntoIterator<Item = u64>) {
    for i in indexes {
        log.append(i, &payload(i)).unwrap();
    }
}

/// The log holds exactly `first..=last` with the standard payloads (or nothing), and every way
/// of reading agrees.
fn check(log: &LogStore, range: Option<(u64, u64)>) {
    assert_eq!(log.first_index(), range.map(|r| r.0), "first_index");
    assert_eq!(log.last_index(), range.map(|r| r.1), "last_index");
    let Some((first, last)) = range else {
        assert_eq!(log.read_range(0, u64::MAX).unwrap(), vec![]);
        return;
    };
    for i in first..=last {
        assert_eq!(log.read(i).unwrap(), Some(payload(i)), "read({i})");
    }
    if first > 0 {
        assert_eq!(log.read(first - 1).unwrap(), None);
    }
    assert_eq!(log.read(last + 1).unwrap(), None);
    let expected: Vec<_> = (first..=last).map(|i| (i, payload(i))).collect();
    assert_eq!(log.read_range(0, u64::MAX).unwrap(), expected);
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

/// Bytes of records (and headers) in the segment files, without the zero-filled tail allocated
/// ahead of the last segment's records. The test payloads end in a non-zero byte, so a record
/// never ends in zeros.
fn disk_bytes(dir: &Path) -> u64 {
    segment_files(dir).iter().map(|p| data_len(p)).sum()
}

fn data_len(file: &Path) -> u64 {
    let bytes = fs::read(file).unwrap();
    bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i as u64 + 1)
}

fn expect_corrupt(dir: &Path, file: &Path, reason_contains: &str) {
    match LogStore::open(dir, LogOptions::default()) {
        Err(e @ LogError::Corrupt { .. }) => {
            let LogError::Corrupt { path, reason, .. } = &e else {
                unreachable!()
            };
            assert_eq!(path, file);
            assert!(
                reason.contains(reason_contains),
                "reason {reason:?} should mention {reason_contains:?}"
            );
            let msg = e.to_string();
            assert!(msg.contains(&file.display().to_string()), "{msg}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// Byte offset of record `index` in the segment file holding it.
fn offset_of(log: &LogStore, index: u64) -> u64 {
    log.loc(index).unwrap().offset
}

#[test]
fn append_read_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), LogOptions::default().segment_bytes);
    check(&log, None);
    append_all(&mut log, 1..=100);
    // Readable before sync, straight from the write buffer.
    check(&log, Some((1, 100)));
    log.sync().unwrap();
    check(&log, Some((1, 100)));
    assert_eq!(log.size_bytes(), disk_bytes(dir.path()));
    let mut log = reopen(log);
    check(&log, Some((1, 100)));
    append_all(&mut log, 101..=120);
    log.sync().unwrap();
    let log = reopen(log);
    check(&log, Some((1, 120)));
    assert_eq!(segment_files(dir.path()).len(), 1);
}

#[test]
fn first_append_may_use_any_index_including_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1 << 20);
    append_all(&mut log, 0..=3);
    log.sync().unwrap();
    check(&reopen(log), Some((0, 3)));

    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1 << 20);
    append_all(&mut log, 1_000_000..=1_000_002);
    log.sync().unwrap();
    check(&reopen(log), Some((1_000_000, 1_000_002)));
    assert!(segment_files(dir.path())[0].ends_with("00000000000001000000.seg"));
}

#[test]
fn read_range_clamps_and_spans_segments_and_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 2_000);
    append_all(&mut log, 10..=60);
    log.sync().unwrap();
    // Some records on disk, some only in the write buffer.
    append_all(&mut log, 61..=80);
    assert!(segment_files(dir.path()).len() > 3);
    let want = |a: u64, b: u64| (a..b).map(|i| (i, payload(i))).collect::<Vec<_>>();
    assert_eq!(log.read_range(0, 5).unwrap(), vec![]);
    assert_eq!(log.read_range(81, 100).unwrap(), vec![]);
    assert_eq!(log.read_range(30, 30).unwrap(), vec![]);
    assert_eq!(log.read_range(40, 30).unwrap(), vec![]);
    assert_eq!(log.read_range(0, 15).unwrap(), want(10, 15));
    assert_eq!(log.read_range(55, 70).unwrap(), want(55, 70));
    assert_eq!(log.read_range(12, 13).unwrap(), want(12, 13));
    assert_eq!(log.read_range(0, u64::MAX).unwrap(), want(10, 81));
}

#[test]
fn read_range_of_many_large_records_uses_bounded_spans() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 64 << 20);
    let big = |i: u64| vec![i as u8 | 1; 300_000];
    for i in 1..=10 {
        log.append(i, &big(i)).unwrap();
    }
    log.sync().unwrap();
    let got = log.read_range(1, 11).unwrap();
    assert_eq!(got.len(), 10);
    for (i, p) in got {
        assert_eq!(p, big(i));
    }
}

#[test]
fn out_of_order_append_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1 << 20);
    log.append(5, b"five").unwrap();
    for bad in [7, 5, 4, 0] {
        match log.append(bad, b"x") {
            Err(LogError::Gap { expected: 6, got }) => assert_eq!(got, bad),
            other => panic!("append({bad}): expected Gap, got {other:?}"),
        }
    }
    let msg = log.append(7, b"x").unwrap_err().to_string();
    assert!(msg.contains("expected index 6, got 7"), "{msg}");
    // A rejected append changes nothing and does not poison the store.
    log.append(6, b"six").unwrap();
    assert_eq!(log.last_index(), Some(6));
    assert_eq!(log.read(6).unwrap().as_deref(), Some(&b"six"[..]));
}

#[test]
fn empty_payloads_are_records_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1 << 20);
    log.append(1, b"").unwrap();
    log.append(2, b"x").unwrap();
    log.append(3, b"").unwrap();
    log.sync().unwrap();
    let log = reopen(log);
    assert_eq!(
        log.read_range(1, 4).unwrap(),
        vec![(1, vec![]), (2, b"x".to_vec()), (3, vec![])]
    );
}

#[test]
fn truncate_within_segment_then_append_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1 << 20);
    append_all(&mut log, 1..=50);
    log.sync().unwrap();
    // Buffered-only records past the cut too.
    append_all(&mut log, 51..=60);
    log.truncate_from(41).unwrap();
    check(&log, Some((1, 40)));
    assert_eq!(log.size_bytes(), disk_bytes(dir.path()));
    // Truncating past the end is a no-op.
    log.truncate_from(41).unwrap();
    log.truncate_from(1000).unwrap();
    check(&log, Some((1, 40)));
    append_all(&mut log, 41..=45);
    log.sync().unwrap();
    let mut log = reopen(log);
    check(&log, Some((1, 45)));
    // Truncating a record that is only in the write buffer.
    append_all(&mut log, 46..=48);
    log.truncate_from(47).unwrap();
    log.sync().unwrap();
    check(&reopen(log), Some((1, 46)));
}

#[test]
fn truncate_is_durable_without_sync() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1 << 20);
    append_all(&mut log, 1..=20);
    log.sync().unwrap();
    log.truncate_from(10).unwrap();
    check(&reopen(log), Some((1, 9)));
}

#[test]
fn truncate_across_segments_then_append_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1_000);
    append_all(&mut log, 1..=100);
    log.sync().unwrap();
    let before = segment_files(dir.path()).len();
    assert!(before > 5, "{before} segments");
    // Into the middle of an early segment.
    log.truncate_from(20).unwrap();
    check(&log, Some((1, 19)));
    assert!(segment_files(dir.path()).len() < before);
    assert_eq!(log.size_bytes(), disk_bytes(dir.path()));
    append_all(&mut log, 20..=70);
    log.sync().unwrap();
    let mut log = reopen(log);
    check(&log, Some((1, 70)));

    // Exactly at the first record of a segment: that whole file goes.
    let seg_start = log.segments[2].first_index;
    log.truncate_from(seg_start).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 2);
    check(&log, Some((1, seg_start - 1)));
    // The next append rolls into a new file that reuses the removed file's name.
    append_all(&mut log, seg_start..=seg_start + 5);
    log.sync().unwrap();
    check(&reopen(log), Some((1, seg_start + 5)));
}

#[test]
fn truncate_everything_then_start_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1_000);
    append_all(&mut log, 10..=40);
    log.sync().unwrap();
    log.truncate_from(3).unwrap();
    check(&log, None);
    assert!(segment_files(dir.path()).is_empty());
    assert_eq!(log.size_bytes(), 0);
    let mut log = reopen(log);
    check(&log, None);
    // Nothing was purged, so a lower index is fine.
    append_all(&mut log, 5..=8);
    log.sync().unwrap();
    check(&reopen(log), Some((5, 8)));
}

#[test]
fn purge_then_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1_000);
    append_all(&mut log, 1..=100);
    log.sync().unwrap();
    let before = segment_files(dir.path()).len();
    log.purge_to(50).unwrap();
    check(&log, Some((51, 100)));
    assert_eq!(log.read(50).unwrap(), None);
    assert_eq!(log.read_range(1, 52).unwrap(), vec![(51, payload(51))]);
    let after = segment_files(dir.path()).len();
    assert!(after < before, "{after} segments, was {before}");
    // The first remaining file still starts at or below 51; everything before it is gone.
    assert!(log.segments[0].first_index <= 51);
    assert!(log.segments[1].first_index > 51);
    assert_eq!(log.size_bytes(), disk_bytes(dir.path()));

    let mut log = reopen(log);
    check(&log, Some((51, 100)));
    // Purging backwards or to the same point changes nothing.
    log.purge_to(10).unwrap();
    log.purge_to(50).unwrap();
    check(&log, Some((51, 100)));
    // Purge and truncate compose.
    log.truncate_from(90).unwrap();
    log.purge_to(60).unwrap();
    check(&reopen(log), Some((61, 89)));
}

#[test]
fn purge_without_sync_is_durable_for_synced_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1 << 20);
    append_all(&mut log, 1..=30);
    log.sync().unwrap();
    // Within one segment: nothing can be deleted, so only the purge point hides records.
    log.purge_to(10).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1);
    check(&reopen(log), Some((11, 30)));
}

#[test]
fn purge_past_the_end_then_append_higher() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1_000);
    append_all(&mut log, 1..=40);
    log.sync().unwrap();
    log.purge_to(100).unwrap();
    check(&log, None);
    assert!(segment_files(dir.path()).is_empty());
    let mut log = reopen(log);
    check(&log, None);
    for bad in [1, 41, 100] {
        match log.append(bad, b"x") {
            Err(LogError::BelowPurged { purged: 100, got }) => assert_eq!(got, bad),
            other => panic!("append({bad}): expected BelowPurged, got {other:?}"),
        }
    }
    append_all(&mut log, 101..=110);
    check(&log, Some((101, 110)));
    log.sync().unwrap();
    check(&reopen(log), Some((101, 110)));
}

#[test]
fn purge_exactly_to_last_empties_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1 << 20);
    append_all(&mut log, 1..=10);
    log.purge_to(10).unwrap();
    check(&log, None);
    append_all(&mut log, 11..=12);
    log.sync().unwrap();
    check(&reopen(log), Some((11, 12)));
}

#[test]
fn files_left_by_an_interrupted_purge_are_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1_000);
    append_all(&mut log, 1..=100);
    log.sync().unwrap();
    let files = segment_files(dir.path());
    let starts: Vec<u64> = log.segments.iter().map(|s| s.first_index).collect();
    drop(log);
    // A crash after the purge point was stored, with the deletions partly done and not in
    // order: the second file is gone but the first is still there.
    meta::write_atomic(&dir.path().join(PURGE_FILE), &60u64.to_le_bytes()).unwrap();
    fs::remove_file(&files[1]).unwrap();
    let log = open(dir.path(), 1_000);
    check(&log, Some((61, 100)));
    let kept = segment_files(dir.path());
    assert!(!kept.contains(&files[0]));
    let holding_61 = starts.partition_point(|&s| s <= 61) - 1;
    assert_eq!(kept, files[holding_61..].to_vec());
}

#[test]
fn segments_roll_over_and_are_named_by_first_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 500);
    append_all(&mut log, 1..=60);
    log.sync().unwrap();
    log.settle_zeros();
    let files = segment_files(dir.path());
    assert!(files.len() > 5, "{} segments", files.len());
    for (seg, file) in log.segments.iter().zip(&files) {
        assert_eq!(&seg.path, file);
        let name = file.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, format!("{:020}.seg", seg.first_index));
        // A segment exceeds the limit by at most one record.
        assert!(seg.written_len < 500 + RECORD_HEADER_LEN + 300);
    }
    // Only the last segment keeps space allocated ahead of its records.
    for file in &files[..files.len() - 1] {
        assert_eq!(fs::metadata(file).unwrap().len(), data_len(file), "{file:?}");
    }
    let last = files.last().unwrap();
    assert!(fs::metadata(last).unwrap().len() > data_len(last));
    assert_eq!(log.size_bytes(), disk_bytes(dir.path()));
    check(&reopen(log), Some((1, 60)));
}

#[test]
fn one_record_per_segment_works() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1);
    append_all(&mut log, 1..=10);
    log.sync().unwrap();
    assert_eq!(segment_files(dir.path()).len(), 10);
    log.truncate_from(8).unwrap();
    log.purge_to(3).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 4);
    check(&reopen(log), Some((4, 7)));
}

#[test]
fn torn_tail_recovers_to_last_complete_record() {
    // Cut the last segment at every interesting point of its final record: inside the record
    // header, inside the payload, and one byte short of complete.
    for cut in [1u64, 5, 15, 16, 17, 40] {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 2_000);
        append_all(&mut log, 1..=30);
        log.sync().unwrap();
        let last_file = segment_files(dir.path()).pop().unwrap();
        let last_start = offset_of(&log, 30);
        let len = data_len(&last_file);
        assert_eq!(len, log.loc(30).unwrap().end());
        drop(log);
        let new_len = len - cut;
        assert!(
            new_len >= last_start,
            "record 30 is only {} bytes",
            len - last_start
        );
        let f = fs::OpenOptions::new().write(true).open(&last_file).unwrap();
        f.set_len(new_len).unwrap();
        drop(f);

        let mut log = open(dir.path(), 2_000);
        check(&log, Some((1, 29)));
        assert_eq!(fs::metadata(&last_file).unwrap().len(), last_start);
        // The log carries on normally.
        append_all(&mut log, 30..=32);
        log.sync().unwrap();
        check(&reopen(log), Some((1, 32)));
    }
}

#[test]
fn torn_tail_can_take_a_whole_new_segment() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1_000);
    append_all(&mut log, 1..=40);
    log.sync().unwrap();
    let files = segment_files(dir.path());
    drop(log);
    let last = files.last().unwrap();
    // Crash right after creating the file, while writing its header, or after the filesystem
    // extended the file but before the data reached the disk (zeros).
    for len in [0, 10, 100] {
        fs::write(last, vec![0u8; len]).unwrap();
        let log = open(dir.path(), 1_000);
        let last_index = log.last_index().unwrap();
        check(&log, Some((1, last_index)));
        assert!(!last.exists());
        drop(log);
    }
}

#[test]
fn bad_checksum_on_the_final_record_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1 << 20);
    append_all(&mut log, 1..=20);
    log.sync().unwrap();
    log.settle_zeros();
    let file = segment_files(dir.path()).pop().unwrap();
    let end = log.loc(20).unwrap().end() as usize;
    drop(log);
    let mut bytes = fs::read(&file).unwrap();
    assert!(
        bytes.len() > end && bytes[end..].iter().all(|&b| b == 0),
        "the records are followed by a zero-filled tail"
    );
    bytes[end - 1] ^= 0x40;
    fs::write(&file, &bytes).unwrap();
    check(&open(dir.path(), 1 << 20), Some((1, 19)));
    // Without the tail the record ends the file: the same rule, as in version 1.
    bytes.truncate(end);
    fs::write(&file, &bytes).unwrap();
    check(&open(dir.path(), 1 << 20), Some((1, 19)));
}

#[test]
fn zero_filled_tail_is_a_torn_tail() {
    // Some filesystems extend the file before the data reaches the disk; after a crash the
    // unsynced records read back as zeros, possibly followed by records that did get written.
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1 << 20);
    append_all(&mut log, 1..=40);
    log.sync().unwrap();
    let file = segment_files(dir.path()).pop().unwrap();
    let zero_from = offset_of(&log, 20).next_multiple_of(512);
    let first_damaged = (1..=40)
        .find(|&i| log.loc(i).unwrap().end() > zero_from)
        .unwrap();
    drop(log);
    let mut bytes = fs::read(&file).unwrap();
    let zero_to = (zero_from as usize + 512).min(bytes.len());
    assert!(
        zero_to < bytes.len(),
        "want intact records after the zeroed block"
    );
    bytes[zero_from as usize..zero_to].fill(0);
    fs::write(&file, &bytes).unwrap();
    check(&open(dir.path(), 1 << 20), Some((1, first_damaged - 1)));
}

#[test]
fn flipped_byte_in_a_middle_record_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1 << 20);
    append_all(&mut log, 1..=20);
    log.sync().unwrap();
    let file = segment_files(dir.path()).pop().unwrap();
    let at = offset_of(&log, 10);
    drop(log);
    let mut bytes = fs::read(&file).unwrap();
    bytes[at as usize + RECORD_HEADER_LEN as usize + 2] ^= 0x01;
    fs::write(&file, &bytes).unwrap();
    expect_corrupt(dir.path(), &file, "checksum mismatch");
    let err = LogStore::open(dir.path(), LogOptions::default()).unwrap_err();
    assert!(matches!(err, LogError::Corrupt { offset, .. } if offset == at));
    // Refusing must not have changed the file.
    assert_eq!(fs::read(&file).unwrap(), bytes);
}

#[test]
fn damage_in_an_earlier_segment_is_never_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1_000);
    append_all(&mut log, 1..=60);
    log.sync().unwrap();
    drop(log);
    let files = segment_files(dir.path());
    // A bad final record of a non-last segment.
    let mut bytes = fs::read(&files[1]).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x01;
    fs::write(&files[1], &bytes).unwrap();
    expect_corrupt(dir.path(), &files[1], "checksum mismatch");
    // A short non-last segment.
    bytes[n - 1] ^= 0x01;
    fs::write(&files[1], &bytes[..n - 3]).unwrap();
    expect_corrupt(dir.path(), &files[1], "incomplete record");
}

#[test]
fn missing_middle_segment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1_000);
    append_all(&mut log, 1..=60);
    log.sync().unwrap();
    drop(log);
    let files = segment_files(dir.path());
    fs::remove_file(&files[1]).unwrap();
    expect_corrupt(dir.path(), &files[2], "previous segment ends");
}

#[test]
fn bad_segment_headers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1_000);
    append_all(&mut log, 1..=60);
    log.sync().unwrap();
    drop(log);
    let file = segment_files(dir.path())[0].clone();
    let good = fs::read(&file).unwrap();
    let damage = |f: &dyn Fn(&mut Vec<u8>), reason: &str| {
        let mut bytes = good.clone();
        f(&mut bytes);
        fs::write(&file, &bytes).unwrap();
        expect_corrupt(dir.path(), &file, reason);
    };
    damage(&|b| b[0] = b'X', "bad magic");
    damage(&|b| b[13] ^= 1, "header checksum mismatch");
    damage(
        &|b| {
            // A well-formed header from a future version.
            b[8..12].copy_from_slice(&3u32.to_le_bytes());
            let crc = crc32c::crc32c(&b[0..20]);
            b[20..24].copy_from_slice(&crc.to_le_bytes());
        },
        "unsupported segment format version 3",
    );
    fs::write(&file, &good).unwrap();
    let renamed = dir.path().join("00000000000000000002.seg");
    fs::rename(&file, &renamed).unwrap();
    expect_corrupt(dir.path(), &renamed, "file name says 2");
    fs::rename(&renamed, &file).unwrap();
    let stray = dir.path().join("junk.seg");
    fs::write(&stray, b"").unwrap();
    expect_corrupt(dir.path(), &stray, "unexpected segment file name");
    fs::remove_file(&stray).unwrap();
    check(&open(dir.path(), 1_000), Some((1, 60)));
}

#[test]
fn damage_found_by_a_read_after_open_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1 << 20);
    append_all(&mut log, 1..=10);
    log.sync().unwrap();
    let file = segment_files(dir.path()).pop().unwrap();
    let at = offset_of(&log, 4) + RECORD_HEADER_LEN;
    let f = fs::OpenOptions::new().write(true).open(&file).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xff], at).unwrap();
    match log.read(4) {
        Err(LogError::Corrupt { path, .. }) => assert_eq!(path, file),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(matches!(
        log.read_range(1, 11),
        Err(LogError::Corrupt { .. })
    ));
    assert_eq!(log.read(5).unwrap(), Some(payload(5)));
}

/// A record as the layout documented in mod.rs says (built without the writer's code).
fn hand_built_record(index: u64, payload: &[u8]) -> Vec<u8> {
    let mut crc_input = index.to_le_bytes().to_vec();
    crc_input.extend_from_slice(payload);
    let mut r = Vec::new();
    r.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    r.extend_from_slice(&crc32c::crc32c(&crc_input).to_le_bytes());
    r.extend_from_slice(&index.to_le_bytes());
    r.extend_from_slice(payload);
    r
}

/// A segment of format `version` starting at index 7 holding "seven", "" and "nine".
fn hand_built_segment(version: u32) -> Vec<u8> {
    let mut seg = Vec::new();
    seg.extend_from_slice(b"RPLOGSEG");
    seg.extend_from_slice(&version.to_le_bytes());
    seg.extend_from_slice(&7u64.to_le_bytes());
    let header_crc = crc32c::crc32c(&seg);
    seg.extend_from_slice(&header_crc.to_le_bytes());
    assert_eq!(seg.len(), 24);
    seg.extend(hand_built_record(7, b"seven"));
    seg.extend(hand_built_record(8, b""));
    seg.extend(hand_built_record(9, b"nine"));
    seg
}

/// Stored-format compatibility: a version-1 segment built by hand from the layout documented in
/// mod.rs (not with the writer) must open and read in every later version.
#[test]
fn reads_hand_built_version_1_segment() {
    let mut seg = hand_built_segment(1);

    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("00000000000000000007.seg"), &seg).unwrap();
    let mut log = open(dir.path(), 1 << 20);
    assert_eq!(log.first_index(), Some(7));
    assert_eq!(log.last_index(), Some(9));
    assert_eq!(
        log.read_range(0, 100).unwrap(),
        vec![(7, b"seven".to_vec()), (8, vec![]), (9, b"nine".to_vec())]
    );
    // The writer continues the file in the same layout.
    log.append(10, b"ten").unwrap();
    log.sync().unwrap();
    drop(log);
    seg.extend(hand_built_record(10, b"ten"));
    assert_eq!(
        fs::read(dir.path().join("00000000000000000007.seg")).unwrap(),
        seg
    );
}

/// Stored-format compatibility for version 2: a segment built by hand, records then a
/// zero-filled tail, opens, and the writer continues where the records end.
#[test]
fn reads_hand_built_version_2_segment_with_a_zero_tail() {
    let mut seg = hand_built_segment(2);
    let records_end = seg.len();
    seg.resize(records_end + 1000, 0);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("00000000000000000007.seg");
    fs::write(&file, &seg).unwrap();
    let mut log = open(dir.path(), 1 << 20);
    assert_eq!(
        log.read_range(0, 100).unwrap(),
        vec![(7, b"seven".to_vec()), (8, vec![]), (9, b"nine".to_vec())]
    );
    log.append(10, b"ten").unwrap();
    log.sync().unwrap();
    drop(log);
    let bytes = fs::read(&file).unwrap();
    assert_eq!(bytes[..records_end], seg[..records_end]);
    let ten_end = records_end + RECORD_HEADER_LEN as usize + 3;
    assert_eq!(&bytes[records_end + 16..ten_end], b"ten");
    assert!(bytes[ten_end..].iter().all(|&b| b == 0));
    let log = open(dir.path(), 1 << 20);
    assert_eq!(log.last_index(), Some(10));
    assert_eq!(log.read(10).unwrap(), Some(b"ten".to_vec()));
}

#[test]
fn a_version_1_segment_is_continued_until_full_then_version_2_follows() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 600);
    append_all(&mut log, 1..=3);
    log.sync().unwrap();
    let end = log.segments[0].written_len as usize;
    drop(log);
    // Make the segment a version-1 file, as an older build wrote it: no tail, version 1.
    let file = segment_files(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&file).unwrap();
    bytes.truncate(end);
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[0..20]);
    bytes[20..24].copy_from_slice(&crc.to_le_bytes());
    fs::write(&file, &bytes).unwrap();

    let mut log = open(dir.path(), 600);
    append_all(&mut log, 4..=20);
    log.sync().unwrap();
    log.settle_zeros();
    let files = segment_files(dir.path());
    assert!(files.len() > 1);
    let first = fs::read(&files[0]).unwrap();
    assert_eq!(u32::from_le_bytes(first[8..12].try_into().unwrap()), 1);
    assert_eq!(first.len() as u64, log.segments[0].written_len, "version 1 gets no tail");
    let last = fs::read(files.last().unwrap()).unwrap();
    assert_eq!(u32::from_le_bytes(last[8..12].try_into().unwrap()), 2);
    assert!(last.len() as u64 > log.segments.last().unwrap().written_len);
    check(&reopen(log), Some((1, 20)));
}

#[test]
fn stale_bytes_behind_the_zero_tail_are_cut_so_they_cannot_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1 << 20);
    append_all(&mut log, 1..=10);
    log.sync().unwrap();
    let end = log.loc(10).unwrap().end();
    drop(log);
    // A crash can leave later writes on disk while an earlier one is missing (zeros): here a
    // well-formed record 12 some way into the tail, with record 11's place still zero.
    let file = segment_files(dir.path()).pop().unwrap();
    let mut stale = Vec::new();
    encode_record(&mut stale, 12, &payload(12));
    let f = fs::OpenOptions::new().write(true).open(&file).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &stale, end + 400).unwrap();
    drop(f);

    let mut log = open(dir.path(), 1 << 20);
    check(&log, Some((1, 10)));
    assert_eq!(fs::metadata(&file).unwrap().len(), end, "cut back to the records");
    // Record 11 is longer than the gap was, so without the cut the next reopen would find the
    // stale record 12 straight after it.
    log.append(11, &vec![7u8; 400 - RECORD_HEADER_LEN as usize]).unwrap();
    log.sync().unwrap();
    let log = reopen(log);
    assert_eq!(log.last_index(), Some(11));
}

#[test]
fn a_zero_tail_in_an_earlier_segment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1_000);
    append_all(&mut log, 1..=60);
    log.sync().unwrap();
    drop(log);
    let files = segment_files(dir.path());
    let f = fs::OpenOptions::new().write(true).open(&files[1]).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len + 100).unwrap();
    drop(f);
    expect_corrupt(dir.path(), &files[1], "zero-filled space");
}

#[test]
fn a_second_open_of_the_same_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), 1 << 20);
    match LogStore::open(dir.path(), LogOptions::default()) {
        Err(LogError::Locked { path }) => assert_eq!(path, dir.path()),
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(log);
    open(dir.path(), 1 << 20);
}

#[test]
fn open_creates_missing_directories() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b/log");
    let mut log = open(&nested, 1 << 20);
    append_all(&mut log, 1..=3);
    log.sync().unwrap();
    check(&reopen(log), Some((1, 3)));
}

#[test]
fn corrupt_purge_point_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 1 << 20);
    append_all(&mut log, 1..=10);
    log.purge_to(3).unwrap();
    drop(log);
    let purge = dir.path().join(PURGE_FILE);
    let mut bytes = fs::read(&purge).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    fs::write(&purge, &bytes).unwrap();
    let err = LogStore::open(dir.path(), LogOptions::default()).unwrap_err();
    assert!(matches!(err, LogError::Meta(_)), "{err:?}");
    assert!(err.to_string().contains("purged.meta"), "{err}");
}

#[test]
fn synced_records_survive_a_writer_thread_that_stops_without_syncing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    std::thread::spawn(move || {
        let mut log = open(&path, 2_000);
        append_all(&mut log, 1..=50);
        log.sync().unwrap();
        // Enough unsynced records that some are written out and some are still buffered.
        append_all(&mut log, 51..=60);
        // Dropped without sync, as in a crash of the process.
    })
    .join()
    .unwrap();
    let log = open(dir.path(), 2_000);
    let last = log.last_index().unwrap();
    assert!((50..=60).contains(&last), "last index {last}");
    check(&log, Some((1, last)));
}

#[test]
fn store_can_move_between_threads_and_index_entries_stay_small() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<LogStore>();
    // Memory is O(records) at this size per record.
    assert_eq!(std::mem::size_of::<Loc>(), 16);
}

/// Random sequences of every operation, checked against a plain in-memory model after each step
/// and after reopening. The seed is printed on failure so a run can be replayed. By default one
/// seed per segment size runs (fsync-bound); `RAMPART_LOG_MODEL_SEEDS=1000` runs more.
#[test]
fn random_operations_match_a_model() {
    use std::collections::BTreeMap;
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*: deterministic and dependency-free.
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }
    let seeds = std::env::var("RAMPART_LOG_MODEL_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4u64);
    for seed in 1..=seeds {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let segment_bytes = [1, 300, 2_000, 1 << 20][(seed % 4) as usize];
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), segment_bytes);
        let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut purged: Option<u64> = None;
        let mut generation = 0u8;
        for step in 0..120 {
            let ctx = format!("seed {seed} step {step}");
            let first = model.keys().next().copied();
            let last = model.keys().next_back().copied();
            match rng.below(10) {
                0..=4 => {
                    generation = generation.wrapping_add(1);
                    let start = match (last, purged) {
                        (Some(l), _) => l + 1,
                        (None, Some(p)) => p + 1 + rng.below(3),
                        (None, None) => rng.below(5),
                    };
                    for index in start..start + 1 + rng.below(20) {
                        let len = rng.below(700) as usize;
                        let p: Vec<u8> = (0..len).map(|i| generation ^ i as u8).collect();
                        log.append(index, &p).expect(&ctx);
                        model.insert(index, p);
                    }
                }
                5 => log.sync().expect(&ctx),
                6 => {
                    let base = first.unwrap_or(0);
                    let at = (base + rng.below(last.unwrap_or(base) - base + 4)).saturating_sub(2);
                    log.truncate_from(at).expect(&ctx);
                    model.retain(|&i, _| i < at);
                }
                7 => {
                    let base = first.unwrap_or(purged.unwrap_or(0));
                    let span = last.unwrap_or(base).saturating_sub(base) + 4;
                    let at = (base + rng.below(span)).saturating_sub(2);
                    log.purge_to(at).expect(&ctx);
                    model.retain(|&i, _| i > at);
                    purged = Some(purged.map_or(at, |p| p.max(at)));
                }
                _ => {
                    log.sync().expect(&ctx);
                    log = reopen(log);
                }
            }
            assert_eq!(log.first_index(), model.keys().next().copied(), "{ctx}");
            assert_eq!(log.last_index(), model.keys().next_back().copied(), "{ctx}");
            let want: Vec<_> = model.iter().map(|(&i, p)| (i, p.clone())).collect();
            assert_eq!(log.read_range(0, u64::MAX).unwrap(), want, "{ctx}");
            if log.segments.is_empty() {
                assert!(model.is_empty(), "{ctx}");
            }
        }
        log.sync().unwrap();
        // These payloads may end in zeros, so the files are measured after a reopen, which cuts
        // the last segment back to its records.
        let size = log.size_bytes();
        let log = reopen(log);
        let on_disk: u64 = segment_files(dir.path())
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(size, on_disk, "seed {seed}");
        let want: Vec<_> = model.into_iter().collect();
        assert_eq!(log.read_range(0, u64::MAX).unwrap(), want, "seed {seed}");
    }
}

#[test]
fn a_split_sync_lets_appends_and_reads_go_on_while_the_disk_works() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), 4096);
    append_all(&mut log, 1..=30);
    let pending = log.begin_sync().unwrap().expect("records to sync");
    // While the fsync would run: appends (across a segment roll-over) and reads work.
    append_all(&mut log, 31..=80);
    check(&log, Some((1, 80)));
    pending.run().unwrap();
    log.finish_sync(Ok(())).unwrap();
    // The records appended meanwhile still need their own sync.
    let again = log.begin_sync().unwrap().expect("the later records");
    again.run().unwrap();
    log.finish_sync(Ok(())).unwrap();
    assert!(log.begin_sync().unwrap().is_none(), "nothing left to sync");
    check(&reopen(log), Some((1, 80)));
}

#[test]
fn a_failed_split_sync_poisons_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), 1 << 20);
    append_all(&mut log, 1..=3);
    let _pending = log.begin_sync().unwrap().unwrap();
    let err = LogError::Io { path: tmp.path().into(), action: "syncing segment", source: std::io::Error::other("fsync failed (test)") };
    assert!(log.finish_sync(Err(err)).is_err());
    // After a failed fsync nothing written since the last good one can be trusted.
    assert!(log.append(4, &payload(4)).is_err());
    assert!(log.sync().is_err());
}

/// The zeroing thread works ahead of the records while they are appended, synced, truncated
/// and rolled over, and never writes over one: every record reads back, before and after a
/// reopen, and the last segment ends in zeros.
#[test]
fn zeros_written_ahead_never_land_on_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 256 * 1024);
    let mut last = 0;
    for round in 0..400u64 {
        let n = round % 7 + 1;
        append_all(&mut log, last + 1..=last + n);
        last += n;
        log.sync().unwrap();
        if round % 50 == 49 {
            // Cut back a few records and write them again, as raft does after a conflict.
            log.truncate_from(last - 2).unwrap();
            append_all(&mut log, last - 2..=last);
        }
    }
    log.sync().unwrap();
    check(&log, Some((1, last)));
    log.settle_zeros();
    let files = segment_files(dir.path());
    assert!(files.len() > 1, "{} segments", files.len());
    let tail = files.last().unwrap();
    let end = log.segments.last().unwrap().written_len;
    let bytes = fs::read(tail).unwrap();
    assert!(bytes.len() as u64 > end, "zeros follow the records");
    assert!(bytes[end as usize..].iter().all(|&b| b == 0));
    check(&reopen(log), Some((1, last)));
}

/// While syncs carry more than `LOG_ZERO_AHEAD_MAX_SYNC_BYTES` the zeroer writes no new zeros:
/// the records soon run past the ones it wrote and end the file.
#[test]
fn big_syncs_get_no_zeros_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 64 << 20);
    let big = vec![5u8; 100 * 1024];
    for i in 1..=20 {
        log.append(i, &big).unwrap();
        log.sync().unwrap();
    }
    log.settle_zeros();
    let file = segment_files(dir.path()).pop().unwrap();
    assert_eq!(
        fs::metadata(&file).unwrap().len(),
        log.segments[0].written_len,
        "no zeros after the records"
    );
    // Small syncs again: zeros follow.
    for i in 21..=200 {
        log.append(i, &payload(i)).unwrap();
        log.sync().unwrap();
    }
    log.settle_zeros();
    assert!(fs::metadata(&file).unwrap().len() > log.segments[0].written_len);
}
