//! `redirector env`: the service variables the kubelet gives a pod.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context;
use clap::Args;
use redirector::datapath::record::Snapshot;

use super::BpffsArg;
use super::views::{Scope, ServiceView, services};

#[derive(Args)]
pub struct EnvArgs {
    #[arg(short, long, default_value = "default")]
    namespace: String,
    #[command(flatten)]
    pins: BpffsArg,
}

pub fn run(args: EnvArgs) -> anyhow::Result<()> {
    let snapshot = Snapshot::read(&args.pins.bpffs).context("redirector env")?;
    print!("{}", env(&snapshot, &args.namespace));
    Ok(())
}

/// `redirector env`: the service variables the kubelet gives a pod created in
/// `namespace` (pkg/kubelet/envvars: services with a ClusterIP in the
/// namespace, and the `kubernetes` service of `default`).
pub fn env(snapshot: &Snapshot, namespace: &str) -> String {
    let mut chosen: BTreeMap<&str, ServiceView<'_>> = BTreeMap::new();
    for svc in services(snapshot, &Scope::All) {
        if svc.namespace == namespace || (svc.namespace == "default" && svc.name == "kubernetes") {
            // The pod's own namespace wins a name clash, as in the kubelet.
            if svc.namespace == namespace || !chosen.contains_key(svc.name) {
                chosen.insert(svc.name, svc);
            }
        }
    }
    let mut out = String::new();
    for (name, svc) in chosen {
        let Some((first, _)) = svc.ports.first() else {
            continue;
        };
        let prefix = name.to_uppercase().replace('-', "_");
        let ip = svc.cluster_ip;
        let _ = writeln!(out, "{prefix}_SERVICE_HOST={ip}");
        let _ = writeln!(out, "{prefix}_SERVICE_PORT={}", first.frontend.port);
        for (port, record) in &svc.ports {
            if !record.port.is_empty() {
                let port_name = record.port.to_uppercase().replace('-', "_");
                let _ = writeln!(out, "{prefix}_SERVICE_PORT_{port_name}={}", port.frontend.port);
            }
        }
        for (index, (port, _)) in svc.ports.iter().enumerate() {
            let proto = port.frontend.protocol.as_k8s();
            let lower = proto.to_lowercase();
            let number = port.frontend.port;
            if index == 0 {
                let _ = writeln!(out, "{prefix}_PORT={lower}://{ip}:{number}");
            }
            let port_prefix = format!("{prefix}_PORT_{number}_{proto}");
            let _ = writeln!(out, "{port_prefix}={lower}://{ip}:{number}");
            let _ = writeln!(out, "{port_prefix}_PROTO={lower}");
            let _ = writeln!(out, "{port_prefix}_PORT={number}");
            let _ = writeln!(out, "{port_prefix}_ADDR={ip}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::views::fixture::snapshot;

    #[test]
    fn env_follows_the_kubelet() {
        let text = env(&snapshot(), "shop");
        let expected = "\
WEB_APP_SERVICE_HOST=10.96.0.10
WEB_APP_SERVICE_PORT=80
WEB_APP_SERVICE_PORT_HTTP=80
WEB_APP_SERVICE_PORT_HTTPS=443
WEB_APP_PORT=tcp://10.96.0.10:80
WEB_APP_PORT_80_TCP=tcp://10.96.0.10:80
WEB_APP_PORT_80_TCP_PROTO=tcp
WEB_APP_PORT_80_TCP_PORT=80
WEB_APP_PORT_80_TCP_ADDR=10.96.0.10
WEB_APP_PORT_443_TCP=tcp://10.96.0.10:443
WEB_APP_PORT_443_TCP_PROTO=tcp
WEB_APP_PORT_443_TCP_PORT=443
WEB_APP_PORT_443_TCP_ADDR=10.96.0.10
";
        assert_eq!(text, expected, "env for the namespace");
        assert_eq!(env(&snapshot(), "other"), "", "no services in another namespace");
    }
}
