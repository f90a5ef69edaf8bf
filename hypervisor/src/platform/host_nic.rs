//! The machine's own NIC and the uplink network bridged to it (see `crate::net::uplink`).
//!
//! [`init`] looks for the NIC at start-up. When the VM set has VMs on the uplink network,
//! [`bridge`] gives its switch the NIC's port, and from then on every CPU calls [`poll`]: in
//! the scheduler loop between slices, when it wakes from idle (idle CPUs wake at least every
//! [`POLL_INTERVAL_US`] while the uplink exists), and right after a VM sent a frame to the
//! uplink port (the port's waker). Polling takes the uplink with `try_lock`: a CPU that finds
//! another polling goes on with its own work rather than wait; the frames wait for the next
//! poll in their bounded queues.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, Ordering};

use spin::Mutex;

use super::virtio_nic::VirtioNic;
use crate::net::{HostNic, Uplink};
use crate::vm::config::format_mac;
use crate::vm::network::{Network, Networks};

/// How often an idle CPU wakes to poll the NIC while the uplink exists.
pub const POLL_INTERVAL_US: u64 = 1000;

/// The NIC, until [`bridge`] moves it into the uplink.
static NIC: Mutex<Option<VirtioNic>> = Mutex::new(None);
/// The uplink: the NIC and the network it is bridged to.
static UPLINK: spin::Once<(Mutex<Uplink<VirtioNic>>, Network)> = spin::Once::new();
/// Set once the uplink exists: CPUs poll it.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Looks for the NIC and logs one line about what it found. Runs on the boot CPU before the
/// others start (its BARs may get mapped here).
pub fn init() {
    let found = match VirtioNic::probe() {
        Some(Ok(nic)) => nic,
        Some(Err(why)) => {
            log::warn!("host NIC: a virtio-net device is there but unusable: {why}; no host NIC");
            return;
        }
        None => {
            log::info!("no host NIC");
            return;
        }
    };
    let at = found.location;
    log::info!(
        "host NIC: virtio-net at {:02x}:{:02x}.{}, MAC {}",
        at.bus,
        at.device,
        at.function,
        format_mac(&found.mac())
    );
    *NIC.lock() = Some(found);
}

/// Bridges the uplink network of `networks` to the NIC, if [`init`] found one; without one,
/// VMs on the uplink network are refused when they are built.
pub fn bridge(networks: &mut Networks) {
    let Some(nic) = NIC.lock().take() else { return };
    let network = networks.bridge_uplink();
    let port = network.switch.lock().add_port();
    UPLINK.call_once(|| (Mutex::new(Uplink::new(nic, port)), network.clone()));
    // A frame a VM sends to the uplink goes out during that VM's exit, if no CPU is polling.
    network.set_waker(port, Box::new(poll));
    ACTIVE.store(true, Ordering::Release);
    log::info!("uplink: network {} bridged to the host NIC (port {port})", network.switch.lock().name());
}

/// Whether an uplink exists (CPUs must poll it).
pub fn active() -> bool {
    ACTIVE.load(Ordering::Acquire)
}

/// Moves frames between the NIC and the uplink network, unless another CPU is doing it; then
/// wakes the VMs that got frames, with no lock held.
pub fn poll() {
    if !active() {
        return;
    }
    let Some((uplink, network)) = UPLINK.get() else { return };
    let Some(mut uplink) = uplink.try_lock() else { return };
    let woken = uplink.poll(&network.switch);
    drop(uplink);
    for port in woken {
        network.wake(port);
    }
}

/// One line for the end of the run: what the uplink moved.
pub fn report() {
    let Some((uplink, network)) = UPLINK.get() else { return };
    // The run is ending: a CPU still polling finishes within one batch; should it somehow not,
    // the report is left out rather than the end waiting for it.
    let Some(uplink) = (0..1_000_000).find_map(|_| uplink.try_lock()) else { return };
    let counters = network.switch.try_lock().and_then(|switch| switch.counters(uplink.port()));
    let dropped = counters.map_or(0, |c| c.dropped_queue_full);
    log::info!(
        "uplink: {}; {dropped} frames for the wire dropped while the NIC was busy{}",
        uplink.counters(),
        uplink.first_error().map(|e| alloc::format!("; the NIC refused frames: {e}")).unwrap_or_default()
    );
}
