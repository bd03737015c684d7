//! Connect-time translation (cgroup socket-address programs): what they
//! share with the agent.
//!
//! `connect4` and `sendmsg4` replace a service frontend by an endpoint
//! before the socket sends anything; `recvmsg4` and `getpeername4` show the
//! service address again. For that, each translation is remembered per
//! socket (its cookie) and endpoint, as Cilium's `cilium_lb4_reverse_sk`:
//! an LRU, because entries are never removed when their socket closes.

/// Reverse translations: [`SockRevKey`] → [`SockRevEntry`], an LRU hash.
pub const SOCK_REVERSE_MAP: &str = "SOCK_REVERSE_V1";
/// Array of one [`SockConfig`], written by the agent before it attaches.
pub const SOCK_CONFIG_MAP: &str = "SOCK_CONFIG_V1";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SockRevKey {
    /// The socket's cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// The endpoint the socket was sent to, network byte order.
    pub addr: u32,
    /// The endpoint's port, network byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<SockRevKey>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SockRevEntry {
    /// The service address the socket asked for, network byte order.
    pub addr: u32,
    /// The service port, network byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<SockRevEntry>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SockConfig {
    /// Serve only sockets of the network namespace with this cookie (the
    /// agent's own: `--socket-lb host`); 0 serves every socket (`all`).
    pub netns_cookie: u64,
}
const _: () = assert!(core::mem::size_of::<SockConfig>() == 8);

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], bytemuck::Pod (explicit padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::SockRevKey {}
    // SAFETY: #[repr(C)], bytemuck::Pod (explicit padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::SockRevEntry {}
    // SAFETY: #[repr(C)], bytemuck::Pod (explicit padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::SockConfig {}
}
