//! The VM run loop (`hypervisor::vm::run_slice`) driven by mock vCPUs that return
//! fuzzer-chosen exits with fuzzer-chosen registers, modes and interrupt state: CPUID, MSRs
//! (local APIC, allow-listed and refused), port I/O (plain and string, on the whole device set),
//! MMIO decoded from guest memory through the guest's page tables, HLT with device and APIC
//! timers, XSETBV, CR8, IPIs and start-up of further vCPUs, console output and input.
//!
//! Guest memory is 2 MiB with the identity map the setup builds for 64-bit guests and the
//! fuzzer's bytes at the code address (restored to that after each input). Host time only moves forward: each call for the time
//! takes a little, each guest run takes what the fuzzer says, a wait lasts until the armed
//! timer.
//!
//! The mocks model only what the `Vcpu` trait documents (an event queued for the next entry
//! closes the interrupt window, as on VMX) and check that the run loop keeps to its side:
//! interrupts injected only while the window is open, only valid XCR0 values, CR8 in 0..=15.
//! A VM that stops making progress (every vCPU halted with nothing to wake it) is ended as the
//! platform ends it, with a timeout.
//!
//! Input: vCPU count, TSC frequency, options (test device, SVM-style CR8, console input, raw
//! console, XCR0 support, host CPU vendor), slice length, typed console input and code bytes
//! (each a u16 length and the bytes), then `Step`s (decoded with `arbitrary`, every field read
//! from the front, so seeds can be written by hand: see `make_seeds.py`).
#![no_main]

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use arbitrary::{Arbitrary, Unstructured};
use hypervisor::console::ConsoleLines;
use hypervisor::devices::ioapic::IOAPIC_BASE;
use hypervisor::devices::test_device::{TestDevice, MMIO_BASE};
use hypervisor::loader::{page_tables, GuestMemory, MemError, SliceMemory};
use hypervisor::vcpu::{
    valid_xcr0, Exit, Gprs, GuestMode, IoExit, Segment, StartMode, Vcpu, CR_SOURCE_UNKNOWN, XCR0_AVX, XCR0_SSE,
    XCR0_X87,
};
use hypervisor::vm::cpuid::Regs;
use hypervisor::vm::lapic::LAPIC_BASE;
use hypervisor::vm::{self, Env, Slice, VcpuContext, Vm, VmEnd};
use libfuzzer_sys::fuzz_target;
use spin::Mutex;

const MEMORY: usize = 2 << 20;
const PAGE_TABLES: u64 = 0x1_0000;
const CODE: u64 = 0x1_8000;
/// Rounds of slices in which no vCPU ran before the VM is stopped, as its timeout would.
const IDLE_ROUNDS: u32 = 16;

const PORTS: [u16; 40] = [
    0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x60, 0x64, 0x70, 0x71, 0x3f8, 0x3f9, 0x3fa,
    0x3fb, 0x3fc, 0x3fd, 0x3fe, 0x3ff, 0xf4, 0xf5, 0x80, 0x600, 0x602, 0x604, 0x608, 0xcf8, 0xcf9, 0xcfa, 0xcfc, 0xcfd,
    0xcfe, 0xcff, 0x2f8, 0x3f8, 0x3fd,
];

const MSRS: [u32; 24] = [
    0x10,
    0x1b,
    0x3a,
    0x3b,
    0x8b,
    0xfe,
    0x174,
    0x179,
    0x1a0,
    0x200,
    0x250,
    0x277,
    0x2ff,
    0x6e0,
    0x802,
    0x808,
    0x80b,
    0x830,
    0x838,
    0xc000_0082,
    0xc000_0103,
    0xc001_0000,
    0xc001_0015,
    0x4000_0000,
];

/// Guest RAM that remembers what was written, so the next input starts from the pristine
/// image by restoring only that (rather than building 2 MiB afresh each time).
struct Ram<'a> {
    bytes: SliceMemory<'a>,
    dirty: &'a mut Vec<(u64, u64)>,
}

impl GuestMemory for Ram<'_> {
    fn size(&self) -> u64 {
        self.bytes.size()
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.bytes.read(gpa, buf)
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        self.bytes.write(gpa, data)?;
        self.dirty.push((gpa, gpa + data.len() as u64));
        Ok(())
    }
}

thread_local! {
    /// The pristine guest RAM (identity map, nothing else) and the one the inputs use.
    static RAM: std::cell::RefCell<(Vec<u8>, Vec<u8>)> = std::cell::RefCell::new({
        let mut pristine = vec![0u8; MEMORY];
        page_tables::build_identity_map(&mut SliceMemory(&mut pristine), PAGE_TABLES, 4 << 30)
            .expect("the identity map fits");
        let working = pristine.clone();
        (pristine, working)
    });
}

/// Host time in nanoseconds, shared by the environment and the mocks.
#[derive(Clone)]
struct HostClock {
    ns: Rc<Cell<u64>>,
    tsc_hz: u64,
    armed: Rc<Cell<Option<u64>>>,
}

impl HostClock {
    fn tsc(&self) -> u64 {
        (u128::from(self.ns.get()) * u128::from(self.tsc_hz) / 1_000_000_000) as u64
    }

    fn pass(&self, ns: u64) {
        self.ns.set(self.ns.get().saturating_add(ns));
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Port {
    Known(u8),
    Raw(u16),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Gpa {
    Lapic(u16),
    Ioapic(u8),
    Test(u16),
    Ram(u32),
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Fatal {
    TripleFault,
    EntryFailed(u64),
    Unhandled(u64, u64),
    OtherCr(u8, bool, u8),
    BackendFailed,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum FuzzExit {
    Cpuid,
    Rdmsr,
    Wrmsr,
    Hlt,
    Xsetbv,
    Io {
        port: Port,
        size: u8,
        write: bool,
        string: bool,
        rep: bool,
    },
    NestedFault {
        gpa: Gpa,
        write: bool,
        fetch: bool,
    },
    InterruptWindow,
    ExternalInterrupt,
    Pause,
    Invd,
    MonitorMwait,
    Rdpmc,
    Cr8 {
        write: bool,
        gpr: u8,
    },
    /// A CR0 or CR4 write: the register, or (at 16 and above) none, so the run loop decodes it.
    CrWrite {
        cr4: bool,
        gpr: u8,
    },
    HostNmi,
    Fatal(Fatal),
}

impl FuzzExit {
    fn exit(self) -> Exit {
        match self {
            FuzzExit::Cpuid => Exit::Cpuid,
            FuzzExit::Rdmsr => Exit::Rdmsr,
            FuzzExit::Wrmsr => Exit::Wrmsr,
            FuzzExit::Hlt => Exit::Hlt,
            FuzzExit::Xsetbv => Exit::Xsetbv,
            FuzzExit::Io { port, size, write, string, rep } => Exit::Io(IoExit {
                port: match port {
                    Port::Known(i) => PORTS[usize::from(i) % PORTS.len()],
                    Port::Raw(p) => p,
                },
                // The widths a backend decodes.
                size: [1, 2, 4][usize::from(size % 3)],
                write,
                string,
                rep,
            }),
            FuzzExit::NestedFault { gpa, write, fetch } => Exit::NestedFault {
                gpa: match gpa {
                    Gpa::Lapic(o) => LAPIC_BASE + u64::from(o % 0x1000),
                    Gpa::Ioapic(o) => IOAPIC_BASE + u64::from(o),
                    Gpa::Test(o) => MMIO_BASE + u64::from(o % 0x1000),
                    Gpa::Ram(o) => u64::from(o) % MEMORY as u64,
                    Gpa::Raw(a) => a,
                },
                write,
                fetch,
            },
            FuzzExit::InterruptWindow => Exit::InterruptWindow,
            FuzzExit::ExternalInterrupt => Exit::ExternalInterrupt,
            FuzzExit::Pause => Exit::Pause,
            FuzzExit::Invd => Exit::Invd,
            FuzzExit::MonitorMwait => Exit::MonitorMwait,
            FuzzExit::Rdpmc => Exit::Rdpmc,
            FuzzExit::Cr8 { write, gpr } => Exit::CrAccess { cr: 8, write, gpr: gpr % 16 },
            FuzzExit::CrWrite { cr4, gpr } => Exit::CrAccess {
                cr: if cr4 { 4 } else { 0 },
                write: true,
                gpr: if gpr < 16 { gpr } else { CR_SOURCE_UNKNOWN },
            },
            FuzzExit::HostNmi => Exit::HostNmi,
            FuzzExit::Fatal(Fatal::TripleFault) => Exit::TripleFault,
            FuzzExit::Fatal(Fatal::EntryFailed(code)) => Exit::EntryFailed { code },
            FuzzExit::Fatal(Fatal::Unhandled(reason, info)) => Exit::Unhandled { reason, info },
            FuzzExit::Fatal(Fatal::BackendFailed) => Exit::BackendFailed { what: "fuzzed" },
            FuzzExit::Fatal(Fatal::OtherCr(cr, write, gpr)) => Exit::CrAccess { cr: cr % 8, write, gpr: gpr % 16 },
        }
    }
}

/// A register value: small numbers, MSR numbers, addresses in guest RAM, or anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Value {
    Small(u8),
    Msr(u8),
    Ram(u32),
    Raw(u64),
}

impl Value {
    fn get(self) -> u64 {
        match self {
            Value::Small(v) => v.into(),
            Value::Msr(i) => MSRS[usize::from(i) % MSRS.len()].into(),
            Value::Ram(a) => u64::from(a) % MEMORY as u64,
            Value::Raw(v) => v,
        }
    }
}

/// Paging and code-segment state the guest switched to before an exit.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Mode {
    Long,
    Protected32,
    Real(u16),
    Raw { cr0: u64, cr3: u64, cr4: u64, efer: u64, long_code: bool, default_32: bool },
}

impl Mode {
    fn get(self) -> GuestMode {
        match self {
            Mode::Long => long_mode(),
            Mode::Protected32 => {
                GuestMode { cr0: 0x11, cr3: 0, cr4: 0, efer: 0, long_code: false, default_32: true, cs_base: 0, cpl: 0 }
            }
            Mode::Real(cs) => real_mode(cs),
            Mode::Raw { cr0, cr3, cr4, efer, long_code, default_32 } => {
                GuestMode { cr0, cr3, cr4, efer, long_code, default_32, cs_base: 0, cpl: 0 }
            }
        }
    }
}

fn long_mode() -> GuestMode {
    GuestMode {
        cr0: 0x8001_0033,
        cr3: PAGE_TABLES,
        cr4: (1 << 5) | (1 << 18),
        efer: (1 << 8) | (1 << 10) | (1 << 11),
        long_code: true,
        default_32: false,
        cs_base: 0,
        cpl: 0,
    }
}

fn real_mode(cs: u16) -> GuestMode {
    GuestMode { cr0: 0x10, cr3: 0, cr4: 0, efer: 0, long_code: false, default_32: false, cs_base: u64::from(cs) << 4, cpl: 0 }
}

/// One exit of one vCPU, and what the guest changed before it.
#[derive(Arbitrary, Debug)]
struct Step {
    vcpu: u8,
    exit: FuzzExit,
    /// Registers the guest set (0-15 in encoding order, 4 = RSP, 16 = RIP).
    regs: [Option<(u8, Value)>; 3],
    /// Bit 0: RFLAGS.IF, bit 1: DF, bit 2: interrupt shadow, bit 3: NMIs blocked, bit 4: keep
    /// the flags as they were.
    flags: u8,
    mode: Option<Mode>,
    rip: Option<u16>,
    /// SVM's V_TPR: CR8 written without an exit.
    cr8: Option<u8>,
    /// Microseconds the guest ran.
    ran_us: u16,
}

struct Mock {
    steps: VecDeque<Step>,
    gprs: Gprs,
    rip: u64,
    rsp: u64,
    rflags: u64,
    mode: GuestMode,
    shadow: bool,
    nmi_blocked: bool,
    /// An exception, interrupt or NMI is queued for the next entry.
    event_queued: bool,
    window: bool,
    xcr0: u64,
    supported_xcr0: u64,
    /// Some: the guest's CR8 is visible without exits (SVM).
    cr8: Option<u8>,
    /// Like SVM without NRIP-save: instruction lengths are the run loop's to decode.
    svm: bool,
    cr2: u64,
    clock: HostClock,
    runs: u32,
}

impl Mock {
    fn new(steps: VecDeque<Step>, clock: HostClock, supported_xcr0: u64, svm: bool) -> Self {
        Mock {
            steps,
            gprs: Gprs::default(),
            rip: CODE,
            rsp: 0x8_0000,
            rflags: 0x2,
            mode: long_mode(),
            shadow: false,
            nmi_blocked: false,
            event_queued: false,
            window: false,
            xcr0: XCR0_X87,
            supported_xcr0,
            cr8: svm.then_some(0),
            svm,
            cr2: 0,
            clock,
            runs: 0,
        }
    }

    fn start(&mut self, start: StartMode) {
        match start {
            StartMode::Real { cs, ip } => {
                self.mode = real_mode(cs);
                self.rip = ip.into();
            }
            other => panic!("vCPUs restart in real mode, not {other:?}"),
        }
        self.gprs = Gprs::default();
        self.rflags = 0x2;
        (self.shadow, self.nmi_blocked, self.event_queued, self.window) = (false, false, false, false);
    }
}

impl Vcpu for Mock {
    fn run(&mut self) -> Exit {
        self.runs += 1;
        self.event_queued = false;
        let Some(step) = self.steps.pop_front() else {
            return Exit::TripleFault;
        };
        self.clock.pass(u64::from(step.ran_us) * 1000);
        for &(reg, value) in step.regs.iter().flatten() {
            match reg % 17 {
                4 => self.rsp = value.get(),
                16 => self.rip = value.get(),
                n => {
                    if let Some(slot) = self.gprs.slot(n) {
                        *slot = value.get();
                    }
                }
            }
        }
        if step.flags & 0x10 == 0 {
            self.rflags =
                0x2 | if step.flags & 1 != 0 { 1 << 9 } else { 0 } | if step.flags & 2 != 0 { 1 << 10 } else { 0 };
            self.shadow = step.flags & 4 != 0;
            self.nmi_blocked = step.flags & 8 != 0;
        }
        if let Some(mode) = step.mode {
            self.mode = mode.get();
        }
        if let Some(offset) = step.rip {
            self.rip = CODE + u64::from(offset % 0x1000);
        }
        if let (Some(cr8), Some(mine)) = (step.cr8, self.cr8.as_mut()) {
            *mine = cr8 & 0xf;
        }
        let exit = step.exit.exit();
        if hypervisor_fuzz::verbose() {
            eprintln!("exit {exit} at RIP {:#x}, RAX {:#x}, RFLAGS {:#x}", self.rip, self.gprs.rax, self.rflags);
        }
        exit
    }
    fn gprs(&mut self) -> &mut Gprs {
        &mut self.gprs
    }
    fn rip(&self) -> u64 {
        self.rip
    }
    fn set_rip(&mut self, rip: u64) {
        self.rip = rip;
    }
    fn rsp(&self) -> u64 {
        self.rsp
    }
    fn set_rsp(&mut self, rsp: u64) {
        self.rsp = rsp;
    }
    fn rflags(&self) -> u64 {
        self.rflags
    }
    fn mode(&self) -> GuestMode {
        self.mode
    }
    /// SVM-like mocks leave the length to the run loop (as SVM without NRIP-save does).
    fn skip_instruction(&mut self) -> bool {
        if self.svm {
            return false;
        }
        self.rip = self.rip.wrapping_add(2);
        true
    }
    fn set_efer(&mut self, efer: u64) {
        self.mode.efer = efer;
    }
    fn set_cr0(&mut self, cr0: u64) {
        assert_eq!(cr0 >> 32, 0, "CR0 {cr0:#x} with reserved bits loaded");
        self.mode.cr0 = cr0;
    }
    fn set_cr2(&mut self, cr2: u64) {
        self.cr2 = cr2;
    }
    fn segment_base(&self, _segment: Segment) -> u64 {
        0
    }
    fn set_cr4(&mut self, cr4: u64) {
        assert_eq!(cr4 >> 32, 0, "CR4 {cr4:#x} with reserved bits loaded");
        self.mode.cr4 = cr4;
    }
    fn inject_exception(&mut self, vector: u8, _error_code: Option<u32>) {
        assert!(vector < 32, "exception vector {vector}");
        self.event_queued = true;
    }
    fn interrupts_open(&self) -> bool {
        self.rflags & (1 << 9) != 0 && !self.shadow && !self.event_queued
    }
    fn inject_interrupt(&mut self, vector: u8) {
        if hypervisor_fuzz::verbose() {
            eprintln!("inject interrupt {vector:#x}");
        }
        assert!(self.interrupts_open(), "interrupt {vector:#x} injected while the window is closed");
        self.event_queued = true;
    }
    fn inject_nmi(&mut self) -> bool {
        if self.nmi_blocked || self.event_queued {
            return false;
        }
        self.event_queued = true;
        self.nmi_blocked = true;
        true
    }
    fn set_interrupt_window_exiting(&mut self, on: bool) {
        self.window = on;
    }
    fn set_xcr0(&mut self, xcr0: u64) {
        assert!(valid_xcr0(xcr0, self.supported_xcr0), "XCR0 {xcr0:#x} (supported {:#x})", self.supported_xcr0);
        self.xcr0 = xcr0;
    }
    fn xcr0(&self) -> u64 {
        self.xcr0
    }
    fn guest_cr8(&self) -> Option<u8> {
        self.cr8
    }
    fn set_guest_cr8(&mut self, cr8: u8) {
        assert!(cr8 <= 0xf, "CR8 {cr8:#x}");
        if let Some(mine) = self.cr8.as_mut() {
            *mine = cr8;
        }
    }
}

fn host_cpuid(vendor: u8) -> impl Fn(u32, u32) -> Regs {
    move |leaf, subleaf| match (leaf, vendor % 2) {
        // "GenuineIntel" or "AuthenticAMD".
        (0, 0) => [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69],
        (0, _) => [0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65],
        (0x8000_0000, _) => [0x8000_0008, 0, 0, 0],
        _ => {
            let x = u64::from(leaf).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(subleaf) ^ u64::from(vendor);
            [x as u32, (x >> 32) as u32, (x >> 16) as u32, (x >> 8) as u32]
        }
    }
}

fn check_end(end: &VmEnd) {
    let line = end.end_line("fuzz");
    assert!(line.starts_with("VM-END vm=fuzz reason="), "{line}");
    assert!(!line.contains('\n'), "{line:?}");
    let detail = line.split_once("detail=\"").map(|(_, d)| d).expect("a detail");
    assert!(detail.ends_with('"') && !detail[..detail.len() - 1].contains('"'), "{line}");
    let _ = end.is_clean();
}

/// A length (a little-endian u16, modulo `max + 1`) and that many bytes, or what is left.
fn bytes<'a>(u: &mut Unstructured<'a>, max: usize) -> arbitrary::Result<&'a [u8]> {
    let len = usize::from(u.arbitrary::<u16>()?) % (max + 1);
    u.bytes(len.min(u.len()))
}

fn run(data: &[u8]) -> arbitrary::Result<()> {
    RAM.with(|ram| {
        let (pristine, working) = &mut *ram.borrow_mut();
        let mut dirty = Vec::new();
        let result = run_with(data, Ram { bytes: SliceMemory(working), dirty: &mut dirty });
        for (start, end) in dirty {
            let (start, end) = (start as usize, end as usize);
            working[start..end].copy_from_slice(&pristine[start..end]);
        }
        result
    })
}

fn run_with(data: &[u8], mut memory: Ram<'_>) -> arbitrary::Result<()> {
    let mut u = Unstructured::new(data);
    let vcpus = usize::from(u.arbitrary::<u8>()? % 4) + 1;
    let tsc_hz: u64 = match u.arbitrary::<u8>()? % 3 {
        0 => 1_000_000_000,
        1 => 3_000_000_000,
        _ => u64::from(u.arbitrary::<u32>()?) + 1,
    };
    let options: u8 = u.arbitrary()?;
    let (test_device, svm, input, raw, vendor) =
        (options & 1 != 0, options & 2 != 0, options & 4 != 0, options & 8 != 0, options >> 4);
    let supported_xcr0 = if options & 0x10 != 0 { XCR0_X87 | XCR0_SSE } else { XCR0_X87 | XCR0_SSE | XCR0_AVX };
    let slice_us = u64::from(u.arbitrary::<u16>()?) + 1;
    let typed = bytes(&mut u, 256)?.to_vec();
    let code = bytes(&mut u, 0x2000)?;
    let mut scripts: Vec<VecDeque<Step>> = (0..vcpus).map(|_| VecDeque::new()).collect();
    while !u.is_empty() {
        let step: Step = u.arbitrary()?;
        scripts[usize::from(step.vcpu) % vcpus].push_back(step);
    }

    memory.write(CODE, code).expect("the code fits");

    let mut vm = Vm::with_vcpus("fuzz", memory, tsc_hz, 1_700_000_000, vcpus);
    if test_device {
        vm.bus.add(Box::new(TestDevice::default())).expect("the test device's ports and page are free");
    }
    let vm = Mutex::new(vm);

    let clock = HostClock { ns: Rc::new(Cell::new(1_000_000)), tsc_hz, armed: Rc::new(Cell::new(None)) };
    let now_clock = clock.clone();
    // Each look at the clock takes a little host time, so slices end.
    let now_micros = move || {
        now_clock.pass(250);
        now_clock.ns.get() / 1000
    };
    let tsc_clock = clock.clone();
    let host_tsc = move || tsc_clock.tsc();
    let arm_clock = clock.clone();
    let arm_timer = move |ns: Option<u64>| arm_clock.armed.set(ns.map(|ns| arm_clock.ns.get().saturating_add(ns)));
    let wait_clock = clock.clone();
    let wait = move || {
        let now = wait_clock.ns.get();
        let until = wait_clock.armed.get().unwrap_or(now + 1_000_000).max(now + 1);
        wait_clock.ns.set(until);
    };
    let cpuid = host_cpuid(vendor);
    let kicks = RefCell::new(0u64);
    let kick = |cpu: usize| {
        assert!(cpu < vcpus, "kick of vCPU {cpu} of {vcpus}");
        *kicks.borrow_mut() |= 1 << cpu;
    };
    // The host console, as the platform writes it: VM lines and raw records.
    let host = RefCell::new((ConsoleLines::new(), String::new()));
    let mut console = |text: &str, ends_line: bool| {
        assert!(text.len() <= 512, "a console piece of {} bytes", text.len());
        assert!(text.bytes().all(|b| b.is_ascii_graphic() || b == b' '), "unsanitized console text {text:?}");
        let (lines, out) = &mut *host.borrow_mut();
        lines.vm_text(0, "fuzz", text, ends_line, &mut |s| out.push_str(s));
    };
    let mut typed = typed.into_iter();
    let mut read_input = move || typed.next();
    let mut raw_console = |bytes: &[u8]| {
        assert!(!bytes.is_empty() && bytes.len() <= 512, "raw console piece of {} bytes", bytes.len());
        let (lines, out) = &mut *host.borrow_mut();
        lines.raw(bytes, &mut |s| out.push_str(s));
    };
    let mut env = Env {
        cpuid: &cpuid,
        now_micros: &now_micros,
        host_tsc: &host_tsc,
        console: &mut console,
        supported_xcr0,
        tsc_hz,
        arm_timer: &arm_timer,
        wait: &wait,
        input: if input { Some(&mut read_input) } else { None },
        raw_console: if raw { Some(&mut raw_console) } else { None },
        kick: &kick,
        host_nmi: &|_| {},
    };

    let mut mocks: Vec<Mock> =
        scripts.into_iter().map(|steps| Mock::new(steps, clock.clone(), supported_xcr0, svm)).collect();
    let mut cxs: Vec<VcpuContext> = (0..vcpus).map(VcpuContext::new).collect();
    let mut halted: Vec<Option<u64>> = vec![None; vcpus];
    let mut idle = 0;
    let end = 'run: loop {
        let runs_before: u32 = mocks.iter().map(|m| m.runs).sum();
        for i in 0..vcpus {
            // A halted vCPU sleeps until its wake time, unless it was kicked.
            let kicked = *kicks.borrow() & (1 << i) != 0;
            if let Some(wake_us) = halted[i] {
                if !kicked && clock.ns.get() / 1000 < wake_us {
                    continue;
                }
            }
            *kicks.borrow_mut() &= !(1 << i);
            let slice_end = (clock.ns.get() / 1000).saturating_add(slice_us);
            halted[i] = None;
            match vm::run_slice(&vm, &mut cxs[i], &mut mocks[i], &mut env, slice_end) {
                Slice::Preempted => {}
                Slice::Halted { wake_at_us } => halted[i] = Some(wake_at_us),
                Slice::Started(start) => mocks[i].start(start),
                Slice::Ended(end) => break 'run end,
            }
        }
        let runs: u32 = mocks.iter().map(|m| m.runs).sum();
        if runs == runs_before {
            // Every vCPU sleeps: the host sleeps until the first wake time.
            idle += 1;
            if idle > IDLE_ROUNDS {
                vm.lock().end(VmEnd::Timeout(1));
                // Every vCPU looks once more and sees the end.
                halted.fill(None);
                continue;
            }
            let wake = halted.iter().flatten().min().copied().unwrap_or(u64::MAX);
            let now_us = clock.ns.get() / 1000;
            let until = wake.max(now_us + 1).min(now_us + 10_000_000);
            clock.ns.set(until.saturating_mul(1000));
        } else {
            idle = 0;
        }
    };
    if hypervisor_fuzz::verbose() {
        eprintln!("{} ({} vCPU runs)", end.end_line("fuzz"), mocks.iter().map(|m| m.runs).sum::<u32>());
    }
    check_end(&end);
    let vm = vm.into_inner();
    assert_eq!(vm.ended(), Some(&end), "the VM keeps its first end");
    for (cx, mock) in cxs.iter().zip(&mocks) {
        let _ = vm.describe_vcpu(cx, mock);
    }
    let (mut lines, mut out) = host.into_inner();
    lines.close(&mut |s| out.push_str(s));
    // Nothing a guest prints can start a line the tools parse.
    if hypervisor_fuzz::verbose() {
        eprint!("{out}");
    }
    for line in out.lines() {
        assert!(line.starts_with("[fuzz] ") || line.starts_with("HV-RAW "), "host console line {line:?}");
    }
    let _ = vm.stats.table("fuzz");
    let _ = vm.stats.total();
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
