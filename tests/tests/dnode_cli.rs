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

/// A loop device over a temp file, detached on drop.
struct Loop(String);

impl Loop {
    fn new(file: &std::path::Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| Loop(String::from_utf8_lossy(&out.stdout).trim().to_string()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn block_device_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("blk.img");
    std::fs::File::create(&f)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    // Needs root and loop devices, which this project's machines have.
    let lo = Loop::new(&f).expect("losetup failed: block-device tests need root and /dev/loop*");
    let name = nqn("blk");
    // No --size: a block device is served at its own size.
    let d = DNode::start(&["--nqn", &name, "--namespace", &lo.0, "--block-size", "4096"]);
    let data = pattern(256 * 1024, 77);
    rt().block_on(async {
        let o = ControllerOptions {
            hostnqn: HOSTNQN.into(),
            ..Default::default()
        };
        let c = Controller::connect(&d.addr_string(), &name, o)
            .await
            .unwrap();
        let ns = c.namespace(1).await.unwrap();
        assert_eq!(ns.bytes(), 16 << 20);
        c.write(&ns, 10, Bytes::from(data.clone())).await.unwrap();
        c.flush(&ns).await.unwrap();
        assert_eq!(&c.read(&ns, 10, 64).await.unwrap()[..], &data[..]);
        c.deallocate(&ns, &[(10, 16)]).await.unwrap();
        let back = c.read(&ns, 10, 64).await.unwrap();
        assert!(back[..65536].iter().all(|&b| b == 0));
        assert_eq!(&back[65536..], &data[65536..]);
    });
    drop(d);
    // What was flushed through the device is in the file underneath.
    let on_disk = std::fs::read(&f).unwrap();
    assert_eq!(
        &on_disk[10 * 4096 + 65536..10 * 4096 + 262144],
        &data[65536..]
    );
}

#[test]
fn discover_and_identify_commands_print_what_they_find() {
    let d = DNode::memory(&nqn("cli"), "8M", 4096);
    let run = |args: &[&str]| {
        let o = Command::new(dase_bin()).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let uri = format!("nvme-tcp://{}", d.addr);
    let out = run(&["discover", &uri]);
    assert!(
        out.contains(&format!("subnqn:  {}", d.nqn)) && out.contains("subtype: nvme subsystem"),
        "{out}"
    );
    let out = run(&[
        "identify",
        &format!("{uri}/{}", d.nqn),
        "--hdr-digest",
        "--data-digest",
    ]);
    assert!(
        out.contains("mn        : dase D-node") && out.contains(&format!("subnqn    : {}", d.nqn)),
        "{out}"
    );
    assert!(
        out.contains("lba size  : 4096") && out.contains("capacity  : 8.00 MiB"),
        "{out}"
    );
    // Errors are one clear line and a non-zero exit.
    for (args, want) in [
        (
            vec!["identify".to_string(), format!("{uri}/{}/9", d.nqn)],
            "not active",
        ),
        (
            vec!["identify".into(), "nvme-tcp://127.0.0.1:1/nqn.x:y".into()],
            "cannot connect",
        ),
        (
            vec!["discover".into(), "http://x".into()],
            "not an nvme-tcp URI",
        ),
    ] {
        let o = Command::new(dase_bin()).args(&args).output().unwrap();
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "{args:?}: {e}");
    }
}
