//! Builds the eBPF programs (redirector-ebpf) with the nightly toolchain and
//! bpf-linker, so the agent binary embeds them. `cargo xtask setup` installs both.

fn main() -> anyhow::Result<()> {
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../redirector-ebpf");
    println!("cargo:rerun-if-changed={ebpf_dir}/../redirector-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "redirector-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
