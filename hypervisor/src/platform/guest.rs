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
use crate::ramdisk::{self, File};
use crate::vcpu::Vcpu;
use crate::vm::config::{self, VmConfig};
use crate::vm::setup;
use crate::vm::{Env, Vm, VmEnd};

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

/// Each VM runs alone on the CPU, so one ASID / VPID serves all (flushed when a VM starts).
const GUEST_ASID: u32 = 1;
const GUEST_VPID: u16 = 1;

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

/// Builds the VM described by `config` from the ramdisk and runs it to its end.
pub fn run(backend: Backend, config: &VmConfig, files: &[File<'_>]) -> VmEnd {
    match prepare_and_run(backend, config, files) {
        Ok(end) => end,
        Err(e) => VmEnd::Error(e),
    }
}

fn prepare_and_run(backend: Backend, config: &VmConfig, files: &[File<'_>]) -> Result<VmEnd, String> {
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
    let (mut vcpu, second_level): (Box<dyn Vcpu>, SecondLevel) = match backend {
        Backend::Svm => {
            let npt = map_ram::<Npt>(&mut tables, PageSize::Size2M, &ram)?;
            let vcpu = svm::SvmVcpu::new(npt.root(), GUEST_ASID, start).map_err(|e| format!("vCPU: {e}"))?;
            (Box::new(vcpu), SecondLevel::Npt(npt))
        }
        Backend::Vmx => {
            let ept = map_ram::<Ept>(&mut tables, vmx::ept_max_page(), &ram)?;
            let vcpu = vmx::VmxVcpu::new(ept.root(), GUEST_VPID, start).map_err(|e| format!("vCPU: {e}"))?;
            (Box::new(vcpu), SecondLevel::Ept(ept))
        }
    };
    log::info!(
        "vm {}: {} MiB RAM, kernel {} ({} bytes): {}",
        config.name,
        config.memory >> 20,
        config.kernel,
        kernel.data.len(),
        prepared.summary
    );
    let end = {
        let mut console = |text: &str| serial::write_str(text);
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
            supported_xcr0,
            tsc_hz,
            arm_timer: &apic::arm,
            wait: &apic::sleep,
            input: Some(&mut serial::read_byte),
        };
        vm.run(vcpu.as_mut(), &mut env)
    };
    serial::write_str(&vm.stats.table(&config.name));
    drop(vcpu);
    match second_level {
        SecondLevel::Npt(npt) => npt.destroy(&mut tables),
        SecondLevel::Ept(ept) => ept.destroy(&mut tables),
    }
    drop(vm);
    drop(ram);
    Ok(end)
}
