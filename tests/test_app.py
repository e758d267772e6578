"""The Gradio demo page (groupvq_hf.app.page): the model side in Python, the page in headless Chromium (Playwright)."""

import copy
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from unittest import mock

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no network calls

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from groupvq_hf import GroupVQImageProcessor, GroupVQModel  # noqa: E402
from groupvq_hf.app.page import (  # noqa: E402
    MAKE_MODEL_COMMAND, MAX_ASPECT_RATIO, MIN_IMAGE_SIZE, DemoTokenizer, build_demo, load_model, main, off_origin,
    open_image,
)
from groupvq_hf.data import demo_images  # noqa: E402
from groupvq_hf.evaluation.metrics import ReconstructionMetrics  # noqa: E402

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def api_result(model, image, size=None, mode="extend", seed=0, processor=None):
    """Indices and PSNR through the public API only, for comparison with what the page shows."""
    processor = processor or model.default_image_processor()
    if size is not None:
        model = copy.deepcopy(model)
        model.resize_codebook(size, mode=mode, seed=seed)
    pixels = processor(image, return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model(pixels)
    psnr = ReconstructionMetrics(metrics=["psnr"]).compute(
        predictions=out.reconstruction.clamp(-1, 1), references=pixels
    )["psnr"]
    return out.indices[0].numpy(), psnr


def _components(blocks) -> dict:
    """The page's components' properties by elem_id (or id)."""
    return {c["props"].get("elem_id") or c["id"]: c["props"] for c in blocks.config["components"]}


# ------------------------------------------------------------------------------------------------ Python side
def test_resized_copies_are_cached_and_leave_the_loaded_model_unchanged(tiny_model):
    image = demo_images()[1]
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    tokenizer = DemoTokenizer(tiny_model)
    n = tiny_model.config.codebook_size
    assert tokenizer.size_range() == (n // 4, 4 * n, 8)  # 8 groups of 32: sizes are multiples of 8

    result = tokenizer.tokenize(image, 2 * n, "extend", seed=0)
    indices, psnr = api_result(tiny_model, image, 2 * n, "extend", 0)
    np.testing.assert_array_equal(result.indices, indices)
    assert result.codebook_size == 2 * n and abs(result.psnr - psnr) < 1e-3
    assert result.distinct_codes == len(np.unique(indices)) and result.groups_used == len(np.unique(indices // 64))
    assert result.token_map.size == indices.shape[::-1] and result.reconstruction.size == (64, 64)
    # The token map: one color per code (the same code, the same color; here no two codes share one).
    colors = np.asarray(result.token_map).reshape(-1, 3)
    pairs = {(code, tuple(color)) for code, color in zip(indices.reshape(-1).tolist(), colors.tolist())}
    assert len(pairs) == len(np.unique(indices)) == len({color for _, color in pairs})
    # The same image again at n: its encoder output is reused, the result is still model.encode's.
    np.testing.assert_array_equal(tokenizer.tokenize(image).indices, api_result(tiny_model, image)[0])
    assert tokenizer.resized(2 * n, "extend", 0) is tokenizer.resized(2 * n, "extend", 0)  # cached
    assert tokenizer.resized(2 * n, "extend", 1) is not tokenizer.resized(2 * n, "extend", 0)
    assert tokenizer.resized(n, "extend", 0) is tiny_model  # extending by nothing is the model itself
    # The loaded model is untouched: same size, same config, same tensors.
    assert tiny_model.quantizer.codebook_size == n and tiny_model.config.codebook_size == n
    assert tiny_model.config.trained_group_sizes is None
    after = tiny_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert tiny_model.quantizer.usage_counts().sum() == 0  # serving tokens does not count usage (eval mode)
    # A resized copy shares the encoder and decoder, not the quantizer.
    copied = tokenizer.resized(n // 2, "resample", 3)
    assert copied.encoder is tiny_model.encoder and copied.quantizer is not tiny_model.quantizer
    assert copied.quantizer.codebook_size == n // 2

    with pytest.raises(ValueError, match="valid sizes are positive multiples of 8"):
        tokenizer.resized(n + 4, "extend", 0)
    with pytest.raises(ValueError, match="no group may shrink"):
        tokenizer.resized(n // 2, "extend", 0)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        tokenizer.resized(n, "grow", 0)


def test_open_image_gives_messages_for_bad_files(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("1", (8000, 6000)).save(tmp_path / "huge.png")  # 48 megapixels, a few KB on disk
    Image.new("LA", (20, 12)).save(tmp_path / "gray_alpha.png")
    with pytest.raises(ValueError, match="`notes.png` is not an image"):
        open_image(tmp_path / "notes.png")
    with pytest.raises(ValueError, match=f"`dot.png` is 1x1; the demo needs at least {MIN_IMAGE_SIZE} pixels"):
        open_image(tmp_path / "dot.png")
    with pytest.raises(ValueError, match="`huge.png` is 8000x6000 .48 megapixels.; the demo takes images up to 40"):
        open_image(tmp_path / "huge.png")
    image = open_image(tmp_path / "gray_alpha.png")
    assert image.mode == "RGB" and image.size == (20, 12)
    from PIL import EpsImagePlugin

    ghostscript_runs = []
    Image.new("RGB", (32, 32)).save(tmp_path / "postscript.png", "EPS")  # gradio checks only the extension
    with mock.patch.object(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: ghostscript_runs.append(args)):
        with pytest.raises(ValueError, match="`postscript.png` is not an image .*upload a PNG, JPEG, WEBP, BMP, GIF or TIFF"):
            open_image(tmp_path / "postscript.png")
    assert ghostscript_runs == []


# An upload's peak memory above the page's steady state (the thin image below; README's demo section states it).
UPLOAD_MEMORY_BOUND_MB = 200


def test_a_thin_image_is_cut_to_what_the_crop_keeps_and_its_memory_is_bounded(tmp_path):
    """An 8 x 4,900,000 RGB PNG (under the megapixel cap) through the page's own functions (`open_image`, then
    `DemoTokenizer.tokenize`): its long side is cut to `MAX_ASPECT_RATIO` times the short one before the processor's
    shorter-side resize would stretch it, and the peak memory of the request (ru_maxrss of a fresh process, above
    its level after a first image) stays under `UPLOAD_MEMORY_BOUND_MB`."""
    Image.new("RGB", (8, 4_900_000), (128, 64, 32)).save(tmp_path / "thin.png")
    driver = os.path.join(REPO_ROOT, "tests", "drivers", "app_thin_image.py")
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO_ROOT, "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, driver, str(tmp_path / "thin.png")], env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    assert measured["size"] == [8, 8 * MAX_ASPECT_RATIO] and measured["same_tokens"]  # the usual token grid
    assert measured["peak_mb"] < UPLOAD_MEMORY_BOUND_MB, measured


def test_a_request_inside_the_model_does_not_hold_up_another(tiny_model):
    """One request is held inside its encoder; a second request for another image is answered meanwhile (the page's
    lock covers only its caches, not the model)."""
    import threading

    tokenizer = DemoTokenizer(tiny_model)
    entered, release = threading.Event(), threading.Event()
    real_encode = tiny_model.encode

    def held_encode(pixels, *args, **kwargs):
        if threading.current_thread().name == "held":
            entered.set()
            release.wait(60)  # before the lock was narrowed, the second request waited for this
        return real_encode(pixels, *args, **kwargs)

    tiny_model.encode = held_encode
    held = threading.Thread(target=tokenizer.tokenize, args=(demo_images()[1],), name="held")
    held.start()
    try:
        assert entered.wait(120)
        result = tokenizer.tokenize(demo_images()[2])
        assert held.is_alive()  # answered while the first request is still inside its encoder
        np.testing.assert_array_equal(result.indices, api_result(tiny_model, demo_images()[2])[0])
    finally:
        release.set()
        held.join()
        del tiny_model.encode


def test_bounded_image_keeps_the_center_that_the_crop_keeps():
    from groupvq_hf.app.page import bounded_image

    wide = Image.fromarray(np.arange(10 * 100, dtype=np.uint8).reshape(10, 100) % 251)
    cut = bounded_image(wide)
    assert cut.size == (10 * MAX_ASPECT_RATIO, 10)
    np.testing.assert_array_equal(np.asarray(cut), np.asarray(wide)[:, 30:70])
    tall = wide.transpose(Image.Transpose.TRANSPOSE)
    assert bounded_image(tall).size == (10, 10 * MAX_ASPECT_RATIO)
    normal = Image.new("RGB", (40, 11))
    assert bounded_image(normal) is normal  # within the ratio: untouched, so the page shows what the API gives


def test_without_a_model_the_page_says_how_to_make_one(tmp_path, monkeypatch):
    import gradio

    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        assert MAKE_MODEL_COMMAND in f.read()  # the page shows the README's first command, word for word
    monkeypatch.chdir(tmp_path)  # no outputs/demo/model here
    launched = {}
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs, blocks=self))
    main(["--port", "7999"])
    page = str(_components(launched["blocks"])["missing-model"]["value"])
    assert "`outputs/demo/model` does not exist yet" in page and MAKE_MODEL_COMMAND in page
    assert launched["server_port"] == 7999 and launched["server_name"] == "127.0.0.1"

    # The script itself (it must not let scripts/evaluate.py shadow the `evaluate` library).
    script = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "demo.py"), "--help"],
                            capture_output=True, text=True, timeout=300)
    assert script.returncode == 0 and "--screenshot" in script.stdout, script.stderr

    missing = tmp_path / "nowhere"
    blocks = build_demo(str(missing))
    page = str(_components(blocks)["missing-model"]["value"])
    assert f"`{missing}` could not be loaded" in page and MAKE_MODEL_COMMAND in page


def _requirement_names(lines) -> set:
    return {re.split(r"[<>=!~ \[;]", line.strip())[0].lower().replace("_", "-") for line in lines
            if line.strip() and line.strip()[0] not in "#-"}


def test_remote_code_model_serves_the_same_tokens(saved_model):
    # Through AutoModel / AutoImageProcessor (in this process transformers resolves them to the registered
    # groupvq_hf classes; tests/test_remote_code.py covers loading where groupvq_hf is not installed).
    model, processor = load_model(str(saved_model), trust_remote_code=True)
    library = DemoTokenizer(*load_model(str(saved_model)))
    image = demo_images()[2]
    for size, mode in ((None, "extend"), (512, "extend"), (128, "resample")):
        remote, local = DemoTokenizer(model, processor).tokenize(image, size, mode, 5), library.tokenize(image, size, mode, 5)
        np.testing.assert_array_equal(remote.indices, local.indices)
        assert remote.codebook_size == local.codebook_size and remote.psnr == pytest.approx(local.psnr, abs=1e-4)


def test_space_folder_is_a_gradio_space(saved_model, monkeypatch):
    import runpy
    import tomllib

    from huggingface_hub import SpaceCard

    folder = os.path.join(REPO_ROOT, "spaces", "groupvq-demo")
    card = SpaceCard.load(os.path.join(folder, "README.md"))
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert os.path.isfile(os.path.join(folder, card.data.app_file))
    with open(os.path.join(folder, "requirements.txt")) as f:
        requirements = _requirement_names(f)
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    # The Space installs what the package needs (it is copied beside app.py, not pip-installed) and gradio.
    assert _requirement_names(project["dependencies"]) | {"gradio"} <= requirements
    assert "gradio" in _requirement_names(project["optional-dependencies"]["demo"])
    # The Space's app builds the page for the model named by GROUPVQ_MODEL (launching only as __main__).
    monkeypatch.setenv("GROUPVQ_MODEL", str(saved_model))
    components = _components(runpy.run_path(os.path.join(folder, "app.py"))["demo"])
    assert components["size"]["value"] == 256 and components["size"]["maximum"] == 1024
    assert "missing-model" not in components


# ------------------------------------------------------------------------------------------------ in the browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium() -> str:
    path = os.environ.get("GROUPVQ_CHROMIUM") or next((p for p in CHROMIUM_CANDIDATES if os.path.exists(p)), None)
    path = path or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(
            "The browser test needs Chromium, and none was found (looked for "
            f"{', '.join(CHROMIUM_CANDIDATES)} and `chromium` on PATH): install it with `apt-get install -y chromium` "
            "(.ci/run does this) or point GROUPVQ_CHROMIUM at a Chromium binary."
        )
    return path


def test_demo_page_in_chromium(saved_model, tmp_path):
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail('The browser test needs Playwright: pip install -e ".[dev,demo]" (scripts/setup.sh does this).')
    executable = _chromium()
    model = GroupVQModel.from_pretrained(saved_model).eval()
    processor = GroupVQImageProcessor.from_pretrained(saved_model)
    n = model.config.codebook_size
    photo = demo_images()[1].resize((150, 100))  # "chelsea", uploaded as a file
    photo.save(tmp_path / "chelsea.png")
    (tmp_path / "notes.png").write_text("not a picture")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("1", (8000, 6000)).save(tmp_path / "huge.png")

    demo = build_demo(str(saved_model))
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            blocked = []  # requests leaving the page's server (e.g. the theme's web fonts): tests stay offline
            page.route(off_origin(url), lambda route: (blocked.append(route.request.url), route.abort()))
            page.set_default_timeout(90_000)
            expect.set_options(timeout=90_000)  # a shared 2-core machine: generous, never a timed assertion
            page.goto(url)
            status, stats, codebook = page.locator("#status"), page.locator("#stats"), page.locator("#codebook")
            expect(status).to_contain_text("Encoded astronaut")  # the first built-in photo, on load

            def upload(path):
                page.locator("#upload input[type=file]").set_input_files(str(path))

            def shown_image(elem_id) -> tuple[str, np.ndarray]:
                src = page.locator(f"#{elem_id} img").get_attribute("src")
                return src, np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))

            def download(elem_id, path):
                with page.expect_download() as info:
                    page.locator(f"#{elem_id}").click()
                info.value.save_as(path)
                return path

            # Upload a photo: crop, reconstruction, token map, figures, downloads.
            upload(tmp_path / "chelsea.png")
            expect(status).to_contain_text("Encoded chelsea")
            indices, psnr = api_result(model, photo, processor=processor)
            shown_psnr = float(re.search(r"PSNR: ([\d.]+) dB", stats.inner_text()).group(1))
            assert abs(shown_psnr - psnr) < 1.0
            _, reconstruction = shown_image("reconstruction")
            assert reconstruction.shape[0] >= 256 and reconstruction.std() > 1.0  # shown, and not a blank image
            tokens_src, tokens = shown_image("tokens")
            np.testing.assert_array_equal(np.load(download("download-indices", tmp_path / "n.npy")), indices)
            png = np.asarray(Image.open(download("download-png", tmp_path / "n.png")))
            assert png.shape == (64, 64, 3) and np.abs(png.astype(float) - reconstruction[::4, ::4]).max() == 0

            # Codebook resize to 2n, mode extend: every output follows (Algorithm 2).
            page.locator("#size input[type=number]").fill(str(2 * n))
            page.locator("#size input[type=number]").press("Enter")
            expect(codebook).to_contain_text(f"chosen: {2 * n:,} codes (2n), extend, seed 0")
            expect(stats).to_contain_text(f"codebook: {2 * n:,} codes")
            expect(page.locator("#tokens img")).not_to_have_attribute("src", tokens_src)
            assert not np.array_equal(shown_image("tokens")[1], tokens)
            indices_2n, _ = api_result(model, photo, 2 * n, "extend", 0, processor)
            np.testing.assert_array_equal(np.load(download("download-indices", tmp_path / "2n.npy")), indices_2n)
            page.screenshot(path=str(tmp_path / "demo_page.png"), full_page=True)
            assert os.path.getsize(tmp_path / "demo_page.png") > 0

            # Bad inputs: a message in the page, and the page keeps serving.
            for bad, message in (("notes.png", "notes.png is not an image"), ("dot.png", "dot.png is 1x1"),
                                 ("huge.png", "huge.png is 8000x6000")):
                upload(tmp_path / bad)
                expect(status).to_contain_text(message)
            upload(tmp_path / "chelsea.png")
            expect(status).to_contain_text("Encoded chelsea")
            expect(stats).to_contain_text(f"codebook: {2 * n:,} codes")
            np.testing.assert_array_equal(np.load(download("download-indices", tmp_path / "again.npy")), indices_2n)
            # A built-in photo from the list, at the chosen codebook.
            page.locator("#photo input").click()
            page.get_by_role("option", name="coffee").click()
            expect(status).to_contain_text("Encoded coffee")
            coffee = demo_images()[2]
            np.testing.assert_array_equal(np.load(download("download-indices", tmp_path / "coffee.npy")),
                                          api_result(model, coffee, 2 * n, "extend", 0, processor)[0])
            browser.close()
    finally:
        demo.close()
