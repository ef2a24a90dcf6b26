//! Library side of the `dase` command: what the subcommands do, reachable
//! from tests.

pub mod bench;
