//! `nvme-tcp://HOST[:PORT][/NQN[/NSID]]` addresses.

use std::fmt;

use super::HostError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmeUri {
    /// `host:port`, IPv6 hosts in brackets.
    pub addr: String,
    pub nqn: Option<String>,
    pub nsid: Option<u32>,
}

impl NvmeUri {
    pub fn parse(s: &str) -> Result<Self, HostError> {
        let bad = |why: &str| {
            HostError::InvalidArgument(format!(
                "'{s}' is not an nvme-tcp URI: {why} (expected nvme-tcp://HOST:PORT[/NQN[/NSID]])"
            ))
        };
        let rest = s
            .strip_prefix("nvme-tcp://")
            .ok_or_else(|| bad("missing the nvme-tcp:// scheme"))?;
        let mut parts = rest.splitn(3, '/');
        let hostport = parts
            .next()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host"))?;
        let addr = if hostport.starts_with('[') {
            match hostport.find(']') {
                Some(i) if i + 1 == hostport.len() => format!("{hostport}:4420"),
                Some(i) if hostport[i + 1..].starts_with(':') => hostport.to_string(),
                _ => return Err(bad("malformed IPv6 address")),
            }
        } else if hostport.contains(':') {
            hostport.to_string()
        } else {
            format!("{hostport}:4420")
        };
        let port = addr.rsplit(':').next().unwrap_or("");
        port.parse::<u16>().map_err(|_| bad("invalid port"))?;
        let nqn = parts.next().filter(|n| !n.is_empty()).map(str::to_string);
        let nsid = match parts.next().filter(|n| !n.is_empty()) {
            None => None,
            Some(n) => Some(
                n.parse::<u32>()
                    .ok()
                    .filter(|&v| v != 0 && v < 0xffff_fffe)
                    .ok_or_else(|| bad("invalid NSID"))?,
            ),
        };
        Ok(Self { addr, nqn, nsid })
    }
}

impl fmt::Display for NvmeUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nvme-tcp://{}", self.addr)?;
        if let Some(n) = &self.nqn {
            write!(f, "/{n}")?;
            if let Some(ns) = self.nsid {
                write!(f, "/{ns}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let u = NvmeUri::parse("nvme-tcp://127.0.0.1:4420/nqn.x:y/3").unwrap();
        assert_eq!(
            (u.addr.as_str(), u.nqn.as_deref(), u.nsid),
            ("127.0.0.1:4420", Some("nqn.x:y"), Some(3))
        );
        assert_eq!(
            NvmeUri::parse("nvme-tcp://localhost").unwrap().addr,
            "localhost:4420"
        );
        assert_eq!(
            NvmeUri::parse("nvme-tcp://[::1]:9/n").unwrap().addr,
            "[::1]:9"
        );
        assert_eq!(
            NvmeUri::parse("nvme-tcp://h:1/n/1").unwrap().to_string(),
            "nvme-tcp://h:1/n/1"
        );
        for bad in [
            "tcp://h",
            "nvme-tcp://",
            "nvme-tcp://h:x",
            "nvme-tcp://h/n/0",
            "nvme-tcp://h/n/z",
        ] {
            assert!(NvmeUri::parse(bad).is_err(), "{bad}");
        }
    }
}
