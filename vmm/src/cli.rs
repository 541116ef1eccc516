//! Command-line interface: clap definitions and the size parser (K/M/G suffixes).
//! Validation that needs the host (files, memory, KVM limits) happens in `config`.

use std::path::PathBuf;

use clap::Parser;

/// fabvm: a minimal KVM microVM monitor with a memory fabric.
#[derive(Debug, Parser)]
#[command(name = "fabvm", version, about, disable_help_subcommand = true)]
pub struct Cli {
    /// Guest kernel: a bzImage (64-bit boot protocol) or an uncompressed ELF vmlinux (PVH or 64-bit entry).
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// Guest memory size, e.g. 512M or 2G (K/M/G/T suffixes; a bare number is MiB).
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_size)]
    pub mem: u64,

    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,

    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = crate::config::DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
}

/// Errors from parsing a size argument.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number with an optional suffix.
    #[error("'{0}' is not a size (use e.g. 512M, 2G)")]
    Malformed(String),
    /// Too large to represent.
    #[error("'{0}' is too large")]
    Overflow(String),
}

/// Parses `512M`, `2G`, `2GiB`, `4096K`, `1T`; a bare number means MiB (as with QEMU's `-m`).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let malformed = || SizeError::Malformed(text.to_string());
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(split);
    if digits.is_empty() {
        return Err(malformed());
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| SizeError::Overflow(text.to_string()))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "b" => 0,
        _ => return Err(malformed()),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4096k"), Ok(4 << 20));
        assert_eq!(parse_size("128"), Ok(128 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn bad_sizes() {
        for bad in ["abc", "", "M", "12Q", "-1G", "1.5G"] {
            assert!(
                matches!(parse_size(bad), Err(SizeError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_size("99999999999999999999G"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("17179869184G"),
            Err(SizeError::Overflow(_))
        ));
    }
}
