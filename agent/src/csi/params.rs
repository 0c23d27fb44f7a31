//! Validation of what CSI requests carry: StorageClass parameters, volume
//! capabilities, capacity ranges and topology. Shared by the controller and
//! the node (ephemeral inline volumes).

use std::collections::{BTreeMap, HashMap};

use pmem_allocator::{Bytes, Usage};
use pmem_proto::csi;
use pmem_proto::csi::volume_capability::AccessType;
use pmem_proto::csi::volume_capability::access_mode::Mode;

use crate::config::TOPOLOGY_KEY;
use crate::error::{AgentResult, invalid, quote};

/// Prefix of the keys the Kubernetes sidecars add; accepted and kept.
const K8S_PREFIX: &str = "csi.storage.k8s.io/";

/// Longest volume id (and other ids) we accept: the CSI spec's limit for
/// string fields. Ours are 37 bytes; an ephemeral volume's kubelet id is 68.
pub const ID_MAX: usize = 128;
/// Longest volume name (external-provisioner's are `pvc-<uuid>`, 40 bytes).
pub const NAME_MAX: usize = 256;
/// Longest key and value of a parameter or context map, and the whole map.
pub const MAP_KEY_MAX: usize = 256;
pub const MAP_VALUE_MAX: usize = 4096;
pub const MAP_TOTAL_MAX: usize = 16 << 10;

/// INVALID_ARGUMENT when `value` is longer than `max` bytes; the message
/// quotes a bounded prefix of it.
pub fn check_len(field: &str, value: &str, max: usize) -> AgentResult<()> {
    if value.len() > max {
        return Err(invalid(format!(
            "{field} is {} bytes, more than the {max} allowed: {}",
            value.len(),
            quote(value)
        )));
    }
    Ok(())
}

/// Longest path a request may carry (Linux PATH_MAX, with its NUL).
pub const PATH_MAX: usize = 4096;

/// Request paths of at most [`PATH_MAX`] bytes, so no message or log line
/// echoes more than a bounded prefix of an oversized one. What a path may
/// be beyond its length is judged where it is resolved.
pub fn check_path_lengths(fields: &[(&str, &str)]) -> AgentResult<()> {
    fields
        .iter()
        .try_for_each(|(field, value)| check_len(field, value, PATH_MAX - 1))
}

/// A required id field (volume_id, ...): present and at most [`ID_MAX`].
pub fn check_id(field: &str, value: &str) -> AgentResult<()> {
    if value.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    check_len(field, value, ID_MAX)
}

/// A map of strings from a request (parameters, volume_context, ...):
/// bounded keys, values and total size.
pub fn check_map(field: &str, m: &HashMap<String, String>) -> AgentResult<()> {
    let mut total = 0usize;
    let mut keys: Vec<&String> = m.keys().collect();
    keys.sort();
    for k in keys {
        check_len(&format!("{field} key"), k, MAP_KEY_MAX)?;
        check_len(&format!("{field}[{}]", quote(k)), &m[k], MAP_VALUE_MAX)?;
        total = total.saturating_add(k.len() + m[k].len());
    }
    if total > MAP_TOTAL_MAX {
        return Err(invalid(format!(
            "{field} holds {total} bytes, more than the {MAP_TOTAL_MAX} allowed"
        )));
    }
    Ok(())
}

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
    parse_parameters_with(params, &[])
}

/// [`parse_parameters`] for a caller that consumed `extra` keys itself
/// (an inline volume's `size`): they are named among the known keys.
pub fn parse_parameters_with(
    params: &HashMap<String, String>,
    extra: &[&str],
) -> AgentResult<VolumeParams> {
    check_map("parameters", params)?;
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
                invalid(format!(
                    "parameter {k}={}: must be AppDirect or FileIO",
                    quote(v)
                ))
            })?;
        } else if lower == "eraseafter" {
            erase_after = match v.to_ascii_lowercase().as_str() {
                "true" => true,
                "false" => false,
                _ => {
                    return Err(invalid(format!(
                        "parameter {k}={}: must be true or false",
                        quote(v)
                    )));
                }
            };
        } else if lower.starts_with(K8S_PREFIX) {
            stored.insert(k.clone(), v.clone());
        } else {
            let extra: String = extra.iter().map(|e| format!("{e}, ")).collect();
            return Err(invalid(format!(
                "unknown parameter {} (known: {extra}usage, eraseAfter, {K8S_PREFIX}*)",
                quote(k)
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

/// The smallest ext4 that mkfs.ext4 (4 KiB blocks) still gives a journal.
pub const EXT4_MIN_BYTES: u64 = 8 << 20;

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Xfs => "xfs",
            FsType::Ext4 => "ext4",
        }
    }

    /// The smallest device this filesystem can be made on.
    pub fn min_bytes(self) -> u64 {
        match self {
            FsType::Xfs => crate::mount::XFS_MIN_BYTES,
            FsType::Ext4 => EXT4_MIN_BYTES,
        }
    }
}

/// The largest filesystem minimum among the mount capabilities (0 when
/// there is none): what a volume for them must hold at least.
pub fn fs_minimum(caps: &[Capability]) -> Option<(FsType, u64)> {
    caps.iter()
        .filter_map(|c| match c.access {
            Access::Mount { fs, .. } => Some((fs, fs.min_bytes())),
            Access::Block => None,
        })
        .max_by_key(|(_, b)| *b)
}

/// Raises `required` to the filesystem minimum of `caps` when `limit`
/// allows it (the spec lets a plugin return more than required); otherwise
/// OUT_OF_RANGE naming the minimum.
pub fn apply_fs_minimum(
    caps: &[Capability],
    required: Bytes,
    limit: Option<Bytes>,
) -> AgentResult<Bytes> {
    let Some((fs, min)) = fs_minimum(caps) else {
        return Ok(required);
    };
    if required.0 >= min {
        return Ok(required);
    }
    if let Some(l) = limit
        && l.0 < min
    {
        return Err(crate::error::AgentError::OutOfRange(format!(
            "capacity_range.limit_bytes {} is below the {} an {} filesystem needs; allow at least {min} bytes or use another fs_type",
            l.0,
            Bytes(min),
            fs.as_str()
        )));
    }
    Ok(Bytes(min))
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
                        "{field}.mount.fs_type {} is not supported (xfs or ext4)",
                        quote(other)
                    )));
                }
            };
            for f in &m.mount_flags {
                if f.is_empty() || f.contains(char::is_whitespace) {
                    return Err(invalid(format!(
                        "{field}.mount.mount_flags entry {} is malformed",
                        quote(f)
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
    // Echo a bounded part of what the request asked for.
    const SHOWN: usize = 4;
    let mut wanted: Vec<String> = list
        .iter()
        .take(SHOWN)
        .map(|t| {
            let mut kv: Vec<_> = t
                .segments
                .iter()
                .take(SHOWN)
                .map(|(k, v)| format!("{}={}", quote(k), quote(v)))
                .collect();
            kv.sort();
            format!("{{{}}}", kv.join(","))
        })
        .collect();
    if list.len() > SHOWN {
        wanted.push(format!("… ({} topologies in all)", list.len()));
    }
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
    fn field_limits_quote_a_bounded_prefix() {
        check_id("volume_id", &"i".repeat(ID_MAX)).unwrap();
        let e = check_id("volume_id", &"i".repeat(3 << 20)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let msg = e.to_string();
        assert!(
            msg.len() < 300 && msg.contains("volume_id") && msg.contains("3145728"),
            "{msg}"
        );
        assert!(
            check_id("volume_id", "")
                .unwrap_err()
                .to_string()
                .contains("required")
        );
        let e = parse_parameters(&m(&[("usage", &"x".repeat(1 << 20))])).unwrap_err();
        assert!(e.to_string().len() < 400, "{e}");
        let e = parse_parameters(&m(&[(&"k".repeat(1 << 20), "v")])).unwrap_err();
        assert!(e.to_string().len() < 400, "{e}");
        let many: HashMap<String, String> = (0..100)
            .map(|i| (format!("{K8S_PREFIX}k{i}"), "v".repeat(400)))
            .collect();
        let e = check_map("parameters", &many).unwrap_err();
        assert!(e.to_string().contains("more than the"), "{e}");
        let e = parse_parameters_with(&m(&[("colour", "red")]), &["size"]).unwrap_err();
        assert!(e.to_string().contains("known: size, usage"), "{e}");
    }

    #[test]
    fn volumes_hold_their_filesystem() {
        let mount = |fs| Capability {
            access: Access::Mount { fs, flags: vec![] },
            mode: Mode::SingleNodeWriter,
        };
        let block = Capability {
            access: Access::Block,
            mode: Mode::SingleNodeWriter,
        };
        let xfs_min = Bytes(crate::mount::XFS_MIN_BYTES);
        let caps = [mount(FsType::Xfs)];
        assert_eq!(
            apply_fs_minimum(&caps, Bytes::mib(256), None).unwrap(),
            xfs_min
        );
        assert_eq!(
            apply_fs_minimum(&caps, Bytes::ZERO, Some(Bytes::gib(1))).unwrap(),
            xfs_min
        );
        assert_eq!(
            apply_fs_minimum(&caps, Bytes::gib(1), None).unwrap(),
            Bytes::gib(1)
        );
        let e = apply_fs_minimum(&caps, Bytes::mib(256), Some(Bytes::mib(256))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        assert!(
            e.to_string().contains("300MiB") && e.to_string().contains("xfs"),
            "{e}"
        );
        let ext4 = [mount(FsType::Ext4)];
        assert_eq!(
            apply_fs_minimum(&ext4, Bytes::mib(1), None).unwrap(),
            Bytes(EXT4_MIN_BYTES)
        );
        assert_eq!(
            apply_fs_minimum(std::slice::from_ref(&block), Bytes::mib(1), None).unwrap(),
            Bytes::mib(1)
        );
        // The largest minimum among the capabilities wins.
        assert_eq!(
            fs_minimum(&[block, mount(FsType::Ext4), mount(FsType::Xfs)])
                .unwrap()
                .0,
            FsType::Xfs
        );
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
