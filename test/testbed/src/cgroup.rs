//! A cgroup v2 of the test's own, for clients of connect-time translation:
//! `<cgroup v2 root>/<unique prefix>`, bind-mounted at a temporary path that
//! the agent (started with `ip netns exec`, which mounts a fresh /sys) can
//! open as its `--cgroup-root`. The agent's programs attach there and
//! nowhere else; only the clients this fixture starts ever enter it, each
//! moved in between fork and exec. Removed on drop (and leftovers of the
//! same prefix on start).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddrV4;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use rustix::mount::UnmountFlags;

use crate::{Answer, parse_answer, require_root, unique_name};

pub struct TestCgroup {
    /// The cgroup's directory in the v2 hierarchy.
    dir: PathBuf,
    /// Where it is bind-mounted for the agent.
    mount: PathBuf,
}

/// What `sock-client` reported.
#[derive(Debug)]
pub struct ClientResult {
    /// How long the call took, connect included.
    pub elapsed: Duration,
    /// The server's answer and the address the socket showed as its peer
    /// (`getpeername`, or `recvfrom`'s source), or the call's errno.
    pub outcome: Result<(Answer, SocketAddrV4), i32>,
    /// The client's output, for messages.
    pub line: String,
}

/// The kinds of request `sock-client` makes.
#[derive(Clone, Copy, Debug)]
pub enum Request {
    Tcp,
    UdpConnected,
    UdpSendto,
}

impl TestCgroup {
    pub fn new(tag: &str) -> Self {
        require_root();
        let root = redirector::datapath::socket::cgroup2_mount()
            .unwrap_or_else(|e| panic!("the test cgroup needs a cgroup v2 hierarchy: {e}"));
        let prefix = unique_name(&format!("rs{tag}"));
        let dir = root.join(&prefix);
        let mount = std::env::temp_dir().join(format!("{prefix}-cgroup"));
        remove(&dir, &mount);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        std::fs::create_dir_all(&mount).unwrap_or_else(|e| panic!("creating {}: {e}", mount.display()));
        rustix::mount::mount_bind(&dir, &mount)
            .unwrap_or_else(|e| panic!("bind-mounting {} at {}: {e}", dir.display(), mount.display()));
        Self { dir, mount }
    }

    /// The path the agent is given as `--cgroup-root`.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Runs one `sock-client` request to `to` from network namespace `netns`,
    /// inside this cgroup.
    pub fn request(&self, netns: &str, request: Request, to: SocketAddrV4) -> ClientResult {
        let mode = match request {
            Request::Tcp => "tcp",
            Request::UdpConnected => "udp-connected",
            Request::UdpSendto => "udp-sendto",
        };
        let output = self
            .client(netns, mode, to)
            .output()
            .unwrap_or_else(|e| panic!("starting sock-client in {netns}: {e}"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        parse_result(stdout.trim(), &String::from_utf8_lossy(&output.stderr))
    }

    /// A TCP connection to `to` from a `sock-client` in network namespace
    /// `netns`, inside this cgroup, kept open until dropped.
    pub fn hold(&self, netns: &str, to: SocketAddrV4) -> HeldConnection {
        let mut child = self
            .client(netns, "tcp-hold", to)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting sock-client in {netns}: {e}"));
        let stdin = child.stdin.take().expect("sock-client's stdin");
        let stdout = BufReader::new(child.stdout.take().expect("sock-client's stdout"));
        HeldConnection { child, stdin, stdout }
    }

    /// `sock-client MODE TO` in `netns`, moved into this cgroup between fork
    /// and exec.
    fn client(&self, netns: &str, mode: &str, to: SocketAddrV4) -> Command {
        let procs_path = self.dir.join("cgroup.procs");
        let procs = File::options()
            .write(true)
            .open(&procs_path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", procs_path.display()));
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns])
            .arg(client_binary())
            .args([mode, &to.to_string()]);
        // SAFETY: the hook only calls write(2), async-signal-safe, on an fd
        // the closure owns (it lives as long as the Command, past the fork).
        unsafe {
            command.pre_exec(move || {
                // "0" moves the writing process: the child, before it execs.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
    }
}

/// What one `sock-client` line says.
fn parse_result(line: &str, stderr: &str) -> ClientResult {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .unwrap_or_else(|| panic!("sock-client printed no {name} ({line:?}; stderr {stderr:?})"))
            .to_owned()
    };
    let elapsed = Duration::from_millis(field("ms=").parse().expect("ms= is a number"));
    let outcome = if line.starts_with("ok ") {
        let peer = field("peer=").parse().expect("peer= is an IPv4 address");
        Ok((parse_answer(line), peer))
    } else {
        Err(field("errno=").parse().expect("errno= is a number"))
    };
    ClientResult {
        elapsed,
        outcome,
        line: line.to_owned(),
    }
}

/// An open connection of a `sock-client` in a test cgroup
/// ([`TestCgroup::hold`]); the client is killed on drop.
pub struct HeldConnection {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl HeldConnection {
    /// A request on the connection: its answer and the peer the socket
    /// shows now, or the errno that ended it.
    pub fn ask(&mut self) -> ClientResult {
        if let Err(e) = self.stdin.write_all(b"ask\n") {
            panic!("writing to sock-client (it exited?): {e}");
        }
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(n) if n > 0 => parse_result(line.trim(), "<not collected>"),
            Ok(_) => panic!("sock-client ended without an answer"),
            Err(e) => panic!("reading from sock-client: {e}"),
        }
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove(&self.dir, &self.mount);
    }
}

fn remove(dir: &Path, mount: &Path) {
    let _ = rustix::mount::unmount(mount, UnmountFlags::DETACH);
    let _ = std::fs::remove_dir(mount);
    // Its clients have exited: an empty cgroup can be removed.
    let _ = std::fs::remove_dir(dir);
}

/// `sock-client`, built beside the test binaries by `cargo build -p testbed
/// --bins`, which `cargo xtask test` runs first (`cargo test` builds a binary
/// only as a test harness).
fn client_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test> → target/<profile>/sock-client
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("sock-client"))
        .expect("the test binary is in target/<profile>/deps");
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build -p testbed --bins` (`cargo xtask test` does)",
        binary.display()
    );
    binary
}
