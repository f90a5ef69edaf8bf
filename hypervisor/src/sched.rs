//! The vCPU scheduler's policy: which vCPU a host CPU runs next, and when a halted one is due.
//!
//! Every vCPU of every VM is one task. A host CPU takes the first task that may run there
//! (its affinity allows the CPU, and it is runnable or its wake-up time has come), runs it for
//! a slice, and puts it back at the end of the queue: round robin among what may run, so a VM
//! that never halts gets its share and no more. Halted tasks wait in the queue with a wake-up
//! time; an idle CPU sleeps until the earliest one it could run.
//!
//! A halted task whose time has come (or that was woken) goes before the runnable ones, and a
//! running task's slice ends when the next halted task that could run on its CPU is due (as
//! Xen's credit scheduler boosts a waking vCPU): a VM that mostly waits for its interrupts
//! answers them at once even beside VMs that never stop computing, which still get every
//! moment it does not use. The mechanism (running a slice, timers, IPIs) belongs to the
//! bare-metal layer; this is plain data, tested on the host.

use alloc::collections::VecDeque;

use crate::vm::config::CpuSet;

/// The time slice when the configuration gives none.
pub const DEFAULT_SLICE_US: u64 = 10_000;

/// Whether a queued task can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Runnable now.
    Runnable,
    /// Halted: runnable from `wake_at_us` on (or when woken earlier).
    HaltedUntil {
        /// Host time in microseconds.
        wake_at_us: u64,
    },
}

struct Queued<T> {
    task: T,
    affinity: CpuSet,
    readiness: Readiness,
}

/// The queue of tasks not running on any CPU right now.
pub struct RunQueue<T> {
    queue: VecDeque<Queued<T>>,
    /// Tasks in the queue plus those out on a CPU; 0 means every VM has ended.
    live: usize,
}

impl<T> Default for RunQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> RunQueue<T> {
    /// An empty queue.
    pub const fn new() -> Self {
        RunQueue { queue: VecDeque::new(), live: 0 }
    }

    /// A new, runnable task that may run on the CPUs in `affinity`.
    pub fn add(&mut self, task: T, affinity: CpuSet) {
        self.live += 1;
        self.queue.push_back(Queued { task, affinity, readiness: Readiness::Runnable });
    }

    /// Takes the task `cpu` runs next at `now_us`: the first halted one that may run there and
    /// is due, else the first runnable one.
    pub fn take(&mut self, cpu: usize, now_us: u64) -> Option<(T, CpuSet)> {
        let first = |wanted: &dyn Fn(Readiness) -> bool| {
            self.queue.iter().position(|q| q.affinity.contains(cpu) && wanted(q.readiness))
        };
        let position = first(&|r| matches!(r, Readiness::HaltedUntil { wake_at_us } if wake_at_us <= now_us))
            .or_else(|| first(&|r| r == Readiness::Runnable))?;
        let queued = self.queue.remove(position)?;
        Some((queued.task, queued.affinity))
    }

    /// When the next halted task that may run on `cpu` is due: the slice of a task running
    /// there ends then, so that one runs.
    pub fn next_halted_wake_us(&self, cpu: usize) -> Option<u64> {
        self.queue
            .iter()
            .filter(|q| q.affinity.contains(cpu))
            .filter_map(|q| match q.readiness {
                Readiness::Runnable => None,
                Readiness::HaltedUntil { wake_at_us } => Some(wake_at_us),
            })
            .min()
    }

    /// Returns a task taken with [`Self::take`] to the back of the queue.
    pub fn put_back(&mut self, task: T, affinity: CpuSet, readiness: Readiness) {
        self.queue.push_back(Queued { task, affinity, readiness });
    }

    /// A task taken with [`Self::take`] has ended for good.
    pub fn finished(&mut self) {
        self.live = self.live.saturating_sub(1);
    }

    /// Tasks that have not ended, queued or running.
    pub fn live(&self) -> usize {
        self.live
    }

    /// The earliest wake-up among halted tasks that may run on `cpu`; `Some(0)` if one is
    /// runnable already. `None`: nothing queued for this CPU.
    pub fn next_wake_us(&self, cpu: usize) -> Option<u64> {
        self.queue
            .iter()
            .filter(|q| q.affinity.contains(cpu))
            .map(|q| match q.readiness {
                Readiness::Runnable => 0,
                Readiness::HaltedUntil { wake_at_us } => wake_at_us,
            })
            .min()
    }

    /// Makes a halted task due now (an interrupt arrived for it); `true` if `matches` found
    /// one. A runnable task stays as it is.
    pub fn wake(&mut self, mut matches: impl FnMut(&T) -> bool) -> bool {
        match self.queue.iter_mut().find(|q| matches(&q.task)) {
            Some(q) => {
                if let Readiness::HaltedUntil { wake_at_us } = &mut q.readiness {
                    *wake_at_us = 0;
                }
                true
            }
            None => false,
        }
    }
}

/// The typed byte that moves console input to the next VM (Ctrl-], as in Xen's console).
pub const SWITCH_INPUT: u8 = 0x1d;

/// The VM that gets console input after VM `current`: the next one still running, wrapping
/// around; `current` itself if it is the only one; `None` if none runs.
pub fn next_input_vm(running: &[bool], current: usize) -> Option<usize> {
    let count = running.len();
    (1..=count).map(|step| (current + step) % count).find(|&vm| running[vm])
}

/// No VM: what a CPU has run before its first vCPU.
pub const NO_VM: usize = usize::MAX;

/// Whether a CPU that last ran a vCPU of VM `last` (or [`NO_VM`]) must clear its branch
/// predictors before running one of VM `next`: only when they are different VMs.
pub fn needs_predictor_barrier(last: usize, next: usize) -> bool {
    last != NO_VM && last != next
}

/// Whether a host timer armed to fire at `armed` (TSC; 0: not armed) can stay as it is for
/// a caller who needs it at `wanted`: it has not fired yet (`now`) and fires no later than
/// `slack` after `wanted` (callers compute deadlines from a microsecond clock, so the same
/// deadline comes back a little different). An earlier one costs at most one extra exit;
/// re-arming costs two local-APIC writes, which under a nested hypervisor are exits of their
/// own, on every exit of the guest.
pub fn keeps_armed_timer(armed: u64, now: u64, wanted: u64, slack: u64) -> bool {
    armed != 0 && now < armed && armed <= wanted.saturating_add(slack)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_armed_timer_is_kept_only_when_it_fires_in_time() {
        assert!(keeps_armed_timer(1_000, 500, 1_000, 0), "the same deadline again");
        assert!(keeps_armed_timer(1_000, 500, 5_000, 0), "fires early: one extra exit at worst");
        assert!(!keeps_armed_timer(1_000, 500, 900, 0), "would fire too late");
        assert!(keeps_armed_timer(1_000, 500, 990, 10), "late, within the slack");
        assert!(!keeps_armed_timer(1_000, 500, 989, 10), "late beyond the slack");
        assert!(!keeps_armed_timer(1_000, 1_000, 5_000, 0), "has fired");
        assert!(!keeps_armed_timer(0, 500, 5_000, 0), "not armed");
        assert!(keeps_armed_timer(u64::MAX, 500, u64::MAX - 5, 10), "no overflow");
    }

    #[test]
    fn predictors_are_cleared_only_between_different_vms() {
        assert!(!needs_predictor_barrier(NO_VM, 0), "the first vCPU on a CPU");
        assert!(!needs_predictor_barrier(3, 3), "the same VM again (another vCPU of it too)");
        assert!(needs_predictor_barrier(3, 4));
        assert!(needs_predictor_barrier(4, 3));
    }

    #[test]
    fn input_moves_to_the_next_running_vm_and_wraps() {
        let running = [true, false, true, true];
        assert_eq!(next_input_vm(&running, 0), Some(2), "VM 1 has ended");
        assert_eq!(next_input_vm(&running, 3), Some(0), "wraps around");
        assert_eq!(next_input_vm(&[false, true], 1), Some(1), "the only one left keeps it");
        assert_eq!(next_input_vm(&[false, false], 0), None);
        assert_eq!(next_input_vm(&[], 0), None);
    }

    fn only(cpu: usize) -> CpuSet {
        let mut set = CpuSet::default();
        set.insert(cpu);
        set
    }

    #[test]
    fn round_robin_among_runnable_tasks() {
        let mut q = RunQueue::new();
        q.add('a', CpuSet::all());
        q.add('b', CpuSet::all());
        let (a, affinity) = q.take(0, 0).unwrap();
        assert_eq!(a, 'a');
        q.put_back(a, affinity, Readiness::Runnable);
        assert_eq!(q.take(0, 0).unwrap().0, 'b');
        assert_eq!(q.take(1, 0).unwrap().0, 'a');
        assert!(q.take(0, 0).is_none(), "both are out on CPUs");
        assert_eq!(q.live(), 2);
    }

    #[test]
    fn pinned_tasks_run_only_where_they_may() {
        let mut q = RunQueue::new();
        q.add("pinned", only(1));
        q.add("free", CpuSet::all());
        assert_eq!(q.take(0, 0).unwrap().0, "free", "CPU 0 skips the task pinned to CPU 1");
        assert!(q.take(0, 0).is_none());
        assert_eq!(q.next_wake_us(0), None);
        assert_eq!(q.next_wake_us(1), Some(0));
        assert_eq!(q.take(1, 0).unwrap().0, "pinned");
    }

    #[test]
    fn halted_tasks_wait_for_their_time_or_a_wake_up() {
        let mut q = RunQueue::new();
        q.add(1, CpuSet::all());
        q.add(2, CpuSet::all());
        let (one, all) = q.take(0, 0).unwrap();
        let (two, _) = q.take(0, 0).unwrap();
        q.put_back(one, all, Readiness::HaltedUntil { wake_at_us: 500 });
        q.put_back(two, all, Readiness::HaltedUntil { wake_at_us: 300 });
        assert!(q.take(0, 299).is_none());
        assert_eq!(q.next_wake_us(0), Some(300));
        assert_eq!(q.take(0, 300).unwrap().0, 2);
        assert!(q.wake(|&t| t == 1));
        assert!(!q.wake(|&t| t == 7));
        assert_eq!(q.take(0, 0).unwrap().0, 1, "woken before its time");
        q.finished();
        q.finished();
        assert_eq!(q.live(), 0);
    }

    #[test]
    fn a_task_whose_halt_ends_goes_first_and_cuts_the_running_slice() {
        let mut q = RunQueue::new();
        q.add("spinner", CpuSet::all());
        q.add("waiter", CpuSet::all());
        q.add("other", CpuSet::all());
        let (spinner, all) = q.take(0, 0).unwrap();
        let (waiter, _) = q.take(0, 0).unwrap();
        q.put_back(waiter, all, Readiness::HaltedUntil { wake_at_us: 1_000 });
        q.put_back(spinner, all, Readiness::Runnable);
        // The queue is other, waiter (halted), spinner: a slice started now ends at 1 ms.
        assert_eq!(q.next_halted_wake_us(0), Some(1_000));
        assert_eq!(q.take(0, 500).unwrap().0, "other", "the waiter is not due yet");
        assert_eq!(q.take(0, 1_000).unwrap().0, "waiter", "due: before the spinner queued ahead of it");
        assert_eq!(q.next_halted_wake_us(0), None);
        let (spinner, _) = q.take(0, 1_000).unwrap();
        q.put_back(spinner, all, Readiness::HaltedUntil { wake_at_us: u64::MAX });
        assert!(q.wake(|&t| t == "spinner"));
        assert_eq!(q.next_halted_wake_us(0), Some(0), "woken: due at once");
    }
}
