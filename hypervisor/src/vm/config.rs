//! The VM configuration file (`vms.conf` in the ramdisk; `--vms FILE` on the host).
//!
//! ```text
//! [host]                       # optional: settings of the host
//! slice   = 10ms               # the scheduler's time slice (1 to 1000 ms)
//! console = lines              # lines (default) or raw: also the raw bytes of the VM with input
//!
//! # one section per VM
//! [vm cpuid-tests]
//! kernel  = test-guest.elf     # file in the ramdisk
//! cmdline = cases=all
//! memory  = 64M                # K, M or G suffix
//! vcpus   = 1
//! cpus    = 0-1,4              # host CPUs its vCPUs may run on (default: any); CPUs 0 to 255
//! timeout = 300                # stop the VM after this many seconds, 1 to 86400 (default: none)
//! entry   = long64             # long64 (64-bit, identity-mapped) or real (real mode at the ELF entry)
//! devices = test, rng          # extra devices: test (interrupt port 0xf5, MMIO page 0xd0000000),
//!                              # rng (virtio-rng from the host's RDRAND)
//! modules = a.bin arg, b.bin   # multiboot modules: file and the module's string
//! disk    = root.ext4, blank:64M, host:64M+256M, data.img read-only
//!                              # virtio-blk disks (/dev/vda, /dev/vdb, ...): an image packed
//!                              # into the ramdisk and held in RAM, copy-on-write (writes are
//!                              # lost at power-off), an empty RAM disk (blank:SIZE, whole
//!                              # MiB up to 1G), or host:START+LENGTH, a region of the
//!                              # machine's own disk (whole MiB; no two VMs' regions overlap),
//!                              # which keeps what is written; `read-only` refuses the guest's
//!                              # writes
//! net     = lan, uplink mac=52:54:00:ab:cd:ef ip=10.0.2.15
//!                              # virtio-net devices (eth0, eth1, ...; up to 4), each a port of
//!                              # the named network's switch; `mac=` sets its MAC. The network
//!                              # named `uplink` is bridged to the machine's own NIC (a
//!                              # virtio-net PCI device: QEMU's user network); without one, a VM
//!                              # on it is refused. `ip=` records the address the guest gives
//!                              # itself there: the hypervisor only checks that it is an IPv4
//!                              # address, the host tools read it (`boot run --forward`).
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
    /// A virtio entropy device fed by the host CPU's RDRAND.
    pub rng: bool,
}

/// Where a VM's disk keeps its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSource {
    /// An image in the ramdisk, held in RAM copy-on-write: writes are lost at power-off.
    Image(String),
    /// An empty disk of this many bytes (whole MiB), in RAM like an image: a scratch disk.
    Blank(u64),
    /// A region of the machine's own disk (`host:START+LENGTH`, byte offsets, whole MiB):
    /// what the guest writes stays there.
    HostRegion {
        /// First byte of the region on the host disk.
        start: u64,
        /// Length of the region in bytes.
        len: u64,
    },
}

impl DiskSource {
    /// The ramdisk file, for an image.
    pub fn image(&self) -> Option<&str> {
        match self {
            DiskSource::Image(file) => Some(file),
            DiskSource::Blank(_) | DiskSource::HostRegion { .. } => None,
        }
    }
}

impl fmt::Display for DiskSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskSource::Image(file) => f.write_str(file),
            DiskSource::Blank(len) => write!(f, "blank:{}M", len >> 20),
            DiskSource::HostRegion { start, len } => write!(f, "host:{}M+{}M", start >> 20, len >> 20),
        }
    }
}

/// A virtio-blk disk of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Where its data is.
    pub source: DiskSource,
    /// The guest may not write to it (VIRTIO_BLK_F_RO).
    pub read_only: bool,
}

/// Largest blank disk: what it holds lives in host memory.
pub const MAX_BLANK_DISK: u64 = 1 << 30;

/// Host-disk regions are whole MiB, so that regions never share a sector.
pub const HOST_REGION_ALIGN: u64 = 1 << 20;

/// A virtio-net device of a VM, a port of a named network (the switch all VMs naming the
/// same network share).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicConfig {
    /// The network: letters, digits, '-' or '_'.
    pub network: String,
    /// Its MAC address: configured with `mac=`, or 52:54:00:12:VV:NN for VM number VV of the set
    /// and NIC number NN of the VM.
    pub mac: [u8; 6],
    /// The IPv4 address the guest gives this interface (`ip=`), if the configuration says: not
    /// used by the hypervisor, only by host tools (port forwarding to the guest on the uplink).
    pub ip: Option<[u8; 4]>,
}

/// Most network devices one VM may have.
pub const MAX_NICS: usize = 4;

/// Most disks one VM may have.
pub const MAX_DISKS: usize = 8;

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
    /// Stop the VM after this many seconds; `None`: no limit.
    pub timeout_seconds: Option<u64>,
    /// Host CPUs this VM's vCPUs may run on; `None`: any CPU.
    pub cpus: Option<CpuSet>,
    /// Virtio block devices, in PCI slot order.
    pub disks: Vec<DiskConfig>,
    /// Virtio network devices, after the disks in slot order.
    pub nics: Vec<NicConfig>,
}

/// A set of host CPUs, numbered 0 to [`CpuSet::LIMIT`] - 1.
///
/// Written as a list of CPUs and ranges (`0-1`, `2`, `0,2,4-7`); [`fmt::Display`] prints that
/// form back, with runs of neighbours as ranges (`0-1,4`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CpuSet {
    bits: [u64; 4],
}

impl CpuSet {
    /// Number of host CPUs a set can name (CPUs 0 to 255).
    pub const LIMIT: usize = 256;

    /// Every CPU from 0 to [`CpuSet::LIMIT`] - 1.
    pub fn all() -> Self {
        CpuSet { bits: [u64::MAX; 4] }
    }

    /// Adds `cpu`; returns false (and adds nothing) if it is [`CpuSet::LIMIT`] or more.
    pub fn insert(&mut self, cpu: usize) -> bool {
        if cpu >= Self::LIMIT {
            return false;
        }
        self.bits[cpu / 64] |= 1 << (cpu % 64);
        true
    }

    /// Whether `cpu` is in the set (never for CPUs of [`CpuSet::LIMIT`] or more).
    pub fn contains(&self, cpu: usize) -> bool {
        cpu < Self::LIMIT && self.bits[cpu / 64] & (1 << (cpu % 64)) != 0
    }

    /// Whether the set has no CPU.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|&word| word == 0)
    }

    /// The lowest CPU in the set.
    pub fn first(&self) -> Option<usize> {
        self.bits
            .iter()
            .enumerate()
            .find(|(_, &word)| word != 0)
            .map(|(i, word)| i * 64 + word.trailing_zeros() as usize)
    }

    /// How many CPUs the set has.
    pub fn count(&self) -> usize {
        self.bits.iter().map(|word| word.count_ones() as usize).sum()
    }

    /// The CPUs in the set, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..Self::LIMIT).filter(|&cpu| self.contains(cpu))
    }

    /// Parses a list like `0-1`, `2` or `0,2,4-7` (spaces around the items are allowed; an
    /// item may repeat or overlap another). Errors say what is wrong, without the field name.
    pub fn parse(text: &str) -> Result<Self, String> {
        const EXAMPLE: &str = "a list of host CPUs like 0-1 or 0,2,4-7";
        let text = text.trim();
        if text.is_empty() {
            return Err(alloc::format!("is empty: expected {EXAMPLE}"));
        }
        let cpu = |number: &str| -> Result<usize, String> {
            let number = number.trim();
            if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
                return Err(alloc::format!("{number:?} in {text:?} is not a CPU number: expected {EXAMPLE}"));
            }
            match number.parse::<usize>() {
                Ok(cpu) if cpu < Self::LIMIT => Ok(cpu),
                _ => Err(alloc::format!("CPU {number} is out of range: host CPUs are 0 to {}", Self::LIMIT - 1)),
            }
        };
        let mut set = CpuSet::default();
        for item in text.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(alloc::format!("{text:?} has an empty item: expected {EXAMPLE}"));
            }
            let (low, high) = match item.split_once('-') {
                Some((low, high)) => (cpu(low)?, cpu(high)?),
                None => {
                    let single = cpu(item)?;
                    (single, single)
                }
            };
            if low > high {
                return Err(alloc::format!("range {item:?} is reversed: write {high}-{low}"));
            }
            for n in low..=high {
                set.insert(n);
            }
        }
        Ok(set)
    }
}

impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut cpus = self.iter().peekable();
        let mut first = true;
        while let Some(low) = cpus.next() {
            let mut high = low;
            while cpus.peek() == Some(&(high + 1)) {
                high = cpus.next().unwrap_or(high);
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if low == high {
                write!(f, "{low}")?;
            } else {
                write!(f, "{low}-{high}")?;
            }
        }
        Ok(())
    }
}

/// Smallest and largest guest RAM accepted.
pub const MIN_MEMORY: u64 = 2 << 20;
/// Largest guest RAM accepted (the identity map covers 4 GiB).
pub const MAX_MEMORY: u64 = 3 << 30;
/// Default guest RAM.
pub const DEFAULT_MEMORY: u64 = 64 << 20;
/// Longest command line accepted.
pub const MAX_CMDLINE: usize = 2047;
/// Longest VM timeout accepted, in seconds (a day).
pub const MAX_TIMEOUT_SECONDS: u64 = 86_400;

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
    timeout_seconds: Option<u64>,
    cpus: Option<CpuSet>,
    disks: Vec<DiskConfig>,
    /// NICs as written: network and the MAC if one was given.
    nics: Vec<NicDraft>,
}

/// Settings of the host rather than of one VM (the optional `[host]` section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// The scheduler's time slice in microseconds (`slice = 10ms`).
    pub slice_us: u64,
    /// `console = raw`: besides its prefixed, sanitized lines, the VM that has the input sends
    /// its console bytes unaltered (`HV-RAW` records), for a terminal to show as they are.
    pub raw_console: bool,
}

/// Time slices accepted, in milliseconds.
pub const SLICE_MS: core::ops::RangeInclusive<u64> = 1..=1000;

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig { slice_us: crate::sched::DEFAULT_SLICE_US, raw_console: false }
    }
}

/// A whole VM set: the host settings and the VMs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmSet {
    /// The `[host]` section (defaults when there is none).
    pub host: HostConfig,
    /// The VMs, in file order.
    pub vms: Vec<VmConfig>,
}

/// Parses a whole file's VMs (see [`parse_set`] for the `[host]` section too).
pub fn parse(text: &str) -> Result<Vec<VmConfig>, ConfigError> {
    parse_set(text).map(|set| set.vms)
}

/// Parses a whole file. An empty file (or only comments) is an empty VM set.
pub fn parse_set(text: &str) -> Result<VmSet, ConfigError> {
    let mut vms: Vec<VmConfig> = Vec::new();
    let mut host = HostConfig::default();
    let mut in_host = false;
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
            if let Some(draft) = current.take() {
                vms.push(finish(draft, vms.len())?);
            }
            in_host = header == "host";
            if in_host {
                continue;
            }
            let name = header
                .strip_prefix("vm")
                .filter(|rest| rest.starts_with(char::is_whitespace))
                .map(str::trim)
                .ok_or_else(|| error(None, alloc::format!("expected [vm NAME], found [{header}]")))?;
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(error(None, alloc::format!("VM name {name:?} must be letters, digits, '-' or '_'")));
            }
            if vms.iter().any(|vm| vm.name == name) {
                return Err(error(None, alloc::format!("VM name {name:?} is used twice")));
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
                timeout_seconds: None,
                cpus: None,
                disks: Vec::new(),
                nics: Vec::new(),
            });
            continue;
        }
        let (key, value) = content
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .ok_or_else(|| error(None, alloc::format!("expected 'field = value', found {content:?}")))?;
        let field = Some(key);
        if in_host {
            match key {
                "slice" => {
                    host.slice_us = value
                        .strip_suffix("ms")
                        .and_then(|ms| ms.trim().parse::<u64>().ok())
                        .filter(|ms| SLICE_MS.contains(ms))
                        .ok_or_else(|| {
                            error(
                                field,
                                alloc::format!(
                                    "{value:?} is not a time slice like 10ms ({} to {} ms)",
                                    SLICE_MS.start(),
                                    SLICE_MS.end()
                                ),
                            )
                        })?
                        * 1000;
                }
                "console" => {
                    host.raw_console = match value {
                        "raw" => true,
                        "lines" => false,
                        _ => {
                            return Err(error(field, alloc::format!("{value:?} is not a console mode (lines or raw)")))
                        }
                    };
                }
                other => {
                    return Err(error(None, alloc::format!("unknown [host] field {other:?} (known: slice, console)")))
                }
            }
            continue;
        }
        let draft = current.as_mut().ok_or_else(|| error(Some(key), "field outside a [vm NAME] section".into()))?;
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
            "timeout" => {
                let seconds = Some(value)
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|s| (1..=MAX_TIMEOUT_SECONDS).contains(s))
                    .ok_or_else(|| {
                        error(
                            field,
                            alloc::format!(
                                "{value:?} is not a whole number of seconds from 1 to {MAX_TIMEOUT_SECONDS}"
                            ),
                        )
                    })?;
                draft.timeout_seconds = Some(seconds);
            }
            "cpus" => draft.cpus = Some(CpuSet::parse(value).map_err(|message| error(field, message))?),
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
                        "rng" => draft.devices.rng = true,
                        other => {
                            return Err(error(field, alloc::format!("unknown device {other:?} (known: test, rng)")))
                        }
                    }
                }
            }
            "disk" => draft.disks = parse_disks(value).map_err(|message| error(field, message))?,
            "net" => draft.nics = parse_nics(value).map_err(|message| error(field, message))?,
            other => return Err(error(None, alloc::format!("unknown field {other:?}"))),
        }
    }
    if let Some(draft) = current.take() {
        vms.push(finish(draft, vms.len())?);
    }
    if let Some((mac, first, second)) = duplicate_mac(&vms) {
        return Err(ConfigError {
            line: text.lines().count(),
            vm: Some(second),
            field: Some("net".into()),
            message: alloc::format!("MAC address {} is also vm {first}'s", format_mac(&mac)),
        });
    }
    if let Some((first, second)) = overlapping_regions(&vms) {
        let line = text.lines().count();
        return Err(ConfigError {
            line,
            vm: None,
            field: Some("disk".into()),
            message: alloc::format!("{second} overlaps {first} on the host disk"),
        });
    }
    Ok(VmSet { host, vms })
}

/// A NIC as written: its network, its MAC and address if they were given.
type NicDraft = (String, Option<[u8; 6]>, Option<[u8; 4]>);

/// `net = NETWORK [mac=XX:XX:XX:XX:XX:XX] [ip=A.B.C.D], ...`.
fn parse_nics(value: &str) -> Result<Vec<NicDraft>, String> {
    let mut nics = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let mut words = entry.split_whitespace();
        let network = words.next().unwrap_or_default();
        if !network.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(alloc::format!("network name {network:?} must be letters, digits, '-' or '_'"));
        }
        let (mut mac, mut ip) = (None, None);
        for option in words {
            if let Some(text) = option.strip_prefix("mac=") {
                let parsed = parse_mac(text).ok_or_else(|| {
                    alloc::format!("net {network}: {text:?} is not a unicast MAC address like 52:54:00:12:34:56")
                })?;
                mac = Some(parsed);
            } else if let Some(text) = option.strip_prefix("ip=") {
                let parsed = parse_ipv4(text)
                    .ok_or_else(|| alloc::format!("net {network}: {text:?} is not an IPv4 address like 10.0.2.15"))?;
                ip = Some(parsed);
            } else {
                return Err(alloc::format!("net {network}: unknown option {option:?} (known: mac=, ip=)"));
            }
        }
        nics.push((network.to_string(), mac, ip));
    }
    if nics.len() > MAX_NICS {
        return Err(alloc::format!("{} network devices; a VM has at most {MAX_NICS}", nics.len()));
    }
    Ok(nics)
}

/// Six hex bytes separated by ':', not multicast (bit 0 of the first byte) and not all zero.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

/// Four decimal bytes separated by '.', without leading zeros (`10.0.2.15`).
pub fn parse_ipv4(text: &str) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = text.split('.');
    for byte in &mut ip {
        let part = parts.next()?;
        let canonical = !part.is_empty() && part.len() <= 3 && part.bytes().all(|b| b.is_ascii_digit());
        if !canonical || (part.len() > 1 && part.starts_with('0')) {
            return None;
        }
        *byte = part.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

/// A MAC address as `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = *mac;
    alloc::format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

fn finish(draft: Draft, vm_index: usize) -> Result<VmConfig, ConfigError> {
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
        timeout_seconds: draft.timeout_seconds,
        cpus: draft.cpus,
        disks: draft.disks,
        nics: draft
            .nics
            .into_iter()
            .enumerate()
            .map(|(nic, (network, mac, ip))| NicConfig {
                network,
                mac: mac.unwrap_or([0x52, 0x54, 0x00, 0x12, vm_index as u8, nic as u8]),
                ip,
            })
            .collect(),
    })
}

/// `disk = FILE [read-only], ...`.
fn parse_disks(value: &str) -> Result<Vec<DiskConfig>, String> {
    let mut disks = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let mut words = entry.split_whitespace();
        let name = words.next().unwrap_or_default();
        let source = if let Some(region) = name.strip_prefix("host:") {
            parse_host_region(region).ok_or_else(|| {
                alloc::format!("disk {name}: expected host:START+LENGTH in whole MiB, like host:0M+256M")
            })?
        } else if let Some(size) = name.strip_prefix("blank:") {
            parse_size(size)
                .filter(|&len| len > 0 && len % HOST_REGION_ALIGN == 0 && len <= MAX_BLANK_DISK)
                .map(DiskSource::Blank)
                .ok_or_else(|| {
                    alloc::format!("disk {name}: expected blank:SIZE in whole MiB up to {}M", MAX_BLANK_DISK >> 20)
                })?
        } else {
            DiskSource::Image(name.to_string())
        };
        let mut read_only = false;
        for option in words {
            match option {
                "read-only" => read_only = true,
                other => return Err(alloc::format!("disk {name}: unknown option {other:?} (known: read-only)")),
            }
        }
        disks.push(DiskConfig { source, read_only });
    }
    if disks.len() > MAX_DISKS {
        return Err(alloc::format!("{} disks; a VM has at most {MAX_DISKS}", disks.len()));
    }
    Ok(disks)
}

/// `START+LENGTH` of a host-disk region: sizes with K, M or G, whole MiB, not empty.
fn parse_host_region(text: &str) -> Option<DiskSource> {
    let (start, len) = text.split_once('+')?;
    let (start, len) = (parse_size(start)?, parse_size(len)?);
    let aligned = start % HOST_REGION_ALIGN == 0 && len % HOST_REGION_ALIGN == 0;
    (aligned && len > 0 && start.checked_add(len).is_some()).then_some(DiskSource::HostRegion { start, len })
}

/// A MAC address two NICs of the set share, with the VMs that have them.
fn duplicate_mac(vms: &[VmConfig]) -> Option<([u8; 6], String, String)> {
    let nics: Vec<(&str, [u8; 6])> =
        vms.iter().flat_map(|vm| vm.nics.iter().map(move |nic| (vm.name.as_str(), nic.mac))).collect();
    nics.iter().enumerate().find_map(|(i, (vm, mac))| {
        nics[i + 1..].iter().find(|(_, other)| other == mac).map(|(other, _)| (*mac, vm.to_string(), other.to_string()))
    })
}

/// The first pair of host-disk regions that overlap, as (VM, disk) of each.
fn overlapping_regions(vms: &[VmConfig]) -> Option<(String, String)> {
    let regions: Vec<(&VmConfig, &DiskConfig, u64, u64)> = vms
        .iter()
        .flat_map(|vm| vm.disks.iter().map(move |disk| (vm, disk)))
        .filter_map(|(vm, disk)| match disk.source {
            DiskSource::HostRegion { start, len } => Some((vm, disk, start, start + len)),
            DiskSource::Image(_) | DiskSource::Blank(_) => None,
        })
        .collect();
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            if a.2 < b.3 && b.2 < a.3 {
                return Some((
                    alloc::format!("vm {} disk {}", a.0.name, a.1.source),
                    alloc::format!("vm {} disk {}", b.0.name, b.1.source),
                ));
            }
        }
    }
    None
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
        let disks = vm.disks.iter().filter_map(|disk| disk.source.image());
        for name in core::iter::once(vm.kernel.as_str()).chain(vm.initrd.as_deref()).chain(modules).chain(disks) {
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
    fn disks_are_listed_in_order_with_their_options() {
        let vms = parse("[vm a]\nkernel = k\ndisk = root.ext4, data.img read-only,\n").unwrap();
        assert_eq!(
            vms[0].disks,
            [
                DiskConfig { source: DiskSource::Image("root.ext4".into()), read_only: false },
                DiskConfig { source: DiskSource::Image("data.img".into()), read_only: true }
            ]
        );
        assert_eq!(referenced_files(&vms), ["k", "root.ext4", "data.img"]);
        let e = error_of("[vm a]\nkernel = k\ndisk = root.ext4 ro\n");
        assert_eq!(e.to_string(), "line 3, vm a, field disk: disk root.ext4: unknown option \"ro\" (known: read-only)");
        let many = alloc::format!("[vm a]\nkernel = k\ndisk = {}\n", ["d"; 9].join(","));
        assert!(error_of(&many).message.contains("at most 8"));
        assert!(parse("[vm a]\nkernel = k\n").unwrap()[0].disks.is_empty());
        let blank = parse("[vm a]\nkernel = k\ndisk = blank:64M\n").unwrap();
        assert_eq!(blank[0].disks[0].source, DiskSource::Blank(64 << 20));
        assert_eq!(blank[0].disks[0].source.to_string(), "blank:64M");
        for bad in ["blank:0M", "blank:1K", "blank:2G", "blank:"] {
            let e = error_of(&alloc::format!("[vm a]\nkernel = k\ndisk = {bad}\n"));
            assert!(e.message.contains("expected blank:SIZE"), "{bad}: {e}");
        }
    }

    #[test]
    fn nics_join_networks_with_unique_macs() {
        let vms =
            parse("[vm a]\nkernel = k\nnet = lan, wan mac=02:00:00:00:00:01\n[vm b]\nkernel = k\nnet = lan\n").unwrap();
        assert_eq!(vms[0].nics[0], NicConfig { network: "lan".into(), mac: [0x52, 0x54, 0, 0x12, 0, 0], ip: None });
        assert_eq!(vms[0].nics[1], NicConfig { network: "wan".into(), mac: [2, 0, 0, 0, 0, 1], ip: None });
        assert_eq!(format_mac(&vms[1].nics[0].mac), "52:54:00:12:01:00");
        for bad in [
            "lan mac=01:00:00:00:00:01",
            "lan mac=00:00:00:00:00:00",
            "lan mac=52:54:00:12:34",
            "lan mac=5:54:00:12:34:56:00",
        ] {
            let e = error_of(&alloc::format!("[vm a]\nkernel = k\nnet = {bad}\n"));
            assert!(e.message.contains("is not a unicast MAC address"), "{bad}: {e}");
        }
        assert!(error_of("[vm a]\nkernel = k\nnet = l@n\n").message.contains("network name"));
        assert!(error_of("[vm a]\nkernel = k\nnet = lan speed=1G\n").message.contains("unknown option"));
        assert!(error_of("[vm a]\nkernel = k\nnet = a,b,c,d,e\n").message.contains("at most 4"));
        let e = error_of("[vm a]\nkernel = k\nnet = lan mac=52:54:00:12:01:00\n[vm b]\nkernel = k\nnet = lan\n");
        assert_eq!((e.vm.as_deref(), e.field.as_deref()), (Some("b"), Some("net")));
        assert_eq!(e.message, "MAC address 52:54:00:12:01:00 is also vm a's");
    }

    #[test]
    fn a_nic_may_record_the_guests_ipv4_address() {
        let vms = parse("[vm a]\nkernel = k\nnet = uplink ip=10.0.2.15, lan mac=02:00:00:00:00:01 ip=192.168.1.255\n")
            .unwrap();
        assert_eq!(
            vms[0].nics[0],
            NicConfig { network: "uplink".into(), mac: [0x52, 0x54, 0, 0x12, 0, 0], ip: Some([10, 0, 2, 15]) }
        );
        assert_eq!((vms[0].nics[1].mac, vms[0].nics[1].ip), ([2, 0, 0, 0, 0, 1], Some([192, 168, 1, 255])));
        for bad in
            ["10.0.2", "10.0.2.15.1", "10.0.2.256", "10.0.02.15", "10.0.2.15/24", "10..2.15", "ip", "-1.0.0.0", ""]
        {
            let e = error_of(&alloc::format!("[vm a]\nkernel = k\nnet = uplink ip={bad}\n"));
            assert_eq!(
                e.to_string(),
                alloc::format!("line 3, vm a, field net: net uplink: {bad:?} is not an IPv4 address like 10.0.2.15")
            );
        }
        let e = error_of("[vm a]\nkernel = k\nnet = uplink gw=10.0.2.2\n");
        assert!(e.message.ends_with("unknown option \"gw=10.0.2.2\" (known: mac=, ip=)"), "{e}");
        assert_eq!(parse_ipv4("0.0.0.0"), Some([0; 4]));
        assert_eq!(parse_ipv4("255.255.255.255"), Some([255; 4]));
    }

    #[test]
    fn host_regions_are_whole_mib_and_never_overlap() {
        let vms = parse("[vm a]\nkernel = k\ndisk = host:0M+64M\n[vm b]\nkernel = k\ndisk = host:64M+1G read-only\n")
            .unwrap();
        assert_eq!(vms[0].disks[0].source, DiskSource::HostRegion { start: 0, len: 64 << 20 });
        assert_eq!(vms[1].disks[0].source, DiskSource::HostRegion { start: 64 << 20, len: 1 << 30 });
        assert!(vms[1].disks[0].read_only);
        assert_eq!(vms[1].disks[0].source.to_string(), "host:64M+1024M");
        assert_eq!(referenced_files(&vms), ["k"], "nothing to pack");
        for bad in
            ["host:0M", "host:1K+64M", "host:0M+0M", "host:0M+64M+1M", "host:x+1M", "host:18446744073709551615+1M"]
        {
            let e = error_of(&alloc::format!("[vm a]\nkernel = k\ndisk = {bad}\n"));
            assert!(e.message.contains("expected host:START+LENGTH"), "{bad}: {e}");
        }
        let e = error_of("[vm a]\nkernel = k\ndisk = host:0M+64M\n[vm b]\nkernel = k\ndisk = host:32M+64M read-only\n");
        assert_eq!(e.field.as_deref(), Some("disk"));
        assert_eq!(e.message, "vm b disk host:32M+64M overlaps vm a disk host:0M+64M on the host disk");
        let e = error_of("[vm a]\nkernel = k\ndisk = host:0M+64M, host:63M+2M\n");
        assert!(e.message.contains("vm a disk host:63M+2M overlaps vm a disk host:0M+64M"), "{e}");
    }

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
        assert_eq!((vms[0].timeout_seconds, vms[0].cpus), (None, None), "no timeout, any CPU by default");
    }

    #[test]
    fn timeout_and_cpus_fields() {
        let vms = parse(
            "[vm a]\nkernel = k\ntimeout = 30\ncpus = 0,2, 4-7 ,5\n[vm b]\nkernel = k\ncpus = 3\n\
                         timeout = 86400\n",
        )
        .unwrap();
        assert_eq!(vms[0].timeout_seconds, Some(30));
        let cpus = vms[0].cpus.unwrap();
        assert_eq!((cpus.count(), cpus.first()), (6, Some(0)));
        assert!(cpus.contains(0) && cpus.contains(2) && cpus.contains(7));
        assert!(!cpus.contains(1) && !cpus.contains(8) && !cpus.contains(1000));
        assert_eq!(cpus.to_string(), "0,2,4-7");
        assert_eq!(vms[1].cpus.unwrap().to_string(), "3");
        assert_eq!(vms[1].timeout_seconds, Some(MAX_TIMEOUT_SECONDS));
    }

    #[test]
    fn cpu_sets() {
        let empty = CpuSet::default();
        assert!(empty.is_empty());
        assert_eq!((empty.count(), empty.first(), empty.to_string().as_str()), (0, None, ""));
        let all = CpuSet::all();
        assert!(!all.is_empty() && all.contains(0) && all.contains(255) && !all.contains(256));
        assert_eq!((all.count(), all.first(), all.to_string().as_str()), (256, Some(0), "0-255"));
        for (text, shown, count, first) in [
            ("0-1", "0-1", 2, 0),
            ("2", "2", 1, 2),
            ("0,2,4-7", "0,2,4-7", 6, 0),
            ("4,0-1", "0-1,4", 3, 0),
            ("1,0,2-2", "0-2", 3, 0),
            ("63-64,127,128,255", "63-64,127-128,255", 5, 63),
            ("200", "200", 1, 200),
        ] {
            let set = CpuSet::parse(text).unwrap();
            assert_eq!((set.to_string().as_str(), set.count(), set.first()), (shown, count, Some(first)), "{text}");
            assert_eq!(CpuSet::parse(&set.to_string()).unwrap(), set, "{text} round-trips");
        }
        let mut set = CpuSet::default();
        assert!(set.insert(64) && !set.insert(256));
        assert_eq!(set.iter().collect::<Vec<_>>(), [64]);
    }

    #[test]
    fn bad_timeouts_and_cpu_lists_are_named() {
        for bad in ["0", "86401", "2.5", "-1", "+5", "soon", "30s", "", "99999999999999999999"] {
            let e = error_of(&alloc::format!("[vm a]\nkernel = k\ntimeout = {bad}\n"));
            assert_eq!((e.line, e.field.as_deref()), (3, Some("timeout")), "{bad}");
            assert_eq!(e.message, alloc::format!("{bad:?} is not a whole number of seconds from 1 to 86400"));
        }
        let cpus = |list: &str| error_of(&alloc::format!("[vm a]\nkernel = k\ncpus = {list}\n"));
        let e = cpus("3-1");
        assert_eq!(e.to_string(), "line 3, vm a, field cpus: range \"3-1\" is reversed: write 1-3");
        assert_eq!(cpus("256").message, "CPU 256 is out of range: host CPUs are 0 to 255");
        assert_eq!(cpus("0-300").message, "CPU 300 is out of range: host CPUs are 0 to 255");
        assert!(cpus("99999999999999999999").message.contains("out of range"));
        assert_eq!(cpus("").message, "is empty: expected a list of host CPUs like 0-1 or 0,2,4-7");
        assert_eq!(
            cpus("0,,2").message,
            "\"0,,2\" has an empty item: expected a list of host CPUs like 0-1 or 0,2,4-7"
        );
        assert!(cpus("1,").message.contains("has an empty item"));
        assert_eq!(
            cpus("0-x").message,
            "\"x\" in \"0-x\" is not a CPU number: expected a list of host CPUs like 0-1 or 0,2,4-7"
        );
        for malformed in ["a", "1-2-3", "-1", "1-", "0 1", "+1", "1.5", "0;1"] {
            let e = cpus(malformed);
            assert_eq!(e.field.as_deref(), Some("cpus"), "{malformed}");
            assert!(e.message.contains("is not a CPU number"), "{malformed}: {}", e.message);
        }
    }

    #[test]
    fn the_host_section_sets_the_time_slice_and_the_console() {
        let raw = parse_set("[vm a]\nkernel = k\n[host]\nconsole = raw\n").unwrap();
        assert!(raw.host.raw_console, "a [host] section after the VMs counts too");
        assert!(parse_set("[host]\nconsole = fancy\n").unwrap_err().message.contains("lines or raw"));
        let set = parse_set("[host]\nslice = 25ms\n[vm a]\nkernel = k\n").unwrap();
        assert_eq!(set.host.slice_us, 25_000);
        assert_eq!(set.vms.len(), 1);
        assert_eq!(parse_set("[vm a]\nkernel = k\n").unwrap().host, HostConfig::default());
        let e = parse_set("[vm a]\nkernel = k\n[host]\nslice = 0ms\n").unwrap_err();
        assert_eq!((e.line, e.field.as_deref()), (4, Some("slice")));
        assert!(e.message.contains("1 to 1000 ms"));
        assert!(parse_set("[host]\nslice = 10\n").unwrap_err().message.contains("like 10ms"));
        assert!(parse_set("[host]\ncolour = blue\n").unwrap_err().message.contains("unknown [host] field"));
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
