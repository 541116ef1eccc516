//! The `ioctl` request numbers the filters allow, computed from the kernel's encoding
//! (`_IO`, `_IOR`, `_IOW`, `_IOWR`) and kvm-bindings' struct sizes, so a filter names each
//! KVM request a thread makes instead of allowing KVM as a whole.

use std::mem::size_of;

use kvm_bindings::*;

/// The `ioctl` type byte of every KVM request (`KVMIO`).
pub const KVMIO: u64 = 0xAE;

const fn encode(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

const fn io(nr: u64) -> u64 {
    encode(0, nr, 0)
}

const fn ior(nr: u64, size: usize) -> u64 {
    encode(2, nr, size)
}

const fn iow(nr: u64, size: usize) -> u64 {
    encode(1, nr, size)
}

const fn iowr(nr: u64, size: usize) -> u64 {
    encode(3, nr, size)
}

/// What a vCPU thread asks of its own vCPU fd: run, and read every part of its state (for
/// snapshots and migrations; state is written only before the thread starts).
pub const VCPU: [u64; 13] = [
    io(0x80),                                // KVM_RUN
    ior(0x81, size_of::<kvm_regs>()),        // KVM_GET_REGS
    ior(0x83, size_of::<kvm_sregs>()),       // KVM_GET_SREGS
    iowr(0x88, size_of::<kvm_msrs>()),       // KVM_GET_MSRS
    ior(0x8e, size_of::<kvm_lapic_state>()), // KVM_GET_LAPIC
    iowr(0x91, size_of::<kvm_cpuid2>()),     // KVM_GET_CPUID2
    ior(0x98, size_of::<kvm_mp_state>()),    // KVM_GET_MP_STATE
    ior(0x9f, size_of::<kvm_vcpu_events>()), // KVM_GET_VCPU_EVENTS
    ior(0xa1, size_of::<kvm_debugregs>()),   // KVM_GET_DEBUGREGS
    io(0xa3),                                // KVM_GET_TSC_KHZ
    ior(0xa4, size_of::<kvm_xsave>()),       // KVM_GET_XSAVE
    ior(0xa6, size_of::<kvm_xcrs>()),        // KVM_GET_XCRS
    ior(0xcf, size_of::<kvm_xsave>()),       // KVM_GET_XSAVE2
];

/// The dirty log of the VM fd (harvested by the identity thread, migrations and snapshots).
pub const DIRTY_LOG: [u64; 2] = [
    iow(0x42, size_of::<kvm_dirty_log>()), // KVM_GET_DIRTY_LOG
    iowr(0xc0, size_of::<kvm_clear_dirty_log>()), // KVM_CLEAR_DIRTY_LOG
];

/// Reading the VM-wide state a snapshot or migration saves.
pub const VM_STATE: [u64; 3] = [
    iowr(0x62, size_of::<kvm_irqchip>()),   // KVM_GET_IRQCHIP
    ior(0x7c, size_of::<kvm_clock_data>()), // KVM_GET_CLOCK
    ior(0x9f, size_of::<kvm_pit_state2>()), // KVM_GET_PIT2
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers an strace of fabvm showed for these requests.
    #[test]
    fn numbers_match_the_kernel() {
        assert_eq!(VCPU[0], 0xae80);
        assert_eq!(VCPU[1], 0x8090_ae81);
        assert_eq!(VCPU[2], 0x8138_ae83);
        assert_eq!(VCPU[3], 0xc008_ae88);
        assert_eq!(VCPU[4], 0x8400_ae8e);
        assert_eq!(VCPU[5], 0xc008_ae91);
        assert_eq!(VCPU[6], 0x8004_ae98);
        assert_eq!(VCPU[7], 0x8040_ae9f);
        assert_eq!(VCPU[8], 0x8080_aea1);
        assert_eq!(VCPU[10], 0x9000_aea4);
        assert_eq!(VCPU[11], 0x8188_aea6);
        assert_eq!(DIRTY_LOG[0], 0x4010_ae42);
        assert_eq!(VM_STATE, [0xc208_ae62, 0x8030_ae7c, 0x8070_ae9f]);
    }
}
