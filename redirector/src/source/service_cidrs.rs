//! The service ranges: the addresses ClusterIPs are allocated from. Traffic
//! to one that no Service holds is dropped, as kube-proxy's nftables mode
//! drops it, instead of being routed onward.
//!
//! In Kubernetes mode the ranges are the `spec.cidrs` of every ServiceCIDR
//! object (`networking.k8s.io/v1`, served from Kubernetes 1.33), gathered as
//! kube-proxy's `ServiceCIDRConfig` does and filtered to IPv4 as its nftables
//! proxier's `OnServiceCIDRsChanged` does for an IPv4 proxier. An API server
//! without the kind leaves `--service-cidr`, if given. Manifest mode has the
//! flag (default [`DEFAULT_SERVICE_CIDR`]), which also allocates the
//! clusterIPs the manifests leave out.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use redirector_common::config::MAX_SERVICE_CIDRS;

use super::Warning;
use crate::model::Ipv4Cidr;

/// `--service-cidr` in manifest mode when it is not given (kubeadm's default).
pub const DEFAULT_SERVICE_CIDR: Ipv4Cidr = Ipv4Cidr {
    addr: Ipv4Addr::new(10, 96, 0, 0),
    prefix_len: 12,
};

/// Where the ranges in force come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `--service-cidr`: manifest mode, or an API server without ServiceCIDR.
    Flag,
    /// The cluster's ServiceCIDR objects.
    ServiceCidrObjects,
    /// An API server without ServiceCIDR, and no `--service-cidr`.
    Unset,
}

/// The ranges the datapath holds, and where they come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRanges {
    pub origin: Origin,
    /// At most [`MAX_SERVICE_CIDRS`], host bits cleared, ordered by address,
    /// none inside another.
    pub cidrs: Vec<Ipv4Cidr>,
}

/// A range the datapath has no room for, and the ServiceCIDR naming it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeftOut {
    pub service_cidr: String,
    pub cidr: Ipv4Cidr,
}

impl fmt::Display for LeftOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (ServiceCIDR {})", self.cidr, self.service_cidr)
    }
}

impl ServiceRanges {
    /// The range of `--service-cidr`, or none.
    pub fn from_flag(flag: Option<Ipv4Cidr>) -> Self {
        match flag {
            Some(cidr) => Self {
                origin: Origin::Flag,
                cidrs: vec![network(cidr)],
            },
            None => Self {
                origin: Origin::Unset,
                cidrs: Vec::new(),
            },
        }
    }

    /// The union of the `spec.cidrs` of `objects` (name, cidrs). An entry
    /// that is not a CIDR is warned about and the rest apply; IPv6 ranges
    /// are skipped (the datapath handles IPv4 only); a range inside another
    /// adds nothing and is dropped. Beyond [`MAX_SERVICE_CIDRS`] ranges the
    /// rest are left out with a warning: fewer ranges only mean fewer drops.
    pub fn from_objects<'a>(
        objects: impl IntoIterator<Item = (&'a str, &'a [String])>,
    ) -> (Self, Vec<Warning>) {
        let mut warnings = Vec::new();
        // By (network address, prefix length): a range sorts after every
        // range that contains it. The first object naming a range keeps it.
        let mut found: BTreeMap<(u32, u8), &str> = BTreeMap::new();
        for (name, cidrs) in objects {
            for (index, text) in cidrs.iter().enumerate() {
                match text.parse::<Ipv4Cidr>() {
                    Ok(cidr) => {
                        let cidr = network(cidr);
                        found
                            .entry((u32::from(cidr.addr), cidr.prefix_len))
                            .or_insert(name);
                    }
                    Err(_) if is_ipv6_cidr(text) => tracing::debug!(
                        "ServiceCIDR {name}: spec.cidrs[{index}] {text} skipped: the datapath does not \
                         handle IPv6 yet"
                    ),
                    Err(_) => warnings.push(Warning::InvalidServiceCidr {
                        name: name.to_owned(),
                        index,
                        value: text.clone(),
                    }),
                }
            }
        }
        let mut cidrs: Vec<Ipv4Cidr> = Vec::new();
        let mut left_out = Vec::new();
        for ((addr, prefix_len), name) in found {
            let cidr = Ipv4Cidr {
                addr: Ipv4Addr::from(addr),
                prefix_len,
            };
            if cidrs.iter().any(|outer| outer.contains(cidr.addr)) {
                continue;
            }
            if cidrs.len() == MAX_SERVICE_CIDRS {
                left_out.push(LeftOut {
                    service_cidr: name.to_owned(),
                    cidr,
                });
            } else {
                cidrs.push(cidr);
            }
        }
        if !left_out.is_empty() {
            warnings.push(Warning::ServiceCidrsLeftOut { left_out });
        }
        let ranges = Self {
            origin: Origin::ServiceCidrObjects,
            cidrs,
        };
        (ranges, warnings)
    }
}

impl fmt::Display for ServiceRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.cidrs.is_empty() {
            f.write_str("none")?;
        }
        for (index, cidr) in self.cidrs.iter().enumerate() {
            if index > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{cidr}")?;
        }
        f.write_str(match self.origin {
            Origin::Flag => " (from --service-cidr)",
            Origin::ServiceCidrObjects if self.cidrs.is_empty() => {
                " (no ServiceCIDR object holds an IPv4 range): nothing is dropped by range"
            }
            Origin::ServiceCidrObjects => " (from the ServiceCIDR objects)",
            Origin::Unset => {
                " (the API server does not serve ServiceCIDR and --service-cidr is not set): nothing is \
                 dropped by range"
            }
        })
    }
}

/// `cidr` with its host bits cleared.
fn network(cidr: Ipv4Cidr) -> Ipv4Cidr {
    Ipv4Cidr {
        addr: Ipv4Addr::from(u32::from(cidr.addr) & cidr.mask()),
        prefix_len: cidr.prefix_len,
    }
}

fn is_ipv6_cidr(text: &str) -> bool {
    text.split_once('/').is_some_and(|(addr, len)| {
        addr.parse::<Ipv6Addr>().is_ok() && len.parse::<u8>().is_ok_and(|len| len <= 128)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Ipv4Cidr {
        text.parse().unwrap_or_else(|e| panic!("test CIDR {text}: {e}"))
    }

    fn strings(texts: &[&str]) -> Vec<String> {
        texts.iter().map(|t| t.to_string()).collect()
    }

    fn ranges(objects: &[(&str, Vec<String>)]) -> (ServiceRanges, Vec<Warning>) {
        ServiceRanges::from_objects(objects.iter().map(|(name, cidrs)| (*name, cidrs.as_slice())))
    }

    #[test]
    fn objects_give_the_union_of_their_ranges() {
        let (ranges, warnings) = ranges(&[
            ("kubernetes", strings(&["10.96.0.0/12", "fd00:10:96::/112"])),
            ("extra", strings(&["10.200.0.0/16"])),
            // The same range twice, and one inside another: nothing new.
            ("again", strings(&["10.200.0.0/16", "10.96.5.0/24"])),
        ]);
        assert_eq!(
            ranges.cidrs,
            vec![cidr("10.96.0.0/12"), cidr("10.200.0.0/16")],
            "both ranges, by address, once each"
        );
        assert_eq!(ranges.origin, Origin::ServiceCidrObjects, "origin");
        assert!(warnings.is_empty(), "IPv6 is skipped quietly: {warnings:?}");
        assert_eq!(
            ranges.to_string(),
            "10.96.0.0/12, 10.200.0.0/16 (from the ServiceCIDR objects)",
            "what the log says"
        );
    }

    #[test]
    fn a_wider_range_listed_later_still_covers_a_narrower_one() {
        let (ranges, _) = ranges(&[
            ("narrow", strings(&["10.96.1.0/24"])),
            ("wide", strings(&["10.96.0.0/12"])),
        ]);
        assert_eq!(ranges.cidrs, vec![cidr("10.96.0.0/12")], "only the wide range");
    }

    #[test]
    fn host_bits_are_cleared() {
        let (ranges, _) = ranges(&[("sloppy", strings(&["10.100.7.9/16"]))]);
        assert_eq!(ranges.cidrs, vec![cidr("10.100.0.0/16")], "the network address");
        assert_eq!(
            ServiceRanges::from_flag(Some(cidr("10.96.3.4/12"))).cidrs,
            vec![cidr("10.96.0.0/12")],
            "the flag's network address"
        );
    }

    #[test]
    fn a_bad_entry_is_warned_about_and_the_others_apply() {
        let (ranges, warnings) = ranges(&[
            ("bad", strings(&["10.200.0.0/16", "10.201.0.0/33", "banana"])),
            ("good", strings(&["10.96.0.0/12"])),
            ("bad-v6", strings(&["fd00::/129"])),
        ]);
        assert_eq!(
            ranges.cidrs,
            vec![cidr("10.96.0.0/12"), cidr("10.200.0.0/16")],
            "the valid ranges apply"
        );
        let invalid = |name: &str, index: usize, value: &str| Warning::InvalidServiceCidr {
            name: name.into(),
            index,
            value: value.into(),
        };
        assert_eq!(
            warnings,
            vec![
                invalid("bad", 1, "10.201.0.0/33"),
                invalid("bad", 2, "banana"),
                invalid("bad-v6", 0, "fd00::/129"),
            ],
            "one warning per bad entry, naming object and index"
        );
        assert_eq!(
            warnings[1].to_string(),
            "ServiceCIDR bad: spec.cidrs[2] \"banana\" is not a CIDR; ignored (the other service ranges apply)",
            "the warning names the object and the field"
        );
    }

    #[test]
    fn ranges_beyond_the_datapath_limit_are_left_out_with_a_warning() {
        let objects: Vec<(String, Vec<String>)> = (0..MAX_SERVICE_CIDRS + 2)
            .map(|i| (format!("cidr-{i}"), vec![format!("10.{}.0.0/16", 100 + i)]))
            .collect();
        let (ranges, warnings) = ServiceRanges::from_objects(
            objects
                .iter()
                .map(|(name, cidrs)| (name.as_str(), cidrs.as_slice())),
        );
        let kept: Vec<Ipv4Cidr> = (0..MAX_SERVICE_CIDRS)
            .map(|i| cidr(&format!("10.{}.0.0/16", 100 + i)))
            .collect();
        assert_eq!(ranges.cidrs, kept, "the first ranges by address are kept");
        let left_out: Vec<LeftOut> = (MAX_SERVICE_CIDRS..MAX_SERVICE_CIDRS + 2)
            .map(|i| LeftOut {
                service_cidr: format!("cidr-{i}"),
                cidr: cidr(&format!("10.{}.0.0/16", 100 + i)),
            })
            .collect();
        assert_eq!(
            warnings,
            vec![Warning::ServiceCidrsLeftOut { left_out }],
            "one warning naming what was left out"
        );
        assert_eq!(
            warnings[0].to_string(),
            "the datapath holds 4 service ranges; unused addresses of 10.104.0.0/16 (ServiceCIDR cidr-4), \
             10.105.0.0/16 (ServiceCIDR cidr-5) are not dropped",
            "the warning's text"
        );
    }

    #[test]
    fn no_object_means_no_range() {
        let (ranges, warnings) = ranges(&[("v6-only", strings(&["fd00:10:96::/112"]))]);
        assert!(ranges.cidrs.is_empty(), "no IPv4 range: {ranges:?}");
        assert!(warnings.is_empty(), "nothing to warn of: {warnings:?}");
        let (none, _) = ServiceRanges::from_objects(std::iter::empty());
        assert!(none.cidrs.is_empty(), "no object: {none:?}");
        assert!(
            none.to_string().starts_with("none (no ServiceCIDR object"),
            "the log says why nothing is dropped: {none}"
        );
    }

    #[test]
    fn the_flag_is_the_fallback() {
        let flag = ServiceRanges::from_flag(Some(DEFAULT_SERVICE_CIDR));
        assert_eq!(flag.origin, Origin::Flag, "origin of the flag's range");
        assert_eq!(flag.to_string(), "10.96.0.0/12 (from --service-cidr)", "log text");
        let unset = ServiceRanges::from_flag(None);
        assert_eq!(
            (unset.origin, unset.cidrs.len()),
            (Origin::Unset, 0),
            "no flag: no range"
        );
    }
}
