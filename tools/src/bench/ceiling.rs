//! The wire's own limit, measured in the same run: a plain TCP server in a
//! separate process (pinned like the target) answers fixed-size requests, so
//! request/response sizes mirror NVMe/TCP's without any storage behind them.
//!
//! A read of `bs` is a 72-byte capsule answered by a 24-byte C2HData header
//! plus `bs` of data; a write is a 72-byte capsule plus `bs` answered by a
//! 24-byte response. The client keeps `iodepth` requests in flight per
//! connection, one connection per job, exactly as the bench does. Both ends
//! poll their sockets rather than sleep, as dase's target and host do by
//! default, so the comparison is like for like.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Request header: total request length, then response length.
const HDR: usize = 8;
const CAPSULE: usize = 72;
const RESP: usize = 24;

/// Serves ceiling clients forever (the hidden `dase ceiling-server` command).
pub fn serve(l: TcpListener) {
    for s in l.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = serve_one(s);
        });
    }
}

/// Reads, spinning instead of sleeping while nothing has arrived.
fn read_spin(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            r => return r,
        }
    }
}

fn write_all_spin(s: &mut TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match s.write(data) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn serve_one(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_nonblocking(true)?;
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 4 << 20];
    let (mut have, mut need_resp) = (0usize, 0usize);
    loop {
        let n = read_spin(&mut s, &mut buf[have..])?;
        if n == 0 {
            return Ok(());
        }
        have += n;
        // Answer every complete request of this read with one write, as the target batches.
        let mut pos = 0;
        while have - pos >= HDR {
            let req = u32::from_le_bytes(buf[pos..pos + 4].try_into().unwrap()) as usize;
            let resp = u32::from_le_bytes(buf[pos + 4..pos + 8].try_into().unwrap()) as usize;
            if req < HDR || req > buf.len() {
                return Ok(());
            }
            if have - pos < req {
                break;
            }
            need_resp += resp;
            pos += req;
        }
        buf.copy_within(pos..have, 0);
        have -= pos;
        while need_resp > 0 {
            let n = need_resp.min(zeros.len());
            write_all_spin(&mut s, &zeros[..n])?;
            need_resp -= n;
        }
    }
}

/// Results, per second.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ceiling {
    pub read_iops: f64,
    pub read_bw: f64,
    pub write_iops: f64,
    pub write_bw: f64,
    /// Mean round trip of one read-shaped request at queue depth 1.
    pub qd1_read_us: f64,
}

fn request(req: usize, resp: usize) -> Vec<u8> {
    let mut r = vec![0u8; req];
    r[..4].copy_from_slice(&(req as u32).to_le_bytes());
    r[4..8].copy_from_slice(&(resp as u32).to_le_bytes());
    r
}

/// One connection, `depth` requests in flight, for `dur`: completions.
fn closed_loop(
    addr: SocketAddr,
    req: usize,
    resp: usize,
    depth: usize,
    dur: Duration,
) -> std::io::Result<u64> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_nonblocking(true)?;
    let one = request(req, resp);
    let batch: Vec<u8> = one.iter().copied().cycle().take(req * depth).collect();
    write_all_spin(&mut s, &batch)?;
    let mut buf = vec![0u8; (resp * depth).clamp(4096, 8 << 20)];
    let (mut done, mut partial) = (0u64, 0usize);
    let t = Instant::now();
    while t.elapsed() < dur {
        let n = match s.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::hint::spin_loop();
                continue;
            }
            r => r?,
        };
        if n == 0 {
            break;
        }
        partial += n;
        let complete = partial / resp;
        partial %= resp;
        done += complete as u64;
        if complete > 0 {
            write_all_spin(&mut s, &batch[..complete * req])?;
        }
    }
    Ok(done)
}

/// Measures the ceiling for `conns` connections of `depth` each, with
/// `bs`-sized transfers, against a server at `addr`.
pub fn measure(
    addr: SocketAddr,
    bs: usize,
    depth: usize,
    conns: usize,
    dur: Duration,
) -> std::io::Result<Ceiling> {
    let run = |req: usize, resp: usize, depth: usize, conns: usize| -> std::io::Result<f64> {
        let hs: Vec<_> = (0..conns)
            .map(|_| std::thread::spawn(move || closed_loop(addr, req, resp, depth, dur)))
            .collect();
        let mut total = 0;
        for h in hs {
            total += h
                .join()
                .map_err(|_| std::io::Error::other("ceiling client panicked"))??;
        }
        Ok(total as f64 / dur.as_secs_f64())
    };
    let read_iops = run(CAPSULE, RESP + bs, depth, conns)?;
    let write_iops = run(CAPSULE + bs, RESP, depth, conns)?;
    let qd1 = run(CAPSULE, RESP + bs, 1, 1)?;
    Ok(Ceiling {
        read_iops,
        read_bw: read_iops * bs as f64,
        write_iops,
        write_bw: write_iops * bs as f64,
        qd1_read_us: if qd1 > 0.0 { 1e6 / qd1 } else { 0.0 },
    })
}
