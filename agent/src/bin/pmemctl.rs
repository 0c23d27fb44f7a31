//! `pmemctl`: the operator CLI. Talks to the admin socket for regions,
//! volumes and reconciliation, and to the CSI socket to drive volumes by hand.

use std::collections::HashMap;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pmem_agent::client::connect;
use pmem_agent::config::{DEFAULT_ADMIN_ENDPOINT, DEFAULT_ENDPOINT};

use pmem_allocator::units::parse_size;
use pmem_proto::admin::admin_client::AdminClient;
use pmem_proto::csi;
use pmem_proto::csi::controller_client::ControllerClient;
use pmem_proto::csi::identity_client::IdentityClient;
use pmem_proto::csi::node_client::NodeClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(version, about = "Operate a pmem-agent daemon")]
struct Cli {
    /// Admin socket of the daemon.
    #[arg(long, global = true, env = "PMEM_AGENT_ADMIN_ENDPOINT", default_value = DEFAULT_ADMIN_ENDPOINT)]
    admin_endpoint: String,
    /// CSI socket of the daemon.
    #[arg(long, global = true, env = "CSI_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    endpoint: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Plugin name, version and readiness (exit 1 when not ready).
    Identity,
    /// Regions with capacity and an extent map.
    Regions,
    /// Volumes, optionally filtered.
    Volumes {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        persistency: Option<String>,
    },
    /// One volume in detail.
    Volume { id: String },
    /// Diff ledger and devices (dry run unless --apply).
    Reconcile {
        #[arg(long)]
        apply: bool,
        #[arg(long)]
        remove_orphans: bool,
    },
    /// Devices of ours that no volume owns.
    Orphans,
    /// The ledger's identity, and recovery of a refused ledger.
    #[command(subcommand)]
    Ledger(LedgerCmd),
    /// Recovery of a lost region (its identity missing or another ledger's).
    #[command(subcommand)]
    Region(RegionCmd),
    /// Drive the CSI socket by hand.
    #[command(subcommand)]
    Csi(CsiCmd),
}

#[derive(Debug, Subcommand)]
enum LedgerCmd {
    /// Identity, and why the ledger is refused or which regions are lost.
    Status,
    /// Re-create the ledger's rows from the markers of our devices (only
    /// for a refused ledger). A dry run that lists them unless --apply.
    Rebuild {
        #[arg(long)]
        apply: bool,
    },
}

#[derive(Debug, Subcommand)]
enum RegionCmd {
    /// Drop a lost region's volumes from the ledger (they are listed; the
    /// devices are not touched); the region is stamped again if it carries
    /// no other ledger's identity.
    Forget { region: String },
    /// ERASE a lost region: our devices and their data go, its volumes are
    /// dropped from the ledger, and it is stamped with this ledger's
    /// identity. Needs --yes.
    Reinit {
        region: String,
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CsiCmd {
    /// GetCapacity (and NodeGetInfo).
    Capacity {
        #[arg(long, default_value = "AppDirect")]
        usage: String,
    },
    /// CreateVolume.
    Create {
        name: String,
        #[arg(long, default_value = "0")]
        size: String,
        #[arg(long)]
        limit: Option<String>,
        #[arg(long, default_value = "AppDirect")]
        usage: String,
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        erase_after: bool,
        /// Raw block instead of a filesystem.
        #[arg(long)]
        block: bool,
        #[arg(long, default_value = "xfs")]
        fs: String,
    },
    /// DeleteVolume.
    Delete { id: String },
    /// ListVolumes.
    List,
    /// ControllerExpandVolume then, with --node-path, NodeExpandVolume.
    Expand {
        id: String,
        size: String,
        #[arg(long)]
        node_path: Option<String>,
    },
    /// NodeStageVolume.
    Stage {
        id: String,
        staging_path: String,
        #[arg(long)]
        block: bool,
        #[arg(long, default_value = "xfs")]
        fs: String,
    },
    /// NodeUnstageVolume.
    Unstage { id: String, staging_path: String },
    /// NodePublishVolume. A CSI ephemeral inline volume: `--ephemeral
    /// --context size=1Gi` with an empty staging path ('').
    Publish {
        id: String,
        staging_path: String,
        target_path: String,
        #[arg(long)]
        block: bool,
        #[arg(long, default_value = "xfs")]
        fs: String,
        #[arg(long)]
        readonly: bool,
        /// volume_context entry KEY=VALUE (repeatable).
        #[arg(long = "context", value_name = "KEY=VALUE", value_parser = key_value)]
        context: Vec<(String, String)>,
        /// Sets volume_context csi.storage.k8s.io/ephemeral=true, as the
        /// kubelet does for an inline volume.
        #[arg(long)]
        ephemeral: bool,
    },
    /// NodeUnpublishVolume.
    Unpublish { id: String, target_path: String },
    /// NodeGetVolumeStats.
    Stats { id: String, path: String },
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

fn size(s: &str) -> Result<i64, String> {
    let b = parse_size(s)?;
    i64::try_from(b.0).map_err(|_| format!("size {s} too large"))
}

fn capability(block: bool, fs: &str, readonly: bool) -> csi::VolumeCapability {
    use csi::volume_capability::{
        AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
    };
    csi::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: if readonly {
                Mode::SingleNodeReaderOnly
            } else {
                Mode::SingleNodeWriter
            } as i32,
        }),
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: fs.to_owned(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            })
        }),
    }
}

fn human(b: u64) -> String {
    let g = 1u64 << 30;
    let m = 1u64 << 20;
    if b >= g {
        format!("{:.2}GiB", b as f64 / g as f64)
    } else {
        format!("{:.1}MiB", b as f64 / m as f64)
    }
}

/// One line that shows used (#), erasing/other (~) and free (.) space.
fn extent_bar(r: &pmem_proto::admin::Region, width: u64) -> String {
    let mut bar = vec!['.'; width as usize];
    for e in &r.extents {
        if (e.volume_id.is_empty() && !e.reserved) || r.size_bytes == 0 {
            continue;
        }
        let a = e.offset_bytes * width / r.size_bytes;
        let b = ((e.offset_bytes + e.size_bytes) * width)
            .div_ceil(r.size_bytes)
            .min(width);
        let c = match (e.reserved, e.state.as_str()) {
            (true, _) => 'x',
            (false, "ready") => '#',
            _ => '~',
        };
        for x in bar.iter_mut().take(b as usize).skip(a as usize) {
            *x = c;
        }
    }
    bar.into_iter().collect()
}

/// A client of the admin socket.
async fn admin(cli: &Cli) -> Result<AdminClient<Channel>, String> {
    Ok(AdminClient::new(connect(&cli.admin_endpoint).await?))
}

/// Success when `ok`, else 1 (a check that found something wrong).
fn exit_code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn run(cli: Cli) -> Result<ExitCode, String> {
    let out = |v: Value, table: String| {
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        } else {
            print!("{table}");
        }
    };
    let st = |e: tonic::Status| format!("{:?}: {}", e.code(), e.message());
    match &cli.cmd {
        Cmd::Identity => {
            let mut c = IdentityClient::new(connect(&cli.endpoint).await?);
            let info = c
                .get_plugin_info(csi::GetPluginInfoRequest {})
                .await
                .map_err(st)?
                .into_inner();
            let ready = c
                .probe(csi::ProbeRequest {})
                .await
                .map_err(st)?
                .into_inner()
                .ready
                .unwrap_or(false);
            out(
                json!({"name": info.name, "version": info.vendor_version, "manifest": info.manifest, "ready": ready}),
                format!("{} {} ready={ready}\n", info.name, info.vendor_version),
            );
            return Ok(exit_code(ready));
        }
        Cmd::Regions => {
            let mut c = admin(&cli).await?;
            let r = c
                .list_regions(pmem_proto::admin::ListRegionsRequest {})
                .await
                .map_err(st)?
                .into_inner();
            let mut t = format!(
                "{:<10} {:<6} {:>10} {:>10} {:>10} {:>6} {:>5}  map (# used, ~ erasing/creating, x foreign/orphan, . free)\n",
                "REGION", "KIND", "SIZE", "AVAILABLE", "LARGEST", "SLOTS", "NUMA"
            );
            for g in &r.regions {
                t += &format!(
                    "{:<10} {:<6} {:>10} {:>10} {:>10} {:>6} {:>5}  [{}]\n",
                    g.id,
                    g.backend,
                    human(g.size_bytes),
                    human(g.available_bytes),
                    human(g.largest_allocatable_bytes),
                    // LVM volume groups have no slot limit.
                    if g.namespace_slots == u32::MAX {
                        "-".to_owned()
                    } else {
                        g.free_namespace_slots.to_string()
                    },
                    g.numa_node,
                    extent_bar(g, 48)
                );
                if !g.lost.is_empty() {
                    t += &format!("{:<10} LOST: {}\n", "", g.lost);
                }
            }
            let v: Vec<Value> = r
                .regions
                .iter()
                .map(|g| {
                    json!({"id": g.id, "backend": g.backend, "size_bytes": g.size_bytes, "align_bytes": g.align_bytes,
                      "available_bytes": g.available_bytes, "largest_allocatable_bytes": g.largest_allocatable_bytes,
                      "minimum_volume_bytes": g.minimum_volume_bytes, "namespace_slots": g.namespace_slots,
                      "free_namespace_slots": g.free_namespace_slots, "numa_node": g.numa_node, "location": g.location, "lost": g.lost,
                      "extents": g.extents.iter().map(|e| json!({"offset_bytes": e.offset_bytes, "size_bytes": e.size_bytes, "volume_id": e.volume_id, "state": e.state, "reserved": e.reserved})).collect::<Vec<_>>()})
                })
                .collect();
            out(Value::Array(v), t);
        }
        Cmd::Volumes { state, persistency } => {
            let mut c = admin(&cli).await?;
            let r = c
                .list_volumes(pmem_proto::admin::ListVolumesRequest {
                    state: state.clone().unwrap_or_default(),
                    persistency: persistency.clone().unwrap_or_default(),
                })
                .await
                .map_err(st)?
                .into_inner();
            let mut t = format!(
                "{:<38} {:<24} {:<8} {:>10} {:<9} {:<10} {:<8} {}\n",
                "ID", "NAME", "REGION", "SIZE", "USAGE", "PERSIST", "STATE", "DEVICE"
            );
            for v in &r.volumes {
                t += &format!(
                    "{:<38} {:<24} {:<8} {:>10} {:<9} {:<10} {:<8} {}\n",
                    v.id,
                    v.name,
                    v.region,
                    human(v.size_bytes),
                    v.usage,
                    v.persistency,
                    v.state,
                    v.device
                );
            }
            out(Value::Array(r.volumes.iter().map(volume_json).collect()), t);
        }
        Cmd::Volume { id } => {
            let mut c = admin(&cli).await?;
            let v = c
                .get_volume(pmem_proto::admin::GetVolumeRequest {
                    volume_id: id.clone(),
                })
                .await
                .map_err(st)?
                .into_inner();
            let j = volume_json(&v);
            let t = serde_json::to_string_pretty(&j).unwrap_or_default() + "\n";
            out(j, t);
        }
        Cmd::Reconcile {
            apply,
            remove_orphans,
        } => {
            let mut c = admin(&cli).await?;
            let r = c
                .reconcile(pmem_proto::admin::ReconcileRequest {
                    dry_run: !apply,
                    remove_orphans: *remove_orphans,
                })
                .await
                .map_err(st)?
                .into_inner();
            let mut t = format!(
                "{} ({} actions)\n",
                if r.dry_run { "dry run" } else { "applied" },
                r.actions.len()
            );
            for a in &r.actions {
                t += &format!("  {a}\n");
            }
            for o in &r.orphans {
                t += &format!("  orphan {} in {} (volume {})\n", o.path, o.region, o.owner);
            }
            for f in &r.foreign {
                t += &format!("  foreign {} in {} ({})\n", f.path, f.region, f.owner);
            }
            for m in &r.missing {
                t += &format!("  missing device of volume {m}\n");
            }
            for m in &r.unrecorded_mounts {
                t += &format!("  unrecorded mount {m}\n");
            }
            if !r.node_history.is_empty() {
                t += "node reconciliation since start:\n";
                for h in &r.node_history {
                    t += &format!("  {h}\n");
                }
            }
            out(
                json!({"dry_run": r.dry_run, "actions": r.actions, "missing": r.missing,
                   "unrecorded_mounts": r.unrecorded_mounts, "node_history": r.node_history,
                   "orphans": r.orphans.iter().map(dev_json).collect::<Vec<_>>(),
                   "foreign": r.foreign.iter().map(dev_json).collect::<Vec<_>>()}),
                t,
            );
        }
        Cmd::Orphans => {
            let mut c = admin(&cli).await?;
            let r = c
                .reconcile(pmem_proto::admin::ReconcileRequest {
                    dry_run: true,
                    remove_orphans: false,
                })
                .await
                .map_err(st)?
                .into_inner();
            let mut t = format!(
                "{:<14} {:<8} {:>12} {:>10} {}\n",
                "DEVICE", "REGION", "OFFSET", "SIZE", "VOLUME"
            );
            for o in &r.orphans {
                t += &format!(
                    "{:<14} {:<8} {:>12} {:>10} {}\n",
                    o.path,
                    o.region,
                    o.offset_bytes,
                    human(o.size_bytes),
                    o.owner
                );
            }
            out(Value::Array(r.orphans.iter().map(dev_json).collect()), t);
        }
        Cmd::Ledger(LedgerCmd::Status) => {
            let mut c = admin(&cli).await?;
            let r = c
                .ledger_status(pmem_proto::admin::Empty {})
                .await
                .map_err(st)?
                .into_inner();
            let mut t = format!("ledger {}\n", r.ledger_id);
            if r.refused.is_empty() {
                t += "serving\n";
            } else {
                t += &format!("REFUSED: {}\n", r.refused);
            }
            let mut lost: Vec<_> = r.lost_regions.iter().collect();
            lost.sort();
            for (region, why) in &lost {
                t += &format!("region {region} LOST: {why}\n");
            }
            out(
                json!({"ledger_id": r.ledger_id, "refused": r.refused, "lost_regions": r.lost_regions}),
                t,
            );
            return Ok(exit_code(r.refused.is_empty() && r.lost_regions.is_empty()));
        }
        Cmd::Ledger(LedgerCmd::Rebuild { apply }) => {
            let mut c = admin(&cli).await?;
            let r = c
                .rebuild_ledger(pmem_proto::admin::RebuildLedgerRequest { apply: *apply })
                .await
                .map_err(st)?
                .into_inner();
            let mut t = format!(
                "{}: {} volumes for ledger {} over regions {}\n",
                if r.applied {
                    "rebuilt"
                } else {
                    "dry run (nothing written; --apply writes it)"
                },
                r.volumes.len(),
                r.ledger_id,
                r.regions.join(", ")
            );
            for v in &r.volumes {
                t += &format!(
                    "  volume {} in {} at {}+{} ({}, {})\n",
                    v.id,
                    v.region,
                    v.offset_bytes,
                    human(v.size_bytes),
                    v.usage,
                    if v.device.is_empty() { "-" } else { &v.device }
                );
            }
            for k in &r.skipped {
                t += &format!("  skipped {k}\n");
            }
            if !r.backup.is_empty() {
                t += &format!("  the old ledger was copied to {}\n", r.backup);
            }
            out(
                json!({"applied": r.applied, "ledger_id": r.ledger_id, "regions": r.regions,
                   "volumes": r.volumes.iter().map(volume_json).collect::<Vec<_>>(),
                   "skipped": r.skipped, "backup": r.backup}),
                t,
            );
        }
        Cmd::Region(cmd) => {
            let mut c = admin(&cli).await?;
            let r = match cmd {
                RegionCmd::Forget { region } => c
                    .forget_region(pmem_proto::admin::RegionRequest {
                        region: region.clone(),
                    })
                    .await
                    .map_err(st)?
                    .into_inner(),
                RegionCmd::Reinit { region, yes } => {
                    if !yes {
                        return Err(format!(
                            "region reinit ERASES region {region}: every volume in it and its data are gone; run again with --yes"
                        ));
                    }
                    c.reinit_region(pmem_proto::admin::RegionRequest {
                        region: region.clone(),
                    })
                    .await
                    .map_err(st)?
                    .into_inner()
                }
            };
            let mut t = format!(
                "region {}: {} volumes dropped from the ledger\n",
                r.region,
                r.volumes.len()
            );
            for v in &r.volumes {
                t += &format!(
                    "  dropped {} ({:?}, {})\n",
                    v.id,
                    v.name,
                    human(v.size_bytes)
                );
            }
            for a in &r.actions {
                t += &format!("  {a}\n");
            }
            out(
                json!({"region": r.region, "actions": r.actions,
                   "volumes": r.volumes.iter().map(volume_json).collect::<Vec<_>>()}),
                t,
            );
        }
        Cmd::Csi(cmd) => return csi_cmd(&cli, cmd).await,
    }
    Ok(ExitCode::SUCCESS)
}

async fn csi_cmd(cli: &Cli, cmd: &CsiCmd) -> Result<ExitCode, String> {
    let st = |e: tonic::Status| format!("{:?}: {}", e.code(), e.message());
    let ch = connect(&cli.endpoint).await?;
    let mut ctl = ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch);
    let print = |v: Value| println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    match cmd {
        CsiCmd::Capacity { usage } => {
            let c = ctl
                .get_capacity(csi::GetCapacityRequest {
                    volume_capabilities: vec![],
                    parameters: HashMap::from([("usage".to_owned(), usage.clone())]),
                    accessible_topology: None,
                })
                .await
                .map_err(st)?
                .into_inner();
            let info = node
                .node_get_info(csi::NodeGetInfoRequest {})
                .await
                .map_err(st)?
                .into_inner();
            if cli.json {
                print(
                    json!({"available_capacity": c.available_capacity, "maximum_volume_size": c.maximum_volume_size,
                    "minimum_volume_size": c.minimum_volume_size, "node_id": info.node_id,
                    "max_volumes_per_node": info.max_volumes_per_node}),
                );
            } else {
                let u = |v: i64| human(u64::try_from(v).unwrap_or(0));
                println!(
                    "node {}: available {} (largest volume {}, smallest {}), up to {} volumes",
                    info.node_id,
                    u(c.available_capacity),
                    u(c.maximum_volume_size.unwrap_or(0)),
                    u(c.minimum_volume_size.unwrap_or(0)),
                    info.max_volumes_per_node
                );
            }
        }
        CsiCmd::Create {
            name,
            size: s,
            limit,
            usage,
            erase_after,
            block,
            fs,
        } => {
            let v = ctl
                .create_volume(csi::CreateVolumeRequest {
                    name: name.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: size(s)?,
                        limit_bytes: limit.as_deref().map(size).transpose()?.unwrap_or(0),
                    }),
                    volume_capabilities: vec![capability(*block, fs, false)],
                    parameters: HashMap::from([
                        ("usage".to_owned(), usage.clone()),
                        ("eraseAfter".to_owned(), erase_after.to_string()),
                    ]),
                    ..Default::default()
                })
                .await
                .map_err(st)?
                .into_inner()
                .volume
                .unwrap_or_default();
            if cli.json {
                print(
                    json!({"volume_id": v.volume_id, "capacity_bytes": v.capacity_bytes, "volume_context": v.volume_context}),
                );
            } else {
                println!(
                    "{} {}",
                    v.volume_id,
                    human(u64::try_from(v.capacity_bytes).unwrap_or(0))
                );
            }
        }
        CsiCmd::Delete { id } => {
            ctl.delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.clone(),
                secrets: HashMap::new(),
            })
            .await
            .map_err(st)?;
            println!("deleted {id}");
        }
        CsiCmd::List => {
            let r = ctl
                .list_volumes(csi::ListVolumesRequest::default())
                .await
                .map_err(st)?
                .into_inner();
            for e in r.entries {
                let v = e.volume.unwrap_or_default();
                println!(
                    "{} {}",
                    v.volume_id,
                    human(u64::try_from(v.capacity_bytes).unwrap_or(0))
                );
            }
        }
        CsiCmd::Expand {
            id,
            size: s,
            node_path,
        } => {
            let r = ctl
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: size(s)?,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await
                .map_err(st)?
                .into_inner();
            println!("controller: {} bytes", r.capacity_bytes);
            if let Some(p) = node_path {
                let n = node
                    .node_expand_volume(csi::NodeExpandVolumeRequest {
                        volume_id: id.clone(),
                        volume_path: p.clone(),
                        capacity_range: Some(csi::CapacityRange {
                            required_bytes: size(s)?,
                            limit_bytes: 0,
                        }),
                        ..Default::default()
                    })
                    .await
                    .map_err(st)?
                    .into_inner();
                println!("node: {} bytes", n.capacity_bytes);
            }
        }
        CsiCmd::Stage {
            id,
            staging_path,
            block,
            fs,
        } => {
            node.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging_path.clone(),
                volume_capability: Some(capability(*block, fs, false)),
                ..Default::default()
            })
            .await
            .map_err(st)?;
            println!("staged {id} at {staging_path}");
        }
        CsiCmd::Unstage { id, staging_path } => {
            node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging_path.clone(),
            })
            .await
            .map_err(st)?;
            println!("unstaged {id}");
        }
        CsiCmd::Publish {
            id,
            staging_path,
            target_path,
            block,
            fs,
            readonly,
            context,
            ephemeral,
        } => {
            let mut volume_context: HashMap<String, String> = context.iter().cloned().collect();
            if *ephemeral {
                volume_context.insert(
                    pmem_agent::csi::node::EPHEMERAL_KEY.to_owned(),
                    "true".to_owned(),
                );
            }
            node.node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging_path.clone(),
                target_path: target_path.clone(),
                volume_capability: Some(capability(*block, fs, *readonly)),
                readonly: *readonly,
                volume_context,
                ..Default::default()
            })
            .await
            .map_err(st)?;
            println!("published {id} at {target_path}");
        }
        CsiCmd::Unpublish { id, target_path } => {
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target_path.clone(),
            })
            .await
            .map_err(st)?;
            println!("unpublished {id}");
        }
        CsiCmd::Stats { id, path } => {
            let r = node
                .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: id.clone(),
                    volume_path: path.clone(),
                    staging_target_path: String::new(),
                })
                .await
                .map_err(st)?
                .into_inner();
            let usage: Vec<Value> = r
                .usage
                .iter()
                .map(|u| json!({"unit": u.unit, "available": u.available, "total": u.total, "used": u.used}))
                .collect();
            print(
                json!({"usage": usage, "condition": r.volume_condition.map(|c| json!({"abnormal": c.abnormal, "message": c.message}))}),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn volume_json(v: &pmem_proto::admin::Volume) -> Value {
    json!({"id": v.id, "name": v.name, "region": v.region, "offset_bytes": v.offset_bytes, "size_bytes": v.size_bytes,
        "requested_bytes": v.requested_bytes, "usage": v.usage, "erase_after": v.erase_after, "persistency": v.persistency,
        "state": v.state, "device": v.device, "parameters": v.parameters, "context": v.context,
        "publications": v.publications.iter().map(|p| json!({"kind": p.kind, "path": p.path, "readonly": p.readonly})).collect::<Vec<_>>()})
}

fn dev_json(d: &pmem_proto::admin::Device) -> Value {
    json!({"region": d.region, "path": d.path, "offset_bytes": d.offset_bytes, "size_bytes": d.size_bytes, "owner": d.owner})
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pmemctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pmemctl: {e}");
            ExitCode::from(2)
        }
    }
}
