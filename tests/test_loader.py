"""plugins.loader's launch path on a stand-in driver (no GPU here): which launch each kernel gets, and with
which attributes. Every kernel launch goes through it; the wgmma GEMV's clusters joined it in session 33."""
from types import SimpleNamespace

import pytest
import torch

from plugins import loader


class FakeDriver:
    """The few cuda.bindings.driver names the loader uses, recording the launches."""

    class CUlaunchConfig:
        pass

    class CUlaunchAttribute:
        def __init__(self):
            self.id = None
            self.value = SimpleNamespace(programmaticStreamSerializationAllowed=0,
                                         clusterDim=SimpleNamespace(x=0, y=0, z=0),
                                         clusterSchedulingPolicyPreference=None)

    CUlaunchAttributeID = SimpleNamespace(CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION="pdl",
                                          CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION="cluster",
                                          CU_LAUNCH_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE="policy")
    CUclusterSchedulingPolicy = SimpleNamespace(CU_CLUSTER_SCHEDULING_POLICY_SPREAD="spread-value",
                                                CU_CLUSTER_SCHEDULING_POLICY_LOAD_BALANCING="balance-value")

    def __init__(self, ex_fails: bool = False):
        self.ex_fails = ex_fails
        self.launches: list[tuple[str, object]] = []

    def CUstream(self, handle):
        return handle

    def cuLaunchKernelEx(self, cfg, function, args, extra):
        if self.ex_fails:
            raise RuntimeError("CUDA driver error CUDA_ERROR_NOT_SUPPORTED")
        self.launches.append(("ex", cfg))
        return (0,)

    def cuLaunchKernel(self, function, gx, gy, gz, bx, by, bz, shared, stream, args, extra):
        self.launches.append(("plain", (gx, gy, gz, bx, shared)))
        return (0,)


def _image(monkeypatch, pdl: bool, driver: FakeDriver) -> loader.KernelImage:
    image = object.__new__(loader.KernelImage)           # no module to load: the launch path alone
    image.driver, image._pdl = driver, pdl
    image._functions, image._shared_allowed = {"k": object()}, {"k": 1 << 20}   # no opt-in to ask for
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: SimpleNamespace(cuda_stream=7))
    return image


@pytest.mark.parametrize("pdl, cluster, attrs", [(True, 1, ["pdl"]), (True, 4, ["pdl", "cluster"]),
                                                  (False, 2, ["cluster"])],
                         ids=["pdl", "pdl-cluster", "cluster-only"])
def test_extended_launches_carry_pdl_and_cluster_attributes(monkeypatch, pdl, cluster, attrs):
    driver = FakeDriver()
    _image(monkeypatch, pdl, driver).launch("k", 8, 128, [(3, loader.INT)], cluster=cluster)
    (kind, cfg), = driver.launches
    assert kind == "ex" and [a.id for a in cfg.attrs] == attrs and cfg.numAttrs == len(attrs)
    assert (cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ, cfg.blockDimX, cfg.hStream) == (8, 1, 1, 128, 7)
    if cluster > 1:
        assert vars(cfg.attrs[-1].value.clusterDim) == {"x": cluster, "y": 1, "z": 1}


def test_an_extended_launch_takes_a_three_dimensional_grid(monkeypatch):
    driver = FakeDriver()
    _image(monkeypatch, True, driver).launch("k", (20, 1, 2), 64, [])
    (kind, cfg), = driver.launches
    assert (cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ, cfg.blockDimX) == (20, 1, 2, 64)


def test_without_pdl_a_plain_launch_and_a_failed_cluster_launch_raises(monkeypatch):
    driver = FakeDriver()
    _image(monkeypatch, False, driver).launch("k", (4, 2), 256, [], shared=64)
    _image(monkeypatch, False, driver).launch("k", (4, 2, 3), 256, [])
    assert driver.launches == [("plain", (4, 2, 1, 256, 64)), ("plain", (4, 2, 3, 256, 0))]
    image = _image(monkeypatch, True, FakeDriver(ex_fails=True))
    with pytest.raises(RuntimeError):
        image.launch("k", 8, 128, [], cluster=2)           # a cluster cannot fall back to a plain launch
    image.launch("k", 8, 128, [])                          # PDL can: plain from then on
    assert image._pdl is False and image.driver.launches == [("plain", (8, 1, 1, 128, 0))]


@pytest.mark.parametrize("policy, attrs", [("", ["pdl", "cluster"]), ("spread", ["pdl", "cluster", "policy"])])
def test_a_cluster_launch_carries_the_placement_policy_asked_for(monkeypatch, policy, attrs):
    monkeypatch.setattr(loader, "CLUSTER_POLICY", policy)
    driver = FakeDriver()
    _image(monkeypatch, True, driver).launch("k", 16, 256, [], cluster=8)
    _image(monkeypatch, True, driver).launch("k", 16, 256, [])         # no cluster: no policy
    (_, cfg), (_, plain_cfg) = driver.launches
    assert [a.id for a in cfg.attrs] == attrs and [a.id for a in plain_cfg.attrs] == ["pdl"]
    if policy:
        assert cfg.attrs[-1].value.clusterSchedulingPolicyPreference == "spread-value"


def test_resident_caps_apply_to_the_first_matching_prefix(monkeypatch):
    monkeypatch.setattr(loader, "RESIDENT_CAPS", "dsv4_fp8_gemv:1|dsv4_moe_:2|dsv4_:3")
    assert loader._resident_cap("dsv4_fp8_gemv_fused_m8") == 1
    assert loader._resident_cap("dsv4_moe_down_decode_wgmma") == 2
    assert loader._resident_cap("dsv4_head_gemv_bf16_rows") == 3
    assert loader._resident_cap("other") is None
    monkeypatch.setattr(loader, "RESIDENT_CAPS", "")
    assert loader._resident_cap("dsv4_fp8_gemv_fused_m8") is None
