//! Validation of what CSI requests carry: StorageClass parameters, volume
//! capabilities, capacity ranges and topology. Shared by the controller and
//! the node (ephemeral inline volumes).

use std::collections::{BTreeMap, HashMap};

use pmem_allocator::{Bytes, Usage};
use pmem_proto::csi;
use pmem_proto::csi::volume_capability::AccessType;
use pmem_proto::csi::volume_capability::access_mode::Mode;

use crate::config::TOPOLOGY_KEY;
use crate::error::{AgentResult, invalid};

/// Prefix of the keys the Kubernetes sidecars add; accepted and kept.
const K8S_PREFIX: &str = "csi.storage.k8s.io/";

/// Our parameters after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParams {
    pub usage: Usage,
    pub erase_after: bool,
    /// Normalised map stored in the ledger: our keys in canonical spelling
    /// plus the sidecars' keys as given.
    pub stored: BTreeMap<String, String>,
}

/// Parses StorageClass parameters: keys match case-insensitively, unknown
/// keys are rejected naming the key.
pub fn parse_parameters(params: &HashMap<String, String>) -> AgentResult<VolumeParams> {
    let mut usage = Usage::AppDirect;
    let mut erase_after = true;
    let mut stored = BTreeMap::new();
    let mut keys: Vec<_> = params.keys().collect();
    keys.sort();
    for k in keys {
        let v = &params[k];
        let lower = k.to_ascii_lowercase();
        if lower == "usage" {
            usage = v.parse().map_err(|_| {
                invalid(format!("parameter {k}={v:?}: must be AppDirect or FileIO"))
            })?;
        } else if lower == "eraseafter" {
            erase_after = match v.to_ascii_lowercase().as_str() {
                "true" => true,
                "false" => false,
                _ => {
                    return Err(invalid(format!(
                        "parameter {k}={v:?}: must be true or false"
                    )));
                }
            };
        } else if lower.starts_with(K8S_PREFIX) {
            stored.insert(k.clone(), v.clone());
        } else {
            return Err(invalid(format!(
                "unknown parameter {k:?} (known: usage, eraseAfter, {K8S_PREFIX}*)"
            )));
        }
    }
    stored.insert("usage".into(), usage.as_str().into());
    stored.insert("eraseAfter".into(), erase_after.to_string());
    Ok(VolumeParams {
        usage,
        erase_after,
        stored,
    })
}

/// Filesystem types we format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Xfs,
    Ext4,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Xfs => "xfs",
            FsType::Ext4 => "ext4",
        }
    }
}

/// A validated capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Block,
    Mount { fs: FsType, flags: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access: Access,
    pub mode: Mode,
}

impl Capability {
    /// Readers only.
    pub fn read_only(&self) -> bool {
        self.mode == Mode::SingleNodeReaderOnly
    }

    /// Stable text for the ledger, to compare a repeated stage/publish.
    pub fn describe(&self) -> String {
        match &self.access {
            Access::Block => format!("block;{}", self.mode.as_str_name()),
            Access::Mount { fs, flags } => {
                format!(
                    "mount;{};{};{}",
                    fs.as_str(),
                    flags.join(","),
                    self.mode.as_str_name()
                )
            }
        }
    }
}

/// Validates one capability; `field` names it in messages.
pub fn parse_capability(field: &str, cap: &csi::VolumeCapability) -> AgentResult<Capability> {
    let mode_raw = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| invalid(format!("{field}.access_mode is required")))?
        .mode;
    let mode = Mode::try_from(mode_raw).map_err(|_| {
        invalid(format!(
            "{field}.access_mode.mode {mode_raw} is not a known mode"
        ))
    })?;
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => {}
        other => {
            return Err(invalid(format!(
                "{field}.access_mode.mode {} is not supported: pmem-agent volumes are local to one node (use SINGLE_NODE_WRITER, SINGLE_NODE_SINGLE_WRITER, SINGLE_NODE_MULTI_WRITER or SINGLE_NODE_READER_ONLY)",
                other.as_str_name()
            )));
        }
    }
    let access = match &cap.access_type {
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            let fs = match m.fs_type.as_str() {
                "" | "xfs" => FsType::Xfs,
                "ext4" => FsType::Ext4,
                other => {
                    return Err(invalid(format!(
                        "{field}.mount.fs_type {other:?} is not supported (xfs or ext4)"
                    )));
                }
            };
            for f in &m.mount_flags {
                if f.is_empty() || f.contains(char::is_whitespace) {
                    return Err(invalid(format!(
                        "{field}.mount.mount_flags entry {f:?} is malformed"
                    )));
                }
            }
            Access::Mount {
                fs,
                flags: m.mount_flags.clone(),
            }
        }
        None => {
            return Err(invalid(format!(
                "{field}.access_type must be mount or block"
            )));
        }
    };
    Ok(Capability { access, mode })
}

pub fn parse_capabilities(
    field: &str,
    caps: &[csi::VolumeCapability],
) -> AgentResult<Vec<Capability>> {
    if caps.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    caps.iter()
        .enumerate()
        .map(|(i, c)| parse_capability(&format!("{field}[{i}]"), c))
        .collect()
}

/// Required and limit bytes; `None` limit means unlimited.
pub fn parse_range(
    field: &str,
    r: Option<&csi::CapacityRange>,
) -> AgentResult<(Bytes, Option<Bytes>)> {
    let Some(r) = r else {
        return Ok((Bytes::ZERO, None));
    };
    let required = u64::try_from(r.required_bytes).map_err(|_| {
        invalid(format!(
            "{field}.required_bytes {} is negative",
            r.required_bytes
        ))
    })?;
    let limit = u64::try_from(r.limit_bytes)
        .map_err(|_| invalid(format!("{field}.limit_bytes {} is negative", r.limit_bytes)))?;
    if limit != 0 && limit < required {
        return Err(invalid(format!(
            "{field}.limit_bytes {limit} is below required_bytes {required}"
        )));
    }
    Ok((Bytes(required), (limit != 0).then_some(Bytes(limit))))
}

/// Our topology segment.
pub fn node_topology(node_id: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), node_id.to_owned())]),
    }
}

/// Whether a topology segment names this node.
pub fn topology_matches(t: &csi::Topology, node_id: &str) -> bool {
    t.segments.get(TOPOLOGY_KEY).is_some_and(|n| n == node_id)
}

/// Checks accessibility requirements: `Ok(())` when they admit this node,
/// `Err(message)` otherwise.
pub fn check_accessibility(
    req: Option<&csi::TopologyRequirement>,
    node_id: &str,
) -> Result<(), String> {
    let Some(req) = req else {
        return Ok(());
    };
    if req.requisite.is_empty() && req.preferred.is_empty() {
        return Ok(());
    }
    let list = if req.requisite.is_empty() {
        &req.preferred
    } else {
        &req.requisite
    };
    if list.iter().any(|t| topology_matches(t, node_id)) {
        return Ok(());
    }
    let wanted: Vec<String> = list
        .iter()
        .map(|t| {
            let mut kv: Vec<_> = t.segments.iter().map(|(k, v)| format!("{k}={v}")).collect();
            kv.sort();
            format!("{{{}}}", kv.join(","))
        })
        .collect();
    Err(format!(
        "accessibility_requirements ask for {} but this pmem-agent serves only {TOPOLOGY_KEY}={node_id}",
        wanted.join(" or ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    #[test]
    fn parameters_are_case_insensitive_and_strict() {
        let p = parse_parameters(&m(&[("USAGE", "fileio"), ("EraseAfter", "FALSE")])).unwrap();
        assert_eq!(p.usage, Usage::FileIo);
        assert!(!p.erase_after);
        let p = parse_parameters(&m(&[("csi.storage.k8s.io/pvc/name", "x")])).unwrap();
        assert_eq!(p.usage, Usage::AppDirect);
        assert!(p.erase_after);
        let e = parse_parameters(&m(&[("size", "1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"size\""), "{e}");
        assert!(parse_parameters(&m(&[("usage", "dax")])).is_err());
        assert!(parse_parameters(&m(&[("eraseAfter", "yes")])).is_err());
    }

    #[test]
    fn ranges() {
        let r = csi::CapacityRange {
            required_bytes: 10,
            limit_bytes: 5,
        };
        assert!(parse_range("capacity_range", Some(&r)).is_err());
        let r = csi::CapacityRange {
            required_bytes: -1,
            limit_bytes: 0,
        };
        assert!(parse_range("capacity_range", Some(&r)).is_err());
        assert_eq!(parse_range("c", None).unwrap(), (Bytes(0), None));
    }

    #[test]
    fn topology() {
        let t = node_topology("n1");
        let req = csi::TopologyRequirement {
            requisite: vec![node_topology("n2")],
            preferred: vec![],
        };
        assert!(check_accessibility(Some(&req), "n1").is_err());
        let req = csi::TopologyRequirement {
            requisite: vec![node_topology("n2"), t],
            preferred: vec![],
        };
        assert!(check_accessibility(Some(&req), "n1").is_ok());
        assert!(check_accessibility(None, "n1").is_ok());
    }
}
