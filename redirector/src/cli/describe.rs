//! `redirector describe service NAME`, as `kubectl describe service`, plus
//! traffic per port and any drift between what the agent wants and the maps.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use redirector::datapath::record::Snapshot;

use super::BpffsArg;
use super::views::{Scope, field, key_values, list_endpoints, plural, services, sorted};

#[derive(Args)]
pub struct DescribeArgs {
    #[command(subcommand)]
    what: DescribeWhat,
}

#[derive(Subcommand)]
enum DescribeWhat {
    #[command(visible_alias = "svc")]
    Service {
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        pins: BpffsArg,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("service {namespace}/{name} is not programmed in the datapath under {}", bpffs.display())]
pub struct UnknownService {
    namespace: String,
    name: String,
    bpffs: PathBuf,
}

pub fn run(args: DescribeArgs) -> anyhow::Result<()> {
    let DescribeWhat::Service {
        name,
        namespace,
        pins,
    } = args.what;
    let snapshot = Snapshot::read(&pins.bpffs).context("redirector describe")?;
    print!("{}", describe_service(&snapshot, &namespace, &name, &pins.bpffs)?);
    Ok(())
}

/// `redirector describe service NAME`, as `kubectl describe service`, plus
/// traffic per port and any drift between what the agent wants and the maps.
pub fn describe_service(
    snapshot: &Snapshot,
    namespace: &str,
    name: &str,
    bpffs: &Path,
) -> Result<String, UnknownService> {
    let scope = Scope::Namespace(namespace.to_owned());
    let svc = services(snapshot, &scope)
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| UnknownService {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            bpffs: bpffs.to_owned(),
        })?;
    let mut out = String::new();
    field(&mut out, "Name", svc.name);
    field(&mut out, "Namespace", svc.namespace);
    field(&mut out, "Labels", &key_values(&svc.info.labels, "\n"));
    let selector = svc
        .info
        .selector
        .as_ref()
        .map_or("<none>".to_owned(), |s| key_values(s, ","));
    field(&mut out, "Selector", &selector);
    field(&mut out, "Type", &svc.info.service_type);
    field(&mut out, "IP", &svc.cluster_ip.to_string());
    let mut drift = Vec::new();
    for (port, record) in &svc.ports {
        let port_name = if record.port.is_empty() {
            "<unset>"
        } else {
            &record.port
        };
        let proto = port.frontend.protocol.as_k8s();
        field(
            &mut out,
            "Port",
            &format!("{port_name}  {}/{proto}", port.frontend.port),
        );
        field(
            &mut out,
            "TargetPort",
            &format!("{}/{proto}", record.info.target_port),
        );
        field(&mut out, "Endpoints", &list_endpoints(&sorted(&port.endpoints)));
        field(
            &mut out,
            "Traffic",
            &format!(
                "{}, {}",
                plural(port.stats.packets, "packet"),
                plural(port.stats.new_flows, "new flow")
            ),
        );
        if let Some(d) = port.drift() {
            drift.push(format!("{port_name}: {d}"));
        }
    }
    for record in snapshot
        .unprogrammed
        .iter()
        .filter(|r| r.namespace == namespace && r.name == name)
    {
        drift.push(format!(
            "{}: not in the maps (the agent wants {} endpoints)",
            if record.port.is_empty() {
                "<unset>"
            } else {
                &record.port
            },
            record.want
        ));
    }
    field(&mut out, "Session Affinity", &svc.info.session_affinity);
    let drift = if drift.is_empty() {
        "none (the maps hold what the agent wants)".to_owned()
    } else {
        drift.join("\n")
    };
    field(&mut out, "Drift", &drift);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::views::fixture::snapshot;

    #[test]
    fn describes_like_kubectl_with_traffic_and_drift() {
        let mut s = snapshot();
        let text = describe_service(&s, "shop", "web-app", Path::new("/sys/fs/bpf")).unwrap();
        let expected = "\
Name:                     web-app
Namespace:                shop
Labels:                   app=web
                          tier=front
Selector:                 app=web
Type:                     ClusterIP
IP:                       10.96.0.10
Port:                     http  80/TCP
TargetPort:               8080/TCP
Endpoints:                10.244.1.1:8080,10.244.1.2:8080
Traffic:                  7 packets, 2 new flows
Port:                     https  443/TCP
TargetPort:               https/TCP
Endpoints:                10.244.1.1:8443,10.244.1.2:8443,10.244.1.3:8443 + 2 more...
Traffic:                  7 packets, 2 new flows
Session Affinity:         None
Drift:                    none (the maps hold what the agent wants)
";
        assert_eq!(text, expected, "describe service");
        s.ports[1].endpoints.pop();
        let text = describe_service(&s, "shop", "web-app", Path::new("/x")).unwrap();
        assert!(
            text.contains("Drift:                    http: the agent wants 2 endpoints, the maps hold 1"),
            "drift is stated: {text}"
        );
        let err = describe_service(&s, "shop", "nope", Path::new("/x"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("shop/nope") && err.contains("/x"),
            "unknown service names it: {err}"
        );
    }
}
