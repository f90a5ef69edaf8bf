//! Putting a kernel into a fresh VM: the guest-physical layout, the memory map, ACPI tables,
//! and the loader that matches the image (Linux bzImage, multiboot v1, ELF64).

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use crate::acpi::{self, AcpiLayout, PciIntxRoute};
use crate::devices::{acpi_pm, ioapic, pci};
use crate::loader::bzimage::{self, E820Entry, LinuxLayout, E820_RAM, E820_RESERVED};
use crate::loader::elf::Reserved;
use crate::loader::multiboot::{self, MultibootLayout};
use crate::loader::{elf, page_tables, GuestMemory};
use crate::vcpu::StartMode;
use crate::vm::config::{Entry, VmConfig};
use crate::vm::lapic::LAPIC_BASE;

/// Guest-physical layout of what the hypervisor places in low memory.
pub mod layout {
    /// Linux zero page (boot_params).
    pub const ZERO_PAGE: u64 = 0x7000;
    /// Identity-mapping page tables for 64-bit starts (6 pages).
    pub const PAGE_TABLES: u64 = 0x1_0000;
    /// Kernel command line.
    pub const CMDLINE: u64 = 0x2_0000;
    /// Room for the command line, including its NUL.
    pub const CMDLINE_MAX: u64 = 0x1000;
    /// Multiboot information, module list and strings.
    pub const MULTIBOOT_INFO: u64 = 0x3_0000;
    /// Room for the multiboot information.
    pub const MULTIBOOT_INFO_MAX: u64 = 0x1_0000;
    /// Initial stack of 64-bit ELF guests.
    pub const STACK_TOP: u64 = 0x8_0000;
    /// End of conventional memory (the EBDA would start here).
    pub const LOW_RAM_END: u64 = 0x9_fc00;
    /// The BIOS area, where the RSDP must be for the OS's scan to find it.
    pub const BIOS_AREA: u64 = 0xe_0000;
    /// RSDP, then the other ACPI tables.
    pub const RSDP: u64 = 0xe_0000;
    /// ACPI tables after the RSDP.
    pub const ACPI_TABLES: u64 = 0xe_0040;
    /// Start of high RAM.
    pub const HIGH_RAM: u64 = 0x10_0000;
    /// The identity map for 64-bit starts covers the 32-bit space (RAM and the MMIO hole).
    pub const IDENTITY_LIMIT: u64 = 4 << 30;
}

/// What kind of kernel an image is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// Linux bzImage (64-bit boot protocol).
    BzImage,
    /// Multiboot v1.
    Multiboot,
    /// Plain ELF64 executable.
    Elf64,
}

/// Recognises the image by its headers: bzImage's "HdrS", a multiboot header, or ELF64.
pub fn detect(image: &[u8]) -> Option<KernelFormat> {
    if image.get(0x202..0x206) == Some(b"HdrS") {
        Some(KernelFormat::BzImage)
    } else if multiboot::has_header(image) {
        Some(KernelFormat::Multiboot)
    } else if image.get(..5) == Some(b"\x7fELF\x02") {
        Some(KernelFormat::Elf64)
    } else {
        None
    }
}

/// The guest's memory map for `ram_bytes` of RAM.
pub fn e820(ram_bytes: u64) -> Vec<E820Entry> {
    vec![
        E820Entry { addr: 0, size: layout::LOW_RAM_END, kind: E820_RAM },
        E820Entry { addr: layout::LOW_RAM_END, size: 0xa_0000 - layout::LOW_RAM_END, kind: E820_RESERVED },
        E820Entry { addr: layout::BIOS_AREA, size: layout::HIGH_RAM - layout::BIOS_AREA, kind: E820_RESERVED },
        E820Entry { addr: layout::HIGH_RAM, size: ram_bytes.saturating_sub(layout::HIGH_RAM), kind: E820_RAM },
        E820Entry { addr: ioapic::IOAPIC_BASE, size: 0x1000, kind: E820_RESERVED },
        E820Entry { addr: LAPIC_BASE, size: 0x1000, kind: E820_RESERVED },
    ]
}

/// A loaded kernel, ready to start.
#[derive(Debug)]
pub struct Prepared {
    /// How the vCPU starts.
    pub start: StartMode,
    /// What was loaded.
    pub format: KernelFormat,
    /// One line for the log.
    pub summary: String,
}

/// Loads `kernel` (and `initrd`) into `mem` as `config` describes, with ACPI tables.
///
/// `initrd` is Linux's initrd (or, for a multiboot kernel, its first module, as QEMU's `-initrd`
/// does); `modules` are further multiboot modules with their strings.
pub fn prepare(
    config: &VmConfig,
    kernel: &[u8],
    initrd: Option<(&str, &[u8])>,
    modules: &[(&str, &[u8])],
    mem: &mut impl GuestMemory,
) -> Result<Prepared, String> {
    let ram = mem.size();
    let acpi = acpi::build_tables(
        mem,
        &AcpiLayout {
            rsdp_gpa: layout::RSDP,
            tables_gpa: layout::ACPI_TABLES,
            lapic_base: LAPIC_BASE,
            ioapic_base: ioapic::IOAPIC_BASE,
            ioapic_id: 1,
            pm1a_evt: acpi_pm::PM1A_EVT_BLK,
            pm1a_cnt: acpi_pm::PM1A_CNT_BLK,
            pm_tmr: acpi_pm::PM_TMR_BLK,
            pm_tmr_32bit: acpi_pm::PM_TIMER_32BIT,
            reset_port: acpi_pm::RESET_PORT,
            reset_value: acpi_pm::RESET_VALUE,
            sci_irq: acpi_pm::SCI_GSI,
            s5_slp_typ: acpi_pm::S5_SLP_TYP,
            cpu_count: u8::try_from(config.vcpus).unwrap_or(u8::MAX),
            pci_mmio_window: (pci::MMIO_WINDOW_BASE, pci::MMIO_WINDOW_LEN),
            // Every pin of every slot but the host bridge's, as the bus wires them.
            pci_intx_routes: (1..pci::SLOTS)
                .flat_map(|slot| {
                    (0..4).map(move |pin| PciIntxRoute { slot, pin, gsi: pci::intx_gsi(slot, pin).into() })
                })
                .collect(),
        },
    )
    .map_err(|e| format!("ACPI tables: {e}"))?;
    if acpi.end > layout::HIGH_RAM {
        return Err(format!("ACPI tables end at {:#x}, beyond the BIOS area", acpi.end));
    }
    // The other loaders place nothing there (it is not RAM in their memory map); an ELF64
    // image says where it goes, so it is told what is taken.
    let acpi_area = Reserved { start: layout::RSDP, end: acpi.end, what: "ACPI tables" };
    let format = detect(kernel).ok_or_else(|| {
        format!(
            "kernel {}: not a bzImage, multiboot or ELF64 image (first bytes {:02x?})",
            config.kernel,
            &kernel[..kernel.len().min(4)]
        )
    })?;
    if initrd.is_some() && format == KernelFormat::Elf64 {
        return Err(format!("initrd: an ELF64 kernel ({}) takes no initrd", config.kernel));
    }
    if !modules.is_empty() && format != KernelFormat::Multiboot {
        return Err(format!("modules: only multiboot kernels take modules, and {} is a {format:?}", config.kernel));
    }
    match (format, config.entry) {
        (KernelFormat::BzImage, Entry::Long64) => {
            let linux_layout = LinuxLayout {
                ram_bytes: ram,
                e820: e820(ram),
                zero_page_gpa: layout::ZERO_PAGE,
                cmdline_gpa: layout::CMDLINE,
                cmdline_max: layout::CMDLINE_MAX,
                rsdp: Some(acpi.rsdp),
            };
            let loaded =
                bzimage::load_bzimage(kernel, initrd.map(|(_, data)| data), &config.cmdline, mem, &linux_layout)
                    .map_err(|e| format!("kernel {}: {e}", config.kernel))?;
            let cr3 = identity_map(mem)?;
            let summary = format!(
                "Linux boot protocol {}.{:02}, kernel at {:#x}..{:#x}{}",
                loaded.protocol >> 8,
                loaded.protocol & 0xff,
                loaded.kernel_start,
                loaded.kernel_end,
                loaded.initrd.map_or(String::new(), |(at, len)| format!(", initrd {len} bytes at {at:#x}"))
            );
            Ok(Prepared {
                start: StartMode::Long64 { rip: loaded.entry, rsp: 0, cr3, rsi: loaded.zero_page },
                format,
                summary,
            })
        }
        (KernelFormat::Multiboot, Entry::Long64) => {
            let modules: Vec<(&[u8], &str)> =
                initrd.into_iter().chain(modules.iter().copied()).map(|(name, data)| (data, name)).collect();
            let mb_layout = MultibootLayout {
                ram_bytes: ram,
                e820: e820(ram),
                info_gpa: layout::MULTIBOOT_INFO,
                info_max: layout::MULTIBOOT_INFO_MAX,
            };
            // The kernel's path is the first word, as QEMU's -kernel and GRUB give it (kernels
            // parse it as argv[0]), like each module's string starts with its file.
            let cmdline = format!("{} {}", config.kernel, config.cmdline);
            let loaded = multiboot::load_multiboot(kernel, &modules, cmdline.trim_end(), mem, &mb_layout)
                .map_err(|e| format!("kernel {}: {e}", config.kernel))?;
            Ok(Prepared {
                start: StartMode::Protected32 { eip: loaded.entry, eax: multiboot::BOOTLOADER_MAGIC, ebx: loaded.info },
                format,
                summary: format!("multiboot kernel, entry {:#x}, {} module(s)", loaded.entry, modules.len()),
            })
        }
        (KernelFormat::Elf64, Entry::Long64) => {
            let reserved = [
                acpi_area,
                Reserved {
                    start: layout::PAGE_TABLES,
                    end: layout::PAGE_TABLES + page_tables::identity_map_size(layout::IDENTITY_LIMIT),
                    what: "identity-map page tables",
                },
                Reserved {
                    start: layout::CMDLINE,
                    end: layout::CMDLINE + config.cmdline.len() as u64 + 1,
                    what: "command line",
                },
            ];
            let loaded =
                elf::load_elf64_around(kernel, mem, &reserved).map_err(|e| format!("kernel {}: {e}", config.kernel))?;
            let cr3 = identity_map(mem)?;
            write_cmdline(mem, &config.cmdline)?;
            Ok(Prepared {
                start: StartMode::Long64 { rip: loaded.entry, rsp: layout::STACK_TOP, cr3, rsi: layout::CMDLINE },
                format,
                summary: format!("ELF64 kernel, entry {:#x}", loaded.entry),
            })
        }
        (KernelFormat::Elf64, Entry::Real) => {
            let loaded = elf::load_elf64_around(kernel, mem, &[acpi_area])
                .map_err(|e| format!("kernel {}: {e}", config.kernel))?;
            if loaded.entry >= 0x10_0000 {
                return Err(format!("entry = real, but the kernel's entry {:#x} is above 1 MiB", loaded.entry));
            }
            Ok(Prepared {
                start: StartMode::Real {
                    cs: ((loaded.entry >> 4) & 0xf000) as u16,
                    ip: (loaded.entry & 0xffff) as u16,
                },
                format,
                summary: format!("real-mode kernel, entry {:#x}", loaded.entry),
            })
        }
        (format, Entry::Real) => {
            Err(format!("entry = real is only for ELF images, and {} is a {format:?}", config.kernel))
        }
    }
}

fn identity_map(mem: &mut impl GuestMemory) -> Result<u64, String> {
    page_tables::build_identity_map(mem, layout::PAGE_TABLES, layout::IDENTITY_LIMIT)
        .map_err(|e| format!("page tables: {e}"))
}

fn write_cmdline(mem: &mut impl GuestMemory, cmdline: &str) -> Result<(), String> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    if bytes.len() as u64 > layout::CMDLINE_MAX {
        return Err(format!("cmdline is {} bytes, more than {}", bytes.len() - 1, layout::CMDLINE_MAX - 1));
    }
    mem.write(layout::CMDLINE, &bytes).map_err(|e| format!("command line: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::SliceMemory;
    use crate::vm::config;

    fn config(kernel: &str, entry: Entry) -> VmConfig {
        VmConfig {
            name: "t".into(),
            kernel: kernel.into(),
            initrd: None,
            modules: Vec::new(),
            cmdline: "console=ttyS0".into(),
            memory: 16 << 20,
            vcpus: 1,
            entry,
            devices: config::DeviceSet::default(),
            timeout_seconds: None,
            cpus: None,
            disks: Vec::new(),
            nics: Vec::new(),
        }
    }

    #[test]
    fn formats_are_recognised_by_their_headers() {
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect(&bz), Some(KernelFormat::BzImage));
        let mut mb = vec![0u8; 64];
        mb[8..12].copy_from_slice(&0x1bad_b002u32.to_le_bytes());
        mb[16..20].copy_from_slice(&0u32.wrapping_sub(0x1bad_b002).to_le_bytes());
        assert_eq!(detect(&mb), Some(KernelFormat::Multiboot));
        assert_eq!(detect(b"\x7fELF\x02\x01\x01"), Some(KernelFormat::Elf64));
        assert_eq!(detect(b"\x7fELF\x01\x01\x01"), None, "ELF32 without a multiboot header");
        assert_eq!(detect(b"MZ"), None);
    }

    #[test]
    fn memory_map_reserves_the_bios_area_and_apic_pages() {
        let map = e820(256 << 20);
        let ram: u64 = map.iter().filter(|e| e.kind == E820_RAM).map(|e| e.size).sum();
        assert_eq!(ram, layout::LOW_RAM_END + (256 << 20) - layout::HIGH_RAM);
        assert!(map.iter().any(|e| e.kind == E820_RESERVED && e.addr == 0xe_0000 && e.size == 0x2_0000));
        assert!(map.iter().any(|e| e.kind == E820_RESERVED && e.addr == 0xfec0_0000));
        assert!(map.iter().any(|e| e.kind == E820_RESERVED && e.addr == 0xfee0_0000));
    }

    #[test]
    fn unknown_images_and_bad_combinations_are_refused_with_the_vm_field() {
        let mut bytes = vec![0u8; 16 << 20];
        let mut mem = SliceMemory(&mut bytes);
        let e = prepare(&config("junk.bin", Entry::Long64), b"MZ\x90\x00", None, &[], &mut mem).unwrap_err();
        assert!(e.contains("junk.bin: not a bzImage, multiboot or ELF64 image"), "{e}");
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let e = prepare(&config("vmlinuz", Entry::Real), &bz, None, &[], &mut mem).unwrap_err();
        assert!(e.contains("entry = real is only for ELF images"), "{e}");
        let e = prepare(&config("vmlinuz", Entry::Long64), &bz, None, &[], &mut mem).unwrap_err();
        assert!(e.starts_with("kernel vmlinuz: "), "loader errors name the kernel: {e}");
        let e = prepare(&config("vmlinuz", Entry::Long64), &bz, None, &[("m.bin", b"x")], &mut mem).unwrap_err();
        assert!(e.contains("only multiboot kernels take modules"), "{e}");
    }

    #[test]
    fn elf_segments_over_the_page_tables_command_line_or_acpi_tables_are_refused() {
        use crate::loader::elf::tests::{build_elf, Ph};
        let mut bytes = vec![0u8; 16 << 20];
        let mut mem = SliceMemory(&mut bytes);
        let at = |paddr: u64| build_elf(2, 62, paddr, &[Ph::load(0x100, paddr, 0x10, 0x1000)], 0x200);
        let e = prepare(&config("k.elf", Entry::Long64), &at(0x1_5000), None, &[], &mut mem).unwrap_err();
        assert_eq!(
            e,
            "kernel k.elf: segment 0 at 0x15000..0x16000 overlaps the identity-map page tables at 0x10000..0x16000"
        );
        let e = prepare(&config("k.elf", Entry::Long64), &at(0x1_f010), None, &[], &mut mem).unwrap_err();
        assert!(e.contains("overlaps the command line at 0x20000..0x2000e"), "{e}");
        let e = prepare(&config("k.elf", Entry::Real), &at(0xe_0000), None, &[], &mut mem).unwrap_err();
        assert!(e.contains("overlaps the ACPI tables at 0xe0000.."), "{e}");
        // Right after the command line, and in real mode where no page tables are built, is fine.
        prepare(&config("k.elf", Entry::Long64), &at(0x2_1000), None, &[], &mut mem).unwrap();
        prepare(&config("k.elf", Entry::Real), &at(0x1_0000), None, &[], &mut mem).unwrap();
    }

    #[test]
    fn acpi_tables_land_in_the_bios_area() {
        let mut bytes = vec![0u8; 16 << 20];
        let mut mem = SliceMemory(&mut bytes);
        let _ = prepare(&config("junk", Entry::Long64), b"junk", None, &[], &mut mem);
        let mut signature = [0u8; 8];
        mem.read(layout::RSDP, &mut signature).unwrap();
        assert_eq!(&signature, b"RSD PTR ");
    }
}
