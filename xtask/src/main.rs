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
    /// The benchmark suite (needs root): seven netns lanes (bare, bare +
    /// conntrack, kube-proxy's iptables ruleset via iptables-legacy and
    /// iptables-nft, its nftables ruleset, the redirector's TC programs and
    /// its socket programs) timed in interleaved rounds, plus
    /// BPF_PROG_TEST_RUN, programming, footprint and connection-flood
    /// measurements.
    /// Writes target/bench/report.md, report.json and connect_latency.png.
    Bench {
        /// Small N and short batches: a few minutes (the full run: about 30).
        #[arg(long)]
        quick: bool,
        /// Numbers of services to measure, e.g. 1000,10000,30000,100000
        /// (kube-proxy lanes only up to 30000).
        #[arg(long, value_name = "N,N,…")]
        services: Option<String>,
    },
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
        Task::Bench { quick, services } => bench(quick, services.as_deref()),
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
    // The benchmark lanes' correctness test loads iptables and nftables rulesets.
    setup::ensure_netfilter_tools()?;
    println!("xtask test: cargo fmt --check");
    run(cargo().args(["fmt", "--all", "--check"]))?;
    println!("xtask test: cargo clippy -D warnings (user-space crates)");
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    println!("xtask test: cargo clippy -D warnings (eBPF crates, for the BPF target)");
    run(nightly_cargo().args([
        "clippy",
        "--package",
        "redirector-ebpf",
        "--package",
        "foreign-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The socket tests run the test bed's `sock-client` from target/: `cargo
    // test` builds a binary only as a test harness, never the binary itself.
    println!("xtask test: cargo build -p testbed --bins (clients the tests run)");
    run(cargo().args(["build", "-p", "testbed", "--bins"]))?;
    println!("xtask test: unit, datapath (BPF_PROG_TEST_RUN) and netns end-to-end tests");
    let (passed, failed) = run_counting_tests(cargo().args(["test", "--no-fail-fast"]))?;
    // One closing line for the whole suite (cargo prints one per test binary).
    println!("{passed} passed, {failed} failed");
    if failed > 0 || passed == 0 {
        bail!("the test suite failed ({failed} failed, {passed} passed)");
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and sums its `test result:` lines.
fn run_counting_tests(cmd: &mut Command) -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count_before(rest, " passed");
            failed += count_before(rest, " failed");
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("{shown} failed: {status}");
    }
    Ok((passed, failed))
}

/// In `ok. 5 passed; 1 failed; …`, the number before `word`.
fn count_before(summary: &str, word: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(word)
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
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

fn bench(quick: bool, services: Option<&str>) -> Result<()> {
    require_root("the benchmarks load eBPF programs and build network namespaces")?;
    setup::ensure_netfilter_tools()?;
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "redirector",
        "--package",
        "redirector-bench",
        "--bins",
    ]))?;
    let root = workspace_root();
    let mut cmd = Command::new(root.join("target/release/bench"));
    cmd.current_dir(&root)
        .arg("--agent")
        .arg(root.join("target/release/redirector"))
        .arg("--out")
        .arg(root.join("target/bench"));
    if quick {
        cmd.arg("--quick");
    }
    if let Some(services) = services {
        cmd.args(["--services", services]);
    }
    run(&mut cmd)
}

fn require_root(why: &str) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("not running as root: {why}. Run it as root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN).");
    }
    Ok(())
}

/// `cargo` from this toolchain, with the directory bpf-linker is installed in on PATH.
/// rustup's `cargo +nightly`, without the variables of the stable cargo
/// running xtask, which would pin the toolchain back to stable.
fn nightly_cargo() -> Command {
    let mut cmd = Command::new(cargo_home().join("bin").join("cargo"));
    cmd.env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO")
        .arg("+nightly")
        .current_dir(workspace_root());
    cmd
}

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
