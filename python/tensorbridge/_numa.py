"""Which NUMA node a GPU hangs off, read from sysfs, and where staging blocks go.

On a machine with two or more sockets, each GPU sits on one socket's PCIe root, and its
DMA engine reaches the other socket's memory only across the inter-socket link. The
kernel publishes each PCI device's node in ``/sys/bus/pci/devices/<bus id>/numa_node``
(``-1``: the firmware did not say). The CUDA runtime names a device's bus id
(``cudaDeviceGetPCIBusId``, in ``tensorbridge._C.cuda_probe()``); this module finds its
node, and ``_backend`` hands the nodes to the compiled engine, which maps each device's
staging blocks preferring that node (``csrc/core/numa.cpp``). On a single-node machine
nothing is placed: there is nowhere else for the pages to go.

The sysfs root is an argument everywhere, so tests read fake trees.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

SYSFS = "/sys"  # (read at each call by _backend: tests point it at a fake tree)
MAX_NODES = 1024  # the compiled engine's node mask (core/numa.h kMaxNodes)

# CUDA spells a bus id "00000000:3B:00.0" (8 hex digits of domain, upper case); sysfs
# names the device "0000:3b:00.0" (at least 4, lower case). A domain may be absent.
_BUS_ID = re.compile(
    r"(?:(?P<domain>[0-9a-fA-F]{1,8}):)?(?P<bus>[0-9a-fA-F]{1,2}):"
    r"(?P<dev>[0-9a-fA-F]{1,2})\.(?P<fn>[0-7])"
)
_NODE_DIR = re.compile(r"node(\d+)")


def normalize_bus_id(bus_id: str) -> str:
    """``bus_id`` as sysfs names the device: ``"00000000:3B:00.0"`` -> ``"0000:3b:00.0"``.

    Raises:
        TypeError: ``bus_id`` is not a str.
        ValueError: it is not a PCI address ``[domain:]bus:device.function`` in hex.
    """
    if not isinstance(bus_id, str):
        raise TypeError(f"bus_id must be a str, got {type(bus_id).__name__}: {bus_id!r}")
    m = _BUS_ID.fullmatch(bus_id.strip())
    if m is None:
        raise ValueError(
            f"{bus_id!r} is not a PCI bus id: pass one as CUDA or lspci -D print it, "
            "domain:bus:device.function in hex, e.g. '00000000:3B:00.0' or '0000:3b:00.0'."
        )
    domain = int(m["domain"] or "0", 16)
    return f"{domain:04x}:{int(m['bus'], 16):02x}:{int(m['dev'], 16):02x}.{m['fn']}"


def node_of_bus_id(bus_id: str, sysfs_root: str | os.PathLike[str] = SYSFS) -> int | None:
    """The NUMA node of the PCI device ``bus_id``, or None where sysfs does not say.

    None when the device has no ``numa_node`` file (not Linux, no such device, a
    container without /sys), when the file says -1 (a single-node machine, or firmware
    that does not tell), and when it holds anything but a number.

    Raises:
        TypeError, ValueError: ``bus_id`` is not a PCI bus id (see
            :func:`normalize_bus_id`).
    """
    path = os.path.join(sysfs_root, "bus", "pci", "devices", normalize_bus_id(bus_id), "numa_node")
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        node = int(text)
    except ValueError:
        return None
    return node if node >= 0 else None


def node_count(sysfs_root: str | os.PathLike[str] = SYSFS) -> int:
    """The NUMA nodes the kernel lists (``devices/system/node/node<N>``); 1 where it
    lists none (not Linux, or a kernel without NUMA)."""
    try:
        names = os.listdir(os.path.join(sysfs_root, "devices", "system", "node"))
    except OSError:
        return 1
    return max(1, sum(1 for n in names if _NODE_DIR.fullmatch(n)))


def device_nodes(
    bus_ids: Sequence[str | None], sysfs_root: str | os.PathLike[str] = SYSFS
) -> list[int | None]:
    """The node of each device (None where unknown), from the bus ids CUDA gives.

    A bus id that is empty, None or not a PCI address gives None: the lookup is a hint,
    and a device it cannot place still works.
    """
    nodes: list[int | None] = []
    for bus_id in bus_ids:
        try:
            nodes.append(node_of_bus_id(bus_id, sysfs_root) if bus_id else None)
        except (TypeError, ValueError):
            nodes.append(None)
    return nodes


def placement(
    bus_ids: Sequence[str | None], sysfs_root: str | os.PathLike[str] = SYSFS
) -> list[int]:
    """The node each device's staging blocks should prefer, as the compiled engine takes
    it (``-1``: no preference): the device's node on a machine with more than one node,
    ``-1`` everywhere on a single-node machine (placing pages there changes nothing and
    costs a system call per block) and for devices whose node is unknown (or beyond the
    engine's mask)."""
    if node_count(sysfs_root) < 2:
        return [-1] * len(bus_ids)
    nodes = device_nodes(bus_ids, sysfs_root)
    return [n if n is not None and n < MAX_NODES else -1 for n in nodes]
