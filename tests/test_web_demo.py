"""The web demo in a real browser: headless Chromium (Debian's, apt-installed when missing) uploads a held-out
demo digit to the app on 127.0.0.1, types the question, presses the button and reads an answer that must equal
`Predictor.ask`'s; neither server nor page may reach past 127.0.0.1. Video and audio pages, through gradio's own
client; the decoding controls and the bad-input contract (one `error:` line, exit 2) without a server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from epalm.distributed import free_port
from testing.support import cpu_child_env
from tests.test_eval_run import make_adapter, tiny_encoder

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
APT_PACKAGES = ["chromium", "chromium-driver"]
QUESTION = "what digit is this?"
# without the background-networking flags Chromium keeps calling Google's services, which floods a closed network;
# the resolver rule leaves it nothing but 127.0.0.1 to reach
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
# runs the app with every non-local connection or name lookup of the server process written to argv[1]
NETWORK_GUARD = r"""
import sys
log = sys.argv.pop(1)
LOCAL = {"127.0.0.1", "::1", "localhost", None}
def hook(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple) or event == "socket.getaddrinfo":
        target = args[1][0] if event == "socket.connect" else args[0]
        if (target.decode() if isinstance(target, bytes) else target) not in LOCAL:
            with open(log, "a") as f:
                print(event, target, file=f)
sys.addaudithook(hook)
from epalm.cli.web_demo import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="session")
def chromium() -> tuple[Path, Path]:
    """Debian's chromium and chromium-driver, apt-installed where missing; a skip that says why if impossible."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("no headless Chromium, and no apt-get as root to install it")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES]
        for cmd in (["apt-get", "update", "-qq"], install):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                pytest.skip(
                    f"no headless Chromium: `{' '.join(cmd)}` failed: {' '.join(r.stderr.split())[-300:]}"
                )
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"no headless Chromium: apt-get installed {APT_PACKAGES}, but {missing} are missing")
    return CHROMIUM, CHROMEDRIVER


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("webdemo"))


@pytest.fixture(scope="module")
def digit(tmp_path_factory) -> Path:
    """A held-out digit of the demo (its test split), written as the demo writes it."""
    from sklearn.datasets import load_digits

    from data_shards.demo import split_ids, write_digit_image

    digits = load_digits()
    index = split_ids(len(digits.target), num_heldout=180)["test"][0]
    path = tmp_path_factory.mktemp("digit") / "held_out_digit.jpg"
    write_digit_image(path, digits.images[index], 32)
    return path


def test_decoding_controls_map_onto_the_api_options():
    from epalm.cli.web_demo import decoding_options

    controls = dict(num_beams=4, max_new_tokens=7, temperature=0.7, top_k=5, top_p=0.9)
    search = {"max_new_tokens": 7, "do_sample": False}
    assert decoding_options("greedy", seed=3, **controls) == search | {"num_beams": 1}
    assert decoding_options("beam", seed=3, **controls) == search | {"num_beams": 4}
    sampling = {"do_sample": True, "num_beams": 1, "temperature": 0.7, "top_k": 5, "top_p": 0.9}
    assert decoding_options("sampling", seed=3, **controls) == {"max_new_tokens": 7, **sampling, "seed": 3}
    assert "seed" not in decoding_options("sampling", seed=None, **controls)  # an empty seed box: unseeded
    with pytest.raises(ValueError, match="decoding must be one of"):
        decoding_options("nucleus", seed=None, **controls)


def test_the_button_answers_as_the_api_and_explains_bad_input(adapter, digit):
    from epalm.api import Predictor
    from epalm.cli.web_demo import respond

    p = Predictor.load(adapter, device="cpu")
    beam = ("beam", 2, 4, 1.0, 50, 1.0, 0)
    assert respond(p, str(digit), f"  {QUESTION} ", *beam) == p.ask(digit, QUESTION, num_beams=2)
    assert respond(p, str(digit), "", *beam) == p.caption(digit, num_beams=2)  # no question: a caption
    with pytest.raises(ValueError, match="upload an image first"):
        respond(p, None, QUESTION, *beam)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        respond(p, str(digit), QUESTION, "sampling", 1, 4, 0.0, 50, 1.0, 0)
    broken = digit.with_name("broken.jpg")
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot read this image"):
        respond(p, str(broken), QUESTION, *beam)


def test_bad_input_is_one_error_line_and_exit_2(adapter, tmp_path, capsys):
    import socket

    from epalm.cli.web_demo import main

    assert main(["--adapter", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --adapter") and "missing" in err[0]
    assert main(["--adapter", str(tmp_path), "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "error: --port must be in 1..65535, got 70000"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--adapter", str(adapter), "--port", str(port), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot serve on 127.0.0.1:{port}: the port is taken (pick another with --port)"


def _video_or_audio(kind: str, root: Path) -> tuple[Path, Path]:
    """A tiny random TimeSformer or AST adapter and one of the demo's clips for it."""
    import numpy as np

    from data_shards.demo import shape_clip, tone
    from data_shards.demo_media import write_video, write_wav

    rng = np.random.default_rng(0)
    if kind == "video":
        data, clip = {"num_frames": 4}, root / "clip.mp4"
        write_video(clip, shape_clip("left", rng))
    else:
        data, clip = {}, root / "tone.wav"
        write_wav(clip, tone("high", rng))
    encoder = tiny_encoder(kind)
    adapter = make_adapter(root, encoder, modality=kind, **data)
    return adapter, clip


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["video", "audio"])
def test_video_and_audio_uploads_answer_as_the_api(kind, tmp_path, monkeypatch):
    """The page's endpoint over HTTP, with gradio's own client: an uploaded clip is answered as the API answers it."""
    from gradio_client import Client, handle_file

    from epalm.api import Predictor
    from epalm.cli.web_demo import IDS, build_app, launch

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    adapter, clip = _video_or_audio(kind, tmp_path)
    p = Predictor.load(adapter, device="cpu")
    app = build_app(p)
    media = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == IDS["media"])
    assert type(media).__name__ == kind.capitalize() and p.modality == kind
    url = launch(app, port=free_port())
    assert url.startswith("http://127.0.0.1:")
    try:
        client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
        upload, beam = handle_file(str(clip)), ["beam", 2, 4, 1.0, 50, 1.0, 0]
        assert client.predict(upload, "what is it?", *beam, api_name="/answer") == p.ask(clip, "what is it?")
        caption = client.predict(upload, "", "greedy", *beam[1:], api_name="/answer")
        assert caption == p.caption(clip, num_beams=1)
    finally:
        app.close()


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with opener.open(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the web demo (exit code {proc.poll()}) did not answer on {url}:\n{log.read_text()[-3000:]}")


def _listening_on(port: int) -> set[str]:
    """The IPv4 addresses a socket listens on at `port`, from the kernel's table (/proc/net/tcp)."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.split(":")
        if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN; the address is little-endian hex
            addresses.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return addresses


def _ask_in_browser(driver, url: str, image: Path, question: str, mode: str | None = None) -> str:
    """Load the page, upload `image`, pick `mode`, type `question`, press the button; the answer on the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, 60)
    upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#media input[type=file]")))
    upload.send_keys(str(image))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#media img")))  # the upload's preview
    if mode is not None:
        driver.find_element(By.CSS_SELECTOR, f"#decoding input[value='{mode}']").click()
    driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
    driver.find_element(By.ID, "run").click()
    answer = driver.find_element(By.CSS_SELECTOR, "#answer textarea")
    wait.until(lambda _: answer.get_attribute("value"))
    return answer.get_attribute("value")


@pytest.mark.slow
@pytest.mark.timeout(600)  # a first run installs Chromium with apt-get
def test_browser_answer_equals_the_api(chromium, adapter, digit, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from epalm.api import Predictor

    p = Predictor.load(adapter, device="cpu")
    expected = {
        "beam": p.ask(digit, QUESTION),  # the page's defaults are the adapter's eval settings: 2 beams
        "sampling": p.ask(digit, QUESTION, do_sample=True, seed=p.cfg.eval.seed),
    }
    assert all(expected.values()), f"the tiny adapter answers nothing to compare: {expected}"

    port, network_log, server_log = free_port(), tmp_path / "server_network.txt", tmp_path / "server.log"
    env = cpu_child_env(GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "GRADIO_ANALYTICS_ENABLED"):
        env.pop(name, None)  # the app alone must keep to this machine, with no help from these
    cmd = [sys.executable, "-c", NETWORK_GUARD, str(network_log), "--adapter", str(adapter)]
    with server_log.open("w") as out:
        server = subprocess.Popen(
            [*cmd, "--port", str(port), "--device", "cpu"], env=env, cwd=tmp_path, stdout=out, stderr=out
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium[0])
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for_server(url, server, server_log)
        assert _listening_on(port) == {"127.0.0.1"}  # the default binds this machine only
        os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager's usage statistics
        driver = webdriver.Chrome(options=options, service=Service(str(chromium[1])))
        answers = {"beam": _ask_in_browser(driver, url, digit, QUESTION)}
        screenshot = tmp_path / "web_demo.png"
        driver.save_screenshot(str(screenshot))
        print(f"screenshot: {screenshot}")
        answers["sampling"] = _ask_in_browser(driver, url, digit, QUESTION, mode="sampling")
        assert answers == expected

        requests = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
        urls = {m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"}
        urls |= {m["params"]["url"] for m in requests if m["method"] == "Network.webSocketCreated"}
        # the network's schemes only: chrome:// pages (the start tab) and data:/blob: URLs are the browser's own
        network = {u for u in urls if urlparse(u).scheme in ("http", "https", "ws", "wss")}
        remote = {u for u in network if urlparse(u).hostname != "127.0.0.1"}
        assert network and not remote, f"the page asked for more than 127.0.0.1: {sorted(remote)}"
    finally:
        if driver is not None:
            driver.quit()
        server.kill()  # its state is in tmp_path; nothing to shut down cleanly
        server.wait()
    reached = network_log.read_text() if network_log.exists() else ""
    assert not reached, f"the web demo's server reached past 127.0.0.1:\n{reached}"
