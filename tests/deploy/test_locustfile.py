"""The locustfile's own helpers: loading images from a folder or an archive, the multipart body, Retry-After,
answer checks. (The end-to-end test runs the whole locustfile against the real service.)

They run in a child Python: importing locust patches the standard library with gevent, which must not happen
inside the test process.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
from deploy_support import LOCUSTFILE, noise_png, run_tool

CHILD = textwrap.dedent("""
    import email.parser, json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import locustfile as lf

    folder, archive, empty = (Path(arg) for arg in sys.argv[2:5])
    out = {}
    images = lf.load_images(folder, limit=10)
    out["folder"] = sorted((image.name, image.content_type) for image in images)
    out["archive"] = sorted((image.name, image.content_type, len(image.data)) for image in lf.load_images(archive, 10))
    unnamed = archive.with_name("images")  # as docker compose mounts it: /mnt/images, no suffix
    unnamed.write_bytes(archive.read_bytes())
    out["unnamed_archive"] = sorted((image.name, image.content_type) for image in lf.load_images(unnamed, 10))
    out["limited"] = len(lf.load_images(folder, limit=2))
    names = [[image.name for image in lf.load_images(folder, 10, seed=3)] for _ in range(2)]
    out["same_seed"] = names[0] == names[1]
    for name, path in (("empty", empty), ("missing", empty / "nothing.tar")):
        try:
            lf.load_images(path, 10)
        except ValueError as error:
            out[name] = str(error)
    out["retry_after"] = [lf.retry_after(v) for v in ("2", "0.5", None, "Wed, 21 Oct 2015 07:28:00 GMT", "100", "-3")]

    body, content_type = lf.multipart_body(images[:2])
    message = email.parser.BytesParser().parsebytes(b"Content-Type: " + content_type.encode() + b"\\r\\n\\r\\n" + body)
    parts = message.get_payload()
    out["parts"] = [(p.get_param("name", header="content-disposition"), p.get_content_type(),
                     p.get_payload(decode=True) == image.data) for p, image in zip(parts, images[:2])]

    class Answer:
        def __init__(self, body):
            self.body = body
            self.text = json.dumps(body)
        def json(self):
            return self.body
    good = {"predictions": [{"batch": {"statistics": "batch"}}, {"batch": {"statistics": "frozen"}}]}
    out["checks"] = [lf.check_prediction(Answer(good), 2), lf.check_prediction(Answer(good), 3),
                     lf.check_prediction(Answer({"predictions": [{"batch": {}}]}), 1),
                     lf.check_prediction(Answer({"error": {}}), 1)]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # find_spec, not importorskip: importing locust here would monkey-patch this process with gevent and break
    # every later test that runs an asyncio server in a thread.
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed: pip install locust")
    root = tmp_path_factory.mktemp("images")
    folder = root / "folder"
    (folder / "cat").mkdir(parents=True)
    for i in range(3):
        (folder / "cat" / f"{i}.png").write_bytes(noise_png(i))
    (folder / "notes.txt").write_text("not an image")
    archive = root / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="test")
    (root / "empty").mkdir()
    result = run_tool([sys.executable, "-c", CHILD, str(LOCUSTFILE.parent), str(folder), str(archive),
                       str(root / "empty")])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_images_load_from_a_folder_or_an_archive(results: dict[str, Any]) -> None:
    assert results["folder"] == [[f"{i}.png", "image/png"] for i in range(3)]
    assert [entry[:2] for entry in results["archive"]] == results["folder"]
    assert all(size > 0 for *_, size in results["archive"])
    assert results["limited"] == 2 and results["same_seed"]
    assert "no image files" in results["empty"]
    assert results["unnamed_archive"] == results["folder"]
    assert "not a folder or a tar archive" in results["missing"]


def test_multipart_body_holds_one_image_part_per_image(results: dict[str, Any]) -> None:
    assert results["parts"] == [["image", "image/png", True], ["image", "image/png", True]]


def test_retry_after_is_bounded(results: dict[str, Any]) -> None:
    assert results["retry_after"] == [2.0, 0.5, 1.0, 1.0, 5.0, 0.0]


def test_answers_are_checked(results: dict[str, Any]) -> None:
    ok, wrong_count, no_statistics, no_predictions = results["checks"]
    assert ok is None
    assert wrong_count == "2 predictions for 3 images"
    assert no_statistics.startswith("prediction without the statistics")
    assert no_predictions.startswith("HTTP 200 without a predictions list")


def test_locustfile_documents_headless_use() -> None:
    text = Path(LOCUSTFILE).read_text()
    for option in ("--headless", "--run-time", "--csv", "LOCUST_IMAGES"):
        assert option in text
