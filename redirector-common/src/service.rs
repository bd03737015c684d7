//! Services, their backend slots and the backends themselves.
//!
//! Modelled on Cilium's `lb4` maps: one hash map holds, for every service port,
//! a master entry (`slot == 0`) with the number of backends, and entries for
//! slots `1..=count` naming a backend ID and, so that a new flow needs no
//! further lookup, the backend's address. A master entry of a port with at
//! most [`INLINE_BACKENDS`] slots also carries copies of them, so a new flow
//! to a small service needs no slot lookup at all (most services have a few
//! endpoints, and at 100k services each lookup is a cache miss). Slots after
//! `count` name the port's draining backends ([`BACKEND_FLAG_DRAINING`]),
//! which new flows never pick (and the master does not copy); they are kept
//! there so that a restarted agent finds them again. Backends also live in
//! their own map, which says whether a backend ID still exists (an opening
//! packet on a flow whose backend is gone picks again). The writer fills
//! backends and slots before the master entry points at them (its copies are
//! written with it, at once) and removes them only after the master entry
//! shrank, so the datapath never sees a half-programmed service.

/// Service port → backend slots. Key [`ServiceKey`], value [`ServiceEntry`].
/// V3: master entries carry their slots inline.
pub const SERVICE_MAP: &str = "SVC_V3";

/// Slots a master entry carries inline (see the module's documentation).
pub const INLINE_BACKENDS: usize = 3;
/// Backend ID → address. Key `u32` (host order, never 0), value [`Backend`].
pub const BACKEND_MAP: &str = "BACKEND_V1";
/// Service address → [`VipEntry`]; tells "a service address on an undefined
/// port" (dropped) from "not a service address" (passed).
pub const VIP_MAP: &str = "VIP_V1";

/// The master entry of a service port.
pub const MASTER_SLOT: u16 = 0;

/// [`ServiceEntry::flags`] of a master entry with no slots: the service has
/// endpoints, but none this node may use (`internalTrafficPolicy: Local` and
/// all of them on other nodes), so new flows are dropped, as kube-proxy's
/// "has no local endpoints" DROP, instead of refused.
pub const FLAG_NO_LOCAL_ENDPOINTS: u16 = 1 << 0;

#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, bytemuck::Pod, bytemuck::Zeroable,
)]
pub struct ServiceKey {
    /// Service IPv4 address, network byte order.
    pub addr: u32,
    /// Service port, network byte order.
    pub port: u16,
    /// 0 for the master entry, 1..=count for backend slots, beyond `count`
    /// the draining backends; host byte order.
    pub slot: u16,
    /// [`crate::proto`] number.
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 12);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ServiceEntry {
    /// Slot entries: the backend ID (host order). Master entry: the session
    /// affinity timeout in seconds, 0 for none (as Cilium's `lb4_service`
    /// keeps it there).
    pub backend_id: u32,
    /// Master entry: number of backend slots; 0 means "no endpoints" and the
    /// datapath refuses new flows (drops them with
    /// [`FLAG_NO_LOCAL_ENDPOINTS`]). Host byte order.
    pub count: u16,
    /// Master entry: `FLAG_*` bits (others reserved, e.g. for affinity).
    /// Slots: 0. Host order.
    pub flags: u16,
    /// Stable ID of the service port (host order, never 0), shared by the
    /// master and its slots; indexes per-service statistics.
    pub svc_id: u32,
    /// Slot entries: the backend's IPv4 address, network byte order. Master: 0.
    pub backend_addr: u32,
    /// Slot entries: the backend's port, network byte order. Master: 0.
    pub backend_port: u16,
    pub _pad: [u8; 2],
    /// Master entry with `count <= INLINE_BACKENDS`: slots `1..=count`,
    /// copied; the rest zero. Otherwise (and in slot entries) all zero.
    pub inline: [InlineSlot; INLINE_BACKENDS],
}
const _: () = assert!(core::mem::size_of::<ServiceEntry>() == 20 + 12 * INLINE_BACKENDS);

/// A slot as a master entry carries it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct InlineSlot {
    /// Backend ID (host order); 0 in an unused copy.
    pub backend_id: u32,
    /// Backend IPv4 address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<InlineSlot>() == 12);

impl ServiceEntry {
    /// The master entry of a service port with `count` slots.
    pub const fn master(count: u16, svc_id: u32) -> Self {
        Self {
            backend_id: 0,
            count,
            flags: 0,
            svc_id,
            backend_addr: 0,
            backend_port: 0,
            _pad: [0; 2],
            inline: [InlineSlot::EMPTY; INLINE_BACKENDS],
        }
    }

    /// A slot naming backend `backend_id` at `addr:port` (network order).
    pub const fn slot(backend_id: u32, svc_id: u32, addr: u32, port: u16) -> Self {
        Self {
            backend_id,
            count: 0,
            flags: 0,
            svc_id,
            backend_addr: addr,
            backend_port: port,
            _pad: [0; 2],
            inline: [InlineSlot::EMPTY; INLINE_BACKENDS],
        }
    }

    /// Slot `slot` (`1..=count`) of a master entry whose slots are inline,
    /// as a slot entry; `None` for a slot it does not carry.
    pub const fn inline_slot(&self, slot: u16) -> Option<Self> {
        // A match, not an index: the verifier sees every access is in bounds.
        let copy = match slot {
            1 => self.inline[0],
            2 => self.inline[1],
            3 => self.inline[2],
            _ => return None,
        };
        if copy.backend_id == 0 {
            return None;
        }
        Some(Self::slot(copy.backend_id, self.svc_id, copy.addr, copy.port))
    }
}

impl InlineSlot {
    pub const EMPTY: Self = Self {
        backend_id: 0,
        addr: 0,
        port: 0,
        _pad: [0; 2],
    };
}
const _: () = assert!(
    INLINE_BACKENDS == 3,
    "ServiceEntry::inline_slot matches every inline slot"
);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Backend {
    /// Endpoint IPv4 address, network byte order.
    pub addr: u32,
    /// Endpoint port, network byte order.
    pub port: u16,
    /// [`crate::proto`] number.
    pub proto: u8,
    /// `BACKEND_FLAG_*` bits. A layout from before this field had padding
    /// here, always 0: no flag.
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 8);

/// [`Backend::flags`]: the endpoint is no longer selected for its service
/// port (terminating while others are ready, or left out by topology or
/// policy) but still serving. Flows already on it keep it, as kube-proxy
/// keeps the conntrack entries of a serving endpoint; new connections never
/// go to it, session affinity included (kube-proxy's `recent` rules exist
/// only for selected endpoints). The writer keeps it in a slot after the
/// master's count, where new flows never pick it.
pub const BACKEND_FLAG_DRAINING: u8 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct VipEntry {
    /// How many service ports use this address (host order); informational.
    pub port_count: u32,
}
const _: () = assert!(core::mem::size_of::<VipEntry>() == 4);

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], bytemuck::Pod (explicit padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: #[repr(C)], bytemuck::Pod (explicit padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::ServiceEntry {}
    // SAFETY: #[repr(C)], bytemuck::Pod (explicit padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: #[repr(C)], bytemuck::Pod (explicit padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::VipEntry {}
    // SAFETY: #[repr(C)], bytemuck::Pod (explicit padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::AffinityKey {}
    // SAFETY: #[repr(C)], bytemuck::Pod (explicit padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::AffinityEntry {}
}

/// (service port, client address) → the backend the client's last new
/// connection used, for `sessionAffinity: ClientIP`. Key [`AffinityKey`],
/// value [`AffinityEntry`]; an LRU, since affinity is soft state (losing an
/// entry only means the next connection picks again).
pub const AFFINITY_MAP: &str = "AFFINITY_V1";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AffinityKey {
    /// Service port ID (host order).
    pub svc_id: u32,
    /// Client IPv4 address, network byte order.
    pub client_addr: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AffinityEntry {
    /// Backend ID (host order); the client keeps it while the backend exists.
    pub backend_id: u32,
    pub _pad: u32,
    /// When the client last opened a connection to the service port
    /// (`bpf_ktime_get_coarse_ns`, host order).
    pub last_used_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityEntry>() == 16);

/// Per service port statistics, indexed by `svc_id`. `PerCpuArray<ServiceStats>`.
pub const SERVICE_STATS_MAP: &str = "SVCSTATS_V1";
/// What the agent knows about each service port beyond its addresses (names,
/// labels, what it wants programmed), for the CLI. Key `svc_id` (host order),
/// value [`ServiceMeta`]. Never read by the datapath.
pub const SERVICE_META_MAP: &str = "SVCMETA_V1";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ServiceStats {
    /// Packets translated towards an endpoint (host order).
    pub packets: u64,
    /// Bytes of those packets, L2 included (host order).
    pub bytes: u64,
    /// Flows started (endpoint selections; host order).
    pub new_flows: u64,
}
const _: () = assert!(core::mem::size_of::<ServiceStats>() == 24);

/// Capacity of [`ServiceMeta::json`].
pub const SERVICE_META_LEN: usize = 508;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ServiceMeta {
    /// Bytes used in `json` (host order).
    pub len: u32,
    /// A compact JSON document written and read by user space only.
    pub json: [u8; SERVICE_META_LEN],
}
const _: () = assert!(core::mem::size_of::<ServiceMeta>() == 512);

#[cfg(feature = "user")]
mod user_meta {
    // SAFETY: #[repr(C)], bytemuck::Pod (explicit padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::ServiceStats {}
    // SAFETY: #[repr(C)], bytemuck::Pod (explicit padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::ServiceMeta {}
}
