//! Live page identities shared across the processes of one host.
//!
//! - [`table`]: a VM's identities in one mapping its memory manager writes and other fabvm
//!   processes map read-only, with a generation per chunk so readers see whole updates.
//! - [`index`]: the host index built from those tables: where on this host a page is.
//! - [`requests`]: how a reader asks the owner for a harvest (to confirm pages it copied
//!   without hashing them) or a sync (to have every identity computed now).
//!
//! Keeping the tables current (harvesting the dirty log, rehashing under a CPU budget) is
//! the VMM's memory manager's job; this module only holds the data and its protocol.

pub mod index;
pub mod reader;
pub mod requests;
pub mod table;

pub use index::{key_of, HostIndex, Key, Location, RefreshStats, VmCounts, ZERO_KEY};
pub use reader::TableReader;
pub use requests::{OwnerRequests, Request};
pub use table::{
    process_start_time, ChunkWriter, Entry, Frames, IdentityTable, PageState, TableError,
    TableRegion, CHUNK_PAGES,
};
