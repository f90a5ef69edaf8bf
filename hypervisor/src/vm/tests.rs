//! Run-loop tests against a scripted vCPU: each exit kind is handled the same way for VMX and SVM.

use super::*;
use crate::devices::test_device::{TestDevice, IRQ_PORT, MMIO_BASE};
use crate::loader::{page_tables, SliceMemory};
use crate::vcpu::{Gprs, GuestMode, Segment, XCR0_AVX, XCR0_SSE, XCR0_X87};
use alloc::vec;

/// A vCPU that replays a script of exits and records what the run loop did to it.
struct Mock {
    script: VecDeque<(Exit, Option<Gprs>)>,
    gprs: Gprs,
    rip: u64,
    rsp: u64,
    cr2: u64,
    ds_base: u64,
    rflags: u64,
    mode: GuestMode,
    injected_exceptions: Vec<(u8, Option<u32>)>,
    injected_interrupts: Vec<u8>,
    injected_nmis: u32,
    window: bool,
    xcr0: u64,
    skips: u32,
}

const START_RIP: u64 = 0x20_0000;

impl Mock {
    fn new(script: Vec<Exit>) -> Self {
        Mock {
            script: script.into_iter().map(|e| (e, None)).collect(),
            gprs: Gprs::default(),
            rip: START_RIP,
            rsp: 0,
            cr2: 0,
            ds_base: 0,
            rflags: 0x2,
            mode: long_mode(),
            injected_exceptions: Vec::new(),
            injected_interrupts: Vec::new(),
            injected_nmis: 0,
            window: false,
            xcr0: XCR0_X87,
            skips: 0,
        }
    }

    /// An exit that the guest takes with these registers.
    fn then(mut self, exit: Exit, gprs: Gprs) -> Self {
        self.script.push_back((exit, Some(gprs)));
        self
    }
}

fn long_mode() -> GuestMode {
    GuestMode {
        cr0: 0x8000_0031,
        cr3: PAGE_TABLES,
        cr4: 1 << 5,
        efer: (1 << 8) | (1 << 10),
        long_code: true,
        default_32: false,
        cs_base: 0,
        cpl: 0,
    }
}

impl Vcpu for Mock {
    fn run(&mut self) -> Exit {
        let (exit, gprs) = self.script.pop_front().expect("the run loop ran past the end of the script");
        if let Some(gprs) = gprs {
            self.gprs = gprs;
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
    fn skip_instruction(&mut self) -> bool {
        self.skips += 1;
        self.rip += 2;
        true
    }
    fn set_efer(&mut self, efer: u64) {
        self.mode.efer = efer;
    }
    fn set_cr0(&mut self, cr0: u64) {
        self.mode.cr0 = cr0;
    }
    fn set_cr4(&mut self, cr4: u64) {
        self.mode.cr4 = cr4;
    }
    fn set_cr2(&mut self, cr2: u64) {
        self.cr2 = cr2;
    }
    fn segment_base(&self, segment: Segment) -> u64 {
        if segment == Segment::Ds {
            self.ds_base
        } else {
            0
        }
    }
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        self.injected_exceptions.push((vector, error_code));
    }
    fn interrupts_open(&self) -> bool {
        self.rflags & RFLAGS_IF != 0
    }
    fn inject_interrupt(&mut self, vector: u8) {
        self.injected_interrupts.push(vector);
    }
    fn inject_nmi(&mut self) -> bool {
        self.injected_nmis += 1;
        true
    }
    fn set_interrupt_window_exiting(&mut self, on: bool) {
        self.window = on;
    }
    fn set_xcr0(&mut self, xcr0: u64) {
        self.xcr0 = xcr0;
    }
    fn xcr0(&self) -> u64 {
        self.xcr0
    }
}

const PAGE_TABLES: u64 = 0x1_0000;
const MEMORY: usize = 4 << 20;

fn memory() -> SliceMemory<'static> {
    let bytes = vec![0u8; MEMORY].leak();
    let mut memory = SliceMemory(bytes);
    page_tables::build_identity_map(&mut memory, PAGE_TABLES, 4 << 30).unwrap();
    memory
}

fn host_cpuid(leaf: u32, subleaf: u32) -> cpuid::Regs {
    match leaf {
        0 => [0xd, 0, 0, 0],
        // SYSCALL, NX, long mode.
        0x8000_0001 => [0, 0, 0, 1 << 11 | 1 << 20 | 1 << 29],
        _ => [leaf, subleaf, 0x5, 0x6],
    }
}

fn zero() -> u64 {
    0
}

/// The host TSC the tests see (the guest's too).
fn host_tsc() -> u64 {
    42
}

/// The environment the tests run in: no clock, no host timer, no console input.
fn test_env<'a>(console: &'a mut dyn FnMut(&str, bool), supported_xcr0: u64) -> Env<'a> {
    Env {
        cpuid: &host_cpuid,
        now_micros: &zero,
        host_tsc: &host_tsc,
        console,
        supported_xcr0,
        tsc_hz: 0,
        arm_timer: &|_| {},
        wait: &|| {},
        input: None,
        raw_console: None,
        kick: &|_| {},
        host_nmi: &|_| {},
    }
}

/// Runs the mock to the VM's end; returns the end and the console lines.
fn run(vm: &mut Vm<SliceMemory<'static>>, vcpu: &mut Mock) -> (VmEnd, Vec<String>) {
    let mut lines = Vec::new();
    let mut arbiter = crate::console::ConsoleLines::new();
    let mut console = |text: &str, ends_line: bool| {
        let mut piece = String::new();
        arbiter.vm_text(0, "t", text, ends_line, &mut |s| piece.push_str(s));
        lines.push(piece);
    };
    let mut env = test_env(&mut console, XCR0_X87 | XCR0_SSE | XCR0_AVX);
    let shared = Mutex::new(core::mem::replace(vm, self::vm()));
    let end = super::run(&shared, vcpu, &mut env);
    *vm = shared.into_inner();
    (end, lines)
}

fn exit_with(status: u32) -> (Exit, Gprs) {
    (
        Exit::Io(IoExit { port: 0xf4, size: 4, write: true, string: false, rep: false }),
        Gprs { rax: status as u64, ..Gprs::default() },
    )
}

fn vm() -> Vm<SliceMemory<'static>> {
    Vm::new("t", memory(), 1_000_000_000, 0)
}

/// vCPU 0's context, on the VM's clock, for tests that drive the handlers one exit at a time.
fn cx(vm: &Vm<SliceMemory<'static>>) -> VcpuContext {
    let mut cx = VcpuContext::new(0);
    cx.clock = vm.clock;
    cx.started = true;
    cx
}

#[test]
fn debug_exit_ends_the_vm_with_its_status() {
    let (exit, gprs) = exit_with(3);
    let mut vcpu = Mock::new(vec![]).then(exit, gprs);
    let (end, _) = run(&mut vm(), &mut vcpu);
    assert_eq!(end, VmEnd::DebugExit(3));
    assert_eq!(end.end_line("t"), "VM-END vm=t reason=debug-exit status=3 detail=\"debug-exit status 3\"");
    assert_eq!(vcpu.skips, 1);
}

/// Runs exactly one scripted exit through the handlers.
fn step(vm: &mut Vm<SliceMemory<'static>>, cx: &mut VcpuContext, vcpu: &mut Mock) -> Option<VmEnd> {
    let mut console = |_: &str, _: bool| {};
    let mut env = test_env(&mut console, XCR0_X87 | XCR0_SSE);
    vm.offer_interrupt(0, vcpu);
    let exit = vcpu.run();
    match vm.handle(cx, vcpu, exit, &mut env) {
        Next::End(end) => Some(end),
        Next::Continue | Next::Halt | Next::Yield => None,
    }
}

#[test]
fn cpuid_returns_the_guest_model_and_skips() {
    let mut vm = vm();
    let mut cx = cx(&vm);
    let mut vcpu = Mock::new(vec![]).then(Exit::Cpuid, Gprs { rax: 0x4000_0000, rbx: 0xdead, ..Gprs::default() });
    assert_eq!(step(&mut vm, &mut cx, &mut vcpu), None);
    let g = vcpu.gprs;
    let signature: Vec<u8> = [g.rbx, g.rcx, g.rdx].iter().flat_map(|r| (*r as u32).to_le_bytes()).collect();
    assert_eq!(&signature, cpuid::SIGNATURE);
    assert_eq!(g.rax, cpuid::MAX_HYPERVISOR_LEAF as u64);
    assert_eq!(vcpu.skips, 1);
    vcpu = vcpu.then(Exit::Cpuid, Gprs { rax: 1, ..Gprs::default() });
    step(&mut vm, &mut cx, &mut vcpu);
    assert_ne!(vcpu.gprs.rcx & (1 << 31), 0, "hypervisor bit");
    assert_eq!(vcpu.gprs.rcx & (1 << 5), 0, "VMX hidden");
}

#[test]
fn unknown_msrs_get_gp_and_allowed_ones_round_trip() {
    let mut vm = vm();
    let mut cx = cx(&vm);
    let mut vcpu = Mock::new(vec![])
        .then(Exit::Rdmsr, Gprs { rcx: 0x4000_00ff, ..Gprs::default() })
        .then(Exit::Wrmsr, Gprs { rcx: 0xc000_0082, rax: 0x1000, rdx: 0xffff_8000, ..Gprs::default() })
        .then(Exit::Rdmsr, Gprs { rcx: 0xc000_0082, ..Gprs::default() })
        .then(Exit::Rdmsr, Gprs { rcx: 0x10, ..Gprs::default() });
    for _ in 0..3 {
        assert_eq!(step(&mut vm, &mut cx, &mut vcpu), None);
    }
    assert_eq!(vcpu.injected_exceptions, [(VECTOR_GP, Some(0))]);
    assert_eq!(vcpu.skips, 2, "a refused RDMSR is not skipped");
    assert_eq!((vcpu.gprs.rdx, vcpu.gprs.rax), (0xffff_8000, 0x1000));
    step(&mut vm, &mut cx, &mut vcpu);
    assert_eq!((vcpu.gprs.rdx, vcpu.gprs.rax), (0, 42), "TSC reads the guest TSC");
}

/// kvm-clock: the structure lands where the guest said, gives back the TSC's frequency and
/// today's guest time, and the MSRs read back; one outside RAM is accepted but not written.
#[test]
fn kvm_clock_msrs_write_the_guest_structures() {
    let mut vm = Vm::new("t", memory(), 2_000_000_000, 1_700_000_000);
    let mut cx = cx(&vm);
    let wrmsr = |msr: u32, value: u64| {
        (Exit::Wrmsr, Gprs { rcx: msr.into(), rax: value & 0xffff_ffff, rdx: value >> 32, ..Gprs::default() })
    };
    let (time_at, wall_at) = (0x20_0040u64, 0x20_0100u64);
    let script = [
        wrmsr(pvclock::MSR_SYSTEM_TIME, time_at | 1),
        wrmsr(pvclock::MSR_WALL_CLOCK, wall_at),
        (Exit::Rdmsr, Gprs { rcx: pvclock::MSR_SYSTEM_TIME.into(), ..Gprs::default() }),
        wrmsr(pvclock::MSR_SYSTEM_TIME, (MEMORY as u64 - 8) | 1),
    ];
    let mut vcpu = Mock::new(vec![]);
    for (exit, gprs) in script {
        vcpu = vcpu.then(exit, gprs);
    }
    for _ in 0..3 {
        assert_eq!(step(&mut vm, &mut cx, &mut vcpu), None);
    }
    assert_eq!(vcpu.gprs.rax, time_at | 1, "the MSR reads back");
    assert_eq!(step(&mut vm, &mut cx, &mut vcpu), None);
    assert_eq!((vcpu.skips, vcpu.injected_exceptions.len()), (4, 0));
    let mut info = [0u8; 32];
    vm.memory.read(time_at, &mut info).unwrap();
    let word = |at: usize| u32::from_le_bytes(info[at..at + 4].try_into().unwrap());
    assert_eq!(word(0) % 2, 0, "an even version: consistent");
    assert_eq!(u64::from_le_bytes(info[8..16].try_into().unwrap()), 42, "the guest TSC now");
    let scale = pvclock::TimeScale { mul: word(24), shift: info[28] as i8 };
    assert_eq!(scale.ns(2_000_000_000), 1_000_000_000, "2 GHz");
    assert_eq!(info[29], pvclock::FLAG_TSC_STABLE);
    let mut wall = [0u8; 12];
    vm.memory.read(wall_at, &mut wall).unwrap();
    assert_eq!(u32::from_le_bytes(wall[4..8].try_into().unwrap()), 1_700_000_000);
    assert!(vm.kvm_clock_misplaced_logged, "the structure past the end of RAM was reported");
}

/// VMCALL/VMMCALL answer as KVM does when no hypercall is offered; VMX and SVM's own
/// instructions are undefined.
#[test]
fn hypercalls_fail_cleanly_and_virtualization_instructions_are_undefined() {
    let mut vm = vm();
    let mut cx = cx(&vm);
    let mut vcpu = Mock::new(vec![]).then(Exit::Hypercall, Gprs { rax: 9, ..Gprs::default() });
    assert_eq!(step(&mut vm, &mut cx, &mut vcpu), None);
    assert_eq!((vcpu.gprs.rax, vcpu.skips), ((-1000i64) as u64, 1), "-KVM_ENOSYS");
    vcpu.mode.cpl = 3;
    vcpu = vcpu.then(Exit::Hypercall, Gprs { rax: 9, ..Gprs::default() });
    step(&mut vm, &mut cx, &mut vcpu);
    assert_eq!(vcpu.gprs.rax, u64::MAX, "-KVM_EPERM from user mode");
    vcpu = vcpu.then(Exit::VirtualizationInstruction, Gprs::default());
    step(&mut vm, &mut cx, &mut vcpu);
    assert_eq!((vcpu.injected_exceptions.as_slice(), vcpu.skips), (&[(VECTOR_UD, None)][..], 2));
}

/// EFER follows the guest CPU's rules on either backend: reserved bits and LME under paging
/// raise #GP; what is taken reaches the backend with LMA kept; PAT and TSC_AUX writes the model
/// accepts are handed to the backend too.
#[test]
fn efer_writes_are_validated_above_the_backend() {
    let mut vm = vm();
    let mut cx = cx(&vm);
    let efer = |value: u64| Gprs { rcx: 0xc000_0080, rax: value & 0xffff_ffff, rdx: value >> 32, ..Gprs::default() };
    // Long mode with paging (EFER LME|LMA); the host CPUID offers NX and SYSCALL.
    let mut vcpu = Mock::new(vec![])
        .then(Exit::Wrmsr, efer(0x100 | 0x1 | 0x800))
        .then(Exit::Wrmsr, efer(1 << 12))
        .then(Exit::Wrmsr, efer(0x1))
        .then(Exit::Rdmsr, efer(0));
    assert_eq!(step(&mut vm, &mut cx, &mut vcpu), None);
    assert_eq!(vcpu.mode.efer, 0x500 | 0x1 | 0x800, "SCE and NXE taken, LMA kept");
    assert_eq!(step(&mut vm, &mut cx, &mut vcpu), None);
    assert_eq!(vcpu.injected_exceptions, [(VECTOR_GP, Some(0))], "SVME is not offered");
    assert_eq!(step(&mut vm, &mut cx, &mut vcpu), None);
    assert_eq!(vcpu.injected_exceptions.len(), 2, "LME cleared under paging");
    assert_eq!(step(&mut vm, &mut cx, &mut vcpu), None);
    assert_eq!((vcpu.gprs.rax, vcpu.skips), (0xd01, 2), "RDMSR reads LMA too");
}

/// A vCPU whose first exits write `text` to COM1, one byte per OUT.
fn printing(text: &[u8]) -> Mock {
    text.iter().fold(Mock::new(vec![]), |vcpu, &byte| {
        vcpu.then(
            Exit::Io(IoExit { port: 0x3f8, size: 1, write: true, string: false, rep: false }),
            Gprs { rax: byte as u64, ..Gprs::default() },
        )
    })
}

#[test]
fn console_output_is_prefixed_with_the_vm_name() {
    let (e, g) = exit_with(0);
    let (end, lines) = run(&mut vm(), &mut printing(b"hi\nthere").then(e, g));
    assert_eq!(end, VmEnd::DebugExit(0));
    assert_eq!(lines.concat(), "[t] hi\n[t] there\n", "an unterminated line is flushed when the VM ends");
}

#[test]
fn a_raw_console_gets_the_bytes_unaltered_beside_the_sanitized_lines() {
    let (e, g) = exit_with(0);
    let mut vcpu = printing(b"\x1b[1mbold\x1b[0m\r\n$ ").then(e, g);
    let mut lines = String::new();
    let mut console = |text: &str, ends_line: bool| {
        lines.push_str(text);
        if ends_line {
            lines.push('\n');
        }
    };
    let mut raw = Vec::new();
    let mut raw_sink = |bytes: &[u8]| raw.extend_from_slice(bytes);
    {
        let mut env = test_env(&mut console, 1);
        env.raw_console = Some(&mut raw_sink);
        let shared = Mutex::new(vm());
        assert_eq!(super::run(&shared, &mut vcpu, &mut env), VmEnd::DebugExit(0));
    }
    assert_eq!(raw, b"\x1b[1mbold\x1b[0m\r\n$ ");
    assert_eq!(lines, ".[1mbold.[0m\n$ \n");
}

fn amd_host_cpuid(leaf: u32, subleaf: u32) -> cpuid::Regs {
    match leaf {
        0 => [0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65],
        _ => host_cpuid(leaf, subleaf),
    }
}

#[test]
fn amd_legacy_performance_counters_and_nb_cfg_read_as_zero_on_amd_only() {
    for (amd, expect_gp) in [(true, false), (false, true)] {
        let mut vm = vm();
        let mut cx = cx(&vm);
        let mut console = |_: &str, _: bool| {};
        let mut env = test_env(&mut console, 1);
        if amd {
            env.cpuid = &amd_host_cpuid;
        }
        let mut vcpu = Mock::new(vec![])
            .then(Exit::Rdmsr, Gprs { rcx: 0xc001_0004, rax: 0x55, rdx: 0x66, ..Gprs::default() })
            .then(Exit::Wrmsr, Gprs { rcx: 0xc001_0000, rax: 0x43_0076, ..Gprs::default() })
            .then(Exit::Wrmsr, Gprs { rcx: 0xc001_001f, rdx: 1 << 14, ..Gprs::default() })
            .then(Exit::Rdmsr, Gprs { rcx: 0xc001_001f, rax: 0x55, rdx: 0x66, ..Gprs::default() });
        for _ in 0..4 {
            let exit = vcpu.run();
            vm.handle(&mut cx, &mut vcpu, exit, &mut env);
        }
        if expect_gp {
            assert_eq!(vcpu.injected_exceptions, [(13, Some(0)); 4], "not an AMD CPU: #GP");
        } else {
            assert!(vcpu.injected_exceptions.is_empty());
            assert_eq!((vcpu.skips, vcpu.gprs.rax, vcpu.gprs.rdx), (4, 0, 0), "read 0, writes ignored");
        }
    }
}

#[test]
fn refused_msrs_are_counted_for_the_end_report() {
    let mut vm = vm();
    let mut cx = cx(&vm);
    let mut console = |_: &str, _: bool| {};
    let mut env = test_env(&mut console, 1);
    let mut vcpu = Mock::new(vec![]);
    for msr in 0x4000_0000..0x4000_0100u64 {
        vcpu = vcpu.then(Exit::Rdmsr, Gprs { rcx: msr, ..Gprs::default() });
    }
    for _ in 0..0x100 {
        let exit = vcpu.run();
        vm.handle(&mut cx, &mut vcpu, exit, &mut env);
    }
    assert_eq!(vcpu.injected_exceptions.len(), 0x100);
    assert!(vm.stats.table("t").contains("  refused MSR accesses (#GP): 256 in 0x40000000-0x4000ffff\n"));
}

#[test]
fn cr8_is_the_local_apics_task_priority() {
    let mut vm = vm();
    let mut cx = cx(&vm);
    let mut console = |_: &str, _: bool| {};
    let mut env = test_env(&mut console, 1);
    let cr8 = |write: bool, gpr: u8| Exit::CrAccess { cr: 8, write, gpr };
    let mut vcpu = Mock::new(vec![])
        .then(cr8(true, 1), Gprs { rcx: 9, ..Gprs::default() })
        .then(cr8(false, 2), Gprs::default())
        .then(cr8(true, 0), Gprs { rax: 0x10, ..Gprs::default() });
    for _ in 0..3 {
        let exit = vcpu.run();
        assert!(matches!(vm.handle(&mut cx, &mut vcpu, exit, &mut env), Next::Continue));
        if vcpu.skips == 1 {
            assert_eq!(vm.router.lapic(0).tpr(), 0x90, "MOV CR8, 9 sets TPR[7:4]");
        }
        if vcpu.skips == 2 && vcpu.injected_exceptions.is_empty() {
            assert_eq!(vcpu.gprs.rdx, 9, "MOV RDX, CR8 reads it back");
        }
    }
    assert_eq!(vcpu.injected_exceptions, [(13, Some(0))], "bits 63:4 are reserved");
    assert_eq!((vcpu.skips, vm.router.lapic(0).tpr()), (2, 0x90));
}

#[test]
fn port_reads_replace_only_the_accessed_width() {
    let mut vm = vm();
    let mut cx = cx(&vm);
    let mut vcpu = Mock::new(vec![]).then(
        Exit::Io(IoExit { port: 0x3fd, size: 1, write: false, string: false, rep: false }),
        Gprs { rax: 0xaaaa_bbbb_cccc_dddd, ..Gprs::default() },
    );
    step(&mut vm, &mut cx, &mut vcpu);
    assert_eq!(vcpu.gprs.rax, 0xaaaa_bbbb_cccc_dd60);
    let gprs = vcpu.gprs;
    vcpu = vcpu.then(Exit::Io(IoExit { port: 0x999, size: 4, write: false, string: false, rep: false }), gprs);
    step(&mut vm, &mut cx, &mut vcpu);
    assert_eq!(vcpu.gprs.rax, 0xffff_ffff, "unclaimed port floats high; 32-bit write clears the top");
}

#[test]
fn a_prompt_is_shown_while_the_guest_waits_and_the_line_continues() {
    let mut vcpu = printing(b"$ ");
    // HLT with interrupts enabled and nothing pending: the prompt is written before the VM
    // is declared halted (no input source in this test).
    vcpu.rflags |= RFLAGS_IF;
    vcpu = vcpu.then(Exit::Hlt, Gprs::default());
    let (end, lines) = run(&mut vm(), &mut vcpu);
    assert!(matches!(end, VmEnd::Halted(_)));
    assert_eq!(lines, ["[t] $ ", "\n"]);
}

#[test]
fn hlt_with_interrupts_disabled_ends_the_vm() {
    let (end, _) = run(&mut vm(), &mut Mock::new(vec![Exit::Hlt]));
    assert!(matches!(end, VmEnd::Halted(why) if why.contains("interrupts disabled")));
}

#[test]
fn interrupts_wait_for_a_window_then_are_injected() {
    let mut vm = vm();
    let mut cx = cx(&vm);
    vm.bus.add(Box::new(TestDevice::default())).unwrap();
    let request = Exit::Io(IoExit { port: IRQ_PORT, size: 1, write: true, string: false, rep: false });
    let mut vcpu = Mock::new(vec![]).then(request, Gprs { rax: 0x40, ..Gprs::default() });
    let mut console = |_: &str, _: bool| {};
    let mut env = test_env(&mut console, 1);
    let exit = vcpu.run();
    vm.handle(&mut cx, &mut vcpu, exit, &mut env);
    vm.offer_interrupt(0, &mut vcpu);
    assert!(vcpu.window, "IF=0: ask for an interrupt window");
    assert!(vcpu.injected_interrupts.is_empty());
    vcpu.rflags |= RFLAGS_IF;
    vm.offer_interrupt(0, &mut vcpu);
    assert_eq!(vcpu.injected_interrupts, [0x40]);
    assert!(!vcpu.window);
    // HLT with the interrupt already delivered and IF=1 has nothing left to wait for.
    vcpu.script.push_back((Exit::Hlt, None));
    let exit = vcpu.run();
    assert!(matches!(vm.handle(&mut cx, &mut vcpu, exit, &mut env), Next::Halt));
    assert!(matches!(vm.halted_until(&cx, &env), Slice::Ended(VmEnd::Halted(_))));
}

#[test]
fn mmio_loads_and_stores_are_decoded_and_emulated() {
    let mut vm = vm();
    let mut cx = cx(&vm);
    vm.bus.add(Box::new(TestDevice::default())).unwrap();
    // mov eax, [rbx]; mov [rbx], rcx (REX.W 89 0b)
    vm.memory.write(START_RIP, &[0x8b, 0x03, 0x48, 0x89, 0x0b]).unwrap();
    let mut vcpu = Mock::new(vec![]).then(
        Exit::NestedFault { gpa: MMIO_BASE, write: false, fetch: false },
        Gprs { rax: u64::MAX, rbx: MMIO_BASE, ..Gprs::default() },
    );
    let mut console = |_: &str, _: bool| {};
    let mut env = test_env(&mut console, 1);
    let exit = vcpu.run();
    vm.handle(&mut cx, &mut vcpu, exit, &mut env);
    assert_eq!(vcpu.gprs.rax, 0x1234_5678);
    assert_eq!(vcpu.rip, START_RIP + 2);
    vcpu = vcpu.then(
        Exit::NestedFault { gpa: MMIO_BASE + 8, write: true, fetch: false },
        Gprs { rbx: MMIO_BASE + 8, rcx: 0x1122_3344_5566_7788, ..Gprs::default() },
    );
    let exit = vcpu.run();
    vm.handle(&mut cx, &mut vcpu, exit, &mut env);
    assert_eq!(vcpu.rip, START_RIP + 5);
    assert_eq!(vm.bus.mmio_read(MMIO_BASE + 8, 8, 0, &mut Events::default()), Some(0x1122_3344_5566_7788));
}

/// RSP is a register operand like any other (it lives outside `Gprs`), and outside 64-bit
/// code the instruction is fetched at CS base + RIP.
#[test]
fn mmio_through_rsp_and_from_a_code_segment_with_a_base() {
    let mut vm = vm();
    let mut cx = cx(&vm);
    vm.bus.add(Box::new(TestDevice::default())).unwrap();
    // mov [rbx], rsp; mov rsp, [rbx] (REX.W 89 23, REX.W 8b 23)
    vm.memory.write(START_RIP, &[0x48, 0x89, 0x23, 0x48, 0x8b, 0x23]).unwrap();
    let mut console = |_: &str, _: bool| {};
    let mut env = test_env(&mut console, 1);
    let scratch = Exit::NestedFault { gpa: MMIO_BASE + 8, write: true, fetch: false };
    let mut vcpu = Mock::new(vec![]).then(scratch, Gprs { rbx: MMIO_BASE + 8, ..Gprs::default() });
    vcpu.rsp = 0x7e57_5000;
    let exit = vcpu.run();
    vm.handle(&mut cx, &mut vcpu, exit, &mut env);
    assert_eq!(vm.bus.mmio_read(MMIO_BASE + 8, 8, 0, &mut Events::default()), Some(0x7e57_5000));
    vcpu.rsp = 0;
    let load = Exit::NestedFault { gpa: MMIO_BASE + 8, write: false, fetch: false };
    vcpu = vcpu.then(load, Gprs { rbx: MMIO_BASE + 8, ..Gprs::default() });
    let exit = vcpu.run();
    vm.handle(&mut cx, &mut vcpu, exit, &mut env);
    assert_eq!((vcpu.rsp, vcpu.rip), (0x7e57_5000, START_RIP + 6));

    // 32-bit protected mode without paging, CS base 1 MiB: mov eax, [ebx] at linear START_RIP + 0x10.
    vm.memory.write(START_RIP + 0x10, &[0x8b, 0x03]).unwrap();
    vcpu.mode = GuestMode {
        cr0: 0x11,
        cr3: 0,
        cr4: 0,
        efer: 0,
        long_code: false,
        default_32: true,
        cs_base: 0x10_0000,
        cpl: 0,
    };
    vcpu.rip = START_RIP + 0x10 - 0x10_0000;
    vcpu = vcpu.then(
        Exit::NestedFault { gpa: MMIO_BASE, write: false, fetch: false },
        Gprs { rbx: MMIO_BASE, ..Gprs::default() },
    );
    let exit = vcpu.run();
    vm.handle(&mut cx, &mut vcpu, exit, &mut env);
    assert_eq!((vcpu.gprs.rax, vcpu.rip), (0x1234_5678, START_RIP + 0x12 - 0x10_0000));
}

/// Where there is neither RAM nor a device the bus is open, as on a PC: reads float high and
/// writes go nowhere, counted for the end report; only an instruction fetch ends the VM.
#[test]
fn unclaimed_guest_physical_data_accesses_see_an_open_bus() {
    let mut vm = vm();
    let mut cx = cx(&vm);
    const HOLE: u64 = 0xfeed_0000;
    // mov eax, [rbx]; mov [rbx], rcx (REX.W 89 0b)
    vm.memory.write(START_RIP, &[0x8b, 0x03, 0x48, 0x89, 0x0b]).unwrap();
    let mut console = |_: &str, _: bool| {};
    let mut env = test_env(&mut console, 1);
    let mut vcpu = Mock::new(vec![]).then(
        Exit::NestedFault { gpa: HOLE, write: false, fetch: false },
        Gprs { rax: 0x1234_5678_0000_0000, rbx: HOLE, ..Gprs::default() },
    );
    let exit = vcpu.run();
    assert!(matches!(vm.handle(&mut cx, &mut vcpu, exit, &mut env), Next::Continue));
    assert_eq!((vcpu.gprs.rax, vcpu.rip), (0xffff_ffff, START_RIP + 2), "a 32-bit load zero-extends all ones");
    vcpu = vcpu.then(Exit::NestedFault { gpa: HOLE, write: true, fetch: false }, Gprs { rbx: HOLE, ..Gprs::default() });
    let exit = vcpu.run();
    assert!(matches!(vm.handle(&mut cx, &mut vcpu, exit, &mut env), Next::Continue));
    assert_eq!(vcpu.rip, START_RIP + 5);
    assert_eq!(vm.stats.unclaimed_mmio_accesses, 2);
    assert!(vm.stats.table("t").contains("accesses to guest-physical addresses without RAM or a device: 2"));

    let mut vcpu = Mock::new(vec![Exit::NestedFault { gpa: HOLE, write: false, fetch: true }]);
    let (end, _) = run(&mut vm, &mut vcpu);
    let VmEnd::Error(message) = end else { panic!("expected an error end") };
    assert!(message.contains("instruction fetch at guest-physical 0xfeed0000"), "{message}");
    assert!(message.contains("outside guest RAM, where no device is"), "{message}");
}

#[test]
fn triple_fault_and_entry_failure_end_the_vm() {
    assert_eq!(run(&mut vm(), &mut Mock::new(vec![Exit::TripleFault])).0, VmEnd::TripleFault { rip: START_RIP });
    let (end, _) = run(&mut vm(), &mut Mock::new(vec![Exit::EntryFailed { code: 7 }]));
    assert_eq!(end, VmEnd::Error("VM entry failed (code 0x7)".into()));
    let (end, _) = run(&mut vm(), &mut Mock::new(vec![Exit::Unhandled { reason: 0x99, info: 1 }]));
    assert!(matches!(end, VmEnd::Error(m) if m.contains("unhandled exit reason 0x99")));
    let (end, _) = run(&mut vm(), &mut Mock::new(vec![Exit::BackendFailed { what: "a VMCS field failed" }]));
    assert_eq!(end, VmEnd::Error("vCPU 0: a VMCS field failed".into()));
}

#[test]
fn host_nmis_leave_the_guest_running_and_untouched() {
    let (exit, gprs) = exit_with(0);
    let mut vcpu = Mock::new(vec![Exit::HostNmi, Exit::HostNmi]).then(exit, gprs);
    assert_eq!(run(&mut vm(), &mut vcpu).0, VmEnd::DebugExit(0));
    // Nothing injected; only the OUT that ends the VM was skipped.
    assert_eq!((vcpu.injected_nmis, vcpu.injected_exceptions.len(), vcpu.skips), (0, 0, 1));
}

#[test]
fn rep_string_io_moves_guest_memory() {
    let mut vm = vm();
    let mut cx = cx(&vm);
    vm.memory.write(0x3000, b"ok\n").unwrap();
    vm.memory.write(0x4000, &[0xaa; 4]).unwrap();
    // rep outsb; rep insb
    vm.memory.write(START_RIP, &[0xf3, 0x6e, 0xf3, 0x6c]).unwrap();
    let outs = Exit::Io(IoExit { port: 0x3f8, size: 1, write: true, string: true, rep: true });
    let ins = Exit::Io(IoExit { port: 0x3fd, size: 1, write: false, string: true, rep: true });
    let mut vcpu = Mock::new(vec![])
        .then(outs, Gprs { rsi: 0x3000, rcx: 3, ..Gprs::default() })
        .then(ins, Gprs { rdi: 0x4000, rcx: 4, ..Gprs::default() });
    let mut lines = Vec::new();
    let mut arbiter = crate::console::ConsoleLines::new();
    let mut console = |text: &str, ends_line: bool| {
        let mut piece = String::new();
        arbiter.vm_text(0, "t", text, ends_line, &mut |s| piece.push_str(s));
        lines.push(piece);
    };
    let mut env = test_env(&mut console, 1);
    for _ in 0..2 {
        let exit = vcpu.run();
        vm.handle(&mut cx, &mut vcpu, exit, &mut env);
    }
    let mut buf = [0u8; 5];
    vm.memory.read(0x4000, &mut buf).unwrap();
    assert_eq!(buf, [0x60, 0x60, 0x60, 0x60, 0]);
    assert_eq!((vcpu.gprs.rcx, vcpu.gprs.rdi), (0, 0x4004));
    assert_eq!(vcpu.skips, 2);
    assert_eq!(lines.concat(), "[t] ok\n");
}

/// String I/O outside 64-bit mode: 16-bit addresses in a data segment with a base, SI and CX
/// wrapping at 16 bits; and a buffer that runs into an unmapped page raises #PF in the guest
/// after the iterations before it, with CR2 at the page and RIP still at the instruction.
#[test]
fn string_io_in_real_mode_and_into_an_unmapped_page() {
    let mut vm = vm();
    let mut cx = cx(&vm);
    let mut console = |_: &str, _: bool| {};
    let mut env = test_env(&mut console, 1);
    // Real mode, CS base 0x1000, RIP 0x10: rep outsb from DS:SI, DS base 0x5000, SI 0xffff.
    vm.memory.write(0x1010, &[0xf3, 0x6e]).unwrap();
    vm.memory.write(0x5000 + 0xffff, b"a").unwrap();
    vm.memory.write(0x5000, b"b").unwrap();
    let outs = Exit::Io(IoExit { port: 0x3f8, size: 1, write: true, string: true, rep: true });
    let mut vcpu = Mock::new(vec![]).then(outs, Gprs { rsi: 0x7_ffff, rcx: 0x1_0002, ..Gprs::default() });
    vcpu.mode =
        GuestMode { cr0: 0x10, cr3: 0, cr4: 0, efer: 0, long_code: false, default_32: false, cs_base: 0x1000, cpl: 0 };
    vcpu.rip = 0x10;
    vcpu.ds_base = 0x5000;
    let exit = vcpu.run();
    vm.handle(&mut cx, &mut vcpu, exit, &mut env);
    assert_eq!((vcpu.gprs.rsi, vcpu.gprs.rcx, vcpu.skips), (0x7_0001, 0x1_0000, 1), "SI and CX wrap at 16 bits");
    assert_eq!(vm.console_line, b"ab");

    // Long mode on 4 KiB pages mapping 0-0x3fff only: rep insb at 0x1000 into 0x3ffe.., which
    // runs into the unmapped page at 0x4000.
    let mut vm = self::vm();
    let mut cx = self::cx(&vm);
    let (pml4, pdpt, pd, pt) = (0x20_0000u64, 0x20_1000u64, 0x20_2000u64, 0x20_3000u64);
    for (table, next) in [(pml4, pdpt), (pdpt, pd), (pd, pt)] {
        vm.memory.write(table, &(next | 0b111).to_le_bytes()).unwrap();
    }
    for page in 0..4u64 {
        vm.memory.write(pt + page * 8, &(page << 12 | 0b111).to_le_bytes()).unwrap();
    }
    vm.memory.write(0x1000, &[0xf3, 0x6c]).unwrap();
    let ins = Exit::Io(IoExit { port: 0x3fd, size: 1, write: false, string: true, rep: true });
    let mut vcpu = Mock::new(vec![]).then(ins, Gprs { rdi: 0x3ffe, rcx: 4, ..Gprs::default() });
    vcpu.mode.cr3 = pml4;
    vcpu.rip = 0x1000;
    let exit = vcpu.run();
    vm.handle(&mut cx, &mut vcpu, exit, &mut env);
    assert_eq!(vcpu.injected_exceptions, [(14, Some(0b10))], "#PF, not present, write");
    assert_eq!((vcpu.cr2, vcpu.gprs.rdi, vcpu.gprs.rcx, vcpu.rip), (0x4000, 0x4000, 2, 0x1000));
    let mut stored = [0u8; 2];
    vm.memory.read(0x3ffe, &mut stored).unwrap();
    assert_eq!(stored, [0x60, 0x60], "the iterations before the fault are done");
}

#[test]
fn xsetbv_is_validated() {
    let mut vm = vm();
    let mut cx = cx(&vm);
    let mut console = |_: &str, _: bool| {};
    let mut env = test_env(&mut console, XCR0_X87 | XCR0_SSE);
    let mut vcpu = Mock::new(vec![]).then(Exit::Xsetbv, Gprs { rax: 3, ..Gprs::default() });
    let exit = vcpu.run();
    vm.handle(&mut cx, &mut vcpu, exit, &mut env);
    assert_eq!(vcpu.injected_exceptions, [(VECTOR_UD, None)], "CR4.OSXSAVE clear");
    vcpu.mode.cr4 |= CR4_OSXSAVE;
    for (rax, rcx) in [(3, 0), (2, 0), (7, 0), (3, 1)] {
        vcpu = vcpu.then(Exit::Xsetbv, Gprs { rax, rcx, ..Gprs::default() });
        let exit = vcpu.run();
        vm.handle(&mut cx, &mut vcpu, exit, &mut env);
    }
    assert_eq!(vcpu.xcr0, 3);
    assert_eq!(vcpu.skips, 1);
    assert_eq!(&vcpu.injected_exceptions[1..], [(VECTOR_GP, Some(0)); 3]);
}

/// A deterministic pseudo-random source for the fuzz-style tests (xorshift64).
fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// Guest-controlled values in every exit kind never panic the run loop: registers, ports,
/// MSR numbers, guest-physical addresses and instruction bytes are all random here.
#[test]
fn random_exits_with_random_guest_state_never_panic() {
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64);
    let mut vm = vm();
    let mut cx = cx(&vm);
    vm.bus.add(Box::new(TestDevice::default())).unwrap();
    let (mut continued, mut ended) = (0, 0);
    for round in 0..4000 {
        let r = next();
        let gprs = Gprs {
            rax: next(),
            rbx: next(),
            rcx: if r & 1 == 0 { next() % 8 } else { next() },
            rdx: next(),
            rsi: next() % (8 << 20),
            rdi: next(),
            ..Gprs::default()
        };
        let exit = match r % 9 {
            0 => Exit::Cpuid,
            1 => Exit::Rdmsr,
            2 => Exit::Wrmsr,
            3 => Exit::Xsetbv,
            4 => Exit::Io(IoExit {
                port: next() as u16,
                size: [1, 2, 4][(next() % 3) as usize],
                write: next() & 1 == 0,
                string: next() & 3 == 0,
                rep: next() & 1 == 0,
            }),
            5 => Exit::NestedFault {
                gpa: if next() & 1 == 0 { MMIO_BASE + next() % 0x1000 } else { 0xfee0_0000 + next() % 0x1000 },
                write: next() & 1 == 0,
                fetch: false,
            },
            6 => Exit::InterruptWindow,
            7 => Exit::ExternalInterrupt,
            _ => Exit::CrAccess { cr: 4, write: true, gpr: 0 },
        };
        // Random instruction bytes where MMIO exits fetch them.
        let bytes: [u8; 8] = next().to_le_bytes();
        vm.memory.write(START_RIP, &bytes).unwrap();
        let mut vcpu = Mock::new(vec![]).then(exit, gprs);
        vcpu.mode.cr4 |= if round % 2 == 0 { CR4_OSXSAVE } else { 0 };
        vcpu.rflags = if next() & 1 == 0 { 0x202 } else { 0x2 } | if next() & 7 == 0 { RFLAGS_DF } else { 0 };
        match step(&mut vm, &mut cx, &mut vcpu) {
            None => continued += 1,
            Some(_) => ended += 1,
        }
    }
    // Both outcomes must have been exercised, or the random state is not reaching the handlers.
    assert!(continued > 1000 && ended > 100, "continued {continued}, ended {ended}");
}

/// Random register traffic to the interrupt controllers (PIC ports, IOAPIC and LAPIC pages,
/// APIC MSRs) and random line changes never panic, whatever the guest writes.
#[test]
fn random_interrupt_controller_traffic_never_panics() {
    let mut next = xorshift(0x2545_f491_4f6c_dd1du64);
    let mut router = InterruptRouter::with_vcpus(1_000_000_000, 4);
    let mut events = Events::default();
    let mut now = 0u64;
    let mut delivered = 0;
    for _ in 0..20_000 {
        now += next() % 100_000;
        let cpu = (next() % 5) as usize;
        let size = [1, 2, 4, 8][(next() % 4) as usize];
        match next() % 7 {
            0 => {
                let port = [0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1][(next() % 6) as usize];
                router.io_write(port, size.min(4), next() as u32, now, &mut events);
            }
            1 => {
                let gpa = 0xfec0_0000 + next() % 0x1000;
                router.mmio_write(cpu, gpa, size, next(), now, &mut events);
                router.mmio_read(cpu, gpa, size, now, &mut events);
            }
            2 => {
                let gpa = 0xfee0_0000 + next() % 0x1000;
                router.mmio_write(cpu, gpa, size, next(), now, &mut events);
                router.mmio_read(cpu, gpa, size, now, &mut events);
            }
            3 => {
                let msr = [0x1b, 0x6e0, 0x800 + (next() % 0x100) as u32][(next() % 3) as usize];
                let _ = router.lapic_msr_write(cpu, msr, next(), now, next());
                let _ = router.lapic_msr_read(cpu, msr, now);
            }
            4 => router.set_line((next() % 30) as u8, next() & 1 == 0),
            5 => router.poll(now),
            _ => {
                delivered += usize::from(router.acknowledge(cpu).is_some());
                router.take_nmi(cpu);
                router.take_sipi(cpu);
            }
        }
        let _ = router.next_deadline_ns(cpu);
        let _ = router.next_vector(cpu);
        let _ = router.take_kicks();
    }
    assert!(delivered > 0, "random programming never delivered an interrupt: the fuzz is not reaching delivery");
}

/// Random port traffic to every PC device on the bus (UART, PIT, RTC, i8042, ACPI PM, PCI, ...)
/// with timer polls and console input in between never panics.
#[test]
fn random_device_port_traffic_never_panics() {
    let mut next = xorshift(0x5851_f42d_4c95_7f2du64);
    let mut vm = vm();
    let mut events = Events::default();
    let mut now = 0u64;
    let ports = [
        0x40, 0x41, 0x42, 0x43, 0x61, 0x60, 0x64, 0x70, 0x71, 0x80, 0x3f8, 0x3fd, 0x600, 0x604, 0x608, 0xcf8, 0xcf9,
        0xcfc,
    ];
    let (mut line_changes, mut console_bytes) = (0, 0);
    for _ in 0..50_000 {
        now += next() % 50_000;
        let port = if next() & 3 == 0 {
            next() as u16
        } else {
            ports[(next() % ports.len() as u64) as usize] + (next() % 4) as u16
        };
        let size = [1, 2, 4][(next() % 3) as usize];
        match next() % 5 {
            0 | 1 => {
                vm.bus.io_write(port, size, next() as u32, now, &mut events);
            }
            2 => {
                vm.bus.io_read(port, size, now, &mut events);
            }
            3 => vm.bus.poll(now, &mut events),
            _ => {
                vm.bus.input(next() as u8, now, &mut events);
            }
        }
        console_bytes += events.console.len();
        line_changes += events.irq_lines.len();
        events.console.clear();
        events.irq_lines.clear();
    }
    // The fuzz must have reached real device behaviour, not only the floating bus.
    assert!(line_changes > 0 && console_bytes > 0, "line changes {line_changes}, console bytes {console_bytes}");
}

#[test]
fn a_vcpu_spinning_on_pause_gives_its_cpu_away_and_stays_runnable() {
    let vm = Mutex::new(vm());
    let mut cx = VcpuContext::new(0);
    let (exit, gprs) = exit_with(0);
    let mut vcpu = Mock::new(vec![Exit::Pause]).then(exit, gprs);
    let mut console = |_: &str, _: bool| {};
    let mut env = test_env(&mut console, 1);
    assert_eq!(run_slice(&vm, &mut cx, &mut vcpu, &mut env, u64::MAX), Slice::Preempted);
    assert!(!cx.halted, "it yields, it does not halt");
    assert_eq!(run_slice(&vm, &mut cx, &mut vcpu, &mut env, u64::MAX), Slice::Ended(VmEnd::DebugExit(0)));
}

#[test]
fn a_slice_that_is_over_gives_the_cpu_back_before_entering_the_guest() {
    let vm = Mutex::new(vm());
    let mut cx = VcpuContext::new(0);
    let (exit, gprs) = exit_with(0);
    let mut vcpu = Mock::new(vec![]).then(exit, gprs);
    let mut console = |_: &str, _: bool| {};
    let mut env = test_env(&mut console, 1);
    // The test clock stands at 0 µs: a slice ending at 0 is already used up.
    assert_eq!(run_slice(&vm, &mut cx, &mut vcpu, &mut env, 0), Slice::Preempted);
    assert_eq!(vcpu.script.len(), 1, "the guest did not run");
    assert_eq!(run_slice(&vm, &mut cx, &mut vcpu, &mut env, u64::MAX), Slice::Ended(VmEnd::DebugExit(0)));
    assert_eq!(vcpu.script.len(), 0, "the next slice ran it");
}

#[test]
fn a_halted_vcpu_gives_the_cpu_away_until_its_timer_is_due_then_stays_halted() {
    let mut vm = vm();
    // Local APIC on, its timer armed: one-shot, divide by 1, 5000 ns.
    vm.router.lapic_mmio_write(0, 0xf0, 4, 0x1ff, 0);
    vm.router.lapic_mmio_write(0, 0x3e0, 4, 0xb, 0);
    vm.router.lapic_mmio_write(0, 0x320, 4, 0xef, 0);
    vm.router.lapic_mmio_write(0, 0x380, 4, 5000, 0);
    let mut vcpu = Mock::new(vec![Exit::Hlt]);
    vcpu.rflags |= RFLAGS_IF;
    let mut console = |_: &str, _: bool| {};
    let mut env = test_env(&mut console, 1);
    let vm = Mutex::new(vm);
    let mut cx = VcpuContext::new(0);
    assert_eq!(run_slice(&vm, &mut cx, &mut vcpu, &mut env, u64::MAX), Slice::Halted { wake_at_us: 5 });
    assert_eq!(vcpu.skips, 1, "RIP moved past the HLT");
    // Woken early (the test clock does not move): still nothing to deliver, so it halts again
    // without entering the guest.
    assert_eq!(run_slice(&vm, &mut cx, &mut vcpu, &mut env, u64::MAX), Slice::Halted { wake_at_us: 5 });
    assert!(vcpu.injected_interrupts.is_empty());
}

#[test]
fn a_sipi_from_vcpu0_starts_vcpu1_in_real_mode_and_kicks_it() {
    let vm = Mutex::new(Vm::with_vcpus("t", memory(), 1_000_000_000, 0, 2));
    let wrmsr = |msr: u32, value: u64| {
        (Exit::Wrmsr, Gprs { rcx: msr.into(), rax: value & 0xffff_ffff, rdx: value >> 32, ..Gprs::default() })
    };
    let mut bsp = Mock::new(vec![]);
    for (msr, value) in [(0x1b, 0xfee0_0d00), (0x80f, 0x1ff), (0x830, 1 << 32 | 0xc500), (0x830, 1 << 32 | 0x0608)] {
        let (exit, gprs) = wrmsr(msr, value);
        bsp = bsp.then(exit, gprs);
    }
    let (exit, gprs) = exit_with(0);
    let mut bsp = bsp.then(exit, gprs);
    let mut ap = Mock::new(vec![]);
    let (mut bsp_cx, mut ap_cx) = (VcpuContext::new(0), VcpuContext::new(1));
    let kicked = core::cell::RefCell::new(Vec::new());
    let kick = |vcpu: usize| kicked.borrow_mut().push(vcpu);
    let mut console = |_: &str, _: bool| {};
    let mut env = test_env(&mut console, 1);
    env.kick = &kick;
    assert_eq!(run_slice(&vm, &mut ap_cx, &mut ap, &mut env, u64::MAX), Slice::Halted { wake_at_us: u64::MAX });
    assert_eq!(run_slice(&vm, &mut bsp_cx, &mut bsp, &mut env, u64::MAX), Slice::Ended(VmEnd::DebugExit(0)));
    assert!(kicked.borrow().contains(&1), "the AP was not kicked: {:?}", kicked.borrow());
    // The VM ended: the AP sees that first. In a fresh VM it starts: after reset an AP waits
    // for a SIPI, no INIT needed; the second SIPI finds it started and is ignored.
    assert_eq!(run_slice(&vm, &mut ap_cx, &mut ap, &mut env, u64::MAX), Slice::Ended(VmEnd::DebugExit(0)));
    let vm = Mutex::new(Vm::with_vcpus("t", memory(), 1_000_000_000, 0, 2));
    vm.lock().router.lapic_msr_write(0, 0x1b, 0xfee0_0d00, 0, 0).unwrap();
    vm.lock().router.lapic_msr_write(0, 0x830, 1 << 32 | 0x0608, 0, 0).unwrap();
    vm.lock().router.lapic_msr_write(0, 0x830, 1 << 32 | 0x0609, 0, 0).unwrap();
    assert_eq!(
        run_slice(&vm, &mut ap_cx, &mut ap, &mut env, u64::MAX),
        Slice::Started(StartMode::Real { cs: 0x800, ip: 0 })
    );
}
