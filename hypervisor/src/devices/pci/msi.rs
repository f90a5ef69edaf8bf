//! MSI (PCI Local Bus Specification 3.0, 6.8.1): the capability with a 64-bit message address
//! and one message (no multiple messages, no per-vector masking). A function that also has
//! MSI-X uses this only while MSI-X is off.

use super::super::{Events, Msi as Message};
use super::config::{ConfigSpace, COMMAND_BUS_MASTER};

/// MSI capability ID.
pub const CAPABILITY_ID: u8 = 0x05;

/// Message control: MSI enable.
const CONTROL_ENABLE: u16 = 1 << 0;
/// Message control: the function can send 64-bit message addresses.
const CONTROL_64BIT: u16 = 1 << 7;

/// A function's MSI capability.
#[derive(Clone, Copy, Debug)]
pub struct Msi {
    /// Offset of the capability in configuration space.
    capability: usize,
}

impl Msi {
    /// Adds the capability to `space`: disabled, one message, 64-bit address. `None` if it
    /// does not fit.
    pub fn new(space: &mut ConfigSpace) -> Option<Self> {
        // Control, address low, address high, data, and two bytes of padding.
        let mut body = [0u8; 12];
        body[0..2].copy_from_slice(&CONTROL_64BIT.to_le_bytes());
        let capability = space.add_capability(CAPABILITY_ID, &body)?;
        // Writable: enable (multiple message enable stays 0: one message); the address, dword
        // aligned; the 16-bit data.
        space.set_writable(capability + 2, &[0x01, 0x00]);
        space.set_writable(capability + 4, &[0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        space.set_writable(capability + 12, &[0xff, 0xff]);
        Some(Msi { capability })
    }

    /// Whether the driver turned MSI on.
    pub fn enabled(&self, space: &ConfigSpace) -> bool {
        space.word(self.capability + 2) & CONTROL_ENABLE != 0
    }

    /// Sends the message, if MSI is on and the function may master the bus; false if not sent.
    pub fn signal(&self, space: &ConfigSpace, events: &mut Events) -> bool {
        if !self.enabled(space) || space.command() & COMMAND_BUS_MASTER == 0 {
            return false;
        }
        let address = u64::from(space.dword(self.capability + 4)) | u64::from(space.dword(self.capability + 8)) << 32;
        events.msi.push(Message { address, data: u32::from(space.word(self.capability + 12)) });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{Identity, COMMAND};
    use super::*;

    #[test]
    fn one_message_with_a_64_bit_address() {
        let identity = Identity { vendor: 1, device: 2, revision: 0, class: 0, subsystem_vendor: 0, subsystem: 0 };
        let mut space = ConfigSpace::new(identity, 1);
        let msi = Msi::new(&mut space).unwrap();
        let at = usize::from(space.byte(0x34));
        assert_eq!(space.byte(at), CAPABILITY_ID);
        assert_eq!(space.read(at + 2, 2), 0x0080, "64-bit capable, one message, off");
        space.write(at + 2, 2, 0xffff);
        assert_eq!(space.read(at + 2, 2), 0x0081, "only enable is writable");
        space.write(at + 4, 4, 0xfee0_1003);
        space.write(at + 8, 4, 0);
        space.write(at + 12, 4, 0xffff_4061);
        assert_eq!(space.read(at + 12, 4), 0x4061, "16 bits of data");
        let mut events = Events::default();
        assert!(!msi.signal(&space, &mut events), "no bus mastering, no message");
        space.write(COMMAND, 2, u32::from(COMMAND_BUS_MASTER));
        assert!(msi.signal(&space, &mut events));
        assert_eq!(events.msi, [Message { address: 0xfee0_1000, data: 0x4061 }]);
        space.write(at + 2, 2, 0);
        assert!(!msi.signal(&space, &mut events));
    }
}
