//! Job options with fio's names and meanings, from the command line or an
//! ini job file.

use std::path::PathBuf;
use std::time::Duration;

use dase_initiator::NvmeUri;

/// What to run I/O against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filename {
    /// A raw NVMe/TCP namespace through dase's host library.
    Nvme(NvmeUri),
    /// A local file, block device, or a file on a dase mount.
    Path(PathBuf),
}

impl Filename {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with("nvme-tcp://") {
            let u = NvmeUri::parse(s).map_err(|e| e.to_string())?;
            if u.nqn.is_none() {
                return Err(format!(
                    "'{s}' names no subsystem: use nvme-tcp://HOST:PORT/NQN/NSID"
                ));
            }
            Ok(Self::Nvme(u))
        } else if s.is_empty() {
            Err("--filename is empty".into())
        } else {
            Ok(Self::Path(PathBuf::from(s)))
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rw {
    Read,
    Write,
    RandRead,
    RandWrite,
    /// Mixed sequential (fio `rw`/`readwrite`).
    ReadWrite,
    RandRw,
}

impl Rw {
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "read" => Self::Read,
            "write" => Self::Write,
            "randread" => Self::RandRead,
            "randwrite" => Self::RandWrite,
            "rw" | "readwrite" => Self::ReadWrite,
            "randrw" => Self::RandRw,
            _ => {
                return Err(format!(
                    "unknown --rw '{s}': use read, write, randread, randwrite, rw or randrw"
                ))
            }
        })
    }
    pub fn random(self) -> bool {
        matches!(self, Self::RandRead | Self::RandWrite | Self::RandRw)
    }
    pub fn reads(self) -> bool {
        !matches!(self, Self::Write | Self::RandWrite)
    }
    pub fn writes(self) -> bool {
        !matches!(self, Self::Read | Self::RandRead)
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::RandRead => "randread",
            Self::RandWrite => "randwrite",
            Self::ReadWrite => "rw",
            Self::RandRw => "randrw",
        }
    }
}

/// Sizes: the same syntax as every other `dase` command (`4k`, `128KiB`, `1m`, `10g`).
pub use dase_target::parse_size;

/// Parses fio durations: `10` (seconds), `500ms`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("invalid time '{s}' (examples: 10, 500ms, 2m)"))?;
    Ok(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "us" => Duration::from_micros(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("invalid time '{s}': unknown unit '{unit}'")),
    })
}

/// Block sizes: one size, or fio's `--bssplit=4k/50:64k/50` weighted mix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSizes(pub Vec<(u64, u32)>);

impl BlockSizes {
    pub fn single(bs: u64) -> Self {
        Self(vec![(bs, 100)])
    }

    pub fn parse_split(s: &str) -> Result<Self, String> {
        let mut v = Vec::new();
        for part in s.split(':').filter(|p| !p.is_empty()) {
            let (size, pct) = part.split_once('/').unwrap_or((part, ""));
            let pct: u32 = if pct.is_empty() {
                0
            } else {
                pct.parse()
                    .map_err(|_| format!("invalid bssplit weight in '{part}'"))?
            };
            v.push((parse_size(size)?, pct));
        }
        if v.is_empty() {
            return Err("empty --bssplit".into());
        }
        // fio: entries without a weight share what is left equally.
        let given: u32 = v.iter().map(|x| x.1).sum();
        if given > 100 {
            return Err(format!(
                "--bssplit weights add up to {given}%, more than 100"
            ));
        }
        let blank = v.iter().filter(|x| x.1 == 0).count() as u32;
        if let Some(share) = (100 - given).checked_div(blank) {
            for x in v.iter_mut().filter(|x| x.1 == 0) {
                x.1 = share;
            }
        }
        Ok(Self(v))
    }

    pub fn max(&self) -> u64 {
        self.0.iter().map(|x| x.0).max().unwrap_or(0)
    }
    pub fn min(&self) -> u64 {
        self.0.iter().map(|x| x.0).min().unwrap_or(0)
    }

    /// Picks a size for a random draw `r` in 0..100.
    pub fn pick(&self, r: u32) -> u64 {
        let mut acc = 0;
        for &(bs, w) in &self.0 {
            acc += w;
            if r < acc {
                return bs;
            }
        }
        self.0.last().map(|x| x.0).unwrap_or(4096)
    }
}

/// Data verification method (fio `--verify`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    Crc32c,
}

/// One job, fully resolved.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub name: String,
    pub filename: Filename,
    pub rw: Rw,
    pub rwmixread: u32,
    pub bs: BlockSizes,
    pub iodepth: usize,
    pub numjobs: usize,
    /// Bytes of the target to use (None: all of it).
    pub size: Option<u64>,
    pub offset: u64,
    pub runtime: Option<Duration>,
    pub time_based: bool,
    pub ramp_time: Duration,
    pub direct: bool,
    pub verify: Option<Verify>,
    pub verify_fatal: bool,
    pub hdr_digest: bool,
    pub data_digest: bool,
    /// NVMe/TCP: microseconds to keep polling for completions before sleeping.
    pub poll_us: u64,
}

impl JobSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.iodepth == 0 || self.iodepth > 1024 {
            return Err(format!("--iodepth {} must be 1 to 1024", self.iodepth));
        }
        if self.numjobs == 0 || self.numjobs > 64 {
            return Err(format!("--numjobs {} must be 1 to 64", self.numjobs));
        }
        if self.rwmixread > 100 {
            return Err(format!("--rwmixread {} must be 0 to 100", self.rwmixread));
        }
        if self.bs.min() == 0 || self.bs.max() > 16 << 20 {
            return Err("--bs must be 1 byte to 16 MiB".into());
        }
        if self.time_based && self.runtime.is_none() {
            return Err("--time_based needs --runtime".into());
        }
        if self.verify.is_some() && self.bs.0.iter().any(|(b, _)| b % 512 != 0) {
            return Err("--verify needs block sizes that are multiples of 512".into());
        }
        Ok(())
    }
}

/// Reads fio-style ini job files: `[global]` options apply to every job; each
/// other section is a job named after it. Keys are fio option names
/// (`rw=randread`, `bs=4k`, `time_based`, ...).
/// Job sections of a job file: (name, options with [global] first).
pub type JobSections = Vec<(String, Vec<(String, String)>)>;

pub fn parse_job_file(text: &str) -> Result<JobSections, String> {
    let mut global: Vec<(String, String)> = Vec::new();
    let mut jobs: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let mut current: Option<usize> = None;
    let mut in_global = false;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split([';', '#']).next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(sec) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_global = sec == "global";
            if !in_global {
                jobs.push((sec.to_string(), Vec::new()));
                current = Some(jobs.len() - 1);
            }
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .unwrap_or((line, ""));
        let kv = (k.to_string(), v.to_string());
        if in_global {
            global.push(kv);
        } else if let Some(c) = current {
            jobs[c].1.push(kv);
        } else {
            return Err(format!(
                "job file line {}: '{line}' is outside any [section]",
                n + 1
            ));
        }
    }
    if jobs.is_empty() {
        return Err("job file defines no job (a [section] other than [global])".into());
    }
    Ok(jobs
        .into_iter()
        .map(|(name, opts)| (name, global.iter().cloned().chain(opts).collect()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_times() {
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("128KiB").unwrap(), 131072);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("4q").is_err() && parse_size("k").is_err() && parse_size("").is_err());
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("ten").is_err());
    }

    #[test]
    fn modes_and_filenames() {
        assert_eq!(Rw::parse("randrw").unwrap(), Rw::RandRw);
        assert_eq!(Rw::parse("readwrite").unwrap(), Rw::ReadWrite);
        assert!(Rw::parse("randomread")
            .unwrap_err()
            .contains("unknown --rw"));
        assert!(matches!(
            Filename::parse("nvme-tcp://127.0.0.1:4420/nqn.x:y/1").unwrap(),
            Filename::Nvme(_)
        ));
        assert!(Filename::parse("nvme-tcp://127.0.0.1:4420").is_err());
        assert_eq!(
            Filename::parse("/tmp/f").unwrap(),
            Filename::Path("/tmp/f".into())
        );
    }

    #[test]
    fn bssplit() {
        let b = BlockSizes::parse_split("4k/50:64k/30:1m").unwrap();
        assert_eq!(b.0, vec![(4096, 50), (65536, 30), (1 << 20, 20)]);
        assert_eq!(
            (b.pick(0), b.pick(49), b.pick(50), b.pick(99)),
            (4096, 4096, 65536, 1 << 20)
        );
        assert!(BlockSizes::parse_split("4k/80:8k/30").is_err());
    }

    #[test]
    fn job_files() {
        let jobs = parse_job_file("[global]\nbs=4k\niodepth=8 ; comment\n[a]\nrw=randread\n[b]\nrw=write\nbs=1m\ntime_based\n").unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].0, "a");
        assert!(jobs[1].1.contains(&("bs".into(), "1m".into())));
        assert!(jobs[1].1.contains(&("time_based".into(), "".into())));
        assert!(parse_job_file("bs=4k\n").is_err());
        assert!(parse_job_file("[global]\nbs=4k\n").is_err());
    }
}
