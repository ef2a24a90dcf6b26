//! `dase discover` and `dase identify`.
use anyhow::Result;

#[derive(clap::Args)]
#[command(about = "List the subsystems a target's discovery controller reports")]
pub struct DiscoverArgs {
    /// nvme-tcp://HOST:PORT
    uri: String,
}

#[derive(clap::Args)]
#[command(about = "Print a controller's and its namespaces' identify data")]
pub struct IdentifyArgs {
    /// nvme-tcp://HOST:PORT/NQN[/NSID]
    uri: String,
}

pub fn discover(_a: DiscoverArgs) -> Result<()> {
    anyhow::bail!("not yet")
}
pub fn identify(_a: IdentifyArgs) -> Result<()> {
    anyhow::bail!("not yet")
}
