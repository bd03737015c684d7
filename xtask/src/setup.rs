//! `cargo xtask setup`: everything the eBPF build needs, installed idempotently.
//!
//! The programs are built with the nightly toolchain (`-Z build-std=core` for
//! `bpfel-unknown-none`) and linked by bpf-linker, which must use the same LLVM
//! major version as that nightly. bpf-linker is therefore built against the
//! nightly's own `libLLVM.so` instead of a system LLVM.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo_home, run};

const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "~0.13";

/// True when nothing needs installing; cheap enough to run before every command.
pub fn is_complete() -> bool {
    nightly_has_rust_src() && bpf_linker_works()
}

pub fn setup() -> Result<()> {
    println!("setup: checking the nightly toolchain");
    let sysroot = nightly_sysroot()?;

    if nightly_has_rust_src() {
        println!("setup: rust-src for {NIGHTLY}: present");
    } else {
        println!("setup: installing rust-src for {NIGHTLY} (downloads once)");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }

    if bpf_linker_works() {
        println!("setup: bpf-linker: present");
    } else {
        let llvm = nightly_llvm(&sysroot)?;
        let prefix = llvm_prefix(&llvm)?;
        let major = llvm_major(&llvm)?;
        println!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)",
            llvm.display()
        );
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
            ])
            .args(["--no-default-features", "--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix)
            // The rpath lets the installed binary find the nightly's libLLVM
            // (by its soname) without LD_LIBRARY_PATH.
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-Wl,-rpath,{}", sysroot.join("lib").display()),
            ))?;
        if !bpf_linker_works() {
            bail!("bpf-linker was installed but `bpf-linker --version` still fails");
        }
    }
    ensure_netfilter_tools()?;
    println!("setup: complete");
    Ok(())
}

/// Debian packages the benchmark lanes and their correctness tests use:
/// `iptables` (iptables-legacy, iptables-nft and their -restore variants),
/// `nftables` (nft) and `iproute2` (ip). Installed with apt-get only when missing; `apt-get update`
/// runs once, and only when something is missing. Never touches any ruleset.
pub const NETFILTER_PACKAGES: [(&str, &str); 4] = [
    ("iptables", "iptables-legacy-restore"),
    ("iptables", "iptables-nft-restore"),
    ("nftables", "nft"),
    ("iproute2", "ip"),
];

pub fn ensure_netfilter_tools() -> Result<()> {
    let mut missing: Vec<&str> = NETFILTER_PACKAGES
        .iter()
        .filter(|(_, tool)| !tool_present(tool))
        .map(|(package, _)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        println!("setup: iptables (legacy and nft), nftables, iproute2: present");
        return Ok(());
    }
    println!("setup: installing {} with apt-get", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    if let Some((_, tool)) = NETFILTER_PACKAGES.iter().find(|(_, tool)| !tool_present(tool)) {
        bail!("{tool} is still missing after installing {}", missing.join(" "));
    }
    Ok(())
}

/// An executable named `tool` in one of the usual system directories or on PATH.
fn tool_present(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    dirs.iter().any(|d| d.join(tool).is_file())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args([&format!("+{NIGHTLY}"), "--print", "sysroot"])
        .output()
        .context("running rustc +nightly (is rustup installed?)")?;
    if !out.status.success() {
        bail!(
            "the {NIGHTLY} toolchain is not installed: run `rustup toolchain install {NIGHTLY}`\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn nightly_has_rust_src() -> bool {
    nightly_sysroot()
        .map(|s| s.join("lib/rustlib/src/rust/library/core/Cargo.toml").exists())
        .unwrap_or(false)
}

fn bpf_linker_works() -> bool {
    let path = cargo_home().join("bin/bpf-linker");
    Command::new(path)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The nightly's `libLLVM.so.<major>…` shared library.
fn nightly_llvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .collect();
    found.sort();
    found
        .pop()
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))
}

/// `libLLVM.so.22.1-rust-…` → 22
fn llvm_major(llvm: &Path) -> Result<u32> {
    let name = llvm.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    name.trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot read the LLVM major version from {name}"))
}

/// A directory shaped like an LLVM install (`lib/libLLVM.so`) for bpf-linker's build script.
fn llvm_prefix(llvm: &Path) -> Result<PathBuf> {
    let prefix = cargo_home().join("redirector-llvm-prefix");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let link = lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(llvm, &link)
        .with_context(|| format!("linking {} to {}", link.display(), llvm.display()))?;
    Ok(prefix)
}
