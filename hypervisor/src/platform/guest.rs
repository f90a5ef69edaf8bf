//! Building and running one VM on this machine: guest RAM, second-level tables, loader, vCPU.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use raw_cpuid::cpuid;

use super::memory::{self, HostTables};
use super::{apic, cmos, serial, svm, vmx, xstate};
use crate::loader::SliceMemory;
use crate::mm::frames::FRAME_SIZE;
use crate::mm::second_level::{EntryFormat, Ept, Npt, PageSize, Perms, SecondLevelTables};
use crate::mm::tlb_tags::{Tag, TagPool};
use crate::ramdisk::{self, File};
use crate::vcpu::Vcpu;
use crate::vm::config::{self, VmConfig};
use crate::vm::setup;
use crate::vm::{Env, Slice, Vm, VmEnd};

const GUEST_RAM_ALIGN: u64 = 2 << 20;

/// Guest RAM: contiguous host frames, freed when the VM is dropped.
struct GuestRam {
    phys: u64,
    bytes: u64,
}

impl GuestRam {
    fn allocate(bytes: u64) -> Option<Self> {
        memory::alloc_zeroed(bytes / FRAME_SIZE, GUEST_RAM_ALIGN).map(|phys| GuestRam { phys, bytes })
    }

    fn slice(&self) -> SliceMemory<'static> {
        // SAFETY: the frames belong to this VM from allocation to drop, and the VM (the only
        // user of the slice) is dropped before `GuestRam`.
        SliceMemory(unsafe { memory::phys_slice_mut(self.phys, self.bytes as usize) })
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        if let Err(e) = memory::FRAMES.lock().free(self.phys, self.bytes / FRAME_SIZE) {
            log::error!("freeing guest RAM at {:#x}: {e}", self.phys);
        }
    }
}

/// Which hardware extension runs guests on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Intel VMX with EPT.
    Vmx,
    /// AMD SVM with NPT.
    Svm,
}

/// ASIDs or VPIDs, one per vCPU (see `mm::tlb_tags`).
static TAGS: spin::Once<spin::Mutex<TagPool>> = spin::Once::new();

fn tags(backend: Backend) -> &'static spin::Mutex<TagPool> {
    TAGS.call_once(|| {
        let last = match backend {
            // CPUID 0x8000_000A EBX: the number of ASIDs, 0 being the host's.
            Backend::Svm => cpuid!(0x8000_000a).ebx.saturating_sub(1),
            Backend::Vmx => MAX_VPID,
        };
        spin::Mutex::new(TagPool::new(last))
    })
}

/// VPIDs are 16 bits; a few thousand vCPUs are more than any VM set here has.
const MAX_VPID: u32 = 4095;

enum SecondLevel {
    Npt(SecondLevelTables<Npt>),
    Ept(SecondLevelTables<Ept>),
}

fn map_ram<F: EntryFormat>(
    tables: &mut HostTables,
    max_page: PageSize,
    ram: &GuestRam,
) -> Result<SecondLevelTables<F>, String> {
    let mut second_level =
        SecondLevelTables::<F>::new(tables, max_page).map_err(|e| format!("second-level tables: {e}"))?;
    second_level.map(tables, 0, ram.phys, ram.bytes, Perms::RWX).map_err(|e| format!("second-level tables: {e}"))?;
    Ok(second_level)
}

/// Maps guest RAM in second-level tables of format `F` and builds the vCPU on their root; the
/// tables are freed again if the vCPU cannot be built.
fn build_vcpu<F: EntryFormat>(
    tables: &mut HostTables,
    max_page: PageSize,
    ram: &GuestRam,
    wrap: fn(SecondLevelTables<F>) -> SecondLevel,
    new_vcpu: impl FnOnce(u64) -> Result<Box<dyn Vcpu>, String>,
) -> Result<(Box<dyn Vcpu>, SecondLevel), String> {
    let second_level = map_ram::<F>(tables, max_page, ram)?;
    match new_vcpu(second_level.root()) {
        Ok(vcpu) => Ok((vcpu, wrap(second_level))),
        Err(e) => {
            second_level.destroy(tables);
            Err(e)
        }
    }
}

/// One VM with its vCPU, ready to be scheduled: everything it owns, freed by [`Task::finish`].
pub struct Task {
    /// Position in the VM set.
    pub index: usize,
    /// The VM's name.
    pub name: String,
    /// When the VM must end (host microseconds), from its `timeout`.
    pub deadline_us: Option<u64>,
    /// The configured timeout in seconds.
    pub timeout_seconds: Option<u64>,
    vm: Vm<SliceMemory<'static>>,
    vcpu: Box<dyn Vcpu>,
    second_level: SecondLevel,
    tag: Tag,
    backend: Backend,
    supported_xcr0: u64,
    started: bool,
    _ram: GuestRam,
}

// SAFETY: a task runs on one CPU at a time: the scheduler hands it to one CPU, which calls
// `Vcpu::leave_cpu` (VMCLEAR on VMX) before giving it back, so its VMCS/VMCB and guest memory
// are never used by two CPUs at once; everything else in it is plain owned data.
unsafe impl Send for Task {}

impl Task {
    /// Runs the VM until the vCPU halts, the VM ends, or `slice_end_us` (host microseconds,
    /// `serial::uptime_micros`) passes. `input` gives the bytes typed for it, if any.
    pub fn run_slice(&mut self, slice_end_us: u64, input: &mut dyn FnMut() -> Option<u8>) -> Slice {
        let (index, name) = (self.index, &self.name);
        let mut console = |text: &str, ends_line: bool| serial::write_vm_text(index, name, text, ends_line);
        let mut env = Env {
            cpuid: &|leaf, subleaf| {
                let r = cpuid!(leaf, subleaf);
                [r.eax, r.ebx, r.ecx, r.edx]
            },
            now_micros: &serial::uptime_micros,
            host_tsc: &|| {
                // SAFETY: RDTSC has no side effects.
                unsafe { core::arch::x86_64::_rdtsc() }
            },
            console: &mut console,
            supported_xcr0: self.supported_xcr0,
            tsc_hz: serial::tsc_per_microsecond() * 1_000_000,
            arm_timer: &apic::arm,
            wait: &apic::sleep,
            input: Some(input),
        };
        if !self.started {
            self.vm.start(&env);
            self.started = true;
            self.deadline_us = self.timeout_seconds.map(|seconds| serial::uptime_micros() + seconds * 1_000_000);
        }
        let slice = self.vm.run_slice(self.vcpu.as_mut(), &mut env, slice_end_us);
        self.vcpu.leave_cpu();
        slice
    }

    /// Reports the VM's end (the `VM-END` line and the exit table, together) and frees
    /// everything it had.
    pub fn finish(self, end: &VmEnd) {
        let Task { name, vm, vcpu, second_level, tag, backend, _ram: ram, .. } = self;
        serial::write_str(&format!("{}\n{}", end.end_line(&name), vm.stats.table(&name)));
        drop(vcpu);
        tags(backend).lock().give_back(tag);
        let mut tables = HostTables;
        match second_level {
            SecondLevel::Npt(npt) => npt.destroy(&mut tables),
            SecondLevel::Ept(ept) => ept.destroy(&mut tables),
        }
        drop(vm);
        drop(ram);
    }
}

/// Builds the VM described by `config` (VM number `index` of the set) from the ramdisk.
pub fn prepare(backend: Backend, index: usize, config: &VmConfig, files: &[File<'_>]) -> Result<Task, String> {
    if config.vcpus != 1 {
        return Err(format!("vcpus = {}: only one vCPU per VM runs so far", config.vcpus));
    }
    let kernel = ramdisk::find(files, &config.kernel)
        .ok_or_else(|| format!("kernel {:?} is not in the ramdisk", config.kernel))?;
    let initrd = match &config.initrd {
        Some(name) => Some((
            name.as_str(),
            ramdisk::find(files, name).ok_or_else(|| format!("initrd {name:?} is not in the ramdisk"))?.data,
        )),
        None => None,
    };
    let mut modules = Vec::new();
    for entry in &config.modules {
        let file = config::module_file(entry).unwrap_or(entry);
        let data = ramdisk::find(files, file).ok_or_else(|| format!("module {file:?} is not in the ramdisk"))?.data;
        modules.push((entry.as_str(), data));
    }
    let ram = GuestRam::allocate(config.memory)
        .ok_or_else(|| format!("not enough host memory for {} MiB of guest RAM", config.memory >> 20))?;
    let mut guest_memory = ram.slice();
    let prepared = setup::prepare(config, kernel.data, initrd, &modules, &mut guest_memory)?;
    let start = prepared.start;

    let mut tables = HostTables;
    let tsc_hz = serial::tsc_per_microsecond() * 1_000_000;
    let mut vm = Vm::new(&config.name, ram.slice(), tsc_hz, cmos::wall_clock_seconds());
    if config.devices.test {
        vm.bus
            .add(alloc::boxed::Box::new(crate::devices::test_device::TestDevice::default()))
            .map_err(|e| format!("{e}"))?;
    }
    let supported_xcr0 = xstate::enable().supported_xcr0;
    let tag = tags(backend).lock().take();
    let vcpu_error = |e: &dyn core::fmt::Display| format!("vCPU: {e}");
    let built = match backend {
        Backend::Svm => build_vcpu(&mut tables, PageSize::Size2M, &ram, SecondLevel::Npt, |root| {
            svm::SvmVcpu::new(root, tag, start).map(|vcpu| Box::new(vcpu) as Box<dyn Vcpu>).map_err(|e| vcpu_error(&e))
        }),
        Backend::Vmx => build_vcpu(&mut tables, vmx::ept_max_page(), &ram, SecondLevel::Ept, |root| {
            vmx::VmxVcpu::new(root, tag, start).map(|vcpu| Box::new(vcpu) as Box<dyn Vcpu>).map_err(|e| vcpu_error(&e))
        }),
    };
    let (mut vcpu, second_level) = match built {
        Ok(built) => built,
        Err(e) => {
            tags(backend).lock().give_back(tag);
            return Err(e);
        }
    };
    // Built on this CPU; it may run on any.
    vcpu.leave_cpu();
    log::info!(
        "vm {}: {} MiB RAM, kernel {} ({} bytes): {}",
        config.name,
        config.memory >> 20,
        config.kernel,
        kernel.data.len(),
        prepared.summary
    );
    Ok(Task {
        index,
        name: config.name.clone(),
        deadline_us: None,
        timeout_seconds: config.timeout_seconds,
        vm,
        vcpu,
        second_level,
        tag,
        backend,
        supported_xcr0,
        started: false,
        _ram: ram,
    })
}
