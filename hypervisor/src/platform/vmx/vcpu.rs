//! One vCPU on one VMCS: control setup from the capability MSRs, host and guest state, the
//! bitmaps, and exit decoding into [`Exit`].

use alloc::boxed::Box;
use core::cell::Cell;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicU64, Ordering};

use raw_cpuid::cpuid;
use x86_64::instructions::tables::{sgdt, sidt};
use x86_64::registers::control::{Cr0, Cr2, Cr3, Cr4};

use super::fields::{natural, w16, w32, w64, Field, Natural, Readable, Width, W16, W32};
use super::instructions::{self as vmx, VmxError};
use super::switch::{self, SwitchState};
use super::{cap_msr, ept_vpid_cap, msr, rdmsr, revision_id};
use crate::exit_decode;
use crate::mm::frames::FRAME_SIZE;
use crate::mm::tlb_tags::Tag;
use crate::platform::debug_regs::DebugRegs;
use crate::platform::xstate::XState;
use crate::platform::{gdt, memory};
use crate::vcpu::{valid_xcr0, Exit, Gprs, GuestMode, Segment, StartMode, Vcpu};
use crate::virt::msr::IA32_VMX_BASIC;
use crate::vm::control_regs::{CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR0_TS, CR4_PAE, EFER_LMA, EFER_LME};

// Pin-based controls.
const PIN_EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
const PIN_NMI_EXITING: u32 = 1 << 3;
const PIN_VIRTUAL_NMIS: u32 = 1 << 5;
const PIN_PREEMPTION_TIMER: u32 = 1 << 6;
// Primary processor-based controls.
const PRIMARY_INTERRUPT_WINDOW_EXITING: u32 = 1 << 2;
const PRIMARY_NMI_WINDOW_EXITING: u32 = 1 << 22;
const PRIMARY_HLT_EXITING: u32 = 1 << 7;
const PRIMARY_MWAIT_EXITING: u32 = 1 << 10;
const PRIMARY_RDPMC_EXITING: u32 = 1 << 11;
const PRIMARY_MONITOR_EXITING: u32 = 1 << 29;
/// MOV to/from CR8 exit: without them the guest would read and write the host's own TPR.
const PRIMARY_CR8_LOAD_EXITING: u32 = 1 << 19;
const PRIMARY_CR8_STORE_EXITING: u32 = 1 << 20;
const PRIMARY_USE_IO_BITMAPS: u32 = 1 << 25;
const PRIMARY_USE_MSR_BITMAPS: u32 = 1 << 28;
const PRIMARY_ACTIVATE_SECONDARY: u32 = 1 << 31;
// Secondary processor-based controls.
const SECONDARY_ENABLE_EPT: u32 = 1 << 1;
const SECONDARY_ENABLE_RDTSCP: u32 = 1 << 3;
const SECONDARY_ENABLE_VPID: u32 = 1 << 5;
const SECONDARY_UNRESTRICTED_GUEST: u32 = 1 << 7;
const SECONDARY_PAUSE_LOOP_EXITING: u32 = 1 << 10;
const SECONDARY_ENABLE_INVPCID: u32 = 1 << 12;
const SECONDARY_ENABLE_XSAVES: u32 = 1 << 20;
// VM-exit controls.
const EXIT_HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
const EXIT_ACK_INTERRUPT_ON_EXIT: u32 = 1 << 15;
const EXIT_SAVE_PAT: u32 = 1 << 18;
const EXIT_LOAD_PAT: u32 = 1 << 19;
const EXIT_SAVE_EFER: u32 = 1 << 20;
const EXIT_LOAD_EFER: u32 = 1 << 21;
// VM-entry controls.
const ENTRY_IA32E_MODE_GUEST: u32 = 1 << 9;
const ENTRY_LOAD_PAT: u32 = 1 << 14;
const ENTRY_LOAD_EFER: u32 = 1 << 15;

// IA32_VMX_EPT_VPID_CAP.
const CAP_INVEPT: u64 = 1 << 20;
const CAP_INVEPT_SINGLE: u64 = 1 << 25;
const CAP_INVEPT_ALL: u64 = 1 << 26;
const CAP_INVVPID: u64 = 1 << 32;
const CAP_INVVPID_SINGLE: u64 = 1 << 41;
const CAP_INVVPID_ALL: u64 = 1 << 42;

const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_RESERVED_1: u64 = 1 << 1;

/// EPTP: write-back paging-structure memory type, 4-level walk (Intel SDM Vol. 3, 25.6.11).
const EPTP_WB_4_LEVEL: u64 = 6 | (3 << 3);
/// Interruption-information fields: valid bit, deliver-error-code bit, type shift.
const INTR_VALID: u32 = 1 << 31;
const INTR_DELIVER_ERROR_CODE: u32 = 1 << 11;
const INTR_TYPE_EXTERNAL: u32 = 0;
const INTR_TYPE_HARDWARE_EXCEPTION: u32 = 3;
/// Guest interruptibility: blocking by STI and by MOV SS.
const BLOCKING_STI_MOVSS: u32 = 0b11;
const BLOCKING_MOVSS: u32 = 0b10;
const BLOCKING_NMI: u32 = 1 << 3;
const INTR_TYPE_NMI: u32 = 2;
const NMI_VECTOR: u32 = 2;
/// A 64-bit-style reset PAT value (WB, WT, UC-, UC twice).
const GUEST_PAT_RESET: u64 = 0x0007_0406_0007_0406;
/// Segment access rights: unusable segment (bit 16).
const AR_UNUSABLE: u32 = 1 << 16;

// Basic exit reasons (Intel SDM Vol. 3, Appendix C).
const REASON_EXCEPTION_OR_NMI: u32 = exit_decode::vmx::EXCEPTION_OR_NMI;
const REASON_CR_ACCESS: u32 = exit_decode::vmx::CR_ACCESS;
const REASON_INVALID_GUEST_STATE: u32 = 33;
const REASON_MSR_LOADING: u32 = 34;
const REASON_MACHINE_CHECK: u32 = 41;
const REASON_EPT_VIOLATION: u32 = exit_decode::vmx::EPT_VIOLATION;
const REASON_PREEMPTION_TIMER: u32 = 52;
const REASON_EPT_MISCONFIG: u32 = exit_decode::vmx::EPT_MISCONFIG;
const EXIT_REASON_ENTRY_FAILURE: u32 = exit_decode::vmx::ENTRY_FAILURE;

/// The VMCS that is current on this CPU (0: none), so accessors VMPTRLD only when needed.
fn current_vmcs() -> &'static AtomicU64 {
    &crate::platform::percpu::current().current_vmcs
}

/// Adjusts a wanted control value to a capability MSR: bits the CPU requires are set, bits it
/// forbids are cleared; a needed control it forbids is an error that names it.
fn adjust(capability: u64, wanted: u32, needed: &[(u32, &'static str)]) -> Result<u32, VmxError> {
    let allowed0 = capability as u32;
    let allowed1 = (capability >> 32) as u32;
    if let Some(&(_, name)) = needed.iter().find(|&&(bit, _)| bit != 0 && allowed1 & bit == 0) {
        return Err(VmxError::ControlNotAllowed(name));
    }
    Ok((wanted | allowed0) & allowed1)
}

/// Host frames owned by one vCPU.
struct Frames {
    vmcs: u64,
    io_bitmaps: u64,
    msr_bitmap: u64,
    /// The guest's values of the MSRs it reaches without exits and the VMCS does not hold:
    /// stored here on every exit, loaded from here on every entry (one list for both).
    msr_area: u64,
}

/// Frames of each part, in `Frames` order.
const FRAME_COUNTS: [u64; 4] = [1, 2, 1, 1];

impl Frames {
    fn alloc() -> Result<Self, VmxError> {
        let mut got: [(u64, u64); 4] = [(0, 0); 4];
        for (slot, count) in got.iter_mut().zip(FRAME_COUNTS) {
            match memory::alloc_zeroed(count, FRAME_SIZE) {
                Some(phys) => *slot = (phys, count),
                None => {
                    for &(phys, count) in got.iter().filter(|(_, count)| *count != 0) {
                        let _ = memory::free_frames(phys, count);
                    }
                    return Err(VmxError::OutOfMemory);
                }
            }
        }
        Ok(Frames { vmcs: got[0].0, io_bitmaps: got[1].0, msr_bitmap: got[2].0, msr_area: got[3].0 })
    }

    fn free(&self) {
        for (phys, count) in [self.vmcs, self.io_bitmaps, self.msr_bitmap, self.msr_area].into_iter().zip(FRAME_COUNTS)
        {
            if let Err(e) = memory::free_frames(phys, count) {
                log::error!("vmx: freeing {count} frames at {phys:#x}: {e}");
            }
        }
    }
}

/// A vCPU backed by a VMCS on this CPU. Not `Send`/`Sync`: the VMCS is bound to this CPU.
pub struct VmxVcpu {
    frames: Frames,
    /// Boxed so the world switch's pointer to it stays valid when the vCPU moves.
    state: Box<SwitchState>,
    launched: bool,
    eptp: u64,
    vpid: u16,
    /// The guest's extended state and XCR0, swapped around every entry.
    xstate: XState,
    /// The guest's DR0-DR3 and DR6, swapped around every entry.
    debug: DebugRegs,
    /// CR0 and CR4 bits VMX forces to 1 under the guest (NE; VMXE): the guest/host masks give
    /// the guest its own view of them.
    cr0_forced: u64,
    cr4_forced: u64,
    /// The guest's CR2. The VMCS does not hold it: while the guest runs it is the CPU's, so it
    /// is loaded before every entry and saved after every exit, or a page fault's address
    /// would move to whichever vCPU this CPU runs next.
    guest_cr2: u64,
    interrupt_window_allowed: bool,
    /// NMI-window exiting may be set (needs virtual NMIs): the exit when the guest's NMI
    /// handler has returned and the next NMI can go in.
    nmi_window_allowed: bool,
    /// PAUSE-loop exiting may be set (for [`Vcpu::exit_on_spin_loops`]).
    pause_loop_exiting_allowed: bool,
    /// The VMX-preemption timer counts TSC >> this; `None` if the CPU has no such timer.
    preemption_timer_shift: Option<u32>,
    /// The host CPU whose state the host-state area holds and that ran the vCPU last.
    cpu: Option<usize>,
    /// The VPID is shared with other vCPUs (the pool ran out): flush it on every entry.
    shared_vpid: bool,
    /// A VMREAD or VMWRITE failed since the last entry: what was read may be wrong (a failed
    /// read gives 0, which would say "no event queued"), so the guest is not entered again.
    vmcs_access_failed: Cell<bool>,
    _not_send: PhantomData<*const ()>,
}

impl VmxVcpu {
    /// Creates a vCPU whose guest-physical memory is described by the EPT rooted at `ept_root`
    /// (a 4-level PML4, host-physical), tagged with `vpid` (0: no VPID), starting in `start`.
    /// [`super::enable`] must have succeeded on this CPU.
    pub fn new(ept_root: u64, vpid: Tag, start: StartMode) -> Result<Self, VmxError> {
        if !super::enabled() {
            return Err(VmxError::Unsupported("vmx::enable has not run on this CPU"));
        }
        if ept_root & 0xfff != 0 {
            return Err(VmxError::Unsupported("EPT root is not 4 KiB aligned"));
        }
        let frames = Frames::alloc()?;
        let xstate = match XState::new() {
            Some(xstate) => xstate,
            None => {
                frames.free();
                return Err(VmxError::OutOfMemory);
            }
        };
        let state = Box::new(SwitchState { gprs: Gprs::default() });
        let mut vcpu = VmxVcpu {
            frames,
            state,
            launched: false,
            eptp: ept_root | EPTP_WB_4_LEVEL,
            vpid: u16::try_from(vpid.value).unwrap_or(0),
            xstate,
            debug: DebugRegs::new(true),
            guest_cr2: 0,
            cr0_forced: 0,
            cr4_forced: 0,
            interrupt_window_allowed: false,
            nmi_window_allowed: false,
            pause_loop_exiting_allowed: false,
            preemption_timer_shift: None,
            cpu: None,
            shared_vpid: vpid.shared,
            vmcs_access_failed: Cell::new(false),
            _not_send: PhantomData,
        };
        // On error, Drop clears the VMCS and frees the frames.
        vcpu.setup(start)?;
        Ok(vcpu)
    }

    fn setup(&mut self, start: StartMode) -> Result<(), VmxError> {
        // SAFETY: the VMCS frame is ours and mapped; the revision id goes in its first dword.
        unsafe { core::ptr::write_volatile(memory::phys_map().virt(self.frames.vmcs) as *mut u32, revision_id()) };
        // SAFETY: VMX is on (checked in `new`), the region is ours and carries the revision id.
        unsafe { vmx::vmclear(self.frames.vmcs) }?;
        // SAFETY: as above; VMCLEAR initialised it.
        unsafe { vmx::vmptrld(self.frames.vmcs) }?;
        current_vmcs().store(self.frames.vmcs, Ordering::Relaxed);

        let unrestricted = self.setup_controls(start)?;
        self.setup_host()?;
        self.setup_guest(start, unrestricted)?;
        self.setup_bitmaps()?;
        self.flush_translations();
        self.cpu = Some(this_cpu());
        Ok(())
    }

    fn setup_controls(&mut self, start: StartMode) -> Result<bool, VmxError> {
        let true_controls = rdmsr(IA32_VMX_BASIC) & (1 << 55) != 0;
        let pick = |plain, true_msr| rdmsr(if true_controls { true_msr } else { plain });

        let pin_cap = pick(cap_msr::PINBASED_CTLS, cap_msr::TRUE_PINBASED_CTLS);
        // The host timer forces exits through external-interrupt exiting; where the CPU has the
        // VMX-preemption timer it is armed for the same deadline as well, so a guest is taken
        // off the CPU on time even where a host interrupt is late to arrive (Bochs delivers none
        // to a guest spinning with interrupts off).
        let preemption = (pin_cap >> 32) as u32 & PIN_PREEMPTION_TIMER;
        self.preemption_timer_shift = (preemption != 0).then(|| rdmsr(cap_msr::MISC) as u32 & 0x1f);
        // Virtual NMIs: with NMI exiting and without them, an NMI injected into the guest blocks
        // the CPU's real NMIs, and the guest's IRET never unblocks them (SDM Vol. 3, 25.3):
        // the vCPU would take one NMI ever and block the host's on every CPU it runs on.
        let virtual_nmis = (pin_cap >> 32) as u32 & PIN_VIRTUAL_NMIS;
        if virtual_nmis == 0 {
            log::warn!("vmx: no virtual NMIs on this CPU: each vCPU takes at most one NMI");
        }
        let pin = adjust(
            pin_cap,
            PIN_EXTERNAL_INTERRUPT_EXITING | PIN_NMI_EXITING | virtual_nmis | preemption,
            &[(PIN_EXTERNAL_INTERRUPT_EXITING, "external-interrupt exiting"), (PIN_NMI_EXITING, "NMI exiting")],
        )?;
        let primary_cap = pick(cap_msr::PROCBASED_CTLS, cap_msr::TRUE_PROCBASED_CTLS);
        self.interrupt_window_allowed = (primary_cap >> 32) as u32 & PRIMARY_INTERRUPT_WINDOW_EXITING != 0;
        self.nmi_window_allowed = virtual_nmis != 0 && (primary_cap >> 32) as u32 & PRIMARY_NMI_WINDOW_EXITING != 0;
        let primary = adjust(
            primary_cap,
            PRIMARY_HLT_EXITING
                | PRIMARY_MWAIT_EXITING
                | PRIMARY_RDPMC_EXITING
                | PRIMARY_MONITOR_EXITING
                | PRIMARY_CR8_LOAD_EXITING
                | PRIMARY_CR8_STORE_EXITING
                | PRIMARY_USE_IO_BITMAPS
                | PRIMARY_USE_MSR_BITMAPS
                | PRIMARY_ACTIVATE_SECONDARY,
            &[
                (PRIMARY_HLT_EXITING, "HLT exiting"),
                (PRIMARY_MWAIT_EXITING, "MWAIT exiting"),
                (PRIMARY_RDPMC_EXITING, "RDPMC exiting"),
                (PRIMARY_MONITOR_EXITING, "MONITOR exiting"),
                (PRIMARY_CR8_LOAD_EXITING, "CR8-load exiting"),
                (PRIMARY_CR8_STORE_EXITING, "CR8-store exiting"),
                (PRIMARY_USE_IO_BITMAPS, "use I/O bitmaps"),
                (PRIMARY_USE_MSR_BITMAPS, "use MSR bitmaps"),
                (PRIMARY_ACTIVATE_SECONDARY, "activate secondary controls"),
            ],
        )?;
        let secondary_cap = rdmsr(cap_msr::PROCBASED_CTLS2);
        let secondary_allowed = (secondary_cap >> 32) as u32;
        self.pause_loop_exiting_allowed = secondary_allowed & SECONDARY_PAUSE_LOOP_EXITING != 0;
        // Without these the guest would get #UD on RDTSCP/INVPCID/XSAVES: enable what exists.
        let mut wanted = SECONDARY_ENABLE_EPT
            | SECONDARY_UNRESTRICTED_GUEST
            | (secondary_allowed & (SECONDARY_ENABLE_RDTSCP | SECONDARY_ENABLE_INVPCID | SECONDARY_ENABLE_XSAVES));
        if self.vpid != 0 && secondary_allowed & SECONDARY_ENABLE_VPID != 0 {
            wanted |= SECONDARY_ENABLE_VPID;
        } else {
            self.vpid = 0;
        }
        let secondary = adjust(
            secondary_cap,
            wanted,
            &[(SECONDARY_ENABLE_EPT, "enable EPT"), (SECONDARY_UNRESTRICTED_GUEST, "unrestricted guest")],
        )?;
        let exit = adjust(
            pick(cap_msr::EXIT_CTLS, cap_msr::TRUE_EXIT_CTLS),
            EXIT_HOST_ADDRESS_SPACE_SIZE
                | EXIT_ACK_INTERRUPT_ON_EXIT
                | EXIT_SAVE_PAT
                | EXIT_LOAD_PAT
                | EXIT_SAVE_EFER
                | EXIT_LOAD_EFER,
            &[
                (EXIT_HOST_ADDRESS_SPACE_SIZE, "host address-space size"),
                (EXIT_ACK_INTERRUPT_ON_EXIT, "acknowledge interrupt on exit"),
                (EXIT_SAVE_PAT, "save IA32_PAT"),
                (EXIT_LOAD_PAT, "load IA32_PAT"),
                (EXIT_SAVE_EFER, "save IA32_EFER"),
                (EXIT_LOAD_EFER, "load IA32_EFER"),
            ],
        )?;
        let long = matches!(start, StartMode::Long64 { .. });
        let ia32e = if long { ENTRY_IA32E_MODE_GUEST } else { 0 };
        let entry = adjust(
            pick(cap_msr::ENTRY_CTLS, cap_msr::TRUE_ENTRY_CTLS),
            ENTRY_LOAD_PAT | ENTRY_LOAD_EFER | ia32e,
            &[(ENTRY_LOAD_PAT, "load IA32_PAT"), (ENTRY_LOAD_EFER, "load IA32_EFER"), (ia32e, "IA-32e mode guest")],
        )?;
        // The entry control must match EFER.LMA, whatever the capability MSR forced.
        let entry = if long { entry | ENTRY_IA32E_MODE_GUEST } else { entry & !ENTRY_IA32E_MODE_GUEST };

        self.put(w32::PIN_BASED_CONTROLS, pin)?;
        self.put(w32::PRIMARY_PROCESSOR_CONTROLS, primary)?;
        self.put(w32::SECONDARY_PROCESSOR_CONTROLS, secondary)?;
        self.put(w32::EXIT_CONTROLS, exit)?;
        self.put(w32::ENTRY_CONTROLS, entry)?;
        self.put(w32::EXCEPTION_BITMAP, 0)?;
        self.put(w32::PAGE_FAULT_ERROR_MASK, 0)?;
        self.put(w32::PAGE_FAULT_ERROR_MATCH, 0)?;
        self.put(w32::CR3_TARGET_COUNT, 0)?;
        self.put(w32::EXIT_MSR_STORE_COUNT, 0)?;
        self.put(w32::EXIT_MSR_LOAD_COUNT, 0)?;
        self.put(w32::ENTRY_MSR_LOAD_COUNT, 0)?;
        self.put(w32::ENTRY_INTERRUPTION_INFO, 0)?;
        self.put(w64::EPT_POINTER, self.eptp)?;
        if secondary & SECONDARY_ENABLE_VPID != 0 {
            self.put(w16::VPID, self.vpid)?;
        }
        Ok(secondary & SECONDARY_UNRESTRICTED_GUEST != 0)
    }

    fn setup_host(&mut self) -> Result<(), VmxError> {
        let selectors = gdt::selectors();
        let gdtr = sgdt();
        let idtr = sidt();
        let gdt_base = gdtr.base.as_u64();
        // The TSS descriptor is 16 bytes: base 15:0 at bytes 2-3, 23:16 at 4, 31:24 at 7, 63:32 at 8-11.
        let tss_desc = gdt_base + u64::from(selectors.tss.index()) * 8;
        // SAFETY: the descriptor lies inside the loaded GDT, a static that lives forever.
        let (low, high) = unsafe {
            (core::ptr::read_volatile(tss_desc as *const u64), core::ptr::read_volatile((tss_desc + 8) as *const u64))
        };
        let tr_base = ((low >> 16) & 0xff_ffff) | ((low >> 56) << 24) | ((high & 0xffff_ffff) << 32);
        let (cr3_frame, cr3_flags) = Cr3::read_raw();

        self.put(natural::HOST_CR0, Cr0::read_raw())?;
        self.put(natural::HOST_CR3, cr3_frame.start_address().as_u64() | u64::from(cr3_flags))?;
        self.put(natural::HOST_CR4, Cr4::read_raw())?;
        self.put(w16::HOST_CS_SELECTOR, selectors.code.0)?;
        for field in [w16::HOST_SS_SELECTOR, w16::HOST_DS_SELECTOR, w16::HOST_ES_SELECTOR] {
            self.put(field, selectors.data.0)?;
        }
        // FS/GS: the base comes from the base fields on exit, so any RPL-0 GDT selector works.
        self.put(w16::HOST_FS_SELECTOR, selectors.data.0)?;
        self.put(w16::HOST_GS_SELECTOR, selectors.data.0)?;
        self.put(w16::HOST_TR_SELECTOR, selectors.tss.0)?;
        self.put(natural::HOST_FS_BASE, rdmsr(msr::IA32_FS_BASE))?;
        self.put(natural::HOST_GS_BASE, rdmsr(msr::IA32_GS_BASE))?;
        self.put(natural::HOST_TR_BASE, tr_base)?;
        self.put(natural::HOST_GDTR_BASE, gdt_base)?;
        self.put(natural::HOST_IDTR_BASE, idtr.base.as_u64())?;
        self.put(w32::HOST_SYSENTER_CS, 0)?;
        self.put(natural::HOST_SYSENTER_ESP, 0)?;
        self.put(natural::HOST_SYSENTER_EIP, 0)?;
        self.put(w64::HOST_IA32_EFER, rdmsr(msr::IA32_EFER))?;
        self.put(w64::HOST_IA32_PAT, rdmsr(msr::IA32_PAT))?;
        self.put(natural::HOST_RIP, (&raw const switch::hv_vmx_exit) as u64)?;
        Ok(())
    }

    fn setup_guest(&mut self, start: StartMode, unrestricted: bool) -> Result<(), VmxError> {
        let cr0_fixed0 = rdmsr(cap_msr::CR0_FIXED0);
        let cr0_fixed1 = rdmsr(cap_msr::CR0_FIXED1);
        let cr4_fixed0 = rdmsr(cap_msr::CR4_FIXED0);
        let cr4_fixed1 = rdmsr(cap_msr::CR4_FIXED1);
        // Unrestricted guest exempts exactly PE and PG from CR0_FIXED0.
        let cr0_forced = if unrestricted { cr0_fixed0 & !(CR0_PE | CR0_PG) } else { cr0_fixed0 };

        type Segment = (Field<W16>, Field<Natural>, Field<W32>, Field<W32>);
        const ES: Segment =
            (w16::GUEST_ES_SELECTOR, natural::GUEST_ES_BASE, w32::GUEST_ES_LIMIT, w32::GUEST_ES_ACCESS_RIGHTS);
        const CS: Segment =
            (w16::GUEST_CS_SELECTOR, natural::GUEST_CS_BASE, w32::GUEST_CS_LIMIT, w32::GUEST_CS_ACCESS_RIGHTS);
        const SS: Segment =
            (w16::GUEST_SS_SELECTOR, natural::GUEST_SS_BASE, w32::GUEST_SS_LIMIT, w32::GUEST_SS_ACCESS_RIGHTS);
        const DS: Segment =
            (w16::GUEST_DS_SELECTOR, natural::GUEST_DS_BASE, w32::GUEST_DS_LIMIT, w32::GUEST_DS_ACCESS_RIGHTS);
        const FS: Segment =
            (w16::GUEST_FS_SELECTOR, natural::GUEST_FS_BASE, w32::GUEST_FS_LIMIT, w32::GUEST_FS_ACCESS_RIGHTS);
        const GS: Segment =
            (w16::GUEST_GS_SELECTOR, natural::GUEST_GS_BASE, w32::GUEST_GS_LIMIT, w32::GUEST_GS_ACCESS_RIGHTS);
        const LDTR: Segment =
            (w16::GUEST_LDTR_SELECTOR, natural::GUEST_LDTR_BASE, w32::GUEST_LDTR_LIMIT, w32::GUEST_LDTR_ACCESS_RIGHTS);
        const TR: Segment =
            (w16::GUEST_TR_SELECTOR, natural::GUEST_TR_BASE, w32::GUEST_TR_LIMIT, w32::GUEST_TR_ACCESS_RIGHTS);
        let segment = |(sel, base, limit, ar): Segment, s: u16, b: u64, l: u32, a: u32| -> Result<(), VmxError> {
            self.put(sel, s)?;
            self.put(base, b)?;
            self.put(limit, l)?;
            self.put(ar, a)
        };

        let (cr0, cr4, efer, rip, rsp, cr3, rsi) = match start {
            StartMode::Long64 { rip, rsp, cr3, rsi } => {
                segment(CS, 0x08, 0, 0xffff_ffff, 0xa09b)?;
                for seg in [ES, SS, DS, FS, GS] {
                    segment(seg, 0x10, 0, 0xffff_ffff, 0xc093)?;
                }
                segment(TR, 0, 0, 0x67, 0x8b)?;
                (CR0_PE | CR0_PG | CR0_ET | CR0_NE, CR4_PAE, EFER_LME | EFER_LMA, rip, rsp, cr3, rsi)
            }
            StartMode::Protected32 { eip, .. } => {
                segment(CS, 0x08, 0, 0xffff_ffff, 0xc09b)?;
                for seg in [ES, SS, DS, FS, GS] {
                    segment(seg, 0x10, 0, 0xffff_ffff, 0xc093)?;
                }
                segment(TR, 0, 0, 0x67, 0x8b)?;
                (CR0_PE | CR0_ET | CR0_NE, 0, 0, u64::from(eip), 0, 0, 0)
            }
            StartMode::Real { cs, ip } => {
                segment(CS, cs, u64::from(cs) << 4, 0xffff, 0x9b)?;
                for seg in [ES, SS, DS, FS, GS] {
                    segment(seg, 0, 0, 0xffff, 0x93)?;
                }
                segment(TR, 0, 0, 0xffff, 0x8b)?;
                (CR0_ET | CR0_NE, 0, 0, u64::from(ip), 0, 0, 0)
            }
        };
        segment(LDTR, 0, 0, 0, AR_UNUSABLE)?;
        self.state.gprs.rsi = rsi;
        if let StartMode::Protected32 { eax, ebx, .. } = start {
            self.state.gprs.rax = u64::from(eax);
            self.state.gprs.rbx = u64::from(ebx);
        }
        let cr0_wanted = cr0;
        let cr0 = (cr0 | cr0_forced) & cr0_fixed1;
        let cr4_wanted = cr4;
        let cr4 = (cr4 | cr4_fixed0) & cr4_fixed1;
        if matches!(start, StartMode::Long64 { .. }) && cr0 & (CR0_PE | CR0_PG) != CR0_PE | CR0_PG {
            return Err(VmxError::Unsupported("IA32_VMX_CR0_FIXED1 does not allow paging"));
        }

        self.put(natural::GUEST_CR0, cr0)?;
        self.put(natural::GUEST_CR3, cr3)?;
        self.put(natural::GUEST_CR4, cr4)?;
        // CR0 and CR4 belong to the host: the guest reads its own values from the shadows, and
        // every write that changes one exits, so the run loop checks it against the CPU the
        // guest is shown (the CPU underneath forces NE and VMXE, and may take patterns the
        // guest's would refuse). CR0.TS stays the guest's: CLTS need not exit.
        self.cr0_forced = cr0_forced;
        self.cr4_forced = cr4_fixed0;
        self.put(natural::CR0_GUEST_HOST_MASK, !CR0_TS)?;
        self.put(natural::CR0_READ_SHADOW, cr0_wanted)?;
        self.put(natural::CR4_GUEST_HOST_MASK, u64::MAX)?;
        self.put(natural::CR4_READ_SHADOW, cr4_wanted)?;
        self.put(w64::GUEST_IA32_EFER, efer)?;
        self.put(w64::GUEST_IA32_PAT, GUEST_PAT_RESET)?;
        self.put(w64::GUEST_IA32_DEBUGCTL, 0)?;
        self.put(natural::GUEST_DR7, 0x400)?;
        self.put(natural::GUEST_RIP, rip)?;
        self.put(natural::GUEST_RSP, rsp)?;
        self.put(natural::GUEST_RFLAGS, RFLAGS_RESERVED_1)?;
        self.put(natural::GUEST_GDTR_BASE, 0)?;
        self.put(w32::GUEST_GDTR_LIMIT, 0xffff)?;
        self.put(natural::GUEST_IDTR_BASE, 0)?;
        self.put(w32::GUEST_IDTR_LIMIT, 0xffff)?;
        self.put(w32::GUEST_INTERRUPTIBILITY, 0)?;
        self.put(w32::GUEST_ACTIVITY_STATE, 0)?;
        self.put(natural::GUEST_PENDING_DEBUG_EXCEPTIONS, 0)?;
        self.put(w32::GUEST_SYSENTER_CS, 0)?;
        self.put(natural::GUEST_SYSENTER_ESP, 0)?;
        self.put(natural::GUEST_SYSENTER_EIP, 0)?;
        self.put(w64::VMCS_LINK_POINTER, u64::MAX)?;
        Ok(())
    }

    fn setup_bitmaps(&mut self) -> Result<(), VmxError> {
        let map = memory::phys_map();
        // SAFETY: both I/O bitmap pages are ours (allocated in `Frames::alloc`) and mapped.
        let io = unsafe { core::slice::from_raw_parts_mut(map.virt(self.frames.io_bitmaps) as *mut u8, 8192) };
        // Every port exits: the devices above decide what a port does.
        io.fill(0xff);
        // SAFETY: the MSR bitmap page is ours and mapped.
        let msrs = unsafe { core::slice::from_raw_parts_mut(map.virt(self.frames.msr_bitmap) as *mut u8, 4096) };
        msrs.fill(0xff);
        // Pass-through MSRs: the host never uses them (no user mode, no SYSCALL/SYSENTER, no
        // FS/GS-based TLS, no RDTSCP), so the guest may own their hardware values. IA32_PAT is
        // switched by the VMCS (load/save PAT), so the guest may write it directly too.
        let passthrough = [msr::IA32_SYSENTER_CS..=msr::IA32_SYSENTER_EIP, msr::IA32_PAT..=msr::IA32_PAT]
            .into_iter()
            .chain([msr::IA32_STAR..=msr::IA32_FMASK, msr::IA32_FS_BASE..=msr::IA32_TSC_AUX]);
        // Read bitmap: low MSRs at 0, high at 1024; write bitmaps at +2048.
        let mut pass = |number: u32, halves: &[usize]| {
            let base = if number >= 0xc000_0000 { 1024 } else { 0 };
            let bit = (number & 0x1fff) as usize;
            for half in halves {
                msrs[base + half + bit / 8] &= !(1 << (bit % 8));
            }
        };
        for number in passthrough.flatten() {
            pass(number, &[0, 2048]);
        }
        // The pass-through MSRs that the VMCS does not switch (FS/GS base, SYSENTER and PAT it
        // does): each vCPU keeps its own values, so no VM reads what another wrote.
        let mut switched: alloc::vec::Vec<u32> =
            alloc::vec![msr::IA32_STAR, msr::IA32_LSTAR, msr::IA32_CSTAR, msr::IA32_FMASK, msr::IA32_KERNEL_GS_BASE,];
        if cpuid!(0x8000_0001).edx & (1 << 27) != 0 {
            switched.push(msr::IA32_TSC_AUX);
        }
        // Speculation control, which CPUID offers where the CPU has it (IBRS/IBPB): SPEC_CTRL
        // is the guest's while it runs and switched per vCPU (its bits only restrict
        // speculation, so a guest's value left in the host slows the host at worst); PRED_CMD
        // writes are the guest's own barrier (IBPB), its reads fault in the CPU.
        if cpuid!(7, 0).edx & (1 << 26) != 0 {
            pass(msr::IA32_SPEC_CTRL, &[0, 2048]);
            pass(msr::IA32_PRED_CMD, &[2048]);
            switched.push(msr::IA32_SPEC_CTRL);
        }
        // SAFETY: the MSR area is ours (allocated in `Frames::alloc`, zeroed) and mapped; each
        // entry is 16 bytes: index, reserved, value (SDM Vol. 3, 25.7.2), all values 0 at reset.
        let area = unsafe { core::slice::from_raw_parts_mut(map.virt(self.frames.msr_area) as *mut u32, 1024) };
        for (entry, &index) in area.as_chunks_mut::<4>().0.iter_mut().zip(&switched) {
            entry[0] = index;
        }
        self.put(w64::EXIT_MSR_STORE_ADDRESS, self.frames.msr_area)?;
        self.put(w64::ENTRY_MSR_LOAD_ADDRESS, self.frames.msr_area)?;
        self.put(w32::EXIT_MSR_STORE_COUNT, switched.len() as u32)?;
        self.put(w32::ENTRY_MSR_LOAD_COUNT, switched.len() as u32)?;
        self.put(w64::IO_BITMAP_A, self.frames.io_bitmaps)?;
        self.put(w64::IO_BITMAP_B, self.frames.io_bitmaps + FRAME_SIZE)?;
        self.put(w64::MSR_BITMAP, self.frames.msr_bitmap)
    }

    /// Drops stale translations of this EPT root and VPID (a previous user may have left some).
    fn flush_translations(&self) {
        let Some(cap) = ept_vpid_cap() else { return };
        if cap & CAP_INVEPT != 0 {
            let kind = if cap & CAP_INVEPT_SINGLE != 0 {
                Some(vmx::INVEPT_SINGLE_CONTEXT)
            } else if cap & CAP_INVEPT_ALL != 0 {
                Some(vmx::INVEPT_ALL_CONTEXTS)
            } else {
                None
            };
            if let Some(kind) = kind {
                // SAFETY: VMX root operation; the capability MSR reports this INVEPT type.
                if let Err(e) = unsafe { vmx::invept(kind, self.eptp) } {
                    log::warn!("vmx: {e}");
                }
            }
        }
        if self.vpid != 0 && cap & CAP_INVVPID != 0 {
            let kind = if cap & CAP_INVVPID_SINGLE != 0 {
                Some(vmx::INVVPID_SINGLE_CONTEXT)
            } else if cap & CAP_INVVPID_ALL != 0 {
                Some(vmx::INVVPID_ALL_CONTEXTS)
            } else {
                None
            };
            if let Some(kind) = kind {
                // SAFETY: VMX root operation; the type is supported and the VPID is not 0.
                if let Err(e) = unsafe { vmx::invvpid(kind, self.vpid) } {
                    log::warn!("vmx: {e}");
                }
            }
        }
    }

    /// Makes this vCPU's VMCS current on this CPU if another one is.
    fn activate(&self) {
        if current_vmcs().load(Ordering::Relaxed) != self.frames.vmcs {
            // SAFETY: VMX is on and the VMCS region is ours, initialised in `setup`.
            match unsafe { vmx::vmptrld(self.frames.vmcs) } {
                Ok(()) => current_vmcs().store(self.frames.vmcs, Ordering::Relaxed),
                Err(e) => log::error!("vmx: {e}"),
            }
        }
    }

    /// VMWRITE into this vCPU's VMCS.
    fn put<W: Width>(&self, field: Field<W>, value: W::Value) -> Result<(), VmxError> {
        self.activate();
        // SAFETY: VMX is on and our VMCS is current. Host-state, bitmap and EPT fields are only
        // written in `setup` with values computed there (our frames, the live host state);
        // guest-state fields only affect the guest, which EPT confines.
        unsafe { vmx::write(field, value) }
    }

    /// VMWRITE whose failure (a bug in a field encoding, not a guest problem) is logged and
    /// keeps the guest from being entered again.
    fn set<W: Width>(&self, field: Field<W>, value: W::Value) {
        if let Err(e) = self.put(field, value) {
            log::error!("vmx: writing VMCS field {:#x}: {e}", field.encoding());
            self.vmcs_access_failed.set(true);
        }
    }

    /// VMREAD from this vCPU's VMCS. A failure is logged, reads as 0 and keeps the guest from
    /// being entered again (fail closed: nothing decided on a wrong value reaches the guest).
    fn get<W: Width>(&self, field: impl Readable<W>) -> W::Value {
        self.activate();
        // SAFETY: VMX is on and our VMCS is current; reading has no side effects.
        match unsafe { vmx::read(field) } {
            Ok(value) => value,
            Err(e) => {
                log::error!("vmx: reading VMCS field {:#x}: {e}", field.encoding());
                self.vmcs_access_failed.set(true);
                W::Value::default()
            }
        }
    }

    /// The guest's view of CR4 (read shadow for host-owned bits).
    fn guest_cr0(&self) -> u64 {
        let mask = self.get(natural::CR0_GUEST_HOST_MASK);
        (self.get(natural::GUEST_CR0) & !mask) | (self.get(natural::CR0_READ_SHADOW) & mask)
    }

    fn guest_cr4(&self) -> u64 {
        let mask = self.get(natural::CR4_GUEST_HOST_MASK);
        (self.get(natural::GUEST_CR4) & !mask) | (self.get(natural::CR4_READ_SHADOW) & mask)
    }

    /// A general-purpose register by its instruction encoding (0 = RAX ... 4 = RSP ... 15 = R15).
    fn gpr(&self, index: u8) -> u64 {
        let g = &self.state.gprs;
        match index {
            0 => g.rax,
            1 => g.rcx,
            2 => g.rdx,
            3 => g.rbx,
            4 => self.get(natural::GUEST_RSP),
            5 => g.rbp,
            6 => g.rsi,
            7 => g.rdi,
            8 => g.r8,
            9 => g.r9,
            10 => g.r10,
            11 => g.r11,
            12 => g.r12,
            13 => g.r13,
            14 => g.r14,
            _ => g.r15,
        }
    }

    fn set_gpr(&mut self, index: u8, value: u64) {
        let g = &mut self.state.gprs;
        let slot = match index {
            0 => &mut g.rax,
            1 => &mut g.rcx,
            2 => &mut g.rdx,
            3 => &mut g.rbx,
            4 => return self.set(natural::GUEST_RSP, value),
            5 => &mut g.rbp,
            6 => &mut g.rsi,
            7 => &mut g.rdi,
            8 => &mut g.r8,
            9 => &mut g.r9,
            10 => &mut g.r10,
            11 => &mut g.r11,
            12 => &mut g.r12,
            13 => &mut g.r13,
            14 => &mut g.r14,
            _ => &mut g.r15,
        };
        *slot = value;
    }

    /// Handles exits the backend owns (CR3 moves); `true` if handled.
    fn handle_internally(&mut self, reason: u32, qualification: u64) -> bool {
        match reason {
            REASON_CR_ACCESS => {
                let cr = (qualification & 0xf) as u8;
                let access = (qualification >> 4) & 3;
                let gpr = ((qualification >> 8) & 0xf) as u8;
                match (cr, access) {
                    // Only with CR3-load/store exiting forced on by a CPU without true controls.
                    (3, 0) => {
                        let value = self.gpr(gpr) & !(1 << 63);
                        self.set(natural::GUEST_CR3, value);
                        self.skip_instruction();
                        true
                    }
                    (3, 1) => {
                        let value = self.get(natural::GUEST_CR3);
                        self.set_gpr(gpr, value);
                        self.skip_instruction();
                        true
                    }
                    _ => false,
                }
            }
            _ => false,
        }
    }

    /// An event cut short by the exit (IDT-vectoring information) is delivered again.
    fn reinject_interrupted_event(&self) {
        let info = self.get(w32::IDT_VECTORING_INFO);
        if info & INTR_VALID == 0 {
            return;
        }
        if info & INTR_DELIVER_ERROR_CODE != 0 {
            self.set(w32::ENTRY_EXCEPTION_ERROR_CODE, self.get(w32::IDT_VECTORING_ERROR_CODE));
        }
        // Software interrupts and exceptions (types 4-6) need the instruction length again.
        if matches!((info >> 8) & 7, 4..=6) {
            self.set(w32::ENTRY_INSTRUCTION_LENGTH, self.get(w32::EXIT_INSTRUCTION_LENGTH));
        }
        // Bit 12 is undefined in IDT-vectoring information and reserved on entry.
        self.set(w32::ENTRY_INTERRUPTION_INFO, info & !(1 << 12));
    }

    fn queue_event(&mut self, info: u32, error_code: Option<u32>) {
        if self.get(w32::ENTRY_INTERRUPTION_INFO) & INTR_VALID != 0 {
            log::warn!("vmx: replacing a queued event with {info:#x}");
        }
        if let Some(code) = error_code {
            self.set(w32::ENTRY_EXCEPTION_ERROR_CODE, code);
        }
        self.set(w32::ENTRY_INTERRUPTION_INFO, info | INTR_VALID);
    }

    fn log_entry_failure(&self, reason: u32, qualification: u64) {
        let what = match reason & 0xffff {
            REASON_INVALID_GUEST_STATE => match qualification {
                2 => "invalid guest state: PDPTE load failed",
                3 => "invalid guest state: NMI injection blocked",
                4 => "invalid guest state: invalid VMCS link pointer",
                _ => "invalid guest state: a guest-state check failed (SDM Vol. 3, 27.3.1)",
            },
            REASON_MSR_LOADING => "MSR loading failed (qualification: failing entry index)",
            REASON_MACHINE_CHECK => "machine-check event during entry",
            _ => "unknown entry failure",
        };
        log::error!(
            "vmx: VM entry failed: {what} (exit reason {reason:#x}, qualification {qualification:#x}); \
             guest CR0={:#x} CR3={:#x} CR4={:#x} EFER={:#x} CS={:#x} base {:#x} AR {:#x} RIP={:#x} \
             RFLAGS={:#x} entry controls {:#x}",
            self.get(natural::GUEST_CR0),
            self.get(natural::GUEST_CR3),
            self.get(natural::GUEST_CR4),
            self.get(w64::GUEST_IA32_EFER),
            self.get(w16::GUEST_CS_SELECTOR),
            self.get(natural::GUEST_CS_BASE),
            self.get(w32::GUEST_CS_ACCESS_RIGHTS),
            self.get(natural::GUEST_RIP),
            self.get(natural::GUEST_RFLAGS),
            self.get(w32::ENTRY_CONTROLS),
        );
    }

    /// One VM entry and exit; `None` when the backend handled the exit and the guest continues.
    fn run_once(&mut self) -> Option<Exit> {
        if self.vmcs_access_failed.get() {
            return Some(Exit::BackendFailed { what: "a VMCS field could not be read or written (logged above)" });
        }
        self.activate();
        let cpu = this_cpu();
        if self.cpu != Some(cpu) {
            // A new CPU: its GDT, TSS and GS base go into the host-state area, and whatever
            // this CPU's TLB holds for our tags predates us.
            if let Err(e) = self.setup_host() {
                log::error!("vmx: host state for CPU {cpu}: {e}");
            }
            self.flush_translations();
            self.cpu = Some(cpu);
        } else if self.shared_vpid {
            self.flush_translations();
        }
        if let Some(shift) = self.preemption_timer_shift {
            let deadline = crate::platform::percpu::current().timer_deadline_tsc.load(Ordering::Relaxed);
            let ticks = if deadline == 0 { u64::from(u32::MAX) } else { deadline.saturating_sub(rdtsc()) >> shift };
            self.set(w32::VMX_PREEMPTION_TIMER_VALUE, ticks.min(u64::from(u32::MAX)) as u32);
        }
        let state: *mut SwitchState = &mut *self.state;
        self.debug.enter_guest();
        self.xstate.enter_guest();
        load_cr2(self.guest_cr2);
        // SAFETY: VMX is on, our VMCS is current with complete host state (HOST_RIP is the exit
        // path of the same assembly, HOST_RSP is written by it), and `state` points at our
        // boxed switch state, which outlives the call.
        let result = unsafe { switch::hv_vmx_run(state, u64::from(self.launched)) };
        self.guest_cr2 = Cr2::read_raw();
        self.xstate.leave_guest();
        self.debug.leave_guest();
        if result != switch::SWITCH_EXITED {
            let code = if result == switch::SWITCH_FAIL_VALID { vmx::vm_instruction_error() } else { 0 };
            let instruction = if self.launched { "VMRESUME" } else { "VMLAUNCH" };
            if result == switch::SWITCH_FAIL_VALID {
                log::error!(
                    "vmx: {instruction} failed: VM-instruction error {code} ({})",
                    vmx::instruction_error_text(code)
                );
            } else {
                log::error!("vmx: {instruction} failed: VMfailInvalid (no current VMCS)");
            }
            return Some(Exit::EntryFailed { code: code.into() });
        }

        if crate::platform::exit::ending() {
            // Another CPU is ending the run; its NMI made this exit.
            crate::platform::exit::park();
        }
        let reason = self.get(w32::EXIT_REASON);
        let qualification = self.get(natural::EXIT_QUALIFICATION);
        if reason & EXIT_REASON_ENTRY_FAILURE != 0 {
            self.log_entry_failure(reason, qualification);
            return Some(Exit::EntryFailed { code: reason.into() });
        }
        self.launched = true;
        self.reinject_interrupted_event();
        if reason & 0xffff == REASON_PREEMPTION_TIMER {
            // The host's deadline, as its timer interrupt would have said.
            return Some(Exit::ExternalInterrupt);
        }
        if self.handle_internally(reason & 0xffff, qualification) {
            return None;
        }
        let basic = reason & 0xffff;
        let gpa = if basic == REASON_EPT_VIOLATION || basic == REASON_EPT_MISCONFIG {
            self.get(w64::GUEST_PHYSICAL_ADDRESS)
        } else {
            0
        };
        let interruption = if basic == REASON_EXCEPTION_OR_NMI || basic == exit_decode::vmx::EXTERNAL_INTERRUPT {
            self.get(w32::EXIT_INTERRUPTION_INFO)
        } else {
            0
        };
        let exit = exit_decode::vmx::decode(reason, qualification, gpa, interruption);
        match exit {
            // Either window: the run loop offers what is pending again, and asks anew.
            Exit::InterruptWindow => {
                self.set_interrupt_window_exiting(false);
                self.set_nmi_window_exiting(false);
            }
            Exit::ExternalInterrupt => {
                let vector = (interruption & INTR_VALID != 0).then_some(interruption as u8);
                // Acknowledged on exit: the host APIC timer (the only host interrupt) needs its
                // EOI here, as its handler never runs; spurious interrupts take none.
                if vector != Some(crate::platform::apic::SPURIOUS_VECTOR) {
                    crate::platform::apic::eoi();
                }
            }
            // The exit consumed the NMI and left NMIs blocked until the next IRET (which the
            // host, taking no interrupts through its IDT while guests run, might never
            // execute): the host's handler runs now, counts it and unblocks them.
            // SAFETY: `idt::init` installed the NMI gate (DPL 0) on every CPU; the handler
            // returns with IRET and touches no state of this code.
            Exit::HostNmi => unsafe { core::arch::asm!("int 2", options(nomem)) },
            Exit::Unhandled { .. } if basic == REASON_EPT_MISCONFIG => {
                log::error!("vmx: EPT misconfiguration at gpa {gpa:#x}");
            }
            _ => {}
        }
        Some(exit)
    }
}

impl VmxVcpu {
    /// Writes the guest's EFER; the IA-32e entry control follows its LMA.
    fn load_efer(&mut self, efer: u64) {
        self.set(w64::GUEST_IA32_EFER, efer);
        let entry = self.get(w32::ENTRY_CONTROLS);
        let entry = if efer & EFER_LMA != 0 { entry | ENTRY_IA32E_MODE_GUEST } else { entry & !ENTRY_IA32E_MODE_GUEST };
        self.set(w32::ENTRY_CONTROLS, entry);
    }

    /// Asks for an exit once the guest can take an NMI (where the CPU offers it; otherwise
    /// the NMI waits for the next exit).
    fn set_nmi_window_exiting(&mut self, on: bool) {
        if !self.nmi_window_allowed {
            return;
        }
        let primary = self.get(w32::PRIMARY_PROCESSOR_CONTROLS);
        let wanted = if on { primary | PRIMARY_NMI_WINDOW_EXITING } else { primary & !PRIMARY_NMI_WINDOW_EXITING };
        if wanted != primary {
            self.set(w32::PRIMARY_PROCESSOR_CONTROLS, wanted);
        }
    }
}

impl Vcpu for VmxVcpu {
    fn run(&mut self) -> Exit {
        loop {
            if let Some(exit) = self.run_once() {
                return exit;
            }
        }
    }

    fn gprs(&mut self) -> &mut Gprs {
        &mut self.state.gprs
    }

    fn rip(&self) -> u64 {
        self.get(natural::GUEST_RIP)
    }

    fn set_rip(&mut self, rip: u64) {
        self.set(natural::GUEST_RIP, rip);
    }

    fn rsp(&self) -> u64 {
        self.get(natural::GUEST_RSP)
    }

    fn set_rsp(&mut self, rsp: u64) {
        self.set(natural::GUEST_RSP, rsp);
    }

    fn rflags(&self) -> u64 {
        self.get(natural::GUEST_RFLAGS)
    }

    fn mode(&self) -> GuestMode {
        let cs_ar = self.get(w32::GUEST_CS_ACCESS_RIGHTS);
        GuestMode {
            cr0: self.guest_cr0(),
            cr3: self.get(natural::GUEST_CR3),
            cr4: self.guest_cr4(),
            efer: self.get(w64::GUEST_IA32_EFER),
            long_code: cs_ar & (1 << 13) != 0,
            default_32: cs_ar & (1 << 14) != 0,
            cs_base: self.get(natural::GUEST_CS_BASE),
            // SS.DPL is the CPL (SDM 24.4.1); real mode keeps it 0.
            cpl: ((self.get(w32::GUEST_SS_ACCESS_RIGHTS) >> 5) & 3) as u8,
        }
    }

    fn skip_instruction(&mut self) -> bool {
        let length = u64::from(self.get(w32::EXIT_INSTRUCTION_LENGTH));
        self.set(natural::GUEST_RIP, self.get(natural::GUEST_RIP).wrapping_add(length));
        // The emulated instruction ends any STI/MOV SS interrupt shadow, as executing it would.
        let interruptibility = self.get(w32::GUEST_INTERRUPTIBILITY);
        if interruptibility & BLOCKING_STI_MOVSS != 0 {
            self.set(w32::GUEST_INTERRUPTIBILITY, interruptibility & !BLOCKING_STI_MOVSS);
        }
        true
    }

    fn set_efer(&mut self, efer: u64) {
        // LMA is the CPU's (the run loop keeps it).
        let lma = self.get(w64::GUEST_IA32_EFER) & EFER_LMA;
        self.load_efer((efer & !EFER_LMA) | lma);
    }

    fn set_cr0(&mut self, cr0: u64) {
        self.set(natural::GUEST_CR0, cr0 | self.cr0_forced);
        self.set(natural::CR0_READ_SHADOW, cr0);
        // A CR0 write may change paging or WP: drop this guest's translations.
        self.flush_translations();
        // Long mode turns on or off with paging when LME is set, as the CPU does for the
        // CR0 writes that do not exit.
        let efer = self.get(w64::GUEST_IA32_EFER);
        if efer & EFER_LME != 0 {
            let lma = if cr0 & CR0_PG != 0 { EFER_LMA } else { 0 };
            self.load_efer((efer & !EFER_LMA) | lma);
        }
    }

    fn set_cr2(&mut self, cr2: u64) {
        self.guest_cr2 = cr2;
    }

    fn segment_base(&self, segment: Segment) -> u64 {
        self.get(match segment {
            Segment::Es => natural::GUEST_ES_BASE,
            Segment::Cs => natural::GUEST_CS_BASE,
            Segment::Ss => natural::GUEST_SS_BASE,
            Segment::Ds => natural::GUEST_DS_BASE,
            Segment::Fs => natural::GUEST_FS_BASE,
            Segment::Gs => natural::GUEST_GS_BASE,
        })
    }

    fn set_cr4(&mut self, cr4: u64) {
        self.set(natural::GUEST_CR4, cr4 | self.cr4_forced);
        self.set(natural::CR4_READ_SHADOW, cr4);
        // PGE, PCIDE, SMEP, LA57 and others change what translations mean.
        self.flush_translations();
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        // Entry checks (SDM Vol. 3, 27.2.1.3): an error code is delivered exactly for #DF, #TS,
        // #NP, #SS, #GP, #PF and #AC, and never in real mode.
        let protected = self.get(natural::GUEST_CR0) & CR0_PE != 0;
        let error_code = (protected && matches!(vector, 8 | 10..=14 | 17)).then(|| error_code.unwrap_or(0));
        let deliver = if error_code.is_some() { INTR_DELIVER_ERROR_CODE } else { 0 };
        self.queue_event(u32::from(vector) | INTR_TYPE_HARDWARE_EXCEPTION << 8 | deliver, error_code);
    }

    fn interrupts_open(&self) -> bool {
        self.rflags() & RFLAGS_IF != 0
            && self.get(w32::GUEST_INTERRUPTIBILITY) & BLOCKING_STI_MOVSS == 0
            && self.get(w32::ENTRY_INTERRUPTION_INFO) & INTR_VALID == 0
    }

    fn inject_interrupt(&mut self, vector: u8) {
        self.queue_event(u32::from(vector) | INTR_TYPE_EXTERNAL << 8, None);
    }

    fn inject_nmi(&mut self) -> bool {
        // The CPU tracks NMI blocking until the handler's IRET (SDM Vol. 3, 24.4.2); an NMI
        // cannot be injected under MOV-SS blocking (26.2.1.5).
        let blocked = self.get(w32::GUEST_INTERRUPTIBILITY) & (BLOCKING_NMI | BLOCKING_MOVSS) != 0;
        if blocked || self.get(w32::ENTRY_INTERRUPTION_INFO) & INTR_VALID != 0 {
            self.set_nmi_window_exiting(true);
            return false;
        }
        self.queue_event(NMI_VECTOR | INTR_TYPE_NMI << 8, None);
        true
    }

    fn set_xcr0(&mut self, xcr0: u64) {
        // The run loop validated it already; refusing again costs nothing and keeps XSETBV in
        // the world switch from faulting in the host.
        if valid_xcr0(xcr0, self.xstate.supported_xcr0()) {
            self.xstate.guest_xcr0 = xcr0;
        } else {
            log::error!("vmx: refusing guest XCR0 {xcr0:#x} (supported {:#x})", self.xstate.supported_xcr0());
        }
    }

    fn xcr0(&self) -> u64 {
        self.xstate.guest_xcr0
    }

    fn leave_cpu(&mut self) {
        self.xstate.leave_cpu();
        // SAFETY: VMX is on and the region is ours; VMCLEAR writes the VMCS back to memory and
        // makes it inactive, so another CPU may load it.
        if let Err(e) = unsafe { vmx::vmclear(self.frames.vmcs) } {
            log::error!("vmx: {e}");
        }
        let _ = current_vmcs().compare_exchange(self.frames.vmcs, 0, Ordering::Relaxed, Ordering::Relaxed);
        // A cleared VMCS is entered with VMLAUNCH again.
        self.launched = false;
    }

    fn exit_on_spin_loops(&mut self) {
        // RIP stays at the PAUSE (no instruction length to trust): after the exit the loop
        // starts a new PLE window. Plain PAUSE exiting would exit on that PAUSE again at once,
        // so a CPU without PAUSE-loop exiting keeps its spins.
        if self.pause_loop_exiting_allowed {
            // KVM's defaults: a loop is PAUSEs at most 128 TSC cycles apart; it exits after
            // 4096 cycles.
            self.set(w32::PLE_GAP, 128);
            self.set(w32::PLE_WINDOW, 4096);
            let secondary = self.get(w32::SECONDARY_PROCESSOR_CONTROLS);
            self.set(w32::SECONDARY_PROCESSOR_CONTROLS, secondary | SECONDARY_PAUSE_LOOP_EXITING);
        }
    }

    fn set_interrupt_window_exiting(&mut self, on: bool) {
        if on && !self.interrupt_window_allowed {
            log::error!("vmx: interrupt-window exiting is not available on this CPU");
            return;
        }
        let primary = self.get(w32::PRIMARY_PROCESSOR_CONTROLS);
        let primary =
            if on { primary | PRIMARY_INTERRUPT_WINDOW_EXITING } else { primary & !PRIMARY_INTERRUPT_WINDOW_EXITING };
        self.set(w32::PRIMARY_PROCESSOR_CONTROLS, primary);
    }
}

impl Drop for VmxVcpu {
    fn drop(&mut self) {
        // SAFETY: VMX is on and the region is ours; VMCLEAR flushes it so the frame can be reused.
        if let Err(e) = unsafe { vmx::vmclear(self.frames.vmcs) } {
            log::error!("vmx: {e}");
        }
        let _ = current_vmcs().compare_exchange(self.frames.vmcs, 0, Ordering::Relaxed, Ordering::Relaxed);
        self.frames.free();
    }
}

fn this_cpu() -> usize {
    crate::platform::percpu::current().index
}

fn load_cr2(value: u64) {
    if Cr2::read_raw() != value {
        // SAFETY: CR2 only reports page-fault addresses; the host takes no page faults whose
        // handler would read it, and any value is legal.
        unsafe { core::arch::asm!("mov cr2, {}", in(reg) value, options(nomem, nostack)) };
    }
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}
