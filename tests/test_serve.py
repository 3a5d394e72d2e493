"""kosmos-serve against the official `openai` client, on loopback, with a tiny model made in the test.

The server runs in a thread of the test process (`kosmos.serve.Background`, a free port); every answer is
compared with what `kosmos.generate` gives for the same prompt. The page is driven in Debian's headless
chromium through selenium (skipped, saying why, where chromium or its driver is not installed).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="kosmos-serve's packages: pip install -r requirements-serve.txt")
openai = pytest.importorskip("openai", reason="the openai client: pip install -r requirements-test.txt")

from kosmos.generate import GenerationConfig, Prompt, cut_at_stop, generate  # noqa: E402
from kosmos.sequence import SequenceEncoder  # noqa: E402
from kosmos.serve import Background, Limits, create_app  # noqa: E402
from tests.helpers import bad_image, photo, tiny_model, write  # noqa: E402

NAME = "tiny"


@pytest.fixture(scope="module")
def served(tiny_tokenizer, tmp_path_factory):
    """(server URL, model, encoder, folder of allowed local images): one server for the module."""
    model = tiny_model().eval()
    enc = SequenceEncoder.from_config(model.cfg, tokenizer=tiny_tokenizer)
    local = tmp_path_factory.mktemp("local_images")
    limits = Limits(max_images=2, max_image_bytes=60_000, batch_wait_ms=150, local_images=local.resolve())
    with Background(create_app(model, enc, NAME, limits)) as server:
        yield server.url, model, enc, local


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="none", max_retries=0, timeout=60)


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def expected(served, text: str, images: tuple[bytes, ...] = (), **settings) -> str:
    """What kosmos.generate gives (greedy) for `text` and `images` (at its `{image}` markers, else first), as
    its CLI prints it."""
    import io

    from PIL import Image

    _, model, enc, _ = served
    pixels = [enc.image(Image.open(io.BytesIO(b))) for b in images]
    seq = enc.prompt(text, pixels)
    prompt = Prompt(seq.ids, seq.image_mask, torch.stack(pixels) if pixels else None)
    gen = GenerationConfig.for_tokenizer(enc.tokenizer, **settings)
    return cut_at_stop(enc.tokenizer.decode(generate(model, [prompt], gen)[0]), gen.stop)


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_plain_chat_and_completion_equal_kosmos_generate(served, client):
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a red circle"}],
                                          max_tokens=8, temperature=0)
    assert chat.object == "chat.completion" and chat.model == NAME
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected(served, "a red circle", max_new_tokens=8)
    assert chat.choices[0].finish_reason in ("length", "stop")
    assert chat.usage.completion_tokens <= 8 and chat.usage.prompt_tokens == 1 + len(
        served[2].tokenizer.encode("a red circle"))
    done = client.completions.create(model=NAME, prompt=["a blue", "the square on the left"], max_tokens=6,
                                     temperature=0, n=2)
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    assert [c.text for c in done.choices] == [expected(served, "a blue", max_new_tokens=6)] * 2 + [
        expected(served, "the square on the left", max_new_tokens=6)] * 2
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert get(served[0] + "/health")["status"] == "ok"


def test_stream_sends_openai_chunks_ending_with_done(served, client):
    want = expected(served, "a green", max_new_tokens=12)
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a green"}],
                                            max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("length", "stop") and len(chunks) > 3
    # The raw stream: server-sent events, the last one `data: [DONE]`.
    body = json.dumps({"prompt": "a green", "max_tokens": 12, "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(served[0] + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    texts = [json.loads(e.removeprefix("data: "))["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts) == want


def test_stop_strings_cut_the_answer_streamed_or_not(served, client):
    free = expected(served, "a", max_new_tokens=16)
    stop = free[len(free) // 2: len(free) // 2 + 2]
    assert stop.strip(), free
    want = expected(served, "a", max_new_tokens=16, stop=[stop])
    assert len(want) < len(free)
    plain = client.completions.create(model=NAME, prompt="a", max_tokens=16, temperature=0, stop=stop)
    assert plain.choices[0].text == want and plain.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt="a", max_tokens=16, temperature=0, stop=[stop],
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


def test_an_image_part_and_interleaved_images(served, client):
    img, other = photo(0), photo(3)
    content = [{"type": "image_url", "image_url": {"url": data_url(img)}},
               {"type": "text", "text": "an image of"}]
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}],
                                         max_tokens=10, temperature=0)
    assert out.choices[0].message.content == expected(served, "an image of", (img,), max_new_tokens=10)
    # Completions: images at the prompt's {image} markers (an extension field), as kosmos.generate --image.
    both = client.completions.create(model=NAME, prompt="{image} a cat. {image} a", max_tokens=6,
                                     temperature=0, extra_body={"images": [data_url(img), data_url(other)]})
    want = expected(served, "{image} a cat. {image} a", (img, other), max_new_tokens=6)
    assert both.choices[0].text == want
    assert both.usage.prompt_tokens > 2 * served[2].span


def test_beam_search_extension_equals_kosmos_generate(served, client):
    out = client.completions.create(model=NAME, prompt="a small", max_tokens=6, temperature=0,
                                    extra_body={"num_beams": 3})
    assert out.choices[0].text == expected(served, "a small", max_new_tokens=6, num_beams=3)


def test_concurrent_requests_are_batched_and_equal_kosmos_generate(served, client):
    prompts = ["a red", "the blue square at the top", "a", "green triangle on the", "circle", "a small red"]
    want = {p: expected(served, p, max_new_tokens=4 + i) for i, p in enumerate(prompts)}
    want_img = expected(served, "an image of", (photo(5),), max_new_tokens=7)
    before = get(served[0] + "/health")
    got: dict[str, str] = {}
    start = threading.Barrier(len(prompts) + 1)

    def ask(i: int, p: str | None) -> None:
        start.wait()
        if p is None:
            content = [{"type": "image_url", "image_url": {"url": data_url(photo(5))}},
                       {"type": "text", "text": "an image of"}]
            r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}],
                                               max_tokens=7, temperature=0)
            got["image"] = r.choices[0].message.content
        else:
            r = client.completions.create(model=NAME, prompt=p, max_tokens=4 + i, temperature=0)
            got[p] = r.choices[0].text

    threads = [threading.Thread(target=ask, args=(i, p)) for i, p in enumerate([*prompts, None])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == {**want, "image": want_img}
    after = get(served[0] + "/health")
    batches, rows = after["batches"] - before["batches"], after["rows"] - before["rows"]
    assert rows == len(prompts) + 1 and batches < rows, (batches, rows)  # some requests shared a forward
    assert after["largest_batch"] > 1


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value


@pytest.mark.parametrize("case", ["not_an_image", "not_image_bytes", "too_large", "too_many", "context",
                                  "unknown_parameter", "out_of_range", "remote_url", "local_path_outside"])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(served, client, case):
    big = photo(1, size=(900, 900), fmt="PNG")
    assert len(big) > 60_000

    def chat(*parts, **kw):
        content = [{"type": "image_url", "image_url": {"url": u}} for u in parts]
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": "a"}]}]
        return lambda: client.chat.completions.create(model=NAME, messages=messages, max_tokens=4,
                                                      temperature=0, **kw)

    first = "messages[0].content[0].image_url"

    call, status, code, param = {
        "not_an_image": (chat(data_url(b"hello, not a picture", "text/plain")), 400, "invalid_image", first),
        "not_image_bytes": (chat(data_url(bad_image("corrupt_image"), "image/png")), 400, "invalid_image",
                            first),
        "too_large": (chat(data_url(big, "image/png")), 413, "image_too_large", first),
        "too_many": (chat(*[data_url(photo(i)) for i in range(3)]), 400, "too_many_images", "messages"),
        "context": (lambda: client.completions.create(model=NAME, prompt="a red circle " * 200, max_tokens=4),
                    400, "context_length_exceeded", "prompt"),
        "unknown_parameter": (chat(frequency_penalty=0.5), 400, "unknown_parameter", "frequency_penalty"),
        "out_of_range": (chat(top_p=0), 400, "invalid_value", "top_p"),
        "remote_url": (chat("http://example.com/cat.jpg"), 400, "invalid_image_url", first),
        "local_path_outside": (chat("/etc/hostname"), 400, "invalid_image_url", first),
    }[case]
    e = error_of(call)
    assert e.status_code == status, e.body
    assert e.body["code"] == code and e.body["param"] == param and e.body["type"] == "invalid_request_error"
    assert e.body["message"] and "\n" not in e.body["message"]
    ok = client.completions.create(model=NAME, prompt="a", max_tokens=3, temperature=0)  # still serving
    assert ok.choices[0].text == expected(served, "a", max_new_tokens=3)


def test_local_images_only_under_the_allowed_folder(served, client):
    path = write(served[3] / "cat.jpg", photo(2))
    out = client.completions.create(model=NAME, prompt="an image of", max_tokens=5, temperature=0,
                                    extra_body={"images": [str(path)]})
    assert out.choices[0].text == expected(served, "an image of", (photo(2),), max_new_tokens=5)
    out = client.completions.create(model=NAME, prompt="an image of", max_tokens=5, temperature=0,
                                    extra_body={"images": ["file://" + str(path)]})
    assert out.choices[0].text == expected(served, "an image of", (photo(2),), max_new_tokens=5)
    outside = {"images": ["../x.jpg"]}
    e = error_of(lambda: client.completions.create(model=NAME, prompt="a", extra_body=outside))
    assert e.status_code == 400 and "outside the folder" in e.body["message"]


def test_unknown_model_and_route_are_404_in_openai_shape(served, client):
    e = error_of(lambda: client.completions.create(model="gpt-4", prompt="a", max_tokens=2))
    assert e.status_code == 404 and e.body["code"] == "model_not_found"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(served[0] + "/v1/nothing", timeout=10)
    assert e.value.code == 404 and "error" in json.loads(e.value.read())


def test_a_client_leaving_mid_stream_frees_its_slot(served, client):
    model = served[1]
    slow = model.decoder.register_forward_hook(lambda *a: time.sleep(0.02))  # 200 tokens: 4 s or more
    try:
        before = get(served[0] + "/health")["tokens"]
        host, port = served[0].removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        body = json.dumps({"prompt": "a", "max_tokens": 200, "temperature": 0, "stream": True})
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        first = r.readline()  # the first event: the row is decoding
        assert first.startswith(b"data: ")
        conn.sock.shutdown(2)
        conn.close()
        deadline = time.monotonic() + 30
        while (h := get(served[0] + "/health"))["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert h["active"] == 0 and h["queued"] == 0
        assert h["tokens"] - before < 150, h  # the row ended when its client left, not after 200 tokens
    finally:
        slow.remove()
    ok = client.completions.create(model=NAME, prompt="a", max_tokens=3, temperature=0)
    assert ok.choices[0].text == expected(served, "a", max_new_tokens=3)


def test_a_short_answer_does_not_wait_for_the_rest_of_its_batch(served, client):
    model = served[1]
    slow = model.decoder.register_forward_hook(lambda *a: time.sleep(0.02))  # 200 tokens: 4 s or more
    started, leave = threading.Barrier(2), threading.Event()

    def long_stream() -> None:
        host, port = served[0].removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        started.wait()
        body = json.dumps({"prompt": "a red", "max_tokens": 200, "temperature": 0, "stream": True})
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        conn.getresponse().readline()
        leave.wait(60)
        conn.close()  # leaves mid-stream: its row ends

    other = threading.Thread(target=long_stream)
    other.start()
    try:
        started.wait()
        short = client.completions.create(model=NAME, prompt="a", max_tokens=2, temperature=0)
        h = get(served[0] + "/health")
        assert short.choices[0].text == expected(served, "a", max_new_tokens=2)
        assert h["active"] == 2, h  # answered while its batch (with the long row) still decodes
    finally:
        leave.set()
        other.join(60)
        slow.remove()
    deadline = time.monotonic() + 30
    while get(served[0] + "/health")["active"] and time.monotonic() < deadline:
        time.sleep(0.05)


def test_the_library_imports_without_the_server_packages_and_the_command_says_what_to_install(
        monkeypatch, capsys, tmp_path):
    import ast
    import sys

    import kosmos.serve
    from kosmos.errors import run_cli
    from kosmos.serve import main

    tree = ast.parse(Path(kosmos.serve.__file__).read_text())  # its top-level imports: the library's only
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert not top & {"fastapi", "uvicorn", "starlette", "openai"}, top
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    assert run_cli(main, [str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'kosmos-pretrain[serve]'" in err and "fastapi" in err, err


@pytest.mark.slow
def test_the_command_serves_a_checkpoint_on_the_port_it_prints(tmp_path, tiny_tokenizer):
    import subprocess
    import sys

    from tests.helpers import ROOT, checkpoint_dir

    checkpoint_dir(tmp_path / "run", tiny_tokenizer.path, tiny_model())
    cmd = [sys.executable, "-m", "kosmos.serve", str(tmp_path / "run"), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    guard = threading.Timer(120, proc.kill)  # a server that never says where it listens ends the test
    guard.start()
    try:
        lines = []
        while not (lines and lines[-1].startswith("serving")) and proc.poll() is None:
            lines.append(proc.stdout.readline())
        assert lines and lines[-1].startswith("serving run: the page at http://127.0.0.1:"), "".join(lines)
        url = lines[-1].split("the OpenAI API at ")[1].strip()
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["run"]
        out = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "a"}],
                                             max_tokens=4, temperature=0)
        assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens <= 4
        with urllib.request.urlopen(url.removesuffix("/v1") + "/", timeout=30) as r:
            assert "<title>KOSMOS" in r.read().decode()
    finally:
        guard.cancel()
        proc.terminate()
        proc.wait(30)


# ----------------------------------------------------------------------------- the page, in a real browser


def browser():
    """Headless Debian chromium through selenium and chromium-driver, or a skip that says what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium: pip install -r requirements-test.txt")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver; .ci/run installs them)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,820",
                "--disable-gpu", "--no-first-run"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(driver))


@pytest.mark.slow
def test_the_page_streams_the_answer_and_shows_errors(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = served[0]
    img = write(tmp_path / "photo.jpg", photo(4))
    text_file = write(tmp_path / "notes.txt", "not a picture")
    want = expected(served, "an image of", (photo(4),), max_new_tokens=24)
    b = browser()
    try:
        b.get(url + "/")
        assert "KOSMOS" in b.title and NAME in b.find_element(By.ID, "model").text
        b.find_element(By.ID, "file").send_keys(str(img))
        WebDriverWait(b, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs img")) == 1)
        prompt = b.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("an image of")
        tokens = b.find_element(By.ID, "max_tokens")
        tokens.clear()
        tokens.send_keys("24")
        b.find_element(By.ID, "go").click()
        WebDriverWait(b, 60).until(lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") == "1"
                                   or d.find_element(By.ID, "error").is_displayed())
        assert not b.find_element(By.ID, "error").is_displayed(), b.find_element(By.ID, "error").text
        assert b.find_element(By.ID, "generated").get_attribute("textContent") == want
        assert "done" in b.find_element(By.ID, "status").text
        shot = tmp_path / "serve_demo.png"
        b.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("KOSMOS_UPDATE_SCREENSHOT"):  # the README's picture: docs/serve_demo.png
            shutil.copy(shot, Path(__file__).resolve().parents[1] / "docs" / "serve_demo.png")
        # Interleaved: two images placed by the prompt's {image} markers.
        second = write(tmp_path / "second.jpg", photo(6))
        b.find_element(By.ID, "file").send_keys(str(second))
        WebDriverWait(b, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs img")) == 2)
        prompt.clear()
        prompt.send_keys("{image} a photo. {image} a")
        b.find_element(By.ID, "go").click()
        WebDriverWait(b, 60).until(lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") == "1"
                                   or d.find_element(By.ID, "error").is_displayed())
        assert not b.find_element(By.ID, "error").is_displayed(), b.find_element(By.ID, "error").text
        want = expected(served, "{image} a photo. {image} a", (photo(4), photo(6)), max_new_tokens=24)
        assert b.find_element(By.ID, "generated").get_attribute("textContent") == want
        # A file that is no image: the server's error, shown on the page.
        b.find_element(By.ID, "clear").click()
        prompt.clear()
        prompt.send_keys("an image of")
        b.find_element(By.ID, "file").send_keys(str(text_file))
        WebDriverWait(b, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs .thumb")) == 1)
        b.find_element(By.ID, "go").click()
        WebDriverWait(b, 30).until(lambda d: d.find_element(By.ID, "error").is_displayed())
        assert "not an image" in b.find_element(By.ID, "error").text
        b.save_screenshot(str(tmp_path / "serve_demo_error.png"))
    finally:
        b.quit()
