//! fabvm's memory fabric: content identities of guest pages and what is built on them.
//! No KVM dependency, so everything here is testable anywhere.
//!
//! - [`identity`]: a page is known by blake3 of its 4 KiB; zero pages are recognised.
//! - [`hashing`]: whole regions hashed on all cores; dirty pages rehashed incrementally.
//! - [`live`]: identities kept current by each VM, published to the host, and the host
//!   index over them.
//! - [`manifest`]: a VM's memory as guest frame → identity, with a checked file format.
//! - [`store`]: the host page store, content addressed, reference counted, crash safe.
//! - [`migration`]: the live-migration wire protocol, sender and receiver state machines.

mod codec;
pub mod hashing;
pub mod identity;
pub mod live;
pub mod manifest;
pub mod migration;
pub mod store;
#[cfg(test)]
mod testutil;

pub use codec::CodecError;
pub use hashing::{bitmap_words, hash_region, rehash_dirty, HashingError, RehashStats};
pub use identity::{identify, is_zero, Page, PageId, PAGE_SHIFT, PAGE_SIZE};
pub use manifest::{DecodeLimits, Manifest, ManifestCounts, ManifestError, Region};
pub use store::{
    default_dir, fingerprint, GcReport, RootSummary, Store, StoreError, StoreOptions, StoreStats,
    VerifyReport,
};
