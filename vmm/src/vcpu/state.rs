//! A vCPU's complete architectural state as a plain serializable type, and the KVM calls that
//! save and restore it, in the orders KVM requires (documented on each function).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, kvm_xsave2, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// Errors from saving or restoring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM vCPU ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than the state holds.
    #[error("KVM restored {set} of {wanted} MSRs (first refused: {first:#x})")]
    Msrs {
        set: usize,
        wanted: usize,
        first: u32,
    },
    /// The state does not fit this host (e.g. an XSAVE area of another size).
    #[error("vCPU state does not fit this host: {0}")]
    Incompatible(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Model-specific registers that KVM lets us read.
    pub msrs: Vec<kvm_msr_entry>,
    /// Run state (running, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// The XSAVE area: the legacy 4 KiB region, then any extended words (AMX and beyond).
    pub xsave: Vec<u32>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// TSC frequency the vCPU ran at, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// MSR indices whose values can be saved: KVM's list, less those its GET_MSRS refuses.
pub fn saveable_msrs(vcpu: &VcpuFd, candidates: &[u32]) -> Vec<u32> {
    let mut usable = Vec::with_capacity(candidates.len());
    for chunk in candidates.chunks(KVM_MAX_MSR_ENTRIES) {
        let mut pending: Vec<u32> = chunk.to_vec();
        while !pending.is_empty() {
            let entries: Vec<_> = pending
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).expect("at most KVM_MAX_MSR_ENTRIES");
            // KVM reads MSRs in order and stops at the first it refuses.
            let read = vcpu.get_msrs(&mut msrs).unwrap_or(0);
            usable.extend_from_slice(&pending[..read]);
            pending.drain(..=read.min(pending.len() - 1));
        }
    }
    usable
}

/// Size in 32-bit words of the XSAVE area beyond the legacy 4 KiB (0 when KVM has no XSAVE2).
fn xsave_extra_words(xsave2_size: usize) -> usize {
    xsave2_size
        .saturating_sub(std::mem::size_of::<kvm_xsave>())
        .div_ceil(4)
}

impl VcpuState {
    /// Saves a paused vCPU. Order: mp_state and regs first (reading them completes nothing),
    /// then sregs, XSAVE, XCRs, debug registers, LAPIC, MSRs, and vCPU events last so that
    /// events raised by the other reads are included.
    pub fn save(vcpu: &VcpuFd, msr_list: &[u32], xsave2_size: usize) -> Result<Self, StateError> {
        let mp_state = vcpu.get_mp_state().map_err(kvm("GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(kvm("GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm("GET_SREGS"))?;
        let xsave = save_xsave(vcpu, xsave2_size)?;
        let xcrs = vcpu.get_xcrs().map_err(kvm("GET_XCRS"))?;
        let debug_regs = vcpu.get_debug_regs().map_err(kvm("GET_DEBUGREGS"))?;
        let lapic = vcpu.get_lapic().map_err(kvm("GET_LAPIC"))?;
        let msrs = save_msrs(vcpu, msr_list)?;
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let tsc_khz = vcpu.get_tsc_khz().ok().filter(|&khz| khz > 0);
        let events = vcpu.get_vcpu_events().map_err(kvm("GET_VCPU_EVENTS"))?;
        Ok(Self {
            cpuid,
            msrs,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            events,
            tsc_khz,
        })
    }

    /// Restores into a freshly created vCPU. Order: CPUID first (it decides which MSRs and
    /// XSAVE features exist), mp_state, regs, sregs (before XSAVE and the LAPIC, since CR4
    /// and the APIC base gate them), XSAVE, XCRs, debug registers, LAPIC, MSRs (after the
    /// LAPIC: the TSC-deadline MSR needs the timer mode set), vCPU events last.
    pub fn restore(&self, vcpu: &VcpuFd, xsave2_size: usize) -> Result<(), StateError> {
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|_| StateError::Incompatible(format!("{} CPUID entries", self.cpuid.len())))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm("SET_CPUID2"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm("SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("SET_REGS"))?;
        vcpu.set_sregs(&self.sregs).map_err(kvm("SET_SREGS"))?;
        restore_xsave(vcpu, &self.xsave, xsave2_size)?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm("SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(kvm("SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic).map_err(kvm("SET_LAPIC"))?;
        for chunk in self.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).expect("at most KVM_MAX_MSR_ENTRIES");
            let set = vcpu.set_msrs(&msrs).map_err(kvm("SET_MSRS"))?;
            if set != chunk.len() {
                return Err(StateError::Msrs {
                    set,
                    wanted: chunk.len(),
                    first: chunk[set].index,
                });
            }
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm("SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

fn save_msrs(vcpu: &VcpuFd, msr_list: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut saved = Vec::with_capacity(msr_list.len());
    for chunk in msr_list.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<_> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("at most KVM_MAX_MSR_ENTRIES");
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm("GET_MSRS"))?;
        if read != chunk.len() {
            return Err(StateError::Msrs {
                set: read,
                wanted: chunk.len(),
                first: chunk[read],
            });
        }
        saved.extend_from_slice(msrs.as_slice());
    }
    Ok(saved)
}

fn save_xsave(vcpu: &VcpuFd, xsave2_size: usize) -> Result<Vec<u32>, StateError> {
    let extra = xsave_extra_words(xsave2_size);
    if extra == 0 {
        let xsave = vcpu.get_xsave().map_err(kvm("GET_XSAVE"))?;
        return Ok(xsave.region.to_vec());
    }
    let mut xsave = Xsave::new(extra).map_err(|_| StateError::Incompatible("XSAVE size".into()))?;
    // SAFETY: `xsave` was allocated with the extra words KVM_CAP_XSAVE2 asks for.
    unsafe { vcpu.get_xsave2(&mut xsave) }.map_err(kvm("GET_XSAVE2"))?;
    let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(xsave.as_slice());
    Ok(words)
}

fn restore_xsave(vcpu: &VcpuFd, words: &[u32], xsave2_size: usize) -> Result<(), StateError> {
    const REGION: usize = 1024;
    if words.len() < REGION {
        return Err(StateError::Incompatible(format!(
            "XSAVE area of {} words",
            words.len()
        )));
    }
    let extra = xsave_extra_words(xsave2_size);
    if words.len() - REGION > extra {
        return Err(StateError::Incompatible(format!(
            "XSAVE area of {} bytes, this host holds {}",
            words.len() * 4,
            (REGION + extra) * 4
        )));
    }
    if extra == 0 {
        let mut xsave = kvm_xsave::default();
        xsave.region.copy_from_slice(&words[..REGION]);
        // SAFETY: a complete kvm_xsave built from saved words; KVM validates its contents.
        return unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm("SET_XSAVE"));
    }
    let mut tail = words[REGION..].to_vec();
    tail.resize(extra, 0);
    let mut xsave =
        Xsave::from_entries(&tail).map_err(|_| StateError::Incompatible("XSAVE size".into()))?;
    // SAFETY: we only write the fixed-size legacy region of the FAM struct's header.
    let header: &mut kvm_xsave2 = unsafe { xsave.as_mut_fam_struct() };
    header.xsave.region.copy_from_slice(&words[..REGION]);
    // SAFETY: `xsave` holds the legacy region and `extra` words, the size KVM asked for.
    unsafe { vcpu.set_xsave2(&xsave) }.map_err(kvm("SET_XSAVE2"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_xsave_words() {
        assert_eq!(xsave_extra_words(0), 0);
        assert_eq!(xsave_extra_words(4096), 0);
        assert_eq!(xsave_extra_words(4096 + 8192), 2048);
        assert_eq!(xsave_extra_words(4097), 1);
    }

    #[test]
    fn state_round_trips_through_serde() {
        let state = VcpuState {
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 7,
                ..Default::default()
            }],
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 1234,
                ..Default::default()
            }],
            mp_state: kvm_mp_state { mp_state: 3 },
            regs: kvm_regs {
                rip: 0x1000,
                rax: 42,
                ..Default::default()
            },
            sregs: kvm_sregs {
                cr3: 0x9000,
                ..Default::default()
            },
            xsave: (0..1024 + 16).collect(),
            xcrs: kvm_xcrs::default(),
            debug_regs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            events: kvm_vcpu_events::default(),
            tsc_khz: Some(2_000_000),
        };
        let json = serde_json::to_string(&state).unwrap();
        let back: VcpuState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.regs.rip, 0x1000);
        assert_eq!(back.msrs[0].data, 1234);
        assert_eq!(back.xsave, state.xsave);
        assert_eq!(back.cpuid[0].eax, 7);
        assert_eq!(back.mp_state.mp_state, 3);
        assert_eq!(back.tsc_khz, Some(2_000_000));
    }
}
