//! The one place interrupt delivery is decided: 8259 pair, I/O APIC and local APIC together.
//!
//! Devices report line changes as GSIs ([`Events::irq_lines`](crate::devices::Events)); the run
//! loop feeds them to [`InterruptRouter::set_line`]. ISA lines 0-15 reach both the 8259s and the
//! I/O APIC, with the ISA IRQ0 -> GSI 2 override the MADT announces (the PIT's IRQ0 arrives at
//! I/O APIC pin 2); IRQ2 is the 8259 cascade and is routed nowhere. GSIs 16-23 reach the I/O APIC
//! only. I/O APIC messages go to the local APIC; level-triggered EOIs go back to the I/O APIC.
//!
//! The router owns the three controllers, so they are not on the device bus: the run loop
//! forwards the 8259 ports ([`InterruptRouter::claims_port`]), the I/O APIC and local APIC pages
//! ([`InterruptRouter::claims_mmio`]) and the APIC MSRs ([`InterruptRouter::is_lapic_msr`]) here.

use alloc::vec::Vec;

use crate::devices::ioapic::{Delivery, IoApic, IOAPIC_BASE, IOAPIC_LEN, PINS};
use crate::devices::pic::PicPair;
use crate::devices::{Device, Events, Msi};

use super::ipi::{self, ApicView, DeliveryMode, Icr, Shorthand};
use super::lapic::{ApicEffect, LocalApic, LAPIC_BASE, LAPIC_LEN, MSR_APIC_BASE, MSR_TSC_DEADLINE};
use super::lapic::{MSR_X2APIC_FIRST, MSR_X2APIC_LAST};

/// The ISA IRQ the PIT uses.
const ISA_TIMER: u8 = 0;
/// The I/O APIC pin the PIT's IRQ0 is wired to (MADT interrupt source override).
const TIMER_GSI: u8 = 2;
/// The 8259 cascade input: not a device line.
const CASCADE: u8 = 2;
/// The vCPU whose LINT0 the 8259's INTR reaches (the bootstrap processor).
const PIC_CPU: usize = 0;
/// GSIs from here on are PCI INTx lines (level-triggered, active low; see `devices::pci`).
const PCI_FIRST_GSI: u8 = crate::devices::pci::INTX_FIRST_GSI;
/// vCPUs per VM: the kick set is one bit each.
pub const MAX_VCPUS: usize = 64;

/// One vCPU's interrupt inputs: its local APIC and the signals that are not vectors.
#[derive(Clone, Debug)]
struct CpuInputs {
    lapic: LocalApic,
    /// An NMI waits to be injected.
    nmi: bool,
    /// Reset by INIT: waits for a start-up IPI (application processors start this way).
    waiting_for_sipi: bool,
    /// A start-up IPI arrived: start in real mode at `vector << 12`.
    sipi: Option<u8>,
}

/// 8259 pair, I/O APIC and the local APICs of a VM's vCPUs.
pub struct InterruptRouter {
    /// The legacy 8259 pair.
    pub pic: PicPair,
    /// The I/O APIC.
    pub ioapic: IoApic,
    cpus: Vec<CpuInputs>,
    /// Last level reported for each GSI.
    line_levels: [bool; PINS],
    /// vCPUs that received something since [`Self::take_kicks`] (bit = vCPU index).
    kicks: u64,
}

impl InterruptRouter {
    /// Controllers of a one-vCPU VM in their reset state; `tsc_hz` is the guest TSC frequency
    /// (TSC-deadline timer).
    pub fn new(tsc_hz: u64) -> Self {
        Self::with_vcpus(tsc_hz, 1)
    }

    /// Controllers of a VM with `vcpus` vCPUs (1 to [`MAX_VCPUS`]), APIC IDs 0 to `vcpus - 1`.
    /// All but vCPU 0 wait for INIT-SIPI, as application processors do after reset.
    pub fn with_vcpus(tsc_hz: u64, vcpus: usize) -> Self {
        let vcpus = vcpus.clamp(1, MAX_VCPUS);
        let mut ioapic = IoApic::new();
        // PCI interrupt lines are active low and pulled up while no device drives them.
        for gsi in PCI_FIRST_GSI..PINS as u8 {
            ioapic.set_irq(gsi, true);
        }
        InterruptRouter {
            pic: PicPair::new(),
            ioapic,
            cpus: (0..vcpus)
                .map(|i| CpuInputs {
                    lapic: LocalApic::with_id(tsc_hz, i as u32),
                    nmi: false,
                    waiting_for_sipi: i != 0,
                    sipi: None,
                })
                .collect(),
            line_levels: [false; PINS],
            kicks: 0,
        }
    }

    /// How many vCPUs the router serves.
    pub fn vcpus(&self) -> usize {
        self.cpus.len()
    }

    /// The local APIC of vCPU `cpu` (vCPU 0 for an index out of range).
    pub fn lapic(&self, cpu: usize) -> &LocalApic {
        &self.cpus.get(cpu).unwrap_or(&self.cpus[0]).lapic
    }

    fn cpu_mut(&mut self, cpu: usize) -> &mut CpuInputs {
        let cpu = if cpu < self.cpus.len() { cpu } else { 0 };
        &mut self.cpus[cpu]
    }

    /// A device drove GSI `gsi` to `level`. GSIs above 23 are ignored.
    pub fn set_line(&mut self, gsi: u8, level: bool) {
        let Some(slot) = self.line_levels.get_mut(usize::from(gsi)) else { return };
        *slot = level;
        if gsi == CASCADE {
            return;
        }
        if gsi < 16 {
            self.pic.set_irq(gsi, level);
            if self.pic_connected() && self.pic.output() {
                self.kicks |= 1 << PIC_CPU;
            }
        }
        let pin = if gsi == ISA_TIMER { TIMER_GSI } else { gsi };
        // An asserted PCI line is driven low; ISA lines are active high.
        let electrical = if gsi >= PCI_FIRST_GSI { !level } else { level };
        let delivery = self.ioapic.set_irq(pin, electrical);
        self.deliver(delivery);
    }

    /// Delivers a message-signalled interrupt (SDM Vol. 3, 11.11): the address names the
    /// destination (bits 19:12, physical or logical by bit 2), the data the vector, delivery mode
    /// (fixed or lowest priority) and trigger mode. False, and nothing delivered, if the address
    /// is not in the local APICs' 0xfeex_xxxx range; other delivery modes are not sent by the
    /// devices modelled here and are dropped as well.
    pub fn deliver_msi(&mut self, msi: Msi) -> bool {
        if msi.address >> 20 != 0xfee {
            return false;
        }
        let mode = (msi.data >> 8) & 7;
        if mode > 1 {
            return false;
        }
        self.deliver([Delivery {
            vector: msi.data as u8,
            level: msi.data & (1 << 15) != 0,
            destination: (msi.address >> 12) as u8,
            logical: msi.address & (1 << 2) != 0,
            lowest_priority: mode == 1,
        }]);
        true
    }

    /// Applies a batch of line changes in order (as collected in `Events::irq_lines`).
    pub fn set_lines(&mut self, lines: &[(u8, bool)]) {
        for &(gsi, level) in lines {
            self.set_line(gsi, level);
        }
    }

    /// The level last reported for `gsi` (false for lines that do not exist).
    pub fn line_level(&self, gsi: u8) -> bool {
        self.line_levels.get(usize::from(gsi)).copied().unwrap_or(false)
    }

    fn views(&self) -> Vec<ApicView> {
        self.cpus.iter().map(|cpu| cpu.lapic.view()).collect()
    }

    /// I/O APIC messages: xAPIC-format destinations (8-bit IDs), as without interrupt remapping.
    fn deliver(&mut self, deliveries: impl IntoIterator<Item = Delivery>) {
        for delivery in deliveries {
            let icr = Icr {
                vector: delivery.vector,
                delivery: if delivery.lowest_priority { DeliveryMode::LowestPriority } else { DeliveryMode::Fixed },
                logical: delivery.logical,
                assert: true,
                level_triggered: delivery.level,
                shorthand: Shorthand::None,
                destination: delivery.destination.into(),
                x2apic: false,
            };
            for target in ipi::destinations(&icr, 0, &self.views()) {
                self.cpus[target].lapic.accept(delivery.vector, delivery.level);
                self.kicks |= 1 << target;
            }
        }
    }

    /// Routes an IPI sent by vCPU `sender` (SDM Vol. 3, 11.6). SMIs and reserved modes go
    /// nowhere; INIT level de-assert is a no-op on current processors.
    fn send_ipi(&mut self, sender: usize, icr: Icr) {
        if icr.delivery == DeliveryMode::Init && !icr.assert && icr.level_triggered {
            return;
        }
        for target in ipi::destinations(&icr, sender, &self.views()) {
            let cpu = &mut self.cpus[target];
            match icr.delivery {
                DeliveryMode::Fixed | DeliveryMode::LowestPriority => cpu.lapic.accept(icr.vector, false),
                DeliveryMode::Nmi => cpu.nmi = true,
                DeliveryMode::Init => {
                    cpu.lapic.init();
                    cpu.nmi = false;
                    cpu.sipi = None;
                    cpu.waiting_for_sipi = true;
                }
                DeliveryMode::Startup if cpu.waiting_for_sipi => {
                    cpu.waiting_for_sipi = false;
                    cpu.sipi = Some(icr.vector);
                }
                DeliveryMode::Startup | DeliveryMode::Smi | DeliveryMode::Reserved => continue,
            }
            self.kicks |= 1 << target;
        }
    }

    /// Acts on a local APIC register write of vCPU `cpu`: level EOIs re-deliver still-asserted
    /// I/O APIC lines, ICR writes send IPIs.
    fn apply(&mut self, cpu: usize, effect: ApicEffect) {
        if let Some(vector) = effect.eoi_level_vector {
            let again = self.ioapic.end_of_interrupt(vector);
            self.deliver(again);
        }
        if let Some(icr) = effect.ipi {
            self.send_ipi(cpu, icr);
        }
    }

    /// The vCPUs that received an interrupt, NMI, INIT or SIPI since the last call (bit =
    /// vCPU index): those running elsewhere must be made to look.
    pub fn take_kicks(&mut self) -> u64 {
        core::mem::take(&mut self.kicks)
    }

    /// Fires every local APIC timer that is due at `now_ns`.
    pub fn poll(&mut self, now_ns: u64) {
        for (i, cpu) in self.cpus.iter_mut().enumerate() {
            if cpu.lapic.next_deadline_ns().is_some_and(|deadline| deadline <= now_ns) {
                cpu.lapic.poll(now_ns);
                self.kicks |= 1 << i;
            }
        }
    }

    /// When vCPU `cpu`'s local APIC timer next fires.
    pub fn next_deadline_ns(&self, cpu: usize) -> Option<u64> {
        self.lapic(cpu).next_deadline_ns()
    }

    /// Whether the 8259's INTR reaches the bootstrap processor: its local APIC is disabled (the
    /// 8259 then drives INTR directly) or LINT0 is an unmasked ExtINT input (virtual wire mode).
    fn pic_connected(&self) -> bool {
        let lapic = self.lapic(PIC_CPU);
        !lapic.enabled() || lapic.lint0_extint()
    }

    /// The vector vCPU `cpu` receives next if it can take an interrupt: its local APIC's
    /// pending vector when it is enabled, otherwise (vCPU 0) the 8259's when connected.
    pub fn next_vector(&self, cpu: usize) -> Option<u8> {
        if let Some(vector) = self.lapic(cpu).pending() {
            return Some(vector);
        }
        if cpu == PIC_CPU && self.pic_connected() && self.pic.output() {
            return self.pic.pending_vector();
        }
        None
    }

    /// Delivers the vector [`InterruptRouter::next_vector`] names (local APIC IRR -> ISR, or an
    /// 8259 INTA cycle) and returns it for injection. Call only when the guest can take it.
    pub fn acknowledge(&mut self, cpu: usize) -> Option<u8> {
        if let Some(vector) = self.lapic(cpu).pending() {
            self.cpu_mut(cpu).lapic.acknowledge(vector);
            return Some(vector);
        }
        if cpu == PIC_CPU && self.pic_connected() && self.pic.output() {
            return self.pic.acknowledge();
        }
        None
    }

    /// Sets vCPU `cpu`'s task priority (CR8 writes).
    pub fn set_tpr(&mut self, cpu: usize, tpr: u8) {
        self.cpu_mut(cpu).lapic.set_tpr(tpr);
    }

    /// Takes vCPU `cpu`'s pending NMI, if any.
    pub fn take_nmi(&mut self, cpu: usize) -> bool {
        core::mem::take(&mut self.cpu_mut(cpu).nmi)
    }

    /// Whether vCPU `cpu` has an NMI waiting.
    pub fn nmi_pending(&self, cpu: usize) -> bool {
        self.cpus.get(cpu).is_some_and(|c| c.nmi)
    }

    /// Whether vCPU `cpu` is held in wait-for-SIPI (after reset or INIT).
    pub fn waiting_for_sipi(&self, cpu: usize) -> bool {
        self.cpus.get(cpu).is_some_and(|c| c.waiting_for_sipi)
    }

    /// Takes the start-up vector sent to vCPU `cpu`, if one arrived.
    pub fn take_sipi(&mut self, cpu: usize) -> Option<u8> {
        self.cpu_mut(cpu).sipi.take()
    }

    /// Local APIC MMIO read by vCPU `cpu` at `offset` within its page.
    pub fn lapic_mmio_read(&self, cpu: usize, offset: u64, size: u8, now_ns: u64) -> u64 {
        self.lapic(cpu).mmio_read(offset, size, now_ns)
    }

    /// Local APIC MMIO write by vCPU `cpu` at `offset` within its page.
    pub fn lapic_mmio_write(&mut self, cpu: usize, offset: u64, size: u8, value: u64, now_ns: u64) {
        let effect = self.cpu_mut(cpu).lapic.mmio_write(offset, size, value, now_ns);
        self.apply(cpu, effect);
    }

    /// Whether RDMSR/WRMSR of `msr` belongs to the local APIC.
    pub fn is_lapic_msr(msr: u32) -> bool {
        matches!(msr, MSR_APIC_BASE | MSR_TSC_DEADLINE | MSR_X2APIC_FIRST..=MSR_X2APIC_LAST)
    }

    /// RDMSR of a local APIC MSR by vCPU `cpu`; `Err` means inject #GP.
    #[allow(clippy::result_unit_err)]
    pub fn lapic_msr_read(&self, cpu: usize, msr: u32, now_ns: u64) -> Result<u64, ()> {
        self.lapic(cpu).msr_read(msr, now_ns)
    }

    /// WRMSR of a local APIC MSR by vCPU `cpu`; `tsc` is the guest TSC at `now_ns`. `Err`
    /// means inject #GP.
    #[allow(clippy::result_unit_err)]
    pub fn lapic_msr_write(&mut self, cpu: usize, msr: u32, value: u64, now_ns: u64, tsc: u64) -> Result<(), ()> {
        let effect = self.cpu_mut(cpu).lapic.msr_write(msr, value, now_ns, tsc)?;
        self.apply(cpu, effect);
        Ok(())
    }

    /// Whether `port` is an 8259 or ELCR port.
    pub fn claims_port(&self, port: u16) -> bool {
        self.pic.ports().iter().any(|span| u64::from(port).wrapping_sub(span.start) < span.len)
    }

    /// Whether `gpa` is in the I/O APIC or local APIC page.
    pub fn claims_mmio(&self, gpa: u64) -> bool {
        in_page(gpa, IOAPIC_BASE, IOAPIC_LEN).is_some() || in_page(gpa, LAPIC_BASE, LAPIC_LEN).is_some()
    }

    /// Port read of an 8259/ELCR port (same shape as [`Device::io_read`]).
    pub fn io_read(&mut self, port: u16, size: u8, now_ns: u64, events: &mut Events) -> u32 {
        self.pic.io_read(port, size, now_ns, events)
    }

    /// Port write of an 8259/ELCR port (same shape as [`Device::io_write`]).
    pub fn io_write(&mut self, port: u16, size: u8, value: u32, now_ns: u64, events: &mut Events) {
        self.pic.io_write(port, size, value, now_ns, events);
        if self.pic_connected() && self.pic.output() {
            self.kicks |= 1 << PIC_CPU;
        }
    }

    /// MMIO read by vCPU `cpu` in the I/O APIC or its local APIC page (same shape as
    /// [`Device::mmio_read`]).
    pub fn mmio_read(&mut self, cpu: usize, gpa: u64, size: u8, now_ns: u64, events: &mut Events) -> u64 {
        if let Some(offset) = in_page(gpa, LAPIC_BASE, LAPIC_LEN) {
            return self.lapic_mmio_read(cpu, offset, size, now_ns);
        }
        self.ioapic.mmio_read(gpa, size, now_ns, events)
    }

    /// MMIO write by vCPU `cpu` in the I/O APIC or its local APIC page (same shape as
    /// [`Device::mmio_write`]).
    pub fn mmio_write(&mut self, cpu: usize, gpa: u64, size: u8, value: u64, now_ns: u64, events: &mut Events) {
        if let Some(offset) = in_page(gpa, LAPIC_BASE, LAPIC_LEN) {
            self.lapic_mmio_write(cpu, offset, size, value, now_ns);
            return;
        }
        if in_page(gpa, IOAPIC_BASE, IOAPIC_LEN).is_some() {
            self.ioapic.mmio_write(gpa, size, value, now_ns, events);
            let unmasked = self.ioapic.take_deliveries();
            self.deliver(unmasked);
        }
    }
}

/// `gpa - base` if `gpa` lies in `[base, base + len)`.
fn in_page(gpa: u64, base: u64, len: u64) -> Option<u64> {
    gpa.checked_sub(base).filter(|offset| *offset < len)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOI: u64 = 0xb0;
    const SVR: u64 = 0xf0;
    const LINT0: u64 = 0x350;

    fn router() -> InterruptRouter {
        let mut r = InterruptRouter::new(1_000_000_000);
        let mut events = Events::default();
        // 8259s at 0x20/0x28, cascade on IR2, 8086 mode.
        for (port, base, icw3) in [(0x20u16, 0x20u32, 4u32), (0xa0, 0x28, 2)] {
            for (offset, value) in [(0, 0x11), (1, base), (1, icw3), (1, 0x01), (1, 0x00)] {
                r.io_write(port + offset, 1, value, 0, &mut events);
            }
        }
        r
    }

    fn enable_lapic(r: &mut InterruptRouter, lint0: u32) {
        r.lapic_mmio_write(0, SVR, 4, 0x1ff, 0);
        r.lapic_mmio_write(0, LINT0, 4, lint0.into(), 0);
    }

    /// Programs I/O APIC pin `pin` through the router's MMIO path.
    fn program(r: &mut InterruptRouter, pin: u8, low: u32) {
        let mut events = Events::default();
        let select = 0x10 + 2 * u64::from(pin);
        r.mmio_write(0, IOAPIC_BASE, 4, select + 1, 0, &mut events);
        r.mmio_write(0, IOAPIC_BASE + 0x10, 4, 0, 0, &mut events);
        r.mmio_write(0, IOAPIC_BASE, 4, select, 0, &mut events);
        r.mmio_write(0, IOAPIC_BASE + 0x10, 4, low.into(), 0, &mut events);
    }

    #[test]
    fn pit_irq0_reaches_ioapic_pin2_and_pic_ir0_and_the_lapic_wins() {
        let mut r = router();
        enable_lapic(&mut r, 0x1_0700);
        program(&mut r, 0, 0x31);
        program(&mut r, 2, 0x30);
        let mut events = Events::default();
        events.pulse(0);
        r.set_lines(&events.irq_lines);
        assert!(r.lapic(0).requested(0x30));
        assert!(!r.lapic(0).requested(0x31), "pin 0 is not the PIT");
        assert_eq!(r.pic.master_registers().0, 0x01, "PIC IR0 latched");
        assert_eq!(r.next_vector(0), Some(0x30));
        assert_eq!(r.acknowledge(0), Some(0x30));
        assert!(r.lapic(0).in_service(0x30));
        // LINT0 masked: the 8259's pending IR0 does not reach the vCPU.
        assert_eq!(r.next_vector(0), None);
        assert_eq!(r.acknowledge(0), None);
        // The cascade line is not a device line.
        r.set_line(2, true);
        assert_eq!(r.pic.master_registers().0, 0x01);
        assert!(!r.line_level(0) && r.line_level(2));
    }

    #[test]
    fn pic_path_is_used_while_the_lapic_is_software_disabled() {
        let mut r = router();
        program(&mut r, 1, 0x41);
        r.set_line(1, true);
        assert!(!r.lapic(0).requested(0x41), "disabled LAPIC accepts nothing");
        assert_eq!(r.next_vector(0), Some(0x21));
        assert_eq!(r.acknowledge(0), Some(0x21));
        assert_eq!(r.next_vector(0), None);
        assert_eq!(r.pic.master_registers().1, 0x02);
    }

    #[test]
    fn lint0_extint_passes_the_pic_through_an_enabled_lapic() {
        let mut r = router();
        enable_lapic(&mut r, 0x700);
        r.set_line(12, true);
        assert_eq!(r.next_vector(0), Some(0x2c));
        // A LAPIC vector takes precedence over the virtual wire.
        r.cpu_mut(0).lapic.accept(0x90, false);
        assert_eq!(r.acknowledge(0), Some(0x90));
        assert_eq!(r.acknowledge(0), Some(0x2c));
        assert_eq!(r.pic.slave_registers().1, 0x10);
    }

    #[test]
    fn level_line_is_redelivered_after_eoi_only_while_asserted() {
        let mut r = router();
        enable_lapic(&mut r, 0x1_0700);
        program(&mut r, 4, 0x8044);
        r.set_line(4, true);
        assert_eq!(r.acknowledge(0), Some(0x44));
        r.lapic_mmio_write(0, EOI, 4, 0, 10);
        assert!(r.lapic(0).requested(0x44), "still asserted: delivered again");
        assert_eq!(r.acknowledge(0), Some(0x44));
        r.set_line(4, false);
        r.lapic_mmio_write(0, EOI, 4, 0, 20);
        assert!(!r.lapic(0).requested(0x44));
        assert_eq!(r.next_vector(0), None);
        assert_eq!(r.ioapic.entry(4) & (1 << 14), 0, "remote IRR clear");
    }

    #[test]
    fn x2apic_eoi_and_ioapic_unmask_go_through_the_router() {
        let mut r = router();
        enable_lapic(&mut r, 0x1_0700);
        // GSI 20 is a PCI line: level-triggered, active low.
        program(&mut r, 20, 0x1_a060);
        r.set_line(20, true);
        assert!(!r.lapic(0).requested(0x60));
        program(&mut r, 20, 0xa060);
        assert!(r.lapic(0).requested(0x60), "unmasking an asserted level pin delivers");
        assert!(InterruptRouter::is_lapic_msr(0x1b) && InterruptRouter::is_lapic_msr(0x80b));
        assert!(!InterruptRouter::is_lapic_msr(0x900));
        assert_eq!(r.lapic_msr_write(0, 0x80b, 0, 0, 0), Err(()), "xAPIC mode");
        r.lapic_msr_write(0, 0x1b, 0xfee0_0c00, 0, 0).unwrap();
        assert_eq!(r.acknowledge(0), Some(0x60));
        r.lapic_msr_write(0, 0x80b, 0, 0, 0).unwrap();
        assert!(r.lapic(0).requested(0x60));
        assert_eq!(r.lapic_msr_read(0, 0x803, 0), Ok(0x0005_0014));
    }

    #[test]
    fn claims_and_timer_forwarding() {
        let mut r = router();
        assert!(r.claims_port(0x21) && r.claims_port(0xa0) && r.claims_port(0x4d1));
        assert!(!r.claims_port(0x22) && !r.claims_port(0x4d2));
        assert!(r.claims_mmio(0xfec0_0010) && r.claims_mmio(0xfee0_0fff));
        assert!(!r.claims_mmio(0xfec0_1000) && !r.claims_mmio(0xfedf_ffff));
        let mut events = Events::default();
        assert_eq!(r.mmio_read(0, 0xfee0_0030, 4, 0, &mut events), 0x0005_0014);
        enable_lapic(&mut r, 0x1_0700);
        r.lapic_mmio_write(0, 0x3e0, 4, 0xb, 0);
        r.lapic_mmio_write(0, 0x320, 4, 0xef, 0);
        r.lapic_mmio_write(0, 0x380, 4, 500, 100);
        assert_eq!(r.next_deadline_ns(0), Some(600));
        r.poll(600);
        assert_eq!(r.next_vector(0), Some(0xef));
    }

    fn smp_router(vcpus: usize) -> InterruptRouter {
        let mut r = InterruptRouter::with_vcpus(1_000_000_000, vcpus);
        for cpu in 0..vcpus {
            r.lapic_mmio_write(cpu, SVR, 4, 0x1ff, 0);
        }
        r
    }

    /// An xAPIC ICR write by `cpu`: high word first, as the SDM asks.
    fn icr(r: &mut InterruptRouter, cpu: usize, destination: u8, low: u32) {
        r.lapic_mmio_write(cpu, 0x310, 4, u64::from(destination) << 24, 0);
        r.lapic_mmio_write(cpu, 0x300, 4, low.into(), 0);
    }

    #[test]
    fn init_sipi_starts_an_application_processor_once() {
        let mut r = InterruptRouter::with_vcpus(1_000_000_000, 4);
        assert!(!r.waiting_for_sipi(0) && r.waiting_for_sipi(1) && r.waiting_for_sipi(3));
        r.lapic_mmio_write(0, SVR, 4, 0x1ff, 0);
        icr(&mut r, 0, 2, 0xc500); // INIT assert, level
        icr(&mut r, 0, 2, 0x8500); // INIT de-assert: no effect
        assert_eq!(r.take_kicks(), 1 << 2);
        icr(&mut r, 0, 2, 0x0609); // SIPI, vector 9
        icr(&mut r, 0, 2, 0x060a); // the second SIPI finds it started
        assert_eq!(r.take_sipi(2), Some(9));
        assert_eq!(r.take_sipi(2), None);
        assert!(!r.waiting_for_sipi(2) && r.waiting_for_sipi(1));
        assert_eq!(r.take_sipi(1), None, "only the named AP starts");
    }

    #[test]
    fn fixed_nmi_and_broadcast_ipis_reach_the_named_vcpus() {
        let mut r = smp_router(4);
        icr(&mut r, 1, 3, 0x4041); // fixed, physical 3
        assert!(r.lapic(3).requested(0x41) && !r.lapic(1).requested(0x41));
        assert_eq!(r.take_kicks(), 1 << 3);
        icr(&mut r, 0, 0, 0x000c_4042); // all excluding self
        assert!((1..4).all(|cpu| r.lapic(cpu).requested(0x42)) && !r.lapic(0).requested(0x42));
        icr(&mut r, 2, 0, 0x0004_4043); // self
        assert!(r.lapic(2).requested(0x43) && !r.lapic(0).requested(0x43));
        icr(&mut r, 0, 1, 0x4400); // NMI to 1
        assert!(r.nmi_pending(1) && r.take_nmi(1) && !r.take_nmi(1));
        // Logical flat: LDR bits 1 and 2 set on vCPUs 1 and 2, destination 0b0110.
        for cpu in 0..4 {
            r.lapic_mmio_write(cpu, 0xd0, 4, (1u64 << cpu) << 24, 0);
        }
        icr(&mut r, 0, 0b0110, 0x4844);
        assert!(r.lapic(1).requested(0x44) && r.lapic(2).requested(0x44) && !r.lapic(3).requested(0x44));
        // Lowest priority among 1-3: vCPU 1 raises its TPR, so vCPU 2 takes it.
        r.lapic_mmio_write(1, 0x80, 4, 0x40, 0);
        icr(&mut r, 0, 0b1110, 0x4945);
        assert!(r.lapic(2).requested(0x45) && !r.lapic(1).requested(0x45) && !r.lapic(3).requested(0x45));
    }

    #[test]
    fn ioapic_delivers_to_the_destination_and_only_vcpu0_sees_the_pic() {
        let mut r = smp_router(4);
        let mut events = Events::default();
        // Destination APIC 2 in the high word of pin 10.
        r.mmio_write(0, IOAPIC_BASE, 4, 0x10 + 2 * 10 + 1, 0, &mut events);
        r.mmio_write(0, IOAPIC_BASE + 0x10, 4, 2 << 24, 0, &mut events);
        r.mmio_write(0, IOAPIC_BASE, 4, 0x10 + 2 * 10, 0, &mut events);
        r.mmio_write(0, IOAPIC_BASE + 0x10, 4, 0x5a, 0, &mut events);
        r.take_kicks();
        r.set_line(10, true);
        assert!(r.lapic(2).requested(0x5a) && !r.lapic(0).requested(0x5a));
        assert_eq!(r.take_kicks(), 1 << 2);
        assert_eq!(r.next_vector(2), Some(0x5a));
        assert_eq!(r.acknowledge(2), Some(0x5a));
        // vCPU 1 with its APIC software-disabled still never takes the 8259's vector.
        let mut r = InterruptRouter::with_vcpus(1_000_000_000, 2);
        let mut events = Events::default();
        for (port, value) in [(0x20u16, 0x11u32), (0x21, 0x20), (0x21, 4), (0x21, 1), (0x21, 0)] {
            r.io_write(port, 1, value, 0, &mut events);
        }
        r.set_line(1, true);
        assert_eq!((r.next_vector(0), r.next_vector(1)), (Some(0x21), None));
        assert_eq!(r.take_kicks(), 1);
    }
}
