//! A 16550A UART: divisor latch, 16-byte receive FIFO with trigger levels and character
//! timeout, the four interrupt sources with their IIR priorities, modem control with loopback,
//! and the PC's OUT2-gated interrupt line.
//!
//! Transmission is instantaneous: a byte written to THR goes to the console (or, in loopback,
//! back into the receiver) and THR is empty again at once. Register layout and behaviour follow
//! the TI/National PC16550D datasheet ("Register Description").

use alloc::collections::VecDeque;

use super::{Device, Events, Span};

/// COM1 base port on a PC.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's ISA interrupt line on a PC.
pub const COM1_IRQ: u8 = 4;

// Register offsets from the base port.
const RBR_THR_DLL: u16 = 0;
const IER_DLM: u16 = 1;
const IIR_FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const MSR: u16 = 6;
const SCR: u16 = 7;

/// Receive FIFO depth of the 16550A.
const FIFO_SIZE: usize = 16;

// IER: only bits 0-3 exist on a 16550A (Linux probes that bits 4-7 read back 0).
const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const IER_RLS: u8 = 0x04;
const IER_MS: u8 = 0x08;
const IER_MASK: u8 = 0x0f;

// IIR interrupt identification (bits 3:0), highest priority first.
const IIR_NONE: u8 = 0x01;
const IIR_RLS: u8 = 0x06;
const IIR_RDA: u8 = 0x04;
const IIR_TIMEOUT: u8 = 0x0c;
const IIR_THRE: u8 = 0x02;
const IIR_MS: u8 = 0x00;
/// IIR bits 7:6 when FCR bit 0 enables the FIFOs.
const IIR_FIFOS: u8 = 0xc0;

const FCR_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;

const LCR_DLAB: u8 = 0x80;

const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;
const MCR_MASK: u8 = 0x1f;

const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

const MSR_DCTS: u8 = 0x01;
const MSR_DDSR: u8 = 0x02;
const MSR_TERI: u8 = 0x04;
const MSR_DDCD: u8 = 0x08;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;

/// The PC's 1.8432 MHz UART clock; the baud rate is clock / (16 * divisor).
const CLOCK_HZ: u64 = 1_843_200;
/// Divisor a PC BIOS leaves programmed (9600 baud); the datasheet leaves it undefined.
const RESET_DIVISOR: u16 = 12;

/// A 16550A at `base` (eight ports) raising ISA line `irq`.
pub struct Uart16550 {
    base: u16,
    irq: u8,
    ports: [Span; 1],
    rx: VecDeque<u8>,
    divisor: u16,
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    fifos: bool,
    trigger: usize,
    overrun: bool,
    /// THR-empty interrupt condition (cleared by reading IIR while it is the source, or by THR).
    thre_pending: bool,
    /// MSR delta bits 3:0, cleared by reading MSR.
    msr_delta: u8,
    /// When the character timeout falls due (FIFO mode, receive FIFO not empty).
    timeout_at: Option<u64>,
    timeout_pending: bool,
    /// The level last reported on `irq`.
    line: bool,
}

impl Uart16550 {
    /// A UART in its reset state at `base` on ISA line `irq` (COM1: 0x3f8, IRQ 4).
    pub fn new(base: u16, irq: u8) -> Self {
        Uart16550 {
            base,
            irq,
            ports: [Span { start: base as u64, len: 8 }],
            rx: VecDeque::with_capacity(FIFO_SIZE),
            divisor: RESET_DIVISOR,
            ier: 0,
            lcr: 0,
            mcr: 0,
            scr: 0,
            fifos: false,
            trigger: 1,
            overrun: false,
            thre_pending: false,
            msr_delta: 0,
            timeout_at: None,
            timeout_pending: false,
            line: false,
        }
    }

    /// Receive buffer depth: the FIFO, or the single holding register in 16450 mode.
    fn capacity(&self) -> usize {
        if self.fifos {
            FIFO_SIZE
        } else {
            1
        }
    }

    /// Received-data-available condition: FIFO at its trigger level, or any byte without FIFOs.
    fn data_available(&self) -> bool {
        if self.fifos {
            self.rx.len() >= self.trigger
        } else {
            !self.rx.is_empty()
        }
    }

    /// The highest-priority enabled interrupt, as its IIR identification.
    fn interrupt_id(&self) -> Option<u8> {
        if self.ier & IER_RLS != 0 && self.overrun {
            Some(IIR_RLS)
        } else if self.ier & IER_RDA != 0 && self.data_available() {
            Some(IIR_RDA)
        } else if self.ier & IER_RDA != 0 && self.timeout_pending && !self.rx.is_empty() {
            Some(IIR_TIMEOUT)
        } else if self.ier & IER_THRE != 0 && self.thre_pending {
            Some(IIR_THRE)
        } else if self.ier & IER_MS != 0 && self.msr_delta != 0 {
            Some(IIR_MS)
        } else {
            None
        }
    }

    fn iir(&self) -> u8 {
        let fifo_bits = if self.fifos { IIR_FIFOS } else { 0 };
        self.interrupt_id().unwrap_or(IIR_NONE) | fifo_bits
    }

    /// MSR bits 7:4: a connected line, or in loopback the MCR outputs wired back.
    fn modem_status(&self) -> u8 {
        if self.mcr & MCR_LOOP == 0 {
            return MSR_CTS | MSR_DSR | MSR_DCD;
        }
        let mut status = 0;
        for (out, input) in [(MCR_RTS, MSR_CTS), (MCR_DTR, MSR_DSR), (MCR_OUT1, MSR_RI), (MCR_OUT2, MSR_DCD)] {
            if self.mcr & out != 0 {
                status |= input;
            }
        }
        status
    }

    fn line_status(&self) -> u8 {
        let mut lsr = LSR_THRE | LSR_TEMT;
        if !self.rx.is_empty() {
            lsr |= LSR_DR;
        }
        if self.overrun {
            lsr |= LSR_OE;
        }
        lsr
    }

    /// Reports the interrupt line if its level changed: pending interrupt gated by OUT2, which on
    /// a PC enables the UART's interrupt driver onto the ISA bus.
    fn update_line(&mut self, events: &mut Events) {
        let level = self.interrupt_id().is_some() && self.mcr & MCR_OUT2 != 0;
        if level != self.line {
            self.line = level;
            events.irq_lines.push((self.irq, level));
        }
    }

    /// Four character times at the programmed rate and frame (16550D: "character timeout").
    fn timeout_ns(&self) -> u64 {
        let data_bits = 5 + u64::from(self.lcr & 0x03);
        let parity = u64::from((self.lcr >> 3) & 1);
        let stop = if self.lcr & 0x04 != 0 { 2 } else { 1 };
        let bits = 1 + data_bits + parity + stop;
        let divisor = u64::from(self.divisor.max(1));
        (4 * bits).saturating_mul(divisor).saturating_mul(16).saturating_mul(1_000_000_000) / CLOCK_HZ
    }

    /// Restarts the character timeout after receive-FIFO activity.
    fn restart_timeout(&mut self, now_ns: u64) {
        self.timeout_pending = false;
        self.timeout_at =
            if self.fifos && !self.rx.is_empty() { Some(now_ns.saturating_add(self.timeout_ns())) } else { None };
    }

    /// Raises the character timeout if it fell due by `now_ns`.
    fn catch_up(&mut self, now_ns: u64) {
        if let Some(at) = self.timeout_at {
            if now_ns >= at {
                self.timeout_at = None;
                self.timeout_pending = true;
            }
        }
    }

    fn clear_rx(&mut self) {
        self.rx.clear();
        self.timeout_at = None;
        self.timeout_pending = false;
    }

    /// A byte arriving at the receiver. A full FIFO keeps its contents and loses the new byte;
    /// without FIFOs the new byte overwrites the holding register. Both set OE.
    fn receive(&mut self, byte: u8, now_ns: u64) {
        if self.rx.len() >= self.capacity() {
            self.overrun = true;
            if self.fifos {
                return;
            }
            self.rx.clear();
        }
        self.rx.push_back(byte);
        self.restart_timeout(now_ns);
    }

    fn transmit(&mut self, byte: u8, now_ns: u64, events: &mut Events) {
        // Writing THR clears the THRE interrupt; the line drops so that an edge-triggered
        // controller sees a fresh edge when THR empties again right after.
        self.thre_pending = false;
        self.update_line(events);
        if self.mcr & MCR_LOOP != 0 {
            self.receive(byte, now_ns);
        } else {
            events.console.push(byte);
        }
        self.thre_pending = true;
    }

    fn read_register(&mut self, offset: u16, now_ns: u64) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            RBR_THR_DLL if dlab => self.divisor as u8,
            RBR_THR_DLL => {
                let byte = self.rx.pop_front().unwrap_or(0);
                self.restart_timeout(now_ns);
                byte
            }
            IER_DLM if dlab => (self.divisor >> 8) as u8,
            IER_DLM => self.ier,
            IIR_FCR => {
                let iir = self.iir();
                if self.interrupt_id() == Some(IIR_THRE) {
                    self.thre_pending = false;
                }
                iir
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => {
                let lsr = self.line_status();
                self.overrun = false;
                lsr
            }
            MSR => {
                let msr = self.modem_status() | self.msr_delta;
                self.msr_delta = 0;
                msr
            }
            SCR => self.scr,
            _ => 0xff,
        }
    }

    fn write_register(&mut self, offset: u16, value: u8, now_ns: u64, events: &mut Events) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            RBR_THR_DLL if dlab => self.divisor = (self.divisor & 0xff00) | u16::from(value),
            RBR_THR_DLL => self.transmit(value, now_ns, events),
            IER_DLM if dlab => self.divisor = (self.divisor & 0x00ff) | (u16::from(value) << 8),
            IER_DLM => {
                let enabled = value & IER_MASK & !self.ier;
                self.ier = value & IER_MASK;
                // THR is always empty, so enabling its interrupt raises it at once.
                if enabled & IER_THRE != 0 {
                    self.thre_pending = true;
                }
            }
            IIR_FCR => self.write_fcr(value),
            LCR => self.lcr = value,
            MCR => {
                let before = self.modem_status();
                self.mcr = value & MCR_MASK;
                let after = self.modem_status();
                let changed = before ^ after;
                for (input, delta) in [(MSR_CTS, MSR_DCTS), (MSR_DSR, MSR_DDSR), (MSR_DCD, MSR_DDCD)] {
                    if changed & input != 0 {
                        self.msr_delta |= delta;
                    }
                }
                // TERI is set on the trailing edge of RI only.
                if before & MSR_RI != 0 && after & MSR_RI == 0 {
                    self.msr_delta |= MSR_TERI;
                }
            }
            SCR => self.scr = value,
            // LSR and MSR are read-only (writes are for factory test).
            _ => {}
        }
    }

    fn write_fcr(&mut self, value: u8) {
        let enable = value & FCR_ENABLE != 0;
        // Switching between FIFO and 16450 mode empties the FIFOs.
        if enable != self.fifos {
            self.fifos = enable;
            self.clear_rx();
        }
        // The other bits are only programmed while bit 0 is set.
        if !enable {
            return;
        }
        if value & FCR_CLEAR_RX != 0 {
            self.clear_rx();
        }
        // The transmit FIFO is always empty: nothing to clear.
        self.trigger = match value >> 6 {
            0 => 1,
            1 => 4,
            2 => 8,
            _ => 14,
        };
    }
}

impl Device for Uart16550 {
    fn name(&self) -> &'static str {
        match self.base {
            0x3f8 => "com1",
            0x2f8 => "com2",
            0x3e8 => "com3",
            0x2e8 => "com4",
            _ => "uart16550",
        }
    }

    fn ports(&self) -> &[Span] {
        &self.ports
    }

    /// Wider accesses are split into byte accesses at consecutive ports, as on the ISA bus.
    fn io_read(&mut self, port: u16, size: u8, now_ns: u64, events: &mut Events) -> u32 {
        self.catch_up(now_ns);
        let first = port.wrapping_sub(self.base);
        let mut value = 0u32;
        for i in 0..size.min(4) {
            let offset = first.wrapping_add(u16::from(i));
            let byte = if offset < 8 { self.read_register(offset, now_ns) } else { 0xff };
            value |= u32::from(byte) << (8 * u32::from(i));
        }
        self.update_line(events);
        value
    }

    fn io_write(&mut self, port: u16, size: u8, value: u32, now_ns: u64, events: &mut Events) {
        self.catch_up(now_ns);
        let first = port.wrapping_sub(self.base);
        for (i, byte) in value.to_le_bytes().into_iter().enumerate().take(usize::from(size.min(4))) {
            // `i < 4`, so the conversion cannot truncate.
            let offset = first.wrapping_add(i as u16);
            if offset < 8 {
                self.write_register(offset, byte, now_ns, events);
            }
        }
        self.update_line(events);
    }

    fn poll(&mut self, now_ns: u64, events: &mut Events) {
        self.catch_up(now_ns);
        self.update_line(events);
    }

    fn next_deadline_ns(&self) -> Option<u64> {
        self.timeout_at
    }

    /// In loopback the receiver is disconnected from the line, so typed bytes are dropped.
    fn input_ready(&self) -> bool {
        self.mcr & MCR_LOOP == 0 && self.rx.len() < self.capacity()
    }

    fn input(&mut self, byte: u8, now_ns: u64, events: &mut Events) -> bool {
        self.catch_up(now_ns);
        if self.mcr & MCR_LOOP == 0 {
            self.receive(byte, now_ns);
        }
        self.update_line(events);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    const BASE: u16 = COM1_BASE;

    fn uart() -> Uart16550 {
        Uart16550::new(COM1_BASE, COM1_IRQ)
    }

    fn rd(u: &mut Uart16550, offset: u16, ev: &mut Events) -> u8 {
        u.io_read(BASE + offset, 1, 0, ev) as u8
    }

    fn wr(u: &mut Uart16550, offset: u16, value: u8, ev: &mut Events) {
        u.io_write(BASE + offset, 1, value as u32, 0, ev);
    }

    fn type_bytes(u: &mut Uart16550, bytes: &[u8], ev: &mut Events) {
        for &b in bytes {
            assert!(u.input(b, 0, ev));
        }
    }

    #[test]
    fn divisor_latch_is_behind_dlab() {
        let (mut u, mut ev) = (uart(), Events::default());
        wr(&mut u, LCR, 0x83, &mut ev);
        wr(&mut u, 0, 0x01, &mut ev);
        wr(&mut u, 1, 0x02, &mut ev);
        assert_eq!(rd(&mut u, 0, &mut ev), 0x01);
        assert_eq!(rd(&mut u, 1, &mut ev), 0x02);
        assert_eq!(rd(&mut u, LCR, &mut ev), 0x83);
        assert!(ev.console.is_empty(), "divisor writes are not data");
        wr(&mut u, LCR, 0x03, &mut ev);
        wr(&mut u, 1, 0xff, &mut ev);
        assert_eq!(rd(&mut u, 1, &mut ev), 0x0f, "IER keeps bits 0-3 only");
        assert_eq!(u.divisor, 0x0201, "IER writes leave the latch alone");
        assert_eq!(rd(&mut u, LCR, &mut ev), 0x03);
        wr(&mut u, SCR, 0x5a, &mut ev);
        assert_eq!(rd(&mut u, SCR, &mut ev), 0x5a);
    }

    #[test]
    fn transmitted_bytes_reach_the_console() {
        let (mut u, mut ev) = (uart(), Events::default());
        for &b in b"ok\n" {
            wr(&mut u, 0, b, &mut ev);
        }
        assert_eq!(ev.console, b"ok\n");
        assert_eq!(rd(&mut u, LSR, &mut ev), 0x60, "THRE and TEMT, no data");
        assert_eq!(rd(&mut u, MSR, &mut ev), 0xb0, "CTS, DSR and DCD: a connected line");
        assert_eq!(rd(&mut u, 2, &mut ev), 0x01, "no interrupt, FIFOs off");
        assert!(ev.irq_lines.is_empty());
    }

    #[test]
    fn enabling_thre_raises_it_and_reading_iir_or_writing_thr_clears_it() {
        let (mut u, mut ev) = (uart(), Events::default());
        wr(&mut u, MCR, MCR_OUT2, &mut ev);
        wr(&mut u, 1, IER_THRE, &mut ev);
        assert_eq!(ev.irq_lines, [(4, true)]);
        assert_eq!(rd(&mut u, 2, &mut ev), 0x02);
        assert_eq!(rd(&mut u, 2, &mut ev), 0x01, "reading IIR cleared THRE");
        assert_eq!(ev.irq_lines, [(4, true), (4, false)]);
        // Rewriting the same IER does not re-arm; a 0 -> 1 transition does.
        wr(&mut u, 1, IER_THRE, &mut ev);
        assert_eq!(rd(&mut u, 2, &mut ev), 0x01);
        wr(&mut u, 1, 0, &mut ev);
        wr(&mut u, 1, IER_THRE, &mut ev);
        assert_eq!(rd(&mut u, 2, &mut ev), 0x02);
        // A THR write drops the line and raises it again when THR empties at once.
        ev.irq_lines.clear();
        wr(&mut u, 0, b'x', &mut ev);
        assert_eq!(ev.irq_lines, [(4, true)]);
        ev.irq_lines.clear();
        wr(&mut u, 0, b'y', &mut ev);
        assert_eq!(ev.irq_lines, [(4, false), (4, true)], "a fresh edge per transmitted byte");
        assert_eq!(rd(&mut u, 2, &mut ev), 0x02);
    }

    #[test]
    fn input_is_ready_only_while_the_receiver_has_room() {
        let (mut u, mut ev) = (uart(), Events::default());
        assert!(u.input_ready(), "one byte fits without FIFOs");
        type_bytes(&mut u, b"a", &mut ev);
        assert!(!u.input_ready());
        wr(&mut u, 2, FCR_ENABLE, &mut ev);
        for _ in 0..15 {
            assert!(u.input_ready());
            type_bytes(&mut u, b"x", &mut ev);
        }
        assert!(u.input_ready(), "FIFO mode cleared nothing but holds 16");
        type_bytes(&mut u, b"y", &mut ev);
        assert!(!u.input_ready(), "16 bytes waiting: full");
        rd(&mut u, 0, &mut ev);
        assert!(u.input_ready(), "reading one makes room");
        wr(&mut u, MCR, MCR_LOOP, &mut ev);
        rd(&mut u, 0, &mut ev);
        assert!(!u.input_ready(), "loopback disconnects the receiver");
    }

    #[test]
    fn iir_reports_sources_in_priority_order() {
        let (mut u, mut ev) = (uart(), Events::default());
        wr(&mut u, 2, FCR_ENABLE, &mut ev); // trigger level 1
        type_bytes(&mut u, &[0u8; 17], &mut ev); // 16 in the FIFO plus an overrun
        wr(&mut u, MCR, MCR_OUT2 | MCR_LOOP, &mut ev); // CTS and DSR drop: modem-status deltas
        type_bytes(&mut u, b"!", &mut ev); // the receiver is off the line in loopback
        wr(&mut u, 1, 0x0f, &mut ev);
        assert_eq!(rd(&mut u, 2, &mut ev), 0xc6, "line status first");
        assert_eq!(rd(&mut u, 2, &mut ev), 0xc6, "IIR does not clear line status");
        assert_eq!(rd(&mut u, LSR, &mut ev), 0x63, "DR, OE, THRE, TEMT");
        assert_eq!(rd(&mut u, 2, &mut ev), 0xc4, "then received data");
        for _ in 0..16 {
            rd(&mut u, 0, &mut ev);
        }
        assert_eq!(rd(&mut u, 2, &mut ev), 0xc2, "then THR empty");
        assert_eq!(rd(&mut u, 2, &mut ev), 0xc0, "then modem status");
        assert_eq!(rd(&mut u, MSR, &mut ev), MSR_DCD | MSR_DCTS | MSR_DDSR);
        assert_eq!(rd(&mut u, 2, &mut ev), 0xc1, "nothing left");
        assert_eq!(ev.irq_lines, [(4, true), (4, false)], "one rise, one fall");
    }

    #[test]
    fn rx_fifo_keeps_order_honours_the_trigger_and_overruns_at_sixteen() {
        let (mut u, mut ev) = (uart(), Events::default());
        wr(&mut u, MCR, MCR_OUT2, &mut ev);
        wr(&mut u, 2, 0x80 | FCR_ENABLE, &mut ev); // trigger level 8
        wr(&mut u, 1, IER_RDA, &mut ev);
        type_bytes(&mut u, b"0123456", &mut ev);
        assert_eq!(rd(&mut u, 2, &mut ev), 0xc1, "seven bytes are below the trigger");
        assert!(ev.irq_lines.is_empty());
        type_bytes(&mut u, b"7", &mut ev);
        assert_eq!(rd(&mut u, 2, &mut ev), 0xc4);
        assert_eq!(ev.irq_lines, [(4, true)]);
        type_bytes(&mut u, b"89abcdefX", &mut ev);
        assert_eq!(ev.irq_lines, [(4, true)], "still high: no repeated assertion");
        assert_eq!(rd(&mut u, LSR, &mut ev), 0x63);
        assert_eq!(rd(&mut u, LSR, &mut ev), 0x61, "reading LSR cleared OE");
        let mut got = Vec::new();
        while rd(&mut u, LSR, &mut ev) & LSR_DR != 0 {
            got.push(rd(&mut u, 0, &mut ev));
        }
        assert_eq!(got, b"0123456789abcdef", "the byte that overran is lost");
        assert_eq!(ev.irq_lines, [(4, true), (4, false)]);
    }

    #[test]
    fn trigger_levels_and_fifo_clearing() {
        let (mut u, mut ev) = (uart(), Events::default());
        wr(&mut u, 1, IER_RDA, &mut ev);
        for (fcr, level) in [(0x01u8, 1usize), (0x41, 4), (0x81, 8), (0xc1, 14)] {
            wr(&mut u, 2, fcr | FCR_CLEAR_RX, &mut ev);
            assert_eq!(rd(&mut u, LSR, &mut ev) & LSR_DR, 0, "FCR bit 1 emptied the FIFO");
            type_bytes(&mut u, &alloc::vec![0x55; level - 1], &mut ev);
            assert_eq!(rd(&mut u, 2, &mut ev), 0xc1, "FCR {fcr:#x}: below {level}");
            type_bytes(&mut u, &[0x55], &mut ev);
            assert_eq!(rd(&mut u, 2, &mut ev), 0xc4, "FCR {fcr:#x}: at {level}");
        }
        // Leaving FIFO mode empties the FIFO too.
        wr(&mut u, 2, 0, &mut ev);
        assert_eq!(rd(&mut u, LSR, &mut ev), 0x60);
        assert_eq!(rd(&mut u, 2, &mut ev), 0x01);
    }

    #[test]
    fn without_fifos_every_byte_interrupts_and_a_second_one_overruns() {
        let (mut u, mut ev) = (uart(), Events::default());
        wr(&mut u, 1, IER_RDA | IER_RLS, &mut ev);
        type_bytes(&mut u, b"a", &mut ev);
        assert_eq!(rd(&mut u, 2, &mut ev), 0x04);
        type_bytes(&mut u, b"b", &mut ev);
        assert_eq!(rd(&mut u, 2, &mut ev), 0x06);
        assert_eq!(rd(&mut u, LSR, &mut ev), 0x63);
        assert_eq!(rd(&mut u, 0, &mut ev), b'b', "the holding register was overwritten");
        assert_eq!(rd(&mut u, LSR, &mut ev), 0x60);
        assert_eq!(u.next_deadline_ns(), None, "no character timeout in 16450 mode");
    }

    #[test]
    fn character_timeout_delivers_bytes_below_the_trigger() {
        let (mut u, mut ev) = (uart(), Events::default());
        wr(&mut u, LCR, 0x83, &mut ev);
        wr(&mut u, 0, 1, &mut ev); // 115200 baud
        wr(&mut u, 1, 0, &mut ev);
        wr(&mut u, LCR, 0x03, &mut ev); // 8N1: 10 bits a character
        wr(&mut u, MCR, MCR_OUT2, &mut ev);
        wr(&mut u, 2, 0xc1, &mut ev);
        wr(&mut u, 1, IER_RDA, &mut ev);
        assert!(u.input(b'k', 1_000, &mut ev));
        // Four characters of 10 bits at 115200 baud: 347.2 us.
        assert_eq!(u.next_deadline_ns(), Some(1_000 + 347_222));
        u.poll(1_000 + 347_221, &mut ev);
        assert!(ev.irq_lines.is_empty());
        u.poll(1_000 + 347_222, &mut ev);
        assert_eq!(ev.irq_lines, [(4, true)]);
        assert_eq!(u.io_read(BASE + 2, 1, 400_000, &mut ev), 0xcc);
        assert_eq!(u.io_read(BASE, 1, 400_000, &mut ev), u32::from(b'k'));
        assert_eq!(ev.irq_lines, [(4, true), (4, false)]);
        assert_eq!(u.next_deadline_ns(), None);
    }

    #[test]
    fn loopback_returns_transmitted_bytes_and_wires_mcr_to_msr() {
        let (mut u, mut ev) = (uart(), Events::default());
        // Linux's autoconfig check: LOOP | OUT2 | RTS must read back CTS | DCD.
        wr(&mut u, MCR, MCR_LOOP | 0x0a, &mut ev);
        assert_eq!(rd(&mut u, MSR, &mut ev) & 0xf0, 0x90);
        wr(&mut u, MCR, MCR_LOOP | MCR_DTR | MCR_OUT1, &mut ev);
        assert_eq!(rd(&mut u, MSR, &mut ev), MSR_DSR | MSR_RI | MSR_DCTS | MSR_DDSR | MSR_DDCD);
        wr(&mut u, MCR, MCR_LOOP, &mut ev);
        assert_eq!(rd(&mut u, MSR, &mut ev), MSR_DDSR | MSR_TERI, "RI fell: TERI");
        wr(&mut u, 0, b'L', &mut ev);
        assert!(ev.console.is_empty(), "loopback keeps bytes off the line");
        assert_eq!(rd(&mut u, LSR, &mut ev), 0x61);
        assert_eq!(rd(&mut u, 0, &mut ev), b'L');
        wr(&mut u, MCR, 0, &mut ev);
        wr(&mut u, 0, b'N', &mut ev);
        assert_eq!(ev.console, b"N");
        assert_eq!(rd(&mut u, MSR, &mut ev), 0xb0 | MSR_DCTS | MSR_DDSR | MSR_DDCD);
        assert_eq!(rd(&mut u, 4, &mut ev), 0, "MCR reads back");
    }

    #[test]
    fn out2_gates_the_interrupt_line() {
        let (mut u, mut ev) = (uart(), Events::default());
        wr(&mut u, 1, IER_RDA, &mut ev);
        type_bytes(&mut u, b"z", &mut ev);
        assert_eq!(rd(&mut u, 2, &mut ev), 0x04, "pending inside the UART");
        assert!(ev.irq_lines.is_empty(), "but OUT2 is off");
        wr(&mut u, MCR, MCR_DTR | MCR_RTS | MCR_OUT2, &mut ev);
        assert_eq!(ev.irq_lines, [(4, true)]);
        wr(&mut u, MCR, MCR_DTR | MCR_RTS, &mut ev);
        assert_eq!(ev.irq_lines, [(4, true), (4, false)]);
        wr(&mut u, MCR, MCR_OUT2, &mut ev);
        rd(&mut u, 0, &mut ev);
        assert_eq!(ev.irq_lines, [(4, true), (4, false), (4, true), (4, false)]);
    }

    #[test]
    fn line_changes_are_reported_once_on_the_configured_irq() {
        let mut u = Uart16550::new(0x2f8, 3);
        let mut ev = Events::default();
        assert_eq!(u.name(), "com2");
        assert_eq!(u.ports(), [Span { start: 0x2f8, len: 8 }]);
        u.io_write(0x2fc, 1, MCR_OUT2 as u32, 0, &mut ev);
        u.io_write(0x2fa, 1, FCR_ENABLE as u32, 0, &mut ev);
        u.io_write(0x2f9, 1, IER_RDA as u32, 0, &mut ev);
        for b in 0..3 {
            u.input(b, 0, &mut ev);
        }
        u.poll(10, &mut ev);
        assert_eq!(ev.irq_lines, [(3, true)]);
        // Clearing one source while another stays pending keeps the line up.
        for _ in 0..2 {
            u.io_read(0x2f8, 1, 0, &mut ev);
        }
        assert_eq!(ev.irq_lines, [(3, true)]);
        u.io_read(0x2f8, 1, 0, &mut ev);
        u.io_read(0x2f8, 1, 0, &mut ev); // reading an empty FIFO changes nothing
        assert_eq!(ev.irq_lines, [(3, true), (3, false)]);
    }

    #[test]
    fn wide_accesses_split_into_bytes() {
        let (mut u, mut ev) = (uart(), Events::default());
        u.io_write(BASE + 3, 2, 0x0b03, 0, &mut ev); // LCR = 0x03, MCR = 0x0b
        assert_eq!(u.io_read(BASE + 3, 2, 0, &mut ev), 0x0b03);
        assert_eq!(u.io_read(BASE + 4, 4, 0, &mut ev), 0x00b0_600b, "MCR, LSR, MSR, SCR");
        assert_eq!(u.io_read(BASE + 6, 4, 0, &mut ev), 0xffff_00b0, "past the last register floats");
        u.io_write(BASE + 7, 4, 0xdead_be42, 0, &mut ev);
        assert_eq!(rd(&mut u, SCR, &mut ev), 0x42);
    }

    #[test]
    fn linux_8250_probe_sees_a_16550a() {
        let (mut u, mut ev) = (uart(), Events::default());
        // IER scratch test: bits 0-3 stick.
        wr(&mut u, 1, 0, &mut ev);
        assert_eq!(rd(&mut u, 1, &mut ev) & 0x0f, 0);
        wr(&mut u, 1, 0x0f, &mut ev);
        assert_eq!(rd(&mut u, 1, &mut ev) & 0x0f, 0x0f);
        wr(&mut u, 1, 0, &mut ev);
        // "EFR" write at LCR 0xbf lands on FCR, then FIFO detection through IIR bits 7:6.
        wr(&mut u, LCR, 0xbf, &mut ev);
        wr(&mut u, 2, 0, &mut ev);
        wr(&mut u, LCR, 0, &mut ev);
        wr(&mut u, 2, FCR_ENABLE, &mut ev);
        assert_eq!(rd(&mut u, 2, &mut ev) >> 6, 3);
        // No EFR (reads at LCR 0xbf return IIR) and no 64-byte FIFO bit.
        wr(&mut u, LCR, 0xbf, &mut ev);
        assert_ne!(rd(&mut u, 2, &mut ev), 0);
        wr(&mut u, LCR, 0, &mut ev);
        wr(&mut u, 2, FCR_ENABLE | 0x20, &mut ev);
        assert_eq!(rd(&mut u, 2, &mut ev) & 0xe0, 0xc0);
        // Bits 4-7 of IER do not stick (not an XScale UART).
        wr(&mut u, 1, 0x40, &mut ev);
        assert_eq!(rd(&mut u, 1, &mut ev), 0);
        assert_ne!(rd(&mut u, LSR, &mut ev), 0xff);
    }
}
