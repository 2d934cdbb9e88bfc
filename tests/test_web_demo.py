"""The web demo (epalm.cli.web_demo) in a real browser: the app serves a tiny adapter on 127.0.0.1, headless
Chromium (Debian's `chromium` + `chromium-driver`, installed here with apt-get when missing) uploads a held-out
demo digit, types the question, presses the button and reads the answer, which must equal `Predictor.ask` on the
same file with the same decoding. Neither the server nor the page may reach past 127.0.0.1. Also, without a
browser: the page's decoding controls map onto the API's options, and bad input is one `error:` line, exit 2."""

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
from tests.test_eval_run import make_adapter

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
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
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--window-size=1280,1000",
]
# runs the app with every non-local connection or name lookup of the server process written to argv[1]
NETWORK_GUARD = r"""
import sys
log = sys.argv.pop(1)
LOCAL = {"127.0.0.1", "::1", "localhost", None}
def hook(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in LOCAL:
        target = args[1]
    elif event == "socket.getaddrinfo" and (args[0].decode() if isinstance(args[0], bytes) else args[0]) not in LOCAL:
        target = args[0]
    else:
        return
    with open(log, "a") as f:
        print(event, target, file=f)
sys.addaudithook(hook)
from epalm.cli.web_demo import main
sys.exit(main(sys.argv[1:]))
"""


def install_chromium() -> str | None:
    """apt-get Debian's chromium and chromium-driver where they are missing; the reason when that is impossible."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return None
    if not shutil.which("apt-get"):
        return "no apt-get on this machine to install chromium and chromium-driver"
    if os.geteuid() != 0:
        return "apt-get needs root to install chromium and chromium-driver"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium", "chromium-driver"]
    for cmd in (["apt-get", "update", "-qq"], install):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` took over 15 minutes"
        if r.returncode != 0:
            return f"`{' '.join(cmd)}` failed ({r.returncode}): {' '.join(r.stderr.split())[-300:]}"
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    return f"apt-get installed chromium but {missing} are missing" if missing else None


@pytest.fixture(scope="session")
def chromium() -> tuple[Path, Path]:
    problem = install_chromium()
    if problem:
        pytest.skip(f"no headless Chromium: {problem}")
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
    assert decoding_options("greedy", seed=3, **controls) == {
        "max_new_tokens": 7,
        "do_sample": False,
        "num_beams": 1,
    }
    assert decoding_options("beam", seed=3, **controls) == {
        "max_new_tokens": 7,
        "do_sample": False,
        "num_beams": 4,
    }
    sampled = decoding_options("sampling", seed=3, **controls)
    assert sampled == {
        "max_new_tokens": 7,
        "do_sample": True,
        "num_beams": 1,
        "temperature": 0.7,
        "top_k": 5,
        "top_p": 0.9,
        "seed": 3,
    }
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


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the web demo exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with opener.open(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the web demo did not answer on {url} in {timeout} s:\n{log.read_text()[-3000:]}")


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
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    reached = network_log.read_text() if network_log.exists() else ""
    assert not reached, f"the web demo's server reached past 127.0.0.1:\n{reached}"
