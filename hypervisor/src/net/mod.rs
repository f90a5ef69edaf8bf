//! Networks between VMs.
//!
//! Each named network of a VM set is one [`Switch`]: an Ethernet L2 switch whose ports are
//! added when the VM set is built, one per network interface attached to the network (a
//! virtio-net device, or the machine's own NIC on the network named [`UPLINK_NETWORK`]: a port
//! is only an index with a receive queue, whoever feeds and drains it; see [`uplink`]).
//!
//! The switch is shared between VMs running on different CPUs as a [`SharedSwitch`].
//! Lock order: a VM's own lock first, then the switch lock, never the reverse. A device takes
//! the switch lock from inside its VM (holding the VM lock) for one frame at a time; the switch
//! never calls out while locked. [`Switch::send`] returns the ports that just became non-empty,
//! and the sender wakes the VMs behind them only after releasing the switch lock and its own
//! VM lock, so no CPU ever holds two VM locks.

use alloc::sync::Arc;

pub mod switch;
pub mod uplink;

pub use switch::{Limits, Mac, PortCounters, PortId, PortSummary, Switch, MAX_FRAME_LEN, MIN_FRAME_LEN};
pub use uplink::{HostNic, NicError, Uplink, UplinkCounters, UPLINK_NETWORK};

/// A network as the VMs on it hold it.
pub type SharedSwitch = Arc<spin::Mutex<Switch>>;
