//! AMD SVM backend: VMCB with nested paging, ASIDs, I/O and MSR permission maps, and a VMRUN
//! world switch with VMLOAD/VMSAVE. Works without NRIP-save (QEMU TCG has none).

mod vmcb;

use core::arch::global_asm;
use core::fmt;
use core::marker::PhantomData;

use raw_cpuid::cpuid;
use x86_64::registers::model_specific::Msr;

use self::vmcb::{control, misc1, misc2, save};
use super::debug_regs::DebugRegs;
use super::memory;
use super::xstate::XState;
use crate::exit_decode;
use crate::mm::frames::FRAME_SIZE;
use crate::mm::tlb_tags::Tag;
use crate::vcpu::{Exit, Gprs, GuestMode, Segment, StartMode, Vcpu};
use crate::vm::control_regs::{CR0_PG, EFER_LMA, EFER_LME};

const MSR_EFER: u32 = 0xc000_0080;
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
const MSR_PAT: u32 = 0x277;
/// Read by RDTSCP and RDPID without an exit; not in the VMCB, so switched by hand.
const MSR_TSC_AUX: u32 = 0xc000_0103;
const EFER_SVME: u64 = 1 << 12;
/// TLB_CONTROL: flush the TLB on the next VMRUN (1 works on every CPU; 3, this ASID only,
/// needs FlushByAsid).
const TLB_FLUSH_ALL: u8 = 1;

/// MSRs the guest reads and writes directly: all of them live in the VMCB (switched by
/// VMRUN/VMLOAD/VMSAVE), and the host never relies on them.
const PASS_THROUGH_MSRS: [u32; 10] = [
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
    0xc000_0102, // KERNEL_GS_BASE
];

/// Why SVM could not be set up.
#[derive(Debug)]
pub enum SvmError {
    /// CPUID does not report SVM with NPT.
    Unsupported,
    /// Host memory for the VMCB, maps or save areas ran out.
    OutOfMemory,
}

impl fmt::Display for SvmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SvmError::Unsupported => f.write_str("SVM with nested paging is not available"),
            SvmError::OutOfMemory => f.write_str("out of host memory for SVM structures"),
        }
    }
}

struct Features {
    nrip_save: bool,
    /// The CPU has TSC_AUX (RDTSCP or RDPID).
    tsc_aux: bool,
    /// The PAUSE intercept can wait for a count of PAUSEs (and reset it after a gap).
    pause_filter: bool,
    pause_filter_threshold: bool,
}

static FEATURES: spin::Once<Features> = spin::Once::new();

/// Turns SVM on for this CPU: EFER.SVME and the host save area.
pub fn enable() -> Result<(), SvmError> {
    let svm = cpuid!(0x8000_0001).ecx & (1 << 2) != 0;
    if !svm || cpuid!(0x8000_000a).edx & 1 == 0 {
        return Err(SvmError::Unsupported);
    }
    let host_save = memory::alloc_zeroed(1, FRAME_SIZE).ok_or(SvmError::OutOfMemory)?;
    // SAFETY: SVM is present (checked above) and VM_CR.SVMDIS was found clear by the CPU report
    // (`virt::SvmCaps::verdict`), so setting EFER.SVME is allowed; HSAVE_PA gets a frame that
    // belongs to the CPU from now on.
    unsafe {
        let mut efer = Msr::new(MSR_EFER);
        efer.write(efer.read() | EFER_SVME);
        Msr::new(MSR_VM_HSAVE_PA).write(host_save);
    }
    // Zero, as every vCPU's TSC_AUX starts: the per-CPU cache below then tells the truth.
    let tsc_aux = cpuid!(0x8000_0001).edx & (1 << 27) != 0 || cpuid!(7, 0).ecx & (1 << 22) != 0;
    if tsc_aux {
        // SAFETY: the CPU reports RDTSCP or RDPID, so TSC_AUX exists; the host never reads it.
        unsafe { Msr::new(MSR_TSC_AUX).write(0) };
    }
    let svm_features = cpuid!(0x8000_000a).edx;
    FEATURES.call_once(|| Features {
        nrip_save: svm_features & (1 << 3) != 0,
        tsc_aux,
        pause_filter: svm_features & (1 << 10) != 0,
        pause_filter_threshold: svm_features & (1 << 12) != 0,
    });
    Ok(())
}

/// Frames of a control structure (VMCB, permission maps), reached through the physical-memory
/// window and returned to the allocator when the vCPU goes away.
struct Page {
    phys: u64,
    frames: u64,
}

impl Drop for Page {
    fn drop(&mut self) {
        if let Err(e) = memory::free_frames(self.phys, self.frames) {
            log::error!("svm: freeing {} frames at {:#x}: {e}", self.frames, self.phys);
        }
    }
}

impl Page {
    fn new(frames: u64) -> Result<Self, SvmError> {
        memory::alloc_zeroed(frames, FRAME_SIZE).map(|phys| Page { phys, frames }).ok_or(SvmError::OutOfMemory)
    }

    fn ptr<T>(&self, offset: usize) -> *mut T {
        (memory::phys_map().virt(self.phys) as usize + offset) as *mut T
    }

    fn read<T: Copy>(&self, offset: usize) -> T {
        // SAFETY: offsets come from `vmcb` constants inside the 4 KiB page, naturally aligned,
        // and the page is owned by this vCPU.
        unsafe { core::ptr::read_volatile(self.ptr(offset)) }
    }

    fn write<T: Copy>(&self, offset: usize, value: T) {
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_volatile(self.ptr(offset), value) }
    }

    fn fill(&self, byte: u8) {
        // SAFETY: `self.frames` is the size this run was allocated with, and it is ours.
        unsafe { core::ptr::write_bytes(self.ptr::<u8>(0), byte, (self.frames * FRAME_SIZE) as usize) }
    }

    fn set_segment(&self, offset: usize, selector: u16, attrib: u16, limit: u32, base: u64) {
        self.write(offset, selector);
        self.write(offset + 2, attrib);
        self.write(offset + 4, limit);
        self.write(offset + 8, base);
    }
}

/// Segment attributes in the VMCB's compressed form: access byte, then AVL/L/DB/G in bits 8-11.
mod attrib {
    pub const CODE64: u16 = 0x029b;
    pub const CODE32: u16 = 0x0c9b;
    pub const DATA32: u16 = 0x0c93;
    pub const REAL_CODE: u16 = 0x009b;
    pub const REAL_DATA: u16 = 0x0093;
    pub const TSS64_BUSY: u16 = 0x008b;
    pub const LDT: u16 = 0x0082;
    pub const LONG: u16 = 1 << 9;
    pub const DEFAULT_32: u16 = 1 << 10;
}

/// A vCPU on SVM. Not `Send`: its VMCB state and host save area belong to this CPU.
pub struct SvmVcpu {
    vmcb: Page,
    host_area: Page,
    _iopm: Page,
    _msrpm: Page,
    gprs: Gprs,
    xstate: XState,
    /// The guest's DR0-DR3 (DR6 and DR7 live in the VMCB), swapped around every entry.
    debug: DebugRegs,
    /// Where the instruction of the last exit ends when the exit itself says so (I/O: EXITINFO2),
    /// for CPUs without NRIP-save.
    io_next_rip: Option<u64>,
    /// The host CPU this vCPU ran on last: elsewhere, its ASID's TLB entries may be stale.
    last_cpu: Option<usize>,
    /// The ASID is shared with other vCPUs (the pool ran out): flush it on every entry.
    shared_asid: bool,
    /// An injected NMI's handler has not returned yet (SVM does not tell: IRET is
    /// intercepted meanwhile).
    nmi_blocked: bool,
    /// The RIP of the NMI handler's IRET, intercepted before it ran: NMIs stay blocked until
    /// the guest is seen past it (as KVM does without vNMI).
    nmi_iret_at: Option<u64>,
    /// The guest's TSC_AUX, loaded into the CPU before entry when another value is there.
    tsc_aux: u64,
    /// An external interrupt handed to the CPU as a virtual interrupt (V_IRQ) that the guest
    /// has not taken yet. See [`SvmVcpu::deliver_virtual_interrupt`].
    virq_vector: Option<u8>,
    _not_send: PhantomData<*const ()>,
}

unsafe extern "C" {
    /// The world switch in `global_asm!` below.
    fn hv_svm_run(vmcb: u64, gprs: *mut Gprs, host_area: u64);
}

// rdi = guest VMCB, rsi = Gprs, rdx = host VMSAVE area (physical).
// Host FS/GS/TR/LDTR and syscall MSRs are parked with VMSAVE because VMLOAD replaces them.
global_asm!(
    ".global hv_svm_run",
    "hv_svm_run:",
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rsi",
    "push rdi",
    "push rdx",
    "clgi",
    // Host interrupts stay blocked by GIF until VMRUN; with IF set they exit the guest.
    "sti",
    "mov rax, rdx",
    "vmsave rax",
    "mov rax, [rsp + 8]",
    "mov rsi, [rsp + 16]",
    "mov rbx, [rsi + 8]",
    "mov rcx, [rsi + 16]",
    "mov rdx, [rsi + 24]",
    "mov rdi, [rsi + 40]",
    "mov rbp, [rsi + 48]",
    "mov r8, [rsi + 56]",
    "mov r9, [rsi + 64]",
    "mov r10, [rsi + 72]",
    "mov r11, [rsi + 80]",
    "mov r12, [rsi + 88]",
    "mov r13, [rsi + 96]",
    "mov r14, [rsi + 104]",
    "mov r15, [rsi + 112]",
    "mov rsi, [rsi + 32]",
    "vmload rax",
    "vmrun rax",
    "vmsave rax",
    "mov rax, [rsp + 16]",
    "mov [rax + 8], rbx",
    "mov [rax + 16], rcx",
    "mov [rax + 24], rdx",
    "mov [rax + 32], rsi",
    "mov [rax + 40], rdi",
    "mov [rax + 48], rbp",
    "mov [rax + 56], r8",
    "mov [rax + 64], r9",
    "mov [rax + 72], r10",
    "mov [rax + 80], r11",
    "mov [rax + 88], r12",
    "mov [rax + 96], r13",
    "mov [rax + 104], r14",
    "mov [rax + 112], r15",
    "mov rax, [rsp]",
    "vmload rax",
    "cli",
    "stgi",
    "add rsp, 24",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
);

impl SvmVcpu {
    /// A vCPU whose guest-physical memory is described by the NPT rooted at `npt_root`.
    pub fn new(npt_root: u64, asid: Tag, start: StartMode) -> Result<Self, SvmError> {
        if FEATURES.get().is_none() {
            return Err(SvmError::Unsupported);
        }
        let vmcb = Page::new(1)?;
        let host_area = Page::new(1)?;
        // Every port and every MSR exits unless listed otherwise.
        let iopm = Page::new(3)?;
        iopm.fill(0xff);
        let msrpm = Page::new(2)?;
        msrpm.fill(0xff);
        for msr in PASS_THROUGH_MSRS {
            if let Some((byte, bit)) = msrpm_position(msr) {
                let old: u8 = msrpm.read(byte);
                msrpm.write(byte, old & !(0b11 << bit));
            }
        }

        // CR0 and CR4 writes: the run loop checks them against the CPU the guest is shown (the
        // CPU underneath may take patterns the guest's would refuse; QEMU's TCG takes nearly
        // any, and the next VMRUN then fails).
        vmcb.write(control::INTERCEPT_CR, 1u32 << 16 | 1u32 << 20);
        vmcb.write(control::INTERCEPT_MISC1, {
            use misc1::*;
            INTR | NMI | RDPMC | CPUID | INVD | HLT | INVLPGA | IOIO_PROT | MSR_PROT | SHUTDOWN
        });
        vmcb.write(control::INTERCEPT_MISC2, {
            use misc2::*;
            VMRUN | VMMCALL | VMLOAD | VMSAVE | STGI | CLGI | SKINIT | MONITOR | MWAIT | MWAIT_CONDITIONAL | XSETBV
        });
        vmcb.write(control::IOPM_BASE, iopm.phys);
        vmcb.write(control::MSRPM_BASE, msrpm.phys);
        vmcb.write(control::GUEST_ASID, asid.value);
        vmcb.write(control::V_INTR, V_INTR_MASKING);
        vmcb.write(control::NP_ENABLE, 1u64);
        vmcb.write(control::N_CR3, npt_root);
        vmcb.write(save::G_PAT, 0x0007_0406_0007_0406u64);
        vmcb.write(save::DR6, 0xffff_0ff0u64);
        vmcb.write(save::DR7, 0x400u64);
        vmcb.write(save::RFLAGS, 0x2u64);
        vmcb.write(save::CPL, 0u8);
        vmcb.set_segment(save::LDTR, 0, attrib::LDT, 0, 0);
        vmcb.set_segment(save::TR, 0, attrib::TSS64_BUSY, 0x67, 0);
        vmcb.set_segment(save::GDTR, 0, 0, 0xffff, 0);
        vmcb.set_segment(save::IDTR, 0, 0, 0, 0);
        let mut gprs = Gprs::default();
        match start {
            StartMode::Long64 { rip, rsp, cr3, rsi } => {
                vmcb.set_segment(save::CS, 0x08, attrib::CODE64, 0xffff_ffff, 0);
                for seg in [save::DS, save::ES, save::SS, save::FS, save::GS] {
                    vmcb.set_segment(seg, 0x10, attrib::DATA32, 0xffff_ffff, 0);
                }
                vmcb.write(save::CR0, 0x8000_0031u64); // PG | NE | ET | PE
                vmcb.write(save::CR3, cr3);
                vmcb.write(save::CR4, 1u64 << 5); // PAE
                vmcb.write(save::EFER, EFER_SVME | EFER_LMA | (1 << 8));
                vmcb.write(save::RIP, rip);
                vmcb.write(save::RSP, rsp);
                gprs.rsi = rsi;
            }
            StartMode::Protected32 { eip, eax, ebx } => {
                vmcb.set_segment(save::CS, 0x08, attrib::CODE32, 0xffff_ffff, 0);
                for seg in [save::DS, save::ES, save::SS, save::FS, save::GS] {
                    vmcb.set_segment(seg, 0x10, attrib::DATA32, 0xffff_ffff, 0);
                }
                vmcb.write(save::CR0, 0x31u64); // NE | ET | PE
                vmcb.write(save::CR4, 0u64);
                vmcb.write(save::EFER, EFER_SVME);
                vmcb.write(save::RIP, eip as u64);
                gprs.rax = eax as u64;
                gprs.rbx = ebx as u64;
            }
            StartMode::Real { cs, ip } => {
                vmcb.set_segment(save::CS, cs, attrib::REAL_CODE, 0xffff, (cs as u64) << 4);
                for seg in [save::DS, save::ES, save::SS, save::FS, save::GS] {
                    vmcb.set_segment(seg, 0, attrib::REAL_DATA, 0xffff, 0);
                }
                vmcb.write(save::CR0, 0x30u64); // NE | ET
                vmcb.write(save::CR4, 0u64);
                vmcb.write(save::EFER, EFER_SVME);
                vmcb.write(save::RIP, ip as u64);
            }
        }
        Ok(SvmVcpu {
            vmcb,
            host_area,
            _iopm: iopm,
            _msrpm: msrpm,
            gprs,
            xstate: XState::new().ok_or(SvmError::OutOfMemory)?,
            debug: DebugRegs::new(false),
            io_next_rip: None,
            last_cpu: None,
            shared_asid: asid.shared,
            nmi_blocked: false,
            nmi_iret_at: None,
            tsc_aux: 0,
            virq_vector: None,
            _not_send: PhantomData,
        })
    }

    /// One VMRUN and the raw decoding of its exit; `None` for exits handled here.
    fn run_once(&mut self) -> Option<Exit> {
        self.vmcb.write(save::RAX, self.gprs.rax);
        let cpu = super::percpu::current().index;
        if self.last_cpu != Some(cpu) || self.shared_asid {
            // Flush this ASID's entries on this CPU (APM Vol. 2, 15.16.1, TLB_CONTROL 1).
            self.vmcb.write(control::TLB_CONTROL, 1u8);
            self.last_cpu = Some(cpu);
        }
        self.load_tsc_aux();
        self.debug.enter_guest();
        self.xstate.enter_guest();
        // SAFETY: the VMCB passed the setup above (SVME set, VMRUN intercepted, ASID != 0,
        // valid maps), the host save area is set by `enable`, both pages are owned by this
        // vCPU, and `hv_svm_run` restores every callee-saved register. TSC_OFFSET stays 0:
        // guest time is the host's.
        unsafe { hv_svm_run(self.vmcb.phys, &mut self.gprs, self.host_area.phys) };
        self.xstate.leave_guest();
        self.debug.leave_guest();
        self.gprs.rax = self.vmcb.read(save::RAX);
        self.vmcb.write(control::TLB_CONTROL, 0u8);
        // A successful injection is consumed by VMRUN; one cut short is redelivered below.
        self.vmcb.write(control::EVENT_INJ, 0u64);
        let pending: u64 = self.vmcb.read(control::EXIT_INT_INFO);
        if pending & EVENT_VALID != 0 {
            if pending & EVENT_TYPE_MASK == EVENT_TYPE_INTR {
                self.deliver_virtual_interrupt(pending as u8);
            } else {
                self.vmcb.write(control::EVENT_INJ, pending);
            }
        }
        if self.virq_vector.is_some() && self.vmcb.read::<u64>(control::V_INTR) & V_IRQ == 0 {
            // The guest took it.
            self.virq_vector = None;
        }
        if self.nmi_iret_at.is_some_and(|rip| rip != self.rip()) {
            // The handler's IRET has run: the next NMI may come.
            self.nmi_iret_at = None;
            self.nmi_blocked = false;
        }

        let code: u64 = self.vmcb.read(control::EXIT_CODE);
        let info1: u64 = self.vmcb.read(control::EXIT_INFO1);
        let info2: u64 = self.vmcb.read(control::EXIT_INFO2);
        let exit = exit_decode::svm::decode(code, info1, info2);
        // Without NRIP-save only I/O exits say where their instruction ends.
        self.io_next_rip = matches!(exit, Exit::Io(_)).then_some(info2);
        match exit {
            Exit::ExternalInterrupt => {
                // The host interrupt that caused the exit is still pending: take it now.
                super::apic::take_pending_interrupt();
                Some(exit)
            }
            // Past it: without the pause filter every PAUSE exits, and one re-run would exit
            // again at once.
            Exit::Pause => {
                self.skip_one_byte_opcode(2);
                Some(exit)
            }
            // `STI; HLT` with an interrupt still in V_IRQ: the interrupt ends the halt at once,
            // as it would on a CPU that had delivered it before the HLT.
            Exit::Hlt if self.virq_vector.is_some() && self.rflags() & RFLAGS_IF != 0 => {
                self.skip_one_byte_opcode(1);
                None
            }
            Exit::InterruptWindow => {
                self.set_interrupt_window_exiting(false);
                Some(exit)
            }
            // The NMI handler returns: NMIs are open again once this IRET has run. The exit
            // comes before it does, so an NMI injected now would land inside the handler.
            Exit::Unhandled { reason: exit_decode::svm::IRET, .. } => {
                self.nmi_iret_at = Some(self.rip());
                self.intercept(misc1::IRET, false);
                Some(Exit::InterruptWindow)
            }
            Exit::EntryFailed { .. } => {
                self.report_invalid_state();
                Some(exit)
            }
            _ => Some(exit),
        }
    }

    /// Moves past PAUSE (`len` 2) or HLT (1) where the CPU does not say where they end: a
    /// redundant prefix before them makes the skip land on a shorter form of the same
    /// instruction (each prefix is one byte), which exits again and is skipped in turn.
    fn skip_one_byte_opcode(&mut self, len: u64) {
        if !self.skip_instruction() {
            self.set_rip(self.rip().wrapping_add(len));
        }
    }

    /// Hands an external interrupt to the CPU as a virtual interrupt (V_IRQ with its vector,
    /// not intercepted): the guest takes it as soon as RFLAGS.IF and its interrupt shadow
    /// allow, through its IDT, exactly like one injected through EVENTINJ.
    ///
    /// EVENTINJ is kept for exceptions and NMIs: QEMU's TCG (7.2, `helper_vmrun`) delivers
    /// an injected INTR but leaves its vector as the CPU's pending exception, and
    /// delivers it a second time, whatever IF says, if its CPU loop stops for another reason
    /// before the next #VMEXIT (often with several TCG CPUs). Linux then runs a device's or
    /// the timer's handler inside itself and deadlocks or double faults.
    fn deliver_virtual_interrupt(&mut self, vector: u8) {
        self.intercept(INTERCEPT_VINTR, false);
        let v_intr: u64 = self.vmcb.read(control::V_INTR);
        let v_intr = (v_intr & !V_INTR_VECTOR_MASK) | V_IRQ | V_IGN_TPR | V_INTR_PRIO_MAX | (vector as u64) << 32;
        self.vmcb.write(control::V_INTR, v_intr);
        self.virq_vector = Some(vector);
    }

    /// Sets or clears `bits` of the MISC1 intercepts.
    fn intercept(&mut self, bits: u32, on: bool) {
        let intercepts: u32 = self.vmcb.read(control::INTERCEPT_MISC1);
        self.vmcb.write(control::INTERCEPT_MISC1, if on { intercepts | bits } else { intercepts & !bits });
    }

    /// Puts this vCPU's TSC_AUX into the CPU if the last guest there left another value.
    fn load_tsc_aux(&self) {
        if !FEATURES.get().is_some_and(|f| f.tsc_aux) {
            return;
        }
        let cached = &super::percpu::current().guest_tsc_aux;
        if cached.load(core::sync::atomic::Ordering::Relaxed) != self.tsc_aux {
            // SAFETY: TSC_AUX exists (checked) and only guests read it.
            unsafe { Msr::new(MSR_TSC_AUX).write(self.tsc_aux) };
            cached.store(self.tsc_aux, core::sync::atomic::Ordering::Relaxed);
        }
    }

    /// VMRUN refused the VMCB: name the consistency check that fails (APM Vol. 2, 15.5.1).
    fn report_invalid_state(&self) {
        let efer: u64 = self.vmcb.read(save::EFER);
        let cr0: u64 = self.vmcb.read(save::CR0);
        let cr4: u64 = self.vmcb.read(save::CR4);
        let cs_attrib: u16 = self.vmcb.read(save::CS + 2);
        let asid: u32 = self.vmcb.read(control::GUEST_ASID);
        let check = if efer & EFER_SVME == 0 {
            "EFER.SVME is clear"
        } else if cr0 & (1 << 29) != 0 && cr0 & (1 << 30) == 0 {
            "CR0.NW set with CR0.CD clear"
        } else if cr0 >> 32 != 0 {
            "CR0 bits 63:32 set"
        } else if efer & (1 << 8) != 0 && cr0 & (1 << 31) != 0 && cr4 & (1 << 5) == 0 {
            "EFER.LME and CR0.PG set with CR4.PAE clear"
        } else if efer & (1 << 8) != 0
            && cr0 & (1 << 31) != 0
            && cs_attrib & attrib::LONG != 0
            && cs_attrib & attrib::DEFAULT_32 != 0
        {
            "CS.L and CS.D both set in long mode"
        } else if self.vmcb.read::<u64>(save::CR3) >> 52 != 0 {
            "CR3 bits 63:52 set"
        } else if asid == 0 {
            "guest ASID is 0"
        } else {
            "no known check matches (reserved bits in a control or state field?)"
        };
        let cr3: u64 = self.vmcb.read(save::CR3);
        log::error!(
            "svm: VMRUN failed with VMEXIT_INVALID: {check} (EFER {efer:#x}, CR0 {cr0:#x}, CR3 {cr3:#x}, CR4 {cr4:#x})"
        );
    }
}

const EVENT_VALID: u64 = 1 << 31;
const EVENT_ERROR_VALID: u64 = 1 << 11;
const EVENT_TYPE_MASK: u64 = 7 << 8;
const EVENT_TYPE_INTR: u64 = 0 << 8;
const EVENT_TYPE_NMI: u64 = 2 << 8;
const NMI_VECTOR: u64 = 2;
const EVENT_TYPE_EXCEPTION: u64 = 3 << 8;
const V_IRQ: u64 = 1 << 8;
const V_IGN_TPR: u64 = 1 << 20;
const V_INTR_PRIO_MAX: u64 = 0xf << 16;
const V_INTR_MASKING: u64 = 1 << 24;
const V_INTR_VECTOR_MASK: u64 = 0xff << 32;
/// V_TPR: the guest's CR8 (bits 3:0 in 64-bit mode).
const V_TPR_MASK: u64 = 0xf;
const RFLAGS_IF: u64 = 1 << 9;
const INTERCEPT_VINTR: u32 = misc1::VINTR;

/// Byte and bit of an MSR's read-intercept bit in the MSR permission map (the write bit
/// follows it), or `None` for MSRs outside the map's three ranges (always intercepted).
fn msrpm_position(msr: u32) -> Option<(usize, u32)> {
    let (base, first) = match msr {
        0..=0x1fff => (0, 0),
        0xc000_0000..=0xc000_1fff => (0x800, 0xc000_0000),
        0xc001_0000..=0xc001_1fff => (0x1000, 0xc001_0000),
        _ => return None,
    };
    let index = (msr - first) as usize * 2;
    Some((base + index / 8, (index % 8) as u32))
}

impl Vcpu for SvmVcpu {
    fn run(&mut self) -> Exit {
        loop {
            if let Some(exit) = self.run_once() {
                return exit;
            }
        }
    }

    fn gprs(&mut self) -> &mut Gprs {
        &mut self.gprs
    }

    fn rip(&self) -> u64 {
        self.vmcb.read(save::RIP)
    }

    fn set_rip(&mut self, rip: u64) {
        self.vmcb.write(save::RIP, rip);
        // Moving RIP past an instruction ends any STI/MOV SS shadow it created.
        self.vmcb.write(control::INTERRUPT_SHADOW, 0u64);
    }

    fn rsp(&self) -> u64 {
        self.vmcb.read(save::RSP)
    }

    fn set_rsp(&mut self, rsp: u64) {
        self.vmcb.write(save::RSP, rsp);
    }

    fn rflags(&self) -> u64 {
        self.vmcb.read(save::RFLAGS)
    }

    fn mode(&self) -> GuestMode {
        let cs_attrib: u16 = self.vmcb.read(save::CS + 2);
        GuestMode {
            cr0: self.vmcb.read(save::CR0),
            cr3: self.vmcb.read(save::CR3),
            cr4: self.vmcb.read(save::CR4),
            efer: self.vmcb.read::<u64>(save::EFER) & !EFER_SVME,
            long_code: cs_attrib & attrib::LONG != 0,
            default_32: cs_attrib & attrib::DEFAULT_32 != 0,
            cs_base: self.vmcb.read(save::CS + 8),
            cpl: self.vmcb.read::<u8>(save::CPL) & 3,
        }
    }

    fn skip_instruction(&mut self) -> bool {
        let next = if FEATURES.get().is_some_and(|f| f.nrip_save) {
            self.vmcb.read(control::NEXT_RIP)
        } else if let Some(next) = self.io_next_rip {
            next
        } else {
            return false;
        };
        self.set_rip(next);
        true
    }

    fn set_efer(&mut self, efer: u64) {
        // LMA is the CPU's; SVME must stay set under the guest for VMRUN.
        let lma = self.vmcb.read::<u64>(save::EFER) & EFER_LMA;
        self.vmcb.write(save::EFER, (efer & !EFER_LMA) | lma | EFER_SVME);
    }

    fn set_cr0(&mut self, cr0: u64) {
        self.vmcb.write(save::CR0, cr0);
        // Long mode turns on or off with paging when LME is set, as the CPU does.
        let efer: u64 = self.vmcb.read(save::EFER);
        if efer & EFER_LME != 0 {
            let lma = if cr0 & CR0_PG != 0 { EFER_LMA } else { 0 };
            self.vmcb.write(save::EFER, (efer & !EFER_LMA) | lma);
        }
        // A CR0 write may change paging, WP or caching: drop this ASID's translations.
        self.vmcb.write(control::TLB_CONTROL, TLB_FLUSH_ALL);
    }

    fn set_cr2(&mut self, cr2: u64) {
        self.vmcb.write(save::CR2, cr2);
    }

    fn segment_base(&self, segment: Segment) -> u64 {
        let selector_area = match segment {
            Segment::Es => save::ES,
            Segment::Cs => save::CS,
            Segment::Ss => save::SS,
            Segment::Ds => save::DS,
            Segment::Fs => save::FS,
            Segment::Gs => save::GS,
        };
        // A segment's VMCB entry: selector, attributes, limit, then the base at offset 8.
        self.vmcb.read(selector_area + 8)
    }

    fn set_cr4(&mut self, cr4: u64) {
        self.vmcb.write(save::CR4, cr4);
        // PGE, PAE, PCIDE, SMEP, LA57 and others change what translations mean.
        self.vmcb.write(control::TLB_CONTROL, TLB_FLUSH_ALL);
    }

    fn msr_written(&mut self, msr: u32, value: u64) {
        match msr {
            MSR_PAT => self.vmcb.write(save::G_PAT, value),
            // RDTSCP reads it without an exit: loaded before each entry.
            MSR_TSC_AUX => self.tsc_aux = value,
            _ => {}
        }
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        let mut event = EVENT_VALID | EVENT_TYPE_EXCEPTION | vector as u64;
        if let Some(code) = error_code {
            event |= EVENT_ERROR_VALID | (code as u64) << 32;
        }
        self.vmcb.write(control::EVENT_INJ, event);
    }

    fn interrupts_open(&self) -> bool {
        let shadow: u64 = self.vmcb.read(control::INTERRUPT_SHADOW);
        let queued: u64 = self.vmcb.read(control::EVENT_INJ);
        self.rflags() & RFLAGS_IF != 0 && shadow & 1 == 0 && queued & EVENT_VALID == 0 && self.virq_vector.is_none()
    }

    fn inject_interrupt(&mut self, vector: u8) {
        self.deliver_virtual_interrupt(vector);
    }

    fn inject_nmi(&mut self) -> bool {
        let queued: u64 = self.vmcb.read(control::EVENT_INJ);
        if self.nmi_iret_at.is_some() {
            // Exit again once the guest can take interrupts, by then mostly past the IRET.
            self.set_interrupt_window_exiting(true);
            return false;
        }
        if self.nmi_blocked || queued & EVENT_VALID != 0 {
            return false;
        }
        self.vmcb.write(control::EVENT_INJ, EVENT_VALID | EVENT_TYPE_NMI | NMI_VECTOR);
        self.nmi_blocked = true;
        self.intercept(misc1::IRET, true);
        true
    }

    fn set_interrupt_window_exiting(&mut self, on: bool) {
        if self.virq_vector.is_some() {
            // V_IRQ carries an interrupt already; the exit for its EOI offers the next one.
            return;
        }
        let v_intr: u64 = self.vmcb.read(control::V_INTR);
        // A virtual interrupt that is never taken makes the CPU exit with VINTR as soon as
        // the guest could take it.
        let v_intr = if on {
            (v_intr & !V_INTR_VECTOR_MASK) | V_IRQ | V_IGN_TPR | V_INTR_PRIO_MAX
        } else {
            v_intr & !(V_IRQ | V_IGN_TPR | V_INTR_PRIO_MAX)
        };
        self.intercept(INTERCEPT_VINTR, on);
        self.vmcb.write(control::V_INTR, v_intr);
    }

    fn set_xcr0(&mut self, xcr0: u64) {
        self.xstate.guest_xcr0 = xcr0;
    }

    fn guest_cr8(&self) -> Option<u8> {
        Some((self.vmcb.read::<u64>(control::V_INTR) & V_TPR_MASK) as u8)
    }

    fn set_guest_cr8(&mut self, cr8: u8) {
        let v_intr: u64 = self.vmcb.read(control::V_INTR);
        self.vmcb.write(control::V_INTR, (v_intr & !V_TPR_MASK) | u64::from(cr8) & V_TPR_MASK);
    }

    fn exit_on_spin_loops(&mut self) {
        let features = FEATURES.get();
        // KVM's defaults: exit after 3000 PAUSEs, counting anew after a gap of 128 cycles.
        // Without the filter (QEMU's TCG) every PAUSE exits.
        if features.is_some_and(|f| f.pause_filter) {
            self.vmcb.write(control::PAUSE_FILTER_COUNT, 3000u16);
        }
        if features.is_some_and(|f| f.pause_filter_threshold) {
            self.vmcb.write(control::PAUSE_FILTER_THRESHOLD, 128u16);
        }
        self.intercept(misc1::PAUSE, true);
    }

    fn leave_cpu(&mut self) {
        self.xstate.leave_cpu();
    }

    fn xcr0(&self) -> u64 {
        self.xstate.guest_xcr0
    }
}

impl SvmVcpu {
    /// XCR0 bits the guest may enable.
    pub fn supported_xcr0(&self) -> u64 {
        self.xstate.supported_xcr0()
    }
}
