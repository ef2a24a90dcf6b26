//! Data reduction end to end: real D-nodes, a real FUSE mount, `dase
//! stats --json` for what was stored.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use dase_tests::*;

fn write_file(p: &Path, data: &[u8]) {
    let mut f = File::create(p).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn read_cold(p: &Path) -> Vec<u8> {
    drop_caches();
    let mut v = Vec::new();
    File::open(p).unwrap().read_to_end(&mut v).unwrap();
    v
}

fn num(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// Starts a dase command in the background, its output discarded.
fn spawn_dase(args: &[&str]) -> std::process::Child {
    std::process::Command::new(dase_bin())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Commits everything (fsync of the root directory commits the file system).
fn commit(root: &Path) {
    File::open(root).unwrap().sync_all().unwrap();
}

/// Every named file under `dir` reads back, cold, as it was written.
fn assert_files(dir: &Path, files: &[(&str, &Vec<u8>)], when: &str) {
    for (n, want) in files {
        assert!(read_cold(&dir.join(n)) == **want, "{n} differs{when}");
    }
}

/// What a file system whose files are all gone stores: no chunks, no data
/// stripes. Its stats, for more checks.
fn assert_stores_nothing(rig: &FsRig) -> serde_json::Value {
    let s = rig.stats();
    assert_eq!(num(&s, "chunks"), 0, "{s}");
    assert_eq!(num(&s, "stored_bytes"), 0, "data stripes left: {s}");
    s
}

const MAX_CHUNK: u64 = dase_initiator::reduce::MAX_CHUNK as u64;

/// `a` with `with` written 40 times, 100 KB apart from `shift` + 50,000 on:
/// a version whose every edited chunk is a small delta against `a`'s.
fn forty_edits(a: &[u8], shift: usize, with: &[u8; 4]) -> Vec<u8> {
    let mut v = a.to_vec();
    for i in 0..40 {
        let at = 50_000 + i * 100_000 + shift;
        v[at..at + 4].copy_from_slice(with);
    }
    v
}

#[test]
fn duplicates_and_near_duplicates_store_once_plus_small_deltas() {
    let rig = FsRig::new("dups", 5, "512M", "3+2");
    let m = rig.mount("mnt", &[]).unwrap();
    let root = m.path.clone();
    let a = text(8 << 20, 1);
    write_file(&root.join("a"), &a);
    let s1 = rig.stats();
    assert_eq!(s1["reduce"], "full");
    assert_eq!(num(&s1, "after_dedup_bytes"), a.len() as u64);
    let stored1 = num(&s1, "after_compression_bytes");
    assert!(
        stored1 < a.len() as u64 / 2,
        "text compressed only to {stored1}"
    );

    // An exact copy costs references only.
    write_file(&root.join("b"), &a);
    let s2 = rig.stats();
    assert_eq!(num(&s2, "logical_bytes"), 2 * a.len() as u64);
    assert_eq!(num(&s2, "after_dedup_bytes"), a.len() as u64);
    assert_eq!(num(&s2, "chunks"), num(&s1, "chunks"));
    assert_eq!(num(&s2, "after_compression_bytes"), stored1);

    // Five small edits: a few new chunks, each a small delta.
    let mut c = a.clone();
    for i in 0..5 {
        let at = 1_000_000 + i * 1_500_000;
        c[at..at + 16].copy_from_slice(b"EDITED-EDITED-ED");
    }
    write_file(&root.join("c"), &c);
    let s3 = rig.stats();
    let new_unique = num(&s3, "after_dedup_bytes") - a.len() as u64;
    assert!(new_unique <= 10 * MAX_CHUNK, "{new_unique} new bytes");
    assert!(num(&s3, "delta_chunk_bytes") > 0, "no deltas: {s3}");
    let grew = num(&s3, "after_compression_bytes") - stored1;
    assert!(grew < 8 * 1024, "five edits stored {grew} bytes");

    // An insertion shifts everything after it; chunks resynchronise.
    let mut d = a.clone();
    d.splice(3_000_000..3_000_000, b"inserted bytes".iter().copied());
    write_file(&root.join("d"), &d);
    let s4 = rig.stats();
    let new_unique = num(&s4, "after_dedup_bytes") - num(&s3, "after_dedup_bytes");
    assert!(new_unique <= 3 * MAX_CHUNK, "{new_unique} new bytes");
    assert!(num(&s4, "after_compression_bytes") - num(&s3, "after_compression_bytes") < 8 * 1024);

    // Bit-exact, from the page cache's absence and after a remount.
    assert_files(&root, &[("a", &a), ("b", &a), ("c", &c), ("d", &d)], "");
    assert!(m.stop());
    let m = rig.mount("mnt", &[]).unwrap();
    assert_files(
        &m.path,
        &[("a", &a), ("b", &a), ("c", &c), ("d", &d)],
        " after remount",
    );
    rig.assert_fsck_clean();

    // Deleting every file returns the stored bytes to an empty file system's.
    for n in ["a", "b", "c", "d"] {
        std::fs::remove_file(m.path.join(n)).unwrap();
    }
    assert!(m.stop());
    let s = assert_stores_nothing(&rig);
    assert_eq!(num(&s, "after_compression_bytes"), 0);
    rig.assert_fsck_clean();
}

#[test]
fn overwritten_chunks_die_and_the_cleaner_reclaims_their_segments() {
    let rig = FsRig::with_mkfs("clean", 5, "512M", "3+2", &["--reduce", "dedup"]);
    let m = rig.mount("mnt", &[]).unwrap();
    let root = m.path.clone();
    let mut data = pattern(8 << 20, 5);
    write_file(&root.join("f"), &data);
    let before = rig.stats();
    assert_eq!(before["reduce"], "dedup");
    // Overwrite every other 256 KiB: the chunks there die, leaving their
    // segments partly dead.
    {
        let f = OpenOptions::new().write(true).open(root.join("f")).unwrap();
        for i in (0..data.len()).step_by(512 << 10) {
            let fresh = pattern(256 << 10, 100 + i as u64);
            f.write_all_at(&fresh, i as u64).unwrap();
            data[i..i + fresh.len()].copy_from_slice(&fresh);
        }
        f.sync_all().unwrap();
    }
    let dirty = rig.stats();
    let cleaned = rig.clean();
    assert!(cleaned.contains("cleaned"), "{cleaned}");
    commit(&root);
    let after = rig.stats();
    assert!(
        num(&after, "stored_bytes") < num(&dirty, "stored_bytes"),
        "cleaning freed nothing: {dirty} -> {after}"
    );
    // Live data with parity, nothing much more: 8 MiB of chunks at 5/3.
    let floor = num(&after, "after_compression_bytes") * 5 / 3;
    assert!(
        num(&after, "stored_bytes") < floor + floor / 4,
        "{after} (before cleaning {dirty}, first write {before})"
    );
    assert!(read_cold(&root.join("f")) == data);
    assert!(m.stop());
    let m = rig.mount("mnt", &[]).unwrap();
    assert!(read_cold(&m.path.join("f")) == data);
    assert!(m.stop());
    rig.assert_fsck_clean();
}

#[test]
fn a_crash_during_reclamation_loses_nothing() {
    let rig = FsRig::new("crash", 5, "512M", "3+2");
    let m = rig.mount("mnt", &[]).unwrap();
    let root = m.path.clone();
    let files: Vec<Vec<u8>> = (0..12)
        .map(|i| {
            let mut t = text(2 << 20, 7); // near-duplicates: deltas and shared chunks
            let at = (i * 150_001) % t.len();
            t[at..at + 8].copy_from_slice(format!("{i:08}").as_bytes());
            if i % 3 == 0 {
                t.extend_from_slice(&pattern(1 << 20, i as u64)); // and unique bytes
            }
            t
        })
        .collect();
    for (i, f) in files.iter().enumerate() {
        write_file(&root.join(format!("f{i}")), f);
    }
    commit(&root);
    // Delete half (the references of the rest keep shared chunks alive),
    // then crash while the references drop and the cleaner runs.
    for i in (0..12).step_by(2) {
        std::fs::remove_file(root.join(format!("f{i}"))).unwrap();
    }
    let mut clean = spawn_dase(&["clean", "--cluster", rig.cluster_str()]);
    std::thread::sleep(Duration::from_millis(150));
    m.crash();
    let _ = clean.wait();
    let m = rig.mount_when_free("mnt", &[]);
    for (i, f) in files.iter().enumerate() {
        let p = m.path.join(format!("f{i}"));
        if p.exists() {
            assert!(read_cold(&p) == *f, "f{i} differs after the crash");
        } else {
            assert!(i % 2 == 0, "f{i} was never deleted");
        }
    }
    assert!(m.stop());
    rig.assert_fsck_clean();
    // And nothing leaked: with every file gone, nothing is stored.
    let m = rig.mount("mnt", &[]).unwrap();
    for e in std::fs::read_dir(&m.path).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    assert!(m.stop());
    assert_stores_nothing(&rig);
}

#[test]
fn a_corrupt_reference_chunk_is_repaired_before_a_delta_on_it_is_served() {
    let rig = FsRig::new("refcorrupt", 5, "512M", "3+2");
    let a = text(4 << 20, 3);
    let c = forty_edits(&a, 0, b"EDIT");
    let m = rig.mount("mnt", &[]).unwrap();
    write_file(&m.path.join("a"), &a);
    write_file(&m.path.join("c"), &c);
    let s = rig.stats();
    assert!(num(&s, "delta_chunk_bytes") >= 20 * 4096, "few deltas: {s}");
    assert!(m.stop());
    // Garbage over every strip slot of D-node 2: reference chunks (and
    // deltas) with a strip there are corrupt on it.
    let slots = 1u64 << 20..(1u64 << 20) + (16 << 20);
    rig.corrupt("d2.img", slots.clone(), 0xAB);
    let m = rig.mount("mnt", &[]).unwrap();
    // Only the deltas' file is read: its reference chunks are fetched,
    // found corrupt by their strips' checksums, rebuilt from parity and
    // rewritten, and only then are the deltas applied (and the result
    // checked against its fingerprint).
    assert!(read_cold(&m.path.join("c")) == c);
    let log = m.log_text();
    assert!(log.contains("checksum mismatch"), "{log}");
    assert!(log.contains("corrupt strip repaired"), "{log}");
    assert!(read_cold(&m.path.join("a")) == a);
    assert!(m.stop());
    rig.assert_fsck_clean();

    // The same once the references live in compression regions (and the
    // deltas are slices' deltas): the region's strips are repaired before
    // it is decoded.
    let out = rig.dase(&["clean", "--cluster", rig.cluster_str(), "--recompress"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !said.contains("(0 compression regions)"),
        "{said}"
    );
    rig.corrupt("d2.img", slots.clone(), 0xCD);
    let m = rig.mount("mnt", &[]).unwrap();
    assert!(read_cold(&m.path.join("c")) == c);
    let log = m.log_text();
    assert!(log.contains("corrupt strip repaired"), "{log}");
    assert!(read_cold(&m.path.join("a")) == a);
    assert!(m.stop());
    rig.assert_fsck_clean();
}

#[test]
fn mkfs_refuses_reduction_on_stripes_too_small_for_its_chunks() {
    let rig = FsRig::with_mkfs("small", 5, "64M", "3+2", &["--reduce", "none"]);
    assert_eq!(rig.stats()["reduce"], "none");
    let out = rig.dase(&[
        "mkfs",
        "--cluster",
        rig.cluster_str(),
        "--ec",
        "3+2",
        "--strip-size",
        "16k",
        "--force",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--reduce none"), "{err}");
}

/// The average chunk size is the file system's, chosen at mkfs: at 64 KiB
/// a file is cut into about a quarter as many chunks as at the default 16,
/// which dedup and read back the same. Sizes that are not a power of two
/// from 4 to 64 KiB, or whose largest chunks do not fit two to a stripe,
/// are refused with a clear error.
#[test]
fn the_average_chunk_size_is_chosen_at_mkfs() {
    let a = text(8 << 20, 31);
    let store = |name: &str, mkfs: &[&str]| {
        let rig = FsRig::with_mkfs(name, 5, "256M", "3+2", mkfs);
        let m = rig.mount("mnt", &[]).unwrap();
        write_file(&m.path.join("a"), &a);
        write_file(&m.path.join("b"), &a);
        assert!(m.stop());
        let s = rig.stats();
        assert_eq!(
            num(&s, "after_dedup_bytes"),
            a.len() as u64,
            "the copy dedups: {s}"
        );
        let m = rig.mount("mnt", &[]).unwrap();
        assert!(read_cold(&m.path.join("a")) == a);
        assert!(read_cold(&m.path.join("b")) == a);
        assert!(m.stop());
        rig.assert_fsck_clean();
        (num(&s, "avg_chunk_bytes"), num(&s, "chunks"), rig)
    };
    let (avg16, n16, _) = store("c16", &[]);
    let (avg64, n64, rig) = store("c64", &["--chunk-size", "64k", "--strip-size", "256k"]);
    eprintln!("{n16} chunks at {avg16} bytes average, {n64} at {avg64}");
    assert_eq!((avg16, avg64), (16 << 10, 64 << 10));
    assert!(
        n64 * 3 < n16 && n64 * 6 > n16,
        "{n64} chunks at 64 KiB, {n16} at 16"
    );
    let mkfs = |extra: &[&str]| {
        let mut args = vec![
            "mkfs",
            "--cluster",
            rig.cluster_str(),
            "--ec",
            "3+2",
            "--force",
        ];
        args.extend_from_slice(extra);
        let out = rig.dase(&args);
        assert!(!out.status.success(), "mkfs {extra:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for bad in ["48k", "128k", "2k", "lots"] {
        let err = mkfs(&["--chunk-size", bad]);
        assert!(err.contains(&format!("--chunk-size {bad}")), "{err}");
    }
    let err = mkfs(&["--chunk-size", "64k", "--strip-size", "64k"]);
    assert!(err.contains("a smaller --chunk-size"), "{err}");
    // Refused before anything was written: the file system is still there.
    assert_eq!(num(&rig.stats(), "avg_chunk_bytes"), 64 << 10);
}

/// Bytes the rig's D-node processes have written so far (their `wchar`).
fn dnode_bytes_written(rig: &FsRig) -> u64 {
    rig.nodes
        .iter()
        .map(|n| {
            let io = std::fs::read_to_string(format!("/proc/{}/io", n.child.id())).unwrap();
            io.lines()
                .find_map(|l| l.strip_prefix("wchar: "))
                .and_then(|v| v.parse::<u64>().ok())
                .expect("wchar in /proc/PID/io")
        })
        .sum()
}

/// A file's extents live in extent pages of 16 MiB of the file each, so a
/// commit writes the ranges that changed, not the whole map (nor the maps
/// of every file in the same inode page). A 4 KiB overwrite in a 256 MiB
/// file wrote ~3 MiB more to the D-nodes when the inode page held the map
/// (~13 k extents, four copies); and everything reads back after remounts,
/// truncation and deletion.
#[test]
fn a_commit_writes_only_the_extent_ranges_that_changed() {
    let rig = FsRig::new("extents", 5, "2G", "3+2");
    let m = rig.mount("mnt", &["--commit-interval", "600"]).unwrap();
    let mut big = pattern(256 << 20, 77);
    write_file(&m.path.join("big"), &big);
    let other = text(40 << 20, 78);
    write_file(&m.path.join("other"), &other);
    // One small change in the middle of the big file, committed alone.
    let before = dnode_bytes_written(&rig);
    {
        let f = OpenOptions::new()
            .write(true)
            .open(m.path.join("big"))
            .unwrap();
        f.write_all_at(b"changed!", 100 << 20).unwrap();
        f.sync_all().unwrap();
    }
    big[100 << 20..(100 << 20) + 8].copy_from_slice(b"changed!");
    let written = dnode_bytes_written(&rig) - before;
    eprintln!("a 8-byte overwrite in a 256 MiB file: {written} bytes written to the D-nodes");
    assert!(
        written < 2 << 20,
        "{written} bytes written for an 8-byte change"
    );
    // Truncate into the second range, then grow again; drop the other.
    {
        let f = OpenOptions::new()
            .write(true)
            .open(m.path.join("big"))
            .unwrap();
        f.set_len(20 << 20).unwrap();
        f.write_all_at(&big[(20 << 20)..(40 << 20)], 20 << 20)
            .unwrap();
        f.sync_all().unwrap();
    }
    big.truncate(40 << 20);
    // Extent pages cover files to 4 PiB: beyond is EFBIG, not a wrong page.
    {
        let f = OpenOptions::new()
            .write(true)
            .open(m.path.join("big"))
            .unwrap();
        let e = f.set_len((4u64 << 50) + 1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFBIG), "{e}");
        let e = f.write_all_at(b"x", 4u64 << 50).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFBIG), "{e}");
    }
    std::fs::remove_file(m.path.join("other")).unwrap();
    // A sparse file with one byte run 1 PiB in: one extent page, not 2^26.
    {
        let f = File::create(m.path.join("sparse")).unwrap();
        f.write_all_at(b"far", 1 << 50).unwrap();
        f.sync_all().unwrap();
    }
    commit(&m.path);
    assert!(m.stop());
    let m = rig.mount("mnt", &[]).unwrap();
    assert!(read_cold(&m.path.join("big")) == big);
    assert!(!m.path.join("other").exists());
    {
        let f = File::open(m.path.join("sparse")).unwrap();
        let mut b = [1u8; 3];
        f.read_exact_at(&mut b, 1 << 50).unwrap();
        assert_eq!(&b, b"far");
        f.read_exact_at(&mut b, 1 << 40).unwrap();
        assert_eq!(b, [0; 3], "a hole reads as zeros");
    }
    std::fs::remove_file(m.path.join("sparse")).unwrap();
    commit(&m.path);
    assert!(m.stop());
    rig.assert_fsck_clean();
    // Deleting the last file leaves no extent pages behind: the stored
    // bytes go back to the baseline once cleaned.
    let m = rig.mount("mnt", &[]).unwrap();
    std::fs::remove_file(m.path.join("big")).unwrap();
    commit(&m.path);
    assert!(m.stop());
    rig.clean();
    assert_stores_nothing(&rig);
    rig.assert_fsck_clean();
}

/// `--reduce none` keeps the raw data path: bytes as written, no chunks.
#[test]
fn without_reduction_bytes_are_stored_as_written() {
    let rig = FsRig::with_mkfs("raw", 5, "256M", "3+2", &["--reduce", "none"]);
    let m = rig.mount("mnt", &[]).unwrap();
    let mut a = text(3 << 20, 9);
    write_file(&m.path.join("a"), &a);
    write_file(&m.path.join("b"), &a);
    {
        let f = OpenOptions::new()
            .write(true)
            .open(m.path.join("a"))
            .unwrap();
        f.write_all_at(b"overwritten", 1_000_000).unwrap();
        f.sync_all().unwrap();
    }
    a[1_000_000..1_000_011].copy_from_slice(b"overwritten");
    let s = rig.stats();
    assert_eq!(s["reduce"], "none");
    assert_eq!(num(&s, "chunks"), 0);
    assert!(num(&s, "live_bytes") >= 2 * a.len() as u64, "{s}");
    // Metadata is mirrored 1+3 here, and each of its stripes takes a data
    // stripe's room (3 strips of 5) from the capacity: what `stats` says
    // it takes is what the free count lost beside the data's stripes.
    let (meta, meta_room) = (
        num(&s, "metadata_bytes"),
        num(&s, "metadata_capacity_bytes"),
    );
    assert!(meta > 0 && meta_room * 4 == meta * 3, "{s}");
    let used = num(&s, "capacity_bytes") - num(&s, "free_bytes");
    assert!(used >= meta_room + num(&s, "stored_bytes") * 3 / 5, "{s}");
    assert!(m.stop());
    let m = rig.mount("mnt", &[]).unwrap();
    assert!(read_cold(&m.path.join("a")) == a);
    assert!(read_cold(&m.path.join("b")) == text(3 << 20, 9));
    assert!(m.stop());
    rig.assert_fsck_clean();
}

/// The value of `key=N` in the mount's "reduction since mount" log line.
fn logged(log: &str, key: &str) -> u64 {
    let line = log
        .lines()
        .rfind(|l| l.contains("reduction since mount"))
        .unwrap_or_else(|| panic!("no reduction counters in the log:\n{log}"));
    field(line, key)
}

/// The number a log line gives as ` key=N`.
fn field(line: &str, key: &str) -> u64 {
    let at = line
        .find(&format!(" {key}="))
        .unwrap_or_else(|| panic!("no {key} in {line}"));
    line[at + key.len() + 2..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A file system on 5 D-nodes holding `a` as file "a", cleaned so that
/// all its index entries are in their buckets (none left in the journal).
fn indexed(name: &str, a: &[u8]) -> FsRig {
    let rig = FsRig::new(name, 5, "1G", "3+2");
    let m = rig.mount("mnt", &[]).unwrap();
    write_file(&m.path.join("a"), a);
    assert!(m.stop());
    rig.clean();
    rig
}

#[test]
fn reads_through_a_tiny_cache_load_index_buckets_and_stay_within_it() {
    let rig = FsRig::new("bound", 5, "512M", "3+2");
    let m = rig.mount("mnt", &["--cache-pages", "4"]).unwrap();
    let files: Vec<Vec<u8>> = (0..3).map(|i| text(12 << 20, 100 + i)).collect();
    for (i, f) in files.iter().enumerate() {
        write_file(&m.path.join(format!("f{i}")), f);
    }
    assert!(m.stop());
    // Fold the index journal into the buckets, so reads must load them.
    rig.clean();
    let s = rig.stats();
    assert_eq!(num(&s, "index_buffered"), 0, "{s}");
    let buckets = num(&s, "chunk_buckets") + num(&s, "similar_buckets");
    assert!(buckets > 4, "the index should outgrow the cache: {s}");
    rig.assert_fsck_clean();
    // A fresh mount holds no index page: every read loads the chunk-index
    // buckets it needs, and evicts others to stay within the cache.
    let m = rig.mount("mnt", &["--cache-pages", "4"]).unwrap();
    let log = m.log.clone();
    for (i, f) in files.iter().enumerate() {
        assert!(
            read_cold(&m.path.join(format!("f{i}"))) == *f,
            "f{i} differs"
        );
    }
    // Reads alone must not change anything: no chunk counted twice.
    assert!(m.stop());
    let log = std::fs::read_to_string(log).unwrap();
    assert!(
        logged(&log, "index_page_loads") >= num(&s, "chunk_buckets"),
        "{log}"
    );
    // The cache, a quarter more before an eviction sweep, and the pages one
    // read pins while it loads.
    let peak = logged(&log, "peak_resident_pages");
    assert!(peak <= 12, "{peak} pages resident through a 4-page cache");
    assert_eq!(rig.stats()["chunks"], s["chunks"]);
}

/// With a buffer far smaller than the index, index changes go through the
/// journal and are merged into the buckets commit by commit; a crash in the
/// middle of ingest replays the journal, and nothing is lost or miscounted.
#[test]
fn index_changes_are_journalled_merged_in_bulk_and_survive_a_crash() {
    let rig = FsRig::new("journal", 5, "512M", "3+2");
    let args = ["--cache-pages", "8", "--index-buffer", "64"];
    let m = rig.mount("mnt", &args).unwrap();
    let root = m.path.clone();
    let mut files: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("f{i}"), text(6 << 20, 300 + i)))
        .collect();
    // An exact copy and a near copy: their lookups hit buffered entries.
    files.push(("copy".into(), files[0].1.clone()));
    let mut near = files[1].1.clone();
    near[3 << 20..(3 << 20) + 6].copy_from_slice(b"edited");
    files.push(("near".into(), near));
    for (n, d) in &files {
        write_file(&root.join(n), d);
    }
    commit(&root);
    let s = rig.stats();
    let file = files[0].1.len() as u64;
    assert!(
        num(&s, "after_dedup_bytes") <= num(&s, "logical_bytes") - 2 * file + 3 * MAX_CHUNK,
        "the copy should cost nothing and the near copy a few chunks: {s}"
    );
    assert!(num(&s, "delta_chunk_bytes") > 0, "{s}");
    // Crash while a fourth file is written (not synced): the journal since
    // the last merge is replayed at the next mount.
    let more = text(6 << 20, 400);
    {
        let mut f = File::create(root.join("late")).unwrap();
        f.write_all(&more[..4 << 20]).unwrap();
    }
    m.crash();
    let m = rig.mount_when_free("mnt", &args);
    for (n, d) in &files {
        assert!(
            read_cold(&m.path.join(n)) == *d,
            "{n} differs after the crash"
        );
    }
    let _ = std::fs::remove_file(m.path.join("late"));
    write_file(&m.path.join("late"), &more);
    let log = m.log.clone();
    assert!(m.stop());
    let log = std::fs::read_to_string(log).unwrap();
    assert!(logged(&log, "merged_buckets") > 0, "{log}");
    // The buffer's bound (four times its size) plus one batch of chunks,
    // each with its entry, its super-features and its reference's count.
    let peak = logged(&log, "peak_buffered_entries");
    assert!(peak <= 4 * 64 + 64 * 6, "{peak} index entries buffered");
    rig.assert_fsck_clean();
    // Every file gone and cleaned: nothing stored, nothing left in the journal.
    let m = rig.mount("mnt", &args).unwrap();
    assert!(read_cold(&m.path.join("late")) == more);
    for e in std::fs::read_dir(&m.path).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    commit(&m.path);
    rig.clean();
    assert!(m.stop());
    let s = assert_stores_nothing(&rig);
    assert_eq!(num(&s, "index_buffered"), 0, "{s}");
    rig.assert_fsck_clean();
}

/// A commit abandoned part-way — its future dropped, as a task abort at
/// unmount or a timeout does — must lose nothing it had already taken
/// (index changes, segment records, changed pages): the next commit
/// carries them, the file system stays consistent and every file reads
/// back. In process, against real D-nodes, so the drop can land anywhere.
#[test]
fn a_commit_dropped_part_way_loses_nothing() {
    use dase_initiator::cnode::fs::{FileSystem, NewKind, Options};
    use dase_initiator::cnode::meta::ROOT_INO;
    use dase_initiator::cnode::ClusterFile;
    let rig = FsRig::with_mkfs("cancel", 5, "512M", "3+2", &["--reduce", "full"]);
    let file = ClusterFile::load(&rig.cluster).unwrap();
    rt().block_on(async {
        let opts = Options {
            commit_interval: Duration::from_secs(3600),
            cache_pages: 16,
            index_buffer: 200,
            ..Default::default()
        };
        let fs = FileSystem::open(&file, opts).await.unwrap();
        let mut files = Vec::new();
        let mut dropped = 0;
        for round in 0..48u64 {
            let name = format!("f{round}");
            let a = fs
                .create(ROOT_INO, name.as_bytes(), NewKind::File, 0o644, 0, 0)
                .await
                .unwrap();
            fs.open_file(a.ino).await.unwrap();
            // New text, then the start of the previous file (duplicates).
            let mut data = text(768 << 10, round);
            data.extend_from_slice(&files.last().map_or_else(
                || text(256 << 10, 99),
                |f: &(u64, Vec<u8>)| f.1[..256 << 10].to_vec(),
            ));
            fs.write_reduced(a.ino, 0, &data).await.unwrap();
            fs.release_file(a.ino).await;
            files.push((a.ino, data));
            // From 0.1 to 51 ms: before, during and after the page, log
            // and commit record writes.
            let wait = Duration::from_micros((100 << (round % 10)) + 37 * round);
            if tokio::time::timeout(wait, fs.sync()).await.is_err() {
                dropped += 1;
            }
        }
        assert!(
            dropped > 0,
            "no commit was dropped part-way: the test tested nothing"
        );
        eprintln!("{dropped} of 48 commits dropped part-way");
        fs.close().await.unwrap();
        drop(fs);
        let fs = FileSystem::open(&file, Options::default()).await.unwrap();
        let rep = fs.fsck().await;
        assert!(
            rep.problems.is_empty(),
            "fsck after dropped commits: {:?}",
            &rep.problems[..rep.problems.len().min(8)]
        );
        for (ino, data) in &files {
            let got = fs.read(*ino, 0, data.len()).await.unwrap();
            assert!(got == *data, "file {ino} differs after dropped commits");
        }
        fs.close().await.unwrap();
    });
}

/// `dase clean --recompress`: compressed chunks (plain and deltas) stored
/// again at a high zstd level take fewer bytes, read back bit-exact, and a
/// second pass (through the mount or offline) finds nothing more to do.
#[test]
fn recompression_stores_cold_chunks_smaller_and_reads_back_exact() {
    let rig = FsRig::with_mkfs("recompress", 5, "512M", "3+2", &["--reduce", "full"]);
    let m = rig.mount("mnt", &[]).unwrap();
    let root = m.path.clone();
    let a = text(4 << 20, 7);
    let mut c = a.clone();
    for i in 0..4 {
        let at = 500_000 + i * 900_000;
        c[at..at + 16].copy_from_slice(b"EDITED-EDITED-ED");
    }
    write_file(&root.join("a"), &a);
    write_file(&root.join("c"), &c);
    commit(&root);
    let s1 = rig.stats();
    assert!(
        num(&s1, "delta_chunk_bytes") > 0,
        "no deltas to recompress: {s1}"
    );

    let out = rig.dase(&["clean", "--cluster", rig.cluster_str(), "--recompress"]);
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "recompress through the mount: {said}");
    assert!(said.contains("recompress: "), "no progress shown: {said}");
    let s2 = rig.stats();
    let (before, after) = (
        num(&s1, "after_compression_bytes"),
        num(&s2, "after_compression_bytes"),
    );
    assert!(
        after < before - before / 20,
        "level 19 stored {after} of level 1's {before}"
    );
    assert_eq!(num(&s2, "chunks"), num(&s1, "chunks"));
    assert_eq!(num(&s2, "after_dedup_bytes"), num(&s1, "after_dedup_bytes"));
    assert!(
        num(&s2, "delta_chunk_bytes") > 0,
        "deltas lost their encoding: {s2}"
    );
    assert_files(&root, &[("a", &a), ("c", &c)], " after recompression");

    // Again through the mount: every frame carries level 19 now.
    let out = rig.dase(&["clean", "--cluster", rig.cluster_str(), "--recompress"]);
    assert!(out.status.success());
    assert_eq!(num(&rig.stats(), "after_compression_bytes"), after);
    assert!(m.stop());
    rig.assert_fsck_clean();

    // Offline, at the same level: nothing; at a bad level: a clear error.
    let out = rig.dase(&["clean", "--cluster", rig.cluster_str(), "--recompress"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && said.contains("recompressed 0 chunks"),
        "{said}"
    );
    let out = rig.dase(&[
        "clean",
        "--cluster",
        rig.cluster_str(),
        "--recompress",
        "--level",
        "30",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("30"),
        "{out:?}"
    );

    let m = rig.mount("mnt", &[]).unwrap();
    assert_files(&m.path, &[("a", &a), ("c", &c)], " after remount");
    for n in ["a", "c"] {
        std::fs::remove_file(m.path.join(n)).unwrap();
    }
    assert!(m.stop());
    rig.clean();
    assert_stores_nothing(&rig);
    rig.assert_fsck_clean();
}

/// kill -9 of the mount while `dase clean --recompress` moves chunks: every
/// file reads back, fsck agrees, and an offline pass then finishes the job.
#[test]
fn a_crash_during_recompression_loses_nothing() {
    let rig = FsRig::with_mkfs("recrash", 5, "512M", "3+2", &["--reduce", "full"]);
    let m = rig.mount("mnt", &[]).unwrap();
    let root = m.path.clone();
    let files: Vec<Vec<u8>> = (0..6).map(|i| text(2 << 20, 100 + i)).collect();
    for (i, f) in files.iter().enumerate() {
        write_file(&root.join(format!("f{i}")), f);
    }
    commit(&root);
    let before = num(&rig.stats(), "after_compression_bytes");
    let mut pass = spawn_dase(&["clean", "--cluster", rig.cluster_str(), "--recompress"]);
    // Level 19 takes seconds over 12 MiB: commits of part of the moves
    // have happened by now, and more moves are in flight.
    std::thread::sleep(Duration::from_millis(1500));
    m.crash();
    let _ = pass.wait();
    let m = rig.mount_when_free("mnt", &[]);
    for (i, f) in files.iter().enumerate() {
        assert!(
            read_cold(&m.path.join(format!("f{i}"))) == *f,
            "f{i} differs after the crash"
        );
    }
    assert!(m.stop());
    rig.assert_fsck_clean();
    // Where the crash fell (timing, so not asserted): stored bytes between
    // the two ends mean part of the moves had committed.
    let mid = num(&rig.stats(), "after_compression_bytes");
    eprintln!("stored after the crash: {mid} of {before} before the pass");
    let out = rig.dase(&["clean", "--cluster", rig.cluster_str(), "--recompress"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = num(&rig.stats(), "after_compression_bytes");
    assert!(
        after < before - before / 20,
        "{after} of {before} after the pass"
    );
    rig.assert_fsck_clean();
    let m = rig.mount("mnt", &[]).unwrap();
    for (i, f) in files.iter().enumerate() {
        assert!(
            read_cold(&m.path.join(format!("f{i}"))) == *f,
            "f{i} differs after the pass"
        );
    }
    assert!(m.stop());
}

/// JSON-lines logs: the same keys and a few hundred values line after line,
/// request ids random — what compression regions are for (each chunk alone
/// re-learns the keys; a region learns them once).
fn jsonl(len: usize, seed: u64) -> Vec<u8> {
    const ROUTES: [&str; 8] = [
        "/v1/items",
        "/v1/items/{id}",
        "/v1/users/{id}/orders",
        "/v2/search",
        "/healthz",
        "/v1/checkout",
        "/v1/cart/{id}",
        "/metrics",
    ];
    const LEVELS: [&str; 4] = ["INFO", "INFO", "WARN", "DEBUG"];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 256);
    let mut ts = 1_764_000_000_000u64 + seed * 86_400_000;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ts += x % 97;
        v.extend_from_slice(
            format!(
                "{{\"ts\":{ts},\"level\":\"{}\",\"service\":\"api-{}\",\"route\":\"{}\",\
                 \"status\":{},\"ms\":{},\"request\":\"{:08x}\",\"bytes\":{}}}\n",
                LEVELS[(x >> 8) as usize & 3],
                (x >> 12) % 6,
                ROUTES[(x >> 16) as usize & 7],
                [200, 200, 200, 201, 204, 404, 500, 503][(x >> 20) as usize & 7],
                (x >> 24) % 900,
                (x >> 32) as u32,
                (x >> 44) % 65536,
            )
            .as_bytes(),
        );
    }
    v.truncate(len);
    v
}

/// Waits (up to two minutes) until the mount's log has `n` lines of
/// `what`; returns the `n`-th.
fn await_log(m: &Mount, what: &str, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = m.log_text();
        if let Some(l) = log.lines().filter(|l| l.contains(what)).nth(n - 1) {
            return l.to_string();
        }
        assert!(Instant::now() < deadline, "no {n} \"{what}\" in:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (up to three minutes) until the committed recompression mark, at
/// level 19, has reached the last segment made (a pass is followed by the
/// cleaner's moves, which the next pass reads); the stats then.
fn await_recompressed(rig: &FsRig, m: &Mount) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let s = rig.stats();
        if num(&s, "recompressed_level") == 19
            && num(&s, "recompressed_below_segment") == num(&s, "segments_made")
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "passes never ended:\n{}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `dase mount --recompress-idle`: once writes stop, the mount stores text
/// again in regions by itself (the same bytes as `dase clean --recompress`
/// would), reading only segments written since its last pass and never
/// those of incompressible data; a write stops a pass, and a later pass
/// finishes the work; the lease is renewed throughout; the mark survives a
/// remount, so a fresh mount reads nothing old again (and with
/// `--recompress-region 0` makes no regions); every file reads back exact
/// and fsck stays clean.
#[test]
fn an_idle_mount_recompresses_only_what_was_written_since_its_last_pass() {
    const STARTS: &str = "idle recompression pass starts";
    const DONE: &str = "idle recompression pass segments=";
    let passes = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains(DONE))
            .map(str::to_string)
            .collect()
    };
    let rig = FsRig::with_mkfs("idle", 5, "512M", "3+2", &["--reduce", "full"]);
    let idle = ["--recompress-idle", "2"];
    let m = rig.mount("mnt", &idle).unwrap();
    let root = m.path.clone();
    let a = jsonl(16 << 20, 11);
    let noise = pattern(4 << 20, 12);
    write_file(&root.join("noise"), &noise);
    write_file(&root.join("a"), &a);
    commit(&root);
    let inline = num(&rig.stats(), "after_compression_bytes");
    // While a pass runs (and holds the segments), the mount still renews
    // its lease: a second mount, past the 2 s lease, is refused.
    await_log(&m, STARTS, 1);
    std::thread::sleep(Duration::from_secs(3));
    match rig.mount("mnt2", &[]) {
        Ok(other) => {
            assert!(other.stop());
            panic!(
                "a second mount took the lease during a pass:\n{}",
                m.log_text()
            );
        }
        Err(e) => assert!(e.contains("lease"), "{e}"),
    }
    // A write while the first pass runs stops it at the next segment.
    let b = jsonl(1 << 20, 13);
    write_file(&root.join("b"), &b);
    let first = await_log(&m, DONE, 1);
    assert!(
        first.contains("stopped=true"),
        "a write did not stop it: {first}"
    );
    // Later passes finish the work.
    let after = num(&await_recompressed(&rig, &m), "after_compression_bytes");
    let log = m.log_text();
    let read: u64 = passes(&log).iter().map(|l| field(l, "segments")).sum();
    eprintln!("idle recompression: {inline} -> {after} stored bytes, {read} segments read");
    // The text's share of it (the noise is stored as is) shrinks by over
    // a tenth, b's own bytes included (without the pass: b's ~180 KB more).
    let text = inline - noise.len() as u64;
    assert!(after + text / 10 < inline, "{inline} -> {after}:\n{log}");
    // a and b compressed are ~3 MB, 16 segments of 192 KiB (and a stopped
    // pass reads some twice); the noise alone is 22 segments, never read.
    assert!(read < 30, "{read} segments read:\n{log}");
    let files = [("a", &a), ("b", &b), ("noise", &noise)];
    assert_files(&root, &files, " after idle recompression");
    assert!(m.stop());
    rig.assert_fsck_clean();

    // A fresh mount knows nothing of the old segments but the mark: it
    // reads only what is written now.
    // Chunk by chunk this time (--recompress-region 0): no regions made.
    let m = rig
        .mount(
            "mnt",
            &["--recompress-idle", "2", "--recompress-region", "0"],
        )
        .unwrap();
    let c = jsonl(2 << 20, 14);
    write_file(&m.path.join("c"), &c);
    commit(&m.path);
    let before = num(&rig.stats(), "after_compression_bytes");
    await_log(&m, DONE, 1);
    let now = num(&await_recompressed(&rig, &m), "after_compression_bytes");
    let log = m.log_text();
    assert!(m.stop());
    let read: u64 = passes(&log).iter().map(|l| field(l, "segments")).sum();
    eprintln!("after a remount: {before} -> {now} stored bytes, {read} segments read");
    assert!(
        read <= 4,
        "a remount read old segments again ({read}):\n{log}"
    );
    // c's inline bytes are what it added.
    assert!(
        now + (before - after) / 8 < before,
        "c was not recompressed:\n{log}"
    );
    assert!(
        passes(&log).iter().all(|l| field(l, "regions") == 0),
        "regions made with --recompress-region 0:\n{log}"
    );
    rig.assert_fsck_clean();
    let m = rig.mount("mnt", &[]).unwrap();
    let files = [("a", &a), ("b", &b), ("c", &c), ("noise", &noise)];
    assert_files(&m.path, &files, " after a remount");
    assert!(m.stop());
}

/// An offline `dase clean --recompress` holds the lease for as long as it
/// runs, however much longer than the lease that is: a mount tried well
/// past the offline tool's 10 s lease, while the pass still writes, is
/// refused. (Before the lease was renewed in a task of its own, only the
/// mount's background loop renewed it, and offline tools not at all.)
/// Long (~1.5 min: the pass must outlast the lease), so ignored by default:
/// `cargo test --release -p dase-tests --test reduce an_offline_pass -- --ignored`.
#[test]
#[ignore]
fn an_offline_pass_keeps_its_lease_however_long_it_runs() {
    let rig = FsRig::with_mkfs("offlease", 5, "512M", "3+2", &["--reduce", "full"]);
    let m = rig.mount("mnt", &[]).unwrap();
    let a = jsonl(40 << 20, 21);
    write_file(&m.path.join("a"), &a);
    assert!(m.stop());
    let mut pass = spawn_dase(&["clean", "--cluster", rig.cluster_str(), "--recompress"]);
    std::thread::sleep(Duration::from_secs(14));
    assert!(
        pass.try_wait().unwrap().is_none(),
        "the pass ended before its lease would have: the check needs more data"
    );
    match rig.mount("mnt", &[]) {
        Ok(m) => {
            assert!(m.stop());
            panic!("a mount took the lease from a running offline pass");
        }
        Err(e) => assert!(e.contains("dase clean"), "{e}"),
    }
    assert!(pass.wait().unwrap().success());
    rig.assert_fsck_clean();
    let m = rig.mount("mnt", &[]).unwrap();
    assert_files(&m.path, &[("a", &a)], " after the offline pass");
    assert!(m.stop());
}

/// `dase clean --recompress` gathers plain chunks into compression regions:
/// fewer stored bytes than the same level chunk by chunk, every byte read
/// back (whole and at random), new writes dedup against region members and
/// delta against them, deleting the originals keeps what others still
/// reference, and deleting everything returns stored bytes to zero.
#[test]
fn compression_regions_store_less_and_their_chunks_stay_usable() {
    let rig = FsRig::with_mkfs("regions", 5, "512M", "3+2", &["--reduce", "full"]);
    let m = rig.mount("mnt", &[]).unwrap();
    let root = m.path.clone();
    let a = jsonl(3 << 20, 1);
    let b = jsonl(3 << 20, 2);
    let mut d = jsonl(2 << 20, 3);
    write_file(&root.join("a"), &a);
    write_file(&root.join("b"), &b);
    write_file(&root.join("d"), &d);
    commit(&root);

    // Chunk by chunk at level 19 first, then regions: what regions add.
    let out = rig.dase(&[
        "clean",
        "--cluster",
        rig.cluster_str(),
        "--recompress",
        "--region",
        "0",
    ]);
    assert!(out.status.success(), "{out:?}");
    let s1 = rig.stats();
    let out = rig.dase(&["clean", "--cluster", rig.cluster_str(), "--recompress"]);
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let s2 = rig.stats();
    let (alone, regions) = (
        num(&s1, "after_compression_bytes"),
        num(&s2, "after_compression_bytes"),
    );
    eprintln!("level 19 chunk by chunk {alone} bytes, in regions {regions}");
    assert!(
        regions < alone - alone / 20,
        "regions stored {regions} of chunk-by-chunk's {alone}: {said}"
    );
    assert_eq!(num(&s2, "chunks"), num(&s1, "chunks"));
    assert_eq!(num(&s2, "after_dedup_bytes"), num(&s1, "after_dedup_bytes"));
    assert_files(&root, &[("a", &a), ("b", &b)], " in regions");
    drop_caches();
    let f = File::open(root.join("b")).unwrap();
    let mut x = 7u64;
    for _ in 0..64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = (x >> 20) as usize % (b.len() - 70_000);
        let len = 1 + (x >> 8) as usize % 70_000;
        let mut got = vec![0u8; len];
        f.read_exact_at(&mut got, at as u64).unwrap();
        assert!(got == b[at..at + len], "random read of b at {at}+{len}");
    }
    drop(f); // an open file keeps the mount busy

    // Most of d overwritten (with incompressible bytes, which recompression
    // leaves alone): its regions are mostly dead, and the next pass
    // rewrites their live members into new regions and frees the rest.
    let f = OpenOptions::new().write(true).open(root.join("d")).unwrap();
    for at in (0..d.len()).step_by(256 << 10) {
        let r = at + (32 << 10)..(at + (256 << 10)).min(d.len());
        let junk = pattern(r.len(), at as u64);
        f.write_all_at(&junk, r.start as u64).unwrap();
        d[r].copy_from_slice(&junk);
    }
    f.sync_all().unwrap();
    drop(f);
    commit(&root);
    let out = rig.dase(&["clean", "--cluster", rig.cluster_str()]);
    assert!(out.status.success(), "{out:?}");
    let dead = num(&rig.stats(), "after_compression_bytes");
    let out = rig.dase(&["clean", "--cluster", rig.cluster_str(), "--recompress"]);
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}\nmount: {}", m.log_text());
    let rewritten = num(&rig.stats(), "after_compression_bytes");
    eprintln!("d mostly overwritten: {dead} bytes stored, {rewritten} after the pass");
    assert!(
        rewritten + 80_000 < dead,
        "partly dead regions kept their bytes: {dead} -> {rewritten}: {said}"
    );
    assert!(
        read_cold(&root.join("d")) == d,
        "d differs after its regions were rewritten"
    );
    let regions = rewritten; // the baseline of what follows

    // A copy dedups against region members; an edited copy is deltas whose
    // references are members.
    let mut b2 = b.clone();
    for i in 0..6 {
        let at = 300_000 + i * 450_000;
        b2[at..at + 12].copy_from_slice(b"EDITED-LINE-");
    }
    write_file(&root.join("a2"), &a);
    write_file(&root.join("b2"), &b2);
    commit(&root);
    let s3 = rig.stats();
    assert!(
        num(&s3, "delta_chunk_bytes") > num(&s2, "delta_chunk_bytes"),
        "no deltas against region members: {s3}"
    );
    assert!(
        num(&s3, "after_compression_bytes") < regions + (b.len() / 50) as u64,
        "a copy and an edited copy took {} bytes more: {s3}",
        num(&s3, "after_compression_bytes") - regions
    );
    assert_files(&root, &[("a2", &a), ("b2", &b2)], "");
    let log = m.log.clone();
    assert!(
        m.stop(),
        "{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    rig.assert_fsck_clean();

    // The originals go: what a2 and b2's deltas reference stays.
    let m = rig.mount("mnt", &[]).unwrap();
    std::fs::remove_file(m.path.join("a")).unwrap();
    std::fs::remove_file(m.path.join("b")).unwrap();
    let log = m.log.clone();
    assert!(
        m.stop(),
        "{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    rig.clean();
    rig.assert_fsck_clean();
    let m = rig.mount("mnt", &[]).unwrap();
    assert_files(&m.path, &[("a2", &a), ("b2", &b2)], " after deletes");
    for n in ["a2", "b2", "d"] {
        std::fs::remove_file(m.path.join(n)).unwrap();
    }
    let log = m.log.clone();
    assert!(
        m.stop(),
        "{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    rig.clean();
    let s = assert_stores_nothing(&rig);
    assert_eq!(num(&s, "after_compression_bytes"), 0, "{s}");
    rig.assert_fsck_clean();

    // Bad sizes are clear errors.
    for (size, said) in [("64M", "16777216 bytes"), ("4k", "0: none")] {
        let out = rig.dase(&[
            "clean",
            "--cluster",
            rig.cluster_str(),
            "--recompress",
            "--region",
            size,
        ]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(said),
            "{out:?}"
        );
    }
}

/// Writes, overwrites and deletes while `dase clean --recompress` builds
/// compression regions through the mount: a region whose members changed
/// meanwhile is not made, every file reads back as last written, fsck
/// agrees, and a second pass offline leaves it all intact.
#[test]
fn compression_regions_under_concurrent_writes_lose_nothing() {
    let rig = FsRig::with_mkfs("regionrace", 5, "512M", "3+2", &["--reduce", "full"]);
    let m = rig.mount("mnt", &[]).unwrap();
    let root = m.path.clone();
    let mut want: Vec<(String, Option<Vec<u8>>)> = (0..6)
        .map(|i| (format!("f{i}"), Some(jsonl(2 << 20, 10 + i))))
        .collect();
    for (n, d) in &want {
        write_file(&root.join(n), d.as_ref().unwrap());
    }
    commit(&root);
    let pass = std::process::Command::new(dase_bin())
        .args(["clean", "--cluster", rig.cluster_str(), "--recompress"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // While it runs (level 19 over 12 MiB takes seconds): overwrite the
    // middles of three files, delete one, copy one, write a new one.
    for (i, (n, d)) in want.iter_mut().enumerate().take(3) {
        let d = d.as_mut().unwrap();
        let f = OpenOptions::new().write(true).open(root.join(&*n)).unwrap();
        let junk = jsonl(300_000, 100 + i as u64);
        let at = 500_000 + i * 200_000;
        f.write_all_at(&junk, at as u64).unwrap();
        d[at..at + junk.len()].copy_from_slice(&junk);
        f.sync_all().unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    std::fs::remove_file(root.join("f3")).unwrap();
    want[3].1 = None;
    let copy = want[4].1.clone();
    write_file(&root.join("f4b"), copy.as_ref().unwrap());
    want.push(("f4b".into(), copy));
    let new = jsonl(1 << 20, 77);
    write_file(&root.join("g"), &new);
    want.push(("g".into(), Some(new)));
    commit(&root);
    let out = pass.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let check = |root: &Path, when: &str| {
        for (n, d) in &want {
            match d {
                Some(d) => assert!(read_cold(&root.join(n)) == *d, "{n} differs {when}"),
                None => assert!(!root.join(n).exists(), "{n} is back {when}"),
            }
        }
    };
    check(&root, "after the pass");
    let log = m.log.clone();
    assert!(
        m.stop(),
        "{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    rig.assert_fsck_clean();
    let out = rig.dase(&["clean", "--cluster", rig.cluster_str(), "--recompress"]);
    assert!(out.status.success(), "{out:?}");
    rig.assert_fsck_clean();
    let m = rig.mount("mnt", &[]).unwrap();
    check(&m.path, "after a second pass");
    assert!(m.stop());
}

/// Model weights as little-endian fp32, roughly normal (a sum of four
/// uniforms) with a spread like a trained layer's.
fn weights(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut u = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f32 / (1u64 << 53) as f32
    };
    (0..n)
        .flat_map(|_| ((u() + u() + u() + u() - 2.0) * 0.09).to_le_bytes())
        .collect()
}

#[test]
fn model_weights_store_as_byte_planes_and_their_updates_as_xor_deltas() {
    let rig = FsRig::new("weights", 5, "512M", "3+2");
    let m = rig.mount("mnt", &[]).unwrap();
    let root = m.path.clone();
    // A checkpoint, then the next one: the first quarter frozen, every
    // other number nudged by a training step (all its low bits move).
    let a = weights(1 << 20, 3);
    let frozen = a.len() / 4;
    let b: Vec<u8> = a
        .chunks_exact(4)
        .enumerate()
        .flat_map(|(i, w)| {
            let v = f32::from_le_bytes(w.try_into().unwrap());
            let nudged = if 4 * i < frozen {
                v
            } else {
                v * (1.0 + ((i % 13) as f32 - 6.0) * 3e-6)
            };
            nudged.to_le_bytes()
        })
        .collect();
    write_file(&root.join("step0"), &a);
    commit(&root);
    let s1 = rig.stats();
    let stored1 = num(&s1, "after_compression_bytes");
    // Whole chunks of floats look incompressible; their exponent planes
    // are not.
    assert!(
        stored1 < a.len() as u64 * 9 / 10,
        "plain weights stored {stored1} of {}",
        a.len()
    );
    write_file(&root.join("step1"), &b);
    commit(&root);
    let s2 = rig.stats();
    let updated = (b.len() - frozen) as u64;
    assert!(
        num(&s2, "after_dedup_bytes") - num(&s1, "after_dedup_bytes") <= updated + 2 * MAX_CHUNK,
        "the frozen quarter did not dedup: {s2}"
    );
    assert!(
        num(&s2, "delta_chunk_bytes") > updated / 2,
        "few deltas: {s2}"
    );
    let grew = num(&s2, "after_compression_bytes") - stored1;
    assert!(
        grew < updated * 6 / 10,
        "the update stored {grew} bytes for {updated} updated"
    );
    assert_files(&root, &[("step0", &a), ("step1", &b)], "");
    // A sparse update of step0: one number in 61 moved by 1 %. Every byte
    // plane of the XOR is then mostly zero and stored as its non-zero
    // bytes and their gaps: 1/37 of the updated bytes, where zstd on the
    // planes stored 1/16.
    let c: Vec<u8> = a
        .chunks_exact(4)
        .enumerate()
        .flat_map(|(i, w)| {
            let v = f32::from_le_bytes(w.try_into().unwrap());
            let moved = 4 * i >= frozen && i % 61 == 0;
            (if moved { v * 1.01 } else { v }).to_le_bytes()
        })
        .collect();
    write_file(&root.join("step1b"), &c);
    commit(&root);
    let s2b = rig.stats();
    let grew = num(&s2b, "after_compression_bytes") - num(&s2, "after_compression_bytes");
    eprintln!("sparse update: {grew} bytes stored for {updated} updated");
    assert!(
        grew < updated / 30,
        "the sparse update stored {grew} bytes for {updated} updated: {s2b}"
    );
    assert_files(&root, &[("step1b", &c)], " (the sparse update)");
    std::fs::remove_file(root.join("step1b")).unwrap();
    commit(&root);
    // Recompressed (planes at level 19), still exact; then from a remount.
    let out = rig.dase(&["clean", "--cluster", rig.cluster_str(), "--recompress"]);
    assert!(out.status.success(), "{out:?}");
    let s3 = rig.stats();
    assert!(num(&s3, "after_compression_bytes") <= num(&s2, "after_compression_bytes"));
    assert!(
        num(&s3, "delta_chunk_bytes") > 0,
        "deltas lost their encoding: {s3}"
    );
    assert_files(
        &root,
        &[("step0", &a), ("step1", &b)],
        " after recompression",
    );
    assert!(m.stop());
    rig.assert_fsck_clean();
    let m = rig.mount("mnt", &[]).unwrap();
    assert_files(&m.path, &[("step0", &a), ("step1", &b)], " after remount");
    for n in ["step0", "step1"] {
        std::fs::remove_file(m.path.join(n)).unwrap();
    }
    assert!(m.stop());
    rig.clean();
    assert_stores_nothing(&rig);
    rig.assert_fsck_clean();
}

/// Later versions of a file delta against the same references (a delta's
/// reference is never itself a delta): the reference cache decodes each
/// once, for writes building deltas and for reads applying them, and the
/// file reads back exact with the cache and without it.
#[test]
fn deltas_on_the_same_references_fetch_each_reference_once() {
    let rig = FsRig::new("refcache", 5, "512M", "3+2");
    let a = text(4 << 20, 21);
    let edit = |shift, with| forty_edits(&a, shift, with);
    let (b, c) = (edit(0, b"EDIT"), edit(8, b"ALSO"));
    let m = rig.mount("mnt", &[]).unwrap();
    write_file(&m.path.join("a"), &a);
    write_file(&m.path.join("b"), &b);
    write_file(&m.path.join("c"), &c);
    let log = m.log.clone();
    assert!(m.stop());
    let log = std::fs::read_to_string(log).unwrap();
    // Writing b fetched a's chunks to build deltas on; c's deltas are on
    // the same chunks.
    assert!(logged(&log, "references_fetched") >= 20, "{log}");
    assert!(logged(&log, "reference_cache_hits") >= 20, "{log}");
    let s = rig.stats();
    assert!(num(&s, "delta_chunk_bytes") >= 20 * 4096, "few deltas: {s}");

    let d = edit(16, b"MORE");
    let read = |args: &[&str], then_write: bool| {
        let m = rig.mount("mnt", args).unwrap();
        let log = m.log.clone();
        assert_files(&m.path, &[("b", &b), ("c", &c)], "");
        if then_write {
            // The references the reads left unchecked (their deltas vouched
            // for them) are hashed before new deltas are built on them.
            write_file(&m.path.join("d"), &d);
        }
        assert!(m.stop());
        let log = std::fs::read_to_string(log).unwrap();
        (
            logged(&log, "references_fetched"),
            logged(&log, "reference_cache_hits"),
        )
    };
    // Cold: b's deltas fetch the references, c's find them decoded.
    let (fetched, hits) = read(&[], false);
    assert!(
        fetched >= 20 && hits >= 20,
        "{fetched} fetched, {hits} hits"
    );
    // Without the cache every delta fetches its reference.
    let (fetched_uncached, hits_uncached) = read(&["--reference-cache", "0"], false);
    assert_eq!(hits_uncached, 0);
    assert!(
        fetched_uncached >= fetched + hits / 2,
        "{fetched_uncached} fetched without the cache, {fetched} + {hits} with it"
    );
    // A write after those reads builds its deltas on the cached references,
    // fetching none it already holds.
    let before = rig.stats();
    let (fetched_w, hits_w) = read(&[], true);
    assert!(
        fetched_w <= fetched + 4,
        "{fetched_w} fetched for reads and a write"
    );
    assert!(hits_w >= hits + 20, "{hits_w} hits for reads and a write");
    let s = rig.stats();
    let grew = num(&s, "after_compression_bytes") - num(&before, "after_compression_bytes");
    assert!(grew < 16 * 1024, "d's forty edits stored {grew} bytes");
    let m = rig.mount("mnt", &[]).unwrap();
    assert_files(
        &m.path,
        &[("b", &b), ("c", &c), ("d", &d)],
        " after remount",
    );
    assert!(m.stop());
    rig.assert_fsck_clean();
}

/// Cached references are memory held for long: one gone bad must neither be
/// served nor built on. In process, against real D-nodes, with every cached
/// reference damaged (fault injection) before a write and before a read.
#[test]
fn a_damaged_cached_reference_is_neither_served_nor_built_on() {
    use dase_initiator::cnode::fs::{FileSystem, NewKind, Options};
    use dase_initiator::cnode::meta::ROOT_INO;
    use dase_initiator::cnode::ClusterFile;
    use std::sync::atomic::Ordering::Relaxed;
    let rig = FsRig::new("refdamage", 5, "512M", "3+2");
    let file = ClusterFile::load(&rig.cluster).unwrap();
    let a = text(4 << 20, 31);
    let edit = |shift, with| forty_edits(&a, shift, with);
    let files = [a.clone(), edit(0, b"EDIT"), edit(8, b"ALSO")];
    rt().block_on(async {
        let fs = FileSystem::open(&file, Options::default()).await.unwrap();
        let mut inos = Vec::new();
        let write = |name: &'static str, data: Vec<u8>| {
            let fs = &fs;
            async move {
                let f = fs
                    .create(ROOT_INO, name.as_bytes(), NewKind::File, 0o644, 0, 0)
                    .await
                    .unwrap();
                fs.open_file(f.ino).await.unwrap();
                fs.write_reduced(f.ino, 0, &data).await.unwrap();
                fs.release_file(f.ino).await;
                fs.sync().await.unwrap();
                f.ino
            }
        };
        inos.push(write("a", files[0].clone()).await);
        // b's deltas fetch a's chunks into the cache.
        inos.push(write("b", files[1].clone()).await);
        let i = fs.ingest();
        assert!(i.references_fetched.load(Relaxed) >= 20);
        // Before c's write builds on them.
        let damaged = fs.damage_reference_cache();
        assert!(damaged >= 20, "{damaged} references cached");
        inos.push(write("c", files[2].clone()).await);
        let rejected = i.references_rejected.load(Relaxed);
        assert!(
            rejected >= 20,
            "{rejected} damaged references rejected by the write"
        );
        // Before reads decode deltas against them.
        assert!(fs.damage_reference_cache() >= 20);
        for (ino, want) in inos.iter().zip(&files).skip(1) {
            let got = fs.read(*ino, 0, want.len()).await.unwrap();
            assert!(got == *want, "file {ino} read through damaged references");
        }
        assert!(i.references_rejected.load(Relaxed) >= rejected + 20);
        fs.close().await.unwrap();
        drop(fs);
        // What was written on the damaged cache decodes against the stored
        // references.
        let fs = FileSystem::open(&file, Options::default()).await.unwrap();
        for (ino, want) in inos.iter().zip(&files) {
            let got = fs.read(*ino, 0, want.len()).await.unwrap();
            assert!(got == *want, "file {ino} differs after remount");
        }
        let rep = fs.fsck().await;
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        fs.close().await.unwrap();
    });
}

/// A reference chunk that passed its strips' checksums yet does not decode
/// its delta went bad in memory after the read: it is read once more, and
/// if it is still wrong the read fails naming it — wrong bytes are never
/// served, nor kept in the reference cache. In process, against real
/// D-nodes, the fetched references damaged by fault injection.
#[test]
fn a_reference_damaged_after_its_read_is_read_again_or_the_read_fails() {
    use dase_initiator::cnode::fs::{FileSystem, NewKind, Options};
    use dase_initiator::cnode::meta::ROOT_INO;
    use dase_initiator::cnode::ClusterFile;
    use std::sync::atomic::Ordering::Relaxed;
    let rig = FsRig::new("refrefetch", 5, "512M", "3+2");
    let file = ClusterFile::load(&rig.cluster).unwrap();
    let a = text(4 << 20, 41);
    let b = forty_edits(&a, 0, b"EDIT");
    rt().block_on(async {
        let fs = FileSystem::open(&file, Options::default()).await.unwrap();
        let mut inos = Vec::new();
        for (name, data) in [("a", &a), ("b", &b)] {
            let f = fs
                .create(ROOT_INO, name.as_bytes(), NewKind::File, 0o644, 0, 0)
                .await
                .unwrap();
            fs.open_file(f.ino).await.unwrap();
            fs.write_reduced(f.ino, 0, data).await.unwrap();
            fs.release_file(f.ino).await;
            inos.push(f.ino);
        }
        fs.close().await.unwrap();
        drop(fs);
        // A fresh mount without a reference cache: every delta fetches.
        let opts = || Options {
            reference_cache: 0,
            ..Default::default()
        };
        let fs = FileSystem::open(&file, opts()).await.unwrap();
        let i = fs.ingest();
        // One damaged fetch: read again, the file reads back exact.
        fs.damage_fetched_references(1);
        assert!(fs.read(inos[1], 0, b.len()).await.unwrap() == b);
        assert_eq!(i.references_rejected.load(Relaxed), 1);
        let fetched = i.references_fetched.load(Relaxed);
        assert!(
            fetched >= 21,
            "{fetched} references fetched for forty deltas"
        );
        // Every fetch damaged: the read fails, naming the reference.
        fs.damage_fetched_references(usize::MAX);
        let err = fs.read(inos[1], 0, b.len()).await.unwrap_err().to_string();
        assert!(
            err.contains("reference chunk") && err.contains("does not match its fingerprint"),
            "{err}"
        );
        // Nothing wrong was kept: undamaged, it reads back exact.
        fs.damage_fetched_references(0);
        assert!(fs.read(inos[1], 0, b.len()).await.unwrap() == b);
        assert!(fs.read(inos[0], 0, a.len()).await.unwrap() == a);
        fs.close().await.unwrap();
        drop(fs);
        // Nor with the cache on: a damaged reference never enters it.
        let fs = FileSystem::open(&file, Options::default()).await.unwrap();
        fs.damage_fetched_references(usize::MAX);
        assert!(fs.read(inos[1], 0, b.len()).await.is_err());
        fs.damage_fetched_references(0);
        assert!(fs.read(inos[1], 0, b.len()).await.unwrap() == b);
        // Read again: the references the first read cached are right.
        assert!(fs.read(inos[1], 0, b.len()).await.unwrap() == b);
        assert!(fs.ingest().reference_hits.load(Relaxed) >= 20);
        let rep = fs.fsck().await;
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        fs.close().await.unwrap();
    });
}

/// Once the indexes outgrow the page cache, the filters kept of evicted
/// buckets answer new chunks' lookups without loading the buckets — and
/// never hide a stored chunk: a copy and a near copy of data whose buckets
/// were evicted still dedup and delta against it.
/// A fresh C-node (a remount, a failover) warms the filters of every
/// bucket at mount, so new data's lookups need not load the buckets the
/// way an evicting cache would have taught it; and warmed filters hide
/// nothing: a copy still dedups.
#[test]
fn a_fresh_mount_warms_bucket_filters_and_new_data_then_loads_few_pages() {
    let a = pattern(48 << 20, 710);
    let new = pattern(2 << 20, 711);
    // A mount that waits for its warm-up (when on) before going on, and
    // the warm-up's log line.
    let mount = |rig: &FsRig, warm: &str| -> (Mount, String) {
        let m = rig.mount_when_free("mnt", &["--warm-filters", warm]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = std::fs::read_to_string(&m.log).unwrap();
            match log.lines().find(|l| l.contains("index filters warmed")) {
                Some(l) => return (m, l.to_string()),
                None if warm == "false" => return (m, String::new()),
                None => assert!(Instant::now() < deadline, "no warm-up in 30 s"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let run = |name: &str, warm: &str| {
        let rig = indexed(name, &a);
        let buckets = {
            let s = rig.stats();
            num(&s, "chunk_buckets") + num(&s, "similar_buckets")
        };
        let (m, warmed) = mount(&rig, warm);
        write_file(&m.path.join("new"), &new);
        let log = m.log.clone();
        assert!(m.stop());
        let loads = logged(&std::fs::read_to_string(log).unwrap(), "index_page_loads");
        // Warmed filters hide nothing: a copy of a, whose entries are all
        // in buckets filtered at mount, dedups whole.
        let (m, _) = mount(&rig, warm);
        write_file(&m.path.join("copy"), &a);
        assert!(m.stop());
        let s = rig.stats();
        assert!(
            num(&s, "after_dedup_bytes") <= (a.len() + new.len()) as u64 + 2 * MAX_CHUNK,
            "the copy should have cost nothing: {s}"
        );
        let m = rig.mount("mnt", &[]).unwrap();
        assert_files(&m.path, &[("a", &a), ("new", &new), ("copy", &a)], "");
        assert!(m.stop());
        rig.assert_fsck_clean();
        (loads, warmed, buckets)
    };
    let (loads, warmed, buckets) = run("warm", "true");
    let (loads_cold, _, _) = run("cold", "false");
    eprintln!("{buckets} buckets; {warmed}; then {loads} page loads, without warming {loads_cold}");
    assert!(buckets >= 12, "the index should span many buckets");
    // Every bucket page on the D-nodes (some buckets may have none yet).
    let (listed, made) = (field(&warmed, "buckets"), field(&warmed, "filters"));
    assert!(listed + 2 >= buckets && made == listed, "{warmed}");
    // The new file's ~110 chunks meet nearly every bucket: cold, each
    // loads; warmed, only the ~1 % of lookups a filter lets through.
    assert!(
        loads_cold >= buckets / 2 && loads <= loads_cold / 3,
        "{loads} page loads warmed against {loads_cold} cold"
    );
}

#[test]
fn filters_of_evicted_buckets_spare_new_chunks_page_loads_and_hide_nothing() {
    let a = pattern(24 << 20, 700);
    let b = pattern(24 << 20, 701);
    let near = forty_edits(&a, 0, b"EDIT");
    let run = |name: &str, filters: &str| {
        let rig = indexed(name, &a);
        // A fresh mount whose cache holds a few of the buckets, evicting
        // the others at every commit: b's chunks are new, so their lookups
        // meet every bucket, most of them evicted.
        // (Not warmed at mount: these filters are to come from evictions.)
        let args = [
            "--commit-interval",
            "0.02",
            "--cache-pages",
            "4",
            "--index-filters",
            filters,
            "--warm-filters",
            "false",
        ];
        let m = rig.mount("mnt", &args).unwrap();
        write_file(&m.path.join("b"), &b);
        let log = m.log.clone();
        assert!(m.stop());
        let log = std::fs::read_to_string(log).unwrap();
        // Every chunk of the copy, and all but forty of the near copy, is
        // stored: their buckets must be loaded, filter or not.
        // (Not every 20 ms: that was for b's evictions. The lease of a
        // mount committing that often was seen held a second after its
        // clean unmount once, under the full test run's load.)
        let args = &args[2..];
        let m = rig.mount_when_free("mnt", args);
        write_file(&m.path.join("copy"), &a);
        write_file(&m.path.join("near"), &near);
        assert!(m.stop());
        let s = rig.stats();
        let file = a.len() as u64;
        assert!(
            num(&s, "after_dedup_bytes") <= 2 * file + 41 * MAX_CHUNK,
            "the copy should cost nothing and the near copy forty chunks: {s}"
        );
        assert!(
            num(&s, "after_similarity_bytes") <= 2 * file + 40 * 4096,
            "the near copy's chunks should be small deltas: {s}"
        );
        let m = rig.mount("mnt", args).unwrap();
        assert_files(
            &m.path,
            &[("a", &a), ("b", &b), ("copy", &a), ("near", &near)],
            "",
        );
        assert!(m.stop());
        rig.assert_fsck_clean();
        let buckets = num(&s, "chunk_buckets") + num(&s, "similar_buckets");
        (
            logged(&log, "index_page_loads"),
            logged(&log, "filtered_lookups"),
            logged(&log, "index_lookups"),
            buckets,
        )
    };
    let (loads, filtered, lookups, buckets) = run("filters", "64");
    let (loads_without, filtered_without, _, _) = run("nofilters", "0");
    eprintln!(
        "{buckets} buckets, {lookups} lookups: {loads} page loads and {filtered} answered by \
         filters; without filters {loads_without} page loads"
    );
    assert!(
        buckets >= 12,
        "the indexes should outgrow the cache (4 pages)"
    );
    assert!(filtered > lookups / 8, "{filtered} of {lookups} filtered");
    // Each bucket loaded about once (when first met, and again when a
    // filter lets a key through falsely: ~1 % of the filtered lookups);
    // without filters, again after every eviction (how often depends on
    // commit timing, so it is printed, not compared).
    assert!(
        loads <= 2 * buckets + filtered / 25,
        "{loads} page loads for {buckets} buckets"
    );
    assert_eq!(filtered_without, 0, "--index-filters 0 still filtered");
}
