"""Interactive demo page (Gradio): tokens, reconstructions and the live codebook resize (Algorithm 2).

``build_demo(model)`` returns a ``gradio.Blocks`` page: upload an image or pick a built-in photo, see the center
crop, its reconstruction and its token map (the h x w code indices, colored by group) side by side, PSNR / SSIM
and code usage of this image, and download the indices (``.npy``) and the reconstruction (PNG). The codebook
size / mode / seed controls re-encode the image with a resized copy of the model (Algorithm 2): the loaded model is
never changed; resized copies share its encoder and decoder, hold their own quantizer and config, and are cached
per ``(size, mode, seed)``.

Started by ``scripts/demo.py --model PATH_OR_REPO`` and by ``spaces/groupvq-demo/app.py``. Needs the ``demo``
extra (``pip install -e ".[demo]"``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..data.decoding import MIN_IMAGE_SIZE, open_pil, to_rgb
from ..data.demo import DEMO_PHOTOS, demo_images
from ..evaluation.metrics import DATA_RANGE, to_unit_images
from ..image_processing_groupvq import to_uint8
from ..quantizer import RESIZE_MODES, split_codebook_size

# The README demo run's output folder: the page's model when none is given.
DEFAULT_MODEL_DIR = "outputs/demo/model"
# The README's first command, shown in the page when there is no model to load.
MAKE_MODEL_COMMAND = """bash scripts/setup.sh && .venv/bin/accelerate launch --config_file configs/accelerate/cpu.yaml \\
  --num_cpu_threads_per_process 2 scripts/train.py --output_dir outputs/demo --perceptual_weight 0 \\
  --resolution 64 --train_batch_size 8 --max_train_steps 300 --disc_channels 32 --disc_layers 2 \\
  --dataloader_num_workers 0 --logging_steps 25 --validation_steps 100"""
MAX_IMAGE_PIXELS = 40_000_000  # larger uploads are refused before they are decoded
MAX_ASPECT_RATIO = 4  # a longer side beyond 4x the shorter one is cut to its center before processing (bounded_image)
MAX_CACHED_MODELS = 4  # resized quantizer copies kept (LRU)
MAX_CACHED_IMAGES = 16  # encoder outputs kept (LRU), so a codebook change re-runs only quantizer and decoder
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # what an upload is opened as (PIL's names); never EPS
DEMO_PREFIX = "demo:"
DISPLAY_SIDE = 256  # crops, reconstructions and token maps are shown enlarged to at least this many pixels


@dataclass
class Tokenized:
    """Everything the page shows for one image and one codebook."""

    crop: Image.Image
    reconstruction: Image.Image
    token_map: Image.Image
    indices: np.ndarray  # (h, w) int64
    psnr: float
    ssim: float
    distinct_codes: int
    groups_used: int
    codebook_size: int
    num_groups: int


# ------------------------------------------------------------------------------------------------ loading
def load_model(name_or_path: str, trust_remote_code: bool = False):
    """``(model, processor)`` from a local folder or a Hub repo id, in eval mode.

    With ``trust_remote_code`` the model and processor load through ``AutoModel`` / ``AutoImageProcessor`` from the
    code saved beside the weights; otherwise through ``GroupVQModel``. A folder without ``preprocessor_config.json``
    gets ``model.default_image_processor()``.
    """
    if trust_remote_code:
        from transformers import AutoImageProcessor, AutoModel

        model = AutoModel.from_pretrained(name_or_path, trust_remote_code=True)
        load_processor = lambda: AutoImageProcessor.from_pretrained(name_or_path, trust_remote_code=True)  # noqa: E731
    else:
        from ..image_processing_groupvq import GroupVQImageProcessor
        from ..modeling_groupvq import GroupVQModel

        model = GroupVQModel.from_pretrained(name_or_path)
        load_processor = lambda: GroupVQImageProcessor.from_pretrained(name_or_path)  # noqa: E731
    try:
        processor = load_processor()
    except (OSError, ValueError):
        processor = model.default_image_processor()
    return model.eval(), processor


def open_image(path) -> Image.Image:
    """Open an uploaded file as an RGB image; ValueError with a message for the page when it is not usable."""
    name = os.path.basename(str(path))
    try:
        with open_pil(path, formats=UPLOAD_FORMATS) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(
                    f"`{name}` is {width}x{height} ({width * height / 1e6:.0f} megapixels); "
                    f"the demo takes images up to {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels."
                )
            image.load()
            image = ImageOps.exif_transpose(bounded_image(image))  # cut before any copy of the whole image
    except Image.DecompressionBombError as error:
        raise ValueError(f"`{name}` is too large to decode safely ({error}).") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"`{name}` is not an image the demo can read ({type(error).__name__}): upload a "
                         f"{', '.join(UPLOAD_FORMATS[:-1])} or {UPLOAD_FORMATS[-1]} file.") from None
    if min(image.size) < MIN_IMAGE_SIZE:
        raise ValueError(
            f"`{name}` is {image.size[0]}x{image.size[1]}; the demo needs at least {MIN_IMAGE_SIZE} pixels on each side."
        )
    return to_rgb(image)[0]


def bounded_image(image: Image.Image) -> Image.Image:
    """``image`` with its longer side cut to its center, ``MAX_ASPECT_RATIO`` times the shorter side at most.

    The processor resizes the shorter side to the model's size and center-crops a square: a thin image would have
    its long side stretched by the same factor (an 8 x 4,900,000 PNG: 64 x 39,200,000 pixels) only for the crop to
    keep its center. Cut first, a request's work is bounded by the crop it shows, not by the upload's length; an
    image within the ratio is returned as is (the page then shows exactly what the model's API gives).
    """
    width, height = image.size
    longest = min(width, height) * MAX_ASPECT_RATIO
    if max(width, height) <= longest:
        return image
    if width > height:
        left = (width - longest) // 2
        return image.crop((left, 0, left + longest, height))
    top = (height - longest) // 2
    return image.crop((0, top, width, top + longest))


# ------------------------------------------------------------------------------------------------ drawing
def display_image(image: Image.Image, min_side: int = DISPLAY_SIDE) -> Image.Image:
    """``image`` enlarged by a whole factor (nearest neighbour, every pixel kept as a block) to at least ``min_side``."""
    scale = max(1, math.ceil(min_side / min(image.size)))
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def token_map_image(indices: torch.Tensor, quantizer) -> Image.Image:
    """Draw (h, w) code indices as an RGB image: hue = the code's group, brightness = its place in the group."""
    import matplotlib

    groups = quantizer.group_of(indices)
    offsets = torch.tensor(quantizer.group_offsets[:-1])[groups]
    sizes = torch.tensor(quantizer.group_sizes)[groups]
    place = ((indices - offsets).double() + 0.5) / sizes.double()  # in (0, 1)
    palette = matplotlib.colormaps["tab20"].colors if quantizer.num_groups <= 20 else matplotlib.colormaps["hsv"](
        np.linspace(0, 1, quantizer.num_groups, endpoint=False)
    )[:, :3]
    base = torch.tensor(np.asarray(palette), dtype=torch.float64)[groups % len(palette)]
    rgb = base * (0.35 + 0.65 * place)[..., None]
    return Image.fromarray(to_uint8(rgb.clamp(0, 1)).numpy())


# ------------------------------------------------------------------------------------------------ the model side
class DemoTokenizer:
    """The loaded model, its processor and a small LRU cache of resized codebooks (never changing the model)."""

    def __init__(self, model, processor=None, max_cached: int = MAX_CACHED_MODELS):
        self.model = model.eval()
        self.processor = processor if processor is not None else model.default_image_processor()
        self.max_cached = max_cached
        self._cache: OrderedDict[tuple, object] = OrderedDict()  # (size, mode, seed) -> resized model
        self._latents: OrderedDict[str, torch.Tensor] = OrderedDict()  # image hash -> encoder output
        self._lock = threading.Lock()

    @property
    def trained_size(self) -> int:
        """The loaded model's codebook size n."""
        return self.model.quantizer.codebook_size

    def size_range(self) -> tuple[int, int, int]:
        """``(minimum, maximum, step)`` of the valid sizes between n/4 and 4n (multiples `split_codebook_size` takes)."""
        sizes = self.model.quantizer.group_sizes
        step = sum(sizes) // math.gcd(*sizes)
        n = self.trained_size
        low = max(step, math.ceil(n / 4 / step) * step)
        return low, max(low, 4 * n // step * step), step

    def resized(self, size: int, mode: str = "extend", seed: int = 0):
        """A model whose codebook is resized to ``size`` (Algorithm 2), cached per ``(size, mode, seed)``.

        The copy shares the loaded model's encoder and decoder modules (they are not changed by a resize) and
        deep-copies the rest (quantizer, config), so the loaded model is never touched. Raises ValueError for an
        invalid size or mode.
        """
        if mode not in RESIZE_MODES:
            raise ValueError(f"`mode` must be one of {RESIZE_MODES}, got {mode!r}.")
        size, seed = int(size), int(seed)
        split_codebook_size(size, self.model.quantizer.group_sizes)  # ValueError naming the valid sizes
        if mode == "extend" and size == self.trained_size:
            return self.model  # extending by nothing is the identity
        key = (size, mode, seed)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        shared = {id(module): module for name, module in self.model.named_children() if name != "quantizer"}
        copied = copy.deepcopy(self.model, memo=shared)
        copied.resize_codebook(size, mode=mode, seed=seed)
        self._cache[key] = copied.eval()
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return copied

    def _quantize(self, model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(quantized, indices)`` of ``model.encode(pixels)``; the encoder output is cached per image.

        Every resized copy shares the loaded model's encoder, so a codebook change only re-runs the quantizer
        (Eq. 1) on the cached latents: the same as ``model.encode``, without its most expensive half. The lock is
        held only while the cache is read or written, never while the model runs.
        """
        key = hashlib.sha1(pixels.float().cpu().numpy().tobytes()).hexdigest()
        with self._lock:
            latents = self._latents.get(key)
            if latents is not None:
                self._latents.move_to_end(key)
        if latents is None:
            enc = model.encode(pixels)
            with self._lock:
                self._latents[key] = enc.latents
                while len(self._latents) > MAX_CACHED_IMAGES:
                    self._latents.popitem(last=False)
            return enc.quantized, enc.indices
        quantized, _, (_, _, indices) = model.quantizer(latents)
        return quantized, indices

    def tokenize(self, image: Image.Image, size: int | None = None, mode: str = "extend", seed: int = 0) -> Tokenized:
        """Crop ``image`` with the processor, encode it with the (resized) codebook, decode, measure.

        A thin image is cut to its center first ([`bounded_image`]). The lock serialises only the caches (the
        resized copies and the encoder outputs); the processor, the encoder and the decoder run outside it, so one
        request never holds up the others for longer than a cache look-up or a resize.
        """
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        pixels = self.processor(bounded_image(image), return_tensors="pt").pixel_values.to(self.model.dtype)
        with self._lock:
            model = self.resized(self.trained_size if size is None else size, mode, seed)
        with torch.inference_mode():
            quantized, indices = self._quantize(model, pixels)
            reconstruction = model.decode(quantized).float().clamp(-1, 1)
        pred, ref = to_unit_images(reconstruction, "reconstruction"), to_unit_images(pixels.float(), "pixel_values")
        indices = indices[0].cpu()
        quantizer = model.quantizer
        return Tokenized(
            crop=self.processor.postprocess(pixels)[0],
            reconstruction=self.processor.postprocess(reconstruction)[0],
            token_map=token_map_image(indices, quantizer),
            indices=indices.numpy().astype(np.int64),
            psnr=float(peak_signal_noise_ratio(pred, ref, data_range=DATA_RANGE)),
            ssim=float(structural_similarity_index_measure(pred, ref, data_range=DATA_RANGE)),
            distinct_codes=int(indices.unique().numel()),
            groups_used=int(quantizer.group_of(indices).unique().numel()),
            codebook_size=quantizer.codebook_size,
            num_groups=quantizer.num_groups,
        )


# ------------------------------------------------------------------------------------------------ the page
def _size_label(size: int, n: int) -> str:
    ratio = size / n
    return "n" if ratio == 1 else (f"{ratio:g}n" if ratio >= 1 else f"n/{1 / ratio:g}")


def codebook_text(size: int, n: int, mode: str, seed: int) -> str:
    """The trained size against the chosen one."""
    size, seed = int(size), int(seed)
    line = f"**Trained codebook: {n:,} codes** · chosen: **{size:,} codes ({_size_label(size, n)})**, {mode}, seed {seed}"
    if mode == "extend" and size > n:
        line += f" — the {n:,} trained codes kept, {size - n:,} new codes drawn (Eq. 11)"
    elif mode == "resample":
        line += f" — all {size:,} codes drawn anew (new frozen cores)"
    return line


def stats_text(result: Tokenized) -> str:
    return (
        f"PSNR: {result.psnr:.2f} dB · SSIM: {result.ssim:.4f} · codebook: {result.codebook_size:,} codes · "
        f"distinct codes in this image: {result.distinct_codes} of {result.indices.size} tokens · "
        f"groups used: {result.groups_used} of {result.num_groups}"
    )


def _missing_model_page(gr, reason: str):
    with gr.Blocks(title="Group-VQ tokenizer demo") as demo:
        gr.Markdown(
            "# Group-VQ tokenizer demo\n\n"
            f"**No model to show.** {reason}\n\n"
            "Make one with the README's main job (a few minutes on 2 CPU cores; it writes `outputs/demo/model`):\n\n"
            f"```bash\n{MAKE_MODEL_COMMAND}\n```\n\n"
            "then start the page again: `.venv/bin/python scripts/demo.py` "
            "(or `--model PATH_OR_REPO` for another model).",
            elem_id="missing-model",
        )
    return demo


def build_demo(model=None, processor=None, trust_remote_code: bool = False):
    """The demo page as a ``gradio.Blocks``.

    Args:
        model: a loaded `GroupVQModel` (or a remote-code model with the same API), a local folder or Hub repo id to
            load, or None for `DEFAULT_MODEL_DIR`. When nothing can be loaded the page says why and how to make a
            model (the README's first command) instead of failing.
        processor: the image processor; default: the model folder's, else `model.default_image_processor()`.
        trust_remote_code: load a folder / repo id through `AutoModel` with its saved code.
    """
    import gradio as gr

    if model is None or isinstance(model, (str, os.PathLike)):
        path = str(model or DEFAULT_MODEL_DIR)
        if model is None and not os.path.isdir(path):
            return _missing_model_page(gr, f"No `--model` was given and `{path}` does not exist yet.")
        try:
            model, loaded_processor = load_model(path, trust_remote_code=trust_remote_code)
        except Exception as error:  # any loading failure becomes a message in the page, never a traceback
            return _missing_model_page(gr, f"`{path}` could not be loaded: {type(error).__name__}: {error}")
        processor = processor or loaded_processor
    tokenizer = DemoTokenizer(model, processor)
    n = tokenizer.trained_size
    low, high, step = tokenizer.size_range()
    workdir = Path(tempfile.mkdtemp(prefix="groupvq-demo-"))
    photos = dict(zip(DEMO_PHOTOS, demo_images()))

    def source_image(source):
        if not source:
            raise ValueError("Upload an image or pick a built-in photo.")
        if source.startswith(DEMO_PREFIX):
            return source[len(DEMO_PREFIX):], photos[source[len(DEMO_PREFIX):]]
        return Path(source).stem, open_image(source)

    def render(source, size, mode, seed):
        """All outputs for one image and one codebook choice; bad input gives a message and empty outputs."""
        size, seed = int(size if size is not None else n), int(seed or 0)
        info = codebook_text(size, n, mode, seed)
        try:
            stem, image = source_image(source)
            result = tokenizer.tokenize(image, size, mode, seed)
        except ValueError as error:
            hidden = gr.DownloadButton(value=None, visible=False)
            return None, None, None, "", f"⚠️ {error}", info, hidden, hidden
        out = Path(tempfile.mkdtemp(dir=workdir))
        indices_path, png_path = out / f"{stem}_indices_{size}.npy", out / f"{stem}_reconstruction_{size}.png"
        np.save(indices_path, result.indices)
        result.reconstruction.save(png_path)
        status = f"Encoded `{stem}`: {result.indices.shape[0]}x{result.indices.shape[1]} tokens."
        return (
            display_image(result.crop), display_image(result.reconstruction), display_image(result.token_map),
            stats_text(result), status, info,
            gr.DownloadButton(f"Download token indices (.npy, {size:,}-code codebook)", value=str(indices_path), visible=True),
            gr.DownloadButton("Download reconstruction (PNG)", value=str(png_path), visible=True),
        )

    with gr.Blocks(title="Group-VQ tokenizer demo") as demo:
        gr.Markdown(
            "# Group-VQ tokenizer demo\n"
            f"A Group-VQ model with **{n:,} codes in {model.quantizer.num_groups} groups** "
            f"({model.config.sample_size}x{model.config.sample_size} crops). Upload an image or pick a built-in "
            "photo; change the codebook size to resize the trained codebook without training (Algorithm 2)."
        )
        source = gr.State(DEMO_PREFIX + DEMO_PHOTOS[0])
        with gr.Row():
            upload = gr.File(label="Upload an image", file_types=["image"], type="filepath", height=140, elem_id="upload")
            photo = gr.Dropdown(list(DEMO_PHOTOS), value=DEMO_PHOTOS[0], label="…or a built-in photo", elem_id="photo")
        with gr.Row():
            size = gr.Slider(low, high, value=n, step=step, label=f"Codebook size (n = {n:,} trained; {low:,} … {high:,})",
                             elem_id="size")
            mode = gr.Radio(list(RESIZE_MODES), value="extend", label="Resize mode", elem_id="mode")
            seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="seed")
        info = gr.Markdown(codebook_text(n, n, "extend", 0), elem_id="codebook")
        with gr.Row():
            crop = gr.Image(label="Original (center crop)", type="pil", format="png", interactive=False, elem_id="original")
            reconstruction = gr.Image(label="Reconstruction", type="pil", format="png", interactive=False, elem_id="reconstruction")
            token_map = gr.Image(label="Token map (color = group)", type="pil", format="png", interactive=False, elem_id="tokens")
        stats = gr.Markdown(elem_id="stats")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            indices_button = gr.DownloadButton("Download token indices (.npy)", visible=False, elem_id="download-indices")
            png_button = gr.DownloadButton("Download reconstruction (PNG)", visible=False, elem_id="download-png")

        outputs = [crop, reconstruction, token_map, stats, status, info, indices_button, png_button]
        controls = [size, mode, seed]

        def from_upload(path, *values):
            # The upload box is cleared at once (ready for the next file); the image lives on in `source`.
            if path is None:
                return gr.skip(), gr.skip(), gr.skip(), *[gr.skip()] * len(outputs)
            return str(path), gr.File(value=None), gr.Dropdown(value=None), *render(str(path), *values)

        def from_photo(name, *values):
            if not name:
                return gr.skip(), *[gr.skip()] * len(outputs)
            return DEMO_PREFIX + name, *render(DEMO_PREFIX + name, *values)

        upload.upload(from_upload, [upload, *controls], [source, upload, photo, *outputs])
        photo.input(from_photo, [photo, *controls], [source, *outputs])
        for control in controls:
            control.change(render, [source, *controls], outputs, trigger_mode="always_last")
        demo.load(render, [source, *controls], outputs)
    return demo


# ------------------------------------------------------------------------------------------------ command line
MAX_FILE_SIZE = "50mb"  # uploads above this are refused by gradio before they reach the page's code


def demo_parser():
    import argparse

    parser = argparse.ArgumentParser(description="Serve the Group-VQ demo page (Gradio).")
    parser.add_argument("--model", default=None,
                        help=f"local folder or Hub repo id (default: {DEFAULT_MODEL_DIR}, the README demo's output)")
    parser.add_argument("--trust_remote_code", action="store_true", help="load with AutoModel and the saved code")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to serve others)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--screenshot", default=None, metavar="PNG",
                        help="save a screenshot of the page (headless Chromium via Playwright) and exit")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium binary for --screenshot")
    return parser


def off_origin(url: str) -> re.Pattern:
    """A pattern matching every request URL outside ``url``'s origin (for Playwright's ``page.route``)."""
    parts = urlsplit(url)
    return re.compile(rf"^(?!{re.escape(f'{parts.scheme}://{parts.netloc}')}(/|$))")


def save_screenshot(url: str, path, chromium: str = "/usr/bin/chromium", size: tuple[int, int] = (1280, 900)) -> None:
    """Open the page at ``url`` in headless Chromium (Playwright), wait for the first image's figures, save a PNG."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": size[0], "height": size[1]})
        # Only the page's own server: the theme's web fonts and the like are not fetched (local fonts are used).
        page.route(off_origin(url), lambda route: route.abort())
        page.goto(url)
        if page.locator("#missing-model").count() == 0:
            expect(page.locator("#stats")).to_contain_text("PSNR", timeout=120_000)
        page.screenshot(path=str(path), full_page=True)
        browser.close()


def main(argv=None) -> None:
    """``scripts/demo.py``: build the page and serve it until interrupted (or save a screenshot of it and exit)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = demo_parser().parse_args(argv)
    demo = build_demo(args.model, trust_remote_code=args.trust_remote_code)
    if args.screenshot:
        demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True)
        try:
            save_screenshot(demo.local_url, args.screenshot, chromium=args.chromium)
        finally:
            demo.close()
        print(f"Saved a screenshot of the page to {args.screenshot}")
        return
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_FILE_SIZE)


__all__ = [
    "MAX_FILE_SIZE",
    "DEFAULT_MODEL_DIR", "MAX_ASPECT_RATIO", "DemoTokenizer", "Tokenized", "bounded_image", "build_demo", "demo_parser",
    "display_image", "load_model", "main", "off_origin", "open_image", "save_screenshot", "token_map_image",
]
