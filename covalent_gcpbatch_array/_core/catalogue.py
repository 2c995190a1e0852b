"""The Compute Engine shapes Google Batch can allocate, as data (``compute_catalogue.json``).

Regions and their zones, machine families and the vCPU/memory of their machine types, GPU types
with the counts, machine family and regions each comes in: compiled from Google's public
documentation (the file names its pages and the date they were read). One catalogue serves the
executor's config validation (refuse an impossible shape before any job is made) and the local
cloud (a job asking for it is accepted, then FAILS at scheduling, as Google's does).

:meth:`Catalogue.problems` lists every problem as a :class:`ShapeProblem` whose ``part`` says
what is wrong (``region``, ``zone``, ``machine_type``, ``accelerator_type``,
``accelerator_count``, ``vcpus``, ``memory``); each caller names its own field for that part.
A problem is ``certain`` when the shape cannot exist whatever the date (unknown region, family,
series or GPU type, a GPU count the type never comes in, a GPU on a family that cannot take it,
a task larger than a confirmed machine type); it is not when it rests on a fact that changes
over time or that the catalogue could not confirm (a GPU not listed for the region, a size
missing from a family whose size list is unconfirmed). The executor refuses only certain
problems and warns about the others; the local cloud fails a job on either.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

__all__ = ["Catalogue", "MachineShape", "ShapeProblem", "catalogue"]

# "custom-4-16384" (N1), "n2-custom-4-16384", "e2-custom-2-8192-ext": vCPUs, then memory in MiB.
_CUSTOM_RE = re.compile(r"^(?:(?P<family>[a-z0-9]+)-)?custom-(?P<cpus>\d+)-(?P<mib>\d+)(?:-ext)?$")


@dataclass(frozen=True)
class MachineShape:
    """One machine type: its size, and the GPUs that come with it (bundled types only)."""

    name: str  # e.g. "n2-standard-4"
    family: str  # e.g. "n2"
    vcpus: float  # vCPUs of the VM
    memory_mib: int  # memory of the VM
    gpu: str | None = None  # the GPU type bundled with an accelerator-optimized type
    gpu_count: int = 0  # how many of them


@dataclass(frozen=True)
class ShapeProblem:
    """Why a shape cannot be allocated."""

    part: str  # region, zone, machine_type, accelerator_type, accelerator_count, vcpus, memory
    message: str  # says what is wrong and what would be right
    certain: bool = True  # False: rests on a changing or unconfirmed fact of the catalogue


class Catalogue:
    """Lookups over the catalogue's data (see the module docstring)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.retrieved: str = data["retrieved"]
        self.sources: dict[str, str] = dict(data["sources"])
        self.regions: dict[str, tuple[str, ...]] = {
            region: tuple(zones) for region, zones in data["regions"].items()
        }
        self.gpus: dict[str, dict[str, Any]] = dict(data["gpus"])
        self.families = frozenset(data["families"]) | frozenset(data["families_uncatalogued"])
        self._uncatalogued = frozenset(data["families_uncatalogued"])
        self._unconfirmed_sizes = {
            name for name, family in data["families"].items() if not family["sizes_confirmed"]
        }
        self._series = {
            name: frozenset(family.get("series", {})) for name, family in data["families"].items()
        }
        self._custom_families = {
            name for name, family in data["families"].items() if family.get("custom")
        }
        self._gpu_families = {
            name for name, family in data["families"].items() if family.get("attachable_gpus")
        }
        self.machines: dict[str, MachineShape] = {}
        for name, family in data["families"].items():
            for series, (sizes, gib_per_vcpu) in family.get("series", {}).items():
                for vcpus in sizes:
                    machine = f"{name}-{series}-{vcpus}"
                    self.machines[machine] = MachineShape(
                        machine, name, vcpus, round(vcpus * gib_per_vcpu * 1024)
                    )
            for machine, (vcpus, gib, *gpu) in family.get("fixed", {}).items():
                self.machines[machine] = MachineShape(
                    machine, name, vcpus, round(gib * 1024), *(gpu or (None, 0))
                )

    def machine(self, name: str) -> MachineShape | None:
        """The machine type ``name`` (predefined or custom), or None if Google has none."""
        if name in self.machines:
            return self.machines[name]
        match = _CUSTOM_RE.fullmatch(name)
        if match is None:
            return None
        family = match["family"] or "n1"
        if family not in self._custom_families:
            return None
        return MachineShape(name, family, int(match["cpus"]), int(match["mib"]))

    def check(self, **shape: Any) -> ShapeProblem | None:
        """The first reason the shape cannot be allocated (a certain one first), or None.

        Takes the arguments of :meth:`problems`.
        """
        found = list(self.problems(**shape))
        return next((p for p in found if p.certain), found[0] if found else None)

    def problems(
        self,
        *,
        region: str,
        machine_type: str = "",
        accelerator_type: str = "",
        accelerator_count: int = 0,
        zones: Iterable[str] = (),
        vcpus: float = 0,
        memory_mib: int = 0,
    ) -> Iterator[ShapeProblem]:
        """Every reason the shape cannot be allocated in ``region``, in the order checked.

        Empty or zero arguments are not checked (Batch picks a machine type itself).
        """
        problem = self._check_location(region, zones)
        if problem is not None:
            yield problem
            return
        machine = None
        if machine_type:
            machine = self.machine(machine_type)
            if machine is None:
                problem = self._unknown_machine(machine_type)
                if problem is not None:
                    yield problem
                    if problem.certain:
                        return
        if accelerator_type or (machine is not None and machine.gpu):
            yield from self._check_gpu(region, machine, accelerator_type, accelerator_count)
        if machine is not None and vcpus > machine.vcpus:
            yield ShapeProblem(
                "vcpus",
                f"a task asks for {vcpus:g} vCPUs but machine type {machine.name} has "
                f"{machine.vcpus:g}; ask for fewer or choose a larger machine type",
            )
        if machine is not None and memory_mib > machine.memory_mib:
            yield ShapeProblem(
                "memory",
                f"a task asks for {memory_mib} MiB of memory but machine type {machine.name} "
                f"has {machine.memory_mib} MiB; ask for less or choose a larger machine type",
            )

    def _unknown_machine(self, name: str) -> ShapeProblem | None:
        """Why ``name``, which the catalogue does not list, cannot exist (None: unchecked)."""
        family, _, rest = name.partition("-")
        series = rest.rsplit("-", 1)[0] if "-" in rest else ""
        if family in self._uncatalogued:
            return None  # a real family whose shapes the catalogue does not list
        if family not in self.families:
            return ShapeProblem(
                "machine_type",
                f"machine type {name!r} is of no Compute Engine machine family ({family!r} is "
                f"not one of {', '.join(sorted(self.families))}); use a predefined type such "
                f"as 'n2-standard-4' or a custom one such as 'n2-custom-4-16384' (see "
                f"{self.sources['machine_families']})",
            )
        if family in self._unconfirmed_sizes and series in self._series[family]:
            return ShapeProblem(
                "machine_type",
                f"machine type {name!r} is not in the catalogue's list for {family} (read "
                f"{self.retrieved}, not confirmed against {self.sources['machine_families']})",
                certain=False,
            )
        return ShapeProblem(
            "machine_type",
            f"machine type {name!r} does not exist in the {family} family; its predefined "
            f"types are {', '.join(self._family_types(family))} (see "
            f"{self.sources['machine_families']})",
        )

    def _family_types(self, family: str) -> list[str]:
        return [name for name, shape in self.machines.items() if shape.family == family]

    def _check_location(self, region: str, zones: Iterable[str]) -> ShapeProblem | None:
        if region not in self.regions:
            return ShapeProblem(
                "region",
                f"region {region!r} does not exist; use one of {', '.join(self.regions)} (see "
                f"{self.sources['regions']})",
            )
        for zone in zones:
            if zone not in self.regions[region]:
                return ShapeProblem(
                    "zone",
                    f"zone {zone!r} is not a zone of region {region}; its zones are "
                    f"{', '.join(self.regions[region])}",
                )
        return None

    def _check_gpu(
        self, region: str, machine: MachineShape | None, gpu: str, count: int
    ) -> Iterator[ShapeProblem]:
        if machine is not None and machine.gpu:
            if gpu and (gpu != machine.gpu or count != machine.gpu_count):
                yield ShapeProblem(
                    "accelerator_type" if gpu != machine.gpu else "accelerator_count",
                    f"machine type {machine.name} comes with {machine.gpu_count} x "
                    f"{machine.gpu}, not {count} x {gpu}; leave the accelerator out or ask "
                    f"for exactly that",
                )
                return
            gpu, count = machine.gpu, machine.gpu_count
        details = self.gpus.get(gpu)
        if details is None:
            yield ShapeProblem(
                "accelerator_type",
                f"accelerator type {gpu!r} does not exist; use one of "
                f"{', '.join(self.gpus)} (see {self.sources['gpus']})",
            )
            return
        if count not in details["counts"]:
            yield ShapeProblem(
                "accelerator_count",
                f"{gpu} comes {' or '.join(map(str, details['counts']))} to a VM, not {count}",
            )
            return
        family = details["attach_to"]
        if machine is not None and machine.family != family:
            yield ShapeProblem(
                "machine_type",
                f"{gpu} needs a {family} machine type, not {machine.name} (see "
                f"{self.sources['gpus']})",
            )
            return
        if family not in self._gpu_families and machine is None:
            # Batch picks the machine type only for GPUs attachable to N1 VMs.
            yield ShapeProblem(
                "machine_type",
                f"{gpu} is bundled with {family} machine types: name one (see "
                f"{self.sources['accelerator_optimized']})",
            )
            return
        regions = details["regions"]
        if regions is not None and region not in regions:
            yield ShapeProblem(
                "accelerator_type",
                f"{gpu} is not listed for region {region}; the catalogue (read "
                f"{self.retrieved}) has it in {', '.join(regions)} (see "
                f"{self.sources['gpu_regions']})",
                certain=False,
            )


@functools.cache
def catalogue() -> Catalogue:
    """The catalogue shipped with the package (read once)."""
    text = resources.files(__package__).joinpath("compute_catalogue.json").read_text()
    return Catalogue(json.loads(text))
