"""A fake Kaggle server at the HTTP transport: the download client (kagglehub, as installed from
requirements.txt) runs its real code, and only `requests`' adapter, the last step before the network,
is replaced.

Configured by a dict (or the environment variable FAKE_KAGGLE, JSON): {"zip": archive served for
downloads, "hub": answer to kagglehub, "log": file that gets one line per request}. An answer is
"ok", "offline" (the connection fails) or an HTTP status such as 403. A request from any other client
is logged as "other" and fails as if offline: the script has no other way to the data.
Use it in another process with `python -c "import kaggle_fake; kaggle_fake.main()" SCRIPT ARGS...`."""
from __future__ import annotations

import io
import json
import os
import runpy
import sys
import zipfile

import cv2
import numpy as np
import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict


def write_dataset_zip(path, names) -> None:
    """A zip laid out as the Kaggle dataset: images/N.png and masks/N.png, tiny 16x16 slices."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as z:
        for name in names:
            image = rng.integers(0, 80, (16, 16), dtype=np.uint8)
            mask = np.zeros((16, 16), np.uint8)
            top, left = rng.integers(2, 9, 2)
            image[top:top + 5, left:left + 5] = 220
            mask[top:top + 5, left:left + 5] = 255
            z.writestr(f"images/{name}.png", cv2.imencode(".png", image)[1].tobytes())
            z.writestr(f"masks/{name}.png", cv2.imencode(".png", mask)[1].tobytes())


def fake_send(config: dict):
    def send(self, request, **kwargs):
        client = "hub" if "kagglehub" in (request.headers.get("User-Agent") or "") else "other"
        answer = str(config.get("hub", "ok")) if client == "hub" else "offline"
        if config.get("log"):
            with open(config["log"], "a") as f:
                f.write(f"{client} {request.url} {answer}\n")
        if answer == "offline":
            raise requests.ConnectionError(f"Failed to resolve {request.url} (fake: no network)", request=request)
        response = requests.Response()
        response.request, response.url = request, request.url
        response.status_code = 200 if answer == "ok" else int(answer)
        if response.status_code != 200:
            body, kind = json.dumps({"code": response.status_code, "message": "fake refusal"}).encode(), "application/json"
        elif request.url.endswith("/GetDataset"):
            body, kind = json.dumps({"currentVersionNumber": 1}).encode(), "application/json"
        else:
            with open(config["zip"], "rb") as f:
                body, kind = f.read(), "application/zip"
        response.headers = CaseInsensitiveDict({"Content-Type": kind, "Content-Length": str(len(body))})
        response.raw = io.BytesIO(body)
        return response
    return send


def install(config: dict, setattr=setattr) -> None:
    """Replace the network; pass monkeypatch.setattr to have it undone after a test."""
    setattr(HTTPAdapter, "send", fake_send(config))


def main() -> None:
    """Run the script named in argv[1] with the fake installed."""
    install(json.loads(os.environ["FAKE_KAGGLE"]))
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
