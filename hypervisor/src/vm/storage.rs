//! A VM's disks: virtio-blk devices on its PCI bus over the images the configuration names.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use super::config::{DiskConfig, DiskSource};
use super::Vm;
use crate::devices::virtio::blk::{Block, OverlayPool, RamOverlay};
use crate::host_disk::{HostRegion, SharedHostDisk};
use crate::loader::GuestMemory;
use crate::ramdisk::{self, File};

/// The guest's name for disk `index`: vda, vdb, ... (Linux names virtio disks in probe order,
/// which is slot order here).
pub fn disk_name(index: usize) -> String {
    format!("vd{}", char::from(b'a' + (index % 26) as u8))
}

/// Plugs one virtio-blk device per configured disk into `vm`'s PCI bus, in order. An image
/// stays in the ramdisk; what the guest writes to it is kept in host memory page by page, at
/// most as much again as the image (the overlay's budget), and lost at power-off. A
/// `host:START+LEN` region reads and writes those bytes of the machine's own disk
/// (`host_disk`), so its data outlives the run. Returns one line per disk for the log.
pub fn attach_disks<M: GuestMemory>(
    vm: &mut Vm<M>,
    disks: &[DiskConfig],
    files: &[File<'static>],
    host_disk: Option<SharedHostDisk>,
    overlay_pool: &Arc<OverlayPool>,
) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    for (index, disk) in disks.iter().enumerate() {
        let name = disk_name(index);
        let line = match &disk.source {
            DiskSource::Image(file) => {
                let image =
                    ramdisk::find(files, file).ok_or_else(|| format!("disk {file:?} is not in the ramdisk"))?.data;
                let mut backend =
                    RamOverlay::new(image).with_budget(image.len() as u64).with_pool(overlay_pool.clone());
                if disk.read_only {
                    backend = backend.write_protected();
                }
                let slot = vm.plug_virtio(Block::new(backend, file), &name).map_err(|e| format!("disk {file}: {e}"))?;
                format!(
                    "{name} = {file} ({} bytes{}) at PCI 00:{slot:02x}.0",
                    image.len(),
                    if disk.read_only { ", read-only" } else { "" }
                )
            }
            &DiskSource::Blank(len) => {
                // Zeros until written; what is written takes host memory, up to the size.
                let empty: &'static [u8] = &[];
                let mut backend =
                    RamOverlay::new(empty).with_capacity(len).with_budget(len).with_pool(overlay_pool.clone());
                if disk.read_only {
                    backend = backend.write_protected();
                }
                let id = format!("{}", disk.source);
                let slot = vm.plug_virtio(Block::new(backend, &id), &name).map_err(|e| format!("disk {id}: {e}"))?;
                format!("{name} = {id} (empty, in RAM) at PCI 00:{slot:02x}.0")
            }
            &DiskSource::HostRegion { start, len } => {
                let source = &disk.source;
                let refused = |why: &dyn core::fmt::Display| format!("vm {}: disk {source}: {why}", vm.name);
                let host_disk = host_disk.ok_or_else(|| {
                    refused(&"there is no host disk (the hypervisor was started without --disk FILE)")
                })?;
                let backend = HostRegion::new(host_disk, start, len, disk.read_only).map_err(|e| refused(&e))?;
                let read_only = match (disk.read_only, backend.device_read_only()) {
                    (true, _) => ", read-only",
                    (false, true) => ", read-only: the host disk is",
                    (false, false) => "",
                };
                let id = format!("{source}");
                let slot = vm.plug_virtio(Block::new(backend, &id), &name).map_err(|e| format!("disk {id}: {e}"))?;
                format!(
                    "{name} = {source} (host disk bytes {start:#x}..{:#x}{read_only}) at PCI 00:{slot:02x}.0",
                    start + len
                )
            }
        };
        lines.push(line);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use alloc::boxed::Box;
    use alloc::vec;

    use super::*;
    use crate::host_disk::{HostDisk, HostDiskError, HOST_SECTOR};
    use crate::loader::SliceMemory;

    fn pool() -> Arc<OverlayPool> {
        Arc::new(OverlayPool::new(1 << 20))
    }

    struct Zeros(u64);

    impl HostDisk for Zeros {
        fn sectors(&self) -> u64 {
            self.0
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_sectors(&mut self, _: u64, buf: &mut [u8]) -> Result<(), HostDiskError> {
            buf.fill(0);
            Ok(())
        }
        fn write_sectors(&mut self, _: u64, _: &[u8]) -> Result<(), HostDiskError> {
            Ok(())
        }
        fn flush(&mut self) -> Result<(), HostDiskError> {
            Ok(())
        }
    }

    fn vm() -> Vm<SliceMemory<'static>> {
        Vm::new("store", SliceMemory(vec![0u8; 16 << 20].leak()), 1_000_000_000, 0)
    }

    fn region(start_mib: u64, len_mib: u64, read_only: bool) -> DiskConfig {
        DiskConfig { source: DiskSource::HostRegion { start: start_mib << 20, len: len_mib << 20 }, read_only }
    }

    #[test]
    fn host_regions_need_a_host_disk_that_holds_them() {
        let e = attach_disks(&mut vm(), &[region(64, 256, false)], &[], None, &pool()).unwrap_err();
        assert_eq!(
            e,
            "vm store: disk host:64M+256M: there is no host disk (the hypervisor was started without --disk FILE)"
        );
        let disk: SharedHostDisk = Box::leak(Box::new(spin::Mutex::new(Zeros((128 << 20) / HOST_SECTOR))));
        let e = attach_disks(&mut vm(), &[region(64, 256, false)], &[], Some(disk), &pool()).unwrap_err();
        assert_eq!(e, "vm store: disk host:64M+256M: the host disk has 128 MiB");
        let lines =
            attach_disks(&mut vm(), &[region(0, 64, false), region(64, 64, true)], &[], Some(disk), &pool()).unwrap();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("vda = host:0M+64M (host disk bytes 0x0..0x4000000) at PCI 00:"), "{}", lines[0]);
        assert!(
            lines[1].contains("vdb = host:64M+64M (host disk bytes 0x4000000..0x8000000, read-only)"),
            "{}",
            lines[1]
        );
    }
}
