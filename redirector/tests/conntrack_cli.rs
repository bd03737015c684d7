//! `redirector conntrack list|flush` against a running agent: real
//! connections show up with their service port, endpoint, state and expiry,
//! and a flush removes them so the next packet starts a new flow.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Output;
use std::time::Duration;

use common::manifests::{web_pod, web_service};
use common::{Connection, Fixture, agent_binary, eventually, udp_request};
use serde_json::Value;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const WEB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 30), 80);
/// A second Service selecting the same pod; its UDP port.
const DNS_TOO: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 31), 53);
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent's UDP timeout in this test: not the default (30 s), so the
/// listed expiry shows the CLI reads the agent's timeouts.
const UDP_TIMEOUT_SECS: u64 = 90;

fn run_cli(fx: &Fixture, args: &[&str]) -> Output {
    std::process::Command::new(agent_binary())
        .args(args)
        .arg("--bpffs")
        .arg(fx.bpffs.path())
        .output()
        .expect("running the redirector CLI")
}

fn cli(fx: &Fixture, args: &[&str]) -> String {
    let out = run_cli(fx, args);
    assert!(
        out.status.success(),
        "redirector {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `conntrack list -o json`'s flows, with `extra` arguments.
fn listed(fx: &Fixture, extra: &[&str]) -> Vec<Value> {
    let args: Vec<&str> = ["conntrack", "list", "-o", "json"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let out = cli(fx, &args);
    let json: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("JSON from list: {e}\n{out}"));
    json["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {json}"))
        .clone()
}

/// The listed TCP flow from client port `port`, if any.
fn from_port(flows: &[Value], port: u16) -> Option<Value> {
    let client = SocketAddrV4::new(CLIENT, port).to_string();
    flows
        .iter()
        .find(|f| f["protocol"] == "TCP" && f["client"] == client.as_str())
        .cloned()
}

#[test]
fn list_shows_flows_by_service_and_flush_removes_them() {
    let mut fx = Fixture::new("ctcli");
    let client = fx.add_host("client", CLIENT);
    let pod = fx.add_host("web-a", POD);
    fx.serve(&pod, "web-a", 8080);
    fx.write_manifest("pod.yaml", &web_pod("web-a", POD, None));
    fx.write_manifest(
        "services.yaml",
        &format!(
            "{}---\n{}",
            web_service("web", *WEB.ip()),
            web_service("web-too", *DNS_TOO.ip())
        ),
    );
    let timeout = format!("{UDP_TIMEOUT_SECS}s");
    let _agent = fx.start_agent(agent_binary(), &["--conntrack-udp-timeout", &timeout]);

    let mut open = eventually("a connection to web", SYNC_TIMEOUT, || {
        Connection::open(&client, WEB).map_err(|e| e.to_string())
    });
    open.ask().expect("web answers");
    let port = open.local.port();
    eventually("UDP to web-too", SYNC_TIMEOUT, || {
        udp_request(&client, DNS_TOO).map_err(|e| e.to_string())
    });

    // The open connection: its service port, endpoint and state, and the
    // established timeout (24 h) ahead of it.
    let flows = listed(&fx, &[]);
    let web = from_port(&flows, port).unwrap_or_else(|| panic!("the open connection is listed: {flows:#?}"));
    assert_eq!(
        (
            &web["protocol"],
            &web["frontend"],
            &web["service"],
            &web["endpoint"],
            &web["state"],
            &web["entries"]
        ),
        (
            &Value::from("TCP"),
            &Value::from(WEB.to_string()),
            &Value::from("default/web:http"),
            &Value::from("10.244.1.10:8080"),
            &Value::from("ESTABLISHED"),
            &Value::from("both")
        ),
        "the open connection as listed: {web:#}"
    );
    let expires = web["expiresInSeconds"].as_u64().expect("expiry known");
    assert!(
        (86_400 - 60..=86_400).contains(&expires),
        "established: about 24 h left, got {expires} s"
    );
    let udp = flows
        .iter()
        .find(|f| f["service"] == "default/web-too:dns")
        .unwrap_or_else(|| panic!("the UDP flow is listed: {flows:#?}"));
    assert_eq!(udp["state"], "REPLIED", "the UDP flow was answered: {udp:#}");
    let expires = udp["expiresInSeconds"].as_u64().expect("expiry known");
    assert!(
        (UDP_TIMEOUT_SECS - 30..=UDP_TIMEOUT_SECS).contains(&expires),
        "the agent's UDP timeout ({UDP_TIMEOUT_SECS} s) applies, got {expires} s"
    );

    // The table view has the same flow on one line.
    let text = cli(&fx, &["conntrack", "list"]);
    let line = text
        .lines()
        .find(|l| l.contains(&format!("{CLIENT}:{port} ")))
        .unwrap_or_else(|| panic!("the open connection in the table:\n{text}"));
    for needle in ["TCP", "default/web:http", "10.244.1.10:8080", "ESTABLISHED"] {
        assert!(line.contains(needle), "{needle} in {line:?}");
    }
    assert!(
        text.starts_with("PROTOCOL ") && text.lines().next().is_some_and(|h| h.ends_with("EXPIRES")),
        "headers:\n{text}"
    );

    // describe counts the flows per port.
    let described = cli(&fx, &["describe", "service", "web"]);
    assert!(
        described.contains("Flows:                    1 (1 ESTABLISHED)\n"),
        "describe: web's http port has the open connection:\n{described}"
    );

    // --service keeps one Service's flows.
    let only_web = listed(&fx, &["--service", "default/web"]);
    assert!(
        !only_web.is_empty() && only_web.iter().all(|f| f["service"] == "default/web:http"),
        "--service default/web: {only_web:#?}"
    );
    let unknown = run_cli(&fx, &["conntrack", "list", "--service", "default/nope"]);
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        !unknown.status.success() && stderr.contains("default/nope"),
        "an unknown Service is an error naming it: {stderr}"
    );

    // Flushing web's flows leaves web-too's; the connection's next packet
    // starts a new flow (picked up mid-stream: established again).
    let out = cli(&fx, &["conntrack", "flush", "--service", "default/web"]);
    assert_eq!(
        out.trim(),
        format!("{} deleted", plural(only_web.len())),
        "flush says how many"
    );
    let flows = listed(&fx, &[]);
    assert!(
        from_port(&flows, port).is_none(),
        "the open connection's flow is gone: {flows:#?}"
    );
    assert!(
        flows.iter().any(|f| f["service"] == "default/web-too:dns"),
        "web-too's flow stays: {flows:#?}"
    );
    assert_eq!(
        open.ask().expect("the connection still answers").pod,
        "web-a",
        "same pod"
    );
    let web = eventually("the connection's new flow", Duration::from_secs(3), || {
        from_port(&listed(&fx, &["--service", "default/web"]), port).ok_or_else(|| "not listed".to_owned())
    });
    assert_eq!(
        (&web["state"], &web["endpoint"]),
        (&Value::from("ESTABLISHED"), &Value::from("10.244.1.10:8080")),
        "a new flow for the same connection: {web:#}"
    );

    // Flush without --service: everything.
    let left = listed(&fx, &[]).len();
    assert!(left >= 2, "web's new flow and web-too's: {left}");
    let out = cli(&fx, &["conntrack", "flush"]);
    assert_eq!(out.trim(), format!("{} deleted", plural(left)), "flush all");
    assert_eq!(listed(&fx, &[]), Vec::<Value>::new(), "the table is empty");
}

fn plural(n: usize) -> String {
    if n == 1 {
        "1 flow".to_owned()
    } else {
        format!("{n} flows")
    }
}
