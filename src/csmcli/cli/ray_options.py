"""The ``--ray`` options of ``csm batch`` (apart from the code that runs them, which needs the batch module)."""

from __future__ import annotations

from typing import Annotated

import typer


def ray_address(value: str | None) -> str | None:
    """Check ``--ray`` before anything runs: a known address form, and Ray installed."""
    if value is None:
        return None
    from ..cluster import check_address, import_ray

    check_address(value)
    import_ray()
    return value


def ray_cpus(value: int | None) -> int | None:
    """``--ray-cpus`` is a positive number of cores."""
    if value is not None and value < 1:
        from ..errors import OptionsError

        raise OptionsError(f"--ray-cpus must be at least 1, got {value}")
    return value


RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        envvar="CSM_RAY",
        callback=ray_address,
        metavar="ADDRESS",
        help="Run on a Ray cluster: auto (the running one), local (start one here), ray://HOST:PORT or HOST:PORT. "
        "The output folder must be storage every node mounts at the same path. Needs csmcli[ray].",
    ),
]
RayCpusOpt = Annotated[
    int | None,
    typer.Option(
        "--ray-cpus",
        callback=ray_cpus,
        help="CPU cores per Ray worker on a cluster without GPUs (default: 4, or a node's all if it has fewer).",
    ),
]
