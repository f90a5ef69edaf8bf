//! Every host CPU runs this loop: take a vCPU the run queue allows here, run it for a slice,
//! put it back, or sleep until one is due. The policy is `crate::sched`; this is the mechanism
//! (host timer, wake-up IPIs, VM ends, the end of the run).
//!
//! The host runs with interrupts disabled except while it sleeps or takes a pending interrupt
//! after an exit, and its interrupt handlers only acknowledge; so no lock here is ever wanted
//! by an interrupt handler, and none is held while a guest runs.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use spin::Mutex;

use super::guest::{SharedVm, Task, NOT_RUNNING};
use super::{apic, exit, host_nic, percpu, serial};
use crate::sched::{next_input_vm, Readiness, RunQueue, DEFAULT_SLICE_US, SWITCH_INPUT};
use crate::status::RunStatus;
use crate::vm::config::CpuSet;
use crate::vm::{Slice, VmEnd};

/// Vector of the IPI that wakes an idle CPU to look at the run queue again.
pub const WAKE_VECTOR: u8 = 0xf1;
/// An idle CPU looks at the queue at least this often, whatever it was told.
const IDLE_RECHECK_US: u64 = 100_000;
/// The shortest slice a task gets when a halted task is due sooner.
const MIN_SLICE_US: u64 = 500;

static QUEUE: Mutex<RunQueue<Task>> = Mutex::new(RunQueue::new());
/// Set once every VM of the set is queued: from then on, an empty queue means the run is over.
static STARTED: AtomicBool = AtomicBool::new(false);
/// CPUs sleeping in the idle loop (bit = CPU index), to be woken when work is queued.
static IDLE_CPUS: AtomicU64 = AtomicU64::new(0);
/// The VM that gets typed input (`usize::MAX`: none runs).
static INPUT_VM: AtomicUsize = AtomicUsize::new(0);
static SLICE_US: AtomicU64 = AtomicU64::new(DEFAULT_SLICE_US);
/// `console = raw`: the VM with the input also sends its console bytes unaltered.
static RAW_CONSOLE: AtomicBool = AtomicBool::new(false);

/// How the VM set went, for the end line.
struct Outcome {
    names: Vec<String>,
    /// Still running, by index in the set.
    running: Vec<bool>,
    failed: Vec<String>,
}

static OUTCOME: Mutex<Outcome> = Mutex::new(Outcome { names: Vec::new(), running: Vec::new(), failed: Vec::new() });

/// Records the VM set before any VM is queued: these VMs, all running until they end.
/// `raw_console` sends the raw console bytes of the VM with the input too.
pub fn begin(names: Vec<String>, slice_us: u64, raw_console: bool) {
    let mut outcome = OUTCOME.lock();
    outcome.running = alloc::vec![true; names.len()];
    RAW_CONSOLE.store(raw_console, Ordering::Relaxed);
    // A raw terminal needs to know which VM it shows even when there is only one.
    if names.len() > 1 || (raw_console && !names.is_empty()) {
        serial::write_line(&format!("HV-CONSOLE: input goes to vm {}; Ctrl-] moves it to the next VM", names[0]));
    }
    outcome.names = names;
    SLICE_US.store(slice_us.max(1), Ordering::Relaxed);
}

/// VM `vm` has the input and the console is raw: its bytes go out unaltered too.
pub fn shows_raw(vm: usize) -> bool {
    RAW_CONSOLE.load(Ordering::Relaxed) && INPUT_VM.load(Ordering::Relaxed) == vm
}

/// A byte typed on the host console for VM `vm`, if it has the input; Ctrl-] moves the input
/// on instead of reaching a guest.
fn read_input(vm: usize) -> Option<u8> {
    if INPUT_VM.load(Ordering::Relaxed) != vm {
        return None;
    }
    let byte = serial::read_byte()?;
    if byte != SWITCH_INPUT {
        return Some(byte);
    }
    move_input(&OUTCOME.lock(), vm);
    None
}

/// Gives the input to the VM after `from` that still runs, and says so.
fn move_input(outcome: &Outcome, from: usize) {
    let next = next_input_vm(&outcome.running, from);
    INPUT_VM.store(next.unwrap_or(usize::MAX), Ordering::Relaxed);
    if let Some(next) = next.filter(|&next| next != from) {
        serial::write_line(&format!("HV-CONSOLE: input goes to vm {}", outcome.names[next]));
    }
}

/// Queues the vCPUs of a prepared VM; they may run on the CPUs in `affinity`.
pub fn add(tasks: Vec<Task>, affinity: CpuSet) {
    let mut queue = QUEUE.lock();
    for task in tasks {
        queue.add(task, affinity);
    }
}

/// A VM that could not even be built: it ends now, with the others going on.
pub fn ended_before_start(index: usize, name: &str, end: &VmEnd) {
    serial::write_line(&end.end_line(name));
    record_end(index, name, end);
}

/// Every VM is queued: the CPUs may end the run once the queue empties. Wakes everyone.
pub fn start() {
    STARTED.store(true, Ordering::Release);
    wake_idle_cpus();
}

/// The loop of every host CPU once the VM set is running.
pub fn run_cpu() -> ! {
    let cpu = percpu::current().index;
    loop {
        if exit::ending() {
            exit::park();
        }
        // Between slices and after every idle wake: frames from and to the machine's NIC.
        host_nic::poll();
        let now = serial::uptime_micros();
        let taken = {
            let mut queue = QUEUE.lock();
            if STARTED.load(Ordering::Acquire) && queue.live() == 0 {
                drop(queue);
                finish_run();
            }
            let taken = queue.take(cpu, now).map(|(task, affinity)| {
                // The slice ends early if a halted task that could run here is due before.
                (task, affinity, queue.next_halted_wake_us(cpu))
            });
            if let Some((task, _, _)) = &taken {
                // Set under the queue lock, which kicks take to read it.
                if let Some(slot) = task.vm.slot(task.vcpu_index) {
                    slot.running_on.store(cpu, Ordering::Release);
                }
            }
            taken
        };
        match taken {
            Some((task, affinity, next_wake)) => run_task(task, affinity, next_wake),
            None => idle(cpu),
        }
    }
}

fn run_task(mut task: Task, affinity: CpuSet, next_wake_us: Option<u64>) {
    let now = serial::uptime_micros();
    let mut slice_end = now.saturating_add(SLICE_US.load(Ordering::Relaxed));
    if let Some(wake) = next_wake_us {
        // At least a little: the task must get somewhere before it yields to a waking one.
        slice_end = slice_end.min(wake.max(now + MIN_SLICE_US));
    }
    if let Some(deadline) = task.vm.deadline_us() {
        slice_end = slice_end.min(deadline);
    }
    let shared = task.vm.clone();
    let Some(slot) = shared.slot(task.vcpu_index) else { return };
    // Kicks from now on are seen by this slice or make the task runnable when it is put back.
    slot.kicked.store(false, Ordering::Release);
    let vm_index = shared.index;
    super::speculation::entering_vm(vm_index);
    let mut input = || read_input(vm_index);
    let kick_vcpu = |vcpu: usize| kick(&shared, vcpu);
    let slice = task.run_slice(slice_end, &mut input, &kick_vcpu);
    let now = serial::uptime_micros();
    let timed_out = shared.deadline_us().is_some_and(|deadline| now >= deadline);
    let readiness = match slice {
        Slice::Ended(_) => return end_task(task),
        _ if timed_out => {
            shared.end(VmEnd::Timeout(shared.timeout_seconds.unwrap_or(0)));
            for vcpu in (0..shared.vcpus()).filter(|&vcpu| vcpu != task.vcpu_index) {
                kick(&shared, vcpu);
            }
            return end_task(task);
        }
        Slice::Preempted | Slice::Started(_) => Readiness::Runnable,
        Slice::Halted { wake_at_us } => {
            // A halted VM still has to be ended by its timeout.
            let wake_at_us = shared.deadline_us().map_or(wake_at_us, |deadline| wake_at_us.min(deadline));
            Readiness::HaltedUntil { wake_at_us }
        }
    };
    let mut queue = QUEUE.lock();
    // A kick that came after the vCPU last looked must not be lost while it sleeps.
    let readiness = if slot.kicked.swap(false, Ordering::AcqRel) { Readiness::Runnable } else { readiness };
    slot.running_on.store(NOT_RUNNING, Ordering::Release);
    queue.put_back(task, affinity, readiness);
    drop(queue);
    // An idle CPU may have gone to sleep before this task was queued: let it look again.
    wake_idle_cpus();
}

/// Makes vCPU `vcpu` of `vm` look at its interrupts: a host IPI to the CPU running it, or
/// a wake-up if it is queued.
pub fn kick(vm: &Arc<SharedVm>, vcpu: usize) {
    let Some(slot) = vm.slot(vcpu) else { return };
    slot.kicked.store(true, Ordering::Release);
    let mut queue = QUEUE.lock();
    let cpu = slot.running_on.load(Ordering::Acquire);
    if cpu != NOT_RUNNING {
        drop(queue);
        if cpu != percpu::current().index {
            if let Some(block) = percpu::cpu(cpu) {
                // Any host interrupt makes the guest exit; the vCPU then sees what arrived.
                apic::send_fixed(block.apic_id, WAKE_VECTOR);
            }
        }
        return;
    }
    let woken = queue.wake(|task| Arc::ptr_eq(&task.vm, vm) && task.vcpu_index == vcpu);
    drop(queue);
    if woken {
        wake_idle_cpus();
    }
}

fn end_task(task: Task) {
    if let Some(VmEnd::Timeout(_)) = task.vm.ended() {
        task.report_state();
    }
    if let Some((index, name, end)) = task.finish() {
        record_end(index, &name, &end);
    }
    QUEUE.lock().finished();
}

fn record_end(index: usize, name: &str, end: &VmEnd) {
    let mut outcome = OUTCOME.lock();
    if let Some(running) = outcome.running.get_mut(index) {
        *running = false;
    }
    if !end.is_clean() {
        outcome.failed.push(format!("{name} ({end})"));
    }
    if INPUT_VM.load(Ordering::Relaxed) == index {
        move_input(&outcome, index);
    }
}

/// Nothing to run here: sleep until the earliest halted task this CPU could run is due, a
/// wake-up IPI, or the periodic re-check (every [`host_nic::POLL_INTERVAL_US`] while there is an
/// uplink to poll).
fn idle(cpu: usize) {
    let bit = 1u64 << (cpu % 64);
    IDLE_CPUS.fetch_or(bit, Ordering::AcqRel);
    let now = serial::uptime_micros();
    let next = QUEUE.lock().next_wake_us(cpu);
    let recheck_us = if host_nic::active() { host_nic::POLL_INTERVAL_US } else { IDLE_RECHECK_US };
    let sleep_us = next.map_or(recheck_us, |at| at.saturating_sub(now).min(recheck_us));
    if sleep_us > 0 {
        // A wake-up IPI sent after the queue was read stays pending until `sleep` enables
        // interrupts, and then ends the HLT at once: no wake-up is lost.
        apic::arm(Some(sleep_us * 1000));
        apic::sleep();
        apic::arm(None);
    }
    IDLE_CPUS.fetch_and(!bit, Ordering::AcqRel);
}

fn wake_idle_cpus() {
    let me = percpu::current().index;
    let mut idle = IDLE_CPUS.load(Ordering::Acquire);
    while idle != 0 {
        let cpu = idle.trailing_zeros() as usize;
        idle &= idle - 1;
        if cpu != me {
            if let Some(block) = percpu::cpu(cpu) {
                apic::send_fixed(block.apic_id, WAKE_VECTOR);
            }
        }
    }
}

/// Set by the CPU that reports the end of the run; any other CPU that finds the run over parks,
/// so the report's lines are written once and whole.
static FINISHING: AtomicBool = AtomicBool::new(false);

fn finish_run() -> ! {
    if FINISHING.swap(true, Ordering::AcqRel) {
        exit::park();
    }
    let outcome = OUTCOME.lock();
    let (total, failed) = (outcome.names.len(), outcome.failed.clone());
    drop(outcome);
    host_nic::report();
    let barriers = super::speculation::barriers();
    if barriers > 0 {
        log::info!("host: {barriers} branch-predictor barriers (IBPB) between VMs");
    }
    let nmis = super::idt::platform_nmis();
    if nmis > 0 {
        log::warn!("host: {nmis} platform NMIs taken and ignored");
    }
    if failed.is_empty() {
        exit::end(RunStatus::Success, &format!("{total} VMs ran, all ended cleanly"))
    }
    exit::end(RunStatus::Failure, &format!("{total} VMs ran, {} failed: {}", failed.len(), failed.join("; ")))
}
