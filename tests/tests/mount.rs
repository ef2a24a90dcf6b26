//! The file system through real FUSE mounts over real D-node processes:
//! POSIX behaviour, crash and remount, D-node failures, rebuild,
//! corruption, bad configuration, and `dase demo`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dase_tests::*;

fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("expected an error")
        .raw_os_error()
        .unwrap_or(0)
}

/// A 4 KiB-aligned buffer for O_DIRECT.
fn aligned(data: &[u8]) -> Vec<u8> {
    assert_eq!(data.len() % 4096, 0);
    data.to_vec()
}

fn write_file(p: &Path, data: &[u8]) {
    let mut f = File::create(p).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Reads bypassing the page cache (the data must come from the D-nodes).
fn read_direct(p: &Path) -> Vec<u8> {
    drop_caches();
    let mut f = File::open(p).unwrap();
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

#[test]
fn posix_operations_behave_and_persist() {
    let rig = FsRig::new("posix", 5, "256M", "3+2");
    let m = rig.mount("mnt", &[]).unwrap();
    let root = m.path.clone();
    let p = |s: &str| root.join(s);
    let big = pattern(3 << 20, 7);

    // (case, check): each row one POSIX behaviour.
    type Case<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let cases: Vec<Case> = vec![
        (
            "create, write, read back",
            Box::new(|| {
                write_file(&p("a"), b"hello");
                assert_eq!(fs::read(p("a")).unwrap(), b"hello");
                assert_eq!(fs::metadata(p("a")).unwrap().len(), 5);
            }),
        ),
        (
            "large writes across segment boundaries",
            Box::new(|| {
                write_file(&p("big"), &big);
                assert_eq!(read_direct(&p("big")), big);
            }),
        ),
        (
            "1 MiB O_DIRECT writes and reads",
            Box::new(|| {
                let data = aligned(&pattern(4 << 20, 9));
                let f = OpenOptions::new()
                    .create(true)
                    .write(true)
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(p("direct"))
                    .unwrap();
                // O_DIRECT needs aligned memory: Vec<u8> of 1 MiB from the
                // allocator is page aligned in practice; copy through a
                // page-aligned region to be sure.
                let mut buf = vec![0u8; (1 << 20) + 4096];
                let off = buf.as_ptr().align_offset(4096);
                for (i, chunk) in data.chunks(1 << 20).enumerate() {
                    buf[off..off + chunk.len()].copy_from_slice(chunk);
                    f.write_all_at(&buf[off..off + chunk.len()], (i << 20) as u64)
                        .unwrap();
                }
                f.sync_data().unwrap();
                for (i, chunk) in data.chunks(1 << 20).enumerate() {
                    f.read_exact_at(&mut buf[off..off + chunk.len()], (i << 20) as u64)
                        .unwrap();
                    assert_eq!(&buf[off..off + chunk.len()], chunk, "MiB {i}");
                }
            }),
        ),
        (
            "overwrite in the middle",
            Box::new(|| {
                let f = OpenOptions::new().write(true).open(p("big")).unwrap();
                f.write_all_at(b"XYZ", 1_000_000).unwrap();
                f.sync_all().unwrap();
                let mut want = big.clone();
                want[1_000_000..1_000_003].copy_from_slice(b"XYZ");
                assert_eq!(read_direct(&p("big")), want);
            }),
        ),
        (
            "sparse write leaves a hole of zeros",
            Box::new(|| {
                let mut f = File::create(p("sparse")).unwrap();
                f.seek(SeekFrom::Start(5 << 20)).unwrap();
                f.write_all(b"end").unwrap();
                f.sync_all().unwrap();
                let v = read_direct(&p("sparse"));
                assert_eq!(v.len(), (5 << 20) + 3);
                assert!(v[..5 << 20].iter().all(|&b| b == 0));
                assert_eq!(&v[5 << 20..], b"end");
            }),
        ),
        (
            "append",
            Box::new(|| {
                let mut f = OpenOptions::new().append(true).open(p("a")).unwrap();
                f.write_all(b" world").unwrap();
                drop(f);
                assert_eq!(fs::read(p("a")).unwrap(), b"hello world");
            }),
        ),
        (
            "truncate shrinks and extends with zeros",
            Box::new(|| {
                let f = OpenOptions::new().write(true).open(p("a")).unwrap();
                f.set_len(3).unwrap();
                assert_eq!(fs::read(p("a")).unwrap(), b"hel");
                f.set_len(6).unwrap();
                assert_eq!(fs::read(p("a")).unwrap(), b"hel\0\0\0");
            }),
        ),
        (
            "unlink",
            Box::new(|| {
                write_file(&p("gone"), b"x");
                fs::remove_file(p("gone")).unwrap();
                assert_eq!(errno(fs::metadata(p("gone"))), libc::ENOENT);
                assert_eq!(errno(fs::remove_file(p("gone"))), libc::ENOENT);
            }),
        ),
        (
            "rename, and rename over an existing file",
            Box::new(|| {
                write_file(&p("r1"), b"one");
                write_file(&p("r2"), b"two");
                fs::rename(p("r1"), p("r3")).unwrap();
                assert_eq!(errno(fs::metadata(p("r1"))), libc::ENOENT);
                fs::rename(p("r3"), p("r2")).unwrap();
                assert_eq!(fs::read(p("r2")).unwrap(), b"one");
            }),
        ),
        (
            "mkdir, rmdir, and their errors",
            Box::new(|| {
                fs::create_dir(p("d")).unwrap();
                assert_eq!(errno(fs::create_dir(p("d"))), libc::EEXIST);
                write_file(&p("d/f"), b"f");
                assert_eq!(errno(fs::remove_dir(p("d"))), libc::ENOTEMPTY);
                assert_eq!(errno(fs::remove_dir(p("d/f"))), libc::ENOTDIR);
                assert_eq!(errno(fs::remove_file(p("d"))), libc::EISDIR);
                fs::create_dir_all(p("e/f/g")).unwrap();
                fs::remove_dir(p("e/f/g")).unwrap();
                assert_eq!(fs::metadata(p("e")).unwrap().nlink(), 3);
            }),
        ),
        (
            "rename directories",
            Box::new(|| {
                fs::create_dir(p("empty")).unwrap();
                fs::rename(p("e"), p("empty")).unwrap();
                assert!(p("empty/f").is_dir());
                assert_eq!(errno(fs::rename(p("d"), p("empty"))), libc::ENOTEMPTY);
                assert_eq!(errno(fs::rename(p("empty"), p("empty/f/x"))), libc::EINVAL);
                fs::rename(p("empty/f"), p("moved")).unwrap();
                assert_eq!(fs::metadata(p("empty")).unwrap().nlink(), 2);
            }),
        ),
        (
            "readdir of many entries",
            Box::new(|| {
                fs::create_dir(p("many")).unwrap();
                for i in 0..300 {
                    File::create(p(&format!("many/file-{i:04}"))).unwrap();
                }
                let mut names: Vec<String> = fs::read_dir(p("many"))
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect();
                names.sort();
                assert_eq!(names.len(), 300);
                assert_eq!(names[0], "file-0000");
                assert_eq!(names[299], "file-0299");
            }),
        ),
        (
            "chmod, utimes, getattr",
            Box::new(|| {
                fs::set_permissions(p("a"), fs::Permissions::from_mode(0o600)).unwrap();
                assert_eq!(fs::metadata(p("a")).unwrap().mode() & 0o7777, 0o600);
                let t = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
                File::options()
                    .write(true)
                    .open(p("a"))
                    .unwrap()
                    .set_modified(t)
                    .unwrap();
                assert_eq!(fs::metadata(p("a")).unwrap().mtime(), 1_000_000_000);
            }),
        ),
        (
            "symlinks",
            Box::new(|| {
                std::os::unix::fs::symlink("d/f", p("sl")).unwrap();
                assert_eq!(fs::read_link(p("sl")).unwrap(), Path::new("d/f"));
                assert_eq!(fs::read(p("sl")).unwrap(), b"f");
                assert!(fs::symlink_metadata(p("sl"))
                    .unwrap()
                    .file_type()
                    .is_symlink());
            }),
        ),
        (
            "hard links share data and count names",
            Box::new(|| {
                fs::hard_link(p("r2"), p("hl")).unwrap();
                assert_eq!(fs::metadata(p("r2")).unwrap().nlink(), 2);
                assert_eq!(fs::read(p("hl")).unwrap(), b"one");
                fs::remove_file(p("r2")).unwrap();
                assert_eq!(fs::metadata(p("hl")).unwrap().nlink(), 1);
                assert_eq!(fs::read(p("hl")).unwrap(), b"one");
                assert_eq!(errno(fs::hard_link(p("d"), p("dl"))), libc::EPERM);
            }),
        ),
        (
            "an unlinked open file stays readable until closed",
            Box::new(|| {
                write_file(&p("open"), b"still here");
                let mut f = File::open(p("open")).unwrap();
                fs::remove_file(p("open")).unwrap();
                let mut s = String::new();
                f.read_to_string(&mut s).unwrap();
                assert_eq!(s, "still here");
            }),
        ),
        (
            "fsync, fdatasync, directory fsync",
            Box::new(|| {
                let f = File::open(p("a")).unwrap();
                f.sync_all().unwrap();
                f.sync_data().unwrap();
                File::open(&root).unwrap().sync_all().unwrap();
            }),
        ),
        (
            "statfs",
            Box::new(|| {
                // SAFETY: statvfs on a NUL-terminated path into a zeroed struct.
                let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
                let c = std::ffi::CString::new(root.to_str().unwrap()).unwrap();
                assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
                assert!(s.f_blocks > 0 && s.f_bfree <= s.f_blocks && s.f_bfree > 0);
                assert_eq!(s.f_namemax, 255);
            }),
        ),
        (
            "names too long, FIFOs refused",
            Box::new(|| {
                assert_eq!(errno(File::create(p(&"n".repeat(256)))), libc::ENAMETOOLONG);
                let c = std::ffi::CString::new(p("fifo").to_str().unwrap()).unwrap();
                // SAFETY: mkfifo on a NUL-terminated path.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, -1);
            }),
        ),
    ];
    for (name, check) in &cases {
        eprintln!("case: {name}");
        check();
    }
    assert!(m.stop(), "clean unmount");
    assert!(!is_mounted(&root));

    // Everything is still there after a remount.
    let m = rig.mount("mnt", &[]).unwrap();
    assert_eq!(fs::read(p("a")).unwrap(), b"hel\0\0\0");
    let mut want = big.clone();
    want[1_000_000..1_000_003].copy_from_slice(b"XYZ");
    assert_eq!(fs::read(p("big")).unwrap(), want);
    assert_eq!(fs::read(p("hl")).unwrap(), b"one");
    assert_eq!(fs::read_link(p("sl")).unwrap(), Path::new("d/f"));
    assert_eq!(fs::read_dir(p("many")).unwrap().count(), 300);
    assert!(!p("open").exists());
    assert!(m.stop());
    let out = rig.dase(&["fsck", "--cluster", rig.cluster_str()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fsck: {text}");
    assert!(text.contains("clean"), "{text}");
}

#[test]
fn a_killed_mount_loses_nothing_fsynced_and_one_mount_at_a_time() {
    let rig = FsRig::new("crash", 5, "256M", "3+2");
    let m = rig.mount("mnt", &[]).unwrap();
    let mp = m.path.clone();
    let p = |s: &str| mp.join(s);
    let data = pattern(2 << 20, 3);
    write_file(&p("synced"), &data);
    write_file(&p("to-rename"), b"renamed");
    write_file(&p("to-unlink"), b"x");
    fs::create_dir(p("dir")).unwrap();
    fs::rename(p("to-rename"), p("dir/renamed")).unwrap();
    fs::remove_file(p("to-unlink")).unwrap();

    // A second mount (another mount point, same file system) is refused.
    let err = rig.mount("other", &[]).err().expect("second mount refused");
    assert!(err.contains("mounted by"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // Unlinked while open, then the C-node dies: freed at the next mount.
    write_file(&p("orphan"), b"open at the crash");
    let _held = File::open(p("orphan")).unwrap();
    fs::remove_file(p("orphan")).unwrap();
    // Unsynced data may or may not survive; it must not corrupt anything.
    let mut f = File::create(p("unsynced")).unwrap();
    f.write_all(&pattern(1 << 20, 4)).unwrap();
    m.crash();
    assert!(is_mounted(&mp), "a killed mount leaves a stale mount point");

    // The next mount clears the stale mount and recovers.
    let m = rig.mount_when_free("mnt", &[]);
    assert_eq!(read_direct(&p("synced")), data);
    assert_eq!(fs::read(p("dir/renamed")).unwrap(), b"renamed");
    assert!(!p("to-rename").exists());
    assert!(!p("to-unlink").exists());
    if let Ok(v) = fs::read(p("unsynced")) {
        let want = pattern(1 << 20, 4);
        assert!(v.len() <= want.len() && v[..] == want[..v.len()] || v.iter().all(|&b| b == 0));
    }
    assert!(m.stop());
    let out = rig.dase(&["fsck", "--cluster", rig.cluster_str()]);
    assert!(
        out.status.success(),
        "fsck after a crash: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn m_dnodes_killed_mid_workload_the_application_sees_no_error() {
    let mut rig = FsRig::new("mfail", 13, "256M", "10+3");
    let m = rig.mount("mnt", &[]).unwrap();
    let root = m.path.clone();
    let writer = std::thread::spawn({
        let root = root.clone();
        move || {
            for i in 0..24u64 {
                let data = pattern(1 << 20, i);
                write_file(&root.join(format!("f{i}")), &data);
                // Read back what was written so far, through the C-node.
                assert_eq!(
                    fs::read(root.join(format!("f{}", i / 2))).unwrap(),
                    pattern(1 << 20, i / 2)
                );
                std::thread::sleep(Duration::from_millis(30));
            }
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    for i in [2, 6, 11] {
        rig.nodes[i].kill();
        std::thread::sleep(Duration::from_millis(100));
    }
    writer.join().expect("the workload saw no error");
    for i in 0..24u64 {
        assert_eq!(
            read_direct(&root.join(format!("f{i}"))),
            pattern(1 << 20, i),
            "f{i}"
        );
    }
    // The killed D-nodes come back and are used again: new data written
    // now must survive three *other* D-nodes failing.
    for i in [2, 6, 11] {
        rig.nodes[i].restart();
    }
    std::thread::sleep(Duration::from_secs(3));
    let fresh = pattern(3 << 20, 99);
    write_file(&root.join("after"), &fresh);
    for i in [0, 4, 8] {
        rig.nodes[i].kill();
    }
    assert_eq!(read_direct(&root.join("after")), fresh);
    assert!(m.stop());
}

#[test]
fn rebuild_onto_a_replacement_while_mounted() {
    let mut rig = FsRig::new("rebuild", 8, "256M", "5+3");
    let m = rig.mount("mnt", &[]).unwrap();
    let root = m.path.clone();
    let data = pattern(8 << 20, 5);
    write_file(&root.join("data"), &data);
    // D-node 3 is lost for good; a fresh one takes its place.
    let old = rig.nodes[3].addr_string();
    let old_nqn = rig.nodes[3].nqn.clone();
    rig.nodes[3].kill();
    let img = rig.path("new.img");
    let fresh = DNode::start(&[
        "--nqn",
        &old_nqn,
        "--namespace",
        img.to_str().unwrap(),
        "--size",
        "256M",
    ]);
    let out = rig.dase(&[
        "rebuild",
        "--cluster",
        rig.cluster_str(),
        "--replace",
        &format!("{old}={}", fresh.addr),
    ]);
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "rebuild: {so}{se}");
    assert!(so.contains("the mount rebuilds"), "{so}");
    assert!(se.contains("(100%)"), "progress shown: {se}");
    assert!(fs::read_to_string(&rig.cluster)
        .unwrap()
        .contains(&fresh.addr.to_string()));
    // The mount stayed usable.
    write_file(&root.join("during"), b"still writable");
    // Full redundancy again: three *other* D-nodes may now fail.
    for i in [0, 5, 7] {
        rig.nodes[i].kill();
    }
    assert_eq!(read_direct(&root.join("data")), data);
    assert!(m.stop());
    drop(fresh);
}

#[test]
fn a_dnode_down_too_long_is_restriped_in_the_background() {
    let mut rig = FsRig::new("evac", 7, "256M", "3+2");
    let m = rig.mount("mnt", &["--rebuild-after", "1"]).unwrap();
    let root = m.path.clone();
    let data = pattern(6 << 20, 8);
    write_file(&root.join("data"), &data);
    rig.nodes[1].kill();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !m.log_text().contains("background rebuild finished") {
        assert!(
            !m.log_text().contains("background rebuild failed"),
            "{}",
            m.log_text()
        );
        assert!(
            Instant::now() < deadline,
            "no background rebuild: {}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Redundancy is back without node 1: two more may fail.
    rig.nodes[3].kill();
    rig.nodes[5].kill();
    drop_caches();
    let back = fs::read(root.join("data")).unwrap_or_else(|e| panic!("{e}: {}", m.log_text()));
    assert!(back == data, "data differs after losing 3 D-nodes");
    assert!(m.stop());
}

#[test]
fn a_corrupt_strip_is_caught_served_from_parity_and_repaired() {
    let rig = FsRig::new("corrupt", 5, "256M", "3+2");
    let m = rig.mount("mnt", &[]).unwrap();
    let data = pattern(4 << 20, 11);
    write_file(&m.path.join("f"), &data);
    let mp = m.path.clone();
    assert!(m.stop());
    // Overwrite every strip slot D-node 2 holds (data and metadata alike).
    let img = rig.path("d2.img");
    let region = 1u64 << 20..(1u64 << 20) + (8 << 20);
    {
        let f = OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(
            &vec![0xAB; (region.end - region.start) as usize],
            region.start,
        )
        .unwrap();
        f.sync_all().unwrap();
    }
    let m = rig.mount("mnt", &[]).unwrap();
    assert_eq!(m.path, mp);
    assert_eq!(read_direct(&mp.join("f")), data);
    assert!(
        m.log_text().contains("checksum mismatch"),
        "{}",
        m.log_text()
    );
    assert!(m.log_text().contains("corrupt strip repaired"));
    assert!(m.stop());
    // Repaired on the media: the slots it used no longer hold the garbage.
    let mut after = vec![0u8; (region.end - region.start) as usize];
    File::open(&img)
        .unwrap()
        .read_exact_at(&mut after, region.start)
        .unwrap();
    let repaired = after
        .chunks(64 * 1024)
        .filter(|s| s.iter().any(|&b| b != 0xAB))
        .count();
    // Healthy reads touch data strips only: those read are repaired
    // (parity strips are checked by fsck, next).
    assert!(
        repaired >= 10,
        "only {repaired} strips of D-node 2 repaired"
    );
    let out = rig.dase(&["fsck", "--cluster", rig.cluster_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Small reads are checked too: every 4 KiB of a strip has its own
    // checksum. Corrupt another D-node and read 4 KiB pieces with O_DIRECT.
    {
        let f = OpenOptions::new()
            .write(true)
            .open(rig.path("d4.img"))
            .unwrap();
        f.write_all_at(
            &vec![0x5A; (region.end - region.start) as usize],
            region.start,
        )
        .unwrap();
        f.sync_all().unwrap();
    }
    let m = rig.mount("mnt", &[]).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.path.join("f"))
        .unwrap();
    let mut buf = vec![0u8; 8192];
    let off = buf.as_ptr().align_offset(4096);
    for i in 0..(data.len() / 4096) as u64 {
        let at = (i * 7919 % (data.len() as u64 / 4096)) * 4096;
        f.read_exact_at(&mut buf[off..off + 4096], at).unwrap();
        assert!(
            buf[off..off + 4096] == data[at as usize..at as usize + 4096],
            "4 KiB at {at} served corrupt"
        );
    }
    drop(f);
    assert!(m.log_text().contains("checksum mismatch"));
    assert!(m.stop());
}

#[test]
fn metadata_pages_are_evicted_and_read_back() {
    // A cache of 2 pages (512 inodes) for 3,000 files: most lookups,
    // stats, renames and unlinks find their inode's page evicted.
    let rig = FsRig::new("pages", 5, "256M", "3+2");
    let m = rig.mount("mnt", &["--cache-pages", "2"]).unwrap();
    let root = m.path.clone();
    for d in 0..3 {
        fs::create_dir(root.join(format!("d{d}"))).unwrap();
        for f in 0..1000 {
            let p = root.join(format!("d{d}/f{f}"));
            fs::write(&p, format!("{d}/{f}")).unwrap();
        }
        // A commit, after which clean pages may be evicted.
        File::open(root.join(format!("d{d}")))
            .unwrap()
            .sync_all()
            .unwrap();
    }
    drop_caches();
    for d in 0..3 {
        for f in (0..1000).step_by(7) {
            let p = root.join(format!("d{d}/f{f}"));
            assert_eq!(fs::read_to_string(&p).unwrap(), format!("{d}/{f}"));
        }
        assert_eq!(
            fs::read_dir(root.join(format!("d{d}"))).unwrap().count(),
            1000
        );
    }
    fs::rename(root.join("d0/f1"), root.join("d2/moved")).unwrap();
    fs::remove_file(root.join("d1/f500")).unwrap();
    drop_caches();
    assert_eq!(fs::read_to_string(root.join("d2/moved")).unwrap(), "0/1");
    let rss = fs::read_to_string(format!("/proc/{}/status", m.child.id())).unwrap();
    eprintln!(
        "{}",
        rss.lines().find(|l| l.starts_with("VmRSS")).unwrap_or("")
    );
    assert!(m.stop());
    let m = rig.mount("mnt", &["--cache-pages", "2"]).unwrap();
    assert_eq!(fs::read_to_string(root.join("d2/moved")).unwrap(), "0/1");
    assert!(!root.join("d1/f500").exists());
    assert_eq!(fs::read_to_string(root.join("d2/f999")).unwrap(), "2/999");
    assert!(m.stop());
    let out = rig.dase(&["fsck", "--cluster", rig.cluster_str()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("inodes 3003") && text.contains("clean"),
        "{text}"
    );
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let mut rig = FsRig::new("badcfg", 5, "64M", "3+2");
    let text = |o: std::process::Output| {
        let s = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!o.status.success(), "should fail: {s}");
        assert!(!s.contains("panicked"), "{s}");
        s
    };
    // A mount that must be refused: if it came up, the test fails (and
    // unmounts it) rather than waiting on it.
    let m2 = rig.path("m2");
    let refused = |cluster: &Path| {
        let e = Mount::start(cluster, &m2, &[])
            .err()
            .expect("the mount should have been refused");
        assert!(!e.contains("panicked"), "{e}");
        e
    };
    // mkfs over an existing file system without --force.
    let s = text(rig.dase(&["mkfs", "--cluster", rig.cluster_str()]));
    assert!(s.contains("--force"), "{s}");
    // A cluster file listing the D-nodes in another order.
    let orig = fs::read_to_string(&rig.cluster).unwrap();
    let mut blocks: Vec<&str> = orig
        .split("\n\n")
        .filter(|b| b.contains("[[dnode]]"))
        .collect();
    blocks.swap(0, 1);
    let swapped = rig.path("swapped.toml");
    fs::write(&swapped, blocks.join("\n\n")).unwrap();
    fs::create_dir_all(rig.path("m2")).unwrap();
    let s = refused(&swapped);
    assert!(s.contains("does not match"), "{s}");
    // D-nodes of two file systems mixed.
    let other = FsRig::new("badcfg2", 5, "64M", "3+2");
    let mixed = rig.path("mixed.toml");
    let o = fs::read_to_string(&other.cluster).unwrap();
    let oblocks: Vec<&str> = o
        .split("\n\n")
        .filter(|b| b.contains("[[dnode]]"))
        .collect();
    let mut mix: Vec<&str> = orig
        .split("\n\n")
        .filter(|b| b.contains("[[dnode]]"))
        .collect();
    mix[4] = oblocks[4];
    fs::write(&mixed, mix.join("\n\n")).unwrap();
    let s = refused(&mixed);
    assert!(
        s.contains("two file systems") || s.contains("does not match"),
        "{s}"
    );
    // Not a directory.
    let s = text(rig.dase(&["mount", "--cluster", rig.cluster_str(), rig.cluster_str()]));
    assert!(s.contains("not a directory"), "{s}");
    // Idle recompression's options out of range.
    let mp = rig.path("m2");
    let mp = mp.to_str().unwrap();
    for (opt, val, says) in [
        ("--recompress-region", "5", "--recompress-region 5"),
        ("--recompress-region", "64M", "--recompress-region 64M"),
        ("--recompress-idle", "nan", "--recompress-idle must be"),
    ] {
        let s = text(rig.dase(&["mount", "--cluster", rig.cluster_str(), opt, val, mp]));
        assert!(s.contains(says), "{opt} {val}: {s}");
    }
    assert!(!is_mounted(&rig.path("m2")));
    // Fewer than a majority of D-nodes reachable.
    for i in 0..3 {
        rig.nodes[i].kill();
    }
    let s = refused(&rig.cluster);
    assert!(s.contains("majority"), "{s}");
    assert!(!is_mounted(&rig.path("m2")));
    // Unformatted D-nodes.
    let blank = DNode::memory(&nqn("badcfg-blank"), "64M", 512);
    let bf = rig.path("blank.toml");
    fs::write(
        &bf,
        format!(
            "[[dnode]]\naddr = \"{}\"\nnqn = \"{}\"\n",
            blank.addr, blank.nqn
        ),
    )
    .unwrap();
    let s = refused(&bf);
    assert!(s.contains("dase mkfs"), "{s}");
    drop(other);
}

#[test]
fn demo_runs_and_cleans_up_also_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let run = |sub: &str| {
        let mut c = Command::new(dase_bin());
        c.args([
            "demo",
            "--dnodes",
            "6",
            "--ec",
            "4+2",
            "--size",
            "256M",
            "--file-size",
            "64M",
            "--randread-seconds",
            "1",
            "--dir",
        ])
        .arg(dir.path().join(sub))
        .env("DASE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        // Its own process group, as a shell job would be.
        // SAFETY: setpgid in the child before exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(|| {
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        c
    };
    let out = run("full").output().unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{so}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(so.contains("all data correct with 2 D-nodes down"), "{so}");
    assert!(
        so.contains("seq write 1M") && so.contains("rand read 4K"),
        "{so}"
    );
    assert!(
        !dir.path().join("full").exists(),
        "demo removes its directory"
    );

    // Ctrl-C in the middle: SIGINT to the whole process group.
    let mut child = run("int").spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    loop {
        let l = lines.next().expect("demo output").unwrap();
        if l.starts_with("[4/") {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling the demo's own process group.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) };
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(130), "exit status after Ctrl-C");
    let d = dir.path().join("int");
    assert!(!is_mounted(&d.join("mnt")), "no mount left");
    assert!(!d.exists(), "directory removed");
    let left = processes_mentioning(d.to_str().unwrap());
    assert!(left.is_empty(), "leftover processes: {left:?}");
}

/// Command lines of running processes that mention `s` (from /proc).
fn processes_mentioning(s: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
                return None;
            }
            let cmd = fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(s).then_some(cmd)
        })
        .collect()
}
