//! A guest's debug address registers, kept apart from every other guest's.
//!
//! DR7 lives in the VMCS/VMCB (and DR6 in the VMCB), so breakpoints never fire in the host;
//! DR0-DR3 (and DR6 on VMX) are plain hardware registers that a guest writes without an exit.
//! Each vCPU loads its own values right before entry and saves them right after the exit, so
//! one VM cannot read what another wrote.

use core::arch::asm;

/// DR6 after reset: every reserved bit set (Intel SDM Vol. 3, 18.2.3).
const DR6_RESET: u64 = 0xffff_0ff0;

/// One vCPU's debug registers.
pub struct DebugRegs {
    address: [u64; 4],
    /// `None` when the backend keeps DR6 in its control structure (SVM).
    dr6: Option<u64>,
}

impl DebugRegs {
    /// Registers at their reset values; `switch_dr6` when the backend does not hold DR6.
    pub fn new(switch_dr6: bool) -> Self {
        DebugRegs { address: [0; 4], dr6: switch_dr6.then_some(DR6_RESET) }
    }

    /// Loads the guest's values (right before entry).
    pub fn enter_guest(&self) {
        let [a, b, c, d] = self.address;
        // SAFETY: writing DR0-DR3 only sets breakpoint addresses, which DR7 (the host's is 0x400:
        // none enabled) decides whether to use; DR6 is a status register.
        unsafe {
            asm!("mov dr0, {}", "mov dr1, {}", "mov dr2, {}", "mov dr3, {}",
                 in(reg) a, in(reg) b, in(reg) c, in(reg) d, options(nomem, nostack));
            if let Some(dr6) = self.dr6 {
                asm!("mov dr6, {}", in(reg) dr6, options(nomem, nostack));
            }
        }
    }

    /// Saves the guest's values (right after the exit).
    pub fn leave_guest(&mut self) {
        let (a, b, c, d): (u64, u64, u64, u64);
        // SAFETY: reading debug registers at CPL 0 has no side effects.
        unsafe {
            asm!("mov {}, dr0", "mov {}, dr1", "mov {}, dr2", "mov {}, dr3",
                 out(reg) a, out(reg) b, out(reg) c, out(reg) d, options(nomem, nostack));
            if let Some(dr6) = self.dr6.as_mut() {
                asm!("mov {}, dr6", out(reg) * dr6, options(nomem, nostack));
            }
        }
        self.address = [a, b, c, d];
    }
}
