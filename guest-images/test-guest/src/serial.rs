//! COM1 output and the exit port.

use core::arch::asm;
use core::fmt;

const COM1_THR: u16 = 0x3F8;
const COM1_LSR: u16 = 0x3FD;
const LSR_THR_EMPTY: u8 = 0x20;
const EXIT_PORT: u16 = 0xF4;

/// Stateless COM1 writer: every byte goes straight to the port, so it is usable from trap handlers.
pub struct Serial;

impl Serial {
    fn write_byte(byte: u8) {
        while inb(COM1_LSR) & LSR_THR_EMPTY == 0 {
            core::hint::spin_loop();
        }
        // SAFETY: writing the COM1 transmit register has no effect on memory.
        unsafe { asm!("out dx, al", in("dx") COM1_THR, in("al") byte, options(nomem, nostack, preserves_flags)) };
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(Serial::write_byte);
        Ok(())
    }
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: the ports this guest reads (COM1) have no side effects on guest memory.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Prints one line to COM1.
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        // Serial never fails.
        let _ = writeln!($crate::serial::Serial, $($arg)*);
    }};
}
pub(crate) use println;

/// Ends the VM with `status` (0 = every case passed) through the exit port.
pub fn exit(status: u32) -> ! {
    // SAFETY: the exit port only asks the hypervisor to stop this VM.
    unsafe { asm!("out dx, eax", in("dx") EXIT_PORT, in("eax") status, options(nomem, nostack, preserves_flags)) };
    // Only reached if the hypervisor ignores the exit port.
    loop {
        // SAFETY: halting with interrupts off just parks the CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}
