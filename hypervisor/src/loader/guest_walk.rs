//! A software walk of the guest's own page tables: guest-virtual to guest-physical translation as
//! the CPU would do it in the guest's current paging mode, with the architectural #PF error code
//! when the access is not allowed.
//!
//! Supported: paging off, 32-bit paging (4 KiB pages, 4 MiB pages with CR4.PSE and PSE-36), PAE
//! paging (4 KiB / 2 MiB), 4-level and 5-level (CR4.LA57) paging (4 KiB / 2 MiB / 1 GiB).
//! Permission checks cover present, R/W (with CR0.WP), U/S, NX (with EFER.NXE) and CR4.SMEP.
//!
//! Not modelled: setting accessed/dirty bits (the walk only reads guest memory), SMAP (it needs
//! RFLAGS.AC and the access's implicit/explicit nature), protection keys, and a MAXPHYADDR below
//! 52 (physical address bits above the real limit are not reported as reserved). In PAE mode the
//! PDPTEs are read from memory at walk time rather than from the CPU's PDPTE registers loaded at
//! the last MOV to CR3.

use alloc::vec::Vec;
use core::fmt;

use super::{GuestMemory, MemError};
use crate::vcpu::GuestMode;
use crate::vm::control_regs::{CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PSE, CR4_SMEP, EFER_LMA, EFER_NXE};

const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;
const PTE_XD: u64 = 1 << 63;
/// Physical-address bits 51:12 of a 64-bit paging entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// #PF error code: the fault was a protection violation (clear: the page was not present).
pub const PF_PRESENT: u32 = 1 << 0;
/// #PF error code: the access was a write.
pub const PF_WRITE: u32 = 1 << 1;
/// #PF error code: the access was a user-mode access.
pub const PF_USER: u32 = 1 << 2;
/// #PF error code: a reserved bit was set in a paging-structure entry.
pub const PF_RSVD: u32 = 1 << 3;
/// #PF error code: the access was an instruction fetch (reported only when NX or SMEP is on).
pub const PF_FETCH: u32 = 1 << 4;

/// The kind of access being translated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// A write (a read otherwise).
    pub write: bool,
    /// An instruction fetch.
    pub fetch: bool,
    /// A user-mode (CPL 3) access (supervisor otherwise).
    pub user: bool,
}

impl Access {
    /// A supervisor data read.
    pub const READ: Access = Access { write: false, fetch: false, user: false };
    /// A supervisor data write.
    pub const WRITE: Access = Access { write: true, fetch: false, user: false };
    /// A supervisor instruction fetch.
    pub const FETCH: Access = Access { write: false, fetch: true, user: false };
}

/// Why a translation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// The guest takes a page fault: inject #PF with `error_code` and CR2 = `gva`.
    PageFault {
        /// The faulting linear address (for a multi-page access, the first byte of the page that
        /// faulted).
        gva: u64,
        /// Architectural #PF error code ([`PF_PRESENT`] | [`PF_WRITE`] | ...).
        error_code: u32,
    },
    /// A non-canonical address in long mode: the guest takes #GP(0) (or #SS for stack accesses).
    NonCanonical {
        /// The address.
        gva: u64,
    },
    /// A paging structure or the data lies outside guest memory.
    Memory(MemError),
}

impl From<MemError> for WalkError {
    fn from(e: MemError) -> Self {
        WalkError::Memory(e)
    }
}

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WalkError::PageFault { gva, error_code } => write!(
                f,
                "page fault at {gva:#x} (error code {error_code:#x}: {}{}{}{}{})",
                if error_code & PF_PRESENT != 0 { "protection" } else { "not present" },
                if error_code & PF_WRITE != 0 { ", write" } else { ", read" },
                if error_code & PF_USER != 0 { ", user" } else { ", supervisor" },
                if error_code & PF_RSVD != 0 { ", reserved bit" } else { "" },
                if error_code & PF_FETCH != 0 { ", fetch" } else { "" },
            ),
            WalkError::NonCanonical { gva } => write!(f, "non-canonical address {gva:#x}"),
            WalkError::Memory(e) => write!(f, "page walk: {e}"),
        }
    }
}

/// Effective rights of a translation, accumulated over all levels.
#[derive(Clone, Copy)]
struct Rights {
    write: bool,
    user: bool,
    nx: bool,
}

impl Rights {
    const ALL: Rights = Rights { write: true, user: true, nx: false };

    fn add(&mut self, entry: u64, nxe: bool) {
        self.write &= entry & PTE_RW != 0;
        self.user &= entry & PTE_US != 0;
        self.nx |= nxe && entry & PTE_XD != 0;
    }
}

/// How a walk ended before the permission check.
enum Stop {
    NotPresent,
    Reserved,
    Memory(MemError),
}

impl From<MemError> for Stop {
    fn from(e: MemError) -> Self {
        Stop::Memory(e)
    }
}

/// A mask of bits `hi:lo` (inclusive).
const fn bits(hi: u32, lo: u32) -> u64 {
    (u64::MAX >> (63 - hi)) & !((1u64 << lo) - 1)
}

/// Translates a guest-virtual (linear) address to guest-physical for `access` in the guest's
/// current paging mode.
pub fn translate(mem: &impl GuestMemory, mode: &GuestMode, gva: u64, access: Access) -> Result<u64, WalkError> {
    let long = mode.efer & EFER_LMA != 0;
    if mode.cr0 & CR0_PG == 0 {
        return Ok(if long { gva } else { gva & 0xffff_ffff });
    }
    let pae_or_long = long || mode.cr4 & CR4_PAE != 0;
    let nxe = pae_or_long && mode.efer & EFER_NXE != 0;
    let smep = mode.cr4 & CR4_SMEP != 0;
    let gva = if long { gva } else { gva & 0xffff_ffff };

    let walked = if long {
        let la57 = mode.cr4 & CR4_LA57 != 0;
        let width = if la57 { 57 } else { 48 };
        let shift = 64 - width;
        if (((gva << shift) as i64) >> shift) as u64 != gva {
            return Err(WalkError::NonCanonical { gva });
        }
        walk_long(mem, mode.cr3, gva, if la57 { 5 } else { 4 }, nxe)
    } else if mode.cr4 & CR4_PAE != 0 {
        walk_pae(mem, mode.cr3, gva, nxe)
    } else {
        walk_legacy(mem, mode.cr3, gva, mode.cr4 & CR4_PSE != 0)
    };

    let mut error_code = 0;
    if access.write {
        error_code |= PF_WRITE;
    }
    if access.user {
        error_code |= PF_USER;
    }
    if access.fetch && (smep || nxe) {
        error_code |= PF_FETCH;
    }
    let fault = |code: u32| Err(WalkError::PageFault { gva, error_code: code });
    let (gpa, rights) = match walked {
        Ok(t) => t,
        Err(Stop::NotPresent) => return fault(error_code),
        Err(Stop::Reserved) => return fault(error_code | PF_PRESENT | PF_RSVD),
        Err(Stop::Memory(e)) => return Err(WalkError::Memory(e)),
    };
    let allowed = if access.user {
        rights.user && (!access.write || rights.write)
    } else {
        (!access.write || rights.write || mode.cr0 & CR0_WP == 0) && !(access.fetch && smep && rights.user)
    };
    if !allowed || (access.fetch && rights.nx) {
        return fault(error_code | PF_PRESENT);
    }
    Ok(gpa)
}

/// 4-level or 5-level paging.
fn walk_long(mem: &impl GuestMemory, cr3: u64, gva: u64, levels: u32, nxe: bool) -> Result<(u64, Rights), Stop> {
    let mut table = cr3 & ADDR_MASK;
    let mut rights = Rights::ALL;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        // `table` is 4 KiB aligned and the index is below 512, so this cannot overflow.
        let entry = mem.read_u64(table | (((gva >> shift) & 0x1ff) * 8))?;
        if entry & PTE_P == 0 {
            return Err(Stop::NotPresent);
        }
        if !nxe && entry & PTE_XD != 0 {
            return Err(Stop::Reserved);
        }
        let large = entry & PTE_PS != 0 && level > 1;
        if large {
            match level {
                // 1 GiB page: bits 29:13 reserved; 2 MiB page: bits 20:13 reserved.
                3 | 2 if entry & bits(shift - 1, 13) != 0 => return Err(Stop::Reserved),
                3 | 2 => {}
                // PS is reserved in PML4 and PML5 entries.
                _ => return Err(Stop::Reserved),
            }
        }
        rights.add(entry, nxe);
        if level == 1 || large {
            let offset = bits(shift - 1, 0);
            return Ok(((entry & ADDR_MASK & !offset) | (gva & offset), rights));
        }
        table = entry & ADDR_MASK;
    }
    // `levels` is 4 or 5, so the loop always returns.
    Err(Stop::NotPresent)
}

/// PAE paging: 4 PDPTEs at CR3[31:5], then a PD and a PT of 64-bit entries.
fn walk_pae(mem: &impl GuestMemory, cr3: u64, gva: u64, nxe: bool) -> Result<(u64, Rights), Stop> {
    let pdpt = cr3 & 0xffff_ffe0;
    let pdpte = mem.read_u64(pdpt + ((gva >> 30) & 3) * 8)?;
    if pdpte & PTE_P == 0 {
        return Err(Stop::NotPresent);
    }
    if pdpte & (bits(2, 1) | bits(8, 5) | PTE_XD) != 0 {
        return Err(Stop::Reserved);
    }
    let mut rights = Rights::ALL;
    let mut table = pdpte & ADDR_MASK;
    for level in [2u32, 1] {
        let shift = 12 + 9 * (level - 1);
        let entry = mem.read_u64(table | (((gva >> shift) & 0x1ff) * 8))?;
        if entry & PTE_P == 0 {
            return Err(Stop::NotPresent);
        }
        if !nxe && entry & PTE_XD != 0 {
            return Err(Stop::Reserved);
        }
        let large = level == 2 && entry & PTE_PS != 0;
        if large && entry & bits(20, 13) != 0 {
            return Err(Stop::Reserved);
        }
        rights.add(entry, nxe);
        if level == 1 || large {
            let offset = bits(shift - 1, 0);
            return Ok(((entry & ADDR_MASK & !offset) | (gva & offset), rights));
        }
        table = entry & ADDR_MASK;
    }
    Err(Stop::NotPresent)
}

/// 32-bit paging: a PD and a PT of 32-bit entries; 4 MiB pages with CR4.PSE (PSE-36 supplies
/// physical bits 39:32 from PDE bits 20:13).
fn walk_legacy(mem: &impl GuestMemory, cr3: u64, gva: u64, pse: bool) -> Result<(u64, Rights), Stop> {
    let pd = cr3 & 0xffff_f000;
    let pde = u64::from(mem.read_u32(pd + ((gva >> 22) & 0x3ff) * 4)?);
    if pde & PTE_P == 0 {
        return Err(Stop::NotPresent);
    }
    let mut rights = Rights::ALL;
    rights.add(pde, false);
    if pse && pde & PTE_PS != 0 {
        if pde & (1 << 21) != 0 {
            return Err(Stop::Reserved);
        }
        let base = (pde & 0xffc0_0000) | (((pde >> 13) & 0xff) << 32);
        return Ok((base | (gva & 0x3f_ffff), rights));
    }
    let pte = u64::from(mem.read_u32((pde & 0xffff_f000) + ((gva >> 12) & 0x3ff) * 4)?);
    if pte & PTE_P == 0 {
        return Err(Stop::NotPresent);
    }
    rights.add(pte, false);
    Ok(((pte & 0xffff_f000) | (gva & 0xfff), rights))
}

/// The next linear address after `gva + n`, wrapping the way the mode's address space does.
fn advance(mode: &GuestMode, gva: u64, n: usize) -> u64 {
    let next = gva.wrapping_add(n as u64);
    if mode.efer & EFER_LMA != 0 {
        next
    } else {
        next & 0xffff_ffff
    }
}

/// Bytes from `gva` to the end of its 4 KiB page, capped at `max`.
fn chunk(gva: u64, max: usize) -> usize {
    let to_page_end = 0x1000 - (gva & 0xfff);
    usize::try_from(to_page_end).map_or(max, |n| n.min(max))
}

/// Reads `buf.len()` bytes at guest-virtual `gva` as a supervisor data read, across page
/// boundaries.
pub fn read_virt(mem: &impl GuestMemory, mode: &GuestMode, gva: u64, buf: &mut [u8]) -> Result<(), WalkError> {
    read_virt_access(mem, mode, gva, Access::READ, buf)
}

/// Reads `buf.len()` bytes at guest-virtual `gva` with the given access kind (e.g.
/// [`Access::FETCH`] for instruction bytes), across page boundaries. On a fault, the
/// [`WalkError::PageFault`] names the first byte of the faulting page (or `gva`).
pub fn read_virt_access(
    mem: &impl GuestMemory,
    mode: &GuestMode,
    gva: u64,
    access: Access,
    buf: &mut [u8],
) -> Result<(), WalkError> {
    let mut va = gva;
    let mut rest = buf;
    while !rest.is_empty() {
        let n = chunk(va, rest.len());
        let gpa = translate(mem, mode, va, access)?;
        let (now, later) = rest.split_at_mut(n);
        mem.read(gpa, now)?;
        rest = later;
        va = advance(mode, va, n);
    }
    Ok(())
}

/// Writes `data` at guest-virtual `gva` as a supervisor data write, across page boundaries. Every
/// page is translated before anything is written, so a fault leaves memory unchanged, and the
/// write goes where those translations point even when its first bytes rewrite the page tables
/// that map the rest.
pub fn write_virt(mem: &mut impl GuestMemory, mode: &GuestMode, gva: u64, data: &[u8]) -> Result<(), WalkError> {
    let mut pieces: Vec<(u64, usize)> = Vec::new();
    let mut va = gva;
    let mut left = data.len();
    while left > 0 {
        let n = chunk(va, left);
        let gpa = translate(mem, mode, va, Access::WRITE)?;
        // Check the physical range too, so the writes cannot fail half-way.
        let end = gpa.checked_add(n as u64).ok_or(MemError::OutOfRange { gpa, len: n as u64 })?;
        if end > mem.size() {
            return Err(MemError::OutOfRange { gpa, len: n as u64 }.into());
        }
        pieces.push((gpa, n));
        left -= n;
        va = advance(mode, va, n);
    }
    let mut rest = data;
    for (gpa, n) in pieces {
        let (now, later) = rest.split_at(n);
        mem.write(gpa, now)?;
        rest = later;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::SliceMemory;
    use alloc::string::ToString;
    use alloc::vec;
    use alloc::vec::Vec;

    const RW: u64 = PTE_RW;
    const US: u64 = PTE_US;
    const P: u64 = PTE_P;

    /// Guest memory plus a bump allocator for page tables.
    struct Tables {
        mem: Vec<u8>,
        next: u64,
    }

    impl Tables {
        fn new(size: usize) -> Self {
            Tables { mem: vec![0; size], next: 0x1000 }
        }

        fn alloc(&mut self) -> u64 {
            let t = self.next;
            self.next += 0x1000;
            t
        }

        fn set64(&mut self, gpa: u64, v: u64) {
            let g = gpa as usize;
            self.mem[g..g + 8].copy_from_slice(&v.to_le_bytes());
        }

        fn get64(&self, gpa: u64) -> u64 {
            let g = gpa as usize;
            u64::from_le_bytes(self.mem[g..g + 8].try_into().unwrap())
        }

        fn set32(&mut self, gpa: u64, v: u32) {
            let g = gpa as usize;
            self.mem[g..g + 4].copy_from_slice(&v.to_le_bytes());
        }

        /// Maps `gva` to `gpa` in 4-level tables rooted at `root`, with the leaf at `leaf_level`
        /// (1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB). Intermediate entries get `upper` flags.
        fn map(&mut self, root: u64, gva: u64, gpa: u64, leaf_level: u32, leaf: u64, upper: u64) {
            let mut table = root;
            for level in (leaf_level..=4).rev() {
                let slot = table + ((gva >> (12 + 9 * (level - 1))) & 0x1ff) * 8;
                if level == leaf_level {
                    let ps = if level > 1 { PTE_PS } else { 0 };
                    self.set64(slot, gpa | leaf | ps);
                    return;
                }
                let e = self.get64(slot);
                table = if e & P != 0 {
                    e & ADDR_MASK
                } else {
                    let t = self.alloc();
                    self.set64(slot, t | upper);
                    t
                };
            }
        }

        fn translate(&self, mode: &GuestMode, gva: u64, access: Access) -> Result<u64, WalkError> {
            let mut copy = self.mem.clone();
            translate(&SliceMemory(&mut copy), mode, gva, access)
        }
    }

    fn long_mode(cr3: u64) -> GuestMode {
        GuestMode {
            cr0: CR0_PG | CR0_WP | 1,
            cr3,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8) | EFER_NXE,
            long_code: true,
            default_32: false,
            cs_base: 0,
            cpl: 0,
        }
    }

    fn pf(gva: u64, error_code: u32) -> Result<u64, WalkError> {
        Err(WalkError::PageFault { gva, error_code })
    }

    const USER: Access = Access { write: false, fetch: false, user: true };
    const USER_WRITE: Access = Access { write: true, fetch: false, user: true };

    #[test]
    fn paging_off() {
        let t = Tables::new(0x1000);
        let real = GuestMode::default();
        assert_eq!(t.translate(&real, 0x1_2345_6789, Access::READ), Ok(0x2345_6789));
        let lma = GuestMode { efer: EFER_LMA, ..real };
        assert_eq!(t.translate(&lma, 0x1_2345_6789, Access::WRITE), Ok(0x1_2345_6789));
    }

    #[test]
    fn long_mode_page_sizes() {
        let mut t = Tables::new(0x40000);
        let root = t.alloc();
        t.map(root, 0x7f00_0020_1000, 0x30000, 1, P | RW, P | RW);
        t.map(root, 0xffff_8000_0040_0000, 0x20_0000, 2, P | RW, P | RW);
        t.map(root, 0x40_0000_0000, 0x4000_0000, 3, P, P | RW);
        let m = long_mode(root | 0x18); // PCID / PWT bits in CR3 are not address bits
        assert_eq!(t.translate(&m, 0x7f00_0020_1abc, Access::READ), Ok(0x30abc));
        assert_eq!(t.translate(&m, 0xffff_8000_005f_fff0, Access::WRITE), Ok(0x3f_fff0));
        assert_eq!(t.translate(&m, 0x40_1234_5678, Access::READ), Ok(0x5234_5678));
        assert_eq!(t.translate(&m, 0x40_1234_5678, Access::WRITE), pf(0x40_1234_5678, PF_PRESENT | PF_WRITE));
        assert_eq!(
            t.translate(&m, 0x8000_0000_0000, Access::READ),
            Err(WalkError::NonCanonical { gva: 0x8000_0000_0000 })
        );
    }

    #[test]
    fn not_present() {
        let mut t = Tables::new(0x20000);
        let root = t.alloc();
        t.map(root, 0x1000, 0x9000, 1, P | RW | US, P | RW | US);
        let m = long_mode(root);
        // Same PT, next entry empty; then an empty PML4 slot.
        assert_eq!(t.translate(&m, 0x2000, Access::READ), pf(0x2000, 0));
        assert_eq!(t.translate(&m, 0x2000, Access::WRITE), pf(0x2000, PF_WRITE));
        assert_eq!(t.translate(&m, 0x2000, USER_WRITE), pf(0x2000, PF_WRITE | PF_USER));
        assert_eq!(t.translate(&m, 0x2000, Access::FETCH), pf(0x2000, PF_FETCH));
        assert_eq!(t.translate(&m, 0x7000_0000_0000, Access::READ), pf(0x7000_0000_0000, 0));
        assert_eq!(t.translate(&m, 0x1008, USER_WRITE), Ok(0x9008));
    }

    #[test]
    fn write_protect() {
        let mut t = Tables::new(0x20000);
        let root = t.alloc();
        t.map(root, 0x1000, 0x9000, 1, P | US, P | RW | US);
        // Read-only at an upper level only.
        t.map(root, 0x40_0000_0000, 0xa000, 1, P | RW, P | US);
        let m = long_mode(root);
        assert_eq!(t.translate(&m, 0x1000, Access::READ), Ok(0x9000));
        assert_eq!(t.translate(&m, 0x1000, Access::WRITE), pf(0x1000, PF_PRESENT | PF_WRITE));
        assert_eq!(t.translate(&m, 0x40_0000_0000, Access::WRITE), pf(0x40_0000_0000, PF_PRESENT | PF_WRITE));
        let no_wp = GuestMode { cr0: m.cr0 & !CR0_WP, ..m };
        assert_eq!(t.translate(&no_wp, 0x1000, Access::WRITE), Ok(0x9000));
        assert_eq!(t.translate(&no_wp, 0x40_0000_0000, Access::WRITE), Ok(0xa000));
        // User writes are checked regardless of WP.
        assert_eq!(t.translate(&no_wp, 0x1000, USER_WRITE), pf(0x1000, PF_PRESENT | PF_WRITE | PF_USER));
    }

    #[test]
    fn user_supervisor() {
        let mut t = Tables::new(0x20000);
        let root = t.alloc();
        t.map(root, 0x1000, 0x9000, 1, P | RW, P | RW | US);
        t.map(root, 0x40_0000_0000, 0xa000, 1, P | RW | US, P | RW); // supervisor upper level
        t.map(root, 0x80_0000_0000, 0xb000, 1, P | RW | US, P | RW | US);
        let m = long_mode(root);
        assert_eq!(t.translate(&m, 0x1000, Access::READ), Ok(0x9000));
        assert_eq!(t.translate(&m, 0x1000, USER), pf(0x1000, PF_PRESENT | PF_USER));
        assert_eq!(t.translate(&m, 0x40_0000_0000, USER), pf(0x40_0000_0000, PF_PRESENT | PF_USER));
        assert_eq!(t.translate(&m, 0x80_0000_0000, USER_WRITE), Ok(0xb000));
        // SMEP: supervisor fetch from a user page.
        assert_eq!(t.translate(&m, 0x80_0000_0000, Access::FETCH), Ok(0xb000));
        let smep = GuestMode { cr4: m.cr4 | CR4_SMEP, ..m };
        assert_eq!(t.translate(&smep, 0x80_0000_0000, Access::FETCH), pf(0x80_0000_0000, PF_PRESENT | PF_FETCH));
        assert_eq!(t.translate(&smep, 0x80_0000_0000, Access::READ), Ok(0xb000));
    }

    #[test]
    fn no_execute() {
        let mut t = Tables::new(0x20000);
        let root = t.alloc();
        t.map(root, 0x1000, 0x9000, 1, P | RW | PTE_XD, P | RW);
        t.map(root, 0x2000, 0xa000, 1, P | RW, P | RW);
        let m = long_mode(root);
        assert_eq!(t.translate(&m, 0x1000, Access::READ), Ok(0x9000));
        assert_eq!(t.translate(&m, 0x1000, Access::FETCH), pf(0x1000, PF_PRESENT | PF_FETCH));
        assert_eq!(t.translate(&m, 0x2000, Access::FETCH), Ok(0xa000));
        // Without EFER.NXE bit 63 is reserved, and I/D is not reported.
        let no_nx = GuestMode { efer: m.efer & !EFER_NXE, ..m };
        assert_eq!(t.translate(&no_nx, 0x1000, Access::READ), pf(0x1000, PF_PRESENT | PF_RSVD));
        assert_eq!(t.translate(&no_nx, 0x2000, Access::FETCH), Ok(0xa000));
    }

    #[test]
    fn reserved_bits() {
        let mut t = Tables::new(0x20000);
        let root = t.alloc();
        t.map(root, 0x1000, 0x9000, 1, P | RW, P | RW);
        t.map(root, 0x40_0000_0000, 0x20_0000, 2, P | RW, P | RW);
        let m = long_mode(root);
        // PS in a PML4 entry.
        let pml4e = t.get64(root);
        t.set64(root, pml4e | PTE_PS);
        assert_eq!(t.translate(&m, 0x1000, Access::WRITE), pf(0x1000, PF_PRESENT | PF_RSVD | PF_WRITE));
        t.set64(root, pml4e);
        // Bit 13 set in a 2 MiB PDE.
        let pdpt = t.get64(root) & ADDR_MASK;
        let pd = t.get64(pdpt + 8 * 0x100) & ADDR_MASK;
        let pde = t.get64(pd);
        t.set64(pd, pde | (1 << 13));
        assert_eq!(t.translate(&m, 0x40_0000_0000, Access::READ), pf(0x40_0000_0000, PF_PRESENT | PF_RSVD));
    }

    #[test]
    fn table_outside_memory() {
        let mut t = Tables::new(0x4000);
        let m = long_mode(0x10_0000);
        assert!(matches!(t.translate(&m, 0x1000, Access::READ), Err(WalkError::Memory(MemError::OutOfRange { .. }))));
        let root = t.alloc();
        t.set64(root, 0xffff_f000 | P | RW); // PDPT far outside memory
        let m = long_mode(root);
        assert_eq!(
            t.translate(&m, 0x1000, Access::READ),
            Err(WalkError::Memory(MemError::OutOfRange { gpa: 0xffff_f000, len: 8 }))
        );
        // Leaf pointing outside memory is fine for translation itself.
        let mut t = Tables::new(0x10000);
        let root = t.alloc();
        t.map(root, 0x1000, 0xdead_0000, 1, P, P);
        assert_eq!(t.translate(&long_mode(root), 0x1000, Access::READ), Ok(0xdead_0000));
    }

    #[test]
    fn five_level() {
        let mut t = Tables::new(0x20000);
        let pml5 = t.alloc();
        let pml4 = t.alloc();
        t.set64(pml5 + 8 * 0x1ff, pml4 | P | RW);
        t.map(pml4, 0x1000, 0x9000, 1, P | RW, P | RW);
        let m = GuestMode { cr4: CR4_PAE | CR4_LA57, ..long_mode(pml5) };
        assert_eq!(t.translate(&m, 0xffff_0000_0000_1234, Access::READ), Ok(0x9234));
        assert_eq!(t.translate(&m, 0x0100_0000_0000_0000, Access::READ), Err(WalkError::NonCanonical { gva: 1 << 56 }));
    }

    fn pae_mode(cr3: u64) -> GuestMode {
        GuestMode {
            cr0: CR0_PG | CR0_WP | 1,
            cr3,
            cr4: CR4_PAE,
            efer: EFER_NXE,
            default_32: true,
            ..Default::default()
        }
    }

    #[test]
    fn pae_paging() {
        let mut t = Tables::new(0x20000);
        let pdpt = 0x1020; // 32-byte aligned, not page aligned
        let (pd, pt) = (0x2000, 0x3000);
        t.set64(pdpt + 3 * 8, pd | P);
        t.set64(pd + 8, 0x40_0000 | P | RW | PTE_PS); // 0xc020_0000: 2 MiB page
        t.set64(pd, pt | P | RW | US);
        t.set64(pt + 8 * 5, 0x1_2345_6000 | P | US | PTE_XD); // 0xc000_5000
        let m = pae_mode(pdpt);
        assert_eq!(t.translate(&m, 0xc021_2345, Access::WRITE), Ok(0x41_2345));
        assert_eq!(t.translate(&m, 0x1_c021_2345, Access::READ), Ok(0x41_2345), "upper bits ignored");
        assert_eq!(t.translate(&m, 0xc000_5678, USER), Ok(0x1_2345_6678));
        assert_eq!(t.translate(&m, 0xc000_5678, USER_WRITE), pf(0xc000_5678, PF_PRESENT | PF_WRITE | PF_USER));
        assert_eq!(t.translate(&m, 0xc000_5678, Access::FETCH), pf(0xc000_5678, PF_PRESENT | PF_FETCH));
        assert_eq!(t.translate(&m, 0xc021_2345, USER), pf(0xc021_2345, PF_PRESENT | PF_USER));
        assert_eq!(t.translate(&m, 0x1000, Access::READ), pf(0x1000, 0), "PDPTE 0 not present");
        assert_eq!(t.translate(&m, 0xc040_0000, Access::READ), pf(0xc040_0000, 0));
        // R/W is reserved in a PDPTE.
        t.set64(pdpt + 3 * 8, pd | P | RW);
        assert_eq!(t.translate(&m, 0xc021_2345, Access::READ), pf(0xc021_2345, PF_PRESENT | PF_RSVD));
    }

    fn legacy_mode(cr3: u64, cr4: u64) -> GuestMode {
        GuestMode { cr0: CR0_PG | 1, cr3, cr4, default_32: true, ..Default::default() }
    }

    #[test]
    fn legacy_paging() {
        let mut t = Tables::new(0x20000);
        let (pd, pt) = (0x1000u64, 0x2000u64);
        t.set32(pd + 4 * 0x300, (pt as u32) | 7); // 0xc000_0000
        t.set32(pt + 4 * 2, 0x9000 | 5); // 0xc000_2000, user read-only
        t.set32(pd + 4, 0x80_0000 | 0x83); // 0x0040_0000: 4 MiB page with PSE
        t.set32(pd + 4 * 2, 0x00c0_0000 | (0x12 << 13) | 0x83); // PSE-36: bits 39:32 = 0x12
        let m = legacy_mode(pd, CR4_PSE);
        assert_eq!(t.translate(&m, 0xc000_2abc, USER), Ok(0x9abc));
        assert_eq!(t.translate(&m, 0xc000_2abc, Access::WRITE), Ok(0x9abc), "WP clear");
        assert_eq!(t.translate(&m, 0xc000_2abc, USER_WRITE), pf(0xc000_2abc, PF_PRESENT | PF_WRITE | PF_USER));
        assert_eq!(t.translate(&m, 0xc000_3000, Access::READ), pf(0xc000_3000, 0));
        assert_eq!(t.translate(&m, 0x0055_5555, Access::READ), Ok(0x95_5555));
        assert_eq!(t.translate(&m, 0x0055_5555, USER), pf(0x0055_5555, PF_PRESENT | PF_USER));
        assert_eq!(t.translate(&m, 0x0080_0001, Access::READ), Ok(0x12_00c0_0001));
        // I/D is not reported in 32-bit paging without SMEP.
        assert_eq!(t.translate(&m, 0x1000, Access::FETCH), pf(0x1000, 0));
        // Without CR4.PSE the PS bit is ignored and the PDE points at a page table.
        let no_pse = legacy_mode(pd, 0);
        assert!(matches!(t.translate(&no_pse, 0x0055_5555, Access::READ), Err(WalkError::Memory(_))));
        // Bit 21 reserved in a 4 MiB PDE.
        t.set32(pd + 4 * 3, 0x0020_0000 | 0x83);
        assert_eq!(t.translate(&m, 0x00c0_0000, Access::READ), pf(0x00c0_0000, PF_PRESENT | PF_RSVD));
    }

    #[test]
    fn reads_and_writes_straddling_pages() {
        let mut t = Tables::new(0x20000);
        let root = t.alloc();
        // Virtually contiguous, physically swapped.
        t.map(root, 0x40_0000, 0xb000, 1, P | RW, P | RW);
        t.map(root, 0x40_1000, 0xa000, 1, P | RW, P | RW);
        t.mem[0xbffc..0xc000].copy_from_slice(b"abcd");
        t.mem[0xa000..0xa004].copy_from_slice(b"efgh");
        let m = long_mode(root);
        let mut mem = SliceMemory(&mut t.mem);
        let mut buf = [0u8; 8];
        read_virt(&mem, &m, 0x40_0ffc, &mut buf).unwrap();
        assert_eq!(&buf, b"abcdefgh");
        let mut insn = [0u8; 15];
        assert_eq!(
            read_virt_access(&mem, &m, 0x40_1ff8, Access::FETCH, &mut insn),
            Err(WalkError::PageFault { gva: 0x40_2000, error_code: PF_FETCH })
        );
        read_virt(&mem, &m, 0x40_1000, &mut []).unwrap();

        write_virt(&mut mem, &m, 0x40_0ffe, b"WXYZ").unwrap();
        read_virt(&mem, &m, 0x40_0ffc, &mut buf).unwrap();
        assert_eq!(&buf, b"abWXYZgh");
        let before = mem.0.to_vec();
        assert_eq!(write_virt(&mut mem, &m, 0x40_1ffe, b"1234"), pf(0x40_2000, PF_WRITE).map(|_| ()));
        assert_eq!(mem.0, &before[..], "nothing written on a fault");

        // 32-bit linear addresses wrap at 4 GiB.
        let mut flat = vec![0u8; 0x2000];
        flat[0x0] = 0x22;
        flat[0xfff] = 0x11;
        let mut buf = [0u8; 2];
        read_virt(&SliceMemory(&mut flat), &GuestMode::default(), 0xffff_ffff, &mut buf).unwrap_err();
        flat.resize(0x1000, 0);
        let pm = GuestMode { default_32: true, ..Default::default() };
        read_virt(&SliceMemory(&mut flat), &pm, 0xfff, &mut buf).unwrap_err();
    }

    #[test]
    fn a_write_that_rewrites_the_tables_of_its_second_page_still_lands_whole() {
        let mut t = Tables::new(0x20000);
        let root = t.alloc();
        // 0x5ff000 is the last entry of its page table; 0x5fe000 maps that page table itself.
        t.map(root, 0x5f_f000, 0xa000, 1, P | RW, P | RW);
        let pt = 0x4000;
        assert_eq!(t.get64(pt + 511 * 8), 0xa000 | P | RW);
        t.map(root, 0x5f_e000, pt, 1, P | RW, P | RW);
        let m = long_mode(root);
        let mut mem = SliceMemory(&mut t.mem);
        // The first 8 bytes clear the entry that maps the last 4: they still go to 0xa000.
        let data = [0, 0, 0, 0, 0, 0, 0, 0, b't', b'a', b'i', b'l'];
        assert_eq!(write_virt(&mut mem, &m, 0x5f_eff8, &data), Ok(()));
        assert_eq!(&mem.0[0x4ff8..0x5000], &[0; 8]);
        assert_eq!(&mem.0[0xa000..0xa004], b"tail");
        assert_eq!(
            translate(&mem, &m, 0x5f_f000, Access::WRITE),
            Err(WalkError::PageFault { gva: 0x5f_f000, error_code: PF_WRITE })
        );
    }

    #[test]
    fn display() {
        let e = WalkError::PageFault { gva: 0x1000, error_code: PF_PRESENT | PF_WRITE | PF_USER };
        assert_eq!(e.to_string(), "page fault at 0x1000 (error code 0x7: protection, write, user)");
        let e = WalkError::PageFault { gva: 0x2000, error_code: PF_FETCH };
        assert_eq!(e.to_string(), "page fault at 0x2000 (error code 0x10: not present, read, supervisor, fetch)");
        assert_eq!(WalkError::NonCanonical { gva: 1 << 47 }.to_string(), "non-canonical address 0x800000000000");
    }
}
