import json
import os
import subprocess
import sys

import pytest

from runtime.manifest import MANIFEST, ArtifactError, Machine, check_artifact, load_manifest, write_manifest

H200 = Machine("sm_90", {"torch": "2.11.0", "python": "3.12.3"})
GB10 = Machine("sm_121", {"torch": "2.13.0", "python": "3.11.7"})


@pytest.fixture
def artifact(tmp_path):
    root = tmp_path / "art"
    (root / "experts").mkdir(parents=True)
    (root / "layer-000.pt2").write_bytes(b"x" * 1000)
    (root / "experts" / "layer-000.experts").write_bytes(b"e" * 5000)
    write_manifest(root, {"model_id": "tiny", "backend": "aoti", "device": "cuda", "gpu_archs": ["sm_121a"],
                          "versions": {"torch": "2.13.0"}})
    return root


def test_clean_artifact_loads(artifact):
    manifest = load_manifest(artifact, GB10)
    assert [f["path"] for f in manifest["files"]] == ["experts/layer-000.experts", "layer-000.pt2"]


def test_every_problem_is_named(artifact):
    (artifact / "layer-000.pt2").write_bytes(b"y" * 1000)                   # same size, other bytes
    (artifact / "experts" / "layer-000.experts").unlink()
    _, problems = check_artifact(artifact, H200)
    assert problems == [
        "file experts/layer-000.experts is missing",
        "file layer-000.pt2 is corrupted (sha256 mismatch)",
        "the artifact is built for sm_121a; this GPU is sm_90",
        "the artifact needs torch 2.13.x; this machine has 2.11.0",
    ]
    with pytest.raises(ArtifactError, match="is missing .and 3 more problems"):
        load_manifest(artifact, H200)


def test_no_gpu_and_no_manifest(artifact, tmp_path):
    _, problems = check_artifact(artifact, Machine(None, {"torch": "2.13.1"}))
    assert problems == ["the artifact is built for sm_121a; this machine has no CUDA GPU"]
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_manifest(tmp_path)
    (artifact / MANIFEST).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_manifest(artifact)


def test_verify_command(artifact):
    r = subprocess.run([sys.executable, "-m", "dsv4.cli", "verify", str(artifact)], capture_output=True, text=True)
    assert r.returncode == 1                       # this CI machine has no GPU
    assert "problem: the artifact is built for sm_121a" in r.stdout
    r = subprocess.run([sys.executable, "-m", "dsv4.cli", "verify", str(artifact / "nope")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "no manifest.json" in r.stderr


def test_loads_hash_only_what_changed_since_a_clean_check(artifact, monkeypatch):
    import runtime.manifest as manifest_module
    hashed = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda p, **kw: hashed.append(p.name) or real(p, **kw))
    load_manifest(artifact, GB10)
    assert sorted(hashed) == ["layer-000.experts", "layer-000.pt2"]          # first load: everything
    hashed.clear()
    load_manifest(artifact, GB10)
    assert hashed == []                                                     # unchanged since
    changed = artifact / "layer-000.pt2"
    mtime = changed.stat().st_mtime_ns
    changed.write_bytes(b"y" * 1000)                                        # same size, other bytes
    os.utime(changed, ns=(mtime + 10**9, mtime + 10**9))                    # a later write (clocks are coarse)
    _, problems = check_artifact(artifact, GB10)
    assert hashed == ["layer-000.pt2"] and problems == ["file layer-000.pt2 is corrupted (sha256 mismatch)"]
    hashed.clear()
    _, problems = check_artifact(artifact, GB10, trust_verified=False)      # `dsv4 verify`: everything
    assert sorted(hashed) == ["layer-000.experts", "layer-000.pt2"] and len(problems) == 1


def test_hashing_reports_the_bytes_it_has_read(artifact):
    """`dsv4 verify` and a first load hash every file (about 160 GB at Flash size): the bar follows the bytes."""
    seen = []
    _, problems = check_artifact(artifact, GB10, trust_verified=False,
                                 progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert not problems and {s for s, _, _ in seen} == {"verifying"}
    done = [d for _, d, _ in seen]
    assert done == sorted(done) and seen[-1][1:] == (6000, 6000)    # both files' bytes, none counted twice
