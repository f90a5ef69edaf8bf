//! A device for the hypervisor's own guest test suite: port 0xf5 requests an external
//! interrupt with the written vector, port 0xf6 a real NMI on host CPUs (0: the CPU running
//! the vCPU, 1: every other CPU), and an MMIO page at 0xd000_0000 holds a read-only
//! identification register (offset 0) and a 64-bit scratch register (offset 8).

use super::{Device, Events, HostNmi, Span};

/// Guest-physical base of the MMIO page.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Interrupt-request port.
pub const IRQ_PORT: u16 = 0xf5;
/// Host-NMI request port.
pub const HOST_NMI_PORT: u16 = 0xf6;
/// Value of the identification register.
pub const ID: u32 = 0x1234_5678;

const PORTS: [Span; 1] = [Span { start: IRQ_PORT as u64, len: 2 }];
const _: () = assert!(HOST_NMI_PORT == IRQ_PORT + 1);
const MMIO: [Span; 1] = [Span { start: MMIO_BASE, len: 0x1000 }];

/// The test device.
#[derive(Default)]
pub struct TestDevice {
    scratch: u64,
}

impl Device for TestDevice {
    fn name(&self) -> &'static str {
        "test-device"
    }

    fn ports(&self) -> &[Span] {
        &PORTS
    }

    fn mmio(&self) -> &[Span] {
        &MMIO
    }

    fn io_write(&mut self, port: u16, _size: u8, value: u32, _now_ns: u64, events: &mut Events) {
        match (port, value) {
            (IRQ_PORT, _) => events.interrupts.push(value as u8),
            (HOST_NMI_PORT, 0) => events.host_nmi = Some(HostNmi::ThisCpu),
            (HOST_NMI_PORT, 1) => events.host_nmi = Some(HostNmi::OtherCpus),
            _ => {}
        }
    }

    fn mmio_read(&mut self, gpa: u64, size: u8, _now_ns: u64, _events: &mut Events) -> u64 {
        let offset = gpa - MMIO_BASE;
        // Narrow reads see the low bytes at their offset, as on a little-endian register.
        let (register, base) = match offset {
            0..=3 => (ID as u64, 0),
            8..=15 => (self.scratch, 8),
            _ => return super::ones(size),
        };
        register >> ((offset - base) * 8)
    }

    fn mmio_write(&mut self, gpa: u64, size: u8, value: u64, _now_ns: u64, _events: &mut Events) {
        let offset = gpa - MMIO_BASE;
        if (8..16).contains(&offset) {
            let shift = (offset - 8) * 8;
            let mask = super::ones(size).checked_shl(shift as u32).unwrap_or(0);
            self.scratch = (self.scratch & !mask) | ((value << shift) & mask);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_interrupt_requests() {
        let mut dev = TestDevice::default();
        let mut events = Events::default();
        assert_eq!(dev.mmio_read(MMIO_BASE, 4, 0, &mut events) as u32, ID);
        assert_eq!(dev.mmio_read(MMIO_BASE, 2, 0, &mut events) & 0xffff, 0x5678);
        assert_eq!(dev.mmio_read(MMIO_BASE + 2, 2, 0, &mut events) & 0xffff, 0x1234);
        dev.mmio_write(MMIO_BASE + 8, 8, 0x1122_3344_5566_7788, 0, &mut events);
        dev.mmio_write(MMIO_BASE + 8, 1, 0x99, 0, &mut events);
        assert_eq!(dev.mmio_read(MMIO_BASE + 8, 8, 0, &mut events), 0x1122_3344_5566_7799);
        dev.mmio_write(MMIO_BASE + 12, 4, 0xaabb_ccdd, 0, &mut events);
        assert_eq!(dev.mmio_read(MMIO_BASE + 8, 8, 0, &mut events), 0xaabb_ccdd_5566_7799);
        assert_eq!(dev.mmio_read(MMIO_BASE + 0x100, 4, 0, &mut events) as u32, 0xffff_ffff);
        dev.io_write(IRQ_PORT, 1, 0x40, 0, &mut events);
        assert_eq!(events.interrupts, [0x40]);
        dev.io_write(HOST_NMI_PORT, 1, 2, 0, &mut events);
        assert_eq!(events.host_nmi, None, "only 0 and 1 are requests");
        dev.io_write(HOST_NMI_PORT, 1, 1, 0, &mut events);
        assert_eq!(events.host_nmi, Some(HostNmi::OtherCpus));
    }
}
