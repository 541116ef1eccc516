//! fabvm's side of the cluster (the registry, summaries, page-service wire code and ranking
//! live in the `cluster` crate): the host agent (`fabvm host serve`, [`agent`]) and the
//! `fabvm cluster` commands ([`commands`]; `drain` and `pack` in [`drain`]), the agent's
//! answers to control requests ([`control`]), and a restore's fetching of the pages its
//! store lacks ([`pull`]).

#[cfg(feature = "etcd")]
pub mod agent;
#[cfg(feature = "etcd")]
pub mod commands;
#[cfg(feature = "etcd")]
pub mod control;
#[cfg(feature = "etcd")]
pub mod drain;
#[cfg(feature = "etcd")]
mod host;
pub mod pull;

/// How long a `fabvm cluster` command or an agent waits for etcd before it gives up.
pub const ETCD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
