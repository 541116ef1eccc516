//! `Describe`: the VM's shape, the first message after the key proofs.

use crate::codec::Reader;
use crate::identity::PAGE_SIZE;
use crate::manifest::Region;

use super::{bad, malformed, put_u32, put_u64, too_large};
use crate::migration::{Limits, MigrationError, VmDescription};

/// Appends a `Describe` payload.
pub fn encode_describe(out: &mut Vec<u8>, desc: &VmDescription) {
    put_u32(out, desc.vcpus);
    put_u32(out, desc.regions.len() as u32);
    put_u32(out, desc.config.len() as u32);
    put_u32(out, 0);
    for r in &desc.regions {
        put_u64(out, r.guest_addr);
        put_u64(out, r.pages);
    }
    out.extend_from_slice(&desc.config);
}

/// Decodes and validates a `Describe` payload.
pub fn decode_describe(payload: &[u8], limits: &Limits) -> Result<VmDescription, MigrationError> {
    const WHAT: &str = "Describe";
    let mut r = Reader::new(payload);
    let m = malformed(WHAT);
    let vcpus = r.u32(WHAT).map_err(&m)?;
    let count = r.u32(WHAT).map_err(&m)?;
    let config_len = r.u32(WHAT).map_err(&m)?;
    if r.u32(WHAT).map_err(&m)? != 0 {
        return Err(bad(WHAT, "reserved field set"));
    }
    if vcpus == 0 {
        return Err(bad(WHAT, "no vCPUs"));
    }
    too_large("vCPU count", vcpus.into(), limits.max_vcpus.into())?;
    too_large("region count", count.into(), limits.max_regions.into())?;
    too_large("config length", config_len.into(), limits.max_config.into())?;
    if r.remaining() as u64 != u64::from(count) * 16 + u64::from(config_len) {
        return Err(bad(WHAT, "length does not match its counts"));
    }
    let mut regions = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let guest_addr = r.u64(WHAT).map_err(&m)?;
        let pages = r.u64(WHAT).map_err(&m)?;
        regions.push(Region { guest_addr, pages });
    }
    let config = r.take(config_len as usize, WHAT).map_err(&m)?.to_vec();
    r.finish().map_err(&m)?;
    check_regions(&regions, limits)?;
    Ok(VmDescription {
        vcpus,
        regions,
        config,
    })
}

/// Regions must be non-empty, page aligned, sorted, disjoint, inside the address space
/// and under `limits.max_pages` in total.
pub(crate) fn check_regions(regions: &[Region], limits: &Limits) -> Result<(), MigrationError> {
    const WHAT: &str = "regions";
    if regions.is_empty() {
        return Err(bad(WHAT, "no memory"));
    }
    let mut total: u64 = 0;
    let mut prev_end = 0u64;
    for (i, r) in regions.iter().enumerate() {
        let end = r
            .pages
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|b| r.guest_addr.checked_add(b));
        let Some(end) = end else {
            return Err(bad(WHAT, "region past the end of the address space"));
        };
        if r.pages == 0 || !r.guest_addr.is_multiple_of(PAGE_SIZE as u64) {
            return Err(bad(WHAT, "empty or unaligned region"));
        }
        if i > 0 && r.guest_addr < prev_end {
            return Err(bad(WHAT, "regions unsorted or overlapping"));
        }
        prev_end = end;
        total = total.saturating_add(r.pages);
    }
    too_large("guest pages", total, limits.max_pages)
}
