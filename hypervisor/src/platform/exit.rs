//! Ending a run: one final status line, then the emulator's exit device.

use x86_64::instructions::port::Port;

use super::serial;
use crate::status::{EndLine, RunStatus};

/// QEMU `isa-debug-exit` (`-device isa-debug-exit,iobase=0xf4,iosize=4`).
const QEMU_DEBUG_EXIT_PORT: u16 = 0xf4;
/// Bochs shuts down when "Shutdown" is written here.
const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;

/// Prints the end line and stops the machine: QEMU and Bochs exit, real hardware halts.
pub fn end(status: RunStatus, reason: &str) -> ! {
    x86_64::instructions::interrupts::disable();
    serial::emergency_write(format_args!("{}\n", EndLine { status, reason }));
    serial::drain();
    // SAFETY: both ports are unclaimed on real PCs and on the other emulator, so writing them
    // there does nothing; the machine halts below either way.
    unsafe {
        Port::<u32>::new(QEMU_DEBUG_EXIT_PORT).write(status.debug_exit_code());
        let mut bochs = Port::<u8>::new(BOCHS_SHUTDOWN_PORT);
        for byte in b"Shutdown" {
            bochs.write(*byte);
        }
    }
    loop {
        x86_64::instructions::hlt();
    }
}
