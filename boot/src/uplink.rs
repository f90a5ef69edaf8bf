//! The uplink under QEMU: the hypervisor bridges the VM set's network `uplink` to the
//! machine's NIC, which here is a virtio-net-pci device on QEMU's user network (`-netdev user`:
//! 10.0.2.0/24, gateway and host at 10.0.2.2, DNS at 10.0.2.3). QEMU gets it whenever a VM
//! of the set is on the uplink or `--forward` is given.
//!
//! `--forward HOSTPORT:VM:GUESTPORT` makes TCP port GUESTPORT of VM reachable from the host at
//! 127.0.0.1:HOSTPORT (QEMU's `hostfwd`). QEMU forwards to an address, which is the one the VM's
//! uplink NIC records in its configuration, `net = uplink ip=10.0.2.15`: the address the guest
//! gives itself (the hypervisor does not configure guests). Bochs has no virtio-net device, so
//! the uplink is QEMU-only.

use std::ffi::OsString;
use std::fmt;

use hypervisor::net::UPLINK_NETWORK;
use hypervisor::vm::config::VmConfig;

use crate::{BootError, Platform, RamdiskFiles, VM_CONFIG_FILE};

/// QEMU's user network: 10.0.2.0/24.
const USER_NET: [u8; 3] = [10, 0, 2];
/// Addresses of the user network that are QEMU's own or not a host's: the network, the
/// gateway, the DNS server and the broadcast address.
const USER_NET_RESERVED: [u8; 4] = [0, 2, 3, 255];

/// One `--forward HOSTPORT:VM:GUESTPORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    /// The port on the host's 127.0.0.1.
    pub host_port: u16,
    /// The VM of the set whose uplink address is forwarded to.
    pub vm: String,
    /// The guest's TCP port.
    pub guest_port: u16,
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.host_port, self.vm, self.guest_port)
    }
}

/// A TCP port, 1 to 65535, in decimal digits only.
fn port(text: &str) -> Option<u16> {
    (!text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse::<u16>().ok())
        .flatten()
        .filter(|&port| port != 0)
}

impl Forward {
    /// Parses `HOSTPORT:VM:GUESTPORT`.
    pub fn parse(text: &str) -> Result<Self, BootError> {
        let usage = |why: &str| {
            BootError::Usage(format!("--forward {text:?}: {why} (expected HOSTPORT:VM:GUESTPORT, like 8080:web:80)"))
        };
        let parts: Vec<&str> = text.split(':').collect();
        let [host, vm, guest] = parts[..] else { return Err(usage("not three fields")) };
        let host_port =
            port(host).ok_or_else(|| usage(&format!("host port {host:?} is not a port from 1 to 65535")))?;
        let guest_port =
            port(guest).ok_or_else(|| usage(&format!("guest port {guest:?} is not a port from 1 to 65535")))?;
        if vm.is_empty() || !vm.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(usage(&format!("{vm:?} is not a VM name (letters, digits, '-' or '_')")));
        }
        Ok(Forward { host_port, vm: vm.to_string(), guest_port })
    }
}

/// One forward with the guest's address resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostForward {
    /// The port on the host's 127.0.0.1.
    pub host_port: u16,
    /// The guest's address on the user network.
    pub guest_ip: [u8; 4],
    /// The guest's TCP port.
    pub guest_port: u16,
}

/// What QEMU gets for the uplink: the user network and its forwards.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UplinkPlan {
    /// The forwards, in the order given.
    pub forwards: Vec<HostForward>,
}

fn dotted(ip: [u8; 4]) -> String {
    let [a, b, c, d] = ip;
    format!("{a}.{b}.{c}.{d}")
}

/// The VMs of the set in the ramdisk (none without a `vms.conf`).
pub fn vms_of(ramdisk: &RamdiskFiles) -> Result<Vec<VmConfig>, BootError> {
    let Some((_, text)) = ramdisk.iter().find(|(name, _)| name == VM_CONFIG_FILE) else { return Ok(Vec::new()) };
    let text = std::str::from_utf8(text).map_err(|_| BootError::Config(format!("{VM_CONFIG_FILE}: not UTF-8")))?;
    hypervisor::vm::config::parse(text).map_err(|e| BootError::Config(format!("{VM_CONFIG_FILE}: {e}")))
}

/// Whether a VM of the set is on the uplink network.
pub fn uses_uplink(vms: &[VmConfig]) -> bool {
    vms.iter().any(|vm| vm.nics.iter().any(|nic| nic.network == UPLINK_NETWORK))
}

/// The uplink QEMU needs for the VM set in `ramdisk` and `forwards`, checked: `None` when no
/// VM is on the uplink and nothing is forwarded, or on Bochs (which has no virtio-net; a
/// forward there is a usage error).
pub fn plan(platform: Platform, ramdisk: &RamdiskFiles, forwards: &[Forward]) -> Result<Option<UplinkPlan>, BootError> {
    let vms = vms_of(ramdisk)?;
    if platform == Platform::Bochs {
        if let Some(first) = forwards.first() {
            return Err(BootError::Usage(format!(
                "--forward {first}: forwarding needs QEMU's user network, and Bochs has no virtio-net device for \
                 the uplink: use --platform tcg or kvm"
            )));
        }
        return Ok(None);
    }
    if forwards.is_empty() && !uses_uplink(&vms) {
        return Ok(None);
    }
    let mut plan = UplinkPlan::default();
    for (index, forward) in forwards.iter().enumerate() {
        let refuse = |why: String| BootError::Usage(format!("--forward {forward}: {why}"));
        if let Some(earlier) = forwards[..index].iter().find(|f| f.host_port == forward.host_port) {
            return Err(refuse(format!("host port {} is already forwarded by {earlier}", forward.host_port)));
        }
        let Some(vm) = vms.iter().find(|vm| vm.name == forward.vm) else {
            let names: Vec<&str> = vms.iter().map(|vm| vm.name.as_str()).collect();
            return Err(refuse(if names.is_empty() {
                "the VM set has no VMs (give one with --vms FILE)".to_string()
            } else {
                format!("the VM set has no VM named {} (its VMs: {})", forward.vm, names.join(", "))
            }));
        };
        let Some(nic) = vm.nics.iter().find(|nic| nic.network == UPLINK_NETWORK) else {
            return Err(refuse(format!(
                "vm {} is not on the uplink network (give it net = {UPLINK_NETWORK} ip=10.0.2.15)",
                vm.name
            )));
        };
        let Some(ip) = nic.ip else {
            return Err(refuse(format!(
                "vm {}'s uplink NIC has no address: write net = {UPLINK_NETWORK} ip=ADDRESS with the address the \
                 guest gives itself, like 10.0.2.15",
                vm.name
            )));
        };
        if ip[..3] != USER_NET || USER_NET_RESERVED.contains(&ip[3]) {
            return Err(refuse(format!(
                "vm {}'s uplink address {} is not a guest address of QEMU's user network (10.0.2.4 to 10.0.2.254, \
                 or 10.0.2.1; 10.0.2.2 is the gateway, 10.0.2.3 the DNS server)",
                vm.name,
                dotted(ip)
            )));
        }
        plan.forwards.push(HostForward { host_port: forward.host_port, guest_ip: ip, guest_port: forward.guest_port });
    }
    Ok(Some(plan))
}

/// QEMU's arguments for the uplink: the user network with its forwards, and the virtio-net
/// device on it (without its boot ROM: the firmware must not try to boot from the network).
pub fn qemu_args(plan: &UplinkPlan) -> Vec<OsString> {
    let mut netdev = String::from("user,id=uplink");
    for f in &plan.forwards {
        netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-{}:{}", f.host_port, dotted(f.guest_ip), f.guest_port));
    }
    ["-netdev", &netdev, "-device", "virtio-net-pci,netdev=uplink,romfile="].map(OsString::from).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramdisk(config: &str) -> RamdiskFiles {
        vec![(VM_CONFIG_FILE.to_string(), config.as_bytes().to_vec())]
    }

    fn forwards(specs: &[&str]) -> Vec<Forward> {
        specs.iter().map(|s| Forward::parse(s).unwrap()).collect()
    }

    const SET: &str = "[vm web]\nkernel = k\nnet = lan, uplink ip=10.0.2.15\n\
                       [vm db]\nkernel = k\nnet = uplink ip=10.0.2.16\n\
                       [vm bare]\nkernel = k\nnet = uplink\n\
                       [vm lan-only]\nkernel = k\nnet = lan\n";

    #[test]
    fn forwards_parse_as_hostport_vm_guestport() {
        assert_eq!(
            Forward::parse("8080:web:80").unwrap(),
            Forward { host_port: 8080, vm: "web".into(), guest_port: 80 }
        );
        assert_eq!(Forward::parse("1:a-b_c:65535").unwrap().to_string(), "1:a-b_c:65535");
        for (bad, why) in [
            ("8080:web", "not three fields"),
            ("8080:web:80:1", "not three fields"),
            ("0:web:80", "host port \"0\" is not a port from 1 to 65535"),
            ("65536:web:80", "host port \"65536\" is not a port from 1 to 65535"),
            ("+80:web:80", "host port \"+80\" is not a port from 1 to 65535"),
            (":web:80", "host port \"\" is not a port from 1 to 65535"),
            ("80:web:0", "guest port \"0\" is not a port from 1 to 65535"),
            ("80:web:http", "guest port \"http\" is not a port from 1 to 65535"),
            ("80:web:999999", "guest port \"999999\" is not a port from 1 to 65535"),
            ("80::80", "\"\" is not a VM name (letters, digits, '-' or '_')"),
            ("80:w b:80", "\"w b\" is not a VM name (letters, digits, '-' or '_')"),
        ] {
            let e = Forward::parse(bad).unwrap_err();
            assert!(matches!(e, BootError::Usage(_)), "{bad}");
            assert_eq!(
                e.to_string(),
                format!("--forward {bad:?}: {why} (expected HOSTPORT:VM:GUESTPORT, like 8080:web:80)")
            );
        }
    }

    #[test]
    fn forwards_are_resolved_to_the_vms_uplink_address() {
        let plan = plan(Platform::Tcg, &ramdisk(SET), &forwards(&["8080:web:80", "2222:db:22", "8081:web:8080"]))
            .unwrap()
            .unwrap();
        assert_eq!(
            plan.forwards,
            [
                HostForward { host_port: 8080, guest_ip: [10, 0, 2, 15], guest_port: 80 },
                HostForward { host_port: 2222, guest_ip: [10, 0, 2, 16], guest_port: 22 },
                HostForward { host_port: 8081, guest_ip: [10, 0, 2, 15], guest_port: 8080 },
            ]
        );
        let args: Vec<String> = qemu_args(&plan).into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(
            args,
            [
                "-netdev",
                "user,id=uplink,hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80,hostfwd=tcp:127.0.0.1:2222-10.0.2.16:22,\
                 hostfwd=tcp:127.0.0.1:8081-10.0.2.15:8080",
                "-device",
                "virtio-net-pci,netdev=uplink,romfile=",
            ]
        );
    }

    #[test]
    fn the_uplink_is_there_when_a_vm_uses_it_and_only_under_qemu() {
        let uplink = plan(Platform::Kvm, &ramdisk(SET), &[]).unwrap().unwrap();
        assert!(uplink.forwards.is_empty());
        let args: Vec<String> = qemu_args(&uplink).into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(args, ["-netdev", "user,id=uplink", "-device", "virtio-net-pci,netdev=uplink,romfile="]);
        let lan = ramdisk("[vm a]\nkernel = k\nnet = lan\n");
        assert_eq!(plan(Platform::Tcg, &lan, &[]).unwrap(), None);
        assert_eq!(plan(Platform::Tcg, &Vec::new(), &[]).unwrap(), None, "no VM set");
        assert_eq!(plan(Platform::Bochs, &ramdisk(SET), &[]).unwrap(), None, "Bochs has no virtio-net");
        let e = plan(Platform::Bochs, &ramdisk(SET), &forwards(&["8080:web:80"])).unwrap_err();
        assert!(matches!(e, BootError::Usage(_)));
        assert_eq!(
            e.to_string(),
            "--forward 8080:web:80: forwarding needs QEMU's user network, and Bochs has no virtio-net device for the \
             uplink: use --platform tcg or kvm"
        );
    }

    #[test]
    fn forwards_are_checked_against_the_vm_set() {
        let refused = |set: &str, specs: &[&str]| plan(Platform::Tcg, &ramdisk(set), &forwards(specs)).unwrap_err();
        let e = refused(SET, &["8080:nowhere:80"]);
        assert!(matches!(e, BootError::Usage(_)));
        assert_eq!(
            e.to_string(),
            "--forward 8080:nowhere:80: the VM set has no VM named nowhere (its VMs: web, db, bare, lan-only)"
        );
        assert_eq!(
            plan(Platform::Tcg, &Vec::new(), &forwards(&["80:web:80"])).unwrap_err().to_string(),
            "--forward 80:web:80: the VM set has no VMs (give one with --vms FILE)"
        );
        assert_eq!(
            refused(SET, &["8080:lan-only:80"]).to_string(),
            "--forward 8080:lan-only:80: vm lan-only is not on the uplink network (give it net = uplink ip=10.0.2.15)"
        );
        assert_eq!(
            refused(SET, &["8080:bare:80"]).to_string(),
            "--forward 8080:bare:80: vm bare's uplink NIC has no address: write net = uplink ip=ADDRESS with the \
             address the guest gives itself, like 10.0.2.15"
        );
        assert_eq!(
            refused(SET, &["8080:web:80", "8081:db:80", "8080:db:22"]).to_string(),
            "--forward 8080:db:22: host port 8080 is already forwarded by 8080:web:80"
        );
        for outside in ["10.0.3.15", "10.0.2.2", "10.0.2.3", "10.0.2.0", "10.0.2.255", "192.168.1.2"] {
            let set = format!("[vm v]\nkernel = k\nnet = uplink ip={outside}\n");
            let e = refused(&set, &["80:v:80"]);
            assert!(e.to_string().contains(&format!("uplink address {outside} is not a guest address")), "{e}");
        }
        let set = "[vm v]\nkernel = k\nnet = uplink ip=10.0.2.1\n";
        assert!(plan(Platform::Tcg, &ramdisk(set), &forwards(&["80:v:80"])).is_ok());
        let bad_set = ramdisk("[vm v]\nkernel = k\nnet = uplink ip=10.0.2\n");
        assert!(matches!(plan(Platform::Tcg, &bad_set, &[]), Err(BootError::Config(_))));
    }
}
