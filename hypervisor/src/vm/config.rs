//! The VM configuration file (`vms.conf` in the ramdisk; `--vms FILE` on the host).
//!
//! ```text
//! # one section per VM, run in order
//! [vm cpuid-tests]
//! kernel  = test-guest.elf     # file in the ramdisk
//! cmdline = cases=all
//! memory  = 64M                # K, M or G suffix
//! vcpus   = 1
//! entry   = long64             # long64 (64-bit, identity-mapped) or real (real mode at the ELF entry)
//! devices = test               # extra devices: test (interrupt port 0xf5, MMIO page 0xd0000000)
//! modules = a.bin arg, b.bin   # multiboot modules: file and the module's string
//! ```
//!
//! Errors name the VM, the line and the field; unknown fields are errors, not ignored.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

/// How the vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// 64-bit long mode with the first 4 GiB identity-mapped; RSI points at the command line.
    Long64,
    /// Real mode at the image's entry point.
    Real,
}

/// Optional devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceSet {
    /// The test device: interrupt-request port and an MMIO page.
    pub test: bool,
}

/// One VM's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Name used in every log line about this VM.
    pub name: String,
    /// Kernel image file in the ramdisk.
    pub kernel: String,
    /// Initial ramdisk file in the ramdisk, if any.
    pub initrd: Option<String>,
    /// Multiboot modules: each "file [arguments]"; the whole text is the module's string.
    pub modules: Vec<String>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Start mode.
    pub entry: Entry,
    /// Devices beyond the standard set.
    pub devices: DeviceSet,
}

/// Smallest and largest guest RAM accepted.
pub const MIN_MEMORY: u64 = 2 << 20;
/// Largest guest RAM accepted (the identity map covers 4 GiB).
pub const MAX_MEMORY: u64 = 3 << 30;
/// Default guest RAM.
pub const DEFAULT_MEMORY: u64 = 64 << 20;
/// Longest command line accepted.
pub const MAX_CMDLINE: usize = 2047;

/// A configuration error, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Line number (1-based).
    pub line: usize,
    /// VM whose section the line is in, if any.
    pub vm: Option<String>,
    /// Field name, if the error is about one.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}", self.line)?;
        if let Some(vm) = &self.vm {
            write!(f, ", vm {vm}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ", field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

struct Draft {
    line: usize,
    name: String,
    kernel: Option<String>,
    initrd: Option<String>,
    modules: Vec<String>,
    cmdline: String,
    memory: u64,
    vcpus: u32,
    entry: Entry,
    devices: DeviceSet,
}

/// Parses a whole file. An empty file (or only comments) is an empty VM set.
pub fn parse(text: &str) -> Result<Vec<VmConfig>, ConfigError> {
    let mut vms: Vec<VmConfig> = Vec::new();
    let mut current: Option<Draft> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let vm_name = current.as_ref().map(|d| d.name.clone());
        let error = |field: Option<&str>, message: String| ConfigError {
            line,
            vm: vm_name.clone(),
            field: field.map(str::to_string),
            message,
        };
        if let Some(header) = content.strip_prefix('[') {
            let header =
                header.strip_suffix(']').ok_or_else(|| error(None, "section header must end with ']'".into()))?.trim();
            let name = header
                .strip_prefix("vm")
                .filter(|rest| rest.starts_with(char::is_whitespace))
                .map(str::trim)
                .ok_or_else(|| error(None, alloc::format!("expected [vm NAME], found [{header}]")))?;
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(error(None, alloc::format!("VM name {name:?} must be letters, digits, '-' or '_'")));
            }
            if vms.iter().any(|vm| vm.name == name) || current.as_ref().is_some_and(|d| d.name == name) {
                return Err(error(None, alloc::format!("VM name {name:?} is used twice")));
            }
            if let Some(draft) = current.take() {
                vms.push(finish(draft)?);
            }
            current = Some(Draft {
                line,
                name: name.to_string(),
                kernel: None,
                initrd: None,
                modules: Vec::new(),
                cmdline: String::new(),
                memory: DEFAULT_MEMORY,
                vcpus: 1,
                entry: Entry::Long64,
                devices: DeviceSet::default(),
            });
            continue;
        }
        let (key, value) = content
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .ok_or_else(|| error(None, alloc::format!("expected 'field = value', found {content:?}")))?;
        let draft = current.as_mut().ok_or_else(|| error(Some(key), "field outside a [vm NAME] section".into()))?;
        let field = Some(key);
        match key {
            "kernel" => draft.kernel = Some(non_empty(value).ok_or_else(|| error(field, "is empty".into()))?),
            "initrd" => draft.initrd = Some(non_empty(value).ok_or_else(|| error(field, "is empty".into()))?),
            "modules" => {
                draft.modules = value.split(',').map(str::trim).filter(|m| !m.is_empty()).map(str::to_string).collect();
            }
            "cmdline" => {
                if value.len() > MAX_CMDLINE {
                    return Err(error(field, alloc::format!("is {} bytes, longer than {MAX_CMDLINE}", value.len())));
                }
                draft.cmdline = value.to_string();
            }
            "memory" => {
                let bytes = parse_size(value)
                    .ok_or_else(|| error(field, alloc::format!("{value:?} is not a size like 64M or 1G")))?;
                if !(MIN_MEMORY..=MAX_MEMORY).contains(&bytes) || bytes % (2 << 20) != 0 {
                    return Err(error(
                        field,
                        alloc::format!(
                            "{value} must be a multiple of 2M between {}M and {}M",
                            MIN_MEMORY >> 20,
                            MAX_MEMORY >> 20
                        ),
                    ));
                }
                draft.memory = bytes;
            }
            "vcpus" => {
                draft.vcpus = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(|| error(field, alloc::format!("{value:?} is not a number from 1 to 64")))?;
            }
            "entry" => {
                draft.entry = match value {
                    "long64" => Entry::Long64,
                    "real" => Entry::Real,
                    _ => return Err(error(field, alloc::format!("{value:?} is not long64 or real"))),
                }
            }
            "devices" => {
                for device in value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
                    match device {
                        "test" => draft.devices.test = true,
                        other => return Err(error(field, alloc::format!("unknown device {other:?} (known: test)"))),
                    }
                }
            }
            other => return Err(error(None, alloc::format!("unknown field {other:?}"))),
        }
    }
    if let Some(draft) = current.take() {
        vms.push(finish(draft)?);
    }
    Ok(vms)
}

fn finish(draft: Draft) -> Result<VmConfig, ConfigError> {
    let kernel = draft.kernel.ok_or_else(|| ConfigError {
        line: draft.line,
        vm: Some(draft.name.clone()),
        field: Some("kernel".into()),
        message: "is missing".into(),
    })?;
    Ok(VmConfig {
        name: draft.name,
        kernel,
        initrd: draft.initrd,
        modules: draft.modules,
        cmdline: draft.cmdline,
        memory: draft.memory,
        vcpus: draft.vcpus,
        entry: draft.entry,
        devices: draft.devices,
    })
}

fn non_empty(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_string())
}

/// `64M`, `1G`, `512K` or plain bytes.
fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'K' | b'k' => (&text[..text.len() - 1], 10),
        b'M' | b'm' => (&text[..text.len() - 1], 20),
        b'G' | b'g' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    digits.trim().parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// Every file name a VM set refers to (kernels and initrds), for packing the ramdisk.
pub fn referenced_files(vms: &[VmConfig]) -> Vec<&str> {
    let mut files: Vec<&str> = Vec::new();
    for vm in vms {
        let modules = vm.modules.iter().filter_map(|m| module_file(m));
        for name in core::iter::once(vm.kernel.as_str()).chain(vm.initrd.as_deref()).chain(modules) {
            if !files.contains(&name) {
                files.push(name);
            }
        }
    }
    files
}

/// The file a `modules` entry names (its first word).
pub fn module_file(entry: &str) -> Option<&str> {
    entry.split_whitespace().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sections_fields_and_defaults() {
        let vms = parse(
            "# set\n[vm a]\nkernel = k.elf\ncmdline = cases=all # trailing comment\nmemory = 128M\n\
             devices = test\n\n[vm b-2]\nkernel=r.elf\nentry=real\nvcpus = 1\ninitrd = i.cpio\n",
        )
        .unwrap();
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[0].name, "a");
        assert_eq!(vms[0].cmdline, "cases=all");
        assert_eq!(vms[0].memory, 128 << 20);
        assert!(vms[0].devices.test);
        assert_eq!(vms[0].entry, Entry::Long64);
        assert_eq!(vms[1].entry, Entry::Real);
        assert_eq!(vms[1].memory, DEFAULT_MEMORY);
        assert_eq!(vms[1].initrd.as_deref(), Some("i.cpio"));
        assert_eq!(referenced_files(&vms), ["k.elf", "r.elf", "i.cpio"]);
        let mb = parse("[vm m]\nkernel = mb.elf\nmodules = one.bin arg=1 , two.bin,, \n").unwrap();
        assert_eq!(mb[0].modules, ["one.bin arg=1", "two.bin"]);
        assert_eq!(referenced_files(&mb), ["mb.elf", "one.bin", "two.bin"]);
    }

    #[test]
    fn empty_file_is_an_empty_set() {
        assert_eq!(parse("# nothing\n\n").unwrap(), []);
    }

    fn error_of(text: &str) -> ConfigError {
        parse(text).unwrap_err()
    }

    #[test]
    fn errors_name_the_line_vm_and_field() {
        let e = error_of("[vm a]\nkernel = k\nmemory = lots\n");
        assert_eq!((e.line, e.vm.as_deref(), e.field.as_deref()), (3, Some("a"), Some("memory")));
        assert_eq!(e.to_string(), "line 3, vm a, field memory: \"lots\" is not a size like 64M or 1G");

        let e = error_of("[vm a]\ncmdline = x\n");
        assert_eq!((e.line, e.field.as_deref(), e.message.as_str()), (1, Some("kernel"), "is missing"));
        assert!(error_of("kernel = k\n").message.contains("outside a [vm NAME] section"));
        assert!(error_of("[vm a]\nkernel = k\ncolour = blue\n").message.contains("unknown field \"colour\""));
        assert!(error_of("[vm a]\nkernel = k\n[vm a]\nkernel = k\n").message.contains("used twice"));
        assert!(error_of("[machine a]\n").message.contains("expected [vm NAME]"));
        assert!(error_of("[vm a b]\n").message.contains("must be letters"));
        assert!(error_of("[vm a]\nkernel = k\nmemory = 1M\n").message.contains("multiple of 2M"));
        assert!(error_of("[vm a]\nkernel = k\nmemory = 99999999999999999999G\n").message.contains("not a size"));
        assert!(error_of("[vm a]\nkernel = k\nvcpus = 0\n").message.contains("1 to 64"));
        assert!(error_of("[vm a]\nkernel = k\nentry = protected\n").message.contains("not long64 or real"));
        assert!(error_of("[vm a]\nkernel = k\ndevices = test, gpu\n").message.contains("unknown device \"gpu\""));
        assert!(error_of("[vm a]\nkernel k\n").message.contains("expected 'field = value'"));
        let long = alloc::format!("[vm a]\nkernel = k\ncmdline = {}\n", "x".repeat(MAX_CMDLINE + 1));
        assert!(error_of(&long).message.contains("longer than"));
    }
}
