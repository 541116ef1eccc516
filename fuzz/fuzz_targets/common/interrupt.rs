//! An interrupt line that goes nowhere: the fuzz targets that run virtio devices check what
//! the devices do with guest memory, not when they would interrupt.

use devices::virtio::Interrupt;

/// Accepts every signal and does nothing.
#[derive(Debug)]
pub struct NoInterrupt;

impl Interrupt for NoInterrupt {
    fn signal_used_queue(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn signal_config(&self) -> std::io::Result<()> {
        Ok(())
    }
}
