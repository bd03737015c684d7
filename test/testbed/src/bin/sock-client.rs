//! The test bed's client for connect-time translation: run by
//! `testbed::cgroup::TestCgroup` inside a test cgroup, it sends one request
//! and prints one line: `ok ms=<elapsed> peer=<address the socket shows>
//! <the server's answer>` or `error ms=<elapsed> errno=<n> <message>`.
//!
//! `sock-client tcp|udp-connected|udp-sendto ADDR:PORT`
//!
//! `sock-client tcp-hold ADDR:PORT` connects once and, for each line read
//! from stdin, sends a request on that connection and prints one such line;
//! it ends at the end of stdin or at the first error.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(mode), Some(Ok(to))) = (args.first(), args.get(1).map(|a| a.parse::<SocketAddrV4>())) else {
        eprintln!("usage: sock-client tcp|tcp-hold|udp-connected|udp-sendto ADDR:PORT");
        return ExitCode::from(2);
    };
    if mode == "tcp-hold" {
        return tcp_hold(to);
    }
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
    report(started, result)
}

/// Prints the one line a request ends with.
fn report(started: Instant, result: std::io::Result<(SocketAddr, String)>) -> ExitCode {
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

/// One connection, a request on it per line of stdin: it shows whether an
/// open connection outlives something (an agent restart).
fn tcp_hold(to: SocketAddrV4) -> ExitCode {
    let started = Instant::now();
    let stream = match TcpStream::connect_timeout(&to.into(), TIMEOUT)
        .and_then(|stream| stream.set_read_timeout(Some(TIMEOUT)).map(|()| stream))
    {
        Ok(stream) => stream,
        Err(e) => return report(started, Err(e)),
    };
    let mut reader = BufReader::new(&stream);
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
        let started = Instant::now();
        let result = (&stream).write_all(b"hello\n").and_then(|()| {
            let mut answer = String::new();
            reader.read_line(&mut answer)?;
            if answer.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            Ok((stream.peer_addr()?, answer))
        });
        let failed = result.is_err();
        let code = report(started, result);
        // The test reads each line as it comes.
        let _ = std::io::stdout().flush();
        if failed {
            return code;
        }
    }
    ExitCode::SUCCESS
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
