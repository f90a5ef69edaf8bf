//! ACPI tables for a PC guest: RSDP, RSDT, XSDT, FADT, FACS, MADT and a DSDT that holds
//! only `\_S5`. Layouts and offsets follow the ACPI 6.3 specification (section numbers below).
//!
//! Everything is built in host memory first and bounds-checked as a whole, so a layout that does
//! not fit guest memory fails with [`MemError`] before anything is written.

use alloc::vec;
use alloc::vec::Vec;

use crate::loader::{GuestMemory, MemError};

/// OEM id in every table and in the RSDP.
const OEM_ID: [u8; 6] = *b"RSHV  ";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: [u8; 4] = *b"RSHV";
const CREATOR_REVISION: u32 = 1;

/// System description table header length (5.2.6).
const HEADER_LEN: usize = 36;
/// ACPI 2.0+ RSDP length (5.2.5.3).
const RSDP_LEN: usize = 36;
/// FADT length for revision 6 (5.2.9, table 5-33).
const FADT_LEN: usize = 276;
/// FACS length; it must be 64-byte aligned (5.2.10).
const FACS_LEN: usize = 64;
const FACS_ALIGN: u64 = 64;
const TABLE_ALIGN: u64 = 16;

/// Generic Address Structure address space ids and access sizes (5.2.3.2).
const GAS_SYSTEM_IO: u8 = 1;
const GAS_BYTE: u8 = 1;
const GAS_WORD: u8 = 2;
const GAS_DWORD: u8 = 3;

// FADT flags (5.2.9, table 5-34).
const FADT_WBINVD: u32 = 1 << 0;
const FADT_PROC_C1: u32 = 1 << 2;
const FADT_SLP_BUTTON: u32 = 1 << 5;
const FADT_TMR_VAL_EXT: u32 = 1 << 8;
const FADT_RESET_REG_SUP: u32 = 1 << 10;
// IA-PC boot architecture flags (5.2.9.3, table 5-35).
const BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
const BOOT_ARCH_8042: u16 = 1 << 1;
/// P_LVL2_LAT above 100 and P_LVL3_LAT above 1000 mean C2 and C3 are not supported.
const C2_UNSUPPORTED: u16 = 101;
const C3_UNSUPPORTED: u16 = 1001;

// MADT (5.2.12): flags and interrupt controller structure types.
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_LOCAL_APIC_OVERRIDE: u8 = 5;
const LOCAL_APIC_ENABLED: u32 = 1;
/// MPS INTI flags (5.2.12.5, table 5-50): polarity active high (01), trigger level (11).
const INTI_ACTIVE_HIGH_LEVEL: u16 = 0x000d;
/// MPS INTI flags: bus-conforming polarity and trigger.
const INTI_CONFORMING: u16 = 0;
/// Local APIC NMI processor UID meaning "all processors" (5.2.12.7).
const ALL_PROCESSORS: u8 = 0xff;

// AML opcodes (20.2).
const AML_NAME_OP: u8 = 0x08;
const AML_PACKAGE_OP: u8 = 0x12;
const AML_BYTE_PREFIX: u8 = 0x0a;
const AML_ZERO_OP: u8 = 0x00;

/// Where the tables go and what they describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiLayout {
    /// RSDP address: 16-byte aligned in 0xe0000..0xfffff so the BIOS-area scan finds it.
    pub rsdp_gpa: u64,
    /// Where the FACS, DSDT, FADT, MADT, XSDT and RSDT go, in that order.
    pub tables_gpa: u64,
    /// Local APIC base address.
    pub lapic_base: u64,
    /// I/O APIC base address (below 4 GiB: the MADT entry holds 32 bits).
    pub ioapic_base: u64,
    /// I/O APIC id.
    pub ioapic_id: u8,
    /// PM1a event block port (4 bytes: status, enable).
    pub pm1a_evt: u16,
    /// PM1a control block port (2 bytes).
    pub pm1a_cnt: u16,
    /// PM timer port (4 bytes).
    pub pm_tmr: u16,
    /// Whether the PM timer counts 32 bits (else 24).
    pub pm_tmr_32bit: bool,
    /// Reset register port.
    pub reset_port: u16,
    /// Value written to the reset register.
    pub reset_value: u8,
    /// ISA IRQ (and GSI) of the SCI.
    pub sci_irq: u8,
    /// SLP_TYP value for S5 soft-off.
    pub s5_slp_typ: u8,
    /// Number of CPUs (APIC ids and ACPI processor UIDs 0..n); at least one is described.
    pub cpu_count: u8,
}

/// Where the tables ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiInfo {
    /// Guest-physical address of the RSDP.
    pub rsdp: u64,
    /// First byte after the tables at `tables_gpa` (the range to reserve in the memory map).
    pub end: u64,
}

/// Writes the ACPI tables into guest memory.
///
/// Fails with [`MemError::Unaligned`] if the RSDP is not 16-byte aligned, and with
/// [`MemError::OutOfRange`] if the RSDP or the tables do not fit guest memory, or if the I/O
/// APIC lies above 4 GiB (the MADT cannot describe it; the error names its address).
pub fn build_tables(mem: &mut impl GuestMemory, layout: &AcpiLayout) -> Result<AcpiInfo, MemError> {
    if !layout.rsdp_gpa.is_multiple_of(16) {
        return Err(MemError::Unaligned { gpa: layout.rsdp_gpa, align: 16 });
    }
    let ioapic_base =
        u32::try_from(layout.ioapic_base).map_err(|_| MemError::OutOfRange { gpa: layout.ioapic_base, len: 4 })?;

    let dsdt = dsdt(layout.s5_slp_typ);
    let madt = madt(layout, ioapic_base);

    let mut cursor = layout.tables_gpa;
    let facs_gpa = place(&mut cursor, FACS_ALIGN, FACS_LEN, layout.tables_gpa)?;
    let dsdt_gpa = place(&mut cursor, TABLE_ALIGN, dsdt.len(), layout.tables_gpa)?;
    let fadt_gpa = place(&mut cursor, TABLE_ALIGN, FADT_LEN, layout.tables_gpa)?;
    let madt_gpa = place(&mut cursor, TABLE_ALIGN, madt.len(), layout.tables_gpa)?;
    let xsdt = sdt(*b"XSDT", &[fadt_gpa, madt_gpa], 8);
    let xsdt_gpa = place(&mut cursor, TABLE_ALIGN, xsdt.len(), layout.tables_gpa)?;
    // The RSDT holds 32-bit pointers: only when every table is below 4 GiB.
    let rsdt_entries = [fadt_gpa, madt_gpa];
    let rsdt = rsdt_entries.iter().all(|&a| u32::try_from(a).is_ok()).then(|| sdt(*b"RSDT", &rsdt_entries, 4));
    let rsdt_gpa = match &rsdt {
        Some(table) => place(&mut cursor, TABLE_ALIGN, table.len(), layout.tables_gpa)?,
        None => 0,
    };
    let end = cursor;

    let fadt = fadt(layout, facs_gpa, dsdt_gpa);
    let rsdp = rsdp(rsdt_gpa, xsdt_gpa);

    // Check everything before writing anything.
    let table_len = end - layout.tables_gpa;
    if end > mem.size() {
        return Err(MemError::OutOfRange { gpa: layout.tables_gpa, len: table_len });
    }
    let rsdp_end = layout.rsdp_gpa.checked_add(RSDP_LEN as u64);
    if rsdp_end.is_none_or(|e| e > mem.size()) {
        return Err(MemError::OutOfRange { gpa: layout.rsdp_gpa, len: RSDP_LEN as u64 });
    }

    mem.write(facs_gpa, &facs())?;
    mem.write(dsdt_gpa, &dsdt)?;
    mem.write(fadt_gpa, &fadt)?;
    mem.write(madt_gpa, &madt)?;
    mem.write(xsdt_gpa, &xsdt)?;
    if let Some(table) = &rsdt {
        mem.write(rsdt_gpa, table)?;
    }
    mem.write(layout.rsdp_gpa, &rsdp)?;
    Ok(AcpiInfo { rsdp: layout.rsdp_gpa, end })
}

/// Reserves `len` bytes at the next `align`-aligned address after `cursor`.
fn place(cursor: &mut u64, align: u64, len: usize, base: u64) -> Result<u64, MemError> {
    let overflow = MemError::OutOfRange { gpa: base, len: u64::MAX - base };
    let at = cursor.checked_next_multiple_of(align).ok_or(overflow)?;
    *cursor = at.checked_add(len as u64).ok_or(overflow)?;
    Ok(at)
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b)))
}

/// Copies `value` into `buf` at `offset`; offsets are this module's constants, within `buf`.
fn put(buf: &mut [u8], offset: usize, value: &[u8]) {
    if let Some(dst) = buf.get_mut(offset..offset + value.len()) {
        dst.copy_from_slice(value);
    }
}

/// A table of `len` bytes with its header (5.2.6), checksum still zero.
fn table(signature: [u8; 4], revision: u8, len: usize) -> Vec<u8> {
    let mut t = vec![0u8; len];
    put(&mut t, 0, &signature);
    // Table lengths here are a few hundred bytes.
    put(&mut t, 4, &(len as u32).to_le_bytes());
    put(&mut t, 8, &[revision]);
    put(&mut t, 10, &OEM_ID);
    let mut table_id = *b"RSHV    ";
    put(&mut table_id, 4, &signature);
    put(&mut t, 16, &table_id);
    put(&mut t, 24, &OEM_REVISION.to_le_bytes());
    put(&mut t, 28, &CREATOR_ID);
    put(&mut t, 32, &CREATOR_REVISION.to_le_bytes());
    t
}

/// Sets the header length and checksum of a finished table.
fn seal(mut t: Vec<u8>) -> Vec<u8> {
    let len = t.len() as u32;
    put(&mut t, 4, &len.to_le_bytes());
    let sum = checksum(&t);
    put(&mut t, 9, &[sum]);
    t
}

/// Generic Address Structure (5.2.3.2) for a system-I/O register.
fn io_gas(bit_width: u8, access_size: u8, port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = GAS_SYSTEM_IO;
    g[1] = bit_width;
    g[3] = access_size;
    put(&mut g, 4, &u64::from(port).to_le_bytes());
    g
}

/// RSDP, revision 2 (5.2.5.3): checksum over the first 20 bytes, extended over all 36.
fn rsdp(rsdt_gpa: u64, xsdt_gpa: u64) -> [u8; RSDP_LEN] {
    let mut r = [0u8; RSDP_LEN];
    put(&mut r, 0, b"RSD PTR ");
    put(&mut r, 9, &OEM_ID);
    r[15] = 2;
    // Zero when there is no RSDT (tables above 4 GiB).
    put(&mut r, 16, &u32::try_from(rsdt_gpa).unwrap_or(0).to_le_bytes());
    put(&mut r, 20, &(RSDP_LEN as u32).to_le_bytes());
    put(&mut r, 24, &xsdt_gpa.to_le_bytes());
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// RSDT (4-byte entries, 5.2.7) or XSDT (8-byte entries, 5.2.8).
fn sdt(signature: [u8; 4], entries: &[u64], entry_len: usize) -> Vec<u8> {
    let mut t = table(signature, 1, HEADER_LEN);
    for &entry in entries {
        t.extend_from_slice(&entry.to_le_bytes()[..entry_len.min(8)]);
    }
    seal(t)
}

/// FACS (5.2.10), version 2: no waking vector, global lock free. It has no checksum.
fn facs() -> [u8; FACS_LEN] {
    let mut f = [0u8; FACS_LEN];
    put(&mut f, 0, b"FACS");
    put(&mut f, 4, &(FACS_LEN as u32).to_le_bytes());
    f[32] = 2;
    f
}

/// FADT revision 6.3 (5.2.9, table 5-33).
fn fadt(layout: &AcpiLayout, facs_gpa: u64, dsdt_gpa: u64) -> Vec<u8> {
    let mut f = table(*b"FACP", 6, FADT_LEN);
    // ACPI 6.0 and later: FIRMWARE_CTRL and X_FIRMWARE_CTRL are exclusive.
    match u32::try_from(facs_gpa) {
        Ok(low) => put(&mut f, 36, &low.to_le_bytes()),
        Err(_) => put(&mut f, 132, &facs_gpa.to_le_bytes()),
    }
    put(&mut f, 40, &u32::try_from(dsdt_gpa).unwrap_or(0).to_le_bytes());
    put(&mut f, 46, &u16::from(layout.sci_irq).to_le_bytes());
    // SMI_CMD (48), ACPI_ENABLE, ACPI_DISABLE stay 0: the platform is always in ACPI mode.
    put(&mut f, 56, &u32::from(layout.pm1a_evt).to_le_bytes());
    put(&mut f, 64, &u32::from(layout.pm1a_cnt).to_le_bytes());
    put(&mut f, 76, &u32::from(layout.pm_tmr).to_le_bytes());
    // PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN; no GPE blocks.
    put(&mut f, 88, &[4, 2, 0, 4]);
    put(&mut f, 96, &C2_UNSUPPORTED.to_le_bytes());
    put(&mut f, 98, &C3_UNSUPPORTED.to_le_bytes());
    put(&mut f, 109, &(BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042).to_le_bytes());
    let mut flags = FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_RESET_REG_SUP;
    if layout.pm_tmr_32bit {
        flags |= FADT_TMR_VAL_EXT;
    }
    put(&mut f, 112, &flags.to_le_bytes());
    put(&mut f, 116, &io_gas(8, GAS_BYTE, layout.reset_port));
    put(&mut f, 128, &[layout.reset_value]);
    // FADT minor version 3: ACPI 6.3.
    put(&mut f, 131, &[3]);
    put(&mut f, 140, &dsdt_gpa.to_le_bytes());
    put(&mut f, 148, &io_gas(32, GAS_WORD, layout.pm1a_evt));
    put(&mut f, 172, &io_gas(16, GAS_WORD, layout.pm1a_cnt));
    put(&mut f, 208, &io_gas(32, GAS_DWORD, layout.pm_tmr));
    seal(f)
}

/// MADT revision 5 (5.2.12).
fn madt(layout: &AcpiLayout, ioapic_base: u32) -> Vec<u8> {
    let mut t = table(*b"APIC", 5, HEADER_LEN);
    // A local APIC above 4 GiB goes in an address override entry instead (5.2.12.8).
    let lapic32 = u32::try_from(layout.lapic_base).ok();
    t.extend_from_slice(&lapic32.unwrap_or(0).to_le_bytes());
    t.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    if lapic32.is_none() {
        t.extend_from_slice(&[MADT_LOCAL_APIC_OVERRIDE, 12, 0, 0]);
        t.extend_from_slice(&layout.lapic_base.to_le_bytes());
    }
    for cpu in 0..layout.cpu_count.max(1) {
        // Processor Local APIC (5.2.12.2): ACPI processor UID, APIC id, flags.
        t.extend_from_slice(&[MADT_LOCAL_APIC, 8, cpu, cpu]);
        t.extend_from_slice(&LOCAL_APIC_ENABLED.to_le_bytes());
    }
    // I/O APIC (5.2.12.3): id, reserved, address, GSI base.
    t.extend_from_slice(&[MADT_IO_APIC, 12, layout.ioapic_id, 0]);
    t.extend_from_slice(&ioapic_base.to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt Source Overrides (5.2.12.5): the PIT's IRQ 0 is wired to I/O APIC pin 2.
    source_override(&mut t, 0, 2, INTI_CONFORMING);
    if layout.sci_irq != 0 {
        source_override(&mut t, layout.sci_irq, u32::from(layout.sci_irq), INTI_ACTIVE_HIGH_LEVEL);
    }
    // Local APIC NMI (5.2.12.7): NMI arrives on LINT1 of every processor.
    t.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS]);
    t.extend_from_slice(&0u16.to_le_bytes());
    t.push(1);
    seal(t)
}

fn source_override(t: &mut Vec<u8>, irq: u8, gsi: u32, flags: u16) {
    // Bus 0: ISA.
    t.extend_from_slice(&[MADT_SOURCE_OVERRIDE, 10, 0, irq]);
    t.extend_from_slice(&gsi.to_le_bytes());
    t.extend_from_slice(&flags.to_le_bytes());
}

/// DSDT revision 2 (5.2.11.1) with `Name (_S5, Package (0x04) { typ, typ, Zero, Zero })`.
fn dsdt(s5_slp_typ: u8) -> Vec<u8> {
    let mut t = table(*b"DSDT", 2, HEADER_LEN);
    t.push(AML_NAME_OP);
    t.extend_from_slice(b"_S5_");
    // PkgLength (20.2.4) counts itself, NumElements and the elements: 1 + 1 + 2 + 2 + 1 + 1.
    t.extend_from_slice(&[AML_PACKAGE_OP, 8, 4]);
    t.extend_from_slice(&[AML_BYTE_PREFIX, s5_slp_typ, AML_BYTE_PREFIX, s5_slp_typ, AML_ZERO_OP, AML_ZERO_OP]);
    seal(t)
}

#[cfg(test)]
impl AcpiLayout {
    /// A PC layout with `cpu_count` CPUs, tables at 1 MiB (for tests that build tables).
    pub(crate) fn for_tests(cpu_count: u8) -> Self {
        AcpiLayout {
            rsdp_gpa: 0xf_0000,
            tables_gpa: 0x10_0000,
            lapic_base: 0xfee0_0000,
            ioapic_base: 0xfec0_0000,
            ioapic_id: 0,
            pm1a_evt: 0x600,
            pm1a_cnt: 0x604,
            pm_tmr: 0x608,
            pm_tmr_32bit: false,
            reset_port: 0xcf9,
            reset_value: 0x06,
            sci_irq: 9,
            s5_slp_typ: 5,
            cpu_count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::SliceMemory;

    const MEM: usize = 0x11_0000;

    fn layout() -> AcpiLayout {
        AcpiLayout::for_tests(2)
    }

    fn bytes(mem: &SliceMemory, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        mem.read(gpa, &mut b).unwrap();
        b
    }

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, &x| s.wrapping_add(x))
    }

    /// Reads a table at `gpa`, checking its signature, header and checksum.
    fn table_at(mem: &SliceMemory, gpa: u64, signature: &[u8; 4], revision: u8) -> Vec<u8> {
        let header = bytes(mem, gpa, HEADER_LEN);
        assert_eq!(&header[0..4], signature);
        let t = bytes(mem, gpa, u32_at(&header, 4) as usize);
        assert_eq!(sum(&t), 0, "{} checksum", core::str::from_utf8(signature).unwrap());
        assert_eq!(t[8], revision);
        assert_eq!(&t[10..16], b"RSHV  ");
        assert_eq!(&t[16..24], [b"RSHV".as_slice(), signature].concat().as_slice());
        assert_eq!(&t[28..32], b"RSHV");
        t
    }

    /// Finds the RSDP the way a BIOS-area scan does.
    fn find_rsdp(mem: &SliceMemory) -> u64 {
        (0xe_0000..0x10_0000u64)
            .step_by(16)
            .find(|&a| bytes(mem, a, 8) == b"RSD PTR " && sum(&bytes(mem, a, 20)) == 0)
            .expect("RSDP in the BIOS area")
    }

    fn build(layout: &AcpiLayout) -> (Vec<u8>, AcpiInfo) {
        let mut backing = vec![0u8; MEM];
        let info = build_tables(&mut SliceMemory(&mut backing), layout).unwrap();
        (backing, info)
    }

    /// Follows RSDP -> XSDT (and RSDT) -> FADT, MADT, DSDT: (FADT, MADT, DSDT, DSDT address).
    fn walk(mem: &SliceMemory) -> (Vec<u8>, Vec<u8>, Vec<u8>, u64) {
        let rsdp_gpa = find_rsdp(mem);
        let rsdp = bytes(mem, rsdp_gpa, 36);
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        assert_eq!(u32_at(&rsdp, 20), 36);
        assert_eq!(sum(&rsdp), 0, "extended checksum");
        assert_eq!(&rsdp[9..15], b"RSHV  ");
        let xsdt = table_at(mem, u64_at(&rsdp, 24), b"XSDT", 1);
        let entries: Vec<u64> = (HEADER_LEN..xsdt.len()).step_by(8).map(|o| u64_at(&xsdt, o)).collect();
        assert_eq!(entries.len(), 2);
        let fadt = table_at(mem, entries[0], b"FACP", 6);
        let madt = table_at(mem, entries[1], b"APIC", 5);
        // The RSDT lists the same tables with 32-bit pointers.
        let rsdt = table_at(mem, u32_at(&rsdp, 16) as u64, b"RSDT", 1);
        assert_eq!(rsdt.len(), HEADER_LEN + 8);
        assert_eq!([u32_at(&rsdt, 36) as u64, u32_at(&rsdt, 40) as u64], entries[..]);
        let dsdt_gpa = u64_at(&fadt, 140);
        (fadt, madt, table_at(mem, dsdt_gpa, b"DSDT", 2), dsdt_gpa)
    }

    #[test]
    fn rsdp_is_found_and_leads_to_every_table() {
        let (mut backing, info) = build(&layout());
        let mem = SliceMemory(&mut backing);
        assert_eq!(find_rsdp(&mem), 0xf_0000);
        assert_eq!(info.rsdp, 0xf_0000);
        let (fadt, _madt, dsdt, dsdt_gpa) = walk(&mem);
        assert_eq!(u32_at(&fadt, 40) as u64, dsdt_gpa, "DSDT and X_DSDT agree");
        let facs_gpa = u32_at(&fadt, 36) as u64;
        assert_eq!(facs_gpa, 0x10_0000);
        assert_eq!(facs_gpa % 64, 0);
        assert_eq!(u64_at(&fadt, 132), 0, "X_FIRMWARE_CTRL unused when FIRMWARE_CTRL is set");
        let facs = bytes(&mem, facs_gpa, 64);
        assert_eq!((&facs[0..4], u32_at(&facs, 4), facs[32]), (b"FACS".as_slice(), 64, 2));
        // 16-byte aligned one after another: FACS (64), DSDT at 0x40 (50), FADT at 0x80 (276),
        // MADT at 0x1a0 (98), XSDT at 0x210 (52), RSDT at 0x250 (44).
        assert_eq!(dsdt_gpa, 0x10_0040);
        assert_eq!(dsdt.len(), 50);
        assert_eq!(info.end, 0x10_0250 + 44);
    }

    #[test]
    fn fadt_fields_sit_at_their_spec_offsets() {
        let (mut backing, _) = build(&layout());
        let (fadt, ..) = walk(&SliceMemory(&mut backing));
        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt[131], 3, "FADT minor version");
        assert_eq!(u16_at(&fadt, 46), 9, "SCI_INT");
        assert_eq!(u32_at(&fadt, 48), 0, "no SMI_CMD");
        assert_eq!((fadt[52], fadt[53]), (0, 0), "ACPI_ENABLE, ACPI_DISABLE");
        assert_eq!(u32_at(&fadt, 56), 0x600, "PM1a_EVT_BLK");
        assert_eq!(u32_at(&fadt, 60), 0, "PM1b_EVT_BLK");
        assert_eq!(u32_at(&fadt, 64), 0x604, "PM1a_CNT_BLK");
        assert_eq!(u32_at(&fadt, 76), 0x608, "PM_TMR_BLK");
        assert_eq!(u32_at(&fadt, 80), 0, "GPE0_BLK");
        assert_eq!(&fadt[88..94], [4, 2, 0, 4, 0, 0], "PM1_EVT_LEN .. GPE1_BLK_LEN");
        assert_eq!((u16_at(&fadt, 96), u16_at(&fadt, 98)), (101, 1001), "no C2, no C3");
        assert_eq!(u16_at(&fadt, 109), 0x0003, "LEGACY_DEVICES | 8042");
        assert_eq!(u32_at(&fadt, 112), 0x0000_0425, "WBINVD, PROC_C1, SLP_BUTTON, RESET_REG_SUP");
        assert_eq!(&fadt[116..128], [1, 8, 0, 1, 0xf9, 0x0c, 0, 0, 0, 0, 0, 0], "RESET_REG");
        assert_eq!(fadt[128], 0x06, "RESET_VALUE");
        assert_eq!(&fadt[148..160], [1, 32, 0, 2, 0x00, 0x06, 0, 0, 0, 0, 0, 0], "X_PM1a_EVT_BLK");
        assert_eq!(&fadt[160..172], [0; 12], "X_PM1b_EVT_BLK");
        assert_eq!(&fadt[172..184], [1, 16, 0, 2, 0x04, 0x06, 0, 0, 0, 0, 0, 0], "X_PM1a_CNT_BLK");
        assert_eq!(&fadt[208..220], [1, 32, 0, 3, 0x08, 0x06, 0, 0, 0, 0, 0, 0], "X_PM_TMR_BLK");
        assert_eq!(&fadt[220..276], [0; 56], "no GPE, sleep registers or vendor id");

        let (mut backing, _) = build(&AcpiLayout { pm_tmr_32bit: true, ..layout() });
        let (fadt, ..) = walk(&SliceMemory(&mut backing));
        assert_eq!(u32_at(&fadt, 112), 0x0000_0525, "TMR_VAL_EXT with a 32-bit timer");
    }

    #[test]
    fn madt_describes_cpus_ioapic_overrides_and_nmi() {
        let (mut backing, _) = build(&AcpiLayout { cpu_count: 3, ioapic_id: 3, ..layout() });
        let (_, madt, ..) = walk(&SliceMemory(&mut backing));
        assert_eq!(u32_at(&madt, 36), 0xfee0_0000);
        assert_eq!(u32_at(&madt, 40), 1, "PCAT_COMPAT");
        let mut entries = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            let len = madt[at + 1] as usize;
            entries.push(&madt[at..at + len]);
            at += len;
        }
        assert_eq!(at, madt.len(), "entries fill the table exactly");
        assert_eq!(
            entries,
            [
                [0u8, 8, 0, 0, 1, 0, 0, 0].as_slice(),
                &[0, 8, 1, 1, 1, 0, 0, 0],
                &[0, 8, 2, 2, 1, 0, 0, 0],
                &[1, 12, 3, 0, 0x00, 0x00, 0xc0, 0xfe, 0, 0, 0, 0],
                &[2, 10, 0, 0, 2, 0, 0, 0, 0x00, 0x00],
                &[2, 10, 0, 9, 9, 0, 0, 0, 0x0d, 0x00],
                &[4, 6, 0xff, 0, 0, 1],
            ]
        );
    }

    #[test]
    fn dsdt_aml_decodes_to_the_s5_package() {
        let (mut backing, _) = build(&AcpiLayout { s5_slp_typ: 7, ..layout() });
        let (_, _, dsdt, _) = walk(&SliceMemory(&mut backing));
        let aml = &dsdt[HEADER_LEN..];
        assert_eq!(aml[0], 0x08, "NameOp");
        assert_eq!(&aml[1..5], b"_S5_");
        assert_eq!(aml[5], 0x12, "PackageOp");
        // A one-byte PkgLength has bits 7:6 clear and covers the rest of the package.
        assert_eq!(aml[6] & 0xc0, 0);
        let package_end = 6 + aml[6] as usize;
        assert_eq!(package_end, aml.len(), "the package ends the DSDT");
        assert_eq!(aml[7], 4, "NumElements");
        let mut values = Vec::new();
        let mut at = 8;
        while at < package_end {
            match aml[at] {
                0x0a => {
                    values.push(aml[at + 1]);
                    at += 2;
                }
                0x00 => {
                    values.push(0);
                    at += 1;
                }
                op => panic!("unexpected AML opcode {op:#x}"),
            }
        }
        assert_eq!(values, [7, 7, 0, 0]);
    }

    #[test]
    fn tables_above_4g_drop_the_32_bit_pointers() {
        // Guest memory that reports 5 GiB but only stores the pages the tables touch.
        struct Sparse(Vec<(u64, Vec<u8>)>);
        impl GuestMemory for Sparse {
            fn size(&self) -> u64 {
                5 << 30
            }
            fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
                buf.fill(0);
                for (at, data) in &self.0 {
                    for (i, b) in buf.iter_mut().enumerate() {
                        if let Some(off) = (gpa + i as u64).checked_sub(*at) {
                            if let Some(&v) = data.get(off as usize) {
                                *b = v;
                            }
                        }
                    }
                }
                Ok(())
            }
            fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
                self.0.push((gpa, data.to_vec()));
                Ok(())
            }
        }
        let mut mem = Sparse(Vec::new());
        let tables = 0x1_0000_0000;
        let info =
            build_tables(&mut mem, &AcpiLayout { tables_gpa: tables, lapic_base: 0x1_fee0_0000, ..layout() }).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read(info.rsdp, &mut rsdp).unwrap();
        assert_eq!(u32_at(&rsdp, 16), 0, "no RSDT");
        assert_eq!((sum(&rsdp[..20]), sum(&rsdp)), (0, 0));
        let fadt_gpa = tables + 0x80;
        let mut fadt = [0u8; 276];
        mem.read(fadt_gpa, &mut fadt).unwrap();
        assert_eq!(sum(&fadt), 0);
        assert_eq!((u32_at(&fadt, 36), u64_at(&fadt, 132)), (0, tables), "X_FIRMWARE_CTRL only");
        assert_eq!((u32_at(&fadt, 40), u64_at(&fadt, 140)), (0, tables + 0x40), "X_DSDT only");
        let mut madt = [0u8; 56];
        mem.read(tables + 0x1a0, &mut madt).unwrap();
        assert_eq!(&madt[0..4], b"APIC");
        assert_eq!(u32_at(&madt, 36), 0);
        assert_eq!(&madt[44..56], [5, 12, 0, 0, 0, 0, 0xe0, 0xfe, 1, 0, 0, 0], "local APIC address override");
    }

    #[test]
    fn layouts_that_do_not_fit_fail_without_writing() {
        let mut backing = vec![0u8; 0x10_0100];
        let mut mem = SliceMemory(&mut backing);
        let err = build_tables(&mut mem, &layout()).unwrap_err();
        assert_eq!(err, MemError::OutOfRange { gpa: 0x10_0000, len: 0x250 + 44 });
        assert!(backing.iter().all(|&b| b == 0), "nothing written");

        let mut backing = vec![0u8; MEM];
        let mut mem = SliceMemory(&mut backing);
        let err = build_tables(&mut mem, &AcpiLayout { tables_gpa: u64::MAX - 100, ..layout() }).unwrap_err();
        assert!(matches!(err, MemError::OutOfRange { gpa, .. } if gpa == u64::MAX - 100));
        let err = build_tables(&mut mem, &AcpiLayout { rsdp_gpa: MEM as u64 - 16, ..layout() }).unwrap_err();
        assert_eq!(err, MemError::OutOfRange { gpa: MEM as u64 - 16, len: 36 });
        let err = build_tables(&mut mem, &AcpiLayout { rsdp_gpa: u64::MAX - 15, ..layout() }).unwrap_err();
        assert_eq!(err, MemError::OutOfRange { gpa: u64::MAX - 15, len: 36 });
        let err = build_tables(&mut mem, &AcpiLayout { rsdp_gpa: 0xf_0008, ..layout() }).unwrap_err();
        assert_eq!(err, MemError::Unaligned { gpa: 0xf_0008, align: 16 });
        let err = build_tables(&mut mem, &AcpiLayout { ioapic_base: 1 << 32, ..layout() }).unwrap_err();
        assert_eq!(err, MemError::OutOfRange { gpa: 1 << 32, len: 4 });
        assert!(backing.iter().all(|&b| b == 0), "nothing written");
    }
}
