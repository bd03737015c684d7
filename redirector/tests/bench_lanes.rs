//! The benchmark lanes (`cargo xtask bench`) serve what they claim: at small
//! scale, every lane is built and, through it, the right backend answers for
//! the first, the last and a random service and for the plain pod IP; the
//! kube-proxy rulesets load with iptables-legacy-restore, iptables-nft-restore
//! and `nft -f` in the lane's node netns and hold the rules kube-proxy would.
//! No timing is asserted here.

mod common;

use std::time::Duration;

use common::{agent_binary, require_root};
use testbed::kubeproxy::{expected_nat_rules, nat_rule_count};
use testbed::lanes::{Lane, LaneKind, LaneOptions, ServiceSet, netns_output};

const SERVICES: usize = 20;
const ENDPOINTS: usize = 2;

/// What must be in a lane's node netns once the services are programmed.
enum Rules {
    /// No kube-proxy rules.
    None,
    /// `<save>` lists kube-proxy's nat rules (5 + S(2 + 3E)).
    Iptables { save: &'static str },
    /// Table `ip kube-proxy` maps every ClusterIP.
    Nftables,
    /// The agent synced every service port.
    Agent,
}

#[test]
fn every_lane_answers_from_the_right_backend() {
    require_root();
    let table = [
        (LaneKind::Bare, Rules::None, "no rules"),
        (LaneKind::BareConntrack, Rules::None, "no rules"),
        (
            LaneKind::IptablesLegacy,
            Rules::Iptables {
                save: "iptables-legacy-save",
            },
            "iptables-legacy-restore",
        ),
        (
            LaneKind::IptablesNft,
            Rules::Iptables {
                save: "iptables-nft-save",
            },
            "iptables-nft-restore",
        ),
        (LaneKind::Nftables, Rules::Nftables, "nft -f"),
        (LaneKind::Redirector, Rules::Agent, "agent (API watch)"),
    ];
    assert_eq!(table.len(), LaneKind::ALL.len(), "the table covers every lane");
    let options = LaneOptions {
        agent: Some(agent_binary().to_owned()),
        max_services: SERVICES,
        endpoints: ENDPOINTS,
    };
    let set = ServiceSet::new(SERVICES, ENDPOINTS);
    // A random position that differs from run to run, and never first or last.
    let random = 1 + (std::process::id() as usize * 7919) % (SERVICES - 2);
    for (kind, rules, loader) in table {
        let lane = kind.name();
        let mut built =
            Lane::new(kind, &options).unwrap_or_else(|e| panic!("{lane}: building the lane: {e}"));
        let programmed = built
            .program(&set, SERVICES, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{lane}: loading {SERVICES} services x {ENDPOINTS} endpoints: {e}"));
        assert_eq!(programmed.how, loader, "{lane}: programmed with {loader}");
        assert_eq!(programmed.services, SERVICES, "{lane}: every service programmed");
        match rules {
            Rules::None => {}
            Rules::Iptables { save } => {
                let dump = netns_output(&built.fixture.node, save, &["-t", "nat"])
                    .unwrap_or_else(|e| panic!("{lane}: {save}: {e}"));
                let text = format!("*nat\n{}", dump.split_once("*nat\n").map_or("", |(_, t)| t));
                assert_eq!(
                    nat_rule_count(&text),
                    expected_nat_rules(SERVICES, ENDPOINTS),
                    "{lane}: the nat table holds kube-proxy's 5 + S(2 + 3E) rules:\n{dump}"
                );
            }
            Rules::Nftables => {
                let map = netns_output(
                    &built.fixture.node,
                    "nft",
                    &["list", "map", "ip", "kube-proxy", "service-ips"],
                )
                .unwrap_or_else(|e| panic!("{lane}: listing service-ips: {e}"));
                assert_eq!(
                    map.matches("goto service-").count(),
                    SERVICES,
                    "{lane}: one service-ips element per service:\n{map}"
                );
            }
            Rules::Agent => {
                let log = built.agent().expect("the redirector lane runs the agent").log();
                assert!(
                    log.contains(&format!("synced {SERVICES} service ports")),
                    "{lane}: the agent synced every service port:\n{log}"
                );
            }
        }
        built
            .check(SERVICES, random)
            .unwrap_or_else(|e| panic!("{lane}: correctness check: {e}"));
    }
}
