//! B5: the per-packet cost of the TC program under BPF_PROG_TEST_RUN, with
//! maps programmed by the real writer for 1 to 100k services, many distinct
//! flows, and an empty program (`r0 = 0; exit`, loaded here) measured the same
//! way and subtracted. Plus the kernel's own run-time statistics of a loaded
//! program (the `kernel.bpf_stats_enabled` switch), for the cross-check under
//! real traffic.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use redirector::conntrack;
use redirector::datapath::maps::{Maps, conntrack_from_pins};
use redirector::datapath::{self, Datapath, writer::MapWriter};
use redirector_common::conntrack::FlowState;
use serde::Serialize;
use testbed::Bpffs;
use testbed::lanes::{ServiceSet, agent_map_sizes, service_endpoints, service_frontend};
use testbed::procfs::{enable_run_time_stats, prog_stats};

use crate::measure::{Figure, Rng, Summary};
use crate::progress::Progress;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
/// What redirector's programs return for every packet they let through (go
/// on down the TC chain).
const TC_ACT_UNSPEC: u32 = -1i32 as u32;

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    rest: [u64; 8],
}

/// bpf(2).
///
/// # Safety
/// `attr` points to `size` bytes laid out as `cmd`'s attribute, and every
/// buffer address in it is valid for what the kernel reads or writes there.
unsafe fn bpf(cmd: libc::c_long, attr: *mut libc::c_void, size: usize) -> std::io::Result<i64> {
    // SAFETY: as the caller promises.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// A SCHED_CLS program that returns TC_ACT_OK (0) at once: the baseline.
pub fn load_empty_program() -> std::io::Result<OwnedFd> {
    // mov64 r0, 0 ; exit
    let insns: [u64; 2] = [0xb7, 0x95];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..5].copy_from_slice(b"empty");
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        rest: [0; 8],
    };
    // SAFETY: a whole BPF_PROG_LOAD attribute; the instructions, license and
    // name it points to outlive the call.
    let fd = unsafe {
        bpf(
            BPF_PROG_LOAD,
            (&mut attr as *mut ProgLoadAttr).cast(),
            std::mem::size_of::<ProgLoadAttr>(),
        )
    }?;
    // SAFETY: a new program fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// One BPF_PROG_TEST_RUN: (verdict, ns per run as the kernel timed it);
/// `ctx` is a `struct __sk_buff` to start from (e.g. with a mark).
fn test_run(
    prog: RawFd,
    frame: &[u8],
    out: &mut [u8],
    repeat: u32,
    ctx: Option<&[u8]>,
) -> std::io::Result<(u32, u32)> {
    let mut attr = TestRunAttr {
        prog_fd: prog as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ctx_size_in: ctx.map_or(0, |c| c.len() as u32),
        ctx_in: ctx.map_or(0, |c| c.as_ptr() as u64),
        ..Default::default()
    };
    // SAFETY: a whole BPF_PROG_TEST_RUN attribute; the frame, output and
    // context buffers it names outlive the call, with their sizes.
    unsafe {
        bpf(
            BPF_PROG_TEST_RUN,
            (&mut attr as *mut TestRunAttr).cast(),
            std::mem::size_of::<TestRunAttr>(),
        )
    }?;
    Ok((attr.retval, attr.duration))
}

// ---------------------------------------------------------------------------
// Frames

/// Checks one run: (frame index, verdict, output frame) → what went wrong.
type Check<'a> = &'a dyn Fn(usize, u32, &[u8]) -> Result<(), String>;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// The destination of an IPv4-over-Ethernet frame.
fn destination(frame: &[u8]) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]),
        u16::from_be_bytes([frame[36], frame[37]]),
    )
}

/// The source of an IPv4-over-Ethernet frame.
fn source(frame: &[u8]) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]),
        u16::from_be_bytes([frame[34], frame[35]]),
    )
}

fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + IPv4 + TCP (no payload), valid checksums.
pub fn tcp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(54);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_start = f.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&40u16.to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, 6, 0, 0]);
    f.extend_from_slice(&src.0.octets());
    f.extend_from_slice(&dst.0.octets());
    let ip_sum = checksum(&f[ip_start..ip_start + 20], 0);
    f[ip_start + 10..ip_start + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let l4 = f.len();
    f.extend_from_slice(&src.1.to_be_bytes());
    f.extend_from_slice(&dst.1.to_be_bytes());
    f.extend_from_slice(&1000u32.to_be_bytes());
    f.extend_from_slice(&(if flags & ACK != 0 { 2000u32 } else { 0 }).to_be_bytes());
    f.extend_from_slice(&[5 << 4, flags]);
    f.extend_from_slice(&64240u16.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0]);
    let mut pseudo = 0u32;
    for word in [src.0.octets(), dst.0.octets()] {
        pseudo += u32::from(u16::from_be_bytes([word[0], word[1]]));
        pseudo += u32::from(u16::from_be_bytes([word[2], word[3]]));
    }
    pseudo += 6 + 20;
    let tcp_sum = checksum(&f[l4..], pseudo);
    f[l4 + 16..l4 + 18].copy_from_slice(&tcp_sum.to_be_bytes());
    f
}

fn arp_frame() -> Vec<u8> {
    let mut f = tcp_frame(
        (Ipv4Addr::new(10, 244, 0, 5), 1),
        (Ipv4Addr::new(10, 244, 1, 10), 2),
        SYN,
    );
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f
}

/// The i-th distinct client tuple of the whole run: consecutive flows come
/// from different addresses (4096 of them) and ports, as from many pods. No
/// two flows of a run share a client tuple, so none shares a reply tuple
/// either (the reply tuple is the endpoint's and the client's): a new flow
/// never meets an open flow's entry, which the datapath would drop as a
/// clash (`drop_conntrack_clash`), and the counters check it.
fn client(i: u64) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + 1 + (i % 4096) as u32),
        10_000 + ((i / 4096) % 50_000) as u16,
    )
}

// ---------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub services: Vec<usize>,
    pub endpoints: usize,
    pub flows_per_round: usize,
    pub rounds: usize,
    pub repeat: u32,
}

/// Per path, per round: the median ns of the batch.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Step {
    pub services: usize,
    pub sync_seconds: f64,
    /// Raw medians per round (ns as the kernel timed one run).
    pub empty: Vec<f64>,
    pub arp: Vec<f64>,
    pub hit: Vec<f64>,
    /// New flows run in the program's explain mode (skb mark
    /// EXPLAIN_MARK): the same lookups and rewrite, no connection-table
    /// entries and no counters written.
    pub explain: Vec<f64>,
    /// A data segment of a flow whose handshake completed through the
    /// programs (SYN, the endpoint's SYN-ACK, the client's ACK): the
    /// forward entry is ESTABLISHED and the segment changes none of its flags.
    pub established: Vec<f64>,
    /// The endpoint's SYN-ACK through the to-pod program (reply translated
    /// back to the service address).
    pub reply: Vec<f64>,
    pub miss: Vec<f64>,
    /// The next segment (ACK) of each miss's connection: not a SYN, so the
    /// program must also rule out that it is a reply.
    pub miss_segment: Vec<f64>,
    /// repeat = `Config::repeat`, one frame: ns per run.
    pub miss_repeat: Vec<f64>,
    pub empty_repeat: Vec<f64>,
    /// p99 of the hit batches.
    pub hit_p99: Vec<f64>,
    /// The connection table's flows by state after the step's rounds (every
    /// flow opened so far must be there, ESTABLISHED: nothing is evicted).
    pub table_flows: std::collections::BTreeMap<String, usize>,
    /// Flows opened so far in the run (two entries each).
    pub flows_opened: u64,
    /// Frames whose verdict or output was not what the path must give, and
    /// rounds whose counters disagree with the frames run.
    pub anomalies: usize,
    pub first_anomaly: Option<String>,
}

impl Step {
    /// Median over rounds of (path − empty) per round.
    pub fn net(&self, path: &[f64]) -> Option<Figure> {
        let v: Vec<f64> = path.iter().zip(&self.empty).map(|(p, e)| p - e).collect();
        Figure::of(&v)
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct B5 {
    pub config: Option<Config>,
    pub steps: Vec<Step>,
    pub error: Option<String>,
}

pub fn run(config: &Config, progress: &Progress) -> B5 {
    let mut result = B5 {
        config: Some(config.clone()),
        ..Default::default()
    };
    // Steps: programming each N, then its rounds.
    progress.stage("B5", (config.services.len() * (1 + config.rounds)) as u64);
    if let Err(e) = run_inner(config, &mut result, progress) {
        result.error = Some(e);
    }
    result
}

fn run_inner(config: &Config, result: &mut B5, progress: &Progress) -> Result<(), String> {
    let max = config.services.iter().copied().max().unwrap_or(1);
    let bpffs = Bpffs::new("rdbench-b5");
    let mut sizes = agent_map_sizes(max, config.endpoints);
    sizes.service_ports = (max as u32 + 2).next_power_of_two();
    sizes.flows = 1 << 20;
    let (datapath, maps) =
        Datapath::load(bpffs.path(), &sizes).map_err(|e| format!("loading the datapath: {e}"))?;
    let mut writer = MapWriter::new(maps).map_err(|e| e.to_string())?;
    writer
        .set_service_cidrs(&["10.96.0.0/12".parse().expect("CIDR")])
        .map_err(|e| e.to_string())?;
    let prog = datapath
        .program()
        .fd()
        .map_err(|e| format!("program fd: {e}"))?
        .as_fd()
        .as_raw_fd();
    let to_pod = datapath
        .to_pod_program()
        .fd()
        .map_err(|e| format!("to-pod program fd: {e}"))?
        .as_fd()
        .as_raw_fd();
    // Second handles on the pinned maps: the counters and the table, to
    // check that each path took the branch it is named for.
    let pins = datapath::maps_pin_dir(bpffs.path());
    let observer = Maps::from_pins(&pins).map_err(|e| format!("opening the maps' pins: {e}"))?;
    let table = conntrack_from_pins(&pins).map_err(|e| format!("opening the connection table: {e}"))?;
    let empty = load_empty_program().map_err(|e| format!("loading the empty program: {e}"))?;
    let empty = empty.as_raw_fd();
    let all = ServiceSet::new(max, config.endpoints);
    let mut flow = 0u64;
    let mut opened = 0u64;
    let mut out = vec![0u8; 256];
    let arp = arp_frame();
    // struct __sk_buff with only the mark set (offset 8).
    let mut explain_ctx = [0u8; 192];
    explain_ctx[8..12].copy_from_slice(&redirector_common::counters::EXPLAIN_MARK.to_ne_bytes());
    for &n in &config.services {
        progress.doing(format!("N = {n}: programming"));
        let started = Instant::now();
        let desired = all.list[..n].iter().cloned().collect();
        let report = writer.sync(&desired);
        if let Some(e) = report.errors.first() {
            return Err(format!("programming {n} services: {e}"));
        }
        let mut step = Step {
            services: n,
            sync_seconds: started.elapsed().as_secs_f64(),
            ..Default::default()
        };
        progress.advance(1);
        progress.log(&format!(
            "B5: {n} services programmed in {:.2}s; {} rounds x {} flows",
            step.sync_seconds, config.rounds, config.flows_per_round
        ));
        let mut rng = Rng::new(n as u64);
        for round in 1..=config.rounds {
            progress.doing(format!("N = {n}, round {round}/{}", config.rounds));
            // Distinct new flows to random services, and their endpoints.
            let flows: Vec<((Ipv4Addr, u16), usize)> = (0..config.flows_per_round)
                .map(|_| {
                    flow += 1;
                    (client(flow), rng.below(n))
                })
                .collect();
            let to_service = |flags: u8| -> Vec<Vec<u8>> {
                flows
                    .iter()
                    .map(|(c, i)| {
                        let fe = service_frontend(*i);
                        tcp_frame(*c, (fe.addr, fe.port), flags)
                    })
                    .collect()
            };
            let (syns, acks) = (to_service(SYN), to_service(ACK));
            // Other new flows, for the explain-mode runs.
            let explained: Vec<Vec<u8>> = (0..config.flows_per_round)
                .map(|_| {
                    flow += 1;
                    let fe = service_frontend(rng.below(n));
                    tcp_frame(client(flow), (fe.addr, fe.port), SYN)
                })
                .collect();
            // Connections to pod addresses: their SYNs, then their next
            // segments (which, unlike a SYN, could be replies).
            let direct: Vec<((Ipv4Addr, u16), (Ipv4Addr, u16))> = flows
                .iter()
                .enumerate()
                .map(|(k, (c, _))| {
                    let pod = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 1, 0)) + (k % 250) as u32 + 1);
                    (*c, (pod, 8080))
                })
                .collect();
            let direct_frames = |flags: u8| -> Vec<Vec<u8>> {
                direct.iter().map(|&(c, pod)| tcp_frame(c, pod, flags)).collect()
            };
            let (misses, miss_segments) = (direct_frames(SYN), direct_frames(ACK));
            // The endpoint each flow's SYN was sent to, from its output frame.
            let chosen = std::cell::RefCell::new(vec![None; flows.len()]);
            let mut time =
                |prog: RawFd, frames: &[Vec<u8>], ctx: Option<&[u8]>, check: Check, step: &mut Step| {
                    let mut ns = Vec::with_capacity(frames.len());
                    for (k, frame) in frames.iter().enumerate() {
                        let (verdict, d) =
                            test_run(prog, frame, &mut out, 1, ctx).map_err(|e| format!("test run: {e}"))?;
                        if let Err(what) = check(k, verdict, &out[..frame.len()]) {
                            step.anomalies += 1;
                            step.first_anomaly.get_or_insert(what);
                        }
                        ns.push(f64::from(d));
                    }
                    Ok::<Summary, String>(Summary::of(&ns))
                };
            let verdict_is = |want: u32| {
                move |_: usize, verdict: u32, _: &[u8]| -> Result<(), String> {
                    (verdict == want)
                        .then_some(())
                        .ok_or(format!("verdict {verdict}"))
                }
            };
            let (empty_returns, passed) = (verdict_is(0), verdict_is(TC_ACT_UNSPEC));
            let opened_flow = |k: usize, verdict: u32, frame: &[u8]| -> Result<(), String> {
                let dst = destination(frame);
                let eps = service_endpoints(flows[k].1, config.endpoints);
                if verdict != TC_ACT_UNSPEC || !eps.iter().any(|e| (e.addr, e.port) == dst) {
                    return Err(format!(
                        "new flow {k} to service {}: verdict {verdict}, destination {dst:?} not one of {eps:?}",
                        flows[k].1
                    ));
                }
                chosen.borrow_mut()[k] = Some(dst);
                Ok(())
            };
            // Later packets of a flow go where its first went.
            let chosen_ref = &chosen;
            let pinned = |what: &'static str| {
                move |k: usize, verdict: u32, frame: &[u8]| -> Result<(), String> {
                    let want = chosen_ref.borrow()[k];
                    let dst = destination(frame);
                    if verdict != TC_ACT_UNSPEC || want != Some(dst) {
                        return Err(format!(
                            "{what} of flow {k}: verdict {verdict}, destination {dst:?}, its SYN went to {want:?}"
                        ));
                    }
                    Ok(())
                }
            };
            let before = observer.counter_totals().map_err(|e| e.to_string())?;
            let empty_s = time(empty, &syns, None, &empty_returns, &mut step)?;
            let hit = time(prog, &syns, None, &opened_flow, &mut step)?;
            let explain = time(prog, &explained, Some(&explain_ctx), &passed, &mut step)?;
            // The endpoints' SYN-ACKs, back to the clients.
            let syn_acks: Vec<Vec<u8>> = flows
                .iter()
                .zip(chosen.borrow().iter())
                .map(|((c, _), ep)| tcp_frame(ep.unwrap_or((Ipv4Addr::UNSPECIFIED, 0)), *c, SYN | ACK))
                .collect();
            let from_service = |k: usize, verdict: u32, frame: &[u8]| -> Result<(), String> {
                let fe = service_frontend(flows[k].1);
                let src = source(frame);
                if verdict != TC_ACT_UNSPEC || src != (fe.addr, fe.port) {
                    return Err(format!(
                        "SYN-ACK of flow {k}: verdict {verdict}, source {src:?}, not the service {}:{}",
                        fe.addr, fe.port
                    ));
                }
                Ok(())
            };
            let reply = time(to_pod, &syn_acks, None, &from_service, &mut step)?;
            // The client's ACK completes the handshake (its flag is written
            // once); the next segment is an established flow's packet.
            time(prog, &acks, None, &pinned("handshake ACK"), &mut step)?;
            let est = time(prog, &acks, None, &pinned("established segment"), &mut step)?;
            let miss = time(prog, &misses, None, &passed, &mut step)?;
            let miss_segment = time(prog, &miss_segments, None, &passed, &mut step)?;
            let arp_frames = vec![arp.clone(); frames_for_arp(config.flows_per_round)];
            let arp_s = time(prog, &arp_frames, None, &passed, &mut step)?;
            let after = observer.counter_totals().map_err(|e| e.to_string())?;
            opened += flows.len() as u64;
            if let Err(what) = counted_as_named(&before, &after, flows.len() as u64, arp_frames.len() as u64)
            {
                step.anomalies += 1;
                step.first_anomaly.get_or_insert(format!("round {round}: {what}"));
            }
            step.empty.push(empty_s.p50);
            step.hit.push(hit.p50);
            step.explain.push(explain.p50);
            step.hit_p99.push(hit.p99);
            step.reply.push(reply.p50);
            step.established.push(est.p50);
            step.miss.push(miss.p50);
            step.miss_segment.push(miss_segment.p50);
            step.arp.push(arp_s.p50);
            let (_, d) =
                test_run(prog, &misses[0], &mut out, config.repeat, None).map_err(|e| e.to_string())?;
            step.miss_repeat.push(f64::from(d));
            let (_, d) =
                test_run(empty, &misses[0], &mut out, config.repeat, None).map_err(|e| e.to_string())?;
            step.empty_repeat.push(f64::from(d));
            progress.advance(1);
        }
        // Every flow of the run is still in the table, established: a plain
        // hash with room for all of them evicts none, and no sweeper runs.
        let flows = conntrack::read(&table).map_err(|e| format!("reading the connection table: {e}"))?;
        for f in &flows {
            *step.table_flows.entry(f.state().name().to_owned()).or_default() += 1;
        }
        step.flows_opened = opened;
        let established = step
            .table_flows
            .get(FlowState::TcpEstablished.name())
            .copied()
            .unwrap_or(0);
        if established as u64 != opened || flows.len() as u64 != opened {
            step.anomalies += 1;
            step.first_anomaly.get_or_insert(format!(
                "{opened} flows opened, the table holds {} ({:?})",
                flows.len(),
                step.table_flows
            ));
        }
        result.steps.push(step);
    }
    drop(datapath);
    Ok(())
}

/// Whether the program's counters over one round say what its frames were:
/// each new flow opened (no clash, no full table), each SYN-ACK translated
/// back, each handshake ACK and established segment forwarded on its
/// flow's entry, each miss (SYN and segment) and ARP frame passed as no service.
fn counted_as_named(before: &[u64], after: &[u64], flows: u64, arp: u64) -> Result<(), String> {
    use redirector_common::counters::{self as c, LABELS};
    let expected = [
        (c::FORWARD_NEW_FLOW, flows),
        (c::REPLY_TRANSLATED, flows),
        (c::FORWARD_ESTABLISHED, 2 * flows),
        (c::PASS_NOT_SERVICE, 2 * flows),
        (c::PASS_NOT_IPV4, arp),
        (c::DROP_CT_CLASH, 0),
        (c::DROP_CT_FULL, 0),
    ];
    let wrong: Vec<String> = expected
        .iter()
        .filter_map(|&(i, want)| {
            let i = i as usize;
            let got = after[i] - before[i];
            (got != want).then(|| format!("{} counted {got}, not {want}", LABELS[i]))
        })
        .collect();
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join(", "))
    }
}

fn frames_for_arp(flows: usize) -> usize {
    flows.clamp(100, 2000)
}

/// Runs `traffic` with BPF run-time statistics on and returns the average
/// ns per run of `pid`'s programs over it, and the runs counted.
pub fn cross_check(pid: u32, traffic: impl FnOnce()) -> Result<(f64, u64), String> {
    let stats = enable_run_time_stats().map_err(|e| format!("enabling BPF statistics: {e}"))?;
    let before = prog_stats(pid).ok_or("the agent holds no program fd")?;
    let started = Instant::now();
    traffic();
    let after = prog_stats(pid).ok_or("the agent holds no program fd")?;
    drop(stats);
    let runs = after.1 - before.1;
    if runs == 0 {
        return Err(format!("no program runs counted in {:?}", started.elapsed()));
    }
    Ok(((after.0 - before.0) as f64 / runs as f64, runs))
}
