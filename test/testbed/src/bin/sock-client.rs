//! The test bed's client for connect-time translation: run by
//! `testbed::cgroup::TestCgroup` inside a test cgroup, it sends one request
//! and prints one line: `ok ms=<elapsed> peer=<address the socket shows>
//! <the server's answer>` or `error ms=<elapsed> errno=<n> <message>`.
//!
//! `sock-client tcp|udp-connected|udp-sendto ADDR:PORT`

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(mode), Some(Ok(to))) = (args.first(), args.get(1).map(|a| a.parse::<SocketAddrV4>())) else {
        eprintln!("usage: sock-client tcp|udp-connected|udp-sendto ADDR:PORT");
        return ExitCode::from(2);
    };
    let started = Instant::now();
    let result = match mode.as_str() {
        "tcp" => tcp(to),
        "udp-connected" => udp_connected(to),
        "udp-sendto" => udp_sendto(to),
        other => {
            eprintln!("unknown mode {other:?}");
            return ExitCode::from(2);
        }
    };
    let ms = started.elapsed().as_millis();
    match result {
        Ok((peer, answer)) => {
            println!("ok ms={ms} peer={peer} {}", answer.trim());
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("error ms={ms} errno={} {e}", e.raw_os_error().unwrap_or(0));
            ExitCode::FAILURE
        }
    }
}

/// A request line on a new connection; the peer is what getpeername shows.
fn tcp(to: SocketAddrV4) -> std::io::Result<(SocketAddr, String)> {
    let mut stream = TcpStream::connect_timeout(&to.into(), TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(b"hello\n")?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    Ok((stream.peer_addr()?, answer))
}

/// A datagram on a connected socket; the peer is what getpeername shows.
fn udp_connected(to: SocketAddrV4) -> std::io::Result<(SocketAddr, String)> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.connect(to)?;
    socket.send(b"hello")?;
    let mut buf = [0u8; 2048];
    let n = socket.recv(&mut buf)?;
    Ok((
        socket.peer_addr()?,
        String::from_utf8_lossy(&buf[..n]).into_owned(),
    ))
}

/// `sendto` without `connect`; the peer is the source `recvfrom` reports.
fn udp_sendto(to: SocketAddrV4) -> std::io::Result<(SocketAddr, String)> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.send_to(b"hello", to)?;
    let mut buf = [0u8; 2048];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok((from, String::from_utf8_lossy(&buf[..n]).into_owned()))
}
