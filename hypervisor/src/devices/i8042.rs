//! The i8042 keyboard controller at ports 0x60 (data) and 0x64 (status/command), with a
//! keyboard that answers commands but never sends scancodes.
//!
//! IRQ 1 is a level that follows the output buffer: asserted while it holds a byte and the
//! command byte enables keyboard interrupts, dropped when the guest reads it (so each queued
//! byte makes a new rising edge). There is no auxiliary (mouse) device: the AUX loopback
//! answers as keyboard data and the AUX interface test reports the clock line stuck, which is
//! how Linux decides that no AUX port exists without waiting for timeouts; IRQ 12 never fires.

use alloc::collections::VecDeque;

use super::{Device, Events, Power, Span};

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Status (read) and command (write) port.
pub const COMMAND_PORT: u16 = 0x64;

const IRQ1: u8 = 1;

// Status register bits (IBM PS/2 technical reference, 8042 status).
const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;
const STATUS_UNLOCKED: u8 = 0x10;

// Command byte bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

// Output port bits: bit 0 low holds the CPU in reset, bit 1 is the A20 gate.
const OUTPUT_RESET_HIGH: u8 = 0x01;
const OUTPUT_A20: u8 = 0x02;

// Keyboard replies (IBM PS/2 keyboard command set).
const KBD_ACK: u8 = 0xfa;
const KBD_BAT_OK: u8 = 0xaa;
const KBD_RESEND: u8 = 0xfe;

/// Bound on queued replies; a guest spamming commands cannot grow the queue without limit.
const QUEUE_MAX: usize = 16;

/// What the next byte written to port 0x60 means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    /// A keyboard command.
    Keyboard,
    /// Controller command's parameter.
    Controller(u8),
    /// A keyboard command's parameter (0xed, 0xf3, 0xf0).
    KeyboardParam(u8),
}

/// The i8042 controller and its keyboard.
pub struct I8042 {
    command_byte: u8,
    output_port: u8,
    /// Byte in the output buffer (OBF set).
    output: Option<u8>,
    /// Bytes waiting to enter the output buffer.
    queue: VecDeque<u8>,
    /// The last byte read (reads with an empty buffer return it, as the hardware does).
    last: u8,
    pending: Pending,
    /// Last write went to the command port (status bit 3).
    last_was_command: bool,
    scancode_set: u8,
    irq_high: bool,
}

const PORTS: [Span; 2] = [Span { start: DATA_PORT as u64, len: 1 }, Span { start: COMMAND_PORT as u64, len: 1 }];

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    /// A controller after POST: keyboard interrupts and translation on, AUX disabled.
    pub fn new() -> Self {
        I8042 {
            command_byte: CTR_KBD_INT | CTR_SYS | CTR_AUX_DISABLE | CTR_XLATE,
            output_port: OUTPUT_RESET_HIGH | OUTPUT_A20,
            output: None,
            queue: VecDeque::new(),
            last: 0,
            pending: Pending::Keyboard,
            last_was_command: false,
            scancode_set: 2,
            irq_high: false,
        }
    }

    fn status(&self) -> u8 {
        let obf = if self.output.is_some() { STATUS_OBF } else { 0 };
        let cmd = if self.last_was_command { STATUS_CMD } else { 0 };
        let sys = if self.command_byte & CTR_SYS != 0 { STATUS_SYS } else { 0 };
        obf | sys | cmd | STATUS_UNLOCKED
    }

    /// Drives IRQ 1 to the level the output buffer and command byte call for.
    fn update_irq(&mut self, events: &mut Events) {
        let level = self.output.is_some() && self.command_byte & CTR_KBD_INT != 0;
        if level != self.irq_high {
            self.irq_high = level;
            events.irq_lines.push((IRQ1, level));
        }
    }

    fn refill(&mut self, events: &mut Events) {
        if self.output.is_none() {
            self.output = self.queue.pop_front();
        }
        self.update_irq(events);
    }

    fn reply(&mut self, bytes: &[u8], events: &mut Events) {
        for &b in bytes {
            if self.queue.len() < QUEUE_MAX {
                self.queue.push_back(b);
            }
        }
        self.refill(events);
    }

    fn controller_command(&mut self, command: u8, events: &mut Events) {
        self.pending = Pending::Keyboard;
        match command {
            // Read internal RAM; byte 0 is the command byte (others read 0).
            0x20 => self.reply(&[self.command_byte], events),
            0x21..=0x3f => self.reply(&[0], events),
            // Commands whose parameter follows on port 0x60.
            0x60..=0x7f | 0xd1..=0xd4 => self.pending = Pending::Controller(command),
            0xa7 => self.command_byte |= CTR_AUX_DISABLE,
            0xa8 => self.command_byte &= !CTR_AUX_DISABLE,
            // AUX interface test: 0x01, clock line stuck low (no mouse wired).
            0xa9 => self.reply(&[0x01], events),
            0xaa => {
                self.command_byte |= CTR_SYS;
                self.reply(&[0x55], events);
            }
            0xab => self.reply(&[0x00], events),
            0xad => self.command_byte |= CTR_KBD_DISABLE,
            0xae => self.command_byte &= !CTR_KBD_DISABLE,
            0xc0 => self.reply(&[0x00], events),
            0xd0 => self.reply(&[self.output_port], events),
            // Pulse output port bits 0-3 low where the command's bit is 0; bit 0 is reset.
            0xf0..=0xff if command & 1 == 0 => events.power = Some(Power::Reset),
            _ => {}
        }
        self.update_irq(events);
    }

    fn controller_param(&mut self, command: u8, value: u8, events: &mut Events) {
        match command {
            0x60 => self.command_byte = value,
            0xd1 => {
                self.output_port = value;
                if value & OUTPUT_RESET_HIGH == 0 {
                    events.power = Some(Power::Reset);
                }
            }
            // Write keyboard output buffer: the byte comes back as if the keyboard sent it.
            0xd2 => self.reply(&[value], events),
            // AUX loopback: without an AUX device it returns as keyboard data (see module doc).
            0xd3 => self.reply(&[value], events),
            // Byte for the AUX device: nothing is attached, so it is dropped.
            _ => {}
        }
        self.update_irq(events);
    }

    fn keyboard_command(&mut self, value: u8, events: &mut Events) {
        match value {
            0xff => {
                self.scancode_set = 2;
                self.reply(&[KBD_ACK, KBD_BAT_OK], events);
            }
            // Identify: an MF2 keyboard (0xab 0x83; 0xab 0x41 when translating, as the 8042 passes it).
            0xf2 => {
                let id2 = if self.command_byte & CTR_XLATE != 0 { 0x41 } else { 0x83 };
                self.reply(&[KBD_ACK, 0xab, id2], events);
            }
            0xed | 0xf3 | 0xf0 => {
                self.pending = Pending::KeyboardParam(value);
                self.reply(&[KBD_ACK], events);
            }
            0xee => self.reply(&[0xee], events),
            0xf4..=0xfd => self.reply(&[KBD_ACK], events),
            _ => self.reply(&[KBD_RESEND], events),
        }
    }

    fn keyboard_param(&mut self, command: u8, value: u8, events: &mut Events) {
        match command {
            // Scan code set: 0 asks for the current one.
            0xf0 if value == 0 => self.reply(&[KBD_ACK, self.scancode_set], events),
            0xf0 => {
                if (1..=3).contains(&value) {
                    self.scancode_set = value;
                }
                self.reply(&[KBD_ACK], events);
            }
            _ => self.reply(&[KBD_ACK], events),
        }
    }
}

impl Device for I8042 {
    fn name(&self) -> &'static str {
        "i8042"
    }

    fn ports(&self) -> &[Span] {
        &PORTS
    }

    fn io_read(&mut self, port: u16, _size: u8, _now_ns: u64, events: &mut Events) -> u32 {
        if port == COMMAND_PORT {
            return self.status() as u32;
        }
        if let Some(byte) = self.output.take() {
            self.last = byte;
            // Drop the line before the next byte so it makes a fresh edge.
            self.update_irq(events);
            self.refill(events);
        }
        self.last as u32
    }

    fn io_write(&mut self, port: u16, _size: u8, value: u32, _now_ns: u64, events: &mut Events) {
        let byte = value as u8;
        if port == COMMAND_PORT {
            self.last_was_command = true;
            self.controller_command(byte, events);
            return;
        }
        self.last_was_command = false;
        match core::mem::replace(&mut self.pending, Pending::Keyboard) {
            Pending::Keyboard => self.keyboard_command(byte, events),
            Pending::Controller(command) => self.controller_param(command, byte, events),
            Pending::KeyboardParam(command) => self.keyboard_param(command, byte, events),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    fn command(kbc: &mut I8042, byte: u8) -> Events {
        let mut events = Events::default();
        kbc.io_write(COMMAND_PORT, 1, byte as u32, 0, &mut events);
        events
    }

    fn data(kbc: &mut I8042, byte: u8) -> Events {
        let mut events = Events::default();
        kbc.io_write(DATA_PORT, 1, byte as u32, 0, &mut events);
        events
    }

    fn status(kbc: &mut I8042) -> u8 {
        kbc.io_read(COMMAND_PORT, 1, 0, &mut Events::default()) as u8
    }

    /// Reads every byte in the output buffer, as Linux's i8042_flush does.
    fn drain(kbc: &mut I8042) -> Vec<u8> {
        let mut out = Vec::new();
        while status(kbc) & STATUS_OBF != 0 && out.len() < 32 {
            out.push(kbc.io_read(DATA_PORT, 1, 0, &mut Events::default()) as u8);
        }
        out
    }

    #[test]
    fn self_tests_and_command_byte() {
        let mut kbc = I8042::new();
        command(&mut kbc, 0x60); // Linux disables interrupts before probing
        data(&mut kbc, 0x64);
        assert_eq!(status(&mut kbc), 0x14, "empty buffers, system flag, unlocked, last write data");
        command(&mut kbc, 0xaa);
        assert_eq!(status(&mut kbc), 0x1d, "output full, input empty, last write a command");
        assert_eq!(drain(&mut kbc), [0x55]);
        command(&mut kbc, 0xab);
        assert_eq!(drain(&mut kbc), [0x00]);
        command(&mut kbc, 0x20);
        assert_eq!(drain(&mut kbc), [0x64]);
        command(&mut kbc, 0xa8);
        command(&mut kbc, 0xae);
        command(&mut kbc, 0x20);
        assert_eq!(drain(&mut kbc), [0x44]);
        command(&mut kbc, 0xa7);
        command(&mut kbc, 0xad);
        command(&mut kbc, 0x20);
        assert_eq!(drain(&mut kbc), [0x74]);
        // No AUX device: the loopback comes back as keyboard data, the interface test fails.
        command(&mut kbc, 0xd3);
        data(&mut kbc, 0x5a);
        assert_eq!(status(&mut kbc) & 0x21, 0x01);
        assert_eq!(drain(&mut kbc), [0x5a]);
        command(&mut kbc, 0xa9);
        assert_eq!(drain(&mut kbc), [0x01]);
    }

    #[test]
    fn keyboard_commands_are_acknowledged() {
        let mut kbc = I8042::new();
        command(&mut kbc, 0x60);
        data(&mut kbc, 0x24); // no interrupts, no translation
        data(&mut kbc, 0xff);
        assert_eq!(drain(&mut kbc), [0xfa, 0xaa]);
        data(&mut kbc, 0xf2);
        assert_eq!(drain(&mut kbc), [0xfa, 0xab, 0x83]);
        data(&mut kbc, 0xed);
        assert_eq!(drain(&mut kbc), [0xfa]);
        data(&mut kbc, 0x07);
        assert_eq!(drain(&mut kbc), [0xfa]);
        data(&mut kbc, 0xf3);
        data(&mut kbc, 0x20);
        data(&mut kbc, 0xf5);
        data(&mut kbc, 0xf4);
        assert_eq!(drain(&mut kbc), [0xfa, 0xfa, 0xfa, 0xfa]);
        data(&mut kbc, 0xf0);
        data(&mut kbc, 0x00);
        assert_eq!(drain(&mut kbc), [0xfa, 0xfa, 0x02]);
        data(&mut kbc, 0x12);
        assert_eq!(drain(&mut kbc), [0xfe], "unknown commands ask for a resend");
        // An empty buffer reads the last byte again.
        assert_eq!(kbc.io_read(DATA_PORT, 1, 0, &mut Events::default()), 0xfe);
    }

    #[test]
    fn irq1_follows_the_output_buffer() {
        let mut kbc = I8042::new();
        assert_eq!(data(&mut kbc, 0xff).irq_lines, vec![(1, true)]);
        let mut events = Events::default();
        assert_eq!(kbc.io_read(DATA_PORT, 1, 0, &mut events), 0xfa);
        assert_eq!(events.irq_lines, vec![(1, false), (1, true)], "a fresh edge for the next byte");
        let mut events = Events::default();
        assert_eq!(kbc.io_read(DATA_PORT, 1, 0, &mut events), 0xaa);
        assert_eq!(events.irq_lines, vec![(1, false)]);
        // With keyboard interrupts off in the command byte the line stays low.
        command(&mut kbc, 0x60);
        data(&mut kbc, 0x64);
        assert!(data(&mut kbc, 0xf4).irq_lines.is_empty());
        // Enabling them with a byte waiting raises the line.
        command(&mut kbc, 0x60);
        assert_eq!(data(&mut kbc, 0x65).irq_lines, vec![(1, true)]);
    }

    #[test]
    fn reset_through_pulse_and_output_port() {
        let mut kbc = I8042::new();
        assert_eq!(command(&mut kbc, 0xff).power, None, "0xff pulses no line");
        assert_eq!(command(&mut kbc, 0xfe).power, Some(Power::Reset));
        let mut kbc = I8042::new();
        command(&mut kbc, 0xd0);
        assert_eq!(drain(&mut kbc), [0x03]);
        command(&mut kbc, 0xd1);
        assert_eq!(data(&mut kbc, 0x03).power, None, "A20 on, reset line high");
        command(&mut kbc, 0xd1);
        assert_eq!(data(&mut kbc, 0x02).power, Some(Power::Reset));
    }
}
