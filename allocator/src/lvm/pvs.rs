//! Where the LVM backend's physical volumes come from: our own fsdax
//! namespaces in each libnvdimm region (the real thing), or block devices
//! named in the configuration (tests on loop devices; hosts whose PMEM is
//! already carved up).

use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

use crate::backend::{Backend, DeviceRequest, Placement};
use crate::error::{Error, Result};
use crate::space::Space;
use crate::units::{Bytes, MIB};
use crate::volume::Usage;

/// The physical volumes of one region, which become one volume group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvRegion {
    pub region: String,
    pub numa_node: i32,
    /// Block devices, e.g. `/dev/pmem0`.
    pub devices: Vec<String>,
}

pub trait PvSource: Send + Sync + Debug {
    /// The regions with their physical volumes, making or growing our share
    /// of each region first where the source can.
    fn prepare(&self) -> Result<Vec<PvRegion>>;
    fn describe(&self) -> String;
}

/// Block devices given by the operator, per region.
#[derive(Debug, Clone)]
pub struct DevicePvs(pub Vec<PvRegion>);

impl PvSource for DevicePvs {
    fn prepare(&self) -> Result<Vec<PvRegion>> {
        for r in &self.0 {
            for d in &r.devices {
                let m = std::fs::metadata(d).map_err(|e| {
                    Error::io(format!("physical volume {d} of region {}", r.region), e)
                })?;
                if !std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) {
                    return Err(Error::InvalidArgument(format!(
                        "physical volume {d} of region {} is not a block device",
                        r.region
                    )));
                }
            }
        }
        Ok(self.0.clone())
    }

    fn describe(&self) -> String {
        format!("configured block devices ({} regions)", self.0.len())
    }
}

/// Smallest namespace worth adding to a volume group.
const MIN_SHARE: u64 = 64 * MIB;
/// Bytes zeroed at the head of a new physical-volume namespace.
const PV_HEAD_WIPE: u64 = 4 * MIB;

/// Our fsdax namespaces in libnvdimm regions, made through the direct
/// backend (with its own `alt_name` marker, so the direct mode never takes
/// them for its orphans). `percentage` of each region is ours; a higher
/// percentage or space freed by others later adds a namespace.
#[derive(Debug)]
pub struct NamespacePvs {
    pub direct: Arc<crate::direct::DirectBackend>,
    pub percentage: u8,
}

impl NamespacePvs {
    fn region(&self, spec: &crate::RegionSpec) -> Result<PvRegion> {
        let allocated: Vec<_> = self
            .direct
            .reserved()?
            .into_iter()
            .filter(|a| a.region == spec.id)
            .collect();
        let mut devices = Vec::new();
        let mut have = 0u64;
        let mut names = Vec::new();
        for a in allocated.iter() {
            let Some(id) = &a.volume else { continue };
            let req = DeviceRequest {
                volume_id: id.clone(),
                region: spec.id.clone(),
                offset: a.offset,
                size: a.len,
                usage: Usage::AppDirect,
            };
            // After a reboot the claim may need enabling again.
            let dev = match self.direct.find(&req)? {
                Some(d) => d,
                None => self.direct.create(&req)?,
            };
            devices.extend(dev.path);
            have += a.len.0;
            names.push(id.clone());
        }
        let share = u128::from(spec.size.0) * u128::from(self.percentage) / 100;
        let target = Bytes(u64::try_from(share).unwrap_or(spec.size.0)).align_down(spec.align);
        if target.0 > have {
            let mut space = Space::new(spec, Placement::FirstFit);
            for a in &allocated {
                space.reserve_uncovered(&a.device, a.offset, a.len);
            }
            let want = Bytes(target.0 - have).min(space.largest_free());
            if want.0 >= MIN_SHARE.max(spec.align.0)
                && let Some((offset, _)) = space.fit(want, Placement::FirstFit)
            {
                let id = (0..)
                    .map(|n| format!("{}.{n}", spec.id))
                    .find(|n| !names.contains(n))
                    .unwrap_or_default();
                let req = DeviceRequest {
                    volume_id: id,
                    region: spec.id.clone(),
                    offset,
                    size: want,
                    usage: Usage::AppDirect,
                };
                tracing::info!(region = %spec.id, size = want.0, percentage = self.percentage, "creating a namespace for the volume group");
                self.direct.begin_create(&req)?;
                let dev = self.direct.create(&req)?;
                if let Some(p) = &dev.path {
                    // Not a volume: space that may never have been ours, so
                    // an old signature would make pvcreate stop and ask.
                    self.direct.zero_head(Path::new(p), PV_HEAD_WIPE)?;
                }
                devices.extend(dev.path);
            }
        }
        Ok(PvRegion {
            region: spec.id.clone(),
            numa_node: spec.numa_node,
            devices,
        })
    }
}

impl PvSource for NamespacePvs {
    fn prepare(&self) -> Result<Vec<PvRegion>> {
        let mut out = Vec::new();
        for spec in self.direct.regions()? {
            if let Some(why) = self.direct.unusable_reason(&spec.id) {
                tracing::warn!(region = %spec.id, "region not used for LVM: {why}");
                continue;
            }
            out.push(self.region(&spec)?);
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        format!("our fsdax namespaces ({}% of each region)", self.percentage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Owner;
    use crate::direct::model::Model;
    use crate::direct::namespace::ClaimKind;
    use crate::direct::{DirectBackend, DirectConfig};

    const M: u64 = 1 << 20;
    const G: u64 = 1 << 30;

    fn direct(m: &Arc<Model>, marker: &str) -> Arc<DirectBackend> {
        let cfg = DirectConfig {
            device_timeout: std::time::Duration::from_millis(200),
            marker: marker.to_owned(),
            namespace_align: None,
            ..DirectConfig::default()
        };
        Arc::new(DirectBackend::with(m.clone(), m.clone(), cfg).unwrap())
    }

    fn ours(m: &Model) -> Vec<(u64, u64)> {
        m.namespaces()
            .into_iter()
            .filter(|n| n.3.starts_with("pmem-agent-lvm:"))
            .map(|n| (n.1, n.2))
            .collect()
    }

    #[test]
    fn namespaces_take_the_share_and_grow_with_it() {
        let m = Arc::new(Model::new());
        m.labeled_region(G);
        m.labeled_region(G);
        m.ndctl_create(0, 64 * M, "theirs", Some(ClaimKind::Pfn))
            .unwrap();
        let half = NamespacePvs {
            direct: direct(&m, "pmem-agent-lvm:"),
            percentage: 50,
        };
        let got = half.prepare().unwrap();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|r| r.devices.len() == 1), "{got:?}");
        assert_eq!(ours(&m), [(64 * M, 512 * M), (0, 512 * M)]);
        // Idempotent: the share is there.
        half.prepare().unwrap();
        assert_eq!(ours(&m).len(), 2);
        let all = NamespacePvs {
            direct: direct(&m, "pmem-agent-lvm:"),
            percentage: 100,
        };
        let got = all.prepare().unwrap();
        assert!(got.iter().all(|r| r.devices.len() == 2), "{got:?}");
        // region0: what the foreign namespace leaves; region1: all of it.
        let mut sizes: Vec<u64> = ours(&m).iter().map(|n| n.1).collect();
        sizes.sort_unstable();
        assert_eq!(sizes, [448 * M, 512 * M, 512 * M, 512 * M]);
        // The direct mode sees these namespaces as foreign, never as orphans.
        let inv = direct(&m, crate::direct::MARKER).inventory().unwrap();
        assert!(inv.iter().all(|i| matches!(i.owner, Owner::Foreign(_))));
    }
}
