//! A virtio-mmio transport's saved state: taken as a [`TransportState`] and rebuilt from one,
//! validated as untrusted input (a snapshot or a migration stream).

use super::*;

impl<D: VirtioDevice> MmioTransport<D> {
    /// The transport's saved state.
    pub fn transport_state(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            device_features: self.offered_features(),
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
        }
    }

    /// Rebuilds a transport around `device` from `state`, validated as untrusted input. An
    /// active device is activated again; the VMM then calls
    /// [`process_all_queues`](Self::process_all_queues) once the guest runs.
    pub fn restore(
        device: D,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        state: &TransportState,
    ) -> Result<Self, MmioError> {
        let mut t = Self::new(device, mem, interrupt)?;
        if state.device_type != t.device.device_type() {
            return Err(MmioError::DeviceType {
                expected: t.device.device_type(),
                found: state.device_type,
            });
        }
        if state.device_features != t.offered_features() {
            return Err(MmioError::Features {
                expected: t.offered_features(),
                found: state.device_features,
            });
        }
        if state.queues.len() != t.queues.len() {
            return Err(MmioError::QueueCount {
                expected: t.queues.len(),
                found: state.queues.len(),
            });
        }
        let base = state.status & !(NEEDS_RESET | FAILED);
        let features_ok = base & FEATURES_OK != 0;
        if (base != 0 && !LADDER.contains(&base))
            || state.interrupt_status & !(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG) != 0
            || (features_ok && !t.features_acceptable(state.driver_features))
        {
            return Err(MmioError::Status {
                status: state.status,
                interrupt: state.interrupt_status,
            });
        }
        for (index, (queue, saved)) in t.queues.iter_mut().zip(&state.queues).enumerate() {
            if saved.max_size != queue.max_size() {
                return Err(MmioError::Queue {
                    index,
                    reason: format!(
                        "maximum size {} is not the device's {}",
                        saved.max_size,
                        queue.max_size()
                    ),
                });
            }
            *queue = saved.to_queue().map_err(|e| MmioError::Queue {
                index,
                reason: e.to_string(),
            })?;
        }
        t.status = state.status;
        t.driver_features = state.driver_features;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.queue_sel = state.queue_sel;
        t.interrupt_status = state.interrupt_status;
        t.config_generation = state.config_generation;
        if base & DRIVER_OK != 0 && state.status & (NEEDS_RESET | FAILED) == 0 {
            if let Some(index) = t.invalid_queue() {
                return Err(MmioError::Queue {
                    index,
                    reason: "rings outside guest memory".into(),
                });
            }
            let features = t.driver_features;
            t.device.activate(
                features,
                &mut Queues {
                    mem: &t.mem,
                    queues: &mut t.queues,
                    metrics: &t.metrics,
                },
            )?;
            t.activated = true;
        }
        Ok(t)
    }
}
