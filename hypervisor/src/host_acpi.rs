//! Reading the machine's own ACPI tables: which processors the firmware's MADT lists.
//!
//! Pure functions over a physical-memory reader, so the bare-metal layer reads real firmware
//! tables and host tests read tables built in a buffer. Every length and checksum is checked
//! before a field is used: firmware tables are input, not truth.

use alloc::vec::Vec;
use core::fmt;

/// Longest table accepted (a MADT of 1024 x2APIC entries is 16 KiB).
const MAX_TABLE_LEN: u32 = 1 << 20;
/// Most processors reported (beyond this the machine is not one we plan for).
pub const MAX_PROCESSORS: usize = 256;
const SDT_HEADER_LEN: usize = 36;
const MADT_ENTRIES_OFFSET: usize = 44;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_LOCAL_X2APIC: u8 = 9;
const LAPIC_ENABLED: u32 = 1 << 0;
const LAPIC_ONLINE_CAPABLE: u32 = 1 << 1;

/// Reads `buf.len()` bytes of physical memory at an address; `false` if it cannot.
pub type PhysReader<'a> = &'a dyn Fn(u64, &mut [u8]) -> bool;

/// Why the processor list could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// The RSDP is missing its signature or checksum.
    BadRsdp,
    /// A table could not be read or fails its length or checksum.
    BadTable(&'static str),
    /// Neither the XSDT nor the RSDT lists a MADT.
    NoMadt,
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcpiError::BadRsdp => f.write_str("the RSDP has a bad signature or checksum"),
            AcpiError::BadTable(which) => write!(f, "the {which} table is unreadable or fails its checksum"),
            AcpiError::NoMadt => f.write_str("no MADT (APIC table) is listed"),
        }
    }
}

/// The local APIC IDs of the processors the MADT calls enabled or online-capable, in table
/// order (the firmware lists the boot processor first), without duplicates.
pub fn processor_apic_ids(read: PhysReader<'_>, rsdp: u64) -> Result<Vec<u32>, AcpiError> {
    let madt = find_table(read, rsdp, *b"APIC")?;
    let mut ids: Vec<u32> = Vec::new();
    let mut offset = MADT_ENTRIES_OFFSET;
    while offset + 2 <= madt.len() {
        let (kind, len) = (madt[offset], madt[offset + 1] as usize);
        if len < 2 || offset + len > madt.len() {
            break;
        }
        let entry = &madt[offset..offset + len];
        let processor = match (kind, len) {
            (MADT_LOCAL_APIC, 8..) => Some((u32::from(entry[3]), u32_at(entry, 4))),
            (MADT_LOCAL_X2APIC, 16..) => Some((u32_at(entry, 4), u32_at(entry, 8))),
            _ => None,
        };
        if let Some((id, flags)) = processor {
            if flags & (LAPIC_ENABLED | LAPIC_ONLINE_CAPABLE) != 0 && !ids.contains(&id) && ids.len() < MAX_PROCESSORS {
                ids.push(id);
            }
        }
        offset += len;
    }
    Ok(ids)
}

/// Finds a table by signature through the XSDT (ACPI 2.0+) or the RSDT.
fn find_table(read: PhysReader<'_>, rsdp: u64, signature: [u8; 4]) -> Result<Vec<u8>, AcpiError> {
    let mut head = [0u8; 36];
    if !read(rsdp, &mut head[..20]) || &head[..8] != b"RSD PTR " || checksum(&head[..20]) != 0 {
        return Err(AcpiError::BadRsdp);
    }
    let revision = head[15];
    let (root, entry_len, name) = if revision >= 2 && read(rsdp, &mut head) && checksum(&head) == 0 {
        (u64_at(&head, 24), 8, "XSDT")
    } else {
        (u64::from(u32_at(&head, 16)), 4, "RSDT")
    };
    let root = read_table(read, root).ok_or(AcpiError::BadTable(name))?;
    for entry in root[SDT_HEADER_LEN..].chunks_exact(entry_len) {
        let address = if entry_len == 8 { u64_at(entry, 0) } else { u64::from(u32_at(entry, 0)) };
        let mut sig = [0u8; 4];
        if read(address, &mut sig) && sig == signature {
            return read_table(read, address).ok_or(AcpiError::BadTable("MADT"));
        }
    }
    Err(AcpiError::NoMadt)
}

/// A whole system description table, if its length is sane and its checksum holds.
fn read_table(read: PhysReader<'_>, address: u64) -> Option<Vec<u8>> {
    let mut header = [0u8; SDT_HEADER_LEN];
    if !read(address, &mut header) {
        return None;
    }
    let len = u32_at(&header, 4);
    if !(SDT_HEADER_LEN as u32..=MAX_TABLE_LEN).contains(&len) {
        return None;
    }
    let mut table = alloc::vec![0u8; len as usize];
    (read(address, &mut table) && checksum(&table) == 0).then_some(table)
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b))
}

fn u32_at(b: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(b[offset..offset + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(b[offset..offset + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::{build_tables, AcpiLayout};
    use crate::loader::{GuestMemory, SliceMemory};

    fn reader<'a>(mem: &'a SliceMemory<'a>) -> impl Fn(u64, &mut [u8]) -> bool + 'a {
        move |address, buf| mem.read(address, buf).is_ok()
    }

    fn guest_tables(cpus: u8) -> (Vec<u8>, u64) {
        let mut ram = alloc::vec![0u8; 2 << 20];
        let mut mem = SliceMemory(&mut ram);
        let layout = AcpiLayout::for_tests(cpus);
        let info = build_tables(&mut mem, &layout).unwrap();
        (ram, info.rsdp)
    }

    #[test]
    fn reads_the_processors_of_a_madt_we_build() {
        for cpus in [1u8, 4, 16] {
            let (mut ram, rsdp) = guest_tables(cpus);
            let mem = SliceMemory(&mut ram);
            let ids = processor_apic_ids(&reader(&mem), rsdp).unwrap();
            assert_eq!(ids, (0..u32::from(cpus)).collect::<Vec<_>>());
        }
    }

    #[test]
    fn corrupt_tables_are_refused_not_trusted() {
        let (mut ram, rsdp) = guest_tables(2);
        let mut broken = ram.clone();
        broken[rsdp as usize] ^= 1;
        assert_eq!(processor_apic_ids(&reader(&SliceMemory(&mut broken)), rsdp), Err(AcpiError::BadRsdp));
        // A flipped byte inside the MADT fails its checksum.
        let mem = SliceMemory(&mut ram);
        let madt = (0..(2u64 << 20) - 4).step_by(4).find(|&a| {
            let mut sig = [0u8; 4];
            mem.read(a, &mut sig).is_ok() && &sig == b"APIC"
        });
        let madt = madt.expect("MADT present") as usize;
        let mut broken = ram.clone();
        broken[madt + 50] ^= 0x40;
        assert_eq!(processor_apic_ids(&reader(&SliceMemory(&mut broken)), rsdp), Err(AcpiError::BadTable("MADT")));
        // A length pointing past readable memory is refused.
        let unreadable = |_: u64, _: &mut [u8]| false;
        assert_eq!(processor_apic_ids(&unreadable, rsdp), Err(AcpiError::BadRsdp));
    }
}
