"""The demo world: captions of a small grammar, the scenes they describe drawn with PIL, and the gold
evaluator that reads a scene back from pixels alone (no learned parts).

A caption names a shape, its colour and the background colour, and optionally a size and a position:

    a [small|large] <colour> <circle|square|triangle> [in the center|at the left|...] on a <colour> background

Attributes a caption leaves out are drawn at random, so "a red circle on a blue background" has many
right answers, some prettier than others. The hand-defined aesthetic of a scene is

    contrast (RGB distance of shape and background) x size (of the shape) x centring (of the shape)

each in [0, 1], so a reward model that learned it can be maximised without breaking the prompt: bigger,
centred shapes. Gold fidelity is whether the shape and the background have the prompted colours, gold
shape accuracy whether the shape is the prompted one; both and the aesthetic are measured on pixels,
which is how reward hacking shows: the learned reward rising while gold falls.
"""

import math
import os
import random
import re
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

# The committed pretrained world (build_demo_world.py writes it): a Stable Diffusion pipeline folder and a
# CLIP folder that also holds the LAION-format aesthetic head.
DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
DEMO_SD = os.path.join(DEMO_DIR, "sd")
DEMO_CLIP = os.path.join(DEMO_DIR, "clip")

# The settings the demo presets of train.py, generate.py, anneal.py and metrics.py share: the sampler the
# world is trained with, and the held-out prompts and seeds it is evaluated on, each defined once here.
SAMPLING = dict(inference_steps=20, guidance_scale=5.0)
EVALUATION = dict(model=DEMO_SD, seed=1000, batch_size=24, **SAMPLING)  # the seeds differ from training's (0)
EVAL_PROMPTS = "demo_eval"
EVAL_IMAGES = 4  # per prompt
AESTHETIC_SOURCE = [f"aesthetic={DEMO_CLIP}"]

IMAGE_SIZE = 32
SUPERSAMPLING = 4  # drawn 4x larger and box-filtered down, so edges are anti-aliased as in photos

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 40),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
# Half the shape's extent in pixels of a 32x32 image; an unsized caption draws from both ranges.
SIZE_RADII = {"small": (3.5, 6.0), "large": (7.5, 10.0)}
POSITIONS = {  # phrase -> which third of the free range the centre falls in, along x and along y
    "in the center": (1, 1),
    "at the left": (0, 1),
    "at the right": (2, 1),
    "at the top": (1, 0),
    "at the bottom": (1, 2),
}
FULL_SIZE_AREA = 0.36  # a shape covering this fraction of the image (or more) has size score 1

CAPTION = re.compile(
    rf"a (?:(?P<size>{'|'.join(SIZE_RADII)}) )?(?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)})"
    rf"(?: (?P<position>{'|'.join(POSITIONS)}))? on a (?P<background>{'|'.join(COLOURS)}) background"
)


@dataclass(frozen=True)
class Caption:
    colour: str
    shape: str
    background: str
    size: str | None = None
    position: str | None = None

    def text(self) -> str:
        size = f"{self.size} " if self.size else ""
        position = f" {self.position}" if self.position else ""
        return f"a {size}{self.colour} {self.shape}{position} on a {self.background} background"


@dataclass(frozen=True)
class Scene:
    caption: Caption
    radius: float  # pixels of the 32x32 image
    centre: tuple[float, float]  # (x, y) pixels


def parse_caption(text: str) -> Caption:
    """The caption's attributes; ValueError if the text is not of the grammar."""
    match = CAPTION.fullmatch(" ".join(text.lower().split()))
    if match is None:
        raise ValueError(f"{text!r} is not a demo-world caption, e.g. {Caption('red', 'circle', 'blue').text()!r}")
    return Caption(**match.groupdict())


def vocabulary() -> list[str]:
    """Every word of the grammar, for a tokenizer with one token per word."""
    phrases = ["a on background", *SIZE_RADII, *COLOURS, *SHAPES, *POSITIONS]
    return sorted({word for phrase in phrases for word in phrase.split()})


def base_captions() -> list[Caption]:
    """Every colour/shape/background caption with size and position left open (90 of them)."""
    return [Caption(colour, shape, background) for colour in COLOURS for shape in SHAPES
            for background in COLOURS if background != colour]


def random_caption(rng: random.Random, mention_probability: float = 0.5) -> Caption:
    """A caption of the grammar; size and position are each named with `mention_probability`."""
    colour, background = rng.sample(list(COLOURS), 2)
    size = rng.choice(list(SIZE_RADII)) if rng.random() < mention_probability else None
    position = rng.choice(list(POSITIONS)) if rng.random() < mention_probability else None
    return Caption(colour, rng.choice(SHAPES), background, size, position)


def scene_for(caption: Caption, rng: random.Random) -> Scene:
    """A scene the caption describes, drawing what it leaves open uniformly."""
    low, high = SIZE_RADII[caption.size] if caption.size else (SIZE_RADII["small"][0], SIZE_RADII["large"][1])
    radius = rng.uniform(low, high)
    first, last = radius + 1, IMAGE_SIZE - 1 - radius  # the shape stays off the border, where the background is read
    third = (last - first) / 3

    def coordinate(which_third: int | None) -> float:
        if which_third is None:
            return rng.uniform(first, last)
        return rng.uniform(first + which_third * third, first + (which_third + 1) * third)

    thirds = POSITIONS[caption.position] if caption.position else (None, None)
    return Scene(caption, radius, (coordinate(thirds[0]), coordinate(thirds[1])))


def render(scene: Scene) -> Image.Image:
    """The scene as a 32x32 RGB image."""
    side = IMAGE_SIZE * SUPERSAMPLING
    image = Image.new("RGB", (side, side), COLOURS[scene.caption.background])
    draw = ImageDraw.Draw(image)
    x, y = (c * SUPERSAMPLING for c in scene.centre)
    r = scene.radius * SUPERSAMPLING
    fill = COLOURS[scene.caption.colour]
    if scene.caption.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif scene.caption.shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> float [B,3,H,W] in [0,1], the layout the rewards and the gold evaluator take."""
    arrays = [torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8) for image in images]
    side = images[0].size[0]
    return torch.stack(arrays).view(len(images), side, side, 3).permute(0, 3, 1, 2).float() / 255


# ---------------------------------------------------------------------------------------------
# Gold evaluator: the scene read back from pixels, for a whole batch at once


@dataclass(frozen=True)
class Readings:
    """What each image of a batch shows; every field has the batch as its first dimension."""

    background: torch.Tensor  # [B, 3] RGB in [0,1]
    shape_colour: torch.Tensor  # [B, 3] RGB in [0,1]
    has_shape: torch.Tensor  # [B] bool: something stands out from the background
    area: torch.Tensor  # [B] fraction of the image the shape covers
    fill: torch.Tensor  # [B] shape area / its bounding box area: 1 square, pi/4 circle, 1/2 triangle
    centre_offset: torch.Tensor  # [B] distance of the shape's centroid from the image centre, in image sides


MIN_SHAPE_CONTRAST = 0.2  # RGB distance below which nothing stands out from the background


def read_scenes(images: torch.Tensor) -> Readings:
    """What images [B,3,H,W] in [0,1] show. The background is the median of the border (the shape
    never touches it); the shape is every pixel more than half as far from the background as the
    shape's own colour (the 99th percentile of distances), and its colour is the median of its core."""
    pixels = images.detach().float().cpu().permute(0, 2, 3, 1)
    batch, side = pixels.shape[:2]
    border = torch.cat([pixels[:, 0], pixels[:, -1], pixels[:, 1:-1, 0], pixels[:, 1:-1, -1]], dim=1)
    background = border.median(dim=1).values
    distance = (pixels - background[:, None, None]).norm(dim=-1)
    peak = torch.quantile(distance.flatten(1), 0.99, dim=1)[:, None, None]
    mask = distance > peak / 2
    core = (distance > peak * 0.75)[..., None]
    shape_colour = torch.where(core, pixels, torch.nan).flatten(1, 2).nanmedian(dim=1).values
    area = mask.sum(dim=(1, 2)).float()
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    box = _extent(rows) * _extent(cols)
    coordinates = torch.arange(side, dtype=torch.float32)
    shape_x = (mask.sum(dim=1) * coordinates).sum(dim=1) / area.clamp(min=1)
    shape_y = (mask.sum(dim=2) * coordinates).sum(dim=1) / area.clamp(min=1)
    centre = (side - 1) / 2
    offset = torch.hypot(shape_x - centre, shape_y - centre) / side
    has_shape = peak.flatten() >= MIN_SHAPE_CONTRAST
    return Readings(background, shape_colour, has_shape, area / side**2, area / box.clamp(min=1), offset)


def _extent(occupied: torch.Tensor) -> torch.Tensor:
    """[B, N] bool -> [B] float: last occupied index - first occupied index + 1."""
    size = occupied.shape[1]
    first = occupied.float().argmax(dim=1)
    last = size - 1 - occupied.flip(1).float().argmax(dim=1)
    return (last - first + 1).float()


def nearest_colours(rgb: torch.Tensor) -> list[str]:
    """The palette name nearest to each RGB row [B, 3]."""
    names = list(COLOURS)
    palette = torch.tensor([COLOURS[name] for name in names], dtype=torch.float32) / 255
    return [names[i] for i in torch.cdist(rgb.float(), palette).argmin(dim=1).tolist()]


def shapes_of(readings: Readings) -> list[str | None]:
    """By how much of its bounding box the shape fills: the cuts lie halfway between the ideals."""
    triangle_cut, square_cut = (0.5 + math.pi / 4) / 2, (math.pi / 4 + 1) / 2
    return [None if not present else "triangle" if fill < triangle_cut else "circle" if fill < square_cut else "square"
            for present, fill in zip(readings.has_shape.tolist(), readings.fill.tolist())]


def gold_fidelity(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Per image 1 if the shape and the background have the prompted colours, else 0."""
    readings = read_scenes(images)
    shape_colours, backgrounds = nearest_colours(readings.shape_colour), nearest_colours(readings.background)
    captions = [parse_caption(prompt) for prompt in prompts]
    return torch.tensor([float(present and colour == caption.colour and background == caption.background)
                         for present, colour, background, caption
                         in zip(readings.has_shape.tolist(), shape_colours, backgrounds, captions)])


def gold_shape(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Per image 1 if the shape is the prompted one, else 0."""
    captions = [parse_caption(prompt) for prompt in prompts]
    return torch.tensor([float(shape == caption.shape) for shape, caption in zip(shapes_of(read_scenes(images)), captions)])


def gold_aesthetic(images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
    """contrast x size x centring, each in [0, 1]; 0 when no shape stands out. Prompts are ignored."""
    readings = read_scenes(images)
    contrast = (readings.shape_colour - readings.background).norm(dim=1) / math.sqrt(3)
    size = (readings.area / FULL_SIZE_AREA).sqrt().clamp(max=1)
    centring = (1 - 2 * readings.centre_offset).clamp(min=0)
    return torch.where(readings.has_shape, contrast * size * centring, 0.0)
