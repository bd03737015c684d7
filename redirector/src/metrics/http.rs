//! The HTTP side of `/healthz`, `/livez` and `/metrics`: hyper's HTTP/1
//! server, one request per connection, with a header-read timeout, an
//! overall per-connection timeout and a cap on connections open at once, so
//! no client (slow or many) can hold the endpoints or the agent's runtime.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Limits on each listener's clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The request head must arrive within this.
    pub header_read: Duration,
    /// A connection is closed after this, answered or not.
    pub connection: Duration,
    /// Connections served at once; more are closed at once.
    pub connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(5),
            connection: Duration::from_secs(10),
            connections: 32,
        }
    }
}

/// What a handler answers: status, content type, body.
pub type Answer = (StatusCode, &'static str, String);

/// Binds `addr` and answers each GET with `handler(path)` (query dropped)
/// from a task of its own.
pub async fn serve(
    addr: SocketAddr,
    limits: Limits,
    handler: impl Fn(&str) -> Answer + Send + Sync + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let handler = Arc::new(handler);
    let slots = Arc::new(Semaphore::new(limits.connections));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            // Over the cap the connection is dropped unanswered.
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(respond(&request, handler.as_ref())) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(limits.connection, connection).await;
                drop(slot);
            });
        }
    });
    Ok(bound)
}

fn respond(
    request: &Request<Incoming>,
    handler: &(impl Fn(&str) -> Answer + ?Sized),
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if request.method() == hyper::Method::GET {
        handler(request.uri().path())
    } else {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".to_owned(),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok(answer)
    }

    #[tokio::test]
    async fn a_silent_client_is_cut_off_and_others_are_still_answered() {
        let limits = Limits {
            header_read: Duration::from_millis(200),
            connection: Duration::from_millis(400),
            connections: 4,
        };
        let addr = serve("127.0.0.1:0".parse().unwrap(), limits, |path| {
            (StatusCode::OK, "text/plain", format!("you asked for {path}\n"))
        })
        .await
        .expect("bind");
        let started = Instant::now();
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let answer = get(addr, "/healthz?verbose").await.expect("GET");
        assert!(
            answer.starts_with("HTTP/1.1 200 OK"),
            "answered meanwhile: {answer}"
        );
        assert!(
            answer.ends_with("you asked for /healthz\n"),
            "path without the query: {answer}"
        );
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the silent client is disconnected");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "within the timeouts, not the test's bound: {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_unanswered() {
        let limits = Limits {
            header_read: Duration::from_secs(5),
            connection: Duration::from_secs(5),
            connections: 1,
        };
        let addr = serve("127.0.0.1:0".parse().unwrap(), limits, |_| {
            (StatusCode::OK, "text/plain", "ok\n".to_owned())
        })
        .await
        .expect("bind");
        // Holds the only slot (it never sends a request).
        let _holder = TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Closed at once, with or without a reset (the request was unread).
        match get(addr, "/metrics").await {
            Ok(answer) => assert_eq!(answer, "", "over the cap: closed without an answer"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "over the cap: {e}"),
        }
    }
}
