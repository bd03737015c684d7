//! Project tasks: `cargo xtask setup | build | run | test | demo | bench`.

mod setup;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "redirector project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the eBPF build needs (nightly rust-src, bpf-linker); idempotent.
    Setup,
    /// Build the eBPF programs and the agent (the agent embeds the programs).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build (release) and run the agent with the given arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// fmt check, clippy -D warnings, unit, datapath and end-to-end tests (needs root).
    Test,
    /// Run the example manifests in a netns test bed and show who answers (needs root).
    Demo,
}

fn main() -> Result<()> {
    let task = Cli::parse().command;
    if !matches!(task, Task::Setup) && !setup::is_complete() {
        println!("xtask: the eBPF toolchain is incomplete; running setup first");
        setup::setup()?;
    }
    match task {
        Task::Setup => setup::setup(),
        Task::Build { release } => build(release),
        Task::Run { args } => {
            build(true)?;
            run(Command::new(workspace_root().join("target/release/redirector")).args(args))
        }
        Task::Test => test(),
        Task::Demo => demo(),
    }
}

fn build(release: bool) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "redirector", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

fn test() -> Result<()> {
    require_root("the tests load eBPF programs and build network namespaces")?;
    println!("xtask test: cargo fmt --check");
    run(cargo().args(["fmt", "--all", "--check"]))?;
    println!("xtask test: cargo clippy -D warnings (user-space crates)");
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    println!("xtask test: unit, datapath (BPF_PROG_TEST_RUN) and netns end-to-end tests");
    run(cargo().args(["test"]))
}

fn demo() -> Result<()> {
    require_root("the demo loads eBPF programs and builds network namespaces")?;
    build(true)?;
    let root = workspace_root();
    run(cargo()
        .args([
            "run",
            "--quiet",
            "--release",
            "--package",
            "redirector",
            "--example",
            "demo",
            "--",
        ])
        .arg("--agent")
        .arg(root.join("target/release/redirector"))
        .arg("--manifests")
        .arg(root.join("examples")))
}

fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("not running as root: {why}. Run it as root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN).");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// `cargo` from this toolchain, with the directory bpf-linker is installed in on PATH.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![cargo_home().join("bin")];
    dirs.extend(std::env::split_paths(&path));
    cmd.env(
        "PATH",
        std::env::join_paths(dirs).expect("PATH entries are valid"),
    );
    cmd.current_dir(workspace_root());
    cmd
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// Runs a command with inherited output; fails naming the command.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}
