"""NUMA: a GPU's node from its PCI bus id through sysfs (fake trees under tmp_path), the
placement the engine is given (none on a single-node machine), the mapping the engine pins
(mbind on ordinary memory, no GPU needed), and info()'s keys."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch

import tensorbridge as tb
from tensorbridge import _backend, _numa

from conftest import HAS_CUDA, TESTING, needs_testing_module


def fake_sysfs(root, nodes: int = 2, devices: dict[str, str] | None = None):
    """A sysfs tree: ``nodes`` NUMA nodes and PCI devices (bus id -> numa_node contents;
    None: no numa_node file)."""
    node_dir = root / "devices" / "system" / "node"
    node_dir.mkdir(parents=True)
    for name in ("possible", "online", "has_cpu", "power", "uevent"):  # (not nodes)
        (node_dir / name).write_text("0\n")
    for n in range(nodes):
        (node_dir / f"node{n}").mkdir()
    for bus_id, text in (devices or {}).items():
        d = root / "bus" / "pci" / "devices" / bus_id
        d.mkdir(parents=True)
        if text is not None:
            (d / "numa_node").write_text(text)
    return root


@pytest.mark.parametrize(
    "bus_id, normal",
    [
        ("00000000:3B:00.0", "0000:3b:00.0"),  # as cudaDeviceGetPCIBusId spells it
        ("0000:3b:00.0", "0000:3b:00.0"),  # as sysfs does
        ("0000:3B:00.0", "0000:3b:00.0"),
        ("3b:00.0", "0000:3b:00.0"),  # no domain
        ("00000001:C1:1F.7", "0001:c1:1f.7"),
        ("00010000:01:00.0", "10000:01:00.0"),  # a VMD domain: 5 digits in sysfs
        (" 00000000:3B:00.0\n", "0000:3b:00.0"),
    ],
)
def test_normalize_bus_id(bus_id, normal):
    assert _numa.normalize_bus_id(bus_id) == normal


@pytest.mark.parametrize(
    "bus_id", ["", "3b:00", "0000:3b:00", "zz:00.0", "0000:3b:00.8", "0000:3b:000.0", "3b.00.0",
               "000000000:3b:00.0", "0000:3b:00.0/numa_node", "../../0000:3b:00.0"],
)  # fmt: skip
def test_malformed_bus_ids_are_refused(bus_id):
    with pytest.raises(ValueError, match=r"is not a PCI bus id: pass one as CUDA or lspci"):
        _numa.normalize_bus_id(bus_id)


def test_bus_id_of_another_type_is_refused():
    with pytest.raises(TypeError, match="bus_id must be a str, got int"):
        _numa.normalize_bus_id(0x3B)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _numa.node_of_bus_id(None)  # type: ignore[arg-type]


def test_node_of_bus_id_reads_fake_trees(tmp_path):
    root = fake_sysfs(
        tmp_path,
        devices={
            "0000:3b:00.0": "1\n",
            "0000:86:00.0": "0",
            "0000:af:00.0": "-1\n",  # the firmware did not say
            "0000:d8:00.0": "garbage",
            "0000:5e:00.0": None,  # no numa_node file
            "10000:01:00.0": "3\n",
        },
    )
    assert _numa.node_of_bus_id("00000000:3B:00.0", root) == 1
    assert _numa.node_of_bus_id("00000000:86:00.0", root) == 0
    assert _numa.node_of_bus_id("00000000:AF:00.0", root) is None
    assert _numa.node_of_bus_id("00000000:D8:00.0", root) is None
    assert _numa.node_of_bus_id("00000000:5E:00.0", root) is None
    assert _numa.node_of_bus_id("00000000:18:00.0", root) is None  # no such device
    assert _numa.node_of_bus_id("00010000:01:00.0", root) == 3
    assert _numa.node_of_bus_id("0000:3b:00.0", tmp_path / "absent") is None  # no sysfs
    with pytest.raises(ValueError, match="not a PCI bus id"):
        _numa.node_of_bus_id("3b-00", root)
    # the lookups and the normalisation agree: every bus id form finds the same file
    assert _numa.device_nodes(["0000:3b:00.0", "3B:00.0", "", None, "bad"], root) == [
        1,
        1,
        None,
        None,
        None,
    ]


def test_node_count(tmp_path):
    assert _numa.node_count(fake_sysfs(tmp_path / "two", nodes=2)) == 2
    assert _numa.node_count(fake_sysfs(tmp_path / "one", nodes=1)) == 1
    assert _numa.node_count(fake_sysfs(tmp_path / "eight", nodes=8)) == 8
    assert _numa.node_count(tmp_path / "absent") == 1  # not Linux, or no NUMA in the kernel


def test_placement_on_a_two_node_machine(tmp_path):
    root = fake_sysfs(
        tmp_path,
        nodes=2,
        devices={"0000:3b:00.0": "0\n", "0000:af:00.0": "1\n", "0000:5e:00.0": "-1"},
    )
    ids = ["00000000:3B:00.0", "00000000:AF:00.0", "00000000:5E:00.0", ""]
    assert _numa.placement(ids, root) == [0, 1, -1, -1]


def test_placement_is_a_no_op_on_a_single_node_machine(tmp_path):
    # sysfs may well name node 0 for every device: placing there would change nothing
    root = fake_sysfs(tmp_path, nodes=1, devices={"0000:3b:00.0": "0\n", "0000:af:00.0": "0\n"})
    assert _numa.placement(["00000000:3B:00.0", "00000000:AF:00.0"], root) == [-1, -1]
    assert _numa.device_nodes(["00000000:3B:00.0"], root) == [0]  # (still reported)


def test_placement_skips_nodes_beyond_the_engines_mask(tmp_path):
    root = fake_sysfs(tmp_path, nodes=2, devices={"0000:3b:00.0": "1024\n", "0000:af:00.0": "1023"})
    assert _numa.placement(["3b:00.0", "af:00.0"], root) == [-1, 1023]


def test_this_machine():
    """The real /sys: what this machine says, whatever it is."""
    assert _numa.node_count() >= 1
    if _numa.node_count() == 1:
        assert _numa.placement(["0000:00:00.0"]) == [-1]


# ------------------------------------------------------------------------ the engine's wiring


class _FakeCore:
    """The calls Engine.cuda_engine makes on the compiled core, recorded."""

    cuda_compiled = True

    def __init__(self) -> None:
        self.nodes: list[list[int]] = []

    def cuda_set_numa_nodes(self, nodes: list[int]) -> None:
        self.nodes.append(list(nodes))


@pytest.fixture
def two_gpus(monkeypatch):
    """An engine over a fake core that sees two GPUs with the given bus ids."""
    probe = {
        "compiled": True,
        "device_count": 2,
        "runtime_version": 13000,
        "driver_version": 13000,
        "error": None,
        "device_names": ["A", "B"],
        "pci_bus_ids": ["00000000:3B:00.0", "00000000:AF:00.0"],
    }
    monkeypatch.setattr(_backend, "_cuda_probe", lambda: probe)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    core = _FakeCore()
    monkeypatch.setattr(_backend, "ENGINE", _backend.Engine(core, None))
    return core


@pytest.mark.parametrize("nodes, expected", [(2, [0, 1]), (1, [-1, -1])])
def test_the_engine_is_told_the_nodes_once_when_it_is_first_used(
    tmp_path, monkeypatch, two_gpus, nodes, expected
):
    root = fake_sysfs(tmp_path, nodes=nodes, devices={"0000:3b:00.0": "0", "0000:af:00.0": "1"})
    monkeypatch.setattr(_numa, "SYSFS", str(root))
    assert two_gpus.nodes == []  # not at import: asking starts CUDA
    assert _backend.ENGINE.cuda_engine is True
    assert _backend.ENGINE.cuda_engine is True
    assert two_gpus.nodes == [expected]
    assert _backend.numa_nodes() == [0, 1]  # reported on any machine, placed on 2+ nodes


# ------------------------------------------------------------------------ the mapping itself


@needs_testing_module
def test_a_mapping_prefers_the_node_it_was_given():
    """The placement step without the GPU: mmap + mbind(MPOL_PREFERRED) + touch, as the
    engine does before it page-locks a staging block. Node 0 exists on every machine."""
    r = TESTING.numa_map_probe(3 << 20, 0)
    if r["mbind_errno"] in (errno.EPERM, errno.ENOSYS):
        pytest.skip(f"the kernel refuses memory policies here ({os.strerror(r['mbind_errno'])})")
    assert r["mbind_errno"] == 0
    assert r["size"] == 3 << 20
    assert r["preferred_first"] == r["preferred_last"] == 0  # the policy covers the mapping
    assert r["page_first"] == r["page_last"] == 0  # touched, so placed now
    assert TESTING.numa_map_probe(1, 0)["size"] == os.sysconf("SC_PAGE_SIZE")  # whole pages


@needs_testing_module
def test_a_refused_policy_is_reported_not_raised():
    """A node the machine lacks: the kernel refuses the mbind (EINVAL), the memory is still
    usable and follows the default policy, and the error comes back for the engine to
    count (it then pins with cudaHostAlloc)."""
    missing = max(_numa.node_count(), 1) + 5
    r = TESTING.numa_map_probe(1 << 20, missing)
    assert r["mbind_errno"] in (errno.EINVAL, errno.EPERM, errno.ENOSYS)
    assert r["preferred_first"] != missing
    assert r["page_first"] >= 0 or r["page_first"] == -errno.ENOSYS


@needs_testing_module
def test_ordinary_memory_has_no_preferred_node():
    a = np.ones(1 << 16)
    assert TESTING.numa_preferred_node_of(a) in (-1, -errno.EPERM, -errno.ENOSYS)


@needs_testing_module
@pytest.mark.parametrize("node", [-1, 1024, 1 << 20])
def test_a_node_outside_the_mask_is_refused(node):
    with pytest.raises(ValueError, match=r"node .* is outside \[0, 1024\)"):
        TESTING.numa_map_probe(4096, node)


# ------------------------------------------------------------------------ what users see


def test_info_reports_a_node_per_device():
    info = tb.info()
    assert len(info["numa_nodes"]) == (info["devices"] if info["cuda"] else 0)
    if not HAS_CUDA:
        assert info["numa_nodes"] == [] and info["ranks"]["numa_node"] is None


def test_pinned_stats_count_placements():
    stats = tb.pinned_stats()
    for key in ("numa_placed", "numa_refused", "numa_error"):
        assert isinstance(stats[key], int) and stats[key] >= 0
    if not HAS_CUDA:
        assert stats["numa_placed"] == stats["numa_refused"] == 0


@pytest.mark.gpu
def test_staging_blocks_placed_on_a_node_carry_the_data():
    """The engine's own path on a GPU: blocks mapped preferring a node, registered, used
    both ways and freed (unregistered and unmapped). Node 0 is forced, so a single-node
    machine runs the path too."""
    if not _backend.ENGINE.cuda_engine:
        pytest.skip(f"the compiled CUDA engine is not in use: {_backend.ENGINE.fallback_reason}")
    C = _backend.ENGINE.core
    budget = tb.pinned_stats()["budget"]
    tb.set_pinned_budget(0)  # idle blocks from earlier tests go: the next ones are new
    tb.set_pinned_budget(budget)
    C.cuda_set_numa_nodes([0] * torch.cuda.device_count())
    try:
        before = tb.pinned_stats()
        x = torch.randn(8 << 20, device="cuda")  # 32 MiB: staged, not torch's small copy
        out = np.empty(x.shape, np.float32)
        tb.to_numpy(x, out=out)
        np.testing.assert_array_equal(out, x.cpu().numpy())
        back = tb.to_tensor(out[::-1], "cuda")  # (a reversed view: staged again)
        torch.testing.assert_close(back, x.flip(0), rtol=0, atol=0)
        after = tb.pinned_stats()
        made = after["misses"] - before["misses"]
        assert made > 0
        placed = after["numa_placed"] - before["numa_placed"]
        refused = after["numa_refused"] - before["numa_refused"]
        assert placed + refused == made, (before, after)
        if refused:  # a container without CAP_SYS_NICE: pinned without the policy
            assert after["numa_error"] in (errno.EPERM, errno.ENOSYS)
        tb.set_pinned_budget(0)  # frees the placed blocks: unregistered, then unmapped
        assert tb.pinned_stats()["bytes_held"] == 0
    finally:
        C.cuda_set_numa_nodes(_numa.placement(_backend._cuda_probe()["pci_bus_ids"]))
        tb.set_pinned_budget(budget)
