//! Volumes as the ledger records them, and their state machine.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::units::Bytes;

/// Lifecycle of a volume. Transitions (enforced by [`VolumeState::can_become`]):
///
/// ```text
///   (none) ──create intent──▶ Creating ──device made──▶ Ready
///   Creating ──device failed, undone──▶ (row removed)
///   Ready ──delete intent──▶ Deleting ──device retired──▶ Erasing ──zeroed, destroyed──▶ (row removed)
///                            Deleting ──device gone, no erase (single-tenant node)──▶ (row removed)
///   Deleting ──device refused (in use), still intact──▶ Ready
///   Creating ──delete while interrupted──▶ Deleting
/// ```
///
/// The extent stays reserved in every state, so capacity being erased is never
/// reported as available. A crash leaves the state and an intent in the
/// ledger; reconciliation drives Creating forward to Ready and Deleting
/// forward to Erasing or removal; the background eraser (`erase.rs`) takes
/// Erasing to removal. `Deleting → Ready` is the undo of a delete whose
/// device refused to go (mounted, or open exclusively) before it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VolumeState {
    Creating,
    Ready,
    Deleting,
    Erasing,
}

impl VolumeState {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Creating => "creating",
            VolumeState::Ready => "ready",
            VolumeState::Deleting => "deleting",
            VolumeState::Erasing => "erasing",
        }
    }

    /// The allowed edges of the state machine above.
    pub fn can_become(self, next: VolumeState) -> bool {
        use VolumeState::*;
        matches!(
            (self, next),
            (Creating, Ready)
                | (Creating, Deleting)
                | (Ready, Deleting)
                | (Deleting, Ready)
                | (Deleting, Erasing)
        )
    }

    pub const ALL: [VolumeState; 4] = [
        VolumeState::Creating,
        VolumeState::Ready,
        VolumeState::Deleting,
        VolumeState::Erasing,
    ];
}

impl fmt::Display for VolumeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VolumeState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        VolumeState::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| format!("unknown volume state {s:?}"))
    }
}

/// How the volume is used: AppDirect (fsdax, mounted with dax) or FileIO
/// (no dax; sector mode where the backend has it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Usage {
    AppDirect,
    FileIo,
}

impl Usage {
    pub fn as_str(self) -> &'static str {
        match self {
            Usage::AppDirect => "AppDirect",
            Usage::FileIo => "FileIO",
        }
    }
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Usage {
    type Err = String;
    /// Case-insensitive, as StorageClass parameters are.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("appdirect") {
            Ok(Usage::AppDirect)
        } else if s.eq_ignore_ascii_case("fileio") {
            Ok(Usage::FileIo)
        } else {
            Err(format!("usage {s:?} is not AppDirect or FileIO"))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Persistency {
    Persistent,
    Ephemeral,
}

impl Persistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Persistency::Persistent => "persistent",
            Persistency::Ephemeral => "ephemeral",
        }
    }
}

impl FromStr for Persistency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "persistent" => Ok(Persistency::Persistent),
            "ephemeral" => Ok(Persistency::Ephemeral),
            _ => Err(format!("unknown persistency {s:?}")),
        }
    }
}

/// A volume row of the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub id: String,
    /// The CSI name (unique).
    pub name: String,
    pub region: String,
    pub offset: Bytes,
    /// Extent length; the device size.
    pub size: Bytes,
    /// What the client asked for (required bytes, 0 = minimum).
    pub requested: Bytes,
    pub usage: Usage,
    pub erase_after: bool,
    /// Normalised StorageClass parameters, as given.
    pub parameters: BTreeMap<String, String>,
    pub persistency: Persistency,
    /// Pod information for ephemeral volumes (from volume_context).
    pub context: BTreeMap<String, String>,
    pub state: VolumeState,
    /// Block device path once attached (absent in file-only mode).
    pub device: Option<String>,
    /// Insertion order, for stable listing.
    pub seq: i64,
}

/// Where a volume is staged or published on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub volume_id: String,
    pub kind: PublicationKind,
    pub path: String,
    pub readonly: bool,
    /// Opaque description of the capability the node used (for idempotency).
    pub capability: String,
    /// `st_rdev` of the volume's block device when it was staged or
    /// published: a mount found at `path` is ours only if it shows this
    /// device. `None` for rows written before it was recorded.
    pub device: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PublicationKind {
    Stage,
    Publish,
}

impl PublicationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PublicationKind::Stage => "stage",
            PublicationKind::Publish => "publish",
        }
    }
}

impl FromStr for PublicationKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stage" => Ok(PublicationKind::Stage),
            "publish" => Ok(PublicationKind::Publish),
            _ => Err(format!("unknown publication kind {s:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_machine_edges() {
        use VolumeState::*;
        assert!(Creating.can_become(Ready));
        assert!(Ready.can_become(Deleting));
        assert!(Deleting.can_become(Erasing));
        assert!(!Ready.can_become(Creating));
        assert!(!Erasing.can_become(Ready));
        assert!(!Erasing.can_become(Deleting));
        // The undo of a delete the device refused.
        assert!(Deleting.can_become(Ready));
        assert!(!Deleting.can_become(Creating));
        for s in VolumeState::ALL {
            assert_eq!(s.as_str().parse::<VolumeState>().unwrap(), s);
        }
    }

    #[test]
    fn usage_is_case_insensitive() {
        assert_eq!("appdirect".parse::<Usage>().unwrap(), Usage::AppDirect);
        assert_eq!("FILEIO".parse::<Usage>().unwrap(), Usage::FileIo);
        assert!("dax".parse::<Usage>().is_err());
    }
}
