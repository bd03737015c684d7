//! Shared test support: privilege checks, bpffs mounts, packets, netns fixtures.
#![allow(dead_code)]

pub mod fixture;
pub mod packet;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Privileged tests fail loudly, never skip: CI runs them as root.
pub fn require_root() {
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test loads eBPF programs and creates network namespaces: it must run as root \
         (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); run `cargo xtask test` as root"
    );
}

/// A name unique to this test process and call, for netns/dirs: `<prefix><pid>x<n>`.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A bpffs mounted on a fresh directory, unmounted and removed on drop.
pub struct Bpffs {
    path: PathBuf,
}

impl Bpffs {
    pub fn new(prefix: &str) -> Self {
        require_root();
        let path = std::env::temp_dir().join(unique_name(prefix));
        redirector::datapath::ensure_bpffs(&path)
            .unwrap_or_else(|e| panic!("mounting a bpffs at {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap();
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.path);
    }
}
