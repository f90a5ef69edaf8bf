//! A VM set's networks: one L2 switch per network name, shared by the VMs that join it, and
//! the virtio-net devices that are its ports.
//!
//! A frame a VM sends lands in the destination port's queue during the sender's exit; the
//! receiving VM takes it into its own receive ring when one of its vCPUs next serves its
//! devices. So that this happens soon even when the receiver is halted, the switch's network
//! keeps a waker per port, which the platform sets once the receiving VM exists (it kicks the
//! VM's vCPU 0). Lock order: a VM's own lock, then the switch, then the wakers; the wakers
//! take only the scheduler's queue lock, which is never held while a VM lock is taken.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use spin::Mutex;

use super::config::{format_mac, NicConfig};
use super::Vm;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::pci::VirtioPci;
use crate::loader::GuestMemory;
use crate::net::switch::{PortId, Switch};

/// Wakes the VM behind one port.
pub type Waker = Box<dyn Fn() + Send + Sync>;

/// One network: its switch and the wakers of its ports.
#[derive(Clone)]
pub struct Network {
    /// The switch every port of the network shares.
    pub switch: Arc<Mutex<Switch>>,
    wakers: Arc<Mutex<Vec<Option<Waker>>>>,
}

impl Network {
    fn new(name: &str) -> Self {
        Network { switch: Arc::new(Mutex::new(Switch::new(name))), wakers: Arc::new(Mutex::new(Vec::new())) }
    }

    /// Sets what wakes the VM behind `port`.
    pub fn set_waker(&self, port: PortId, waker: Waker) {
        let mut wakers = self.wakers.lock();
        if wakers.len() <= port {
            wakers.resize_with(port + 1, || None);
        }
        wakers[port] = Some(waker);
    }

    /// Wakes the VM behind `port`, if it has a waker.
    pub fn wake(&self, port: PortId) {
        if let Some(Some(waker)) = self.wakers.lock().get(port) {
            waker();
        }
    }
}

/// The networks of a VM set, by name, created as VMs join them.
#[derive(Default)]
pub struct Networks {
    list: Vec<(String, Network)>,
}

impl Networks {
    /// No networks yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The network `name`, created on first use.
    pub fn get(&mut self, name: &str) -> Network {
        if let Some((_, network)) = self.list.iter().find(|(n, _)| n == name) {
            return network.clone();
        }
        let network = Network::new(name);
        self.list.push((name.into(), network.clone()));
        network
    }
}

/// A VM's port on a network, for setting its waker once the VM exists.
pub struct Port {
    /// The network.
    pub network: Network,
    /// The VM's port on its switch.
    pub port: PortId,
}

/// Plugs one virtio-net device per configured NIC into `vm`'s PCI bus, each a new port of its
/// network's switch. Returns the ports and one line per NIC for the log.
pub fn attach_nics<M: GuestMemory>(
    vm: &mut Vm<M>,
    nics: &[NicConfig],
    networks: &mut Networks,
) -> Result<(Vec<Port>, Vec<String>), String> {
    let mut ports = Vec::new();
    let mut lines = Vec::new();
    for (index, nic) in nics.iter().enumerate() {
        let network = networks.get(&nic.network);
        let port = network.switch.lock().add_port();
        let waking = network.clone();
        let device = Net::new(nic.mac, network.switch.clone(), port).with_waker(Arc::new(move |p| waking.wake(p)));
        let name = format!("eth{index}");
        let function = VirtioPci::new(device, &vm.name, &name, vm.memory.size())
            .ok_or_else(|| format!("net {}: the virtio-net device could not be built", nic.network))?;
        let pci = vm.bus.pci_host().ok_or("the VM has no PCI bus")?;
        let slot = pci.add_function(Box::new(function)).map_err(|e| format!("net {}: {e}", nic.network))?;
        lines.push(format!(
            "{name} on network {} (port {port}), MAC {}, at PCI 00:{slot:02x}.0",
            nic.network,
            format_mac(&nic.mac)
        ));
        ports.push(Port { network, port });
    }
    Ok((ports, lines))
}
