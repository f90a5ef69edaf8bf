//! A VM's disks: virtio-blk devices on its PCI bus over the images the configuration names.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::config::{DiskConfig, DiskSource};
use super::Vm;
use crate::devices::virtio::blk::{Block, RamOverlay};
use crate::devices::virtio::pci::VirtioPci;
use crate::loader::GuestMemory;
use crate::ramdisk::{self, File};

/// The guest's name for disk `index`: vda, vdb, ... (Linux names virtio disks in probe order,
/// which is slot order here).
pub fn disk_name(index: usize) -> String {
    format!("vd{}", char::from(b'a' + (index % 26) as u8))
}

/// Plugs one virtio-blk device per configured disk into `vm`'s PCI bus, in order. Each image
/// stays in the ramdisk; what the guest writes is kept in host memory page by page, at most as
/// much again as the image (the overlay's budget), and lost at power-off. Returns one line per
/// disk for the log.
pub fn attach_disks<M: GuestMemory>(
    vm: &mut Vm<M>,
    disks: &[DiskConfig],
    files: &[File<'static>],
) -> Result<Vec<String>, String> {
    let memory_size = vm.memory.size();
    let mut lines = Vec::new();
    for (index, disk) in disks.iter().enumerate() {
        let file = match &disk.source {
            DiskSource::Image(file) => file,
            DiskSource::HostRegion { .. } => {
                return Err(format!("disk {}: this hypervisor has no host disk driver yet", disk.source))
            }
        };
        let image = ramdisk::find(files, file).ok_or_else(|| format!("disk {file:?} is not in the ramdisk"))?.data;
        let name = disk_name(index);
        let mut backend = RamOverlay::new(image).with_budget(image.len() as u64);
        if disk.read_only {
            backend = backend.write_protected();
        }
        let block = Block::new(backend, file);
        let function = VirtioPci::new(block, &vm.name, &name, memory_size)
            .ok_or_else(|| format!("disk {file}: the virtio-blk device could not be built"))?;
        let pci = vm.bus.pci_host().ok_or("the VM has no PCI bus")?;
        let slot = pci.add_function(Box::new(function)).map_err(|e| format!("disk {file}: {e}"))?;
        lines.push(format!(
            "{name} = {file} ({} bytes{}) at PCI 00:{slot:02x}.0",
            image.len(),
            if disk.read_only { ", read-only" } else { "" }
        ));
    }
    Ok(lines)
}
