//! Decoding raw VM-exit information into the architecture-neutral [`Exit`]: pure functions,
//! so both backends' decoding is unit-tested on the host. Side effects (clearing a window
//! request, handling an exit inside the backend) stay in the backends.

use crate::vcpu::{Exit, IoExit, CR_SOURCE_UNKNOWN};

/// Intel VMX basic exit reasons (SDM Vol. 3, Appendix C).
pub mod vmx {
    use super::*;

    pub const EXCEPTION_OR_NMI: u32 = 0;
    pub const EXTERNAL_INTERRUPT: u32 = 1;
    pub const TRIPLE_FAULT: u32 = 2;
    pub const INTERRUPT_WINDOW: u32 = 7;
    pub const NMI_WINDOW: u32 = 8;
    pub const CPUID: u32 = 10;
    pub const HLT: u32 = 12;
    pub const INVD: u32 = 13;
    pub const RDPMC: u32 = 15;
    pub const VMCALL: u32 = 18;
    /// VMCLEAR, VMLAUNCH, VMPTRLD, VMPTRST, VMREAD, VMRESUME, VMWRITE, VMXOFF, VMXON.
    pub const VMX_INSTRUCTIONS: core::ops::RangeInclusive<u32> = 19..=27;
    pub const INVEPT: u32 = 50;
    pub const INVVPID: u32 = 53;
    pub const VMFUNC: u32 = 59;
    pub const MWAIT: u32 = 36;
    pub const MONITOR: u32 = 39;
    pub const CR_ACCESS: u32 = 28;
    pub const IO: u32 = 30;
    pub const PAUSE: u32 = 40;
    pub const RDMSR: u32 = 31;
    pub const WRMSR: u32 = 32;
    pub const EPT_VIOLATION: u32 = 48;
    pub const EPT_MISCONFIG: u32 = 49;
    pub const XSETBV: u32 = 55;
    /// Bit 31 of the exit reason: VM entry failed.
    pub const ENTRY_FAILURE: u32 = 1 << 31;

    /// Interruption type NMI in the exit interruption information (bits 10:8), with bit 31 (valid).
    const INTERRUPTION_NMI: u32 = 1 << 31 | 2 << 8;
    const INTERRUPTION_VALID_AND_TYPE: u32 = 1 << 31 | 7 << 8;

    /// Decodes an exit from its reason, exit qualification, guest-physical address field and
    /// exit interruption information.
    pub fn decode(reason: u32, qualification: u64, guest_physical: u64, interruption: u32) -> Exit {
        if reason & ENTRY_FAILURE != 0 {
            return Exit::EntryFailed { code: reason as u64 };
        }
        match reason & 0xffff {
            CPUID => Exit::Cpuid,
            RDMSR => Exit::Rdmsr,
            WRMSR => Exit::Wrmsr,
            HLT => Exit::Hlt,
            XSETBV => Exit::Xsetbv,
            IO => Exit::Io(IoExit {
                port: (qualification >> 16) as u16,
                size: (qualification & 7) as u8 + 1,
                write: qualification & (1 << 3) == 0,
                string: qualification & (1 << 4) != 0,
                rep: qualification & (1 << 5) != 0,
            }),
            EPT_VIOLATION => Exit::NestedFault {
                gpa: guest_physical,
                write: qualification & (1 << 1) != 0,
                fetch: qualification & (1 << 2) != 0,
            },
            INTERRUPT_WINDOW | NMI_WINDOW => Exit::InterruptWindow,
            EXTERNAL_INTERRUPT => Exit::ExternalInterrupt,
            PAUSE => Exit::Pause,
            INVD => Exit::Invd,
            MONITOR | MWAIT => Exit::MonitorMwait,
            RDPMC => Exit::Rdpmc,
            VMCALL => Exit::Hypercall,
            INVEPT | INVVPID | VMFUNC => Exit::VirtualizationInstruction,
            other if VMX_INSTRUCTIONS.contains(&other) => Exit::VirtualizationInstruction,
            // Access type 0 MOV to CR, 1 MOV from CR, 2 CLTS, 3 LMSW (both write CR0; the run
            // loop decodes them).
            CR_ACCESS => Exit::CrAccess {
                cr: (qualification & 0xf) as u8,
                write: (qualification >> 4) & 3 != 1,
                gpr: match (qualification >> 4) & 3 {
                    0 | 1 => ((qualification >> 8) & 0xf) as u8,
                    _ => CR_SOURCE_UNKNOWN,
                },
            },
            TRIPLE_FAULT => Exit::TripleFault,
            EXCEPTION_OR_NMI if interruption & INTERRUPTION_VALID_AND_TYPE == INTERRUPTION_NMI => Exit::HostNmi,
            // No exception is intercepted (empty bitmap): report what came.
            EXCEPTION_OR_NMI => Exit::Unhandled { reason: 0, info: interruption.into() },
            other => Exit::Unhandled { reason: other as u64, info: qualification },
        }
    }
}

/// AMD SVM exit codes (APM Vol. 2, Appendix C).
pub mod svm {
    use super::*;

    pub const CR0_READ: u64 = 0x00;
    pub const CR15_WRITE: u64 = 0x1f;
    pub const INTR: u64 = 0x60;
    pub const NMI: u64 = 0x61;
    pub const VINTR: u64 = 0x64;
    pub const RDPMC: u64 = 0x6f;
    pub const CPUID: u64 = 0x72;
    pub const IRET: u64 = 0x74;
    pub const INVD: u64 = 0x76;
    pub const PAUSE: u64 = 0x77;
    pub const INVLPGA: u64 = 0x7a;
    pub const HLT: u64 = 0x78;
    pub const IOIO: u64 = 0x7b;
    pub const MSR: u64 = 0x7c;
    pub const SHUTDOWN: u64 = 0x7f;
    /// VMRUN, VMMCALL, VMLOAD, VMSAVE, STGI, CLGI, SKINIT.
    pub const SVM_INSTRUCTIONS: core::ops::RangeInclusive<u64> = 0x80..=0x86;
    pub const VMMCALL: u64 = 0x81;
    /// MONITOR, MWAIT, MWAIT conditional (MONITORX/MWAITX exit as MONITOR/MWAIT).
    pub const MONITOR_MWAIT: core::ops::RangeInclusive<u64> = 0x8a..=0x8c;
    pub const XSETBV: u64 = 0x8d;
    pub const NPF: u64 = 0x400;
    /// VMEXIT_INVALID: -1, which some implementations (QEMU's TCG) store as 32 bits.
    pub const INVALID: u64 = u64::MAX;
    const INVALID_32: u64 = u32::MAX as u64;

    /// Decodes an exit from EXITCODE, EXITINFO1 and EXITINFO2.
    pub fn decode(code: u64, info1: u64, info2: u64) -> Exit {
        match code {
            CPUID => Exit::Cpuid,
            HLT => Exit::Hlt,
            XSETBV => Exit::Xsetbv,
            MSR if info1 & 1 != 0 => Exit::Wrmsr,
            MSR => Exit::Rdmsr,
            IOIO => Exit::Io(IoExit {
                port: (info1 >> 16) as u16,
                // SZ8, SZ16 and SZ32 are one-hot bits 4..6.
                size: match (info1 >> 4) & 0x7 {
                    0b001 => 1,
                    0b010 => 2,
                    _ => 4,
                },
                write: info1 & 1 == 0,
                string: info1 & (1 << 2) != 0,
                rep: info1 & (1 << 3) != 0,
            }),
            NPF => Exit::NestedFault { gpa: info2, write: info1 & (1 << 1) != 0, fetch: info1 & (1 << 4) != 0 },
            VINTR => Exit::InterruptWindow,
            INTR => Exit::ExternalInterrupt,
            NMI => Exit::HostNmi,
            PAUSE => Exit::Pause,
            INVD => Exit::Invd,
            RDPMC => Exit::Rdpmc,
            VMMCALL => Exit::Hypercall,
            INVLPGA => Exit::VirtualizationInstruction,
            code if SVM_INSTRUCTIONS.contains(&code) => Exit::VirtualizationInstruction,
            code if MONITOR_MWAIT.contains(&code) => Exit::MonitorMwait,
            SHUTDOWN => Exit::TripleFault,
            // With decode assists, EXITINFO1 bit 63 says a MOV CR gave its register in bits 3:0;
            // otherwise (CLTS, LMSW, or no decode assists) the run loop decodes the instruction.
            CR0_READ..=CR15_WRITE => Exit::CrAccess {
                cr: (code & 0xf) as u8,
                write: code >= 0x10,
                gpr: if info1 & (1 << 63) != 0 { (info1 & 0xf) as u8 } else { CR_SOURCE_UNKNOWN },
            },
            INVALID | INVALID_32 => Exit::EntryFailed { code: INVALID },
            _ => Exit::Unhandled { reason: code, info: info1 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmx_io_qualification() {
        // OUT DX, AL to 0x3f8: size-1 = 0, direction out, not string.
        assert_eq!(
            vmx::decode(vmx::IO, 0x03f8_0000, 0, 0),
            Exit::Io(IoExit { port: 0x3f8, size: 1, write: true, string: false, rep: false })
        );
        // REP INSW from 0x1f0: size 2, in, string, rep.
        assert_eq!(
            vmx::decode(vmx::IO, 0x01f0_0000 | 1 | (1 << 3) | (1 << 4) | (1 << 5), 0, 0),
            Exit::Io(IoExit { port: 0x1f0, size: 2, write: false, string: true, rep: true })
        );
        assert_eq!(
            vmx::decode(vmx::IO, 0x00f4_0003, 0, 0),
            Exit::Io(IoExit { port: 0xf4, size: 4, write: true, string: false, rep: false })
        );
    }

    #[test]
    fn vmx_ept_violation_cr_access_and_failures() {
        assert_eq!(
            vmx::decode(vmx::EPT_VIOLATION, 0b010, 0xd000_0008, 0),
            Exit::NestedFault { gpa: 0xd000_0008, write: true, fetch: false }
        );
        assert_eq!(
            vmx::decode(vmx::EPT_VIOLATION, 0b100, 0x10, 0),
            Exit::NestedFault { gpa: 0x10, write: false, fetch: true }
        );
        // MOV CR4, RCX: cr 4, access type 0 (to CR), register 1.
        assert_eq!(vmx::decode(vmx::CR_ACCESS, 0x104, 0, 0), Exit::CrAccess { cr: 4, write: true, gpr: 1 });
        assert_eq!(vmx::decode(vmx::CR_ACCESS, 0x13, 0, 0), Exit::CrAccess { cr: 3, write: false, gpr: 0 });
        assert_eq!(
            vmx::decode(vmx::CR_ACCESS, 0x20, 0, 0),
            Exit::CrAccess { cr: 0, write: true, gpr: CR_SOURCE_UNKNOWN }
        );
        assert_eq!(
            vmx::decode(vmx::CR_ACCESS, 0x0003_0030, 0, 0),
            Exit::CrAccess { cr: 0, write: true, gpr: CR_SOURCE_UNKNOWN },
            "LMSW"
        );
        assert_eq!(vmx::decode(33 | vmx::ENTRY_FAILURE, 0, 0, 0), Exit::EntryFailed { code: 0x8000_0021 });
        assert_eq!(vmx::decode(vmx::TRIPLE_FAULT, 0, 0, 0), Exit::TripleFault);
        assert_eq!(vmx::decode(vmx::XSETBV, 0, 0, 0), Exit::Xsetbv);
        assert_eq!(vmx::decode(54, 7, 0, 0), Exit::Unhandled { reason: 54, info: 7 });
    }

    #[test]
    fn svm_ioio_exitinfo1() {
        // OUT DX, AL to 0x3f8: type 0 (out), SZ8.
        assert_eq!(
            svm::decode(svm::IOIO, 0x03f8_0010, 0x1234),
            Exit::Io(IoExit { port: 0x3f8, size: 1, write: true, string: false, rep: false })
        );
        // REP INSB from 0x3fd: type 1 (in), STR, REP, SZ8.
        assert_eq!(
            svm::decode(svm::IOIO, 0x03fd_0000 | 1 | (1 << 2) | (1 << 3) | (1 << 4), 0),
            Exit::Io(IoExit { port: 0x3fd, size: 1, write: false, string: true, rep: true })
        );
        assert_eq!(
            svm::decode(svm::IOIO, 0x0080_0020, 0),
            Exit::Io(IoExit { port: 0x80, size: 2, write: true, string: false, rep: false })
        );
        assert_eq!(
            svm::decode(svm::IOIO, 0x00f4_0040, 0),
            Exit::Io(IoExit { port: 0xf4, size: 4, write: true, string: false, rep: false })
        );
    }

    #[test]
    fn svm_npf_msr_cr_and_others() {
        assert_eq!(
            svm::decode(svm::NPF, 0b0_0111, 0xd000_0000),
            Exit::NestedFault { gpa: 0xd000_0000, write: true, fetch: false }
        );
        assert_eq!(
            svm::decode(svm::NPF, 0b1_0101, 0x20_0000),
            Exit::NestedFault { gpa: 0x20_0000, write: false, fetch: true }
        );
        assert_eq!(svm::decode(svm::MSR, 0, 0), Exit::Rdmsr);
        assert_eq!(svm::decode(svm::MSR, 1, 0), Exit::Wrmsr);
        assert_eq!(svm::decode(0x14, 0x8000_0000_0000_0003, 0), Exit::CrAccess { cr: 4, write: true, gpr: 3 });
        assert_eq!(svm::decode(0x03, 0, 0), Exit::CrAccess { cr: 3, write: false, gpr: CR_SOURCE_UNKNOWN });
        assert_eq!(
            svm::decode(0x10, 0, 0),
            Exit::CrAccess { cr: 0, write: true, gpr: CR_SOURCE_UNKNOWN },
            "CLTS, LMSW"
        );
        assert_eq!(svm::decode(svm::SHUTDOWN, 0, 0), Exit::TripleFault);
        assert_eq!(svm::decode(svm::VINTR, 0, 0), Exit::InterruptWindow);
        assert_eq!(svm::decode(svm::PAUSE, 0, 0), Exit::Pause);
        assert_eq!(vmx::decode(vmx::PAUSE, 0, 0, 0), Exit::Pause);
        // A host NMI: interruption type 2, valid; a hardware exception (type 3) is not one.
        assert_eq!(vmx::decode(vmx::EXCEPTION_OR_NMI, 0, 0, 0x8000_0202), Exit::HostNmi);
        assert_eq!(
            vmx::decode(vmx::EXCEPTION_OR_NMI, 0, 0, 0x8000_030e),
            Exit::Unhandled { reason: 0, info: 0x8000_030e }
        );
        assert_eq!(svm::decode(svm::NMI, 0, 0), Exit::HostNmi);
        assert_eq!((svm::decode(svm::INVD, 0, 0), vmx::decode(vmx::INVD, 0, 0, 0)), (Exit::Invd, Exit::Invd));
        assert_eq!((svm::decode(0x6f, 0, 0), vmx::decode(15, 0, 0, 0)), (Exit::Rdpmc, Exit::Rdpmc));
        for (svm_code, vmx_reason) in [(0x8a, 39), (0x8b, 36), (0x8c, 36)] {
            assert_eq!(
                (svm::decode(svm_code, 0, 0), vmx::decode(vmx_reason, 0, 0, 0)),
                (Exit::MonitorMwait, Exit::MonitorMwait)
            );
        }
        assert_eq!(svm::decode(svm::INVALID, 0, 0), Exit::EntryFailed { code: u64::MAX });
        assert_eq!(svm::decode(0xffff_ffff, 0, 0), Exit::EntryFailed { code: u64::MAX }, "stored as 32 bits");
        assert_eq!(svm::decode(0x81, 5, 0), Exit::Hypercall);
        assert_eq!(vmx::decode(18, 0, 0, 0), Exit::Hypercall);
        for code in [0x80, 0x82, 0x86, svm::INVLPGA] {
            assert_eq!(svm::decode(code, 0, 0), Exit::VirtualizationInstruction, "{code:#x}");
        }
        for reason in [19, 24, 27, 50, 53, 59] {
            assert_eq!(vmx::decode(reason, 0, 0, 0), Exit::VirtualizationInstruction, "{reason}");
        }
    }
}
