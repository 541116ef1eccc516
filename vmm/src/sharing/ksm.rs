//! The kernel's same-page merging (KSM) as fabvm sees it: the global knobs and counters in
//! `/sys/kernel/mm/ksm`, a process's `/proc/PID/ksm_stat`, and the CPU time of `ksmd`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Where the kernel exposes KSM.
pub const SYSFS: &str = "/sys/kernel/mm/ksm";

/// Errors from reading or setting KSM.
#[derive(Debug, thiserror::Error)]
pub enum KsmError {
    /// The kernel has no KSM (built without CONFIG_KSM).
    #[error("this kernel has no KSM ({SYSFS} does not exist)")]
    Unavailable,
    /// A KSM file could not be read or parsed.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// A KSM knob could not be set.
    #[error("cannot set {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    /// ksmd's priority could not be changed.
    #[error("cannot set ksmd's nice value: {0}")]
    Nice(io::Error),
}

/// Whether this kernel has KSM.
pub fn available() -> bool {
    Path::new(SYSFS).join("run").exists()
}

/// Reads one numeric KSM file.
pub fn read(name: &str) -> Result<u64, KsmError> {
    let path = Path::new(SYSFS).join(name);
    let text = fs::read_to_string(&path).map_err(|source| KsmError::Read {
        path: path.clone(),
        source,
    })?;
    text.trim().parse().map_err(|_| KsmError::Read {
        path,
        source: io::Error::new(io::ErrorKind::InvalidData, "not a number"),
    })
}

/// Sets one KSM knob (root only).
pub fn write(name: &str, value: u64) -> Result<(), KsmError> {
    let path = Path::new(SYSFS).join(name);
    fs::write(&path, value.to_string()).map_err(|source| KsmError::Write { path, source })
}

/// What [`ensure_running`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// `run` was already 1.
    AlreadyRunning,
    /// `run` was 0 (or 2) and fabvm set it to 1; it stays 1 after fabvm exits.
    Started,
    /// `run` is not 1 and fabvm may not change it (not root).
    Stopped,
}

/// Makes sure ksmd merges: sets `run` to 1 when it is not (root only). Nothing is restored
/// later: other VMs (and other KSM users) may rely on it by then.
pub fn ensure_running() -> Result<RunState, KsmError> {
    if !available() {
        return Err(KsmError::Unavailable);
    }
    if read("run")? == 1 {
        return Ok(RunState::AlreadyRunning);
    }
    match write("run", 1) {
        Ok(()) => Ok(RunState::Started),
        Err(KsmError::Write { source, .. })
            if matches!(
                source.kind(),
                io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
            ) =>
        {
            Ok(RunState::Stopped)
        }
        Err(e) => Err(e),
    }
}

/// The global KSM figures (absent files, on older kernels, read as 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Global {
    /// 0 stopped, 1 merging, 2 unmerging.
    pub run: u64,
    /// Pages ksmd scans per batch.
    pub pages_to_scan: u64,
    /// Sleep between batches.
    pub sleep_millisecs: u64,
    /// KSM pages in use (each is one physical page standing for several).
    pub pages_shared: u64,
    /// Further mappings of those pages: the pages saved.
    pub pages_sharing: u64,
    /// Pages scanned that are unique so far.
    pub pages_unshared: u64,
    /// Pages changing too fast to merge.
    pub pages_volatile: u64,
    /// Times ksmd has scanned every mergeable area.
    pub full_scans: u64,
    /// Pages ksmd has scanned (0 on kernels before 6.6, which do not count them).
    pub pages_scanned: u64,
    /// Empty pages merged with the kernel's zero page (`use_zero_pages`).
    pub ksm_zero_pages: u64,
}

impl Global {
    /// Reads the counters now.
    pub fn read() -> Result<Self, KsmError> {
        if !available() {
            return Err(KsmError::Unavailable);
        }
        let opt = |name| read(name).unwrap_or(0);
        Ok(Self {
            run: read("run")?,
            pages_to_scan: read("pages_to_scan")?,
            sleep_millisecs: read("sleep_millisecs")?,
            pages_shared: read("pages_shared")?,
            pages_sharing: read("pages_sharing")?,
            pages_unshared: opt("pages_unshared"),
            pages_volatile: opt("pages_volatile"),
            full_scans: opt("full_scans"),
            pages_scanned: opt("pages_scanned"),
            ksm_zero_pages: opt("ksm_zero_pages"),
        })
    }
}

/// One process's KSM figures, from `/proc/PID/ksm_stat` (all 0 when the file is absent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProcessStat {
    /// Pages of the process ksmd has looked at (one reverse-map item each, about 64 bytes
    /// of kernel memory).
    pub rmap_items: u64,
    /// Pages of the process that are merged (mapped to a KSM page).
    pub merging_pages: u64,
    /// Empty pages merged with the zero page.
    pub zero_pages: u64,
    /// The kernel's estimate of bytes saved less its own cost (may be negative).
    pub process_profit: i64,
}

impl ProcessStat {
    /// Reads `/proc/PID/ksm_stat`.
    pub fn read(pid: u32) -> Self {
        let text = fs::read_to_string(format!("/proc/{pid}/ksm_stat")).unwrap_or_default();
        Self::parse(&text)
    }

    /// Parses the `key value` lines of `ksm_stat`.
    pub fn parse(text: &str) -> Self {
        let mut stat = Self::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some(key), Some(value)) = (words.next(), words.next()) else {
                continue;
            };
            let key = key.trim_end_matches(':');
            let number = value.parse::<i64>().unwrap_or(0);
            let unsigned = u64::try_from(number).unwrap_or(0);
            match key {
                "ksm_rmap_items" => stat.rmap_items = unsigned,
                "ksm_merging_pages" => stat.merging_pages = unsigned,
                "ksm_zero_pages" => stat.zero_pages = unsigned,
                "ksm_process_profit" => stat.process_profit = number,
                _ => {}
            }
        }
        stat
    }

    /// Pages of the process backed by shared memory thanks to KSM.
    pub fn merged(&self) -> u64 {
        self.merging_pages + self.zero_pages
    }
}

/// CPU time ksmd has used since boot, in milliseconds (None if ksmd is not found).
pub fn ksmd_cpu_ms() -> Option<u64> {
    cpu_ms(ksmd_pid()?)
}

/// CPU time a process has used, in milliseconds (None if it is gone).
pub fn cpu_ms(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = cpu_ticks(&stat)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&hz| hz > 0)?;
    Some(ticks * 1000 / hz)
}

/// utime + stime (clock ticks) from a `/proc/PID/stat` line.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name is in parentheses and may contain spaces: count fields after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0], so utime (14) and stime (15) are fields[11] and [12].
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// ksmd's nice value (None if ksmd is not found).
pub fn ksmd_nice() -> Option<i32> {
    nice(&fs::read_to_string(format!("/proc/{}/stat", ksmd_pid()?)).ok()?)
}

/// The nice value (field 19) from a `/proc/PID/stat` line.
fn nice(stat: &str) -> Option<i32> {
    // Counted after the command name, as in `cpu_ticks`: field 3 is the first.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(16)?.parse().ok()
}

/// Sets ksmd's nice value (root only).
pub fn set_ksmd_nice(nice: i32) -> Result<(), KsmError> {
    let pid = ksmd_pid().ok_or_else(|| KsmError::Nice(io::ErrorKind::NotFound.into()))?;
    // SAFETY: setpriority only reads its arguments; a bad pid or value is an error return.
    let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, pid, nice) };
    if ret != 0 {
        return Err(KsmError::Nice(io::Error::last_os_error()));
    }
    Ok(())
}

/// The pid of the `ksmd` kernel thread.
fn ksmd_pid() -> Option<u32> {
    static PID: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *PID.get_or_init(|| {
        fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = fs::read_to_string(entry.path().join("comm")).ok()?;
            (comm.trim() == "ksmd").then_some(pid)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ksm_stat_lines_parse() {
        let text = "ksm_rmap_items 120\nksm_zero_pages 3\nksm_merging_pages 100\n\
                    ksm_process_profit -4096\nksm_merge_any: no\nksm_mergeable: yes\n";
        let stat = ProcessStat::parse(text);
        assert_eq!(
            stat,
            ProcessStat {
                rmap_items: 120,
                merging_pages: 100,
                zero_pages: 3,
                process_profit: -4096,
            }
        );
        assert_eq!(stat.merged(), 103);
        assert_eq!(ProcessStat::parse(""), ProcessStat::default());
    }

    #[test]
    fn stat_cpu_ticks_skip_the_command_name() {
        let line = "37 (ksmd) S 2 0 0 0 -1 2129984 0 0 0 0 617 45 0 0 25 5 1 0 9 0 0";
        assert_eq!(cpu_ticks(line), Some(662));
        assert_eq!(nice(line), Some(5));
        let odd = "42 (a b) c) R 1 0 0 0 -1 0 0 0 0 0 10 20 0 0";
        assert_eq!(cpu_ticks(odd), Some(30));
        assert_eq!(cpu_ticks("garbage"), None);
    }
}
