//! The VM-wide KVM state (PIC, IOAPIC, PIT, kvmclock) as a plain serializable type, saved
//! while every vCPU is paused and restored into a new VM before its vCPUs are restored.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// Errors from saving or restoring VM state.
#[derive(Debug, thiserror::Error)]
#[error("KVM {what} failed: {source}")]
pub struct VmStateError {
    what: &'static str,
    source: kvm_ioctls::Error,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError { what, source }
}

/// In-kernel devices and the guest clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

fn chip(id: u32) -> kvm_irqchip {
    kvm_irqchip {
        chip_id: id,
        ..Default::default()
    }
}

impl VmState {
    /// Saves the VM's in-kernel devices and clock (vCPUs paused).
    pub fn save(vm: &VmFd) -> Result<Self, VmStateError> {
        let mut pic_master = chip(KVM_IRQCHIP_PIC_MASTER);
        vm.get_irqchip(&mut pic_master)
            .map_err(kvm("GET_IRQCHIP (PIC master)"))?;
        let mut pic_slave = chip(KVM_IRQCHIP_PIC_SLAVE);
        vm.get_irqchip(&mut pic_slave)
            .map_err(kvm("GET_IRQCHIP (PIC slave)"))?;
        let mut ioapic = chip(KVM_IRQCHIP_IOAPIC);
        vm.get_irqchip(&mut ioapic)
            .map_err(kvm("GET_IRQCHIP (IOAPIC)"))?;
        let pit = vm.get_pit2().map_err(kvm("GET_PIT2"))?;
        let clock = vm.get_clock().map_err(kvm("GET_CLOCK"))?;
        Ok(Self {
            pic_master,
            pic_slave,
            ioapic,
            pit,
            clock,
        })
    }

    /// Restores into a VM whose irqchip and PIT exist and whose vCPUs are not yet restored.
    /// The clock is set without the host-specific flags (TSC_STABLE, REALTIME, HOST_TSC):
    /// KVM rejects them on SET, and the guest continues from the saved clock value.
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmStateError> {
        vm.set_pit2(&self.pit).map_err(kvm("SET_PIT2"))?;
        let clock = kvm_clock_data {
            flags: 0,
            ..self.clock
        };
        vm.set_clock(&clock).map_err(kvm("SET_CLOCK"))?;
        vm.set_irqchip(&self.pic_master)
            .map_err(kvm("SET_IRQCHIP (PIC master)"))?;
        vm.set_irqchip(&self.pic_slave)
            .map_err(kvm("SET_IRQCHIP (PIC slave)"))?;
        vm.set_irqchip(&self.ioapic)
            .map_err(kvm("SET_IRQCHIP (IOAPIC)"))?;
        Ok(())
    }
}
