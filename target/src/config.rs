//! D-node configuration: command-line flags or a TOML file describe the
//! listeners, the subsystems and their namespaces.
//!
//! ```toml
//! listen = ["127.0.0.1:4420"]
//! discovery_port = 8009          # optional extra discovery-only listener
//! stats_interval_secs = 60       # 0 turns periodic counter logs off
//! poll_us = 50                   # busy-poll window after traffic; 0 never polls
//!
//! [[subsystem]]
//! nqn = "nqn.2026-11.io.dase:d0"
//! allow_hosts = []               # empty: any host
//!
//! [[subsystem.namespace]]
//! path = "/var/lib/dase/d0.img"  # or: memory = true
//! size = "1G"                    # creates a missing file sparse
//! block_size = 4096
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::backend::parse_size;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    #[serde(default = "default_listen")]
    pub listen: Vec<SocketAddr>,
    /// Also answer discovery on this port of every listen address.
    #[serde(default)]
    pub discovery_port: Option<u16>,
    #[serde(default = "default_stats_interval")]
    pub stats_interval_secs: u64,
    /// Microseconds a connection keeps polling after traffic before sleeping.
    #[serde(default = "default_poll_us")]
    pub poll_us: u64,
    #[serde(default, rename = "subsystem")]
    pub subsystems: Vec<SubsystemConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsystemConfig {
    pub nqn: String,
    /// Host NQNs allowed to connect; empty allows any host.
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default, rename = "namespace")]
    pub namespaces: Vec<NamespaceConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub memory: bool,
    #[serde(default, deserialize_with = "de_size")]
    pub size: Option<u64>,
    #[serde(default = "default_block_size")]
    pub block_size: u32,
}

fn default_listen() -> Vec<SocketAddr> {
    vec!["127.0.0.1:4420".parse().unwrap()]
}
fn default_stats_interval() -> u64 {
    60
}
fn default_poll_us() -> u64 {
    50
}
fn default_block_size() -> u32 {
    512
}

fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum S {
        N(u64),
        T(String),
    }
    match Option::<S>::deserialize(d)? {
        None => Ok(None),
        Some(S::N(n)) => Ok(Some(n)),
        Some(S::T(t)) => parse_size(&t).map(Some).map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid config {path}: {error}")]
    Parse {
        path: PathBuf,
        error: toml::de::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl TargetConfig {
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.into(),
            error,
        })?;
        let c: Self = toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.into(),
            error,
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Checks what serde cannot: NQN form, block sizes, one backing per namespace.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError::Invalid(s));
        if self.listen.is_empty() {
            return bad("at least one listen address is required".into());
        }
        if self.subsystems.is_empty() {
            return bad("no subsystem configured: give --nqn and --namespace, or [[subsystem]] in the config".into());
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.subsystems {
            validate_nqn(&s.nqn).map_err(ConfigError::Invalid)?;
            if s.nqn == dase_protocol::nvme::DISCOVERY_NQN {
                return bad(format!("{} is reserved for the discovery subsystem", s.nqn));
            }
            if !seen.insert(s.nqn.clone()) {
                return bad(format!("subsystem {} is configured twice", s.nqn));
            }
            for h in &s.allow_hosts {
                validate_nqn(h).map_err(ConfigError::Invalid)?;
            }
            if s.namespaces.is_empty() {
                return bad(format!("subsystem {} has no namespace", s.nqn));
            }
            if s.namespaces.len() > 1024 {
                return bad(format!("subsystem {} has more than 1024 namespaces", s.nqn));
            }
            for n in &s.namespaces {
                if n.block_size != 512 && n.block_size != 4096 {
                    return bad(format!(
                        "block size {} is not supported (512 or 4096)",
                        n.block_size
                    ));
                }
                match (&n.path, n.memory) {
                    (Some(_), true) => {
                        return bad("a namespace is either a path or memory, not both".into())
                    }
                    (None, false) => return bad("a namespace needs a path or memory = true".into()),
                    (None, true) if n.size.is_none() => {
                        return bad("a memory namespace needs a size".into())
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// An NQN is 1..=223 bytes of printable ASCII (NVMe Base 4.5), conventionally `nqn.`-prefixed.
pub fn validate_nqn(nqn: &str) -> Result<(), String> {
    if nqn.is_empty() || nqn.len() > 223 {
        return Err(format!("NQN '{nqn}' must be 1 to 223 bytes"));
    }
    if !nqn.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(format!(
            "NQN '{nqn}' must be printable ASCII without spaces"
        ));
    }
    if !nqn.starts_with("nqn.") {
        return Err(format!("NQN '{nqn}' must start with 'nqn.'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_config() {
        let c: TargetConfig = toml::from_str(
            r#"
            listen = ["127.0.0.1:4500"]
            discovery_port = 8009
            [[subsystem]]
            nqn = "nqn.2026-11.io.dase:a"
            allow_hosts = ["nqn.2026-11.io.dase:host1"]
            [[subsystem.namespace]]
            memory = true
            size = "64M"
            block_size = 4096
            [[subsystem.namespace]]
            path = "/tmp/x"
            size = 1048576
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.subsystems[0].namespaces[0].size, Some(64 << 20));
        assert_eq!(c.subsystems[0].namespaces[1].block_size, 512);
    }

    #[test]
    fn rejects_bad_values_clearly() {
        let c: TargetConfig = toml::from_str(
            "[[subsystem]]\nnqn = \"bad nqn\"\n[[subsystem.namespace]]\nmemory = true\nsize = \"1M\"\n",
        )
        .unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("printable"));
        assert!(toml::from_str::<TargetConfig>("bogus = 1").is_err());
    }
}
