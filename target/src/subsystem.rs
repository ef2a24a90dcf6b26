//! The D-node's model: subsystems own namespaces; controllers are created by
//! Connect (dynamic model) and shared by the admin queue and I/O queues of
//! one host association.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dase_protocol::admin::ErrorLogEntry;
use dase_protocol::Status;
use tokio::sync::watch;
use zerocopy::little_endian::{U16, U32, U64};

use crate::backend::Backend;

/// Per-namespace counters, updated lock-free on the I/O path.
#[derive(Debug, Default)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub other: AtomicU64,
    pub errors: AtomicU64,
}

impl Counters {
    /// Counts one finished command of `opcode` that moved `bytes`.
    pub fn record(&self, opcode: u8, bytes: u64, ok: bool) {
        use dase_protocol::nvme::nvm_opc;
        use Ordering::Relaxed;
        match (ok, opcode) {
            (false, _) => self.errors.fetch_add(1, Relaxed),
            (true, nvm_opc::READ) => {
                self.read_bytes.fetch_add(bytes, Relaxed);
                self.reads.fetch_add(1, Relaxed)
            }
            (true, nvm_opc::WRITE) => {
                self.write_bytes.fetch_add(bytes, Relaxed);
                self.writes.fetch_add(1, Relaxed)
            }
            (true, _) => self.other.fetch_add(1, Relaxed),
        };
    }

    pub fn snapshot(&self) -> [u64; 6] {
        [
            self.reads.load(Ordering::Relaxed),
            self.writes.load(Ordering::Relaxed),
            self.read_bytes.load(Ordering::Relaxed),
            self.write_bytes.load(Ordering::Relaxed),
            self.other.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        ]
    }
}

#[derive(Debug)]
pub struct Namespace {
    pub nsid: u32,
    pub backend: Backend,
    pub block_size: u32,
    pub block_shift: u32,
    pub nlbas: u64,
    pub nguid: [u8; 16],
    pub counters: Counters,
    /// Compare-and-write holds this exclusively for its compare and write;
    /// every other data command holds it shared. That makes the fused pair
    /// atomic against any command on any queue of any host.
    pub atomic: RwLock<()>,
}

impl Namespace {
    pub fn new(nsid: u32, backend: Backend, block_size: u32, subnqn: &str) -> Self {
        let nlbas = backend.size() / block_size as u64;
        // A stable per-namespace GUID: the host uses it to recognise the same
        // namespace across reconnects and paths.
        let mut nguid = [0u8; 16];
        let h1 = fnv1a(subnqn.as_bytes(), 0xcbf2_9ce4_8422_2325);
        let h2 = fnv1a(&nsid.to_le_bytes(), h1);
        nguid[..8].copy_from_slice(&h1.to_be_bytes());
        nguid[8..].copy_from_slice(&h2.to_be_bytes());
        Self {
            nsid,
            backend,
            block_size,
            block_shift: block_size.trailing_zeros(),
            nlbas,
            nguid,
            counters: Counters::default(),
            atomic: RwLock::new(()),
        }
    }
}

pub fn fnv1a(data: &[u8], seed: u64) -> u64 {
    data.iter()
        .fold(seed, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[derive(Debug)]
pub struct Subsystem {
    pub nqn: String,
    pub serial: String,
    /// Empty: any host may connect.
    pub allow_hosts: Vec<String>,
    pub namespaces: Vec<Arc<Namespace>>,
}

impl Subsystem {
    pub fn namespace(&self, nsid: u32) -> Option<&Arc<Namespace>> {
        self.namespaces.iter().find(|n| n.nsid == nsid)
    }

    pub fn allows(&self, hostnqn: &str) -> bool {
        self.allow_hosts.is_empty() || self.allow_hosts.iter().any(|h| h == hostnqn)
    }

    pub fn max_nsid(&self) -> u32 {
        self.namespaces.iter().map(|n| n.nsid).max().unwrap_or(0)
    }
}

/// Which subsystem a controller belongs to.
#[derive(Debug, Clone)]
pub enum ControllerKind {
    Nvm(Arc<Subsystem>),
    Discovery,
}

/// Controller register state (CC / CSTS), as the host sees it through Property Get/Set.
#[derive(Debug, Default, Clone, Copy)]
pub struct Registers {
    pub cc: u32,
    pub csts: u32,
}

pub const MAX_IO_QUEUES: u16 = 64;
pub const ERROR_LOG_ENTRIES: usize = 64;
pub const MAX_AERS: usize = 4;

#[derive(Debug)]
pub struct Controller {
    pub cntlid: u16,
    pub kind: ControllerKind,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    /// Keep-alive timeout in ms from Connect or Set Features; 0 disables it.
    pub kato_ms: AtomicU32,
    pub regs: Mutex<Registers>,
    /// I/O queues granted by Set Features Number of Queues (count, not 0's based).
    pub io_queues: AtomicU16,
    pub async_event_config: AtomicU32,
    pub volatile_write_cache: AtomicBool,
    last_activity: Mutex<Instant>,
    errors: Mutex<VecDeque<ErrorLogEntry>>,
    error_count: AtomicU64,
    /// Set once the controller is torn down; every queue of it closes.
    dead: watch::Sender<bool>,
}

impl Controller {
    pub fn new(
        cntlid: u16,
        kind: ControllerKind,
        hostnqn: String,
        hostid: [u8; 16],
        kato_ms: u32,
    ) -> Self {
        Self {
            cntlid,
            kind,
            hostnqn,
            hostid,
            kato_ms: AtomicU32::new(kato_ms),
            regs: Mutex::new(Registers::default()),
            io_queues: AtomicU16::new(MAX_IO_QUEUES),
            async_event_config: AtomicU32::new(0),
            volatile_write_cache: AtomicBool::new(true),
            last_activity: Mutex::new(Instant::now()),
            errors: Mutex::new(VecDeque::new()),
            error_count: AtomicU64::new(0),
            dead: watch::channel(false).0,
        }
    }

    pub fn subsystem(&self) -> Option<&Arc<Subsystem>> {
        match &self.kind {
            ControllerKind::Nvm(s) => Some(s),
            ControllerKind::Discovery => None,
        }
    }

    pub fn touch(&self) {
        *self.last_activity.lock().unwrap() = Instant::now();
    }

    pub fn idle_for(&self) -> Duration {
        self.last_activity.lock().unwrap().elapsed()
    }

    pub fn enabled(&self) -> bool {
        self.regs.lock().unwrap().csts & 1 != 0
    }

    pub fn watch_dead(&self) -> watch::Receiver<bool> {
        self.dead.subscribe()
    }

    pub fn is_dead(&self) -> bool {
        *self.dead.borrow()
    }

    pub fn kill(&self) {
        self.dead.send_replace(true);
    }

    pub fn record_error(&self, sqid: u16, cid: u16, status: Status, nsid: u32, lba: u64) {
        let n = self.error_count.fetch_add(1, Ordering::Relaxed) + 1;
        let e = ErrorLogEntry {
            error_count: U64::new(n),
            sqid: U16::new(sqid),
            cmdid: U16::new(cid),
            status: U16::new(status.to_word()),
            param_error_location: U16::new(0xffff),
            lba: U64::new(lba),
            nsid: U32::new(nsid),
            trtype: 3,
            ..Default::default()
        };
        let mut q = self.errors.lock().unwrap();
        if q.len() == ERROR_LOG_ENTRIES {
            q.pop_back();
        }
        q.push_front(e);
    }

    /// Error log entries, newest first.
    pub fn error_log(&self) -> Vec<ErrorLogEntry> {
        self.errors.lock().unwrap().iter().copied().collect()
    }
}

/// Everything one D-node process serves.
#[derive(Debug)]
pub struct Target {
    pub subsystems: Vec<Arc<Subsystem>>,
    pub listen: Vec<SocketAddr>,
    controllers: Mutex<HashMap<u16, Arc<Controller>>>,
    next_cntlid: AtomicU16,
    pub started: Instant,
    /// How long a connection keeps polling its socket after traffic before
    /// sleeping (0: never poll).
    pub poll: Duration,
}

/// Dynamic controller IDs are 1..=0xFFEF (0xFFF0.. are reserved).
const CNTLID_MAX: u16 = 0xffef;

impl Target {
    pub fn new(subsystems: Vec<Arc<Subsystem>>, listen: Vec<SocketAddr>) -> Self {
        Self {
            subsystems,
            listen,
            controllers: Mutex::new(HashMap::new()),
            next_cntlid: AtomicU16::new(1),
            started: Instant::now(),
            poll: Duration::ZERO,
        }
    }

    pub fn subsystem(&self, nqn: &str) -> Option<&Arc<Subsystem>> {
        self.subsystems.iter().find(|s| s.nqn == nqn)
    }

    /// Allocates a controller ID not in use and registers the controller.
    pub fn add_controller(&self, make: impl FnOnce(u16) -> Controller) -> Option<Arc<Controller>> {
        let mut map = self.controllers.lock().unwrap();
        for _ in 0..CNTLID_MAX {
            let id = self.next_cntlid.fetch_add(1, Ordering::Relaxed);
            let id = if id == 0 || id > CNTLID_MAX {
                self.next_cntlid.store(2, Ordering::Relaxed);
                1
            } else {
                id
            };
            if let std::collections::hash_map::Entry::Vacant(v) = map.entry(id) {
                let c = Arc::new(make(id));
                v.insert(c.clone());
                return Some(c);
            }
        }
        None
    }

    pub fn controller(&self, cntlid: u16) -> Option<Arc<Controller>> {
        self.controllers.lock().unwrap().get(&cntlid).cloned()
    }

    pub fn remove_controller(&self, cntlid: u16) {
        if let Some(c) = self.controllers.lock().unwrap().remove(&cntlid) {
            c.kill();
        }
    }

    pub fn controllers(&self) -> Vec<Arc<Controller>> {
        self.controllers.lock().unwrap().values().cloned().collect()
    }
}
