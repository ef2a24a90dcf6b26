//! Where a job's I/O goes: a raw NVMe/TCP namespace through the host library
//! (one I/O queue per job), or a local file / block device / file on a mount.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dase_initiator::host::{
    read_on, write_on, Controller, ControllerOptions, NamespaceInfo, QueuePair,
};
use dase_initiator::NvmeUri;

/// An open target, shared by a run's jobs.
pub enum Target {
    Nvme {
        ctrl: Box<Controller>,
        ns: NamespaceInfo,
    },
    File {
        file: Arc<File>,
        size: u64,
        direct: bool,
    },
}

/// One job's handle on the target.
#[derive(Clone)]
pub enum Engine {
    Nvme {
        q: Arc<QueuePair>,
        ns: NamespaceInfo,
        timeout: Duration,
    },
    File {
        file: Arc<File>,
        direct: bool,
    },
}

impl Target {
    pub async fn open_nvme(
        uri: &NvmeUri,
        queues: usize,
        depth: usize,
        hd: bool,
        dd: bool,
        poll: Duration,
    ) -> Result<Self, String> {
        let nqn = uri.nqn.clone().ok_or("the URI names no subsystem")?;
        let opts = ControllerOptions {
            io_queues: queues as u16,
            // One more entry than the depth: an NVMe queue of N entries holds N - 1.
            queue_depth: (depth + 1).clamp(2, 1024) as u16,
            hdr_digest: hd,
            data_digest: dd,
            poll,
            ..Default::default()
        };
        let ctrl = Controller::connect(&uri.addr, &nqn, opts)
            .await
            .map_err(|e| e.to_string())?;
        let n = ctrl.io_queue_count().await.map_err(|e| e.to_string())?;
        if n < queues {
            return Err(format!(
                "the target granted {n} I/O queues; --numjobs {queues} needs one each"
            ));
        }
        let nsid = uri.nsid.unwrap_or(1);
        let ns = ctrl
            .namespace(nsid)
            .await
            .map_err(|e| format!("namespace {nsid}: {e}"))?;
        Ok(Self::Nvme {
            ctrl: Box::new(ctrl),
            ns,
        })
    }

    pub fn open_file(
        path: &Path,
        direct: bool,
        write: bool,
        create_size: Option<u64>,
    ) -> Result<Self, String> {
        let mut o = OpenOptions::new();
        o.read(true).write(write);
        if write && create_size.is_some() {
            o.create(true);
        }
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut size = if meta.file_type().is_file() {
            meta.len()
        } else {
            // Block devices report 0 in metadata; ask the device.
            use std::io::Seek;
            (&file)
                .seek(std::io::SeekFrom::End(0))
                .map_err(|e| e.to_string())?
        };
        if let Some(want) = create_size {
            if meta.file_type().is_file() && size < want && write {
                // Like fio: lay the file out to the job size.
                file.set_len(want)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                size = want;
            }
        }
        Ok(Self::File {
            file: Arc::new(file),
            size,
            direct,
        })
    }

    pub fn size(&self) -> u64 {
        match self {
            Self::Nvme { ns, .. } => ns.bytes(),
            Self::File { size, .. } => *size,
        }
    }

    /// The unit every offset and length must be a multiple of.
    pub fn align(&self) -> u64 {
        match self {
            Self::Nvme { ns, .. } => ns.block_size as u64,
            Self::File { direct: true, .. } => 512,
            Self::File { .. } => 1,
        }
    }

    pub async fn engine(&self, job: usize) -> Result<Engine, String> {
        Ok(match self {
            Self::Nvme { ctrl, ns } => Engine::Nvme {
                q: ctrl.io_queue(job).await.map_err(|e| e.to_string())?,
                ns: *ns,
                timeout: Duration::from_secs(30),
            },
            Self::File { file, direct, .. } => Engine::File {
                file: file.clone(),
                direct: *direct,
            },
        })
    }

    pub async fn close(self) {
        if let Self::Nvme { ctrl, .. } = self {
            let _ = ctrl.disconnect().await;
            drop(ctrl);
            // Let the queues' tasks run once more so their sockets really
            // close now, not whenever this runtime is next driven.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A buffer aligned for O_DIRECT.
fn aligned(len: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(len + 4096);
    let pad = (4096 - (b.as_ptr() as usize % 4096)) % 4096;
    b.resize(pad, 0);
    let _ = b.split_to(pad);
    b.resize(len, 0);
    b
}

impl Engine {
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, String> {
        match self {
            Self::Nvme { q, ns, timeout } => {
                let bs = ns.block_size as u64;
                read_on(q, ns, offset / bs, (len as u64 / bs) as u32, *timeout)
                    .await
                    .map_err(|e| e.to_string())
            }
            Self::File { file, direct } => {
                let file = file.clone();
                let direct = *direct;
                tokio::task::spawn_blocking(move || {
                    let mut b = if direct {
                        aligned(len)
                    } else {
                        BytesMut::zeroed(len)
                    };
                    file.read_exact_at(&mut b, offset)
                        .map_err(|e| format!("read at {offset}: {e}"))?;
                    Ok(b.freeze())
                })
                .await
                .map_err(|e| e.to_string())?
            }
        }
    }

    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), String> {
        match self {
            Self::Nvme { q, ns, timeout } => {
                let bs = ns.block_size as u64;
                write_on(q, ns, offset / bs, data, *timeout)
                    .await
                    .map_err(|e| e.to_string())
            }
            Self::File { file, direct } => {
                let file = file.clone();
                let direct = *direct;
                tokio::task::spawn_blocking(move || {
                    let owned;
                    let buf: &[u8] = if direct && !(data.as_ptr() as usize).is_multiple_of(4096) {
                        let mut a = aligned(data.len());
                        a.copy_from_slice(&data);
                        owned = a;
                        &owned
                    } else {
                        &data
                    };
                    file.write_all_at(buf, offset)
                        .map_err(|e| format!("write at {offset}: {e}"))
                })
                .await
                .map_err(|e| e.to_string())?
            }
        }
    }

    /// Buffers for writes without verification: aligned, filled once.
    pub fn static_buffer(len: usize) -> Bytes {
        let mut b = aligned(len);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for w in b.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = w.len();
            w.copy_from_slice(&x.to_le_bytes()[..n]);
        }
        b.freeze()
    }
}
