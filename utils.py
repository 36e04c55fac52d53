"""Shared plumbing: distributed setup, logging, seeding, run folders, atomic checkpoint IO, grids,
and the one way a script reports bad input."""

import dataclasses
import fcntl
import functools
import hashlib
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import tyro


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr with exit status 2."""


def flag(field_name: str) -> str:
    """The command-line spelling of a config field."""
    return "--" + field_name.replace("_", "-")


def require_at_least_one(**values: int | None) -> None:
    """None is a value not set yet (a family default), checked once it is resolved."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise UsageError(f"{flag(name)} must be at least 1, got {value}")


def require_finite(cfg) -> None:
    """No float field of a config, alone or in a tuple or list, is NaN or infinite: NaN passes no
    comparison, so a range check alone would let `--guidance-scale nan` through."""
    for config_field in dataclasses.fields(cfg):
        value = getattr(cfg, config_field.name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise UsageError(f"{flag(config_field.name)} must be a finite number, got {value}")


def exit_cleanly_on_usage_error(main):
    """Turn a UsageError anywhere below `main` into one line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapped


# ---------------------------------------------------------------------------------------------
# Distributed


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def cli_with_presets(config_class, presets: dict[str, dict], description: str, args: list[str] | None = None,
                     protocols: dict[str, dict] | None = None):
    """Parse the command line over the defaults of its --preset, and of its --protocol (of `protocols`)
    where the config has one: they only change defaults, so every flag given still wins. Without them the
    class's own defaults (those of real use) apply."""
    cfg = tyro.cli(config_class, args=args, description=description)
    chosen = {"preset": cfg.preset, **({"protocol": cfg.protocol} if protocols else {})}
    settings = {**presets.get(cfg.preset, {}), **(protocols or {}).get(chosen.get("protocol"), {})}
    if not settings:
        return cfg
    defaults = config_class(**chosen, **settings)
    return tyro.cli(config_class, args=args, default=defaults, description=description)


def init_distributed(device: str = "auto") -> Dist:
    """Same code for `python script.py` (one process) and `torchrun` (env vars set by it)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible to this process; use --device cpu or auto")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local_rank} has no GPU: {torch.cuda.device_count()} are visible; "
                             "start at most that many processes per node")
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        # NCCL serves only CUDA tensors; gloo beside it serves what stays on the CPU (object gathers).
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo")
    return Dist(rank, world_size, local_rank, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hugging Face hub can be reached. Loaders pass `local_files_only` when it cannot, so
    that a cached model loads at once and a missing one fails in one line, not after a minute of
    retry warnings. Behind a proxy the direct probe would fail, so the hub is then assumed reachable."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
    except OSError:
        return False
    return True


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def served_device_types() -> set[str]:
    """The device types the default process group has a backend for ("cpu:gloo,cuda:nccl" serves both;
    plain NCCL only "cuda")."""
    return {entry.split(":")[0] for entry in dist.get_backend_config().split(",")}


def check_served(tensor: torch.Tensor) -> None:
    """A tensor on a device the backend does not serve fails deep inside torch.distributed, on the
    cluster only; say which, at the call."""
    served = served_device_types()
    if tensor.device.type not in served:
        raise RuntimeError(f"a collective got a {tensor.device.type} tensor, but the process group serves "
                           f"{', '.join(sorted(served))} only: create it on the run's device")


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors over ranks in place, coalesced into one buffer per dtype."""
    if not dist.is_initialized():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        check_served(tensor)
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for tensor in group:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def gather_objects(obj) -> list:
    """Every rank's object, in rank order (a one-element list without torch.distributed)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_main(make, device: torch.device | None = None):
    """Rank 0's `make()` on every rank, which rank 0 alone calls: nodes may share no filesystem, so what
    it decides or reads (a run dir's record, the checkpoint to resume and its contents) holds everywhere.
    Tensors of more than one element travel one by one on `device` (a device the backend serves), the
    rest pickled; the other ranks receive them on `device` (needed only where there are such tensors). A
    UsageError of `make` is raised on every rank."""
    if not dist.is_initialized():
        return make()
    value, error, tensors = None, None, []
    if dist.get_rank() == 0:
        try:
            value = make()
        except UsageError as raised:
            error = str(raised)
        skeleton = _tensors_taken_out(value, tensors)
        header = [(skeleton, error, [(tensor.shape, tensor.dtype) for tensor in tensors])]
    else:
        header = [None]
    dist.broadcast_object_list(header)
    skeleton, error, shapes = header[0]
    if error is not None:
        raise UsageError(error)
    if dist.get_rank() == 0:
        received = [tensor.detach().to(device) for tensor in tensors]
    else:
        received = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in shapes]
    for tensor in received:
        check_served(tensor)
        dist.broadcast(tensor, src=0)
    return value if dist.get_rank() == 0 else _tensors_put_back(skeleton, received)


class _TensorSlot(int):
    """Where a tensor sent on its own sits in a broadcast structure: its index in the tensor list."""


def _tensors_taken_out(value, tensors: list):
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        tensors.append(value)
        return _TensorSlot(len(tensors) - 1)
    if isinstance(value, dict):
        return {key: _tensors_taken_out(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_tensors_taken_out(item, tensors) for item in value)
    return value


def _tensors_put_back(value, tensors: list):
    if isinstance(value, _TensorSlot):
        return tensors[value]
    if isinstance(value, dict):
        return {key: _tensors_put_back(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_tensors_put_back(item, tensors) for item in value)
    return value


def in_turns_per_node(dist_info: Dist, load):
    """`load()` on every process of `dist_info`, first on rank 0, then on the other nodes' local rank 0,
    then on the rest, the others waiting: what it downloads into a node's home (DreamSim's weights) is
    fetched once per node, never by two processes into one folder at once, and once in all where the
    nodes share their home."""
    if dist_info.world_size == 1:
        return load()
    turn = 0 if dist_info.is_main else 1 if dist_info.local_rank == 0 else 2
    result = None
    for current in range(3):
        if turn == current:
            result = load()
        barrier()
    return result


def print0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


# ---------------------------------------------------------------------------------------------
# Seeds


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes, ranks and Python versions."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generators(seeds: list[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(seed) for seed in seeds]


# ---------------------------------------------------------------------------------------------
# Files


def ensure_writable_dir(path: str) -> None:
    """Create `path` (and parents) or fail with one line; nothing is left behind on failure."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create folder {path!r}: {error.strerror}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"folder {path!r} is not writable")


class JsonlLog:
    """Append-only scalar log, one JSON object per line, each with its "step"."""

    def __init__(self, path: str):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def drop_after(self, step: int) -> None:
        """Forget the records past `step`: a resumed run writes them again, and each step is logged once."""
        if not os.path.exists(self.path):
            return
        kept = [record for record in self.records() if record["step"] <= step]

        def write(tmp):
            with open(tmp, "w") as f:
                f.writelines(json.dumps(record) + "\n" for record in kept)

        write_atomic_file(self.path, write)


def hold_run_dir(run_dir: str, required: bool = False):
    """An exclusive lock on the run dir for as long as this process lives (the OS releases it when the
    process ends, even by kill -9, so a resume is never blocked). Returns the open lock file, to keep.
    Where the filesystem cannot lock (NFS without a lock manager, Lustre without its flock option) the
    run goes on unlocked after one line saying so, or, `required`, is refused."""
    path = os.path.join(run_dir, ".lock")
    existed = os.path.exists(path)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(f"--run-dir {run_dir!r} is in use by a training ({holder}); wait for it to end "
                         "or use another --run-dir") from None
    except OSError as error:  # ENOLCK, EOPNOTSUPP, ENOSYS: no locks on this filesystem, not a holder
        handle.close()
        if not existed:  # a lock file that locks nothing would only mislead
            os.remove(path)
        consequence = (f"--run-dir {run_dir!r} cannot be locked on its filesystem ({error.strerror}), so nothing "
                       "would stop a second training on it from overwriting this one's checkpoints")
        if required:
            raise UsageError(f"{consequence}; use a run dir on a filesystem with flock, or leave out "
                             f"{flag('require_run_dir_lock')} and start one training per run dir") from None
        print(f"warning: {consequence}: start one training per run dir ({flag('require_run_dir_lock')} "
              "refuses instead)", file=sys.stderr, flush=True)
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle


def check_run_dir_shared(run_dir: str, dist_info: Dist) -> None:
    """Every rank must see what rank 0 writes into the run dir (sharded checkpoints are written there
    by all and read back by all): rank 0 writes a file of its own making, every rank looks for it, and
    a rank that cannot see it ends the run on every rank in one line, before anything is loaded or
    trained. A run dir made for the probe is removed again: bad input found later leaves nothing behind."""
    existed = os.path.isdir(run_dir)

    def write_probe() -> str:
        ensure_writable_dir(run_dir)
        path = os.path.join(run_dir, f".shared-probe-{socket.gethostname()}-{os.getpid()}")
        with open(path, "w") as f:
            f.write(path)
        return path

    probe = broadcast_from_main(write_probe)
    try:
        with open(probe) as f:
            sees = f.read() == probe
    except OSError:
        sees = False
    blind = [rank for rank, saw in enumerate(gather_objects(sees)) if not saw]
    if dist_info.is_main:
        os.remove(probe)
        if not existed:
            os.rmdir(run_dir)
    if blind:
        raise UsageError(f"--run-dir {run_dir!r} is not shared: rank {', '.join(map(str, blind))} cannot see what "
                         "rank 0 writes there, and --fsdp writes and reads every rank's shards in it; give a "
                         "folder that every node mounts at the same path")


def write_atomic_file(path: str, write_into) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write_into(tmp)
    os.replace(tmp, path)


def save_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    write_atomic_file(path, write)


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


# ---------------------------------------------------------------------------------------------
# Images


def to_pil(images: torch.Tensor) -> list:
    """Float [B,3,H,W] in [0,1] to PIL images."""
    from PIL import Image

    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def image_grid(rows: list[list], captions: list[list[str]] | None = None, header: list[str] | None = None):
    """Lay PIL images out in a grid, with an optional caption under each (wrapped to the image's
    width; `\n` starts a new line) and a header per column."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [[_at_least(image, 160) for image in row] for row in rows]
    width, height = rows[0][0].size
    font_size = max(10, min(24, width // 12))
    font = ImageFont.load_default(size=font_size)
    line_h = font_size + 4
    wrapped = [[_wrapped(text, font, width - 6) for text in row] for row in captions or []]
    caption_h = max((len(lines) for row in wrapped for lines in row), default=0) * line_h + (2 if captions else 0)
    header_h = font_size + 8 if header else 0
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (columns * width, header_h + len(rows) * (height + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(header or []):
        draw.text((c * width + 3, 3), text, fill="black", font=font)
    for r, row in enumerate(rows):
        top = header_h + r * (height + caption_h)
        for c, image in enumerate(row):
            grid.paste(image, (c * width, top))
            for k, line in enumerate(wrapped[r][c] if captions else []):
                draw.text((c * width + 3, top + height + 2 + k * line_h), line, fill="black", font=font)
    return grid


def _wrapped(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to a width in pixels (a single word longer than that stays whole)."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    return lines


def _at_least(image, side: int):
    """Upscale small images (nearest, so pixels stay visible) to leave room for captions."""
    factor = -(-side // min(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), resample=0)


class MemoryMeter:
    """Memory of the training steps: the CUDA allocator's on a GPU, the resident set on the CPU (Linux).
    `peak_mb()` is the peak since the last `reset_peak()`, `growth_mb()` that peak above what was
    resident when the meter was made (the loaded models), the figure that sharding changes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline_mb = self._resident_mb()

    def _resident_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return _proc_status_kb("VmRSS") / 1024

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM, the peak resident set

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _proc_status_kb("VmHWM") / 1024

    def growth_mb(self) -> float:
        return self.peak_mb() - self.baseline_mb


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# ---------------------------------------------------------------------------------------------
# Checkpoints: RUN_DIR/checkpoints/step-XXXXXXX, each written whole or not at all


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step-{step:07d}")


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint; `.tmp-` folders of a killed save are ignored."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = [name for name in os.listdir(root) if name.startswith("step-") and name[5:].isdigit()]
    return os.path.join(root, max(steps)) if steps else None
