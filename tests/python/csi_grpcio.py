#!/usr/bin/env python3
"""Every CSI Identity, Controller and Node call against a running pmem-agent,
from Python grpcio with its default channel options: grpc C-core sends the
socket path as :authority, which the agent must accept.

usage: csi_grpcio.py PROTO_DIR SOCKET KUBELET_DIR NODE_ID

Stubs are generated from PROTO_DIR/csi.proto with grpcio-tools into a
temporary directory. Prints one line per call; exits non-zero at the first
answer that is not the expected one.
"""

import os
import sys
import tempfile


def generate_stubs(proto_dir, out_dir):
    import grpc_tools
    from grpc_tools import protoc

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            os.path.join(proto_dir, "csi.proto"),
        ]
    )
    if rc != 0:
        sys.exit(f"grpc_tools.protoc failed with {rc}")
    sys.path.insert(0, out_dir)


def main():
    proto_dir, socket, kubelet, node_id = sys.argv[1:5]
    with tempfile.TemporaryDirectory(prefix="csi-stubs-") as out:
        generate_stubs(proto_dir, out)
        run(socket, kubelet, node_id)


def run(socket, kubelet, node_id):
    import grpc
    import csi_pb2 as pb
    import csi_pb2_grpc as rpc

    mib = 1 << 20
    calls = 0

    def ok(name, fn, req):
        nonlocal calls
        try:
            resp = fn(req, timeout=60)
        except grpc.RpcError as e:
            sys.exit(f"{name}: {e.code()} {e.details()}")
        calls += 1
        print(f"ok {name}")
        return resp

    def fails(name, fn, req, code):
        nonlocal calls
        try:
            fn(req, timeout=60)
        except grpc.RpcError as e:
            if e.code() != code:
                sys.exit(f"{name}: expected {code}, got {e.code()} {e.details()}")
            calls += 1
            print(f"ok {name} -> {code.name}")
            return e.details()
        sys.exit(f"{name}: expected {code}, got OK")

    def check(cond, what):
        if not cond:
            sys.exit(f"check failed: {what}")

    # Default options: no grpc.default_authority override.
    channel = grpc.insecure_channel(f"unix:{socket}")
    ident = rpc.IdentityStub(channel)
    ctrl = rpc.ControllerStub(channel)
    node = rpc.NodeStub(channel)

    xfs = pb.VolumeCapability(
        access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        ),
        mount=pb.VolumeCapability.MountVolume(fs_type="xfs"),
    )

    # Identity
    info = ok("GetPluginInfo", ident.GetPluginInfo, pb.GetPluginInfoRequest())
    check(info.name == "pmem-agent.csi", f"plugin name {info.name!r}")
    caps = ok(
        "GetPluginCapabilities",
        ident.GetPluginCapabilities,
        pb.GetPluginCapabilitiesRequest(),
    )
    check(len(caps.capabilities) > 0, "plugin capabilities")
    probe = ok("Probe", ident.Probe, pb.ProbeRequest())
    check(probe.ready.value, "ready")

    # Controller
    ccaps = ok(
        "ControllerGetCapabilities",
        ctrl.ControllerGetCapabilities,
        pb.ControllerGetCapabilitiesRequest(),
    )
    check(len(ccaps.capabilities) > 0, "controller capabilities")
    cap0 = ok(
        "GetCapacity",
        ctrl.GetCapacity,
        pb.GetCapacityRequest(volume_capabilities=[xfs]),
    )
    check(cap0.available_capacity >= 512 * mib, f"capacity {cap0.available_capacity}")
    create = pb.CreateVolumeRequest(
        name="grpcio-vol",
        capacity_range=pb.CapacityRange(required_bytes=512 * mib),
        volume_capabilities=[xfs],
    )
    vol = ok("CreateVolume", ctrl.CreateVolume, create).volume
    again = ok("CreateVolume (again)", ctrl.CreateVolume, create).volume
    check(again.volume_id == vol.volume_id, "idempotent create")
    vid = vol.volume_id
    fails(
        "CreateVolume (no name)",
        ctrl.CreateVolume,
        pb.CreateVolumeRequest(volume_capabilities=[xfs]),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    val = ok(
        "ValidateVolumeCapabilities",
        ctrl.ValidateVolumeCapabilities,
        pb.ValidateVolumeCapabilitiesRequest(volume_id=vid, volume_capabilities=[xfs]),
    )
    check(len(val.confirmed.volume_capabilities) == 1, "confirmed")
    listed = ok("ListVolumes", ctrl.ListVolumes, pb.ListVolumesRequest())
    check(vid in [e.volume.volume_id for e in listed.entries], "listed")
    got = ok(
        "ControllerGetVolume",
        ctrl.ControllerGetVolume,
        pb.ControllerGetVolumeRequest(volume_id=vid),
    )
    check(got.volume.volume_id == vid, "get volume")
    cap1 = ok(
        "GetCapacity (after create)",
        ctrl.GetCapacity,
        pb.GetCapacityRequest(volume_capabilities=[xfs]),
    )
    check(cap1.available_capacity < cap0.available_capacity, "capacity went down")
    unimplemented = grpc.StatusCode.UNIMPLEMENTED
    fails(
        "ControllerPublishVolume",
        ctrl.ControllerPublishVolume,
        pb.ControllerPublishVolumeRequest(volume_id=vid, node_id=node_id),
        unimplemented,
    )
    fails(
        "ControllerUnpublishVolume",
        ctrl.ControllerUnpublishVolume,
        pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=node_id),
        unimplemented,
    )
    fails(
        "CreateSnapshot",
        ctrl.CreateSnapshot,
        pb.CreateSnapshotRequest(source_volume_id=vid, name="s"),
        unimplemented,
    )
    fails(
        "DeleteSnapshot",
        ctrl.DeleteSnapshot,
        pb.DeleteSnapshotRequest(snapshot_id="s"),
        unimplemented,
    )
    fails("ListSnapshots", ctrl.ListSnapshots, pb.ListSnapshotsRequest(), unimplemented)
    fails(
        "GetSnapshot",
        ctrl.GetSnapshot,
        pb.GetSnapshotRequest(snapshot_id="s"),
        unimplemented,
    )
    fails(
        "ControllerModifyVolume",
        ctrl.ControllerModifyVolume,
        pb.ControllerModifyVolumeRequest(volume_id=vid),
        unimplemented,
    )

    # Node
    ncaps = ok(
        "NodeGetCapabilities", node.NodeGetCapabilities, pb.NodeGetCapabilitiesRequest()
    )
    check(len(ncaps.capabilities) > 0, "node capabilities")
    ninfo = ok("NodeGetInfo", node.NodeGetInfo, pb.NodeGetInfoRequest())
    check(ninfo.node_id == node_id, f"node id {ninfo.node_id!r}")
    staging = os.path.join(kubelet, "plugins", "pmem-agent.csi", "staging", "grpcio")
    target = os.path.join(kubelet, "pods", "p1", "volumes", "grpcio", "mount")
    # As the kubelet does: it makes the staging directory and the target's parent.
    os.makedirs(staging, exist_ok=True)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    ok(
        "NodeStageVolume",
        node.NodeStageVolume,
        pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=staging, volume_capability=xfs
        ),
    )
    publish = pb.NodePublishVolumeRequest(
        volume_id=vid,
        staging_target_path=staging,
        target_path=target,
        volume_capability=xfs,
    )
    ok("NodePublishVolume", node.NodePublishVolume, publish)
    ok("NodePublishVolume (again)", node.NodePublishVolume, publish)
    with open(os.path.join(target, "hello.txt"), "w") as f:
        f.write("written through a volume published by grpcio\n")
    stats = ok(
        "NodeGetVolumeStats",
        node.NodeGetVolumeStats,
        pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target),
    )
    check(any(u.total > 0 for u in stats.usage), f"usage {stats.usage}")
    grown = ok(
        "ControllerExpandVolume",
        ctrl.ControllerExpandVolume,
        pb.ControllerExpandVolumeRequest(
            volume_id=vid,
            capacity_range=pb.CapacityRange(required_bytes=768 * mib),
            volume_capability=xfs,
        ),
    )
    check(grown.capacity_bytes == 768 * mib, f"grown to {grown.capacity_bytes}")
    nexp = ok(
        "NodeExpandVolume",
        node.NodeExpandVolume,
        pb.NodeExpandVolumeRequest(
            volume_id=vid,
            volume_path=target,
            staging_target_path=staging,
            capacity_range=pb.CapacityRange(required_bytes=768 * mib),
        ),
    )
    check(nexp.capacity_bytes == 768 * mib, f"node expanded to {nexp.capacity_bytes}")
    ok(
        "NodeUnpublishVolume",
        node.NodeUnpublishVolume,
        pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target),
    )
    check(not os.path.ismount(target), "target unmounted")
    ok(
        "NodeUnstageVolume",
        node.NodeUnstageVolume,
        pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging),
    )
    check(not os.path.ismount(staging), "staging unmounted")
    ok("DeleteVolume", ctrl.DeleteVolume, pb.DeleteVolumeRequest(volume_id=vid))
    ok("DeleteVolume (again)", ctrl.DeleteVolume, pb.DeleteVolumeRequest(volume_id=vid))
    fails(
        "ControllerGetVolume (deleted)",
        ctrl.ControllerGetVolume,
        pb.ControllerGetVolumeRequest(volume_id=vid),
        grpc.StatusCode.NOT_FOUND,
    )
    channel.close()
    print(f"grpcio {grpc.__version__}: {calls} calls answered as expected")


if __name__ == "__main__":
    main()
