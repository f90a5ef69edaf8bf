//! PCI configuration mechanism #1 (PCI Local Bus Specification 3.0, 3.2.2.3.2), an i440FX host
//! bridge at 00:00.0, and the functions plugged into bus 0 ([`PciFunction`]): one per slot from
//! 00:01.0 on, single-function. Every other bus, device and function is absent.
//!
//! The host claims its memory window ([`MMIO_WINDOW_BASE`]) and routes accesses there to the
//! BAR that decodes them, as the bridge forwards its window to the bus; BARs the guest moves
//! outside the window are not reached (the DSDT tells it where the window is). Like firmware,
//! [`PciHost::add_function`] assigns every BAR an address in the window and turns on memory
//! decoding before the guest runs.
//!
//! CONFIG_ADDRESS at 0xcf8 is only reached by dword accesses; byte and word accesses to
//! 0xcf8-0xcfb pass through as ordinary I/O, which is what Linux's `pci_check_type1` relies on.
//! Port 0xcf9 (the PIIX reset control register) is claimed only by
//! [`PciHost::with_reset_control`], so a separate reset device can own it otherwise.

pub mod config;
pub mod msi;
pub mod msix;

use alloc::boxed::Box;
use alloc::vec::Vec;

use super::{ones, Device, Events, Power, Span};
use crate::loader::GuestMemory;
use config::{ConfigSpace, BARS, COMMAND, COMMAND_MEMORY, INTERRUPT_LINE, INTERRUPT_PIN, REVISION, STATUS, SUBSYSTEM};

/// The host bridge's memory window for BARs: above the largest guest RAM (3 GiB) and the test
/// device's page, below the I/O APIC. Described to the guest in the DSDT's `PCI0._CRS`.
pub const MMIO_WINDOW_BASE: u64 = 0xe000_0000;
/// Length of the BAR window (up to the I/O APIC at 0xfec0_0000).
pub const MMIO_WINDOW_LEN: u64 = 0x1ec0_0000;
/// Device numbers on bus 0 (slot 0 is the host bridge).
pub const SLOTS: u8 = 32;
/// First GSI of the PCI interrupt lines; INTx lines are level-triggered and active low.
pub const INTX_FIRST_GSI: u8 = 16;
/// Number of I/O APIC inputs the INTx lines share (GSIs 16 to 23).
pub const INTX_GSIS: u8 = 8;

/// The GSI that INTx pin `pin` (0 = INTA# to 3 = INTD#) of slot `slot` on bus 0 is wired to:
/// the usual rotation, so neighbouring slots do not share lines. The DSDT's `_PRT` lists the
/// same table.
pub fn intx_gsi(slot: u8, pin: u8) -> u8 {
    INTX_FIRST_GSI + (slot.wrapping_add(pin) % INTX_GSIS)
}

/// CONFIG_ADDRESS.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// First CONFIG_DATA port (0xcfc-0xcff).
pub const CONFIG_DATA: u16 = 0xcfc;
/// PIIX3 reset control register.
pub const RESET_CONTROL: u16 = 0xcf9;

/// CONFIG_ADDRESS bit 31: the data ports reach configuration space.
const ENABLE: u32 = 0x8000_0000;
/// Implemented CONFIG_ADDRESS bits: enable, bus, device, function, register; bits 30:24 are
/// reserved and bits 1:0 read as 0 (PCI 3.0, 3.2.2.3.2).
const ADDRESS_MASK: u32 = 0x80ff_fffc;

/// Reset control bit 2: reset the CPU (PIIX3 datasheet, RC register).
const RCR_RESET_CPU: u8 = 0x04;
/// Reset control bit 1: hard (system) reset; the only bit that reads back.
const RCR_SYSTEM_RESET: u8 = 0x02;

const HOST_BRIDGE_VENDOR: u16 = 0x8086;
/// 82441FX (i440FX) PCI and memory controller.
const HOST_BRIDGE_DEVICE: u16 = 0x1237;
const HOST_BRIDGE_REVISION: u8 = 0x02;
/// The subsystem ids QEMU's i440FX reports, so guests see the two alike.
const SUBSYSTEM_VENDOR: u16 = 0x1af4;
const SUBSYSTEM_ID: u16 = 0x1100;
/// Base class 06 (bridge), subclass 00 (host bridge), programming interface 00.
const CLASS_HOST_BRIDGE: [u8; 3] = [0x00, 0x00, 0x06];
/// Command after reset: memory space and bus master enabled (82441FX PCICMD default).
const COMMAND_RESET: u16 = 0x0006;
/// Writable command bits: I/O, memory, bus master, parity error response, SERR#.
const COMMAND_WRITABLE: u16 = 0x0147;
/// Status: fast back-to-back capable, medium DEVSEL timing (82441FX PCISTS default). The
/// write-one-to-clear error bits never get set here, so writes leave status unchanged.
const BRIDGE_STATUS: u16 = 0x0280;
/// Master latency timer (offset 0x0d): bits 7:3 are writable on the 82441FX.
const LATENCY_WRITABLE: u8 = 0xf8;

/// Master latency timer (PCI 3.0, 6.1).
const LATENCY_TIMER: usize = 0x0d;

/// One single-function device on bus 0. Configuration accesses arrive whole (1, 2 or 4 bytes
/// inside one dword); BAR accesses with the offset inside the BAR.
pub trait PciFunction {
    /// Name for logs.
    fn name(&self) -> &'static str;
    /// The configuration space as it stands.
    fn config(&self) -> &ConfigSpace;
    /// The configuration space, for what firmware sets up before the guest runs.
    fn config_mut(&mut self) -> &mut ConfigSpace;
    /// Told once, when plugged in: the slot and the GSI its INTx pin is wired to.
    fn attach(&mut self, _slot: u8, _intx_gsi: u8) {}
    /// Configuration read; registers with side effects override it.
    fn config_read(&mut self, offset: usize, size: u8, _events: &mut Events) -> u32 {
        self.config().read(offset, size)
    }
    /// Configuration write.
    fn config_write(&mut self, offset: usize, size: u8, value: u32, _events: &mut Events) {
        self.config_mut().write(offset, size, value);
    }
    /// Read of BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, size: u8, now_ns: u64, events: &mut Events) -> u64;
    /// Write of BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, size: u8, value: u64, now_ns: u64, events: &mut Events);
    /// Work that needs guest memory (see [`Device::run_dma`]).
    fn run_dma(&mut self, _memory: &mut dyn GuestMemory, _now_ns: u64, _events: &mut Events) {}
    /// Whether [`PciFunction::run_dma`] has work left.
    fn dma_pending(&self) -> bool {
        false
    }
    /// A line for the VM's end report, if the function counted something.
    fn report(&self) -> Option<alloc::string::String> {
        None
    }
}

/// Why a function could not be plugged in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlugError {
    /// Every slot of bus 0 is taken.
    NoSlot,
    /// The BARs do not fit in what is left of the window.
    WindowFull,
}

impl core::fmt::Display for PlugError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PlugError::NoSlot => write!(f, "all {} PCI slots are taken", SLOTS - 1),
            PlugError::WindowFull => {
                write!(f, "its BARs do not fit in the PCI memory window ({} MiB)", MMIO_WINDOW_LEN >> 20)
            }
        }
    }
}

/// The PCI host: configuration mechanism #1, the host bridge and the functions on bus 0.
pub struct PciHost {
    address: u32,
    bridge: [u8; 256],
    reset_control: Option<u8>,
    ports: [Span; 4],
    port_count: usize,
    /// Plugged functions with their slots, in slot order.
    functions: Vec<(u8, Box<dyn PciFunction>)>,
    /// Next free address in the window for BARs.
    next_bar: u64,
}

/// The host's memory window, as the bus sees it.
const MMIO_WINDOW: [Span; 1] = [Span { start: MMIO_WINDOW_BASE, len: MMIO_WINDOW_LEN }];

/// What CONFIG_ADDRESS selects.
enum Selected {
    /// The host bridge, at this register.
    Bridge(usize),
    /// Plugged function `index`, at this register.
    Function(usize, usize),
}

impl Default for PciHost {
    fn default() -> Self {
        Self::new()
    }
}

impl PciHost {
    /// The host without port 0xcf9.
    pub fn new() -> Self {
        PciHost {
            address: 0,
            bridge: host_bridge_header(),
            reset_control: None,
            ports: [
                Span { start: CONFIG_ADDRESS as u64, len: 1 },
                Span { start: 0xcfa, len: 2 },
                Span { start: CONFIG_DATA as u64, len: 4 },
                Span { start: RESET_CONTROL as u64, len: 1 },
            ],
            port_count: 3,
            functions: Vec::new(),
            next_bar: MMIO_WINDOW_BASE,
        }
    }

    /// Plugs `function` into the next free slot, assigns its BARs in the window, naturally
    /// aligned, and turns on memory decoding; returns the slot.
    pub fn add_function(&mut self, mut function: Box<dyn PciFunction>) -> Result<u8, PlugError> {
        let slot = self.functions.len() as u8 + 1;
        if slot >= SLOTS {
            return Err(PlugError::NoSlot);
        }
        let mut next = self.next_bar;
        let mut bases = [None; BARS];
        for (bar, base) in bases.iter_mut().enumerate() {
            let Some(size) = sizing(function.config_mut(), bar) else { continue };
            let at = next.next_multiple_of(size);
            next = at
                .checked_add(size)
                .filter(|&end| end <= MMIO_WINDOW_BASE + MMIO_WINDOW_LEN)
                .ok_or(PlugError::WindowFull)?;
            *base = Some(at);
        }
        let space = function.config_mut();
        for (bar, base) in bases.iter().enumerate() {
            if let Some(base) = base {
                space.assign_bar(bar, *base);
            }
        }
        let pin = space.byte(INTERRUPT_PIN);
        let gsi = intx_gsi(slot, pin.saturating_sub(1));
        if pin != 0 {
            space.write(INTERRUPT_LINE, 1, gsi.into());
        }
        let command = space.command() | COMMAND_MEMORY;
        space.write(COMMAND, 2, command.into());
        function.attach(slot, gsi);
        self.next_bar = next;
        self.functions.push((slot, function));
        Ok(slot)
    }

    /// The function and BAR that decode `gpa`, with the offset into the BAR.
    fn decoder(&mut self, gpa: u64) -> Option<(&mut Box<dyn PciFunction>, usize, u64)> {
        self.functions.iter_mut().find_map(|(_, function)| {
            let (bar, offset) = (0..BARS).find_map(|bar| {
                let (base, size) = function.config().bar_range(bar)?;
                let offset = gpa.checked_sub(base).filter(|&offset| offset < size)?;
                Some((bar, offset))
            })?;
            Some((function, bar, offset))
        })
    }

    /// The host that also answers the reset control register at 0xcf9: a write with bit 2 set
    /// requests a platform reset (Linux `reboot=pci`, or an ACPI RESET_REG at 0xcf9 value 6).
    pub fn with_reset_control() -> Self {
        PciHost { reset_control: Some(0), port_count: 4, ..Self::new() }
    }

    /// The function CONFIG_ADDRESS selects and the register, if it is present.
    fn selected(&self) -> Option<Selected> {
        // Bus 0 (bits 23:16), function 0 (bits 10:8).
        if self.address & ENABLE == 0 || self.address & 0x00ff_0700 != 0 {
            return None;
        }
        let register = (self.address & 0xfc) as usize;
        match ((self.address >> 11) & 0x1f) as u8 {
            0 => Some(Selected::Bridge(register)),
            slot => {
                self.functions.iter().position(|(s, _)| *s == slot).map(|index| Selected::Function(index, register))
            }
        }
    }

    fn config_read_byte(&self, register: usize) -> u8 {
        self.bridge.get(register).copied().unwrap_or(0xff)
    }

    fn config_write_byte(&mut self, register: usize, value: u8) {
        let mask = match register {
            COMMAND => COMMAND_WRITABLE as u8,
            r if r == COMMAND + 1 => (COMMAND_WRITABLE >> 8) as u8,
            LATENCY_TIMER => LATENCY_WRITABLE,
            _ => 0,
        };
        if let Some(byte) = self.bridge.get_mut(register) {
            *byte = (*byte & !mask) | (value & mask);
        }
    }
}

/// The host bridge's 256-byte configuration space after reset.
fn host_bridge_header() -> [u8; 256] {
    let mut h = [0u8; 256];
    h[0..2].copy_from_slice(&HOST_BRIDGE_VENDOR.to_le_bytes());
    h[2..4].copy_from_slice(&HOST_BRIDGE_DEVICE.to_le_bytes());
    h[COMMAND..COMMAND + 2].copy_from_slice(&COMMAND_RESET.to_le_bytes());
    h[STATUS..STATUS + 2].copy_from_slice(&BRIDGE_STATUS.to_le_bytes());
    h[REVISION] = HOST_BRIDGE_REVISION;
    h[REVISION + 1..REVISION + 4].copy_from_slice(&CLASS_HOST_BRIDGE);
    // Header type 0 (single function) at 0x0e; BARs 0x10-0x27, expansion ROM, capabilities
    // pointer and interrupt pin stay 0: none implemented.
    h[SUBSYSTEM..SUBSYSTEM + 2].copy_from_slice(&SUBSYSTEM_VENDOR.to_le_bytes());
    h[SUBSYSTEM + 2..SUBSYSTEM + 4].copy_from_slice(&SUBSYSTEM_ID.to_le_bytes());
    h
}

impl Device for PciHost {
    fn name(&self) -> &'static str {
        "pci-host"
    }

    fn ports(&self) -> &[Span] {
        self.ports.get(..self.port_count).unwrap_or(&[])
    }

    fn io_read(&mut self, port: u16, size: u8, _now_ns: u64, events: &mut Events) -> u32 {
        if port == CONFIG_ADDRESS && size == 4 {
            return self.address;
        }
        if port == RESET_CONTROL && size == 1 {
            if let Some(rcr) = self.reset_control {
                return rcr.into();
            }
        }
        let Some(data_offset) = port.checked_sub(CONFIG_DATA) else {
            // Byte and word accesses at 0xcf8-0xcfb reach no register.
            return ones(size) as u32;
        };
        let lane = usize::from(data_offset);
        // Bytes past 0xcff float high.
        let width = size.min(4).min(4 - lane as u8);
        let value = match self.selected() {
            Some(Selected::Bridge(register)) => (0..width).fold(0u32, |value, i| {
                value | u32::from(self.config_read_byte(register + lane + usize::from(i))) << (8 * i)
            }),
            Some(Selected::Function(index, register)) => {
                let function = &mut self.functions[index].1;
                match width {
                    1 | 2 | 4 => function.config_read(register + lane, width, events),
                    // Three bytes up to 0xcff: byte by byte.
                    _ => (0..width).fold(0u32, |value, i| {
                        value | function.config_read(register + lane + usize::from(i), 1, events) << (8 * i)
                    }),
                }
            }
            // Every byte of an absent function floats high.
            None => return ones(size) as u32,
        };
        value | (ones(size) as u32 & !low_bytes(width))
    }

    fn io_write(&mut self, port: u16, size: u8, value: u32, _now_ns: u64, events: &mut Events) {
        if port == CONFIG_ADDRESS && size == 4 {
            self.address = value & ADDRESS_MASK;
            return;
        }
        if port == RESET_CONTROL && size == 1 {
            if let Some(rcr) = self.reset_control.as_mut() {
                let byte = value as u8;
                *rcr = byte & RCR_SYSTEM_RESET;
                if byte & RCR_RESET_CPU != 0 {
                    events.power = Some(Power::Reset);
                }
                return;
            }
        }
        let Some(data_offset) = port.checked_sub(CONFIG_DATA) else {
            return;
        };
        let lane = usize::from(data_offset);
        let width = size.min(4).min(4 - lane as u8);
        match self.selected() {
            Some(Selected::Bridge(register)) => {
                for (i, byte) in value.to_le_bytes().into_iter().enumerate().take(usize::from(width)) {
                    self.config_write_byte(register + lane + i, byte);
                }
            }
            Some(Selected::Function(index, register)) => {
                let function = &mut self.functions[index].1;
                match width {
                    1 | 2 | 4 => function.config_write(register + lane, width, value & low_bytes(width), events),
                    _ => {
                        for (i, byte) in value.to_le_bytes().into_iter().enumerate().take(usize::from(width)) {
                            function.config_write(register + lane + i, 1, byte.into(), events);
                        }
                    }
                }
            }
            None => {}
        }
    }

    fn mmio(&self) -> &[Span] {
        &MMIO_WINDOW
    }

    fn mmio_read(&mut self, gpa: u64, size: u8, now_ns: u64, events: &mut Events) -> u64 {
        match self.decoder(gpa) {
            Some((function, bar, offset)) => function.bar_read(bar, offset, size, now_ns, events),
            // Nothing decodes it: master abort, all ones.
            None => ones(size),
        }
    }

    fn mmio_write(&mut self, gpa: u64, size: u8, value: u64, now_ns: u64, events: &mut Events) {
        if let Some((function, bar, offset)) = self.decoder(gpa) {
            function.bar_write(bar, offset, size, value, now_ns, events);
        }
    }

    fn run_dma(&mut self, memory: &mut dyn GuestMemory, now_ns: u64, events: &mut Events) {
        for (_, function) in &mut self.functions {
            if function.dma_pending() {
                function.run_dma(memory, now_ns, events);
            }
        }
    }

    fn dma_pending(&self) -> bool {
        self.functions.iter().any(|(_, function)| function.dma_pending())
    }

    fn report(&self, lines: &mut Vec<alloc::string::String>) {
        lines.extend(self.functions.iter().filter_map(|(_, function)| function.report()));
    }

    fn as_pci_host(&mut self) -> Option<&mut PciHost> {
        Some(self)
    }
}

/// The low `count` bytes of a dword set (0 to 4 bytes).
fn low_bytes(count: u8) -> u32 {
    (0xffff_ffff_u64 >> (32 - 8 * u32::from(count.min(4)))) as u32
}

/// The size of BAR `bar`, found as the OS finds it: write all ones, read back, restore.
fn sizing(space: &mut ConfigSpace, bar: usize) -> Option<u64> {
    let offset = config::BAR0 + 4 * bar;
    let saved = space.read(offset, 4);
    space.write(offset, 4, 0xffff_ffff);
    let low = space.read(offset, 4);
    space.write(offset, 4, saved);
    if low & 1 != 0 || low & !0xf == 0 {
        // No BAR, or the upper half of a 64-bit one (which reads all ones): not a BAR to place.
        return None;
    }
    let mask = u64::from(low & !0xf);
    let size = if low & 0b110 == 0b100 {
        let high_offset = offset + 4;
        let saved_high = space.read(high_offset, 4);
        space.write(high_offset, 4, 0xffff_ffff);
        let high = u64::from(space.read(high_offset, 4));
        space.write(high_offset, 4, saved_high);
        !((high << 32) | mask) + 1
    } else {
        u64::from(!(mask as u32)) + 1
    };
    Some(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::Bus;
    use alloc::boxed::Box;

    fn address(bus: u32, device: u32, function: u32, register: u32) -> u32 {
        ENABLE | bus << 16 | device << 11 | function << 8 | register
    }

    fn read(pci: &mut PciHost, addr: u32, offset: u16, size: u8) -> u32 {
        let mut ev = Events::default();
        pci.io_write(CONFIG_ADDRESS, 4, addr, 0, &mut ev);
        pci.io_read(CONFIG_DATA + offset, size, 0, &mut ev)
    }

    #[test]
    fn host_bridge_identifies_as_i440fx() {
        let mut pci = PciHost::new();
        assert_eq!(read(&mut pci, address(0, 0, 0, 0x00), 0, 4), 0x1237_8086);
        assert_eq!(read(&mut pci, address(0, 0, 0, 0x04), 0, 4), 0x0280_0006, "status, command");
        assert_eq!(read(&mut pci, address(0, 0, 0, 0x08), 0, 4), 0x0600_0002, "class 06/00/00, rev 2");
        assert_eq!(read(&mut pci, address(0, 0, 0, 0x0c), 0, 4), 0, "header type 0");
        for bar in (0x10..0x28).step_by(4) {
            assert_eq!(read(&mut pci, address(0, 0, 0, bar), 0, 4), 0, "BAR at {bar:#x}");
        }
        assert_eq!(read(&mut pci, address(0, 0, 0, 0x2c), 0, 4), 0x1100_1af4);
        assert_eq!(read(&mut pci, address(0, 0, 0, 0xfc), 0, 4), 0);
    }

    #[test]
    fn partial_reads_pick_the_lanes_of_the_data_port() {
        let mut pci = PciHost::new();
        let id = address(0, 0, 0, 0x00);
        assert_eq!(read(&mut pci, id, 0, 1), 0x86);
        assert_eq!(read(&mut pci, id, 1, 1), 0x80);
        assert_eq!(read(&mut pci, id, 2, 1), 0x37);
        assert_eq!(read(&mut pci, id, 3, 1), 0x12);
        assert_eq!(read(&mut pci, id, 2, 2), 0x1237);
        // Linux's sanity check: the class word at 0x0a.
        assert_eq!(read(&mut pci, address(0, 0, 0, 0x08), 2, 2), 0x0600);
        assert_eq!(read(&mut pci, id, 3, 2), 0xff12, "the byte past 0xcff floats high");
        assert_eq!(read(&mut pci, id, 1, 4), 0xff12_3780);
        // Register bits 1:0 are not part of the address.
        assert_eq!(read(&mut pci, id | 0x3, 0, 4), 0x1237_8086);
    }

    #[test]
    fn address_decoding_and_absent_functions() {
        let mut pci = PciHost::new();
        let mut ev = Events::default();
        for absent in [address(0, 1, 0, 0), address(0, 0, 1, 0), address(1, 0, 0, 0), address(0, 31, 7, 0)] {
            assert_eq!(read(&mut pci, absent, 0, 4), 0xffff_ffff, "{absent:#x}");
            assert_eq!(read(&mut pci, absent, 2, 2), 0xffff);
            pci.io_write(CONFIG_ADDRESS, 4, absent | 0x04, 0, &mut ev);
            pci.io_write(CONFIG_DATA, 2, 0, 0, &mut ev);
        }
        assert_eq!(read(&mut pci, 0, 0, 4), 0xffff_ffff, "enable bit clear");
        // CONFIG_ADDRESS keeps only its implemented bits.
        pci.io_write(CONFIG_ADDRESS, 4, 0xffff_ffff, 0, &mut ev);
        assert_eq!(pci.io_read(CONFIG_ADDRESS, 4, 0, &mut ev), 0x80ff_fffc);
        assert_eq!(read(&mut pci, address(0, 0, 0, 4), 0, 2), 0x0006, "writes to absent functions ignored");
        assert_eq!(ev, Events::default());
    }

    #[test]
    fn only_command_and_latency_are_writable() {
        let mut pci = PciHost::new();
        let mut ev = Events::default();
        pci.io_write(CONFIG_ADDRESS, 4, address(0, 0, 0, 0x00), 0, &mut ev);
        pci.io_write(CONFIG_DATA, 4, 0, 0, &mut ev);
        assert_eq!(pci.io_read(CONFIG_DATA, 4, 0, &mut ev), 0x1237_8086, "ids are read-only");
        pci.io_write(CONFIG_ADDRESS, 4, address(0, 0, 0, 0x04), 0, &mut ev);
        pci.io_write(CONFIG_DATA, 4, 0xffff_ffff, 0, &mut ev);
        assert_eq!(pci.io_read(CONFIG_DATA, 4, 0, &mut ev), 0x0280_0147);
        pci.io_write(CONFIG_DATA, 1, 0x00, 0, &mut ev);
        assert_eq!(pci.io_read(CONFIG_DATA, 2, 0, &mut ev), 0x0100, "byte write hits the low byte only");
        pci.io_write(CONFIG_ADDRESS, 4, address(0, 0, 0, 0x0c), 0, &mut ev);
        pci.io_write(CONFIG_DATA + 1, 1, 0xff, 0, &mut ev);
        assert_eq!(pci.io_read(CONFIG_DATA, 4, 0, &mut ev), 0x0000_f800);
        pci.io_write(CONFIG_ADDRESS, 4, address(0, 0, 0, 0x10), 0, &mut ev);
        pci.io_write(CONFIG_DATA, 4, 0xffff_ffff, 0, &mut ev);
        assert_eq!(pci.io_read(CONFIG_DATA, 4, 0, &mut ev), 0, "no BAR to size");
    }

    #[test]
    fn linux_detects_configuration_type_1() {
        // arch/x86/pci/direct.c: pci_check_type1, through the bus as the guest reaches it.
        let mut bus = Bus::new();
        bus.add(Box::new(PciHost::new())).unwrap();
        let mut ev = Events::default();
        assert!(bus.io_write(0xcfb, 1, 0x01, 0, &mut ev));
        let saved = bus.io_read(0xcf8, 4, 0, &mut ev).unwrap();
        assert_eq!(saved, 0, "the byte write at 0xcfb is not CONFIG_ADDRESS");
        assert!(bus.io_write(0xcf8, 4, 0x8000_0000, 0, &mut ev));
        assert_eq!(bus.io_read(0xcf8, 4, 0, &mut ev), Some(0x8000_0000));
        // pci_sanity_check: the class word of 00:00.0 (register 0x0a) is a host bridge.
        bus.io_write(0xcf8, 4, 0x8000_0008, 0, &mut ev);
        assert_eq!(bus.io_read(0xcfe, 2, 0, &mut ev), Some(0x0600));
        bus.io_write(0xcf8, 4, saved, 0, &mut ev);
        // pci_check_type2 must fail: byte reads at 0xcf8 and 0xcfa do not read back 0.
        bus.io_write(0xcf8, 1, 0, 0, &mut ev);
        bus.io_write(0xcfa, 1, 0, 0, &mut ev);
        assert_eq!(bus.io_read(0xcf8, 1, 0, &mut ev), Some(0xff));
        assert_eq!(bus.io_read(0xcfa, 1, 0, &mut ev), Some(0xff));
        assert_eq!(bus.io_read(0xcf9, 1, 0, &mut ev), None, "0xcf9 is left to a reset device");
    }

    #[test]
    fn reset_control_requests_a_reset_on_bit_2() {
        let mut pci = PciHost::with_reset_control();
        assert_eq!(pci.ports().len(), 4);
        let mut ev = Events::default();
        pci.io_write(RESET_CONTROL, 1, 0x02, 0, &mut ev);
        assert_eq!(ev.power, None);
        assert_eq!(pci.io_read(RESET_CONTROL, 1, 0, &mut ev), 0x02);
        pci.io_write(RESET_CONTROL, 1, 0x06, 0, &mut ev);
        assert_eq!(ev.power, Some(Power::Reset));
        // A dword at 0xcf8 still reaches CONFIG_ADDRESS.
        pci.io_write(CONFIG_ADDRESS, 4, 0x8000_0008, 0, &mut ev);
        assert_eq!(pci.io_read(CONFIG_ADDRESS, 4, 0, &mut ev), 0x8000_0008);
    }
}
