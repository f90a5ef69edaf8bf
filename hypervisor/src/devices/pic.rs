//! Two cascaded 8259A programmable interrupt controllers and the PIIX ELCR registers.
//!
//! The master sits at ports 0x20/0x21 and the slave at 0xA0/0xA1, with the slave's INT output
//! wired to the master's IR2 (as on every PC). The edge/level control registers at 0x4D0/0x4D1
//! choose per line whether it is edge-triggered (latched on a rising edge) or level-triggered
//! (requested for as long as it is asserted). Accesses use the low byte of the addressed port
//! only; wider accesses are treated as byte accesses.

use super::{Device, Events, Span};

/// Master command/status port.
pub const MASTER: u16 = 0x20;
/// Slave command/status port.
pub const SLAVE: u16 = 0xa0;
/// ELCR for IRQs 0-7; 0x4D1 covers IRQs 8-15.
pub const ELCR: u16 = 0x4d0;

/// The master input the slave is cascaded to.
const CASCADE_LINE: u8 = 2;
/// The IR a spurious INTA reports (8259A datasheet, "Interrupt Sequence").
const SPURIOUS_LINE: u8 = 7;
/// Lines whose ELCR bit is writable: IRQ0-2 and IRQ8/IRQ13 are edge-only (PIIX datasheet, ELCR).
const ELCR_WRITABLE: [u8; 2] = [0xf8, 0xde];

const ICW1: u8 = 0x10;
const ICW1_IC4: u8 = 0x01;
const ICW1_SINGLE: u8 = 0x02;
const ICW4_AUTO_EOI: u8 = 0x02;
const ICW4_SFNM: u8 = 0x10;
const OCW3: u8 = 0x08;
const OCW3_POLL: u8 = 0x04;
const OCW3_READ_REGISTER: u8 = 0x02;
const OCW3_READ_ISR: u8 = 0x01;
const OCW3_SPECIAL_MASK: u8 = 0x40;
const OCW3_SET_SPECIAL_MASK: u8 = 0x20;

/// Where the chip is in the ICW sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum Init {
    #[default]
    Ready,
    Icw2,
    Icw3,
    Icw4,
}

/// One 8259A.
#[derive(Clone, Debug, Default)]
struct Chip {
    /// Interrupt request register.
    irr: u8,
    /// In-service register.
    isr: u8,
    /// Interrupt mask register (OCW1).
    imr: u8,
    /// Current input levels, for edge detection and level-triggered requests.
    lines: u8,
    /// Level-triggered lines (ELCR).
    elcr: u8,
    /// Vector of IR0 (ICW2, low three bits zero).
    base: u8,
    /// Lowest-priority line + 1: IR(priority_add) has the highest priority.
    priority_add: u8,
    init: Init,
    icw4_needed: bool,
    single: bool,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_fully_nested: bool,
    special_mask: bool,
    read_isr: bool,
    poll: bool,
}

impl Chip {
    /// Applies an input level change; returns nothing, the caller re-evaluates the outputs.
    fn set_line(&mut self, line: u8, level: bool) {
        let Some(mask) = 1u8.checked_shl(u32::from(line)) else { return };
        if self.elcr & mask != 0 {
            // Level: the request follows the input.
            if level {
                self.irr |= mask;
            } else {
                self.irr &= !mask;
            }
        } else if level && self.lines & mask == 0 {
            // Edge: latched on the rising edge, kept until acknowledged.
            self.irr |= mask;
        }
        if level {
            self.lines |= mask;
        } else {
            self.lines &= !mask;
        }
    }

    /// Highest-priority line set in `mask`, as a priority rank (0 = highest), or 8 for none.
    fn priority(&self, mask: u8) -> u8 {
        (0..8u8).find(|rank| mask & (1 << ((rank + self.priority_add) & 7)) != 0).unwrap_or(8)
    }

    /// The line the chip would signal on INT, if any.
    fn requested(&self, is_master: bool) -> Option<u8> {
        let rank = self.priority(self.irr & !self.imr);
        if rank == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        // Special fully nested mode: a slave request may interrupt the slave's own service.
        if self.special_fully_nested && is_master {
            in_service &= !(1 << CASCADE_LINE);
        }
        (rank < self.priority(in_service)).then_some((rank + self.priority_add) & 7)
    }

    /// INTA for `line`: IRR -> ISR unless auto-EOI; level requests stay in IRR while asserted.
    fn intack(&mut self, line: u8) {
        let mask = 1u8 << (line & 7);
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (line + 1) & 7;
            }
        } else {
            self.isr |= mask;
        }
        if self.elcr & mask == 0 {
            self.irr &= !mask;
        }
    }

    /// ICW1: starts initialisation (8259A datasheet, "Initialization Command Words").
    fn icw1(&mut self, value: u8) {
        // The edge sense latch is reset: a line held high must go low and high again.
        self.irr &= self.elcr & self.lines;
        self.isr = 0;
        self.imr = 0;
        self.priority_add = 0;
        self.special_mask = false;
        self.special_fully_nested = false;
        self.auto_eoi = false;
        self.rotate_on_auto_eoi = false;
        self.read_isr = false;
        self.poll = false;
        self.icw4_needed = value & ICW1_IC4 != 0;
        self.single = value & ICW1_SINGLE != 0;
        self.init = Init::Icw2;
    }

    /// OCW2: end of interrupt and priority rotation.
    fn ocw2(&mut self, value: u8) {
        let line = value & 7;
        match value >> 5 {
            0 => self.rotate_on_auto_eoi = false,
            4 => self.rotate_on_auto_eoi = true,
            // Non-specific EOI, optionally rotating.
            cmd @ (1 | 5) => {
                let rank = self.priority(self.isr);
                if rank != 8 {
                    let served = (rank + self.priority_add) & 7;
                    self.isr &= !(1 << served);
                    if cmd == 5 {
                        self.priority_add = (served + 1) & 7;
                    }
                }
            }
            // Specific EOI, optionally rotating.
            cmd @ (3 | 7) => {
                self.isr &= !(1 << line);
                if cmd == 7 {
                    self.priority_add = (line + 1) & 7;
                }
            }
            6 => self.priority_add = (line + 1) & 7,
            _ => {}
        }
    }

    fn ocw3(&mut self, value: u8) {
        if value & OCW3_POLL != 0 {
            self.poll = true;
        }
        if value & OCW3_READ_REGISTER != 0 {
            self.read_isr = value & OCW3_READ_ISR != 0;
        }
        if value & OCW3_SPECIAL_MASK != 0 {
            self.special_mask = value & OCW3_SET_SPECIAL_MASK != 0;
        }
    }

    fn write_command(&mut self, value: u8) {
        if value & ICW1 != 0 {
            self.icw1(value);
        } else if value & OCW3 != 0 {
            self.ocw3(value);
        } else {
            self.ocw2(value);
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init {
            Init::Ready => self.imr = value,
            Init::Icw2 => {
                self.base = value & 0xf8;
                self.init = match (self.single, self.icw4_needed) {
                    (false, _) => Init::Icw3,
                    (true, true) => Init::Icw4,
                    (true, false) => Init::Ready,
                };
            }
            // The cascade wiring is fixed; ICW3 is accepted and ignored.
            Init::Icw3 => self.init = if self.icw4_needed { Init::Icw4 } else { Init::Ready },
            Init::Icw4 => {
                self.auto_eoi = value & ICW4_AUTO_EOI != 0;
                self.special_fully_nested = value & ICW4_SFNM != 0;
                self.init = Init::Ready;
            }
        }
    }
}

/// The two cascaded 8259As of a PC, with their ELCRs.
#[derive(Clone, Debug, Default)]
pub struct PicPair {
    chips: [Chip; 2],
}

const PORTS: [Span; 3] =
    [Span { start: MASTER as u64, len: 2 }, Span { start: SLAVE as u64, len: 2 }, Span { start: ELCR as u64, len: 2 }];

impl PicPair {
    /// Both chips in their reset state (uninitialised, nothing masked, vector base 0).
    pub fn new() -> Self {
        PicPair::default()
    }

    /// Sets ISA line `line` (0-15) to `level`; other lines are ignored.
    pub fn set_irq(&mut self, line: u8, level: bool) {
        match line {
            0..=7 => self.chips[0].set_line(line, level),
            8..=15 => self.chips[1].set_line(line - 8, level),
            _ => return,
        }
        self.update_cascade();
    }

    /// Whether the master's INT output (the CPU's INTR) is asserted.
    pub fn output(&self) -> bool {
        self.chips[0].requested(true).is_some()
    }

    /// An INTA cycle: the vector the CPU receives, with IRR -> ISR on both chips as needed.
    ///
    /// A request that went away before the acknowledge yields the spurious IR7 vector of the
    /// chip that lost it (IRQ7 or IRQ15) without setting its ISR bit. `None` only while the
    /// master is still being initialised and has no vector base.
    pub fn acknowledge(&mut self) -> Option<u8> {
        if self.chips[0].init != Init::Ready {
            return None;
        }
        let vector = match self.chips[0].requested(true) {
            Some(line) => {
                self.chips[0].intack(line);
                if line == CASCADE_LINE && !self.chips[0].single {
                    let slave_line = match self.chips[1].requested(false) {
                        Some(slave_line) => {
                            self.chips[1].intack(slave_line);
                            slave_line
                        }
                        None => SPURIOUS_LINE,
                    };
                    self.chips[1].base | slave_line
                } else {
                    self.chips[0].base | line
                }
            }
            None => self.chips[0].base | SPURIOUS_LINE,
        };
        self.update_cascade();
        Some(vector)
    }

    /// The vector [`PicPair::acknowledge`] would return now, without acknowledging; `None` while
    /// INTR is low or the master is being initialised.
    pub fn pending_vector(&self) -> Option<u8> {
        let master = &self.chips[0];
        if master.init != Init::Ready {
            return None;
        }
        let line = master.requested(true)?;
        if line == CASCADE_LINE && !master.single {
            let slave = &self.chips[1];
            Some(slave.base | slave.requested(false).unwrap_or(SPURIOUS_LINE))
        } else {
            Some(master.base | line)
        }
    }

    /// Reads the master's IRR, ISR and IMR (for tests and diagnostics).
    pub fn master_registers(&self) -> (u8, u8, u8) {
        (self.chips[0].irr, self.chips[0].isr, self.chips[0].imr)
    }

    /// Reads the slave's IRR, ISR and IMR.
    pub fn slave_registers(&self) -> (u8, u8, u8) {
        (self.chips[1].irr, self.chips[1].isr, self.chips[1].imr)
    }

    /// Feeds the slave's INT output to the master's IR2.
    fn update_cascade(&mut self) {
        let slave_int = self.chips[1].requested(false).is_some();
        self.chips[0].set_line(CASCADE_LINE, slave_int);
    }

    /// OCW3 poll read: acknowledges like INTA and reports 0x80 | line, or 0 with nothing pending.
    fn poll_read(&mut self, chip: usize) -> u8 {
        let is_master = chip == 0;
        let Some(c) = self.chips.get_mut(chip) else { return 0 };
        c.poll = false;
        match c.requested(is_master) {
            Some(line) => {
                c.intack(line);
                if !is_master {
                    // The slave's request no longer needs the master's cascade input.
                    self.chips[0].irr &= !(1 << CASCADE_LINE);
                    self.chips[0].isr &= !(1 << CASCADE_LINE);
                }
                self.update_cascade();
                0x80 | line
            }
            None => 0,
        }
    }
}

impl Device for PicPair {
    fn name(&self) -> &'static str {
        "pic"
    }

    fn ports(&self) -> &[Span] {
        &PORTS
    }

    fn io_read(&mut self, port: u16, _size: u8, _now_ns: u64, _events: &mut Events) -> u32 {
        let byte = match port {
            0x20 | 0xa0 => {
                let chip = usize::from(port == SLAVE);
                if self.chips[chip].poll {
                    self.poll_read(chip)
                } else if self.chips[chip].read_isr {
                    self.chips[chip].isr
                } else {
                    self.chips[chip].irr
                }
            }
            0x21 => self.chips[0].imr,
            0xa1 => self.chips[1].imr,
            0x4d0 => self.chips[0].elcr,
            0x4d1 => self.chips[1].elcr,
            _ => 0xff,
        };
        u32::from(byte)
    }

    fn io_write(&mut self, port: u16, _size: u8, value: u32, _now_ns: u64, _events: &mut Events) {
        let byte = value as u8;
        match port {
            0x20 => self.chips[0].write_command(byte),
            0xa0 => self.chips[1].write_command(byte),
            0x21 => self.chips[0].write_data(byte),
            0xa1 => self.chips[1].write_data(byte),
            0x4d0 | 0x4d1 => {
                let index = usize::from(port == ELCR + 1);
                let chip = &mut self.chips[index];
                chip.elcr = byte & ELCR_WRITABLE[index];
                // Level lines request exactly while asserted; edge lines keep what they latched.
                chip.irr = (chip.irr & !chip.elcr) | (chip.lines & chip.elcr);
            }
            _ => {}
        }
        self.update_cascade();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(pic: &mut PicPair, port: u16, value: u8) {
        pic.io_write(port, 1, value.into(), 0, &mut Events::default());
    }

    fn read(pic: &mut PicPair, port: u16) -> u8 {
        pic.io_read(port, 1, 0, &mut Events::default()) as u8
    }

    /// The sequence Linux and the BIOS use: ICW1 edge + ICW4, bases 0x20/0x28, cascade on IR2.
    fn initialised(auto_eoi: bool) -> PicPair {
        let mut pic = PicPair::new();
        let icw4 = if auto_eoi { 0x03 } else { 0x01 };
        for (port, base, icw3) in [(MASTER, 0x20, 0x04), (SLAVE, 0x28, 0x02)] {
            write(&mut pic, port, 0x11);
            write(&mut pic, port + 1, base);
            write(&mut pic, port + 1, icw3);
            write(&mut pic, port + 1, icw4);
            write(&mut pic, port + 1, 0x00);
        }
        pic
    }

    fn eoi(pic: &mut PicPair, port: u16) {
        write(pic, port, 0x20);
    }

    #[test]
    fn init_sequence_sets_vector_base_and_priority_picks_ir0_over_ir3() {
        let mut pic = initialised(false);
        assert!(!pic.output());
        pic.set_irq(3, true);
        pic.set_irq(0, true);
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), Some(0x20));
        assert_eq!(pic.master_registers(), (0x08, 0x01, 0x00));
        // IR3 has lower priority than the IR0 in service: it waits for the EOI.
        assert!(!pic.output());
        eoi(&mut pic, MASTER);
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), Some(0x23));
        assert_eq!(pic.master_registers(), (0x00, 0x08, 0x00));
        // Specific EOI for IR3 clears exactly that ISR bit.
        write(&mut pic, MASTER, 0x63);
        assert_eq!(pic.master_registers(), (0x00, 0x00, 0x00));
    }

    #[test]
    fn masked_lines_stay_pending_until_unmasked() {
        let mut pic = initialised(false);
        write(&mut pic, MASTER + 1, 0x02);
        assert_eq!(read(&mut pic, MASTER + 1), 0x02);
        pic.set_irq(1, true);
        assert!(!pic.output());
        write(&mut pic, MASTER + 1, 0x00);
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), Some(0x21));
    }

    #[test]
    fn slave_irq12_cascades_through_ir2() {
        let mut pic = initialised(false);
        pic.set_irq(12, true);
        pic.set_irq(12, false);
        assert!(pic.output());
        assert_eq!(pic.pending_vector(), Some(0x2c));
        assert_eq!(pic.acknowledge(), Some(0x2c));
        assert_eq!(pic.master_registers().1, 0x04, "master IR2 in service");
        assert_eq!(pic.slave_registers().1, 0x10, "slave IR4 in service");
        eoi(&mut pic, SLAVE);
        eoi(&mut pic, MASTER);
        assert_eq!((pic.master_registers().1, pic.slave_registers().1), (0, 0));
        // OCW3 read-ISR select then read-IRR select.
        pic.set_irq(9, true);
        write(&mut pic, SLAVE, 0x0a);
        assert_eq!(read(&mut pic, SLAVE), 0x02);
        write(&mut pic, SLAVE, 0x0b);
        assert_eq!(read(&mut pic, SLAVE), 0x00);
    }

    #[test]
    fn edge_lines_latch_once_per_rising_edge_and_level_lines_follow_the_input() {
        let mut pic = initialised(false);
        // Edge: held high after acknowledge, no second request.
        pic.set_irq(4, true);
        assert_eq!(pic.acknowledge(), Some(0x24));
        eoi(&mut pic, MASTER);
        pic.set_irq(4, true);
        assert!(!pic.output());
        // Level via ELCR: requested again after EOI while still asserted.
        write(&mut pic, ELCR, 0x20);
        assert_eq!(read(&mut pic, ELCR), 0x20);
        pic.set_irq(5, true);
        assert_eq!(pic.acknowledge(), Some(0x25));
        eoi(&mut pic, MASTER);
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), Some(0x25));
        eoi(&mut pic, MASTER);
        pic.set_irq(5, false);
        assert!(!pic.output());
        // IRQ0-2 cannot be made level-triggered.
        write(&mut pic, ELCR, 0xff);
        assert_eq!(read(&mut pic, ELCR), 0xf8);
    }

    #[test]
    fn vanished_level_request_gives_spurious_irq7_and_irq15() {
        let mut pic = initialised(false);
        write(&mut pic, ELCR, 0x08);
        write(&mut pic, ELCR + 1, 0x02);
        pic.set_irq(3, true);
        assert!(pic.output());
        pic.set_irq(3, false);
        assert_eq!(pic.acknowledge(), Some(0x27));
        assert_eq!(pic.master_registers().1, 0, "spurious IRQ7 sets no ISR bit");
        // Slave line 9 drops after the master latched the cascade edge.
        pic.set_irq(9, true);
        pic.set_irq(9, false);
        assert_eq!(pic.acknowledge(), Some(0x2f));
        assert_eq!(pic.slave_registers().1, 0);
        assert_eq!(pic.master_registers().1, 0x04, "the master still saw IR2");
    }

    #[test]
    fn auto_eoi_leaves_isr_clear() {
        let mut pic = initialised(true);
        pic.set_irq(6, true);
        assert_eq!(pic.acknowledge(), Some(0x26));
        assert_eq!(pic.master_registers(), (0, 0, 0));
    }

    #[test]
    fn poll_mode_reports_and_acknowledges_the_request() {
        let mut pic = initialised(false);
        pic.set_irq(1, true);
        write(&mut pic, MASTER, 0x0c);
        assert_eq!(read(&mut pic, MASTER), 0x81);
        assert_eq!(pic.master_registers(), (0, 0x02, 0));
        write(&mut pic, MASTER, 0x0c);
        assert_eq!(read(&mut pic, MASTER), 0x00);
    }

    #[test]
    fn no_vector_while_initialising() {
        let mut pic = PicPair::new();
        write(&mut pic, MASTER, 0x11);
        assert_eq!(pic.acknowledge(), None);
        pic.set_irq(200, true);
        assert!(!pic.output());
    }
}
