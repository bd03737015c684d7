//! The connection table: pins each flow to the backend chosen for its first
//! packet, and maps replies back to the service address.
//!
//! One LRU map holds two entries per flow, both keyed by the tuple as it appears
//! on the wire: the forward entry (client → service) says where to send, the
//! reply entry (backend → client) says which service address to show.

/// Key [`CtKey`], value [`CtEntry`]; LRU, so a full table evicts the oldest flow.
pub const CT_MAP: &str = "CT_V1";

/// Forward entry: rewrite the destination to `nat_addr:nat_port`.
pub const CT_FORWARD: u8 = 1;
/// Reply entry: rewrite the source to `nat_addr:nat_port`.
pub const CT_REPLY: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CtKey {
    /// Source IPv4 address, network byte order.
    pub saddr: u32,
    /// Destination IPv4 address, network byte order.
    pub daddr: u32,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// [`crate::proto`] number.
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CtEntry {
    /// Forward: backend address; reply: service address. Network byte order.
    pub nat_addr: u32,
    /// Forward: backend port; reply: service port. Network byte order.
    pub nat_port: u16,
    /// [`CT_FORWARD`] or [`CT_REPLY`].
    pub kind: u8,
    pub _pad: u8,
    /// Backend ID the flow is pinned to (host order); a new connection on a
    /// tuple whose backend is gone selects again.
    pub backend_id: u32,
    /// Service port ID (host order).
    pub svc_id: u32,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 16);

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], bytemuck::Pod (explicit padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: #[repr(C)], bytemuck::Pod (explicit padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::CtEntry {}
}
