//! Root files: the page list of each named holder (a snapshot's manifest, a template),
//! which holds one reference on each of its distinct pages while it is registered.
//!
//! ```text
//! roots/<name>.root: magic "FABSTROT" | version u32 | 0 u32 | count u64
//!                    | identities, sorted (32 bytes each) | blake3 of all the above
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use super::fsutil::{io_err, write_atomic};
use super::StoreError;
use crate::codec::{Reader, Writer};
use crate::identity::PageId;

/// Subdirectory of the store holding the root files.
pub(crate) const DIR: &str = "roots";
const EXT: &str = "root";
const MAGIC: &[u8; 8] = b"FABSTROT";
const VERSION: u32 = 1;
const MAX_NAME_LEN: usize = 128;

/// Checks a root name: 1 to 128 of `[A-Za-z0-9._-]`, not starting with a dot.
pub(crate) fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadRootName(name.to_string()))
    }
}

pub(crate) fn path(store_dir: &Path, name: &str) -> PathBuf {
    store_dir.join(DIR).join(format!("{name}.{EXT}"))
}

/// Writes the root file of `name` atomically. `ids` must be sorted and distinct.
/// Returns the file's digest, which the journal records.
pub(crate) fn write(store_dir: &Path, name: &str, ids: &[PageId]) -> Result<[u8; 32], StoreError> {
    let mut w = Writer::with_capacity(24 + ids.len() * 32 + 32);
    w.bytes(MAGIC);
    w.u32(VERSION);
    w.u32(0);
    w.u64(ids.len() as u64);
    for id in ids {
        w.id(id);
    }
    let bytes = w.seal();
    write_atomic(&path(store_dir, name), &bytes)?;
    Ok(*blake3::hash(&bytes).as_bytes())
}

/// Reads the root file of `name`, checking it against the digest the index recorded.
pub(crate) fn read(
    store_dir: &Path,
    name: &str,
    digest: &[u8; 32],
) -> Result<Vec<PageId>, StoreError> {
    let path = path(store_dir, name);
    let bytes = fs::read(&path).map_err(io_err("read", &path))?;
    let damaged = |reason: String| StoreError::RootDamaged {
        name: name.to_string(),
        reason,
    };
    if blake3::hash(&bytes).as_bytes() != digest {
        return Err(damaged("digest does not match the index".into()));
    }
    decode(&bytes).map_err(damaged)
}

fn decode(bytes: &[u8]) -> Result<Vec<PageId>, String> {
    let mut r = Reader::unseal(bytes).map_err(|e| e.to_string())?;
    if &r.array::<8>("magic").map_err(|e| e.to_string())? != MAGIC {
        return Err("bad magic".into());
    }
    let version = r.u32("version").map_err(|e| e.to_string())?;
    r.u32("reserved").map_err(|e| e.to_string())?;
    if version != VERSION {
        return Err(format!("unsupported version {version}"));
    }
    let count = r.u64("count").map_err(|e| e.to_string())?;
    let count = r
        .bound(count, 32, u64::MAX, "identity")
        .map_err(|e| e.to_string())?;
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        ids.push(r.id("identity").map_err(|e| e.to_string())?);
    }
    r.finish().map_err(|e| e.to_string())?;
    Ok(ids)
}

/// Names of the root files present, and any other files in the directory.
pub(crate) fn scan(store_dir: &Path) -> Result<(Vec<String>, Vec<PathBuf>), StoreError> {
    let dir = store_dir.join(DIR);
    let mut names = Vec::new();
    let mut other = Vec::new();
    for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
        let path = entry.map_err(io_err("list", &dir))?.path();
        let name = path
            .extension()
            .filter(|e| *e == EXT)
            .and_then(|_| path.file_stem()?.to_str())
            .filter(|n| check_name(n).is_ok());
        match name {
            Some(n) => names.push(n.to_string()),
            None => other.push(path),
        }
    }
    Ok((names, other))
}

/// Deletes the root file of `name` if present (the directory is synced by the caller).
pub(crate) fn remove(store_dir: &Path, name: &str) -> Result<(), StoreError> {
    let path = path(store_dir, name);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", &path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "snap-1.v2_x", &"x".repeat(128)] {
            check_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn write_read_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(DIR)).unwrap();
        let ids = vec![PageId([1; 32]), PageId([2; 32])];
        let digest = write(dir.path(), "s", &ids).unwrap();
        assert_eq!(read(dir.path(), "s", &digest).unwrap(), ids);
        assert!(matches!(
            read(dir.path(), "s", &[0; 32]),
            Err(StoreError::RootDamaged { .. })
        ));
        assert_eq!(scan(dir.path()).unwrap().0, vec!["s".to_string()]);
        remove(dir.path(), "s").unwrap();
        remove(dir.path(), "s").unwrap();
        assert!(matches!(
            read(dir.path(), "s", &digest),
            Err(StoreError::Io { .. })
        ));
    }
}
