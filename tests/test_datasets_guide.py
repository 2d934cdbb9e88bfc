"""docs/datasets.md's commands produce what each shipped config reads.

For every marked block of the guide (`<!-- guide: <config> ... -->` before a ```bash block): tiny files in
each dataset's real on-disk format are written at the paths the guide names, the block's commands run as
written from that directory, and the config's preflight must accept the shards. Each `python -m M ARGS`
runs as `M.main(ARGS)` in this process, which is what `python -m` calls: a fresh interpreter per command
would add ~1.5 s of imports to each of some 30 commands. Only `--workers 1 --no-progress` is added.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import shlex
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from epalm.evaluation.tasks import TASKS
from epalm.preflight import load_run_config
from epalm.run.layout import EVAL, SCORES
from tests.fixtures_data import avi, dump, image_size, jpeg, meta, read_split, video, wav

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "datasets.md"
CONFIGS = REPO / "launch" / "configs"
MARK = re.compile(r"<!-- guide(?:-(eval|file|train))?: ([^>]*?) -->\n```\w*\n(.*?)```", re.S)
SPECIAL = {"demo", "jsonl"}  # sections that are not one config's


@dataclass(frozen=True)
class Block:
    kind: str  # "build" | "eval" | "file" | "train"
    names: tuple[str, ...]  # configs (image/vqa_v2), "demo", "jsonl", or a file path for "file"
    body: str


def blocks(kind: str) -> list[Block]:
    found = [Block(k or "build", tuple(n.split()), body) for k, n, body in MARK.findall(GUIDE.read_text())]
    return [b for b in found if b.kind == kind]


def commands(body: str) -> list[list[str]]:
    """The block's commands, `\\` continuations joined, comments dropped, shell-split."""
    return [
        argv for line in body.replace("\\\n", " ").splitlines() if (argv := shlex.split(line, comments=True))
    ]


def run(argv: list[str], cwd: Path, monkeypatch) -> str:
    assert argv[:2] == ["python", "-m"], f"the guide's blocks hold only `python -m` commands: {argv}"
    module, args = argv[2], argv[3:]
    if module in ("data_shards.build", "data_shards.demo") and "--workers" not in args:
        args += ["--workers", "1"]
    if module in ("data_shards.build", "eval.run"):
        args += ["--no-progress"]
    monkeypatch.chdir(cwd)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = importlib.import_module(module).main(args)
    assert code == 0, f"{shlex.join(argv)} exited {code}:\n{out.getvalue()}"
    return out.getvalue()


# --- tiny datasets in their real formats, at the paths the guide names -------------------------------------


def coco_image(root: Path, subset: str, image_id: int) -> str:
    jpeg(root / "data/coco/images" / subset / f"COCO_{subset}_{image_id:012d}.jpg", seed=image_id)
    return f"COCO_{subset}_{image_id:012d}"


def coco_karpathy(root: Path) -> None:
    images = []
    for i, (split, subset) in enumerate(
        [
            ("train", "train2014"),
            ("restval", "val2014"),
            ("val", "val2014"),
            ("test", "val2014"),
            ("test", "val2014"),
        ],
        1,
    ):
        name = coco_image(root, subset, i)
        sentences = [{"raw": f"a picture number {i}"}, {"raw": f"image {i} of a thing"}]
        images.append(
            {
                "filepath": subset,
                "filename": f"{name}.jpg",
                "split": split,
                "cocoid": i,
                "sentences": sentences,
            }
        )
    dump(root / "data/coco/dataset_coco.json", {"images": images, "dataset": "coco"})


def vqa_official(root: Path, data_subtype: str, image_subset: str, ids: list[int], annotations: bool) -> None:
    """v2_OpenEnded_mscoco_<data_subtype>_questions.json (+ annotations), two questions per image."""
    questions = [
        {"image_id": i, "question": f"what is {k}?", "question_id": i * 10 + k} for i in ids for k in (1, 2)
    ]
    for i in ids:
        coco_image(root, image_subset, i)
    dump(
        root / f"data/vqav2/v2_OpenEnded_mscoco_{data_subtype}_questions.json",
        {"data_subtype": data_subtype, "questions": questions},
    )
    if annotations:
        answers = [
            {"answer": a, "answer_confidence": "yes", "answer_id": n}
            for n, a in enumerate(["yes"] * 6 + ["no"] * 4, 1)
        ]
        anns = [
            {
                "question_id": q["question_id"],
                "image_id": q["image_id"],
                "question_type": "what is",
                "answer_type": "yes/no",
                "multiple_choice_answer": "yes",
                "answers": answers,
            }
            for q in questions
        ]
        dump(
            root / f"data/vqav2/v2_mscoco_{data_subtype}_annotations.json",
            {"data_subtype": data_subtype, "annotations": anns},
        )


def vlt5(root: Path, split: str, images: list[tuple[str, int]]) -> None:
    """data/vqav2/<split>.json; the question ids are the official ones (image_id * 10 + 1)."""
    entries = [
        {
            "img_id": coco_image(root, subset, i),
            "question_id": i * 10 + 1,
            "sent": "what is 1?",
            "label": {"yes": 1.0, "no": 0.6},
        }
        for subset, i in images
    ]
    dump(root / f"data/vqav2/{split}.json", entries)


def vqa_karpathy(root: Path) -> None:
    vlt5(root, "karpathy_train", [("train2014", 1), ("val2014", 2)])  # restval images live in val2014
    vlt5(root, "karpathy_val", [("val2014", 3)])
    vlt5(root, "karpathy_test", [("val2014", 4), ("val2014", 5)])
    vqa_official(root, "val2014", "val2014", [2, 3, 4, 5], annotations=True)


def vqa_standard(root: Path) -> None:
    vqa_official(root, "train2014", "train2014", [1, 6], annotations=True)
    vqa_official(root, "val2014", "val2014", [3, 4], annotations=True)
    vqa_official(root, "test-dev2015", "test2015", [7], annotations=False)
    vlt5(root, "karpathy_val", [("val2014", 3)])


def gqa(root: Path) -> None:
    for n, split in enumerate(["train", "val", "testdev"]):
        questions = {
            f"{n}{k}": {
                "imageId": f"n{n}{k}",
                "question": "is it red?",
                "answer": "yes",
                "fullAnswer": "Yes, it is.",
            }
            for k in range(2)
        }
        for qid, q in questions.items():
            jpeg(root / "data/gqa/images" / f"{q['imageId']}.jpg", seed=int(qid))
        dump(root / f"data/gqa/questions/{split}_balanced_questions.json", questions)


def cc3m(root: Path) -> None:
    folder = root / "data/cc3m/train"
    folder.mkdir(parents=True)
    image = jpeg(root / "x.jpg", size=(300, 200)).read_bytes()
    with tarfile.open(folder / "00000.tar", "w") as tf:
        for k in range(3):
            key = f"{k:09d}"
            for ext, data in [
                ("jpg", image),
                ("txt", f"caption {k}".encode()),
                ("json", json.dumps({"key": key, "url": f"http://x/{k}.jpg"}).encode()),
            ]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    coco_karpathy(root)


def msrvtt(root: Path, files: dict[str, list[dict]]) -> None:
    for i in range(3):
        video(root / f"data/MSRVTT/videos/all/video{i}.mp4", num_frames=10)
    for name, entries in files.items():
        dump(root / f"data/MSRVTT/annotation/{name}.json", entries)


def msrvtt_caption(root: Path) -> None:
    msrvtt(
        root,
        {
            "msrvtt_caption_train7k": [{"video": "video0.mp4", "caption": ["a fade", "it gets light"]}],
            "msrvtt_caption_test": [{"video": f"video{i}.mp4", "caption": ["a fade"]} for i in (1, 2)],
        },
    )


def qa_entries(videos: list[str]) -> list[dict]:
    return [
        {"video": v, "question_id": i, "question": "what moves?", "answer": "a car"}
        for i, v in enumerate(videos)
    ]


def msrvtt_qa(root: Path) -> None:
    msrvtt(
        root,
        {f"msrvtt_vqa_{s}": qa_entries([f"video{i}.mp4"]) for i, s in enumerate(["train", "val", "test"])},
    )


def msvd_qa(root: Path) -> None:
    for s in ("train", "val", "test"):
        avi(root / f"data/MSVD/YouTubeClips/{s}_clip_5_15.avi")
        dump(root / f"data/MSVD/annotation/msvd_vqa_{s}.json", qa_entries([f"{s}_clip_5_15.avi"]))


def audiocaps(root: Path) -> None:
    rows = {
        "train": [f"{k},tr{k},30,a dog barks {k}" for k in range(5)],  # tr4's clip is gone (see below)
        "val": [f"{10 + k},va,0,a car passes {k}" for k in range(5)],
        "test": [f"{20 + k},te,0,rain falls {k}" for k in range(5)],
    }
    for split, lines in rows.items():
        (root / f"data/audiocaps/{split}.csv").parent.mkdir(parents=True, exist_ok=True)
        (root / f"data/audiocaps/{split}.csv").write_text(
            "audiocap_id,youtube_id,start_time,caption\n" + "\n".join(lines) + "\n"
        )
    for ytid in ["tr0", "tr1", "tr2", "tr3", "va", "te"]:  # a clip taken off YouTube: counted, not fatal
        wav(root / f"data/audiocaps/audio/{ytid}.wav", seconds=0.5)


def jsonl(root: Path) -> None:
    """The guide's own example files, and a tiny image for every media path they name."""
    for block in blocks("file"):
        path = root / block.names[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.body)
        for line in block.body.splitlines():
            media = path.parent / json.loads(line)["media"]
            media.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), (90, 140, 30)).save(media)


WRITERS = {
    "image/vqa_v2": vqa_karpathy,
    "image/vqa_v2_pt_L": vqa_standard,
    "image/gqa_pt_L": gqa,
    "image/caption_coco": coco_karpathy,
    "image/caption_coco_pt_L": coco_karpathy,
    "pretrain/cc3m_pt_L": cc3m,
    "video/msrvtt_caption": msrvtt_caption,
    "video/msrvtt_qa": msrvtt_qa,
    "video/msvd_qa": msvd_qa,
    "audio/audiocaps": audiocaps,
    "jsonl": jsonl,
    "demo": lambda root: None,  # data_shards.demo generates its own
}


def config_names() -> list[str]:
    return sorted(str(p.relative_to(CONFIGS).with_suffix("")) for p in CONFIGS.rglob("*.yaml"))


def outs(block: Block) -> set[str]:
    return {argv[argv.index("--out") + 1] for argv in commands(block.body) if "--out" in argv}


def check_shards(cfg, built: set[str] | None) -> None:
    """Every folder the config reads: built by the block, holding the config's task, modality and media shape."""
    d = cfg.data
    train = [t.path for t in d.train]
    for path in train + [p for p in (d.val, d.test) if p]:
        assert built is None or path in built, f"{path} is read by the config but no command builds it"
        _, samples = read_split(Path(path))
        metas = [meta(s) for s in samples]
        assert metas and all((m["task"], m["modality"]) == (d.task, d.modality) for m in metas), path
        if path in train:  # a training sample needs its target
            assert all(m["answers"] if d.task == "qa" else m["captions"] for m in metas), path
        if d.modality == "video":
            assert {sum(k.startswith("frame") for k in s) for s in samples} == {d.num_frames}, path
        if d.modality == "image":
            assert {min(image_size(s["jpg"])) for s in samples} == {d.image_size}, path


def test_every_config_has_one_guide_block():
    named = sorted(n for b in blocks("build") for n in b.names)
    assert named == sorted([c for c in config_names() if not c.startswith("demo/")] + list(SPECIAL))
    assert set(WRITERS) == set(named)


@pytest.mark.parametrize("block", blocks("build"), ids=lambda b: "+".join(b.names))
def test_guide_commands_build_what_the_config_reads(block, tmp_path, monkeypatch):
    for writer in {WRITERS[name] for name in block.names}:
        writer(tmp_path)
    for argv in commands(block.body):
        run(argv, tmp_path, monkeypatch)
    for name in block.names:
        if name == "demo":
            for config in [c for c in config_names() if c.startswith("demo/")]:
                # the tokenizer and encoders these name come from `make demo`'s later steps: shards only here
                check_shards(load_run_config(CONFIGS / f"{config}.yaml", paths=False), None)
        elif name == "jsonl":
            check_jsonl()
        else:
            check_shards(load_run_config(CONFIGS / f"{name}.yaml"), outs(block))


def check_jsonl() -> None:
    """The guide's example files give one train sample per caption, one val sample per image; its training
    command's config and overrides pass the preflight."""
    files = {b.names[0]: [json.loads(x) for x in b.body.splitlines()] for b in blocks("file")}
    captions = {
        name: [[c] if isinstance(c, str) else c for c in (x["caption"] for x in lines)]
        for name, lines in files.items()
    }
    _, train = read_split(Path("shards/mine/train"))
    assert [meta(s)["captions"] for s in train] == [
        [c] for cs in captions["data/mine/train.jsonl"] for c in cs
    ]
    _, val = read_split(Path("shards/mine/val"))
    assert [meta(s)["captions"] for s in val] == captions["data/mine/val.jsonl"]
    (train_cmd,) = commands(blocks("train")[0].body)
    config = train_cmd[train_cmd.index("--config") + 1]
    overrides = [
        a for a in train_cmd[train_cmd.index("--config") + 2 :] if "=" in a and not a.startswith("-")
    ]
    cfg = load_run_config(REPO / config, overrides)
    assert cfg.data.train[0].path == "shards/mine/train" and cfg.data.val == "shards/mine/val"


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# what the guide says each evaluation gives: the scorer's metric, None for a split without answers
EVAL_METRICS = {
    ("image/vqa_v2", "shards/vqav2/karpathy_test"): "vqa_label_score",
    ("image/vqa_v2_pt_L", "shards/vqav2/val"): "vqa",
    ("image/vqa_v2_pt_L", "shards/vqav2/testdev"): None,
    ("image/gqa_pt_L", "shards/gqa/testdev"): "qa",
}


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory) -> Path:
    from tests.test_eval_run import make_adapter

    return make_adapter(tmp_path_factory.mktemp("adapter"))


@pytest.mark.parametrize("block", blocks("eval"), ids=lambda b: b.names[0])
def test_guide_eval_commands_score_the_configs_shards(block, tmp_path, monkeypatch, request):
    """Each evaluation names the config's run directory, a split its block builds and a task that scores the
    config's samples; the image QA ones run (a tiny random adapter) and give the metric the guide names."""
    (name,) = block.names
    cfg = load_run_config(CONFIGS / f"{name}.yaml", paths=False)
    build = next(b for b in blocks("build") if name in b.names)
    cmds = commands(block.body)
    for argv in cmds:
        assert argv[:3] in (["python", "-m", "eval.run"], ["python", "-m", "eval.vqa"]), argv
        if argv[2] == "eval.run":
            assert option(argv, "--adapter").startswith(cfg.run_dir + "/") and option(
                argv, "--shards"
            ) in outs(build)
            task = TASKS[option(argv, "--task")]
            assert task.kind == cfg.data.task and cfg.data.modality in task.modalities, argv
    runs = [argv for argv in cmds if argv[2] == "eval.run"]
    if not all((name, option(argv, "--shards")) in EVAL_METRICS for argv in runs):
        return  # captioning (Java scorers) and video: checked above, scored by tests/test_eval_run.py
    WRITERS[name](tmp_path)
    for argv in commands(build.body):
        run(argv, tmp_path, monkeypatch)
    adapter = request.getfixturevalue("tiny_adapter")
    for argv in runs:
        shutil.copytree(adapter, tmp_path / option(argv, "--adapter"), dirs_exist_ok=True)
    for argv in cmds:
        printed = run(argv, tmp_path, monkeypatch)
        if argv[2] == "eval.vqa":  # the official scorer's accuracy dict
            assert set(json.loads(printed)) == {"overall", "perQuestionType", "perAnswerType"}
            continue
        shards = option(argv, "--shards")
        split = json.loads((tmp_path / shards / "manifest.json").read_text())["split"]
        scores = json.loads(
            (
                tmp_path / option(argv, "--adapter") / EVAL / f"{option(argv, '--task')}_{split}" / SCORES
            ).read_text()
        )
        expected = EVAL_METRICS[name, shards]
        assert (scores["metric"] if scores["scores"] is not None else None) == expected, (argv, scores)
        if (
            expected == "vqa"
        ):  # eval.vqa takes these results with the official files (test_eval_run.py: same number)
            official = [
                "python",
                "-m",
                "eval.vqa",
                "--predictions",
                str(Path(option(argv, "--adapter"), EVAL, f"vqav2_{split}", scores["results"])),
                "--questions",
                f"data/vqav2/v2_OpenEnded_mscoco_{split}2014_questions.json",
                "--annotations",
                f"data/vqav2/v2_mscoco_{split}2014_annotations.json",
            ]
            assert json.loads(run(official, tmp_path, monkeypatch))["overall"] == scores["scores"]["overall"]


def test_other_docs_build_commands_are_the_guides():
    """README's and docs/data.md's shard-building examples, and README's VQA v2 evaluation, are guide commands."""
    guide = {shlex.join(argv) for b in blocks("build") + blocks("eval") for argv in commands(b.body)}
    found = []
    for doc in ("README.md", "docs/data.md"):
        for body in re.findall(r"```bash\n(.*?)```", (REPO / doc).read_text(), re.S):
            for line in body.replace("\\\n", " ").splitlines():
                vqa_eval = line.startswith("python -m eval.run ") and "--task vqav2" in line
                if line.startswith("python -m data_shards.build ") or vqa_eval:
                    found.append((doc, shlex.join(shlex.split(line, comments=True))))
    assert {doc for doc, _ in found} == {"README.md", "docs/data.md"}
    assert [f for f in found if f[1] not in guide] == []
