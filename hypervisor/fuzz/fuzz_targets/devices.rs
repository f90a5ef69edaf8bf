//! Every emulated device through its register interface: the bus with the PC device set a VM
//! has (16550 UARTs, i8254 PIT, CMOS RTC, i8042, ACPI PM block, PCI host, POST code,
//! debug-exit, the test device), and the interrupt router with the i8259 pair, the I/O APIC
//! and the local APICs (xAPIC MMIO, x2APIC and TSC-deadline MSRs, IPIs between vCPUs), fed with
//! the line changes the devices raise, on a guest clock that only moves forward.
//!
//! Input: a machine header (vCPU count, TSC frequency, RTC epoch and memory size, PCI reset
//! control), then a stream of operations (`Op`, decoded with `arbitrary`).
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use hypervisor::devices::ioapic::IOAPIC_BASE;
use hypervisor::devices::test_device::{TestDevice, MMIO_BASE};
use hypervisor::devices::{self, ones, Bus, Device, Events};
use hypervisor::vm::interrupts::InterruptRouter;
use hypervisor::vm::lapic::{LAPIC_BASE, MSR_APIC_BASE, MSR_TSC_DEADLINE, MSR_X2APIC_FIRST};
use libfuzzer_sys::fuzz_target;

/// The ports the device set decodes (and a few neighbours).
const PORTS: [u16; 48] = [
    0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x60, 0x64, 0x70, 0x71, 0x3f8, 0x3f9, 0x3fa,
    0x3fb, 0x3fc, 0x3fd, 0x3fe, 0x3ff, 0x2f8, 0x2f9, 0x2fa, 0x2fb, 0x2fc, 0x2fd, 0x2fe, 0x2ff, 0xf4, 0xf5, 0x80, 0x600,
    0x602, 0x604, 0x605, 0x608, 0x60a, 0xcf8, 0xcf9, 0xcfa, 0xcfb, 0xcfc, 0xcfd, 0xcfe, 0xcff,
];

/// Guest time never goes past this (about 36 years): device models may count on that.
const MAX_NS: u64 = 1 << 60;

#[derive(Arbitrary, Debug)]
enum Port {
    Known(u8),
    Raw(u16),
}

impl Port {
    fn get(&self) -> u16 {
        match *self {
            Port::Known(i) => PORTS[usize::from(i) % PORTS.len()],
            Port::Raw(p) => p,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Gpa {
    Lapic(u16),
    Ioapic(u8),
    Test(u16),
    Raw(u64),
}

impl Gpa {
    fn get(&self) -> u64 {
        match *self {
            Gpa::Lapic(o) => LAPIC_BASE + u64::from(o % 0x1000),
            Gpa::Ioapic(o) => IOAPIC_BASE + u64::from(o),
            Gpa::Test(o) => MMIO_BASE + u64::from(o % 0x1000),
            Gpa::Raw(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Msr {
    ApicBase,
    TscDeadline,
    X2apic(u8),
    Raw(u32),
}

impl Msr {
    fn get(&self) -> u32 {
        match *self {
            Msr::ApicBase => MSR_APIC_BASE,
            Msr::TscDeadline => MSR_TSC_DEADLINE,
            Msr::X2apic(r) => MSR_X2APIC_FIRST + u32::from(r),
            Msr::Raw(m) => m,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Port access; `size` picks 1, 2 or 4 bytes.
    Io { port: Port, size: u8, write: bool, value: u32 },
    /// MMIO access by vCPU `cpu`; `size` picks 1, 2, 4 or 8 bytes.
    Mmio { cpu: u8, gpa: Gpa, size: u8, write: bool, value: u64 },
    /// RDMSR/WRMSR of a local APIC MSR by vCPU `cpu`.
    Msr { cpu: u8, msr: Msr, write: bool, value: u64 },
    /// A byte typed on the console.
    Input(u8),
    /// Guest time moves on by `delta << shift` ns; the timers are polled.
    Advance { delta: u16, shift: u8 },
    /// A device line changes level.
    Line { gsi: u8, level: bool },
    /// vCPU `cpu` takes its next interrupt (and NMI and start-up IPI).
    Acknowledge { cpu: u8 },
    /// MOV to CR8 on vCPU `cpu`.
    Tpr { cpu: u8, tpr: u8 },
}

struct Machine {
    bus: Bus,
    router: InterruptRouter,
    now: u64,
    tsc_hz: u64,
    events: Events,
    /// What the last operation read or raised (with `FUZZ_VERBOSE`).
    last: String,
}

impl Machine {
    fn cpu(&self, cpu: u8) -> usize {
        usize::from(cpu) % self.router.vcpus()
    }

    /// Acts on the devices' line changes, as the run loop does; the other requests only
    /// need to be bounded.
    fn settle(&mut self) {
        let events = std::mem::take(&mut self.events);
        if hypervisor_fuzz::verbose() && events != Events::default() {
            self.last += &format!(" {events:x?}");
        }
        self.router.set_lines(&events.irq_lines);
        assert!(events.console.len() <= 64, "{} console bytes from one access", events.console.len());
        assert!(events.interrupts.len() <= 1);
        let _ = self.router.take_kicks();
    }

    fn tsc(&self) -> u64 {
        (u128::from(self.now) * u128::from(self.tsc_hz) / 1_000_000_000) as u64
    }

    fn read(&mut self, value: u64) {
        if hypervisor_fuzz::verbose() {
            self.last = format!("read {value:#x}");
        }
    }

    fn step(&mut self, op: &Op) {
        let now = self.now;
        self.last.clear();
        match *op {
            Op::Io { ref port, size, write, value } => {
                let port = port.get();
                let size = [1, 2, 4][usize::from(size % 3)];
                let value = value & ones(size) as u32;
                if self.router.claims_port(port) {
                    if write {
                        self.router.io_write(port, size, value, now, &mut self.events);
                    } else {
                        let v = self.router.io_read(port, size, now, &mut self.events);
                        self.read(v.into());
                        assert_eq!(u64::from(v) & !ones(size), 0, "8259 read of port {port:#x} wider than {size}");
                    }
                } else if write {
                    self.bus.io_write(port, size, value, now, &mut self.events);
                } else if let Some(v) = self.bus.io_read(port, size, now, &mut self.events) {
                    self.read(v.into());
                    assert_eq!(u64::from(v) & !ones(size), 0);
                }
            }
            Op::Mmio { cpu, ref gpa, size, write, value } => {
                let cpu = self.cpu(cpu);
                let gpa = gpa.get();
                let size = [1, 2, 4, 8][usize::from(size % 4)];
                let value = value & ones(size);
                if self.router.claims_mmio(gpa) {
                    if write {
                        self.router.mmio_write(cpu, gpa, size, value, now, &mut self.events);
                    } else {
                        let v = self.router.mmio_read(cpu, gpa, size, now, &mut self.events);
                        self.read(v);
                    }
                } else if write {
                    self.bus.mmio_write(gpa, size, value, now, &mut self.events);
                } else if let Some(v) = self.bus.mmio_read(gpa, size, now, &mut self.events) {
                    self.read(v);
                    assert_eq!(v & !ones(size), 0);
                }
            }
            Op::Msr { cpu, ref msr, write, value } => {
                let cpu = self.cpu(cpu);
                let msr = msr.get();
                if InterruptRouter::is_lapic_msr(msr) {
                    if write {
                        let _ = self.router.lapic_msr_write(cpu, msr, value, now, self.tsc());
                    } else {
                        if let Ok(v) = self.router.lapic_msr_read(cpu, msr, now) {
                            self.read(v);
                        }
                    }
                }
            }
            Op::Input(byte) => {
                if self.bus.input_ready() {
                    self.bus.input(byte, now, &mut self.events);
                }
            }
            Op::Advance { delta, shift } => {
                self.now = now.saturating_add(u64::from(delta) << (shift % 40)).min(MAX_NS);
                let now = self.now;
                self.bus.poll(now, &mut self.events);
                self.router.poll(now);
                // What fell due has been raised: no deadline is left in the past, or the run
                // loop would arm a zero timeout again and again.
                if let Some(deadline) = self.bus.next_deadline_ns() {
                    assert!(deadline > now, "a device deadline {deadline} remains at {now} after polling");
                }
                for cpu in 0..self.router.vcpus() {
                    if let Some(deadline) = self.router.next_deadline_ns(cpu) {
                        assert!(deadline > now, "local APIC {cpu} deadline {deadline} remains at {now}");
                    }
                }
            }
            Op::Line { gsi, level } => self.router.set_line(gsi % 26, level),
            Op::Acknowledge { cpu } => {
                let cpu = self.cpu(cpu);
                let expected = self.router.next_vector(cpu);
                assert_eq!(self.router.acknowledge(cpu), expected, "vCPU {cpu} acknowledged another vector");
                if hypervisor_fuzz::verbose() {
                    self.last = format!("vector {expected:x?}");
                }
                let lapic = self.router.lapic(cpu);
                if let Some(v) = lapic.pending() {
                    assert!(v >> 4 > lapic.ppr() >> 4, "vector {v:#x} pending under PPR {:#x}", lapic.ppr());
                }
                let _ = (lapic.summary(), lapic.view());
                let _ = self.router.take_nmi(cpu);
                let _ = self.router.take_sipi(cpu);
            }
            Op::Tpr { cpu, tpr } => {
                let cpu = self.cpu(cpu);
                self.router.set_tpr(cpu, (tpr & 0xf) << 4);
                assert_eq!(self.router.lapic(cpu).tpr(), (tpr & 0xf) << 4);
            }
        }
        self.settle();
    }
}

fn run(data: &[u8]) -> arbitrary::Result<()> {
    let mut u = Unstructured::new(data);
    let vcpus = [1, 2, 4, 64][usize::from(u.arbitrary::<u8>()? % 4)];
    let tsc_hz = match u.arbitrary::<u8>()? % 3 {
        0 => 1_000_000_000,
        1 => 2_900_000_000,
        _ => u.arbitrary::<u32>()?.into(),
    };
    let epoch: u64 = u.arbitrary()?;
    let memory: u64 = u.arbitrary()?;
    let reset_control: bool = u.arbitrary()?;

    let mut rtc = devices::rtc::Rtc::new(epoch);
    rtc.set_memory_size(memory);
    let mut set: Vec<Box<dyn Device>> = vec![
        Box::new(devices::uart::Uart16550::new(devices::uart::COM1_BASE, devices::uart::COM1_IRQ)),
        Box::new(devices::uart::Uart16550::new(0x2f8, 3)),
        Box::new(devices::debug_exit::DebugExit),
        Box::new(devices::PostCode),
        Box::new(devices::pit::Pit::new()),
        Box::new(rtc),
        Box::new(devices::i8042::I8042::new()),
        Box::new(TestDevice::default()),
    ];
    // Port 0xcf9 belongs to the ACPI reset register or to the PCI host.
    if reset_control {
        set.push(Box::new(devices::pci::PciHost::with_reset_control()));
    } else {
        set.push(Box::new(devices::acpi_pm::AcpiPm::new()));
        set.push(Box::new(devices::pci::PciHost::new()));
    }
    let mut bus = Bus::new();
    for device in set {
        let _ = (device.name(), device.ports(), device.mmio());
        bus.add(device).expect("the device set does not overlap");
    }
    let mut machine = Machine {
        bus,
        router: InterruptRouter::with_vcpus(tsc_hz, vcpus),
        now: 0,
        tsc_hz,
        events: Events::default(),
        last: String::new(),
    };
    while !u.is_empty() {
        let op: Op = u.arbitrary()?;
        if hypervisor_fuzz::verbose() {
            eprintln!("at {} ns: {op:x?}", machine.now);
        }
        machine.step(&op);
        if hypervisor_fuzz::verbose() && !machine.last.is_empty() {
            eprintln!("    -> {}", machine.last);
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
