//! fabvm's cluster layer (no KVM): the etcd host registry, the compact summaries of the pages
//! each host holds, the page service's wire code and client, and placement ranking. The
//! design is in `docs/cluster.md`.

pub mod bloom;
pub mod control;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod place;
pub mod plan;
pub mod pull;
pub mod record;
#[cfg(feature = "etcd")]
pub mod registry;
pub mod service;

pub use bloom::Bloom;
pub use record::HostRecord;
#[cfg(feature = "etcd")]
pub use registry::Registry;
pub use service::{fetch_pages, PageClient};
