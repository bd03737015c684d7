//! Builds the foreign TC program (test/foreign-ebpf) the test bed attaches
//! beside redirector's, with the same toolchain as the product's programs.

fn main() -> anyhow::Result<()> {
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../foreign-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "foreign-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
