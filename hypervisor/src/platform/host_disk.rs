//! Finding the machine's own disk at start-up: the one the `host:START+LEN` disks of the VM
//! set are regions of (`boot run --disk FILE` attaches it).

use alloc::boxed::Box;

use super::virtio_disk::VirtioDisk;
use crate::host_disk::{HostDisk, SharedHostDisk, HOST_SECTOR};

static DISK: spin::Once<Option<SharedHostDisk>> = spin::Once::new();

/// Looks for the host disk and logs one line about what it found. Runs on the boot CPU before
/// the others start (BARs above the physical-memory window get mapped here).
pub fn init() {
    DISK.call_once(|| {
        let found = match VirtioDisk::probe() {
            Some(Ok(disk)) => disk,
            Some(Err(why)) => {
                log::warn!("host disk: a virtio-blk device is there but unusable: {why}; no host disk");
                return None;
            }
            None => {
                log::info!("no host disk");
                return None;
            }
        };
        let at = found.location;
        log::info!(
            "host disk: virtio-blk at {:02x}:{:02x}.{}, {} sectors ({} MiB){}",
            at.bus,
            at.device,
            at.function,
            found.sectors(),
            (found.sectors() * HOST_SECTOR) >> 20,
            if found.read_only() { ", read-only" } else { "" }
        );
        let shared: SharedHostDisk = Box::leak(Box::new(spin::Mutex::new(found)));
        Some(shared)
    });
}

/// The host disk, if [`init`] found one.
pub fn get() -> Option<SharedHostDisk> {
    DISK.get().copied().flatten()
}
