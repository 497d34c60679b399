"""What the HTTP API (`api`) is allowed to serve: its limits, its credentials and its model folders.

Clients name models, LoRAs and ControlNets by the names this module lists; a name is looked up among
the entries found inside the configured folder, never joined onto a path, so that '..', absolute paths
and symlinks leading out of the folder name nothing. Pickled files (.ckpt, .pt, .pth, .bin) are not
listed, and are refused by name, unless the server allows pickles. Imports neither fastapi nor gradio.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..loading.folders import PICKLE_SUFFIXES

MAX_DEPTH = 4  # folder levels searched below a configured folder
MAX_ENTRIES = 10_000  # entries listed per folder
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]$")  # A1111's titles end in " [hash]"


@dataclass(frozen=True)
class Limits:
    """Requests beyond these are answered with a 4xx before any work (`ldm serve --api-limits`)."""

    size: int = 2048  # width and height of what is drawn, pixels
    steps: int = 150  # denoising steps
    images: int = 16  # images per request (batch_size x n_iter)
    batch: int = 8  # images drawn together (batch_size)
    body_mb: float = 64.0  # a request's body, MiB
    picture_mpx: float = 16.8  # a picture sent in (init image, mask, control picture), megapixels
    controlnets: int = 3  # ControlNet units per request
    queue: int = 32  # requests waiting for the model (more get a 503)
    prompt: int = 20_000  # characters of a prompt or negative prompt

    @classmethod
    def parse(cls, text: str) -> "Limits":
        """`size=1024,steps=50,...` -> Limits (unnamed limits keep their defaults)."""
        names = {f.name: f.type for f in fields(cls)}
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            key = key.strip()
            if key not in names:
                raise ValueError(f"--api-limits: unknown limit {key!r}; expected some of {', '.join(names)}")
            try:
                number = float(value) if names[key] == "float" else int(value)
            except ValueError:
                raise ValueError(f"--api-limits: {key}={value!r} is not a number") from None
            if number <= 0:
                raise ValueError(f"--api-limits: {key}={value} must be positive")
            values[key] = number
        return cls(**values)

    @property
    def body_bytes(self) -> int:
        return int(self.body_mb * 1024 * 1024)

    @property
    def picture_pixels(self) -> int:
        return int(self.picture_mpx * 1_000_000)


def parse_auth(text: str | None) -> list[tuple[str, str]]:
    """`user:pass[,user2:pass2]` (A1111's --api-auth) -> [(user, password)]; None or '' -> []."""
    pairs = []
    for part in filter(None, (text or "").split(",")):
        user, colon, password = part.strip().partition(":")
        if not colon or not user or not password:
            raise ValueError(f"--api-auth: got {part!r}; expected user:password pairs separated by commas")
        pairs.append((user, password))
    return pairs


@dataclass(frozen=True)
class Entry:
    """A model, LoRA or ControlNet found in a folder."""

    name: str  # what clients send: the path inside the folder, '/' between parts (a LoRA's without suffix)
    path: Path  # resolved, inside the folder
    pickled: bool = False

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()


def _inside(path: Path, root: Path) -> Path | None:
    """`path` resolved, or None when it leads out of `root` (a symlink) or cannot be resolved."""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return resolved if resolved == root or resolved.is_relative_to(root) else None


def _walk(root: Path):
    """(relative parts, path) of every entry below `root`, hidden ones left out, at most MAX_DEPTH deep."""
    stack = [((), root)]
    while stack:
        parts, folder = stack.pop()
        try:
            children = sorted(folder.iterdir())
        except OSError:
            continue
        for child in children:
            if child.name.startswith("."):
                continue
            yield (*parts, child.name), child
            if child.is_dir() and len(parts) + 1 < MAX_DEPTH and _inside(child, root) is not None:
                stack.append(((*parts, child.name), child))


def scan(folder: Path | None, kind: str) -> dict[str, Entry]:
    """The entries of one folder, by name.

    kind: "checkpoint" (diffusers model folders with model_index.json, and single .safetensors files),
    "lora" (.safetensors files, named without the suffix) or "controlnet" (diffusers ControlNet folders with
    config.json, and single .safetensors files, named without the suffix). Pickled files are listed with
    `pickled=True`.
    """
    if folder is None:
        return {}
    root = Path(folder).resolve()
    if not root.is_dir():
        return {}
    found: dict[str, Entry] = {}
    marker = {"checkpoint": "model_index.json", "controlnet": "config.json"}.get(kind)
    inside_models: list[tuple[str, ...]] = []
    for parts, path in _walk(root):
        if len(found) >= MAX_ENTRIES:
            break
        if any(parts[:len(p)] == p for p in inside_models):
            continue  # the files of a model folder are not models of their own
        resolved = _inside(path, root)
        if resolved is None:
            continue
        if resolved.is_dir():
            if marker is not None and (resolved / marker).is_file():
                inside_models.append(parts)
                found["/".join(parts)] = Entry("/".join(parts), resolved)
            continue
        suffix = path.suffix.lower()
        if suffix not in (".safetensors", *PICKLE_SUFFIXES):
            continue
        name = "/".join(parts) if kind == "checkpoint" else "/".join(parts)[: -len(path.suffix)]
        found.setdefault(name, Entry(name, resolved, pickled=suffix in PICKLE_SUFFIXES))
    return found


def check_name(what: str, name) -> str:
    """A name as a client sends it, without A1111's ' [hash]' ending; refuses paths that try to leave."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what}: got {name!r}; expected a name from the list")
    name = _HASH_SUFFIX.sub("", name.strip())
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts or "\0" in name:
        raise ValueError(f"{what}: {name!r} is a path; names resolve only inside the configured folder")
    return name


@dataclass
class ApiConfig:
    """The API's settings: what `ldm serve --api ...` was given.

    Attributes:
        auth: (user, password) pairs; empty: no credentials asked (HTTP Basic otherwise, as A1111).
        ckpt_dir, lora_dir, controlnet_dir: the folders models, LoRAs and ControlNets are chosen from.
        model_name, load_model: the starting model's name in /sd-models, and how to load it again after
            another model was chosen (None: it cannot be chosen again).
        allow_pickle: list and load pickled files (torch.load(weights_only=True)); off by default.
        device: where models chosen through the API are loaded.
    """

    limits: Limits = field(default_factory=Limits)
    auth: list[tuple[str, str]] = field(default_factory=list)
    ckpt_dir: Path | None = None
    lora_dir: Path | None = None
    controlnet_dir: Path | None = None
    embeddings_dir: Path | None = None  # textual-inversion embeddings loaded into every model (A1111's folder)
    model_name: str | None = None  # default: the name the starting pipeline was loaded under
    load_model: object = None
    allow_pickle: bool = False
    device: str = "cpu"

    def entries(self, kind: str) -> dict[str, Entry]:
        """What clients may choose, by name (pickled entries only when allowed)."""
        folder = {"checkpoint": self.ckpt_dir, "lora": self.lora_dir, "controlnet": self.controlnet_dir}[kind]
        return {name: e for name, e in scan(folder, kind).items() if self.allow_pickle or not e.pickled}

    def find(self, kind: str, what: str, name) -> Entry:
        """The entry a client names, or a ValueError naming `what` and listing the choices."""
        name = check_name(what, name)
        folder = {"checkpoint": self.ckpt_dir, "lora": self.lora_dir, "controlnet": self.controlnet_dir}[kind]
        every = scan(folder, kind)
        entry = every.get(name)
        if entry is not None and entry.pickled and not self.allow_pickle:
            raise ValueError(f"{what}: {name!r} is a pickle, which can run code when loaded; the server refuses "
                             "pickles (start it with --allow-pickle to accept them)")
        if entry is None:
            choices = ", ".join(sorted(self.entries(kind))[:20]) or "none"
            where = "no folder is configured" if folder is None else f"choices: {choices}"
            raise ValueError(f"{what}: no {kind} named {name!r} ({where})")
        if _inside(entry.path, Path(folder).resolve()) is None:  # changed since it was listed
            raise ValueError(f"{what}: {name!r} leads out of the configured folder")
        return entry

    def load_checkpoint(self, entry: Entry):
        """The pipeline of a model of the checkpoint folder: a diffusers folder, or an original single file."""
        from ..pipeline import LatentDiffusionPipeline

        if entry.is_folder:
            return LatentDiffusionPipeline.from_pretrained(entry.path, device=self.device,
                                                           allow_pickle=self.allow_pickle)
        return LatentDiffusionPipeline.from_single_file(entry.path, device=self.device, allow_pickle=self.allow_pickle)


def model_name_of(source) -> str:
    """The name a starting model (--model: a folder, a file or a Hub id; None: the bundled one) is listed under."""
    if source is None:
        return "shapes"
    path = Path(source)
    return path.name if path.exists() else str(source)


def add_flags(serve) -> None:
    """`ldm serve`'s API flags, in AUTOMATIC1111's names where it has them."""
    serve.add_argument("--listen", action="store_true", help="listen on every interface (0.0.0.0), not --host")
    serve.add_argument("--api", action="store_true", help="also serve AUTOMATIC1111's HTTP API (/sdapi/v1/..., "
                                                          "docs at /docs); needs the [api] extra")
    serve.add_argument("--nowebui", action="store_true", help="serve the API alone, without the page (implies --api)")
    serve.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER2:PASS2]",
                       help="API clients must send one of these (HTTP Basic)")
    serve.add_argument("--api-limits", default="", metavar="KEY=N[,KEY=N]", help=(
        "change the API's limits: " + ", ".join(f"{f.name} (default {f.default:g})" for f in fields(Limits))))
    for kind, flag in (("models", "--ckpt-dir"), ("LoRAs", "--lora-dir"), ("ControlNets", "--controlnet-dir")):
        serve.add_argument(flag, type=Path, default=None, metavar="DIR",
                           help=f"the folder API clients choose {kind} from (by name, never by path)")
    serve.add_argument("--embeddings-dir", type=Path, default=None, metavar="DIR",
                       help="textual-inversion embeddings loaded into the model (each under its file's name)")
    serve.add_argument("--allow-pickle", action="store_true",
                       help="let API clients choose pickled files (.ckpt, .pt, .bin; torch.load(weights_only=True))")


def config_from_args(args, load_model) -> ApiConfig | None:
    """The API's configuration from `ldm serve`'s flags (None without --api or --nowebui), checked."""
    if not (args.api or args.nowebui):
        given = [flag for flag, value in (("--api-auth", args.api_auth), ("--api-limits", args.api_limits),
                                          ("--ckpt-dir", args.ckpt_dir), ("--lora-dir", args.lora_dir),
                                          ("--controlnet-dir", args.controlnet_dir),
                                          ("--embeddings-dir", args.embeddings_dir),
                                          ("--allow-pickle", args.allow_pickle)) if value]
        if given:
            raise ValueError(f"{', '.join(given)}: apply to the API; add --api")
        return None
    for flag, folder in (("--ckpt-dir", args.ckpt_dir), ("--lora-dir", args.lora_dir),
                         ("--controlnet-dir", args.controlnet_dir), ("--embeddings-dir", args.embeddings_dir)):
        if folder is not None and not folder.is_dir():
            raise ValueError(f"{flag}: {str(folder)!r} is not a folder")
    config = ApiConfig(limits=Limits.parse(args.api_limits), auth=parse_auth(args.api_auth), ckpt_dir=args.ckpt_dir,
                       lora_dir=args.lora_dir, controlnet_dir=args.controlnet_dir,
                       embeddings_dir=args.embeddings_dir, model_name=model_name_of(args.model),
                       load_model=load_model, allow_pickle=args.allow_pickle, device=args.device)
    if args.model is not None and Path(args.model).exists():  # a model of the folder is listed under its name there
        source = Path(args.model).resolve()
        config.model_name = next((e.name for e in config.entries("checkpoint").values() if e.path == source),
                                 config.model_name)
    return config


def load_embeddings(pipe, folder: Path | None, allow_pickle: bool) -> tuple[dict, dict]:
    """Load every embedding file of `folder` into `pipe` (as A1111 does at start and after a model switch).

    Returns:
        `(loaded, skipped)` as A1111's /embeddings reports them: name -> its vectors and width, or why not.
    """
    loaded, skipped = {}, {}
    if folder is None:
        return loaded, skipped
    root = folder.resolve()
    suffixes = {".safetensors", *(PICKLE_SUFFIXES if allow_pickle else ())}
    for file in sorted(folder.iterdir()):
        if file.suffix not in suffixes or not file.is_file() or file.resolve().parent != root:
            continue  # another kind of file, or a link leading out of the folder
        try:
            token = pipe.load_textual_inversion(file, token=file.stem, allow_pickle=allow_pickle).embeddings[file.stem]
        except (ValueError, TypeError, OSError, KeyError) as error:
            skipped[file.stem] = {"error": str(error).splitlines()[0][:200]}
            continue
        # one width, as A1111 reports it: the towers' together (768 + 1280 for an SDXL pair)
        width = sum(encoder.get_input_embeddings().weight.shape[-1] for _, encoder in pipe.text_towers)
        loaded[file.stem] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": width,
                             "vectors": token["vectors"]}
    return loaded, skipped
