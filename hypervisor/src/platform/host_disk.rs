//! Finding the machine's own disk at start-up: the one the `host:START+LEN` disks of the VM
//! set are regions of (`boot run --disk FILE` attaches it).

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;

use super::ata_disk::AtaDisk;
use super::virtio_disk::VirtioDisk;
use crate::host_disk::{SharedHostDisk, HOST_SECTOR};

static DISK: spin::Once<Option<SharedHostDisk>> = spin::Once::new();

/// Looks for the host disk and logs one line about what it found. Runs on the boot CPU before
/// the others start (BARs above the physical-memory window get mapped here).
pub fn init() {
    DISK.call_once(|| {
        let (disk, what): (SharedHostDisk, String) = match VirtioDisk::probe() {
            Some(Ok(disk)) => {
                let at = disk.location;
                let what = format!("virtio-blk at {:02x}:{:02x}.{}", at.bus, at.device, at.function);
                (Box::leak(Box::new(spin::Mutex::new(disk))), what)
            }
            Some(Err(why)) => {
                log::warn!("host disk: a virtio-blk device is there but unusable: {why}; no host disk");
                return None;
            }
            None => match AtaDisk::probe() {
                Some(disk) => {
                    let what = format!("ATA {} (PIO, LBA48)", disk.name);
                    (Box::leak(Box::new(spin::Mutex::new(disk))), what)
                }
                None => {
                    log::info!("no host disk");
                    return None;
                }
            },
        };
        let (sectors, read_only) = {
            let disk = disk.lock();
            (disk.sectors(), disk.read_only())
        };
        log::info!(
            "host disk: {what}, {sectors} sectors ({} MiB){}",
            (sectors * HOST_SECTOR) >> 20,
            if read_only { ", read-only" } else { "" }
        );
        Some(disk)
    });
}

/// The host disk, if [`init`] found one.
pub fn get() -> Option<SharedHostDisk> {
    DISK.get().copied().flatten()
}
