"""A web page over the Python API, as the original's Hugging Face demo: upload an image, video or audio clip (the
adapter's modality), type a question or leave it empty for a caption, pick greedy / beam / sampling, read the answer.

    python -m epalm.cli.web_demo --adapter demo_out/runs/digits_vqa/best        # http://127.0.0.1:7860
    python -m epalm.cli.web_demo --adapter org/name[@revision] --port 8080      # an adapter on the Hub

It binds 127.0.0.1: only this machine can open it. To reach it from elsewhere, prefer an SSH tunnel
(`ssh -L 7860:127.0.0.1:7860 HOST`, then open http://127.0.0.1:7860 on your side); or `--host 0.0.0.0` on a
network a firewall closes (anyone who reaches the port can use the model); or `--share`, a public
https://*.gradio.live link through Gradio's share servers (this one reaches the internet, and so does anyone
with the link). As a Hugging Face Space (SDK gradio, which sets GRADIO_SERVER_NAME=0.0.0.0 and reads
`app.py`), whose requirements.txt installs this project and gradio, `app.py` is:

    import sys
    from epalm.cli.web_demo import main
    sys.exit(main(["--adapter", "your-org/your-epalm-adapter"]))

Gradio (https://www.gradio.app) draws the page and serves it; its usage analytics are off, its fonts are the
system's (the default theme fetches Google Fonts): but for a Hub adapter's download and --share, nothing leaves
this machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from epalm.cli.common import HelpFormatter, configure_logging, fail

if TYPE_CHECKING:
    import gradio as gr

    from epalm.api import Predictor

log = logging.getLogger(__name__)

MODES = ("greedy", "beam", "sampling")
# the page's element ids: what a browser test (tests/test_web_demo.py) or a user's script finds
IDS = {
    "media": "media",
    "question": "question",
    "mode": "decoding",
    "num_beams": "num-beams",
    "max_new_tokens": "max-new-tokens",
    "temperature": "temperature",
    "top_k": "top-k",
    "top_p": "top-p",
    "seed": "seed",
    "button": "run",
    "answer": "answer",
}


def decoding_options(
    mode: str,
    num_beams: float,
    max_new_tokens: float,
    temperature: float,
    top_k: float,
    top_p: float,
    seed: float | None,
) -> dict[str, Any]:
    """The page's decoding controls as `Predictor.ask` / `caption` keywords; only `mode`'s own settings count
    (greedy is one beam; sampling draws one sequence, with the seed when one is given)."""
    options: dict[str, Any] = {"max_new_tokens": int(max_new_tokens)}
    if mode == "greedy":
        return options | {"do_sample": False, "num_beams": 1}
    if mode == "beam":
        return options | {"do_sample": False, "num_beams": int(num_beams)}
    if mode == "sampling":
        options |= {"do_sample": True, "num_beams": 1, "temperature": float(temperature)}
        options |= {"top_k": int(top_k), "top_p": float(top_p)}
        return options | ({} if seed is None else {"seed": int(seed)})
    raise ValueError(f"decoding must be one of {MODES}, got {mode!r}")


def respond(predictor: Predictor, media: str | None, question: str | None, *decoding: Any) -> str:
    """One press of the button: the answer to `question` about the uploaded file (a caption when the question is
    empty). ValueError with a message for the page when there is no file, it cannot be read, or a decoding
    setting is out of range."""
    from epalm.data.media import SkipSample

    if not media:
        raise ValueError(f"upload {_article(predictor.modality)} first")
    options = decoding_options(*decoding)
    question = (question or "").strip()
    try:
        if question:
            return predictor.ask(media, question, **options)
        return predictor.caption(media, **options)
    except SkipSample as e:  # a file the media readers cannot decode
        raise ValueError(f"cannot read this {predictor.modality}: {e}") from e


def _article(modality: str) -> str:
    return f"{'an' if modality[0] in 'aeiou' else 'a'} {modality}"


def _gradio() -> Any:
    """gradio, imported with its usage analytics off (it reads the variable once, on import)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import gradio

    return gradio


def _media_input(gr: Any, modality: str) -> Any:
    # the file as uploaded (type="filepath" and no image_mode: gradio passes the upload on unconverted), so the
    # model reads the bytes `Predictor.ask(path)` and the CLIs read
    kw = {"label": f"{modality} (upload)", "elem_id": IDS["media"]}
    if modality == "image":
        return gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], height=320, **kw)
    if modality == "video":
        return gr.Video(sources=["upload"], height=320, **kw)
    return gr.Audio(type="filepath", sources=["upload"], **kw)


def build_app(predictor: Predictor, title: str = "eP-ALM") -> gr.Blocks:
    """The page: media input, question, decoding controls, button, answer; each control has its `IDS` id."""
    gr = _gradio()
    ev, model = predictor.cfg.eval, predictor.cfg.model
    default_mode = "sampling" if ev.do_sample else "beam" if ev.num_beams > 1 else "greedy"
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(
            f"# {title}\nA frozen `{model.lm.name}` reads a frozen `{model.encoder.kind}` encoder through a "
            f"trained linear connection and soft prompt. Upload {_article(predictor.modality)}, ask a question about it, "
            "or leave the question empty for a caption."
        )
        with gr.Row():
            with gr.Column():
                media = _media_input(gr, predictor.modality)
                question = gr.Textbox(label="question (empty: a caption)", elem_id=IDS["question"])
                button = gr.Button("Answer", variant="primary", elem_id=IDS["button"])
                answer = gr.Textbox(label="answer", interactive=False, elem_id=IDS["answer"])
            with gr.Column():
                controls = [
                    gr.Radio(list(MODES), value=default_mode, label="decoding", elem_id=IDS["mode"]),
                    gr.Slider(
                        1,
                        max(10, ev.num_beams),
                        value=max(2, ev.num_beams),
                        step=1,
                        label="beams (beam search)",
                    ),
                    gr.Slider(
                        1,
                        max(100, ev.max_new_tokens),
                        value=ev.max_new_tokens,
                        step=1,
                        label="max new tokens",
                    ),
                    gr.Slider(0.05, 2.0, value=ev.temperature, step=0.05, label="temperature (sampling)"),
                    gr.Number(value=ev.top_k, precision=0, minimum=0, label="top-k, 0: all (sampling)"),
                    gr.Slider(0.01, 1.0, value=ev.top_p, step=0.01, label="top-p (sampling)"),
                    gr.Number(value=ev.seed, precision=0, label="seed, empty: unseeded (sampling)"),
                ]
        keys = ["mode", "num_beams", "max_new_tokens", "temperature", "top_k", "top_p", "seed"]
        for control, key in zip(controls, keys, strict=True):
            control.elem_id = IDS[key]

        def run(*values: Any) -> str:
            try:
                return respond(predictor, *values)
            except ValueError as e:  # shown on the page; the server goes on
                raise gr.Error(str(e)) from e

        inputs = [media, question, *controls]
        # the endpoint a script calls too: gradio_client.Client(url).predict(..., api_name="/answer")
        button.click(run, inputs=inputs, outputs=answer, api_name="answer")
        question.submit(run, inputs=inputs, outputs=answer, api_visibility="undocumented")  # Enter in the box
    return app


def theme() -> Any:
    """Gradio's default look with the system's fonts: the default theme has the browser load Inter and IBM Plex
    Mono from fonts.googleapis.com, which a closed network cannot reach (and an open one need not be asked)."""
    gr = _gradio()
    sans = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Default(font=sans, font_mono=["ui-monospace", "Consolas", "monospace"])


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> str:
    """Start serving `app` in the background; its local URL (and the public one with `share`). OSError when the
    port is taken or the address is not this machine's. `app.block_thread()` then serves until Ctrl-C."""
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        theme=theme(),
        show_error=True,  # a bad upload or setting shows its message on the page
        ssr_mode=False,  # server-side rendering needs Node.js; the page works without it
        prevent_thread_lock=True,
        quiet=True,  # its own banner tells to edit `launch()`; main() says how to expose the page instead
    )
    return " and ".join(filter(None, [app.local_url, app.share_url]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m epalm.cli.web_demo", description=__doc__, formatter_class=HelpFormatter
    )
    p.add_argument(
        "--adapter",
        required=True,
        default=argparse.SUPPRESS,
        help="adapter export dir, or a Hub id org/name[@rev]",
    )
    p.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to bind: 127.0.0.1 is this machine only, 0.0.0.0 every interface (for a network a firewall "
        "closes); $GRADIO_SERVER_NAME sets the default, as on Hugging Face Spaces",
    )
    p.add_argument(
        "--port",
        type=int,
        default=os.environ.get("GRADIO_SERVER_PORT", "7860"),
        help="TCP port; $GRADIO_SERVER_PORT sets the default",
    )
    p.add_argument(
        "--share",
        action="store_true",
        help="also a public *.gradio.live link (reaches Gradio's share servers)",
    )
    p.add_argument("--title", default="eP-ALM", help="the page's title")
    p.add_argument("--device", default=argparse.SUPPRESS, help="default: cuda when available, else cpu")
    p.add_argument(
        "overrides", nargs="*", default=[], help="config overrides key=value for the adapter's config"
    )
    args = p.parse_args(argv)
    configure_logging()
    if not 0 < args.port < 65536:
        return fail(f"--port must be in 1..65535, got {args.port}")

    from epalm.cli.generate import load_predictor

    try:
        predictor = load_predictor(args.adapter, args.overrides, getattr(args, "device", None))
    except ValueError as e:
        return fail(str(e))
    app = build_app(predictor, args.title)
    # gradio checks its own URL at start-up through httpx, which logs each request at INFO
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        urls = launch(app, args.host, args.port, args.share)
    except OSError as e:  # the port is taken, or the address is not this machine's
        problem = "the port is taken (pick another with --port)" if "empty port" in str(e) else str(e)
        return fail(f"cannot serve on {args.host}:{args.port}: {problem}")
    log.info("serving %s (%s) on %s; Ctrl-C stops it", args.adapter, predictor.modality, urls)
    if args.host in ("127.0.0.1", "localhost") and not args.share:
        log.info(
            "this machine only; from another: ssh -L %d:127.0.0.1:%d THIS_HOST and open http://127.0.0.1:%d "
            "there (or --host 0.0.0.0 behind a firewall, or --share: see --help)",
            *[args.port] * 3,
        )
    app.block_thread()  # until Ctrl-C, which closes the server
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
