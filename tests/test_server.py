"""`dsv4 serve`'s application on the tiny CPU artifact, through FastAPI's test client. The artifact is float32,
where prefill and decode agree bit for bit, so a conversation continued from the caches must answer exactly
what a fresh prefill of the same prompt answers."""
import json

import pytest
from fastapi.testclient import TestClient

from runtime.artifact import ArtifactModel
from runtime.chat import Message, render
from runtime.generate import generate
from runtime.openai_reply import StopStrings
from runtime.sampling import Sampling
from runtime.server import Engine, make_app
from runtime.tokenizer import Tokenizer

pytestmark = pytest.mark.slow            # the tiny artifact's build (conftest `built`)


@pytest.fixture(scope="module")
def served(built):
    """(client, expected): the app over one loaded artifact, and a second model answering plainly."""
    out = built[0]
    tok = Tokenizer(out)
    plain = ArtifactModel(out)

    def expected(prompt: str | list[int], max_new: int, sampling: Sampling = Sampling()):
        """Generation (greedy by default) from `prompt` (text or ids) on a fresh cache: (answer, Generation, its
        ids)."""
        ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
        plain.reset(1)
        pieces = []
        done = generate(plain, tok, ids, max_new, pieces.append, sampling)
        return "".join(pieces), done, ids

    with TestClient(make_app(Engine(ArtifactModel(out), tok, keep=1), "tiny")) as client:
        yield client, expected, tok


def chat(client, messages, **body):
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def events(client, path, body) -> list:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_a_chat_completion_is_the_greedy_answer_to_its_rendered_prompt(served):
    client, expected, tok = served
    body = chat(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
                max_tokens=12)
    text, done, _ = expected(render([Message("system", "Be brief."), Message("user", "Hello")]), 12)
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert choice["message"] == {"role": "assistant", "content": text}
    assert choice["finish_reason"] == ("length" if done.finish == "length" else "stop")
    assert body["usage"]["completion_tokens"] == done.new_tokens > 0


def test_penalties_and_seeds_reach_the_sampler(served):
    client, expected, _ = served
    prompt = render([Message("user", "Say it again and again")])
    body = chat(client, [{"role": "user", "content": "Say it again and again"}], max_tokens=12,
                frequency_penalty=-2.0, presence_penalty=-0.5)
    penalised = expected(prompt, 12, Sampling(0.0, 1.0, 0, -0.5, -2.0))[0]   # negative: repeats
    assert body["choices"][0]["message"]["content"] == penalised != expected(prompt, 12)[0]
    hot = dict(temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
    text = chat(client, [{"role": "user", "content": "Surprise me"}], **hot)["choices"][0]["message"]["content"]
    assert text == expected(render([Message("user", "Surprise me")]), 12, Sampling(1.0, 0.9, 7))[0]


def test_streamed_chunks_add_up_to_the_whole_answer(served):
    client, _, _ = served
    messages = [{"role": "user", "content": "Tell me more"}]
    whole = chat(client, messages, max_tokens=10)
    chunks = events(client, "/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 10,
                                                     "stream": True, "stream_options": {"include_usage": True}})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == [whole["choices"][0]["finish_reason"]]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == whole["usage"]["completion_tokens"]


def continued(served, first: str, answer: str, then: str, max_new: int) -> tuple[list[int], str]:
    """(the ids a continued conversation feeds, the answer a fresh prefill of them gives): the ids generated for
    `answer` to the user turn `first` (not `answer` encoded again, which byte-level BPE need not give back),
    then the rest of the prompt with the user turn `then` after it."""
    _, expected, tok = served
    before = render([Message("user", first)])
    again, done, ids = expected(before, max_new)
    assert again == answer
    fed = done.fed(ids)
    text = render([Message("user", first), Message("assistant", answer), Message("user", then)])
    rest = tok.encode(text[len(before) + len(tok.decode(fed[len(ids):])):])
    return fed + rest, expected(fed + rest, max_new)[0]


def test_the_next_turn_is_prefilled_from_where_the_last_one_ended(served):
    client = served[0]
    first = [{"role": "user", "content": "Hi there"}]
    answer = chat(client, first, max_tokens=8)["choices"][0]["message"]["content"]
    turn = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    body = chat(client, turn, max_tokens=8)
    ids, again = continued(served, "Hi there", answer, "And then?", 8)
    assert body["usage"]["prompt_tokens"] == len(ids) and body["choices"][0]["message"]["content"] == again
    assert 0 < body["usage"]["prompt_tokens_details"]["cached_tokens"] < len(ids)
    other = chat(client, [{"role": "user", "content": "Something else"}], max_tokens=4)   # not a continuation
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_a_conversation_put_aside_is_taken_up_again(served):
    """A chat UI asks for a title between two turns: the chat's caches, kept in host memory meanwhile, are put
    back for its next turn (Engine keep=1 here)."""
    client = served[0]
    first = [{"role": "user", "content": "Tell me about ships"}]
    answer = chat(client, first, max_tokens=6)["choices"][0]["message"]["content"]
    title = chat(client, [{"role": "user", "content": "A title for this chat"}], max_tokens=3)
    assert title["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    turn = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Go on"}]
    body = chat(client, turn, max_tokens=6)
    ids, again = continued(served, "Tell me about ships", answer, "Go on", 6)
    assert body["usage"]["prompt_tokens"] == len(ids) and body["choices"][0]["message"]["content"] == again
    assert 0 < body["usage"]["prompt_tokens_details"]["cached_tokens"] < len(ids)


def test_a_completion_streams_text_and_stops_at_a_stop_string(served):
    client, expected, tok = served
    text = expected("Once upon", 16)[0]
    assert len(text) > 4
    stop = text[2:4]                                   # cut inside the answer
    body = client.post("/v1/completions", json={"prompt": "Once upon", "temperature": 0, "max_tokens": 16,
                                                "stop": [stop]}).json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == text[:text.find(stop)] and body["choices"][0]["finish_reason"] == "stop"
    chunks = events(client, "/v1/completions", {"prompt": "Once upon", "temperature": 0, "max_tokens": 16,
                                                "stop": stop, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in chunks) == text[:text.find(stop)]


def test_stop_strings_hold_back_what_may_begin_one():
    s = StopStrings(["END", "xyz"])
    assert s.feed("abcE") == "abc" and s.feed("N") == "" and s.feed("ding") == "ENding" and not s.hit
    assert s.feed("..EN") == ".." and s.feed("D!") == "" and s.hit and s.feed("more") == "" and s.flush() == ""


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "user", "content": "x"}]}, None),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages"),
    ({}, "messages"),
], ids=["n", "temperature", "context", "tools", "role", "assistant-last", "missing"])
def test_bad_requests_are_refused_with_openai_errors(served, body, param):
    client, _, _ = served
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param


def test_models_lists_the_served_name(served):
    client, _, _ = served
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] > 0
    assert client.get("/health").json() == {"status": "ok"}


def test_no_more_conversations_are_kept_than_asked(served):
    """keep=1: with two chats after it, the first one's caches are gone and its next turn is prefilled afresh."""
    client = served[0]
    first = [{"role": "user", "content": "Chat one"}]
    answer = chat(client, first, max_tokens=4)["choices"][0]["message"]["content"]
    for other in ("Chat two", "Chat three"):
        chat(client, [{"role": "user", "content": other}], max_tokens=2)
    turn = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "More"}]
    assert chat(client, turn, max_tokens=2)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_with_an_api_key_only_requests_that_carry_it_are_answered(built):
    out = built[0]
    with TestClient(make_app(Engine(ArtifactModel(out), Tokenizer(out)), "tiny", api_key="s3cret")) as client:
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = client.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert client.get("/v1/models", headers=headers).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/chat/completions", json=body, headers=good).status_code == 200
        assert client.get("/health").status_code == 200                  # a load balancer's probe needs no key


def test_the_serve_command_answers_over_http(built):
    """`dsv4 serve` itself: uvicorn on a free port, a streamed chat answer over real HTTP, then a clean stop."""
    import socket
    import subprocess
    import sys
    import time

    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "dsv4.cli", "serve", str(built[0]), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.5)
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]" and len(lines) >= 3
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert "serving" in err and "0 prompt tokens cached" in err      # its start line, then the request's
