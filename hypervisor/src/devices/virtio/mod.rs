//! Virtio 1.2 devices, independent of the transport that exposes them.
//!
//! The transport ([`pci::VirtioPci`], virtio over PCI with the "modern" capabilities) owns the common configuration: it keeps a
//! [`DeviceStatus`] for the status field and feature negotiation, and one [`Queue`] per queue of
//! the device, sized from [`VirtioDevice::queue_max_sizes`]. When the driver notifies a queue,
//! the transport calls [`VirtioDevice::process`] with that queue and guest memory; an error means
//! the device needs a reset ([`DeviceStatus::set_needs_reset`]). Only split virtqueues are
//! offered (no VIRTIO_F_RING_PACKED) and the device uses guest-physical addresses directly (no
//! VIRTIO_F_ACCESS_PLATFORM).

use core::fmt;

use crate::loader::{GuestMemory, MemError};

pub mod blk;
pub mod net;
pub mod pci;
pub mod queue;
pub mod rng;
#[cfg(test)]
mod test_driver;

pub use queue::{DescriptorChain, Queue, QueueError, Segment};

// Reserved feature bits (virtio 1.2, 6).
/// The driver may use indirect descriptor tables (2.7.5.3).
pub const VIRTIO_F_INDIRECT_DESC: u64 = 1 << 28;
/// `used_event` and `avail_event` suppress notifications (2.7.7, 2.7.10).
pub const VIRTIO_F_EVENT_IDX: u64 = 1 << 29;
/// Virtio 1.x rather than legacy; every device offers it and the driver must accept it (6.1).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Buffers are translated by a platform IOMMU. Not offered: addresses are guest-physical.
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
/// Packed virtqueues (2.8). Not offered: only split virtqueues are implemented.
pub const VIRTIO_F_RING_PACKED: u64 = 1 << 34;

// Device status bits (2.1).
/// The guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
/// The guest has a driver for the device.
pub const STATUS_DRIVER: u8 = 2;
/// The driver is set up and the device is live.
pub const STATUS_DRIVER_OK: u8 = 4;
/// Feature negotiation is complete.
pub const STATUS_FEATURES_OK: u8 = 8;
/// The device hit an error it can only leave through a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
/// The driver gave up on the device.
pub const STATUS_FAILED: u8 = 0x80;

/// Why a device stopped processing: the transport sets DEVICE_NEEDS_RESET.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceError {
    /// The virtqueue is malformed.
    Queue(QueueError),
    /// A descriptor chain is not a request of this device type (a malformed chain, not a request
    /// the device completes with an error status).
    BadRequest {
        /// Head of the chain.
        head: u16,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The driver notified a queue the device does not have.
    NoSuchQueue(u16),
    /// Guest memory refused an access to a buffer of a popped chain.
    Memory(MemError),
}

impl From<QueueError> for DeviceError {
    fn from(error: QueueError) -> Self {
        DeviceError::Queue(error)
    }
}

impl From<MemError> for DeviceError {
    fn from(error: MemError) -> Self {
        DeviceError::Memory(error)
    }
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceError::Queue(error) => write!(f, "virtqueue: {error}"),
            DeviceError::BadRequest { head, problem } => write!(f, "request in descriptor chain {head}: {problem}"),
            DeviceError::NoSuchQueue(index) => {
                write!(f, "notification for queue {index}, which the device does not have")
            }
            DeviceError::Memory(error) => write!(f, "request buffer: {error}"),
        }
    }
}

/// The device-type half of a virtio device; the transport drives it.
pub trait VirtioDevice {
    /// Virtio device ID (5, "Device Types"): 2 for a block device. The PCI device ID is
    /// 0x1040 plus this.
    fn device_id(&self) -> u16;

    /// Features offered, VIRTIO_F_VERSION_1 included.
    fn device_features(&self) -> u64;

    /// Maximum size of each queue; the device has as many queues as entries.
    fn queue_max_sizes(&self) -> &[u16];

    /// The device-specific configuration structure as the driver reads it (little-endian).
    fn config(&self) -> &[u8];

    /// Reads `width` (1, 2, 4 or 8) bytes of configuration at `offset`, zero-extended; `None` if
    /// the width is not one of those or the field is not inside the structure.
    fn read_config(&self, offset: u64, width: u8) -> Option<u64> {
        let len = match width {
            1 | 2 | 4 | 8 => usize::from(width),
            _ => return None,
        };
        let start = usize::try_from(offset).ok()?;
        let field = self.config().get(start..start.checked_add(len)?)?;
        let mut bytes = [0u8; 8];
        bytes.get_mut(..len)?.copy_from_slice(field);
        Some(u64::from_le_bytes(bytes))
    }

    /// Writes configuration; false if nothing there is writable (the default: no field is).
    fn write_config(&mut self, _offset: u64, _width: u8, _value: u64) -> bool {
        false
    }

    /// The driver set DRIVER_OK with these features (already checked against the offer).
    fn activate(&mut self, driver_features: u64) -> Result<(), DeviceError>;

    /// The driver reset the device: forget negotiated state. Backing data (a disk's contents)
    /// is not device state and stays.
    fn reset(&mut self);

    /// The driver notified queue `queue_index`: use what it made available, at most
    /// `queue.size()` chains per call (the transport calls again while more are available).
    /// Returns whether a used buffer notification (an interrupt) is due.
    fn process(&mut self, queue_index: u16, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<bool, DeviceError>;

    /// Queues with work that came from the device's side (frames arrived for a receive
    /// queue), one bit per queue index: the transport processes them as if the driver had
    /// notified. A device reports a queue only while it can make progress there, so that a
    /// queue without buffers does not keep the transport calling. The default: none.
    fn pending_queues(&self) -> u64 {
        0
    }

    /// What the device counted, for the VM's end report (the transport adds who it is).
    fn report(&self) -> Option<alloc::string::String> {
        None
    }
}

/// What a status write asks of the transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusChange {
    /// Nothing beyond storing the status.
    None,
    /// The driver wrote 0: reset the device and every queue.
    Reset,
    /// DRIVER_OK was accepted: activate the device and its queues with these features.
    Activate(u64),
}

/// The device status field and the feature negotiation it gates (2.1, 2.2, 3.1), as a transport
/// exposes them through 32-bit feature windows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceStatus {
    status: u8,
    offered: u64,
    driver_features: u64,
}

impl DeviceStatus {
    /// Status after reset, offering `device_features`.
    pub fn new(device_features: u64) -> Self {
        DeviceStatus { status: 0, offered: device_features, driver_features: 0 }
    }

    /// The status field as the driver reads it.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The features the driver accepted so far.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Offered features, bits `32 * select` to `32 * select + 31` (0 beyond bit 63).
    pub fn device_features_word(&self, select: u32) -> u32 {
        word(self.offered, select)
    }

    /// Accepted features, bits `32 * select` to `32 * select + 31`.
    pub fn driver_features_word(&self, select: u32) -> u32 {
        word(self.driver_features, select)
    }

    /// The driver writes accepted features, 32 bits at a time. Ignored once FEATURES_OK is set
    /// (the negotiation is over) and for words beyond bit 63; false if ignored.
    pub fn set_driver_features_word(&mut self, select: u32, value: u32) -> bool {
        if self.status & STATUS_FEATURES_OK != 0 || select > 1 {
            return false;
        }
        let shift = 32 * select;
        self.driver_features = (self.driver_features & !(0xffff_ffff_u64 << shift)) | (u64::from(value) << shift);
        true
    }

    /// The driver writes the status field. 0 resets. Otherwise bits only accumulate (2.1.1: the
    /// driver never clears one), DEVICE_NEEDS_RESET stays the device's, FEATURES_OK is refused
    /// for features not offered or without VIRTIO_F_VERSION_1 (2.2.2, 6.2), and DRIVER_OK is
    /// refused before FEATURES_OK. A refused bit reads back clear, which is how the driver
    /// learns of it (3.1.1).
    pub fn write_status(&mut self, value: u8) -> StatusChange {
        if value == 0 {
            *self = DeviceStatus::new(self.offered);
            return StatusChange::Reset;
        }
        let mut new = self.status | (value & !STATUS_DEVICE_NEEDS_RESET);
        let added = new & !self.status;
        if added & STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            new &= !STATUS_FEATURES_OK;
        }
        if added & STATUS_DRIVER_OK != 0 && new & STATUS_FEATURES_OK == 0 {
            new &= !STATUS_DRIVER_OK;
        }
        self.status = new;
        if added & new & STATUS_DRIVER_OK != 0 {
            StatusChange::Activate(self.driver_features)
        } else {
            StatusChange::None
        }
    }

    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.offered == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    /// Marks the device as needing a reset (2.1.2). Returns whether the driver is live
    /// (DRIVER_OK), in which case the transport must also send a configuration change
    /// notification.
    pub fn set_needs_reset(&mut self) -> bool {
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        self.status & STATUS_DRIVER_OK != 0
    }

    /// Whether the device may use buffers: DRIVER_OK is set (2.1.2) and neither
    /// DEVICE_NEEDS_RESET nor FAILED.
    pub fn is_live(&self) -> bool {
        self.status & (STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED) == STATUS_DRIVER_OK
    }
}

/// Bits `32 * select` to `32 * select + 31` of `features`.
fn word(features: u64, select: u32) -> u32 {
    match select {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    const OFFERED: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | 1 << 9;

    /// Accepts `features` and asks for FEATURES_OK; returns the status read back.
    fn negotiate(status: &mut DeviceStatus, features: u64) -> u8 {
        status.write_status(STATUS_ACKNOWLEDGE);
        status.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert!(status.set_driver_features_word(0, features as u32));
        assert!(status.set_driver_features_word(1, (features >> 32) as u32));
        assert_eq!(status.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK), StatusChange::None);
        status.status()
    }

    #[test]
    fn features_ok_needs_version_1_and_only_offered_features() {
        let ready = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        let mut status = DeviceStatus::new(OFFERED);
        assert_eq!(negotiate(&mut status, VIRTIO_F_VERSION_1 | 1 << 9), ready);
        assert_eq!(status.driver_features(), VIRTIO_F_VERSION_1 | 1 << 9);

        let mut status = DeviceStatus::new(OFFERED);
        assert_eq!(negotiate(&mut status, VIRTIO_F_EVENT_IDX), ready & !STATUS_FEATURES_OK, "no VERSION_1");
        let mut status = DeviceStatus::new(OFFERED);
        assert_eq!(
            negotiate(&mut status, VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC),
            ready & !STATUS_FEATURES_OK,
            "INDIRECT_DESC was not offered"
        );
        // The driver may fix its selection and try again.
        assert_eq!(negotiate(&mut status, VIRTIO_F_VERSION_1), ready);
    }

    #[test]
    fn features_are_read_and_written_in_32_bit_words() {
        let mut status = DeviceStatus::new(OFFERED);
        assert_eq!(status.device_features_word(0), 1 << 29 | 1 << 9);
        assert_eq!(status.device_features_word(1), 1);
        assert_eq!(status.device_features_word(2), 0);
        assert!(status.set_driver_features_word(1, 1));
        assert!(status.set_driver_features_word(0, 1 << 9));
        assert!(!status.set_driver_features_word(2, 1), "there are 64 feature bits");
        assert_eq!((status.driver_features_word(0), status.driver_features_word(1)), (1 << 9, 1));
        assert!(status.set_driver_features_word(0, 0));
        assert_eq!(status.driver_features(), VIRTIO_F_VERSION_1, "a word replaces only its half");
        status.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert!(!status.set_driver_features_word(0, 1 << 29), "negotiation is over");
        assert_eq!(status.driver_features(), VIRTIO_F_VERSION_1);
    }

    #[test]
    fn driver_ok_activates_only_after_features_ok() {
        let mut status = DeviceStatus::new(OFFERED);
        status.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert_eq!(status.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK), StatusChange::None);
        assert_eq!(status.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert!(!status.is_live());

        negotiate(&mut status, VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX);
        let all = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        assert_eq!(status.write_status(all), StatusChange::Activate(VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX));
        assert!(status.is_live());
        assert_eq!(status.write_status(all), StatusChange::None, "activated once");
        assert_eq!(status.write_status(STATUS_ACKNOWLEDGE), StatusChange::None);
        assert_eq!(status.status(), all, "bits are only cleared by a reset");
    }

    #[test]
    fn needs_reset_is_the_devices_bit_until_the_driver_resets() {
        let mut status = DeviceStatus::new(OFFERED);
        assert!(!status.set_needs_reset(), "not live: no configuration change notification");
        assert_eq!(status.write_status(0), StatusChange::Reset);
        assert_eq!(status.status(), 0);
        assert_eq!(status.write_status(STATUS_DEVICE_NEEDS_RESET | STATUS_ACKNOWLEDGE), StatusChange::None);
        assert_eq!(status.status(), STATUS_ACKNOWLEDGE, "the driver cannot set DEVICE_NEEDS_RESET");

        negotiate(&mut status, VIRTIO_F_VERSION_1);
        let live = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        status.write_status(live);
        assert!(status.set_needs_reset());
        assert!(!status.is_live());
        status.write_status(live);
        assert_eq!(status.status(), live | STATUS_DEVICE_NEEDS_RESET, "writing the status back keeps it");
        assert_eq!(status.write_status(0), StatusChange::Reset);
        assert_eq!((status.status(), status.driver_features()), (0, 0));
        assert_eq!(status.device_features_word(1), 1, "the offer survives a reset");

        negotiate(&mut status, VIRTIO_F_VERSION_1);
        status.write_status(live | STATUS_FAILED);
        assert!(!status.is_live(), "the driver gave up");
    }

    struct Fixed([u8; 10]);

    impl VirtioDevice for Fixed {
        fn device_id(&self) -> u16 {
            0x7f
        }
        fn device_features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[]
        }
        fn config(&self) -> &[u8] {
            &self.0
        }
        fn activate(&mut self, _driver_features: u64) -> Result<(), DeviceError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn process(&mut self, queue: u16, _: &mut Queue, _: &mut dyn GuestMemory) -> Result<bool, DeviceError> {
            Err(DeviceError::NoSuchQueue(queue))
        }
    }

    #[test]
    fn configuration_reads_are_little_endian_and_bounded() {
        let device = Fixed([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(device.read_config(0, 1), Some(1));
        assert_eq!(device.read_config(1, 2), Some(0x0302));
        assert_eq!(device.read_config(4, 4), Some(0x0807_0605));
        assert_eq!(device.read_config(2, 8), Some(0x0a09_0807_0605_0403));
        assert_eq!(device.read_config(3, 8), None, "runs past the end");
        assert_eq!(device.read_config(10, 1), None);
        assert_eq!(device.read_config(0, 3), None, "no such width");
        assert_eq!(device.read_config(0, 0), None);
        assert_eq!(device.read_config(u64::MAX, 1), None);
        let mut device = device;
        assert!(!device.write_config(0, 1, 0xff));
        assert_eq!(device.read_config(0, 1), Some(1));
    }

    #[test]
    fn device_errors_say_what_went_wrong() {
        let queue = DeviceError::from(QueueError::HeadOutOfRange { head: 9, size: 8 });
        assert_eq!(queue.to_string(), "virtqueue: available ring names descriptor 9, beyond the queue size 8");
        let bad = DeviceError::BadRequest { head: 3, problem: "there is no device-writable byte for the status" };
        assert_eq!(bad.to_string(), "request in descriptor chain 3: there is no device-writable byte for the status");
        assert_eq!(DeviceError::NoSuchQueue(2).to_string(), "notification for queue 2, which the device does not have");
        let memory = DeviceError::from(MemError::OutOfRange { gpa: 0x10, len: 4 });
        assert_eq!(memory.to_string(), "request buffer: guest-physical access at 0x10+0x4 is outside guest memory");
    }
}
