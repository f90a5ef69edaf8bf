//! The local APIC of one vCPU: xAPIC MMIO, x2APIC MSRs, priorities and the timer.
//!
//! Register layout and behaviour follow the Intel SDM Vol. 3A, chapter 11 ("Advanced
//! Programmable Interrupt Controller"), section numbers below are from that chapter. APIC IDs
//! are the vCPU indices (0 is the bootstrap processor). IPIs leave the APIC as decoded ICR
//! writes ([`ApicEffect::ipi`]): routing them is the interrupt router's job. The timer runs on guest time with a bus clock of [`BUS_HZ`]; TSC-deadline values are
//! converted to guest nanoseconds with the TSC frequency given to [`LocalApic::new`].

use super::ipi::{ApicView, DeliveryMode, Icr};

/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// First x2APIC register MSR (offset 0 / 16).
pub const MSR_X2APIC_FIRST: u32 = 0x800;
/// Last MSR of the x2APIC range.
pub const MSR_X2APIC_LAST: u32 = 0x8ff;
/// Default guest-physical base of the xAPIC page.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Size of the xAPIC page.
pub const LAPIC_LEN: u64 = 0x1000;
/// The timer's input clock before the divider: one tick per nanosecond.
pub const BUS_HZ: u64 = 1_000_000_000;

// IA32_APIC_BASE bits (11.4.4).
const BASE_BSP: u64 = 1 << 8;
const BASE_X2APIC: u64 = 1 << 10;
const BASE_ENABLE: u64 = 1 << 11;
const BASE_RESERVED_LOW: u64 = 0x2ff;
const BASE_RESET: u64 = LAPIC_BASE | BASE_ENABLE;

/// Version 0x14 (integrated APIC) with max LVT entry 5 in bits 23:16 (11.4.8).
const VERSION: u32 = 0x0005_0014;

// Register offsets in the xAPIC page (11.4.1, table 11-1).
const REG_ID: u32 = 0x20;
const REG_VERSION: u32 = 0x30;
const REG_TPR: u32 = 0x80;
const REG_APR: u32 = 0x90;
const REG_PPR: u32 = 0xa0;
const REG_EOI: u32 = 0xb0;
const REG_LDR: u32 = 0xd0;
const REG_DFR: u32 = 0xe0;
const REG_SVR: u32 = 0xf0;
const REG_ISR: u32 = 0x100;
const REG_TMR: u32 = 0x180;
const REG_IRR: u32 = 0x200;
const REG_ESR: u32 = 0x280;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_LVT_ERROR: u32 = 0x370;
const REG_INITIAL_COUNT: u32 = 0x380;
const REG_CURRENT_COUNT: u32 = 0x390;
const REG_DIVIDE: u32 = 0x3e0;
const REG_SELF_IPI: u32 = 0x3f0;

const SVR_ENABLE: u32 = 1 << 8;
/// Spurious vector, enable and focus-check bits (11.9).
const SVR_WRITABLE: u32 = 0x3ff;
const SVR_RESET: u32 = 0xff;
const DFR_RESET: u32 = 0xffff_ffff;

// LVT (11.5.1).
const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_ERROR: usize = 5;
const LVT_COUNT: usize = 6;
const LVT_MASKED: u32 = 1 << 16;
/// Writable bits per LVT entry: timer, thermal, performance, LINT0, LINT1, error.
const LVT_WRITABLE: [u32; LVT_COUNT] = [0x7_00ff, 0x1_07ff, 0x1_07ff, 0x1_a7ff, 0x1_a7ff, 0x1_00ff];
const DELIVERY_EXTINT: u32 = 7;
const TIMER_MODE_SHIFT: u32 = 17;
const TIMER_PERIODIC: u32 = 1;
const TIMER_TSC_DEADLINE: u32 = 2;

// ESR bits (11.5.3).
const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;

// ICR fields (11.6.1).
/// Vector, delivery mode, destination mode, level, trigger and shorthand (bit 12 is read-only).
const ICR_WRITABLE: u64 = 0x000c_cfff;
const DIVIDE_WRITABLE: u32 = 0xb;

/// What a register write asks of the rest of the machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApicEffect {
    /// An EOI retired this level-triggered vector: the I/O APIC must see it.
    pub eoi_level_vector: Option<u8>,
    /// An ICR write: the IPI to route.
    pub ipi: Option<Icr>,
}

/// A 256-bit vector register (IRR, ISR, TMR).
#[derive(Clone, Copy, Debug, Default)]
struct Bits([u32; 8]);

impl Bits {
    fn set(&mut self, vector: u8) {
        self.0[usize::from(vector >> 5)] |= 1 << (vector & 31);
    }

    fn clear(&mut self, vector: u8) {
        self.0[usize::from(vector >> 5)] &= !(1 << (vector & 31));
    }

    fn test(&self, vector: u8) -> bool {
        self.0[usize::from(vector >> 5)] & (1 << (vector & 31)) != 0
    }

    fn highest(&self) -> Option<u8> {
        self.0
            .iter()
            .enumerate()
            .rev()
            .find(|(_, w)| **w != 0)
            .map(|(i, w)| (i as u8) * 32 + (31 - w.leading_zeros() as u8))
    }

    /// The 32-bit word `index` (0-7), 0 outside.
    fn word(&self, index: u32) -> u32 {
        self.0.get(index as usize).copied().unwrap_or(0)
    }
}

/// The local APIC of one vCPU.
#[derive(Clone, Debug)]
pub struct LocalApic {
    tsc_hz: u64,
    id: u32,
    base_msr: u64,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: Bits,
    tmr: Bits,
    irr: Bits,
    /// ESR as last latched by a write to it.
    esr: u32,
    /// Errors seen since the last ESR write.
    esr_pending: u32,
    icr: u64,
    lvt: [u32; LVT_COUNT],
    initial_count: u32,
    divide: u32,
    /// When the counting or deadline timer fires next.
    timer_deadline_ns: Option<u64>,
    /// Length of one periodic round.
    timer_period_ns: u64,
    /// IA32_TSC_DEADLINE as the guest sees it (0 when disarmed or fired).
    tsc_deadline: u64,
}

impl LocalApic {
    /// The bootstrap processor's local APIC (ID 0) in its reset state (hardware-enabled xAPIC,
    /// software-disabled).
    pub fn new(tsc_hz: u64) -> Self {
        Self::with_id(tsc_hz, 0)
    }

    /// The local APIC with ID `id` in its reset state; ID 0 is the bootstrap processor's.
    pub fn with_id(tsc_hz: u64, id: u32) -> Self {
        LocalApic {
            tsc_hz: tsc_hz.max(1),
            id,
            base_msr: BASE_RESET | if id == 0 { BASE_BSP } else { 0 },
            tpr: 0,
            ldr: 0,
            dfr: DFR_RESET,
            svr: SVR_RESET,
            isr: Bits::default(),
            tmr: Bits::default(),
            irr: Bits::default(),
            esr: 0,
            esr_pending: 0,
            icr: 0,
            lvt: [LVT_MASKED; LVT_COUNT],
            initial_count: 0,
            divide: 0,
            timer_deadline_ns: None,
            timer_period_ns: 0,
            tsc_deadline: 0,
        }
    }

    /// Power-up register state, keeping the base MSR (11.4.7.1).
    fn reset_registers(&mut self) {
        let base_msr = self.base_msr;
        *self = LocalApic { base_msr, ..LocalApic::with_id(self.tsc_hz, self.id) };
    }

    /// An INIT signal: every register back to its power-up state except the ID and
    /// IA32_APIC_BASE (11.4.7.3).
    pub fn init(&mut self) {
        self.reset_registers();
    }

    /// The APIC ID.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The logical destination register as the mode in force defines it: written by the guest
    /// in xAPIC mode, derived from the ID in x2APIC mode (cluster in bits 31:16, 11.12.10.2).
    fn logical_id(&self) -> u32 {
        if self.x2apic() {
            ((self.id >> 4) << 16) | (1 << (self.id & 0xf))
        } else {
            self.ldr
        }
    }

    /// The highest requested and in-service vectors and the TPR, for a report on a stuck vCPU.
    pub fn summary(&self) -> alloc::string::String {
        let show = |v: Option<u8>| v.map_or_else(|| "-".into(), |v| alloc::format!("{v:#x}"));
        alloc::format!(
            "APIC {} {}, IRR {}, ISR {}, TPR {:#x}",
            self.id,
            if self.enabled() { "on" } else { "off" },
            show(self.irr.highest()),
            show(self.isr.highest()),
            self.tpr
        )
    }

    /// What IPI routing needs to know of this APIC.
    pub fn view(&self) -> ApicView {
        ApicView { apic_id: self.id, ldr: self.logical_id(), flat: self.dfr >> 28 == 0xf, ppr: self.ppr() }
    }

    /// IA32_APIC_BASE.
    pub fn apic_base(&self) -> u64 {
        self.base_msr
    }

    /// Writes IA32_APIC_BASE; `Err` (inject #GP) for reserved bits, a moved base, or an illegal
    /// mode transition (11.12.5: x2APIC -> xAPIC and disabled -> x2APIC are illegal).
    #[allow(clippy::result_unit_err)]
    pub fn write_apic_base(&mut self, value: u64) -> Result<(), ()> {
        // The base cannot move: the router claims the page at its default address.
        if value & BASE_RESERVED_LOW != 0 || value & !0xfff != LAPIC_BASE {
            return Err(());
        }
        let (old_enable, old_x2) = (self.hardware_enabled(), self.x2apic());
        let (enable, x2) = (value & BASE_ENABLE != 0, value & BASE_X2APIC != 0);
        let legal = match (enable, x2) {
            (false, true) => false,
            (true, true) => old_enable,
            (true, false) => !old_x2,
            (false, false) => true,
        };
        if !legal {
            return Err(());
        }
        self.base_msr = LAPIC_BASE | (self.base_msr & BASE_BSP) | (value & (BASE_ENABLE | BASE_X2APIC));
        if old_enable && !enable {
            self.reset_registers();
        }
        Ok(())
    }

    /// Whether IA32_APIC_BASE enables the APIC.
    pub fn hardware_enabled(&self) -> bool {
        self.base_msr & BASE_ENABLE != 0
    }

    /// Whether the APIC is in x2APIC mode.
    pub fn x2apic(&self) -> bool {
        self.base_msr & BASE_X2APIC != 0
    }

    /// Hardware- and software-enabled: the APIC accepts and delivers interrupts.
    pub fn enabled(&self) -> bool {
        self.hardware_enabled() && self.svr & SVR_ENABLE != 0
    }

    /// LINT0 is unmasked in ExtINT mode: the 8259's INTR reaches the CPU (virtual wire).
    pub fn lint0_extint(&self) -> bool {
        let lint0 = self.lvt[LVT_LINT0];
        self.hardware_enabled() && lint0 & LVT_MASKED == 0 && (lint0 >> 8) & 7 == DELIVERY_EXTINT
    }

    /// An interrupt message arrives: sets IRR (and TMR for level). Ignored while disabled;
    /// vectors 0-15 are illegal and only set the ESR (11.5.3).
    pub fn accept(&mut self, vector: u8, level: bool) {
        if !self.enabled() {
            return;
        }
        if vector < 16 {
            self.error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        self.irr.set(vector);
        if level {
            self.tmr.set(vector);
        } else {
            self.tmr.clear(vector);
        }
    }

    /// Records an APIC error and raises the error LVT if it is unmasked.
    fn error(&mut self, bit: u32) {
        self.esr_pending |= bit;
        let lvt = self.lvt[LVT_ERROR];
        let vector = lvt as u8;
        if self.enabled() && lvt & LVT_MASKED == 0 && vector >= 16 {
            self.irr.set(vector);
            self.tmr.clear(vector);
        }
    }

    /// The task priority (TPR); CR8 is its bits 7:4.
    pub fn tpr(&self) -> u8 {
        self.tpr as u8
    }

    /// Sets the TPR (a MOV to CR8 writes `cr8 << 4`).
    pub fn set_tpr(&mut self, tpr: u8) {
        self.tpr = u32::from(tpr);
    }

    /// Processor priority (11.8.3.1): the higher of TPR and the highest in-service class.
    pub fn ppr(&self) -> u8 {
        let tpr = self.tpr as u8;
        let isrv = self.isr.highest().unwrap_or(0);
        if tpr >> 4 >= isrv >> 4 {
            tpr
        } else {
            isrv & 0xf0
        }
    }

    /// The vector the APIC would present to the CPU now, if any (11.8.3.1).
    pub fn pending(&self) -> Option<u8> {
        if !self.enabled() {
            return None;
        }
        let vector = self.irr.highest()?;
        (vector >> 4 > self.ppr() >> 4).then_some(vector)
    }

    /// The CPU takes `vector`: IRR -> ISR. False if it was not requested.
    pub fn acknowledge(&mut self, vector: u8) -> bool {
        if !self.irr.test(vector) {
            return false;
        }
        self.irr.clear(vector);
        self.isr.set(vector);
        true
    }

    /// Whether `vector` is requested (IRR).
    pub fn requested(&self, vector: u8) -> bool {
        self.irr.test(vector)
    }

    /// Whether `vector` is in service (ISR).
    pub fn in_service(&self, vector: u8) -> bool {
        self.isr.test(vector)
    }

    /// EOI: retires the highest in-service vector (11.8.5).
    fn eoi(&mut self) -> ApicEffect {
        let Some(vector) = self.isr.highest() else { return ApicEffect::default() };
        self.isr.clear(vector);
        ApicEffect { eoi_level_vector: self.tmr.test(vector).then_some(vector), ipi: None }
    }

    /// Sends the IPI in the ICR: a fixed or lowest-priority IPI without a legal vector sets the
    /// send-illegal-vector error and goes nowhere (11.5.3); everything else is for the router.
    fn send_ipi(&mut self) -> ApicEffect {
        let icr = if self.x2apic() {
            Icr::from_x2apic(self.icr)
        } else {
            Icr::from_xapic(self.icr as u32, (self.icr >> 32) as u32)
        };
        if matches!(icr.delivery, DeliveryMode::Fixed | DeliveryMode::LowestPriority) && icr.vector < 16 {
            self.error(ESR_SEND_ILLEGAL_VECTOR);
            return ApicEffect::default();
        }
        ApicEffect { eoi_level_vector: None, ipi: Some(icr) }
    }

    fn timer_mode(&self) -> u32 {
        (self.lvt[LVT_TIMER] >> TIMER_MODE_SHIFT) & 3
    }

    /// Divide configuration -> divisor (11.5.4: bits 3,1:0; 0b111 is divide by 1).
    fn divisor(&self) -> u64 {
        let code = (self.divide & 3) | ((self.divide >> 1) & 4);
        if code == 7 {
            1
        } else {
            2 << code
        }
    }

    fn disarm_timer(&mut self) {
        self.timer_deadline_ns = None;
        self.tsc_deadline = 0;
    }

    /// Timer period in ns for the current initial count and divider.
    fn count_to_ns(&self, count: u32) -> u64 {
        // count < 2^32 and divisor <= 128: no overflow in u64 before scaling.
        let ticks = u64::from(count) * self.divisor();
        (u128::from(ticks) * 1_000_000_000 / u128::from(BUS_HZ)) as u64
    }

    fn write_initial_count(&mut self, value: u32, now_ns: u64) {
        // TSC-deadline mode ignores the initial count (11.5.4.1).
        if self.timer_mode() == TIMER_TSC_DEADLINE {
            return;
        }
        self.initial_count = value;
        if value == 0 {
            self.disarm_timer();
            return;
        }
        self.timer_period_ns = self.count_to_ns(value).max(1);
        self.timer_deadline_ns = Some(now_ns.saturating_add(self.timer_period_ns));
    }

    fn current_count(&self, now_ns: u64) -> u32 {
        if self.timer_mode() == TIMER_TSC_DEADLINE {
            return 0;
        }
        let Some(deadline) = self.timer_deadline_ns else { return 0 };
        let remaining_ns = if now_ns < deadline {
            deadline - now_ns
        } else if self.timer_mode() == TIMER_PERIODIC && self.timer_period_ns != 0 {
            // Rounds that fell due before the next poll.
            self.timer_period_ns - (now_ns - deadline) % self.timer_period_ns
        } else {
            return 0;
        };
        let ticks = u128::from(remaining_ns) * u128::from(BUS_HZ) / 1_000_000_000;
        let count = ticks.div_ceil(u128::from(self.divisor()));
        count.min(u128::from(self.initial_count)) as u32
    }

    /// Arms (or with 0 disarms) the TSC-deadline timer; `tsc` is the guest TSC at `now_ns`.
    fn write_tsc_deadline(&mut self, value: u64, now_ns: u64, tsc: u64) {
        // Ignored outside TSC-deadline mode (11.5.4.1).
        if !self.hardware_enabled() || self.timer_mode() != TIMER_TSC_DEADLINE {
            return;
        }
        self.tsc_deadline = value;
        if value == 0 {
            self.timer_deadline_ns = None;
            return;
        }
        let delta_ns = u128::from(value.saturating_sub(tsc)) * 1_000_000_000 / u128::from(self.tsc_hz);
        let delta_ns = u64::try_from(delta_ns).unwrap_or(u64::MAX);
        self.timer_deadline_ns = Some(now_ns.saturating_add(delta_ns));
    }

    /// Fires the timer if it is due; periodic rounds are counted from the previous deadline.
    pub fn poll(&mut self, now_ns: u64) {
        let Some(deadline) = self.timer_deadline_ns else { return };
        if now_ns < deadline {
            return;
        }
        let lvt = self.lvt[LVT_TIMER];
        if lvt & LVT_MASKED == 0 {
            self.accept(lvt as u8, false);
        }
        if self.timer_mode() == TIMER_PERIODIC && self.timer_period_ns != 0 {
            // One interrupt for any rounds missed: IRR holds one request per vector.
            let rounds = (now_ns - deadline) / self.timer_period_ns + 1;
            let next = rounds.checked_mul(self.timer_period_ns).and_then(|d| deadline.checked_add(d));
            self.timer_deadline_ns = next;
        } else {
            self.disarm_timer();
        }
    }

    /// The guest time at which the timer fires next.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.timer_deadline_ns
    }

    fn write_lvt(&mut self, index: usize, value: u32) {
        let Some(writable) = LVT_WRITABLE.get(index) else { return };
        let mut value = value & writable;
        // While software-disabled the mask bits stay set (11.4.7.2).
        if self.svr & SVR_ENABLE == 0 {
            value |= LVT_MASKED;
        }
        if index == LVT_TIMER && (value >> TIMER_MODE_SHIFT) & 3 != self.timer_mode() {
            // Changing the timer mode disarms the timer (11.5.4.1).
            self.disarm_timer();
        }
        self.lvt[index] = value;
    }

    fn write_svr(&mut self, value: u32) {
        self.svr = value & SVR_WRITABLE;
        if self.svr & SVR_ENABLE == 0 {
            for lvt in &mut self.lvt {
                *lvt |= LVT_MASKED;
            }
        }
    }

    /// Reads a register shared by both modes (xAPIC offset); `None` if it does not exist.
    fn read_register(&self, reg: u32, now_ns: u64) -> Option<u32> {
        Some(match reg {
            // x2APIC: the 32-bit ID; xAPIC reads go through `mmio_read`.
            REG_ID => self.id,
            REG_VERSION => VERSION,
            REG_TPR => self.tpr,
            REG_PPR => self.ppr().into(),
            REG_LDR => self.logical_id(),
            REG_SVR => self.svr,
            0x100..=0x170 => self.isr.word((reg - REG_ISR) >> 4),
            0x180..=0x1f0 => self.tmr.word((reg - REG_TMR) >> 4),
            0x200..=0x270 => self.irr.word((reg - REG_IRR) >> 4),
            REG_ESR => self.esr,
            REG_LVT_TIMER..=REG_LVT_ERROR => self.lvt.get(((reg - REG_LVT_TIMER) >> 4) as usize).copied().unwrap_or(0),
            REG_INITIAL_COUNT => self.initial_count,
            REG_CURRENT_COUNT => self.current_count(now_ns),
            REG_DIVIDE => self.divide,
            _ => return None,
        })
    }

    /// Writes a register shared by both modes; `None` if it is not writable.
    fn write_register(&mut self, reg: u32, value: u32, now_ns: u64) -> Option<ApicEffect> {
        match reg {
            REG_TPR => self.tpr = value & 0xff,
            REG_EOI => return Some(self.eoi()),
            REG_SVR => self.write_svr(value),
            REG_ESR => {
                self.esr = self.esr_pending;
                self.esr_pending = 0;
            }
            REG_LVT_TIMER..=REG_LVT_ERROR => self.write_lvt(((reg - REG_LVT_TIMER) >> 4) as usize, value),
            REG_INITIAL_COUNT => self.write_initial_count(value, now_ns),
            REG_DIVIDE => self.divide = value & DIVIDE_WRITABLE,
            _ => return None,
        }
        Some(ApicEffect::default())
    }

    /// xAPIC MMIO read at `offset` in the APIC page. Reads 0 in x2APIC mode or when disabled.
    pub fn mmio_read(&self, offset: u64, size: u8, now_ns: u64) -> u64 {
        let byte = (offset & 0xf) as u32;
        if !self.hardware_enabled() || self.x2apic() || offset >= LAPIC_LEN || size == 0 || byte + u32::from(size) > 4 {
            return 0;
        }
        let reg = (offset & 0xff0) as u32;
        let value = match reg {
            REG_ID => self.id << 24,
            REG_APR | REG_EOI => 0,
            REG_DFR => self.dfr,
            REG_ICR_LOW => self.icr as u32,
            REG_ICR_HIGH => (self.icr >> 32) as u32,
            _ => self.read_register(reg, now_ns).unwrap_or(0),
        };
        u64::from(value >> (byte * 8)) & crate::devices::ones(size)
    }

    /// xAPIC MMIO write; only aligned 32-bit writes have an effect.
    pub fn mmio_write(&mut self, offset: u64, size: u8, value: u64, now_ns: u64) -> ApicEffect {
        if !self.hardware_enabled() || self.x2apic() || offset >= LAPIC_LEN || size != 4 || offset & 0xf != 0 {
            return ApicEffect::default();
        }
        let reg = offset as u32;
        let value = value as u32;
        match reg {
            REG_LDR => self.ldr = value & 0xff00_0000,
            REG_DFR => self.dfr = value | 0x0fff_ffff,
            REG_ICR_LOW => {
                self.icr = (self.icr & !0xffff_ffff) | (u64::from(value) & ICR_WRITABLE);
                return self.send_ipi();
            }
            REG_ICR_HIGH => self.icr = (self.icr & 0xffff_ffff) | (u64::from(value & 0xff00_0000) << 32),
            _ => return self.write_register(reg, value, now_ns).unwrap_or_default(),
        }
        ApicEffect::default()
    }

    /// RDMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register; `Err` = #GP.
    #[allow(clippy::result_unit_err)]
    pub fn msr_read(&self, msr: u32, now_ns: u64) -> Result<u64, ()> {
        match msr {
            MSR_APIC_BASE => Ok(self.base_msr),
            MSR_TSC_DEADLINE => Ok(self.tsc_deadline),
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST if self.x2apic() => {
                let reg = (msr - MSR_X2APIC_FIRST) << 4;
                match reg {
                    REG_ICR_LOW => Ok(self.icr),
                    _ => self.read_register(reg, now_ns).map(u64::from).ok_or(()),
                }
            }
            _ => Err(()),
        }
    }

    /// WRMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register; `tsc` is the guest TSC
    /// at `now_ns`. `Err` = #GP: x2APIC registers outside x2APIC mode, read-only or missing
    /// registers, reserved bits set (11.12.1.2).
    #[allow(clippy::result_unit_err)]
    pub fn msr_write(&mut self, msr: u32, value: u64, now_ns: u64, tsc: u64) -> Result<ApicEffect, ()> {
        match msr {
            MSR_APIC_BASE => return self.write_apic_base(value).map(|()| ApicEffect::default()),
            MSR_TSC_DEADLINE => {
                self.write_tsc_deadline(value, now_ns, tsc);
                return Ok(ApicEffect::default());
            }
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST if self.x2apic() => {}
            _ => return Err(()),
        }
        let reg = (msr - MSR_X2APIC_FIRST) << 4;
        if reg == REG_ICR_LOW {
            self.icr = value & (ICR_WRITABLE | 0xffff_ffff_0000_0000);
            return Ok(self.send_ipi());
        }
        let Ok(value) = u32::try_from(value) else { return Err(()) };
        let reserved = match reg {
            REG_TPR | REG_SELF_IPI => !0xff,
            REG_EOI | REG_ESR => !0,
            REG_SVR => !SVR_WRITABLE,
            REG_DIVIDE => !DIVIDE_WRITABLE,
            _ => 0,
        };
        if value & reserved != 0 {
            return Err(());
        }
        if reg == REG_SELF_IPI {
            self.accept(value as u8, false);
            return Ok(ApicEffect::default());
        }
        self.write_register(reg, value, now_ns).ok_or(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::ipi::Shorthand;
    use super::*;

    const TSC_HZ: u64 = 2_000_000_000;

    fn enabled_apic() -> LocalApic {
        let mut apic = LocalApic::new(TSC_HZ);
        apic.mmio_write(REG_SVR.into(), 4, 0x1ff, 0);
        apic
    }

    fn write(apic: &mut LocalApic, reg: u32, value: u32, now_ns: u64) -> ApicEffect {
        apic.mmio_write(reg.into(), 4, value.into(), now_ns)
    }

    fn read(apic: &LocalApic, reg: u32, now_ns: u64) -> u32 {
        apic.mmio_read(reg.into(), 4, now_ns) as u32
    }

    #[test]
    fn reset_state_and_identification() {
        let apic = LocalApic::new(TSC_HZ);
        assert_eq!(apic.apic_base(), 0xfee0_0900);
        assert_eq!(read(&apic, REG_VERSION, 0), 0x0005_0014);
        assert_eq!(read(&apic, REG_SVR, 0), 0xff);
        assert_eq!(read(&apic, REG_LVT_TIMER, 0), 0x1_0000);
        assert_eq!(read(&apic, REG_DFR, 0), 0xffff_ffff);
        assert_eq!(apic.mmio_read(0x31, 1, 0), 0x00, "byte read inside the version register");
        assert_eq!(apic.mmio_read(0x32, 1, 0), 0x05);
        assert!(!apic.enabled(), "software-disabled until SVR bit 8 is set");
    }

    #[test]
    fn software_disabled_apic_accepts_nothing_and_keeps_lvts_masked() {
        let mut apic = LocalApic::new(TSC_HZ);
        apic.accept(0x40, false);
        assert!(!apic.requested(0x40));
        write(&mut apic, 0x350, 0x700, 0);
        assert_eq!(read(&apic, 0x350, 0), 0x1_0700);
        let mut apic = enabled_apic();
        write(&mut apic, 0x350, 0x700, 0);
        assert_eq!(read(&apic, 0x350, 0), 0x700);
        assert!(apic.lint0_extint());
        write(&mut apic, REG_SVR, 0xff, 0);
        assert_eq!(read(&apic, 0x350, 0), 0x1_0700);
        assert!(!apic.lint0_extint());
    }

    #[test]
    fn tpr_and_ppr_gate_delivery() {
        let mut apic = enabled_apic();
        apic.accept(0x45, false);
        write(&mut apic, REG_TPR, 0x50, 0);
        assert_eq!(apic.pending(), None, "class 4 is not above TPR class 5");
        assert_eq!(read(&apic, REG_PPR, 0), 0x50);
        write(&mut apic, REG_TPR, 0x3f, 0);
        assert_eq!(apic.pending(), Some(0x45));
        assert!(apic.acknowledge(0x45));
        assert_eq!(read(&apic, REG_PPR, 0), 0x40, "ISR class beats TPR, low nibble cleared");
        assert_eq!(read(&apic, REG_ISR + 0x20, 0), 1 << 5);
        assert!(!apic.acknowledge(0x45));
    }

    #[test]
    fn higher_vector_preempts_and_lower_waits_for_eoi() {
        let mut apic = enabled_apic();
        apic.accept(0x50, false);
        assert!(apic.acknowledge(0x50));
        apic.accept(0x30, false);
        assert_eq!(apic.pending(), None);
        apic.accept(0x61, false);
        assert_eq!(apic.pending(), Some(0x61));
        assert!(apic.acknowledge(0x61));
        assert_eq!(apic.pending(), None);
        assert_eq!(write(&mut apic, REG_EOI, 0, 0), ApicEffect::default());
        assert!(!apic.in_service(0x61) && apic.in_service(0x50));
        assert_eq!(apic.pending(), None);
        write(&mut apic, REG_EOI, 0, 0);
        assert_eq!(apic.pending(), Some(0x30));
    }

    #[test]
    fn eoi_of_level_vector_is_reported_and_illegal_vectors_set_esr() {
        let mut apic = enabled_apic();
        apic.accept(0x41, true);
        assert_eq!(read(&apic, REG_TMR + 0x20, 0), 1 << 1);
        assert!(apic.acknowledge(0x41));
        assert_eq!(write(&mut apic, REG_EOI, 0, 0).eoi_level_vector, Some(0x41));
        apic.accept(0x0e, false);
        assert!(!apic.requested(0x0e));
        write(&mut apic, REG_ESR, 0, 0);
        assert_eq!(read(&apic, REG_ESR, 0), ESR_RECEIVE_ILLEGAL_VECTOR);
        write(&mut apic, REG_ESR, 0, 0);
        assert_eq!(read(&apic, REG_ESR, 0), 0);
    }

    #[test]
    fn icr_writes_leave_as_ipis_and_illegal_vectors_set_esr() {
        let mut apic = enabled_apic();
        let self_ipi = write(&mut apic, REG_ICR_LOW, 0x0004_0070, 0).ipi.unwrap();
        assert_eq!((self_ipi.vector, self_ipi.shorthand), (0x70, Shorthand::SelfOnly));
        assert!(!apic.requested(0x70), "the router delivers, not the sender");
        let init = write(&mut apic, REG_ICR_LOW, 0x0000_5500, 0).ipi.unwrap();
        assert_eq!(init.delivery, DeliveryMode::Init);
        assert_eq!(read(&apic, REG_ICR_LOW, 0), 0x4500, "delivery status is read-only");
        write(&mut apic, REG_ICR_HIGH, 0x0100_0000, 0);
        assert_eq!(write(&mut apic, REG_ICR_LOW, 0x72, 0).ipi.unwrap().destination, 1);
        assert_eq!(write(&mut apic, REG_ICR_LOW, 0x0f, 0).ipi, None);
        write(&mut apic, REG_ESR, 0, 0);
        assert_eq!(read(&apic, REG_ESR, 0), ESR_SEND_ILLEGAL_VECTOR);
    }

    #[test]
    fn application_processor_ids_and_logical_ids() {
        let mut ap = LocalApic::with_id(TSC_HZ, 0x13);
        assert_eq!(ap.apic_base(), 0xfee0_0800, "not the BSP");
        assert_eq!(read(&ap, REG_ID, 0), 0x1300_0000);
        ap.write_apic_base(0xfee0_0c00).unwrap();
        assert_eq!(ap.msr_read(0x802, 0), Ok(0x13));
        assert_eq!(ap.msr_read(0x80d, 0), Ok(0x0001_0008), "cluster 1, bit 3");
        assert_eq!(ap.view().ldr, 0x0001_0008);
        ap.msr_write(0x808, 0x20, 0, 0).unwrap();
        ap.init();
        assert_eq!((ap.msr_read(0x808, 0), ap.apic_base()), (Ok(0), 0xfee0_0c00), "INIT keeps the base");
    }

    #[test]
    fn one_shot_timer_fires_once_after_count_times_divisor() {
        let mut apic = enabled_apic();
        write(&mut apic, REG_DIVIDE, 0x3, 1000); // divide by 16
        write(&mut apic, REG_LVT_TIMER, 0x40, 1000);
        write(&mut apic, REG_INITIAL_COUNT, 100, 1000);
        assert_eq!(apic.next_deadline_ns(), Some(2600));
        assert_eq!(read(&apic, REG_CURRENT_COUNT, 1000), 100);
        assert_eq!(read(&apic, REG_CURRENT_COUNT, 1800), 50);
        apic.poll(2599);
        assert!(!apic.requested(0x40));
        apic.poll(2600);
        assert!(apic.requested(0x40));
        assert_eq!(apic.next_deadline_ns(), None);
        assert_eq!(read(&apic, REG_CURRENT_COUNT, 3000), 0);
    }

    #[test]
    fn periodic_timer_rearms_from_the_previous_deadline() {
        let mut apic = enabled_apic();
        write(&mut apic, REG_DIVIDE, 0xb, 0); // divide by 1
        write(&mut apic, REG_LVT_TIMER, 0x2_0050, 0);
        write(&mut apic, REG_INITIAL_COUNT, 1000, 0);
        apic.poll(1250);
        assert!(apic.acknowledge(0x50));
        assert_eq!(apic.next_deadline_ns(), Some(2000), "not 2250");
        assert_eq!(read(&apic, REG_CURRENT_COUNT, 1250), 750);
        write(&mut apic, REG_EOI, 0, 1250);
        apic.poll(2000);
        assert!(apic.requested(0x50));
        // A late poll skips the missed rounds but stays on the 1000 ns grid.
        apic.poll(5300);
        assert_eq!(apic.next_deadline_ns(), Some(6000));
        assert_eq!(read(&apic, REG_CURRENT_COUNT, 6100), 900);
    }

    #[test]
    fn masked_timer_does_not_request() {
        let mut apic = enabled_apic();
        write(&mut apic, REG_DIVIDE, 0xb, 0);
        write(&mut apic, REG_LVT_TIMER, 0x1_0040, 0);
        write(&mut apic, REG_INITIAL_COUNT, 10, 0);
        apic.poll(10);
        assert!(!apic.requested(0x40));
        assert_eq!(apic.next_deadline_ns(), None);
    }

    #[test]
    fn tsc_deadline_fires_at_the_converted_time_and_disarms_on_zero() {
        let mut apic = enabled_apic();
        // Ignored outside TSC-deadline mode.
        apic.msr_write(MSR_TSC_DEADLINE, 5000, 0, 0).unwrap();
        assert_eq!(apic.next_deadline_ns(), None);
        write(&mut apic, REG_LVT_TIMER, 0x4_00e0, 100);
        // At 100 ns the guest TSC reads 200 (2 GHz); 2000 more ticks are 1000 ns.
        apic.msr_write(MSR_TSC_DEADLINE, 2200, 100, 200).unwrap();
        assert_eq!(apic.next_deadline_ns(), Some(1100));
        assert_eq!(apic.msr_read(MSR_TSC_DEADLINE, 100), Ok(2200));
        apic.msr_write(MSR_TSC_DEADLINE, 0, 200, 400).unwrap();
        assert_eq!(apic.next_deadline_ns(), None);
        apic.poll(2000);
        assert!(!apic.requested(0xe0));
        apic.msr_write(MSR_TSC_DEADLINE, 4400, 2000, 4000).unwrap();
        apic.poll(2199);
        assert!(!apic.requested(0xe0));
        apic.poll(2200);
        assert!(apic.requested(0xe0));
        assert_eq!(apic.msr_read(MSR_TSC_DEADLINE, 2200), Ok(0));
        // The counting registers are inert in this mode.
        write(&mut apic, REG_INITIAL_COUNT, 10, 2200);
        assert_eq!((read(&apic, REG_INITIAL_COUNT, 2200), apic.next_deadline_ns()), (0, None));
    }

    #[test]
    fn x2apic_msrs_need_x2apic_mode_and_enforce_access_rules() {
        let mut apic = enabled_apic();
        assert_eq!(apic.msr_read(0x808, 0), Err(()));
        assert_eq!(apic.write_apic_base(0xfee0_0000 | BASE_X2APIC), Err(()), "invalid state");
        assert_eq!(apic.write_apic_base(0xfee0_0d00 | 1), Err(()), "reserved bit");
        assert_eq!(apic.write_apic_base(0xfed0_0c00), Err(()), "moved base");
        apic.write_apic_base(0xfee0_0c00).unwrap();
        assert_eq!(apic.apic_base(), 0xfee0_0d00);
        assert_eq!(apic.mmio_read(REG_VERSION.into(), 4, 0), 0, "MMIO is off in x2APIC mode");
        assert_eq!(apic.msr_read(0x803, 0), Ok(0x0005_0014));
        assert_eq!(apic.msr_read(0x80d, 0), Ok(1));
        apic.msr_write(0x808, 0x20, 0, 0).unwrap();
        assert_eq!(apic.msr_read(0x80a, 0), Ok(0x20));
        assert_eq!(apic.msr_write(0x808, 0x100, 0, 0), Err(()), "reserved TPR bits");
        assert_eq!(apic.msr_read(0x80b, 0), Err(()), "EOI is write-only");
        assert_eq!(apic.msr_write(0x803, 0, 0, 0), Err(()), "version is read-only");
        assert_eq!(apic.msr_write(0x839, 0, 0, 0), Err(()), "current count is read-only");
        assert_eq!(apic.msr_write(0x80b, 1, 0, 0), Err(()));
        assert_eq!(apic.msr_read(0x831, 0), Err(()), "no ICR high in x2APIC");
        assert_eq!(apic.msr_write(0x83f, 0x55, 0, 0), Ok(ApicEffect::default()));
        assert!(apic.requested(0x55));
        let ipi = apic.msr_write(0x830, 0x3_0000_0056, 0, 0).unwrap().ipi.unwrap();
        assert_eq!(apic.msr_read(0x830, 0), Ok(0x3_0000_0056));
        assert_eq!((ipi.destination, ipi.x2apic), (3, true));
        apic.accept(0x57, true);
        assert!(apic.acknowledge(0x57));
        assert_eq!(apic.msr_write(0x80b, 0, 0, 0).map(|e| e.eoi_level_vector), Ok(Some(0x57)));
        assert_eq!(apic.write_apic_base(0xfee0_0800), Err(()), "x2APIC -> xAPIC is illegal");
        apic.write_apic_base(0xfee0_0000).unwrap();
        assert!(!apic.enabled() && !apic.requested(0x55), "hardware disable resets the APIC");
        assert_eq!(apic.msr_read(0x808, 0), Err(()));
        apic.write_apic_base(0xfee0_0800).unwrap();
        assert_eq!(read(&apic, REG_SVR, 0), 0xff);
    }
}
