//! Virtio over PCI, the "modern" interface only (virtio 1.2, 4.1): a PCI function whose
//! vendor-specific capabilities point into one memory BAR holding the common configuration, the
//! ISR status, the device configuration and the queue notification addresses, with MSI-X for
//! interrupts; while MSI-X is off, one MSI message or INTx, with the ISR saying why (4.1.4.5).
//!
//! A notification costs the driver one exit: the write to the notify address only marks the
//! queue, and the device does the queue's work right after, with guest memory
//! ([`PciFunction::run_dma`]). A queue the driver sets up wrongly, or a malformed descriptor
//! chain, puts the device into DEVICE_NEEDS_RESET (2.1.2) with a configuration change
//! interrupt and a log line naming the VM and the device; nothing else in the VM is touched.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use super::{DeviceStatus, Queue, StatusChange, VirtioDevice};
use crate::devices::pci::config::{self, ConfigSpace, Identity, COMMAND_INTX_DISABLE, STATUS_INTERRUPT};
use crate::devices::pci::msi::Msi;
use crate::devices::pci::msix::{Msix, NO_VECTOR};
use crate::devices::pci::PciFunction;
use crate::devices::{ones, Events};
use crate::loader::GuestMemory;

/// Red Hat's PCI vendor ID, which virtio devices use (4.1.2).
pub const VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device ID (4.1.2.1).
pub const DEVICE_ID_BASE: u16 = 0x1040;
/// Revision 1: a modern-only device (4.1.2.1).
const REVISION: u8 = 1;
/// Subsystem ID, as QEMU gives it.
const SUBSYSTEM_ID: u16 = 0x1100;

/// Vendor-specific capability ID, the type of every virtio capability (4.1.4).
const CAPABILITY_VENDOR: u8 = 0x09;
// cfg_type values (4.1.4).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
/// Bytes of `struct virtio_pci_cap`.
const CAP_LEN: u8 = 16;

/// The one BAR: its number and size.
const BAR: u8 = 0;
const BAR_SIZE: u64 = 0x8000;
// Where each structure is in the BAR, a page each.
const COMMON_OFFSET: u64 = 0x0000;
/// `struct virtio_pci_common_cfg` up to `queue_device` (no NOTIF_CONFIG_DATA, no RING_RESET).
const COMMON_LEN: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notify addresses.
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u32 = 0x4000;
const MSIX_PBA_OFFSET: u32 = 0x5000;
/// Queues a device may have: one bit each in the notified set.
pub const MAX_QUEUES: usize = 64;

// ISR status bits (4.1.4.5).
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Device errors logged per device; later ones are only counted.
const LOGGED_ERRORS: u32 = 4;

/// A virtio device on the PCI bus.
pub struct VirtioPci<D: VirtioDevice> {
    device: D,
    /// Who the log lines are about: "vm NAME: virtio-blk NAME".
    label: String,
    /// Guest RAM size: rings must lie inside it.
    memory_size: u64,
    space: ConfigSpace,
    msix: Msix,
    msi: Msi,
    /// Offset of the PCI configuration access capability.
    pci_cfg_cap: usize,
    status: DeviceStatus,
    queues: Vec<Queue>,
    queue_vectors: Vec<u16>,
    config_vector: u16,
    device_feature_select: u32,
    driver_feature_select: u32,
    queue_select: u16,
    isr: u8,
    /// Queues notified (or with work left) since the device last looked (bit = queue).
    notified: u64,
    intx_gsi: Option<u8>,
    intx_asserted: bool,
    slot: u8,
    errors: u32,
}

/// The PCI class a device type reports (base class, subclass, interface).
fn class_of(device_id: u16) -> u32 {
    match device_id {
        1 => 0x02_00_00, // network controller, Ethernet
        2 => 0x01_80_00, // mass storage, other
        3 => 0x07_80_00, // communication, other
        _ => 0xff_00_00, // unassigned class
    }
}

/// The device type's name in logs.
pub fn type_name(device_id: u16) -> &'static str {
    match device_id {
        1 => "virtio-net",
        2 => "virtio-blk",
        3 => "virtio-console",
        4 => "virtio-rng",
        _ => "virtio",
    }
}

impl<D: VirtioDevice> VirtioPci<D> {
    /// `device` as a PCI function of VM `vm` (for log lines), known there as `name`, in guest
    /// RAM of `memory_size` bytes. `None` if the device has more queues than the transport
    /// supports.
    pub fn new(device: D, vm: &str, name: &str, memory_size: u64) -> Option<Self> {
        let device_id = device.device_id();
        let queue_count = device.queue_max_sizes().len();
        if queue_count > MAX_QUEUES {
            return None;
        }
        let queues = device.queue_max_sizes().iter().map(|&max| Queue::new(max)).collect::<Result<Vec<_>, _>>().ok()?;
        let identity = Identity {
            vendor: VENDOR_ID,
            device: DEVICE_ID_BASE + device_id,
            revision: REVISION,
            class: class_of(device_id),
            subsystem_vendor: VENDOR_ID,
            subsystem: SUBSYSTEM_ID,
        };
        let mut space = ConfigSpace::new(identity, 1);
        space.add_memory_bar(usize::from(BAR), BAR_SIZE, false).then_some(())?;
        // One vector per queue and one for configuration changes.
        let msix = Msix::new(&mut space, queue_count as u16 + 1, BAR, MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET)?;
        let msi = Msi::new(&mut space)?;
        let device_len = device.config().len() as u32;
        virtio_cap(&mut space, CAP_COMMON, COMMON_OFFSET, COMMON_LEN as u32, &[])?;
        let notify_len = (queue_count as u32).max(1) * NOTIFY_MULTIPLIER;
        virtio_cap(&mut space, CAP_NOTIFY, NOTIFY_OFFSET, notify_len, &NOTIFY_MULTIPLIER.to_le_bytes())?;
        virtio_cap(&mut space, CAP_ISR, ISR_OFFSET, 1, &[])?;
        if device_len > 0 {
            virtio_cap(&mut space, CAP_DEVICE, DEVICE_OFFSET, device_len, &[])?;
        }
        // The window the driver may use to reach the BAR through configuration space: its bar,
        // offset and length fields are the driver's (4.1.4.9).
        let pci_cfg_cap = virtio_cap(&mut space, CAP_PCI_CFG, 0, 0, &[0; 4])?;
        space.set_writable(pci_cfg_cap + 4, &[0xff]);
        space.set_writable(pci_cfg_cap + 8, &[0xff; 8]);
        Some(VirtioPci {
            label: format!("vm {vm}: {} {name}", type_name(device_id)),
            memory_size,
            space,
            msix,
            msi,
            pci_cfg_cap,
            status: DeviceStatus::new(device.device_features()),
            queue_vectors: vec![NO_VECTOR; queue_count],
            queues,
            config_vector: NO_VECTOR,
            device_feature_select: 0,
            driver_feature_select: 0,
            queue_select: 0,
            isr: 0,
            notified: 0,
            intx_gsi: None,
            intx_asserted: false,
            slot: 0,
            errors: 0,
            device,
        })
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The status field as the driver sees it.
    pub fn status(&self) -> u8 {
        self.status.status()
    }

    /// Device errors so far (each one needed a reset).
    pub fn errors(&self) -> u32 {
        self.errors
    }

    /// A vector the driver names: kept if the table has it, else NO_VECTOR, which is how the
    /// driver learns the device could not take it (4.1.5.1.2).
    fn vector_or_none(&self, vector: u16) -> u16 {
        if vector < self.msix.vectors() {
            vector
        } else {
            NO_VECTOR
        }
    }

    /// Interrupts the driver: through MSI-X `vector` when MSI-X is on, else through the MSI
    /// message or INTx, the ISR telling the driver why.
    fn interrupt(&mut self, vector: u16, isr_bit: u8, events: &mut Events) {
        self.isr |= isr_bit;
        if self.msix.enabled(&self.space) {
            self.msix.signal(&self.space, vector, events);
        } else if !self.msi.signal(&self.space, events) {
            self.update_intx(events);
        }
    }

    /// Drives INTx: asserted while the ISR has a bit set, MSI-X and MSI are off and INTx is
    /// allowed.
    fn update_intx(&mut self, events: &mut Events) {
        let Some(gsi) = self.intx_gsi else { return };
        let assert = self.isr != 0
            && !self.msix.enabled(&self.space)
            && !self.msi.enabled(&self.space)
            && self.space.command() & COMMAND_INTX_DISABLE == 0;
        if assert != self.intx_asserted {
            self.intx_asserted = assert;
            events.irq_lines.push((gsi, assert));
            let status = self.space.word(config::STATUS);
            let status = if assert { status | STATUS_INTERRUPT } else { status & !STATUS_INTERRUPT };
            self.space.set_word(config::STATUS, status);
        }
    }

    /// The device failed: DEVICE_NEEDS_RESET, a configuration change interrupt if the driver is
    /// live, and a log line (the first few per device).
    fn fail(&mut self, error: &dyn core::fmt::Display, events: &mut Events) {
        self.errors = self.errors.saturating_add(1);
        if self.errors <= LOGGED_ERRORS {
            log::warn!("{} (00:{:02x}.0): {error}; the device needs a reset", self.label, self.slot);
        }
        if self.errors == LOGGED_ERRORS {
            log::warn!("{}: further device errors are not reported", self.label);
        }
        if self.status.set_needs_reset() {
            self.interrupt(self.config_vector, ISR_CONFIG, events);
        }
    }

    /// Back to the state after reset (the driver wrote 0 to the status): queues, vectors,
    /// selectors and ISR; the MSI-X table is the PCI function's and stays.
    fn reset(&mut self, events: &mut Events) {
        self.device.reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.queue_vectors.fill(NO_VECTOR);
        self.config_vector = NO_VECTOR;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.isr = 0;
        self.notified = 0;
        self.update_intx(events);
    }

    fn write_status(&mut self, value: u8, events: &mut Events) {
        match self.status.write_status(value) {
            StatusChange::None => {}
            StatusChange::Reset => self.reset(events),
            StatusChange::Activate(features) => {
                for queue in &mut self.queues {
                    queue.set_features(features);
                }
                if let Err(error) = self.device.activate(features) {
                    self.fail(&error, events);
                }
            }
        }
    }

    /// `struct virtio_pci_common_cfg` as the driver reads it now (4.1.4.3).
    fn common(&self) -> [u8; COMMON_LEN as usize] {
        let mut c = [0u8; COMMON_LEN as usize];
        let queue = self.queues.get(usize::from(self.queue_select));
        let mut put = |offset: usize, bytes: &[u8]| c[offset..offset + bytes.len()].copy_from_slice(bytes);
        put(0x00, &self.device_feature_select.to_le_bytes());
        put(0x04, &self.status.device_features_word(self.device_feature_select).to_le_bytes());
        put(0x08, &self.driver_feature_select.to_le_bytes());
        put(0x0c, &self.status.driver_features_word(self.driver_feature_select).to_le_bytes());
        put(0x10, &self.config_vector.to_le_bytes());
        put(0x12, &(self.queues.len() as u16).to_le_bytes());
        put(0x14, &[self.status.status(), 0]);
        put(0x16, &self.queue_select.to_le_bytes());
        // A queue that does not exist reads size 0 (4.1.4.3.1).
        put(0x18, &queue.map_or(0, Queue::size).to_le_bytes());
        let vector = self.queue_vectors.get(usize::from(self.queue_select)).copied().unwrap_or(NO_VECTOR);
        put(0x1a, &vector.to_le_bytes());
        put(0x1c, &u16::from(queue.is_some_and(Queue::is_enabled)).to_le_bytes());
        // Queue n is notified at NOTIFY_OFFSET + n * NOTIFY_MULTIPLIER.
        put(0x1e, &self.queue_select.to_le_bytes());
        put(0x20, &queue.map_or(0, Queue::desc_table).to_le_bytes());
        put(0x28, &queue.map_or(0, Queue::avail_ring).to_le_bytes());
        put(0x30, &queue.map_or(0, Queue::used_ring).to_le_bytes());
        c
    }

    fn common_write(&mut self, offset: u64, size: u8, value: u64, events: &mut Events) {
        let selected = usize::from(self.queue_select);
        match (offset, size) {
            (0x00, 4) => self.device_feature_select = value as u32,
            (0x08, 4) => self.driver_feature_select = value as u32,
            (0x0c, 4) => {
                self.status.set_driver_features_word(self.driver_feature_select, value as u32);
            }
            (0x10, 2) => self.config_vector = self.vector_or_none(value as u16),
            (0x14, 1) => self.write_status(value as u8, events),
            (0x16, 2) => self.queue_select = value as u16,
            (0x18, 2) => {
                // A size that is not a power of two within the maximum is not taken; the
                // driver sees the old size when it reads back.
                if let Some(queue) = self.queues.get_mut(selected) {
                    let _ = queue.set_size(value as u16);
                }
            }
            (0x1a, 2) => {
                let vector = self.vector_or_none(value as u16);
                if let Some(slot) = self.queue_vectors.get_mut(selected) {
                    *slot = vector;
                }
            }
            (0x1c, 2) if value == 1 => {
                let memory_size = self.memory_size;
                let enabled = match self.queues.get_mut(selected) {
                    Some(queue) if !queue.is_enabled() => queue.enable(memory_size),
                    _ => Ok(()),
                };
                if let Err(error) = enabled {
                    self.fail(&format_args!("queue {selected}: {error}"), events);
                }
            }
            (0x20..=0x37, 4 | 8) if offset.is_multiple_of(u64::from(size)) => {
                self.queue_address_write(selected, offset, size, value)
            }
            // Read-only fields, and accesses that are not a field's width.
            _ => {}
        }
    }

    /// A write of a ring address or of its low or high half.
    fn queue_address_write(&mut self, selected: usize, offset: u64, size: u8, value: u64) {
        let Some(queue) = self.queues.get_mut(selected) else { return };
        let field = offset & !7;
        let current = match field {
            0x20 => queue.desc_table(),
            0x28 => queue.avail_ring(),
            _ => queue.used_ring(),
        };
        let new = match (size, offset & 4) {
            (8, _) => value,
            (_, 0) => (current & !0xffff_ffff) | (value & 0xffff_ffff),
            _ => (current & 0xffff_ffff) | (value << 32),
        };
        // Changing an enabled queue is the driver's error; the queue keeps its rings.
        let _ = match field {
            0x20 => queue.set_desc_table(new),
            0x28 => queue.set_avail_ring(new),
            _ => queue.set_used_ring(new),
        };
    }

    fn region_read(&mut self, offset: u64, size: u8, events: &mut Events) -> u64 {
        match offset {
            o if o < COMMON_LEN => read_le(&self.common(), o, size),
            ISR_OFFSET => {
                // Reading the ISR clears it and de-asserts INTx (4.1.4.5).
                let isr = self.isr;
                self.isr = 0;
                self.update_intx(events);
                u64::from(isr)
            }
            o if (DEVICE_OFFSET..NOTIFY_OFFSET).contains(&o) => {
                self.device.read_config(o - DEVICE_OFFSET, size).unwrap_or(ones(size))
            }
            o if (MSIX_TABLE_OFFSET as u64..MSIX_PBA_OFFSET as u64).contains(&o) => {
                self.msix.table_read(o - u64::from(MSIX_TABLE_OFFSET), size)
            }
            o if o >= u64::from(MSIX_PBA_OFFSET) => self.msix.pba_read(o - u64::from(MSIX_PBA_OFFSET), size),
            _ => ones(size),
        }
    }

    fn region_write(&mut self, offset: u64, size: u8, value: u64, events: &mut Events) {
        match offset {
            o if o < COMMON_LEN => self.common_write(o, size, value, events),
            o if (DEVICE_OFFSET..NOTIFY_OFFSET).contains(&o) => {
                // Writable fields only change by the driver's own writes, so the configuration
                // generation stays 0 (4.1.4.3.1).
                self.device.write_config(o - DEVICE_OFFSET, size, value);
            }
            o if (NOTIFY_OFFSET..u64::from(MSIX_TABLE_OFFSET)).contains(&o) => {
                let index = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER);
                if (index as usize) < self.queues.len() {
                    self.notified |= 1 << index;
                    events.dma = true;
                }
            }
            o if (MSIX_TABLE_OFFSET as u64..MSIX_PBA_OFFSET as u64).contains(&o) => {
                self.msix.table_write(&self.space, o - u64::from(MSIX_TABLE_OFFSET), size, value, events)
            }
            // The ISR and the pending bits are read-only.
            _ => {}
        }
    }

    /// The BAR access the PCI configuration access capability describes, if it is a valid one
    /// (4.1.4.9.1: a length of 1, 2 or 4 at an offset aligned to it, in our BAR).
    fn pci_cfg_window(&self) -> Option<(u64, u8)> {
        let cap = self.pci_cfg_cap;
        let bar = self.space.byte(cap + 4);
        let offset = u64::from(self.space.dword(cap + 8));
        let length = self.space.dword(cap + 12);
        let size = match length {
            1 | 2 | 4 => length as u8,
            _ => return None,
        };
        (bar == BAR && offset.is_multiple_of(u64::from(size)) && offset + u64::from(size) <= BAR_SIZE)
            .then_some((offset, size))
    }

    /// Whether a configuration access at `offset` of `size` bytes touches `pci_cfg_data`.
    fn is_pci_cfg_data(&self, offset: usize, size: u8) -> bool {
        let data = self.pci_cfg_cap + 16;
        offset < data + 4 && offset + usize::from(size) > data
    }
}

/// Adds a `struct virtio_pci_cap` (with `extra` bytes after it) for structure `cfg_type` at
/// `offset` in the BAR; returns the capability's offset.
fn virtio_cap(space: &mut ConfigSpace, cfg_type: u8, offset: u64, length: u32, extra: &[u8]) -> Option<usize> {
    let mut body = Vec::with_capacity(14 + extra.len());
    body.extend_from_slice(&[CAP_LEN + extra.len() as u8, cfg_type, BAR, 0, 0, 0]);
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&length.to_le_bytes());
    body.extend_from_slice(extra);
    space.add_capability(CAPABILITY_VENDOR, &body)
}

/// `size` little-endian bytes of `bytes` at `offset`; bytes outside float high.
fn read_le(bytes: &[u8], offset: u64, size: u8) -> u64 {
    (0..u64::from(size.min(8))).fold(0, |value, i| {
        let byte = usize::try_from(offset + i).ok().and_then(|at| bytes.get(at)).copied().unwrap_or(0xff);
        value | u64::from(byte) << (8 * i)
    })
}

impl<D: VirtioDevice> PciFunction for VirtioPci<D> {
    fn name(&self) -> &'static str {
        type_name(self.device.device_id())
    }

    fn config(&self) -> &ConfigSpace {
        &self.space
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.space
    }

    fn attach(&mut self, slot: u8, intx_gsi: u8) {
        self.slot = slot;
        self.intx_gsi = Some(intx_gsi);
    }

    fn config_read(&mut self, offset: usize, size: u8, events: &mut Events) -> u32 {
        if self.is_pci_cfg_data(offset, size) {
            return match self.pci_cfg_window() {
                Some((bar_offset, width)) => self.region_read(bar_offset, width, events) as u32,
                None => ones(size) as u32,
            };
        }
        self.space.read(offset, size)
    }

    fn config_write(&mut self, offset: usize, size: u8, value: u32, events: &mut Events) {
        if self.is_pci_cfg_data(offset, size) {
            if let Some((bar_offset, width)) = self.pci_cfg_window() {
                self.region_write(bar_offset, width, u64::from(value) & ones(width), events);
            }
            return;
        }
        self.space.write(offset, size, value);
        // Enabling MSI-X, lifting the function mask or disabling INTx take effect now.
        self.msix.deliver_unmasked(&self.space, events);
        self.update_intx(events);
    }

    fn bar_read(&mut self, bar: usize, offset: u64, size: u8, _now_ns: u64, events: &mut Events) -> u64 {
        if bar != usize::from(BAR) {
            return ones(size);
        }
        self.region_read(offset, size, events)
    }

    fn bar_write(&mut self, bar: usize, offset: u64, size: u8, value: u64, _now_ns: u64, events: &mut Events) {
        if bar == usize::from(BAR) {
            self.region_write(offset, size, value, events);
        }
    }

    fn run_dma(&mut self, memory: &mut dyn GuestMemory, _now_ns: u64, events: &mut Events) {
        let notified = core::mem::take(&mut self.notified);
        // Before DRIVER_OK, or once it needs a reset, the device uses no buffers (2.1.2).
        if !self.status.is_live() {
            return;
        }
        // Work from the device's side too: frames that arrived for a receive queue.
        let notified = notified | self.device.pending_queues();
        for index in (0..self.queues.len()).filter(|&i| notified & (1 << i) != 0) {
            let queue = &mut self.queues[index];
            let taken = queue.taken();
            match self.device.process(index as u16, queue, memory) {
                Ok(interrupt) => {
                    // Work left (the device takes a bounded amount per call): again soon. Only
                    // while it makes progress: a receive queue has buffers available all the
                    // time, and its frames come through `pending_queues`.
                    if queue.taken() != taken && queue.has_available(memory).unwrap_or(false) {
                        self.notified |= 1 << index;
                    }
                    if interrupt {
                        self.interrupt(self.queue_vectors[index], ISR_QUEUE, events);
                    }
                }
                Err(error) => {
                    self.fail(&format_args!("queue {index}: {error}"), events);
                    return;
                }
            }
        }
    }

    fn dma_pending(&self) -> bool {
        self.notified != 0 || (self.status.is_live() && self.device.pending_queues() != 0)
    }

    fn report(&self) -> Option<String> {
        let mut parts: Vec<String> = self.device.report().into_iter().collect();
        if self.errors > 0 {
            parts.push(format!("{} device errors (each needed a reset)", self.errors));
        }
        (!parts.is_empty()).then(|| format!("{}: {}", self.label, parts.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::{intx_gsi, PciHost, CONFIG_ADDRESS, CONFIG_DATA, MMIO_WINDOW_BASE};
    use crate::devices::virtio::blk::{Block, RamOverlay};
    use crate::devices::virtio::test_driver::{memory, readable, writable, Driver, AVAIL, DATA, DESC, MEM_SIZE, USED};
    use crate::devices::virtio::{
        STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
        VIRTIO_F_VERSION_1,
    };
    use crate::devices::{Device, Msi};
    use crate::loader::SliceMemory;
    use alloc::boxed::Box;

    const DISK: &[u8] = &[0x5a; 0x1_0000];
    /// Where the first function's BAR lands: the start of the window.
    const BAR0: u64 = MMIO_WINDOW_BASE;
    const QUEUE_VECTOR: u16 = 1;
    const CONFIG_VECTOR: u16 = 0;

    /// A PCI host with `disks` virtio-blk functions (slots 1, 2, ...).
    fn host(disks: usize) -> PciHost {
        let mut host = PciHost::new();
        for i in 0..disks {
            let mut image = DISK.to_vec();
            image[512..1024].fill(i as u8 + 1);
            let block = Block::new(RamOverlay::new(image), "disk");
            let function = VirtioPci::new(block, "t", "vda", MEM_SIZE as u64).unwrap();
            assert_eq!(host.add_function(Box::new(function)), Ok(i as u8 + 1));
        }
        host
    }

    fn cfg_read(host: &mut PciHost, slot: u8, offset: u8, size: u8) -> u32 {
        let mut events = Events::default();
        host.io_write(
            CONFIG_ADDRESS,
            4,
            0x8000_0000 | u32::from(slot) << 11 | u32::from(offset & 0xfc),
            0,
            &mut events,
        );
        host.io_read(CONFIG_DATA + u16::from(offset & 3), size, 0, &mut events)
    }

    fn cfg_write(host: &mut PciHost, slot: u8, offset: u8, size: u8, value: u32) -> Events {
        let mut events = Events::default();
        host.io_write(
            CONFIG_ADDRESS,
            4,
            0x8000_0000 | u32::from(slot) << 11 | u32::from(offset & 0xfc),
            0,
            &mut events,
        );
        host.io_write(CONFIG_DATA + u16::from(offset & 3), size, value, 0, &mut events);
        events
    }

    fn read(host: &mut PciHost, gpa: u64, size: u8) -> u64 {
        host.mmio_read(gpa, size, 0, &mut Events::default())
    }

    fn write(host: &mut PciHost, gpa: u64, size: u8, value: u64) -> Events {
        let mut events = Events::default();
        host.mmio_write(gpa, size, value, 0, &mut events);
        events
    }

    /// The capabilities of `slot`: (offset, cap id, virtio cfg_type or 0).
    fn capabilities(host: &mut PciHost, slot: u8) -> Vec<(u8, u8, u8)> {
        let mut caps = Vec::new();
        let mut at = cfg_read(host, slot, 0x34, 1) as u8;
        while at != 0 && caps.len() < 16 {
            let header = cfg_read(host, slot, at, 4);
            let id = header as u8;
            caps.push((at, id, if id == CAPABILITY_VENDOR { (header >> 24) as u8 } else { 0 }));
            at = (header >> 8) as u8;
        }
        caps
    }

    /// What Linux's virtio_pci_modern does up to DRIVER_OK, with MSI-X if `msix`: returns the
    /// status read back.
    fn bring_up(host: &mut PciHost, slot: u8, bar: u64, msix: bool) -> u8 {
        if msix {
            let cap = capabilities(host, slot).iter().find(|c| c.1 == 0x11).unwrap().0;
            cfg_write(host, slot, 0x04, 2, 0x0006);
            cfg_write(host, slot, cap + 2, 2, 0x8000);
            for (vector, data) in [(CONFIG_VECTOR, 0x40), (QUEUE_VECTOR, 0x41)] {
                let entry = bar + u64::from(MSIX_TABLE_OFFSET) + 16 * u64::from(vector);
                write(host, entry, 4, 0xfee0_0000);
                write(host, entry + 4, 4, 0);
                write(host, entry + 8, 4, data);
                write(host, entry + 12, 4, 0);
            }
        } else {
            cfg_write(host, slot, 0x04, 2, 0x0006);
        }
        write(host, bar + 0x14, 1, 0);
        write(host, bar + 0x14, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
        write(host, bar, 4, 1);
        assert_eq!(read(host, bar + 4, 4) & 1, 1, "VERSION_1 offered");
        write(host, bar + 0x08, 4, 0);
        write(host, bar + 0x0c, 4, 0);
        write(host, bar + 0x08, 4, 1);
        write(host, bar + 0x0c, 4, VIRTIO_F_VERSION_1 >> 32);
        write(host, bar + 0x14, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK));
        assert_ne!(read(host, bar + 0x14, 1) as u8 & STATUS_FEATURES_OK, 0);
        if msix {
            write(host, bar + 0x10, 2, u64::from(CONFIG_VECTOR));
            assert_eq!(read(host, bar + 0x10, 2), u64::from(CONFIG_VECTOR));
        }
        write(host, bar + 0x16, 2, 0);
        assert_eq!(read(host, bar + 0x18, 2), 256, "maximum size");
        write(host, bar + 0x18, 2, 16);
        if msix {
            write(host, bar + 0x1a, 2, u64::from(QUEUE_VECTOR));
            assert_eq!(read(host, bar + 0x1a, 2), u64::from(QUEUE_VECTOR));
        }
        for (offset, gpa) in [(0x20, DESC), (0x28, AVAIL), (0x30, USED)] {
            write(host, bar + offset, 4, gpa & 0xffff_ffff);
            write(host, bar + offset + 4, 4, gpa >> 32);
        }
        write(host, bar + 0x1c, 2, 1);
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        write(host, bar + 0x14, 1, u64::from(ok));
        read(host, bar + 0x14, 1) as u8
    }

    /// Publishes a one-sector read of `sector` into DATA + 0x1000 and notifies queue 0.
    fn submit_read(host: &mut PciHost, bar: u64, mem: &mut SliceMemory, driver: &mut Driver, sector: u64) -> Events {
        mem.write_u32(DATA, 0).unwrap();
        mem.write_u32(DATA + 4, 0).unwrap();
        mem.write_u64(DATA + 8, sector).unwrap();
        mem.write(DATA + 0x100, &[0xff]).unwrap();
        driver.chain(mem, &[readable(DATA, 16), writable(DATA + 0x1000, 512), writable(DATA + 0x100, 1)]);
        let mut events = write(host, bar + NOTIFY_OFFSET, 2, 0);
        assert!(events.dma, "a notification asks for the device's memory work");
        assert!(host.dma_pending());
        host.run_dma(mem, 0, &mut events);
        events
    }

    #[test]
    fn linux_style_bring_up_reads_a_sector_and_signals_msix() {
        let mut host = host(1);
        assert_eq!(cfg_read(&mut host, 1, 0, 4), 0x1042_1af4, "virtio-blk, modern");
        assert_eq!(cfg_read(&mut host, 1, 0x08, 4) >> 8, 0x01_80_00);
        assert_eq!(cfg_read(&mut host, 1, 0x10, 4), BAR0 as u32, "assigned in the window");
        assert_eq!(cfg_read(&mut host, 1, 0x04, 2) & 2, 2, "memory decoding on, as firmware leaves it");
        assert_eq!(cfg_read(&mut host, 1, 0x3c, 2), 0x0100 | u32::from(intx_gsi(1, 0)), "INTA, routed");
        assert_eq!(cfg_read(&mut host, 2, 0, 4), 0xffff_ffff, "slot 2 is empty");
        let types: Vec<u8> = capabilities(&mut host, 1).iter().map(|c| c.2).collect();
        assert_eq!(types, [0, 0, CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG], "MSI-X and MSI first");
        let ids: Vec<u8> = capabilities(&mut host, 1).iter().map(|c| c.1).collect();
        assert_eq!(ids[..2], [0x11, 0x05]);
        let notify = capabilities(&mut host, 1)[3].0;
        assert_eq!(cfg_read(&mut host, 1, notify + 8, 4), NOTIFY_OFFSET as u32);
        assert_eq!(cfg_read(&mut host, 1, notify + 16, 4), NOTIFY_MULTIPLIER);

        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        assert_eq!(bring_up(&mut host, 1, BAR0, true), ok);
        assert_eq!(read(&mut host, BAR0 + DEVICE_OFFSET, 8), 128, "capacity in sectors");
        let mut bytes = memory();
        let mut mem = SliceMemory(&mut bytes);
        let mut driver = Driver::new(16);
        let events = submit_read(&mut host, BAR0, &mut mem, &mut driver, 1);
        assert_eq!(events.msi, [Msi { address: 0xfee0_0000, data: 0x41 }], "the queue's vector");
        assert!(events.irq_lines.is_empty(), "no INTx with MSI-X on");
        let mut sector = [0u8; 512];
        mem.read(DATA + 0x1000, &mut sector).unwrap();
        assert_eq!(sector, [1; 512]);
        assert_eq!(mem.read_u16(DATA + 0x100).unwrap() & 0xff, 0, "VIRTIO_BLK_S_OK");
        assert_eq!(driver.used_idx(&mem), 1);
        assert!(!host.dma_pending());
        let mut lines = Vec::new();
        host.report(&mut lines);
        assert_eq!(lines, ["vm t: virtio-blk vda: 1 requests, 0 failed, 0 KiB written held in RAM"]);
    }

    #[test]
    fn a_malformed_chain_needs_reset_and_leaves_other_functions_alone() {
        let mut host = host(2);
        let bar1 = cfg_read(&mut host, 2, 0x10, 4) as u64;
        assert_eq!(bar1, BAR0 + BAR_SIZE, "the second BAR follows the first");
        bring_up(&mut host, 1, BAR0, true);
        let mut bytes = memory();
        let mut mem = SliceMemory(&mut bytes);
        // An available ring entry naming descriptor 99 of a 16-entry queue.
        mem.write_u16(AVAIL + 4, 99).unwrap();
        mem.write_u16(AVAIL + 2, 1).unwrap();
        let mut events = write(&mut host, BAR0 + NOTIFY_OFFSET, 2, 0);
        host.run_dma(&mut mem, 0, &mut events);
        let status = read(&mut host, BAR0 + 0x14, 1) as u8;
        assert_ne!(status & STATUS_DEVICE_NEEDS_RESET, 0, "status {status:#x}");
        assert_eq!(events.msi, [Msi { address: 0xfee0_0000, data: 0x40 }], "configuration change vector");
        assert_eq!(read(&mut host, BAR0 + ISR_OFFSET, 1), u64::from(ISR_CONFIG));
        let mut events = write(&mut host, BAR0 + NOTIFY_OFFSET, 2, 0);
        host.run_dma(&mut mem, 0, &mut events);
        assert!(events.msi.is_empty(), "a device that needs a reset uses no buffers");
        let mut lines = Vec::new();
        host.report(&mut lines);
        assert!(lines[0]
            .ends_with("0 requests, 0 failed, 0 KiB written held in RAM; 1 device errors (each needed a reset)"));

        // The other disk works meanwhile, with its own rings.
        let mut other_bytes = memory();
        let mut other_mem = SliceMemory(&mut other_bytes);
        bring_up(&mut host, 2, bar1, true);
        let mut other = Driver::new(16);
        let events = submit_read(&mut host, bar1, &mut other_mem, &mut other, 1);
        assert_eq!(events.msi.len(), 1);
        assert_eq!(other_mem.read_u16(DATA + 0x1000).unwrap(), 0x0202);

        // A reset and a fresh start bring the first one back.
        mem.write(0, &[0; MEM_SIZE]).unwrap();
        write(&mut host, BAR0 + 0x14, 1, 0);
        assert_eq!(read(&mut host, BAR0 + 0x14, 1), 0);
        bring_up(&mut host, 1, BAR0, true);
        let mut driver = Driver::new(16);
        let events = submit_read(&mut host, BAR0, &mut mem, &mut driver, 1);
        assert_eq!(events.msi.len(), 1);
        assert_eq!(mem.read_u16(DATA + 0x1000).unwrap(), 0x0101);
    }

    #[test]
    fn without_msix_completions_assert_intx_until_the_isr_is_read() {
        let mut host = host(1);
        bring_up(&mut host, 1, BAR0, false);
        let mut bytes = memory();
        let mut mem = SliceMemory(&mut bytes);
        let mut driver = Driver::new(16);
        let gsi = intx_gsi(1, 0);
        let events = submit_read(&mut host, BAR0, &mut mem, &mut driver, 0);
        assert_eq!(events.irq_lines, [(gsi, true)]);
        assert!(events.msi.is_empty());
        assert_ne!(cfg_read(&mut host, 1, 0x06, 2) & 0x08, 0, "status shows the interrupt");
        let mut events = Events::default();
        assert_eq!(host.mmio_read(BAR0 + ISR_OFFSET, 1, 0, &mut events), u64::from(ISR_QUEUE));
        assert_eq!(events.irq_lines, [(gsi, false)], "reading the ISR de-asserts");
        assert_eq!(read(&mut host, BAR0 + ISR_OFFSET, 1), 0);

        // With INTx disabled in the command register the line stays quiet.
        cfg_write(&mut host, 1, 0x04, 2, 0x0406);
        let events = submit_read(&mut host, BAR0, &mut mem, &mut driver, 0);
        assert!(events.irq_lines.is_empty());
        let events = cfg_write(&mut host, 1, 0x04, 2, 0x0006);
        assert_eq!(events.irq_lines, [(gsi, true)], "re-enabled with the ISR set");
    }

    #[test]
    fn with_msi_on_and_msix_off_completions_send_the_one_message() {
        let mut host = host(1);
        bring_up(&mut host, 1, BAR0, false);
        let msi = capabilities(&mut host, 1).iter().find(|c| c.1 == 0x05).unwrap().0;
        cfg_write(&mut host, 1, msi + 4, 4, 0xfee0_0000);
        cfg_write(&mut host, 1, msi + 12, 2, 0x0052);
        cfg_write(&mut host, 1, msi + 2, 2, 1);
        let mut bytes = memory();
        let mut mem = SliceMemory(&mut bytes);
        let mut driver = Driver::new(16);
        let events = submit_read(&mut host, BAR0, &mut mem, &mut driver, 0);
        assert_eq!(events.msi, [Msi { address: 0xfee0_0000, data: 0x52 }]);
        assert!(events.irq_lines.is_empty(), "no INTx while MSI is on");
        assert_eq!(read(&mut host, BAR0 + ISR_OFFSET, 1), u64::from(ISR_QUEUE), "the ISR says why");
    }

    #[test]
    fn bad_queue_setups_and_vectors_are_refused() {
        let mut host = host(1);
        bring_up(&mut host, 1, BAR0, true);
        write(&mut host, BAR0 + 0x1a, 2, 7);
        assert_eq!(read(&mut host, BAR0 + 0x1a, 2), u64::from(NO_VECTOR), "the table has 2 vectors");
        write(&mut host, BAR0 + 0x16, 2, 5);
        assert_eq!(read(&mut host, BAR0 + 0x18, 2), 0, "no queue 5");
        write(&mut host, BAR0 + 0x1c, 2, 1);
        let mut events = write(&mut host, BAR0 + NOTIFY_OFFSET + 4 * 5, 2, 5);
        assert!(!events.dma, "notifying a queue that does not exist does nothing");
        host.run_dma(&mut SliceMemory(&mut memory()), 0, &mut events);

        // A ring beyond guest memory is refused when the queue is enabled.
        write(&mut host, BAR0 + 0x14, 1, 0);
        write(&mut host, BAR0 + 0x14, 1, u64::from(STATUS_ACKNOWLEDGE));
        write(&mut host, BAR0 + 0x16, 2, 0);
        write(&mut host, BAR0 + 0x18, 2, 3);
        assert_eq!(read(&mut host, BAR0 + 0x18, 2), 256, "not a power of two: the size stays");
        write(&mut host, BAR0 + 0x30, 8, MEM_SIZE as u64 - 8);
        let events = write(&mut host, BAR0 + 0x1c, 2, 1);
        assert_eq!(read(&mut host, BAR0 + 0x1c, 2), 0);
        assert_ne!(read(&mut host, BAR0 + 0x14, 1) as u8 & STATUS_DEVICE_NEEDS_RESET, 0);
        assert!(events.msi.is_empty(), "not live yet: no configuration interrupt");
    }

    #[test]
    fn the_configuration_window_reaches_the_bar() {
        let mut host = host(1);
        let cap = capabilities(&mut host, 1).iter().find(|c| c.2 == CAP_PCI_CFG).unwrap().0;
        cfg_write(&mut host, 1, cap + 4, 1, 0);
        cfg_write(&mut host, 1, cap + 8, 4, 0x12);
        cfg_write(&mut host, 1, cap + 12, 4, 2);
        assert_eq!(cfg_read(&mut host, 1, cap + 16, 2), 1, "num_queues through the window");
        cfg_write(&mut host, 1, cap + 8, 4, 0x13);
        assert_eq!(cfg_read(&mut host, 1, cap + 16, 2), 0xffff, "misaligned: nothing");
        cfg_write(&mut host, 1, cap + 8, 4, 0x14);
        cfg_write(&mut host, 1, cap + 12, 4, 1);
        cfg_write(&mut host, 1, cap + 16, 1, u32::from(STATUS_ACKNOWLEDGE));
        assert_eq!(read(&mut host, BAR0 + 0x14, 1), u64::from(STATUS_ACKNOWLEDGE), "written through the window");
    }
}
