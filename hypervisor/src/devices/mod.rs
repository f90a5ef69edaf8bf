//! Emulated devices and the bus that routes port and MMIO accesses to them.
//!
//! Devices never reach into the vCPU: what they want to happen next (console output, an
//! interrupt, ending the VM) is returned through [`Events`], and the VM's run loop acts on it.

pub mod acpi_pm;
pub mod debug_exit;
pub mod i8042;
pub mod ioapic;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod rtc;
pub mod test_device;
pub mod uart;
pub mod virtio;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use crate::loader::GuestMemory;

/// What devices ask of the VM after an access or a timer poll.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Events {
    /// Bytes for the VM's console.
    pub console: Vec<u8>,
    /// Interrupt vectors to deliver to the vCPU directly (the test device).
    pub interrupts: Vec<u8>,
    /// Interrupt-line changes in order: (global system interrupt, asserted). ISA lines 0-15 are
    /// GSIs 0-15. An edge-triggered device pulses: (line, true) then (line, false).
    pub irq_lines: Vec<(u8, bool)>,
    /// The guest asked to end the VM with this status (debug-exit port).
    pub exit_status: Option<u32>,
    /// The guest asked to power off or reset the machine (ACPI PM1, i8042, port 0xcf9).
    pub power: Option<Power>,
    /// The test guest asked for a real NMI on host CPUs (the test device only), to show that
    /// platform NMIs change nothing for any VM.
    pub host_nmi: Option<HostNmi>,
    /// Message-signalled interrupts (MSI, MSI-X) in order.
    pub msi: Vec<Msi>,
    /// A device has work that needs guest memory ([`Device::run_dma`]): a queue notification.
    pub dma: bool,
}

/// A message-signalled interrupt: the memory write a PCI function makes to raise it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msi {
    /// Where the function writes (the local APICs decode 0xfeex_xxxx).
    pub address: u64,
    /// What it writes: vector, delivery and trigger mode.
    pub data: u32,
}

/// Which host CPUs a test-device NMI request reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostNmi {
    /// The CPU running the requesting vCPU (the NMI arrives in the host, right after the exit).
    ThisCpu,
    /// Every other CPU (the NMI arrives wherever they are: in a guest, in the host, halted).
    OtherCpus,
}

/// A machine-level request from a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Power {
    /// ACPI S5 soft-off.
    Off,
    /// Platform reset.
    Reset,
}

impl Events {
    /// Asserts then deasserts an edge-triggered line.
    pub fn pulse(&mut self, line: u8) {
        self.irq_lines.push((line, true));
        self.irq_lines.push((line, false));
    }
}

/// A half-open range of ports or guest-physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// First port or address.
    pub start: u64,
    /// Number of ports or bytes.
    pub len: u64,
}

impl Span {
    fn contains(&self, at: u64) -> bool {
        at >= self.start && at - self.start < self.len
    }

    fn overlaps(&self, other: &Span) -> bool {
        self.start < other.start.saturating_add(other.len) && other.start < self.start.saturating_add(self.len)
    }
}

/// One emulated device. Widths are 1, 2, 4 (ports) or 1, 2, 4, 8 (MMIO) bytes; values are
/// zero-extended. Unimplemented reads float high, as on a real bus. `now_ns` is guest time in
/// nanoseconds (monotonic, starts near 0 when the VM starts): devices with clocks derive
/// counters from it rather than counting accesses.
pub trait Device {
    /// Name for logs.
    fn name(&self) -> &'static str;
    /// Port ranges the device claims.
    fn ports(&self) -> &[Span] {
        &[]
    }
    /// Guest-physical ranges the device claims.
    fn mmio(&self) -> &[Span] {
        &[]
    }
    /// Port read.
    fn io_read(&mut self, _port: u16, size: u8, _now_ns: u64, _events: &mut Events) -> u32 {
        ones(size) as u32
    }
    /// Port write.
    fn io_write(&mut self, _port: u16, _size: u8, _value: u32, _now_ns: u64, _events: &mut Events) {}
    /// MMIO read.
    fn mmio_read(&mut self, _gpa: u64, size: u8, _now_ns: u64, _events: &mut Events) -> u64 {
        ones(size)
    }
    /// MMIO write.
    fn mmio_write(&mut self, _gpa: u64, _size: u8, _value: u64, _now_ns: u64, _events: &mut Events) {}
    /// Brings the device's timers up to `now_ns`, raising what fell due.
    fn poll(&mut self, _now_ns: u64, _events: &mut Events) {}
    /// The guest time at which [`Device::poll`] has something to do, if any.
    fn next_deadline_ns(&self) -> Option<u64> {
        None
    }
    /// A byte typed on the console for this device; false if it takes no input.
    fn input(&mut self, _byte: u8, _now_ns: u64, _events: &mut Events) -> bool {
        false
    }
    /// Whether a typed byte would be received now rather than lost (receiver not full).
    fn input_ready(&self) -> bool {
        false
    }
    /// Does the work that needs guest memory (a notified queue), after the access that asked
    /// for it through [`Events::dma`]. The work done per call is bounded; what is left is
    /// reported by [`Device::dma_pending`].
    fn run_dma(&mut self, _memory: &mut dyn GuestMemory, _now_ns: u64, _events: &mut Events) {}
    /// Whether [`Device::run_dma`] has work left.
    fn dma_pending(&self) -> bool {
        false
    }
    /// Lines for the VM's end report (what a device counted), if any.
    fn report(&self, _lines: &mut Vec<alloc::string::String>) {}
    /// The PCI host, for plugging functions in while the VM is built.
    fn as_pci_host(&mut self) -> Option<&mut pci::PciHost> {
        None
    }
}

/// All ones in `size` bytes.
pub fn ones(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

/// Two devices claim the same port or address.
#[derive(Debug, PartialEq, Eq)]
pub struct Overlap {
    /// The device being added.
    pub new: &'static str,
    /// The device already there.
    pub existing: &'static str,
    /// Start of the new device's overlapping range.
    pub at: u64,
    /// Whether the overlap is in MMIO (else ports).
    pub mmio: bool,
}

impl fmt::Display for Overlap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.mmio { "MMIO range" } else { "port range" };
        write!(f, "device {} claims {kind} at {:#x}, which {} already claims", self.new, self.at, self.existing)
    }
}

/// Routes accesses to devices.
#[derive(Default)]
pub struct Bus {
    devices: Vec<Box<dyn Device>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Adds a device, refusing any overlap with the ones already on the bus.
    pub fn add(&mut self, device: Box<dyn Device>) -> Result<(), Overlap> {
        for existing in &self.devices {
            for (mine, theirs, mmio) in
                [(device.ports(), existing.ports(), false), (device.mmio(), existing.mmio(), true)]
            {
                if let Some(span) = mine.iter().find(|m| theirs.iter().any(|t| t.overlaps(m))) {
                    return Err(Overlap { new: device.name(), existing: existing.name(), at: span.start, mmio });
                }
            }
        }
        self.devices.push(device);
        Ok(())
    }

    fn port_owner(&mut self, port: u16) -> Option<&mut Box<dyn Device>> {
        self.devices.iter_mut().find(|d| d.ports().iter().any(|s| s.contains(port as u64)))
    }

    fn mmio_owner(&mut self, gpa: u64) -> Option<&mut Box<dyn Device>> {
        self.devices.iter_mut().find(|d| d.mmio().iter().any(|s| s.contains(gpa)))
    }

    /// Port read; `None` if no device claims the port.
    pub fn io_read(&mut self, port: u16, size: u8, now_ns: u64, events: &mut Events) -> Option<u32> {
        self.port_owner(port).map(|d| d.io_read(port, size, now_ns, events) & ones(size) as u32)
    }

    /// Port write; false if no device claims the port.
    pub fn io_write(&mut self, port: u16, size: u8, value: u32, now_ns: u64, events: &mut Events) -> bool {
        match self.port_owner(port) {
            Some(d) => {
                d.io_write(port, size, value & ones(size) as u32, now_ns, events);
                true
            }
            None => false,
        }
    }

    /// Polls every device's timers.
    pub fn poll(&mut self, now_ns: u64, events: &mut Events) {
        for device in &mut self.devices {
            device.poll(now_ns, events);
        }
    }

    /// The earliest deadline of any device.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.devices.iter().filter_map(|d| d.next_deadline_ns()).min()
    }

    /// Whether some device would receive a typed byte now.
    pub fn input_ready(&self) -> bool {
        self.devices.iter().any(|d| d.input_ready())
    }

    /// Offers a typed byte to the devices in order; false if none takes input.
    pub fn input(&mut self, byte: u8, now_ns: u64, events: &mut Events) -> bool {
        self.devices.iter_mut().any(|d| d.input(byte, now_ns, events))
    }

    /// Lets every device with memory work do it ([`Device::run_dma`]).
    pub fn run_dma(&mut self, memory: &mut dyn GuestMemory, now_ns: u64, events: &mut Events) {
        for device in &mut self.devices {
            if device.dma_pending() {
                device.run_dma(memory, now_ns, events);
            }
        }
    }

    /// What the devices counted, one line each, for the VM's end report.
    pub fn reports(&self) -> Vec<alloc::string::String> {
        let mut lines = Vec::new();
        for device in &self.devices {
            device.report(&mut lines);
        }
        lines
    }

    /// The PCI host on this bus, if there is one.
    pub fn pci_host(&mut self) -> Option<&mut pci::PciHost> {
        self.devices.iter_mut().find_map(|d| d.as_pci_host())
    }

    /// Whether some device has memory work left.
    pub fn dma_pending(&self) -> bool {
        self.devices.iter().any(|d| d.dma_pending())
    }

    /// Whether a device claims this guest-physical address.
    pub fn claims_mmio(&self, gpa: u64) -> bool {
        self.devices.iter().any(|d| d.mmio().iter().any(|s| s.contains(gpa)))
    }

    /// MMIO read; `None` if unclaimed.
    pub fn mmio_read(&mut self, gpa: u64, size: u8, now_ns: u64, events: &mut Events) -> Option<u64> {
        self.mmio_owner(gpa).map(|d| d.mmio_read(gpa, size, now_ns, events) & ones(size))
    }

    /// MMIO write; false if unclaimed.
    pub fn mmio_write(&mut self, gpa: u64, size: u8, value: u64, now_ns: u64, events: &mut Events) -> bool {
        match self.mmio_owner(gpa) {
            Some(d) => {
                d.mmio_write(gpa, size, value & ones(size), now_ns, events);
                true
            }
            None => false,
        }
    }
}

/// Ignores writes and reads as all ones: the POST-code port 0x80, which Linux also uses as an
/// I/O delay.
pub struct PostCode;

const POST_CODE_PORTS: [Span; 1] = [Span { start: 0x80, len: 1 }];

impl Device for PostCode {
    fn name(&self) -> &'static str {
        "post-code"
    }

    fn ports(&self) -> &[Span] {
        &POST_CODE_PORTS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(&'static str, [Span; 1], [Span; 1]);

    impl Device for Fake {
        fn name(&self) -> &'static str {
            self.0
        }
        fn ports(&self) -> &[Span] {
            &self.1
        }
        fn mmio(&self) -> &[Span] {
            &self.2
        }
        fn io_read(&mut self, port: u16, _size: u8, _now_ns: u64, _events: &mut Events) -> u32 {
            0x1234_0000 | port as u32
        }
        fn mmio_write(&mut self, _gpa: u64, _size: u8, value: u64, _now_ns: u64, events: &mut Events) {
            events.interrupts.push(value as u8);
        }
    }

    fn fake(name: &'static str, port: u64, mmio: u64) -> Box<Fake> {
        Box::new(Fake(name, [Span { start: port, len: 8 }], [Span { start: mmio, len: 0x1000 }]))
    }

    #[test]
    fn routes_by_range_and_masks_to_width() {
        let mut bus = Bus::new();
        bus.add(fake("a", 0x3f8, 0xd000_0000)).unwrap();
        let mut events = Events::default();
        assert_eq!(bus.io_read(0x3ff, 2, 0, &mut events), Some(0x03ff));
        assert_eq!(bus.io_read(0x3ff, 4, 0, &mut events), Some(0x1234_03ff));
        assert_eq!(bus.io_read(0x400, 1, 0, &mut events), None);
        assert!(bus.mmio_write(0xd000_0fff, 1, 0x1_41, 0, &mut events));
        assert_eq!(events.interrupts, [0x41]);
        assert!(!bus.mmio_write(0xd000_1000, 1, 0, 0, &mut events));
        assert!(bus.claims_mmio(0xd000_0000) && !bus.claims_mmio(0xcfff_ffff));
        assert_eq!(bus.mmio_read(0xd000_0000, 8, 0, &mut events), Some(u64::MAX), "default reads float high");
    }

    #[test]
    fn overlapping_devices_are_refused() {
        let mut bus = Bus::new();
        bus.add(fake("a", 0x3f8, 0xd000_0000)).unwrap();
        let port_clash = bus.add(fake("b", 0x3fc, 0xe000_0000)).unwrap_err();
        assert_eq!(port_clash, Overlap { new: "b", existing: "a", at: 0x3fc, mmio: false });
        let mmio_clash = bus.add(fake("c", 0x2f8, 0xd000_0800)).unwrap_err();
        assert!(mmio_clash.mmio);
        assert_eq!(mmio_clash.to_string(), "device c claims MMIO range at 0xd0000800, which a already claims");
        bus.add(fake("d", 0x2f8, 0xd000_1000)).unwrap();
    }
}
