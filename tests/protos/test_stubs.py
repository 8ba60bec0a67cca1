"""The wire contract: the committed stubs are fresh, import, and describe the DESIGN.md service."""

from protos import generate


def test_committed_stubs_are_not_stale():
    assert generate.stale_files() == []


def test_stale_stub_is_detected(tmp_path, monkeypatch):
    # A copy of the tree whose generated file was edited by hand must be reported stale.
    src = generate.REPO_ROOT / "protos/vla_mbpo/v1"
    dst = tmp_path / "protos/vla_mbpo/v1"
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.is_file():
            (dst / path.name).write_bytes(path.read_bytes())
    (dst / "world_model_pb2.py").write_text((dst / "world_model_pb2.py").read_text() + "# edited\n")
    monkeypatch.setattr(generate, "REPO_ROOT", tmp_path)
    assert generate.stale_files() == ["protos/vla_mbpo/v1/world_model_pb2.py"]


def test_service_has_the_design_rpcs():
    from protos.vla_mbpo.v1 import world_model_pb2, world_model_pb2_grpc

    service = world_model_pb2.DESCRIPTOR.services_by_name["WorldModel"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {
        "GetModelInfo": (False, False),
        "CreateStates": (False, False),
        "Imagine": (False, True),
        "ReleaseStates": (False, False),
        "GetStats": (False, False),
    }
    assert hasattr(world_model_pb2_grpc, "WorldModelStub")
    assert hasattr(world_model_pb2_grpc, "add_WorldModelServicer_to_server")
    branch = world_model_pb2.Branch(state_id="s1", actions=[0.5] * 32, seed=7, keep_state=True)
    assert world_model_pb2.Branch.FromString(branch.SerializeToString()) == branch
