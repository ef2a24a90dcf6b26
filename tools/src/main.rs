//! The `dase` command.

mod cluster;
mod demo;
mod dnode;
mod fabric;
mod fs;
mod mount;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dase",
    version,
    about = "dase: disaggregated, shared-everything storage over NVMe/TCP",
    long_about = "dase: disaggregated, shared-everything storage over NVMe/TCP.\n\n\
D-nodes (`dase dnode`) serve files, block devices or memory as NVMe namespaces over NVMe/TCP;\n\
any NVMe/TCP host can use them (the Linux kernel, SPDK, dase's own host library). C-nodes stripe\n\
data over every D-node with wide erasure codes and mount the result as a POSIX file system\n\
(`dase cluster`, `dase mkfs`, `dase mount`, `dase stats`, `dase fsck`, `dase rebuild`).\n\
`dase bench` measures every layer with fio's options. `dase demo` shows it all in one command.",
    after_help = "Examples:\n  dase demo\n  dase dnode --listen 127.0.0.1:4420 --nqn nqn.2026-11.io.dase:d0 --namespace /tmp/d0.img --size 1G\n  dase discover nvme-tcp://127.0.0.1:4420\n  dase identify nvme-tcp://127.0.0.1:4420/nqn.2026-11.io.dase:d0/1\n  dase bench --filename nvme-tcp://127.0.0.1:4420/nqn.2026-11.io.dase:d0/1 --rw randread --bs 4k --iodepth 32 --runtime 10 --time_based\n  dase cluster up --dir /tmp/dase --dnodes 13 --size 2G && dase mkfs --cluster /tmp/dase/cluster.toml\n  dase mount --cluster /tmp/dase/cluster.toml /mnt/dase"
)]
struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. info, debug, dase_target=debug. The FUSE
    /// library's own messages are off unless the filter names it (e.g. info,fuser=debug): they
    /// are unimplemented-xattr notices and, at every unmount, a reply to a connection the kernel
    /// already closed; mount failures are reported by dase itself.
    #[arg(long, global = true, env = "DASE_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Demo(demo::DemoArgs),
    Dnode(dnode::Args),
    Discover(fabric::DiscoverArgs),
    Identify(fabric::IdentifyArgs),
    Bench(Box<dase_tools::bench::cli::Args>),
    Cluster(cluster::Args),
    Mkfs(fs::MkfsArgs),
    Mount(mount::MountArgs),
    Fsck(fs::FsckArgs),
    Stats(fs::StatsArgs),
    Rebuild(fs::RebuildArgs),
    Clean(fs::CleanArgs),
    /// Internal: a FUSE file system that does nothing (the ceiling `dase
    /// bench` compares a mount against).
    #[command(hide = true)]
    NoopMount(mount::NoopArgs),
    /// Internal: the plain-TCP peer `dase bench --ceiling` measures against.
    #[command(hide = true)]
    CeilingServer {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
}

/// I/O buffers are a few hundred KiB: above glibc's default mmap threshold,
/// so each one would be a fresh mmap that faults in page by page and is
/// unmapped on free. Keep them in the heap and keep the heap, so freed
/// buffers are reused warm.
fn tune_allocator() {
    // SAFETY: mallopt only adjusts allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() {
    tune_allocator();
    let cli = Cli::parse();
    let filter = if cli.log.contains("fuser") {
        cli.log.clone()
    } else {
        format!("{},fuser=off", cli.log)
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| "info,fuser=off".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let r = match cli.cmd {
        Cmd::Demo(a) => demo::run(a),
        Cmd::Dnode(a) => dnode::run(a),
        Cmd::Discover(a) => fabric::discover(a),
        Cmd::Identify(a) => fabric::identify(a),
        Cmd::Bench(a) => match dase_tools::bench::cli::run(&a) {
            Ok(true) => Ok(()),
            Ok(false) => std::process::exit(1),
            Err(e) => Err(e),
        },
        Cmd::Cluster(a) => cluster::run(a),
        Cmd::Mkfs(a) => fs::mkfs(a),
        Cmd::Mount(a) => mount::mount(a),
        Cmd::NoopMount(a) => mount::noop_mount(a),
        Cmd::Fsck(a) => match fs::fsck(a) {
            Ok(true) => Ok(()),
            Ok(false) => std::process::exit(1),
            Err(e) => Err(e),
        },
        Cmd::Stats(a) => fs::stats(a),
        Cmd::Rebuild(a) => fs::rebuild(a),
        Cmd::Clean(a) => fs::clean(a),
        Cmd::CeilingServer { listen } => (|| {
            let l = std::net::TcpListener::bind(listen)?;
            println!("listening on {}", l.local_addr()?);
            use std::io::Write;
            std::io::stdout().flush()?;
            dase_tools::bench::ceiling::serve(l);
            Ok(())
        })(),
    };
    if let Err(e) = r {
        eprintln!("dase: error: {e:#}");
        std::process::exit(1);
    }
}
