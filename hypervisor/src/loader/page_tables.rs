//! Identity-mapped 4-level long-mode page tables built with 2 MiB pages.
//!
//! Layout at `at_gpa`: the PML4 page, then the PDPT pages, then the PD pages. One PDPT covers
//! 512 GiB and one PD covers 1 GiB, so identity-mapping 4 GiB takes 1 + 1 + 4 = 6 pages.

use super::{GuestMemory, MemError};

/// Size of one page table.
const PAGE: u64 = 4096;
/// Bytes mapped by one 2 MiB PD entry.
const LARGE: u64 = 2 << 20;
/// Bytes mapped by one PD (512 large pages).
const PD_SPAN: u64 = 1 << 30;
/// Bytes mapped by one PDPT.
const PDPT_SPAN: u64 = 512 << 30;
/// The most 4-level paging can map.
const MAX_LIMIT: u64 = 1 << 48;

/// Entry flag: present.
pub const PRESENT: u64 = 1 << 0;
/// Entry flag: writable.
pub const WRITABLE: u64 = 1 << 1;
/// Entry flag: page size (a 2 MiB page in a PD entry).
pub const PAGE_SIZE: u64 = 1 << 7;

/// Number of PDPT and PD pages needed to map `[0, limit)`, with `limit` clamped to 256 TiB.
fn counts(limit: u64) -> (u64, u64) {
    let limit = limit.min(MAX_LIMIT);
    let pds = limit.div_ceil(PD_SPAN);
    let pdpts = limit.div_ceil(PDPT_SPAN).max(1);
    (pdpts, pds)
}

/// Bytes of page tables [`build_identity_map`] writes for `limit`: one PML4, one PDPT per
/// 512 GiB (at least one) and one PD per GiB (`limit` rounded up). `identity_map_size(4 << 30)`
/// is 6 pages.
pub fn identity_map_size(limit: u64) -> u64 {
    let (pdpts, pds) = counts(limit);
    (1 + pdpts + pds) * PAGE
}

/// Writes page tables at `at_gpa` that identity-map `[0, limit)` with present, writable 2 MiB
/// pages, and returns the value to load into CR3 (the PML4's address).
///
/// `limit` is rounded up to a multiple of 2 MiB (a multiple of 1 GiB is the intended use) and is
/// clamped to 256 TiB, the reach of 4-level paging. The tables occupy
/// [`identity_map_size(limit)`](identity_map_size) bytes at `at_gpa`, which must be 4 KiB aligned;
/// they are mapped too if they lie below `limit`.
pub fn build_identity_map(mem: &mut impl GuestMemory, at_gpa: u64, limit: u64) -> Result<u64, MemError> {
    if !at_gpa.is_multiple_of(PAGE) {
        return Err(MemError::Unaligned { gpa: at_gpa, align: PAGE });
    }
    let size = identity_map_size(limit);
    let end = at_gpa.checked_add(size).ok_or(MemError::OutOfRange { gpa: at_gpa, len: size })?;
    if end > mem.size() {
        return Err(MemError::OutOfRange { gpa: at_gpa, len: size });
    }
    let limit = limit.min(MAX_LIMIT);
    let (pdpts, pds) = counts(limit);
    let pml4 = at_gpa;
    // All offsets below are within `[at_gpa, end)`, checked above.
    let pdpt_base = pml4 + PAGE;
    let pd_base = pdpt_base + pdpts * PAGE;
    let large_pages = limit.div_ceil(LARGE);

    let mut page = [0u8; PAGE as usize];

    fill(&mut page, pdpts, |i| (pdpt_base + i * PAGE) | PRESENT | WRITABLE);
    mem.write(pml4, &page)?;
    for t in 0..pdpts {
        let first = t * 512;
        fill(&mut page, pds.saturating_sub(first), |i| (pd_base + (first + i) * PAGE) | PRESENT | WRITABLE);
        mem.write(pdpt_base + t * PAGE, &page)?;
    }
    for d in 0..pds {
        let first = d * 512;
        fill(&mut page, large_pages.saturating_sub(first), |i| ((first + i) * LARGE) | PRESENT | WRITABLE | PAGE_SIZE);
        mem.write(pd_base + d * PAGE, &page)?;
    }
    Ok(pml4)
}

/// Fills one table page: entries `0..count` (at most 512) are `entry(i)`, the rest are zero.
fn fill(page: &mut [u8; PAGE as usize], count: u64, entry: impl Fn(u64) -> u64) {
    page.fill(0);
    let count = usize::try_from(count.min(512)).unwrap_or(512);
    for (i, slot) in page.as_chunks_mut::<8>().0.iter_mut().enumerate().take(count) {
        slot.copy_from_slice(&entry(i as u64).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::SliceMemory;
    use alloc::vec;

    fn entry(mem: &[u8], gpa: u64) -> u64 {
        let g = gpa as usize;
        u64::from_le_bytes(mem[g..g + 8].try_into().unwrap())
    }

    #[test]
    fn sizes() {
        assert_eq!(identity_map_size(4 << 30), 6 * 4096);
        assert_eq!(identity_map_size(1 << 30), 3 * 4096);
        assert_eq!(identity_map_size(0), 2 * 4096);
        assert_eq!(identity_map_size(1), 3 * 4096);
        assert_eq!(identity_map_size(513 << 30), (1 + 2 + 513) * 4096);
        assert_eq!(identity_map_size(u64::MAX), (1 + 512 + 512 * 512) * 4096);
    }

    #[test]
    fn maps_4_gib() {
        let mut backing = vec![0xffu8; 0x20000];
        let at = 0x10000;
        let cr3 = build_identity_map(&mut SliceMemory(&mut backing), at, 4 << 30).unwrap();
        assert_eq!(cr3, at);
        let flags = PRESENT | WRITABLE;
        assert_eq!(entry(&backing, at), (at + 0x1000) | flags);
        for i in 1..512 {
            assert_eq!(entry(&backing, at + 8 * i), 0, "PML4 entry {i}");
        }
        let pdpt = at + 0x1000;
        for i in 0..4 {
            assert_eq!(entry(&backing, pdpt + 8 * i), (at + 0x2000 + 0x1000 * i) | flags);
        }
        assert_eq!(entry(&backing, pdpt + 8 * 4), 0);
        for pd in 0..4u64 {
            for i in 0..512u64 {
                let e = entry(&backing, at + 0x2000 + 0x1000 * pd + 8 * i);
                assert_eq!(e, ((pd << 30) + (i << 21)) | flags | PAGE_SIZE);
            }
        }
        // Nothing written past the 6 pages.
        assert_eq!(backing[(at + 6 * 0x1000) as usize], 0xff);
        assert_eq!(backing[(at - 1) as usize], 0xff);
    }

    #[test]
    fn partial_gib_and_errors() {
        let mut backing = vec![0xffu8; 0x4000];
        let mut mem = SliceMemory(&mut backing);
        build_identity_map(&mut mem, 0x1000, 5 << 20).unwrap();
        let pd = 0x3000;
        assert_eq!(entry(&backing, pd + 16), (4 << 20) | 0x83);
        assert_eq!(entry(&backing, pd + 24), 0);

        let mut mem = SliceMemory(&mut backing);
        assert_eq!(
            build_identity_map(&mut mem, 0x1001, 1 << 30),
            Err(MemError::Unaligned { gpa: 0x1001, align: 4096 })
        );
        assert_eq!(
            build_identity_map(&mut mem, 0x2000, 1 << 30),
            Err(MemError::OutOfRange { gpa: 0x2000, len: 0x3000 })
        );
        assert!(build_identity_map(&mut mem, !0xfff, 1 << 30).is_err());
        assert!(build_identity_map(&mut mem, 0, u64::MAX).is_err());
    }
}
