//! Building and running one VM on this machine: guest RAM, second-level tables, loader, vCPU.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use raw_cpuid::cpuid;

use super::memory::{self, HostTables};
use super::{apic, cmos, serial, svm, vmx, xstate};
use crate::devices::HostNmi;
use crate::loader::SliceMemory;
use crate::mm::frames::FRAME_SIZE;
use crate::mm::second_level::{EntryFormat, Ept, Npt, PageSize, Perms, SecondLevelTables};
use crate::mm::tlb_tags::{Tag, TagPool};
use crate::ramdisk::{self, File};
use crate::vcpu::{StartMode, Vcpu};
use crate::vm::config::{self, VmConfig};
use crate::vm::network::{Networks, Port};
use crate::vm::{self, setup};
use crate::vm::{Env, Slice, VcpuContext, Vm, VmEnd};

const GUEST_RAM_ALIGN: u64 = 2 << 20;

/// Guest RAM: contiguous host frames, taken unwritten (they hold nothing another VM or the
/// hypervisor left: [`memory::free_frames`]) and zeroed when the VM is dropped.
struct GuestRam {
    phys: u64,
    bytes: u64,
}

impl GuestRam {
    fn allocate(bytes: u64) -> Option<Self> {
        memory::alloc_clean(bytes / FRAME_SIZE, GUEST_RAM_ALIGN).map(|phys| GuestRam { phys, bytes })
    }

    fn slice(&self) -> SliceMemory<'static> {
        // SAFETY: the frames belong to this VM from allocation to drop; `prepare` takes the one
        // view of them for the VM, and `Task::finish` frees them only when no vCPU of the VM
        // can run any more, after which the view is never used.
        SliceMemory(unsafe { memory::phys_slice_mut(self.phys, self.bytes as usize) })
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        if let Err(e) = memory::free_frames(self.phys, self.bytes / FRAME_SIZE) {
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

impl SecondLevel {
    fn root(&self) -> u64 {
        match self {
            SecondLevel::Npt(npt) => npt.root(),
            SecondLevel::Ept(ept) => ept.root(),
        }
    }

    fn destroy(self) {
        let mut tables = HostTables;
        match self {
            SecondLevel::Npt(npt) => npt.destroy(&mut tables),
            SecondLevel::Ept(ept) => ept.destroy(&mut tables),
        }
    }
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

/// What the vCPUs of one VM share: the machine behind its lock, the memory it runs in, and
/// how each vCPU is reached from other host CPUs.
pub struct SharedVm {
    /// Position in the VM set.
    pub index: usize,
    /// The VM's name.
    pub name: String,
    /// The configured timeout in seconds.
    pub timeout_seconds: Option<u64>,
    /// When the VM must end (host microseconds), set when its first vCPU first runs.
    deadline_us: spin::Once<Option<u64>>,
    vm: spin::Mutex<Vm<SliceMemory<'static>>>,
    slots: Vec<VcpuSlot>,
    /// vCPUs not finished yet: the last one to finish reports the VM's end.
    live_vcpus: AtomicUsize,
    /// Root of the second-level tables all vCPUs run on.
    second_level_root: u64,
    /// The tables and guest RAM, taken and freed by the last vCPU to finish.
    memory: spin::Mutex<Option<(SecondLevel, GuestRam)>>,
    backend: Backend,
    supported_xcr0: u64,
    /// Host memory the VM took at set-up besides its RAM, for the end report.
    overhead: HostOverhead,
}

/// What a VM costs the host besides its guest RAM, measured around its set-up.
#[derive(Clone, Copy, Default)]
struct HostOverhead {
    /// Frames: second-level tables, VMCBs/VMCSs and their bitmaps, device buffers.
    frame_bytes: u64,
    /// Heap: the VM's state, devices and queues (disk overlays are reported by the disks).
    heap_bytes: u64,
}

/// How other host CPUs find one vCPU.
pub struct VcpuSlot {
    /// The host CPU running it, or [`NOT_RUNNING`].
    pub running_on: AtomicUsize,
    /// Something arrived for it since it last looked ([`crate::vm::Env::kick`]).
    pub kicked: AtomicBool,
}

/// [`VcpuSlot::running_on`] of a vCPU that is queued.
pub const NOT_RUNNING: usize = usize::MAX;

impl SharedVm {
    /// The slot of vCPU `index`.
    pub fn slot(&self, index: usize) -> Option<&VcpuSlot> {
        self.slots.get(index)
    }

    /// How many vCPUs the VM has.
    pub fn vcpus(&self) -> usize {
        self.slots.len()
    }

    /// When the VM must end, if it has a timeout and has started.
    pub fn deadline_us(&self) -> Option<u64> {
        self.deadline_us.get().copied().flatten()
    }

    /// How the VM ended, if it has.
    pub fn ended(&self) -> Option<VmEnd> {
        self.vm.lock().ended().cloned()
    }

    /// Ends the VM for all its vCPUs (they stop at their next look; kick them).
    pub fn end(&self, end: VmEnd) {
        self.vm.lock().end(end);
    }
}

// SAFETY: the machine is behind its lock; guest RAM and the second-level tables are shared
// by the VM's vCPUs exactly as the guest's own CPUs share them, and freed only by the last
// vCPU to finish, when no other can run.
unsafe impl Send for SharedVm {}
// SAFETY: as above: all mutable state is behind the lock or atomic.
unsafe impl Sync for SharedVm {}

/// One vCPU, ready to be scheduled.
pub struct Task {
    /// The VM it belongs to.
    pub vm: Arc<SharedVm>,
    /// Its index in the VM (and APIC ID).
    pub vcpu_index: usize,
    cx: VcpuContext,
    vcpu: Box<dyn Vcpu>,
    tag: Tag,
}

// SAFETY: a task runs on one CPU at a time: the scheduler hands it to one CPU, which calls
// `Vcpu::leave_cpu` (VMCLEAR on VMX) before giving it back, so its VMCS/VMCB is never used by
// two CPUs at once; everything else in it is plain owned data or `SharedVm`.
unsafe impl Send for Task {}

impl Task {
    /// Runs the vCPU until it halts, the VM ends, or `slice_end_us` (host microseconds,
    /// `serial::uptime_micros`) passes. `input` gives the bytes typed for the VM, if any;
    /// `kick` reaches another vCPU of the VM.
    pub fn run_slice(
        &mut self,
        slice_end_us: u64,
        input: &mut dyn FnMut() -> Option<u8>,
        kick: &dyn Fn(usize),
    ) -> Slice {
        let vm = self.vm.clone();
        let shared = &*vm;
        let (index, name) = (shared.index, &shared.name);
        let mut console = |text: &str, ends_line: bool| serial::write_vm_text(index, name, text, ends_line);
        let mut raw = |bytes: &[u8]| serial::write_vm_raw(bytes);
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
            supported_xcr0: shared.supported_xcr0,
            tsc_hz: serial::tsc_per_microsecond() * 1_000_000,
            arm_timer: &apic::arm,
            wait: &apic::sleep,
            input: Some(input),
            raw_console: if super::scheduler::shows_raw(index) { Some(&mut raw) } else { None },
            kick,
            host_nmi: &|target| match target {
                HostNmi::ThisCpu => apic::send_nmi_to_self(),
                HostNmi::OtherCpus => apic::send_nmi_to_others(),
            },
        };
        shared
            .deadline_us
            .call_once(|| shared.timeout_seconds.map(|seconds| serial::uptime_micros() + seconds * 1_000_000));
        let slice = vm::run_slice(&shared.vm, &mut self.cx, self.vcpu.as_mut(), &mut env, slice_end_us);
        self.vcpu.leave_cpu();
        if let Slice::Started(start) = slice {
            // A start-up IPI: the vCPU begins afresh in real mode at the vector's page.
            if let Err(e) = self.rebuild(start) {
                let end = VmEnd::Error(format!("vCPU {}: could not start it: {e}", self.vcpu_index));
                shared.end(end.clone());
                return Slice::Ended(end);
            }
            return Slice::Preempted;
        }
        slice
    }

    fn rebuild(&mut self, start: StartMode) -> Result<(), String> {
        let shared = &*self.vm;
        let mut vcpu = new_vcpu(shared.backend, shared.second_level_root, self.tag, start, shared.vcpus())?;
        vcpu.leave_cpu();
        self.vcpu = vcpu;
        Ok(())
    }

    /// Logs where this vCPU stands (for a VM that ran out of time: where did it hang?).
    pub fn report_state(&self) {
        log::info!("{}", self.vm.vm.lock().describe_vcpu(&self.cx, self.vcpu.as_ref()));
    }

    /// This vCPU is done (its VM ended). The last vCPU of the VM to finish reports the VM's
    /// end (the `VM-END` line and the exit table, together), frees everything it had, and
    /// returns the end.
    pub fn finish(self) -> Option<(usize, String, VmEnd)> {
        let Task { vm: shared, vcpu, tag, .. } = self;
        drop(vcpu);
        tags(shared.backend).lock().give_back(tag);
        if shared.live_vcpus.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None;
        }
        // No vCPU of this VM runs any more: its memory can go.
        let end = {
            let vm = shared.vm.lock();
            let end = vm.ended().cloned().unwrap_or(VmEnd::Error("ended without a reason".into()));
            let mut report = format!("{}\n{}", end.end_line(&shared.name), vm.stats.table(&shared.name));
            for line in vm.bus.reports() {
                report.push_str(&format!("  {line}\n"));
            }
            let HostOverhead { frame_bytes, heap_bytes } = shared.overhead;
            report.push_str(&format!(
                "  host memory: {} MiB guest RAM, {} KiB of tables and vCPU state, {} KiB of heap\n",
                crate::loader::GuestMemory::size(&vm.memory) >> 20,
                frame_bytes >> 10,
                heap_bytes >> 10
            ));
            serial::write_str(&report);
            end
        };
        if let Some((second_level, ram)) = shared.memory.lock().take() {
            second_level.destroy();
            drop(ram);
        }
        Some((shared.index, shared.name.clone(), end))
    }
}

/// A vCPU of a VM with `vcpus` vCPUs; those of an SMP VM give their CPU away when they spin.
fn new_vcpu(backend: Backend, root: u64, tag: Tag, start: StartMode, vcpus: usize) -> Result<Box<dyn Vcpu>, String> {
    let mut vcpu = new_arch_vcpu(backend, root, tag, start)?;
    if vcpus > 1 {
        vcpu.exit_on_spin_loops();
    }
    Ok(vcpu)
}

fn new_arch_vcpu(backend: Backend, root: u64, tag: Tag, start: StartMode) -> Result<Box<dyn Vcpu>, String> {
    let vcpu_error = |e: &dyn core::fmt::Display| format!("vCPU: {e}");
    match backend {
        Backend::Svm => {
            svm::SvmVcpu::new(root, tag, start).map(|vcpu| Box::new(vcpu) as Box<dyn Vcpu>).map_err(|e| vcpu_error(&e))
        }
        Backend::Vmx => {
            vmx::VmxVcpu::new(root, tag, start).map(|vcpu| Box::new(vcpu) as Box<dyn Vcpu>).map_err(|e| vcpu_error(&e))
        }
    }
}

/// The most vCPUs one VM may have.
pub const MAX_VCPUS: u32 = 16;

/// Builds the VM described by `config` (VM number `index` of the set) from the ramdisk: one
/// task per vCPU.
pub fn prepare(
    backend: Backend,
    index: usize,
    config: &VmConfig,
    files: &[File<'static>],
    networks: &mut Networks,
) -> Result<Vec<Task>, String> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(format!("vcpus = {}: a VM has 1 to {MAX_VCPUS} vCPUs", config.vcpus));
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
    let started_us = serial::uptime_micros();
    let (frames_before, heap_before) = (memory::FRAMES.lock().free_bytes(), memory::heap_used());
    let ram = GuestRam::allocate(config.memory)
        .ok_or_else(|| format!("not enough host memory for {} MiB of guest RAM", config.memory >> 20))?;
    // The one view of guest RAM: the loader fills it, then the VM owns it.
    let mut guest_memory = ram.slice();
    let prepared = setup::prepare(config, kernel.data, initrd, &modules, &mut guest_memory)?;

    let mut tables = HostTables;
    let tsc_hz = serial::tsc_per_microsecond() * 1_000_000;
    let vcpus = config.vcpus as usize;
    let mut vm = Vm::with_vcpus(&config.name, guest_memory, tsc_hz, cmos::wall_clock_seconds(), vcpus);
    if config.devices.test {
        vm.bus
            .add(alloc::boxed::Box::new(crate::devices::test_device::TestDevice::default()))
            .map_err(|e| format!("{e}"))?;
    }
    let disks = crate::vm::storage::attach_disks(
        &mut vm,
        &config.disks,
        files,
        super::host_disk::get(),
        &super::memory::overlay_pool(),
    )?;
    let (ports, nics) = crate::vm::network::attach_nics(&mut vm, &config.nics, networks)?;
    if config.devices.rng {
        let source = super::entropy::rdrand_source().ok_or("devices = rng: this CPU has no RDRAND")?;
        let rng = crate::devices::virtio::rng::Rng::new(source);
        let slot = vm.plug_virtio(rng, "rng0").map_err(|e| format!("devices = rng: {e}"))?;
        log::info!("vm {}: virtio-rng at PCI 00:{slot:02x}.0, from the host's RDRAND", config.name);
    }
    let supported_xcr0 = xstate::enable().supported_xcr0;
    let second_level = match backend {
        Backend::Svm => SecondLevel::Npt(map_ram::<Npt>(&mut tables, PageSize::Size2M, &ram)?),
        Backend::Vmx => SecondLevel::Ept(map_ram::<Ept>(&mut tables, vmx::ept_max_page(), &ram)?),
    };
    let root = second_level.root();
    // Application processors wait for INIT-SIPI; their state until then does not matter.
    let mut built: Vec<(Box<dyn Vcpu>, Tag)> = Vec::new();
    for vcpu_index in 0..vcpus {
        let start = if vcpu_index == 0 { prepared.start } else { StartMode::Real { cs: 0, ip: 0 } };
        let tag = tags(backend).lock().take();
        match new_vcpu(backend, root, tag, start, vcpus) {
            Ok(mut vcpu) => {
                // Built on this CPU; it may run on any.
                vcpu.leave_cpu();
                built.push((vcpu, tag));
            }
            Err(e) => {
                tags(backend).lock().give_back(tag);
                for (vcpu, tag) in built {
                    drop(vcpu);
                    tags(backend).lock().give_back(tag);
                }
                second_level.destroy();
                return Err(e);
            }
        }
    }
    let overhead = HostOverhead {
        frame_bytes: frames_before.saturating_sub(memory::FRAMES.lock().free_bytes()).saturating_sub(config.memory),
        heap_bytes: memory::heap_used().saturating_sub(heap_before),
    };
    let done_us = serial::uptime_micros();
    log::info!(
        "vm {}: {} MiB RAM, {} vCPU{}, kernel {} ({} bytes): {}; set up in {} ms",
        config.name,
        config.memory >> 20,
        vcpus,
        if vcpus == 1 { "" } else { "s" },
        config.kernel,
        kernel.data.len(),
        prepared.summary,
        (done_us - started_us) / 1000
    );
    for disk in disks {
        log::info!("vm {}: disk {disk}", config.name);
    }
    for nic in nics {
        log::info!("vm {}: {nic}", config.name);
    }
    let shared = Arc::new(SharedVm {
        index,
        name: config.name.clone(),
        timeout_seconds: config.timeout_seconds,
        deadline_us: spin::Once::new(),
        vm: spin::Mutex::new(vm),
        slots: (0..vcpus)
            .map(|_| VcpuSlot { running_on: AtomicUsize::new(NOT_RUNNING), kicked: AtomicBool::new(false) })
            .collect(),
        live_vcpus: AtomicUsize::new(vcpus),
        second_level_root: root,
        memory: spin::Mutex::new(Some((second_level, ram))),
        backend,
        supported_xcr0,
        overhead,
    });
    // Frames for this VM wake its vCPU 0, which serves the devices. Weak: the switch outlives
    // the VM, which must still be freed when it ends.
    for Port { network, port } in ports {
        let vm = Arc::downgrade(&shared);
        network.set_waker(
            port,
            alloc::boxed::Box::new(move || {
                if let Some(vm) = vm.upgrade() {
                    super::scheduler::kick(&vm, 0);
                }
            }),
        );
    }
    Ok(built
        .into_iter()
        .enumerate()
        .map(|(vcpu_index, (vcpu, tag))| Task {
            vm: shared.clone(),
            vcpu_index,
            cx: VcpuContext::new(vcpu_index),
            vcpu,
            tag,
        })
        .collect())
}
