//! Command-line values: sizes (`2G`), `--disk PATH[,ro]`, `--net tap=NAME[,mac=MAC]` on the
//! input as one string, and the whole command line (arguments separated by NUL bytes) through
//! clap. Whatever a parser accepts must print back to text it parses to the same value; a
//! refused command line renders a first line, as `fabvm` prints it.
#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use vmm::cli::{parse_size, Cli};
use vmm::virtio::spec::{parse_disk, parse_net};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(bytes) = parse_size(&text) {
        assert_eq!(parse_size(&format!("{bytes}B")), Ok(bytes), "{text:?}");
        if bytes % (1 << 20) == 0 {
            assert_eq!(parse_size(&format!("{}M", bytes >> 20)), Ok(bytes));
        }
    }
    if let Ok(disk) = parse_disk(&text) {
        let path = disk.path.to_str().expect("parsed from a str");
        assert!(!path.is_empty() && !path.contains(','), "{text:?}");
        let again = format!("{path}{}", if disk.read_only { ",ro" } else { "" });
        assert_eq!(parse_disk(&again), Ok(disk));
    }
    if let Ok(net) = parse_net(&text) {
        let mac = net.mac.map(|m| format!(",mac={m}")).unwrap_or_default();
        assert_eq!(parse_net(&format!("tap={}{mac}", net.tap)), Ok(net));
    }
    let args = std::iter::once("fabvm").chain(text.split('\0'));
    match Cli::try_parse_from(args) {
        Ok(cli) => {
            let _ = cli.run.identities.config();
        }
        Err(e) => {
            let rendered = e.render().to_string();
            assert!(rendered.lines().next().is_some() || rendered.is_empty());
        }
    }
});
