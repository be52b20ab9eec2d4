"""The local Hub-compatible server against the real `huggingface_hub` client, over real HTTP on 127.0.0.1."""

import hashlib
import os

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError


def test_environment_points_at_local_server(hub_server):
    assert os.environ["HF_ENDPOINT"] == hub_server.url
    assert hub_server.url.startswith("http://127.0.0.1:")
    assert os.environ["HF_HUB_DISABLE_XET"] == "1"
    assert HfApi().whoami()["name"] == "test-user"


def test_whoami_rejects_bad_token(hub_server):
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_wrong").whoami()
    assert err.value.response.status_code == 401


def test_create_repo_conflict_and_exist_ok(hub_server):
    api = HfApi()
    url = api.create_repo("test-org/conflict")
    assert url.repo_id == "test-org/conflict"
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("test-org/conflict")
    assert err.value.response.status_code == 409
    assert api.create_repo("test-org/conflict", exist_ok=True).repo_id == "test-org/conflict"
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("someone-else/repo")
    assert err.value.response.status_code == 403


def test_upload_folder_snapshot_round_trip(hub_server, tmp_path):
    folder = tmp_path / "upload"
    (folder / "sub").mkdir(parents=True)
    small = b"hello registers\n"
    large = os.urandom(hub_server.lfs_threshold + 1234)  # above the LFS threshold → batch API + PUT
    (folder / "small.txt").write_bytes(small)
    (folder / "sub" / "large.dat").write_bytes(large)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- test\n---\n# Card\n")

    api = HfApi()
    api.create_repo("test-user/round-trip", private=True)
    before = len(hub_server.requests)
    info = api.upload_folder(folder_path=folder, repo_id="test-user/round-trip", commit_message="upload")
    calls = hub_server.requests[before:]
    assert sum(1 for c in calls if c[1].endswith("/commit/main")) == 1  # one commit
    assert ("POST", "/test-user/round-trip.git/info/lfs/objects/batch") in calls
    assert sum(1 for m, p in calls if m == "PUT") == 1  # only the large file went through LFS
    assert ("POST", "/api/validate-yaml") in calls

    repo = hub_server.repo("test-user/round-trip")
    assert repo.branches["main"] == info.oid
    stored = repo.resolve("main").files
    assert stored["sub/large.dat"].lfs_sha256 == hashlib.sha256(large).hexdigest()
    assert stored["small.txt"].lfs_sha256 is None

    cache = tmp_path / "cache"
    snapshot = snapshot_download("test-user/round-trip", cache_dir=cache)
    assert snapshot.endswith(info.oid)
    assert (cache / "models--test-user--round-trip" / "blobs" / hashlib.sha256(large).hexdigest()).exists()
    from pathlib import Path

    snapshot = Path(snapshot)
    assert (snapshot / "small.txt").read_bytes() == small
    assert (snapshot / "sub" / "large.dat").read_bytes() == large
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()) == [
        ".gitattributes",
        "README.md",
        "small.txt",
        "sub/large.dat",
    ]

    tree = {f.path: f for f in api.list_repo_tree("test-user/round-trip", recursive=True)}
    assert tree["sub/large.dat"].lfs.sha256 == hashlib.sha256(large).hexdigest()
    assert tree["sub/large.dat"].size == len(large)
    assert "sub" in tree and not hasattr(tree["sub"], "size")
    assert api.model_info("test-user/round-trip").card_data.license == "apache-2.0"

    # Single-file download by commit hash, and the errors the client relies on.
    path = hf_hub_download("test-user/round-trip", "small.txt", revision=info.oid, cache_dir=tmp_path / "c2")
    assert open(path, "rb").read() == small
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("test-user/round-trip", "missing.txt", cache_dir=tmp_path / "c2")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("test-user/round-trip")  # private, no token


def test_reupload_unchanged_skips_files(hub_server, tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"x" * 1000)
    api = HfApi()
    api.create_repo("test-user/again")
    first = api.upload_folder(folder_path=folder, repo_id="test-user/again")
    before = len(hub_server.requests)
    second = api.upload_folder(folder_path=folder, repo_id="test-user/again")
    assert second.oid == first.oid  # no empty commit
    assert not any(m == "PUT" for m, _ in hub_server.requests[before:])
