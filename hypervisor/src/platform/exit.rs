//! Ending a run: one final status line, then the emulator's exit device.
//!
//! Any CPU may end the run (the last VM ended, a panic, a host exception). The first one to
//! get here claims the end and stops every other CPU with an NMI, so there is one report and
//! one end line; a CPU that arrives second, or takes the NMI, parks.

use core::sync::atomic::{AtomicUsize, Ordering};

use x86_64::instructions::port::Port;

use super::{apic, percpu, serial};
use crate::status::{EndLine, RunStatus};

/// Index of the CPU that is ending the run (`usize::MAX`: nobody yet).
static ENDING_CPU: AtomicUsize = AtomicUsize::new(usize::MAX);

/// QEMU `isa-debug-exit` (`-device isa-debug-exit,iobase=0xf4,iosize=4`).
const QEMU_DEBUG_EXIT_PORT: u16 = 0xf4;
/// Bochs shuts down when "Shutdown" is written here.
const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;

/// Index of the CPU running this code (0 before the per-CPU blocks exist).
pub fn this_cpu() -> usize {
    // Before the boot CPU has its per-CPU block there is no other CPU.
    if percpu::count() == 0 {
        0
    } else {
        percpu::current().index
    }
}

/// Claims the end of the run for this CPU and stops the others; a CPU that loses the race
/// (or claims again from another CPU) parks instead of returning.
pub fn claim() {
    x86_64::instructions::interrupts::disable();
    let me = this_cpu();
    match ENDING_CPU.compare_exchange(usize::MAX, me, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => apic::send_nmi_to_others(),
        Err(owner) if owner == me => {}
        Err(_) => park(),
    }
}

/// Whether some CPU is ending the run (an NMI then means: stop).
pub fn ending() -> bool {
    ENDING_CPU.load(Ordering::Acquire) != usize::MAX
}

/// Stops this CPU for good.
pub fn park() -> ! {
    x86_64::instructions::interrupts::disable();
    loop {
        x86_64::instructions::hlt();
    }
}

/// Prints the end line and stops the machine: QEMU and Bochs exit, real hardware halts.
pub fn end(status: RunStatus, reason: &str) -> ! {
    claim();
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
    park()
}
