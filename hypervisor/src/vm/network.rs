//! A VM set's networks: one L2 switch per network name, shared by the VMs that join it, and
//! the virtio-net devices that are its ports.
//!
//! A frame a VM sends lands in the destination port's queue during the sender's exit; the
//! receiving VM takes it into its own receive ring when one of its vCPUs next serves its
//! devices. So that this happens soon even when the receiver is halted, the switch's network
//! keeps a waker per port, which the platform sets once the receiving VM exists (it kicks the
//! VM's vCPU 0). Lock order: a VM's own lock, then the switch, then the wakers; a waker is
//! called with no lock of this module held, and takes only the scheduler's queue lock, which is
//! never held while a VM lock is taken.
//!
//! The network named [`UPLINK_NETWORK`] is bridged to the machine's NIC when the platform has
//! one ([`Networks::bridge_uplink`]): the NIC's port is polled by the host, and its waker
//! polls it right after a VM sent a frame there. Without a NIC, a VM naming that network is
//! refused.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use spin::Mutex;

use super::config::{format_mac, NicConfig};
use super::Vm;
use crate::devices::virtio::net::Net;
use crate::loader::GuestMemory;
use crate::net::switch::{PortId, Switch};
use crate::net::UPLINK_NETWORK;

/// Wakes the VM behind one port.
pub type Waker = Box<dyn Fn() + Send + Sync>;
/// A waker as the network keeps it: callable without the wakers' lock held.
type SharedWaker = Arc<dyn Fn() + Send + Sync>;

/// One network: its switch and the wakers of its ports.
#[derive(Clone)]
pub struct Network {
    /// The switch every port of the network shares.
    pub switch: Arc<Mutex<Switch>>,
    wakers: Arc<Mutex<Vec<Option<SharedWaker>>>>,
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
        wakers[port] = Some(Arc::from(waker));
    }

    /// Wakes the VM behind `port`, if it has a waker. The waker runs after the wakers' lock is
    /// released, so it may wake other ports itself.
    pub fn wake(&self, port: PortId) {
        let waker = self.wakers.lock().get(port).cloned().flatten();
        if let Some(waker) = waker {
            waker();
        }
    }
}

/// The networks of a VM set, by name, created as VMs join them.
#[derive(Default)]
pub struct Networks {
    list: Vec<(String, Network)>,
    /// [`UPLINK_NETWORK`] is bridged to the machine's NIC.
    uplink: bool,
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

    /// The network [`UPLINK_NETWORK`], from now on bridged to the machine's NIC: the caller adds
    /// the NIC's port to its switch and polls it. Until this is called, VMs cannot join it.
    pub fn bridge_uplink(&mut self) -> Network {
        self.uplink = true;
        self.get(UPLINK_NETWORK)
    }

    /// Whether [`UPLINK_NETWORK`] is bridged to a NIC.
    pub fn has_uplink(&self) -> bool {
        self.uplink
    }
}

/// Why a VM on [`UPLINK_NETWORK`] is refused on a machine without a NIC.
pub const NO_UPLINK: &str = "the machine has no NIC to bridge the network to (a virtio-net PCI device: \
    under QEMU, boot run adds one when the VM set uses the uplink; Bochs has none)";

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
    if let Some(nic) = nics.iter().find(|nic| nic.network == UPLINK_NETWORK && !networks.has_uplink()) {
        return Err(format!("net {}: {NO_UPLINK}", nic.network));
    }
    for (index, nic) in nics.iter().enumerate() {
        let network = networks.get(&nic.network);
        let port = network.switch.lock().add_port();
        let waking = network.clone();
        let device = Net::new(nic.mac, network.switch.clone(), port).with_waker(Arc::new(move |p| waking.wake(p)));
        let name = format!("eth{index}");
        let slot = vm.plug_virtio(device, &name).map_err(|e| format!("net {}: {e}", nic.network))?;
        lines.push(format!(
            "{name} on network {} (port {port}), MAC {}, at PCI 00:{slot:02x}.0",
            nic.network,
            format_mac(&nic.mac)
        ));
        ports.push(Port { network, port });
    }
    Ok((ports, lines))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::SliceMemory;
    use alloc::vec;
    use core::sync::atomic::{AtomicUsize, Ordering};

    fn nic(network: &str, last: u8) -> NicConfig {
        NicConfig { network: network.into(), mac: [0x52, 0x54, 0, 0x12, 0, last], ip: None }
    }

    #[test]
    fn the_uplink_network_needs_a_bridged_nic() {
        let mut ram = vec![0u8; 4 << 20];
        let mut vm = Vm::new("web", SliceMemory(&mut ram), 1_000_000_000, 0);
        let mut networks = Networks::new();
        let e = attach_nics(&mut vm, &[nic("lan", 0), nic(UPLINK_NETWORK, 1)], &mut networks).err().unwrap();
        assert_eq!(e, alloc::format!("net uplink: {NO_UPLINK}"));
        assert_eq!(networks.get("lan").switch.lock().port_count(), 0, "nothing was attached");

        let uplink = networks.bridge_uplink();
        let nic_port = uplink.switch.lock().add_port();
        let (ports, lines) = attach_nics(&mut vm, &[nic(UPLINK_NETWORK, 1)], &mut networks).unwrap();
        assert!(networks.has_uplink());
        assert_eq!((ports.len(), ports[0].port, nic_port), (1, 1, 0));
        assert!(lines[0].starts_with("eth0 on network uplink (port 1), MAC 52:54:00:12:00:01"), "{}", lines[0]);
    }

    #[test]
    fn a_waker_may_wake_other_ports_of_its_network() {
        let mut networks = Networks::new();
        let network = networks.get("lan");
        let woken = Arc::new(AtomicUsize::new(0));
        let count = woken.clone();
        network.set_waker(1, Box::new(move || _ = count.fetch_add(1, Ordering::Relaxed)));
        // Port 0's waker (an uplink's poll, say) delivers to port 1 and wakes it.
        let inner = network.clone();
        network.set_waker(0, Box::new(move || inner.wake(1)));
        network.wake(0);
        network.wake(5);
        assert_eq!(woken.load(Ordering::Relaxed), 1);
    }
}
