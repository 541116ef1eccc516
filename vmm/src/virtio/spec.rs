//! What the user asks for on the command line: `--disk PATH[,ro]`, `--net tap=NAME[,mac=MAC]`
//! and `--rng`, parsed into plain values (clap value parsers). Files and taps are opened later,
//! by `config` and the device set.

use std::path::PathBuf;

use devices::virtio::MacAddr;

/// Errors from parsing a `--disk` or `--net` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// `--disk` without a path.
    #[error("--disk needs a path (PATH[,ro])")]
    NoPath,
    /// A `--disk` option other than `ro` / `rw`.
    #[error("unknown disk option '{0}' (want PATH[,ro])")]
    DiskOption(String),
    /// A `--net` part that is not `key=value`, or an unknown key.
    #[error("unknown net option '{0}' (want tap=NAME[,mac=MAC])")]
    NetOption(String),
    /// `--net` without `tap=`.
    #[error("--net needs tap=NAME")]
    NoTap,
    /// A key given twice.
    #[error("--net gives {0} twice")]
    Repeated(&'static str),
    /// A tap name Linux does not accept.
    #[error("invalid tap name '{0}' (1 to 15 characters, no '/', ':' or whitespace)")]
    TapName(String),
    /// A MAC address that does not parse or is not a unicast address.
    #[error("invalid MAC address '{0}' (want six hex bytes, e.g. 52:54:00:12:34:56, unicast)")]
    Mac(String),
}

/// One `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    /// Raw image file (or block device).
    pub path: PathBuf,
    /// Refuse guest writes.
    pub read_only: bool,
}

/// One `--net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetArg {
    /// Tap interface to attach to (created if it does not exist).
    pub tap: String,
    /// The guest's MAC address; a random locally administered one if not given.
    pub mac: Option<MacAddr>,
}

/// Parses `PATH[,ro]` (also `,rw`). Paths containing commas are not supported.
pub fn parse_disk(text: &str) -> Result<DiskArg, SpecError> {
    let mut parts = text.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err(SpecError::NoPath);
    }
    let mut read_only = false;
    for option in parts {
        match option {
            "ro" => read_only = true,
            "rw" => read_only = false,
            other => return Err(SpecError::DiskOption(other.to_owned())),
        }
    }
    Ok(DiskArg {
        path: PathBuf::from(path),
        read_only,
    })
}

/// Parses `tap=NAME[,mac=MAC]`.
pub fn parse_net(text: &str) -> Result<NetArg, SpecError> {
    let mut tap = None;
    let mut mac = None;
    for part in text.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| SpecError::NetOption(part.to_owned()))?;
        match key {
            "tap" if tap.is_some() => return Err(SpecError::Repeated("tap")),
            "tap" => {
                if !valid_ifname(value) {
                    return Err(SpecError::TapName(value.to_owned()));
                }
                tap = Some(value.to_owned());
            }
            "mac" if mac.is_some() => return Err(SpecError::Repeated("mac")),
            "mac" => {
                let parsed: MacAddr = value
                    .parse()
                    .map_err(|_| SpecError::Mac(value.to_owned()))?;
                if parsed.0[0] & 1 != 0 {
                    return Err(SpecError::Mac(value.to_owned()));
                }
                mac = Some(parsed);
            }
            _ => return Err(SpecError::NetOption(part.to_owned())),
        }
    }
    Ok(NetArg {
        tap: tap.ok_or(SpecError::NoTap)?,
        mac,
    })
}

/// What Linux accepts as an interface name (`dev_valid_name`), minus `%` patterns.
fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '%' || c.is_whitespace() || c == '\0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks() {
        assert_eq!(
            parse_disk("/img/a.raw").unwrap(),
            DiskArg {
                path: "/img/a.raw".into(),
                read_only: false
            }
        );
        assert!(parse_disk("a.raw,ro").unwrap().read_only);
        assert!(!parse_disk("a.raw,ro,rw").unwrap().read_only);
        assert_eq!(parse_disk(""), Err(SpecError::NoPath));
        assert_eq!(parse_disk(",ro"), Err(SpecError::NoPath));
        assert_eq!(
            parse_disk("a.raw,readonly"),
            Err(SpecError::DiskOption("readonly".into()))
        );
        assert_eq!(
            parse_disk("a.raw,"),
            Err(SpecError::DiskOption(String::new()))
        );
    }

    #[test]
    fn nets() {
        let net = parse_net("tap=tap0").unwrap();
        assert_eq!(net.tap, "tap0");
        assert_eq!(net.mac, None);
        let net = parse_net("mac=52:54:00:12:34:56,tap=fab1").unwrap();
        assert_eq!(net.tap, "fab1");
        assert_eq!(net.mac.unwrap().to_string(), "52:54:00:12:34:56");
    }

    #[test]
    fn bad_nets() {
        assert_eq!(parse_net(""), Err(SpecError::NetOption(String::new())));
        assert_eq!(parse_net("tap0"), Err(SpecError::NetOption("tap0".into())));
        assert_eq!(parse_net("mac=52:54:00:12:34:56"), Err(SpecError::NoTap));
        assert_eq!(parse_net("tap=a,tap=b"), Err(SpecError::Repeated("tap")));
        assert_eq!(
            parse_net("tap=a,queues=2"),
            Err(SpecError::NetOption("queues=2".into()))
        );
        for bad in ["", "a-name-far-too-long", "a/b", "a b", "tap%d", ".."] {
            assert_eq!(
                parse_net(&format!("tap={bad}")),
                Err(SpecError::TapName(bad.into())),
                "{bad}"
            );
        }
        for bad in ["zz:54:00:12:34:56", "52:54:00:12:34", "01:00:5e:00:00:01"] {
            assert_eq!(
                parse_net(&format!("tap=t0,mac={bad}")),
                Err(SpecError::Mac(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn errors_are_one_line() {
        for e in [
            parse_disk("x,y").unwrap_err(),
            parse_net("tap=a/b").unwrap_err(),
            parse_net("foo").unwrap_err(),
        ] {
            assert!(!e.to_string().contains('\n'));
        }
    }
}
