//! Client-side measurements (run on threads inside a lane's client netns),
//! statistics, and CPU accounting.

use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize};
use testbed::in_netns;
use testbed::lanes::{set_linger_zero, stream_bytes};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// An f64 that JSON wrote as `null` (serde_json writes NaN so) reads back as NaN.
fn f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Summary of one batch of samples (in the batch's unit).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        Self {
            n: s.len(),
            min: s[0],
            p50: percentile(&s, 0.5),
            p99: percentile(&s, 0.99),
            max: s[s.len() - 1],
        }
    }
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A figure over rounds: the median of the per-round values, with min–max.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Figure {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub rounds: usize,
}

impl Figure {
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let median = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[v.len() - 1],
            rounds: v.len(),
        })
    }
}

/// xorshift64*: reproducible "random positions", the same for every lane.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One new connection: connect, one request/response, close with RST.
/// Returns (connect time, whole transaction) or the error.
fn transaction(to: SocketAddrV4, buf: &mut [u8]) -> std::io::Result<(Duration, Duration)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&to.into(), CONNECT_TIMEOUT)?;
    let connected = started.elapsed();
    stream.set_nodelay(true)?;
    set_linger_zero(&stream)?;
    stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    stream.write_all(b"hello\n")?;
    let mut got = 0;
    loop {
        let n = stream.read(&mut buf[got..])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before the answer",
            ));
        }
        got += n;
        if buf[..got].contains(&b'\n') || got == buf.len() {
            break;
        }
    }
    drop(stream);
    Ok((connected, started.elapsed()))
}

/// New-connection latencies in µs over `targets` (one connection each, in
/// order), at most `cap`; a few untimed connections warm the path first.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConnectBatch {
    pub connect: Summary,
    pub transaction: Summary,
    pub errors: usize,
    pub first_error: Option<String>,
}

pub fn connect_batch(client: &str, targets: Vec<SocketAddrV4>, cap: Duration) -> ConnectBatch {
    in_netns(client, move || {
        let mut buf = [0u8; 256];
        for to in targets.iter().take(5) {
            let _ = transaction(*to, &mut buf);
        }
        let mut connect = Vec::with_capacity(targets.len());
        let mut whole = Vec::with_capacity(targets.len());
        let mut errors = 0;
        let mut first_error = None;
        let deadline = Instant::now() + cap;
        for to in targets {
            if Instant::now() > deadline {
                break;
            }
            match transaction(to, &mut buf) {
                Ok((c, t)) => {
                    connect.push(c.as_secs_f64() * 1e6);
                    whole.push(t.as_secs_f64() * 1e6);
                }
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert_with(|| format!("{to}: {e}"));
                }
            }
        }
        ConnectBatch {
            connect: Summary::of(&connect),
            transaction: Summary::of(&whole),
            errors,
            first_error,
        }
    })
}

/// Busy CPU time of the machine, in clock ticks (/proc/stat).
#[derive(Clone, Copy, Debug)]
pub struct CpuTimes {
    pub busy: u64,
}

pub fn cpu_times() -> CpuTimes {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    // idle + iowait
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    CpuTimes { busy: total - idle }
}

pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf(3) with a constant name has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// B3: `threads` clients each opening connections to `target` back to back
/// for `duration` (connect + request/response + RST), counted; and the CPU
/// the whole machine spent meanwhile.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RateResult {
    #[serde(deserialize_with = "f64_or_nan")]
    pub connections_per_second: f64,
    /// Machine CPU time (all cores: clients, node, server) per connection, µs.
    #[serde(deserialize_with = "f64_or_nan")]
    pub cpu_us_per_connection: f64,
    pub errors: u64,
    /// Why the measurement could not run at all.
    pub first_error: Option<String>,
}

pub fn saturate(client: &str, target: SocketAddrV4, threads: usize, duration: Duration) -> RateResult {
    saturate_over(client, vec![target], threads, duration)
}

/// [`saturate`], each thread going round `targets` (from its own offset):
/// over many services nearly every connection is a new tuple, where to one
/// service a client port's next connection reuses its last tuple.
pub fn saturate_over(
    client: &str,
    targets: Vec<SocketAddrV4>,
    threads: usize,
    duration: Duration,
) -> RateResult {
    let targets = Arc::new(targets);
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let barrier = Arc::new(std::sync::Barrier::new(threads + 1));
    for thread in 0..threads {
        let (done, errors, stop, barrier) = (done.clone(), errors.clone(), stop.clone(), barrier.clone());
        let targets = targets.clone();
        let client = client.to_owned();
        handles.push(std::thread::spawn(move || {
            in_netns(&client, move || {
                let mut buf = [0u8; 256];
                barrier.wait();
                // Bounded: the stop flag, and a hard count cap.
                for k in 0..10_000_000usize {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let target = targets[(k + thread * targets.len() / threads) % targets.len()];
                    match transaction(target, &mut buf) {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        }));
    }
    barrier.wait();
    let before = cpu_times();
    let start_count = done.load(Ordering::Relaxed);
    let started = Instant::now();
    std::thread::sleep(duration);
    let count = done.load(Ordering::Relaxed) - start_count;
    let elapsed = started.elapsed();
    let after = cpu_times();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let busy_s = (after.busy - before.busy) as f64 / clock_ticks_per_second();
    RateResult {
        connections_per_second: count as f64 / elapsed.as_secs_f64(),
        cpu_us_per_connection: if count > 0 {
            busy_s * 1e6 / count as f64
        } else {
            f64::NAN
        },
        errors: errors.load(Ordering::Relaxed),
        first_error: None,
    }
}

/// B4: request/response round trips on one established connection (µs),
/// and single-stream throughput (Gbit/s).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EstablishedResult {
    pub rr: Summary,
    #[serde(deserialize_with = "f64_or_nan")]
    pub gbit_per_s: f64,
    pub error: Option<String>,
}

pub fn established(client: &str, target: SocketAddrV4, round_trips: usize, stream: u64) -> EstablishedResult {
    in_netns(client, move || {
        let mut result = EstablishedResult::default();
        let rr = (|| -> std::io::Result<Vec<f64>> {
            let mut s = TcpStream::connect_timeout(&target.into(), CONNECT_TIMEOUT)?;
            s.set_nodelay(true)?;
            set_linger_zero(&s)?;
            s.set_read_timeout(Some(CONNECT_TIMEOUT))?;
            let mut buf = [0u8; 256];
            let mut samples = Vec::with_capacity(round_trips);
            let deadline = Instant::now() + Duration::from_secs(20);
            for i in 0..round_trips + 20 {
                if Instant::now() > deadline {
                    break;
                }
                let t = Instant::now();
                s.write_all(b"x\n")?;
                let mut got = 0;
                while !buf[..got].contains(&b'\n') {
                    let n = s.read(&mut buf[got..])?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    got += n;
                }
                if i >= 20 {
                    samples.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
            Ok(samples)
        })();
        match rr {
            Ok(samples) => result.rr = Summary::of(&samples),
            Err(e) => result.error = Some(format!("round trips to {target}: {e}")),
        }
        match stream_bytes(target, stream, Duration::from_secs(30)) {
            Ok(took) => result.gbit_per_s = stream as f64 * 8.0 / took.as_secs_f64() / 1e9,
            Err(e) => {
                result.gbit_per_s = f64::NAN;
                result
                    .error
                    .get_or_insert_with(|| format!("stream to {target}: {e}"));
            }
        }
        result
    })
}

/// Least-squares slope of y over x.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics() {
        let s = Summary::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((s.min, s.p50, s.max), (1.0, 3.0, 5.0), "summary of 1..=5");
        let f = Figure::of(&[4.0, 1.0, 3.0, 2.0]).expect("figure");
        assert_eq!(
            (f.median, f.min, f.max),
            (2.5, 1.0, 4.0),
            "median of an even count"
        );
        let k = slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]).expect("slope");
        assert!((k - 2.0).abs() < 1e-9, "slope of y = 2x + 1");
    }

    #[test]
    fn a_nan_survives_json() {
        let rate = RateResult {
            connections_per_second: 10.0,
            cpu_us_per_connection: f64::NAN,
            ..Default::default()
        };
        let text = serde_json::to_string(&rate).expect("encodes");
        let back: RateResult = serde_json::from_str(&text).expect("decodes");
        assert!(
            back.cpu_us_per_connection.is_nan() && back.connections_per_second == 10.0,
            "{text} read back as {back:?}"
        );
    }
}
