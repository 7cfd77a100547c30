"""API keys (``festival_serve.serving.auth``), ``festival-serve keys new``, and the middleware both servers share,
checked on the baseline's Starlette app; and ``/v1/models`` showing weights relative to the model store
(``festival_serve.serving.public_paths``).

The key checks sit in front of the models, so the app here runs stand-ins that find nothing (no weights
to build); the Ray Serve ingress gets the same middleware and is checked in ``tests/test_graph.py``."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from festival_serve.serving import auth
from festival_serve.ops import up
from festival_serve.serving.public_paths import public_model_info, public_path
from festival_serve.measure.baseline import build_app
from festival_serve.cli import main
from festival_serve.serving.imaging import encode_jpeg
from festival_serve.pipeline.settings import PipelineArgs

ROOT = Path(__file__).resolve().parents[1]


def write_keys(path, *keys: str) -> None:
    path.write_text("# festival-serve API keys\n\n" + "".join(f"{auth.digest(k)}  # holder {i}\n" for i, k in enumerate(keys)))


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# -- keys and the keys file ---------------------------------------------------------------------------------


def test_a_keys_file_round_trips_and_allows_only_its_keys(tmp_path):
    first, second = auth.new_key(), auth.new_key()
    write_keys(tmp_path / "keys", first, second)

    ring = auth.KeyRing.from_file(tmp_path / "keys")

    assert ring.digests == (auth.digest(first), auth.digest(second))
    assert first.startswith(auth.KEY_PREFIX) and first != second
    assert ring.allows(f"Bearer {first}") and ring.allows(f"bearer {second}")  # the scheme is case-insensitive
    assert not ring.allows(f"Bearer {auth.new_key()}")


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token KEY", "KEY",
                                    "Bearer KEY extra", "Bearer KEYX", "Bearer " + auth.digest("KEY")])
def test_missing_and_malformed_headers_are_refused(tmp_path, header):
    write_keys(tmp_path / "keys", "KEY")
    ring = auth.KeyRing.from_file(tmp_path / "keys")

    assert ring.allows("Bearer KEY")
    assert not ring.allows(header)


def test_a_malformed_line_names_the_file_and_line_and_never_echoes_it(tmp_path):
    key = auth.new_key()
    path = tmp_path / "keys"
    path.write_text(f"# keys\n{auth.digest('a')}\n\n{key}\n")  # a key pasted where its digest belongs

    with pytest.raises(auth.KeysFileError, match=r"keys, line 4: expected a SHA-256 hex digest") as error:
        auth.KeyRing.from_file(path)
    assert key not in str(error.value)


def test_a_missing_or_empty_keys_file_is_a_clear_error(tmp_path):
    with pytest.raises(auth.KeysFileError, match="cannot be read"):
        auth.KeyRing.from_file(tmp_path / "absent")
    (tmp_path / "empty").write_text("# nobody yet\n")
    with pytest.raises(auth.KeysFileError, match="holds no key digests"):
        auth.KeyRing.from_file(tmp_path / "empty")


def test_keys_new_prints_a_key_once_that_the_written_file_accepts(tmp_path, capsys):
    path = tmp_path / "secrets" / "api-keys"
    path.parent.mkdir()

    assert main(["keys", "new", "--file", str(path)]) == 0
    assert main(["keys", "new", "--file", str(path), "--label", "night shift"]) == 0

    out = capsys.readouterr().out.splitlines()
    first, second = out[0], out[2]
    assert "shown once and stored nowhere" in out[1]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert first not in text and second not in text  # only digests are written
    assert text.endswith("  # night shift\n")
    ring = auth.KeyRing.from_file(path)
    assert len(ring.digests) == 2 and ring.allows(f"Bearer {first}") and ring.allows(f"Bearer {second}")


def test_keys_new_refuses_to_append_to_a_malformed_file(tmp_path, capsys):
    path = tmp_path / "keys"
    path.write_text("not a digest\n")

    assert main(["keys", "new", "--file", str(path)]) == 2
    assert "line 1" in capsys.readouterr().err and path.read_text() == "not a digest\n"


# -- the middleware, on the baseline server -------------------------------------------------------------------


class FindsNothing:
    """A detector or hazard classifier stand-in: nothing in any frame; describes itself as its loader would."""

    def __init__(self, info: dict) -> None:
        self.info = info

    def detect(self, frames: list) -> list:
        return [[] for _ in frames]

    classify = detect

    def read(self, crops: list) -> list:
        return [None for _ in crops]

    def model_info(self) -> dict:
        return self.info


class DescribesNothing:
    def __init__(self, info: dict) -> None:
        self.info = info

    def describe(self, images: list, findings: list) -> list[str]:
        return ["an empty road"] * len(images)

    def model_info(self) -> dict:
        return self.info


@pytest.fixture
def store(tmp_path):
    return tmp_path / "models"


def baseline(store, keys_file=None) -> TestClient:
    args = PipelineArgs.model_validate({"model_store": str(store), "ingress": {"api_keys_file": keys_file}})
    detector = {"backend": "onnxruntime", "weights": str(store / "sign_detector" / "signs.pt"),
                "classifier": "/opt/elsewhere/sign_classes.pt",
                "networks": [{"name": "sign_detector", "weights": str(store / "sign_detector" / "signs.pt")}]}
    models = {
        "sign_detector": FindsNothing(detector),
        "hazard_cells": FindsNothing({"weights": str(store / "hazard_cells" / "yolic_m2.pth.tar")}),
        "sign_reader": FindsNothing({"weights": "det=rapidocr-3.4.0/PP-OCRv6_det_small.onnx "
                                                f"rec={store}/sign_reader/rec.onnx dict=/home/someone/dict.txt"}),
        "scene_describer": DescribesNothing({"weights": str(store / "scene_describer" / "festival-describer")}),
    }
    return TestClient(build_app(args, models))


def analyze(client: TestClient, headers: dict | None = None):
    image = encode_jpeg(np.zeros((32, 48, 3), np.uint8))
    return client.post("/v1/analyze", content=image, headers={"content-type": "image/jpeg", **(headers or {})})


@pytest.fixture
def key(tmp_path):
    key = auth.new_key()
    write_keys(tmp_path / "keys", key)
    return key


def test_v1_needs_a_valid_key_when_a_keys_file_is_set(tmp_path, store, key):
    client = baseline(store, str(tmp_path / "keys"))

    for reply in (analyze(client), client.get("/v1/models"), client.get("/v1/models", headers=bearer(key + "x")),
                  analyze(client, bearer(auth.new_key())), client.get("/v1/models", headers={"authorization": key})):
        assert reply.status_code == 401
        assert reply.json()["error"]["code"] == "unauthorized"
        assert reply.headers["www-authenticate"].startswith("Bearer")
        assert key not in reply.text
    assert client.get("/v1/models").headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/models", headers=bearer("wrong")).headers["www-authenticate"] == 'Bearer error="invalid_token"'

    reply = analyze(client, bearer(key))
    assert reply.status_code == 200, reply.text
    assert reply.json()["description"] == "an empty road"
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200


def test_probes_stay_open_and_unknown_paths_are_closed(tmp_path, store, key):
    client = baseline(store, str(tmp_path / "keys"))

    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/v1/nothing").status_code == 401  # refused before routing: no map of the API
    assert client.get("/v1/nothing", headers=bearer(key)).json()["error"]["code"] == "not_found"


def test_without_a_keys_file_v1_is_open(store):
    client = baseline(store)

    assert analyze(client).status_code == 200
    assert client.get("/v1/models").status_code == 200


def test_a_bad_keys_file_stops_the_server_before_it_serves(tmp_path, store):
    with pytest.raises(auth.KeysFileError, match="cannot be read"):
        baseline(store, str(tmp_path / "absent"))


# -- /v1/models shows no machine paths --------------------------------------------------------------------------


def test_v1_models_shows_weights_relative_to_the_store_and_other_paths_by_name(store):
    models = {m["name"]: m for m in baseline(store).get("/v1/models").json()["models"]}

    assert models["sign_detector"]["weights"] == "sign_detector/signs.pt"
    assert models["sign_detector"]["classifier"] == "sign_classes.pt"  # outside the store: its name only
    assert models["sign_detector"]["networks"][0]["weights"] == "sign_detector/signs.pt"
    assert models["hazard_cells"]["weights"] == "hazard_cells/yolic_m2.pth.tar"
    assert models["sign_reader"]["weights"] == \
        "det=rapidocr-3.4.0/PP-OCRv6_det_small.onnx rec=sign_reader/rec.onnx dict=dict.txt"
    assert models["scene_describer"]["weights"] == "scene_describer/festival-describer"
    assert str(store) not in str(models)


@pytest.mark.parametrize("path,expected", [
    ("{store}/sign_detector/signs.pt", "sign_detector/signs.pt"),
    ("{store}/../elsewhere/signs.pt", "signs.pt"),  # leaves the store: a name only
    ("/usr/lib/python3/site-packages/rapidocr/models/det.onnx", "det.onnx"),
    ("sign_detector/signs.pt", "sign_detector/signs.pt"),  # a setting's value (weights missing): store-relative
    ("../secrets/signs.pt", "signs.pt"),
    ("bundled", "bundled"),
    ("{store}", "models"),
])
def test_public_path(store, path, expected):
    assert public_path(path.format(store=store), store) == expected


def test_public_paths_with_a_relative_store_and_without_a_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert public_path("models/sign_detector/signs.pt", "models") == "sign_detector/signs.pt"
    assert public_path(tmp_path / "models" / "hazard_cells" / "m.pt", "models") == "hazard_cells/m.pt"
    assert public_path("/srv/models/signs.pt", None) == "signs.pt"
    info = {"weights": None, "classifier": 3, "layout": "outdoor", "networks": [{"classifier": "/a/b.pt"}]}
    assert public_model_info(info, "models") == {**info, "networks": [{"classifier": "b.pt"}]}


# -- festival-serve up --------------------------------------------------------------------------------------


def test_up_hands_every_replica_the_keys_file_as_an_absolute_path(tmp_path):
    config = up.load_config(ROOT / "serve_config.yaml")
    profiled, changes = up.local_profile(config, host="127.0.0.1", port=8000, model_store=None, has_gpu=False,
                                            base_dir=tmp_path, api_keys_file="secrets/keys")

    ingress = profiled["applications"][0]["args"]["ingress"]
    assert ingress["api_keys_file"] == str(tmp_path / "secrets" / "keys")
    assert ingress["max_body_bytes"] == config["applications"][0]["args"]["ingress"]["max_body_bytes"]  # kept
    assert any("API keys" in change for change in changes)
    PipelineArgs.model_validate(profiled["applications"][0]["args"])
    open_config, _ = up.local_profile(config, host="127.0.0.1", port=8000, model_store=None, has_gpu=False,
                                         base_dir=tmp_path)
    assert "api_keys_file" not in open_config["applications"][0]["args"]["ingress"]
