//! COM1 console and the `log` backend: every record carries a timestamp and its level.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, Ordering};

use spin::Mutex;
use uart_16550::SerialPort;
use x86_64::instructions::port::Port;

use crate::console::ConsoleLines;

const COM1: u16 = 0x3f8;

/// COM1 and which VM has a line open on it: one lock, so lines never mix.
struct Console {
    port: SerialPort,
    lines: ConsoleLines,
}

impl Console {
    /// Writes a host line (log record, end line) after closing any open VM line.
    fn host_line(&mut self, args: fmt::Arguments<'_>) {
        let port = &mut self.port;
        self.lines.close(&mut |s| {
            let _ = port.write_str(s);
        });
        let _ = self.port.write_fmt(args);
    }
}

// SAFETY: 0x3f8 is COM1 on every PC platform we boot on (QEMU, Bochs, real hardware).
static SERIAL: Mutex<Console> =
    Mutex::new(Console { port: unsafe { SerialPort::new(COM1) }, lines: ConsoleLines::new() });
static LOGGER: Logger = Logger;
static TSC_AT_BOOT: AtomicU64 = AtomicU64::new(0);
static TSC_PER_MICROSECOND: AtomicU64 = AtomicU64::new(0);

/// Programs COM1 (8N1: Bochs starts it at 5 data bits), calibrates the timestamp clock and
/// installs the logger.
pub fn init() {
    SERIAL.lock().port.init();
    // The UEFI/BIOS boot stage may leave its last line unterminated.
    write_str("\n");
    TSC_AT_BOOT.store(rdtsc(), Ordering::Relaxed);
    TSC_PER_MICROSECOND.store(calibrate_tsc_with_pit().unwrap_or(0), Ordering::Relaxed);
    log::set_logger(&LOGGER).expect("logger installed twice");
    log::set_max_level(log::LevelFilter::Info);
    if TSC_PER_MICROSECOND.load(Ordering::Relaxed) == 0 {
        log::warn!("TSC calibration against the PIT failed: timestamps are raw TSC ticks");
    }
}

/// Writes to COM1 even if the lock is held: for exception and panic reports, where the holder
/// may be the very code that faulted and will never release it.
pub fn emergency_write(args: fmt::Arguments<'_>) {
    // SAFETY: only called on the way to ending the run; interleaving with a half-written line
    // is acceptable, a deadlock is not.
    unsafe { SERIAL.force_unlock() };
    SERIAL.lock().host_line(args);
}

/// Waits (bounded) until the UART has shifted out every byte, so an emulator that exits right
/// after the last write does not cut the end of the log.
pub fn drain() {
    const LINE_STATUS: u16 = COM1 + 5;
    const TRANSMITTER_EMPTY: u8 = 1 << 6;
    let mut status: Port<u8> = Port::new(LINE_STATUS);
    for _ in 0..1_000_000 {
        // SAFETY: reading the line status register of COM1 has no side effects.
        if unsafe { status.read() } & TRANSMITTER_EMPTY != 0 {
            return;
        }
        core::hint::spin_loop();
    }
}

/// Sends one line to COM1.
pub fn write_line(line: &str) {
    SERIAL.lock().host_line(format_args!("{line}\n"));
}

/// Sends host text (whole lines) to COM1.
pub fn write_str(s: &str) {
    SERIAL.lock().host_line(format_args!("{s}"));
}

/// Sends a piece of VM `vm`'s console line (see [`ConsoleLines::vm_text`]).
pub fn write_vm_text(vm: usize, name: &str, text: &str, ends_line: bool) {
    let mut serial = SERIAL.lock();
    let Console { port, lines } = &mut *serial;
    lines.vm_text(vm, name, text, ends_line, &mut |s| {
        let _ = port.write_str(s);
    });
}

/// Sends raw console bytes of the VM with the input (see [`ConsoleLines::raw`]).
pub fn write_vm_raw(bytes: &[u8]) {
    let mut serial = SERIAL.lock();
    let Console { port, lines } = &mut *serial;
    lines.raw(bytes, &mut |s| {
        let _ = port.write_str(s);
    });
}

/// Microseconds since `init`, or raw TSC ticks if calibration failed.
pub fn uptime_micros() -> u64 {
    let ticks = rdtsc().wrapping_sub(TSC_AT_BOOT.load(Ordering::Relaxed));
    match TSC_PER_MICROSECOND.load(Ordering::Relaxed) {
        0 => ticks,
        rate => ticks / rate,
    }
}

/// Nanoseconds since `init` (0 if the TSC was not calibrated).
pub fn uptime_ns() -> u64 {
    let ticks = rdtsc().wrapping_sub(TSC_AT_BOOT.load(Ordering::Relaxed));
    match TSC_PER_MICROSECOND.load(Ordering::Relaxed) {
        0 => 0,
        rate => (ticks as u128 * 1000 / rate as u128) as u64,
    }
}

/// A byte typed on COM1, if one is waiting.
pub fn read_byte() -> Option<u8> {
    let mut line_status: Port<u8> = Port::new(COM1 + 5);
    let mut data: Port<u8> = Port::new(COM1);
    // SAFETY: reading COM1's line status has no side effects; the data register is read only
    // when it holds a received byte.
    unsafe { (line_status.read() & 1 != 0).then(|| data.read()) }
}

/// TSC frequency in ticks per microsecond (0 if unknown).
pub fn tsc_per_microsecond() -> u64 {
    TSC_PER_MICROSECOND.load(Ordering::Relaxed)
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects and is allowed at CPL 0.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Counts TSC ticks across 10 ms of PIT channel 2 (1.193182 MHz, mode 0, speaker gated off).
fn calibrate_tsc_with_pit() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const COUNT: u16 = (PIT_HZ / 100) as u16;
    let mut gate: Port<u8> = Port::new(0x61);
    let mut command: Port<u8> = Port::new(0x43);
    let mut channel2: Port<u8> = Port::new(0x42);
    // SAFETY: ports 0x42/0x43/0x61 are the legacy PIT and speaker gate; channel 2 drives only
    // the speaker, which stays disconnected (bit 1 clear).
    unsafe {
        let old = gate.read();
        gate.write((old & !0x02) | 0x01);
        command.write(0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
        channel2.write(COUNT as u8);
        channel2.write((COUNT >> 8) as u8);
        let start = rdtsc();
        // Bounded: a missing PIT must not hang boot.
        for _ in 0..50_000_000u32 {
            if gate.read() & 0x20 != 0 {
                let elapsed = rdtsc() - start;
                gate.write(old);
                let per_us = elapsed * 100 / 1_000_000;
                return (per_us > 0).then_some(per_us);
            }
        }
        gate.write(old);
    }
    None
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        // virtio-drivers reports each device it sets up; the host disk's own line says it once.
        if metadata.target().starts_with("virtio_drivers") && metadata.level() > log::Level::Warn {
            return false;
        }
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let micros = uptime_micros();
        SERIAL.lock().host_line(format_args!(
            "[{:>5}.{:06}] {:<5} {}\n",
            micros / 1_000_000,
            micros % 1_000_000,
            record.level(),
            record.args()
        ));
    }

    fn flush(&self) {}
}
