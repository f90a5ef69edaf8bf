//! A transmit-only view of a 16550 UART at COM1: enough for a guest to print.
//!
//! Writes to the transmit register become console bytes; the line status register always
//! reports an empty transmitter. The full 16550 (receive, FIFO, interrupts) replaces it.

use super::{Device, Events, Span};

/// COM1 base port.
pub const COM1: u16 = 0x3f8;
const TRANSMIT: u16 = 0;
const LINE_CONTROL: u16 = 3;
const LINE_STATUS: u16 = 5;
const DLAB: u8 = 0x80;
/// THR empty and transmitter empty.
const LSR_IDLE: u8 = 0x60;

/// COM1, output only.
#[derive(Default)]
pub struct Console {
    line_control: u8,
    scratch: u8,
}

const PORTS: [Span; 1] = [Span { start: COM1 as u64, len: 8 }];

impl Device for Console {
    fn name(&self) -> &'static str {
        "com1"
    }

    fn ports(&self) -> &[Span] {
        &PORTS
    }

    fn io_read(&mut self, port: u16, _size: u8, _now_ns: u64, _events: &mut Events) -> u32 {
        match port - COM1 {
            LINE_STATUS => LSR_IDLE as u32,
            LINE_CONTROL => self.line_control as u32,
            7 => self.scratch as u32,
            _ => 0,
        }
    }

    fn io_write(&mut self, port: u16, _size: u8, value: u32, _now_ns: u64, events: &mut Events) {
        let byte = value as u8;
        match port - COM1 {
            // With DLAB set, offset 0 is the divisor latch, not data.
            TRANSMIT if self.line_control & DLAB == 0 => events.console.push(byte),
            LINE_CONTROL => self.line_control = byte,
            7 => self.scratch = byte,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmit_bytes_reach_the_console_unless_dlab_is_set() {
        let mut uart = Console::default();
        let mut events = Events::default();
        uart.io_write(COM1, 1, b'h' as u32, 0, &mut events);
        uart.io_write(COM1 + 3, 1, 0x83, 0, &mut events);
        uart.io_write(COM1, 1, 0x01, 0, &mut events); // divisor low byte
        uart.io_write(COM1 + 3, 1, 0x03, 0, &mut events);
        uart.io_write(COM1, 1, b'i' as u32, 0, &mut events);
        assert_eq!(events.console, b"hi");
        assert_eq!(uart.io_read(COM1 + 5, 1, 0, &mut events), 0x60);
        assert_eq!(uart.io_read(COM1 + 3, 1, 0, &mut events), 0x03);
    }
}
