//! VMCS field encodings (Intel SDM Vol. 3, Appendix B), typed by width.
//!
//! A field's width is part of its type, so a 16-bit field cannot be handed to the 64-bit writer
//! and read-only exit-information fields have no writer at all.

use core::marker::PhantomData;

/// The width of a VMCS field and the Rust type its value travels in.
pub trait Width {
    /// The value type.
    type Value: Copy + Default;
    /// Widens a value for VMWRITE.
    fn to_raw(value: Self::Value) -> u64;
    /// Narrows a VMREAD result (the upper bits are zero for narrow fields).
    fn from_raw(raw: u64) -> Self::Value;
}

/// 16-bit fields.
pub enum W16 {}
/// 32-bit fields.
pub enum W32 {}
/// 64-bit fields (full access; the "high" encodings are not used in 64-bit mode).
pub enum W64 {}
/// Natural-width fields (64 bits on a 64-bit host).
pub enum Natural {}

impl Width for W16 {
    type Value = u16;
    fn to_raw(value: u16) -> u64 {
        value.into()
    }
    fn from_raw(raw: u64) -> u16 {
        raw as u16
    }
}

impl Width for W32 {
    type Value = u32;
    fn to_raw(value: u32) -> u64 {
        value.into()
    }
    fn from_raw(raw: u64) -> u32 {
        raw as u32
    }
}

impl Width for W64 {
    type Value = u64;
    fn to_raw(value: u64) -> u64 {
        value
    }
    fn from_raw(raw: u64) -> u64 {
        raw
    }
}

impl Width for Natural {
    type Value = u64;
    fn to_raw(value: u64) -> u64 {
        value
    }
    fn from_raw(raw: u64) -> u64 {
        raw
    }
}

/// A read-write VMCS field of width `W`.
pub struct Field<W: Width> {
    encoding: u32,
    width: PhantomData<W>,
}

/// A read-only VMCS field (VM-exit information) of width `W`.
pub struct ReadOnly<W: Width> {
    encoding: u32,
    width: PhantomData<W>,
}

impl<W: Width> Clone for Field<W> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<W: Width> Copy for Field<W> {}
impl<W: Width> Clone for ReadOnly<W> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<W: Width> Copy for ReadOnly<W> {}

impl<W: Width> Field<W> {
    const fn new(encoding: u32) -> Self {
        Field { encoding, width: PhantomData }
    }

    /// The encoding passed to VMREAD/VMWRITE.
    pub const fn encoding(self) -> u32 {
        self.encoding
    }
}

impl<W: Width> ReadOnly<W> {
    const fn new(encoding: u32) -> Self {
        ReadOnly { encoding, width: PhantomData }
    }

    /// The encoding passed to VMREAD.
    pub const fn encoding(self) -> u32 {
        self.encoding
    }
}

/// Anything VMREAD may read.
pub trait Readable<W: Width>: Copy {
    /// The encoding.
    fn encoding(self) -> u32;
}

impl<W: Width> Readable<W> for Field<W> {
    fn encoding(self) -> u32 {
        self.encoding
    }
}

impl<W: Width> Readable<W> for ReadOnly<W> {
    fn encoding(self) -> u32 {
        self.encoding
    }
}

/// 16-bit fields.
pub mod w16 {
    use super::{Field, W16};

    pub const VPID: Field<W16> = Field::new(0x0000);

    pub const GUEST_ES_SELECTOR: Field<W16> = Field::new(0x0800);
    pub const GUEST_CS_SELECTOR: Field<W16> = Field::new(0x0802);
    pub const GUEST_SS_SELECTOR: Field<W16> = Field::new(0x0804);
    pub const GUEST_DS_SELECTOR: Field<W16> = Field::new(0x0806);
    pub const GUEST_FS_SELECTOR: Field<W16> = Field::new(0x0808);
    pub const GUEST_GS_SELECTOR: Field<W16> = Field::new(0x080a);
    pub const GUEST_LDTR_SELECTOR: Field<W16> = Field::new(0x080c);
    pub const GUEST_TR_SELECTOR: Field<W16> = Field::new(0x080e);

    pub const HOST_ES_SELECTOR: Field<W16> = Field::new(0x0c00);
    pub const HOST_CS_SELECTOR: Field<W16> = Field::new(0x0c02);
    pub const HOST_SS_SELECTOR: Field<W16> = Field::new(0x0c04);
    pub const HOST_DS_SELECTOR: Field<W16> = Field::new(0x0c06);
    pub const HOST_FS_SELECTOR: Field<W16> = Field::new(0x0c08);
    pub const HOST_GS_SELECTOR: Field<W16> = Field::new(0x0c0a);
    pub const HOST_TR_SELECTOR: Field<W16> = Field::new(0x0c0c);
}

/// 64-bit fields.
pub mod w64 {
    use super::{Field, ReadOnly, W64};

    pub const IO_BITMAP_A: Field<W64> = Field::new(0x2000);
    pub const IO_BITMAP_B: Field<W64> = Field::new(0x2002);
    pub const MSR_BITMAP: Field<W64> = Field::new(0x2004);
    pub const EXIT_MSR_STORE_ADDRESS: Field<W64> = Field::new(0x2006);
    pub const ENTRY_MSR_LOAD_ADDRESS: Field<W64> = Field::new(0x200a);
    pub const TSC_OFFSET: Field<W64> = Field::new(0x2010);
    pub const EPT_POINTER: Field<W64> = Field::new(0x201a);

    pub const GUEST_PHYSICAL_ADDRESS: ReadOnly<W64> = ReadOnly::new(0x2400);

    pub const VMCS_LINK_POINTER: Field<W64> = Field::new(0x2800);
    pub const GUEST_IA32_DEBUGCTL: Field<W64> = Field::new(0x2802);
    pub const GUEST_IA32_PAT: Field<W64> = Field::new(0x2804);
    pub const GUEST_IA32_EFER: Field<W64> = Field::new(0x2806);

    pub const HOST_IA32_PAT: Field<W64> = Field::new(0x2c00);
    pub const HOST_IA32_EFER: Field<W64> = Field::new(0x2c02);
}

/// 32-bit fields.
pub mod w32 {
    use super::{Field, ReadOnly, W32};

    pub const PIN_BASED_CONTROLS: Field<W32> = Field::new(0x4000);
    pub const PRIMARY_PROCESSOR_CONTROLS: Field<W32> = Field::new(0x4002);
    pub const EXCEPTION_BITMAP: Field<W32> = Field::new(0x4004);
    pub const PAGE_FAULT_ERROR_MASK: Field<W32> = Field::new(0x4006);
    pub const PAGE_FAULT_ERROR_MATCH: Field<W32> = Field::new(0x4008);
    pub const CR3_TARGET_COUNT: Field<W32> = Field::new(0x400a);
    pub const EXIT_CONTROLS: Field<W32> = Field::new(0x400c);
    pub const EXIT_MSR_STORE_COUNT: Field<W32> = Field::new(0x400e);
    pub const EXIT_MSR_LOAD_COUNT: Field<W32> = Field::new(0x4010);
    pub const ENTRY_CONTROLS: Field<W32> = Field::new(0x4012);
    pub const ENTRY_MSR_LOAD_COUNT: Field<W32> = Field::new(0x4014);
    pub const ENTRY_INTERRUPTION_INFO: Field<W32> = Field::new(0x4016);
    pub const ENTRY_EXCEPTION_ERROR_CODE: Field<W32> = Field::new(0x4018);
    pub const ENTRY_INSTRUCTION_LENGTH: Field<W32> = Field::new(0x401a);
    pub const SECONDARY_PROCESSOR_CONTROLS: Field<W32> = Field::new(0x401e);
    pub const PLE_GAP: Field<W32> = Field::new(0x4020);
    pub const PLE_WINDOW: Field<W32> = Field::new(0x4022);

    pub const VM_INSTRUCTION_ERROR: ReadOnly<W32> = ReadOnly::new(0x4400);
    pub const EXIT_REASON: ReadOnly<W32> = ReadOnly::new(0x4402);
    pub const EXIT_INTERRUPTION_INFO: ReadOnly<W32> = ReadOnly::new(0x4404);
    pub const EXIT_INTERRUPTION_ERROR_CODE: ReadOnly<W32> = ReadOnly::new(0x4406);
    pub const IDT_VECTORING_INFO: ReadOnly<W32> = ReadOnly::new(0x4408);
    pub const IDT_VECTORING_ERROR_CODE: ReadOnly<W32> = ReadOnly::new(0x440a);
    pub const EXIT_INSTRUCTION_LENGTH: ReadOnly<W32> = ReadOnly::new(0x440c);

    pub const GUEST_ES_LIMIT: Field<W32> = Field::new(0x4800);
    pub const GUEST_CS_LIMIT: Field<W32> = Field::new(0x4802);
    pub const GUEST_SS_LIMIT: Field<W32> = Field::new(0x4804);
    pub const GUEST_DS_LIMIT: Field<W32> = Field::new(0x4806);
    pub const GUEST_FS_LIMIT: Field<W32> = Field::new(0x4808);
    pub const GUEST_GS_LIMIT: Field<W32> = Field::new(0x480a);
    pub const GUEST_LDTR_LIMIT: Field<W32> = Field::new(0x480c);
    pub const GUEST_TR_LIMIT: Field<W32> = Field::new(0x480e);
    pub const GUEST_GDTR_LIMIT: Field<W32> = Field::new(0x4810);
    pub const GUEST_IDTR_LIMIT: Field<W32> = Field::new(0x4812);
    pub const GUEST_ES_ACCESS_RIGHTS: Field<W32> = Field::new(0x4814);
    pub const GUEST_CS_ACCESS_RIGHTS: Field<W32> = Field::new(0x4816);
    pub const GUEST_SS_ACCESS_RIGHTS: Field<W32> = Field::new(0x4818);
    pub const GUEST_DS_ACCESS_RIGHTS: Field<W32> = Field::new(0x481a);
    pub const GUEST_FS_ACCESS_RIGHTS: Field<W32> = Field::new(0x481c);
    pub const GUEST_GS_ACCESS_RIGHTS: Field<W32> = Field::new(0x481e);
    pub const GUEST_LDTR_ACCESS_RIGHTS: Field<W32> = Field::new(0x4820);
    pub const GUEST_TR_ACCESS_RIGHTS: Field<W32> = Field::new(0x4822);
    pub const GUEST_INTERRUPTIBILITY: Field<W32> = Field::new(0x4824);
    pub const GUEST_ACTIVITY_STATE: Field<W32> = Field::new(0x4826);
    pub const GUEST_SYSENTER_CS: Field<W32> = Field::new(0x482a);
    pub const VMX_PREEMPTION_TIMER_VALUE: Field<W32> = Field::new(0x482e);

    pub const HOST_SYSENTER_CS: Field<W32> = Field::new(0x4c00);
}

/// Natural-width fields.
pub mod natural {
    use super::{Field, Natural, ReadOnly};

    pub const CR0_GUEST_HOST_MASK: Field<Natural> = Field::new(0x6000);
    pub const CR4_GUEST_HOST_MASK: Field<Natural> = Field::new(0x6002);
    pub const CR0_READ_SHADOW: Field<Natural> = Field::new(0x6004);
    pub const CR4_READ_SHADOW: Field<Natural> = Field::new(0x6006);

    pub const EXIT_QUALIFICATION: ReadOnly<Natural> = ReadOnly::new(0x6400);

    pub const GUEST_CR0: Field<Natural> = Field::new(0x6800);
    pub const GUEST_CR3: Field<Natural> = Field::new(0x6802);
    pub const GUEST_CR4: Field<Natural> = Field::new(0x6804);
    pub const GUEST_ES_BASE: Field<Natural> = Field::new(0x6806);
    pub const GUEST_CS_BASE: Field<Natural> = Field::new(0x6808);
    pub const GUEST_SS_BASE: Field<Natural> = Field::new(0x680a);
    pub const GUEST_DS_BASE: Field<Natural> = Field::new(0x680c);
    pub const GUEST_FS_BASE: Field<Natural> = Field::new(0x680e);
    pub const GUEST_GS_BASE: Field<Natural> = Field::new(0x6810);
    pub const GUEST_LDTR_BASE: Field<Natural> = Field::new(0x6812);
    pub const GUEST_TR_BASE: Field<Natural> = Field::new(0x6814);
    pub const GUEST_GDTR_BASE: Field<Natural> = Field::new(0x6816);
    pub const GUEST_IDTR_BASE: Field<Natural> = Field::new(0x6818);
    pub const GUEST_DR7: Field<Natural> = Field::new(0x681a);
    pub const GUEST_RSP: Field<Natural> = Field::new(0x681c);
    pub const GUEST_RIP: Field<Natural> = Field::new(0x681e);
    pub const GUEST_RFLAGS: Field<Natural> = Field::new(0x6820);
    pub const GUEST_PENDING_DEBUG_EXCEPTIONS: Field<Natural> = Field::new(0x6822);
    pub const GUEST_SYSENTER_ESP: Field<Natural> = Field::new(0x6824);
    pub const GUEST_SYSENTER_EIP: Field<Natural> = Field::new(0x6826);

    pub const HOST_CR0: Field<Natural> = Field::new(0x6c00);
    pub const HOST_CR3: Field<Natural> = Field::new(0x6c02);
    pub const HOST_CR4: Field<Natural> = Field::new(0x6c04);
    pub const HOST_FS_BASE: Field<Natural> = Field::new(0x6c06);
    pub const HOST_GS_BASE: Field<Natural> = Field::new(0x6c08);
    pub const HOST_TR_BASE: Field<Natural> = Field::new(0x6c0a);
    pub const HOST_GDTR_BASE: Field<Natural> = Field::new(0x6c0c);
    pub const HOST_IDTR_BASE: Field<Natural> = Field::new(0x6c0e);
    pub const HOST_SYSENTER_ESP: Field<Natural> = Field::new(0x6c10);
    pub const HOST_SYSENTER_EIP: Field<Natural> = Field::new(0x6c12);
    /// Written by the world switch itself (the encoding is repeated there).
    pub const HOST_RSP: Field<Natural> = Field::new(0x6c14);
    pub const HOST_RIP: Field<Natural> = Field::new(0x6c16);
}
