//! `dase dnode` as an operator runs it: a TOML config with several
//! subsystems, an extra discovery port, counters on SIGUSR1, clean shutdown.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use dase_initiator::host::{discover, Controller, ControllerOptions};
use dase_tests::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn toml_config_serves_several_subsystems_and_a_discovery_port() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.img");
    let disc = free_port();
    let cfg = dir.path().join("dnode.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
listen = ["127.0.0.1:0"]
discovery_port = {disc}
stats_interval_secs = 0

[[subsystem]]
nqn = "nqn.2026-11.io.dase:cfg-a"
[[subsystem.namespace]]
memory = true
size = "8M"
block_size = 4096
[[subsystem.namespace]]
memory = true
size = "2M"

[[subsystem]]
nqn = "nqn.2026-11.io.dase:cfg-b"
allow_hosts = ["{HOSTNQN}"]
[[subsystem.namespace]]
path = "{}"
size = "4M"
"#,
            img.display()
        ),
    )
    .unwrap();
    let d = DNode::start(&["--config", cfg.to_str().unwrap()]);
    rt().block_on(async {
        let o = ControllerOptions {
            hostnqn: HOSTNQN.into(),
            ..Default::default()
        };
        // Discovery answers on the extra port and lists both subsystems with the I/O port.
        let e = discover(&format!("127.0.0.1:{disc}"), &o).await.unwrap();
        for n in ["nqn.2026-11.io.dase:cfg-a", "nqn.2026-11.io.dase:cfg-b"] {
            assert!(
                e.iter()
                    .any(|e| e.subnqn == n && e.trsvcid == d.addr.port().to_string()),
                "{n} in {e:?}"
            );
        }
        let a = Controller::connect(&d.addr_string(), "nqn.2026-11.io.dase:cfg-a", o.clone())
            .await
            .unwrap();
        assert_eq!(a.active_namespaces().await.unwrap(), vec![1, 2]);
        let ns1 = a.namespace(1).await.unwrap();
        let ns2 = a.namespace(2).await.unwrap();
        assert_eq!((ns1.block_size, ns1.bytes()), (4096, 8 << 20));
        assert_eq!((ns2.block_size, ns2.bytes()), (512, 2 << 20));
        let b = Controller::connect(&d.addr_string(), "nqn.2026-11.io.dase:cfg-b", o)
            .await
            .unwrap();
        let nb = b.namespace(1).await.unwrap();
        b.write(&nb, 0, Bytes::from(vec![9u8; 4096])).await.unwrap();
        b.flush(&nb).await.unwrap();
    });
    // The file was created sparse at the configured size.
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 4 << 20);
}

#[test]
fn counters_are_logged_on_sigusr1_and_sigterm_flushes_and_exits() {
    let name = nqn("usr1");
    let mut cmd = Command::new(dase_bin());
    cmd.args([
        "dnode",
        "--listen",
        "127.0.0.1:0",
        "--stats-interval",
        "0",
        "--nqn",
        &name,
        "--namespace",
        "memory",
        "--size",
        "1M",
    ])
    .env("DASE_LOG", "info")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = spawn_tied(cmd).unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let addr = out
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("listening on ").map(str::to_string))
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let err = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for l in err.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    rt().block_on(async {
        let o = ControllerOptions {
            hostnqn: HOSTNQN.into(),
            ..Default::default()
        };
        let c = Controller::connect(&addr, &name, o).await.unwrap();
        let ns = c.namespace(1).await.unwrap();
        c.write(&ns, 0, Bytes::from(vec![1u8; 4096])).await.unwrap();
        c.read(&ns, 0, 8).await.unwrap();
        c.read(&ns, 0, 8).await.unwrap();
    });
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    let line = std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(10)).ok())
        .find(|l| l.contains("namespace counters"))
        .expect("counters logged on SIGUSR1");
    assert!(
        line.contains("reads=2") && line.contains("writes=1") && line.contains("write_bytes=4096"),
        "{line}"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success(), "SIGTERM should exit cleanly: {st:?}");
}
