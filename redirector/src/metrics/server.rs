//! The HTTP/1 server behind the probe and scrape endpoints, bounded so that
//! slow or piling-up clients cannot hold the agent's sockets: a client has
//! `header_read` to send its request, a connection lives at most
//! `connection`, and past `max_connections` open ones new connections are
//! closed unanswered.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Response, StatusCode};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How long and how many clients are served.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time a client has, from connecting, to send the whole request head.
    pub header_read: Duration,
    /// Time a connection may stay open in all, response included (a client
    /// that stops reading a long response is cut off here).
    pub connection: Duration,
    /// Connections served at once; further ones are closed on accept.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(5),
            connection: Duration::from_secs(10),
            // Kubelet probes, a Prometheus or two and an operator's curl.
            max_connections: 32,
        }
    }
}

/// What a handler answers: status, content type, body.
pub type Reply = (StatusCode, &'static str, String);

/// Answers every request on `listener` with `handler(method, path)` (the
/// query is not part of the path), in a task of its own, until the runtime
/// stops. One request per connection, as the connection is closed after it.
pub fn spawn<H>(listener: TcpListener, limits: Limits, handler: H)
where
    H: Fn(&Method, &str) -> Reply + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .keep_alive(false);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            // Dropping the stream closes it: the client sees the connection
            // end unanswered and may retry.
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                continue;
            };
            let handler = handler.clone();
            let service = service_fn(move |request| {
                let (status, content_type, body) = handler(request.method(), request.uri().path());
                let mut response = Response::new(body);
                *response.status_mut() = status;
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                std::future::ready(Ok::<_, Infallible>(response))
            });
            let connection = http.serve_connection(TokioIo::new(stream), service);
            tokio::spawn(async move {
                // Dropping an unfinished connection at the deadline closes
                // its socket; errors are the client's (bad request, reset).
                let _ = tokio::time::timeout(limits.connection, connection).await;
                drop(permit);
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// Far beyond any limit set below: only a server that never closes
    /// reaches it.
    const BOUND: Duration = Duration::from_secs(20);

    async fn server(limits: Limits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        spawn(listener, limits, |method, path| match (method, path) {
            (&Method::GET, "/large") => (StatusCode::OK, "text/plain", "x".repeat(64 << 20)),
            (&Method::GET, _) => (StatusCode::OK, "text/plain", format!("path {path}\n")),
            _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_owned()),
        });
        addr
    }

    async fn send(addr: SocketAddr, path: &str) -> TcpStream {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
            .await
            .expect("send request");
        stream
    }

    /// Everything the server sends until it closes the connection.
    async fn read_until_closed(stream: &mut TcpStream) -> String {
        let mut received = Vec::new();
        let read = tokio::time::timeout(BOUND, stream.read_to_end(&mut received)).await;
        assert!(read.is_ok(), "the server closed the connection within {BOUND:?}");
        String::from_utf8_lossy(&received).into_owned()
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        read_until_closed(&mut send(addr, path).await).await
    }

    #[tokio::test]
    async fn answers_with_status_content_type_and_body_then_closes() {
        let addr = server(Limits::default()).await;
        let response = get(addr, "/healthz?verbose=1").await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
        let head = head.to_ascii_lowercase();
        for header in [
            "content-type: text/plain",
            "content-length: 14",
            "connection: close",
        ] {
            assert!(head.contains(header), "{header} in {head}");
        }
        assert_eq!(body, "path /healthz\n", "query dropped from the path");
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"POST /healthz HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n")
            .await
            .expect("send request");
        let response = read_until_closed(&mut stream).await;
        assert!(response.starts_with("HTTP/1.1 404 Not Found\r\n"), "{response}");
    }

    #[tokio::test]
    async fn a_silent_client_is_disconnected_while_others_are_answered() {
        let header_read = Duration::from_millis(300);
        let addr = server(Limits {
            header_read,
            connection: Duration::from_secs(3600),
            max_connections: 4,
        })
        .await;
        let connected = Instant::now();
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let answer = get(addr, "/other").await;
        assert!(answer.ends_with("path /other\n"), "answered meanwhile: {answer}");
        let mut left = Vec::new();
        let read = tokio::time::timeout(BOUND, silent.read_to_end(&mut left)).await;
        assert!(read.is_ok(), "a client that sends nothing is disconnected");
        assert!(
            connected.elapsed() >= header_read,
            "not before its time ({:?})",
            connected.elapsed()
        );
        let answer = get(addr, "/after").await;
        assert!(answer.ends_with("path /after\n"), "answered after: {answer}");
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_until_the_stalled_one_times_out() {
        // Long enough that the refused request below surely comes before it.
        let connection = Duration::from_secs(3);
        let addr = server(Limits {
            header_read: Duration::from_secs(3600),
            connection,
            max_connections: 1,
        })
        .await;
        // Asks for more than the socket buffers hold, and reads none of it:
        // the response cannot finish, only the connection deadline ends it.
        let stalled_at = Instant::now();
        let _stalled = send(addr, "/large").await;
        let refused = get(addr, "/other").await;
        assert_eq!(refused, "", "past the cap a connection is closed unanswered");
        loop {
            let answer = get(addr, "/other").await;
            if answer.ends_with("path /other\n") {
                break;
            }
            assert!(
                stalled_at.elapsed() < BOUND,
                "the stalled connection was cut and its place freed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            stalled_at.elapsed() >= connection,
            "the place was freed by the deadline, not before ({:?})",
            stalled_at.elapsed()
        );
    }
}
