//! `dase discover` and `dase identify`: what a target offers, printed the way
//! nvme-cli prints it.

use anyhow::{Context, Result};
use dase_initiator::host::{discover as host_discover, Controller, ControllerOptions};
use dase_initiator::NvmeUri;
use dase_protocol::admin::get_str;

#[derive(clap::Args)]
#[command(
    about = "List the subsystems a target's discovery controller reports",
    after_help = "Example:\n  dase discover nvme-tcp://127.0.0.1:4420"
)]
pub struct DiscoverArgs {
    /// nvme-tcp://HOST[:PORT] (port defaults to 4420)
    uri: String,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(clap::Args)]
#[command(
    about = "Print a controller's and its namespaces' identify data",
    after_help = "Examples:\n  dase identify nvme-tcp://127.0.0.1:4420/nqn.2026-11.io.dase:d0\n  dase identify nvme-tcp://127.0.0.1:4420/nqn.2026-11.io.dase:d0/1"
)]
pub struct IdentifyArgs {
    /// nvme-tcp://HOST[:PORT]/NQN[/NSID]
    uri: String,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(clap::Args, Clone)]
pub struct ConnArgs {
    /// Host NQN to present (default: derived from /etc/machine-id).
    #[arg(long)]
    hostnqn: Option<String>,
    /// Ask for header digests.
    #[arg(long)]
    hdr_digest: bool,
    /// Ask for data digests.
    #[arg(long)]
    data_digest: bool,
}

impl ConnArgs {
    pub fn options(&self) -> ControllerOptions {
        let mut o = ControllerOptions::default();
        if let Some(h) = &self.hostnqn {
            o.hostnqn = h.clone();
        }
        o.hdr_digest = self.hdr_digest;
        o.data_digest = self.data_digest;
        o
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

pub fn discover(a: DiscoverArgs) -> Result<()> {
    let uri = NvmeUri::parse(&a.uri)?;
    let entries = runtime()?.block_on(host_discover(&uri.addr, &a.conn.options()))?;
    println!("Discovery Log Number of Records {}", entries.len());
    for (i, e) in entries.iter().enumerate() {
        println!("=====Discovery Log Entry {i}======");
        println!(
            "trtype:  {}",
            if e.trtype == 3 {
                "tcp".to_string()
            } else {
                e.trtype.to_string()
            }
        );
        println!(
            "adrfam:  {}",
            match e.adrfam {
                1 => "ipv4",
                2 => "ipv6",
                _ => "other",
            }
        );
        println!(
            "subtype: {}",
            match e.subtype {
                1 => "referral",
                2 => "nvme subsystem",
                3 => "current discovery subsystem",
                _ => "unknown",
            }
        );
        println!("portid:  {}", e.portid);
        println!("trsvcid: {}", e.trsvcid);
        println!("subnqn:  {}", e.subnqn);
        println!("traddr:  {}", e.traddr);
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", units[u])
}

pub fn identify(a: IdentifyArgs) -> Result<()> {
    let uri = NvmeUri::parse(&a.uri)?;
    let nqn = uri
        .nqn
        .clone()
        .context("identify needs a subsystem NQN: nvme-tcp://HOST:PORT/NQN[/NSID]")?;
    let mut opts = a.conn.options();
    opts.io_queues = 0;
    runtime()?.block_on(async move {
        let c = Controller::connect(&uri.addr, &nqn, opts).await?;
        let id = c.identify().await?;
        println!("NVME Identify Controller ({nqn} at {}):", uri.addr);
        println!("vid       : {:#06x}", id.vid.get());
        println!("sn        : {}", get_str(&id.sn));
        println!("mn        : {}", get_str(&id.mn));
        println!("fr        : {}", get_str(&id.fr));
        println!("cntlid    : {:#x}", id.cntlid.get());
        let v = id.ver.get();
        println!("ver       : {}.{}.{}", v >> 16, (v >> 8) & 0xff, v & 0xff);
        println!("cntrltype : {}", id.cntrltype);
        println!("mdts      : {}", id.mdts);
        println!("kas       : {}", id.kas.get());
        println!("maxcmd    : {}", id.maxcmd.get());
        println!("nn        : {}", id.nn.get());
        println!("oncs      : {:#x}", id.oncs.get());
        println!("fuses     : {:#x}", id.fuses.get());
        println!("vwc       : {:#x}", id.vwc);
        println!("sgls      : {:#x}", id.sgls.get());
        println!("ioccsz    : {}", id.ioccsz.get());
        println!("iorcsz    : {}", id.iorcsz.get());
        println!("subnqn    : {}", get_str(&id.subnqn));
        let nsids = match uri.nsid {
            Some(n) => vec![n],
            None => c.active_namespaces().await?,
        };
        for nsid in nsids {
            let ns = match c.identify_namespace(nsid).await {
                Err(e) if e.status() == Some(dase_protocol::Status::INVALID_NAMESPACE) => {
                    anyhow::bail!("namespace {nsid} is not active on {nqn}")
                }
                r => r?,
            };
            if ns.nsze.get() == 0 {
                anyhow::bail!("namespace {nsid} is not active on {nqn}");
            }
            let bs = ns.lba_size();
            println!();
            println!("NVME Identify Namespace {nsid}:");
            println!("nsze      : {:#x}", ns.nsze.get());
            println!("ncap      : {:#x}", ns.ncap.get());
            println!("lba size  : {bs}");
            println!(
                "capacity  : {} ({} bytes)",
                human(ns.nsze.get() * bs),
                ns.nsze.get() * bs
            );
            println!("nmic      : {:#x}", ns.nmic);
            println!("dlfeat    : {:#x}", ns.dlfeat);
            println!(
                "nguid     : {}",
                ns.nguid
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            );
        }
        let _ = c.disconnect().await;
        Ok(())
    })
}
