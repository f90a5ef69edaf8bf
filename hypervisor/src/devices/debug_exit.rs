//! QEMU's `isa-debug-exit` convention at port 0xf4: a write ends the VM with that status.

use super::{Device, Events, Span};

/// The debug-exit port.
pub struct DebugExit;

// One port: wider writes at 0xf4 are routed here by their base port.
const PORTS: [Span; 1] = [Span { start: 0xf4, len: 1 }];

impl Device for DebugExit {
    fn name(&self) -> &'static str {
        "debug-exit"
    }

    fn ports(&self) -> &[Span] {
        &PORTS
    }

    fn io_write(&mut self, _port: u16, _size: u8, value: u32, _now_ns: u64, events: &mut Events) {
        events.exit_status = Some(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::Bus;
    use alloc::boxed::Box;

    #[test]
    fn a_write_requests_the_exit_with_its_value() {
        let mut bus = Bus::new();
        bus.add(Box::new(DebugExit)).unwrap();
        let mut events = Events::default();
        assert!(bus.io_write(0xf4, 4, 0x11, 0, &mut events));
        assert_eq!(events.exit_status, Some(0x11));
        let mut events = Events::default();
        assert!(bus.io_write(0xf4, 1, 0x1ff, 0, &mut events));
        assert_eq!(events.exit_status, Some(0xff), "a byte write carries a byte");
    }
}
