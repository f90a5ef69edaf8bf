//! The one vCPU interface that both hardware backends (VMX in `platform::vmx`, SVM in
//! `platform::svm`) implement, and the architecture-neutral exit type.
//!
//! Everything above this interface (exit handling, devices, VM lifecycle) is written once and
//! compiles for the host, where it is tested against a mock vCPU.

use core::fmt;

/// General-purpose registers saved and restored by the world switch. RSP and RIP live in the
/// VMCS/VMCB and are reached through [`Vcpu`] methods. The layout is shared with the assembly
/// world switches: do not reorder.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gprs {
    /// RAX (on SVM the world switch moves it to and from the VMCB).
    pub rax: u64,
    /// RBX.
    pub rbx: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RSI.
    pub rsi: u64,
    /// RDI.
    pub rdi: u64,
    /// RBP.
    pub rbp: u64,
    /// R8.
    pub r8: u64,
    /// R9.
    pub r9: u64,
    /// R10.
    pub r10: u64,
    /// R11.
    pub r11: u64,
    /// R12.
    pub r12: u64,
    /// R13.
    pub r13: u64,
    /// R14.
    pub r14: u64,
    /// R15.
    pub r15: u64,
}

impl Gprs {
    /// The register an instruction encodes as `index` (0 = RAX ... 15 = R15), to read or
    /// write in place; `None` for 4 (RSP lives in the VMCS/VMCB, [`Vcpu::rsp`]) and numbers
    /// above 15.
    pub fn slot(&mut self, index: u8) -> Option<&mut u64> {
        Some(match index {
            0 => &mut self.rax,
            1 => &mut self.rcx,
            2 => &mut self.rdx,
            3 => &mut self.rbx,
            5 => &mut self.rbp,
            6 => &mut self.rsi,
            7 => &mut self.rdi,
            8 => &mut self.r8,
            9 => &mut self.r9,
            10 => &mut self.r10,
            11 => &mut self.r11,
            12 => &mut self.r12,
            13 => &mut self.r13,
            14 => &mut self.r14,
            15 => &mut self.r15,
            _ => return None,
        })
    }
}

/// How a vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartMode {
    /// 64-bit long mode: CR0.PE|PG, CR4.PAE, EFER.LME|LMA, flat 64-bit code (selector 0x08) and
    /// data (0x10) segments, paging rooted at guest-physical `cr3`, interrupts disabled.
    Long64 {
        /// Entry point (guest-virtual, identity-mapped).
        rip: u64,
        /// Initial stack pointer.
        rsp: u64,
        /// Guest-physical address of the PML4.
        cr3: u64,
        /// Passed in RSI (a boot-parameter pointer, as in the Linux 64-bit boot protocol).
        rsi: u64,
    },
    /// 32-bit protected mode, paging off, flat 4 GiB code (0x08) and data (0x10) segments: the
    /// multiboot entry state.
    Protected32 {
        /// Entry point.
        eip: u32,
        /// Initial EAX (the multiboot magic).
        eax: u32,
        /// Initial EBX (the multiboot information address).
        ebx: u32,
    },
    /// Real mode at `cs:ip` (segment base `cs << 4`), as after reset but with a chosen entry.
    Real {
        /// Code segment.
        cs: u16,
        /// Instruction pointer.
        ip: u16,
    },
}

/// A port I/O exit, decoded by the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoExit {
    /// Port number.
    pub port: u16,
    /// Access width in bytes: 1, 2 or 4.
    pub size: u8,
    /// OUT/OUTS (true) or IN/INS (false).
    pub write: bool,
    /// INS/OUTS: data goes to or from memory at ES:RDI / DS:RSI.
    pub string: bool,
    /// REP prefix: RCX holds the count.
    pub rep: bool,
}

/// A segment register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
}

/// [`Exit::CrAccess`] without the register: the instruction must be decoded.
pub const CR_SOURCE_UNKNOWN: u8 = 0xff;

/// RSP's number in instruction encodings: it lives in the control structure, not in [`Gprs`].
const RSP_INDEX: u8 = 4;

/// Why the guest stopped running, independent of VMX or SVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// CPUID: leaf in EAX, subleaf in ECX.
    Cpuid,
    /// RDMSR: MSR number in ECX.
    Rdmsr,
    /// WRMSR: MSR number in ECX, value in EDX:EAX.
    Wrmsr,
    /// HLT.
    Hlt,
    /// XSETBV: XCR number in ECX, value in EDX:EAX.
    Xsetbv,
    /// Port I/O.
    Io(IoExit),
    /// A guest-physical access the second-level tables do not allow (EPT violation / NPF):
    /// MMIO, or a stray access.
    NestedFault {
        /// Guest-physical address.
        gpa: u64,
        /// The access was a write.
        write: bool,
        /// The access was an instruction fetch.
        fetch: bool,
    },
    /// The guest can now take an interrupt (requested with [`Vcpu::set_interrupt_window_exiting`]).
    InterruptWindow,
    /// A host interrupt arrived while the guest ran.
    ExternalInterrupt,
    /// An NMI of the host's platform arrived while the guest ran (not one meant for the
    /// guest: those are virtual). The host takes it; the guest goes on.
    HostNmi,
    /// PAUSE in a spin loop (requested with [`Vcpu::exit_on_spin_loops`]). RIP is at the PAUSE
    /// or past it, as the backend chose; either way the guest just goes on (PAUSE only waits).
    Pause,
    /// INVD: it would throw away dirty cache lines, the host's among them.
    Invd,
    /// MONITOR or MWAIT: never offered (CPUID hides them), and natively MWAIT would idle the
    /// host CPU inside the guest.
    MonitorMwait,
    /// RDPMC: no PMU is offered, and natively it would read the host's counters.
    Rdpmc,
    /// VMCALL or VMMCALL: a hypercall (the KVM ABI: number in RAX, result back in RAX).
    Hypercall,
    /// Another VMX or SVM instruction (VMXON, VMRUN, INVEPT, INVLPGA, ...): virtualization is
    /// not offered to guests, so they are undefined (#UD).
    VirtualizationInstruction,
    /// MOV to or from a control register that the backend intercepts.
    CrAccess {
        /// Control register number.
        cr: u8,
        /// MOV to CR (true) or from CR (false).
        write: bool,
        /// The general-purpose register operand (0 = RAX ... 15 = R15), or
        /// [`CR_SOURCE_UNKNOWN`]: the run loop decodes the instruction (SVM without decode
        /// assists, CLTS, LMSW).
        gpr: u8,
    },
    /// Triple fault (VMX) or shutdown intercept (SVM): the VM cannot continue.
    TripleFault,
    /// VM entry failed; the backend logged the decoded reason.
    EntryFailed {
        /// VMX VM-instruction error / SVM VMEXIT_INVALID.
        code: u64,
    },
    /// The backend cannot run this vCPU on (its control structure misbehaved): fatal to the VM.
    BackendFailed {
        /// What went wrong.
        what: &'static str,
    },
    /// Anything else: the raw exit reason, reported and fatal to the VM.
    Unhandled {
        /// VMX basic exit reason or SVM exit code.
        reason: u64,
        /// Exit qualification (VMX) or EXITINFO1 (SVM).
        info: u64,
    },
}

impl Exit {
    /// A short name for exit statistics.
    pub fn kind(&self) -> &'static str {
        match self {
            Exit::Cpuid => "cpuid",
            Exit::Rdmsr => "rdmsr",
            Exit::Wrmsr => "wrmsr",
            Exit::Hlt => "hlt",
            Exit::Xsetbv => "xsetbv",
            Exit::Io(io) if io.string => "io-string",
            Exit::Io(_) => "io",
            Exit::NestedFault { .. } => "nested-fault",
            Exit::InterruptWindow => "interrupt-window",
            Exit::ExternalInterrupt => "external-interrupt",
            Exit::HostNmi => "host-nmi",
            Exit::Pause => "pause",
            Exit::Invd => "invd",
            Exit::MonitorMwait => "monitor-mwait",
            Exit::Rdpmc => "rdpmc",
            Exit::Hypercall => "hypercall",
            Exit::VirtualizationInstruction => "vmx-svm-instruction",
            Exit::CrAccess { .. } => "cr-access",
            Exit::TripleFault => "triple-fault",
            Exit::EntryFailed { .. } => "entry-failed",
            Exit::BackendFailed { .. } => "backend-failed",
            Exit::Unhandled { .. } => "unhandled",
        }
    }
}

/// The segment and mode facts exit handlers need to interpret guest state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestMode {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
    /// CS.L: 64-bit code.
    pub long_code: bool,
    /// CS.D: 32-bit default operand size (outside 64-bit code).
    pub default_32: bool,
    /// CS base (for real and protected mode).
    pub cs_base: u64,
    /// Current privilege level (SS.DPL; 0 in real mode).
    pub cpl: u8,
}

impl GuestMode {
    /// The linear address of the instruction at `rip`: CS-relative outside 64-bit code, where
    /// linear addresses have 32 bits.
    pub fn code_address(&self, rip: u64) -> u64 {
        if self.long_code {
            rip
        } else {
            self.cs_base.wrapping_add(rip) & 0xffff_ffff
        }
    }
}

/// One virtual CPU on one hardware backend. Not `Send`: a VMCS/VMCB is bound to the physical
/// CPU that loaded it.
pub trait Vcpu {
    /// Enters the guest and runs it until the next exit.
    fn run(&mut self) -> Exit;
    /// The general-purpose registers (valid between exits; written back on the next entry).
    fn gprs(&mut self) -> &mut Gprs;
    /// Guest RIP.
    fn rip(&self) -> u64;
    /// Sets guest RIP.
    fn set_rip(&mut self, rip: u64);
    /// Guest RSP.
    fn rsp(&self) -> u64;
    /// Sets guest RSP.
    fn set_rsp(&mut self, rsp: u64);
    /// General-purpose register `index` in encoding order (0 = RAX ... 4 = RSP ... 15 = R15);
    /// other indexes read as 0.
    fn register(&mut self, index: u8) -> u64 {
        if index == RSP_INDEX {
            self.rsp()
        } else {
            self.gprs().slot(index).map_or(0, |r| *r)
        }
    }
    /// Sets general-purpose register `index` (as [`Vcpu::register`]; other indexes are ignored).
    fn set_register(&mut self, index: u8, value: u64) {
        if index == RSP_INDEX {
            self.set_rsp(value);
        } else if let Some(r) = self.gprs().slot(index) {
            *r = value;
        }
    }
    /// Guest RFLAGS.
    fn rflags(&self) -> u64;
    /// Control registers, EFER and code-segment mode.
    fn mode(&self) -> GuestMode;
    /// Moves RIP past the instruction that caused the last exit and returns true, or returns
    /// false when the backend does not know the instruction's length (SVM without NRIP-save,
    /// where a redundant prefix makes it longer than its opcode): the run loop then decodes it.
    fn skip_instruction(&mut self) -> bool;
    /// Loads a guest EFER the run loop validated ([`crate::vm::control_regs::efer_write`]); the
    /// backend adds what it needs underneath (SVME on SVM, the IA-32e entry control on VMX).
    fn set_efer(&mut self, efer: u64);
    /// Loads a guest CR0 the run loop validated ([`crate::vm::control_regs::cr0_write`]) after a
    /// [`Exit::CrAccess`] write; the backend keeps the bits it forces underneath (VMX: NE) and
    /// moves EFER.LMA with PG as the CPU would.
    fn set_cr0(&mut self, cr0: u64);
    /// Sets the guest's CR2 (for a page fault the run loop injects).
    fn set_cr2(&mut self, cr2: u64);
    /// The base address of a data segment register (for string I/O outside 64-bit mode, and
    /// FS/GS in it).
    fn segment_base(&self, segment: Segment) -> u64;
    /// Loads a guest CR4 the run loop validated ([`crate::vm::control_regs::cr4_write`]).
    fn set_cr4(&mut self, cr4: u64);
    /// The MSR model accepted a guest's write of `value` to `msr`: a backend that keeps that MSR
    /// in its control structure or loads it into the CPU itself (SVM: PAT, TSC_AUX) takes it.
    fn msr_written(&mut self, _msr: u32, _value: u64) {}
    /// Queues an exception for the next entry.
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>);
    /// Whether an external interrupt can be injected now (RFLAGS.IF set, no interrupt shadow,
    /// nothing else pending).
    fn interrupts_open(&self) -> bool;
    /// Queues an external interrupt for the next entry; call only when [`Self::interrupts_open`].
    fn inject_interrupt(&mut self, vector: u8);
    /// Injects an NMI at the next entry; false (nothing injected) while the guest is still
    /// handling the previous one (NMIs are blocked until its IRET).
    fn inject_nmi(&mut self) -> bool;
    /// Requests (or stops requesting) an [`Exit::InterruptWindow`] when interrupts open.
    fn set_interrupt_window_exiting(&mut self, on: bool);
    /// Sets the guest's XCR0 (already validated by [`valid_xcr0`]); the world switch loads it
    /// around guest execution.
    fn set_xcr0(&mut self, xcr0: u64);
    /// The guest's XCR0.
    fn xcr0(&self) -> u64;
    /// CR8 as the guest may have written it without an exit (SVM: V_TPR, which
    /// V_INTR_MASKING keeps apart from the host's TPR); `None` where every CR8 access exits
    /// (VMX). The run loop copies it into the local APIC's TPR[7:4] after each exit.
    fn guest_cr8(&self) -> Option<u8> {
        None
    }
    /// Gives the guest CR8 (TPR[7:4] of its local APIC) for its next entry; see [`Self::guest_cr8`].
    fn set_guest_cr8(&mut self, _cr8: u8) {}
    /// From now on PAUSE in a spin loop exits ([`Exit::Pause`]; SVM: the PAUSE intercept, with
    /// the pause filter where the CPU has one; VMX: PAUSE-loop exiting where the CPU has it).
    /// For vCPUs that wait for one another: the one spinning gives its CPU to the one it waits
    /// for.
    fn exit_on_spin_loops(&mut self) {}
    /// Lets go of the host CPU that ran the vCPU last, so any CPU may run it next (VMX clears
    /// its VMCS there, and the guest's extended state is saved). Call before the vCPU goes back
    /// to the scheduler.
    fn leave_cpu(&mut self) {}
}

/// XCR0 bits: x87, SSE, AVX (Intel SDM Vol. 1, 13.3).
pub const XCR0_X87: u64 = 1 << 0;
/// SSE state.
pub const XCR0_SSE: u64 = 1 << 1;
/// AVX state.
pub const XCR0_AVX: u64 = 1 << 2;

/// Whether XSETBV may load `value` into XCR0, given the bits the CPU supports (CPUID 0xD EAX):
/// x87 must stay on, AVX needs SSE, and nothing unsupported.
pub fn valid_xcr0(value: u64, supported: u64) -> bool {
    value & XCR0_X87 != 0 && value & !supported == 0 && (value & XCR0_AVX == 0 || value & XCR0_SSE != 0)
}

/// A one-line description of an exit for logs.
impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Io(io) => write!(
                f,
                "{} port {:#x} size {}{}{}",
                if io.write { "out" } else { "in" },
                io.port,
                io.size,
                if io.string { " string" } else { "" },
                if io.rep { " rep" } else { "" }
            ),
            Exit::NestedFault { gpa, write, fetch } => write!(
                f,
                "nested page fault at gpa {gpa:#x} ({})",
                if *fetch {
                    "fetch"
                } else if *write {
                    "write"
                } else {
                    "read"
                }
            ),
            Exit::EntryFailed { code } => write!(f, "VM entry failed (code {code:#x})"),
            Exit::Unhandled { reason, info } => write!(f, "unhandled exit reason {reason:#x} (info {info:#x})"),
            other => f.write_str(other.kind()),
        }
    }
}
