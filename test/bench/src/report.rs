//! report.md and the chart, from the results.

use std::fmt::Write as _;
use std::path::Path;

use redirector_common::conntrack::FlowState;
use testbed::lanes::LaneKind;

use crate::measure::{Figure, slope};
use crate::{LaneStep, Results, Round, chart};

fn step<'a>(r: &'a Results, lane: &str, n: usize) -> Option<&'a LaneStep> {
    r.steps
        .iter()
        .find(|s| s.lane.0 == lane && s.services == n && !s.rounds.is_empty())
}

fn figure(s: &LaneStep, f: &dyn Fn(&Round) -> f64) -> Option<Figure> {
    Figure::of(&s.rounds.iter().map(f).collect::<Vec<_>>())
}

/// Per round: lane / reference lane (same round, same N).
fn ratio(r: &Results, lane: &str, reference: &str, n: usize, f: &dyn Fn(&Round) -> f64) -> Option<Figure> {
    let a = step(r, lane, n)?;
    let b = step(r, reference, n)?;
    let v: Vec<f64> = a.rounds.iter().zip(&b.rounds).map(|(x, y)| f(x) / f(y)).collect();
    Figure::of(&v)
}

fn fmt(f: Option<Figure>, decimals: usize) -> String {
    match f {
        Some(f) => format!("{:.d$} ({:.d$}–{:.d$})", f.median, f.min, f.max, d = decimals),
        None => "–".into(),
    }
}

fn lanes() -> Vec<&'static str> {
    LaneKind::BENCH.iter().map(|k| k.name()).collect()
}

fn header(out: &mut String, first: &str, ns: &[usize]) {
    let _ = write!(out, "| {first} |");
    for n in ns {
        let _ = write!(out, " N = {n} |");
    }
    out.push('\n');
    out.push_str("|---|");
    for _ in ns {
        out.push_str("---|");
    }
    out.push('\n');
}

/// A lanes × N table of `f` (median over rounds, min–max).
fn table(out: &mut String, r: &Results, title: &str, decimals: usize, f: &dyn Fn(&Round) -> f64) {
    let ns = &r.config.services;
    let _ = writeln!(out, "{title}\n");
    header(out, "lane", ns);
    for lane in lanes() {
        let _ = write!(out, "| {lane} |");
        for &n in ns {
            let cell = step(r, lane, n).map_or("–".into(), |s| fmt(figure(s, f), decimals));
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out.push('\n');
}

/// A lanes × N table of ratios to `reference` (per round, same run).
fn ratio_table(out: &mut String, r: &Results, title: &str, reference: &str, f: &dyn Fn(&Round) -> f64) {
    let ns = &r.config.services;
    let _ = writeln!(out, "{title}\n");
    header(out, "lane", ns);
    for lane in lanes() {
        let _ = write!(out, "| {lane} |");
        for &n in ns {
            let _ = write!(out, " {} |", fmt(ratio(r, lane, reference, n, f), 2));
        }
        out.push('\n');
    }
    out.push('\n');
}

/// ns per service: least-squares slope of the per-round value over N, per
/// round index; median (min–max) over rounds.
fn slope_figure(r: &Results, lane: &str, f: &dyn Fn(&Round) -> f64) -> Option<Figure> {
    let steps: Vec<&LaneStep> = r
        .config
        .services
        .iter()
        .filter_map(|&n| step(r, lane, n))
        .collect();
    if steps.len() < 2 {
        return None;
    }
    let rounds = steps.iter().map(|s| s.rounds.len()).min()?;
    let slopes: Vec<f64> = (0..rounds)
        .filter_map(|i| {
            let points: Vec<(f64, f64)> = steps
                .iter()
                .map(|s| (s.services as f64, f(&s.rounds[i]) * 1000.0))
                .collect();
            slope(&points)
        })
        .collect();
    Figure::of(&slopes)
}

fn connect_last(x: &Round) -> f64 {
    x.last.connect.p50
}
fn connect_random(x: &Round) -> f64 {
    x.random.connect.p50
}
fn connect_pod(x: &Round) -> f64 {
    x.pod.connect.p50
}

pub fn markdown(r: &Results) -> String {
    let mut out = String::new();
    let c = &r.config;
    let _ = writeln!(out, "# redirector benchmark report\n");
    let _ = writeln!(
        out,
        "{} run, {:.0} s, tree {}. Kernel {}, {} CPUs; {}; {}. N = {:?} services × {} endpoints; {} interleaved rounds \
         (lanes A B C … A B C …); {} new connections per batch. Every figure is the median over rounds with \
         min–max in parentheses; every ratio is taken per round, between lanes of the same round.\n",
        if c.quick { "Quick" } else { "Full" },
        r.meta.seconds,
        r.meta.tree,
        r.meta.kernel,
        r.meta.cpus,
        r.meta.iptables,
        r.meta.nft,
        c.services,
        c.endpoints,
        c.rounds,
        c.samples
    );
    for note in &r.notes {
        let _ = writeln!(out, "- {note}");
    }

    if !r.steps.is_empty() {
        lanes_section(&mut out, r);
    }
    if let Some(b5) = &r.b5 {
        b5_section(&mut out, b5);
    }
    if let Some(b6) = &r.b6 {
        b6_section(&mut out, b6);
    }
    footprint_section(&mut out, r);
    if let Some(b9) = &r.b9 {
        b9_section(&mut out, b9);
    }
    method_section(&mut out, r);
    out
}

fn lanes_section(out: &mut String, r: &Results) {
    let ns = &r.config.services;
    let _ = writeln!(out, "## Lanes: correctness and loading\n");
    let _ = writeln!(
        out,
        "Each lane is checked before it is timed: the first, the last and a random service answer from one of \
         their own endpoints (and every endpoint of the last one answers), the plain pod IP answers itself, and \
         the server sees the client's own address. Cells: load time of the N services (s) and the check.\n"
    );
    header(out, "lane", ns);
    let mut reasons = Vec::new();
    for lane in lanes() {
        let _ = write!(out, "| {lane} |");
        for &n in ns {
            let s = r.steps.iter().find(|s| s.lane.0 == lane && s.services == n);
            let cell = match s {
                None => "–".into(),
                Some(s) if s.skipped.is_some() => {
                    reasons.push(format!(
                        "{lane} at N = {n}: {}",
                        s.skipped.as_deref().unwrap_or("")
                    ));
                    "not run".into()
                }
                Some(s) => {
                    let load = s.load_seconds.map_or(String::new(), |t| format!("{t:.2} s, "));
                    match &s.check_error {
                        None => format!("{load}ok"),
                        Some(e) => {
                            reasons.push(format!("{lane} at N = {n}: check failed: {e}"));
                            format!("{load}**FAILED**")
                        }
                    }
                }
            };
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out.push('\n');
    let hows: std::collections::BTreeSet<String> = r
        .steps
        .iter()
        .filter_map(|s| s.load_how.as_ref().map(|h| format!("{}: {h}", s.lane.0)))
        .collect();
    if !hows.is_empty() {
        let _ = writeln!(
            out,
            "Loaded with: {}.\n",
            hows.into_iter().collect::<Vec<_>>().join("; ")
        );
    }
    for reason in reasons {
        let _ = writeln!(out, "- {reason}");
    }
    out.push('\n');

    let _ = writeln!(out, "## B1 New-connection latency\n");
    let _ = writeln!(
        out,
        "`connect()` time in µs (SYN → SYN-ACK through the node, where the first packet meets the rules), per \
         batch p50 and p99. Bare lanes connect to the endpoint address itself.\n"
    );
    table(
        out,
        r,
        "### Target service last: connect p50 (µs)",
        1,
        &connect_last,
    );
    table(out, r, "### Target service last: connect p99 (µs)", 1, &|x| {
        x.last.connect.p99
    });
    ratio_table(
        out,
        r,
        "### Target service last: p50 ratio to bare",
        "bare",
        &connect_last,
    );
    ratio_table(
        out,
        r,
        "### Target service last: p50 ratio to bare+ct",
        "bare+ct",
        &connect_last,
    );
    table(
        out,
        r,
        "### Random position: connect p50 (µs)",
        1,
        &connect_random,
    );
    table(out, r, "### Random position: connect p99 (µs)", 1, &|x| {
        x.random.connect.p99
    });
    ratio_table(
        out,
        r,
        "### Random position: p50 ratio to bare",
        "bare",
        &connect_random,
    );
    table(
        out,
        r,
        "### Whole transaction, target last: connect + request/response + RST close, p50 (µs)",
        1,
        &|x| x.last.transaction.p50,
    );
    let _ = writeln!(
        out,
        "### Slope: ns per service (least squares of p50 over N, per round)\n"
    );
    let _ = writeln!(
        out,
        "| lane | target last | random position | plain pod IP (B2) |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    for lane in lanes() {
        let _ = writeln!(
            out,
            "| {lane} | {} | {} | {} |",
            fmt(slope_figure(r, lane, &connect_last), 3),
            fmt(slope_figure(r, lane, &connect_random), 3),
            fmt(slope_figure(r, lane, &connect_pod), 3)
        );
    }
    out.push('\n');

    let _ = writeln!(out, "## B2 Tax on traffic that is no service\n");
    let _ = writeln!(
        out,
        "New connections to the plain pod IP while N services are loaded.\n"
    );
    table(out, r, "### Plain pod IP: connect p50 (µs)", 1, &connect_pod);
    table(out, r, "### Plain pod IP: connect p99 (µs)", 1, &|x| {
        x.pod.connect.p99
    });
    ratio_table(
        out,
        r,
        "### Plain pod IP: p50 ratio to bare",
        "bare",
        &connect_pod,
    );

    let _ = writeln!(out, "## B3 Connection rate at saturation\n");
    let _ = writeln!(
        out,
        "{} client threads opening connections to the last service back to back (connect, request/response, RST \
         close) for {} s per round. CPU is the whole machine's busy time (clients, node, server: all {} CPUs) \
         per connection.\n",
        r.config.rate_threads, r.config.rate_seconds, r.meta.cpus
    );
    table(out, r, "### Connections per second", 0, &|x| {
        x.rate.connections_per_second
    });
    ratio_table(
        out,
        r,
        "### Connections per second: ratio to bare",
        "bare",
        &|x| x.rate.connections_per_second,
    );
    table(out, r, "### CPU per connection (µs)", 1, &|x| {
        x.rate.cpu_us_per_connection
    });
    ratio_table(out, r, "### CPU per connection: ratio to bare", "bare", &|x| {
        x.rate.cpu_us_per_connection
    });

    let _ = writeln!(out, "## B4 Established flow\n");
    let _ = writeln!(
        out,
        "One connection to the last service: {} request/response round trips, then one stream of {} MiB.\n",
        r.config.round_trips,
        r.config.stream_bytes >> 20
    );
    table(out, r, "### Round trip p50 (µs)", 1, &|x| x.established.rr.p50);
    table(out, r, "### Round trip p99 (µs)", 1, &|x| x.established.rr.p99);
    table(out, r, "### Single-stream throughput (Gbit/s)", 2, &|x| {
        x.established.gbit_per_s
    });
    ratio_table(out, r, "### Throughput: ratio to bare", "bare", &|x| {
        x.established.gbit_per_s
    });

    let errors: Vec<String> = r
        .steps
        .iter()
        .filter_map(|s| {
            let count: usize = s
                .rounds
                .iter()
                .map(|x| x.last.errors + x.random.errors + x.pod.errors)
                .sum();
            let rate: u64 = s.rounds.iter().map(|x| x.rate.errors).sum();
            let first = s
                .rounds
                .iter()
                .find_map(|x| {
                    x.last
                        .first_error
                        .clone()
                        .or(x.random.first_error.clone())
                        .or(x.pod.first_error.clone())
                        .or(x.rate.first_error.clone())
                        .or(x.established.error.clone())
                })
                .unwrap_or_default();
            (count > 0 || rate > 0 || !first.is_empty()).then(|| {
                format!(
                    "{} at N = {}: {count} failed timed connections, {rate} failed at saturation {first}",
                    s.lane.0, s.services
                )
            })
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(out, "### Errors during measurement\n");
        for e in errors {
            let _ = writeln!(out, "- {e}");
        }
        out.push('\n');
    }
}

fn b5_section(out: &mut String, b5: &crate::progrun::B5) {
    let _ = writeln!(out, "## B5 Per-packet cost of the program (BPF_PROG_TEST_RUN)\n");
    if let Some(e) = &b5.error {
        let _ = writeln!(out, "Not measured: {e}\n");
    }
    let Some(c) = &b5.config else {
        return;
    };
    let _ = writeln!(
        out,
        "Maps programmed by the real writer with N services × {} endpoints into the connection table `CT_V2` \
         (a plain hash, preallocated, nothing evicted; no sweeper runs here); per round {} distinct new flows \
         to random services, from 4096 client addresses and distinct ports, so no two flows share a reply \
         tuple and none is dropped as a clash. Each frame is run once (repeat = 1: a repeated frame would be \
         translated on its first run only). The kernel's own timing of one run (ns), batch median, minus an \
         empty SCHED_CLS program (`r0 = 0; exit`) timed the same way in the same round. Per flow: its SYN \
         (\"new flow\"), the endpoint's SYN-ACK through the to-pod program (\"reply\"), the client's ACK \
         (completes the handshake, untimed), then a data segment (\"established\": the flow is ESTABLISHED \
         and the segment changes none of its entry's flags, so the entry is not written). \"miss\" is a SYN \
         to a pod address (no service: the address settles it without the connection table); \"miss, \
         segment\" is the same connection's next segment (an ACK: leaving a pod, SYN or not, only packets \
         to a service or the hairpin address are looked up). \"explain\" runs other new flows with the program's explain mark \
         (same lookups, selection and rewrite; no connection-table entries, no counters): hit − explain is \
         what writing the flow's state costs. The ARP frame leaves the program at its first check \
         (PASS_NOT_IPV4). Checked per frame (verdict, the endpoint or service address written, later \
         packets to the SYN's endpoint) and per round by the program's counters (every flow counted as new, \
         its SYN-ACK translated, its ACK and segment forwarded on its entry; no clash, no full table); after \
         each N the table is read: every flow opened so far is in it, ESTABLISHED.\n",
        c.endpoints, c.flows_per_round
    );
    let _ = writeln!(
        out,
        "| N | new flow (hit) | hit p99 (raw) | new flow, explain mode | reply (SYN-ACK, to pod) | established | miss | miss, segment | ARP (not IPv4) | empty program (raw) | miss, repeat {} | sync | table after: ESTABLISHED / flows opened |",
        c.repeat
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in &b5.steps {
        let repeat_net: Vec<f64> = s
            .miss_repeat
            .iter()
            .zip(&s.empty_repeat)
            .map(|(a, b)| a - b)
            .collect();
        let established = s
            .table_flows
            .get(FlowState::TcpEstablished.name())
            .copied()
            .unwrap_or(0);
        let others: Vec<String> = s
            .table_flows
            .iter()
            .filter(|(state, _)| state.as_str() != FlowState::TcpEstablished.name())
            .map(|(state, n)| format!("{n} {state}"))
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} s | {established} / {}{} |",
            s.services,
            fmt(s.net(&s.hit), 0),
            fmt(Figure::of(&s.hit_p99), 0),
            fmt(s.net(&s.explain), 0),
            fmt(s.net(&s.reply), 0),
            fmt(s.net(&s.established), 0),
            fmt(s.net(&s.miss), 0),
            fmt(s.net(&s.miss_segment), 0),
            fmt(s.net(&s.arp), 0),
            fmt(Figure::of(&s.empty), 0),
            fmt(Figure::of(&repeat_net), 1),
            s.sync_seconds,
            s.flows_opened,
            if others.is_empty() {
                String::new()
            } else {
                format!(" (and {})", others.join(", "))
            }
        );
        if s.anomalies > 0 {
            let _ = writeln!(
                out,
                "\n**{} frames or rounds did not give the expected verdict, translation or counts**, first: {}\n",
                s.anomalies,
                s.first_anomaly.as_deref().unwrap_or("")
            );
        }
    }
    out.push('\n');
}

fn b6_section(out: &mut String, b6: &crate::programming::B6) {
    let _ = writeln!(out, "## B6 Programming\n");
    let Some(c) = &b6.config else {
        return;
    };
    let _ = writeln!(
        out,
        "{} services × {} endpoints. Agent: it watches the in-process API server in its node netns; cold start \
         is agent start → its sync of every service logged (and → the service it writes last answering a \
         client); a change is timed from the object applied on the API server to the entry readable in the \
         pinned map ({} single endpoint changes, {} new services, then a burst of {} endpoint changes on \
         distinct services). kube-proxy: its full ruleset loaded in a fresh netns (cold), then its partial \
         syncs (MinimizeIPTablesRestore: KUBE-SERVICES and the changed service's chains, `--noflush`; nftables: \
         the changed service's chains and elements), {} of each; a burst is one partial sync with every change, \
         as kube-proxy coalesces it.\n",
        c.services, c.endpoints, c.changes, c.changes, c.burst, c.kube_proxy_changes
    );
    let _ = writeln!(
        out,
        "| backend | cold (s) | cold → last service answers (s) | endpoint change p50 / p99 (ms) | new service p50 / p99 (ms) | burst of {} (s) | agent's own latency p50 / p99 (ms) |",
        c.burst
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    let pp = |s: &Option<crate::measure::Summary>| {
        s.map_or("–".into(), |s| {
            format!("{:.2} / {:.2} (n = {})", s.p50, s.p99, s.n)
        })
    };
    for b in &b6.backends {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            b.name,
            b.cold_seconds.map_or("–".into(), |v| format!("{v:.2}")),
            b.reachable_seconds.map_or("–".into(), |v| format!("{v:.2}")),
            pp(&b.endpoint_change_ms),
            pp(&b.new_service_ms),
            b.burst_seconds.map_or("–".into(), |v| format!("{v:.2}")),
            pp(&b.agent_reported_ms)
        );
    }
    out.push('\n');
    for b in &b6.backends {
        if let Some(e) = &b.error {
            let _ = writeln!(out, "- {}: {e}", b.name);
        }
    }
    out.push('\n');
}

fn footprint_section(out: &mut String, r: &Results) {
    let mut rows: Vec<&crate::programming::Footprint> =
        r.steps.iter().filter_map(|s| s.footprint.as_ref()).collect();
    let b6 = r.b6.as_ref().and_then(|b| b.footprint.as_ref());
    rows.extend(b6);
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(out, "## B7 Footprint\n");
    let _ = writeln!(
        out,
        "Agent peak RSS (VmHWM, since it started) and the memory charged to its maps (`memlock` in \
         /proc/<pid>/fdinfo of each map fd; the maps are preallocated, so this follows their sizes, not N).\n"
    );
    let _ = writeln!(
        out,
        "| where | services × endpoints | VmHWM (MiB) | VmRSS (MiB) | maps (MiB) | largest maps |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for f in rows {
        let mut maps = f.maps.clone();
        maps.sort_by_key(|m| std::cmp::Reverse(m.1));
        let largest: Vec<String> = maps
            .iter()
            .take(3)
            .map(|(name, bytes)| format!("{name}: {:.1} MiB", *bytes as f64 / 1048576.0))
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} × {} | {} | {} | {:.1} | {} |",
            f.context,
            f.services,
            f.endpoints,
            f.vm_hwm_kib
                .map_or("–".into(), |v| format!("{:.1}", v as f64 / 1024.0)),
            f.vm_rss_kib
                .map_or("–".into(), |v| format!("{:.1}", v as f64 / 1024.0)),
            f.maps_total as f64 / 1048576.0,
            largest.join("; ")
        );
    }
    out.push('\n');
    let checks: Vec<String> = r
        .steps
        .iter()
        .filter(|s| s.bpf_stats.is_some() || s.bpf_stats_error.is_some())
        .map(|s| match (s.bpf_stats, &s.bpf_stats_error) {
            (Some((ns, runs)), _) => format!(
                "N = {}: {ns:.0} ns per program run over {runs} runs (every packet of the saturation load, both \
                 directions: new flows, established, replies)",
                s.services
            ),
            (None, Some(e)) => format!("N = {}: {e}", s.services),
            _ => String::new(),
        })
        .collect();
    if !checks.is_empty() {
        let _ = writeln!(
            out,
            "### B5 cross-check under real traffic (kernel BPF run-time statistics)\n"
        );
        let _ = writeln!(
            out,
            "The `kernel.bpf_stats_enabled` switch, turned on with BPF_ENABLE_STATS only while the redirector lane \
             runs one extra saturation load; run_time_ns / run_cnt of the agent's program (includes the \
             statistics' own clock reads).\n"
        );
        for c in checks {
            let _ = writeln!(out, "- {c}");
        }
        out.push('\n');
    }
}

fn b9_section(out: &mut String, b9: &crate::flood::B9) {
    let _ = writeln!(out, "## B9 Connection flood with idle connections open\n");
    let Some(c) = &b9.config else {
        return;
    };
    let _ = writeln!(
        out,
        "The redirector lane with {} services × {} endpoints, {} idle established connections open to them \
         (one request each), then {} client threads opening connections to the services in turn, back to back \
         (connect, request/response, RST close, as B3; over many services nearly every connection is a new \
         tuple, not a closed flow's tuple reused in place) for {:.0} s; then one more request on every idle \
         connection, which must be answered by the endpoint that answered it first. The table holds {} entries \
         (`--max-flow-entries`; two per flow); the agent runs with `--conntrack-tcp-timeout-close {}s \
         --conntrack-sweep-interval {}s`, so a closed flow lives at most {} s, and without the sweeper the \
         flood would fill the table after {} flows (the row \"table filled\" says how many times over it \
         would have). Agent CPU is its user + system time over the flood (the sweeper is nearly all it does \
         then; /metrics is scraped only before and after); sweeps and their time are \
         `redirector_conntrack_sweep_duration_seconds` over the flood.\n",
        c.services,
        c.endpoints,
        c.idle,
        c.threads,
        c.seconds,
        c.table_entries,
        c.tcp_close_seconds,
        c.sweep_interval_seconds,
        c.tcp_close_seconds + c.sweep_interval_seconds,
        c.table_entries / 2
    );
    if let Some(e) = &b9.error {
        let _ = writeln!(out, "Not completed: {e}\n");
        return;
    }
    let secs = b9.flood_seconds.max(f64::MIN_POSITIVE);
    let d = &b9.during;
    let mean_ms = if d.sweeps > 0.0 {
        format!("{:.1}", d.sweep_seconds / d.sweeps * 1e3)
    } else {
        "–".into()
    };
    let states: Vec<String> = b9
        .after
        .flows
        .iter()
        .filter(|(_, n)| **n > 0.0)
        .map(|(state, n)| format!("{n:.0} {state}"))
        .collect();
    let rows = [
        (
            "flood".to_owned(),
            format!(
                "{:.0} connections/s over {secs:.1} s, {} failed",
                b9.flood.connections_per_second, b9.flood.errors
            ),
        ),
        (
            "flows opened (datapath counter)".to_owned(),
            b9.flows_opened.to_string(),
        ),
        (
            "table filled, without the sweeper".to_owned(),
            format!(
                "{:.1}× ({} entries for {})",
                (2 * b9.flows_opened) as f64 / f64::from(c.table_entries),
                2 * b9.flows_opened,
                c.table_entries
            ),
        ),
        (
            "new flows dropped: table full / clash".to_owned(),
            format!("{} / {}", b9.dropped_full, b9.dropped_clash),
        ),
        (
            "idle connections answering after, same endpoint".to_owned(),
            format!(
                "{} of {}{}",
                b9.idle_answered,
                b9.idle_opened,
                b9.idle_first_failure
                    .as_ref()
                    .map_or(String::new(), |f| format!(" (first failure: {f})"))
            ),
        ),
        (
            "agent CPU over the flood".to_owned(),
            format!(
                "{:.2} s, {:.1}% of one CPU",
                b9.agent_cpu_seconds,
                b9.agent_cpu_seconds / secs * 100.0
            ),
        ),
        (
            "sweeps: count, total, mean, slowest bucket".to_owned(),
            format!(
                "{:.0}, {:.2} s, {mean_ms} ms, ≤ {} s",
                d.sweeps,
                d.sweep_seconds,
                d.slowest_bucket.map_or("–".into(), |b| b.to_string())
            ),
        ),
        (
            "flows expired / early drops over the flood".to_owned(),
            format!("{:.0} / {:.0}", d.expired, d.early_drops),
        ),
        (
            "table after the flood (first sweep), by state".to_owned(),
            if states.is_empty() {
                "empty".into()
            } else {
                states.join(", ")
            },
        ),
    ];
    let _ = writeln!(out, "| | |\n|---|---|");
    for (what, value) in rows {
        let _ = writeln!(out, "| {what} | {value} |");
    }
    out.push('\n');
}

fn method_section(out: &mut String, r: &Results) {
    let _ = writeln!(out, "## Method and caveats\n");
    let lines = [
        "Each lane is its own set of network namespaces (client → node → server over veth pairs); the node has no \
         default route; nothing in the root namespace is touched. All lanes exist at once and are measured in \
         turn within each round, so slow drifts of the machine hit every lane alike.",
        "The server pod owns every endpoint address (10.128.0.0/10 on its loopback, routed to it by the node), so \
         every service of every lane is reachable and the answer names the endpoint that was reached.",
        "kube-proxy's rulesets are generated by the harness in kube-proxy's layout (`testbed::kubeproxy`: chain \
         names from sha256/base32, comments, probabilities, the large-cluster mode without per-endpoint comments \
         above 1000 endpoints; nat rules 5 + S(2 + 3E)); KUBE-SERVICES is in service order, so \"target last\" \
         is the worst case of its linear walk and \"random position\" the average case.",
        "The redirector-socket lane's clients are child processes (this binary as `bench lane-client`) started \
         in the lane's test cgroup, where its agent's socket programs are attached; every other lane's clients \
         are threads of the bench. The timed loops are the same code, and process start-up is not timed.",
        "Connections close with RST (SO_LINGER 0): no TIME_WAIT; the node's conntrack still keeps closed \
         entries for a while in the netfilter lanes.",
        "2 vCPUs are shared by clients, node and server: the rates in B3 are the whole machine's, and CPU per \
         connection includes the client and the server.",
        "Services beyond 60,000 share ClusterIPs on the next port (the agent's address map holds 65,536 \
         addresses). The agent's maps are sized for the largest N at its start (`--max-service-entries`, \
         `--max-backends`, `--max-service-ports`), so every N runs on the same agent, which follows the \
         Services added between steps through its watch.",
        "The in-process API server keeps each object's JSON encoding, as kube-apiserver's watch cache \
         does, and shares the 2 CPUs with the agent during a cold start.",
    ];
    for l in lines {
        let _ = writeln!(out, "- {l}");
    }
    if r.config.quick {
        let _ = writeln!(
            out,
            "- Quick run: small N and short batches; for the trends, not for the absolute figures."
        );
    }
}

pub fn chart(r: &Results, path: &Path) -> Result<(), chart::ChartError> {
    let series: Vec<chart::Series> = lanes()
        .into_iter()
        .map(|lane| chart::Series {
            name: lane.to_owned(),
            points: r
                .config
                .services
                .iter()
                .filter_map(|&n| {
                    let s = step(r, lane, n)?;
                    Some((n as f64, figure(s, &connect_last)?.median))
                })
                .collect(),
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    chart::line_chart(
        path,
        "connect latency p50, target service last",
        "number of services",
        "microseconds",
        &series,
    )
}
