//! ACPI tables for a PC guest: RSDP, RSDT, XSDT, FADT, FACS, MADT and a DSDT that holds `\_S5`
//! and the PCI root bridge `\_SB.PCI0`. Layouts and offsets follow the ACPI 6.3 specification
//! (section numbers below).
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

// AML opcodes and prefixes (20.2).
const AML_ZERO_OP: u8 = 0x00;
const AML_ONE_OP: u8 = 0x01;
const AML_NAME_OP: u8 = 0x08;
const AML_BYTE_PREFIX: u8 = 0x0a;
const AML_WORD_PREFIX: u8 = 0x0b;
const AML_DWORD_PREFIX: u8 = 0x0c;
const AML_QWORD_PREFIX: u8 = 0x0e;
const AML_SCOPE_OP: u8 = 0x10;
const AML_BUFFER_OP: u8 = 0x11;
const AML_PACKAGE_OP: u8 = 0x12;
const AML_VAR_PACKAGE_OP: u8 = 0x13;
const AML_DUAL_NAME_PREFIX: u8 = 0x2e;
const AML_MULTI_NAME_PREFIX: u8 = 0x2f;
const AML_ROOT_CHAR: u8 = b'\\';
const AML_DEVICE_OP: [u8; 2] = [0x5b, 0x82];

// Resource descriptors (6.4): small items carry their length in the tag byte.
/// I/O port descriptor, 7 bytes of data (6.4.2.5).
const RES_IO_PORT: u8 = 0x47;
/// End tag, 1 byte of data: the checksum (6.4.2.9).
const RES_END_TAG: u8 = 0x79;
const RES_DWORD_ADDRESS: u8 = 0x87;
const RES_WORD_ADDRESS: u8 = 0x88;
/// I/O port descriptor information: the device decodes 16 address bits.
const IO_DECODE16: u8 = 1;
// Address space descriptors (6.4.3.5): resource types.
const SPACE_MEMORY: u8 = 0;
const SPACE_IO: u8 = 1;
const SPACE_BUS: u8 = 2;
/// General flags: minimum and maximum fixed, positive decode, and bit 0 clear: the bridge
/// produces the range for the devices below it.
const SPACE_FIXED_PRODUCER: u8 = 0x0c;
/// I/O type-specific flags (6.4.3.5.5): ISA and non-ISA ranges alike.
const IO_ENTIRE_RANGE: u8 = 0x03;
/// Memory type-specific flags (6.4.3.5.5): read-write, and cacheable (else non-cacheable).
const MEM_READ_WRITE: u8 = 0x01;
const MEM_CACHEABLE: u8 = 0x02;

/// PCI configuration mechanism #1: CONFIG_ADDRESS and CONFIG_DATA, 8 ports.
const PCI_CONFIG_PORTS: u16 = 0xcf8;
const PCI_CONFIG_PORTS_LEN: u8 = 8;
/// The legacy VGA window, which PC root bridges forward (as QEMU's DSDT says).
const VGA_WINDOW: (u32, u32) = (0xa_0000, 0xb_ffff);
/// `_PRT` device addresses match every function of the slot (6.2.13).
const PRT_ANY_FUNCTION: u64 = 0xffff;

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
    /// Base and length of the PCI host bridge's 32-bit memory window for BARs: non-empty and
    /// below 4 GiB.
    pub pci_mmio_window: (u64, u64),
    /// Where the INTx pins of the devices on bus 0 are wired (the root bridge's `_PRT`).
    pub pci_intx_routes: Vec<PciIntxRoute>,
}

/// One INTx pin of a device on bus 0 and the I/O APIC input it drives (level, active low).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIntxRoute {
    /// Device number on bus 0.
    pub slot: u8,
    /// 0 = INTA# to 3 = INTD#.
    pub pin: u8,
    /// Global system interrupt.
    pub gsi: u32,
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
/// [`MemError::OutOfRange`] if the RSDP or the tables do not fit guest memory, if the I/O
/// APIC lies above 4 GiB (the MADT cannot describe it; the error names its address), or if the
/// PCI memory window is empty or does not end below 4 GiB (the error names the window).
pub fn build_tables(mem: &mut impl GuestMemory, layout: &AcpiLayout) -> Result<AcpiInfo, MemError> {
    if !layout.rsdp_gpa.is_multiple_of(16) {
        return Err(MemError::Unaligned { gpa: layout.rsdp_gpa, align: 16 });
    }
    let ioapic_base =
        u32::try_from(layout.ioapic_base).map_err(|_| MemError::OutOfRange { gpa: layout.ioapic_base, len: 4 })?;

    let (window_base, window_len) = layout.pci_mmio_window;
    let window =
        mem32_range(window_base, window_len).ok_or(MemError::OutOfRange { gpa: window_base, len: window_len })?;

    let dsdt = dsdt(layout, window);
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

/// DSDT revision 2 (5.2.11.1): `\_S5` and the PCI root bridge. `window` is the BAR window's
/// first and last byte.
fn dsdt(layout: &AcpiLayout, window: (u32, u32)) -> Vec<u8> {
    let mut t = table(*b"DSDT", 2, HEADER_LEN);
    // Package (0x04) { SLP_TYPa, SLP_TYPb, reserved, reserved } (7.4.2).
    let typ = integer(layout.s5_slp_typ.into());
    t.extend(name_object("_S5", &package(&[typ.clone(), typ, integer(0), integer(0)])));
    t.extend(scope(r"\_SB", &pci_root(layout, window)));
    seal(t)
}

/// `Device (PCI0)`: a PNP0A03 root bridge for bus 0 with its resources (6.2.2) and static
/// interrupt routing (6.2.13), so the OS neither probes for buses nor needs link devices.
fn pci_root(layout: &AcpiLayout, window: (u32, u32)) -> Vec<u8> {
    let mut terms = name_object("_HID", &integer(eisa_id(b"PNP0A03").into()));
    terms.extend(name_object("_ADR", &integer(0)));
    terms.extend(name_object("_UID", &integer(0)));
    terms.extend(name_object("_BBN", &integer(0)));

    let mut crs = word_address(SPACE_BUS, 0, (0, 0));
    crs.extend(io_port(PCI_CONFIG_PORTS, PCI_CONFIG_PORTS, 1, PCI_CONFIG_PORTS_LEN));
    // All other I/O ports pass through to the bus.
    crs.extend(word_address(SPACE_IO, IO_ENTIRE_RANGE, (0, PCI_CONFIG_PORTS - 1)));
    crs.extend(word_address(SPACE_IO, IO_ENTIRE_RANGE, (0xd00, 0xffff)));
    crs.extend(dword_address(SPACE_MEMORY, MEM_CACHEABLE | MEM_READ_WRITE, VGA_WINDOW));
    crs.extend(dword_address(SPACE_MEMORY, MEM_READ_WRITE, window));
    terms.extend(name_object("_CRS", &resource_template(&crs)));

    // { Address, Pin, Source, Source Index }: source Zero makes the index a GSI, which is
    // level-triggered and active low.
    let routes: Vec<Vec<u8>> = layout
        .pci_intx_routes
        .iter()
        .map(|r| {
            let address = u64::from(r.slot) << 16 | PRT_ANY_FUNCTION;
            package(&[integer(address), integer(r.pin.into()), integer(0), integer(r.gsi.into())])
        })
        .collect();
    terms.extend(name_object("_PRT", &package(&routes)));
    device("PCI0", &terms)
}

/// First and last byte of `len` bytes at `base`, if `len` is not zero and they end below 4 GiB.
fn mem32_range(base: u64, len: u64) -> Option<(u32, u32)> {
    // The descriptor's length field holds 32 bits too.
    u32::try_from(len).ok()?;
    let last = base.checked_add(len.checked_sub(1)?)?;
    Some((u32::try_from(base).ok()?, u32::try_from(last).ok()?))
}

/// PkgLength (20.2.4) for `body_len` bytes after it. The length it encodes counts its own
/// bytes, so the size is chosen with them included: 6 bits in one byte, else 4 + 8 per byte.
fn pkg_length(body_len: usize) -> Vec<u8> {
    let (extra, total) = match body_len {
        0..=62 => return vec![body_len as u8 + 1],
        n if n + 2 < 1 << 12 => (1, n + 2),
        n if n + 3 < 1 << 20 => (2, n + 3),
        n => (3, n + 4),
    };
    debug_assert!(total < 1 << 28, "PkgLength holds 28 bits");
    let mut out = vec![(extra << 6) as u8 | (total & 0xf) as u8];
    out.extend((0..extra).map(|i| (total >> (4 + 8 * i)) as u8));
    out
}

/// `op`, then PkgLength, then `body`: the shape of every AML object with a length.
fn with_pkg_length(op: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = op.to_vec();
    out.extend(pkg_length(body.len()));
    out.extend_from_slice(body);
    out
}

/// NameSeg (20.2.2): ASL pads names shorter than four characters with `_`.
fn name_seg(seg: &str) -> [u8; 4] {
    debug_assert!((1..=4).contains(&seg.len()), "NameSeg {seg:?}");
    let mut out = *b"____";
    put(&mut out, 0, seg.as_bytes());
    out
}

/// NameString (20.2.2) from ASL notation: an optional `\` for the root, then segments separated
/// by dots (a NameSeg, a DualNamePath or a MultiNamePath).
fn name_string(path: &str) -> Vec<u8> {
    let (mut out, relative) = match path.strip_prefix('\\') {
        Some(rest) => (vec![AML_ROOT_CHAR], rest),
        None => (Vec::new(), path),
    };
    let segs: Vec<&str> = relative.split('.').collect();
    match segs.len() {
        1 => {}
        2 => out.push(AML_DUAL_NAME_PREFIX),
        // A path has at most 255 segments.
        n => out.extend([AML_MULTI_NAME_PREFIX, n as u8]),
    }
    for seg in segs {
        out.extend(name_seg(seg));
    }
    out
}

/// An Integer (20.2.3) in its shortest encoding.
fn integer(value: u64) -> Vec<u8> {
    let (prefix, width) = match value {
        0 => return vec![AML_ZERO_OP],
        1 => return vec![AML_ONE_OP],
        2..=0xff => (AML_BYTE_PREFIX, 1),
        0x100..=0xffff => (AML_WORD_PREFIX, 2),
        0x1_0000..=0xffff_ffff => (AML_DWORD_PREFIX, 4),
        _ => (AML_QWORD_PREFIX, 8),
    };
    let mut out = vec![prefix];
    out.extend_from_slice(&value.to_le_bytes()[..width]);
    out
}

/// DefPackage of encoded elements (20.2.5.4); NumElements is one byte, so a longer list is a
/// DefVarPackage.
fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    let (op, mut body) = match u8::try_from(elements.len()) {
        Ok(n) => (AML_PACKAGE_OP, vec![n]),
        Err(_) => (AML_VAR_PACKAGE_OP, integer(elements.len() as u64)),
    };
    for element in elements {
        body.extend_from_slice(element);
    }
    with_pkg_length(&[op], &body)
}

/// DefBuffer (20.2.5.4) initialised with `bytes`.
fn buffer(bytes: &[u8]) -> Vec<u8> {
    let mut body = integer(bytes.len() as u64);
    body.extend_from_slice(bytes);
    with_pkg_length(&[AML_BUFFER_OP], &body)
}

/// DefName (20.2.5.1): `Name (name, value)`.
fn name_object(name: &str, value: &[u8]) -> Vec<u8> {
    let mut out = vec![AML_NAME_OP];
    out.extend(name_string(name));
    out.extend_from_slice(value);
    out
}

/// DefScope (20.2.5.1) holding the encoded `terms`.
fn scope(path: &str, terms: &[u8]) -> Vec<u8> {
    with_pkg_length(&[AML_SCOPE_OP], &[name_string(path).as_slice(), terms].concat())
}

/// DefDevice (20.2.5.2) holding the encoded `terms`.
fn device(name: &str, terms: &[u8]) -> Vec<u8> {
    with_pkg_length(&AML_DEVICE_OP, &[name_string(name).as_slice(), terms].concat())
}

/// ASL's EisaId: three letters of five bits each and four hex digits, big-endian in memory,
/// so "PNP0A03" reads as the integer 0x030ad041.
fn eisa_id(id: &[u8; 7]) -> u32 {
    let letters = id[..3].iter().fold(0, |v, &c| v << 5 | u32::from(c.wrapping_sub(b'@') & 0x1f));
    let digits = id[3..].iter().fold(0, |v, &c| v << 4 | char::from(c).to_digit(16).unwrap_or(0));
    (letters << 16 | digits).swap_bytes()
}

/// A ResourceTemplate (6.4): `descriptors` and the end tag in a buffer. The end tag's checksum
/// is zero, which means the sum is not checked (6.4.2.9).
fn resource_template(descriptors: &[u8]) -> Vec<u8> {
    buffer(&[descriptors, &[RES_END_TAG, 0]].concat())
}

/// I/O port descriptor (6.4.2.5): base addresses `min..=max` with `align`, `len` ports.
fn io_port(min: u16, max: u16, align: u8, len: u8) -> Vec<u8> {
    let mut d = vec![RES_IO_PORT, IO_DECODE16];
    d.extend(min.to_le_bytes());
    d.extend(max.to_le_bytes());
    d.extend([align, len]);
    d
}

/// Word address space descriptor (6.4.3.5.3) the bridge produces for `range` (inclusive, not
/// the whole 64 KiB): granularity and translation zero.
fn word_address(space: u8, type_flags: u8, (min, max): (u16, u16)) -> Vec<u8> {
    let mut d = vec![RES_WORD_ADDRESS, 13, 0, space, SPACE_FIXED_PRODUCER, type_flags];
    for field in [0, min, max, 0, max.wrapping_sub(min).wrapping_add(1)] {
        d.extend(field.to_le_bytes());
    }
    d
}

/// DWord address space descriptor (6.4.3.5.2) the bridge produces for `range` (inclusive, not
/// the whole 4 GiB): granularity and translation zero.
fn dword_address(space: u8, type_flags: u8, (min, max): (u32, u32)) -> Vec<u8> {
    let mut d = vec![RES_DWORD_ADDRESS, 23, 0, space, SPACE_FIXED_PRODUCER, type_flags];
    for field in [0, min, max, 0, max.wrapping_sub(min).wrapping_add(1)] {
        d.extend(field.to_le_bytes());
    }
    d
}

#[cfg(test)]
impl AcpiLayout {
    /// A PC layout with `cpu_count` CPUs, tables at 1 MiB (for tests that build tables).
    pub(crate) fn for_tests(cpu_count: u8) -> Self {
        use crate::devices::pci;
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
            pci_mmio_window: (pci::MMIO_WINDOW_BASE, pci::MMIO_WINDOW_LEN),
            pci_intx_routes: (1..pci::SLOTS)
                .flat_map(|slot| {
                    (0..4).map(move |pin| PciIntxRoute { slot, pin, gsi: pci::intx_gsi(slot, pin).into() })
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci;
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
        // 16-byte aligned one after another: FACS (64), DSDT at 0x40 (1773), FADT at 0x730 (276),
        // MADT at 0x850 (98), XSDT at 0x8c0 (52), RSDT at 0x900 (44).
        assert_eq!(dsdt_gpa, 0x10_0040);
        assert_eq!(dsdt.len(), 1773);
        assert_eq!(info.end, 0x10_0900 + 44);
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

    /// The AML objects `dsdt` builds, read back (20.2).
    #[derive(Clone, Debug, PartialEq)]
    enum Aml {
        Int(u64),
        Package(Vec<Aml>),
        Buffer(Vec<u8>),
        Name(String, Box<Aml>),
        Scope(String, Vec<Aml>),
        Device(String, Vec<Aml>),
    }

    /// A decoder written from the grammar, independent of the encoder above.
    struct Decoder<'a> {
        aml: &'a [u8],
        at: usize,
    }

    impl Decoder<'_> {
        fn byte(&mut self) -> u8 {
            self.at += 1;
            self.aml[self.at - 1]
        }

        fn le(&mut self, width: usize) -> u64 {
            (0..width).fold(0, |v, i| v | u64::from(self.byte()) << (8 * i))
        }

        /// Reads a PkgLength (20.2.4) and returns where the object it starts ends.
        fn pkg_end(&mut self) -> usize {
            let start = self.at;
            let lead = self.byte();
            let follow = usize::from(lead >> 6);
            if follow == 0 {
                return start + usize::from(lead);
            }
            assert_eq!(lead & 0x30, 0, "reserved PkgLength bits");
            start + (0..follow).fold(usize::from(lead & 0xf), |len, i| len | usize::from(self.byte()) << (4 + 8 * i))
        }

        fn name(&mut self) -> String {
            let mut out = String::new();
            if self.aml[self.at] == b'\\' {
                out.push(char::from(self.byte()));
            }
            let segs = match self.aml[self.at] {
                0x2e => {
                    self.at += 1;
                    2
                }
                0x2f => {
                    self.at += 1;
                    usize::from(self.byte())
                }
                _ => 1,
            };
            let segs: Vec<String> =
                (0..segs).map(|_| (0..4).map(|_| char::from(self.byte())).collect::<String>()).collect();
            out + &segs.join(".")
        }

        fn int(&mut self) -> u64 {
            match self.object() {
                Aml::Int(v) => v,
                other => panic!("expected an integer, found {other:?}"),
            }
        }

        fn object(&mut self) -> Aml {
            match self.byte() {
                0x00 => Aml::Int(0),
                0x01 => Aml::Int(1),
                0x0a => Aml::Int(self.le(1)),
                0x0b => Aml::Int(self.le(2)),
                0x0c => Aml::Int(self.le(4)),
                0x0e => Aml::Int(self.le(8)),
                0x08 => Aml::Name(self.name(), Box::new(self.object())),
                0x10 => {
                    let end = self.pkg_end();
                    Aml::Scope(self.name(), self.objects(end))
                }
                0x11 => {
                    let end = self.pkg_end();
                    let size = self.int() as usize;
                    let bytes = self.aml[self.at..end].to_vec();
                    self.at = end;
                    assert_eq!(size, bytes.len(), "BufferSize");
                    Aml::Buffer(bytes)
                }
                op @ (0x12 | 0x13) => {
                    let end = self.pkg_end();
                    let count = if op == 0x12 { self.le(1) } else { self.int() };
                    let elements = self.objects(end);
                    assert_eq!(elements.len() as u64, count, "NumElements");
                    Aml::Package(elements)
                }
                0x5b if self.aml[self.at] == 0x82 => {
                    self.at += 1;
                    let end = self.pkg_end();
                    Aml::Device(self.name(), self.objects(end))
                }
                op => panic!("unexpected AML opcode {op:#x} at {}", self.at - 1),
            }
        }

        /// The objects up to `end`, where the last one must end too.
        fn objects(&mut self, end: usize) -> Vec<Aml> {
            let mut out = Vec::new();
            while self.at < end {
                out.push(self.object());
            }
            assert_eq!(self.at, end, "objects end where their PkgLength says");
            out
        }
    }

    /// The DSDT's objects, for a layout.
    fn dsdt_objects(layout: &AcpiLayout) -> Vec<Aml> {
        let (mut backing, _) = build(layout);
        let (_, _, dsdt, _) = walk(&SliceMemory(&mut backing));
        let aml = &dsdt[HEADER_LEN..];
        Decoder { aml, at: 0 }.objects(aml.len())
    }

    /// The objects in `\_SB.PCI0`.
    fn pci0(layout: &AcpiLayout) -> Vec<Aml> {
        let objects = dsdt_objects(layout);
        let [_, Aml::Scope(scope, sb)] = &objects[..] else { panic!("\\_S5 and one scope: {objects:?}") };
        assert_eq!(scope, r"\_SB_");
        match &sb[..] {
            [Aml::Device(name, pci0)] if name == "PCI0" => pci0.clone(),
            other => panic!("one device PCI0 in \\_SB: {other:?}"),
        }
    }

    /// The value of `Name (name, ...)` among `objects`.
    fn named<'a>(objects: &'a [Aml], name: &str) -> &'a Aml {
        let found = objects.iter().find_map(|o| match o {
            Aml::Name(n, value) if n == name => Some(&**value),
            _ => None,
        });
        found.unwrap_or_else(|| panic!("no {name} in {objects:?}"))
    }

    /// The descriptors of a resource template as (tag byte, data), up to and with the end tag.
    fn resources(template: &[u8]) -> Vec<(u8, &[u8])> {
        let mut items = Vec::new();
        let mut at = 0;
        while at < template.len() {
            let tag = template[at];
            // Small items hold their length in bits 2:0, large ones in the next two bytes.
            let (start, len) = if tag & 0x80 == 0 {
                (at + 1, usize::from(tag & 7))
            } else {
                (at + 3, usize::from(u16_at(template, at + 1)))
            };
            items.push((tag, &template[start..start + len]));
            at = start + len;
            if tag == 0x79 {
                break;
            }
        }
        assert_eq!(at, template.len(), "the end tag ends the template");
        items
    }

    /// A Word address space descriptor: (type, general flags, type flags, [granularity, min,
    /// max, translation, length]).
    fn word_space((tag, d): (u8, &[u8])) -> (u8, u8, u8, [u16; 5]) {
        assert_eq!((tag, d.len()), (0x88, 13));
        (d[0], d[1], d[2], core::array::from_fn(|i| u16_at(d, 3 + 2 * i)))
    }

    /// A DWord address space descriptor, fields as in [`word_space`].
    fn dword_space((tag, d): (u8, &[u8])) -> (u8, u8, u8, [u32; 5]) {
        assert_eq!((tag, d.len()), (0x87, 23));
        (d[0], d[1], d[2], core::array::from_fn(|i| u32_at(d, 3 + 4 * i)))
    }

    #[test]
    fn dsdt_aml_decodes_to_s5_and_the_pci_root_bridge() {
        let objects = dsdt_objects(&AcpiLayout { s5_slp_typ: 7, ..layout() });
        let s5 = Aml::Package(vec![Aml::Int(7), Aml::Int(7), Aml::Int(0), Aml::Int(0)]);
        assert_eq!(objects[0], Aml::Name("_S5_".into(), Box::new(s5)));

        let pci0 = pci0(&layout());
        let names: Vec<&str> = pci0
            .iter()
            .map(|o| match o {
                Aml::Name(n, _) => n.as_str(),
                other => panic!("only names in PCI0: {other:?}"),
            })
            .collect();
        assert_eq!(names, ["_HID", "_ADR", "_UID", "_BBN", "_CRS", "_PRT"]);
        assert_eq!(named(&pci0, "_HID"), &Aml::Int(0x030a_d041), "EisaId (\"PNP0A03\")");
        for name in ["_ADR", "_UID", "_BBN"] {
            assert_eq!(named(&pci0, name), &Aml::Int(0), "{name}");
        }
    }

    #[test]
    fn pci0_crs_holds_bus_0_the_io_ranges_and_the_bar_window() {
        for window in [(pci::MMIO_WINDOW_BASE, pci::MMIO_WINDOW_LEN), (0xc000_0000, 0x1000), (0xf000_0000, 1 << 28)] {
            let pci0 = pci0(&AcpiLayout { pci_mmio_window: window, ..layout() });
            let Aml::Buffer(crs) = named(&pci0, "_CRS") else { panic!("_CRS is a buffer") };
            let items = resources(crs);
            assert_eq!(items.len(), 7, "{items:x?}");
            // Producer with fixed minimum and maximum: general flags 0x0c.
            assert_eq!(word_space(items[0]), (2, 0x0c, 0, [0, 0, 0, 0, 1]), "bus 0 to 0");
            assert_eq!(items[1], (0x47, [1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8].as_slice()), "IO (Decode16, 0xcf8, 8)");
            assert_eq!(word_space(items[2]), (1, 0x0c, 3, [0, 0, 0xcf7, 0, 0xcf8]), "I/O below the config ports");
            assert_eq!(word_space(items[3]), (1, 0x0c, 3, [0, 0xd00, 0xffff, 0, 0xf300]), "I/O above them");
            assert_eq!(dword_space(items[4]), (0, 0x0c, 3, [0, 0xa_0000, 0xb_ffff, 0, 0x2_0000]), "VGA, cacheable");
            let (base, len) = (window.0 as u32, window.1 as u32);
            assert_eq!(dword_space(items[5]), (0, 0x0c, 1, [0, base, base + (len - 1), 0, len]), "BAR window");
            assert_eq!(items[6], (0x79, [0].as_slice()), "end tag, checksum unused");
        }
    }

    #[test]
    fn pci0_prt_has_one_entry_per_route() {
        let entries = |layout: &AcpiLayout| {
            let Aml::Package(entries) = named(&pci0(layout), "_PRT").clone() else { panic!("_PRT is a package") };
            entries
        };
        let expected = |routes: &[PciIntxRoute]| -> Vec<Aml> {
            let entry = |r: &PciIntxRoute| {
                let address = u64::from(r.slot) << 16 | 0xffff;
                vec![Aml::Int(address), Aml::Int(r.pin.into()), Aml::Int(0), Aml::Int(r.gsi.into())]
            };
            routes.iter().map(|r| Aml::Package(entry(r))).collect()
        };
        // The PC's: four pins on each of slots 1 to 31.
        let pc = layout();
        assert_eq!(pc.pci_intx_routes.len(), 31 * 4);
        assert_eq!(entries(&pc), expected(&pc.pci_intx_routes));

        // GSIs of every width, and more routes than a Package holds.
        let wide = [(0, 0, 16), (5, 1, 0x100), (31, 3, 0x1_0000), (9, 2, 1)]
            .map(|(slot, pin, gsi)| PciIntxRoute { slot, pin, gsi })
            .to_vec();
        let many: Vec<PciIntxRoute> = (0..300).map(|i| PciIntxRoute { slot: (i % 32) as u8, pin: 3, gsi: i }).collect();
        for routes in [wide, many, Vec::new()] {
            assert_eq!(entries(&AcpiLayout { pci_intx_routes: routes.clone(), ..layout() }), expected(&routes));
        }
    }

    #[test]
    fn pkg_length_takes_one_more_byte_past_63_4095_and_2_pow_20_minus_1() {
        // (bytes after the PkgLength, encoding): the length encoded counts the PkgLength too, so
        // 63 bytes in all fit one byte and 64 do not: that object is 65 bytes with two.
        let cases = [
            (0, vec![0x01]),
            (62, vec![0x3f]),
            (63, vec![0x41, 0x04]),
            (4093, vec![0x4f, 0xff]),
            (4094, vec![0x81, 0x00, 0x01]),
            (0xf_fffc, vec![0x8f, 0xff, 0xff]),
            (0xf_fffd, vec![0xc1, 0x00, 0x00, 0x01]),
        ];
        for (body, encoding) in cases {
            assert_eq!(pkg_length(body), encoding, "{body} bytes");
        }
        // Every length up to the three-byte form decodes back to the end of its object.
        for body in (0..5000).chain(0xf_fff0..0x10_0010) {
            let encoded = pkg_length(body);
            let end = Decoder { aml: &encoded, at: 0 }.pkg_end();
            assert_eq!(end, encoded.len() + body, "{body} bytes");
        }
    }

    #[test]
    fn integers_names_and_eisa_ids_have_their_aml_forms() {
        let cases: [(u64, &[u8]); 9] = [
            (0, &[0x00]),
            (1, &[0x01]),
            (2, &[0x0a, 2]),
            (0xff, &[0x0a, 0xff]),
            (0x100, &[0x0b, 0x00, 0x01]),
            (0xffff, &[0x0b, 0xff, 0xff]),
            (0x1_0000, &[0x0c, 0x00, 0x00, 0x01, 0x00]),
            (0xffff_ffff, &[0x0c, 0xff, 0xff, 0xff, 0xff]),
            (0x1_0000_0000, &[0x0e, 0, 0, 0, 0, 1, 0, 0, 0]),
        ];
        for (value, aml) in cases {
            assert_eq!(integer(value), aml, "{value:#x}");
        }
        assert_eq!(name_string("_S5"), b"_S5_");
        assert_eq!(name_string(r"\_SB"), b"\\_SB_");
        assert_eq!(name_string(r"\_SB.PCI0"), b"\\\x2e_SB_PCI0");
        assert_eq!(name_string("A.B1.C"), b"\x2f\x03A___B1__C___");
        assert_eq!(eisa_id(b"PNP0A03"), 0x030a_d041);
        assert_eq!(eisa_id(b"PNP0C0F"), 0x0f0c_d041);
        assert_eq!(eisa_id(b"PNP0103"), 0x0301_d041);
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
        let fadt_gpa = tables + 0x730;
        let mut fadt = [0u8; 276];
        mem.read(fadt_gpa, &mut fadt).unwrap();
        assert_eq!(sum(&fadt), 0);
        assert_eq!((u32_at(&fadt, 36), u64_at(&fadt, 132)), (0, tables), "X_FIRMWARE_CTRL only");
        assert_eq!((u32_at(&fadt, 40), u64_at(&fadt, 140)), (0, tables + 0x40), "X_DSDT only");
        let mut madt = [0u8; 56];
        mem.read(tables + 0x850, &mut madt).unwrap();
        assert_eq!(&madt[0..4], b"APIC");
        assert_eq!(u32_at(&madt, 36), 0);
        assert_eq!(&madt[44..56], [5, 12, 0, 0, 0, 0, 0xe0, 0xfe, 1, 0, 0, 0], "local APIC address override");
    }

    #[test]
    fn layouts_that_do_not_fit_fail_without_writing() {
        let mut backing = vec![0u8; 0x10_0100];
        let mut mem = SliceMemory(&mut backing);
        let err = build_tables(&mut mem, &layout()).unwrap_err();
        assert_eq!(err, MemError::OutOfRange { gpa: 0x10_0000, len: 0x900 + 44 });
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
        // A BAR window that is empty or reaches past 4 GiB does not fit a DWordMemory descriptor.
        for window in [(0xe000_0000, 0), (0xf000_0000, 0x1000_0001), (1 << 32, 0x1000), (0, 1 << 32)] {
            let err = build_tables(&mut mem, &AcpiLayout { pci_mmio_window: window, ..layout() }).unwrap_err();
            assert_eq!(err, MemError::OutOfRange { gpa: window.0, len: window.1 });
        }
        assert!(backing.iter().all(|&b| b == 0), "nothing written");
    }
}
