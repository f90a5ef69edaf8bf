//! A VM and its run loop: exit handling written once for both backends.
//!
//! Everything here compiles for the host and is tested against a scripted mock vCPU; the
//! bare-metal layer supplies the real vCPU, guest memory, clock and console.

pub mod config;
pub mod control_regs;
pub mod cpuid;
pub mod interrupts;
pub mod ipi;
pub mod lapic;
pub mod msr;
pub mod network;
pub mod pvclock;
pub mod setup;
pub mod stats;
pub mod storage;

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::devices::{self, Bus, Events};
use crate::guest_clock::GuestClock;
use crate::loader::guest_walk::{self, WalkError};
use crate::loader::GuestMemory;
use crate::mmio::{self, MmioKind};
use crate::vcpu::{valid_xcr0, Exit, GuestMode, IoExit, Segment, StartMode, Vcpu, CR_SOURCE_UNKNOWN};
use control_regs::CR4_OSXSAVE;
use interrupts::InterruptRouter;
use msr::MsrModel;
use spin::Mutex;
use stats::ExitStats;

const VECTOR_UD: u8 = 6;
const VECTOR_GP: u8 = 13;
const VECTOR_PF: u8 = 14;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_DF: u64 = 1 << 10;
/// Longest console line before it is flushed without a newline.
const MAX_CONSOLE_LINE: usize = 512;
/// Interrupts queued beyond this are dropped (and reported): a guest cannot grow our memory.
const MAX_PENDING_INTERRUPTS: usize = 64;
/// String I/O iterations per exit; a longer REP restarts with the updated count.
const MAX_STRING_ITERATIONS: u64 = 4096;

/// Why a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest wrote this status to the debug-exit port.
    DebugExit(u32),
    /// Triple fault / shutdown.
    TripleFault {
        /// RIP at the time.
        rip: u64,
    },
    /// HLT with no way to wake up.
    Halted(&'static str),
    /// ACPI S5 power-off.
    PowerOff,
    /// The guest reset the machine (i8042, port 0xcf9, triple-fault-free reboot).
    Reset,
    /// The guest did something the hypervisor cannot emulate, or entry failed.
    Error(String),
    /// The VM ran longer than its configured `timeout` (seconds).
    Timeout(u64),
}

impl VmEnd {
    /// The VM ended the way a passing guest ends.
    pub fn is_clean(&self) -> bool {
        matches!(self, VmEnd::DebugExit(0) | VmEnd::PowerOff)
    }
}

impl VmEnd {
    /// The one line that reports a VM's end: `VM-END vm=NAME reason=KIND status=N detail="..."`.
    pub fn end_line(&self, vm: &str) -> String {
        let (reason, status) = match self {
            VmEnd::DebugExit(status) => ("debug-exit", *status as u64),
            VmEnd::TripleFault { .. } => ("triple-fault", 0),
            VmEnd::Halted(_) => ("halted", 0),
            VmEnd::PowerOff => ("power-off", 0),
            VmEnd::Reset => ("reset", 0),
            VmEnd::Error(_) => ("error", 0),
            VmEnd::Timeout(_) => ("timeout", 0),
        };
        let detail: String = format!("{self}").chars().map(|c| if c == '"' { '\'' } else { c }).collect();
        format!("VM-END vm={vm} reason={reason} status={status} detail=\"{detail}\"")
    }
}

impl fmt::Display for VmEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmEnd::DebugExit(status) => write!(f, "debug-exit status {status}"),
            VmEnd::TripleFault { rip } => write!(f, "triple fault at RIP {rip:#x}"),
            VmEnd::Halted(why) => write!(f, "halted: {why}"),
            VmEnd::PowerOff => f.write_str("powered off (ACPI S5)"),
            VmEnd::Reset => f.write_str("reset by the guest"),
            VmEnd::Error(e) => write!(f, "error: {e}"),
            VmEnd::Timeout(seconds) => write!(f, "still running after its timeout of {seconds} s"),
        }
    }
}

/// Where a VM's raw console bytes go (see [`Env::raw_console`]).
pub type RawConsole<'a> = &'a mut dyn FnMut(&[u8]);

/// What the bare-metal layer (or a test) provides to the run loop.
pub struct Env<'a> {
    /// Executes the host's CPUID.
    pub cpuid: &'a dyn Fn(u32, u32) -> cpuid::Regs,
    /// A monotonic clock in microseconds (for statistics).
    pub now_micros: &'a dyn Fn() -> u64,
    /// The host's TSC (the guest's is derived from it; see [`GuestClock`]).
    pub host_tsc: &'a dyn Fn() -> u64,
    /// Receives the guest's console text, sanitized, one piece of a line at a time; `true`
    /// ends the line. The receiver prefixes lines with the VM name ([`crate::console`]).
    pub console: &'a mut dyn FnMut(&str, bool),
    /// XCR0 bits guests may enable.
    pub supported_xcr0: u64,
    /// The guest TSC's frequency (0 if unknown).
    pub tsc_hz: u64,
    /// Arms the host timer to force an exit (or end a wait) this many ns from now; `None` disarms.
    pub arm_timer: &'a dyn Fn(Option<u64>),
    /// Sleeps until the armed timer or another host interrupt.
    pub wait: &'a dyn Fn(),
    /// Bytes typed on the host console, if the host has one: a halted guest then waits for
    /// input instead of being declared dead.
    pub input: Option<&'a mut dyn FnMut() -> Option<u8>>,
    /// Receives the guest's console bytes unaltered (escape sequences included) when the host
    /// shows this VM raw (`console = raw`, and the VM has the input); `None` otherwise.
    pub raw_console: Option<RawConsole<'a>>,
    /// Makes vCPU `n` of this VM look at its interrupts soon: interrupt the host CPU running
    /// it, or wake it if it is halted. Called without the VM lock held.
    pub kick: &'a dyn Fn(usize),
    /// Sends real NMIs to host CPUs (for the test device's request).
    pub host_nmi: &'a dyn Fn(devices::HostNmi),
}

/// How often a halted guest looks for console input.
const INPUT_POLL_NS: u64 = 10_000_000;
/// Typed bytes held for the guest while its UART is full.
const MAX_PENDING_INPUT: usize = 4096;
/// How often a running guest's host console is checked for input.
const INPUT_POLL_INTERVAL_US: u64 = 1_000;

/// What belongs to one vCPU and only the host CPU running it touches: its clock and MSRs.
pub struct VcpuContext {
    /// The vCPU's index in its VM (and its APIC ID).
    pub index: usize,
    clock: GuestClock,
    msrs: MsrModel,
    /// The vCPU executed HLT and waits for an interrupt.
    halted: bool,
    /// Its clock was taken from the VM's.
    started: bool,
    /// MSR_KVM_SYSTEM_TIME_NEW as last written: where its kvm-clock structure is.
    kvm_clock: u64,
    /// The kvm-clock structure's version (even; bumped by 2 at every write).
    kvm_clock_version: u32,
}

impl VcpuContext {
    /// vCPU `index`; its clock starts with the VM's ([`Vm::start`]).
    pub fn new(index: usize) -> Self {
        VcpuContext {
            index,
            clock: GuestClock::new(0, 0),
            msrs: MsrModel::default(),
            halted: false,
            started: false,
            kvm_clock: 0,
            kvm_clock_version: 0,
        }
    }

    /// Back to the power-up state (INIT): fresh MSRs, not halted; the clock keeps running.
    fn reset(&mut self) {
        self.msrs = MsrModel::default();
        self.halted = false;
        self.kvm_clock = 0;
    }
}

/// One VM: memory, devices, and the state its exit handlers keep. Its vCPUs share it behind
/// one lock, taken while an exit is handled and never while a guest runs.
pub struct Vm<M: GuestMemory> {
    /// Name used in every log line.
    pub name: String,
    /// Guest RAM.
    pub memory: M,
    /// Port and MMIO devices.
    pub bus: Bus,
    /// PIC, IOAPIC and local APIC.
    pub router: InterruptRouter,
    /// Exit statistics.
    pub stats: ExitStats,
    /// The clock every vCPU starts from.
    clock: GuestClock,
    /// How the VM ended, once one vCPU saw it end: the others stop at their next look.
    ended: Option<VmEnd>,
    /// vCPUs halted with nothing but another vCPU to wake them (bit = vCPU index).
    idle_forever: u64,
    /// Guest time has started ([`Vm::start`]).
    started: bool,
    /// The latest guest time any vCPU handed to the devices.
    latest_ns: u64,
    /// Vectors from the test device, for vCPU 0.
    pending_interrupts: VecDeque<u8>,
    console_line: Vec<u8>,
    /// Console bytes not yet sent to `Env::raw_console`.
    console_raw: Vec<u8>,
    /// A partial console line was already written (the guest is waiting for input mid-line).
    console_mid_line: bool,
    last_input_poll: u64,
    console_input: VecDeque<u8>,
    warned_ports: msr::FirstFew,
    /// Guest-physical pages with neither RAM nor a device that the guest touched (page numbers).
    warned_pages: msr::FirstFew,
    /// An instruction whose length had to be decoded could not be (logged once).
    undecodable_logged: bool,
    /// The wall-clock time at guest time 0 (seconds since 1970), as the RTC counts from it.
    epoch_seconds: u64,
    /// MSR_KVM_WALL_CLOCK_NEW as last written.
    kvm_wall_clock: u64,
    /// A kvm-clock structure outside guest RAM was reported (once per VM).
    kvm_clock_misplaced_logged: bool,
}

enum Next {
    Continue,
    /// The vCPU halted with nothing to deliver: give the CPU away.
    Halt,
    /// The vCPU spins waiting for another: give the CPU away, but stay runnable.
    Yield,
    End(VmEnd),
}

/// How a slice of a vCPU's time ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slice {
    /// The slice is used up: run again when the scheduler says so.
    Preempted,
    /// The vCPU halted: nothing to do before `wake_at_us` (host microseconds, as
    /// `Env::now_micros` counts) unless an interrupt arrives for it first.
    Halted {
        /// When a device timer or the console-input poll is due.
        wake_at_us: u64,
    },
    /// A start-up IPI arrived: the vCPU starts afresh in this state (the caller rebuilds it).
    Started(StartMode),
    /// The VM is over.
    Ended(VmEnd),
}

impl<M: GuestMemory> Vm<M> {
    /// A VM with the PC device set: COM1 16550, i8259 pair, IOAPIC, local APIC, i8254 PIT,
    /// CMOS RTC, i8042, ACPI PM block, PCI host bridge, POST-code and debug-exit ports.
    /// `tsc_hz` is the guest TSC frequency; `epoch_seconds` the wall-clock time at start.
    pub fn new(name: &str, memory: M, tsc_hz: u64, epoch_seconds: u64) -> Self {
        Self::with_vcpus(name, memory, tsc_hz, epoch_seconds, 1)
    }

    /// The same machine with `vcpus` vCPUs (local APICs 0 to `vcpus - 1`).
    pub fn with_vcpus(name: &str, memory: M, tsc_hz: u64, epoch_seconds: u64, vcpus: usize) -> Self {
        let mut bus = Bus::new();
        let mut rtc = devices::rtc::Rtc::new(epoch_seconds);
        rtc.set_memory_size(memory.size());
        let standard: [Box<dyn devices::Device>; 8] = [
            Box::new(devices::uart::Uart16550::new(devices::uart::COM1_BASE, devices::uart::COM1_IRQ)),
            Box::new(devices::debug_exit::DebugExit),
            Box::new(devices::PostCode),
            Box::new(devices::pit::Pit::new()),
            Box::new(rtc),
            Box::new(devices::i8042::I8042::new()),
            Box::new(devices::acpi_pm::AcpiPm::new()),
            Box::new(devices::pci::PciHost::new()),
        ];
        for device in standard {
            bus.add(device).expect("standard devices do not overlap");
        }
        Vm {
            name: name.into(),
            memory,
            bus,
            router: InterruptRouter::with_vcpus(tsc_hz, vcpus),
            stats: ExitStats::default(),
            clock: GuestClock::new(0, tsc_hz),
            ended: None,
            idle_forever: 0,
            started: false,
            latest_ns: 0,
            pending_interrupts: VecDeque::new(),
            console_line: Vec::new(),
            console_raw: Vec::new(),
            console_mid_line: false,
            last_input_poll: 0,
            console_input: VecDeque::new(),
            warned_ports: msr::FirstFew::default(),
            warned_pages: msr::FirstFew::default(),
            undecodable_logged: false,
            epoch_seconds,
            kvm_wall_clock: 0,
            kvm_clock_misplaced_logged: false,
        }
    }

    /// Starts guest time (right before the first vCPU's first slice).
    fn start(&mut self, env: &Env<'_>) {
        self.started = true;
        self.stats.started_us = Some((env.now_micros)());
        // Every device clock, kvm-clock too, counts from here (see `GuestClock`).
        self.clock = GuestClock::new((env.host_tsc)(), self.clock.tsc_hz());
    }

    /// Plugs `device` into the VM's PCI bus as a virtio function known to the logs as `name`;
    /// returns its slot.
    pub fn plug_virtio<D: devices::virtio::VirtioDevice + 'static>(
        &mut self,
        device: D,
        name: &str,
    ) -> Result<u8, String> {
        let kind = devices::virtio::pci::type_name(device.device_id());
        let function = devices::virtio::pci::VirtioPci::new(device, &self.name, name, self.memory.size())
            .ok_or_else(|| format!("the {kind} device could not be built"))?;
        let pci = self.bus.pci_host().ok_or("the VM has no PCI bus")?;
        pci.add_function(Box::new(function)).map_err(|e| format!("{e}"))
    }

    /// The VM's vCPU count.
    pub fn vcpus(&self) -> usize {
        self.router.vcpus()
    }

    /// Ends the VM for every vCPU (a timeout, or one vCPU saw it end); the first end stays.
    pub fn end(&mut self, end: VmEnd) {
        self.ended.get_or_insert(end);
    }

    /// One line on where vCPU `cx` stands: for the report of a VM that ran out of time.
    pub fn describe_vcpu(&self, cx: &VcpuContext, vcpu: &dyn Vcpu) -> String {
        let state = if self.router.waiting_for_sipi(cx.index) {
            "waiting for SIPI"
        } else if cx.halted {
            "halted"
        } else {
            "running"
        };
        format!(
            "vm {}: vCPU {} {state} at RIP {:#x}, RFLAGS {:#x}; {}",
            self.name,
            cx.index,
            vcpu.rip(),
            vcpu.rflags(),
            self.router.lapic(cx.index).summary()
        )
    }

    /// How the VM ended, if it has.
    pub fn ended(&self) -> Option<&VmEnd> {
        self.ended.as_ref()
    }

    /// Guest time in ns as vCPU `cx` sees it, never earlier than any vCPU saw before: the
    /// devices are shared and their models count on time that only moves forward.
    fn now_of(&mut self, cx: &VcpuContext, env: &Env<'_>) -> u64 {
        self.latest_ns = self.latest_ns.max(cx.clock.ns((env.host_tsc)()));
        self.latest_ns
    }

    /// Brings device timers up to date, feeds console input, and acts on what they raised.
    fn service_devices(&mut self, cx: &VcpuContext, env: &mut Env<'_>) -> Next {
        let now = self.now_of(cx, env);
        let mut events = Events::default();
        // Reading the host UART is itself an exit when the hypervisor is nested: look at most
        // once per INPUT_POLL_INTERVAL_US, which is still far faster than anyone types.
        let wall = (env.now_micros)();
        // vCPU 0 reads it: the others need not wake up for input.
        if let Some(input) = env
            .input
            .as_mut()
            .filter(|_| cx.index == 0 && wall.wrapping_sub(self.last_input_poll) >= INPUT_POLL_INTERVAL_US)
        {
            self.last_input_poll = wall;
            // What the guest cannot take yet waits here (a paste, fast typing); beyond the
            // bound it stays in the host UART, which holds back its own sender.
            while self.console_input.len() < MAX_PENDING_INPUT {
                match input() {
                    Some(byte) => self.console_input.push_back(byte),
                    None => break,
                }
            }
        }
        // Device work left over from an earlier exit (a long queue is served in parts).
        if self.bus.dma_pending() {
            events.dma = true;
        }
        while self.bus.input_ready() {
            let Some(byte) = self.console_input.pop_front() else { break };
            self.bus.input(byte, now, &mut events);
        }
        self.bus.poll(now, &mut events);
        self.router.poll(now);
        self.apply(events, env)
    }

    /// When vCPU `cpu` has a timer to look at: its local APIC's; vCPU 0 also serves the
    /// devices' timers (their interrupts reach the others through the router and a kick).
    fn next_deadline_ns(&self, cpu: usize) -> Option<u64> {
        let device = if cpu == 0 { self.bus.next_deadline_ns() } else { None };
        match (device, self.router.next_deadline_ns(cpu)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn interrupt_ready(&self, cpu: usize) -> bool {
        (cpu == 0 && !self.pending_interrupts.is_empty()) || self.router.next_vector(cpu).is_some()
    }

    /// Whether a halted vCPU resumes: an NMI, or an interrupt it can take (IF set).
    fn wakes_from_halt(&self, cpu: usize, vcpu: &dyn Vcpu) -> bool {
        self.router.nmi_pending(cpu) || (vcpu.rflags() & RFLAGS_IF != 0 && self.interrupt_ready(cpu))
    }

    /// Injects an NMI or the next interrupt if the guest can take it, else asks for a window.
    fn offer_interrupt(&mut self, cpu: usize, vcpu: &mut dyn Vcpu) {
        if self.router.nmi_pending(cpu) && vcpu.inject_nmi() {
            self.router.take_nmi(cpu);
            return;
        }
        if !self.interrupt_ready(cpu) {
            return;
        }
        if !vcpu.interrupts_open() {
            vcpu.set_interrupt_window_exiting(true);
            return;
        }
        // Vectors from the test device bypass the controllers.
        let test_vector = if cpu == 0 { self.pending_interrupts.pop_front() } else { None };
        let vector = match test_vector {
            Some(vector) => Some(vector),
            None => self.router.acknowledge(cpu),
        };
        if let Some(vector) = vector {
            vcpu.inject_interrupt(vector);
        }
        // An NMI the vCPU could not take yet is retried at the next window too.
        vcpu.set_interrupt_window_exiting(self.interrupt_ready(cpu) || self.router.nmi_pending(cpu));
    }

    /// HLT: the vCPU waits (on guest time, which keeps running) until an interrupt can be
    /// delivered. A HLT nothing can ever end ends a one-vCPU VM; in a larger VM another vCPU
    /// may still send an NMI or INIT (Linux parks CPUs this way).
    fn halt(&mut self, vcpu: &mut dyn Vcpu, env: &mut Env<'_>) -> Next {
        if vcpu.rflags() & RFLAGS_IF == 0 && self.vcpus() == 1 {
            return Next::End(VmEnd::Halted("HLT with interrupts disabled: the vCPU can never wake up"));
        }
        // A prompt without a newline must be visible while the guest waits for input.
        self.write_console(env, false);
        Next::Halt
    }

    /// While halted: when the next device deadline or input poll is due, on the host clock.
    fn halted_until(&mut self, cx: &VcpuContext, env: &Env<'_>) -> Slice {
        let now = self.now_of(cx, env);
        let until_deadline = self.next_deadline_ns(cx.index).map(|deadline| deadline.saturating_sub(now));
        let sleep_ns = match (until_deadline, env.input.is_some() && cx.index == 0) {
            (None, false) if self.vcpus() == 1 => {
                return Slice::Ended(VmEnd::Halted("HLT with no interrupt pending and no device that could raise one"))
            }
            (None, false) => return self.idle_until_kicked(cx.index),
            (None, true) => INPUT_POLL_NS,
            (Some(ns), true) => ns.min(INPUT_POLL_NS),
            (Some(ns), false) => ns,
        };
        Slice::Halted { wake_at_us: (env.now_micros)().saturating_add(sleep_ns.div_ceil(1000)) }
    }

    /// vCPU `cpu` can only be woken by another vCPU; if every vCPU is in that state, nothing
    /// ever will, and the VM ends.
    fn idle_until_kicked(&mut self, cpu: usize) -> Slice {
        self.idle_forever |= 1 << cpu;
        let all_idle = (0..self.vcpus()).all(|i| self.idle_forever & (1 << i) != 0 || self.router.waiting_for_sipi(i));
        if all_idle && !self.router.waiting_for_sipi(0) {
            return Slice::Ended(VmEnd::Halted("every vCPU halted with nothing left to wake it"));
        }
        Slice::Halted { wake_at_us: u64::MAX }
    }

    /// Moves RIP past the instruction that exited, decoding its length where the backend does
    /// not know it.
    fn skip(&mut self, vcpu: &mut dyn Vcpu) {
        if vcpu.skip_instruction() {
            return;
        }
        let (mode, rip) = (vcpu.mode(), vcpu.rip());
        let mut bytes = [0u8; 15];
        let fetched = fetch_instruction(&self.memory, &mode, rip, &mut bytes);
        match mmio::instruction_length(&bytes[..fetched], &mode) {
            Some(len) => vcpu.set_rip(rip.wrapping_add(len as u64)),
            // Its page went away (another vCPU unmapped it): the guest runs it again.
            None if !self.undecodable_logged => {
                self.undecodable_logged = true;
                log::warn!("vm {}: the instruction at RIP {rip:#x} could not be read to skip it", self.name);
            }
            None => {}
        }
    }

    /// The CPU vCPU `cx` is shown.
    fn cpu_model(&self, cx: &VcpuContext, env: &Env<'_>) -> cpuid::CpuModel {
        cpuid::CpuModel {
            supported_xcr0: env.supported_xcr0,
            tsc_hz: env.tsc_hz,
            apic_id: cx.index as u32,
            vcpus: self.vcpus() as u32,
        }
    }

    /// The guest CPU's EFER features, from the CPUID it is shown.
    fn efer_features(&self, cx: &VcpuContext, env: &Env<'_>) -> control_regs::EferFeatures {
        let ext1 = cpuid::guest_cpuid(0x8000_0001, 0, env.cpuid, false, &self.cpu_model(cx, env));
        control_regs::EferFeatures::from_cpuid(ext1[3], cpuid::amd(env.cpuid))
    }

    /// A `MOV CR0` or `MOV CR4` the backend intercepted, validated here for both backends.
    fn handle_cr_write(&mut self, cx: &VcpuContext, vcpu: &mut dyn Vcpu, cr: u8, gpr: u8, env: &Env<'_>) -> Next {
        let mode = vcpu.mode();
        let value = if gpr == CR_SOURCE_UNKNOWN {
            match self.decoded_cr_write(vcpu, &mode) {
                Some(value) => value,
                None => {
                    return Next::End(VmEnd::Error(format!(
                        "a write of CR{cr} at RIP {:#x} that this hypervisor cannot decode",
                        vcpu.rip()
                    )))
                }
            }
        } else {
            vcpu.register(gpr)
        };
        let accepted = if cr == 0 {
            control_regs::cr0_write(value, mode.efer, mode.cr4, mode.long_code).map(|cr0| vcpu.set_cr0(cr0))
        } else {
            let model = self.cpu_model(cx, env);
            let leaf1 = cpuid::guest_cpuid(1, 0, env.cpuid, false, &model);
            let leaf7 = cpuid::guest_cpuid(7, 0, env.cpuid, false, &model);
            let features = control_regs::Cr4Features::from_cpuid(leaf1, leaf7);
            control_regs::cr4_write(mode.cr4, value, mode.efer, mode.cr3, features).map(|cr4| vcpu.set_cr4(cr4))
        };
        match accepted {
            Some(()) => self.skip(vcpu),
            None => vcpu.inject_exception(VECTOR_GP, Some(0)),
        }
        Next::Continue
    }

    /// The value a control-register write the backend did not decode (SVM without decode
    /// assists) is writing, from the instruction at RIP.
    fn decoded_cr_write(&self, vcpu: &mut dyn Vcpu, mode: &GuestMode) -> Option<u64> {
        let mut bytes = [0u8; 15];
        let fetched = fetch_instruction(&self.memory, mode, vcpu.rip(), &mut bytes);
        Some(match mmio::cr_write_source(&bytes[..fetched], mode)? {
            mmio::CrWriteSource::Register(reg) => {
                mmio::store_value(mmio::Operand::Reg(reg), reg.width, |num| vcpu.register(num))
            }
            mmio::CrWriteSource::Clts => mode.cr0 & !control_regs::CR0_TS,
            // LMSW loads PE, MP, EM and TS; it can set PE but not clear it.
            mmio::CrWriteSource::Lmsw(reg) => {
                let source = vcpu.register(reg.num) & 0xf;
                (mode.cr0 & !0xe) | source | (mode.cr0 & 1)
            }
        })
    }

    /// RDMSR/WRMSR of EFER, validated here for both backends.
    fn handle_efer(&mut self, cx: &VcpuContext, vcpu: &mut dyn Vcpu, write: bool, env: &Env<'_>) -> Next {
        let mode = vcpu.mode();
        let gprs = vcpu.gprs();
        if !write {
            (gprs.rax, gprs.rdx) = (mode.efer & 0xffff_ffff, mode.efer >> 32);
        } else {
            let value = (gprs.rdx << 32) | (gprs.rax & 0xffff_ffff);
            let paging = mode.cr0 & control_regs::CR0_PG != 0;
            match control_regs::efer_write(mode.efer, value, paging, self.efer_features(cx, env)) {
                Some(efer) => vcpu.set_efer(efer),
                None => {
                    vcpu.inject_exception(VECTOR_GP, Some(0));
                    return Next::Continue;
                }
            }
        }
        self.skip(vcpu);
        Next::Continue
    }

    fn handle(&mut self, cx: &mut VcpuContext, vcpu: &mut dyn Vcpu, exit: Exit, env: &mut Env<'_>) -> Next {
        match exit {
            Exit::Cpuid => {
                let gprs = vcpu.gprs();
                let (leaf, subleaf) = (gprs.rax as u32, gprs.rcx as u32);
                let osxsave = vcpu.mode().cr4 & CR4_OSXSAVE != 0;
                let model = self.cpu_model(cx, env);
                let [a, b, c, d] = cpuid::guest_cpuid(leaf, subleaf, env.cpuid, osxsave, &model);
                let gprs = vcpu.gprs();
                (gprs.rax, gprs.rbx, gprs.rcx, gprs.rdx) = (a as u64, b as u64, c as u64, d as u64);
                self.skip(vcpu);
                Next::Continue
            }
            Exit::Rdmsr | Exit::Wrmsr => self.handle_msr(cx, vcpu, exit == Exit::Wrmsr, env),
            Exit::Io(io) if io.string => self.handle_string_io(cx, vcpu, io, env),
            Exit::Io(io) => self.handle_io(cx, vcpu, io, env),
            Exit::Pause => Next::Yield,
            // Dropping the cache without writing it back is no guest's business: a no-op,
            // as on KVM (the caches stay coherent with memory either way).
            Exit::Invd => {
                self.skip(vcpu);
                Next::Continue
            }
            // CPUID offers neither MONITOR/MWAIT nor a PMU: what hardware without them does.
            Exit::MonitorMwait => {
                vcpu.inject_exception(VECTOR_UD, None);
                Next::Continue
            }
            Exit::Rdpmc => {
                vcpu.inject_exception(VECTOR_GP, Some(0));
                Next::Continue
            }
            Exit::Hypercall => {
                // KVM's answers: no hypercall is offered (KVM_FEATURES names none), and only
                // the kernel may make one. A guest that probes gets an error, not a fault.
                const KVM_ENOSYS: u64 = 1000;
                const KVM_EPERM: u64 = 1;
                let error = if vcpu.mode().cpl == 0 { KVM_ENOSYS } else { KVM_EPERM };
                vcpu.gprs().rax = error.wrapping_neg();
                self.skip(vcpu);
                Next::Continue
            }
            Exit::VirtualizationInstruction => {
                vcpu.inject_exception(VECTOR_UD, None);
                Next::Continue
            }
            Exit::Hlt => {
                self.skip(vcpu);
                if self.wakes_from_halt(cx.index, vcpu) {
                    return Next::Continue;
                }
                self.halt(vcpu, env)
            }
            Exit::Xsetbv => {
                let gprs = *vcpu.gprs();
                let value = (gprs.rdx << 32) | (gprs.rax & 0xffff_ffff);
                if vcpu.mode().cr4 & CR4_OSXSAVE == 0 {
                    vcpu.inject_exception(VECTOR_UD, None);
                } else if gprs.rcx as u32 != 0 || !valid_xcr0(value, env.supported_xcr0) {
                    vcpu.inject_exception(VECTOR_GP, Some(0));
                } else {
                    vcpu.set_xcr0(value);
                    self.skip(vcpu);
                }
                Next::Continue
            }
            Exit::NestedFault { gpa, write, fetch } => self.handle_nested_fault(cx, vcpu, gpa, write, fetch, env),
            Exit::InterruptWindow | Exit::ExternalInterrupt | Exit::HostNmi => Next::Continue,
            Exit::TripleFault => Next::End(VmEnd::TripleFault { rip: vcpu.rip() }),
            Exit::EntryFailed { code } => Next::End(VmEnd::Error(format!("VM entry failed (code {code:#x})"))),
            Exit::BackendFailed { what } => Next::End(VmEnd::Error(format!("vCPU {}: {what}", cx.index))),
            Exit::CrAccess { cr: 8, write, gpr } => self.handle_cr8(cx.index, vcpu, write, gpr),
            Exit::CrAccess { cr: cr @ (0 | 4), write: true, gpr } => self.handle_cr_write(cx, vcpu, cr, gpr, env),
            Exit::CrAccess { .. } | Exit::Unhandled { .. } => Next::End(VmEnd::Error(format!(
                "{exit} at RIP {:#x}, which this hypervisor does not handle",
                vcpu.rip()
            ))),
        }
    }

    /// MOV to or from CR8 (VMX exits on both): CR8 is the local APIC's TPR[7:4], never the
    /// host's own TPR. Bits 63:4 of a written value are reserved (#GP).
    fn handle_cr8(&mut self, cpu: usize, vcpu: &mut dyn Vcpu, write: bool, gpr: u8) -> Next {
        if write {
            let value = vcpu.register(gpr);
            if value >> 4 != 0 {
                vcpu.inject_exception(VECTOR_GP, Some(0));
                return Next::Continue;
            }
            self.router.set_tpr(cpu, (value as u8) << 4);
        } else {
            let cr8 = u64::from(self.router.lapic(cpu).tpr() >> 4);
            vcpu.set_register(gpr, cr8);
        }
        self.skip(vcpu);
        Next::Continue
    }

    /// CR8 the guest wrote without an exit (SVM's V_TPR) becomes the local APIC's TPR[7:4].
    fn take_guest_cr8(&mut self, cpu: usize, vcpu: &dyn Vcpu) {
        if let Some(cr8) = vcpu.guest_cr8() {
            if cr8 != self.router.lapic(cpu).tpr() >> 4 {
                self.router.set_tpr(cpu, cr8 << 4);
            }
        }
    }

    fn handle_msr(&mut self, cx: &mut VcpuContext, vcpu: &mut dyn Vcpu, write: bool, env: &mut Env<'_>) -> Next {
        let gprs = *vcpu.gprs();
        let msr = gprs.rcx as u32;
        let cpu = cx.index;
        if InterruptRouter::is_lapic_msr(msr) {
            let now = self.now_of(cx, env);
            let tsc = cx.clock.tsc((env.host_tsc)());
            let result = if write {
                self.router.lapic_msr_write(cpu, msr, (gprs.rdx << 32) | (gprs.rax & 0xffff_ffff), now, tsc)
            } else {
                self.router.lapic_msr_read(cpu, msr, now).map(|value| {
                    let gprs = vcpu.gprs();
                    gprs.rax = value & 0xffff_ffff;
                    gprs.rdx = value >> 32;
                })
            };
            match result {
                Ok(()) => self.skip(vcpu),
                Err(()) => vcpu.inject_exception(VECTOR_GP, Some(0)),
            }
            return Next::Continue;
        }
        if msr == msr::IA32_EFER {
            return self.handle_efer(cx, vcpu, write, env);
        }
        let result = if msr == pvclock::MSR_SYSTEM_TIME || msr == pvclock::MSR_WALL_CLOCK {
            let value = (gprs.rdx << 32) | (gprs.rax & 0xffff_ffff);
            match (write, msr == pvclock::MSR_SYSTEM_TIME) {
                (true, true) => self.set_kvm_clock(cx, value, env),
                (true, false) => self.set_kvm_wall_clock(value),
                (false, system) => {
                    let value = if system { cx.kvm_clock } else { self.kvm_wall_clock };
                    let gprs = vcpu.gprs();
                    gprs.rax = value & 0xffff_ffff;
                    gprs.rdx = value >> 32;
                }
            }
            Ok(())
        } else if msr::amd_read_as_zero(msr) && cpuid::amd(env.cpuid) {
            if !write {
                let gprs = vcpu.gprs();
                gprs.rax = 0;
                gprs.rdx = 0;
            }
            Ok(())
        } else if write {
            let value = (gprs.rdx << 32) | (gprs.rax & 0xffff_ffff);
            let written = cx.msrs.write(msr, value);
            if written.is_ok() {
                vcpu.msr_written(msr, value);
            }
            written
        } else {
            cx.msrs.read(msr, cx.clock.tsc((env.host_tsc)())).map(|value| {
                let gprs = vcpu.gprs();
                gprs.rax = value & 0xffff_ffff;
                gprs.rdx = value >> 32;
            })
        };
        match result {
            Ok(()) => self.skip(vcpu),
            Err(msr::Refused) => {
                let access = if write { "wrmsr" } else { "rdmsr" };
                self.stats.msr_refusals.record(msr).log(
                    log::Level::Warn,
                    &self.name,
                    format_args!("{access} of MSR {msr:#x} is not allowed: injecting #GP"),
                    "reported once per MSR",
                    "refused MSRs",
                );
                vcpu.inject_exception(VECTOR_GP, Some(0));
            }
        }
        Next::Continue
    }

    /// MSR_KVM_SYSTEM_TIME_NEW: with the enable bit, writes the vCPU's kvm-clock structure at
    /// the address given. Guest time is the TSC at a constant rate, so the one write stays true.
    fn set_kvm_clock(&mut self, cx: &mut VcpuContext, value: u64, env: &Env<'_>) {
        cx.kvm_clock = value;
        let Some(scale) = pvclock::TimeScale::for_tsc_hz(cx.clock.tsc_hz()) else { return };
        if value & pvclock::SYSTEM_TIME_ENABLE == 0 {
            return;
        }
        let gpa = value & !pvclock::SYSTEM_TIME_ENABLE;
        let host_tsc = (env.host_tsc)();
        let (tsc, ns) = (cx.clock.tsc(host_tsc), cx.clock.ns(host_tsc));
        cx.kvm_clock_version = cx.kvm_clock_version.wrapping_add(2);
        // Every vCPU's TSC is the VM's one clock (no vCPU hides time of its own).
        let info = pvclock::time_info(cx.kvm_clock_version, tsc, ns, scale, pvclock::FLAG_TSC_STABLE);
        self.write_clock_structure(gpa, &info, "kvm-clock (MSR 0x4b564d01)");
    }

    /// MSR_KVM_WALL_CLOCK_NEW: writes the wall-clock time at guest time 0 at the address given.
    fn set_kvm_wall_clock(&mut self, gpa: u64) {
        self.kvm_wall_clock = gpa;
        let clock = pvclock::wall_clock(2, self.epoch_seconds);
        self.write_clock_structure(gpa, &clock, "kvm wall clock (MSR 0x4b564d00)");
    }

    /// Writes a clock structure the guest placed at `gpa`; one outside RAM is not written
    /// (as on KVM, the MSR write itself succeeds) and reported once.
    fn write_clock_structure(&mut self, gpa: u64, data: &[u8], what: &str) {
        if self.memory.write(gpa, data).is_err() && !self.kvm_clock_misplaced_logged {
            self.kvm_clock_misplaced_logged = true;
            log::warn!("vm {}: {what} at {gpa:#x} is outside guest RAM: not written (reported once)", self.name);
        }
    }

    fn handle_io(&mut self, cx: &VcpuContext, vcpu: &mut dyn Vcpu, io: IoExit, env: &mut Env<'_>) -> Next {
        let mut events = Events::default();
        let now = self.now_of(cx, env);
        if io.write {
            let value = vcpu.gprs().rax as u32;
            if !self.port_write(io.port, io.size, value, now, &mut events) {
                self.warn_port(io.port);
            }
        } else {
            let value = self.port_read(io.port, io.size, now, &mut events).unwrap_or_else(|| {
                self.warn_port(io.port);
                devices::ones(io.size) as u32
            });
            let rax = &mut vcpu.gprs().rax;
            *rax = match io.size {
                1 => (*rax & !0xff) | value as u64,
                2 => (*rax & !0xffff) | value as u64,
                // A 32-bit register write clears the upper half.
                _ => value as u64,
            };
        }
        self.skip(vcpu);
        self.apply(events, env)
    }

    /// INS/OUTS with or without REP, in 64-bit mode with flat segments.
    /// INS/OUTS in any mode: the buffer is (R/E)DI in ES or (R/E)SI in DS (or an override) at
    /// the instruction's address size, with (R/E)CX counting. A buffer page the guest has not
    /// mapped raises #PF in the guest after the iterations before it, as on the CPU.
    fn handle_string_io(&mut self, cx: &VcpuContext, vcpu: &mut dyn Vcpu, io: IoExit, env: &mut Env<'_>) -> Next {
        let (mode, rip) = (vcpu.mode(), vcpu.rip());
        let mut bytes = [0u8; 15];
        let fetched = fetch_instruction(&self.memory, &mode, rip, &mut bytes);
        let Some(operand) = mmio::string_io_operand(&bytes[..fetched], &mode) else {
            return Next::End(VmEnd::Error(format!(
                "string I/O on port {:#x} at RIP {rip:#x}: the instruction could not be decoded",
                io.port
            )));
        };
        let width = match operand.address_bits {
            16 => 0xffff,
            32 => 0xffff_ffff,
            _ => u64::MAX,
        };
        // In 64-bit mode only FS and GS have bases; elsewhere linear addresses have 32 bits.
        let base = match operand.segment {
            Segment::Fs | Segment::Gs => vcpu.segment_base(operand.segment),
            _ if mode.long_code => 0,
            segment => vcpu.segment_base(segment),
        };
        let linear = |offset: u64| {
            let address = base.wrapping_add(offset & width);
            if mode.long_code {
                address
            } else {
                address & 0xffff_ffff
            }
        };
        // A register at the address size: the rest of it keeps its bits (a 32-bit result
        // zeroes the upper half, as any 32-bit write does).
        let with = |register: u64, value: u64| {
            if width == 0xffff {
                (register & !width) | (value & width)
            } else {
                value & width
            }
        };
        let step = if vcpu.rflags() & RFLAGS_DF != 0 { (io.size as u64).wrapping_neg() } else { io.size as u64 };
        let count = if io.rep { vcpu.gprs().rcx & width } else { 1 };
        let batch = count.min(MAX_STRING_ITERATIONS);
        let mut events = Events::default();
        let now = self.now_of(cx, env);
        for _ in 0..batch {
            let mut buf = [0u8; 4];
            let bytes = &mut buf[..io.size as usize];
            let gprs = *vcpu.gprs();
            let result = if io.write {
                let read = guest_walk::read_virt(&self.memory, &mode, linear(gprs.rsi), bytes);
                if read.is_ok() && !self.port_write(io.port, io.size, u32::from_le_bytes(buf), now, &mut events) {
                    self.warn_port(io.port);
                }
                read
            } else {
                let value = self.port_read(io.port, io.size, now, &mut events).unwrap_or(devices::ones(io.size) as u32);
                guest_walk::write_virt(
                    &mut self.memory,
                    &mode,
                    linear(gprs.rdi),
                    &value.to_le_bytes()[..io.size as usize],
                )
            };
            match result {
                Ok(()) => {}
                // The guest's own fault: delivered with the iterations so far done, RIP still at
                // the instruction.
                Err(WalkError::PageFault { gva, error_code }) => {
                    vcpu.set_cr2(gva);
                    vcpu.inject_exception(VECTOR_PF, Some(error_code));
                    return self.apply(events, env);
                }
                Err(WalkError::NonCanonical { .. }) => {
                    vcpu.inject_exception(VECTOR_GP, Some(0));
                    return self.apply(events, env);
                }
                Err(e) => {
                    return Next::End(VmEnd::Error(format!(
                        "string I/O on port {:#x} at RIP {rip:#x}: guest buffer not accessible ({})",
                        io.port,
                        walk_error(&e)
                    )))
                }
            }
            let gprs = vcpu.gprs();
            if io.write {
                gprs.rsi = with(gprs.rsi, gprs.rsi.wrapping_add(step));
            } else {
                gprs.rdi = with(gprs.rdi, gprs.rdi.wrapping_add(step));
            }
            if io.rep {
                gprs.rcx = with(gprs.rcx, gprs.rcx.wrapping_sub(1));
            }
        }
        if !io.rep || vcpu.gprs().rcx & width == 0 {
            self.skip(vcpu);
        }
        self.apply(events, env)
    }

    fn handle_nested_fault(
        &mut self,
        cx: &VcpuContext,
        vcpu: &mut dyn Vcpu,
        gpa: u64,
        write: bool,
        fetch: bool,
        env: &mut Env<'_>,
    ) -> Next {
        let rip = vcpu.rip();
        let claimed_by_router = self.router.claims_mmio(gpa);
        let claimed = claimed_by_router || self.bus.claims_mmio(gpa);
        // Nothing runs from outside RAM: there is no code to fetch.
        if fetch {
            let place = if claimed { "a device's registers" } else { "outside guest RAM, where no device is" };
            return Next::End(VmEnd::Error(format!(
                "instruction fetch at guest-physical {gpa:#x} (RIP {rip:#x}): {place}"
            )));
        }
        let mode = vcpu.mode();
        let mut bytes = [0u8; 15];
        let fetched = fetch_instruction(&self.memory, &mode, rip, &mut bytes);
        let op = match mmio::decode(&bytes[..fetched], &mode, rip) {
            Ok(op) => op,
            Err(e) => {
                return Next::End(VmEnd::Error(format!(
                    "MMIO access at guest-physical {gpa:#x} by RIP {rip:#x} cannot be emulated: {e}"
                )))
            }
        };
        let mut events = Events::default();
        let now = self.now_of(cx, env);
        let cpu = cx.index;
        match op.kind {
            MmioKind::Load { reg, extend } => {
                let value = if claimed_by_router {
                    self.router.mmio_read(cpu, gpa, op.size, now, &mut events)
                } else {
                    self.bus.mmio_read(gpa, op.size, now, &mut events).unwrap_or(devices::ones(op.size))
                };
                let loaded = mmio::loaded(vcpu.register(reg.num), reg, op.size, extend, value);
                vcpu.set_register(reg.num, loaded);
            }
            MmioKind::Store { src } => {
                let value = mmio::store_value(src, op.size, |num| vcpu.register(num));
                if claimed_by_router {
                    self.router.mmio_write(cpu, gpa, op.size, value, now, &mut events);
                } else {
                    self.bus.mmio_write(gpa, op.size, value, now, &mut events);
                }
            }
        }
        if !claimed {
            self.warn_unclaimed_page(gpa, write, rip);
        }
        vcpu.set_rip(rip.wrapping_add(op.len as u64));
        self.apply(events, env)
    }

    /// Port read through the interrupt controllers or the bus; `None` if nothing claims it.
    fn port_read(&mut self, port: u16, size: u8, now: u64, events: &mut Events) -> Option<u32> {
        if self.router.claims_port(port) {
            Some(self.router.io_read(port, size, now, events))
        } else {
            self.bus.io_read(port, size, now, events)
        }
    }

    /// Port write through the interrupt controllers or the bus; false if nothing claims it.
    fn port_write(&mut self, port: u16, size: u8, value: u32, now: u64, events: &mut Events) -> bool {
        if self.router.claims_port(port) {
            self.router.io_write(port, size, value, now, events);
            true
        } else {
            self.bus.io_write(port, size, value, now, events)
        }
    }

    /// Acts on what devices asked for. A device that needs guest memory for what it was asked
    /// (a queue notification) works right here, within the exit that asked.
    fn apply(&mut self, mut events: Events, env: &mut Env<'_>) -> Next {
        if core::mem::take(&mut events.dma) {
            self.bus.run_dma(&mut self.memory, self.latest_ns, &mut events);
        }
        self.router.set_lines(&events.irq_lines);
        for msi in &events.msi {
            if !self.router.deliver_msi(*msi) {
                self.stats.stray_msis += 1;
            }
        }
        for byte in events.console {
            if env.raw_console.is_some() {
                self.console_raw.push(byte);
                if self.console_raw.len() >= MAX_CONSOLE_LINE {
                    self.write_raw_console(env);
                }
            }
            match byte {
                b'\n' => self.write_console(env, true),
                b'\r' => {}
                _ => {
                    self.console_line.push(byte);
                    if self.console_line.len() >= MAX_CONSOLE_LINE {
                        self.write_console(env, true);
                    }
                }
            }
        }
        for vector in events.interrupts {
            if self.pending_interrupts.len() >= MAX_PENDING_INTERRUPTS {
                log::warn!("vm {}: interrupt queue full, dropping vector {vector:#x}", self.name);
            } else {
                self.pending_interrupts.push_back(vector);
            }
        }
        if let Some(target) = events.host_nmi {
            (env.host_nmi)(target);
        }
        match (events.exit_status, events.power) {
            (Some(status), _) => Next::End(VmEnd::DebugExit(status)),
            (None, Some(devices::Power::Off)) => Next::End(VmEnd::PowerOff),
            (None, Some(devices::Power::Reset)) => Next::End(VmEnd::Reset),
            (None, None) => Next::Continue,
        }
    }

    /// Writes the buffered console text; `end_line` ends the line, otherwise the rest of the
    /// line follows later (a prompt).
    fn write_console(&mut self, env: &mut Env<'_>, end_line: bool) {
        self.write_raw_console(env);
        if self.console_line.is_empty() && !end_line {
            return;
        }
        let text: String = self
            .console_line
            .iter()
            .map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' })
            .collect();
        (env.console)(&text, end_line);
        self.console_line.clear();
        self.console_mid_line = !end_line;
    }

    /// Sends the buffered raw console bytes, if the host shows this VM raw.
    fn write_raw_console(&mut self, env: &mut Env<'_>) {
        match env.raw_console.as_mut() {
            Some(raw) if !self.console_raw.is_empty() => raw(&self.console_raw),
            _ => {}
        }
        self.console_raw.clear();
    }

    /// At the VM's end: whatever is buffered, on a line of its own.
    fn flush_console(&mut self, env: &mut Env<'_>) {
        if !self.console_line.is_empty() || self.console_mid_line {
            self.write_console(env, true);
        }
    }

    fn warn_port(&mut self, port: u16) {
        self.stats.unclaimed_port_accesses += 1;
        self.warned_ports.note(port.into()).log(
            log::Level::Info,
            &self.name,
            format_args!("port {port:#x} has no device (reads float high)"),
            "reported once",
            "such ports",
        );
    }

    /// A data access where there is neither RAM nor a device: an open bus, as on a PC (reads
    /// float high, writes go nowhere), never host memory.
    fn warn_unclaimed_page(&mut self, gpa: u64, write: bool, rip: u64) {
        self.stats.unclaimed_mmio_accesses += 1;
        let access = if write { "write" } else { "read" };
        self.warned_pages.note(gpa >> 12).log(
            log::Level::Info,
            &self.name,
            format_args!(
                "{access} at guest-physical {gpa:#x} (RIP {rip:#x}) reaches neither RAM nor a device \
                 (reads float high, writes are dropped)"
            ),
            "reported once per page",
            "such accesses",
        );
    }
}

/// Runs vCPU `cx` of `vm` until the VM ends, the vCPU halts, or `slice_end_us` (on the
/// `Env::now_micros` clock) passes. Guest time keeps running while the vCPU is away. The VM's
/// lock is held while an exit is handled, never while the guest runs.
pub fn run_slice<M: GuestMemory>(
    vm: &Mutex<Vm<M>>,
    cx: &mut VcpuContext,
    vcpu: &mut dyn Vcpu,
    env: &mut Env<'_>,
    slice_end_us: u64,
) -> Slice {
    let slice = slice(vm, cx, vcpu, env, slice_end_us);
    (env.arm_timer)(None);
    let mut guard = vm.lock();
    let mut kicks = guard.router.take_kicks();
    if let Slice::Ended(end) = &slice {
        guard.end(end.clone());
        guard.stats.ended_us.get_or_insert((env.now_micros)());
        guard.flush_console(env);
        // Every other vCPU must see the end.
        kicks |= u64::MAX;
    }
    let vcpus = guard.vcpus();
    drop(guard);
    kick(env, cx.index, vcpus, kicks);
    slice
}

/// Runs a one-vCPU VM to its end, sleeping through halts with `env.wait` (a VM that has its
/// CPU to itself).
pub fn run<M: GuestMemory>(vm: &Mutex<Vm<M>>, vcpu: &mut dyn Vcpu, env: &mut Env<'_>) -> VmEnd {
    let mut cx = VcpuContext::new(0);
    loop {
        match run_slice(vm, &mut cx, vcpu, env, u64::MAX) {
            Slice::Preempted | Slice::Started(_) => {}
            Slice::Halted { wake_at_us } => {
                let now = (env.now_micros)();
                if wake_at_us > now {
                    (env.arm_timer)(Some((wake_at_us - now).saturating_mul(1000)));
                    (env.wait)();
                }
            }
            Slice::Ended(end) => return end,
        }
    }
}

/// Kicks the vCPUs in `kicks` (bit = index) other than `me`.
fn kick(env: &Env<'_>, me: usize, vcpus: usize, kicks: u64) {
    for other in (0..vcpus).filter(|&i| i != me && kicks & (1 << i) != 0) {
        (env.kick)(other);
    }
}

fn slice<M: GuestMemory>(
    vm: &Mutex<Vm<M>>,
    cx: &mut VcpuContext,
    vcpu: &mut dyn Vcpu,
    env: &mut Env<'_>,
    slice_end_us: u64,
) -> Slice {
    let cpu = cx.index;
    loop {
        let mut guard = vm.lock();
        if !guard.started {
            guard.start(env);
        }
        if !cx.started {
            // Every vCPU starts from the VM's clock.
            cx.clock = guard.clock;
            cx.started = true;
        }
        if let Some(end) = guard.ended.clone() {
            return Slice::Ended(end);
        }
        if let Next::End(end) = guard.service_devices(cx, env) {
            return Slice::Ended(end);
        }
        if let Some(vector) = guard.router.take_sipi(cpu) {
            cx.reset();
            return Slice::Started(StartMode::Real { cs: u16::from(vector) << 8, ip: 0 });
        }
        if guard.router.waiting_for_sipi(cpu) {
            return Slice::Halted { wake_at_us: u64::MAX };
        }
        if cx.halted {
            if !guard.wakes_from_halt(cpu, vcpu) {
                // Device work left (served a bounded amount per pass) may still wake the vCPU:
                // finish it before sleeping, within the slice.
                if guard.bus.dma_pending() && (env.now_micros)() < slice_end_us {
                    continue;
                }
                return guard.halted_until(cx, env);
            }
            cx.halted = false;
        }
        guard.idle_forever &= !(1 << cpu);
        let wall = (env.now_micros)();
        if wall >= slice_end_us {
            return Slice::Preempted;
        }
        guard.offer_interrupt(cpu, vcpu);
        vcpu.set_guest_cr8(guard.router.lapic(cpu).tpr() >> 4);
        let now = guard.now_of(cx, env);
        let until_device = guard.next_deadline_ns(cpu).map(|deadline| deadline.saturating_sub(now));
        let until_slice_end = (slice_end_us - wall).saturating_mul(1000);
        (env.arm_timer)(Some(until_device.map_or(until_slice_end, |ns| ns.min(until_slice_end))));
        let (kicks, vcpus) = (guard.router.take_kicks(), guard.vcpus());
        drop(guard);
        kick(env, cpu, vcpus, kicks);
        let entered = (env.now_micros)();
        // Time in the guest, world switch included, for the exit table.
        let exit = vcpu.run();
        let exited = (env.now_micros)();
        let mut guard = vm.lock();
        guard.take_guest_cr8(cpu, vcpu);
        guard.stats.guest_micros += exited.saturating_sub(entered);
        let target = match exit {
            Exit::Io(io) => stats::ExitTarget::Port(io.port),
            Exit::Rdmsr | Exit::Wrmsr => stats::ExitTarget::Msr(vcpu.gprs().rcx as u32),
            Exit::NestedFault { gpa, .. } => stats::ExitTarget::Page(gpa >> 12),
            _ => stats::ExitTarget::None,
        };
        let next = guard.handle(cx, vcpu, exit, env);
        guard.stats.record(exit.kind(), (env.now_micros)().saturating_sub(exited));
        guard.stats.record_target(target);
        let kicks = guard.router.take_kicks();
        drop(guard);
        kick(env, cpu, vcpus, kicks);
        match next {
            Next::Continue => {}
            Next::Halt => cx.halted = true,
            Next::Yield => return Slice::Preempted,
            Next::End(end) => return Slice::Ended(end),
        }
    }
}

/// Reads as many of the 15 instruction bytes at `rip` (CS-relative) as are mapped.
fn fetch_instruction(memory: &impl GuestMemory, mode: &GuestMode, rip: u64, bytes: &mut [u8; 15]) -> usize {
    let start = mode.code_address(rip);
    // The instruction may end before an unmapped page: fetch up to the page end first.
    let to_page_end = (0x1000 - (start & 0xfff)).min(15) as usize;
    if guest_walk::read_virt(memory, mode, start, &mut bytes[..to_page_end]).is_err() {
        return 0;
    }
    if to_page_end < 15
        && guest_walk::read_virt(
            memory,
            mode,
            mode.code_address(rip.wrapping_add(to_page_end as u64)),
            &mut bytes[to_page_end..],
        )
        .is_ok()
    {
        return 15;
    }
    to_page_end
}

fn walk_error(e: &WalkError) -> String {
    format!("{e}")
}

#[cfg(test)]
mod tests;
