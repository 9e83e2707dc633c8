"""Finding a known encoder's weights: model folders, the Hugging Face cache, then (if allowed) a download.

Every candidate is judged from its safetensors header alone (keys and shapes, no tensor data), so a
vision-only ``clip_vision`` file, a LoRA, an SD checkpoint or another CLIP size is skipped with a note and
the search goes on. Only safetensors files are ever read: gmi never unpickles (OpenAI's TorchScript
``ViT-L-14.pt`` of A1111's interrogator is a pickle archive, so it is named in the message but not read).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .encoder_registry import Geometry, HubFile, KnownEncoder, geometry_from_config
from .errors import EncoderUnavailable
from .paths import shown
from .safetensors_header import read_header as read_safetensors_header

logger = logging.getLogger("gmi")
ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)
GMI_HEADER = "gmi_encoder"


@dataclass(frozen=True)
class WeightsFile:
    path: Path
    layout: str  # "open_clip", "transformers" or "gmi"
    geometry: Geometry
    gmi_config: dict | None = None  # the open_clip config and id a gmi-written file carries


@dataclass
class SearchLog:
    """Every place and file looked at, and why it was not used; the text of the final error."""

    tried: list[tuple[str | Path, str]] = field(default_factory=list)

    def note(self, where: str | Path, why: str) -> None:
        self.tried.append((where, why))

    def lines(self) -> str:
        """For the error a user sees: files and folders by their last components, never the server path (the
        console log names them in full)."""
        return "; ".join(f"{shown(w, 3) if isinstance(w, Path) else w}: {why}" for w, why in self.tried) or "nothing"


def read_header(path: Path) -> dict:
    """The safetensors JSON header (tensor names -> dtype/shape/offsets, plus ``__metadata__``)."""
    with open(path, "rb") as handle:
        return read_safetensors_header(handle)[0]


def _count_layers(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in keys if (m := pattern.match(k))})


def _shape(header: dict, key: str) -> list[int]:
    return list(header[key]["shape"])


def inspect_weights(path: Path) -> tuple[WeightsFile | None, str]:
    """(WeightsFile, "") when the header shows a two-tower CLIP gmi can load, else (None, why not)."""
    try:
        header = read_header(path)
    except (OSError, ValueError) as exc:
        return None, f"not a readable safetensors file ({str(exc).splitlines()[0][:160]})"
    meta = header.pop("__metadata__", None) or {}
    keys = list(header)
    try:
        if GMI_HEADER in meta:
            info = json.loads(meta[GMI_HEADER])
            return WeightsFile(Path(path), "gmi", geometry_from_config(info["config"]), info), ""
        if any("lora" in k.lower() for k in keys[:500]):
            return None, "a LoRA, not a CLIP model"
        if any(k.startswith("model.diffusion_model.") for k in keys[:5000]):
            return None, "a Stable Diffusion checkpoint, not a CLIP model"
        has = set(keys)
        if "visual.conv1.weight" in has or "token_embedding.weight" in has:
            return _open_clip_file(path, header, has)
        if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
            return _transformers_file(path, header, has)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        return None, f"CLIP-like but incomplete header ({type(exc).__name__}: {exc})"
    return None, "not a CLIP model (no open_clip or transformers CLIP weights)"


def _towers(vision: bool, text: bool) -> str:
    if vision and not text:
        return "vision-only CLIP (a clip_vision file): gmi needs both towers, image and text"
    if text and not vision:
        return "text-encoder-only CLIP: gmi needs both towers, image and text"
    return ""


def _open_clip_file(path, header, has) -> tuple[WeightsFile | None, str]:
    missing = _towers("visual.conv1.weight" in has, "token_embedding.weight" in has)
    if missing:
        return None, missing
    if "text_projection" not in has or "visual.positional_embedding" not in has:
        return None, "open_clip model of an unsupported kind (no text_projection or ViT positional embedding)"
    conv = _shape(header, "visual.conv1.weight")
    grid = round((_shape(header, "visual.positional_embedding")[0] - 1) ** 0.5)
    geometry = Geometry(
        embed_dim=_shape(header, "text_projection")[1],
        image_size=grid * conv[-1],
        patch_size=conv[-1],
        vision_width=conv[0],
        vision_layers=_count_layers(has, "visual.transformer.resblocks."),
        text_width=_shape(header, "token_embedding.weight")[1],
        text_layers=_count_layers(has, "transformer.resblocks."),
        context_length=_shape(header, "positional_embedding")[0],
    )
    return WeightsFile(Path(path), "open_clip", geometry), ""


def _transformers_file(path, header, has) -> tuple[WeightsFile | None, str]:
    patch_key = "vision_model.embeddings.patch_embedding.weight"
    token_key = "text_model.embeddings.token_embedding.weight"
    missing = _towers(patch_key in has, token_key in has)
    if missing:
        return None, missing
    if "text_projection.weight" not in has or "visual_projection.weight" not in has:
        return None, "transformers CLIP without projections (not a CLIPModel)"
    conv = _shape(header, patch_key)
    grid = round((_shape(header, "vision_model.embeddings.position_embedding.weight")[0] - 1) ** 0.5)
    geometry = Geometry(
        embed_dim=_shape(header, "text_projection.weight")[0],
        image_size=grid * conv[-1],
        patch_size=conv[-1],
        vision_width=conv[0],
        vision_layers=_count_layers(has, "vision_model.encoder.layers."),
        text_width=_shape(header, token_key)[1],
        text_layers=_count_layers(has, "text_model.encoder.layers."),
        context_length=_shape(header, "text_model.embeddings.position_embedding.weight")[0],
    )
    return WeightsFile(Path(path), "transformers", geometry), ""


def check_candidate(path: Path, entry: KnownEncoder, expected: Geometry) -> tuple[WeightsFile | None, str]:
    """A file that holds ``entry``'s architecture in a layout gmi loads, else (None, why not)."""
    found, why = inspect_weights(path)
    if found is None:
        return None, why
    if found.layout == "gmi":
        return None, f"a gmi encoder file ({found.gmi_config.get('encoder_id')}); choose it by its file name"
    if found.geometry != expected:
        return None, f"wrong architecture ({found.geometry.describe()}); {entry.name} is {expected.describe()}"
    if found.layout == "transformers" and importlib.util.find_spec("transformers") is None:
        return None, "transformers-format CLIP, but the transformers package is not installed"
    return found, ""


def _folder_candidates(folder: Path, entry: KnownEncoder, open_folder: bool) -> list[Path]:
    """Known names first; in gmi's own folders also every other top-level .safetensors file."""
    paths = [folder / rel for rel in entry.local_names()]
    if open_folder and folder.is_dir():
        paths += sorted(p for p in folder.glob("*.safetensors") if p not in paths)
    return paths


def find_weights(
    entry: KnownEncoder,
    folders: Sequence[Path] = (),
    open_folders: Sequence[Path] = (),
    log: SearchLog | None = None,
    extra_notes: Sequence[Path] = (),
) -> WeightsFile | None:
    """The first usable local file: ``folders`` (known names), ``open_folders`` (any file), then the HF cache."""
    log = log if log is not None else SearchLog()
    expected = entry.geometry()
    seen: set[Path] = set()
    places = [(Path(f), True) for f in open_folders] + [(Path(f), False) for f in folders]
    for folder, is_open in places:
        hits = 0
        for path in _folder_candidates(folder, entry, is_open):
            if path in seen or not path.is_file():
                continue
            seen.add(path)
            hits += 1
            found, why = check_candidate(path, entry, expected)
            if found:
                return found
            log.note(path, why)
        if not hits:
            log.note(folder, "no candidate file" if folder.is_dir() else "folder does not exist")
    for item in entry.hub:
        path = _hub_cached(item)
        if path is None:
            log.note(f"Hugging Face cache {item.repo}/{item.filename}", "not downloaded")
            continue
        found, why = check_candidate(path, entry, expected)
        if found:
            return found
        log.note(path, why)
    for path in extra_notes:
        if Path(path).is_file():
            log.note(path, "pickle-based TorchScript file: gmi never unpickles, so it is not read")
    return None


def _hub_cached(item: HubFile) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(item.repo, item.filename, cache_dir=str(_hub_cache_dir()))
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def download_weights(
    entry: KnownEncoder, target: Path | None, log: SearchLog, progress: ProgressFn | None = None
) -> WeightsFile | None:
    """Fetch ``entry``'s weights through huggingface_hub (``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` apply).

    ``target`` is the model folder: files go to ``target/<slug>/``; None means the Hugging Face cache.
    """
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        log.note("download", "huggingface_hub is not installed")
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        log.note("download", "HF_HUB_OFFLINE is set")
        return None
    unreachable = _unreachable(_endpoint())
    if unreachable:  # one short probe instead of the hub client's retries per file (minutes before it gives up)
        log.note(f"download from {_endpoint()}", f"not reachable ({unreachable})")
        return None
    expected = entry.geometry()
    for item in entry.hub:
        local_dir = Path(target) / entry.slug if target is not None else None
        where = f"download {_endpoint()}/{item.repo}/resolve/main/{item.filename}"
        watcher = _ProgressWatcher(local_dir or _hub_cache_dir(), item, progress) if progress else None
        try:
            if watcher:
                watcher.start()
            kwargs = {"local_dir": str(local_dir)} if local_dir is not None else {"cache_dir": str(_hub_cache_dir())}
            path = Path(hf_hub_download(item.repo, item.filename, **kwargs))
        except Exception as exc:  # noqa: BLE001 - offline, HTTP errors, disk full: each is one note, then the next file
            log.note(where, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'failed'}")
            continue
        finally:
            if watcher:
                watcher.stop()
        found, why = check_candidate(path, entry, expected)
        if found:
            if progress:
                size = path.stat().st_size
                progress(size, size)
            return found
        log.note(path, f"downloaded, but {why}")
    return None


def _unreachable(url: str) -> str:
    """Why ``url`` cannot be reached within ``limits.DOWNLOAD_PROBE_TIMEOUT_S`` ("" when it answered at all:
    any HTTP status means the server is there and the client reports the rest quickly)."""
    import urllib.error
    import urllib.request

    from .limits import DOWNLOAD_PROBE_TIMEOUT_S

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=DOWNLOAD_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return ""
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{type(reason).__name__}: {str(reason)[:120]}" if str(reason) else type(reason).__name__
    return ""


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, from the environment as it is now (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home) / "hub"


class _ProgressWatcher:
    """Reports a running hub download by the size of its ``.incomplete`` file.

    Works with every huggingface_hub version (A1111 ships old ones without ``tqdm_class``); the hub's own
    console bar still shows as usual.
    """

    def __init__(self, folder: Path, item: HubFile, progress: ProgressFn, interval: float = 0.25):
        self.folder, self.item, self.progress, self.interval = Path(folder), item, progress, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gmi-download-progress", daemon=True)
        self.total = 0

    def start(self) -> None:
        self.total = _remote_size(self.item)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        last = -1
        while not self._stop.wait(self.interval):
            done = sum(p.stat().st_size for p in self.folder.rglob("*.incomplete") if p.is_file())
            if done != last and self.total:
                self.progress(min(done, self.total), self.total)
                last = done


def console_download_bar(desc: str = "CLIP weights") -> ProgressFn:
    """A tqdm bar in bytes on stderr for a weights download: the CLI's and both hosts' console (A1111 shows no
    INFO log lines unless SD_WEBUI_LOG_LEVEL is set, and HF_HUB_DISABLE_PROGRESS_BARS hides the hub's own bar)."""
    from tqdm import tqdm

    state = {"bar": None}

    def update(done: int, total: int) -> None:
        if state["bar"] is None:
            # every callback is drawn: the watcher calls at most four times a second
            state["bar"] = tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, mininterval=0)
        bar = state["bar"]
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def _remote_size(item: HubFile) -> int:
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        return int(get_hf_file_metadata(hf_hub_url(item.repo, item.filename)).size or 0)
    except Exception:  # noqa: BLE001 - unknown size: the download itself reports the real problem
        return 0


def resolve_weights(
    entry: KnownEncoder,
    folders: Sequence[Path] = (),
    open_folders: Sequence[Path] = (),
    allow_download: bool = False,
    download_dir: Path | None = None,
    progress: ProgressFn | None = None,
    pickle_files: Sequence[Path] = (),
) -> WeightsFile:
    """The one place weights of a known encoder are found; raises EncoderUnavailable naming all that was tried."""
    log = SearchLog()
    found = find_weights(entry, folders, open_folders, log, pickle_files)
    if found is None and allow_download:
        found = download_weights(entry, download_dir, log, progress)
    if found is not None:
        for where, why in log.tried:
            logger.info("gmi: %s: skipped %s (%s)", entry.name, where, why)
        return found
    hint = Path(download_dir or (list(open_folders) + list(folders) or [Path("<model folder>")])[0])
    first = entry.hub[0]
    download = "" if allow_download else "; or allow downloads (gmi then fetches it itself)"
    raise EncoderUnavailable(
        f"no usable weights for CLIP encoder {entry.name}. "
        f"Fix: download {first.url} and save it as {shown(hint / (entry.slug + '.safetensors'), 4)}{download}. "
        f"Tried: {log.lines()}."  # last: what to do stays in view where a host cuts a long message
    )
