//! Virtio entropy device (virtio 1.2, 5.4): one request queue whose device-writable buffers
//! the device fills with random bytes from the host's hardware generator.
//!
//! The device is only built over a real source of entropy ([`EntropySource`]); a source that
//! fails (RDRAND gave up) completes the request with nothing written (used length 0), which a
//! driver treats as no entropy now, never as zeros that look random.

use alloc::boxed::Box;

use super::{DeviceError, Queue, VirtioDevice, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1};
use crate::loader::GuestMemory;

/// Virtio device ID of an entropy source (5.4.1).
pub const DEVICE_ID: u16 = 4;
/// The request queue's maximum size.
pub const QUEUE_SIZE: u16 = 64;
const QUEUE_MAX_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Most bytes given per request: a driver asking for more gets this much (the used length says
/// so), which keeps the time an exit can take bounded.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// Fills a buffer with random bytes; false if it could not (the buffer's content is then
/// not to be used).
pub type EntropySource = Box<dyn FnMut(&mut [u8]) -> bool + Send>;

/// The entropy device.
pub struct Rng {
    source: EntropySource,
    /// Bytes handed to the guest, for the VM's report.
    bytes_given: u64,
}

impl Rng {
    /// A device drawing from `source`.
    pub fn new(source: EntropySource) -> Self {
        Rng { source, bytes_given: 0 }
    }

    /// Random bytes the guest received so far.
    pub fn bytes_given(&self) -> u64 {
        self.bytes_given
    }
}

impl VirtioDevice for Rng {
    fn device_id(&self) -> u16 {
        DEVICE_ID
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    /// No configuration (5.4.4).
    fn config(&self) -> &[u8] {
        &[]
    }

    fn activate(&mut self, _driver_features: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    fn reset(&mut self) {}

    fn report(&self) -> Option<alloc::string::String> {
        Some(alloc::format!("{} random bytes given", self.bytes_given))
    }

    fn process(&mut self, queue_index: u16, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<bool, DeviceError> {
        if queue_index != 0 {
            return Err(DeviceError::NoSuchQueue(queue_index));
        }
        let mut bytes = [0u8; MAX_REQUEST_BYTES];
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop(mem)? else { break };
            if !chain.readable().is_empty() {
                return Err(DeviceError::BadRequest {
                    head: chain.head(),
                    problem: "an entropy request has device-readable descriptors",
                });
            }
            let wanted = (chain.writable_len() as usize).min(MAX_REQUEST_BYTES);
            let buf = bytes.get_mut(..wanted).unwrap_or(&mut []);
            let written = if (self.source)(buf) { chain.write_at(mem, 0, buf)? } else { 0 };
            self.bytes_given += written as u64;
            queue.push_used(mem, chain.head(), written as u32)?;
        }
        Ok(queue.should_interrupt(mem)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_driver::{memory, readable, writable, Driver, DATA};
    use crate::loader::SliceMemory;

    const FEATURES: u64 = VIRTIO_F_VERSION_1;

    /// A source that counts up from 1, or always fails.
    fn counting(works: bool) -> EntropySource {
        let mut next = 0u8;
        Box::new(move |buf: &mut [u8]| {
            for byte in buf.iter_mut() {
                next = next.wrapping_add(1);
                *byte = next;
            }
            works
        })
    }

    #[test]
    fn requests_get_random_bytes_up_to_the_bound() {
        let mut bytes = memory();
        let mut mem = SliceMemory(&mut bytes);
        let mut driver = Driver::new(8);
        let mut queue = driver.queue(&mem, FEATURES);
        let mut rng = Rng::new(counting(true));
        driver.chain(&mut mem, &[writable(DATA, 16)]);
        driver.chain(&mut mem, &[writable(DATA + 0x100, 8), writable(DATA + 0x200, 8)]);
        driver.chain(&mut mem, &[writable(DATA + 0x1000, 0x8000)]);
        assert!(rng.process(0, &mut queue, &mut mem).unwrap());
        assert_eq!(driver.used(&mem, 0), (0, 16));
        assert_eq!(driver.used(&mem, 1), (1, 16), "split buffers are filled in order");
        assert_eq!(driver.used(&mem, 2).1, MAX_REQUEST_BYTES as u32, "a larger request gets the bound");
        let mut first = [0u8; 16];
        mem.read(DATA, &mut first).unwrap();
        assert_eq!(first, core::array::from_fn(|i| i as u8 + 1));
        let mut split = [0u8; 2];
        mem.read(DATA + 0x207, &mut split[..1]).unwrap();
        assert_eq!(split[0], 32, "the second buffer continues the request");
        assert_eq!(rng.bytes_given(), 32 + MAX_REQUEST_BYTES as u64);
    }

    #[test]
    fn a_failing_source_writes_nothing() {
        let mut bytes = memory();
        let mut mem = SliceMemory(&mut bytes);
        let mut driver = Driver::new(8);
        let mut queue = driver.queue(&mem, FEATURES);
        let mut rng = Rng::new(counting(false));
        mem.write(DATA, &[0xee; 16]).unwrap();
        driver.chain(&mut mem, &[writable(DATA, 16)]);
        rng.process(0, &mut queue, &mut mem).unwrap();
        assert_eq!(driver.used(&mem, 0), (0, 0));
        let mut untouched = [0u8; 16];
        mem.read(DATA, &mut untouched).unwrap();
        assert_eq!(untouched, [0xee; 16]);
        assert_eq!(rng.bytes_given(), 0);
    }

    #[test]
    fn readable_descriptors_and_other_queues_are_device_errors() {
        let mut bytes = memory();
        let mut mem = SliceMemory(&mut bytes);
        let mut driver = Driver::new(8);
        let mut queue = driver.queue(&mem, FEATURES);
        let mut rng = Rng::new(counting(true));
        driver.chain(&mut mem, &[readable(DATA, 4), writable(DATA + 0x100, 4)]);
        assert!(matches!(rng.process(0, &mut queue, &mut mem), Err(DeviceError::BadRequest { head: 0, .. })));
        assert_eq!(rng.process(1, &mut queue, &mut mem), Err(DeviceError::NoSuchQueue(1)));
    }
}
