//! Helpers for the end-to-end suites: real `dase` processes on loopback
//! ports, and a raw NVMe/TCP connection for sending what no well-behaved host
//! would.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dase_initiator::cnode::{ClusterFile, DNodeSpec};
use dase_protocol::pdu::{dgst, Fes};
use dase_protocol::{DecodeError, Limits, Pdu, PduDecoder, PduEncoder, Role};

/// The `dase` binary: `$DASE_BIN`, or the one cargo built beside this test,
/// built on demand when missing.
pub fn dase_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("DASE_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>/dase
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let bin = profile_dir.join("dase");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-q", "-p", "dase-tools", "--bin", "dase"]);
        if release {
            cmd.arg("--release");
        }
        // Always build: cheap when fresh, and never tests a stale binary.
        let st = cmd.status().expect("run cargo build for the dase binary");
        assert!(st.success(), "building the dase binary failed");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
    .clone()
}

/// Spawns `cmd` from one thread that lives as long as the test process:
/// PR_SET_PDEATHSIG fires when the spawning *thread* exits, so children
/// spawned from short-lived test threads would die with them.
pub fn spawn_tied(cmd: Command) -> std::io::Result<Child> {
    type Req = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Req>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Req>();
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
        });
        std::sync::Mutex::new(tx)
    });
    let (rtx, rrx) = std::sync::mpsc::channel();
    tx.lock().unwrap().send((cmd, rtx)).expect("spawner thread");
    rrx.recv().expect("spawner reply")
}

/// A running `dase dnode` process, killed when dropped.
pub struct DNode {
    pub child: Child,
    pub addr: SocketAddr,
    pub nqn: String,
    args: Vec<String>,
}

impl DNode {
    /// Starts `dase dnode --listen 127.0.0.1:0 <args>` and waits for its port.
    pub fn start(args: &[&str]) -> DNode {
        Self::start_on("127.0.0.1:0", args)
    }

    pub fn start_on(listen: &str, args: &[&str]) -> DNode {
        let mut all: Vec<String> = vec![
            "dnode".into(),
            "--listen".into(),
            listen.into(),
            "--stats-interval".into(),
            "0".into(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(dase_bin());
        // The D-node dies with the test process, even one held in a static.
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd.args(&all)
            .env(
                "DASE_LOG",
                std::env::var("DASE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = spawn_tied(cmd).expect("spawn dase dnode");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("listening on ") {
                    let _ = tx.send(a.parse::<SocketAddr>().ok());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Some(a)) => a,
            _ => {
                let _ = child.kill();
                let st = child.wait().ok();
                panic!("dase dnode {all:?} did not start (exit {st:?})");
            }
        };
        let nqn = args
            .windows(2)
            .find(|w| w[0] == "--nqn")
            .map(|w| w[1].to_string())
            .unwrap_or_default();
        DNode {
            child,
            addr,
            nqn,
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// A D-node with one memory namespace of `size` and `block_size`.
    pub fn memory(nqn: &str, size: &str, block_size: u32) -> DNode {
        Self::start(&[
            "--nqn",
            nqn,
            "--namespace",
            "memory",
            "--size",
            size,
            "--block-size",
            &block_size.to_string(),
        ])
    }

    pub fn addr_string(&self) -> String {
        self.addr.to_string()
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills and starts the same D-node again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The port may linger briefly; retry until it binds.
            let n = std::panic::catch_unwind(|| DNode::start_on(&self.addr.to_string(), &args));
            match n {
                Ok(mut n) => {
                    std::mem::swap(&mut self.child, &mut n.child);
                    std::mem::forget(n);
                    return;
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(e) => std::panic::resume_unwind(e),
            }
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for DNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A unique NQN per test so logs are readable.
pub fn nqn(name: &str) -> String {
    format!("nqn.2026-11.io.dase:test-{name}")
}

pub const HOSTNQN: &str = "nqn.2026-11.io.dase:test-host";

/// A blocking raw NVMe/TCP connection for malformed-input tests.
pub struct RawConn {
    pub s: TcpStream,
    pub dec: PduDecoder,
    pub enc: PduEncoder,
    buf: BytesMut,
}

impl RawConn {
    /// Connects and, unless `handshake` is false, completes ICReq/ICResp.
    pub fn connect(addr: SocketAddr, handshake: bool, hd: bool, dd: bool) -> RawConn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = RawConn {
            s,
            dec: PduDecoder::new(Role::Host),
            enc: PduEncoder::default(),
            buf: BytesMut::new(),
        };
        if handshake {
            let mut w = BytesMut::new();
            let bits =
                if hd { dgst::HDGST_ENABLE } else { 0 } | if dd { dgst::DDGST_ENABLE } else { 0 };
            PduEncoder::default().ic_req(&mut w, 0, bits, 0);
            c.send(&w);
            match c.recv() {
                Some(Pdu::IcResp(r)) => {
                    assert_eq!(r.dgst, bits);
                    c.enc = PduEncoder {
                        hdgst: hd,
                        ddgst: dd,
                        pda: 0,
                    };
                    c.dec.establish(Limits {
                        hdgst: hd,
                        ddgst: dd,
                        max_data: 16 << 20,
                        pda: 0,
                    });
                }
                other => panic!("expected ICResp, got {other:?}"),
            }
        }
        c
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    /// Next PDU, or None on EOF.
    pub fn recv(&mut self) -> Option<Pdu> {
        loop {
            match self.dec.decode(&mut self.buf) {
                Ok(Some(p)) => return Some(p),
                Ok(None) => {}
                Err(DecodeError::Fatal(f)) => panic!("target sent a malformed PDU: {f:?}"),
                Err(DecodeError::DataDigest(_)) => panic!("data digest error from target"),
            }
            let mut tmp = [0u8; 65536];
            match self.s.read(&mut tmp) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Expects a C2HTermReq with `fes`/`fei`, then the connection to close.
    pub fn expect_term(&mut self, fes: Fes, fei: Option<u32>) {
        match self.recv() {
            Some(Pdu::TermReq { hdr, .. }) => {
                assert_eq!(hdr.ch.pdu_type, 0x03, "not a C2HTermReq");
                assert_eq!(Fes::from_u16(hdr.fes.get()), Some(fes), "FES");
                if let Some(fei) = fei {
                    assert_eq!(hdr.fei.get(), fei, "FEI");
                }
            }
            other => panic!("expected C2HTermReq {fes:?}, got {other:?}"),
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut tmp = [0u8; 256];
        loop {
            match self.s.read(&mut tmp) {
                Ok(0) => return,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Ok(_) if Instant::now() < deadline => continue,
                r => panic!("connection not closed after TermReq: {r:?}"),
            }
        }
    }
}

/// A tokio runtime for async tests that also spawn processes.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Deterministic compressible text: words drawn from a small vocabulary
/// with numbers mixed in, like logs (zstd stores it at about a third).
pub fn text(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "the ", "stripe ", "chunk ", "node ", "write ", "read ", "parity ", "delta ", "index ",
        "commit ", "segment ", "error ", "latency ", "ok\n", "request ", "bytes ",
    ];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(WORDS[(x & 15) as usize].as_bytes());
        if x & 0x30 == 0 {
            v.extend_from_slice(format!("{} ", (x >> 40) % 10000).as_bytes());
        }
    }
    v.truncate(len);
    v
}

/// `n` D-nodes with 4096-byte blocks, namespace `namespace(i)` (a path or
/// `memory`) of `size`, one failure domain each, and how a cluster file
/// names them.
pub fn start_dnodes(
    name: &str,
    n: usize,
    size: &str,
    namespace: impl Fn(usize) -> String,
) -> (Vec<DNode>, Vec<DNodeSpec>) {
    let mut nodes = Vec::new();
    let mut specs = Vec::new();
    for i in 0..n {
        let nqn = nqn(&format!("{name}-d{i}"));
        let d = DNode::start(&[
            "--nqn",
            &nqn,
            "--namespace",
            &namespace(i),
            "--size",
            size,
            "--block-size",
            "4096",
        ]);
        specs.push(DNodeSpec {
            addr: d.addr_string(),
            nqn,
            nsid: 1,
            domain: format!("d{i}"),
            id: None,
        });
        nodes.push(d);
    }
    (nodes, specs)
}

/// [`start_dnodes`] on backing files `dir/dN.img`.
pub fn file_dnodes(dir: &Path, name: &str, n: usize, size: &str) -> (Vec<DNode>, Vec<DNodeSpec>) {
    start_dnodes(name, n, size, |i| {
        dir.join(format!("d{i}.img")).to_string_lossy().into_owned()
    })
}

/// D-nodes on backing files in a temp dir, their cluster file, formatted
/// as one dase file system.
pub struct FsRig {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<DNode>,
    pub cluster: PathBuf,
}

impl FsRig {
    /// `n` D-nodes of `size` each, formatted with `ec` and 64 KiB strips.
    pub fn new(name: &str, n: usize, size: &str, ec: &str) -> FsRig {
        Self::with_mkfs(name, n, size, ec, &[])
    }

    /// As [`FsRig::new`], with more `dase mkfs` options.
    pub fn with_mkfs(name: &str, n: usize, size: &str, ec: &str, mkfs: &[&str]) -> FsRig {
        let dir = tempfile::tempdir().unwrap();
        let (nodes, specs) = file_dnodes(dir.path(), name, n, size);
        let toml = ClusterFile { dnodes: specs }.to_toml();
        let cluster = dir.path().join("cluster.toml");
        std::fs::write(&cluster, toml).unwrap();
        let rig = FsRig {
            dir,
            nodes,
            cluster,
        };
        let mut args = vec!["mkfs", "--cluster", rig.cluster_str(), "--ec", ec];
        args.extend_from_slice(mkfs);
        let out = rig.dase(&args);
        assert!(
            out.status.success(),
            "mkfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        rig
    }

    pub fn cluster_str(&self) -> &str {
        self.cluster.to_str().unwrap()
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Runs a dase command to completion.
    pub fn dase(&self, args: &[&str]) -> std::process::Output {
        Command::new(dase_bin())
            .args(args)
            .env("DASE_LOG", "warn")
            .output()
            .expect("run dase")
    }

    /// Runs `dase clean` (through the mount if there is one) and fails the
    /// test unless it succeeded; returns what it printed.
    pub fn clean(&self) -> String {
        let out = self.dase(&["clean", "--cluster", self.cluster_str()]);
        assert!(
            out.status.success(),
            "dase clean: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `dase fsck` and fails the test unless it found nothing.
    pub fn assert_fsck_clean(&self) {
        let out = self.dase(&["fsck", "--cluster", self.cluster_str()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "fsck: {text}");
    }

    /// Overwrites `region` of D-node backing file `name` with `byte`.
    pub fn corrupt(&self, name: &str, region: std::ops::Range<u64>, byte: u8) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path(name))
            .unwrap();
        f.write_all_at(
            &vec![byte; (region.end - region.start) as usize],
            region.start,
        )
        .unwrap();
        f.sync_all().unwrap();
    }

    /// `dase stats --json` of the last commit.
    pub fn stats(&self) -> serde_json::Value {
        let out = self.dase(&["stats", "--cluster", self.cluster_str(), "--json"]);
        assert!(
            out.status.success(),
            "stats: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("stats JSON")
    }

    /// Mounts at `<dir>/<name>` with a short lease (so a crash test does
    /// not wait long) and commit interval (unless `extra` names one) plus
    /// `extra` options.
    pub fn mount(&self, name: &str, extra: &[&str]) -> Result<Mount, String> {
        let mp = self.path(name);
        // Fails harmlessly on a stale mount point (the mount clears it).
        let _ = std::fs::create_dir_all(&mp);
        let mut args = vec!["--lease-ttl", "2"];
        if !extra.contains(&"--commit-interval") {
            args.extend_from_slice(&["--commit-interval", "1"]);
        }
        args.extend_from_slice(extra);
        Mount::start(&self.cluster, &mp, &args)
    }

    /// Mounts, retrying while the lease of a killed mount runs out.
    pub fn mount_when_free(&self, name: &str, extra: &[&str]) -> Mount {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.mount(name, extra) {
                Ok(m) => return m,
                Err(e) if e.contains("lease expires") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(300))
                }
                Err(e) => panic!("mount failed: {e}"),
            }
        }
    }
}

/// A running `dase mount`, unmounted (SIGTERM) when dropped.
pub struct Mount {
    pub child: Child,
    pub path: PathBuf,
    pub log: PathBuf,
}

impl Mount {
    pub fn start(cluster: &Path, mp: &Path, extra: &[&str]) -> Result<Mount, String> {
        let log = mp.with_extension(format!(
            "log{}",
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let err = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(dase_bin());
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        cmd.arg("mount")
            .arg("--cluster")
            .arg(cluster)
            .args(extra)
            .arg(mp)
            .env(
                "DASE_LOG",
                std::env::var("DASE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err);
        let mut child = spawn_tied(cmd).expect("spawn dase mount");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok).unwrap_or_default();
            let _ = tx.send(first);
            for _ in lines {}
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        if line.starts_with("mounted") {
            return Ok(Mount {
                child,
                path: mp.to_path_buf(),
                log,
            });
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(std::fs::read_to_string(&log).unwrap_or_default())
    }

    /// Kills the mount process outright (a C-node crash): the mount point
    /// is left stale.
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }

    /// Unmounts with SIGTERM and returns whether the mount exited cleanly.
    pub fn stop(mut self) -> bool {
        let ok = self.terminate();
        std::mem::forget(self);
        ok
    }

    fn terminate(&mut self) -> bool {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        detach(&self.path);
        false
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Drop for Mount {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Lazily unmounts `path` (ignoring "not mounted").
pub fn detach(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// Whether `path` is a mount point (from /proc/self/mountinfo, which never
/// blocks on a hung file system).
pub fn is_mounted(path: &Path) -> bool {
    let p = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*p))
}

/// Drops the page cache so reads through a mount reach the file system.
pub fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}
