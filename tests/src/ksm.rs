//! The host's KSM for tests: its knobs are host-wide, so a test that turns them holds a
//! [`Knobs`] guard, which saves them, and gives them back when it is dropped (also when the
//! test fails). Tests holding one must not run at the same time: nextest's `ksm` group.

use std::path::Path;

/// Where the kernel exposes KSM.
pub const SYSFS: &str = "/sys/kernel/mm/ksm";

/// The knobs saved and restored.
const SAVED: [&str; 3] = ["run", "pages_to_scan", "sleep_millisecs"];

/// Reads one KSM counter or knob.
pub fn read(name: &str) -> u64 {
    let path = Path::new(SYSFS).join(name);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {text:?}: {e}", path.display()))
}

/// Sets one KSM knob.
pub fn write(name: &str, value: u64) {
    let path = Path::new(SYSFS).join(name);
    std::fs::write(&path, value.to_string())
        .unwrap_or_else(|e| panic!("set {} to {value}: {e}", path.display()));
}

/// The `ksmd` kernel thread's pid and nice value.
pub fn ksmd() -> (u32, i32) {
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if stat.contains(" (ksmd) ") {
            // Field 19 (nice), counted from the state (field 3) after the command name.
            let rest = &stat[stat.rfind(')').unwrap() + 1..];
            let nice = rest.split_whitespace().nth(16).unwrap().parse().unwrap();
            return (pid, nice);
        }
    }
    panic!("no ksmd thread in /proc");
}

/// The host's KSM knobs and ksmd's nice value as they were; restored on drop.
#[derive(Debug)]
pub struct Knobs {
    saved: Vec<(&'static str, u64)>,
    ksmd: (u32, i32),
}

impl Knobs {
    /// Saves the knobs. Fails the test loudly when this kernel has no KSM (tests of sharing
    /// must not pass where nothing can be shared).
    pub fn save(test: &str) -> Knobs {
        assert!(
            Path::new(SYSFS).join("run").exists(),
            "{test} needs KSM and this kernel has none ({SYSFS}/run is missing)"
        );
        Knobs {
            saved: SAVED.iter().map(|&name| (name, read(name))).collect(),
            ksmd: ksmd(),
        }
    }

    /// The value `name` had when saved.
    pub fn saved(&self, name: &str) -> u64 {
        self.saved
            .iter()
            .find(|(n, _)| *n == name)
            .expect("a saved knob")
            .1
    }

    /// ksmd's nice value when saved.
    pub fn ksmd_nice(&self) -> i32 {
        self.ksmd.1
    }
}

impl Drop for Knobs {
    fn drop(&mut self) {
        for &(name, value) in &self.saved {
            let path = Path::new(SYSFS).join(name);
            if let Err(e) = std::fs::write(&path, value.to_string()) {
                eprintln!("could not restore {}: {e}", path.display());
            }
        }
        let (pid, nice) = self.ksmd;
        // SAFETY: setpriority only reads its arguments.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, pid, nice) } != 0 {
            let e = std::io::Error::last_os_error();
            eprintln!("could not restore ksmd's nice value {nice}: {e}");
        }
    }
}

/// The test guest's page function (guest-images/test-guest/pagecheck.py): whether frame
/// `gfn` holds a page from the shared seed at `share` percent.
pub fn guest_page_is_shared(gfn: u64, share: u64) -> bool {
    mix64(gfn) % 100 < share
}

fn mix64(x: u64) -> u64 {
    let mut x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// `fill_start` and `fill_end` from the test guest's `info` line.
pub fn guest_fill_range(console: &str) -> Option<(u64, u64)> {
    let line = console.lines().find(|l| l.contains("fabvm-guest: info "))?;
    let field = |key: &str| {
        let value = line.split_whitespace().find_map(|w| w.strip_prefix(key))?;
        u64::from_str_radix(value.trim_start_matches("0x").trim_end_matches('\r'), 16).ok()
    };
    Some((field("fill_start=")?, field("fill_end=")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_function_matches_the_reference() {
        // pagecheck.py: mix64(0) and mix64(1).
        assert_eq!(mix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(mix64(1), 0x910A_2DEC_8902_5CC1);
        let info = "fabvm-guest: info tsc_khz=1 tsc=cpuid fill_start=0x400000 fill_end=0x10000000 gen_table=0x200000\r\n";
        assert_eq!(guest_fill_range(info), Some((0x40_0000, 0x1000_0000)));
    }
}
