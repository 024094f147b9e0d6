"""The OpenAI API through the official `openai` client."""

import threading
import time

import httpx
import openai
import pytest

MODEL = "qwen3moe-tiny"


def client(addr, **kw):
    return openai.OpenAI(base_url=f"http://{addr}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def chat(c, content, **kw):
    return c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_models(gateway):
    c = client(gateway)
    ids = [m.id for m in c.models.list()]
    assert ids == [MODEL]
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4o")


def test_chat_non_streaming_and_usage(gateway):
    r = chat(client(gateway), "Hello!", max_tokens=8, temperature=0)
    assert r.object == "chat.completion"
    ch = r.choices[0]
    assert ch.message.role == "assistant"
    assert isinstance(ch.message.content, str) and ch.message.content
    assert ch.finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(gateway):
    c = client(gateway)
    full = chat(c, "Stream this", max_tokens=10, temperature=0)
    stream = chat(c, "Stream this", max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert text == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens


def test_stop_strings(gateway):
    c = client(gateway)
    full = chat(c, "Stop test", max_tokens=24, temperature=0).choices[0].message.content
    assert len(full) > 6
    stop = full[4:6]
    cut = chat(c, "Stop test", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seed_reproduces(gateway):
    c = client(gateway)
    a = chat(c, "Random words", max_tokens=12, temperature=1.0, seed=1234).choices[0].message.content
    b = chat(c, "Random words", max_tokens=12, temperature=1.0, seed=1234).choices[0].message.content
    assert a == b


def test_logprobs(gateway):
    r = chat(client(gateway), "Logprobs", max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0
        assert len(t.top_logprobs) == 2
    assert "".join(t.token for t in content) == r.choices[0].message.content


def test_completions_streaming_and_not(gateway):
    c = client(gateway)
    r = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    text = "".join(ch.choices[0].text for ch in c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True) if ch.choices)
    assert text == r.choices[0].text


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
# For tool_choice: nothing here may mention the simulator's `weather` script, which would
# answer instead.
FORCE_TOOLS = [
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "find_city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
]
NAMED = {"type": "function", "function": {"name": "find_city"}}


def streamed_calls(stream):
    """Tool calls put together from `delta.tool_calls` the way OpenAI's clients do, the finish
    reason, and whether a call's name came before its last argument piece."""
    calls, finish, named_first = {}, None, True
    for chunk in stream:
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                if d.index not in calls:
                    named_first &= bool(d.id and d.function.name)
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                calls[d.index]["arguments"] += d.function.arguments or ""
    return [calls[k] for k in sorted(calls)], finish, named_first


def test_tool_call(tool_gateway, simulated):
    c = client(tool_gateway)
    r = chat(c, "What is the weather in Paris?", tools=TOOLS, max_tokens=100)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    call = ch.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert call.function.arguments == '{"city":"Paris"}'
    # Streaming: the call comes as `delta.tool_calls` pieces (name first, then arguments).
    calls, finish, named_first = streamed_calls(chat(c, "What is the weather in Paris?", tools=TOOLS, max_tokens=100, stream=True))
    assert finish == "tool_calls" and named_first
    assert [(k["name"], k["arguments"]) for k in calls] == [("get_weather", '{"city":"Paris"}')]


def test_tool_choice_required_and_named(tool_gateway, simulated):
    c = client(tool_gateway)
    r = chat(c, "forcecity", tools=FORCE_TOOLS, tool_choice=NAMED, max_tokens=200)
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.content is None
    call = r.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("find_city", '{"city":"Paris"}')
    calls, finish, _ = streamed_calls(chat(c, "forcecity", tools=FORCE_TOOLS, tool_choice=NAMED, max_tokens=200, stream=True))
    assert finish == "tool_calls"
    assert [(k["name"], k["arguments"]) for k in calls] == [("find_city", '{"city":"Paris"}')]
    r = chat(c, "anycall", tools=FORCE_TOOLS, tool_choice="required", max_tokens=200)
    assert r.choices[0].message.tool_calls[0].function.name == "get_time"
    # No call although one is required: an error, not a text answer.
    with pytest.raises(openai.InternalServerError) as e:
        chat(c, "nocall", tools=FORCE_TOOLS, tool_choice="required", max_tokens=200)
    assert "tool_choice" in e.value.body["message"]


def test_tool_choice_named_cut_by_budget(tool_gateway):
    # Whatever the model writes: the reply starts as a call of the named function, streamed
    # with its name first; one token cannot finish it, so it ends with finish reason `length`.
    c = client(tool_gateway)
    try:
        r = chat(c, "Call it", tools=FORCE_TOOLS, tool_choice=NAMED, max_tokens=1, temperature=0)
    except openai.BadRequestError as e:
        if e.body.get("code") == "context_length_exceeded":
            pytest.skip(f"the served model's context cannot hold the tool template's prompt: {e.body['message']}")
        raise
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.tool_calls[0].function.name == "find_city"
    calls, finish, named_first = streamed_calls(chat(c, "Call it", tools=FORCE_TOOLS, tool_choice=NAMED, max_tokens=1, temperature=0, stream=True))
    assert finish == "length" and named_first
    assert calls[0]["name"] == "find_city"
    assert calls[0]["arguments"] == r.choices[0].message.tool_calls[0].function.arguments


def test_tool_choice_errors(tool_gateway, gateway):
    for choice in [{"type": "function", "function": {"name": "nope"}}, {"type": "custom", "custom": {"name": "get_weather"}}, "sometimes"]:
        with pytest.raises(openai.BadRequestError) as e:
            chat(client(tool_gateway), "x", tools=FORCE_TOOLS, tool_choice=choice, max_tokens=2)
        assert e.value.body["param"] == "tool_choice", choice
    with pytest.raises(openai.BadRequestError) as e:
        chat(client(tool_gateway), "x", tool_choice="required", max_tokens=2)
    assert e.value.body["param"] == "tool_choice"
    # The fixture model's own template defines no tool calls: a call cannot be required.
    with pytest.raises(openai.BadRequestError) as e:
        chat(client(gateway), "x", tools=FORCE_TOOLS, tool_choice="required", max_tokens=2)
    assert e.value.body["param"] == "tool_choice"


def test_json_mode(gateway, simulated):
    import json
    r = chat(client(gateway), "jsonplease", max_tokens=100, response_format={"type": "json_object"})
    assert json.loads(r.choices[0].message.content) == {"a": [1, 2], "b": "x"}


def test_errors(gateway, keyed_gateway):
    c = client(gateway)
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, "x", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, "x", max_tokens=100000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        chat(client(keyed_gateway), "x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        chat(client(keyed_gateway, api_key="wrong"), "x", max_tokens=2)
    assert chat(client(keyed_gateway, api_key="secret-2"), "x", max_tokens=2).choices


def test_body_limit_and_broken_json(tiny_gateway):
    r = httpx.post(f"http://{tiny_gateway}/v1/chat/completions", content=b"x" * 70000, headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = httpx.post(f"http://{tiny_gateway}/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_queue_full_429_and_timeout_503(tiny_gateway, simulated):
    # Needs a generation that holds the only slot for seconds: the simulator's fixed token
    # rate does; the real tiny model finishes its 128-token context in milliseconds.
    c = client(tiny_gateway)
    holder = chat(c, "hold the only slot", max_tokens=1500, stream=True)
    next(iter(holder))  # the slot is taken
    results = {}

    def waiter():
        try:
            chat(c, "waits in the queue", max_tokens=2)
            results["w"] = "ok"
        except openai.APIStatusError as e:
            results["w"] = e

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.15)
    with pytest.raises(openai.RateLimitError) as e:
        chat(c, "finds the queue full", max_tokens=2)
    assert int(e.value.response.headers["retry-after"]) >= 1
    t.join()
    w = results["w"]
    assert isinstance(w, openai.APIStatusError) and w.status_code == 503, w
    assert "retry-after" in w.response.headers
    holder.close()
